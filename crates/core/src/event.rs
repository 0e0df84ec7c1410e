//! Lifecycle events and their fan-out.
//!
//! [`EventEmitter`] is a cheap-to-clone handle over a bounded broadcast ring. Emitting never
//! blocks and never fails: with no subscribers the event is dropped, and a subscriber that falls
//! more than the ring's capacity behind loses the oldest events and is told how many it lost
//! ([`Delivered::Lagged`]) instead of slowing the runtime down.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{BoxId, BoxState};

/// Default ring size: enough for many boots' worth of events per subscriber.
pub const DEFAULT_CAPACITY: usize = 1024;

/// The phases of a boot, in order; each is reported with its duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootPhase {
    /// Resolving (and pulling if needed) the image.
    Image,
    /// Materialising the shared read-only root filesystem.
    Rootfs,
    /// Finding the kernel and assembling the initramfs.
    BootAssets,
    /// Starting the VMM and its helper processes.
    VmmSpawn,
    /// From VMM start until the guest's agent port accepts a connection.
    KernelBoot,
    /// Until the agent's health check answers SERVING.
    AgentReady,
}

impl BootPhase {
    pub const ALL: [BootPhase; 6] = [
        BootPhase::Image,
        BootPhase::Rootfs,
        BootPhase::BootAssets,
        BootPhase::VmmSpawn,
        BootPhase::KernelBoot,
        BootPhase::AgentReady,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BootPhase::Image => "image",
            BootPhase::Rootfs => "rootfs",
            BootPhase::BootAssets => "boot_assets",
            BootPhase::VmmSpawn => "vmm_spawn",
            BootPhase::KernelBoot => "kernel_boot",
            BootPhase::AgentReady => "agent_ready",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BoxEvent {
    StateChanged {
        from: BoxState,
        to: BoxState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    BootPhase {
        phase: BootPhase,
        duration_ms: u64,
    },
    ExecStarted {
        exec_id: u64,
        argv: Vec<String>,
    },
    ExecFinished {
        exec_id: u64,
        exit_code: Option<i32>,
        signal: Option<i32>,
        duration_ms: u64,
    },
    Compacted {
        rss_before_bytes: u64,
        rss_after_bytes: u64,
    },
    Error {
        message: String,
    },
}

/// One emitted event with its box, emitter-wide sequence number and wall-clock time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub box_id: BoxId,
    #[serde(flatten)]
    pub event: BoxEvent,
}

/// What a subscriber receives next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Event(EventRecord),
    /// The subscriber fell behind and this many older events were dropped for it.
    Lagged(u64),
}

#[derive(Clone)]
pub struct EventEmitter {
    tx: broadcast::Sender<EventRecord>,
    /// The next sequence number. Taken and sent under this lock, so that clones emitting at
    /// once deliver their events in sequence order (held for a non-blocking send only).
    seq: Arc<Mutex<u64>>,
}

impl std::fmt::Debug for EventEmitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventEmitter")
            .field("subscribers", &self.tx.receiver_count())
            .finish()
    }
}

impl Default for EventEmitter {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventEmitter {
    /// An emitter whose subscribers each buffer at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        EventEmitter {
            tx,
            seq: Arc::new(Mutex::new(0)),
        }
    }

    /// Publishes an event; never blocks. Returns the record as sent (also when nobody listens).
    pub fn emit(&self, box_id: &BoxId, event: BoxEvent) -> EventRecord {
        // A panic elsewhere cannot leave the counter inconsistent.
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let record = EventRecord {
            seq: *seq,
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            box_id: box_id.clone(),
            event,
        };
        *seq += 1;
        // An error only means there is no subscriber right now, which is fine.
        let _ = self.tx.send(record.clone());
        record
    }

    /// A new subscriber that sees every event emitted from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            rx: self.tx.subscribe(),
            lost: 0,
        }
    }

    pub fn subscriber_count(&self) -> usize {
        self.tx.receiver_count()
    }
}

pub struct Subscription {
    rx: broadcast::Receiver<EventRecord>,
    lost: u64,
}

impl Subscription {
    /// The next delivery; `None` once every emitter is gone and the buffer is drained.
    pub async fn recv(&mut self) -> Option<Delivered> {
        match self.rx.recv().await {
            Ok(r) => Some(Delivered::Event(r)),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                self.lost += n;
                Some(Delivered::Lagged(n))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Like [`recv`](Self::recv) but without waiting: `None` when nothing is buffered.
    pub fn try_recv(&mut self) -> Option<Delivered> {
        match self.rx.try_recv() {
            Ok(r) => Some(Delivered::Event(r)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                self.lost += n;
                Some(Delivered::Lagged(n))
            }
            Err(_) => None,
        }
    }

    /// Total events this subscriber has lost to lag so far.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: u64) -> BoxEvent {
        BoxEvent::ExecStarted {
            exec_id: i,
            argv: vec!["true".into()],
        }
    }

    #[tokio::test]
    async fn clones_emitting_from_threads_at_once_deliver_in_sequence_order() {
        let em = EventEmitter::new(4096);
        let id = BoxId::random();
        let mut sub = em.subscribe();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (em, id) = (em.clone(), id.clone());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        em.emit(&id, ev(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for want in 0..2000 {
            match sub.recv().await.unwrap() {
                Delivered::Event(r) => assert_eq!(r.seq, want),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn several_subscribers_get_every_event_in_order() {
        let em = EventEmitter::new(16);
        let id = BoxId::random();
        let mut subs: Vec<_> = (0..3).map(|_| em.subscribe()).collect();
        let clone = em.clone();
        for i in 0..10 {
            // Emitting from clones interleaves into one sequence.
            if i % 2 == 0 { &em } else { &clone }.emit(&id, ev(i));
        }
        for s in &mut subs {
            for i in 0..10 {
                match s.recv().await.unwrap() {
                    Delivered::Event(r) => {
                        assert_eq!(r.seq, i);
                        assert_eq!(r.event, ev(i));
                        assert_eq!(r.box_id, id);
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(s.try_recv().is_none());
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_with_a_count_and_never_blocks_the_emitter() {
        let em = EventEmitter::new(4);
        let id = BoxId::random();
        let mut slow = em.subscribe();
        let mut fast = em.subscribe();
        for i in 0..10 {
            em.emit(&id, ev(i));
            // The fast one keeps up.
            assert!(matches!(fast.recv().await, Some(Delivered::Event(r)) if r.seq == i));
        }
        // 10 sent into a ring of 4: the slow one lost the 6 oldest and is told so.
        assert_eq!(slow.recv().await, Some(Delivered::Lagged(6)));
        assert_eq!(slow.lost(), 6);
        for i in 6..10 {
            assert!(matches!(slow.recv().await, Some(Delivered::Event(r)) if r.seq == i));
        }
    }

    #[tokio::test]
    async fn emitting_without_subscribers_is_fine_and_closed_ends_streams() {
        let em = EventEmitter::default();
        let id = BoxId::random();
        let r = em.emit(&id, ev(0));
        assert_eq!(r.seq, 0);
        let mut s = em.subscribe();
        em.emit(&id, ev(1));
        drop(em);
        assert!(matches!(s.recv().await, Some(Delivered::Event(r)) if r.seq == 1));
        assert_eq!(s.recv().await, None);
    }

    #[test]
    fn records_serialize_as_flat_json_lines() {
        let id = BoxId::random();
        let rec = EventEmitter::new(1).emit(
            &id,
            BoxEvent::BootPhase {
                phase: BootPhase::KernelBoot,
                duration_ms: 1234,
            },
        );
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["type"], "boot_phase");
        assert_eq!(json["phase"], "kernel_boot");
        assert_eq!(json["duration_ms"], 1234);
        assert_eq!(json["box_id"], id.as_str());
        let back: EventRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, rec);
    }
}
