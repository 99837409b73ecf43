//! NATS JetStream lag: the durable consumer's `num_pending` (matching
//! messages not yet delivered) plus `num_ack_pending` (delivered, not yet
//! acked), from CONSUMER.INFO, which reads the consumer without pulling
//! from it. A stream is one "partition".

use std::time::Duration;

use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectErrorKind, ConnectOptions};
use futures::TryStreamExt;
use sluice_crds::{NatsSource, StartFrom};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Broker, Credentials, Lag, LagProbe, PartitionLag, ProbeError, ProbeOptions, ProcessorRef, within};

const SERVERS_FIELD: &str = "spec.source.nats.servers";
const AUTH_FIELD: &str = "spec.source.nats.auth";
const TLS_FIELD: &str = "spec.source.nats.auth.tls";

/// Probes one durable consumer of one stream; keeps its connection, which
/// async-nats re-establishes by itself after the server comes back.
#[derive(Debug)]
pub struct NatsProbe {
    servers: Vec<String>,
    endpoint: String,
    stream: String,
    consumer: String,
    filter_subject: Option<String>,
    start_from: StartFrom,
    credentials: Credentials,
    /// `spec.source.nats.auth.tls` is set: TLS only, trusting `credentials.ca_pem`.
    tls: bool,
    timeout: Duration,
    client: Mutex<Option<Client>>,
}

impl NatsProbe {
    pub fn new(
        spec: &NatsSource,
        processor: &ProcessorRef,
        credentials: Credentials,
        options: ProbeOptions,
    ) -> Result<Self, ProbeError> {
        // Fail on an unusable creds file now, not at every probe.
        if let Some(creds) = &credentials.nats_creds {
            ConnectOptions::with_credentials(creds).map_err(|e| ProbeError::Config {
                field: format!("{AUTH_FIELD}.credsSecretRef"),
                detail: format!("not a NATS credentials file: {e}"),
            })?;
        }
        Ok(Self {
            servers: spec.servers.clone(),
            endpoint: spec.servers.join(","),
            stream: spec.stream.clone(),
            consumer: spec.consumer.clone().unwrap_or_else(|| processor.default_nats_consumer()),
            filter_subject: spec.filter_subject.clone(),
            start_from: spec.start_from,
            credentials,
            tls: spec.auth.as_ref().is_some_and(|a| a.tls.is_some()),
            timeout: options.timeout,
            client: Mutex::new(None),
        })
    }

    /// The durable consumer the probe reads.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn connect_options(&self) -> Result<ConnectOptions, ProbeError> {
        let c = &self.credentials;
        let options = if let Some(creds) = &c.nats_creds {
            ConnectOptions::with_credentials(creds).map_err(|e| ProbeError::Config {
                field: format!("{AUTH_FIELD}.credsSecretRef"),
                detail: format!("not a NATS credentials file: {e}"),
            })?
        } else if let Some(token) = &c.token {
            ConnectOptions::with_token(token.clone())
        } else if let (Some(user), Some(password)) = (&c.username, &c.password) {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        } else {
            ConnectOptions::new()
        };
        let options = if self.tls {
            let client = c.client_cert_pem.as_deref().zip(c.client_key_pem.as_deref());
            crate::source::nats::with_tls(options, c.ca_pem.as_deref(), client, TLS_FIELD)
                .map_err(|detail| ProbeError::Config { field: TLS_FIELD.into(), detail })?
        } else {
            options
        };
        Ok(options.name("sluice-lag-probe").connection_timeout(self.timeout).request_timeout(Some(self.timeout)))
    }

    async fn client(&self, deadline: Instant) -> Result<Client, ProbeError> {
        let mut cached = self.client.lock().await;
        if let Some(client) = cached.as_ref() {
            return Ok(client.clone());
        }
        let options = self.connect_options()?;
        let connect = async {
            options.connect(&self.servers).await.map_err(|e| {
                let detail = e.to_string();
                match e.kind() {
                    ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => ProbeError::Auth {
                        broker: Broker::Nats,
                        endpoint: self.endpoint.clone(),
                        field: AUTH_FIELD,
                        detail,
                    },
                    // rustls' verdict on the server's certificate comes as an
                    // IO error, and so does the server's on ours (an alert,
                    // e.g. "CertificateRequired" under mutual TLS).
                    ConnectErrorKind::Tls | ConnectErrorKind::Io if detail.to_lowercase().contains("certificate") => {
                        ProbeError::Unreachable {
                            broker: Broker::Nats,
                            endpoint: self.endpoint.clone(),
                            field: TLS_FIELD,
                            detail: format!("TLS handshake: {detail}"),
                        }
                    }
                    ConnectErrorKind::ServerParse => ProbeError::Config {
                        field: SERVERS_FIELD.into(),
                        detail: format!("{detail}: {}", self.endpoint),
                    },
                    _ => self.unreachable(detail),
                }
            })
        };
        let client = match tokio::time::timeout_at(deadline, connect).await {
            Ok(result) => result?,
            Err(_) => return Err(self.unreachable(format!("no connection within {:?}", self.timeout))),
        };
        *cached = Some(client.clone());
        Ok(client)
    }

    fn unreachable(&self, detail: String) -> ProbeError {
        ProbeError::Unreachable { broker: Broker::Nats, endpoint: self.endpoint.clone(), field: SERVERS_FIELD, detail }
    }

    fn broker_error(&self, step: &'static str, detail: impl ToString) -> ProbeError {
        ProbeError::Broker { broker: Broker::Nats, endpoint: self.endpoint.clone(), step, detail: detail.to_string() }
    }

    fn timed_out(&self, step: &'static str) -> ProbeError {
        ProbeError::Timeout { broker: Broker::Nats, endpoint: self.endpoint.clone(), step, timeout: self.timeout }
    }

    async fn probe_once(&self, deadline: Instant) -> Result<Lag, ProbeError> {
        let mut js = jetstream::new(self.client(deadline).await?);
        js.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let (endpoint, timeout) = (self.endpoint.as_str(), self.timeout);

        let stream = within(deadline, Broker::Nats, endpoint, "STREAM.INFO", timeout, async {
            js.get_stream(&self.stream).await.map_err(|e| match e.kind() {
                GetStreamErrorKind::JetStream(inner) if inner.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                    ProbeError::NotFound {
                        broker: Broker::Nats,
                        endpoint: self.endpoint.clone(),
                        what: "stream",
                        name: self.stream.clone(),
                        field: "spec.source.nats.stream",
                    }
                }
                GetStreamErrorKind::Request if e.to_string().contains("timed out") => self.timed_out("STREAM.INFO"),
                _ => self.broker_error("STREAM.INFO", e),
            })
        })
        .await?;
        let state = stream.cached_info().state.clone();
        let end = i64::try_from(state.last_sequence).unwrap_or(i64::MAX);

        let consumer = within(deadline, Broker::Nats, endpoint, "CONSUMER.INFO", timeout, async {
            match stream.consumer_info(&self.consumer).await {
                Ok(info) => Ok(Some(info)),
                Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::NotFound) => Ok(None),
                Err(e) if matches!(e.kind(), ConsumerInfoErrorKind::TimedOut) => Err(self.timed_out("CONSUMER.INFO")),
                Err(e) => Err(self.broker_error("CONSUMER.INFO", e)),
            }
        })
        .await?;

        let partition = match consumer {
            Some(info) => PartitionLag {
                partition: 0,
                position: i64::try_from(info.ack_floor.stream_sequence).ok(),
                end,
                lag: info.num_pending + info.num_ack_pending as u64,
            },
            None => {
                let lag = match self.start_from {
                    StartFrom::Latest => 0,
                    StartFrom::Earliest => match &self.filter_subject {
                        None => state.messages,
                        Some(filter) => {
                            within(deadline, Broker::Nats, endpoint, "STREAM.INFO (subjects)", timeout, async {
                                let subjects = stream
                                    .info_with_subjects(filter)
                                    .await
                                    .map_err(|e| self.broker_error("STREAM.INFO (subjects)", e))?;
                                subjects
                                    .try_fold(0u64, |sum, (_, count)| async move { Ok(sum + count as u64) })
                                    .await
                                    .map_err(|e| self.broker_error("STREAM.INFO (subjects)", e))
                            })
                            .await?
                        }
                    },
                };
                tracing::debug!(stream = %self.stream, consumer = %self.consumer, lag, "durable consumer not created yet; lag is where it will start");
                PartitionLag { partition: 0, position: None, end, lag }
            }
        };
        Ok(Lag::from_partitions(1, vec![partition]))
    }
}

impl LagProbe for NatsProbe {
    async fn probe(&self) -> Result<Lag, ProbeError> {
        let deadline = Instant::now() + self.timeout;
        let result = self.probe_once(deadline).await;
        match &result {
            Ok(lag) => {
                tracing::debug!(stream = %self.stream, consumer = %self.consumer, lag = lag.total, "probed NATS lag")
            }
            // The next probe builds a fresh connection rather than waiting
            // on one that may be stuck reconnecting.
            Err(e) if e.is_transient() && !matches!(e, ProbeError::NotFound { .. }) => {
                *self.client.lock().await = None;
            }
            Err(_) => {}
        }
        result
    }
}
