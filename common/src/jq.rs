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
//! stacks). An output nested deeper than [`MAX_DEPTH`] is refused and dropped without recursing
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

use std::fmt::{self, Write as _};
use std::sync::Arc;

use jaq_core::load::lex::StrPart;
use jaq_core::load::parse::{BinaryOp, Pattern, Term};
use jaq_core::load::{self, Arena, File, Loader};
use jaq_core::ops::Math;
use jaq_core::path::Part;
use jaq_core::{Compiler, Ctx, Vars, data};
use jaq_json::{Num, Val};
use serde_json::Value;

use crate::value::MAX_DEPTH;

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
    /// key that is not a string, or is nested deeper than [`MAX_DEPTH`] levels. NaN and
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
    /// [`MAX_DEPTH`] levels fails with [`RunError::NotJson`]. The input is converted recursively,
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

/// The longest program [`Program::is_quick`] considers.
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
fn is_quick(code: &str) -> bool {
    code.len() <= MAX_QUICK_LEN
        && load::parse(code, |parser| parser.term()).is_some_and(|term| quick_list(&term))
}

/// A `,` list of terms of at most one output each.
fn quick_list(term: &Term<&str>) -> bool {
    match term {
        Term::BinOp(left, BinaryOp::Comma, right) => quick_list(left) && quick_list(right),
        term => quick_one(term),
    }
}

/// A term whose output is a part of its input or of a variable (a path without iteration).
fn quick_part(term: &Term<&str>) -> bool {
    match term {
        Term::Id | Term::Var(_) => true,
        Term::Path(base, _) => quick_part(base) && quick_one(term),
        _ => false,
    }
}

/// A term of at most one output (for one input) whose run is linear in its input.
fn quick_one(term: &Term<&str>) -> bool {
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
    // Showing an error recurses into the values it holds, and so does dropping it; jaq offers no
    // way to take an error apart without showing it. An error holding a value nested too deep is
    // therefore leaked rather than shown or dropped: a leak beats overflowing the stack.
    let mut probe = DepthProbe::new(MAX_DEPTH);
    if write!(probe, "{error}").is_err() {
        std::mem::forget(error);
        return format!(
            "jq program raised an error whose value is nested deeper than {MAX_DEPTH} levels"
        );
    }
    match error.into_val() {
        Val::TStr(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        other => other.to_string(),
    }
}

/// Returns whether `code` nests brackets (`(`, `[`, `{`) and string interpolations (`\(`) deeper
/// than `limit`, reading strings and comments the way jaq's lexer does so that brackets inside
/// them do not count.
///
/// A closing bracket closes the innermost open level whatever its kind; jaq's lexer may close more
/// levels at a mismatched bracket (a program that does not compile anyway), so this never counts
/// fewer levels than jaq recurses.
fn nesting_exceeds(code: &str, limit: usize) -> bool {
    /// What an open level is.
    #[derive(PartialEq)]
    enum Open {
        /// `(`, `[` or `{` in code.
        Bracket,
        /// `\(` inside a string: code up to the matching `)`.
        Interpolation,
        /// A string literal.
        Str,
    }
    let bytes = code.as_bytes();
    let mut open: Vec<Open> = Vec::new();
    let mut depth = 0;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        at += 1;
        if open.last() == Some(&Open::Str) {
            match byte {
                b'"' => {
                    open.pop();
                }
                b'\\' if bytes.get(at) == Some(&b'(') => {
                    at += 1;
                    open.push(Open::Interpolation);
                    depth += 1;
                }
                // Any other escape is one character long (`\u` is followed by hex digits only).
                b'\\' => at += 1,
                _ => {}
            }
        } else {
            match byte {
                b'"' => open.push(Open::Str),
                b'(' | b'[' | b'{' => {
                    open.push(Open::Bracket);
                    depth += 1;
                }
                // Outside strings the innermost open level is a bracket or an interpolation.
                b')' | b']' | b'}' if depth > 0 => {
                    open.pop();
                    depth -= 1;
                }
                b'#' => at = comment_end(bytes, at),
                _ => {}
            }
        }
        if depth > limit {
            return true;
        }
    }
    false
}

/// Returns the offset just past the comment whose text starts at `at` (after its `#`): the end of
/// its line, or of a later line when the line ends with an odd number of backslashes, as in jaq.
fn comment_end(bytes: &[u8], mut at: usize) -> usize {
    loop {
        let rest = &bytes[at..];
        let (line, next) = match rest.iter().position(|&b| b == b'\n') {
            Some(newline) => (&rest[..newline], at + newline + 1),
            None => (rest, bytes.len()),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let backslashes = line.iter().rev().take_while(|&&b| b == b'\\').count();
        at = next;
        if backslashes % 2 == 0 || at == bytes.len() {
            return at;
        }
    }
}

/// A `fmt::Write` sink that keeps nothing and fails once the JSON-like text written to it opens
/// more than `limit` arrays and objects at once. jaq writes a value's `[` or `{` before it recurses
/// into the value's items, so formatting into a probe recurses at most `limit` levels deep.
struct DepthProbe {
    limit: usize,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl DepthProbe {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            depth: 0,
            in_string: false,
            escaped: false,
        }
    }
}

impl fmt::Write for DepthProbe {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if self.in_string {
                match byte {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'[' | b'{' => {
                    self.depth += 1;
                    if self.depth > self.limit {
                        return Err(fmt::Error);
                    }
                }
                b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
        }
        Ok(())
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

/// Returns the JSON value for a jaq output, or why there is none.
///
/// The depth is checked first, without recursion, so that the conversion (which recurses) goes at
/// most [`MAX_DEPTH`] levels deep and no deeply nested `serde_json::Value` is ever built (they drop
/// recursively too).
fn json_from_output(value: Val) -> Result<Value, RunError> {
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
fn nested_deeper_than(value: &Val, limit: usize) -> bool {
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
fn drop_iteratively(value: Val) {
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

/// The most programs a [`ProgramCache`] keeps before it starts over: definitions are few, so this
/// only bounds the growth that many one-off inline definitions would cause.
pub const PROGRAM_CACHE_LIMIT: usize = 10_000;

/// Compiled programs keyed by source text, shared by every caller that clones the cache.
#[derive(Clone, Default)]
pub struct ProgramCache {
    programs: Arc<std::sync::Mutex<std::collections::HashMap<String, Program>>>,
}

impl fmt::Debug for ProgramCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProgramCache")
            .field("programs", &self.lock().len())
            .finish()
    }
}

impl ProgramCache {
    /// Whether `source` is compiled already.
    pub fn contains(&self, source: &str) -> bool {
        self.lock().contains_key(source)
    }

    /// Whether `source` is compiled already and quick ([`Program::is_quick`]).
    pub fn is_quick(&self, source: &str) -> bool {
        self.lock().get(source).is_some_and(Program::is_quick)
    }

    /// Returns the compiled program for `source`, compiling it on first use.
    pub fn get(&self, source: &str) -> Result<Program, CompileError> {
        let mut programs = self.lock();
        if let Some(program) = programs.get(source) {
            return Ok(program.clone());
        }
        let program = Program::compile(source)?;
        if programs.len() >= PROGRAM_CACHE_LIMIT {
            programs.clear();
        }
        programs.insert(source.to_owned(), program.clone());
        Ok(program)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Program>> {
        crate::sync::lock(&self.programs)
    }
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

    const TOO_DEEP_PROGRAM: &str = "jq program is nested deeper than 128 levels";

    /// Returns `inner` wrapped in `levels` copies of `open` and `close`.
    fn nest(levels: usize, open: &str, inner: &str, close: &str) -> String {
        format!("{}{inner}{}", open.repeat(levels), close.repeat(levels))
    }

    /// Returns a program whose output is `0` inside `levels` arrays.
    fn deep_array(levels: usize) -> String {
        format!("reduce range({levels}) as $i (0; [.])")
    }

    #[test]
    fn programs_nested_up_to_the_limit_compile() {
        let limit = MAX_PROGRAM_NESTING;
        for (open, close) in [("(", ")"), ("[", "]"), ("{a: ", "}"), ("\"\\(", ")\"")] {
            let program = nest(limit, open, "1", close);
            assert!(Program::compile(&program).is_ok(), "{program}");
        }
        check(&nest(limit, "(", ".", ")"), json!(1), json!(1));
        check(&nest(limit, "\"\\(", "1", ")\""), json!(null), json!("1"));
    }

    #[test]
    fn programs_nested_deeper_are_refused_before_parsing() {
        let limit = MAX_PROGRAM_NESTING;
        for program in [
            nest(limit + 1, "(", ".", ")"),
            nest(limit + 1, "[", ".", "]"),
            nest(limit + 1, "{a: ", ".", "}"),
            nest(limit + 1, "\"\\(", "1", ")\""),
            nest(limit / 2 + 1, "[(", ".", ")]"),
            nest(limit / 2 + 1, "\"\\((", "1", "))\""),
            nest(2_000, "(", ".", ")"),
            "(".repeat(4_000),
            format!(". | {}", "[".repeat(4_000)),
            format!("# \"\n{}", nest(limit + 1, "(", ".", ")")),
        ] {
            assert_eq!(compile_err(&program), TOO_DEEP_PROGRAM, "{program}");
        }
    }

    #[test]
    fn programs_longer_than_the_limit_are_refused() {
        let long = vec!["1"; MAX_PROGRAM_LEN / 2 + 1].join("+");
        assert!(
            compile_err(&long).contains("bytes long"),
            "{}",
            compile_err(&long)
        );
        // The longest program compiles and runs on a thread with the stack the scheduler and
        // the worker give their runtime threads.
        let fits = vec!["1"; MAX_PROGRAM_LEN / 2].join("+");
        let output = std::thread::Builder::new()
            .stack_size(32 * 1024 * 1024)
            .spawn(move || Program::compile(&fits).map(|program| program.run(json!(null))))
            .expect("thread starts")
            .join()
            .expect("thread finishes");
        assert_eq!(output, Ok(Ok(json!(MAX_PROGRAM_LEN / 2))));
    }

    #[test]
    fn brackets_in_strings_and_comments_do_not_count() {
        let deep = "(".repeat(1000);
        check(&format!("\"{deep}\""), json!(null), json!(deep));
        check(
            &format!("\"\\\"{deep}\""),
            json!(null),
            json!(format!("\"{deep}")),
        );
        check(&format!("\"\\\\\" | \"{deep}\""), json!(null), json!(deep));
        check(
            &format!("\"\\(1){deep}\""),
            json!(null),
            json!(format!("1{deep}")),
        );
        check(&format!(". # {deep}\n"), json!(1), json!(1));
        check(&format!(". # {deep}"), json!(1), json!(1));
        check(
            &format!(". # a comment \\\n {deep}\n| . + 1"),
            json!(1),
            json!(2),
        );
        check(
            &format!("\"#\" + \"{deep}\""),
            json!(null),
            json!(format!("#{deep}")),
        );
    }

    #[test]
    fn outputs_nested_deeper_than_max_depth_are_refused() {
        let nested = (0..MAX_DEPTH).fold(json!(0), |value, _| json!([value]));
        check(&deep_array(MAX_DEPTH), json!(null), nested);
        let too_deep = RunError::NotJson("value is nested deeper than 64 levels".to_owned());
        assert_eq!(run_err(&deep_array(MAX_DEPTH + 1), json!(null)), too_deep);
        assert_eq!(run_err(&deep_array(100_000), json!(null)), too_deep);
        assert_eq!(
            run_err("reduce range(100000) as $i (0; {a: .})", json!(null)),
            too_deep
        );
        let deep_key = format!("{{({}): 1}}", deep_array(MAX_DEPTH));
        assert_eq!(run_err(&deep_key, json!(null)), too_deep);
        let after_others = format!("1, [2], {}", deep_array(100_000));
        assert_eq!(run_err(&after_others, json!(null)), too_deep);
        assert_eq!(
            too_deep.to_string(),
            "jq output is not JSON: value is nested deeper than 64 levels"
        );
    }

    #[test]
    fn errors_holding_values_nested_too_deep_are_not_shown() {
        let not_shown = RunError::Failed(
            "jq program raised an error whose value is nested deeper than 64 levels".to_owned(),
        );
        for program in [
            format!("error({})", deep_array(MAX_DEPTH + 1)),
            format!("error({})", deep_array(100_000)),
            format!("{} | .a", deep_array(100_000)),
            format!("error({{a: {}}})", deep_array(100_000)),
        ] {
            assert_eq!(run_err(&program, json!(null)), not_shown, "{program}");
        }
        let shown = format!("{}0{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(
            run_err(&format!("error({})", deep_array(MAX_DEPTH)), json!(null)),
            RunError::Failed(shown)
        );
        assert_eq!(
            run_err(&format!("error(\"{}\")", "[".repeat(1000)), json!(null)),
            RunError::Failed("[".repeat(1000))
        );
        assert_eq!(
            run_err(
                &format!("error({{a: \"{}\"}})", "[".repeat(1000)),
                json!(null)
            ),
            RunError::Failed(format!("{{\"a\":\"{}\"}}", "[".repeat(1000)))
        );
    }

    #[test]
    fn the_cache_tells_which_programs_it_holds() {
        let cache = ProgramCache::default();
        assert!(!cache.contains(".a"));
        cache.get(".a").expect("compiles");
        assert!(cache.contains(".a"));
        assert!(cache.get("(").is_err());
        assert!(
            !cache.contains("("),
            "a program that does not compile is not kept"
        );
    }

    #[test]
    fn programs_that_read_their_input_once_are_quick() {
        for program in [
            ".",
            ".a",
            ".a.b[0]?",
            ".[1:3]",
            ".[.key]",
            "{id: .id, name: (.first + \" \" + .last), tags}",
            "[.a, .b, 1, \"x\", null]",
            ".a, .b",
            "\"\\(.name) is \\(.age | tostring)\"",
            "if .n > 3 then \"big\" elif .n < 0 then \"neg\" else .n end",
            ".a // \"default\"",
            ".total as $t | {t: $t, half: ($t / 2)}",
            ".user | {name, id}",
            ".a.b as $x | $x.c | length",
            ".csv / \",\"",
            "try .a.b catch \"none\"",
            "(.items | length) == 0 and (.name | not)",
            "{(.key): .value}",
            ".n | floor",
            "-.n + 1",
        ] {
            let compiled = Program::compile(program).expect("program compiles");
            assert!(compiled.is_quick(), "{program:?} is quick");
        }
    }

    #[test]
    fn programs_that_iterate_recurse_or_call_with_arguments_are_not_quick() {
        let long = format!("[{}]", vec![".a"; MAX_QUICK_LEN / 3 + 1].join(","));
        for program in [
            ".[]",
            "..",
            "[.[] | .a]",
            "map(.a)",
            "select(.a)",
            "[range(10)]",
            "reduce .[] as $x (0; . + $x)",
            "foreach .[] as $x (0; . + $x)",
            "def f: .; f",
            "repeat(.)",
            "recurse",
            "add",
            "(.a, .b) + (.c, .d)",
            ".s * 1000",
            ".a - .b",
            ". + . | . + . | . + .",
            "(. + .) as $x | $x + $x",
            "{a: .} | .a",
            "-.n | floor",
            "{a: (1, 2)}",
            ".a |= 1",
            ".a = 1",
            ".[] as [$x] | $x",
            "label $out | 1",
            "@base64",
            "limit(3; .[])",
            long.as_str(),
        ] {
            let compiled = Program::compile(program).expect("program compiles");
            assert!(!compiled.is_quick(), "{program:?} is not quick");
        }
    }
}
