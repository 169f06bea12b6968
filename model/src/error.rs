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
    #[error("unknown device {0:?}: expected cpu, cuda, cuda:N or auto")]
    Device(String),
    /// The CUDA runtime could not be asked (for a device's memory).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A CUDA device asked for on a machine where torch sees none.
    #[error(
        "{0}: no CUDA device is available (torch sees none: no GPU, no driver, a CPU-only \
         libtorch, or CUDA_VISIBLE_DEVICES hides them); use --device cpu"
    )]
    NoCuda(String),
    /// A CUDA index beyond the devices torch sees.
    #[error("cuda:{index}: this machine has {count} CUDA device(s), cuda:0 to cuda:{}", count - 1)]
    CudaIndex {
        /// The index asked for.
        index: usize,
        /// Devices torch sees.
        count: usize,
    },
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
    /// A libtorch error (only its first line: the C++ trace says nothing to a user).
    #[error("libtorch: {}", first_line(.0))]
    Torch(#[from] tch::TchError),
    /// A libtorch operation that failed by panicking inside tch, caught at the edge: what was
    /// being done, on which input shapes.
    #[error("libtorch failed in {op} on input of shape {shapes}: {message}")]
    TorchOp {
        /// The operation, e.g. "the log-prob forward".
        op: String,
        /// The shapes of its inputs.
        shapes: String,
        /// libtorch's message, first line.
        message: String,
    },
}

fn first_line(error: &tch::TchError) -> String {
    let text = error.to_string();
    let text = text.strip_prefix("Internal torch error: ").unwrap_or(&text);
    prime_check::panics::one_line(text)
}

/// Runs the tch work `f` (whose infallible tch calls panic on a libtorch error) so that such
/// a panic becomes a [`ModelError::TorchOp`] naming `op` and the `shapes` of its inputs,
/// instead of a trace.
pub fn torch_op<T>(op: &str, shapes: &[&[i64]], f: impl FnOnce() -> Result<T>) -> Result<T> {
    match prime_check::panics::catch(f) {
        Ok(result) => result,
        Err(message) => Err(ModelError::TorchOp {
            op: op.to_string(),
            shapes: shapes
                .iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            message,
        }),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_failures_name_the_operation_and_shapes_in_one_line() {
        let a = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
        let error = torch_op("a matmul", &[&a.size(), &b.size()], || Ok(a.matmul(&b)))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("libtorch failed in a matmul on input of shape [2, 3], [4, 5]: "),
            "{error}"
        );
        assert!(
            !error.contains('\n') && !error.contains("frame #"),
            "{error}"
        );
        let error = ModelError::from(a.f_matmul(&b).unwrap_err()).to_string();
        assert!(error.starts_with("libtorch: "), "{error}");
        assert!(!error.contains('\n'), "{error}");
        assert_eq!(
            torch_op("nothing", &[], || Ok(3)).unwrap(),
            3,
            "a closure that works passes its value through"
        );
    }
}
