//! One step's bookkeeping as a pure state machine: which shards are pending, out (with whom,
//! since when), in, or in doubt. Results, departures, deadlines and the reduction's verdict go
//! in; what to do comes out as `Action`s. No sockets, no clock, no tokio: the engine moves
//! messages and hands in the time, so every decision here is tested with synthetic events.

use crate::assign::assign;
use crate::ids::{ShardIndex, WorkerId};
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
    /// Its result was not finite: another worker computes the shard too, to tell a faulty
    /// worker from a diverging model.
    SecondOpinion,
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
    /// Some shards have no worker: call `dispatch`.
    Dispatch,
    /// Shards are out: wait for an event, or call `deadline_passed` at `deadline`.
    Wait {
        /// When the first worker with shards out is late.
        deadline: Instant,
    },
    /// Every shard is in: sum them and call `reduced` with the shards whose result is not finite.
    Reduce,
    /// The step's gradient is complete.
    Done,
}

/// One step's shards from dispatch to a complete, checked sum.
#[derive(Debug)]
pub struct Round {
    step: u64,
    timeout: Duration,
    pending: BTreeSet<ShardIndex>,
    assigned: BTreeMap<ShardIndex, WorkerId>,
    /// Who computed each shard whose result is in (`None` for an empty shard, which nobody
    /// computes, and for shards not in yet).
    computed_by: Vec<Option<WorkerId>>,
    /// When each worker was last sent work this step; its deadline is `timeout` after that.
    sent_at: BTreeMap<WorkerId, Instant>,
    /// Shards whose first result was not finite: who sent it and what was wrong, until a
    /// second opinion says whether it was the worker or the model.
    doubts: BTreeMap<ShardIndex, (WorkerId, Refusal)>,
    done: bool,
}

impl Round {
    /// A step over shards of the given sizes (rows); empty shards count as in from the start.
    pub fn new(step: u64, shard_rows: impl IntoIterator<Item = usize>, timeout: Duration) -> Round {
        let rows: Vec<usize> = shard_rows.into_iter().collect();
        Round {
            step,
            timeout,
            pending: (0..rows.len()).filter(|&k| rows[k] > 0).map(ShardIndex).collect(),
            assigned: BTreeMap::new(),
            computed_by: vec![None; rows.len()],
            sent_at: BTreeMap::new(),
            doubts: BTreeMap::new(),
            done: false,
        }
    }

    /// The step this round computes.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// What to do next.
    pub fn phase(&self) -> Phase {
        if self.done {
            Phase::Done
        } else if !self.pending.is_empty() {
            Phase::Dispatch
        } else if let Some(deadline) = self.deadline() {
            Phase::Wait { deadline }
        } else {
            Phase::Reduce
        }
    }

    /// The earliest deadline of a worker with shards out.
    fn deadline(&self) -> Option<Instant> {
        let busy: BTreeSet<WorkerId> = self.assigned.values().copied().collect();
        busy.iter().filter_map(|w| self.sent_at.get(w)).min().map(|&t| t + self.timeout)
    }

    /// Hands the pending shards to `alive` workers (contiguous groups in joining order; a shard
    /// in doubt goes to someone other than the worker that sent the doubtful result).
    pub fn dispatch(&mut self, alive: &[WorkerId], now: Instant) -> Vec<Action> {
        if self.pending.is_empty() {
            return vec![];
        }
        if alive.is_empty() {
            return vec![Action::AwaitWorkers];
        }
        let todo: Vec<ShardIndex> = std::mem::take(&mut self.pending).into_iter().collect();
        let doubts = &self.doubts;
        let plan = assign(&todo, alive, |k| doubts.get(&k).map(|d| d.0));
        let mut actions = Vec::with_capacity(plan.len());
        for (worker, shards) in plan {
            self.sent_at.insert(worker, now);
            self.assigned.extend(shards.iter().map(|&k| (k, worker)));
            actions.push(Action::Send { worker, shards });
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
        step == self.step && self.assigned.get(&shard) == Some(&worker)
    }

    /// An expected result arrived and was checked (`Err` says what is wrong with it).
    pub fn result(&mut self, worker: WorkerId, shard: ShardIndex, checked: Result<(), Refusal>) -> Vec<Action> {
        if !self.expects(worker, self.step, shard) {
            return vec![];
        }
        self.assigned.remove(&shard);
        match checked {
            Ok(()) => {
                self.computed_by[shard.0] = Some(worker);
                vec![]
            }
            Err(why) => {
                self.pending.insert(shard);
                vec![
                    Action::Fault { worker, shard, why },
                    Action::Recompute { from: worker, shards: vec![shard], cause: Cause::BadResult },
                ]
            }
        }
    }

    /// `worker`'s stream ended: its outstanding shards go to others.
    pub fn left(&mut self, worker: WorkerId) -> Vec<Action> {
        self.take_from(worker, Cause::Left, false)
    }

    /// Drops every worker whose deadline passed by `now` and moves its shards.
    pub fn deadline_passed(&mut self, now: Instant) -> Vec<Action> {
        let late: BTreeSet<WorkerId> = self
            .assigned
            .values()
            .copied()
            .filter(|w| self.sent_at.get(w).is_some_and(|&t| t + self.timeout <= now))
            .collect();
        late.into_iter().flat_map(|w| self.take_from(w, Cause::MissedDeadline, true)).collect()
    }

    fn take_from(&mut self, worker: WorkerId, cause: Cause, drop: bool) -> Vec<Action> {
        let shards: Vec<ShardIndex> = self.assigned.iter().filter(|(_, &w)| w == worker).map(|(&k, _)| k).collect();
        self.assigned.retain(|_, w| *w != worker);
        self.pending.extend(&shards);
        let mut actions = vec![];
        if !shards.is_empty() {
            actions.push(Action::Recompute { from: worker, shards, cause });
        }
        if drop {
            actions.push(Action::Drop { worker, cause });
        }
        actions
    }

    /// The sum is made; `not_finite` names the shards whose result is not finite, with what is
    /// wrong. A first non-finite result is doubted and computed again by another worker; if that
    /// one is not finite either, it is the model's value (a diverging run stops as in process);
    /// if it is, the first worker was at fault.
    pub fn reduced(&mut self, not_finite: &BTreeMap<ShardIndex, Refusal>) -> Vec<Action> {
        let previous = std::mem::take(&mut self.doubts);
        let mut actions = vec![];
        for (&shard, (first, why)) in &previous {
            if !not_finite.contains_key(&shard) {
                actions.push(Action::Fault { worker: *first, shard, why: why.clone() });
            }
        }
        for (&shard, why) in not_finite {
            if previous.contains_key(&shard) {
                continue; // two workers agree: it is the model's value
            }
            if let Some(worker) = self.computed_by.get_mut(shard.0).and_then(Option::take) {
                self.doubts.insert(shard, (worker, why.clone()));
                self.pending.insert(shard);
                actions.push(Action::Recompute { from: worker, shards: vec![shard], cause: Cause::SecondOpinion });
            }
        }
        self.done = self.pending.is_empty();
        actions
    }
}

/// Faulty results per worker, across steps.
#[derive(Debug, Default)]
pub struct FaultLedger {
    counts: BTreeMap<WorkerId, u32>,
}

impl FaultLedger {
    /// Counts a fault of `worker`; `Some(n)` when it has reached `MAX_FAULTS` and must go.
    pub fn record(&mut self, worker: WorkerId) -> Option<u32> {
        let n = self.counts.entry(worker).or_default();
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

    fn send(worker: u32, shards: &[usize]) -> Action {
        Action::Send { worker: w(worker), shards: ks(shards) }
    }

    fn recompute(from: u32, shards: &[usize], cause: Cause) -> Action {
        Action::Recompute { from: w(from), shards: ks(shards), cause }
    }

    /// A round of four one-row shards, dispatched to workers 1 and 2 at `t0`.
    fn dispatched(t0: Instant) -> Round {
        let mut r = Round::new(7, [1, 1, 1, 1], TIMEOUT);
        assert_eq!(r.phase(), Phase::Dispatch);
        assert_eq!(r.dispatch(&[w(1), w(2)], t0), vec![send(1, &[0, 1]), send(2, &[2, 3])]);
        r
    }

    fn all_in(r: &mut Round, results: &[(u32, usize)]) {
        for &(worker, shard) in results {
            assert_eq!(r.result(w(worker), k(shard), Ok(())), vec![]);
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
        assert_eq!(r.dispatch(&[w(1), w(2)], Instant::now()), vec![send(1, &[0]), send(2, &[2])]);
        let none = Round::new(1, [0, 0], TIMEOUT);
        assert_eq!(none.phase(), Phase::Reduce, "nothing to compute");
    }

    #[test]
    fn with_no_worker_alive_it_asks_to_wait_and_keeps_the_shards() {
        let mut r = Round::new(1, [1, 1], TIMEOUT);
        assert_eq!(r.dispatch(&[], Instant::now()), vec![Action::AwaitWorkers]);
        assert_eq!(r.phase(), Phase::Dispatch);
        assert_eq!(r.dispatch(&[w(5)], Instant::now()), vec![send(5, &[0, 1])]);
    }

    #[test]
    fn a_late_or_foreign_result_is_ignored() {
        let mut r = dispatched(Instant::now());
        assert!(!r.expects(w(2), 7, k(0)), "shard 0 is worker 1's");
        assert!(!r.expects(w(1), 6, k(0)), "an earlier step's result");
        assert!(r.expects(w(1), 7, k(0)));
        assert_eq!(r.result(w(2), k(0), Ok(())), vec![]);
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
        assert_eq!(r.dispatch(&[w(2)], t1), vec![send(2, &[1])]);
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
        assert_eq!(r.dispatch(&[w(2)], t1), vec![send(2, &[1])]);
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
        assert_eq!(r.dispatch(&[w(3)], t1 + TIMEOUT), vec![send(3, &[1, 2, 3])]);
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
            r.result(w(2), k(3), Err(why.clone())),
            vec![Action::Fault { worker: w(2), shard: k(3), why }, recompute(2, &[3], Cause::BadResult)]
        );
        assert_eq!(r.phase(), Phase::Dispatch);
    }

    #[test]
    fn a_non_finite_result_confirmed_by_another_worker_is_the_models() {
        let mut r = dispatched(Instant::now());
        all_in(&mut r, &[(1, 0), (1, 1), (2, 2), (2, 3)]);
        let nan =
            BTreeMap::from([(k(2), Refusal::Wire(dtrain_proto::WireError::NotFinite { what: "gradient", index: 0 }))]);
        assert_eq!(r.reduced(&nan), vec![recompute(2, &[2], Cause::SecondOpinion)]);
        // The second opinion goes to worker 1, not to the worker that sent the first.
        assert_eq!(r.dispatch(&[w(1), w(2)], Instant::now()), vec![send(1, &[2])]);
        all_in(&mut r, &[(1, 2)]);
        assert_eq!(r.reduced(&nan), vec![], "two workers agree: nobody is at fault");
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_non_finite_result_contradicted_by_another_worker_is_the_first_workers_fault() {
        let mut r = dispatched(Instant::now());
        all_in(&mut r, &[(1, 0), (1, 1), (2, 2), (2, 3)]);
        let why = Refusal::SumsNotFinite;
        r.reduced(&BTreeMap::from([(k(3), why.clone())]));
        assert_eq!(r.dispatch(&[w(1), w(2)], Instant::now()), vec![send(1, &[3])]);
        all_in(&mut r, &[(1, 3)]);
        assert_eq!(r.reduced(&BTreeMap::new()), vec![Action::Fault { worker: w(2), shard: k(3), why }]);
        assert_eq!(r.phase(), Phase::Done);
    }

    #[test]
    fn a_worker_is_dropped_at_its_third_fault() {
        let mut ledger = FaultLedger::default();
        assert_eq!(ledger.record(w(1)), None);
        assert_eq!(ledger.record(w(2)), None);
        assert_eq!(ledger.record(w(1)), None);
        assert_eq!(ledger.record(w(1)), Some(MAX_FAULTS));
    }
}
