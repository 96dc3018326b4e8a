//! `selfplay bench ...`: the benchmarks, a library the `selfplay` binary wires in.
//!
//! - `generate`, `score`: sampling and training-side scoring throughput (scripts/bench.sh sets
//!   them beside transformers);
//! - `judge`: the two self-reward modes on the same judgements;
//! - `rollout`: one actor's units per second at several units in flight;
//! - `batching`: continuous against static batching in the generator;
//! - `weights`, `coordinator`, `ingest`: the distributed runtime on loopback.
//!
//! Each prints JSON lines on stdout.
pub mod batching;
pub mod generate;
pub mod judge;
pub mod rollout;
pub mod runtime;

use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Batched sampling throughput on AlpacaEval prompts (EOS ignored: every row makes
    /// exactly --max-new-tokens tokens, so runs are comparable).
    Generate(generate::BenchGenerateArgs),
    /// Training-side scoring: forward + backward of completion log-probs.
    Score(generate::BenchGenerateArgs),
    /// Self-reward modes compared on the same judgements: parse rate, agreement, speed.
    Judge(judge::BenchJudgeArgs),
    /// One actor's units per second on a real model at K = 1, 2, 4, 8... units in flight
    /// (the game config's N and G; one JSON line per K).
    Rollout(rollout::RolloutArgs),
    /// Runtime: publish a model's weights to a coordinator once and fetch them with
    /// 1, 2, 4... concurrent light actors over loopback.
    Weights(runtime::WeightsArgs),
    /// Runtime: coordinator capacity with simulated light actors against a
    /// coordinator child process (RPCs/s and its CPU use).
    Coordinator(runtime::CoordinatorArgs),
    /// Runtime: learner ingest of synthetic rollout groups (validation + dedup).
    Ingest(runtime::IngestArgs),
    /// Continuous against static batching on one sampled workload of mixed lengths.
    Batching(batching::BatchingArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(a) => generate::bench_generate(a),
        BenchCommand::Score(a) => generate::bench_score(a),
        BenchCommand::Weights(a) => runtime::weights(a),
        BenchCommand::Coordinator(a) => runtime::coordinator(a),
        BenchCommand::Ingest(a) => runtime::ingest(a),
        BenchCommand::Judge(a) => judge::run(a),
        BenchCommand::Rollout(a) => rollout::run(a),
        BenchCommand::Batching(a) => batching::run(a),
    }
}

/// The default model: $SELFPLAY_MODEL, else the SmolLM2 import in the cache.
pub fn default_model() -> PathBuf {
    if let Ok(p) = std::env::var("SELFPLAY_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/selfplay/models/SmolLM2-135M-Instruct")
}

/// Device and dtype flags shared by every command that loads a model.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Hugging Face model directory, or a Hub id (org/name) fetched into the Hugging Face
    /// cache (default: the imported SmolLM2-135M-Instruct).
    #[arg(long, env = "SELFPLAY_MODEL")]
    pub model: Option<PathBuf>,
    /// Revision (branch, tag or commit) of a Hub id given to --model.
    #[arg(long, env = "SELFPLAY_REVISION", default_value = selfplay_hub::DEFAULT_REVISION)]
    pub revision: String,
    /// auto (cuda:0 when available, else cpu), cpu, cuda or cuda:N.
    #[arg(long, env = "SELFPLAY_DEVICE", default_value = "auto")]
    pub device: String,
    /// auto (bf16 on CUDA, f32 on the CPU), f32, bf16 or f16.
    #[arg(long, env = "SELFPLAY_DTYPE", default_value = "auto")]
    pub dtype: String,
}

impl ModelArgs {
    /// The model's local directory: --model itself, or its Hub snapshot at --revision.
    pub fn dir(&self) -> Result<PathBuf> {
        let spec = self.model.clone().unwrap_or_else(default_model);
        Ok(selfplay_hub::resolve(&spec, &self.revision)?)
    }

    pub fn load(&self) -> Result<selfplay_policy::Policy> {
        let dir = self.dir()?;
        let device = selfplay_policy::parse_device(&self.device)?;
        let kind = selfplay_policy::parse_kind_on(&self.dtype, device)?;
        let t0 = std::time::Instant::now();
        let policy = selfplay_policy::Policy::load(&dir, device, kind)?;
        tracing::info!(
            model = %dir.display(),
            ?device,
            ?kind,
            params = policy.model.num_parameters(),
            cuda_available = tch::Cuda::is_available(),
            secs = t0.elapsed().as_secs_f64(),
            "model loaded"
        );
        Ok(policy)
    }
}
