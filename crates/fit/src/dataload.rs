//! Loads the job's training and validation data and checks them against the model.

use crate::build::Job;
use crate::config::{DataFormat, Validation};
use dtrain_data::{load_csv, load_idx_dir, load_npy, Dataset, IdxSplit, Labels};
use dtrain_nn::LossKind;
use std::path::Path;

/// (training data, validation data) as the job file describes them.
pub fn load_data(job: &Job) -> Result<(Dataset, Option<Dataset>), String> {
    let d = &job.config.data;
    let shape = job.model.input_shape();
    let path = |p: &Option<std::path::PathBuf>| job.resolve(p.as_deref().unwrap_or(Path::new("")));
    let s = |e: dtrain_data::DataError| e.to_string();
    let test = d.validation == Validation::Test;
    let (train, val, train_name) = match d.format {
        DataFormat::Idx => {
            let dir = path(&d.path);
            let t = load_idx_dir(&dir, IdxSplit::Train).map_err(s)?;
            let v = if test { Some(load_idx_dir(&dir, IdxSplit::Test).map_err(s)?) } else { None };
            (t, v, dir)
        }
        DataFormat::Csv => {
            let t = load_csv(&path(&d.train), d.label_column, Some(shape)).map_err(s)?;
            let v = if test { Some(load_csv(&path(&d.test), d.label_column, Some(shape)).map_err(s)?) } else { None };
            (t, v, path(&d.train))
        }
        DataFormat::Npy => {
            let t = load_npy(&path(&d.x), &path(&d.y)).map_err(s)?;
            let v = if test { Some(load_npy(&path(&d.test_x), &path(&d.test_y)).map_err(s)?) } else { None };
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
            return Err("fit.validation_split: cannot be combined with data.validation = \"test\"".into());
        }
        let (t, v) = train.split_tail(split);
        if v.is_empty() || t.is_empty() {
            return Err(format!(
                "fit.validation_split: {split} of {} samples leaves an empty split",
                t.len() + v.len()
            ));
        }
        val = Some(v);
        t
    } else {
        train
    };
    if train.is_empty() {
        return Err(format!("{}: no training samples", train_name.display()));
    }
    Ok((train, val))
}

/// The samples' feature count must be the model's input width.
pub fn check_width(job: &Job, d: &Dataset, name: &Path) -> Result<(), String> {
    let m = &job.model;
    if d.width() != m.input_width() {
        return Err(format!(
            "{}: samples have shape {:?} ({} features) but model.input_shape {:?} needs {}",
            name.display(),
            d.sample_shape,
            d.width(),
            m.input_shape(),
            m.input_width()
        ));
    }
    Ok(())
}

/// Feature count and label range must fit the model.
pub fn check(job: &Job, d: &Dataset, name: &Path) -> Result<(), String> {
    check_width(job, d, name)?;
    let m = &job.model;
    let units = m.output_width();
    let categorical =
        matches!(m.loss().kind, LossKind::SparseCategoricalCrossentropy | LossKind::CategoricalCrossentropy);
    match &d.labels {
        Labels::Classes(c) => {
            if let Some((i, &bad)) =
                c.iter().enumerate().find(|(_, &v)| (categorical || units > 1) && v as usize >= units)
            {
                return Err(format!(
                    "{}: label {bad} (sample {i}) is outside the output layer's {units} classes",
                    name.display()
                ));
            }
            if !categorical && units == 1 {
                if let Some((i, &bad)) =
                    c.iter().enumerate().find(|(_, &v)| v > 1 && m.loss().kind == LossKind::BinaryCrossentropy)
                {
                    return Err(format!(
                        "{}: label {bad} (sample {i}) is not 0 or 1 for binary_crossentropy",
                        name.display()
                    ));
                }
            }
        }
        Labels::Values { width, .. } => {
            if m.loss().kind == LossKind::SparseCategoricalCrossentropy {
                return Err(format!("{}: sparse_categorical_crossentropy needs integer class labels", name.display()));
            }
            if *width != units {
                return Err(format!(
                    "{}: targets have {width} values per sample, the output layer has {units}",
                    name.display()
                ));
            }
        }
    }
    Ok(())
}
