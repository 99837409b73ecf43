//! The message model every stage shares.
//!
//! ```text
//! source ──Message{key, payload bytes, headers, partition, offset, timestamp}──> pool
//!                        │
//!                        └─ payload parsed as JSON at most once, and only when a
//!                           step reads it (a pass-through pipeline never parses)
//! ```
//!
//! A `map` step edits the parsed payload; the bytes are then re-rendered once,
//! by the sink, not after every step.

use std::sync::OnceLock;

use serde_json::Value;

/// Where a message came from, so its delivery can be acknowledged: the
/// source's partition and the offset (or sequence) within it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AckId {
    pub partition: i32,
    pub offset: i64,
}

/// Why a payload could not be read as JSON; permanent for that message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("payload is not valid JSON: {0}")]
pub struct PayloadError(pub String);

/// The payload: bytes as received, and the parsed JSON once a step needed it.
#[derive(Debug, Default)]
pub struct Payload {
    /// `None` after a step changed the JSON: the bytes are stale.
    bytes: Option<Vec<u8>>,
    json: OnceLock<Result<Value, PayloadError>>,
    /// The parsed JSON holds only some fields (see `project`).
    projected: bool,
}

impl Clone for Payload {
    fn clone(&self) -> Self {
        let json = OnceLock::new();
        if let Some(v) = self.json.get() {
            let _ = json.set(v.clone());
        }
        Self { bytes: self.bytes.clone(), json, projected: self.projected }
    }
}

impl Payload {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self { bytes: Some(bytes), json: OnceLock::new(), projected: false }
    }

    /// A payload built from JSON (windows' records, the generator): no parse
    /// is ever needed, and the bytes are rendered only if a sink asks.
    pub fn from_json(value: Value) -> Self {
        let json = OnceLock::new();
        let _ = json.set(Ok(value));
        Self { bytes: None, json, projected: false }
    }

    /// Both forms at once, when the producer has them anyway.
    pub fn from_parts(bytes: Vec<u8>, value: Value) -> Self {
        let json = OnceLock::new();
        let _ = json.set(Ok(value));
        Self { bytes: Some(bytes), json, projected: false }
    }

    /// The JSON payload, parsed on first use.
    pub fn json(&self) -> Result<&Value, &PayloadError> {
        self.json
            .get_or_init(|| {
                let bytes = self.bytes.as_deref().unwrap_or_default();
                serde_json::from_slice(bytes).map_err(|e| PayloadError(e.to_string()))
            })
            .as_ref()
    }

    /// Parse only the named top-level fields (skipping the rest without
    /// allocating), when the pipeline knows nothing else is ever read: no
    /// step edits the payload and no expression reads it whole. Sinks still
    /// get the original bytes. A payload that is not an object is parsed in
    /// full, so errors read the same as without projection.
    pub fn project(&mut self, fields: &[String]) {
        if self.json.get().is_some() {
            return;
        }
        let bytes = self.bytes.as_deref().unwrap_or_default();
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed =
            serde::Deserializer::deserialize_any(&mut de, Projection(fields)).and_then(|v| de.end().map(|()| v));
        match parsed {
            Ok(Some(v)) => {
                let _ = self.json.set(Ok(v));
                self.projected = true;
            }
            Ok(None) | Err(_) => {
                let _ = self.json();
            }
        }
    }

    /// Drop a projected parse when the message leaves the pipeline, so that
    /// whoever reads it next (a sink's envelope) sees the whole payload.
    pub fn forget_projection(&mut self) {
        if self.projected {
            self.json = OnceLock::new();
            self.projected = false;
        }
    }

    /// The JSON payload for editing; the bytes are re-rendered when next read.
    pub fn json_mut(&mut self) -> Result<&mut Value, PayloadError> {
        self.forget_projection();
        if let Err(e) = self.json() {
            return Err(e.clone());
        }
        self.bytes = None;
        match self.json.get_mut() {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(e.clone()),
            None => Err(PayloadError("payload was not parsed".into())),
        }
    }

    /// The payload as bytes: as received, or rendered from the edited JSON.
    pub fn to_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        match (&self.bytes, self.json.get()) {
            (Some(b), _) => std::borrow::Cow::Borrowed(b.as_slice()),
            (None, Some(Ok(v))) => std::borrow::Cow::Owned(serde_json::to_vec(v).unwrap_or_default()),
            (None, _) => std::borrow::Cow::Borrowed(&[]),
        }
    }

    /// Whether the JSON has been parsed (tests check laziness with it).
    pub fn is_parsed(&self) -> bool {
        self.json.get().is_some()
    }
}

/// Deserializes an object keeping only some fields; `None` for non-objects.
struct Projection<'f>(&'f [String]);

impl<'de> serde::de::Visitor<'de> for Projection<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.0.iter().any(|f| f.as_str() == key.as_ref()) {
                obj.insert(key.into_owned(), map.next_value::<Value>()?);
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Some(Value::Object(obj)))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// One message flowing through the worker.
#[derive(Clone, Debug, Default)]
pub struct Message {
    pub key: Option<Vec<u8>>,
    pub payload: Payload,
    pub headers: Vec<(String, Vec<u8>)>,
    pub partition: i32,
    pub offset: i64,
    /// Source timestamp (or arrival time), epoch milliseconds.
    pub timestamp: i64,
}

impl Message {
    pub fn new(partition: i32, offset: i64, payload: Vec<u8>) -> Self {
        Self { partition, offset, payload: Payload::from_bytes(payload), ..Default::default() }
    }

    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_timestamp(mut self, ts: i64) -> Self {
        self.timestamp = ts;
        self
    }

    pub fn ack_id(&self) -> AckId {
        AckId { partition: self.partition, offset: self.offset }
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    /// The key as text, for expressions and logs (lossy for binary keys).
    pub fn key_str(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.key.as_deref().map(String::from_utf8_lossy)
    }
}

/// Now, epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_parsed_lazily_and_once() {
        let m = Message::new(0, 1, br#"{"a":1}"#.to_vec());
        assert!(!m.payload.is_parsed());
        assert_eq!(m.payload.json().unwrap()["a"], 1);
        assert!(m.payload.is_parsed());
        assert_eq!(&*m.payload.to_bytes(), br#"{"a":1}"#);
    }

    #[test]
    fn edits_rerender_the_bytes() {
        let mut m = Message::new(0, 1, br#"{"a":1}"#.to_vec());
        m.payload.json_mut().unwrap()["b"] = 2.into();
        assert_eq!(&*m.payload.to_bytes(), br#"{"a":1,"b":2}"#);
    }

    #[test]
    fn projection_keeps_only_the_named_fields_and_the_bytes() {
        let mut m = Message::new(0, 1, br#"{"a":1,"b":{"deep":[1,2]},"c":"x","a2":null}"#.to_vec());
        m.payload.project(&["a".into(), "c".into()]);
        assert_eq!(m.payload.json().unwrap(), &serde_json::json!({"a": 1, "c": "x"}));
        assert_eq!(&*m.payload.to_bytes(), br#"{"a":1,"b":{"deep":[1,2]},"c":"x","a2":null}"#);
        m.payload.forget_projection();
        assert_eq!(m.payload.json().unwrap()["b"]["deep"][1], 2, "whole again once it leaves the pipeline");
        for bad in [&b"{\"a\":1"[..], b"[1,2]", b"7", b"{\"a\":1} trailing"] {
            let mut m = Message::new(0, 1, bad.to_vec());
            m.payload.project(&["a".into()]);
            let full = Message::new(0, 1, bad.to_vec());
            assert_eq!(m.payload.json().ok(), full.payload.json().ok(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn malformed_payload_is_an_error_not_a_panic() {
        let mut m = Message::new(0, 1, b"{not json".to_vec());
        assert!(m.payload.json().is_err());
        assert!(m.payload.json_mut().is_err());
        assert_eq!(&*m.payload.to_bytes(), b"{not json");
    }
}
