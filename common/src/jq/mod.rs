//! Compiles and runs jq programs (via the `jaq` crates) on `serde_json` values.
//!
//! This module owns the translation between jq programs, `serde_json::Value`s and jaq's own value
//! type, and the wording of compile and run errors. It does no I/O: programs cannot read files,
//! standard input (`input`/`inputs` are not defined), the environment (`env` and `$ENV` are not
//! defined) or import modules, and running a program never prints anything or exits the process
//! (`halt` and `halt_error` end the program, see [`Program::run_all`]; `debug` and `stderr` only
//! emit records to the `log` facade, which this project does not route anywhere). It does not
//! decide time or memory limits: a program that loops runs until it finishes and one that
//! allocates without bound ends the process, so callers run every program in a sandbox process
//! (`taskfleet_io::jq_sandbox`), unless the program is quick ([`Program::is_quick`]) and its
//! input small.
//!
//! Programs arrive with requests and may be hostile. Compiling happens in the caller's own
//! process, so this module keeps compiling from overflowing the stack, which would abort it: a
//! program nested deeper than [`MAX_PROGRAM_NESTING`] brackets or longer than
//! [`MAX_PROGRAM_LEN`] bytes is refused before jaq lexes it (jaq's lexer, parser and compiler
//! recurse once per level and once per operator in a row; callers compile on threads with large
//! stacks). An output nested deeper than [`MAX_DEPTH`](crate::value::MAX_DEPTH) is refused and dropped without recursing
//! into it, and an error value is shown only when it is nested no deeper than that either. What
//! recurses inside a run is beyond this module's reach, and is why runs that are not quick
//! happen in a sandbox: a program that recurses without end (`def f: 1 + f; f`), or one that
//! builds a value nested many thousands deep and then works on it (`length`, `tojson`,
//! comparing) or drops it, overflows the stack of its thread.
//!
//! Numbers follow jaq: integers stay integers (of any size) and floats stay floats, so `4 / 2`
//! yields `2.0` and `. + 0` keeps an integer input an integer. Values that JSON cannot express
//! are mapped the way jq maps them where jq has an answer (NaN becomes `null`, ±infinity becomes
//! ±`f64::MAX`, integers beyond the range of `serde_json` numbers become the nearest float) and
//! rejected with [`RunError::NotJson`] otherwise (byte strings, non-string object keys).

use std::fmt;
use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::Val;
use serde_json::Value;

mod cache;
mod convert;
mod describe;
mod guards;
mod quick;
#[cfg(test)]
mod tests;

pub use cache::{PROGRAM_CACHE_LIMIT, ProgramCache};
use convert::{json_from_output, val_from_json};
use describe::excerpt;
use describe::{compile_error, describe_load_error, describe_undefined, error_message};
use guards::nesting_exceeds;
use quick::is_quick;
pub use quick::{MAX_QUICK_LEN, QUICK_INPUT_SIZE};

/// The value type the compiled filters work on.
type Data = data::JustLut<Val>;

/// The output limit used by [`Program::run`].
pub const DEFAULT_OUTPUT_LIMIT: usize = 1_000_000;

/// The longest excerpt of a program or a value that an error message quotes.
const EXCERPT_CHARS: usize = 40;

/// The deepest nesting of brackets (`(`, `[`, `{`) and string interpolations (`\(`) a program may
/// have; jaq's lexer, parser and compiler each recurse once per level.
pub const MAX_PROGRAM_NESTING: usize = 128;

/// The longest program accepted, in bytes. jaq recurses once per operator in a row too, so a
/// bound on the length bounds the stack a program's syntax can take: with the 32 MiB threads
/// the scheduler and worker run programs on, programs of this size stay far from the limit.
pub const MAX_PROGRAM_LEN: usize = 8 * 1024;

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
    quick: bool,
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
    /// "; ", each naming its byte offset in the program where jaq reports one; or is
    /// "jq program is nested deeper than 128 levels" for a program refused before parsing.
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
    /// key that is not a string, or is nested deeper than [`MAX_DEPTH`](crate::value::MAX_DEPTH) levels. NaN and
    /// infinite numbers are not errors (see the module docs).
    #[error("jq output is not JSON: {0}")]
    NotJson(String),
}

impl Program {
    /// Compiles `code` (jq syntax, with jaq's core + std + json definitions available, e.g. map,
    /// select, add, length, keys, to_entries, tostring, tojson...).
    ///
    /// `env`, `$ENV`, `input`, `inputs` and module imports are not available. A program nested
    /// deeper than [`MAX_PROGRAM_NESTING`] levels is refused without being parsed.
    pub fn compile(code: &str) -> Result<Program, CompileError> {
        if code.len() > MAX_PROGRAM_LEN {
            return Err(CompileError {
                message: format!(
                    "jq program is {} bytes long, more than the limit of {MAX_PROGRAM_LEN}",
                    code.len()
                ),
            });
        }
        if nesting_exceeds(code, MAX_PROGRAM_NESTING) {
            return Err(CompileError {
                message: format!("jq program is nested deeper than {MAX_PROGRAM_NESTING} levels"),
            });
        }
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
                quick: is_quick(code),
            }),
        })
    }

    /// Returns the source it was compiled from.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Whether the program is of the kind whose run takes time linear in its input's size, with
    /// one output per value of a top-level `,` list: at most [`MAX_QUICK_LEN`] bytes of paths
    /// without iteration, literals, arrays and objects built from them, string interpolation,
    /// `+`, `/`, `%`, comparisons, `//`, `and`/`or`, `if`, `try`, pipes and `as $x` bindings
    /// whose left side is a path, calling only builtins that take no argument and read their
    /// input once (`length`, `tostring`, `keys`...). No `.[]` or `..`, no `reduce`/`foreach`,
    /// no definitions, no calls with arguments (`map`, `select`, `range`), no assignments, no
    /// `*` (which repeats strings) or `-` (which compares every pair of two arrays' items). On a
    /// small input such a program runs in microseconds.
    pub fn is_quick(&self) -> bool {
        self.inner.quick
    }

    /// Runs the program on `input` and returns all of its outputs, in order. Stops with
    /// RunError::TooManyOutputs after `limit` outputs.
    ///
    /// The first error the program raises ends the run, discarding earlier outputs. `halt` (exit
    /// code 0) ends the run successfully with the outputs produced so far; `halt_error` or `halt`
    /// with any other exit code fails with [`RunError::Failed`]. An output nested deeper than
    /// [`MAX_DEPTH`](crate::value::MAX_DEPTH) levels fails with [`RunError::NotJson`]. The input is converted recursively,
    /// so it should be nested no deeper than values `serde_json` reads (128 levels).
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
            outputs.push(json_from_output(value)?);
        }
        Ok(outputs)
    }

    /// Runs the program and returns its single result: zero outputs -> Value::Null, one -> that
    /// value, several -> a JSON array of all of them (in order). Uses a default output limit of
    /// 1_000_000.
    pub fn run(&self, input: Value) -> Result<Value, RunError> {
        self.run_all(input, DEFAULT_OUTPUT_LIMIT).map(single_value)
    }
}

/// Returns the single result of a program's outputs, as [`Program::run`] gives it: zero outputs
/// -> `null`, one -> that value, several -> an array of all of them (in order).
pub fn single_value(mut outputs: Vec<Value>) -> Value {
    match outputs.len() {
        0 => Value::Null,
        1 => outputs.pop().unwrap_or(Value::Null),
        _ => Value::Array(outputs),
    }
}
