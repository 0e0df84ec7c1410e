//! The agent's PID 1 duties: early mounts, kernel modules, the box root (virtio-fs lower +
//! overlay upper), volumes, hostname, network, and a clean power-off. Runs before the async
//! runtime starts; every failure is reported with what was being done.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use microbox_agent_proto::{BootConfig, BOOT_CONFIG_PATH};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::rootpath::resolve_in_root;

/// Where the box root is assembled.
pub const BOX_ROOT: &str = "/run/microbox/root";
const LOWER: &str = "/run/microbox/lower";
const UPPER_BASE: &str = "/run/microbox/rw";

/// What boot produced.
pub struct Booted {
    pub root: PathBuf,
    pub config: BootConfig,
    /// Mount points in the order they were made (unmounted in reverse on power-off).
    pub mounts: Vec<PathBuf>,
}

/// Prints to the console (PID 1's stderr is the console once [`early_mounts`] ran).
pub fn console(msg: &str) {
    let mut e = std::io::stderr();
    let _ = writeln!(e, "microbox-agent: {msg}");
}

/// Reports a fatal boot error and powers off: PID 1 must never hang silently or exit.
pub fn fatal(msg: &str) -> ! {
    console(&format!("FATAL: {msg}"));
    console("powering off");
    power_off()
}

pub fn power_off() -> ! {
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Only reached when not allowed to power off (not PID 1 / no CAP_SYS_BOOT).
    console(&format!("power-off failed: {e:?}"));
    std::process::exit(1)
}

fn mnt(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(Some(src), target, Some(fstype), flags, data).map_err(|e| {
        format!(
            "mount -t {fstype} {src} {} ({}): {e}",
            target.display(),
            data.unwrap_or("")
        )
    })
}

fn mkdir_p(p: &Path, mode: u32) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .map_err(|e| format!("mkdir {}: {e}", p.display()))
}

/// /proc, /sys, /dev, /dev/pts, /dev/shm, /run, /tmp and the console on fds 0-2.
pub fn early_mounts() -> Result<(), String> {
    let none = MsFlags::empty();
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for d in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        mkdir_p(Path::new(d), 0o755)?;
    }
    mnt(
        "proc",
        Path::new("/proc"),
        "proc",
        nosuid_nodev_noexec,
        None,
    )?;
    mnt(
        "sysfs",
        Path::new("/sys"),
        "sysfs",
        nosuid_nodev_noexec,
        None,
    )?;
    match mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => return Err(format!("mount -t devtmpfs /dev: {e}")),
    }
    attach_console();
    mkdir_p(Path::new("/dev/pts"), 0o755)?;
    mkdir_p(Path::new("/dev/shm"), 0o1777)?;
    mnt(
        "devpts",
        Path::new("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // Let openpty use this devpts instance.
    let _ = std::fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    mnt(
        "shm",
        Path::new("/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mnt(
        "run",
        Path::new("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mnt(
        "tmp",
        Path::new("/tmp"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    // configfs carries the TSM attestation interface; absent on kernels without it.
    if Path::new("/sys/kernel/config").is_dir() {
        let _ = mnt(
            "configfs",
            Path::new("/sys/kernel/config"),
            "configfs",
            none,
            None,
        );
    }
    Ok(())
}

/// Points fds 0-2 at /dev/console (the kernel leaves them closed when the initramfs had no
/// /dev/console node).
fn attach_console() {
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; `f` stays open for the call.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

pub fn read_config(path: &Path) -> Result<BootConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading the boot config {}: {e}", path.display()))?;
    BootConfig::from_json(&text)
        .map_err(|e| format!("boot config {} is invalid: {e}", path.display()))
}

fn load_modules(modules: &[String]) -> Result<(), String> {
    for m in modules {
        let f = std::fs::File::open(m).map_err(|e| format!("kernel module {m}: {e}"))?;
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(format!("loading kernel module {m}: {e}")),
        }
    }
    Ok(())
}

/// virtio-fs devices can appear a moment after their driver loads: retry briefly.
fn mount_virtiofs(tag: &str, target: &Path, flags: MsFlags) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..50 {
        match mount(Some(tag), target, Some("virtiofs"), flags, None::<&str>) {
            Ok(()) => return Ok(()),
            Err(e @ (nix::errno::Errno::ENOENT | nix::errno::Errno::ENODEV)) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("mount -t virtiofs {tag} {}: {e}", target.display())),
        }
    }
    Err(format!(
        "mount -t virtiofs {tag} {}: {last} (is a virtio-fs device with tag {tag:?} attached?)",
        target.display()
    ))
}

/// Everything PID 1 does before serving. Errors say which step failed.
pub fn boot() -> Result<Booted, String> {
    early_mounts()?;
    let config = read_config(Path::new(BOOT_CONFIG_PATH))?;
    load_modules(&config.modules)?;
    let mut mounts = Vec::new();

    // Box root: read-only image lower + writable upper, merged by overlayfs.
    let lower = Path::new(LOWER);
    mkdir_p(lower, 0o755)?;
    mount_virtiofs(&config.rootfs_tag, lower, MsFlags::MS_RDONLY)?;
    mounts.push(lower.to_path_buf());
    let base = Path::new(UPPER_BASE);
    mkdir_p(base, 0o755)?;
    match &config.upper_tag {
        Some(tag) => mount_virtiofs(tag, base, MsFlags::empty())?,
        None => mnt("rw", base, "tmpfs", MsFlags::empty(), Some("mode=0755"))?,
    }
    mounts.push(base.to_path_buf());
    let (upper, work) = (base.join("upper"), base.join("work"));
    mkdir_p(&upper, 0o755)?;
    mkdir_p(&work, 0o755)?;
    let root = PathBuf::from(BOX_ROOT);
    mkdir_p(&root, 0o755)?;
    let opts = format!(
        "lowerdir={LOWER},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    if let Err(first) = mnt("overlay", &root, "overlay", MsFlags::empty(), Some(&opts)) {
        // A virtio-fs upper usually cannot store trusted.* xattrs (virtiofsd filters them);
        // overlayfs can keep its metadata in user.* xattrs instead (needs virtiofsd --xattr).
        if config.upper_tag.is_none() {
            return Err(first);
        }
        let with_user = format!("{opts},userxattr");
        mnt("overlay", &root, "overlay", MsFlags::empty(), Some(&with_user)).map_err(|e| {
            format!("{first}; retried with userxattr: {e} (is virtiofsd for the upper run with --xattr?)")
        })?;
    }
    mounts.push(root.clone());

    // What workloads expect inside their root.
    let inside = |p: &str| -> Result<PathBuf, String> {
        let t = resolve_in_root(&root, p, true).map_err(|e| format!("{p} in the box: {e}"))?;
        mkdir_p(&t, 0o755)?;
        Ok(t)
    };
    let t = inside("/proc")?;
    mnt(
        "proc",
        &t,
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )?;
    mounts.push(t);
    let t = inside("/sys")?;
    mnt(
        "sysfs",
        &t,
        "sysfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        None,
    )?;
    mounts.push(t);
    let t = inside("/dev")?;
    // The same /dev (and so the same devpts) as the agent: ptys it opens are valid in the box.
    mnt("/dev", &t, "none", MsFlags::MS_BIND | MsFlags::MS_REC, None)?;
    mounts.push(t);
    let t = inside("/tmp")?;
    mnt(
        "tmp",
        &t,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mounts.push(t);

    for v in &config.volumes {
        if !v.guest_path.starts_with('/') {
            return Err(format!(
                "volume {}: guest_path {:?} must be absolute",
                v.tag, v.guest_path
            ));
        }
        let t = inside(&v.guest_path)?;
        let flags = if v.read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        mount_virtiofs(&v.tag, &t, flags)?;
        mounts.push(t);
    }

    if !config.hostname.is_empty() {
        nix::unistd::sethostname(&config.hostname)
            .map_err(|e| format!("sethostname {:?}: {e}", config.hostname))?;
        write_box_file(&root, "/etc/hostname", &format!("{}\n", config.hostname))?;
        write_box_file(
            &root,
            "/etc/hosts",
            &format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{}\n",
                config.hostname
            ),
        )?;
    }
    if let Err(e) = crate::net::loopback_up() {
        console(&format!("warning: {e}"));
    }
    if let Some(net) = &config.network {
        crate::net::configure(net)?;
        let resolv: String = net
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        write_box_file(&root, "/etc/resolv.conf", &resolv)?;
    }
    Ok(Booted {
        root,
        config,
        mounts,
    })
}

/// Replaces a file of the box (a symlink there is replaced, not followed).
fn write_box_file(root: &Path, path: &str, text: &str) -> Result<(), String> {
    let host = resolve_in_root(root, path, false).map_err(|e| format!("{path} in the box: {e}"))?;
    if let Some(parent) = host.parent() {
        mkdir_p(parent, 0o755)?;
    }
    let _ = std::fs::remove_file(&host);
    std::fs::write(&host, text).map_err(|e| format!("writing {path} in the box: {e}"))
}

/// Stops every process, flushes and unmounts the filesystems, and powers off.
pub fn shutdown_system(mounts: &[PathBuf]) -> ! {
    console("shutting down");
    // SAFETY: kill(-1, ...) signals every process but PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    for _ in 0..30 {
        if !has_other_processes() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(50));
    nix::unistd::sync();
    for m in mounts.iter().rev() {
        if let Err(e) = umount2(m.as_path(), MntFlags::MNT_DETACH) {
            console(&format!("unmounting {}: {e}", m.display()));
        }
    }
    power_off()
}

/// Whether any process other than PID 1 and kernel threads is left.
fn has_other_processes() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.filter_map(Result::ok).any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            return false;
        };
        // Kernel threads have an empty cmdline.
        pid != 1 && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
    })
}
