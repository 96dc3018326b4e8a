//! Training-side scoring: per-token log-probs of given (prompt, completion) sequences in one
//! batch, differentiable, masked to the completion tokens.
use crate::error::{PolicyError, Result};
use crate::model::{Llama, PaddedBatch};
use tch::{Kind, Tensor};

/// Completion log-probs of a batch, right-padded to the longest completion.
pub struct TokenLogprobs {
    /// [B, C] f32: log pi(c_t | prompt, c_<t); 0 where `mask` is false.
    pub logprobs: Tensor,
    /// [B, C] bool: true on real completion tokens.
    pub mask: Tensor,
    /// [B, C] f32 entropy of the next-token distribution at each completion position.
    pub entropy: Option<Tensor>,
}

/// Log-probs of every completion token. Gradients flow when the model's parameters require
/// them. Only completion positions go through the output head, which saves most of the
/// vocabulary-sized work on long prompts.
pub fn completion_logprobs(model: &Llama, pairs: &[(Vec<i64>, Vec<i64>)], with_entropy: bool) -> Result<TokenLogprobs> {
    if pairs.is_empty() {
        return Err(PolicyError::InvalidInput("no sequences to score".into()));
    }
    for (i, (p, c)) in pairs.iter().enumerate() {
        if p.is_empty() || c.is_empty() {
            return Err(PolicyError::InvalidInput(format!(
                "sequence {i}: prompt and completion must both be non-empty"
            )));
        }
    }
    let dev = model.device();
    let seqs: Vec<Vec<i64>> = pairs.iter().map(|(p, c)| [p.as_slice(), c.as_slice()].concat()).collect();
    let batch = PaddedBatch::right_padded(&seqs, 0, dev)?;
    model.check_ids(&batch.ids)?;
    let hidden = model.forward_hidden(&batch.ids, &batch.positions, &batch.mask, None)?;
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
    Ok(TokenLogprobs { logprobs, mask, entropy })
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
