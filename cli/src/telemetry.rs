//! `/metrics` (Prometheus text format) and `/health` over HTTP, for every role.
use anyhow::Result;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Installs the process-wide Prometheus recorder (once) and serves it with a health flag.
pub struct Telemetry {
    pub addr: SocketAddr,
    pub healthy: Arc<AtomicBool>,
}

const SECONDS_BUCKETS: [f64; 14] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const VALUE_BUCKETS: [f64; 16] =
    [-10.0, -5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 20.0, 50.0];

pub async fn serve(addr: &str) -> Result<Telemetry> {
    let handle: PrometheusHandle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_steps".into()), &[0.0, 1.0, 2.0, 3.0, 4.0, 8.0, 16.0])?
        .set_buckets(&VALUE_BUCKETS)?
        .install_recorder()?;
    selfplay_proto::auth::describe_metrics();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let healthy = Arc::new(AtomicBool::new(true));
    let h2 = healthy.clone();
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
                async move { h.render() }
            }),
        )
        .route(
            "/health",
            axum::routing::get(move || {
                let ok = h2.load(Ordering::SeqCst);
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics and /health");
    Ok(Telemetry { addr: bound, healthy })
}
