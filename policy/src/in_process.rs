//! Weights handed from a learner to the actors of the same process by device copies.
//!
//! Inside `selfplay train` the learner and its actors share a process (and often a GPU). The
//! learner still publishes every version to the coordinator, which records it for actors in
//! other processes and for any actor that restarts; what it also does is refresh one snapshot
//! of its parameters here, on its own device and in the actors' dtype. A co-located actor
//! copies the snapshot into its policy (device to device, converting the dtype if needed)
//! instead of fetching, checking and decoding the payload over gRPC.
//!
//! One lock guards the snapshot and its (epoch, version): the learner refreshes it in place
//! under the lock, and an actor copies it into its model under the lock. An actor therefore
//! never sees a half-refreshed snapshot, the version it reports is the version of the values
//! it copied, and between steps the snapshot costs one copy of the weights in the actors'
//! dtype on the learner's device, never two.
use crate::error::{PolicyError, Result};
use crate::model::Llama;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tch::{Kind, Tensor};

/// The latest weights of one learner, shared with the actors of its process.
pub struct InProcessWeights {
    /// The dtype the snapshot is kept in: the actors' (so the learner's device holds the
    /// smaller copy when actors run in bf16 and the learner in f32).
    kind: Kind,
    latest: Mutex<Option<Snapshot>>,
    published: AtomicU64,
    copied: AtomicU64,
}

struct Snapshot {
    epoch: u64,
    version: u64,
    /// Every parameter under its name, in the model's fixed order.
    params: Vec<(String, Tensor)>,
}

impl std::fmt::Debug for InProcessWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessWeights")
            .field("kind", &self.kind)
            .field("latest", &self.latest())
            .field("published", &self.published())
            .field("copied", &self.copied())
            .finish()
    }
}

impl InProcessWeights {
    /// An empty handle whose snapshots are kept in `kind`.
    pub fn new(kind: Kind) -> Self {
        InProcessWeights { kind, latest: Mutex::new(None), published: AtomicU64::new(0), copied: AtomicU64::new(0) }
    }

    /// The (epoch, version) an actor would copy now, if any.
    pub fn latest(&self) -> Option<(u64, u64)> {
        self.lock().as_ref().map(|s| (s.epoch, s.version))
    }

    /// How many versions the learner published here, and how many copies actors made.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::SeqCst)
    }
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Snapshot>> {
        // A panic while copying leaves nothing a later call could misread: the snapshot is
        // cleared before any refresh and set again only when it is whole.
        self.latest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `model`'s current parameters version `version` of learner epoch `epoch`. The
    /// snapshot's buffers are reused while the shapes match. On an error nothing is left to
    /// copy (actors fall back to the coordinator).
    pub fn publish(&self, epoch: u64, version: u64, model: &Llama) -> Result<()> {
        let mut latest = self.lock();
        let old = latest.take();
        let mut params = match old {
            Some(s)
                if s.params.len() == model.parameters().len()
                    && s.params
                        .iter()
                        .zip(model.parameters())
                        .all(|((a, x), (b, y))| a == b && x.size() == y.size() && x.device() == y.device()) =>
            {
                s.params
            }
            _ => model
                .parameters()
                .iter()
                .map(|(n, p)| Ok((n.clone(), Tensor::f_empty(p.size(), (self.kind, p.device()))?)))
                .collect::<Result<Vec<_>>>()?,
        };
        tch::no_grad(|| -> Result<()> {
            for ((_, dst), (_, src)) in params.iter_mut().zip(model.parameters()) {
                dst.f_copy_(src)?;
            }
            Ok(())
        })?;
        *latest = Some(Snapshot { epoch, version, params });
        self.published.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Forgets the snapshot: actors fetch from the coordinator until the next publish.
    pub fn clear(&self) {
        *self.lock() = None;
    }

    /// Copies the snapshot into `model` (on the model's device, in its dtype) when it is of
    /// learner epoch `epoch` and at least version `min_version`; returns the version copied,
    /// or None (nothing suitable here: fetch from the coordinator). After an error `model`
    /// may be partly overwritten and must not be used until a load succeeds.
    pub fn copy_into(&self, model: &mut Llama, epoch: u64, min_version: u64) -> Result<Option<u64>> {
        let latest = self.lock();
        let Some(s) = latest.as_ref().filter(|s| s.epoch == epoch && s.version >= min_version) else {
            return Ok(None);
        };
        if s.params.len() != model.parameters().len() {
            return Err(PolicyError::InvalidInput(format!(
                "in-process weights: {} tensors published, the model has {}",
                s.params.len(),
                model.parameters().len()
            )));
        }
        model.copy_named_from(&s.params)?;
        self.copied.fetch_add(1, Ordering::SeqCst);
        Ok(Some(s.version))
    }
}
