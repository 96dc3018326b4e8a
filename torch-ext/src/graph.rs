//! CUDA graphs: capture the kernels a closure enqueues once, replay them with one launch.
//!
//! A captured graph reads and writes the very tensors (addresses) it was captured with, so the
//! caller keeps static input and output buffers, writes new inputs into them in place, replays,
//! and reads the outputs; weights updated in place (`copy_`) are seen by the next replay.
//! Graphs captured with the same [`MemPool`] share their memory (safe when they are replayed
//! in the order they were captured, or never concurrently), which is how one graph per batch
//! shape stays affordable.
use crate::{ExtError, Result};

/// A CUDA caching-allocator pool id, shareable between captures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MemPool(pub u64, pub u64);

/// A captured CUDA graph, ready to replay.
pub struct CudaGraph {
    #[cfg_attr(not(sp_with_cuda), allow(dead_code))]
    raw: *mut crate::ffi::Opaque,
    device: i64,
}

// The graph object is only touched through &self / &mut self and libtorch's graph is not tied
// to the thread that captured it.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// A fresh pool id for graphs that will share memory.
    pub fn new_pool() -> Result<MemPool> {
        #[cfg(sp_with_cuda)]
        {
            let (mut a, mut b) = (0u64, 0u64);
            crate::check(unsafe { crate::ffi::sp_graph_pool_handle(&mut a, &mut b) })?;
            Ok(MemPool(a, b))
        }
        #[cfg(not(sp_with_cuda))]
        Err(ExtError::NoCuda)
    }

    /// Captures what `body` enqueues on CUDA device `device` (no host synchronisation, no
    /// host-dependent control flow inside: the graph replays the kernels, not the closure).
    /// `pool`: share memory with earlier graphs; `None` gives the graph a private pool.
    /// Warm the body up eagerly first (libraries pick and cache their kernels on first use).
    pub fn capture<R, F: FnOnce() -> R>(device: i64, pool: Option<MemPool>, body: F) -> Result<(CudaGraph, R)> {
        if device < 0 {
            return Err(ExtError::Invalid(format!("CUDA device index {device}")));
        }
        #[cfg(sp_with_cuda)]
        {
            use std::os::raw::{c_int, c_void};
            struct Call<R, F> {
                body: Option<F>,
                out: Option<std::thread::Result<R>>,
            }
            extern "C" fn trampoline<R, F: FnOnce() -> R>(data: *mut c_void) -> c_int {
                let call = unsafe { &mut *(data as *mut Call<R, F>) };
                let body = call.body.take().expect("called once");
                let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
                let failed = out.is_err();
                call.out = Some(out);
                failed as c_int
            }
            let mut call = Call::<R, F> { body: Some(body), out: None };
            let MemPool(a, b) = pool.unwrap_or_default();
            let mut raw = std::ptr::null_mut();
            let res = crate::check(unsafe {
                crate::ffi::sp_graph_capture(
                    device as c_int,
                    a,
                    b,
                    trampoline::<R, F>,
                    &mut call as *mut Call<R, F> as *mut c_void,
                    &mut raw,
                )
            });
            match (res, call.out) {
                (_, Some(Err(panic))) => std::panic::resume_unwind(panic),
                (Err(e), _) => Err(e),
                (Ok(()), Some(Ok(r))) => Ok((CudaGraph { raw, device }, r)),
                (Ok(()), None) => Err(ExtError::Torch("graph capture did not run its body".into())),
            }
        }
        #[cfg(not(sp_with_cuda))]
        {
            let _ = (pool, body);
            Err(ExtError::NoCuda)
        }
    }

    /// Launches the captured kernels on the device's current stream.
    pub fn replay(&self) -> Result<()> {
        #[cfg(sp_with_cuda)]
        return crate::check(unsafe { crate::ffi::sp_graph_replay(self.raw) });
        #[cfg(not(sp_with_cuda))]
        Err(ExtError::NoCuda)
    }

    /// The pool this graph allocated from (pass it to the next capture to share memory).
    pub fn pool(&self) -> Result<MemPool> {
        #[cfg(sp_with_cuda)]
        {
            let (mut a, mut b) = (0u64, 0u64);
            crate::check(unsafe { crate::ffi::sp_graph_pool(self.raw, &mut a, &mut b) })?;
            Ok(MemPool(a, b))
        }
        #[cfg(not(sp_with_cuda))]
        Err(ExtError::NoCuda)
    }

    pub fn device(&self) -> i64 {
        self.device
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        #[cfg(sp_with_cuda)]
        unsafe {
            crate::ffi::sp_graph_free(self.raw)
        }
    }
}

/// Waits for everything queued on `device`'s current stream.
pub fn synchronize(device: i64) -> Result<()> {
    #[cfg(sp_with_cuda)]
    return crate::check(unsafe { crate::ffi::sp_cuda_synchronize(device as std::os::raw::c_int) });
    #[cfg(not(sp_with_cuda))]
    {
        let _ = device;
        Err(ExtError::NoCuda)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU a capture is a clear error, never a crash, and the body does not run.
    #[test]
    fn capture_without_a_device_is_an_error() {
        if tch::Cuda::is_available() {
            return; // covered by the GPU check (scripts/gpu_check.sh)
        }
        let mut ran = false;
        let e = CudaGraph::capture(0, None, || ran = true).err().expect("no CUDA device here");
        assert!(!ran || matches!(e, ExtError::Torch(_)), "{e}");
        assert!(matches!(CudaGraph::capture(-1, None, || ()), Err(ExtError::Invalid(_))));
    }
}
