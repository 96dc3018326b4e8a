//! A custom reward written in Python: examples/python-reward/server.py (grpcio, reward.proto,
//! a plain Python `score` function) as a real process, scoring for a real actor while a real
//! learner trains on its rewards; and it refuses a caller without the reward-client credential.
mod common;
use common::*;
use selfplay_proto::auth::BearerToken;
use std::path::Path;
use std::process::{Command, Stdio};

fn python_reward_server(c: &Cluster) -> (Proc, String) {
    let ready = c.dir.join("python-reward.ready");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python-reward/server.py");
    let log = std::fs::File::create(c.dir.join("python-reward.log")).unwrap();
    let child = Command::new(selfplay_tests::python())
        .arg(script)
        .args(["--listen", "127.0.0.1:0", "--ready-file", ready.to_str().unwrap()])
        .env("SELFPLAY_TOKEN", token("reward-client"))
        .env_remove("SELFPLAY_TOKEN_FILE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("cannot start the Python reward server");
    let p = Proc { child, name: "python-reward".into() };
    let addr = format!("http://{}", wait_ready(&ready, "python reward server")["grpc"].as_str().unwrap());
    (p, addr)
}

#[test]
fn a_learner_trains_on_a_python_reward_server() {
    let (_tmp, mut c) = Cluster::new(&[]);
    let (_py, addr) = python_reward_server(&c);

    // Without the run's token the server refuses the call.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await.unwrap();
        let wrong = BearerToken::new("not-the-run-token-0123456789").unwrap();
        let mut client = selfplay_proto::client::reward_client(ch, &wrong.into());
        client.score(selfplay_proto::v1::ScoreRequest { pairs: vec![] }).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // With it, oversized requests are refused and the server goes on.
    let (too_many, too_long, ok) = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr.clone()).unwrap().connect().await.unwrap();
        let mut client = selfplay_proto::client::reward_client(ch, &credential("reward-client"));
        let pair = |answer: String| selfplay_proto::v1::ScorePair { query: "q".into(), answer };
        let many = selfplay_proto::v1::ScoreRequest { pairs: (0..257).map(|_| pair("a".into())).collect() };
        let long = selfplay_proto::v1::ScoreRequest { pairs: vec![pair("a ".repeat(150_000))] };
        let fine = selfplay_proto::v1::ScoreRequest { pairs: vec![pair("one two".into()), pair("w ".repeat(15))] };
        (
            client.score(many).await.unwrap_err(),
            client.score(long).await.unwrap_err(),
            client.score(fine).await.unwrap().into_inner().scores,
        )
    });
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument, "{too_many:?}");
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument, "{too_long:?}");
    // score(): 1.0 up to 12 words, then 0.1 less per word (15 words: 0.7).
    assert_eq!(ok.len(), 2);
    assert!((ok[0] - 1.0).abs() < 1e-6 && (ok[1] - 0.7).abs() < 1e-6, "{ok:?}");

    // Answers of up to 24 words, so that the example's reward (1 up to 12 words, then 0.1 less
    // per word) spreads.
    let longer = ["--set", "solver.max_new_tokens=24"];
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&longer);
    let actor = c.actor_with(
        "actor-a",
        &[
            "--set".into(),
            "reward.kind=remote".into(),
            "--set".into(),
            format!("reward.address={addr:?}"),
            longer[0].into(),
            longer[1].into(),
        ],
    );
    c.wait_exit(&mut learner);
    let steps = c.check_steps(5);
    // Every answer's reward came from score(): in [0, 1], and not all equal.
    for s in &steps {
        let r = &s["stats"]["reward"];
        let mean = r["mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&mean), "reward mean {mean} outside score()'s range: {s}");
    }
    assert!(steps.iter().any(|s| s["stats"]["reward"]["std"].as_f64().unwrap() > 0.0), "no reward spread");
    // The server scored at least the 5 steps x N units x G = 2 answers the learner trained on.
    let log = std::fs::read_to_string(c.dir.join("python-reward.log")).unwrap();
    let total: u64 = log
        .lines()
        .filter_map(|l| l.strip_prefix("scored ").and_then(|r| r.split("(total ").nth(1)))
        .filter_map(|t| t.trim_end_matches(')').parse().ok())
        .max()
        .unwrap_or(0);
    assert!(total >= (5 * N * 2 + 2) as u64, "the Python server scored {total} pairs:\n{log}");
    drop(actor);
}
