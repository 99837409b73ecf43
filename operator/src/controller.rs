//! Wiring: watches on StreamProcessors and on every object the operator owns,
//! feeding the reconciler (crate::reconcile). Owned objects are cached by
//! reflectors that the reconciler reads instead of the API server.

use std::{future::Future, sync::Arc};

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Resource,
    core::error_boundary::DeserializeGuard,
    runtime::{
        Controller, WatchStreamExt, controller,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use sluice_crds::StreamProcessor;
use tracing::{info, warn};

use crate::{
    build::Settings,
    metrics::Metrics,
    probe::LagProbe,
    reconcile::{self, Context, MANAGER, Stores},
};

/// Only what the operator labels as its own is cached.
const OWNED_SELECTOR: &str = "app.kubernetes.io/managed-by=sluice-operator";

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Run the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    settings: Settings,
    metrics: Metrics,
    probe: Arc<dyn LagProbe>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = namespace.as_deref();
    let owned = watcher::Config::default().labels(OWNED_SELECTOR);

    macro_rules! child {
        ($k:ty) => {{
            let (reader, writer) = reflector::store::<$k>();
            let stream =
                watcher(api::<$k>(&client, ns), owned.clone()).default_backoff().reflect(writer).touched_objects();
            (reader, stream)
        }};
    }
    let (deployments, deployment_events) = child!(Deployment);
    let (configmaps, configmap_events) = child!(ConfigMap);
    let (service_accounts, sa_events) = child!(ServiceAccount);
    let (roles, role_events) = child!(Role);
    let (role_bindings, rb_events) = child!(RoleBinding);
    let (services, service_events) = child!(Service);
    let (pdbs, pdb_events) = child!(PodDisruptionBudget);
    // HPAs are not ours: every one is watched, and one that targets a
    // StreamProcessor (its own namespace, kind StreamProcessor, group
    // sluice.io) triggers that processor's reconcile (crate::hpa).
    let (hpas, hpa_writer) = reflector::store::<HorizontalPodAutoscaler>();
    let hpa_events = watcher(api::<HorizontalPodAutoscaler>(&client, ns), watcher::Config::default())
        .default_backoff()
        .reflect(hpa_writer)
        .touched_objects();
    let stores = Stores { deployments, configmaps, service_accounts, roles, role_bindings, services, pdbs, hpas };

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
    );
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics, recorder, probe, stores.clone()));

    let processors: Api<DeserializeGuard<StreamProcessor>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    info!(namespace = ns.unwrap_or("<all>"), "starting the StreamProcessor controller");
    Controller::new(processors, watcher::Config::default().any_semantic())
        .with_config(controller::Config::default().concurrency(concurrency()))
        .owns_stream(deployment_events)
        .owns_stream(configmap_events)
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(rb_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .watches_stream(hpa_events, |hpa: HorizontalPodAutoscaler| {
            let (ns, name) = (hpa.metadata.namespace.clone().unwrap_or_default(), &hpa.spec.scale_target_ref.name);
            crate::hpa::targets(&hpa, &ns, name)
                .then(|| ObjectRef::<DeserializeGuard<StreamProcessor>>::new(name).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj, ctx: Arc<Context>| {
                let stores = stores.clone();
                async move {
                    // Decide on a full cache: a restart must not re-apply what is already there.
                    wait_ready(&stores).await;
                    reconcile::reconcile(obj, ctx).await
                }
            },
            reconcile::error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!("controller: {e}");
            }
        })
        .await;
    info!("the StreamProcessor controller stopped");
}

/// Reconciles running at once (`SLUICE_RECONCILE_CONCURRENCY`, default 32).
/// Unbounded, a cold start with a thousand processors sent thousands of
/// requests at once: each waited seconds in the API server's fair queues and
/// held its own connection and buffers in the operator (385 MiB). Bounded,
/// the same work flows through a few dozen connections; the rest wait in the
/// controller's queue, which costs nothing.
fn concurrency() -> u16 {
    std::env::var("SLUICE_RECONCILE_CONCURRENCY").ok().and_then(|v| v.parse().ok()).filter(|n| *n > 0).unwrap_or(32)
}

async fn wait_ready(s: &Stores) {
    async fn one<K: Resource<DynamicType = ()> + Clone + DeserializeOwned>(s: &Store<K>) {
        let _ = s.wait_until_ready().await;
    }
    one(&s.deployments).await;
    one(&s.configmaps).await;
    one(&s.service_accounts).await;
    one(&s.roles).await;
    one(&s.role_bindings).await;
    one(&s.services).await;
    one(&s.pdbs).await;
    // Not the HPAs: a chart without their RBAC must not stop every reconcile
    // (their watch backs off and logs); an HPA that arrives later triggers
    // its processor's reconcile.
}
