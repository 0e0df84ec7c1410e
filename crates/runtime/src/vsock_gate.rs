//! The host-side I/O gate of a VM's vsock device: while the VM is paused, no host process of
//! ours reads, writes, connects or closes on the device's hybrid-vsock socket.
//!
//! Why: vhost-device-vsock (0.3) treats any host-side socket event that arrives while QEMU has
//! stopped its virtqueues (QMP `stop` sends `GET_VRING_BASE`) as a fatal error of its worker
//! thread, and the guest's vsock is dead from then on. Holding every host-side operation behind
//! this gate, and letting the device go idle before the VM is stopped, keeps it alive; the held
//! operations simply go on after `cont`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Shared by every host-side stream of one VM's vsock device. Cheap to clone. A new gate is open.
#[derive(Clone, Default)]
pub struct IoGate(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// True while closed. I/O runs under the read lock, so [`IoGate::close`] returns only once
    /// no operation is in flight.
    closed: RwLock<bool>,
    waiters: Mutex<Vec<Waker>>,
    /// Streams dropped while the gate was closed: closing them would signal the device.
    parked: Mutex<Vec<UnixStream>>,
}

impl std::fmt::Debug for IoGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoGate")
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl PartialEq for IoGate {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for IoGate {}

impl IoGate {
    /// Holds all further I/O; returns when none is in progress.
    pub fn close(&self) {
        *self.0.closed.write().unwrap_or_else(|p| p.into_inner()) = true;
    }

    /// Lets held I/O go on, and closes the streams dropped meanwhile.
    pub fn open(&self) {
        let mut closed = self.0.closed.write().unwrap_or_else(|p| p.into_inner());
        *closed = false;
        // Under the write lock, so a `close` cannot come between and see these closes.
        lock(&self.0.parked).clear();
        drop(closed);
        std::mem::take(&mut *lock(&self.0.waiters))
            .into_iter()
            .for_each(Waker::wake);
    }

    pub fn is_closed(&self) -> bool {
        *self.read()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, bool> {
        self.0.closed.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `io` now if the gate is open (and `close` waits for it), else waits for `open`.
    pub(crate) fn poll_io<T>(
        &self,
        cx: &mut Context<'_>,
        io: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let closed = self.read();
        if *closed {
            // Registered under the read lock: `open` cannot slip in between and miss it.
            let mut w = lock(&self.0.waiters);
            if !w.iter().any(|x| x.will_wake(cx.waker())) {
                w.push(cx.waker().clone());
            }
            return Poll::Pending;
        }
        io(cx)
    }

    /// Connects to `path` through the gate (the connect itself is a device event).
    pub async fn connect(&self, path: &std::path::Path) -> io::Result<GatedStream> {
        let mut connecting = std::pin::pin!(UnixStream::connect(path));
        let stream =
            std::future::poll_fn(|cx| self.poll_io(cx, |cx| connecting.as_mut().poll(cx))).await?;
        Ok(GatedStream {
            inner: Some(stream),
            gate: self.clone(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A stream to the vsock device whose every operation, drop included, passes the gate.
#[derive(Debug)]
pub struct GatedStream {
    inner: Option<UnixStream>,
    gate: IoGate,
}

impl GatedStream {
    fn io(&mut self) -> (Pin<&mut UnixStream>, &IoGate) {
        let s = self.inner.as_mut().expect("taken only on drop");
        (Pin::new(s), &self.gate)
    }
}

impl Drop for GatedStream {
    fn drop(&mut self) {
        let Some(s) = self.inner.take() else { return };
        let closed = self.gate.read();
        if *closed {
            lock(&self.gate.0.parked).push(s);
        } else {
            drop(s);
        }
    }
}

impl AsyncRead for GatedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (s, gate) = self.io();
        gate.poll_io(cx, |cx| s.poll_read(cx, buf))
    }
}

impl AsyncWrite for GatedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let (s, gate) = self.io();
        gate.poll_io(cx, |cx| s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (s, gate) = self.io();
        gate.poll_io(cx, |cx| s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (s, gate) = self.io();
        gate.poll_io(cx, |cx| s.poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (s, gate) = self.io();
        gate.poll_io(cx, |cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(gate: &IoGate) -> (GatedStream, UnixStream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        let (g, peer) = tokio::join!(gate.connect(&path), l.accept());
        (g.unwrap(), peer.unwrap().0, dir)
    }

    #[tokio::test]
    async fn closed_gate_holds_writes_reads_and_closes_until_opened() {
        let gate = IoGate::default();
        let (mut g, mut peer, _dir) = pair(&gate).await;
        g.write_all(b"a").await.unwrap();

        gate.close();
        let writer = tokio::spawn(async move {
            g.write_all(b"b").await.unwrap();
            let mut r = [0u8; 1];
            g.read_exact(&mut r).await.unwrap();
            r[0]
        });
        peer.write_all(b"z").await.unwrap();
        let mut got = [0u8; 2];
        let early =
            tokio::time::timeout(Duration::from_millis(200), peer.read_exact(&mut got)).await;
        assert!(early.is_err(), "a write passed the closed gate");
        assert!(!writer.is_finished());

        gate.open();
        peer.read_exact(&mut got[1..]).await.unwrap();
        assert_eq!(&got, b"ab");
        assert_eq!(writer.await.unwrap(), b'z');
    }

    #[tokio::test]
    async fn a_stream_dropped_while_closed_closes_only_when_opened() {
        let gate = IoGate::default();
        let (g, mut peer, _dir) = pair(&gate).await;
        gate.close();
        drop(g);
        let mut b = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(200), peer.read(&mut b)).await;
        assert!(
            early.is_err(),
            "the peer saw the close while the gate was closed"
        );
        gate.open();
        assert_eq!(peer.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn connecting_waits_for_an_open_gate() {
        let gate = IoGate::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = tokio::net::UnixListener::bind(&path).unwrap();
        gate.close();
        let g2 = gate.clone();
        let p2 = path.clone();
        let c = tokio::spawn(async move { g2.connect(&p2).await.map(drop) });
        let early = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(early.is_err(), "connected through a closed gate");
        gate.open();
        l.accept().await.unwrap();
        c.await.unwrap().unwrap();
    }
}
