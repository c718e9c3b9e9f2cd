//! The Kubernetes HorizontalPodAutoscaler's algorithm, as its documentation
//! describes it: per-metric replica counts from `ceil(current × value/target)`
//! with a tolerance and HPA's treatment of missing metrics and unready replicas,
//! the largest over the metrics, then the behavior (stabilization windows and
//! rate policies) and the min/max bounds.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::spec::{Behavior, PolicyKind, ScalingRules, SelectPolicy};

/// One replica's reading of a per-replica metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaValue {
    pub ready: bool,
    /// None: the replica has no value (yet).
    pub value: Option<f64>,
}

/// A metric as read for one decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A value per replica, compared on average with `target` (HPA's
    /// `AverageValue`/`Utilization` targets of Pods and Resource metrics).
    PerReplica {
        values: Vec<ReplicaValue>,
        target: f64,
    },
    /// A total divided among the replicas (`AverageValue` of an External metric).
    AverageOfTotal { total: f64, target: f64 },
    /// A total compared as is (`Value` of an Object/External metric).
    Total { value: f64, target: f64 },
}

/// One metric's recommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub replicas: u32,
    /// The value compared with the target (average per replica, or total).
    pub value: f64,
    /// value / target.
    pub ratio: f64,
}

/// HPA's replica count for one metric, or None when nothing could be read.
pub fn recommend(
    obs: &Observation,
    current: u32,
    ready: u32,
    tolerance: f64,
) -> Option<Recommendation> {
    let within = |r: f64| (r - 1.0).abs() <= tolerance;
    match obs {
        Observation::PerReplica { values, target } => {
            let measured: Vec<f64> = values
                .iter()
                .filter(|v| v.ready)
                .filter_map(|v| v.value)
                .collect();
            if measured.is_empty() {
                return None;
            }
            let avg = measured.iter().sum::<f64>() / measured.len() as f64;
            let ratio = avg / target;
            let missing = values
                .iter()
                .filter(|v| v.ready && v.value.is_none())
                .count();
            let unready = values.iter().filter(|v| !v.ready).count();
            let rec = |replicas| {
                Some(Recommendation {
                    replicas,
                    value: avg,
                    ratio,
                })
            };
            if missing == 0 && unready == 0 {
                if within(ratio) {
                    return rec(current);
                }
                return rec((ratio * measured.len() as f64).ceil() as u32);
            }
            // Conservative fill: missing replicas count as using the target when
            // scaling down and nothing when scaling up; unready ones count as
            // using nothing, and only when scaling up.
            let up = ratio > 1.0;
            let mut sum: f64 = measured.iter().sum();
            let mut n = measured.len();
            if up {
                n += missing + unready;
            } else {
                sum += *target * missing as f64;
                n += missing;
            }
            let new_ratio = sum / n as f64 / target;
            if within(new_ratio) || (up && new_ratio < 1.0) || (!up && new_ratio > 1.0) {
                return rec(current);
            }
            let replicas = (new_ratio * n as f64).ceil() as u32;
            // A fill must not turn the direction around.
            if (new_ratio < 1.0 && replicas > current) || (new_ratio > 1.0 && replicas < current) {
                return rec(current);
            }
            Some(Recommendation {
                replicas,
                value: avg,
                ratio: new_ratio,
            })
        }
        Observation::AverageOfTotal { total, target } => {
            let per = *total / f64::from(current.max(1));
            let ratio = per / target;
            let replicas = if within(ratio) {
                current
            } else {
                (total / target).ceil() as u32
            };
            Some(Recommendation {
                replicas,
                value: per,
                ratio,
            })
        }
        Observation::Total { value, target } => {
            let ratio = value / target;
            let replicas = if within(ratio) {
                current
            } else {
                (ratio * f64::from(ready.max(1))).ceil() as u32
            };
            Some(Recommendation {
                replicas,
                value: *value,
                ratio,
            })
        }
    }
}

/// What the behavior made of a recommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What the metrics asked for (the largest over them).
    pub metrics_desired: u32,
    /// After the stabilization window.
    pub stabilized: u32,
    /// The count to run.
    pub desired: u32,
    /// Why `desired` differs from `stabilized`, if it does.
    pub limited_by: Option<String>,
}

/// The history one service's behavior needs.
#[derive(Debug, Default)]
pub struct Scaler {
    recommendations: VecDeque<(Instant, u32)>,
    /// Replica changes made, for the rate policies.
    changes: VecDeque<(Instant, i64)>,
}

impl Scaler {
    /// Applies the stabilization windows, the rate policies and min/max to
    /// `desired` (what the metrics ask for) at `now`, with `current` replicas.
    pub fn decide(
        &mut self,
        now: Instant,
        current: u32,
        desired: u32,
        min: u32,
        max: u32,
        behavior: &Behavior,
    ) -> Decision {
        let up_window = behavior.scale_up.stabilization.0;
        let down_window = behavior.scale_down.stabilization.0;
        // Up: the lowest recommendation within the up window; down: the highest
        // within the down window. The current count sits between.
        let mut up_rec = desired;
        let mut down_rec = desired;
        for &(t, r) in &self.recommendations {
            let age = now.saturating_duration_since(t);
            if age <= up_window {
                up_rec = up_rec.min(r);
            }
            if age <= down_window {
                down_rec = down_rec.max(r);
            }
        }
        let mut stabilized = current;
        if stabilized < up_rec {
            stabilized = up_rec;
        }
        if stabilized > down_rec {
            stabilized = down_rec;
        }
        self.recommendations.push_back((now, desired));
        let keep = up_window.max(down_window);
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep)
        {
            self.recommendations.pop_front();
        }

        let mut limited_by = None;
        let mut out = stabilized;
        if stabilized > current {
            let limit = self.up_limit(now, current, &behavior.scale_up);
            let allowed = max.min(limit.max(current));
            if out > allowed {
                out = allowed;
                limited_by = Some(if allowed == max && max < limit {
                    format!("capped at max {max}")
                } else if behavior.scale_up.select == SelectPolicy::Disabled {
                    "scaling up is disabled (scaleUp.selectPolicy: Disabled)".to_owned()
                } else {
                    format!("capped by scaleUp policy to {allowed}")
                });
            }
        } else if stabilized < current {
            let limit = self.down_limit(now, current, &behavior.scale_down);
            let allowed = min.max(limit.min(current));
            if out < allowed {
                out = allowed;
                limited_by = Some(if allowed == min && min > limit {
                    format!("held at min {min}")
                } else if behavior.scale_down.select == SelectPolicy::Disabled {
                    "scaling down is disabled (scaleDown.selectPolicy: Disabled)".to_owned()
                } else {
                    format!("held by scaleDown policy at {allowed}")
                });
            }
        }
        // Outside the bounds (they changed, or the count was set by hand).
        if out > max {
            out = max;
            limited_by = Some(format!("capped at max {max}"));
        } else if out < min {
            out = min;
            limited_by = Some(format!("raised to min {min}"));
        }
        Decision {
            metrics_desired: desired,
            stabilized,
            desired: out,
            limited_by,
        }
    }

    /// Records a change actually made (for the policies' periods).
    pub fn scaled(&mut self, now: Instant, from: u32, to: u32) {
        self.changes
            .push_back((now, i64::from(to) - i64::from(from)));
        while self
            .changes
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > Duration::from_secs(1800))
        {
            self.changes.pop_front();
        }
    }

    fn changed_within(&self, now: Instant, period: Duration, up: bool) -> i64 {
        self.changes
            .iter()
            .filter(|(t, d)| now.saturating_duration_since(*t) <= period && (*d > 0) == up)
            .map(|(_, d)| d.abs())
            .sum()
    }

    fn up_limit(&self, now: Instant, current: u32, rules: &ScalingRules) -> u32 {
        if rules.select == SelectPolicy::Disabled || rules.policies.is_empty() {
            return if rules.select == SelectPolicy::Disabled {
                current
            } else {
                u32::MAX
            };
        }
        let proposals = rules.policies.iter().map(|p| {
            let start =
                (i64::from(current) - self.changed_within(now, p.period.0, true)).max(0) as f64;
            match p.kind {
                PolicyKind::Pods => start + f64::from(p.value),
                PolicyKind::Percent => (start * (1.0 + f64::from(p.value) / 100.0)).ceil(),
            }
        });
        let pick = match rules.select {
            SelectPolicy::Min => proposals.fold(f64::INFINITY, f64::min),
            _ => proposals.fold(f64::NEG_INFINITY, f64::max),
        };
        pick.clamp(0.0, f64::from(u32::MAX)) as u32
    }

    fn down_limit(&self, now: Instant, current: u32, rules: &ScalingRules) -> u32 {
        if rules.select == SelectPolicy::Disabled || rules.policies.is_empty() {
            return if rules.select == SelectPolicy::Disabled {
                current
            } else {
                0
            };
        }
        let proposals = rules.policies.iter().map(|p| {
            let start = (i64::from(current) + self.changed_within(now, p.period.0, false)) as f64;
            match p.kind {
                PolicyKind::Pods => start - f64::from(p.value),
                PolicyKind::Percent => (start * (1.0 - f64::from(p.value) / 100.0)).floor(),
            }
        });
        // The largest change is the lowest count.
        let pick = match rules.select {
            SelectPolicy::Min => proposals.fold(f64::NEG_INFINITY, f64::max),
            _ => proposals.fold(f64::INFINITY, f64::min),
        };
        pick.clamp(0.0, f64::from(u32::MAX)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Dur, ScalingPolicy};

    fn per(values: &[f64], target: f64) -> Observation {
        Observation::PerReplica {
            values: values
                .iter()
                .map(|v| ReplicaValue {
                    ready: true,
                    value: Some(*v),
                })
                .collect(),
            target,
        }
    }

    #[test]
    fn desired_is_ceil_of_current_times_ratio() {
        // Kubernetes' own example: 200m used, 100m wanted → double.
        let r = recommend(&per(&[200.0, 200.0], 100.0), 2, 2, 0.1).unwrap();
        assert_eq!(r.replicas, 4);
        assert_eq!(r.ratio, 2.0);
        // 50 of 100 → half.
        assert_eq!(
            recommend(&per(&[50.0; 4], 100.0), 4, 4, 0.1)
                .unwrap()
                .replicas,
            2
        );
        // Ceil: 3 × 1.5 = 4.5 → 5.
        assert_eq!(
            recommend(&per(&[90.0; 3], 60.0), 3, 3, 0.1)
                .unwrap()
                .replicas,
            5
        );
    }

    #[test]
    fn tolerance_keeps_the_count() {
        assert_eq!(
            recommend(&per(&[108.0; 3], 100.0), 3, 3, 0.1)
                .unwrap()
                .replicas,
            3
        );
        assert_eq!(
            recommend(&per(&[92.0; 3], 100.0), 3, 3, 0.1)
                .unwrap()
                .replicas,
            3
        );
        assert_eq!(
            recommend(&per(&[112.0; 3], 100.0), 3, 3, 0.1)
                .unwrap()
                .replicas,
            4
        );
        // Per-service tolerance.
        assert_eq!(
            recommend(&per(&[112.0; 3], 100.0), 3, 3, 0.2)
                .unwrap()
                .replicas,
            3
        );
    }

    #[test]
    fn missing_metrics_are_conservative() {
        let vals = |v: &[Option<f64>]| Observation::PerReplica {
            values: v
                .iter()
                .map(|x| ReplicaValue {
                    ready: true,
                    value: *x,
                })
                .collect(),
            target: 100.0,
        };
        // Scaling up: the missing one counts as 0 → (200+200+0)/3 = 133% → ceil(1.33×3) = 4.
        let r = recommend(&vals(&[Some(200.0), Some(200.0), None]), 3, 3, 0.1).unwrap();
        assert_eq!(r.replicas, 4);
        // Scaling down: the missing one counts as 100% → (10+10+100)/3 = 40% → 2.
        let r = recommend(&vals(&[Some(10.0), Some(10.0), None]), 3, 3, 0.1).unwrap();
        assert_eq!(r.replicas, 2);
        // A fill that lands within tolerance: no change. (105+105+0... up: 70% → reversal)
        let r = recommend(&vals(&[Some(115.0), None]), 2, 2, 0.1).unwrap();
        assert_eq!(r.replicas, 2, "the fill turns 115% into 57%: no scale up");
        // Nothing measured at all: no recommendation.
        assert_eq!(recommend(&vals(&[None, None]), 2, 2, 0.1), None);
    }

    #[test]
    fn unready_replicas_dampen_scale_up_only() {
        let obs = Observation::PerReplica {
            values: vec![
                ReplicaValue {
                    ready: true,
                    value: Some(300.0),
                },
                ReplicaValue {
                    ready: false,
                    value: Some(0.0),
                },
            ],
            target: 100.0,
        };
        // Up: the unready one counts as 0 → 150% over 2 → 3.
        assert_eq!(recommend(&obs, 2, 1, 0.1).unwrap().replicas, 3);
        let obs = Observation::PerReplica {
            values: vec![
                ReplicaValue {
                    ready: true,
                    value: Some(20.0),
                },
                ReplicaValue {
                    ready: false,
                    value: None,
                },
            ],
            target: 100.0,
        };
        // Down: the unready one is left out → ceil(0.2 × 1) = 1.
        assert_eq!(recommend(&obs, 2, 1, 0.1).unwrap().replicas, 1);
    }

    #[test]
    fn totals() {
        // 450 rps over an average target of 100 → 5.
        let r = recommend(
            &Observation::AverageOfTotal {
                total: 450.0,
                target: 100.0,
            },
            2,
            2,
            0.1,
        )
        .unwrap();
        assert_eq!(r.replicas, 5);
        assert_eq!(r.value, 225.0);
        // A total of 30 against 10 with 2 ready → 6.
        let r = recommend(
            &Observation::Total {
                value: 30.0,
                target: 10.0,
            },
            2,
            2,
            0.1,
        )
        .unwrap();
        assert_eq!(r.replicas, 6);
    }

    fn behavior() -> Behavior {
        Behavior::default()
    }

    #[tokio::test(start_paused = true)]
    async fn scale_down_waits_for_the_window_and_keeps_the_max() {
        let b = behavior();
        let mut s = Scaler::default();
        let now = Instant::now();
        assert_eq!(s.decide(now, 4, 4, 1, 10, &b).desired, 4);
        tokio::time::advance(Duration::from_secs(60)).await;
        // A high recommendation one minute in.
        assert_eq!(s.decide(Instant::now(), 4, 6, 1, 4, &b).desired, 4);
        tokio::time::advance(Duration::from_secs(60)).await;
        // The metrics want 1, but within 300 s the highest was 6 → stays 4 (current).
        let d = s.decide(Instant::now(), 4, 1, 1, 10, &b);
        assert_eq!(d.stabilized, 4);
        assert_eq!(d.desired, 4);
        // 301 s after the 6 (and after the 4): only the low ones are left.
        tokio::time::advance(Duration::from_secs(250)).await;
        let d = s.decide(Instant::now(), 4, 1, 1, 10, &b);
        assert_eq!(d.stabilized, 1);
        assert_eq!(d.desired, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stabilization_window_holds_the_highest_recent_recommendation() {
        let b = behavior();
        let mut s = Scaler::default();
        for want in [8, 3, 5, 2] {
            s.decide(Instant::now(), 8, want, 1, 10, &b);
            tokio::time::advance(Duration::from_secs(10)).await;
        }
        let d = s.decide(Instant::now(), 8, 2, 1, 10, &b);
        assert_eq!(d.desired, 8, "8 was recommended within the window");
    }

    #[tokio::test(start_paused = true)]
    async fn scale_up_policies_and_select_policy() {
        let mut b = behavior();
        let mut s = Scaler::default();
        // Default: max(100% → 2×2 = 4, 4 pods → 6) = 6.
        let d = s.decide(Instant::now(), 2, 20, 1, 50, &b);
        assert_eq!(d.desired, 6);
        assert_eq!(
            d.limited_by.as_deref(),
            Some("capped by scaleUp policy to 6")
        );
        s.scaled(Instant::now(), 2, 6);
        // Within the same 15 s period the start is still 2: no more growth.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(s.decide(Instant::now(), 6, 20, 1, 50, &b).desired, 6);
        // After the period: from 6, max(12, 10) = 12.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(s.decide(Instant::now(), 6, 20, 1, 50, &b).desired, 12);
        // selectPolicy Min picks the smaller: min(12, 10) = 10.
        b.scale_up.select = SelectPolicy::Min;
        assert_eq!(s.decide(Instant::now(), 6, 20, 1, 50, &b).desired, 10);
        // Disabled: no scale up at all.
        b.scale_up.select = SelectPolicy::Disabled;
        let d = s.decide(Instant::now(), 6, 20, 1, 50, &b);
        assert_eq!(d.desired, 6);
        assert!(d.limited_by.unwrap().contains("disabled"));
    }

    #[tokio::test(start_paused = true)]
    async fn scale_down_policies() {
        let mut b = behavior();
        b.scale_down.stabilization = Dur::secs(0);
        b.scale_down.policies = vec![
            ScalingPolicy {
                kind: PolicyKind::Pods,
                value: 2,
                period: Dur::secs(60),
            },
            ScalingPolicy {
                kind: PolicyKind::Percent,
                value: 10,
                period: Dur::secs(60),
            },
        ];
        let mut s = Scaler::default();
        // Max (default) takes the larger change: 10 − 2 = 8 versus floor(9) = 9 → 8.
        let d = s.decide(Instant::now(), 10, 1, 1, 20, &b);
        assert_eq!(d.desired, 8);
        assert_eq!(
            d.limited_by.as_deref(),
            Some("held by scaleDown policy at 8")
        );
        s.scaled(Instant::now(), 10, 8);
        // Same period: the start is still 10 → 8 again, no further.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.decide(Instant::now(), 8, 1, 1, 20, &b).desired, 8);
        // Min takes the smaller change: 9 from a start of 10... but the current 8
        // is already below it, so nothing moves.
        b.scale_down.select = SelectPolicy::Min;
        assert_eq!(s.decide(Instant::now(), 8, 1, 1, 20, &b).desired, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn bounds_apply_last() {
        let b = behavior();
        let mut s = Scaler::default();
        let d = s.decide(Instant::now(), 3, 3, 1, 2, &b);
        assert_eq!(d.desired, 2);
        assert_eq!(d.limited_by.as_deref(), Some("capped at max 2"));
        let d = s.decide(Instant::now(), 1, 1, 2, 5, &b);
        assert_eq!(d.desired, 2);
    }
}
