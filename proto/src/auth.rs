//! Bearer-token authentication shared by every selfplay role.
//!
//! Every RPC carries `authorization: Bearer <token>`. The token comes from a file
//! (`--token-file`) or from the environment variable [`TOKEN_ENV`]. Servers wrap their services
//! in [`ServerAuth`], which refuses a missing or wrong token with `Unauthenticated`, logs the
//! refusal and counts it as `selfplay_rpc_rejected_total{role, reason="unauthenticated"}`;
//! clients wrap their channels in [`ClientAuth`].
//!
//! ```no_run
//! use selfplay_proto::auth::{BearerToken, ClientAuth};
//! # fn demo(channel: tonic::transport::Channel) -> Result<(), selfplay_proto::auth::AuthError> {
//! let token = BearerToken::load(None)?; // SELFPLAY_TOKEN
//! let client = selfplay_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
//!     channel,
//!     ClientAuth::new(&token),
//! );
//! # let _ = client; Ok(()) }
//! ```

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Environment variable holding the token when no token file is given.
pub const TOKEN_ENV: &str = "SELFPLAY_TOKEN";

/// Metric counting refused RPCs, labelled `role` and `reason`.
pub const REJECTED_METRIC: &str = "selfplay_rpc_rejected_total";

const AUTHORIZATION: &str = "authorization";
const SCHEME: &str = "bearer ";

/// Why a token could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: set {TOKEN_ENV} or pass --token-file")]
    Missing,
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token file {path} is accessible to other users (mode {mode:o}): chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the token from {origin} is empty")]
    Empty { origin: String },
    #[error(
        "the token from {origin} holds characters other than visible ASCII (no spaces), so it \
         cannot travel in an HTTP header"
    )]
    Invalid { origin: String },
}

/// A shared secret. `Debug` never prints it.
#[derive(Clone)]
pub struct BearerToken {
    secret: Arc<str>,
    digest: [u8; 32],
    header: MetadataValue<Ascii>,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl BearerToken {
    /// A token from a string; surrounding whitespace is trimmed.
    pub fn new(token: impl AsRef<str>) -> Result<Self, AuthError> {
        Self::parse(token.as_ref(), "the caller")
    }

    fn parse(raw: &str, origin: &str) -> Result<Self, AuthError> {
        let secret = raw.trim();
        if secret.is_empty() {
            return Err(AuthError::Empty { origin: origin.to_string() });
        }
        if !secret.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::Invalid { origin: origin.to_string() });
        }
        let header = MetadataValue::try_from(format!("Bearer {secret}"))
            .map_err(|_| AuthError::Invalid { origin: origin.to_string() })?;
        Ok(Self { digest: Sha256::digest(secret.as_bytes()).into(), secret: secret.into(), header })
    }

    /// The token in [`TOKEN_ENV`], `None` when the variable is unset.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        match std::env::var(TOKEN_ENV) {
            Ok(value) => Self::parse(&value, TOKEN_ENV).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(AuthError::Invalid { origin: TOKEN_ENV.to_string() }),
        }
    }

    /// The token stored in a file (a trailing newline is fine). The file must not be
    /// readable or writable by other users (mode 0600 or 0400, as Kubernetes Secrets with
    /// `defaultMode: 0400` and `install -m 600` give).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AuthError> {
        let path = path.as_ref();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta =
                std::fs::metadata(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o007 != 0 {
                return Err(AuthError::Permissions { path: path.to_path_buf(), mode });
            }
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The token from `token_file` when given, else from [`TOKEN_ENV`]; an error when neither.
    pub fn load(token_file: Option<&Path>) -> Result<Self, AuthError> {
        match token_file {
            Some(path) => Self::from_file(path),
            None => Self::from_env()?.ok_or(AuthError::Missing),
        }
    }

    /// A fresh random token (256 bits, hex), for the embedded single-process default where no
    /// token was configured. The randomness comes from the OS-seeded keys of the standard
    /// library's SipHash.
    pub fn generate() -> Self {
        let state = std::collections::hash_map::RandomState::new();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut hex = String::with_capacity(64);
        for i in 0..4u64 {
            let mut h = state.build_hasher();
            h.write_u64(i);
            h.write_u128(nanos);
            h.write_u32(std::process::id());
            hex.push_str(&format!("{:016x}", h.finish()));
        }
        Self::parse(&hex, "the generator").expect("hex is a valid token")
    }

    /// The secret itself, to hand to a child process (environment or file). Never log it.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The `authorization` header value, `Bearer <token>`.
    pub fn header_value(&self) -> MetadataValue<Ascii> {
        self.header.clone()
    }

    /// Whether `presented` is this token. Compares SHA-256 digests in constant time, so neither
    /// the content nor the length of the secret leaks through timing.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut diff = 0u8;
        for (a, b) in digest.iter().zip(self.digest.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// Registers the description of [`REJECTED_METRIC`] with the installed `metrics` recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        REJECTED_METRIC,
        metrics::Unit::Count,
        "RPCs refused before reaching the service, by role and reason (unauthenticated: missing or wrong bearer token)"
    );
}

/// Server-side interceptor: refuses a request whose bearer token is missing or wrong.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    token: BearerToken,
    role: &'static str,
}

impl ServerAuth {
    /// `role` names the server in logs and in the `role` label of the rejection counter
    /// (`coordinator`, `learner`, `reward`, ...).
    pub fn new(token: BearerToken, role: &'static str) -> Self {
        // Start the counter at 0 so that it exists (and rate() works) before the first refusal.
        metrics::counter!("selfplay_rpc_rejected_total", "role" => role, "reason" => "unauthenticated").increment(0);
        Self { token, role }
    }

    /// Checks one request's metadata; `Err` holds why it is refused (for logs).
    fn check(&self, request: &Request<()>) -> Result<(), &'static str> {
        let Some(value) = request.metadata().get(AUTHORIZATION) else {
            return Err("missing authorization header");
        };
        let bytes = value.as_bytes();
        if bytes.len() < SCHEME.len() || !bytes[..SCHEME.len()].eq_ignore_ascii_case(SCHEME.as_bytes()) {
            return Err("authorization is not a bearer token");
        }
        if self.token.matches(&bytes[SCHEME.len()..]) {
            Ok(())
        } else {
            Err("wrong bearer token")
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self.check(&request) {
            Ok(()) => Ok(request),
            Err(why) => {
                let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_else(|| "unknown".to_string());
                tracing::warn!(role = self.role, %peer, reason = why, "rejected an unauthenticated RPC");
                metrics::counter!(REJECTED_METRIC, "role" => self.role, "reason" => "unauthenticated").increment(1);
                Err(Status::unauthenticated("a valid bearer token is required (authorization: Bearer <token>)"))
            }
        }
    }
}

/// Client-side interceptor: adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct ClientAuth {
    header: MetadataValue<Ascii>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAuth(<redacted>)")
    }
}

impl ClientAuth {
    pub fn new(token: &BearerToken) -> Self {
        Self { header: token.header_value() }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with(header: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(h) = header {
            r.metadata_mut().insert(AUTHORIZATION, MetadataValue::try_from(h).unwrap());
        }
        r
    }

    #[test]
    fn server_accepts_the_right_token_only() {
        let token = BearerToken::new("s3cret-token").unwrap();
        let mut auth = ServerAuth::new(token.clone(), "test");
        assert!(auth.call(request_with(Some("Bearer s3cret-token"))).is_ok());
        assert!(auth.call(request_with(Some("bearer s3cret-token"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cret-tokem"),
            Some("Bearer s3cret-token2"),
            Some("Bearer "),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
        ] {
            let err = auth.call(request_with(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    /// A recorder that writes down every counter increment as `name{label=value,...} +n`.
    #[derive(Clone, Default)]
    struct Capture(Arc<std::sync::Mutex<Vec<String>>>);

    struct CaptureCounter(String, Capture);

    impl metrics::CounterFn for CaptureCounter {
        fn increment(&self, n: u64) {
            self.1 .0.lock().unwrap().push(format!("{} +{n}", self.0));
        }
        fn absolute(&self, _: u64) {}
    }

    impl metrics::Recorder for Capture {
        fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
            let labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
            let name = format!("{}{{{}}}", key.name(), labels.join(","));
            metrics::Counter::from_arc(Arc::new(CaptureCounter(name, self.clone())))
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn refusals_are_counted_by_role() {
        let capture = Capture::default();
        let mut auth = ServerAuth::new(BearerToken::new("t0k").unwrap(), "learner");
        metrics::with_local_recorder(&capture, || {
            assert!(auth.call(request_with(Some("Bearer t0k"))).is_ok());
            assert!(auth.call(request_with(None)).is_err());
            assert!(auth.call(request_with(Some("Bearer nope"))).is_err());
        });
        let seen = capture.0.lock().unwrap().clone();
        let line = "selfplay_rpc_rejected_total{role=learner,reason=unauthenticated} +1";
        assert_eq!(seen, [line, line]);
    }

    #[test]
    fn client_adds_the_header_the_server_accepts() {
        let token = BearerToken::generate();
        assert_eq!(format!("{:?}", ClientAuth::new(&token)), "ClientAuth(<redacted>)");
        let req = ClientAuth::new(&token).call(Request::new(())).unwrap();
        let mut auth = ServerAuth::new(token, "test");
        assert!(auth.call(req).is_ok());
    }

    #[test]
    fn generated_tokens_differ_and_are_long() {
        let a = BearerToken::generate();
        let b = BearerToken::generate();
        assert_eq!(a.secret().len(), 64);
        assert_ne!(a.secret(), b.secret());
    }

    #[test]
    fn token_file_is_trimmed_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(BearerToken::from_file(&path), Err(AuthError::Permissions { mode: 0o644, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(BearerToken::from_file(&path).unwrap().secret(), "abc123");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(BearerToken::from_file(&path), Err(AuthError::Empty { .. })));
        std::fs::write(&path, "has space").unwrap();
        assert!(matches!(BearerToken::from_file(&path), Err(AuthError::Invalid { .. })));
        assert!(matches!(BearerToken::from_file(dir.path().join("absent")), Err(AuthError::Read { .. })));
        assert!(format!("{:?}", BearerToken::new("abc").unwrap()).contains("redacted"));
    }
}
