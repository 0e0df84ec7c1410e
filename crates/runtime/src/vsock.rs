//! The host side of hybrid vsock (Firecracker's scheme, spoken by vhost-device-vsock): connect to
//! the device's Unix socket, send `CONNECT <port>\n`, read `OK <host port>\n`; the stream is then
//! connected to the guest's vsock port.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Connects to guest `port` through the hybrid vsock socket `uds`.
pub async fn connect_hybrid(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).await?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    // Read byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::with_capacity(16);
    let read = async {
        loop {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("vsock port {port}: connection closed during the handshake (nothing listening yet)"),
                ));
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
            if line.len() > 64 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "overlong vsock handshake reply",
                ));
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "vsock handshake timed out")
        })??;
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!(
                "vsock handshake answered {:?}",
                String::from_utf8_lossy(&line)
            ),
        ));
    }
    Ok(s)
}
