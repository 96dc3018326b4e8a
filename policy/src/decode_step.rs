//! One decoding step over a fixed set of slots: every slot feeds one token at its own position
//! into a slot KV cache and gets its next-token logits. The generator's only decode path.
//!
//! On CUDA the step is captured in a CUDA graph per attention span (the span is rounded, so a
//! generation meets a handful of them) and replayed: one launch instead of ~40 eager ATen calls
//! per layer, each of ~10 µs of host time, which is what kept decoding at a tenth of the
//! device. A graph reads and writes fixed addresses, so the step owns its inputs (ids,
//! positions), the cache and the key index; callers copy new inputs in and read the logits the
//! replay wrote. Weights are updated in place (`copy_`) by every weight sync and by the
//! optimizer, so a graph stays valid across weight versions. The step, its cache and its
//! graphs are kept on the model for the next call with the same shape (see
//! [`crate::model::Llama::decode_step`]); a new shape replaces them.
//!
//! On the CPU (and wherever capture fails, or `SELFPLAY_CUDA_GRAPHS=0`) the same step runs
//! eagerly, exactly as before.
use crate::error::{PolicyError, Result};
use crate::model::{AttnMask, KvCache, Llama};
use selfplay_torch_ext::graph::{CudaGraph, MemPool};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

/// Whether decode steps on CUDA are captured in graphs: on unless `SELFPLAY_CUDA_GRAPHS=0`.
pub fn graphs_enabled() -> bool {
    std::env::var("SELFPLAY_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

/// How a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    Eager,
    /// Captured per span and replayed.
    Graphs,
}

pub struct DecodeStep {
    slots: i64,
    capacity: i64,
    pub cache: KvCache,
    /// The step's inputs: the id each slot feeds and its position.
    ids: Tensor,
    position: Tensor,
    key_index: Tensor,
    mode: StepMode,
    /// Per span: the graph and the logits tensor its replays write.
    graphs: HashMap<i64, (CudaGraph, Tensor)>,
    pool: Option<MemPool>,
    /// Replays and captures so far (for the statistics and the GPU check).
    pub replays: u64,
    pub captures: u64,
}

impl DecodeStep {
    pub fn new(model: &Llama, slots: i64, capacity: i64) -> Self {
        let dev = model.device();
        let mode = if matches!(dev, Device::Cuda(_)) && graphs_enabled() && selfplay_torch_ext::built_with_cuda() {
            StepMode::Graphs
        } else {
            StepMode::Eager
        };
        DecodeStep {
            slots,
            capacity,
            cache: model.new_slot_cache(slots, capacity),
            ids: Tensor::zeros([slots], (Kind::Int64, dev)),
            position: Tensor::zeros([slots], (Kind::Int64, dev)),
            key_index: Tensor::arange(capacity, (Kind::Int64, dev)).view([1, capacity]),
            mode,
            graphs: HashMap::new(),
            pool: None,
            replays: 0,
            captures: 0,
        }
    }

    pub fn slots(&self) -> i64 {
        self.slots
    }
    pub fn capacity(&self) -> i64 {
        self.capacity
    }
    pub fn mode(&self) -> StepMode {
        self.mode
    }

    /// Logits [slots, vocab] (f32) after feeding `ids` [slots] at `position` [slots], attending
    /// over cache positions 0..span (each slot up to its own position). On CUDA the result is
    /// the graph's output buffer: read it before the next step.
    pub fn run(&mut self, model: &Llama, ids: &Tensor, position: &Tensor, span: i64) -> Result<Tensor> {
        if ids.size() != [self.slots] || position.size() != [self.slots] {
            return Err(PolicyError::InvalidInput(format!(
                "a decode step of {} slots got ids {:?} and positions {:?}",
                self.slots,
                ids.size(),
                position.size()
            )));
        }
        let span = span.clamp(1, self.capacity);
        self.cache.set_span(span);
        match self.mode {
            StepMode::Eager => Self::forward(model, &mut self.cache, &self.key_index, ids, position, span),
            StepMode::Graphs => {
                self.ids.copy_(ids);
                self.position.copy_(position);
                if let Some((graph, out)) = self.graphs.get(&span) {
                    graph.replay().map_err(|e| PolicyError::InvalidInput(format!("graph replay: {e}")))?;
                    self.replays += 1;
                    return Ok(out.shallow_clone());
                }
                // A span seen for the first time: the eager step is this call's result (and
                // the warm-up libraries want before capture), then the capture records the
                // same step on the static inputs for the next time, running nothing.
                let out = Self::forward(model, &mut self.cache, &self.key_index, &self.ids, &self.position, span)?;
                self.capture(model, span);
                Ok(out)
            }
        }
    }

    fn forward(
        model: &Llama,
        cache: &mut KvCache,
        key_index: &Tensor,
        ids: &Tensor,
        position: &Tensor,
        span: i64,
    ) -> Result<Tensor> {
        let slots = ids.size()[0];
        let mask = key_index.narrow(1, 0, span).le_tensor(&position.unsqueeze(1)).view([slots, 1, 1, span]);
        let hidden =
            model.forward_hidden(&ids.unsqueeze(1), &position.unsqueeze(1), &AttnMask::Explicit(mask), Some(cache))?;
        model.decode_logits(&hidden.squeeze_dim(1))
    }

    fn capture(&mut self, model: &Llama, span: i64) {
        let Device::Cuda(index) = model.device() else { return };
        let (cache, key_index, ids, position) = (&mut self.cache, &self.key_index, &self.ids, &self.position);
        let captured =
            CudaGraph::capture(index as i64, self.pool, || Self::forward(model, cache, key_index, ids, position, span));
        match captured {
            Ok((graph, Ok(out))) => {
                if self.pool.is_none() {
                    self.pool = graph.pool().ok();
                }
                self.captures += 1;
                self.graphs.insert(span, (graph, out));
            }
            Ok((_, Err(e))) => self.fall_back(format!("the step failed under capture: {e}")),
            Err(e) => self.fall_back(e.to_string()),
        }
    }

    fn fall_back(&mut self, why: String) {
        tracing::warn!(%why, "decoding without CUDA graphs from now on");
        self.graphs.clear();
        self.mode = StepMode::Eager;
    }
}
