//! Shared integration-test harness for the microbox workspace.
//!
//! Owns two things every integration test needs:
//! - [`registry()`]: one real Debian `docker-registry` per test process, on a free
//!   127.0.0.1 port, with filesystem storage in a temporary directory. It is killed when the
//!   test process exits (PR_SET_PDEATHSIG plus an `atexit` hook), so `cargo test` leaves no
//!   registry behind.
//! - Test images ([`image()`], [`layout()`]): built once with `umoci` from `busybox-static` and
//!   cached across runs under `target/microbox-testimages/<name>-<recipe hash>/`, guarded by a
//!   file lock so parallel test binaries do not race; pushed with `skopeo` once per process.
//!
//! [`faultproxy`] damages registry replies on purpose, for the robustness suites.
//!
//! Helpers for tests that build their own images ([`build_image_from_tars`], [`push_layout`])
//! live here too. Everything panics with the failing command and its stderr: this is test code.

pub mod bench;
pub mod faultproxy;
pub mod tokenserver;

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// A running `docker-registry` serving plain HTTP on loopback.
#[derive(Debug)]
pub struct Registry {
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// The registry's storage directory (inside a temporary directory removed at exit).
    pub storage: PathBuf,
}

/// Names of the prebuilt test images.
pub const IMAGES: &[&str] = &["busybox", "multilayer"];

const BUSYBOX_RECIPE: &str = include_str!("recipes/busybox.sh");
const MULTI_1: &str = include_str!("recipes/multilayer-1.sh");
const MULTI_2: &str = include_str!("recipes/multilayer-2.sh");
const MULTI_3: &str = include_str!("recipes/multilayer-3.sh");
const DEBIAN_PYTHON: &str = include_str!("recipes/debian-python.sh");
/// How the benchmark's Debian rootfs is made (cached separately: it needs the network).
const DEBOOTSTRAP: &[&str] = &["--variant=minbase", "--include=python3-minimal", "bookworm"];
/// Bump to force a rebuild when the Rust-side build steps (not the scripts) change.
const BUILDER_VERSION: &str = "2";

static REGISTRY: OnceLock<Registry> = OnceLock::new();
static AUTH_REGISTRY: OnceLock<Registry> = OnceLock::new();
static TOKEN_REGISTRY: OnceLock<(Registry, tokenserver::TokenServer)> = OnceLock::new();
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());
static TEMP_ROOTS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static ATEXIT: std::sync::Once = std::sync::Once::new();

/// User of [`registry_with_basic_auth`].
pub const AUTH_USER: &str = "microbox";
/// Password of [`registry_with_basic_auth`].
pub const AUTH_PASSWORD: &str = "test-password";
/// bcrypt of AUTH_PASSWORD (docker-registry's htpasswd accepts only bcrypt).
const AUTH_HTPASSWD: &str = "microbox:$2b$12$r3LF8o7z7hl83BOY0FEDJeyCeaV2njuteMgla1Df7z3vmidLrWDsq";
static PUSHED: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();

/// The process-wide registry, started on first use.
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(|| start_registry(false))
}

/// A second process-wide registry that requires HTTP basic auth
/// ([`AUTH_USER`]/[`AUTH_PASSWORD`]); empty until a test pushes to it.
pub fn registry_with_basic_auth() -> &'static Registry {
    AUTH_REGISTRY.get_or_init(|| start_registry(true))
}

/// A temporary directory that lives until the test process exits (then it is removed), for
/// state shared by the tests of one binary.
pub fn process_temp_dir(prefix: &str) -> PathBuf {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir")
        .keep();
    TEMP_ROOTS.lock().unwrap().push(tmp.clone());
    ATEXIT.call_once(|| {
        // SAFETY: registering a plain `extern "C" fn` with atexit; it only touches statics.
        unsafe {
            libc::atexit(cleanup_at_exit);
        }
    });
    tmp
}

/// A third process-wide registry that wants Docker Hub style bearer tokens from
/// [`tokenserver`] (which grants anonymous clients what they ask); empty until a test pushes.
pub fn registry_with_token_auth() -> &'static (Registry, tokenserver::TokenServer) {
    TOKEN_REGISTRY.get_or_init(|| {
        let tmp = process_temp_dir("microbox-tokens-");
        let tokens = tokenserver::TokenServer::start(&tmp);
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
             rootcertbundle: {}\n",
            tokens.realm,
            tokenserver::SERVICE,
            tokenserver::ISSUER,
            tokens.cert.display()
        );
        (start_registry_with(auth), tokens)
    })
}

fn start_registry(basic_auth: bool) -> Registry {
    let mut auth = String::new();
    if basic_auth {
        let tmp = process_temp_dir("microbox-htpasswd-");
        fs::write(tmp.join("htpasswd"), format!("{AUTH_HTPASSWD}\n")).unwrap();
        auth = format!(
            "auth:\n  htpasswd:\n    realm: microbox-test\n    path: {}\n",
            tmp.join("htpasswd").display()
        );
    }
    start_registry_with(auth)
}

/// Starts a registry whose config has `auth` (a YAML `auth:` section, or nothing).
fn start_registry_with(auth: String) -> Registry {
    require_tool("docker-registry", "apt-get install docker-registry");
    let tmp = process_temp_dir("microbox-registry-");
    let storage = tmp.join("storage");
    fs::create_dir_all(&storage).unwrap();

    let mut last_err = String::new();
    for _attempt in 0..5 {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = tmp.join("config.yml");
        fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {addr}\n{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let log = fs::File::create(tmp.join("registry.log")).unwrap();
        let child = spawn_owned(
            Command::new("docker-registry")
                .arg("serve")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let pid = child.id();
        CHILDREN.lock().unwrap().push(child);
        match wait_for_v2(&addr, Duration::from_secs(20)) {
            Ok(()) => return Registry { addr, storage },
            Err(e) => {
                last_err = format!(
                    "{e}; registry log:\n{}",
                    fs::read_to_string(tmp.join("registry.log")).unwrap_or_default()
                );
                kill_children(Some(pid));
            }
        }
    }
    panic!("docker-registry did not come up: {last_err}");
}

/// Spawns `cmd` so that it dies with this process. PR_SET_PDEATHSIG fires when the *thread*
/// that forked exits, and test threads are short-lived, so the fork happens on a dedicated
/// thread that lives as long as the process.
fn spawn_owned(cmd: &mut Command) -> Child {
    // SAFETY: the pre_exec closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<SpawnJob>>> = OnceLock::new();
    type SpawnJob = (
        Box<dyn FnOnce() -> std::io::Result<Child> + Send>,
        std::sync::mpsc::Sender<std::io::Result<Child>>,
    );
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("testsupport-spawner".into())
            .spawn(move || {
                while let Ok((job, reply)) = rx.recv() {
                    let _ = reply.send(job());
                }
                // Keep the thread alive even if the sender is gone: its death would kill children.
                loop {
                    std::thread::park();
                }
            })
            .expect("spawn spawner thread");
        Mutex::new(tx)
    });
    let cmd = std::mem::replace(cmd, Command::new("true"));
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    let mut cmd = cmd;
    tx.lock()
        .unwrap()
        .send((Box::new(move || cmd.spawn()), reply_tx))
        .expect("spawner thread alive");
    reply_rx
        .recv()
        .expect("spawner reply")
        .unwrap_or_else(|e| panic!("spawn failed: {e}"))
}

extern "C" fn cleanup_at_exit() {
    kill_children(None);
    if let Ok(mut t) = TEMP_ROOTS.lock() {
        for dir in t.drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Kills (and reaps) our registry with `pid`, or all of them.
fn kill_children(pid: Option<u32>) {
    if let Ok(mut c) = CHILDREN.lock() {
        c.retain_mut(|child| {
            if pid.is_some_and(|p| p != child.id()) {
                return true;
            }
            let _ = child.kill();
            let _ = child.wait();
            false
        });
    }
}

/// The real SEV-SNP test vectors: `crates/attest/tests/data/sev` (public reports and
/// certificates, see its PROVENANCE.md), or `MICROBOX_SEV_TESTDATA` to try others.
pub fn sev_vectors() -> PathBuf {
    let dir = std::env::var_os("MICROBOX_SEV_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../attest/tests/data/sev")
        });
    assert!(
        dir.join("milan-report.bin").is_file(),
        "SEV test vectors missing: no milan-report.bin in {}",
        dir.display()
    );
    dir
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn wait_for_v2(addr: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get_status(addr, "/v2/") {
            // 401: a registry with auth is up too.
            Ok(200) | Ok(401) => return Ok(()),
            Ok(code) => return Err(format!("GET /v2/ answered {code}")),
            Err(e) if Instant::now() > deadline => return Err(format!("GET /v2/: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn http_get_status(addr: &str, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    // The registry answers 404 for OCI manifests unless the client accepts them.
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP answer: {head:.80}")))
}

/// Pullable reference of a prebuilt test image, e.g.
/// `127.0.0.1:PORT/microbox-test/busybox:latest`. Builds and pushes on first use.
pub fn image(name: &str) -> String {
    let pushed = PUSHED.get_or_init(|| Mutex::new(HashMap::new()));
    // Hold the lock across the push: two tests asking at once push once.
    let mut map = pushed.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = map.get(name) {
        return r.clone();
    }
    let dir = layout(name);
    let reference = push_layout(&dir, "latest", &format!("microbox-test/{name}:latest"));
    map.insert(name.to_string(), reference.clone());
    reference
}

/// Pushes `oci:LAYOUT:TAG` to the test registry as `repo_and_tag` (e.g. `x/y:latest`) and
/// returns the full reference.
pub fn push_layout(layout: &Path, tag: &str, repo_and_tag: &str) -> String {
    push_layout_with(layout, tag, repo_and_tag, &[])
}

/// [`push_layout`] with extra `skopeo copy` flags, e.g. `--format v2s2` (Docker schema 2),
/// `--dest-compress-format zstd`, `--dest-decompress`.
pub fn push_layout_with(layout: &Path, tag: &str, repo_and_tag: &str, extra: &[&str]) -> String {
    push_layout_to(registry(), layout, tag, repo_and_tag, extra)
}

/// Pushes to a given registry (e.g. [`registry_with_basic_auth`], with
/// `--dest-creds microbox:test-password` in `extra`).
pub fn push_layout_to(
    reg: &Registry,
    layout: &Path,
    tag: &str,
    repo_and_tag: &str,
    extra: &[&str],
) -> String {
    require_tool("skopeo", "apt-get install skopeo");
    let reference = format!("{}/{repo_and_tag}", reg.addr);
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--insecure-policy",
            "--dest-tls-verify=false",
        ])
        .args(extra)
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{reference}")));
    reference
}

/// Local OCI image layout directory of a prebuilt test image (tag `latest`), built on first use
/// and cached across runs. Treat it as read-only.
pub fn layout(name: &str) -> PathBuf {
    let (recipe_key, build): (String, fn(&Path)) = match name {
        "busybox" => (format!("{BUILDER_VERSION}{BUSYBOX_RECIPE}"), build_busybox),
        "multilayer" => (
            format!("{BUILDER_VERSION}{MULTI_1}{MULTI_2}{MULTI_3}"),
            build_multilayer,
        ),
        "debian-python" => (
            format!("{BUILDER_VERSION}{DEBIAN_PYTHON}{DEBOOTSTRAP:?}"),
            build_debian_python,
        ),
        other => panic!("unknown test image {other:?}; known: {IMAGES:?} and debian-python"),
    };
    let busybox = fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("read /bin/busybox ({e}); apt-get install busybox-static"));
    let mut h = Sha256::new();
    h.update(recipe_key.as_bytes());
    h.update(&busybox);
    h.update(if is_root() { b"root" } else { b"user" });
    let key = hex::encode(&h.finalize()[..8]);

    let cache = cache_dir();
    fs::create_dir_all(&cache).unwrap();
    let final_dir = cache.join(format!("{name}-{key}"));
    let _lock = FileLock::exclusive(&cache.join(".lock"));
    if final_dir.join("index.json").exists() {
        return final_dir.join("oci");
    }
    let work = cache.join(format!(".build-{name}-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    build(&work);
    // Marker last, so a crashed build is never taken for a finished one.
    fs::write(work.join("index.json"), b"{}").unwrap();
    let _ = fs::remove_dir_all(&final_dir);
    fs::rename(&work, &final_dir).unwrap();
    final_dir.join("oci")
}

fn build_busybox(work: &Path) {
    let oci = work.join("oci");
    umoci_init(&oci);
    add_layer_with_script(work, &oci, BUSYBOX_RECIPE, "busybox base");
    let image = format!("{}:latest", oci.display());
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.cmd",
        "sh",
        "--config.workingdir",
        "/",
        "--config.exposedports",
        "80/tcp",
        "--architecture",
        "amd64",
        "--os",
        "linux",
    ]));
}

fn build_multilayer(work: &Path) {
    let oci = work.join("oci");
    umoci_init(&oci);
    add_layer_with_script(work, &oci, MULTI_1, "base with every entry type");
    add_layer_with_script(work, &oci, MULTI_2, "deletions and type changes");
    let stage = work.join("stage3");
    fs::create_dir_all(&stage).unwrap();
    let tar = work.join("layer3.tar");
    run(Command::new("sh")
        .arg("-c")
        .arg(MULTI_3)
        .arg("multilayer-3")
        .arg(&stage)
        .arg(&tar));
    add_tar_layer(&oci, "latest", &tar);
    let image = format!("{}:latest", oci.display());
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
        "--config.cmd",
        "sh",
        "--config.workingdir",
        "/data",
        "--config.user",
        "1000:1000",
    ]));
    let _ = fs::remove_dir_all(&stage);
}

/// Debian minbase + python3 (about 150 MB unpacked) in three layers, for benchmarks. The
/// debootstrap output is cached in `target/microbox-testimages/debootstrap-<hash>/rootfs`.
fn build_debian_python(work: &Path) {
    require_tool_any(
        "debootstrap",
        &["/usr/sbin", "/sbin"],
        "apt-get install debootstrap",
    );
    let mut h = Sha256::new();
    h.update(format!("{DEBOOTSTRAP:?}").as_bytes());
    let cache = cache_dir().join(format!("debootstrap-{}", hex::encode(&h.finalize()[..8])));
    let rootfs = cache.join("rootfs");
    if !cache.join("done").exists() {
        let _ = Command::new("rm").arg("-rf").arg(&cache).status();
        fs::create_dir_all(&cache).unwrap();
        let mut cmd = Command::new("debootstrap");
        cmd.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(DEBOOTSTRAP)
            .arg(&rootfs);
        run(cmd.arg("http://deb.debian.org/debian"));
        fs::write(cache.join("done"), b"").unwrap();
    }
    let oci = work.join("oci");
    umoci_init(&oci);
    run(Command::new("sh")
        .arg("-c")
        .arg(DEBIAN_PYTHON)
        .arg("debian-python")
        .arg(&rootfs)
        .arg(work));
    for l in ["l1.tar", "l2.tar", "l3.tar"] {
        add_tar_layer(&oci, "latest", &work.join(l));
        fs::remove_file(work.join(l)).unwrap();
    }
    let image = format!("{}:latest", oci.display());
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--config.cmd",
        "python3",
    ]));
}

fn require_tool_any(tool: &str, extra_dirs: &[&str], hint: &str) {
    if extra_dirs.iter().any(|d| Path::new(d).join(tool).is_file()) {
        return;
    }
    require_tool(tool, hint);
}

fn umoci_init(oci: &Path) {
    require_tool("umoci", "apt-get install umoci");
    run(Command::new("umoci").arg("init").arg("--layout").arg(oci));
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:latest", oci.display())));
}

/// unpack -> run `script` on the rootfs -> repack: one new layer holding the script's changes.
fn add_layer_with_script(work: &Path, oci: &Path, script: &str, comment: &str) {
    let bundle = work.join("bundle");
    let _ = fs::remove_dir_all(&bundle);
    let image = format!("{}:latest", oci.display());
    let mut unpack = Command::new("umoci");
    unpack.arg("unpack");
    if !is_root() {
        unpack.arg("--rootless");
    }
    run(unpack.args(["--image", &image]).arg(&bundle));
    run(Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("recipe")
        .arg(bundle.join("rootfs"))
        .env("ROOTLESS", if is_root() { "0" } else { "1" }));
    run(Command::new("umoci")
        .args(["repack", "--history.comment", comment, "--image", &image])
        .arg(&bundle));
    // The bundle may contain 0500 directories; make it removable.
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+rwx")
        .arg(&bundle)
        .status();
    let _ = fs::remove_dir_all(&bundle);
}

/// Appends an uncompressed tar as a new layer of `oci:TAG` (verbatim, via `umoci raw add-layer`).
pub fn add_tar_layer(oci: &Path, tag: &str, tar: &Path) {
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image"])
        .arg(format!("{}:{tag}", oci.display()))
        .arg(tar));
}

/// Builds an OCI layout at `dir` (tag `latest`) whose layers are exactly the given
/// uncompressed tar files, in order. Used by tests with hand-crafted (e.g. hostile) layers.
pub fn build_image_from_tars(dir: &Path, tars: &[PathBuf]) -> PathBuf {
    umoci_init(dir);
    for t in tars {
        add_tar_layer(dir, "latest", t);
    }
    dir.to_path_buf()
}

/// `target/microbox-testimages` of the workspace running the tests.
pub fn cache_dir() -> PathBuf {
    target_dir().join("microbox-testimages")
}

/// The cargo target directory (CARGO_TARGET_DIR, else derived from the test executable's path
/// `target/<profile>/deps/<bin>`).
pub fn target_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .or_else(|| exe.ancestors().nth(3).map(Path::to_path_buf))
        .expect("cannot locate the cargo target dir")
}

/// Whether the tests run as root (owners, device nodes and setuid bits need it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd`, returning stdout; panics with the command line and stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "command failed ({}): {cmd:?}\nstderr:\n{}\nstdout:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` with `input` on its stdin and its stdout captured (stderr as the caller set it);
/// returns the output. The input is written from a thread, so a chatty child cannot block it.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("wait for the child");
    // A child that exits without reading all of it (a failing check) is the caller's to judge.
    match writer.join().expect("stdin writer") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write to {cmd:?}: {e}"),
        _ => out,
    }
}

pub(crate) fn require_tool(tool: &str, hint: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        panic!("test tool `{tool}` not found in PATH; install it: {hint}");
    }
}

/// An exclusive `flock` held until dropped.
pub struct FileLock(#[allow(dead_code)] fs::File);

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if missing) is held.
    pub fn exclusive(path: &Path) -> FileLock {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock {}: {e}", path.display()));
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .unwrap_or_else(|e| panic!("flock {}: {e}", path.display()));
        FileLock(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_serves_pushed_images() {
        let reg = registry();
        assert_eq!(http_get_status(&reg.addr, "/v2/").unwrap(), 200);
        let r = image("busybox");
        assert!(r.starts_with(&reg.addr), "{r}");
        // The registry now knows the manifest.
        let code =
            http_get_status(&reg.addr, "/v2/microbox-test/busybox/manifests/latest").unwrap();
        assert_eq!(code, 200);
        // Second call is cached and identical.
        assert_eq!(image("busybox"), r);
    }

    #[test]
    fn multilayer_has_three_layers() {
        let dir = layout("multilayer");
        let out = run(Command::new("umoci")
            .args(["stat", "--json", "--image"])
            .arg(format!("{}:latest", dir.display())));
        let layers = out.matches("\"created_by\"").count() + out.matches("\"comment\"").count();
        assert!(layers >= 3, "expected 3 layers of history, got: {out}");
        assert!(image("multilayer").ends_with("microbox-test/multilayer:latest"));
    }
}
