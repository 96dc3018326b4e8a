//! The GGUF file format (versions 2 and 3): header, metadata key/values of every type, tensor
//! infos, alignment, and the bounds of every tensor's data. The file is memory-mapped.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::dequant::dequantize;
use crate::error::{GgufError, Result};
use crate::GgmlType;

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
    pub(crate) path: PathBuf,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
