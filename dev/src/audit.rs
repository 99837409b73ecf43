//! Reads the kube-apiserver's audit log (JSON lines, one event per request)
//! as (user, verb, resource, subresource, namespace, code) records, so that
//! tests can prove what an identity did and was allowed to do.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub user: String,
    pub verb: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub code: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("reading audit log {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    stage: Option<String>,
    verb: Option<String>,
    user: Option<User>,
    object_ref: Option<ObjectRef>,
    response_status: Option<Status>,
}

#[derive(Deserialize)]
struct User {
    username: Option<String>,
}

#[derive(Deserialize)]
struct ObjectRef {
    resource: Option<String>,
    subresource: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct Status {
    code: Option<u16>,
}

/// Parses audit log text. Only completed requests (stage ResponseComplete or
/// Panic) become records; lines that are not events are skipped.
pub fn parse(text: &str) -> Vec<AuditRecord> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Event>(l).ok())
        .filter(|e| matches!(e.stage.as_deref(), Some("ResponseComplete") | Some("Panic")))
        .map(|e| {
            let o = e.object_ref;
            AuditRecord {
                user: e.user.and_then(|u| u.username).unwrap_or_default(),
                verb: e.verb.unwrap_or_default(),
                resource: o.as_ref().and_then(|o| o.resource.clone()).unwrap_or_default(),
                subresource: o.as_ref().and_then(|o| o.subresource.clone()).unwrap_or_default(),
                namespace: o.and_then(|o| o.namespace).unwrap_or_default(),
                code: e.response_status.and_then(|s| s.code).unwrap_or(0),
            }
        })
        .collect()
}

/// Reads every record written so far (the API server flushes its batch
/// every second).
pub fn read(path: &Path) -> Result<Vec<AuditRecord>, AuditError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| AuditError::Read { path: path.display().to_string(), source })?;
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_completed_requests() {
        let text = r#"{"kind":"Event","level":"Metadata","stage":"ResponseComplete","verb":"get","user":{"username":"system:serviceaccount:ns:sa","groups":["x"]},"objectRef":{"resource":"pods","subresource":"log","namespace":"ns","name":"p"},"responseStatus":{"code":403}}
{"kind":"Event","stage":"ResponseStarted","verb":"watch","user":{"username":"u"}}
not json
{"kind":"Event","stage":"ResponseComplete","verb":"list","user":{"username":"admin"},"objectRef":{"resource":"nodes"},"responseStatus":{"code":200}}"#;
        let r = parse(text);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            AuditRecord {
                user: "system:serviceaccount:ns:sa".into(),
                verb: "get".into(),
                resource: "pods".into(),
                subresource: "log".into(),
                namespace: "ns".into(),
                code: 403
            }
        );
        assert_eq!(r[1].namespace, "");
        assert_eq!(r[1].code, 200);
    }
}
