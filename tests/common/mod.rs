//! Helpers for tests that run the real binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
}

pub fn run(args: &[&str]) -> Output {
    coordinator().args(args).output().expect("coordinator runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small 3-class CSV dataset (label last), deterministic.
pub fn write_csv(path: &Path, n: usize) {
    let mut s = String::from("f0,f1,f2,f3,label\n");
    for i in 0..n {
        let c = i % 3;
        let v: Vec<String> =
            (0..4).map(|j| format!("{:.3}", ((i * 7 + j * 13) % 17) as f32 / 17.0 + c as f32 * 0.3)).collect();
        s += &format!("{},{c}\n", v.join(","));
    }
    std::fs::write(path, s).unwrap();
}

/// A job on `train.csv` / `test.csv` in `dir` with dropout, every regularizer and MaxNorm.
pub fn write_job(dir: &Path, extra: &str) -> PathBuf {
    write_csv(&dir.join("train.csv"), 90);
    write_csv(&dir.join("test.csv"), 30);
    let job = format!(
        r#"seed = 7
[data]
format = "csv"
train = "train.csv"
test = "test.csv"
label_column = -1
validation = "test"
[model]
input_shape = [4]
layers = [
  {{ type = "Dense", units = 8, activation = "relu", kernel_regularizer = {{ l2 = 0.01 }},
     activity_regularizer = {{ l1 = 0.01 }}, kernel_constraint = {{ MaxNorm = {{ max_value = 2.0 }} }} }},
  {{ type = "Dropout", rate = 0.3 }},
  {{ type = "Dense", units = 3, activation = "softmax" }},
]
[compile]
optimizer = {{ Adam = {{ learning_rate = 0.01, beta_1 = 0.89 }} }}
loss = "sparse_categorical_crossentropy"
metrics = ["accuracy"]
[fit]
batch_size = 8
epochs = 3
{extra}
"#
    );
    let p = dir.join("job.toml");
    std::fs::write(&p, job).unwrap();
    p
}
