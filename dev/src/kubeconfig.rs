//! Kubeconfig files for each identity, and kube clients built from them.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("building a client for {server}: {source}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("kubeconfig for {server}: {source}")]
    Config {
        server: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
}

/// A kubeconfig with one cluster, one user authenticated by a client
/// certificate, and one context named `sluice-dev`.
pub fn render(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
  - name: sluice-dev
    cluster:
      server: {server}
      certificate-authority: {ca}
users:
  - name: sluice-dev
    user:
      client-certificate: {cert}
      client-key: {key}
contexts:
  - name: sluice-dev
    context:
      cluster: sluice-dev
      user: sluice-dev
current-context: sluice-dev
",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display()
    )
}

/// A client from a kubeconfig file.
pub async fn client(path: &Path) -> Result<kube::Client, KubeconfigError> {
    let kc = Kubeconfig::read_from(path)
        .map_err(|source| KubeconfigError::Read { path: path.display().to_string(), source })?;
    let server = path.display().to_string();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| KubeconfigError::Config { server: server.clone(), source })?;
    kube::Client::try_from(config).map_err(|source| KubeconfigError::Client { server, source })
}

/// A client with no credentials that trusts `ca` (for health endpoints).
pub async fn anonymous_client(server: &str, ca: &Path) -> Result<kube::Client, KubeconfigError> {
    let yaml = format!(
        "apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: \"{server}\", certificate-authority: \"{}\"}}}}]
users: [{{name: u, user: {{}}}}]
contexts: [{{name: c, context: {{cluster: c, user: u}}}}]
current-context: c
",
        ca.display()
    );
    let kc = Kubeconfig::from_yaml(&yaml)
        .map_err(|source| KubeconfigError::Config { server: server.to_string(), source })?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|source| KubeconfigError::Config { server: server.to_string(), source })?;
    kube::Client::try_from(config).map_err(|source| KubeconfigError::Client { server: server.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_parseable_kubeconfig() {
        let text = render(
            "https://192.0.2.2:6443",
            Path::new("/p/ca.crt"),
            Path::new("/p/admin.crt"),
            Path::new("/p/admin.key"),
        );
        let kc = Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("sluice-dev"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://192.0.2.2:6443"));
    }
}
