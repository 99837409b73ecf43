//! User CEL expressions, compiled once per step and evaluated per message.
//!
//! Converting a whole JSON payload into CEL values costs microseconds per
//! message, which alone would miss the engine's 1M msg/s/core target. So:
//!
//! ```text
//! source text ──compile──> Expression
//!                           ├─ Fast: comparisons, &&, ||, !, has(), field paths
//!                           │        and literals, read straight off the JSON;
//!                           │        anything unusual at run time (a missing
//!                           │        field, mixed types) defers to CEL below,
//!                           │        so both paths give one answer
//!                           └─ Cel:  the `cel` interpreter, fed only the
//!                                    top-level payload fields the expression
//!                                    reads (and `meta` only if it reads it)
//! ```
//!
//! A runtime error (missing field, wrong type) is that message's permanent
//! error: the caller dead-letters the message, never crashes.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use cel::{
    Context, Env, Program, Value as CelValue,
    common::ast::{Expr, IdedExpr, LiteralValue, operators},
    objects::{Key, Map as CelMap},
};
use serde_json::{Number, Value};

use crate::message::{Message, PayloadError};

/// A user expression that does not compile; names the expression and why.
#[derive(Clone, Debug, thiserror::Error)]
#[error("invalid CEL expression {source_text:?}: {reason}")]
pub struct CompileError {
    pub source_text: String,
    pub reason: String,
}

/// Why an expression failed on one message: permanent for that message.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("{expr:?} failed: {reason}")]
    Cel { expr: String, reason: String },
    #[error("{expr:?} returned {got}, expected {want}")]
    Type { expr: String, got: String, want: &'static str },
}

impl EvalError {
    /// The bounded metric label / dead-letter reason.
    pub fn reason(&self) -> &'static str {
        match self {
            EvalError::Payload(_) => "bad_payload",
            EvalError::Cel { .. } | EvalError::Type { .. } => "expression",
        }
    }
}

/// The environment every user expression runs in: the CEL standard library
/// plus the strings extension (`upperAscii()`, `split()`, ...), which the
/// examples use.
pub fn environment() -> Arc<Env> {
    let mut env = Env::stdlib();
    // Both extensions only register functions; failing means a name clash
    // inside the cel crate, which its own tests rule out.
    let _ = env.add_extension(cel::extensions::strings);
    let _ = env.add_extension(cel::extensions::math);
    Arc::new(env)
}

/// Which payload fields the CEL fallback must convert.
#[derive(Clone, Debug, PartialEq)]
enum Fields {
    None,
    Some(Vec<String>),
    Whole,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum MetaField {
    Key,
    Partition,
    Offset,
    Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// The directly evaluated subset.
#[derive(Clone, Debug)]
enum Fast {
    Const(Value),
    Path(Vec<String>),
    Meta(MetaField),
    Has(Vec<String>),
    Compare(Cmp, Box<Fast>, Box<Fast>),
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
    Arith(Arith, Box<Fast>, Box<Fast>),
    Neg(Box<Fast>),
    /// `double(x)`, `int(x)`, `size(x)`, `x.upperAscii()`, `x.lowerAscii()`.
    Func(Func, Box<Fast>),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Func {
    Double,
    Int,
    Size,
    Upper,
    Lower,
}

/// The fast path cannot decide: let CEL give the exact answer or error.
struct Defer;

/// A compiled user expression.
#[derive(Clone)]
pub struct Expression {
    source: Arc<str>,
    fast: Option<Fast>,
    program: Arc<Program>,
    env: Arc<Env>,
    fields: Fields,
    reads_meta: bool,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expression").field("source", &self.source).field("fast", &self.fast.is_some()).finish()
    }
}

impl Expression {
    pub fn compile(source: &str, env: &Arc<Env>) -> Result<Self, CompileError> {
        let program = env.compile(source).map_err(|e| CompileError {
            source_text: source.to_string(),
            reason: e.errors.iter().map(|pe| pe.msg.clone()).collect::<Vec<_>>().join("; "),
        })?;
        let root = program.expression();
        let fast = fast(root);
        let mut fields = Fields::None;
        let mut reads_meta = false;
        referenced(root, &mut fields, &mut reads_meta);
        Ok(Self { source: source.into(), fast, program: Arc::new(program), env: env.clone(), fields, reads_meta })
    }

    /// Compile with the default environment (tests, benches).
    pub fn parse(source: &str) -> Result<Self, CompileError> {
        Self::compile(source, &environment())
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this expression has a direct evaluator (benchmarks report it).
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The top-level payload fields this expression reads; `None` when it
    /// reads the payload as a whole (`size(msg)`, `msg[k]`).
    pub fn payload_fields(&self) -> Option<&[String]> {
        match &self.fields {
            Fields::None => Some(&[]),
            Fields::Some(f) => Some(f),
            Fields::Whole => None,
        }
    }

    /// Whether evaluating this reads the payload (so it must parse).
    pub fn reads_payload(&self) -> bool {
        self.fields != Fields::None
    }

    /// Evaluate against one message.
    pub fn eval<'m>(&'m self, msg: &'m Message) -> Result<Cow<'m, Value>, EvalError> {
        let json = if self.reads_payload() { Some(msg.payload.json().map_err(|e| e.clone())?) } else { None };
        if let Some(f) = &self.fast
            && let Ok(v) = eval_fast(f, json, msg)
        {
            return Ok(v);
        }
        self.eval_cel(json, msg).map(Cow::Owned)
    }

    /// Evaluate, expecting a boolean (filters).
    pub fn eval_bool(&self, msg: &Message) -> Result<bool, EvalError> {
        match self.eval(msg)?.as_ref() {
            Value::Bool(b) => Ok(*b),
            other => Err(EvalError::Type { expr: self.source.to_string(), got: type_name(other), want: "bool" }),
        }
    }

    /// The CEL interpreter path, with only what the expression reads converted.
    pub fn eval_cel(&self, json: Option<&Value>, msg: &Message) -> Result<Value, EvalError> {
        let mut ctx = Context::with_env(self.env.clone());
        if let Some(json) = json {
            let value = match (&self.fields, json) {
                (Fields::Some(names), Value::Object(obj)) => {
                    let mut m: HashMap<Key, CelValue> = HashMap::with_capacity(names.len());
                    for n in names {
                        if let Some(v) = obj.get(n) {
                            m.insert(Key::String(Arc::new(n.clone())), to_cel(v));
                        }
                    }
                    CelValue::Map(CelMap { map: Arc::new(m) })
                }
                (_, v) => to_cel(v),
            };
            ctx.add_variable_from_value("msg", value);
        }
        if self.reads_meta {
            ctx.add_variable_from_value("meta", meta_value(msg));
        }
        self.program
            .execute(&ctx)
            .map_err(|e| EvalError::Cel { expr: self.source.to_string(), reason: e.to_string() })
            .and_then(|v| from_cel(&v).map_err(|reason| EvalError::Cel { expr: self.source.to_string(), reason }))
    }

    /// The naive evaluation: the whole payload and meta converted every time.
    /// Kept as the benchmark baseline that the fast paths are measured against.
    pub fn eval_naive(&self, msg: &Message) -> Result<Value, EvalError> {
        let json = msg.payload.json().map_err(|e| e.clone())?;
        let mut ctx = Context::with_env(self.env.clone());
        ctx.add_variable_from_value("msg", to_cel(json));
        ctx.add_variable_from_value("meta", meta_value(msg));
        self.program
            .execute(&ctx)
            .map_err(|e| EvalError::Cel { expr: self.source.to_string(), reason: e.to_string() })
            .and_then(|v| from_cel(&v).map_err(|reason| EvalError::Cel { expr: self.source.to_string(), reason }))
    }
}

pub fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "double",
        Value::Number(_) => "int",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "map",
    }
    .to_string()
}

// ------------------------------------------------------------ analysis --

/// Collect the payload fields and whether `meta` is read.
fn referenced(e: &IdedExpr, fields: &mut Fields, meta: &mut bool) {
    fn add(fields: &mut Fields, name: &str) {
        match fields {
            Fields::Whole => {}
            Fields::None => *fields = Fields::Some(vec![name.to_string()]),
            Fields::Some(v) => {
                if !v.iter().any(|f| f == name) {
                    v.push(name.to_string());
                }
            }
        }
    }
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => match name.as_str() {
            "msg" => *fields = Fields::Whole,
            "meta" => *meta = true,
            _ => {}
        },
        Expr::Select(s) => match &s.operand.expr {
            Expr::Ident(name) if name == "msg" => add(fields, &s.field),
            _ => referenced(&s.operand, fields, meta),
        },
        Expr::Call(c) => {
            if let Some(t) = &c.target {
                referenced(t, fields, meta);
            }
            c.args.iter().for_each(|a| referenced(a, fields, meta));
        }
        Expr::List(l) => l.elements.iter().for_each(|a| referenced(a, fields, meta)),
        Expr::Map(m) => m.entries.iter().for_each(|entry| match &entry.expr {
            cel::common::ast::EntryExpr::StructField(f) => referenced(&f.value, fields, meta),
            cel::common::ast::EntryExpr::MapEntry(me) => {
                referenced(&me.key, fields, meta);
                referenced(&me.value, fields, meta);
            }
        }),
        Expr::Struct(s) => s.entries.iter().for_each(|entry| match &entry.expr {
            cel::common::ast::EntryExpr::StructField(f) => referenced(&f.value, fields, meta),
            cel::common::ast::EntryExpr::MapEntry(me) => {
                referenced(&me.key, fields, meta);
                referenced(&me.value, fields, meta);
            }
        }),
        Expr::Comprehension(c) => {
            // A loop variable named like ours shadows it: convert everything.
            if [Some(&c.iter_var), c.iter_var2.as_ref(), Some(&c.accu_var)]
                .into_iter()
                .flatten()
                .any(|v| v == "msg" || v == "meta")
            {
                *fields = Fields::Whole;
                *meta = true;
            }
            for part in [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                referenced(part, fields, meta);
            }
        }
    }
}

/// The direct evaluator for an expression, if it is in the fast subset.
fn fast(e: &IdedExpr) -> Option<Fast> {
    match &e.expr {
        Expr::Literal(lit) => Some(Fast::Const(match lit {
            LiteralValue::Boolean(b) => Value::Bool(*b.inner()),
            LiteralValue::Int(i) => Value::from(*i.inner()),
            LiteralValue::UInt(u) => Value::from(*u.inner()),
            LiteralValue::Double(d) => Value::Number(Number::from_f64(*d.inner())?),
            LiteralValue::String(s) => Value::String(s.inner().to_string()),
            LiteralValue::Null => Value::Null,
            LiteralValue::Bytes(_) => return None,
        })),
        Expr::Select(s) => {
            if let Some(m) = meta_field(e) {
                return Some(m);
            }
            let path = msg_path(e)?;
            if s.test { Some(Fast::Has(path)) } else { Some(Fast::Path(path)) }
        }
        Expr::Call(c) if c.target.is_none() => {
            let cmp = match c.func_name.as_str() {
                operators::EQUALS => Some(Cmp::Eq),
                operators::NOT_EQUALS => Some(Cmp::Ne),
                operators::LESS => Some(Cmp::Lt),
                operators::LESS_EQUALS => Some(Cmp::Le),
                operators::GREATER => Some(Cmp::Gt),
                operators::GREATER_EQUALS => Some(Cmp::Ge),
                _ => None,
            };
            match (cmp, c.func_name.as_str(), c.args.as_slice()) {
                (Some(op), _, [a, b]) => Some(Fast::Compare(op, Box::new(fast(a)?), Box::new(fast(b)?))),
                (None, operators::LOGICAL_AND, [a, b]) => Some(Fast::And(Box::new(fast(a)?), Box::new(fast(b)?))),
                (None, operators::LOGICAL_OR, [a, b]) => Some(Fast::Or(Box::new(fast(a)?), Box::new(fast(b)?))),
                (None, operators::LOGICAL_NOT, [a]) => Some(Fast::Not(Box::new(fast(a)?))),
                (None, operators::NEGATE, [a]) => Some(Fast::Neg(Box::new(fast(a)?))),
                (None, op, [a, b]) => {
                    let op = match op {
                        operators::ADD => Arith::Add,
                        operators::SUBSTRACT => Arith::Sub,
                        operators::MULTIPLY => Arith::Mul,
                        operators::DIVIDE => Arith::Div,
                        operators::MODULO => Arith::Rem,
                        _ => return None,
                    };
                    Some(Fast::Arith(op, Box::new(fast(a)?), Box::new(fast(b)?)))
                }
                (None, "double", [a]) => Some(Fast::Func(Func::Double, Box::new(fast(a)?))),
                (None, "int", [a]) => Some(Fast::Func(Func::Int, Box::new(fast(a)?))),
                (None, "size", [a]) => Some(Fast::Func(Func::Size, Box::new(fast(a)?))),
                _ => None,
            }
        }
        Expr::Call(c) if c.args.is_empty() => {
            let f = match c.func_name.as_str() {
                "upperAscii" => Func::Upper,
                "lowerAscii" => Func::Lower,
                "size" => Func::Size,
                _ => return None,
            };
            Some(Fast::Func(f, Box::new(fast(c.target.as_deref()?)?)))
        }
        _ => None,
    }
}

fn arith(op: Arith, a: &Value, b: &Value) -> Result<Value, Defer> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if !x.is_f64() && !y.is_f64() => {
            let (x, y) = (x.as_i64().ok_or(Defer)?, y.as_i64().ok_or(Defer)?);
            let r = match op {
                Arith::Add => x.checked_add(y),
                Arith::Sub => x.checked_sub(y),
                Arith::Mul => x.checked_mul(y),
                Arith::Div => x.checked_div(y),
                Arith::Rem => x.checked_rem(y),
            };
            r.map(Value::from).ok_or(Defer)
        }
        (Value::Number(x), Value::Number(y)) if x.is_f64() && y.is_f64() => {
            let (x, y) = (x.as_f64().ok_or(Defer)?, y.as_f64().ok_or(Defer)?);
            let r = match op {
                Arith::Add => x + y,
                Arith::Sub => x - y,
                Arith::Mul => x * y,
                Arith::Div => x / y,
                Arith::Rem => return Err(Defer),
            };
            Number::from_f64(r).map(Value::Number).ok_or(Defer)
        }
        (Value::String(x), Value::String(y)) if op == Arith::Add => Ok(Value::String(format!("{x}{y}"))),
        _ => Err(Defer),
    }
}

fn func(f: Func, v: &Value) -> Result<Value, Defer> {
    Ok(match (f, v) {
        (Func::Double, Value::Number(n)) if !n.is_f64() => {
            Value::Number(Number::from_f64(n.as_i64().ok_or(Defer)? as f64).ok_or(Defer)?)
        }
        (Func::Double, Value::Number(n)) => Value::Number(n.clone()),
        (Func::Int, Value::Number(n)) if !n.is_f64() => Value::from(n.as_i64().ok_or(Defer)?),
        (Func::Size, Value::String(s)) => Value::from(s.chars().count() as i64),
        (Func::Size, Value::Array(a)) => Value::from(a.len() as i64),
        (Func::Size, Value::Object(o)) => Value::from(o.len() as i64),
        (Func::Upper, Value::String(s)) => Value::String(s.to_ascii_uppercase()),
        (Func::Lower, Value::String(s)) => Value::String(s.to_ascii_lowercase()),
        _ => return Err(Defer),
    })
}

/// `meta.key` and friends.
fn meta_field(e: &IdedExpr) -> Option<Fast> {
    let Expr::Select(s) = &e.expr else { return None };
    let Expr::Ident(root) = &s.operand.expr else { return None };
    if root != "meta" || s.test {
        return None;
    }
    Some(Fast::Meta(match s.field.as_str() {
        "key" => MetaField::Key,
        "partition" => MetaField::Partition,
        "offset" => MetaField::Offset,
        "timestamp" => MetaField::Timestamp,
        _ => return None,
    }))
}

/// `msg.a.b` as ["a", "b"].
fn msg_path(e: &IdedExpr) -> Option<Vec<String>> {
    let mut path = Vec::new();
    let mut cur = e;
    loop {
        match &cur.expr {
            Expr::Select(s) => {
                if !std::ptr::eq(cur, e) && s.test {
                    return None;
                }
                path.push(s.field.clone());
                cur = &s.operand;
            }
            Expr::Ident(root) if root == "msg" => break,
            _ => return None,
        }
    }
    path.reverse();
    Some(path)
}

// ------------------------------------------------------------ fast eval --

fn eval_fast<'m>(f: &'m Fast, json: Option<&'m Value>, msg: &'m Message) -> Result<Cow<'m, Value>, Defer> {
    Ok(match f {
        Fast::Const(v) => Cow::Borrowed(v),
        Fast::Path(path) => Cow::Borrowed(lookup(json.ok_or(Defer)?, path).ok_or(Defer)?),
        Fast::Has(path) => {
            let (last, parent) = path.split_last().ok_or(Defer)?;
            let parent = lookup(json.ok_or(Defer)?, parent).ok_or(Defer)?;
            match parent {
                Value::Object(o) => Cow::Owned(Value::Bool(o.contains_key(last))),
                _ => return Err(Defer),
            }
        }
        Fast::Meta(m) => Cow::Owned(match m {
            MetaField::Key => msg.key_str().map(|k| Value::String(k.into_owned())).unwrap_or(Value::Null),
            MetaField::Partition => Value::from(msg.partition),
            MetaField::Offset => Value::from(msg.offset),
            MetaField::Timestamp => Value::from(msg.timestamp),
        }),
        Fast::Compare(op, a, b) => {
            let a = eval_fast(a, json, msg)?;
            let b = eval_fast(b, json, msg)?;
            Cow::Owned(Value::Bool(compare(*op, &a, &b)?))
        }
        Fast::And(a, b) => match eval_fast(a, json, msg)?.as_ref() {
            Value::Bool(false) => Cow::Owned(Value::Bool(false)),
            Value::Bool(true) => match eval_fast(b, json, msg)?.as_ref() {
                Value::Bool(v) => Cow::Owned(Value::Bool(*v)),
                _ => return Err(Defer),
            },
            _ => return Err(Defer),
        },
        Fast::Or(a, b) => match eval_fast(a, json, msg)?.as_ref() {
            Value::Bool(true) => Cow::Owned(Value::Bool(true)),
            Value::Bool(false) => match eval_fast(b, json, msg)?.as_ref() {
                Value::Bool(v) => Cow::Owned(Value::Bool(*v)),
                _ => return Err(Defer),
            },
            _ => return Err(Defer),
        },
        Fast::Not(a) => match eval_fast(a, json, msg)?.as_ref() {
            Value::Bool(v) => Cow::Owned(Value::Bool(!v)),
            _ => return Err(Defer),
        },
        Fast::Arith(op, a, b) => {
            Cow::Owned(arith(*op, eval_fast(a, json, msg)?.as_ref(), eval_fast(b, json, msg)?.as_ref())?)
        }
        Fast::Neg(a) => Cow::Owned(match eval_fast(a, json, msg)?.as_ref() {
            Value::Number(n) if !n.is_f64() => Value::from(n.as_i64().ok_or(Defer)?.checked_neg().ok_or(Defer)?),
            Value::Number(n) => Value::Number(Number::from_f64(-n.as_f64().ok_or(Defer)?).ok_or(Defer)?),
            _ => return Err(Defer),
        }),
        Fast::Func(f, a) => Cow::Owned(func(*f, eval_fast(a, json, msg)?.as_ref())?),
    })
}

fn lookup<'v>(mut v: &'v Value, path: &[String]) -> Option<&'v Value> {
    for seg in path {
        v = v.as_object()?.get(seg)?;
    }
    Some(v)
}

/// Comparisons the fast path is sure of: same-kind scalars. Mixed kinds
/// (int vs double, string vs int) defer to CEL, whose rules then apply.
fn compare(op: Cmp, a: &Value, b: &Value) -> Result<bool, Defer> {
    use std::cmp::Ordering;
    let ord: Ordering = match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64(), x.is_f64(), y.is_f64()) {
            (Some(x), Some(y), false, false) => x.cmp(&y),
            (_, _, true, true) => {
                let (x, y) = (x.as_f64().ok_or(Defer)?, y.as_f64().ok_or(Defer)?);
                x.partial_cmp(&y).ok_or(Defer)?
            }
            _ => return Err(Defer),
        },
        (Value::String(x), Value::String(y)) => x.as_str().cmp(y.as_str()),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Null, Value::Null) if matches!(op, Cmp::Eq | Cmp::Ne) => Ordering::Equal,
        _ => return Err(Defer),
    };
    Ok(match op {
        Cmp::Eq => ord == Ordering::Equal,
        Cmp::Ne => ord != Ordering::Equal,
        Cmp::Lt => ord == Ordering::Less,
        Cmp::Le => ord != Ordering::Greater,
        Cmp::Gt => ord == Ordering::Greater,
        Cmp::Ge => ord != Ordering::Less,
    })
}

// ---------------------------------------------------------- conversion --

/// JSON to CEL: integers that fit i64 are `int`, larger ones `uint`, others `double`.
pub fn to_cel(v: &Value) -> CelValue {
    match v {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(obj) => {
            let m: HashMap<Key, CelValue> =
                obj.iter().map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v))).collect();
            CelValue::Map(CelMap { map: Arc::new(m) })
        }
    }
}

/// CEL to JSON, for map results, keys and aggregate inputs.
pub fn from_cel(v: &CelValue) -> Result<Value, String> {
    Ok(match v {
        CelValue::Null => Value::Null,
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::from(*i),
        CelValue::UInt(u) => Value::from(*u),
        CelValue::Float(f) => {
            Value::Number(Number::from_f64(*f).ok_or_else(|| format!("{f} cannot be represented in JSON"))?)
        }
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::Bytes(b) => Value::String(String::from_utf8_lossy(b).into_owned()),
        CelValue::List(items) => Value::Array(items.iter().map(from_cel).collect::<Result<_, _>>()?),
        CelValue::Map(m) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in m.map.iter() {
                let key = match k {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                obj.insert(key, from_cel(v)?);
            }
            Value::Object(obj)
        }
        CelValue::Timestamp(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
        CelValue::Duration(d) => Value::String(format!("{}ms", d.num_milliseconds())),
        other => return Err(format!("a {:?} value cannot be represented in JSON", other.type_of())),
    })
}

fn meta_value(msg: &Message) -> CelValue {
    let mut m: HashMap<Key, CelValue> = HashMap::with_capacity(5);
    let key = msg.key_str().map(|k| CelValue::String(Arc::new(k.into_owned()))).unwrap_or(CelValue::Null);
    m.insert("key".into(), key);
    m.insert("partition".into(), CelValue::Int(i64::from(msg.partition)));
    m.insert("offset".into(), CelValue::Int(msg.offset));
    m.insert("timestamp".into(), CelValue::Int(msg.timestamp));
    let headers: HashMap<Key, CelValue> = msg
        .headers
        .iter()
        .map(|(k, v)| (Key::from(k.as_str()), CelValue::String(Arc::new(String::from_utf8_lossy(v).into_owned()))))
        .collect();
    m.insert("headers".into(), CelValue::Map(CelMap { map: Arc::new(headers) }));
    CelValue::Map(CelMap { map: Arc::new(m) })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn msg(v: Value) -> Message {
        Message::new(3, 42, serde_json::to_vec(&v).unwrap()).with_key("k1").with_timestamp(1000)
    }

    #[test]
    fn simple_comparisons_take_the_fast_path() {
        for src in [
            "msg.type != 'ignore' && msg.amount > 0",
            "msg.a.b == 1 || !(msg.c < 2.5)",
            "has(msg.x) && meta.partition == 3",
        ] {
            assert!(Expression::parse(src).unwrap().is_fast(), "{src}");
        }
        assert!(Expression::parse("msg.amount * 2 > 3").unwrap().is_fast());
        assert!(Expression::parse("double(msg.amount) * 0.92").unwrap().is_fast());
        assert!(Expression::parse("msg.country.upperAscii()").unwrap().is_fast());
        assert!(!Expression::parse("msg.items.exists(i, i > 2)").unwrap().is_fast());
        assert!(!Expression::parse("msg.name.startsWith('a')").unwrap().is_fast());
    }

    #[test]
    fn the_cel_fallback_converts_only_what_is_read() {
        let e = Expression::parse("msg.country.startsWith('d') ? 'DE' : 'other'").unwrap();
        assert!(!e.is_fast());
        assert_eq!(e.fields, Fields::Some(vec!["country".into()]));
        let m = msg(json!({"country": "de", "other": [1, 2, 3]}));
        assert_eq!(e.eval(&m).unwrap().as_ref(), &json!("DE"));
        assert_eq!(Expression::parse("size(msg)").unwrap().fields, Fields::Whole);
        assert_eq!(Expression::parse("meta.key").unwrap().fields, Fields::None);
    }

    #[test]
    fn meta_is_readable() {
        let m = msg(json!({}));
        for (src, want) in [
            ("meta.key", json!("k1")),
            ("meta.partition", json!(3)),
            ("meta.offset", json!(42)),
            ("meta.timestamp + 1", json!(1001)),
        ] {
            assert_eq!(Expression::parse(src).unwrap().eval(&m).unwrap().as_ref(), &want, "{src}");
        }
        assert!(!m.payload.is_parsed(), "meta-only expressions must not parse the payload");
    }

    #[test]
    fn runtime_errors_are_values_not_panics() {
        let m = msg(json!({"amount": "ten"}));
        let e = Expression::parse("msg.amount > 0").unwrap();
        assert!(matches!(e.eval_bool(&m), Err(EvalError::Cel { .. })));
        let e = Expression::parse("msg.missing == 1").unwrap();
        let err = e.eval_bool(&m).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let bad = Message::new(0, 0, b"{oops".to_vec());
        assert_eq!(e.eval_bool(&bad).unwrap_err().reason(), "bad_payload");
        let e = Expression::parse("msg.amount").unwrap();
        assert!(matches!(e.eval_bool(&m), Err(EvalError::Type { .. })));
    }

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i32>().prop_map(|i| json!(i)),
            Just(json!(0)),
            Just(json!(i64::MAX)),
            (-1000.0f64..1000.0).prop_map(|f| json!(f)),
            "[a-cA-Cé]{0,3}".prop_map(Value::String),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
        ]
    }

    proptest! {
        /// Arithmetic and functions: the fast path and CEL agree wherever the fast path answers.
        #[test]
        fn fast_arithmetic_agrees_with_cel(a in scalar(), b in scalar(), op in 0usize..14) {
            let src = [
                "msg.a + msg.b", "msg.a - msg.b", "msg.a * msg.b", "msg.a / msg.b", "msg.a % msg.b",
                "-msg.a", "double(msg.a) * 0.5", "int(msg.a) + 1", "size(msg.a)", "msg.a.size()",
                "msg.a.upperAscii()", "msg.b.lowerAscii() + 'x'", "msg.a * 2 > msg.b", "double(msg.b)",
            ][op];
            let e = Expression::parse(src).unwrap();
            prop_assert!(e.is_fast(), "{}", src);
            let m = msg(json!({"a": a, "b": b}));
            let json = m.payload.json().unwrap();
            if let Ok(v) = eval_fast(e.fast.as_ref().unwrap(), Some(json), &m) {
                let cel = e.eval_cel(Some(json), &m);
                prop_assert_eq!(Ok(v.into_owned()), cel, "{}", src);
            }
        }

        /// The fast path and CEL agree wherever the fast path answers.
        #[test]
        fn fast_path_agrees_with_cel(a in scalar(), b in scalar(), has_b in any::<bool>(), op in 0usize..10) {
            let src = [
                "msg.a == msg.b", "msg.a != msg.b", "msg.a < msg.b", "msg.a <= msg.b",
                "msg.a > msg.b", "msg.a >= msg.b", "msg.a == 1 && msg.b != 'x'",
                "msg.a > 0 || msg.b < 'b'", "!(msg.a == msg.b)", "has(msg.b) && msg.b == msg.a",
            ][op];
            let e = Expression::parse(src).unwrap();
            prop_assert!(e.is_fast());
            let payload = if has_b { json!({"a": a, "b": b}) } else { json!({"a": a}) };
            let m = msg(payload);
            let json = m.payload.json().unwrap();
            if let Ok(v) = eval_fast(e.fast.as_ref().unwrap(), Some(json), &m) {
                let cel = e.eval_cel(Some(json), &m);
                prop_assert_eq!(Ok(v.into_owned()), cel, "{}", src);
            }
        }
    }
}
