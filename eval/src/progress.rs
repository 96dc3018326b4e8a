//! A bar on a terminal, plain lines otherwise (logs, CI), nothing when quiet (tests).
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else a plain line per step.
    Auto,
    Quiet,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    label: String,
    total: u64,
    done: u64,
}

impl Progress {
    pub fn new(mode: ProgressMode, label: &str, total: u64) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (mode == ProgressMode::Auto && tty).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:<18} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        Progress { bar, plain: mode == ProgressMode::Auto && !tty, label: label.into(), total, done: 0 }
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
        } else if self.plain {
            eprintln!("{}: {}/{}", self.label, self.done, self.total);
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}
