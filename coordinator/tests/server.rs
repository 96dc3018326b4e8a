//! The real coordinator server on 127.0.0.1 (port chosen by the OS) with a temporary state
//! directory, driven by real tonic clients.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use selfplay_coordinator::{serve, unit_seed, CoordinatorConfig, CoordinatorError, TlsConfig, SERVICE_NAME};
use selfplay_proto::auth::BearerToken;
use selfplay_proto::client::{coordinator_client, AuthChannel};
use selfplay_proto::v1::coordinator_client::CoordinatorClient;
use selfplay_proto::v1::*;
use selfplay_proto::weights::{into_chunks, manifest_digest, sha256_hex, ManifestBuilder, WeightAssembler};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), CoordinatorError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn config(dir: &Path, ttl_ms: u64, token: &BearerToken) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir: dir.to_path_buf(),
        lease_ttl_ms: ttl_ms,
        run_seed: 1234,
        token: Some(token.clone()),
        ..CoordinatorConfig::default()
    }
}

async fn start(config: CoordinatorConfig) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(config, listener, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, task }
}

async fn channel(addr: SocketAddr) -> Channel {
    // The server may still be starting: retry briefly.
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    for _ in 0..100 {
        if let Ok(c) = endpoint.connect().await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot connect to {addr}");
}

async fn client(addr: SocketAddr, token: &BearerToken) -> CoordinatorClient<AuthChannel> {
    coordinator_client(channel(addr).await, token)
}

async fn join(c: &mut CoordinatorClient<AuthChannel>, actor: &str) -> JoinResponse {
    c.join(JoinRequest { actor_id: actor.into(), device: "cpu".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

async fn lease(c: &mut CoordinatorClient<AuthChannel>, actor: &str) -> Option<WorkUnit> {
    c.lease_work(LeaseWorkRequest { actor_id: actor.into(), ..Default::default() }).await.unwrap().into_inner().unit
}

async fn complete(c: &mut CoordinatorClient<AuthChannel>, actor: &str, unit: &str) {
    c.complete_work(CompleteWorkRequest {
        actor_id: actor.into(),
        unit_id: unit.into(),
        done: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn status(c: &mut CoordinatorClient<AuthChannel>) -> StatusResponse {
    c.status(StatusRequest {}).await.unwrap().into_inner()
}

fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// About 20 MB in a few tensors of odd sizes, so chunks straddle tensor boundaries.
fn weights(version: u64, seed: u64) -> (WeightManifest, Vec<u8>) {
    let mut b = ManifestBuilder::new();
    b.push("embed", &[1000, 4999], "bf16", &random_bytes(1000 * 4999 * 2, seed));
    b.push("norm", &[4999], "f32", &random_bytes(4999 * 4, seed + 1));
    b.push("layers.0.mlp", &[2500, 1000], "f32", &random_bytes(2500 * 1000 * 4, seed + 2));
    b.push("head", &[3, 333], "f16", &random_bytes(3 * 333 * 2, seed + 3));
    b.finish(version, version * 10).unwrap()
}

async fn publish(
    c: &mut CoordinatorClient<AuthChannel>,
    manifest: WeightManifest,
    payload: Vec<u8>,
) -> Result<PublishWeightsResponse, tonic::Status> {
    c.publish_weights(tokio_stream::iter(into_chunks(manifest, payload.into()))).await.map(|r| r.into_inner())
}

async fn fetch(
    c: &mut CoordinatorClient<AuthChannel>,
    version: u64,
) -> Result<(WeightManifest, Vec<u8>), tonic::Status> {
    let mut stream = c.fetch_weights(FetchWeightsRequest { version }).await?.into_inner();
    let mut asm = WeightAssembler::new();
    while let Some(chunk) = stream.message().await? {
        asm.push(chunk).map_err(tonic::Status::from)?;
    }
    asm.finish().map_err(tonic::Status::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_lease_moves_the_unit_to_the_other_actor() {
    let dir = tempfile::tempdir().unwrap();
    let token = BearerToken::generate();
    let server = start(config(dir.path(), 300, &token)).await;
    let mut a = client(server.addr, &token).await;
    let mut b = client(server.addr, &token).await;
    assert_eq!(join(&mut a, "actor-a").await.lease_ttl_ms, 300);
    join(&mut b, "actor-b").await;
    // Nothing to do yet: the answer says when to ask again.
    let empty =
        a.lease_work(LeaseWorkRequest { actor_id: "actor-a".into(), ..Default::default() }).await.unwrap().into_inner();
    assert!(empty.unit.is_none() && empty.retry_after_ms > 0);

    b.open_step(OpenStepRequest {
        step: 1,
        units: 4,
        min_weights_version: 0,
        prompts: (0..4).map(|i| format!("prompt {i}")).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ua = lease(&mut a, "actor-a").await.unwrap();
    assert_eq!((ua.unit_id.as_str(), ua.step, ua.prompt.as_str()), ("s1-u0", 1, "prompt 0"));
    assert_eq!(ua.seed, unit_seed(1234, 1, 0));
    let ub = lease(&mut b, "actor-b").await.unwrap();
    assert_eq!(ub.unit_id, "s1-u1");
    complete(&mut b, "actor-b", &ub.unit_id).await;

    // actor-a goes silent; actor-b keeps heartbeating past a's TTL.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(700) {
        let hb = b
            .heartbeat(HeartbeatRequest { actor_id: "actor-b".into(), weights_version: 0 })
            .await
            .unwrap()
            .into_inner();
        assert!(hb.known);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let st = status(&mut b).await;
    let ids: Vec<&str> = st.actors.iter().map(|x| x.actor_id.as_str()).collect();
    assert_eq!(ids, ["actor-b"]);
    assert_eq!(st.units_pending, 3);

    // The expired unit comes first, to the other actor, with the same seed.
    let again = lease(&mut b, "actor-b").await.unwrap();
    assert_eq!(again.unit_id, "s1-u0");
    assert_eq!(again.seed, ua.seed);
    assert_eq!(again.prompt, "prompt 0");

    // actor-a is unknown now: its heartbeat says so and it cannot lease until it joins.
    let hb =
        a.heartbeat(HeartbeatRequest { actor_id: "actor-a".into(), weights_version: 0 }).await.unwrap().into_inner();
    assert!(!hb.known);
    let err = a.lease_work(LeaseWorkRequest { actor_id: "actor-a".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Finish the step: every unit done once.
    complete(&mut b, "actor-b", &again.unit_id).await;
    let mut seen = vec![ub.unit_id.clone(), again.unit_id.clone()];
    while let Some(u) = lease(&mut b, "actor-b").await {
        assert!(!seen.contains(&u.unit_id), "{} issued twice", u.unit_id);
        complete(&mut b, "actor-b", &u.unit_id).await;
        seen.push(u.unit_id);
    }
    seen.sort();
    assert_eq!(seen, ["s1-u0", "s1-u1", "s1-u2", "s1-u3"]);
    let st = status(&mut b).await;
    assert_eq!((st.units_done_total, st.units_issued_total, st.units_reissued_total), (4, 5, 1));
    assert_eq!((st.units_pending, st.units_leased, st.open_step), (0, 0, 1));
    assert_eq!(st.actors[0].units_done, 4);
    assert!(st.units_per_second > 0.0);
    // A late report from the expired actor is harmless.
    complete(&mut a, "actor-a", "s1-u0").await;
    assert_eq!(status(&mut b).await.units_done_total, 4);
    drop((a, b));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_publish_once_fetch_concurrently_and_reject_bad_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let token = BearerToken::generate();
    let server = start(config(dir.path(), 10_000, &token)).await;
    let mut learner = client(server.addr, &token).await;

    let err = fetch(&mut learner, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let (manifest, payload) = weights(1, 7);
    assert!(payload.len() > 19_000_000, "{}", payload.len());
    let t = Instant::now();
    let resp = publish(&mut learner, manifest.clone(), payload.clone()).await.unwrap();
    eprintln!("publish {} MB: {:.3} s", payload.len() / 1_000_000, t.elapsed().as_secs_f64());
    assert_eq!(resp.version, 1);

    // Three actors fetch at once, each on its own connection.
    let t = Instant::now();
    let mut tasks = Vec::new();
    for version in [1, 0, 1] {
        let (addr, token) = (server.addr, token.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr, &token).await;
            fetch(&mut c, version).await.unwrap()
        }));
    }
    for t in tasks {
        let (m, p) = t.await.unwrap();
        assert_eq!(m, manifest);
        assert_eq!(sha256_hex(&p), sha256_hex(&payload));
        assert!(p == payload);
    }
    eprintln!("3 concurrent fetches of {} MB: {:.3} s", payload.len() / 1_000_000, t.elapsed().as_secs_f64());
    assert_eq!(fetch(&mut learner, 5).await.unwrap_err().code(), Code::NotFound);

    // A tensor whose checksum does not match: refused, named, nothing stored.
    let before_files = list(&dir.path().join("weights"));
    let (mut bad, bad_payload) = weights(2, 99);
    bad.tensors[2].sha256 = sha256_hex(b"something else");
    bad.sha256 = manifest_digest(&bad.tensors); // a manifest that agrees with itself
    let err = publish(&mut learner, bad, bad_payload.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("layers.0.mlp"), "{}", err.message());
    // A manifest whose own sha256 is not the digest of its tensors' digests.
    let (mut bad, _) = weights(2, 99);
    bad.sha256 = sha256_hex(b"not the payload");
    let err = publish(&mut learner, bad, bad_payload).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("manifest field sha256"), "{}", err.message());
    // Data before the manifest.
    let err = learner
        .publish_weights(tokio_stream::iter(vec![WeightChunk {
            part: Some(weight_chunk::Part::Data(vec![1, 2, 3].into())),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(status(&mut learner).await.weight_versions, [1]);
    assert_eq!(list(&dir.path().join("weights")), before_files);
    assert_eq!(learner.heartbeat(HeartbeatRequest::default()).await.unwrap().into_inner().latest_weights_version, 1);

    // Versions beyond keep_versions (2) are pruned.
    for v in [2, 3] {
        let (m, p) = weights(v, v);
        publish(&mut learner, m, p).await.unwrap();
    }
    assert_eq!(status(&mut learner).await.weight_versions, [2, 3]);
    assert_eq!(fetch(&mut learner, 1).await.unwrap_err().code(), Code::NotFound);
    drop(learner);
    server.stop().await;
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_token_is_unauthenticated_and_health_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let token = BearerToken::generate();
    let server = start(config(dir.path(), 10_000, &token)).await;
    let ch = channel(server.addr).await;

    let mut anonymous = CoordinatorClient::new(ch.clone());
    let err = anonymous.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = anonymous.join(JoinRequest { actor_id: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut wrong = coordinator_client(ch.clone(), &BearerToken::new("not-the-token").unwrap());
    let err = wrong.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Streaming RPCs are guarded too.
    let (m, p) = weights(1, 1);
    let err = publish(&mut wrong, m, p).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Nothing reached the state.
    let mut right = coordinator_client(ch.clone(), &token);
    let st = status(&mut right).await;
    assert!(st.actors.is_empty() && st.weight_versions.is_empty());

    // Health needs no token and says SERVING, overall and for the Coordinator.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in ["", SERVICE_NAME] {
        let r =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }

    // Reflection lists the services.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch);
    let mut responses = refl
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("unexpected reflection answer {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == SERVICE_NAME), "{names:?}");
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
    drop((anonymous, wrong, right, health, responses));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_steps_and_weights_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let token = BearerToken::generate();
    let server = start(config(dir.path(), 10_000, &token)).await;
    let mut c = client(server.addr, &token).await;
    join(&mut c, "actor-a").await;
    let open = OpenStepRequest {
        step: 2,
        units: 4,
        min_weights_version: 1,
        tasks: (0..4).map(|i| format!("task {i}")).collect(),
        ..Default::default()
    };
    c.open_step(open.clone()).await.unwrap();
    let (manifest, payload) = weights(1, 3);
    publish(&mut c, manifest.clone(), payload.clone()).await.unwrap();
    let u0 = lease(&mut c, "actor-a").await.unwrap();
    let u1 = lease(&mut c, "actor-a").await.unwrap();
    complete(&mut c, "actor-a", &u0.unit_id).await;
    // u1 is leased when the coordinator stops.
    drop(c);
    server.stop().await;

    let server = start(config(dir.path(), 10_000, &token)).await;
    let mut c = client(server.addr, &token).await;
    let st = status(&mut c).await;
    assert!(st.actors.is_empty());
    assert_eq!(st.open_step, 2);
    assert_eq!((st.units_pending, st.units_leased), (3, 0));
    assert_eq!(st.weight_versions, [1]);
    assert_eq!(st.units_done_total, 1);
    // The actor learns it must join again.
    let hb =
        c.heartbeat(HeartbeatRequest { actor_id: "actor-a".into(), weights_version: 1 }).await.unwrap().into_inner();
    assert!(!hb.known);
    assert_eq!(hb.latest_weights_version, 1);
    assert_eq!(join(&mut c, "actor-a").await.latest_weights_version, 1);
    // Repeating OpenStep after the restart is still a no-op.
    c.open_step(open).await.unwrap();
    // The unit that was leased comes first, unchanged; the done one never comes back.
    let again = lease(&mut c, "actor-a").await.unwrap();
    assert_eq!(again, u1);
    assert_eq!(again.task, "task 1");
    assert_eq!(again.min_weights_version, 1);
    let mut rest = Vec::new();
    while let Some(u) = lease(&mut c, "actor-a").await {
        rest.push(u.unit_id);
    }
    assert_eq!(rest, ["s2-u2", "s2-u3"]);
    let (m, p) = fetch(&mut c, 1).await.unwrap();
    assert_eq!(m, manifest);
    assert!(p == payload);
    drop(c);
    server.stop().await;
}

/// A learner restarted from an older checkpoint begins a new epoch: the versions of the lost
/// future are gone, and nothing of the old epoch (publish, step, completion) acts after it.
/// A second coordinator cannot open the same state directory; the epoch survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_epoch_supersedes_the_old_future() {
    use selfplay_proto::v1::BeginEpochRequest;
    let dir = tempfile::tempdir().unwrap();
    let token = BearerToken::generate();
    let server = start(config(dir.path(), 10_000, &token)).await;
    let mut c = client(server.addr, &token).await;
    let begin =
        |version: u64, last_epoch: u64| BeginEpochRequest { version, last_epoch, run_id: "run-a".into(), run_seed: 77 };
    let e1 = c.begin_epoch(begin(0, 0)).await.unwrap().into_inner();
    assert_eq!((e1.epoch, e1.run_seed), (1, 77));
    for v in 0..=3 {
        let (mut m, p) = weights(v, v);
        m.epoch = 1;
        publish(&mut c, m, p).await.unwrap();
    }
    join(&mut c, "actor-a").await;
    c.open_step(OpenStepRequest { step: 3, units: 2, min_weights_version: 3, epoch: 1, ..Default::default() })
        .await
        .unwrap();
    let u = lease(&mut c, "actor-a").await.unwrap();
    assert_eq!(u.epoch, 1);
    assert_eq!(u.seed, selfplay_proto::unit::unit_seed(77, 3, 0));

    // The learner comes back from its checkpoint at version 1.
    let e2 = c.begin_epoch(begin(1, 1)).await.unwrap().into_inner();
    assert_eq!(e2.epoch, 2);
    let st = status(&mut c).await;
    assert_eq!((st.epoch, st.units_pending, st.units_leased), (2, 0, 0));
    // Versions 0 and 1 were pruned (keep_versions = 2); 2 and 3 belong to the lost future.
    assert!(st.weight_versions.is_empty(), "{st:?}");
    // Late acts of epoch 1 are refused and change nothing.
    let err = c
        .complete_work(CompleteWorkRequest {
            actor_id: "actor-a".into(),
            unit_id: u.unit_id,
            done: true,
            epoch: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().starts_with(selfplay_proto::error::SUPERSEDED_EPOCH), "{err:?}");
    let (mut m, p) = weights(2, 9);
    m.epoch = 1;
    assert_eq!(publish(&mut c, m, p).await.unwrap_err().code(), tonic::Code::FailedPrecondition);
    let err = c.open_step(OpenStepRequest { step: 3, units: 2, epoch: 1, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let st = status(&mut c).await;
    assert_eq!((st.units_done_total, st.weight_versions.len()), (0, 0));
    // The new epoch publishes its version 1 and goes on.
    let (mut m, p) = weights(1, 1);
    m.epoch = 2;
    publish(&mut c, m.clone(), p).await.unwrap();
    assert_eq!(fetch(&mut c, 0).await.unwrap().0, m);
    // Another run is refused, with a clear reason.
    let err = c.begin_epoch(BeginEpochRequest { run_id: "run-b".into(), ..begin(0, 0) }).await.unwrap_err();
    assert!(err.message().contains("run-a"), "{err:?}");
    let err = c.join(JoinRequest { actor_id: "x".into(), run_id: "run-b".into(), ..Default::default() }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::FailedPrecondition);
    // A hostile step size is refused, not allocated.
    let err =
        c.open_step(OpenStepRequest { step: 4, units: u32::MAX, epoch: 2, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A second coordinator on the same state directory is refused while the first runs.
    let second = selfplay_coordinator::CoordinatorService::open(&config(dir.path(), 10_000, &token));
    assert!(second.unwrap_err().to_string().contains("in use by another coordinator"));
    drop(c);
    server.stop().await;
    // The epoch and the run survive a restart.
    let server = start(config(dir.path(), 10_000, &token)).await;
    let mut c = client(server.addr, &token).await;
    let st = status(&mut c).await;
    assert_eq!((st.epoch, st.run_id.as_str(), st.weight_versions.clone()), (2, "run-a", vec![1]));
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let ca = dir.path().join("ca.pem");
    // openssl is part of every machine image this project runs on: a failure here is a
    // failure of the test, not a reason to skip it.
    make_certificates(dir.path()).expect("openssl makes the test certificates");
    let token = BearerToken::generate();
    let mut cfg = config(&dir.path().join("state"), 10_000, &token);
    cfg.tls = Some(TlsConfig { cert: cert.clone(), key });
    let server = start(cfg).await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()))
        .domain_name("localhost");
    let endpoint = Endpoint::from_shared(format!("https://{}", server.addr)).unwrap().tls_config(tls).unwrap();
    let mut ch = Err(None);
    for _ in 0..100 {
        match endpoint.connect().await {
            Ok(c) => {
                ch = Ok(c);
                break;
            }
            Err(e) => ch = Err(Some(e)),
        }
        if server.task.is_finished() {
            panic!("the TLS server stopped: {:?}", server.task.await);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = coordinator_client(ch.expect("TLS connect"), &token);
    join(&mut c, "tls-actor").await;
    assert_eq!(status(&mut c).await.actors.len(), 1);

    // A plaintext client gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let result = match plain.connect().await {
        Ok(ch) => coordinator_client(ch, &token).status(StatusRequest {}).await.map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    };
    assert!(result.is_err());
    drop(c);
    server.stop().await;
}

/// A test CA (`ca.pem`) and a server certificate it signed for localhost and 127.0.0.1
/// (`cert.pem`, `key.pem`), made with the openssl command.
fn make_certificates(dir: &Path) -> Result<(), String> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let ext = dir.join("leaf.ext");
    std::fs::write(&ext, "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        .map_err(|e| e.to_string())?;
    let steps: Vec<Vec<String>> = vec![
        [&["req", "-x509"][..], &ec, &["-days", "1", "-subj", "/CN=selfplay-test-ca"]].concat(),
        [&["req"][..], &ec, &["-subj", "/CN=localhost"]].concat(),
        vec!["x509", "-req", "-days", "1", "-CAcreateserial"],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    let p = |name: &str| dir.join(name).display().to_string();
    let files: [Vec<String>; 3] = [
        vec!["-keyout".into(), p("ca.key"), "-out".into(), p("ca.pem")],
        vec!["-keyout".into(), p("key.pem"), "-out".into(), p("leaf.csr")],
        vec![
            "-in".into(),
            p("leaf.csr"),
            "-CA".into(),
            p("ca.pem"),
            "-CAkey".into(),
            p("ca.key"),
            "-extfile".into(),
            ext.display().to_string(),
            "-out".into(),
            p("cert.pem"),
        ],
    ];
    for (args, files) in steps.iter().zip(files.iter()) {
        let out = std::process::Command::new("openssl").args(args).args(files).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    Ok(())
}
