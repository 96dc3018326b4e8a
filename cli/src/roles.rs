//! The distributed roles as subcommands: `train` (all roles in one process on loopback, the
//! embedded default), `coordinator`, `learner`, `actor`, `reward-server` and `status`.
use crate::progress::Progress;
use crate::{default_model, telemetry};
use anyhow::{anyhow, bail, Context, Result};
use selfplay_game::{Config, Player};
use selfplay_proto::auth::Credential;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The run's configuration: a TOML file plus `--set` overrides.
#[derive(clap::Args, Debug, Clone)]
pub struct ConfigArgs {
    /// TOML run configuration (every knob; see configs/).
    #[arg(long, env = "SELFPLAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Override one config key, e.g. --set game.group_size=4 (repeatable; no environment
    /// variable: put lasting settings in the --config file).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// The embedded default run (LSP on SmolLM2-135M-Instruct, sized for a CPU).
pub const EMBEDDED_CONFIG: &str = include_str!("../../configs/smollm2-cpu.toml");

impl ConfigArgs {
    /// The file given, else the embedded default; then the overrides.
    pub fn load(&self) -> Result<Config> {
        let mut cfg = match &self.config {
            Some(p) => Config::load(Some(p), &self.set)?,
            None => Config::from_toml_str(EMBEDDED_CONFIG, &self.set)?,
        };
        if cfg.model.path.as_os_str().is_empty() {
            cfg.model.path = default_model();
        }
        resolve_models(&mut cfg)?;
        Ok(cfg)
    }
}

/// Every model the run loads, made a local directory: a Hub id (`org/name`) becomes its
/// snapshot in the Hugging Face cache (model.path at model.revision, the others at main), so
/// the rest of the program (and the config.toml the run writes) sees only directories.
fn resolve_models(cfg: &mut Config) -> Result<()> {
    use selfplay_game::config::RewardKind;
    let hub = selfplay_hub::Hub::from_env();
    let resolve = |key: &str, p: &Path, revision: &str| -> Result<PathBuf> {
        let dir = hub.resolve(p, revision).with_context(|| key.to_string())?;
        if dir != p {
            tracing::info!(key, id = %p.display(), revision, dir = %dir.display(), "model from the Hugging Face Hub");
        }
        Ok(dir)
    };
    cfg.model.path = resolve("model.path", &cfg.model.path, &cfg.model.revision)?;
    if !cfg.model.reference_path.as_os_str().is_empty() {
        cfg.model.reference_path = resolve("model.reference_path", &cfg.model.reference_path, "")?;
    }
    let loads_a_model = |k: &RewardKind| matches!(k, RewardKind::Model | RewardKind::Judge);
    if loads_a_model(&cfg.reward.kind) && !cfg.reward.path.as_os_str().is_empty() {
        cfg.reward.path = resolve("reward.path", &cfg.reward.path, "")?;
    }
    for (i, src) in cfg.reward.sources.iter_mut().enumerate() {
        if loads_a_model(&src.kind) && !src.path.as_os_str().is_empty() {
            src.path = resolve(&format!("reward.sources[{i}].path"), &src.path, "")?;
        }
    }
    Ok(())
}

/// This process's own credential: the learner's for the learner, an actor's for an actor,
/// an operator's for `status`.
#[derive(clap::Args, Debug, Clone)]
pub struct AuthArgs {
    /// File holding this role's bearer token, one a line, the first presented; read again
    /// when it changes (else $SELFPLAY_TOKEN).
    #[arg(long, env = "SELFPLAY_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl AuthArgs {
    pub fn credential(&self) -> Result<Credential> {
        Ok(Credential::load(self.token_file.as_deref())?)
    }
}

/// The credential files of the roles a server accepts: one token a line, each valid; read
/// again when they change, so credentials rotate without a restart.
fn accept(path: &Option<PathBuf>) -> Result<Option<Credential>> {
    Ok(path.as_ref().map(Credential::from_file).transpose()?)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address of /metrics and /health. Default: port 9464 for train and the coordinator,
    /// 9465 for the learner, 9466 for an actor, 9467 for the reward server (on 127.0.0.1), so
    /// that roles sharing a host do not collide.
    #[arg(long, env = "SELFPLAY_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Liveness (`/health/live`) fails when a busy main loop (training step, unit, score
    /// request) has made no progress for this many seconds.
    #[arg(long, env = "SELFPLAY_STALL_AFTER_S", default_value_t = 600)]
    pub stall_after_s: u64,
    /// Write {"grpc": ..., "metrics": ...} here once serving (for scripts and tests).
    #[arg(long, env = "SELFPLAY_READY_FILE")]
    pub ready_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The metrics address, or 127.0.0.1 with the role's default port. Also registers what
    /// must be ready before the readiness probe passes.
    fn metrics(&self, default_port: u16) -> String {
        selfplay_proto::health::health().set_stall_after(Duration::from_secs(self.stall_after_s.max(1)));
        self.metrics_addr.clone().unwrap_or_else(|| format!("127.0.0.1:{default_port}"))
    }
}

fn write_ready(path: &Option<PathBuf>, value: serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, value.to_string())?;
        std::fs::rename(&tmp, p)?;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM; from then on the readiness probe fails.
/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this is
/// called, not when it is first polled, so a role that calls it before writing its ready file
/// never dies of a signal sent after that. Must be called inside the Tokio runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (mut int, mut term) = {
        use tokio::signal::unix::{signal, SignalKind};
        (signal(SignalKind::interrupt()).ok(), signal(SignalKind::terminate()).ok())
    };
    async move {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! { _ = next(&mut int) => {}, _ = next(&mut term) => {} }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stop requested");
        selfplay_proto::health::health().stopping();
        // A step in flight can take a minute on a CPU: say why nothing happens yet, and let a
        // second Ctrl-C stop at once. That loses nothing either: every role is built to survive
        // kill -9 (the learner redoes the step from its last checkpoint on resume). Only Ctrl-C:
        // launchers may deliver SIGTERM twice (scancel to every step, then the job script's own
        // cleanup), and that must still end in a clean checkpoint.
        eprintln!("\nstopping after the work in flight (a learner finishes its step and checkpoints); press Ctrl-C again to stop now");
        #[cfg(unix)]
        if let Some(mut int) = int {
            tokio::spawn(async move {
                int.recv().await;
                eprintln!("stopped at once; the step in flight is redone on --resume");
                std::process::exit(130);
            });
        }
    }
}

fn device(cfg: &Config) -> Result<tch::Device> {
    Ok(selfplay_policy::parse_device(&cfg.model.device)?)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Actors in this process (default: one per CUDA device besides the learner's on a
    /// multi-GPU machine, else 1). Each plays actor.units_in_flight units at once.
    #[arg(long, env = "SELFPLAY_ACTORS")]
    pub actors: Option<usize>,
    /// Devices of the actors, comma-separated (cpu, cuda, cuda:N); with --actors, used
    /// round-robin. Default: see --actors.
    #[arg(long, env = "SELFPLAY_ACTOR_DEVICES", value_delimiter = ',')]
    pub actor_devices: Vec<String>,
    /// Continue from the newest checkpoint in run.out_dir.
    #[arg(long, env = "SELFPLAY_RESUME")]
    pub resume: bool,
    /// 0 = synchronous on-policy (the paper); k > 0 = asynchronous, groups up to k versions old.
    #[arg(long, env = "SELFPLAY_MAX_POLICY_LAG", default_value_t = 0)]
    pub max_policy_lag: u64,
    /// Dtype of weights on the wire: auto (the model's), f32 or bf16.
    #[arg(long, env = "SELFPLAY_WIRE_DTYPE", default_value = "auto")]
    pub wire_dtype: String,
    /// Start a new run from this checkpoint's weights (a checkpoint directory, or any Hugging
    /// Face directory of model.path's architecture) instead of model.path's; steps count from 0
    /// and the reference stays model.reference_path, else model.path.
    #[arg(long, env = "SELFPLAY_INIT_FROM")]
    pub init_from: Option<PathBuf>,
    /// With --init-from: keep the checkpoint's AdamW state (moments and step count) instead of
    /// starting the optimizer fresh.
    #[arg(long, env = "SELFPLAY_KEEP_OPTIMIZER", requires = "init_from")]
    pub keep_optimizer: bool,
}

/// Everything in one process on 127.0.0.1: a [`selfplay_cluster::LocalCluster`].
pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = args.config.load()?;
    let dev = device(&cfg)?;
    let actor_devices = args
        .actor_devices
        .iter()
        .map(|d| selfplay_policy::parse_device(d))
        .collect::<Result<Vec<_>, _>>()
        .context("--actor-devices")?;
    let plan =
        selfplay_cluster::plan_devices(dev, tch::Cuda::device_count().max(0) as usize, args.actors, &actor_devices)?;
    let rt = runtime()?;
    let out_dir = cfg.run.out_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    if !args.resume && selfplay_learner::latest_checkpoint(&out_dir).is_some() {
        bail!(
            "{} already holds checkpoints: pass --resume to continue, or choose another run.out_dir",
            out_dir.display()
        );
    }
    std::fs::write(out_dir.join("config.toml"), cfg.to_toml())?;
    tracing::info!(
        learner = ?plan.learner,
        actors = ?plan.actors,
        units_in_flight = ?plan.actors.iter().map(|d| cfg.actor.units_for(*d)).collect::<Vec<_>>(),
        "local run"
    );
    let mut opts = selfplay_cluster::LocalClusterOptions::new(cfg.clone(), plan);
    opts.resume = args.resume;
    opts.max_policy_lag = args.max_policy_lag;
    opts.wire_dtype = args.wire_dtype.clone();
    opts.init_from = args.init_from.clone();
    opts.keep_optimizer = args.keep_optimizer;

    rt.block_on(async {
        for role in ["learner", "coordinator", "actor"] {
            selfplay_proto::health::health().expect(role);
        }
        let tele = telemetry::serve(&args.serve.metrics(9464)).await?;
        let progress = Progress::new(cfg.run.steps);
        let cluster = selfplay_cluster::LocalCluster::start(opts, move |s| progress.step(s)).await?;
        let shutdown = shutdown_signal();
        write_ready(
            &args.serve.ready_file,
            serde_json::json!({
                "coordinator": cluster.coordinator_addr, "learner": cluster.learner_addr, "metrics": tele.addr.to_string(),
            }),
        )?;
        let summary = cluster.run(shutdown).await?.learner;
        eprintln!(
            "done: {} steps; checkpoint {}",
            summary.steps,
            summary.checkpoint.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "-".into())
        );
        Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// gRPC address to serve on.
    #[arg(long, env = "SELFPLAY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Durable state (membership, units, stored weight versions); reloaded on restart.
    #[arg(long, env = "SELFPLAY_STATE_DIR", default_value = "selfplay-coordinator")]
    pub state_dir: PathBuf,
    /// An actor without a heartbeat for this long is dropped and its units re-issued.
    #[arg(long, env = "SELFPLAY_LEASE_TTL_MS", default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Weight versions kept in the store.
    #[arg(long, env = "SELFPLAY_KEEP_VERSIONS", default_value_t = 2)]
    pub keep_versions: usize,
    /// The largest weights payload a learner may publish, in bytes.
    #[arg(long, env = "SELFPLAY_MAX_WEIGHTS_BYTES", default_value_t = selfplay_coordinator::config::DEFAULT_MAX_WEIGHTS_BYTES)]
    pub max_weights_bytes: u64,
    /// Run seed: every work unit's sampling seed derives from (seed, step, unit); pass the
    /// run config's run.seed.
    #[arg(long, env = "SELFPLAY_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Serve TLS: certificate (PEM); needs --tls-key.
    #[arg(long, env = "SELFPLAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serve TLS: private key (PEM); needs --tls-cert.
    #[arg(long, env = "SELFPLAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Delete the state directory's contents first (a new run on an old volume). Without it,
    /// the coordinator resumes its state and refuses a learner of another run.
    #[arg(long, env = "SELFPLAY_FRESH")]
    pub fresh: bool,
    /// The learner's credential file (it opens steps and publishes weights; it also keys the
    /// lease tickets).
    #[arg(long, env = "SELFPLAY_LEARNER_TOKENS_FILE")]
    pub learner_tokens_file: PathBuf,
    /// The actors' credential file.
    #[arg(long, env = "SELFPLAY_ACTOR_TOKENS_FILE")]
    pub actor_tokens_file: PathBuf,
    /// The operators' credential file (Status only); without it, only the learner reads status.
    #[arg(long, env = "SELFPLAY_OPERATOR_TOKENS_FILE")]
    pub operator_tokens_file: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn coordinator(args: CoordinatorArgs) -> Result<()> {
    if args.fresh && args.state_dir.exists() {
        for e in std::fs::read_dir(&args.state_dir)? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    let rt = runtime()?;
    rt.block_on(async {
        selfplay_proto::health::health().expect("coordinator");
        let tele = telemetry::serve(&args.serve.metrics(9464)).await?;
        selfplay_coordinator::describe_metrics();
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(c), Some(k)) => Some(selfplay_coordinator::config::TlsConfig { cert: c.clone(), key: k.clone() }),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let cfg = selfplay_coordinator::CoordinatorConfig {
            state_dir: args.state_dir.clone(),
            lease_ttl_ms: args.lease_ttl_ms,
            keep_versions: args.keep_versions,
            max_weights_bytes: args.max_weights_bytes,
            run_seed: args.seed,
            learner_tokens_file: Some(args.learner_tokens_file.clone()),
            actor_tokens_file: Some(args.actor_tokens_file.clone()),
            operator_tokens_file: args.operator_tokens_file.clone(),
            tls,
            ..Default::default()
        };
        let shutdown = shutdown_signal();
        write_ready(
            &args.serve.ready_file,
            serde_json::json!({"grpc": addr.to_string(), "metrics": tele.addr.to_string()}),
        )?;
        tracing::info!(%addr, "coordinator serving");
        selfplay_coordinator::serve(cfg, listener, shutdown).await?;
        Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub struct LearnerArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Coordinator URL (https:// with --tls-ca).
    #[arg(long, env = "SELFPLAY_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// gRPC address to serve on (actors submit their groups here).
    #[arg(long, env = "SELFPLAY_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: String,
    /// Continue from the newest checkpoint in run.out_dir (a fresh start when there is none).
    #[arg(long, env = "SELFPLAY_RESUME", conflicts_with = "fresh")]
    pub resume: bool,
    /// Start a new run in run.out_dir, deleting the checkpoints, step log and run id an earlier
    /// run left there. Without it (or --resume), a run.out_dir holding checkpoints is refused.
    #[arg(long, env = "SELFPLAY_FRESH")]
    pub fresh: bool,
    /// 0 = synchronous on-policy (the paper); k > 0 = asynchronous, groups up to k versions old.
    #[arg(long, env = "SELFPLAY_MAX_POLICY_LAG", default_value_t = 0)]
    pub max_policy_lag: u64,
    /// Publish weights to the coordinator every this many steps.
    #[arg(long, env = "SELFPLAY_PUBLISH_EVERY", default_value_t = 1)]
    pub publish_every: u64,
    /// Dtype of weights on the wire: auto (the model's), f32 or bf16.
    #[arg(long, env = "SELFPLAY_WIRE_DTYPE", default_value = "auto")]
    pub wire_dtype: String,
    /// Start a new run from this checkpoint's weights (a checkpoint directory, or any Hugging
    /// Face directory of model.path's architecture) instead of model.path's; steps count from 0
    /// and the reference stays model.reference_path, else model.path.
    #[arg(long, env = "SELFPLAY_INIT_FROM")]
    pub init_from: Option<PathBuf>,
    /// With --init-from: keep the checkpoint's AdamW state (moments and step count) instead of
    /// starting the optimizer fresh.
    #[arg(long, env = "SELFPLAY_KEEP_OPTIMIZER", requires = "init_from")]
    pub keep_optimizer: bool,
    /// Serve TLS: certificate (PEM); needs --tls-key.
    #[arg(long, env = "SELFPLAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serve TLS: private key (PEM); needs --tls-cert.
    #[arg(long, env = "SELFPLAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, env = "SELFPLAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The learner's own credential (--token-file): the coordinator's --learner-tokens-file.
    #[command(flatten)]
    pub auth: AuthArgs,
    /// The actors' credential file (they submit rollouts here).
    #[arg(long, env = "SELFPLAY_ACTOR_TOKENS_FILE")]
    pub actor_tokens_file: PathBuf,
    /// The operators' credential file (LearnerStatus only).
    #[arg(long, env = "SELFPLAY_OPERATOR_TOKENS_FILE")]
    pub operator_tokens_file: Option<PathBuf>,
    #[command(flatten)]
    pub ranks: RankArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Learner ranks (data-parallel, docs/operations.md). Unset flags fall back to the variables
/// torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), then Slurm's
/// (SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RankArgs {
    /// Number of learner ranks (one process per device); 1 = a single learner.
    #[arg(long, env = "SELFPLAY_WORLD_SIZE")]
    pub world_size: Option<usize>,
    /// This process's rank: 0 serves actors and the coordinator, the others follow it.
    #[arg(long, env = "SELFPLAY_RANK")]
    pub rank: Option<usize>,
    /// This process's rank on its node: its CUDA device when model.device is cuda.
    #[arg(long, env = "SELFPLAY_LOCAL_RANK")]
    pub local_rank: Option<usize>,
    /// Address of rank 0, where it hosts the ranks' TCPStore.
    #[arg(long, env = "SELFPLAY_MASTER_ADDR")]
    pub master_addr: Option<String>,
    /// Port of that store.
    #[arg(long, env = "SELFPLAY_MASTER_PORT")]
    pub master_port: Option<u16>,
}

impl RankArgs {
    /// The launch: the flags first, then the launcher's variables. `None`: a single learner.
    pub fn launch(&self) -> Result<Option<selfplay_game::ranks::Launch>> {
        let flags: Vec<(&str, Option<String>)> = vec![
            ("WORLD_SIZE", self.world_size.map(|v| v.to_string())),
            ("RANK", self.rank.map(|v| v.to_string())),
            ("LOCAL_RANK", self.local_rank.map(|v| v.to_string())),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.map(|v| v.to_string())),
        ];
        let get = |k: &str| {
            flags.iter().find(|(n, _)| *n == k).and_then(|(_, v)| v.clone()).or_else(|| std::env::var(k).ok())
        };
        let launch = selfplay_game::ranks::Launch::from_env(get).map_err(|e| anyhow!("learner ranks: {e}"))?;
        Ok(launch.filter(|l| l.world_size > 1))
    }
}

pub fn learner(args: LearnerArgs) -> Result<()> {
    let cfg = args.config.load()?;
    let launch = args.ranks.launch()?;
    let dev = match (device(&cfg)?, &launch) {
        // One device per rank: LOCAL_RANK picks it, unless the launcher bound one GPU to the
        // task (Slurm's --gpus-per-task=1: it is cuda:0).
        (tch::Device::Cuda(_), Some(l)) => {
            tch::Device::Cuda(if tch::Cuda::device_count() > 1 { l.local_rank } else { 0 })
        }
        (d, _) => d,
    };
    let opts = selfplay_learner::LearnerOptions {
        coordinator: args.coordinator.clone(),
        credential: args.auth.credential()?,
        actor: Credential::from_file(&args.actor_tokens_file)?,
        operator: accept(&args.operator_tokens_file)?,
        max_policy_lag: args.max_policy_lag,
        publish_every: args.publish_every,
        wire_dtype: args.wire_dtype.clone(),
        device: dev,
        resume: args.resume,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        tls_ca: args.tls_ca.clone(),
        init_from: args.init_from.clone(),
        keep_optimizer: args.keep_optimizer,
        in_process: None,
        ranks: launch.clone(),
    };
    if let Some(l) = launch.as_ref().filter(|l| l.rank > 0) {
        // Not rank 0: no server, no step log; it trains beside rank 0 until rank 0 stops.
        let steps = selfplay_learner::follow_rank(cfg, &opts)?;
        eprintln!("learner rank {} of {} done: {steps} steps", l.rank, l.world_size);
        return Ok(());
    }
    let rt = runtime()?;
    rt.block_on(async {
        selfplay_proto::health::health().expect("learner");
        let tele = telemetry::serve(&args.serve.metrics(9465)).await?;
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        if args.fresh {
            for name in ["checkpoints", "steps.jsonl", "run.json"] {
                let p = cfg.run.out_dir.join(name);
                if p.is_dir() {
                    std::fs::remove_dir_all(&p)?;
                } else if p.exists() {
                    std::fs::remove_file(&p)?;
                }
            }
        } else if !args.resume && selfplay_learner::latest_checkpoint(&cfg.run.out_dir).is_some() {
            bail!(
                "{} already holds checkpoints of a run: pass --resume to continue it, --fresh to start over, or choose another run.out_dir",
                cfg.run.out_dir.display()
            );
        }
        std::fs::create_dir_all(&cfg.run.out_dir)?;
        let shutdown = shutdown_signal();
        write_ready(
            &args.serve.ready_file,
            serde_json::json!({"grpc": addr.to_string(), "metrics": tele.addr.to_string()}),
        )?;
        let progress = Progress::new(cfg.run.steps);
        let summary = selfplay_learner::run(cfg, opts, listener, shutdown, move |s| progress.step(s)).await?;
        eprintln!("done: {} steps", summary.steps);
        Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub struct ActorArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Coordinator URL (https:// with --tls-ca).
    #[arg(long, env = "SELFPLAY_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// Learner URL (https:// with --tls-ca).
    #[arg(long, env = "SELFPLAY_LEARNER", default_value = "http://127.0.0.1:50052")]
    pub learner: String,
    /// Remote reward server (the address of the remote reward source; replaces the config's).
    #[arg(long, env = "SELFPLAY_REWARD")]
    pub reward: Option<String>,
    /// Name at the coordinator (default: host name and process id).
    #[arg(long, env = "SELFPLAY_ACTOR_ID")]
    pub actor_id: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's and learner's certificates.
    #[arg(long, env = "SELFPLAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The actor credential (--token-file).
    #[command(flatten)]
    pub auth: AuthArgs,
    /// The reward-client credential file, for a remote reward server (reward.kind = remote).
    #[arg(long, env = "SELFPLAY_REWARD_TOKEN_FILE")]
    pub reward_token_file: Option<PathBuf>,
    /// On exit, print the SHA-256 of the weights the actor ended with (one full read of the
    /// weights), to compare actors and checkpoints.
    #[arg(long, env = "SELFPLAY_WEIGHTS_DIGEST")]
    pub weights_digest: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn actor(args: ActorArgs) -> Result<()> {
    let cfg = args.config.load()?;
    let dev = device(&cfg)?;
    let rt = runtime()?;
    let credential = args.auth.credential()?;
    selfplay_proto::health::health().expect("actor");
    let tele = rt.block_on(telemetry::serve(&args.serve.metrics(9466)))?;
    write_ready(&args.serve.ready_file, serde_json::json!({"metrics": tele.addr.to_string()}))?;
    let kind = cfg.kind_on(dev)?;
    let policy = selfplay_policy::Policy::load(&cfg.model.path, dev, kind)?;
    // The remote source of R (`reward.kind = "remote"`, or one of a combined reward's sources).
    let remote: Option<Box<dyn selfplay_game::reward::RewardSource>> =
        if let Some(configured) = cfg.reward.remote_address() {
            let address = args.reward.clone().unwrap_or(configured);
            let ep = selfplay_proto::client::endpoint(&address, args.tls_ca.as_deref()).map_err(anyhow::Error::msg)?;
            let channel = rt.block_on(ep.connect()).with_context(|| format!("reward server {address}"))?;
            let Some(reward_credential) = accept(&args.reward_token_file)? else {
                bail!("reward.kind = remote needs --reward-token-file (the reward-client credential)");
            };
            let client = selfplay_proto::client::reward_client(channel, &reward_credential);
            Some(Box::new(selfplay_actor::reward_service::RemoteReward::new(client, rt.handle().clone())))
        } else {
            None
        };
    let player = Player::new_with_remote(policy, None, cfg.clone(), remote)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            shutdown_signal().await;
            stop.store(true, Ordering::SeqCst);
        });
    }
    let opts = selfplay_actor::ActorOptions {
        run_id: cfg.run.id.clone(),
        coordinator: args.coordinator.clone(),
        learner: args.learner.clone(),
        credential,
        actor_id: args.actor_id.clone().unwrap_or_else(selfplay_actor::default_actor_id),
        patience: Duration::from_secs(300),
        tls_ca: args.tls_ca.clone(),
        units_in_flight: cfg.actor.units_for(dev),
        in_process: None,
        digest_weights: args.weights_digest,
    };
    let summary = selfplay_actor::run(player, opts, rt.handle().clone(), stop)?;
    eprintln!(
        "actor done: {} units, {} failed, weights v{} ({} fetched from the coordinator){}",
        summary.units_done,
        summary.units_failed,
        summary.weights_version,
        summary.syncs_grpc,
        summary.weights_digest.map(|d| format!(", sha256 {d}")).unwrap_or_default()
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RewardServerArgs {
    /// A ...ForSequenceClassification directory, or its Hub id (org/name, at main).
    #[arg(long, env = "SELFPLAY_REWARD_MODEL")]
    pub model: PathBuf,
    /// auto (cuda when available), cpu, cuda or cuda:N.
    #[arg(long, env = "SELFPLAY_DEVICE", default_value = "auto")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, env = "SELFPLAY_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// gRPC address to serve on.
    #[arg(long, env = "SELFPLAY_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: String,
    /// Serve TLS: certificate (PEM); needs --tls-key.
    #[arg(long, env = "SELFPLAY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Serve TLS: private key (PEM); needs --tls-cert.
    #[arg(long, env = "SELFPLAY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The reward clients' credential file (the actors' --reward-token-file).
    #[arg(long, env = "SELFPLAY_REWARD_CLIENT_TOKENS_FILE")]
    pub reward_client_tokens_file: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn reward_server(args: RewardServerArgs) -> Result<()> {
    let dev = selfplay_policy::parse_device(&args.device)?;
    let kind = selfplay_policy::parse_kind(&args.dtype)?;
    let dir = selfplay_hub::resolve(&args.model, "").context("--model")?;
    let model = selfplay_game::reward::RewardModel::load(&dir, dev, kind)?;
    let clients = Credential::from_file(&args.reward_client_tokens_file)?;
    let rt = runtime()?;
    rt.block_on(async {
        selfplay_proto::health::health().expect("reward");
        let tele = telemetry::serve(&args.serve.metrics(9467)).await?;
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        let (health, health_svc) = tonic_health::server::health_reporter();
        let svc = selfplay_proto::v1::reward_server::RewardServer::new(selfplay_actor::reward_service::RewardService::new(model))
            .max_decoding_message_size(selfplay_proto::MAX_MESSAGE_BYTES);
        health.set_serving::<selfplay_proto::v1::reward_server::RewardServer<selfplay_actor::reward_service::RewardService>>().await;
        write_ready(&args.serve.ready_file, serde_json::json!({"grpc": addr.to_string(), "metrics": tele.addr.to_string()}))?;
        tracing::info!(%addr, "reward server serving");
        selfplay_proto::health::health().ready("reward");
        selfplay_proto::guard::REWARD.describe_metrics();
        let tls = args
            .tls_cert
            .clone()
            .zip(args.tls_key.clone())
            .map(|(cert, key)| selfplay_proto::server::TlsFiles { cert, key });
        selfplay_proto::server::builder(tls.as_ref())?
            .add_service(health_svc)
            .add_service(selfplay_proto::guard::RoleGuard::new(
                svc,
                selfplay_proto::auth::Verifier::new().with(selfplay_proto::auth::Role::RewardClient, clients),
                &selfplay_proto::guard::REWARD,
            ))
            .serve_with_incoming_shutdown(nodelay_incoming(listener), shutdown_signal())
            .await?;
        Ok(())
    })
}

fn nodelay_incoming(l: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true))
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Coordinator URL (https:// with --tls-ca).
    #[arg(long, env = "SELFPLAY_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    pub coordinator: String,
    /// Print the raw status as JSON.
    #[arg(long, env = "SELFPLAY_STATUS_JSON")]
    pub json: bool,
    /// CA certificate (PEM) of an https coordinator.
    #[arg(long, env = "SELFPLAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// An operator credential (--token-file).
    #[command(flatten)]
    pub auth: AuthArgs,
}

pub fn status(args: StatusArgs) -> Result<()> {
    let rt = runtime()?;
    let credential = args.auth.credential()?;
    let s = rt.block_on(async {
        let ch = selfplay_proto::client::endpoint(&args.coordinator, args.tls_ca.as_deref())
            .map_err(anyhow::Error::msg)?
            .connect()
            .await
            .with_context(|| format!("coordinator {}", args.coordinator))?;
        let mut c = selfplay_proto::client::coordinator_client(ch, &credential);
        Ok::<_, anyhow::Error>(c.status(selfplay_proto::v1::StatusRequest {}).await?.into_inner())
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "open_step": s.open_step, "units_pending": s.units_pending, "units_leased": s.units_leased,
                "units_issued_total": s.units_issued_total, "units_reissued_total": s.units_reissued_total,
                "units_done_total": s.units_done_total, "weight_versions": s.weight_versions,
                "units_per_second": s.units_per_second, "epoch": s.epoch, "run_id": s.run_id,
                "actors": s.actors.iter().map(|a| serde_json::json!({
                    "actor_id": a.actor_id, "device": a.device, "weights_version": a.weights_version,
                    "units": a.units, "units_done": a.units_done, "last_heartbeat_age_s": a.last_heartbeat_age_s,
                })).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!(
        "run {:?}  learner epoch {}  step {}  units: {} pending, {} leased, {} done ({} issued, {} re-issued)  {:.2} units/s  weights {:?}",
        s.run_id,
        s.epoch,
        s.open_step,
        s.units_pending,
        s.units_leased,
        s.units_done_total,
        s.units_issued_total,
        s.units_reissued_total,
        s.units_per_second,
        s.weight_versions
    );
    println!("{:<24} {:<10} {:>8} {:>6} {:>10}  units", "actor", "device", "weights", "done", "heartbeat");
    for a in &s.actors {
        println!(
            "{:<24} {:<10} {:>8} {:>6} {:>9.1}s  {}",
            a.actor_id,
            a.device,
            a.weights_version,
            a.units_done,
            a.last_heartbeat_age_s,
            a.units.join(",")
        );
    }
    Ok(())
}
