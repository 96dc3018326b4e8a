//! The coordinator's state machine: membership with leases, the steps the learner opened and
//! the queue of work units. Pure: no I/O, no clock of its own (every call that needs the time
//! takes `now`), no metrics; callers turn the outcomes into RPC answers, metrics and
//! snapshots.
//!
//! Invariants (checked by the tests after every operation):
//! - a unit is `Pending` exactly when it is in the queue, once;
//! - a unit is `Leased(a)` exactly when it is in member `a`'s set, so it is never handed to
//!   two live actors at once;
//! - a `Done` unit is never queued again, except when the learner reopens its step.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use selfplay_proto::unit::{parse_unit_id, unit_id, unit_seed, UnitKey};

/// Completed steps kept (with their completion records) so that a repeated `OpenStep` for
/// them stays a no-op.
pub const KEEP_COMPLETED_STEPS: usize = 64;

/// The most units one step may have, and the most steps open at once: bounds on what one
/// `OpenStep` can make the coordinator allocate.
pub const MAX_UNITS_PER_STEP: u32 = 1 << 16;
pub const MAX_OPEN_STEPS: usize = 1024;
/// The most units of all open steps together (about 40 MB of slots and queue), and the most
/// bytes of their prompts and tasks together: what every open step may hold at once.
pub const MAX_OPEN_UNITS: usize = 1 << 20;
pub const MAX_OPEN_TEXT_BYTES: usize = 256 << 20;
/// The longest actor id, device name and run id a request may carry.
pub const MAX_ID_BYTES: usize = 256;

/// Window of the throughput figure in `Status`.
pub const THROUGHPUT_WINDOW: Duration = Duration::from_secs(60);

#[cfg(test)]
fn splitmix64(z: u64) -> u64 {
    selfplay_proto::unit::mix(z)
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("actor {0:?} is not a member (its lease expired or the coordinator restarted): Join first")]
    UnknownActor(String),
    #[error("actor_id must not be empty")]
    EmptyActorId,
    #[error("{field} is {len} bytes long; the limit is {MAX_ID_BYTES}")]
    TooLong { field: &'static str, len: usize },
    #[error(
        "actor id {0:?} is held by another live actor process; join again once its lease expired (or use another --actor-id)"
    )]
    ActorIdInUse(String),
    #[error("actor {0:?} joined from another process: this one may not act in its name")]
    NotTheMember(String),
    #[error("step {step} would bring the open steps to {units} units (limit {MAX_OPEN_UNITS})")]
    TooManyOpenUnits { step: u64, units: usize },
    #[error(
        "step {step} would bring the open steps' prompts and tasks to {bytes} bytes (limit {MAX_OPEN_TEXT_BYTES})"
    )]
    TooMuchText { step: u64, bytes: usize },
    #[error("last_epoch {0} leaves no room for a new epoch")]
    EpochOverflow(u64),
    #[error("step {step}: units must be at least 1")]
    NoUnits { step: u64 },
    #[error("step {step}: {field} holds {got} entries for {units} units (give none or one per unit)")]
    PerUnitCount { step: u64, field: &'static str, units: u32, got: usize },
    #[error("step {step} is already open with {open} units, not {asked}")]
    UnitCountMismatch { step: u64, open: u32, asked: u32 },
    #[error("step {step} completed and its {field} were released: reopening it needs them again")]
    ReopenNeeds { step: u64, field: &'static str },
    #[error("step {step}: {units} units is more than the limit of {MAX_UNITS_PER_STEP}")]
    TooManyUnits { step: u64, units: u32 },
    #[error("{open} steps are open already (limit {MAX_OPEN_STEPS}): step {step} refused")]
    TooManySteps { step: u64, open: usize },
    #[error(
        "{}: the request carries epoch {got}, the coordinator is at {current}",
        selfplay_proto::error::SUPERSEDED_EPOCH
    )]
    SupersededEpoch { got: u64, current: u64 },
    #[error(
        "this coordinator serves run {ours:?}, not {theirs:?} (start it with a fresh state directory for a new run)"
    )]
    OtherRun { ours: String, theirs: String },
}

/// What the learner asks for in `OpenStep`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepSpec {
    pub step: u64,
    pub units: u32,
    pub min_weights_version: u64,
    /// Empty, or one per unit (GRPO prompts).
    pub prompts: Vec<String>,
    /// Empty, or one per unit (challenger tasks).
    pub tasks: Vec<String>,
    /// Drop every older step's pending and leased units.
    pub discard_older: bool,
    /// Put this step's completed units back to pending (the learner lost them).
    pub reopen: bool,
    /// The learner epoch asking; 0 is accepted only while no epoch began (old learners).
    pub epoch: u64,
}

/// What `open_step` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOutcome {
    /// Units newly queued.
    pub queued: u32,
    /// The step existed already (the request was a repeat, or a reopen).
    pub existed: bool,
    /// Units of older steps dropped (pending or leased).
    pub discarded: usize,
}

/// One unit handed to an actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedUnit {
    pub unit_id: String,
    pub step: u64,
    pub index: u32,
    pub seed: u64,
    pub min_weights_version: u64,
    pub task: String,
    pub prompt: String,
    /// The unit had been issued before (a lease expired or the unit was given back).
    pub reissue: bool,
    /// The learner epoch of the lease.
    pub epoch: u64,
    /// The step's incarnation (times it was reopened) at the lease.
    pub incarnation: u32,
}

/// What `complete` did. Every outcome is harmless; only `Done` changes the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    /// The unit is now done.
    Done,
    /// The holder gave the unit back unplayed: it is at the front of the queue.
    GivenBack,
    /// The unit was done already.
    AlreadyDone,
    /// No such unit (its step was discarded or never opened, or the id is malformed).
    Unknown,
    /// A give-back from an actor that does not hold the unit: ignored.
    NotHolder,
    /// The report belongs to an older learner epoch: the unit was reset when the learner
    /// restarted, and the learner that accepted the group is gone. Ignored.
    Superseded,
    /// The report is of a lease from before the step was reopened. Ignored (a unit still
    /// leased comes back through the holder's next lease request or its lease expiry).
    OldIncarnation,
}

/// What `begin_epoch` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochOutcome {
    pub epoch: u64,
    pub run_seed: u64,
    /// Steps forgotten.
    pub steps_dropped: usize,
    /// Leases cancelled.
    pub leases_cancelled: usize,
}

/// Actors dropped by `expire`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    pub actors: Vec<String>,
    /// Their units, now at the front of the queue.
    pub requeued: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub units_issued: u64,
    pub units_reissued: u64,
    pub units_done: u64,
    pub leases_expired: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UnitState {
    Pending,
    Leased(String),
    Done,
}

#[derive(Debug, Clone)]
struct Slot {
    state: UnitState,
    issues: u32,
}

#[derive(Debug, Clone)]
struct Step {
    min_weights_version: u64,
    prompts: Vec<String>,
    tasks: Vec<String>,
    /// Set when the step completed and its prompts (tasks) were released to keep the
    /// snapshot small: a reopen must give them again.
    needs_prompts: bool,
    needs_tasks: bool,
    slots: Vec<Slot>,
    done: u32,
    /// How often the step was reopened. Leases carry it; a completion of an earlier
    /// incarnation (its group was dropped by the learner before the reopen) is ignored.
    reopens: u32,
}

impl Step {
    fn complete(&self) -> bool {
        self.done as usize == self.slots.len()
    }
}

#[derive(Debug, Clone)]
struct Member {
    /// The client instance that joined (its `selfplay-instance` header): only it may act in
    /// this member's name.
    instance: String,
    device: String,
    last_seen: Instant,
    weights_version: u64,
    units: BTreeSet<UnitKey>,
    units_done: u64,
}

/// One member as `Status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub actor_id: String,
    pub device: String,
    pub weights_version: u64,
    pub units: Vec<String>,
    pub units_done: u64,
    pub last_heartbeat_age: Duration,
}

/// The persistent part of the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: u32,
    pub run_seed: u64,
    pub steps: Vec<StepSnapshot>,
    /// Pending units in queue order. Units neither here nor done were leased: a restored
    /// state queues them first.
    pub pending: Vec<UnitKey>,
    pub counters: Counters,
    /// The current learner epoch (0: none began yet).
    #[serde(default)]
    pub epoch: u64,
    /// The run this state belongs to (empty: not bound yet).
    #[serde(default)]
    pub run_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSnapshot {
    pub step: u64,
    pub units: u32,
    pub min_weights_version: u64,
    pub prompts: Vec<String>,
    pub tasks: Vec<String>,
    pub done: Vec<u32>,
    #[serde(default)]
    pub needs_prompts: bool,
    #[serde(default)]
    pub needs_tasks: bool,
    #[serde(default)]
    pub reopens: u32,
}

const SNAPSHOT_FORMAT: u32 = 1;

/// The state machine.
#[derive(Debug, Clone)]
pub struct State {
    run_seed: u64,
    ttl: Duration,
    members: BTreeMap<String, Member>,
    steps: BTreeMap<u64, Step>,
    queue: VecDeque<UnitKey>,
    counters: Counters,
    completions: VecDeque<Instant>,
    started: Instant,
    generation: u64,
    epoch: u64,
    run_id: String,
}

impl State {
    pub fn new(run_seed: u64, ttl: Duration, now: Instant) -> Self {
        Self {
            epoch: 0,
            run_id: String::new(),
            run_seed,
            ttl,
            members: BTreeMap::new(),
            steps: BTreeMap::new(),
            queue: VecDeque::new(),
            counters: Counters::default(),
            completions: VecDeque::new(),
            started: now,
            generation: 0,
        }
    }

    /// Rebuilds the state saved in `snapshot`: no members; units that were leased are pending,
    /// ahead of the rest. Inconsistent entries (out-of-range indices, duplicates) are dropped.
    pub fn restore(snapshot: Snapshot, ttl: Duration, now: Instant) -> Self {
        let mut s = Self::new(snapshot.run_seed, ttl, now);
        s.counters = snapshot.counters;
        s.epoch = snapshot.epoch;
        s.run_id = snapshot.run_id;
        for st in snapshot.steps {
            let mut slots = vec![Slot { state: UnitState::Pending, issues: 0 }; st.units as usize];
            let mut done = 0;
            for i in st.done {
                if let Some(slot) = slots.get_mut(i as usize) {
                    if slot.state != UnitState::Done {
                        slot.state = UnitState::Done;
                        done += 1;
                    }
                }
            }
            let per_unit = |v: Vec<String>| {
                if v.len() == st.units as usize {
                    v
                } else {
                    Vec::new()
                }
            };
            s.steps.insert(
                st.step,
                Step {
                    min_weights_version: st.min_weights_version,
                    prompts: per_unit(st.prompts),
                    tasks: per_unit(st.tasks),
                    needs_prompts: st.needs_prompts,
                    needs_tasks: st.needs_tasks,
                    slots,
                    done,
                    reopens: st.reopens,
                },
            );
        }
        let listed: BTreeSet<UnitKey> = snapshot.pending.iter().copied().collect();
        // Leased at the time of the snapshot: first in line, in unit order, and counted as
        // re-issued when handed out again.
        for (&step, st) in s.steps.iter_mut() {
            for (i, slot) in st.slots.iter_mut().enumerate() {
                let key = (step, i as u32);
                if slot.state == UnitState::Pending && !listed.contains(&key) {
                    slot.issues = 1;
                    s.queue.push_back(key);
                }
            }
        }
        let mut seen = BTreeSet::new();
        for key in snapshot.pending {
            let pending = s.slot(key).is_some_and(|slot| slot.state == UnitState::Pending);
            if pending && seen.insert(key) {
                s.queue.push_back(key);
            }
        }
        s
    }

    /// The persistent part of the state.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            format: SNAPSHOT_FORMAT,
            run_seed: self.run_seed,
            steps: self
                .steps
                .iter()
                .map(|(&step, st)| StepSnapshot {
                    step,
                    units: st.slots.len() as u32,
                    min_weights_version: st.min_weights_version,
                    prompts: st.prompts.clone(),
                    tasks: st.tasks.clone(),
                    done: st
                        .slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.state == UnitState::Done)
                        .map(|(i, _)| i as u32)
                        .collect(),
                    needs_prompts: st.needs_prompts,
                    needs_tasks: st.needs_tasks,
                    reopens: st.reopens,
                })
                .collect(),
            pending: self.queue.iter().copied().collect(),
            counters: self.counters.clone(),
            epoch: self.epoch,
            run_id: self.run_id.clone(),
        }
    }

    /// Bumped by every change that the snapshot records: compare it with the generation last
    /// written to know whether a write is due.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn run_seed(&self) -> u64 {
        self.run_seed
    }

    /// The current learner epoch (0 before the first `begin_epoch`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Refuses a request from another run: `run_id` empty means "any" on either side; a
    /// coordinator without a run id takes the first one it is given.
    pub fn check_run(&mut self, run_id: &str) -> Result<(), StateError> {
        if run_id.is_empty() {
            return Ok(());
        }
        if self.run_id.is_empty() {
            self.run_id = run_id.to_string();
            self.generation += 1;
            return Ok(());
        }
        if self.run_id != run_id {
            return Err(StateError::OtherRun { ours: self.run_id.clone(), theirs: run_id.to_string() });
        }
        Ok(())
    }

    /// A learner (re)starts from its checkpoint, which is the truth: a new epoch begins,
    /// greater than both the current one and `last_epoch` (the newest the learner knows);
    /// every step and every lease is forgotten (the learner opens its window again, and every
    /// unit it has not consumed is played again with its weights). A new run (no step ever
    /// opened, no epoch) takes the learner's seed.
    pub fn begin_epoch(&mut self, last_epoch: u64, run_id: &str, run_seed: u64) -> Result<EpochOutcome, StateError> {
        if run_id.len() > MAX_ID_BYTES {
            return Err(StateError::TooLong { field: "run_id", len: run_id.len() });
        }
        let next = self.epoch.max(last_epoch).checked_add(1).ok_or(StateError::EpochOverflow(last_epoch))?;
        self.check_run(run_id)?;
        if self.epoch == 0 && self.steps.is_empty() && self.counters.units_issued == 0 {
            self.run_seed = run_seed;
        }
        self.epoch = next;
        let steps_dropped = self.steps.len();
        self.steps.clear();
        self.queue.clear();
        let mut leases_cancelled = 0;
        for m in self.members.values_mut() {
            leases_cancelled += m.units.len();
            m.units.clear();
        }
        self.generation += 1;
        Ok(EpochOutcome { epoch: self.epoch, run_seed: self.run_seed, steps_dropped, leases_cancelled })
    }

    fn check_epoch(&self, epoch: u64) -> Result<(), StateError> {
        if epoch == self.epoch {
            Ok(())
        } else {
            Err(StateError::SupersededEpoch { got: epoch, current: self.epoch })
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn members_alive(&self) -> usize {
        self.members.len()
    }

    pub fn is_member(&self, actor: &str) -> bool {
        self.members.contains_key(actor)
    }

    pub fn units_pending(&self) -> usize {
        self.queue.len()
    }

    pub fn units_leased(&self) -> usize {
        self.members.values().map(|m| m.units.len()).sum()
    }

    /// The newest step the learner opened (0 when none is known).
    pub fn latest_step(&self) -> u64 {
        self.steps.keys().next_back().copied().unwrap_or(0)
    }

    /// Steps known, with (units, done).
    pub fn steps(&self) -> Vec<(u64, u32, u32)> {
        self.steps.iter().map(|(&k, s)| (k, s.slots.len() as u32, s.done)).collect()
    }

    /// Pending unit ids in queue order.
    pub fn pending_ids(&self) -> Vec<String> {
        self.queue.iter().map(|&(s, i)| unit_id(s, i)).collect()
    }

    fn slot(&self, (step, index): UnitKey) -> Option<&Slot> {
        self.steps.get(&step)?.slots.get(index as usize)
    }

    fn slot_mut(&mut self, (step, index): UnitKey) -> Option<&mut Slot> {
        self.steps.get_mut(&step)?.slots.get_mut(index as usize)
    }

    /// Puts every unit `actor` holds back at the front of the queue, lowest first.
    fn release_units_of(&mut self, units: BTreeSet<UnitKey>) -> usize {
        let n = units.len();
        for key in units.into_iter().rev() {
            if let Some(slot) = self.slot_mut(key) {
                slot.state = UnitState::Pending;
                self.queue.push_front(key);
            }
        }
        n
    }

    /// Registers an actor (again) from client `instance`. The same instance joining again
    /// has lost its membership (or its view of it): the units it held are given back first.
    /// Another instance may take the id only once the member's lease ran out, so no process
    /// can push a live actor out. Returns whether it was a member.
    pub fn join(&mut self, actor: &str, device: &str, instance: &str, now: Instant) -> Result<bool, StateError> {
        if actor.is_empty() {
            return Err(StateError::EmptyActorId);
        }
        for (field, value) in [("actor_id", actor), ("device", device), ("instance", instance)] {
            if value.len() > MAX_ID_BYTES {
                return Err(StateError::TooLong { field, len: value.len() });
            }
        }
        if let Some(m) = self.members.get(actor) {
            if m.instance != instance && now.saturating_duration_since(m.last_seen) < self.ttl {
                return Err(StateError::ActorIdInUse(actor.to_string()));
            }
        }
        let was = match self.members.remove(actor) {
            Some(old) => {
                self.release_units_of(old.units);
                true
            }
            None => false,
        };
        self.members.insert(
            actor.to_string(),
            Member {
                instance: instance.to_string(),
                device: device.to_string(),
                last_seen: now,
                weights_version: 0,
                units: BTreeSet::new(),
                units_done: 0,
            },
        );
        Ok(was)
    }

    /// Refuses a request in a member's name from another client instance than the one that
    /// joined. An unknown actor passes (the request then finds no member).
    pub fn check_member(&self, actor: &str, instance: &str) -> Result<(), StateError> {
        match self.members.get(actor) {
            Some(m) if m.instance != instance => Err(StateError::NotTheMember(actor.to_string())),
            _ => Ok(()),
        }
    }

    /// Renews a member's lease; `false` when the actor is unknown (it must join again).
    pub fn heartbeat(&mut self, actor: &str, weights_version: u64, now: Instant) -> bool {
        match self.members.get_mut(actor) {
            Some(m) => {
                m.last_seen = now;
                m.weights_version = weights_version;
                true
            }
            None => false,
        }
    }

    /// Removes a member at once; its units go back to the front of the queue. Returns how
    /// many, `None` when it was not a member.
    pub fn leave(&mut self, actor: &str) -> Option<usize> {
        let m = self.members.remove(actor)?;
        Some(self.release_units_of(m.units))
    }

    /// Drops the members whose lease ran out (no heartbeat, lease or completion for `ttl`)
    /// and puts their units back at the front of the queue.
    pub fn expire(&mut self, now: Instant) -> Expired {
        let ttl = self.ttl;
        let dead: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.last_seen) >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Expired::default();
        for id in dead {
            if let Some(m) = self.members.remove(&id) {
                out.requeued += self.release_units_of(m.units);
                self.counters.leases_expired += 1;
                out.actors.push(id);
            }
        }
        out
    }

    /// Opens a step: cuts it into `spec.units` units and queues them. Repeating the request
    /// for a step that exists changes nothing (unless `reopen`); `discard_older` drops the
    /// pending and leased units of every older step.
    pub fn open_step(&mut self, spec: StepSpec) -> Result<OpenOutcome, StateError> {
        let StepSpec { step, units, min_weights_version, prompts, tasks, discard_older, reopen, epoch } = spec;
        self.check_epoch(epoch)?;
        if units == 0 {
            return Err(StateError::NoUnits { step });
        }
        if units > MAX_UNITS_PER_STEP {
            return Err(StateError::TooManyUnits { step, units });
        }
        if !self.steps.contains_key(&step) && self.steps.len() >= MAX_OPEN_STEPS {
            return Err(StateError::TooManySteps { step, open: self.steps.len() });
        }
        for (field, got) in [("prompts", prompts.len()), ("tasks", tasks.len())] {
            if got != 0 && got != units as usize {
                return Err(StateError::PerUnitCount { step, field, units, got });
            }
        }
        if !self.steps.contains_key(&step) {
            // What every open step holds once this one is open, older ones included (they
            // may be dropped by discard_older, but the bound does not count on it).
            let open_units: usize = self.steps.values().map(|st| st.slots.len()).sum::<usize>() + units as usize;
            if open_units > MAX_OPEN_UNITS {
                return Err(StateError::TooManyOpenUnits { step, units: open_units });
            }
        }
        let text = |v: &[String]| v.iter().map(String::len).sum::<usize>();
        let open_text: usize = self
            .steps
            .iter()
            .filter(|(&k, _)| k != step)
            .map(|(_, st)| text(&st.prompts) + text(&st.tasks))
            .sum::<usize>()
            + text(&prompts)
            + text(&tasks);
        if open_text > MAX_OPEN_TEXT_BYTES {
            return Err(StateError::TooMuchText { step, bytes: open_text });
        }
        if let Some(existing) = self.steps.get(&step) {
            let open = existing.slots.len() as u32;
            if open != units {
                return Err(StateError::UnitCountMismatch { step, open, asked: units });
            }
            if reopen && existing.needs_prompts && prompts.is_empty() {
                return Err(StateError::ReopenNeeds { step, field: "prompts" });
            }
            if reopen && existing.needs_tasks && tasks.is_empty() {
                return Err(StateError::ReopenNeeds { step, field: "tasks" });
            }
        }
        let mut out = OpenOutcome { queued: 0, existed: false, discarded: 0 };
        if discard_older {
            let older: Vec<u64> = self.steps.range(..step).map(|(&k, _)| k).collect();
            if !older.is_empty() {
                let before = self.queue.len();
                self.queue.retain(|&(s, _)| s >= step);
                out.discarded += before - self.queue.len();
                for m in self.members.values_mut() {
                    let before = m.units.len();
                    m.units.retain(|&(s, _)| s >= step);
                    out.discarded += before - m.units.len();
                }
                for k in older {
                    self.steps.remove(&k);
                }
                self.generation += 1;
            }
        }
        if let Some(existing) = self.steps.get_mut(&step) {
            out.existed = true;
            if !reopen && existing.needs_prompts && !prompts.is_empty() {
                existing.prompts = prompts.clone();
                existing.needs_prompts = false;
            }
            if !reopen && existing.needs_tasks && !tasks.is_empty() {
                existing.tasks = tasks.clone();
                existing.needs_tasks = false;
            }
            if reopen {
                existing.min_weights_version = min_weights_version;
                if !prompts.is_empty() {
                    existing.prompts = prompts;
                    existing.needs_prompts = false;
                }
                if !tasks.is_empty() {
                    existing.tasks = tasks;
                    existing.needs_tasks = false;
                }
                let mut requeue = Vec::new();
                for (i, slot) in existing.slots.iter_mut().enumerate() {
                    if slot.state == UnitState::Done {
                        slot.state = UnitState::Pending;
                        requeue.push((step, i as u32));
                    }
                }
                existing.done = 0;
                existing.reopens += 1;
                out.queued = requeue.len() as u32;
                self.queue.extend(requeue);
                self.generation += 1;
            }
            return Ok(out);
        }
        self.steps.insert(
            step,
            Step {
                min_weights_version,
                prompts,
                tasks,
                needs_prompts: false,
                needs_tasks: false,
                slots: vec![Slot { state: UnitState::Pending, issues: 0 }; units as usize],
                done: 0,
                reopens: 0,
            },
        );
        self.queue.extend((0..units).map(|i| (step, i)));
        out.queued = units;
        self.generation += 1;
        Ok(out)
    }

    /// Hands the next pending unit (FIFO; re-issued units are at the front) to a member.
    /// `Ok(None)` when nothing is pending. Leasing renews the member's lease.
    /// [`lease`](Self::lease) for an actor that says which units it still works on: every
    /// other unit leased to it goes back to the front of the queue first (a lease whose reply
    /// never reached it). Returns the unit and how many were put back.
    pub fn lease_holding(
        &mut self,
        actor: &str,
        holding: &[String],
        now: Instant,
    ) -> Result<(Option<LeasedUnit>, usize), StateError> {
        let Some(member) = self.members.get_mut(actor) else {
            return Err(StateError::UnknownActor(actor.to_string()));
        };
        let keep: BTreeSet<UnitKey> = holding.iter().filter_map(|id| parse_unit_id(id)).collect();
        let lost: BTreeSet<UnitKey> = member.units.iter().filter(|k| !keep.contains(k)).copied().collect();
        for k in &lost {
            member.units.remove(k);
        }
        let released = self.release_units_of(lost);
        if released > 0 {
            self.generation += 1;
        }
        // An actor that plays several units at once takes no more than its share of the
        // outstanding work, so that the units of a step spread over every actor instead of
        // filling the first one's batch. Its first unit is never refused.
        let share = (self.units_pending() + self.units_leased()).div_ceil(self.members.len().max(1));
        if let Some(member) = self.members.get_mut(actor) {
            if !member.units.is_empty() && member.units.len() >= share {
                member.last_seen = now;
                return Ok((None, released));
            }
        }
        Ok((self.lease(actor, now)?, released))
    }

    pub fn lease(&mut self, actor: &str, now: Instant) -> Result<Option<LeasedUnit>, StateError> {
        let Some(member) = self.members.get_mut(actor) else {
            return Err(StateError::UnknownActor(actor.to_string()));
        };
        member.last_seen = now;
        while let Some(key) = self.queue.pop_front() {
            let Some(st) = self.steps.get_mut(&key.0) else {
                continue;
            };
            let Some(slot) = st.slots.get_mut(key.1 as usize) else {
                continue;
            };
            if slot.state != UnitState::Pending {
                continue;
            }
            slot.state = UnitState::Leased(actor.to_string());
            slot.issues += 1;
            let reissue = slot.issues > 1;
            self.counters.units_issued += 1;
            if reissue {
                self.counters.units_reissued += 1;
            }
            member.units.insert(key);
            let i = key.1 as usize;
            return Ok(Some(LeasedUnit {
                unit_id: unit_id(key.0, key.1),
                step: key.0,
                index: key.1,
                seed: unit_seed(self.run_seed, key.0, key.1),
                min_weights_version: st.min_weights_version,
                task: st.tasks.get(i).cloned().unwrap_or_default(),
                prompt: st.prompts.get(i).cloned().unwrap_or_default(),
                reissue,
                epoch: self.epoch,
                incarnation: st.reopens,
            }));
        }
        Ok(None)
    }

    /// An actor reports a unit: `done` when the learner accepted its group, else it gives the
    /// unit back. A `done` report counts whoever sends it (a late report from an actor whose
    /// lease expired still means the learner has the group); a give-back counts only from the
    /// holder. Unknown units are ignored.
    pub fn complete(&mut self, actor: &str, unit: &str, done: bool, now: Instant) -> CompleteOutcome {
        let epoch = self.epoch;
        self.complete_at(actor, unit, done, epoch, None, now)
    }

    /// [`complete`](Self::complete) for a lease of learner epoch `epoch` and, when known, step
    /// incarnation `incarnation`: a report of another epoch changes nothing, and a "done" for
    /// an earlier incarnation than the step's (the learner dropped that group and reopened the
    /// step since) is ignored.
    pub fn complete_at(
        &mut self,
        actor: &str,
        unit: &str,
        done: bool,
        epoch: u64,
        incarnation: Option<u32>,
        now: Instant,
    ) -> CompleteOutcome {
        if let (Some(inc), Some((step, _))) = (incarnation, parse_unit_id(unit)) {
            if self.steps.get(&step).is_some_and(|st| st.reopens != inc) {
                if let Some(m) = self.members.get_mut(actor) {
                    m.last_seen = now;
                }
                return CompleteOutcome::OldIncarnation;
            }
        }
        if let Some(m) = self.members.get_mut(actor) {
            m.last_seen = now;
        }
        if epoch != self.epoch {
            return CompleteOutcome::Superseded;
        }
        let Some(key) = parse_unit_id(unit) else {
            return CompleteOutcome::Unknown;
        };
        let Some(slot) = self.slot(key) else {
            return CompleteOutcome::Unknown;
        };
        let state = slot.state.clone();
        match (state, done) {
            (UnitState::Done, _) => CompleteOutcome::AlreadyDone,
            (UnitState::Leased(holder), false) if holder == actor => {
                if let Some(m) = self.members.get_mut(&holder) {
                    m.units.remove(&key);
                }
                if let Some(slot) = self.slot_mut(key) {
                    slot.state = UnitState::Pending;
                }
                self.queue.push_front(key);
                CompleteOutcome::GivenBack
            }
            (_, false) => CompleteOutcome::NotHolder,
            (UnitState::Leased(holder), true) => {
                if let Some(m) = self.members.get_mut(&holder) {
                    m.units.remove(&key);
                }
                self.mark_done(key, actor, now);
                CompleteOutcome::Done
            }
            (UnitState::Pending, true) => {
                self.queue.retain(|&k| k != key);
                self.mark_done(key, actor, now);
                CompleteOutcome::Done
            }
        }
    }

    fn mark_done(&mut self, key: UnitKey, actor: &str, now: Instant) {
        let Some(st) = self.steps.get_mut(&key.0) else {
            return;
        };
        st.slots[key.1 as usize].state = UnitState::Done;
        st.done += 1;
        let step_complete = st.complete();
        if step_complete {
            // Nothing will be issued from this step again (short of a reopen, which must
            // give them again): keep the snapshot small.
            st.needs_prompts = !st.prompts.is_empty();
            st.needs_tasks = !st.tasks.is_empty();
            st.prompts = Vec::new();
            st.tasks = Vec::new();
        }
        self.counters.units_done += 1;
        if let Some(m) = self.members.get_mut(actor) {
            m.units_done += 1;
        }
        self.completions.push_back(now);
        self.prune_completions(now);
        self.generation += 1;
        if step_complete {
            let complete: Vec<u64> = self.steps.iter().filter(|(_, s)| s.complete()).map(|(&k, _)| k).collect();
            if complete.len() > KEEP_COMPLETED_STEPS {
                for k in &complete[..complete.len() - KEEP_COMPLETED_STEPS] {
                    self.steps.remove(k);
                }
            }
        }
    }

    fn prune_completions(&mut self, now: Instant) {
        while let Some(&t) = self.completions.front() {
            if now.saturating_duration_since(t) > THROUGHPUT_WINDOW {
                self.completions.pop_front();
            } else {
                break;
            }
        }
    }

    /// Units completed per second over the last [`THROUGHPUT_WINDOW`] (or since the start,
    /// when that is shorter; at least one second).
    pub fn throughput(&mut self, now: Instant) -> f64 {
        self.prune_completions(now);
        let window = now.saturating_duration_since(self.started).clamp(Duration::from_secs(1), THROUGHPUT_WINDOW);
        self.completions.len() as f64 / window.as_secs_f64()
    }

    /// Every member, for `Status`.
    pub fn members(&self, now: Instant) -> Vec<MemberView> {
        self.members
            .iter()
            .map(|(id, m)| MemberView {
                actor_id: id.clone(),
                device: m.device.clone(),
                weights_version: m.weights_version,
                units: m.units.iter().map(|&(s, i)| unit_id(s, i)).collect(),
                units_done: m.units_done,
                last_heartbeat_age: now.saturating_duration_since(m.last_seen),
            })
            .collect()
    }

    /// Panics when an invariant of the module doc does not hold. For tests.
    pub fn check_invariants(&self) {
        let mut queued = BTreeSet::new();
        for &key in &self.queue {
            assert!(queued.insert(key), "{key:?} queued twice");
            let slot = self.slot(key).unwrap_or_else(|| panic!("{key:?} queued but unknown"));
            assert_eq!(slot.state, UnitState::Pending, "{key:?} queued but not pending");
        }
        let mut held = BTreeSet::new();
        for (id, m) in &self.members {
            for &key in &m.units {
                assert!(held.insert(key), "{key:?} held by two members");
                let slot = self.slot(key).unwrap_or_else(|| panic!("{key:?} held but unknown"));
                assert_eq!(slot.state, UnitState::Leased(id.clone()), "{key:?} held by {id}");
            }
        }
        for (&step, st) in &self.steps {
            let mut done = 0;
            for (i, slot) in st.slots.iter().enumerate() {
                let key = (step, i as u32);
                match &slot.state {
                    UnitState::Pending => {
                        assert!(queued.contains(&key), "{key:?} pending, not queued")
                    }
                    UnitState::Leased(_) => {
                        assert!(held.contains(&key), "{key:?} leased, not held")
                    }
                    UnitState::Done => done += 1,
                }
            }
            assert_eq!(done, st.done, "step {step} done count");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(1000);

    fn spec(step: u64, units: u32) -> StepSpec {
        StepSpec { step, units, ..StepSpec::default() }
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    fn lease_id(s: &mut State, actor: &str, now: Instant) -> Option<String> {
        let u = s.lease(actor, now).unwrap().map(|u| u.unit_id);
        s.check_invariants();
        u
    }

    #[test]
    fn a_new_epoch_forgets_steps_and_leases_and_fences_old_reports() {
        let t0 = Instant::now();
        let mut s = State::new(1, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        // A new run takes the learner's seed and run id.
        let e1 = s.begin_epoch(0, "run-x", 99).unwrap();
        assert_eq!((e1.epoch, e1.run_seed), (1, 99));
        s.open_step(StepSpec { epoch: 1, ..spec(4, 2) }).unwrap();
        let u = s.lease("a", t0).unwrap().unwrap();
        assert_eq!((u.epoch, u.seed), (1, unit_seed(99, 4, 0)));
        let u1 = s.lease("a", t0).unwrap().unwrap();
        assert_eq!(s.complete_at("a", &u1.unit_id, true, 1, None, t0), CompleteOutcome::Done);
        // The learner restarts from an older checkpoint; it knew of epoch 5 already.
        let e = s.begin_epoch(5, "run-x", 7).unwrap();
        assert_eq!((e.epoch, e.run_seed, e.steps_dropped, e.leases_cancelled), (6, 99, 1, 1));
        assert_eq!((s.units_pending(), s.units_leased()), (0, 0));
        s.check_invariants();
        // Reports and openings of the old epoch change nothing.
        assert_eq!(s.complete_at("a", &u.unit_id, true, 1, None, t0), CompleteOutcome::Superseded);
        assert!(matches!(
            s.open_step(StepSpec { epoch: 1, ..spec(4, 2) }),
            Err(StateError::SupersededEpoch { got: 1, current: 6 })
        ));
        // The step opened again in the new epoch: both units are played again, the one done
        // in the lost future included.
        s.open_step(StepSpec { epoch: 6, ..spec(4, 2) }).unwrap();
        assert_eq!(s.pending_ids(), ["s4-u0", "s4-u1"]);
        assert_eq!(s.lease("a", t0).unwrap().unwrap().epoch, 6);
        // Another run is refused; the snapshot keeps the epoch and the run.
        assert!(matches!(s.begin_epoch(0, "run-y", 0), Err(StateError::OtherRun { .. })));
        let r = State::restore(s.snapshot(), TTL, t0);
        assert_eq!((r.epoch(), r.run_id(), r.run_seed()), (6, "run-x", 99));
        s.check_invariants();
    }

    #[test]
    fn a_lease_the_actor_never_heard_of_goes_back() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 3)).unwrap();
        // The reply to this lease is lost: the actor asks again holding nothing.
        let lost = s.lease("a", t0).unwrap().unwrap();
        let (u, released) = s.lease_holding("a", &[], t0).unwrap();
        let u = u.unwrap();
        // It went back to the front and came out again, counted as a re-issue.
        assert_eq!((u.unit_id.as_str(), u.reissue, released), (lost.unit_id.as_str(), true, 1));
        // An actor that holds its unit keeps it.
        let (u2, released) = s.lease_holding("a", std::slice::from_ref(&lost.unit_id), t0).unwrap();
        assert_eq!((u2.unwrap().unit_id.as_str(), released), ("s1-u1", 0));
        assert_eq!(s.units_leased(), 2);
        s.check_invariants();
    }

    #[test]
    fn units_of_a_step_spread_over_the_actors_that_list_their_holdings() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(1, 8)).unwrap();
        // "a" asks for as many as it can play; it gets its share of the 8, 4.
        let mut held: Vec<String> = vec![];
        while let (Some(u), _) = s.lease_holding("a", &held, t0).unwrap() {
            held.push(u.unit_id);
        }
        assert_eq!(held.len(), 4);
        let mut held_b: Vec<String> = vec![];
        while let (Some(u), _) = s.lease_holding("b", &held_b, t0).unwrap() {
            held_b.push(u.unit_id);
        }
        assert_eq!((held_b.len(), s.units_pending()), (4, 0));
        s.check_invariants();
        // Alone, an actor takes every unit; a first unit is never refused.
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 3)).unwrap();
        let mut held: Vec<String> = vec![];
        while let (Some(u), _) = s.lease_holding("a", &held, t0).unwrap() {
            held.push(u.unit_id);
        }
        assert_eq!(held.len(), 3);
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(2, 1)).unwrap();
        assert!(s.lease_holding("b", &[], t0).unwrap().0.is_some());
        s.check_invariants();
    }

    #[test]
    fn a_late_completion_from_before_a_reopen_is_ignored() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 2)).unwrap();
        let u = s.lease("a", t0).unwrap().unwrap();
        assert_eq!(u.incarnation, 0);
        // The learner accepted the group, then dropped it as stale and reopened the step
        // before the actor's report arrived.
        assert_eq!(s.open_step(StepSpec { reopen: true, ..spec(1, 2) }).unwrap().queued, 0);
        assert_eq!(s.complete_at("a", &u.unit_id, true, 0, Some(0), t0), CompleteOutcome::OldIncarnation);
        assert_eq!(s.counters().units_done, 0);
        // The unit comes back (the actor no longer holds it) and is played in incarnation 1.
        let (again, released) = s.lease_holding("a", &[], t0).unwrap();
        let again = again.unwrap();
        assert_eq!((again.unit_id.as_str(), again.incarnation, released), (u.unit_id.as_str(), 1, 1));
        assert_eq!(s.complete_at("a", &again.unit_id, true, 0, Some(1), t0), CompleteOutcome::Done);
        s.check_invariants();
    }

    #[test]
    fn open_step_is_bounded() {
        let mut s = State::new(0, TTL, Instant::now());
        assert!(matches!(s.open_step(spec(1, u32::MAX)), Err(StateError::TooManyUnits { .. })));
        for step in 0..MAX_OPEN_STEPS as u64 {
            s.open_step(spec(step, 1)).unwrap();
        }
        assert!(matches!(s.open_step(spec(1 << 40, 1)), Err(StateError::TooManySteps { .. })));
        assert_eq!(s.units_pending(), MAX_OPEN_STEPS);
    }

    #[test]
    fn open_steps_together_are_bounded() {
        let mut s = State::new(0, TTL, Instant::now());
        let per = MAX_UNITS_PER_STEP as usize;
        for step in 0..(MAX_OPEN_UNITS / per) as u64 {
            s.open_step(spec(step, MAX_UNITS_PER_STEP)).unwrap();
        }
        let e = s.open_step(spec(1000, 1)).unwrap_err();
        assert_eq!(e, StateError::TooManyOpenUnits { step: 1000, units: MAX_OPEN_UNITS + 1 });
        // Repeating an open step is still a no-op, not a refusal.
        s.open_step(spec(0, MAX_UNITS_PER_STEP)).unwrap();
        s.check_invariants();

        let mut s = State::new(0, TTL, Instant::now());
        let prompt = "p".repeat(MAX_OPEN_TEXT_BYTES / 4);
        let with_prompts = |step| StepSpec { prompts: vec![prompt.clone(); 2], ..spec(step, 2) };
        s.open_step(with_prompts(1)).unwrap();
        s.open_step(with_prompts(2)).unwrap();
        assert!(matches!(s.open_step(with_prompts(3)), Err(StateError::TooMuchText { step: 3, .. })));
        // Reopening an open step with its prompts does not count them twice.
        s.open_step(StepSpec { reopen: true, ..with_prompts(2) }).unwrap();
        s.check_invariants();
    }

    #[test]
    fn an_epoch_cannot_overflow_and_ids_are_bounded() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        assert_eq!(s.begin_epoch(u64::MAX, "", 1).unwrap_err(), StateError::EpochOverflow(u64::MAX));
        assert_eq!(s.epoch(), 0, "a refused epoch changes nothing");
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert!(matches!(s.begin_epoch(0, &long, 1), Err(StateError::TooLong { field: "run_id", .. })));
        assert!(matches!(s.join(&long, "", "i", t0), Err(StateError::TooLong { field: "actor_id", .. })));
        assert!(matches!(s.join("a", &long, "i", t0), Err(StateError::TooLong { field: "device", .. })));
        assert_eq!(s.members_alive(), 0);
    }

    #[test]
    fn only_the_joining_instance_acts_for_a_member() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.open_step(spec(1, 2)).unwrap();
        assert!(!s.join("a", "cpu", "inst-1", t0).unwrap());
        let u = s.lease("a", t0).unwrap().unwrap();
        // Another process cannot take the live id, nor act in its name.
        assert_eq!(s.join("a", "cpu", "inst-2", ms(t0, 10)).unwrap_err(), StateError::ActorIdInUse("a".into()));
        assert_eq!(s.check_member("a", "inst-2").unwrap_err(), StateError::NotTheMember("a".into()));
        s.check_member("a", "inst-1").unwrap();
        s.check_member("nobody", "inst-2").unwrap();
        assert_eq!(s.units_leased(), 1, "the refused join released nothing");
        // The same instance joining again gives its units back.
        assert!(s.join("a", "cpu", "inst-1", ms(t0, 20)).unwrap());
        assert_eq!((s.units_leased(), s.units_pending()), (0, 2));
        let _ = u;
        // Once the lease ran out, another process may take the id.
        let late = ms(t0, 20) + TTL;
        assert!(s.join("a", "cpu", "inst-2", late).unwrap());
        s.check_member("a", "inst-2").unwrap();
        s.check_invariants();
    }

    #[test]
    fn fifo_lease_with_seeds_prompts_and_tasks() {
        let t0 = Instant::now();
        let mut s = State::new(42, TTL, t0);
        s.join("a", "cpu", "a", t0).unwrap();
        s.open_step(StepSpec {
            step: 5,
            units: 2,
            min_weights_version: 3,
            prompts: vec!["p0".into(), "p1".into()],
            tasks: vec!["t0".into(), "t1".into()],
            ..StepSpec::default()
        })
        .unwrap();
        let u0 = s.lease("a", t0).unwrap().unwrap();
        assert_eq!(
            u0,
            LeasedUnit {
                unit_id: "s5-u0".into(),
                step: 5,
                index: 0,
                seed: unit_seed(42, 5, 0),
                min_weights_version: 3,
                task: "t0".into(),
                prompt: "p0".into(),
                reissue: false,
                epoch: 0,
                incarnation: 0,
            }
        );
        // An actor may hold several units.
        let u1 = s.lease("a", t0).unwrap().unwrap();
        assert_eq!((u1.unit_id.as_str(), u1.prompt.as_str()), ("s5-u1", "p1"));
        assert_eq!(s.lease("a", t0).unwrap(), None);
        assert_eq!(s.units_leased(), 2);
        s.check_invariants();
    }

    #[test]
    fn per_unit_lists_must_match() {
        let mut s = State::new(0, TTL, Instant::now());
        let err =
            s.open_step(StepSpec { step: 1, units: 3, prompts: vec!["x".into()], ..StepSpec::default() }).unwrap_err();
        assert!(matches!(err, StateError::PerUnitCount { field: "prompts", .. }));
        assert_eq!(s.open_step(spec(1, 0)).unwrap_err(), StateError::NoUnits { step: 1 });
        assert_eq!(s.units_pending(), 0);
    }

    #[test]
    fn unknown_actor_cannot_lease() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.open_step(spec(1, 1)).unwrap();
        assert_eq!(s.lease("ghost", t0).unwrap_err(), StateError::UnknownActor("ghost".into()));
        assert!(!s.heartbeat("ghost", 1, t0));
        assert_eq!(s.join("", "cpu", "", t0).unwrap_err(), StateError::EmptyActorId);
    }

    #[test]
    fn expired_lease_requeues_at_the_front() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(1, 4)).unwrap();
        assert_eq!(lease_id(&mut s, "a", t0).unwrap(), "s1-u0");
        assert_eq!(lease_id(&mut s, "a", t0).unwrap(), "s1-u1");
        assert_eq!(lease_id(&mut s, "b", t0).unwrap(), "s1-u2");
        // b keeps heartbeating, a goes silent.
        assert!(s.heartbeat("b", 0, ms(t0, 900)));
        assert_eq!(s.expire(ms(t0, 999)), Expired::default());
        let e = s.expire(ms(t0, 1000));
        assert_eq!(e, Expired { actors: vec!["a".into()], requeued: 2 });
        s.check_invariants();
        assert_eq!(s.pending_ids(), ["s1-u0", "s1-u1", "s1-u3"]);
        let u = s.lease("b", ms(t0, 1001)).unwrap().unwrap();
        assert_eq!((u.unit_id.as_str(), u.reissue), ("s1-u0", true));
        // Same unit, same seed.
        assert_eq!(u.seed, unit_seed(0, 1, 0));
        assert_eq!(s.counters().units_reissued, 1);
        assert_eq!(s.counters().leases_expired, 1);
        assert_eq!(s.units_leased(), 2);
        // The expired actor is unknown now.
        assert!(!s.heartbeat("a", 0, ms(t0, 1002)));
        assert!(s.lease("a", ms(t0, 1002)).is_err());
        s.check_invariants();
    }

    #[test]
    fn activity_renews_the_lease() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 3)).unwrap();
        lease_id(&mut s, "a", ms(t0, 800));
        s.complete("a", "s1-u0", true, ms(t0, 1600));
        assert!(s.expire(ms(t0, 2500)).actors.is_empty());
        assert_eq!(s.expire(ms(t0, 2600)).actors, ["a"]);
    }

    #[test]
    fn no_double_issue_under_churn() {
        // Many actors, expiries, give-backs and late completions: the invariants hold after
        // every operation and each unit ends up done exactly once.
        let t0 = Instant::now();
        let mut s = State::new(9, TTL, t0);
        s.open_step(spec(1, 50)).unwrap();
        let mut t = 0u64;
        let mut rng = 12345u64;
        let mut next = || {
            rng = splitmix64(rng);
            rng
        };
        let mut done_seen = BTreeSet::new();
        let mut holding: Vec<(String, String)> = Vec::new();
        for round in 0..3000 {
            t += 37;
            let now = ms(t0, t);
            let actor = format!("a{}", next() % 6);
            match next() % 7 {
                0 => {
                    s.join(&actor, "", &actor, now).unwrap();
                }
                1 | 2 => {
                    if let Ok(Some(u)) = s.lease(&actor, now) {
                        holding.push((actor.clone(), u.unit_id));
                    }
                }
                3 | 4 if !holding.is_empty() => {
                    let (a, u) = holding.swap_remove((next() % holding.len() as u64) as usize);
                    if s.complete(&a, &u, true, now) == CompleteOutcome::Done {
                        assert!(done_seen.insert(u.clone()), "{u} done twice");
                    }
                }
                5 if !holding.is_empty() => {
                    let (a, u) = holding.swap_remove((next() % holding.len() as u64) as usize);
                    s.complete(&a, &u, false, now);
                }
                _ => {
                    s.heartbeat(&actor, round, now);
                    s.expire(now);
                }
            }
            s.check_invariants();
        }
        assert_eq!(done_seen.len() as u64, s.counters().units_done);
    }

    #[test]
    fn completed_units_are_never_reissued() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(1, 2)).unwrap();
        assert_eq!(lease_id(&mut s, "a", t0).unwrap(), "s1-u0");
        assert_eq!(s.complete("a", "s1-u0", true, t0), CompleteOutcome::Done);
        assert_eq!(s.complete("a", "s1-u0", true, t0), CompleteOutcome::AlreadyDone);
        assert_eq!(s.complete("a", "s1-u0", false, t0), CompleteOutcome::AlreadyDone);
        // a expires: it holds nothing, so nothing comes back.
        assert_eq!(s.expire(ms(t0, 1000)).requeued, 0);
        assert_eq!(s.pending_ids(), ["s1-u1"]);
        // A late "done" from an expired actor for a unit that went back to the queue.
        s.join("c", "", "c", ms(t0, 1000)).unwrap();
        assert_eq!(lease_id(&mut s, "c", ms(t0, 1000)).unwrap(), "s1-u1");
        s.leave("c");
        assert_eq!(s.pending_ids(), ["s1-u1"]);
        assert_eq!(s.complete("c", "s1-u1", true, ms(t0, 1001)), CompleteOutcome::Done);
        assert_eq!(s.pending_ids(), Vec::<String>::new());
        s.join("b", "", "b", ms(t0, 1002)).unwrap();
        assert_eq!(s.lease("b", ms(t0, 1002)).unwrap(), None);
        // Repeating OpenStep does not bring them back.
        assert!(s.open_step(spec(1, 2)).unwrap().existed);
        assert_eq!(s.lease("b", ms(t0, 1002)).unwrap(), None);
        s.check_invariants();
    }

    #[test]
    fn late_done_from_the_old_holder_frees_the_new_holder() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(1, 1)).unwrap();
        lease_id(&mut s, "a", t0);
        s.heartbeat("b", 0, ms(t0, 999));
        s.expire(ms(t0, 1000));
        assert_eq!(lease_id(&mut s, "b", ms(t0, 1000)).unwrap(), "s1-u0");
        // a was only slow: its group reached the learner.
        assert_eq!(s.complete("a", "s1-u0", true, ms(t0, 1001)), CompleteOutcome::Done);
        assert_eq!(s.units_leased(), 0);
        s.check_invariants();
        assert_eq!(s.complete("b", "s1-u0", true, ms(t0, 1002)), CompleteOutcome::AlreadyDone);
        assert_eq!(s.counters().units_done, 1);
    }

    #[test]
    fn give_back_goes_to_the_front_and_only_from_the_holder() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.join("b", "", "b", t0).unwrap();
        s.open_step(spec(1, 3)).unwrap();
        lease_id(&mut s, "a", t0);
        assert_eq!(s.complete("b", "s1-u0", false, t0), CompleteOutcome::NotHolder);
        assert_eq!(s.complete("a", "s1-u0", false, t0), CompleteOutcome::GivenBack);
        assert_eq!(s.pending_ids(), ["s1-u0", "s1-u1", "s1-u2"]);
        assert_eq!(s.complete("a", "s9-u0", true, t0), CompleteOutcome::Unknown);
        assert_eq!(s.complete("a", "s1-u7", true, t0), CompleteOutcome::Unknown);
        assert_eq!(s.complete("a", "garbage", true, t0), CompleteOutcome::Unknown);
        s.check_invariants();
    }

    #[test]
    fn open_step_is_idempotent() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        let first = s.open_step(spec(3, 4)).unwrap();
        assert_eq!((first.queued, first.existed), (4, false));
        lease_id(&mut s, "a", t0);
        let g = s.generation();
        let again = s.open_step(spec(3, 4)).unwrap();
        assert_eq!((again.queued, again.existed), (0, true));
        assert_eq!(s.generation(), g);
        assert_eq!(s.units_pending(), 3);
        assert_eq!(s.open_step(spec(3, 5)).unwrap_err(), StateError::UnitCountMismatch { step: 3, open: 4, asked: 5 });
        s.check_invariants();
    }

    #[test]
    fn newer_step_keeps_older_units_unless_told() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 2)).unwrap();
        lease_id(&mut s, "a", t0);
        // Asynchronous mode: both steps' units are served, the older first.
        s.open_step(spec(2, 2)).unwrap();
        assert_eq!(s.pending_ids(), ["s1-u1", "s2-u0", "s2-u1"]);
        // Synchronous mode: step 3 drops what is left of the older steps.
        let out = s.open_step(StepSpec { discard_older: true, ..spec(3, 1) }).unwrap();
        assert_eq!(out.discarded, 4); // s1-u0 leased, s1-u1, s2-u0, s2-u1 pending
        assert_eq!(s.pending_ids(), ["s3-u0"]);
        assert_eq!(s.units_leased(), 0);
        assert_eq!(s.complete("a", "s1-u0", true, t0), CompleteOutcome::Unknown);
        s.check_invariants();
    }

    #[test]
    fn reopen_requeues_completed_units_only() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 3)).unwrap();
        let u0 = lease_id(&mut s, "a", t0).unwrap();
        lease_id(&mut s, "a", t0);
        s.complete("a", &u0, true, t0);
        let out = s.open_step(StepSpec { reopen: true, ..spec(1, 3) }).unwrap();
        assert_eq!((out.queued, out.existed), (1, true));
        assert_eq!(s.pending_ids(), ["s1-u2", "s1-u0"]);
        assert_eq!(s.units_leased(), 1);
        s.check_invariants();
    }

    #[test]
    fn a_completed_step_releases_its_prompts_and_a_reopen_needs_them() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        let prompts = || vec!["p0".to_string(), "p1".to_string()];
        s.open_step(StepSpec { prompts: prompts(), ..spec(1, 2) }).unwrap();
        for _ in 0..2 {
            let u = s.lease("a", t0).unwrap().unwrap();
            s.complete("a", &u.unit_id, true, t0);
        }
        assert!(s.snapshot().steps[0].prompts.is_empty());
        // A repeat is still a no-op; a reopen without the prompts is refused.
        assert!(s.open_step(spec(1, 2)).unwrap().existed);
        let reopen = |prompts| StepSpec { reopen: true, prompts, ..spec(1, 2) };
        assert_eq!(s.open_step(reopen(Vec::new())).unwrap_err(), StateError::ReopenNeeds { step: 1, field: "prompts" });
        assert_eq!(s.open_step(reopen(prompts())).unwrap().queued, 2);
        let u = s.lease("a", t0).unwrap().unwrap();
        assert_eq!((u.unit_id.as_str(), u.prompt.as_str()), ("s1-u0", "p0"));
        s.check_invariants();
    }

    #[test]
    fn rejoin_gives_back_held_units() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 2)).unwrap();
        lease_id(&mut s, "a", t0);
        assert!(s.join("a", "gpu", "a", t0).unwrap());
        assert_eq!(s.pending_ids(), ["s1-u0", "s1-u1"]);
        assert_eq!(s.leave("a"), Some(0));
        assert_eq!(s.leave("a"), None);
        s.check_invariants();
    }

    #[test]
    fn snapshot_round_trip_requeues_leased_units_first() {
        let t0 = Instant::now();
        let mut s = State::new(77, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(StepSpec { prompts: (0..4).map(|i| format!("p{i}")).collect(), ..spec(1, 4) }).unwrap();
        s.open_step(spec(2, 2)).unwrap();
        let u0 = lease_id(&mut s, "a", t0).unwrap();
        lease_id(&mut s, "a", t0);
        s.complete("a", &u0, true, t0);
        let snap = s.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut r = State::restore(back, TTL, t0);
        r.check_invariants();
        assert_eq!(r.run_seed(), 77);
        assert_eq!(r.members_alive(), 0);
        assert_eq!(r.pending_ids(), ["s1-u1", "s1-u2", "s1-u3", "s2-u0", "s2-u1"]);
        assert_eq!(r.counters(), s.counters());
        r.join("b", "", "b", t0).unwrap();
        let u = r.lease("b", t0).unwrap().unwrap();
        assert_eq!((u.unit_id.as_str(), u.prompt.as_str(), u.seed), ("s1-u1", "p1", unit_seed(77, 1, 1)));
        // The done unit stays done.
        assert_eq!(r.complete("b", &u0, true, t0), CompleteOutcome::AlreadyDone);
    }

    #[test]
    fn completed_steps_are_pruned_beyond_the_limit() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        for step in 0..(KEEP_COMPLETED_STEPS as u64 + 10) {
            s.open_step(spec(step, 1)).unwrap();
            let u = s.lease("a", t0).unwrap().unwrap();
            s.complete("a", &u.unit_id, true, t0);
        }
        assert_eq!(s.steps().len(), KEEP_COMPLETED_STEPS);
        assert_eq!(s.latest_step(), KEEP_COMPLETED_STEPS as u64 + 9);
        s.check_invariants();
    }

    #[test]
    fn throughput_over_the_window() {
        let t0 = Instant::now();
        let mut s = State::new(0, TTL, t0);
        s.join("a", "", "a", t0).unwrap();
        s.open_step(spec(1, 10)).unwrap();
        for i in 0..10 {
            let now = ms(t0, 1000 * i);
            let u = s.lease("a", now).unwrap().unwrap();
            s.complete("a", &u.unit_id, true, now);
        }
        assert!((s.throughput(ms(t0, 10_000)) - 1.0).abs() < 1e-9);
        // Past the window, the old completions no longer count.
        assert!((s.throughput(ms(t0, 65_000)) - 5.0 / 60.0).abs() < 1e-9);
    }
}
