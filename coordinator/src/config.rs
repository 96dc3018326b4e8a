//! The coordinator's configuration (the `[coordinator]` table of a run's TOML, or flags).

use std::path::PathBuf;
use std::time::Duration;

use selfplay_proto::auth::{Credential, Role, Verifier};
use serde::{Deserialize, Serialize};

use crate::CoordinatorError;

/// Optional TLS (rustls): PEM certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// 256 GiB: a 64B-parameter model in f32.
pub const DEFAULT_MAX_WEIGHTS_BYTES: u64 = 256 << 30;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// Where the state snapshot (`coordinator.json`) and the weight store (`weights/`) live.
    pub state_dir: PathBuf,
    /// An actor that sends no heartbeat (or lease or completion) for this long is dropped and
    /// its units are re-issued.
    pub lease_ttl_ms: u64,
    /// Weight versions kept (the newest ones).
    pub keep_versions: usize,
    /// The largest weights payload a publish may announce (bytes); bigger ones are refused
    /// before anything is written.
    pub max_weights_bytes: u64,
    /// Seed of the run: every unit's seed derives from it, its step and its index. A restart
    /// keeps the seed saved in the state directory.
    pub run_seed: u64,
    /// The learner's credential file (one token a line, see docs/operations.md): the learner
    /// opens steps, publishes weights and begins epochs with it; it also keys lease tickets.
    pub learner_tokens_file: Option<PathBuf>,
    /// The actors' credential file: join, lease, report, fetch weights.
    pub actor_tokens_file: Option<PathBuf>,
    /// The operators' credential file: Status only. Without it nobody but the learner reads
    /// status.
    pub operator_tokens_file: Option<PathBuf>,
    /// Serve TLS with this certificate and key; plaintext when absent.
    pub tls: Option<TlsConfig>,
    /// Credentials given in-process (`train`, tests); win over the files. Never read from or
    /// written to a file.
    #[serde(skip)]
    pub credentials: Option<CoordinatorCredentials>,
}

/// The credentials a coordinator accepts, one per role.
#[derive(Debug, Clone)]
pub struct CoordinatorCredentials {
    pub learner: Credential,
    pub actor: Credential,
    pub operator: Option<Credential>,
}

impl CoordinatorCredentials {
    /// The role of every accepted token; two roles sharing a token are refused.
    pub fn verifier(&self) -> Result<Verifier, CoordinatorError> {
        let mut v = Verifier::new().with(Role::Learner, self.learner.clone()).with(Role::Actor, self.actor.clone());
        if let Some(op) = &self.operator {
            v = v.with(Role::Operator, op.clone());
        }
        v.check_distinct()?;
        Ok(v)
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("selfplay-state/coordinator"),
            lease_ttl_ms: 10_000,
            keep_versions: 2,
            max_weights_bytes: DEFAULT_MAX_WEIGHTS_BYTES,
            run_seed: 0,
            learner_tokens_file: None,
            actor_tokens_file: None,
            operator_tokens_file: None,
            tls: None,
            credentials: None,
        }
    }
}

impl CoordinatorConfig {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Checks the values; every error names the field.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        let bad = |field: &'static str, reason: &str| Err(CoordinatorError::Config(format!("{field}: {reason}")));
        if self.lease_ttl_ms < 50 {
            return bad("lease_ttl_ms", "must be at least 50");
        }
        if self.keep_versions == 0 {
            return bad("keep_versions", "must be at least 1");
        }
        if self.state_dir.as_os_str().is_empty() {
            return bad("state_dir", "must not be empty");
        }
        Ok(())
    }

    /// The credentials: `credentials`, else the files (the learner's and the actors' are
    /// required).
    pub fn resolve_credentials(&self) -> Result<CoordinatorCredentials, CoordinatorError> {
        if let Some(c) = &self.credentials {
            return Ok(c.clone());
        }
        let required = |field: &str, path: &Option<PathBuf>| match path {
            Some(p) => Ok(Credential::from_file(p)?),
            None => Err(CoordinatorError::Config(format!("{field}: required (the role's credential file)"))),
        };
        Ok(CoordinatorCredentials {
            learner: required("learner_tokens_file", &self.learner_tokens_file)?,
            actor: required("actor_tokens_file", &self.actor_tokens_file)?,
            operator: self.operator_tokens_file.as_ref().map(Credential::from_file).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: CoordinatorConfig = serde_json::from_str(r#"{"lease_ttl_ms": 300}"#).unwrap();
        assert_eq!(c.lease_ttl_ms, 300);
        assert_eq!(c.keep_versions, 2);
        c.validate().unwrap();
        assert!(serde_json::from_str::<CoordinatorConfig>(r#"{"lease_ttl": 300}"#).is_err());
        let c = CoordinatorConfig { keep_versions: 0, ..CoordinatorConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("keep_versions"));
    }
}
