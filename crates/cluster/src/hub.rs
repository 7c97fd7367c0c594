//! Membership: the live workers, each with its outbound stream, and one queue of events
//! (joined, result, left) that the engine consumes.

use crate::ids::{Member, PartyId, WorkerId};
use crate::shm::{self, FileName, SharedFile};
use crate::topology::Candidate;
use dtrain_proto::{
    Chunk, FromWorker, Inbox, Outbox, ShardResult, SharedMemoryOffer, ToWorker, ToWorkerStream, Welcome,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tonic::Status;

#[derive(Debug)]
/// What happens on the workers' streams, in the order it happened. (Joins need no event:
/// waits for workers watch the live count.)
pub enum Event {
    /// A shard's result, and its size on the wire.
    Result {
        /// Who sent it.
        id: WorkerId,
        /// The result, unchecked.
        result: ShardResult,
        /// Its size on the wire.
        size: usize,
    },
    /// A chunk of the chain's running sum, from its last member.
    Chunk {
        /// Who sent it.
        id: WorkerId,
        /// The chunk, unchecked.
        chunk: Chunk,
        /// Its size on the wire.
        size: usize,
    },
    /// A chain member's digests of a step (see `digest`).
    Digest {
        /// Who sent them.
        id: WorkerId,
        /// The step.
        step: u64,
        /// Of the running sum it received.
        received: u64,
        /// Of the one it sent.
        sent: u64,
    },
    /// A chain member could not reach, or did not hear from, a peer.
    Broken {
        /// Who reports it.
        id: WorkerId,
        /// The step.
        step: u64,
        /// The peer's address (empty: its predecessor).
        peer: String,
        /// What happened.
        reason: String,
    },
    /// A worker's stream ended (or it was dropped).
    Left {
        /// Its id.
        id: WorkerId,
    },
}

struct Worker {
    name: String,
    party: PartyId,
    host: Option<std::net::IpAddr>,
    /// Shard results it was sent work for and has not returned: a result beyond them is a
    /// flood, and its stream is closed, so the event queue never holds more than the work
    /// that is out.
    owed: usize,
    /// Chunks of the running sum it owes as a chain's last member (the same bound).
    owed_chunks: usize,
    /// It is a member of the current chain: it may report one broken link.
    chained: bool,
    /// Digests it owes (one per chain step it was put in, at most two).
    owed_digests: usize,
    /// Where peers reach it, if it takes part in chains.
    peer: Option<String>,
    /// The latest step it sent a result of.
    answered: Option<u64>,
    tx: Outbox,
    /// Its gradient slots in shared memory (see `shm`), used once it says it attached; the
    /// descriptor is closed then (its mappings stay).
    slots: Option<Slots>,
    attached: bool,
}

impl Worker {
    /// It is done with `step` (with its results, or a broken link's report).
    fn answer(&mut self, step: u64) {
        self.answered = self.answered.max(Some(step));
    }
}

/// Who is connected, the name and party of everyone who ever joined (for log lines about
/// workers that already left), and the parties refused for now.
#[derive(Default)]
struct Members {
    last_id: u32,
    last_party: u32,
    live: BTreeMap<WorkerId, Worker>,
    names: BTreeMap<WorkerId, (String, PartyId)>,
    parties: BTreeMap<String, PartyId>,
    bans: BTreeMap<PartyId, Ban>,
}

/// Streams one party may hold at once (a reconnect may overlap the stream it replaces).
pub const STREAMS_PER_PARTY: usize = 2;

/// Streams the coordinator holds at once.
pub const MAX_STREAMS: usize = 1024;

/// Departed workers whose names (and parties) are remembered, at most: a peer that joins under
/// ever new names cannot grow the coordinator's memory.
pub const REMEMBERED: usize = 4096;

impl Members {
    /// Forgets the oldest departed workers beyond `REMEMBERED`, and parties nobody refers to
    /// any more (neither a remembered worker nor a ban in force).
    fn forget_the_oldest(&mut self) {
        let departed = self.names.len().saturating_sub(self.live.len());
        if departed <= REMEMBERED {
            return;
        }
        let mut excess = departed - REMEMBERED / 2;
        let live = &self.live;
        self.names.retain(|id, _| {
            let forget = excess > 0 && !live.contains_key(id);
            excess -= usize::from(forget);
            !forget
        });
        let now = Instant::now();
        self.bans.retain(|_, b| b.until > now);
        let (names, bans) = (&self.names, &self.bans);
        let used: std::collections::BTreeSet<PartyId> =
            names.values().map(|&(_, p)| p).chain(bans.keys().copied()).collect();
        self.parties.retain(|_, p| used.contains(p));
    }
}

/// A party's evictions, and until when it is refused.
#[derive(Clone, Copy, Debug)]
struct Ban {
    strikes: u32,
    until: Instant,
}

/// How long a party is refused after its `strikes`-th eviction: a minute, doubling each time,
/// at most a day.
pub fn ban_for(strikes: u32) -> Duration {
    Duration::from_secs(60).saturating_mul(1 << strikes.saturating_sub(1).min(16)).min(Duration::from_secs(86_400))
}

/// The key of the party behind a worker: with mutual TLS the certificate it presented (a
/// fingerprint of it: whatever name it gives, from wherever), else its name and address (a
/// reconnect from another port is the same party).
pub fn party_key(name: &str, remote: Option<std::net::IpAddr>, certificate: Option<&[u8]>) -> String {
    match (certificate, remote) {
        // A key, not a check: the TLS handshake verified the certificate.
        (Some(der), _) => format!("certificate {}", dtrain_fit::checkpoint::fnv1a64(der)),
        (None, Some(ip)) => format!("{name}@{ip}"),
        (None, None) => name.to_string(),
    }
}

/// A worker's gradient slots, and their name until it attached.
type Slots = (Arc<SharedFile>, Option<FileName>);

/// The parameters in shared memory, for every worker on this host.
struct SharedParams {
    file: SharedFile,
    name: FileName,
    nonce: u64,
    /// The step whose parameters the file holds.
    step: Option<u64>,
}

/// What shared memory workers on this host are offered: the parameters, and gradient slots.
#[derive(Clone, Copy, Debug)]
pub struct Offer {
    /// Values of the parameters (and of each gradient slot).
    pub params: usize,
    /// Gradient slots per worker: one per shard.
    pub slots: usize,
}

/// The live workers and their streams; one per coordinator.
pub struct Hub {
    job_toml: String,
    /// Streams still open (a stopped worker's stream closes when it has read Stop).
    open: watch::Sender<usize>,
    workers: Mutex<Members>,
    /// How many workers are live, updated with every change to `workers`: waits for workers
    /// watch it instead of polling.
    alive: watch::Sender<usize>,
    events: mpsc::UnboundedSender<Event>,
    offer: Option<Offer>,
    /// Made when the first local worker joins; gone once the workers are stopped.
    params: Mutex<Option<SharedParams>>,
    stopped: AtomicBool,
}

impl Hub {
    /// `offer`: shared memory for workers on this host.
    pub fn new(job_toml: String, offer: Option<Offer>) -> (Arc<Hub>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Hub {
                job_toml,
                open: watch::Sender::new(0),
                workers: Mutex::new(Members::default()),
                alive: watch::Sender::new(0),
                events,
                offer,
                params: Mutex::new(None),
                stopped: Default::default(),
            }),
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        lock(&self.workers)
    }

    /// Registers a worker that said hello: sends it the job (and shared memory if it is `local`),
    /// then forwards what it sends as events until its stream ends. Returns the stream of
    /// messages to it, or `PermissionDenied` while its party (`party_key`) is refused.
    pub fn accept(
        self: &Arc<Self>,
        name: String,
        party: String,
        host: Option<std::net::IpAddr>,
        peer: Option<String>,
        inbound: Inbox,
    ) -> Result<ToWorkerStream, Status> {
        // Only a worker that dialed over loopback can be on this host (shared memory).
        let local = host.is_some_and(|ip| ip.is_loopback());
        let (tx, rx) = Outbox::channel(8);
        let party_name = party;
        let (id, party) = {
            let mut m = self.lock();
            let party = match m.parties.get(&party_name) {
                Some(&p) => p,
                None => {
                    m.last_party += 1;
                    let p = PartyId(m.last_party);
                    m.parties.insert(party_name.clone(), p);
                    p
                }
            };
            if let Some(ban) = m.bans.get(&party).filter(|b| b.until > Instant::now()) {
                let left = ban.until.saturating_duration_since(Instant::now()).as_secs() + 1;
                return Err(Status::permission_denied(format!(
                    "{name} was evicted from this job; refused for another {left} s"
                )));
            }
            let streams = m.live.values().filter(|w| w.party == party).count();
            if streams >= STREAMS_PER_PARTY || m.live.len() >= MAX_STREAMS {
                return Err(Status::resource_exhausted(format!(
                    "{name}: {streams} stream(s) of this worker and {} in all are open already",
                    m.live.len()
                )));
            }
            m.last_id += 1;
            let id = WorkerId(m.last_id);
            m.names.insert(id, (name.clone(), party));
            m.forget_the_oldest();
            (id, party)
        };
        let (offered, slots) = if local { self.offer_shared_memory(id) } else { (None, None) };
        let welcome = Welcome { job_toml: self.job_toml.clone(), worker_id: id.0, shared_memory: offered };
        // Welcome first, then visible to the engine: its work must never overtake the welcome.
        let _ = tx.try_send(ToWorker::Welcome(welcome));
        self.members(|w| {
            let worker = Worker {
                name: name.clone(),
                party,
                host,
                owed: 0,
                owed_chunks: 0,
                chained: false,
                owed_digests: 0,
                answered: None,
                peer,
                tx,
                slots,
                attached: false,
            };
            w.insert(id, worker);
        });
        match party_name.strip_prefix("certificate ") {
            Some(fingerprint) => tracing::info!("{id} ({name}) joined as certificate {fingerprint}"),
            None => tracing::info!("{id} ({name}) joined"),
        }
        let hub = Arc::clone(self);
        self.open.send_modify(|n| *n += 1);
        tokio::spawn(async move {
            hub.pump(id, inbound).await;
            hub.open.send_modify(|n| *n -= 1);
        });
        Ok(rx)
    }

    async fn pump(&self, id: WorkerId, mut inbound: Inbox) {
        let reason = loop {
            match inbound.next().await {
                Ok(Some((FromWorker::Result(result), size))) => match self.owed_by(id, result.step) {
                    // Dropped already: nobody waits for it, and it is not kept.
                    None => continue,
                    Some(false) => break "sent more results than it was given work".to_string(),
                    Some(true) => {
                        let _ = self.events.send(Event::Result { id, result, size });
                    }
                },
                Ok(Some((FromWorker::Chunk(chunk), size))) => match self.owes_chunk(id) {
                    None => continue,
                    Some(false) => break "sent a chunk it was not asked for".to_string(),
                    Some(true) => {
                        let _ = self.events.send(Event::Chunk { id, chunk, size });
                    }
                },
                Ok(Some((FromWorker::Digest { step, received, sent }, _))) => {
                    if self.owes_digest(id) {
                        let _ = self.events.send(Event::Digest { id, step, received, sent });
                    }
                }
                Ok(Some((FromWorker::Broken { step, peer, reason }, _))) => {
                    // One report per chain it was put in; more are ignored. It is done with
                    // that step: an answer as much as its results would be.
                    if self.take_chained(id) {
                        self.answer(id, step);
                        let _ = self.events.send(Event::Broken { id, step, peer, reason });
                    }
                }
                Ok(Some((FromWorker::Attached, _))) => {
                    if !self.attach(id) {
                        break "attached to shared memory it was not offered".to_string();
                    }
                }
                Ok(Some(_)) => break "sent an unexpected message".to_string(),
                Ok(None) => break "disconnected".to_string(),
                Err(e) => break format!("stream failed: {}", e.message()),
            }
        };
        if let Some(w) = self.members(|w| w.remove(&id)) {
            tracing::info!("{id} ({}) left: {reason}", w.name);
            let _ = self.events.send(Event::Left { id });
        }
    }

    /// Whether a result of `step` from `id` was owed (and counts it); `None` if it is not live.
    fn owed_by(&self, id: WorkerId, step: u64) -> Option<bool> {
        let mut m = self.lock();
        let w = m.live.get_mut(&id)?;
        let owed = w.owed.checked_sub(1).map(|left| w.owed = left).is_some();
        if owed {
            w.answer(step);
        }
        Some(owed)
    }

    /// `id` is done with `step`.
    fn answer(&self, id: WorkerId, step: u64) {
        if let Some(w) = self.lock().live.get_mut(&id) {
            w.answer(step);
        }
    }

    /// The latest step `id` sent a result of, if any (and it is live).
    pub fn answered(&self, id: WorkerId) -> Option<u64> {
        self.lock().live.get(&id)?.answered
    }

    /// Whether a chunk from `id` was owed (and counts it); `None` if it is not live.
    fn owes_chunk(&self, id: WorkerId) -> Option<bool> {
        let mut m = self.lock();
        let w = m.live.get_mut(&id)?;
        Some(w.owed_chunks.checked_sub(1).map(|left| w.owed_chunks = left).is_some())
    }

    /// Whether `id` owes a digest (and counts it); one it does not owe is ignored.
    fn owes_digest(&self, id: WorkerId) -> bool {
        let mut m = self.lock();
        let Some(w) = m.live.get_mut(&id) else { return false };
        w.owed_digests.checked_sub(1).map(|left| w.owed_digests = left).is_some()
    }

    /// Whether `id` is in a chain (and now no longer may report a broken link).
    fn take_chained(&self, id: WorkerId) -> bool {
        self.lock().live.get_mut(&id).is_some_and(|w| std::mem::take(&mut w.chained))
    }

    /// Puts `id` in this step's chain: it may report a broken link and send its digests, and
    /// as the last member (`chunks` > 0) send that many chunks of the sum. Chunks of an abandoned step still
    /// count, at most two steps' worth, so that one arriving late is never taken for a flood.
    pub fn chain(&self, id: WorkerId, chunks: usize) {
        if let Some(w) = self.lock().live.get_mut(&id) {
            w.chained = true;
            w.owed_chunks = (w.owed_chunks + chunks).min(2 * chunks);
            w.owed_digests = (w.owed_digests + 1).min(2);
        }
    }

    /// The live workers as a chain plan sees them.
    pub fn candidates(&self) -> Vec<Candidate> {
        let m = self.lock();
        let c = |(&id, w): (&WorkerId, &Worker)| Candidate { id, peer: w.peer.clone(), shared_memory: w.attached };
        m.live.iter().map(c).collect()
    }

    /// Queues a message to a worker, waiting up to `patience` for room in its queue: its size
    /// on the wire, or `None` if the worker is gone or its queue stayed full.
    pub async fn send_within(&self, id: WorkerId, msg: ToWorker, patience: Duration) -> Option<usize> {
        let tx = self.lock().live.get(&id)?.tx.clone();
        tx.send_within(msg, patience).await
    }

    /// Shared memory for a worker on this host: the parameters' file (made for the first such
    /// worker) and its own gradient slots; none (and a log line) if they cannot be made.
    fn offer_shared_memory(&self, id: WorkerId) -> (Option<SharedMemoryOffer>, Option<Slots>) {
        let Some(offer) = self.offer.filter(|_| shm::available()) else { return (None, None) };
        // Each offer is memory made at once (a slot per shard): at most two workers per shard
        // get it (more could not all compute anyway); the rest use the stream.
        let sharing = self.lock().live.values().filter(|w| w.slots.is_some()).count();
        if sharing >= 2 * offer.slots.max(1) {
            tracing::info!("{id}: {sharing} workers share memory already; its tensors go over the stream");
            return (None, None);
        }
        match self.make_shared_memory(offer, id) {
            Ok((offered, slots)) => (Some(offered), Some(slots)),
            Err(e) => {
                tracing::warn!("no shared memory for {id}: {e}");
                (None, None)
            }
        }
    }

    fn make_shared_memory(&self, offer: Offer, id: WorkerId) -> std::io::Result<(SharedMemoryOffer, Slots)> {
        let mut params = lock(&self.params);
        let params = match &mut *params {
            Some(p) => p,
            None if self.stopped.load(Ordering::SeqCst) => return Err(std::io::Error::other("training is over")),
            None => {
                let nonce = shm::nonce();
                let (file, name) = SharedFile::create("params", nonce, offer.params, 1)?;
                params.insert(SharedParams { file, name, nonce, step: None })
            }
        };
        let nonce = shm::nonce();
        let (slots, name) = SharedFile::create(&format!("slots-w{}", id.0), nonce, offer.params, offer.slots)?;
        let offered = SharedMemoryOffer {
            path: name.path(),
            nonce,
            slots: offer.slots as u32,
            params_path: params.name.path(),
            params_nonce: params.nonce,
        };
        Ok((offered, (Arc::new(slots), Some(name))))
    }

    /// Puts step `step`'s parameters in shared memory (once a step), checking that they are
    /// finite as they are copied: workers use them unchecked. `None` if there is none, else
    /// whether they are finite (if not, they are not there).
    pub fn share_params(&self, step: u64, values: &[f32]) -> Option<bool> {
        let mut params = lock(&self.params);
        let p = params.as_mut()?;
        if p.step != Some(step) {
            let region = p.file.region_mut(0)?;
            p.step = dtrain_nn::simd::copy_checked(region, values).then_some(step);
        }
        Some(p.step == Some(step))
    }

    /// The worker says it mapped its shared memory; false if it was offered none.
    fn attach(&self, id: WorkerId) -> bool {
        let mut members = self.lock();
        let Some(w) = members.live.get_mut(&id).filter(|w| w.slots.is_some()) else { return false };
        w.attached = true;
        w.slots.iter_mut().for_each(|(_, name)| *name = None); // both sides have them mapped
        true
    }

    /// A live worker's gradient slots in shared memory, once it attached.
    pub fn slots(&self, id: WorkerId) -> Option<Arc<SharedFile>> {
        self.lock().live.get(&id).filter(|w| w.attached).and_then(|w| w.slots.as_ref()).map(|(f, _)| Arc::clone(f))
    }

    /// The live workers, in joining order.
    pub fn alive(&self) -> Vec<Member> {
        self.lock().live.iter().map(|(&id, w)| Member { id, party: w.party, host: w.host }).collect()
    }

    /// `name (worker N)`, also after the worker left.
    pub fn name(&self, id: WorkerId) -> String {
        self.lock().names.get(&id).map_or_else(|| id.to_string(), |(name, _)| format!("{name} ({id})"))
    }

    /// The party behind a worker, also after it left.
    pub fn party(&self, id: WorkerId) -> Option<PartyId> {
        self.lock().names.get(&id).map(|&(_, party)| party)
    }

    /// Refuses `party` for a back-off that doubles with each eviction, and drops its live
    /// workers; returns how long it is refused.
    pub fn evict(&self, party: PartyId, status: &Status) -> Duration {
        let mut m = self.lock();
        let strikes = m.bans.get(&party).map_or(0, |b| b.strikes) + 1;
        let refused = ban_for(strikes);
        m.bans.insert(party, Ban { strikes, until: Instant::now() + refused });
        let gone: Vec<WorkerId> = m.live.iter().filter(|(_, w)| w.party == party).map(|(&id, _)| id).collect();
        for id in gone {
            if let Some(w) = m.live.remove(&id) {
                w.tx.close_with(status.clone());
            }
        }
        self.alive.send_replace(m.live.len());
        refused
    }

    /// The parameters in shared memory are no longer those of any step (training went back).
    pub fn forget_params(&self) {
        if let Some(p) = lock(&self.params).as_mut() {
            p.step = None;
        }
    }

    /// Queues a message to a worker: its size on the wire, or `None` if the worker is gone or
    /// not keeping up.
    pub fn send(&self, id: WorkerId, msg: ToWorker) -> Option<usize> {
        let shards = match &msg {
            ToWorker::Work(w) => w.shards.len(),
            _ => 0,
        };
        // Owed before it is queued: the answer may come back before this returns.
        let tx = {
            let mut m = self.lock();
            let w = m.live.get_mut(&id)?;
            w.owed += shards;
            w.tx.clone()
        };
        let sent = tx.try_send(msg);
        if sent.is_none() {
            if let Some(w) = self.lock().live.get_mut(&id) {
                w.owed = w.owed.saturating_sub(shards);
            }
        }
        sent
    }

    /// Drops a worker (hung or faulty): its stream is closed with `status`.
    pub fn drop_worker(&self, id: WorkerId, status: Status) {
        if let Some(w) = self.members(|w| w.remove(&id)) {
            w.tx.close_with(status);
        }
    }

    /// Tells every worker to stop, and waits (up to `patience`) until they have hung up.
    pub async fn stop_all(&self, reason: &str, patience: Duration) {
        self.stopped.store(true, Ordering::SeqCst);
        *lock(&self.params) = None; // its descriptor is closed; workers keep their mappings
        let workers = self.members(std::mem::take);
        for w in workers.values() {
            let _ = w.tx.try_send(ToWorker::Stop { reason: reason.into() });
        }
        drop(workers);
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(patience, open.wait_for(|&n| n == 0)).await;
    }

    /// Waits until at least `n` workers are live; `Err` with how many there are after `patience`.
    pub async fn wait_for_workers(&self, n: usize, patience: Duration) -> Result<(), usize> {
        let mut alive = self.alive.subscribe();
        let reached = matches!(tokio::time::timeout(patience, alive.wait_for(|&live| live >= n)).await, Ok(Ok(_)));
        if reached {
            Ok(())
        } else {
            Err(*alive.borrow())
        }
    }

    /// Returns once any of `ids` is not live (it left, or was dropped or evicted).
    pub async fn any_gone(&self, ids: &[WorkerId]) {
        let mut alive = self.alive.subscribe();
        while ids.iter().all(|id| self.lock().live.contains_key(id)) {
            // Every change of the live set is published (the count may stay the same).
            if alive.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Changes the set of live workers and publishes how many there are.
    fn members<T>(&self, change: impl FnOnce(&mut BTreeMap<WorkerId, Worker>) -> T) -> T {
        let mut members = self.lock();
        let out = change(&mut members.live);
        self.alive.send_replace(members.live.len());
        out
    }
}

/// Locks a mutex whose holder may have panicked (the data is plain buffers).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Longest worker name kept (in characters); longer ones are cut.
pub const MAX_NAME: usize = 64;

/// A worker's name as logs show it: at most `MAX_NAME` characters, control characters escaped
/// (a name cannot start a new log line or move the cursor), never empty.
pub fn display_name(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars().take(MAX_NAME) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str("(unnamed)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cut_and_escaped() {
        assert_eq!(display_name("w-1"), "w-1");
        assert_eq!(display_name("evil\nworker 2 joined\x1b[2J"), "evil\\nworker 2 joined\\u{1b}[2J");
        assert_eq!(display_name(&"x".repeat(1000)).len(), MAX_NAME);
        assert_eq!(display_name(""), "(unnamed)");
    }

    #[test]
    fn departed_workers_and_their_parties_are_forgotten_beyond_a_bound() {
        let mut m = Members::default();
        let n = REMEMBERED as u32 + 10;
        for i in 1..=n {
            m.names.insert(WorkerId(i), (format!("w{i}"), PartyId(i)));
            m.parties.insert(format!("w{i}@10.0.0.1"), PartyId(i));
        }
        m.bans.insert(PartyId(1), Ban { strikes: 1, until: Instant::now() + Duration::from_secs(60) });
        m.forget_the_oldest();
        assert_eq!(m.names.len(), REMEMBERED / 2);
        assert!(m.names.contains_key(&WorkerId(n)), "the newest are kept");
        assert!(m.parties.values().any(|&p| p == PartyId(1)), "a party refused for now is kept");
        assert_eq!(m.parties.len(), REMEMBERED / 2 + 1);
    }

    #[test]
    fn evictions_double_the_time_a_party_is_refused() {
        assert_eq!(ban_for(1), Duration::from_secs(60));
        assert_eq!(ban_for(2), Duration::from_secs(120));
        assert_eq!(ban_for(3), Duration::from_secs(240));
        assert_eq!(ban_for(40), Duration::from_secs(86_400));
        assert_eq!(party_key("w", Some([10, 0, 0, 1].into()), None), "w@10.0.0.1");
        let cert = party_key("any-name", Some([10, 0, 0, 2].into()), Some(b"der"));
        assert_eq!(cert, party_key("other-name", Some([10, 0, 0, 3].into()), Some(b"der")), "the certificate decides");
        assert_ne!(cert, party_key("any-name", None, Some(b"der2")));
    }
    /// A worker as `accept` makes one, without a stream behind it.
    fn worker(name: &str) -> Worker {
        let (tx, _rx) = Outbox::channel(8);
        Worker {
            name: name.into(),
            party: PartyId(1),
            host: None,
            owed: 1,
            owed_chunks: 0,
            chained: false,
            owed_digests: 0,
            answered: None,
            peer: None,
            tx,
            slots: None,
            attached: false,
        }
    }

    #[tokio::test]
    async fn any_gone_returns_once_one_of_the_workers_is_not_live_and_results_are_counted() {
        let (hub, _events) = Hub::new(String::new(), None);
        let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
        hub.members(|w| [a, b, c].into_iter().for_each(|id| drop(w.insert(id, worker("w")))));
        let watch = Arc::clone(&hub);
        let gone = tokio::spawn(async move { watch.any_gone(&[a, b]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        hub.drop_worker(c, Status::cancelled("not watched"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!gone.is_finished(), "c is not watched; a and b are live");
        hub.drop_worker(b, Status::cancelled("gone"));
        tokio::time::timeout(Duration::from_secs(2), gone).await.expect("returns once b is gone").unwrap();
        // Already gone: at once.
        tokio::time::timeout(Duration::from_millis(100), hub.any_gone(&[b])).await.expect("b is gone already");
        // The latest step a worker answered, counted only for owed results.
        assert_eq!(hub.answered(a), None);
        assert_eq!(hub.owed_by(a, 7), Some(true));
        assert_eq!(hub.owed_by(a, 9), Some(false), "a result it was not given work for");
        assert_eq!(hub.answered(a), Some(7));
        assert_eq!(hub.owed_by(b, 1), None, "not live");
    }
}
