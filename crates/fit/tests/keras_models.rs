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

/// The seed job with its `[model]` replaced by `model.keras = file` (a job next to the fixtures).
fn job_with_keras_model(dir: &Path, file: &str) -> PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fashion_mnist.toml"))
        .unwrap();
    let start = text.find("[model]").unwrap();
    let end = start + text[start..].find("[compile]").unwrap();
    let model = format!("[model]\nkeras = {:?}\n\n", fixture(file).display().to_string());
    let job = dir.join("job.toml");
    std::fs::write(&job, format!("{}{model}{}", &text[..start], &text[end..])).unwrap();
    job
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
