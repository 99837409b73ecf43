//! Server-side apply of the worker objects under one field manager, with
//! owner references; and deletion of what the spec no longer calls for.
//!
//! Each object carries a hash of what was applied. When the live object in
//! the watch cache carries the same hash (and, for the Deployment, the same
//! replicas), nothing is sent: a steady state costs the API server no writes,
//! not even after an operator restart.

use std::fmt::Debug;

use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Service, ServiceAccount},
};
use kube::{
    Api, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use sluice_crds::StreamProcessor;

use super::{Context, MANAGER};
use crate::build;

/// Annotation with the hash of what the operator last applied.
pub const APPLIED_HASH: &str = "sluice.io/applied-hash";

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{kind} {name}: another field manager owns a field we set: {0}", kind = .1, name = .2)]
    Conflict(kube::Error, &'static str, String),
    #[error("{kind} {name}: {source}")]
    Api { kind: &'static str, name: String, source: kube::Error },
}

pub async fn apply_all(ctx: &Context, sp: &StreamProcessor, replicas: i32) -> Result<(), ApplyError> {
    let s = &ctx.stores;
    // Pods wait for their ConfigMap and ServiceAccount, so most objects are
    // applied at once: one round trip, not seven. The RoleBinding is the
    // exception: the API server checks that the operator may grant what the
    // Role holds, and that check fails while the Role does not exist yet.
    let service_account = async {
        match build::service_account(sp) {
            Some(sa) => ensure(ctx, &s.service_accounts, sa, |_, _| true).await,
            None => prune(ctx, &s.service_accounts, sp).await,
        }
    };
    let rbac = async {
        ensure(ctx, &s.roles, build::role(sp), |_, _| true).await?;
        ensure(ctx, &s.role_bindings, build::role_binding(sp), |_, _| true).await
    };
    let deployment = build::deployment(sp, &ctx.settings, replicas);
    futures::try_join!(
        ensure(ctx, &s.configmaps, build::configmap(sp), |_, _| true),
        service_account,
        rbac,
        ensure_service(ctx, &s.services, sp),
        ensure(ctx, &s.pdbs, build::pdb(sp), |_, _| true),
        ensure(ctx, &s.deployments, deployment, |live, want| live.spec.replicas == want.spec.replicas),
    )?;
    Ok(())
}

fn hash_of<K: Serialize>(obj: &K) -> String {
    let bytes = serde_json::to_vec(obj).expect("Kubernetes objects always serialize");
    Sha256::digest(&bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Apply `obj` unless the cached copy (`S`: the object or only its
/// metadata) already carries its hash and `same` agrees.
async fn ensure<K, S>(
    ctx: &Context,
    store: &Store<S>,
    mut obj: K,
    same: impl Fn(&S, &K) -> bool,
) -> Result<(), ApplyError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope> + Clone + Debug + Serialize + DeserializeOwned,
    S: Resource<DynamicType = ()> + Clone,
{
    let hash = hash_of(&obj);
    obj.annotations_mut().insert(APPLIED_HASH.into(), hash.clone());
    let (name, ns) = (obj.name_any(), obj.namespace().unwrap_or_default());
    if let Some(live) = store.get(&ObjectRef::new(&name).within(&ns))
        && live.annotations().get(APPLIED_HASH) == Some(&hash)
        && same(&live, &obj)
    {
        return Ok(());
    }
    let kind = leak_kind::<K>();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&obj)).await.map_err(
        |source| match source {
            kube::Error::Api(ref s) if s.code == 409 => ApplyError::Conflict(source, kind, name.clone()),
            source => ApplyError::Api { kind, name: name.clone(), source },
        },
    )?;
    Ok(())
}

/// A Service the operator created with a cluster IP (before its Services
/// became headless, crate::build::service) cannot be made headless in place:
/// `spec.clusterIP` is immutable. It is deleted and created again; its
/// endpoints follow at once and Prometheus finds them again.
async fn ensure_service(
    ctx: &Context,
    store: &Store<PartialObjectMeta<Service>>,
    sp: &StreamProcessor,
) -> Result<(), ApplyError> {
    let (name, ns) = (sp.name_any(), sp.namespace().unwrap_or_default());
    match ensure(ctx, store, build::service(sp), |_, _| true).await {
        Err(ApplyError::Api { source: kube::Error::Api(s), .. })
            if s.code == 422 && s.message.contains("clusterIP") && owned_by(store, &name, &ns, sp) =>
        {
            let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => return Err(ApplyError::Api { kind: "Service", name, source }),
            }
            ensure(ctx, store, build::service(sp), |_, _| true).await
        }
        result => result,
    }
}

/// The cached object `name` exists and names `sp` as an owner.
fn owned_by<S: Resource<DynamicType = ()> + Clone>(
    store: &Store<S>,
    name: &str,
    ns: &str,
    sp: &StreamProcessor,
) -> bool {
    store
        .get(&ObjectRef::new(name).within(ns))
        .is_some_and(|live| live.owner_references().iter().any(|o| Some(&o.uid) == sp.metadata.uid.as_ref()))
}

/// Delete the operator's ServiceAccount for a processor that now names its own.
async fn prune(
    ctx: &Context,
    store: &Store<PartialObjectMeta<ServiceAccount>>,
    sp: &StreamProcessor,
) -> Result<(), ApplyError> {
    let (name, ns) = (sp.name_any(), sp.namespace().unwrap_or_default());
    if !owned_by(store, &name, &ns, sp) {
        return Ok(());
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(ApplyError::Api { kind: "ServiceAccount", name, source }),
    }
}

fn leak_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "ConfigMap" => "ConfigMap",
        "ServiceAccount" => "ServiceAccount",
        "Role" => "Role",
        "RoleBinding" => "RoleBinding",
        "Service" => "Service",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        "Deployment" => "Deployment",
        _ => "object",
    }
}
