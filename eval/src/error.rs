use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Bad arguments or input files: the message says what to change.
    #[error("{0}")]
    Input(String),
    /// The cause is part of the message (and not a `source`), so that it is printed once.
    #[error("cannot load {role} from {path}: {cause}")]
    Load { role: &'static str, path: PathBuf, cause: Box<dyn std::error::Error + Send + Sync> },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plot: {0}")]
    Plot(String),
    #[error(transparent)]
    Policy(#[from] selfplay_policy::PolicyError),
    #[error(transparent)]
    Game(#[from] selfplay_game::GameError),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EvalError {
    let path = path.into();
    move |source| EvalError::Io { path, source }
}
