//! LogQL tokens, with their byte offsets for error messages.

use super::ParseError;

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    /// Nanoseconds.
    Dur(i64),
    Bytes(f64),
    LBrace,
    RBrace,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Pipe,
    PipeEq,    // |=
    PipeTilde, // |~
    PipeGt,    // |>
    BangEq,    // !=
    BangTilde, // !~
    BangGt,    // !>
    Eq,        // =
    EqEq,      // ==
    EqTilde,   // =~
    Gt,
    Ge,
    Lt,
    Le,
    Plus,
    Minus,
    Star,
    Slash,
    Percent,
    Caret,
    Eof,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub tok: Tok,
    pub at: usize,
}

const DUR_UNITS: [(&str, f64); 8] = [
    ("ns", 1.0),
    ("us", 1e3),
    ("µs", 1e3),
    ("ms", 1e6),
    ("s", 1e9),
    ("m", 60e9),
    ("h", 3600e9),
    ("d", 86400e9),
];

/// Byte size units as Loki reads them (`KB` and `KiB` are both 1024).
fn byte_unit(u: &str) -> Option<f64> {
    Some(match u.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" | "kib" => 1024.0,
        "mb" | "mib" => 1024.0 * 1024.0,
        "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "tb" | "tib" => 1024f64.powi(4),
        "pb" | "pib" => 1024f64.powi(5),
        _ => return None,
    })
}

/// `1h30m`, `300ms`, `1.5s`, `2d`, `1w`, `1y`.
pub fn parse_duration(s: &str) -> Option<i64> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n == 0 {
            return None;
        }
        let v: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..u];
        let mult = match unit {
            "w" => 7.0 * 86400e9,
            "y" => 365.0 * 86400e9,
            _ => DUR_UNITS.iter().find(|(n, _)| *n == unit)?.1,
        };
        total += v * mult;
        rest = &rest[u..];
    }
    (total.is_finite() && total.abs() < 9.2e18).then_some(total as i64)
}

/// `5KB`, `1.5MiB`, `100B`.
pub fn parse_bytes(s: &str) -> Option<f64> {
    let n = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let v: f64 = s[..n].parse().ok()?;
    Some(v * byte_unit(&s[n..])?)
}

pub fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |at: usize, msg: String| ParseError { at, msg };
    while i < b.len() {
        let c = b[i];
        let at = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        let two = |s: &str| src[i..].starts_with(s);
        let (tok, len) = if two("|=") {
            (Tok::PipeEq, 2)
        } else if two("|~") {
            (Tok::PipeTilde, 2)
        } else if two("|>") {
            (Tok::PipeGt, 2)
        } else if two("!=") {
            (Tok::BangEq, 2)
        } else if two("!~") {
            (Tok::BangTilde, 2)
        } else if two("!>") {
            (Tok::BangGt, 2)
        } else if two("==") {
            (Tok::EqEq, 2)
        } else if two("=~") {
            (Tok::EqTilde, 2)
        } else if two(">=") {
            (Tok::Ge, 2)
        } else if two("<=") {
            (Tok::Le, 2)
        } else {
            let t = match c {
                b'{' => Some(Tok::LBrace),
                b'}' => Some(Tok::RBrace),
                b'(' => Some(Tok::LParen),
                b')' => Some(Tok::RParen),
                b'[' => Some(Tok::LBracket),
                b']' => Some(Tok::RBracket),
                b',' => Some(Tok::Comma),
                b'|' => Some(Tok::Pipe),
                b'=' => Some(Tok::Eq),
                b'>' => Some(Tok::Gt),
                b'<' => Some(Tok::Lt),
                b'+' => Some(Tok::Plus),
                b'-' => Some(Tok::Minus),
                b'*' => Some(Tok::Star),
                b'/' => Some(Tok::Slash),
                b'%' => Some(Tok::Percent),
                b'^' => Some(Tok::Caret),
                _ => None,
            };
            match t {
                Some(t) => (t, 1),
                None => {
                    if c == b'"' {
                        let mut s = String::new();
                        let mut j = i + 1;
                        loop {
                            let Some(ch) = src[j..].chars().next() else {
                                return Err(err(at, "unterminated string".into()));
                            };
                            j += ch.len_utf8();
                            match ch {
                                '"' => break,
                                '\\' => {
                                    let Some(e) = src[j..].chars().next() else {
                                        return Err(err(at, "unterminated string".into()));
                                    };
                                    j += e.len_utf8();
                                    match e {
                                        'n' => s.push('\n'),
                                        't' => s.push('\t'),
                                        'r' => s.push('\r'),
                                        '\\' => s.push('\\'),
                                        '"' => s.push('"'),
                                        // Regex escapes stay as written: "\d", "\.".
                                        other => {
                                            s.push('\\');
                                            s.push(other);
                                        }
                                    }
                                }
                                ch => s.push(ch),
                            }
                        }
                        out.push(Token {
                            tok: Tok::Str(s),
                            at,
                        });
                        i = j;
                        continue;
                    }
                    if c == b'`' {
                        let Some(end) = src[i + 1..].find('`') else {
                            return Err(err(at, "unterminated raw string".into()));
                        };
                        out.push(Token {
                            tok: Tok::Str(src[i + 1..i + 1 + end].to_owned()),
                            at,
                        });
                        i += end + 2;
                        continue;
                    }
                    if c.is_ascii_digit()
                        || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
                    {
                        let mut j = i;
                        while j < b.len()
                            && (b[j].is_ascii_alphanumeric() || b[j] == b'.' || b[j] == b'_')
                        {
                            j += 1;
                        }
                        // µs is two bytes.
                        if src[j..].starts_with('µ') {
                            j += 'µ'.len_utf8();
                            while j < b.len() && b[j].is_ascii_alphabetic() {
                                j += 1;
                            }
                        }
                        let word = &src[i..j];
                        let tok = if let Ok(v) = word.parse::<f64>() {
                            Tok::Num(v)
                        } else if let Some(d) = parse_duration(word) {
                            Tok::Dur(d)
                        } else if let Some(v) = parse_bytes(word) {
                            Tok::Bytes(v)
                        } else {
                            return Err(err(at, format!("bad number, duration or size {word:?}")));
                        };
                        out.push(Token { tok, at });
                        i = j;
                        continue;
                    }
                    if c.is_ascii_alphabetic() || c == b'_' {
                        let mut j = i;
                        while j < b.len()
                            && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.')
                        {
                            j += 1;
                        }
                        out.push(Token {
                            tok: Tok::Ident(src[i..j].to_owned()),
                            at,
                        });
                        i = j;
                        continue;
                    }
                    let ch = src[i..].chars().next().unwrap_or('?');
                    return Err(err(at, format!("unexpected character {ch:?}")));
                }
            }
        };
        out.push(Token { tok, at });
        i += len;
    }
    out.push(Token {
        tok: Tok::Eof,
        at: src.len(),
    });
    Ok(out)
}
