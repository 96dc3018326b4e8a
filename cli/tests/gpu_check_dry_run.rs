//! scripts/gpu_check.sh is run on a GPU machine that is lent rarely; its dry run on the CPU
//! (DEVICE=cpu) runs every step of it here, so that the script cannot rot between loans.
use std::path::Path;
use std::process::Command;

#[test]
fn gpu_check_script_dry_run_passes_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = tempfile::tempdir().unwrap();
    let results = work.path().join("results");
    let python = std::env::var("SELFPLAY_PYTHON").expect("SELFPLAY_PYTHON is not set: run through scripts/test.sh");
    let out = Command::new("bash")
        .arg(root.join("scripts/gpu_check.sh"))
        .arg(&results)
        .env("DEVICE", "cpu")
        .env("SELFPLAY_BIN", env!("CARGO_BIN_EXE_selfplay"))
        .env("PYTHON", python)
        .env("WORK", work.path().join("work"))
        .output()
        .unwrap();
    let log = std::fs::read_to_string(results.join("gpu_check.log")).unwrap_or_default();
    assert!(out.status.success(), "gpu_check.sh failed:\n{log}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(results.join("gpu_check.json")).unwrap()).unwrap();
    let checks = v["checks"].as_array().expect("checks in gpu_check.json");
    assert!(checks.len() >= 10, "{checks:?}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{checks:?}");
    // The one-read-per-token and continuous-batching checks ran on the real path.
    let greedy = checks.iter().find(|c| c["check"] == "greedy_dev_f32_equals_cpu_f32").unwrap();
    assert!(greedy["refills"].as_u64().unwrap() > 0);
}
