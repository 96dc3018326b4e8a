//! A local Hugging Face Hub for the tests: a small HTTP/1.1 server that serves model
//! directories in the Hub's URL layout, with the headers `hf-hub` reads.
//!
//! - `GET /api/models/{org}/{name}/revision/{rev}`: `{"sha": commit, "siblings": [{"rfilename"}]}`;
//! - `GET /{org}/{name}/resolve/{rev}/{file}`: the file, with `etag`, `x-repo-commit`, and for a
//!   `Range: bytes=a-[b]` request a 206 with `content-range: bytes a-b/size`.
//!
//! As the Hub does, errors carry `x-error-code` (`RepoNotFound`, `RevisionNotFound`,
//! `EntryNotFound`), and a repository with a token answers 401 to requests without
//! `Authorization: Bearer <token>`.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One repository: revisions (names, and their commit) mapped to directories.
#[derive(Clone, Debug)]
pub struct HubRepo {
    pub id: String,
    /// Required bearer token, if any.
    pub token: Option<String>,
    /// (commit sha, names that point at it besides the sha itself, directory).
    pub revisions: Vec<(String, Vec<String>, PathBuf)>,
}

impl HubRepo {
    fn revision(&self, rev: &str) -> Option<(&str, &Path)> {
        self.revisions
            .iter()
            .find(|(sha, names, _)| sha == rev || names.iter().any(|n| n == rev))
            .map(|(sha, _, dir)| (sha.as_str(), dir.as_path()))
    }
}

/// A running local Hub; it serves until the process ends.
pub struct HubServer {
    pub endpoint: String,
    requests: Arc<AtomicUsize>,
}

impl HubServer {
    pub fn start(repos: Vec<HubRepo>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the local hub");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let (repos, count) = (Arc::new(repos), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (repos, count) = (repos.clone(), count.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &repos, &count);
                });
            }
        });
        HubServer { endpoint, requests }
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A commit sha made from a label (40 hex digits, as the Hub's).
pub fn commit_sha(label: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut out = String::new();
    for round in 0..3u8 {
        for b in label.bytes().chain([round]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out[..40].to_string()
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

fn serve(conn: TcpStream, repos: &[HubRepo], count: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    let mut w = conn;
    let reply = |w: &mut TcpStream, status: &str, extra: &[(&str, String)], body: &[u8]| -> std::io::Result<()> {
        let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())?;
        w.write_all(body)?;
        w.flush()
    };
    let error = |w: &mut TcpStream, status: &str, code: &str| {
        reply(w, status, &[("x-error-code", code.to_string())], format!("{{\"error\":\"{code}\"}}").as_bytes())
    };

    // /api/models/{org}/{name}/revision/{rev} or /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (api, repo_id, rev, file) = match parts.as_slice() {
        ["api", "models", org, name, "revision", rev] => (true, format!("{org}/{name}"), rev.replace("%2F", "/"), None),
        [org, name, "resolve", rev, file @ ..] if !file.is_empty() => {
            (false, format!("{org}/{name}"), rev.replace("%2F", "/"), Some(file.join("/")))
        }
        _ => return error(&mut w, "404 Not Found", "EntryNotFound"),
    };
    let Some(repo) = repos.iter().find(|r| r.id == repo_id) else {
        return error(&mut w, "404 Not Found", "RepoNotFound");
    };
    if let Some(token) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return reply(
                &mut w,
                "401 Unauthorized",
                &[],
                b"{\"error\":\"Invalid credentials in Authorization header\"}",
            );
        }
    }
    let Some((sha, dir)) = repo.revision(&rev) else {
        return error(&mut w, "404 Not Found", "RevisionNotFound");
    };
    if api {
        let siblings: Vec<_> = files_of(dir).into_iter().map(|f| serde_json::json!({"rfilename": f})).collect();
        let body = serde_json::json!({"id": repo.id, "sha": sha, "siblings": siblings}).to_string();
        return reply(&mut w, "200 OK", &[("content-type", "application/json".into())], body.as_bytes());
    }
    let file = file.unwrap();
    let p = dir.join(&file);
    if file.contains("..") || !p.is_file() {
        return error(&mut w, "404 Not Found", "EntryNotFound");
    }
    let mut data = Vec::new();
    std::fs::File::open(&p)?.read_to_end(&mut data)?;
    let etag = format!("\"{}\"", commit_sha(&format!("{}:{}", p.display(), data.len())));
    let mut extra = vec![("etag", etag), ("x-repo-commit", sha.to_string())];
    match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(range) => {
            let (a, b) = range.split_once('-').unwrap_or((range, ""));
            let size = data.len();
            let a: usize = a.parse().unwrap_or(0);
            let last = size.saturating_sub(1);
            let b: usize = if b.is_empty() { last } else { b.parse::<usize>().unwrap_or(0).min(last) };
            if a >= size && size > 0 {
                extra.push(("content-range", format!("bytes */{size}")));
                return reply(&mut w, "416 Range Not Satisfiable", &extra, b"");
            }
            extra.push(("content-range", format!("bytes {a}-{b}/{size}")));
            let body = if size == 0 { &[][..] } else { &data[a..=b] };
            reply(&mut w, "206 Partial Content", &extra, body)
        }
        None => reply(&mut w, "200 OK", &extra, &data),
    }
}

/// Splits a directory's `model.safetensors` into `n` shards (whole tensors, in header order)
/// with a `model.safetensors.index.json`, as `save_pretrained` does for large models.
pub fn shard_safetensors(dir: &Path, n: usize) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + hlen]).unwrap();
    let data = &bytes[8 + hlen..];
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    let per = names.len().div_ceil(n);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let mut h = serde_json::Map::new();
        h.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut body = Vec::new();
        for name in chunk {
            let t = &header[name.as_str()];
            let off = &t["data_offsets"];
            let (a, b) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
            let start = body.len();
            body.extend_from_slice(&data[a..b]);
            h.insert(
                (*name).clone(),
                serde_json::json!({"dtype": t["dtype"], "shape": t["shape"], "data_offsets": [start, body.len()]}),
            );
            weight_map.insert((*name).clone(), serde_json::json!(file));
        }
        let mut text = serde_json::Value::Object(h).to_string();
        // The header is padded to 8 bytes, as the safetensors writers do.
        text.push_str(&" ".repeat((8 - text.len() % 8) % 8));
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&body);
        std::fs::write(dir.join(&file), out).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": data.len()}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(&path).unwrap();
}
