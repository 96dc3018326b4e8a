//! GGUF import: read a llama.cpp GGUF file and turn it into a Hugging Face model directory.
//!
//! The module has three layers:
//!
//! * [`GgufFile`]: a reader for GGUF versions 2 and 3. It memory-maps the file, parses the header,
//!   every metadata key/value (all value types, arrays included), the tensor infos, the alignment
//!   (`general.alignment`, default 32) and the start of the tensor data, and checks that every
//!   tensor's data lies inside the file.
//! * [`dequantize`]: ggml block formats to `f32`, following ggml's reference (scalar) formulas
//!   exactly, so results are bit-identical to ggml's and to the `gguf` Python package's.
//!   Supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
//! * [`import_gguf`]: for the `llama`, `qwen2` and `qwen3` architectures, writes
//!   `model.safetensors` (f32, Hugging Face names, Llama's rotary row order
//!   restored for Q and K), `config.json`, `tokenizer.json` (byte-level BPE rebuilt from the GGUF
//!   vocabulary), `tokenizer_config.json` and `generation_config.json`.
//!
//! Nothing here panics on malformed input: every problem is a [`GgufError`] that names the file
//! and what is wrong with it.

// `x % n != 0` rather than `is_multiple_of`, which is newer than the workspace's rust-version.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::f16;
use memmap2::Mmap;
use serde_json::{json, Map, Value};

/// The GGUF magic, the bytes "GGUF" at the start of the file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (real files use at most 1).
const MAX_ARRAY_DEPTH: usize = 8;
/// Most elements reserved up front for a list whose length comes from the file (it still grows).
const MAX_RESERVE: usize = 1 << 16;
/// Super-block size of the K-quants.
const QK_K: usize = 256;

/// Everything that can go wrong reading or importing a GGUF file.
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

type Result<T, E = GgufError> = std::result::Result<T, E>;

// ---------------------------------------------------------------------------------------------
// ggml tensor types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type, by its id in the GGUF tensor info.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// An id this module does not know (removed or newer than this code).
    Unknown(u32),
}

/// (id, type, elements per block, bytes per block)
const TYPE_TABLE: &[(u32, GgmlType, usize, usize)] = &[
    (0, GgmlType::F32, 1, 4),
    (1, GgmlType::F16, 1, 2),
    (2, GgmlType::Q4_0, 32, 18),
    (3, GgmlType::Q4_1, 32, 20),
    (6, GgmlType::Q5_0, 32, 22),
    (7, GgmlType::Q5_1, 32, 24),
    (8, GgmlType::Q8_0, 32, 34),
    (9, GgmlType::Q8_1, 32, 40),
    (10, GgmlType::Q2_K, QK_K, 84),
    (11, GgmlType::Q3_K, QK_K, 110),
    (12, GgmlType::Q4_K, QK_K, 144),
    (13, GgmlType::Q5_K, QK_K, 176),
    (14, GgmlType::Q6_K, QK_K, 210),
    (15, GgmlType::Q8_K, QK_K, 292),
    (16, GgmlType::IQ2_XXS, QK_K, 66),
    (17, GgmlType::IQ2_XS, QK_K, 74),
    (18, GgmlType::IQ3_XXS, QK_K, 98),
    (19, GgmlType::IQ1_S, QK_K, 50),
    (20, GgmlType::IQ4_NL, 32, 18),
    (21, GgmlType::IQ3_S, QK_K, 110),
    (22, GgmlType::IQ2_S, QK_K, 82),
    (23, GgmlType::IQ4_XS, QK_K, 136),
    (24, GgmlType::I8, 1, 1),
    (25, GgmlType::I16, 1, 2),
    (26, GgmlType::I32, 1, 4),
    (27, GgmlType::I64, 1, 8),
    (28, GgmlType::F64, 1, 8),
    (29, GgmlType::IQ1_M, QK_K, 56),
    (30, GgmlType::BF16, 1, 2),
    (34, GgmlType::TQ1_0, QK_K, 54),
    (35, GgmlType::TQ2_0, QK_K, 66),
    (39, GgmlType::MXFP4, 32, 17),
    (40, GgmlType::NVFP4, 64, 36),
    (41, GgmlType::Q1_0, 128, 18),
];

/// The types [`dequantize`] implements.
pub const SUPPORTED_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

impl GgmlType {
    /// The type with this GGUF id ([`GgmlType::Unknown`] for ids not in ggml's table).
    pub fn from_id(id: u32) -> Self {
        TYPE_TABLE.iter().find(|(i, ..)| *i == id).map(|(_, t, ..)| *t).unwrap_or(GgmlType::Unknown(id))
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Unknown(id) => id,
            t => TYPE_TABLE.iter().find(|(_, tt, ..)| *tt == t).map(|(i, ..)| *i).unwrap_or(u32::MAX),
        }
    }

    /// ggml's name for the type, e.g. `Q4_1`.
    pub fn name(self) -> String {
        match self {
            GgmlType::Unknown(id) => format!("unknown (id {id})"),
            t => format!("{t:?}"),
        }
    }

    /// `(elements per block, bytes per block)`, or `None` for an unknown type.
    pub fn block_layout(self) -> Option<(usize, usize)> {
        TYPE_TABLE.iter().find(|(_, t, ..)| *t == self).map(|(_, _, b, s)| (*b, *s))
    }

    /// Whether [`dequantize`] implements this type.
    pub fn is_supported(self) -> bool {
        SUPPORTED_TYPES.contains(&self)
    }

    /// Bytes taken by `n_elements` values of this type, if the type is known and `n_elements`
    /// is a whole number of blocks.
    pub fn byte_size(self, n_elements: u64) -> Option<u64> {
        let (block, size) = self.block_layout()?;
        if n_elements % block as u64 != 0 {
            return None;
        }
        (n_elements / block as u64).checked_mul(size as u64)
    }

    fn supported_names() -> String {
        SUPPORTED_TYPES.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantize `n_elements` values of type `ty` stored in `data` to `f32`.
///
/// `data` must hold exactly the bytes of those elements (a whole number of blocks). The results
/// are bit-identical to ggml's reference `dequantize_row_*` functions.
pub fn dequantize(ty: GgmlType, data: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    if !ty.is_supported() {
        return Err(GgufError::UnsupportedType { ty });
    }
    let bad = |what: String| GgufError::BadTensorData { ty, n_elements, what };
    let (block, size) = ty.block_layout().ok_or(GgufError::UnsupportedType { ty })?;
    if n_elements % block != 0 {
        return Err(bad(format!("the element count is not a multiple of the block size {block}")));
    }
    let n_blocks = n_elements / block;
    let expected = n_blocks.checked_mul(size).ok_or_else(|| bad("the byte size overflows".to_string()))?;
    if data.len() != expected {
        return Err(bad(format!("expected {expected} bytes of data, got {}", data.len())));
    }
    let mut out = vec![0f32; n_elements];
    if n_elements == 0 {
        return Ok(out);
    }
    let blocks = data.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, y) in blocks {
                let bits = u16::from_le_bytes([b[0], b[1]]) as u32;
                y[0] = f32::from_bits(bits << 16);
            }
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        _ => return Err(GgufError::UnsupportedType { ty }),
    }
    Ok(out)
}

/// Q8_0: `d: f16, qs: [i8; 32]`, `y = qs * d`.
fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = (b[2 + j] as i8) as f32 * d;
    }
}

/// Q4_0: `d: f16, qs: [u8; 16]`; element j is the low nibble of qs[j], j+16 the high nibble;
/// `y = (q - 8) * d`.
fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0f) as i32 - 8;
        let x1 = (qs[j] >> 4) as i32 - 8;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`; `y = q * d + m`.
fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        let x0 = (qs[j] & 0x0f) as f32;
        let x1 = (qs[j] >> 4) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`; bit j of qh is the fifth bit of element j;
/// `y = (q - 16) * d`.
fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let x0 = ((qs[j] & 0x0f) as u32 | h0) as i32 - 16;
        let x1 = ((qs[j] >> 4) as u32 | h1) as i32 - 16;
        y[j] = x0 as f32 * d;
        y[j + 16] = x1 as f32 * d;
    }
}

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; `y = q * d + m`.
fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        let x0 = ((qs[j] & 0x0f) as u32 | h0) as f32;
        let x1 = ((qs[j] >> 4) as u32 | h1) as f32;
        y[j] = x0 * d + m;
        y[j + 16] = x1 * d + m;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; eight sub-blocks of 32;
/// `y = (d * sc) * q - (dmin * m)`.
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for chunk in 0..4 {
        let q = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0f) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`; bit k of qh[l] is
/// the fifth bit of element l of sub-block k.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for chunk in 0..4 {
        let ql = &qs[chunk * 32..chunk * 32 + 32];
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let d1 = d * sc1 as f32;
        let m1 = dmin * m1 as f32;
        let d2 = d * sc2 as f32;
        let m2 = dmin * m2 as f32;
        let s1 = 2 * chunk;
        let s2 = 2 * chunk + 1;
        let y = &mut y[chunk * 64..chunk * 64 + 64];
        for l in 0..32 {
            let h1 = ((qh[l] >> s1) & 1) << 4;
            let h2 = ((qh[l] >> s2) & 1) << 4;
            y[l] = d1 * ((ql[l] & 0x0f) | h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) | h2) as f32 - m2;
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; sixteen sub-blocks of 16;
/// `y = (d * sc) * (q - 32)`.
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &ql_all[half * 64..half * 64 + 64];
        let qh = &qh_all[half * 32..half * 32 + 32];
        let sc = &sc_all[half * 8..half * 8 + 8];
        let y = &mut y[half * 128..half * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Undo llama.cpp's rotary row permutation of a Q or K projection.
///
/// `data` is a row-major `[rows, cols]` matrix (PyTorch order) with `rows = n_head * head_dim`.
/// llama.cpp's converter reordered the rows of each head as
/// `reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2)`, i.e. GGUF row `h*hd + 2*i + j`
/// holds Hugging Face row `h*hd + j*hd/2 + i`. This puts them back. Returns `None` when the
/// shape does not fit `n_head`.
pub fn unpermute_qk(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    if n_head == 0 || rows % n_head != 0 || data.len() != rows.checked_mul(cols)? {
        return None;
    }
    let head_dim = rows / n_head;
    if head_dim % 2 != 0 {
        return None;
    }
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// An array: the element type id and the elements.
    Array(u32, Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

fn value_type_name(id: u32) -> &'static str {
    match id {
        0 => "uint8",
        1 => "int8",
        2 => "uint16",
        3 => "int16",
        4 => "uint32",
        5 => "int32",
        6 => "float32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "uint64",
        11 => "int64",
        12 => "float64",
        _ => "unknown",
    }
}

impl GgufValue {
    /// The GGUF type name of the value (`uint32`, `string`, `array of string`...).
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(t, _) => format!("array of {}", value_type_name(*t)),
            other => value_type_name(other.type_id()).to_string(),
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(..) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// The value as an integer, for any integer type.
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v as i128,
            GgufValue::I8(v) => v as i128,
            GgufValue::U16(v) => v as i128,
            GgufValue::I16(v) => v as i128,
            GgufValue::U32(v) => v as i128,
            GgufValue::I32(v) => v as i128,
            GgufValue::U64(v) => v as i128,
            GgufValue::I64(v) => v as i128,
            _ => return None,
        })
    }

    /// The value as a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// The value as a float (float32 or float64; integers are converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v as f64),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(_, v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor's entry in the GGUF header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (fastest-varying) first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset of the data from the start of the tensor data section.
    pub offset: u64,
    /// Size of the data in bytes (`None` for an unknown type).
    pub byte_size: Option<u64>,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        // Checked when the file was opened: cannot overflow.
        self.dims.iter().product()
    }

    /// The PyTorch shape: GGUF dims reversed (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let left = (self.buf.len() - self.pos) as u64;
        if n > left {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!(
                    "header cut short: {} needs {n} bytes at offset {}, but the file is only {} bytes",
                    what(),
                    self.pos,
                    self.buf.len()
                ),
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::Malformed {
            path: self.path.to_path_buf(),
            what: format!("{} is not valid UTF-8", what()),
        })
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(what)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => {
                let [b] = self.array(what)?;
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    other => {
                        return Err(GgufError::Malformed {
                            path: self.path.to_path_buf(),
                            what: format!("{} is a bool with byte value {other}", what()),
                        })
                    }
                }
            }
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Malformed {
                        path: self.path.to_path_buf(),
                        what: format!("{} nests arrays deeper than {MAX_ARRAY_DEPTH}", what()),
                    });
                }
                let elem_ty = self.u32(&|| format!("the element type of {}", what()))?;
                let count = self.u64(&|| format!("the length of {}", what()))?;
                // Every element takes at least one byte: never reserve more than the file holds.
                let mut items = Vec::with_capacity((count as usize).min(self.remaining()).min(MAX_RESERVE));
                for i in 0..count {
                    items.push(self.value(elem_ty, depth + 1, &|| format!("element {i} of {}", what()))?);
                }
                GgufValue::Array(elem_ty, items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(what)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(GgufError::Malformed {
                    path: self.path.to_path_buf(),
                    what: format!("{} has unknown value type {other}", what()),
                })
            }
        })
    }
}

/// An opened, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the tensor data.
    pub alignment: u64,
    /// Absolute offset of the tensor data section.
    pub data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<Mmap> {
    let io = |source| GgufError::Io { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and private to this process. Like every memory-mapped
    // reader, we rely on the file not being truncated by someone else while it is mapped.
    unsafe { Mmap::map(&file) }.map_err(io)
}

impl GgufFile {
    /// Open and parse a GGUF file, checking that every tensor's data lies inside it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = map_file(path)?;
        let (version, metadata, tensors, alignment, data_offset) = parse(path, &mmap)?;
        let index = metadata.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
        Ok(GgufFile { path: path.to_path_buf(), mmap, version, metadata, index, tensors, alignment, data_offset })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.req_str("general.architecture")
    }

    /// The raw bytes of a tensor.
    pub fn tensor_data(&self, info: &TensorInfo) -> Result<&[u8]> {
        let size = info.byte_size.ok_or_else(|| GgufError::UnsupportedTensorType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            ty: info.ty,
        })?;
        // Bounds were checked in `open`; check again rather than trust a hand-made TensorInfo.
        let start = self.data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.mmap.len() as u64 => Ok(&self.mmap[s as usize..e as usize]),
            _ => Err(GgufError::Truncated {
                path: self.path.clone(),
                what: format!("tensor '{}' data extends past the end of the file", info.name),
            }),
        }
    }

    /// A tensor dequantized to f32, in GGUF element order.
    pub fn dequantize_tensor(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        if !info.ty.is_supported() {
            return Err(GgufError::UnsupportedTensorType {
                path: self.path.clone(),
                tensor: info.name.clone(),
                ty: info.ty,
            });
        }
        let data = self.tensor_data(info)?;
        let n = usize::try_from(info.n_elements()).map_err(|_| GgufError::Malformed {
            path: self.path.clone(),
            what: format!("tensor '{}' is too large for this machine", info.name),
        })?;
        dequantize(info.ty, data, n).map_err(|e| match e {
            GgufError::UnsupportedType { ty } => {
                GgufError::UnsupportedTensorType { path: self.path.clone(), tensor: info.name.clone(), ty }
            }
            other => GgufError::Malformed { path: self.path.clone(), what: format!("tensor '{}': {other}", info.name) },
        })
    }

    fn req(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey { path: self.path.clone(), key: key.to_string() })
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
        GgufError::WrongType { path: self.path.clone(), key: key.to_string(), expected, found: v.type_name() }
    }

    /// A required string value.
    pub fn req_str(&self, key: &str) -> Result<&str> {
        let v = self.req(key)?;
        v.as_str().ok_or_else(|| self.wrong(key, "a string", v))
    }

    /// A required non-negative integer value.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        v.as_u64().ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    /// An optional non-negative integer value (an error if present with another type).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| self.wrong(key, "a non-negative integer", v)),
        }
    }

    /// An optional float value.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.wrong(key, "a number", v)),
        }
    }

    /// An optional bool value.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.wrong(key, "a bool", v)),
        }
    }

    /// An optional string value.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.wrong(key, "a string", v)),
        }
    }

    /// A required array of strings.
    pub fn req_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.req(key)?;
        let items = v.as_array().ok_or_else(|| self.wrong(key, "an array of strings", v))?;
        items.iter().map(|x| x.as_str().ok_or_else(|| self.wrong(key, "an array of strings", v))).collect()
    }

    /// An optional array of integers.
    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i128>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v.as_array().ok_or_else(|| self.wrong(key, "an array of integers", v))?;
        items
            .iter()
            .map(|x| x.as_i128().ok_or_else(|| self.wrong(key, "an array of integers", v)))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

type Parsed = (u32, Vec<(String, GgufValue)>, Vec<TensorInfo>, u64, u64);

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let malformed = |what: String| GgufError::Malformed { path: path.to_path_buf(), what };
    let mut c = Cursor { buf, pos: 0, path };
    let magic: [u8; 4] = c.array(&|| "the magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { path: path.to_path_buf(), found: magic });
    }
    let version = c.u32(&|| "the version".to_string())?;
    if version != 2 && version != 3 {
        let hint = match version.swap_bytes() {
            2 | 3 => " (this looks like a big-endian GGUF, which is not supported)".to_string(),
            _ if version == 1 => " (version 1 files predate 64-bit sizes; reconvert the model)".to_string(),
            _ => String::new(),
        };
        return Err(GgufError::UnsupportedVersion { path: path.to_path_buf(), version, hint });
    }
    let n_tensors = c.u64(&|| "the tensor count".to_string())?;
    let n_kv = c.u64(&|| "the metadata count".to_string())?;

    let mut metadata = Vec::with_capacity((n_kv as usize).min(c.remaining() / 13).min(MAX_RESERVE));
    for i in 0..n_kv {
        let key = c.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = c.u32(&|| format!("the value type of metadata key '{key}'"))?;
        let value = c.value(ty, 0, &|| format!("metadata key '{key}'"))?;
        metadata.push((key, value));
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    if let Some((_, v)) = metadata.iter().find(|(k, _)| k == "general.alignment") {
        alignment = match v.as_u64() {
            Some(a) if a > 0 => a,
            _ => return Err(malformed(format!("general.alignment must be a positive integer, found {v:?}"))),
        };
    }

    let mut tensors: Vec<TensorInfo> =
        Vec::with_capacity((n_tensors as usize).min(c.remaining() / 24).min(MAX_RESERVE));
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor {i}"))?;
        let n_dims = c.u32(&|| format!("the dimension count of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(malformed(format!("tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS} allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
        }
        let ty = GgmlType::from_id(c.u32(&|| format!("the type of tensor '{name}'"))?);
        let offset = c.u64(&|| format!("the data offset of tensor '{name}'"))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| malformed(format!("tensor '{name}' has too many elements: {dims:?}")))?;
        let byte_size = match ty.block_layout() {
            None => None,
            Some((block, _)) => {
                let inner = dims.first().copied().unwrap_or(1);
                if inner % block as u64 != 0 {
                    return Err(malformed(format!(
                        "tensor '{name}' of type {ty} has a row of {inner} elements, not a multiple of the block size {block}"
                    )));
                }
                Some(
                    ty.byte_size(n_elements)
                        .ok_or_else(|| malformed(format!("tensor '{name}' is too large: {dims:?}")))?,
                )
            }
        };
        if offset % alignment != 0 {
            return Err(malformed(format!(
                "tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        tensors.push(TensorInfo { name, dims, ty, offset, byte_size });
    }

    let end_of_header = c.pos as u64;
    let data_offset = end_of_header
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| malformed("the data offset overflows".to_string()))?;

    let file_len = buf.len() as u64;
    for t in &tensors {
        let Some(size) = t.byte_size else { continue };
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size));
        match end {
            Some(e) if e <= file_len => {}
            _ => {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    what: format!(
                    "tensor '{}' data ({size} bytes at offset {}) extends past the end of the file ({file_len} bytes)",
                    t.name,
                    start.map(|s| s.to_string()).unwrap_or_else(|| "overflow".into()),
                ),
                })
            }
        }
    }
    Ok((version, metadata, tensors, alignment, data_offset))
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// What [`import_gguf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    /// `general.architecture`: `llama`, `qwen2` or `qwen3`.
    pub architecture: String,
    /// Tensors written to `model.safetensors`.
    pub n_tensors: usize,
    /// Total number of values in those tensors.
    pub n_parameters: u64,
    /// ggml types of the source tensors, with how many tensors had each.
    pub types: BTreeMap<GgmlType, usize>,
    /// True when the GGUF has no `output.weight`, so `lm_head` is tied to the embeddings.
    pub tied_embeddings: bool,
    /// The files written, relative to `out_dir`.
    pub files: Vec<String>,
}

/// The GGUF architectures the importer reads (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArch {
    Llama,
    /// Qwen2 and Qwen2.5: q/k/v biases.
    Qwen2,
    /// Qwen3: per-head q/k norms, optional attention biases.
    Qwen3,
}

impl GgufArch {
    /// The metadata key prefix, which is also the name in `general.architecture`.
    pub fn name(self) -> &'static str {
        match self {
            GgufArch::Llama => "llama",
            GgufArch::Qwen2 => "qwen2",
            GgufArch::Qwen3 => "qwen3",
        }
    }
    fn hf_architecture(self) -> &'static str {
        match self {
            GgufArch::Llama => "LlamaForCausalLM",
            GgufArch::Qwen2 => "Qwen2ForCausalLM",
            GgufArch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// Hyper-parameters read from the `<arch>.*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub arch: GgufArch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub context_length: usize,
    pub vocab_size: usize,
    pub rope_scaling: Value,
}

/// The shortest decimal that round-trips through f32: keeps `1e-5` as written in the original
/// config instead of the f32's exact binary value.
fn f32_decimal(v: f64) -> f64 {
    let f = v as f32;
    if (f as f64) == v {
        format!("{f}").parse::<f64>().unwrap_or(v)
    } else {
        v
    }
}

fn usize_of(g: &GgufFile, key: &str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| GgufError::Malformed {
        path: g.path.clone(),
        what: format!("metadata key '{key}' value {v} is too large"),
    })
}

impl LlamaParams {
    /// Read the hyper-parameters of a `llama`, `qwen2` or `qwen3` GGUF.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let found = g.architecture()?;
        let arch = [GgufArch::Llama, GgufArch::Qwen2, GgufArch::Qwen3]
            .into_iter()
            .find(|a| a.name() == found)
            .ok_or_else(|| GgufError::UnsupportedArchitecture { path: g.path.clone(), found: found.to_string() })?;
        let a = arch.name();
        let req = |k: &str| -> Result<usize> {
            let key = format!("{a}.{k}");
            usize_of(g, &key, g.req_u64(&key)?)
        };
        let opt = |k: &str| -> Result<Option<usize>> {
            let key = format!("{a}.{k}");
            g.opt_u64(&key)?.map(|v| usize_of(g, &key, v)).transpose()
        };
        let n_layer = req("block_count")?;
        let n_embd = req("embedding_length")?;
        let n_ff = req("feed_forward_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = opt("attention.head_count_kv")?.unwrap_or(n_head);
        let context_length = req("context_length")?;
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("head counts {n_head} (query) and {n_head_kv} (key/value) do not fit"),
            });
        }
        let head_dim = match opt("attention.key_length")? {
            Some(d) => d,
            None => {
                if n_embd % n_head != 0 {
                    return Err(GgufError::Malformed {
                        path: g.path.clone(),
                        what: format!("embedding length {n_embd} is not a multiple of the head count {n_head}"),
                    });
                }
                n_embd / n_head
            }
        };
        if let Some(v) = opt("attention.value_length")? {
            if v != head_dim {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("value head size {v} differs from key head size {head_dim}"),
                });
            }
        }
        if let Some(rot) = opt("rope.dimension_count")? {
            if rot != head_dim {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("partial rotary embeddings ({a}.rope.dimension_count {rot} < head size {head_dim})"),
                });
            }
        }
        if g.tensor("rope_freqs.weight").is_some() {
            return Err(GgufError::Unsupported {
                path: g.path.clone(),
                what: "Llama-3-style rope scaling stored as the tensor 'rope_freqs.weight' (its parameters are not in the metadata)".into(),
            });
        }
        if let Some(n) = opt("expert_count")? {
            if n > 0 {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("mixture of experts ({a}.expert_count = {n})"),
                });
            }
        }
        let rms_norm_eps = g.opt_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?.ok_or_else(|| {
            GgufError::MissingKey { path: g.path.clone(), key: format!("{a}.attention.layer_norm_rms_epsilon") }
        })?;
        let rope_theta = g.opt_f64(&format!("{a}.rope.freq_base"))?.unwrap_or(10000.0);
        let rope_scaling = match g.opt_str(&format!("{a}.rope.scaling.type"))? {
            None | Some("none") => Value::Null,
            Some(kind @ ("linear" | "yarn")) => {
                let factor = g.opt_f64(&format!("{a}.rope.scaling.factor"))?.ok_or_else(|| GgufError::MissingKey {
                    path: g.path.clone(),
                    key: format!("{a}.rope.scaling.factor"),
                })?;
                let mut m = Map::new();
                m.insert("rope_type".into(), json!(kind));
                m.insert("factor".into(), json!(f32_decimal(factor)));
                if kind == "yarn" {
                    if let Some(orig) = opt("rope.scaling.original_context_length")? {
                        m.insert("original_max_position_embeddings".into(), json!(orig));
                    }
                }
                Value::Object(m)
            }
            Some(other) => {
                return Err(GgufError::Unsupported {
                    path: g.path.clone(),
                    what: format!("rope scaling type '{other}'"),
                })
            }
        };
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor { path: g.path.clone(), name: "token_embd.weight".into() })?;
        let vocab_size = match embd.dims.as_slice() {
            [cols, rows] if *cols as usize == n_embd => *rows as usize,
            _ => {
                return Err(GgufError::Malformed {
                    path: g.path.clone(),
                    what: format!("token_embd.weight has GGUF dims {:?}, expected [{n_embd}, vocab]", embd.dims),
                })
            }
        };
        Ok(LlamaParams {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rms_norm_eps: f32_decimal(rms_norm_eps),
            rope_theta: f32_decimal(rope_theta),
            context_length,
            vocab_size,
            rope_scaling,
        })
    }
}

/// What to do to a tensor on the way out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fix {
    None,
    /// Undo the rotary permutation with this many heads.
    Unpermute(usize),
}

/// The Hugging Face name of a GGUF tensor, and the fix it needs.
fn hf_name(name: &str, p: &LlamaParams) -> Option<(String, Fix)> {
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), Fix::None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), Fix::None)),
        "output.weight" => return Some(("lm_head.weight".into(), Fix::None)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= p.n_layer || layer.to_string() != rest.split_once('.')?.0 {
        return None;
    }
    // llama.cpp permutes the rows of Llama's q and k for its rotary layout; Qwen's use the
    // same (NeoX) layout as transformers and are stored as they are.
    let (q_fix, k_fix) = match p.arch {
        GgufArch::Llama => (Fix::Unpermute(p.n_head), Fix::Unpermute(p.n_head_kv)),
        GgufArch::Qwen2 | GgufArch::Qwen3 => (Fix::None, Fix::None),
    };
    let qwen3 = p.arch == GgufArch::Qwen3;
    let (hf, fix) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", Fix::None),
        "attn_q.weight" => ("self_attn.q_proj.weight", q_fix),
        "attn_k.weight" => ("self_attn.k_proj.weight", k_fix),
        "attn_q.bias" if p.arch != GgufArch::Llama => ("self_attn.q_proj.bias", Fix::None),
        "attn_k.bias" if p.arch != GgufArch::Llama => ("self_attn.k_proj.bias", Fix::None),
        "attn_v.bias" if p.arch != GgufArch::Llama => ("self_attn.v_proj.bias", Fix::None),
        "attn_output.bias" if qwen3 => ("self_attn.o_proj.bias", Fix::None),
        "attn_q_norm.weight" if qwen3 => ("self_attn.q_norm.weight", Fix::None),
        "attn_k_norm.weight" if qwen3 => ("self_attn.k_norm.weight", Fix::None),
        "attn_v.weight" => ("self_attn.v_proj.weight", Fix::None),
        "attn_output.weight" => ("self_attn.o_proj.weight", Fix::None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", Fix::None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", Fix::None),
        "ffn_up.weight" => ("mlp.up_proj.weight", Fix::None),
        "ffn_down.weight" => ("mlp.down_proj.weight", Fix::None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), fix))
}

/// The PyTorch shape each Hugging Face tensor must have.
fn expected_shape(hf: &str, p: &LlamaParams) -> Option<Vec<usize>> {
    let q = p.n_head.saturating_mul(p.head_dim);
    let kv = p.n_head_kv.saturating_mul(p.head_dim);
    let suffix = hf.rsplit_once("layers.").map(|(_, s)| s.split_once('.').map(|x| x.1).unwrap_or(""));
    Some(match (hf, suffix) {
        ("model.embed_tokens.weight", _) | ("lm_head.weight", _) => vec![p.vocab_size, p.n_embd],
        ("model.norm.weight", _) => vec![p.n_embd],
        (_, Some("input_layernorm.weight")) | (_, Some("post_attention_layernorm.weight")) => {
            vec![p.n_embd]
        }
        (_, Some("self_attn.q_proj.weight")) => vec![q, p.n_embd],
        (_, Some("self_attn.k_proj.weight")) | (_, Some("self_attn.v_proj.weight")) => {
            vec![kv, p.n_embd]
        }
        (_, Some("self_attn.o_proj.weight")) => vec![p.n_embd, q],
        (_, Some("self_attn.q_proj.bias")) => vec![q],
        (_, Some("self_attn.k_proj.bias")) | (_, Some("self_attn.v_proj.bias")) => vec![kv],
        (_, Some("self_attn.o_proj.bias")) => vec![p.n_embd],
        (_, Some("self_attn.q_norm.weight")) | (_, Some("self_attn.k_norm.weight")) => vec![p.head_dim],
        (_, Some("mlp.gate_proj.weight")) | (_, Some("mlp.up_proj.weight")) => {
            vec![p.n_ff, p.n_embd]
        }
        (_, Some("mlp.down_proj.weight")) => vec![p.n_embd, p.n_ff],
        _ => return None,
    })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io { path: path.to_path_buf(), source }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| GgufError::Json { path: path.to_path_buf(), source })?;
    text.push('\n');
    std::fs::write(path, text).map_err(io_err(path))
}

/// Import a llama GGUF as a Hugging Face model directory (see the module docs).
pub fn import_gguf(gguf: &Path, out_dir: &Path) -> Result<ImportSummary> {
    let g = GgufFile::open(gguf)?;
    let p = LlamaParams::from_gguf(&g)?;

    // Plan every tensor before writing anything, so bad input leaves no half-written directory.
    struct Planned<'a> {
        hf: String,
        info: &'a TensorInfo,
        shape: Vec<usize>,
        fix: Fix,
    }
    let mut plan: Vec<Planned> = Vec::with_capacity(g.tensors.len());
    let mut types = BTreeMap::new();
    for t in &g.tensors {
        if !t.ty.is_supported() {
            return Err(GgufError::UnsupportedTensorType { path: g.path.clone(), tensor: t.name.clone(), ty: t.ty });
        }
        let (hf, fix) = hf_name(&t.name, &p).ok_or_else(|| GgufError::Unsupported {
            path: g.path.clone(),
            what: format!("tensor '{}' has no Hugging Face Llama equivalent", t.name),
        })?;
        let shape = t.shape();
        let want = expected_shape(&hf, &p).unwrap_or_default();
        if shape != want {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!(
                    "tensor '{}' has shape {shape:?} (PyTorch order), expected {want:?} from the metadata",
                    t.name
                ),
            });
        }
        if plan.iter().any(|x| x.hf == hf) {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("tensor '{}' appears twice", t.name),
            });
        }
        *types.entry(t.ty).or_insert(0) += 1;
        plan.push(Planned { hf, info: t, shape, fix });
    }
    let mut required = vec!["token_embd.weight".to_string(), "output_norm.weight".to_string()];
    for l in 0..p.n_layer {
        for part in
            ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
        {
            required.push(format!("blk.{l}.{part}.weight"));
        }
        match p.arch {
            GgufArch::Llama => {}
            GgufArch::Qwen2 => required.extend(["attn_q", "attn_k", "attn_v"].map(|x| format!("blk.{l}.{x}.bias"))),
            GgufArch::Qwen3 => {
                required.extend(["attn_q_norm", "attn_k_norm"].map(|x| format!("blk.{l}.{x}.weight")));
                // Qwen3's attention_bias puts biases on all four projections, or none.
                let biases = ["attn_q", "attn_k", "attn_v", "attn_output"].map(|x| format!("blk.{l}.{x}.bias"));
                let present = biases.iter().filter(|n| g.tensor(n).is_some()).count();
                if present != 0 && present != 4 {
                    return Err(GgufError::Malformed {
                        path: g.path.clone(),
                        what: format!("layer {l} has {present} of the 4 attention biases (all or none)"),
                    });
                }
            }
        }
    }
    for name in required {
        if g.tensor(&name).is_none() {
            return Err(GgufError::MissingTensor { path: g.path.clone(), name });
        }
    }
    let tied = g.tensor("output.weight").is_none();
    let attention_bias = g.tensor("blk.0.attn_output.bias").is_some();
    plan.sort_by(|a, b| a.hf.cmp(&b.hf));

    // Build the text files first too: a tokenizer problem should fail before the big write.
    let tokenizer = build_tokenizer_json(&g)?;
    let tokenizer_config = build_tokenizer_config(&g, &p)?;
    let config = build_config(&g, &p, tied, attention_bias)?;
    let generation_config = build_generation_config(&g)?;

    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;

    // model.safetensors, streamed one tensor at a time.
    let st_path = out_dir.join("model.safetensors");
    let tmp_path = out_dir.join("model.safetensors.partial");
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in &plan {
        let bytes = t.info.n_elements() * 4;
        header
            .insert(t.hf.clone(), json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut header_text = serde_json::to_string(&Value::Object(header))
        .map_err(|source| GgufError::Json { path: st_path.clone(), source })?;
    while header_text.len() % 8 != 0 {
        header_text.push(' ');
    }
    let mut n_parameters = 0u64;
    {
        let file = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let werr = io_err(&tmp_path);
        w.write_all(&(header_text.len() as u64).to_le_bytes()).map_err(&werr)?;
        w.write_all(header_text.as_bytes()).map_err(&werr)?;
        let mut bytes = Vec::new();
        for t in &plan {
            let mut values = g.dequantize_tensor(t.info)?;
            if let Fix::Unpermute(n_head) = t.fix {
                let (rows, cols) = (t.shape[0], t.shape[1]);
                values = unpermute_qk(&values, rows, cols, n_head).ok_or_else(|| GgufError::Malformed {
                    path: g.path.clone(),
                    what: format!(
                        "tensor '{}' with {rows} rows cannot be split into {n_head} rotary heads",
                        t.info.name
                    ),
                })?;
            }
            n_parameters += values.len() as u64;
            bytes.clear();
            bytes.reserve(values.len() * 4);
            for v in &values {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            w.write_all(&bytes).map_err(&werr)?;
        }
        w.flush().map_err(&werr)?;
    }
    std::fs::rename(&tmp_path, &st_path).map_err(io_err(&st_path))?;

    write_json(&out_dir.join("config.json"), &config)?;
    write_json(&out_dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(&out_dir.join("generation_config.json"), &generation_config)?;

    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        architecture: p.arch.name().into(),
        n_tensors: plan.len(),
        n_parameters,
        types,
        tied_embeddings: tied,
        files: [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    })
}

/// The id of a special token: `name` is bos, eos, unk or pad (GGUF spells the last two
/// `unknown` and `padding`).
fn special_id(g: &GgufFile, name: &str) -> Result<Option<u64>> {
    let key = match name {
        "unk" => "unknown",
        "pad" => "padding",
        other => other,
    };
    g.opt_u64(&format!("tokenizer.ggml.{key}_token_id"))
}

/// `config.json` for `LlamaForCausalLM`, `Qwen2ForCausalLM` or `Qwen3ForCausalLM`;
/// `attention_bias` (Qwen3) when the file has biases on the attention projections.
pub fn build_config(g: &GgufFile, p: &LlamaParams, tied: bool, attention_bias: bool) -> Result<Value> {
    let mut c = Map::new();
    c.insert("architectures".into(), json!([p.arch.hf_architecture()]));
    c.insert("model_type".into(), json!(p.arch.name()));
    c.insert("hidden_size".into(), json!(p.n_embd));
    c.insert("intermediate_size".into(), json!(p.n_ff));
    c.insert("num_hidden_layers".into(), json!(p.n_layer));
    c.insert("num_attention_heads".into(), json!(p.n_head));
    c.insert("num_key_value_heads".into(), json!(p.n_head_kv));
    c.insert("head_dim".into(), json!(p.head_dim));
    c.insert("rms_norm_eps".into(), json!(p.rms_norm_eps));
    c.insert("rope_theta".into(), json!(p.rope_theta));
    c.insert("rope_scaling".into(), p.rope_scaling.clone());
    c.insert("max_position_embeddings".into(), json!(p.context_length));
    c.insert("vocab_size".into(), json!(p.vocab_size));
    c.insert("tie_word_embeddings".into(), json!(tied));
    for name in ["bos", "eos", "pad"] {
        if let Some(id) = special_id(g, name)? {
            c.insert(format!("{name}_token_id"), json!(id));
        } else if name != "pad" {
            c.insert(format!("{name}_token_id"), Value::Null);
        }
    }
    c.insert("torch_dtype".into(), json!("float32"));
    c.insert("hidden_act".into(), json!("silu"));
    match p.arch {
        GgufArch::Llama => {
            c.insert("attention_bias".into(), json!(false));
            c.insert("mlp_bias".into(), json!(false));
            c.insert("pretraining_tp".into(), json!(1));
        }
        // Qwen2's q/k/v biases are implied by the architecture.
        GgufArch::Qwen2 => {
            c.insert("use_sliding_window".into(), json!(false));
        }
        GgufArch::Qwen3 => {
            c.insert("attention_bias".into(), json!(attention_bias));
            c.insert("use_sliding_window".into(), json!(false));
        }
    }
    c.insert("attention_dropout".into(), json!(0.0));
    c.insert("initializer_range".into(), json!(0.02));
    c.insert("use_cache".into(), json!(true));
    Ok(Value::Object(c))
}

/// `generation_config.json`.
pub fn build_generation_config(g: &GgufFile) -> Result<Value> {
    let mut c = Map::new();
    for name in ["bos", "eos", "pad"] {
        if let Some(id) = special_id(g, name)? {
            c.insert(format!("{name}_token_id"), json!(id));
        }
    }
    c.insert("_from_model_config".into(), json!(true));
    Ok(Value::Object(c))
}

/// llama.cpp token types.
const TOKEN_CONTROL: i128 = 3;
const TOKEN_USER_DEFINED: i128 = 4;

/// The Llama-3 pre-tokenizer split regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer split regex (as Llama-3's, but one digit at a time).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn token_text<'a>(g: &GgufFile, tokens: &[&'a str], id: Option<u64>, key: &str) -> Result<Option<&'a str>> {
    match id {
        None => Ok(None),
        Some(i) => tokens.get(i as usize).copied().map(Some).ok_or_else(|| GgufError::Malformed {
            path: g.path.clone(),
            what: format!("tokenizer.ggml.{key}_token_id {i} is outside the vocabulary of {} tokens", tokens.len()),
        }),
    }
}

/// `tokenizer.json` rebuilt from the GGUF vocabulary (byte-level BPE only).
pub fn build_tokenizer_json(g: &GgufFile) -> Result<Value> {
    let unsupported = |what: String| GgufError::UnsupportedTokenizer { path: g.path.clone(), what };
    let model = g.req_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(unsupported(format!(
            "tokenizer.ggml.model is '{model}'; only 'gpt2' (byte-level BPE) is supported"
        )));
    }
    let pre = g
        .opt_str("tokenizer.ggml.pre")?
        .ok_or_else(|| unsupported("tokenizer.ggml.pre is missing, so the pre-tokenizer is unknown".into()))?;
    let pre_tokenizer = match pre {
        "smollm" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(false, true, true),
            ],
        }),
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_SPLIT},
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level(false, true, false),
            ],
        }),
        // Qwen2, Qwen2.5 and Qwen3: the Llama-3 split with single digits.
        "qwen2" => json!({
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_SPLIT},
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level(false, false, false),
            ],
        }),
        "gpt-2" | "gpt2" => byte_level(false, true, true),
        other => {
            return Err(unsupported(format!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported; supported: smollm, llama-bpe, llama3, llama-v3, smaug-bpe, qwen2, gpt-2"
            )))
        }
    };
    let tokens = g.req_str_array("tokenizer.ggml.tokens")?;
    let merges = g.req_str_array("tokenizer.ggml.merges")?;
    let types = g.opt_int_array("tokenizer.ggml.token_type")?;
    if let Some(t) = &types {
        if t.len() != tokens.len() {
            return Err(GgufError::Malformed {
                path: g.path.clone(),
                what: format!("tokenizer.ggml.token_type has {} entries for {} tokens", t.len(), tokens.len()),
            });
        }
    }

    let mut vocab = Map::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
    }
    let mut merge_list = Vec::with_capacity(merges.len());
    for m in &merges {
        let (a, b) = m.split_once(' ').ok_or_else(|| GgufError::Malformed {
            path: g.path.clone(),
            what: format!("merge '{m}' in tokenizer.ggml.merges is not two tokens separated by a space"),
        })?;
        merge_list.push(json!([a, b]));
    }
    let mut added = Vec::new();
    if let Some(types) = &types {
        for (id, (&tok, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                added.push(json!({
                    "id": id,
                    "content": tok,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": ty == TOKEN_CONTROL,
                }));
            }
        }
    }

    let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = token_text(g, &tokens, special_id(g, "bos")?, "bos")?;
    let eos = token_text(g, &tokens, special_id(g, "eos")?, "eos")?;
    let mut post_processor = byte_level(true, false, true);
    if add_bos || add_eos {
        let mut specials = Map::new();
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let special = |name: &str, tok: Option<&str>, id: Option<u64>| -> Result<(Value, Value)> {
            let tok = tok.ok_or_else(|| GgufError::MissingKey {
                path: g.path.clone(),
                key: format!("tokenizer.ggml.{name}_token_id"),
            })?;
            Ok((json!({"SpecialToken": {"id": tok, "type_id": 0}}), json!({"id": tok, "ids": [id], "tokens": [tok]})))
        };
        let bos_parts = if add_bos { Some(special("bos", bos, special_id(g, "bos")?)?) } else { None };
        let eos_parts = if add_eos { Some(special("eos", eos, special_id(g, "eos")?)?) } else { None };
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let target = if seq == "A" { &mut single } else { &mut pair };
            if let Some((piece, def)) = &bos_parts {
                let mut piece = piece.clone();
                piece["SpecialToken"]["type_id"] = json!(type_id);
                target.push(piece);
                specials.insert(bos.unwrap_or_default().to_string(), def.clone());
            }
            target.push(json!({"Sequence": {"id": seq, "type_id": type_id}}));
            if let Some((piece, def)) = &eos_parts {
                let mut piece = piece.clone();
                piece["SpecialToken"]["type_id"] = json!(type_id);
                target.push(piece);
                specials.insert(eos.unwrap_or_default().to_string(), def.clone());
            }
        }
        let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
        post_processor = json!({
            "type": "Sequence",
            "processors": [
                byte_level(true, false, true),
                {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials},
            ],
        });
    }

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true, true, true),
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merge_list,
        },
    }))
}

/// `tokenizer_config.json`: special tokens, BOS/EOS flags, chat template.
pub fn build_tokenizer_config(g: &GgufFile, p: &LlamaParams) -> Result<Value> {
    let tokens = g.req_str_array("tokenizer.ggml.tokens")?;
    let types = g.opt_int_array("tokenizer.ggml.token_type")?;
    let mut c = Map::new();
    c.insert("add_bos_token".into(), json!(g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false)));
    c.insert("add_eos_token".into(), json!(g.opt_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false)));
    let mut decoder = Map::new();
    if let Some(types) = &types {
        for (id, (&tok, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
            if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
                decoder.insert(
                    id.to_string(),
                    json!({
                        "content": tok,
                        "lstrip": false,
                        "normalized": false,
                        "rstrip": false,
                        "single_word": false,
                        "special": ty == TOKEN_CONTROL,
                    }),
                );
            }
        }
    }
    c.insert("added_tokens_decoder".into(), Value::Object(decoder));
    for name in ["bos", "eos", "unk", "pad"] {
        let text = token_text(g, &tokens, special_id(g, name)?, name)?;
        c.insert(format!("{name}_token"), json!(text));
    }
    if let Some(t) = g.opt_str("tokenizer.chat_template")? {
        c.insert("chat_template".into(), json!(t));
    }
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    c.insert("model_max_length".into(), json!(p.context_length));
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(Value::Object(c))
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn f32_f16_bf16() {
        let data: Vec<u8> = [1.5f32, -2.25, 0.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dequantize(GgmlType::F32, &data, 3).unwrap(), vec![1.5, -2.25, 0.0]);

        let data: Vec<u8> = [h(1.5), h(-0.125), [0x00, 0x7c], [0x01, 0x00]].concat();
        let y = dequantize(GgmlType::F16, &data, 4).unwrap();
        assert_eq!(y[..3], [1.5, -0.125, f32::INFINITY]);
        assert_eq!(y[3], 2f32.powi(-24)); // smallest f16 subnormal

        // bf16 is the top half of an f32
        let bits = (3.0f32).to_bits() >> 16;
        let data = (bits as u16).to_le_bytes();
        assert_eq!(dequantize(GgmlType::BF16, &data, 1).unwrap(), vec![3.0]);
    }

    #[test]
    fn q8_0() {
        let mut b = h(0.5).to_vec();
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.5);
        }
    }

    #[test]
    fn q4_0() {
        let mut b = h(2.0).to_vec();
        // low nibble j, high nibble 15 - j
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
            assert_eq!(y[j + 16], ((15 - j) as f32 - 8.0) * 2.0);
        }
    }

    #[test]
    fn q4_1() {
        let mut b = [h(0.25), h(-1.0)].concat();
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
    }

    #[test]
    fn q5_0_and_q5_1() {
        // fifth bit set for odd j (both halves)
        let qh: u32 = 0xAAAA_AAAA;
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let expect_q = |j: usize| -> u32 {
            let low = if j < 16 { j as u32 } else { 15 - (j as u32 - 16) };
            low | if j % 2 == 1 { 16 } else { 0 }
        };
        let mut b = h(0.5).to_vec();
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (expect_q(j) as f32 - 16.0) * 0.5, "Q5_0 element {j}");
        }
        let mut b = [h(0.5), h(3.0)].concat();
        b.extend(qh.to_le_bytes());
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, expect_q(j) as f32 * 0.5 + 3.0, "Q5_1 element {j}");
        }
    }

    /// Pack eight 6-bit (scale, min) pairs the way Q4_K/Q5_K store them.
    fn pack_k4_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut q = [0u8; 12];
        for j in 0..4 {
            q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            q[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
        }
        q
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [1, 63, 17, 32, 45, 2, 60, 33];
        let m = [0, 5, 62, 31, 16, 48, 7, 63];
        let q = pack_k4_scales(sc, m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]));
        }
    }

    #[test]
    fn q4_k_and_q5_k() {
        let sc = [1, 2, 3, 4, 40, 50, 60, 63];
        let m = [0, 1, 2, 3, 20, 30, 40, 63];
        let (d, dmin) = (0.5f32, 0.25f32);
        let qs: Vec<u8> = (0..128u32).map(|i| ((i * 7) % 256) as u8).collect();
        let qh: Vec<u8> = (0..32u32).map(|i| ((i * 37) % 256) as u8).collect();
        let elem = |k: usize, l: usize, with_high: bool| -> f32 {
            // sub-block k (0..8), element l (0..32)
            let byte = qs[(k / 2) * 32 + l];
            let mut q = if k % 2 == 0 { byte & 0x0f } else { byte >> 4 };
            if with_high {
                q |= ((qh[l] >> k) & 1) << 4;
            }
            (d * sc[k] as f32) * q as f32 - dmin * m[k] as f32
        };
        let mut b = [h(d), h(dmin)].concat();
        b.extend(pack_k4_scales(sc, m));
        b.extend(&qs);
        let y = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
        for k in 0..8 {
            for l in 0..32 {
                assert_eq!(y[k * 32 + l], elem(k, l, false), "Q4_K sub-block {k} element {l}");
            }
        }
        let mut b = [h(d), h(dmin)].concat();
        b.extend(pack_k4_scales(sc, m));
        b.extend(&qh);
        b.extend(&qs);
        let y = dequantize(GgmlType::Q5_K, &b, 256).unwrap();
        for k in 0..8 {
            for l in 0..32 {
                assert_eq!(y[k * 32 + l], elem(k, l, true), "Q5_K sub-block {k} element {l}");
            }
        }
    }

    #[test]
    fn q6_k() {
        // Build from wanted 6-bit values q[0..256] and sixteen scales.
        let q: Vec<u8> = (0..256u32).map(|i| ((i * 13 + 5) % 64) as u8).collect();
        let scales: Vec<i8> = (0..16).map(|i| (i as i8 - 8) * 9).collect();
        let d = 0.125f32;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            for l in 0..32 {
                let base = half * 128;
                let (a, b2, c, e) = (q[base + l], q[base + l + 32], q[base + l + 64], q[base + l + 96]);
                ql[half * 64 + l] = (a & 0x0f) | ((c & 0x0f) << 4);
                ql[half * 64 + l + 32] = (b2 & 0x0f) | ((e & 0x0f) << 4);
                qh[half * 32 + l] = (a >> 4) | ((b2 >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
            }
        }
        let mut b = ql.to_vec();
        b.extend(qh);
        b.extend(scales.iter().map(|&s| s as u8));
        b.extend(h(d));
        let y = dequantize(GgmlType::Q6_K, &b, 256).unwrap();
        for i in 0..256 {
            let want = (d * scales[i / 16] as f32) * (q[i] as i32 - 32) as f32;
            assert_eq!(y[i], want, "Q6_K element {i}");
        }
    }

    #[test]
    fn dequantize_rejects_bad_sizes_and_types() {
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0u8; 17], 32), Err(GgufError::BadTensorData { .. })));
        assert!(matches!(dequantize(GgmlType::Q4_0, &[0u8; 18], 31), Err(GgufError::BadTensorData { .. })));
        let e = dequantize(GgmlType::IQ2_XXS, &[0u8; 66], 256).unwrap_err();
        assert!(matches!(e, GgufError::UnsupportedType { ty: GgmlType::IQ2_XXS }));
        assert!(e.to_string().contains("IQ2_XXS"), "{e}");
        let e = dequantize(GgmlType::from_id(99), &[], 0).unwrap_err();
        assert!(e.to_string().contains("99"), "{e}");
    }

    #[test]
    fn type_ids_round_trip() {
        for &(id, ty, ..) in TYPE_TABLE {
            assert_eq!(GgmlType::from_id(id), ty);
            assert_eq!(ty.id(), id);
        }
        assert_eq!(GgmlType::from_id(4), GgmlType::Unknown(4));
        assert_eq!(GgmlType::Q4_1.to_string(), "Q4_1");
    }

    /// llama.cpp's forward permutation: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = vec![0f32; w.len()];
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    // permuted index (h, i, j) takes original index (h, j, i)
                    let dst = h * hd + i * 2 + j;
                    let src = h * hd + j * half + i;
                    out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_small_example() {
        // one head of 4 rows: HF rows [0,1,2,3] are stored as [0,2,1,3]
        assert_eq!(unpermute_qk(&[0., 2., 1., 3.], 4, 1, 1).unwrap(), vec![0., 1., 2., 3.]);
        // two heads of 6 rows, 2 columns
        let rows = 12;
        let cols = 2;
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, cols, 2);
        // head 0, permuted row 1 = original row 3 (j = 1, i = 0 with half = 3)
        assert_eq!(&p[2..4], &w[6..8]);
        assert_eq!(unpermute_qk(&p, rows, cols, 2).unwrap(), w);
    }

    #[test]
    fn unpermute_inverts_permute_for_q_and_k_shapes() {
        // SmolLM2-like: 9 query heads, 3 kv heads, head_dim 64, 8 columns
        for (n_head, rows) in [(9usize, 576usize), (3, 192)] {
            let cols = 8;
            let w: Vec<f32> = (0..rows * cols).map(|x| (x as f32).sin()).collect();
            let p = permute(&w, rows, cols, n_head);
            assert_ne!(p, w);
            assert_eq!(unpermute_qk(&p, rows, cols, n_head).unwrap(), w);
        }
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 4).is_none());
        assert!(unpermute_qk(&[0.0; 6], 6, 1, 2).is_none()); // odd head_dim
    }

    fn gguf_bytes(version: u32, kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(version.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        for (k, t, v) in kvs {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            b.extend(t.to_le_bytes());
            b.extend(v);
        }
        b
    }

    fn gguf_string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn parses_metadata_types() {
        let mut arr = 4u32.to_le_bytes().to_vec(); // array of u32
        arr.extend(2u64.to_le_bytes());
        arr.extend(7u32.to_le_bytes());
        arr.extend(9u32.to_le_bytes());
        let kvs = vec![
            ("a.u8", 0, vec![5]),
            ("a.i8", 1, vec![0xff]),
            ("a.u16", 2, 513u16.to_le_bytes().to_vec()),
            ("a.i16", 3, (-2i16).to_le_bytes().to_vec()),
            ("a.i32", 5, (-7i32).to_le_bytes().to_vec()),
            ("a.f32", 6, 1.5f32.to_le_bytes().to_vec()),
            ("a.bool", 7, vec![1]),
            ("a.str", 8, gguf_string("héllo")),
            ("a.arr", 9, arr),
            ("a.u64", 10, 1u64.to_le_bytes().to_vec()),
            ("a.i64", 11, (-1i64).to_le_bytes().to_vec()),
            ("a.f64", 12, 2.5f64.to_le_bytes().to_vec()),
        ];
        let bytes = gguf_bytes(3, &kvs);
        let (version, md, tensors, align, off) = parse(Path::new("x.gguf"), &bytes).unwrap();
        assert_eq!((version, tensors.len(), align), (3, 0, 32));
        assert_eq!(off, (bytes.len() as u64).div_ceil(32) * 32);
        let get = |k: &str| md.iter().find(|(kk, _)| kk == k).unwrap().1.clone();
        assert_eq!(get("a.u8"), GgufValue::U8(5));
        assert_eq!(get("a.i8"), GgufValue::I8(-1));
        assert_eq!(get("a.u16"), GgufValue::U16(513));
        assert_eq!(get("a.i16"), GgufValue::I16(-2));
        assert_eq!(get("a.i32"), GgufValue::I32(-7));
        assert_eq!(get("a.f32"), GgufValue::F32(1.5));
        assert_eq!(get("a.bool"), GgufValue::Bool(true));
        assert_eq!(get("a.str"), GgufValue::String("héllo".into()));
        assert_eq!(get("a.arr"), GgufValue::Array(4, vec![GgufValue::U32(7), GgufValue::U32(9)]));
        assert_eq!(get("a.u64"), GgufValue::U64(1));
        assert_eq!(get("a.i64"), GgufValue::I64(-1));
        assert_eq!(get("a.f64"), GgufValue::F64(2.5));
        assert_eq!(get("a.arr").type_name(), "array of uint32");
    }

    #[test]
    fn parse_errors() {
        let p = Path::new("bad.gguf");
        assert!(matches!(parse(p, b"GGU"), Err(GgufError::Truncated { .. })));
        assert!(matches!(parse(p, b"GGML\x03\0\0\0"), Err(GgufError::BadMagic { .. })));
        let e = parse(p, &gguf_bytes(1, &[])).unwrap_err();
        assert!(matches!(e, GgufError::UnsupportedVersion { version: 1, .. }), "{e}");
        let mut big = b"GGUF".to_vec();
        big.extend(3u32.to_be_bytes());
        let e = parse(p, &big).unwrap_err();
        assert!(e.to_string().contains("big-endian"), "{e}");
        // a string claiming to be enormous
        let mut b = gguf_bytes(3, &[("k", 8, u64::MAX.to_le_bytes().to_vec())]);
        b.truncate(b.len());
        let e = parse(p, &b).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("metadata key 'k'"), "{e}");
        // array with a huge count
        let mut arr = 0u32.to_le_bytes().to_vec();
        arr.extend(u64::MAX.to_le_bytes());
        let e = parse(p, &gguf_bytes(3, &[("k", 9, arr)])).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        // unknown value type
        let e = parse(p, &gguf_bytes(3, &[("k", 77, vec![])])).unwrap_err();
        assert!(matches!(e, GgufError::Malformed { .. }), "{e}");
        // deeply nested arrays
        let mut nested = Vec::new();
        for _ in 0..20 {
            nested.extend(9u32.to_le_bytes());
            nested.extend(1u64.to_le_bytes());
        }
        let e = parse(p, &gguf_bytes(3, &[("k", 9, nested)])).unwrap_err();
        assert!(matches!(e, GgufError::Malformed { .. }), "{e}");
    }

    #[test]
    fn tensor_infos_and_bounds() {
        // one Q4_0 tensor of 64 elements (36 bytes) at offset 0
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(gguf_string("t"));
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(2u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let data_start = b.len().div_ceil(32) * 32;
        b.resize(data_start + 36, 0);
        let (_, _, t, _, off) = parse(Path::new("t.gguf"), &b).unwrap();
        assert_eq!(off as usize, data_start);
        assert_eq!(t[0].ty, GgmlType::Q4_0);
        assert_eq!(t[0].shape(), vec![2, 32]);
        assert_eq!(t[0].byte_size, Some(36));
        let e = parse(Path::new("t.gguf"), &b[..b.len() - 1]).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }));
        assert!(e.to_string().contains("tensor 't'"), "{e}");
    }

    #[test]
    fn hf_names() {
        let p = LlamaParams {
            arch: GgufArch::Llama,
            n_layer: 2,
            n_embd: 8,
            n_ff: 16,
            n_head: 2,
            n_head_kv: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            context_length: 16,
            vocab_size: 10,
            rope_scaling: Value::Null,
        };
        assert_eq!(
            hf_name("blk.1.attn_k.weight", &p),
            Some(("model.layers.1.self_attn.k_proj.weight".into(), Fix::Unpermute(1)))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.weight", &p),
            Some(("model.layers.0.self_attn.q_proj.weight".into(), Fix::Unpermute(2)))
        );
        assert_eq!(hf_name("blk.2.attn_q.weight", &p), None);
        assert_eq!(hf_name("blk.01.attn_q.weight", &p), None);
        assert_eq!(hf_name("blk.0.ffn_gate_exps.weight", &p), None);
        assert_eq!(expected_shape("model.layers.0.self_attn.k_proj.weight", &p), Some(vec![4, 8]));
        assert_eq!(expected_shape("model.layers.1.mlp.down_proj.weight", &p), Some(vec![8, 16]));
        assert_eq!(f32_decimal(9.999999747378752e-06), 1e-5);
    }
}
