//! One HTTP port: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(|State(m): State<Metrics>| async move { m.render() }))
        .route("/healthz", get(|| async { (StatusCode::OK, "ok") }))
        // A standby replica is ready too: it serves metrics and takes over on failover.
        .route("/readyz", get(|| async { (StatusCode::OK, "ok") }))
        .with_state(metrics);
    let listener = TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
