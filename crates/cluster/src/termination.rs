//! SIGTERM and Ctrl-C while the coordinator waits for workers: the wait ends at once (the
//! trainer then saves its state), instead of after `--worker-wait`.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The process's SIGTERM and SIGINT, watched from when this is made (so none is missed later).
pub struct Termination {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl Termination {
    /// Starts watching; must be called inside the runtime. A signal that cannot be watched is
    /// simply never reported (the trainer still checks its own flag between steps).
    pub fn watch() -> Termination {
        Termination { term: signal(SignalKind::terminate()).ok(), int: signal(SignalKind::interrupt()).ok() }
    }

    /// Completes when either signal arrives (or has arrived since `watch`).
    pub async fn arrived(&mut self) {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}
