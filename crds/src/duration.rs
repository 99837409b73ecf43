//! Durations as users write them in a spec: `100ms`, `10s`, `5m`, `1h30m`.
//!
//! The text is kept as written, so a spec read and written back (the operator
//! mounts it as JSON for the worker) is byte-for-byte what the user applied.
//! The syntax is the subset that both `humantime` (which parses it here) and
//! Go's `time.ParseDuration` (which the API server's CEL `duration()` uses in
//! our validation rules) accept, so a rule like `duration(self.slide) <=
//! duration(self.size)` means the same thing on both sides.

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema pattern, also used by `FromStr`.
pub const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

#[derive(Clone, Debug, Eq)]
pub struct Duration {
    text: String,
    value: std::time::Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a duration; write a number and a unit (ms, s, m, h), like 500ms, 10s, 5m or 1h30m")]
pub struct DurationError {
    input: String,
}

impl Duration {
    pub fn as_std(&self) -> std::time::Duration {
        self.value
    }

    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.value.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// A duration built in code (defaults, tests); rendered in the user syntax.
    pub fn from_millis(ms: u64) -> Self {
        let text = if ms == 0 {
            "0s".to_string()
        } else if ms.is_multiple_of(3_600_000) {
            format!("{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) {
            format!("{}m", ms / 60_000)
        } else if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        Self { text, value: std::time::Duration::from_millis(ms) }
    }
}

impl PartialEq for Duration {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

fn matches_pattern(s: &str) -> bool {
    // ^([0-9]+(ms|s|m|h))+$ without pulling a regex engine into the API crate.
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let digits_start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == digits_start {
            return false;
        }
        match &s[i..] {
            rest if rest.starts_with("ms") => i += 2,
            rest if rest.starts_with('s') || rest.starts_with('m') || rest.starts_with('h') => i += 1,
            _ => return false,
        }
    }
    true
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError { input: s.to_string() };
        if !matches_pattern(s) {
            return Err(err());
        }
        let value = humantime::parse_duration(s).map_err(|_| err())?;
        Ok(Self { text: s.to_string(), value })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "description": "A duration: a number and a unit (ms, s, m, h), like 500ms, 10s, 5m or 1h30m."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_user_syntax() {
        for (text, ms) in [("100ms", 100), ("10s", 10_000), ("5m", 300_000), ("1h30m", 5_400_000), ("0s", 0)] {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn rejects_what_go_would_not_parse() {
        for text in ["", "10", "1d", "1.5h", "10 s", "-5s", "s", "5sec", "1h 30m"] {
            let err = text.parse::<Duration>().unwrap_err();
            assert!(err.to_string().contains("10s"), "{text}: {err}");
        }
    }

    #[test]
    fn round_trips_through_json_as_written() {
        let d: Duration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert_eq!(Duration::from_millis(90_000).to_string(), "90s");
        assert_eq!(Duration::from_millis(600_000).to_string(), "10m");
        assert_eq!(Duration::from_millis(250).to_string(), "250ms");
    }
}
