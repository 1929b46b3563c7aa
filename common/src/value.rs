//! The limits on step inputs and outputs: what a value must satisfy to be stored in PostgreSQL
//! (`jsonb` refuses strings and object keys containing U+0000) and sent in a protocol message
//! (`serde_json` refuses to read JSON nested deeper than 128 levels, and the envelope takes some).
//!
//! This module only checks values; it never changes them and does not decide what a failed check
//! means for a step or a run. The check is iterative, so a value of any depth is checked without
//! risking the caller's stack.

use std::fmt::Write as _;

use serde_json::Value;

/// The deepest nesting of arrays and objects a step input or output may have.
pub const MAX_DEPTH: usize = 64;

/// The largest run input or step output by default, as compact JSON: 4 MiB
/// (`TASKFLEET_MAX_VALUE_BYTES`).
pub const DEFAULT_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Returns the size of `value` as compact JSON, in bytes, without writing it anywhere.
pub fn encoded_len(value: &Value) -> usize {
    /// Counts what would be written.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Checks that `value` is at most `max_bytes` long as compact JSON.
pub fn check_size(value: &Value, max_bytes: usize) -> Result<(), TooLarge> {
    let bytes = encoded_len(value);
    if bytes > max_bytes {
        Err(TooLarge { bytes, max_bytes })
    } else {
        Ok(())
    }
}

/// A value longer than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{bytes} bytes as JSON, more than the limit of {max_bytes} (TASKFLEET_MAX_VALUE_BYTES)")]
pub struct TooLarge {
    /// Its size as compact JSON.
    pub bytes: usize,
    /// The limit.
    pub max_bytes: usize,
}

/// Describes why a value cannot travel through taskfleet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// An array or object sits deeper than [`MAX_DEPTH`]; `path` names the first such one.
    #[error("value is nested deeper than {MAX_DEPTH} levels at {path}")]
    TooDeep {
        /// Where the array or object is, e.g. `$.a[3]`.
        path: String,
    },
    /// A string or an object key contains U+0000; `path` names the string or the key's entry.
    #[error("string at {path} contains a NUL character (\\u0000), which cannot be stored")]
    Nul {
        /// Where the string is, e.g. `$.a[3]` or `$["odd key"]`.
        path: String,
    },
}

/// Checks that `value` can be stored and sent: nesting at most [`MAX_DEPTH`], no NUL in strings
/// or keys.
///
/// A scalar at the top is at depth 0 and `[1]` is at depth 1. Problems are looked for in document
/// order (object entries in the order the map iterates them) and the first one is reported.
pub fn check(value: &Value) -> Result<(), ValueError> {
    // The children still to visit of every array and object on the way from the root to the
    // current value, outermost first; `path` holds the segments leading to the current value.
    let mut open: Vec<Children<'_>> = Vec::new();
    let mut path: Vec<Segment<'_>> = Vec::new();
    let mut current = Some(value);
    loop {
        if let Some(value) = current.take() {
            match value {
                Value::String(text) if text.contains('\0') => {
                    return Err(ValueError::Nul {
                        path: render(&path),
                    });
                }
                Value::Array(_) | Value::Object(_) if open.len() == MAX_DEPTH => {
                    return Err(ValueError::TooDeep {
                        path: render(&path),
                    });
                }
                Value::Array(items) => open.push(Children::Array(items.iter().enumerate())),
                Value::Object(map) => open.push(Children::Object(map.iter())),
                Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {}
            }
        }
        // Moves on to the next child of the innermost array or object that has one left.
        let Some(children) = open.last_mut() else {
            return Ok(());
        };
        let next = match children {
            Children::Array(items) => items
                .next()
                .map(|(index, item)| (Segment::Index(index), item)),
            Children::Object(entries) => {
                entries.next().map(|(key, item)| (Segment::Key(key), item))
            }
        };
        match next {
            Some((segment, item)) => {
                path.truncate(open.len() - 1);
                path.push(segment);
                if let Segment::Key(key) = segment
                    && key.contains('\0')
                {
                    return Err(ValueError::Nul {
                        path: render(&path),
                    });
                }
                current = Some(item);
            }
            None => {
                open.pop();
            }
        }
    }
}

/// The children of an array or object that are still to be checked.
enum Children<'a> {
    Array(std::iter::Enumerate<std::slice::Iter<'a, Value>>),
    Object(serde_json::map::Iter<'a>),
}

/// One step of a path: an array index or an object key.
#[derive(Clone, Copy)]
enum Segment<'a> {
    Index(usize),
    Key(&'a str),
}

/// Renders a path the way jq would address it: `$`, `$.a`, `$.a[3]`, `$["odd key"]`.
fn render(path: &[Segment<'_>]) -> String {
    let mut rendered = String::from("$");
    for segment in path {
        match segment {
            Segment::Index(index) => {
                let _ = write!(rendered, "[{index}]");
            }
            Segment::Key(key) if is_identifier(key) => {
                rendered.push('.');
                rendered.push_str(key);
            }
            Segment::Key(key) => {
                // A JSON string literal is a jq string literal, escapes included.
                rendered.push('[');
                rendered.push_str(&Value::from(*key).to_string());
                rendered.push(']');
            }
        }
    }
    rendered
}

/// Returns whether `key` can follow a `.` in a jq path: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_identifier(key: &str) -> bool {
    let mut chars = key.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `value` is at most `limit` in size, counting one for each value plus the bytes of
/// every string and object key; reads no more of a larger value than it takes to tell.
pub fn size_at_most(value: &Value, limit: usize) -> bool {
    sizes_at_most([value], limit)
}

/// Whether `values` are at most `limit` in size together, counted as [`size_at_most`] counts.
pub fn sizes_at_most<'a>(values: impl IntoIterator<Item = &'a Value>, limit: usize) -> bool {
    let mut budget = limit;
    let mut spend = |cost: usize| match budget.checked_sub(cost) {
        Some(left) => {
            budget = left;
            true
        }
        None => false,
    };
    let mut waiting: Vec<&Value> = values.into_iter().collect();
    while let Some(value) = waiting.pop() {
        // A container's items are counted as they are read; its length only stops one that
        // cannot fit before they are queued.
        let fits = match value {
            Value::String(text) => spend(1 + text.len()),
            Value::Array(items) => {
                items.len() < limit && spend(1) && {
                    waiting.extend(items);
                    true
                }
            }
            Value::Object(map) => {
                map.len() < limit
                    && spend(1)
                    && map.iter().all(|(key, item)| {
                        waiting.push(item);
                        spend(key.len())
                    })
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => spend(1),
        };
        if !fits {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {

    #[test]
    fn sizes_are_those_of_compact_json() {
        let value = serde_json::json!({"a": [1, "two", null], "b": "\u{e9}\""});
        assert_eq!(encoded_len(&value), value.to_string().len());
        assert_eq!(check_size(&value, 1000), Ok(()));
        let size = value.to_string().len();
        assert_eq!(
            check_size(&value, size - 1),
            Err(TooLarge {
                bytes: size,
                max_bytes: size - 1
            })
        );
        assert_eq!(check_size(&value, size), Ok(()));
    }
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_read_from_text_are_the_floats_written() {
        // Values cross the system as JSON text (the API, PostgreSQL's jsonb, messages): each
        // float must parse back to exactly the float that was printed.
        let mut x = 0.3_f64;
        for n in 0..2000 {
            let value = json!({ "x": x });
            let back: Value = serde_json::from_str(&value.to_string()).expect("parses");
            assert_eq!(back["x"].as_f64(), Some(x), "{x} (step {n})");
            x = x * 1.37 + 0.1 * f64::from(n);
        }
        let back: Value = serde_json::from_str("0.9000000000000001").expect("parses");
        assert_eq!(back.as_f64(), Some(0.3 + 6.0 * 0.1));
    }

    fn check_value(value: &Value, expected: Result<(), ValueError>) {
        assert_eq!(check(value), expected);
    }

    fn too_deep(path: &str) -> Result<(), ValueError> {
        Err(ValueError::TooDeep { path: path.into() })
    }

    fn nul(path: &str) -> Result<(), ValueError> {
        Err(ValueError::Nul { path: path.into() })
    }

    /// Returns `inner` wrapped in `levels` arrays.
    fn nested(levels: usize, inner: Value) -> Value {
        (0..levels).fold(inner, |value, _| Value::Array(vec![value]))
    }

    /// Returns the path of the innermost item of `nested(levels, ...)`.
    fn nested_path(levels: usize) -> String {
        format!("${}", "[0]".repeat(levels))
    }

    #[test]
    fn ordinary_values_pass() {
        check_value(&json!(null), Ok(()));
        check_value(&json!(true), Ok(()));
        check_value(&json!(-1.5), Ok(()));
        check_value(&json!(""), Ok(()));
        check_value(&json!("héllo 🎉 \u{1} \\0"), Ok(()));
        check_value(&json!([]), Ok(()));
        check_value(&json!({}), Ok(()));
        check_value(&json!({"a": [1, {"b": "c"}], "": null}), Ok(()));
    }

    #[test]
    fn nul_in_strings_is_refused() {
        check_value(&json!("a\u{0}b"), nul("$"));
        check_value(&json!("\u{0}"), nul("$"));
        check_value(&json!({"a": "x\u{0}"}), nul("$.a"));
        check_value(&json!({"a": [1, 2, 3, "\u{0}"]}), nul("$.a[3]"));
        check_value(&json!([[], ["ok", "\u{0}"]]), nul("$[1][1]"));
        check_value(&json!({"odd key": "\u{0}"}), nul("$[\"odd key\"]"));
    }

    #[test]
    fn nul_in_keys_is_refused() {
        check_value(&json!({"a\u{0}b": 1}), nul("$[\"a\\u0000b\"]"));
        check_value(&json!({"a": {"\u{0}": []}}), nul("$.a[\"\\u0000\"]"));
    }

    #[test]
    fn the_first_problem_in_document_order_is_reported() {
        check_value(&json!(["\u{0}", "\u{0}"]), nul("$[0]"));
        check_value(&json!({"a": "\u{0}", "b": "\u{0}"}), nul("$.a"));
        check_value(
            &json!([nested(MAX_DEPTH, json!(1)), "\u{0}"]),
            too_deep(&nested_path(MAX_DEPTH)),
        );
        check_value(&json!(["\u{0}", nested(MAX_DEPTH, json!(1))]), nul("$[0]"));
    }

    #[test]
    fn depth_counts_arrays_and_objects() {
        check_value(&nested(1, json!(1)), Ok(()));
        check_value(&nested(MAX_DEPTH, json!(1)), Ok(()));
        check_value(
            &nested(MAX_DEPTH, json!([])),
            too_deep(&nested_path(MAX_DEPTH)),
        );
        check_value(
            &nested(MAX_DEPTH, json!({})),
            too_deep(&nested_path(MAX_DEPTH)),
        );
        check_value(&nested(MAX_DEPTH - 1, json!({"k": 1})), Ok(()));
        check_value(
            &nested(MAX_DEPTH - 1, json!({"k": [2]})),
            too_deep(&format!("{}.k", nested_path(MAX_DEPTH - 1))),
        );
        check_value(
            &json!({"a": [1, nested(MAX_DEPTH - 2, json!(null))]}),
            Ok(()),
        );
        check_value(
            &json!({"a": [1, nested(MAX_DEPTH - 1, json!(null))]}),
            too_deep(&format!("$.a[1]{}", "[0]".repeat(MAX_DEPTH - 2))),
        );
    }

    #[test]
    fn siblings_do_not_add_depth() {
        let wide: Vec<Value> = (0..1000).map(|_| nested(MAX_DEPTH - 1, json!(1))).collect();
        check_value(&Value::Array(wide), Ok(()));
    }

    #[test]
    fn very_deep_values_are_refused_without_recursion() {
        // Built and dropped by hand: serde_json drops nested values recursively.
        let mut value = nested(100_000, json!(1));
        check_value(&value, too_deep(&nested_path(MAX_DEPTH)));
        while let Value::Array(mut items) = value {
            value = items.pop().unwrap_or(Value::Null);
        }
    }

    #[test]
    fn paths_use_jq_syntax() {
        let deep_under = |key: &str| json!({ key: nested(MAX_DEPTH, json!(1)) });
        let path = |prefix: &str| format!("{prefix}{}", "[0]".repeat(MAX_DEPTH - 1));
        check_value(&deep_under("a"), too_deep(&path("$.a")));
        check_value(&deep_under("_a1"), too_deep(&path("$._a1")));
        check_value(&deep_under("1a"), too_deep(&path("$[\"1a\"]")));
        check_value(&deep_under("a-b"), too_deep(&path("$[\"a-b\"]")));
        check_value(&deep_under(""), too_deep(&path("$[\"\"]")));
        check_value(&deep_under("é"), too_deep(&path("$[\"é\"]")));
        check_value(&deep_under("q\"uote"), too_deep(&path("$[\"q\\\"uote\"]")));
    }

    #[test]
    fn errors_name_the_problem_and_the_place() {
        assert_eq!(
            ValueError::TooDeep { path: "$.a".into() }.to_string(),
            "value is nested deeper than 64 levels at $.a"
        );
        assert_eq!(
            ValueError::Nul {
                path: "$[3]".into()
            }
            .to_string(),
            "string at $[3] contains a NUL character (\\u0000), which cannot be stored"
        );
    }

    #[test]
    fn a_value_is_measured_by_its_values_and_text() {
        assert!(size_at_most(&json!(null), 1));
        assert!(!size_at_most(&json!(null), 0));
        assert!(size_at_most(&json!("abc"), 4));
        assert!(!size_at_most(&json!("abc"), 3));
        // The array, its three numbers.
        assert!(size_at_most(&json!([1, 2, 3]), 4));
        assert!(!size_at_most(&json!([1, 2, 3]), 3));
        // The object, its keys' three bytes, the string "c" and its byte, the array, its null.
        let object = json!({"ab": "c", "d": [null]});
        assert!(size_at_most(&object, 8));
        assert!(!size_at_most(&object, 7));
        let large = Value::Array(vec![json!(1); 1_000_000]);
        assert!(!size_at_most(&large, 4096));
        assert!(sizes_at_most([&object, &json!("abc")], 12));
        assert!(!sizes_at_most([&object, &json!("abc")], 11));
    }
}
