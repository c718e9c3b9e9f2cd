//! The Prometheus HTTP API against real clients and the reference:
//! - promtool (Debian's `prometheus` package) queries capstan, instant and range;
//! - a differential test: a real Prometheus scrapes a real node_exporter and itself,
//!   and remote-writes every sample to capstan; the same queries, covering every
//!   function and operator family, go to both HTTP APIs and must agree
//!   (relative tolerance 1e-6, NaN equal to NaN).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn idle_stack() -> TestStack {
    TestStack::new(
        "x-capstan:\n  scrape_interval: 1s\nservices:\n  idle:\n    command: [sleep, \"600\"]\n    environment: {CAPSTAN_TEST_MARKER: \"{marker}\"}\n    x-capstan:\n      metrics: {disable: true}\n",
    )
}

#[test]
fn promtool_queries_capstan() {
    let promtool = need("promtool");
    let s = idle_stack();
    s.up();
    let addr = daemon_addr(&s);
    let url = format!("http://{addr}");
    // Both of capstan's own jobs (itself and its host collector) scraped.
    wait_for("capstan's own up series", Duration::from_secs(30), || {
        let (_, b) = http_fetch(&addr, "/api/v1/query?query=up%7Bjob%3D%22capstan%22%7D");
        let (_, n) = http_fetch(&addr, "/api/v1/query?query=up%7Bjob%3D%22node%22%7D");
        (b.contains("\"value\"") && n.contains("\"value\"")).then_some(())
    });
    let out = Command::new(&promtool)
        .args(["query", "instant", &url, "up"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("up{instance=\"")
            && text.contains("job=\"capstan\"")
            && text.contains("=> 1 @["),
        "{text}"
    );
    let now = jiff::Timestamp::now();
    let start = (now - jiff::SignedDuration::from_secs(30)).to_string();
    let out = Command::new(&promtool)
        .args([
            "query",
            "range",
            "--start",
            &start,
            "--end",
            &now.to_string(),
            "--step",
            "1s",
            &url,
            "sum by (job) (up)",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("{job=\"capstan\"} =>") && text.contains("1 @["),
        "{text}"
    );
    // A syntax error is reported by promtool with capstan's message, exit code 1.
    let out = Command::new(&promtool)
        .args(["query", "instant", &url, "sum("])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad_data") || err.contains("parenthesis"),
        "{err}"
    );
    // Metadata of the scraped families, from the targets' HELP and TYPE lines.
    let (code, body) = http_fetch(&addr, "/api/v1/metadata?metric=capstan_scrape_targets");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["data"]["capstan_scrape_targets"],
        serde_json::json!([{"type": "gauge", "help": "Targets being scraped.", "unit": ""}]),
        "{body}"
    );
    let (_, body) = http_fetch(&addr, "/api/v1/metadata?limit=3");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"].as_object().unwrap().len(), 3, "{body}");
    let (code, _) = http_fetch(&addr, "/api/v1/metadata?limit=x");
    assert_eq!(code, 400);
    // Over HTTP: 400, bad_data, and where the error is.
    let (code, body) = http_fetch(
        &daemon_addr(&s),
        "/api/v1/query?query=sum%28rate%28x%5B5m%5D%29",
    );
    assert_eq!(code, 400, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errorType"], "bad_data", "{body}");
    assert_eq!(
        v["error"], "invalid parameter \"query\": 1:4: parse error: unclosed left parenthesis",
        "{body}"
    );
    let (code, body) = http_fetch(&daemon_addr(&s), "/api/v1/query?query=up%20%2B");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("1:5: parse error: unexpected end of input"),
        "{body}"
    );
    // Series, labels and label values, as promtool asks for them.
    let out = Command::new(&promtool)
        .args(["query", "series", "--match", "up", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("job=\"capstan\""));
    let out = Command::new(&promtool)
        .args(["query", "labels", &url, "job"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("capstan") && text.contains("node"), "{text}");
    s.ok(&["down"]);
}

/// Every function and operator family, over counters, gauges and histograms.
const QUERIES: &[&str] = &[
    "up",
    "node_cpu_seconds_total",
    "node_cpu_seconds_total{mode=\"idle\"}",
    "node_cpu_seconds_total{mode!~\"idle|iowait\"}",
    "{__name__=~\"node_load.*\"}",
    "node_load1 offset 10s",
    // Negative offsets reach past the evaluation time, up to the newest samples
    // (the wait below covers them).
    "node_load1 offset -10s",
    "rate(node_cpu_seconds_total[30s] offset -10s)",
    "count_over_time(up[20s] offset -12s)",
    "node_memory_MemFree_bytes @ end()",
    "rate(node_cpu_seconds_total[30s])",
    "irate(node_cpu_seconds_total[30s])",
    "increase(node_cpu_seconds_total[40s])",
    "delta(node_memory_MemFree_bytes[30s])",
    "idelta(node_memory_MemFree_bytes[30s])",
    "deriv(node_memory_MemFree_bytes[30s])",
    "predict_linear(node_memory_MemFree_bytes[30s], 600)",
    "changes(node_memory_MemFree_bytes[30s])",
    "resets(node_cpu_seconds_total[30s])",
    "avg_over_time(node_load1[30s])",
    "sum_over_time(node_load1[30s])",
    "min_over_time(node_memory_MemFree_bytes[30s])",
    "max_over_time(node_memory_MemFree_bytes[30s])",
    "count_over_time(up[30s])",
    "stddev_over_time(node_memory_MemFree_bytes[30s])",
    "stdvar_over_time(node_load1[30s])",
    "quantile_over_time(0.9, node_memory_MemFree_bytes[30s])",
    "last_over_time(node_load1[30s])",
    "present_over_time(node_load1[30s])",
    "absent_over_time(nonexistent[30s])",
    "absent(nonexistent{job=\"x\"})",
    "absent(up)",
    "sum(rate(node_cpu_seconds_total[30s]))",
    "sum by (mode) (rate(node_cpu_seconds_total[30s]))",
    "sum without (cpu) (node_cpu_seconds_total)",
    "avg by (mode) (node_cpu_seconds_total)",
    "min by (cpu) (node_cpu_seconds_total)",
    "max without (mode) (node_cpu_seconds_total)",
    "count by (job) (up)",
    "group by (mode) (node_cpu_seconds_total)",
    "stddev by (mode) (node_cpu_seconds_total)",
    "stdvar(node_cpu_seconds_total)",
    "topk(3, node_cpu_seconds_total)",
    "bottomk(2, rate(node_cpu_seconds_total[30s]))",
    "quantile by (mode) (0.5, node_cpu_seconds_total)",
    "count_values(\"value\", up)",
    "node_memory_MemFree_bytes / node_memory_MemTotal_bytes * 100",
    "node_memory_MemTotal_bytes - node_memory_MemFree_bytes",
    "node_load1 % 0.3 + node_load5 ^ 2",
    "node_cpu_seconds_total > 10",
    "node_cpu_seconds_total > bool 10",
    "10 < node_cpu_seconds_total",
    "node_load1 == node_load1",
    "node_load1 != bool node_load5",
    "rate(node_cpu_seconds_total[30s]) / on(cpu) group_left sum by (cpu) (rate(node_cpu_seconds_total[30s]))",
    "node_cpu_seconds_total * ignoring(mode) group_left group by (cpu, instance, job) (node_cpu_seconds_total)",
    "sum by (cpu) (node_cpu_seconds_total) / on (cpu) group_right count by (cpu) (node_cpu_seconds_total)",
    "up and on(job) node_load1",
    "node_cpu_seconds_total{mode=\"idle\"} or node_cpu_seconds_total{mode=\"user\"}",
    "node_cpu_seconds_total unless node_cpu_seconds_total{mode=\"idle\"}",
    "-node_load1",
    "abs(-node_load1)",
    "ceil(node_load1)",
    "floor(node_load1)",
    "round(node_load1, 0.1)",
    "clamp(node_load1, 0.1, 0.5)",
    "clamp_min(node_load1, 0.2)",
    "clamp_max(node_load1, 0.2)",
    "sqrt(node_memory_MemFree_bytes)",
    "exp(node_load1)",
    "ln(node_memory_MemFree_bytes)",
    "log2(node_memory_MemFree_bytes)",
    "log10(node_memory_MemFree_bytes)",
    "sgn(node_load1 - 0.5)",
    "sin(node_load1) + cos(node_load1) + tan(node_load1)",
    "asin(clamp(node_load1, -1, 1)) + acos(clamp(node_load1, -1, 1)) + atan(node_load1)",
    "sinh(node_load1) + cosh(node_load1) + tanh(node_load1) + asinh(node_load1)",
    "deg(node_load1) + rad(node_load1) + pi()",
    "node_load1 atan2 node_load5",
    "timestamp(node_load1)",
    "time()",
    "vector(1)",
    "scalar(sum(up))",
    "sum(up) * scalar(count(up))",
    "label_replace(up, \"host\", \"$1\", \"instance\", \"(.*):.*\")",
    "label_join(up, \"combined\", \"-\", \"job\", \"instance\")",
    "sort(node_cpu_seconds_total)",
    "sort_desc(node_cpu_seconds_total)",
    "histogram_quantile(0.9, sum by (le) (rate(prometheus_http_request_duration_seconds_bucket[30s])))",
    "histogram_quantile(0.5, rate(prometheus_tsdb_compaction_chunk_range_seconds_bucket[30s]))",
    "hour(node_boot_time_seconds)",
    "day_of_week() + day_of_month() + day_of_year() + days_in_month() + month() + year() + minute()",
    "max_over_time(rate(node_cpu_seconds_total[20s])[30s:5s])",
    "avg_over_time(node_load1[30s:2s] offset 5s)",
    "sum(rate(node_cpu_seconds_total[30s] @ end()))",
];

/// The query with `job=~"pnode|pprom"` added to every selector.
fn scoped(q: &str) -> String {
    use capstan_promql::promql_parser::label::{MatchOp, Matcher};
    use capstan_promql::promql_parser::parser::Expr;
    fn walk(e: &mut Expr) {
        match e {
            Expr::VectorSelector(vs) => vs.matchers.matchers.push(Matcher::new(
                MatchOp::Re(regex::Regex::new("^(?:pnode|pprom)$").unwrap()),
                "job",
                "pnode|pprom",
            )),
            Expr::MatrixSelector(ms) => walk_vs(&mut ms.vs),
            Expr::Aggregate(a) => walk(&mut a.expr),
            Expr::Unary(u) => walk(&mut u.expr),
            Expr::Binary(b) => {
                walk(&mut b.lhs);
                walk(&mut b.rhs);
            }
            Expr::Paren(p) => walk(&mut p.expr),
            Expr::Subquery(s) => walk(&mut s.expr),
            Expr::Call(c) => c.args.args.iter_mut().for_each(|a| walk(a)),
            _ => {}
        }
    }
    fn walk_vs(vs: &mut capstan_promql::promql_parser::parser::VectorSelector) {
        let mut e = Expr::VectorSelector(vs.clone());
        walk(&mut e);
        if let Expr::VectorSelector(v) = e {
            *vs = v;
        }
    }
    let mut e = capstan_promql::parse(q).unwrap();
    walk(&mut e);
    e.to_string()
}

/// Result of a query as comparable data: labels → (timestamp, value) points.
fn results(addr: &str, path: &str) -> Result<BTreeMap<String, Vec<(f64, f64)>>, String> {
    let (code, body) = http_fetch(addr, path);
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if code != 200 {
        return Err(format!("{code}: {body}"));
    }
    let data = &v["data"];
    let num = |p: &Value| -> (f64, f64) {
        let s = p[1].as_str().unwrap();
        let x = match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            s => s.parse().unwrap(),
        };
        (p[0].as_f64().unwrap(), x)
    };
    let mut out = BTreeMap::new();
    match data["resultType"].as_str().unwrap() {
        "scalar" => {
            out.insert("scalar".into(), vec![num(&data["result"])]);
        }
        "vector" => {
            for s in data["result"].as_array().unwrap() {
                out.insert(s["metric"].to_string(), vec![num(&s["value"])]);
            }
        }
        "matrix" => {
            for s in data["result"].as_array().unwrap() {
                let pts = s["values"].as_array().unwrap().iter().map(num).collect();
                out.insert(s["metric"].to_string(), pts);
            }
        }
        other => return Err(format!("unexpected result type {other}")),
    }
    Ok(out)
}

fn without_name(labels_json: &str) -> String {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(labels_json).unwrap();
    v.remove("__name__");
    Value::Object(v).to_string()
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan())
        || a == b
        || ((a - b).abs() / (a.abs() + b.abs()).min(f64::MAX)) < 1e-6
}

fn diff(
    want: &BTreeMap<String, Vec<(f64, f64)>>,
    got: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Option<String> {
    if want.keys().ne(got.keys()) {
        return Some(format!(
            "series differ:\n  prometheus: {:?}\n  capstan:    {:?}",
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>()
        ));
    }
    for (k, w) in want {
        let g = &got[k];
        if w.len() != g.len() || w.iter().zip(g).any(|(a, b)| a.0 != b.0 || !close(a.1, b.1)) {
            return Some(format!("{k}:\n  prometheus: {w:?}\n  capstan:    {g:?}"));
        }
    }
    None
}

#[test]
fn queries_agree_with_a_real_prometheus_on_the_same_samples() {
    let node_exporter = need("prometheus-node-exporter");
    let s = idle_stack();
    s.up();
    let addr = daemon_addr(&s);
    let token_file = s.data_dir().join("token");
    let (_ne, ne_port) = start_node_exporter(&node_exporter);
    let prom_port = free_port();
    let config = remote_writing_config(
        &[
            ("pnode", format!("127.0.0.1:{ne_port}")),
            ("pprom", format!("127.0.0.1:{prom_port}")),
        ],
        &addr,
        &token_file,
    );
    let (_prom, prom_addr, _dir) = start_prometheus(&config, prom_port);
    // 75 s of samples at 1 s, then a time 15 s in the past, when every sample of
    // both scrape jobs has been pushed.
    std::thread::sleep(Duration::from_secs(75));
    let probe = "count_over_time(up{job=\"pnode\"}[60s])";
    let now = jiff::Timestamp::now().as_millisecond();
    // Scrapes happen at a fixed offset within each second; evaluate half a second
    // away from it, so no sample sits on a window's edge (Prometheus 3 made range
    // windows left-open; 2.x included the left edge).
    let (_, ts) = http_fetch(
        &prom_addr,
        "/api/v1/query?query=timestamp(up%7Bjob%3D%22pnode%22%7D)",
    );
    let scrape_ms = serde_json::from_str::<Value>(&ts).unwrap()["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse::<f64>()
        .unwrap();
    let offset = ((scrape_ms * 1000.0) as i64).rem_euclid(1000);
    let t = (now - 15_000) / 1000 * 1000 + (offset + 500) % 1000;
    let at = |t: i64| format!("{}.{:03}", t / 1000, t % 1000);
    // Every sample up to the furthest negative offset (12 s past `t`) delivered:
    // remote_write sends in batches (up to 1 s here), so the newest samples reach
    // capstan a moment after Prometheus holds them.
    wait_for(
        "capstan to hold the pushed samples",
        Duration::from_secs(30),
        || {
            let p = format!(
                "/api/v1/query?query={}&time={}",
                capstan::scrape::encode(probe),
                at(t + 13_000)
            );
            let a = results(&prom_addr, &p).ok()?;
            let b = results(&addr, &p).ok()?;
            (!a.is_empty() && diff(&a, &b).is_none()).then_some(())
        },
    );
    let mut failures = Vec::new();
    for q in QUERIES {
        // Only the series Prometheus scraped: capstan also scrapes itself.
        let scoped = scoped(q);
        let instant = format!(
            "/api/v1/query?query={}&time={}",
            capstan::scrape::encode(&scoped),
            at(t)
        );
        let range = format!(
            "/api/v1/query_range?query={}&start={}&end={}&step=5",
            capstan::scrape::encode(&scoped),
            at(t - 30_000),
            at(t)
        );
        for path in [instant, range] {
            let mut want = results(&prom_addr, &path);
            if q.contains("atan2") {
                // Prometheus before 2.46 kept the metric name on `atan2` results
                // (prometheus/prometheus#12595); Prometheus 3 drops it, as capstan does.
                want = want.map(|w| w.into_iter().map(|(k, v)| (without_name(&k), v)).collect());
            }
            let got = results(&addr, &path);
            match (want, got) {
                (Ok(w), Ok(g)) => {
                    if let Some(d) = diff(&w, &g) {
                        failures.push(format!("{q} ({path}): {d}"));
                    }
                }
                (Err(w), Err(_)) => {
                    failures.push(format!("{q}: both failed: {w}"));
                }
                (w, g) => failures.push(format!("{q}: prometheus {w:?}, capstan {g:?}")),
            }
        }
    }
    let (changed, starts) = series_starts_agree(&prom_addr, &addr, &mut failures);
    for f in &failures {
        eprintln!("MISMATCH {f}\n");
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries differ",
        failures.len(),
        QUERIES.len() * 2 + starts
    );
    // The data exercised the case where the two orders differ.
    assert!(
        changed > 0,
        "no window where Prometheus 2.42 and 2.51+ differ"
    );
    s.ok(&["down"]);
}

/// `rate`/`increase` over windows that hold the first samples of the series.
///
/// Prometheus 2.42 (Debian's) limits the extrapolation to a counter's zero point
/// before deciding whether the series started inside the window; Prometheus
/// 2.51 and later (prometheus/prometheus#13725, and the v3 test scripts capstan
/// passes) first cut it to half a sample interval and then to the zero point.
/// For a counter that starts small, the two differ. Each answer is checked
/// against its own version's rule applied to the raw samples Prometheus holds:
/// Prometheus' answer with 2.42's, capstan's with 2.51's. Returns how many
/// values the two rules put apart, and how many queries were made.
fn series_starts_agree(prom: &str, capstan: &str, failures: &mut Vec<String>) -> (usize, usize) {
    let at = |t: i64| format!("{}.{:03}", t / 1000, t % 1000);
    let (_, body) = http_fetch(
        prom,
        &format!(
            "/api/v1/query?query={}",
            capstan::scrape::encode("up{job=\"pnode\"}[10m]")
        ),
    );
    let first = serde_json::from_str::<Value>(&body).unwrap()["data"]["result"][0]["values"][0][0]
        .as_f64()
        .unwrap();
    let first = (first * 1000.0).round() as i64;
    let metrics = [
        "prometheus_http_requests_total",
        "prometheus_tsdb_head_samples_appended_total",
        "node_cpu_seconds_total",
    ];
    let (mut changed, mut queries) = (0, 0);
    for m in metrics {
        for (func, range, after) in [
            ("rate", 30, 10_500),
            ("increase", 60, 20_500),
            ("rate", 20, 25_500),
        ] {
            let t = first + after;
            let q = scoped(&format!("{func}({m}[{range}s])"));
            let path = |q: &str| {
                format!(
                    "/api/v1/query?query={}&time={}",
                    capstan::scrape::encode(q),
                    at(t)
                )
            };
            queries += 1;
            let (Ok(want), Ok(got), Ok(raw)) = (
                results(prom, &path(&q)),
                results(capstan, &path(&q)),
                results(prom, &path(&scoped(&format!("{m}[{range}s]")))),
            ) else {
                failures.push(format!("{q} at {t}: a query failed"));
                continue;
            };
            let per_second = if func == "rate" { range as f64 } else { 1.0 };
            let keys =
                |m: &BTreeMap<String, _>| m.keys().map(|k| without_name(k)).collect::<Vec<_>>();
            if keys(&want) != keys(&got) || keys(&raw) != keys(&want) {
                failures.push(format!("{q} at {t}: series differ"));
                continue;
            }
            for ((k, w), (g, samples)) in want.iter().zip(got.values().zip(raw.values())) {
                let window = t - range * 1000;
                let old = extrapolated(samples, window, t, false) / per_second;
                let new = extrapolated(samples, window, t, true) / per_second;
                if !close(w[0].1, old) {
                    failures.push(format!(
                        "{q} {k}: prometheus {} but 2.42's rule gives {old}",
                        w[0].1
                    ));
                }
                if !close(g[0].1, new) {
                    failures.push(format!(
                        "{q} {k}: capstan {} but 2.51's rule gives {new}",
                        g[0].1
                    ));
                }
                changed += usize::from(!close(old, new));
            }
        }
    }
    (changed, queries)
}

/// A counter's increase over the window (`start`, `end`] (ms) from its raw
/// samples (seconds, value), extrapolated by Prometheus 2.42's rule or by
/// 2.51's (`fixed`).
fn extrapolated(samples: &[(f64, f64)], start: i64, end: i64, fixed: bool) -> f64 {
    let (t0, v0) = samples[0];
    let (t1, v1) = samples[samples.len() - 1];
    let mut result = v1 - v0;
    for w in samples.windows(2) {
        if w[1].1 < w[0].1 {
            result += w[0].1;
        }
    }
    let mut to_start = t0 - start as f64 / 1000.0;
    let mut to_end = end as f64 / 1000.0 - t1;
    let sampled = t1 - t0;
    let avg = sampled / (samples.len() - 1) as f64;
    let to_zero = if result > 0.0 && v0 >= 0.0 {
        sampled * (v0 / result)
    } else {
        f64::INFINITY
    };
    if fixed {
        if to_start >= avg * 1.1 {
            to_start = avg / 2.0;
        }
        to_start = to_start.min(to_zero);
    } else {
        to_start = to_start.min(to_zero);
        if to_start >= avg * 1.1 {
            to_start = avg / 2.0;
        }
    }
    if to_end >= avg * 1.1 {
        to_end = avg / 2.0;
    }
    result * (sampled + to_start + to_end) / sampled
}
