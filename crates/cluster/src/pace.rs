//! What recent steps taught about the workers' pace: when a worker that made no progress is a
//! straggler (its shards then get copies elsewhere), and how fast each worker is (its first
//! groups are sized by it). Pure: the engine feeds each round's result intervals. Neither ever
//! changes a bit of the result: every copy of a shard has the same bits, and the sum's order is
//! the shards', whoever computed them.

use crate::ids::WorkerId;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// Intervals kept for the straggler threshold.
const KEPT: usize = 256;

/// Intervals needed before anyone is called a straggler.
const LEARNED: usize = 16;

/// A worker is a straggler after this many times the usual interval without progress...
const TIMES: u32 = 2;

/// ...and never sooner than this (scheduling noise on a busy host).
pub const MIN_SPECULATION: Duration = Duration::from_millis(5);

/// Weight of a new interval in a worker's running average.
const ALPHA: f64 = 0.2;

/// Recent intervals (a result's time since its worker's previous progress) and each worker's
/// running average of them.
#[derive(Debug, Default)]
pub struct Pace {
    recent: VecDeque<Duration>,
    average: BTreeMap<WorkerId, f64>,
}

impl Pace {
    /// Takes a round's intervals; forgets workers not in `alive`.
    pub fn learn(&mut self, intervals: &[(WorkerId, Duration)], alive: &[WorkerId]) {
        for &(w, d) in intervals {
            if self.recent.len() == KEPT {
                self.recent.pop_front();
            }
            self.recent.push_back(d);
            let s = d.as_secs_f64();
            self.average.entry(w).and_modify(|a| *a += ALPHA * (s - *a)).or_insert(s);
        }
        self.average.retain(|w, _| alive.contains(w));
    }

    /// Forgets what was learned of `worker`'s pace: it is measured anew.
    pub fn forget(&mut self, worker: WorkerId) {
        self.average.remove(&worker);
    }

    /// How long without progress makes a straggler: `TIMES` the median interval, at least
    /// `MIN_SPECULATION`; `None` until `LEARNED` intervals are known.
    pub fn speculate_after(&self) -> Option<Duration> {
        if self.recent.len() < LEARNED {
            return None;
        }
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort_unstable();
        Some((v[v.len() / 2] * TIMES).max(MIN_SPECULATION))
    }

    /// The median of the recent intervals, once `LEARNED` are known.
    pub fn median(&self) -> Option<Duration> {
        if self.recent.len() < LEARNED {
            return None;
        }
        let mut v: Vec<Duration> = self.recent.iter().copied().collect();
        v.sort_unstable();
        Some(v[v.len() / 2])
    }

    /// Each measured worker's speed relative to the median worker (2: twice as fast).
    pub fn speeds(&self) -> BTreeMap<WorkerId, f64> {
        let mut a: Vec<f64> = self.average.values().copied().filter(|x| *x > 0.0).collect();
        if a.is_empty() {
            return BTreeMap::new();
        }
        a.sort_by(f64::total_cmp);
        let median = a[a.len() / 2];
        self.average.iter().filter(|(_, &x)| x > 0.0).map(|(&w, &x)| (w, median / x)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn a_straggler_is_twice_the_median_interval_once_learned() {
        let mut p = Pace::default();
        let (a, b) = (WorkerId(1), WorkerId(2));
        p.learn(&[(a, ms(10)); 15], &[a, b]);
        assert_eq!(p.speculate_after(), None, "not learned yet");
        p.learn(&[(a, ms(10)), (b, ms(40))], &[a, b]);
        assert_eq!(p.speculate_after(), Some(ms(20)));
        assert_eq!(p.median(), Some(ms(10)));
        // Fast steps: never below the floor.
        let mut fast = Pace::default();
        fast.learn(&[(a, Duration::from_micros(100)); 20], &[a]);
        assert_eq!(fast.speculate_after(), Some(MIN_SPECULATION));
    }

    #[test]
    fn speeds_are_relative_to_the_median_worker_and_forget_departed_ones() {
        let mut p = Pace::default();
        let (a, b, c) = (WorkerId(1), WorkerId(2), WorkerId(3));
        p.learn(&[(a, ms(10)), (b, ms(20)), (c, ms(10))], &[a, b, c]);
        let s = p.speeds();
        assert_eq!((s[&a], s[&b], s[&c]), (1.0, 0.5, 1.0));
        // A running average: one fast interval moves a slow worker a fifth of the way.
        p.learn(&[(b, ms(10))], &[a, b, c]);
        assert!((p.speeds()[&b] - 10.0 / 18.0).abs() < 1e-9);
        p.learn(&[], &[a, c]);
        assert!(!p.speeds().contains_key(&b));
    }
}
