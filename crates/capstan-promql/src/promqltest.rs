//! Parser of Prometheus' promqltest script language (`load`, `clear`, `eval
//! instant`, `eval range`, `expect …` lines, the older `eval_fail`, `eval_warn`,
//! `eval_info`, `eval_ordered` forms) and of the series value notation
//! (`1+2x5`, `_`, `_x3`, `stale`, native histograms as `{{…}}`).

use std::fmt;

/// One value of a series in a script.
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    Float(f64),
    /// `_`: no sample at this step.
    Missing,
    /// `stale`: a staleness marker.
    Stale,
    /// `{{…}}`: a native histogram, kept as written.
    Histogram(String),
}

/// A series as written in `load` or in an expected result.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesSpec {
    /// Label pairs, `__name__` first when the metric name is given.
    pub labels: Vec<(String, String)>,
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QueryKind {
    Instant {
        at_ms: i64,
    },
    Range {
        start_ms: i64,
        end_ms: i64,
        step_ms: i64,
    },
}

/// What an `eval` expects besides its result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectations {
    pub fail: bool,
    pub fail_msg: Option<String>,
    pub fail_regex: Option<String>,
    pub ordered: bool,
    pub warn: bool,
    pub info: bool,
    pub no_warn: bool,
    pub no_info: bool,
    /// `expect string "…"`.
    pub string: Option<String>,
    /// `expect range vector from … to … step …`.
    pub range_vector: Option<(i64, i64, i64)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Series with their values (an instant query has one value each).
    Series(Vec<SeriesSpec>),
    /// A scalar result.
    Scalar(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Eval {
    pub line: usize,
    pub query: QueryKind,
    pub expr: String,
    pub expect: Expectations,
    pub result: Expected,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Load {
        line: usize,
        interval_ms: i64,
        with_nhcb: bool,
        series: Vec<SeriesSpec>,
    },
    Clear {
        line: usize,
    },
    Eval(Eval),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ScriptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ScriptError {}

/// Parses a duration as the scripts write times: `50m`, `1h30m`, `8000s`, `0`, `1ms`.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    if s == "0" {
        return Some(0);
    }
    let mut total: i64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest.find(|c: char| !c.is_ascii_digit())?;
        if n == 0 {
            return None;
        }
        let v: i64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let mult = match &rest[..u] {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 604_800_000,
            "y" => 365 * 86_400_000,
            _ => return None,
        };
        total = total.checked_add(v.checked_mul(mult)?)?;
        rest = &rest[u..];
    }
    Some(total)
}

fn parse_float(s: &str) -> Option<f64> {
    match s {
        "Inf" | "+Inf" | "inf" | "+inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Splits a series line into the selector and the rest.
fn split_selector(line: &str) -> Result<(&str, &str), String> {
    let line = line.trim();
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'{' {
        i += 1;
    }
    if i < b.len() && b[i] == b'{' {
        let mut in_quote = false;
        while i < b.len() {
            match b[i] {
                b'\\' if in_quote => i += 1,
                b'"' => in_quote = !in_quote,
                b'}' if !in_quote => {
                    i += 1;
                    return Ok((&line[..i], &line[i..]));
                }
                _ => {}
            }
            i += 1;
        }
        return Err(format!("unterminated label set in {line:?}"));
    }
    Ok((&line[..i], &line[i..]))
}

/// `metric{a="b", c="d"}` into label pairs (`__name__` first).
pub fn parse_selector(sel: &str) -> Result<Vec<(String, String)>, String> {
    let (name, rest) = match sel.find('{') {
        Some(i) => (&sel[..i], &sel[i + 1..sel.len() - 1]),
        None => (sel, ""),
    };
    let mut out = Vec::new();
    if !name.is_empty() {
        out.push(("__name__".to_owned(), name.to_owned()));
    }
    let mut r = rest.trim();
    while !r.is_empty() {
        let eq = r
            .find('=')
            .ok_or_else(|| format!("expected name=\"value\" in {sel:?}"))?;
        let lname = r[..eq].trim().to_owned();
        let after = r[eq + 1..].trim_start();
        let body = after
            .strip_prefix('"')
            .ok_or_else(|| format!("expected a quoted value in {sel:?}"))?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, o)) => value.push(o),
                    None => break,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                o => value.push(o),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated value in {sel:?}"))?;
        out.push((lname, value));
        r = body[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Ok(out)
}

/// Expands the value notation: `1 2+3x2 _ _x2 stale 4x2 {{schema:1 sum:3}}`.
pub fn parse_points(s: &str) -> Result<Vec<Point>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        if rest.starts_with("{{") {
            let end = rest.find("}}").ok_or("unterminated {{ histogram")?;
            let mut token_end = end + 2;
            // `{{…}}+{{…}}xN` and `{{…}}xN` forms: keep the whole token.
            while token_end < rest.len() && !rest.as_bytes()[token_end].is_ascii_whitespace() {
                if rest[token_end..].starts_with("{{") {
                    token_end += rest[token_end..]
                        .find("}}")
                        .ok_or("unterminated {{ histogram")?
                        + 2;
                } else {
                    token_end += 1;
                }
            }
            let token = &rest[..token_end];
            // A repeat count can only follow the last `}}`.
            let tail = &token[token.rfind("}}").map_or(0, |i| i + 2)..];
            let count = tail
                .strip_prefix('x')
                .and_then(|n| n.parse::<usize>().ok())
                .map_or(1, |n| n + 1);
            out.extend(std::iter::repeat_n(
                Point::Histogram(token.to_owned()),
                count,
            ));
            rest = rest[token_end..].trim_start();
            continue;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let tok = &rest[..end];
        rest = rest[end..].trim_start();
        if tok == "_" {
            out.push(Point::Missing);
        } else if let Some(n) = tok.strip_prefix("_x") {
            let n: usize = n.parse().map_err(|_| format!("bad repeat in {tok:?}"))?;
            out.extend(std::iter::repeat_n(Point::Missing, n));
        } else if tok == "stale" {
            out.push(Point::Stale);
        } else if let Some((base, times)) = tok.split_once('x') {
            let times: usize = times
                .parse()
                .map_err(|_| format!("bad repeat in {tok:?}"))?;
            // `a+bxN` / `a-bxN` / `axN`: the sign that splits start and step is the
            // last + or - not at the start and not part of an exponent.
            let b = base.as_bytes();
            let split = (1..b.len())
                .rev()
                .find(|&i| (b[i] == b'+' || b[i] == b'-') && !matches!(b[i - 1], b'e' | b'E'));
            let (start, step) = match split {
                Some(i) => (&base[..i], &base[i..]),
                None => (base, "0"),
            };
            let start = parse_float(start).ok_or_else(|| format!("bad number in {tok:?}"))?;
            let step = parse_float(step.trim_start_matches('+'))
                .ok_or_else(|| format!("bad step in {tok:?}"))?;
            for k in 0..=times {
                out.push(Point::Float(start + step * k as f64));
            }
        } else {
            out.push(Point::Float(
                parse_float(tok).ok_or_else(|| format!("bad value {tok:?}"))?,
            ));
        }
    }
    Ok(out)
}

fn parse_series_line(line: &str) -> Result<SeriesSpec, String> {
    let (sel, rest) = split_selector(line)?;
    Ok(SeriesSpec {
        labels: parse_selector(sel)?,
        points: parse_points(rest)?,
    })
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '`'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|x| x.strip_suffix(q)) {
            return inner.replace("\\\"", "\"");
        }
    }
    s.to_owned()
}

/// Parses a whole script.
pub fn parse(text: &str) -> Result<Vec<Command>, ScriptError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let err = |line: usize, message: String| ScriptError { line, message };
    let is_blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    while i < lines.len() {
        let line = lines[i];
        let no = i + 1;
        i += 1;
        if is_blank(line) {
            continue;
        }
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        // The block of indented (or series) lines that belongs to this command.
        let mut body = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            let l = lines[i];
            if l.trim_start().starts_with('#') {
                i += 1;
                continue;
            }
            let first = l.split_whitespace().next().unwrap_or("");
            if !l.starts_with([' ', '\t'])
                && matches!(
                    first,
                    "load"
                        | "load_with_nhcb"
                        | "clear"
                        | "eval"
                        | "eval_fail"
                        | "eval_warn"
                        | "eval_info"
                        | "eval_ordered"
                )
            {
                break;
            }
            body.push((i + 1, l));
            i += 1;
        }
        match cmd {
            "clear" => out.push(Command::Clear { line: no }),
            "load" | "load_with_nhcb" => {
                let interval = words.next().and_then(parse_duration_ms).ok_or_else(|| {
                    err(no, format!("expected `load <interval>`, found {line:?}"))
                })?;
                let series = body
                    .iter()
                    .map(|(n, l)| parse_series_line(l).map_err(|m| err(*n, m)))
                    .collect::<Result<_, _>>()?;
                out.push(Command::Load {
                    line: no,
                    interval_ms: interval,
                    with_nhcb: cmd == "load_with_nhcb",
                    series,
                });
            }
            "eval" | "eval_fail" | "eval_warn" | "eval_info" | "eval_ordered" => {
                let mut expect = Expectations {
                    fail: cmd == "eval_fail",
                    warn: cmd == "eval_warn",
                    info: cmd == "eval_info",
                    ordered: cmd == "eval_ordered",
                    ..Expectations::default()
                };
                let rest = line.trim_start()[cmd.len()..].trim_start();
                let (query, expr) = if let Some(r) = rest.strip_prefix("instant at ") {
                    let (t, expr) = r.split_once(' ').ok_or_else(|| {
                        err(no, "expected `eval instant at <time> <expr>`".into())
                    })?;
                    (
                        QueryKind::Instant {
                            at_ms: parse_duration_ms(t)
                                .ok_or_else(|| err(no, format!("bad time {t:?}")))?,
                        },
                        expr,
                    )
                } else if let Some(r) = rest.strip_prefix("range from ") {
                    let mut p = r.splitn(6, ' ');
                    let (start, to, end, step_kw, step, expr) =
                        (p.next(), p.next(), p.next(), p.next(), p.next(), p.next());
                    if to != Some("to") || step_kw != Some("step") {
                        return Err(err(
                            no,
                            "expected `eval range from <start> to <end> step <step> <expr>`".into(),
                        ));
                    }
                    let d = |x: Option<&str>| {
                        x.and_then(parse_duration_ms)
                            .ok_or_else(|| err(no, format!("bad time in {line:?}")))
                    };
                    (
                        QueryKind::Range {
                            start_ms: d(start)?,
                            end_ms: d(end)?,
                            step_ms: d(step)?,
                        },
                        expr.unwrap_or(""),
                    )
                } else {
                    return Err(err(
                        no,
                        format!("expected `instant at` or `range from`, found {rest:?}"),
                    ));
                };
                let mut series = Vec::new();
                let mut scalar = None;
                for (n, l) in &body {
                    let t = l.trim();
                    if let Some(e) = t.strip_prefix("expect ") {
                        let (what, arg) = e.split_once(' ').map_or((e, ""), |(a, b)| (a, b.trim()));
                        let (kind, msg) = arg
                            .split_once(':')
                            .map_or((arg, ""), |(a, b)| (a.trim(), b.trim()));
                        match what {
                            "fail" => {
                                expect.fail = true;
                                match kind {
                                    "msg" => expect.fail_msg = Some(unquote(msg)),
                                    "regex" => expect.fail_regex = Some(unquote(msg)),
                                    _ => {}
                                }
                            }
                            "warn" => expect.warn = true,
                            "info" => expect.info = true,
                            "no_warn" => expect.no_warn = true,
                            "no_info" => expect.no_info = true,
                            "ordered" => expect.ordered = true,
                            "string" => expect.string = Some(unquote(arg)),
                            "range" => {
                                let w: Vec<&str> = arg.split_whitespace().collect();
                                let d = |k: usize| w.get(k).and_then(|x| parse_duration_ms(x));
                                match (w.first(), d(2), d(4), d(6)) {
                                    (Some(&"vector"), Some(a), Some(b), Some(c)) => {
                                        expect.range_vector = Some((a, b, c))
                                    }
                                    _ => {
                                        return Err(err(
                                            *n,
                                            format!("bad `expect range vector` line {t:?}"),
                                        ));
                                    }
                                }
                            }
                            other => return Err(err(*n, format!("unknown expectation {other:?}"))),
                        }
                    } else if let Some(m) = t.strip_prefix("expected_fail_message ") {
                        expect.fail_msg = Some(m.to_owned());
                    } else if let Some(m) = t.strip_prefix("expected_fail_regexp ") {
                        expect.fail_regex = Some(m.to_owned());
                    } else if let Some(v) = parse_float(t.split_whitespace().next().unwrap_or(""))
                        .filter(|_| t.split_whitespace().count() == 1)
                    {
                        scalar = Some(v);
                    } else {
                        series.push(parse_series_line(t).map_err(|m| err(*n, m))?);
                    }
                }
                let result = match scalar {
                    Some(v) => Expected::Scalar(v),
                    None => Expected::Series(series),
                };
                out.push(Command::Eval(Eval {
                    line: no,
                    query,
                    expr: expr.trim().to_owned(),
                    expect,
                    result,
                }));
            }
            other => return Err(err(no, format!("unknown command {other:?}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_notation() {
        let got =
            parse_points("5 2+3x2 _ stale 1x2 -1-1x1 _x2 1e3 NaN {{schema:1 sum:3}}x1").unwrap();
        // NaN is not equal to itself: compare as text.
        assert_eq!(
            format!("{got:?}"),
            "[Float(5.0), Float(2.0), Float(5.0), Float(8.0), Missing, Stale, Float(1.0), Float(1.0), Float(1.0), \
             Float(-1.0), Float(-2.0), Missing, Missing, Float(1000.0), Float(NaN), \
             Histogram(\"{{schema:1 sum:3}}x1\"), Histogram(\"{{schema:1 sum:3}}x1\")]"
        );
        assert!(parse_points("1+x3").is_err());
        assert!(parse_points("{{schema:1").is_err());
    }

    #[test]
    fn selectors_and_commands() {
        let script = "load 5m\n  http_requests{job=\"api\", group=\"canary\"}\t0+10x2\n  {__name__=\"x\"} 1\n\neval instant at 50m sum(http_requests)\n  {} 20\n\neval_fail instant at 0m foo(\n\neval range from 0 to 10m step 5m x\n  x 1 1 1\n\nclear\n";
        let cmds = parse(script).unwrap();
        assert_eq!(cmds.len(), 5);
        let Command::Load {
            interval_ms,
            series,
            ..
        } = &cmds[0]
        else {
            panic!()
        };
        assert_eq!(*interval_ms, 300_000);
        assert_eq!(
            series[0].labels,
            vec![
                ("__name__".into(), "http_requests".into()),
                ("job".into(), "api".into()),
                ("group".into(), "canary".into())
            ]
        );
        assert_eq!(series[0].points.len(), 3);
        let Command::Eval(e) = &cmds[1] else { panic!() };
        assert_eq!(e.query, QueryKind::Instant { at_ms: 3_000_000 });
        assert_eq!(e.expr, "sum(http_requests)");
        let Command::Eval(f) = &cmds[2] else { panic!() };
        assert!(f.expect.fail);
        let Command::Eval(r) = &cmds[3] else { panic!() };
        assert_eq!(
            r.query,
            QueryKind::Range {
                start_ms: 0,
                end_ms: 600_000,
                step_ms: 300_000
            }
        );
    }
}
