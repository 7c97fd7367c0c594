//! A thread on a core the shards leave over, that runs one job alongside the caller.
//!
//! Handing work to a sleeping thread costs a futex wake: about 18 µs on the VMs we measured,
//! a tenth of the seed job's step and as long as the job itself (gathering a batch). So the
//! thread spins on a flag while steps keep coming, and parks only after `IDLE` without work.

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

const EMPTY: u8 = 0;
const POSTED: u8 = 1;
const DONE: u8 = 2;
const EXIT: u8 = 3;

type Job = *mut (dyn FnMut() + Send + 'static);

struct Shared {
    state: AtomicU8,
    /// The posted job: set by `join` before `POSTED`, read by the thread after it.
    job: UnsafeCell<Option<Job>>,
    parked: AtomicBool,
    panicked: AtomicBool,
}

// SAFETY: `job` is written only by `join` while the state is EMPTY or DONE (the thread does not
// look at it then) and read only by the thread between POSTED and DONE (`join` does not touch
// it then); the SeqCst state changes order the two.
unsafe impl Sync for Shared {}
// SAFETY: the job pointer is sent to the thread only to be called there, and jobs are `Send`.
unsafe impl Send for Shared {}

/// One helper thread; see the module comment.
pub struct SpareCore {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SpareCore {
    /// Starts the thread, named `name`.
    pub fn new(name: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: AtomicU8::new(EMPTY),
            job: UnsafeCell::new(None),
            parked: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let theirs = Arc::clone(&shared);
        let thread = thread::Builder::new().name(name.into()).spawn(move || serve(&theirs))?;
        Ok(SpareCore { shared, thread: Some(thread) })
    }

    /// Runs `side` on the spare core while `main` runs here; returns `main`'s result once
    /// both are done (also when `main` panics: `side` may borrow from the caller). A panic
    /// in `side` is raised here.
    pub fn join<R>(&mut self, side: &mut (dyn FnMut() + Send), main: impl FnOnce() -> R) -> R {
        let s = &*self.shared;
        // SAFETY: the lifetime is erased only while this call waits for DONE (`Finish` waits
        // even when `main` unwinds), so the job never outlives what it borrows.
        let job: Job = unsafe { std::mem::transmute::<*mut (dyn FnMut() + Send + '_), Job>(side) };
        // SAFETY: the state is EMPTY (every join leaves it so): the thread does not read `job`.
        unsafe { *s.job.get() = Some(job) };
        s.state.store(POSTED, SeqCst);
        if s.parked.load(SeqCst) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        struct Finish<'a>(&'a Shared);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let started = Instant::now();
                while self.0.state.load(SeqCst) != DONE {
                    if started.elapsed() < IDLE {
                        std::hint::spin_loop();
                    } else {
                        thread::yield_now();
                    }
                }
                // SAFETY: DONE: the thread is finished with the job.
                unsafe { *self.0.job.get() = None };
                self.0.state.store(EMPTY, SeqCst);
            }
        }
        let finish = Finish(s);
        let out = main();
        drop(finish);
        if s.panicked.swap(false, SeqCst) {
            panic!("the job on the spare core panicked");
        }
        out
    }
}

impl Drop for SpareCore {
    fn drop(&mut self) {
        self.shared.state.store(EXIT, SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The thread: waits for a job (spinning, then parked), runs it, says DONE.
fn serve(s: &Shared) {
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
                    // Dekker with `join`: it stores POSTED then loads `parked`; this stores
                    // `parked` then loads the state; one of the two sees the other.
                    s.parked.store(true, SeqCst);
                    if s.state.load(SeqCst) == EMPTY {
                        thread::park_timeout(NAP);
                    }
                    s.parked.store(false, SeqCst);
                    idle_since = Instant::now();
                }
            }
        }
        // SAFETY: POSTED: `join` set the job and waits for DONE before it is dropped.
        let job = unsafe { (*s.job.get()).expect("a posted job") };
        // SAFETY: as above; the job is called once, by this thread only.
        let ok = panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job)() })).is_ok();
        s.panicked.store(!ok, SeqCst);
        s.state.store(DONE, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_the_side_job_alongside_and_waits_for_it() {
        let mut spare = SpareCore::new("test-spare").unwrap();
        let mut side_out = vec![0u64; 1000];
        for round in 0..200u64 {
            let main_out = spare.join(&mut || side_out.iter_mut().for_each(|v| *v += round), || round * 2);
            assert_eq!(main_out, round * 2);
            assert_eq!(side_out[999], (0..=round).sum::<u64>(), "the side job finished before join returned");
        }
    }

    #[test]
    fn the_side_job_runs_on_another_thread() {
        let mut spare = SpareCore::new("test-spare").unwrap();
        let mut name = None;
        spare.join(&mut || name = thread::current().name().map(String::from), || ());
        assert_eq!(name.as_deref(), Some("test-spare"));
    }

    #[test]
    fn a_parked_thread_wakes_for_the_next_job() {
        let mut spare = SpareCore::new("test-spare").unwrap();
        thread::sleep(IDLE * 5);
        assert!(spare.shared.parked.load(SeqCst), "idle long enough to park");
        let mut ran = false;
        let started = Instant::now();
        spare.join(&mut || ran = true, || ());
        assert!(ran);
        assert!(started.elapsed() < NAP, "woken by unpark, not by the nap running out");
    }

    #[test]
    fn a_panic_on_the_spare_core_is_raised_in_the_caller() {
        let mut spare = SpareCore::new("test-spare").unwrap();
        let caught = panic::catch_unwind(AssertUnwindSafe(|| spare.join(&mut || panic!("boom"), || ())));
        assert!(caught.is_err());
        // And it serves the next job.
        let mut ran = false;
        spare.join(&mut || ran = true, || ());
        assert!(ran);
    }
}
