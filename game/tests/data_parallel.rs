//! Learner ranks over c10d's Gloo, as real processes on loopback: two ranks resumed from one
//! process's checkpoint (weights, AdamW moments, step) and given the same groups take the same
//! step: the same loss and gradient norm (1e-6 relative), the same weights and optimizer state
//! (1e-6), and their checkpoint is one process's format. (Over several steps the two drift
//! apart by more: gradients summed in another order differ in their last bits, and AdamW
//! divides by the root of tiny second moments.) This test binary hosts the TCPStore and starts
//! itself as the ranks (the `rank` test, which runs only when a parent names it).
use selfplay_game::driver::units_for_step;
use selfplay_game::ranks::{self, Launch};
use selfplay_game::{Config, Player, RolloutGroup, StepResult, Trainer};
use selfplay_policy::{weights, Policy};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const STEPS: u64 = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

fn config(dir: &Path) -> Config {
    Config::load(
        None,
        &[
            format!("model.path={:?}", dir.join("policy").to_str().unwrap()),
            "model.device=cpu".into(),
            "game.mode=lsp-zero".into(),
            "game.queries_per_step=2".into(),
            "game.group_size=3".into(),
            "optim.grad_accum=2".into(),
            "optim.lr=1e-3".into(),
            "optim.max_grad_norm=0.5".into(),
            "challenger.max_new_tokens=6".into(),
            "solver.max_new_tokens=8".into(),
            "reward.kind=model".into(),
            format!("reward.path={:?}", dir.join("rm").to_str().unwrap()),
            "run.seed=9".into(),
        ],
    )
    .unwrap()
}

fn load(cfg: &Config) -> Policy {
    Policy::load(&cfg.model.path, Device::Cpu, Kind::Float).unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1e-12), "{what}: {a} vs {b}");
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    weights::load_tensors(&[path.to_path_buf()], Kind::Float, Device::Cpu, |_| true).unwrap()
}

fn same_tensors(a: &Path, b: &Path) {
    let (a, b) = (tensors(a), tensors(b));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{name} differs by {diff}");
    }
}

#[test]
fn two_ranks_train_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::create_dir_all(dir.join("rm")).unwrap();
    selfplay_tests::tiny_model(&dir.join("policy"), "gqa_tied", 4);
    selfplay_tests::tiny_reward_model(&dir.join("rm"), "gqa_tied", 5);
    let cfg = config(dir);

    // One process: play and train STEPS on-policy steps, keeping each step's groups.
    let mut trainer = Trainer::new(load(&cfg), cfg.clone()).unwrap();
    let mut player = Player::new(load(&cfg), None, cfg.clone()).unwrap();
    let mut steps = vec![];
    for step in 0..STEPS {
        if step == STEPS - 1 {
            trainer.save_checkpoint(&dir.join("before"), serde_json::json!({})).unwrap();
        }
        let groups: Vec<RolloutGroup> =
            units_for_step(&cfg, step, &[]).iter().map(|u| player.play(u, step, "local").unwrap().0).collect();
        let stats = trainer.train_step(&groups).unwrap();
        assert!(!stats.skipped);
        player.policy.model.copy_weights_from(&trainer.policy.model).unwrap();
        steps.push((groups, stats.loss, stats.grad_norm));
    }
    let one = trainer.save_checkpoint(&dir.join("one"), serde_json::json!({})).unwrap();
    let (last, loss, norm) = steps.last().unwrap();
    std::fs::write(dir.join("groups.json"), serde_json::to_vec(last).unwrap()).unwrap();

    // Two ranks on the same groups, launched as torchrun would (rank 0 hosts the store on
    // MASTER_PORT, a port the OS had free a moment ago).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|r| {
            Command::new(&exe)
                .args(["--ignored", "--exact", "rank", "--nocapture", "--test-threads=1"])
                .env("SP_DP_DIR", dir)
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "2")
                .env("LOCAL_RANK", "0")
                // One libtorch thread per rank: two ranks on two cores.
                .env("SP_DP_THREADS", "1")
                // Buckets of 1,000 elements: the model's parameters straddle many bucket edges
                // (the default, 2^25, would put this model in one bucket).
                .env("SELFPLAY_DP_BUCKET_ELEMENTS", "1000")
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = Instant::now() + TIMEOUT * 2;
    let mut codes = vec![None, None];
    while codes.iter().any(Option::is_none) {
        for (r, c) in children.iter_mut().enumerate() {
            if codes[r].is_none() {
                codes[r] = c.try_wait().unwrap().map(|s| s.code());
            }
        }
        if Instant::now() > deadline {
            children.iter_mut().for_each(|c| drop(c.kill()));
            panic!("ranks still running: {codes:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(codes, vec![Some(Some(0)), Some(Some(0))], "rank exit codes");

    // Rank 0 wrote the step's loss and gradient norm, and the checkpoint.
    let (rl, rn): (f64, f64) = serde_json::from_slice(&std::fs::read(dir.join("ranked.json")).unwrap()).unwrap();
    close(*loss, rl, "loss");
    close(*norm, rn, "gradient norm");
    let two = dir.join("two");
    same_tensors(&one.join("model.safetensors"), &two.join("model.safetensors"));
    same_tensors(&one.join("optimizer.safetensors"), &two.join("optimizer.safetensors"));
    // The ranks' checkpoint resumes in one process.
    let (resumed, _) = Trainer::resume(&two, None, Device::Cpu).unwrap();
    assert_eq!((resumed.step, resumed.opt.t), (STEPS, STEPS));
}

/// One learner rank (started by the test above).
#[test]
#[ignore = "a rank of the multi-process test; it starts it"]
fn rank() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
    let dir = std::path::PathBuf::from(var("SP_DP_DIR"));
    tch::set_num_threads(var("SP_DP_THREADS").parse().unwrap());
    let launch = Launch::from_env(|k| std::env::var(k).ok()).unwrap().expect("WORLD_SIZE is set");
    let (trainer, _) = Trainer::resume(&dir.join("before"), None, Device::Cpu).unwrap();
    let (trainer, store) = ranks::join(&launch, trainer, TIMEOUT).unwrap();
    assert_eq!(trainer.rank(), (launch.rank, 2));
    if launch.rank != 0 {
        // Does what rank 0 posts: the step, the checkpoint, the end.
        let mut steps = 0;
        ranks::follow(trainer, store, |t| {
            steps += 1;
            assert_eq!(t.step, STEPS);
        })
        .unwrap();
        assert_eq!(steps, 1);
        return;
    }
    let mut lead = ranks::lead(trainer, store);
    let groups: Vec<RolloutGroup> = serde_json::from_slice(&std::fs::read(dir.join("groups.json")).unwrap()).unwrap();
    // An invalid step (a group missing) is refused on every rank and changes nothing.
    assert!(lead.train_step_checked(&groups[..1], None).is_err());
    let stats = match lead.train_step_checked(&groups, None).unwrap() {
        StepResult::Trained(s) => s,
        other => panic!("{other:?}"),
    };
    assert!(!stats.skipped);
    assert_eq!(stats.step, STEPS);
    lead.save_checkpoint(&dir.join("two"), serde_json::json!({})).unwrap();
    lead.stop().unwrap();
    std::fs::write(dir.join("ranked.json"), serde_json::to_vec(&(stats.loss, stats.grad_norm)).unwrap()).unwrap();
}
