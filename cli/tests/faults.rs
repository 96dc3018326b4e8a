//! Random faults: a seeded schedule of kill -9, SIGSTOP/SIGCONT, restarts and late joins of
//! every role, against real processes on 127.0.0.1. The run must complete with every step
//! training exactly N distinct units, no unit twice, and end bit-identical to the same run
//! undisturbed.
//!
//! The seed is fresh on every run and printed; a failing schedule reproduces with
//! `SELFPLAY_FAULT_SEED=<seed> scripts/test.sh -p selfplay --test faults`.
mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: u64 = 6;
const CHECKPOINT_EVERY: u64 = 3;

/// A small deterministic generator for the schedule.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = selfplay_proto::unit::mix(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

fn signal(p: &Proc, sig: &str) {
    let _ = Command::new("kill").args([sig, &p.child.id().to_string()]).status();
}

fn kill9(p: &mut Proc) {
    let _ = p.child.kill();
    let _ = p.child.wait();
}

fn finished(p: &mut Proc) -> bool {
    matches!(p.child.try_wait(), Ok(Some(_)))
}

fn undisturbed() -> Vec<u8> {
    let (_tmp, mut c) = Cluster::with_run(STEPS, CHECKPOINT_EVERY, &[]);
    let _coord = c.coordinator("127.0.0.1:0");
    let mut learner = c.learner(&[]);
    let a = c.actor("actor-0");
    let b = c.actor("actor-1");
    c.wait_exit(&mut learner);
    c.check_steps(STEPS as usize);
    drop((a, b));
    c.final_weights()
}

/// Runs one schedule; returns the final weights and what was done, for the failure message.
fn faulted(seed: u64) -> (Vec<u8>, Vec<String>, tempfile::TempDir, Cluster) {
    let mut rng = Rng(seed);
    let (tmp, mut c) = Cluster::with_run(STEPS, CHECKPOINT_EVERY, &[]);
    let mut coord = c.coordinator("127.0.0.1:0");
    let coord_listen = c.coordinator_addr.clone().unwrap().trim_start_matches("http://").to_string();
    let mut learner = c.learner(&[]);
    let mut actors: Vec<Proc> = vec![c.actor("actor-0"), c.actor("actor-1")];
    let mut next_actor = 2;
    let mut log: Vec<String> = vec![];
    let t0 = Instant::now();
    // The learner and the coordinator are each hit several times; the first fault is a
    // learner kill early in the run, often before its first checkpoint.
    let mut faults = 0;
    let max_faults = 10;
    let mut first = true;
    while !finished(&mut learner) {
        assert!(t0.elapsed() < Duration::from_secs(600), "seed {seed}: no end after 600 s; faults: {log:?}");
        std::thread::sleep(if first { rng.millis(200, 1500) } else { rng.millis(300, 2500) });
        if finished(&mut learner) || faults >= max_faults {
            continue;
        }
        let done = c.steps().len();
        let what = if first { 0 } else { rng.below(7) };
        first = false;
        faults += 1;
        match what {
            0 | 1 => {
                log.push(format!("{:?} kill -9 learner at {done} steps", t0.elapsed()));
                kill9(&mut learner);
                if rng.below(2) == 0 {
                    std::thread::sleep(rng.millis(0, 1500));
                }
                learner = c.learner(&["--resume"]);
            }
            2 => {
                log.push(format!("{:?} kill -9 coordinator at {done} steps", t0.elapsed()));
                kill9(&mut coord);
                std::thread::sleep(rng.millis(0, 1500));
                coord = c.coordinator(&coord_listen);
            }
            3 => {
                let i = rng.below(actors.len() as u64) as usize;
                let pause = rng.millis(200, 4000); // beyond the 1.5 s lease at times
                log.push(format!("{:?} SIGSTOP {} for {pause:?} at {done} steps", t0.elapsed(), actors[i].name));
                signal(&actors[i], "-STOP");
                std::thread::sleep(pause);
                signal(&actors[i], "-CONT");
            }
            4 => {
                let i = rng.below(actors.len() as u64) as usize;
                log.push(format!("{:?} kill -9 {} and restart it at {done} steps", t0.elapsed(), actors[i].name));
                let name = actors[i].name.clone();
                kill9(&mut actors[i]);
                actors[i] = c.actor(&name);
            }
            5 => {
                let name = format!("actor-{next_actor}");
                next_actor += 1;
                log.push(format!("{:?} late join {name} at {done} steps", t0.elapsed()));
                actors.push(c.actor(&name));
                if actors.len() > 3 {
                    let mut old = actors.remove(0);
                    log.push(format!("{:?} kill -9 {}", t0.elapsed(), old.name));
                    kill9(&mut old);
                }
            }
            _ => {
                let pause = rng.millis(200, 3000);
                log.push(format!("{:?} SIGSTOP learner for {pause:?} at {done} steps", t0.elapsed()));
                signal(&learner, "-STOP");
                std::thread::sleep(pause);
                signal(&learner, "-CONT");
            }
        }
    }
    let status = learner.child.wait().unwrap();
    assert!(status.success(), "seed {seed}: learner failed: {status}\nfaults: {log:#?}\n{}", c.log("learner"));
    drop(actors);
    let w = c.final_weights();
    (w, log, tmp, c)
}

#[test]
fn random_kill_schedules_end_bit_identical_to_an_undisturbed_run() {
    let seeds: Vec<u64> = match std::env::var("SELFPLAY_FAULT_SEED") {
        Ok(s) => s.split(',').map(|x| x.trim().parse().expect("SELFPLAY_FAULT_SEED: comma-separated u64")).collect(),
        Err(_) => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            let n: usize = std::env::var("SELFPLAY_FAULT_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
            (0..n as u64).map(|i| selfplay_proto::unit::mix(t.as_nanos() as u64 ^ i) % 1_000_000_007).collect()
        }
    };
    let want = undisturbed();
    for seed in seeds {
        eprintln!("fault schedule seed {seed} (reproduce: SELFPLAY_FAULT_SEED={seed})");
        let (got, log, _tmp, c) = faulted(seed);
        eprintln!("seed {seed}: {}", log.join("; "));
        let steps = c.check_steps(STEPS as usize);
        for (i, s) in steps.iter().enumerate() {
            for u in s["units"].as_array().unwrap() {
                assert_eq!(u["weights_version"].as_u64(), Some(i as u64), "seed {seed}: step {} sampled off-policy", i + 1);
            }
        }
        assert!(got == want, "seed {seed}: final weights differ from the undisturbed run; faults: {log:#?}");
    }
}
