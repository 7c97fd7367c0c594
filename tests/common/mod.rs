//! Helpers for tests that run the real binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The job token the tests' coordinators and workers share (through DTRAIN_TOKEN).
pub const TOKEN: &str = "test-token-0123456789abcdef";

/// The coordinator binary, with the tests' token in its environment.
pub fn coordinator() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_coordinator"));
    cmd.env("DTRAIN_TOKEN", TOKEN);
    cmd
}

/// `coordinator train --config job --run-dir run_dir`, to add flags to.
pub fn train(job: &Path, run_dir: &Path) -> Command {
    let mut cmd = coordinator();
    cmd.args(["train", "--config", job.to_str().unwrap(), "--run-dir", run_dir.to_str().unwrap()]);
    cmd
}

pub fn run(args: &[&str]) -> Output {
    coordinator().args(args).output().expect("coordinator runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small 3-class CSV dataset (label last), deterministic.
pub fn write_csv(path: &Path, n: usize) {
    let mut s = String::from("f0,f1,f2,f3,label\n");
    for i in 0..n {
        let c = i % 3;
        let v: Vec<String> =
            (0..4).map(|j| format!("{:.3}", ((i * 7 + j * 13) % 17) as f32 / 17.0 + c as f32 * 0.3)).collect();
        s += &format!("{},{c}\n", v.join(","));
    }
    std::fs::write(path, s).unwrap();
}

/// A job on `rows` rows of the tests' CSV in `dir` (`train.csv`), written to `dir/name`: two
/// ReLU layers of `units` (`dropout` between them if not 0), a softmax of 3, the `optimizer`
/// (a TOML table), and `[fit]` as `fit` says; its path.
pub fn write_mlp_job(
    dir: &Path,
    name: &str,
    rows: usize,
    units: usize,
    dropout: f32,
    optimizer: &str,
    fit: &str,
) -> String {
    write_csv(&dir.join("train.csv"), rows);
    let dropout =
        if dropout > 0.0 { format!("{{ type = \"Dropout\", rate = {dropout} }},\n  ") } else { String::new() };
    let job = format!(
        r#"seed = 3
[data]
format = "csv"
train = "train.csv"
label_column = -1
[model]
input_shape = [4]
layers = [
  {{ type = "Dense", units = {units}, activation = "relu" }},
  {dropout}{{ type = "Dense", units = {units}, activation = "relu" }},
  {{ type = "Dense", units = 3, activation = "softmax" }},
]
[compile]
optimizer = {optimizer}
loss = "sparse_categorical_crossentropy"
[fit]
{fit}
"#
    );
    let p = dir.join(name);
    std::fs::write(&p, job).unwrap();
    p.to_str().unwrap().to_string()
}

/// A job on `train.csv` / `test.csv` in `dir` with dropout, every regularizer and MaxNorm.
pub fn write_job(dir: &Path, extra: &str) -> PathBuf {
    write_csv(&dir.join("train.csv"), 90);
    write_csv(&dir.join("test.csv"), 30);
    let job = format!(
        r#"seed = 7
[data]
format = "csv"
train = "train.csv"
test = "test.csv"
label_column = -1
validation = "test"
[model]
input_shape = [4]
layers = [
  {{ type = "Dense", units = 8, activation = "relu", kernel_regularizer = {{ l2 = 0.01 }},
     activity_regularizer = {{ l1 = 0.01 }}, kernel_constraint = {{ MaxNorm = {{ max_value = 2.0 }} }} }},
  {{ type = "Dropout", rate = 0.3 }},
  {{ type = "Dense", units = 3, activation = "softmax" }},
]
[compile]
optimizer = {{ Adam = {{ learning_rate = 0.01, beta_1 = 0.89 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
[fit]
batch_size = 8
epochs = 3
{extra}
"#
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, job).unwrap();
    p
}

/// A child process that is killed when dropped, also when the test fails.
pub struct Proc {
    pub child: std::process::Child,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr read line by line into `lines`; the channel closes
    /// once both pipes are closed (the child and every process that inherited them are gone).
    pub fn start(mut cmd: Command) -> Proc {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("starts");
        let (tx, lines) = std::sync::mpsc::channel();
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Proc { child, lines }
    }

    /// Waits for a line containing `needle` (panics after `secs`); returns it.
    pub fn wait_for(&self, needle: &str, secs: u64) -> String {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => continue,
                Err(_) => panic!("no line with {needle:?} within {secs}s"),
            }
        }
    }

    /// Waits for a line with each of `needles`, in any order (panics after `secs`); returns
    /// them in the needles' order.
    pub fn wait_for_each(&self, needles: &[&str], secs: u64) -> Vec<String> {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut found: Vec<Option<String>> = vec![None; needles.len()];
        while found.iter().any(Option::is_none) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            let Ok(l) = self.lines.recv_timeout(left) else {
                panic!("no line with each of {needles:?} within {secs}s (found {found:?})")
            };
            if let Some(i) = (0..needles.len()).find(|&i| found[i].is_none() && l.contains(needles[i])) {
                found[i] = Some(l);
            }
        }
        found.into_iter().flatten().collect()
    }

    /// Waits for the process to exit and its output pipes to close (panics after `secs`);
    /// returns whether it succeeded, and everything it printed that was not read yet.
    pub fn finish(&mut self, secs: u64) -> (bool, String) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut rest = vec![];
        // Reading to the end of both pipes, not a fixed drain: nothing printed is ever missed.
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => rest.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("process still running after {secs}s; it printed:\n{}", rest.join("\n"))
                }
            }
        }
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(std::time::Instant::now() < until, "process still running after {secs}s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        (status.success(), rest.join("\n"))
    }

    /// Sends `sig` (e.g. `libc::SIGKILL`) to the process.
    pub fn signal(&self, sig: libc::c_int) {
        if let Err(e) = self.send_signal(sig) {
            panic!("kill({}, {sig}): {e}", self.child.id());
        }
    }

    fn send_signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) takes plain integers and touches no memory of ours; the child is not
        // reaped before `finish` or `drop`, so its pid cannot have been reused by another process.
        match unsafe { libc::kill(pid, sig) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.send_signal(libc::SIGCONT); // a stopped process must run to die
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker process with the tests' token, dialing `coordinator`.
pub fn worker(coordinator: &str, extra: &[&str]) -> Proc {
    worker_with(coordinator, extra, Some(TOKEN))
}

/// A worker process with `token` (or none) in its environment.
pub fn worker_with(coordinator: &str, extra: &[&str], token: Option<&str>) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_worker"));
    cmd.args(["--coordinator", coordinator, "--retry-for", "30"]).args(extra);
    cmd.env_remove("DTRAIN_TOKEN");
    if let Some(t) = token {
        cmd.env("DTRAIN_TOKEN", t);
    }
    Proc::start(cmd)
}

/// The address in the coordinator's `listening on 127.0.0.1:PORT` log line (text or JSON).
pub fn listening_url(p: &Proc) -> String {
    let line = p.wait_for("listening on ", 30);
    let addr = line.split("listening on ").nth(1).unwrap();
    let addr: String = addr.chars().take_while(|c| c.is_ascii_alphanumeric() || ".:[]".contains(*c)).collect();
    format!("http://{addr}")
}

/// Emulated hosts (`testbed/netns.sh`): network namespaces joined by a bridge, addresses that
/// exist only inside them; removed when this drops, also when a test fails.
pub struct Testbed {
    name: String,
}

impl Testbed {
    /// `hosts` hosts, each link capped at `rate` (e.g. "1gbit") if given. Fails with the
    /// script's message where namespaces cannot be made (it needs root / CAP_NET_ADMIN).
    pub fn up(hosts: usize, rate: Option<&str>) -> Testbed {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("dt{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        let bed = Testbed { name };
        let mut cmd = Command::new(Self::script());
        cmd.args(["up", &bed.name, &hosts.to_string()]).args(rate);
        let o = cmd.output().expect("testbed/netns.sh runs");
        assert!(o.status.success(), "emulated hosts unavailable: {}", stderr(&o));
        bed
    }

    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed/netns.sh")
    }

    /// Host `i`'s address.
    pub fn addr(i: usize) -> String {
        format!("10.250.0.{}", i + 1)
    }

    /// `program` run on host `i` (the environment passes through).
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new(Self::script());
        cmd.args(["exec", &self.name, &i.to_string(), program]);
        cmd
    }

    /// Takes host `i`'s link up or down.
    pub fn link(&self, i: usize, up: bool) {
        let o = Command::new(Self::script())
            .args(["link", &self.name, &i.to_string(), if up { "up" } else { "down" }])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(Self::script()).args(["down", &self.name]).output();
    }
}

/// An in-process run of `job` for `epochs` in `dir/local`; its final weights.
pub fn local_run(dir: &Path, job: &str, epochs: &str) -> Vec<u8> {
    let rd = dir.join("local");
    let o = run(&["train", "--config", job, "--run-dir", rd.to_str().unwrap(), "--epochs", epochs, "-q", "--local"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::read(rd.join("final.safetensors")).unwrap()
}

/// `coordinator train` of `job` into `rd` for `epochs`, JSON logs, with `extra` flags.
pub fn coordinator_proc(job: &str, rd: &Path, epochs: &str, extra: &[&str]) -> Proc {
    let mut cmd = train(job.as_ref(), rd);
    cmd.args(["--epochs", epochs, "--log-format", "json"]).args(extra);
    Proc::start(cmd)
}

/// A run directory's final weights.
pub fn finals(rd: &Path) -> Vec<u8> {
    std::fs::read(rd.join("final.safetensors")).unwrap()
}
