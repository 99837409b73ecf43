//! Wiring: watches on StreamProcessors and on every object the operator owns,
//! feeding the reconciler (crate::reconcile). Owned objects are cached by
//! reflectors that the reconciler reads instead of the API server.
//!
//! ```text
//! StreamProcessors ──watch──> cache ──(generation or deletion changed)──┐
//! Deployments ──watch──> cache (no managedFields, no pod template) ─────┤
//!   ──(hash, replicas or the status fields we report changed)──────────┤──> reconcile
//! ConfigMaps, ServiceAccounts, Roles, RoleBindings, Services, PDBs     │
//!   ──metadata-only watch──> cache ──(applied hash changed, deleted)───┘
//! ```
//!
//! What triggers a reconcile is filtered to what can change its outcome: the
//! operator's own writes (its status patches, the children it just created)
//! come back as watch events, and reconciling on each of them made a cold
//! start with a thousand processors run six reconciles per processor, the
//! last ones ahead of processors not reconciled at all yet (the controller's
//! queue pops ready entries newest first).

use std::{
    collections::HashMap,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    core::{DynamicObject, PartialObjectMeta, error_boundary::DeserializeGuard},
    runtime::{
        Controller, PredicateConfig, WatchStreamExt, controller,
        events::{Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use sluice_crds::StreamProcessor;
use tracing::{info, warn};

use crate::{
    build::Settings,
    metrics::Metrics,
    probe::LagProbe,
    reconcile::{self, APPLIED_HASH, Context, MANAGER, Stores},
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

    // Of six of the seven kinds the operator owns, only metadata is read (the
    // applied-hash annotation, owner references): their watches fetch
    // metadata only, so a ConfigMap's copy of the whole spec is not cached.
    macro_rules! child_metadata {
        ($k:ty) => {{
            let (reader, writer) = reflector::store::<PartialObjectMeta<$k>>();
            // An Api of PartialObjectMeta asks the API server for metadata only.
            let events = watcher(api::<PartialObjectMeta<$k>>(&client, ns), owned.clone())
                .default_backoff()
                .modify(|o| o.metadata.managed_fields = None)
                .reflect(writer);
            (reader, meaningful(events, child_fingerprint))
        }};
    }
    let (configmaps, configmap_events) = child_metadata!(ConfigMap);
    let (service_accounts, sa_events) = child_metadata!(ServiceAccount);
    let (roles, role_events) = child_metadata!(Role);
    let (role_bindings, rb_events) = child_metadata!(RoleBinding);
    let (services, service_events) = child_metadata!(Service);
    let (pdbs, pdb_events) = child_metadata!(PodDisruptionBudget);
    // Deployments whole (their status is reported), but without the pod
    // template: the applied-hash annotation stands for it.
    let (deployments, deployment_writer) = reflector::store::<Deployment>();
    let deployment_events = watcher(api::<Deployment>(&client, ns), owned.clone())
        .default_backoff()
        .modify(|d| {
            d.metadata.managed_fields = None;
            d.spec.template.spec = None;
        })
        .reflect(deployment_writer);
    let deployment_events = meaningful(deployment_events, deployment_fingerprint);
    // HPAs are not ours: every one is watched, and one that targets a
    // StreamProcessor (its own namespace, kind StreamProcessor, group
    // sluice.io) triggers that processor's reconcile (crate::hpa).
    let (hpas, hpa_writer) = reflector::store::<HorizontalPodAutoscaler>();
    let hpa_events = watcher(api::<HorizontalPodAutoscaler>(&client, ns), watcher::Config::default())
        .default_backoff()
        .modify(|h| h.metadata.managed_fields = None)
        .reflect(hpa_writer)
        .touched_objects();
    // KEDA ScaledObjects, likewise, as dynamic objects: where KEDA's CRDs
    // are not installed the watch finds nothing to list, backs off and the
    // store stays empty; installed later, it fills (crate::hpa).
    let so_resource = crate::hpa::scaled_object_resource();
    let so_writer = reflector::store::Writer::<DynamicObject>::new(so_resource.clone());
    let scaled_objects = so_writer.as_reader();
    let so_api = match ns {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &so_resource),
        None => Api::<DynamicObject>::all_with(client.clone(), &so_resource),
    };
    let keda_absent_said = std::sync::atomic::AtomicBool::new(false);
    let so_events = watcher(so_api, watcher::Config::default())
        .default_backoff()
        .modify(|s| s.metadata.managed_fields = None)
        .reflect(so_writer)
        .touched_objects()
        .filter_map(move |event| {
            let event = match event {
                Ok(so) => Some(Ok(so)),
                Err(e) => {
                    // Not installed is a normal state: said once, not every backoff.
                    if !keda_absent_said.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        info!("KEDA ScaledObjects cannot be watched ({e}); fine without KEDA, and watched once it is installed");
                    }
                    None::<Result<DynamicObject, watcher::Error>>
                }
            };
            std::future::ready(event)
        });
    let stores = Stores {
        deployments,
        configmaps,
        service_accounts,
        roles,
        role_bindings,
        services,
        pdbs,
        hpas,
        scaled_objects,
    };

    let recorder = Recorder::new(
        client.clone(),
        Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() },
    );
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics, recorder, probe, stores.clone()));

    let processors: Api<DeserializeGuard<StreamProcessor>> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Every status patch comes back as an event on the processor: only a new
    // generation (spec, scale subresource) or a deletion calls for a reconcile.
    let (processor_cache, processor_writer) = reflector::store::<DeserializeGuard<StreamProcessor>>();
    let gone = (ctx.clone(), processor_cache.clone());
    let processor_events = watcher(processors, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|p| p.meta_mut().managed_fields = None)
        .reflect(processor_writer)
        .inspect(move |event| forget_deleted(&gone.0, &gone.1, event))
        .applied_objects()
        .predicate_filter(processor_fingerprint, PredicateConfig::default());
    info!(namespace = ns.unwrap_or("<all>"), "starting the StreamProcessor controller");
    Controller::for_stream(processor_events, processor_cache)
        .with_config(controller::Config::default().concurrency(concurrency()))
        .owns_stream(deployment_events)
        .owns_stream(configmap_events)
        .owns_stream(sa_events)
        .owns_stream(role_events)
        .owns_stream(rb_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .watches_stream_with(
            so_events,
            |so: DynamicObject| {
                crate::hpa::scaled_object_target(&so)
                    .map(|(ns, name)| ObjectRef::<DeserializeGuard<StreamProcessor>>::new(&name).within(&ns))
            },
            so_resource,
        )
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
            match result {
                // An HPA or ScaledObject event for a processor already gone
                // (deleted first, or never created): nothing to do.
                Err(controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(%obj, "an event for a StreamProcessor that does not exist");
                }
                Err(e) => warn!("controller: {e}"),
                Ok(_) => {}
            }
        })
        .await;
    info!("the StreamProcessor controller stopped");
}

/// A deleted processor is not reconciled again (no finalizer), so what the
/// operator keeps for it is dropped here: on its Delete event, and after a
/// relist for every processor the cache no longer has.
fn forget_deleted(
    ctx: &Context,
    cache: &reflector::Store<DeserializeGuard<StreamProcessor>>,
    event: &Result<watcher::Event<DeserializeGuard<StreamProcessor>>, watcher::Error>,
) {
    match event {
        Ok(watcher::Event::Delete(p)) => {
            ctx.tombstone(p.meta().uid.clone());
            ctx.forget(&p.namespace().unwrap_or_default(), &p.name_any());
        }
        Ok(watcher::Event::InitDone) => ctx.forget_all_but(|ns, name| {
            cache.get(&ObjectRef::<DeserializeGuard<StreamProcessor>>::new(name).within(ns)).is_some()
        }),
        _ => {}
    }
}

/// What of a processor calls for a reconcile: its generation (spec and
/// scale subresource) and whether it is being deleted.
fn processor_fingerprint(p: &DeserializeGuard<StreamProcessor>) -> Option<u64> {
    let m = p.meta();
    Some(hash_of(&(m.generation, m.deletion_timestamp.is_some())))
}

/// What of a metadata-only child calls for a reconcile: the hash the
/// operator applied (changed or removed by someone else) and deletion.
fn child_fingerprint<K: Resource>(o: &K) -> u64 {
    hash_of(&(o.annotations().get(APPLIED_HASH), o.meta().deletion_timestamp.is_some()))
}

/// What of a Deployment calls for a reconcile: what `child_fingerprint`
/// covers, its replicas (someone scaled it directly) and the status fields a
/// processor's status reports (crate::reconcile::report).
fn deployment_fingerprint(d: &Deployment) -> u64 {
    let s = d.status.as_ref();
    hash_of(&(
        child_fingerprint(d),
        d.spec.replicas,
        s.and_then(|s| s.replicas),
        s.and_then(|s| s.ready_replicas),
        s.and_then(|s| s.updated_replicas),
        s.and_then(|s| s.observed_generation).unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
    ))
}

fn hash_of(v: &impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// The child events that can change a reconcile's outcome: deletions, and
/// changes of `fingerprint` after the first sight of an object (its first
/// sight follows the reconcile that created it). A (re)list passes every
/// object, so a child deleted while the watch was down is still recreated.
fn meaningful<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    fingerprint: fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    events.filter_map(move |event| {
        let out = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(o)) => {
                let key = (o.namespace().unwrap_or_default(), o.name_any());
                let print = fingerprint(&o);
                match seen.insert(key, print) {
                    Some(old) if old != print => Some(Ok(o)),
                    _ => None,
                }
            }
            Ok(watcher::Event::InitApply(o)) => {
                seen.insert((o.namespace().unwrap_or_default(), o.name_any()), fingerprint(&o));
                Some(Ok(o))
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(&(o.namespace().unwrap_or_default(), o.name_any()));
                Some(Ok(o))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        std::future::ready(out)
    })
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
    async fn one<K: Resource<DynamicType = ()> + Clone>(s: &Store<K>) {
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

#[cfg(test)]
mod tests {
    use futures::{StreamExt, stream};
    use k8s_openapi::api::{apps::v1::DeploymentStatus, core::v1::ConfigMap};
    use kube::api::ObjectMeta;

    use super::*;

    fn configmap(name: &str, hash: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                annotations: Some([(APPLIED_HASH.to_string(), hash.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    fn passed<K: Resource + Send + 'static>(events: Vec<watcher::Event<K>>, print: fn(&K) -> u64) -> Vec<String> {
        let out = meaningful(stream::iter(events.into_iter().map(Ok)), print);
        futures::executor::block_on(out.map(|o| o.map(|o| o.name_any()).unwrap_or_default()).collect())
    }

    #[test]
    fn the_operators_own_creations_and_repeats_trigger_nothing() {
        use watcher::Event::*;
        let events = vec![
            // Created by a reconcile, seen, seen again unchanged.
            Apply(configmap("a", "h1")),
            Apply(configmap("a", "h1")),
            // Someone changed what the operator applied: reconcile.
            Apply(configmap("a", "edited")),
            // Deleted: reconcile (it is recreated).
            Delete(configmap("a", "edited")),
            // Created again: its first sight follows the reconcile that created it.
            Apply(configmap("a", "h1")),
        ];
        assert_eq!(passed(events, child_fingerprint), ["a", "a"]);
    }

    #[test]
    fn a_relist_passes_every_object() {
        use watcher::Event::*;
        let events = vec![Init, InitApply(configmap("a", "h1")), InitApply(configmap("b", "h1")), InitDone];
        assert_eq!(passed(events, child_fingerprint), ["a", "b"]);
    }

    #[test]
    fn deployments_trigger_on_the_status_a_processor_reports() {
        use watcher::Event::*;
        let with = |ready: Option<i32>, conditions: usize| {
            let mut d = Deployment { metadata: configmap("d", "h1").metadata, ..Deployment::default() };
            d.status = Some(DeploymentStatus {
                ready_replicas: ready,
                conditions: Some(vec![Default::default(); conditions]),
                ..DeploymentStatus::default()
            });
            d
        };
        let events = vec![
            Apply(with(None, 0)),
            // A status change a processor does not report.
            Apply(with(None, 1)),
            // readyReplicas is reported.
            Apply(with(Some(1), 1)),
        ];
        assert_eq!(passed(events, deployment_fingerprint), ["d"]);
    }

    #[test]
    fn status_patches_do_not_trigger_the_processor() {
        let mut sp = crate::build::fixtures::example("nats-clean-events.yaml");
        sp.metadata.generation = Some(3);
        let print = |sp: &StreamProcessor| processor_fingerprint(&DeserializeGuard(Ok(sp.clone())));
        let mut patched = sp.clone();
        patched.status = Some(Default::default());
        assert_eq!(print(&sp), print(&patched));
        let mut newer = sp.clone();
        newer.metadata.generation = Some(4);
        assert_ne!(print(&sp), print(&newer));
        let mut deleted = sp.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_ne!(print(&sp), print(&deleted));
    }
}
