//! What tch 0.24 lacks, from the libtorch it already links, through one small C++ file per
//! subject (`csrc/`), compiled by `build.rs` against that libtorch's headers:
//!
//! - [`foreach`]: torch.optim's fused AdamW kernel (`_fused_adamw_`, CPU and CUDA) and the
//!   multi-tensor ops around it (norms, scaling, zeroing, copies), one call per list instead
//!   of one kernel per tensor;
//! - [`graph`]: CUDA graph capture and replay on a side stream, with shareable memory pools;
//! - [`dist`]: c10d's TCPStore rendezvous and process groups (Gloo on the CPU, NCCL on CUDA)
//!   with the collectives a data-parallel learner needs.
//!
//! Every entry point catches C++ exceptions and returns them as [`ExtError`]; no new runtime
//! dependency comes with it. The CUDA parts exist when the linked libtorch is a CUDA build
//! ([`built_with_cuda`]); otherwise they return [`ExtError::NoCuda`].
pub mod dist;
mod ffi;
pub mod foreach;
pub mod graph;

/// An error from libtorch, or a request the extension refuses before calling it.
#[derive(Debug, thiserror::Error)]
pub enum ExtError {
    #[error("libtorch: {0}")]
    Torch(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(
        "this build of selfplay has no CUDA support (libtorch without libtorch_cuda, or no CUDA headers at build time)"
    )]
    NoCuda,
}

pub type Result<T> = std::result::Result<T, ExtError>;

/// Whether the CUDA parts (graphs, NCCL) were compiled in.
pub fn built_with_cuda() -> bool {
    unsafe { ffi::sp_built_with_cuda() != 0 }
}

/// Turns a returned error message (NULL on success) into a Result, freeing it.
pub(crate) fn check(err: *mut std::os::raw::c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().trim().to_string();
    unsafe { ffi::sp_free_error(err) };
    Err(ExtError::Torch(msg))
}

/// The attention kernel scaled-dot-product attention picks for these inputs, by libtorch's
/// name (`math`, `flash_attention`, `efficient_attention`, `cudnn_attention`, ...), so that a
/// benchmark can say which kernel it ran.
pub fn sdp_backend(
    q: &tch::Tensor,
    k: &tch::Tensor,
    v: &tch::Tensor,
    mask: Option<&tch::Tensor>,
    is_causal: bool,
    enable_gqa: bool,
) -> Result<&'static str> {
    let choice = tch::Tensor::f_internal_fused_sdp_choice(q, k, v, mask, 0.0, is_causal, None, enable_gqa)
        .map_err(|e| ExtError::Torch(e.to_string()))?;
    Ok(match choice {
        0 => "math",
        1 => "flash_attention",
        2 => "efficient_attention",
        3 => "cudnn_attention",
        4 => "overrideable",
        _ => "error",
    })
}
