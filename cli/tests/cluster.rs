//! The distributed runtime as real processes on 127.0.0.1 with ports chosen by the OS:
//! coordinator, learner and actors of the `selfplay` binary, on tiny random models. Runs that
//! kill nothing and need no separate process run in-process (cluster/tests/local.rs).
mod common;
use common::*;
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
        let mut cc = selfplay_proto::client::coordinator_client(ch, &credential("operator"));
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
        ticket: String::new(),
    }
}

/// What an actor credential can send, crafted: a hostile client with a valid actor credential
/// against a real coordinator and learner, while honest actors play. Every call outside the
/// actor role is refused, every crafted group is refused by name (or, when valid however
/// extreme, is taken and then refused at its step because its log-probs disagree with the
/// learner's, and its unit is played again by an honest actor), nothing touches another
/// actor's membership or units, and the run completes all its steps with none skipped. The
/// log-prob bound is the tight f32 one: the honest actors' groups all pass it.
#[test]
fn a_hostile_actor_cannot_stop_a_run_that_honest_actors_complete() {
    use selfplay_proto::v1::{
        Answer, BeginEpochRequest, CompleteWorkRequest, HeartbeatRequest, JoinRequest, LearnerStatusRequest,
        LeaseWorkRequest, LeaveRequest, OpenStepRequest, RolloutAck, RolloutGroup, StatusRequest, WeightChunk,
        WorkUnit,
    };
    use tokio_stream::StreamExt;
    use tonic::Code;
    let (_tmp, mut c) = Cluster::new(&["[learner]\nmax_logprob_mismatch = 1e-3"]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let coord_addr = c.coordinator_addr.clone().unwrap();
    let learner_addr = c.learner_addr.clone().unwrap();
    let coord_metrics =
        wait_ready(&c.dir.join("coordinator.ready"), "coordinator")["metrics"].as_str().unwrap().to_string();
    let learner_metrics = wait_ready(&c.dir.join("learner.ready"), "learner")["metrics"].as_str().unwrap().to_string();
    // The first step is open and its weights published.
    wait_status(&coord_addr, "the learner's first step", |s| {
        s.epoch >= 1 && !s.weight_versions.is_empty() && s.units_pending > 0
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let actor = credential("actor");
    let (mut hc, mut hl) = rt.block_on(async {
        let cc = tonic::transport::Endpoint::from_shared(coord_addr.clone()).unwrap().connect().await.unwrap();
        let lc = tonic::transport::Endpoint::from_shared(learner_addr.clone()).unwrap().connect().await.unwrap();
        (selfplay_proto::client::coordinator_client(cc, &actor), selfplay_proto::client::learner_client(lc, &actor))
    });
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |e| e.code());

    // Outside the actor role: steps, weights, epochs, status. The hostile OpenStep of the
    // report (units = 2^32 - 1) never reaches the coordinator's state.
    rt.block_on(async {
        let open = OpenStepRequest { step: 1 << 40, units: u32::MAX, epoch: 1, ..Default::default() };
        assert_eq!(code(hc.open_step(open).await.map(drop)), Code::PermissionDenied);
        let begin = BeginEpochRequest { last_epoch: u64::MAX, ..Default::default() };
        assert_eq!(code(hc.begin_epoch(begin).await.map(drop)), Code::PermissionDenied);
        let chunk = WeightChunk { part: Some(selfplay_proto::v1::weight_chunk::Part::Data(vec![0u8; 16].into())) };
        assert_eq!(code(hc.publish_weights(tokio_stream::iter([chunk])).await.map(drop)), Code::PermissionDenied);
        assert_eq!(code(hc.status(StatusRequest {}).await.map(drop)), Code::PermissionDenied);
        assert_eq!(code(hl.learner_status(LearnerStatusRequest {}).await.map(drop)), Code::PermissionDenied);
    });
    // Not even an actor: no token, a wrong one, garbage bytes, an oversized message.
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(coord_addr.clone()).unwrap().connect().await.unwrap();
        let mut anon = selfplay_proto::v1::coordinator_client::CoordinatorClient::new(ch);
        assert_eq!(code(anon.join(JoinRequest::default()).await.map(drop)), Code::Unauthenticated);
        let ch = tonic::transport::Endpoint::from_shared(learner_addr.clone()).unwrap().connect().await.unwrap();
        let wrong = selfplay_proto::auth::BearerToken::new("wrong-token-0123456789").unwrap().into();
        let mut w = selfplay_proto::client::learner_client(ch, &wrong);
        let e = w.submit_rollouts(tokio_stream::iter([RolloutGroup::default()])).await.map(drop);
        assert_eq!(code(e), Code::Unauthenticated);
    });
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(learner_addr.trim_start_matches("http://")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(1000));
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }

    // As an actor: it joins and holds two units of the open step.
    let (u, v) = rt.block_on(async {
        hc.join(JoinRequest { actor_id: "hostile".into(), ..Default::default() }).await.unwrap();
        let lease = || {
            let mut hc = hc.clone();
            async move {
                let req = LeaseWorkRequest { actor_id: "hostile".into(), ..Default::default() };
                hc.lease_work(req).await.unwrap().into_inner().unit.expect("a pending unit")
            }
        };
        (lease().await, lease().await)
    });
    let submit = |g: RolloutGroup| -> Result<RolloutAck, tonic::Status> {
        let mut hl = hl.clone();
        rt.block_on(async move {
            let mut acks = hl.submit_rollouts(tokio_stream::iter([g])).await?.into_inner();
            acks.next().await.expect("one ack")
        })
    };
    let group = |unit: &WorkUnit| {
        let mut g = valid_group(&unit.unit_id, unit.epoch);
        g.step = unit.step;
        g.actor_id = "hostile".into();
        g.ticket = unit.ticket.clone();
        g
    };

    // Too big for the wire: refused before decoding.
    let mut big = group(&u);
    big.answers[0].sequence.as_mut().unwrap().text = "x".repeat(selfplay_proto::MAX_MESSAGE_BYTES + 1024);
    let e = submit(big).unwrap_err();
    assert!(matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange | Code::Internal), "{e:?}");
    // Crafted groups for its own unit: each refused, naming the field.
    type Craft = Box<dyn Fn(&mut RolloutGroup)>;
    let cases: Vec<(&str, Craft)> = vec![
        ("answers[1].reward", Box::new(|g| g.answers[1].reward = f32::NAN)),
        ("answers[0].reward = 300000000", Box::new(|g| g.answers[0].reward = 3e38)),
        ("answers[1].self_reward", Box::new(|g| g.answers[1].self_reward = -1e9)),
        ("outside the vocabulary", Box::new(|g| g.answers[0].sequence.as_mut().unwrap().completion_ids[1] = 50_000)),
        ("outside the vocabulary", Box::new(|g| g.answers[0].sequence.as_mut().unwrap().prompt_ids[0] = -1)),
        (
            "expected G = 2",
            Box::new(|g| {
                g.answers.pop();
            }),
        ),
        ("log-probs must be finite and in", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs[0] = 3.0)),
        ("log-probs must be finite and in", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs[0] = -3e38)),
        ("log-probs must be finite and in", Box::new(|g| g.challenger.as_mut().unwrap().behaviour_logprobs[2] = -1e5)),
        ("play_seconds", Box::new(|g| g.play_seconds = f64::NAN)),
        ("completion tokens", Box::new(|g| g.challenger.as_mut().unwrap().ref_logprobs.push(-1.0))),
    ];
    let n_invalid = cases.len();
    for (want, craft) in cases {
        let mut g = group(&u);
        craft(&mut g);
        let ack = submit(g).unwrap();
        assert!(!ack.accepted && ack.reason.contains(want), "expected {want:?}: {ack:?}");
    }
    // Groups for units it does not hold, or in another actor's name: no valid lease ticket.
    let other = |g: &mut RolloutGroup, unit: &str| g.unit_id = unit.to_string();
    let mut forged: Vec<RolloutGroup> = vec![];
    for target in ["s0-u0", "s0-u1", "s0-u2", "../../etc"] {
        if target != u.unit_id {
            let mut g = group(&u);
            other(&mut g, target);
            forged.push(g);
        }
    }
    let mut renamed = group(&u);
    renamed.actor_id = "actor-a".into();
    forged.push(renamed);
    let mut no_ticket = group(&u);
    no_ticket.ticket.clear();
    forged.push(no_ticket);
    let n_unleased = forged.len();
    for g in forged {
        let ack = submit(g).unwrap();
        assert!(!ack.accepted && ack.reason.contains("no valid lease ticket"), "{ack:?}");
    }
    // A valid group at every extreme validation allows is taken; at its step the learner finds
    // that its behaviour log-probs are not its own and refuses it (below).
    let mut extreme = group(&u);
    for s in extreme.answers.iter_mut().filter_map(|a| a.sequence.as_mut()).chain(extreme.challenger.as_mut()) {
        s.ref_logprobs.iter_mut().for_each(|x| *x = 0.0);
        s.behaviour_logprobs.iter_mut().for_each(|x| *x = selfplay_game::rollout::MIN_LOGPROB);
    }
    extreme.answers = vec![
        Answer { reward: 1e4, self_reward: -1e4, ..extreme.answers[0].clone() },
        Answer { reward: -1e4, self_reward: 1e4, ..extreme.answers[1].clone() },
    ];
    let ack = submit(extreme.clone()).unwrap();
    assert!(ack.accepted, "{ack:?}");
    assert!(submit(extreme).unwrap().duplicate);
    // Its reports: its own unit u honestly; v falsely "done" (the learner never got it: the
    // learner notices nothing is left to play and reopens).
    let report = |unit: &WorkUnit, actor: &str, ticket: &str, done: bool| CompleteWorkRequest {
        actor_id: actor.into(),
        unit_id: unit.unit_id.clone(),
        done,
        epoch: unit.epoch,
        incarnation: Some(unit.incarnation),
        ticket: ticket.into(),
    };
    rt.block_on(async {
        hc.complete_work(report(&u, "hostile", &u.ticket, true)).await.unwrap();
        hc.complete_work(report(&v, "hostile", &v.ticket, true)).await.unwrap();
    });

    // Counted on the learner's /metrics (read now: the learner exits with the run).
    let m = http_get(&learner_metrics, "/metrics");
    assert!(m.contains("selfplay_learner_permission_denied_total{role=\"actor\",rpc=\"LearnerStatus\"} 1\n"), "{m}");
    let line =
        format!("selfplay_learner_permission_denied_total{{role=\"actor\",rpc=\"SubmitRollouts\"}} {n_unleased}\n");
    assert!(m.contains(&line), "{line}{m}");
    assert!(m.contains(&format!("selfplay_learner_groups_rejected_total{{reason=\"invalid\"}} {n_invalid}\n")), "{m}");
    assert!(m.contains("selfplay_rpc_rejected_total{role=\"learner\",reason=\"unauthenticated\"} 1\n"), "{m}");

    // The honest actors join; the hostile one cannot act in their name or touch their units.
    let a = c.actor("actor-a");
    let b = c.actor("actor-b");
    wait_status(&coord_addr, "actor-a joined", |s| s.actors.iter().any(|x| x.actor_id == "actor-a"));
    // A unit of the run the hostile actor never held (whoever holds it, or held it).
    let (victim_id, victim_unit) = ("actor-a".to_string(), "s1-u0".to_string());
    rt.block_on(async {
        let hb = HeartbeatRequest { actor_id: victim_id.clone(), weights_version: 0 };
        assert_eq!(code(hc.heartbeat(hb).await.map(drop)), Code::PermissionDenied);
        let lw = LeaseWorkRequest { actor_id: victim_id.clone(), holding: vec![], holding_listed: true };
        assert_eq!(code(hc.lease_work(lw).await.map(drop)), Code::PermissionDenied);
        assert_eq!(
            code(hc.leave(LeaveRequest { actor_id: victim_id.clone() }).await.map(drop)),
            Code::PermissionDenied
        );
        let j = JoinRequest { actor_id: victim_id.clone(), ..Default::default() };
        assert_eq!(code(hc.join(j).await.map(drop)), Code::Aborted);
        let theirs = WorkUnit { unit_id: victim_unit.clone(), epoch: u.epoch, ..Default::default() };
        for (actor, ticket, done) in [
            (victim_id.as_str(), "", true),
            ("hostile", u.ticket.as_str(), true),
            (victim_id.as_str(), u.ticket.as_str(), false),
        ] {
            let e = hc.complete_work(report(&theirs, actor, ticket, done)).await.map(drop);
            assert_eq!(code(e), Code::PermissionDenied, "{actor} {done}");
        }
    });

    // The run completes: every step with N distinct units, none skipped, none of them the
    // hostile actor's, every honest one within the f32 log-prob bound.
    c.wait_exit(&mut learner);
    let steps = c.check_steps(5);
    for s in &steps {
        assert_eq!(s["stats"]["skipped"].as_bool(), Some(false), "{s}");
        let mismatch = s["stats"]["logprob_mismatch_max"].as_f64().unwrap();
        assert!(mismatch < 1e-4, "honest groups disagree by {mismatch} nats: {s}");
        for unit in s["units"].as_array().unwrap() {
            assert_ne!(unit["actor_id"], "hostile", "a hostile group was trained on: {s}");
        }
    }
    let log = std::fs::read_to_string(c.dir.join("learner.log")).unwrap();
    let refusal = log.lines().find(|l| l.contains("refused as corrupt")).unwrap_or_else(|| panic!("{log}"));
    assert!(refusal.contains(&u.unit_id) && refusal.contains("hostile") && refusal.contains("behaviour"), "{refusal}");
    let m = http_get(&coord_metrics, "/metrics");
    for rpc in ["OpenStep", "BeginEpoch", "PublishWeights", "Status"] {
        let line = format!("selfplay_coordinator_permission_denied_total{{role=\"actor\",rpc=\"{rpc}\"}} 1\n");
        assert!(m.contains(&line), "{line}{m}");
    }
    assert!(m.contains("selfplay_coordinator_permission_denied_total{role=\"actor\",rpc=\"Heartbeat\"} 1\n"), "{m}");
    assert!(m.contains("selfplay_coordinator_permission_denied_total{role=\"actor\",rpc=\"CompleteWork\"} 3\n"), "{m}");
    assert!(m.contains("selfplay_coordinator_permission_denied_total{role=\"operator\",rpc=\"OpenStep\"} 0\n"), "{m}");
    drop((a, b));
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

/// `selfplay train` whose only actor cannot start (its reward model directory holds no model)
/// stops with an error that names the cause, instead of waiting for rollouts forever. (A path
/// that does not exist at all is refused before anything starts: it is neither a directory nor
/// a Hub id.)
#[test]
fn train_stops_with_an_error_when_every_actor_stops() {
    let (_tmp, c) = Cluster::new(&[]);
    let rm = c.dir.join("rm").to_str().unwrap().to_string();
    std::fs::create_dir_all(c.dir.join("no-such-reward-model")).unwrap();
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

/// The learner's weights at `version` in run directory `run`: the initial model for 0, else
/// the step's checkpoint.
fn learner_digest(model: &std::path::Path, run: &std::path::Path, version: u64) -> String {
    let dir = match version {
        0 => model.to_path_buf(),
        v => run.join("checkpoints").join(format!("step-{v:08}")),
    };
    let m = selfplay_policy::Llama::load(&dir, tch::Device::Cpu, tch::Kind::Float).unwrap();
    m.weights_digest().unwrap()
}

/// `selfplay train`'s cluster (learner and one actor in one process) with an actor process
/// joining it: the actor inside copies the learner's weights on the device, the one outside
/// fetches them from the coordinator, and both end with the learner's weights, bit for bit.
#[test]
fn an_actor_process_joins_a_local_cluster_and_fetches_the_same_weights_over_grpc() {
    // Runs until stopped, checkpointing and keeping every step.
    let (_tmp, mut c) = Cluster::with_run(0, 1, &[]);
    let toml = std::fs::read_to_string(&c.config).unwrap().replace("keep_checkpoints = 10", "keep_checkpoints = 0");
    std::fs::write(&c.config, toml).unwrap();
    let cfg = selfplay_game::Config::load(Some(&c.config), &[]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let plan = selfplay_cluster::plan_devices(tch::Device::Cpu, 0, Some(1), &[]).unwrap();
    let mut opts = selfplay_cluster::LocalClusterOptions::new(cfg.clone(), plan);
    opts.actor_credential = credential("actor");
    opts.digest_weights = true;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (handle, run) = rt.block_on(async {
        let cluster = selfplay_cluster::LocalCluster::start(opts, |_| {}).await.unwrap();
        c.coordinator_addr = Some(cluster.coordinator_addr.clone());
        c.learner_addr = Some(cluster.learner_addr.clone());
        let handle = cluster.in_process.clone();
        (
            handle,
            tokio::spawn(cluster.run(async move {
                let _ = stop_rx.await;
            })),
        )
    });
    let mut remote = c.actor_with("remote-0", &["--weights-digest".into()]);
    // Until both actors delivered a group sampled by trained weights (version 1 or later).
    let t0 = Instant::now();
    let played_trained = |actor: &str| {
        c.steps().iter().any(|s| {
            s["units"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["actor_id"] == actor && u["weights_version"].as_u64() >= Some(1))
        })
    };
    while !(played_trained("remote-0") && played_trained("local-0")) {
        assert!(remote.child.try_wait().unwrap().is_none(), "the actor process exited:\n{}", c.log("remote-0"));
        assert!(t0.elapsed() < Duration::from_secs(300), "no trained group from both actors:\n{}", c.log("remote-0"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The actor process stops first (finishing or handing back its units), then the run.
    let _ = Command::new("kill").args(["-TERM", &remote.child.id().to_string()]).status();
    c.wait_exit(&mut remote);
    let _ = stop_tx.send(());
    let summary = rt.block_on(run).unwrap().unwrap();

    let (model, run_dir) = (cfg.model.path.clone(), cfg.run.out_dir.clone());
    let local = summary.actors.into_iter().next().unwrap().unwrap();
    assert_eq!(local.syncs_grpc, 0, "the actor inside fetched over gRPC: {local:?}");
    assert!(local.syncs_device >= 2, "{local:?}");
    assert_eq!(local.syncs_device, handle.copied());
    assert_eq!(local.weights_digest.as_deref().unwrap(), learner_digest(&model, &run_dir, local.weights_version));

    // "actor done: U units, F failed, weights vV (S fetched from the coordinator), sha256 D"
    let log = std::fs::read_to_string(c.dir.join("remote-0.log")).unwrap();
    let done = log.lines().rev().find(|l| l.starts_with("actor done:")).expect("the actor's summary");
    let field = |after: &str, end: char| done.split(after).nth(1).unwrap().split(end).next().unwrap().to_string();
    let version: u64 = field("weights v", ' ').parse().unwrap();
    let fetched: u64 = field("(", ' ').parse().unwrap();
    let digest = field("sha256 ", ' ');
    assert!(version >= 1 && fetched >= 1, "{done}");
    assert_eq!(digest, learner_digest(&model, &run_dir, version), "{done}");
    // Not vacuous: the weights changed during the run.
    assert_ne!(learner_digest(&model, &run_dir, version), learner_digest(&model, &run_dir, 0));
}

/// Two learner ranks (Gloo on loopback, launched with the rank flags torchrun's variables
/// also set) behind one learner endpoint train the same run as one learner: every step has
/// its N distinct units, the first step (whose groups are the same in both runs: one actor,
/// one unit at a time, the same initial weights) has the same loss and gradient norm to 1e-6,
/// and rank 1 follows rank 0 to the end and exits cleanly.
#[test]
fn two_learner_ranks_train_as_one_learner() {
    let k1 = "[actor]\nunits_in_flight = 1";
    let (_t1, mut one) = Cluster::new(&[k1]);
    {
        let _coord = one.coordinator("127.0.0.1:0");
        let mut learner = one.learner(&[]);
        let a = one.actor("actor-a");
        one.wait_exit(&mut learner);
        drop(a);
    }
    let want = one.check_steps(5);

    let (_t2, mut two) = Cluster::new(&[k1]);
    let _coord = two.coordinator("127.0.0.1:0");
    let port = free_port();
    // Rank 1 first: it waits for rank 0's store.
    let mut follower = spawn_rank1(&two, &port);
    let rank0 = rank_flags(&port, "0");
    let mut learner = two.learner(&rank0.iter().map(String::as_str).collect::<Vec<_>>());
    let a = two.actor("actor-a");
    two.wait_exit(&mut learner);
    two.wait_exit(&mut follower);
    drop(a);
    let got = two.check_steps(5);
    for key in ["loss", "grad_norm"] {
        let (x, y) = (want[0]["stats"][key].as_f64().unwrap(), got[0]["stats"][key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-6 * x.abs().max(y.abs()), "step 1 {key}: one learner {x}, two ranks {y}");
    }
    assert!(two.log("learner").contains("learner ranks joined"), "{}", two.log("learner"));
    let log = std::fs::read_to_string(two.dir.join("learner-rank1.log")).unwrap();
    assert!(log.contains("learner rank 1 of 2 done: 5 steps"), "{log}");
    // The checkpoint rank 0 wrote holds the whole optimizer state, gathered from both ranks.
    let ckpt = selfplay_learner::latest_checkpoint(&two.dir.join("run")).expect("a checkpoint");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(state["adam_t"].as_u64(), Some(5));
}

/// Ctrl-C says on the terminal what the learner is waiting for and how to stop at once; the
/// learner then stops cleanly (exit 0).
#[test]
fn ctrl_c_says_what_it_waits_for_and_the_learner_stops_cleanly() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    // No actor: the learner waits for groups until interrupted.
    Command::new("kill").args(["-INT", &learner.child.id().to_string()]).status().unwrap();
    c.wait_exit(&mut learner);
    let log = std::fs::read_to_string(c.dir.join("learner.log")).unwrap();
    assert!(log.contains("press Ctrl-C again to stop now"), "{log}");
}

/// kill -9 of a learner rank stops the group (rank 0 fails its next collective instead of
/// hanging), and both ranks restarted with --resume finish the run: every step on N distinct
/// units, none trained twice.
#[test]
fn a_killed_learner_rank_stops_the_group_and_a_restart_resumes_it() {
    // More steps than the 5 of the other tests: the run must still be going when a rank dies.
    let (_tmp, mut c) = Cluster::with_run(30, 2, &["[actor]\nunits_in_flight = 1"]);
    let _coord = c.coordinator("127.0.0.1:0");
    let start = |c: &mut Cluster, resume: bool| {
        let port = free_port();
        let follower = spawn_rank1(c, &port);
        let mut rank0 = rank_flags(&port, "0");
        if resume {
            rank0.push("--resume".into());
        }
        let leader = c.learner(&rank0.iter().map(String::as_str).collect::<Vec<_>>());
        (leader, follower)
    };
    let (mut leader, mut follower) = start(&mut c, false);
    let a = c.actor("actor-a");
    c.wait_steps(2, &mut [&mut leader, &mut follower]);
    // Freeze the actor so that the run cannot end meanwhile, kill rank 1, then let the actor
    // go on: rank 0 needs its peer for the next step.
    let actor_pid = a.child.id().to_string();
    Command::new("kill").args(["-STOP", &actor_pid]).status().unwrap();
    assert!(c.steps().len() < 30, "the run ended before a rank could be killed");
    follower.child.kill().unwrap();
    let _ = follower.child.wait();
    Command::new("kill").args(["-CONT", &actor_pid]).status().unwrap();
    // Rank 0 notices at its next collective and exits with an error.
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = leader.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "rank 0 still runs after its peer died:\n{}",
            c.log("learner")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "rank 0 exited cleanly without its peer:\n{}", c.log("learner"));
    // The launcher's restart: both ranks, rank 0 resuming.
    let (mut leader, mut follower) = start(&mut c, true);
    c.wait_exit(&mut leader);
    c.wait_exit(&mut follower);
    drop(a);
    c.check_steps(30);
    let log = std::fs::read_to_string(c.dir.join("learner.log")).unwrap();
    assert!(log.contains("resuming"), "{}", c.log("learner"));
}

/// The flags of learner rank `rank` of two, meeting at `port`.
fn rank_flags(port: &str, rank: &str) -> Vec<String> {
    ["--world-size", "2", "--rank", rank, "--master-addr", "127.0.0.1", "--master-port", port]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Starts learner rank 1 of two (it serves nothing, so there is no ready file to wait for).
fn spawn_rank1(c: &Cluster, port: &str) -> Proc {
    let mut args: Vec<String> = vec![
        "learner".into(),
        "--config".into(),
        c.config.to_str().unwrap().into(),
        "--coordinator".into(),
        c.coordinator_addr.clone().unwrap(),
    ];
    args.extend(rank_flags(port, "1"));
    c.spawn("learner-rank1", &args)
}

/// A port the OS had free a moment ago (rank 0's store binds it).
fn free_port() -> String {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string()
}
