//! Verification by recomputation: which shards a second party computes too, and what is known
//! about each party's results across steps. Pure: the round asks, the engine reports.
//!
//! dtrain's workers produce the same bits for the same shard, so two parties' results for a
//! shard must be equal; when they are not, the coordinator recomputes the shard as the referee
//! and whoever disagrees with it lied. Each step a pseudo-random fraction of the shards is
//! checked, and in every window of `WINDOW` steps each worker that had no shard checked yet gets
//! one checked from a step of the window drawn for it, so a worker that always lies is caught
//! within one window. The draws come from a secret the coordinator makes at start (not the job's
//! seed, which workers know): a worker cannot tell which of its results will be checked.

use crate::ids::{PartyId, ShardIndex, WorkerId};
use std::collections::{BTreeMap, BTreeSet};

/// Steps per verification window; the trainer keeps its state at each window's start, so a
/// liar caught late rolls training back to where its unchecked results began.
pub const WINDOW: u64 = 16;

/// Checked when neither `--verify` nor `fit.verify` says otherwise.
pub const DEFAULT_VERIFY: Fraction = Fraction(0.02);

/// The fraction of shards checked by a second party: 0 (off) to 1 (every shard).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fraction(f64);

impl Fraction {
    /// Every shard.
    pub const ALL: Fraction = Fraction(1.0);

    /// `f` in [0, 1].
    pub fn new(f: f64) -> Option<Fraction> {
        (0.0..=1.0).contains(&f).then_some(Fraction(f))
    }

    /// `all`, or a number in [0, 1].
    pub fn parse(s: &str) -> Result<Fraction, String> {
        if s == "all" {
            return Ok(Fraction::ALL);
        }
        s.parse::<f64>()
            .ok()
            .and_then(Fraction::new)
            .ok_or_else(|| format!("{s:?} is not a fraction in [0, 1] or \"all\""))
    }

    /// The fraction.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// What the coordinator knows about who was checked.
#[derive(Debug)]
pub struct Audit {
    fraction: Fraction,
    seed: u64,
    /// The window the sets below are about.
    window: u64,
    /// Workers with at least one result checked in this window.
    checked: BTreeSet<WorkerId>,
    /// Workers given a forced check in the current step (one each).
    forced: BTreeSet<WorkerId>,
    step: u64,
    /// Per party: the first step whose gradient used a result of it that nobody checked.
    first_unchecked: BTreeMap<PartyId, u64>,
}

impl Audit {
    /// Checks `fraction` of the shards, chosen from `seed`.
    pub fn new(fraction: Fraction, seed: u64) -> Audit {
        Audit {
            fraction,
            seed,
            window: 0,
            checked: BTreeSet::new(),
            forced: BTreeSet::new(),
            step: 0,
            first_unchecked: BTreeMap::new(),
        }
    }

    /// Whether any shard is ever checked.
    pub fn on(&self) -> bool {
        self.fraction.get() > 0.0
    }

    /// Whether `shard` of `step`, first given to `worker`, is also computed by another party:
    /// a secret draw, or, for a worker with nothing checked in this window yet, a step at or
    /// after the one drawn for it in this window (the last step at the latest).
    pub fn wants_check(&mut self, step: u64, shard: ShardIndex, worker: WorkerId) -> bool {
        if !self.on() {
            return false;
        }
        self.at(step);
        if drawn(self.seed, step, shard, self.fraction) {
            return true;
        }
        let due = step % WINDOW >= self.forced_at(step / WINDOW, worker);
        due && !self.checked.contains(&worker) && self.forced.insert(worker)
    }

    /// Whether a chain step over `members` is audited (the coordinator recomputes every shard
    /// and compares the sum): a secret draw for the step, or a member with nothing checked in
    /// this window past the step drawn for it. A chain's running sums cannot be checked shard
    /// by shard, so the whole step is, about as often as a single shard on the star.
    pub fn wants_chain_check(&mut self, step: u64, members: &[WorkerId]) -> bool {
        if !self.on() {
            return false;
        }
        self.at(step);
        let forced = |w: &WorkerId| step % WINDOW >= self.forced_at(step / WINDOW, *w) && !self.checked.contains(w);
        drawn(self.seed, step, ShardIndex(usize::MAX), self.fraction) || members.iter().any(forced)
    }

    /// The step of `window` (0 to `WINDOW` - 1) from which `worker` gets a forced check.
    fn forced_at(&self, window: u64, worker: WorkerId) -> u64 {
        mix(self.seed ^ 0x5EED ^ window.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(worker.0).rotate_left(32))
            % WINDOW
    }

    fn at(&mut self, step: u64) {
        if step != self.step {
            self.step = step;
            self.forced.clear();
        }
        if step / WINDOW != self.window {
            self.window = step / WINDOW;
            self.checked.clear();
        }
    }

    /// A step's gradient was made: `checked` workers had a result confirmed by another party
    /// or the referee; `unchecked` parties had a result used that nobody checked.
    pub fn record(&mut self, step: u64, checked: &[WorkerId], unchecked: &[PartyId]) {
        self.at(step);
        self.checked.extend(checked);
        for &p in unchecked {
            self.first_unchecked.entry(p).or_insert(step);
        }
    }

    /// The first step whose gradient used an unchecked result of `party`: what must be undone
    /// if it is caught lying.
    pub fn first_unchecked(&self, party: PartyId) -> Option<u64> {
        self.first_unchecked.get(&party).copied()
    }

    /// Training went back to before `step`: results used after it no longer count.
    pub fn rolled_back(&mut self, step: u64) {
        self.first_unchecked.retain(|_, first| *first < step);
    }
}

/// What an audited chain step whose sum was wrong says about its members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainVerdict {
    /// This member's shards' sums differ from the recomputation, or it received the right
    /// running sum and sent (or claims to have sent) a wrong one: it lied.
    Liar(WorkerId),
    /// `sender` claims it sent the right running sum, `receiver` that it received another:
    /// one of them lies, and which cannot be told.
    Dispute {
        /// The predecessor.
        sender: WorkerId,
        /// The successor.
        receiver: WorkerId,
    },
}

/// Judges a chain step whose sum differs from the coordinator's recomputation. `members` in
/// order, each with its keyed digests as recomputed (`truth`: received, sent; received is
/// 0 for the first) and as reported (`None`: none arrived); `wrong_sums`: members whose
/// shards' loss sums or counts differ. The first member whose account departs from the truth
/// is judged; if every account is true, the last member sent the coordinator something else.
pub fn judge_chain(
    members: &[WorkerId],
    truth: &[(u64, u64)],
    reported: &[Option<(u64, u64)>],
    wrong_sums: &[WorkerId],
) -> Option<ChainVerdict> {
    if let Some(&w) = members.iter().find(|w| wrong_sums.contains(w)) {
        return Some(ChainVerdict::Liar(w));
    }
    for (i, &w) in members.iter().enumerate() {
        let Some((received, sent)) = reported.get(i).copied().flatten() else {
            return Some(ChainVerdict::Liar(w));
        };
        let (true_received, true_sent) = truth.get(i).copied()?;
        if i > 0 && received != true_received {
            return Some(ChainVerdict::Dispute { sender: members[i - 1], receiver: w });
        }
        if sent != true_sent {
            return Some(ChainVerdict::Liar(w));
        }
    }
    members.last().map(|&w| ChainVerdict::Liar(w))
}

/// A pseudo-random draw for (step, shard) that every audit with the same secret repeats.
fn drawn(seed: u64, step: u64, shard: ShardIndex, fraction: Fraction) -> bool {
    if fraction.get() >= 1.0 {
        return true;
    }
    let x = mix(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (shard.0 as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F));
    ((x >> 11) as f64 / (1u64 << 53) as f64) < fraction.get()
}

/// splitmix64's finalizer: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_parse_and_draws_hit_about_their_fraction() {
        assert_eq!(Fraction::parse("all"), Ok(Fraction::ALL));
        assert_eq!(Fraction::parse("0.05").map(Fraction::get), Ok(0.05));
        assert!(Fraction::parse("1.5").is_err() && Fraction::parse("-0.1").is_err() && Fraction::parse("x").is_err());
        let f = Fraction::new(0.05).unwrap();
        let hits = (0..20_000).filter(|&s| drawn(7, s, ShardIndex(s as usize % 4), f)).count();
        assert!((800..1200).contains(&hits), "{hits} of 20000 at 0.05");
        assert!((0..100).all(|s| drawn(7, s, ShardIndex(0), Fraction::ALL)));
        assert!((0..100).all(|s| !drawn(7, s, ShardIndex(0), Fraction::new(0.0).unwrap())));
        // Seeded: the same draws every time, other draws for another seed.
        let pattern = |seed| (0..200).map(|s| drawn(seed, s, ShardIndex(1), f)).collect::<Vec<_>>();
        assert_eq!(pattern(3), pattern(3));
        assert_ne!(pattern(3), pattern(4));
    }

    #[test]
    fn every_worker_is_checked_once_per_window_at_a_step_it_cannot_foresee() {
        let (w1, w2) = (WorkerId(1), WorkerId(2));
        // Worker 1 computes a shard every step, and is recorded as checked when it is.
        let forced = |secret: u64, window: u64| -> Vec<u64> {
            let mut a = Audit::new(Fraction::new(1e-12).unwrap(), secret);
            let mut hits = vec![];
            for s in window * WINDOW..(window + 1) * WINDOW {
                if a.wants_check(s, ShardIndex(0), w1) {
                    a.record(s, &[w1], &[]);
                    hits.push(s);
                }
            }
            hits
        };
        for secret in 0..20 {
            assert_eq!(forced(secret, 0).len(), 1, "one forced check in the window");
        }
        let at: std::collections::BTreeSet<u64> = (0..20).map(|secret| forced(secret, 0)[0]).collect();
        assert!(at.len() > 5, "the step depends on the secret: {at:?}");
        assert_ne!((0..8).map(|w| forced(1, w)[0] % WINDOW).collect::<Vec<_>>(), [WINDOW - 1; 8]);
        // Checked already in the window: no forced check; one per worker per step at most.
        let mut a = Audit::new(Fraction::new(1e-12).unwrap(), 3);
        a.record(0, &[w2], &[]);
        assert!((0..WINDOW).all(|s| !a.wants_check(s, ShardIndex(0), w2)));
        let last = WINDOW - 1;
        let mut b = Audit::new(Fraction::new(1e-12).unwrap(), 3);
        assert!(b.wants_check(last, ShardIndex(0), w1), "the last step at the latest");
        assert!(!b.wants_check(last, ShardIndex(1), w1), "once per step");
        let mut off = Audit::new(Fraction::new(0.0).unwrap(), 1);
        assert!(!off.wants_check(last, ShardIndex(0), w1), "off means off");
    }

    #[test]
    fn chain_steps_are_audited_about_as_often_as_a_shard_and_every_member_once_a_window() {
        let members = [WorkerId(1), WorkerId(2), WorkerId(3)];
        let mut a = Audit::new(Fraction::new(0.05).unwrap(), 9);
        let mut audited = 0;
        for step in 0..WINDOW * 200 {
            if a.wants_chain_check(step, &members) {
                audited += 1;
                a.record(step, &members, &[]);
            }
        }
        // At least one a window (200), plus draws at 0.05 (about 160) not already in one.
        assert!((200..400).contains(&audited), "{audited} audits in 200 windows");
        let mut off = Audit::new(Fraction::new(0.0).unwrap(), 9);
        assert!((0..WINDOW).all(|s| !off.wants_chain_check(s, &members)));
    }

    #[test]
    fn the_first_member_whose_account_departs_from_the_truth_is_judged() {
        let m = [WorkerId(1), WorkerId(2), WorkerId(3)];
        let truth = [(0, 10), (10, 20), (20, 30)];
        let judge = |reported: &[Option<(u64, u64)>], wrong: &[WorkerId]| judge_chain(&m, &truth, reported, wrong);
        // Member 2 received the truth and sent something else.
        assert_eq!(judge(&[Some((0, 10)), Some((10, 21)), Some((21, 31))], &[]), Some(ChainVerdict::Liar(m[1])));
        // Member 1 claims the truth, member 2 says it got something else: a dispute.
        let dispute = ChainVerdict::Dispute { sender: m[0], receiver: m[1] };
        assert_eq!(judge(&[Some((0, 10)), Some((11, 21)), Some((21, 31))], &[]), Some(dispute));
        // Every account true: the last member sent the coordinator another sum.
        assert_eq!(judge(&[Some((0, 10)), Some((10, 20)), Some((20, 30))], &[]), Some(ChainVerdict::Liar(m[2])));
        // Wrong loss sums, or no account at all.
        assert_eq!(judge(&[Some((0, 10)), Some((10, 20)), Some((20, 30))], &[m[0]]), Some(ChainVerdict::Liar(m[0])));
        assert_eq!(judge(&[Some((0, 10)), None, Some((20, 30))], &[]), Some(ChainVerdict::Liar(m[1])));
        // The first member's received digest is not looked at (it received nothing).
        assert_eq!(judge(&[Some((5, 11)), Some((11, 20)), Some((20, 30))], &[]), Some(ChainVerdict::Liar(m[0])));
    }

    #[test]
    fn the_first_unchecked_use_of_a_partys_result_is_remembered_until_rolled_back() {
        let mut a = Audit::new(Fraction::new(0.1).unwrap(), 1);
        let (p1, p2) = (PartyId(1), PartyId(2));
        a.record(3, &[], &[p1]);
        a.record(4, &[], &[p1, p2]);
        assert_eq!(a.first_unchecked(p1), Some(3));
        assert_eq!(a.first_unchecked(p2), Some(4));
        a.rolled_back(4);
        assert_eq!((a.first_unchecked(p1), a.first_unchecked(p2)), (Some(3), None));
        a.rolled_back(0);
        assert_eq!(a.first_unchecked(p1), None);
    }
}
