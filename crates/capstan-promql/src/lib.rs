//! PromQL for capstan: an evaluator of Prometheus 3's query language over a
//! storage trait ([`Storage`], implemented by capstan-tsdb and by an in-memory
//! store), and a runner for Prometheus' promqltest scripts ([`runner`]).
#![forbid(unsafe_code)]

mod aggregate;
mod binary;
mod engine;
mod functions;
pub mod fuzzing;
pub mod limits;
pub mod mathx;
mod position;
pub mod promqltest;
pub mod runner;
mod storage;
mod value;

pub use engine::{Engine, EngineOptions, parse};
pub use promql_parser;

/// A vector selector's matchers as storage matchers (several sets for `or` selectors).
pub fn selector_matchers(
    vs: &promql_parser::parser::VectorSelector,
) -> Result<Vec<Vec<capstan_tsdb::Matcher>>, Error> {
    engine::matcher_sets(vs)
}
pub use storage::{MemPoint, MemStorage, Selected, Storage};
pub use value::{Error, QueryOutput, QueryValue, Sample, Series, Stats, Value};
