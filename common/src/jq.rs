//! Compiles and runs jq programs (via the `jaq` crates) on `serde_json` values.
//!
//! This module owns the translation between jq programs, `serde_json::Value`s and jaq's own value
//! type, and the wording of compile and run errors. It does no I/O: programs cannot read files,
//! standard input (`input`/`inputs` are not defined), the environment (`env` and `$ENV` are not
//! defined) or import modules, and running a program never prints anything or exits the process
//! (`halt` and `halt_error` end the program, see [`Program::run_all`]; `debug` and `stderr` only
//! emit records to the `log` facade, which this project does not route anywhere). It does not
//! decide timeouts: a program that loops without producing output runs until it finishes, so
//! callers that run untrusted programs should do so on a blocking thread they can abandon.
//!
//! Numbers follow jaq: integers stay integers (of any size) and floats stay floats, so `4 / 2`
//! yields `2.0` and `. + 0` keeps an integer input an integer. Values that JSON cannot express
//! are mapped the way jq maps them where jq has an answer (NaN becomes `null`, ±infinity becomes
//! ±`f64::MAX`, integers beyond the range of `serde_json` numbers become the nearest float) and
//! rejected with [`RunError::NotJson`] otherwise (byte strings, non-string object keys).

use std::fmt;
use std::sync::Arc;

use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::{Num, Val};
use serde_json::Value;

/// The value type the compiled filters work on.
type Data = data::JustLut<Val>;

/// The output limit used by [`Program::run`].
const DEFAULT_OUTPUT_LIMIT: usize = 1_000_000;

/// The longest excerpt of a program or a value that an error message quotes.
const EXCERPT_CHARS: usize = 40;

/// Native jaq filters that are left out because they read the worker's process state.
const EXCLUDED_FUNS: &[&str] = &["env"];

/// A compiled jq program; cheap to clone (Arc inside), Send + Sync so it can be cached and shared
/// across threads.
#[derive(Clone)]
pub struct Program {
    inner: Arc<Compiled>,
}

/// The shared part of a [`Program`].
struct Compiled {
    source: String,
    filter: jaq_core::Filter<Data>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Program")
            .field("source", &self.inner.source)
            .finish_non_exhaustive()
    }
}

/// Describes why a jq program does not compile.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct CompileError {
    /// Starts with "jq program does not compile: " followed by every problem found, joined with
    /// "; ", each naming its byte offset in the program where jaq reports one.
    pub message: String,
}

/// Describes why running a compiled jq program did not produce JSON outputs.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    /// The program raised an error (e.g. `error("x")`, or `.a` on a number) or halted with a
    /// non-zero exit code; the message is jaq's text for the error value (a string error value
    /// is used verbatim, any other value as compact JSON).
    #[error("{0}")]
    Failed(String),
    /// The program yielded more outputs than the limit it was run with.
    #[error("jq program yielded more than {0} outputs")]
    TooManyOutputs(usize),
    /// An output holds a value JSON cannot express: a byte string (from `tobytes`) or an object
    /// key that is not a string. NaN and infinite numbers are not errors (see the module docs).
    #[error("jq output is not JSON: {0}")]
    NotJson(String),
}

impl Program {
    /// Compiles `code` (jq syntax, with jaq's core + std + json definitions available, e.g. map,
    /// select, add, length, keys, to_entries, tostring, tojson...).
    ///
    /// `env`, `$ENV`, `input`, `inputs` and module imports are not available.
    pub fn compile(code: &str) -> Result<Program, CompileError> {
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs());
        let funs = jaq_core::funs::<Data>()
            .chain(jaq_std::funs::<Data>())
            .chain(jaq_json::funs::<Data>())
            .filter(|(name, _, _)| !EXCLUDED_FUNS.contains(name));

        let arena = Arena::default();
        let modules = Loader::new(defs)
            .load(&arena, File { code, path: () })
            .map_err(|errors| {
                let problems = errors
                    .iter()
                    .flat_map(|(file, error)| describe_load_error(file.code, error));
                compile_error(problems)
            })?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let problems = errors.iter().flat_map(|(file, undefined)| {
                    undefined
                        .iter()
                        .map(|(name, kind)| describe_undefined(file.code, name, kind))
                });
                compile_error(problems)
            })?;

        Ok(Program {
            inner: Arc::new(Compiled {
                source: code.to_owned(),
                filter,
            }),
        })
    }

    /// Returns the source it was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Runs the program on `input` and returns all of its outputs, in order. Stops with
    /// RunError::TooManyOutputs after `limit` outputs.
    ///
    /// The first error the program raises ends the run, discarding earlier outputs. `halt` (exit
    /// code 0) ends the run successfully with the outputs produced so far; `halt_error` or `halt`
    /// with any other exit code fails with [`RunError::Failed`].
    pub fn run_all(&self, input: Value, limit: usize) -> Result<Vec<Value>, RunError> {
        let filter = &self.inner.filter;
        let ctx = Ctx::<Data>::new(&filter.lut, Vars::new([]));
        let mut outputs = Vec::new();
        for output in filter.id.run((ctx, val_from_json(input))) {
            let value = match output {
                Ok(value) => value,
                Err(exception) => match exception.get_err() {
                    Ok(error) => return Err(RunError::Failed(error_message(error))),
                    Err(exception) => match exception.get_halt() {
                        Ok(0) => break,
                        Ok(code) => {
                            return Err(RunError::Failed(format!(
                                "jq program halted with exit code {code}"
                            )));
                        }
                        Err(_) => {
                            return Err(RunError::Failed(
                                "jq program ended with an unexpected internal exception".to_owned(),
                            ));
                        }
                    },
                },
            };
            if outputs.len() == limit {
                return Err(RunError::TooManyOutputs(limit));
            }
            outputs.push(json_from_val(value)?);
        }
        Ok(outputs)
    }

    /// Runs the program and returns its single result: zero outputs -> Value::Null, one -> that
    /// value, several -> a JSON array of all of them (in order). Uses a default output limit of
    /// 1_000_000.
    pub fn run(&self, input: Value) -> Result<Value, RunError> {
        let mut outputs = self.run_all(input, DEFAULT_OUTPUT_LIMIT)?;
        Ok(match outputs.len() {
            0 => Value::Null,
            1 => outputs.pop().unwrap_or(Value::Null),
            _ => Value::Array(outputs),
        })
    }
}

/// Returns the compile error listing `problems`.
fn compile_error(problems: impl Iterator<Item = String>) -> CompileError {
    let problems: Vec<String> = problems.collect();
    let details = if problems.is_empty() {
        "unknown error".to_owned()
    } else {
        problems.join("; ")
    };
    CompileError {
        message: format!("jq program does not compile: {details}"),
    }
}

/// Returns the messages for one file's lexing, parsing or module loading errors.
fn describe_load_error(code: &str, error: &load::Error<&str>) -> Vec<String> {
    match error {
        load::Error::Io(errors) => errors
            .iter()
            .map(|(path, reason)| {
                format!(
                    "cannot load module {}{}: {reason}",
                    excerpt(path),
                    at(code, path)
                )
            })
            .collect(),
        load::Error::Lex(errors) => errors
            .iter()
            .map(|(expected, found)| {
                let expected = match expected {
                    load::lex::Expect::Delim("(") => "closing parenthesis",
                    load::lex::Expect::Delim("[") => "closing bracket",
                    load::lex::Expect::Delim("{") => "closing brace",
                    load::lex::Expect::Delim("\"") => "closing quote",
                    load::lex::Expect::Delim(_) => "closing delimiter",
                    other => other.as_str(),
                };
                match found.chars().next() {
                    Some(c) => format!(
                        "unexpected character `{c}`{}, expected {expected}",
                        at(code, found)
                    ),
                    None => format!(
                        "unexpected end of program{}, expected {expected}",
                        at(code, found)
                    ),
                }
            })
            .collect(),
        load::Error::Parse(errors) => errors
            .iter()
            .map(|(expected, found)| {
                let expected = expected.as_str();
                if found.is_empty() {
                    format!(
                        "unexpected end of program{}, expected {expected}",
                        at(code, found)
                    )
                } else {
                    format!(
                        "unexpected token {}{}, expected {expected}",
                        excerpt(found),
                        at(code, found)
                    )
                }
            })
            .collect(),
    }
}

/// Returns the message for a name the program uses but nothing defines.
fn describe_undefined(code: &str, name: &str, kind: &jaq_core::compile::Undefined) -> String {
    use jaq_core::compile::Undefined;
    let what = match kind {
        Undefined::Filter(arity) => format!("function `{name}/{arity}`"),
        Undefined::Var => format!("variable `{name}`"),
        Undefined::Label => format!("label `{name}`"),
        Undefined::Mod => format!("module `{name}`"),
        other => format!("{} `{name}`", other.as_str()),
    };
    format!("undefined {what}{}", at(code, name))
}

/// Returns " at offset N" when `part` is a slice of `code` starting N bytes in, else "".
fn at(code: &str, part: &str) -> String {
    let (start, end) = (code.as_ptr() as usize, code.as_ptr() as usize + code.len());
    let part_start = part.as_ptr() as usize;
    if start <= part_start && part_start + part.len() <= end {
        format!(" at offset {}", load::span(code, part).start)
    } else {
        String::new()
    }
}

/// Returns `text` in backticks, shortened to [`EXCERPT_CHARS`] characters.
fn excerpt(text: &str) -> String {
    let mut chars = text.chars();
    let short: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        format!("`{short}...`")
    } else {
        format!("`{short}`")
    }
}

/// Returns the message of a jq run-time error: a string error value verbatim, any other value as
/// compact JSON.
fn error_message(error: jaq_core::Error<Val>) -> String {
    match error.into_val() {
        Val::TStr(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        other => other.to_string(),
    }
}

/// Returns jaq's value for a JSON value.
fn val_from_json(value: Value) -> Val {
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
fn num_from_json(n: &serde_json::Number) -> Num {
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

/// Returns the JSON value for a jaq value, or why there is none.
fn json_from_val(value: Val) -> Result<Value, RunError> {
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
fn json_from_num(n: &Num) -> Value {
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
fn json_from_number_text(text: &str) -> Value {
    match serde_json::from_str::<serde_json::Number>(text) {
        Ok(number) => Value::Number(number),
        Err(_) => json_from_f64(text.parse().unwrap_or(f64::NAN)),
    }
}

/// Returns the JSON number for a float: NaN becomes null and ±infinity ±`f64::MAX`, as in jq.
fn json_from_f64(f: f64) -> Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const _: () = {
        const fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
        assert_send_sync_clone::<Program>();
    };

    fn check(program: &str, input: Value, expected: Value) {
        let compiled = Program::compile(program).expect("program compiles");
        assert_eq!(
            compiled.run(input).expect("program runs"),
            expected,
            "program {program:?}"
        );
    }

    fn run_err(program: &str, input: Value) -> RunError {
        Program::compile(program)
            .expect("program compiles")
            .run(input)
            .expect_err("program fails")
    }

    fn compile_err(program: &str) -> String {
        Program::compile(program)
            .expect_err("program does not compile")
            .message
    }

    #[test]
    fn runs_basic_programs() {
        check(
            ".",
            json!({"a": [1, "x", null, true]}),
            json!({"a": [1, "x", null, true]}),
        );
        check(".a.b", json!({"a": {"b": 7}}), json!(7));
        check(".a.b", json!({}), json!(null));
        check(
            "map(select(.qty > 0))",
            json!([{"qty": 1}, {"qty": 0}, {"qty": 3}]),
            json!([{"qty": 1}, {"qty": 3}]),
        );
        check(
            "map(.price) | add",
            json!([{"price": 2}, {"price": 5}]),
            json!(7),
        );
        check("{a: .x}", json!({"x": [1]}), json!({"a": [1]}));
        check("length", json!([1, 2, 3]), json!(3));
        check("length", json!("héllo"), json!(5));
        check("keys", json!({"b": 1, "a": 2}), json!(["a", "b"]));
        check(
            "to_entries",
            json!({"a": 1}),
            json!([{"key": "a", "value": 1}]),
        );
        check("tostring", json!([1, "a"]), json!("[1,\"a\"]"));
        check("tojson", json!({"a": "b"}), json!("{\"a\":\"b\"}"));
        check(".x | fromjson", json!({"x": "[1,2]"}), json!([1, 2]));
        check("[.[] | . * 2]", json!([1, 2]), json!([2, 4]));
        check(
            "if . then \"yes\" else \"no\" end",
            json!(false),
            json!("no"),
        );
        check("\"\\(.a)-\\(.b)\"", json!({"a": 1, "b": "x"}), json!("1-x"));
    }

    #[test]
    fn several_outputs_become_an_array_and_none_become_null() {
        check(
            ".[]",
            json!([1, "two", {"three": 3}]),
            json!([1, "two", {"three": 3}]),
        );
        check(".[]", json!([5]), json!(5));
        check("empty", json!({"a": 1}), json!(null));
        check(".[]", json!([]), json!(null));
        let outputs = Program::compile(".[]")
            .expect("compiles")
            .run_all(json!([1, 2]), 10);
        assert_eq!(outputs.expect("runs"), vec![json!(1), json!(2)]);
    }

    #[test]
    fn strings_round_trip() {
        let text = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é 中文 🎉";
        check(".", json!(text), json!(text));
        check(".s", json!({"s": text}), json!(text));
        check("{(.k): 1}", json!({"k": "ключ 🔑"}), json!({"ключ 🔑": 1}));
        check("\"a\\u00e9\\n\"", json!(null), json!("aé\n"));
        check("ascii_downcase", json!("ÀBC"), json!("Àbc"));
    }

    #[test]
    fn numbers_round_trip() {
        check(
            ".",
            json!(9_007_199_254_740_993_i64),
            json!(9_007_199_254_740_993_i64),
        );
        check(".", json!(u64::MAX), json!(u64::MAX));
        check(".", json!(i64::MIN), json!(i64::MIN));
        check(
            ".a + 1",
            json!({"a": 9_007_199_254_740_993_i64}),
            json!(9_007_199_254_740_994_i64),
        );
        check(".", json!(0.1), json!(0.1));
        check(".", json!(-1.5e300), json!(-1.5e300));
        check(".", json!(2.0), json!(2.0));
        check(". * 2", json!(1.25), json!(2.5));
        check("1.5", json!(null), json!(1.5));
        check("4 / 2", json!(null), json!(2.0));
        check("[.[] | floor]", json!([1.7, -1.2]), json!([1, -2]));
    }

    #[test]
    fn non_finite_and_huge_numbers_map_like_jq() {
        check("nan", json!(null), json!(null));
        check(
            "[infinite, -infinite]",
            json!(null),
            json!([f64::MAX, f64::MIN]),
        );
        check("1e1000", json!(null), json!(f64::MAX));
        check("100000000000000000000000000000", json!(null), json!(1e29));
    }

    #[test]
    fn runtime_errors_fail() {
        let error = run_err("error(\"boom\")", json!(null));
        assert!(
            matches!(&error, RunError::Failed(m) if m.contains("boom")),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "boom");
        let error = run_err(".a", json!(1));
        assert!(matches!(error, RunError::Failed(_)), "{error:?}");
        let error = run_err("error({code: 1})", json!(null));
        assert_eq!(error, RunError::Failed("{\"code\":1}".to_owned()));
        let error = run_err("1, error(\"late\")", json!(null));
        assert_eq!(error, RunError::Failed("late".to_owned()));
        check("try error(\"x\") catch .", json!(null), json!("x"));
        check(".a?", json!(1), json!(null));
    }

    #[test]
    fn halt_ends_the_program_without_exiting() {
        check("1, halt, 2", json!(null), json!(1));
        let error = run_err("halt_error", json!("bye"));
        assert_eq!(
            error,
            RunError::Failed("jq program halted with exit code 5".to_owned())
        );
    }

    #[test]
    fn non_json_outputs_are_rejected() {
        let error = run_err("tobytes", json!("ab"));
        assert!(matches!(error, RunError::NotJson(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("jq output is not JSON: byte string")
        );
        let error = run_err("{(1): 2}", json!(null));
        assert_eq!(
            error,
            RunError::NotJson("object key `1` is not a string".to_owned())
        );
        check("tobytes | tostring", json!("ab"), json!("ab"));
    }

    #[test]
    fn output_limit_is_enforced() {
        let program = Program::compile("repeat(1)").expect("compiles");
        assert_eq!(
            program.run_all(json!(null), 10),
            Err(RunError::TooManyOutputs(10))
        );
        let program = Program::compile("1, 2").expect("compiles");
        assert_eq!(
            program.run_all(json!(null), 2).expect("runs"),
            vec![json!(1), json!(2)]
        );
        assert_eq!(
            program.run_all(json!(null), 1),
            Err(RunError::TooManyOutputs(1))
        );
        assert_eq!(
            RunError::TooManyOutputs(1).to_string(),
            "jq program yielded more than 1 outputs"
        );
        let program = Program::compile("empty").expect("compiles");
        assert_eq!(
            program.run_all(json!(null), 0).expect("runs"),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn compile_errors_are_described() {
        let message = compile_err("map(");
        assert!(
            message.starts_with("jq program does not compile: "),
            "{message}"
        );
        assert_eq!(
            message,
            "jq program does not compile: unexpected end of program at offset 4, \
             expected closing parenthesis"
        );

        let message = compile_err("undefined_fn");
        assert_eq!(
            message,
            "jq program does not compile: undefined function `undefined_fn/0` at offset 0"
        );

        let message = compile_err(".a | foo(1) | bar");
        assert_eq!(
            message,
            "jq program does not compile: undefined function `foo/1` at offset 5; \
             undefined function `bar/0` at offset 14"
        );

        let message = compile_err(". | )");
        assert!(
            message.starts_with("jq program does not compile: "),
            "{message}"
        );
        assert!(message.contains("at offset"), "{message}");

        for code in [
            "$x",
            "env",
            "$ENV",
            "input",
            "inputs",
            "import \"m\" as m; .",
        ] {
            let message = compile_err(code);
            assert!(
                message.starts_with("jq program does not compile: "),
                "{code}: {message}"
            );
        }
        assert_eq!(
            compile_err(""),
            "jq program does not compile: unexpected end of program at offset 0, expected term"
        );
    }

    #[test]
    fn program_is_shareable() {
        let program = Program::compile("map(. + 1)").expect("compiles");
        assert_eq!(program.source(), "map(. + 1)");
        let copy = program.clone();
        let handle = std::thread::spawn(move || copy.run(json!([1, 2])).expect("runs"));
        assert_eq!(handle.join().expect("thread finishes"), json!([2, 3]));
        assert_eq!(program.run(json!([0])).expect("runs"), json!([1]));
        assert!(format!("{program:?}").contains("map(. + 1)"));
    }
}
