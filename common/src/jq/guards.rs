//! What keeps compiling from overflowing the stack: the nesting of a program's brackets, counted
//! before jaq parses it.

/// Returns whether `code` nests brackets (`(`, `[`, `{`) and string interpolations (`\(`) deeper
/// than `limit`, reading strings and comments the way jaq's lexer does so that brackets inside
/// them do not count.
///
/// A closing bracket closes the innermost open level whatever its kind; jaq's lexer may close more
/// levels at a mismatched bracket (a program that does not compile anyway), so this never counts
/// fewer levels than jaq recurses.
pub(super) fn nesting_exceeds(code: &str, limit: usize) -> bool {
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
pub(super) fn comment_end(bytes: &[u8], mut at: usize) -> usize {
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
