//! The command-line surface: every command, flag and help text, with an example per command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "microbox",
    version,
    about = "Run OCI images in their own microVMs: Docker's ease, a VM's isolation",
    after_help = "Example:\n  microbox run --rm alpine -- echo hi",
    propagate_version = true
)]
pub struct Cli {
    /// State directory (images, boxes, caches).
    #[arg(long, global = true, env = "MICROBOX_ROOT")]
    pub root: Option<PathBuf>,
    /// Verbose diagnostics on stderr.
    #[arg(long, global = true)]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a box from an image, boot it and run its command.
    #[command(
        after_help = "Examples:\n  microbox run --rm busybox -- echo hi\n  microbox run -d --name web -p 8080:80 busybox -- httpd -f\n  microbox run -it busybox sh"
    )]
    Run(RunArgs),
    /// Create a box without starting it.
    #[command(after_help = "Example:\n  microbox create --name job busybox -- sh -c 'echo done'")]
    Create(RunArgs),
    /// Start a created or stopped box.
    #[command(after_help = "Example:\n  microbox start job")]
    Start {
        /// Box name, id or id prefix.
        boxes: Vec<String>,
        /// Stay attached and print the output (like `run`).
        #[arg(short, long)]
        attach: bool,
    },
    /// Stop boxes: the main process gets SIGTERM, then the VM is powered off.
    #[command(after_help = "Example:\n  microbox stop -t 5 web")]
    Stop {
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// Send a signal to the main process of boxes (default SIGKILL).
    #[command(after_help = "Example:\n  microbox kill -s TERM web")]
    Kill {
        #[arg(short, long, default_value = "KILL")]
        signal: String,
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// Stop then start boxes.
    #[command(after_help = "Example:\n  microbox restart web")]
    Restart {
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// Remove boxes (and everything they left behind).
    #[command(after_help = "Example:\n  microbox rm -f web")]
    Rm {
        /// Stop running boxes first instead of refusing.
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// List boxes.
    #[command(after_help = "Example:\n  microbox ps -a --format json")]
    Ps {
        /// Show all boxes (default: running ones).
        #[arg(short, long)]
        all: bool,
        /// Only ids.
        #[arg(short, long)]
        quiet: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run a command in a running box.
    #[command(
        after_help = "Example:\n  microbox exec web cat /etc/os-release\n  microbox exec -it web sh"
    )]
    Exec(ExecArgs),
    /// Show a box's output.
    #[command(after_help = "Example:\n  microbox logs -f --tail 20 web")]
    Logs {
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
        #[arg(short = 't', long)]
        timestamps: bool,
        /// The kernel console instead of the workload's output.
        #[arg(long)]
        console: bool,
        #[arg(name = "BOX")]
        target: String,
    },
    /// List a box's published ports.
    #[command(after_help = "Example:\n  microbox port web")]
    Port {
        #[arg(name = "BOX")]
        target: String,
    },
    /// Show everything known about a box, as JSON.
    #[command(after_help = "Example:\n  microbox inspect web")]
    Inspect {
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// Copy files between the host and a box: `BOX:PATH` names a path in the box.
    #[command(
        after_help = "Examples:\n  microbox cp ./app.py web:/srv/app.py\n  microbox cp web:/var/log ./logs"
    )]
    Cp { src: String, dst: String },
    /// Wait for boxes to stop; print their exit codes.
    #[command(after_help = "Example:\n  microbox wait job")]
    Wait {
        #[arg(required = true)]
        boxes: Vec<String>,
    },
    /// Live resource usage of boxes.
    #[command(after_help = "Example:\n  microbox stats --no-stream")]
    Stats {
        #[arg(long)]
        no_stream: bool,
        boxes: Vec<String>,
    },
    /// Ask a box's agent whether it is healthy (grpc.health.v1).
    #[command(after_help = "Example:\n  microbox health web")]
    Health {
        #[arg(name = "BOX")]
        target: String,
    },
    /// Download an image.
    #[command(after_help = "Example:\n  microbox pull 127.0.0.1:5000/demo/busybox:latest")]
    Pull {
        #[arg(long)]
        platform: Option<String>,
        reference: String,
    },
    /// List stored images.
    #[command(after_help = "Example:\n  microbox images --format json")]
    Images {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove stored images.
    #[command(after_help = "Example:\n  microbox rmi busybox")]
    Rmi {
        /// Untag even when boxes were made from the image (running ones keep their rootfs).
        #[arg(short, long)]
        force: bool,
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Image management.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Named volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Store credentials for a registry.
    #[command(
        after_help = "Example:\n  echo \"$TOKEN\" | microbox login -u me --password-stdin registry.example.com"
    )]
    Login {
        server: String,
        #[arg(short, long)]
        username: String,
        #[arg(short, long, conflicts_with = "password_stdin")]
        password: Option<String>,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget the credentials of a registry.
    #[command(after_help = "Example:\n  microbox logout registry.example.com")]
    Logout { server: String },
    /// AMD SEV-SNP attestation: verify reports, compute expected measurements, attest a box.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:\n  microbox attest verify --report report.bin --vcek vcek.der --nonce 00ff\n  microbox attest measure --ovmf OVMF.fd --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0' --vcpus 2 --vcpu-type EPYC-v4\n  microbox attest web"
    )]
    Attest(AttestArgs),
    /// Show lifecycle events (boots and their phases, execs, state changes), then follow.
    #[command(
        after_help = "Examples:\n  microbox events --since 10m --until 0s\n  microbox events --format json"
    )]
    Events {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only events after this time: RFC 3339, or an age such as 10m.
        #[arg(long)]
        since: Option<String>,
        /// Stop at this time (RFC 3339 or age; `0s` = now): no following.
        #[arg(long)]
        until: Option<String>,
    },
    /// Print metrics in the Prometheus text format, or serve them over HTTP.
    #[command(
        after_help = "Examples:\n  microbox metrics\n  microbox metrics --listen 127.0.0.1:9464"
    )]
    Metrics {
        /// Serve GET /metrics on this address until stopped.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Host facts: backend, acceleration and why, kernel, paths.
    #[command(after_help = "Example:\n  microbox info")]
    Info,
    /// Print version information.
    Version,
    /// Generate shell completions.
    #[command(
        after_help = "Example:\n  microbox completions bash > /etc/bash_completion.d/microbox"
    )]
    Completions { shell: clap_complete::Shell },
    /// Supervise one box (internal: started by run/start in its own session).
    #[command(hide = true)]
    Supervise { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Show an image's digest, platform, config and layers as JSON.
    #[command(after_help = "Example:\n  microbox image inspect busybox")]
    Inspect { reference: String },
    /// Re-verify every stored blob and report damage.
    #[command(after_help = "Example:\n  microbox image check")]
    Check,
    /// Materialise an image's root filesystem into a directory.
    #[command(after_help = "Example:\n  microbox image unpack busybox ./rootfs")]
    Unpack { reference: String, dest: PathBuf },
    /// Import an OCI layout (directory or tar) or a `docker save` archive.
    #[command(after_help = "Example:\n  microbox image import ./layout demo/busybox:latest")]
    Import {
        path: PathBuf,
        reference: Option<String>,
    },
    /// Remove unused blobs and unpacked root filesystems.
    #[command(after_help = "Example:\n  microbox image prune")]
    Prune,
    /// List stored images (same as `microbox images`).
    #[command(after_help = "Example:\n  microbox image ls")]
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Args, Debug)]
pub struct AttestArgs {
    #[command(subcommand)]
    pub command: Option<AttestCommand>,
    /// Ask this box for a report bound to a fresh nonce and verify it.
    #[arg(name = "BOX")]
    pub target: Option<String>,
    #[arg(long)]
    pub policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Subcommand, Debug)]
pub enum AttestCommand {
    /// Verify an SEV-SNP attestation report: certificate chain, signature, policy, freshness.
    #[command(
        after_help = "Example:\n  microbox attest verify --report report.bin --vcek vcek.der --nonce 00ff --at 2025-01-01T00:00:00Z"
    )]
    Verify {
        #[arg(long)]
        report: PathBuf,
        /// The VCEK or VLEK certificate (DER or PEM); otherwise the cache or AMD's KDS.
        #[arg(long)]
        vcek: Option<PathBuf>,
        /// The certificate table of an extended report (VCEK/VLEK, ASK/ASVK), used when no
        /// --vcek is given.
        #[arg(long)]
        cert_table: Option<PathBuf>,
        /// An ASK or ASVK certificate to use where none is pinned (the Milan ASVK for VLEK
        /// reports); it must chain to the pinned AMD root.
        #[arg(long)]
        intermediate: Option<PathBuf>,
        /// Policy file (TOML); the strict default policy otherwise.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The verifier's nonce, hex (at least 8 bytes): report_data must be its hash.
        #[arg(long)]
        nonce: Option<String>,
        /// A public key file bound into report_data together with the nonce.
        #[arg(long, requires = "nonce")]
        public_key: Option<PathBuf>,
        /// Check certificate validity at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
        /// Use only the local certificate cache, never the network.
        #[arg(long)]
        offline: bool,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Compute the expected SNP launch measurement of a direct-boot guest.
    #[command(
        after_help = "Example:\n  microbox attest measure --ovmf OVMF.fd --kernel vmlinuz --initrd initrd.img --append 'console=ttyS0' --vcpus 2 --vcpu-type EPYC-v4"
    )]
    Measure {
        #[arg(long)]
        ovmf: PathBuf,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long, default_value = "")]
        append: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value = "EPYC-v4")]
        vcpu_type: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a named volume.
    #[command(
        after_help = "Example:\n  microbox volume create data && microbox run --rm -v data:/data busybox ls /data"
    )]
    Create { name: String },
    /// List named volumes.
    #[command(after_help = "Example:\n  microbox volume ls")]
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show a volume as JSON.
    #[command(after_help = "Example:\n  microbox volume inspect data")]
    Inspect { name: String },
    /// Remove volumes (refused while a box uses them).
    #[command(after_help = "Example:\n  microbox volume rm data")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Run in the background and print the box id.
    #[arg(short, long)]
    pub detach: bool,
    /// Remove the box when it stops.
    #[arg(long)]
    pub rm: bool,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory, e.g. 512m or 1g.
    #[arg(short, long, default_value = "256m")]
    pub memory: String,
    /// Environment variable KEY=VALUE (or KEY to take it from this shell).
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    #[arg(long)]
    pub env_file: Vec<PathBuf>,
    #[arg(short, long)]
    pub workdir: Option<String>,
    #[arg(short, long)]
    pub user: Option<String>,
    /// HOST:GUEST[:ro] bind of a host directory (or a named volume).
    #[arg(short, long = "volume")]
    pub volume: Vec<String>,
    /// [IP:]HOST:GUEST[/tcp|udp] published port.
    #[arg(short, long = "publish")]
    pub publish: Vec<String>,
    /// user (QEMU's built-in user-mode stack), passt (a separate sandboxed passt process) or
    /// none (loopback only).
    #[arg(long, default_value = "user")]
    pub network: String,
    #[arg(long)]
    pub entrypoint: Option<String>,
    #[arg(long)]
    pub hostname: Option<String>,
    /// Keep stdin open.
    #[arg(short, long)]
    pub interactive: bool,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    #[arg(long)]
    pub platform: Option<String>,
    /// Seconds to wait for the box's agent.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    pub image: String,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ExecArgs {
    #[arg(short, long)]
    pub interactive: bool,
    #[arg(short, long)]
    pub tty: bool,
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    #[arg(short, long)]
    pub workdir: Option<String>,
    #[arg(short, long)]
    pub user: Option<String>,
    #[arg(name = "BOX")]
    pub target: String,
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Parses Docker-style sizes: `512m`, `1g`, `1.5g`, `268435456` (bytes); returns MiB.
pub fn parse_memory_mib(s: &str) -> Result<u32, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult): (&str, f64) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1.0 / 1024.0),
        Some('m') => (&t[..t.len() - 1], 1.0),
        Some('g') => (&t[..t.len() - 1], 1024.0),
        Some(c) if c.is_ascii_digit() => (t, 1.0 / (1024.0 * 1024.0)),
        _ => {
            return Err(format!(
                "invalid memory size '{s}': expected e.g. 512m or 1g"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid memory size '{s}': expected e.g. 512m or 1g"))?;
    let mib = n * mult;
    if !(1.0..=(u32::MAX as f64)).contains(&mib) {
        return Err(format!("invalid memory size '{s}': out of range"));
    }
    Ok(mib.round() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_visible_command_has_an_example() {
        for sub in Cli::command().get_subcommands() {
            if sub.is_hide_set() || ["version", "help"].contains(&sub.get_name()) {
                continue;
            }
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let nested_ok = sub.has_subcommands()
                && sub
                    .get_subcommands()
                    .all(|s| s.get_name() == "ls" || s.get_after_help().is_some());
            assert!(
                help.contains("microbox") || nested_ok,
                "{} lacks an example",
                sub.get_name()
            );
        }
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512m"), Ok(512));
        assert_eq!(parse_memory_mib("1g"), Ok(1024));
        assert_eq!(parse_memory_mib("1.5G"), Ok(1536));
        assert_eq!(parse_memory_mib("268435456"), Ok(256));
        assert!(parse_memory_mib("lots").unwrap_err().contains("'lots'"));
    }

    #[test]
    fn run_takes_the_command_after_the_image() {
        let cli = Cli::try_parse_from([
            "microbox", "run", "--rm", "-e", "A=1", "busybox", "sh", "-c", "echo hi",
        ])
        .unwrap();
        match cli.command {
            Command::Run(r) => {
                assert!(r.rm);
                assert_eq!(r.image, "busybox");
                assert_eq!(r.command, ["sh", "-c", "echo hi"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
