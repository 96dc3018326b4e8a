//! The key/value cache of generation.
use crate::error::{PolicyError, Result};
use tch::Tensor;

/// Per-layer key/value tensors of shape [batch, kv_heads, capacity, head_dim], with the rotary
/// tables for positions 0..capacity built once when the cache is made.
///
/// A contiguous cache appends every call's keys after the cached ones (all rows share one
/// length). A slot cache (decoding with continuous batching) writes each row's keys at that
/// row's own positions and attends over the whole capacity under the caller's mask, so that
/// every decoding step has the same shapes and rows can be refilled independently.
pub struct KvCache {
    pub(super) keys: Vec<Tensor>,
    pub(super) values: Vec<Tensor>,
    pub(super) len: i64,
    pub(super) capacity: i64,
    pub(super) slotted: bool,
    /// A prefix every row of the next calls shares ([`KvCache::share_rows`]): its one row of
    /// keys is read by every row, before the call's own keys, and nothing is appended.
    pub(super) shared: bool,
    /// Slot cache: attention reads keys 0..span (the caller keeps every generating row's
    /// positions below it); the capacity by default.
    pub(super) span: i64,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    pub fn is_slotted(&self) -> bool {
        self.slotted
    }

    /// Slot cache: attend over the first `span` positions only (clamped to 1..=capacity), so
    /// that short sequences in a large cache do not pay for its unused tail. Keep it rounded:
    /// each new span is a new attention shape.
    pub fn set_span(&mut self, span: i64) {
        self.span = span.clamp(1, self.capacity);
    }

    /// Copies the first `len` cached positions of `src`'s row `src_row` into row `row` (how a
    /// prefilled sequence enters a decoding slot).
    pub fn copy_row_from(&mut self, row: i64, src: &KvCache, src_row: i64, len: i64) -> Result<()> {
        if self.keys.len() != src.keys.len() || len > self.capacity || len > src.capacity {
            return Err(PolicyError::InvalidInput(format!(
                "cannot copy {len} cached positions between caches of capacity {} and {}",
                src.capacity, self.capacity
            )));
        }
        tch::no_grad(|| {
            for (dst, s) in self.keys.iter().zip(&src.keys).chain(self.values.iter().zip(&src.values)) {
                dst.narrow(0, row, 1).narrow(2, 0, len).copy_(&s.narrow(0, src_row, 1).narrow(2, 0, len));
            }
        });
        Ok(())
    }

    /// Turns a one-row contiguous cache holding a prefix into one that every row of later
    /// calls attends to: each layer reads the prefix's keys broadcast over the call's rows,
    /// then the call's own. Calls must give positions after the prefix and a mask over
    /// prefix + own keys ([`super::prefix_causal_mask`]); they store nothing.
    pub fn share_rows(mut self) -> Result<Self> {
        if self.slotted || self.keys.first().is_some_and(|k| k.size()[0] != 1) {
            return Err(PolicyError::InvalidInput("only a one-row contiguous cache can be shared".into()));
        }
        self.shared = true;
        Ok(self)
    }

    /// Copies the cached positions of `src`'s row 0 into every row of this contiguous cache,
    /// which then holds that many positions (how rows that begin alike start from one prefill).
    pub fn broadcast_prefix_from(&mut self, src: &KvCache) -> Result<()> {
        if self.slotted || src.slotted || self.keys.len() != src.keys.len() || src.len > self.capacity {
            return Err(PolicyError::InvalidInput(format!(
                "cannot broadcast {} cached positions into a cache of capacity {}",
                src.len, self.capacity
            )));
        }
        let p = src.len;
        tch::no_grad(|| {
            for (dst, s) in self.keys.iter().zip(&src.keys).chain(self.values.iter().zip(&src.values)) {
                dst.narrow(2, 0, p).copy_(&s.narrow(0, 0, 1).narrow(2, 0, p));
            }
        });
        self.len = p;
        Ok(())
    }

    /// Checks that a call with `t` new positions fits.
    pub(super) fn check_room(&self, t: i64) -> Result<()> {
        if self.shared {
            return Ok(());
        }
        if !self.slotted && self.len + t > self.capacity {
            return Err(PolicyError::InvalidInput(format!(
                "KV cache full: {} cached + {t} new > capacity {}",
                self.len, self.capacity
            )));
        }
        if self.slotted && t > self.capacity {
            return Err(PolicyError::InvalidInput(format!("{t} new positions > slot capacity {}", self.capacity)));
        }
        Ok(())
    }

    /// Stores layer `l`'s new keys and values [B, kv_heads, T, head_dim] and returns every key
    /// and value the call's queries attend over: in a slot cache at `positions` [B, T] and all
    /// `capacity` of them, in a contiguous one after the cached ones.
    pub(super) fn store(&mut self, l: usize, k: &Tensor, v: &Tensor, positions: &Tensor) -> (Tensor, Tensor) {
        if self.shared {
            let rows = |cached: &Tensor, own: &Tensor| {
                let mut shape = own.size();
                shape[2] = self.len;
                Tensor::cat(&[cached.narrow(2, 0, self.len).expand(shape.as_slice(), false), own.shallow_clone()], 2)
            };
            (rows(&self.keys[l], k), rows(&self.values[l], v))
        } else if self.slotted {
            let [b, kv, t, hd] = k.size()[..] else { unreachable!("keys are 4-d") };
            let idx = positions.view([b, 1, t, 1]).expand([b, kv, t, hd], false);
            let _ = self.keys[l].scatter_(2, &idx, k);
            let _ = self.values[l].scatter_(2, &idx, v);
            (self.keys[l].narrow(2, 0, self.span), self.values[l].narrow(2, 0, self.span))
        } else {
            let t = k.size()[2];
            self.keys[l].narrow(2, self.len, t).copy_(k);
            self.values[l].narrow(2, self.len, t).copy_(v);
            (self.keys[l].narrow(2, 0, self.len + t), self.values[l].narrow(2, 0, self.len + t))
        }
    }

    /// Ends a call of `t` new positions (a slot cache keeps no common length).
    pub(super) fn advance(&mut self, t: i64) {
        if !self.slotted && !self.shared {
            self.len += t;
        }
    }
}
