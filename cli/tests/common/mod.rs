//! A cluster of real `selfplay` processes on 127.0.0.1 with ports chosen by the OS
//! (coordinator, learner, actors) on tiny random models, shared by the multi-process tests.
#![allow(dead_code)]
use selfplay_proto::auth::{BearerToken, Credential};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One credential per role, each in its own file under `<dir>/secrets` (mode 600).
pub const ROLES: [&str; 4] = ["learner", "actor", "operator", "reward-client"];

/// The token of `role` (test values; every role its own).
pub fn token(role: &str) -> String {
    format!("test-{role}-token-0123456789abcdef")
}

/// `role`'s credential, in memory.
pub fn credential(role: &str) -> Credential {
    BearerToken::new(token(role)).unwrap().into()
}
pub const N: usize = 3;

pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Serve and connect with TLS (certificates in `dir`).
    pub tls: bool,
    pub coordinator_addr: Option<String>,
    pub learner_addr: Option<String>,
    /// Network namespace the coordinator and the learner run in (None: this one), and the
    /// address the learner listens on.
    pub netns: Option<String>,
    pub host: String,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_selfplay")
}

pub fn wait_ready(path: &Path, what: &str) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(v) = serde_json::from_str(&text) {
                return v;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Cluster {
    pub fn new(extra: &[&str]) -> (tempfile::TempDir, Cluster) {
        Self::with_run(5, 2, extra)
    }

    /// A cluster whose run has `steps` steps and checkpoints every `checkpoint_every`.
    pub fn with_run(steps: u64, checkpoint_every: u64, extra: &[&str]) -> (tempfile::TempDir, Cluster) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let model = dir.join("model");
        let rm = dir.join("rm");
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(&rm).unwrap();
        selfplay_tests::tiny_model(&model, "gqa_tied", 7);
        selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 8);
        let mut cfg = format!(
            "[run]\nseed = 3\nsteps = {steps}\nout_dir = {:?}\ncheckpoint_every = {checkpoint_every}\nkeep_checkpoints = 10\n\
             [model]\npath = {:?}\ndevice = \"cpu\"\n\
             [game]\nmode = \"lsp-zero\"\nqueries_per_step = {N}\ngroup_size = 2\n\
             [challenger]\nmax_new_tokens = 6\n[solver]\nmax_new_tokens = 8\n\
             [reward]\nkind = \"model\"\npath = {:?}\n[optim]\nlr = 1e-3\ngrad_accum = 1\n",
            dir.join("run").to_str().unwrap(),
            model.to_str().unwrap(),
            rm.to_str().unwrap()
        );
        for e in extra {
            cfg.push_str(e);
            cfg.push('\n');
        }
        let config = dir.join("run.toml");
        std::fs::write(&config, cfg).unwrap();
        std::fs::create_dir_all(dir.join("secrets")).unwrap();
        for role in ROLES {
            let path = dir.join("secrets").join(role);
            std::fs::write(&path, format!("{}\n", token(role))).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        }
        (
            tmp,
            Cluster {
                dir,
                config,
                tls: false,
                coordinator_addr: None,
                learner_addr: None,
                netns: None,
                host: "127.0.0.1".into(),
            },
        )
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn tls_server_args(&self) -> Vec<String> {
        if !self.tls {
            return vec![];
        }
        let p = |n: &str| self.dir.join(n).to_str().unwrap().to_string();
        vec!["--tls-cert".into(), p("cert.pem"), "--tls-key".into(), p("key.pem")]
    }

    pub fn tls_client_args(&self) -> Vec<String> {
        if !self.tls {
            return vec![];
        }
        vec!["--tls-ca".into(), self.dir.join("ca.pem").to_str().unwrap().to_string()]
    }

    pub fn spawn(&self, name: &str, args: &[String]) -> Proc {
        self.spawn_in(self.netns.as_deref(), name, args)
    }

    /// The credential file of `role`.
    pub fn secret(&self, role: &str) -> PathBuf {
        self.dir.join("secrets").join(role)
    }

    /// A process of the binary in network namespace `ns` (None: this one). Every role finds
    /// the credential files it accepts in the environment, and its own credential
    /// (`SELFPLAY_TOKEN_FILE`) by its subcommand.
    pub fn spawn_in(&self, ns: Option<&str>, name: &str, args: &[String]) -> Proc {
        let own = match args.first().map(String::as_str) {
            Some("learner") => Some("learner"),
            Some("actor") => Some("actor"),
            Some("status") => Some("operator"),
            _ => None,
        };
        // Appended: a restarted process adds to its predecessor's log.
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        let child = cmd
            .args(["--threads", "1", "--log", "info"])
            .args(args)
            .env_remove("SELFPLAY_TOKEN")
            .env_remove("SELFPLAY_TOKEN_FILE")
            .envs(own.map(|r| ("SELFPLAY_TOKEN_FILE", self.secret(r))))
            .env("SELFPLAY_LEARNER_TOKENS_FILE", self.secret("learner"))
            .env("SELFPLAY_ACTOR_TOKENS_FILE", self.secret("actor"))
            .env("SELFPLAY_OPERATOR_TOKENS_FILE", self.secret("operator"))
            .env("SELFPLAY_REWARD_CLIENT_TOKENS_FILE", self.secret("reward-client"))
            .env("SELFPLAY_REWARD_TOKEN_FILE", self.secret("reward-client"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Proc { child, name: name.to_string() }
    }

    pub fn coordinator(&mut self, listen: &str) -> Proc {
        let ready = self.dir.join("coordinator.ready");
        let _ = std::fs::remove_file(&ready);
        let mut args: Vec<String> = vec![
            "coordinator".into(),
            "--listen".into(),
            listen.into(),
            "--state-dir".into(),
            self.dir.join("state").to_str().unwrap().into(),
            "--lease-ttl-ms".into(),
            "1500".into(),
            "--seed".into(),
            "3".into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.to_str().unwrap().into(),
        ];
        args.extend(self.tls_server_args());
        let p = self.spawn("coordinator", &args);
        let r = wait_ready(&ready, "coordinator");
        self.coordinator_addr = Some(format!("{}://{}", self.scheme(), r["grpc"].as_str().unwrap()));
        p
    }

    pub fn learner(&mut self, extra: &[&str]) -> Proc {
        let ready = self.dir.join("learner.ready");
        let _ = std::fs::remove_file(&ready);
        let mut args: Vec<String> = vec![
            "learner".into(),
            "--config".into(),
            self.config.to_str().unwrap().into(),
            "--coordinator".into(),
            self.coordinator_addr.clone().unwrap(),
            "--listen".into(),
            self.learner_addr
                .clone()
                .map(|a| a.split("://").nth(1).unwrap().to_string())
                .unwrap_or(format!("{}:0", self.host)),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            ready.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.tls_server_args());
        args.extend(self.tls_client_args());
        let p = self.spawn("learner", &args);
        let r = wait_ready(&ready, "learner");
        self.learner_addr = Some(format!("{}://{}", self.scheme(), r["grpc"].as_str().unwrap()));
        p
    }

    pub fn actor(&self, id: &str) -> Proc {
        self.actor_with(id, &[])
    }

    pub fn actor_with(&self, id: &str, extra: &[String]) -> Proc {
        self.actor_in(self.netns.as_deref(), id, extra)
    }

    /// An actor in network namespace `ns` (None: this one).
    pub fn actor_in(&self, ns: Option<&str>, id: &str, extra: &[String]) -> Proc {
        let mut args: Vec<String> = vec![
            "actor".into(),
            "--config".into(),
            self.config.to_str().unwrap().into(),
            "--coordinator".into(),
            self.coordinator_addr.clone().unwrap(),
            "--learner".into(),
            self.learner_addr.clone().unwrap(),
            "--actor-id".into(),
            id.into(),
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
        ];
        args.extend(self.tls_client_args());
        args.extend(extra.iter().cloned());
        self.spawn_in(ns, id, &args)
    }

    pub fn steps(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.join("run/steps.jsonl")).unwrap_or_default();
        // Only whole lines: the learner may be writing the next one right now.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        whole.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    pub fn wait_steps(&self, n: usize, procs: &mut [&mut Proc]) {
        let t0 = Instant::now();
        while self.steps().len() < n {
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("{} exited with {status} before step {n}:\n{}", p.name, self.log(&p.name));
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "no step {n} after 300 s:\n{}", self.log("learner"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_exit(&self, p: &mut Proc) {
        let t0 = Instant::now();
        loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                assert!(s.success(), "{} failed: {s}\n{}", p.name, self.log(&p.name));
                return;
            }
            assert!(t0.elapsed() < Duration::from_secs(300), "{} did not finish:\n{}", p.name, self.log(&p.name));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Every step used exactly N distinct units of its own step; no unit twice in the run.
    pub fn check_steps(&self, n_steps: usize) -> Vec<serde_json::Value> {
        let steps = self.steps();
        assert_eq!(steps.len(), n_steps, "steps logged");
        let mut seen = HashSet::new();
        for (i, s) in steps.iter().enumerate() {
            assert_eq!(s["stats"]["step"].as_u64(), Some(i as u64 + 1));
            let units = s["units"].as_array().unwrap();
            assert_eq!(units.len(), N, "step {} has {} groups", i + 1, units.len());
            for u in units {
                let id = u["unit_id"].as_str().unwrap().to_string();
                assert!(seen.insert(id.clone()), "unit {id} consumed twice");
            }
        }
        steps
    }

    pub fn final_weights(&self) -> Vec<u8> {
        let ckpt = selfplay_learner::latest_checkpoint(&self.dir.join("run")).expect("a checkpoint");
        std::fs::read(ckpt.join("model.safetensors")).unwrap()
    }
}

/// The coordinator's status, or why it could not be had (it may be down).
pub fn try_status(addr: &str) -> Result<selfplay_proto::v1::StatusResponse, String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep =
            tonic::transport::Endpoint::from_shared(addr.to_string()).unwrap().connect_timeout(Duration::from_secs(2));
        let ch = ep.connect().await.map_err(|e| e.to_string())?;
        let mut c = selfplay_proto::client::coordinator_client(ch, &credential("operator"));
        let r = tokio::time::timeout(Duration::from_secs(5), c.status(selfplay_proto::v1::StatusRequest {})).await;
        match r {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.to_string()),
            Err(_) => Err("timed out".into()),
        }
    })
}

pub fn status(addr: &str) -> selfplay_proto::v1::StatusResponse {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(addr.to_string()).unwrap().connect().await.unwrap();
        let mut c = selfplay_proto::client::coordinator_client(ch, &credential("operator"));
        c.status(selfplay_proto::v1::StatusRequest {}).await.unwrap().into_inner()
    })
}

/// Polls the coordinator's status until `cond` holds (60 s at most).
pub fn wait_status(
    addr: &str,
    what: &str,
    cond: impl Fn(&selfplay_proto::v1::StatusResponse) -> bool,
) -> selfplay_proto::v1::StatusResponse {
    let t0 = Instant::now();
    loop {
        let s = status(addr);
        if cond(&s) {
            return s;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "never: {what}: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
