//! A thread on a core the shards leave over, that works on a slot of its own while the
//! caller goes on: the caller posts a job (fills the slot), later takes the result.
//!
//! Handing work to a sleeping thread costs a futex wake: about 18 µs on the VMs we measured,
//! a tenth of the seed job's step. So the thread spins on a flag while jobs keep coming, and
//! parks only after `IDLE` without one.

use std::cell::UnsafeCell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long the thread spins without work before it parks.
const IDLE: Duration = Duration::from_millis(2);
/// The longest a parked thread sleeps before it looks at the flag again.
const NAP: Duration = Duration::from_millis(50);

/// The slot is the caller's.
const IDLE_SLOT: u8 = 0;
/// The slot is the thread's, working on it.
const POSTED: u8 = 1;
const EXIT: u8 = 2;

struct Shared<T> {
    state: AtomicU8,
    slot: UnsafeCell<T>,
    parked: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: the slot is touched by the caller only while the state is IDLE_SLOT (it holds
// `&mut SpareCore`, and waits for IDLE_SLOT before giving the slot out), and by the thread
// only while it is POSTED; SeqCst stores and loads of the state order the two.
unsafe impl<T: Send> Sync for Shared<T> {}

/// One helper thread and its slot; see the module comment.
pub struct SpareCore<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> SpareCore<T> {
    /// Starts the thread, named `name`; each posted job is `work` on the slot.
    pub fn new(name: &str, slot: T, work: impl FnMut(&mut T) + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(IDLE_SLOT),
            slot: UnsafeCell::new(slot),
            parked: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let theirs = Arc::clone(&shared);
        let thread = thread::Builder::new().name(name.into()).spawn(move || serve(&theirs, work))?;
        Ok(SpareCore { shared, thread: Some(thread) })
    }

    /// Waits for the job in flight, if any; lets `prepare` take its result and set up the
    /// next one in the slot; starts it and returns.
    pub fn post(&mut self, prepare: impl FnOnce(&mut T)) {
        prepare(self.finished());
        let s = &*self.shared;
        s.state.store(POSTED, SeqCst);
        // Dekker with `serve`: this stores POSTED then loads `parked`; it stores `parked`
        // then loads the state; one of the two sees the other's store.
        if s.parked.load(SeqCst) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
    }

    /// Waits for the job in flight, if any, and gives the slot.
    ///
    /// # Panics
    /// When the job panicked (the slot may be half done).
    pub fn finished(&mut self) -> &mut T {
        let s = &*self.shared;
        let started = Instant::now();
        while s.state.load(SeqCst) == POSTED {
            if started.elapsed() < IDLE {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        assert!(!s.panicked.load(SeqCst), "a job on the spare core panicked");
        // SAFETY: IDLE_SLOT, and `&mut self` is the only way to post: the slot is ours.
        unsafe { &mut *s.slot.get() }
    }

    #[cfg(test)]
    fn parked(&self) -> bool {
        self.shared.parked.load(SeqCst)
    }
}

impl<T: Send + 'static> Drop for SpareCore<T> {
    fn drop(&mut self) {
        // A job in flight finishes first: `serve` looks at the state only between jobs.
        while self.shared.state.load(SeqCst) == POSTED {
            thread::yield_now();
        }
        self.shared.state.store(EXIT, SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The thread: waits for a job (spinning, then parked), works on the slot, hands it back.
fn serve<T>(s: &Shared<T>, mut work: impl FnMut(&mut T)) {
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            spins = spins.wrapping_add(1);
            match s.state.load(SeqCst) {
                POSTED => break,
                EXIT => return,
                // The clock is read every 256 spins: reading it is slower than a spin.
                _ if !spins.is_multiple_of(256) || idle_since.elapsed() < IDLE => std::hint::spin_loop(),
                _ => {
                    s.parked.store(true, SeqCst);
                    if s.state.load(SeqCst) == IDLE_SLOT {
                        thread::park_timeout(NAP);
                    }
                    s.parked.store(false, SeqCst);
                    idle_since = Instant::now();
                }
            }
        }
        // SAFETY: POSTED: the slot is this thread's until it stores IDLE_SLOT.
        let slot = unsafe { &mut *s.slot.get() };
        let ok = panic::catch_unwind(AssertUnwindSafe(|| work(slot))).is_ok();
        s.panicked.store(!ok, SeqCst);
        s.state.store(IDLE_SLOT, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn squares() -> SpareCore<(u64, Vec<u64>)> {
        SpareCore::new("test-spare", (0, vec![]), |(n, out)| {
            out.clear();
            out.extend((0..*n).map(|i| i * i));
        })
        .unwrap()
    }

    #[test]
    fn each_result_is_the_posted_job_done_in_full() {
        let mut spare = squares();
        let mut results = vec![];
        for n in 1..300u64 {
            spare.post(|(prev_n, out)| {
                if *prev_n > 0 {
                    results.push((*prev_n, out.clone()));
                }
                *prev_n = n;
            });
        }
        let (n, out) = spare.finished();
        assert_eq!((*n, out.len()), (299, 299));
        assert_eq!(results.len(), 298);
        for (n, out) in results {
            assert_eq!(out, (0..n).map(|i| i * i).collect::<Vec<_>>());
        }
    }

    #[test]
    fn the_job_runs_on_the_named_thread() {
        let mut spare = SpareCore::new("test-spare", None, |name: &mut Option<String>| {
            *name = thread::current().name().map(String::from);
        })
        .unwrap();
        spare.post(|_| ());
        assert_eq!(spare.finished().as_deref(), Some("test-spare"));
    }

    #[test]
    fn a_parked_thread_wakes_for_the_next_job() {
        let mut spare = squares();
        thread::sleep(IDLE * 5);
        assert!(spare.parked(), "idle long enough to park");
        let started = Instant::now();
        spare.post(|(n, _)| *n = 3);
        assert_eq!(spare.finished().1, [0, 1, 4]);
        assert!(started.elapsed() < NAP, "woken by unpark, not by the nap running out");
    }

    #[test]
    fn a_job_that_panicked_is_reported_to_the_caller() {
        let mut spare = SpareCore::new("test-spare", 0u32, |_| panic!("boom")).unwrap();
        spare.post(|_| ());
        let caught = panic::catch_unwind(AssertUnwindSafe(|| {
            spare.finished();
        }));
        assert!(caught.is_err());
    }

    #[test]
    fn dropping_waits_for_the_job_in_flight() {
        let done = Arc::new(AtomicBool::new(false));
        let theirs = Arc::clone(&done);
        let mut spare = SpareCore::new("test-spare", (), move |_| {
            thread::sleep(Duration::from_millis(20));
            theirs.store(true, SeqCst);
        })
        .unwrap();
        spare.post(|_| ());
        drop(spare);
        assert!(done.load(SeqCst));
    }
}
