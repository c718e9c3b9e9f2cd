//! Recursive-descent LogQL parser.

use regex::Regex;

use super::ParseError;
use super::ast::*;
use super::lex::{Tok, Token};
use super::pattern::Pattern;
use super::template::Template;

pub struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

type R<T> = Result<T, ParseError>;

fn anchored(re: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| format!("bad regex {re:?}: {e}"))
}

impl Parser {
    pub fn new(toks: Vec<Token>) -> Self {
        Parser { toks, pos: 0 }
    }

    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }

    fn peek_at(&self, n: usize) -> &Tok {
        &self.toks[(self.pos + n).min(self.toks.len() - 1)].tok
    }

    fn at(&self) -> usize {
        self.toks[self.pos].at
    }

    fn next(&mut self) -> Tok {
        let t = self.toks[self.pos].tok.clone();
        if self.pos < self.toks.len() - 1 {
            self.pos += 1;
        }
        t
    }

    fn err<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(ParseError {
            at: self.at(),
            msg: msg.into(),
        })
    }

    fn expect(&mut self, t: Tok, what: &str) -> R<()> {
        if *self.peek() == t {
            self.next();
            Ok(())
        } else {
            self.err(format!("expected {what}, found {}", describe(self.peek())))
        }
    }

    fn ident(&mut self, what: &str) -> R<String> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.next();
                Ok(s)
            }
            t => self.err(format!("expected {what}, found {}", describe(&t))),
        }
    }

    fn string(&mut self, what: &str) -> R<String> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.next();
                Ok(s)
            }
            t => self.err(format!(
                "expected {what} (a quoted string), found {}",
                describe(&t)
            )),
        }
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(s) if s == kw)
    }

    pub fn parse_top(&mut self) -> R<Expr> {
        let e = self.expr(0)?;
        if *self.peek() != Tok::Eof {
            return self.err(format!(
                "unexpected {} after the expression",
                describe(self.peek())
            ));
        }
        Ok(e)
    }

    fn binop(&self) -> Option<(BinOp, u8)> {
        Some(match self.peek() {
            Tok::Ident(s) if s == "or" => (BinOp::Or, 1),
            Tok::Ident(s) if s == "and" => (BinOp::And, 2),
            Tok::Ident(s) if s == "unless" => (BinOp::Unless, 2),
            Tok::EqEq => (BinOp::Eq, 3),
            Tok::BangEq => (BinOp::Ne, 3),
            Tok::Gt => (BinOp::Gt, 3),
            Tok::Ge => (BinOp::Ge, 3),
            Tok::Lt => (BinOp::Lt, 3),
            Tok::Le => (BinOp::Le, 3),
            Tok::Plus => (BinOp::Add, 4),
            Tok::Minus => (BinOp::Sub, 4),
            Tok::Star => (BinOp::Mul, 5),
            Tok::Slash => (BinOp::Div, 5),
            Tok::Percent => (BinOp::Mod, 5),
            Tok::Caret => (BinOp::Pow, 6),
            _ => return None,
        })
    }

    fn expr(&mut self, min: u8) -> R<Expr> {
        let mut lhs = self.primary()?;
        while let Some((op, prec)) = self.binop() {
            if prec < min || matches!(lhs, Expr::Log(_)) {
                break;
            }
            let at = self.at();
            self.next();
            let bool_modifier = self.is_kw("bool");
            if bool_modifier {
                self.next();
            }
            // `^` is right-associative.
            let rhs = self.expr(if op == BinOp::Pow { prec } else { prec + 1 })?;
            let (Expr::Metric(l), Expr::Metric(r)) = (lhs, rhs) else {
                return Err(ParseError {
                    at,
                    msg: "binary operators need metric queries on both sides (wrap a log query in count_over_time(…[range]) or rate(…))".into(),
                });
            };
            lhs = Expr::Metric(MetricExpr::Binary {
                op,
                bool_modifier,
                lhs: Box::new(l),
                rhs: Box::new(r),
            });
        }
        Ok(lhs)
    }

    fn primary(&mut self) -> R<Expr> {
        match self.peek().clone() {
            Tok::LBrace => Ok(Expr::Log(self.log_expr()?)),
            Tok::Num(v) => {
                self.next();
                Ok(Expr::Metric(MetricExpr::Number(v)))
            }
            Tok::Minus => {
                self.next();
                match self.next() {
                    Tok::Num(v) => Ok(Expr::Metric(MetricExpr::Number(-v))),
                    _ => self.err("expected a number after '-'"),
                }
            }
            Tok::LParen => {
                self.next();
                let e = self.expr(0)?;
                self.expect(Tok::RParen, "')'")?;
                Ok(e)
            }
            Tok::Ident(name) => {
                if let Some(f) = RangeFn::from_name(&name) {
                    self.next();
                    return Ok(Expr::Metric(self.range_agg(f)?));
                }
                if let Some(op) = AggOp::from_name(&name) {
                    self.next();
                    return Ok(Expr::Metric(self.vector_agg(op)?));
                }
                self.err(format!("unknown function {name:?}"))
            }
            t => self.err(format!("expected a query, found {}", describe(&t))),
        }
    }

    fn grouping(&mut self) -> R<Option<Grouping>> {
        let by = if self.is_kw("by") {
            true
        } else if self.is_kw("without") {
            false
        } else {
            return Ok(None);
        };
        self.next();
        self.expect(Tok::LParen, "'(' after by/without")?;
        let mut names = Vec::new();
        while *self.peek() != Tok::RParen {
            names.push(self.ident("a label name")?);
            if *self.peek() == Tok::Comma {
                self.next();
            } else {
                break;
            }
        }
        self.expect(Tok::RParen, "')'")?;
        Ok(Some(if by {
            Grouping::By(names)
        } else {
            Grouping::Without(names)
        }))
    }

    fn range_agg(&mut self, func: RangeFn) -> R<MetricExpr> {
        let name_at = self.at();
        self.expect(Tok::LParen, "'('")?;
        let param = if func == RangeFn::QuantileOverTime {
            let v =
                match self.next() {
                    Tok::Num(v) => v,
                    _ => return self.err(
                        "quantile_over_time takes a quantile first: quantile_over_time(0.99, …)",
                    ),
                };
            self.expect(Tok::Comma, "','")?;
            Some(v)
        } else {
            None
        };
        let log = self.log_expr()?;
        self.expect(Tok::LBracket, "a range like [5m] after the log query")?;
        let range_ns = match self.next() {
            Tok::Dur(d) if d > 0 => d,
            _ => return self.err("expected a positive duration like 5m"),
        };
        self.expect(Tok::RBracket, "']'")?;
        let mut offset_ns = 0;
        if self.is_kw("offset") {
            self.next();
            offset_ns = match self.next() {
                Tok::Dur(d) => d,
                _ => return self.err("expected a duration after offset"),
            };
        }
        self.expect(Tok::RParen, "')'")?;
        let grouping = self.grouping()?;
        let unwrapped = log.stages.iter().any(|s| matches!(s, Stage::Unwrap { .. }));
        if func.needs_unwrap() && !unwrapped {
            return Err(ParseError {
                at: name_at,
                msg: format!(
                    "{func:?} needs an unwrapped label: add | unwrap LABEL before the range"
                ),
            });
        }
        if !func.needs_unwrap() && func != RangeFn::Rate && unwrapped {
            return Err(ParseError {
                at: name_at,
                msg: format!("{func:?} counts lines and takes no | unwrap"),
            });
        }
        if grouping.is_some() && !unwrapped {
            return Err(ParseError {
                at: name_at,
                msg:
                    "by/without on a range function needs | unwrap (group with sum by (…) instead)"
                        .into(),
            });
        }
        Ok(MetricExpr::Range {
            func,
            param,
            log,
            range_ns,
            offset_ns,
            grouping,
        })
    }

    fn vector_agg(&mut self, op: AggOp) -> R<MetricExpr> {
        let mut grouping = self.grouping()?;
        self.expect(Tok::LParen, "'('")?;
        let param = if matches!(op, AggOp::Topk | AggOp::Bottomk) {
            let v = match self.next() {
                Tok::Num(v) if v >= 0.0 => v,
                _ => return self.err("topk/bottomk take a count first: topk(5, …)"),
            };
            self.expect(Tok::Comma, "','")?;
            Some(v)
        } else {
            None
        };
        let inner = match self.expr(0)? {
            Expr::Metric(m) => m,
            Expr::Log(_) => {
                return self.err("aggregations take a metric query: sum(count_over_time({…}[5m]))");
            }
        };
        self.expect(Tok::RParen, "')'")?;
        if grouping.is_none() {
            grouping = self.grouping()?;
        }
        Ok(MetricExpr::Agg {
            op,
            param,
            grouping,
            inner: Box::new(inner),
        })
    }

    fn matcher(&mut self) -> R<Matcher> {
        let name = self.ident("a label name")?;
        let op = match self.next() {
            Tok::Eq => MatchOp::Eq,
            Tok::BangEq => MatchOp::Ne,
            Tok::EqTilde => MatchOp::Re,
            Tok::BangTilde => MatchOp::Nre,
            t => {
                return self.err(format!(
                    "expected =, !=, =~ or !~ after {name:?}, found {}",
                    describe(&t)
                ));
            }
        };
        let at = self.at();
        let value = self.string("a label value")?;
        let re = match op {
            MatchOp::Re | MatchOp::Nre => {
                Some(anchored(&value).map_err(|msg| ParseError { at, msg })?)
            }
            _ => None,
        };
        Ok(Matcher {
            name,
            op,
            value,
            re,
        })
    }

    pub fn log_expr(&mut self) -> R<LogExpr> {
        let at = self.at();
        self.expect(Tok::LBrace, "a stream selector like {service=\"web\"}")?;
        let mut selector = Vec::new();
        while *self.peek() != Tok::RBrace {
            selector.push(self.matcher()?);
            if *self.peek() == Tok::Comma {
                self.next();
            } else {
                break;
            }
        }
        self.expect(Tok::RBrace, "'}'")?;
        if !selector.iter().any(|m| !m.matches("")) {
            return Err(ParseError {
                at,
                msg: "a stream selector needs at least one matcher that does not match the empty value, like {service=\"web\"}".into(),
            });
        }
        let mut stages = Vec::new();
        loop {
            let op = match self.peek() {
                Tok::PipeEq => FilterOp::Contains,
                Tok::BangEq => FilterOp::NotContains,
                Tok::PipeTilde => FilterOp::Match,
                Tok::BangTilde => FilterOp::NotMatch,
                Tok::PipeGt => FilterOp::Pattern,
                Tok::BangGt => FilterOp::NotPattern,
                Tok::Pipe => {
                    self.next();
                    stages.push(self.stage()?);
                    continue;
                }
                _ => break,
            };
            self.next();
            let mut values = vec![self.string("a filter string")?];
            while self.is_kw("or") && matches!(self.peek_at(1), Tok::Str(_)) {
                self.next();
                values.push(self.string("a filter string")?);
            }
            let at = self.at();
            let res = match op {
                FilterOp::Match | FilterOp::NotMatch => values
                    .iter()
                    .map(|v| {
                        Regex::new(v).map_err(|e| ParseError {
                            at,
                            msg: format!("bad regex {v:?}: {e}"),
                        })
                    })
                    .collect::<R<_>>()?,
                _ => Vec::new(),
            };
            let patterns = match op {
                FilterOp::Pattern | FilterOp::NotPattern => values
                    .iter()
                    .map(|v| Pattern::parse_filter(v).map_err(|msg| ParseError { at, msg }))
                    .collect::<R<_>>()?,
                _ => Vec::new(),
            };
            stages.push(Stage::Line(LineFilter {
                op,
                values,
                res,
                patterns,
            }));
        }
        Ok(LogExpr { selector, stages })
    }

    fn extractions(&mut self) -> R<Vec<(String, String)>> {
        let mut out = Vec::new();
        while let Tok::Ident(name) = self.peek().clone() {
            if matches!(self.peek_at(1), Tok::Eq) {
                self.next();
                self.next();
                let expr = self.string("an extraction expression")?;
                out.push((name, expr));
            } else if matches!(
                self.peek_at(1),
                Tok::Comma | Tok::Pipe | Tok::Eof | Tok::RParen | Tok::LBracket
            ) || matches!(
                self.peek_at(1),
                Tok::PipeEq | Tok::PipeTilde | Tok::BangEq | Tok::BangTilde
            ) {
                self.next();
                out.push((name.clone(), name));
            } else {
                break;
            }
            if *self.peek() == Tok::Comma {
                self.next();
            } else {
                break;
            }
        }
        Ok(out)
    }

    fn stage(&mut self) -> R<Stage> {
        let at = self.at();
        let name = match self.peek().clone() {
            Tok::Ident(n) => n,
            Tok::LParen => return Ok(Stage::Labels(self.label_filter()?)),
            t => {
                return self.err(format!(
                    "expected a parser, a formatter or a label filter after '|', found {}",
                    describe(&t)
                ));
            }
        };
        // `| json`, `| logfmt`: but `| json = "x"` would be a label filter on a
        // label named json.
        let is_stage = !matches!(
            self.peek_at(1),
            Tok::Eq
                | Tok::EqEq
                | Tok::BangEq
                | Tok::Gt
                | Tok::Ge
                | Tok::Lt
                | Tok::Le
                | Tok::EqTilde
                | Tok::BangTilde
        );
        if !is_stage {
            return Ok(Stage::Labels(self.label_filter()?));
        }
        self.next();
        let map_err = |msg: String| ParseError { at, msg };
        Ok(match name.as_str() {
            "json" => Stage::Json(self.extractions()?),
            "logfmt" => {
                // Flags: --strict, --keep-empty.
                while *self.peek() == Tok::Minus && *self.peek_at(1) == Tok::Minus {
                    self.next();
                    self.next();
                    self.ident("a logfmt flag")?;
                }
                Stage::Logfmt(self.extractions()?)
            }
            "regexp" => {
                let re = self.string("a regular expression")?;
                let r = Regex::new(&re).map_err(|e| map_err(format!("bad regex {re:?}: {e}")))?;
                if r.capture_names().flatten().next().is_none() {
                    return Err(map_err(format!(
                        "regexp {re:?} has no named group like (?P<name>…)"
                    )));
                }
                Stage::Regexp(r)
            }
            "pattern" => {
                Stage::Pattern(Pattern::parse(&self.string("a pattern")?).map_err(map_err)?)
            }
            "line_format" => {
                Stage::LineFormat(Template::parse(&self.string("a template")?).map_err(map_err)?)
            }
            "label_format" => {
                let mut out = Vec::new();
                loop {
                    let dst = self.ident("a label name")?;
                    self.expect(Tok::Eq, "'='")?;
                    let src = match self.next() {
                        Tok::Ident(s) => LabelFormatSrc::Rename(s),
                        Tok::Str(s) => {
                            LabelFormatSrc::Template(Template::parse(&s).map_err(map_err)?)
                        }
                        _ => return self.err("expected a label name or a template string"),
                    };
                    out.push((dst, src));
                    if *self.peek() == Tok::Comma {
                        self.next();
                    } else {
                        break;
                    }
                }
                Stage::LabelFormat(out)
            }
            "drop" | "keep" => {
                let mut ms = Vec::new();
                loop {
                    if matches!(
                        self.peek_at(1),
                        Tok::Eq | Tok::BangEq | Tok::EqTilde | Tok::BangTilde
                    ) {
                        ms.push(self.matcher()?);
                    } else {
                        let n = self.ident("a label name")?;
                        ms.push(Matcher {
                            name: n,
                            op: MatchOp::Re,
                            value: ".*".into(),
                            re: Some(anchored("(?s:.*)").expect("valid")),
                        });
                    }
                    if *self.peek() == Tok::Comma {
                        self.next();
                    } else {
                        break;
                    }
                }
                if name == "drop" {
                    Stage::Drop(ms)
                } else {
                    Stage::Keep(ms)
                }
            }
            "unwrap" => {
                let first = self.ident("a label to unwrap")?;
                if *self.peek() == Tok::LParen {
                    let conv = match first.as_str() {
                        "duration" | "duration_seconds" => Conv::Duration,
                        "bytes" => Conv::Bytes,
                        f => {
                            return Err(map_err(format!(
                                "unknown unwrap conversion {f:?} (duration, duration_seconds, bytes)"
                            )));
                        }
                    };
                    self.next();
                    let label = self.ident("a label to unwrap")?;
                    self.expect(Tok::RParen, "')'")?;
                    Stage::Unwrap { label, conv }
                } else {
                    Stage::Unwrap {
                        label: first,
                        conv: Conv::None,
                    }
                }
            }
            "decolorize" => Stage::Decolorize,
            other => {
                return Err(map_err(format!(
                    "unknown stage {other:?} (json, logfmt, regexp, pattern, line_format, label_format, drop, keep, unwrap, decolorize, or a label filter like status >= 500)"
                )));
            }
        })
    }

    /// `a > 1 and (b = "x" or c != "y"), d < 5ms`: `,` and `and` bind tighter than `or`.
    fn label_filter(&mut self) -> R<LabelFilter> {
        let mut lhs = self.label_and()?;
        while self.is_kw("or") {
            self.next();
            let rhs = self.label_and()?;
            lhs = LabelFilter::Or(Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn label_and(&mut self) -> R<LabelFilter> {
        let mut lhs = self.label_cmp()?;
        while self.is_kw("and")
            || (*self.peek() == Tok::Comma
                && matches!(self.peek_at(1), Tok::Ident(_) | Tok::LParen))
        {
            self.next();
            let rhs = self.label_cmp()?;
            lhs = LabelFilter::And(Box::new(lhs), Box::new(rhs));
        }
        Ok(lhs)
    }

    fn label_cmp(&mut self) -> R<LabelFilter> {
        if *self.peek() == Tok::LParen {
            self.next();
            let f = self.label_filter()?;
            self.expect(Tok::RParen, "')'")?;
            return Ok(f);
        }
        let name = self.ident("a label name")?;
        let op = match self.next() {
            Tok::Eq | Tok::EqEq => CmpOp::Eq,
            Tok::BangEq => CmpOp::Ne,
            Tok::Gt => CmpOp::Gt,
            Tok::Ge => CmpOp::Ge,
            Tok::Lt => CmpOp::Lt,
            Tok::Le => CmpOp::Le,
            Tok::EqTilde => CmpOp::Re,
            Tok::BangTilde => CmpOp::Nre,
            t => {
                return self.err(format!(
                    "expected a comparison after {name:?}, found {}",
                    describe(&t)
                ));
            }
        };
        let at = self.at();
        let value = match self.next() {
            Tok::Str(s) => Value::Str(s),
            Tok::Num(v) => Value::Num(v),
            Tok::Minus => match self.next() {
                Tok::Num(v) => Value::Num(-v),
                _ => return self.err("expected a number after '-'"),
            },
            Tok::Dur(d) => Value::Dur(d),
            Tok::Bytes(b) => Value::Bytes(b),
            t => {
                return self.err(format!(
                    "expected a value to compare {name:?} with, found {}",
                    describe(&t)
                ));
            }
        };
        let re = match (op, &value) {
            (CmpOp::Re | CmpOp::Nre, Value::Str(s)) => {
                Some(anchored(s).map_err(|msg| ParseError { at, msg })?)
            }
            (CmpOp::Re | CmpOp::Nre, _) => {
                return Err(ParseError {
                    at,
                    msg: "=~ and !~ take a quoted regex".into(),
                });
            }
            _ => None,
        };
        if matches!(value, Value::Str(_))
            && matches!(op, CmpOp::Gt | CmpOp::Ge | CmpOp::Lt | CmpOp::Le)
        {
            return Err(ParseError {
                at,
                msg: format!(
                    "{name:?}: <, <=, >, >= compare numbers, durations or sizes, not strings"
                ),
            });
        }
        Ok(LabelFilter::Cmp {
            name,
            op,
            value,
            re,
        })
    }
}

pub fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("{s:?}"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Num(v) => format!("number {v}"),
        Tok::Dur(_) => "a duration".into(),
        Tok::Bytes(_) => "a size".into(),
        Tok::Eof => "the end of the query".into(),
        other => format!("{other:?}"),
    }
}
