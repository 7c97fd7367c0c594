//! Membership: the live workers, each with its outbound stream, and one queue of events
//! (joined, result, left) that the engine consumes.

use crate::shm::SharedTensors;
use dtrain_proto::pb;
use dtrain_proto::pb::coordinator_message::Kind as Out;
use dtrain_proto::pb::worker_message::Kind as In;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

pub type Outbound = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

#[derive(Debug)]
pub enum Event {
    Joined { id: u32, name: String },
    Result { id: u32, result: pb::ShardResult },
    Left { id: u32, reason: String },
}

struct Worker {
    name: String,
    tx: Outbound,
    /// Offered shared memory; used once the worker says it attached.
    shared: Option<Arc<Mutex<Shared>>>,
    attached: bool,
}

/// A worker's shared memory (see `shm`).
pub struct Shared {
    pub tensors: SharedTensors,
    /// The step whose parameters the memory holds.
    pub params_step: Option<u64>,
}

/// What shared memory each worker is offered: parameters and gradient slots per file.
#[derive(Clone, Copy, Debug)]
pub struct Offer {
    pub params: usize,
    pub slots: usize,
}

pub struct Hub {
    job_toml: String,
    log: fn(&str),
    /// Streams still open (a stopped worker's stream closes when it has read Stop).
    open: std::sync::atomic::AtomicUsize,
    workers: Mutex<(u32, BTreeMap<u32, Worker>)>,
    events: mpsc::UnboundedSender<Event>,
    offer: Option<Offer>,
}

impl Hub {
    /// `log` gets a line when a worker joins or leaves; `offer`: shared memory for workers
    /// on this host.
    pub fn new(job_toml: String, offer: Option<Offer>, log: fn(&str)) -> (Arc<Hub>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Hub {
                job_toml,
                log,
                open: Default::default(),
                workers: Mutex::new((0, BTreeMap::new())),
                events,
                offer,
            }),
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, BTreeMap<u32, Worker>)> {
        lock(&self.workers)
    }

    /// Registers a worker that said hello: sends it the job (and shared memory if it is `local`),
    /// then forwards what it sends as events until its stream ends. Returns the stream of
    /// messages to it.
    pub fn accept(
        self: &Arc<Self>,
        name: String,
        inbound: Streaming<pb::WorkerMessage>,
        local: bool,
    ) -> mpsc::Receiver<Result<pb::CoordinatorMessage, Status>> {
        let (tx, rx) = mpsc::channel(8);
        let id = {
            let mut w = self.lock();
            w.0 += 1;
            w.0
        };
        let (mut offered, mut shared) = (None, None);
        if let (Some(offer), Some(dir), true) = (self.offer, SharedTensors::dir(), local) {
            let nonce = crate::shm::nonce();
            let file = format!("dtrain-{}-{id}-{nonce:016x}", std::process::id());
            match SharedTensors::create(&dir, &file, nonce, offer.params, offer.slots) {
                Ok(tensors) => {
                    let path = dir.join(file).to_string_lossy().into_owned();
                    offered = Some(pb::SharedMemory { path, nonce, slots: offer.slots as u32 });
                    shared = Some(Arc::new(Mutex::new(Shared { tensors, params_step: None })));
                }
                Err(e) => (self.log)(&format!("no shared memory for worker {id}: {}: {e}", dir.display())),
            }
        }
        let welcome = pb::CoordinatorMessage {
            kind: Some(Out::Welcome(pb::Welcome {
                job_toml: self.job_toml.clone(),
                worker_id: id,
                shared_memory: offered,
            })),
        };
        // Welcome first, then visible to the engine: its work must never overtake the welcome.
        let _ = tx.try_send(Ok(welcome));
        self.lock().1.insert(id, Worker { name: name.clone(), tx, shared, attached: false });
        (self.log)(&format!("worker {id} ({name}) joined"));
        let _ = self.events.send(Event::Joined { id, name });
        let hub = Arc::clone(self);
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            hub.pump(id, inbound).await;
            hub.open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
        rx
    }

    async fn pump(&self, id: u32, mut inbound: Streaming<pb::WorkerMessage>) {
        let reason = loop {
            match inbound.message().await {
                Ok(Some(pb::WorkerMessage { kind: Some(In::Result(result)) })) => {
                    let _ = self.events.send(Event::Result { id, result });
                }
                Ok(Some(pb::WorkerMessage { kind: Some(In::Attached(_)) })) => {
                    let shared = self.lock().1.get_mut(&id).and_then(|w| {
                        w.attached = true;
                        w.shared.clone()
                    });
                    let Some(shared) = shared else { break "attached to shared memory it was not offered".to_string() };
                    lock(&shared).tensors.unlink(); // both sides have it mapped; nothing is left behind
                }
                Ok(Some(_)) => break "sent an unexpected message".to_string(),
                Ok(None) => break "disconnected".to_string(),
                Err(e) => break format!("stream failed: {}", e.message()),
            }
        };
        if let Some(w) = self.lock().1.remove(&id) {
            (self.log)(&format!("worker {id} ({}) left: {reason}", w.name));
            let _ = self.events.send(Event::Left { id, reason });
        }
    }

    /// A live worker's shared memory, once it attached.
    pub fn shared(&self, id: u32) -> Option<Arc<Mutex<Shared>>> {
        self.lock().1.get(&id).filter(|w| w.attached).and_then(|w| w.shared.clone())
    }

    /// Ids of the live workers, in joining order.
    pub fn alive(&self) -> Vec<u32> {
        self.lock().1.keys().copied().collect()
    }

    pub fn name(&self, id: u32) -> String {
        self.lock().1.get(&id).map_or_else(|| format!("worker {id}"), |w| format!("{} (worker {id})", w.name))
    }

    /// Queues a message to a worker; false if it is gone or not keeping up.
    pub fn send(&self, id: u32, msg: pb::CoordinatorMessage) -> bool {
        let tx = self.lock().1.get(&id).map(|w| w.tx.clone());
        tx.is_some_and(|tx| tx.try_send(Ok(msg)).is_ok())
    }

    /// Drops a worker (hung or faulty): its stream is closed with `status`.
    pub fn drop_worker(&self, id: u32, status: Status) {
        if let Some(w) = self.lock().1.remove(&id) {
            let _ = w.tx.try_send(Err(status));
        }
    }

    /// Tells every worker to stop, and waits (up to `patience`) until they have hung up.
    pub async fn stop_all(&self, reason: &str, patience: std::time::Duration) {
        let workers = std::mem::take(&mut self.lock().1);
        let stop = || pb::CoordinatorMessage { kind: Some(Out::Stop(pb::Stop { reason: reason.into() })) };
        for w in workers.values() {
            let _ = w.tx.try_send(Ok(stop()));
        }
        drop(workers);
        let until = tokio::time::Instant::now() + patience;
        while self.open.load(std::sync::atomic::Ordering::SeqCst) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

/// Locks a mutex whose holder may have panicked (the data is plain buffers).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
