//! One HTTP port: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive), `/readyz` (consuming: not during startup or shutdown, and the
//! source's broker answers; a sink outage turns it false through the retry
//! layer).
//!
//! Three fixed GET routes need no framework: a minimal HTTP/1.1 responder
//! that reads the request line, answers, and closes.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
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
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed; going on");
                    continue;
                }
            },
        };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = respond(path, &health);
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

fn respond(path: &str, h: &Health) -> (&'static str, &'static str, String) {
    match path {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", h.metrics.render()),
        "/healthz" => ("200 OK", "text/plain", "ok\n".into()),
        "/readyz" if !h.source_up.load(Ordering::Relaxed) => {
            ("503 Service Unavailable", "text/plain", "source unreachable\n".into())
        }
        "/readyz" if h.ready.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".into()),
        "/readyz" => ("503 Service Unavailable", "text/plain", "not consuming\n".into()),
        _ => ("404 Not Found", "text/plain", "try /metrics, /healthz or /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
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
        stop.cancel();
        server.await.unwrap();
    }
}
