//! The OpenMetrics rules that span lines: metric families, their metadata, the
//! grouping of samples into metric points, and the histogram, summary, info and
//! stateset constraints.

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use crate::line::om_float;
use crate::{Entry, MetricType, Sample};

/// Sample name suffixes of each metric type (`""` is the family name itself).
fn suffixes(kind: MetricType) -> &'static [&'static str] {
    match kind {
        MetricType::Counter => &["_total", "_created"],
        MetricType::Gauge | MetricType::Unknown | MetricType::StateSet => &[""],
        MetricType::Summary => &["", "_count", "_sum", "_created"],
        MetricType::Histogram => &["_bucket", "_count", "_sum", "_created"],
        MetricType::GaugeHistogram => &["_bucket", "_gcount", "_gsum"],
        MetricType::Info => &["_info"],
    }
}

/// A fast 64-bit hash, enough to tell label sets apart.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    /// Mixes in a string eight bytes at a time (multiply-rotate, as FxHash does),
    /// then its length, so ("ab","c") and ("a","bc") differ.
    fn add(&mut self, s: &str) {
        let mix = |h: u64, w: u64| (h.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
        let b = s.as_bytes();
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.0 = mix(self.0, u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.0 = mix(self.0, u64::from_le_bytes(w));
        }
        self.0 = mix(self.0, b.len() as u64);
    }
}

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

#[derive(Default)]
struct Point {
    /// Hash of the labels other than `le`/`quantile` (and a stateset's own label).
    key: u64,
    buckets: Vec<(f64, f64)>,
    inf_bucket: Option<f64>,
    negative_bucket: bool,
    count: Option<f64>,
    sum: Option<f64>,
    /// Each series of the point (hash of name and all labels) → last timestamp.
    series: Vec<(u64, Option<i64>)>,
}

struct Family<'a> {
    name: &'a str,
    kind: MetricType,
    typed: bool,
    help: bool,
    unit: Option<&'a str>,
    sampled: bool,
    points_seen: HashSet<u64, BuildHasherDefault<Identity>>,
    point: Option<Point>,
}

#[derive(Default)]
pub(crate) struct Validator<'a> {
    families: HashSet<&'a str>,
    /// Sample names claimed by typed families.
    reserved: HashSet<String>,
    current: Option<Family<'a>>,
}

impl<'a> Validator<'a> {
    pub(crate) fn check(&mut self, e: &Entry<'a>) -> Result<(), String> {
        match e {
            Entry::Help { name, .. } => self.metadata(name, |f| {
                if std::mem::replace(&mut f.help, true) {
                    Err(format!("second # HELP for {}", f.name))
                } else {
                    Ok(())
                }
            }),
            Entry::Unit { name, unit } => self.metadata(name, |f| {
                if f.unit.replace(unit).is_some() {
                    return Err(format!("second # UNIT for {}", f.name));
                }
                check_unit(f)
            }),
            Entry::Type { name, kind } => {
                let kind = *kind;
                self.metadata(name, |f| {
                    if std::mem::replace(&mut f.typed, true) {
                        return Err(format!("second # TYPE for {}", f.name));
                    }
                    f.kind = kind;
                    check_unit(f)
                })?;
                // The family's sample names must not be taken by another family.
                for s in suffixes(kind) {
                    let sample_name = format!("{name}{s}");
                    if !s.is_empty() && self.families.contains(sample_name.as_str()) {
                        return Err(format!(
                            "the {} family {name} clashes with the family {sample_name}",
                            kind.as_str()
                        ));
                    }
                    self.reserved.insert(sample_name);
                }
                Ok(())
            }
            Entry::Sample(s) => self.sample(s),
        }
    }

    /// Applies metadata to the family `name`, starting it if needed.
    fn metadata(
        &mut self,
        name: &'a str,
        apply: impl FnOnce(&mut Family<'a>) -> Result<(), String>,
    ) -> Result<(), String> {
        if self.current.as_ref().is_none_or(|f| f.name != name) {
            self.start_family(name)?;
        }
        let f = self.current.as_mut().expect("started above");
        if f.sampled {
            return Err(format!("metadata for {name} after its samples"));
        }
        apply(f)
    }

    fn start_family(&mut self, name: &'a str) -> Result<(), String> {
        self.close_family()?;
        if !self.families.insert(name) || self.reserved.contains(name) {
            return Err(format!(
                "metric family {name} appears twice or clashes with another family's samples"
            ));
        }
        self.current = Some(Family {
            name,
            kind: MetricType::Unknown,
            typed: false,
            help: false,
            unit: None,
            sampled: false,
            points_seen: HashSet::default(),
            point: None,
        });
        Ok(())
    }

    fn close_family(&mut self) -> Result<(), String> {
        if let Some(mut f) = self.current.take()
            && let Some(p) = f.point.take()
        {
            close_point(&f, p)?;
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> Result<(), String> {
        self.close_family()
    }

    fn sample(&mut self, s: &Sample<'a>) -> Result<(), String> {
        let belongs = self.current.as_ref().and_then(|f| suffix_of(f, s.name));
        let suffix = match belongs {
            Some(x) => x,
            None => {
                self.start_family(s.name)?;
                ""
            }
        };
        let f = self.current.as_mut().expect("a family is current");
        f.sampled = true;
        let kind = f.kind;
        let fname = f.name;
        let bad = |what: &str| Err(format!("{}: {what}", s.name));
        // One pass over the labels: le, quantile, the point's key and the series' identity.
        let (mut le, mut quantile, mut has_own_label) = (None, None, false);
        let mut key = Fnv::new();
        let mut series = Fnv::new();
        series.add(s.name);
        for l in s.labels.iter() {
            let (n, val) = l.map_err(|e| e.message)?;
            series.add(n);
            series.add(&val);
            match n {
                "le" => le = Some(val),
                "quantile" => quantile = Some(val),
                _ if kind == MetricType::StateSet && n == fname => has_own_label = true,
                _ => {
                    key.add(n);
                    key.add(&val);
                }
            }
        }
        let (key, series) = (key.0, series.0);
        let v = s.value;
        let exemplar_ok = matches!(
            (kind, suffix),
            (MetricType::Counter, "_total")
                | (
                    MetricType::Histogram | MetricType::GaugeHistogram,
                    "_bucket"
                )
        );
        if s.exemplar.is_some() && !exemplar_ok {
            return bad("exemplars are allowed only on counter totals and histogram buckets");
        }
        match (kind, suffix) {
            (MetricType::Counter, "_total")
            | (MetricType::Histogram, "_count" | "_sum")
            | (MetricType::Summary, "_count" | "_sum")
            | (MetricType::GaugeHistogram, "_gcount")
                if v.is_nan() || v < 0.0 =>
            {
                return bad("must be a non-negative number");
            }
            (MetricType::GaugeHistogram, "_gsum") if v.is_nan() => return bad("must not be NaN"),
            (MetricType::Histogram | MetricType::GaugeHistogram, "_bucket") => {
                let Some(le) = &le else {
                    return bad("a bucket needs an le label");
                };
                if le_bound(le).is_nan() {
                    return bad("le must be a number");
                }
                if v.is_nan() || v < 0.0 {
                    return bad("bucket counts must be non-negative numbers");
                }
            }
            (MetricType::Summary, "") => {
                let Some(q) = quantile.as_deref().and_then(om_float) else {
                    return bad("a summary quantile needs a quantile label");
                };
                if !(0.0..=1.0).contains(&q) {
                    return bad("quantile must be between 0 and 1");
                }
                if v < 0.0 {
                    return bad("quantile values must not be negative");
                }
            }
            (MetricType::Info, _) if v != 1.0 => return bad("info values must be 1"),
            (MetricType::StateSet, _) => {
                if !has_own_label {
                    return bad("a stateset sample needs a label named after its family");
                }
                if v != 0.0 && v != 1.0 {
                    return bad("stateset values must be 0 or 1");
                }
            }
            _ => {}
        }
        if f.point.as_ref().is_none_or(|p| p.key != key) {
            if let Some(p) = f.point.take() {
                close_point(f, p)?;
            }
            if !f.points_seen.insert(key) {
                return bad("samples of one metric point must be together");
            }
            f.point = Some(Point {
                key,
                ..Point::default()
            });
        }
        let p = f.point.as_mut().expect("set above");
        match p.series.iter_mut().find(|(k, _)| *k == series) {
            Some((_, last)) => match (*last, s.timestamp_ms) {
                (Some(a), Some(b)) if b < a => return bad("timestamps must not go backwards"),
                (Some(_), None) | (None, Some(_)) => {
                    return bad("either every sample of a series has a timestamp or none");
                }
                (None, None) => return bad("a series without timestamps appears twice"),
                _ => *last = s.timestamp_ms,
            },
            None => p.series.push((series, s.timestamp_ms)),
        }
        match suffix {
            "_bucket" => {
                let le_text = le.as_deref().unwrap_or_default();
                let bound = le_bound(le_text);
                if le_text == "+Inf" {
                    p.inf_bucket = Some(v);
                }
                p.negative_bucket |= bound < 0.0;
                p.buckets.push((bound, v));
            }
            "_count" | "_gcount" => p.count = Some(v),
            "_sum" | "_gsum" => p.sum = Some(v),
            _ => {}
        }
        Ok(())
    }
}

/// The bound of a bucket: a fast path for plain numbers, NaN when invalid.
fn le_bound(le: &str) -> f64 {
    if le == "+Inf" {
        return f64::INFINITY;
    }
    om_float(le).unwrap_or(f64::NAN)
}

fn check_unit(f: &Family<'_>) -> Result<(), String> {
    let Some(unit) = f.unit.filter(|u| !u.is_empty()) else {
        return Ok(());
    };
    if matches!(f.kind, MetricType::Info | MetricType::StateSet) {
        return Err(format!("{} metrics have no unit", f.kind.as_str()));
    }
    if !f.name.ends_with(&format!("_{unit}")) {
        return Err(format!(
            "the name {} must end with _{unit}, its unit",
            f.name
        ));
    }
    Ok(())
}

/// Which suffix of family `f` a sample name has, if it is one of its samples.
fn suffix_of(f: &Family<'_>, name: &str) -> Option<&'static str> {
    let rest = name.strip_prefix(f.name)?;
    suffixes(f.kind).iter().copied().find(|s| *s == rest)
}

fn close_point(f: &Family<'_>, p: Point) -> Result<(), String> {
    let name = f.name;
    match f.kind {
        MetricType::Histogram | MetricType::GaugeHistogram => {
            let gauge = f.kind == MetricType::GaugeHistogram;
            let Some(inf) = p.inf_bucket else {
                return Err(format!(
                    "{name}: a histogram needs a bucket with le=\"+Inf\""
                ));
            };
            if p.buckets.windows(2).any(|w| w[1].0 <= w[0].0) {
                return Err(format!("{name}: buckets must be in increasing le order"));
            }
            if p.buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!("{name}: bucket counts must not decrease"));
            }
            match (p.count, p.sum) {
                (Some(_), None) | (None, Some(_)) => {
                    return Err(format!(
                        "{name}: {} and {} come together",
                        if gauge { "_gcount" } else { "_count" },
                        if gauge { "_gsum" } else { "_sum" }
                    ));
                }
                (Some(c), _) if !gauge && c != inf => {
                    return Err(format!("{name}: _count must equal the +Inf bucket"));
                }
                _ => {}
            }
            if let Some(sum) = p.sum {
                if !gauge && p.negative_bucket {
                    return Err(format!(
                        "{name}: a histogram with negative buckets has no _sum"
                    ));
                }
                if gauge && sum < 0.0 && !p.negative_bucket {
                    return Err(format!(
                        "{name}: _gsum is negative without negative buckets"
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}
