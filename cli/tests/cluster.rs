//! The distributed runtime as real processes on 127.0.0.1 with ports chosen by the OS:
//! coordinator, learner and actors of the `selfplay` binary, on tiny random models.
use selfplay_proto::auth::BearerToken;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789abcdef";
const N: usize = 3;

struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    /// Serve and connect with TLS (certificates in `dir`).
    tls: bool,
    coordinator_addr: Option<String>,
    learner_addr: Option<String>,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_selfplay")
}

fn wait_ready(path: &Path, what: &str) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str(&text) {
                return v;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    fn new(extra: &[&str]) -> (tempfile::TempDir, Cluster) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let model = dir.join("model");
        let rm = dir.join("rm");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&rm).unwrap();
        selfplay_tests::tiny_model(&model, "gqa_tied", 7);
        selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 8);
        let mut cfg = format!(
            "[run]\nseed = 3\nsteps = 5\nout_dir = {:?}\ncheckpoint_every = 2\nkeep_checkpoints = 10\n\
             [model]\npath = {:?}\ndevice = \"cpu\"\n\
             [game]\nmode = \"lsp-zero\"\nqueries_per_step = {N}\ngroup_size = 2\n\
             [challenger]\nmax_new_tokens = 6\n[solver]\nmax_new_tokens = 8\n\
             [reward]\nkind = \"model\"\npath = {:?}\n[optim]\nlr = 1e-3\ngrad_accum = 1\n",
            dir.join("run").to_str().unwrap(),
            model.to_str().unwrap(),
            rm.to_str().unwrap()
        );
        for e in extra {
            cfg.push_str(e);
            cfg.push('\n');
        }
        let config = dir.join("run.toml");
        std::fs::write(&config, cfg).unwrap();
        (tmp, Cluster { dir, config, tls: false, coordinator_addr: None, learner_addr: None })
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    fn tls_server_args(&self) -> Vec<String> {
        if !self.tls {
            return vec![];
        }
        let p = |n: &str| self.dir.join(n).to_str().unwrap().to_string();
        vec!["--tls-cert".into(), p("cert.pem"), "--tls-key".into(), p("key.pem")]
    }

    fn tls_client_args(&self) -> Vec<String> {
        if !self.tls {
            return vec![];
        }
        vec!["--tls-ca".into(), self.dir.join("ca.pem").to_str().unwrap().to_string()]
    }

    fn spawn(&self, name: &str, args: &[String]) -> Proc {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(bin())
            .args(["--threads", "1", "--log", "info"])
            .args(args)
            .env("SELFPLAY_TOKEN", TOKEN)
            .env_remove("SELFPLAY_TOKEN_FILE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc { child, name: name.to_string() }
    }

    fn coordinator(&mut self, listen: &str) -> Proc {
        let ready = self.dir.join("coordinator.ready");
        let _ = std::fs::remove_file(&ready);
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            listen.into(),
            "--state-dir".into(),
            self.dir.join("state").to_str().unwrap().into(),
            "--lease-ttl-ms".into(),
            "1500".into(),
            "--seed".into(),
            "3".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.to_str().unwrap().into(),
        ];
        args.extend(self.tls_server_args());
        let p = self.spawn("coordinator", &args);
        let r = wait_ready(&ready, "coordinator");
        self.coordinator_addr = Some(format!("{}://{}", self.scheme(), r["grpc"].as_str().unwrap()));
        p
    }

    fn learner(&mut self, extra: &[&str]) -> Proc {
        let ready = self.dir.join("learner.ready");
        let _ = std::fs::remove_file(&ready);
        let mut args: Vec<String> = vec![
            "learner".into(),
            "--config".into(),
            self.config.to_str().unwrap().into(),
            "--coordinator".into(),
            self.coordinator_addr.clone().unwrap(),
            "--listen".into(),
            self.learner_addr
                .clone()
                .map(|a| a.split("://").nth(1).unwrap().to_string())
                .unwrap_or("127.0.0.1:0".into()),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.tls_server_args());
        args.extend(self.tls_client_args());
        let p = self.spawn("learner", &args);
        let r = wait_ready(&ready, "learner");
        self.learner_addr = Some(format!("{}://{}", self.scheme(), r["grpc"].as_str().unwrap()));
        p
    }

    fn actor(&self, id: &str) -> Proc {
        self.actor_with(id, &[])
    }

    fn actor_with(&self, id: &str, extra: &[String]) -> Proc {
        let mut args: Vec<String> = vec![
            "actor".into(),
            "--config".into(),
            self.config.to_str().unwrap().into(),
            "--coordinator".into(),
            self.coordinator_addr.clone().unwrap(),
            "--learner".into(),
            self.learner_addr.clone().unwrap(),
            "--actor-id".into(),
            id.into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(self.tls_client_args());
        args.extend(extra.iter().cloned());
        self.spawn(id, &args)
    }

    fn steps(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("run/steps.jsonl")).unwrap_or_default();
        // Only whole lines: the learner may be writing the next one right now.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        whole.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn wait_steps(&self, n: usize, procs: &mut [&mut Proc]) {
        let t0 = Instant::now();
        while self.steps().len() < n {
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("{} exited with {status} before step {n}:\n{}", p.name, self.log(&p.name));
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "no step {n} after 300 s:\n{}", self.log("learner"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&self, p: &mut Proc) {
        let t0 = Instant::now();
        loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                assert!(s.success(), "{} failed: {s}\n{}", p.name, self.log(&p.name));
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "{} did not finish:\n{}", p.name, self.log(&p.name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Every step used exactly N distinct units of its own step; no unit twice in the run.
    fn check_steps(&self, n_steps: usize) -> Vec<serde_json::Value> {
        let steps = self.steps();
        assert_eq!(steps.len(), n_steps, "steps logged");
        let mut seen = HashSet::new();
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s["stats"]["step"].as_u64(), Some(i as u64 + 1));
            let units = s["units"].as_array().unwrap();
            assert_eq!(units.len(), N, "step {} has {} groups", i + 1, units.len());
            for u in units {
                let id = u["unit_id"].as_str().unwrap().to_string();
                assert!(seen.insert(id.clone()), "unit {id} consumed twice");
            }
        }
        steps
    }

    fn final_weights(&self) -> Vec<u8> {
        let ckpt = selfplay_learner::latest_checkpoint(&self.dir.join("run")).expect("a checkpoint");
        std::fs::read(ckpt.join("model.safetensors")).unwrap()
    }
}

fn status(addr: &str) -> selfplay_proto::v1::StatusResponse {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr.to_string()).unwrap().connect().await.unwrap();
        let mut c = selfplay_proto::client::coordinator_client(ch, &BearerToken::new(TOKEN).unwrap());
        c.status(selfplay_proto::v1::StatusRequest {}).await.unwrap().into_inner()
    })
}

#[test]
fn two_actors_five_steps_each_with_n_distinct_units() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let a = c.actor("actor-a");
    let b = c.actor("actor-b");
    c.wait_exit(&mut learner);
    let steps = c.check_steps(5);
    let actors: HashSet<String> = steps
        .iter()
        .flat_map(|s| s["units"].as_array().unwrap().iter().map(|u| u["actor_id"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(actors, HashSet::from(["actor-a".to_string(), "actor-b".to_string()]), "both actors contributed");
    // Synchronous mode: every group was sampled by the version it trained.
    for (i, s) in steps.iter().enumerate() {
        for u in s["units"].as_array().unwrap() {
            assert_eq!(u["weights_version"].as_u64(), Some(i as u64));
        }
    }
    drop((a, b));
}

#[test]
fn every_role_over_tls() {
    let (_tmp, mut c) = Cluster::new(&[]);
    selfplay_tests::make_certificates(&c.dir);
    c.tls = true;
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    assert!(c.learner_addr.as_ref().unwrap().starts_with("https://"));
    let a = c.actor("actor-a");
    c.wait_exit(&mut learner);
    c.check_steps(5);
    // A plaintext client cannot talk to the TLS coordinator.
    let plain = c.coordinator_addr.clone().unwrap().replace("https://", "http://");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r: Result<(), String> = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(plain).unwrap().connect().await.map_err(|e| e.to_string())?;
        let mut cc = selfplay_proto::client::coordinator_client(ch, &BearerToken::new(TOKEN).unwrap());
        cc.status(selfplay_proto::v1::StatusRequest {}).await.map(|_| ()).map_err(|s| s.to_string())
    });
    assert!(r.is_err(), "plaintext reached the TLS coordinator");
    drop(a);
}

#[test]
fn killed_actor_unit_is_reissued_and_late_joiner_fetches_weights() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let mut a = c.actor("actor-a");
    let mut b = c.actor("actor-b");
    c.wait_steps(1, &mut [&mut learner]);
    // kill -9 one actor while it holds a unit. Units of the tiny model take milliseconds, so
    // freeze the actor first and make sure it still holds its unit before killing it.
    let addr = c.coordinator_addr.clone().unwrap();
    let pid = a.child.id().to_string();
    let holds = |addr: &str| status(addr).actors.iter().any(|x| x.actor_id == "actor-a" && !x.units.is_empty());
    let t0 = Instant::now();
    loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "actor-a never held a unit");
        if !holds(&addr) {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        if holds(&addr) {
            break;
        }
        Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    }
    a.child.kill().unwrap();
    let _ = a.child.wait();
    c.wait_steps(3, &mut [&mut learner]);
    // A new actor joins at step 3 and the last old one dies: the late actor must fetch
    // version >= 3 (checksums verified) and finish the run alone.
    let late = c.actor("actor-late");
    b.child.kill().unwrap();
    let _ = b.child.wait();
    c.wait_exit(&mut learner);
    let steps = c.check_steps(5);
    let late_units: Vec<&serde_json::Value> = steps
        .iter()
        .flat_map(|s| s["units"].as_array().unwrap().iter())
        .filter(|u| u["actor_id"] == "actor-late")
        .collect();
    assert!(!late_units.is_empty(), "the late actor contributed");
    assert!(late_units.iter().all(|u| u["weights_version"].as_u64().unwrap() >= 3));
    let log = std::fs::read_to_string(c.dir.join("actor-late.log")).unwrap();
    assert!(log.contains("weights loaded"), "late actor fetched weights:\n{log}");
    let st = status(c.coordinator_addr.as_ref().unwrap());
    assert!(st.units_reissued_total >= 1, "the killed actor's unit came back: {st:?}");
    drop(late);
}

fn run_to_end(c: &mut Cluster, kill_learner_after: Option<usize>) -> Vec<u8> {
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let a = c.actor("actor-a");
    if let Some(k) = kill_learner_after {
        c.wait_steps(k, &mut [&mut learner]);
        // Wait for the checkpoint of step k (checkpoint_every = 2) and kill -9.
        let want = c.dir.join(format!("run/checkpoints/step-{k:08}/trainer.json"));
        let t0 = Instant::now();
        while !want.exists() {
            assert!(t0.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(50));
        }
        learner.child.kill().unwrap();
        let _ = learner.child.wait();
        learner = c.learner(&["--resume"]);
    }
    c.wait_exit(&mut learner);
    c.check_steps(5);
    drop(a);
    c.final_weights()
}

#[test]
fn learner_killed_after_checkpoint_resumes_to_the_same_weights() {
    let (_t1, mut straight) = Cluster::new(&[]);
    let want = run_to_end(&mut straight, None);
    let (_t2, mut killed) = Cluster::new(&[]);
    let got = run_to_end(&mut killed, Some(2));
    let log = std::fs::read_to_string(killed.dir.join("learner.log")).unwrap();
    assert!(log.contains("resuming"), "{log}");
    assert!(got == want, "final weights differ from the uninterrupted run");
}

/// Runs 2 steps, kills the coordinator (and, with `wipe`, deletes its state directory),
/// restarts it on the same address and runs to the end; returns the learner's log.
fn restart_coordinator_mid_run(wipe: bool) -> String {
    let (_tmp, mut c) = Cluster::new(&[]);
    let mut coord = c.coordinator("127.0.0.1:0");
    let addr = c.coordinator_addr.clone().unwrap();
    let mut learner = c.learner(&[]);
    let a = c.actor("actor-a");
    c.wait_steps(2, &mut [&mut learner]);
    coord.child.kill().unwrap();
    let _ = coord.child.wait();
    if wipe {
        std::fs::remove_dir_all(c.dir.join("state")).unwrap();
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    let _coord2 = c.coordinator(addr.trim_start_matches("http://"));
    c.wait_exit(&mut learner);
    c.check_steps(5);
    drop(a);
    std::fs::read_to_string(c.dir.join("learner.log")).unwrap()
}

#[test]
fn coordinator_restart_mid_run() {
    restart_coordinator_mid_run(false);
}

/// A coordinator restarted without its state directory has lost the weights and the open
/// steps: the learner notices, publishes again and reopens them, and the run completes.
#[test]
fn coordinator_restarted_without_its_state() {
    let log = restart_coordinator_mid_run(true);
    assert!(log.contains("the coordinator lost the published weights"), "{log}");
}

#[test]
fn asynchronous_mode_records_staleness() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&["--max-policy-lag", "2"]);
    let a = c.actor("actor-a");
    let b = c.actor("actor-b");
    c.wait_exit(&mut learner);
    let steps = c.check_steps(5);
    let mut stale = 0;
    for s in &steps {
        let v = s["stats"]["step"].as_u64().unwrap() - 1;
        for u in s["units"].as_array().unwrap() {
            let lag = v - u["weights_version"].as_u64().unwrap();
            assert!(lag <= 2, "a group {lag} versions old trained with lag 2");
            stale += lag;
        }
        assert!(s["stats"]["staleness"].as_f64().is_some());
    }
    assert!(stale > 0, "asynchronous mode never trained on an older version");
    drop((a, b));
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn valid_group(unit: &str) -> selfplay_proto::v1::RolloutGroup {
    use selfplay_proto::v1::{Answer, RolloutGroup, Sequence};
    let seq = || Sequence {
        prompt_ids: vec![3, 10, 11, 4],
        completion_ids: vec![12, 13, 2],
        behaviour_logprobs: vec![-1.0, -2.0, -0.5],
        ref_logprobs: vec![-1.1, -2.1, -0.4],
        text: "t12 t13".into(),
    };
    RolloutGroup {
        unit_id: unit.into(),
        step: 0,
        weights_version: 0,
        actor_id: "test".into(),
        challenger: Some(seq()),
        answers: (0..2)
            .map(|i| Answer { sequence: Some(seq()), reward: i as f32, self_reward: 0.0, self_reward_parsed: true })
            .collect(),
        play_seconds: 0.0,
    }
}

#[test]
fn bad_input_gets_clear_errors_and_the_run_is_unaffected() {
    use tokio_stream::StreamExt;
    let (_tmp, mut c) = Cluster::new(&[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let learner_addr = c.learner_addr.clone().unwrap();
    let metrics_addr = wait_ready(&c.dir.join("learner.ready"), "learner")["metrics"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let submit = |token: &str, g: selfplay_proto::v1::RolloutGroup| {
        let addr = learner_addr.clone();
        let token = BearerToken::new(token).unwrap();
        rt.block_on(async move {
            let ch = tonic::transport::Endpoint::from_shared(addr).unwrap().connect().await.unwrap();
            let mut l = selfplay_proto::client::learner_client(ch, &token);
            let mut acks = l.submit_rollouts(tokio_stream::iter([g])).await?.into_inner();
            acks.next().await.expect("one ack")
        })
    };

    // Wrong token (and the coordinator refuses it too).
    let e = submit("wrong-token-0123456789", valid_group("s0-u0")).unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(c.coordinator_addr.clone().unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut cc = selfplay_proto::v1::coordinator_client::CoordinatorClient::new(ch);
        cc.status(selfplay_proto::v1::StatusRequest {}).await.unwrap_err()
    });
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "no token: {e:?}");

    // Garbage bytes on the gRPC port: the connection is dropped, nothing else happens.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(learner_addr.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000));
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }

    // Oversized message: refused by the size limit before decoding.
    let mut big = valid_group("s0-u1");
    big.answers[0].sequence.as_mut().unwrap().text = "x".repeat(selfplay_proto::MAX_MESSAGE_BYTES + 1024);
    let e = submit(TOKEN, big).unwrap_err();
    assert!(
        matches!(e.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal),
        "{e:?}"
    );

    // Semantically bad groups: an ack that names the field, nothing stored.
    let cases: Vec<(&str, Box<dyn Fn(&mut selfplay_proto::v1::RolloutGroup)>)> = vec![
        ("answers[1].reward", Box::new(|g| g.answers[1].reward = f32::NAN)),
        ("outside the vocabulary", Box::new(|g| g.answers[0].sequence.as_mut().unwrap().completion_ids[1] = 50_000)),
        (
            "expected G = 2",
            Box::new(|g| {
                g.answers.pop();
            }),
        ),
        ("log-probs must be finite and <= 0", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs[0] = 3.0)),
        ("not a unit id", Box::new(|g| g.unit_id = "../../etc".into())),
    ];
    for (want, mutate) in cases {
        let mut g = valid_group("s0-u2");
        mutate(&mut g);
        let ack = submit(TOKEN, g).unwrap();
        assert!(!ack.accepted && ack.reason.contains(want), "expected {want:?}: {ack:?}");
    }

    // A duplicate unit is acknowledged as such and stored once.
    let first = submit(TOKEN, valid_group("s0-u2")).unwrap();
    assert!(first.accepted, "{first:?}");
    let second = submit(TOKEN, valid_group("s0-u2")).unwrap();
    assert!(!second.accepted && second.duplicate, "{second:?}");

    // Counted on /metrics.
    let m = http_get(&metrics_addr, "/metrics");
    assert!(m.contains("selfplay_learner_groups_rejected_total{reason=\"invalid\"} 5"), "{m}");
    assert!(m.contains("selfplay_learner_groups_rejected_total{reason=\"duplicate\"} 1"), "{m}");
    assert!(m.contains("selfplay_rpc_rejected_total{role=\"learner\",reason=\"unauthenticated\"} 1"), "{m}");
    assert!(http_get(&metrics_addr, "/health").starts_with("HTTP/1.1 200"));

    // The run is unaffected: an actor completes it, the duplicate unit consumed once.
    let a = c.actor("actor-a");
    c.wait_exit(&mut learner);
    c.check_steps(5);
    drop(a);
}

#[test]
fn actors_score_through_a_remote_reward_server() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let ready = c.dir.join("reward.ready");
    let _rm = c.spawn(
        "reward-server",
        &[
            "reward-server".into(),
            "--model".into(),
            c.dir.join("rm").to_str().unwrap().into(),
            "--device".into(),
            "cpu".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.to_str().unwrap().into(),
        ],
    );
    let reward_addr = format!("http://{}", wait_ready(&ready, "reward server")["grpc"].as_str().unwrap());
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let a = c.actor_with(
        "actor-a",
        &["--set".into(), "reward.kind=remote".into(), "--set".into(), format!("reward.address={reward_addr:?}")],
    );
    c.wait_exit(&mut learner);
    c.check_steps(5);
    let log = std::fs::read_to_string(c.dir.join("reward-server.log")).unwrap();
    assert!(log.contains("reward server serving"), "{log}");
    // Rewards came from the remote model: the step log holds non-zero reward statistics.
    let nonzero = c.steps().iter().any(|s| s["stats"]["reward"]["std"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(nonzero, "no reward spread: the remote reward model was not used");
    drop(a);
}

/// `selfplay train` whose only actor cannot start (its reward model is missing) stops with an
/// error that names the cause, instead of waiting for rollouts forever.
#[test]
fn train_stops_with_an_error_when_every_actor_stops() {
    let (_tmp, c) = Cluster::new(&[]);
    let rm = c.dir.join("rm").to_str().unwrap().to_string();
    let missing = c.dir.join("no-such-reward-model").to_str().unwrap().to_string();
    let cfg = std::fs::read_to_string(&c.config).unwrap().replace(&format!("{rm:?}"), &format!("{missing:?}"));
    std::fs::write(&c.config, cfg).unwrap();
    let log = c.dir.join("train.log");
    let mut child = Command::new(bin())
        .args(["--threads", "1", "train", "--config", c.config.to_str().unwrap(), "--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!(
                "train still running 120 s after its only actor failed:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("every actor stopped") && text.contains("no-such-reward-model"), "{text}");
}
