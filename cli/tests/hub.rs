//! Models named by Hugging Face Hub id, fetched from a local Hub (`selfplay_tests::hub_server`,
//! serving tiny random models in the Hub's URL layout) into an HF_HOME cache: generate with
//! them, again offline from the cache, at another revision (a sharded checkpoint), and the
//! clear errors for a refused token, a missing repository or revision, an offline cache miss
//! and a value that is neither a directory nor an id. A train run takes model.path,
//! model.revision and reward.path as Hub ids.
use selfplay_tests::hub_server::{commit_sha, shard_safetensors, HubRepo, HubServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    main: PathBuf,
    v2: PathBuf,
    hub: HubServer,
}

const REPO: &str = "test-org/tiny-llama";
const PRIVATE: &str = "test-org/private-llama";
const TOKEN: &str = "hf_test_secret";

/// Digits as single tokens and a shorter template: expected-mode self-reward needs them.
fn digit_tokenizer(model: &Path) {
    let tc_path = model.join("tokenizer_config.json");
    let mut tc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tc_path).unwrap()).unwrap();
    tc["chat_template"] = serde_json::json!("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}t3 ");
    std::fs::write(&tc_path, tc.to_string()).unwrap();
    let tok = model.join("tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    for d in 0..8 {
        tj["model"]["vocab"][d.to_string()] = serde_json::json!(200 + d);
    }
    std::fs::write(&tok, tj.to_string()).unwrap();
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (main, v2, rm) = (dir.join("repo-main"), dir.join("repo-v2"), dir.join("repo-rm"));
    for d in [&main, &v2, &rm] {
        std::fs::create_dir_all(d).unwrap();
    }
    selfplay_tests::tiny_model(&main, "gqa_tied", 1);
    selfplay_tests::tiny_model(&v2, "gqa_tied", 2);
    // Revision v2 is a sharded checkpoint: an index and two shards.
    shard_safetensors(&v2, 2);
    selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 3);
    for d in [&main, &v2] {
        digit_tokenizer(d);
    }
    let hub = HubServer::start(vec![
        HubRepo {
            id: REPO.into(),
            token: None,
            revisions: vec![
                (commit_sha("main"), vec!["main".into()], main.clone()),
                (commit_sha("v2"), vec!["v2".into()], v2.clone()),
            ],
        },
        HubRepo {
            id: PRIVATE.into(),
            token: Some(TOKEN.into()),
            revisions: vec![(commit_sha("private"), vec!["main".into()], main.clone())],
        },
        HubRepo {
            id: "test-org/tiny-rm".into(),
            token: None,
            revisions: vec![(commit_sha("rm"), vec!["main".into()], rm.clone())],
        },
    ]);
    Fixture { _tmp: tmp, dir, main, v2, hub }
}

impl Fixture {
    fn hf_home(&self) -> PathBuf {
        self.dir.join("hf-home")
    }

    /// `selfplay ARGS` with HF_HOME and HF_ENDPOINT pointing at the local Hub, and `env` on top.
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_selfplay"));
        c.args(["--threads", "1"]).args(args);
        for k in ["HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            c.env_remove(k);
        }
        c.env("HF_HOME", self.hf_home()).env("HF_ENDPOINT", &self.hub.endpoint);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// The completion ids of a greedy `selfplay generate --json` with `model` (and extra args).
    fn generate(&self, model: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Vec<u64>, String> {
        let mut args = vec!["generate", "--model", model, "--device", "cpu", "--dtype", "f32"];
        args.extend(["--prompt", "t5 t6 t7", "--max-new-tokens", "6", "--json"]);
        args.extend(extra);
        let out = self.run(&args, env);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Ok(v["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
    }

    fn snapshot(&self, repo: &str, label: &str) -> PathBuf {
        self.hf_home()
            .join("hub")
            .join(format!("models--{}", repo.replace('/', "--")))
            .join("snapshots")
            .join(commit_sha(label))
    }
}

fn local(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn hub_ids_download_generate_and_resolve_offline_from_the_cache() {
    let f = fixture();
    let want_main = f.generate(local(&f.main), &[], &[]).unwrap();
    let want_v2 = f.generate(local(&f.v2), &[], &[]).unwrap();
    assert_ne!(want_main, want_v2, "the two revisions are different random models");
    assert_eq!(f.hub.requests(), 0, "a local directory never touches the Hub");

    // Download at main, then generate: the same tokens as from the directory served.
    assert_eq!(f.generate(REPO, &[], &[]).unwrap(), want_main);
    let snap = f.snapshot(REPO, "main");
    for file in
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    {
        assert!(snap.join(file).is_file(), "{file} missing from the snapshot {}", snap.display());
    }
    let refs = f.hf_home().join("hub/models--test-org--tiny-llama/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap().trim(), commit_sha("main"));

    // Offline: from the cache, without a single request.
    let served = f.hub.requests();
    assert_eq!(f.generate(REPO, &[], &[("HF_HUB_OFFLINE", "1")]).unwrap(), want_main);
    assert_eq!(f.hub.requests(), served, "offline mode made requests");
    // Online again: one revision lookup, no file downloaded twice.
    assert_eq!(f.generate(REPO, &[], &[]).unwrap(), want_main);
    assert_eq!(f.hub.requests(), served + 1, "a cached snapshot was downloaded again");

    // Revision v2 (--revision, and SELFPLAY_REVISION): the sharded checkpoint.
    let e = f.generate(REPO, &["--revision", "v2"], &[("HF_HUB_OFFLINE", "1")]).unwrap_err();
    assert!(e.contains("HF_HUB_OFFLINE") && e.contains(REPO) && e.contains("'v2'"), "{e}");
    assert_eq!(f.generate(REPO, &["--revision", "v2"], &[]).unwrap(), want_v2);
    let snap2 = f.snapshot(REPO, "v2");
    for file in ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    {
        assert!(snap2.join(file).is_file(), "{file} missing from {}", snap2.display());
    }
    assert!(!snap2.join("model.safetensors").exists());
    assert_eq!(f.generate(REPO, &[], &[("SELFPLAY_REVISION", "v2"), ("HF_HUB_OFFLINE", "1")]).unwrap(), want_v2);
    // A commit hash is a revision too, offline included.
    let sha = commit_sha("main");
    assert_eq!(f.generate(REPO, &["--revision", &sha], &[("HF_HUB_OFFLINE", "1")]).unwrap(), want_main);

    // A cache made incomplete is named, not loaded.
    std::fs::remove_file(snap2.join("model-00002-of-00002.safetensors")).unwrap();
    let e = f.generate(REPO, &["--revision", "v2"], &[("HF_HUB_OFFLINE", "1")]).unwrap_err();
    assert!(e.contains("missing model-00002-of-00002.safetensors"), "{e}");
    // Online, only the missing shard comes again.
    let before = f.hub.requests();
    assert_eq!(f.generate(REPO, &["--revision", "v2"], &[]).unwrap(), want_v2);
    // The revision lookup, then the shard's metadata and its body.
    assert_eq!(f.hub.requests(), before + 3);
}

#[test]
fn hub_errors_name_the_repository_and_the_cause() {
    let f = fixture();
    // Private repository: no token, a wrong token, the right one.
    let e = f.generate(PRIVATE, &[], &[]).unwrap_err();
    assert!(e.contains(PRIVATE) && e.contains("401") && e.contains("set HF_TOKEN"), "{e}");
    let e = f.generate(PRIVATE, &[], &[("HF_TOKEN", "hf_wrong")]).unwrap_err();
    assert!(e.contains(PRIVATE) && e.contains("token") && e.contains("refused"), "{e}");
    assert!(!f.snapshot(PRIVATE, "private").exists(), "a refused download left files");
    let want = f.generate(local(&f.main), &[], &[]).unwrap();
    assert_eq!(f.generate(PRIVATE, &[], &[("HF_TOKEN", TOKEN)]).unwrap(), want);
    // The token file under HF_HOME works as HF_TOKEN does.
    std::fs::write(f.hf_home().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::remove_dir_all(f.hf_home().join("hub")).unwrap();
    assert_eq!(f.generate(PRIVATE, &[], &[]).unwrap(), want);
    std::fs::remove_file(f.hf_home().join("token")).unwrap();

    let e = f.generate("test-org/no-such-model", &[], &[]).unwrap_err();
    assert!(e.contains("'test-org/no-such-model' not found"), "{e}");
    let e = f.generate(REPO, &["--revision", "no-such-branch"], &[]).unwrap_err();
    assert!(e.contains("revision 'no-such-branch'") && e.contains(REPO), "{e}");
    let e = f.generate("./no/such/dir", &[], &[]).unwrap_err();
    assert!(e.contains("neither an existing local directory nor a Hugging Face Hub id"), "{e}");
    let e = f.generate(REPO, &[], &[("HF_ENDPOINT", "http://127.0.0.1:1")]).unwrap_err();
    assert!(e.contains("cannot reach") && e.contains("127.0.0.1:1"), "{e}");
}

#[test]
fn a_run_config_takes_hub_ids_and_a_revision() {
    let f = fixture();
    let out_dir = f.dir.join("run");
    let cfg = format!(
        "[run]\nsteps = 1\nout_dir = {:?}\n[model]\npath = \"{REPO}\"\nrevision = \"v2\"\ndevice = \"cpu\"\n\
         [game]\nmode = \"lsp\"\nqueries_per_step = 2\ngroup_size = 2\n[challenger]\nmax_new_tokens = 6\n\
         [solver]\nmax_new_tokens = 8\n[self_reward]\nmode = \"expected\"\n[reward]\nkind = \"model\"\n\
         path = \"test-org/tiny-rm\"\n[optim]\nlr = 1e-3\ngrad_accum = 1\n",
        local(&out_dir),
    );
    let cfg_path = f.dir.join("run.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = f.run(&["train", "--config", local(&cfg_path), "--metrics-addr", "127.0.0.1:0"], &[]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // The run's config.toml names the snapshots it loaded: v2 of the policy, main of the RM.
    let written = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    for snap in [f.snapshot(REPO, "v2"), f.snapshot("test-org/tiny-rm", "rm")] {
        assert!(written.contains(&format!("path = {:?}", local(&snap))), "{} not in\n{written}", snap.display());
        assert!(snap.join("model.safetensors").is_file() || snap.join("model.safetensors.index.json").is_file());
    }
    assert!(log.contains("model from the Hugging Face Hub"), "{log}");

    // A Hub id that does not exist fails before anything starts, naming the key.
    let out = f.run(
        &[
            "train",
            "--config",
            local(&cfg_path),
            "--set",
            "model.path=\"test-org/missing\"",
            "--set",
            "run.out_dir=\"x\"",
        ],
        &[],
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(e.contains("model.path") && e.contains("'test-org/missing' not found"), "{e}");
}
