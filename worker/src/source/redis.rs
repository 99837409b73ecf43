//! Redis Streams source: one consumer (the pod's name) in a consumer group.
//!
//! ```text
//! start: XGROUP CREATE (MKSTREAM; `$` for latest, `0` for earliest)
//!        XREADGROUP ... STREAMS s 0    our own pending entries first (a restarted pod;
//!                                      again after any failed read); those deleted
//!                                      from the stream meanwhile are XACKed
//! loop:  XAUTOCLAIM every claimIdle/2  entries idle past claimIdle (a dead pod's)
//!        XREADGROUP COUNT max BLOCK 1s STREAMS s >
//!   each entry ──> Message{partition 0, offset = local sequence, key, payload, headers}
//! acker: commit(0, next) ──> XACK every entry handed out below `next`
//! every claimIdle/4 (a task of its own): XCLAIM ... JUSTID our own entries
//!   held that long (an open window's), so no other pod takes them, even
//!   while this worker waits on a slow sink
//! release (end of the run): XCLAIM ... IDLE <long> JUSTID what is still
//!   held, so another pod's next XAUTOCLAIM takes it instead of after claimIdle
//! ```
//!
//! Offsets are a local sequence rather than the stream ids: claimed entries
//! are older than entries already read, and the offset tracker needs
//! offsets that only grow. The acker maps the sequence back to stream ids.
//!
//! Entry fields: `payload` is the payload, `key` the key, other fields are
//! headers; an entry without `payload` becomes a JSON object of its fields.
//! The stream id travels in the `redis-id` header (dead letters name it).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use redis::{Client, IntoConnectionInfo, Value, aio::ConnectionManager, aio::ConnectionManagerConfig};
use sluice_crds::{RedisSource as RedisSourceSpec, StartFrom};
use tokio::time::Instant;

use super::{AbortOnDrop, Acker, Source, SourceError, SourceEvent};
use crate::{
    message::{Message, Payload, now_ms},
    retry::Backoff,
};

pub const HEADER_REDIS_ID: &str = "redis-id";
/// How long one XREADGROUP blocks waiting for entries.
const BLOCK: Duration = Duration::from_secs(1);

/// Opens a client for the Redis object at `field` (`spec.source.redis`, ...)
/// whose secrets the operator puts in `SLUICE_SECRET_<place>_*`: the
/// password (`_REDIS_PASSWORD`) and, with `tls`, the CA (`_TLS_CA`) and the
/// client certificate (`_TLS_CERT`, `_TLS_KEY`). A `rediss://` URL is TLS
/// (the system roots unless `tls` names a CA).
pub fn client_at(
    url: &str,
    place: &str,
    tls: Option<&sluice_crds::Tls>,
    field: &'static str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Client, String> {
    let var = |what: &str| format!("SLUICE_SECRET_{place}_{what}");
    let get = |what: &str, spec: &str| {
        env(&var(what)).ok_or_else(|| {
            format!(
                "{field}.tls.{spec}: environment variable {} is not set; the operator sets it from the Secret",
                var(what)
            )
        })
    };
    let certificates = match tls {
        None => None,
        Some(tls) => Some(redis::TlsCertificates {
            root_cert: tls
                .ca_secret_ref
                .as_ref()
                .map(|_| get("TLS_CA", "caSecretRef"))
                .transpose()?
                .map(String::into_bytes),
            client_tls: match &tls.client_cert_secret_name {
                Some(_) => Some(redis::ClientTlsConfig {
                    client_cert: get("TLS_CERT", "clientCertSecretName")?.into_bytes(),
                    client_key: get("TLS_KEY", "clientCertSecretName")?.into_bytes(),
                }),
                None => None,
            },
        }),
    };
    connection_client(url, env(&var("REDIS_PASSWORD")), certificates, field)
}

/// A client for `url` with `password` and, for a `rediss://` URL, the CA
/// and client certificate in `certificates`.
pub fn connection_client(
    url: &str,
    password: Option<String>,
    certificates: Option<redis::TlsCertificates>,
    field: &str,
) -> Result<Client, String> {
    let info = url.into_connection_info().map_err(|e| format!("{field}.url: not a Redis URL: {e}"))?;
    let mut settings = info.redis_settings().clone();
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    let info = info.set_redis_settings(settings);
    match certificates {
        Some(certificates) => Client::build_with_tls(info, certificates)
            .map_err(|e| format!("{field}.tls: the Redis client rejected the CA or the client certificate: {e}")),
        None => Client::open(info).map_err(|e| format!("{field}.url: the Redis client rejected it: {e}")),
    }
}

/// A connection that reconnects by itself (lazily: no I/O until the first
/// call); each call has a deadline.
pub fn connect(client: Client, response_timeout: Duration) -> Result<ConnectionManager, redis::RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(response_timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// One stream entry: its id and its fields.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// A reply value as bytes (bulk and simple strings, integers).
pub(crate) fn value_bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn string(v: &Value) -> Option<String> {
    value_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// One stream entry: its id, and its fields (`None` for an entry deleted
/// (XDEL, XTRIM) while pending: XREADGROUP of a pending list returns its id
/// with no fields).
pub(crate) type StreamEntry = (String, Option<Vec<(String, Vec<u8>)>>);

/// The entries of an XRANGE reply, or of one stream in XREADGROUP's:
/// `[[id, [field, value, ...]], ...]` (RESP2; fields as a map in RESP3).
pub(crate) fn stream_entries(v: &Value) -> Vec<StreamEntry> {
    let lossy = |v: &Value| value_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned());
    let Value::Array(items) = v else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else { return None };
            let id = lossy(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(Value::Array(kv)) => {
                    Some(kv.chunks(2).filter_map(|c| Some((lossy(c.first()?)?, value_bytes(c.get(1)?)?))).collect())
                }
                Some(Value::Map(kv)) => {
                    Some(kv.iter().filter_map(|(k, v)| Some((lossy(k)?, value_bytes(v)?))).collect())
                }
                _ => None,
            };
            Some((id, fields))
        })
        .collect()
}

/// XREADGROUP's reply: `[[stream, entries]]` (RESP2) or `{stream: entries}`
/// (RESP3); nil when none (a timeout).
pub(crate) fn read_reply(v: &Value) -> Vec<StreamEntry> {
    match v {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1).map(stream_entries),
                _ => None,
            })
            .flatten()
            .collect(),
        Value::Map(streams) => streams.iter().flat_map(|(_, e)| stream_entries(e)).collect(),
        _ => Vec::new(),
    }
}

/// The entries that still exist, as the pipeline takes them.
fn existing(entries: Vec<StreamEntry>) -> Vec<Entry> {
    entries.into_iter().filter_map(|(id, fields)| Some((id, fields?))).collect()
}

/// The millisecond part of a stream id.
fn id_millis(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

fn to_message(id: String, fields: Vec<(String, Vec<u8>)>, offset: i64) -> Message {
    let mut payload = None;
    let mut key = None;
    let mut headers = Vec::with_capacity(fields.len());
    for (k, v) in &fields {
        match k.as_str() {
            "payload" => payload = Some(v.clone()),
            "key" => key = Some(v.clone()),
            HEADER_REDIS_ID => {}
            _ => headers.push((k.clone(), v.clone())),
        }
    }
    let payload = match payload {
        Some(p) => Payload::from_bytes(p),
        None => {
            let object: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(String::from_utf8_lossy(&v).into_owned())))
                .collect();
            headers.clear();
            Payload::from_json(serde_json::Value::Object(object))
        }
    };
    let timestamp = id_millis(&id).unwrap_or_else(now_ms);
    headers.push((HEADER_REDIS_ID.to_string(), id.into_bytes()));
    Message { key, payload, headers, partition: 0, offset, timestamp }
}

/// Whose held entries `keep_held` and `release` claim.
struct Held {
    stream: String,
    group: String,
    consumer: String,
}

impl Held {
    /// XCLAIM of our own `ids` to ourselves, JUSTID (the delivery count
    /// stays), with `idle` as their idle time (0: now).
    async fn claim(&self, conn: &mut ConnectionManager, ids: &[String], idle: Duration) -> redis::RedisResult<()> {
        for ids in ids.chunks(1000) {
            let mut cmd = redis::cmd("XCLAIM");
            cmd.arg(&self.stream).arg(&self.group).arg(&self.consumer).arg(0).arg(ids);
            cmd.arg("IDLE").arg(idle.as_millis() as u64).arg("JUSTID");
            let _: Value = cmd.query_async(conn).await?;
        }
        Ok(())
    }

    /// The ids of every entry pending for this consumer, in pages.
    async fn pending(&self, conn: &mut ConnectionManager) -> redis::RedisResult<Vec<String>> {
        const PAGE: usize = 10_000;
        let mut ids = Vec::new();
        let mut from = "-".to_string();
        loop {
            let reply: Value = redis::cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&from)
                .arg("+")
                .arg(PAGE)
                .arg(&self.consumer)
                .query_async(conn)
                .await?;
            let page = pending_ids(&reply);
            let Some(last) = page.last() else { return Ok(ids) };
            from = format!("({last}");
            let done = page.len() < PAGE;
            ids.extend(page);
            if done {
                return Ok(ids);
            }
        }
    }
}

/// The ids in XPENDING's extended reply: `[[id, consumer, idle, deliveries], ...]`.
fn pending_ids(v: &Value) -> Vec<String> {
    match v {
        Value::Array(rows) => rows
            .iter()
            .filter_map(|row| match row {
                Value::Array(fields) => fields.first().and_then(string),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Entries stay pending while the pipeline holds them (an open window
/// needs them; XACKs follow the low-water mark, so later ones wait too),
/// which can be longer than `claimIdle`, after which another pod's
/// XAUTOCLAIM would take them and count them twice. Every quarter
/// `claimIdle`, the entries this worker has held that long are claimed
/// again by itself (XCLAIM ... JUSTID, which resets their idle time and
/// not their delivery count). Its own task, so it goes on while the source
/// loop waits (a full pool, a sink outage). A worker that dies stops, and
/// its entries go to another pod after `claimIdle`.
async fn keep_held(mut conn: ConnectionManager, held: Held, inflight: InFlight, idle: Duration) {
    // A quarter: an entry read just after a pass is still re-claimed well
    // before claimIdle.
    let every = (idle / 4).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let due: Vec<String> = {
            let mut inflight = inflight.lock().unwrap_or_else(PoisonError::into_inner);
            inflight
                .iter_mut()
                .filter(|(_, _, since)| now.duration_since(*since) >= every)
                .map(|(_, id, since)| {
                    *since = now;
                    id.clone()
                })
                .collect()
        };
        if due.is_empty() {
            continue;
        }
        match held.claim(&mut conn, &due, Duration::ZERO).await {
            Ok(()) => tracing::debug!(stream = %held.stream, count = due.len(), "reset the idle time of held entries"),
            Err(e) => tracing::warn!(stream = %held.stream, error = %e,
                "cannot reset the idle time of held entries; another pod may claim them after claimIdle"),
        }
    }
}

/// Handed-out entries, in sequence order, until XACKed.
type InFlight = Arc<Mutex<VecDeque<(i64, String, Instant)>>>;

pub struct RedisSource {
    conn: ConnectionManager,
    /// `spec.source.redis.url`, for log lines.
    url: String,
    stream: String,
    group: String,
    consumer: String,
    start_from: StartFrom,
    claim_idle: Option<Duration>,
    next_claim: Instant,
    claim_cursor: String,
    /// Where the replay of our own pending entries stands; `None` once done.
    own_pending: Option<String>,
    group_ready: bool,
    seq: i64,
    inflight: InFlight,
    acker: Arc<RedisAcker>,
    backoff: Backoff,
    /// For `/readyz`: false after a failed read until one succeeds.
    up: Arc<AtomicBool>,
    /// Resets the idle time of held entries (`keep_held`); stopped with the source.
    _keeper: Option<AbortOnDrop>,
}

impl RedisSource {
    pub fn new(
        spec: &RedisSourceSpec,
        group: &str,
        consumer: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let client =
            client_at(&spec.url, "SOURCE", spec.tls.as_ref(), "spec.source.redis", env).map_err(config_error)?;
        let conn = connect_now(client.clone(), BLOCK + Duration::from_secs(5))?;
        let ack_conn = connect_now(client, Duration::from_secs(5))?;
        let inflight: InFlight = Arc::default();
        let claim_idle = spec.claim_idle.as_ref().map(|d| d.as_std());
        let keeper = match (claim_idle, tokio::runtime::Handle::try_current()) {
            (Some(idle), Ok(runtime)) => Some(AbortOnDrop(runtime.spawn(keep_held(
                conn.clone(),
                Held { stream: spec.stream.clone(), group: group.to_string(), consumer: consumer.to_string() },
                inflight.clone(),
                idle,
            )))),
            _ => None,
        };
        let acker = Arc::new(RedisAcker {
            conn: ack_conn,
            stream: spec.stream.clone(),
            group: group.to_string(),
            inflight: inflight.clone(),
        });
        tracing::info!(stream = %spec.stream, group, consumer, "Redis Streams consumer configured");
        Ok(Self {
            conn,
            url: redacted(&spec.url),
            stream: spec.stream.clone(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            start_from: spec.start_from,
            claim_idle,
            next_claim: Instant::now(),
            claim_cursor: "0-0".into(),
            own_pending: Some("0-0".into()),
            group_ready: false,
            seq: 0,
            inflight,
            acker,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            up: Arc::new(AtomicBool::new(true)),
            _keeper: keeper,
        })
    }

    async fn ensure_group(&mut self) -> Result<(), redis::RedisError> {
        let start = match self.start_from {
            StartFrom::Earliest => "0",
            StartFrom::Latest => "$",
        };
        let created: Result<Value, _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(start)
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Ok(_) => tracing::info!(stream = %self.stream, group = %self.group, start, "created the consumer group"),
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.group_ready = true;
        Ok(())
    }

    fn batch(&mut self, entries: Vec<Entry>) -> SourceEvent {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = entries
            .into_iter()
            .map(|(id, fields)| {
                self.seq += 1;
                inflight.push_back((self.seq, id.clone(), Instant::now()));
                to_message(id, fields, self.seq)
            })
            .collect();
        SourceEvent::Batch(batch)
    }

    async fn read(&mut self, max: usize) -> Result<Option<SourceEvent>, redis::RedisError> {
        if !self.group_ready {
            self.ensure_group().await?;
        }
        if let Some(from) = self.own_pending.clone() {
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(&from)
                .query_async(&mut self.conn)
                .await?;
            let read = read_reply(&reply);
            match read.last() {
                None => self.own_pending = None,
                Some((last, _)) => {
                    self.own_pending = Some(last.clone());
                    // An entry deleted (XDEL, XTRIM) while pending for us comes
                    // back as an id without fields: nothing to process, so
                    // XACKed here, or it would stay pending for good (and count
                    // as lag in the operator's probe).
                    let deleted: Vec<&String> =
                        read.iter().filter(|(_, fields)| fields.is_none()).map(|(id, _)| id).collect();
                    if !deleted.is_empty() {
                        let _: i64 = redis::cmd("XACK")
                            .arg(&self.stream)
                            .arg(&self.group)
                            .arg(&deleted)
                            .query_async(&mut self.conn)
                            .await?;
                        tracing::info!(stream = %self.stream, count = deleted.len(),
                            "acknowledged pending entries deleted from the stream before we processed them");
                    }
                    // Entries still in flight here are being processed: not ours to redo.
                    let entries: Vec<Entry> = {
                        let inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                        existing(read).into_iter().filter(|(id, _)| !inflight.iter().any(|(_, i, _)| i == id)).collect()
                    };
                    if entries.is_empty() {
                        return Ok(None);
                    }
                    tracing::info!(stream = %self.stream, count = entries.len(), "replaying our own pending entries");
                    return Ok(Some(self.batch(entries)));
                }
            }
        }
        if let Some(idle) = self.claim_idle
            && Instant::now() >= self.next_claim
        {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(idle.as_millis() as u64)
                .arg(&self.claim_cursor)
                .arg("COUNT")
                .arg(max)
                .query_async(&mut self.conn)
                .await?;
            let (cursor, claimed) = match &reply {
                Value::Array(parts) => (
                    parts.first().and_then(string),
                    parts.get(1).map(|e| existing(stream_entries(e))).unwrap_or_default(),
                ),
                _ => (None, Vec::new()),
            };
            let cursor = cursor.unwrap_or_else(|| "0-0".into());
            if cursor == "0-0" {
                // A full pass: the next one after half the idle time.
                self.next_claim = Instant::now() + (idle / 2).max(Duration::from_millis(100));
            }
            self.claim_cursor = cursor;
            // Our own in-flight entries may be idle too: not ours to redo.
            let claimed: Vec<Entry> = {
                let inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                claimed.into_iter().filter(|(id, _)| !inflight.iter().any(|(_, i, _)| i == id)).collect()
            };
            if !claimed.is_empty() {
                tracing::info!(stream = %self.stream, count = claimed.len(), ?idle, "claimed entries idle past claimIdle");
                return Ok(Some(self.batch(claimed)));
            }
        }
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        let entries = existing(read_reply(&reply));
        Ok((!entries.is_empty()).then(|| self.batch(entries)))
    }

    async fn next_event(&mut self, max: usize) -> Result<SourceEvent, SourceError> {
        loop {
            match self.read(max).await {
                Ok(Some(event)) => {
                    self.up.store(true, Ordering::Relaxed);
                    self.backoff.reset();
                    return Ok(event);
                }
                Ok(None) => {
                    // XREADGROUP's block ended with nothing: the server answered.
                    self.up.store(true, Ordering::Relaxed);
                    self.backoff.reset();
                }
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    // The server may have run a read whose reply we never got
                    // (a restart, a dropped connection): its entries sit in our
                    // pending list and `>` never returns them. Replay that list
                    // (minus what is in flight) before reading new entries.
                    self.own_pending = Some("0-0".into());
                    if e.code() == Some("NOGROUP") {
                        // The stream or group went away (a restart without
                        // persistence, a deleted stream): create it again.
                        self.group_ready = false;
                    }
                    let delay = self.backoff.next_delay();
                    if is_auth_error(&e) {
                        tracing::error!(stream = %self.stream, url = %self.url, field = "spec.source.redis.passwordSecretRef", error = %e, ?delay,
                            "Redis refused the login: check spec.source.redis.passwordSecretRef and the Secret it names; retrying");
                    } else if is_tls_error(&e) {
                        tracing::error!(stream = %self.stream, url = %self.url, field = "spec.source.redis.tls", error = %e, ?delay,
                            "TLS with Redis failed: check that spec.source.redis.tls.caSecretRef names the CA of the server's certificate and, if it verifies clients, clientCertSecretName a certificate it accepts; retrying");
                    } else {
                        tracing::warn!(stream = %self.stream, url = %self.url, error = %e, ?delay, "Redis read failed; retrying");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

/// [`client_at`]'s errors start with the field at fault
/// (`spec.source.redis.tls.caSecretRef: ...`): that field becomes the
/// error's, so the message names it once.
fn config_error(detail: String) -> SourceError {
    const FIELDS: [&str; 4] = [
        "spec.source.redis.tls.caSecretRef",
        "spec.source.redis.tls.clientCertSecretName",
        "spec.source.redis.tls",
        "spec.source.redis.url",
    ];
    for field in FIELDS {
        if let Some(rest) = detail.strip_prefix(field).and_then(|r| r.strip_prefix(": ")) {
            return SourceError::Config { field, detail: rest.to_string() };
        }
    }
    SourceError::Config { field: "spec.source.redis", detail }
}

/// A refused login: a wrong password (WRONGPASS), none where one is required
/// (NOAUTH), or an ACL user without the rights (NOPERM).
pub fn is_auth_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
}

/// A failed TLS handshake, either side refusing the other's certificate
/// (the redis crate reports rustls' verdict and the server's alert as I/O
/// errors, so only their text tells).
pub fn is_tls_error(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_lowercase();
    e.is_io_error() && (text.contains("certificate") || text.contains("handshake") || text.contains("alert"))
}

/// `url` without a password, should one be in it anyway, for log lines.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn connect_now(client: Client, timeout: Duration) -> Result<ConnectionManager, SourceError> {
    connect(client, timeout).map_err(|e| SourceError::Broker { kind: "redis", detail: e.to_string() })
}

impl Source for RedisSource {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(self.next_event(max.max(1)))
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.acker.clone()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn reachability(&self) -> Option<Arc<AtomicBool>> {
        Some(self.up.clone())
    }

    /// What is still pending for this consumer was not finished (the acker
    /// has XACKed all that was delivered): claimed to ourselves as idle for
    /// a long time, so the next XAUTOCLAIM of another pod (every
    /// claimIdle/2) takes it instead of waiting claimIdle.
    ///
    /// The pending list is read from the server rather than taken from what
    /// was handed out: a read that shutdown cancelled after the server ran
    /// it (its entries pending for us, never handed out) is handed back too.
    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let handed_out = {
                let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                inflight.drain(..).count()
            };
            let Some(idle) = self.claim_idle else { return };
            let owner =
                Held { stream: self.stream.clone(), group: self.group.clone(), consumer: self.consumer.clone() };
            let held = match owner.pending(&mut self.conn).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(stream = %self.stream, count = handed_out, error = %e,
                        "cannot list the unfinished entries to hand them back; another pod claims them after claimIdle");
                    return;
                }
            };
            if held.is_empty() {
                return;
            }
            // Well past any claimIdle: a day, and at least claimIdle twice over.
            let long = (idle * 2).max(Duration::from_secs(86_400));
            match owner.claim(&mut self.conn, &held, long).await {
                Ok(()) => tracing::info!(stream = %self.stream, count = held.len(), handed_out,
                    "handed back the entries this worker took and did not finish: another pod's next XAUTOCLAIM takes them"),
                Err(e) => tracing::warn!(stream = %self.stream, count = held.len(), error = %e,
                    "could not hand back the unfinished entries; another pod claims them after claimIdle"),
            }
        })
    }
}

/// XACKs every handed-out entry below the committed sequence.
pub struct RedisAcker {
    conn: ConnectionManager,
    stream: String,
    group: String,
    inflight: InFlight,
}

impl Acker for RedisAcker {
    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let Some(next) = positions.iter().filter(|(p, _)| *p == 0).map(|(_, o)| *o).max() else {
                return Ok(());
            };
            let ids: Vec<String> = {
                let inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                inflight.iter().take_while(|(seq, _, _)| *seq < next).map(|(_, id, _)| id.clone()).collect()
            };
            if ids.is_empty() {
                return Ok(());
            }
            let mut conn = self.conn.clone();
            for chunk in ids.chunks(1000) {
                let _: i64 = redis::cmd("XACK")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(chunk)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| SourceError::Broker { kind: "redis", detail: format!("XACK: {e}") })?;
            }
            // Acked: forget them (only now, so a failed XACK is retried next time).
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            while inflight.front().is_some_and(|(seq, _, _)| *seq < next) {
                inflight.pop_front();
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_errors_name_the_field_at_fault_once() {
        let tls = sluice_crds::Tls { ca_secret_ref: None, client_cert_secret_name: Some("client".into()) };
        let err = client_at("rediss://r:6379", "SOURCE", Some(&tls), "spec.source.redis", &|_| None)
            .map_err(config_error)
            .expect_err("no client certificate in the environment");
        let text = err.to_string();
        assert!(text.starts_with("spec.source.redis.tls.clientCertSecretName: environment variable"), "{text}");
        assert_eq!(text.matches("spec.source.redis").count(), 1, "{text}");
        let err = client_at("http://r", "SOURCE", None, "spec.source.redis", &|_| None).map_err(config_error);
        let text = err.expect_err("not a Redis URL").to_string();
        assert!(text.starts_with("spec.source.redis.url: not a Redis URL"), "{text}");
    }

    #[test]
    fn pending_ids_come_from_the_extended_xpending_reply() {
        let row = |id: &str| {
            Value::Array(vec![
                Value::BulkString(id.as_bytes().to_vec()),
                Value::BulkString(b"pod-a".to_vec()),
                Value::Int(1200),
                Value::Int(1),
            ])
        };
        assert_eq!(pending_ids(&Value::Array(vec![row("1-0"), row("1-1")])), vec!["1-0", "1-1"]);
        assert!(pending_ids(&Value::Array(vec![])).is_empty());
        assert!(pending_ids(&Value::Nil).is_empty());
    }

    #[test]
    fn stream_replies_parse_in_both_shapes_with_deleted_entries_as_none() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str| Value::Array(vec![bulk(id), Value::Array(vec![bulk("payload"), bulk("{}")])]);
        let range = Value::Array(vec![entry("5-0"), entry("6-0")]);
        let ids = |e: Vec<StreamEntry>| e.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(stream_entries(&range)), ["5-0", "6-0"]);
        let read = Value::Array(vec![Value::Array(vec![bulk("dlq"), range.clone()])]);
        assert_eq!(ids(read_reply(&read)), ["5-0", "6-0"]);
        let resp3 = Value::Map(vec![(bulk("dlq"), range)]);
        assert_eq!(ids(read_reply(&resp3)), ["5-0", "6-0"]);
        assert!(read_reply(&Value::Nil).is_empty());
        // A pending entry deleted from the stream: its id, no fields; the
        // pipeline gets only the others.
        let gone = Value::Array(vec![bulk("7-0"), Value::Nil]);
        let deleted = Value::Array(vec![Value::Array(vec![bulk("in"), Value::Array(vec![entry("6-0"), gone])])]);
        let read = read_reply(&deleted);
        assert_eq!(read[1], ("7-0".to_string(), None));
        let kept = existing(read);
        assert_eq!(kept, vec![("6-0".to_string(), vec![("payload".to_string(), b"{}".to_vec())])]);
    }

    #[test]
    fn entries_become_messages() {
        let m = to_message(
            "1700000000123-4".into(),
            vec![
                ("payload".into(), b"{\"a\":1}".to_vec()),
                ("key".into(), b"k".to_vec()),
                ("trace".into(), b"t".to_vec()),
            ],
            7,
        );
        assert_eq!(m.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(m.payload.json().ok().map(|v| v["a"].clone()), Some(serde_json::json!(1)));
        assert_eq!(m.header("trace"), Some(&b"t"[..]));
        assert_eq!(m.header(HEADER_REDIS_ID), Some(&b"1700000000123-4"[..]));
        assert_eq!((m.partition, m.offset, m.timestamp), (0, 7, 1_700_000_000_123));
        let m = to_message("1-0".into(), vec![("type".into(), b"x".to_vec())], 1);
        assert_eq!(m.payload.json().ok().cloned(), Some(serde_json::json!({"type": "x"})));
    }
}
