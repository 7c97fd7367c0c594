//! dtrain-tensorboard: TensorBoard event files, written the way Keras's TensorBoard callback
//! writes them (a `train/` and a `validation/` run under the log directory, one
//! `events.out.tfevents.*` file each), so a Keras run and a dtrain run of the same job overlay
//! in one TensorBoard.
//!
//! A file is a sequence of TFRecords: the length (u64, little-endian), the masked CRC32C of the
//! length, the serialized `Event`, and the masked CRC32C of it. The first event names the file
//! format (`brain.Event:2`); each later one holds a `Summary` of scalars or histograms at a step.

use prost::Message;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The generated event messages (TensorFlow's field numbers).
#[allow(missing_docs)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/tensorboard.rs"));
}

/// CRC32C (Castagnoli), as TFRecord frames use it.
pub fn crc32c(bytes: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78; // reflected 0x1EDC6F41
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8))
}

/// The CRC as TFRecord stores it: rotated and offset, so that a CRC of data holding CRCs is
/// not trivially related to them.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// An event file being written.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it (named as TensorFlow names them, so
    /// a later writer for the same directory adds a file instead of overwriting one).
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host =
            std::fs::read_to_string("/etc/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_string());
        let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
        let name =
            format!("events.out.tfevents.{}.{host}.{}.{}.v2", now.as_secs(), std::process::id(), now.subsec_nanos());
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
        let mut w = EventWriter { file: BufWriter::new(file), path };
        w.write(pb::Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(pb::event::What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: pb::Event) -> io::Result<()> {
        self.file.write_all(&record(&event.encode_to_vec()))
    }

    fn summary(&mut self, step: i64, value: Vec<pb::summary::Value>) -> io::Result<()> {
        let what = Some(pb::event::What::Summary(pb::Summary { value }));
        self.write(pb::Event { wall_time: wall_time(), step, what })
    }

    /// Scalars (`tag`, value) at `step`, in one event.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f32)]) -> io::Result<()> {
        let value = values
            .iter()
            .map(|&(tag, v)| pb::summary::Value {
                tag: tag.into(),
                value: Some(pb::summary::value::Value::SimpleValue(v)),
            })
            .collect();
        self.summary(step, value)
    }

    /// A histogram of `values` under `tag` at `step` (30 equal buckets between the extremes,
    /// as TensorBoard draws them; non-finite values are left out).
    pub fn histogram(&mut self, tag: &str, step: i64, values: &[f32]) -> io::Result<()> {
        let histo = histogram(values);
        let value = vec![pb::summary::Value { tag: tag.into(), value: Some(pb::summary::value::Value::Histo(histo)) }];
        self.summary(step, value)
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The trainer's event logs (`dtrain_fit::boards::Boards`) as event files: one writer per
/// directory, made on first use.
#[derive(Default)]
pub struct EventFiles {
    writers: BTreeMap<PathBuf, EventWriter>,
}

impl EventFiles {
    fn writer(&mut self, dir: &Path) -> io::Result<&mut EventWriter> {
        if !self.writers.contains_key(dir) {
            self.writers.insert(dir.to_path_buf(), EventWriter::create(dir)?);
        }
        Ok(self.writers.get_mut(dir).expect("inserted above"))
    }
}

impl dtrain_fit::boards::Boards for EventFiles {
    fn scalars(&mut self, dir: &Path, step: i64, values: &[(&str, f32)]) -> io::Result<()> {
        self.writer(dir)?.scalars(step, values)
    }

    fn histogram(&mut self, dir: &Path, tag: &str, step: i64, values: &[f32]) -> io::Result<()> {
        self.writer(dir)?.histogram(tag, step, values)
    }

    fn flush(&mut self, dir: &Path) -> io::Result<()> {
        self.writers.get_mut(dir).map_or(Ok(()), EventWriter::flush)
    }
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

fn histogram(values: &[f32]) -> pb::HistogramProto {
    const BUCKETS: usize = 30;
    let finite: Vec<f64> = values.iter().filter(|v| v.is_finite()).map(|&v| f64::from(v)).collect();
    let (min, max) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (min, max) = if finite.is_empty() { (0.0, 0.0) } else { (min, max) };
    let width = (max - min) / BUCKETS as f64;
    let mut bucket = vec![0.0; BUCKETS];
    for &v in &finite {
        let i = if width > 0.0 { (((v - min) / width) as usize).min(BUCKETS - 1) } else { BUCKETS - 1 };
        bucket[i] += 1.0;
    }
    let bucket_limit = (1..=BUCKETS).map(|i| if i == BUCKETS { max } else { min + width * i as f64 }).collect();
    pb::HistogramProto {
        min,
        max,
        num: finite.len() as f64,
        sum: finite.iter().sum(),
        sum_squares: finite.iter().map(|v| v * v).sum(),
        bucket_limit,
        bucket,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // TFRecord's mask, ((c >> 15) | (c << 17)) + 0xa282ead8, worked out by hand for it.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    /// Reads the records back, checking both CRCs of each.
    fn records(bytes: &[u8]) -> Vec<pb::Event> {
        let mut out = vec![];
        let mut at = 0;
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(&bytes[at + 8..at + 12], &masked_crc32c(len_bytes).to_le_bytes());
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(&bytes[at + 12 + len..at + 16 + len], &masked_crc32c(data).to_le_bytes());
            out.push(pb::Event::decode(data).unwrap());
            at += 16 + len;
        }
        out
    }

    #[test]
    fn an_event_file_holds_the_version_then_the_summaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(&dir.path().join("train")).unwrap();
        w.scalars(0, &[("epoch_loss", 0.5), ("epoch_accuracy", 0.75)]).unwrap();
        w.histogram("dense/kernel", 0, &[1.0, 2.0, 3.0, f32::NAN]).unwrap();
        w.flush().unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents.") && name.ends_with(".v2"), "{name}");
        let events = records(&std::fs::read(w.path()).unwrap());
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].what, Some(pb::event::What::FileVersion("brain.Event:2".into())));
        let Some(pb::event::What::Summary(s)) = &events[1].what else { panic!("a summary") };
        assert_eq!(s.value[0].tag, "epoch_loss");
        assert_eq!(s.value[1].value, Some(pb::summary::value::Value::SimpleValue(0.75)));
        let Some(pb::event::What::Summary(h)) = &events[2].what else { panic!("a summary") };
        let Some(pb::summary::value::Value::Histo(h)) = &h.value[0].value else { panic!("a histogram") };
        assert_eq!((h.min, h.max, h.num, h.sum, h.sum_squares), (1.0, 3.0, 3.0, 6.0, 14.0));
        assert_eq!(h.bucket.iter().sum::<f64>(), 3.0);
        assert_eq!(h.bucket_limit.last(), Some(&3.0));
    }
}
