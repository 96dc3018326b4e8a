//! Errors across the gRPC boundary, typed: a client keeps the status code and decides on it
//! (retry, rejoin, stop), never on message text.

use tonic::Code;

/// A failed call: which RPC, the status code and the server's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}: {code:?}: {message}")]
pub struct RpcError {
    pub what: &'static str,
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(what: &'static str, status: &tonic::Status) -> Self {
        Self { what, code: status.code(), message: status.message().to_string() }
    }

    /// An error that says nothing about the request itself: the peer is restarting,
    /// unreachable, overloaded or took too long. The same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        is_retryable(self.code)
    }

    /// The server no longer knows the caller, or the caller's view is out of date (an actor
    /// whose lease expired, a request of an older learner epoch).
    pub fn is_precondition(&self) -> bool {
        self.code == Code::FailedPrecondition
    }
}

/// Codes that a retry may cure.
pub fn is_retryable(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Aborted)
}

/// The message a server puts in a FAILED_PRECONDITION for a request of a superseded learner
/// epoch starts with this.
pub const SUPERSEDED_EPOCH: &str = "superseded learner epoch";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_decide() {
        let e = RpcError::new("Join", &tonic::Status::unavailable("restarting"));
        assert!(e.is_retryable() && !e.is_precondition());
        let e = RpcError::new("LeaseWork", &tonic::Status::failed_precondition("join first"));
        assert!(!e.is_retryable() && e.is_precondition());
        assert!(!RpcError::new("x", &tonic::Status::invalid_argument("bad")).is_retryable());
        assert_eq!(e.to_string(), "LeaseWork: FailedPrecondition: join first");
    }
}
