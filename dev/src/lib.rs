//! sluice-dev: a real one-node Kubernetes cluster built from pinned upstream
//! sources (dev/cluster/, built by dev/scripts/build-cluster.sh), for the demo
//! and the end-to-end suites. See dev/README.md.
//!
//! ```text
//! config/      upstream configuration files, rendered with a few values (template)
//! components/  one pure builder per process: ClusterConfig -> Component
//! runtime      starts components in dependency order, health with a deadline, stops in reverse
//! pki          a tiny CA: a certificate per component and identity
//! bootstrap    CoreDNS RBAC, kube-dns, host services, KWOK nodes, readiness waits
//! cleanup      what `down` removes from the host
//! image        buildah/mmdebstrap images, `ctr images import`
//! server, kafka a host server process; Apache Kafka on it (the demo's and the suites' broker)
//! keda         optional KEDA: its CRDs, operator and metrics adapter, the external metrics APIService
//! cluster      Cluster::start / Drop: the library API the tests use
//! demo         `sluice-dev demo`: cluster, chart, Kafka, load, live view, picture
//! ```

pub mod audit;
pub mod bootstrap;
pub mod cleanup;
pub mod cluster;
pub mod component;
pub mod components;
pub mod config;
pub mod demo;
pub mod dns;
pub mod e2e;
pub mod host;
pub mod image;
pub mod kafka;
pub mod keda;
pub mod kubeconfig;
pub mod pki;
pub mod runtime;
pub mod server;
pub mod template;

pub use cluster::{Cluster, ClusterError, ClusterOptions};
