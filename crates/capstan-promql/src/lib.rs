//! PromQL for capstan: the evaluator over a storage trait, and a runner for
//! Prometheus' promqltest scripts.
//!
//! Built so far: the promqltest script parser ([`promqltest`]). The evaluator
//! comes next (issue 4).
#![forbid(unsafe_code)]

pub mod promqltest;
