//! Conversion between `serde_json` values and jaq's, and the checks an output passes on its way
//! back (nesting, values JSON cannot express).

use jaq_json::{Num, Val};
use serde_json::Value;

use super::*;
use crate::value::MAX_DEPTH;

/// Returns jaq's value for a JSON value.
pub(super) fn val_from_json(value: Value) -> Val {
    match value {
        Value::Null => Val::Null,
        Value::Bool(b) => Val::Bool(b),
        Value::Number(n) => Val::Num(num_from_json(&n)),
        Value::String(s) => Val::from(s),
        Value::Array(items) => items.into_iter().map(val_from_json).collect(),
        Value::Object(map) => Val::obj(
            map.into_iter()
                .map(|(k, v)| (Val::from(k), val_from_json(v)))
                .collect(),
        ),
    }
}

/// Returns jaq's number for a JSON number, keeping integers exact.
pub(super) fn num_from_json(n: &serde_json::Number) -> Num {
    if let Some(i) = n.as_i64() {
        return Num::from_integral(i);
    }
    if let Some(u) = n.as_u64() {
        return Num::from_integral(u);
    }
    // Only reachable for integers beyond 64 bits if serde_json keeps arbitrary precision.
    let text = n.to_string();
    let digits = text.strip_prefix('-').unwrap_or(&text);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Some(big) = Num::from_str_radix(&text, 10)
    {
        return big;
    }
    Num::Float(n.as_f64().unwrap_or(f64::NAN))
}

/// Returns the JSON value for a jaq output, or why there is none.
///
/// The depth is checked first, without recursion, so that the conversion (which recurses) goes at
/// most [`MAX_DEPTH`] levels deep and no deeply nested `serde_json::Value` is ever built (they drop
/// recursively too).
pub(super) fn json_from_output(value: Val) -> Result<Value, RunError> {
    if nested_deeper_than(&value, MAX_DEPTH) {
        drop_iteratively(value);
        return Err(RunError::NotJson(format!(
            "value is nested deeper than {MAX_DEPTH} levels"
        )));
    }
    json_from_val(value)
}

/// Returns whether `value` has arrays or objects nested more than `limit` levels deep, counting
/// object keys as one level below their object.
pub(super) fn nested_deeper_than(value: &Val, limit: usize) -> bool {
    // Each value still to look at, with the number of arrays and objects around it.
    let mut pending = vec![(value, 0)];
    while let Some((value, around)) = pending.pop() {
        match value {
            Val::Arr(_) | Val::Obj(_) if around == limit => return true,
            Val::Arr(items) => pending.extend(items.iter().map(|item| (item, around + 1))),
            Val::Obj(map) => {
                for (key, item) in map.iter() {
                    pending.push((key, around + 1));
                    pending.push((item, around + 1));
                }
            }
            Val::Null | Val::Bool(_) | Val::Num(_) | Val::BStr(_) | Val::TStr(_) => {}
        }
    }
    false
}

/// Drops `value` without recursion. jaq's values drop recursively, so dropping one nested many
/// thousands of levels deep the usual way could overflow the stack. Parts shared with values that
/// live on are only released, and are dropped with the last of them.
pub(super) fn drop_iteratively(value: Val) {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Val::Arr(items) => {
                if let Ok(items) = jaq_json::Rc::try_unwrap(items) {
                    pending.extend(items);
                }
            }
            Val::Obj(map) => {
                if let Ok(map) = jaq_json::Rc::try_unwrap(map) {
                    for (key, item) in map {
                        pending.push(key);
                        pending.push(item);
                    }
                }
            }
            Val::Null | Val::Bool(_) | Val::Num(_) | Val::BStr(_) | Val::TStr(_) => {}
        }
    }
}

/// Returns the JSON value for a jaq value nested at most [`MAX_DEPTH`] levels deep, or why there
/// is none.
pub(super) fn json_from_val(value: Val) -> Result<Value, RunError> {
    Ok(match value {
        Val::Null => Value::Null,
        Val::Bool(b) => Value::Bool(b),
        Val::Num(n) => json_from_num(&n),
        Val::TStr(bytes) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
        Val::BStr(_) => {
            return Err(RunError::NotJson(format!(
                "byte string {} (convert it with `tostring` or `@base64`)",
                excerpt(&value.to_string())
            )));
        }
        Val::Arr(items) => Value::Array(
            jaq_json::Rc::unwrap_or_clone(items)
                .into_iter()
                .map(json_from_val)
                .collect::<Result<_, _>>()?,
        ),
        Val::Obj(map) => {
            let mut object = serde_json::Map::with_capacity(map.len());
            for (key, item) in jaq_json::Rc::unwrap_or_clone(map) {
                let Val::TStr(key) = key else {
                    return Err(RunError::NotJson(format!(
                        "object key {} is not a string",
                        excerpt(&key.to_string())
                    )));
                };
                let key = String::from_utf8_lossy(&key).into_owned();
                object.insert(key, json_from_val(item)?);
            }
            Value::Object(object)
        }
    })
}

/// Returns the JSON number for a jaq number, mapping what JSON cannot express the way jq does.
pub(super) fn json_from_num(n: &Num) -> Value {
    match n {
        Num::Int(i) => match i64::try_from(*i) {
            Ok(i) => Value::from(i),
            Err(_) => json_from_number_text(&i.to_string()),
        },
        Num::BigInt(i) => json_from_number_text(&i.to_string()),
        Num::Dec(text) => json_from_number_text(text),
        Num::Float(f) => json_from_f64(*f),
    }
}

/// Returns the JSON number written as `text`, falling back to the nearest float.
pub(super) fn json_from_number_text(text: &str) -> Value {
    match serde_json::from_str::<serde_json::Number>(text) {
        Ok(number) => Value::Number(number),
        Err(_) => json_from_f64(text.parse().unwrap_or(f64::NAN)),
    }
}

/// Returns the JSON number for a float: NaN becomes null and ±infinity ±`f64::MAX`, as in jq.
pub(super) fn json_from_f64(f: f64) -> Value {
    let finite = if f.is_nan() {
        return Value::Null;
    } else if f == f64::INFINITY {
        f64::MAX
    } else if f == f64::NEG_INFINITY {
        f64::MIN
    } else {
        f
    };
    serde_json::Number::from_f64(finite).map_or(Value::Null, Value::Number)
}
