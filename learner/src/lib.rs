//! The learner role. Library first: [`run`] serves the `Learner` gRPC service, keeps the
//! coordinator's steps open, trains on every N accepted groups with
//! [`selfplay_game::Trainer`], publishes weights, checkpoints, and resumes.
//!
//! Versions: weights version v is the policy after v steps; version 0 is the initial model,
//! which every actor loads from disk, so the first published version is 1.
//! Synchronous mode (`max_policy_lag = 0`, the paper's): step s trains on the N units of step
//! s, all sampled by version s. Asynchronous mode (lag k): steps up to k ahead stay open, any
//! group at most k versions behind qualifies, oldest units first.
pub mod inbox;
pub mod metrics;
pub mod service;

use inbox::Inbox;
use selfplay_game::driver::units_for_step;
use selfplay_game::ranks::{self, RankedTrainer, Start};
use selfplay_game::{Config, StepResult, StepStats, Trainer};
use selfplay_proto::auth::{Credential, Role, Verifier};
use selfplay_proto::client::{coordinator_client, AuthChannel};
use selfplay_proto::guard::{RoleGuard, LEARNER_SERVICE};
use selfplay_proto::ticket::LeaseTickets;
use selfplay_proto::v1::coordinator_client::CoordinatorClient;
use selfplay_proto::v1::learner_server::LearnerServer;
use selfplay_proto::v1::{BeginEpochRequest, OpenStepRequest, StatusRequest};
use selfplay_proto::weights::{into_chunks, ManifestBuilder};
use service::{LearnerService, Shared};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind};

/// While waiting for groups, how often the learner checks that the coordinator still holds
/// this learner's epoch and weights ([`Runner::resync`]).
const COORDINATOR_CHECK_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    #[error("learner options: {0}")]
    Options(String),
    #[error(transparent)]
    Game(#[from] selfplay_game::GameError),
    #[error(transparent)]
    Policy(#[from] selfplay_policy::PolicyError),
    #[error("coordinator at {address}: {message}")]
    Coordinator { address: String, message: String },
    #[error("gRPC server: {0}")]
    Server(String),
    #[error("training thread: {0}")]
    Thread(String),
    /// The coordinator refused a request of this learner's epoch: it began another one.
    #[error("the coordinator is in another learner epoch: {0}")]
    EpochChanged(String),
    #[error("another learner took over (the coordinator is at epoch {theirs}, this learner at {ours}): stopping")]
    Superseded { ours: u64, theirs: u64 },
    #[error("run: {0}")]
    Run(String),
}

/// How the learner runs, beyond the game config.
#[derive(Debug, Clone)]
pub struct LearnerOptions {
    /// Coordinator URL, e.g. http://127.0.0.1:50051.
    pub coordinator: String,
    /// The learner's credential: presented to the coordinator, and the key of the lease
    /// tickets the learner checks on every group.
    pub credential: Credential,
    /// The credentials the learner's server accepts: actors submit, operators read status.
    pub actor: Credential,
    pub operator: Option<Credential>,
    pub max_policy_lag: u64,
    /// Publish weights every K steps (K <= lag + 1).
    pub publish_every: u64,
    /// Dtype of weights on the wire: "auto" (the model's), "f32" or "bf16".
    pub wire_dtype: String,
    pub device: Device,
    /// Resume from the newest checkpoint in `<out_dir>/checkpoints` when there is one.
    pub resume: bool,
    /// Serve TLS with this (certificate, key) PEM pair.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA that signed the coordinator's certificate (https coordinator address).
    pub tls_ca: Option<PathBuf>,
    /// A new run starts from this checkpoint's weights instead of `model.path` (actors fetch
    /// them as version 0). A resumed run ignores it: its own checkpoints come first.
    pub init_from: Option<PathBuf>,
    /// With `init_from`: keep the checkpoint's AdamW state instead of a fresh optimizer.
    pub keep_optimizer: bool,
    /// Actors in this process (`selfplay train`): every version published to the coordinator
    /// is also left here, on this learner's device, for them to copy.
    pub in_process: Option<Arc<selfplay_policy::InProcessWeights>>,
    /// This process's place among the learner's ranks (torchrun's or Slurm's variables, or
    /// the matching flags); `None` or a world of one: a single learner. Rank 0 is the learner
    /// the coordinator and actors see; the other ranks run [`follow_rank`].
    pub ranks: Option<selfplay_game::ranks::Launch>,
}

impl LearnerOptions {
    pub fn validate(&self) -> Result<(), LearnerError> {
        if self.publish_every == 0 || self.publish_every > self.max_policy_lag + 1 {
            return Err(LearnerError::Options(format!(
                "publish_every must be in 1..=max_policy_lag+1 ({}), got {}: actors could never sample fresh enough weights",
                self.max_policy_lag + 1,
                self.publish_every
            )));
        }
        if !matches!(self.wire_dtype.as_str(), "auto" | "f32" | "bf16") {
            return Err(LearnerError::Options(format!(
                "wire dtype must be auto, f32 or bf16, got {:?}",
                self.wire_dtype
            )));
        }
        Ok(())
    }
}

/// The newest complete checkpoint under `<out_dir>/checkpoints`.
pub fn latest_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    checkpoints_newest_first(out_dir).into_iter().next()
}

/// Every complete checkpoint under `<out_dir>/checkpoints`, newest first.
pub fn checkpoints_newest_first(out_dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(out_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse::<u64>().ok()?;
            e.path().join("trainer.json").exists().then(|| (n, e.path()))
        })
        .collect();
    all.sort();
    all.into_iter().rev().map(|(_, p)| p).collect()
}

const EPOCH_FILE: &str = "epoch.json";

fn read_epoch(out_dir: &Path) -> u64 {
    std::fs::read(out_dir.join(EPOCH_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or(0)
}

fn prune_checkpoints(out_dir: &Path, keep: usize) {
    if keep == 0 {
        return;
    }
    let dir = out_dir.join("checkpoints");
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().strip_prefix("step-")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    all.sort();
    while all.len() > keep {
        let (_, p) = all.remove(0);
        let _ = std::fs::remove_dir_all(p);
    }
}

/// Serialises the policy's weights for the wire: manifest (names, shapes, dtype, sha256) and
/// the concatenated payload.
pub fn weights_payload(
    model: &selfplay_policy::Llama,
    wire_dtype: &str,
    version: u64,
    step: u64,
) -> Result<(selfplay_proto::v1::WeightManifest, Vec<u8>), LearnerError> {
    let (kind, name) = match (wire_dtype, model.kind()) {
        ("bf16", _) | ("auto", Kind::BFloat16) => (Kind::BFloat16, "bf16"),
        ("auto", Kind::Half) => (Kind::Half, "f16"),
        _ => (Kind::Float, "f32"),
    };
    let mut b = ManifestBuilder::new();
    for (n, p) in model.parameters() {
        let t = p.detach().to_kind(kind).to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * kind.elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, numel).map_err(selfplay_policy::PolicyError::from)?;
        b.push(n.clone(), &t.size(), name, &bytes);
    }
    b.finish(version, step).map_err(|e| LearnerError::Options(e.to_string()))
}

/// Connects to the coordinator, retrying with backoff for up to `patience`.
pub async fn connect_coordinator(
    address: &str,
    credential: &Credential,
    tls_ca: Option<&Path>,
    patience: Duration,
) -> Result<CoordinatorClient<AuthChannel>, LearnerError> {
    let ch = selfplay_proto::client::connect_with_backoff(address, tls_ca, patience)
        .await
        .map_err(|message| LearnerError::Coordinator { address: address.into(), message })?;
    Ok(coordinator_client(ch, credential))
}

/// Calls `f` until it succeeds, retrying while the coordinator restarts (up to 5 minutes).
async fn retry<T, F, Fut>(what: &str, f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    selfplay_proto::client::retry_unavailable(what, Duration::from_secs(300), f).await
}

/// What a finished learner reports.
#[derive(Debug, Clone)]
pub struct LearnerSummary {
    pub steps: u64,
    pub last: Option<StepStats>,
    pub checkpoint: Option<PathBuf>,
}

struct Runner {
    cfg: Config,
    opts: LearnerOptions,
    client: CoordinatorClient<AuthChannel>,
    rt: tokio::runtime::Handle,
    prompts: Vec<String>,
    last_published: u64,
    opened_upto: Option<u64>,
    /// The learner epoch the coordinator gave this learner (0 before the first).
    epoch: u64,
    run_id: String,
}

impl Runner {
    fn coord_err(&self, s: tonic::Status) -> LearnerError {
        if s.code() == tonic::Code::FailedPrecondition
            && s.message().starts_with(selfplay_proto::error::SUPERSEDED_EPOCH)
        {
            return LearnerError::EpochChanged(s.message().to_string());
        }
        LearnerError::Coordinator { address: self.opts.coordinator.clone(), message: s.to_string() }
    }

    /// Begins a new learner epoch from the trainer's state, which is the truth: the
    /// coordinator forgets every step, lease and newer weights version; the learner forgets
    /// the groups it has not trained on, publishes its weights (version = its step, 0
    /// included) and opens its window again. Every unit not consumed is played again with
    /// these weights.
    fn begin_epoch(&mut self, trainer: &Trainer, shared: &Shared) -> Result<(), LearnerError> {
        let req = BeginEpochRequest {
            version: trainer.step,
            last_epoch: self.epoch,
            run_id: self.run_id.clone(),
            run_seed: self.cfg.run.seed,
        };
        let client = self.client.clone();
        let r = self
            .rt
            .block_on(retry("BeginEpoch", || {
                let mut c = client.clone();
                let r = req.clone();
                async move { c.begin_epoch(r).await }
            }))
            .map_err(|e| match e.code() {
                tonic::Code::FailedPrecondition => LearnerError::Run(e.message().to_string()),
                _ => self.coord_err(e),
            })?
            .into_inner();
        if r.run_seed != self.cfg.run.seed {
            tracing::warn!(
                coordinator = r.run_seed,
                configured = self.cfg.run.seed,
                "the coordinator keeps the seed of its run; units sample with it"
            );
        }
        self.epoch = r.epoch;
        let path = self.cfg.run.out_dir.join(EPOCH_FILE);
        selfplay_coordinator::persist::write_atomic(
            &path,
            serde_json::json!({ "epoch": r.epoch }).to_string().as_bytes(),
        )
        .map_err(|e| LearnerError::Run(format!("{}: {e}", path.display())))?;
        let dropped = {
            let mut b = shared.inbox.lock().expect("inbox lock");
            b.epoch = r.epoch;
            b.clear_pending()
        };
        ::metrics::gauge!("selfplay_learner_epoch").set(r.epoch as f64);
        tracing::info!(epoch = r.epoch, version = trainer.step, groups_dropped = dropped, "learner epoch began");
        self.opened_upto = None;
        self.publish(trainer)?;
        self.open_window(trainer.step, false)
    }

    /// After the coordinator refused this learner's epoch, or on the periodic check: a
    /// coordinator behind this learner (restarted without its state) gets a new epoch from
    /// this learner's state; one ahead of it means another learner took over, and this one
    /// stops.
    fn resync(&mut self, trainer: &Trainer, shared: &Shared) -> Result<(), LearnerError> {
        let client = self.client.clone();
        let status = self
            .rt
            .block_on(retry("Status", || {
                let mut c = client.clone();
                async move { c.status(StatusRequest {}).await }
            }))
            .map_err(|e| self.coord_err(e))?
            .into_inner();
        if status.epoch > self.epoch {
            return Err(LearnerError::Superseded { ours: self.epoch, theirs: status.epoch });
        }
        let latest = status.weight_versions.iter().copied().max();
        if status.epoch < self.epoch
            || latest.is_none_or(|v| v < self.last_published)
            || status.latest_weights_epoch != self.epoch
        {
            tracing::warn!(
                coordinator_epoch = status.epoch,
                epoch = self.epoch,
                coordinator_latest = ?latest,
                published = self.last_published,
                "the coordinator lost this learner's epoch or weights (restarted without its state?): beginning a new epoch"
            );
            ::metrics::counter!("selfplay_learner_republish_total").increment(1);
            self.begin_epoch(trainer, shared)?;
        } else if status.units_pending == 0 && status.units_leased == 0 {
            // Nothing left to play, yet this learner still lacks groups: some were reported
            // done but never reached it (a completion that arrived after its group was dropped
            // as stale). Put the window's units back; the ones it has are refused as
            // duplicates.
            tracing::warn!(
                version = trainer.step,
                "no unit is pending or leased while groups are missing: reopening the open steps"
            );
            ::metrics::counter!("selfplay_learner_reopened_total").increment(1);
            self.open_window(trainer.step, true)?;
        }
        Ok(())
    }

    fn publish(&mut self, trainer: &Trainer) -> Result<(), LearnerError> {
        let t0 = Instant::now();
        let (mut manifest, payload) =
            weights_payload(&trainer.policy.model, &self.opts.wire_dtype, trainer.step, trainer.step)?;
        manifest.epoch = self.epoch;
        let bytes = payload.len() as u64;
        let payload = bytes::Bytes::from(payload);
        let mut client = self.client.clone();
        self.rt
            // One attempt carries the whole model: no fixed deadline (a slow link to the
            // coordinator would never make it); keepalive notices a dead peer.
            .block_on(selfplay_proto::client::retry_with_deadline(
                "PublishWeights",
                Duration::from_secs(300),
                Duration::from_secs(24 * 3600),
                || {
                    let chunks = into_chunks(manifest.clone(), payload.clone());
                    let mut c = client.clone();
                    async move { c.publish_weights(tokio_stream::iter(chunks)).await }
                },
            ))
            .map_err(|e| self.coord_err(e))?;
        let _ = &mut client;
        ::metrics::histogram!("selfplay_learner_weight_publish_seconds").record(t0.elapsed().as_secs_f64());
        ::metrics::counter!("selfplay_learner_weight_publish_bytes_total").increment(bytes);
        self.last_published = trainer.step;
        // After the coordinator recorded the version, before any step that needs it opens:
        // an actor of this process that leases a unit finds its weights here.
        if let Some(h) = &self.opts.in_process {
            if let Err(e) = h.publish(self.epoch, trainer.step, &trainer.policy.model) {
                // Only the fast path is lost: the actors fetch from the coordinator.
                h.clear();
                tracing::warn!(version = trainer.step, error = %e, "cannot leave the weights for this process's actors; they fetch them from the coordinator");
            }
        }
        tracing::info!(version = trainer.step, bytes, secs = t0.elapsed().as_secs_f64(), "weights published");
        Ok(())
    }

    fn open_step(&mut self, step: u64, reopen: bool) -> Result<(), LearnerError> {
        let units = units_for_step(&self.cfg, step, &self.prompts);
        let sync = self.opts.max_policy_lag == 0;
        let req = OpenStepRequest {
            step,
            units: units.len() as u32,
            min_weights_version: self.last_published,
            prompts: if self.prompts.is_empty() { vec![] } else { units.iter().map(|u| u.prompt.clone()).collect() },
            tasks: if self.cfg.game.tasks.is_empty() { vec![] } else { units.iter().map(|u| u.task.clone()).collect() },
            discard_older: sync,
            reopen,
            epoch: self.epoch,
        };
        let client = self.client.clone();
        self.rt
            .block_on(retry("OpenStep", || {
                let mut c = client.clone();
                let r = req.clone();
                async move { c.open_step(r).await }
            }))
            .map_err(|e| self.coord_err(e))?;
        self.opened_upto = Some(self.opened_upto.map_or(step, |u| u.max(step)));
        Ok(())
    }

    /// Opens every step the current version may sample for.
    fn open_window(&mut self, version: u64, reopen: bool) -> Result<(), LearnerError> {
        let last = version + self.opts.max_policy_lag;
        let first = match self.opened_upto {
            Some(u) if !reopen => u + 1,
            _ => version,
        };
        for s in first..=last {
            self.open_step(s, reopen)?;
        }
        Ok(())
    }
}

/// `learner.reference_check_fraction`: the learner's own copy of the reference model, which
/// recomputes the reference log-probs of a share of the groups and refuses those that disagree.
struct ReferenceCheck {
    reference: selfplay_policy::Policy,
    fraction: f64,
    seed: u64,
    bound: f64,
}

impl ReferenceCheck {
    /// None when the fraction is 0: no model is loaded.
    fn load(cfg: &Config, fraction: f64, device: Device, kind: Kind, bound: f64) -> Result<Option<Self>, LearnerError> {
        if fraction <= 0.0 {
            return Ok(None);
        }
        // The reference the actors use: model.reference_path, else the initial policy.
        let path =
            if cfg.model.reference_path.as_os_str().is_empty() { &cfg.model.path } else { &cfg.model.reference_path };
        let reference = selfplay_policy::Policy::load(path, device, kind)?;
        tracing::info!(path = %path.display(), fraction, bound, "reference log-probs of a share of the groups are recomputed and checked");
        Ok(Some(ReferenceCheck { reference, fraction, seed: cfg.run.seed, bound }))
    }

    /// Whether this unit's group is checked: a fixed function of (run seed, unit id), so which
    /// groups are checked does not depend on timing, and a replayed unit is checked again.
    fn selects(&self, unit_id: &str) -> bool {
        reference_check_selects(self.seed, self.fraction, unit_id)
    }

    fn refusals(&self, groups: &[selfplay_game::RolloutGroup]) -> Result<Vec<selfplay_game::Refusal>, LearnerError> {
        Ok(selfplay_game::trainer::reference_refusals(
            &self.reference,
            groups,
            |g| self.selects(&g.unit_id),
            self.bound,
        )?)
    }
}

/// Whether the reference check looks at this unit's group: a fixed function of (run seed,
/// unit id), so which groups are checked does not depend on timing, and a replayed unit is
/// checked again.
fn reference_check_selects(seed: u64, fraction: f64, unit_id: &str) -> bool {
    let h = unit_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let x = selfplay_proto::unit::mix(seed ^ h);
    ((x >> 11) as f64) / ((1u64 << 53) as f64) < fraction
}

fn checkpoint(
    trainer: &mut RankedTrainer,
    inbox: &Mutex<Inbox>,
    out_dir: &Path,
    keep: usize,
) -> Result<PathBuf, LearnerError> {
    let t0 = Instant::now();
    let extra = {
        let b = inbox.lock().expect("inbox lock");
        let mut consumed: Vec<&String> = b.consumed.iter().collect();
        consumed.sort();
        serde_json::json!({ "consumed": consumed, "consumed_floor": b.consumed_floor, "epoch": b.epoch })
    };
    let dir = out_dir.join("checkpoints").join(format!("step-{:08}", trainer.step));
    std::fs::create_dir_all(out_dir.join("checkpoints"))
        .map_err(|e| LearnerError::Options(format!("{}: {e}", out_dir.display())))?;
    trainer.save_checkpoint(&dir, extra)?;
    prune_checkpoints(out_dir, keep);
    ::metrics::histogram!("selfplay_learner_checkpoint_seconds").record(t0.elapsed().as_secs_f64());
    tracing::info!(step = trainer.step, dir = %dir.display(), "checkpoint written");
    Ok(dir)
}

/// Appends one line per step to `<out_dir>/steps.jsonl`: the statistics and which units (from
/// which actors, sampled by which version) went into it. Curves and audits read this file.
fn log_step(out_dir: &Path, stats: &StepStats, groups: &[selfplay_game::RolloutGroup]) {
    let line = serde_json::json!({
        "stats": stats,
        "units": groups.iter().map(|g| serde_json::json!({
            "unit_id": g.unit_id, "actor_id": g.actor_id, "weights_version": g.weights_version,
        })).collect::<Vec<_>>(),
    });
    append_lines(&out_dir.join(STEP_LOG), &format!("{line}\n"));
}

const STEP_LOG: &str = "steps.jsonl";
const SAMPLE_LOG: &str = "samples.jsonl";

/// With `run.log_samples`: one line per trained group in `<out_dir>/samples.jsonl`, with the
/// texts (the challenger's query, absent in GRPO, and the answers) and their rewards.
fn log_samples(out_dir: &Path, step: u64, groups: &[selfplay_game::RolloutGroup]) {
    let mut text = String::new();
    for g in groups {
        let line = serde_json::json!({
            "step": step,
            "unit_id": g.unit_id,
            "weights_version": g.weights_version,
            "query": g.challenger.as_ref().map(|c| &c.text),
            "answers": g.answers.iter().map(|a| serde_json::json!({
                "text": a.sequence.text,
                "tokens": a.sequence.completion_ids.len(),
                "reward": a.reward,
                "self_reward": a.self_reward,
            })).collect::<Vec<_>>(),
        });
        text.push_str(&format!("{line}\n"));
    }
    append_lines(&out_dir.join(SAMPLE_LOG), &text);
}

fn append_lines(path: &Path, text: &str) {
    use std::io::Write;
    let res =
        std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "cannot append to a run log");
    }
}

/// After a resume, drops the logged steps the checkpoint does not contain (they will run again).
fn truncate_step_logs(out_dir: &Path, step: u64) {
    truncate_log(&out_dir.join(STEP_LOG), step, |v| v["stats"]["step"].as_u64());
    truncate_log(&out_dir.join(SAMPLE_LOG), step, |v| v["step"].as_u64());
}

fn truncate_log(path: &Path, step: u64, step_of: impl Fn(&serde_json::Value) -> Option<u64>) {
    let Ok(text) = std::fs::read_to_string(path) else { return };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| step_of(&v)).is_some_and(|s| s <= step)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    // Replaced as a whole (temporary file, fsync, rename): a crash here leaves the old log or
    // the new one, never a torn file.
    if let Err(e) = selfplay_coordinator::persist::write_atomic(path, out.as_bytes()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot rewrite a run log");
    }
}

/// The run id: `run.id` from the config, else the one this output directory was started with
/// (`<out_dir>/run.json`), else a new one, written there before anything else happens.
pub fn resolve_run_id(cfg: &Config) -> Result<String, LearnerError> {
    let path = cfg.run.out_dir.join("run.json");
    let saved = match std::fs::read(&path) {
        Ok(bytes) => Some(
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .ok_or_else(|| LearnerError::Run(format!("{} is not a run file", path.display())))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(LearnerError::Run(format!("{}: {e}", path.display()))),
    };
    match (cfg.run.id.as_str(), saved) {
        ("", Some(id)) => Ok(id),
        (want, Some(id)) if want == id => Ok(id),
        (want, Some(id)) => Err(LearnerError::Run(format!(
            "run.id is {want:?} but {} belongs to run {id:?}: choose another run.out_dir",
            cfg.run.out_dir.display()
        ))),
        (want, None) => {
            let id = if want.is_empty() {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                format!(
                    "run-{:x}-{:08x}",
                    t.as_secs(),
                    selfplay_proto::unit::mix(t.as_nanos() as u64 ^ u64::from(std::process::id())) as u32
                )
            } else {
                want.to_string()
            };
            std::fs::create_dir_all(&cfg.run.out_dir)
                .map_err(|e| LearnerError::Run(format!("{}: {e}", cfg.run.out_dir.display())))?;
            selfplay_coordinator::persist::write_atomic(&path, serde_json::json!({ "id": id }).to_string().as_bytes())
                .map_err(|e| LearnerError::Run(format!("{}: {e}", path.display())))?;
            Ok(id)
        }
    }
}

/// Runs the learner until `cfg.run.steps` steps are done (0 = forever) or `shutdown`
/// resolves; then writes a final checkpoint. `on_step` sees every step's statistics.
pub async fn run(
    cfg: Config,
    opts: LearnerOptions,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_step: impl FnMut(&StepStats) + Send + 'static,
) -> Result<LearnerSummary, LearnerError> {
    opts.validate()?;
    if opts.max_policy_lag > 0 && cfg.loss.importance_cap == 0.0 {
        // Stale groups then train as if on-policy: the gradient is biased by the lag.
        tracing::warn!(
            max_policy_lag = opts.max_policy_lag,
            "asynchronous run with loss.importance_cap = 0: groups sampled by older weights get no \
             importance correction (set loss.importance_cap, e.g. 2, to weight them by min(pi/mu, c))"
        );
    }
    metrics::describe_metrics();
    let out_dir = cfg.run.out_dir.clone();
    let prompts = if cfg.game.mode == selfplay_game::Mode::Grpo {
        selfplay_game::data::load_prompts(&cfg.game.prompts_file)?
    } else {
        vec![]
    };

    // One learner per output directory: a second one (a frozen predecessor come back, a
    // second pod on the same volume) would interleave checkpoints and step logs.
    std::fs::create_dir_all(&out_dir).map_err(|e| LearnerError::Run(format!("{}: {e}", out_dir.display())))?;
    let lock_path = out_dir.join("LOCK");
    let out_lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| LearnerError::Run(format!("{}: {e}", lock_path.display())))?;
    if let Err(e) = out_lock.try_lock() {
        return Err(LearnerError::Run(format!(
            "{} is in use by another learner ({}): {e}",
            out_dir.display(),
            lock_path.display()
        )));
    }

    // Load (or resume) off the reactor: this reads hundreds of megabytes. A checkpoint that
    // cannot be loaded (damaged outside selfplay's control) falls back to the one before it.
    let candidates = if opts.resume { checkpoints_newest_first(&out_dir) } else { Vec::new() };
    let (cfg2, device) = (cfg.clone(), opts.device);
    let (init_from, keep_optimizer) = (opts.init_from.clone(), opts.keep_optimizer);
    let (trainer, extra, resumed_from) = tokio::task::spawn_blocking(move || -> Result<_, LearnerError> {
        for dir in candidates {
            tracing::info!(checkpoint = %dir.display(), "resuming");
            match Trainer::resume(&dir, Some(cfg2.clone()), device) {
                Ok((t, extra)) => return Ok((t, extra, Some(dir))),
                Err(e) => tracing::error!(checkpoint = %dir.display(), error = %e, "cannot resume from this checkpoint; trying the one before"),
            }
        }
        if let Some(dir) = &init_from {
            tracing::info!(checkpoint = %dir.display(), keep_optimizer, "a new run from a checkpoint's weights");
            let t = Trainer::init_from(dir, cfg2.clone(), device, keep_optimizer)?;
            // The actors build the model from model.path and then load these weights into it.
            let want = selfplay_policy::ModelConfig::from_file(&cfg2.model.path.join("config.json"))?;
            let shape = |c: &selfplay_policy::ModelConfig| {
                let heads = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
                (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, heads, c.tie_word_embeddings)
            };
            if shape(&want) != shape(t.policy.model.config()) {
                return Err(LearnerError::Run(format!(
                    "--init-from {}: its model is not the architecture of model.path {} (the actors build that one and load these weights into it)",
                    dir.display(),
                    cfg2.model.path.display()
                )));
            }
            return Ok((t, serde_json::Value::Null, None));
        }
        let kind = cfg2.kind_on(device)?;
        let policy = selfplay_policy::Policy::load(&cfg2.model.path, device, kind)?;
        Ok((Trainer::new(policy, cfg2)?, serde_json::Value::Null, None))
    })
    .await
    .map_err(|e| LearnerError::Thread(e.to_string()))??;

    // Learner ranks: the others start where this one did, then every rank joins the group.
    let trainer = match opts.ranks.clone().filter(|l| l.world_size > 1) {
        None => RankedTrainer::alone(trainer),
        Some(launch) => {
            let start = match (resumed_from, &opts.init_from) {
                (Some(dir), _) => Start::Resume(dir),
                (None, Some(dir)) => Start::InitFrom { dir: dir.clone(), keep_optimizer: opts.keep_optimizer },
                (None, None) => Start::Fresh,
            };
            tokio::task::spawn_blocking(move || -> Result<RankedTrainer, LearnerError> {
                tracing::info!(world_size = launch.world_size, master = %format!("{}:{}", launch.master_addr, launch.master_port), "waiting for the other learner ranks");
                let store = ranks::rendezvous(&launch, ranks::RANK_TIMEOUT)?;
                ranks::announce_start(&store, &start)?;
                let trainer = ranks::join_group(&launch, trainer, &store, ranks::RANK_TIMEOUT)?;
                tracing::info!(world_size = launch.world_size, "learner ranks joined");
                Ok(ranks::lead(trainer, store))
            })
            .await
            .map_err(|e| LearnerError::Thread(e.to_string()))??
        }
    };
    let run_id = resolve_run_id(&cfg)?;
    // The newest epoch this output directory has seen: the checkpoint's, or the one recorded
    // at every BeginEpoch (a coordinator that lost its state must not hand out an epoch
    // number a dead timeline already used).
    let last_epoch = extra.get("epoch").and_then(|v| v.as_u64()).unwrap_or(0).max(read_epoch(&out_dir));
    truncate_step_logs(&out_dir, trainer.step);
    let mut inbox = Inbox::new(trainer.step, opts.max_policy_lag, cfg.game.queries_per_step, trainer.limits());
    if let Some(ids) = extra.get("consumed").and_then(|c| c.as_array()) {
        inbox.consumed = ids.iter().filter_map(|v| v.as_str().map(str::to_string)).collect();
    }
    inbox.consumed_floor = extra.get("consumed_floor").and_then(|v| v.as_u64()).unwrap_or(0);
    let shared = Arc::new(Shared { inbox: Mutex::new(inbox), ready: Condvar::new() });

    // The gRPC server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let svc = LearnerService { shared: shared.clone(), tickets: LeaseTickets::new(opts.credential.clone()) };
    let mut verifier =
        Verifier::new().with(Role::Actor, opts.actor.clone()).with(Role::Learner, opts.credential.clone());
    if let Some(op) = &opts.operator {
        verifier = verifier.with(Role::Operator, op.clone());
    }
    verifier.check_distinct().map_err(|e| LearnerError::Options(e.to_string()))?;
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<LearnerServer<LearnerService>>().await;
    // The same transport settings as the coordinator's (keepalive, windows, frame size): the
    // learner receives every rollout.
    let tls = opts.tls.clone().map(|(cert, key)| selfplay_proto::server::TlsFiles { cert, key });
    let mut builder = selfplay_proto::server::builder(tls.as_ref()).map_err(|e| LearnerError::Server(e.to_string()))?;
    let server = builder
        .add_service(health_svc)
        .add_service(RoleGuard::new(
            LearnerServer::new(svc)
                .max_decoding_message_size(selfplay_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(selfplay_proto::MAX_MESSAGE_BYTES),
            verifier,
            &LEARNER_SERVICE,
        ))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            {
                let mut rx = stop_rx.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            },
        );
    let server = tokio::spawn(server);

    let client =
        connect_coordinator(&opts.coordinator, &opts.credential, opts.tls_ca.as_deref(), Duration::from_secs(60))
            .await?;
    let stopping = Arc::new(AtomicBool::new(false));
    {
        let (shared, stopping, stop_tx) = (shared.clone(), stopping.clone(), stop_tx.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown => {}
                _ = async { let mut rx = stop_tx.subscribe(); let _ = rx.wait_for(|s| *s).await; } => {}
            }
            stopping.store(true, Ordering::SeqCst);
            shared.ready.notify_all();
        });
    }

    let rt = tokio::runtime::Handle::current();
    let max_steps = cfg.run.steps;
    let bound = {
        let f32_wire = match opts.wire_dtype.as_str() {
            "f32" => true,
            "bf16" => false,
            _ => trainer.policy.model.kind() == Kind::Float,
        };
        cfg.learner.mismatch_bound(&cfg.model.dtype, f32_wire && trainer.policy.model.kind() == Kind::Float)
    };
    // Synchronous mode only: there every group was sampled by the learner's own weights, so
    // its behaviour log-probs must match the learner's up to numerical noise.
    let mismatch_bound = (opts.max_policy_lag == 0).then_some(bound);
    if let Some(bound) = mismatch_bound {
        tracing::debug!(bound, "groups whose log-probs disagree with the learner's by more than this (mean nats per token) are refused as corrupt");
    }
    let (ref_fraction, ref_kind) = (cfg.learner.reference_check_fraction, trainer.policy.model.kind());
    let mut runner = Runner {
        cfg: cfg.clone(),
        opts: opts.clone(),
        client,
        rt,
        prompts,
        last_published: 0,
        opened_upto: None,
        epoch: last_epoch,
        run_id,
    };
    let thread_shared = shared.clone();
    let thread_stopping = stopping.clone();
    let mut on_step = on_step;
    let handle = std::thread::Builder::new()
        .name("learner-train".into())
        .spawn(move || -> Result<LearnerSummary, LearnerError> {
            let mut trainer = trainer;
            let shared = thread_shared;
            let reference_check = ReferenceCheck::load(&runner.cfg, ref_fraction, opts.device, ref_kind, bound)?;
            runner.begin_epoch(&trainer, &shared)?;
            // Loaded, serving, and the coordinator knows this learner's epoch and weights.
            selfplay_proto::health::health().ready("learner");
            let (ckpt_root, keep) = (runner.cfg.run.out_dir.clone(), runner.cfg.run.keep_checkpoints);
            let save = |trainer: &mut RankedTrainer| checkpoint(trainer, &shared.inbox, &ckpt_root, keep);
            let mut last = None;
            let mut last_ckpt = None;
            let mut since = Instant::now();
            while max_steps == 0 || trainer.step < max_steps {
                // Wait for N groups (or a stop).
                let wait0 = Instant::now();
                let mut checked = Instant::now();
                let groups = loop {
                    let got = {
                        let mut b = shared.inbox.lock().expect("inbox lock");
                        loop {
                            // Waiting for groups is not a stall.
                            selfplay_proto::health::health().progress("learner", false);
                            if thread_stopping.load(Ordering::SeqCst) {
                                break Some(None);
                            }
                            if let Some(g) = b.take_step() {
                                break Some(Some(g));
                            }
                            if checked.elapsed() >= COORDINATOR_CHECK_EVERY {
                                break None;
                            }
                            b = shared.ready.wait_timeout(b, Duration::from_millis(200)).expect("inbox lock").0;
                        }
                    };
                    match got {
                        Some(g) => break g,
                        None => {
                            runner.resync(&trainer, &shared)?;
                            checked = Instant::now();
                        }
                    }
                };
                let Some(groups) = groups else { break };
                let waited = wait0.elapsed().as_secs_f64();
                let version_before = trainer.step;
                for g in &groups {
                    ::metrics::histogram!("selfplay_learner_staleness_steps")
                        .record(version_before.saturating_sub(g.weights_version) as f64);
                }
                selfplay_proto::health::health().progress("learner", true);
                let wrong_reference = match &reference_check {
                    Some(check) => check.refusals(&groups)?,
                    None => vec![],
                };
                let result = if wrong_reference.is_empty() {
                    trainer.train_step_checked(&groups, mismatch_bound)?
                } else {
                    StepResult::Refused(wrong_reference)
                };
                selfplay_proto::health::health().progress("learner", true);
                let stats = match result {
                    StepResult::Trained(stats) => stats,
                    StepResult::Refused(refused) => {
                        // Nothing was applied: the step is taken again once honest copies of
                        // the refused units are in. Their actors were acknowledged and
                        // reported them done, so their steps are reopened for them to be
                        // played again (the units already here are refused as duplicates).
                        metrics::record_refused(&refused);
                        let bad: Vec<usize> = refused.iter().map(|r| r.index).collect();
                        let steps: std::collections::BTreeSet<u64> =
                            refused.iter().map(|r| groups[r.index].step).collect();
                        shared.inbox.lock().expect("inbox lock").put_back(groups, &bad);
                        let reopen = |runner: &mut Runner| steps.iter().try_for_each(|s| runner.open_step(*s, true));
                        match reopen(&mut runner) {
                            Err(LearnerError::EpochChanged(why)) => {
                                tracing::warn!(%why, "the coordinator refused this learner's epoch");
                                runner.resync(&trainer, &shared)?;
                            }
                            r => r?,
                        }
                        continue;
                    }
                };
                if stats.skipped {
                    ::metrics::counter!("selfplay_learner_steps_skipped_total").increment(1);
                }
                let stale_steps = {
                    let mut b = shared.inbox.lock().expect("inbox lock");
                    // Synchronous: every unit of an older step is consumed or discarded.
                    // Asynchronous: old units can still arrive; consumed ids are kept for the
                    // steps a re-issued unit can still plausibly come from (bounded memory;
                    // an older replay counts as a duplicate and is not trained).
                    let lag = opts.max_policy_lag;
                    let floor = if lag == 0 { trainer.step } else { trainer.step.saturating_sub(4 * (lag + 1)) };
                    b.commit(&groups, trainer.step, floor);
                    b.drop_stale()
                };
                ::metrics::gauge!("selfplay_learner_idle_fraction")
                    .set(waited / since.elapsed().as_secs_f64().max(1e-9));
                since = Instant::now();
                metrics::record_step(&stats);
                log_step(&runner.cfg.run.out_dir, &stats, &groups);
                if runner.cfg.run.log_samples {
                    log_samples(&runner.cfg.run.out_dir, stats.step, &groups);
                }
                on_step(&stats);
                // Publishing and opening are fenced by the epoch: when the coordinator began
                // another one meanwhile (restarted without its state), re-establish it from
                // this state and go on.
                let advance = |runner: &mut Runner| -> Result<(), LearnerError> {
                    if trainer.step % opts.publish_every == 0 {
                        runner.publish(&trainer)?;
                    }
                    if max_steps == 0 || trainer.step < max_steps {
                        runner.open_window(trainer.step, false)?;
                        // Asynchronous only: a synchronous learner holds groups of its current
                        // step alone, which never go stale.
                        if opts.max_policy_lag > 0 {
                            for s in &stale_steps {
                                runner.open_step(*s, true)?;
                            }
                        }
                    }
                    Ok(())
                };
                match advance(&mut runner) {
                    Err(LearnerError::EpochChanged(why)) => {
                        tracing::warn!(%why, "the coordinator refused this learner's epoch");
                        runner.resync(&trainer, &shared)?;
                    }
                    r => r?,
                }
                let every = runner.cfg.run.checkpoint_every;
                if every > 0 && trainer.step % every == 0 {
                    last_ckpt = Some(save(&mut trainer)?);
                }
                last = Some(stats);
            }
            // Final checkpoint (also on Ctrl-C), unless this step was just written.
            let final_dir = runner.cfg.run.out_dir.join("checkpoints").join(format!("step-{:08}", trainer.step));
            // A checkpoint of this very step already on disk (a resumed learner that stops
            // before training) holds these weights: never rewrite it in place.
            if trainer.step > 0 && last_ckpt.as_ref() != Some(&final_dir) && !final_dir.join("trainer.json").exists() {
                last_ckpt = Some(save(&mut trainer)?);
            }
            trainer.stop()?;
            Ok(LearnerSummary { steps: trainer.step, last, checkpoint: last_ckpt })
        })
        .map_err(|e| LearnerError::Thread(e.to_string()))?;

    let result = tokio::task::spawn_blocking(move || handle.join())
        .await
        .map_err(|e| LearnerError::Thread(e.to_string()))?
        .map_err(|_| LearnerError::Thread("the training thread panicked".into()))?;
    let _ = stop_tx.send(true);
    let _ = server.await;
    result
}

/// A learner rank other than 0: meets rank 0, starts where it started (a checkpoint on a
/// filesystem both see, an --init-from directory, or model.path), joins the process group and
/// does each step, checkpoint and stop that rank 0 posts. It serves nothing: actors and the
/// coordinator only ever see rank 0. Returns the number of steps trained.
pub fn follow_rank(cfg: Config, opts: &LearnerOptions) -> Result<u64, LearnerError> {
    let launch = opts.ranks.clone().filter(|l| l.rank > 0).ok_or_else(|| {
        LearnerError::Options("follow_rank is for learner ranks 1..WORLD_SIZE-1 (rank 0 runs the learner)".into())
    })?;
    tracing::info!(rank = launch.rank, world_size = launch.world_size, "learner rank waiting for rank 0");
    let store = ranks::rendezvous(&launch, ranks::RANK_TIMEOUT)?;
    let start = ranks::read_start(&store)?;
    tracing::info!(rank = launch.rank, ?start, "learner rank starting");
    let trainer = match &start {
        Start::Fresh => {
            let policy = selfplay_policy::Policy::load(&cfg.model.path, opts.device, cfg.kind_on(opts.device)?)?;
            Trainer::new(policy, cfg)?
        }
        Start::Resume(dir) => Trainer::resume(dir, Some(cfg), opts.device)?.0,
        Start::InitFrom { dir, keep_optimizer } => Trainer::init_from(dir, cfg, opts.device, *keep_optimizer)?,
    };
    let trainer = ranks::join_group(&launch, trainer, &store, ranks::RANK_TIMEOUT)?;
    let mut steps = 0;
    ranks::follow(trainer, store, |t| {
        steps = t.step;
        selfplay_proto::health::health().progress("learner", true);
    })?;
    tracing::info!(rank = launch.rank, steps, "learner rank done");
    Ok(steps)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reference_check_picks_its_share_of_units_by_seed_and_id() {
        let ids: Vec<String> = (0..4000).map(|i| format!("s{}-u{}", i / 8, i % 8)).collect();
        let picked = |seed, f| ids.iter().filter(|id| super::reference_check_selects(seed, f, id)).count();
        assert_eq!(picked(1, 0.0), 0);
        assert_eq!(picked(1, 1.0), ids.len());
        let quarter = picked(1, 0.25);
        assert!((900..1100).contains(&quarter), "{quarter}");
        // Fixed per (seed, id); another seed picks other units.
        assert_eq!(quarter, picked(1, 0.25));
        let same = ids
            .iter()
            .filter(|id| super::reference_check_selects(1, 0.25, id) == super::reference_check_selects(2, 0.25, id))
            .count();
        assert!(same < ids.len());
    }
}
