//! Redis Streams sink (and dead-letter sink): one pipelined round trip of
//! XADDs per batch, with an approximate MAXLEN trim when the spec sets one.
//! `write` returns once Redis answered every XADD, so the batch is in the
//! stream (as durable as the server's persistence settings make it).
//!
//! Each message becomes an entry: `payload` (the bytes), `key` (when set),
//! and one field per header (dead letters carry their `sluice-*` headers so).

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use sluice_crds::RedisSink as RedisSinkSpec;

use super::{Sink, SinkError};
use crate::{
    message::Message,
    source::redis::{client, connect, is_auth_error, redacted},
};

pub struct RedisSink {
    conn: ConnectionManager,
    stream: String,
    max_len: Option<i64>,
    /// Added to every entry (the dead-letter sink names the source here).
    extra_fields: Vec<(String, Vec<u8>)>,
    /// For errors: the URL without a password, and the spec field of the sink.
    url: String,
    field: &'static str,
}

impl RedisSink {
    /// `place`: `SINK` or `DEADLETTER` (which password variable to read).
    pub fn new(
        spec: &RedisSinkSpec,
        place: &str,
        field: &'static str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SinkError> {
        let client = client(&spec.url, &format!("SLUICE_SECRET_{place}_REDIS_PASSWORD"), field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        let conn = connect(client, std::time::Duration::from_secs(10))
            .map_err(|e| SinkError::Config { field, detail: e.to_string() })?;
        tracing::info!(stream = %spec.stream, max_len = ?spec.max_len, "Redis Streams sink configured");
        Ok(Self {
            conn,
            stream: spec.stream.clone(),
            max_len: spec.max_len,
            extra_fields: Vec::new(),
            url: redacted(&spec.url),
            field,
        })
    }

    /// Adds a field to every entry this sink writes.
    pub fn with_field(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.extra_fields.push((name.to_string(), value.into()));
        self
    }

    async fn write_batch(&mut self, batch: &[Message]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        for m in batch {
            let cmd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(n) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*").arg("payload").arg(m.payload.to_bytes().as_ref());
            if let Some(k) = &m.key {
                cmd.arg("key").arg(k.as_slice());
            }
            for (k, v) in m.headers.iter().chain(&self.extra_fields) {
                if k != "payload" && k != "key" {
                    cmd.arg(k).arg(v.as_slice());
                }
            }
        }
        let _: Vec<redis::Value> = pipe.query_async(&mut self.conn).await.map_err(|e| SinkError::Broker {
            kind: "redis",
            target: self.stream.clone(),
            detail: if is_auth_error(&e) {
                format!(
                    "Redis at {} refused the login ({e}): check {}.passwordSecretRef and the Secret it names",
                    self.url, self.field
                )
            } else {
                format!("XADD of {} entries: {e}", batch.len())
            },
        })?;
        Ok(())
    }
}

impl Sink for RedisSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
