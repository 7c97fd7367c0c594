//! Bad input: each case gets one line on stderr naming the file and the key or line, a
//! non-zero exit, and leaves existing run directories and checkpoints untouched.

mod common;
use common::*;
use std::path::Path;

/// Runs `train` and expects a one-line error containing every `needle`.
fn fails(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure for {args:?}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
}

fn job_with(dir: &Path, from: &str, to: &str) -> String {
    let p = write_job(dir, "");
    let text = std::fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    p.to_str().unwrap().to_string()
}

fn train_fails(from: &str, to: &str, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let job = job_with(dir.path(), from, to);
    let rd = dir.path().join("run");
    fails(&["train", "--config", &job, "--run-dir", rd.to_str().unwrap()], needles);
    assert!(!rd.exists(), "a failed run must not create its run directory");
}

#[test]
fn config_errors_name_the_file_and_key() {
    train_fails("seed = 7", "seed = 7\nsede = 1", &["job.toml:2:1", "unknown field `sede`"]);
    train_fails("type = \"Dropout\"", "type = \"Dropoot\"", &["job.toml:", "Dropoot"]);
    train_fails("rate = 0.3", "rate = 1.5", &["job.toml: model.layers[1].rate: 1.5 is outside [0, 1)"]);
    train_fails(
        "l2 = 0.01",
        "l2 = -0.01",
        &["model.layers[0].kernel_regularizer: l2: -0.01 must be a non-negative number"],
    );
    train_fails(
        "max_value = 2.0",
        "max_value = 0.0",
        &["model.layers[0].kernel_constraint: MaxNorm.max_value: 0 must be positive"],
    );
    train_fails(
        "learning_rate = 0.01,",
        "learning_rate = { ExponentialDecay = { initial_learning_rate = 0.1, decay_steps = 0, decay_rate = 0.9 } },",
        &["compile.optimizer: Adam.learning_rate.ExponentialDecay.decay_steps: must be at least 1"],
    );
    train_fails("batch_size = 8", "batch_size = 0", &["fit.batch_size: must be at least 1"]);
    train_fails(
        "activation = \"relu\"",
        "activation = \"relux\"",
        &["model.layers[0].activation: unknown activation \"relux\""],
    );
    train_fails("beta_1 = 0.89", "beta_1 = 0.89, rho = 0.9", &["Adam.rho: not an argument of Adam"]);
}

#[test]
fn data_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "");
    let job = job.to_str().unwrap();
    let csv = dir.path().join("train.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();

    lines[3] = "0.1,0.2,nan,0.4,1".into();
    std::fs::write(&csv, lines.join("\n")).unwrap();
    fails(&["train", "--config", job], &["train.csv: line 4, column 3: NaN is not finite"]);

    lines[3] = "0.1,0.2,0.4,1".into();
    std::fs::write(&csv, lines.join("\n")).unwrap();
    fails(&["train", "--config", job], &["train.csv: line 4: 4 columns, earlier lines have 5"]);

    lines[3] = "0.1,0.2,0.3,0.4,12".into();
    std::fs::write(&csv, lines.join("\n")).unwrap();
    fails(&["train", "--config", job], &["train.csv: label 12 (sample 2) is outside the output layer's 3 classes"]);

    let lines3: Vec<String> = text.lines().map(|l| l.rsplitn(2, ',').collect::<Vec<_>>().join(",")).collect();
    std::fs::write(&csv, lines3.join("\n")).unwrap();
    let o = run(&["train", "--config", job]);
    assert!(!o.status.success());
}

#[test]
fn idx_errors() {
    let dir = tempfile::tempdir().unwrap();
    let idx = dir.path().join("idx");
    std::fs::create_dir(&idx).unwrap();
    let header = |dims: &[u32]| {
        let mut v = vec![0u8, 0, 8, dims.len() as u8];
        dims.iter().for_each(|d| v.extend(d.to_be_bytes()));
        v
    };
    let mut img = header(&[3, 2, 2]);
    img.extend([0u8; 12]);
    let mut lbl = header(&[3]);
    lbl.extend([0u8, 1, 2]);
    std::fs::write(idx.join("train-images-idx3-ubyte"), &img[..img.len() - 5]).unwrap();
    std::fs::write(idx.join("train-labels-idx1-ubyte"), &lbl).unwrap();
    let job = dir.path().join("j.toml");
    std::fs::write(
        &job,
        "[data]\nformat = \"idx\"\npath = \"idx\"\n[model]\ninput_shape = [2, 2]\nlayers = [{ type = \"Flatten\" }, { type = \"Dense\", units = 3, activation = \"softmax\" }]\n[compile]\noptimizer = \"adam\"\nloss = \"sparse_categorical_crossentropy\"\n",
    )
    .unwrap();
    let j = job.to_str().unwrap();
    fails(
        &["train", "--config", j],
        &["train-images-idx3-ubyte: IDX header [3, 2, 2] promises 12 bytes of data, the file has 7"],
    );
    std::fs::write(idx.join("train-images-idx3-ubyte"), &img).unwrap();
    std::fs::write(idx.join("train-labels-idx1-ubyte"), &lbl[..lbl.len() - 1]).unwrap();
    fails(
        &["train", "--config", j],
        &["train-labels-idx1-ubyte: IDX header [3] promises 3 bytes of data, the file has 2"],
    );
    let mut lbl2 = header(&[2]);
    lbl2.extend([0u8, 1]);
    std::fs::write(idx.join("train-labels-idx1-ubyte"), &lbl2).unwrap();
    fails(&["train", "--config", j], &["2 labels, but", "has 3 images"]);
}

#[test]
fn weights_files_are_checked_and_runs_are_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "");
    let job = job.to_str().unwrap();
    let rd = dir.path().join("run");
    let r = rd.to_str().unwrap();
    assert!(run(&["train", "--config", job, "--run-dir", r, "-q", "--epochs", "1"]).status.success());
    let before: Vec<(String, Vec<u8>)> = snapshot(&rd);

    // A run directory that holds a run is refused without --resume.
    fails(&["train", "--config", job, "--run-dir", r], &["run directory is not empty; pass --resume"]);

    // Weights with a tensor missing, an extra one, or a wrong shape.
    let other = dir.path().join("other.toml");
    let text = std::fs::read_to_string(job).unwrap().replace("units = 8", "units = 9");
    std::fs::write(&other, text).unwrap();
    let w = rd.join("final.safetensors");
    let o2 = dir.path().join("o2");
    fails(
        &[
            "train",
            "--config",
            other.to_str().unwrap(),
            "--init-weights",
            w.to_str().unwrap(),
            "--run-dir",
            o2.to_str().unwrap(),
        ],
        &["final.safetensors: tensor dense/kernel has shape [4, 8], the model needs [4, 9]"],
    );
    assert!(!o2.exists());
    let garbage = dir.path().join("g.safetensors");
    std::fs::write(&garbage, b"not a tensor file").unwrap();
    fails(
        &["evaluate", "--config", job, "--weights", garbage.to_str().unwrap()],
        &["g.safetensors: not a valid safetensors file"],
    );

    // A damaged resume state is refused, and nothing in the run directory changes.
    let state = std::fs::read_dir(&rd)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("state-"))
        .unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();
    let before: Vec<(String, Vec<u8>)> =
        before.into_iter().map(|(n, b)| if rd.join(&n) == state { (n, bytes.clone()) } else { (n, b) }).collect();
    fails(
        &["train", "--config", job, "--run-dir", r, "--resume", "--epochs", "3"],
        &["checksum mismatch, the file is damaged"],
    );
    assert_eq!(snapshot(&rd), before, "a failed resume changed the run directory");

    // A resume state whose names point outside the run, whose callbacks are not the job's, or
    // whose counters disagree, is refused (these checks come before the tensors are read, so the
    // damaged tensor file is not reached). Callbacks come from the job, only their counters
    // from the state: a file name saved in it is never used (see below).
    let manifest = rd.join("state.json");
    let good = std::fs::read_to_string(&manifest).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v.as_object_mut().unwrap().remove("manifest_fnv1a64"); // sealed again after each edit
                                                           // An edit without the checksum is damage.
    let unsealed = good.replacen("\"epoch\": ", "\"epoch\": 1", 1);
    assert_ne!(unsealed, good);
    std::fs::write(&manifest, &unsealed).unwrap();
    fails(&["train", "--config", job, "--run-dir", r, "--resume"], &["state.json: checksum mismatch"]);
    // Edits with the checksum made to match reach the checks behind it.
    let tampered = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut t = v.clone();
        f(&mut t);
        std::fs::write(&manifest, dtrain_fit::checkpoint::seal(&serde_json::to_vec_pretty(&t).unwrap())).unwrap();
    };
    for (what, change, needle) in [
        (
            "tensors",
            &(|t: &mut serde_json::Value| t["tensors"] = "../../etc/passwd".into()) as &dyn Fn(&mut serde_json::Value),
            "is not a state file of this run directory",
        ),
        (
            "callbacks",
            &|t: &mut serde_json::Value| {
                let list = t["callbacks"]["list"].as_array_mut().unwrap();
                list.push(serde_json::json!({ "BackupAndRestore": { "every_batches": 1 } }));
            },
            "callbacks saved, the job has",
        ),
        ("epoch", &|t: &mut serde_json::Value| t["epoch"] = 7.into(), "does not follow from"),
    ] {
        tampered(change);
        fails(&["train", "--config", job, "--run-dir", r, "--resume", "--epochs", "3"], &["state.json", needle]);
        assert!(!dir.path().join("outside.csv").exists(), "{what}");
    }
    // A CSV file name pointing outside the run is not even read: the job's is used, and the
    // resume goes on to the (damaged) tensors.
    tampered(&|t: &mut serde_json::Value| t["callbacks"]["csv"]["filename"] = "../outside.csv".into());
    fails(&["train", "--config", job, "--run-dir", r, "--resume", "--epochs", "3"], &["checksum mismatch"]);
    assert!(!dir.path().join("outside.csv").exists());
    std::fs::write(&manifest, good).unwrap();

    // A different job cannot continue this run.
    fails(
        &["train", "--config", other.to_str().unwrap(), "--run-dir", r, "--resume"],
        &["started from a different job file"],
    );
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_diverging_loss_stops_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let job = job_with(dir.path(), "learning_rate = 0.01,", "learning_rate = 1e30,");
    let rd = dir.path().join("run");
    fails(&["train", "--config", &job, "--run-dir", rd.to_str().unwrap()], &["loss became", "training stopped"]);
}
