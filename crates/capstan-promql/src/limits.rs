//! Bounds on an expression's text, checked before it is parsed, so neither the
//! parser, the evaluator nor dropping the tree can recurse without a bound.
//!
//! The tree an expression parses into is at most as deep as its bracket nesting
//! plus its operators (a chain `a + b + c` nests one level per operator), so
//! bounding both bounds every recursive walk over the tree.

/// The longest expression accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 256 * 1024;
/// The deepest nesting of `(`, `[` and `{` accepted.
pub const MAX_NESTING: usize = 128;
/// The most binary and unary operators accepted in one expression.
pub const MAX_OPERATORS: usize = 1024;

/// The stack a thread needs to parse, evaluate and drop an expression at these
/// limits (measured on unoptimized builds, which use the most: about 4 KiB a
/// level); the daemon's threads get this much.
pub const STACK_BYTES: usize = 16 << 20;

/// How an expression language writes what [`check`] must see.
#[derive(Debug, Clone, Copy)]
pub struct Syntax {
    /// Whether operators inside `{…}` count (TraceQL: yes; PromQL and LogQL
    /// selectors hold a flat list of matchers: no).
    pub operators_in_braces: bool,
    /// Words that are binary operators.
    pub keywords: &'static [&'static str],
}

pub const PROMQL: Syntax = Syntax {
    operators_in_braces: false,
    keywords: &["and", "or", "unless", "atan2"],
};

/// Checks `text` against the limits above; the error says which and where
/// (`line:column: …`).
pub fn check(text: &str, syntax: Syntax) -> Result<(), String> {
    if text.len() > MAX_QUERY_BYTES {
        return Err(format!(
            "the expression is {} bytes long, over the limit of {MAX_QUERY_BYTES}",
            text.len()
        ));
    }
    let b = text.as_bytes();
    let (mut depth, mut braces, mut ops) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    if b[i] == b'\\' && c != b'`' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'(' | b'[' | b'{' => {
                depth += 1;
                braces += usize::from(c == b'{');
                if depth > MAX_NESTING {
                    return Err(format!(
                        "{}: the expression nests deeper than {MAX_NESTING} levels",
                        crate::position::line_col(text, i)
                    ));
                }
            }
            b')' | b']' | b'}' => {
                depth = depth.saturating_sub(1);
                if c == b'}' {
                    braces = braces.saturating_sub(1);
                }
            }
            _ => {
                let counts = braces == 0 || syntax.operators_in_braces;
                let start = i;
                if b"+-*/%^=!<>&|~".contains(&c) {
                    while i + 1 < b.len() && b"+-*/%^=!<>&|~".contains(&b[i + 1]) {
                        i += 1;
                    }
                    // `--1` is two unary operators; `>=` is one.
                    let signs = b[start..=i].iter().filter(|c| matches!(c, b'+' | b'-'));
                    ops += usize::from(counts) * signs.count().max(1);
                } else if c.is_ascii_alphabetic() || c == b'_' {
                    while i + 1 < b.len() && (b[i + 1].is_ascii_alphanumeric() || b[i + 1] == b'_')
                    {
                        i += 1;
                    }
                    let word = &text[start..=i];
                    ops += usize::from(
                        counts && syntax.keywords.iter().any(|k| k.eq_ignore_ascii_case(word)),
                    );
                }
                if ops > MAX_OPERATORS {
                    return Err(format!(
                        "{}: the expression has more than {MAX_OPERATORS} operators",
                        crate::position::line_col(text, start)
                    ));
                }
            }
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_operators_and_length_are_bounded() {
        let ok = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert_eq!(check(&ok, PROMQL), Ok(()));
        let deep = format!(
            "{}1{}",
            "(".repeat(MAX_NESTING + 1),
            ")".repeat(MAX_NESTING + 1)
        );
        assert_eq!(
            check(&deep, PROMQL).unwrap_err(),
            "1:129: the expression nests deeper than 128 levels"
        );
        let chain = vec!["a"; MAX_OPERATORS + 2].join(" + ");
        assert!(
            check(&chain, PROMQL)
                .unwrap_err()
                .contains("more than 1024 operators")
        );
        let words = vec!["a"; MAX_OPERATORS + 2].join(" and ");
        assert!(check(&words, PROMQL).is_err());
        let unary = format!("{}1", "- ".repeat(MAX_OPERATORS + 1));
        assert!(check(&unary, PROMQL).is_err());
        let unary = format!("{}1", "-+".repeat(MAX_OPERATORS / 2 + 1));
        assert!(check(&unary, PROMQL).is_err());
        assert!(check(&"a".repeat(MAX_QUERY_BYTES + 1), PROMQL).is_err());
    }

    #[test]
    fn strings_comments_and_matchers_do_not_count() {
        let brackets = "(((((".repeat(100);
        let q = format!("up{{a=\"{brackets}\", b='{brackets}', c=`{brackets}`}} # {brackets}");
        assert_eq!(check(&q, PROMQL), Ok(()));
        let matchers: Vec<String> = (0..2000).map(|i| format!("l{i}!=\"x\"")).collect();
        assert_eq!(
            check(&format!("up{{{}}}", matchers.join(",")), PROMQL),
            Ok(())
        );
        assert_eq!(check("up{a=\"\\\"(\"} and on(a) or_x", PROMQL), Ok(()));
    }
}
