//! `filter`: keep messages for which a CEL expression is true.

use std::sync::Arc;

use crate::{
    expr::{CompileError, EvalError, Expression},
    message::Message,
};

#[derive(Clone, Debug)]
pub struct FilterStep {
    expr: Expression,
}

impl FilterStep {
    pub fn compile(src: &str, env: &Arc<cel::Env>) -> Result<Self, CompileError> {
        Ok(Self { expr: Expression::compile(src, env)? })
    }

    pub fn expressions(&self) -> Vec<&Expression> {
        vec![&self.expr]
    }

    /// Whether the message passes; a non-boolean result is an error.
    pub fn keep(&self, msg: &Message) -> Result<bool, EvalError> {
        self.expr.eval_bool(msg)
    }
}
