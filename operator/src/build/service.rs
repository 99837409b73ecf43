//! The metrics Service and the PodDisruptionBudget.

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::ResourceExt;
use sluice_crds::StreamProcessor;

use super::{HTTP_PORT, meta, selector_labels};

/// A Service in front of the workers' HTTP port, for Prometheus (a
/// ServiceMonitor or PodMonitor selects it by its labels).
///
/// Headless: Prometheus scrapes each worker through the Service's
/// endpoints and never needs a virtual IP. A cluster IP would cost every
/// processor an allocation from the cluster's one service range, which the
/// API server serializes: with a thousand processors created at once,
/// creating a Service took 2.7 s (median) while the other six children took
/// 70 ms (docs/benchmarks.md, "Operator at scale").
pub fn service(sp: &StreamProcessor) -> Service {
    Service {
        metadata: meta(sp, sp.name_any()),
        spec: Some(ServiceSpec {
            cluster_ip: Some(HEADLESS.into()),
            selector: Some(selector_labels(sp)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// `spec.clusterIP` of a headless Service.
pub const HEADLESS: &str = "None";

/// One worker at a time may be evicted: a drain moves partitions gradually.
pub fn pdb(sp: &StreamProcessor) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(sp, sp.name_any()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(sp)), ..LabelSelector::default() }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::example;

    #[test]
    fn service_and_pdb_select_the_workers() {
        let sp = example("redis-payments-dlq.yaml");
        let svc = service(&sp);
        assert_eq!(svc.spec.as_ref().unwrap().selector.as_ref(), Some(&selector_labels(&sp)));
        assert_eq!(svc.spec.as_ref().unwrap().cluster_ip.as_deref(), Some(HEADLESS));
        assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, HTTP_PORT);
        let pdb = pdb(&sp);
        assert_eq!(pdb.spec.unwrap().selector.unwrap().match_labels, Some(selector_labels(&sp)));
    }
}
