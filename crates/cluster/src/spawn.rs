//! `--spawn-workers N`: local worker processes, killed when the coordinator is done with them.

use dtrain_fit::IoError;
use std::process::{Child, Command, Stdio};

/// Worker processes this coordinator started; stopped when dropped.
pub struct LocalWorkers {
    children: Vec<Child>,
}

impl LocalWorkers {
    /// Starts `n` copies of the `worker` binary that sits beside this executable; with
    /// `peers`, each with a peer port on loopback (for chains).
    pub fn spawn(n: usize, coordinator: &str, token: Option<&str>, peers: bool) -> Result<LocalWorkers, IoError> {
        let exe = std::env::current_exe().map_err(IoError::on(std::path::Path::new("/proc/self/exe"), "resolve"))?;
        let worker = exe.with_file_name("worker");
        let mut children = Vec::new();
        for i in 0..n {
            let mut cmd = Command::new(&worker);
            cmd.args(["--coordinator", coordinator, "--name", &format!("local-{i}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            if peers {
                cmd.args(["--peer-listen", "127.0.0.1:0"]);
            }
            if let Some(t) = token {
                cmd.env("DTRAIN_TOKEN", t);
            }
            die_with_parent(&mut cmd);
            let child = cmd.spawn().map_err(IoError::on(&worker, "start a worker"))?;
            children.push(child);
        }
        Ok(LocalWorkers { children })
    }
}

/// The worker gets SIGKILL when the thread that started it ends, so a coordinator killed
/// without a chance to clean up (SIGKILL, a crash) leaves no worker behind.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // async-signal-safe calls prctl(2) and getppid(2); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then no signal would come.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("the coordinator exited while starting its workers"));
            }
            Ok(())
        });
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        for c in &mut self.children {
            // The engine has told every worker to stop and waited for their streams to close,
            // so a worker still running now is stuck: it is killed, then reaped.
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}
