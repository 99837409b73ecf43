//! The operator's Prometheus metrics: one registry, passed explicitly; names
//! as constants; labels bounded (namespace and name of a StreamProcessor,
//! error class), never a message or a key.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const RECONCILE_DURATION: &str = "sluice_operator_reconcile_duration_seconds";
pub const RECONCILE_STEP_DURATION: &str = "sluice_operator_reconcile_step_seconds";
pub const RECONCILE_ERRORS: &str = "sluice_operator_reconcile_errors_total";
pub const DESIRED_REPLICAS: &str = "sluice_operator_desired_replicas";
pub const LAG: &str = "sluice_operator_lag";
pub const STUCK_PARTITIONS: &str = "sluice_operator_stuck_partitions";
pub const SCALE_EVENTS: &str = "sluice_operator_scale_events_total";
pub const LEADER: &str = "sluice_operator_leader";

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconcile_duration: HistogramVec,
    /// Time in each reconcile step (dereference, scale, apply, report), to
    /// tell the operator's own work from its round trips to the API server.
    pub reconcile_step_duration: HistogramVec,
    pub reconcile_errors: IntCounterVec,
    pub desired_replicas: IntGaugeVec,
    pub lag: IntGaugeVec,
    pub stuck_partitions: IntGaugeVec,
    pub scale_events: IntCounterVec,
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(RECONCILE_DURATION, "Time to reconcile one StreamProcessor")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["outcome"],
        )
        .expect("valid metric");
        let reconcile_step_duration = HistogramVec::new(
            HistogramOpts::new(RECONCILE_STEP_DURATION, "Time in one step of a reconcile").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["step"],
        )
        .expect("valid metric");
        let reconcile_errors =
            IntCounterVec::new(Opts::new(RECONCILE_ERRORS, "Failed reconciles by error class"), &["class"])
                .expect("valid metric");
        let desired_replicas = IntGaugeVec::new(
            Opts::new(DESIRED_REPLICAS, "Worker replicas the operator asks for"),
            &["namespace", "name"],
        )
        .expect("valid metric");
        let lag = IntGaugeVec::new(Opts::new(LAG, "Consumer lag counted for scaling"), &["namespace", "name"])
            .expect("valid metric");
        let stuck_partitions = IntGaugeVec::new(
            Opts::new(STUCK_PARTITIONS, "Partitions with lag whose committed offset stopped moving"),
            &["namespace", "name"],
        )
        .expect("valid metric");
        let scale_events = IntCounterVec::new(
            Opts::new(SCALE_EVENTS, "Replica changes decided by the autoscaler"),
            &["namespace", "name", "direction"],
        )
        .expect("valid metric");
        let leader =
            IntGauge::new(LEADER, "1 while this operator replica holds the leader Lease").expect("valid metric");
        for c in [
            Box::new(reconcile_duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_step_duration.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(desired_replicas.clone()),
            Box::new(lag.clone()),
            Box::new(stuck_partitions.clone()),
            Box::new(scale_events.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            reconcile_duration,
            reconcile_step_duration,
            reconcile_errors,
            desired_replicas,
            lag,
            stuck_partitions,
            scale_events,
            leader,
        }
    }

    /// Forget a deleted StreamProcessor's series.
    pub fn forget(&self, namespace: &str, name: &str) {
        for g in [&self.desired_replicas, &self.lag, &self.stuck_partitions] {
            let _ = g.remove_label_values(&[namespace, name]);
        }
        for d in ["up", "down"] {
            let _ = self.scale_events.remove_label_values(&[namespace, name, d]);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding never fails");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
