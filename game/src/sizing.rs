//! How much memory each role needs, from the model's shape: the formulas behind the sizing
//! table in docs/operations.md. `scripts/learner_memory.sh` checks them against the peak
//! resident memory of real learner steps on the CPU.
//!
//! With P parameters, s bytes per element of the model's dtype (4 for f32, 2 for bf16), H the
//! hidden size, I the MLP size, q = heads x head_dim, kv = kv_heads x head_dim, L layers and V
//! the vocabulary:
//! - learner, resident: weights s P, gradients s P, AdamW moments 8 P, and f32 master weights
//!   4 P when s < 4 (16 bytes x P in f32 and in bf16 alike);
//! - learner, during the update: one f32 copy of the largest bf16 gradient (none in f32:
//!   the f32 gradient is AdamW's scratch);
//! - learner, activations kept for the backward pass, per token of a micro-batch and layer:
//!   RMSNorm inputs in f32 (2 x 4 H), norm outputs and the projections' inputs (4 s H),
//!   attention: rotary inputs 2 s (q + kv), attention inputs s (q + 2 kv), its output (which is
//!   also the output projection's input) s q, log-sum-exp 4 x heads; MLP: gate, up,
//!   silu(gate) and their product 4 s I. Together 8 H + 4 s H + s (4 q + 4 kv) + 4 heads +
//!   4 s I, plus the final norm (4 H + 2 s H) once per token;
//! - learner, output head: per completion position of a chunk, three f32 vectors of V (the
//!   log-softmax and, in the backward pass, its incoming and outgoing gradients; or, in the
//!   forward pass, log-softmax, its exp and their product for the entropy), plus one in the
//!   model's dtype when that is not f32 (the logits' gradient): V (12 + s) bytes when s < 4,
//!   12 V in f32, for `optim.logprob_chunk_tokens` positions at once;
//! - learner with gradient checkpointing (`optim.gradient_checkpointing`): instead of every
//!   layer's activations, each block's input and the last block's output ((L + 1) s H per token)
//!   plus one layer's activations while that block is recomputed in the backward pass;
//! - actor: policy and reference s P each, and the KV cache 2 L kv s bytes per token of
//!   (batch x capacity).
use selfplay_policy::ModelConfig;
use serde::Serialize;

/// The shape numbers the formulas use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shape {
    pub name: String,
    pub vocab: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub tied: bool,
}

impl Shape {
    pub fn from_config(name: &str, c: &ModelConfig) -> Self {
        Shape {
            name: name.to_string(),
            vocab: c.vocab_size as u64,
            hidden: c.hidden_size as u64,
            intermediate: c.intermediate_size as u64,
            layers: c.num_hidden_layers as u64,
            heads: c.num_attention_heads as u64,
            kv_heads: c.num_key_value_heads as u64,
            head_dim: c.head_dim as u64,
            tied: c.tie_word_embeddings,
        }
    }

    #[allow(clippy::too_many_arguments)]
    const fn new(
        name: &'static str,
        vocab: u64,
        hidden: u64,
        intermediate: u64,
        layers: u64,
        heads: u64,
        kv_heads: u64,
        head_dim: u64,
    ) -> (&'static str, [u64; 7]) {
        (name, [vocab, hidden, intermediate, layers, heads, kv_heads, head_dim])
    }

    /// The models the sizing table covers (their public config.json; all tie embeddings).
    pub fn known() -> Vec<Shape> {
        [
            Self::new("SmolLM2-135M", 49152, 576, 1536, 30, 9, 3, 64),
            Self::new("Llama-3.2-1B", 128256, 2048, 8192, 16, 32, 8, 64),
            Self::new("Llama-3.2-3B", 128256, 3072, 8192, 28, 24, 8, 128),
        ]
        .into_iter()
        .map(|(name, [vocab, hidden, intermediate, layers, heads, kv_heads, head_dim])| Shape {
            name: name.into(),
            vocab,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            tied: true,
        })
        .collect()
    }

    /// Larger shapes for the learner-ranks plan (untied output heads; q/k/v biases, where a
    /// family has them, are left out: under 0.01% of the parameters).
    pub fn large() -> Vec<Shape> {
        let shape = |name: &str, vocab, hidden, intermediate, layers, heads, kv_heads, head_dim| Shape {
            name: name.into(),
            vocab,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            tied: false,
        };
        vec![
            shape("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 128),
            shape("Qwen2.5-14B", 152064, 5120, 13824, 48, 40, 8, 128),
        ]
    }

    fn q(&self) -> u64 {
        self.heads * self.head_dim
    }
    fn kv(&self) -> u64 {
        self.kv_heads * self.head_dim
    }

    /// Parameters: embeddings (and an untied head), per layer q/k/v/o, gate/up/down and two
    /// norms, and the final norm.
    pub fn params(&self) -> u64 {
        let (h, i) = (self.hidden, self.intermediate);
        let layer = h * self.q() * 2 + h * self.kv() * 2 + 3 * h * i + 2 * h;
        let head = if self.tied { 0 } else { self.vocab * h };
        self.vocab * h + head + self.layers * layer + h
    }

    /// The largest single parameter (the embedding matrix for these models).
    pub fn largest_param(&self) -> u64 {
        (self.vocab * self.hidden).max(self.hidden * self.intermediate).max(self.hidden * self.q())
    }
}

/// The learner's memory in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Learner {
    pub params: u64,
    pub weights: u64,
    pub grads: u64,
    pub master: u64,
    pub moments: u64,
    /// Weights, gradients, masters and moments: what stays resident between steps.
    pub resident: u64,
    /// AdamW's one temporary during the update (the largest bf16 gradient widened to f32).
    pub update_scratch: u64,
    /// Activations kept for the backward pass, per token of a micro-batch.
    pub activations_per_token: u64,
    /// The output head's peak for one chunk of `chunk_positions` completion positions.
    pub logprob_chunk: u64,
    pub chunk_positions: u64,
}

/// The learner's memory for a model of `shape` in a dtype of `s` bytes, with the output head in
/// chunks of `chunk_positions` completion positions.
pub fn learner(shape: &Shape, s: u64, chunk_positions: u64) -> Learner {
    let p = shape.params();
    let (h, i, q, kv, nh) = (shape.hidden, shape.intermediate, shape.q(), shape.kv(), shape.heads);
    let per_layer = 8 * h + 4 * s * h + s * (4 * q + 4 * kv) + 4 * nh + 4 * s * i;
    let final_norm = 4 * h + 2 * s * h;
    let (master, head_elem) = if s < 4 { (4 * p, 12 + s) } else { (0, 12) };
    let weights = s * p;
    Learner {
        params: p,
        weights,
        grads: weights,
        master,
        moments: 8 * p,
        resident: 2 * weights + master + 8 * p,
        update_scratch: if s < 4 { 4 * shape.largest_param() } else { 0 },
        activations_per_token: shape.layers * per_layer + final_norm,
        logprob_chunk: chunk_positions * shape.vocab * head_elem,
        chunk_positions,
    }
}

impl Learner {
    /// The same learner with gradient checkpointing: activations kept per token are the
    /// blocks' inputs and the last output, plus one layer's while it is recomputed.
    pub fn with_checkpointing(self, shape: &Shape, s: u64) -> Learner {
        let layers = shape.layers.max(1);
        let final_norm = 4 * shape.hidden + 2 * s * shape.hidden;
        let per_layer = (self.activations_per_token - final_norm) / layers;
        Learner { activations_per_token: (layers + 1) * s * shape.hidden + per_layer + final_norm, ..self }
    }

    /// What a step adds to the resident memory at its peak, with `tokens` padded tokens in its
    /// largest micro-batch: the activations and one head chunk during the backward pass, or
    /// AdamW's scratch during the update (when the activations are gone).
    pub fn step_peak(&self, tokens: u64) -> u64 {
        (self.activations_per_token * tokens + self.logprob_chunk).max(self.update_scratch)
    }

    /// The same learner as one of `world` data-parallel ranks with sharded optimizer state
    /// (crate::data_parallel): each rank keeps its full weights and gradients but 1/W of the f32
    /// masters and moments (rounded up), and its update holds its f32 gradient shard and two
    /// f32 buckets of `bucket` elements (the reduce-scatter input and the all-gather output)
    /// instead of one widened gradient.
    pub fn sharded(self, world: u64, bucket: u64) -> Learner {
        let world = world.max(1);
        let p = self.params;
        let shard = p.div_ceil(world);
        let master = if self.master > 0 { 4 * shard } else { 0 };
        let moments = 8 * shard;
        Learner {
            master,
            moments,
            resident: self.weights + self.grads + master + moments,
            update_scratch: 4 * shard + 2 * 4 * bucket.min(p),
            ..self
        }
    }

    /// The peak of a step whose largest micro-batch has `tokens` padded tokens.
    pub fn peak(&self, tokens: u64) -> u64 {
        self.resident + self.step_peak(tokens)
    }
}

/// An actor's memory in bytes: the policy and the reference model in a dtype of `s` bytes, and
/// the KV cache per sequence-token of capacity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Actor {
    pub policy: u64,
    pub reference: u64,
    pub kv_cache_per_token: u64,
}

pub fn actor(shape: &Shape, s: u64) -> Actor {
    let w = s * shape.params();
    Actor { policy: w, reference: w, kv_cache_per_token: 2 * shape.layers * shape.kv() * s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        let known = Shape::known();
        // 134,515,008 (SmolLM2-135M), 1,235,814,400 (Llama-3.2-1B), 3,212,749,824 (3B): the
        // counts transformers reports for these configs.
        let want = [134_515_008u64, 1_235_814_400, 3_212_749_824];
        for (s, w) in known.iter().zip(want) {
            assert_eq!(s.params(), w, "{}", s.name);
        }
    }

    #[test]
    fn the_3b_learner_fits_80_gb_with_the_documented_settings() {
        let s = &Shape::known()[2];
        let l = learner(s, 2, 1024);
        // 16 bytes per parameter resident, as in f32.
        assert_eq!(l.resident, 16 * l.params);
        assert_eq!(learner(s, 4, 1024).resident, 16 * l.params);
        let gb = |b: u64| b as f64 / 1e9;
        let peak = gb(l.peak(4096));
        assert!(peak < 76.0, "{peak} GB");
        // Without the token bound a step of 8 x 4 x 1,024-token sequences would not fit.
        assert!(gb(l.peak(8 * 1024 * 4 / 2)) > 80.0);
    }

    /// The per-rank plan of docs/operations.md ("Learner ranks: memory per rank"), computed here
    /// so that the table cannot drift from the formulas.
    fn ranks_table() -> String {
        let gb = |b: u64| format!("{:.1}", b as f64 / 1e9);
        let mut out = String::from(
            "| model | W | resident per rank (GB) | peak, 4,096-token micro-batch (GB) | peak with gradient checkpointing (GB) |\n|---|---|---|---|---|\n",
        );
        let mut shapes = vec![Shape::known()[2].clone()];
        shapes.extend(Shape::large());
        for shape in &shapes {
            for w in [1u64, 2, 4, 8] {
                let plain = learner(shape, 2, 1024);
                let ckpt = plain.clone().with_checkpointing(shape, 2);
                let (plain, ckpt) =
                    if w == 1 { (plain, ckpt) } else { (plain.sharded(w, 1 << 25), ckpt.sharded(w, 1 << 25)) };
                out += &format!(
                    "| {} | {w} | {} | {} | {} |\n",
                    shape.name,
                    gb(plain.resident),
                    gb(plain.peak(4096)),
                    gb(ckpt.peak(4096))
                );
            }
        }
        out
    }

    #[test]
    fn the_ranks_memory_table_in_the_docs_is_the_formulas() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
        let table = ranks_table();
        assert!(doc.contains(&table), "docs/operations.md lacks the current table:\n{table}");
    }

    #[test]
    fn eight_b_trains_on_eight_80_gb_gpus_and_shards_cut_the_optimizer_by_w() {
        let b8 = &Shape::large()[0];
        assert_eq!(b8.params(), 8_030_261_248, "Llama-3.1-8B's published count");
        let one = learner(b8, 2, 1024);
        assert!(one.resident > 80_000_000_000, "8B does not fit one 80 GB GPU: {}", one.resident);
        let eight = one.clone().with_checkpointing(b8, 2).sharded(8, 1 << 25);
        assert!(eight.peak(4096) < 76_000_000_000, "{}", eight.peak(4096));
        assert_eq!(eight.moments, 8 * b8.params().div_ceil(8));
        assert_eq!(one.clone().sharded(1, 1 << 25).resident, one.resident);
    }

    #[test]
    fn checkpointing_keeps_one_layer_of_activations_and_the_block_inputs() {
        let s = &Shape::known()[2];
        let plain = learner(s, 2, 1024);
        let ckpt = plain.clone().with_checkpointing(s, 2);
        let per_layer =
            8 * s.hidden + 4 * 2 * s.hidden + 2 * (4 * s.q() + 4 * s.kv()) + 4 * s.heads + 4 * 2 * s.intermediate;
        let final_norm = 4 * s.hidden + 2 * 2 * s.hidden;
        assert_eq!(plain.activations_per_token, s.layers * per_layer + final_norm);
        assert_eq!(ckpt.activations_per_token, (s.layers + 1) * 2 * s.hidden + per_layer + final_norm);
        assert_eq!(ckpt.resident, plain.resident);
        // The 3B learner then fits 16,384-token micro-batches in 80 GB.
        assert!(ckpt.peak(16384) < 76e9 as u64 && plain.peak(16384) > 80e9 as u64);
    }
}
