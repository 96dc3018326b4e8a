//! `selfplay`: argument parsing and wiring only; the work lives in the library crates.
mod device_check;
mod eval_cmd;
mod generate_cmd;
mod progress;
mod roles;
mod telemetry;

use anyhow::Result;
use clap::{Parser, Subcommand};
pub use selfplay_bench::{default_model, ModelArgs};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "selfplay", version, about = "Language Self-Play: train LLMs by self-play, without data")]
struct Cli {
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, global = true, env = "SELFPLAY_LOG", default_value = "info")]
    log: String,
    /// Log format: text or json.
    #[arg(long, global = true, env = "SELFPLAY_LOG_FORMAT", default_value = "text")]
    log_format: String,
    /// Intra-op CPU threads for libtorch (0 = libtorch's default).
    #[arg(long, global = true, env = "SELFPLAY_THREADS", default_value_t = 0)]
    threads: i32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train by self-play on one machine: coordinator, learner and actors in one process.
    Train(roles::TrainArgs),
    /// Run the coordinator (membership, work units, weight store).
    Coordinator(roles::CoordinatorArgs),
    /// Run the learner (takes rollout groups, steps the policy, publishes weights).
    Learner(roles::LearnerArgs),
    /// Run one actor (plays work units with the current weights).
    Actor(roles::ActorArgs),
    /// Serve a reward model over gRPC.
    RewardServer(roles::RewardServerArgs),
    /// Show the coordinator's actors, units and throughput.
    Status(roles::StatusArgs),
    /// Chat with a model: stream its answer to one prompt.
    Generate(generate_cmd::GenerateArgs),
    /// Win rate of a model against a baseline (AlpacaEval-style), judged by a reward model or a judge LM.
    Eval(eval_cmd::EvalArgs),
    /// Convert a GGUF llama model into a Hugging Face directory (safetensors, config, tokenizer).
    ImportGguf {
        /// The .gguf file.
        file: PathBuf,
        /// The directory to write.
        out_dir: PathBuf,
    },
    /// Plot reward, self-reward and KL curves of runs from their steps.jsonl.
    PlotCurves {
        /// LABEL=RUN_DIR (its steps.jsonl), repeatable.
        #[arg(long = "run", required = true)]
        runs: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(selfplay_bench::BenchCommand),
    /// The checks scripts/gpu_check.sh runs on an accelerator (JSON out).
    #[command(subcommand)]
    DeviceCheck(device_check::DeviceCheck),
}

fn init_logging(filter: &str, format: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("unknown --log-format {other:?} (text or json)"),
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log, &cli.log_format) {
        eprintln!("error: {e:#}");
        return std::process::ExitCode::from(2);
    }
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads);
    }
    let result = match cli.command {
        Command::Train(args) => roles::train(args),
        Command::Coordinator(args) => roles::coordinator(args),
        Command::Learner(args) => roles::learner(args),
        Command::Actor(args) => roles::actor(args),
        Command::RewardServer(args) => roles::reward_server(args),
        Command::Status(args) => roles::status(args),
        Command::Generate(args) => generate_cmd::run(args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::ImportGguf { file, out_dir } => import_gguf(&file, &out_dir),
        Command::Bench(cmd) => selfplay_bench::run(cmd),
        Command::DeviceCheck(cmd) => device_check::run(cmd),
        Command::PlotCurves { runs, out } => plot_curves(&runs, &out),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn import_gguf(file: &std::path::Path, out_dir: &std::path::Path) -> Result<()> {
    let summary = selfplay_policy::gguf::import_gguf(file, out_dir)?;
    tracing::info!(?summary, out = %out_dir.display(), "imported");
    Ok(())
}

fn plot_curves(runs: &[String], out: &std::path::Path) -> Result<()> {
    let mut data = vec![];
    for r in runs {
        let (label, dir) = r.split_once('=').ok_or_else(|| anyhow::anyhow!("--run {r:?}: expected LABEL=RUN_DIR"))?;
        data.push((label.to_string(), selfplay_eval::curves::read_steps(&PathBuf::from(dir).join("steps.jsonl"))?));
    }
    selfplay_eval::curves::training_curves(&data, out)?;
    Ok(())
}
