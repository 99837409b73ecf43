//! Redis Streams sink (and dead-letter sink): one pipelined round trip of
//! XADDs per batch, with an approximate MAXLEN trim when the spec sets one.
//! `write` returns once Redis answered every XADD, so the batch is in the
//! stream (as durable as the server's persistence settings make it).
//!
//! Each message becomes an entry: `payload` (the bytes), `key` (when set),
//! and one field per header (dead letters carry their `sluice-*` headers so).
//!
//! With `dedupe`, each XADD runs in a small script that first sets a marker
//! key for the entry's id (`SET NX PX window`) and adds the entry only if the
//! marker was new: a redelivered input's outputs are written once, and the
//! marker and the entry are written together or not at all (a script runs
//! atomically). The id is the one the NATS sink sends as `Nats-Msg-Id`.

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use sluice_crds::RedisSink as RedisSinkSpec;

use super::{Sink, SinkError};
use crate::{
    message::Message,
    source::redis::{client_at, connect, is_auth_error, is_tls_error, redacted},
};

pub struct RedisSink {
    conn: ConnectionManager,
    stream: String,
    max_len: Option<i64>,
    /// `dedupe.window` in milliseconds, and the script that honours it.
    dedupe: Option<(u64, redis::Script)>,
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
        let client = client_at(&spec.url, place, spec.tls.as_ref(), field, env)
            .map_err(|detail| SinkError::Config { field, detail })?;
        let conn = connect(client, std::time::Duration::from_secs(10))
            .map_err(|e| SinkError::Config { field, detail: e.to_string() })?;
        tracing::info!(stream = %spec.stream, max_len = ?spec.max_len, "Redis Streams sink configured");
        Ok(Self {
            conn,
            stream: spec.stream.clone(),
            max_len: spec.max_len,
            dedupe: spec
                .dedupe
                .as_ref()
                .map(|d| (d.window.as_std().as_millis().max(1) as u64, redis::Script::new(DEDUPE_XADD))),
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

    /// The entry's field/value pairs.
    fn fields<'m>(&'m self, m: &'m Message, payload: &'m [u8]) -> Vec<(&'m str, &'m [u8])> {
        let mut out = vec![("payload", payload)];
        if let Some(k) = &m.key {
            out.push(("key", k.as_slice()));
        }
        for (k, v) in m.headers.iter().chain(&self.extra_fields) {
            if k != "payload" && k != "key" {
                out.push((k.as_str(), v.as_slice()));
            }
        }
        out
    }

    async fn write_batch(&mut self, batch: &[Message]) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        if let Some((_, script)) = &self.dedupe {
            // Loaded with every batch: a restarted server has forgotten it.
            pipe.load_script(script).ignore();
        }
        for m in batch {
            let payload = m.payload.to_bytes();
            let fields = self.fields(m, &payload);
            if let Some((window_ms, script)) = &self.dedupe {
                let id = super::nats::message_id(m, &payload);
                let mut invocation = script.key(format!("sluice:dedupe:{{{}}}:{id}", self.stream));
                invocation.key(&self.stream).arg(*window_ms).arg(self.max_len.map_or(String::new(), |n| n.to_string()));
                for (k, v) in fields {
                    invocation.arg(k).arg(v);
                }
                pipe.invoke_script(&invocation);
                continue;
            }
            let cmd = pipe.cmd("XADD").arg(&self.stream);
            if let Some(n) = self.max_len {
                cmd.arg("MAXLEN").arg("~").arg(n);
            }
            cmd.arg("*");
            for (k, v) in fields {
                cmd.arg(k).arg(v);
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
            } else if is_tls_error(&e) {
                format!(
                    "TLS with Redis at {} failed ({e}): check {}.tls (caSecretRef, clientCertSecretName)",
                    self.url, self.field
                )
            } else {
                format!("XADD of {} entries: {e}", batch.len())
            },
        })?;
        Ok(())
    }
}

/// KEYS: the marker, the stream. ARGV: the window (ms), MAXLEN or "", then
/// the entry's field/value pairs. Returns the entry id, or nil for a duplicate.
const DEDUPE_XADD: &str = r#"
if not redis.call('SET', KEYS[1], '', 'NX', 'PX', ARGV[1]) then
  return false
end
if ARGV[2] ~= '' then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
"#;

impl Sink for RedisSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
