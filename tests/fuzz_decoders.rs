//! Every decoder of bytes from a file or a peer, fed mutated copies of a committed seed corpus
//! (`tests/fuzz_corpus/`) and of seed messages: each must return (Ok or a typed error) within a
//! second, never panic, and never abort on an allocation. A fixed number of cases per decoder
//! in CI; longer on demand:
//!
//!     DTRAIN_FUZZ_CASES=100000 cargo test --release --test fuzz_decoders
//!
//! A failing case is written to `target/fuzz-failures/` with the decoder's name, to replay.

use dtrain_data::{load_csv, load_idx_dir, load_npy, IdxSplit};
use dtrain_proto::{
    ChainRole, Chunk, ChunkStream, FromWorker, Hello, ShardResult, Tensor, ToWorker, Welcome, WireShard, Work,
};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn cases() -> u64 {
    std::env::var("DTRAIN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
}

fn corpus(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(dir)
}

/// xorshift64*: the same cases every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four mutations of `seed`: bit flips, boundary bytes, truncation, insertion, large
/// integers over what may be a length or a shape, and repeated chunks.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(v.len());
        match rng.below(6) {
            0 if !v.is_empty() => v[at] ^= 1 << rng.below(8),
            1 if !v.is_empty() => v[at] = [0u8, 0xff, 0x7f, 0x80, b'9', b'-', b'[', b'"'][rng.below(8)],
            2 => v.truncate(at),
            3 => {
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            4 if v.len() >= 8 => {
                let big = [u32::MAX, 0x7fff_ffff, 0x0001_0000, 0, 0x8000_0000][rng.below(5)];
                let at = at.min(v.len() - 4);
                let bytes = if rng.below(2) == 0 { big.to_be_bytes() } else { big.to_le_bytes() };
                v[at..at + 4].copy_from_slice(&bytes);
            }
            _ if !v.is_empty() => {
                let end = (at + 1 + rng.below(32)).min(v.len());
                let chunk = v[at..end].to_vec();
                v.splice(at..at, chunk);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

/// Feeds `cases()` mutations of each seed to `decode` (which says whether it accepted the
/// input); fails on a panic or a slow case, and unless the mutations were both accepted and
/// refused (a fuzzer that never gets past the first check, or never fails one, tests nothing).
fn fuzz(name: &str, seeds: &[Vec<u8>], decode: impl FnMut(&[u8]) -> bool) {
    let accepted = fuzz_any(name, seeds, decode);
    assert!(accepted > 0 && accepted < cases(), "{name}: {accepted} of {} mutations accepted", cases());
}

/// As `fuzz`, for inputs that almost no mutation leaves valid (JSON bytes): only no panic and
/// no slow case. Returns how many were accepted.
fn fuzz_any(name: &str, seeds: &[Vec<u8>], mut decode: impl FnMut(&[u8]) -> bool) -> u64 {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ name.len() as u64);
    let mut accepted = 0;
    for case in 0..cases() {
        let seed = &seeds[case as usize % seeds.len()];
        let input = mutate(&mut rng, seed);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decode(&input)));
        let slow = started.elapsed() > Duration::from_secs(1);
        if outcome.is_err() || slow {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{name}-{case}"));
            std::fs::write(&file, &input).unwrap();
            let what = if slow { format!("took {:?}", started.elapsed()) } else { "panicked".into() };
            panic!("{name}: case {case} {what}; input saved to {}", file.display());
        }
        accepted += u64::from(outcome.unwrap_or(false));
    }
    accepted
}

/// Decodes each mutated file in place of `file` in a copy of corpus `dir`.
fn fuzz_file(name: &str, dir: &str, file: &str, mut decode: impl FnMut(&Path) -> bool) {
    let work = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(corpus(dir)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), work.path().join(e.file_name())).unwrap();
    }
    let seed = std::fs::read(corpus(dir).join(file)).unwrap();
    let target = work.path().join(file);
    fuzz(name, &[seed], |bytes| {
        std::fs::write(&target, bytes).unwrap();
        decode(work.path())
    });
}

#[test]
fn the_seeds_decode() {
    assert_eq!(load_idx_dir(&corpus("idx"), IdxSplit::Train).unwrap().len(), 3);
    assert_eq!(load_idx_dir(&corpus("idx_gz"), IdxSplit::Train).unwrap().len(), 3);
    assert_eq!(load_npy(&corpus("npy").join("x.npy"), &corpus("npy").join("y.npy")).unwrap().len(), 3);
    assert_eq!(load_csv(&corpus("csv").join("train.csv"), -1, None).unwrap().len(), 3);
    let text = std::fs::read_to_string(corpus("job").join("job.toml")).unwrap();
    let config = dtrain_fit::config::JobConfig::parse(Path::new("job.toml"), &text).unwrap();
    dtrain_fit::Job::build(config, corpus("csv")).unwrap();
    for m in worker_messages() {
        dtrain_proto::worker_message_from_bytes(&m).unwrap();
    }
    for m in coordinator_messages() {
        dtrain_proto::coordinator_message_from_bytes(&m).unwrap();
    }
}

#[test]
fn idx_files() {
    for file in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        fuzz_file(&format!("idx-{file}"), "idx", file, |dir| load_idx_dir(dir, IdxSplit::Train).is_ok());
        // Compressed: decompressed only as far as the header says the file goes.
        fuzz_file(&format!("idx-gz-{file}"), "idx_gz", &format!("{file}.gz"), |dir| {
            load_idx_dir(dir, IdxSplit::Train).is_ok()
        });
    }
}

#[test]
fn npy_files() {
    for file in ["x.npy", "y.npy"] {
        fuzz_file(&format!("npy-{file}"), "npy", file, |dir| load_npy(&dir.join("x.npy"), &dir.join("y.npy")).is_ok());
    }
}

#[test]
fn csv_files() {
    fuzz_file("csv", "csv", "train.csv", |dir| {
        let _ = load_csv(&dir.join("train.csv"), 0, Some(&[2, 2]));
        load_csv(&dir.join("train.csv"), -1, None).is_ok()
    });
}

#[test]
fn job_files() {
    let seed = std::fs::read(corpus("job").join("job.toml")).unwrap();
    fuzz("job-toml", &[seed], |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let config = dtrain_fit::config::JobConfig::parse(Path::new("job.toml"), &text);
        config.is_ok_and(|c| dtrain_fit::Job::build(c, corpus("csv")).is_ok())
    });
}

/// Seed messages a worker sends.
fn worker_messages() -> Vec<Vec<u8>> {
    let result = ShardResult {
        step: 3,
        index: 1,
        gradient: Tensor::Inline(dtrain_proto::f32_bytes(&[0.5; 8])),
        claimed: dtrain_nn::ShardStats { loss_sum: 1.5, activity: 0.0, correct: 1, rows: 2 },
        compute_micros: 10,
    };
    let hello = Hello {
        protocol_version: dtrain_proto::PROTOCOL_VERSION,
        name: "w".into(),
        peer_address: Some("10.0.0.2:50052".into()),
    };
    let broken = FromWorker::Broken { step: 3, peer: "10.0.0.3:50052".into(), reason: "refused".into() };
    let digest = FromWorker::Digest { step: 3, received: 4, sent: 5 };
    [
        FromWorker::Hello(hello),
        FromWorker::Result(result),
        FromWorker::Attached,
        FromWorker::Chunk(chunk()),
        broken,
        digest,
    ]
    .into_iter()
    .map(dtrain_proto::worker_message_to_bytes)
    .collect()
}

/// A chunk of the running sum: 3 values at 64 of the corpus job's 67.
fn chunk() -> Chunk {
    Chunk { step: 3, stream: ChunkStream::Sum, offset: 64, values: dtrain_proto::f32_bytes(&[0.5; 3]) }
}

/// Seed messages a coordinator sends: a welcome with the corpus job, and work on its data.
fn coordinator_messages() -> Vec<Vec<u8>> {
    let data = load_csv(&corpus("csv").join("train.csv"), -1, None).unwrap();
    let shard = |k: u32, rows: &[u32]| -> WireShard { dtrain_proto::shard_to_wire(k, rows[0], &data, rows) };
    let work = Work {
        step: 5,
        params: Tensor::Inline(dtrain_proto::f32_bytes(&[0.1; 67])),
        global_batch: 3,
        shards: vec![shard(0, &[0, 1]), shard(1, &[2])],
        chain: None,
    };
    let role = ChainRole {
        successor: Some("10.0.0.3:50052".into()),
        ticket_in: Some(7),
        ticket_out: 8,
        chunk_values: 32,
        digest_key: 9,
        params_lane: Some(10),
        sum_lane: true,
    };
    let chained = Work { params: Tensor::Chained, chain: Some(role), ..work.clone() };
    let params = Chunk { stream: ChunkStream::Params, ..chunk() };
    let job_toml = std::fs::read_to_string(corpus("job").join("job.toml")).unwrap();
    let welcome = Welcome { job_toml, worker_id: 1, shared_memory: None };
    [
        ToWorker::Welcome(welcome),
        ToWorker::Work(work),
        ToWorker::Work(chained),
        ToWorker::Chunk(params),
        ToWorker::Stop { reason: "done".into() },
    ]
    .into_iter()
    .map(dtrain_proto::coordinator_message_to_bytes)
    .collect()
}

#[test]
fn protocol_messages_into_domain_types() {
    fuzz("worker-message", &worker_messages(), |bytes| match dtrain_proto::worker_message_from_bytes(bytes) {
        Ok(FromWorker::Result(r)) => r.stats(2).is_ok(),
        // Where the coordinator takes a chunk of the sum: only the one it expects next.
        Ok(FromWorker::Chunk(c)) => c.expect(64, 32, 67).is_ok(),
        other => other.is_ok(),
    });
    // A lane's hello and frames, as a peer port and a chain member read them.
    use dtrain_proto::lane::{self, Expected, FrameHeader, FrameReader};
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut frames = vec![];
    let stale = FrameHeader { ticket: 9, step: 2, stream: ChunkStream::Sum, offset: 0, values: 5 };
    let next = FrameHeader { ticket: 9, step: 3, stream: ChunkStream::Sum, offset: 64, values: 3 };
    rt.block_on(async {
        lane::write_frame(&mut frames, &stale, &[1.0; 5]).await.unwrap();
        lane::write_frame(&mut frames, &next, &[0.5; 3]).await.unwrap();
    });
    fuzz("lane-frame", &[frames], |mut bytes| {
        let want = Expected { ticket: 9, step: 3, stream: ChunkStream::Sum, chunk: 32, len: 67 };
        let mut sum = vec![0f32; 67];
        rt.block_on(FrameReader::default().next(&mut bytes, &mut sum, |h| h.place(&want, 64))).is_ok()
    });
    fuzz("lane-hello", &[lane::hello(lane::LaneKind::Feed, Some("a-token-of-16-bytes"))], |mut bytes| {
        rt.block_on(lane::read_hello(&mut bytes)).is_ok()
    });
    // What a worker does with the coordinator's messages: every shard it is sent is checked
    // against the job's model before anything is allocated for it, and the work is computed.
    let text = std::fs::read_to_string(corpus("job").join("job.toml")).unwrap();
    let config = dtrain_fit::config::JobConfig::parse(Path::new("job.toml"), &text).unwrap();
    let job = dtrain_fit::Job::build(config, corpus("csv")).unwrap();
    let (shape, outputs) = (job.model.input_shape().to_vec(), job.model.output_width());
    assert_eq!(job.model.num_params(), 67, "the seed work's parameters fit the job");
    let mut compute = dtrain_cluster::worker::Compute::new(job);
    fuzz("coordinator-message", &coordinator_messages(), |bytes| {
        match dtrain_proto::coordinator_message_from_bytes(bytes) {
            Ok(ToWorker::Work(w)) if w.chain.is_some() => w.params == Tensor::Chained,
            Ok(ToWorker::Work(w)) => {
                for s in w.shards.iter().cloned() {
                    let _ = dtrain_proto::shard_from_wire(s, &shape, outputs);
                }
                compute.run(w).is_ok()
            }
            Ok(ToWorker::Welcome(w)) => {
                let config = toml::from_str::<dtrain_fit::config::JobConfig>(&w.job_toml);
                config.is_ok_and(|c| dtrain_fit::Job::build(c, Default::default()).is_ok())
            }
            other => other.is_ok(),
        }
    });
}

#[test]
fn resume_states() {
    // A real run's state.json (the corpus job, one epoch), then mutations of it.
    let work = tempfile::tempdir().unwrap();
    for dir in ["job", "csv"] {
        for e in std::fs::read_dir(corpus(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), work.path().join(e.file_name())).unwrap();
        }
    }
    let run = work.path().join("run");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(["train", "--config", work.path().join("job.toml").to_str().unwrap()])
        .args(["--run-dir", run.to_str().unwrap(), "-q", "--local"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The job as the run keeps it (what --resume checks the state against).
    let text = std::fs::read_to_string(run.join("job.toml")).unwrap();
    let config = dtrain_fit::config::JobConfig::parse(Path::new("job.toml"), &text).unwrap();
    let job = dtrain_fit::Job::build(config, work.path().to_path_buf()).unwrap();
    let state = run.join("state.json");
    let seed = std::fs::read(&state).unwrap();
    let load = || dtrain_fit::checkpoint::load_state(&run, &job).is_ok();
    // Bytes: mostly JSON that no longer parses.
    fuzz_any("state-json-bytes", std::slice::from_ref(&seed), |bytes| {
        std::fs::write(&state, bytes).unwrap();
        load()
    });
    // Values: one field of the manifest changed to an edge value, the JSON still well formed.
    let mut manifest: serde_json::Value = serde_json::from_slice(&seed).unwrap();
    manifest.as_object_mut().unwrap().remove("manifest_fnv1a64"); // sealed again after each edit
    let mut rng = Rng(11);
    let mut accepted = 0;
    for case in 0..cases() {
        let mut m = manifest.clone();
        let edit = edit_a_leaf(&mut rng, &mut m);
        // Sealed: past the checksum, to what is behind it.
        std::fs::write(&state, dtrain_fit::checkpoint::seal(&serde_json::to_vec_pretty(&m).unwrap())).unwrap();
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
        assert!(ok.is_ok(), "state-json-values: case {case} panicked ({edit})");
        accepted += u64::from(ok.unwrap_or(false));
    }
    assert!(accepted > 0 && accepted < cases(), "{accepted} of {} edits of the manifest accepted", cases());
    // The tensors file, with the manifest's size and checksum made to match, so that the
    // safetensors decoding and the tensor checks behind the checksum are what is exercised.
    let mut manifest: serde_json::Value = serde_json::from_slice(&seed).unwrap();
    manifest.as_object_mut().unwrap().remove("manifest_fnv1a64");
    let tensors = run.join(manifest["tensors"].as_str().unwrap());
    let original = std::fs::read(&tensors).unwrap();
    assert_eq!(
        manifest["tensors_fnv1a64"],
        serde_json::Value::from(dtrain_fit::checkpoint::fnv1a64(&original)),
        "the same checksum"
    );
    std::fs::write(&state, &seed).unwrap();
    if let Err(e) = dtrain_fit::checkpoint::load_state(&run, &job) {
        panic!("the seed state loads: {e}");
    }
    fuzz("state-tensors", &[original], |bytes| {
        let mut m = manifest.clone();
        m["tensors_len"] = bytes.len().into();
        m["tensors_fnv1a64"] = dtrain_fit::checkpoint::fnv1a64(bytes).into();
        std::fs::write(&state, dtrain_fit::checkpoint::seal(&serde_json::to_vec_pretty(&m).unwrap())).unwrap();
        std::fs::write(&tensors, bytes).unwrap();
        load()
    });
}

/// Sets one leaf of `v` (chosen at random) to an edge value; says which.
fn edit_a_leaf(rng: &mut Rng, v: &mut serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Object(map) if !map.is_empty() => {
            let i = rng.below(map.len());
            let (key, child) = map.iter_mut().nth(i).unwrap();
            format!("{key}.{}", edit_a_leaf(rng, child))
        }
        Value::Array(items) if !items.is_empty() && rng.below(4) != 0 => {
            let i = rng.below(items.len());
            format!("[{i}].{}", edit_a_leaf(rng, &mut items[i]))
        }
        leaf => {
            let edges: [Value; 12] = [
                Value::Null,
                (-1).into(),
                0.into(),
                u64::MAX.into(),
                i64::MIN.into(),
                1e308.into(),
                "".into(),
                "../../etc/passwd".into(),
                "state-x.safetensors".into(),
                "{epoch:070000d}".into(),
                Value::Array(vec![]),
                serde_json::json!({"x": 1}),
            ];
            *leaf = edges[rng.below(edges.len())].clone();
            format!("= {leaf}")
        }
    }
}

/// Keras model files: `to_json()` text and `.keras` archives (the zip and its `config.json`,
/// with the compile config). The HDF5 weights are read by libhdf5, a C library this test does
/// not fuzz (see the README's trust model).
#[test]
fn keras_model_files() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/fit/tests/fixtures/keras_models");
    let archive = fixtures.join("seed_model.keras");
    let config = dtrain_fit::keras_archive::config(&archive).unwrap();
    let json = std::fs::read(fixtures.join("seed_model.json")).unwrap();
    fuzz_any("keras-config", &[config.into_bytes(), json], |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let model = dtrain_fit::keras::model_from_json(&text);
        dtrain_fit::keras_archive::compile_keys(&text).is_ok() && model.is_ok()
    });
    let work = tempfile::tempdir().unwrap();
    let target = work.path().join("model.keras");
    fuzz_any("keras-archive", &[std::fs::read(&archive).unwrap()], |bytes| {
        std::fs::write(&target, bytes).unwrap();
        dtrain_fit::keras_archive::config(&target).is_ok()
    });
}
