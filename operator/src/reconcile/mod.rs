//! Reconcile one StreamProcessor, in steps, each a module with its own error
//! type:
//!
//! ```text
//! dereference (spec + Secrets) -> validate -> build (pure, crate::build)
//!   -> scale (probe the broker, decide replicas) -> apply (server-side apply,
//!   prune) -> report (status, Events, metrics)
//! ```
//!
//! A spec problem (invalid spec, missing Secret) is not an error of the
//! reconcile: it is reported as a `Degraded` condition and an Event, the last
//! good workers keep running, and the operator waits for a change. Errors are
//! what the API server or the network did; they requeue with backoff.

mod apply;
mod dereference;
mod report;
mod scale;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{ConfigMap, Service, ServiceAccount},
    policy::v1::PodDisruptionBudget,
    rbac::v1::{Role, RoleBinding},
};
use kube::{
    Client, ResourceExt,
    core::{PartialObjectMeta, error_boundary::DeserializeGuard},
    runtime::{controller::Action, events::Recorder, reflector::Store},
};
use sluice_crds::StreamProcessor;
use tracing::{info, warn};

pub use apply::{APPLIED_HASH, ApplyError};
pub use dereference::DereferenceError;
pub use report::ReportError;

use crate::{autoscale::ScaleMemory, build::Settings, metrics::Metrics, probe::LagProbe};

/// The field manager of everything the operator writes.
pub const MANAGER: &str = "sluice-operator";

/// Caches of the objects the operator owns, fed by the controller's watches.
/// Of all but the Deployments only metadata is kept: the applied-hash
/// annotation says whether they are current (crate::reconcile::apply).
#[derive(Clone)]
pub struct Stores {
    /// Without their pod templates (crate::controller).
    pub deployments: Store<Deployment>,
    pub configmaps: Store<PartialObjectMeta<ConfigMap>>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    pub roles: Store<PartialObjectMeta<Role>>,
    pub role_bindings: Store<PartialObjectMeta<RoleBinding>>,
    pub services: Store<PartialObjectMeta<Service>>,
    pub pdbs: Store<PartialObjectMeta<PodDisruptionBudget>>,
    /// Every HPA (not only the operator's: it owns none), to find those that
    /// target a StreamProcessor (crate::hpa).
    pub hpas: Store<HorizontalPodAutoscaler>,
    /// Every KEDA ScaledObject (empty where KEDA's CRDs are not installed),
    /// to say when KEDA does not act on one (crate::hpa).
    pub scaled_objects: Store<kube::core::DynamicObject>,
}

/// Autoscaler state of one StreamProcessor between reconciles.
#[derive(Default)]
pub struct ScaleState {
    pub memory: ScaleMemory,
    /// When the broker was last probed (ms on the operator's clock).
    pub last_probe_ms: Option<u64>,
    /// The last probe's outcome, reused between polls.
    pub last: Option<scale::Outcome>,
}

pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub probe: Arc<dyn LagProbe>,
    pub stores: Stores,
    pub scale: Mutex<HashMap<(String, String), ScaleState>>,
    /// Uids of processors deleted since the last relist: a reconcile that
    /// was under way when its processor went (a probe takes seconds) puts
    /// back what the deletion dropped, so it drops it again at its end.
    deleted: Mutex<std::collections::HashSet<String>>,
    /// Every processor reconciled since it was last forgotten: it may have
    /// gauges and a probe connection even without autoscaler state.
    known: Known,
    started: Instant,
}

/// The processors the operator holds something for (gauges, autoscaler
/// memory, a probe's connection), so that a relist drops everything of
/// those deleted while the watch was down, whatever they had.
#[derive(Default)]
struct Known(Mutex<std::collections::HashSet<(String, String)>>);

impl Known {
    fn insert(&self, namespace: &str, name: &str) {
        if let Ok(mut k) = self.0.lock() {
            k.insert((namespace.to_string(), name.to_string()));
        }
    }

    fn remove(&self, namespace: &str, name: &str) {
        if let Ok(mut k) = self.0.lock() {
            k.remove(&(namespace.to_string(), name.to_string()));
        }
    }

    /// Those `exists` does not name.
    fn gone(&self, exists: impl Fn(&str, &str) -> bool) -> Vec<(String, String)> {
        match self.0.lock() {
            Ok(k) => k.iter().filter(|(ns, name)| !exists(ns, name)).cloned().collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Context {
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        recorder: Recorder,
        probe: Arc<dyn LagProbe>,
        stores: Stores,
    ) -> Self {
        Self {
            client,
            settings,
            metrics,
            recorder,
            probe,
            stores,
            scale: Mutex::default(),
            deleted: Mutex::default(),
            known: Known::default(),
            started: Instant::now(),
        }
    }

    /// Drops what the operator keeps for a processor between reconciles
    /// (autoscaler memory, its gauges, the probe's broker connection): the
    /// processor was deleted. Without a finalizer a deleted processor is
    /// never reconciled again, so the controller's watch calls this.
    pub fn forget(&self, namespace: &str, name: &str) {
        self.known.remove(namespace, name);
        self.metrics.forget(namespace, name);
        if let Ok(mut m) = self.scale.lock() {
            m.remove(&(namespace.to_string(), name.to_string()));
        }
        self.probe.forget(namespace, name);
    }

    /// The processor with `uid` was deleted ([`Context::forget`] it too).
    pub fn tombstone(&self, uid: Option<String>) {
        if let (Some(uid), Ok(mut d)) = (uid, self.deleted.lock()) {
            d.insert(uid);
        }
    }

    fn is_deleted(&self, uid: Option<&str>) -> bool {
        uid.is_some_and(|u| self.deleted.lock().is_ok_and(|d| d.contains(u)))
    }

    /// Keeps what the operator holds only for the processors `exists` names
    /// (after a relist: deletions while the watch was down send no event).
    pub fn forget_all_but(&self, exists: impl Fn(&str, &str) -> bool) {
        if let Ok(mut d) = self.deleted.lock() {
            d.clear();
        }
        let mut gone = self.known.gone(&exists);
        if let Ok(m) = self.scale.lock() {
            gone.extend(m.keys().filter(|(ns, name)| !exists(ns, name)).cloned());
        }
        gone.sort_unstable();
        gone.dedup();
        for (ns, name) in gone {
            self.forget(&ns, &name);
        }
    }

    /// `namespace/name` has gauges (and maybe a probe) to drop when it goes.
    pub fn remember(&self, namespace: &str, name: &str) {
        self.known.insert(namespace, name);
    }

    /// Monotonic milliseconds since the operator started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading the spec's references: {0}")]
    Dereference(#[from] DereferenceError),
    #[error("applying the worker objects: {0}")]
    Apply(#[from] ApplyError),
    #[error("reporting status: {0}")]
    Report(#[from] ReportError),
}

impl Error {
    /// Bounded label for metrics and the log.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Dereference(_) => "dereference",
            Error::Apply(ApplyError::Conflict(..)) => "conflict",
            Error::Apply(_) => "apply",
            Error::Report(_) => "report",
        }
    }
}

/// The controller's reconcile function.
pub async fn reconcile(guard: Arc<DeserializeGuard<StreamProcessor>>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(sp) if sp.metadata.deletion_timestamp.is_some() => {
            ctx.forget(&sp.namespace().unwrap_or_default(), &sp.name_any());
            Ok(Action::await_change())
        }
        Ok(sp) => {
            let result = reconcile_processor(sp, &ctx).await;
            if ctx.is_deleted(sp.metadata.uid.as_deref()) {
                ctx.forget(&sp.namespace().unwrap_or_default(), &sp.name_any());
            }
            result
        }
        Err(invalid) => {
            // One object we cannot read must not stop the others: report it and move on.
            report::undeserializable(&ctx, invalid).await?;
            Ok(Action::await_change())
        }
    };
    let outcome = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconcile_duration.with_label_values(&[outcome]).observe(started.elapsed().as_secs_f64());
    result
}

/// Time one step of a reconcile into the step histogram.
async fn step<T>(ctx: &Context, step: &'static str, fut: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    let out = fut.await;
    ctx.metrics.reconcile_step_duration.with_label_values(&[step]).observe(started.elapsed().as_secs_f64());
    out
}

async fn reconcile_processor(sp: &StreamProcessor, ctx: &Context) -> Result<Action, Error> {
    let (ns, name) = (sp.namespace().unwrap_or_default(), sp.name_any());

    // dereference + validate
    let spec_problem = dereference::spec_problem(sp);
    let secrets = match &spec_problem {
        Some(_) => Err(None),
        None => step(ctx, "dereference", dereference::secrets(&ctx.client, sp)).await.map_err(Some),
    };
    let (secrets, problem) = match secrets {
        Ok(s) => (s, spec_problem),
        Err(Some(dereference::Missing::Problem(p))) => (Default::default(), Some(p)),
        Err(Some(dereference::Missing::Error(e))) => return Err(e.into()),
        Err(None) => (Default::default(), spec_problem),
    };

    // HPAs (KEDA's or plain) on the scale subresource: conflicts, failures.
    // KEDA ScaledObjects count before KEDA made their HPA; one without it
    // for long means KEDA is not running (or refuses it).
    let hpas = crate::hpa::targeting(ctx.stores.hpas.state().iter().map(|h| h.as_ref()), &ns, &name);
    let scaled_objects = crate::hpa::scaled_objects_targeting(
        ctx.stores.scaled_objects.state().iter().map(|s| s.as_ref()),
        &ns,
        &name,
        k8s_openapi::jiff::Timestamp::now(),
    );
    let keda_problems = crate::hpa::scaled_object_problems(sp.spec.scaling.is_some(), &scaled_objects, &hpas);
    let autoscalers = crate::hpa::with_scaled_objects(hpas, &scaled_objects);
    let mut autoscaler_problems = crate::hpa::problems(sp.spec.scaling.is_some(), &autoscalers);
    autoscaler_problems.extend(keda_problems);
    // One KEDA has not acted on yet is looked at again when its grace ends.
    let keda_recheck = crate::hpa::recheck_after(&scaled_objects);

    let live = ctx.stores.deployments.get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns));
    let current = live.as_ref().and_then(|d| d.spec.replicas).unwrap_or(0);

    if let Some(problem) = problem {
        // Keep the last good workers; say what is wrong; wait for a fix.
        warn!(namespace = %ns, name = %name, reason = problem.reason, "{}; keeping the last good workers until it is fixed", problem.message);
        step(
            ctx,
            "report",
            report::report(ctx, sp, live.as_deref(), Some(problem), &autoscaler_problems, current, None),
        )
        .await?;
        // Secrets are not watched: look again in a while.
        return Ok(Action::requeue(Duration::from_secs(30)));
    }

    // scale
    let mut replicas = step(ctx, "scale", scale::decide(ctx, sp, &secrets, current, live.is_some())).await;
    replicas.problems.extend(autoscaler_problems);

    // build + apply
    step(ctx, "apply", apply::apply_all(ctx, sp, replicas.desired)).await?;
    if let Some(from) = replicas.changed_from {
        info!(namespace = %ns, name = %name, from, to = replicas.desired, "scaling workers");
    }

    // report
    step(ctx, "report", report::report(ctx, sp, live.as_deref(), None, &replicas.problems, current, Some(&replicas)))
        .await?;

    Ok(Action::requeue(keda_recheck.map_or(replicas.requeue, |k| k.min(replicas.requeue))))
}

/// Requeue failed reconciles with backoff by error class.
pub fn error_policy(_guard: Arc<DeserializeGuard<StreamProcessor>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.with_label_values(&[error.metric_label()]).inc();
    warn!(class = error.metric_label(), "reconcile failed: {error}; retrying");
    match error {
        Error::Apply(ApplyError::Conflict(..)) => Action::requeue(Duration::from_secs(2)),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relist_finds_every_known_processor_that_is_gone() {
        let known = Known::default();
        known.insert("a", "kept");
        known.insert("a", "deleted");
        known.insert("b", "deleted");
        known.insert("b", "forgotten");
        known.remove("b", "forgotten");
        let mut gone = known.gone(|ns, name| (ns, name) == ("a", "kept"));
        gone.sort();
        assert_eq!(gone, vec![("a".to_string(), "deleted".to_string()), ("b".to_string(), "deleted".to_string())]);
    }
}
