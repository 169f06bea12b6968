//! TensorBoard scalar event files, written live as a run goes (`RUN/tensorboard/`).
//!
//! An event file is a sequence of TFRecords, each `u64 length (LE)`, `u32 masked CRC32C of
//! the length`, the data, `u32 masked CRC32C of the data`; the data is a serialized `Event`
//! proto. The first event holds the file version `brain.Event:2`; every later one a `Summary`
//! of `simple_value` scalars at a step. The file name must contain `tfevents` for TensorBoard
//! to read it. Only the fields written here are declared (field numbers as in TensorFlow's
//! event.proto and summary.proto).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

use crate::error::{LearnerError, Result};

/// The version string TensorBoard expects in the first event of a file.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `tensorflow.Event`, with the fields a scalar log needs.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// Global step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// Set in the first event of a file only.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// Scalars at `step`.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    /// A session marker: [`SessionLog::START`] makes TensorBoard drop what earlier files hold
    /// at `step` and after (the steps a crashed run wrote after its last checkpoint).
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorflow.SessionLog`, its status only.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// `SessionLog.SessionStatus`.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

impl SessionLog {
    /// `SessionLog.START`: a (re)started run.
    pub const START: i32 = 1;
}

/// `tensorflow.Summary`: named values.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// TFRecord's masked CRC32C: the checksum rotated right by 15 bits plus a constant, so that a
/// CRC of data that itself holds CRCs stays well distributed.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(data.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(data);
    record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    record
}

/// The `Event` holding `scalars` at `step`; non-finite values are kept (TensorBoard shows
/// NaN and infinities as such).
pub fn scalar_event(step: u64, wall_time: f64, scalars: &[(String, f64)]) -> Event {
    Event {
        wall_time,
        step: step as i64,
        file_version: None,
        session_log: None,
        summary: Some(Summary {
            value: scalars
                .iter()
                .map(|(tag, value)| SummaryValue {
                    tag: tag.clone(),
                    simple_value: Some(*value as f32),
                })
                .collect(),
        }),
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An open event file; each call to [`EventWriter::scalars`] is on disk when it returns, so
/// a live TensorBoard (or a W&B `sync_tensorboard`) sees every step as it is recorded.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named
    /// `events.out.tfevents.<seconds>.<host>.<pid>`: a resumed run adds a file next to the
    /// earlier ones and TensorBoard reads them all. `first_step` is the first step this run
    /// writes anew (a resumed run: its checkpoint's step plus one): the file starts with a
    /// session start there, so TensorBoard drops what a crashed run had written at that step
    /// and after, and shows this run's values instead.
    pub fn create(dir: &Path, first_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(LearnerError::io(dir))?;
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
            .unwrap_or_else(|| "prime".to_string());
        let wall = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            wall as u64,
            std::process::id()
        ));
        let file = File::create(&path).map_err(LearnerError::io(&path))?;
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.write(&Event {
            wall_time: wall,
            step: 0,
            file_version: Some(FILE_VERSION.to_string()),
            summary: None,
            session_log: None,
        })?;
        writer.write(&Event {
            wall_time: wall,
            step: first_step as i64,
            file_version: None,
            summary: None,
            session_log: Some(SessionLog {
                status: SessionLog::START,
            }),
        })?;
        Ok(writer)
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `scalars` at `step`, stamped with the current time, and flushes.
    pub fn scalars(&mut self, step: u64, scalars: &[(String, f64)]) -> Result<()> {
        self.write(&scalar_event(step, now(), scalars))
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        let record = frame(&event.encode_to_vec());
        self.file
            .write_all(&record)
            .and_then(|()| self.file.flush())
            .map_err(LearnerError::io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_the_castagnoli_checksum() {
        // The check value of CRC-32C (the catalogue's "123456789").
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked by hand: 0xe3069283 rotated right by 15 bits is 0x2507c60d, and
        // 0x2507c60d + 0xa282ead8 = 0xc78ab0e5 (mod 2^32).
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn a_record_frames_its_data() {
        let record = frame(b"abc");
        assert_eq!(record.len(), 8 + 4 + 3 + 4);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(&record[12..15], b"abc");
        assert_eq!(&record[15..], &masked_crc32c(b"abc").to_le_bytes());
    }
}
