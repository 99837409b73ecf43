//! `map`: set top-level fields from CEL expressions, then drop fields.
//!
//! Every `set` expression reads the message as it arrived at this step (they
//! do not see each other's results), as a user reading the spec expects.

use std::sync::Arc;

use serde_json::Value;

use crate::{
    expr::{CompileError, EvalError, Expression},
    message::Message,
};

#[derive(Clone, Debug)]
pub struct MapStep {
    set: Arc<[(String, Expression)]>,
    drop: Arc<[String]>,
}

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("map needs a JSON object payload, got {0}")]
    NotAnObject(String),
}

impl MapError {
    pub fn reason(&self) -> &'static str {
        match self {
            MapError::Eval(e) => e.reason(),
            MapError::NotAnObject(_) => "bad_payload",
        }
    }
}

impl MapStep {
    pub fn compile(m: &sluice_crds::MapStep, env: &Arc<cel::Env>) -> Result<Self, CompileError> {
        let set = m
            .set
            .iter()
            .map(|(field, src)| Ok((field.clone(), Expression::compile(src, env)?)))
            .collect::<Result<Vec<_>, CompileError>>()?;
        Ok(Self { set: set.into(), drop: m.drop.clone().into() })
    }

    pub fn apply(&self, msg: &mut Message) -> Result<(), MapError> {
        let mut values = Vec::with_capacity(self.set.len());
        for (field, expr) in self.set.iter() {
            values.push((field, expr.eval(msg)?.into_owned()));
        }
        let json = msg.payload.json_mut().map_err(EvalError::from)?;
        let Value::Object(obj) = json else {
            return Err(MapError::NotAnObject(crate::expr::type_name(json)));
        };
        for (field, v) in values {
            obj.insert(field.clone(), v);
        }
        for field in self.drop.iter() {
            obj.remove(field);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sets_read_the_input_and_drops_apply_last() {
        let spec: sluice_crds::MapStep = serde_json::from_value(json!({
            "set": {"amount": "msg.amount * 2", "double": "msg.amount * 2", "country": "msg.country.upperAscii()"},
            "drop": ["internal"]
        }))
        .unwrap();
        let step = MapStep::compile(&spec, &crate::expr::environment()).unwrap();
        let mut m = Message::new(0, 0, br#"{"amount": 3, "country": "de", "internal": true}"#.to_vec());
        step.apply(&mut m).unwrap();
        assert_eq!(m.payload.json().unwrap(), &json!({"amount": 6, "double": 6, "country": "DE"}));
        let mut bad = Message::new(0, 0, b"[1]".to_vec());
        let spec: sluice_crds::MapStep = serde_json::from_value(json!({"set": {"a": "1"}})).unwrap();
        let step = MapStep::compile(&spec, &crate::expr::environment()).unwrap();
        assert_eq!(step.apply(&mut bad).unwrap_err().reason(), "bad_payload");
    }
}
