//! A tiny certificate authority for the cluster (after controller-runtime's
//! envtest `certs/tinyca.go`): one CA per cluster, a serving or client
//! certificate per component, all ECDSA P-256, written as PEM files.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating a certificate for {name}: {source}")]
    Generate {
        name: String,
        #[source]
        source: rcgen::Error,
    },
}

/// What one certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    /// Subject CN: the user name the API server sees for client certificates.
    pub common_name: String,
    /// Subject O: the groups the API server sees for client certificates.
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub server: bool,
    pub client: bool,
}

impl CertSpec {
    pub fn client(common_name: impl Into<String>, organizations: &[&str]) -> Self {
        CertSpec {
            common_name: common_name.into(),
            organizations: organizations.iter().map(|o| o.to_string()).collect(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            server: false,
            client: true,
        }
    }

    pub fn server(common_name: impl Into<String>, dns_names: &[&str], ips: &[IpAddr]) -> Self {
        CertSpec {
            common_name: common_name.into(),
            organizations: Vec::new(),
            dns_names: dns_names.iter().map(|d| d.to_string()).collect(),
            ip_addresses: ips.to_vec(),
            server: true,
            client: false,
        }
    }
}

/// A PEM certificate and its PKCS#8 private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster's certificate authority.
pub struct TinyCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for TinyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TinyCa").finish_non_exhaustive()
    }
}

fn generate_err(name: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate { name: name.to_string(), source }
}

impl TinyCa {
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let err = generate_err(common_name);
        let key = KeyPair::generate().map_err(generate_err(common_name))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).map_err(generate_err(common_name))?;
        let key_pem = key.serialize_pem();
        Ok(TinyCa { cert_pem: cert.pem(), key_pem, issuer: Issuer::new(params, key) })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate signed by this CA.
    pub fn issue(&self, spec: &CertSpec) -> Result<CertPair, PkiError> {
        let name = spec.common_name.as_str();
        let key = KeyPair::generate().map_err(generate_err(name))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate_err(name))?;
        params.distinguished_name.push(DnType::CommonName, name);
        for org in &spec.organizations {
            params.distinguished_name.push(DnType::OrganizationName, org.as_str());
        }
        for dns in &spec.dns_names {
            let dns = dns.clone().try_into().map_err(generate_err(name))?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if spec.server {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(generate_err(name))?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// A broker's TLS identity for the test harness: a CA of its own, a
/// serving certificate for `localhost` and `ips` and a client certificate
/// (CN `sluice-worker`, for mutual TLS), both signed by it. Clients trust
/// `ca_pem`; the broker serves `server` and, verifying clients, trusts
/// `ca_pem` too.
#[derive(Debug, Clone)]
pub struct BrokerTls {
    pub ca_pem: String,
    pub server: CertPair,
    pub client: CertPair,
}

impl BrokerTls {
    pub fn generate(broker: &str, ips: &[IpAddr]) -> Result<Self, PkiError> {
        let ca = TinyCa::new(&format!("{broker}-test-ca"))?;
        let server = ca.issue(&CertSpec::server(broker, &["localhost"], ips))?;
        let client = ca.issue(&CertSpec::client("sluice-worker", &[]))?;
        Ok(BrokerTls { ca_pem: ca.cert_pem().to_string(), server, client })
    }
}

/// A key pair for signing service account tokens (private and public PEM).
pub fn service_account_key() -> Result<CertPair, PkiError> {
    let key = KeyPair::generate().map_err(generate_err("service-accounts"))?;
    Ok(CertPair { cert_pem: key.public_key_pem(), key_pem: key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_certificates() {
        let ca = TinyCa::new("sluice-dev-ca").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let pair = ca.issue(&CertSpec::client("system:node:n", &["system:nodes"])).unwrap();
        assert!(pair.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(pair.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let server = ca
            .issue(&CertSpec::server("kube-apiserver", &["kubernetes.default.svc"], &["127.0.0.1".parse().unwrap()]))
            .unwrap();
        assert_ne!(server.cert_pem, pair.cert_pem);
    }

    #[test]
    fn service_account_key_has_public_half() {
        let sa = service_account_key().unwrap();
        assert!(sa.cert_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
    }
}
