//! A minimal QMP (QEMU Machine Protocol) client: JSON lines over the box's QMP Unix socket.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::HypervisorError;

/// One negotiated QMP connection (commands are sent one at a time).
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, HypervisorError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| HypervisorError::Qmp(format!("connect {}: {e}", path.display())))?;
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = q.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(HypervisorError::Qmp(format!(
                "unexpected greeting {greeting}"
            )));
        }
        q.execute("qmp_capabilities", None).await?;
        Ok(q)
    }

    async fn read_message(&mut self) -> Result<Value, HypervisorError> {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .map_err(|_| HypervisorError::Qmp("no answer within 10 s".into()))?
            .map_err(|e| HypervisorError::Qmp(format!("read: {e}")))?;
        if n == 0 {
            return Err(HypervisorError::Qmp("connection closed by QEMU".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| HypervisorError::Qmp(format!("bad JSON from QEMU ({e}): {line}")))
    }

    /// Runs a command and returns its `return` value (asynchronous events are skipped).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, HypervisorError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| HypervisorError::Qmp(format!("write {command}: {e}")))?;
        loop {
            let v = self.read_message().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(HypervisorError::Qmp(format!("{command}: {e}")));
            }
        }
    }

    /// `query-status`: e.g. "running", "paused", "shutdown".
    pub async fn status(&mut self) -> Result<String, HypervisorError> {
        let v = self.execute("query-status", None).await?;
        Ok(v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }
}
