//! The selfplay.v1 wire: messages and tonic clients/servers for the Coordinator, Learner and
//! Reward services, plus what every role shares on top of them: per-role bearer-token
//! authentication ([`auth`], [`guard`]), lease tickets ([`ticket`]), clients with the limits
//! set ([`client`]) and building and verifying weight payloads ([`weights`]).
pub mod auth;
pub mod client;
pub mod error;
pub mod guard;
pub mod health;
pub mod server;
pub mod ticket;
pub mod unit;
pub mod weights;

pub mod v1 {
    tonic::include_proto!("selfplay.v1");

    /// Encoded file descriptors, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("selfplay_descriptor");
}

/// Upper bound on one gRPC message, both directions. Weights and rollouts are streamed in
/// chunks well below it; anything larger is refused by tonic before it is decoded.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Size of one weight chunk on the wire.
pub const WEIGHT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
