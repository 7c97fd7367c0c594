//! Parity with real Keras 3.15.1 / TF 2.21: fixtures from tests/fixtures/gen_keras_fixtures.py.
//! Tolerances are stated per test; they cover float32 rounding-order differences only.

use dtrain_data::{Dataset, Features, Labels};
use dtrain_fit::build::{callbacks, Job};
use dtrain_fit::callbacks::{Action, Callback};
use dtrain_fit::checkpoint::TrainState;
use dtrain_fit::config::{CallbackConfig, JobConfig};
use dtrain_fit::evaluate::evaluate;
use dtrain_fit::logs::EpochLogs;
use dtrain_fit::run::RunDir;
use dtrain_fit::{Console, LocalEngine, LogFormat};
use dtrain_nn::{Mode, Targets, Workspace};
use dtrain_optim::Schedule;
use ndarray::Array2;
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keras_parity.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// keras_more.json (gen_keras_more.py).
fn more_fixture() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/keras_more.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The cases of `section` in keras_parity.json and keras_more.json.
fn cases(section: &str) -> Vec<Value> {
    let mut all = fixture()[section].as_array().unwrap().clone();
    all.extend(more_fixture()[section].as_array().unwrap().iter().cloned());
    all
}

fn floats(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap() as f32],
        _ => panic!("not a number array: {v}"),
    }
}

fn matrix(v: &Value) -> Array2<f32> {
    let rows = v.as_array().unwrap().len();
    let data = floats(v);
    Array2::from_shape_vec((rows, data.len() / rows), data).unwrap()
}

/// A job around the fixture's layers; data paths are placeholders (data is passed directly).
fn job(model: &Value, inputs: usize, loss: impl Into<Value>, optimizer: Value, epochs: usize, batch: usize) -> Job {
    let loss: Value = loss.into();
    let cfg = json!({
        "seed": 1,
        "data": {"format": "npy", "x": "unused.npy", "y": "unused.npy"},
        "model": {"input_shape": [inputs], "layers": model["layers"]},
        "compile": {"optimizer": optimizer, "loss": loss, "metrics": ["accuracy"]},
        "fit": {"batch_size": batch, "epochs": epochs, "shuffle": false},
    });
    let config: JobConfig = serde_json::from_value(cfg).unwrap();
    Job::build(config, PathBuf::new()).unwrap()
}

fn params(model: &Value) -> Vec<f32> {
    floats(&model["weights"])
}

fn dataset(x: &Value, y: &Value) -> Dataset {
    let x = matrix(x);
    let labels = if y.as_array().unwrap()[0].is_array() {
        let t = matrix(y);
        Labels::Values { width: t.ncols(), data: t.into_raw_vec_and_offset().0 }
    } else {
        Labels::Classes(y.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
    };
    let w = x.ncols();
    Dataset::new(Features::F32(x.into_raw_vec_and_offset().0), vec![w], labels).unwrap()
}

fn close(a: f32, b: f32, abs: f32, rel: f32) -> bool {
    (a - b).abs() <= abs + rel * b.abs()
}

fn assert_all_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(close(*a, *b, abs, rel), "{what}[{i}]: dtrain {a} vs keras {b} (worst |diff| {worst})");
    }
}

/// Forward pass, total loss (every regularizer), gradients, and evaluate's loss over a ragged
/// last batch. Tolerances: outputs 1e-6 + 1e-5 rel; losses 1e-5 rel; gradients 1e-6 + 1e-4 rel.
#[test]
fn forward_loss_and_gradients() {
    for case in &cases("forward") {
        let name = case["name"].as_str().unwrap();
        let x = matrix(&case["x"]);
        let data = dataset(&case["x"], &case["y"]);
        let j = job(&case["model"], x.ncols(), case["loss"].clone(), json!("sgd"), 1, 6);
        let m = &j.model;
        let p = params(&case["model"]);
        let mut ws = Workspace::default();
        m.forward(&p, x.view(), Mode::Infer, &mut ws);
        let pred: Vec<f32> = m.output(&ws).iter().copied().collect();
        assert_all_close(&format!("{name} pred"), &pred, &floats(&case["pred"]), 1e-6, 1e-5);

        let classes: Vec<u32>;
        let values: Array2<f32>;
        let targets = match &data.labels {
            Labels::Classes(c) => {
                classes = c.clone();
                Targets::Classes(&classes)
            }
            Labels::Values { .. } => {
                values = matrix(&case["y"]);
                Targets::Values(values.view())
            }
        };
        let n = x.nrows() as f64;
        let mut g = vec![0.0; p.len()];
        let mode = Mode::Train { seed: 0, step: 0, first_position: 0, global_batch: n as u32 };
        let s = m.gradient(&p, x.view(), targets, mode, &mut ws, &mut g);
        m.weight_penalty_and_grad(&p, &mut g);
        let total = (s.loss_sum / n + s.activity / n + m.weight_penalty(&p)) as f32;
        let want = case["total_loss"].as_f64().unwrap() as f32;
        assert!(close(total, want, 0.0, 1e-5), "{name}: total loss {total} vs keras {want}");
        assert_all_close(&format!("{name} grads"), &g, &floats(&case["grads"]), 1e-6, 1e-4);

        let ev = evaluate(m, &p, &data, 4).loss;
        let want = case["evaluate_loss_batch4"].as_f64().unwrap() as f32;
        assert!(close(ev, want, 0.0, 1e-5), "{name}: evaluate loss {ev} vs keras {want}");
    }
}

fn run_fit(j: &Job, p: Vec<f32>, train: &Dataset, val: Option<&Dataset>) -> (TrainState, Vec<EpochLogs>) {
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(Some(&dir.path().join("run")), "t").unwrap();
    let mut state = TrainState::new(p, j.optimizer.clone(), 0, j.callbacks.clone());
    let mut engine = LocalEngine::new(&j.model, train, j.seed, 1).unwrap();
    let mut quiet = Console::new(LogFormat::Quiet);
    dtrain_fit::trainer::fit(j, train, val, &run, &mut state, &mut engine, &mut quiet).unwrap();
    let h = state.history.clone();
    (state, h)
}

/// 1-5 optimizer steps through the real training loop (one batch an epoch): Adam, AdamW,
/// SGD nesterov with a schedule, RMSprop centered with momentum, Adagrad, amsgrad; clipnorm,
/// global_clipnorm, clipvalue; MaxNorm, UnitNorm, NonNeg, MinMaxNorm after every update.
/// Tolerances: weights 2e-6 + 1e-4 rel; loss 1e-5 rel; learning rate 1e-6 rel.
#[test]
fn optimizer_steps_with_constraints() {
    for case in &cases("steps") {
        let name = case["name"].as_str().unwrap();
        let data = dataset(&case["x"], &case["y"]);
        let losses = floats(&case["losses"]);
        let lrs = floats(&case["lrs"]);
        for (k, want_w) in case["weights"].as_array().unwrap().iter().enumerate() {
            let j = job(&case["model"], 4, "sparse_categorical_crossentropy", case["optimizer"].clone(), k + 1, 8);
            let (state, h) = run_fit(&j, params(&case["model"]), &data, None);
            assert_all_close(&format!("{name} step {} weights", k + 1), &state.params, &floats(want_w), 2e-6, 1e-4);
            assert!(
                close(h[k].loss, losses[k], 0.0, 1e-5),
                "{name} step {}: loss {} vs {}",
                k + 1,
                h[k].loss,
                losses[k]
            );
            if k + 1 < lrs.len() {
                assert!(close(h[k].learning_rate, lrs[k + 1], 0.0, 1e-6), "{name}: lr after step {}", k + 1);
            }
        }
    }
}

/// Every schedule over 60 steps. Tolerance: 1e-6 relative (+1e-9 absolute).
#[test]
fn schedules() {
    for case in fixture()["schedules"].as_array().unwrap() {
        let s: Schedule = serde_json::from_value(case["schedule"].clone()).unwrap();
        s.validate().unwrap();
        for (k, want) in floats(&case["lrs"]).into_iter().enumerate() {
            let got = s.at(k as u64);
            assert!(close(got, want, 1e-9, 1e-6), "{:?} step {k}: {got} vs keras {want}", case["schedule"]);
        }
    }
}

/// EarlyStopping traces (patience, min_delta, baseline, restore_best_weights with and without
/// a stop, start_from_epoch): epochs run, stopped epoch and restored weights match exactly.
#[test]
fn early_stopping_traces() {
    for case in fixture()["early_stopping"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg: CallbackConfig = serde_json::from_value(json!({ "EarlyStopping": case["args"] })).unwrap();
        let j = job(&json!({"layers": [{"type": "Dense", "units": 1}]}), 1, "mse", json!("sgd"), 1, 1);
        let mut cbs = callbacks(&[cfg], &j.optimizer).unwrap();
        let cb = &mut cbs.list[0];
        let (mut weights, mut snapshot, mut epochs_run) = (0usize, None, 0);
        for (e, v) in floats(&case["val_loss"]).into_iter().enumerate() {
            weights = e;
            epochs_run = e + 1;
            let logs = EpochLogs { epoch: e, val_loss: Some(v), ..Default::default() };
            let actions = cb.on_epoch_end(&logs, snapshot.is_some()).unwrap();
            if actions.contains(&Action::SnapshotWeights) {
                snapshot = Some(weights);
            }
            if actions.contains(&Action::Stop) {
                break;
            }
        }
        if cb.on_train_end(snapshot.is_some()).contains(&Action::RestoreSnapshot) {
            weights = snapshot.expect("restores only a snapshot it has");
        }
        let Callback::EarlyStopping(es) = cb else { panic!() };
        assert_eq!(epochs_run as u64, case["epochs_run"].as_u64().unwrap(), "{name}: epochs run");
        assert_eq!(es.stopped_epoch as u64, case["stopped_epoch"].as_u64().unwrap(), "{name}: stopped_epoch");
        assert_eq!(weights as u64, case["weights_epoch"].as_u64().unwrap(), "{name}: restored weights");
    }
}

/// model.fit over 3 epochs of 10 samples in batches of 4 (ragged last batch of 2), with L2,
/// activity L1, MaxNorm, Adam and validation data: the history and the final weights.
/// Tolerances: history values 2e-5 rel (+1e-6); weights 5e-6 + 1e-4 rel.
#[test]
fn multi_batch_epochs_with_ragged_last_batch() {
    let case = &fixture()["epoch"];
    let train = dataset(&case["x"], &case["y"]);
    let val = dataset(&case["val_x"], &case["val_y"]);
    let j = job(&case["model"], 4, "sparse_categorical_crossentropy", case["optimizer"].clone(), 3, 4);
    let (state, h) = run_fit(&j, params(&case["model"]), &train, Some(&val));
    let hist = &case["history"];
    for (e, logs) in h.iter().enumerate() {
        let checks = [
            ("loss", logs.loss),
            ("accuracy", logs.accuracy.unwrap()),
            ("val_loss", logs.val_loss.unwrap()),
            ("val_accuracy", logs.val_accuracy.unwrap()),
        ];
        for (key, got) in checks {
            let want = hist[key][e].as_f64().unwrap() as f32;
            assert!(close(got, want, 1e-6, 2e-5), "epoch {e} {key}: dtrain {got} vs keras {want}");
        }
    }
    assert_all_close("final weights", &state.params, &floats(&case["final_weights"]), 5e-6, 1e-4);
}

fn logs_with(epoch: usize, monitor: &str, v: f32) -> EpochLogs {
    let mut l = EpochLogs { epoch, learning_rate: 0.1, ..Default::default() };
    match monitor {
        "val_loss" => l.val_loss = Some(v),
        "val_accuracy" => l.val_accuracy = Some(v),
        m => panic!("monitor {m}"),
    }
    l
}

/// ReduceLROnPlateau traces (patience, factor, cooldown, min_lr, min_delta): the learning rate
/// after every epoch matches exactly.
#[test]
fn reduce_lr_on_plateau_traces() {
    for case in fixture()["reduce_lr"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let cfg: CallbackConfig = serde_json::from_value(json!({ "ReduceLROnPlateau": case["args"] })).unwrap();
        let j = job(
            &json!({"layers": [{"type": "Dense", "units": 1}]}),
            1,
            "mse",
            json!({"SGD": {"learning_rate": 0.1}}),
            1,
            1,
        );
        let mut cbs = callbacks(&[cfg], &j.optimizer).unwrap();
        let cb = &mut cbs.list[0];
        let mut lr = 0.1f32;
        for (e, (v, want)) in floats(&case["val_loss"]).into_iter().zip(floats(&case["lrs"])).enumerate() {
            let logs = EpochLogs { learning_rate: lr, ..logs_with(e, "val_loss", v) };
            for action in cb.on_epoch_end(&logs, false).unwrap() {
                if let Action::SetLearningRate(new) = action {
                    lr = new;
                }
            }
            assert_eq!(lr, want, "{name}: learning rate after epoch {e}");
        }
    }
}

/// ModelCheckpoint(save_best_only) traces: which epochs write a file, for min and max
/// monitors, mode = auto / min, and initial_value_threshold.
#[test]
fn model_checkpoint_traces() {
    for case in fixture()["checkpoints"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let monitor = case["monitor"].as_str().unwrap();
        let mut args = case["args"].clone();
        args["filepath"] = json!("w-{epoch:02d}.safetensors");
        args["monitor"] = json!(monitor);
        args["save_best_only"] = json!(true);
        let cfg: CallbackConfig = serde_json::from_value(json!({ "ModelCheckpoint": args })).unwrap();
        let j = job(&json!({"layers": [{"type": "Dense", "units": 1}]}), 1, "mse", json!("sgd"), 1, 1);
        let mut cbs = callbacks(&[cfg], &j.optimizer).unwrap();
        let cb = &mut cbs.list[0];
        let mut saved = vec![];
        for (e, v) in floats(&case["values"]).into_iter().enumerate() {
            let logs = logs_with(e, monitor, v);
            let actions = cb.on_epoch_end(&logs, false).unwrap();
            if let [Action::SaveWeights(name)] = &actions[..] {
                assert_eq!(*name, format!("w-{:02}.safetensors", e + 1));
                saved.push(e as u64 + 1);
            } else {
                assert_eq!(actions, vec![], "{name}: epoch {e}");
            }
        }
        let want: Vec<u64> = case["saved_epochs"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(saved, want, "{name}: saved epochs");
    }
}

/// A real Keras fit (keras_more.json, "fit"): validation_split 0.3 with validation_batch_size 3,
/// initial_epoch 1, EarlyStopping(patience 2, restore_best_weights) and a ModelCheckpoint every 3
/// batches named `w-{epoch:02d}-{batch:03d}`: the same epochs run, the same history, the same
/// checkpoint names, and final weights that are the best epoch's. Tolerances: history 2e-5 rel
/// (+1e-6); weights 5e-6 + 1e-4 rel.
#[test]
fn fit_with_validation_split_initial_epoch_restored_best_weights_and_batch_checkpoints() {
    let more = more_fixture();
    let case = &more["fit"];
    let cfg = json!({
        "seed": 1,
        "data": {"format": "npy", "x": "unused.npy", "y": "unused.npy"},
        "model": {"input_shape": [4], "layers": case["model"]["layers"]},
        "compile": {"optimizer": case["optimizer"], "loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]},
        "fit": {"batch_size": case["batch_size"], "epochs": case["epochs"], "shuffle": false,
                "initial_epoch": case["initial_epoch"], "validation_split": case["validation_split"],
                "validation_batch_size": case["validation_batch_size"]},
        "callbacks": [
            {"ModelCheckpoint": {"filepath": "w-{epoch:02d}-{batch:03d}.safetensors", "save_freq": 3}},
            {"EarlyStopping": {"monitor": "val_loss", "patience": 2, "restore_best_weights": true}},
        ],
    });
    let j = Job::build(serde_json::from_value::<JobConfig>(cfg).unwrap(), PathBuf::new()).unwrap();
    let (train, val) = dataset(&case["x"], &case["y"]).split_tail(j.fit.validation_split);
    let dir = tempfile::tempdir().unwrap();
    let run = RunDir::create(Some(&dir.path().join("run")), "t").unwrap();
    let mut state =
        TrainState::new(params(&case["model"]), j.optimizer.clone(), j.fit.initial_epoch, j.callbacks.clone());
    let mut engine = LocalEngine::new(&j.model, &train, j.seed, 1).unwrap();
    let mut quiet = Console::new(LogFormat::Quiet);
    dtrain_fit::trainer::fit(&j, &train, Some(&val), &run, &mut state, &mut engine, &mut quiet).unwrap();

    let hist = &case["history"];
    assert_eq!(state.history.len(), hist["loss"].as_array().unwrap().len(), "epochs run before the early stop");
    for (e, logs) in state.history.iter().enumerate() {
        assert_eq!(logs.epoch, e + 1, "epochs count from initial_epoch");
        for (key, got) in [
            ("loss", logs.loss),
            ("accuracy", logs.accuracy.unwrap()),
            ("val_loss", logs.val_loss.unwrap()),
            ("val_accuracy", logs.val_accuracy.unwrap()),
        ] {
            let want = hist[key][e].as_f64().unwrap() as f32;
            assert!(close(got, want, 1e-6, 2e-5), "epoch {} {key}: dtrain {got} vs keras {want}", e + 1);
        }
    }
    let mut written: Vec<String> = std::fs::read_dir(run.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("w-"))
        .collect();
    written.sort();
    let want: Vec<String> =
        case["checkpoints"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().into()).collect();
    assert_eq!(written, want, "batch-level checkpoint names");
    let final_weights = dtrain_fit::checkpoint::read_weights(&run.file("final.safetensors"), &j.model).unwrap();
    assert_all_close("restored best weights", &final_weights, &floats(&case["final_weights"]), 5e-6, 1e-4);
    assert!(final_weights != state.params, "the final weights are the best epoch's, not the last");
}
