//! Anomaly rules (`x-capstan.anomaly`): a series watched for values far
//! from its own recent behaviour, written out as ordinary recording and
//! alerting rules that anyone can read (`capstan rules --generated`), test
//! with promtool and run in Prometheus.
//!
//! For each rule `NAME` over a `series`:
//! - `anomaly:NAME:value` is the series itself, or with `seasonality: 1d`
//!   (or `1w`) its difference from the same time a season earlier, which
//!   takes out a daily (weekly) pattern;
//! - `anomaly:NAME:center` and `anomaly:NAME:spread` describe the last
//!   `window` of values before now: with `method: mad` (the default) their
//!   median and 1.4826 × the median absolute deviation from it (robust: one
//!   spike, or heavy-tailed latency, barely moves them); with `zscore`,
//!   their mean and standard deviation;
//! - `anomaly:NAME:score` = (value − center) / spread, only once the window
//!   holds `min_samples` values;
//! - the alert `NAME` fires when |score| > `sensitivity` for `for`.

use std::time::Duration;

use super::file::{Group, Rule, RuleKind};
use crate::spec::{AnomalyMethod, AnomalyRule, Dur};

fn secs(d: Duration) -> String {
    Dur(d).to_string()
}

fn record(name: String, expr: String) -> Rule {
    Rule {
        kind: RuleKind::Record(name),
        expr,
        for_: Duration::ZERO,
        keep_firing_for: Duration::ZERO,
        labels: Vec::new(),
        annotations: Vec::new(),
        recover_expr: None,
        inhibit_on_dependency: false,
        line: 0,
    }
}

/// The rules of one anomaly rule, as a group of its own evaluated every `step`.
pub fn group(a: &AnomalyRule) -> Group {
    let n = &a.name;
    let value = format!("anomaly:{n}:value");
    let center = format!("anomaly:{n}:center");
    let spread = format!("anomaly:{n}:spread");
    let score = format!("anomaly:{n}:score");
    let (w, step) = (secs(a.window.0), secs(a.step.0));
    let series = match a.seasonality {
        Some(s) => format!(
            "({}) - last_over_time(({})[{step}:{step}] offset {})",
            a.series,
            a.series,
            secs(s.0)
        ),
        None => a.series.clone(),
    };
    // The window ends one step ago: the value being judged is not part of
    // what it is judged against.
    let mut rules = vec![record(value.clone(), series)];
    match a.method {
        AnomalyMethod::Mad => {
            let absdev = format!("anomaly:{n}:absdev");
            rules.push(record(
                center.clone(),
                format!("quantile_over_time(0.5, {value}[{w}] offset {step})"),
            ));
            rules.push(record(absdev.clone(), format!("abs({value} - {center})")));
            rules.push(record(
                spread.clone(),
                format!("1.4826 * quantile_over_time(0.5, {absdev}[{w}] offset {step})"),
            ));
        }
        AnomalyMethod::Zscore => {
            rules.push(record(
                center.clone(),
                format!("avg_over_time({value}[{w}] offset {step})"),
            ));
            rules.push(record(
                spread.clone(),
                format!("stddev_over_time({value}[{w}] offset {step})"),
            ));
        }
    }
    rules.push(record(
        score.clone(),
        format!(
            "({value} - {center}) / ({spread} > 0) and count_over_time({value}[{w}] offset {step}) >= {}",
            a.min_samples
        ),
    ));
    let mut labels = a.labels.clone().into_iter().collect::<Vec<_>>();
    labels.sort();
    rules.push(Rule {
        kind: RuleKind::Alert(n.clone()),
        expr: format!("abs({score}) > {}", a.sensitivity),
        for_: a.for_.0,
        keep_firing_for: Duration::ZERO,
        labels,
        annotations: vec![(
            "summary".into(),
            format!(
                "{{{{ $labels }}}} is {{{{ $value | printf \"%.1f\" }}}} spreads from its usual ({} over {w})",
                match a.method {
                    AnomalyMethod::Mad => "median and MAD",
                    AnomalyMethod::Zscore => "mean and standard deviation",
                }
            ),
        )],
        recover_expr: None,
        inhibit_on_dependency: false,
        line: 0,
    });
    Group {
        name: format!("anomaly:{n}"),
        file: "x-capstan.anomaly".into(),
        interval: Some(a.step.0),
        limit: 0,
        query_offset: None,
        rules,
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// Groups as a Prometheus rule file.
pub fn to_yaml(groups: &[Group]) -> String {
    let mut out = String::from("groups:\n");
    for g in groups {
        out.push_str(&format!("  - name: {}\n", quote(&g.name)));
        if let Some(i) = g.interval {
            out.push_str(&format!("    interval: {}\n", secs(i)));
        }
        out.push_str("    rules:\n");
        for r in &g.rules {
            match &r.kind {
                RuleKind::Record(n) => out.push_str(&format!("      - record: {}\n", quote(n))),
                RuleKind::Alert(n) => out.push_str(&format!("      - alert: {}\n", quote(n))),
            }
            out.push_str(&format!("        expr: {}\n", quote(&r.expr)));
            if !r.for_.is_zero() {
                out.push_str(&format!("        for: {}\n", secs(r.for_)));
            }
            for (key, pairs) in [("labels", &r.labels), ("annotations", &r.annotations)] {
                if pairs.is_empty() {
                    continue;
                }
                out.push_str(&format!("        {key}:\n"));
                for (k, v) in pairs {
                    out.push_str(&format!("          {}: {}\n", quote(k), quote(v)));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_promql::{MemPoint, MemStorage};
    use capstan_tsdb::Labels;

    fn rule(method: AnomalyMethod, seasonality: Option<Dur>) -> AnomalyRule {
        AnomalyRule {
            name: "LatencyAnomaly".into(),
            series: "latency_seconds".into(),
            method,
            window: Dur::secs(3600),
            seasonality,
            sensitivity: 5.0,
            min_samples: 30,
            for_: Dur::secs(180),
            step: Dur::secs(60),
            labels: [("severity".to_owned(), "ticket".to_owned())].into(),
        }
    }

    /// Draws from a seeded generator: uniform, and Student-t with 3 degrees
    /// of freedom (heavy-tailed, as latency is).
    struct Rng(u64);
    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
        fn student3(&mut self) -> f64 {
            let z = self.normal();
            let chi: f64 = (0..3).map(|_| self.normal().powi(2)).sum();
            z / (chi / 3.0).sqrt()
        }
    }

    /// A minute-by-minute series over `days`: a daily wave plus noise, and
    /// `spike` added over minutes `at..at+len`.
    pub fn series(days: i64, heavy: bool, spike: Option<(i64, i64, f64)>, seed: u64) -> MemStorage {
        let mut rng = Rng(seed);
        let mut store = MemStorage::new();
        let l = Labels::from_pairs([("__name__", "latency_seconds"), ("service", "web")]);
        for m in 0..days * 1440 {
            let day = (m % 1440) as f64 / 1440.0;
            let noise = if heavy { rng.student3() } else { rng.normal() };
            let mut v = 0.2 + 0.1 * (2.0 * std::f64::consts::PI * day).sin() + 0.01 * noise;
            if let Some((at, len, add)) = spike
                && (at..at + len).contains(&m)
            {
                v += add;
            }
            store.add(&l, m * 60_000, MemPoint::Float(v));
        }
        store
    }

    fn fired(store: &MemStorage, a: &AnomalyRule, days: i64) -> Vec<i64> {
        let engine = capstan_promql::runner::test_engine();
        let r = super::super::backtest::run(
            &[group(a)],
            store,
            &engine,
            0,
            days * 86_400_000,
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        r.episodes.iter().filter_map(|e| e.fired_ms).collect()
    }

    #[test]
    fn the_generated_file_is_a_valid_rule_file() {
        for m in [AnomalyMethod::Mad, AnomalyMethod::Zscore] {
            let y = to_yaml(&[group(&rule(m, Some(Dur::secs(86_400))))]);
            let g = super::super::file::parse("generated.yml", &y)
                .unwrap_or_else(|e| panic!("{e:?}\n{y}"));
            assert_eq!(
                g[0].rules.len(),
                if m == AnomalyMethod::Mad { 6 } else { 5 }
            );
        }
    }

    #[test]
    fn a_spike_fires_and_normal_noise_does_not() {
        // Against the same time yesterday: the daily wave is gone.
        let mut a = rule(AnomalyMethod::Mad, Some(Dur::secs(86_400)));
        a.sensitivity = 4.0;
        // A 10-minute step of +0.1 s on day 3 at 12:00.
        let at = 2 * 1440 + 720;
        let spiked = series(3, false, Some((at, 10, 0.1)), 7);
        let f = fired(&spiked, &a, 3);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(at * 60_000 < f[0] && f[0] <= (at + 10) * 60_000, "{f:?}");
        let quiet = series(3, false, None, 7);
        assert!(fired(&quiet, &a, 3).is_empty());
        // Without the seasonal difference, the default sensitivity finds it too.
        let plain = rule(AnomalyMethod::Mad, None);
        let plain = AnomalyRule {
            sensitivity: 3.0,
            ..plain
        };
        let f = fired(&spiked, &plain, 3);
        assert!(
            f.iter()
                .any(|t| at * 60_000 < *t && *t <= (at + 10) * 60_000),
            "{f:?}"
        );
    }
}
