//! A coordinator killed (SIGKILL) in the middle of writing its resume state, with workers:
//! the test checks that a save was really in progress (its temporary file is left in the run
//! directory), then resumes and ends with the weights of a run that was never interrupted.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

/// A job whose state is large (about 1M parameters and Adam's two slots, 12 MB) and saved after
/// every batch, so that most of the run's time is spent saving.
fn heavy_job(dir: &Path) -> std::path::PathBuf {
    let job = write_job(dir, "shards = 2\n[[callbacks]]\nBackupAndRestore = { save_freq = 1 }\n");
    let text = std::fs::read_to_string(&job).unwrap().replace(
        "{ type = \"Dense\", units = 8,",
        "{ type = \"Dense\", units = 1000 },\n  { type = \"Dense\", units = 1000,",
    );
    assert!(text.contains("units = 1000"), "the heavy layers are in");
    std::fs::write(&job, text).unwrap();
    job
}

/// Files a save leaves behind when it is cut short (`write_atomic`'s temporary files).
fn torn(rd: &Path) -> Vec<String> {
    let names = std::fs::read_dir(rd).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
    names.filter(|n| n.starts_with('.') && n.contains(".tmp-")).collect()
}

#[test]
fn coordinator_killed_while_saving_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let job = heavy_job(dir.path());
    let local = dir.path().join("local");
    let o = run(&["train", "--config", job.to_str().unwrap(), "--run-dir", local.to_str().unwrap(), "-q", "--local"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(local.join("final.safetensors")).unwrap();
    // Kill at different moments until one lands inside a save.
    let mut killed_in_save = None;
    for attempt in 0..30u64 {
        let rd = dir.path().join(format!("run{attempt}"));
        let mut cmd = train(&job, &rd);
        cmd.args(["--spawn-workers", "1", "--log-format", "json"]);
        let c = Proc::start(cmd);
        c.wait_for("\"epoch\":1,", 120);
        std::thread::sleep(Duration::from_millis(37 * (attempt % 11)));
        c.signal(libc::SIGKILL);
        drop(c);
        if !torn(&rd).is_empty() && !rd.join("final.safetensors").exists() {
            eprintln!("attempt {attempt}: killed inside a save");
            killed_in_save = Some(rd);
            break;
        }
    }
    let rd = killed_in_save.expect("one of thirty kills landed inside a save");
    let left = torn(&rd);
    let mut cmd = coordinator();
    cmd.args(["train", "--run-dir", rd.to_str().unwrap(), "--resume", "--spawn-workers", "1", "--log-format", "json"]);
    let (ok, out) = Proc::start(cmd).finish(300);
    assert!(ok, "{out}");
    assert!(out.contains("Resuming at epoch"), "{out}");
    assert!(std::fs::read(rd.join("final.safetensors")).unwrap() == want, "a kill inside a save changed the weights");
    assert!(!left.is_empty(), "the save in progress when killed left {left:?}");
}
