//! A learner of W ranks behind one endpoint. Rank 0 is the learner that actors and the
//! coordinator see; it leads: before every operation that the ranks do together (a step on
//! some groups, a checkpoint, the end) it posts the command to the launch's TCPStore, and
//! ranks 1..W-1 ([`follow`]) read the commands in order and do the same, so every rank sees
//! the same groups in the same order. The step itself is data-parallel
//! ([`crate::data_parallel`]).
//!
//! Rendezvous follows torchrun and Slurm ([`Launch`]): rank 0 hosts the TCPStore at
//! MASTER_ADDR:MASTER_PORT and the others connect to it; the process group is Gloo on the CPU
//! and NCCL on CUDA. A rank that dies makes the others' next collective fail (Gloo and NCCL
//! time out; the store's reads too), so every rank exits with an error and the launcher's
//! restart resumes all of them from the last checkpoint.
use crate::error::{GameError, Result};
use crate::rollout::RolloutGroup;
use crate::trainer::{StepResult, Trainer};
pub use selfplay_torch_ext::dist::Launch;
use selfplay_torch_ext::dist::{ProcessGroup, Store};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the ranks do together, in the order rank 0 posts them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    Step { groups: Vec<RolloutGroup>, max_mismatch: Option<f64> },
    Checkpoint { dir: PathBuf, extra: serde_json::Value },
    Stop,
}

fn dist_err(e: selfplay_torch_ext::ExtError) -> GameError {
    GameError::Distributed(e.to_string())
}

fn key(seq: u64) -> String {
    format!("selfplay/command/{seq}")
}

/// Rank 0's side: posts commands.
struct Leader {
    store: Arc<Store>,
    seq: u64,
    stopped: bool,
}

impl Leader {
    fn post(&mut self, cmd: &Command) -> Result<()> {
        if self.stopped {
            return Err(GameError::Distributed("the other ranks were told to stop".into()));
        }
        self.stopped = matches!(cmd, Command::Stop);
        let bytes = serde_json::to_vec(cmd).map_err(|e| GameError::Distributed(format!("command: {e}")))?;
        self.store.set(&key(self.seq), &bytes).map_err(dist_err)?;
        // Every command before the previous one has been read by every rank: they all took
        // part in its collectives before this rank could post the next.
        if self.seq >= 2 {
            self.store.delete(&key(self.seq - 2)).map_err(dist_err)?;
        }
        self.seq += 1;
        Ok(())
    }
}

/// The trainer of a learner that may have ranks: alone, it is the [`Trainer`]; as rank 0 it
/// posts every collective operation for the other ranks first.
pub struct RankedTrainer {
    pub trainer: Trainer,
    leader: Option<Leader>,
    /// Kept alive for the ranks' lifetime (rank 0 hosts it).
    _store: Option<Arc<Store>>,
}

impl RankedTrainer {
    pub fn alone(trainer: Trainer) -> Self {
        RankedTrainer { trainer, leader: None, _store: None }
    }

    /// (rank, world size).
    pub fn rank(&self) -> (usize, usize) {
        self.trainer.rank()
    }

    pub fn train_step_checked(&mut self, groups: &[RolloutGroup], max_mismatch: Option<f64>) -> Result<StepResult> {
        if let Some(l) = &mut self.leader {
            l.post(&Command::Step { groups: groups.to_vec(), max_mismatch })?;
        }
        self.trainer.train_step_checked(groups, max_mismatch)
    }

    pub fn save_checkpoint(&mut self, dir: &Path, extra: serde_json::Value) -> Result<PathBuf> {
        if let Some(l) = &mut self.leader {
            l.post(&Command::Checkpoint { dir: dir.to_path_buf(), extra: extra.clone() })?;
        }
        self.trainer.save_checkpoint(dir, extra)
    }

    /// Tells the other ranks to exit (rank 0, at the end of a run).
    pub fn stop(&mut self) -> Result<()> {
        match &mut self.leader {
            Some(l) if !l.stopped => l.post(&Command::Stop),
            _ => Ok(()),
        }
    }
}

/// Reading through to the trainer (its step, policy, config); what the ranks do together goes
/// through [`RankedTrainer`]'s own methods.
impl std::ops::Deref for RankedTrainer {
    type Target = Trainer;
    fn deref(&self) -> &Trainer {
        &self.trainer
    }
}

impl Drop for RankedTrainer {
    fn drop(&mut self) {
        // A leader that goes away without a Stop (an error) still lets the others exit at
        // once instead of waiting for a command until the store times out.
        let _ = self.stop();
    }
}

/// How long ranks wait for each other (a collective, a command) before giving up.
pub const RANK_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Meets the launch's other ranks: rank 0 hosts the TCPStore at MASTER_ADDR:MASTER_PORT,
/// the others connect to it (retrying until `timeout`).
pub fn rendezvous(launch: &Launch, timeout: Duration) -> Result<Arc<Store>> {
    let store = if launch.rank == 0 {
        Store::serve(&launch.master_addr, launch.master_port, timeout)
    } else {
        Store::connect(&launch.master_addr, launch.master_port, timeout)
    }
    .map_err(dist_err)?;
    Ok(Arc::new(store))
}

/// Where every rank's trainer starts, decided by rank 0 and read by the others, so that all
/// load the same weights and optimizer state (from a filesystem they share).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Start {
    /// model.path, a fresh optimizer.
    Fresh,
    /// A checkpoint of this run.
    Resume(PathBuf),
    /// A new run from a checkpoint's weights (and its optimizer state when `keep_optimizer`).
    InitFrom { dir: PathBuf, keep_optimizer: bool },
}

const START_KEY: &str = "selfplay/start";

/// Rank 0: tells the others where to start.
pub fn announce_start(store: &Store, start: &Start) -> Result<()> {
    let bytes = serde_json::to_vec(start).map_err(|e| GameError::Distributed(e.to_string()))?;
    store.set(START_KEY, &bytes).map_err(dist_err)
}

/// Ranks 1..W-1: where rank 0 started (waits for it).
pub fn read_start(store: &Store) -> Result<Start> {
    let bytes = store.get(START_KEY).map_err(dist_err)?;
    serde_json::from_slice(&bytes).map_err(|e| GameError::Distributed(format!("start: {e}")))
}

/// Makes `trainer` this rank of the data-parallel learner: the process group over `store`
/// (Gloo on the CPU, NCCL on CUDA) and its shard of the optimizer state.
pub fn join_group(launch: &Launch, trainer: Trainer, store: &Store, timeout: Duration) -> Result<Trainer> {
    let device = trainer.policy.model.device();
    let pg = match device {
        tch::Device::Cuda(_) => ProcessGroup::nccl(store, launch.rank, launch.world_size, timeout),
        _ => {
            let host = if launch.master_addr == "127.0.0.1" || launch.master_addr == "localhost" {
                "127.0.0.1".to_string()
            } else {
                String::new() // this machine's own address (or GLOO_SOCKET_IFNAME)
            };
            ProcessGroup::gloo(store, launch.rank, launch.world_size, &host, timeout)
        }
    }
    .map_err(dist_err)?;
    trainer.into_data_parallel(pg)
}

/// [`rendezvous`] then [`join_group`].
pub fn join(launch: &Launch, trainer: Trainer, timeout: Duration) -> Result<(Trainer, Arc<Store>)> {
    let store = rendezvous(launch, timeout)?;
    let trainer = join_group(launch, trainer, &store, timeout)?;
    Ok((trainer, store))
}

/// Rank 0 after [`join`]: the trainer that posts commands.
pub fn lead(trainer: Trainer, store: Arc<Store>) -> RankedTrainer {
    RankedTrainer {
        trainer,
        leader: Some(Leader { store: store.clone(), seq: 0, stopped: false }),
        _store: Some(store),
    }
}

/// Ranks 1..W-1 after [`join`]: does what rank 0 posts until it posts [`Command::Stop`].
/// A step that rank 0 refuses (an invalid group) is refused here the same way and the loop
/// goes on; a failed collective ends it with the error. Calls `on_step` after each step.
pub fn follow(mut trainer: Trainer, store: Arc<Store>, mut on_step: impl FnMut(&Trainer)) -> Result<()> {
    for seq in 0.. {
        let bytes = store.get(&key(seq)).map_err(dist_err)?;
        let cmd: Command =
            serde_json::from_slice(&bytes).map_err(|e| GameError::Distributed(format!("command {seq}: {e}")))?;
        match cmd {
            Command::Step { groups, max_mismatch } => match trainer.train_step_checked(&groups, max_mismatch) {
                Ok(_) => on_step(&trainer),
                Err(GameError::InvalidGroup { .. }) => {}
                Err(e) => return Err(e),
            },
            Command::Checkpoint { dir, extra } => {
                trainer.save_checkpoint(&dir, extra)?;
            }
            Command::Stop => return Ok(()),
        }
    }
    unreachable!("the command loop ends on Stop or an error")
}
