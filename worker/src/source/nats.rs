//! NATS JetStream source: a durable pull consumer read as a continuous
//! stream of pull requests (batches of `max`), acked after delivery.
//!
//! ```text
//! get_or_create durable (explicit ack, ackWait, maxDeliver, filterSubject, deliver all|new);
//!   again when the server says it is gone (deleted by hand, the stream recreated)
//!   └─ consumer.stream().max_messages_per_batch(max) ──> Message{partition 0, offset = local seq,
//!                                                          headers, key = Sluice-Key header}
//! acker: commit(0, next) ──> +ACK every message handed out below `next`, then flush
//! every ackWait/4 (a task of its own): +WPI (in progress) for messages held
//!   that long, so the ones an open window holds are not redelivered while
//!   this worker lives, even while it waits on a slow sink
//! release (end of the run): -NAK whatever is still held, for another
//!   consumer now rather than after ackWait
//! ```
//!
//! As for Redis, offsets are a local sequence: redeliveries (after ackWait,
//! or of a dead pod's messages) come back with older stream sequences. The
//! stream sequence travels in the `nats-seq` header (dead letters name it;
//! the NATS sink builds `Nats-Msg-Id` from it). Unacked messages are
//! redelivered by the server after ackWait.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::{
    ConnectOptions,
    jetstream::{self, consumer::pull},
};
use futures::{FutureExt, StreamExt, future::BoxFuture};
use sluice_crds::{NatsAuth, NatsSource as NatsSourceSpec, StartFrom};

use super::{AbortOnDrop, Acker, Source, SourceError, SourceEvent};
use crate::{
    message::{Message, Payload, now_ms},
    retry::Backoff,
};

pub const HEADER_NATS_SEQ: &str = "nats-seq";
/// The header that carries a message key through NATS.
pub const HEADER_KEY: &str = "Sluice-Key";
const IDLE_TICK: Duration = Duration::from_millis(250);

/// Connect options with the credentials from `SLUICE_SECRET_<place>_NATS_*`
/// and TLS from `SLUICE_SECRET_<place>_TLS_*` (the names
/// `sluice_crds::secrets::secret_envs` gives them).
pub fn connect_options(
    auth: Option<&NatsAuth>,
    place: &str,
    field: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnectOptions, String> {
    let var = |what: &str| format!("SLUICE_SECRET_{place}_{what}");
    let get = |what: &str| {
        env(&var(what)).ok_or_else(|| {
            format!("{field}.auth: environment variable {} is not set; the operator sets it from the Secret", var(what))
        })
    };
    let options = match auth {
        Some(a) if a.creds_secret_ref.is_some() => ConnectOptions::with_credentials(&get("NATS_CREDS")?)
            .map_err(|e| format!("{field}.auth.credsSecretRef: not a NATS credentials file: {e}"))?,
        Some(a) if a.token_secret_ref.is_some() => ConnectOptions::with_token(get("NATS_TOKEN")?),
        Some(a) if a.user_secret_ref.is_some() => {
            ConnectOptions::with_user_and_password(get("NATS_USERNAME")?, get("NATS_PASSWORD")?)
        }
        _ => ConnectOptions::new(),
    };
    let options = match auth.and_then(|a| a.tls.as_ref()) {
        Some(tls) => {
            let ca = match &tls.ca_secret_ref {
                Some(_) => Some(get("TLS_CA")?),
                None => None,
            };
            let client = match &tls.client_cert_secret_name {
                Some(_) => Some((get("TLS_CERT")?, get("TLS_KEY")?)),
                None => None,
            };
            with_tls(
                options,
                ca.as_deref(),
                client.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                &format!("{field}.auth.tls"),
            )?
        }
        None => options,
    };
    Ok(options
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .retry_on_initial_connect()
        .max_reconnects(None))
}

/// `options` that require TLS, trusting `ca_pem` and presenting `client`
/// ([`tls_client_config`]; the system roots without a CA).
pub fn with_tls(
    options: ConnectOptions,
    ca_pem: Option<&str>,
    client: Option<(&str, &str)>,
    field: &str,
) -> Result<ConnectOptions, String> {
    let options = options.require_tls(true);
    Ok(match tls_client_config(ca_pem, client, field)? {
        Some(config) => options.tls_client_config(config),
        None => options,
    })
}

/// A rustls configuration trusting `ca_pem` (PEM, one or more certificates)
/// and presenting `client` (certificate chain and key, PEM) when given.
/// `None` without a CA: async-nats then trusts the system roots. A client
/// certificate needs the CA too (async-nats reads the system roots only
/// when it builds the configuration itself). `field` names the spec field in
/// errors.
pub fn tls_client_config(
    ca_pem: Option<&str>,
    client: Option<(&str, &str)>,
    field: &str,
) -> Result<Option<async_nats::rustls::ClientConfig>, String> {
    use async_nats::rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let Some(ca_pem) = ca_pem else {
        return match client {
            Some(_) => Err(format!(
                "{field}.clientCertSecretName: a NATS client certificate needs {field}.caSecretRef as well"
            )),
            None => Ok(None),
        };
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("{field}.caSecretRef: not a PEM certificate: {e}"))?;
        roots.add(cert).map_err(|e| format!("{field}.caSecretRef: not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("{field}.caSecretRef: the Secret's value holds no PEM certificate"));
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{field}.clientCertSecretName: tls.crt is not a PEM certificate: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| format!("{field}.clientCertSecretName: tls.key is not a PEM private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{field}.clientCertSecretName: the certificate and key do not go together: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Some(config))
}

/// Logs the connection's troubles once per attempt, naming the spec field
/// to fix: async-nats retries a refused login or a failed TLS handshake
/// for ever (the Secret may be fixed meanwhile), and says nothing unless
/// asked. `down` (the source's readiness flag) turns false on each.
pub fn log_connection_events(
    options: ConnectOptions,
    field: &'static str,
    servers: &[String],
    down: Option<Arc<AtomicBool>>,
) -> ConnectOptions {
    let servers = servers.join(",");
    options.event_callback(move |event| {
        let (servers, down) = (servers.clone(), down.clone());
        async move {
            let detail = match &event {
                // A failed connection attempt (the kind only: "authorization
                // violation", "TLS error", "IO error", ...).
                async_nats::Event::ClientError(async_nats::ClientError::Other(detail)) => detail.clone(),
                async_nats::Event::ServerError(async_nats::ServerError::AuthorizationViolation) => {
                    "authorization violation".to_string()
                }
                async_nats::Event::ServerError(async_nats::ServerError::Other(e)) => {
                    // E.g. a permissions violation on one subject: the
                    // connection itself is fine.
                    tracing::warn!(field = %format!("{field}.auth"), %servers, error = %e, "the NATS server reports an error");
                    return;
                }
                async_nats::Event::Connected => {
                    tracing::info!(%servers, "connected to NATS");
                    return;
                }
                async_nats::Event::Disconnected => {
                    tracing::warn!(%servers, "disconnected from NATS; reconnecting");
                    return;
                }
                other => {
                    tracing::debug!(%servers, event = %other, "NATS connection event");
                    return;
                }
            };
            if let Some(down) = &down {
                down.store(false, Ordering::Relaxed);
            }
            let lower = detail.to_lowercase();
            if lower.contains("authorization violation") || lower.contains("failed signing nonce") {
                tracing::error!(field = %format!("{field}.auth"), %servers, error = %detail,
                    "NATS refused the credentials: check the Secret that {field}.auth names; retrying");
            } else if lower.contains("tls") {
                tracing::error!(field = %format!("{field}.auth.tls"), %servers, error = %detail,
                    "TLS with NATS failed: check that the servers speak TLS and that {field}.auth.tls.caSecretRef names the CA that signs their certificates; retrying");
            } else {
                // async-nats names only the kind here ("IO error"), and a
                // certificate either side refuses is one too.
                tracing::warn!(field = %format!("{field}.servers"), %servers, error = %detail,
                    "cannot connect to NATS: check that {field}.servers are up and reachable (and, with {field}.auth.tls, that caSecretRef names the CA of their certificates and, if they verify clients, clientCertSecretName a certificate they accept); retrying");
            }
        }
    })
}

/// Messages stay unacked while the pipeline holds them (an open window
/// needs them; acks follow the low-water mark, so later ones wait too),
/// which can be longer than ackWait. Every `every` (a quarter of ackWait),
/// each message held at least that long gets an in-progress ack (`+WPI`),
/// which restarts its ackWait on the server: held messages are not
/// redelivered to another consumer and counted twice. Its own task, so it
/// goes on while the source loop waits (a full pool, a sink outage). A
/// worker that dies stops extending, and its messages come back after
/// ackWait.
async fn keep_held(client: async_nats::Client, inflight: InFlight, every: Duration, stream: String) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let due: Vec<async_nats::Subject> = {
            let mut inflight = inflight.lock().unwrap_or_else(PoisonError::into_inner);
            inflight
                .iter_mut()
                .filter(|(_, _, since)| now.duration_since(*since) >= every)
                .filter_map(|(_, m, since)| {
                    *since = now;
                    m.reply.clone()
                })
                .collect()
        };
        if due.is_empty() {
            continue;
        }
        let mut failed = 0usize;
        for reply in &due {
            if client.publish(reply.clone(), "+WPI".into()).await.is_err() {
                failed += 1;
            }
        }
        if failed > 0 || client.flush().await.is_err() {
            tracing::warn!(%stream, failed, "in-progress acks not sent; held messages may be redelivered after ackWait");
        } else {
            tracing::debug!(%stream, count = due.len(), "extended the ack deadline of held messages");
        }
    }
}

fn to_message(m: &jetstream::Message, offset: i64) -> Message {
    let mut headers = Vec::new();
    let mut key = None;
    if let Some(h) = &m.headers {
        for (name, values) in h.iter() {
            let name: &str = name.as_ref();
            if name.starts_with("Nats-") || name == HEADER_NATS_SEQ {
                continue;
            }
            let value = values.first().map(|v| v.as_str().as_bytes().to_vec()).unwrap_or_default();
            if name == HEADER_KEY {
                key = Some(value);
            } else {
                headers.push((name.to_string(), value));
            }
        }
    }
    if let Ok(info) = m.info() {
        headers.push((HEADER_NATS_SEQ.to_string(), info.stream_sequence.to_string().into_bytes()));
    }
    Message {
        key,
        payload: Payload::from_bytes(m.payload.to_vec()),
        headers,
        partition: 0,
        offset,
        timestamp: now_ms(),
    }
}

/// Handed-out messages in sequence order until acked, with when their ack
/// deadline was last extended.
type InFlight = Arc<Mutex<VecDeque<(i64, jetstream::Message, tokio::time::Instant)>>>;

pub struct NatsSource {
    stream_name: String,
    durable: String,
    messages: Option<pull::Stream>,
    consumer: Option<jetstream::consumer::Consumer<pull::Config>>,
    js: jetstream::Context,
    config: pull::Config,
    batch: usize,
    seq: i64,
    inflight: InFlight,
    acker: Arc<NatsAcker>,
    backoff: Backoff,
    /// For `/readyz`: false while the server does not answer.
    up: Arc<AtomicBool>,
    /// Extends the ack deadline of held messages (`keep_held`); stopped
    /// with the source.
    _keeper: AbortOnDrop,
}

impl NatsSource {
    pub async fn new(
        spec: &NatsSourceSpec,
        durable: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, SourceError> {
        let options = connect_options(spec.auth.as_ref(), "SOURCE", "spec.source.nats", env)
            .map_err(|detail| SourceError::Config { field: "spec.source.nats.auth", detail })?;
        let up = Arc::new(AtomicBool::new(true));
        let options = log_connection_events(options, "spec.source.nats", &spec.servers, Some(up.clone()));
        let client = options.name("sluice-worker").connect(&spec.servers).await.map_err(|e| SourceError::Config {
            field: "spec.source.nats.servers",
            detail: format!("cannot connect to {}: {e}", spec.servers.join(",")),
        })?;
        let js = jetstream::new(client.clone());
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: spec.ack_wait.as_ref().map_or(Duration::from_secs(30), |d| d.as_std()),
            max_deliver: spec.max_deliver.unwrap_or(-1),
            filter_subject: spec.filter_subject.clone().unwrap_or_default(),
            deliver_policy: match spec.start_from {
                StartFrom::Earliest => jetstream::consumer::DeliverPolicy::All,
                StartFrom::Latest => jetstream::consumer::DeliverPolicy::New,
            },
            max_ack_pending: 100_000,
            ..Default::default()
        };
        let inflight: InFlight = Arc::default();
        // A quarter of ackWait, so that a message handed out just after a
        // pass is extended well before its ackWait (whose clock started when
        // the server sent it) runs out.
        let keeper = tokio::spawn(keep_held(
            client.clone(),
            inflight.clone(),
            (config.ack_wait / 4).max(Duration::from_millis(100)),
            spec.stream.clone(),
        ));
        let acker = Arc::new(NatsAcker { client, inflight: inflight.clone() });
        tracing::info!(stream = %spec.stream, durable, servers = %spec.servers.join(","), "NATS JetStream consumer configured");
        Ok(Self {
            stream_name: spec.stream.clone(),
            durable: durable.to_string(),
            messages: None,
            consumer: None,
            js,
            config,
            batch: 0,
            seq: 0,
            inflight,
            acker,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            up,
            _keeper: AbortOnDrop(keeper),
        })
    }

    /// The durable consumer and its message stream, created on first use
    /// and again after an error.
    async fn messages(&mut self, max: usize) -> Result<&mut pull::Stream, String> {
        if self.messages.is_none() || self.batch != max {
            if self.consumer.is_none() {
                let stream = self.js.get_stream(&self.stream_name).await.map_err(|e| {
                    if self.js.client().connection_state() == async_nats::connection::State::Connected {
                        format!("spec.source.nats.stream: stream {}: {e} (create the stream first)", self.stream_name)
                    } else {
                        format!("not connected to NATS, so stream {} cannot be read: {e}", self.stream_name)
                    }
                })?;
                let consumer = stream
                    .get_or_create_consumer(&self.durable, self.config.clone())
                    .await
                    .map_err(|e| format!("durable consumer {}: {e}", self.durable))?;
                self.consumer = Some(consumer);
            }
            let consumer = self.consumer.as_ref().ok_or("no consumer")?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(max)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(|e| format!("pull from {}: {e}", self.durable))?;
            self.messages = Some(messages);
            self.batch = max;
        }
        self.messages.as_mut().ok_or_else(|| "no message stream".to_string())
    }

    fn hand_out(&mut self, m: jetstream::Message) -> Message {
        self.seq += 1;
        let out = to_message(&m, self.seq);
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner).push_back((
            self.seq,
            m,
            tokio::time::Instant::now(),
        ));
        out
    }

    async fn next_event(&mut self, max: usize) -> Result<SourceEvent, SourceError> {
        loop {
            let first = match self.messages(max).await {
                Ok(stream) => tokio::time::timeout(IDLE_TICK, stream.next()).await,
                Err(e) => {
                    self.up.store(false, Ordering::Relaxed);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(stream = %self.stream_name, error = %e, ?delay, "NATS consumer unavailable; retrying");
                    self.consumer = None;
                    self.messages = None;
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let first = match first {
                Err(_) => {
                    // Idle: the connection's own state says whether the server answers.
                    let connected = self.js.client().connection_state() == async_nats::connection::State::Connected;
                    self.up.store(connected, Ordering::Relaxed);
                    continue;
                }
                Ok(None) => {
                    self.messages = None;
                    continue;
                }
                Ok(Some(Err(e))) => {
                    self.up.store(false, Ordering::Relaxed);
                    match e.kind() {
                        // The durable is gone (deleted by hand, the stream
                        // recreated): the pull stream would wait for it for
                        // ever, so drop it and create the durable again (from
                        // startFrom: what the old one acknowledged comes again,
                        // and the NATS sink's Nats-Msg-Id drops those outputs).
                        pull::MessagesErrorKind::ConsumerDeleted | pull::MessagesErrorKind::NoResponders => {
                            let delay = self.backoff.next_delay();
                            tracing::warn!(stream = %self.stream_name, durable = %self.durable, error = %e, ?delay,
                                "the durable consumer is gone; creating it again");
                            self.consumer = None;
                            self.messages = None;
                            tokio::time::sleep(delay).await;
                        }
                        // The durable's own limits refuse our pulls; the
                        // stream ends, and a new one meets the same refusal.
                        pull::MessagesErrorKind::RequestLimitExceeded => {
                            let delay = self.backoff.next_delay();
                            tracing::error!(stream = %self.stream_name, durable = %self.durable, field = "spec.batchSize", error = %e, ?delay,
                                "the durable consumer refuses pulls of spec.batchSize messages: lower spec.batchSize to its max_batch (or raise its limits); retrying");
                            self.messages = None;
                            tokio::time::sleep(delay).await;
                        }
                        _ => {
                            tracing::warn!(stream = %self.stream_name, error = %e, "NATS pull error; the stream retries")
                        }
                    }
                    continue;
                }
                Ok(Some(Ok(m))) => m,
            };
            self.up.store(true, Ordering::Relaxed);
            self.backoff.reset();
            let mut batch = Vec::with_capacity(max.min(4096));
            batch.push(self.hand_out(first));
            while batch.len() < max {
                let Some(stream) = self.messages.as_mut() else { break };
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(self.hand_out(m)),
                    _ => break,
                }
            }
            return Ok(SourceEvent::Batch(batch));
        }
    }
}

impl Source for NatsSource {
    fn next(&mut self, max: usize) -> BoxFuture<'_, Result<SourceEvent, SourceError>> {
        Box::pin(self.next_event(max.max(1)))
    }

    fn acker(&self) -> Arc<dyn Acker> {
        self.acker.clone()
    }

    fn kind(&self) -> &'static str {
        "nats"
    }

    fn reachability(&self) -> Option<Arc<AtomicBool>> {
        Some(self.up.clone())
    }

    /// Naks (without delay) every message still held: the acker has acked
    /// all that was delivered, so these are the ones this worker took and
    /// will not finish (an open window's, say, on SIGTERM or a rollout).
    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Stop pulling first: the server redelivers a nak'd message to
            // whichever pull request is open, and ours would take it back
            // to a worker that is leaving (measured: 89 to 500 of 2,000 then
            // waited out ackWait). What the open pull already brought is
            // handed back too; dropping the stream unsubscribes, and the
            // flush puts that before the naks.
            let mut buffered = Vec::new();
            if let Some(mut stream) = self.messages.take() {
                while let Some(Some(Ok(m))) = stream.next().now_or_never() {
                    buffered.push(m);
                }
            }
            self.consumer = None;
            let _ = self.js.client().flush().await;
            let held: Vec<jetstream::Message> = {
                let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                inflight.drain(..).map(|(_, m, _)| m).chain(buffered).collect()
            };
            if held.is_empty() {
                return;
            }
            let mut failed = 0usize;
            for m in &held {
                if m.ack_with(jetstream::AckKind::Nak(None)).await.is_err() {
                    failed += 1;
                }
            }
            if failed > 0 || self.js.client().flush().await.is_err() {
                tracing::warn!(stream = %self.stream_name, count = held.len(), failed,
                    "could not hand back every unfinished message; the server redelivers the rest after ackWait");
            } else {
                tracing::info!(stream = %self.stream_name, count = held.len(),
                    "handed back the messages this worker took and did not finish (nak): another consumer gets them now, not after ackWait");
            }
        })
    }
}

/// Acks every handed-out message below the committed sequence.
pub struct NatsAcker {
    client: async_nats::Client,
    inflight: InFlight,
}

impl Acker for NatsAcker {
    fn commit<'a>(&'a self, positions: &'a [(i32, i64)]) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let Some(next) = positions.iter().filter(|(p, _)| *p == 0).map(|(_, o)| *o).max() else {
                return Ok(());
            };
            let done: Vec<jetstream::Message> = {
                let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
                let mut done = Vec::new();
                while inflight.front().is_some_and(|(seq, _, _)| *seq < next) {
                    if let Some((_, m, _)) = inflight.pop_front() {
                        done.push(m);
                    }
                }
                done
            };
            let mut failed = 0;
            for m in &done {
                // A lost ack means one redelivery after ackWait: at-least-once holds.
                if m.ack().await.is_err() {
                    failed += 1;
                }
            }
            self.client
                .flush()
                .await
                .map_err(|e| SourceError::Broker { kind: "nats", detail: format!("flush acks: {e}") })?;
            if failed > 0 {
                return Err(SourceError::Broker {
                    kind: "nats",
                    detail: format!("{failed} acks not sent; the server redelivers them after ackWait"),
                });
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_errors_name_the_field() {
        let field = "spec.source.nats.auth.tls";
        assert!(tls_client_config(None, None, field).expect("system roots").is_none());
        let err = tls_client_config(Some("not a certificate"), None, field).expect_err("no PEM");
        assert!(err.contains("spec.source.nats.auth.tls.caSecretRef"), "{err}");
        let err = tls_client_config(None, Some(("cert", "key")), field).expect_err("a client cert needs a CA");
        assert!(err.contains("clientCertSecretName") && err.contains("caSecretRef"), "{err}");
    }
}
