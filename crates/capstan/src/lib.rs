//! Capstan: deploy an application's services on one machine and watch them.
//!
//! The binary is thin (`main.rs`); this library holds the stack file model, the
//! supervisor, the daemon's API and the CLI.
#![forbid(unsafe_code)]

pub mod alerting;
pub mod api;
pub mod autoscale;
pub mod cli;
pub mod client;
pub mod collect;
pub mod daemon;
pub mod events;
pub mod export;
pub mod exposition;
pub mod forward;
pub mod ingest;
pub mod logs;
pub mod notify;
pub mod probe;
pub mod proxy;
pub mod scrape;
pub mod spec;
pub mod state;
pub mod supervisor;
pub mod traceql;
pub mod traces;
