//! The field generators of a `source.generator.template`, parsed here so that
//! validation and the worker's generator agree on one syntax.

use std::{fmt, str::FromStr};

#[derive(Clone, Debug, PartialEq)]
pub enum FieldGenerator {
    /// The message's sequence number within its partition (0, 1, 2, ...).
    Seq,
    /// The message key, `k<n>` with n below `keys`.
    Key,
    /// A random UUID v4 (deterministic under `seed`).
    Uuid,
    /// The generation time, epoch milliseconds.
    Now,
    /// A uniform integer in `[lo, hi]`.
    Int { lo: i64, hi: i64 },
    /// A uniform float in `[lo, hi)`.
    Float { lo: f64, hi: f64 },
    /// One of the listed strings, uniformly.
    Choice(Vec<String>),
    /// This string, always.
    Const(String),
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{input:?}: {reason}; write one of seq, key, uuid, now, int(lo,hi), float(lo,hi), choice(a|b|c), const(text)")]
pub struct FieldGeneratorError {
    input: String,
    reason: &'static str,
}

impl FromStr for FieldGenerator {
    type Err = FieldGeneratorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| FieldGeneratorError { input: s.to_string(), reason };
        let t = s.trim();
        match t {
            "seq" => return Ok(Self::Seq),
            "key" => return Ok(Self::Key),
            "uuid" => return Ok(Self::Uuid),
            "now" => return Ok(Self::Now),
            _ => {}
        }
        let (name, args) =
            t.strip_suffix(')').and_then(|body| body.split_once('(')).ok_or_else(|| err("unknown generator"))?;
        match name {
            "int" => {
                let (lo, hi) = args.split_once(',').ok_or_else(|| err("int takes two bounds"))?;
                let lo: i64 = lo.trim().parse().map_err(|_| err("int bounds must be integers"))?;
                let hi: i64 = hi.trim().parse().map_err(|_| err("int bounds must be integers"))?;
                if lo > hi {
                    return Err(err("int's lower bound exceeds its upper bound"));
                }
                Ok(Self::Int { lo, hi })
            }
            "float" => {
                let (lo, hi) = args.split_once(',').ok_or_else(|| err("float takes two bounds"))?;
                let lo: f64 = lo.trim().parse().map_err(|_| err("float bounds must be numbers"))?;
                let hi: f64 = hi.trim().parse().map_err(|_| err("float bounds must be numbers"))?;
                if !(lo.is_finite() && hi.is_finite()) || lo > hi {
                    return Err(err("float's bounds must be finite with lower <= upper"));
                }
                Ok(Self::Float { lo, hi })
            }
            "choice" => {
                let options: Vec<String> = args.split('|').map(|o| o.trim().to_string()).collect();
                if options.iter().any(String::is_empty) {
                    return Err(err("choice options must not be empty"));
                }
                Ok(Self::Choice(options))
            }
            "const" => Ok(Self::Const(args.to_string())),
            _ => Err(err("unknown generator")),
        }
    }
}

impl fmt::Display for FieldGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Seq => f.write_str("seq"),
            Self::Key => f.write_str("key"),
            Self::Uuid => f.write_str("uuid"),
            Self::Now => f.write_str("now"),
            Self::Int { lo, hi } => write!(f, "int({lo},{hi})"),
            Self::Float { lo, hi } => write!(f, "float({lo},{hi})"),
            Self::Choice(o) => write!(f, "choice({})", o.join("|")),
            Self::Const(c) => write!(f, "const({c})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_generator_and_prints_it_back() {
        for text in
            ["seq", "key", "uuid", "now", "int(1,500)", "float(0.5,2)", "choice(DE|FR|US)", "const(hello, world)"]
        {
            let g: FieldGenerator = text.parse().unwrap();
            assert_eq!(g.to_string(), text);
        }
    }

    #[test]
    fn says_what_is_wrong() {
        for (text, why) in [
            ("random", "unknown generator"),
            ("int(5,1)", "exceeds"),
            ("int(a,b)", "integers"),
            ("int(5)", "two bounds"),
            ("choice(a||b)", "empty"),
            ("float(1,inf)", "finite"),
        ] {
            let e = text.parse::<FieldGenerator>().unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(e.contains("int(lo,hi)"), "{e}");
        }
    }
}
