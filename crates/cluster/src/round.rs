//! One step's bookkeeping as a pure state machine: which shards are pending, out (with whom,
//! since when), in, or in doubt. Results, departures, deadlines and the reduction's verdict go
//! in; what to do comes out as `Action`s. No sockets, no clock, no tokio: the engine moves
//! messages and hands in the time, so every decision here is tested with synthetic events.

use crate::assign::{assign, assign_weighted};
use crate::ids::{Member, PartyId, ShardIndex, WorkerId};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Faulty results a worker may send before it is dropped.
pub const MAX_FAULTS: u32 = 3;

/// Why a result is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// Malformed: wrong sizes or counts.
    #[error(transparent)]
    Wire(#[from] dtrain_proto::WireError),
    /// It says its gradient is in shared memory, but it has none.
    #[error("a gradient in shared memory it does not have")]
    NoSharedMemory,
    /// It names a shard beyond its slots.
    #[error("a shared-memory slot out of range")]
    SlotOutOfRange,
    /// Its gradient did not travel the way its work said (the chain's sum, or the message).
    #[error("a gradient that did not travel the way its work said (chain or star)")]
    WrongPath,
    /// Its loss or activity sums are NaN or infinite.
    #[error("loss sums are not finite")]
    SumsNotFinite,
}

/// Why a worker's shards are computed again by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Its stream ended (it crashed, was killed or disconnected).
    Left,
    /// It had not answered when its deadline passed; it is dropped.
    MissedDeadline,
    /// Its outbound queue was full; it is dropped.
    NotKeepingUp,
    /// Its result was refused (wrong size, bad sums, unreadable).
    BadResult,
    /// The referee's recomputation of one of its shards differs from its result: it lied (or
    /// its machine is broken). It is evicted; none of its results of this step is used.
    Lied,
    /// It sent `MAX_FAULTS` wrong results; it is dropped.
    TooManyFaults,
}

/// What the step asks of the engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send these shards (in order) to this worker.
    Send {
        /// To whom.
        worker: WorkerId,
        /// Which shards, in shard order.
        shards: Vec<ShardIndex>,
    },
    /// No worker is alive: wait for one to join, then dispatch again.
    AwaitWorkers,
    /// Close this worker's stream; it is gone for the rest of the run.
    Drop {
        /// Who.
        worker: WorkerId,
        /// Why.
        cause: Cause,
    },
    /// This worker sent a wrong result for `shard`: count it against the worker.
    Fault {
        /// Who sent it.
        worker: WorkerId,
        /// For which shard.
        shard: ShardIndex,
        /// What was wrong.
        why: Refusal,
    },
    /// This worker's result for `shard` differs from the referee's: evict the party behind it.
    Lied {
        /// Who sent it.
        worker: WorkerId,
        /// The first shard it was caught on.
        shard: ShardIndex,
    },
    /// `from` made no progress for the learned time: copies of these shards of it go to idle
    /// workers (the `Send`s that follow); the first result of each wins.
    Speculate {
        /// The straggler.
        from: WorkerId,
        /// Its shards that get a copy.
        shards: Vec<ShardIndex>,
    },
    /// These shards, taken from `from`, will be computed again.
    Recompute {
        /// The worker they were taken from.
        from: WorkerId,
        /// The shards.
        shards: Vec<ShardIndex>,
        /// Why.
        cause: Cause,
    },
}

/// Where the step stands; tells the engine what to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Some shards lack a worker: call `dispatch`.
    Dispatch,
    /// Shards are out: wait for an event, or call `deadline_passed` at `deadline`.
    Wait {
        /// When the first worker with shards out is late.
        deadline: Instant,
    },
    /// Every result is in: compare the copies, referee what needs it, sum, and call `reduced`.
    Reduce,
    /// The step's gradient is complete.
    Done,
}

/// One step's shards from dispatch to a complete, checked sum. A shard wants one result, or
/// two from different parties when it is checked; when no other party is alive, the
/// coordinator computes the check itself (`check_here`).
#[derive(Debug)]
pub struct Round {
    step: u64,
    timeout: Duration,
    /// Results wanted from workers per shard: 0 for an empty shard, 2 when checked.
    want: Vec<u8>,
    /// Whether the shard's check was decided (at its first dispatch).
    decided: Vec<bool>,
    /// The referee computes the shard's check: no other party was alive to.
    check_here: Vec<bool>,
    /// The referee's value stands for the shard.
    refereed: Vec<bool>,
    out: BTreeSet<(ShardIndex, WorkerId)>,
    /// Who sent each shard's accepted results, in arrival order.
    got: Vec<Vec<WorkerId>>,
    parties: BTreeMap<WorkerId, PartyId>,
    hosts: BTreeMap<WorkerId, std::net::IpAddr>,
    /// When each worker was last sent work this step; its deadline is `timeout` after that.
    sent_at: BTreeMap<WorkerId, Instant>,
    done: bool,
    /// Speculation: a worker with no progress (work sent, or a result) for this long has copies
    /// of its shards given to idle workers; `None`: off (nothing learned yet).
    speculate_after: Option<Duration>,
    /// Each worker's last progress this step.
    progress: BTreeMap<WorkerId, Instant>,
    /// Shards that got a copy.
    speculated: BTreeSet<ShardIndex>,
    /// Workers that left or were dropped this step.
    gone: BTreeSet<WorkerId>,
    /// Relative speeds for the first groups (missing: 1).
    speeds: BTreeMap<WorkerId, f64>,
    /// The time each result took since its worker's previous progress, for the learning.
    intervals: Vec<(WorkerId, Duration)>,
}

impl Round {
    /// A step over shards of the given sizes (rows); empty shards count as in from the start.
    pub fn new(step: u64, shard_rows: impl IntoIterator<Item = usize>, timeout: Duration) -> Round {
        let want: Vec<u8> = shard_rows.into_iter().map(|rows| u8::from(rows > 0)).collect();
        let n = want.len();
        Round {
            step,
            timeout,
            want,
            decided: vec![false; n],
            check_here: vec![false; n],
            refereed: vec![false; n],
            out: BTreeSet::new(),
            got: vec![vec![]; n],
            parties: BTreeMap::new(),
            hosts: BTreeMap::new(),
            sent_at: BTreeMap::new(),
            done: false,
            speculate_after: None,
            progress: BTreeMap::new(),
            speculated: BTreeSet::new(),
            gone: BTreeSet::new(),
            speeds: BTreeMap::new(),
            intervals: vec![],
        }
    }

    /// With what recent steps taught: copies of a straggler's shards after `speculate_after`
    /// without progress, and first groups sized by `speeds`.
    pub fn paced(mut self, speculate_after: Option<Duration>, speeds: BTreeMap<WorkerId, f64>) -> Round {
        self.speculate_after = speculate_after;
        self.speeds = speeds;
        self
    }

    /// Each result's time since its worker's previous progress this step (work sent, or its
    /// previous result), by worker.
    pub fn intervals(&self) -> &[(WorkerId, Duration)] {
        &self.intervals
    }

    /// The step this round computes.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// What to do next.
    pub fn phase(&self) -> Phase {
        if self.done {
            Phase::Done
        } else if (0..self.want.len()).any(|k| self.missing(ShardIndex(k)) > 0) {
            Phase::Dispatch
        } else if let Some(deadline) = self.deadline() {
            Phase::Wait { deadline }
        } else {
            Phase::Reduce
        }
    }

    /// Copies of shard `k` that no worker has yet.
    fn missing(&self, k: ShardIndex) -> usize {
        if self.refereed[k.0] {
            return 0;
        }
        let out = self.out.range((k, WorkerId(0))..=(k, WorkerId(u32::MAX))).count();
        usize::from(self.want[k.0]).saturating_sub(self.got[k.0].len() + out)
    }

    /// Workers holding or computing shard `k`.
    fn holders(&self, k: ShardIndex) -> impl Iterator<Item = WorkerId> + '_ {
        let out = self.out.range((k, WorkerId(0))..=(k, WorkerId(u32::MAX))).map(|&(_, w)| w);
        self.got[k.0].iter().copied().chain(out)
    }

    /// `worker` may compute `k`: no party already has it.
    fn eligible(&self, k: ShardIndex, worker: WorkerId) -> bool {
        let party = self.parties.get(&worker);
        self.holders(k).all(|h| h != worker && self.parties.get(&h) != party)
    }

    /// `worker` is on a host that none of the holders of `k` is known to be on.
    fn other_host(&self, k: ShardIndex, worker: WorkerId) -> bool {
        let Some(host) = self.hosts.get(&worker) else { return false };
        self.holders(k).all(|h| self.hosts.get(&h).is_some_and(|x| x != host))
    }

    /// The earliest deadline of a worker with shards out, or time to speculate.
    fn deadline(&self) -> Option<Instant> {
        let busy: BTreeSet<WorkerId> = self.out.iter().map(|&(_, w)| w).collect();
        let late = busy.iter().filter_map(|w| self.sent_at.get(w)).min().map(|&t| t + self.timeout)?;
        Some(self.speculation_due().map_or(late, |due| due.min(late)))
    }

    /// Workers known alive with nothing out.
    fn idle(&self) -> Vec<WorkerId> {
        let busy: BTreeSet<WorkerId> = self.out.iter().map(|&(_, w)| w).collect();
        self.parties.keys().copied().filter(|w| !busy.contains(w) && !self.gone.contains(w)).collect()
    }

    /// Outstanding shards that may get a copy (not copied yet, an idle worker may take them),
    /// with when: their worker's last progress plus the learned time.
    fn speculable(&self) -> Vec<(ShardIndex, Instant)> {
        let Some(after) = self.speculate_after else { return vec![] };
        let idle = self.idle();
        self.out
            .iter()
            .filter(|&&(k, _)| !self.speculated.contains(&k) && idle.iter().any(|&i| self.eligible(k, i)))
            .filter_map(|&(k, w)| Some((k, *self.progress.get(&w)? + after)))
            .collect()
    }

    fn speculation_due(&self) -> Option<Instant> {
        self.speculable().into_iter().map(|(_, due)| due).min()
    }

    /// Copies of the shards of workers that made no progress for the learned time, to idle
    /// workers of other parties, in contiguous groups; each shard gets at most one.
    fn speculate(&mut self, now: Instant) -> Vec<Action> {
        let mut late: Vec<ShardIndex> =
            self.speculable().into_iter().filter(|&(_, due)| due <= now).map(|(k, _)| k).collect();
        late.sort_unstable();
        late.dedup();
        if late.is_empty() {
            return vec![];
        }
        let idle = self.idle();
        let (plan, _) = assign(&late, &idle, |k, w| self.eligible(k, w));
        let copied: BTreeSet<ShardIndex> = plan.iter().flat_map(|(_, ks)| ks.iter().copied()).collect();
        let mut from: BTreeMap<WorkerId, Vec<ShardIndex>> = BTreeMap::new();
        for &(k, w) in self.out.iter().filter(|(k, _)| copied.contains(k)) {
            from.entry(w).or_default().push(k);
        }
        let mut actions: Vec<Action> =
            from.into_iter().map(|(from, shards)| Action::Speculate { from, shards }).collect();
        for (w, ks) in plan {
            for &k in &ks {
                self.out.insert((k, w));
                self.speculated.insert(k);
            }
            self.sent_at.insert(w, now);
            self.progress.insert(w, now);
            actions.push(Action::Send { worker: w, shards: ks });
        }
        actions
    }

    /// Hands the shards that lack a worker to `alive` ones: first copies in contiguous groups
    /// in joining order, then the checks `wants_check` asks for (decided once per shard, at its
    /// first dispatch), each to a worker of another party, or to the referee if none is alive.
    pub fn dispatch(
        &mut self,
        alive: &[Member],
        now: Instant,
        wants_check: &mut dyn FnMut(ShardIndex, WorkerId) -> bool,
    ) -> Vec<Action> {
        let lacking = |r: &Round| (0..r.want.len()).map(ShardIndex).filter(|&k| r.missing(k) > 0).collect::<Vec<_>>();
        let firsts: Vec<ShardIndex> = lacking(self).into_iter().filter(|&k| self.holders(k).next().is_none()).collect();
        if firsts.is_empty() && lacking(self).is_empty() {
            return vec![];
        }
        if alive.is_empty() {
            return vec![Action::AwaitWorkers];
        }
        self.parties.extend(alive.iter().map(|m| (m.id, m.party)));
        self.hosts.extend(alive.iter().filter_map(|m| Some((m.id, m.host?))));
        let ids: Vec<WorkerId> = alive.iter().map(|m| m.id).collect();
        let mut work: BTreeMap<WorkerId, BTreeSet<ShardIndex>> = BTreeMap::new();
        let speeds: Vec<f64> = ids.iter().map(|w| self.speeds.get(w).copied().unwrap_or(1.0)).collect();
        let (plan, _) = assign_weighted(&firsts, &ids, &speeds, |k, w| self.eligible(k, w));
        for (w, ks) in plan {
            for k in ks {
                self.out.insert((k, w));
                work.entry(w).or_default().insert(k);
                if !std::mem::replace(&mut self.decided[k.0], true) && wants_check(k, w) {
                    self.want[k.0] = 2;
                }
            }
        }
        // Checks: from another host if there is one, else from another party.
        let (plan, elsewhere) = assign(&lacking(self), &ids, |k, w| self.eligible(k, w) && self.other_host(k, w));
        let (more, nobody) = assign(&elsewhere, &ids, |k, w| self.eligible(k, w));
        for (w, ks) in plan.into_iter().chain(more) {
            for k in ks {
                self.out.insert((k, w));
                work.entry(w).or_default().insert(k);
            }
        }
        for k in nobody {
            self.want[k.0] -= 1;
            self.check_here[k.0] = true;
        }
        let mut actions = Vec::with_capacity(work.len());
        for id in ids {
            if let Some(shards) = work.remove(&id) {
                self.sent_at.insert(id, now);
                self.progress.insert(id, now);
                actions.push(Action::Send { worker: id, shards: shards.into_iter().collect() });
            }
        }
        actions
    }

    /// When `worker`'s work was last sent this step (for its round-trip time).
    pub fn sent_at(&self, worker: WorkerId) -> Option<Instant> {
        self.sent_at.get(&worker).copied()
    }

    /// The engine could not queue `worker`'s work: it is dropped and its shards go elsewhere.
    pub fn send_failed(&mut self, worker: WorkerId) -> Vec<Action> {
        self.take_from(worker, Cause::NotKeepingUp, true)
    }

    /// Whether a result from `worker` for shard `shard` of step `step` is one this round waits
    /// for (a late reply from a worker the shard was taken from is not).
    pub fn expects(&self, worker: WorkerId, step: u64, shard: ShardIndex) -> bool {
        step == self.step && self.out.contains(&(shard, worker))
    }

    /// An expected result arrived at `now` and was checked (`Err` says what is wrong with it).
    /// Once a shard has the results it wants, copies still out are no longer waited for.
    pub fn result(
        &mut self,
        worker: WorkerId,
        shard: ShardIndex,
        checked: Result<(), Refusal>,
        now: Instant,
    ) -> Vec<Action> {
        if !self.out.remove(&(shard, worker)) {
            return vec![];
        }
        if let Some(last) = self.progress.insert(worker, now) {
            self.intervals.push((worker, now.saturating_duration_since(last)));
        }
        match checked {
            Ok(()) => {
                self.got[shard.0].push(worker);
                if self.got[shard.0].len() >= usize::from(self.want[shard.0]) {
                    self.out.retain(|&(k, _)| k != shard);
                }
                vec![]
            }
            Err(why) => vec![
                Action::Fault { worker, shard, why },
                Action::Recompute { from: worker, shards: vec![shard], cause: Cause::BadResult },
            ],
        }
    }

    /// `worker`'s stream ended: its outstanding shards go to others.
    pub fn left(&mut self, worker: WorkerId) -> Vec<Action> {
        self.take_from(worker, Cause::Left, false)
    }

    /// Drops every worker whose deadline passed by `now` and moves its shards; then gives
    /// copies of stragglers' shards to idle workers.
    pub fn deadline_passed(&mut self, now: Instant) -> Vec<Action> {
        let late: BTreeSet<WorkerId> = self
            .out
            .iter()
            .map(|&(_, w)| w)
            .filter(|w| self.sent_at.get(w).is_some_and(|&t| t + self.timeout <= now))
            .collect();
        let mut actions: Vec<Action> =
            late.into_iter().flat_map(|w| self.take_from(w, Cause::MissedDeadline, true)).collect();
        actions.extend(self.speculate(now));
        actions
    }

    /// The shards `worker` holds that nobody else is computing: taken from it, they must be
    /// computed again (a speculative copy elsewhere still counts).
    fn take_from(&mut self, worker: WorkerId, cause: Cause, drop: bool) -> Vec<Action> {
        self.gone.insert(worker);
        let mine: Vec<ShardIndex> = self.out.iter().filter(|&&(_, w)| w == worker).map(|&(k, _)| k).collect();
        self.out.retain(|&(_, w)| w != worker);
        let shards: Vec<ShardIndex> = mine.into_iter().filter(|&k| self.missing(k) > 0).collect();
        let mut actions = vec![];
        if !shards.is_empty() {
            actions.push(Action::Recompute { from: worker, shards, cause });
        }
        if drop {
            actions.push(Action::Drop { worker, cause });
        }
        actions
    }

    /// The shards of the step (empty ones included).
    pub fn shard_count(&self) -> usize {
        self.want.len()
    }

    /// Who sent shard `k`'s accepted results, in arrival order.
    pub fn results(&self, k: ShardIndex) -> &[WorkerId] {
        &self.got[k.0]
    }

    /// Whether the referee computes shard `k`'s check (no other party was alive to).
    pub fn check_here(&self, k: ShardIndex) -> bool {
        self.check_here[k.0]
    }

    /// Whether the referee's value stands for shard `k`.
    pub fn refereed(&self, k: ShardIndex) -> bool {
        self.refereed[k.0]
    }

    /// The sum is made. `refereed` names the shards the coordinator recomputed (copies that
    /// disagreed, checks no other party could make, results that were not finite), each with
    /// the workers whose result differs from its own. Those workers lied: each is evicted and
    /// none of its results of this step is used (a shard it alone computed is computed again);
    /// the step is done when nobody lied.
    pub fn reduced(&mut self, refereed: &BTreeMap<ShardIndex, Vec<WorkerId>>) -> Vec<Action> {
        let mut liars: BTreeMap<WorkerId, ShardIndex> = BTreeMap::new();
        for (&k, differ) in refereed {
            self.refereed[k.0] = true;
            self.check_here[k.0] = false;
            for &w in differ {
                liars.entry(w).or_insert(k);
            }
        }
        if liars.is_empty() {
            self.done = true;
            return vec![];
        }
        let mut actions = vec![];
        for (&liar, &shard) in &liars {
            actions.push(Action::Lied { worker: liar, shard });
            // Nothing is out when the round reduces: the liar's results are all in `got`.
            let mut redo: Vec<ShardIndex> = vec![];
            for k in (0..self.got.len()).map(ShardIndex) {
                let got = &mut self.got[k.0];
                if got.contains(&liar) {
                    got.retain(|&w| w != liar);
                    // What another party sent stands (it was checked against this one, and it
                    // will be checked again later); a shard the liar alone had is computed again.
                    self.want[k.0] = self.want[k.0].min(got.len().max(1) as u8);
                    if got.is_empty() && !self.refereed[k.0] {
                        redo.push(k);
                    }
                }
            }
            if !redo.is_empty() {
                actions.push(Action::Recompute { from: liar, shards: redo, cause: Cause::Lied });
            }
            actions.push(Action::Drop { worker: liar, cause: Cause::Lied });
        }
        actions
    }
}

/// Faulty results and missed deadlines per party, across steps and reconnects.
#[derive(Debug, Default)]
pub struct FaultLedger {
    counts: BTreeMap<PartyId, u32>,
}

impl FaultLedger {
    /// Counts a fault of `party`; `Some(n)` when it has reached `MAX_FAULTS` and must go.
    pub fn record(&mut self, party: PartyId) -> Option<u32> {
        let n = self.counts.entry(party).or_default();
        *n += 1;
        (*n >= MAX_FAULTS).then_some(*n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn w(id: u32) -> WorkerId {
        WorkerId(id)
    }

    fn k(i: usize) -> ShardIndex {
        ShardIndex(i)
    }

    fn ks(is: &[usize]) -> Vec<ShardIndex> {
        is.iter().map(|&i| ShardIndex(i)).collect()
    }

    /// Workers of their own party each.
    fn members(ids: &[u32]) -> Vec<Member> {
        ids.iter().map(|&i| Member { id: WorkerId(i), party: PartyId(i), host: None }).collect()
    }

    fn send(worker: u32, shards: &[usize]) -> Action {
        Action::Send { worker: w(worker), shards: ks(shards) }
    }

    fn recompute(from: u32, shards: &[usize], cause: Cause) -> Action {
        Action::Recompute { from: w(from), shards: ks(shards), cause }
    }

    fn no_checks() -> impl FnMut(ShardIndex, WorkerId) -> bool {
        |_, _| false
    }

    fn dispatch(r: &mut Round, ids: &[u32], now: Instant) -> Vec<Action> {
        r.dispatch(&members(ids), now, &mut no_checks())
    }

    /// A round of four one-row shards, dispatched to workers 1 and 2 at `t0`.
    fn dispatched(t0: Instant) -> Round {
        let mut r = Round::new(7, [1, 1, 1, 1], TIMEOUT);
        assert_eq!(r.phase(), Phase::Dispatch);
        assert_eq!(dispatch(&mut r, &[1, 2], t0), vec![send(1, &[0, 1]), send(2, &[2, 3])]);
        r
    }

    fn all_in(r: &mut Round, results: &[(u32, usize)]) {
        for &(worker, shard) in results {
            assert_eq!(r.result(w(worker), k(shard), Ok(()), Instant::now()), vec![]);
        }
    }

    #[test]
    fn results_in_any_order_complete_the_step_once_all_are_in() {
        let t0 = Instant::now();
        let mut r = dispatched(t0);
        assert_eq!(r.phase(), Phase::Wait { deadline: t0 + TIMEOUT });
        all_in(&mut r, &[(2, 3), (1, 0), (2, 2)]);
        assert!(matches!(r.phase(), Phase::Wait { .. }));
        all_in(&mut r, &[(1, 1)]);
        assert_eq!(r.phase(), Phase::Reduce);
        assert_eq!(r.reduced(&BTreeMap::new()), vec![]);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn empty_shards_are_never_sent() {
        let mut r = Round::new(1, [2, 0, 1, 0], TIMEOUT);
        assert_eq!(dispatch(&mut r, &[1, 2], Instant::now()), vec![send(1, &[0]), send(2, &[2])]);
        let none = Round::new(1, [0, 0], TIMEOUT);
        assert_eq!(none.phase(), Phase::Reduce, "nothing to compute");
    }

    #[test]
    fn with_no_worker_alive_it_asks_to_wait_and_keeps_the_shards() {
        let mut r = Round::new(1, [1, 1], TIMEOUT);
        assert_eq!(dispatch(&mut r, &[], Instant::now()), vec![Action::AwaitWorkers]);
        assert_eq!(r.phase(), Phase::Dispatch);
        assert_eq!(dispatch(&mut r, &[5], Instant::now()), vec![send(5, &[0, 1])]);
    }

    #[test]
    fn a_late_or_foreign_result_is_ignored() {
        let mut r = dispatched(Instant::now());
        assert!(!r.expects(w(2), 7, k(0)), "shard 0 is worker 1's");
        assert!(!r.expects(w(1), 6, k(0)), "an earlier step's result");
        assert!(r.expects(w(1), 7, k(0)));
        assert_eq!(r.result(w(2), k(0), Ok(()), Instant::now()), vec![]);
        assert!(r.expects(w(1), 7, k(0)), "still waiting for worker 1");
    }

    #[test]
    fn a_departed_workers_outstanding_shards_go_to_others_in_the_same_step() {
        let t0 = Instant::now();
        let mut r = dispatched(t0);
        all_in(&mut r, &[(1, 0)]);
        assert_eq!(r.left(w(1)), vec![recompute(1, &[1], Cause::Left)]);
        assert_eq!(r.phase(), Phase::Dispatch);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(dispatch(&mut r, &[2], t1), vec![send(2, &[1])]);
        assert_eq!(r.left(w(1)), vec![], "nothing more to take");
        all_in(&mut r, &[(2, 1), (2, 2), (2, 3)]);
        assert_eq!(r.phase(), Phase::Reduce);
    }

    #[test]
    fn only_workers_past_their_own_deadline_are_dropped() {
        let t0 = Instant::now();
        let mut r = dispatched(t0);
        all_in(&mut r, &[(1, 0)]);
        assert_eq!(r.left(w(1)), vec![recompute(1, &[1], Cause::Left)]);
        // Worker 2 got shard 1 ten seconds later, so its deadline moved with it.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(dispatch(&mut r, &[2], t1), vec![send(2, &[1])]);
        assert_eq!(r.phase(), Phase::Wait { deadline: t1 + TIMEOUT });
        assert_eq!(r.deadline_passed(t0 + TIMEOUT), vec![], "worker 2 still has time");
        let late = r.deadline_passed(t1 + TIMEOUT);
        assert_eq!(
            late,
            vec![
                recompute(2, &[1, 2, 3], Cause::MissedDeadline),
                Action::Drop { worker: w(2), cause: Cause::MissedDeadline }
            ]
        );
        assert_eq!(dispatch(&mut r, &[3], t1 + TIMEOUT), vec![send(3, &[1, 2, 3])]);
    }

    #[test]
    fn a_failed_send_drops_the_worker_and_moves_its_shards() {
        let mut r = dispatched(Instant::now());
        assert_eq!(
            r.send_failed(w(2)),
            vec![recompute(2, &[2, 3], Cause::NotKeepingUp), Action::Drop { worker: w(2), cause: Cause::NotKeepingUp }]
        );
        assert_eq!(r.phase(), Phase::Dispatch);
    }

    #[test]
    fn a_refused_result_is_a_fault_and_the_shard_is_computed_again() {
        let mut r = dispatched(Instant::now());
        let why = Refusal::Wire(dtrain_proto::WireError::Length { what: "gradient", got: 3, want: 4 });
        assert_eq!(
            r.result(w(2), k(3), Err(why.clone()), Instant::now()),
            vec![Action::Fault { worker: w(2), shard: k(3), why }, recompute(2, &[3], Cause::BadResult)]
        );
        assert_eq!(r.phase(), Phase::Dispatch);
    }

    #[test]
    fn a_checked_shard_goes_to_a_second_party_and_both_results_are_awaited() {
        let mut r = Round::new(3, [1, 1, 1, 1], TIMEOUT);
        let mut check_shard_1 = |s: ShardIndex, _| s == k(1);
        let now = Instant::now();
        let sends = r.dispatch(&members(&[1, 2]), now, &mut check_shard_1);
        assert_eq!(sends, vec![send(1, &[0, 1]), send(2, &[1, 2, 3])]);
        all_in(&mut r, &[(1, 0), (1, 1), (2, 2), (2, 3)]);
        assert!(matches!(r.phase(), Phase::Wait { .. }), "the check is still out");
        all_in(&mut r, &[(2, 1)]);
        assert_eq!(r.phase(), Phase::Reduce);
        assert_eq!(r.results(k(1)), &[w(1), w(2)]);
        assert_eq!(r.reduced(&BTreeMap::new()), vec![]);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_check_never_goes_to_the_same_party_and_with_none_other_the_referee_makes_it() {
        // Workers 1 and 2 are the same party (one identity, two streams).
        let same =
            [Member { id: w(1), party: PartyId(9), host: None }, Member { id: w(2), party: PartyId(9), host: None }];
        let mut r = Round::new(3, [1, 1], TIMEOUT);
        let sends = r.dispatch(&same, Instant::now(), &mut |_, _| true);
        assert_eq!(sends, vec![send(1, &[0]), send(2, &[1])], "no second copy to the same party");
        assert!(r.check_here(k(0)) && r.check_here(k(1)));
        all_in(&mut r, &[(1, 0), (2, 1)]);
        assert_eq!(r.phase(), Phase::Reduce);
    }

    #[test]
    fn a_check_goes_to_another_host_when_there_is_one() {
        let at = |id: u32, host: [u8; 4]| Member { id: w(id), party: PartyId(id), host: Some(host.into()) };
        // Workers 1 and 2 share a host; 3 is elsewhere. Shard 0 is first given to worker 1.
        let alive = [at(1, [10, 0, 0, 1]), at(2, [10, 0, 0, 1]), at(3, [10, 0, 0, 2])];
        let mut r = Round::new(3, [1, 1, 1], TIMEOUT);
        let sends = r.dispatch(&alive, Instant::now(), &mut |s, _| s == k(0));
        assert_eq!(sends, vec![send(1, &[0]), send(2, &[1]), send(3, &[0, 2])], "not worker 2, on worker 1's host");
        // With no other host alive, another party on the same host checks it.
        let mut r = Round::new(3, [1, 1], TIMEOUT);
        let sends = r.dispatch(&alive[..2], Instant::now(), &mut |s, _| s == k(0));
        assert_eq!(sends, vec![send(1, &[0]), send(2, &[0, 1])]);
    }

    #[test]
    fn a_liar_is_evicted_and_the_shards_only_it_computed_are_computed_again() {
        let mut r = Round::new(3, [1, 1, 1, 1], TIMEOUT);
        let now = Instant::now();
        r.dispatch(&members(&[1, 2]), now, &mut |s, _| s == k(1));
        all_in(&mut r, &[(1, 0), (1, 1), (2, 1), (2, 2), (2, 3)]);
        // The copies of shard 1 differ; the referee agrees with worker 2.
        let actions = r.reduced(&BTreeMap::from([(k(1), vec![w(1)])]));
        assert_eq!(
            actions,
            vec![
                Action::Lied { worker: w(1), shard: k(1) },
                recompute(1, &[0], Cause::Lied),
                Action::Drop { worker: w(1), cause: Cause::Lied }
            ]
        );
        assert!(r.refereed(k(1)));
        assert_eq!(r.phase(), Phase::Dispatch);
        assert_eq!(dispatch(&mut r, &[2], now), vec![send(2, &[0])]);
        all_in(&mut r, &[(2, 0)]);
        assert_eq!(r.phase(), Phase::Reduce);
        assert_eq!(r.reduced(&BTreeMap::new()), vec![]);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_result_the_referee_confirms_is_nobodys_fault() {
        let mut r = dispatched(Instant::now());
        all_in(&mut r, &[(1, 0), (1, 1), (2, 2), (2, 3)]);
        assert_eq!(r.reduced(&BTreeMap::from([(k(2), vec![])])), vec![]);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_stragglers_shards_get_copies_on_idle_workers_and_the_first_result_wins() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Round::new(7, [1, 1, 1, 1], TIMEOUT).paced(Some(ms(10)), BTreeMap::new());
        assert_eq!(dispatch(&mut r, &[1, 2], t0), vec![send(1, &[0, 1]), send(2, &[2, 3])]);
        // Nobody idle: only the step deadline counts.
        assert_eq!(r.phase(), Phase::Wait { deadline: t0 + TIMEOUT });
        r.result(w(1), k(0), Ok(()), t0 + ms(2));
        r.result(w(1), k(1), Ok(()), t0 + ms(4));
        // Worker 1 is idle; worker 2 has shown no progress since t0.
        assert_eq!(r.phase(), Phase::Wait { deadline: t0 + ms(10) });
        assert_eq!(r.deadline_passed(t0 + ms(9)), vec![], "not yet");
        assert_eq!(
            r.deadline_passed(t0 + ms(10)),
            vec![Action::Speculate { from: w(2), shards: ks(&[2, 3]) }, send(1, &[2, 3])]
        );
        assert_eq!(r.phase(), Phase::Wait { deadline: t0 + TIMEOUT }, "each shard is copied once");
        // The copy wins shard 2; the straggler's late result for it is not waited for.
        assert_eq!(r.result(w(1), k(2), Ok(()), t0 + ms(12)), vec![]);
        assert!(!r.expects(w(2), 7, k(2)));
        // The straggler wins shard 3.
        assert_eq!(r.result(w(2), k(3), Ok(()), t0 + ms(13)), vec![]);
        assert!(!r.expects(w(1), 7, k(3)));
        assert_eq!(r.phase(), Phase::Reduce);
        assert_eq!((r.results(k(2)), r.results(k(3))), (&[w(1)][..], &[w(2)][..]));
        assert_eq!(r.intervals(), [(w(1), ms(2)), (w(1), ms(2)), (w(1), ms(2)), (w(2), ms(13))]);
    }

    #[test]
    fn a_straggler_that_leaves_costs_only_its_shards_without_a_copy() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut r = Round::new(7, [1, 1, 1], TIMEOUT).paced(Some(ms(10)), BTreeMap::new());
        assert_eq!(dispatch(&mut r, &[1, 2, 3], t0), vec![send(1, &[0]), send(2, &[1]), send(3, &[2])]);
        r.result(w(1), k(0), Ok(()), t0 + ms(1));
        // Worker 1 idle, 2 and 3 late: one idle worker takes both copies (contiguous).
        let acts = r.deadline_passed(t0 + ms(10));
        assert_eq!(acts.last(), Some(&send(1, &[1, 2])));
        r.result(w(1), k(1), Ok(()), t0 + ms(11));
        // Worker 3 leaves: shard 2's copy is still out on worker 1, so nothing is computed again.
        assert_eq!(r.left(w(3)), vec![]);
        assert_eq!(r.phase(), Phase::Wait { deadline: t0 + ms(10) + TIMEOUT });
        // Without learning there is no speculation.
        let mut off = Round::new(7, [1, 1], TIMEOUT);
        dispatch(&mut off, &[1, 2], t0);
        off.result(w(1), k(0), Ok(()), t0);
        assert_eq!(off.phase(), Phase::Wait { deadline: t0 + TIMEOUT });
        assert_eq!(off.deadline_passed(t0 + ms(100)), vec![]);
    }

    #[test]
    fn first_groups_follow_the_learned_speeds() {
        let speeds = BTreeMap::from([(w(1), 1.0), (w(2), 0.5)]);
        let mut r = Round::new(7, [1, 1, 1], TIMEOUT).paced(None, speeds);
        assert_eq!(dispatch(&mut r, &[1, 2], Instant::now()), vec![send(1, &[0, 1]), send(2, &[2])]);
    }

    #[test]
    fn a_party_is_dropped_at_its_third_fault() {
        let mut ledger = FaultLedger::default();
        let (p1, p2) = (PartyId(1), PartyId(2));
        assert_eq!(ledger.record(p1), None);
        assert_eq!(ledger.record(p2), None);
        assert_eq!(ledger.record(p1), None);
        assert_eq!(ledger.record(p1), Some(MAX_FAULTS));
    }
}
