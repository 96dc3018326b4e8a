//! Helpers shared by the policy integration tests: the reference Python and the real model.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter with torch and transformers (set by scripts/env.sh). A missing
/// interpreter fails the test: a parity test that silently passes checks nothing.
pub fn python() -> PathBuf {
    PathBuf::from(std::env::var("SELFPLAY_PYTHON").expect(
        "SELFPLAY_PYTHON is not set: run the tests through scripts/test.sh (see README)",
    ))
}

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python").join(name)
}

pub fn run_python(script_name: &str, args: &[&str]) {
    let out = Command::new(python())
        .arg(script(script_name))
        .args(args)
        .output()
        .expect("cannot start python");
    assert!(
        out.status.success(),
        "python {script_name} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The imported SmolLM2-135M-Instruct directory (made by the setup).
pub fn smollm2_dir() -> PathBuf {
    let p = PathBuf::from(std::env::var("SELFPLAY_MODEL").expect(
        "SELFPLAY_MODEL is not set: run the tests through scripts/test.sh (see README)",
    ));
    assert!(p.join("model.safetensors").exists(), "{} has no imported model", p.display());
    p
}
