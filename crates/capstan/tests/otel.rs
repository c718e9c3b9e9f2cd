//! A real OpenTelemetry client end to end: a service written with the Python SDK
//! (`opentelemetry-sdk`, `opentelemetry-exporter-otlp-proto-http` from PyPI,
//! installed by scripts/test) runs under capstan, which points the SDK at
//! itself through `OTEL_EXPORTER_OTLP_ENDPOINT`. The service sends a trace of
//! nested spans with attributes and an error, and prints log lines carrying the
//! trace and span ids. capstan returns the trace by id and by search, and the
//! log lines from the trace, through the API and the CLI.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
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

/// A span's attribute value in OTLP JSON (null when absent).
fn attr(s: &Value, k: &str) -> Value {
    s["attributes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv["key"] == k)
        .map(|kv| kv["value"].clone())
        .unwrap_or(Value::Null)
}

#[test]
fn a_python_sdk_trace_is_found_by_id_by_search_and_with_its_logs() {
    let python = python();
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

    // TraceQL, as Grafana's Tempo data source sends it: the matching spans come
    // back in the trace's spanSet.
    let tql = |q: &str| search(&format!("q={}", enc(q)));
    let found = tql(r#"{ resource.service.name = "shop" && span.db.system = "sqlite" }"#);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["traceID"], tid.as_str());
    let set = &found[0]["spanSets"][0];
    assert_eq!(set["matched"], 1, "{set}");
    assert_eq!(set["spans"][0]["name"], "SELECT stock");
    assert_eq!(set["spans"][0]["spanID"], select["spanId"]);
    assert_eq!(tql("{ status = error } && { kind = client }").len(), 1);
    assert_eq!(
        tql(r#"{ name =~ "charge.*" && statusMessage = "card declined" }"#).len(),
        1
    );
    assert_eq!(tql("{ span.db.rows >= 3 && duration >= 40ms }").len(), 1);
    assert_eq!(tql("{ duration > 1h }").len(), 0);
    assert_eq!(tql(r#"{ .user.id = "bob" }"#).len(), 0);
    assert_eq!(tql("{}").len(), 1);
    let (code, body) = http_fetch(&addr, &format!("/api/search?q={}", enc("{ name = }")));
    assert_eq!(code, 400);
    assert!(
        body.contains("column 10") && body.contains("expected a value"),
        "{body}"
    );

    // Tag names by scope and typed values, for the query editor.
    let (code, body) = http_fetch(&addr, "/api/v2/search/tags");
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let scope = |name: &str| -> Vec<String> {
        v["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| {
                s["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        scope("resource").contains(&"service.name".to_owned()),
        "{body}"
    );
    assert!(scope("span").contains(&"db.system".to_owned()), "{body}");
    assert!(
        scope("intrinsic").contains(&"duration".to_owned()),
        "{body}"
    );
    let values = |tag: &str| -> Value {
        let (code, body) = http_fetch(&addr, &format!("/api/v2/search/tag/{tag}/values"));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["tagValues"].clone()
    };
    assert!(
        values("resource.service.name")
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"type": "string", "value": "shop"}))
    );
    assert!(
        values("span.db.rows")
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"type": "int", "value": "3"}))
    );

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

/// An HTTP service instrumented with the SDK: each request's server span takes
/// its parent from the `traceparent` the proxy sends, and the response tells
/// what the service saw.
const WEB_APP: &str = r#"
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from opentelemetry.propagate import extract
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind

provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("web.handler")

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        ctx = extract(dict(self.headers.items()))
        with tracer.start_as_current_span("handle " + self.path, context=ctx, kind=SpanKind.SERVER) as s:
            c = s.get_span_context()
            body = json.dumps({
                "traceparent": self.headers.get("traceparent"),
                "trace_id": format(c.trace_id, "032x"),
                "span_id": format(c.span_id, "016x"),
                "sampled": s.is_recording(),
            }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// GET through the proxy with optional extra header lines; the JSON body.
fn get_json(port: u16, path: &str, headers: &str) -> Value {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: shop.test\r\nUser-Agent: otel-test\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert_eq!(out.get(9..12), Some("200"), "{out}");
    serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[test]
fn proxy_spans_join_the_applications_spans_in_one_trace() {
    let python = python();
    let port = free_port();
    let s = TestStack::new(&format!(
        r#"
services:
  shop:
    command: ["{python}", "web.py"]
    environment: {{CAPSTAN_TEST_MARKER: "{{marker}}", PYTHONUNBUFFERED: "1"}}
    ports: ["127.0.0.1:{port}:http"]
    x-capstan:
      metrics: {{disable: true}}
"#
    ));
    std::fs::write(s.file().parent().unwrap().join("web.py"), WEB_APP).unwrap();
    s.up();
    let addr = daemon_addr(&s);
    let spans_of = |tid: &str| -> Option<Vec<(String, Value)>> {
        let (code, body) = http_fetch(&addr, &format!("/api/traces/{tid}"));
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).unwrap();
        let mut out = Vec::new();
        for b in v["batches"].as_array()? {
            for ss in b["scopeSpans"].as_array()? {
                let scope = ss["scope"]["name"].as_str().unwrap_or("").to_owned();
                for sp in ss["spans"].as_array()? {
                    out.push((scope.clone(), sp.clone()));
                }
            }
        }
        Some(out)
    };

    // Not sampled by the caller: the app sees the caller's context untouched and
    // the proxy records nothing (checked below, once later requests are in).
    let quiet = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let seen = wait_for("the app behind the proxy", Duration::from_secs(30), || {
        let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(c, "GET /quiet HTTP/1.1\r\nHost: shop.test\r\ntraceparent: {quiet}\r\nConnection: close\r\n\r\n").ok()?;
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        let v: Value = serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()?;
        Some(v)
    });
    assert_eq!(seen["traceparent"], quiet);
    assert_eq!(seen["sampled"], false);

    // A caller's sampled context: caller span → proxy span → app span.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let seen = get_json(port, "/cart?id=7", &format!("traceparent: {caller}\r\n"));
    let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(seen["trace_id"], tid);
    let forwarded = seen["traceparent"].as_str().unwrap();
    assert!(forwarded.starts_with(&format!("00-{tid}-")) && forwarded.ends_with("-01"));
    let proxy_span_id = &forwarded[36..52];
    assert_ne!(proxy_span_id, "00f067aa0ba902b7");
    let spans = wait_for(
        "both spans of the caller's trace",
        Duration::from_secs(30),
        || spans_of(tid).filter(|s| s.len() == 2),
    );
    let (_, proxy) = spans
        .iter()
        .find(|(scope, _)| scope == "capstan.proxy")
        .unwrap();
    let (_, app) = spans
        .iter()
        .find(|(scope, _)| scope == "web.handler")
        .unwrap();
    assert_eq!(proxy["spanId"], proxy_span_id);
    assert_eq!(proxy["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(app["parentSpanId"], proxy_span_id);
    assert_eq!(app["spanId"], seen["span_id"]);
    assert_eq!(proxy["name"], "GET");
    assert_eq!(proxy["kind"], 2);
    assert_eq!(attr(proxy, "url.path")["stringValue"], "/cart");
    assert_eq!(attr(proxy, "url.query")["stringValue"], "id=7");
    assert_eq!(
        attr(proxy, "user_agent.original")["stringValue"],
        "otel-test"
    );
    assert_eq!(
        attr(proxy, "http.response.status_code")["intValue"]
            .to_string()
            .trim_matches('"'),
        "200"
    );
    let num = |s: &Value, k: &str| -> i64 { s[k].as_str().unwrap().parse().unwrap() };
    assert!(num(proxy, "startTimeUnixNano") <= num(app, "startTimeUnixNano"));
    assert!(num(proxy, "endTimeUnixNano") >= num(app, "endTimeUnixNano"));

    // No context: the proxy starts the trace and its span is the root.
    let seen = get_json(port, "/fresh", "");
    let tid = seen["trace_id"].as_str().unwrap().to_owned();
    let spans = wait_for("both spans of a new trace", Duration::from_secs(30), || {
        spans_of(&tid).filter(|s| s.len() == 2)
    });
    let (_, proxy) = spans
        .iter()
        .find(|(scope, _)| scope == "capstan.proxy")
        .unwrap();
    let (_, app) = spans
        .iter()
        .find(|(scope, _)| scope == "web.handler")
        .unwrap();
    assert!(
        proxy["parentSpanId"].as_str().unwrap_or("").is_empty(),
        "{proxy}"
    );
    assert_eq!(app["parentSpanId"], proxy["spanId"]);
    // The search lists the trace under its root, the proxy's span.
    let (code, body) = http_fetch(&addr, "/api/search?tags=url.path%3D%2Ffresh");
    assert_eq!(code, 200);
    let found: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(found["traces"][0]["traceID"], tid.as_str(), "{body}");
    assert_eq!(found["traces"][0]["rootTraceName"], "GET");
    assert_eq!(found["traces"][0]["spanCount"], 2);
    // The access log line carries the same trace id.
    let logs = wait_for("the access log line", Duration::from_secs(10), || {
        let l = s.stored_logs("shop");
        l.contains("path=\"/fresh\"").then_some(l)
    });
    let line = logs
        .lines()
        .find(|l| l.contains("path=\"/fresh\""))
        .unwrap();
    assert!(line.contains(&format!("trace_id={tid}")), "{line}");

    // The unsampled request, sent first, left no span.
    assert_eq!(
        http_fetch(&addr, "/api/traces/0af7651916cd43dd8448eb211c80319c").0,
        404
    );
}
