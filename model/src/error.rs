//! The one error type of the model crate.
use std::path::PathBuf;

/// Everything that can go wrong while loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N")]
    Device(String),
    /// The CUDA runtime could not be asked (for a device's memory).
    #[error("CUDA: {0}")]
    Cuda(String),
    #[error("unknown dtype {0:?}: expected f32, bf16 or f16")]
    Dtype(String),
    /// A weight transfer that does not fit its manifest or the receiving model.
    #[error("weight transfer: {0}")]
    Weights(String),
    /// A weight stream that breaks the transfer protocol: no manifest first, another version
    /// than asked for, a chunk above the limit, a second manifest, or an end short of the
    /// manifest's length.
    #[error("protocol: {0}")]
    TransferProtocol(String),
    /// A weight stream the sender ended with a gRPC error.
    #[error("weight stream: {code:?}: {message}")]
    TransferStream {
        /// The status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Reads a JSON file into `T`, naming the file in every error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(ModelError::io(path))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}
