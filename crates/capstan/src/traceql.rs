//! A subset of TraceQL, the query language of Tempo's search, as Grafana's
//! Tempo data source sends it in `/api/search?q=`: spanset filters
//! `{ cond && cond || !(cond) }` over span intrinsics (`name`, `status`,
//! `statusMessage`, `kind`, `duration`, also as `span:name` …), span attributes
//! (`span.http.route`), resource attributes (`resource.service.name`) and either
//! (`.http.route`), with `= != > >= < <= =~ !~` against strings, numbers,
//! durations, booleans and the status and kind names; spansets combined with
//! `&&` and `||` (the trace has spans matching both, or either). Regular
//! expressions are fully anchored. Pure functions: no I/O.

use std::fmt;

use capstan_logstore::Labels;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;

use crate::traces::status_name;

/// A parsed query: spanset filters joined by `&&` (binds tighter) and `||`.
#[derive(Debug, Clone)]
pub enum Query {
    Spanset(Cond),
    And(Box<Query>, Box<Query>),
    Or(Box<Query>, Box<Query>),
}

/// A condition on one span.
#[derive(Debug, Clone)]
pub enum Cond {
    True,
    Cmp(Field, Op, Value),
    Not(Box<Cond>),
    And(Box<Cond>, Box<Cond>),
    Or(Box<Cond>, Box<Cond>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Name,
    Status,
    StatusMessage,
    Kind,
    Duration,
    Span(String),
    Resource(String),
    /// `.name`: the span's attribute, else the resource's.
    Any(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Re,
    NotRe,
}

#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Num(f64),
    /// Nanoseconds.
    Duration(i64),
    Bool(bool),
    /// `error`, `ok`, `unset`, `server`, `client`, … as written.
    Word(String),
    Regex(regex::Regex),
}

/// Why a query does not parse: the column (1-based, in characters) and what
/// was wrong there.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "column {}: {}", self.column, self.message)
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LBrace,
    RBrace,
    LParen,
    RParen,
    AndAnd,
    OrOr,
    Bang,
    Op(Op),
    Str(String),
    Num(f64),
    Duration(i64),
    Ident(String),
}

const SCALE: [(&str, i64); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, Error> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let err = |at: usize, m: String| Error {
        column: at + 1,
        message: m,
    };
    let ident_char =
        |c: char| c.is_alphanumeric() || matches!(c, '_' | '.' | ':' | '-' | '/' | '@');
    while i < chars.len() {
        let c = chars[i];
        let at = i;
        let two = |a: char, b: char| c == a && chars.get(i + 1) == Some(&b);
        let (tok, len) = if c.is_whitespace() {
            i += 1;
            continue;
        } else if c == '{' {
            (Tok::LBrace, 1)
        } else if c == '}' {
            (Tok::RBrace, 1)
        } else if c == '(' {
            (Tok::LParen, 1)
        } else if c == ')' {
            (Tok::RParen, 1)
        } else if two('&', '&') {
            (Tok::AndAnd, 2)
        } else if two('|', '|') {
            (Tok::OrOr, 2)
        } else if two('!', '=') {
            (Tok::Op(Op::Ne), 2)
        } else if two('!', '~') {
            (Tok::Op(Op::NotRe), 2)
        } else if c == '!' {
            (Tok::Bang, 1)
        } else if two('=', '~') {
            (Tok::Op(Op::Re), 2)
        } else if two('>', '=') {
            (Tok::Op(Op::Ge), 2)
        } else if two('<', '=') {
            (Tok::Op(Op::Le), 2)
        } else if c == '=' {
            (Tok::Op(Op::Eq), 1)
        } else if c == '>' {
            (Tok::Op(Op::Gt), 1)
        } else if c == '<' {
            (Tok::Op(Op::Lt), 1)
        } else if c == '"' || c == '`' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                let Some(&d) = chars.get(j) else {
                    return Err(err(at, "string without its closing quote".into()));
                };
                if d == c {
                    break;
                }
                if d == '\\' && c == '"' {
                    let Some(&e) = chars.get(j + 1) else {
                        return Err(err(j, "string ends in an escape".into()));
                    };
                    s.push(match e {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        other => other,
                    });
                    j += 2;
                    continue;
                }
                s.push(d);
                j += 1;
            }
            (Tok::Str(s), j + 1 - i)
        } else if c.is_ascii_digit()
            || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                j += 1;
            }
            let num: String = chars[i..j].iter().collect();
            let mut k = j;
            while k < chars.len() && (chars[k].is_alphabetic()) {
                k += 1;
            }
            let unit: String = chars[j..k].iter().collect();
            let n: f64 = num
                .parse()
                .map_err(|_| err(at, format!("{num:?} is not a number")))?;
            if unit.is_empty() {
                (Tok::Num(n), j - i)
            } else {
                let Some((_, scale)) = SCALE.iter().find(|(u, _)| *u == unit) else {
                    return Err(err(
                        j,
                        format!("unknown duration unit {unit:?} (ns, us, ms, s, m, h)"),
                    ));
                };
                (Tok::Duration((n * *scale as f64) as i64), k - i)
            }
        } else if ident_char(c) {
            let mut j = i;
            while j < chars.len() && ident_char(chars[j]) {
                j += 1;
            }
            // `span."quoted name"`: a scope, then a quoted attribute name.
            if chars[j - 1] == '.' && chars.get(j) == Some(&'"') {
                let mut k = j + 1;
                while k < chars.len() && chars[k] != '"' {
                    k += 1;
                }
                if k >= chars.len() {
                    return Err(err(j, "attribute name without its closing quote".into()));
                }
                let name: String = chars[i..j].iter().chain(&chars[j + 1..k]).collect();
                (Tok::Ident(name), k + 1 - i)
            } else {
                (Tok::Ident(chars[i..j].iter().collect()), j - i)
            }
        } else {
            return Err(err(at, format!("unexpected {c:?}")));
        };
        out.push((at, tok));
        i += len;
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(usize, Tok)>,
    pos: usize,
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }

    fn column(&self) -> usize {
        self.toks.get(self.pos).map_or(self.end, |(c, _)| *c) + 1
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, Error> {
        Err(Error {
            column: self.column(),
            message: message.into(),
        })
    }

    fn expect(&mut self, t: Tok, what: &str) -> Result<(), Error> {
        if self.peek() == Some(&t) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(format!("expected {what}"))
        }
    }

    fn query(&mut self) -> Result<Query, Error> {
        let mut left = self.query_and()?;
        while self.peek() == Some(&Tok::OrOr) {
            self.pos += 1;
            let right = self.query_and()?;
            left = Query::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn query_and(&mut self) -> Result<Query, Error> {
        let mut left = self.spanset()?;
        while self.peek() == Some(&Tok::AndAnd) {
            self.pos += 1;
            let right = self.spanset()?;
            left = Query::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn spanset(&mut self) -> Result<Query, Error> {
        if self.peek() == Some(&Tok::LParen) {
            self.pos += 1;
            let q = self.query()?;
            self.expect(Tok::RParen, "`)`")?;
            return Ok(q);
        }
        self.expect(Tok::LBrace, "`{` to start a spanset filter")?;
        if self.peek() == Some(&Tok::RBrace) {
            self.pos += 1;
            return Ok(Query::Spanset(Cond::True));
        }
        let c = self.or()?;
        self.expect(Tok::RBrace, "`}`, `&&` or `||`")?;
        Ok(Query::Spanset(c))
    }

    fn or(&mut self) -> Result<Cond, Error> {
        let mut left = self.and()?;
        while self.peek() == Some(&Tok::OrOr) {
            self.pos += 1;
            let right = self.and()?;
            left = Cond::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Cond, Error> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Tok::AndAnd) {
            self.pos += 1;
            let right = self.unary()?;
            left = Cond::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Cond, Error> {
        match self.peek() {
            Some(Tok::Bang) => {
                self.pos += 1;
                Ok(Cond::Not(Box::new(self.unary()?)))
            }
            Some(Tok::LParen) => {
                self.pos += 1;
                let c = self.or()?;
                self.expect(Tok::RParen, "`)`")?;
                Ok(c)
            }
            Some(Tok::Ident(_)) => self.comparison(),
            _ => self.fail("expected a field such as name, status, duration, span.x or resource.x"),
        }
    }

    fn comparison(&mut self) -> Result<Cond, Error> {
        let Some(Tok::Ident(name)) = self.peek().cloned() else {
            return self.fail("expected a field");
        };
        let field_col = self.column();
        let field = field(&name).map_err(|message| Error {
            column: field_col,
            message,
        })?;
        self.pos += 1;
        let Some(Tok::Op(op)) = self.peek().cloned() else {
            return self.fail(format!("expected an operator after {name}"));
        };
        self.pos += 1;
        let value_col = self.column();
        let bad = |m: String| Error {
            column: value_col,
            message: m,
        };
        let value = match self.peek().cloned() {
            Some(Tok::Str(s)) if matches!(op, Op::Re | Op::NotRe) => {
                let anchored = format!("^(?:{s})$");
                Value::Regex(
                    regex::Regex::new(&anchored)
                        .map_err(|e| bad(format!("invalid regular expression {s:?}: {e}")))?,
                )
            }
            Some(Tok::Str(s)) => Value::Str(s),
            Some(Tok::Num(n)) => Value::Num(n),
            Some(Tok::Duration(d)) => Value::Duration(d),
            Some(Tok::Ident(w)) if w == "true" || w == "false" => Value::Bool(w == "true"),
            Some(Tok::Ident(w))
                if matches!(
                    w.as_str(),
                    "error"
                        | "ok"
                        | "unset"
                        | "unspecified"
                        | "internal"
                        | "server"
                        | "client"
                        | "producer"
                        | "consumer"
                ) =>
            {
                Value::Word(w)
            }
            _ => return self.fail("expected a value: a \"string\", a number, a duration, true/false, or a status or kind"),
        };
        if matches!(op, Op::Re | Op::NotRe) && !matches!(value, Value::Regex(_)) {
            return Err(bad("=~ and !~ take a \"regular expression\"".into()));
        }
        match (&field, &value) {
            (Field::Status, Value::Word(w)) if !["error", "ok", "unset"].contains(&w.as_str()) => {
                return Err(bad(format!("status is error, ok or unset, not {w}")));
            }
            (Field::Status, v) if !matches!(v, Value::Word(_)) => {
                return Err(bad("status is compared with error, ok or unset".into()));
            }
            (Field::Kind, v) if !matches!(v, Value::Word(_)) => {
                return Err(bad(
                    "kind is compared with server, client, internal, producer, consumer or unspecified"
                        .into(),
                ));
            }
            _ => {}
        }
        self.pos += 1;
        Ok(Cond::Cmp(field, op, value))
    }
}

fn field(name: &str) -> Result<Field, String> {
    let intrinsic = |n: &str| match n {
        "name" => Some(Field::Name),
        "status" => Some(Field::Status),
        "statusMessage" => Some(Field::StatusMessage),
        "kind" => Some(Field::Kind),
        "duration" => Some(Field::Duration),
        _ => None,
    };
    if let Some(f) = intrinsic(name) {
        return Ok(f);
    }
    if let Some(rest) = name.strip_prefix("span:") {
        return intrinsic(rest).ok_or_else(|| format!("unknown span intrinsic {name}"));
    }
    if name.starts_with("trace:")
        || matches!(name, "rootName" | "rootServiceName" | "traceDuration")
    {
        return Err(format!(
            "trace-level {name} is not supported; use minDuration/maxDuration for the trace's duration"
        ));
    }
    let attr = |s: &str| {
        if s.is_empty() {
            Err(format!("{name} names no attribute"))
        } else {
            Ok(s.to_owned())
        }
    };
    if let Some(a) = name.strip_prefix("span.") {
        return attr(a).map(Field::Span);
    }
    if let Some(a) = name.strip_prefix("resource.") {
        return attr(a).map(Field::Resource);
    }
    if let Some(a) = name.strip_prefix('.') {
        return attr(a).map(Field::Any);
    }
    Err(format!(
        "unknown field {name} (name, status, statusMessage, kind, duration, span.<attribute>, resource.<attribute> or .<attribute>)"
    ))
}

/// The longest query accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// The deepest nesting of `(` and `{` accepted.
pub const MAX_NESTING: usize = 128;
/// The most `&&`, `||` and `!` accepted in one query.
pub const MAX_OPERATORS: usize = 1024;

/// Bounds the query's nesting and operators before it is parsed, so parsing,
/// matching and dropping the tree recurse a bounded depth.
fn check_shape(src: &str, toks: &[(usize, Tok)]) -> Result<(), Error> {
    if src.len() > MAX_QUERY_BYTES {
        return Err(Error {
            column: 1,
            message: format!("the query is longer than {} KiB", MAX_QUERY_BYTES >> 10),
        });
    }
    let (mut depth, mut ops) = (0usize, 0usize);
    for (at, t) in toks {
        let fail = |message: String| Error {
            column: at + 1,
            message,
        };
        match t {
            Tok::LParen | Tok::LBrace => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Err(fail(format!(
                        "the query nests deeper than {MAX_NESTING} levels"
                    )));
                }
            }
            Tok::RParen | Tok::RBrace => depth = depth.saturating_sub(1),
            Tok::AndAnd | Tok::OrOr | Tok::Bang => {
                ops += 1;
                if ops > MAX_OPERATORS {
                    return Err(fail(format!(
                        "the query has more than {MAX_OPERATORS} operators"
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parses a TraceQL query.
pub fn parse(src: &str) -> Result<Query, Error> {
    if src.len() > MAX_QUERY_BYTES {
        return check_shape(src, &[]).map(|()| Query::Spanset(Cond::True));
    }
    let toks = lex(src)?;
    check_shape(src, &toks)?;
    if toks.is_empty() {
        return Ok(Query::Spanset(Cond::True));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        end: src.chars().count(),
    };
    let q = p.query()?;
    if p.pos < p.toks.len() {
        return p.fail("unexpected text after the query (spansets join with && or ||)");
    }
    Ok(q)
}

/// A value of a span as TraceQL compares it.
enum Got<'a> {
    Str(&'a str),
    Owned(String),
    Num(f64),
    Bool(bool),
}

fn any_value(v: &AnyValue) -> Option<Got<'_>> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Got::Str(s),
        any_value::Value::IntValue(i) => Got::Num(*i as f64),
        any_value::Value::DoubleValue(d) => Got::Num(*d),
        any_value::Value::BoolValue(b) => Got::Bool(*b),
        _ => Got::Owned(crate::ingest::otlp::value_text(v)),
    })
}

fn kind_name(k: i32) -> &'static str {
    match k {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

fn order(op: Op, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        Op::Eq => o == Equal,
        Op::Ne => o != Equal,
        Op::Gt => o == Greater,
        Op::Ge => o != Less,
        Op::Lt => o == Less,
        Op::Le => o != Greater,
        Op::Re | Op::NotRe => false,
    }
}

fn compare(got: &Got<'_>, op: Op, want: &Value) -> bool {
    let text = match got {
        Got::Str(s) => Some(*s),
        Got::Owned(s) => Some(s.as_str()),
        _ => None,
    };
    match (want, text) {
        (Value::Regex(re), Some(t)) => re.is_match(t) == (op == Op::Re),
        (Value::Str(w), Some(t)) | (Value::Word(w), Some(t)) => order(op, t.cmp(w.as_str())),
        (Value::Num(w), _) => match got {
            Got::Num(n) => n.partial_cmp(w).is_some_and(|o| order(op, o)),
            _ => false,
        },
        (Value::Bool(w), _) => match got {
            Got::Bool(b) if matches!(op, Op::Eq | Op::Ne) => (b == w) == (op == Op::Eq),
            _ => false,
        },
        _ => false,
    }
}

impl Cond {
    /// Whether a span (with its stream's resource labels) meets the condition.
    pub fn matches(&self, resource: &Labels, s: &Span) -> bool {
        match self {
            Cond::True => true,
            Cond::Not(c) => !c.matches(resource, s),
            Cond::And(a, b) => a.matches(resource, s) && b.matches(resource, s),
            Cond::Or(a, b) => a.matches(resource, s) || b.matches(resource, s),
            Cond::Cmp(f, op, v) => {
                let span_attr = |k: &str| {
                    s.attributes
                        .iter()
                        .find(|kv| kv.key == k)
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(any_value)
                };
                let got = match f {
                    Field::Name => Some(Got::Str(&s.name)),
                    Field::Status => Some(Got::Str(status_name(s))),
                    Field::StatusMessage => Some(Got::Str(
                        s.status.as_ref().map_or("", |st| st.message.as_str()),
                    )),
                    Field::Kind => Some(Got::Str(kind_name(s.kind))),
                    Field::Duration => {
                        let d = s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano);
                        return match v {
                            Value::Duration(w) => order(*op, (d as i64).cmp(w)),
                            Value::Num(w) => {
                                (d as f64).partial_cmp(w).is_some_and(|o| order(*op, o))
                            }
                            _ => false,
                        };
                    }
                    Field::Span(k) => span_attr(k),
                    Field::Resource(k) => resource.get(k).map(Got::Str),
                    Field::Any(k) => span_attr(k).or_else(|| resource.get(k).map(Got::Str)),
                };
                // A span without the attribute meets no comparison with it,
                // `!=` included (`!(…)` asks for "not this value, or none").
                got.is_some_and(|g| compare(&g, *op, v))
            }
        }
    }
}

impl Query {
    /// The spanset filters, in order.
    pub fn spansets(&self) -> Vec<&Cond> {
        match self {
            Query::Spanset(c) => vec![c],
            Query::And(a, b) | Query::Or(a, b) => {
                let mut v = a.spansets();
                v.extend(b.spansets());
                v
            }
        }
    }

    /// Whether a span meets any spanset filter (a trace with such a span may
    /// match).
    pub fn any_matches(&self, resource: &Labels, s: &Span) -> bool {
        self.spansets().iter().any(|c| c.matches(resource, s))
    }

    /// Whether a trace's spans meet the query: a spanset filter holds when some
    /// span meets it.
    pub fn trace_matches<'a>(&self, spans: &[(&'a Labels, &'a Span)]) -> bool {
        match self {
            Query::Spanset(c) => spans.iter().any(|(l, s)| c.matches(l, s)),
            Query::And(a, b) => a.trace_matches(spans) && b.trace_matches(spans),
            Query::Or(a, b) => a.trace_matches(spans) || b.trace_matches(spans),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::trace::v1::status;

    fn kv(k: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        }
    }

    fn span(name: &str, kind: i32, ms: u64, error: bool, attrs: Vec<KeyValue>) -> Span {
        Span {
            name: name.into(),
            kind,
            start_time_unix_nano: 1_000_000_000,
            end_time_unix_nano: 1_000_000_000 + ms * 1_000_000,
            attributes: attrs,
            status: error.then(|| opentelemetry_proto::tonic::trace::v1::Status {
                code: status::StatusCode::Error as i32,
                message: "card declined".into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_table_of_conditions() {
        use any_value::Value::*;
        let res =
            Labels::from_pairs([("service.name", "shop"), ("deployment.environment", "prod")]);
        let get = span(
            "GET /cart",
            2,
            320,
            false,
            vec![
                kv("http.route", StringValue("/cart".into())),
                kv("http.response.status_code", IntValue(200)),
                kv("cache.hit", BoolValue(true)),
                kv("ratio", DoubleValue(0.25)),
            ],
        );
        let charge = span(
            "charge card",
            3,
            40,
            true,
            vec![kv("http.response.status_code", IntValue(502))],
        );
        let table: &[(&str, bool, bool)] = &[
            ("{}", true, true),
            ("", true, true),
            (r#"{ name = "GET /cart" }"#, true, false),
            (r#"{ span:name != "GET /cart" }"#, false, true),
            (r#"{ name =~ "GET.*" }"#, true, false),
            (r#"{ name =~ "cart" }"#, false, false),
            (r#"{ name !~ ".*card" }"#, true, false),
            ("{ status = error }", false, true),
            ("{ status != error }", true, false),
            ("{ kind = server }", true, false),
            ("{ kind = client && status = error }", false, true),
            ("{ duration > 300ms }", true, false),
            ("{ duration <= 40ms }", false, true),
            ("{ span.http.response.status_code >= 500 }", false, true),
            ("{ .http.response.status_code = 200 }", true, false),
            (r#"{ resource.service.name = "shop" }"#, true, true),
            (r#"{ .deployment.environment = "prod" }"#, true, true),
            (r#"{ resource.service.name = "web" }"#, false, false),
            (
                r#"{ span.http.route = "/cart" || status = error }"#,
                true,
                true,
            ),
            (r#"{ !(span.http.route = "/cart") }"#, false, true),
            (r#"{ span.http.route != "/cart" }"#, false, false),
            ("{ span.cache.hit = true }", true, false),
            ("{ span.ratio < 0.5 }", true, false),
            (r#"{ span."cache.hit" = true }"#, true, false),
            (r#"{ statusMessage = "card declined" }"#, false, true),
            (
                r#"{ (name = "x" || kind = server) && duration > 1s }"#,
                false,
                false,
            ),
        ];
        for (q, want_get, want_charge) in table {
            let parsed = parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            let sets = parsed.spansets();
            assert_eq!(sets.len(), 1, "{q}");
            assert_eq!(sets[0].matches(&res, &get), *want_get, "{q} on GET");
            assert_eq!(
                sets[0].matches(&res, &charge),
                *want_charge,
                "{q} on charge"
            );
        }
        // Spansets joined: the trace needs spans for both, or either.
        let spans = [(&res, &get), (&res, &charge)];
        let t = |q: &str| parse(q).unwrap().trace_matches(&spans);
        assert!(t(r#"{ kind = server } && { status = error }"#));
        assert!(!t(r#"{ kind = server } && { name = "nope" }"#));
        assert!(t(r#"{ name = "nope" } || { status = error }"#));
        assert!(!t(r#"({ name = "a" } || { name = "b" }) && {}"#));
    }

    #[test]
    fn deep_queries_are_bounded() {
        let at_limit = [
            format!(
                "{}{{}}{}",
                "(".repeat(MAX_NESTING - 1),
                ")".repeat(MAX_NESTING - 1)
            ),
            format!(
                "{{ {} }}",
                vec!["name = \"a\""; MAX_OPERATORS + 1].join(" && ")
            ),
            format!("{{ {}name = \"a\" }}", "!".repeat(MAX_OPERATORS)),
            vec!["{}"; MAX_OPERATORS + 1].join(" || "),
        ];
        let over = [
            format!("{}{{}}{}", "(".repeat(5000), ")".repeat(5000)),
            format!(
                "{{ {}name = \"a\"{} }}",
                "(".repeat(MAX_NESTING),
                ")".repeat(MAX_NESTING)
            ),
            format!("{{ {} }}", vec!["name = \"a\""; 5000].join(" || ")),
            format!("{{ {}name = \"a\" }}", "!".repeat(100_000)),
            vec!["{}"; MAX_OPERATORS + 2].join(" && "),
        ];
        std::thread::Builder::new()
            .stack_size(capstan_promql::limits::STACK_BYTES)
            .spawn(move || {
                let span = span("a", 2, 1, false, vec![]);
                for q in &at_limit {
                    let parsed = parse(q).unwrap();
                    parsed.trace_matches(&[(&Labels::default(), &span)]);
                }
                for q in &over {
                    let e = parse(q).unwrap_err().to_string();
                    assert!(
                        e.contains("nests deeper than 128")
                            || e.contains("more than 1024")
                            || e.contains("longer than"),
                        "{e}"
                    );
                }
                let long = format!("{{ name = \"{}\" }}", "x".repeat(MAX_QUERY_BYTES));
                assert!(
                    parse(&long)
                        .unwrap_err()
                        .message
                        .contains("longer than 64 KiB")
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn errors_say_where_and_what() {
        let cases = [
            ("{ name = }", 10, "expected a value"),
            ("{ name \"x\" }", 8, "expected an operator after name"),
            ("{ foo = 1 }", 3, "unknown field foo"),
            ("{ status = 5 }", 12, "status is compared with"),
            ("{ status = server }", 12, "status is error, ok or unset"),
            ("{ duration > 3parsecs }", 15, "unknown duration unit"),
            ("{ name =~ \"(\" }", 11, "invalid regular expression"),
            ("{ name = \"x\"", 13, "expected `}`"),
            ("{ name = \"x }", 10, "without its closing quote"),
            ("{ traceDuration > 1s }", 3, "not supported"),
            ("{ a } {", 3, "unknown field a"),
            ("{} {}", 4, "unexpected text after the query"),
            ("name = \"x\"", 1, "expected `{`"),
            ("{ name = \"x\" } $", 16, "unexpected '$'"),
        ];
        for (q, col, msg) in cases {
            let e = parse(q).err().unwrap_or_else(|| panic!("{q} parsed"));
            assert!(e.message.contains(msg), "{q}: {e}");
            assert_eq!(e.column, col, "{q}: {e}");
        }
    }
}
