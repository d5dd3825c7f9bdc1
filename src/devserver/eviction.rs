//! The `pods/NAME/eviction` subresource, as a real API server's eviction handler works:
//! pods that are not running (pending, finished, already being deleted) go without
//! asking; a running pod under one PodDisruptionBudget goes only while the budget's
//! status (kept by `disruption.rs`) allows a disruption, which the eviction then
//! takes — `disruptionsAllowed` goes down and the pod is recorded in `disruptedPods`
//! until the budget is recomputed; a pod under two budgets cannot be evicted. An
//! evicted pod is marked `DisruptionTarget` and deleted with the eviction's options.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use chrono::Utc;
use serde_json::{Value, json};

use super::disruption::{self, format_time, guards, is_ready};
use super::errors::{ApiError, Cause};
use super::handlers::{Request, Target, json_response, now};
use super::managed::{self, Writer};
use super::{DeleteOptions, Propagation};

/// More entries than this in `disruptedPods` and evictions stop until the controller
/// catches up (the handler's `MaxDisruptedPodSize`).
const MAX_DISRUPTED_PODS: usize = 2000;
const REFUSED: &str = "Cannot evict pod as it would violate the pod's disruption budget.";

fn refused(retry_after_seconds: u32, why: String) -> ApiError {
    ApiError::TooManyRequests {
        message: REFUSED.into(),
        retry_after_seconds,
        causes: vec![Cause {
            reason: "DisruptionBudget".into(),
            message: why,
            field: String::new(),
        }],
    }
}

/// Pods an eviction deletes without asking any budget.
fn can_ignore_budgets(pod: &Value) -> bool {
    matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed" | "Pending") | None
    ) || pod["metadata"]["deletionTimestamp"].is_string()
}

/// Takes one disruption from `budget`'s status, or says why not. The new status on
/// success.
pub fn take_disruption(budget: &Value, pod: &str) -> Result<Value, ApiError> {
    let name = budget["metadata"]["name"].as_str().unwrap_or_default();
    let status = &budget["status"];
    let generation = budget["metadata"]["generation"].as_i64().unwrap_or(0);
    if status["observedGeneration"].as_i64().unwrap_or(0) < generation {
        return Err(refused(
            10,
            format!("The disruption budget {name} is still being processed by the server."),
        ));
    }
    let allowed = status["disruptionsAllowed"].as_i64().unwrap_or(0);
    if allowed < 0 {
        return Err(ApiError::Forbidden(format!(
            "poddisruptionbudgets.policy {name:?} is forbidden: pdb disruptions allowed is negative"
        )));
    }
    if status["disruptedPods"]
        .as_object()
        .is_some_and(|d| d.len() > MAX_DISRUPTED_PODS)
    {
        return Err(ApiError::Forbidden(format!(
            "poddisruptionbudgets.policy {name:?} is forbidden: DisruptedPods map too big - too many evictions not confirmed by PDB controller"
        )));
    }
    if allowed == 0 {
        return Err(refused(
            0,
            format!(
                "The disruption budget {name} needs {} healthy pods and has {} currently",
                status["desiredHealthy"].as_i64().unwrap_or(0),
                status["currentHealthy"].as_i64().unwrap_or(0)
            ),
        ));
    }
    let mut status = status.clone();
    status["disruptionsAllowed"] = json!(allowed - 1);
    if allowed == 1 {
        let observed = status["observedGeneration"].as_i64().unwrap_or(0);
        disruption::set_condition(&mut status, observed, "InsufficientPods", "", &now());
    }
    status["disruptedPods"][pod] = json!(format_time(Utc::now()));
    Ok(status)
}

impl Request<'_> {
    pub(super) fn evict(&self, target: &Target, eviction: Value) -> Result<Response, ApiError> {
        if eviction["metadata"]["name"].as_str() != Some(target.name()) {
            return Err(ApiError::BadRequest(
                "name in URL does not match name in Eviction object".into(),
            ));
        }
        let options = DeleteOptions::parse(&eviction["deleteOptions"], self.query);
        let dry_run = self.dry_run()
            || eviction["deleteOptions"]["dryRun"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d == "All"));
        let pod = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        if !can_ignore_budgets(&pod) {
            let (budgets, _) = self
                .server
                .store
                .list("policy/poddisruptionbudgets", Some(target.ns()));
            let budgets: Vec<&Arc<Value>> = budgets.iter().filter(|b| guards(b, &pod)).collect();
            if budgets.len() > 1 {
                return Err(ApiError::Status(json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
                    "code": 500,
                })));
            }
            if let Some(budget) = budgets.first() {
                self.disrupt(budget, &pod, dry_run)?;
            }
        }
        if !dry_run {
            self.delete_evicted(target, &pod, options)?;
        }
        Ok(json_response(
            StatusCode::CREATED,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            &[],
        ))
    }

    /// The budget's say on evicting a running pod: an unready pod may go while the
    /// budget is otherwise met (or its policy says always); a ready one takes a
    /// disruption.
    fn disrupt(&self, budget: &Value, pod: &Value, dry_run: bool) -> Result<(), ApiError> {
        let status = &budget["status"];
        if !is_ready(pod) {
            let always = budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow";
            let desired = status["desiredHealthy"].as_i64().unwrap_or(0);
            let current = status["currentHealthy"].as_i64().unwrap_or(0);
            if always || (current >= desired && desired > 0) {
                return Ok(());
            }
        }
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let status = take_disruption(budget, name)?;
        if !dry_run
            && !self
                .server
                .write_budget_status(budget, status, "kube-apiserver")
        {
            let budget_name = budget["metadata"]["name"].as_str().unwrap_or_default();
            return Err(refused(
                10,
                format!(
                    "The disruption budget {budget_name} is still being processed by the server."
                ),
            ));
        }
        Ok(())
    }

    /// Marks the pod as a disruption target, then deletes it.
    fn delete_evicted(
        &self,
        target: &Target,
        pod: &Value,
        options: DeleteOptions,
    ) -> Result<(), ApiError> {
        let mut marked = pod.clone();
        let mut conditions: Vec<Value> = marked["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        conditions.retain(|c| c["type"] != "DisruptionTarget");
        conditions.push(json!({
            "type": "DisruptionTarget", "status": "True", "lastTransitionTime": now(),
            "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting",
        }));
        marked["status"]["conditions"] = json!(conditions);
        let manager = self.field_manager();
        let now = now();
        managed::record_update(
            Some(pod),
            &mut marked,
            super::discovery::builtin_ownership_schema("", "pods").as_deref(),
            true,
            &Writer {
                manager: &manager,
                subresource: "eviction",
                api_version: "v1",
                now: &now,
            },
        );
        let stored = self
            .server
            .store
            .replace(
                &target.key(),
                marked,
                Some(super::store::resource_version(pod)),
            )
            .map_err(|e| super::handlers::map_store_error(target, e))?;
        self.server.after_write(&target.kind, &stored);
        self.server
            .delete_object(
                &target.kind,
                &stored,
                options.with_propagation(Propagation::Background),
            )
            .map_err(|e| super::handlers::map_store_error(target, e))?;
        Ok(())
    }
}
