//! The contract between the microbox host runtime and the guest agent.
//!
//! This crate owns three things, all shared by the guest agent (`microbox-agent`) and the host
//! runtime (`microbox-runtime`):
//! - the gRPC protocol (`proto/agent.proto`, generated into [`v1`]), served by the agent on vsock
//!   port [`AGENT_VSOCK_PORT`];
//! - the standard gRPC health protocol, re-exported as [`health`];
//! - the boot configuration ([`BootConfig`]) that the runtime writes into the initramfs at
//!   [`BOOT_CONFIG_PATH`] and the agent reads when it starts as PID 1.

use serde::{Deserialize, Serialize};

/// Generated protocol code (`package microbox.agent.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("microbox.agent.v1");
}

/// The standard `grpc.health.v1` protocol (client, server and messages), from `tonic-health`.
pub mod health {
    pub use tonic_health::pb::health_check_response::ServingStatus;
    pub use tonic_health::pb::health_client::HealthClient;
    pub use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
    pub use tonic_health::server::{health_reporter, HealthReporter};
    pub use tonic_health::ServingStatus as ReporterStatus;
}

/// Full gRPC name of the agent service (what health checks may ask for).
pub const AGENT_SERVICE_NAME: &str = "microbox.agent.v1.Agent";

/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 4088;

/// The host vsock port the agent connects to, once it listens, to say it is ready.
///
/// Host-initiated vsock connections made while the guest driver is still setting the device up
/// can kill vhost-device-vsock 0.3's queue worker (an error from a not-yet-ready vring ends the
/// worker thread, and the device never answers again). So the host waits for this guest-initiated
/// notification before its first `CONNECT`. The agent writes [`READY_LINE`] and closes.
pub const AGENT_READY_VSOCK_PORT: u32 = 4089;

/// What the agent writes on the ready port.
pub const READY_LINE: &[u8] = b"READY\n";

/// Where the runtime places the boot configuration inside the initramfs.
pub const BOOT_CONFIG_PATH: &str = "/etc/microbox/boot.json";

/// What the agent sets up when it boots as PID 1. Serialized as JSON at [`BOOT_CONFIG_PATH`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Hostname of the box.
    pub hostname: String,
    /// Kernel modules to load, in order (paths inside the initramfs, e.g. "/lib/modules/virtio_mmio.ko").
    pub modules: Vec<String>,
    /// virtio-fs tag of the image root filesystem (read-only overlay lower).
    pub rootfs_tag: String,
    /// virtio-fs tag of a per-box writable dir for the overlay upper; None = tmpfs upper.
    pub upper_tag: Option<String>,
    /// Volumes to mount into the box root.
    pub volumes: Vec<BootVolume>,
    /// Network setup; None = no network configuration.
    pub network: Option<BootNetwork>,
    /// vsock port the agent listens on (normally [`AGENT_VSOCK_PORT`]).
    pub vsock_port: u32,
    /// Host vsock port to notify once the agent listens ([`AGENT_READY_VSOCK_PORT`]); None
    /// (older boot configs, host-mode tests) = no notification.
    #[serde(default)]
    pub ready_port: Option<u32>,
}

/// A virtio-fs volume mounted into the box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootVolume {
    /// virtio-fs tag of the shared directory.
    pub tag: String,
    /// Absolute mount point inside the box root (created if missing).
    pub guest_path: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// Static network configuration of one guest interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootNetwork {
    /// Interface name, e.g. "eth0".
    pub interface: String,
    /// Address with prefix length, e.g. "10.0.2.15/24".
    pub address_cidr: String,
    /// Default gateway, e.g. "10.0.2.2" (empty = no default route).
    pub gateway: String,
    /// Name servers written to the box's /etc/resolv.conf.
    pub dns: Vec<String>,
}

impl BootConfig {
    /// Parses the JSON form, with an error that names the field that was wrong.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The JSON form written into the initramfs.
    pub fn to_json(&self) -> String {
        // Serializing plain strings, vectors and options cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_config_round_trips_through_json() {
        let cfg = BootConfig {
            hostname: "box1".into(),
            modules: vec!["/lib/modules/virtio_mmio.ko".into()],
            rootfs_tag: "rootfs".into(),
            upper_tag: None,
            volumes: vec![BootVolume {
                tag: "vol0".into(),
                guest_path: "/data".into(),
                read_only: true,
            }],
            network: Some(BootNetwork {
                interface: "eth0".into(),
                address_cidr: "10.0.2.15/24".into(),
                gateway: "10.0.2.2".into(),
                dns: vec!["10.0.2.3".into()],
            }),
            vsock_port: AGENT_VSOCK_PORT,
            ready_port: Some(AGENT_READY_VSOCK_PORT),
        };
        let back = BootConfig::from_json(&cfg.to_json()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn boot_config_error_names_the_missing_field() {
        let err = BootConfig::from_json(r#"{"hostname":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("modules"), "{err}");
    }
}
