//! Redis Streams sink (and dead-letter sink): one script per batch that
//! XADDs its entries in order, with an approximate MAXLEN trim when the spec
//! sets one. `write` returns once the script ran, so the batch is in the
//! stream (as durable as the server's persistence settings make it).
//!
//! A script, not a pipeline of XADDs, because a script runs whole or not at
//! all. A restarted server answers `LOADING` to the commands that reach it
//! while it reads its append-only file and runs the ones after: a pipeline
//! caught there wrote the end of its batch and not the start, the retry
//! wrote the start after the end, and a key's outputs were out of order
//! (`connectors_redis server_restart_mid_stream_recovers_by_itself` failed
//! so in 2 of 37 runs before this, none of 25 after).
//!
//! Each message becomes an entry: `payload` (the bytes), `key` (when set),
//! and one field per header (dead letters carry their `sluice-*` headers so).
//!
//! With `dedupe`, the script first sets a marker key for each entry's id
//! (`SET NX PX window`) and adds the entry only if the marker was new: a
//! redelivered input's outputs are written once, and the marker and the
//! entry are written together or not at all. The id is the one the NATS sink
//! sends as `Nats-Msg-Id`.

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
    /// `dedupe.window` in milliseconds.
    dedupe_window_ms: Option<u64>,
    /// [`WRITE_BATCH`].
    script: redis::Script,
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
            dedupe_window_ms: spec.dedupe.as_ref().map(|d| d.window.as_std().as_millis().max(1) as u64),
            script: redis::Script::new(WRITE_BATCH),
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
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = self.script.key(&self.stream);
        invocation
            .arg(self.dedupe_window_ms.map_or(String::new(), |ms| ms.to_string()))
            .arg(self.max_len.map_or(String::new(), |n| n.to_string()));
        for m in batch {
            let payload = m.payload.to_bytes();
            if self.dedupe_window_ms.is_some() {
                let id = super::nats::message_id(m, &payload);
                invocation.key(format!("sluice:dedupe:{{{}}}:{id}", self.stream));
            }
            let fields = self.fields(m, &payload);
            invocation.arg(fields.len());
            for (k, v) in fields {
                invocation.arg(k).arg(v);
            }
        }
        // EVALSHA, loading the script first where the server does not have
        // it (a restarted server has forgotten it).
        let _: redis::Value = invocation.invoke_async(&mut self.conn).await.map_err(|e| SinkError::Broker {
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

/// KEYS: the stream, then (with dedupe) one marker per entry, in order.
/// ARGV: the dedupe window in ms or "", MAXLEN or "", then per entry its
/// number of fields and its field/value pairs. Returns the entries added.
const WRITE_BATCH: &str = r#"
local window, maxlen = ARGV[1], ARGV[2]
local i, entry, added = 3, 0, 0
while i <= #ARGV do
  entry = entry + 1
  local first, last = i + 1, i + 2 * tonumber(ARGV[i])
  i = last + 1
  if window == '' or redis.call('SET', KEYS[1 + entry], '', 'NX', 'PX', window) then
    if maxlen ~= '' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, last))
    else
      redis.call('XADD', KEYS[1], '*', unpack(ARGV, first, last))
    end
    added = added + 1
  end
end
return added
"#;

impl Sink for RedisSink {
    fn write<'a>(&'a mut self, batch: &'a [Message]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write_batch(batch))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}
