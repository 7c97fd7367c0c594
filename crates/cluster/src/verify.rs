//! Verification by recomputation: which shards a second party computes too, and what is known
//! about each party's results across steps. Pure: the round asks, the engine reports.
//!
//! dtrain's workers produce the same bits for the same shard, so two parties' results for a
//! shard must be equal; when they are not, the coordinator recomputes the shard as the referee
//! and whoever disagrees with it lied. Each step a seeded pseudo-random fraction of the shards
//! is checked, and at the end of every window of `WINDOW` steps each worker that had no shard
//! checked in it gets one checked, so a worker that always lies is caught within one window.

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
    /// a seeded draw, or the window's last step for a worker with nothing checked in it yet.
    pub fn wants_check(&mut self, step: u64, shard: ShardIndex, worker: WorkerId) -> bool {
        if !self.on() {
            return false;
        }
        self.at(step);
        if drawn(self.seed, step, shard, self.fraction) {
            return true;
        }
        let last_in_window = (step + 1).is_multiple_of(WINDOW);
        last_in_window && !self.checked.contains(&worker) && self.forced.insert(worker)
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

/// A pseudo-random draw for (step, shard) that every run with the same seed repeats.
fn drawn(seed: u64, step: u64, shard: ShardIndex, fraction: Fraction) -> bool {
    if fraction.get() >= 1.0 {
        return true;
    }
    let mut x = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (shard.0 as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    // splitmix64's finalizer: every input bit affects every output bit.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    ((x >> 11) as f64 / (1u64 << 53) as f64) < fraction.get()
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
    fn every_worker_is_checked_at_least_once_per_window() {
        let mut a = Audit::new(Fraction::new(1e-9).unwrap(), 1);
        let (w1, w2) = (WorkerId(1), WorkerId(2));
        for step in 0..WINDOW - 1 {
            assert!(!a.wants_check(step, ShardIndex(0), w1));
        }
        a.record(WINDOW - 2, &[w2], &[]);
        let last = WINDOW - 1;
        assert!(a.wants_check(last, ShardIndex(0), w1), "worker 1 had nothing checked");
        assert!(!a.wants_check(last, ShardIndex(1), w1), "one forced check per worker");
        assert!(!a.wants_check(last, ShardIndex(2), w2), "worker 2 was checked in this window");
        // The next window starts over.
        assert!(a.wants_check(2 * WINDOW - 1, ShardIndex(2), w2));
        let mut off = Audit::new(Fraction::new(0.0).unwrap(), 1);
        assert!(!off.wants_check(last, ShardIndex(0), w1), "off means off");
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
