//! The real coordinator server on 127.0.0.1 (port chosen by the OS) with a temporary state
//! directory, driven by real tonic clients.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use selfplay_coordinator::{
    serve, unit_seed, CoordinatorConfig, CoordinatorCredentials, CoordinatorError, TlsConfig, SERVICE_NAME,
};
use selfplay_proto::auth::{BearerToken, Credential};
use selfplay_proto::client::{coordinator_client, AuthChannel};
use selfplay_proto::ticket::{Lease, LeaseTickets};
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

/// One credential per role.
#[derive(Clone)]
struct Creds {
    learner: Credential,
    actor: Credential,
    operator: Credential,
}

impl Creds {
    fn new() -> Self {
        Self { learner: Credential::generate(), actor: Credential::generate(), operator: Credential::generate() }
    }
}

fn config(dir: &Path, ttl_ms: u64, creds: &Creds) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir: dir.to_path_buf(),
        lease_ttl_ms: ttl_ms,
        run_seed: 1234,
        credentials: Some(CoordinatorCredentials {
            learner: creds.learner.clone(),
            actor: creds.actor.clone(),
            operator: Some(creds.operator.clone()),
        }),
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

async fn client(addr: SocketAddr, credential: &Credential) -> CoordinatorClient<AuthChannel> {
    coordinator_client(channel(addr).await, credential)
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

/// Reports `unit` done with its lease's ticket.
async fn complete(c: &mut CoordinatorClient<AuthChannel>, actor: &str, unit: &WorkUnit) {
    c.complete_work(done_request(actor, unit)).await.unwrap();
}

fn done_request(actor: &str, unit: &WorkUnit) -> CompleteWorkRequest {
    CompleteWorkRequest {
        actor_id: actor.into(),
        unit_id: unit.unit_id.clone(),
        done: true,
        epoch: unit.epoch,
        incarnation: Some(unit.incarnation),
        ticket: unit.ticket.clone(),
    }
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
    let creds = Creds::new();
    let server = start(config(dir.path(), 300, &creds)).await;
    let mut a = client(server.addr, &creds.actor).await;
    let mut b = client(server.addr, &creds.actor).await;
    let mut learner = client(server.addr, &creds.learner).await;
    assert_eq!(join(&mut a, "actor-a").await.lease_ttl_ms, 300);
    join(&mut b, "actor-b").await;
    // Nothing to do yet: the answer says when to ask again.
    let empty =
        a.lease_work(LeaseWorkRequest { actor_id: "actor-a".into(), ..Default::default() }).await.unwrap().into_inner();
    assert!(empty.unit.is_none() && empty.retry_after_ms > 0);

    learner
        .open_step(OpenStepRequest {
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
    complete(&mut b, "actor-b", &ub).await;

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
    let st = status(&mut learner).await;
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
    complete(&mut b, "actor-b", &again).await;
    let mut seen = vec![ub.unit_id.clone(), again.unit_id.clone()];
    while let Some(u) = lease(&mut b, "actor-b").await {
        assert!(!seen.contains(&u.unit_id), "{} issued twice", u.unit_id);
        complete(&mut b, "actor-b", &u).await;
        seen.push(u.unit_id);
    }
    seen.sort();
    assert_eq!(seen, ["s1-u0", "s1-u1", "s1-u2", "s1-u3"]);
    let st = status(&mut learner).await;
    assert_eq!((st.units_done_total, st.units_issued_total, st.units_reissued_total), (4, 5, 1));
    assert_eq!((st.units_pending, st.units_leased, st.open_step), (0, 0, 1));
    assert_eq!(st.actors[0].units_done, 4);
    assert!(st.units_per_second > 0.0);
    // A late report from the expired actor is harmless.
    complete(&mut a, "actor-a", &ua).await;
    assert_eq!(status(&mut learner).await.units_done_total, 4);
    drop((a, b, learner));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn weights_publish_once_fetch_concurrently_and_reject_bad_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut learner = client(server.addr, &creds.learner).await;
    let mut actor = client(server.addr, &creds.actor).await;

    let err = fetch(&mut actor, 0).await.unwrap_err();
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
        let (addr, actor) = (server.addr, creds.actor.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr, &actor).await;
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
    assert_eq!(fetch(&mut actor, 5).await.unwrap_err().code(), Code::NotFound);

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
    assert_eq!(actor.heartbeat(HeartbeatRequest::default()).await.unwrap().into_inner().latest_weights_version, 1);

    // Versions beyond keep_versions (2) are pruned.
    for v in [2, 3] {
        let (m, p) = weights(v, v);
        publish(&mut learner, m, p).await.unwrap();
    }
    assert_eq!(status(&mut learner).await.weight_versions, [2, 3]);
    assert_eq!(fetch(&mut actor, 1).await.unwrap_err().code(), Code::NotFound);
    drop((learner, actor));
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
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let ch = channel(server.addr).await;

    let mut anonymous = CoordinatorClient::new(ch.clone());
    let err = anonymous.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = anonymous.join(JoinRequest { actor_id: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let mut wrong = coordinator_client(ch.clone(), &BearerToken::new("not-the-token").unwrap().into());
    let err = wrong.status(StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Streaming RPCs are guarded too.
    let (m, p) = weights(1, 1);
    let err = publish(&mut wrong, m, p).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Nothing reached the state.
    let mut right = coordinator_client(ch.clone(), &creds.operator);
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
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut c = client(server.addr, &creds.actor).await;
    let mut l = client(server.addr, &creds.learner).await;
    join(&mut c, "actor-a").await;
    let open = OpenStepRequest {
        step: 2,
        units: 4,
        min_weights_version: 1,
        tasks: (0..4).map(|i| format!("task {i}")).collect(),
        ..Default::default()
    };
    l.open_step(open.clone()).await.unwrap();
    let (manifest, payload) = weights(1, 3);
    publish(&mut l, manifest.clone(), payload.clone()).await.unwrap();
    let u0 = lease(&mut c, "actor-a").await.unwrap();
    let u1 = lease(&mut c, "actor-a").await.unwrap();
    complete(&mut c, "actor-a", &u0).await;
    // u1 is leased when the coordinator stops.
    drop((c, l));
    server.stop().await;

    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut c = client(server.addr, &creds.actor).await;
    let mut l = client(server.addr, &creds.learner).await;
    let st = status(&mut l).await;
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
    l.open_step(open).await.unwrap();
    // The unit that was leased comes first, unchanged (its ticket too: same lease fields);
    // the done one never comes back.
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
    drop((c, l));
    server.stop().await;
}

/// A learner restarted from an older checkpoint begins a new epoch: the versions of the lost
/// future are gone, and nothing of the old epoch (publish, step, completion) acts after it.
/// A second coordinator cannot open the same state directory; the epoch survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_epoch_supersedes_the_old_future() {
    use selfplay_proto::v1::BeginEpochRequest;
    let dir = tempfile::tempdir().unwrap();
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut c = client(server.addr, &creds.learner).await;
    let mut a = client(server.addr, &creds.actor).await;
    let begin =
        |version: u64, last_epoch: u64| BeginEpochRequest { version, last_epoch, run_id: "run-a".into(), run_seed: 77 };
    let e1 = c.begin_epoch(begin(0, 0)).await.unwrap().into_inner();
    assert_eq!((e1.epoch, e1.run_seed), (1, 77));
    for v in 0..=3 {
        let (mut m, p) = weights(v, v);
        m.epoch = 1;
        publish(&mut c, m, p).await.unwrap();
    }
    join(&mut a, "actor-a").await;
    c.open_step(OpenStepRequest { step: 3, units: 2, min_weights_version: 3, epoch: 1, ..Default::default() })
        .await
        .unwrap();
    let u = lease(&mut a, "actor-a").await.unwrap();
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
    let err = a.complete_work(done_request("actor-a", &u)).await.unwrap_err();
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
    assert_eq!(fetch(&mut a, 0).await.unwrap().0, m);
    // Another run is refused, with a clear reason.
    let err = c.begin_epoch(BeginEpochRequest { run_id: "run-b".into(), ..begin(0, 0) }).await.unwrap_err();
    assert!(err.message().contains("run-a"), "{err:?}");
    let err = a.join(JoinRequest { actor_id: "x".into(), run_id: "run-b".into(), ..Default::default() }).await;
    assert_eq!(err.unwrap_err().code(), tonic::Code::FailedPrecondition);
    // A hostile step size is refused, not allocated.
    let err =
        c.open_step(OpenStepRequest { step: 4, units: u32::MAX, epoch: 2, ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // A second coordinator on the same state directory is refused while the first runs.
    let second = selfplay_coordinator::CoordinatorService::open(&config(dir.path(), 10_000, &creds));
    assert!(second.unwrap_err().to_string().contains("in use by another coordinator"));
    drop((c, a));
    server.stop().await;
    // The epoch and the run survive a restart.
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut c = client(server.addr, &creds.operator).await;
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
    let creds = Creds::new();
    let mut cfg = config(&dir.path().join("state"), 10_000, &creds);
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
    let ch = ch.expect("TLS connect");
    let mut c = coordinator_client(ch.clone(), &creds.actor);
    join(&mut c, "tls-actor").await;
    assert_eq!(status(&mut coordinator_client(ch, &creds.operator)).await.actors.len(), 1);

    // A plaintext client gets nowhere.
    let plain = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    let result = match plain.connect().await {
        Ok(ch) => coordinator_client(ch, &creds.operator).status(StatusRequest {}).await.map(|_| ()),
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

/// Every coordinator RPC called with each role's credential: the calls outside the role get
/// PERMISSION_DENIED and change nothing; a reward client's credential, which the coordinator
/// does not know, gets UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_refused_every_rpc_outside_its_role() {
    use selfplay_proto::auth::Role;
    let dir = tempfile::tempdir().unwrap();
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let ch = channel(server.addr).await;
    let reward_client = Credential::generate();
    for (role, cred) in [
        (Some(Role::Learner), &creds.learner),
        (Some(Role::Actor), &creds.actor),
        (Some(Role::Operator), &creds.operator),
        (None, &reward_client),
    ] {
        let mut c = coordinator_client(ch.clone(), cred);
        let (m, p) = weights(1, 1);
        let calls: Vec<(&str, (Code, String))> = vec![
            (
                "Join",
                c.join(JoinRequest { actor_id: "x".into(), ..Default::default() })
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "Heartbeat",
                c.heartbeat(HeartbeatRequest::default())
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "Leave",
                c.leave(LeaveRequest { actor_id: "nobody".into() })
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "LeaseWork",
                c.lease_work(LeaseWorkRequest::default())
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "CompleteWork",
                c.complete_work(CompleteWorkRequest::default())
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "FetchWeights",
                c.fetch_weights(FetchWeightsRequest::default())
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "OpenStep",
                c.open_step(OpenStepRequest { step: 9, units: 1, ..Default::default() })
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "PublishWeights",
                publish(&mut c, m, p)
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "BeginEpoch",
                c.begin_epoch(BeginEpochRequest::default())
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
            (
                "Status",
                c.status(StatusRequest {})
                    .await
                    .err()
                    .map_or((Code::Ok, String::new()), |e| (e.code(), e.message().to_string())),
            ),
        ];
        assert_eq!(calls.len(), selfplay_proto::guard::COORDINATOR.rules.len(), "every RPC is tried");
        for (rpc, (code, message)) in calls {
            // The guard's refusal, as opposed to the service's answer to a call it took.
            let outside = code == Code::PermissionDenied && message.contains("may not call");
            let allowed = selfplay_proto::guard::COORDINATOR.allowed(rpc).unwrap();
            match role {
                None => assert_eq!(code, Code::Unauthenticated, "reward client on {rpc}"),
                Some(r) if allowed.contains(&r) => {
                    assert!(!outside && code != Code::Unauthenticated, "{r} on {rpc}: {code:?} {message}")
                }
                Some(r) => assert!(outside, "{r} on {rpc}: {code:?} {message}"),
            }
        }
    }
    // Only the calls within a role acted: the actor's join and the learner's epoch (which
    // dropped the step and the weights the learner made before it).
    let st = status(&mut coordinator_client(ch, &creds.operator)).await;
    let seen = (st.epoch, st.open_step, st.actors.len(), st.actors[0].actor_id.as_str(), st.weight_versions.len());
    assert_eq!(seen, (1, 0, 1, "x", 0), "{st:?}");
    server.stop().await;
}

/// Two actors with the same (valid) actor credential: neither can complete, hand back, renew,
/// lease for or leave in the name of the other, nor take its id while it lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_cannot_touch_another_actors_unit_or_membership() {
    let dir = tempfile::tempdir().unwrap();
    let creds = Creds::new();
    let server = start(config(dir.path(), 10_000, &creds)).await;
    let mut l = client(server.addr, &creds.learner).await;
    let mut honest = client(server.addr, &creds.actor).await;
    let mut hostile = client(server.addr, &creds.actor).await;
    join(&mut honest, "honest").await;
    join(&mut hostile, "hostile").await;
    l.open_step(OpenStepRequest { step: 1, units: 2, ..Default::default() }).await.unwrap();
    let u = lease(&mut honest, "honest").await.unwrap();
    let mine = lease(&mut hostile, "hostile").await.unwrap();

    let denied = |r: Result<tonic::Response<CompleteWorkResponse>, tonic::Status>| {
        assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
    };
    // Completing or handing back the honest actor's unit: without its ticket, with a ticket
    // of another unit, or with its ticket under another name.
    denied(hostile.complete_work(CompleteWorkRequest { ticket: String::new(), ..done_request("honest", &u) }).await);
    denied(
        hostile.complete_work(CompleteWorkRequest { ticket: mine.ticket.clone(), ..done_request("honest", &u) }).await,
    );
    denied(
        hostile.complete_work(CompleteWorkRequest { ticket: mine.ticket.clone(), ..done_request("hostile", &u) }).await,
    );
    denied(hostile.complete_work(CompleteWorkRequest { done: false, ..done_request("hostile", &u) }).await);
    denied(hostile.complete_work(CompleteWorkRequest { incarnation: Some(7), ..done_request("honest", &mine) }).await);
    // Acting in its name.
    let code = |r: Result<(), tonic::Status>| r.unwrap_err().code();
    let hb = HeartbeatRequest { actor_id: "honest".into(), weights_version: 0 };
    assert_eq!(code(hostile.heartbeat(hb).await.map(drop)), Code::PermissionDenied);
    let lw = LeaseWorkRequest { actor_id: "honest".into(), holding: vec![], holding_listed: true };
    assert_eq!(code(hostile.lease_work(lw).await.map(drop)), Code::PermissionDenied);
    assert_eq!(code(hostile.leave(LeaveRequest { actor_id: "honest".into() }).await.map(drop)), Code::PermissionDenied);
    let j = JoinRequest { actor_id: "honest".into(), ..Default::default() };
    assert_eq!(code(hostile.join(j).await.map(drop)), Code::Aborted, "a live id cannot be taken over");

    // Nothing moved: the unit is still the honest actor's, which completes it.
    let st = status(&mut l).await;
    let held: Vec<(String, Vec<String>)> = st.actors.iter().map(|a| (a.actor_id.clone(), a.units.clone())).collect();
    assert_eq!(held, [("honest".into(), vec![u.unit_id.clone()]), ("hostile".into(), vec![mine.unit_id.clone()])]);
    assert_eq!(st.units_done_total, 0);
    complete(&mut honest, "honest", &u).await;
    complete(&mut hostile, "hostile", &mine).await;
    assert_eq!(status(&mut l).await.units_done_total, 2);
    drop((l, honest, hostile));
    server.stop().await;
}

fn write_private(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `f` (up to 10 s) until it gives `want`.
async fn eventually<F, Fut>(what: &str, want: Code, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Code>,
{
    let t0 = Instant::now();
    loop {
        let got = f().await;
        if got == want {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: {got:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rotating the actor and learner credentials while the coordinator runs, through the
/// credential files it shares with the clients (as a mounted Secret is shared): the clients
/// follow the file and keep working through every phase, both tokens are valid during the
/// rollover, the old one is refused after it, and a lease signed before the learner's
/// rotation is honoured during it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("secrets");
    std::fs::create_dir_all(&files).unwrap();
    let (actor_file, learner_file) = (files.join("actor"), files.join("learner"));
    write_private(&actor_file, "actor-old\n");
    write_private(&learner_file, "learner-old\n");
    let cfg = CoordinatorConfig {
        state_dir: dir.path().join("state"),
        learner_tokens_file: Some(learner_file.clone()),
        actor_tokens_file: Some(actor_file.clone()),
        ..CoordinatorConfig::default()
    };
    let server = start(cfg).await;
    let ch = channel(server.addr).await;
    let fixed = |t: &str| coordinator_client(ch.clone(), &BearerToken::new(t).unwrap().into());
    // The actor and the learner read the same files as the coordinator.
    let mut actor = coordinator_client(ch.clone(), &Credential::from_file(&actor_file).unwrap());
    let mut learner = coordinator_client(ch.clone(), &Credential::from_file(&learner_file).unwrap());
    let (old_only, new_only) = (fixed("actor-old"), fixed("actor-new"));
    join(&mut actor, "a").await;
    learner.open_step(OpenStepRequest { step: 1, units: 3, ..Default::default() }).await.unwrap();
    let u = lease(&mut actor, "a").await.unwrap();
    let beat = |c: &CoordinatorClient<AuthChannel>| {
        let mut c = c.clone();
        async move {
            c.heartbeat(HeartbeatRequest { actor_id: "a".into(), weights_version: 0 })
                .await
                .err()
                .map_or(Code::Ok, |e| e.code())
        }
    };
    assert_eq!(beat(&new_only).await, Code::Unauthenticated);

    // Phase 1: the new tokens are added second; clients still present the old ones.
    write_private(&actor_file, "actor-old\nactor-new\n");
    write_private(&learner_file, "learner-old\nlearner-new\n");
    // (new_only is another client instance: it may not heartbeat in a's name, but it is
    // authenticated, so the refusal turns from UNAUTHENTICATED to PERMISSION_DENIED.)
    eventually("the new actor token accepted", Code::PermissionDenied, || beat(&new_only)).await;
    assert_eq!(beat(&actor).await, Code::Ok);
    // Phase 2: the new tokens come first, so clients switch; the old ones still count.
    write_private(&actor_file, "actor-new\nactor-old\n");
    write_private(&learner_file, "learner-new\nlearner-old\n");
    let t0 = Instant::now();
    while Credential::from_file(&actor_file).unwrap().current().secret() != "actor-new" {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(beat(&actor).await, Code::Ok);
    assert_eq!(beat(&old_only).await, Code::PermissionDenied, "the old token is still valid");
    // Once the coordinator read phase 2, it signs leases with the new learner token (until
    // then a lease is handed back: it would not outlive phase 3).
    let signed_new = LeaseTickets::new(BearerToken::new("learner-new").unwrap().into());
    let u2 = loop {
        let u2 = lease(&mut actor, "a").await.unwrap();
        let l = Lease { unit_id: &u2.unit_id, epoch: u2.epoch, incarnation: u2.incarnation, actor_id: "a" };
        if signed_new.verify(&l, &u2.ticket) {
            break u2;
        }
        actor.complete_work(CompleteWorkRequest { done: false, ..done_request("a", &u2) }).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10), "the coordinator never signed with the new learner token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    complete(&mut actor, "a", &u).await;
    // Phase 3: the old tokens are gone.
    write_private(&actor_file, "actor-new\n");
    write_private(&learner_file, "learner-new\n");
    eventually("the old actor token refused", Code::Unauthenticated, || beat(&old_only)).await;
    let refused = fixed("learner-old").status(StatusRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // The clients that followed the files never stopped; the lease signed during the
    // rollover (with the then first learner token, the new one) is honoured.
    assert_eq!(beat(&actor).await, Code::Ok);
    complete(&mut actor, "a", &u2).await;
    let u3 = lease(&mut actor, "a").await.unwrap();
    complete(&mut actor, "a", &u3).await;
    assert_eq!(status(&mut learner).await.units_done_total, 3);
    drop((actor, learner, old_only, new_only));
    server.stop().await;
}

/// A coordinator refuses to start when two roles share a token (the lesser role would get the
/// greater one's rights) or when a required credential file is not given.
#[test]
fn roles_sharing_a_token_or_missing_credentials_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let shared = Credential::generate();
    let creds = Creds { learner: shared.clone(), actor: shared, operator: Credential::generate() };
    let err = selfplay_coordinator::CoordinatorService::open(&config(dir.path(), 10_000, &creds)).unwrap_err();
    assert!(err.to_string().contains("share a token"), "{err}");
    let no_files = CoordinatorConfig { state_dir: dir.path().join("s"), ..CoordinatorConfig::default() };
    let err = selfplay_coordinator::CoordinatorService::open(&no_files).unwrap_err();
    assert!(err.to_string().contains("learner_tokens_file"), "{err}");
}
