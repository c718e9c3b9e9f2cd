//! Tables, colors and human formats shared by the subcommands.

use std::io::IsTerminal;

pub fn use_color() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stdout().is_terminal()
}

const COLORS: [u8; 6] = [36, 33, 32, 35, 34, 31];

/// A stable color per service/replica prefix.
pub fn paint(text: &str, key: &str, color: bool) -> String {
    if !color {
        return text.to_owned();
    }
    let h = key
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    format!("\x1b[{}m{text}\x1b[0m", COLORS[h as usize % COLORS.len()])
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

pub fn human_duration_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 < r.len() {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

pub fn ps_table(v: &serde_json::Value) -> String {
    let now = crate::events::now_ms();
    let mut rows = vec![
        [
            "SERVICE", "REPLICA", "REV", "PID", "STATE", "HEALTH", "RESTARTS", "UPTIME", "CPU",
            "MEM", "PORT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let empty = Vec::new();
    for r in v["replicas"].as_array().unwrap_or(&empty) {
        let pid = r["pid"].as_i64();
        rows.push(vec![
            r["service"].as_str().unwrap_or("").to_owned(),
            r["replica"].to_string(),
            r["revision"].as_str().unwrap_or("-").to_owned(),
            pid.map_or("-".into(), |p| p.to_string()),
            r["state"].as_str().unwrap_or("").to_owned(),
            r["health"].as_str().unwrap_or("").to_owned(),
            r["restarts"].to_string(),
            match (pid, r["started_ms"].as_i64()) {
                (Some(_), Some(s)) => human_duration_ms(now - s),
                _ => "-".into(),
            },
            match (r["cpu_percent"].as_f64(), r["cpu_limit"].as_f64()) {
                (None, _) => "-".into(),
                (Some(c), Some(l)) if l > 0.0 => format!("{c:.1}% ({:.0}% of {l})", c / l),
                (Some(c), _) => format!("{c:.1}%"),
            },
            r["memory_bytes"].as_u64().map_or("-".into(), human_bytes),
            r["port"]
                .as_u64()
                .filter(|_| pid.is_some())
                .map_or("-".into(), |p| p.to_string()),
        ]);
    }
    for s in v["services"].as_array().unwrap_or(&empty) {
        let name = s["name"].as_str().unwrap_or("");
        let has = v["replicas"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .any(|r| r["service"] == name);
        if !has {
            let state = if s["stopped"].as_bool() == Some(true) {
                "stopped"
            } else {
                "scaled to 0"
            };
            rows.push(vec![
                name.to_owned(),
                "-".into(),
                "-".into(),
                "-".into(),
                state.into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    let mut out = table(&rows);
    out.push_str(CPU_LEGEND);
    out
}

/// What `ps`'s CPU column means, below the table.
pub const CPU_LEGEND: &str = "CPU: percent of one CPU (100% = one core busy); (n% of L): share of the replica's limit of L CPUs\n";

pub fn event_line(v: &serde_json::Value, color: bool) -> String {
    let ts = v["time_ms"].as_i64().unwrap_or(0);
    let time = jiff::Timestamp::from_millisecond(ts)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default();
    let service = v["service"].as_str().unwrap_or("");
    let who = match (v["replica"].as_u64(), v["revision"].as_u64()) {
        (Some(r), Some(rev)) => format!("{service}-{r} r{rev}"),
        (Some(r), None) => format!("{service}-{r}"),
        _ => service.to_owned(),
    };
    format!(
        "{time}  {}  {:<14} {}",
        paint(&format!("{who:<14}"), &who, color),
        v["kind"].as_str().unwrap_or(""),
        v["reason"].as_str().unwrap_or("")
    )
}

/// `capstan autoscale status`: one block per service, a row per metric.
pub fn autoscale_table(list: &[serde_json::Value]) -> String {
    let now = crate::events::now_ms();
    let mut out = String::new();
    for s in list {
        let name = s["service"].as_str().unwrap_or("");
        out.push_str(&format!(
            "{name}: {} → {} replicas (min {}, max {})",
            s["current"], s["desired"], s["min"], s["max"]
        ));
        if let Some(t) = s["last_scale_ms"].as_i64() {
            out.push_str(&format!(", last scaled {} ago", human_duration_ms(now - t)));
        }
        if let Some(idle) = s["idle_seconds"].as_f64() {
            out.push_str(&format!(
                ", idle {}",
                human_duration_ms((idle * 1e3) as i64)
            ));
        }
        out.push('\n');
        let mut rows = vec![
            ["METRIC", "VALUE", "TARGET", "RATIO", "WANTS"]
                .map(String::from)
                .to_vec(),
        ];
        let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.2}"));
        for m in s["metrics"].as_array().into_iter().flatten() {
            rows.push(vec![
                m["metric"].as_str().unwrap_or("").to_owned(),
                num(&m["value"]),
                num(&m["target"]),
                num(&m["ratio"]),
                m["replicas"].as_u64().map_or("-".into(), |r| r.to_string()),
            ]);
        }
        if rows.len() > 1 {
            for line in table(&rows).lines() {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
        out.push_str(&format!(
            "  reason: {}\n",
            s["reason"].as_str().unwrap_or("")
        ));
    }
    if list.is_empty() {
        out.push_str("no service autoscales (add x-capstan.autoscale to one)\n");
    }
    out
}

/// `capstan rollout status`: each service's rollout, or the revision it runs.
pub fn rollout_status(v: &serde_json::Value, only: Option<&str>, now_ms: i64) -> String {
    let replicas = v["replicas"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    for s in v["services"].as_array().into_iter().flatten() {
        let name = s["name"].as_str().unwrap_or("");
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let rev = s["revision"].as_u64().unwrap_or(0);
        let r = &s["rollout"];
        if r.is_null() {
            out.push_str(&format!("{name}: revision {rev}, no rollout\n"));
            continue;
        }
        let of_rev = |want: bool| {
            replicas
                .iter()
                .filter(|x| x["service"] == name)
                .filter(|x| (x["revision"].as_str() == Some(rev.to_string().as_str())) == want)
                .collect::<Vec<_>>()
        };
        let new = of_rev(true);
        let ready = new
            .iter()
            .filter(|x| {
                x["state"] == "running" && x["health"] != "unhealthy" && x["health"] != "starting"
            })
            .count();
        let from = r["from"].as_u64().unwrap_or(0);
        if !r["canary"].is_null() {
            out.push_str(&canary_status(name, rev, from, r, now_ms));
            continue;
        }
        let what = if r["back"].as_bool().unwrap_or(false) {
            format!("rolling back to revision {rev} from {from}")
        } else {
            format!("rolling revision {from} -> {rev}")
        };
        out.push_str(&format!(
            "{name}: {what} ({}) for {}: {ready} of {} new replicas ready, {} other still running\n",
            r["plan"].as_str().unwrap_or(""),
            human_duration_ms((now_ms - r["since_ms"].as_i64().unwrap_or(now_ms)).max(0)),
            s["desired"].as_u64().unwrap_or(0),
            of_rev(false).len()
        ));
        out.push_str(&checks_table(&r["checks"]));
    }
    out
}

/// A canary's step, share, and each check's verdict with its numbers.
fn canary_status(name: &str, rev: u64, from: u64, r: &serde_json::Value, now_ms: i64) -> String {
    let c = &r["canary"];
    let (step, steps) = (
        c["step"].as_u64().unwrap_or(0),
        c["steps"].as_u64().unwrap_or(0),
    );
    let step = if step > steps {
        "promoted".to_owned()
    } else {
        format!("step {step} of {steps}")
    };
    let mut out = format!(
        "{name}: canary of revision {rev} over {from} ({}) for {}
  {step}, weight {}%: {}\n",
        r["plan"].as_str().unwrap_or(""),
        human_duration_ms((now_ms - r["since_ms"].as_i64().unwrap_or(now_ms)).max(0)),
        c["weight"].as_u64().unwrap_or(0),
        c["phase"].as_str().unwrap_or(""),
    );
    if let Some(b) = c["baseline"].as_array().filter(|b| !b.is_empty()) {
        let ids: Vec<String> = b.iter().map(|x| x.to_string()).collect();
        out.push_str(&format!(
            "  baseline: replica {} of revision {from}\n",
            ids.join(", ")
        ));
    }
    if let Some(w) = c["waiting"].as_str() {
        out.push_str(&format!("  inconclusive: {w}\n"));
    }
    out.push_str(&checks_table(&c["checks"]));
    out
}

/// Check verdicts as a table: name, verdict, value, threshold, sample
/// sizes, window and detail.
fn checks_table(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let checks = v.as_array().cloned().unwrap_or_default();
    if !checks.is_empty() {
        out.push_str(&format!(
            "  {:<22} {:<13} {:>10}  {:<18} {:>8} {:>8}  {}\n",
            "CHECK", "VERDICT", "VALUE", "THRESHOLD", "CANARY", "BASE", "WINDOW / DETAIL"
        ));
    }
    for k in checks {
        let value = k["value"]
            .as_f64()
            .map_or("-".to_owned(), |v| format!("{v:.4}"));
        out.push_str(&format!(
            "  {:<22} {:<13} {:>10}  {:<18} {:>8} {:>8}  {}{}\n",
            k["name"].as_str().unwrap_or(""),
            k["outcome"].as_str().unwrap_or(""),
            value,
            k["threshold"].as_str().unwrap_or(""),
            k["canary_requests"].as_u64().unwrap_or(0),
            k["baseline_requests"].as_u64().unwrap_or(0),
            k["window"].as_str().unwrap_or(""),
            k["detail"]
                .as_str()
                .filter(|d| !d.is_empty())
                .map(|d| format!("; {d}"))
                .unwrap_or_default(),
        ));
    }
    out
}

fn ms_of(rfc3339: &serde_json::Value) -> Option<i64> {
    rfc3339
        .as_str()?
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
        .filter(|t| *t > 0)
}

/// An alert's labels but its name, as `k=v k=v`.
fn alert_labels(labels: &serde_json::Value) -> String {
    labels
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| *k != "alertname")
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `capstan alerts`: firing and pending alerts.
pub fn alerts_table(v: &serde_json::Value, now_ms: i64) -> String {
    let alerts = v["alerts"].as_array().cloned().unwrap_or_default();
    if alerts.is_empty() {
        return "no alerts firing or pending\n".into();
    }
    let mut out = format!(
        "{:<28} {:<9} {:<8} {:<40} {}\n",
        "ALERT", "STATE", "AGE", "LABELS", "SUMMARY"
    );
    for a in alerts {
        let labels = alert_labels(&a["labels"]);
        let age =
            ms_of(&a["activeAt"]).map_or("-".into(), |t| human_duration_ms((now_ms - t).max(0)));
        let by: Vec<&str> = a["inhibitedBy"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        let (state, why) = if by.is_empty() {
            (a["state"].as_str().unwrap_or(""), String::new())
        } else {
            (
                "inhibited",
                format!(" (held back: {} firing)", by.join(", ")),
            )
        };
        out.push_str(&format!(
            "{:<28} {:<9} {:<8} {:<40} {}{why}\n",
            a["labels"]["alertname"].as_str().unwrap_or(""),
            state,
            age,
            labels,
            a["annotations"]["summary"].as_str().unwrap_or("")
        ));
    }
    out
}

/// `capstan alerts --history`: a transition per line, oldest first.
pub fn alert_history(lines: &[serde_json::Value]) -> String {
    if lines.is_empty() {
        return "no alert transitions in that time\n".into();
    }
    let mut out = format!(
        "{:<25} {:<28} {:<9} {:>10}  {}\n",
        "TIME", "ALERT", "STATE", "VALUE", "LABELS"
    );
    for l in lines {
        let labels = alert_labels(&l["labels"]);
        out.push_str(&format!(
            "{:<25} {:<28} {:<9} {:>10}  {}\n",
            l["at"].as_str().unwrap_or(""),
            l["alertname"].as_str().unwrap_or(""),
            l["state"].as_str().unwrap_or(""),
            l["value"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.4}")),
            labels
        ));
    }
    out
}

/// `capstan rules`: each rule's health and last evaluation.
pub fn rules_table(v: &serde_json::Value, now_ms: i64) -> String {
    let groups = v["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        return "no rules (add x-capstan.rule_files to the stack)\n".into();
    }
    let mut out = format!(
        "{:<16} {:<36} {:<10} {:<8} {:<9} {:<9} {}\n",
        "GROUP", "RULE", "TYPE", "HEALTH", "LAST", "DURATION", "ERROR / STATE"
    );
    for g in groups {
        for r in g["rules"].as_array().into_iter().flatten() {
            let last = ms_of(&r["lastEvaluation"]).map_or("never".into(), |t| {
                format!("{} ago", human_duration_ms((now_ms - t).max(0)))
            });
            let secs = r["evaluationTime"].as_f64().unwrap_or(0.0);
            let extra = r["lastError"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| r["state"].as_str().map(str::to_owned))
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<16} {:<36} {:<10} {:<8} {:<9} {:<9} {}\n",
                g["name"].as_str().unwrap_or(""),
                r["name"].as_str().unwrap_or(""),
                r["type"].as_str().unwrap_or(""),
                r["health"].as_str().unwrap_or(""),
                last,
                format!("{:.1}ms", secs * 1e3),
                extra
            ));
        }
    }
    out
}

/// `capstan history`: a revision per line, newest first, with what changed.
pub fn history_table(v: &serde_json::Value, now_ms: i64) -> String {
    let mut out = format!(
        "{:<5} {:<12} {:<9} {:<8} WHY\n",
        "REV", "STATUS", "TRIGGER", "AGE"
    );
    for r in v["revisions"].as_array().into_iter().flatten() {
        let age = now_ms - r["time_ms"].as_i64().unwrap_or(now_ms);
        out.push_str(&format!(
            "{:<5} {:<12} {:<9} {:<8} {}\n",
            r["revision"].as_u64().unwrap_or(0),
            r["status"].as_str().unwrap_or(""),
            r["trigger"].as_str().unwrap_or(""),
            human_duration_ms(age.max(0)),
            r["why"].as_str().unwrap_or("")
        ));
        for d in r["diff"].as_array().into_iter().flatten() {
            out.push_str(&format!("      ~ {}\n", d.as_str().unwrap_or("")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ps_says_what_cpu_percent_means() {
        let v = serde_json::json!({
            "replicas": [
                {"service": "web", "replica": 0, "pid": 10, "state": "running", "health": "none",
                 "restarts": 0, "cpu_percent": 25.0, "cpu_limit": 0.5, "port": 1, "revision": "7"},
                {"service": "api", "replica": 0, "pid": 11, "state": "running", "health": "none",
                 "restarts": 0, "cpu_percent": 130.0, "port": 2},
            ],
            "services": [],
        });
        let t = ps_table(&v);
        assert!(t.contains("25.0% (50% of 0.5)"), "{t}");
        assert!(t.contains("130.0%"), "{t}");
        assert!(t.ends_with(CPU_LEGEND), "{t}");
        // The revision, which tells two replicas of one index apart during a replacement.
        assert!(
            t.lines().next().unwrap().contains("REPLICA  REV  PID"),
            "{t}"
        );
        assert!(t.contains("web      0        7    10"), "{t}");
    }
}
