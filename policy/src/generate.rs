//! Batched sampling with a KV cache: unequal prompt lengths in one batch (left padding),
//! greedy / temperature / top-k / top-p, seeded, stop on EOS ids and stop strings. Returns the
//! log-prob of every sampled token under the unmodified model distribution (temperature 1, no
//! filtering): the behaviour log-probs the learner uses for importance weights, equal to the
//! training-side scoring of the same sequence.
use crate::error::{PolicyError, Result};
use crate::model::{attention_mask, Llama};
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
}

impl Default for SamplingConfig {
    fn default() -> Self {
        SamplingConfig { temperature: 1.0, top_p: 1.0, top_k: 0, max_new_tokens: 256, seed: 0, stop: vec![] }
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

/// Generates one completion per prompt (token ids, already chat-rendered), all in one batch.
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
) -> Result<Vec<Completion>> {
    generate_with(model, tokenizer, prompts, cfg, eos_ids, |_, _| {})
}

/// As [`generate`], calling `on_token(row, id)` for every sampled token (for streaming).
pub fn generate_with(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompts: &[Vec<i64>],
    cfg: &SamplingConfig,
    eos_ids: &[i64],
    mut on_token: impl FnMut(usize, i64),
) -> Result<Vec<Completion>> {
    cfg.validate()?;
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(PolicyError::InvalidInput("generate needs non-empty prompts".into()));
    }
    let dev = model.device();
    let b = prompts.len() as i64;
    let plen = prompts.iter().map(|p| p.len()).max().unwrap_or(0) as i64;
    let cap = plen + cfg.max_new_tokens;
    let max_pos = model.config().max_position_embeddings;
    if cap > max_pos && model.config().rope.scaling.is_none() && max_pos > 0 {
        tracing::debug!(cap, max_pos, "generating past max_position_embeddings");
    }
    let pad = eos_ids.first().copied().unwrap_or(0);
    // Left padding: every row's last prompt token sits at column plen - 1.
    let mut flat = Vec::with_capacity((b * plen) as usize);
    let mut valid = Vec::with_capacity((b * cap) as usize);
    let mut pos = Vec::with_capacity((b * plen) as usize);
    for p in prompts {
        let padn = plen as usize - p.len();
        flat.extend(std::iter::repeat_n(pad, padn));
        flat.extend_from_slice(p);
        valid.extend(std::iter::repeat_n(false, padn));
        valid.extend(std::iter::repeat_n(true, p.len() + cfg.max_new_tokens as usize));
        pos.extend(std::iter::repeat_n(0i64, padn));
        pos.extend(0..p.len() as i64);
    }
    let ids = Tensor::from_slice(&flat).view([b, plen]).to_device(dev);
    model.check_ids(&ids)?;
    let key_valid = Tensor::from_slice(&valid).view([b, cap]).to_device(dev);
    let positions = Tensor::from_slice(&pos).view([b, plen]).to_device(dev);
    let mut next_pos: Vec<i64> = prompts.iter().map(|p| p.len() as i64).collect();

    let mut rng = SplitMix64::new(cfg.seed);
    let mut out: Vec<Completion> = prompts
        .iter()
        .map(|p| Completion {
            prompt_ids: p.clone(),
            completion_ids: vec![],
            text: String::new(),
            logprobs: vec![],
            finish_reason: FinishReason::Length,
        })
        .collect();
    let mut done = vec![false; prompts.len()];

    tch::no_grad(|| -> Result<()> {
        let mut cache = model.new_cache(b, cap);
        let mask = attention_mask(&key_valid.narrow(1, 0, plen), 0);
        let hidden = model.forward_hidden(&ids, &positions, &mask, Some(&mut cache))?;
        let mut logits = model.decode_logits(&hidden.narrow(1, plen - 1, 1).squeeze_dim(1))?;
        for step in 0..cfg.max_new_tokens {
            let logp = logits.log_softmax(-1, Kind::Float);
            let next = if cfg.temperature == 0.0 {
                logits.argmax(-1, false)
            } else {
                let probs = sampling_probs(&logits, cfg);
                let u: Vec<f32> = (0..b).map(|_| rng.next_f64() as f32).collect();
                let u = Tensor::from_slice(&u).to_device(dev).unsqueeze(1);
                let cum = probs.cumsum(-1, Kind::Float);
                let total = cum.narrow(1, cum.size()[1] - 1, 1);
                // Inverse-CDF sampling; clamp guards against rounding past the last token.
                (u * &total)
                    .searchsorted(&cum, false, true, "right", None::<Tensor>)
                    .squeeze_dim(1)
                    .clamp_max(cum.size()[1] - 1)
            };
            let lp = logp.gather(1, &next.unsqueeze(1), false).squeeze_dim(1);
            let next_v: Vec<i64> = Vec::<i64>::try_from(next.to_device(tch::Device::Cpu))?;
            let lp_v: Vec<f32> = Vec::<f32>::try_from(lp.to_device(tch::Device::Cpu))?;
            for (r, c) in out.iter_mut().enumerate() {
                if done[r] {
                    continue;
                }
                let id = next_v[r];
                c.completion_ids.push(id);
                c.logprobs.push(lp_v[r]);
                on_token(r, id);
                if eos_ids.contains(&id) {
                    done[r] = true;
                    c.finish_reason = FinishReason::Eos;
                } else if !cfg.stop.is_empty() {
                    let text = tokenizer.decode(&c.completion_ids, true)?;
                    if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
                        done[r] = true;
                        c.finish_reason = FinishReason::Stop;
                    }
                }
            }
            if done.iter().all(|&d| d) || step + 1 == cfg.max_new_tokens {
                break;
            }
            // Feed the sampled tokens (finished rows feed EOS; their outputs are ignored).
            let feed: Vec<i64> = next_v.iter().enumerate().map(|(r, &id)| if done[r] { pad } else { id }).collect();
            let feed = Tensor::from_slice(&feed).view([b, 1]).to_device(dev);
            let p = Tensor::from_slice(&next_pos).view([b, 1]).to_device(dev);
            for np in next_pos.iter_mut() {
                *np += 1;
            }
            let past = cache.len();
            let mask = attention_mask(&key_valid.narrow(1, 0, past + 1), past);
            let hidden = model.forward_hidden(&feed, &p, &mask, Some(&mut cache))?;
            logits = model.decode_logits(&hidden.squeeze_dim(1))?;
        }
        Ok(())
    })?;

    for c in out.iter_mut() {
        let mut text = tokenizer.decode(&c.completion_ids, true)?;
        if c.finish_reason == FinishReason::Stop {
            if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
        }
        c.text = text;
    }
    Ok(out)
}
