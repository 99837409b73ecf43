//! Redis Streams lag: the group's `lag` (entries not yet delivered to it,
//! Redis 7) plus `pending` (delivered, not yet XACKed), from XINFO GROUPS,
//! which reads the group without creating a consumer in it. A stream is one
//! "partition".

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, IntoConnectionInfo, RedisError, Value};
use sluice_crds::{RedisSource, StartFrom};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Broker, Credentials, Lag, LagProbe, PartitionLag, ProbeError, ProbeOptions, ProcessorRef, within};

const URL_FIELD: &str = "spec.source.redis.url";
const PASSWORD_FIELD: &str = "spec.source.redis.passwordSecretRef";
/// Entries per XRANGE page when counting a backlog Redis cannot count.
const COUNT_PAGE: usize = 1000;
/// Beyond this many, the stream length stands in as an upper bound.
const COUNT_CAP: u64 = 100_000;

/// Probes one consumer group of one stream; keeps its connection and
/// replaces it after a failure.
pub struct RedisProbe {
    client: Client,
    endpoint: String,
    stream: String,
    group: String,
    start_from: StartFrom,
    timeout: Duration,
    connection: Mutex<Option<MultiplexedConnection>>,
}

impl std::fmt::Debug for RedisProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProbe")
            .field("endpoint", &self.endpoint)
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("start_from", &self.start_from)
            .finish()
    }
}

/// The group's entry in XINFO GROUPS.
#[derive(Debug, Default, PartialEq)]
struct GroupInfo {
    pending: u64,
    last_delivered_id: String,
    entries_read: Option<i64>,
    /// `None` when Redis cannot tell: entries deleted since the group's
    /// position, or a group created at an id (`$` included) whose entry
    /// count Redis does not know, until the group reads again.
    lag: Option<u64>,
}

/// What XINFO STREAM says about the stream.
#[derive(Debug, Default, PartialEq)]
struct StreamInfo {
    length: u64,
    entries_added: i64,
}

impl RedisProbe {
    pub fn new(
        spec: &RedisSource,
        processor: &ProcessorRef,
        credentials: Credentials,
        options: ProbeOptions,
    ) -> Result<Self, ProbeError> {
        let config_error = |detail: String| ProbeError::Config { field: URL_FIELD.into(), detail };
        let info =
            spec.url.as_str().into_connection_info().map_err(|e| config_error(format!("not a Redis URL: {e}")))?;
        let mut settings = info.redis_settings().clone();
        if let Some(password) = &credentials.password {
            settings = settings.set_password(password);
        }
        if let Some(username) = &credentials.username {
            settings = settings.set_username(username);
        }
        let info = info.set_redis_settings(settings);
        let client = match &spec.tls {
            // The same CA and client certificate as the worker's (rediss://).
            Some(_) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    root_cert: credentials.ca_pem.as_ref().map(|c| c.as_bytes().to_vec()),
                    client_tls: credentials.client_cert_pem.as_ref().zip(credentials.client_key_pem.as_ref()).map(
                        |(cert, key)| redis::ClientTlsConfig {
                            client_cert: cert.as_bytes().to_vec(),
                            client_key: key.as_bytes().to_vec(),
                        },
                    ),
                },
            )
            .map_err(|e| ProbeError::Config {
                field: "spec.source.redis.tls".into(),
                detail: format!("the Redis client rejected the CA or the client certificate: {e}"),
            })?,
            None => Client::open(info).map_err(|e| config_error(format!("the Redis client rejected it: {e}")))?,
        };
        Ok(Self {
            client,
            endpoint: redacted(&spec.url),
            stream: spec.stream.clone(),
            group: spec.group.clone().unwrap_or_else(|| processor.default_redis_group()),
            start_from: spec.start_from,
            timeout: options.timeout,
            connection: Mutex::new(None),
        })
    }

    /// The consumer group the probe reads.
    pub fn group(&self) -> &str {
        &self.group
    }

    async fn connection(&self, deadline: Instant) -> Result<MultiplexedConnection, ProbeError> {
        let mut cached = self.connection.lock().await;
        if let Some(connection) = cached.as_ref() {
            return Ok(connection.clone());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let config =
            AsyncConnectionConfig::new().set_connection_timeout(Some(left)).set_response_timeout(Some(self.timeout));
        let connect = self.client.get_multiplexed_async_connection_with_config(&config);
        let connection = match tokio::time::timeout_at(deadline, connect).await {
            Ok(Ok(connection)) => connection,
            // Whatever went wrong before the first answer, the broker was not reached.
            Ok(Err(e)) if e.is_timeout() => {
                return Err(ProbeError::Unreachable {
                    broker: Broker::Redis,
                    endpoint: self.endpoint.clone(),
                    field: URL_FIELD,
                    detail: format!("connect: {e}"),
                });
            }
            Ok(Err(e)) => return Err(self.error("connect", e)),
            Err(_) => {
                return Err(ProbeError::Unreachable {
                    broker: Broker::Redis,
                    endpoint: self.endpoint.clone(),
                    field: URL_FIELD,
                    detail: format!("no connection within {:?}", self.timeout),
                });
            }
        };
        *cached = Some(connection.clone());
        Ok(connection)
    }

    fn error(&self, step: &'static str, e: RedisError) -> ProbeError {
        let endpoint = self.endpoint.clone();
        let auth = matches!(e.kind(), ErrorKind::AuthenticationFailed)
            || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
        if auth {
            ProbeError::Auth { broker: Broker::Redis, endpoint, field: PASSWORD_FIELD, detail: e.to_string() }
        } else if crate::source::redis::is_tls_error(&e) {
            ProbeError::Unreachable {
                broker: Broker::Redis,
                endpoint,
                field: "spec.source.redis.tls",
                detail: format!("TLS handshake: {step}: {e}"),
            }
        } else if e.is_timeout() {
            ProbeError::Timeout { broker: Broker::Redis, endpoint, step, timeout: self.timeout }
        } else if e.is_io_error() || e.is_connection_refusal() {
            ProbeError::Unreachable {
                broker: Broker::Redis,
                endpoint,
                field: URL_FIELD,
                detail: format!("{step}: {e}"),
            }
        } else {
            ProbeError::Broker { broker: Broker::Redis, endpoint, step, detail: e.to_string() }
        }
    }

    async fn probe_once(&self, deadline: Instant) -> Result<Lag, ProbeError> {
        let mut connection = self.connection(deadline).await?;
        let (endpoint, timeout) = (self.endpoint.as_str(), self.timeout);

        let stream: Value = within(deadline, Broker::Redis, endpoint, "XINFO STREAM", timeout, async {
            redis::cmd("XINFO").arg("STREAM").arg(&self.stream).query_async(&mut connection).await.map_err(|e| {
                if e.detail().is_some_and(|d| d.contains("no such key")) || e.to_string().contains("no such key") {
                    ProbeError::NotFound {
                        broker: Broker::Redis,
                        endpoint: self.endpoint.clone(),
                        what: "stream",
                        name: self.stream.clone(),
                        field: "spec.source.redis.stream",
                    }
                } else {
                    self.error("XINFO STREAM", e)
                }
            })
        })
        .await?;
        let stream = parse_stream_info(&stream).map_err(|detail| self.unexpected("XINFO STREAM", detail))?;

        let groups: Value = within(deadline, Broker::Redis, endpoint, "XINFO GROUPS", timeout, async {
            redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&self.stream)
                .query_async(&mut connection)
                .await
                .map_err(|e| self.error("XINFO GROUPS", e))
        })
        .await?;
        let group = parse_groups(&groups, &self.group).map_err(|detail| self.unexpected("XINFO GROUPS", detail))?;

        let partition = match group {
            Some(group) => {
                let undelivered = match group.lag {
                    Some(lag) => lag,
                    None => {
                        let counted = within(deadline, Broker::Redis, endpoint, "XRANGE", timeout, async {
                            self.count_after(&mut connection, &group.last_delivered_id).await
                        })
                        .await?;
                        counted.unwrap_or_else(|| {
                            tracing::debug!(stream = %self.stream, group = %self.group, cap = COUNT_CAP, "backlog too long to count; using the stream length as an upper bound");
                            stream.length
                        })
                    }
                };
                PartitionLag {
                    partition: 0,
                    position: group.entries_read,
                    end: stream.entries_added,
                    lag: undelivered + group.pending,
                }
            }
            None => {
                let lag = match self.start_from {
                    StartFrom::Earliest => stream.length,
                    StartFrom::Latest => 0,
                };
                tracing::debug!(stream = %self.stream, group = %self.group, lag, "consumer group not created yet; lag is where it will start");
                PartitionLag { partition: 0, position: None, end: stream.entries_added, lag }
            }
        };
        Ok(Lag::from_partitions(1, vec![partition]))
    }

    /// Entries after `id`, counted page by page; `None` past [`COUNT_CAP`].
    async fn count_after(&self, connection: &mut MultiplexedConnection, id: &str) -> Result<Option<u64>, ProbeError> {
        let mut after = id.to_string();
        let mut counted = 0u64;
        loop {
            let page: Vec<(String, Value)> = redis::cmd("XRANGE")
                .arg(&self.stream)
                .arg(format!("({after}"))
                .arg("+")
                .arg("COUNT")
                .arg(COUNT_PAGE)
                .query_async(connection)
                .await
                .map_err(|e| self.error("XRANGE", e))?;
            counted += page.len() as u64;
            match page.last() {
                Some((last, _)) if page.len() == COUNT_PAGE => after = last.clone(),
                _ => return Ok(Some(counted)),
            }
            if counted >= COUNT_CAP {
                return Ok(None);
            }
        }
    }

    fn unexpected(&self, step: &'static str, detail: String) -> ProbeError {
        ProbeError::Broker {
            broker: Broker::Redis,
            endpoint: self.endpoint.clone(),
            step,
            detail: format!("unexpected reply ({detail}); XINFO needs Redis 7 or later"),
        }
    }
}

impl LagProbe for RedisProbe {
    async fn probe(&self) -> Result<Lag, ProbeError> {
        let deadline = Instant::now() + self.timeout;
        let result = self.probe_once(deadline).await;
        match &result {
            Ok(lag) => tracing::debug!(stream = %self.stream, group = %self.group, lag = lag.total, "probed Redis lag"),
            Err(ProbeError::Unreachable { .. } | ProbeError::Timeout { .. }) => {
                *self.connection.lock().await = None;
            }
            Err(_) => {}
        }
        result
    }
}

/// A reply map as (name, value) pairs: RESP2 sends a flat array of
/// alternating names and values, RESP3 a map.
fn fields(value: &Value) -> Result<Vec<(String, &Value)>, String> {
    let name = |v: &Value| match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        other => Err(format!("a field name of {other:?}")),
    };
    match value {
        Value::Array(items) if items.len() % 2 == 0 => {
            items.chunks(2).map(|pair| Ok((name(&pair[0])?, &pair[1]))).collect()
        }
        Value::Map(pairs) => pairs.iter().map(|(k, v)| Ok((name(k)?, v))).collect(),
        other => Err(format!("a map expected, got {other:?}")),
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn parse_stream_info(value: &Value) -> Result<StreamInfo, String> {
    let mut info = StreamInfo::default();
    let mut seen = (false, false);
    for (name, value) in fields(value)? {
        match name.as_str() {
            "length" => {
                info.length = int(value).and_then(|n| u64::try_from(n).ok()).ok_or("length is not a count")?;
                seen.0 = true;
            }
            "entries-added" => {
                info.entries_added = int(value).ok_or("entries-added is not a number")?;
                seen.1 = true;
            }
            _ => {}
        }
    }
    match seen {
        (true, true) => Ok(info),
        _ => Err("no length or entries-added".into()),
    }
}

/// The named group's numbers, or `None` when the stream has no such group.
fn parse_groups(value: &Value, group: &str) -> Result<Option<GroupInfo>, String> {
    let Value::Array(groups) = value else { return Err(format!("an array expected, got {value:?}")) };
    for entry in groups {
        let fields = fields(entry)?;
        if !fields.iter().any(|(name, value)| name == "name" && text(value).as_deref() == Some(group)) {
            continue;
        }
        let mut info = GroupInfo::default();
        for (name, value) in fields {
            match name.as_str() {
                "pending" => {
                    info.pending = int(value).and_then(|n| u64::try_from(n).ok()).ok_or("pending is not a count")?
                }
                "entries-read" => info.entries_read = int(value),
                "last-delivered-id" => info.last_delivered_id = text(value).ok_or("last-delivered-id is not an id")?,
                "lag" => info.lag = int(value).and_then(|n| u64::try_from(n).ok()),
                _ => {}
            }
        }
        return Ok(Some(info));
    }
    Ok(None)
}

/// The URL without a password, for messages and logs.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xinfo_groups_in_resp2_shape() {
        let group = |name: &str, pending: i64, read: Value, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("consumers"),
                Value::Int(1),
                bulk("pending"),
                Value::Int(pending),
                bulk("last-delivered-id"),
                bulk("1-0"),
                bulk("entries-read"),
                read,
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![
            group("other", 9, Value::Int(9), Value::Int(9)),
            group("shop.orders", 2, Value::Int(6), Value::Int(4)),
            group("deleted", 0, Value::Nil, Value::Nil),
        ]);
        assert_eq!(
            parse_groups(&reply, "shop.orders"),
            Ok(Some(GroupInfo { pending: 2, last_delivered_id: "1-0".into(), entries_read: Some(6), lag: Some(4) }))
        );
        assert_eq!(
            parse_groups(&reply, "deleted"),
            Ok(Some(GroupInfo { pending: 0, last_delivered_id: "1-0".into(), entries_read: None, lag: None }))
        );
        assert_eq!(parse_groups(&reply, "missing"), Ok(None));
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redacted("redis://user:secret@redis:6379/0"), "redis://redis:6379/0");
        assert_eq!(redacted("redis://redis:6379"), "redis://redis:6379");
    }
}
