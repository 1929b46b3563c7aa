//! The wording of compile and run errors: every problem named, with its place in the program.

use jaq_core::load::{self};
use jaq_json::Val;
use std::fmt::{self, Write as _};

use super::*;
use crate::value::MAX_DEPTH;

/// Returns the compile error listing `problems`.
pub(super) fn compile_error(problems: impl Iterator<Item = String>) -> CompileError {
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
pub(super) fn describe_load_error(code: &str, error: &load::Error<&str>) -> Vec<String> {
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
pub(super) fn describe_undefined(
    code: &str,
    name: &str,
    kind: &jaq_core::compile::Undefined,
) -> String {
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
pub(super) fn at(code: &str, part: &str) -> String {
    let (start, end) = (code.as_ptr() as usize, code.as_ptr() as usize + code.len());
    let part_start = part.as_ptr() as usize;
    if start <= part_start && part_start + part.len() <= end {
        format!(" at offset {}", load::span(code, part).start)
    } else {
        String::new()
    }
}

/// Returns `text` in backticks, shortened to [`EXCERPT_CHARS`] characters.
pub(super) fn excerpt(text: &str) -> String {
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
pub(super) fn error_message(error: jaq_core::Error<Val>) -> String {
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
