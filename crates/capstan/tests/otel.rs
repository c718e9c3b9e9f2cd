//! A real OpenTelemetry client end to end: a service written with the Python SDK
//! (`opentelemetry-sdk`, `opentelemetry-exporter-otlp-proto-http` from PyPI,
//! installed by scripts/test) runs under capstan, which points the SDK at
//! itself through `OTEL_EXPORTER_OTLP_ENDPOINT`. The service sends a trace of
//! nested spans with attributes and an error, and prints log lines carrying the
//! trace and span ids. capstan returns the trace by id and by search, and the
//! log lines from the trace, through the API and the CLI.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const APP: &str = r#"
import json, sys, time
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

provider = TracerProvider(resource=Resource.create({"deployment.environment": "test"}))
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("shop.checkout", "1.2.3")

def ids(span):
    c = span.get_span_context()
    return format(c.trace_id, "032x"), format(c.span_id, "016x")

with tracer.start_as_current_span("POST /checkout", kind=SpanKind.SERVER,
                                  attributes={"http.method": "POST", "user.id": "ann"}) as root:
    tid, sid = ids(root)
    print(json.dumps({"level": "info", "msg": "checkout started", "trace_id": tid, "span_id": sid}), flush=True)
    with tracer.start_as_current_span("reserve stock") as reserve:
        with tracer.start_as_current_span("SELECT stock", kind=SpanKind.CLIENT) as q:
            q.set_attribute("db.system", "sqlite")
            q.set_attribute("db.rows", 3)
            time.sleep(0.05)
            _, qid = ids(q)
            print(json.dumps({"level": "debug", "msg": "stock row locked", "trace_id": tid, "span_id": qid}), flush=True)
    with tracer.start_as_current_span("charge card") as charge:
        charge.set_status(Status(StatusCode.ERROR, "card declined"))
        _, cid = ids(charge)
        print(f'level=error msg="card declined" trace_id={tid} span_id={cid}', flush=True)
provider.shutdown()
print(json.dumps({"msg": "trace sent", "trace_id": tid}), flush=True)
sys.stdout.flush()
time.sleep(3600)
"#;

#[test]
fn a_python_sdk_trace_is_found_by_id_by_search_and_with_its_logs() {
    // The python3 on PATH: the one scripts/test installed the SDK into.
    let python = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("python3"))
                .find(|p| p.exists())
        })
        .expect("python3 on PATH")
        .display()
        .to_string();
    let s = TestStack::new(&format!(
        r#"
services:
  shop:
    command: ["{python}", "app.py"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", PYTHONUNBUFFERED: "1"}}
    x-capstan:
      metrics: {{disable: true}}
"#
    ));
    std::fs::write(s.file().parent().unwrap().join("app.py"), APP).unwrap();
    s.up();
    let addr = daemon_addr(&s);

    // The app prints its trace id once the SDK has exported every span.
    let tid = wait_for("the app's trace", Duration::from_secs(60), || {
        let logs = s.stored_logs("shop");
        let line = logs.lines().find(|l| l.contains("trace sent"))?;
        let v: Value = serde_json::from_str(line.trim_start_matches(|c| c != '{')).ok()?;
        Some(v["trace_id"].as_str()?.to_owned())
    });

    // By id, with no time range: Tempo's v1 shape.
    let (code, body) = http_fetch(&addr, &format!("/api/traces/{tid}"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let batch = &v["batches"][0];
    let res: Vec<(String, String)> = batch["resource"]["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv["key"].as_str().unwrap().to_owned(),
                kv["value"]["stringValue"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let has = |k: &str, val: &str| res.iter().any(|(a, b)| a == k && b == val);
    assert!(has("service.name", "shop"), "{res:?}");
    assert!(has("capstan.replica", "0"), "{res:?}");
    assert!(has("deployment.environment", "test"), "{res:?}");
    assert!(has("telemetry.sdk.language", "python"), "{res:?}");
    assert_eq!(batch["scopeSpans"][0]["scope"]["name"], "shop.checkout");
    let spans = batch["scopeSpans"][0]["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 4, "{body}");
    let by_name = |n: &str| spans.iter().find(|s| s["name"] == n).unwrap();
    let root = by_name("POST /checkout");
    let reserve = by_name("reserve stock");
    let select = by_name("SELECT stock");
    let charge = by_name("charge card");
    assert_eq!(root["traceId"], tid.as_str());
    assert!(root["parentSpanId"].as_str().unwrap_or("").is_empty());
    assert_eq!(reserve["parentSpanId"], root["spanId"]);
    assert_eq!(select["parentSpanId"], reserve["spanId"]);
    assert_eq!(charge["parentSpanId"], root["spanId"]);
    assert_eq!(root["kind"], 2, "SERVER as OTLP's integer enum");
    assert_eq!(charge["status"]["code"], 2);
    assert_eq!(charge["status"]["message"], "card declined");
    let attr = |s: &Value, k: &str| -> Value {
        s["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv["key"] == k)
            .map(|kv| kv["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(attr(root, "user.id")["stringValue"], "ann");
    assert_eq!(
        attr(select, "db.rows")["intValue"]
            .to_string()
            .trim_matches('"'),
        "3"
    );
    let dur = |s: &Value| {
        s["endTimeUnixNano"]
            .as_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            - s["startTimeUnixNano"]
                .as_str()
                .unwrap()
                .parse::<i64>()
                .unwrap()
    };
    assert!(dur(select) >= 50_000_000, "{}", dur(select));

    // v2 shape, an unknown id and a malformed one.
    let (code, body) = http_fetch(&addr, &format!("/api/v2/traces/{tid}"));
    assert_eq!(code, 200);
    let v2: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v2["trace"]["resourceSpans"][0]["scopeSpans"][0]["spans"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        http_fetch(&addr, &format!("/api/traces/{}", "ab".repeat(16))).0,
        404
    );
    let (code, body) = http_fetch(&addr, "/api/traces/not-hex");
    assert_eq!(code, 400);
    assert!(body.contains("not a trace id"), "{body}");

    // By search: service, span name, status, attributes, durations.
    let search = |q: &str| -> Vec<Value> {
        let (code, body) = http_fetch(&addr, &format!("/api/search?{q}"));
        assert_eq!(code, 200, "{q}: {body}");
        serde_json::from_str::<Value>(&body).unwrap()["traces"]
            .as_array()
            .unwrap()
            .clone()
    };
    let found = search("tags=service.name%3Dshop");
    assert_eq!(found.len(), 1, "{found:?}");
    let t = &found[0];
    assert_eq!(t["traceID"], tid.as_str());
    assert_eq!(t["rootServiceName"], "shop");
    assert_eq!(t["rootTraceName"], "POST /checkout");
    assert_eq!(t["spanCount"], 4);
    assert_eq!(t["errorCount"], 1);
    assert!(t["durationMs"].as_i64().unwrap() >= 50);
    assert_eq!(search("name=SELECT%20stock&status=error").len(), 0);
    assert_eq!(search("name=charge%20card&status=error").len(), 1);
    assert_eq!(
        search("tags=db.system%3Dsqlite%20service.name%3Dshop").len(),
        1
    );
    assert_eq!(search("tags=db.system%3Dpostgres").len(), 0);
    assert_eq!(search("minDuration=40ms").len(), 1);
    assert_eq!(search("minDuration=1h").len(), 0);
    assert_eq!(search("maxDuration=1ms").len(), 0);
    assert_eq!(http_fetch(&addr, "/api/search?minDuration=soon").0, 400);

    // The log lines that carry the trace id, down to their spans.
    let (code, body) = http_fetch(&addr, &format!("/api/traces/{tid}/logs"));
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let logs = v["logs"].as_array().unwrap();
    let span_of = |text: &str| -> Option<String> {
        logs.iter()
            .find(|l| l["line"].as_str().unwrap().contains(text))
            .map(|l| l["span_id"].as_str().unwrap_or("").to_owned())
    };
    assert_eq!(logs.len(), 4, "{body}");
    assert_eq!(
        span_of("checkout started").unwrap(),
        root["spanId"].as_str().unwrap()
    );
    assert_eq!(
        span_of("stock row locked").unwrap(),
        select["spanId"].as_str().unwrap()
    );
    assert_eq!(
        span_of("card declined").unwrap(),
        charge["spanId"].as_str().unwrap()
    );
    assert_eq!(logs[0]["labels"]["service"], "shop");

    // The CLI: search, the waterfall with the logs under their spans, and LogQL.
    let out = s.ok(&["traces", "--service", "shop", "--errors"]);
    assert!(
        out.contains(&tid) && out.contains("shop: POST /checkout"),
        "{out}"
    );
    let out = s.ok(&["traces", "--min-duration", "1h"]);
    assert!(!out.contains(&tid), "{out}");
    let out = s.ok(&["trace", &tid, "--logs"]);
    let pos = |needle: &str| {
        out.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} in\n{out}"))
    };
    assert!(pos("shop: POST /checkout") < pos("  shop: reserve stock"));
    assert!(pos("  shop: reserve stock") < pos("    shop: SELECT stock"));
    assert!(pos("    shop: SELECT stock") < pos("stock row locked"));
    assert!(pos("  shop: charge card") < pos("card declined"));
    assert!(out.contains("ERROR"), "{out}");
    let out = s.ok(&[
        "logs",
        "--query",
        &format!(r#"{{service="shop"}} | trace_id="{tid}" | level="error""#),
    ]);
    assert!(
        out.contains("card declined") && !out.contains("checkout started"),
        "{out}"
    );
    let out = s.ok(&["logs", "shop", "--grep", "stock row", "-C", "1"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].contains("checkout started") && lines[0].contains(" - "),
        "{out}"
    );
    assert!(
        lines[1].contains("stock row locked") && lines[1].contains(" | "),
        "{out}"
    );
    assert!(lines[2].contains("card declined"), "{out}");
}
