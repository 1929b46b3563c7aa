//! Values between JSON and Python: a step's input becomes plain Python values (dicts, lists,
//! strings, ints, floats, bools, `None`), and what it returns becomes JSON again, or an
//! `invalid_output` error naming the type and the place of whatever JSON cannot express. Values
//! are converted directly, never through JSON text. It converts only: it neither calls the step
//! nor changes what the step returned.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};
use taskfleet_common::StepError;
use taskfleet_common::error::INVALID_OUTPUT;

use super::exception::exception_error;

/// The deepest nesting of lists and dicts converted in either direction; deeper values are
/// rejected rather than risking the interpreter thread's stack (a list containing itself is
/// infinitely deep).
const MAX_DEPTH: usize = 256;

/// Converts a JSON value into the plain Python value a step receives.
pub(super) fn to_python<'py>(
    py: Python<'py>,
    value: &Value,
    depth: usize,
) -> Result<Bound<'py, PyAny>, StepError> {
    if depth > MAX_DEPTH {
        return Err(StepError::new(
            "RecursionError",
            format!("step input is nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    let converted = match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(flag) => PyBool::new(py, *flag).to_owned().into_any(),
        Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                PyInt::new(py, integer).into_any()
            } else if let Some(integer) = number.as_u64() {
                PyInt::new(py, integer).into_any()
            } else {
                // Without serde_json's arbitrary_precision every other number is an f64.
                PyFloat::new(py, number.as_f64().unwrap_or(f64::NAN)).into_any()
            }
        }
        Value::String(text) => PyString::new(py, text).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item, depth + 1)?)
                    .map_err(|error| exception_error(py, &error))?;
            }
            list.into_any()
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (key, field) in fields {
                dict.set_item(key, to_python(py, field, depth + 1)?)
                    .map_err(|error| exception_error(py, &error))?;
            }
            dict.into_any()
        }
    };
    Ok(converted)
}

/// One step of the path to a value inside a step's output, for error messages.
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

/// Renders a path as `$`, `$.key`, `$.list[3]` or `$["odd key"]`.
fn render_path(path: &[Segment]) -> String {
    let mut rendered = String::from("$");
    for segment in path {
        match segment {
            Segment::Key(key) => {
                let plain = key
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_alphanumeric() || c == '_');
                if plain {
                    rendered.push('.');
                    rendered.push_str(key);
                } else {
                    rendered.push('[');
                    rendered.push_str(&Value::String(key.clone()).to_string());
                    rendered.push(']');
                }
            }
            Segment::Index(index) => rendered.push_str(&format!("[{index}]")),
        }
    }
    rendered
}

/// The error of an output that JSON cannot express.
fn inexpressible(what: &str, path: &[Segment]) -> StepError {
    StepError::new(
        INVALID_OUTPUT,
        format!(
            "step returned a value JSON cannot express: {what} at {}",
            render_path(path)
        ),
    )
}

/// Returns a type's name as Python code would write it: `set`, `datetime.datetime`.
pub(super) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .fully_qualified_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "<unknown type>".to_owned())
}

/// Converts a step's returned value into JSON, naming the type and the place of anything JSON
/// cannot express. Tuples become arrays; dict keys must be strings.
pub(super) fn from_python(
    value: &Bound<'_, PyAny>,
    path: &mut Vec<Segment>,
) -> Result<Value, StepError> {
    if path.len() > MAX_DEPTH {
        return Err(StepError::new(
            INVALID_OUTPUT,
            format!(
                "step returned a value nested deeper than {MAX_DEPTH} levels at {} (does it contain itself?)",
                render_path(path)
            ),
        ));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    // bool is a subclass of int, so it is recognised first.
    if let Ok(flag) = value.cast::<PyBool>() {
        return Ok(Value::Bool(flag.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(integer) = value.extract::<i64>() {
            return Ok(Value::from(integer));
        }
        if let Ok(integer) = value.extract::<u64>() {
            return Ok(Value::from(integer));
        }
        let bits = value
            .call_method0("bit_length")
            .and_then(|bits| bits.extract::<u64>())
            .map(|bits| format!(" ({bits} bits)"))
            .unwrap_or_default();
        return Err(inexpressible(
            &format!("int outside the 64-bit range{bits}"),
            path,
        ));
    }
    if let Ok(float) = value.cast::<PyFloat>() {
        let float = float.value();
        return Number::from_f64(float).map(Value::Number).ok_or_else(|| {
            let shown = if float.is_nan() {
                "nan"
            } else if float > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            inexpressible(&format!("float {shown}"), path)
        });
    }
    if let Ok(text) = value.cast::<PyString>() {
        return text
            .to_str()
            .map(|text| Value::String(text.to_owned()))
            .map_err(|_| inexpressible("str with unpaired surrogates", path));
    }
    if let Ok(dict) = value.cast::<PyDict>() {
        let mut fields = Map::new();
        for (key, field) in dict.iter() {
            let Ok(key) = key.cast::<PyString>() else {
                return Err(inexpressible(
                    &format!("dict key of type {}", type_name(&key)),
                    path,
                ));
            };
            let Ok(key) = key.to_str() else {
                return Err(inexpressible("dict key with unpaired surrogates", path));
            };
            path.push(Segment::Key(key.to_owned()));
            let field = from_python(&field, path)?;
            path.pop();
            fields.insert(key.to_owned(), field);
        }
        return Ok(Value::Object(fields));
    }
    if let Ok(list) = value.cast::<PyList>() {
        return from_sequence(list.iter(), path);
    }
    if let Ok(tuple) = value.cast::<PyTuple>() {
        return from_sequence(tuple.iter(), path);
    }
    Err(inexpressible(&type_name(value), path))
}

/// Converts the items of a list or tuple into a JSON array.
fn from_sequence<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    path: &mut Vec<Segment>,
) -> Result<Value, StepError> {
    let mut converted = Vec::new();
    for (index, item) in items.enumerate() {
        path.push(Segment::Index(index));
        converted.push(from_python(&item, path)?);
        path.pop();
    }
    Ok(Value::Array(converted))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::PythonTarget;
    use super::super::test_support::{call, output_error, step};

    #[test]
    fn values_round_trip_unchanged() {
        let input = json!({
            "text": "héllo ✓ 😀 \u{0} \"quoted\"",
            "ints": [0, -1, 42, i64::MIN, i64::MAX, u64::MAX],
            "floats": [1.5, -0.25, 1e300, 2.0],
            "flags": [true, false],
            "nothing": null,
            "nested": {"list": [[], {}, [{"deep": [1, {"deeper": null}]}]], "": "empty key"},
        });
        assert_eq!(step("echo", input.clone()), Ok(input));
        for scalar in [json!(null), json!(true), json!(7), json!(0.5), json!("x")] {
            assert_eq!(step("echo", scalar.clone()), Ok(scalar));
        }
    }

    #[test]
    fn booleans_stay_booleans() {
        let output = call(
            PythonTarget::Code {
                source: "def main(input):\n    return [type(v).__name__ for v in input]\n"
                    .to_owned(),
            },
            json!([true, 1, 1.0, "1", null, [], {}]),
        );
        assert_eq!(
            output,
            Ok(json!([
                "bool", "int", "float", "str", "NoneType", "list", "dict"
            ]))
        );
    }

    #[test]
    fn inexpressible_output_names_type_and_place() {
        let cases = [
            ("returns_datetime", "datetime.datetime at $.when"),
            ("returns_set", "set at $.items[1]"),
            (
                "returns_big_int",
                "int outside the 64-bit range (65 bits) at $.n",
            ),
            ("returns_nan", "float nan at $[0]"),
            ("returns_int_keys", "dict key of type int at $.counts"),
        ];
        for (name, expected) in cases {
            let error = output_error(name);
            assert_eq!(
                error.message,
                format!("step returned a value JSON cannot express: {expected}"),
                "{name}"
            );
        }
        let error = output_error("returns_generator");
        assert_eq!(
            error.message,
            "step returned a generator; return a list instead"
        );
        let error = output_error("returns_cycle");
        assert!(
            error.message.contains("nested deeper than"),
            "{}",
            error.message
        );
    }

    #[test]
    fn tuples_become_arrays() {
        assert_eq!(
            step("returns_tuple", json!(null)),
            Ok(json!([1, [2, [3, "x"]]]))
        );
    }
}
