//! `selfplay bench weights|coordinator|ingest`: the distributed runtime's benchmarks.
//!
//! Everything runs on 127.0.0.1 with ports chosen by the OS, through real tonic clients and
//! servers and the real coordinator and learner services:
//!
//! - `weights`: the learner side publishes a model's weights ([`selfplay_learner::weights_payload`])
//!   to a coordinator once, then K light fetchers (no model: [`WeightAssembler`], every checksum
//!   verified) download that version concurrently, as K actors would;
//! - `coordinator`: simulated light actors (tokio tasks) join, heartbeat every TTL/3, lease
//!   units and complete them, against a coordinator child process whose CPU time is read from
//!   `/proc/<pid>/stat`;
//! - `ingest`: synthetic valid rollout groups streamed to a Learner service that never trains
//!   (its N is larger than the number of groups), so what is measured is decoding,
//!   validation and deduplication.
//!
//! Each prints one JSON object per measurement on stdout.
use anyhow::{anyhow, bail, ensure, Context, Result};
use selfplay_coordinator::{CoordinatorConfig, CoordinatorCredentials, CoordinatorService};
use selfplay_proto::auth::{Credential, Role, Verifier};
use selfplay_proto::client::{coordinator_client, learner_client, AuthChannel};
use selfplay_proto::v1::coordinator_client::CoordinatorClient;
use selfplay_proto::v1::{self, weight_chunk, WeightManifest};
use selfplay_proto::weights::{into_chunks, sha256_hex, ManifestBuilder, PayloadVerifier, WeightAssembler};
use selfplay_proto::{MAX_MESSAGE_BYTES, WEIGHT_CHUNK_BYTES};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GB: f64 = 1e9;

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: Option<&Path>, tag: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.subsec_nanos();
        let base = parent.map(Path::to_path_buf).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("selfplay-bench-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The 1-, 5- and 15-minute load averages: the machine is shared, so every result carries them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "loadavg": loadavg(),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn emit(v: serde_json::Value) {
    println!("{v}");
    let _ = std::io::stdout().flush();
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn min(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(f64::INFINITY, f64::min)
}

fn max(xs: &[f64]) -> f64 {
    xs.iter().cloned().fold(0.0, f64::max)
}

/// HTTP/2 settings of a client connection: `None` keeps what
/// `selfplay_proto::client::endpoint` (every actor's and learner's) sets.
#[derive(Debug, Clone, Copy, Default)]
struct H2 {
    window_mib: Option<u32>,
    max_frame_kib: Option<u32>,
}

async fn connect(address: &str, h2: H2) -> Result<tonic::transport::Channel> {
    let mut ep = selfplay_proto::client::endpoint(address, None).map_err(anyhow::Error::msg)?;
    if let Some(w) = h2.window_mib {
        ep = ep.initial_stream_window_size(w * 1024 * 1024).initial_connection_window_size(4 * w * 1024 * 1024);
    }
    if let Some(f) = h2.max_frame_kib {
        ep = ep.max_frame_size(f * 1024);
    }
    selfplay_proto::client::connect_endpoint_with_backoff(&ep, Duration::from_secs(20))
        .await
        .map_err(|e| anyhow!("connecting to {e}"))
}

// ---------------------------------------------------------------------------------------------
// bench weights

#[derive(clap::Args, Debug)]
pub struct WeightsArgs {
    /// Hugging Face model directory or Hub id at main (default: $SELFPLAY_MODEL, else the
    /// SmolLM2 import).
    #[arg(long, env = "SELFPLAY_MODEL")]
    pub model: Option<PathBuf>,
    /// Dtype on the wire: f32 or bf16 (the model is loaded in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Numbers of concurrent fetchers (actors) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub actors: Vec<usize>,
    /// Publish + fetch rounds per number of actors.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Client HTTP/2 stream window in MiB (the connection window is 4x); unset = tonic's
    /// defaults (2 MiB / 5 MiB), which `selfplay_proto::client::endpoint` keeps.
    #[arg(long)]
    pub client_window_mib: Option<u32>,
    /// Serve the coordinator with this HTTP/2 stream window in MiB (connection window 4x)
    /// instead of through `selfplay_coordinator::serve` (8 MiB / 32 MiB, 1 MiB frames).
    #[arg(long)]
    pub server_window_mib: Option<u32>,
    /// HTTP/2 SETTINGS_MAX_FRAME_SIZE in KiB on both sides, instead of the wire's 1024
    /// (hyper's default is 16).
    #[arg(long)]
    pub max_frame_kib: Option<u32>,
    /// Also time the pieces in memory and on disk: hashing, verifying, chunking, assembling,
    /// writing, fsync, the store's publish and reads.
    #[arg(long)]
    pub profile: bool,
    /// Parent of the coordinator's temporary state directory (default: the system's temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Every fetcher reassembles into the buffer of its previous fetch
    /// (`WeightAssembler::with_buffer`) instead of fresh memory.
    #[arg(long)]
    pub reuse_buffers: bool,
}

struct Fetched {
    start: Instant,
    end: Instant,
    bytes: u64,
    buffer: Vec<u8>,
}

async fn publish(
    client: &mut CoordinatorClient<AuthChannel>,
    manifest: &WeightManifest,
    payload: &bytes::Bytes,
    version: u64,
) -> Result<(f64, u64)> {
    let mut m = manifest.clone();
    m.version = version;
    m.step = version;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let chunks = into_chunks(m, payload.clone()).inspect(move |c| {
        if let Some(weight_chunk::Part::Data(d)) = &c.part {
            counter.fetch_add(d.len() as u64, Relaxed);
        }
    });
    let t0 = Instant::now();
    let r = client
        .publish_weights(tokio_stream::iter(chunks))
        .await
        .map_err(|s| anyhow!("PublishWeights: {}", s.message()))?;
    let secs = t0.elapsed().as_secs_f64();
    ensure!(r.into_inner().version == version, "the coordinator stored another version");
    Ok((secs, sent.load(Relaxed)))
}

/// One actor's download: every chunk through the assembler, checksums verified at the end.
/// With `buffer`, the payload goes into that memory; the payload comes back for reuse.
async fn fetch(
    mut client: CoordinatorClient<AuthChannel>,
    version: u64,
    expect: &WeightManifest,
    buffer: Option<Vec<u8>>,
) -> Result<(u64, Vec<u8>)> {
    let mut stream = client
        .fetch_weights(v1::FetchWeightsRequest { version })
        .await
        .map_err(|s| anyhow!("FetchWeights: {}", s.message()))?
        .into_inner();
    let mut asm = match buffer {
        Some(b) => WeightAssembler::with_buffer(b),
        None => WeightAssembler::new(),
    };
    let mut bytes = 0u64;
    while let Some(chunk) = stream.message().await.map_err(|s| anyhow!("FetchWeights: {}", s.message()))? {
        if let Some(weight_chunk::Part::Data(d)) = &chunk.part {
            bytes += d.len() as u64;
        }
        asm.push(chunk)?;
    }
    let (m, p) = asm.finish()?;
    ensure!(
        m.version == version && m.sha256 == expect.sha256 && p.len() as u64 == expect.total_bytes,
        "fetched the wrong version"
    );
    Ok((bytes, p))
}

/// Starts a coordinator on 127.0.0.1:0: through `selfplay_coordinator::serve` (the real
/// thing), or with other HTTP/2 settings around the same service.
async fn start_coordinator(
    cfg: CoordinatorConfig,
    server_window_mib: Option<u32>,
    max_frame_kib: Option<u32>,
) -> Result<(String, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        let _ = rx.await;
    };
    let task = if server_window_mib.is_none() && max_frame_kib.is_none() {
        tokio::spawn(
            async move { selfplay_coordinator::serve(cfg, listener, shutdown).await.map_err(anyhow::Error::from) },
        )
    } else {
        let service = CoordinatorService::open(&cfg)?;
        let w = server_window_mib.unwrap_or(8) * 1024 * 1024;
        let mut builder = tonic::transport::Server::builder()
            .initial_stream_window_size(Some(w))
            .initial_connection_window_size(Some(4 * w))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_frame_size(Some(max_frame_kib.map_or(selfplay_proto::client::HTTP2_MAX_FRAME_BYTES, |f| f * 1024)));
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let router = builder.add_service(service.into_server());
        tokio::spawn(async move {
            router.serve_with_incoming_shutdown(incoming, shutdown).await.map_err(anyhow::Error::from)
        })
    };
    Ok((addr, tx, task))
}

pub fn weights(a: WeightsArgs) -> Result<()> {
    ensure!(matches!(a.dtype.as_str(), "f32" | "bf16"), "--dtype must be f32 or bf16");
    ensure!(!a.actors.is_empty() && a.actors.iter().all(|&k| k > 0), "--actors needs positive numbers");
    let model_dir = selfplay_hub::resolve(&a.model.clone().unwrap_or_else(crate::default_model), "")?;
    let t0 = Instant::now();
    let policy = selfplay_policy::Policy::load(&model_dir, tch::Device::Cpu, tch::Kind::Float)?;
    let load_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (manifest, payload) = selfplay_learner::weights_payload(&policy.model, &a.dtype, 1, 1)?;
    let build_s = t0.elapsed().as_secs_f64();
    drop(policy);
    let total = payload.len() as u64;
    let payload = bytes::Bytes::from(payload);
    emit(json!({
        "bench": "weights_payload", "model": model_dir.display().to_string(), "dtype": a.dtype,
        "tensors": manifest.tensors.len(), "bytes": total, "load_s": load_s,
        "build_s": build_s, "build_gbps": total as f64 / GB / build_s, "machine": machine(),
    }));

    let tmp = TempDir::new(a.dir.as_deref(), "weights")?;
    if a.profile {
        profile(&manifest, &payload, tmp.path())?;
    }

    let rt = runtime()?;
    let (learner_cred, actor_cred) = (Credential::generate(), Credential::generate());
    let cfg = CoordinatorConfig {
        state_dir: tmp.path().join("coordinator"),
        keep_versions: 2,
        credentials: Some(CoordinatorCredentials {
            learner: learner_cred.clone(),
            actor: actor_cred.clone(),
            operator: None,
        }),
        ..Default::default()
    };
    let (addr, stop, server) = rt.block_on(start_coordinator(cfg, a.server_window_mib, a.max_frame_kib))?;
    let client_h2 = H2 { window_mib: a.client_window_mib, max_frame_kib: a.max_frame_kib };
    // The learner's connection, from `selfplay_proto::client::endpoint` as the learner's.
    let mut learner = rt.block_on(async {
        Ok::<_, anyhow::Error>(coordinator_client(connect(&addr, client_h2).await?, &learner_cred))
    })?;
    // Warm-up: one publish and one fetch, not reported (first allocations, page cache).
    rt.block_on(publish(&mut learner, &manifest, &payload, 1))?;
    let (_, first) = rt.block_on(async {
        fetch(coordinator_client(connect(&addr, client_h2).await?, &actor_cred), 1, &manifest, None).await
    })?;
    let mut pool: Vec<Vec<u8>> = if a.reuse_buffers { vec![first] } else { vec![] };

    let tick = clock_tick();
    let mut version = 1u64;
    let mut summary = vec![];
    for &k in &a.actors {
        let mut publish_s = vec![];
        let mut stream_gbps = vec![];
        let mut fetch_s = vec![];
        let mut aggregate = vec![];
        let (mut pub_eff, mut fetch_eff) = (vec![], vec![]);
        let (mut egress, mut served) = (0u64, 0u64);
        for rep in 0..a.repeats {
            version += 1;
            // K actors, each with its own connection, as separate actor processes would have.
            let clients: Vec<_> = rt.block_on(async {
                let mut v = vec![];
                for _ in 0..k {
                    v.push(coordinator_client(connect(&addr, client_h2).await?, &actor_cred));
                }
                Ok::<_, anyhow::Error>(v)
            })?;
            let load = loadavg();
            // The learner publishes from its own thread (block_on), as the training thread does.
            let cpu0 = cpu_seconds("self", tick)?;
            let (p_s, sent) = rt.block_on(publish(&mut learner, &manifest, &payload, version))?;
            let cpu1 = cpu_seconds("self", tick)?;
            // Every actor fetches on its own thread, as the actor's blocking loop does.
            let barrier = Arc::new(std::sync::Barrier::new(k));
            let handles: Vec<_> = clients
                .into_iter()
                .map(|c| {
                    let (h, b, m) = (rt.handle().clone(), barrier.clone(), manifest.clone());
                    let buffer = if a.reuse_buffers { Some(pool.pop().unwrap_or_default()) } else { None };
                    std::thread::spawn(move || -> Result<Fetched> {
                        b.wait();
                        let start = Instant::now();
                        let (bytes, buffer) = h.block_on(fetch(c, version, &m, buffer))?;
                        Ok(Fetched { start, end: Instant::now(), bytes, buffer })
                    })
                })
                .collect();
            let mut got = vec![];
            for h in handles {
                got.push(h.join().map_err(|_| anyhow!("a fetcher panicked"))??);
            }
            let cpu2 = cpu_seconds("self", tick)?;
            if a.reuse_buffers {
                pool.extend(got.iter_mut().map(|f| std::mem::take(&mut f.buffer)));
            }
            let first = got.iter().map(|f| f.start).min().expect("k > 0");
            let last = got.iter().map(|f| f.end).max().expect("k > 0");
            let wall = (last - first).as_secs_f64();
            let per: Vec<f64> = got.iter().map(|f| (f.end - f.start).as_secs_f64()).collect();
            let bytes_served: u64 = got.iter().map(|f| f.bytes).sum();
            let per_gbps: Vec<f64> =
                got.iter().map(|f| f.bytes as f64 / GB / (f.end - f.start).as_secs_f64()).collect();
            emit(json!({
                "bench": "weights", "dtype": a.dtype, "actors": k, "repeat": rep, "version": version,
                "bytes": total, "publish_s": p_s, "publish_gbps": total as f64 / GB / p_s,
                "fetch_s": per, "fetch_stream_gbps": per_gbps, "fetch_wall_s": wall,
                "fetch_aggregate_gbps": bytes_served as f64 / GB / wall,
                "learner_egress_bytes": sent, "coordinator_served_bytes": bytes_served,
                // CPU seconds of the whole process (learner + coordinator + fetchers) per phase:
                // on a shared machine, GB per CPU-second is the figure that does not depend on load.
                "publish_cpu_s": cpu1 - cpu0, "fetch_cpu_s": cpu2 - cpu1,
                "publish_gb_per_cpu_s": total as f64 / GB / (cpu1 - cpu0),
                "fetch_gb_per_cpu_s": bytes_served as f64 / GB / (cpu2 - cpu1),
                "client_window_mib": a.client_window_mib, "server_window_mib": a.server_window_mib,
                "max_frame_kib": a.max_frame_kib, "reuse_buffers": a.reuse_buffers, "loadavg": load,
            }));
            publish_s.push(p_s);
            stream_gbps.extend(per_gbps);
            fetch_s.extend(per);
            aggregate.push(bytes_served as f64 / GB / wall);
            pub_eff.push(total as f64 / GB / (cpu1 - cpu0));
            fetch_eff.push(bytes_served as f64 / GB / (cpu2 - cpu1));
            egress = sent;
            served = bytes_served;
        }
        summary.push(json!({
            "actors": k, "publish_s_mean": mean(&publish_s), "publish_gbps_best": total as f64 / GB / min(&publish_s),
            "fetch_s_mean": mean(&fetch_s), "fetch_s_max": max(&fetch_s),
            "stream_gbps_mean": mean(&stream_gbps), "stream_gbps_min": min(&stream_gbps),
            "aggregate_gbps_mean": mean(&aggregate),
            "publish_gb_per_cpu_s": mean(&pub_eff), "fetch_gb_per_cpu_s": mean(&fetch_eff),
            "learner_egress_bytes": egress, "coordinator_served_bytes": served,
        }));
    }
    let _ = stop.send(());
    rt.block_on(server).map_err(|e| anyhow!("coordinator task: {e}"))??;
    emit(json!({"bench": "weights_summary", "dtype": a.dtype, "bytes": total, "rows": summary, "loadavg": loadavg()}));
    Ok(())
}

/// Where a publish and a fetch spend their time, piece by piece, on one thread.
fn profile(manifest: &WeightManifest, payload: &bytes::Bytes, dir: &Path) -> Result<()> {
    let total = payload.len() as f64;
    let mut rows = serde_json::Map::new();
    // Best of three: the machine is shared.
    let time = |rows: &mut serde_json::Map<String, serde_json::Value>,
                name: &str,
                f: &mut dyn FnMut() -> Result<()>|
     -> Result<f64> {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t0 = Instant::now();
            f()?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        rows.insert(name.into(), json!({"s": best, "gbps": total / GB / best}));
        Ok(best)
    };
    time(&mut rows, "sha256_one_pass", &mut || {
        std::hint::black_box(sha256_hex(payload));
        Ok(())
    })?;
    // Two threads hashing halves: the headroom that parallel hashing could use.
    time(&mut rows, "sha256_two_threads_halves", &mut || {
        let (a, b) = payload.split_at(payload.len() / 2);
        std::thread::scope(|s| {
            let h = s.spawn(|| sha256_hex(a));
            std::hint::black_box(sha256_hex(b));
            std::hint::black_box(h.join().expect("hasher"));
        });
        Ok(())
    })?;
    // What touching fresh memory costs (page faults) against reusing it.
    time(&mut rows, "copy_into_fresh_buffer", &mut || {
        let mut v: Vec<u8> = Vec::with_capacity(payload.len());
        for piece in payload.chunks(WEIGHT_CHUNK_BYTES) {
            v.extend_from_slice(piece);
        }
        std::hint::black_box(v);
        Ok(())
    })?;
    let mut reused: Vec<u8> = Vec::with_capacity(payload.len());
    time(&mut rows, "copy_into_reused_buffer", &mut || {
        reused.clear();
        for piece in payload.chunks(WEIGHT_CHUNK_BYTES) {
            reused.extend_from_slice(piece);
        }
        std::hint::black_box(&reused);
        Ok(())
    })?;
    // What the learner's ManifestBuilder does on top of the dtype conversion.
    time(&mut rows, "manifest_builder", &mut || {
        let mut b = ManifestBuilder::with_capacity(payload.len());
        for t in &manifest.tensors {
            b.push(t.name.clone(), &t.shape, &t.dtype, &payload[t.offset as usize..(t.offset + t.nbytes) as usize]);
        }
        std::hint::black_box(b.finish(1, 1)?);
        Ok(())
    })?;
    // The coordinator's (and every fetcher's) verification: every tensor, each byte hashed once.
    time(&mut rows, "payload_verifier", &mut || {
        let mut v = PayloadVerifier::new(manifest)?;
        for piece in payload.chunks(WEIGHT_CHUNK_BYTES) {
            v.update(piece)?;
        }
        v.finish()?;
        Ok(())
    })?;
    time(&mut rows, "into_chunks_copy", &mut || {
        for c in into_chunks(manifest.clone(), payload.clone()) {
            std::hint::black_box(c);
        }
        Ok(())
    })?;
    // A fetcher's CPU per byte without the network: chunks, verification, reassembly.
    time(&mut rows, "chunks_then_assembler", &mut || {
        let mut a = WeightAssembler::new();
        for c in into_chunks(manifest.clone(), payload.clone()) {
            a.push(c)?;
        }
        std::hint::black_box(a.finish()?);
        Ok(())
    })?;
    time(&mut rows, "chunks_then_assembler_reused_buffer", &mut || {
        let mut a = WeightAssembler::with_buffer(std::mem::take(&mut reused));
        for c in into_chunks(manifest.clone(), payload.clone()) {
            a.push(c)?;
        }
        reused = a.finish()?.1;
        Ok(())
    })?;
    drop(reused);
    let file = dir.join("profile.bin");
    let mut fsync_s = f64::INFINITY;
    time(&mut rows, "write_file", &mut || {
        let mut f = std::fs::File::create(&file)?;
        for piece in payload.chunks(WEIGHT_CHUNK_BYTES) {
            f.write_all(piece)?;
        }
        let t0 = Instant::now();
        f.sync_all()?;
        fsync_s = fsync_s.min(t0.elapsed().as_secs_f64());
        Ok(())
    })?;
    rows.insert("fsync_after_write".into(), json!({"s": fsync_s}));
    let _ = std::fs::remove_file(&file);
    // The coordinator's whole publish path without the network.
    let mut version = 0u64;
    let store = selfplay_coordinator::WeightStore::open(dir.join("profile-store"), 1)?;
    time(&mut rows, "store_publish", &mut || {
        version += 1;
        let mut m = manifest.clone();
        m.version = version;
        store.publish(m, payload)?;
        Ok(())
    })?;
    let stored = store.get(0)?;
    time(&mut rows, "store_read_chunks", &mut || {
        let mut off = 0u64;
        while off < stored.total_bytes() {
            let len = (stored.total_bytes() - off).min(WEIGHT_CHUNK_BYTES as u64) as usize;
            std::hint::black_box(stored.read_at(off, len)?);
            off += len as u64;
        }
        Ok(())
    })?;
    drop(stored);
    drop(store);
    let _ = std::fs::remove_dir_all(dir.join("profile-store"));
    emit(json!({"bench": "weights_profile", "bytes": payload.len(), "rows": rows, "loadavg": loadavg()}));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench coordinator

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Simulated light actors (tokio tasks).
    #[arg(long, default_value_t = 1000)]
    pub actors: usize,
    /// Measured seconds (after every actor joined and the warm-up).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 3.0)]
    pub warmup_seconds: f64,
    /// gRPC connections the actors share (round-robin).
    #[arg(long, default_value_t = 8)]
    pub channels: usize,
    #[arg(long, default_value_t = 10_000)]
    pub lease_ttl_ms: u64,
    /// Units (N) of each step the driver opens.
    #[arg(long, default_value_t = 1000)]
    pub units_per_step: u32,
    /// Simulated seconds an actor spends on a unit before completing it, in ms (0 = at once:
    /// the coordinator is then saturated).
    #[arg(long, default_value_t = 0)]
    pub play_ms: u64,
    /// Parent of the coordinator's temporary state directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Default)]
struct Counts {
    join: AtomicU64,
    heartbeat: AtomicU64,
    heartbeat_unknown: AtomicU64,
    lease_unit: AtomicU64,
    lease_empty: AtomicU64,
    complete: AtomicU64,
    open_step: AtomicU64,
    errors: AtomicU64,
    /// Microseconds spent waiting for each kind (client side, for mean latencies).
    heartbeat_us: AtomicU64,
    lease_us: AtomicU64,
    complete_us: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct CountsSnap {
    join: u64,
    heartbeat: u64,
    heartbeat_unknown: u64,
    lease_unit: u64,
    lease_empty: u64,
    complete: u64,
    open_step: u64,
    errors: u64,
    heartbeat_us: u64,
    lease_us: u64,
    complete_us: u64,
}

impl Counts {
    fn snap(&self) -> CountsSnap {
        CountsSnap {
            join: self.join.load(Relaxed),
            heartbeat: self.heartbeat.load(Relaxed),
            heartbeat_unknown: self.heartbeat_unknown.load(Relaxed),
            lease_unit: self.lease_unit.load(Relaxed),
            lease_empty: self.lease_empty.load(Relaxed),
            complete: self.complete.load(Relaxed),
            open_step: self.open_step.load(Relaxed),
            errors: self.errors.load(Relaxed),
            heartbeat_us: self.heartbeat_us.load(Relaxed),
            lease_us: self.lease_us.load(Relaxed),
            complete_us: self.complete_us.load(Relaxed),
        }
    }
}

fn us_since(t0: Instant) -> u64 {
    t0.elapsed().as_micros() as u64
}

/// utime + stime of a process in seconds, from /proc/<pid>/stat.
fn cpu_seconds(pid: &str, tick: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: the fields that follow start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("odd /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: f64 = f.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let stime: f64 = f.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok((utime + stime) / tick)
}

fn clock_tick() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

async fn sim_actor(
    id: String,
    mut c: CoordinatorClient<AuthChannel>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    play: Duration,
) {
    let join = |c: &mut CoordinatorClient<AuthChannel>, id: String, counts: Arc<Counts>| {
        let mut c = c.clone();
        async move {
            loop {
                match c
                    .join(v1::JoinRequest { actor_id: id.clone(), device: "sim".into(), run_id: String::new() })
                    .await
                {
                    Ok(_) => {
                        counts.join.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(_) => {
                        counts.errors.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    join(&mut c, id.clone(), counts.clone()).await;
    while !stop.load(Relaxed) {
        let t0 = Instant::now();
        match c.lease_work(v1::LeaseWorkRequest { actor_id: id.clone(), ..Default::default() }).await {
            Ok(r) => {
                counts.lease_us.fetch_add(us_since(t0), Relaxed);
                let r = r.into_inner();
                match r.unit {
                    Some(u) => {
                        counts.lease_unit.fetch_add(1, Relaxed);
                        if !play.is_zero() {
                            tokio::time::sleep(play).await;
                        }
                        let t0 = Instant::now();
                        let req = v1::CompleteWorkRequest {
                            actor_id: id.clone(),
                            unit_id: u.unit_id,
                            done: true,
                            epoch: u.epoch,
                            incarnation: Some(u.incarnation),
                            ticket: u.ticket,
                        };
                        match c.complete_work(req).await {
                            Ok(_) => {
                                counts.complete_us.fetch_add(us_since(t0), Relaxed);
                                counts.complete.fetch_add(1, Relaxed);
                            }
                            Err(_) => {
                                counts.errors.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    None => {
                        counts.lease_empty.fetch_add(1, Relaxed);
                        tokio::time::sleep(Duration::from_millis(r.retry_after_ms.max(1))).await;
                    }
                }
            }
            Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                counts.errors.fetch_add(1, Relaxed);
                join(&mut c, id.clone(), counts.clone()).await;
            }
            Err(_) => {
                counts.errors.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn sim_heartbeats(
    id: String,
    mut c: CoordinatorClient<AuthChannel>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    period: Duration,
    phase: Duration,
) {
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Relaxed) {
        tick.tick().await;
        let t0 = Instant::now();
        match c.heartbeat(v1::HeartbeatRequest { actor_id: id.clone(), weights_version: 0 }).await {
            Ok(r) => {
                counts.heartbeat_us.fetch_add(us_since(t0), Relaxed);
                counts.heartbeat.fetch_add(1, Relaxed);
                if !r.into_inner().known {
                    counts.heartbeat_unknown.fetch_add(1, Relaxed);
                }
            }
            Err(_) => {
                counts.errors.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Kills the child coordinator when dropped (SIGTERM first, so it saves its state).
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    ensure!(
        a.actors > 0 && a.channels > 0 && a.units_per_step > 0,
        "--actors, --channels and --units-per-step must be positive"
    );
    let tmp = TempDir::new(a.dir.as_deref(), "coordinator")?;
    // One credential per role, in files as a deployment has them.
    let token_file = |role: &str| -> Result<(PathBuf, Credential)> {
        let path = tmp.path().join(format!("{role}.token"));
        std::fs::write(&path, selfplay_proto::auth::BearerToken::generate().secret())?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let cred = Credential::from_file(&path)?;
        Ok((path, cred))
    };
    let (learner_file, learner_cred) = token_file("learner")?;
    let (actor_file, actor_cred) = token_file("actor")?;
    let ready = tmp.path().join("ready.json");
    let log = tmp.path().join("coordinator.log");
    let exe = std::env::current_exe()?;
    let child = std::process::Command::new(&exe)
        .arg("coordinator")
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--ready-file")
        .arg(&ready)
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .args(["--lease-ttl-ms", &a.lease_ttl_ms.to_string()])
        .arg("--learner-tokens-file")
        .arg(&learner_file)
        .arg("--actor-tokens-file")
        .arg(&actor_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {} coordinator", exe.display()))?;
    let mut child = ChildGuard(child);
    let pid = child.0.id().to_string();
    let t0 = Instant::now();
    let grpc = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            break v["grpc"].as_str().ok_or_else(|| anyhow!("ready file without grpc"))?.to_string();
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!("the coordinator exited ({status}): {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        ensure!(t0.elapsed() < Duration::from_secs(30), "the coordinator did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr = format!("http://{grpc}");
    let tick = clock_tick();

    let rt = runtime()?;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let result = rt.block_on(async {
        let mut channels = vec![];
        for _ in 0..a.channels {
            channels.push(connect(&addr, H2::default()).await?);
        }
        let client = |i: usize| coordinator_client(channels[i % channels.len()].clone(), &actor_cred);
        let ttl = Duration::from_millis(a.lease_ttl_ms);
        let period = ttl / 3;
        let play = Duration::from_millis(a.play_ms);
        let mut tasks = vec![];
        for i in 0..a.actors {
            let id = format!("sim-{i:05}");
            let phase = period.mul_f64(i as f64 / a.actors as f64);
            // One client (one instance id) for the actor's work and its heartbeats, as a real
            // actor has: the coordinator takes a member's calls only from the instance that
            // joined.
            let c = client(i);
            tasks.push(tokio::spawn(sim_actor(id.clone(), c.clone(), counts.clone(), stop.clone(), play)));
            tasks.push(tokio::spawn(sim_heartbeats(id, c, counts.clone(), stop.clone(), period, phase)));
        }
        // The driver (the learner's part): keeps enough units open that no actor waits.
        let driver = {
            let mut c = coordinator_client(channels[0].clone(), &learner_cred);
            let (counts, stop) = (counts.clone(), stop.clone());
            let n = a.units_per_step as u64;
            // Every actor may hold a unit, and two steps' worth stay pending beyond that: an
            // OpenStep waits for the snapshot's fsync, so the driver keeps well ahead.
            let want = a.actors as u64 + 2 * n;
            tokio::spawn(async move {
                let (mut step, mut opened) = (0u64, 0u64);
                while !stop.load(Relaxed) {
                    while opened.saturating_sub(counts.complete.load(Relaxed)) < want {
                        let req = v1::OpenStepRequest {
                            step,
                            units: n as u32,
                            min_weights_version: 0,
                            discard_older: false,
                            ..Default::default()
                        };
                        c.open_step(req).await.map_err(|s| anyhow!("OpenStep: {}", s.message()))?;
                        counts.open_step.fetch_add(1, Relaxed);
                        step += 1;
                        opened += n;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok::<_, anyhow::Error>(())
            })
        };
        let t_join = Instant::now();
        while counts.join.load(Relaxed) < a.actors as u64 {
            ensure!(t_join.elapsed() < Duration::from_secs(60), "only {} of {} actors joined", counts.join.load(Relaxed), a.actors);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let join_s = t_join.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(a.warmup_seconds)).await;
        let (c0, cpu0, self0, load0, t0) = (counts.snap(), cpu_seconds(&pid, tick)?, cpu_seconds("self", tick)?, loadavg(), Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
        let (c1, cpu1, self1, wall) = (counts.snap(), cpu_seconds(&pid, tick)?, cpu_seconds("self", tick)?, t0.elapsed().as_secs_f64());
        stop.store(true, Relaxed);
        if driver.is_finished() {
            driver.await??;
        } else {
            driver.abort();
        }
        for t in tasks {
            t.abort();
        }
        let d = |f: fn(&CountsSnap) -> u64| f(&c1) - f(&c0);
        let rate = |n: u64| n as f64 / wall;
        let lease = d(|c| c.lease_unit) + d(|c| c.lease_empty);
        let total = d(|c| c.join) + d(|c| c.heartbeat) + lease + d(|c| c.complete) + d(|c| c.open_step);
        let cores = (cpu1 - cpu0) / wall;
        let mean_ms = |us: u64, n: u64| if n == 0 { 0.0 } else { us as f64 / n as f64 / 1000.0 };
        Ok::<_, anyhow::Error>(json!({
            "bench": "coordinator", "actors": a.actors, "channels": a.channels, "lease_ttl_ms": a.lease_ttl_ms,
            "units_per_step": a.units_per_step, "play_ms": a.play_ms, "join_all_s": join_s, "seconds": wall,
            "rpcs_per_s": {
                "total": rate(total), "Heartbeat": rate(d(|c| c.heartbeat)), "LeaseWork": rate(lease),
                "LeaseWork_with_unit": rate(d(|c| c.lease_unit)), "LeaseWork_empty": rate(d(|c| c.lease_empty)),
                "CompleteWork": rate(d(|c| c.complete)), "OpenStep": rate(d(|c| c.open_step)), "Join": rate(d(|c| c.join)),
            },
            "client_mean_latency_ms": {
                "Heartbeat": mean_ms(d(|c| c.heartbeat_us), d(|c| c.heartbeat)),
                "LeaseWork": mean_ms(d(|c| c.lease_us), lease),
                "CompleteWork": mean_ms(d(|c| c.complete_us), d(|c| c.complete)),
            },
            "units_completed_per_s": rate(d(|c| c.complete)),
            "errors": d(|c| c.errors), "heartbeats_unknown": d(|c| c.heartbeat_unknown),
            "coordinator_cpu_cores": cores,
            "coordinator_cpu_us_per_rpc": if total == 0 { 0.0 } else { (cpu1 - cpu0) * 1e6 / total as f64 },
            "load_generator_cpu_cores": (self1 - self0) / wall,
            "clock_tick": tick, "loadavg_start": load0, "loadavg_end": loadavg(), "machine": machine(),
        }))
    });
    let row = match result {
        Ok(r) => r,
        Err(e) => {
            let tail: String =
                std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(20).collect::<Vec<_>>().join("\n");
            return Err(e.context(format!("coordinator log (last lines, newest first):\n{tail}")));
        }
    };
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(child);
    emit(row);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench ingest

#[derive(clap::Args, Debug)]
pub struct IngestArgs {
    /// Groups per measurement.
    #[arg(long, default_value_t = 2000)]
    pub groups: usize,
    /// Answers per group (G).
    #[arg(long, default_value_t = 4)]
    pub group_size: usize,
    #[arg(long, default_value_t = 72)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub completion_tokens: usize,
    /// Concurrent clients to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub concurrency: Vec<usize>,
    /// Vocabulary size for the token ids (SmolLM2's by default).
    #[arg(long, default_value_t = 49152)]
    pub vocab: i64,
    /// Set TCP_NODELAY on the server's accepted connections (the learner does not today).
    #[arg(long)]
    pub server_nodelay: bool,
    /// Measure only the one-call-per-group (actor) mode, or only the long streams.
    #[arg(long, value_parser = ["both", "stream", "per-group"], default_value = "both")]
    pub modes: String,
}

fn synthetic_sequence(rng: &mut selfplay_policy::generate::SplitMix64, a: &IngestArgs) -> v1::Sequence {
    let ids = |rng: &mut selfplay_policy::generate::SplitMix64, n: usize| -> Vec<i64> {
        (0..n).map(|_| (rng.next_u64() % a.vocab as u64) as i64).collect()
    };
    let lps = |rng: &mut selfplay_policy::generate::SplitMix64, n: usize| -> Vec<f32> {
        (0..n).map(|_| -(rng.next_f64() as f32) * 5.0).collect()
    };
    let n = a.completion_tokens;
    v1::Sequence {
        prompt_ids: ids(rng, a.prompt_tokens),
        completion_ids: ids(rng, n),
        behaviour_logprobs: lps(rng, n),
        ref_logprobs: lps(rng, n),
        // The actor sends the decoded completion for logs: about 4 characters a token.
        text: "word".repeat(n),
    }
}

fn synthetic_group(
    i: usize,
    rng: &mut selfplay_policy::generate::SplitMix64,
    a: &IngestArgs,
    tickets: &selfplay_proto::ticket::LeaseTickets,
) -> v1::RolloutGroup {
    let (unit_id, actor_id) = (selfplay_coordinator::unit_id(0, i as u32), format!("bench-{}", i % 8));
    let lease = selfplay_proto::ticket::Lease { unit_id: &unit_id, epoch: 0, incarnation: 0, actor_id: &actor_id };
    v1::RolloutGroup {
        ticket: tickets.sign(&lease),
        unit_id,
        step: 0,
        weights_version: 0,
        actor_id,
        challenger: Some(synthetic_sequence(rng, a)),
        answers: (0..a.group_size)
            .map(|_| v1::Answer {
                sequence: Some(synthetic_sequence(rng, a)),
                reward: rng.next_f64() as f32,
                self_reward: (rng.next_f64() * 7.0) as f32,
                self_reward_parsed: true,
            })
            .collect(),
        play_seconds: 1.0,
        epoch: 0,
    }
}

/// Protobuf bytes of a sequence, near enough (varint ids, 4-byte floats, the text).
fn approx_sequence_bytes(s: &v1::Sequence) -> usize {
    let varint = |v: u64| ((64 - v.max(1).leading_zeros() as usize) + 6) / 7;
    let ids: usize = s.prompt_ids.iter().chain(&s.completion_ids).map(|&i| varint(i as u64)).sum();
    ids + 4 * (s.behaviour_logprobs.len() + s.ref_logprobs.len()) + s.text.len() + 16
}

fn approx_group_bytes(g: &v1::RolloutGroup) -> usize {
    g.challenger.iter().map(approx_sequence_bytes).sum::<usize>()
        + g.answers.iter().filter_map(|a| a.sequence.as_ref()).map(|s| approx_sequence_bytes(s) + 16).sum::<usize>()
        + g.unit_id.len()
        + g.actor_id.len()
        + 24
}

#[derive(Default, Debug)]
struct AckCounts {
    accepted: u64,
    duplicate: u64,
    rejected: u64,
}

impl AckCounts {
    fn add(&mut self, ack: &v1::RolloutAck) {
        if ack.accepted {
            self.accepted += 1;
        } else if ack.duplicate {
            self.duplicate += 1;
        } else {
            self.rejected += 1;
            tracing::warn!(unit = %ack.unit_id, reason = %ack.reason, "synthetic group rejected");
        }
    }
    fn merge(&mut self, o: AckCounts) {
        self.accepted += o.accepted;
        self.duplicate += o.duplicate;
        self.rejected += o.rejected;
    }
}

/// `groups` split over `c` clients; `per_group` = one SubmitRollouts call per group (what the
/// actor does), else one long stream per client.
async fn submit_all(
    addr: &str,
    credential: &Credential,
    groups: Vec<v1::RolloutGroup>,
    c: usize,
    per_group: bool,
) -> Result<(f64, AckCounts)> {
    let mut parts: Vec<Vec<v1::RolloutGroup>> = (0..c).map(|_| vec![]).collect();
    for (i, g) in groups.into_iter().enumerate() {
        parts[i % c].push(g);
    }
    let mut clients = vec![];
    for _ in 0..c {
        clients.push(learner_client(connect(addr, H2::default()).await?, credential));
    }
    let t0 = Instant::now();
    let mut tasks = vec![];
    for (mut client, part) in clients.into_iter().zip(parts) {
        tasks.push(tokio::spawn(async move {
            let mut counts = AckCounts::default();
            if per_group {
                for g in part {
                    let mut acks = client.submit_rollouts(tokio_stream::iter([g])).await?.into_inner();
                    let ack = acks.message().await?.ok_or_else(|| tonic::Status::unavailable("no ack"))?;
                    counts.add(&ack);
                }
            } else {
                let n = part.len();
                let mut acks = client.submit_rollouts(tokio_stream::iter(part)).await?.into_inner();
                for _ in 0..n {
                    let ack = acks.message().await?.ok_or_else(|| tonic::Status::unavailable("stream ended early"))?;
                    counts.add(&ack);
                }
            }
            Ok::<_, tonic::Status>(counts)
        }));
    }
    let mut total = AckCounts::default();
    for t in tasks {
        total.merge(t.await?.map_err(|s| anyhow!("SubmitRollouts: {}", s.message()))?);
    }
    Ok((t0.elapsed().as_secs_f64(), total))
}

pub fn ingest(a: IngestArgs) -> Result<()> {
    use selfplay_learner::inbox::Inbox;
    use selfplay_learner::service::{LearnerService, Shared};
    ensure!(a.groups > 0 && a.group_size > 0 && a.concurrency.iter().all(|&c| c > 0), "sizes must be positive");
    let limits = selfplay_game::rollout::GroupLimits {
        group_size: a.group_size,
        vocab_size: a.vocab,
        max_prompt_tokens: 4096,
        max_completion_tokens: a.completion_tokens.max(512),
        needs_challenger: true,
    };
    // N larger than any unit index: the inbox never completes a step, so nothing trains.
    let n = a.groups + 1;
    let fresh = || Inbox::new(0, 0, n, limits.clone());
    let mut rng = selfplay_policy::generate::SplitMix64::new(4);
    // The learner's credential keys the lease tickets the groups carry, as the coordinator's
    // leases give them.
    let (learner_cred, actor_cred) = (Credential::generate(), Credential::generate());
    let tickets = selfplay_proto::ticket::LeaseTickets::new(learner_cred.clone());
    let groups: Vec<v1::RolloutGroup> = (0..a.groups).map(|i| synthetic_group(i, &mut rng, &a, &tickets)).collect();
    let group_bytes = approx_group_bytes(&groups[0]);
    let tokens_per_group = (a.group_size + 1) * (a.prompt_tokens + a.completion_tokens);

    // Validation and deduplication alone, in memory (what every gRPC handler calls).
    let local = {
        let copies = groups.clone();
        let mut inbox = fresh();
        let t0 = Instant::now();
        for g in copies {
            let verdict = inbox.offer(g.into());
            ensure!(verdict == selfplay_learner::inbox::Verdict::Accepted, "synthetic group refused: {verdict:?}");
        }
        let accept_s = t0.elapsed().as_secs_f64();
        let copies = groups.clone();
        let t0 = Instant::now();
        for g in copies {
            ensure!(inbox.offer(g.into()) == selfplay_learner::inbox::Verdict::Duplicate, "duplicate not detected");
        }
        (accept_s, t0.elapsed().as_secs_f64())
    };
    emit(json!({
        "bench": "ingest_in_memory", "groups": a.groups, "group_size": a.group_size,
        "tokens_per_group": tokens_per_group, "approx_bytes_per_group": group_bytes,
        "validate_accept_groups_per_s": a.groups as f64 / local.0,
        "duplicate_groups_per_s": a.groups as f64 / local.1, "machine": machine(),
    }));

    let rt = runtime()?;
    let shared = Arc::new(Shared { inbox: std::sync::Mutex::new(fresh()), ready: std::sync::Condvar::new() });
    let (addr, stop, server) = rt.block_on(async {
        // The learner's server, as selfplay_learner::run builds it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = format!("http://{}", listener.local_addr()?);
        let svc = LearnerService { shared: shared.clone(), tickets };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let verifier = Verifier::new().with(Role::Actor, actor_cred.clone()).with(Role::Learner, learner_cred);
        let router = tonic::transport::Server::builder().add_service(selfplay_proto::guard::RoleGuard::new(
            selfplay_proto::v1::learner_server::LearnerServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            verifier,
            &selfplay_proto::guard::LEARNER_SERVICE,
        ));
        let shutdown = async move {
            let _ = rx.await;
        };
        let server = if a.server_nodelay {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown))
        } else {
            tokio::spawn(
                router.serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown),
            )
        };
        Ok::<_, anyhow::Error>((addr, tx, server))
    })?;
    // Warm-up (connections, allocations), not reported.
    rt.block_on(submit_all(&addr, &actor_cred, groups[..a.groups.min(100)].to_vec(), 1, false))?;

    let modes: &[bool] = match a.modes.as_str() {
        "stream" => &[false],
        "per-group" => &[true],
        _ => &[false, true],
    };
    for &c in &a.concurrency {
        for &per_group in modes {
            *shared.inbox.lock().expect("inbox lock") = fresh();
            let load = loadavg();
            let (secs, acks) = rt.block_on(submit_all(&addr, &actor_cred, groups.clone(), c, per_group))?;
            ensure!(
                acks.accepted == a.groups as u64,
                "only {} of {} groups accepted: {acks:?}",
                acks.accepted,
                a.groups
            );
            // The same groups again: every one is a duplicate.
            let (dup_secs, dups) = rt.block_on(submit_all(&addr, &actor_cred, groups.clone(), c, per_group))?;
            ensure!(
                dups.duplicate == a.groups as u64,
                "only {} of {} duplicates detected: {dups:?}",
                dups.duplicate,
                a.groups
            );
            emit(json!({
                "bench": "ingest", "mode": if per_group { "one call per group (actor)" } else { "one stream per client" },
                "clients": c, "groups": a.groups, "group_size": a.group_size, "tokens_per_group": tokens_per_group,
                "seconds": secs, "groups_per_s": a.groups as f64 / secs,
                "mb_per_s_approx": (a.groups * group_bytes) as f64 / 1e6 / secs,
                "duplicates_per_s": a.groups as f64 / dup_secs, "server_nodelay": a.server_nodelay, "loadavg": load,
            }));
        }
    }
    let _ = stop.send(());
    rt.block_on(server)?.map_err(|e| anyhow!("learner server: {e}"))?;
    Ok(())
}
