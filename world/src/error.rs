//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while generating, writing or reading the world.
///
/// Every variant that concerns a file names it; row-level variants also name the row
/// (0-based, counted over the whole file) and the field, so a bad data set can be fixed by hand.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A `WorldConfig` that cannot produce a world (bad ranges, sizes, vocabulary).
    #[error("invalid world config: {0}")]
    Config(String),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A jsonl line is not valid JSON or does not match the row schema.
    #[error("{path}: line {line}: {source}")]
    Json {
        path: PathBuf,
        /// 1-based line number, as editors show it.
        line: usize,
        #[source]
        source: serde_json::Error,
    },

    /// The parquet/arrow layer failed (corrupt file, unsupported encoding).
    #[error("{path}: {message}")]
    Parquet { path: PathBuf, message: String },

    /// A parquet file lacks a required column or has one of an unexpected type.
    #[error("{path}: column `{field}`: {reason}")]
    Schema {
        path: PathBuf,
        field: String,
        reason: String,
    },

    /// One row holds a value that is missing or malformed.
    #[error("{path}: row {row}: field `{field}`: {reason}")]
    Row {
        path: PathBuf,
        /// 0-based row index within the file.
        row: usize,
        field: String,
        reason: String,
    },

    /// A data file whose extension is neither `.jsonl` nor `.parquet`.
    #[error("{path}: unknown data format (expected a .jsonl or .parquet file)")]
    UnknownFormat { path: PathBuf },

    /// Training, saving or using the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The manifest of an existing world cannot be parsed.
    #[error("{path}: bad manifest: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl WorldError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        WorldError::Io {
            path: path.into(),
            source,
        }
    }
}
