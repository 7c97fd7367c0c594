//! Keras's evaluate on TensorFlow, reproduced bit for bit: the seed notebook's model as real
//! Keras saved it on TensorFlow, with Keras's initial weights and with the weights of one
//! epoch of Keras's own training (and those times 0.5 to 8), evaluated on the
//! Fashion-MNIST test set at batch sizes 32 (Keras's default) and 30; the losses and
//! accuracies Keras reported are in
//! `fixtures/tensorflow/evaluate.json` (written by `generate.py` beside it, which says how).

use dtrain_fit::evaluate::{evaluate, evaluate_as_tensorflow, predict, predict_as_tensorflow};
use dtrain_fit::session::load_job;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The seed job with its model read from the `.keras` file Keras saved on TensorFlow.
fn notebook_job(dir: &Path) -> dtrain_fit::Job {
    let seed = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/fashion_mnist.toml"))
        .unwrap();
    let (start, end) = (seed.find("[model]").unwrap(), seed.find("[compile]").unwrap());
    let keras = fixtures().join("keras_models/seed_notebook_tf.keras");
    let text = format!("{}[model]\nkeras = {:?}\n\n{}", &seed[..start], keras.display().to_string(), &seed[end..]);
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    load_job(&path, None, None, None).unwrap()
}

fn raw_weights(path: &Path) -> Vec<f32> {
    std::fs::read(path).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn keras_evaluate_on_tensorflow_is_reproduced_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let job = notebook_job(dir.path());
    let (_, test) = dtrain_fit::dataload::load_data(&job).unwrap();
    let test = test.expect("the seed job validates on the test set");
    assert_eq!(test.len(), 10_000);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tensorflow/evaluate.json")).unwrap()).unwrap();
    let threads = expected["cpus"].as_u64().unwrap() as usize;
    let cases = expected["evaluate"].as_object().unwrap();
    assert_eq!(cases.len(), 12);
    let mut dtrain_numerics_differ = 0;
    for (case, keras) in cases {
        let (weights, batch) = case.split_once('@').unwrap();
        let batch: usize = batch.parse().unwrap();
        let (file, factor) = weights.split_once('*').unwrap_or((weights, "1"));
        let factor: f32 = factor.parse().unwrap();
        let path = ["tensorflow", "keras_models"].iter().map(|d| fixtures().join(d).join(file)).find(|p| p.exists());
        let params: Vec<f32> = raw_weights(&path.unwrap()).iter().map(|w| w * factor).collect();
        assert_eq!(params.len(), job.model.num_params(), "{file}");
        let ours = evaluate_as_tensorflow(&job.model, &params, &test, batch, threads).unwrap();
        let bits = keras["loss_bits"].as_u64().unwrap() as u32;
        assert_eq!(ours.loss.to_bits(), bits, "{case}: loss {} against Keras's {}", ours.loss, f32::from_bits(bits));
        assert_eq!(ours.accuracy, keras["accuracy"].as_f64().unwrap() as f32, "{case}");
        // dtrain's own kernels agree to float rounding, not always to the bit: the fixture
        // holds a case the TensorFlow numerics are needed for.
        let own = evaluate(&job.model, &params, &test, batch);
        assert!((own.loss - ours.loss).abs() <= 1e-6 * ours.loss.abs(), "{case}: {} against {}", own.loss, ours.loss);
        dtrain_numerics_differ += usize::from(own.loss.to_bits() != bits);
    }
    assert!(dtrain_numerics_differ > 0, "every case is already equal with dtrain's numerics: the test shows nothing");
}

#[test]
fn keras_predict_on_tensorflow_is_reproduced_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let job = notebook_job(dir.path());
    let (_, test) = dtrain_fit::dataload::load_data(&job).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("tensorflow/evaluate.json")).unwrap()).unwrap();
    let keras = &expected["predict"];
    let rows = keras["rows"].as_u64().unwrap() as usize;
    let test = test.unwrap().subset(&(0..rows as u32).collect::<Vec<_>>());
    let params = raw_weights(&fixtures().join("tensorflow").join(keras["weights"].as_str().unwrap()));
    let theirs: Vec<u32> = keras["bits"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u32).collect();
    assert_eq!(theirs.len(), rows * 10);
    let ours: Vec<u32> =
        predict_as_tensorflow(&job.model, &params, &test, 32).unwrap().iter().map(|v| v.to_bits()).collect();
    assert_eq!(ours, theirs, "every output equal to Keras's predict on TensorFlow");
    // dtrain's own kernels round differently in most outputs: the test shows something.
    let own = predict(&job.model, &params, &test, 32);
    let same = own.iter().zip(&theirs).filter(|(o, t)| o.to_bits() == **t).count();
    assert!(same < theirs.len() / 2, "{same} of {} outputs already equal", theirs.len());
}

#[test]
fn a_model_tensorflow_evaluation_does_not_cover_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut job = notebook_job(dir.path());
    let (_, test) = dtrain_fit::dataload::load_data(&job).unwrap();
    let test = test.unwrap();
    let layers = [
        dtrain_nn::LayerSpec::Flatten,
        dtrain_nn::LayerSpec::Dense(dtrain_nn::DenseSpec {
            activation: dtrain_nn::Activation::Tanh,
            ..dtrain_nn::DenseSpec::new(8)
        }),
        dtrain_nn::LayerSpec::Dense(dtrain_nn::DenseSpec {
            activation: dtrain_nn::Activation::Softmax,
            ..dtrain_nn::DenseSpec::new(10)
        }),
    ];
    job.model = dtrain_nn::Sequential::new(&[28, 28], &layers, job.model.loss()).unwrap();
    let params = job.model.init_params(1);
    let e = evaluate_as_tensorflow(&job.model, &params, &test, 32, 2).unwrap_err().to_string();
    assert!(e.contains("layer dense: activation tanh"), "{e}");
    assert_eq!(e.lines().count(), 1);
}
