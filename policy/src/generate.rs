//! Batched sampling with a KV cache: unequal prompt lengths in one batch (left padding),
//! greedy / temperature / top-k / top-p, seeded, stop on EOS ids and stop strings. Returns the
//! log-prob of every sampled token under the unmodified model distribution (temperature 1, no
//! filtering): the behaviour log-probs the learner uses for importance weights, equal to the
//! training-side scoring of the same sequence.
use crate::error::{PolicyError, Result};
use crate::model::{AttnMask, KvCache, Llama};
use crate::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables nucleus filtering.
    pub top_p: f64,
    /// 0 disables top-k filtering.
    pub top_k: i64,
    pub max_new_tokens: i64,
    pub seed: u64,
    pub stop: Vec<String>,
    /// At most this many sequences decode at once; finished ones are replaced by waiting ones
    /// (continuous batching). 0 = all at once.
    pub max_batch: usize,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            seed: 0,
            stop: vec![],
            max_batch: 0,
        }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: i64) -> Self {
        SamplingConfig { temperature: 0.0, max_new_tokens, ..Default::default() }
    }
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PolicyError::InvalidInput(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return bad(format!("top_k must be >= 0, got {}", self.top_k));
        }
        if self.max_new_tokens < 1 {
            return bad(format!("max_new_tokens must be >= 1, got {}", self.max_new_tokens));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    pub prompt_ids: Vec<i64>,
    /// Sampled ids, including the EOS token when the sequence ended on one.
    pub completion_ids: Vec<i64>,
    /// Decoded completion without special tokens, cut before a stop string.
    pub text: String,
    /// log pi(token | prefix) of every completion id, in f32 precision.
    pub logprobs: Vec<f32>,
    pub finish_reason: FinishReason,
    /// With a [`FinishProbe`]: the next-token logits (f32, unscaled) at the probe's ids after
    /// the completion and the suffix the probe chose for this row; None when it chose none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Vec<f32>>,
}

/// Reads the model's next-token logits after a finished row plus a suffix of its choosing,
/// while the row's keys are still cached: a finished row feeds its last sampled token, then
/// the suffix, one token per decoding step, and the logits at `ids` after the last of them
/// are its [`Completion::probe`]. This is what the self-reward judge needs when a judgement
/// holds no score (the expected score after `judgement + "<Score>"`), at the cost of a few
/// decoding steps instead of a second pass over prompt and judgement.
pub struct FinishProbe<'a> {
    /// The token ids whose logits are read.
    pub ids: Vec<i64>,
    /// The longest suffix `suffix` returns (the cache is sized for it).
    pub max_suffix: usize,
    /// Called once per finished row with the row's index, its completion ids (the EOS or stop
    /// tokens included) and how it ended: the suffix to feed after them, or None to read
    /// nothing.
    #[allow(clippy::type_complexity)]
    pub suffix: Box<dyn FnMut(usize, &[i64], FinishReason) -> Result<Option<Vec<i64>>> + 'a>,
}

/// SplitMix64: a tiny, fast, seedable generator, so that sampling depends on the seed alone
/// and not on libtorch's global generator.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn state(&self) -> u64 {
        self.0
    }
}

/// Applies temperature, top-k and top-p to f32 logits [B, V] and returns the probabilities.
pub fn sampling_probs(logits: &Tensor, cfg: &SamplingConfig) -> Tensor {
    let mut l = logits / cfg.temperature;
    let v = l.size()[1];
    if cfg.top_k > 0 && cfg.top_k < v {
        let (top, _) = l.topk(cfg.top_k, -1, true, true);
        let kth = top.narrow(1, cfg.top_k - 1, 1);
        l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if cfg.top_p < 1.0 {
        // Keep the smallest set of most likely tokens whose mass reaches top_p (at least one).
        let (sorted, idx) = l.sort(-1, true);
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let mass_before = &cum - sorted.softmax(-1, Kind::Float);
        let drop_sorted = mass_before.ge(cfg.top_p);
        let drop = drop_sorted.zeros_like().scatter(-1, &idx, &drop_sorted);
        l = l.masked_fill(&drop, f64::NEG_INFINITY);
    }
    l.softmax(-1, Kind::Float)
}

/// One sequence to generate: chat-rendered prompt ids and the seed of its own random stream.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    pub prompt_ids: Vec<i64>,
    pub seed: u64,
}

impl GenRequest {
    /// One request per prompt, row r seeded with `row_seed(seed, r)`: a whole batch under one
    /// seed (what `SamplingConfig::seed` means for a list of prompts).
    pub fn from_prompts(prompts: &[Vec<i64>], seed: u64) -> Vec<GenRequest> {
        prompts.iter().enumerate().map(|(r, p)| GenRequest { prompt_ids: p.clone(), seed: row_seed(seed, r) }).collect()
    }
}

/// The seed of row `row` when a whole batch is given one seed ([`GenRequest::from_prompts`]).
pub fn row_seed(seed: u64, row: usize) -> u64 {
    let mut g = SplitMix64::new(seed ^ (row as u64).wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    g.next_u64()
}

/// What one generation call did, for benchmarks and the transfer test.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Decoding steps (one sampled token per active row each).
    pub steps: u64,
    /// Blocking device-to-host reads.
    pub device_to_host: u64,
    /// Host-to-device uploads.
    pub host_to_device: u64,
    /// Prefill passes (the first one, then one per refill of finished slots).
    pub prefills: u64,
    /// Sequences that entered a slot freed by another (continuous batching).
    pub refills: u64,
    /// Rows the prefill passes computed: one per distinct prompt of each pass.
    pub prefill_rows: u64,
    /// Prompt tokens that a prefill computed once for all its rows (their common opening).
    pub shared_prefix_tokens: u64,
    /// Sum over steps of the rows that were generating, and of all slots: their ratio is how
    /// full the batch was.
    pub active_row_steps: u64,
    pub slot_steps: u64,
}

/// Every host-device transfer of the generator goes through here, so that tests can count
/// them (on a GPU each read is a synchronisation).
struct Transfers<'a> {
    stats: &'a mut GenStats,
    device: tch::Device,
}

impl Transfers<'_> {
    fn up<T: tch::kind::Element>(&mut self, data: &[T]) -> Tensor {
        self.stats.host_to_device += 1;
        Tensor::from_slice(data).to_device(self.device)
    }
    fn down_ids(&mut self, t: &Tensor) -> Result<Vec<i64>> {
        self.stats.device_to_host += 1;
        Ok(Vec::<i64>::try_from(t.to_device(tch::Device::Cpu).reshape([-1]))?)
    }
    fn down_f32(&mut self, t: &Tensor) -> Result<Vec<f32>> {
        self.stats.device_to_host += 1;
        Ok(Vec::<f32>::try_from(t.to_device(tch::Device::Cpu).reshape([-1]))?)
    }
}

/// The one generation path: a model, its tokenizer and EOS ids, and optional extras (a
/// finish probe, a per-token callback), run over requests. There is a single decoding loop so
/// that every caller gets the same numerics and the same optimisations (and a GPU has one
/// path to capture).
pub struct Generator<'a> {
    model: &'a Llama,
    tokenizer: &'a Tokenizer,
    eos_ids: &'a [i64],
    probe: Option<FinishProbe<'a>>,
    #[allow(clippy::type_complexity)]
    on_token: Option<Box<dyn FnMut(usize, i64) + 'a>>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Llama, tokenizer: &'a Tokenizer, eos_ids: &'a [i64]) -> Self {
        Generator { model, tokenizer, eos_ids, probe: None, on_token: None }
    }

    /// Reads `probe` after every finished row that asks for it ([`FinishProbe`]).
    pub fn probe(mut self, probe: FinishProbe<'a>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Calls `f(request, id)` for every sampled token as it is sampled (streaming).
    pub fn on_token(mut self, f: impl FnMut(usize, i64) + 'a) -> Self {
        self.on_token = Some(Box::new(f));
        self
    }

    /// Generates one completion per request, in order, and says what the call did. Each
    /// request samples from its own stream `SplitMix64(seed)` (`cfg.seed` is not read; see
    /// [`GenRequest::from_prompts`]), so its tokens do not depend on the other requests in
    /// the batch except through floating-point effects. At most `cfg.max_batch` rows run at
    /// once (0 = all); a row that finishes is refilled at once with a waiting request
    /// (continuous batching).
    pub fn run(&mut self, reqs: &[GenRequest], cfg: &SamplingConfig) -> Result<(Vec<Completion>, GenStats)> {
        let on_token = &mut self.on_token;
        decode(
            self.model,
            self.tokenizer,
            reqs,
            cfg,
            self.eos_ids,
            |r, id| {
                if let Some(f) = on_token.as_mut() {
                    f(r, id)
                }
            },
            self.probe.as_mut(),
        )
    }
}

/// Decoding capacities are rounded up to this many positions, so that calls with similar
/// lengths share attention shapes (and kernels).
const CAPACITY_QUANTUM: i64 = 64;

#[allow(clippy::too_many_arguments)]
fn decode(
    model: &Llama,
    tokenizer: &Tokenizer,
    reqs: &[GenRequest],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
    mut on_token: impl FnMut(usize, i64),
    mut probe: Option<&mut FinishProbe>,
) -> Result<(Vec<Completion>, GenStats)> {
    cfg.validate()?;
    if reqs.is_empty() || reqs.iter().any(|r| r.prompt_ids.is_empty()) {
        return Err(PolicyError::InvalidInput("generate needs non-empty prompts".into()));
    }
    let vocab = model.config().vocab_size;
    if let Some(&id) = reqs.iter().flat_map(|r| &r.prompt_ids).find(|&&id| id < 0 || id >= vocab) {
        return Err(PolicyError::TokenOutOfRange { id, vocab_size: vocab });
    }
    let dev = model.device();
    let n = reqs.len();
    let max_new = cfg.max_new_tokens;
    let slots = if cfg.max_batch == 0 { n } else { cfg.max_batch.min(n) };
    let longest = reqs.iter().map(|r| r.prompt_ids.len()).max().unwrap_or(0) as i64;
    // The last sampled token is never fed back, so a row needs prompt + max_new - 1 positions.
    // A probed row also feeds its last sampled token and its suffix.
    let probe_room = probe.as_ref().map_or(0, |p| p.max_suffix as i64 + 1);
    let capacity = (longest + max_new + probe_room + CAPACITY_QUANTUM - 1) / CAPACITY_QUANTUM * CAPACITY_QUANTUM;
    // On CUDA the decode step (cache and graphs) is kept for the next generation of the same
    // shape: capacities in powers of two let calls of similar lengths share it.
    let capacity = if dev == tch::Device::Cpu { capacity } else { (capacity as u64).next_power_of_two() as i64 };
    let max_pos = model.config().max_position_embeddings;
    if longest + max_new > max_pos && model.config().rope.scaling.is_none() && max_pos > 0 {
        tracing::debug!(longest, max_new, max_pos, "generating past max_position_embeddings");
    }
    let pad = eos_ids.first().copied().unwrap_or(0);
    let mut stats = GenStats::default();
    let mut io = Transfers { stats: &mut stats, device: dev };

    // Every uniform the call can need, from each request's own stream, uploaded once. Cell
    // n * max_new is a sink for the slots that hold no request.
    let sink = n as i64 * max_new;
    let sampling = cfg.temperature != 0.0;
    let uniforms = sampling.then(|| {
        let mut u: Vec<f32> = Vec::with_capacity(n * max_new as usize + 1);
        for r in reqs {
            let mut g = SplitMix64::new(r.seed);
            u.extend((0..max_new).map(|_| g.next_f64() as f32));
        }
        u.push(0.5);
        u
    });
    let uniforms = uniforms.map(|u| io.up(&u));
    let mut logprob_cells = Tensor::zeros([sink + 1], (Kind::Float, dev));

    let mut out: Vec<Completion> = reqs
        .iter()
        .map(|r| Completion {
            prompt_ids: r.prompt_ids.clone(),
            completion_ids: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Length,
            probe: None,
        })
        .collect();
    // Host view of the slots: which request each holds.
    let mut holder: Vec<Option<usize>> = vec![None; slots];
    // Slots whose request has finished and is being probed: the tokens still to feed.
    let mut forced: Vec<Option<std::collections::VecDeque<i64>>> = vec![None; slots];
    // Host copy of each slot's next position (kept in step with the device's, no reads).
    let mut host_position: Vec<i64> = vec![0; slots];
    let mut waiting = 0..n;
    let probe_ids = match &probe {
        Some(p) => {
            if let Some(&id) = p.ids.iter().find(|&&id| id < 0 || id >= vocab) {
                return Err(PolicyError::TokenOutOfRange { id, vocab_size: vocab });
            }
            Some(io.up(&p.ids))
        }
        None => None,
    };

    let result = tch::no_grad(|| -> Result<()> {
        model.with_decode_step(slots as i64, capacity, |step| -> Result<()> {
            // Device state per slot: the position of the next fed token, the cell of the next
            // sampled token, whether the slot samples, and whether it feeds tokens (sampling or
            // probing).
            let mut position = Tensor::zeros([slots as i64], (Kind::Int64, dev));
            let mut cell = Tensor::full([slots as i64], sink, (Kind::Int64, dev));
            let mut active = Tensor::zeros([slots as i64], (Kind::Int64, dev));
            let mut feeding = Tensor::zeros([slots as i64], (Kind::Int64, dev));
            let mut logits = Tensor::zeros([slots as i64, vocab], (Kind::Float, dev));

            {
                let mut state = SlotState {
                    holder: &mut holder,
                    host_position: &mut host_position,
                    cache: &mut step.cache,
                    logits: &mut logits,
                    position: &mut position,
                    cell: &mut cell,
                    active: &mut active,
                    feeding: &mut feeding,
                };
                let all: Vec<usize> = (0..slots).collect();
                state.fill(&all, &mut waiting, reqs, model, pad, max_new, &mut io)?;
            }
            let (holder, host_position, logits, position, cell, active, feeding) =
                (&mut holder, &mut host_position, &mut logits, &mut position, &mut cell, &mut active, &mut feeding);

            loop {
                // Sample every slot's next token on the device; read back only the ids.
                let logp = logits.log_softmax(-1, Kind::Float);
                let mut next = match &uniforms {
                    None => logits.argmax(-1, false),
                    Some(u) => {
                        let probs = sampling_probs(&logits, cfg);
                        let cum = probs.cumsum(-1, Kind::Float);
                        let total = cum.narrow(1, vocab - 1, 1);
                        let u = u.index_select(0, &cell).unsqueeze(1);
                        // Inverse-CDF sampling; clamp guards against rounding past the last token.
                        (u * &total)
                            .searchsorted(&cum, false, true, "right", None::<Tensor>)
                            .squeeze_dim(1)
                            .clamp_max(vocab - 1)
                    }
                };
                let lp = logp.gather(1, &next.unsqueeze(1), false).squeeze_dim(1);
                let _ = logprob_cells.index_copy_(0, &cell, &lp);
                let mut finished = Vec::new();
                // Probed slots: read the logits of those that fed their whole suffix, and take
                // the next forced token of the others.
                let mut overrides: Vec<(i64, i64)> = Vec::new();
                let mut reads: Vec<usize> = Vec::new();
                for (slot, f) in forced.iter_mut().enumerate() {
                    let Some(queue) = f else { continue };
                    match queue.pop_front() {
                        Some(id) => overrides.push((slot as i64, id)),
                        None => reads.push(slot),
                    }
                }
                if let (false, Some(ids)) = (reads.is_empty(), &probe_ids) {
                    let at: Vec<i64> = reads.iter().map(|&s| s as i64).collect();
                    let at = io.up(&at);
                    let k = ids.size()[0] as usize;
                    let values = io.down_f32(&logits.index_select(0, &at).index_select(1, ids))?;
                    for (i, &slot) in reads.iter().enumerate() {
                        let r = holder[slot].take().expect("a probed slot holds its request");
                        out[r].probe = Some(values[i * k..(i + 1) * k].to_vec());
                        forced[slot] = None;
                        finished.push(slot);
                    }
                }
                let ids = io.down_ids(&next)?;
                io.stats.steps += 1;
                io.stats.slot_steps += slots as u64;
                // Rows that finish this step and are probed: they still feed the token just sampled.
                let mut probing = Vec::new();
                for (slot, held) in holder.iter_mut().enumerate() {
                    let Some(r) = *held else { continue };
                    io.stats.active_row_steps += 1;
                    if forced[slot].is_some() {
                        continue;
                    }
                    let c = &mut out[r];
                    let id = ids[slot];
                    c.completion_ids.push(id);
                    on_token(r, id);
                    let done = if eos_ids.contains(&id) {
                        c.finish_reason = FinishReason::Eos;
                        true
                    } else if !cfg.stop.is_empty() && {
                        let text = tokenizer.decode(&c.completion_ids, true)?;
                        cfg.stop.iter().any(|s| text.contains(s.as_str()))
                    } {
                        c.finish_reason = FinishReason::Stop;
                        true
                    } else {
                        c.completion_ids.len() as i64 == max_new
                    };
                    if !done {
                        continue;
                    }
                    let suffix = match probe.as_mut() {
                        Some(p) => (p.suffix)(r, &c.completion_ids, c.finish_reason)?,
                        None => None,
                    };
                    match suffix {
                        Some(s) if s.len() > probe.as_ref().map_or(0, |p| p.max_suffix) => {
                            return Err(PolicyError::InvalidInput(format!(
                                "a probe suffix of {} tokens, longer than its max_suffix",
                                s.len()
                            )));
                        }
                        Some(s) => {
                            if let Some(&id) = s.iter().find(|&&id| id < 0 || id >= vocab) {
                                return Err(PolicyError::TokenOutOfRange { id, vocab_size: vocab });
                            }
                            forced[slot] = Some(s.into());
                            probing.push(slot);
                        }
                        None => {
                            *held = None;
                            finished.push(slot);
                        }
                    }
                }
                let more = waiting.len() > 0;
                if holder.iter().all(|h| h.is_none()) && !more {
                    break;
                }
                if !finished.is_empty() || !probing.is_empty() {
                    // Neither samples any more; finished slots stop feeding too.
                    let stopped: Vec<i64> = finished.iter().chain(&probing).map(|&s| s as i64).collect();
                    let stopped = io.up(&stopped);
                    let _ = active.index_fill_(0, &stopped, 0);
                    let _ = cell.index_fill_(0, &stopped, sink);
                    if !finished.is_empty() {
                        let _ = feeding.index_fill_(0, &stopped.narrow(0, 0, finished.len() as i64), 0);
                    }
                }
                // The next cell of every generating slot; the sink stays the sink.
                *cell = &*cell + &*active;
                if holder.iter().any(|h| h.is_some()) {
                    if !overrides.is_empty() {
                        let (at, id): (Vec<i64>, Vec<i64>) = overrides.iter().copied().unzip();
                        next = next.index_put(&[Some(io.up(&at))], &io.up(&id), false);
                    }
                    // Feed the sampled (or forced) ids back; finished and empty slots compute on
                    // unchanged positions and their outputs are ignored.
                    // Attend over the positions in use, rounded up: the shape changes once per
                    // CAPACITY_QUANTUM positions, not at every step.
                    let used = holder
                        .iter()
                        .zip(host_position.iter())
                        .filter(|(h, _)| h.is_some())
                        .map(|(_, &p)| p + 1)
                        .max()
                        .unwrap_or(1);
                    let span = ((used + CAPACITY_QUANTUM - 1) / CAPACITY_QUANTUM * CAPACITY_QUANTUM).min(capacity);
                    // One decode step (a CUDA graph's replay on CUDA, crate::decode_step).
                    *logits = step.run(model, &next, position, span)?;
                    *position = &*position + &*feeding;
                    for (p, h) in host_position.iter_mut().zip(holder.iter()) {
                        if h.is_some() {
                            *p += 1;
                        }
                    }
                }
                if more && !finished.is_empty() {
                    io.stats.refills += finished.len().min(waiting.len()) as u64;
                    let mut state = SlotState {
                        holder: &mut *holder,
                        host_position: &mut *host_position,
                        cache: &mut step.cache,
                        logits: &mut *logits,
                        position: &mut *position,
                        cell: &mut *cell,
                        active: &mut *active,
                        feeding: &mut *feeding,
                    };
                    state.fill(&finished, &mut waiting, reqs, model, pad, max_new, &mut io)?;
                }
            }
            Ok(())
        })
    });
    result?;
    let cells = io.down_f32(&logprob_cells)?;
    for (r, c) in out.iter_mut().enumerate() {
        let at = r * max_new as usize;
        c.logprobs = cells[at..at + c.completion_ids.len()].to_vec();
        let mut text = tokenizer.decode(&c.completion_ids, true)?;
        if c.finish_reason == FinishReason::Stop {
            if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
        }
        c.text = text;
    }
    Ok((out, stats))
}

/// The device state of the decoding slots, with the host's record of which request each holds.
struct SlotState<'a> {
    holder: &'a mut Vec<Option<usize>>,
    host_position: &'a mut Vec<i64>,
    cache: &'a mut KvCache,
    logits: &'a mut Tensor,
    /// Position of the token each slot feeds next.
    position: &'a mut Tensor,
    /// Cell (request * max_new + step) of the token each slot samples next; the sink if none.
    cell: &'a mut Tensor,
    /// 1 while the slot samples.
    active: &'a mut Tensor,
    /// 1 while the slot feeds tokens: sampling, or probing after its request finished.
    feeding: &'a mut Tensor,
}

impl SlotState<'_> {
    /// Fills the given free slots with the next waiting requests: prefill passes (one per
    /// length bucket, see [`crate::scoring::length_buckets`]), then their cache rows,
    /// positions, cells and first logits.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &mut self,
        free: &[usize],
        waiting: &mut std::ops::Range<usize>,
        reqs: &[GenRequest],
        model: &Llama,
        pad: i64,
        max_new: i64,
        io: &mut Transfers,
    ) -> Result<()> {
        let take: Vec<(usize, usize)> = free.iter().copied().zip(waiting.by_ref()).collect();
        if take.is_empty() {
            return Ok(());
        }
        // Requests with the same prompt (a unit's G answers) share one prefill row.
        let mut prompts: Vec<&[i64]> = Vec::new();
        let mut row_of: Vec<usize> = Vec::with_capacity(take.len());
        let mut seen: std::collections::HashMap<&[i64], usize> = std::collections::HashMap::new();
        for &(_, r) in &take {
            let p = reqs[r].prompt_ids.as_slice();
            let row = *seen.entry(p).or_insert_with(|| {
                prompts.push(p);
                prompts.len() - 1
            });
            row_of.push(row);
        }
        // Prompts of similar length prefill together, so that none is padded far past its own
        // length.
        let lengths: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        for bucket in crate::scoring::length_buckets(&lengths, 0) {
            let local: std::collections::HashMap<usize, usize> =
                bucket.iter().enumerate().map(|(j, &row)| (row, j)).collect();
            let part: Vec<&[i64]> = bucket.iter().map(|&row| prompts[row]).collect();
            let items: Vec<(usize, usize, usize)> = take
                .iter()
                .zip(&row_of)
                .filter_map(|(&(slot, r), row)| local.get(row).map(|&j| (slot, r, j)))
                .collect();
            self.prefill(&part, &items, model, pad, max_new, io)?;
        }
        Ok(())
    }

    /// One prefill pass over distinct `prompts`, entering each of `items` (slot, request,
    /// index into `prompts`) into its slot: cache rows, position, first cell and first logits.
    #[allow(clippy::too_many_arguments)]
    fn prefill(
        &mut self,
        prompts: &[&[i64]],
        items: &[(usize, usize, usize)],
        model: &Llama,
        pad: i64,
        max_new: i64,
        io: &mut Transfers,
    ) -> Result<()> {
        let dev = model.device();
        let m = items.len() as i64;
        let u = prompts.len() as i64;
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
        // Prompts that open alike (system prompt, judge rubric) compute that opening once and
        // copy its keys into every row; each row's remainder attends to them.
        let shortest = prompts.iter().map(|p| p.len()).min().unwrap_or(1);
        let shared = crate::model::common_prefix(prompts).min(shortest - 1);
        let shared = if u > 1 && shared >= crate::model::MIN_SHARED_PREFIX { shared as i64 } else { 0 };
        let width = t - shared;
        let mut flat = Vec::with_capacity((u * width) as usize);
        for p in prompts {
            flat.extend_from_slice(&p[shared as usize..]);
            flat.extend(std::iter::repeat_n(pad, t as usize - p.len()));
        }
        let ids = io.up(&flat).view([u, width]);
        let pos = Tensor::arange_start(shared, t, (Kind::Int64, dev)).unsqueeze(0).expand([u, width], true);
        let mut pre = model.new_cache(u, t);
        let hidden = if shared > 0 {
            let mut one = model.new_cache(1, shared);
            let head = io.up(&prompts[0][..shared as usize]).view([1, shared]);
            let head_pos = Tensor::arange(shared, (Kind::Int64, dev)).unsqueeze(0);
            let _ = model.forward_hidden(&head, &head_pos, &AttnMask::Causal, Some(&mut one))?;
            pre.broadcast_prefix_from(&one)?;
            let mask = crate::model::prefix_causal_mask(shared, width, dev);
            model.forward_hidden(&ids, &pos, &AttnMask::Explicit(mask), Some(&mut pre))?
        } else {
            model.forward_hidden(&ids, &pos, &AttnMask::Causal, Some(&mut pre))?
        };
        // Per new row: slot, index of its last prompt token in the flattened batch, prompt
        // length (= position of the first fed token), first cell.
        let mut meta: Vec<i64> = Vec::with_capacity(4 * items.len());
        for &(slot, r, row) in items {
            let len = prompts[row].len() as i64;
            let row = row as i64;
            self.cache.copy_row_from(slot as i64, &pre, row, len)?;
            self.holder[slot] = Some(r);
            self.host_position[slot] = len;
            meta.extend([slot as i64, row * width + len - 1 - shared, len, r as i64 * max_new]);
        }
        let meta = io.up(&meta).view([m, 4]);
        let (slot, last, len, first) = (meta.select(1, 0), meta.select(1, 1), meta.select(1, 2), meta.select(1, 3));
        let h = hidden.size()[2];
        let first_logits = model.decode_logits(&hidden.reshape([u * width, h]).index_select(0, &last))?;
        let _ = self.logits.index_copy_(0, &slot, &first_logits);
        let _ = self.position.index_copy_(0, &slot, &len);
        let _ = self.cell.index_copy_(0, &slot, &first);
        let _ = self.active.index_fill_(0, &slot, 1);
        let _ = self.feeding.index_fill_(0, &slot, 1);
        io.stats.prefills += 1;
        io.stats.prefill_rows += u as u64;
        io.stats.shared_prefix_tokens += shared as u64;
        Ok(())
    }
}
