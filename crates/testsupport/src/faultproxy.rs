//! A fault-injecting TCP proxy for robustness tests: it sits between a client and a real server
//! (the test registry) and, on a seeded random share of connections, damages the server's reply
//! stream once at a random byte offset: a reset (RST), a stall, a truncation (clean FIN) or one
//! flipped byte. Requests pass through untouched. Counts what it actually injected.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What to inject and how often.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    /// Seed of the proxy's random choices (print it to replay a run).
    pub seed: u64,
    /// Share of connections that get one fault.
    pub probability: f64,
    /// Faults land at a byte offset below this in the server's reply stream.
    pub max_offset: u64,
    /// How long a stall lasts.
    pub stall: Duration,
}

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Reset,
    Stall,
    Truncate,
    Flip,
}

/// Faults actually injected (a planned fault past the end of a short reply does not count).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    pub connections: u64,
    pub resets: u64,
    pub stalls: u64,
    pub truncations: u64,
    pub flips: u64,
}

impl FaultCounts {
    pub fn total(&self) -> u64 {
        self.resets + self.stalls + self.truncations + self.flips
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    resets: AtomicU64,
    stalls: AtomicU64,
    truncations: AtomicU64,
    flips: AtomicU64,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    /// `127.0.0.1:PORT` to give the client instead of the upstream address.
    pub addr: String,
    counters: Arc<Counters>,
    enabled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Starts proxying a free loopback port to `upstream` (`host:port`).
    pub fn start(upstream: &str, plan: FaultPlan) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let counters = Arc::new(Counters::default());
        let enabled = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(plan.seed)));
        let (c, e, s, up) = (
            counters.clone(),
            enabled.clone(),
            stop.clone(),
            upstream.to_string(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                c.connections.fetch_add(1, Ordering::Relaxed);
                let fault = if e.load(Ordering::SeqCst) {
                    let mut r = rng.lock().unwrap();
                    r.random_bool(plan.probability).then(|| {
                        let kind = match r.random_range(0..4) {
                            0 => Fault::Reset,
                            1 => Fault::Stall,
                            2 => Fault::Truncate,
                            _ => Fault::Flip,
                        };
                        let offset = r.random_range(0..plan.max_offset.max(1));
                        let mask: u8 = r.random_range(1..=255);
                        (kind, offset, mask)
                    })
                } else {
                    None
                };
                let (c, up, stall) = (c.clone(), up.clone(), plan.stall);
                std::thread::spawn(move || serve(client, &up, fault, stall, &c));
            }
        });
        FaultProxy {
            addr,
            counters,
            enabled,
            stop,
        }
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        FaultCounts {
            connections: c.connections.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            stalls: c.stalls.load(Ordering::Relaxed),
            truncations: c.truncations.load(Ordering::Relaxed),
            flips: c.flips.load(Ordering::Relaxed),
        }
    }

    /// Turns injection on or off for new connections.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Makes closing `s` send a RST instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn serve(
    client: TcpStream,
    upstream: &str,
    fault: Option<(Fault, u64, u8)>,
    stall: Duration,
    counters: &Counters,
) {
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Requests: copied as they are.
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    // Replies: copied with at most one fault.
    let (mut s_in, mut c_out) = (server, client);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = fault;
    loop {
        let n = match s_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if let Some((kind, off, mask)) = pending {
            if off < pos + n as u64 {
                let k = (off - pos) as usize;
                pending = None;
                match kind {
                    Fault::Flip => {
                        chunk[k] ^= mask;
                        counters.flips.fetch_add(1, Ordering::Relaxed);
                    }
                    Fault::Stall => {
                        if c_out.write_all(&chunk[..k]).is_err() {
                            break;
                        }
                        counters.stalls.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(stall);
                        if c_out.write_all(&chunk[k..]).is_err() {
                            break;
                        }
                        pos += n as u64;
                        continue;
                    }
                    Fault::Truncate => {
                        let _ = c_out.write_all(&chunk[..k]);
                        counters.truncations.fetch_add(1, Ordering::Relaxed);
                        let _ = c_out.shutdown(Shutdown::Both);
                        let _ = s_in.shutdown(Shutdown::Both);
                        return;
                    }
                    Fault::Reset => {
                        let _ = c_out.write_all(&chunk[..k]);
                        counters.resets.fetch_add(1, Ordering::Relaxed);
                        set_linger_zero(&c_out);
                        // Wake the request copier so that it drops its handle too: the last
                        // close of a socket with a zero linger sends the RST.
                        let _ = c_out.shutdown(Shutdown::Read);
                        let _ = s_in.shutdown(Shutdown::Both);
                        return;
                    }
                }
            }
        }
        if c_out.write_all(chunk).is_err() {
            break;
        }
        pos += n as u64;
    }
    let _ = c_out.shutdown(Shutdown::Write);
}
