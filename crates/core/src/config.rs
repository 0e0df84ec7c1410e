//! `BoxConfig`: everything that describes one box before it runs, and its validation.
//! Validation errors name the field, what was expected and what was given, so a CLI or API user
//! can fix their input without reading code.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Smallest guest memory that boots the stock kernel plus the agent.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest guest memory accepted (1 TiB): beyond that it is surely a unit mistake.
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;
/// Largest vCPU count of a QEMU microvm guest.
pub const MAX_VCPUS: u32 = 255;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoxConfig {
    /// Image reference, e.g. `alpine`, `127.0.0.1:5000/demo/busybox:latest`.
    pub image: String,
    /// Replaces the image's ENTRYPOINT when set.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when set.
    pub cmd: Option<Vec<String>>,
    /// Extra environment, `KEY=VALUE`; overrides the image's Env for the same key.
    pub env: Vec<String>,
    /// Absolute working directory in the guest; the image's WorkingDir when unset.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`; the image's User when unset.
    pub user: Option<String>,
    pub hostname: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub volumes: Vec<VolumeMount>,
    pub ports: Vec<PortMapping>,
    pub network: NetworkMode,
    /// Guest kernel to boot instead of the one found on the host.
    pub kernel: Option<PathBuf>,
    pub backend: BackendChoice,
    pub accel: AccelChoice,
    /// How long boot may take until the agent answers its health check.
    pub boot_timeout: Duration,
    /// Keep the box's writable layer on the host (survives a restart) instead of guest tmpfs.
    pub persistent: bool,
}

impl Default for BoxConfig {
    fn default() -> Self {
        BoxConfig {
            image: String::new(),
            entrypoint: None,
            cmd: None,
            env: Vec::new(),
            working_dir: None,
            user: None,
            hostname: None,
            vcpus: 1,
            memory_mib: 256,
            volumes: Vec::new(),
            ports: Vec::new(),
            network: NetworkMode::User,
            kernel: None,
            backend: BackendChoice::Auto,
            accel: AccelChoice::Auto,
            // Generous: a TCG boot takes 2-3 s, but ten at once on two cores take much longer.
            boot_timeout: Duration::from_secs(120),
            persistent: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMount {
    /// Absolute host path of the directory to share.
    pub host: PathBuf,
    /// Absolute path in the guest where it is mounted.
    pub guest: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Host address to bind; Docker binds all addresses by default, microbox binds loopback
    /// unless told otherwise (a box should not be exposed to the network by accident).
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
    pub protocol: Protocol,
}

impl PortMapping {
    pub fn tcp(host_port: u16, guest_port: u16) -> Self {
        PortMapping {
            host_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            host_port,
            guest_port,
            protocol: Protocol::Tcp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// A virtio-net NIC backed by QEMU's built-in user-mode stack (slirp).
    #[default]
    User,
    /// A virtio-net NIC backed by passt, a user-mode stack in its own sandboxed process.
    Passt,
    /// No NIC: loopback only.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// libkrun when it is installed and KVM is usable, QEMU otherwise.
    #[default]
    Auto,
    Qemu,
    Krun,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// KVM when the CPU has hardware virtualization and /dev/kvm opens, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// A field of [`BoxConfig`] that does not hold what it must.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid box config: field `{field}`: expected {expected}, got {got}")]
pub struct ConfigError {
    /// The field, with an index for list items (`volumes[1].guest`).
    pub field: String,
    pub expected: String,
    pub got: String,
}

fn err(
    field: impl Into<String>,
    expected: impl Into<String>,
    got: impl std::fmt::Debug,
) -> ConfigError {
    ConfigError {
        field: field.into(),
        expected: expected.into(),
        got: format!("{got:?}"),
    }
}

impl BoxConfig {
    /// A default box for `image`.
    pub fn new(image: impl Into<String>) -> Self {
        BoxConfig {
            image: image.into(),
            ..Default::default()
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.image.trim().is_empty() {
            return Err(err(
                "image",
                "an image reference such as \"alpine\"",
                &self.image,
            ));
        }
        if self
            .image
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(err(
                "image",
                "an image reference without spaces",
                &self.image,
            ));
        }
        if let Some(ep) = &self.entrypoint {
            if ep.first().is_some_and(|s| s.is_empty()) {
                return Err(err("entrypoint[0]", "a non-empty program name", ep));
            }
        }
        if let Some(cmd) = &self.cmd {
            if cmd.first().is_some_and(|s| s.is_empty()) && self.entrypoint.is_none() {
                return Err(err("cmd[0]", "a non-empty program name", cmd));
            }
        }
        for (i, kv) in self.env.iter().enumerate() {
            match kv.split_once('=') {
                Some((k, _)) if !k.is_empty() && !k.contains('\0') => {}
                _ => {
                    return Err(err(
                        format!("env[{i}]"),
                        "KEY=VALUE with a non-empty KEY",
                        kv,
                    ))
                }
            }
            if kv.contains('\0') {
                return Err(err(format!("env[{i}]"), "no NUL bytes", kv));
            }
        }
        if let Some(wd) = &self.working_dir {
            if !wd.starts_with('/') {
                return Err(err("working_dir", "an absolute path such as \"/app\"", wd));
            }
        }
        if let Some(user) = &self.user {
            if user.is_empty() || user.split(':').count() > 2 || user.split(':').any(str::is_empty)
            {
                return Err(err(
                    "user",
                    "\"name\", \"uid\", \"name:group\" or \"uid:gid\"",
                    user,
                ));
            }
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                && !h.starts_with('-');
            if !ok {
                return Err(err("hostname", "1-63 letters, digits, '-' or '.'", h));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(err("vcpus", format!("1 to {MAX_VCPUS}"), self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(err(
                "memory_mib",
                format!("{MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB"),
                self.memory_mib,
            ));
        }
        let mut guests = std::collections::HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.host.is_absolute() {
                return Err(err(
                    format!("volumes[{i}].host"),
                    "an absolute host path",
                    &v.host,
                ));
            }
            if !v.guest.is_absolute() {
                return Err(err(
                    format!("volumes[{i}].guest"),
                    "an absolute guest path",
                    &v.guest,
                ));
            }
            if v.guest == std::path::Path::new("/") {
                return Err(err(
                    format!("volumes[{i}].guest"),
                    "a path below / (the image root cannot be replaced)",
                    &v.guest,
                ));
            }
            if v.guest
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(err(
                    format!("volumes[{i}].guest"),
                    "a path without '..'",
                    &v.guest,
                ));
            }
            if !guests.insert(&v.guest) {
                return Err(err(
                    format!("volumes[{i}].guest"),
                    "a guest path not used by another volume",
                    &v.guest,
                ));
            }
        }
        let mut binds = std::collections::HashSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.host_port == 0 {
                return Err(err(
                    format!("ports[{i}].host_port"),
                    "a port from 1 to 65535",
                    p.host_port,
                ));
            }
            if p.guest_port == 0 {
                return Err(err(
                    format!("ports[{i}].guest_port"),
                    "a port from 1 to 65535",
                    p.guest_port,
                ));
            }
            if !binds.insert((p.host_ip, p.host_port, p.protocol)) {
                return Err(err(
                    format!("ports[{i}].host_port"),
                    "a host port not published twice",
                    p.host_port,
                ));
            }
        }
        if self.network == NetworkMode::None && !self.ports.is_empty() {
            return Err(err(
                "ports",
                "no published ports when network is \"none\"",
                self.ports.len(),
            ));
        }
        if let Some(k) = &self.kernel {
            if !k.is_absolute() {
                return Err(err("kernel", "an absolute path to a kernel image", k));
            }
        }
        if self.boot_timeout.is_zero() {
            return Err(err(
                "boot_timeout",
                "a positive duration",
                self.boot_timeout,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> BoxConfig {
        BoxConfig::new("busybox")
    }

    #[test]
    fn default_is_a_small_valid_box() {
        let c = ok();
        assert_eq!((c.vcpus, c.memory_mib), (1, 256));
        assert_eq!(c.network, NetworkMode::User);
        c.validate().unwrap();
        // Without an image, the default alone is not runnable.
        assert_eq!(BoxConfig::default().validate().unwrap_err().field, "image");
    }

    fn field_of(mutate: impl FnOnce(&mut BoxConfig)) -> ConfigError {
        let mut c = ok();
        mutate(&mut c);
        c.validate().expect_err("should be invalid")
    }

    type Mutation = Box<dyn FnOnce(&mut BoxConfig)>;

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, Mutation)> = vec![
            ("image", Box::new(|c| c.image = "has space".into())),
            (
                "entrypoint[0]",
                Box::new(|c| c.entrypoint = Some(vec!["".into()])),
            ),
            ("cmd[0]", Box::new(|c| c.cmd = Some(vec!["".into()]))),
            (
                "env[1]",
                Box::new(|c| c.env = vec!["A=1".into(), "NOEQUALS".into()]),
            ),
            ("env[0]", Box::new(|c| c.env = vec!["=x".into()])),
            (
                "working_dir",
                Box::new(|c| c.working_dir = Some("relative".into())),
            ),
            ("user", Box::new(|c| c.user = Some("a:b:c".into()))),
            ("user", Box::new(|c| c.user = Some(":g".into()))),
            (
                "hostname",
                Box::new(|c| c.hostname = Some("bad_host!".into())),
            ),
            ("vcpus", Box::new(|c| c.vcpus = 0)),
            ("vcpus", Box::new(|c| c.vcpus = 1000)),
            ("memory_mib", Box::new(|c| c.memory_mib = 16)),
            (
                "volumes[0].host",
                Box::new(|c| {
                    c.volumes = vec![VolumeMount {
                        host: "rel".into(),
                        guest: "/data".into(),
                        read_only: false,
                    }]
                }),
            ),
            (
                "volumes[0].guest",
                Box::new(|c| {
                    c.volumes = vec![VolumeMount {
                        host: "/tmp".into(),
                        guest: "/".into(),
                        read_only: false,
                    }]
                }),
            ),
            (
                "volumes[1].guest",
                Box::new(|c| {
                    let v = VolumeMount {
                        host: "/tmp".into(),
                        guest: "/d".into(),
                        read_only: false,
                    };
                    c.volumes = vec![v.clone(), v]
                }),
            ),
            (
                "ports[0].host_port",
                Box::new(|c| c.ports = vec![PortMapping::tcp(0, 80)]),
            ),
            (
                "ports[0].guest_port",
                Box::new(|c| c.ports = vec![PortMapping::tcp(8080, 0)]),
            ),
            (
                "ports[1].host_port",
                Box::new(|c| {
                    c.ports = vec![PortMapping::tcp(8080, 80), PortMapping::tcp(8080, 81)]
                }),
            ),
            (
                "ports",
                Box::new(|c| {
                    c.network = NetworkMode::None;
                    c.ports = vec![PortMapping::tcp(8080, 80)]
                }),
            ),
            ("kernel", Box::new(|c| c.kernel = Some("vmlinuz".into()))),
            (
                "boot_timeout",
                Box::new(|c| c.boot_timeout = Duration::ZERO),
            ),
        ];
        for (field, mutate) in cases {
            let e = field_of(mutate);
            assert_eq!(e.field, field, "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("`{field}`")) && msg.contains("expected"),
                "{msg}"
            );
        }
    }

    #[test]
    fn good_variants_pass() {
        let mut c = ok();
        c.env = vec!["A=".into(), "B=x=y".into()];
        c.working_dir = Some("/srv".into());
        c.user = Some("1000:1000".into());
        c.hostname = Some("web-1".into());
        c.volumes = vec![VolumeMount {
            host: "/tmp".into(),
            guest: "/data".into(),
            read_only: true,
        }];
        c.ports = vec![PortMapping::tcp(8080, 80)];
        c.validate().unwrap();
    }

    #[test]
    fn config_round_trips_through_json_with_defaults() {
        let c: BoxConfig = serde_json::from_str(r#"{"image":"alpine","memory_mib":512}"#).unwrap();
        assert_eq!(c.memory_mib, 512);
        assert_eq!(c.vcpus, 1);
        let back: BoxConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
