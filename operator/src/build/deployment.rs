//! The worker Deployment.

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
            HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
            SecretKeySelector, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::ResourceExt;
use sluice_crds::{StreamProcessor, secrets::secret_envs};

use super::{CONFIG_FILE, CONFIG_MOUNT, Settings, config_hash, labels, meta, selector_labels, service_account_name};

/// The worker's one HTTP port: /metrics, /healthz, /readyz.
pub const HTTP_PORT: i32 = 8080;

/// Annotation on the pod template holding [`config_hash`].
pub const CONFIG_HASH_ANNOTATION: &str = "sluice.io/config-hash";

/// The worker Deployment at `replicas`.
pub fn deployment(sp: &StreamProcessor, settings: &Settings, replicas: i32) -> Deployment {
    let overlay = sp.spec.pod.clone().unwrap_or_default();

    let mut pod_labels = overlay.labels.clone();
    pod_labels.extend(labels(sp));
    let mut annotations = overlay.annotations.clone();
    annotations.insert(CONFIG_HASH_ANNOTATION.into(), config_hash(sp));

    let field_env = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..ObjectFieldSelector::default() }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let value_env = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..EnvVar::default() };
    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        value_env("SLUICE_HTTP_ADDR", format!("0.0.0.0:{HTTP_PORT}")),
        // The Lease the workers take turns holding for singleton tasks.
        value_env("SLUICE_LEASE_NAME", super::lease_name(sp)),
        value_env("SHUTDOWN_GRACE_PERIOD", format!("{}s", (settings.termination_grace_seconds - 5).max(1))),
    ];
    env.extend(secret_envs(&sp.spec).into_iter().map(|s| EnvVar {
        name: s.env,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: s.secret, key: s.key, optional: Some(false) }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }));
    // User entries last, so they can override the tuning variables (BATCH_SIZE, ...).
    env.extend(overlay.env.iter().cloned());

    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    };

    let container = Container {
        name: "worker".into(),
        image: Some(sp.spec.image.clone().unwrap_or_else(|| settings.worker_image.clone())),
        image_pull_policy: Some(settings.image_pull_policy.clone()),
        command: Some(vec!["/usr/local/bin/sluice-worker".into()]),
        args: Some(vec!["run".into(), format!("{CONFIG_MOUNT}/{CONFIG_FILE}")]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 3)),
        resources: sp.spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_MOUNT.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..VolumeMount::default() },
        ]),
        ..Container::default()
    };

    let pod = PodSpec {
        service_account_name: Some(service_account_name(sp)),
        termination_grace_period_seconds: Some(settings.termination_grace_seconds),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }),
            ..PodSecurityContext::default()
        }),
        node_selector: (!overlay.node_selector.is_empty()).then(|| overlay.node_selector.clone()),
        tolerations: (!overlay.tolerations.is_empty()).then(|| overlay.tolerations.clone()),
        containers: vec![container],
        volumes: Some(vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource { name: sp.name_any(), ..ConfigMapVolumeSource::default() }),
                ..Volume::default()
            },
            Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
        ]),
        ..PodSpec::default()
    };

    Deployment {
        metadata: meta(sp, sp.name_any()),
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(sp)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::build::fixtures::example;

    fn env_names(d: &Deployment) -> BTreeMap<String, EnvVar> {
        d.spec
            .template
            .spec
            .iter()
            .flat_map(|p| p.containers.iter())
            .flat_map(|c| c.env.iter().flatten())
            .map(|e| (e.name.clone(), e.clone()))
            .collect()
    }

    fn pod(d: &Deployment) -> &PodSpec {
        d.spec.template.spec.as_ref().unwrap()
    }

    #[test]
    fn restricted_pod_security_and_probes() {
        let sp = example("kafka-orders-by-country.yaml");
        let d = deployment(&sp, &Settings::default(), 3);
        assert_eq!(d.spec.replicas, Some(3));
        let p = pod(&d);
        let psc = p.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let c = &p.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/healthz"));
        assert_eq!(c.resources, sp.spec.resources);
        assert_eq!(c.image.as_deref(), Some(Settings::default().worker_image.as_str()));
    }

    #[test]
    fn secrets_arrive_as_secret_key_refs_never_values() {
        let sp = example("kafka-orders-by-country.yaml");
        let env = env_names(&deployment(&sp, &Settings::default(), 1));
        let pw = &env["SLUICE_SECRET_STATE_REDIS_PASSWORD"];
        assert!(pw.value.is_none());
        let r = pw.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("redis-auth", "password"));
        assert!(env["POD_NAME"].value_from.as_ref().unwrap().field_ref.is_some());
        assert!(env["POD_NAMESPACE"].value_from.as_ref().unwrap().field_ref.is_some());
    }

    #[test]
    fn overlay_applies_and_user_env_comes_last() {
        let mut sp = example("nats-clean-events.yaml");
        let overlay = sp.spec.pod.get_or_insert_with(Default::default);
        overlay.env.push(EnvVar { name: "BATCH_SIZE".into(), value: Some("64".into()), ..EnvVar::default() });
        overlay.labels.insert("team".into(), "web".into());
        overlay.labels.insert("app.kubernetes.io/instance".into(), "spoofed".into());
        overlay.node_selector.insert("pool".into(), "stream".into());
        let d = deployment(&sp, &Settings::default(), 2);
        let tpl = d.spec.template.metadata.as_ref().unwrap();
        let labels = tpl.labels.as_ref().unwrap();
        assert_eq!(labels["team"], "web");
        assert_eq!(labels["app.kubernetes.io/instance"], "clean-clicks", "the selector labels cannot be overridden");
        let c = &pod(&d).containers[0];
        assert_eq!(c.env.as_ref().unwrap().last().unwrap().name, "BATCH_SIZE");
        assert_eq!(pod(&d).node_selector.as_ref().unwrap()["pool"], "stream");
    }

    #[test]
    fn pipeline_change_rolls_the_pods_and_replicas_do_not() {
        let sp = example("nats-clean-events.yaml");
        let hash = |d: &Deployment| {
            d.spec.template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()[CONFIG_HASH_ANNOTATION].clone()
        };
        let a = deployment(&sp, &Settings::default(), 1);
        let b = deployment(&sp, &Settings::default(), 5);
        assert_eq!(hash(&a), hash(&b));
        let mut changed = sp.clone();
        changed.spec.pipeline[0].filter = Some("true".into());
        assert_ne!(hash(&a), hash(&deployment(&changed, &Settings::default(), 1)));
    }

    #[test]
    fn only_owned_fields_are_set() {
        // Server-side apply owns every field we send: no defaults the API server would fill in.
        let sp = example("generator-windows.yaml");
        let json = serde_json::to_value(deployment(&sp, &Settings::default(), 1)).unwrap();
        let spec = &json["spec"];
        assert!(spec.get("strategy").is_none());
        assert!(spec.get("revisionHistoryLimit").is_none());
        assert!(spec["template"]["spec"].get("dnsPolicy").is_none());
        assert!(spec["template"]["spec"].get("restartPolicy").is_none());
    }
}
