//! Weights as safetensors with Keras's names and layout, and the full resume state; every
//! write is atomic (temp file, fsync, rename, fsync the directory).

use crate::callbacks::Callbacks;
use crate::config::JobConfig;
use crate::logs::{EpochLogs, Mean};
use crate::{CheckpointError, IoError};
use dtrain_nn::Sequential;
use dtrain_optim::{Optimizer, OptimizerConfig, OptimizerState, Slots};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let err = IoError::on(path, "write");
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn serialize(tensors: Vec<(String, Vec<usize>, Vec<u8>)>) -> Vec<u8> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).expect("shape matches the bytes")))
        .collect();
    safetensors::tensor::serialize(views, None).expect("in-memory serialization of valid tensors")
}

/// The model's weights as safetensors: `<layer>/kernel` [inputs, units] and `<layer>/bias`.
pub fn weights_bytes(model: &Sequential, params: &[f32]) -> Vec<u8> {
    serialize(
        model.variables().iter().map(|v| (v.name.clone(), v.shape.clone(), le_bytes(&params[v.range()]))).collect(),
    )
}

fn f32s(path: &Path, name: &str, t: &safetensors::tensor::TensorView) -> Result<Vec<f32>, CheckpointError> {
    if t.dtype() != Dtype::F32 {
        return Err(CheckpointError::invalid(path, format!("tensor {name} is {:?}, expected F32", t.dtype())));
    }
    Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Reads weights written by `weights_bytes` (or by Keras via safetensors with the same names),
/// refusing missing, extra, mis-shaped or non-finite tensors.
pub fn read_weights(path: &Path, model: &Sequential) -> Result<Vec<f32>, CheckpointError> {
    let bad = |why: String| CheckpointError::invalid(path, why);
    let bytes = std::fs::read(path).map_err(IoError::on(path, "read"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut params = vec![0.0; model.num_params()];
    for v in model.variables() {
        let t = st.tensor(&v.name).map_err(|_| bad(format!("missing tensor {} {:?}", v.name, v.shape)))?;
        if t.shape() != v.shape.as_slice() {
            return Err(bad(format!("tensor {} has shape {:?}, the model needs {:?}", v.name, t.shape(), v.shape)));
        }
        let data = f32s(path, &v.name, &t)?;
        if data.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!("tensor {} holds NaN or infinite values", v.name)));
        }
        params[v.range()].copy_from_slice(&data);
    }
    let known: Vec<&str> = model.variables().iter().map(|v| v.name.as_str()).collect();
    let mut extra: Vec<String> = st.names().into_iter().filter(|n| !known.contains(n)).map(str::to_string).collect();
    if !extra.is_empty() {
        extra.sort();
        return Err(bad(format!("tensors {extra:?} are not in the model (it has {known:?})")));
    }
    Ok(params)
}

/// Everything a run needs to continue bit-identically.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// The model's parameters.
    pub params: Vec<f32>,
    /// The optimizer with its slots.
    pub optimizer: Optimizer,
    /// The epoch in progress (0-based) and the batches of it already applied.
    pub epoch: usize,
    /// Batches of `epoch` already applied.
    pub batch: usize,
    /// Optimizer steps taken; keys the dropout masks.
    pub step: u64,
    /// The epoch's running loss.
    pub loss_mean: Mean,
    /// The epoch's running accuracy.
    pub acc_mean: Mean,
    /// Every finished epoch's logs.
    pub history: Vec<EpochLogs>,
    /// The callbacks and their state.
    pub callbacks: Callbacks,
    /// EarlyStopping's best weights, when it restores them.
    pub best_weights: Option<Vec<f32>>,
    /// EarlyStopping ended the run; more epochs will not continue it.
    pub stopped_early: bool,
}

impl TrainState {
    /// A run's state before its first step.
    pub fn new(params: Vec<f32>, optimizer: OptimizerConfig, initial_epoch: usize, callbacks: Callbacks) -> Self {
        let n = params.len();
        TrainState {
            params,
            optimizer: Optimizer::new(optimizer, n),
            epoch: initial_epoch,
            batch: 0,
            step: 0,
            loss_mean: Mean::default(),
            acc_mean: Mean::default(),
            history: vec![],
            callbacks,
            best_weights: None,
            stopped_early: false,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    tensors: String,
    tensors_len: u64,
    tensors_fnv1a64: String,
    epoch: usize,
    batch: usize,
    step: u64,
    iterations: u64,
    lr_override: Option<f32>,
    slots: Vec<String>,
    loss_mean: Mean,
    acc_mean: Mean,
    history: Vec<EpochLogs>,
    callbacks: Callbacks,
    has_best_weights: bool,
    stopped_early: bool,
    job: JobConfig,
}

/// The resume state's manifest in the run directory.
pub const STATE_FILE: &str = "state.json";

/// The resume state's format; 2 since callbacks name their monitor and BackupAndRestore is a
/// callback (a run saved in format 1 is finished with the dtrain that started it).
const STATE_FORMAT: u32 = 2;

/// FNV-1a, 64 bits, in hex: catches truncation and bit rot in the state tensors (a checksum,
/// not a cryptographic hash).
pub fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// What starts the last field of `state.json`: the checksum of every byte before it.
const CHECKSUM_FIELD: &str = ",\n  \"manifest_fnv1a64\": \"";

/// `doc` (a JSON object) with a last field holding the checksum of the bytes before that
/// field (what `save_state` writes). Over the bytes, not the values: re-reading numbers cannot
/// change it. Public for tests that edit a state on purpose and want to get past the checksum.
pub fn seal(doc: &[u8]) -> Vec<u8> {
    let end = doc.iter().rposition(|&b| b == b'}').unwrap_or(doc.len());
    let body = doc[..end].trim_ascii_end();
    let mut out = body.to_vec();
    out.extend_from_slice(format!("{CHECKSUM_FIELD}{}\"\n}}\n", fnv1a64(body)).as_bytes());
    out
}

/// Whether `text`'s checksum field matches the bytes before it (`None`: it has none, as
/// states saved before manifests had one).
fn seal_holds(text: &[u8]) -> Option<bool> {
    let marker = CHECKSUM_FIELD.as_bytes();
    let at = text.windows(marker.len()).rposition(|w| w == marker)?;
    let rest = &text[at + marker.len()..];
    let sum = rest.split(|&b| b == b'"').next().unwrap_or_default();
    Some(sum == fnv1a64(&text[..at]).as_bytes())
}

/// Writes the state: first a new tensor file named by step, then the manifest pointing to it
/// (atomically), then removes older tensor files. A crash never leaves a torn pair.
pub fn save_state(dir: &Path, state: &TrainState, job: &JobConfig) -> Result<(), IoError> {
    let n = state.params.len();
    let mut tensors = vec![("params".to_string(), vec![n], le_bytes(&state.params))];
    let os = state.optimizer.state();
    for (name, slot) in os.slots.named() {
        tensors.push((format!("optimizer/{name}"), vec![n], le_bytes(slot)));
    }
    if let Some(b) = &state.best_weights {
        tensors.push(("early_stopping/best_weights".into(), vec![n], le_bytes(b)));
    }
    let bytes = serialize(tensors);
    let tensor_name = format!("state-{:010}-{}.safetensors", state.step, state.epoch);
    write_atomic(&dir.join(&tensor_name), &bytes)?;
    let manifest = Manifest {
        format: STATE_FORMAT,
        tensors: tensor_name.clone(),
        tensors_len: bytes.len() as u64,
        tensors_fnv1a64: fnv1a64(&bytes),
        epoch: state.epoch,
        batch: state.batch,
        step: state.step,
        iterations: os.iterations,
        lr_override: os.lr_override,
        slots: os.slots.named().iter().map(|(name, _)| name.to_string()).collect(),
        loss_mean: state.loss_mean,
        acc_mean: state.acc_mean,
        history: state.history.clone(),
        callbacks: state.callbacks.clone(),
        has_best_weights: state.best_weights.is_some(),
        stopped_early: state.stopped_early,
        job: job.clone(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    write_atomic(&dir.join(STATE_FILE), &seal(&json))?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("state-") && name.ends_with(".safetensors") && name != tensor_name {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(())
}

/// Loads the state of `dir`, checking its checksum and that it belongs to `job` (whose
/// callbacks it continues, with their saved running state).
pub fn load_state(dir: &Path, job: &crate::Job) -> Result<TrainState, CheckpointError> {
    let (config, model, optimizer) = (&job.config, &job.model, &job.optimizer);
    let mpath = dir.join(STATE_FILE);
    let text = std::fs::read(&mpath).map_err(IoError::on(&mpath, "read the resume state"))?;
    if seal_holds(&text) == Some(false) {
        return Err(CheckpointError::invalid(&mpath, "checksum mismatch, the file is damaged"));
    }
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| CheckpointError::invalid(&mpath, format!("damaged resume state: {e}")))?;
    if m.format != STATE_FORMAT {
        return Err(CheckpointError::Format { path: mpath, found: m.format, supported: STATE_FORMAT });
    }
    // Everything in the manifest is checked before use: it is a file like any other.
    let plain = |n: &str| !n.contains(['/', '\\']) && !n.contains("..");
    if !(m.tensors.starts_with("state-") && m.tensors.ends_with(".safetensors") && plain(&m.tensors)) {
        let why = format!("tensors: {:?} is not a state file of this run directory", m.tensors);
        return Err(CheckpointError::invalid(&mpath, why));
    }
    // Callbacks are the job's; only their running state comes from the file.
    let callbacks = job.callbacks.resumed_from(&m.callbacks).map_err(|e| CheckpointError::invalid(&mpath, e))?;
    if m.history.len().checked_add(config.fit.initial_epoch) != Some(m.epoch) {
        let why = format!("epoch {} does not follow from {} epochs of history", m.epoch, m.history.len());
        return Err(CheckpointError::invalid(&mpath, why));
    }
    let mut same = m.job.clone();
    same.fit.epochs = config.fit.epochs;
    // Saved before the job file recorded the kernel (it was Haswell then, as `session` assumes).
    if same.fit.kernel.is_none() {
        same.fit.kernel.clone_from(&config.fit.kernel);
    }
    if &same != config {
        return Err(CheckpointError::OtherJob { path: mpath, job: dir.join(crate::run::JOB_FILE) });
    }
    let tpath: PathBuf = dir.join(&m.tensors);
    let bytes = std::fs::read(&tpath).map_err(IoError::on(&tpath, "read"))?;
    if bytes.len() as u64 != m.tensors_len || fnv1a64(&bytes) != m.tensors_fnv1a64 {
        return Err(CheckpointError::invalid(&tpath, "checksum mismatch, the file is damaged"));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| CheckpointError::invalid(&tpath, format!("damaged: {e}")))?;
    let n = model.num_params();
    let get = |name: &str| -> Result<Vec<f32>, CheckpointError> {
        let t = st.tensor(name).map_err(|_| CheckpointError::invalid(&tpath, format!("missing tensor {name}")))?;
        let v = f32s(&tpath, name, &t)?;
        if v.len() != n {
            let why = format!("tensor {name} has {} values, the model has {n} parameters", v.len());
            return Err(CheckpointError::invalid(&tpath, why));
        }
        Ok(v)
    };
    let want: Vec<&str> = Slots::new(&optimizer.algorithm, 0).named().iter().map(|(name, _)| *name).collect();
    if m.slots != want {
        let why = format!("optimizer slots {:?} do not match this optimizer's {want:?}", m.slots);
        return Err(CheckpointError::invalid(&mpath, why));
    }
    // Read (and checked) first, by the names this optimizer has, then handed over by name.
    let mut saved = want
        .iter()
        .map(|name| Ok((*name, get(&format!("optimizer/{name}"))?)))
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    let slots = Slots::restore(&optimizer.algorithm, n, |name| {
        saved.iter().position(|(n, _)| *n == name).map(|i| saved.swap_remove(i).1)
    })
    .map_err(|e| CheckpointError::invalid(&tpath, e.to_string()))?;
    let os = OptimizerState { iterations: m.iterations, lr_override: m.lr_override, slots };
    let optimizer = Optimizer::with_state(optimizer.clone(), os);
    Ok(TrainState {
        params: get("params")?,
        optimizer,
        epoch: m.epoch,
        batch: m.batch,
        step: m.step,
        loss_mean: m.loss_mean,
        acc_mean: m.acc_mean,
        history: m.history,
        callbacks,
        best_weights: if m.has_best_weights { Some(get("early_stopping/best_weights")?) } else { None },
        stopped_early: m.stopped_early,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_manifest_holds_until_a_byte_before_the_seal_changes() {
        let doc = b"{\n  \"epoch\": 3,\n  \"loss\": 0.10000000149011612\n}";
        let sealed = seal(doc);
        assert_eq!(seal_holds(&sealed), Some(true));
        let v: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
        assert_eq!(v["epoch"], 3, "still JSON, the same values");
        let mut flipped = sealed.clone();
        flipped[13] = b'4';
        assert_eq!(seal_holds(&flipped), Some(false));
        assert_eq!(seal_holds(doc), None, "saved before manifests had a checksum");
    }
}
