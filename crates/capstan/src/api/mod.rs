//! The daemon's HTTP API. `/capstan/v1` is the control API the CLI uses (bearer
//! token from `.capstan/token`); `/-/healthy` and `/-/ready` are open.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};

use crate::logs::LogQuery;
use crate::spec::Stack;
use crate::state::StatusBoard;
use crate::state::control::{Error as SupervisorError, SupervisorHandle};

#[derive(Clone)]
pub struct Api {
    pub board: Arc<StatusBoard>,
    pub history: Arc<crate::state::history::History>,
    pub notify: Arc<crate::notify::NotifyStats>,
    /// Each remote_write receiver's counters.
    pub remote_write: Arc<Vec<Arc<crate::forward::remote_write::Stats>>>,
    /// Each logs and traces forwarding target's counters.
    pub forward: Arc<crate::forward::Forwarding>,
    pub events: Arc<crate::events::EventLog>,
    pub logs: Arc<crate::logs::engine::LogEngine>,
    pub traces: Arc<crate::traces::TraceStore>,
    pub proxy: Arc<crate::proxy::Proxy>,
    pub scraper: Arc<crate::scrape::Scraper>,
    pub autoscaler: Arc<crate::autoscale::Autoscaler>,
    pub alerting: Arc<crate::alerting::manager::Alerting>,
    pub supervisor: SupervisorHandle,
    pub token: Arc<String>,
    pub info: Arc<serde_json::Value>,
    /// Becomes true when the daemon is stopping: open streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub db: Arc<capstan_tsdb::Db>,
    pub engine: Arc<capstan_promql::Engine>,
    pub query_stats: Arc<prom::QueryStats>,
    pub started: jiff::Timestamp,
    /// The storage retention as Prometheus' runtimeinfo shows it (`15d`).
    pub retention: String,
    /// Listening beyond loopback: the query API wants the token too.
    pub reads_need_token: bool,
    /// The address the API listens on (requests must name it, or loopback).
    pub listen: std::net::SocketAddr,
}

pub mod dashboard;
pub mod guard;
pub mod ingest;
pub mod loki;
pub mod prom;
pub mod remote_write;
pub mod rules;
pub mod serve;
pub mod tempo;

pub fn router(api: Api) -> Router {
    let control = Router::new()
        .route("/status", get(status))
        .route("/ps", get(ps))
        .route("/autoscale", get(autoscale))
        .route("/apply", post(apply))
        .route("/scale", post(scale))
        .route("/history/{service}", get(history))
        .route("/rollback", post(rollback))
        .route("/promote", post(promote))
        .route("/rules/backtest", post(rules::backtest))
        .route("/abort", post(abort))
        .route("/stack", get(current_stack))
        .route("/services/{action}", post(service_action))
        .route("/down", post(down))
        .route("/events", get(events))
        .route("/logs", get(logs))
        .route("/logs/search", get(loki::search_logs))
        .route("/tsdb/select", get(tsdb_select))
        .layer(middleware::from_fn_with_state(api.clone(), auth));
    // One budget of concurrent ingest requests for every push endpoint.
    let slots = guard::Slots::new(guard::INGEST_SLOTS, guard::INGEST_WAIT);
    let ingest = Router::new()
        .route("/api/v1/write", post(remote_write::write))
        .layer(middleware::from_fn_with_state(
            slots.clone(),
            guard::limit_concurrency,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(32 << 20))
        .layer(middleware::from_fn_with_state(api.clone(), auth));
    let read = Router::new()
        .route("/query", get(prom::query).post(prom::query))
        .route(
            "/query_range",
            get(prom::query_range).post(prom::query_range),
        )
        .route("/series", get(prom::series).post(prom::series))
        .route("/labels", get(prom::labels).post(prom::labels))
        .route("/label/{name}/values", get(prom::label_values))
        .route("/metadata", get(prom::metadata))
        .route("/targets", get(prom::targets))
        .route("/rules", get(rules::rules))
        .route("/alerts", get(rules::alerts))
        .route("/status/buildinfo", get(prom::buildinfo))
        .route("/status/runtimeinfo", get(prom::runtimeinfo))
        .route("/status/tsdb", get(prom::tsdb_status))
        .route(
            "/format_query",
            get(prom::format_query).post(prom::format_query),
        )
        .layer(middleware::from_fn_with_state(api.clone(), read_auth));
    let loki_read = Router::new()
        .route("/query", get(loki::query).post(loki::query))
        .route(
            "/query_range",
            get(loki::query_range).post(loki::query_range),
        )
        .route("/labels", get(loki::labels).post(loki::labels))
        .route("/label", get(loki::labels))
        .route("/label/{name}/values", get(loki::label_values))
        .route("/series", get(loki::series).post(loki::series))
        .route("/tail", get(loki::tail))
        .layer(middleware::from_fn_with_state(api.clone(), read_auth));
    // Pushes are open on loopback like reads (Loki and OTLP senders, replicas'
    // SDKs), and want the token otherwise.
    let push = Router::new()
        .route("/loki/api/v1/push", post(ingest::loki_push))
        .route("/v1/logs", post(ingest::otlp_logs))
        .route("/v1/traces", post(ingest::otlp_traces))
        .layer(middleware::from_fn_with_state(
            slots,
            guard::limit_concurrency,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(ingest::MAX_BODY))
        .layer(middleware::from_fn_with_state(api.clone(), read_auth));
    let tempo = Router::new()
        .route("/traces/{id}", get(tempo::trace_v1))
        .route("/traces/{id}/logs", get(tempo::trace_logs))
        .route("/v2/traces/{id}", get(tempo::trace_v2))
        .route("/search", get(tempo::search))
        .route("/search/tags", get(tempo::search_tags))
        .route("/v2/search/tags", get(tempo::search_tags_v2))
        .route(
            "/v2/search/tag/{name}/values",
            get(tempo::search_tag_values_v2),
        )
        .route("/search/tag/{name}/values", get(tempo::search_tag_values))
        .route("/echo", get(tempo::echo))
        .layer(middleware::from_fn_with_state(api.clone(), read_auth));
    let pages = Router::new()
        .route("/", get(dashboard::overview))
        .route("/service/{name}", get(dashboard::service))
        .route("/explore", get(dashboard::explore))
        .route("/logs", get(dashboard::logs))
        .route("/traces", get(dashboard::traces))
        .route("/traces/{id}", get(dashboard::trace))
        .route("/alerts", get(dashboard::alerts))
        .layer(middleware::from_fn_with_state(
            api.clone(),
            dashboard::page_auth,
        ))
        .route(
            "/ui/api/events",
            get(dashboard::events).layer(middleware::from_fn_with_state(api.clone(), read_auth)),
        )
        .route("/ui/{version}/{file}", get(dashboard::asset))
        .route("/login", get(dashboard::login_form).post(dashboard::login))
        .route("/logout", post(dashboard::logout));
    let federate = Router::new()
        .route("/federate", get(prom::federate))
        .layer(middleware::from_fn_with_state(api.clone(), read_auth));
    Router::new()
        .nest("/capstan/v1", control)
        .merge(federate)
        .nest("/api/v1", read)
        .nest("/loki/api/v1", loki_read)
        .nest("/api", tempo)
        .merge(ingest)
        .merge(push)
        .merge(pages)
        .route("/metrics", get(own_metrics))
        .route("/metrics/node", get(node_metrics))
        .route("/-/healthy", get(|| async { "Capstan is Healthy.\n" }))
        .route("/-/ready", get(|| async { "Capstan is Ready.\n" }))
        .layer(middleware::from_fn_with_state(
            guard::Hosts::new(api.listen),
            guard::check_host,
        ))
        .layer(middleware::from_fn(guard::catch_panic))
        .with_state(api)
}

async fn auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), api.token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (see .capstan/token)",
        )
    }
}

/// Read endpoints are open on loopback, and want the token otherwise (the
/// bearer header, or the dashboard's login cookie).
async fn read_auth(State(api): State<Api>, req: Request, next: Next) -> Response {
    if reads_allowed(&api, req.headers()) {
        return next.run(req).await;
    }
    auth(State(api), req, next).await
}

/// Reads need no token (loopback), or the request carries the right one in
/// the bearer header or the dashboard's cookie.
pub(crate) fn reads_allowed(api: &Api, headers: &axum::http::HeaderMap) -> bool {
    !api.reads_need_token
        || dashboard::token_of(headers)
            .is_some_and(|t| constant_time_eq(t.as_bytes(), api.token.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Cancels a query when dropped: the request's future is dropped when its
/// client goes away, and the evaluation stops at its next check.
pub(crate) struct CancelOnDrop(pub(crate) Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A plain-text answer with `status` (Loki's and Tempo's error bodies).
pub(crate) fn text(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, format!("{msg}\n")).into_response()
}

pub(crate) fn bad_request(msg: impl std::fmt::Display) -> Response {
    text(StatusCode::BAD_REQUEST, msg)
}

/// Runs store work off the async threads; a panic in it answers 500.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        let why = match e.try_into_panic() {
            Ok(p) => {
                guard::PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let msg = guard::panic_message(p.as_ref());
                tracing::error!(panic = %msg, "a request's store work failed");
                msg
            }
            Err(e) => e.to_string(),
        };
        text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the request failed: {why}"),
        )
    })
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (
        code,
        Json(serde_json::json!({"status": "error", "error": msg.into()})),
    )
        .into_response()
}

async fn status(State(api): State<Api>) -> Json<serde_json::Value> {
    Json((*api.info).clone())
}

async fn ps(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "services": api.board.services(),
        "replicas": api.board.replicas(),
    }))
}

async fn autoscale(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "services": api.autoscaler.statuses() }))
}

/// A command's answer: 200 with its message, 400 for what the client asked
/// wrong, 503 while shutting down.
fn answer(r: Result<String, SupervisorError>) -> Response {
    match r {
        Ok(msg) => Json(serde_json::json!({"status": "ok", "message": msg})).into_response(),
        Err(e @ SupervisorError::ShuttingDown) => {
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(
            e @ (SupervisorError::NoSuchService(_)
            | SupervisorError::NotReady(_)
            | SupervisorError::Invalid(_)),
        ) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// A service's revisions, newest first (without their full definitions).
async fn history(
    State(api): State<Api>,
    axum::extract::Path(service): axum::extract::Path<String>,
) -> Response {
    if api.board.service(&service).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no such service: {service}"));
    }
    let revisions: Vec<serde_json::Value> = api
        .history
        .of(&service)
        .into_iter()
        .rev()
        .map(|r| {
            serde_json::json!({
                "revision": r.revision,
                "time_ms": r.time_ms,
                "hash": r.hash,
                "trigger": r.trigger,
                "status": r.status.as_str(),
                "why": r.why,
                "diff": r.diff,
            })
        })
        .collect();
    Json(serde_json::json!({"service": service, "revisions": revisions})).into_response()
}

/// The stack as the daemon runs it (what `capstan deploy` plans against).
async fn current_stack(State(api): State<Api>) -> Response {
    match api.supervisor.stack().await {
        Ok(stack) => Json(stack).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct RollbackReq {
    service: String,
    #[serde(default)]
    to: Option<u64>,
}

async fn rollback(State(api): State<Api>, Json(req): Json<RollbackReq>) -> Response {
    answer(api.supervisor.rollback(&req.service, req.to).await)
}

#[derive(serde::Deserialize)]
struct PromoteReq {
    service: String,
    #[serde(default)]
    full: bool,
}

async fn promote(State(api): State<Api>, Json(req): Json<PromoteReq>) -> Response {
    answer(api.supervisor.promote(req.service, req.full).await)
}

async fn abort(State(api): State<Api>, Json(req): Json<PromoteReq>) -> Response {
    answer(api.supervisor.abort(req.service).await)
}

async fn apply(State(api): State<Api>, Json(stack): Json<Stack>) -> Response {
    // The CLI loads files before it sends them; other clients are checked the
    // same way, so nothing the loader refuses reaches the supervisor.
    if let Err(errors) = stack.validate() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid stack: {}", errors.join("; ")),
        );
    }
    answer(api.supervisor.apply(stack).await)
}

async fn scale(State(api): State<Api>, Json(counts): Json<BTreeMap<String, u32>>) -> Response {
    answer(api.supervisor.scale(counts, true).await)
}

#[derive(Deserialize)]
struct Names {
    services: Vec<String>,
}

async fn service_action(
    State(api): State<Api>,
    Path(action): Path<String>,
    Json(n): Json<Names>,
) -> Response {
    match action.as_str() {
        "restart" => answer(api.supervisor.restart(n.services).await),
        "stop" => answer(api.supervisor.stop(n.services).await),
        "start" => answer(api.supervisor.start(n.services).await),
        other => error(
            StatusCode::NOT_FOUND,
            format!("unknown action {other:?}; expected restart, stop or start"),
        ),
    }
}

#[derive(Deserialize, Default)]
struct DownParams {
    /// Also remove the stack's named volumes.
    #[serde(default)]
    volumes: bool,
}

async fn down(State(api): State<Api>, Query(p): Query<DownParams>) -> Response {
    answer(api.supervisor.down(p.volumes).await)
}

#[derive(Deserialize, Default)]
struct StreamParams {
    #[serde(default)]
    follow: bool,
    /// Comma-separated service names.
    #[serde(default)]
    service: Option<String>,
    replica: Option<u32>,
    since_ns: Option<i64>,
    tail: Option<usize>,
}

fn ndjson(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        Ok::<_, Infallible>,
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build response"))
}

/// A follower fell behind the broadcast and missed items.
struct Lagged;

/// The next broadcast item; `None` once the daemon is stopping or the sender is gone.
async fn next_live<T: Clone>(
    live: &mut broadcast::Receiver<T>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<Result<T, Lagged>> {
    tokio::select! {
        r = live.recv() => match r {
            Ok(v) => Some(Ok(v)),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Err(Lagged)),
            Err(broadcast::error::RecvError::Closed) => None,
        },
        _ = stopping.wait_for(|s| *s) => None,
    }
}

fn line<T: serde::Serialize>(v: &T) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

async fn events(State(api): State<Api>, Query(p): Query<StreamParams>) -> Response {
    let (history, mut live) = api.events.subscribe_with_history();
    let mut stopping = api.stopping.clone();
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        for e in history
            .iter()
            .filter(|e| p.since_ns.is_none_or(|s| e.time_ms * 1_000_000 >= s))
        {
            if tx.send(line(e)).await.is_err() {
                return;
            }
        }
        if !p.follow {
            return;
        }
        while let Some(next) = next_live(&mut live, &mut stopping).await {
            match next {
                Ok(e) => {
                    if tx.send(line(&e)).await.is_err() {
                        return;
                    }
                }
                Err(Lagged) => continue,
            }
        }
    });
    ndjson(rx)
}

async fn logs(State(api): State<Api>, Query(p): Query<StreamParams>) -> Response {
    let q = LogQuery {
        services: p
            .service
            .as_deref()
            .map(|s| {
                s.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        replica: p.replica,
        since_ns: p.since_ns,
        tail: p.tail,
    };
    let shared = api.clone();
    let (tx, rx) = mpsc::channel(1024);
    let mut stopping = api.stopping.clone();
    tokio::task::spawn(async move {
        let (history, mut live) = shared.logs.query_and_subscribe(&q);
        // Highest sequence number sent per replica, so nothing is sent twice.
        let mut sent: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for r in history {
            sent.insert((r.service.clone(), r.replica), r.seq);
            if tx.send(line(&r)).await.is_err() {
                return;
            }
        }
        if !p.follow {
            return;
        }
        while let Some(next) = next_live(&mut live, &mut stopping).await {
            match next {
                Ok(r) => {
                    if !q.wants(&r.service, r.replica) {
                        continue;
                    }
                    let last = sent.entry((r.service.clone(), r.replica)).or_insert(0);
                    if r.seq <= *last {
                        continue;
                    }
                    *last = r.seq;
                    if tx.send(line(&*r)).await.is_err() {
                        return;
                    }
                }
                Err(Lagged) => {
                    // Fell behind the broadcast: catch up from the files.
                    let missed = shared.logs.catch_up(&q, &sent);
                    for r in missed {
                        let last = sent.entry((r.service.clone(), r.replica)).or_insert(0);
                        if r.seq > *last {
                            *last = r.seq;
                            if tx.send(line(&r)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
    });
    ndjson(rx)
}

/// Raw samples of the series whose labels equal every query parameter (`name` is
/// the metric name; `since_ms` bounds the time). Stale markers show as "stale".
/// A debugging view until the Prometheus query API exists.
async fn tsdb_select(
    State(api): State<Api>,
    Query(mut params): Query<BTreeMap<String, String>>,
) -> Response {
    let since = params
        .remove("since_ms")
        .and_then(|s| s.parse::<i64>().ok())
        .unwrap_or(i64::MIN);
    let matchers: Vec<capstan_tsdb::Matcher> = params
        .iter()
        .map(|(k, v)| capstan_tsdb::Matcher::eq(if k == "name" { "__name__" } else { k }, v))
        .collect();
    if matchers.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "give at least one label, e.g. ?name=up",
        );
    }
    let db = api.db.clone();
    let out = tokio::task::block_in_place(|| {
        db.select(&matchers, since, i64::MAX)
            .iter()
            .map(|s| {
                let labels: BTreeMap<&str, &str> = s.labels.iter().collect();
                let samples: Vec<(i64, String)> = s
                    .samples()
                    .map(|(t, v)| {
                        (
                            t,
                            if capstan_tsdb::is_stale(v) {
                                "stale".to_owned()
                            } else {
                                v.to_string()
                            },
                        )
                    })
                    .collect();
                serde_json::json!({"labels": labels, "samples": samples})
            })
            .collect::<Vec<_>>()
    });
    Json(serde_json::Value::Array(out)).into_response()
}

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// capstan's own metrics and its replicas' resources.
async fn own_metrics(State(api): State<Api>) -> Response {
    let text = tokio::task::block_in_place(|| {
        let sources = crate::collect::own::Sources {
            board: &api.board,
            scrape: &api.scraper.stats,
            proxy: &api.proxy,
            autoscaler: &api.autoscaler,
            history: &api.history,
            notify: &api.notify,
            remote_write: &api.remote_write,
            forward: &api.forward,
            alerting: &api.alerting,
        };
        crate::collect::own::collect(&sources, &api.db)
    });
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response()
}

/// The host's metrics, with node_exporter's names.
async fn node_metrics() -> Response {
    let text = tokio::task::block_in_place(crate::collect::node::collect);
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response()
}
