//! Training-side scoring: per-token log-probs of given (prompt, completion) sequences, masked
//! to the completion tokens.
//!
//! The output head is where a long batch's memory goes: full-vocabulary f32 logits are
//! V x 4 bytes per position (0.5 MB for Llama-3's 128k vocabulary), several times over once
//! log-softmax and its gradient are counted. So the head runs over at most `chunk_positions`
//! positions at a time, also for the gradient ([`Grad::Chunked`]):
//! 1. the trunk runs with its graph; the head runs chunk by chunk without one, giving the
//!    log-probs, which become a leaf tensor the loss is built on;
//! 2. `loss.backward()` leaves dL/dlogp on that leaf;
//! 3. [`TokenLogprobs::backward`] recomputes each chunk's logits from the (detached) final
//!    hidden states with a graph, back-propagates sum(dL/dlogp * logp) through the head, and
//!    collects the hidden states' gradient;
//! 4. that gradient goes back through the trunk in one backward pass.
//!
//! The chain rule makes this the same gradient as one graph through everything; only the
//! order of floating-point sums differs (tests compare them in f32).
//!
//! With gradient checkpointing ([`Grad::Checkpointed`]) step 1 runs the trunk
//! without a graph too, keeping only each decoder block's input, and step 4 goes back block by
//! block, last to first: the block is recomputed with a graph from its kept input, the
//! gradient of its output is sent through it, and its input's gradient goes on to the block
//! before (then to the embedding). Activations for the backward pass then exist for one block
//! at a time, at the cost of a second forward pass through the trunk.
use crate::error::{PolicyError, Result};
use crate::model::{Llama, PaddedBatch};
use tch::{Kind, Tensor};

/// Completion log-probs of a batch, right-padded to the longest completion.
pub struct TokenLogprobs {
    /// [B, C] f32: log pi(c_t | prompt, c_<t); 0 where `mask` is false. With
    /// [`Grad::Chunked`] or [`Grad::Checkpointed`] a leaf tensor (requiring grad when the
    /// model's parameters do) that the loss is built on.
    pub logprobs: Tensor,
    /// [B, C] bool: true on real completion tokens.
    pub mask: Tensor,
    /// [B, C] f32 entropy of the next-token distribution at each completion position
    /// (detached), when asked for.
    pub entropy: Option<Tensor>,
    /// The chunked modes' rest of the gradient, for [`TokenLogprobs::backward`].
    deferred: Option<Deferred>,
}

/// Whether scoring keeps a graph for the gradient, and how. The modes give the same log-probs
/// (up to the order of floating-point sums); they differ in what exists at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Grad {
    /// No graph (reference model, evaluation): the trunk runs over batches of at most
    /// [`ScoreLimits::batch_tokens`] padded tokens, the head over at most
    /// [`ScoreLimits::chunk_positions`] positions at a time. Rows keep the order of the pairs.
    #[default]
    None,
    /// One graph through the trunk and the whole head, whose full-vocabulary logits then all
    /// exist at once (the reference the chunked modes are tested against).
    Graph,
    /// The learner's mode: the trunk with its graph, the head in chunks of
    /// [`ScoreLimits::chunk_positions`] for the forward pass and the gradient. After
    /// `loss.backward()`, [`TokenLogprobs::backward`] finishes the gradient (module docs).
    Chunked,
    /// [`Grad::Chunked`] with gradient checkpointing: the trunk runs without a graph, keeping
    /// each block's input, and the backward pass recomputes one block at a time. The same
    /// log-probs and gradient with one block's activations at a time instead of every block's.
    Checkpointed,
}

/// The one scoring path: per-token log-probs of (prompt, completion) pairs under `model`, in
/// a [`Grad`] mode (default [`Grad::None`]), with or without entropies, within
/// [`ScoreLimits`] (default [`ScoreLimits::default`]).
#[derive(Clone, Copy)]
pub struct Scorer<'a> {
    model: &'a Llama,
    grad: Grad,
    entropy: bool,
    limits: ScoreLimits,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Llama) -> Self {
        Scorer { model, grad: Grad::None, entropy: false, limits: ScoreLimits::default() }
    }

    pub fn grad(mut self, grad: Grad) -> Self {
        self.grad = grad;
        self
    }

    /// Also return the entropy at each completion position.
    pub fn entropy(mut self, on: bool) -> Self {
        self.entropy = on;
        self
    }

    /// `chunk_positions` bounds the head in every mode but [`Grad::Graph`]; `batch_tokens`
    /// only [`Grad::None`] (the learner splits its micro-batches itself).
    pub fn limits(mut self, limits: ScoreLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Head positions at a time (0 = all): [`ScoreLimits::chunk_positions`] alone.
    pub fn chunk_positions(mut self, n: usize) -> Self {
        self.limits.chunk_positions = n;
        self
    }

    /// Scores `pairs`, refusing empty or out-of-vocabulary ones before any work.
    pub fn score(&self, pairs: &[(Vec<i64>, Vec<i64>)]) -> Result<TokenLogprobs> {
        let (model, entropy, chunk) = (self.model, self.entropy, self.limits.chunk_positions);
        match self.grad {
            Grad::None => limited(model, pairs, entropy, self.limits),
            Grad::Graph => graph(model, pairs, entropy),
            Grad::Chunked => chunked(model, pairs, entropy, chunk),
            Grad::Checkpointed => checkpointed(model, pairs, entropy, chunk),
        }
    }
}

/// How much of a scoring call exists at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreLimits {
    /// Completion positions whose full-vocabulary logits exist at once (0 = all).
    pub chunk_positions: usize,
    /// Padded tokens (sequences x longest sequence) per forward pass of the trunk (0 = one
    /// pass). Only inference splits by it; the learner splits its micro-batches itself.
    pub batch_tokens: usize,
}

/// Positions per head chunk by default: 1024 x 128k x 4 bytes = 0.5 GB per f32 logits tensor
/// for Llama-3, 0.2 GB for SmolLM2.
pub const DEFAULT_CHUNK_POSITIONS: usize = 1024;
/// Padded tokens per inference forward pass by default.
pub const DEFAULT_BATCH_TOKENS: usize = 16384;

impl Default for ScoreLimits {
    fn default() -> Self {
        ScoreLimits { chunk_positions: DEFAULT_CHUNK_POSITIONS, batch_tokens: DEFAULT_BATCH_TOKENS }
    }
}

/// What a chunked mode keeps for the gradient (module docs).
struct Deferred {
    /// [R, H] final hidden states of the R real completion positions (with the trunk's graph
    /// unless checkpointed).
    rows: Tensor,
    /// [R] the completion token at each of those positions.
    targets: Tensor,
    chunk: i64,
    /// Gradient checkpointing: what the trunk's backward pass recomputes from.
    checkpoints: Option<Checkpoints>,
}

/// A checkpointed trunk pass: token ids, the blocks' shared context, each block's input (detached; the
/// first is the embedding), the last block's output, and where the real completion rows are.
struct Checkpoints {
    ids: Tensor,
    pass: crate::model::BlockPass,
    inputs: Vec<Tensor>,
    last: Tensor,
    src: Tensor,
}

fn validate(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)]) -> Result<()> {
    if pairs.is_empty() {
        return Err(PolicyError::InvalidInput("no sequences to score".into()));
    }
    let vocab = model.config().vocab_size;
    for (i, (p, c)) in pairs.iter().enumerate() {
        if p.is_empty() || c.is_empty() {
            return Err(PolicyError::InvalidInput(format!(
                "sequence {i}: prompt and completion must both be non-empty"
            )));
        }
        if let Some(&id) = p.iter().chain(c).find(|&&id| id < 0 || id >= vocab) {
            return Err(PolicyError::TokenOutOfRange { id, vocab_size: vocab });
        }
    }
    Ok(())
}

/// The trunk over a right-padded batch of prompt + completion, and which of its positions
/// predict completion tokens: ([B, T, H] hidden, [B, C] source positions, [B, C] targets,
/// [B, C] mask).
fn trunk(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)]) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (batch, src, tgt, mask) = layout(model, pairs)?;
    let hidden = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?;
    Ok((hidden, src, tgt, mask))
}

/// As [`trunk`] for inference, through [`Llama::forward_hidden_shared`]: when the sequences
/// open with a common prefix (a system prompt) it goes through the trunk once, the hidden
/// states start where it ends, and the source positions count from there.
fn trunk_shared(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)]) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (src, tgt, mask) = targets(model, pairs);
    let seqs: Vec<Vec<i64>> = pairs.iter().map(|(p, c)| [p.as_slice(), c.as_slice()].concat()).collect();
    // Every completion token is predicted from its prompt's last position on.
    let max_prefix = pairs.iter().map(|(p, _)| p.len() - 1).min().unwrap_or(0);
    let (hidden, offset) = model.forward_hidden_shared(&seqs, max_prefix)?;
    // Padding entries (source 0, masked) stay in range.
    Ok((hidden, (src - offset).clamp_min(0), tgt, mask))
}

/// The right-padded batch of prompt + completion, and which of its positions predict
/// completion tokens: ([B, C] source positions, [B, C] targets, [B, C] mask).
fn layout(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)]) -> Result<(PaddedBatch, Tensor, Tensor, Tensor)> {
    let seqs: Vec<Vec<i64>> = pairs.iter().map(|(p, c)| [p.as_slice(), c.as_slice()].concat()).collect();
    let batch = PaddedBatch::right_padded(&seqs, 0, model.device())?;
    let (src, tgt, mask) = targets(model, pairs);
    Ok((batch, src, tgt, mask))
}

/// Which positions of a right-padded batch of prompt + completion predict completion tokens:
/// ([B, C] source positions, [B, C] targets, [B, C] mask).
fn targets(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)]) -> (Tensor, Tensor, Tensor) {
    let dev = model.device();
    let b = pairs.len() as i64;
    let cmax = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0) as i64;
    // Position of the hidden state predicting completion token t: prompt_len - 1 + t.
    let mut src = Vec::with_capacity((b * cmax) as usize);
    let mut tgt = Vec::with_capacity((b * cmax) as usize);
    let mut mask = Vec::with_capacity((b * cmax) as usize);
    for (p, c) in pairs {
        for t in 0..cmax as usize {
            let real = t < c.len();
            src.push(if real { (p.len() - 1 + t) as i64 } else { 0 });
            tgt.push(if real { c[t] } else { 0 });
            mask.push(real);
        }
    }
    let src = Tensor::from_slice(&src).view([b, cmax]).to_device(dev);
    let tgt = Tensor::from_slice(&tgt).view([b, cmax]).to_device(dev);
    let mask = Tensor::from_slice(&mask).view([b, cmax]).to_device(dev);
    (src, tgt, mask)
}

/// Log-probs (and entropies) of `targets` [R] under the head applied to `rows` [R, H], at most
/// `chunk` rows at a time, without a graph.
fn head_logprobs(
    model: &Llama,
    rows: &Tensor,
    targets: &Tensor,
    chunk: i64,
    entropy: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    tch::no_grad(|| {
        let r = rows.size()[0];
        let mut lps = vec![];
        let mut ents = vec![];
        let mut at = 0;
        while at < r {
            let n = chunk.min(r - at);
            let logp_all = model.logits(&rows.narrow(0, at, n))?.log_softmax(-1, Kind::Float);
            lps.push(logp_all.gather(1, &targets.narrow(0, at, n).unsqueeze(-1), false).squeeze_dim(-1));
            if entropy {
                ents.push(-(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float));
            }
            at += n;
        }
        let cat = |v: Vec<Tensor>| {
            if v.is_empty() {
                Tensor::zeros([0], (Kind::Float, rows.device()))
            } else {
                Tensor::cat(&v, 0)
            }
        };
        Ok((cat(lps), entropy.then(|| cat(ents))))
    })
}

/// [R] values at the true entries of `mask` [B, C] spread into [B, C] with zeros elsewhere.
fn spread(mask: &Tensor, values: &Tensor) -> Tensor {
    Tensor::zeros(mask.size(), (Kind::Float, mask.device())).masked_scatter(mask, values)
}

fn chunk_of(chunk_positions: usize) -> i64 {
    if chunk_positions == 0 {
        i64::MAX
    } else {
        chunk_positions as i64
    }
}

/// [`Grad::Graph`]. Only completion positions go through the output head, which saves most of
/// the vocabulary-sized work on long prompts.
fn graph(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)], with_entropy: bool) -> Result<TokenLogprobs> {
    validate(model, pairs)?;
    let (hidden, src, tgt, mask) = trunk(model, pairs)?;
    let (b, cmax) = src.size2()?;
    let h = hidden.size()[2];
    let picked = hidden.gather(1, &src.unsqueeze(-1).expand([b, cmax, h], true), false);
    let logits = model.logits(&picked)?;
    let logp_all = logits.log_softmax(-1, Kind::Float);
    let logprobs = logp_all.gather(2, &tgt.unsqueeze(-1), false).squeeze_dim(-1);
    let logprobs = logprobs.where_self(&mask, &logprobs.zeros_like());
    let entropy = with_entropy.then(|| {
        let e = -(logp_all.exp() * &logp_all).sum_dim_intlist(-1, false, Kind::Float);
        e.where_self(&mask, &e.zeros_like()).detach()
    });
    Ok(TokenLogprobs { logprobs, mask, entropy, deferred: None })
}

/// [`Grad::None`]: rows come back in the order of `pairs`, padded to the longest completion
/// of all.
fn limited(
    model: &Llama,
    pairs: &[(Vec<i64>, Vec<i64>)],
    with_entropy: bool,
    limits: ScoreLimits,
) -> Result<TokenLogprobs> {
    validate(model, pairs)?;
    let cmax = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0) as i64;
    let mut lps = vec![];
    let mut ents = vec![];
    let mut masks = vec![];
    let lengths: Vec<usize> = pairs.iter().map(|(p, c)| p.len() + c.len()).collect();
    let buckets = length_buckets(&lengths, limits.batch_tokens);
    for bucket in &buckets {
        let part: Vec<(Vec<i64>, Vec<i64>)> = bucket.iter().map(|&i| pairs[i].clone()).collect();
        let scored = tch::no_grad(|| -> Result<TokenLogprobs> {
            let (hidden, src, tgt, mask) = trunk_shared(model, &part)?;
            let rows = real_rows(&hidden, &src, &mask);
            let (lp, ent) =
                head_logprobs(model, &rows, &tgt.masked_select(&mask), chunk_of(limits.chunk_positions), with_entropy)?;
            Ok(TokenLogprobs {
                logprobs: spread(&mask, &lp),
                entropy: ent.map(|e| spread(&mask, &e)),
                mask,
                deferred: None,
            })
        })?;
        let width = scored.mask.size()[1];
        let pad = |t: &Tensor| t.constant_pad_nd([0, cmax - width]);
        lps.push(pad(&scored.logprobs));
        masks.push(pad(&scored.mask));
        if let Some(e) = &scored.entropy {
            ents.push(pad(e));
        }
    }
    // Back to the order of `pairs`.
    let mut at = vec![0i64; pairs.len()];
    for (row, &i) in buckets.iter().flatten().enumerate() {
        at[i] = row as i64;
    }
    let at = Tensor::from_slice(&at).to_device(model.device());
    let order = |v: Vec<Tensor>| Tensor::cat(&v, 0).index_select(0, &at);
    Ok(TokenLogprobs {
        logprobs: order(lps),
        mask: order(masks),
        entropy: with_entropy.then(|| order(ents)),
        deferred: None,
    })
}

/// Below this many padded tokens a batch is not split by length: the passes would be too small
/// to pay for themselves.
pub const MIN_SPLIT_TOKENS: usize = 2048;

/// The padding a length bucket may add, as a fraction of its real tokens.
pub const MAX_PADDING: f64 = 0.2;

/// Groups of sequences (indices into `lengths`) for right-padded passes. A batch of at most
/// [`MIN_SPLIT_TOKENS`] padded tokens (and within `budget`) stays one group, in order. Otherwise
/// the sequences go by ascending length and a group grows while its padded size (members x
/// longest) stays within `budget` tokens (0 = no limit) and within 1 + [`MAX_PADDING`] times
/// its real tokens: answers of 10 and 256 tokens are not padded to one length. A sequence
/// longer than the budget goes alone; every index appears exactly once.
pub fn length_buckets(lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let n = lengths.len();
    let padded = n * lengths.iter().copied().max().unwrap_or(0);
    if n == 0 {
        return vec![];
    }
    if padded <= MIN_SPLIT_TOKENS && (budget == 0 || padded <= budget) {
        return vec![(0..n).collect()];
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (lengths[i], i));
    let mut out: Vec<Vec<usize>> = vec![];
    let mut group: Vec<usize> = vec![];
    let mut real = 0usize;
    for i in order {
        let len = lengths[i];
        let size = (group.len() + 1) * len;
        let too_big = budget > 0 && size > budget;
        let too_padded = size as f64 > (1.0 + MAX_PADDING) * (real + len) as f64;
        if !group.is_empty() && (too_big || too_padded) {
            out.push(std::mem::take(&mut group));
            real = 0;
        }
        group.push(i);
        real += len;
    }
    out.push(group);
    out
}

/// Consecutive ranges of sequences (given by their lengths) whose padded size (sequences x
/// longest) stays within `budget` tokens; a sequence longer than the budget goes alone.
/// 0 = one range.
pub fn token_batches(lengths: impl IntoIterator<Item = usize>, budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = vec![];
    let mut start = 0;
    let mut longest = 0;
    let mut n = 0;
    for (i, len) in lengths.into_iter().enumerate() {
        n = i + 1;
        let wider = longest.max(len);
        if budget > 0 && i > start && wider * (i + 1 - start) > budget {
            out.push(start..i);
            start = i;
            longest = len;
        } else {
            longest = wider;
        }
    }
    if start < n {
        out.push(start..n);
    }
    out
}

/// [R, H]: the hidden states predicting the R real completion tokens, in row-major order.
fn real_rows(hidden: &Tensor, src: &Tensor, mask: &Tensor) -> Tensor {
    let (b, cmax) = src.size2().expect("src is [B, C]");
    let h = hidden.size()[2];
    let picked = hidden.gather(1, &src.unsqueeze(-1).expand([b, cmax, h], true), false);
    picked.reshape([b * cmax, h]).index_select(0, &mask.reshape([-1]).nonzero().squeeze_dim(1))
}

/// [`Grad::Chunked`], the head in chunks of at most `chunk_positions` positions (0 = all at
/// once).
fn chunked(
    model: &Llama,
    pairs: &[(Vec<i64>, Vec<i64>)],
    with_entropy: bool,
    chunk_positions: usize,
) -> Result<TokenLogprobs> {
    validate(model, pairs)?;
    let (hidden, src, tgt, mask) = trunk(model, pairs)?;
    let rows = real_rows(&hidden, &src, &mask);
    drop(hidden);
    let targets = tgt.masked_select(&mask);
    let chunk = chunk_of(chunk_positions);
    let (lp, ent) = head_logprobs(model, &rows, &targets, chunk, with_entropy)?;
    let logprobs = spread(&mask, &lp).set_requires_grad(rows.requires_grad());
    let entropy = ent.map(|e| spread(&mask, &e));
    Ok(TokenLogprobs { logprobs, mask, entropy, deferred: Some(Deferred { rows, targets, chunk, checkpoints: None }) })
}

/// [`Grad::Checkpointed`] (module docs).
fn checkpointed(
    model: &Llama,
    pairs: &[(Vec<i64>, Vec<i64>)],
    with_entropy: bool,
    chunk_positions: usize,
) -> Result<TokenLogprobs> {
    validate(model, pairs)?;
    let trainable = model.parameters().iter().any(|(_, p)| p.requires_grad());
    let (batch, src, tgt, mask) = layout(model, pairs)?;
    let pass = model.block_pass(&batch.positions, &batch.mask)?;
    let (inputs, last, rows) = tch::no_grad(|| -> Result<_> {
        let mut x = model.embed(&batch.ids)?;
        let mut inputs = Vec::with_capacity(model.num_layers());
        for l in 0..model.num_layers() {
            let y = model.forward_block(l, &x, &pass)?;
            inputs.push(x);
            x = y;
        }
        let rows = real_rows(&model.final_norm(&x), &src, &mask);
        Ok((inputs, x, rows))
    })?;
    let targets = tgt.masked_select(&mask);
    let chunk = chunk_of(chunk_positions);
    let (lp, ent) = head_logprobs(model, &rows, &targets, chunk, with_entropy)?;
    let logprobs = spread(&mask, &lp).set_requires_grad(trainable);
    let entropy = ent.map(|e| spread(&mask, &e));
    let checkpoints = Checkpoints { ids: batch.ids, pass, inputs, last, src };
    let deferred = Deferred { rows, targets, chunk, checkpoints: Some(checkpoints) };
    Ok(TokenLogprobs { logprobs, mask, entropy, deferred: Some(deferred) })
}

impl TokenLogprobs {
    /// Finishes the gradient once the loss's backward pass has reached `logprobs`: in the
    /// chunked modes through the head chunk by chunk, then through the trunk (with
    /// [`Grad::Graph`] `loss.backward()` already went all the way). Gradients accumulate into
    /// the parameters' `.grad` as with any backward pass. A loss that did not use the
    /// log-probs leaves nothing to do.
    pub fn backward(self, model: &Llama) -> Result<()> {
        if !self.logprobs.requires_grad() {
            return Err(PolicyError::InvalidInput(
                "backward through log-probs of a model whose parameters do not require grad".into(),
            ));
        }
        let Some(this) = self.deferred else { return Ok(()) };
        let upstream = self.logprobs.grad();
        if !upstream.defined() {
            return Ok(());
        }
        let upstream = upstream.masked_select(&self.mask);
        let detached = this.rows.detach();
        let r = detached.size()[0];
        let mut grads = vec![];
        let mut at = 0;
        while at < r {
            let n = this.chunk.min(r - at);
            let x = detached.narrow(0, at, n).detach().set_requires_grad(true);
            tch::with_grad(|| -> Result<()> {
                let lp = model
                    .logits(&x)?
                    .log_softmax(-1, Kind::Float)
                    .gather(1, &this.targets.narrow(0, at, n).unsqueeze(-1), false)
                    .squeeze_dim(-1);
                (lp * upstream.narrow(0, at, n)).sum(Kind::Float).backward();
                Ok(())
            })?;
            grads.push(x.grad());
            at += n;
        }
        if grads.is_empty() {
            return Ok(());
        }
        let d_rows = Tensor::cat(&grads, 0);
        drop(grads);
        // The gradient of sum(y * d) with respect to y is exactly d: each backward below sends
        // a given gradient d through the graph of y.
        let Some(mut c) = this.checkpoints else {
            tch::with_grad(|| (&this.rows * d_rows).sum(Kind::Float).backward());
            return Ok(());
        };
        tch::with_grad(|| -> Result<()> {
            let x = c.last.detach().set_requires_grad(true);
            let rows = real_rows(&model.final_norm(&x), &c.src, &self.mask);
            (rows * d_rows).sum(Kind::Float).backward();
            let mut d = x.grad();
            drop(x);
            for l in (0..c.inputs.len()).rev() {
                let x = c.inputs.pop().expect("one input per block").set_requires_grad(true);
                let y = model.forward_block(l, &x, &c.pass)?;
                (y * &d).sum(Kind::Float).backward();
                d = x.grad();
            }
            (model.embed(&c.ids)? * d).sum(Kind::Float).backward();
            Ok(())
        })
    }
}

/// Reward-model scores: the `score` head read at the last real token of each sequence.
pub fn sequence_scores(model: &Llama, seqs: &[Vec<i64>]) -> Result<Vec<f32>> {
    let dev = model.device();
    let batch = PaddedBatch::right_padded(seqs, 0, dev)?;
    model.check_ids(&batch.ids)?;
    tch::no_grad(|| {
        let hidden = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?;
        let last: Vec<i64> = batch.lengths.iter().map(|l| l - 1).collect();
        let idx = Tensor::from_slice(&last).to_device(dev);
        let b = seqs.len() as i64;
        let h = hidden.size()[2];
        let picked = hidden.gather(1, &idx.view([b, 1, 1]).expand([b, 1, h], true), false).squeeze_dim(1);
        let s = model.scores(&picked)?.select(1, 0);
        Ok(Vec::<f32>::try_from(s.to_device(tch::Device::Cpu))?)
    })
}

#[cfg(test)]
mod tests {
    use super::{length_buckets, token_batches, MIN_SPLIT_TOKENS};

    fn check_partition(groups: &[Vec<usize>], n: usize) {
        let mut all: Vec<usize> = groups.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every index once: {groups:?}");
    }

    #[test]
    fn small_batches_stay_whole_and_in_order() {
        let lens = [4, 2, 6, 1, 1, 9, 3];
        assert_eq!(length_buckets(&lens, 0), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        assert_eq!(length_buckets(&lens, 1000), vec![vec![0, 1, 2, 3, 4, 5, 6]]);
        assert!(length_buckets(&[], 5).is_empty());
    }

    #[test]
    fn large_batches_split_by_length_and_budget() {
        // 32 answers of 10 to 320 tokens: one padded pass would be 32 x 320 = 10,240 tokens.
        let lens: Vec<usize> = (0..32).map(|i| 10 + (i * 97) % 311).collect();
        let real: usize = lens.iter().sum();
        for budget in [0, 4096, 1000, 300, 1] {
            let groups = length_buckets(&lens, budget);
            check_partition(&groups, lens.len());
            let mut padded = 0;
            for g in &groups {
                let longest = g.iter().map(|&i| lens[i]).max().unwrap();
                let size = g.len() * longest;
                padded += size;
                assert!(budget == 0 || size <= budget || g.len() == 1, "budget {budget}: {g:?}");
                let own: usize = g.iter().map(|&i| lens[i]).sum();
                assert!(size as f64 <= 1.2 * own as f64 || g.len() == 1, "padding of {g:?}");
            }
            assert!(padded < 32 * 320 && padded as f64 <= 1.2 * real as f64, "budget {budget}: {padded} padded");
        }
        assert!(32 * 320 > MIN_SPLIT_TOKENS);
    }

    #[test]
    fn token_batches_bound_the_padded_size() {
        let lens = [4, 2, 6, 1, 1, 9, 3];
        assert_eq!(token_batches(lens, 0), vec![0..7]);
        // 4,2 -> 2 x 4 = 8; adding 6 -> 3 x 6 = 18 > 12.
        assert_eq!(token_batches(lens, 12), vec![0..2, 2..4, 4..5, 5..6, 6..7]);
        assert_eq!(token_batches(lens, 18), vec![0..3, 3..5, 5..7]);
        // A sequence longer than the budget goes alone; nothing is dropped.
        assert_eq!(token_batches(lens, 1), (0..7).map(|i| i..i + 1).collect::<Vec<_>>());
        assert_eq!(token_batches(lens, 1000), vec![0..7]);
        assert!(token_batches([0usize; 0], 5).is_empty());
        for budget in 1..30 {
            let ranges = token_batches(lens, budget);
            assert_eq!(ranges.first().unwrap().start, 0);
            assert_eq!(ranges.last().unwrap().end, lens.len());
            for w in ranges.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in ranges {
                let padded = lens[r.clone()].iter().max().unwrap() * r.len();
                assert!(r.len() == 1 || padded <= budget, "{budget}: {r:?}");
            }
        }
    }
}
