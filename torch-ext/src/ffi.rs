//! The C entry points of csrc/. Tensors are tch's handles (`*mut C_tensor`, an `at::Tensor*`);
//! every fallible function returns NULL or an error message freed with `sp_free_error`.
#![allow(dead_code)]
use std::os::raw::{c_char, c_int, c_void};
use torch_sys::C_tensor;

pub type Err = *mut c_char;
#[repr(C)]
pub struct Opaque {
    _private: [u8; 0],
}

extern "C" {
    pub fn sp_free_error(e: *mut c_char);
    pub fn sp_built_with_cuda() -> c_int;

    pub fn sp_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        steps: *const *mut C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> Err;
    pub fn sp_foreach_norm_f32(ts: *const *mut C_tensor, n: usize, out: *mut *mut C_tensor) -> Err;
    pub fn sp_foreach_mul_tensor_(ts: *const *mut C_tensor, n: usize, scale: *mut C_tensor) -> Err;
    pub fn sp_foreach_zero_(ts: *const *mut C_tensor, n: usize) -> Err;
    pub fn sp_foreach_copy_(dst: *const *mut C_tensor, src: *const *mut C_tensor, n: usize) -> Err;

    pub fn sp_store_tcp(
        host: *const c_char,
        port: u16,
        world_size: i64,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut Opaque,
        bound_port: *mut u16,
    ) -> Err;
    pub fn sp_store_free(s: *mut Opaque);
    pub fn sp_store_set(s: *mut Opaque, key: *const c_char, data: *const u8, len: usize) -> Err;
    pub fn sp_store_delete(s: *mut Opaque, key: *const c_char) -> Err;
    pub fn sp_store_get(s: *mut Opaque, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> Err;
    pub fn sp_pg_gloo(
        s: *mut Opaque,
        rank: c_int,
        size: c_int,
        hostname: *const c_char,
        timeout_ms: i64,
        out: *mut *mut Opaque,
    ) -> Err;
    pub fn sp_pg_free(pg: *mut Opaque);
    pub fn sp_pg_all_reduce(pg: *mut Opaque, t: *mut C_tensor, op: c_int) -> Err;
    pub fn sp_pg_broadcast(pg: *mut Opaque, t: *mut C_tensor, root: i64) -> Err;
    pub fn sp_pg_all_gather(pg: *mut Opaque, out: *mut C_tensor, input: *mut C_tensor) -> Err;
    pub fn sp_pg_reduce_scatter(pg: *mut Opaque, out: *mut C_tensor, input: *mut C_tensor, op: c_int) -> Err;
    pub fn sp_pg_barrier(pg: *mut Opaque) -> Err;
}

#[cfg(sp_with_cuda)]
extern "C" {
    pub fn sp_graph_pool_handle(a: *mut u64, b: *mut u64) -> Err;
    pub fn sp_graph_capture(
        device: c_int,
        pool_a: u64,
        pool_b: u64,
        body: extern "C" fn(*mut c_void) -> c_int,
        data: *mut c_void,
        out: *mut *mut Opaque,
    ) -> Err;
    pub fn sp_graph_replay(g: *mut Opaque) -> Err;
    pub fn sp_graph_pool(g: *mut Opaque, a: *mut u64, b: *mut u64) -> Err;
    pub fn sp_graph_free(g: *mut Opaque);
    pub fn sp_cuda_synchronize(device: c_int) -> Err;
    pub fn sp_pg_nccl(s: *mut Opaque, rank: c_int, size: c_int, timeout_ms: i64, out: *mut *mut Opaque) -> Err;
}
