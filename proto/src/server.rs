//! One gRPC server builder for every role, so the coordinator, the learner and the reward
//! server share their transport settings: TLS, HTTP/2 windows and frame size, keepalive (a
//! frozen or vanished peer is noticed), TCP_NODELAY and concurrency limits.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Identity, Server, ServerTlsConfig};

/// HTTP/2 PING every this long on idle connections; a peer that does not answer within
/// [`KEEPALIVE_TIMEOUT`] is dropped.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Concurrent streams one client connection may open.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// A PEM certificate chain and key for serving TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS {field}: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// The server builder every role starts from.
pub fn builder(tls: Option<&TlsFiles>) -> Result<Server, ServerError> {
    let mut b = Server::builder()
        // Room for a whole weight chunk in flight per stream on uploads.
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        // 1 MiB HTTP/2 frames rather than 16 KiB ones for weights and rollouts.
        .max_frame_size(Some(crate::client::HTTP2_MAX_FRAME_BYTES))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .tcp_nodelay(true);
    if let Some(t) = tls {
        let read = |field: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServerError::Read { field, path: path.clone(), source })
        };
        let identity = Identity::from_pem(read("cert", &t.cert)?, read("key", &t.key)?);
        b = b.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    Ok(b)
}
