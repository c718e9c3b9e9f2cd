//! A canary as a task: the new revision gets a share of the requests step
//! by step (`x-capstan.rollout.steps`), beside a fresh baseline replica of
//! the stable revision with the same share, while [`analysis::Judge`]
//! compares the two. It asks the actor for replicas, baselines and splits
//! through [`Step`]s, reports its progress, and ends promoted (every replica
//! on the new revision, watched for `bake`) or with the reason to roll back.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::analysis::{Judge, Sides, Source};
use super::rollout::{Rollout, Step};
use crate::spec::{Canary, CanaryStep, Dur, FailureAction};
use crate::state::control::Split;
use crate::state::{CanaryStatus, Outcome, Revision};

/// What `capstan promote` and `abort` send to a canary.
#[derive(Debug)]
pub enum Control {
    /// Past the current pause; `full` skips the remaining steps.
    Promote { full: bool },
}

pub struct CanaryRun {
    pub roll: Rollout,
    pub stable: Revision,
    pub cfg: Canary,
    pub source: Arc<dyn Source + Send + Sync>,
    pub control: mpsc::UnboundedReceiver<Control>,
    status: CanaryStatus,
    judge: Judge,
    baseline: Vec<u32>,
    /// The last outcome of each check, to report changes as events.
    last: Vec<(String, Outcome)>,
}

/// Replicas a share of `weight` percent needs out of `n` (at least one).
pub fn replicas_for(n: u32, weight: u32) -> u32 {
    (n * weight).div_ceil(100).clamp(1, n.max(1))
}

/// How a canary goes, in words: `10% → pause 30s → 50% → until promoted`.
pub fn describe(c: &Canary) -> String {
    let steps: Vec<String> = c
        .steps
        .iter()
        .map(|s| match s {
            CanaryStep::Weight(w) => format!("{w}%"),
            CanaryStep::Pause(Some(d)) => format!("pause {d}"),
            CanaryStep::Pause(None) => "until promoted".into(),
        })
        .collect();
    format!(
        "canary: {}{}{}",
        steps.join(" → "),
        if c.baseline { ", with a baseline" } else { "" },
        if c.bake.0.is_zero() {
            String::new()
        } else {
            format!(", bake {}", c.bake)
        }
    )
}

fn matchers(service: &str, revision: Revision, replicas: Option<(&[u32], bool)>) -> String {
    let mut m = format!("service=\"{service}\",revision=\"{revision}\"");
    if let Some((ids, inside)) = replicas
        && !ids.is_empty()
    {
        let alt: Vec<String> = ids.iter().map(u32::to_string).collect();
        let op = if inside { "=~" } else { "!~" };
        m.push_str(&format!(",replica{op}\"{}\"", alt.join("|")));
    }
    m
}

fn now_ms() -> i64 {
    crate::events::now_ms()
}

impl CanaryRun {
    pub fn new(
        roll: Rollout,
        stable: Revision,
        cfg: Canary,
        source: Arc<dyn Source + Send + Sync>,
        control: mpsc::UnboundedReceiver<Control>,
    ) -> CanaryRun {
        let sides = Sides {
            service: roll.service.clone(),
            canary: matchers(&roll.service, roll.revision, None),
            baseline: matchers(&roll.service, stable, None),
            stable: matchers(&roll.service, stable, None),
        };
        let judge = Judge::new(cfg.analysis.clone(), sides);
        let status = CanaryStatus {
            steps: cfg.steps.len() as u32,
            ..CanaryStatus::default()
        };
        CanaryRun {
            roll,
            stable,
            cfg,
            source,
            control,
            status,
            judge,
            baseline: Vec::new(),
            last: Vec::new(),
        }
    }

    fn report(&self) {
        self.roll.ask(Step::Report(Box::new(self.status.clone())));
    }

    fn event(&self, kind: &str, reason: String) {
        self.roll
            .events
            .emit(&self.roll.service, None, kind, reason);
    }

    /// Runs the steps, promotes, bakes; the error is why to roll back.
    pub async fn run(mut self) -> Result<(), String> {
        // No request reaches a canary replica before its first step.
        self.roll.ask(Step::Split(Some(self.split(0))));
        let steps = self.cfg.steps.clone();
        let mut full = false;
        let mut concluded = false;
        for (i, step) in steps.iter().enumerate() {
            if full {
                break;
            }
            self.status.step = i as u32 + 1;
            match step {
                CanaryStep::Weight(w) => {
                    self.set_weight(*w).await?;
                    concluded = false;
                }
                CanaryStep::Pause(d) => {
                    full = self.pause(*d).await?;
                    concluded = true;
                }
            }
        }
        if !full && !concluded {
            // The last share is judged before everything moves to it.
            self.status.step = steps.len() as u32;
            self.pause(Some(Dur::secs(0))).await?;
        }
        self.promote().await?;
        self.bake().await
    }

    /// Starts what a share of `w` needs (canary and baseline replicas), then
    /// gives the canary that share.
    async fn set_weight(&mut self, w: u32) -> Result<(), String> {
        let n = self.roll.want();
        let k = replicas_for(n, w);
        self.status.phase = format!("starting {k} canary replica(s) for {w}%");
        self.report();
        self.roll.ask(Step::Allow(k));
        let r = self.roll.revision;
        let budget = self.roll.budget;
        self.within(budget, self.roll.ready(k)).await?;
        if self.cfg.baseline && (self.baseline.len() as u32) < k {
            let stable: Vec<u32> = self
                .roll
                .board
                .replicas_of(&self.roll.service)
                .iter()
                .filter(|s| s.revision == self.stable)
                .map(|s| s.replica)
                .collect();
            let mut next = stable.iter().max().map_or(0, |m| m + 1);
            while (self.baseline.len() as u32) < k {
                while stable.contains(&next) || self.baseline.contains(&next) {
                    next += 1;
                }
                self.baseline.push(next);
            }
            self.status.baseline = self.baseline.clone();
            self.roll.ask(Step::Baseline(self.baseline.clone()));
            let ids = self.baseline.clone();
            let board = self.roll.board.clone();
            let (service, stable) = (self.roll.service.clone(), self.stable);
            let ready = || {
                ids.iter().all(|i| {
                    board
                        .get(&crate::state::ReplicaId::new(&service, stable, *i))
                        .is_some_and(|s| s.is_ready())
                })
            };
            let wait = self.roll.until(budget, ready);
            wait.await;
            if !ready() {
                return Err(format!(
                    "a baseline replica of revision {stable} was not ready within {}",
                    Dur(budget)
                ));
            }
            let s = &self.roll.service;
            self.judge.sides.baseline = matchers(s, stable, Some((&self.baseline, true)));
            self.judge.sides.stable = matchers(s, stable, Some((&self.baseline, false)));
        }
        self.roll.ask(Step::Split(Some(self.split(w))));
        self.status.weight = w;
        self.judge.mark_step(&*self.source, now_ms())?;
        let b = if self.cfg.baseline { w.min(100 - w) } else { 0 };
        self.event(
            "canary-step",
            format!(
                "revision {r} gets {w}% of requests ({}stable {}%)",
                if b > 0 {
                    format!("baseline {b}%, ")
                } else {
                    String::new()
                },
                100 - w - b
            ),
        );
        self.report();
        Ok(())
    }

    fn split(&self, w: u32) -> Split {
        Split {
            canary: self.roll.revision,
            weight: w,
            stable: self.stable,
            baseline: self.baseline.clone(),
            sticky: self.cfg.sticky.clone(),
        }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "revision {}: a new replica was not ready within {} (its health budget)",
                self.roll.revision,
                Dur(limit)
            )),
        }
    }

    /// Judges the current share every interval: for `d` (then until the
    /// verdict is conclusive), or until promoted (`None`). Ok(true) when
    /// `capstan promote --full` skips the rest.
    async fn pause(&mut self, d: Option<Dur>) -> Result<bool, String> {
        let started = tokio::time::Instant::now();
        let interval = self.cfg.analysis.interval.0;
        let deadline = self
            .cfg
            .analysis
            .deadline
            .0
            .max(d.map_or(Duration::ZERO, |d| d.0));
        let mut paused = d.is_none();
        self.judge.mark_step(&*self.source, now_ms())?;
        loop {
            self.status.paused = paused;
            self.status.phase = match d {
                _ if paused && d.is_some() => format!(
                    "inconclusive for {}: waiting for `capstan promote` or `capstan abort`",
                    Dur(deadline)
                ),
                None => "paused: waiting for `capstan promote`".into(),
                Some(d) => {
                    let left = d.0.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        "waiting for a conclusive verdict".into()
                    } else {
                        format!(
                            "pause {d} ({} left)",
                            Dur(Duration::from_secs(left.as_secs()))
                        )
                    }
                }
            };
            self.report();
            tokio::select! {
                c = self.control.recv() => match c {
                    Some(Control::Promote { full }) => {
                        self.event("promoted", format!(
                            "revision {}: promoted by hand{}", self.roll.revision,
                            if full { ", skipping the remaining steps" } else { "" }));
                        return Ok(full);
                    }
                    None => return Err("the supervisor stopped".into()),
                },
                _ = tokio::time::sleep(interval) => {}
            }
            let v = self.judge.evaluate(&*self.source, now_ms());
            self.record(&v);
            if let Some(why) = v.failed {
                return Err(why);
            }
            let elapsed = started.elapsed();
            match d {
                Some(d) if v.conclusive && elapsed >= d.0 => return Ok(false),
                Some(_) if !paused && elapsed >= deadline => {
                    let missing = v.missing.unwrap_or_else(|| "a check has no value".into());
                    let why = format!("inconclusive after {}: {missing}", Dur(deadline));
                    match self.cfg.analysis.on_inconclusive {
                        FailureAction::Rollback => return Err(why),
                        _ => {
                            paused = true;
                            self.event(
                                "paused",
                                format!("{why}; waiting for `capstan promote` or `capstan abort`"),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Keeps the latest verdicts for the status, and says in an event when
    /// a check's outcome changes.
    fn record(&mut self, v: &super::analysis::Verdict) {
        self.status.checks = v.reports.clone();
        self.status.waiting = v.missing.clone();
        for r in &v.reports {
            let before = self.last.iter().find(|(n, _)| *n == r.name).map(|x| x.1);
            if before != Some(r.outcome) {
                self.event(
                    "verdict",
                    format!(
                        "check {}: {} ({}; threshold {}; {}; {} canary / {} baseline requests{})",
                        r.name,
                        r.outcome.as_str(),
                        r.value
                            .map_or("no value".into(), |x| format!("value {x:.4}")),
                        r.threshold,
                        r.window,
                        r.canary_requests,
                        r.baseline_requests,
                        if r.detail.is_empty() {
                            String::new()
                        } else {
                            format!("; {}", r.detail)
                        }
                    ),
                );
            }
        }
        self.last = v
            .reports
            .iter()
            .map(|r| (r.name.clone(), r.outcome))
            .collect();
    }

    /// Every replica on the new revision; the stable ones and the baseline go.
    async fn promote(&mut self) -> Result<(), String> {
        let n = self.roll.want();
        self.status.step = self.status.steps + 1;
        self.status.phase = "promoting: starting the rest of the new revision".into();
        self.status.paused = false;
        self.report();
        self.roll.ask(Step::Allow(n));
        self.within(self.roll.budget, self.roll.ready(n)).await?;
        self.roll.ask(Step::Split(Some(self.split(100))));
        self.status.weight = 100;
        self.roll.ask(Step::RetireOld(u32::MAX));
        self.event(
            "promoted",
            format!(
                "revision {} takes every request; revision {} is stopping",
                self.roll.revision, self.stable
            ),
        );
        Ok(())
    }

    /// Watches the new revision for `bake` against what the baseline did
    /// during the canary.
    async fn bake(&mut self) -> Result<(), String> {
        let bake = self.cfg.bake.0;
        if bake.is_zero() {
            return Ok(());
        }
        let sides = Sides {
            service: self.roll.service.clone(),
            canary: matchers(&self.roll.service, self.roll.revision, None),
            ..self.judge.sides.clone()
        };
        self.judge.bake(&*self.source, sides, now_ms())?;
        let started = tokio::time::Instant::now();
        let interval = self.cfg.analysis.interval.0;
        loop {
            let left = bake.saturating_sub(started.elapsed());
            if left.is_zero() {
                return Ok(());
            }
            self.status.phase = format!(
                "baking: watched for {} more",
                Dur(Duration::from_secs(left.as_secs()))
            );
            self.report();
            tokio::time::sleep(interval.min(left)).await;
            let v = self.judge.evaluate(&*self.source, now_ms());
            self.record(&v);
            if let Some(why) = v.failed {
                return Err(format!(
                    "after promotion, during the {} bake: {why}",
                    self.cfg.bake
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_need_replicas() {
        assert_eq!(replicas_for(4, 10), 1);
        assert_eq!(replicas_for(4, 50), 2);
        assert_eq!(replicas_for(4, 60), 3);
        assert_eq!(replicas_for(4, 100), 4);
        assert_eq!(replicas_for(0, 10), 1);
    }

    #[test]
    fn matchers_select_the_baseline_and_the_rest() {
        assert_eq!(
            matchers("web", 1, Some((&[4, 5], true))),
            "service=\"web\",revision=\"1\",replica=~\"4|5\""
        );
        assert_eq!(
            matchers("web", 1, Some((&[4], false))),
            "service=\"web\",revision=\"1\",replica!~\"4\""
        );
        assert_eq!(matchers("web", 2, None), "service=\"web\",revision=\"2\"");
    }
}
