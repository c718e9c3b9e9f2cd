//! One line at a time: syntax of both formats, no cross-line state.

use std::borrow::Cow;

use crate::{Entry, Exemplar, Format, MetricType, ParseError, Sample};

pub(crate) enum Line<'a> {
    Entry(Entry<'a>),
    /// A comment (text format) or a blank line (text format).
    Skip,
    /// `# EOF` (OpenMetrics).
    Eof,
}

/// The text between a sample's braces, already checked; values are unescaped
/// when iterated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Labels<'a> {
    raw: &'a str,
}

impl<'a> Labels<'a> {
    pub fn is_empty(&self) -> bool {
        self.raw.trim().is_empty()
    }

    /// The text between the braces, as written.
    pub fn raw(&self) -> &'a str {
        self.raw
    }

    /// `(name, value)` pairs in written order.
    pub fn iter(&self) -> LabelIter<'a> {
        LabelIter { rest: self.raw }
    }

    /// The value of one label, if present.
    pub fn get(&self, name: &str) -> Option<Cow<'a, str>> {
        self.iter()
            .filter_map(Result::ok)
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

pub struct LabelIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = Result<(&'a str, Cow<'a, str>), ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        let text = self.rest;
        let b = text.as_bytes();
        let skip_ws = |mut i: usize| {
            while i < b.len() && matches!(b[i], b' ' | b'\t') {
                i += 1;
            }
            i
        };
        let mut i = 0;
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b',') {
            i += 1;
        }
        if i == b.len() {
            return None;
        }
        let start = i;
        while i < b.len() && LABEL_CHAR[b[i] as usize] {
            i += 1;
        }
        let name = &text[start..i];
        i = skip_ws(i);
        let malformed = || {
            Some(Err(ParseError {
                line: 0,
                message: "malformed labels".into(),
            }))
        };
        if b.get(i) != Some(&b'=') {
            self.rest = "";
            return malformed();
        }
        i = skip_ws(i + 1);
        if b.get(i) != Some(&b'"') {
            self.rest = "";
            return malformed();
        }
        let body = &text[i + 1..];
        let (end, escaped) = quoted_end_escaped(body).unwrap_or((body.len(), false));
        self.rest = body.get(end + 1..).unwrap_or("");
        let raw = &body[..end];
        Some(Ok((
            name,
            if escaped {
                unescape(raw, false)
            } else {
                Cow::Borrowed(raw)
            },
        )))
    }
}

/// Like [`quoted_end`], also telling whether the string holds a backslash.
fn quoted_end_escaped(s: &str) -> Option<(usize, bool)> {
    let b = s.as_bytes();
    let mut escaped = false;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => {
                escaped = true;
                i += 2;
            }
            b'"' => return Some((i, escaped)),
            _ => i += 1,
        }
    }
    None
}

/// Bytes allowed in label names (after the first).
const LABEL_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b == b'_' || b.is_ascii_alphanumeric();
        c += 1;
    }
    t
};

/// Bytes allowed in metric names (after the first).
const NAME_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b == b'_' || b == b':' || b.is_ascii_alphanumeric();
        c += 1;
    }
    t
};

/// Index of the closing quote of a quoted string whose opening quote was just consumed.
fn quoted_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Undoes `\\`, `\n` and `\"` (the last only where `help` is false or in
/// OpenMetrics); other backslash sequences are kept as written.
fn unescape(s: &str, help_text: bool) -> Cow<'_, str> {
    if !s.contains('\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if !help_text => out.push('"'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

fn is_name_start(c: u8) -> bool {
    c == b'_' || c == b':' || c.is_ascii_alphabetic()
}

fn is_name_char(c: u8) -> bool {
    c == b'_' || c == b':' || c.is_ascii_alphanumeric()
}

/// Length of the metric name at the start of `s` (0 if none).
fn name_len(s: &str) -> usize {
    let b = s.as_bytes();
    if b.is_empty() || !is_name_start(b[0]) {
        return 0;
    }
    b.iter()
        .position(|&c| !NAME_CHAR[c as usize])
        .unwrap_or(b.len())
}

fn is_metric_name(s: &str) -> bool {
    !s.is_empty() && name_len(s) == s.len()
}

/// Checks the labels starting after `{`; returns the inside text and what follows `}`.
fn scan_labels(s: &str, strict: bool) -> Result<(&str, &str), String> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut names: [&str; 16] = [""; 16];
    let mut more: Vec<&str> = Vec::new();
    let mut count = 0usize;
    let mut after_comma = false;
    let skip_ws = |i: &mut usize| {
        if !strict {
            while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
                *i += 1;
            }
        }
    };
    loop {
        skip_ws(&mut i);
        match b.get(i) {
            None => return Err("unterminated label set (missing '}')".into()),
            Some(b'}') => {
                if after_comma && strict {
                    return Err("trailing comma in label set".into());
                }
                return Ok((&s[..i], &s[i + 1..]));
            }
            Some(_) if count > 0 && !after_comma => {
                return Err("expected ',' or '}' after a label".into());
            }
            Some(_) => {}
        }
        let start = i;
        if !(b[i] == b'_' || b[i].is_ascii_alphabetic()) {
            return Err(format!(
                "invalid label name starting at {:?}",
                s[i..].chars().take(10).collect::<String>()
            ));
        }
        while i < b.len() && (b[i] == b'_' || b[i].is_ascii_alphanumeric()) {
            i += 1;
        }
        let name = &s[start..i];
        let dup = names[..count.min(16)].contains(&name) || more.contains(&name);
        if dup {
            return Err(format!("duplicate label name {name:?}"));
        }
        if count < 16 {
            names[count] = name;
        } else {
            more.push(name);
        }
        count += 1;
        skip_ws(&mut i);
        if b.get(i) != Some(&b'=') {
            return Err(format!("expected '=' after label name {name:?}"));
        }
        i += 1;
        skip_ws(&mut i);
        if b.get(i) != Some(&b'"') {
            return Err(format!("expected '\"' to open the value of label {name:?}"));
        }
        i += 1;
        let end =
            quoted_end(&s[i..]).ok_or_else(|| format!("unterminated value of label {name:?}"))?;
        i += end + 1;
        skip_ws(&mut i);
        after_comma = false;
        if b.get(i) == Some(&b',') {
            i += 1;
            after_comma = true;
        }
    }
}

/// A float as OpenMetrics writes it: decimal with optional exponent, or
/// `[+-]Inf`/`infinity`, `NaN` (case-insensitive). No hex, no underscores.
pub(crate) fn om_float(s: &str) -> Option<f64> {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    if body.eq_ignore_ascii_case("inf") || body.eq_ignore_ascii_case("infinity") {
        return Some(if s.starts_with('-') {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    if s.eq_ignore_ascii_case("nan") {
        return Some(f64::NAN);
    }
    let b = body.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let st = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - st
    };
    let int = digits(&mut i);
    let mut frac = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        frac = digits(&mut i);
    }
    if int + frac == 0 {
        return None;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse().ok()
}

/// A float as the text format accepts it (Go's ParseFloat, minus hex forms).
fn text_float(s: &str) -> Option<f64> {
    let first = *s.as_bytes().first()?;
    if !(first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.' | b'i' | b'I' | b'n' | b'N'))
    {
        return None;
    }
    s.parse().ok()
}

fn om_timestamp(s: &str) -> Result<i64, String> {
    match om_float(s) {
        Some(f) if f.is_finite() => Ok((f * 1000.0).round() as i64),
        _ => Err(format!("invalid timestamp {s:?}")),
    }
}

fn metadata<'a>(
    keyword: &str,
    name: &'a str,
    rest: Option<&'a str>,
    format: Format,
) -> Result<Entry<'a>, String> {
    if !is_metric_name(name) {
        return Err(format!("invalid metric name {name:?} in # {keyword}"));
    }
    match keyword {
        "HELP" => Ok(Entry::Help {
            name,
            text: unescape(rest.unwrap_or(""), format == Format::Text),
        }),
        "TYPE" => {
            let t = rest.unwrap_or("");
            MetricType::parse(t, format)
                .map(|kind| Entry::Type { name, kind })
                .ok_or_else(|| format!("unknown metric type {t:?}"))
        }
        _ => {
            let unit = rest.unwrap_or("");
            if !unit.bytes().all(is_name_char) {
                return Err(format!("invalid unit {unit:?}"));
            }
            Ok(Entry::Unit { name, unit })
        }
    }
}

/// The metric name at the start of a sample line, and what follows it.
fn split_name(line: &str) -> Result<(&str, &str), String> {
    match name_len(line) {
        0 => Err(format!(
            "invalid metric name at {:?}",
            line.chars().take(20).collect::<String>()
        )),
        n => Ok((&line[..n], &line[n..])),
    }
}

pub(crate) fn parse_text_line(line: &str) -> Result<Line<'_>, String> {
    let line = line.trim_start_matches([' ', '\t']);
    if line.trim_end().is_empty() {
        return Ok(Line::Skip);
    }
    if let Some(comment) = line.strip_prefix('#') {
        let c = comment.trim_start_matches([' ', '\t']);
        if c.len() == comment.len() {
            return Ok(Line::Skip);
        }
        let (keyword, rest) = c.split_once([' ', '\t']).unwrap_or((c, ""));
        if keyword != "HELP" && keyword != "TYPE" {
            return Ok(Line::Skip);
        }
        let rest = rest.trim_start_matches([' ', '\t']);
        let (name, arg) = match rest.find([' ', '\t']) {
            Some(i) => (
                &rest[..i],
                Some(rest[i + 1..].trim_start_matches([' ', '\t'])),
            ),
            None => (rest, None),
        };
        let arg = if keyword == "TYPE" {
            arg.map(str::trim_end)
        } else {
            arg
        };
        return metadata(keyword, name, arg, Format::Text).map(Line::Entry);
    }
    let (name, after_name) = split_name(line)?;
    let mut rest = after_name.trim_start_matches([' ', '\t']);
    let mut labels = Labels::default();
    if let Some(r) = rest.strip_prefix('{') {
        let (inside, after) = scan_labels(r, false)?;
        labels = Labels { raw: inside };
        rest = after.trim_start_matches([' ', '\t']);
    }
    let mut fields = rest.split_ascii_whitespace();
    let v = fields
        .next()
        .ok_or_else(|| format!("missing value for {name}"))?;
    let value = text_float(v).ok_or_else(|| format!("invalid value {v:?} for {name}"))?;
    let timestamp_ms = match fields.next() {
        None => None,
        Some(t) => Some(
            t.parse::<i64>()
                .map_err(|_| format!("invalid timestamp {t:?} for {name}"))?,
        ),
    };
    if let Some(extra) = fields.next() {
        return Err(format!("unexpected {extra:?} after the sample of {name}"));
    }
    Ok(Line::Entry(Entry::Sample(Sample {
        name,
        labels,
        value,
        timestamp_ms,
        exemplar: None,
    })))
}

pub(crate) fn parse_om_line(line: &str) -> Result<Line<'_>, String> {
    if line.is_empty() {
        return Err("blank line".into());
    }
    if let Some(comment) = line.strip_prefix('#') {
        if comment == " EOF" {
            return Ok(Line::Eof);
        }
        for keyword in ["HELP", "TYPE", "UNIT"] {
            let Some(rest) = comment
                .strip_prefix(' ')
                .and_then(|c| c.strip_prefix(keyword))
            else {
                continue;
            };
            let rest = rest
                .strip_prefix(' ')
                .ok_or_else(|| format!("expected a metric name after # {keyword}"))?;
            let (name, arg) = match rest.split_once(' ') {
                Some((n, a)) => (n, Some(a)),
                None => (rest, None),
            };
            if arg.is_none() {
                return Err(format!(
                    "expected a space and a value after # {keyword} {name}"
                ));
            }
            return metadata(keyword, name, arg, Format::OpenMetrics).map(Line::Entry);
        }
        return Err(format!(
            "unexpected comment line {:?}",
            line.chars().take(30).collect::<String>()
        ));
    }
    let (name, after_name) = split_name(line)?;
    let mut rest = after_name;
    let mut labels = Labels::default();
    if let Some(r) = rest.strip_prefix('{') {
        let (inside, after) = scan_labels(r, true)?;
        labels = Labels { raw: inside };
        rest = after;
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or_else(|| format!("expected one space before the value of {name}"))?;
    let (v, mut rest) = rest
        .split_once(' ')
        .map_or((rest, None), |(a, b)| (a, Some(b)));
    let value = om_float(v).ok_or_else(|| format!("invalid value {v:?} for {name}"))?;
    let mut timestamp_ms = None;
    if let Some(r) = rest
        && !r.starts_with("# ")
    {
        let (t, after) = r.split_once(' ').map_or((r, None), |(a, b)| (a, Some(b)));
        timestamp_ms = Some(om_timestamp(t)?);
        rest = after;
    }
    let exemplar = match rest {
        None => None,
        Some(r) => {
            let r = r
                .strip_prefix("# ")
                .ok_or_else(|| format!("unexpected text after the sample of {name}"))?;
            Some(parse_exemplar(r)?)
        }
    };
    Ok(Line::Entry(Entry::Sample(Sample {
        name,
        labels,
        value,
        timestamp_ms,
        exemplar,
    })))
}

fn parse_exemplar(s: &str) -> Result<Exemplar<'_>, String> {
    let r = s
        .strip_prefix('{')
        .ok_or("expected '{' to open the exemplar's labels")?;
    let (inside, after) = scan_labels(r, true)?;
    let labels = Labels { raw: inside };
    let chars: usize = labels
        .iter()
        .map(|l| {
            l.map(|(n, v)| n.chars().count() + v.chars().count())
                .unwrap_or(0)
        })
        .sum();
    if chars > 128 {
        return Err(format!(
            "exemplar labels have {chars} characters, more than 128"
        ));
    }
    let after = after
        .strip_prefix(' ')
        .ok_or("expected a space before the exemplar's value")?;
    let (v, t) = after
        .split_once(' ')
        .map_or((after, None), |(a, b)| (a, Some(b)));
    let value = om_float(v).ok_or_else(|| format!("invalid exemplar value {v:?}"))?;
    let timestamp_ms = t.map(om_timestamp).transpose()?;
    Ok(Exemplar {
        labels,
        value,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats() {
        for (s, ok) in [
            ("1", true),
            ("-1.5e3", true),
            (".5", true),
            ("1.", true),
            ("+Inf", true),
            ("NaN", true),
            ("0x1p-3", false),
            ("1_2", false),
            ("", false),
            ("e5", false),
            ("1e", false),
        ] {
            assert_eq!(om_float(s).is_some(), ok, "{s}");
        }
    }

    #[test]
    fn label_values_unescape() {
        let (inside, rest) = scan_labels(r#"a="x\"y",b="\\n\n\z"} 1"#, true).unwrap();
        assert_eq!(rest, " 1");
        let got: Vec<_> = Labels { raw: inside }.iter().map(Result::unwrap).collect();
        assert_eq!(
            got,
            vec![("a", Cow::from("x\"y")), ("b", Cow::from("\\n\n\\z"))]
        );
    }
}
