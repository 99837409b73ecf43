//! One HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (consuming: not during startup or shutdown, and the
//! source's broker answers; a sink outage turns it false through the retry
//! layer). Served by axum, as the operator's port is.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    routing::get,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct Health {
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    /// False while the source's broker does not answer.
    pub source_up: Arc<AtomicBool>,
}

/// Bind first (so a taken port is reported at startup), then serve until cancelled.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, health: Health, shutdown: CancellationToken) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.metrics.render())
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|State(h): State<Health>| async move { readiness(&h) }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n") })
        .with_state(health);
    let stopped = async move { shutdown.cancelled().await };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped).await {
        tracing::warn!(error = %e, "the HTTP server stopped");
    }
}

fn readiness(h: &Health) -> (StatusCode, &'static str) {
    if !h.source_up.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "source unreachable\n")
    } else if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request written in `pieces` separate writes, as a client may.
    async fn get_in(addr: SocketAddr, path: &str, pieces: usize) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let step = request.len().div_ceil(pieces);
        for chunk in request.as_bytes().chunks(step) {
            c.write_all(chunk).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        get_in(addr, path, 1).await
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Metrics::new(prometheus::Registry::new()).unwrap();
        let ready = Arc::new(AtomicBool::new(false));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            Health { metrics, ready: ready.clone(), source_up: Arc::new(AtomicBool::new(true)) },
            stop.clone(),
        ));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.store(true, Ordering::Relaxed);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("sluice_messages_dead_lettered_total{reason=\"late\"} 0"), "{m}");
        // A request that arrives in pieces is answered too (the hand-written
        // responder this replaced read once and reset such connections).
        assert!(get_in(addr, "/readyz", 4).await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        stop.cancel();
        server.await.unwrap();
    }
}
