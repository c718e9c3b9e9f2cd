//! Where a syntax error is. The parser reports only "invalid promql query" for
//! grammar errors; this finds the position the way a reader would, and words it
//! as Prometheus does: `LINE:COL: parse error: …`.
//!
//! 1. Brackets: the first closing bracket without its opening one, or the
//!    innermost one left open (strings and comments are skipped).
//! 2. Otherwise, the longest prefix that parses: the error is the token after it,
//!    or the end of the input when only an operator or opening follows.

use promql_parser::parser;

/// Inputs longer than this are not searched for a position (each candidate
/// prefix is parsed once).
const MAX_SEARCH: usize = 4096;

/// `LINE:COL` of a byte offset, both from 1.
pub(crate) fn line_col(q: &str, at: usize) -> String {
    let before = &q[..at.min(q.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    format!("{line}:{col}")
}

fn bracket_name(c: char) -> &'static str {
    match c {
        '(' | ')' => "parenthesis",
        '{' | '}' => "brace",
        _ => "bracket",
    }
}

/// The first bracket problem, if any.
fn brackets(q: &str) -> Option<(usize, String)> {
    let mut open: Vec<(char, usize)> = Vec::new();
    let mut it = q.char_indices();
    while let Some((i, c)) = it.next() {
        match c {
            '"' | '\'' | '`' => {
                // Skip the string; backslash escapes except in raw (`) strings.
                let mut escaped = false;
                for (_, d) in it.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if d == '\\' && c != '`' {
                        escaped = true;
                    } else if d == c {
                        break;
                    }
                }
            }
            '#' => {
                for (_, d) in it.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '(' | '{' | '[' => open.push((c, i)),
            ')' | '}' | ']' => {
                let want = match c {
                    ')' => '(',
                    '}' => '{',
                    _ => '[',
                };
                match open.pop() {
                    Some((o, _)) if o == want => {}
                    _ => {
                        return Some((i, format!("unexpected right {} '{c}'", bracket_name(c))));
                    }
                }
            }
            _ => {}
        }
    }
    open.last()
        .map(|&(c, i)| (i, format!("unclosed left {}", bracket_name(c))))
}

/// The token starting at the beginning of `s` (which starts with a non-space).
fn token(s: &str) -> &str {
    let word = |c: char| c.is_alphanumeric() || matches!(c, '_' | ':' | '.');
    let Some(first) = s.chars().next() else {
        return "";
    };
    let len = if word(first) {
        s.find(|c: char| !word(c)).unwrap_or(s.len())
    } else if ["==", "!=", ">=", "<=", "=~", "!~"]
        .iter()
        .any(|op| s.starts_with(op))
    {
        2
    } else {
        first.len_utf8()
    };
    &s[..len]
}

/// The parser's error with a position: `LINE:COL: parse error: MESSAGE`. A
/// grammar error ("invalid promql query") gets the message found here too.
pub(crate) fn with_position(q: &str, parser_message: &str) -> String {
    match find(q) {
        Some((at, found)) => {
            let msg = if parser_message == "invalid promql query" {
                found.as_str()
            } else {
                parser_message
            };
            format!("{}: parse error: {msg}", line_col(q, at))
        }
        None => parser_message.to_owned(),
    }
}

/// Where a query the parser rejected goes wrong, and what is found there.
fn find(q: &str) -> Option<(usize, String)> {
    if let Some(e) = brackets(q) {
        return Some(e);
    }
    if q.len() > MAX_SEARCH {
        return None;
    }
    let ends: Vec<usize> = q.char_indices().map(|(i, _)| i).skip(1).collect();
    let valid = ends
        .into_iter()
        .rev()
        .find(|&end| parser::parse(&q[..end]).is_ok());
    let from = valid.unwrap_or(0);
    let rest = &q[from..];
    let skipped = rest.len() - rest.trim_start().len();
    let at = from + skipped;
    let tok = token(&q[at..]);
    if tok.is_empty() {
        return Some((q.len(), "unexpected end of input".into()));
    }
    let after_at = at + tok.len();
    let after = &q[after_at..];
    let operator = [
        "+", "-", "*", "/", "%", "^", "==", "!=", ">", "<", ">=", "<=", "and", "or", "unless",
        "atan2",
    ]
    .contains(&tok);
    let opening = tok
        .chars()
        .all(|c| !c.is_alphanumeric() && c != '_' && c != '"');
    if valid.is_some() && after.trim().is_empty() && (opening || operator) {
        return Some((q.len(), "unexpected end of input".into()));
    }
    if valid.is_some() && operator {
        // A complete expression, an operator, then what cannot follow it.
        let next = after_at + (after.len() - after.trim_start().len());
        return Some((next, format!("unexpected {:?}", token(&q[next..]))));
    }
    Some((at, format!("unexpected {tok:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_inputs_do_not_panic() {
        for q in ["", " ", "\n", "#", "(", "é", "\"", "x é", "1 +\n"] {
            let _ = with_position(q, "invalid promql query");
            let _ = crate::parse(q);
        }
    }

    #[test]
    fn positions() {
        assert_eq!(
            with_position("sum(rate(x[5m])", "invalid promql query"),
            "1:4: parse error: unclosed left parenthesis"
        );
        assert_eq!(
            with_position("x{a=\"(\"", "invalid promql query"),
            "1:2: parse error: unclosed left brace"
        );
        assert_eq!(
            with_position("rate(x[5m]))", "invalid promql query"),
            "1:12: parse error: unexpected right parenthesis ')'"
        );
        assert_eq!(
            with_position("rate(x[5m]) +", "invalid promql query"),
            "1:14: parse error: unexpected end of input"
        );
        assert_eq!(
            with_position("sum(x) by (job) foo", "invalid promql query"),
            "1:17: parse error: unexpected \"foo\""
        );
        assert_eq!(
            with_position("up\n  + * 2", "invalid promql query"),
            "2:5: parse error: unexpected \"*\""
        );
    }
}
