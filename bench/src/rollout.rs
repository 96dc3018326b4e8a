//! `selfplay bench rollout`: how many units per second one actor plays at K = 1, 2, 4, 8...
//! units in flight, on a real model with a real game config (the paper's defaults unless
//! `--config` / `--set` say otherwise: N = 8, G = 4, LSP with the self-reward judge).
//!
//! Every K plays the same units (same seeds, so the same work up to sampling): K = 1 plays
//! them one after another as an actor did before units were batched, K = 8 plays them as one
//! batch. Weights never change, so nothing but batching differs between the lines. One JSON
//! line per K, with the machine and its load (the figures depend on what else runs).
use crate::ModelArgs;
use anyhow::{ensure, Result};
use selfplay_game::driver::units_for_step;
use selfplay_game::play::PlayStats;
use selfplay_game::{Config, Player, Unit};
use selfplay_policy::SamplingConfig;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct RolloutArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Run config whose game, sampling and reward sections are played (default: the built-in
    /// defaults, N = 8 and G = 4). Its model section is ignored: --model, --device and --dtype
    /// say what plays.
    #[arg(long, env = "SELFPLAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. --set game.group_size=8 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// The values of K to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub units_in_flight: Vec<usize>,
    /// Units played at each K (default: the config's N, one step). Rounded up to a multiple
    /// of K, so that every batch is full.
    #[arg(long)]
    pub units: Option<usize>,
}

pub fn run(a: RolloutArgs) -> Result<()> {
    ensure!(
        !a.units_in_flight.is_empty() && a.units_in_flight.iter().all(|&k| k >= 1),
        "--units-in-flight: every K must be >= 1"
    );
    let cfg = Config::load(a.config.as_deref(), &a.set)?;
    ensure!(
        cfg.reward.kind != selfplay_game::config::RewardKind::Remote,
        "reward.kind = remote measures the reward server, not the actor: choose model, judge or none"
    );
    // GRPO plays data prompts; the other modes make their own queries.
    let prompts = if cfg.game.mode.has_challenger() {
        vec![]
    } else {
        selfplay_game::data::load_prompts(&cfg.game.prompts_file)?
    };
    let policy = a.model.load()?;
    let (device, kind) = (policy.model.device(), policy.model.kind());
    warm_up(&policy)?;
    let mut player = Player::new(policy, None, cfg.clone())?;
    let n = a.units.unwrap_or(cfg.game.queries_per_step).max(1);

    for &k in &a.units_in_flight {
        let count = n.div_ceil(k) * k;
        let units = units_to_play(&cfg, count, &prompts);
        let t0 = Instant::now();
        let mut total = PlayStats::default();
        let mut answers = 0usize;
        for batch in units.chunks(k) {
            let (groups, stats) = player.play_batch(batch, 0, "bench")?;
            answers += groups.iter().map(|g| g.answers.len()).sum::<usize>();
            add(&mut total, &stats);
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({
                "bench": "rollout", "units_in_flight": k, "units": count, "answers": answers, "secs": secs,
                "units_per_s": count as f64 / secs,
                "generated_tokens": total.generated_tokens,
                "tokens_per_s": total.generated_tokens as f64 / secs,
                "seconds": {
                    "generation": total.generation_seconds, "reward": total.reward_seconds,
                    "judge": total.judge_seconds, "reference": total.reference_seconds,
                },
                "mode": cfg.game.mode, "queries_per_step": cfg.game.queries_per_step,
                "group_size": cfg.game.group_size,
                "device": format!("{device:?}"), "dtype": format!("{kind:?}"),
                "threads": tch::get_num_threads(), "machine": crate::runtime::machine(),
            })
        );
    }
    Ok(())
}

/// `count` units in the order the learner would open them: step 0's N units, then step 1's...
fn units_to_play(cfg: &Config, count: usize, prompts: &[String]) -> Vec<Unit> {
    (0u64..).flat_map(|step| units_for_step(cfg, step, prompts)).take(count).collect()
}

fn add(total: &mut PlayStats, s: &PlayStats) {
    total.generated_tokens += s.generated_tokens;
    total.generation_seconds += s.generation_seconds;
    total.reward_seconds += s.reward_seconds;
    total.judge_seconds += s.judge_seconds;
    total.reference_seconds += s.reference_seconds;
    total.parse_failures += s.parse_failures;
}

/// A few tokens first, so that the first K does not pay libtorch's one-time start-up costs.
fn warm_up(policy: &selfplay_policy::Policy) -> Result<()> {
    let ids = policy.user_prompt("Hello")?;
    policy.generate(&[ids.clone(), ids], &SamplingConfig::greedy(4))?;
    Ok(())
}
