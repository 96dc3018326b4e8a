//! Bearer-token authentication with one credential per role.
//!
//! Every RPC carries `authorization: Bearer <token>`. Each role holds its own credential: the
//! learner, the actors, the reward clients (actors that score on a reward server) and the
//! operators (`selfplay status`, dashboards). A server maps the token it is shown to the role
//! it belongs to ([`Verifier`]), and [`crate::guard`] lets each role call only its own RPCs.
//!
//! A credential is a token file (`--token-file`, or the token itself in [`TOKEN_ENV`]) with
//! one token a line: a client presents the first, a server accepts every one. Files are read
//! again when they change, so a credential rotates without a restart: put the new token on a
//! second line (both valid), then first (clients switch), then drop the old one
//! (docs/operations.md).
//!
//! ```no_run
//! use selfplay_proto::auth::{ClientAuth, Credential};
//! # fn demo(channel: tonic::transport::Channel) -> Result<(), selfplay_proto::auth::AuthError> {
//! let credential = Credential::load(None)?; // SELFPLAY_TOKEN
//! let client = selfplay_proto::v1::coordinator_client::CoordinatorClient::with_interceptor(
//!     channel,
//!     ClientAuth::new(&credential),
//! );
//! # let _ = client; Ok(()) }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Environment variable holding the token when no token file is given.
pub const TOKEN_ENV: &str = "SELFPLAY_TOKEN";

/// Metric counting refused RPCs, labelled `role` (the server's) and `reason`.
pub const REJECTED_METRIC: &str = "selfplay_rpc_rejected_total";

/// Metadata header with a random id each client makes when it starts: the coordinator binds
/// an actor id to the instance that joined with it, so no other process can heartbeat, lease
/// or leave in its name.
pub const INSTANCE_HEADER: &str = "selfplay-instance";

/// The longest instance id a server takes.
pub const MAX_INSTANCE_BYTES: usize = 64;

/// How often a credential file is checked for changes (at most; only when it is used).
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

pub(crate) const AUTHORIZATION: &str = "authorization";
pub(crate) const SCHEME: &str = "bearer ";

/// The roles a credential can belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Opens steps, publishes weights, begins epochs.
    Learner,
    /// Joins, leases and reports units, fetches weights, submits rollouts.
    Actor,
    /// Scores on a reward server.
    RewardClient,
    /// Reads status; changes nothing.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Learner, Role::Actor, Role::RewardClient, Role::Operator];

    /// The label value on metrics and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Learner => "learner",
            Role::Actor => "actor",
            Role::RewardClient => "reward-client",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a credential could not be obtained.
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
    #[error("the token file {path} is accessible to other users or writable by its group (mode {mode:o}; allowed: 600, 640, 400, 440): chmod 600 it")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("the token from {origin} is empty")]
    Empty { origin: String },
    #[error(
        "the token from {origin} holds characters other than visible ASCII (no spaces), so it \
         cannot travel in an HTTP header"
    )]
    Invalid { origin: String },
    #[error("the {a} and {b} credentials share a token: every role needs its own")]
    Shared { a: Role, b: Role },
}

/// One secret. `Debug` never prints it.
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

/// `words` random 64-bit words as hex (16 digits each), from the operating system's
/// cryptographically secure generator (`getrandom`: the getrandom(2) system call on Linux).
/// Panics if the OS has no such generator to offer, rather than make a guessable token.
pub(crate) fn random_hex(words: usize) -> String {
    let mut bytes = vec![0u8; 8 * words];
    getrandom::fill(&mut bytes).expect("the operating system's random number generator");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

    /// A fresh random token (256 bits, hex), for `train`, which makes its own credentials.
    pub fn generate() -> Self {
        Self::parse(&random_hex(4), "the generator").expect("hex is a valid token")
    }

    /// The secret itself, to hand to a child process (environment or file) or to key lease
    /// tickets. Never log it.
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
        self.matches_digest(&digest)
    }

    fn matches_digest(&self, digest: &[u8; 32]) -> bool {
        let mut diff = 0u8;
        for (a, b) in digest.iter().zip(self.digest.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// Reads a token file: one token a line; blank lines and lines starting with `#` are
/// skipped; at least one token. The file must give other users no access and its group no
/// write access ([`TOKEN_FILE_FORBIDDEN_BITS`]): modes 600, 640, 400 and 440 pass (Kubernetes
/// Secrets with `defaultMode: 0440`, `install -m 600`); 644, 604 and 660 are refused.
/// The permission bits a token file must not have: any for other users, write for its group.
pub const TOKEN_FILE_FORBIDDEN_BITS: u32 = 0o027;

fn read_token_file(path: &Path) -> Result<Vec<BearerToken>, AuthError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & TOKEN_FILE_FORBIDDEN_BITS != 0 {
            return Err(AuthError::Permissions { path: path.to_path_buf(), mode });
        }
    }
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })?;
    let origin = path.display().to_string();
    let tokens = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| BearerToken::parse(l, &origin))
        .collect::<Result<Vec<_>, _>>()?;
    if tokens.is_empty() {
        return Err(AuthError::Empty { origin });
    }
    Ok(tokens)
}

/// What identifies a version of a file: a change of any field means it was rewritten (a
/// Kubernetes Secret update swaps a symlink, so the inode changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp { modified: meta.modified().ok(), len: meta.len(), inode })
}

struct Watched {
    stamp: Option<Stamp>,
    checked: Instant,
    tokens: Arc<[BearerToken]>,
}

enum Source {
    Fixed(Arc<[BearerToken]>),
    File { path: PathBuf, watched: Mutex<Watched> },
}

/// One role's credential: one or more tokens, from memory or from a file that is read again
/// when it changes. A client presents the first token ([`current`](Self::current)); a server
/// accepts any ([`tokens`](Self::tokens)), which is what lets two tokens be valid during a
/// rotation. `Debug` never prints a token.
#[derive(Clone)]
pub struct Credential(Arc<Source>);

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Source::Fixed(t) => write!(f, "Credential({} tokens in memory)", t.len()),
            Source::File { path, .. } => write!(f, "Credential(file {})", path.display()),
        }
    }
}

impl From<BearerToken> for Credential {
    fn from(token: BearerToken) -> Self {
        Self(Arc::new(Source::Fixed(Arc::from(vec![token]))))
    }
}

impl Credential {
    /// Tokens held in memory (the first is presented); `None` when `tokens` is empty.
    pub fn fixed(tokens: Vec<BearerToken>) -> Option<Self> {
        (!tokens.is_empty()).then(|| Self(Arc::new(Source::Fixed(Arc::from(tokens)))))
    }

    /// A fresh random single-token credential (`train`, tests).
    pub fn generate() -> Self {
        BearerToken::generate().into()
    }

    /// The tokens of `path` (see the module docs for the format); the file is read again
    /// when it changes. A change that does not parse is logged and the previous tokens stay.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, AuthError> {
        let path = path.as_ref().to_path_buf();
        let stamp = stamp(&path);
        let tokens = read_token_file(&path)?;
        let watched = Mutex::new(Watched { stamp, checked: Instant::now(), tokens: Arc::from(tokens) });
        Ok(Self(Arc::new(Source::File { path, watched })))
    }

    /// The token in [`TOKEN_ENV`], `None` when the variable is unset.
    pub fn from_env() -> Result<Option<Self>, AuthError> {
        match std::env::var(TOKEN_ENV) {
            Ok(value) => BearerToken::parse(&value, TOKEN_ENV).map(|t| Some(t.into())),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(AuthError::Invalid { origin: TOKEN_ENV.to_string() }),
        }
    }

    /// The credential in `token_file` when given, else in [`TOKEN_ENV`]; an error when neither.
    pub fn load(token_file: Option<&Path>) -> Result<Self, AuthError> {
        match token_file {
            Some(path) => Self::from_file(path),
            None => Self::from_env()?.ok_or(AuthError::Missing),
        }
    }

    /// Every valid token now, the presented one first. Never empty.
    pub fn tokens(&self) -> Arc<[BearerToken]> {
        match &*self.0 {
            Source::Fixed(t) => t.clone(),
            Source::File { path, watched } => {
                let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
                if w.checked.elapsed() >= RELOAD_EVERY {
                    w.checked = Instant::now();
                    let now = stamp(path);
                    if now != w.stamp {
                        w.stamp = now;
                        match read_token_file(path) {
                            Ok(t) => {
                                tracing::info!(path = %path.display(), tokens = t.len(), "credential file changed: reloaded");
                                w.tokens = Arc::from(t);
                            }
                            Err(e) => tracing::warn!(
                                path = %path.display(), error = %e,
                                "credential file changed but cannot be used; keeping the previous tokens"
                            ),
                        }
                    }
                }
                w.tokens.clone()
            }
        }
    }

    /// The token a client presents: the first.
    pub fn current(&self) -> BearerToken {
        self.tokens()[0].clone()
    }
}

/// Server side: which role a presented token belongs to. Built from the credentials of the
/// roles the server serves; a role without a credential gets nothing.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    roles: Vec<(Role, Credential)>,
}

impl Verifier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `credential` as `role` (a second credential for the same role replaces it).
    pub fn with(mut self, role: Role, credential: Credential) -> Self {
        self.roles.retain(|(r, _)| *r != role);
        self.roles.push((role, credential));
        self
    }

    /// The roles this server accepts.
    pub fn roles(&self) -> impl Iterator<Item = Role> + '_ {
        self.roles.iter().map(|(r, _)| *r)
    }

    /// Refuses a configuration in which two roles share a token: the server could not tell
    /// them apart, and the lesser role would get the greater one's rights.
    pub fn check_distinct(&self) -> Result<(), AuthError> {
        let all: Vec<(Role, [u8; 32])> = self
            .roles
            .iter()
            .flat_map(|(r, c)| c.tokens().iter().map(|t| (*r, t.digest)).collect::<Vec<_>>())
            .collect();
        for (i, (a, da)) in all.iter().enumerate() {
            for (b, db) in &all[i + 1..] {
                if a != b && da == db {
                    return Err(AuthError::Shared { a: *a, b: *b });
                }
            }
        }
        Ok(())
    }

    /// The role of `presented` (the bytes after `Bearer `), `None` when no role holds it, or
    /// more than one does (a rotation that put one token in two files; logged).
    pub fn identify(&self, presented: &[u8]) -> Option<Role> {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        let mut found: Option<Role> = None;
        let mut ambiguous = false;
        // Every token is compared, so the time taken says nothing about which one matched.
        for (role, cred) in &self.roles {
            for t in cred.tokens().iter() {
                if t.matches_digest(&digest) {
                    match found {
                        Some(r) if r != *role => ambiguous = true,
                        _ => found = Some(*role),
                    }
                }
            }
        }
        if ambiguous {
            tracing::error!("a presented token belongs to two roles' credentials: refused (give every role its own)");
            return None;
        }
        found
    }

    /// The role of a request's `authorization` header, or why there is none.
    pub fn identify_header(&self, value: Option<&[u8]>) -> Result<Role, &'static str> {
        let Some(bytes) = value else {
            return Err("missing authorization header");
        };
        if bytes.len() < SCHEME.len() || !bytes[..SCHEME.len()].eq_ignore_ascii_case(SCHEME.as_bytes()) {
            return Err("authorization is not a bearer token");
        }
        self.identify(&bytes[SCHEME.len()..]).ok_or("unknown bearer token")
    }
}

/// Registers the description of [`REJECTED_METRIC`] with the installed `metrics` recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(
        REJECTED_METRIC,
        metrics::Unit::Count,
        "RPCs refused before reaching the service, by role (the server's) and reason (unauthenticated: missing or unknown bearer token)"
    );
}

/// Client-side interceptor: adds `authorization: Bearer <token>` (the credential's current
/// token, so a rotated file is followed) and this client's [`INSTANCE_HEADER`] to every
/// request.
#[derive(Clone)]
pub struct ClientAuth {
    credential: Credential,
    instance: MetadataValue<Ascii>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientAuth(<redacted>)")
    }
}

impl ClientAuth {
    /// A client with a fresh random instance id (128 bits).
    pub fn new(credential: &Credential) -> Self {
        let instance = MetadataValue::try_from(random_hex(2)).expect("hex is valid metadata");
        Self { credential: credential.clone(), instance }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert(AUTHORIZATION, self.credential.current().header_value());
        request.metadata_mut().insert(INSTANCE_HEADER, self.instance.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_private(path: &Path, text: &str) {
        // Written aside and renamed, as a Secret update does: a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn the_verifier_tells_roles_apart_and_refuses_the_rest() {
        let learner = BearerToken::new("learner-t0k").unwrap();
        let actor = BearerToken::new("actor-t0k").unwrap();
        let v = Verifier::new()
            .with(Role::Learner, learner.into())
            .with(Role::Actor, Credential::fixed(vec![actor, BearerToken::new("actor-next").unwrap()]).unwrap());
        v.check_distinct().unwrap();
        assert_eq!(v.identify_header(Some(&header("learner-t0k"))), Ok(Role::Learner));
        assert_eq!(v.identify_header(Some(&header("actor-t0k"))), Ok(Role::Actor));
        assert_eq!(v.identify_header(Some(&header("actor-next"))), Ok(Role::Actor), "every token of a role counts");
        assert_eq!(v.identify_header(Some(b"bearer actor-t0k")), Ok(Role::Actor));
        for bad in [&b"Bearer actor-t0j"[..], b"Bearer actor-t0k2", b"Bearer ", b"Basic actor-t0k", b"actor-t0k"] {
            assert!(v.identify_header(Some(bad)).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(v.identify_header(None).is_err());
    }

    #[test]
    fn roles_must_not_share_a_token() {
        let t = BearerToken::new("same").unwrap();
        let v = Verifier::new()
            .with(Role::Actor, t.clone().into())
            .with(Role::Operator, Credential::fixed(vec![BearerToken::new("op").unwrap(), t]).unwrap());
        assert!(matches!(v.check_distinct(), Err(AuthError::Shared { a: Role::Actor, b: Role::Operator })));
        assert_eq!(v.identify(b"same"), None, "an ambiguous token gets no role");
        assert_eq!(v.identify(b"op"), Some(Role::Operator));
    }

    #[test]
    fn client_adds_the_header_and_an_instance_id() {
        let cred = Credential::generate();
        let auth = ClientAuth::new(&cred);
        assert_eq!(format!("{auth:?}"), "ClientAuth(<redacted>)");
        let req = auth.clone().call(Request::new(())).unwrap();
        let v = Verifier::new().with(Role::Operator, cred.clone());
        let h = req.metadata().get(AUTHORIZATION).map(|h| h.as_bytes());
        assert_eq!(v.identify_header(h), Ok(Role::Operator));
        let id = req.metadata().get(INSTANCE_HEADER).unwrap().to_str().unwrap().to_string();
        assert_eq!(id.len(), 32);
        // One client keeps its id; another client has another.
        let again = auth.clone().call(Request::new(())).unwrap();
        assert_eq!(again.metadata().get(INSTANCE_HEADER).unwrap().to_str().unwrap(), id);
        let other = ClientAuth::new(&cred).call(Request::new(())).unwrap();
        assert_ne!(other.metadata().get(INSTANCE_HEADER).unwrap().to_str().unwrap(), id);
    }

    #[test]
    fn generated_tokens_differ_and_are_long() {
        let a = BearerToken::generate();
        let b = BearerToken::generate();
        assert_eq!(a.secret().len(), 64);
        assert!(a.secret().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.secret(), b.secret());
    }

    #[test]
    fn token_files_are_parsed_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        // The one rule: no access for other users, no write for the group.
        for mode in [0o644, 0o604, 0o660, 0o620, 0o601, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = Credential::from_file(&path);
            assert!(matches!(r, Err(AuthError::Permissions { mode: m, .. }) if m == mode), "{mode:o}: {r:?}");
        }
        for mode in [0o600, 0o640, 0o400, 0o440] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(Credential::from_file(&path).unwrap().current().secret(), "abc123", "{mode:o}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        write_private(&path, "# rotation: new first\n\n  new-one  \nold-one\n");
        let c = Credential::from_file(&path).unwrap();
        let secrets: Vec<String> = c.tokens().iter().map(|t| t.secret().to_string()).collect();
        assert_eq!(secrets, ["new-one", "old-one"]);
        write_private(&path, "\n# nothing\n");
        assert!(matches!(Credential::from_file(&path), Err(AuthError::Empty { .. })));
        write_private(&path, "has space");
        assert!(matches!(Credential::from_file(&path), Err(AuthError::Invalid { .. })));
        assert!(matches!(Credential::from_file(dir.path().join("absent")), Err(AuthError::Read { .. })));
        assert!(format!("{:?}", BearerToken::new("abc").unwrap()).contains("redacted"));
        assert!(!format!("{c:?}").contains("new-one"));
    }

    /// Waits (bounded) until `cond` holds of the credential's tokens.
    fn wait_tokens(c: &Credential, want: &[&str]) {
        let t0 = Instant::now();
        loop {
            let now: Vec<String> = c.tokens().iter().map(|t| t.secret().to_string()).collect();
            if now == want {
                return;
            }
            assert!(t0.elapsed() < RELOAD_EVERY * 10, "tokens {now:?}, expected {want:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_change_keeps_the_old_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_private(&path, "old\n");
        let c = Credential::from_file(&path).unwrap();
        let v = Verifier::new().with(Role::Actor, c.clone());
        assert_eq!(v.identify(b"new"), None);
        write_private(&path, "old\nnew\n");
        wait_tokens(&c, &["old", "new"]);
        assert_eq!((v.identify(b"old"), v.identify(b"new")), (Some(Role::Actor), Some(Role::Actor)));
        write_private(&path, "new\n");
        wait_tokens(&c, &["new"]);
        assert_eq!(v.identify(b"old"), None);
        assert_eq!(c.current().secret(), "new");
        // A change that cannot be used (empty) is ignored, the last good tokens stay.
        write_private(&path, "");
        let t0 = Instant::now();
        while t0.elapsed() < RELOAD_EVERY * 2 {
            assert_eq!(c.current().secret(), "new");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
