//! Replica output (and the proxy's access log) in [`capstan_logstore`]: one
//! stream per service, replica and output (`stream=stdout|stderr|proxy`), with
//! `level`, `trace_id` and `span_id` lifted from JSON and logfmt lines into
//! structured metadata. Appends are broadcast to followers; `flush` (every
//! second, from the daemon) is the durability point.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use capstan_logstore::{Direction, Entry, Labels, Options, Query, Recovery, Store};
use tokio::sync::broadcast;

use super::{LogQuery, LogRecord, Stream};

pub struct LogEngine {
    store: Store,
    /// Held while appending and broadcasting, and while a follower reads history
    /// and subscribes: it misses nothing and sees nothing twice.
    order: Mutex<()>,
    tx: broadcast::Sender<Arc<LogRecord>>,
}

fn stream_name(s: Stream) -> &'static str {
    match s {
        Stream::Stdout => "stdout",
        Stream::Stderr => "stderr",
        Stream::Proxy => "proxy",
        Stream::Otlp => "otlp",
        Stream::Alerts => "alerts",
    }
}

fn labels(service: &str, replica: u32, stream: Stream) -> Labels {
    Labels::from_pairs([
        ("service", service),
        ("replica", &replica.to_string()),
        ("stream", stream_name(stream)),
    ])
}

/// A JSON value kept only when it is a string.
struct Str<'a>(std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Str<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{self, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Str<'de>, E> {
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut a: A) -> Result<Str<'de>, A::Error> {
                while a.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut a: A) -> Result<Str<'de>, A::Error> {
                while a.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Str(std::borrow::Cow::Borrowed("")))
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys `lift` looks for in a JSON line.
#[derive(serde::Deserialize)]
struct Lifted<'a> {
    #[serde(borrow)]
    level: Option<Str<'a>>,
    #[serde(borrow)]
    lvl: Option<Str<'a>>,
    #[serde(borrow)]
    severity: Option<Str<'a>>,
    #[serde(borrow)]
    trace_id: Option<Str<'a>>,
    #[serde(borrow, rename = "traceId")]
    trace_id_camel: Option<Str<'a>>,
    #[serde(borrow, rename = "traceID")]
    trace_id_upper: Option<Str<'a>>,
    #[serde(borrow)]
    span_id: Option<Str<'a>>,
    #[serde(borrow, rename = "spanId")]
    span_id_camel: Option<Str<'a>>,
    #[serde(borrow, rename = "spanID")]
    span_id_upper: Option<Str<'a>>,
}

/// `level`, `trace_id`, `span_id` of a JSON object or logfmt line.
pub fn lift(line: &str) -> Vec<(String, String)> {
    const KEYS: [(&str, &str); 9] = [
        ("level", "level"),
        ("lvl", "level"),
        ("severity", "level"),
        ("trace_id", "trace_id"),
        ("traceId", "trace_id"),
        ("traceID", "trace_id"),
        ("span_id", "span_id"),
        ("spanId", "span_id"),
        ("spanID", "span_id"),
    ];
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: String| {
        if let Some((_, name)) = KEYS.iter().find(|(key, _)| *key == k)
            && !v.is_empty()
            && !out.iter().any(|(n, _)| n == name)
        {
            out.push(((*name).to_owned(), v));
        }
    };
    let t = line.trim_start();
    if t.starts_with('{') {
        // Only the wanted keys are kept; the rest is skipped without building values.
        if let Ok(m) = serde_json::from_str::<Lifted<'_>>(t) {
            for (k, v) in [
                ("level", m.level),
                ("lvl", m.lvl),
                ("severity", m.severity),
                ("trace_id", m.trace_id),
                ("traceId", m.trace_id_camel),
                ("traceID", m.trace_id_upper),
                ("span_id", m.span_id),
                ("spanId", m.span_id_camel),
                ("spanID", m.span_id_upper),
            ] {
                if let Some(Str(v)) = v {
                    put(k, v.into_owned());
                }
            }
        }
    } else if t.contains('=')
        && let Ok(pairs) = capstan_logstore::logql::pipeline::logfmt_pairs(t)
    {
        for (k, v) in pairs {
            put(&k, v);
        }
    }
    out
}

fn record(l: &Labels, e: Entry) -> Option<LogRecord> {
    Some(LogRecord {
        ts_ns: e.ts_ns,
        service: l.get("service")?.to_owned(),
        replica: l.get("replica")?.parse().ok()?,
        stream: match l.get("stream")? {
            "stdout" => Stream::Stdout,
            "stderr" => Stream::Stderr,
            "proxy" => Stream::Proxy,
            "otlp" => Stream::Otlp,
            "alerts" => Stream::Alerts,
            _ => return None,
        },
        seq: e.seq,
        partial: e.meta.iter().any(|(k, v)| k == "partial" && v == "true"),
        line: e.line,
    })
}

impl LogEngine {
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        max_total: u64,
    ) -> Result<(LogEngine, Recovery), capstan_logstore::Error> {
        let mut o = Options::new(dir);
        o.segment_bytes = segment_bytes.max(1024);
        o.max_total_bytes = Some(max_total);
        // Small segments (tests, tiny stacks) get small blocks too.
        o.block_bytes = o.block_bytes.min(segment_bytes.max(1024) as usize);
        let (store, rec) = Store::open(o)?;
        Ok((
            LogEngine {
                store,
                order: Mutex::new(()),
                tx: broadcast::channel(4096).0,
            },
            rec,
        ))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends one line of a replica's output and returns the stored record.
    pub fn append(
        &self,
        service: &str,
        replica: u32,
        stream: Stream,
        line: String,
        partial: bool,
    ) -> Result<Arc<LogRecord>, capstan_logstore::Error> {
        let mut recs = self.append_lines(service, stream, [(replica, line, partial)], true)?;
        Ok(recs.pop().expect("one line in, one record out"))
    }

    /// Appends lines of one service's replicas.
    pub fn append_many(
        &self,
        service: &str,
        stream: Stream,
        lines: impl IntoIterator<Item = (u32, String, bool)>,
    ) -> Result<(), capstan_logstore::Error> {
        self.append_lines(service, stream, lines, false).map(drop)
    }

    /// Appends lines; the stored records are built for followers (if any) and
    /// returned when `keep`.
    fn append_lines(
        &self,
        service: &str,
        stream: Stream,
        lines: impl IntoIterator<Item = (u32, String, bool)>,
        keep: bool,
    ) -> Result<Vec<Arc<LogRecord>>, capstan_logstore::Error> {
        let ts_ns = super::now_ns();
        let mut by_replica: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
        for (replica, line, partial) in lines {
            let mut meta = lift(&line);
            if partial {
                meta.push(("partial".into(), "true".into()));
            }
            by_replica.entry(replica).or_default().push(Entry {
                ts_ns,
                seq: 0,
                line,
                meta,
            });
        }
        let _order = self.order.lock().unwrap();
        let records = keep || self.tx.receiver_count() > 0;
        let mut out = Vec::new();
        for (replica, entries) in by_replica {
            let n = entries.len() as u64;
            let l = labels(service, replica, stream);
            // Copies for the records only when someone will see them.
            let lines: Vec<(String, bool)> = if records {
                entries
                    .iter()
                    .map(|e| (e.line.clone(), e.meta.iter().any(|(k, _)| k == "partial")))
                    .collect()
            } else {
                Vec::new()
            };
            let a = self.store.append(&l, entries)?;
            let first = a.last_seq + 1 - a.accepted as u64;
            debug_assert_eq!(a.accepted as u64, n, "no rate limit on replica output");
            for (i, (line, partial)) in lines.into_iter().take(a.accepted).enumerate() {
                let rec = Arc::new(LogRecord {
                    ts_ns,
                    service: service.to_owned(),
                    replica,
                    stream,
                    seq: first + i as u64,
                    line,
                    partial,
                });
                let _ = self.tx.send(rec.clone());
                if keep {
                    out.push(rec);
                }
            }
        }
        Ok(out)
    }

    /// Appends pushed entries (Loki push, OTLP logs) with their own labels and
    /// times; `level`, `trace_id` and `span_id` are lifted from lines that do not
    /// carry them as metadata already. Returns the entries kept and refused by
    /// the rate limit.
    pub fn append_pushed(
        &self,
        streams: Vec<(Labels, Vec<Entry>)>,
    ) -> Result<(usize, usize), capstan_logstore::Error> {
        let (mut kept, mut limited) = (0, 0);
        let _order = self.order.lock().unwrap();
        for (l, mut entries) in streams {
            for e in &mut entries {
                let lifted = lift(&e.line);
                if e.meta.is_empty() {
                    e.meta = lifted;
                    continue;
                }
                for (k, v) in lifted {
                    if !e.meta.iter().any(|(m, _)| *m == k) {
                        e.meta.push((k, v));
                    }
                }
            }
            let copies: Option<Vec<Entry>> =
                (self.tx.receiver_count() > 0).then(|| entries.clone());
            let a = self.store.append(&l, entries)?;
            kept += a.accepted;
            limited += a.rate_limited;
            // Followers see pushed entries of replica streams too.
            if let Some(copies) = copies
                && a.rate_limited == 0
            {
                let first = a.last_seq + 1 - a.accepted as u64;
                for (i, mut e) in copies.into_iter().enumerate() {
                    e.seq = first + i as u64;
                    if let Some(r) = record(&l, e) {
                        let _ = self.tx.send(Arc::new(r));
                    }
                }
            }
        }
        Ok((kept, limited))
    }

    /// Makes every append so far durable.
    pub fn flush(&self) -> Result<u64, capstan_logstore::Error> {
        self.store.flush()
    }

    /// Seals, compacts and applies retention (off the ingest path).
    pub fn maintain(&self) -> Result<(), capstan_logstore::Error> {
        self.store.maintain()
    }

    pub fn query_and_subscribe(
        &self,
        q: &LogQuery,
    ) -> (Vec<LogRecord>, broadcast::Receiver<Arc<LogRecord>>) {
        let _order = self.order.lock().unwrap();
        let rx = self.tx.subscribe();
        (self.query(q), rx)
    }

    fn read(
        &self,
        q: &LogQuery,
        after_seq: u64,
        dir: Direction,
        limit: usize,
        replica: Option<(&str, u32)>,
    ) -> Vec<LogRecord> {
        let pred = |l: &Labels| {
            let (Some(s), Some(r)) = (
                l.get("service"),
                l.get("replica").and_then(|r| r.parse::<u32>().ok()),
            ) else {
                return false;
            };
            q.wants(s, r) && replica.is_none_or(|(ws, wr)| ws == s && wr == r)
        };
        let query = Query {
            from_ns: q.since_ns.unwrap_or(i64::MIN),
            to_ns: i64::MAX,
            streams: &pred,
            contains: &[],
            after_seq,
            meta: &[],
        };
        match self.store.select(&query, dir, limit) {
            Ok(v) => v.into_iter().filter_map(|(l, e)| record(&l, e)).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading logs");
                Vec::new()
            }
        }
    }

    /// Records a query selects, oldest first (the last `tail` of each replica).
    pub fn query(&self, q: &LogQuery) -> Vec<LogRecord> {
        let mut out = match q.tail {
            None => self.read(q, 0, Direction::Forward, usize::MAX, None),
            Some(n) => {
                let mut replicas: Vec<(String, u32)> = self
                    .store
                    .series(q.since_ns.unwrap_or(i64::MIN), i64::MAX, &|l| {
                        l.get("service")
                            .zip(l.get("replica").and_then(|r| r.parse().ok()))
                            .is_some_and(|(s, r)| q.wants(s, r))
                    })
                    .iter()
                    .filter_map(|l| {
                        Some((
                            l.get("service")?.to_owned(),
                            l.get("replica")?.parse().ok()?,
                        ))
                    })
                    .collect();
                replicas.sort();
                replicas.dedup();
                replicas
                    .iter()
                    .flat_map(|(s, r)| self.read(q, 0, Direction::Backward, n, Some((s, *r))))
                    .collect()
            }
        };
        out.sort_by_key(|r| (r.ts_ns, r.seq));
        out
    }

    /// What a follower that fell behind missed: records after the last sequence
    /// number `sent` per replica (replicas not in `sent`: all), oldest first.
    pub fn catch_up(&self, q: &LogQuery, sent: &BTreeMap<(String, u32), u64>) -> Vec<LogRecord> {
        let mut all = self.read(q, 0, Direction::Forward, usize::MAX, None);
        all.retain(|r| {
            r.seq
                > sent
                    .get(&(r.service.clone(), r.replica))
                    .copied()
                    .unwrap_or(0)
        });
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifts_level_and_trace_from_json_and_logfmt() {
        assert_eq!(
            lift(r#"{"level":"error","msg":"x","trace_id":"abc","n":1}"#),
            vec![
                ("level".to_string(), "error".to_string()),
                ("trace_id".to_string(), "abc".to_string())
            ]
        );
        assert_eq!(
            lift("ts=1 lvl=warn traceID=t1 spanId=s1 msg=\"a b\""),
            vec![
                ("level".to_string(), "warn".to_string()),
                ("trace_id".to_string(), "t1".to_string()),
                ("span_id".to_string(), "s1".to_string())
            ]
        );
        assert!(lift("plain text").is_empty());
    }

    #[tokio::test]
    async fn follow_sees_history_then_live_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = LogEngine::open(dir.path(), 1 << 20, 1 << 30).unwrap();
        e.append("web", 0, Stream::Stdout, "one".into(), false)
            .unwrap();
        e.append("web", 1, Stream::Stderr, "two".into(), true)
            .unwrap();
        let q = LogQuery::default();
        let (hist, mut rx) = e.query_and_subscribe(&q);
        assert_eq!(
            hist.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(),
            vec!["one", "two"]
        );
        assert!(hist[1].partial && hist[1].stream == Stream::Stderr);
        e.append("web", 0, Stream::Stdout, "three".into(), false)
            .unwrap();
        let live = rx.recv().await.unwrap();
        assert_eq!((live.line.as_str(), live.seq), ("three", 3));
        let tail = e.query(&LogQuery {
            tail: Some(1),
            ..LogQuery::default()
        });
        assert_eq!(
            tail.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(),
            vec!["two", "three"]
        );
        let mut sent = BTreeMap::new();
        sent.insert(("web".to_string(), 0), 1);
        let missed = e.catch_up(&q, &sent);
        assert_eq!(
            missed.iter().map(|r| r.line.as_str()).collect::<Vec<_>>(),
            vec!["two", "three"]
        );
    }
}
