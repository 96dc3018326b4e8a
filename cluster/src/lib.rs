//! Every role of a run in one process, on 127.0.0.1 with ports chosen by the OS: a
//! coordinator, a learner and A actors (each on its own thread, with its own policy and
//! reference model, playing K units at once). `selfplay train` is this plus flags, and the
//! in-process tests drive it directly.
//!
//! Devices ([`plan_devices`]): the learner takes the configured device; on a machine with
//! several CUDA devices, one actor runs on each of the others; otherwise one actor shares the
//! learner's device. `--actors` and `--actor-devices` override both.
//!
//! Weights: the learner publishes every version to the coordinator (which records it for
//! actors in other processes and for restarts) and also leaves it in an
//! [`InProcessWeights`] handle on its device; the actors of this process copy it from there
//! device to device instead of fetching it over gRPC.
use selfplay_game::{Config, Player, StepStats};
use selfplay_learner::{LearnerError, LearnerSummary};
use selfplay_policy::InProcessWeights;
use selfplay_proto::auth::Credential;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster options: {0}")]
    Options(String),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(transparent)]
    Learner(#[from] LearnerError),
    #[error("coordinator: {0}")]
    Coordinator(String),
    #[error("every actor stopped, so the run cannot go on: {}", .0.join("; "))]
    ActorsStopped(Vec<String>),
    #[error("{0} stopped unexpectedly: {1}")]
    Panicked(&'static str, String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// Where the learner and each actor run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePlan {
    pub learner: Device,
    /// One entry per actor.
    pub actors: Vec<Device>,
}

/// The devices of a local run. `learner` is the configured device; `cuda_devices` how many
/// CUDA devices libtorch sees; `actors` and `actor_devices` what the user asked for (None:
/// the default).
///
/// - Given devices: one actor per device listed, or `actors` actors round-robin over them.
/// - Else, on CUDA with more than one device: one actor on each device but the learner's
///   (`actors` of them round-robin, when given).
/// - Else: `actors` (default 1) on the learner's device. On a CPU they share its cores with
///   the learner; in synchronous mode the learner waits while the actors play and the other
///   way round, so one actor keeps the cores busy.
pub fn plan_devices(
    learner: Device,
    cuda_devices: usize,
    actors: Option<usize>,
    actor_devices: &[Device],
) -> Result<DevicePlan, ClusterError> {
    if actors == Some(0) {
        return Err(ClusterError::Options("--actors must be at least 1".into()));
    }
    for d in actor_devices {
        if let Device::Cuda(i) = d {
            if *i >= cuda_devices {
                return Err(ClusterError::Options(format!(
                    "actor device cuda:{i}: {cuda_devices} CUDA device(s) visible to libtorch"
                )));
            }
        }
    }
    let pool: Vec<Device> = if !actor_devices.is_empty() {
        actor_devices.to_vec()
    } else {
        match learner {
            Device::Cuda(l) if cuda_devices > 1 => (0..cuda_devices).filter(|&i| i != l).map(Device::Cuda).collect(),
            d => vec![d],
        }
    };
    let n = actors.unwrap_or(if actor_devices.is_empty() { pool.len() } else { actor_devices.len() });
    Ok(DevicePlan { learner, actors: (0..n).map(|i| pool[i % pool.len()]).collect() })
}

/// What a local run needs beyond its configuration.
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    /// The run; `model.path` must name the model directory.
    pub cfg: Config,
    pub devices: DevicePlan,
    /// Continue from the newest checkpoint in `run.out_dir` (and the coordinator's state).
    pub resume: bool,
    /// 0 = synchronous on-policy; k > 0 = asynchronous, groups up to k versions old.
    pub max_policy_lag: u64,
    /// Dtype of weights on the wire: auto, f32 or bf16.
    pub wire_dtype: String,
    /// One credential per role, made fresh for the run and held in memory: the learner's and
    /// the actors'. Nothing outside the process can call the roles without them.
    pub learner_credential: Credential,
    pub actor_credential: Credential,
    /// How long an actor waits for an unreachable coordinator or learner before giving up.
    pub patience: Duration,
    /// Start a new run from this checkpoint's weights (a staged schedule), with its AdamW
    /// state when `keep_optimizer` is set.
    pub init_from: Option<std::path::PathBuf>,
    pub keep_optimizer: bool,
    /// Each actor reports the SHA-256 of the weights it ended with (tests and audits).
    pub digest_weights: bool,
}

impl LocalClusterOptions {
    pub fn new(cfg: Config, devices: DevicePlan) -> Self {
        LocalClusterOptions {
            cfg,
            devices,
            resume: false,
            max_policy_lag: 0,
            wire_dtype: "auto".into(),
            learner_credential: Credential::generate(),
            actor_credential: Credential::generate(),
            patience: Duration::from_secs(120),
            init_from: None,
            keep_optimizer: false,
            digest_weights: false,
        }
    }
}

/// How a local run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub learner: LearnerSummary,
    /// Each actor's summary, or why it stopped, in the order of [`DevicePlan::actors`].
    pub actors: Vec<Result<selfplay_actor::ActorSummary, String>>,
}

type ActorThread = std::thread::JoinHandle<Result<selfplay_actor::ActorSummary, String>>;

/// A running local cluster. Start it inside a multi-threaded tokio runtime; [`Self::run`]
/// waits for its end.
pub struct LocalCluster {
    pub coordinator_addr: String,
    pub learner_addr: String,
    /// Actor ids, in the order of [`DevicePlan::actors`].
    pub actor_ids: Vec<String>,
    /// The learner's weights as the actors of this process copy them.
    pub in_process: Arc<InProcessWeights>,
    stop: Arc<AtomicBool>,
    coordinator: tokio::task::JoinHandle<Result<(), selfplay_coordinator::CoordinatorError>>,
    coordinator_stop: tokio::sync::oneshot::Sender<()>,
    learner: tokio::task::JoinHandle<Result<LearnerSummary, LearnerError>>,
    learner_stop: tokio::sync::oneshot::Sender<()>,
    actors: Vec<ActorThread>,
    failed: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl LocalCluster {
    /// Starts the coordinator and the learner on loopback and the actors on their threads.
    /// `on_step` sees every training step.
    pub async fn start(
        opts: LocalClusterOptions,
        on_step: impl FnMut(&StepStats) + Send + 'static,
    ) -> Result<LocalCluster, ClusterError> {
        let LocalClusterOptions {
            cfg,
            devices,
            resume,
            max_policy_lag,
            wire_dtype,
            learner_credential,
            actor_credential,
            patience,
            init_from,
            keep_optimizer,
            digest_weights,
        } = opts;
        if devices.actors.is_empty() {
            return Err(ClusterError::Options("a local run needs at least one actor".into()));
        }
        let health = selfplay_proto::health::health();
        for role in ["learner", "coordinator", "actor"] {
            health.expect(role);
        }
        let out_dir = cfg.run.out_dir.clone();
        std::fs::create_dir_all(&out_dir).map_err(io(format!("creating {}", out_dir.display())))?;
        selfplay_coordinator::describe_metrics();

        let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(io("binding 127.0.0.1")) };
        let coord_listener = bind().await?;
        let coordinator_addr = format!("http://{}", coord_listener.local_addr().map_err(io("coordinator address"))?);
        let ccfg = selfplay_coordinator::CoordinatorConfig {
            state_dir: out_dir.join("coordinator"),
            run_seed: cfg.run.seed,
            credentials: Some(selfplay_coordinator::CoordinatorCredentials {
                learner: learner_credential.clone(),
                actor: actor_credential.clone(),
                operator: None,
            }),
            ..Default::default()
        };
        if !resume {
            let _ = std::fs::remove_dir_all(&ccfg.state_dir);
        }
        let (coordinator_stop, coord_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let coordinator = tokio::spawn(selfplay_coordinator::serve(ccfg, coord_listener, async move {
            let _ = coord_stop_rx.await;
        }));

        let in_process = Arc::new(InProcessWeights::new(snapshot_kind(&cfg, &devices)?));
        let learner_listener = bind().await?;
        let learner_addr = format!("http://{}", learner_listener.local_addr().map_err(io("learner address"))?);
        let lopts = selfplay_learner::LearnerOptions {
            coordinator: coordinator_addr.clone(),
            credential: learner_credential.clone(),
            actor: actor_credential.clone(),
            operator: None,
            max_policy_lag,
            publish_every: 1,
            wire_dtype,
            device: devices.learner,
            resume,
            tls: None,
            tls_ca: None,
            init_from,
            keep_optimizer,
            in_process: Some(in_process.clone()),
            ranks: None,
        };
        let (learner_stop, learner_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let learner = tokio::spawn(selfplay_learner::run(
            cfg.clone(),
            lopts,
            learner_listener,
            async move {
                let _ = learner_stop_rx.await;
            },
            on_step,
        ));

        // Actors: each on its own thread with its own policy and reference model. The initial
        // weights are the model on disk (version 0); a resumed run fetches the latest version.
        let stop = Arc::new(AtomicBool::new(false));
        let (failed_tx, failed) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut actors = vec![];
        let mut actor_ids = vec![];
        for (i, &dev) in devices.actors.iter().enumerate() {
            let actor_id = format!("local-{i}");
            let opts = selfplay_actor::ActorOptions {
                run_id: String::new(),
                coordinator: coordinator_addr.clone(),
                learner: learner_addr.clone(),
                credential: actor_credential.clone(),
                actor_id: actor_id.clone(),
                patience,
                tls_ca: None,
                units_in_flight: cfg.actor.units_for(dev),
                in_process: Some(in_process.clone()),
                digest_weights,
            };
            actor_ids.push(actor_id.clone());
            let (cfg, stop, rt, failed_tx) =
                (cfg.clone(), stop.clone(), tokio::runtime::Handle::current(), failed_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("actor-{i}"))
                .spawn(move || {
                    let played = (|| -> Result<_, String> {
                        let kind = cfg.kind_on(dev).map_err(|e| e.to_string())?;
                        let policy =
                            selfplay_policy::Policy::load(&cfg.model.path, dev, kind).map_err(|e| e.to_string())?;
                        let player = Player::new(policy, None, cfg.clone()).map_err(|e| e.to_string())?;
                        selfplay_actor::run(player, opts, rt, stop).map_err(|e| e.to_string())
                    })();
                    if let Err(e) = &played {
                        tracing::error!(actor = %actor_id, error = %e, "actor stopped");
                        let _ = failed_tx.send(format!("{actor_id}: {e}"));
                    }
                    played
                })
                .map_err(io("starting an actor thread"))?;
            actors.push(thread);
        }
        Ok(LocalCluster {
            coordinator_addr,
            learner_addr,
            actor_ids,
            in_process,
            stop,
            coordinator,
            coordinator_stop,
            learner,
            learner_stop,
            actors,
            failed,
        })
    }

    /// Runs until the learner has taken its steps, `shutdown` resolves (the learner stops at
    /// a clean point), or every actor stopped with an error (then the run stops with their
    /// errors instead of waiting forever for rollouts). Actors finish their units and leave;
    /// a unit cut short is re-issued on resume.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<RunSummary, ClusterError> {
        let LocalCluster { stop, coordinator, coordinator_stop, mut learner, learner_stop, actors, mut failed, .. } =
            self;
        let n_actors = actors.len();
        let mut failures: Vec<String> = vec![];
        let mut learner_stop = Some(learner_stop);
        tokio::pin!(shutdown);
        let mut shutting_down = false;
        let result = loop {
            tokio::select! {
                r = &mut learner => break r,
                _ = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    selfplay_proto::health::health().stopping();
                    if let Some(tx) = learner_stop.take() {
                        let _ = tx.send(());
                    }
                }
                Some(failure) = failed.recv() => {
                    failures.push(failure);
                    if failures.len() == n_actors {
                        selfplay_proto::health::health().stopping();
                        if let Some(tx) = learner_stop.take() {
                            let _ = tx.send(());
                        }
                        break (&mut learner).await;
                    }
                }
            }
        };
        stop.store(true, Ordering::SeqCst);
        if failures.len() == n_actors {
            let _ = coordinator_stop.send(());
            let _ = coordinator.await;
            return Err(ClusterError::ActorsStopped(failures));
        }
        let learner = result.map_err(|e| ClusterError::Panicked("the learner", e.to_string()))??;
        let mut summaries = Vec::with_capacity(actors.len());
        for a in actors {
            let joined = tokio::task::spawn_blocking(move || a.join()).await;
            summaries.push(match joined {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the actor thread panicked".into()),
                Err(e) => Err(e.to_string()),
            });
        }
        let _ = coordinator_stop.send(());
        match coordinator.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(ClusterError::Coordinator(e.to_string())),
            Err(e) => return Err(ClusterError::Panicked("the coordinator", e.to_string())),
        }
        Ok(RunSummary { learner, actors: summaries })
    }
}

/// The dtype of the learner's snapshot for the actors: theirs when they agree (the copy on
/// the learner's device is then the smaller one, and conversion happens once per version),
/// else the learner's.
fn snapshot_kind(cfg: &Config, devices: &DevicePlan) -> Result<tch::Kind, ClusterError> {
    let kind = |d: Device| cfg.kind_on(d).map_err(|e| ClusterError::Options(e.to_string()));
    let actors = devices.actors.iter().map(|&d| kind(d)).collect::<Result<Vec<_>, _>>()?;
    match actors.split_first() {
        Some((k, rest)) if rest.iter().all(|r| r == k) => Ok(*k),
        _ => kind(devices.learner),
    }
}

/// The newest checkpoint of a run directory (re-exported for callers that check before
/// starting).
pub fn latest_checkpoint(out_dir: &std::path::Path) -> Option<PathBuf> {
    selfplay_learner::latest_checkpoint(out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_default_to_one_actor_per_other_gpu() {
        let p = plan_devices(Device::Cuda(0), 4, None, &[]).unwrap();
        assert_eq!(p.learner, Device::Cuda(0));
        assert_eq!(p.actors, vec![Device::Cuda(1), Device::Cuda(2), Device::Cuda(3)]);
        // One GPU: the actor shares it; a CPU: one actor on it.
        assert_eq!(plan_devices(Device::Cuda(0), 1, None, &[]).unwrap().actors, vec![Device::Cuda(0)]);
        assert_eq!(plan_devices(Device::Cpu, 0, None, &[]).unwrap().actors, vec![Device::Cpu]);
        // The learner on another GPU than 0.
        assert_eq!(plan_devices(Device::Cuda(1), 2, None, &[]).unwrap().actors, vec![Device::Cuda(0)]);
    }

    #[test]
    fn actors_and_devices_override_the_default() {
        let p = plan_devices(Device::Cpu, 0, Some(3), &[]).unwrap();
        assert_eq!(p.actors, vec![Device::Cpu; 3]);
        let p = plan_devices(Device::Cuda(0), 3, Some(4), &[]).unwrap();
        assert_eq!(p.actors, vec![Device::Cuda(1), Device::Cuda(2), Device::Cuda(1), Device::Cuda(2)]);
        let p = plan_devices(Device::Cuda(0), 2, None, &[Device::Cuda(0), Device::Cuda(1)]).unwrap();
        assert_eq!(p.actors, vec![Device::Cuda(0), Device::Cuda(1)]);
        let p = plan_devices(Device::Cpu, 0, Some(2), &[Device::Cpu]).unwrap();
        assert_eq!(p.actors, vec![Device::Cpu; 2]);
    }

    #[test]
    fn impossible_plans_are_refused() {
        assert!(matches!(plan_devices(Device::Cpu, 0, Some(0), &[]), Err(ClusterError::Options(_))));
        let e = plan_devices(Device::Cpu, 1, None, &[Device::Cuda(1)]).unwrap_err().to_string();
        assert!(e.contains("cuda:1") && e.contains("1 CUDA device"), "{e}");
    }
}
