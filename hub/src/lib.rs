//! Where a model comes from: a local Hugging Face directory, or a Hub id (`org/name`) whose
//! files are downloaded with `hf-hub` into the Hugging Face cache and loaded from there.
//!
//! A value that names an existing directory is a local path. Otherwise a value of the form
//! `org/name` is a Hub id; anything else is an error ([`HubError::NotAModel`]). A Hub model is
//! fetched at a revision (a branch, tag or commit; `main` by default) and resolves to its
//! snapshot directory, `$HF_HOME/hub/models--org--name/snapshots/<commit>`, the layout the
//! Python `huggingface_hub` shares. Only what the policy loads is fetched: the JSON files at
//! the repository's root (config, generation config, tokenizer, weight index),
//! `chat_template.jinja`, and the safetensors weights (`model.safetensors`, or the shards
//! `model.safetensors.index.json` lists).
//!
//! The environment, as `huggingface_hub` reads it: `HF_HOME` (cache root, default
//! `~/.cache/huggingface`), `HF_HUB_CACHE` (the cache itself, default `$HF_HOME/hub`),
//! `HF_ENDPOINT` (default `https://huggingface.co`), `HF_TOKEN` (else the `$HF_HOME/token`
//! file), and `HF_HUB_OFFLINE=1`, which resolves from the cache alone and never touches the
//! network.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

/// The revision a Hub id resolves at when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// Everything that can go wrong resolving a model reference.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Neither an existing directory nor of the form `org/name`.
    #[error(
        "'{spec}' is not a model: neither an existing local directory nor a Hugging Face Hub id of the form org/name"
    )]
    NotAModel { spec: String },
    /// The Hub has no such repository (or hides a private one from this caller).
    #[error("Hugging Face Hub repository '{repo}' not found at {endpoint} (if it is private or gated, set HF_TOKEN)")]
    RepoNotFound { repo: String, endpoint: String },
    /// The repository exists but not the revision.
    #[error("revision '{revision}' of Hugging Face Hub repository '{repo}' not found at {endpoint}")]
    RevisionNotFound { repo: String, revision: String, endpoint: String },
    /// 401/403: no token, or one the Hub refused.
    #[error("{endpoint} refused access to '{repo}' (HTTP {status}): {hint}")]
    Unauthorized { repo: String, endpoint: String, status: u16, hint: &'static str },
    /// The repository has no weights this project loads.
    #[error(
        "Hugging Face Hub repository '{repo}' at revision '{revision}' has neither model.safetensors nor model.safetensors.index.json (only safetensors checkpoints load)"
    )]
    NoWeights { repo: String, revision: String },
    /// Offline mode, and the cache lacks the revision or some of its files.
    #[error(
        "HF_HUB_OFFLINE is set and '{repo}' at revision '{revision}' is not complete in the cache {}: {missing} (download it once online)",
        .cache.display()
    )]
    NotCached { repo: String, revision: String, cache: PathBuf, missing: String },
    /// The revision moved to another commit while its files were downloading.
    #[error("'{repo}' at revision '{revision}' changed while downloading ({file} came from commit {got}, expected {want}); try again")]
    Changed { repo: String, revision: String, file: String, got: String, want: String },
    /// Any other HTTP status.
    #[error("{url}: HTTP {status} {message}")]
    Http { url: String, status: u16, message: String },
    /// The endpoint could not be reached (connection refused, DNS, TLS...).
    #[error("cannot reach the Hugging Face Hub at {endpoint} for '{repo}': {message}")]
    Unreachable { repo: String, endpoint: String, message: String },
    /// A malformed answer, or a local I/O problem while storing the files.
    #[error("'{repo}': {message}")]
    Download { repo: String, message: String },
}

/// What a model reference names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An existing directory.
    Local(PathBuf),
    /// A Hugging Face Hub repository id, `org/name`.
    Hub(String),
}

/// Classify `spec` without touching the network: an existing directory is local; `org/name`
/// (each part letters, digits, `-`, `_`, `.`, not starting or ending with `-` or `.`, no `--`
/// or `..`, at most 96 characters) is a Hub id; anything else is [`HubError::NotAModel`].
pub fn classify(spec: &Path) -> Result<ModelSource, HubError> {
    if spec.is_dir() {
        return Ok(ModelSource::Local(spec.to_path_buf()));
    }
    let text = spec.to_str().unwrap_or("");
    if is_hub_id(text) {
        Ok(ModelSource::Hub(text.to_string()))
    } else {
        Err(HubError::NotAModel { spec: spec.display().to_string() })
    }
}

fn is_hub_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else { return false };
    let part = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    s.len() <= 96 && part(org) && part(name)
}

/// How to reach the Hub and where its cache is.
#[derive(Debug, Clone)]
pub struct Hub {
    /// Base URL, e.g. `https://huggingface.co`.
    pub endpoint: String,
    /// The cache directory (`$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Bearer token for private and gated repositories.
    pub token: Option<String>,
    /// Resolve from the cache only.
    pub offline: bool,
}

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

impl Hub {
    /// The settings from `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` (else the token
    /// file) and `HF_HUB_OFFLINE`, as `huggingface_hub` reads them.
    pub fn from_env() -> Self {
        let cache = match env_nonempty("HF_HUB_CACHE") {
            Some(dir) => Cache::new(dir.into()),
            None => Cache::from_env(),
        };
        let token = env_nonempty("HF_TOKEN").or_else(|| Cache::from_env().token());
        let endpoint = env_nonempty("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let offline = env_nonempty("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Hub { endpoint: endpoint.trim_end_matches('/').to_string(), cache_dir: cache.path().clone(), token, offline }
    }

    /// The local directory of a model reference: `spec` itself when it is a directory, else
    /// the snapshot of Hub id `spec` at `revision` (empty = `main`), downloaded if needed.
    pub fn resolve(&self, spec: &Path, revision: &str) -> Result<PathBuf, HubError> {
        match classify(spec)? {
            ModelSource::Local(dir) => Ok(dir),
            ModelSource::Hub(repo) => {
                let revision = if revision.trim().is_empty() { DEFAULT_REVISION } else { revision.trim() };
                if self.offline {
                    self.cached(&repo, revision)
                } else {
                    self.download(&repo, revision)
                }
            }
        }
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir.join(Repo::new(repo.to_string(), RepoType::Model).folder_name())
    }

    /// The cached snapshot of `repo` at `revision`, checked complete, without the network.
    pub fn cached(&self, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
        let not_cached = |missing: String| HubError::NotCached {
            repo: repo.into(),
            revision: revision.into(),
            cache: self.cache_dir.clone(),
            missing,
        };
        let commit = if is_commit(revision) {
            revision.to_string()
        } else {
            let r = self.repo_dir(repo).join("refs").join(revision);
            std::fs::read_to_string(&r).map_err(|_| not_cached(format!("no {}", r.display())))?.trim().to_string()
        };
        let snapshot = self.repo_dir(repo).join("snapshots").join(&commit);
        let mut missing: Vec<String> = vec![];
        if !snapshot.join("config.json").is_file() {
            missing.push("config.json".into());
        }
        match weight_files_in(&snapshot) {
            Ok(files) => missing.extend(files.into_iter().filter(|f| !snapshot.join(f).is_file())),
            Err(what) => missing.push(what),
        }
        if missing.is_empty() {
            tracing::info!(repo, revision, %commit, dir = %snapshot.display(), "model from the Hugging Face cache (offline)");
            Ok(snapshot)
        } else {
            Err(not_cached(format!("missing {}", missing.join(", "))))
        }
    }

    /// Fetch what is missing of `repo` at `revision` into the cache; its snapshot directory.
    pub fn download(&self, repo: &str, revision: &str) -> Result<PathBuf, HubError> {
        let api = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone()))
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .build()
            .map_err(|e| self.api_error(repo, revision, e))?;
        let api_repo = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
        let info = api_repo.info().map_err(|e| self.api_error(repo, revision, e))?;
        let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let snapshot = self.repo_dir(repo).join("snapshots").join(&info.sha);

        // The small files first: the weight index names the shards.
        let small: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !n.contains('/') && (n.ends_with(".json") || *n == "chat_template.jinja"))
            .collect();
        if !small.contains(&"config.json") {
            return Err(HubError::Download {
                repo: repo.into(),
                message: format!("revision '{revision}' has no config.json: not a transformers model"),
            });
        }
        let fetch = |file: &str| -> Result<(), HubError> {
            if snapshot.join(file).is_file() {
                return Ok(());
            }
            tracing::info!(repo, revision, file, "downloading from the Hugging Face Hub");
            let got = api_repo.download(file).map_err(|e| self.api_error(repo, revision, e))?;
            if got.parent() != Some(snapshot.as_path()) {
                return Err(HubError::Changed {
                    repo: repo.into(),
                    revision: revision.into(),
                    file: file.into(),
                    got: got
                        .parent()
                        .and_then(Path::file_name)
                        .map(|c| c.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    want: info.sha.clone(),
                });
            }
            Ok(())
        };
        for f in &small {
            fetch(f)?;
        }
        let weights = match weight_files_in(&snapshot) {
            Ok(w) => w,
            Err(_) if !names.contains(&"model.safetensors") => {
                return Err(HubError::NoWeights { repo: repo.into(), revision: revision.into() })
            }
            Err(_) => vec!["model.safetensors".to_string()],
        };
        for w in &weights {
            if !names.contains(&w.as_str()) {
                return Err(HubError::Download {
                    repo: repo.into(),
                    message: format!("model.safetensors.index.json names {w}, which the repository does not have"),
                });
            }
            fetch(w)?;
        }
        tracing::info!(repo, revision, commit = %info.sha, dir = %snapshot.display(), "model from the Hugging Face Hub");
        Ok(snapshot)
    }

    fn api_error(&self, repo: &str, revision: &str, e: ApiError) -> HubError {
        let endpoint = self.endpoint.clone();
        match e {
            ApiError::RequestError(boxed) => match *boxed {
                ureq::Error::Status(status, response) => {
                    let code = response.header("x-error-code").unwrap_or("").to_string();
                    let url = response.get_url().to_string();
                    let message = response.into_string().unwrap_or_default();
                    match (status, code.as_str()) {
                        (_, "RepoNotFound") | (_, "RepositoryNotFound") => {
                            HubError::RepoNotFound { repo: repo.into(), endpoint }
                        }
                        (_, "RevisionNotFound") => {
                            HubError::RevisionNotFound { repo: repo.into(), revision: revision.into(), endpoint }
                        }
                        (401 | 403, _) => HubError::Unauthorized {
                            repo: repo.into(),
                            endpoint,
                            status,
                            hint: if self.token.is_some() {
                                "the token (HF_TOKEN or the token file) was refused or lacks access"
                            } else {
                                "the repository is private or gated: set HF_TOKEN"
                            },
                        },
                        (404, _) => HubError::RepoNotFound { repo: repo.into(), endpoint },
                        _ => HubError::Http { url, status, message: message.chars().take(200).collect() },
                    }
                }
                ureq::Error::Transport(t) => {
                    HubError::Unreachable { repo: repo.into(), endpoint, message: t.to_string() }
                }
            },
            other => HubError::Download { repo: repo.into(), message: other.to_string() },
        }
    }
}

/// A full commit hash, which names a snapshot without a ref.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The weight files a snapshot needs, from its index when it has one (the index must be
/// there already), else `model.safetensors`. Err: the index is unreadable or absent while
/// `model.safetensors` is absent too.
fn weight_files_in(dir: &Path) -> Result<Vec<String>, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: bad JSON: {e}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format!("{}: no weight_map object", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
            return Err(format!("{}: a shard name leaves the repository", index.display()));
        }
        return Ok(files);
    }
    if dir.join("model.safetensors").is_file() {
        Ok(vec!["model.safetensors".into()])
    } else {
        Err("model.safetensors (or model.safetensors.index.json)".into())
    }
}

/// [`Hub::resolve`] with the settings of the environment ([`Hub::from_env`]).
pub fn resolve(spec: &Path, revision: &str) -> Result<PathBuf, HubError> {
    Hub::from_env().resolve(spec, revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_local_dirs_hub_ids_and_the_rest() {
        let dir = std::env::temp_dir();
        assert_eq!(classify(&dir).unwrap(), ModelSource::Local(dir.clone()));
        for id in ["Qwen/Qwen2.5-0.5B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b", "org_1/name.v2"] {
            assert_eq!(classify(Path::new(id)).unwrap(), ModelSource::Hub(id.into()), "{id}");
        }
        for bad in [
            "",
            "name",
            "a/b/c",
            "/abs/path",
            "./rel",
            "../x/y",
            "org/",
            "/name",
            "org/-x",
            "org/x.",
            "a--b/c",
            "o/a..b",
        ] {
            assert!(matches!(classify(Path::new(bad)), Err(HubError::NotAModel { .. })), "{bad}");
        }
        assert!(classify(Path::new(&format!("org/{}", "x".repeat(100)))).is_err());
        let e = classify(Path::new("no/such/dir")).unwrap_err().to_string();
        assert!(e.contains("'no/such/dir'") && e.contains("org/name"), "{e}");
    }

    #[test]
    fn a_local_dir_that_looks_like_an_id_stays_local() {
        let root = std::env::temp_dir().join(format!("selfplay-hub-{}", std::process::id()));
        let d = root.join("org/name");
        std::fs::create_dir_all(&d).unwrap();
        let hub =
            Hub { endpoint: "http://127.0.0.1:9".into(), cache_dir: root.join("cache"), token: None, offline: false };
        assert_eq!(hub.resolve(&d, "main").unwrap(), d);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn offline_names_what_is_missing() {
        let root = std::env::temp_dir().join(format!("selfplay-hub-off-{}", std::process::id()));
        let hub = Hub { endpoint: "http://127.0.0.1:9".into(), cache_dir: root.clone(), token: None, offline: true };
        let e = hub.resolve(Path::new("org/model"), "").unwrap_err();
        assert!(matches!(&e, HubError::NotCached { revision, .. } if revision == "main"), "{e}");
        assert!(e.to_string().contains("refs/main"), "{e}");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = root.join("models--org--model/snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        std::fs::write(
            snap.join("model.safetensors.index.json"),
            r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("s1.safetensors"), "").unwrap();
        let e = hub.resolve(Path::new("org/model"), commit).unwrap_err().to_string();
        assert!(e.contains("missing s2.safetensors") && !e.contains("s1"), "{e}");
        std::fs::write(snap.join("s2.safetensors"), "").unwrap();
        assert_eq!(hub.resolve(Path::new("org/model"), commit).unwrap(), snap);
        std::fs::create_dir_all(root.join("models--org--model/refs")).unwrap();
        std::fs::write(root.join("models--org--model/refs/v1"), commit).unwrap();
        assert_eq!(hub.resolve(Path::new("org/model"), "v1").unwrap(), snap);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unreachable_endpoint_is_a_clear_error() {
        let root = std::env::temp_dir().join(format!("selfplay-hub-unr-{}", std::process::id()));
        // A port that was free a moment ago: nothing listens there now.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let hub =
            Hub { endpoint: format!("http://127.0.0.1:{port}"), cache_dir: root.clone(), token: None, offline: false };
        let e = hub.resolve(Path::new("org/model"), "main").unwrap_err();
        assert!(matches!(e, HubError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains("org/model") && e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
