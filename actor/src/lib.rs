//! The actor role. [`run`] is a blocking loop for a dedicated thread: join the coordinator,
//! lease up to K units (`actor.units_in_flight`), make sure the weights are at least the
//! units' version (fetch, verify every checksum, load), play them together with
//! [`selfplay_game::Player::play_batch`], stream each group to the learner, report each unit
//! done. It reconnects with backoff, rejoins when the coordinator forgets it, and on stop
//! finishes its units (or hands them back) and leaves.
pub mod reward_service;

use selfplay_game::Player;
use selfplay_proto::auth::Credential;
use selfplay_proto::client::{coordinator_client, learner_client, AuthChannel};
use selfplay_proto::error::RpcError;
use selfplay_proto::v1::coordinator_client::CoordinatorClient;
use selfplay_proto::v1::learner_client::LearnerClient;
use selfplay_proto::v1::{
    CompleteWorkRequest, FetchWeightsRequest, HeartbeatRequest, JoinRequest, LeaseWorkRequest, LeaveRequest, WorkUnit,
};
use selfplay_proto::weights::WeightAssembler;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};
use tokio_stream::StreamExt;

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error(transparent)]
    Rpc(#[from] selfplay_proto::error::RpcError),
    #[error("connect: {0}")]
    Connect(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error(transparent)]
    Game(#[from] selfplay_game::GameError),
    #[error(transparent)]
    Policy(#[from] selfplay_policy::PolicyError),
}

#[derive(Debug, Clone)]
pub struct ActorOptions {
    /// The run this actor belongs to (empty: any); another run's coordinator refuses it.
    pub run_id: String,
    pub coordinator: String,
    pub learner: String,
    /// The actor credential (a file credential follows its file through a rotation).
    pub credential: Credential,
    pub actor_id: String,
    /// Give up when the coordinator stays unreachable this long.
    pub patience: Duration,
    /// CA that signed the coordinator's and learner's certificates (https addresses).
    pub tls_ca: Option<std::path::PathBuf>,
    /// K: units leased and played together (at least 1). The coordinator gives an actor at
    /// most its share of the outstanding units, so a step's units spread over the actors.
    pub units_in_flight: usize,
    /// The learner's weights when it runs in this process (`selfplay train`): copied device
    /// to device instead of fetched from the coordinator, whenever they are of the units'
    /// epoch and recent enough; otherwise the coordinator's path.
    pub in_process: Option<Arc<selfplay_policy::InProcessWeights>>,
    /// At the end, compute the SHA-256 of the weights the actor holds
    /// ([`ActorSummary::weights_digest`]): one full read of the weights.
    pub digest_weights: bool,
}

pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("selfplay_actor_tokens_generated_total", "Tokens sampled (challenger and solver).");
    describe_histogram!(
        "selfplay_actor_generation_seconds",
        Unit::Seconds,
        "Time spent sampling the queries and answers of one batch of units."
    );
    describe_histogram!(
        "selfplay_actor_play_seconds",
        Unit::Seconds,
        "Time to play one whole batch of units (sampling, rewards, judge, reference)."
    );
    describe_gauge!(
        "selfplay_actor_units_in_flight",
        Unit::Count,
        "Units in the batch being played (at most actor.units_in_flight)."
    );
    describe_counter!("selfplay_actor_units_done_total", "Units whose group the learner accepted.");
    describe_counter!(
        "selfplay_actor_units_failed_total",
        "Units that failed, by reason (rejected, play, submit, weights, duplicate: re-issued and delivered by another actor first)."
    );
    describe_gauge!("selfplay_actor_weights_version", "Weights version the actor samples with.");
    describe_counter!(
        "selfplay_actor_weight_syncs_total",
        "Weights versions loaded, by path: device (copied from the learner of the same process) or grpc (fetched from the coordinator)."
    );
    describe_histogram!(
        "selfplay_actor_weight_fetch_seconds",
        Unit::Seconds,
        "Time to load one weights version, by path: grpc (fetch, verify and load from the coordinator) or device (copy from the learner of the same process)."
    );
    describe_counter!(
        "selfplay_actor_weight_fetch_bytes_total",
        Unit::Bytes,
        "Weight payload bytes fetched from the coordinator."
    );
    describe_histogram!("selfplay_actor_reward", "Reward R of each answer.");
    describe_histogram!("selfplay_actor_self_reward", "Self-reward R_Q of each answer (LSP).");
    describe_counter!("selfplay_actor_judge_parse_failures_total", "Self-reward judgements that could not be parsed.");
    describe_counter!(
        "selfplay_actor_judge_fallbacks_total",
        "Written self-reward judgements without a score, graded by the expected score after their text."
    );
    for name in [
        "selfplay_actor_tokens_generated_total",
        "selfplay_actor_units_done_total",
        "selfplay_actor_weight_fetch_bytes_total",
        "selfplay_actor_judge_parse_failures_total",
        "selfplay_actor_judge_fallbacks_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["play", "submit", "rejected", "weights", "duplicate"] {
        metrics::counter!("selfplay_actor_units_failed_total", "reason" => reason).increment(0);
    }
    for path in ["device", "grpc"] {
        metrics::counter!("selfplay_actor_weight_syncs_total", "path" => path).increment(0);
    }
    metrics::gauge!("selfplay_actor_weights_version").set(0.0);
    metrics::gauge!("selfplay_actor_units_in_flight").set(0.0);
}

/// What a stopped actor reports.
#[derive(Debug, Clone, Default)]
pub struct ActorSummary {
    pub units_done: u64,
    pub units_failed: u64,
    pub weights_version: u64,
    /// Batches of units played, and the most units one of them held.
    pub batches: u64,
    pub largest_batch: usize,
    /// Weights versions loaded by device copy from the learner of this process, and fetched
    /// from the coordinator.
    pub syncs_device: u64,
    pub syncs_grpc: u64,
    /// With [`ActorOptions::digest_weights`]: [`selfplay_policy::Llama::weights_digest`] of the
    /// weights held at the end (version `weights_version`).
    pub weights_digest: Option<String>,
}

async fn connect(
    address: &str,
    tls_ca: Option<&std::path::Path>,
    patience: Duration,
) -> Result<tonic::transport::Channel, ActorError> {
    selfplay_proto::client::connect_with_backoff(address, tls_ca, patience).await.map_err(ActorError::Connect)
}

/// Retries a call while the peer is unavailable (restarting), with backoff.
async fn retry<T, F, Fut>(what: &'static str, patience: Duration, f: F) -> Result<T, ActorError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    selfplay_proto::client::retry_unavailable(what, patience, f).await.map_err(|s| RpcError::new(what, &s).into())
}

/// Decodes a verified weights payload into named tensors.
pub fn decode_weights(
    manifest: &selfplay_proto::v1::WeightManifest,
    payload: &[u8],
) -> Result<HashMap<String, Tensor>, ActorError> {
    let mut out = HashMap::new();
    for t in &manifest.tensors {
        let kind = match t.dtype.as_str() {
            "f32" => Kind::Float,
            "bf16" => Kind::BFloat16,
            "f16" => Kind::Half,
            d => return Err(ActorError::Weights(format!("tensor {}: unsupported dtype {d}", t.name))),
        };
        let (a, b) = (t.offset as usize, (t.offset + t.nbytes) as usize);
        let bytes =
            payload.get(a..b).ok_or_else(|| ActorError::Weights(format!("tensor {} outside the payload", t.name)))?;
        let tensor = Tensor::f_from_data_size(bytes, &t.shape, kind).map_err(|e| ActorError::Weights(e.to_string()))?;
        out.insert(t.name.clone(), tensor);
    }
    Ok(out)
}

struct Conn {
    coord: CoordinatorClient<AuthChannel>,
    learner: LearnerClient<AuthChannel>,
}

/// Runs the actor loop on the calling (non-async) thread until `stop` is set.
pub fn run(
    mut player: Player,
    opts: ActorOptions,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) -> Result<ActorSummary, ActorError> {
    describe_metrics();
    let patience = opts.patience;
    let mut conn = rt.block_on(async {
        let c = connect(&opts.coordinator, opts.tls_ca.as_deref(), patience).await?;
        let l = connect(&opts.learner, opts.tls_ca.as_deref(), patience).await?;
        Ok::<_, ActorError>(Conn {
            coord: coordinator_client(c, &opts.credential),
            learner: learner_client(l, &opts.credential),
        })
    })?;
    let device = format!("{:?}", player.policy.model.device());
    let join = |conn: &mut Conn| -> Result<u64, ActorError> {
        let req = JoinRequest { actor_id: opts.actor_id.clone(), device: device.clone(), run_id: opts.run_id.clone() };
        let r = rt.block_on(retry("Join", patience, || {
            let mut c = conn.coord.clone();
            let r = req.clone();
            async move { c.join(r).await }
        }))?;
        Ok(r.into_inner().lease_ttl_ms)
    };
    let ttl_ms = join(&mut conn)?;
    let health = selfplay_proto::health::health();
    health.ready("actor");
    let version = Arc::new(AtomicU64::new(0));
    let rejoin = Arc::new(AtomicBool::new(false));

    // Heartbeats on the runtime, independent of how long a unit takes to play.
    /// Stops the heartbeat task however `run` ends: an actor that gave up must not keep its
    /// lease alive (inside `train`, actors are threads and the runtime outlives them).
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let hb = AbortOnDrop({
        let (mut c, id, version, rejoin) = (conn.coord.clone(), opts.actor_id.clone(), version.clone(), rejoin.clone());
        rt.spawn(async move {
            let every = Duration::from_millis((ttl_ms / 3).max(50));
            // Beats until aborted at the end of run(), so a unit finished during a stop keeps
            // its lease.
            loop {
                tokio::time::sleep(every).await;
                let req = HeartbeatRequest { actor_id: id.clone(), weights_version: version.load(Ordering::SeqCst) };
                match c.heartbeat(req).await {
                    Ok(r) if !r.get_ref().known => rejoin.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e.message(), "heartbeat failed"),
                }
            }
        })
    });

    let mut summary = ActorSummary::default();
    // The last fetched payload's memory, reused by the next fetch: faulting in hundreds of
    // megabytes of fresh memory costs more than receiving them.
    let mut fetch_buffer: Vec<u8> = Vec::new();
    // When weight fetches started failing in a row (None while they succeed).
    let mut failing_since: Option<Instant> = None;
    // The (epoch, version) of the weights loaded; None: the model from disk, which no epoch
    // vouches for, so the first unit fetches the weights of its epoch.
    let mut held: Option<(u64, u64)> = None;
    // No payload can be larger than the model in f32: refused before anything is reserved.
    let max_payload: u64 = player.policy.model.parameters().iter().map(|(_, t)| t.numel() as u64 * 4).sum();
    let k = opts.units_in_flight.max(1);
    while !stop.load(Ordering::SeqCst) {
        if rejoin.swap(false, Ordering::SeqCst) {
            tracing::info!(actor = %opts.actor_id, "the coordinator forgot this actor; joining again");
            join(&mut conn)?;
        }
        // Up to K units of one learner epoch. Each request lists the units already taken: any
        // other unit leased to this actor is one whose lease reply it never got, and goes back
        // to the queue.
        let mut units: Vec<WorkUnit> = Vec::with_capacity(k);
        let mut retry_after_ms = 0;
        let mut forgotten = false;
        while units.len() < k {
            let holding: Vec<String> = units.iter().map(|u| u.unit_id.clone()).collect();
            let lease = rt.block_on(retry("LeaseWork", patience, || {
                let mut c = conn.coord.clone();
                let req = LeaseWorkRequest {
                    actor_id: opts.actor_id.clone(),
                    holding: holding.clone(),
                    holding_listed: true,
                };
                async move { c.lease_work(req).await }
            }));
            let lease = match lease {
                Ok(r) => r.into_inner(),
                Err(ActorError::Rpc(e)) if e.is_precondition() => {
                    // Forgotten: the coordinator released whatever this actor held.
                    forgotten = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            let Some(unit) = lease.unit else {
                retry_after_ms = lease.retry_after_ms;
                break;
            };
            // One epoch's weights per batch.
            match units.first().map(|u| u.epoch) {
                // The learner began a new epoch meanwhile, which cancelled the leases of the
                // old one: those units are void.
                Some(e) if e < unit.epoch => units.clear(),
                Some(e) if e > unit.epoch => {
                    complete(&rt, &conn, &opts, &unit.unit_id, false, (unit.epoch, unit.incarnation, &unit.ticket));
                    break;
                }
                _ => {}
            }
            units.push(unit);
        }
        if forgotten {
            rejoin.store(true, Ordering::SeqCst);
            continue;
        }
        health.progress("actor", !units.is_empty());
        if units.is_empty() {
            std::thread::sleep(Duration::from_millis(retry_after_ms.clamp(10, 1000)));
            continue;
        }
        let epoch = units[0].epoch;
        let min_weights_version = units.iter().map(|u| u.min_weights_version).max().unwrap_or(0);
        let hand_back = |units: &[WorkUnit]| {
            for u in units {
                complete(&rt, &conn, &opts, &u.unit_id, false, (u.epoch, u.incarnation, &u.ticket));
            }
        };

        // Weights of the units' epoch, at least as new as every unit needs. Weights of another
        // epoch may belong to a future the learner no longer has (it restarted from an older
        // checkpoint): they are never used for a unit of this one.
        let usable = |h: Option<(u64, u64)>| h.is_some_and(|(e, v)| e == epoch && v >= min_weights_version);
        // The learner of this process first: a device copy, under the handle's lock, of a
        // whole version (the one reported with the units).
        if let (false, Some(h)) = (usable(held), &opts.in_process) {
            let t0 = Instant::now();
            held = None;
            match h.copy_into(&mut player.policy.model, epoch, min_weights_version) {
                Ok(Some(v)) => {
                    held = Some((epoch, v));
                    version.store(v, Ordering::SeqCst);
                    summary.syncs_device += 1;
                    metrics::counter!("selfplay_actor_weight_syncs_total", "path" => "device").increment(1);
                    metrics::histogram!("selfplay_actor_weight_fetch_seconds", "path" => "device")
                        .record(t0.elapsed().as_secs_f64());
                    metrics::gauge!("selfplay_actor_weights_version").set(v as f64);
                    tracing::info!(actor = %opts.actor_id, version = v, epoch, secs = t0.elapsed().as_secs_f64(), "weights copied from the learner of this process");
                }
                Ok(None) => {}
                // The model may be half-written (held stays None): the coordinator's path
                // below loads a whole version.
                Err(e) => {
                    tracing::warn!(actor = %opts.actor_id, error = %e, "copying the weights of this process's learner failed; fetching them from the coordinator")
                }
            }
        }
        if !usable(held) {
            let t0 = Instant::now();
            let loaded = (|| -> Result<Option<(u64, usize)>, ActorError> {
                let (manifest, payload) = rt.block_on(async {
                    let c = conn.coord.clone();
                    let mut stream = retry("FetchWeights", patience, || {
                        let mut c2 = c.clone();
                        async move { c2.fetch_weights(FetchWeightsRequest { version: 0 }).await }
                    })
                    .await?
                    .into_inner();
                    let mut asm =
                        WeightAssembler::with_buffer(std::mem::take(&mut fetch_buffer)).with_limit(max_payload);
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk.map_err(|s| RpcError::new("FetchWeights", &s))?;
                        asm.push(chunk).map_err(|e| ActorError::Weights(e.to_string()))?;
                    }
                    asm.finish().map_err(|e| ActorError::Weights(e.to_string()))
                })?;
                if manifest.epoch != epoch || manifest.version < min_weights_version {
                    // The epoch's weights are not published yet.
                    fetch_buffer = payload;
                    return Ok(None);
                }
                let tensors = decode_weights(&manifest, &payload)?;
                let n = payload.len();
                fetch_buffer = payload;
                // A failed load leaves the model half-written: nothing is usable until a load
                // succeeds.
                held = None;
                player.policy.model.set_weights(&tensors)?;
                Ok(Some((manifest.version, n)))
            })();
            match loaded {
                Ok(Some((v, bytes))) => {
                    failing_since = None;
                    held = Some((epoch, v));
                    version.store(v, Ordering::SeqCst);
                    summary.syncs_grpc += 1;
                    metrics::counter!("selfplay_actor_weight_syncs_total", "path" => "grpc").increment(1);
                    metrics::histogram!("selfplay_actor_weight_fetch_seconds", "path" => "grpc")
                        .record(t0.elapsed().as_secs_f64());
                    metrics::counter!("selfplay_actor_weight_fetch_bytes_total").increment(bytes as u64);
                    metrics::gauge!("selfplay_actor_weights_version").set(v as f64);
                    tracing::info!(actor = %opts.actor_id, version = v, epoch, bytes, secs = t0.elapsed().as_secs_f64(), "weights loaded");
                }
                Ok(None) => {
                    // Not published yet: give the units back and try again shortly.
                    hand_back(&units);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                // No version stored yet (a coordinator that restarted before the learner
                // republished), a stream cut short, a corrupt chunk, a payload that does not
                // fit the model: hand the units back and try again, for up to `patience`.
                Err(e) => {
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > patience {
                        hand_back(&units);
                        return Err(e);
                    }
                    tracing::warn!(actor = %opts.actor_id, units = units.len(), error = %e, "loading weights failed; handing the units back and retrying");
                    metrics::counter!("selfplay_actor_units_failed_total", "reason" => "weights")
                        .increment(units.len() as u64);
                    hand_back(&units);
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            }
        }

        health.progress("actor", true);
        let v = version.load(Ordering::SeqCst);
        let game_units: Vec<selfplay_game::Unit> = units.iter().cloned().map(Into::into).collect();
        metrics::gauge!("selfplay_actor_units_in_flight").set(units.len() as f64);
        let played = player.play_batch(&game_units, v, &opts.actor_id);
        metrics::gauge!("selfplay_actor_units_in_flight").set(0.0);
        let (groups, stats) = match played {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(units = units.len(), first = %units[0].unit_id, error = %e, "playing the units failed; handing them back");
                metrics::counter!("selfplay_actor_units_failed_total", "reason" => "play")
                    .increment(units.len() as u64);
                summary.units_failed += units.len() as u64;
                hand_back(&units);
                continue;
            }
        };
        // Units played: weights troubles, if any, are over.
        failing_since = None;
        summary.batches += 1;
        summary.largest_batch = summary.largest_batch.max(units.len());
        health.progress("actor", true);
        metrics::counter!("selfplay_actor_tokens_generated_total").increment(stats.generated_tokens);
        metrics::histogram!("selfplay_actor_generation_seconds").record(stats.generation_seconds);
        metrics::counter!("selfplay_actor_judge_parse_failures_total").increment(stats.parse_failures);
        metrics::counter!("selfplay_actor_judge_fallbacks_total").increment(stats.judge_fallbacks);
        if let Some(g) = groups.first() {
            metrics::histogram!("selfplay_actor_play_seconds").record(g.play_seconds);
        }
        for (unit, mut group) in units.iter().zip(groups) {
            group.epoch = epoch;
            for a in &group.answers {
                metrics::histogram!("selfplay_actor_reward").record(a.reward as f64);
                metrics::histogram!("selfplay_actor_self_reward").record(a.self_reward as f64);
            }
            match deliver(&rt, &conn, &opts, &stop, unit, group) {
                Delivered::Done => summary.units_done += 1,
                Delivered::Failed => summary.units_failed += 1,
                Delivered::Rejected => {
                    // The weights may be what the learner objects to (too old for its lag, of
                    // an epoch it left): the next batch fetches them afresh.
                    held = None;
                    summary.units_failed += 1;
                }
                Delivered::NotRecorded | Delivered::Stopping => {}
            }
        }
    }
    drop(hb);
    let mut c = conn.coord.clone();
    let id = opts.actor_id.clone();
    let _ = rt.block_on(async move {
        tokio::time::timeout(Duration::from_secs(2), c.leave(LeaveRequest { actor_id: id })).await
    });
    summary.weights_version = version.load(Ordering::SeqCst);
    if opts.digest_weights {
        summary.weights_digest = Some(player.policy.model.weights_digest()?);
    }
    Ok(summary)
}

/// What became of one played group.
enum Delivered {
    /// The learner has it (accepted now or earlier) and the coordinator recorded the unit.
    Done,
    /// The learner has it; the coordinator's record did not go through (the unit comes back
    /// by itself and the learner keeps one copy).
    NotRecorded,
    /// The learner refused it; the unit was handed back.
    Rejected,
    /// Submitting failed; the unit was handed back.
    Failed,
    /// Stopping and the learner could not be reached; the unit was handed back.
    Stopping,
}

/// Streams one group to the learner, then reports its unit to the coordinator.
fn deliver(
    rt: &tokio::runtime::Handle,
    conn: &Conn,
    opts: &ActorOptions,
    stop: &AtomicBool,
    unit: &WorkUnit,
    group: selfplay_game::RolloutGroup,
) -> Delivered {
    let unit_id = unit.unit_id.as_str();
    // The lease's ticket goes back with the group and the report: proof that they come from
    // the actor the unit was leased to.
    let lease = (unit.epoch, unit.incarnation, unit.ticket.as_str());
    let wire = selfplay_proto::v1::RolloutGroup { ticket: unit.ticket.clone(), ..group.into() };
    // Stopping: one try only (the learner may already be gone); the unit is handed back.
    let submit_patience = if stop.load(Ordering::SeqCst) { Duration::ZERO } else { opts.patience };
    let ack = rt.block_on(retry("SubmitRollouts", submit_patience, || {
        let mut l = conn.learner.clone();
        let g = wire.clone();
        async move {
            let mut acks = l.submit_rollouts(tokio_stream::iter([g])).await?.into_inner();
            match acks.next().await {
                Some(a) => a,
                None => Err(tonic::Status::unavailable("the learner closed the stream without an ack")),
            }
        }
    }));
    match ack {
        Ok(a) if a.accepted || a.duplicate => {
            if a.duplicate {
                // Re-issued while this actor was slow or cut off: the learner keeps one copy.
                tracing::info!(unit = %unit_id, "the learner already had this unit; this group was not used");
                metrics::counter!("selfplay_actor_units_failed_total", "reason" => "duplicate").increment(1);
            }
            if complete(rt, conn, opts, unit_id, true, lease) {
                metrics::counter!("selfplay_actor_units_done_total").increment(1);
                Delivered::Done
            } else {
                Delivered::NotRecorded
            }
        }
        Ok(a) => {
            tracing::warn!(unit = %unit_id, reason = %a.reason, "the learner rejected the group; handing the unit back");
            metrics::counter!("selfplay_actor_units_failed_total", "reason" => "rejected").increment(1);
            complete(rt, conn, opts, unit_id, false, lease);
            Delivered::Rejected
        }
        Err(e) if stop.load(Ordering::SeqCst) => {
            // Stopping: the learner may already be gone; the unit goes back to the queue.
            tracing::info!(unit = %unit_id, error = %e, "stopping: the group was not delivered; handing the unit back");
            complete(rt, conn, opts, unit_id, false, lease);
            Delivered::Stopping
        }
        Err(e) => {
            tracing::warn!(unit = %unit_id, error = %e, "submitting failed; handing the unit back");
            metrics::counter!("selfplay_actor_units_failed_total", "reason" => "submit").increment(1);
            complete(rt, conn, opts, unit_id, false, lease);
            Delivered::Failed
        }
    }
}

/// Reports a unit (done, or handed back). Whether it was recorded: a report the coordinator
/// refuses (the learner began a new epoch meanwhile, or it no longer knows this actor) or
/// that cannot be delivered changes nothing there, and the unit comes back to some actor by
/// itself (epoch reset or lease expiry), so it is logged, never fatal.
fn complete(
    rt: &tokio::runtime::Handle,
    conn: &Conn,
    opts: &ActorOptions,
    unit_id: &str,
    done: bool,
    (epoch, incarnation, ticket): (u64, u32, &str),
) -> bool {
    let req = CompleteWorkRequest {
        actor_id: opts.actor_id.clone(),
        unit_id: unit_id.to_string(),
        done,
        epoch,
        incarnation: Some(incarnation),
        ticket: ticket.to_string(),
    };
    let r = rt.block_on(retry("CompleteWork", opts.patience, || {
        let mut c = conn.coord.clone();
        let r = req.clone();
        async move { c.complete_work(r).await }
    }));
    match r {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(unit = %unit_id, done, error = %e, "the unit report was not recorded");
            false
        }
    }
}

/// Default actor name: host name and process id.
pub fn default_actor_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "actor".into());
    format!("{host}-{}", std::process::id())
}
