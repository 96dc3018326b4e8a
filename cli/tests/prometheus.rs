//! A real Prometheus (Debian's package, installed by scripts/setup.sh) scrapes a running
//! `selfplay train`; its HTTP API must show the learner's step counter increasing and the
//! actors' token counter positive. Every metric the dashboard and the alert rules use must be
//! documented in docs/metrics.md and present on the live /metrics.
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Scalar value of an instant query, if there is one.
fn query(prom: &str, q: &str) -> Option<f64> {
    let body = http_get(prom, &format!("/api/v1/query?query={}", q.replace(' ', "%20")));
    // A chunked response may wrap the JSON; find the JSON object.
    let start = body.find('{')?;
    let end = body.rfind('}')?;
    let v: serde_json::Value = serde_json::from_str(&body[start..=end]).ok()?;
    let r = v["data"]["result"].as_array()?;
    r.first()?["value"][1].as_str()?.parse().ok()
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("selfplay_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"].iter().fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        if name.len() > "selfplay_".len() {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn prometheus_scrapes_a_live_train_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (model, rm) = (dir.join("model"), dir.join("rm"));
    std::fs::create_dir_all(&model).unwrap();
    std::fs::create_dir_all(&rm).unwrap();
    selfplay_tests::tiny_model(&model, "gqa_tied", 7);
    selfplay_tests::tiny_reward_model(&rm, "gqa_tied", 8);
    let cfg = format!(
        "[run]\nsteps = 0\nout_dir = {:?}\ncheckpoint_every = 2\n[model]\npath = {:?}\ndevice = \"cpu\"\n\
         [game]\nmode = \"lsp\"\nqueries_per_step = 2\ngroup_size = 2\n[challenger]\nmax_new_tokens = 6\n\
         [solver]\nmax_new_tokens = 8\n[self_reward]\nmode = \"expected\"\n[reward]\nkind = \"model\"\npath = {:?}\n\
         [optim]\nlr = 1e-3\ngrad_accum = 1\n",
        dir.join("run").to_str().unwrap(),
        model.to_str().unwrap(),
        rm.to_str().unwrap()
    );
    std::fs::write(dir.join("run.toml"), cfg).unwrap();
    // The tiny tokenizer has no single-token digits: expected-mode self-reward needs them.
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap()).unwrap();
    tc["chat_template"] = serde_json::json!("{% for m in messages %}t3 {{ m['content'] }} t4 {% endfor %}t3 ");
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let tok = dir.join("model/tokenizer.json");
    let mut tj: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tok).unwrap()).unwrap();
    for d in 0..8 {
        tj["model"]["vocab"][d.to_string()] = serde_json::json!(200 + d);
    }
    std::fs::write(&tok, tj.to_string()).unwrap();

    let ready = dir.join("train.ready");
    let log = std::fs::File::create(dir.join("train.log")).unwrap();
    let _train = Kill(
        Command::new(env!("CARGO_BIN_EXE_selfplay"))
            .args(["--threads", "1", "train", "--config", dir.join("run.toml").to_str().unwrap()])
            .args(["--metrics-addr", "127.0.0.1:0", "--ready-file", ready.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let metrics_addr = loop {
        if let Some(v) =
            std::fs::read_to_string(&ready).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            break v["metrics"].as_str().unwrap().to_string();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "train never became ready");
        std::thread::sleep(Duration::from_millis(50));
    };

    let port = free_port();
    let prom_addr = format!("127.0.0.1:{port}");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: selfplay\n    static_configs:\n      - targets: ['{metrics_addr}']\n"),
    )
    .unwrap();
    let _prom = Kill(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed by scripts/setup.sh"),
    );

    // The learner's step counter increases between two scrapes; actors generated tokens.
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let increased = loop {
        if let Some(v) = query(&prom_addr, "selfplay_learner_steps_total") {
            match first {
                None => first = Some(v),
                Some(f) if v > f => break (f, v),
                _ => {}
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no increase of selfplay_learner_steps_total seen through Prometheus (first {first:?}):\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let tokens = query(&prom_addr, "selfplay_actor_tokens_generated_total").unwrap_or(0.0);
    assert!(tokens > 0.0, "actors' token counter through Prometheus: {tokens}");
    let up = query(&prom_addr, "up").unwrap_or(0.0);
    assert_eq!(up, 1.0);
    eprintln!("steps_total {} -> {}, tokens {tokens}", increased.0, increased.1);

    // Every metric used by the dashboard and the alerts is documented and live.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let used: BTreeSet<String> = ["deploy/grafana/selfplay.json", "deploy/prometheus/alerts.yml"]
        .iter()
        .flat_map(|f| metric_names(&std::fs::read_to_string(root.join(f)).unwrap()))
        .collect();
    assert!(used.len() > 20, "found only {used:?}");
    let documented = metric_names(&std::fs::read_to_string(root.join("docs/metrics.md")).unwrap());
    let undocumented: Vec<_> = used.difference(&documented).collect();
    assert!(undocumented.is_empty(), "used but not in docs/metrics.md: {undocumented:?}");
    // Wait for a weights version to be fetched and a checkpoint, then compare with the live set.
    let t0 = Instant::now();
    loop {
        let live = metric_names(&http_get(&metrics_addr, "/metrics"));
        let missing: Vec<_> = used.difference(&live).cloned().collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "used by the dashboard or alerts but not on a live /metrics: {missing:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
