//! Language Self-Play (docs/method.md): one policy as Challenger and Solver, rewards from a reward
//! model and from the reference model's self-judgement, the paper's advantages, and one
//! KL-regularised gradient step on L_sol + alpha_ch * L_ch.
//!
//! Library first: [`play::Player::play`] is the actor's side (one unit into a
//! [`rollout::RolloutGroup`]), [`trainer::Trainer::train_step`] the learner's (N groups into
//! one step), and [`driver`] a small in-process loop over both for tests and examples.
pub mod config;
pub mod data;
pub mod data_parallel;
pub mod driver;
pub mod error;
pub mod judge;
pub mod optim;
pub mod play;
pub mod prompts;
pub mod ranks;
pub mod reward;
pub mod rewards;
pub mod rollout;
pub mod rules;
pub mod sizing;
pub mod trainer;
pub mod wire;

pub use config::Config;
pub use error::{GameError, Result};
pub use play::{Player, Unit};
pub use rewards::Mode;
pub use rollout::RolloutGroup;
pub use trainer::{Disagreement, Refusal, StepResult, StepStats, Trainer};
