//! The `selfplay.v1.Coordinator` gRPC service over the [`State`] machine and the
//! [`WeightStore`], and [`serve`], which runs it with health, reflection, auth and TLS.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use selfplay_proto::auth::{Role, Verifier};
use selfplay_proto::guard::{Caller, RoleGuard, COORDINATOR};
use selfplay_proto::ticket::{Lease, LeaseTickets};
use selfplay_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use selfplay_proto::v1::{
    weight_chunk, ActorStatus, BeginEpochRequest, BeginEpochResponse, CompleteWorkRequest, CompleteWorkResponse,
    FetchWeightsRequest, HeartbeatRequest, HeartbeatResponse, JoinRequest, JoinResponse, LeaseWorkRequest,
    LeaseWorkResponse, LeaveRequest, LeaveResponse, OpenStepRequest, OpenStepResponse, PublishWeightsResponse,
    StatusRequest, StatusResponse, WeightChunk, WorkUnit,
};
use selfplay_proto::weights::WeightError;
use selfplay_proto::{MAX_MESSAGE_BYTES, WEIGHT_CHUNK_BYTES};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};

use crate::config::CoordinatorConfig;
use crate::metrics::*;
use crate::persist::{self, TMP_SUFFIX};
use crate::state::{CompleteOutcome, Snapshot, State, StateError, StepSpec};
use crate::weights::{PublishOutcome, WeightStore};
use crate::CoordinatorError;

/// The gRPC name of the service, as the health service reports it.
pub const SERVICE_NAME: &str = "selfplay.v1.Coordinator";

/// The state snapshot inside the state directory.
pub const SNAPSHOT_FILE: &str = "coordinator.json";

/// The weight store inside the state directory.
pub const WEIGHTS_DIR: &str = "weights";

/// Chunks read ahead per FetchWeights stream (memory per stream is about this many chunks).
const FETCH_READ_AHEAD: usize = 2;

impl From<StateError> for Status {
    fn from(e: StateError) -> Self {
        let msg = e.to_string();
        match e {
            StateError::UnknownActor(_)
            | StateError::UnitCountMismatch { .. }
            | StateError::ReopenNeeds { .. }
            | StateError::SupersededEpoch { .. }
            | StateError::OtherRun { .. } => Status::failed_precondition(msg),
            StateError::NoUnits { .. } | StateError::PerUnitCount { .. } | StateError::TooManyUnits { .. } => {
                Status::invalid_argument(msg)
            }
            StateError::EmptyActorId | StateError::TooLong { .. } | StateError::EpochOverflow(_) => {
                Status::invalid_argument(msg)
            }
            StateError::TooManySteps { .. } | StateError::TooManyOpenUnits { .. } | StateError::TooMuchText { .. } => {
                Status::resource_exhausted(msg)
            }
            // Retryable: the id frees itself when the other process's lease runs out.
            StateError::ActorIdInUse(_) => Status::aborted(msg),
            StateError::NotTheMember(_) => Status::permission_denied(msg),
        }
    }
}

/// Records the RPC's duration when dropped.
struct RpcTimer {
    rpc: &'static str,
    start: Instant,
}

impl RpcTimer {
    fn new(rpc: &'static str) -> Self {
        Self { rpc, start: Instant::now() }
    }
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        histogram!(RPC_SECONDS, "rpc" => self.rpc).record(self.start.elapsed().as_secs_f64());
    }
}

fn set_gauges(state: &State) {
    gauge!(ACTORS_ALIVE).set(state.members_alive() as f64);
    gauge!(UNITS_PENDING).set(state.units_pending() as f64);
}

struct Inner {
    state: Mutex<State>,
    weights: WeightStore,
    snapshot_path: PathBuf,
    /// Generation of the state last written to disk; held while writing, so concurrent
    /// writers queue and the first one writes for all (group commit).
    persisted: tokio::sync::Mutex<u64>,
    ttl: Duration,
    retry_after_ms: u64,
    /// Who may call: the role of every accepted credential.
    verifier: Verifier,
    /// Signs the tickets of leases and checks those of completions.
    tickets: LeaseTickets,
    /// An exclusive lock on `<state_dir>/LOCK`, held while the service lives: two
    /// coordinators on one state directory would overwrite each other's state.
    _lock: std::fs::File,
}

/// The lock file inside the state directory.
pub const LOCK_FILE: &str = "LOCK";

/// The Coordinator service. Clones share one state.
#[derive(Clone)]
pub struct CoordinatorService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CoordinatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorService").field("snapshot", &self.inner.snapshot_path).finish_non_exhaustive()
    }
}

fn remove_debris(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl CoordinatorService {
    /// Opens the state directory: loads the snapshot and the weight store when they exist.
    /// Reads the credentials (refusing two roles that share a token).
    pub fn open(config: &CoordinatorConfig) -> Result<Self, CoordinatorError> {
        config.validate()?;
        let credentials = config.resolve_credentials()?;
        let verifier = credentials.verifier()?;
        let tickets = LeaseTickets::new(credentials.learner.clone());
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| CoordinatorError::Io {
            context: format!("create the state directory {}", dir.display()),
            source,
        })?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| CoordinatorError::Io { context: format!("open {}", lock_path.display()), source })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(CoordinatorError::Config(format!(
                    "state_dir {} is in use by another coordinator (it holds {})",
                    dir.display(),
                    lock_path.display()
                )))
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(CoordinatorError::Io { context: format!("lock {}", lock_path.display()), source })
            }
        }
        remove_debris(dir);
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let ttl = config.lease_ttl();
        let now = Instant::now();
        let state = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let snap: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|e| CoordinatorError::Snapshot { path: snapshot_path.clone(), reason: e.to_string() })?;
                if snap.format != 1 {
                    return Err(CoordinatorError::Snapshot {
                        path: snapshot_path,
                        reason: format!("unknown format {}", snap.format),
                    });
                }
                if snap.run_seed != config.run_seed {
                    tracing::warn!(
                        saved = snap.run_seed,
                        configured = config.run_seed,
                        "the state directory holds another run seed; keeping the saved one"
                    );
                }
                let state = State::restore(snap, ttl, now);
                tracing::info!(
                    path = %snapshot_path.display(),
                    steps = state.steps().len(),
                    pending = state.units_pending(),
                    "restored coordinator state"
                );
                state
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::new(config.run_seed, ttl, now),
            Err(source) => {
                return Err(CoordinatorError::Io { context: format!("read {}", snapshot_path.display()), source })
            }
        };
        let weights =
            WeightStore::open(dir.join(WEIGHTS_DIR), config.keep_versions)?.with_max_bytes(config.max_weights_bytes);
        weights.set_fence(state.epoch());
        set_gauges(&state);
        gauge!(WEIGHTS_VERSION).set(weights.latest_version() as f64);
        let generation = state.generation();
        Ok(Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                weights,
                snapshot_path,
                persisted: tokio::sync::Mutex::new(generation),
                ttl,
                retry_after_ms: (ttl.as_millis() as u64 / 20).clamp(20, 250),
                verifier,
                tickets,
                _lock: lock,
            }),
        })
    }

    /// The weight store.
    pub fn weights(&self) -> &WeightStore {
        &self.inner.weights
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a consistent state (every mutation is
        // completed before anything can panic), so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the snapshot unless one at least as new as `generation` is on disk.
    async fn persist_upto(&self, generation: u64) -> Result<(), Status> {
        let mut persisted = self.inner.persisted.lock().await;
        if *persisted >= generation {
            return Ok(());
        }
        let (current, bytes) = {
            let s = self.state();
            (s.generation(), serde_json::to_vec(&s.snapshot()).expect("a snapshot serializes"))
        };
        self.write_snapshot(bytes).await?;
        *persisted = current;
        Ok(())
    }

    /// Writes serialized state to the snapshot file, durably, off the runtime. The caller
    /// holds `persisted`.
    async fn write_snapshot(&self, bytes: Vec<u8>) -> Result<(), Status> {
        let path = self.inner.snapshot_path.clone();
        let written = tokio::task::spawn_blocking(move || persist::write_atomic(&path, &bytes))
            .await
            .map_err(|e| Status::internal(format!("snapshot writer failed: {e}")))?;
        written.map_err(|e| {
            tracing::error!(path = %self.inner.snapshot_path.display(), error = %e, "cannot save the coordinator state");
            Status::internal(format!("cannot save the coordinator state: {e}"))
        })
    }

    /// Writes the current state to disk (used at shutdown).
    pub async fn persist(&self) -> Result<(), Status> {
        let generation = self.state().generation();
        self.persist_upto(generation).await
    }

    /// Drops the actors whose lease expired and re-queues their units; returns their ids.
    pub fn expire_now(&self) -> Vec<String> {
        let expired = {
            let mut s = self.state();
            let e = s.expire(Instant::now());
            set_gauges(&s);
            e
        };
        if !expired.actors.is_empty() {
            counter!(LEASES_EXPIRED).increment(expired.actors.len() as u64);
            tracing::warn!(
                actors = ?expired.actors,
                requeued = expired.requeued,
                "leases expired; their units go back to the front of the queue"
            );
        }
        expired.actors
    }

    /// Runs [`expire_now`](Self::expire_now) every quarter of the lease TTL until every
    /// clone of the service is gone or the task is aborted.
    pub fn spawn_expiry(&self) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        let period = (self.inner.ttl / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                CoordinatorService { inner }.expire_now();
                // The expiry tick is the coordinator's heartbeat: a runtime that stops
                // running it has stalled.
                selfplay_proto::health::health().progress("coordinator", true);
            }
        })
    }

    /// What the `Status` RPC answers.
    pub fn status(&self) -> StatusResponse {
        let now = Instant::now();
        let mut resp = {
            let mut s = self.state();
            let c = s.counters().clone();
            StatusResponse {
                actors: s
                    .members(now)
                    .into_iter()
                    .map(|m| ActorStatus {
                        actor_id: m.actor_id,
                        device: m.device,
                        weights_version: m.weights_version,
                        units: m.units,
                        units_done: m.units_done,
                        last_heartbeat_age_s: m.last_heartbeat_age.as_secs_f64(),
                    })
                    .collect(),
                open_step: s.latest_step(),
                units_pending: s.units_pending() as u32,
                units_leased: s.units_leased() as u32,
                units_issued_total: c.units_issued,
                units_reissued_total: c.units_reissued,
                units_done_total: c.units_done,
                weight_versions: Vec::new(),
                units_per_second: s.throughput(now),
                epoch: s.epoch(),
                run_id: s.run_id().to_string(),
                latest_weights_epoch: 0,
            }
        };
        resp.weight_versions = self.inner.weights.versions();
        resp.latest_weights_epoch = self.inner.weights.get(0).map(|v| v.manifest().epoch).unwrap_or(0);
        resp
    }

    /// The service wrapped for a tonic server: explicit message size limits and the role
    /// check ([`COORDINATOR`]).
    pub fn into_server(self) -> RoleGuard<CoordinatorServer<CoordinatorService>> {
        let verifier = self.inner.verifier.clone();
        RoleGuard::new(
            CoordinatorServer::new(self)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            verifier,
            &COORDINATOR,
        )
    }

    /// A refusal of a request in another actor's name, logged and counted.
    fn denied(&self, rpc: &'static str, actor: &str, why: impl Into<Status>) -> Status {
        tracing::warn!(rpc, actor, "refused a request about another actor's membership or lease");
        COORDINATOR.count_denied(Role::Actor, rpc);
        why.into()
    }

    /// Refuses `rpc` when it names a member that another client instance joined as.
    fn check_member<T>(&self, rpc: &'static str, request: &Request<T>, actor: &str) -> Result<(), Status> {
        let instance = instance_of(request)?;
        let checked = self.state().check_member(actor, &instance);
        checked.map_err(|e| self.denied(rpc, actor, e))
    }
}

/// The caller's client instance id (set by the role guard from the `selfplay-instance`
/// header); actors must send one.
fn instance_of<T>(request: &Request<T>) -> Result<String, Status> {
    Caller::of(request).and_then(|c| c.instance.clone()).ok_or_else(|| {
        Status::invalid_argument(format!(
            "the {} header (1..={} bytes) is required",
            selfplay_proto::auth::INSTANCE_HEADER,
            selfplay_proto::auth::MAX_INSTANCE_BYTES
        ))
    })
}

/// The most unit ids a LeaseWork may list as held.
pub const MAX_HOLDING: usize = 4096;

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("worker task failed: {e}"))
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let _t = RpcTimer::new("Join");
        let instance = instance_of(&request)?;
        let req = request.into_inner();
        let rejoined = {
            let mut s = self.state();
            if !req.run_id.is_empty() && !s.run_id().is_empty() && s.run_id() != req.run_id {
                return Err(StateError::OtherRun { ours: s.run_id().to_string(), theirs: req.run_id }.into());
            }
            let r = s.join(&req.actor_id, &req.device, &instance, Instant::now())?;
            set_gauges(&s);
            r
        };
        tracing::info!(actor = %req.actor_id, device = %req.device, rejoined, "actor joined");
        Ok(Response::new(JoinResponse {
            lease_ttl_ms: self.inner.ttl.as_millis() as u64,
            latest_weights_version: self.inner.weights.latest_version(),
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let _t = RpcTimer::new("Heartbeat");
        self.check_member("Heartbeat", &request, &request.get_ref().actor_id)?;
        let req = request.into_inner();
        let known = self.state().heartbeat(&req.actor_id, req.weights_version, Instant::now());
        if !known {
            tracing::debug!(actor = %req.actor_id, "heartbeat from an unknown actor; it must join again");
        }
        Ok(Response::new(HeartbeatResponse { latest_weights_version: self.inner.weights.latest_version(), known }))
    }

    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        let _t = RpcTimer::new("Leave");
        self.check_member("Leave", &request, &request.get_ref().actor_id)?;
        let req = request.into_inner();
        let requeued = {
            let mut s = self.state();
            let r = s.leave(&req.actor_id);
            set_gauges(&s);
            r
        };
        tracing::info!(actor = %req.actor_id, ?requeued, "actor left");
        Ok(Response::new(LeaveResponse {}))
    }

    async fn lease_work(&self, request: Request<LeaseWorkRequest>) -> Result<Response<LeaseWorkResponse>, Status> {
        let _t = RpcTimer::new("LeaseWork");
        if request.get_ref().holding.len() > MAX_HOLDING {
            return Err(Status::invalid_argument(format!(
                "holding lists {} units; the limit is {MAX_HOLDING}",
                request.get_ref().holding.len()
            )));
        }
        self.check_member("LeaseWork", &request, &request.get_ref().actor_id)?;
        let req = request.into_inner();
        let unit = {
            let mut s = self.state();
            let (u, released) = if req.holding_listed {
                s.lease_holding(&req.actor_id, &req.holding, Instant::now())?
            } else {
                (s.lease(&req.actor_id, Instant::now())?, 0)
            };
            if released > 0 {
                tracing::warn!(actor = %req.actor_id, released, "units leased to an actor that no longer holds them went back to the queue");
            }
            set_gauges(&s);
            u
        };
        let Some(u) = unit else {
            return Ok(Response::new(LeaseWorkResponse { unit: None, retry_after_ms: self.inner.retry_after_ms }));
        };
        counter!(UNITS_ISSUED).increment(1);
        if u.reissue {
            counter!(UNITS_REISSUED).increment(1);
        }
        tracing::debug!(actor = %req.actor_id, unit = %u.unit_id, reissue = u.reissue, "unit leased");
        let ticket = self.inner.tickets.sign(&Lease {
            unit_id: &u.unit_id,
            epoch: u.epoch,
            incarnation: u.incarnation,
            actor_id: &req.actor_id,
        });
        Ok(Response::new(LeaseWorkResponse {
            unit: Some(WorkUnit {
                ticket,
                unit_id: u.unit_id,
                step: u.step,
                seed: u.seed,
                min_weights_version: u.min_weights_version,
                task: u.task,
                template: String::new(),
                prompt: u.prompt,
                epoch: u.epoch,
                incarnation: u.incarnation,
            }),
            retry_after_ms: 0,
        }))
    }

    async fn complete_work(
        &self,
        request: Request<CompleteWorkRequest>,
    ) -> Result<Response<CompleteWorkResponse>, Status> {
        let _t = RpcTimer::new("CompleteWork");
        let req = request.into_inner();
        // Only the actor the unit was leased to holds its ticket: nobody else can report it.
        let incarnation = req.incarnation.or_else(|| LeaseTickets::incarnation(&req.ticket));
        let lease = Lease {
            unit_id: &req.unit_id,
            epoch: req.epoch,
            incarnation: incarnation.unwrap_or(0),
            actor_id: &req.actor_id,
        };
        if !self.inner.tickets.verify(&lease, &req.ticket) {
            return Err(self.denied(
                "CompleteWork",
                &req.actor_id,
                Status::permission_denied(format!(
                    "no valid lease ticket for unit {:?} of actor {:?} (epoch {}, incarnation {:?})",
                    req.unit_id, req.actor_id, req.epoch, incarnation
                )),
            ));
        }
        let (outcome, generation) = {
            let mut s = self.state();
            let o = s.complete_at(&req.actor_id, &req.unit_id, req.done, req.epoch, incarnation, Instant::now());
            set_gauges(&s);
            (o, s.generation())
        };
        match outcome {
            CompleteOutcome::Done => {
                counter!(UNITS_DONE).increment(1);
                tracing::debug!(actor = %req.actor_id, unit = %req.unit_id, "unit done");
                self.persist_upto(generation).await?;
            }
            CompleteOutcome::GivenBack => {
                tracing::info!(actor = %req.actor_id, unit = %req.unit_id, "unit given back");
            }
            CompleteOutcome::Superseded => {
                tracing::info!(actor = %req.actor_id, unit = %req.unit_id, epoch = req.epoch, "completion of a superseded learner epoch refused");
                let current = self.state().epoch();
                return Err(StateError::SupersededEpoch { got: req.epoch, current }.into());
            }
            other => {
                tracing::debug!(actor = %req.actor_id, unit = %req.unit_id, ?other, done = req.done, "completion ignored");
            }
        }
        Ok(Response::new(CompleteWorkResponse {}))
    }

    async fn open_step(&self, request: Request<OpenStepRequest>) -> Result<Response<OpenStepResponse>, Status> {
        let _t = RpcTimer::new("OpenStep");
        let req = request.into_inner();
        let spec = StepSpec {
            step: req.step,
            units: req.units,
            min_weights_version: req.min_weights_version,
            prompts: req.prompts,
            tasks: req.tasks,
            discard_older: req.discard_older,
            reopen: req.reopen,
            epoch: req.epoch,
        };
        let (out, generation) = {
            let mut s = self.state();
            let o = s.open_step(spec)?;
            set_gauges(&s);
            (o, s.generation())
        };
        self.persist_upto(generation).await?;
        if out.existed && !req.reopen {
            tracing::debug!(step = req.step, "step already open");
        } else {
            tracing::info!(
                step = req.step,
                units = req.units,
                queued = out.queued,
                discarded = out.discarded,
                reopened = req.reopen,
                "step opened"
            );
        }
        Ok(Response::new(OpenStepResponse {}))
    }

    async fn publish_weights(
        &self,
        request: Request<Streaming<WeightChunk>>,
    ) -> Result<Response<PublishWeightsResponse>, Status> {
        let _t = RpcTimer::new("PublishWeights");
        let start = Instant::now();
        let mut stream = request.into_inner();
        let manifest = match stream.message().await? {
            Some(WeightChunk { part: Some(weight_chunk::Part::Manifest(m)) }) => m,
            _ => return Err(WeightError::NoManifest.into()),
        };
        let version = manifest.version;
        let epoch = manifest.epoch;
        let check_epoch = || -> Result<(), Status> {
            let current = self.state().epoch();
            if epoch != current {
                tracing::warn!(version, epoch, current, "weights of a superseded learner epoch refused");
                return Err(StateError::SupersededEpoch { got: epoch, current }.into());
            }
            Ok(())
        };
        check_epoch()?;
        let mut upload = self.inner.weights.begin(manifest)?;
        while let Some(chunk) = stream.message().await? {
            match chunk.part {
                Some(weight_chunk::Part::Data(data)) => {
                    upload = tokio::task::spawn_blocking(move || upload.write(&data).map(|()| upload))
                        .await
                        .map_err(join_error)?
                        .inspect_err(|e| tracing::warn!(version, error = %e, "weights refused"))?;
                }
                Some(weight_chunk::Part::Manifest(_)) => return Err(WeightError::DuplicateManifest.into()),
                None => {}
            }
        }
        let bytes = upload.received();
        // An epoch may have begun while the payload streamed in.
        check_epoch()?;
        let inner = self.inner.clone();
        let outcome = tokio::task::spawn_blocking(move || upload.commit(&inner.weights))
            .await
            .map_err(join_error)?
            .inspect_err(|e| tracing::warn!(version, error = %e, "weights refused"))?;
        if outcome != PublishOutcome::AlreadyStored {
            counter!(WEIGHT_VERSIONS_PUBLISHED).increment(1);
        }
        gauge!(WEIGHTS_VERSION).set(self.inner.weights.latest_version() as f64);
        tracing::info!(version, bytes, seconds = start.elapsed().as_secs_f64(), ?outcome, "weights published");
        Ok(Response::new(PublishWeightsResponse { version }))
    }

    type FetchWeightsStream = ReceiverStream<Result<WeightChunk, Status>>;

    async fn fetch_weights(
        &self,
        request: Request<FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let _t = RpcTimer::new("FetchWeights");
        let version = self.inner.weights.get(request.into_inner().version)?;
        let (tx, rx) = mpsc::channel(FETCH_READ_AHEAD);
        tokio::spawn(async move {
            let first = WeightChunk { part: Some(weight_chunk::Part::Manifest(version.manifest().clone())) };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let total = version.total_bytes();
            let mut offset = 0u64;
            while offset < total {
                let len = (total - offset).min(WEIGHT_CHUNK_BYTES as u64) as usize;
                let v = version.clone();
                let data = match tokio::task::spawn_blocking(move || v.chunk(offset, len)).await {
                    Ok(Ok(d)) => d,
                    Ok(Err(e)) => {
                        tracing::error!(version = version.version(), error = %e, "cannot read stored weights");
                        let _ = tx.send(Err(Status::internal(format!("cannot read stored weights: {e}")))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(join_error(e))).await;
                        return;
                    }
                };
                let chunk = WeightChunk { part: Some(weight_chunk::Part::Data(data)) };
                if tx.send(Ok(chunk)).await.is_err() {
                    tracing::debug!(version = version.version(), offset, "fetch cancelled by the client");
                    return;
                }
                counter!(WEIGHT_BYTES_SERVED).increment(len as u64);
                offset += len as u64;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn begin_epoch(&self, request: Request<BeginEpochRequest>) -> Result<Response<BeginEpochResponse>, Status> {
        let _t = RpcTimer::new("BeginEpoch");
        let req = request.into_inner();
        // One epoch change at a time, and none while a snapshot is written.
        let mut persisted = self.inner.persisted.lock().await;
        let (out, bytes, generation) = {
            let mut s = self.state();
            let o = s.begin_epoch(req.last_epoch, &req.run_id, req.run_seed)?;
            set_gauges(&s);
            (o, serde_json::to_vec(&s.snapshot()).expect("a snapshot serializes"), s.generation())
        };
        // The future of the old epoch goes first (fenced: no upload of it lands after this),
        // then the epoch is made durable, before anyone hears of it: a coordinator restarted
        // now must not hand out an epoch number twice.
        let dropped = self.inner.weights.begin_epoch(out.epoch, req.version);
        self.write_snapshot(bytes).await?;
        *persisted = generation;
        drop(persisted);
        gauge!(WEIGHTS_VERSION).set(self.inner.weights.latest_version() as f64);
        counter!(LEARNER_EPOCHS).increment(1);
        gauge!(LEARNER_EPOCH).set(out.epoch as f64);
        tracing::info!(
            epoch = out.epoch,
            version = req.version,
            run_seed = out.run_seed,
            steps_dropped = out.steps_dropped,
            leases_cancelled = out.leases_cancelled,
            weights_dropped = ?dropped,
            "learner epoch began"
        );
        Ok(Response::new(BeginEpochResponse { epoch: out.epoch, run_seed: out.run_seed }))
    }

    async fn status(&self, _request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let _t = RpcTimer::new("Status");
        Ok(Response::new(CoordinatorService::status(self)))
    }
}

/// Serves the coordinator on `listener` until `shutdown` completes: the Coordinator service
/// (behind the role check), `grpc.health.v1.Health` (SERVING) and gRPC reflection (both
/// open, for probes and tooling), over TLS when `config.tls` is set. Runs the lease expiry in
/// the background and saves the state before returning.
pub async fn serve(
    config: CoordinatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), CoordinatorError> {
    config.validate()?;
    let service = CoordinatorService::open(&config)?;
    let expiry = service.spawn_expiry();

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status(SERVICE_NAME, tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(selfplay_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    selfplay_proto::health::health().ready("coordinator");
    let tls = config.tls.is_some();
    let tls_files =
        config.tls.as_ref().map(|t| selfplay_proto::server::TlsFiles { cert: t.cert.clone(), key: t.key.clone() });
    let mut builder = selfplay_proto::server::builder(tls_files.as_ref()).map_err(|e| match e {
        selfplay_proto::server::ServerError::Read { field, path, source } => {
            CoordinatorError::Config(format!("tls.{field}: cannot read {}: {source}", path.display()))
        }
        selfplay_proto::server::ServerError::Tls(e) => CoordinatorError::Tls(e),
    })?;
    let addr = listener
        .local_addr()
        .map_err(|source| CoordinatorError::Io { context: "read the listener's address".into(), source })?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(%addr, tls, state_dir = %config.state_dir.display(), "coordinator serving");

    let result = builder
        .add_service(health)
        .add_service(reflection)
        .add_service(service.clone().into_server())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    expiry.abort();
    let saved = service.persist().await;
    tracing::info!(%addr, "coordinator stopped");
    result.map_err(CoordinatorError::Transport)?;
    saved.map_err(|s| CoordinatorError::Io {
        context: "save the state at shutdown".into(),
        source: std::io::Error::other(s.message().to_string()),
    })
}
