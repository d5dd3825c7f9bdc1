//! Events have two APIs over one resource: `v1` Events (`involvedObject`, `message`,
//! what `kubectl describe` lists) and `events.k8s.io/v1` Events (`regarding`, `note`,
//! what kube-rs' recorder writes). The API server keeps them in one storage and converts;
//! here each API keeps its own objects, and a list of either also holds the other's,
//! converted, so `kubectl describe` shows what the controller recorded. Watches see only
//! their own API's Events.

use serde_json::{Map, Value};

/// The storage key of the other API of Events, when `key` is one of them.
pub(super) fn other_api(key: &str) -> Option<&'static str> {
    match key {
        "/events" => Some("events.k8s.io/events"),
        "events.k8s.io/events" => Some("/events"),
        _ => None,
    }
}

/// An Event stored under `from` (a storage key) as the API whose key is `to` shows it.
pub(super) fn convert(from: &str, object: &Value) -> Value {
    match from {
        "events.k8s.io/events" => to_core(object),
        _ => to_events_k8s_io(object),
    }
}

/// (`events.k8s.io/v1` field, `v1` field), as the API server's conversion maps them.
const RENAMED: &[(&str, &str)] = &[
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
    ("reportingController", "reportingComponent"),
];

/// Fields both APIs spell the same.
const SHARED: &[&str] = &[
    "metadata",
    "reason",
    "type",
    "action",
    "related",
    "eventTime",
    "series",
    "reportingInstance",
];

fn to_core(object: &Value) -> Value {
    rename(object, "v1", "Event", |(new, old)| (*new, *old))
}

fn to_events_k8s_io(object: &Value) -> Value {
    rename(object, "events.k8s.io/v1", "Event", |(new, old)| {
        (*old, *new)
    })
}

fn rename(
    object: &Value,
    api_version: &str,
    kind: &str,
    direction: impl Fn(&(&'static str, &'static str)) -> (&'static str, &'static str),
) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::from(api_version));
    out.insert("kind".into(), Value::from(kind));
    for field in SHARED {
        if let Some(value) = object.get(*field) {
            out.insert((*field).into(), value.clone());
        }
    }
    for pair in RENAMED {
        let (from, to) = direction(pair);
        if let Some(value) = object.get(from) {
            out.insert(to.into(), value.clone());
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_events_k8s_io_event_reads_as_a_core_event_and_back() {
        let recorded = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "job-1.17f", "namespace": "default"},
            "regarding": {"kind": "PatchJob", "name": "job-1", "namespace": "default", "uid": "u1"},
            "note": "pre action check failed with exit code 4",
            "reason": "ActionFailed", "type": "Warning", "action": "RunPreAction1",
            "eventTime": "2026-12-02T14:00:00.000000Z",
            "series": {"count": 2, "lastObservedTime": "2026-12-02T14:01:00.000000Z"},
            "reportingController": "fleetpatch-controller", "reportingInstance": "c-1",
        });
        let core = convert("events.k8s.io/events", &recorded);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "job-1");
        assert_eq!(core["message"], recorded["note"]);
        assert_eq!(core["reportingComponent"], "fleetpatch-controller");
        assert_eq!(core["series"]["count"], 2);
        assert!(core.get("regarding").is_none() && core.get("note").is_none());
        assert_eq!(convert("/events", &core), recorded);
        assert_eq!(other_api("/events"), Some("events.k8s.io/events"));
        assert_eq!(other_api("/secrets"), None);
    }
}
