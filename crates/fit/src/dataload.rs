//! Loads the job's training and validation data and checks them against the model.

use crate::build::Job;
use crate::config::{DataFormat, Validation};
use crate::FitError;
use dtrain_data::{load_csv, load_idx_dir, load_npy, DataError, Dataset, IdxSplit, Labels};
use dtrain_nn::LossKind;
use std::path::Path;

/// (training data, validation data) as the job file describes them.
pub fn load_data(job: &Job) -> Result<(Dataset, Option<Dataset>), FitError> {
    let d = &job.config.data;
    let shape = job.model.input_shape();
    let path = |p: &Option<std::path::PathBuf>| job.resolve(p.as_deref().unwrap_or(Path::new("")));
    let test = d.validation == Validation::Test;
    let (train, val, train_name) = match d.format {
        DataFormat::Idx => {
            let dir = path(&d.path);
            let t = load_idx_dir(&dir, IdxSplit::Train)?;
            let v = if test { Some(load_idx_dir(&dir, IdxSplit::Test)?) } else { None };
            (t, v, dir)
        }
        DataFormat::Csv => {
            let t = load_csv(&path(&d.train), d.label_column, Some(shape))?;
            let v = if test { Some(load_csv(&path(&d.test), d.label_column, Some(shape))?) } else { None };
            (t, v, path(&d.train))
        }
        DataFormat::Npy => {
            let t = load_npy(&path(&d.x), &path(&d.y))?;
            let v = if test { Some(load_npy(&path(&d.test_x), &path(&d.test_y))?) } else { None };
            (t, v, path(&d.x))
        }
    };
    let train = train.with_rescale(d.rescale);
    let mut val = val.map(|v| v.with_rescale(d.rescale));
    check(job, &train, &train_name)?;
    if let Some(v) = &val {
        check(job, v, &train_name)?;
    }
    let split = job.fit.validation_split;
    let train = if split > 0.0 {
        if val.is_some() {
            return Err(FitError::Config(
                "fit.validation_split: cannot be combined with data.validation = \"test\"".into(),
            ));
        }
        let (t, v) = train.split_tail(split);
        if v.is_empty() || t.is_empty() {
            return Err(FitError::Config(format!(
                "fit.validation_split: {split} of {} samples leaves an empty split",
                t.len() + v.len()
            )));
        }
        val = Some(v);
        t
    } else {
        train
    };
    if train.is_empty() {
        return Err(DataError::File { path: train_name, msg: "no training samples".into() }.into());
    }
    Ok((train, val))
}

/// The samples' feature count must be the model's input width.
pub fn check_width(job: &Job, d: &Dataset, name: &Path) -> Result<(), DataError> {
    let m = &job.model;
    if d.width() != m.input_width() {
        let (shape, features, input, width) = (&d.sample_shape, d.width(), m.input_shape(), m.input_width());
        let msg =
            format!("samples have shape {shape:?} ({features} features) but model.input_shape {input:?} needs {width}");
        return Err(DataError::File { path: name.to_path_buf(), msg });
    }
    Ok(())
}

/// Feature count and label range must fit the model.
pub fn check(job: &Job, d: &Dataset, name: &Path) -> Result<(), DataError> {
    check_width(job, d, name)?;
    let bad = |msg: String| Err(DataError::File { path: name.to_path_buf(), msg });
    let m = &job.model;
    let units = m.output_width();
    let categorical =
        matches!(m.loss().kind, LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy);
    match &d.labels {
        Labels::Classes(c) => {
            if let Some((i, &v)) =
                c.iter().enumerate().find(|(_, &v)| (categorical || units > 1) && v as usize >= units)
            {
                return bad(format!("label {v} (sample {i}) is outside the output layer's {units} classes"));
            }
            let binary = m.loss().kind == LossKind::BinaryCrossentropy;
            if !categorical && units == 1 {
                if let Some((i, &v)) = c.iter().enumerate().find(|(_, &v)| v > 1 && binary) {
                    return bad(format!("label {v} (sample {i}) is not 0 or 1 for binary_crossentropy"));
                }
            }
        }
        Labels::Values { width, .. } => {
            if m.loss().kind == LossKind::SparseCategoricalCrossentropy {
                return bad("sparse_categorical_crossentropy needs integer class labels".into());
            }
            if *width != units {
                return bad(format!("targets have {width} values per sample, the output layer has {units}"));
            }
        }
    }
    Ok(())
}
