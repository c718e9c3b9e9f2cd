//! Alerts to a plain webhook, for users without Alertmanager: grouped by
//! alert name as Alertmanager groups them, with its `group_wait`,
//! `group_interval` and `repeat_interval`, in its webhook payload (version
//! 4), so receivers written for Alertmanager read it unchanged.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::rule::LabelMap;

/// One alert as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub labels: LabelMap,
    pub annotations: LabelMap,
    pub firing: bool,
    pub starts_at_ms: i64,
    pub ends_at_ms: Option<i64>,
    pub generator_url: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub group_wait_ms: i64,
    pub group_interval_ms: i64,
    pub repeat_interval_ms: i64,
}

#[derive(Debug, Default)]
struct Group {
    alerts: BTreeMap<LabelMap, Item>,
    first_ms: i64,
    last_sent_ms: Option<i64>,
    /// What the last notification said, to know whether anything changed.
    last_sent: Vec<(LabelMap, bool)>,
}

/// The groups of one webhook receiver.
#[derive(Debug, Default)]
pub struct Dispatcher {
    groups: BTreeMap<String, Group>,
}

use super::rfc3339;

/// Labels every alert of the group shares (and annotations likewise).
fn common(maps: &[&LabelMap]) -> LabelMap {
    let Some(first) = maps.first() else {
        return LabelMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| maps.iter().all(|m| m.get(*k) == Some(v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn fingerprint(l: &LabelMap) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in l {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

impl Dispatcher {
    /// Takes the alerts of this evaluation: firing ones, and resolved ones
    /// (sent once as resolved).
    pub fn update(&mut self, now: i64, items: Vec<Item>) {
        for it in items {
            let name = it.labels.get("alertname").cloned().unwrap_or_default();
            if !it.firing
                && !self
                    .groups
                    .get(&name)
                    .is_some_and(|g| g.alerts.contains_key(&it.labels))
            {
                // Resolved before anyone heard of it.
                continue;
            }
            let g = self.groups.entry(name).or_insert_with(|| Group {
                first_ms: now,
                ..Group::default()
            });
            g.alerts.insert(it.labels.clone(), it);
        }
    }

    /// Notifications due at `now`: (body) for each group whose wait, interval
    /// or repeat has come and that has something to say.
    pub fn due(&mut self, now: i64, t: &Timing, receiver: &str, external_url: &str) -> Vec<Value> {
        let mut out = Vec::new();
        self.groups.retain(|name, g| {
            let state: Vec<(LabelMap, bool)> =
                g.alerts.iter().map(|(l, a)| (l.clone(), a.firing)).collect();
            let changed = state != g.last_sent;
            let send = match g.last_sent_ms {
                None => now - g.first_ms >= t.group_wait_ms,
                Some(last) => {
                    (changed && now - last >= t.group_interval_ms)
                        || (!changed
                            && g.alerts.values().any(|a| a.firing)
                            && now - last >= t.repeat_interval_ms)
                }
            };
            if send {
                let alerts: Vec<&Item> = g.alerts.values().collect();
                let firing = alerts.iter().any(|a| a.firing);
                let labels: Vec<&LabelMap> = alerts.iter().map(|a| &a.labels).collect();
                let annotations: Vec<&LabelMap> = alerts.iter().map(|a| &a.annotations).collect();
                out.push(json!({
                    "version": "4",
                    "groupKey": format!("{{}}:{{alertname={name:?}}}"),
                    "truncatedAlerts": 0,
                    "status": if firing { "firing" } else { "resolved" },
                    "receiver": receiver,
                    "groupLabels": {"alertname": name},
                    "commonLabels": common(&labels),
                    "commonAnnotations": common(&annotations),
                    "externalURL": external_url,
                    "alerts": alerts.iter().map(|a| json!({
                        "status": if a.firing { "firing" } else { "resolved" },
                        "labels": a.labels,
                        "annotations": a.annotations,
                        "startsAt": rfc3339(a.starts_at_ms),
                        "endsAt": a.ends_at_ms.map_or_else(|| "0001-01-01T00:00:00Z".to_owned(), rfc3339),
                        "generatorURL": a.generator_url,
                        "fingerprint": fingerprint(&a.labels),
                    })).collect::<Vec<_>>(),
                }));
                g.last_sent_ms = Some(now);
                // Resolved alerts are said once.
                g.alerts.retain(|_, a| a.firing);
                g.last_sent = g.alerts.iter().map(|(l, a)| (l.clone(), a.firing)).collect();
            }
            !g.alerts.is_empty()
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(service: &str, firing: bool) -> Item {
        Item {
            labels: LabelMap::from([
                ("alertname".into(), "Errors".into()),
                ("service".into(), service.into()),
                ("severity".into(), "page".into()),
            ]),
            annotations: LabelMap::from([("summary".into(), format!("{service} fails"))]),
            firing,
            starts_at_ms: 0,
            ends_at_ms: (!firing).then_some(1),
            generator_url: "http://x/graph".into(),
        }
    }

    const T: Timing = Timing {
        group_wait_ms: 30_000,
        group_interval_ms: 300_000,
        repeat_interval_ms: 4 * 3_600_000,
    };

    #[test]
    fn grouped_waited_batched_repeated_and_resolved() {
        let mut d = Dispatcher::default();
        d.update(0, vec![item("web", true)]);
        assert!(d.due(10_000, &T, "r", "u").is_empty(), "group_wait");
        d.update(20_000, vec![item("web", true), item("api", true)]);
        let sent = d.due(30_000, &T, "r", "u");
        assert_eq!(sent.len(), 1);
        let n = &sent[0];
        assert_eq!(n["status"], "firing");
        assert_eq!(
            n["alerts"].as_array().unwrap().len(),
            2,
            "both in one notification"
        );
        assert_eq!(n["groupLabels"]["alertname"], "Errors");
        assert_eq!(n["commonLabels"]["severity"], "page");
        assert!(n["commonLabels"].get("service").is_none());
        // A change waits for the group interval since the last notification.
        d.update(40_000, vec![item("web", false), item("api", true)]);
        assert!(d.due(50_000, &T, "r", "u").is_empty());
        let sent = d.due(330_000, &T, "r", "u");
        assert_eq!(sent.len(), 1);
        let statuses: Vec<&str> = sent[0]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["firing", "resolved"]);
        // Nothing new: quiet until the repeat interval.
        assert!(d.due(700_000, &T, "r", "u").is_empty());
        assert_eq!(
            d.due(330_000 + T.repeat_interval_ms, &T, "r", "u").len(),
            1,
            "repeated"
        );
        // The last alert resolves: one resolved notification, then the group is gone.
        d.update(20_000_000, vec![item("api", false)]);
        let sent = d.due(20_000_000 + T.group_interval_ms, &T, "r", "u");
        assert_eq!(sent[0]["status"], "resolved");
        assert!(d.groups.is_empty());
    }
}
