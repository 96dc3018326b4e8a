//! The distributed runtime as real processes on 127.0.0.1 with ports chosen by the OS:
//! coordinator, learner and actors of the `selfplay` binary, on tiny random models. Runs that
//! kill nothing and need no separate process run in-process (cluster/tests/local.rs).
mod common;
use common::*;
use selfplay_proto::auth::BearerToken;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let held = |addr: &str| {
        status(addr).actors.into_iter().find(|x| x.actor_id == "actor-a").map(|x| x.units).unwrap_or_default()
    };
    let t0 = Instant::now();
    let frozen_units = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "actor-a never held a unit");
        if held(&addr).is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        let units = held(&addr);
        if !units.is_empty() {
            break units;
        }
        Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    };
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
    let trained: Vec<&serde_json::Value> = steps.iter().flat_map(|s| s["units"].as_array().unwrap().iter()).collect();
    let late_units: Vec<&&serde_json::Value> = trained.iter().filter(|u| u["actor_id"] == "actor-late").collect();
    assert!(!late_units.is_empty(), "the late actor contributed");
    assert!(late_units.iter().all(|u| u["weights_version"].as_u64().unwrap() >= 3));
    let log = std::fs::read_to_string(c.dir.join("actor-late.log")).unwrap();
    assert!(log.contains("weights loaded"), "late actor fetched weights:\n{log}");
    // Every unit the killed actor held was trained: delivered before the freeze (then by
    // actor-a), or re-issued to another actor after its lease expired (then counted).
    let st = status(c.coordinator_addr.as_ref().unwrap());
    for unit in &frozen_units {
        let by = trained.iter().find(|u| u["unit_id"] == unit.as_str()).map(|u| u["actor_id"].as_str().unwrap());
        match by {
            Some("actor-a") => {}
            Some(_) => assert!(st.units_reissued_total >= 1, "{unit} was played again but not counted: {st:?}"),
            None => panic!("{unit}, held by the killed actor, was never trained"),
        }
    }
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
    // One unit at a time: bit-identity holds for K = 1 (batch composition depends on timing).
    let k1 = "[actor]\nunits_in_flight = 1";
    let (_t1, mut straight) = Cluster::new(&[k1]);
    let want = run_to_end(&mut straight, None);
    let (_t2, mut killed) = Cluster::new(&[k1]);
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
    assert!(log.contains("the coordinator lost this learner's epoch or weights"), "{log}");
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn valid_group(unit: &str, epoch: u64) -> selfplay_proto::v1::RolloutGroup {
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
        epoch,
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
    // The learner takes groups once it began its epoch and published its weights.
    let epoch = wait_status(c.coordinator_addr.as_ref().unwrap(), "the learner's first epoch", |s| {
        s.epoch >= 1 && !s.weight_versions.is_empty()
    })
    .epoch;
    let valid_group = |unit: &str| valid_group(unit, epoch);
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
        ("log-probs must be finite and in", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs[0] = 3.0)),
        ("log-probs must be finite and in", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs[0] = -3e38)),
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
    assert!(m.contains("selfplay_learner_groups_rejected_total{reason=\"invalid\"} 6"), "{m}");
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

/// The probes mean something: a learner whose coordinator is not up yet is alive but not
/// ready (its /health says what it waits for); once it began its epoch it is ready; the run
/// then completes.
#[test]
fn probes_say_starting_until_the_learner_has_begun_its_epoch() {
    let (_tmp, mut c) = Cluster::new(&[]);
    // A port for the coordinator that nothing listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    c.coordinator_addr = Some(format!("http://127.0.0.1:{port}"));
    let mut learner = c.learner(&[]);
    let metrics = wait_ready(&c.dir.join("learner.ready"), "learner")["metrics"].as_str().unwrap().to_string();
    let ready = http_get(&metrics, "/health/ready");
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains(r#""state":"starting""#) && ready.contains(r#""waiting_for":["learner"]"#), "{ready}");
    let health = http_get(&metrics, "/health");
    assert!(health.starts_with("HTTP/1.1 503") && health.contains("starting"), "{health}");
    let live = http_get(&metrics, "/health/live");
    assert!(live.starts_with("HTTP/1.1 200"), "waiting for a peer is not a stall: {live}");

    let _coord = c.coordinator(&format!("127.0.0.1:{port}"));
    let t0 = Instant::now();
    loop {
        let r = http_get(&metrics, "/health/ready");
        if r.starts_with("HTTP/1.1 200") {
            assert!(r.contains(r#""state":"ready""#), "{r}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the learner never became ready: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = c.actor("actor-a");
    c.wait_exit(&mut learner);
    c.check_steps(5);
    drop(a);
}
