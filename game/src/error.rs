use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum GameError {
    #[error("config: {0}")]
    Config(String),
    #[error("invalid rollout group {unit_id:?}: {reason}")]
    InvalidGroup { unit_id: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("reward: {0}")]
    Reward(String),
    #[error(transparent)]
    Policy(#[from] selfplay_policy::PolicyError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// A collective between learner ranks failed (a rank died, timed out or disagreed).
    #[error("learner ranks: {0}")]
    Distributed(String),
}

pub type Result<T, E = GameError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> GameError {
    let path = path.into();
    move |source| GameError::Io { path, source }
}
