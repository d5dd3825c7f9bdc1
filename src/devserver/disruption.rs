//! PodDisruptionBudget status, as the disruption controller of a real cluster keeps it:
//! expected pods (from the pods' controllers' scale when a budget is a percentage or
//! `maxUnavailable`), healthy pods (Ready, not being deleted, not just evicted),
//! desired healthy pods, `disruptionsAllowed`, `disruptedPods` and the
//! `DisruptionAllowed` condition, with `observedGeneration`. The computation is pure;
//! [`Server::sync_budgets`] runs it whenever pods, budgets or pod controllers change in
//! a namespace and writes the statuses that changed, as `kube-controller-manager`.
//! The eviction subresource reads what this writes (see `eviction.rs`).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::Server;
use super::managed::{self, Writer};
use super::selector::LabelSelector;

const BUDGETS_KEY: &str = "policy/poddisruptionbudgets";
/// How long a pod the eviction handler let go counts as disrupted before the
/// controller assumes it will not be deleted after all (the controller's
/// `DeletionTimeout`).
pub const DISRUPTION_TIMEOUT: Duration = Duration::from_secs(120);
pub const CONDITION: &str = "DisruptionAllowed";

/// The kinds whose writes change some budget's status.
pub fn affects_budgets(storage_key: &str) -> bool {
    matches!(
        storage_key,
        "/pods"
            | "policy/poddisruptionbudgets"
            | "apps/replicasets"
            | "apps/deployments"
            | "apps/statefulsets"
            | "/replicationcontrollers"
    )
}

/// The pods a budget's selector picks, as the disruption controller counts them: a
/// missing selector matches nothing, an empty one everything.
pub fn selects(budget: &Value, pod: &Value) -> bool {
    let selector = &budget["spec"]["selector"];
    !selector.is_null() && LabelSelector::from_object(selector).matches(pod)
}

/// The budgets an eviction of `pod` must honour: the eviction handler ignores budgets
/// whose selector is missing or empty.
pub fn guards(budget: &Value, pod: &Value) -> bool {
    let selector = &budget["spec"]["selector"];
    let empty = selector.as_object().is_none_or(|s| {
        s.values().all(|v| {
            v.is_null()
                || v.as_object().is_some_and(|m| m.is_empty())
                || v.as_array().is_some_and(|a| a.is_empty())
        })
    });
    !empty && LabelSelector::from_object(selector).matches(pod)
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

pub fn format_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A pod's controller and what the disruption controller would find for it.
pub trait Scales {
    /// The scale (`spec.replicas`) of the controller a pod's controllerRef names, or
    /// None when no supported controller with that uid exists.
    fn scale_of(&self, namespace: &str, controller: &Value) -> Option<(String, i64)>;
}

/// The numbers of a budget's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts {
    pub expected: i64,
    pub desired_healthy: i64,
    pub current_healthy: i64,
    /// Pod name → when the eviction handler let it go, still within the timeout.
    pub disrupted: Vec<(String, String)>,
    /// When the earliest disruption entry times out, for a recheck.
    pub recheck_at: Option<DateTime<Utc>>,
}

fn scaled(value: &Value, total: i64, round_up: bool) -> Result<Option<i64>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => Ok(n.as_i64()),
        Value::String(s) => {
            let percent: f64 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("invalid value for IntOrString: invalid value {s:?}"))?;
            let raw = percent * total as f64 / 100.0;
            Ok(Some(if round_up { raw.ceil() } else { raw.floor() } as i64))
        }
        _ => Err("invalid value for IntOrString".into()),
    }
}

/// The sum of the scales of the pods' controllers (each counted once); pods without a
/// controller are left out, as the disruption controller does (with a warning event).
fn expected_scale(pods: &[&Value], namespace: &str, scales: &impl Scales) -> Result<i64, String> {
    let mut seen: Vec<String> = Vec::new();
    let mut total = 0;
    for pod in pods {
        let Some(controller) = pod["metadata"]["ownerReferences"]
            .as_array()
            .and_then(|refs| refs.iter().find(|r| r["controller"] == true))
        else {
            continue;
        };
        let uid = controller["uid"].as_str().unwrap_or_default();
        if seen.iter().any(|s| s == uid) {
            continue;
        }
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let (found, scale) = scales
            .scale_of(namespace, controller)
            .ok_or_else(|| format!("found no controllers for pod {name:?}"))?;
        seen.push(uid.to_string());
        if !seen.contains(&found) {
            seen.push(found);
        }
        total += scale;
    }
    Ok(total)
}

/// What the disruption controller computes for `budget` over the namespace's `pods`.
pub fn count(
    budget: &Value,
    pods: &[Arc<Value>],
    scales: &impl Scales,
    now: DateTime<Utc>,
) -> Result<Counts, String> {
    let namespace = budget["metadata"]["namespace"].as_str().unwrap_or_default();
    let pods: Vec<&Value> = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| selects(budget, p))
        .collect();
    let spec = &budget["spec"];
    let (expected, desired_healthy) = if !spec["maxUnavailable"].is_null() {
        let expected = expected_scale(&pods, namespace, scales)?;
        let unavailable = scaled(&spec["maxUnavailable"], expected, true)?.unwrap_or(0);
        (expected, (expected - unavailable).max(0))
    } else if spec["minAvailable"].is_number() {
        (
            pods.len() as i64,
            spec["minAvailable"].as_i64().unwrap_or(0),
        )
    } else if spec["minAvailable"].is_string() {
        let expected = expected_scale(&pods, namespace, scales)?;
        (
            expected,
            scaled(&spec["minAvailable"], expected, true)?.unwrap_or(0),
        )
    } else {
        (0, 0)
    };
    let mut disrupted = Vec::new();
    let mut recheck_at: Option<DateTime<Utc>> = None;
    if let Some(entries) = budget["status"]["disruptedPods"].as_object() {
        for pod in &pods {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let Some(when) = entries.get(name).and_then(Value::as_str) else {
                continue;
            };
            if pod["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            let Some(expires) = parse_time(when).map(|t| t + DISRUPTION_TIMEOUT) else {
                continue;
            };
            if expires > now {
                recheck_at = Some(recheck_at.map_or(expires, |r| r.min(expires)));
                disrupted.push((name.to_string(), when.to_string()));
            }
        }
    }
    let current_healthy = pods
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            !disrupted.iter().any(|(d, _)| d == name)
        })
        .filter(|p| is_ready(p))
        .count() as i64;
    disrupted.sort();
    Ok(Counts {
        expected,
        desired_healthy,
        current_healthy,
        disrupted,
        recheck_at,
    })
}

/// Sets the `DisruptionAllowed` condition as `meta.SetStatusCondition` does: the
/// transition time moves only when the status flips.
pub fn set_condition(status: &mut Value, observed: i64, reason: &str, message: &str, now: &str) {
    let allowed = reason == "SufficientPods";
    let wanted = if allowed { "True" } else { "False" };
    let mut conditions: Vec<Value> = status["conditions"].as_array().cloned().unwrap_or_default();
    match conditions.iter_mut().find(|c| c["type"] == CONDITION) {
        Some(existing) => {
            if existing["status"] != wanted {
                existing["status"] = json!(wanted);
                existing["lastTransitionTime"] = json!(now);
            }
            existing["reason"] = json!(reason);
            existing["message"] = json!(message);
            existing["observedGeneration"] = json!(observed);
        }
        None => conditions.push(json!({
            "type": CONDITION, "status": wanted, "observedGeneration": observed,
            "lastTransitionTime": now, "reason": reason, "message": message,
        })),
    }
    status["conditions"] = json!(conditions);
}

/// The condition a status's `disruptionsAllowed` calls for.
pub fn allowed_reason(status: &Value) -> &'static str {
    if status["disruptionsAllowed"].as_i64().unwrap_or(0) > 0 {
        "SufficientPods"
    } else {
        "InsufficientPods"
    }
}

/// The status the controller writes for `budget` given its counts, or the fail-safe
/// status (nothing allowed, `SyncFailed`) when they could not be computed.
pub fn next_status(budget: &Value, counts: Result<&Counts, &str>, now: &str) -> Value {
    let generation = budget["metadata"]["generation"].as_i64().unwrap_or(0);
    let old = &budget["status"];
    let mut status = old.clone();
    if !status.is_object() {
        status = json!({});
    }
    match counts {
        Ok(counts) => {
            let mut allowed = counts.current_healthy - counts.desired_healthy;
            if counts.expected <= 0 || allowed <= 0 {
                allowed = 0;
            }
            status["currentHealthy"] = json!(counts.current_healthy);
            status["desiredHealthy"] = json!(counts.desired_healthy);
            status["expectedPods"] = json!(counts.expected);
            status["disruptionsAllowed"] = json!(allowed);
            status["observedGeneration"] = json!(generation);
            if counts.disrupted.is_empty() {
                if let Some(map) = status.as_object_mut() {
                    map.remove("disruptedPods");
                }
            } else {
                status["disruptedPods"] = counts
                    .disrupted
                    .iter()
                    .map(|(name, when)| (name.clone(), json!(when)))
                    .collect::<serde_json::Map<String, Value>>()
                    .into();
            }
            let unchanged = status == *old && condition_up_to_date(&status, generation);
            if !unchanged {
                let reason = allowed_reason(&status);
                set_condition(&mut status, generation, reason, "", now);
            }
        }
        Err(error) => {
            status["disruptionsAllowed"] = json!(0);
            let observed = status["observedGeneration"].as_i64().unwrap_or(0);
            set_condition(&mut status, observed, "SyncFailed", error, now);
        }
    }
    status
}

fn condition_up_to_date(status: &Value, generation: i64) -> bool {
    let Some(condition) = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == CONDITION))
    else {
        return false;
    };
    status["observedGeneration"].as_i64() == Some(generation)
        && condition["reason"] == allowed_reason(status)
        && condition["status"]
            == if allowed_reason(status) == "SufficientPods" {
                "True"
            } else {
                "False"
            }
}

/// The status a budget starts with: what the API server resets it to on create.
pub fn initial_status() -> Value {
    json!({"disruptionsAllowed": 0, "currentHealthy": 0, "desiredHealthy": 0, "expectedPods": 0})
}

impl Scales for Server {
    fn scale_of(&self, namespace: &str, controller: &Value) -> Option<(String, i64)> {
        let uid = controller["uid"].as_str()?;
        let name = controller["name"].as_str()?;
        let group = controller["apiVersion"]
            .as_str()
            .and_then(|v| v.split_once('/').map(|(g, _)| g))
            .unwrap_or("");
        let replicas = |o: &Value| o["spec"]["replicas"].as_i64().unwrap_or(1);
        let owned = |key: &str, name: &str, uid: &str| {
            self.store
                .get(key, namespace, name)
                .filter(|o| o["metadata"]["uid"] == uid)
        };
        match (group, controller["kind"].as_str()?) {
            ("", "ReplicationController") => owned("/replicationcontrollers", name, uid)
                .map(|rc| (uid.to_string(), replicas(&rc))),
            ("apps" | "extensions", "ReplicaSet") => {
                let set = owned("apps/replicasets", name, uid)?;
                // A ReplicaSet a Deployment controls counts with the Deployment's scale.
                match set["metadata"]["ownerReferences"]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["controller"] == true))
                {
                    Some(owner) if owner["kind"] == "Deployment" => {
                        let deployment = owned(
                            "apps/deployments",
                            owner["name"].as_str()?,
                            owner["uid"].as_str()?,
                        )?;
                        Some((
                            deployment["metadata"]["uid"].as_str()?.to_string(),
                            replicas(&deployment),
                        ))
                    }
                    _ => Some((uid.to_string(), replicas(&set))),
                }
            }
            ("apps", "StatefulSet") => {
                owned("apps/statefulsets", name, uid).map(|s| (uid.to_string(), replicas(&s)))
            }
            _ => None,
        }
    }
}

impl Server {
    /// Recomputes every budget in `namespace` and writes the statuses that changed.
    pub fn sync_budgets(self: &Arc<Self>, namespace: &str) {
        let (budgets, _) = self.store.list(BUDGETS_KEY, Some(namespace));
        if budgets.is_empty() {
            return;
        }
        let (pods, _) = self.store.list("/pods", Some(namespace));
        let now = Utc::now();
        for budget in budgets {
            if budget["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            let counts = count(&budget, &pods, &**self, now);
            let status = next_status(
                &budget,
                counts.as_ref().map_err(String::as_str),
                &format_time(now),
            );
            if let Ok(Counts {
                recheck_at: Some(at),
                ..
            }) = &counts
            {
                self.recheck_budgets_at(namespace, *at);
            }
            if status == budget["status"] {
                continue;
            }
            self.write_budget_status(&budget, status, "kube-controller-manager");
        }
    }

    /// Stores a budget's new status as `manager` would through the status subresource.
    pub fn write_budget_status(
        self: &Arc<Self>,
        budget: &Value,
        status: Value,
        manager: &str,
    ) -> bool {
        let mut updated = budget.clone();
        updated["status"] = status;
        let now = super::handlers::now();
        let schema = super::discovery::builtin_ownership_schema("policy", "poddisruptionbudgets");
        managed::record_update(
            Some(budget),
            &mut updated,
            schema.as_deref(),
            true,
            &Writer {
                manager,
                subresource: "status",
                api_version: "policy/v1",
                now: &now,
            },
        );
        let expected = super::store::resource_version(budget);
        match self.store.replace(BUDGETS_KEY, updated, Some(expected)) {
            Ok(_) => true,
            Err(err) => {
                tracing::debug!(%err, "budget changed while its status was computed");
                false
            }
        }
    }

    fn recheck_budgets_at(self: &Arc<Self>, namespace: &str, at: DateTime<Utc>) {
        let wait = (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
        let server = self.clone();
        let namespace = namespace.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            server.sync_budgets(&namespace);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoControllers;
    impl Scales for NoControllers {
        fn scale_of(&self, _: &str, _: &Value) -> Option<(String, i64)> {
            None
        }
    }

    struct OneReplicaSet(i64);
    impl Scales for OneReplicaSet {
        fn scale_of(&self, _: &str, controller: &Value) -> Option<(String, i64)> {
            Some((controller["uid"].as_str()?.to_string(), self.0))
        }
    }

    fn budget(spec: Value) -> Value {
        json!({"metadata": {"name": "b", "namespace": "ns", "generation": 1},
               "spec": spec, "status": initial_status()})
    }

    fn pod(name: &str, ready: bool, owned: bool) -> Arc<Value> {
        let mut pod = json!({"metadata": {"name": name, "namespace": "ns", "labels": {"app": "web"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        if owned {
            pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "u", "controller": true}]);
        }
        Arc::new(pod)
    }

    #[test]
    fn min_available_counts_the_selected_pods() {
        let b = budget(json!({"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}}));
        let pods = [
            pod("a", true, false),
            pod("b", true, false),
            pod("c", false, false),
        ];
        let counts = count(&b, &pods, &NoControllers, Utc::now()).unwrap();
        assert_eq!(
            (
                counts.expected,
                counts.desired_healthy,
                counts.current_healthy
            ),
            (3, 2, 2)
        );
        let status = next_status(&b, Ok(&counts), "2026-01-01T00:00:00Z");
        assert_eq!(status["disruptionsAllowed"], 0);
        assert_eq!(status["observedGeneration"], 1);
        assert_eq!(status["conditions"][0]["reason"], "InsufficientPods");
    }

    #[test]
    fn percentages_and_max_unavailable_use_the_controllers_scale() {
        let b =
            budget(json!({"maxUnavailable": "50%", "selector": {"matchLabels": {"app": "web"}}}));
        let pods = [pod("a", true, true), pod("b", true, true)];
        let counts = count(&b, &pods, &OneReplicaSet(4), Utc::now()).unwrap();
        assert_eq!((counts.expected, counts.desired_healthy), (4, 2));
        let status = next_status(&b, Ok(&counts), "2026-01-01T00:00:00Z");
        assert_eq!(status["disruptionsAllowed"], 0);
        // A pod whose controller is missing makes the budget fail safe.
        let err = count(&b, &pods, &NoControllers, Utc::now()).unwrap_err();
        let status = next_status(&b, Err(&err), "2026-01-01T00:00:00Z");
        assert_eq!(status["conditions"][0]["reason"], "SyncFailed");
        assert_eq!(status["disruptionsAllowed"], 0);
    }

    #[test]
    fn a_recently_evicted_pod_is_not_healthy_until_its_entry_times_out() {
        let now = Utc::now();
        let mut b = budget(json!({"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}}));
        b["status"]["disruptedPods"] = json!({"a": format_time(now)});
        let pods = [pod("a", true, false), pod("b", true, false)];
        let counts = count(&b, &pods, &NoControllers, now).unwrap();
        assert_eq!(counts.current_healthy, 1);
        assert_eq!(counts.disrupted.len(), 1);
        let later = now + chrono::Duration::seconds(121);
        let counts = count(&b, &pods, &NoControllers, later).unwrap();
        assert_eq!(counts.current_healthy, 2);
        assert!(counts.disrupted.is_empty());
    }

    #[test]
    fn selectors_follow_the_controller_and_the_eviction_handler() {
        let p = pod("a", true, false);
        assert!(!selects(&json!({"spec": {}}), &p));
        assert!(selects(&json!({"spec": {"selector": {}}}), &p));
        assert!(!guards(&json!({"spec": {"selector": {}}}), &p));
        assert!(guards(
            &json!({"spec": {"selector": {"matchLabels": {"app": "web"}}}}),
            &p
        ));
    }
}
