//! Window keys: the value of `keyBy`, hashed and ordered.
//!
//! Emission order is (end, start, key), so keys need a total order: by JSON
//! type (null < bool < number < string < other), numbers by value, strings
//! by bytes. Two keys are equal only when they are the same JSON value
//! (`1` and `1.0` are different keys, as JSON values they differ).

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WindowKey {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    /// f64 bits, so that the key can be hashed.
    Float(u64),
    Str(KeyStr),
    /// Arrays and objects, as canonical JSON.
    Other(Box<str>),
}

impl WindowKey {
    pub fn from_json(v: &Value) -> Self {
        match v {
            Value::Null => Self::Null,
            Value::Bool(b) => Self::Bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) if !n.is_f64() => Self::Int(i),
                (None, Some(u), _) if !n.is_f64() => Self::UInt(u),
                (_, _, Some(f)) => Self::Float(f.to_bits()),
                _ => Self::Null,
            },
            Value::String(s) => Self::Str(KeyStr::new(s)),
            other => Self::Other(canonical_json(other).into()),
        }
    }

    pub fn to_json(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Bool(b) => Value::Bool(*b),
            Self::Int(i) => Value::from(*i),
            Self::UInt(u) => Value::from(*u),
            Self::Float(bits) => serde_json::Number::from_f64(f64::from_bits(*bits)).map_or(Value::Null, Value::Number),
            Self::Str(s) => Value::String(s.as_str().to_string()),
            Self::Other(text) => serde_json::from_str(text).unwrap_or(Value::Null),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Self::Null => 0,
            Self::Bool(_) => 1,
            Self::Int(_) | Self::UInt(_) | Self::Float(_) => 2,
            Self::Str(_) => 3,
            Self::Other(_) => 4,
        }
    }

    /// Numbers as (value for ordering, tie-break so ints sort before equal floats).
    fn number(&self) -> Option<(f64, i128, u8)> {
        match self {
            Self::Int(i) => Some((*i as f64, i128::from(*i), 0)),
            Self::UInt(u) => Some((*u as f64, i128::from(*u), 0)),
            Self::Float(bits) => Some((f64::from_bits(*bits), 0, 1)),
            _ => None,
        }
    }
}

impl Ord for WindowKey {
    fn cmp(&self, other: &Self) -> Ordering {
        match self.rank().cmp(&other.rank()) {
            Ordering::Equal => {}
            unequal => return unequal,
        }
        match (self, other) {
            (Self::Bool(a), Self::Bool(b)) => a.cmp(b),
            (Self::Str(a), Self::Str(b)) => a.as_str().cmp(b.as_str()),
            (Self::Other(a), Self::Other(b)) => a.cmp(b),
            (a, b) => match (a.number(), b.number()) {
                (Some((_, x, 0)), Some((_, y, 0))) => x.cmp(&y),
                (Some((x, _, tx)), Some((y, _, ty))) => x.total_cmp(&y).then(tx.cmp(&ty)).then_with(|| {
                    // equal as floats, same kind: compare exactly
                    match (a, b) {
                        (Self::Float(p), Self::Float(q)) => f64::from_bits(*p).total_cmp(&f64::from_bits(*q)),
                        _ => a.number().map(|n| n.1).cmp(&b.number().map(|n| n.1)),
                    }
                }),
                _ => Ordering::Equal,
            },
        }
    }
}

impl PartialOrd for WindowKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A string key stored inline up to 22 bytes: no allocation per event and
/// no pointer chase when a hash map compares keys (most keys are short ids).
#[derive(Clone)]
pub enum KeyStr {
    Inline { len: u8, buf: [u8; 22] },
    Heap(Box<str>),
}

impl KeyStr {
    pub fn new(s: &str) -> Self {
        if s.len() <= 22 {
            let mut buf = [0u8; 22];
            buf[..s.len()].copy_from_slice(s.as_bytes());
            Self::Inline { len: s.len() as u8, buf }
        } else {
            Self::Heap(s.into())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Built from a &str in `new`, cut at its length: valid UTF-8.
            Self::Inline { len, buf } => std::str::from_utf8(&buf[..usize::from(*len)]).unwrap_or_default(),
            Self::Heap(s) => s,
        }
    }
}

impl PartialEq for KeyStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for KeyStr {}

impl std::hash::Hash for KeyStr {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for KeyStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl Serialize for KeyStr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for KeyStr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(Self::new(&s))
    }
}

/// JSON with object keys sorted, whatever map type serde_json was built
/// with: equal values render equal (distinctCount and keys rely on it).
pub fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(obj) => {
                let mut keys: Vec<&String> = obj.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    write(&obj[k], out);
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_order_by_type_then_value() {
        let mut keys: Vec<WindowKey> =
            [json!("b"), json!(10), json!(null), json!(2.5), json!("a"), json!(9), json!(true)]
                .iter()
                .map(WindowKey::from_json)
                .collect();
        keys.sort();
        let back: Vec<Value> = keys.iter().map(WindowKey::to_json).collect();
        assert_eq!(back, vec![json!(null), json!(true), json!(2.5), json!(9), json!(10), json!("a"), json!("b")]);
    }

    #[test]
    fn one_and_one_point_zero_are_different_keys() {
        let a = WindowKey::from_json(&json!(1));
        let b = WindowKey::from_json(&json!(1.0));
        assert_ne!(a, b);
        assert_ne!(a.cmp(&b), Ordering::Equal);
    }

    #[test]
    fn short_and_long_string_keys_behave_alike() {
        let long = "x".repeat(40);
        for text in ["", "k1", "twenty-two-bytes-key!!", &long, "ünïcödé"] {
            let k = WindowKey::from_json(&json!(text));
            assert_eq!(k.to_json(), json!(text));
            let back: WindowKey = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
            assert_eq!(back, k);
        }
        assert!(WindowKey::from_json(&json!("a")) < WindowKey::from_json(&json!("aa")));
    }

    #[test]
    fn canonical_json_sorts_object_keys() {
        assert_eq!(canonical_json(&json!({"b": 1, "a": [1, {"d": 2, "c": 3}]})), r#"{"a":[1,{"c":3,"d":2}],"b":1}"#);
    }
}
