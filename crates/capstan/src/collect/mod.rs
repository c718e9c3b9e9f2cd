//! Collectors that expose what capstan knows in the exposition format, scraped
//! into the tsdb like any target: the host (`/metrics/node`, node_exporter names),
//! and capstan itself with its replicas' resources (`/metrics`, cAdvisor names for
//! replicas, `capstan_*` for its own state).

pub mod node;
pub mod own;

pub use crate::exposition::Exposition;
