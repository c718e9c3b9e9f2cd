//! Anomaly rules on synthetic series: false alarms on normal and on
//! heavy-tailed (Student-t, 3 degrees of freedom) noise around a daily wave,
//! and how many injected 10-minute steps are found; MAD against z-score, with
//! and without the daily seasonal difference. The rules are the ones
//! `x-capstan.anomaly` generates, run by the backtest over an in-memory store.
//!
//! Usage: cargo run --release --example anomaly_sim [DAYS]   (default 7)

use std::time::Duration;

use capstan::alerting::{anomaly, backtest};
use capstan::spec::{AnomalyMethod, AnomalyRule, Dur};
use capstan_promql::{MemPoint, MemStorage};
use capstan_tsdb::Labels;

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

/// Minute values over `days`: 0.2 s + a daily wave of ±0.1 s + noise of
/// scale 0.01 s, plus `steps` (start minute: +`size` s for 10 minutes).
fn series(days: i64, heavy: bool, steps: &[i64], size: f64, seed: u64) -> MemStorage {
    let mut rng = Rng(seed);
    let mut store = MemStorage::new();
    let l = Labels::from_pairs([("__name__", "latency_seconds"), ("service", "web")]);
    for m in 0..days * 1440 {
        let day = (m % 1440) as f64 / 1440.0;
        let noise = if heavy { rng.student3() } else { rng.normal() };
        let mut v = 0.2 + 0.1 * (2.0 * std::f64::consts::PI * day).sin() + 0.01 * noise;
        if steps.iter().any(|s| (*s..s + 10).contains(&m)) {
            v += size;
        }
        store.add(&l, m * 60_000, MemPoint::Float(v));
    }
    store
}

fn rule(method: AnomalyMethod, seasonal: bool, sensitivity: f64) -> AnomalyRule {
    AnomalyRule {
        name: "A".into(),
        series: "latency_seconds".into(),
        method,
        window: Dur::secs(3600),
        seasonality: seasonal.then(|| Dur::secs(86_400)),
        sensitivity,
        min_samples: 30,
        for_: Dur::secs(180),
        step: Dur::secs(60),
        labels: Default::default(),
    }
}

fn fired(store: &MemStorage, a: &AnomalyRule, days: i64) -> Vec<i64> {
    let engine = capstan_promql::runner::test_engine();
    let r = backtest::run(
        &[anomaly::group(a)],
        store,
        &engine,
        0,
        days * 86_400_000,
        Duration::from_secs(60),
    )
    .expect("a backtest");
    r.episodes.iter().filter_map(|e| e.fired_ms).collect()
}

fn main() {
    let days: i64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    // One step a day at a different hour, from day 2 on (day 1 is history
    // for the seasonal difference).
    let steps: Vec<i64> = (1..days)
        .map(|d| d * 1440 + 120 + (d * 197) % 1200)
        .collect();
    println!(
        "{days} days of minute values (0.2 s ± a 0.1 s daily wave, noise scale 0.01 s); {} injected steps of 10 minutes; for: 3m, window 1h",
        steps.len()
    );
    println!(
        "{:<8} {:<9} {:<6} {:>11} {:>22} {:>14} {:>14}",
        "method",
        "seasonal",
        "noise",
        "sensitivity",
        "false alarms (per day)",
        "+0.05 s found",
        "+0.1 s found"
    );
    for heavy in [false, true] {
        let quiet = series(days, heavy, &[], 0.0, 11);
        let small = series(days, heavy, &steps, 0.05, 11);
        let large = series(days, heavy, &steps, 0.1, 11);
        for method in [AnomalyMethod::Mad, AnomalyMethod::Zscore] {
            for seasonal in [false, true] {
                for sensitivity in [3.0, 4.0] {
                    let a = rule(method, seasonal, sensitivity);
                    let fa = fired(&quiet, &a, days).len();
                    let found = |store: &MemStorage| {
                        let hits = fired(store, &a, days);
                        steps
                            .iter()
                            .filter(|s| {
                                hits.iter()
                                    .any(|t| (**s * 60_000..(**s + 20) * 60_000).contains(t))
                            })
                            .count()
                    };
                    let (fs, fl) = (found(&small), found(&large));
                    println!(
                        "{:<8} {:<9} {:<6} {:>11} {:>12} ({:>6.2}) {:>12}/{} {:>12}/{}",
                        format!("{method:?}").to_lowercase(),
                        if seasonal { "1d" } else { "none" },
                        if heavy { "t(3)" } else { "normal" },
                        sensitivity,
                        fa,
                        fa as f64 / days as f64,
                        fs,
                        steps.len(),
                        fl,
                        steps.len()
                    );
                }
            }
        }
    }
}
