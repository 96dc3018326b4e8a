//! A staged schedule as real processes: a first run's checkpoint starts a second run
//! (`selfplay learner --init-from CHECKPOINT --keep-optimizer`) in a new output directory. The
//! second run counts its own steps from 1, its actors sample with the checkpoint's weights
//! (fetched as version 0), and its reference stays model.path unless model.reference_path
//! names another: so its first step starts away from the reference (KL > 0), where an
//! ordinary run's first step has KL 0.
mod common;
use common::*;

/// The log without its terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn kl_of_step_1(c: &Cluster) -> f64 {
    c.steps()[0]["stats"]["kl_solver"].as_f64().unwrap()
}

#[test]
fn a_second_run_starts_from_the_first_runs_checkpoint() {
    let (_tmp_a, mut a) = Cluster::new(&[]);
    let _coord = a.coordinator("127.0.0.1:0");
    let mut learner = a.learner(&[]);
    let actor = a.actor("actor-a");
    a.wait_exit(&mut learner);
    a.check_steps(5);
    drop(actor);
    let ckpt = a.dir.join("run/checkpoints/step-00000004");
    assert!(ckpt.join("optimizer.safetensors").exists());
    let kl_fresh = kl_of_step_1(&a);
    assert!(kl_fresh.abs() < 1e-3, "an ordinary run's first step samples from the reference: KL {kl_fresh}");

    let stage = |reference: Option<&std::path::Path>| {
        let (tmp, mut b) = Cluster::new(&[]);
        let _coord = b.coordinator("127.0.0.1:0");
        let ref_args: Vec<String> = reference
            .map(|r| vec!["--set".into(), format!("model.reference_path={:?}", r.to_str().unwrap())])
            .unwrap_or_default();
        let mut args = vec!["--init-from".to_string(), ckpt.to_str().unwrap().into(), "--keep-optimizer".into()];
        args.extend(ref_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut learner = b.learner(&args);
        // The actors compute the reference log-probs: they read model.reference_path too.
        let actor = b.actor_with("actor-b", &ref_args);
        b.wait_exit(&mut learner);
        b.check_steps(5);
        drop(actor);
        let log = std::fs::read_to_string(b.dir.join("learner.log")).unwrap();
        assert!(log.contains("a new run from a checkpoint's weights"), "{log}");
        let actor_log = strip_ansi(&std::fs::read_to_string(b.dir.join("actor-b.log")).unwrap());
        assert!(actor_log.contains("weights loaded") && actor_log.contains("version=0"), "{actor_log}");
        (tmp, b)
    };
    // Reference = model.path (the first run's initial model): the checkpoint is 4 steps away.
    let (_t1, b) = stage(None);
    let kl = kl_of_step_1(&b);
    assert!(kl > 1e-3, "the second run started at the reference (KL {kl}), not at the checkpoint");
    // Reference = the checkpoint itself: the second run starts at its reference again.
    let (_t2, b) = stage(Some(&ckpt));
    let kl = kl_of_step_1(&b);
    assert!(kl.abs() < 1e-3, "with model.reference_path = the checkpoint, step 1 should have KL 0, got {kl}");
}
