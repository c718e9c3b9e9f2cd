//! The LogQL syntax tree.

use regex::Regex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Eq,
    Ne,
    Re,
    Nre,
}

/// A label matcher of a stream selector or a `drop`/`keep` stage.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    /// Fully anchored, for `=~` and `!~`.
    pub re: Option<Regex>,
}

impl Matcher {
    pub fn matches(&self, v: &str) -> bool {
        match self.op {
            MatchOp::Eq => v == self.value,
            MatchOp::Ne => v != self.value,
            MatchOp::Re => self.re.as_ref().is_some_and(|r| r.is_match(v)),
            MatchOp::Nre => !self.re.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    /// `|=`
    Contains,
    /// `!=`
    NotContains,
    /// `|~`
    Match,
    /// `!~`
    NotMatch,
    /// `|>` (pattern)
    Pattern,
    /// `!>`
    NotPattern,
}

/// A line filter; `or` alternatives (`|= "a" or "b"`) are any-of.
#[derive(Debug, Clone)]
pub struct LineFilter {
    pub op: FilterOp,
    pub values: Vec<String>,
    /// Compiled once: the regexes of `|~`/`!~`, the patterns of `|>`/`!>`.
    pub res: Vec<Regex>,
    pub patterns: Vec<super::pattern::Pattern>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Re,
    Nre,
}

#[derive(Debug, Clone)]
pub enum Value {
    Num(f64),
    /// Nanoseconds.
    Dur(i64),
    Bytes(f64),
    Str(String),
}

/// A label filter expression: `status >= 500 and level = "error"`.
#[derive(Debug, Clone)]
pub enum LabelFilter {
    Cmp {
        name: String,
        op: CmpOp,
        value: Value,
        re: Option<Regex>,
    },
    And(Box<LabelFilter>, Box<LabelFilter>),
    Or(Box<LabelFilter>, Box<LabelFilter>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv {
    /// Plain number.
    None,
    /// `duration(label)` / `duration_seconds(label)`: to seconds.
    Duration,
    /// `bytes(label)`.
    Bytes,
}

#[derive(Debug, Clone)]
pub enum Stage {
    Line(LineFilter),
    /// `json` with optional `label="expression"` extractions.
    Json(Vec<(String, String)>),
    /// `logfmt` with optional extractions.
    Logfmt(Vec<(String, String)>),
    Regexp(Regex),
    Pattern(super::pattern::Pattern),
    Labels(LabelFilter),
    LineFormat(super::template::Template),
    /// `label_format dst=src` (rename) or `dst="template"`.
    LabelFormat(Vec<(String, LabelFormatSrc)>),
    /// Matchers, or bare names (`drop a, b="x"`).
    Drop(Vec<Matcher>),
    Keep(Vec<Matcher>),
    Unwrap {
        label: String,
        conv: Conv,
    },
    Decolorize,
}

#[derive(Debug, Clone)]
pub enum LabelFormatSrc {
    Rename(String),
    Template(super::template::Template),
}

#[derive(Debug, Clone)]
pub struct LogExpr {
    pub selector: Vec<Matcher>,
    pub stages: Vec<Stage>,
}

impl LogExpr {
    /// Substrings every matching line contains (the `|=` filters before any
    /// stage that changes the line), for the store's block filters.
    pub fn required_substrings(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for s in &self.stages {
            match s {
                Stage::Line(f) if f.op == FilterOp::Contains && f.values.len() == 1 => {
                    out.push(f.values[0].as_bytes().to_vec())
                }
                Stage::LineFormat(_) | Stage::Decolorize => break,
                _ => {}
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeFn {
    CountOverTime,
    Rate,
    BytesOverTime,
    BytesRate,
    AbsentOverTime,
    SumOverTime,
    AvgOverTime,
    MinOverTime,
    MaxOverTime,
    FirstOverTime,
    LastOverTime,
    StdvarOverTime,
    StddevOverTime,
    QuantileOverTime,
    RateCounter,
}

impl RangeFn {
    pub fn from_name(n: &str) -> Option<RangeFn> {
        use RangeFn::*;
        Some(match n {
            "count_over_time" => CountOverTime,
            "rate" => Rate,
            "bytes_over_time" => BytesOverTime,
            "bytes_rate" => BytesRate,
            "absent_over_time" => AbsentOverTime,
            "sum_over_time" => SumOverTime,
            "avg_over_time" => AvgOverTime,
            "min_over_time" => MinOverTime,
            "max_over_time" => MaxOverTime,
            "first_over_time" => FirstOverTime,
            "last_over_time" => LastOverTime,
            "stdvar_over_time" => StdvarOverTime,
            "stddev_over_time" => StddevOverTime,
            "quantile_over_time" => QuantileOverTime,
            "rate_counter" => RateCounter,
            _ => return None,
        })
    }

    /// Functions over unwrapped values (need `| unwrap`); `rate` takes either.
    pub fn needs_unwrap(self) -> bool {
        use RangeFn::*;
        matches!(
            self,
            SumOverTime
                | AvgOverTime
                | MinOverTime
                | MaxOverTime
                | FirstOverTime
                | LastOverTime
                | StdvarOverTime
                | StddevOverTime
                | QuantileOverTime
                | RateCounter
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Stddev,
    Stdvar,
    Topk,
    Bottomk,
    Sort,
    SortDesc,
}

impl AggOp {
    pub fn from_name(n: &str) -> Option<AggOp> {
        use AggOp::*;
        Some(match n {
            "sum" => Sum,
            "avg" => Avg,
            "min" => Min,
            "max" => Max,
            "count" => Count,
            "stddev" => Stddev,
            "stdvar" => Stdvar,
            "topk" => Topk,
            "bottomk" => Bottomk,
            "sort" => Sort,
            "sort_desc" => SortDesc,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grouping {
    By(Vec<String>),
    Without(Vec<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    And,
    Or,
    Unless,
}

#[derive(Debug, Clone)]
pub enum MetricExpr {
    Range {
        func: RangeFn,
        param: Option<f64>,
        log: LogExpr,
        range_ns: i64,
        offset_ns: i64,
        grouping: Option<Grouping>,
    },
    Agg {
        op: AggOp,
        param: Option<f64>,
        grouping: Option<Grouping>,
        inner: Box<MetricExpr>,
    },
    Binary {
        op: BinOp,
        bool_modifier: bool,
        lhs: Box<MetricExpr>,
        rhs: Box<MetricExpr>,
    },
    Number(f64),
}

#[derive(Debug, Clone)]
pub enum Expr {
    Log(LogExpr),
    Metric(MetricExpr),
}
