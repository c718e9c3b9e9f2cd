//! `/api/v1/rules` and `/api/v1/alerts`, in Prometheus' shapes.

use axum::extract::{RawQuery, State};
use axum::response::Response;
use serde_json::{Value, json};

use super::Api;
use crate::alerting::file::RuleKind;
use crate::alerting::rule::{Alert, AlertState, RuleState};

fn time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "0001-01-01T00:00:00Z".into(), crate::alerting::rfc3339)
}

/// Go's `strconv.FormatFloat(v, 'e', -1, 64)`: `1e+00`, `2.5e-01`.
fn value(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    crate::alerting::template::go_exponent(format!("{v:e}"))
}

fn alert_json(a: &Alert) -> Value {
    let mut v = json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "state": a.state.as_str(),
        "activeAt": time(Some(a.active_at_ms)),
        "value": value(a.value),
    });
    if let Some(k) = a.keep_firing_since_ms {
        v["keepFiringSince"] = json!(time(Some(k)));
    }
    if !a.inhibited_by.is_empty() {
        v["inhibitedBy"] = json!(a.inhibited_by);
    }
    v
}

fn live(r: &RuleState) -> impl Iterator<Item = &Alert> {
    r.active
        .values()
        .filter(|a| a.state != AlertState::Inactive)
}

/// The query string's values of `key` (`key[]=a&key[]=b`).
fn values(p: &super::prom::Params, key: &str) -> Vec<String> {
    let mut v: Vec<String> = p.all(key).into_iter().map(str::to_owned).collect();
    v.extend(p.all(&format!("{key}[]")).into_iter().map(str::to_owned));
    v
}

pub async fn rules(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let raw = super::prom::Params::from_query(raw);
    let kind = values(&raw, "type").into_iter().next();
    if let Some(k) = &kind
        && k != "alert"
        && k != "record"
    {
        return super::prom::err(
            "bad_data",
            format!("invalid type {k:?}: expected alert or record"),
        );
    }
    let (names, groups_f, files) = (
        values(&raw, "rule_name"),
        values(&raw, "group_name"),
        values(&raw, "file"),
    );
    let mut out = Vec::new();
    for g in api.alerting.groups() {
        if (!groups_f.is_empty() && !groups_f.contains(&g.name))
            || (!files.is_empty() && !files.contains(&g.file))
        {
            continue;
        }
        let mut rules = Vec::new();
        for r in &g.rules {
            if !names.is_empty() && !names.iter().any(|n| n == r.rule.name()) {
                continue;
            }
            let common = |v: &mut Value| {
                v["name"] = json!(r.rule.name());
                v["query"] = json!(r.rule.expr);
                v["labels"] = json!(
                    r.rule
                        .labels
                        .iter()
                        .cloned()
                        .collect::<std::collections::BTreeMap<_, _>>()
                );
                v["health"] = json!(match r.health {
                    crate::alerting::rule::Health::Ok => "ok",
                    crate::alerting::rule::Health::Err => "err",
                    crate::alerting::rule::Health::Unknown => "unknown",
                });
                if let Some(e) = &r.last_error {
                    v["lastError"] = json!(e);
                }
                v["evaluationTime"] = json!(r.eval_secs);
                v["lastEvaluation"] = json!(time(r.last_eval_ms));
            };
            match &r.rule.kind {
                RuleKind::Alert(_) if kind.as_deref() != Some("record") => {
                    let alerts: Vec<Value> = live(r).map(alert_json).collect();
                    let state = if live(r).any(|a| a.state == AlertState::Firing) {
                        "firing"
                    } else if live(r).next().is_some() {
                        "pending"
                    } else {
                        "inactive"
                    };
                    let mut v = json!({
                        "state": state,
                        "duration": r.rule.for_.as_secs_f64(),
                        "keepFiringFor": r.rule.keep_firing_for.as_secs_f64(),
                        "annotations": r.rule.annotations.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
                        "alerts": alerts,
                        "type": "alerting",
                    });
                    common(&mut v);
                    rules.push(v);
                }
                RuleKind::Record(_) if kind.as_deref() != Some("alert") => {
                    let mut v = json!({"type": "recording"});
                    common(&mut v);
                    rules.push(v);
                }
                _ => {}
            }
        }
        if rules.is_empty() && (kind.is_some() || !names.is_empty()) {
            continue;
        }
        out.push(json!({
            "name": g.name,
            "file": g.file,
            "rules": rules,
            "interval": g.interval.as_secs_f64(),
            "limit": g.limit,
            "evaluationTime": g.eval_secs,
            "lastEvaluation": time(g.last_eval_ms),
        }));
    }
    super::prom::ok_json(json!({ "groups": out }))
}

pub async fn alerts(State(api): State<Api>) -> Response {
    let alerts: Vec<Value> = api
        .alerting
        .groups()
        .iter()
        .flat_map(|g| g.rules.iter())
        .flat_map(|r| live(r).map(alert_json).collect::<Vec<_>>())
        .collect();
    super::prom::ok_json(json!({ "alerts": alerts }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_as_go_formats_them() {
        assert_eq!(super::value(1.0), "1e+00");
        assert_eq!(super::value(0.25), "2.5e-01");
        assert_eq!(super::value(1234.5), "1.2345e+03");
    }
}

#[derive(serde::Deserialize)]
pub struct BacktestReq {
    /// The rule file's text, and its name for messages.
    pub text: String,
    #[serde(default)]
    pub name: String,
    pub from_ms: i64,
    #[serde(default)]
    pub to_ms: Option<i64>,
    /// Groups without an interval use this (ms; default 60 s).
    #[serde(default)]
    pub interval_ms: Option<u64>,
}

/// `POST /capstan/v1/rules/backtest`: a rule file over stored history.
pub async fn backtest(
    State(api): State<Api>,
    axum::Json(req): axum::Json<BacktestReq>,
) -> Response {
    use axum::response::IntoResponse;
    let name = if req.name.is_empty() {
        "rules.yml".to_owned()
    } else {
        req.name
    };
    let groups = match crate::alerting::file::parse(&name, &req.text) {
        Ok(g) => g,
        Err(ps) => {
            let text: Vec<String> = ps.iter().map(ToString::to_string).collect();
            return super::error(axum::http::StatusCode::BAD_REQUEST, text.join("\n"));
        }
    };
    let to = req.to_ms.unwrap_or_else(crate::events::now_ms);
    let interval = std::time::Duration::from_millis(req.interval_ms.unwrap_or(60_000).max(1_000));
    let r = tokio::task::spawn_blocking(move || {
        crate::alerting::backtest::run(&groups, &*api.db, &api.engine, req.from_ms, to, interval)
    })
    .await;
    match r {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => super::error(axum::http::StatusCode::BAD_REQUEST, e),
        Err(e) => super::error(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
