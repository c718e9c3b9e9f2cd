//! Label sets and matchers.

use std::fmt;
use std::sync::Arc;

/// A series' identity: label pairs sorted by name, names unique, `__name__` included.
#[derive(Debug, Clone, Default)]
pub struct Labels(Vec<(Arc<str>, Arc<str>)>);

impl std::hash::Hash for Labels {
    /// By content, as equality is.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

/// Interned strings compare by pointer first (no byte comparison when equal).
fn cmp_str(a: &Arc<str>, b: &Arc<str>) -> std::cmp::Ordering {
    if Arc::ptr_eq(a, b) {
        std::cmp::Ordering::Equal
    } else {
        a.cmp(b)
    }
}

impl PartialEq for Labels {
    fn eq(&self, o: &Labels) -> bool {
        self.0.len() == o.0.len()
            && self.0.iter().zip(&o.0).all(|(a, b)| {
                (Arc::ptr_eq(&a.0, &b.0) || a.0 == b.0) && (Arc::ptr_eq(&a.1, &b.1) || a.1 == b.1)
            })
    }
}

impl Eq for Labels {}

impl Ord for Labels {
    /// Pair by pair, name then value, as the pairs' own order would.
    fn cmp(&self, o: &Labels) -> std::cmp::Ordering {
        for (a, b) in self.0.iter().zip(&o.0) {
            let c = cmp_str(&a.0, &b.0).then_with(|| cmp_str(&a.1, &b.1));
            if c.is_ne() {
                return c;
            }
        }
        self.0.len().cmp(&o.0.len())
    }
}

impl PartialOrd for Labels {
    fn partial_cmp(&self, o: &Labels) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Labels {
    /// Sorts the pairs by name; a later duplicate name wins; empty values are dropped
    /// (an empty label value means "no label", as in Prometheus).
    pub fn new(mut pairs: Vec<(String, String)>) -> Labels {
        pairs.retain(|(_, v)| !v.is_empty());
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|a, b| a.0 == b.0);
        Labels(
            pairs
                .into_iter()
                .map(|(n, v)| (Arc::from(n), Arc::from(v)))
                .collect(),
        )
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Labels {
        Labels::new(
            pairs
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// Builds labels from pairs already sorted by name with unique names and no
    /// empty values (the caller keeps the invariant; shared strings stay shared).
    pub fn from_sorted(pairs: Vec<(Arc<str>, Arc<str>)>) -> Labels {
        debug_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
        Labels(pairs)
    }

    /// The pairs, sorted by name.
    pub fn pairs(&self) -> &[(Arc<str>, Arc<str>)] {
        &self.0
    }

    /// The same labels without the ones `drop` names.
    pub fn without(&self, drop: impl Fn(&str) -> bool) -> Labels {
        Labels(self.0.iter().filter(|(n, _)| !drop(n)).cloned().collect())
    }

    /// The same labels with `name` set to `value` (removed when `value` is empty).
    pub fn with(&self, name: &str, value: &str) -> Labels {
        let mut v = self.0.clone();
        match v.binary_search_by(|(n, _)| (**n).cmp(name)) {
            Ok(i) if value.is_empty() => {
                v.remove(i);
            }
            Ok(i) => v[i].1 = Arc::from(value),
            Err(_) if value.is_empty() => {}
            Err(i) => v.insert(i, (Arc::from(name), Arc::from(value))),
        }
        Labels(v)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (&**n, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same labels with every string taken from (or added to) `symbols`, so
    /// that series share their names and values in memory.
    pub fn interned(&self, symbols: &mut crate::fxhash::FxHashSet<Arc<str>>) -> Labels {
        let mut get = |s: &Arc<str>| match symbols.get(s) {
            Some(x) => x.clone(),
            None => {
                symbols.insert(s.clone());
                s.clone()
            }
        };
        Labels(self.0.iter().map(|(n, v)| (get(n), get(v))).collect())
    }

    /// A 64-bit hash of the pairs, stable across runs.
    pub fn hash64(&self) -> u64 {
        use std::hash::Hasher;
        let mut h = crate::fxhash::FxHasher::default();
        for (n, v) in &self.0 {
            // Each string then its length, so ("ab","c") and ("a","bc") differ.
            for s in [n.as_bytes(), v.as_bytes()] {
                h.write(s);
                h.write_usize(s.len());
            }
        }
        h.finish()
    }
}

impl fmt::Display for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.get("__name__").unwrap_or("");
        f.write_str(name)?;
        f.write_str("{")?;
        let mut first = true;
        for (n, v) in self.iter().filter(|(n, _)| *n != "__name__") {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            write!(f, "{n}={v:?}")?;
        }
        f.write_str("}")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatchOp {
    Equal,
    NotEqual,
    Regex,
    NotRegex,
}

/// A label matcher as PromQL writes it: `name="v"`, `!=`, `=~`, `!~`. Regexes are
/// fully anchored, as in Prometheus.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    pub op: MatchOp,
    pub value: String,
    re: Option<regex::Regex>,
    /// A regex of a common simple shape, matched without the regex engine.
    fast: Option<Fast>,
}

/// Simple regex shapes (the regex is anchored, and `.` matches any character).
#[derive(Debug, Clone, PartialEq)]
enum Fast {
    /// `lit`, or `a|b|c`.
    Set(Vec<String>),
    /// `lit.*`
    Prefix(String),
    /// `.*lit`
    Suffix(String),
    /// `.*lit.*`
    Contains(String),
}

impl Fast {
    fn of(pattern: &str) -> Option<Fast> {
        let literal = |s: &str| !s.bytes().any(|b| b"\\.+*?()|[]{}^$".contains(&b));
        let (head, rest) = match pattern.strip_prefix(".*") {
            Some(r) => (true, r),
            None => (false, pattern),
        };
        let (tail, core) = match rest.strip_suffix(".*") {
            Some(c) => (true, c),
            None => (false, rest),
        };
        match (head, tail) {
            (false, false) => {
                let parts: Vec<&str> = pattern.split('|').collect();
                parts
                    .iter()
                    .all(|p| literal(p))
                    .then(|| Fast::Set(parts.iter().map(|p| p.to_string()).collect()))
            }
            _ if !literal(core) => None,
            (false, true) => Some(Fast::Prefix(core.to_owned())),
            (true, false) => Some(Fast::Suffix(core.to_owned())),
            (true, true) => Some(Fast::Contains(core.to_owned())),
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Fast::Set(set) => set.iter().any(|x| x == v),
            Fast::Prefix(p) => v.starts_with(p.as_str()),
            Fast::Suffix(p) => v.ends_with(p.as_str()),
            Fast::Contains(p) => v.contains(p.as_str()),
        }
    }
}

impl Matcher {
    pub fn new(name: &str, op: MatchOp, value: &str) -> Result<Matcher, regex::Error> {
        let regex = matches!(op, MatchOp::Regex | MatchOp::NotRegex);
        // A simple shape needs no compiled regex (compiling costs more than
        // most queries' matching).
        let fast = if regex { Fast::of(value) } else { None };
        let re = if regex && fast.is_none() {
            Some(regex::Regex::new(&format!("^(?s:{value})$"))?)
        } else {
            None
        };
        Ok(Matcher {
            name: name.to_owned(),
            op,
            value: value.to_owned(),
            fast,
            re,
        })
    }

    /// A regex matcher from an already compiled, already anchored regex.
    pub fn with_regex(name: &str, negate: bool, value: &str, re: regex::Regex) -> Matcher {
        Matcher {
            name: name.to_owned(),
            op: if negate {
                MatchOp::NotRegex
            } else {
                MatchOp::Regex
            },
            value: value.to_owned(),
            re: Some(re),
            fast: Fast::of(value),
        }
    }

    pub fn eq(name: &str, value: &str) -> Matcher {
        Matcher {
            name: name.to_owned(),
            op: MatchOp::Equal,
            value: value.to_owned(),
            re: None,
            fast: None,
        }
    }

    /// Whether a label value (empty when the label is absent) matches.
    pub fn matches(&self, v: &str) -> bool {
        match self.op {
            MatchOp::Equal => v == self.value,
            MatchOp::NotEqual => v != self.value,
            MatchOp::Regex | MatchOp::NotRegex => {
                let m = match &self.fast {
                    Some(f) => f.matches(v),
                    None => self.re.as_ref().is_some_and(|r| r.is_match(v)),
                };
                m == (self.op == MatchOp::Regex)
            }
        }
    }

    /// Whether the matcher also selects series that lack the label.
    pub fn matches_empty(&self) -> bool {
        self.matches("")
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The hand-written order and equality are those of the pairs.
        #[test]
        fn order_is_the_pairs_order(a in prop::collection::vec(("[ab]{0,2}", "[ab]{0,2}"), 0..4),
                                    b in prop::collection::vec(("[ab]{0,2}", "[ab]{0,2}"), 0..4)) {
            let la = Labels(a.iter().map(|(n, v)| (Arc::from(n.as_str()), Arc::from(v.as_str()))).collect());
            let lb = Labels(b.iter().map(|(n, v)| (Arc::from(n.as_str()), Arc::from(v.as_str()))).collect());
            prop_assert_eq!(la.cmp(&lb), a.cmp(&b));
            prop_assert_eq!(la == lb, a == b);
            prop_assert_eq!(la.cmp(&la.clone()), std::cmp::Ordering::Equal);
        }
    }
}

#[cfg(test)]
mod fast_regex_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shapes() {
        assert_eq!(
            Fast::of("a|bc"),
            Some(Fast::Set(vec!["a".into(), "bc".into()]))
        );
        assert_eq!(Fast::of("host-1.*"), Some(Fast::Prefix("host-1".into())));
        assert_eq!(Fast::of(".*:9100"), Some(Fast::Suffix(":9100".into())));
        assert_eq!(Fast::of(".*err.*"), Some(Fast::Contains("err".into())));
        assert_eq!(Fast::of("5.."), None);
        assert_eq!(Fast::of("a\\.b"), None);
        assert_eq!(Fast::of("(?i)a"), None);
    }

    proptest! {
        /// Wherever a fast path applies, it agrees with the regex engine.
        #[test]
        fn fast_paths_agree_with_the_regex(
            pattern in "(\\.\\*)?[ab.|*+]{0,4}(\\.\\*)?",
            values in prop::collection::vec("[ab\n.|*]{0,5}", 1..8),
        ) {
            let Ok(m) = Matcher::new("x", MatchOp::Regex, &pattern) else {
                return Ok(());
            };
            let re = regex::Regex::new(&format!("^(?s:{pattern})$")).unwrap();
            for v in &values {
                prop_assert_eq!(m.matches(v), re.is_match(v), "{:?} on {:?}", pattern, v);
            }
            let n = Matcher::new("x", MatchOp::NotRegex, &pattern).unwrap();
            for v in &values {
                prop_assert_eq!(n.matches(v), !re.is_match(v));
            }
        }
    }
}
