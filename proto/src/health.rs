//! What a role's health probes report, set where the events happen: ready once the role's
//! service is up and its model and state are loaded; alive while its main loop makes
//! progress, or while it has nothing to do. One per process (`selfplay train` runs every role
//! in one process: it is ready when all are, and a stall of any loop shows).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a busy main loop may go without progress before liveness fails (by default).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(600);

/// The process's probe state.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    /// Components that must be ready, and those that are.
    pending: Mutex<Vec<&'static str>>,
    stopping: AtomicBool,
    /// Milliseconds since `start` of the last progress, per busy loop.
    loops: Mutex<Vec<(&'static str, u64, bool)>>,
    stall_after_ms: AtomicU64,
}

/// The verdict of a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub ready: bool,
    pub live: bool,
    pub stopping: bool,
    /// Components not ready yet.
    pub waiting_for: Vec<&'static str>,
    /// Busy loops without progress for longer than allowed, with the seconds since.
    pub stalled: Vec<(&'static str, f64)>,
}

impl Report {
    /// One word: `starting`, `ready`, `stalled` or `stopping`.
    pub fn state(&self) -> &'static str {
        if self.stopping {
            "stopping"
        } else if !self.live {
            "stalled"
        } else if !self.ready {
            "starting"
        } else {
            "ready"
        }
    }
}

impl Health {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            pending: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            loops: Mutex::new(Vec::new()),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL_AFTER.as_millis() as u64),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// `component` must report [`ready`](Self::ready) before the process is ready.
    pub fn expect(&self, component: &'static str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !p.contains(&component) {
            p.push(component);
        }
    }

    /// `component` is up (its service serves, its model and state are loaded).
    pub fn ready(&self, component: &'static str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|c| *c != component);
    }

    /// The main loop `name` made progress; `busy` says whether it has work now (a loop that
    /// waits for work cannot stall).
    pub fn progress(&self, name: &'static str, busy: bool) {
        let now = self.now_ms();
        let mut l = self.loops.lock().unwrap_or_else(|e| e.into_inner());
        match l.iter_mut().find(|(n, _, _)| *n == name) {
            Some(e) => {
                e.1 = now;
                e.2 = busy;
            }
            None => l.push((name, now, busy)),
        }
    }

    /// Liveness fails once a busy loop has made no progress for this long.
    pub fn set_stall_after(&self, d: Duration) {
        self.stall_after_ms.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// The process is shutting down: not ready any more.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn report(&self) -> Report {
        let now = self.now_ms();
        let limit = self.stall_after_ms.load(Ordering::SeqCst);
        let stalled: Vec<(&'static str, f64)> = self
            .loops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, at, busy)| *busy && now.saturating_sub(*at) > limit)
            .map(|(n, at, _)| (*n, now.saturating_sub(*at) as f64 / 1000.0))
            .collect();
        let stopping = self.stopping.load(Ordering::SeqCst);
        let waiting_for = self.pending.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Report { ready: waiting_for.is_empty() && !stopping, live: stalled.is_empty(), stopping, waiting_for, stalled }
    }
}

/// The process's health state.
pub fn health() -> &'static Health {
    static H: OnceLock<Health> = OnceLock::new();
    H.get_or_init(Health::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_every_component_is_and_stalled_only_while_busy() {
        let h = Health::new();
        assert!(h.report().ready);
        h.expect("model");
        h.expect("service");
        assert_eq!(h.report().state(), "starting");
        assert_eq!(h.report().waiting_for, ["model", "service"]);
        h.ready("model");
        assert!(!h.report().ready);
        h.ready("service");
        assert_eq!(h.report().state(), "ready");
        h.set_stall_after(Duration::from_millis(30));
        h.progress("train", false);
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.report().live, "idle loops do not stall");
        h.progress("train", true);
        std::thread::sleep(Duration::from_millis(60));
        let r = h.report();
        assert_eq!((r.live, r.state()), (false, "stalled"));
        assert_eq!(r.stalled[0].0, "train");
        h.progress("train", true);
        assert!(h.report().live);
        h.stopping();
        assert_eq!(h.report().state(), "stopping");
        assert!(!h.report().ready);
    }
}
