//! Resume in the middle of an epoch: a run that dies after a BackupAndRestore save continues
//! from it to the same bits as a run that never stopped.

use dtrain_data::{Dataset, Features, Labels};
use dtrain_fit::checkpoint::{load_state, TrainState};
use dtrain_fit::config::JobConfig;
use dtrain_fit::run::RunDir;
use dtrain_fit::{Console, Engine, Job, LocalEngine, LogFormat};
use dtrain_nn::ShardStats;
use std::ops::Range;
use std::path::PathBuf;

const JOB: &str = r#"
seed = 3
[data]
format = "npy"
x = "unused.npy"
y = "unused.npy"
[model]
input_shape = [5]
layers = [
  { type = "Dense", units = 16, activation = "relu", kernel_regularizer = "l2", activity_regularizer = "l1" },
  { type = "Dropout", rate = 0.5 },
  { type = "Dense", units = 4, activation = "softmax", kernel_constraint = "max_norm" },
]
[compile]
optimizer = { Adam = { learning_rate = { CosineDecayRestarts = { initial_learning_rate = 0.01, first_decay_steps = 7 } } } }
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
[fit]
batch_size = 10
epochs = 3
shards = 2
[[callbacks]]
BackupAndRestore = { save_freq = 4 }
[[callbacks]]
EarlyStopping = { monitor = "loss", patience = 5, restore_best_weights = true }
"#;

fn data() -> Dataset {
    let n = 95;
    let x: Vec<f32> = (0..n * 5).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
    let y: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
    Dataset::new(Features::F32(x), vec![5], Labels::Classes(y)).unwrap()
}

/// Fails at a given step, as if the process died there.
struct DiesAt<'a> {
    inner: LocalEngine<'a>,
    step: u64,
}

impl Engine for DiesAt<'_> {
    fn gradients(
        &mut self,
        p: &[f32],
        step: u64,
        b: &[u32],
        s: &[Range<usize>],
        o: &mut [f32],
        meanwhile: &mut dyn FnMut(),
    ) -> Result<Vec<ShardStats>, dtrain_fit::EngineError> {
        if step == self.step {
            return Err(dtrain_fit::EngineError::Stopped);
        }
        self.inner.gradients(p, step, b, s, o, meanwhile)
    }
}

#[test]
fn dies_mid_epoch_and_resumes_bit_identically() {
    let config: JobConfig = toml::from_str(JOB).unwrap();
    let job = Job::build(config, PathBuf::new()).unwrap();
    let train = data();
    let quiet = || Console::new(LogFormat::Quiet);
    let tmp = tempfile::tempdir().unwrap();

    let straight = RunDir::create(Some(&tmp.path().join("a")), "a").unwrap();
    let mut a = TrainState::new(job.model.init_params(job.seed), job.optimizer.clone(), 0, job.callbacks.clone());
    let mut engine = LocalEngine::new(&job.model, &train, job.seed, 2).unwrap();
    dtrain_fit::trainer::fit(&job, &train, None, &straight, &mut a, &mut engine, &mut quiet()).unwrap();

    // 10 steps an epoch; dies at step 14 (epoch 2, batch 5), after the backup at step 12.
    let broken = RunDir::create(Some(&tmp.path().join("b")), "b").unwrap();
    let mut b = TrainState::new(job.model.init_params(job.seed), job.optimizer.clone(), 0, job.callbacks.clone());
    let mut dies = DiesAt { inner: LocalEngine::new(&job.model, &train, job.seed, 1).unwrap(), step: 14 };
    let err = dtrain_fit::trainer::fit(&job, &train, None, &broken, &mut b, &mut dies, &mut quiet()).unwrap_err();
    assert!(matches!(err, dtrain_fit::FitError::Engine(dtrain_fit::EngineError::Stopped)), "{err}");

    let mut resumed = load_state(broken.path(), &job).unwrap();
    assert_eq!((resumed.epoch, resumed.batch, resumed.step), (1, 2, 12));
    // The resumed run gathers batches ahead: from the middle of an epoch, as from its start.
    let train = std::sync::Arc::new(train);
    let mut engine = LocalEngine::new(&job.model, &train, job.seed, 2).unwrap().with_lookahead(&train).unwrap();
    dtrain_fit::trainer::fit(&job, &train, None, &broken, &mut resumed, &mut engine, &mut quiet()).unwrap();
    assert!(engine.batches_gathered_ahead() > 0, "the resumed run used batches gathered ahead");

    assert_eq!(a.params, resumed.params, "weights differ after resume");
    assert_eq!(a.history, resumed.history);
    assert_eq!(a.optimizer.state(), resumed.optimizer.state());
    let fa = std::fs::read(straight.file("final.safetensors")).unwrap();
    let fb = std::fs::read(broken.file("final.safetensors")).unwrap();
    assert!(fa == fb, "final weights differ");
}
