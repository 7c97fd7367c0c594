//! Keras models as job models: `model.to_json()` files written by real Keras 3.15.1
//! (`fixtures/keras_models/gen_keras_models.py`) become the layers a job file lists, and what
//! dtrain would not compute as Keras does is refused in one line naming the layer and argument.

use dtrain_fit::config::JobConfig;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keras_models").join(name)
}

fn seed_job() -> JobConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fashion_mnist.toml");
    JobConfig::load(&path).unwrap()
}

/// The seed job with the text from `[model]` up to the section `upto` replaced by
/// `model.keras = file` and `more` (a job in `dir`).
fn job_with(dir: &Path, file: &str, upto: &str, more: &str) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fashion_mnist.toml"))
        .unwrap();
    let start = text.find("[model]").unwrap();
    let end = start + text[start..].find(upto).unwrap();
    let model = format!("[model]\nkeras = {:?}\n\n{more}\n", fixture(file).display().to_string());
    let job = dir.join("job.toml");
    std::fs::write(&job, format!("{}{model}{}", &text[..start], &text[end..])).unwrap();
    job
}

/// The seed job with its `[model]` replaced by `model.keras = file` (a job next to the fixtures).
fn job_with_keras_model(dir: &Path, file: &str) -> PathBuf {
    job_with(dir, file, "[compile]", "")
}

#[test]
fn the_seed_model_saved_by_keras_is_the_seed_jobs_model() {
    let text = std::fs::read_to_string(fixture("seed_model.json")).unwrap();
    let from_keras = dtrain_fit::keras::model_from_json(&text).unwrap();
    assert_eq!(from_keras, seed_job().model, "the same layers, arguments and defaults");
    // Named in a job file, it is read when the job is loaded; the run's copy lists the layers.
    let dir = tempfile::tempdir().unwrap();
    let job = JobConfig::load(&job_with_keras_model(dir.path(), "seed_model.json")).unwrap();
    assert_eq!(job.model, seed_job().model);
    assert!(job.to_toml().contains("input_shape = [28, 28]") && !job.to_toml().contains("keras ="));
}

#[test]
fn what_dtrain_would_compute_differently_is_refused_naming_the_layer() {
    let dir = tempfile::tempdir().unwrap();
    // (Keras numbers layer names within a session: the generator's later models say dense_3.)
    for (file, layer, says) in [
        ("unsupported_layer.json", "layers[2] (layer_normalization", "layer class LayerNormalization is not supported"),
        ("seeded_initializer.json", "layers[2] (dense", "kernel_initializer: seed 3 is not supported"),
        ("mixed_precision.json", "layers[2] (dense", "dtype policy mixed_float16 is not supported"),
    ] {
        let e = JobConfig::load(&job_with_keras_model(dir.path(), file)).unwrap_err();
        assert!(e.contains(file) && e.contains(layer) && e.contains(says), "{file}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
    let e = dtrain_fit::keras::model_from_json(r#"{"class_name": "Functional", "config": {}}"#).unwrap_err();
    assert_eq!(e, "a Functional model is not supported (Sequential only)");
}

/// The seed job with `[model]` and `[compile]` replaced by `model.keras = file` and `compile`.
fn job_with_keras_archive(dir: &Path, file: &str, compile: &str) -> PathBuf {
    job_with(dir, file, "[fit]", compile)
}

/// Whether the weights dtrain reads from the `.keras` fixture `archive` for `job`'s model are the
/// bytes of `raw` (the generator's little-endian float32 dump of Keras's weights).
fn weights_are(job: &dtrain_fit::Job, archive: &str, raw: &str) -> bool {
    let weights = dtrain_fit::keras_archive::weights(&fixture(archive), &job.model).unwrap();
    let got: Vec<u8> = weights.iter().flat_map(|x| x.to_le_bytes()).collect();
    got == std::fs::read(fixture(raw)).unwrap()
}

/// A `.keras` file saved by Keras (`model.save()`): the model, the compile config (Adam with an
/// ExponentialDecay schedule) where the job gives none, and its weights, bit for bit as Keras
/// held them, as the run's initial weights.
#[test]
fn a_keras_archive_gives_the_model_its_compile_config_and_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = job_with_keras_archive(dir.path(), "seed_model.keras", "");
    let config = JobConfig::load(&path).unwrap();
    assert_eq!(config.model, seed_job().model);
    let compile = toml::to_string(&config.compile).unwrap();
    assert!(
        compile.contains("loss = \"sparse_categorical_crossentropy\"") && compile.contains("metrics = [\"accuracy\"]")
    );
    assert!(compile.contains("ExponentialDecay") && compile.contains("decay_steps = 100"), "{compile}");
    assert_eq!(config.initial_weights.as_deref(), Some(fixture("seed_model.keras").as_path()));
    let job = dtrain_fit::Job::build(config, PathBuf::new()).unwrap();
    assert!(weights_are(&job, "seed_model.keras", "seed_model.weights.f32"), "the weights Keras saved, bit for bit");
    // The job's own [compile] keys win over the file's.
    let path = job_with_keras_archive(dir.path(), "seed_model.keras", "[compile]\noptimizer = \"sgd\"\n");
    let compile = toml::to_string(&JobConfig::load(&path).unwrap().compile).unwrap();
    assert!(
        compile.contains("optimizer = \"sgd\"") && compile.contains("sparse_categorical_crossentropy"),
        "{compile}"
    );
}

/// The notebook's model saved by Keras on the TensorFlow backend (`gen_seed_notebook_tf.py`):
/// the seed job's model and compile config (Adam with beta_1 0.89), and Keras's initial weights
/// bit for bit.
#[test]
fn a_keras_archive_saved_on_tensorflow_is_the_seed_jobs_model_and_compile_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = job_with_keras_archive(dir.path(), "seed_notebook_tf.keras", "");
    let config = JobConfig::load(&path).unwrap();
    assert_eq!(config.model, seed_job().model);
    // The file spells out Adam's defaults, which the job file leaves out: the same optimizer.
    assert_eq!(
        (&config.compile.loss, &config.compile.metrics),
        (&seed_job().compile.loss, &seed_job().compile.metrics)
    );
    let job = dtrain_fit::Job::build(config, PathBuf::new()).unwrap();
    let seed = dtrain_fit::Job::build(seed_job(), PathBuf::new()).unwrap();
    assert_eq!(job.optimizer, seed.optimizer, "Adam(0.001, beta_1=0.89)");
    let saved = weights_are(&job, "seed_notebook_tf.keras", "seed_notebook_tf.weights.f32");
    assert!(saved, "the weights Keras saved on TensorFlow, bit for bit");
}

/// A file that is not a `.keras` archive, or whose weights do not fit the model, is refused
/// in one line naming the file.
#[test]
fn a_broken_keras_archive_is_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_zip = dir.path().join("bad.keras");
    std::fs::write(&not_zip, b"not a zip").unwrap();
    let job = job_with_keras_archive(dir.path(), not_zip.to_str().unwrap(), "");
    let e = JobConfig::load(&job).unwrap_err();
    assert!(e.contains("bad.keras") && e.contains("not a .keras file"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // Weights of another model: named tensor, shapes.
    let text = std::fs::read_to_string(fixture("seed_model.json")).unwrap().replace("\"units\": 64", "\"units\": 32");
    let model = dtrain_fit::keras::model_from_json(&text).unwrap();
    let mut config = seed_job();
    config.model = model;
    let job = dtrain_fit::Job::build(config, PathBuf::new()).unwrap();
    let e = dtrain_fit::keras_archive::weights(&fixture("seed_model.keras"), &job.model).unwrap_err();
    assert!(e.contains("layers/dense/vars/0 has shape [784, 64], the model needs [784, 32]"), "{e}");
}

/// What dtrain writes as a `.keras` file reads back as the same layers and weights (Keras
/// itself opens it in CI: tests/keras/check_keras_files.py).
#[test]
fn a_written_keras_file_reads_back_as_the_same_model_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let config = seed_job();
    let job = dtrain_fit::Job::build(config.clone(), PathBuf::new()).unwrap();
    let params = job.model.init_params(5);
    let bytes = dtrain_fit::keras_archive::keras_bytes(&config, &job.model, &params, None).unwrap();
    let file = dir.path().join("written.keras");
    std::fs::write(&file, bytes).unwrap();
    let text = dtrain_fit::keras_archive::config(&file).unwrap();
    assert_eq!(dtrain_fit::keras::model_from_json(&text).unwrap(), config.model);
    // The compile settings too: read back as the job's [compile].
    let keys = dtrain_fit::keras_archive::compile_keys(&text).unwrap();
    let compile: dtrain_fit::config::CompileConfig = serde_json::from_value(serde_json::Value::Object(keys)).unwrap();
    assert_eq!(compile, config.compile);
    let back = dtrain_fit::keras_archive::weights(&file, &job.model).unwrap();
    assert!(back.iter().zip(&params).all(|(a, b)| a.to_bits() == b.to_bits()) && back.len() == params.len());
}

/// The seed job, built, with initial weights and a fresh optimizer.
fn seed_with_fresh_optimizer() -> (JobConfig, dtrain_fit::Job, Vec<f32>, dtrain_optim::Optimizer) {
    let config = seed_job();
    let job = dtrain_fit::Job::build(config.clone(), PathBuf::new()).unwrap();
    let params = job.model.init_params(5);
    let optimizer = dtrain_optim::Optimizer::new(job.optimizer.clone(), params.len());
    (config, job, params, optimizer)
}

/// The optimizer's state dtrain writes into a `.keras` file reads back as the same state (the
/// iteration count, a learning rate set at run time, Adam's moments bit for bit); a file whose
/// optimizer never stepped (Keras saved it compiled, before fit) has a state of another shape,
/// which is skipped as Keras skips it.
#[test]
fn the_optimizer_state_in_a_keras_file_reads_back() {
    use dtrain_fit::keras_archive::{optimizer_state, SavedOptimizer};
    let dir = tempfile::tempdir().unwrap();
    let (config, job, mut params, mut optimizer) = seed_with_fresh_optimizer();
    let n = params.len();
    let ranges: Vec<_> = job.model.variables().iter().map(|v| v.range()).collect();
    for step in 0..3 {
        let mut grads: Vec<f32> = (0..n).map(|i| ((i * 7 + step) % 13) as f32 * 1e-3 - 6e-3).collect();
        optimizer.apply(&mut params, &mut grads, &ranges);
    }
    optimizer.set_learning_rate(0.0005);
    let bytes = dtrain_fit::keras_archive::keras_bytes(&config, &job.model, &params, Some(&optimizer)).unwrap();
    let file = dir.path().join("trained.keras");
    std::fs::write(&file, bytes).unwrap();
    match optimizer_state(&file, &job.model, &job.optimizer).unwrap() {
        SavedOptimizer::State(state) => {
            assert_eq!(state.iterations, 3);
            assert_eq!(state.lr_override, Some(0.0005));
            assert_eq!(&state, optimizer.state(), "the same moments, bit for bit");
        }
        other => panic!("{other:?}"),
    }
    // Written without one: no optimizer group.
    let bytes = dtrain_fit::keras_archive::keras_bytes(&config, &job.model, &params, None).unwrap();
    std::fs::write(&file, bytes).unwrap();
    assert_eq!(optimizer_state(&file, &job.model, &job.optimizer).unwrap(), SavedOptimizer::Absent);
    // Keras's own file, saved before fit: the iteration count alone (its rate is a schedule).
    let keras = dtrain_fit::Job::build(
        JobConfig::load(&job_with_keras_archive(dir.path(), "seed_model.keras", "")).unwrap(),
        PathBuf::new(),
    )
    .unwrap();
    let saved = optimizer_state(&fixture("seed_model.keras"), &keras.model, &keras.optimizer).unwrap();
    assert_eq!(saved, SavedOptimizer::Unfit { saved: 1, expected: 9 });
}

/// Writes a dataset named `name` into a group.
type WriteVar = dyn Fn(&hdf5::Group, &str) -> hdf5::Result<()>;

/// An optimizer state of the right count but a wrong variable (shape, type, a non-finite value, a
/// negative iteration count) is refused in one line naming the variable; nothing is guessed.
#[test]
fn a_broken_optimizer_state_is_refused_naming_the_variable() {
    use dtrain_fit::keras_archive::optimizer_state;
    let dir = tempfile::tempdir().unwrap();
    let (config, job, params, optimizer) = seed_with_fresh_optimizer();
    let good = dtrain_fit::keras_archive::keras_bytes(&config, &job.model, &params, Some(&optimizer)).unwrap();
    // Rewrites dataset `optimizer/vars/<i>` of the archive's weights file with `write`.
    let broken = |i: usize, write: &WriteVar| -> PathBuf {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&good)).unwrap();
        let h5_path = dir.path().join("w.h5");
        std::io::copy(&mut zip.by_name("model.weights.h5").unwrap(), &mut std::fs::File::create(&h5_path).unwrap())
            .unwrap();
        {
            let h5 = hdf5::File::open_rw(&h5_path).unwrap();
            let vars = h5.group("optimizer/vars").unwrap();
            vars.unlink(&i.to_string()).unwrap();
            write(&vars, &i.to_string()).unwrap();
        }
        let out = dir.path().join(format!("broken-{i}.keras"));
        let mut w = zip::ZipWriter::new(std::fs::File::create(&out).unwrap());
        for name in ["metadata.json", "config.json", "model.weights.h5"] {
            w.start_file(name, zip::write::SimpleFileOptions::default()).unwrap();
            let bytes = match name {
                "model.weights.h5" => std::fs::read(&h5_path).unwrap(),
                _ => {
                    let mut s = Vec::new();
                    std::io::Read::read_to_end(&mut zip.by_name(name).unwrap(), &mut s).unwrap();
                    s
                }
            };
            std::io::Write::write_all(&mut w, &bytes).unwrap();
        }
        w.finish().unwrap();
        out
    };
    let cases: [(usize, &WriteVar, &str); 4] = [
        (0, &|g, n| g.new_dataset::<i64>().create(n)?.write_scalar(&-3i64), "iteration count -3 is negative"),
        (1, &|g, n| g.new_dataset::<f32>().create(n)?.write_scalar(&f32::NAN), "learning rate NaN"),
        (2, &|g, n| g.new_dataset::<f32>().shape([64, 784]).create(n).map(|_| ()), "is not float32 of shape [784, 64]"),
        (3, &|g, n| g.new_dataset::<f64>().shape([784, 64]).create(n).map(|_| ()), "is not float32 of shape [784, 64]"),
    ];
    for (i, write, says) in cases {
        let file = broken(i, write);
        let e = optimizer_state(&file, &job.model, &job.optimizer).unwrap_err();
        assert!(e.contains(&format!("optimizer/vars/{i}")) && e.contains(says), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
