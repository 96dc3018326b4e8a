//! One error type for everything that can go wrong while loading or running a model.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture {found:?} in {path}: selfplay supports the Llama, Mistral, Qwen2 and Qwen3 families, each ...ForCausalLM or ...ForSequenceClassification")]
    UnsupportedArchitecture { path: PathBuf, found: String },
    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("weights do not match the config: tensor {name}: {message}")]
    WeightMismatch { name: String, message: String },
    #[error("missing tensor {name} (looked in {path})")]
    MissingTensor { name: String, path: PathBuf },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("token id {id} out of range for a vocabulary of {vocab_size}")]
    TokenOutOfRange { id: i64, vocab_size: i64 },
    #[error("device {0:?} not available: {1}")]
    Device(String, String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Gguf(#[from] crate::gguf::GgufError),
}

pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> PolicyError {
    let path = path.into();
    move |source| PolicyError::Io { path, source }
}
