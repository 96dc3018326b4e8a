//! Safetensors I/O: single files and sharded checkpoints (`model.safetensors.index.json`).
use crate::error::{io_err, PolicyError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The safetensors files of a model directory, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| PolicyError::Safetensors { path: index.clone(), message: format!("bad index json: {e}") })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| PolicyError::Safetensors { path: index.clone(), message: "no weight_map object".into() })?;
        let mut files: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(PolicyError::Io {
        path: single,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json in the model directory",
        ),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Bool => Dtype::BOOL,
        k => return Err(PolicyError::InvalidInput(format!("cannot save tensors of kind {k:?}"))),
    })
}

fn view_to_tensor(view: &TensorView<'_>, name: &str, path: &Path) -> Result<Tensor> {
    let kind = kind_of(view.dtype()).ok_or_else(|| PolicyError::Safetensors {
        path: path.to_path_buf(),
        message: format!("tensor {name} has unsupported dtype {:?}", view.dtype()),
    })?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

/// Loads every tensor of the given files, converting floating-point tensors to `kind` and
/// moving them to `device`. `keep` filters by name.
pub fn load_tensors(
    files: &[PathBuf],
    kind: Kind,
    device: Device,
    keep: impl Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        // Safety: the file is opened read-only and not modified while mapped by this process.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| PolicyError::Safetensors { path: path.clone(), message: e.to_string() })?;
        for (name, view) in st.tensors() {
            if !keep(&name) {
                continue;
            }
            let t = view_to_tensor(&view, &name, path)?;
            let t = if t.is_floating_point() { t.to_kind(kind) } else { t };
            out.insert(name, t.to_device(device));
        }
    }
    Ok(out)
}

/// Reads named floating-point tensors of one safetensors file straight into existing tensors
/// (any device, any floating-point kind; values are converted on copy). Every name and shape
/// is checked before anything is written, so a file that does not match changes nothing; then
/// one tensor at a time goes through host memory, so the destination device never holds a
/// second copy. Names in the file that are not asked for are ignored.
pub fn read_into(path: &Path, dst: &[(String, &Tensor)]) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // Safety: the file is opened read-only and not modified while mapped by this process.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| PolicyError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    let mut views = Vec::with_capacity(dst.len());
    for (name, t) in dst {
        let view =
            st.tensor(name).map_err(|_| PolicyError::MissingTensor { name: name.clone(), path: path.to_path_buf() })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != t.size() {
            return Err(PolicyError::WeightMismatch {
                name: name.clone(),
                message: format!("{} has shape {shape:?}, the destination {:?}", path.display(), t.size()),
            });
        }
        if !matches!(view.dtype(), Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64) {
            return Err(PolicyError::WeightMismatch {
                name: name.clone(),
                message: format!("{} stores it as {:?}, not a floating-point type", path.display(), view.dtype()),
            });
        }
        views.push(view);
    }
    tch::no_grad(|| {
        for ((name, t), view) in dst.iter().zip(&views) {
            let host = view_to_tensor(view, name, path)?;
            let mut d = t.shallow_clone();
            d.f_copy_(&host)?;
        }
        Ok(())
    })
}

/// Writes tensors as one safetensors file with `{"format": "pt"}` metadata, the layout
/// transformers expects. Tensors are copied to the CPU first.
pub fn save_tensors<'a>(path: &Path, tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>) -> Result<()> {
    let mut owned: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind())?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = t.numel();
        let nbytes = numel * t.kind().elt_size_in_bytes();
        let mut bytes = vec![0u8; nbytes];
        t.f_copy_data_u8(&mut bytes, numel)?;
        owned.insert(name.to_string(), (dtype, shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, (d, s, b))| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| PolicyError::Safetensors { path: path.to_path_buf(), message: e.to_string() })
        })
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(meta), &tmp)
        .map_err(|e| PolicyError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    // Rename last so that a crash never leaves a half-written checkpoint under the real name.
    std::fs::rename(&tmp, path).map_err(io_err(path))
}
