//! Singleton tasks: work one worker of a processor does, whichever it is,
//! while it holds the processor's `<name>-leader` Lease.
//!
//! ```text
//! SLUICE_LEASE_NAME set (the operator sets it on every worker pod)
//!   kube-lease-manager: acquire, renew, release ──watch::Receiver<bool>──┐
//!   leading ─> start the singleton tasks (a child CancellationToken)   <┘
//!   lost / shutdown ─> cancel them and wait until they have stopped
//!   no renewal seen ─> the same, SAFETY before the Lease could expire
//!                      (renewTime + duration): the leader reads its Lease
//!                      every OBSERVE and runs the tasks only while a
//!                      renewal of its own is in sight, so a leader cut off
//!                      from the API server stops them before another pod
//!                      can take the Lease (the manager itself only logs
//!                      failed renewals and goes on reporting "leading")
//! SLUICE_LEASE_NAME unset (a local run: one process): the tasks just run
//! ```
//!
//! The tasks, run side by side and stopped together:
//! - provisioning: the Kafka sink's topic and the Kafka dead-letter topic
//!   are created when missing (partitions: the source topic's count for
//!   Kafka sources, so keys keep their partition; else 1); so are the
//!   JetStream streams a NATS sink or dead-letter sink names in `stream`
//!   (an existing one that does not capture the subject is reported, not
//!   changed). All are looked at again every `RECHECK`. Creating them is
//!   idempotent on the broker, but one creator avoids N pods racing to
//!   create them with different settings on start and gives one place
//!   that logs it. Consumer groups need no provisioning: Kafka's exist
//!   with their first member, and every pod creates its Redis group and
//!   NATS durable consumer idempotently before it reads (a local run has
//!   no leader).
//! - the state janitor (`janitor`): deletes Redis state snapshots no
//!   pipeline can read any more.
//! - dead-letter redrive (`redrive`): when `spec.deadLetter.redrive.id` is
//!   new, replays the dead letters into the source, and records the id as
//!   done on this Lease (annotation `sluice.io/redrive-done`). Without a
//!   Lease there is nowhere to record it, so a local run does not redrive.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube_lease_manager::LeaseManagerBuilder;
use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    types::RDKafkaErrorCode,
};
use sluice_crds::{KafkaAuth, NatsAuth, StreamProcessorSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    janitor,
    metrics::Metrics,
    redrive::{self, LeaseLedger, RedriveLedger},
    source::{AbortOnDrop, kafka::client_config},
};

/// Lease timing: held for `DURATION`, renewed `GRACE` before it runs out.
const DURATION: u64 = 15;
const GRACE: u64 = 7;
/// The tasks stop this long before the Lease could expire unless a later
/// renewal has been seen: time for them to stop before another pod may take
/// the Lease. A renewal has GRACE - SAFETY (4 s) to succeed and be seen.
const SAFETY: Duration = Duration::from_secs(3);
/// How often a leader reads its Lease to see its own renewals.
const OBSERVE: Duration = Duration::from_secs(1);
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
    let leases: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let manager = LeaseManagerBuilder::new(client, &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(DURATION)
        .with_grace(GRACE)
        .build()
        .await
        .map_err(|e| format!("Lease {}/{}: {e}", lease.namespace, lease.name))?;
    let (mut leading, lease_task) = manager.watch().await;
    let (until_tx, until) = watch::channel(None);
    // Stopped with the rest of `lead` (aborted on drop), never left behind.
    let observer = AbortOnDrop(tokio::spawn(observe_lease(leases, lease.clone(), leading.clone(), until_tx)));
    loop {
        tokio::select! {
            r = leading.wait_for(|l| *l) => if r.is_err() { return Err("the Lease task ended".into()) },
            _ = shutdown.cancelled() => break,
        }
        // The manager's word, and a renewal of ours in sight that has not run out.
        let (mut seen, mut lost) = (until.clone(), leading.clone());
        tokio::select! {
            r = seen.wait_for(still_held) => if r.is_err() { return Err("the Lease observer ended".into()) },
            _ = lost.wait_for(|l| !*l) => continue,
            _ = shutdown.cancelled() => break,
        }
        tracing::info!(lease = %lease.name, identity = %lease.identity, "holding the Lease: singleton tasks started");
        metrics.leader.set(1);
        let stop = shutdown.child_token();
        let tasks = singleton_tasks(processor, Some(ledger.clone()), stop.clone());
        tokio::select! {
            () = tasks => {}
            _ = lost.wait_for(|l| !*l) => {
                stop.cancel();
            }
            () = runs_out(until.clone()) => {
                tracing::warn!(lease = %lease.name, identity = %lease.identity, safety = ?SAFETY,
                    "no renewal of the Lease seen (is the API server reachable?): stopping the singleton tasks before it can expire; they start again when a renewal is seen");
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
    drop(observer);
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

/// Until when `identity` may run singleton tasks, by its Lease as read:
/// while it is the holder, renewTime + leaseDuration - SAFETY. The holder
/// wrote renewTime with its own clock (kube-lease-manager renews with the
/// local time), and another pod may take the Lease once its clock passes
/// renewTime + leaseDuration: the usual Lease assumption of clocks in step.
pub fn hold_until(lease: &Lease, identity: &str) -> Option<SystemTime> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed: SystemTime = spec.renew_time.as_ref()?.0.into();
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds?).ok()?);
    (renewed + duration).checked_sub(SAFETY)
}

fn still_held(until: &Option<SystemTime>) -> bool {
    until.is_some_and(|t| SystemTime::now() < t)
}

/// Returns once `until` has passed with no later renewal seen.
async fn runs_out(mut until: watch::Receiver<Option<SystemTime>>) {
    loop {
        let left = until.borrow_and_update().and_then(|t| t.duration_since(SystemTime::now()).ok());
        let Some(left) = left else { return };
        tokio::select! {
            () = tokio::time::sleep(left) => {}
            r = until.changed() => if r.is_err() { return },
        }
    }
}

/// While the manager says this worker leads, reads the Lease every
/// OBSERVE and publishes `hold_until`. A read that fails or takes too long
/// publishes nothing: the last deadline stands and runs out.
async fn observe_lease(
    leases: Api<Lease>,
    lease: LeaseConfig,
    mut leading: watch::Receiver<bool>,
    until: watch::Sender<Option<SystemTime>>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        match tokio::time::timeout(OBSERVE * 2, leases.get_opt(&lease.name)).await {
            Ok(Ok(read)) => {
                until.send_replace(read.as_ref().and_then(|l| hold_until(l, &lease.identity)));
            }
            Ok(Err(e)) => tracing::debug!(lease = %lease.name, error = %e, "cannot read the Lease"),
            Err(_) => tracing::debug!(lease = %lease.name, "reading the Lease timed out"),
        }
        tokio::time::sleep(OBSERVE).await;
    }
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

/// Creates the Kafka topics and JetStream streams the processor writes to,
/// and looks again every `RECHECK`, until `stop`.
async fn provisioning(spec: &StreamProcessorSpec, stop: CancellationToken) {
    let topics = kafka_topics(spec);
    let streams = nats_streams(spec);
    if topics.is_empty() && streams.is_empty() {
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
        for s in &streams {
            match provision_stream(s).await {
                Ok(true) => tracing::info!(stream = %s.stream, subject = %s.subject, "created the JetStream stream"),
                Ok(false) => tracing::debug!(stream = %s.stream, "stream exists and captures the subject"),
                Err(e) => tracing::warn!(stream = %s.stream, field = s.field, error = %e,
                    "cannot provision the JetStream stream; retrying later"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// A JetStream stream a NATS sink of this processor publishes into.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamPlan {
    pub servers: Vec<String>,
    pub auth: Option<NatsAuth>,
    pub stream: String,
    pub subject: String,
    pub place: &'static str,
    pub field: &'static str,
}

/// The streams of `spec` the leader provisions: those the NATS sink and
/// the NATS dead-letter sink name in `stream`.
pub fn nats_streams(spec: &StreamProcessorSpec) -> Vec<StreamPlan> {
    let plan = |n: &sluice_crds::NatsSink, place, field| {
        Some(StreamPlan {
            servers: n.servers.clone(),
            auth: n.auth.clone(),
            stream: n.stream.clone()?,
            subject: n.subject.clone(),
            place,
            field,
        })
    };
    let mut out = Vec::new();
    if let Some(n) = &spec.sink.nats {
        out.extend(plan(n, "SINK", "spec.sink.nats"));
    }
    if let Some(n) = spec.dead_letter.as_ref().and_then(|d| d.nats.as_ref()) {
        out.extend(plan(n, "DEADLETTER", "spec.deadLetter.nats"));
    }
    out
}

/// Creates `plan.stream` unless it exists; true when it created it. An
/// existing stream that does not capture the subject is an error that says
/// how to fix it: the leader does not change a stream it did not create.
async fn provision_stream(plan: &StreamPlan) -> Result<bool, String> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let env = |v: &str| std::env::var(v).ok();
    let options = crate::source::nats::connect_options(plan.auth.as_ref(), plan.place, plan.field, &env)?;
    let client = tokio::time::timeout(TIMEOUT, options.name("sluice-worker-leader").connect(&plan.servers))
        .await
        .map_err(|_| format!("no answer from {} within {TIMEOUT:?}", plan.servers.join(",")))?
        .map_err(|e| format!("cannot connect to {}: {e}", plan.servers.join(",")))?;
    let js = async_nats::jetstream::new(client);
    let existing = tokio::time::timeout(TIMEOUT, js.get_stream(&plan.stream)).await;
    if let Ok(Ok(stream)) = existing {
        let subjects = &stream.cached_info().config.subjects;
        return if subjects.iter().any(|filter| subject_captures(filter, &plan.subject)) {
            Ok(false)
        } else {
            Err(format!(
                "stream {} exists but does not capture subject {} (its subjects: {}): add the subject to the stream, or name another stream in {}.stream",
                plan.stream,
                plan.subject,
                subjects.join(", "),
                plan.field
            ))
        };
    }
    let config = async_nats::jetstream::stream::Config {
        name: plan.stream.clone(),
        subjects: vec![plan.subject.clone()],
        ..Default::default()
    };
    match tokio::time::timeout(TIMEOUT, js.create_stream(config)).await {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(format!("create stream {} for subject {}: {e}", plan.stream, plan.subject)),
        Err(_) => Err(format!("create stream {}: no answer within {TIMEOUT:?}", plan.stream)),
    }
}

/// Whether a stream subject `filter` (with NATS wildcards: `*` one token,
/// `>` one or more to the end) captures the literal `subject`. Written here
/// because async-nats keeps its matcher private.
pub fn subject_captures(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
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

    fn lease(holder: Option<&str>, renewed: Option<SystemTime>, seconds: Option<i32>) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p-leader"},
            "spec": {
                "holderIdentity": holder,
                "renewTime": renewed.map(|t| k8s_openapi::jiff::Timestamp::try_from(t).expect("timestamp").to_string()),
                "leaseDurationSeconds": seconds,
            }
        }))
        .expect("lease")
    }

    #[test]
    fn the_holder_may_run_tasks_until_safety_before_its_lease_expires() {
        let renewed = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let until = hold_until(&lease(Some("pod-a"), Some(renewed), Some(15)), "pod-a");
        assert_eq!(until, Some(renewed + Duration::from_secs(15) - SAFETY));
        // Not the holder, or nothing to go by: not held.
        assert_eq!(hold_until(&lease(Some("pod-b"), Some(renewed), Some(15)), "pod-a"), None);
        assert_eq!(hold_until(&lease(None, Some(renewed), Some(15)), "pod-a"), None);
        assert_eq!(hold_until(&lease(Some("pod-a"), None, Some(15)), "pod-a"), None);
        assert_eq!(hold_until(&lease(Some("pod-a"), Some(renewed), None), "pod-a"), None);
        assert!(!still_held(&until), "a renewal of 2023 has long run out");
        assert!(still_held(&Some(SystemTime::now() + Duration::from_secs(60))));
        assert!(!still_held(&None));
    }

    #[tokio::test]
    async fn the_tasks_run_out_when_no_renewal_is_seen_and_not_while_renewals_come() {
        let (tx, rx) = watch::channel(Some(SystemTime::now() - Duration::from_millis(1)));
        tokio::time::timeout(Duration::from_secs(5), runs_out(rx.clone())).await.expect("ran out at once");
        tx.send_replace(Some(SystemTime::now() + Duration::from_millis(300)));
        let out = tokio::spawn(runs_out(rx));
        // Renewals keep moving the deadline on: it does not run out meanwhile.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send_replace(Some(SystemTime::now() + Duration::from_millis(300)));
        }
        assert!(!out.is_finished(), "ran out although renewals kept coming");
        // Then none: it runs out by itself.
        tokio::time::timeout(Duration::from_secs(5), out).await.expect("ran out").expect("task");
        // And a lost Lease (None) runs out at once.
        let (tx, rx) = watch::channel(Some(SystemTime::now() + Duration::from_secs(60)));
        let out = tokio::spawn(runs_out(rx));
        tx.send_replace(None);
        tokio::time::timeout(Duration::from_secs(5), out).await.expect("ran out").expect("task");
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
    fn the_leader_provisions_the_nats_streams_the_sinks_name() {
        let s = spec(serde_json::json!({
            "source": {"nats": {"servers": ["nats://n:4222"], "stream": "IN"}},
            "sink": {"nats": {"servers": ["nats://n:4222"], "subject": "orders.out", "stream": "OUT"}},
            "deadLetter": {"nats": {"servers": ["nats://d:4222"], "subject": "orders.dlq"}}
        }));
        let plans = nats_streams(&s);
        assert_eq!(plans.len(), 1, "the dead-letter sink names no stream: it is the user's");
        assert_eq!(
            (plans[0].stream.as_str(), plans[0].subject.as_str(), plans[0].field),
            ("OUT", "orders.out", "spec.sink.nats")
        );
        assert!(kafka_topics(&s).is_empty());
    }

    #[test]
    fn stream_subjects_capture_by_nats_wildcards() {
        for (filter, subject, captures) in [
            ("orders.out", "orders.out", true),
            ("orders.*", "orders.out", true),
            ("orders.>", "orders.out.eu", true),
            ("*.out", "orders.out", true),
            (">", "orders", true),
            ("orders.*", "orders.out.eu", false),
            ("orders.>", "orders", false),
            ("orders.out", "orders", false),
            ("orders", "orders.out", false),
            ("orders.in", "orders.out", false),
        ] {
            assert_eq!(subject_captures(filter, subject), captures, "{filter} ~ {subject}");
        }
    }

    #[test]
    fn nothing_to_provision_without_kafka_sinks() {
        let s = spec(serde_json::json!({
            "source": {"redis": {"url": "redis://r:6379", "stream": "in"}},
            "sink": {"redis": {"url": "redis://r:6379", "stream": "out"}}
        }));
        assert!(kafka_topics(&s).is_empty());
        assert!(nats_streams(&s).is_empty());
    }
}
