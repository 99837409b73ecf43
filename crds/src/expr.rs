//! What a user CEL expression reads.
//!
//! `cel::Program::references()` reports comprehension variables
//! (`msg.items.exists(x, ...)`'s `x`) as free variables, because it does not
//! track scopes. This walk does, so validation can say "unknown variable" only
//! for names the expression really expects from outside.

use std::collections::BTreeSet;

use cel::IdedExpr;
use cel::common::ast::{EntryExpr, Expr};

/// Names an expression reads from its environment.
pub fn free_variables(expr: &IdedExpr) -> BTreeSet<String> {
    let mut free = BTreeSet::new();
    walk(expr, &mut Vec::new(), &mut free);
    free
}

fn walk<'e>(e: &'e IdedExpr, bound: &mut Vec<&'e str>, free: &mut BTreeSet<String>) {
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            if !name.starts_with('@') && !bound.contains(&name.as_str()) {
                free.insert(name.clone());
            }
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, bound, free);
            }
            call.args.iter().for_each(|a| walk(a, bound, free));
        }
        Expr::Select(select) => walk(&select.operand, bound, free),
        Expr::List(list) => list.elements.iter().for_each(|a| walk(a, bound, free)),
        Expr::Map(map) => map.entries.iter().for_each(|entry| match &entry.expr {
            EntryExpr::StructField(f) => walk(&f.value, bound, free),
            EntryExpr::MapEntry(m) => {
                walk(&m.key, bound, free);
                walk(&m.value, bound, free);
            }
        }),
        Expr::Struct(s) => s.entries.iter().for_each(|entry| match &entry.expr {
            EntryExpr::StructField(f) => walk(&f.value, bound, free),
            EntryExpr::MapEntry(m) => {
                walk(&m.key, bound, free);
                walk(&m.value, bound, free);
            }
        }),
        Expr::Comprehension(c) => {
            walk(&c.iter_range, bound, free);
            walk(&c.accu_init, bound, free);
            let depth = bound.len();
            bound.push(&c.iter_var);
            if let Some(v2) = &c.iter_var2 {
                bound.push(v2);
            }
            bound.push(&c.accu_var);
            walk(&c.loop_cond, bound, free);
            walk(&c.loop_step, bound, free);
            walk(&c.result, bound, free);
            bound.truncate(depth);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(src: &str) -> Vec<String> {
        let p = cel::Program::compile(src).unwrap();
        free_variables(p.expression()).into_iter().collect()
    }

    #[test]
    fn comprehension_variables_are_bound() {
        assert_eq!(vars("msg.items.exists(x, x.qty > 1) && meta.partition >= 0"), ["meta", "msg"]);
        assert_eq!(vars("msg.items.map(i, i.price * other)"), ["msg", "other"]);
        assert_eq!(vars("[1,2].all(x, x > 0) && x"), ["x"]);
        assert_eq!(vars("{'a': msg.b}.a"), ["msg"]);
    }
}
