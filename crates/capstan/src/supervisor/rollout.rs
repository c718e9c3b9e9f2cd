//! A rolling update as a task: it replaces a service's replicas batch by
//! batch as `update_config` says (Swarm's keys), watching the board, and
//! asks the supervisor actor to start new replicas ([`Step::Allow`]) and to
//! retire old ones ([`Step::RetireOld`]). It ends with the outcome: every
//! replica replaced, or why a batch failed (the actor then applies the
//! `failure_action`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::events::EventLog;
use crate::spec::{Dur, FailureAction, Service, UpdateConfig, UpdateOrder};
use crate::state::{Health, Phase, Revision, Status, StatusBoard};

/// What a rollout asks of the supervisor.
#[derive(Debug)]
pub enum Step {
    /// Up to this many replicas of the new revision may run.
    Allow(u32),
    /// Drain and stop this many replicas of other revisions.
    RetireOld(u32),
    /// Run replicas of the rollout's previous revision under these indices:
    /// a canary's baseline.
    Baseline(Vec<u32>),
    /// Share requests this way (none: evenly).
    Split(Option<crate::state::control::Split>),
    /// A canary's progress and verdicts.
    Report(Box<crate::state::CanaryStatus>),
    /// A rolling batch's verdicts.
    Checks(Vec<crate::state::CheckReport>),
}

/// How long a new replica may take to become ready: its health check's
/// whole budget (start period, then every retry's interval and timeout),
/// or a fixed 30 s without a check; plus a margin for the start itself.
pub fn health_budget(spec: &Service) -> Duration {
    let margin = Duration::from_secs(5);
    match &spec.healthcheck {
        Some(h) => {
            let per_try = h.interval.0 + h.timeout.0;
            h.start_period.0 + per_try * (h.retries + 1) + margin
        }
        None => Duration::from_secs(30) + margin,
    }
}

/// Whether a batch starts its new replicas before stopping old ones.
pub fn start_first(spec: &Service, cfg: &UpdateConfig) -> bool {
    match cfg.order {
        Some(o) => o == UpdateOrder::StartFirst,
        // Capacity never drops for a service behind the proxy.
        None => !spec.ports.is_empty(),
    }
}

/// How a rollout goes, in words: `1 at a time, start-first`.
pub fn describe(spec: &Service, cfg: &UpdateConfig) -> String {
    let batches = match cfg.parallelism {
        0 => "all at once".to_owned(),
        p => format!("{p} at a time"),
    };
    let order = if start_first(spec, cfg) {
        "start-first"
    } else {
        "stop-first"
    };
    format!("{batches}, {order}")
}

pub struct Rollout {
    pub board: Arc<StatusBoard>,
    pub events: Arc<EventLog>,
    pub steps: mpsc::UnboundedSender<(String, Revision, Step)>,
    pub service: String,
    pub revision: Revision,
    pub cfg: UpdateConfig,
    pub start_first: bool,
    pub budget: Duration,
    /// Checks each batch must pass (`x-capstan.rollout.analysis`), and where
    /// their metrics come from.
    pub analysis: Option<(
        crate::spec::Analysis,
        Arc<dyn super::analysis::Source + Send + Sync>,
    )>,
}

impl Rollout {
    pub(super) fn want(&self) -> u32 {
        self.board.service(&self.service).map_or(0, |s| s.desired)
    }

    fn mine(&self) -> Vec<Status> {
        self.board
            .replicas_of(&self.service)
            .into_iter()
            .filter(|s| s.revision == self.revision)
            .collect()
    }

    fn others(&self) -> usize {
        self.board
            .replicas_of(&self.service)
            .into_iter()
            .filter(|s| s.revision != self.revision)
            .count()
    }

    pub(super) fn ask(&self, step: Step) {
        let _ = self.steps.send((self.service.clone(), self.revision, step));
    }

    /// Replaces every replica, batch by batch; the error says which batch
    /// failed and why.
    pub async fn run(&self) -> Result<(), String> {
        let mut done = self.mine().iter().filter(|s| s.is_ready()).count() as u32;
        let mut failed = 0u32;
        let r = self.revision;
        loop {
            let want = self.want();
            if done >= want {
                return Ok(());
            }
            let batch = match self.cfg.parallelism {
                0 => want - done,
                p => p.min(want - done),
            };
            if !self.start_first {
                let before = self.others();
                if before > 0 {
                    self.ask(Step::RetireOld(batch));
                    let left = before.saturating_sub(batch as usize);
                    self.until(super::PROGRESS_DEADLINE, || self.others() <= left)
                        .await;
                }
            }
            self.ask(Step::Allow(done + batch));
            let step = async {
                self.ready(done + batch).await?;
                self.monitor().await
            };
            let limit = self.budget + self.cfg.monitor.0;
            let outcome = match tokio::time::timeout(limit, step).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "revision {r}: a new replica was not ready within {} (its health budget)",
                    Dur(self.budget)
                )),
            };
            let outcome = match (outcome, &self.analysis) {
                (Ok(()), Some((cfg, source))) => self.analyze(cfg, &**source).await,
                (o, _) => o,
            };
            if let Err(why) = outcome {
                failed += batch;
                let ratio = f64::from(failed) / f64::from(want.max(1));
                if self.cfg.failure_action != FailureAction::Continue
                    && ratio > self.cfg.max_failure_ratio
                {
                    return Err(why);
                }
                self.events.emit(
                    &self.service,
                    None,
                    "rollout-continue",
                    format!("{why}; going on (failure_action: continue)"),
                );
            }
            if self.start_first {
                self.ask(Step::RetireOld(batch));
            }
            done += batch;
            let want = self.want();
            self.events.emit(
                &self.service,
                None,
                "rollout-step",
                format!(
                    "revision {r}: {} of {want} replicas replaced",
                    done.min(want)
                ),
            );
            if done < want && !self.cfg.delay.0.is_zero() {
                tokio::time::sleep(self.cfg.delay.0).await;
            }
        }
    }

    /// Judges the revision's replicas against the other revisions' until the
    /// verdict is conclusive (or fails); past the deadline an inconclusive
    /// batch fails.
    async fn analyze(
        &self,
        cfg: &crate::spec::Analysis,
        source: &(dyn super::analysis::Source + Send + Sync),
    ) -> Result<(), String> {
        use super::analysis::{Judge, Sides};
        if self.others() == 0 {
            // Nothing left to compare with (the last stop-first batch).
            return Ok(());
        }
        let s = &self.service;
        let sides = Sides {
            service: s.clone(),
            canary: format!("service=\"{s}\",revision=\"{}\"", self.revision),
            baseline: format!("service=\"{s}\",revision!=\"{}\"", self.revision),
            stable: format!("service=\"{s}\",revision!=\"{}\"", self.revision),
        };
        let mut judge = Judge::new(cfg.clone(), sides);
        judge.mark_step(source, crate::events::now_ms())?;
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(cfg.interval.0).await;
            let v = judge.evaluate(source, crate::events::now_ms());
            self.ask(Step::Checks(v.reports.clone()));
            for r in &v.reports {
                self.events.emit(
                    &self.service,
                    None,
                    "verdict",
                    format!(
                        "revision {}: check {}: {} ({}; threshold {}; {} new / {} old requests{})",
                        self.revision,
                        r.name,
                        r.outcome.as_str(),
                        r.value
                            .map_or("no value".into(), |x| format!("value {x:.4}")),
                        r.threshold,
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
            if let Some(why) = v.failed {
                return Err(format!("revision {}: {why}", self.revision));
            }
            if v.conclusive {
                return Ok(());
            }
            if started.elapsed() >= cfg.deadline.0 {
                return Err(format!(
                    "revision {}: inconclusive after {}: {}",
                    self.revision,
                    cfg.deadline,
                    v.missing.unwrap_or_else(|| "a check has no value".into())
                ));
            }
        }
    }

    /// Until `cond` holds (checked at every change on the board), or `limit`.
    pub(super) async fn until(&self, limit: Duration, cond: impl Fn() -> bool) {
        let mut changed = self.board.watch_topology();
        let deadline = tokio::time::Instant::now() + limit;
        while !cond() {
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Until `n` replicas of the revision are ready; an error as soon as one
    /// crash-loops or fails.
    pub(super) async fn ready(&self, n: u32) -> Result<(), String> {
        let mut changed = self.board.watch_topology();
        loop {
            let mine = self.mine();
            if let Some(bad) = mine
                .iter()
                .find(|s| matches!(s.state, Phase::CrashLooping | Phase::Failed))
            {
                return Err(self.describe(bad, "is"));
            }
            let ready = mine
                .iter()
                .filter(|s| s.is_ready() || (s.state == Phase::Exited && s.exit_code == Some(0)))
                .count();
            if ready as u32 >= n.min(self.want()) {
                return Ok(());
            }
            if changed.changed().await.is_err() {
                return Err("the supervisor stopped".into());
            }
        }
    }

    /// Watches the revision's replicas for `monitor`: one that restarts,
    /// fails or turns unhealthy fails the batch.
    async fn monitor(&self) -> Result<(), String> {
        if self.cfg.monitor.0.is_zero() {
            return Ok(());
        }
        let before: Vec<(u32, u32)> = self
            .mine()
            .iter()
            .map(|s| (s.replica, s.restarts))
            .collect();
        let mut changed = self.board.watch_topology();
        let deadline = tokio::time::Instant::now() + self.cfg.monitor.0;
        loop {
            for s in self.mine() {
                let restarted = before
                    .iter()
                    .any(|(i, n)| *i == s.replica && s.restarts > *n);
                let bad = matches!(
                    s.state,
                    Phase::CrashLooping | Phase::Failed | Phase::Restarting
                ) || s.health == Health::Unhealthy
                    || restarted;
                if bad {
                    return Err(self.describe(
                        &s,
                        &format!("during the {} monitor period is", self.cfg.monitor),
                    ));
                }
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return Err("the supervisor stopped".into()) },
                _ = tokio::time::sleep_until(deadline) => return Ok(()),
            }
        }
    }

    fn describe(&self, s: &Status, verb: &str) -> String {
        let state = if s.health == Health::Unhealthy && s.state == Phase::Running {
            "unhealthy".to_owned()
        } else {
            s.state.to_string()
        };
        format!(
            "revision {}: replica {} {verb} {state}{}",
            self.revision,
            s.replica,
            s.last_exit
                .as_deref()
                .map(|e| format!(" (last {e})"))
                .unwrap_or_default()
        )
    }
}
