//! The Go template subset rule writers use in labels and annotations:
//! `{{ $labels.x }}`, `{{ $value }}`, `{{ $externalLabels.x }}` (and `.Labels`,
//! `.Value`, `.ExternalLabels`), pipelines (`{{ $value | humanize }}`),
//! `printf`, the `humanize*` functions, comparisons, `if`/`else`/`with`/`range`
//! and `{{-`/`-}}` trimming. Written from the text/template and Prometheus
//! documentation.

use std::collections::BTreeMap;

/// Deepest nesting of blocks and parentheses.
const MAX_DEPTH: usize = 32;
/// Longest output of one expansion.
const MAX_OUTPUT: usize = 64 << 10;

/// What a query returns: samples with their labels.
pub type Samples = Vec<(BTreeMap<String, String>, f64)>;

/// What `query` runs: PromQL at the evaluation's time.
pub type QueryFn<'a> = &'a dyn Fn(&str) -> Result<Samples, String>;

/// What a template sees.
#[derive(Clone, Default)]
pub struct Data<'a> {
    pub labels: BTreeMap<String, String>,
    pub external_labels: BTreeMap<String, String>,
    pub value: f64,
    /// For `{{ query "…" }}`; without it, `query` is an error.
    pub query: Option<QueryFn<'a>>,
}

#[derive(Debug, Clone, PartialEq)]
enum V {
    Nil,
    Bool(bool),
    Num(f64),
    Str(String),
    Map(BTreeMap<String, String>),
    /// The template's data itself (`.` at the top).
    Root,
    /// What `query` returned, and one of its samples.
    Samples(Vec<(BTreeMap<String, String>, f64)>),
    Sample(BTreeMap<String, String>, f64),
}

impl V {
    fn truthy(&self) -> bool {
        match self {
            V::Nil => false,
            V::Bool(b) => *b,
            V::Num(n) => *n != 0.0,
            V::Str(s) => !s.is_empty(),
            V::Map(m) => !m.is_empty(),
            V::Root => true,
            V::Samples(s) => !s.is_empty(),
            V::Sample(..) => true,
        }
    }

    fn text(&self) -> String {
        match self {
            V::Nil => "<no value>".into(),
            V::Bool(b) => b.to_string(),
            V::Num(n) => go_float(*n),
            V::Str(s) => s.clone(),
            V::Map(m) => {
                let inner: Vec<String> = m.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("map[{}]", inner.join(" "))
            }
            V::Root => "{}".into(),
            V::Samples(s) => format!(
                "[{}]",
                s.iter()
                    .map(|(l, v)| V::Sample(l.clone(), *v).text())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            V::Sample(l, v) => format!("{{{} {}}}", V::Map(l.clone()).text(), go_float(*v)),
        }
    }

    fn num(&self) -> Result<f64, String> {
        match self {
            V::Num(n) => Ok(*n),
            V::Str(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("cannot use {s:?} as a number")),
            V::Bool(b) => Ok(f64::from(u8::from(*b))),
            V::Sample(_, v) => Ok(*v),
            other => Err(format!("cannot use {} as a number", other.text())),
        }
    }
}

/// Go's `%v` of a float64: the shortest text that reads back, `e` notation
/// for large and small exponents.
fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    let exp = if v == 0.0 {
        0
    } else {
        v.abs().log10().floor() as i32
    };
    if (-4..21).contains(&exp) {
        format!("{v}")
    } else {
        go_exponent(format!("{v:e}"))
    }
}

/// Rust's `1e5` / `1e-5` written as Go writes exponents: `1e+05`, `1e-05`.
pub fn go_exponent(s: String) -> String {
    match s.split_once('e') {
        Some((m, e)) => {
            let (sign, digits) = match e.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', e),
            };
            format!("{m}e{sign}{digits:0>2}")
        }
        None => s,
    }
}

/// Go's `%.{prec}g`.
pub fn fmt_g(v: f64, prec: usize) -> String {
    if !v.is_finite() {
        return go_float(v);
    }
    if v == 0.0 {
        return "0".into();
    }
    let prec = prec.max(1);
    let exp = format!("{:.*e}", prec - 1, v);
    let (mant, e) = exp.split_once('e').unwrap_or((&exp, "0"));
    let e: i32 = e.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s.to_owned()
        }
    };
    if e < -4 || e >= prec as i32 {
        let sign = if e < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mant), e.abs())
    } else {
        let decimals = (prec as i32 - 1 - e).max(0) as usize;
        strip(&format!("{v:.decimals$}"))
    }
}

/// Prometheus' `humanize`: SI prefixes, 4 significant digits.
pub fn humanize(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return fmt_g(v, 4);
    }
    if v.abs() >= 1.0 {
        let mut x = v;
        let mut prefix = "";
        for p in ["k", "M", "G", "T", "P", "E", "Z", "Y"] {
            if x.abs() < 1000.0 {
                break;
            }
            prefix = p;
            x /= 1000.0;
        }
        return format!("{}{prefix}", fmt_g(x, 4));
    }
    let mut x = v;
    let mut prefix = "";
    for p in ["m", "u", "n", "p", "f", "a", "z", "y"] {
        if x.abs() >= 1.0 {
            break;
        }
        prefix = p;
        x *= 1000.0;
    }
    format!("{}{prefix}", fmt_g(x, 4))
}

fn humanize1024(v: f64) -> String {
    if v.abs() <= 1.0 || !v.is_finite() {
        return fmt_g(v, 4);
    }
    let mut x = v;
    let mut prefix = "";
    for p in ["ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi", "Yi"] {
        if x.abs() < 1024.0 {
            break;
        }
        prefix = p;
        x /= 1024.0;
    }
    format!("{}{prefix}", fmt_g(x, 4))
}

/// Prometheus' `humanizeDuration`: `1d 2h 3m 4s`, or ms/us/ns below a second.
pub fn humanize_duration(v: f64) -> String {
    if !v.is_finite() {
        return fmt_g(v, 4);
    }
    if v == 0.0 {
        return "0s".into();
    }
    if v.abs() >= 1.0 {
        let sign = if v < 0.0 { "-" } else { "" };
        let t = v.abs() as i64;
        let (d, h, m, s) = (t / 86_400, (t / 3600) % 24, (t / 60) % 60, t % 60);
        return if d != 0 {
            format!("{sign}{d}d {h}h {m}m {s}s")
        } else if h != 0 {
            format!("{sign}{h}h {m}m {s}s")
        } else if m != 0 {
            format!("{sign}{m}m {s}s")
        } else {
            format!("{sign}{}s", fmt_g(v.abs(), 4))
        };
    }
    let mut x = v;
    let mut unit = "";
    for u in ["ms", "us", "ns"] {
        if x.abs() >= 1.0 {
            break;
        }
        unit = u;
        x *= 1000.0;
    }
    format!("{}{unit}", fmt_g(x, 4))
}

/// Go's `fmt.Sprintf` for the verbs templates use: `%s %v %d %f %e %g %q %x %%`
/// with flags, width and precision.
fn sprintf(format: &str, args: &[V]) -> String {
    let mut out = String::new();
    let mut it = format.chars().peekable();
    let mut next = args.iter();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut flags = String::new();
        while let Some(&f) = it.peek() {
            if "-+ 0#".contains(f) {
                flags.push(f);
                it.next();
            } else {
                break;
            }
        }
        let mut width = String::new();
        while let Some(&d) = it.peek().filter(|d| d.is_ascii_digit()) {
            width.push(d);
            it.next();
        }
        let mut prec: Option<usize> = None;
        if it.peek() == Some(&'.') {
            it.next();
            let mut p = String::new();
            while let Some(&d) = it.peek().filter(|d| d.is_ascii_digit()) {
                p.push(d);
                it.next();
            }
            prec = Some(p.parse().unwrap_or(0));
        }
        let Some(verb) = it.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        let Some(arg) = next.next() else {
            out.push_str(&format!("%!{verb}(MISSING)"));
            continue;
        };
        let body = match verb {
            's' | 'v' => {
                let t = arg.text();
                match prec {
                    Some(p) if verb == 's' => t.chars().take(p).collect(),
                    _ => t,
                }
            }
            'q' => format!("{:?}", arg.text()),
            'd' => match arg.num() {
                Ok(n) => format!("{}", n.trunc() as i64),
                Err(_) => format!("%!d({})", arg.text()),
            },
            'x' => match arg {
                V::Num(n) => format!("{:x}", *n as i64),
                other => other.text().bytes().map(|b| format!("{b:02x}")).collect(),
            },
            'f' | 'F' | 'e' | 'g' => match arg.num() {
                Ok(n) => match verb {
                    'e' => go_exponent(format!("{:.*e}", prec.unwrap_or(6), n)),
                    'g' => match prec {
                        Some(p) => fmt_g(n, p),
                        None => go_float(n),
                    },
                    _ => format!("{:.*}", prec.unwrap_or(6), n),
                },
                Err(_) => format!("%!{verb}({})", arg.text()),
            },
            other => format!("%!{other}({})", arg.text()),
        };
        let body = if flags.contains('+') && !body.starts_with('-') && "dfeg".contains(verb) {
            format!("+{body}")
        } else {
            body
        };
        let w: usize = width.parse().unwrap_or(0);
        let len = body.chars().count();
        if len < w {
            let pad = w - len;
            if flags.contains('-') {
                out.push_str(&body);
                out.push_str(&" ".repeat(pad));
            } else if flags.contains('0') && "dfeg".contains(verb) {
                let (sign, digits) = match body.strip_prefix(['-', '+']) {
                    Some(d) => (&body[..1], d),
                    None => ("", body.as_str()),
                };
                out.push_str(sign);
                out.push_str(&"0".repeat(pad));
                out.push_str(digits);
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(&body);
            }
        } else {
            out.push_str(&body);
        }
    }
    for extra in next {
        out.push_str(&format!("%!(EXTRA {})", extra.text()));
    }
    out
}

// ---- parsing ----

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Var(String),                   // $x (may be "$")
    Field(Vec<String>),            // .a.b ("." alone: empty)
    VarField(String, Vec<String>), // $x.a.b
    Ident(String),
    Str(String),
    Num(f64),
    Pipe,
    LParen,
    RParen,
    Declare, // :=
    Comma,
}

fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let b: Vec<char> = src.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    let path = |b: &[char], i: &mut usize| -> Vec<String> {
        let mut parts = Vec::new();
        while *i < b.len() && b[*i] == '.' {
            *i += 1;
            let start = *i;
            while *i < b.len() && (b[*i].is_alphanumeric() || b[*i] == '_') {
                *i += 1;
            }
            if *i > start {
                parts.push(b[start..*i].iter().collect());
            }
        }
        parts
    };
    while i < b.len() {
        let c = b[i];
        match c {
            ' ' | '\t' | '\n' | '\r' => i += 1,
            '|' => {
                out.push(Tok::Pipe);
                i += 1;
            }
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            ':' if b.get(i + 1) == Some(&'=') => {
                out.push(Tok::Declare);
                i += 2;
            }
            '=' => {
                out.push(Tok::Declare);
                i += 1;
            }
            '"' => {
                i += 1;
                let mut s = String::new();
                loop {
                    match b.get(i) {
                        None => return Err("unterminated quoted string".into()),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let e = b.get(i + 1).copied().ok_or("unterminated quoted string")?;
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                            i += 2;
                        }
                        Some(ch) => {
                            s.push(*ch);
                            i += 1;
                        }
                    }
                }
                out.push(Tok::Str(s));
            }
            '`' => {
                let end = b[i + 1..]
                    .iter()
                    .position(|c| *c == '`')
                    .ok_or("unterminated raw string")?;
                out.push(Tok::Str(b[i + 1..i + 1 + end].iter().collect()));
                i += end + 2;
            }
            '$' => {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    i += 1;
                }
                let name: String = b[start..i].iter().collect();
                if i < b.len() && b[i] == '.' {
                    out.push(Tok::VarField(name, path(&b, &mut i)));
                } else {
                    out.push(Tok::Var(name));
                }
            }
            '.' => out.push(Tok::Field(path(&b, &mut i))),
            c if c.is_ascii_digit()
                || (c == '-' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == '.' || b[i] == '_') {
                    i += 1;
                }
                let t: String = b[start..i].iter().collect();
                out.push(Tok::Num(
                    t.replace('_', "")
                        .parse()
                        .map_err(|_| format!("bad number {t:?}"))?,
                ));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
                    i += 1;
                }
                out.push(Tok::Ident(b[start..i].iter().collect()));
            }
            other => return Err(format!("unexpected {other:?} in action")),
        }
    }
    Ok(out)
}

/// An operand or a call.
#[derive(Debug, Clone, PartialEq)]
enum Arg {
    Lit(V),
    Var(String, Vec<String>),
    Field(Vec<String>),
    Sub(Pipeline),
    Ident(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Pipeline {
    decl: Vec<String>,
    cmds: Vec<Vec<Arg>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    Out(Pipeline),
    If(Pipeline, Vec<Node>, Vec<Node>),
    With(Pipeline, Vec<Node>, Vec<Node>),
    Range(Pipeline, Vec<Node>, Vec<Node>),
}

const FUNCS: &[&str] = &[
    "humanize",
    "humanize1024",
    "humanizePercentage",
    "humanizeDuration",
    "humanizeTimestamp",
    "printf",
    "print",
    "toUpper",
    "toLower",
    "title",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "len",
    "index",
    "stripPort",
    "match",
    "reReplaceAll",
    "query",
    "first",
    "value",
    "label",
    "sortByLabel",
];

fn parse_pipeline(toks: &[Tok]) -> Result<Pipeline, String> {
    let mut decl = Vec::new();
    let mut rest = toks;
    // `$x :=` or `$k, $v :=`
    if let Some(pos) = toks.iter().position(|t| *t == Tok::Declare) {
        for t in &toks[..pos] {
            match t {
                Tok::Var(v) => decl.push(v.clone()),
                Tok::Comma => {}
                _ => return Err("bad variable declaration".into()),
            }
        }
        rest = &toks[pos + 1..];
    }
    let mut cmds = Vec::new();
    let mut cur = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match &rest[i] {
            Tok::Pipe => {
                if cur.is_empty() {
                    return Err("missing command before |".into());
                }
                cmds.push(std::mem::take(&mut cur));
            }
            Tok::LParen => {
                let mut depth = 1;
                let mut j = i + 1;
                while j < rest.len() && depth > 0 {
                    match rest[j] {
                        Tok::LParen => depth += 1,
                        Tok::RParen => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                if depth != 0 {
                    return Err("unclosed (".into());
                }
                cur.push(Arg::Sub(parse_pipeline(&rest[i + 1..j - 1])?));
                i = j;
                continue;
            }
            Tok::RParen => return Err("unexpected )".into()),
            Tok::Str(s) => cur.push(Arg::Lit(V::Str(s.clone()))),
            Tok::Num(n) => cur.push(Arg::Lit(V::Num(*n))),
            Tok::Var(v) => cur.push(Arg::Var(v.clone(), Vec::new())),
            Tok::VarField(v, p) => cur.push(Arg::Var(v.clone(), p.clone())),
            Tok::Field(p) => cur.push(Arg::Field(p.clone())),
            Tok::Ident(f) => match f.as_str() {
                "true" => cur.push(Arg::Lit(V::Bool(true))),
                "false" => cur.push(Arg::Lit(V::Bool(false))),
                "nil" => cur.push(Arg::Lit(V::Nil)),
                f if FUNCS.contains(&f) => cur.push(Arg::Ident(f.to_owned())),
                f => return Err(format!("function {f:?} not defined")),
            },
            Tok::Declare | Tok::Comma => return Err("unexpected := or ,".into()),
        }
        i += 1;
    }
    if cur.is_empty() {
        return Err("missing value for command".into());
    }
    cmds.push(cur);
    Ok(Pipeline { decl, cmds })
}

/// Splits a template into text and actions, applying `{{-`/`-}}` trimming.
fn split(src: &str) -> Result<Vec<(bool, String)>, String> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("{{") {
        let mut text = rest[..i].to_owned();
        let mut inner = &rest[i + 2..];
        if let Some(s) = inner.strip_prefix("- ") {
            text = text.trim_end().to_owned();
            inner = s;
        } else if inner.starts_with('-') && inner[1..].starts_with(char::is_whitespace) {
            text = text.trim_end().to_owned();
            inner = &inner[1..];
        }
        out.push((false, text));
        // Comments and strings may hold "}}"; templates in rule files rarely do.
        let end = inner.find("}}").ok_or("unclosed action")?;
        let mut action = &inner[..end];
        rest = &inner[end + 2..];
        if action.ends_with(" -") || action.ends_with("\t-") || action.ends_with("\n-") {
            action = &action[..action.len() - 1];
            rest = rest.trim_start();
        }
        let action = action.trim();
        if !(action.starts_with("/*") && action.ends_with("*/")) {
            out.push((true, action.to_owned()));
        }
    }
    out.push((false, rest.to_owned()));
    Ok(out)
}

fn parse_nodes(
    items: &[(bool, String)],
    i: &mut usize,
    depth: usize,
) -> Result<(Vec<Node>, Option<String>), String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} blocks"));
    }
    let mut nodes = Vec::new();
    while *i < items.len() {
        let (action, text) = &items[*i];
        *i += 1;
        if !action {
            if !text.is_empty() {
                nodes.push(Node::Text(text.clone()));
            }
            continue;
        }
        let word = text.split_whitespace().next().unwrap_or("");
        match word {
            "end" => return Ok((nodes, Some("end".into()))),
            "else" => return Ok((nodes, Some(text.clone()))),
            "if" | "with" | "range" => {
                let pipe = parse_pipeline(&lex(text[word.len()..].trim())?)?;
                let (body, mut stop) = parse_nodes(items, i, depth + 1)?;
                let mut els = Vec::new();
                // `else if …` links nest as an if in the else branch.
                let mut links = 0;
                while let Some(s) = stop.clone() {
                    if s == "end" {
                        break;
                    }
                    let cond = s.trim_start_matches("else").trim();
                    if cond.is_empty() {
                        let (e, st) = parse_nodes(items, i, depth + 1)?;
                        *at_depth(&mut els, links) = e;
                        if st.as_deref() != Some("end") {
                            return Err("expected {{end}} after {{else}}".into());
                        }
                        stop = st;
                        break;
                    }
                    let w = cond.split_whitespace().next().unwrap_or("");
                    if w != "if" && w != "with" {
                        return Err(format!("unexpected {{{{else {cond}}}}}"));
                    }
                    let p = parse_pipeline(&lex(cond[w.len()..].trim())?)?;
                    let (b, st) = parse_nodes(items, i, depth + 1)?;
                    let link = if w == "if" {
                        Node::If(p, b, Vec::new())
                    } else {
                        Node::With(p, b, Vec::new())
                    };
                    at_depth(&mut els, links).push(link);
                    links += 1;
                    stop = st;
                }
                if stop.is_none() {
                    return Err(format!(
                        "unexpected EOF: {{{{{word}}}}} without {{{{end}}}}"
                    ));
                }
                nodes.push(match word {
                    "if" => Node::If(pipe, body, els),
                    "with" => Node::With(pipe, body, els),
                    _ => Node::Range(pipe, body, els),
                });
            }
            "define" | "template" | "block" => {
                return Err(format!("{{{{{word}}}}} is not supported in rule templates"));
            }
            _ => nodes.push(Node::Out(parse_pipeline(&lex(text)?)?)),
        }
    }
    Ok((nodes, None))
}

/// The else branch `n` links down an `else if` chain.
fn at_depth(chain: &mut Vec<Node>, n: usize) -> &mut Vec<Node> {
    if n == 0 {
        return chain;
    }
    match chain.last_mut() {
        Some(Node::If(_, _, e)) | Some(Node::With(_, _, e)) => at_depth(e, n - 1),
        _ => unreachable!("an else-if chain holds one link per level"),
    }
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template(Vec<Node>);

pub fn parse(src: &str) -> Result<Template, String> {
    let items = split(src)?;
    let mut i = 0;
    let (nodes, stop) = parse_nodes(&items, &mut i, 0)?;
    if let Some(s) = stop {
        return Err(format!("unexpected {{{{{s}}}}}"));
    }
    Ok(Template(nodes))
}

/// Whether a label or annotation template parses.
pub fn check(src: &str) -> Result<(), String> {
    parse(src).map(|_| ())
}

struct Ctx<'a> {
    data: &'a Data<'a>,
    vars: Vec<(String, V)>,
    out: String,
}

impl Ctx<'_> {
    fn var(&self, name: &str) -> Result<V, String> {
        match name {
            "$labels" => Ok(V::Map(self.data.labels.clone())),
            "$externalLabels" => Ok(V::Map(self.data.external_labels.clone())),
            "$value" => Ok(V::Num(self.data.value)),
            "$" => Ok(V::Root),
            _ => self
                .vars
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map(|x| x.1.clone())
                .ok_or_else(|| format!("undefined variable {name:?}")),
        }
    }

    fn field(&self, base: V, path: &[String]) -> Result<V, String> {
        let mut v = base;
        for p in path {
            v = match (&v, p.as_str()) {
                (V::Root, "Labels") => V::Map(self.data.labels.clone()),
                (V::Root, "ExternalLabels") => V::Map(self.data.external_labels.clone()),
                (V::Root, "Value") => V::Num(self.data.value),
                (V::Map(m), k) => m.get(k).cloned().map_or(V::Nil, V::Str),
                (V::Sample(l, _), "Labels") => V::Map(l.clone()),
                (V::Sample(_, x), "Value") => V::Num(*x),
                (_, k) => return Err(format!("can't evaluate field {k}")),
            };
        }
        Ok(v)
    }

    fn arg(&mut self, a: &Arg, dot: &V) -> Result<V, String> {
        match a {
            Arg::Lit(v) => Ok(v.clone()),
            Arg::Var(n, p) => {
                let base = self.var(n)?;
                self.field(base, p)
            }
            Arg::Field(p) => self.field(dot.clone(), p),
            Arg::Sub(pipe) => self.pipeline(pipe, dot),
            Arg::Ident(f) => self.call(f, &[], dot),
        }
    }

    fn call(&mut self, f: &str, args: &[V], _dot: &V) -> Result<V, String> {
        let one = || {
            args.first()
                .cloned()
                .ok_or_else(|| format!("{f}: missing argument"))
        };
        let cmp = |op: &str| -> Result<V, String> {
            let (a, b) = (
                args.first().ok_or("missing argument")?,
                args.get(1).ok_or("missing argument")?,
            );
            let ord = match (a, b) {
                (V::Str(x), V::Str(y)) => x.partial_cmp(y),
                _ => a.num()?.partial_cmp(&b.num()?),
            };
            let ord = ord.ok_or("incomparable values")?;
            use std::cmp::Ordering::*;
            Ok(V::Bool(match op {
                "eq" => ord == Equal,
                "ne" => ord != Equal,
                "lt" => ord == Less,
                "le" => ord != Greater,
                "gt" => ord == Greater,
                _ => ord != Less,
            }))
        };
        Ok(match f {
            "humanize" => V::Str(humanize(one()?.num()?)),
            "humanize1024" => V::Str(humanize1024(one()?.num()?)),
            "humanizePercentage" => V::Str(format!("{}%", fmt_g(one()?.num()? * 100.0, 4))),
            "humanizeDuration" => V::Str(humanize_duration(one()?.num()?)),
            "humanizeTimestamp" => {
                let secs = one()?.num()?;
                let ts = jiff::Timestamp::from_nanosecond((secs * 1e9) as i128)
                    .map_err(|e| e.to_string())?;
                V::Str(ts.strftime("%Y-%m-%d %H:%M:%S%.f %z UTC").to_string())
            }
            "printf" => {
                let fmt = one()?.text();
                V::Str(sprintf(&fmt, &args[1..]))
            }
            "print" => V::Str(args.iter().map(V::text).collect::<Vec<_>>().join(" ")),
            "toUpper" => V::Str(one()?.text().to_uppercase()),
            "toLower" => V::Str(one()?.text().to_lowercase()),
            "title" => V::Str(
                one()?
                    .text()
                    .split(' ')
                    .map(|w| {
                        let mut c = w.chars();
                        c.next()
                            .map(|f| f.to_uppercase().chain(c).collect())
                            .unwrap_or_default()
                    })
                    .collect::<Vec<String>>()
                    .join(" "),
            ),
            "stripPort" => {
                let t = one()?.text();
                V::Str(
                    t.rsplit_once(':')
                        .map_or(t.clone(), |(h, _)| h.trim_matches(['[', ']']).to_owned()),
                )
            }
            "match" | "reReplaceAll" => {
                let re = regex::Regex::new(&args.first().ok_or("missing pattern")?.text())
                    .map_err(|e| e.to_string())?;
                if f == "match" {
                    V::Bool(re.is_match(&args.get(1).ok_or("missing text")?.text()))
                } else {
                    let repl = args.get(1).ok_or("missing replacement")?.text();
                    let text = args.get(2).ok_or("missing text")?.text();
                    V::Str(re.replace_all(&text, repl.as_str()).into_owned())
                }
            }
            "eq" | "ne" | "lt" | "le" | "gt" | "ge" => cmp(f)?,
            "and" => args
                .iter()
                .find(|a| !a.truthy())
                .or(args.last())
                .cloned()
                .unwrap_or(V::Nil),
            "or" => args
                .iter()
                .find(|a| a.truthy())
                .or(args.last())
                .cloned()
                .unwrap_or(V::Nil),
            "not" => V::Bool(!one()?.truthy()),
            "query" => {
                let q = one()?.text();
                let run = self.data.query.ok_or("query is not available here")?;
                V::Samples(run(&q)?)
            }
            "first" => match one()? {
                V::Samples(s) => s
                    .into_iter()
                    .next()
                    .map_or(V::Nil, |(l, v)| V::Sample(l, v)),
                other => return Err(format!("first of {}", other.text())),
            },
            "value" => match one()? {
                V::Sample(_, v) => V::Num(v),
                other => return Err(format!("value of {}", other.text())),
            },
            "label" => match (one()?, args.get(1)) {
                (name, Some(V::Sample(l, _))) => {
                    l.get(&name.text()).cloned().map_or(V::Nil, V::Str)
                }
                _ => return Err("label needs a name and a sample".into()),
            },
            "sortByLabel" => match (one()?, args.get(1)) {
                (name, Some(V::Samples(s))) => {
                    let name = name.text();
                    let mut s = s.clone();
                    s.sort_by(|a, b| a.0.get(&name).cmp(&b.0.get(&name)));
                    V::Samples(s)
                }
                _ => return Err("sortByLabel needs a label name and query results".into()),
            },
            "len" => match one()? {
                V::Str(s) => V::Num(s.chars().count() as f64),
                V::Map(m) => V::Num(m.len() as f64),
                V::Samples(s) => V::Num(s.len() as f64),
                other => return Err(format!("len of {}", other.text())),
            },
            "index" => match (one()?, args.get(1)) {
                (V::Map(m), Some(k)) => m.get(&k.text()).cloned().map_or(V::Nil, V::Str),
                _ => return Err("index needs a map and a key".into()),
            },
            other => return Err(format!("function {other:?} not defined")),
        })
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &V) -> Result<V, String> {
        let mut prev: Option<V> = None;
        for cmd in &p.cmds {
            let v = match &cmd[0] {
                Arg::Ident(f) => {
                    let mut args = Vec::new();
                    for a in &cmd[1..] {
                        args.push(self.arg(a, dot)?);
                    }
                    args.extend(prev.take());
                    self.call(f, &args, dot)?
                }
                first => {
                    if cmd.len() > 1 {
                        return Err("can't give arguments to a non-function".into());
                    }
                    if prev.is_some() {
                        return Err("only functions can follow |".into());
                    }
                    self.arg(first, dot)?
                }
            };
            prev = Some(v);
        }
        let v = prev.unwrap_or(V::Nil);
        if let Some(name) = p.decl.first()
            && p.decl.len() == 1
        {
            self.vars.push((name.clone(), v.clone()));
        }
        Ok(v)
    }

    fn run(&mut self, nodes: &[Node], dot: &V) -> Result<(), String> {
        for n in nodes {
            if self.out.len() > MAX_OUTPUT {
                return Err(format!("output longer than {} KiB", MAX_OUTPUT >> 10));
            }
            match n {
                Node::Text(t) => self.out.push_str(t),
                Node::Out(p) => {
                    let v = self.pipeline(p, dot)?;
                    if p.decl.is_empty() {
                        self.out.push_str(&v.text());
                    }
                }
                Node::If(p, body, els) => {
                    let mark = self.vars.len();
                    let c = self.pipeline(p, dot)?;
                    if c.truthy() {
                        self.run(body, dot)?;
                    } else {
                        self.run(els, dot)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::With(p, body, els) => {
                    let mark = self.vars.len();
                    let c = self.pipeline(p, dot)?;
                    if c.truthy() {
                        self.run(body, &c)?;
                    } else {
                        self.run(els, dot)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::Range(p, body, els) => {
                    let mark = self.vars.len();
                    let decl = p.decl.clone();
                    let bare = Pipeline {
                        decl: Vec::new(),
                        cmds: p.cmds.clone(),
                    };
                    let c = self.pipeline(&bare, dot)?;
                    if let V::Samples(list) = &c {
                        if list.is_empty() {
                            self.run(els, dot)?;
                        }
                        for (i, (l, v)) in list.iter().enumerate() {
                            let inner = self.vars.len();
                            let item = V::Sample(l.clone(), *v);
                            match decl.as_slice() {
                                [val] => self.vars.push((val.clone(), item.clone())),
                                [key, val] => {
                                    self.vars.push((key.clone(), V::Num(i as f64)));
                                    self.vars.push((val.clone(), item.clone()));
                                }
                                _ => {}
                            }
                            self.run(body, &item)?;
                            self.vars.truncate(inner);
                        }
                        self.vars.truncate(mark);
                        continue;
                    }
                    let V::Map(m) = c else {
                        if c.truthy() {
                            return Err(format!("range can't iterate over {}", c.text()));
                        }
                        self.run(els, dot)?;
                        continue;
                    };
                    if m.is_empty() {
                        self.run(els, dot)?;
                    }
                    for (k, v) in m {
                        let inner = self.vars.len();
                        match decl.as_slice() {
                            [val] => self.vars.push((val.clone(), V::Str(v.clone()))),
                            [key, val] => {
                                self.vars.push((key.clone(), V::Str(k.clone())));
                                self.vars.push((val.clone(), V::Str(v.clone())));
                            }
                            _ => {}
                        }
                        self.run(body, &V::Str(v))?;
                        self.vars.truncate(inner);
                    }
                    self.vars.truncate(mark);
                }
            }
        }
        Ok(())
    }
}

impl Template {
    pub fn expand(&self, data: &Data) -> Result<String, String> {
        let mut ctx = Ctx {
            data,
            vars: Vec::new(),
            out: String::new(),
        };
        ctx.run(&self.0, &V::Root)?;
        Ok(ctx.out)
    }
}

/// Parses and expands `src` (a template that does not parse comes back as
/// an error, as Prometheus reports it in the annotation).
pub fn expand(src: &str, data: &Data) -> Result<String, String> {
    if !src.contains("{{") {
        return Ok(src.to_owned());
    }
    parse(src)?.expand(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Data<'static> {
        Data {
            labels: BTreeMap::from([
                ("service".to_owned(), "web".to_owned()),
                ("instance".to_owned(), "127.0.0.1:8080".to_owned()),
            ]),
            external_labels: BTreeMap::from([("site".to_owned(), "home".to_owned())]),
            value: 1234.5678,
            query: None,
        }
    }

    fn x(src: &str) -> String {
        expand(src, &data()).unwrap_or_else(|e| format!("ERROR {e}"))
    }

    #[test]
    fn labels_values_and_functions() {
        assert_eq!(
            x("{{ $labels.service }} at {{ $value }}"),
            "web at 1234.5678"
        );
        assert_eq!(x("{{ .Labels.service }}/{{ .Value }}"), "web/1234.5678");
        assert_eq!(x("{{ $externalLabels.site }}"), "home");
        assert_eq!(x("{{ $value | humanize }}"), "1.235k");
        assert_eq!(x("{{ humanize 0.0123 }}"), "12.3m");
        assert_eq!(x("{{ humanize1024 2048 }}"), "2ki");
        assert_eq!(x("{{ 0.4567 | humanizePercentage }}"), "45.67%");
        assert_eq!(x("{{ humanizeDuration 93784 }}"), "1d 2h 3m 4s");
        assert_eq!(x("{{ humanizeDuration 0.25 }}"), "250ms");
        assert_eq!(x("{{ humanizeDuration 42 }}"), "42s");
        assert_eq!(x(r#"{{ printf "%.2f" $value }}"#), "1234.57");
        assert_eq!(
            x(r#"{{ printf "%s has %d%%" $labels.service 42 }}"#),
            "web has 42%"
        );
        assert_eq!(
            x(r#"{{ printf "%5.1f|%-4s|" 3.14159 "a" }}"#),
            "  3.1|a   |"
        );
        assert_eq!(x("{{ $labels.instance | stripPort }}"), "127.0.0.1");
        assert_eq!(x("{{ $labels.missing }}"), "<no value>");
        assert_eq!(x("{{ toUpper \"a\" }}"), "A");
    }

    #[test]
    fn control_flow() {
        assert_eq!(
            x("{{ if gt $value 1000.0 }}high{{ else }}low{{ end }}"),
            "high"
        );
        assert_eq!(
            x("{{ if lt $value 10.0 }}a{{ else if lt $value 2000.0 }}b{{ else }}c{{ end }}"),
            "b"
        );
        assert_eq!(
            x("{{ with $labels.service }}svc={{ . }}{{ end }}"),
            "svc=web"
        );
        assert_eq!(x("{{ with $labels.nope }}x{{ else }}none{{ end }}"), "none");
        assert_eq!(
            x("{{ range $k, $v := $labels }}{{ $k }}={{ $v }};{{ end }}"),
            "instance=127.0.0.1:8080;service=web;"
        );
        assert_eq!(x("a  {{- \" b \" -}}  c"), "a b c");
        assert_eq!(x("{{ $x := 3.0 }}{{ $x }}"), "3");
        assert_eq!(x("{{/* a comment */}}ok"), "ok");
    }

    #[test]
    fn errors_say_what() {
        assert!(check("{{ $value ").unwrap_err().contains("unclosed action"));
        assert!(
            check("{{ if 1 }}x")
                .unwrap_err()
                .contains("without {{end}}")
        );
        assert!(
            check("{{ nope 1 }}")
                .unwrap_err()
                .contains("function \"nope\" not defined")
        );
        assert!(
            check("{{ end }}")
                .unwrap_err()
                .contains("unexpected {{end}}")
        );
        assert!(
            expand("{{ $nope }}", &data())
                .unwrap_err()
                .contains("undefined variable")
        );
        let long = "x".repeat(MAX_OUTPUT + 1) + "{{ $value }}";
        assert!(
            expand(&long, &data())
                .unwrap_err()
                .contains("output longer than 64 KiB")
        );
        let deep = "{{ if 1 }}".repeat(40) + &"{{ end }}".repeat(40);
        assert!(check(&deep).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn query_results_in_templates() {
        let q = |expr: &str| -> Result<Samples, String> {
            match expr {
                "up" => Ok(vec![
                    (
                        BTreeMap::from([("instance".to_owned(), "b".to_owned())]),
                        0.0,
                    ),
                    (
                        BTreeMap::from([("instance".to_owned(), "a".to_owned())]),
                        1.0,
                    ),
                ]),
                _ => Err(format!("bad query {expr}")),
            }
        };
        let d = Data {
            query: Some(&q),
            ..data()
        };
        let x = |src: &str| expand(src, &d).unwrap_or_else(|e| format!("ERROR {e}"));
        assert_eq!(x(r#"{{ query "up" | first | value }}"#), "0");
        assert_eq!(
            x(r#"{{ with query "up" }}{{ . | first | label "instance" }}{{ end }}"#),
            "b"
        );
        assert_eq!(
            x(
                r#"{{ range query "up" | sortByLabel "instance" }}{{ .Labels.instance }}={{ .Value }} {{ end }}"#
            ),
            "a=1 b=0 "
        );
        assert_eq!(x(r#"{{ query "up" | len }}"#), "2");
        assert!(x(r#"{{ query "nope" }}"#).starts_with("ERROR bad query"));
        assert!(
            expand(r#"{{ query "up" }}"#, &data())
                .unwrap_err()
                .contains("not available")
        );
    }

    #[test]
    fn go_g_formatting() {
        assert_eq!(fmt_g(1234.5678, 4), "1235");
        assert_eq!(fmt_g(0.000012345, 4), "1.234e-05");
        assert_eq!(fmt_g(123456.0, 4), "1.235e+05");
        assert_eq!(fmt_g(1.5, 4), "1.5");
        assert_eq!(go_float(3.0), "3");
        assert_eq!(go_float(1e21), "1e+21");
    }
}
