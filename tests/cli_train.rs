//! The coordinator binary end to end: training, resume, evaluate, predict, summary.

mod common;
use common::*;

#[test]
fn resume_after_an_epoch_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "");
    let job = job.to_str().unwrap();
    let full = dir.path().join("full");
    let o = run(&["train", "--config", job, "--run-dir", full.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let part = dir.path().join("part");
    let p = part.to_str().unwrap();
    let o = run(&["train", "--config", job, "--run-dir", p, "--epochs", "1", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Continue from the run directory's own job file, with more epochs.
    let o = run(&["train", "--run-dir", p, "--resume", "--epochs", "3", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let a = std::fs::read(full.join("final.safetensors")).unwrap();
    let b = std::fs::read(part.join("final.safetensors")).unwrap();
    assert!(a == b, "resumed weights differ from an uninterrupted run");
    let ha = std::fs::read_to_string(full.join("history.csv")).unwrap();
    let hb = std::fs::read_to_string(part.join("history.csv")).unwrap();
    assert_eq!(ha, hb);
    assert_eq!(ha.lines().count(), 4, "header + each epoch once:\n{ha}");

    // --auto-resume starts a run in an empty directory, and continues it when restarted.
    let auto = dir.path().join("auto");
    std::fs::create_dir(&auto).unwrap();
    let x = auto.to_str().unwrap();
    for epochs in ["1", "3"] {
        let o = run(&["train", "--config", job, "--run-dir", x, "--auto-resume", "--epochs", epochs, "--quiet"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert!(std::fs::read(auto.join("final.safetensors")).unwrap() == a, "--auto-resume changed the weights");
}

/// The weights as f32 values, in the file's tensor order.
fn weights(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let data = names.iter().flat_map(|n| st.tensor(n).unwrap().data().to_vec()).collect::<Vec<u8>>();
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `fit.shards` changes the order in which per-sample gradients are added, so the weights
/// differ by rounding only; the thread count changes nothing at all.
#[test]
fn shards_change_nothing_but_rounding_and_threads_change_nothing_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut by_shards = vec![];
    for shards in [1, 3] {
        let sub = dir.path().join(format!("s{shards}"));
        std::fs::create_dir(&sub).unwrap();
        let job = write_job(&sub, &format!("shards = {shards}"));
        let mut finals = vec![];
        for t in ["1", "2", "3"] {
            let d = sub.join(format!("t{t}"));
            let o = run(&[
                "train",
                "--config",
                job.to_str().unwrap(),
                "--run-dir",
                d.to_str().unwrap(),
                "-q",
                "--threads",
                t,
            ]);
            assert!(o.status.success(), "{}", stderr(&o));
            finals.push(std::fs::read(d.join("final.safetensors")).unwrap());
        }
        assert!(
            finals[0] == finals[1] && finals[1] == finals[2],
            "thread count changed the weights (shards = {shards})"
        );
        by_shards.push(weights(&sub.join("t1/final.safetensors")));
    }
    let (one, three) = (&by_shards[0], &by_shards[1]);
    assert_eq!(one.len(), three.len());
    assert!(one != three, "1 and 3 shards add in different orders: some bit must differ");
    let worst = one.iter().zip(three).map(|(a, b)| (a - b).abs() / a.abs().max(1e-3)).fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "1 and 3 shards differ by more than rounding: relative {worst}");
}

#[test]
fn evaluate_predict_summary_and_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(
        dir.path(),
        "[[callbacks]]\nModelCheckpoint = { filepath = \"best-{epoch:02d}.safetensors\", save_best_only = true }\n",
    );
    let job = job.to_str().unwrap();
    let rd = dir.path().join("run");
    let o = run(&["train", "--config", job, "--run-dir", rd.to_str().unwrap(), "--log-format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect();
    assert_eq!(events.iter().filter(|e| e["event"] == "epoch_end").count(), 3);
    let last = events.iter().rfind(|e| e["event"] == "epoch_end").unwrap();
    for e in events.iter().filter(|e| e["event"] == "epoch_end") {
        // The steps' time is part of the epoch's (which also validates and saves; "seconds" is
        // rounded to milliseconds).
        let (steps, epoch) = (e["step_seconds"].as_f64().unwrap(), e["seconds"].as_f64().unwrap());
        assert!(steps > 0.0 && steps <= epoch + 0.0005, "{e}");
    }
    assert!(rd.join("best-01.safetensors").exists());
    let png = std::fs::read(rd.join("curves.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "curves.png is a drawn PNG");

    let w = rd.join("final.safetensors");
    let o = run(&["evaluate", "--config", job, "--weights", w.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ev["samples"], 30);
    // The final weights are the last epoch's, so evaluate reproduces its val_loss exactly.
    assert_eq!(ev["loss"].as_f64().unwrap() as f32, last["val_loss"].as_f64().unwrap() as f32);

    let input = dir.path().join("x.csv");
    std::fs::write(&input, "0.1,0.2,0.3,0.4\n0.9,0.8,0.7,0.6\n").unwrap();
    let o = run(&["predict", "--config", job, "--weights", w.to_str().unwrap(), "--input", input.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    let probs: f32 = text.lines().nth(1).unwrap().split(',').skip(1).map(|v| v.parse::<f32>().unwrap()).sum();
    assert!((probs - 1.0).abs() < 1e-5);

    let o = run(&["summary", "--config", job]);
    assert!(String::from_utf8(o.stdout).unwrap().contains("Total params: 67 (268.00 B)"));

    // `predict | head -1`: the reader goes away after one line; predict exits 0, silently.
    let many = dir.path().join("many.csv");
    std::fs::write(&many, "0.1,0.2,0.3,0.4\n".repeat(50_000)).unwrap();
    let mut child = coordinator()
        .args(["predict", "--config", job, "--weights", w.to_str().unwrap(), "--input", many.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    assert!(first.starts_with("class,output_0"), "{first}");
    let o = child.wait_with_output().unwrap(); // stdout was dropped above: later writes fail
    assert!(o.status.success(), "a closed pipe is not an error: {}", stderr(&o));
    assert_eq!(stderr(&o), "", "nothing to say about a closed pipe");
}

/// The seed job on the real Fashion-MNIST files, one epoch: it loads, trains and checkpoints;
/// and the same job with its model read from a Keras `to_json()` file gives the same weights.
#[test]
fn seed_job_runs_on_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let rd = dir.path().join("run");
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fashion_mnist.toml");
    let o =
        run(&["train", "--config", cfg, "--run-dir", rd.to_str().unwrap(), "--epochs", "1", "--log-format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let end: serde_json::Value = serde_json::from_str(out.lines().find(|l| l.contains("epoch_end")).unwrap()).unwrap();
    // Keras reaches about 0.80 validation accuracy after one epoch of this job.
    assert!(end["val_accuracy"].as_f64().unwrap() > 0.75, "{end}");
    assert!(rd.join("best.safetensors").exists() && rd.join("final.safetensors").exists());

    // The same model saved by Keras (`model.to_json()`) and named in the job instead of the
    // layers trains to the same weights, bit for bit.
    let text = std::fs::read_to_string(cfg).unwrap();
    let (start, end) = (text.find("[model]").unwrap(), text.find("[compile]").unwrap());
    let keras = concat!(env!("CARGO_MANIFEST_DIR"), "/crates/fit/tests/fixtures/keras_models/seed_model.json");
    let job = dir.path().join("keras_job.toml");
    std::fs::write(&job, format!("{}[model]\nkeras = {keras:?}\n\n{}", &text[..start], &text[end..])).unwrap();
    let rk = dir.path().join("keras_run");
    let o =
        run(&["train", "--config", job.to_str().unwrap(), "--run-dir", rk.to_str().unwrap(), "--epochs", "1", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = |d: &std::path::Path| std::fs::read(d.join("final.safetensors")).unwrap();
    assert!(weights(&rk) == weights(&rd), "a Keras model file trains like the same layers in the job");
}

/// The seed model as Keras saved it (`model.save()`, compiled with Adam on an ExponentialDecay
/// schedule) named in a job without `[compile]`: one epoch from it equals one epoch of the same
/// layers and compile settings written in the job, started with `--init-weights` from the
/// weights Keras saved (raw float32 beside the fixture), bit for bit.
#[test]
fn a_keras_file_gives_the_run_its_compile_settings_and_initial_weights() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/crates/fit/tests/fixtures/keras_models");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/fashion_mnist.toml")).unwrap();
    let (start, end) = (text.find("[model]").unwrap(), text.find("[fit]").unwrap());
    let keras = format!("{fixtures}/seed_model.keras");
    let from_keras = dir.path().join("from_keras.toml");
    std::fs::write(&from_keras, format!("{}[model]\nkeras = {keras:?}\n\n{}", &text[..start], &text[end..])).unwrap();
    let rk = dir.path().join("keras_run");
    let o =
        run(&["train", "--config", from_keras.to_str().unwrap(), "--run-dir", rk.to_str().unwrap(), "--epochs", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Initial weights:") || stderr(&o).contains("Initial weights:"));
    let job_toml = std::fs::read_to_string(rk.join("job.toml")).unwrap();
    assert!(job_toml.contains("ExponentialDecay") && !job_toml.contains("keras ="), "{job_toml}");

    // The same, written out: the layers of the seed job, Keras's compile settings, and
    // Keras's initial weights as safetensors.
    let compile = "[compile]\noptimizer = { Adam = { learning_rate = { ExponentialDecay = { initial_learning_rate = \
                   0.001, decay_steps = 100, decay_rate = 0.9 } } } }\nloss = \"sparse_categorical_crossentropy\"\n\
                   metrics = [\"accuracy\"]\n\n";
    let model_end = text.find("[compile]").unwrap();
    let written = dir.path().join("written.toml");
    std::fs::write(&written, format!("{}{compile}{}", &text[..model_end], &text[end..])).unwrap();
    let job = dtrain_fit::session::load_job(&written, None, None, None).unwrap();
    let raw = std::fs::read(format!("{fixtures}/seed_model.weights.f32")).unwrap();
    let params: Vec<f32> = raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let init = dir.path().join("init.safetensors");
    std::fs::write(&init, dtrain_fit::checkpoint::weights_bytes(&job.model, &params)).unwrap();
    let rw = dir.path().join("written_run");
    let args = ["train", "--config", written.to_str().unwrap(), "--run-dir", rw.to_str().unwrap(), "--epochs", "1"];
    let o = run(&[&args[..], &["-q", "--init-weights", init.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = |d: &std::path::Path| std::fs::read(d.join("final.safetensors")).unwrap();
    assert!(weights(&rk) == weights(&rw), "a .keras file trains like its layers, compile settings and weights");
}

/// `fit.validation_numerics = "tensorflow"`: each epoch's val_loss is computed with
/// TensorFlow's kernels' rounding, so `evaluate --numerics tensorflow` of the final weights
/// reproduces the last one exactly; a model those kernels are not reproduced for is refused
/// by key, and "auto" trains it with dtrain's, saying why.
#[test]
fn validation_numerics_tensorflow_gives_the_val_loss_of_evaluate_numerics_tensorflow() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "validation_numerics = \"tensorflow\"");
    let job = job.to_str().unwrap();
    // Seeds until one whose final weights dtrain's and TensorFlow's kernels evaluate a bit
    // apart: there the history's val_loss must be TensorFlow's.
    let mut apart = None;
    for seed in 1..=40 {
        let rd = dir.path().join(format!("run{seed}"));
        let o =
            run(&["train", "--config", job, "--run-dir", rd.to_str().unwrap(), "--seed", &seed.to_string(), "--quiet"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let history = std::fs::read_to_string(rd.join("history.csv")).unwrap();
        let head: Vec<&str> = history.lines().next().unwrap().split(',').collect();
        let at = head.iter().position(|c| *c == "val_loss").unwrap();
        let last: f32 = history.lines().last().unwrap().split(',').nth(at).unwrap().parse().unwrap();
        let w = rd.join("final.safetensors");
        let loss = |numerics: &str| {
            let o =
                run(&["evaluate", "--config", job, "--weights", w.to_str().unwrap(), "--json", "--numerics", numerics]);
            assert!(o.status.success(), "{}", stderr(&o));
            let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            ev["loss"].as_f64().unwrap() as f32
        };
        let (tensorflow, own) = (loss("tensorflow"), loss("dtrain"));
        assert_eq!(tensorflow, last, "seed {seed}");
        assert!((own - last).abs() <= 1e-6 * last.abs(), "seed {seed}");
        if own != tensorflow {
            apart = Some(seed);
            break;
        }
    }
    assert!(apart.is_some(), "no seed where the two numerics differ: the test would show nothing");

    let tanh = std::fs::read_to_string(job).unwrap().replace("activation = \"relu\"", "activation = \"tanh\"");
    std::fs::write(job, &tanh).unwrap();
    let o = run(&["train", "--config", job, "--run-dir", dir.path().join("r2").to_str().unwrap(), "--quiet"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("fit.validation_numerics: layer dense: activation tanh"), "{e}");
    std::fs::write(job, tanh.replace("\"tensorflow\"", "\"auto\"")).unwrap();
    let o = run(&["train", "--config", job, "--run-dir", dir.path().join("r3").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = format!("{}{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert!(
        said.contains("val_loss is computed with dtrain's kernels, not TensorFlow's: layer dense: activation tanh"),
        "{said}"
    );
}
