//! c10d, libtorch's own collective communication: a TCPStore for the rendezvous and a process
//! group (Gloo on the CPU, NCCL on CUDA) with all-reduce, broadcast, all-gather,
//! reduce-scatter and barrier. The conventions are torchrun's and Slurm's ([`Launch`]).
use crate::{check, ffi, ExtError, Result};
use std::ffi::CString;
use std::time::Duration;
use tch::Tensor;
use torch_sys::C_tensor;

/// A key-value store every rank reaches; rank 0 (or a launcher) hosts the server.
pub struct Store {
    raw: *mut ffi::Opaque,
    port: u16,
}

unsafe impl Send for Store {}
unsafe impl Sync for Store {}

fn cstr(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| ExtError::Invalid(format!("{what} contains a NUL byte")))
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Store {
    /// Hosts a TCPStore on `host:port` (port 0: any free port, see [`Store::port`]) and
    /// connects to it.
    pub fn serve(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Self::tcp(host, port, true, timeout)
    }

    /// Connects to the TCPStore at `host:port`, retrying until `timeout`.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<Store> {
        Self::tcp(host, port, false, timeout)
    }

    fn tcp(host: &str, port: u16, server: bool, timeout: Duration) -> Result<Store> {
        let h = cstr("store host", host)?;
        let (mut raw, mut bound) = (std::ptr::null_mut(), 0u16);
        check(unsafe { ffi::sp_store_tcp(h.as_ptr(), port, 0, server as i32, millis(timeout), &mut raw, &mut bound) })?;
        Ok(Store { raw, port: bound })
    }

    /// The port the store listens on (the one picked when served on port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstr("store key", key)?;
        check(unsafe { ffi::sp_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// Removes `key` (no error when it is absent).
    pub fn delete(&self, key: &str) -> Result<()> {
        let k = cstr("store key", key)?;
        check(unsafe { ffi::sp_store_delete(self.raw, k.as_ptr()) })
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstr("store key", key)?;
        let (mut data, mut len) = (std::ptr::null_mut::<u8>(), 0usize);
        check(unsafe { ffi::sp_store_get(self.raw, k.as_ptr(), &mut data, &mut len) })?;
        let out = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { ffi::sp_free_error(data as *mut std::os::raw::c_char) };
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { ffi::sp_store_free(self.raw) }
    }
}

/// How a collective combines the ranks' tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    /// NCCL only (Gloo has no average: sum, then divide).
    Avg = 1,
    Max = 2,
    Min = 3,
}

/// Which c10d backend a process group runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

/// One rank's handle on a process group. Collectives block until they complete on this rank;
/// every rank must call the same collectives in the same order with matching shapes.
pub struct ProcessGroup {
    raw: *mut ffi::Opaque,
    rank: usize,
    size: usize,
    backend: Backend,
}

unsafe impl Send for ProcessGroup {}

fn ptr(t: &Tensor) -> *mut C_tensor {
    t.as_ptr() as *mut C_tensor
}

impl ProcessGroup {
    /// Joins a Gloo group of `size` ranks through `store` as `rank`. `hostname` is this
    /// machine's address the other ranks reach (GLOO_SOCKET_IFNAME, when set, names the
    /// interface instead, as torch.distributed reads it).
    pub fn gloo(store: &Store, rank: usize, size: usize, hostname: &str, timeout: Duration) -> Result<ProcessGroup> {
        check_rank(rank, size)?;
        let h = cstr("hostname", hostname)?;
        let mut raw = std::ptr::null_mut();
        check(unsafe { ffi::sp_pg_gloo(store.raw, rank as i32, size as i32, h.as_ptr(), millis(timeout), &mut raw) })?;
        Ok(ProcessGroup { raw, rank, size, backend: Backend::Gloo })
    }

    /// Joins an NCCL group (CUDA builds); the caller has made its device current.
    pub fn nccl(store: &Store, rank: usize, size: usize, timeout: Duration) -> Result<ProcessGroup> {
        check_rank(rank, size)?;
        #[cfg(sp_with_cuda)]
        {
            let mut raw = std::ptr::null_mut();
            check(unsafe { ffi::sp_pg_nccl(store.raw, rank as i32, size as i32, millis(timeout), &mut raw) })?;
            Ok(ProcessGroup { raw, rank, size, backend: Backend::Nccl })
        }
        #[cfg(not(sp_with_cuda))]
        {
            let _ = (store, timeout);
            Err(ExtError::NoCuda)
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every rank's `t` combined by `op`, into every rank's `t`.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        dense("all-reduce", t)?;
        if op == ReduceOp::Avg && self.backend == Backend::Gloo {
            return Err(ExtError::Invalid("Gloo has no average: all-reduce a sum and divide".into()));
        }
        check(unsafe { ffi::sp_pg_all_reduce(self.raw, ptr(t), op as i32) })
    }

    /// Rank `root`'s `t` into every rank's `t`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        dense("broadcast", t)?;
        check_rank(root, self.size)?;
        check(unsafe { ffi::sp_pg_broadcast(self.raw, ptr(t), root as i64) })
    }

    /// `out` (size × input's elements) receives every rank's `input`, in rank order.
    pub fn all_gather(&self, out: &Tensor, input: &Tensor) -> Result<()> {
        dense("all-gather output", out)?;
        dense("all-gather input", input)?;
        if out.numel() != input.numel() * self.size || out.kind() != input.kind() {
            return Err(ExtError::Invalid(format!(
                "all-gather: output of {} {:?} elements for {} ranks of {} {:?}",
                out.numel(),
                out.kind(),
                self.size,
                input.numel(),
                input.kind()
            )));
        }
        check(unsafe { ffi::sp_pg_all_gather(self.raw, ptr(out), ptr(input)) })
    }

    /// `out` receives this rank's share (elements rank·n .. (rank+1)·n, n = out's elements) of
    /// every rank's `input` combined by `op`.
    pub fn reduce_scatter(&self, out: &Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        dense("reduce-scatter output", out)?;
        dense("reduce-scatter input", input)?;
        if input.numel() != out.numel() * self.size || out.kind() != input.kind() {
            return Err(ExtError::Invalid(format!(
                "reduce-scatter: input of {} elements for {} ranks of {}",
                input.numel(),
                self.size,
                out.numel()
            )));
        }
        if op == ReduceOp::Avg && self.backend == Backend::Gloo {
            return Err(ExtError::Invalid("Gloo has no average: reduce-scatter a sum and divide".into()));
        }
        check(unsafe { ffi::sp_pg_reduce_scatter(self.raw, ptr(out), ptr(input), op as i32) })
    }

    /// Returns when every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        check(unsafe { ffi::sp_pg_barrier(self.raw) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::sp_pg_free(self.raw) }
    }
}

fn check_rank(rank: usize, size: usize) -> Result<()> {
    if size == 0 || rank >= size || size > i32::MAX as usize {
        return Err(ExtError::Invalid(format!("rank {rank} of a group of {size}")));
    }
    Ok(())
}

fn dense(what: &str, t: &Tensor) -> Result<()> {
    if !t.defined() || !t.is_contiguous() {
        return Err(ExtError::Invalid(format!("{what}: the tensor must be defined and contiguous")));
    }
    Ok(())
}

/// A rank's place in a launch, read from the variables torchrun and Slurm set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl Launch {
    /// RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torchrun), else Slurm's
    /// SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID with MASTER_ADDR and MASTER_PORT. `None`
    /// when neither names a world size (a single process).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let pick = |a: &str, b: &str| get(a).or_else(|| get(b));
        let Some(world) = pick("WORLD_SIZE", "SLURM_NTASKS") else { return Ok(None) };
        let num = |name: &str, v: String| -> Result<usize> {
            v.trim().parse().map_err(|_| ExtError::Invalid(format!("{name}={v:?} is not a number")))
        };
        let world_size = num("WORLD_SIZE", world)?;
        let rank = num("RANK", pick("RANK", "SLURM_PROCID").unwrap_or_else(|| "0".into()))?;
        let local_rank = num("LOCAL_RANK", pick("LOCAL_RANK", "SLURM_LOCALID").unwrap_or_else(|| "0".into()))?;
        check_rank(rank, world_size)?;
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = get("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let master_port =
            port.trim().parse().map_err(|_| ExtError::Invalid(format!("MASTER_PORT={port:?} is not a port")))?;
        Ok(Some(Launch { rank, world_size, local_rank, master_addr, master_port }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn launch_reads_torchrun_then_slurm() {
        assert_eq!(Launch::from_env(env(&[])).unwrap(), None);
        let l = Launch::from_env(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29600"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.local_rank, l.master_addr.as_str(), l.master_port),
            (2, 4, 0, "node1", 29600)
        );
        let s = Launch::from_env(env(&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "1")]))
            .unwrap()
            .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank, s.master_port), (1, 2, 1, 29500));
        assert!(Launch::from_env(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).is_err());
        assert!(Launch::from_env(env(&[("WORLD_SIZE", "two")])).is_err());
        assert!(Launch::from_env(env(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "99999")])).is_err());
    }

    #[test]
    fn a_store_serves_on_a_free_port_and_answers_in_process() {
        let s = Store::serve("127.0.0.1", 0, Duration::from_secs(10)).unwrap();
        assert_ne!(s.port(), 0);
        let c = Store::connect("127.0.0.1", s.port(), Duration::from_secs(10)).unwrap();
        s.set("run", b"abc").unwrap();
        assert_eq!(c.get("run").unwrap(), b"abc");
        c.set("empty", b"").unwrap();
        assert_eq!(s.get("empty").unwrap(), b"");
        c.delete("run").unwrap();
        c.delete("never-set").unwrap();
        let quick = Store::connect("127.0.0.1", s.port(), Duration::from_millis(300)).unwrap();
        assert!(quick.get("run").is_err(), "a deleted key is gone (the get times out)");
        assert!(s.set("a\0b", b"x").is_err());
    }

    #[test]
    fn a_group_of_one_is_the_identity_and_bad_shapes_are_refused() {
        let s = Store::serve("127.0.0.1", 0, Duration::from_secs(10)).unwrap();
        let pg = ProcessGroup::gloo(&s, 0, 1, "127.0.0.1", Duration::from_secs(10)).unwrap();
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        pg.all_reduce(&t, ReduceOp::Sum).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0, 3.0]);
        let out = Tensor::zeros([3], (tch::Kind::Float, tch::Device::Cpu));
        pg.all_gather(&out, &t).unwrap();
        assert!(out.equal(&t));
        assert!(pg.all_gather(&Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu)), &t).is_err());
        assert!(pg.all_reduce(&t, ReduceOp::Avg).is_err());
        assert!(pg
            .all_reduce(&Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu)).tr(), ReduceOp::Sum)
            .is_err());
        assert!(pg.broadcast(&t, 1).is_err());
        pg.barrier().unwrap();
        assert!(ProcessGroup::gloo(&s, 1, 1, "127.0.0.1", Duration::from_secs(1)).is_err());
    }
}
