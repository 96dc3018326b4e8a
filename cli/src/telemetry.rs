//! `/metrics` (Prometheus text format) and `/health` over HTTP, for every role.
use anyhow::Result;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;

/// Installs the process-wide Prometheus recorder (once) and serves it with a health flag.
pub struct Telemetry {
    pub addr: SocketAddr,
}

const SECONDS_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const VALUE_BUCKETS: [f64; 16] =
    [-10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 20.0, 50.0];

#[derive(Clone, Copy)]
enum Probe {
    Overall,
    Ready,
    Live,
}

fn probe(which: Probe) -> (axum::http::StatusCode, [(axum::http::header::HeaderName, &'static str); 1], String) {
    let r = selfplay_proto::health::health().report();
    let ok = match which {
        Probe::Overall | Probe::Ready => r.ready && r.live,
        // A role that is shutting down is still alive: let it finish.
        Probe::Live => r.live,
    };
    let body = serde_json::json!({
        "state": r.state(),
        "ready": r.ready,
        "live": r.live,
        "waiting_for": r.waiting_for,
        "stalled": r.stalled.iter().map(|(n, s)| serde_json::json!({"loop": n, "seconds_without_progress": s})).collect::<Vec<_>>(),
    });
    let code = if ok { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    (code, [(axum::http::header::CONTENT_TYPE, "application/json")], format!("{body}\n"))
}

pub async fn serve(addr: &str) -> Result<Telemetry> {
    let handle: PrometheusHandle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_steps".into()), &[0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0])?
        .set_buckets(&VALUE_BUCKETS)?
        .install_recorder()?;
    selfplay_proto::auth::describe_metrics();
    describe_process_metrics();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let h = handle.clone();
                async move {
                    record_process_metrics();
                    h.render()
                }
            }),
        )
        // Readiness: the role serves and its model and state are loaded. Liveness: no busy
        // main loop has gone without progress for longer than --stall-after-s. /health tells
        // which condition holds (200 when ready).
        .route("/health", axum::routing::get(|| async { probe(Probe::Overall) }))
        .route("/health/ready", axum::routing::get(|| async { probe(Probe::Ready) }))
        .route("/health/live", axum::routing::get(|| async { probe(Probe::Live) }));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics, /health, /health/ready and /health/live");
    Ok(Telemetry { addr: bound })
}

/// Process metrics of the serving process (every role): CPU seconds, resident and virtual
/// memory, open and maximum file descriptors, threads and start time, named
/// `selfplay_process_*` and refreshed at every scrape of /metrics (`metrics-process`, the
/// Prometheus Go client's process collector rewritten in Rust).
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: std::sync::OnceLock<metrics_process::Collector> = std::sync::OnceLock::new();
    COLLECTOR.get_or_init(|| metrics_process::Collector::new("selfplay_"))
}

fn describe_process_metrics() {
    process_collector().describe();
}

fn record_process_metrics() {
    process_collector().collect();
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn process_metrics_are_plausible() {
        let m = metrics_process::collector::collect();
        let rss = m.resident_memory_bytes.expect("resident memory on Linux");
        // A test binary linked against libtorch: more than a megabyte, less than a terabyte.
        assert!(rss > 1 << 20 && rss < 1 << 40, "rss {rss}");
        assert!(m.threads.expect("threads on Linux") >= 1);
        assert!(m.open_fds.expect("open files on Linux") >= 3);
        assert!(m.cpu_seconds_total.expect("CPU time on Linux") >= 0.0);
    }
}
