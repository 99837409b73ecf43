//! The operator's view of a broker: partition count and lag per partition,
//! asked for through the worker's connector library without joining the
//! consumer group.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use sluice_crds::StreamProcessor;

use crate::autoscale::PartitionLag;

/// Secret values the spec references, by the env var name the worker would
/// see them under (`sluice_crds::secrets`).
pub type ResolvedSecrets = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// The broker did not answer, refused, or lacks the stream: hold
    /// replicas, report Degraded with `reason` (BrokerUnreachable, ...).
    #[error("{message}")]
    Failed { reason: &'static str, message: String },
    /// The source kind has nothing to probe (the generator).
    #[error("the {0} source has no lag to probe")]
    NotProbeable(&'static str),
}

/// Asks a broker for lag. Implemented over `sluice_worker::probe`; tests
/// substitute a scripted one.
pub trait LagProbe: Send + Sync {
    fn probe<'a>(
        &'a self,
        sp: &'a StreamProcessor,
        secrets: &'a ResolvedSecrets,
    ) -> BoxFuture<'a, Result<Vec<PartitionLag>, ProbeError>>;

    /// The processor is gone: drop whatever the probe keeps for it.
    fn forget(&self, namespace: &str, name: &str) {
        let _ = (namespace, name);
    }
}

/// The real probe: `sluice_worker::probe`, one connection per processor and
/// source, kept between polls and rebuilt when the source or its Secrets change.
#[derive(Default)]
pub struct BrokerProbe {
    /// (namespace, name) -> (fingerprint of source and Secrets, probe).
    probes: std::sync::Mutex<std::collections::HashMap<(String, String), CachedProbe>>,
}

type CachedProbe = (u64, std::sync::Arc<SourceProbe>);

use sluice_worker::probe::{Credentials, LagProbe as _, ProbeOptions, ProcessorRef, SourceProbe};

/// The worker's credentials for the source, from the env names the operator
/// would give the worker pod.
fn source_credentials(secrets: &ResolvedSecrets) -> Credentials {
    let get = |k: &str| secrets.get(k).cloned();
    Credentials {
        username: get("SLUICE_SECRET_SOURCE_SASL_USERNAME").or_else(|| get("SLUICE_SECRET_SOURCE_NATS_USERNAME")),
        password: get("SLUICE_SECRET_SOURCE_SASL_PASSWORD")
            .or_else(|| get("SLUICE_SECRET_SOURCE_NATS_PASSWORD"))
            .or_else(|| get("SLUICE_SECRET_SOURCE_REDIS_PASSWORD")),
        token: get("SLUICE_SECRET_SOURCE_NATS_TOKEN"),
        nats_creds: get("SLUICE_SECRET_SOURCE_NATS_CREDS"),
        ca_pem: get("SLUICE_SECRET_SOURCE_TLS_CA"),
        client_cert_pem: get("SLUICE_SECRET_SOURCE_TLS_CERT"),
        client_key_pem: get("SLUICE_SECRET_SOURCE_TLS_KEY"),
    }
}

fn fingerprint(sp: &StreamProcessor, secrets: &ResolvedSecrets) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(&sp.spec.source).unwrap_or_default().hash(&mut h);
    secrets.hash(&mut h);
    h.finish()
}

impl LagProbe for BrokerProbe {
    fn probe<'a>(
        &'a self,
        sp: &'a StreamProcessor,
        secrets: &'a ResolvedSecrets,
    ) -> BoxFuture<'a, Result<Vec<PartitionLag>, ProbeError>> {
        use kube::ResourceExt;
        Box::pin(async move {
            let key = (sp.namespace().unwrap_or_default(), sp.name_any());
            let print = fingerprint(sp, secrets);
            let cached = {
                let map = self.probes.lock().expect("probe cache lock");
                map.get(&key).filter(|(p, _)| *p == print).map(|(_, probe)| probe.clone())
            };
            let probe = match cached {
                Some(p) => p,
                None => {
                    let processor = ProcessorRef::new(key.0.clone(), key.1.clone());
                    let built = SourceProbe::new(
                        &sp.spec.source,
                        &processor,
                        source_credentials(secrets),
                        ProbeOptions::default(),
                    )
                    .map_err(|e| match e {
                        sluice_worker::probe::ProbeError::NoBroker { kind } => ProbeError::NotProbeable(kind),
                        e => ProbeError::Failed { reason: e.reason(), message: e.to_string() },
                    })?;
                    let built = std::sync::Arc::new(built);
                    self.probes.lock().expect("probe cache lock").insert(key, (print, built.clone()));
                    built
                }
            };
            let lag =
                probe.probe().await.map_err(|e| ProbeError::Failed { reason: e.reason(), message: e.to_string() })?;
            let mut partitions: Vec<PartitionLag> = lag
                .per_partition
                .iter()
                .map(|p| PartitionLag {
                    partition: p.partition,
                    committed: p.position,
                    lag: i64::try_from(p.lag).unwrap_or(i64::MAX),
                })
                .collect();
            // Partitions the broker has but reported nothing for count as idle.
            for part in 0..i32::try_from(lag.partitions).unwrap_or(0) {
                if !partitions.iter().any(|p| p.partition == part) {
                    partitions.push(PartitionLag { partition: part, committed: None, lag: 0 });
                }
            }
            partitions.sort_by_key(|p| p.partition);
            Ok(partitions)
        })
    }

    /// Drops the connection of a deleted processor (its client threads and sockets).
    fn forget(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.probes.lock() {
            map.remove(&(namespace.to_string(), name.to_string()));
        }
    }
}
