//! What a worker may do with the API: hold its Lease, and record Events.

use k8s_openapi::api::{
    core::v1::ServiceAccount,
    rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
};
use kube::ResourceExt;
use sluice_crds::StreamProcessor;

use super::{lease_name, meta, service_account_name};

/// The operator's own ServiceAccount for the workers; None when the spec
/// names an existing one (`spec.pod.serviceAccountName`).
pub fn service_account(sp: &StreamProcessor) -> Option<ServiceAccount> {
    let named = sp.spec.pod.as_ref().and_then(|p| p.service_account_name.as_ref()).is_some();
    (!named).then(|| ServiceAccount { metadata: meta(sp, sp.name_any()), ..ServiceAccount::default() })
}

pub fn role(sp: &StreamProcessor) -> Role {
    let rule = |group: &str, resource: &str, names: Option<Vec<String>>, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        resource_names: names,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    Role {
        metadata: meta(sp, sp.name_any()),
        rules: Some(vec![
            // `create` cannot be limited by name (the object does not exist yet).
            rule("coordination.k8s.io", "leases", None, &["create"]),
            rule("coordination.k8s.io", "leases", Some(vec![lease_name(sp)]), &["get", "patch", "update"]),
            rule("events.k8s.io", "events", None, &["create", "patch"]),
        ]),
    }
}

pub fn role_binding(sp: &StreamProcessor) -> RoleBinding {
    RoleBinding {
        metadata: meta(sp, sp.name_any()),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: sp.name_any(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: service_account_name(sp),
            namespace: sp.namespace(),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures::example;

    #[test]
    fn lease_access_is_limited_to_the_processors_lease() {
        let sp = example("nats-clean-events.yaml");
        let role = role(&sp);
        let rules = role.rules.unwrap();
        assert_eq!(rules[1].resource_names.as_deref(), Some(&["clean-clicks-leader".to_string()][..]));
        assert!(!rules.iter().any(|r| r.verbs.iter().any(|v| v == "*" || v == "delete" || v == "list")));
        assert_eq!(role_binding(&sp).subjects.unwrap()[0].name, "clean-clicks");
    }

    #[test]
    fn a_named_service_account_replaces_the_operators() {
        let mut sp = example("nats-clean-events.yaml");
        assert!(service_account(&sp).is_some());
        sp.spec.pod.get_or_insert_with(Default::default).service_account_name = Some("team-sa".into());
        assert!(service_account(&sp).is_none());
        assert_eq!(role_binding(&sp).subjects.unwrap()[0].name, "team-sa");
    }
}
