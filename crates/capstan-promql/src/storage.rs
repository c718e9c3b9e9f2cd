//! The storage the evaluator reads: a trait, capstan-tsdb's implementation, and an
//! in-memory store for tests and the promqltest runner.

use std::collections::BTreeMap;

use capstan_tsdb::{Labels, Matcher};

/// Appends a series' samples in the selected range to the vector, in time order.
pub type Loader<'a> = Box<dyn FnOnce(&mut Vec<(i64, f64)>) + 'a>;

/// One selected series; its samples are read when the evaluator gets to it.
pub struct Selected<'a> {
    pub labels: Labels,
    pub load: Loader<'a>,
    /// The series holds native histogram samples in the range: the evaluator
    /// refuses such data rather than answer with wrong numbers.
    pub has_histograms: bool,
}

pub trait Storage: Sync {
    /// Series every matcher selects that may have samples in `[mint, maxt]`, in
    /// label order; their samples limited to that range.
    fn select(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>>;

    /// Like `select`, for a caller that uses only each series' last sample in the
    /// range: a store may load just that one.
    fn select_last(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>> {
        self.select(matchers, mint, maxt)
    }
}

fn from_db<'a>(found: Vec<capstan_tsdb::SeriesData>) -> Vec<Selected<'a>> {
    found
        .into_iter()
        .map(|mut s| Selected {
            labels: std::mem::take(&mut s.labels),
            load: Box::new(move |out: &mut Vec<(i64, f64)>| s.read_into(out)),
            has_histograms: false,
        })
        .collect()
}

impl Storage for capstan_tsdb::Db {
    fn select(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>> {
        from_db(capstan_tsdb::Db::select(self, matchers, mint, maxt))
    }

    fn select_last(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>> {
        from_db(capstan_tsdb::Db::select_last(self, matchers, mint, maxt))
    }
}

/// A point of the in-memory store.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemPoint {
    Float(f64),
    /// A native histogram sample; only its presence is kept.
    Histogram,
}

/// Series kept in memory, in label order. Used by tests and the promqltest runner.
#[derive(Default)]
pub struct MemStorage {
    series: BTreeMap<Labels, Vec<(i64, MemPoint)>>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Adds a sample; a sample at a time the series already has replaces it.
    pub fn add(&mut self, labels: &Labels, t: i64, p: MemPoint) {
        let s = self.series.entry(labels.clone()).or_default();
        match s.binary_search_by_key(&t, |x| x.0) {
            Ok(i) => s[i].1 = p,
            Err(i) => s.insert(i, (t, p)),
        }
    }

    pub fn clear(&mut self) {
        self.series.clear();
    }
}

impl Storage for MemStorage {
    fn select(&self, matchers: &[Matcher], mint: i64, maxt: i64) -> Vec<Selected<'_>> {
        self.series
            .iter()
            .filter(|(l, _)| {
                matchers
                    .iter()
                    .all(|m| m.matches(l.get(&m.name).unwrap_or("")))
            })
            .filter_map(|(l, pts)| {
                let lo = pts.partition_point(|p| p.0 < mint);
                let hi = pts.partition_point(|p| p.0 <= maxt);
                let pts = &pts[lo..hi];
                if pts.is_empty() {
                    return None;
                }
                let has_histograms = pts.iter().any(|p| p.1 == MemPoint::Histogram);
                Some(Selected {
                    labels: l.clone(),
                    load: Box::new(move |out: &mut Vec<(i64, f64)>| {
                        out.extend(pts.iter().filter_map(|(t, p)| match p {
                            MemPoint::Float(v) => Some((*t, *v)),
                            MemPoint::Histogram => None,
                        }))
                    }),
                    has_histograms,
                })
            })
            .collect()
    }
}
