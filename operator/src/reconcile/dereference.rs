//! Read what the spec refers to, and check what the API server cannot.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use sluice_crds::{StreamProcessor, secrets::secret_envs};

use crate::{probe::ResolvedSecrets, status::Problem};

#[derive(Debug, thiserror::Error)]
pub enum DereferenceError {
    #[error("reading Secret {namespace}/{name}: {source}")]
    Secret { namespace: String, name: String, source: kube::Error },
}

/// Why the Secrets could not be resolved.
pub enum Missing {
    /// A Secret or key that does not exist: the user's to fix.
    Problem(Problem),
    /// The API server failed: ours to retry.
    Error(DereferenceError),
}

/// What `validate()` finds, as one Degraded problem naming every field.
pub fn spec_problem(sp: &StreamProcessor) -> Option<Problem> {
    sp.spec
        .validate()
        .err()
        .map(|errors| Problem { reason: "InvalidSpec", message: errors.to_string().replace('\n', "; ") })
}

/// The value of every Secret key the spec references, by worker env name.
pub async fn secrets(client: &Client, sp: &StreamProcessor) -> Result<ResolvedSecrets, Missing> {
    let ns = sp.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let mut fetched: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    let mut values = ResolvedSecrets::new();
    let mut missing = Vec::new();
    for env in secret_envs(&sp.spec) {
        if !fetched.contains_key(&env.secret) {
            let secret = api.get_opt(&env.secret).await.map_err(|source| {
                Missing::Error(DereferenceError::Secret { namespace: ns.clone(), name: env.secret.clone(), source })
            })?;
            fetched.insert(env.secret.clone(), secret);
        }
        let value = fetched[&env.secret].as_ref().map(|s| {
            s.data
                .as_ref()
                .and_then(|d| d.get(&env.key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                .or_else(|| s.string_data.as_ref().and_then(|d| d.get(&env.key)).cloned())
        });
        match value {
            None => missing.push(format!("{}: Secret {ns}/{} not found", env.spec_path, env.secret)),
            Some(None) => {
                missing.push(format!("{}: Secret {ns}/{} has no key {:?}", env.spec_path, env.secret, env.key))
            }
            Some(Some(v)) => {
                values.insert(env.env, v);
            }
        }
    }
    missing.dedup();
    if missing.is_empty() {
        Ok(values)
    } else {
        Err(Missing::Problem(Problem {
            reason: "SecretMissing",
            message: format!("{}; create it or fix the reference", missing.join("; ")),
        }))
    }
}
