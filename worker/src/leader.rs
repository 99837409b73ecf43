//! Singleton tasks: work one worker of a processor does, whichever it is,
//! while it holds the processor's `<name>-leader` Lease.
//!
//! ```text
//! SLUICE_LEASE_NAME set (the operator sets it on every worker pod)
//!   kube-lease-manager: acquire, renew, release ──watch::Receiver<bool>──┐
//!   leading ─> start the singleton tasks (a child CancellationToken)   <┘
//!   lost / shutdown ─> cancel them and wait until they have stopped;
//!                      the manager renews until `grace` before expiry and
//!                      reports the loss then, so they stop before the
//!                      Lease can go to another pod
//! SLUICE_LEASE_NAME unset (a local run: one process): the tasks just run
//! ```
//!
//! The tasks, run side by side and stopped together:
//! - provisioning: the Kafka sink's topic and the Kafka dead-letter topic
//!   are created when missing (partitions: the source topic's count for
//!   Kafka sources, so keys keep their partition; else 1), and looked at
//!   again every `RECHECK`. Creating a topic is idempotent on the broker,
//!   but one creator avoids N pods racing to create it with different
//!   settings on start and gives one place that logs it.
//! - the state janitor (`janitor`): deletes Redis state snapshots no
//!   pipeline can read any more.
//! - dead-letter redrive (`redrive`): when `spec.deadLetter.redrive.id` is
//!   new, replays the dead letters into the source, and records the id as
//!   done on this Lease (annotation `sluice.io/redrive-done`). Without a
//!   Lease there is nowhere to record it, so a local run does not redrive.

use std::{sync::Arc, time::Duration};

use kube_lease_manager::LeaseManagerBuilder;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    types::RDKafkaErrorCode,
};
use sluice_crds::{KafkaAuth, StreamProcessorSpec};
use tokio_util::sync::CancellationToken;

use crate::{
    janitor,
    metrics::Metrics,
    redrive::{self, LeaseLedger, RedriveLedger},
    source::kafka::client_config,
};

/// Lease timing: held for `DURATION`, renewed well before it runs out, and
/// reported lost `GRACE` before expiry so that the tasks stop in time.
const DURATION: u64 = 15;
const GRACE: u64 = 5;
/// How often a leader looks at what it provisioned again.
const RECHECK: Duration = Duration::from_secs(60);

/// Where the Lease lives and who this worker is.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
}

impl LeaseConfig {
    /// From the pod's environment: `SLUICE_LEASE_NAME`, `POD_NAMESPACE`,
    /// `POD_NAME`. None without a Lease name.
    pub fn from_env() -> Option<Self> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let name = get("SLUICE_LEASE_NAME")?;
        Some(Self {
            name,
            namespace: get("POD_NAMESPACE").unwrap_or_else(|| "default".into()),
            identity: get("POD_NAME").unwrap_or_else(|| format!("sluice-worker-{}", std::process::id())),
        })
    }
}

/// What the singleton tasks work on: the spec, and the processor's
/// `<namespace>/<name>` (state keys and consumer names derive from it).
#[derive(Clone)]
pub struct Processor {
    pub name: String,
    pub spec: Arc<StreamProcessorSpec>,
    pub metrics: Metrics,
}

/// Runs the singleton tasks while this worker holds the Lease (or always,
/// without one) until `shutdown`, then releases the Lease.
pub async fn run(lease: Option<LeaseConfig>, processor: Processor, shutdown: CancellationToken) {
    let metrics = &processor.metrics;
    let Some(lease) = lease else {
        tracing::info!("no SLUICE_LEASE_NAME: this worker runs the singleton tasks itself");
        metrics.leader.set(1);
        singleton_tasks(&processor, None, shutdown.clone()).await;
        metrics.leader.set(0);
        return;
    };
    loop {
        match lead(&lease, &processor, &shutdown).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(lease = %lease.name, error = %e, "cannot take part in leader election; singleton tasks wait; retrying in 10 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        }
    }
}

async fn lead(lease: &LeaseConfig, processor: &Processor, shutdown: &CancellationToken) -> Result<(), String> {
    let metrics = &processor.metrics;
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes API client: {e}"))?;
    let ledger: Arc<dyn RedriveLedger> = Arc::new(LeaseLedger::new(client.clone(), &lease.namespace, &lease.name));
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(DURATION)
        .with_grace(GRACE)
        .build()
        .await
        .map_err(|e| format!("Lease {}/{}: {e}", lease.namespace, lease.name))?;
    let (mut leading, lease_task) = manager.watch().await;
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return Err("the Lease task ended".into()) },
            _ = shutdown.cancelled() => break,
        }
        tracing::info!(lease = %lease.name, identity = %lease.identity, "holding the Lease: singleton tasks started");
        metrics.leader.set(1);
        let stop = shutdown.child_token();
        let tasks = singleton_tasks(processor, Some(ledger.clone()), stop.clone());
        let mut lost = leading.clone();
        tokio::select! {
            () = tasks => {}
            _ = lost.wait_for(|l| !*l) => {
                stop.cancel();
            }
        }
        // `tasks` is dropped (stopped) here, before the loss is acted on.
        metrics.leader.set(0);
        tracing::info!(lease = %lease.name, identity = %lease.identity, "singleton tasks stopped");
        if shutdown.is_cancelled() {
            break;
        }
    }
    // Dropping the receiver makes the manager release the Lease: another
    // pod takes over at once instead of after the lease duration.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!(lease = %lease.name, "released the Lease"),
        Ok(Ok(Err(e))) => tracing::warn!(lease = %lease.name, error = %e, "releasing the Lease"),
        _ => tracing::warn!(lease = %lease.name, "the Lease task did not stop in time"),
    }
    Ok(())
}

/// Every singleton task, until `stop`. `ledger`: where a redrive is
/// recorded as done (the Lease), if anywhere.
async fn singleton_tasks(processor: &Processor, ledger: Option<Arc<dyn RedriveLedger>>, stop: CancellationToken) {
    let spec = &processor.spec;
    tokio::join!(
        provisioning(spec, stop.clone()),
        janitor::run(spec, &processor.name, &processor.metrics, stop.clone()),
        redrive::run(spec, &processor.name, &processor.metrics, ledger, stop.clone()),
    );
}

/// Creates the Kafka topics the processor writes to, and looks again every
/// `RECHECK`, until `stop`.
async fn provisioning(spec: &StreamProcessorSpec, stop: CancellationToken) {
    let topics = kafka_topics(spec);
    if topics.is_empty() {
        stop.cancelled().await;
        return;
    }
    loop {
        for t in &topics {
            match provision(t).await {
                Ok(true) => tracing::info!(topic = %t.topic, partitions = t.partitions, "created the topic"),
                Ok(false) => tracing::debug!(topic = %t.topic, "topic exists"),
                Err(e) => {
                    tracing::warn!(topic = %t.topic, field = t.field, error = %e, "cannot provision the topic; retrying later")
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// A Kafka topic this processor writes to.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicPlan {
    pub brokers: Vec<String>,
    pub auth: Option<KafkaAuth>,
    pub topic: String,
    /// Partitions to create it with: the source topic's count (looked up
    /// when 0), else 1.
    pub partitions: i32,
    pub source: Option<(Vec<String>, String, Option<KafkaAuth>)>,
    pub place: &'static str,
    pub field: &'static str,
}

/// The Kafka topics of `spec` the leader provisions: the sink's and the
/// dead-letter sink's, on the cluster and with the login each sink uses
/// (`sink::kafka::endpoint`: the source's when it names no brokers).
pub fn kafka_topics(spec: &StreamProcessorSpec) -> Vec<TopicPlan> {
    let source = spec.source.kafka.as_ref();
    let source_ref = source.map(|k| (k.brokers.clone(), k.topic.clone(), k.auth.clone()));
    let plan = |k: &sluice_crds::KafkaSink, partitions_of_source: bool, place, field| {
        let at = crate::sink::kafka::endpoint(k, source, place, field).ok()?;
        Some(TopicPlan {
            brokers: at.brokers,
            auth: at.auth,
            topic: k.topic.clone(),
            partitions: if partitions_of_source && source.is_some() { 0 } else { 1 },
            source: if partitions_of_source { source_ref.clone() } else { None },
            place: at.place,
            field,
        })
    };
    let mut out = Vec::new();
    if let Some(k) = &spec.sink.kafka {
        out.extend(plan(k, true, "SINK", "spec.sink.kafka"));
    }
    if let Some(k) = spec.dead_letter.as_ref().and_then(|d| d.kafka.as_ref()) {
        out.extend(plan(k, false, "DEADLETTER", "spec.deadLetter.kafka"));
    }
    out
}

/// Creates `plan.topic` unless it exists; true when it created it. The
/// source topic's partition count is looked up only for a topic to create:
/// the check that repeats every minute is one metadata call.
async fn provision(plan: &TopicPlan) -> Result<bool, String> {
    // rdkafka's metadata calls block; the admin call is async.
    let metadata =
        |brokers: Vec<String>, auth: Option<KafkaAuth>, place: &'static str, field: &'static str, topic: String| {
            tokio::task::spawn_blocking(move || -> Result<Option<usize>, String> {
                let env = |v: &str| std::env::var(v).ok();
                let consumer: BaseConsumer =
                    client_config(&brokers, auth.as_ref(), place, field, &env)?.create().map_err(|e| e.to_string())?;
                let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)).map_err(|e| e.to_string())?;
                Ok(md.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len()))
            })
        };
    let exists = metadata(plan.brokers.clone(), plan.auth.clone(), plan.place, plan.field, plan.topic.clone())
        .await
        .map_err(|e| e.to_string())??
        .is_some();
    if exists {
        return Ok(false);
    }
    let mut partitions = plan.partitions.max(1);
    if plan.partitions == 0
        && let Some((brokers, topic, auth)) = &plan.source
    {
        let n = metadata(brokers.clone(), auth.clone(), "SOURCE", "spec.source.kafka", topic.clone())
            .await
            .map_err(|e| e.to_string())??
            .unwrap_or(0);
        partitions = i32::try_from(n).unwrap_or(1).max(1);
    }
    let env = |v: &str| std::env::var(v).ok();
    let admin: AdminClient<DefaultClientContext> =
        client_config(&plan.brokers, plan.auth.as_ref(), plan.place, plan.field, &env)?
            .create()
            .map_err(|e| e.to_string())?;
    let topic = NewTopic::new(&plan.topic, partitions, TopicReplication::Fixed(-1));
    let results = admin.create_topics([&topic], &AdminOptions::new()).await.map_err(|e| e.to_string())?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((_, code))) => Err(format!("create topic {}: {code}", plan.topic)),
        None => Err(format!("create topic {}: no result", plan.topic)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> StreamProcessorSpec {
        serde_json::from_value(v).expect("spec")
    }

    #[test]
    fn the_leader_provisions_the_kafka_sink_and_dead_letter_topics() {
        let s = spec(serde_json::json!({
            "source": {"kafka": {"brokers": ["k:9092"], "topic": "in"}},
            "sink": {"kafka": {"topic": "out"}},
            "deadLetter": {"kafka": {"topic": "dlq", "brokers": ["d:9092"]}}
        }));
        let plans = kafka_topics(&s);
        assert_eq!(plans.len(), 2);
        assert_eq!(
            (plans[0].topic.as_str(), plans[0].brokers.clone(), plans[0].partitions),
            ("out", vec!["k:9092".into()], 0)
        );
        assert_eq!(plans[0].source.as_ref().map(|s| s.1.as_str()), Some("in"), "as many partitions as the source");
        assert_eq!(
            (plans[1].topic.as_str(), plans[1].brokers.clone(), plans[1].partitions),
            ("dlq", vec!["d:9092".into()], 1)
        );
    }

    #[test]
    fn nothing_to_provision_without_kafka_sinks() {
        let s = spec(serde_json::json!({
            "source": {"redis": {"url": "redis://r:6379", "stream": "in"}},
            "sink": {"redis": {"url": "redis://r:6379", "stream": "out"}}
        }));
        assert!(kafka_topics(&s).is_empty());
    }
}
