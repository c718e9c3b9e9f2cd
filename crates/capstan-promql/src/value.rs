//! Values flowing through the evaluator, query results and errors.

use capstan_tsdb::Labels;

/// A series evaluated over the query's steps (or, in a range vector, its raw samples).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub labels: Labels,
    /// `(timestamp ms, value)` in time order.
    pub points: Vec<(i64, f64)>,
    /// The metric name is to be removed at the end of evaluation (Prometheus 3's
    /// delayed name removal); always false when the engine removes names at once.
    pub drop_name: bool,
}

impl Series {
    pub fn new(labels: Labels, points: Vec<(i64, f64)>) -> Series {
        Series {
            labels,
            points,
            drop_name: false,
        }
    }
}

/// The value of an expression over all steps of an evaluation.
#[derive(Debug, Clone)]
pub enum Value {
    /// One value per step.
    Scalar(Vec<f64>),
    String(String),
    /// An instant vector: each series has at most one point per step, at the step's time.
    Vector(Vec<Series>),
    /// A range vector (only at the top of an instant query).
    Matrix(Vec<Series>),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Scalar(_) => "scalar",
            Value::String(_) => "string",
            Value::Vector(_) => "vector",
            Value::Matrix(_) => "matrix",
        }
    }

    pub(crate) fn points(&self) -> usize {
        match self {
            Value::Scalar(v) => v.len(),
            Value::String(_) => 0,
            Value::Vector(s) | Value::Matrix(s) => s.iter().map(|s| s.points.len()).sum(),
        }
    }
}

/// One sample of an instant vector result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub t: i64,
    pub v: f64,
}

/// A query's result, shaped as the Prometheus API returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryValue {
    Scalar(i64, f64),
    String(i64, String),
    Vector(Vec<Sample>),
    Matrix(Vec<Series>),
}

impl QueryValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            QueryValue::Scalar(..) => "scalar",
            QueryValue::String(..) => "string",
            QueryValue::Vector(_) => "vector",
            QueryValue::Matrix(_) => "matrix",
        }
    }
}

/// What evaluating a query cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Samples read from storage, counted once per step they were used in.
    pub total_samples: u64,
    /// The most samples held in memory at once.
    pub peak_samples: u64,
    /// Time spent parsing and evaluating.
    pub exec_seconds: f64,
}

/// A query's outcome: the value, the annotations, the cost.
#[derive(Debug, Clone)]
pub struct QueryOutput {
    pub value: QueryValue,
    pub warnings: Vec<String>,
    pub infos: Vec<String>,
    pub stats: Stats,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The expression does not parse, or is not valid PromQL.
    #[error("{0}")]
    Parse(String),
    /// Evaluation failed (many-to-many matching, duplicate label sets, …).
    #[error("{0}")]
    Execution(String),
    #[error("query processing would load too many samples into memory in {0}")]
    TooManySamples(&'static str),
    #[error("query timed out in {0}")]
    Timeout(&'static str),
    #[error("query was canceled in {0}")]
    Canceled(&'static str),
    #[error("query processing would take more than the {mib} MiB memory budget of a query in {0}", mib = .1 >> 20)]
    OverBudget(&'static str, usize),
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// The Prometheus API's `errorType` for this error.
    pub fn error_type(&self) -> &'static str {
        match self {
            Error::Parse(_) => "bad_data",
            Error::Execution(_)
            | Error::TooManySamples(_)
            | Error::OverBudget(..)
            | Error::Unsupported(_) => "execution",
            Error::Timeout(_) => "timeout",
            Error::Canceled(_) => "canceled",
        }
    }
}

pub(crate) fn exec(msg: impl Into<String>) -> Error {
    Error::Execution(msg.into())
}
