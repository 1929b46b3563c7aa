//! Which programs are quick: those whose run is linear in their input, so that a caller may run
//! them on its own thread when the input is small.

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Pattern, Term};
use jaq_core::load::{self};
use jaq_core::ops::Math;
use jaq_core::path::Part;

/// The longest program [`Program::is_quick`](super::Program::is_quick) considers.
pub const MAX_QUICK_LEN: usize = 512;

/// The largest input a quick program is run on in place (on an async thread), counted by
/// [`crate::value::size_at_most`] (about a JSON text of this many bytes).
pub const QUICK_INPUT_SIZE: usize = 4096;

/// Builtins of no argument that a quick program may call: each reads its input once.
const QUICK_BUILTINS: &[&str] = &[
    "empty",
    "null",
    "true",
    "false",
    "not",
    "length",
    "utf8bytelength",
    "type",
    "tostring",
    "tojson",
    "tonumber",
    "ascii_downcase",
    "ascii_upcase",
    "keys",
    "keys_unsorted",
    "first",
    "last",
    "floor",
    "ceil",
    "round",
    "sqrt",
    "abs",
];

/// See [`Program::is_quick`]; `code` has passed the nesting check, so walking its terms recurses
/// a bounded number of levels.
pub(super) fn is_quick(code: &str) -> bool {
    code.len() <= MAX_QUICK_LEN
        && load::parse(code, |parser| parser.term()).is_some_and(|term| quick_list(&term))
}

/// A `,` list of terms of at most one output each.
pub(super) fn quick_list(term: &Term<&str>) -> bool {
    match term {
        Term::BinOp(left, BinaryOp::Comma, right) => quick_list(left) && quick_list(right),
        term => quick_one(term),
    }
}

/// A term whose output is a part of its input or of a variable (a path without iteration).
pub(super) fn quick_part(term: &Term<&str>) -> bool {
    match term {
        Term::Id | Term::Var(_) => true,
        Term::Path(base, _) => quick_part(base) && quick_one(term),
        _ => false,
    }
}

/// A term of at most one output (for one input) whose run is linear in its input.
pub(super) fn quick_one(term: &Term<&str>) -> bool {
    match term {
        Term::Id | Term::Num(_) | Term::Var(_) => true,
        Term::Str(None, parts) => parts.iter().all(|part| match part {
            StrPart::Term(term) => quick_one(term),
            StrPart::Str(_) | StrPart::Char(_) => true,
        }),
        Term::Arr(items) => items.as_deref().is_none_or(quick_list),
        Term::Obj(entries) => entries
            .iter()
            .all(|(key, value)| quick_one(key) && value.as_ref().is_none_or(quick_one)),
        Term::Neg(term) => quick_one(term),
        // The right side of a pipe works on the left side's output, and a bound variable holds
        // it: only a part of the input (a path) may go there, or outputs could double at each
        // pipe. `*` repeats a string and `-` compares every pair of two arrays' items.
        Term::BinOp(left, BinaryOp::Pipe(None | Some(Pattern::Var(_))), right) => {
            quick_part(left) && quick_one(right)
        }
        Term::BinOp(left, op, right) => {
            let op_quick = matches!(
                op,
                BinaryOp::Alt
                    | BinaryOp::Or
                    | BinaryOp::And
                    | BinaryOp::Math(Math::Add | Math::Div | Math::Rem)
                    | BinaryOp::Cmp(_)
            );
            op_quick && quick_one(left) && quick_one(right)
        }
        Term::TryCatch(body, catch) => quick_one(body) && catch.as_deref().is_none_or(quick_one),
        Term::IfThenElse(branches, otherwise) => {
            branches
                .iter()
                .all(|(condition, then)| quick_one(condition) && quick_one(then))
                && otherwise.as_deref().is_none_or(quick_one)
        }
        Term::Call(name, args) => args.is_empty() && QUICK_BUILTINS.contains(name),
        Term::Path(base, path) => {
            quick_one(base)
                && path.0.iter().all(|(part, _)| match part {
                    Part::Index(index) => quick_one(index),
                    Part::Range(None, None) => false,
                    Part::Range(from, to) => {
                        from.as_ref().is_none_or(quick_one) && to.as_ref().is_none_or(quick_one)
                    }
                })
        }
        _ => false,
    }
}
