//! The selfplay coordinator: membership with heartbeat leases, a scheduler that cuts each
//! learner step into work units and re-issues the units of actors whose lease expired, and
//! the weight store the learner publishes to once and every actor fetches from.
//!
//! - [`state`]: the pure state machine (members, steps, the unit queue), unit-tested on its
//!   own;
//! - [`weights`]: the on-disk, checksummed weight store;
//! - [`service`]: the tonic service over both, and [`serve`];
//! - everything that matters survives a restart: `<state_dir>/coordinator.json` (open steps,
//!   completed units, the queue, the run seed) and `<state_dir>/weights/`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), selfplay_coordinator::CoordinatorError> {
//! use selfplay_coordinator::{serve, CoordinatorConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await.unwrap();
//! let config = CoordinatorConfig { state_dir: "run/coordinator".into(), ..Default::default() };
//! serve(config, listener, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod config;
pub mod metrics;
pub mod persist;
pub mod service;
pub mod state;
pub mod weights;

use std::path::PathBuf;

pub use config::{CoordinatorConfig, CoordinatorCredentials, TlsConfig};
pub use metrics::describe_metrics;
pub use service::{serve, CoordinatorService, SERVICE_NAME};
pub use state::{unit_id, unit_seed, State, StateError, StepSpec};
pub use weights::{PublishOutcome, WeightStore, WeightStoreError};

/// Why the coordinator could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("invalid coordinator config: {0}")]
    Config(String),
    #[error(transparent)]
    Auth(#[from] selfplay_proto::auth::AuthError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file {path} cannot be used: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error(transparent)]
    Weights(#[from] WeightStoreError),
    #[error("TLS setup failed: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed: {0}")]
    Transport(#[source] tonic::transport::Error),
}
