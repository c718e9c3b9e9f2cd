//! The inverted index: label name → value → postings (sorted series ids).

use std::collections::BTreeMap;

use crate::fxhash::FxHashMap;

use crate::labels::{MatchOp, Matcher};

pub type SeriesId = u32;

#[derive(Default)]
pub struct Index {
    /// name → value → sorted ids.
    postings: FxHashMap<Box<str>, BTreeMap<Box<str>, Vec<SeriesId>>>,
    /// Every id, sorted (ids are handed out in increasing order).
    all: Vec<SeriesId>,
}

fn intersect(a: &[SeriesId], b: &[SeriesId]) -> Vec<SeriesId> {
    let (mut i, mut j, mut out) = (0, 0, Vec::with_capacity(a.len().min(b.len())));
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

fn subtract(a: &[SeriesId], b: &[SeriesId]) -> Vec<SeriesId> {
    let mut j = 0;
    let mut out = Vec::with_capacity(a.len());
    for &x in a {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j >= b.len() || b[j] != x {
            out.push(x);
        }
    }
    out
}

fn union(lists: Vec<&Vec<SeriesId>>) -> Vec<SeriesId> {
    let mut out: Vec<SeriesId> = lists.into_iter().flatten().copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

impl Index {
    /// Adds a series; ids must be added in increasing order.
    pub fn add<'a>(&mut self, id: SeriesId, labels: impl Iterator<Item = (&'a str, &'a str)>) {
        self.all.push(id);
        for (n, v) in labels {
            // Keys are allocated only for names and values not seen before.
            let values = match self.postings.get_mut(n) {
                Some(v) => v,
                None => self.postings.entry(n.into()).or_default(),
            };
            match values.get_mut(v) {
                Some(ids) => ids.push(id),
                None => {
                    values.insert(v.into(), vec![id]);
                }
            }
        }
    }

    pub fn series_count(&self) -> usize {
        self.all.len()
    }

    /// Ids of the series all matchers select, sorted. Equality and regex matchers
    /// that cannot match the empty value narrow the candidates through the
    /// postings; the others subtract from them.
    pub fn select(&self, matchers: &[Matcher]) -> Vec<SeriesId> {
        let mut result: Option<Vec<SeriesId>> = None;
        let mut exclude: Vec<&Matcher> = Vec::new();
        // Positive matchers first, most selective (fewest values) first is good enough.
        for m in matchers {
            if m.matches_empty() {
                exclude.push(m);
                continue;
            }
            let ids = self.ids_matching(m);
            result = Some(match result {
                None => ids,
                Some(r) => intersect(&r, &ids),
            });
            if result.as_ref().is_some_and(Vec::is_empty) {
                return Vec::new();
            }
        }
        let mut ids = result.unwrap_or_else(|| self.all.clone());
        for m in exclude {
            // Series that carry the label with a value the matcher rejects go.
            let Some(values) = self.postings.get(m.name.as_str()) else {
                continue;
            };
            let rejected = union(
                values
                    .iter()
                    .filter(|(v, _)| !m.matches(v))
                    .map(|(_, p)| p)
                    .collect(),
            );
            ids = subtract(&ids, &rejected);
        }
        ids
    }

    /// Ids of series whose label `m.name` has a value `m` matches (label present).
    fn ids_matching(&self, m: &Matcher) -> Vec<SeriesId> {
        let Some(values) = self.postings.get(m.name.as_str()) else {
            return Vec::new();
        };
        match m.op {
            MatchOp::Equal => values.get(m.value.as_str()).cloned().unwrap_or_default(),
            _ => union(
                values
                    .iter()
                    .filter(|(v, _)| m.matches(v))
                    .map(|(_, p)| p)
                    .collect(),
            ),
        }
    }

    pub fn label_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.postings.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    pub fn label_values(&self, name: &str) -> Vec<String> {
        self.postings
            .get(name)
            .map(|v| v.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Labels;
    use proptest::prelude::*;

    fn matcher() -> impl Strategy<Value = Matcher> {
        (
            prop::sample::select(vec!["a", "b", "c"]),
            0u8..4,
            prop::sample::select(vec!["", "x", "y", "z", "x|y", ".*", ".+", "x.*"]),
        )
            .prop_map(|(n, op, v)| {
                let op = [
                    MatchOp::Equal,
                    MatchOp::NotEqual,
                    MatchOp::Regex,
                    MatchOp::NotRegex,
                ][op as usize];
                Matcher::new(n, op, v).unwrap()
            })
    }

    proptest! {
        /// The index selects exactly what testing every series against every matcher selects.
        #[test]
        fn select_agrees_with_brute_force(
            series in prop::collection::vec(prop::collection::btree_map(prop::sample::select(vec!["a", "b", "c"]), prop::sample::select(vec!["x", "y", "z", "xx"]), 0..3), 0..40),
            matchers in prop::collection::vec(matcher(), 0..4),
        ) {
            let mut index = Index::default();
            let labels: Vec<Labels> = series.iter().map(|m| Labels::from_pairs(m.iter().map(|(k, v)| (*k, *v)))).collect();
            for (i, l) in labels.iter().enumerate() {
                index.add(i as u32, l.iter());
            }
            let want: Vec<u32> = labels
                .iter()
                .enumerate()
                .filter(|(_, l)| matchers.iter().all(|m| m.matches(l.get(&m.name).unwrap_or(""))))
                .map(|(i, _)| i as u32)
                .collect();
            prop_assert_eq!(index.select(&matchers), want);
        }
    }
}
