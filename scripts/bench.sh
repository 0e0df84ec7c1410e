#!/usr/bin/env bash
# Runs every benchmark on this machine (real microVMs under QEMU, TCG where KVM is not usable;
# a real registry from the test harness) and prints one table: each figure with the baseline
# measured in the same run and the ratio. Writes target/bench/results-<commit>.json.
#   scripts/bench.sh                 all benchmarks
#   scripts/bench.sh boot pull_unpack   only these
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/setup.sh --deps
export MICROBOX_AGENT="$PWD/$(scripts/build-agent.sh)"

out=target/bench
mkdir -p "$out"
export MICROBOX_BENCH_OUT="$PWD/$out/figures.jsonl"
rm -f "$MICROBOX_BENCH_OUT"

all=(boot agent_rtt pull_unpack cli_overhead density network)
want=("${@:-${all[@]}}")
pkg_of() {
  case "$1" in
    boot|agent_rtt) echo microbox-runtime ;;
    pull_unpack) echo microbox-image ;;
    cli_overhead|density|network) echo microbox ;;
    *) echo "bench.sh: unknown benchmark '$1' (known: ${all[*]})" >&2; exit 2 ;;
  esac
}
for b in "${want[@]}"; do
  pkg=$(pkg_of "$b")
  printf '\033[1mbench:\033[0m %s\n' "cargo bench -p $pkg --bench $b" >&2
  cargo bench --quiet -p "$pkg" --bench "$b"
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
echo
cargo run --quiet --release -p microbox-testsupport --bin bench-report -- \
  "$MICROBOX_BENCH_OUT" "$out/results-$commit.json"
