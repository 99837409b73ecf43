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
    Str(Box<str>),
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
            Value::String(s) => Self::Str(s.as_str().into()),
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
            Self::Str(s) => Value::String(s.to_string()),
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
            (Self::Str(a), Self::Str(b)) | (Self::Other(a), Self::Other(b)) => a.cmp(b),
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
    fn canonical_json_sorts_object_keys() {
        assert_eq!(canonical_json(&json!({"b": 1, "a": [1, {"d": 2, "c": 3}]})), r#"{"a":[1,{"c":3,"d":2}],"b":1}"#);
    }
}
