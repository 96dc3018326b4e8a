//! Step progress: a bar with reward, KL and seconds per step on a terminal, plain lines
//! otherwise (logs, CI).
use indicatif::{ProgressBar, ProgressStyle};
use selfplay_game::StepStats;
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(total_steps: u64) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = if total_steps > 0 { ProgressBar::new(total_steps) } else { ProgressBar::no_length() };
        bar.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        Progress { bar: Some(bar) }
    }

    pub fn step(&self, s: &StepStats) {
        let msg = format!(
            "R {:+.3} R_Q {:.2} KL {:.4}/{:.4} loss {:+.4} {:.1}s/step",
            s.reward.mean, s.self_reward.mean, s.kl_solver, s.kl_challenger, s.loss, s.step_seconds
        );
        match &self.bar {
            Some(b) => {
                b.set_position(s.step);
                b.set_message(msg);
            }
            None => eprintln!("step {} {msg}", s.step),
        }
    }
}
