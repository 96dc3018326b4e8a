//! GGUF import: read a llama.cpp GGUF file and turn it into a Hugging Face model directory.
//! No libtorch here: the output is files that `selfplay-policy` loads like any checkpoint.
//!
//! The crate has four modules:
//!
//! * `reader`, [`GgufFile`]: a reader for GGUF versions 2 and 3. It memory-maps the file, parses
//!   the header, every metadata key/value (all value types, arrays included), the tensor infos,
//!   the alignment (`general.alignment`, default 32) and the start of the tensor data, and checks
//!   that every tensor's data lies inside the file.
//! * `dequant`, [`dequantize`]: ggml block formats to `f32`, following ggml's reference (scalar)
//!   formulas exactly, so results are bit-identical to ggml's and to the `gguf` Python package's.
//!   Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
//! * `import`, [`import_gguf`]: for the `llama`, `qwen2` and `qwen3` architectures, writes
//!   `model.safetensors` (f32, Hugging Face names, Llama's rotary row order
//!   restored for Q and K), `config.json`, `tokenizer.json` (byte-level BPE rebuilt from the GGUF
//!   vocabulary), `tokenizer_config.json` and `generation_config.json`.
//! * `tokenizer`, [`build_tokenizer_json`] and [`build_tokenizer_config`], the tokenizer files
//!   rebuilt from the `tokenizer.ggml.*` metadata.
//!
//! Nothing here panics on malformed input: every problem is a [`GgufError`] that names the file
//! and what is wrong with it.

// `x % n != 0` rather than `is_multiple_of`, which is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

mod dequant;
mod error;
mod import;
mod reader;
mod tokenizer;

pub use dequant::{dequantize, GgmlType, SUPPORTED_TYPES};
pub use error::GgufError;
pub use import::{
    build_config, build_generation_config, import_gguf, unpermute_qk, GgufArch, ImportSummary, LlamaParams,
};
pub use reader::{GgufFile, GgufValue, TensorInfo, DEFAULT_ALIGNMENT, GGUF_MAGIC};
pub use tokenizer::{build_tokenizer_config, build_tokenizer_json};
