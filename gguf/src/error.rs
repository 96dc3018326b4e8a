//! The one error type of GGUF reading, dequantization and import.

use std::path::PathBuf;

use crate::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, read, mapped or written.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with "GGUF".
    #[error(
        "{}: bad magic \"{}\" (expected \"GGUF\"): not a GGUF file",
        .path.display(),
        .found.escape_ascii()
    )]
    BadMagic { path: PathBuf, found: [u8; 4] },
    /// A GGUF version other than 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3){hint}", .path.display())]
    UnsupportedVersion { path: PathBuf, version: u32, hint: String },
    /// The file ends before the header does, or before some tensor's data does.
    #[error("{}: truncated file: {what}", .path.display())]
    Truncated { path: PathBuf, what: String },
    /// The header is readable but inconsistent (bad value type, bad UTF-8, overflowing sizes...).
    #[error("{}: malformed GGUF: {what}", .path.display())]
    Malformed { path: PathBuf, what: String },
    /// A tensor uses a ggml type this module cannot dequantize (or does not know at all).
    #[error(
        "{}: tensor '{tensor}' has unsupported tensor type {ty} (supported: {})",
        .path.display(),
        GgmlType::supported_names()
    )]
    UnsupportedTensorType { path: PathBuf, tensor: String, ty: GgmlType },
    /// `general.architecture` is not `llama`.
    #[error("{}: unsupported architecture '{found}' (supported: llama, qwen2, qwen3)", .path.display())]
    UnsupportedArchitecture { path: PathBuf, found: String },
    /// A metadata key the import needs is absent.
    #[error("{}: missing metadata key '{key}'", .path.display())]
    MissingKey { path: PathBuf, key: String },
    /// A metadata key has a value of the wrong type.
    #[error("{}: metadata key '{key}' is {found}, expected {expected}", .path.display())]
    WrongType { path: PathBuf, key: String, expected: &'static str, found: String },
    /// A tensor the model needs is absent.
    #[error("{}: missing tensor '{name}'", .path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// The tokenizer described by the file cannot be rebuilt as a `tokenizer.json`.
    #[error("{}: unsupported tokenizer: {what}", .path.display())]
    UnsupportedTokenizer { path: PathBuf, what: String },
    /// Some other feature of the model that the import does not handle.
    #[error("{}: unsupported model: {what}", .path.display())]
    Unsupported { path: PathBuf, what: String },
    /// [`dequantize`] was asked for a type it does not implement.
    #[error("cannot dequantize tensor type {ty} (supported: {})", GgmlType::supported_names())]
    UnsupportedType { ty: GgmlType },
    /// [`dequantize`] was given a buffer whose size does not match the element count.
    #[error("cannot dequantize {n_elements} elements of type {ty}: {what}")]
    BadTensorData { ty: GgmlType, n_elements: usize, what: String },
    /// JSON serialization of an output file failed.
    #[error("{}: cannot write JSON: {source}", .path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) type Result<T, E = GgufError> = std::result::Result<T, E>;
