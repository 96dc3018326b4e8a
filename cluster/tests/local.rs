//! A [`LocalCluster`] on tiny random models: every role in this process over loopback gRPC,
//! actors playing several units at once. The runs that kill nothing live here; crashes and
//! partitions need real processes (cli/tests).
use selfplay_cluster::{plan_devices, LocalCluster, LocalClusterOptions, RunSummary};
use selfplay_game::Config;
use std::collections::HashSet;
use std::path::Path;
use tch::Device;

const N: usize = 4;
const STEPS: u64 = 4;

fn config(dir: &Path, extra: &[&str]) -> Config {
    let model = dir.join("model");
    let rm = dir.join("rm");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&rm).unwrap();
    selfplay_tests::tiny_model(&model, "gqa_tied", 7);
    selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 8);
    let mut set: Vec<String> = vec![
        "run.seed=3".into(),
        format!("run.steps={STEPS}"),
        format!("run.out_dir={:?}", dir.join("run").to_str().unwrap()),
        "run.checkpoint_every=0".into(),
        format!("model.path={:?}", model.to_str().unwrap()),
        "model.device=\"cpu\"".into(),
        "game.mode=\"lsp-zero\"".into(),
        format!("game.queries_per_step={N}"),
        "game.group_size=2".into(),
        "challenger.max_new_tokens=6".into(),
        "solver.max_new_tokens=8".into(),
        "reward.kind=\"model\"".into(),
        format!("reward.path={:?}", rm.to_str().unwrap()),
        "optim.lr=1e-3".into(),
        "optim.grad_accum=1".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &set).unwrap()
}

fn run(cfg: &Config, actors: usize, max_policy_lag: u64) -> RunSummary {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut opts = LocalClusterOptions::new(cfg.clone(), plan_devices(Device::Cpu, 0, Some(actors), &[]).unwrap());
    opts.max_policy_lag = max_policy_lag;
    rt.block_on(async {
        let cluster = LocalCluster::start(opts, |_| {}).await.unwrap();
        cluster.run(std::future::pending()).await.unwrap()
    })
}

/// The step log; every step trained exactly N distinct units of the run, none twice.
fn steps(cfg: &Config) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(cfg.run.out_dir.join("steps.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), STEPS as usize, "steps logged");
    let mut seen = HashSet::new();
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["stats"]["step"].as_u64(), Some(i as u64 + 1));
        let units = s["units"].as_array().unwrap();
        assert_eq!(units.len(), N, "step {} has {} groups", i + 1, units.len());
        for u in units {
            assert!(seen.insert(u["unit_id"].as_str().unwrap().to_string()), "unit {u} consumed twice");
        }
    }
    steps
}

#[test]
fn two_actors_playing_two_units_at_once_share_every_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &["actor.units_in_flight=2", "run.log_samples=true"]);
    let summary = run(&cfg, 2, 0);
    assert_eq!(summary.learner.steps, STEPS);
    let steps = steps(&cfg);
    // run.log_samples: one line per trained group, the same units as the step log, with the
    // challenger's query and every answer's text and reward.
    let text = std::fs::read_to_string(cfg.run.out_dir.join("samples.jsonl")).unwrap();
    let samples: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(samples.len(), N * STEPS as usize);
    for s in &steps {
        let step = s["stats"]["step"].as_u64().unwrap();
        let logged: HashSet<&str> = samples
            .iter()
            .filter(|x| x["step"].as_u64() == Some(step))
            .map(|x| x["unit_id"].as_str().unwrap())
            .collect();
        let trained: HashSet<&str> =
            s["units"].as_array().unwrap().iter().map(|u| u["unit_id"].as_str().unwrap()).collect();
        assert_eq!(logged, trained, "step {step}");
    }
    for x in &samples {
        assert!(x["query"].is_string(), "{x}");
        let answers = x["answers"].as_array().unwrap();
        assert_eq!(answers.len(), 2, "{x}");
        assert!(answers.iter().all(|a| a["text"].is_string() && a["reward"].as_f64().unwrap().is_finite()), "{x}");
        assert!(answers.iter().all(|a| (1..=8).contains(&a["tokens"].as_u64().unwrap())), "{x}");
    }
    let actors: HashSet<&str> = steps
        .iter()
        .flat_map(|s| s["units"].as_array().unwrap().iter().map(|u| u["actor_id"].as_str().unwrap()))
        .collect();
    assert_eq!(actors, HashSet::from(["local-0", "local-1"]), "both actors contributed");
    // Synchronous mode: every group was sampled by the version it trained.
    for (i, s) in steps.iter().enumerate() {
        for u in s["units"].as_array().unwrap() {
            assert_eq!(u["weights_version"].as_u64(), Some(i as u64), "{u}");
        }
    }
    // Units were played two at a time, never more: K = 2.
    let actors: Vec<_> = summary.actors.into_iter().map(|a| a.unwrap()).collect();
    assert!(actors.iter().all(|a| a.largest_batch <= 2), "{actors:?}");
    assert!(actors.iter().any(|a| a.largest_batch == 2), "no batch of two units: {actors:?}");
    let done: u64 = actors.iter().map(|a| a.units_done).sum();
    assert!(done >= N as u64 * STEPS, "{actors:?}");
}

#[test]
fn in_asynchronous_mode_one_batch_takes_units_of_several_open_steps_within_the_lag() {
    let tmp = tempfile::tempdir().unwrap();
    // K = 8 > N: with steps opened two versions ahead, one batch takes units of several steps.
    let cfg = config(tmp.path(), &["actor.units_in_flight=8"]);
    let summary = run(&cfg, 1, 2);
    let steps = steps(&cfg);
    let mut stale = 0;
    for s in &steps {
        let v = s["stats"]["step"].as_u64().unwrap() - 1;
        for u in s["units"].as_array().unwrap() {
            let lag = v - u["weights_version"].as_u64().unwrap();
            assert!(lag <= 2, "a group {lag} versions old trained with lag 2");
            stale += lag;
        }
    }
    assert!(stale > 0, "asynchronous mode never trained on an older version");
    let actor = summary.actors.into_iter().next().unwrap().unwrap();
    assert!(actor.largest_batch > N, "a batch never reached past one step's units: {actor:?}");
}

/// The learner's weights at `version`: the model on disk for 0, else the step's checkpoint.
fn learner_digest(cfg: &Config, version: u64) -> String {
    let dir = match version {
        0 => cfg.model.path.clone(),
        v => cfg.run.out_dir.join("checkpoints").join(format!("step-{v:08}")),
    };
    selfplay_policy::Llama::load(&dir, Device::Cpu, tch::Kind::Float).unwrap().weights_digest().unwrap()
}

#[test]
fn actors_in_the_learners_process_copy_its_weights_on_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    // Every step checkpointed and kept: the learner's weights at any version an actor ends on.
    let cfg = config(tmp.path(), &["run.checkpoint_every=1", "run.keep_checkpoints=0"]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut opts = LocalClusterOptions::new(cfg.clone(), plan_devices(Device::Cpu, 0, Some(2), &[]).unwrap());
    opts.digest_weights = true;
    let (summary, handle) = rt.block_on(async {
        let cluster = LocalCluster::start(opts, |_| {}).await.unwrap();
        let handle = cluster.in_process.clone();
        (cluster.run(std::future::pending()).await.unwrap(), handle)
    });
    assert_eq!(summary.learner.steps, STEPS);
    steps(&cfg);
    // Version 0 at the epoch's start, then one per step.
    assert_eq!(handle.published(), STEPS + 1, "{handle:?}");
    let actors: Vec<_> = summary.actors.into_iter().map(|a| a.unwrap()).collect();
    let device: u64 = actors.iter().map(|a| a.syncs_device).sum();
    assert_eq!(device, handle.copied(), "{actors:?}");
    // Synchronous mode: step s is played by version s, so each of the STEPS versions was
    // copied at least once.
    assert!(device >= STEPS, "{actors:?}");
    for a in &actors {
        assert!(a.units_done == 0 || a.syncs_device >= 1, "{a:?}");
        assert_eq!(a.syncs_grpc, 0, "an actor of the learner's process fetched over gRPC: {a:?}");
        let digest = a.weights_digest.as_deref().unwrap();
        assert_eq!(
            digest,
            learner_digest(&cfg, a.weights_version),
            "actor at v{} differs from the learner",
            a.weights_version
        );
    }
    assert!(actors.iter().any(|a| a.weights_version == STEPS - 1), "{actors:?}");
    // Not vacuous: training moved the weights away from the initial model.
    assert_ne!(learner_digest(&cfg, STEPS - 1), learner_digest(&cfg, 0));
}
