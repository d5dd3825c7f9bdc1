//! `meta/v1` Conditions kept the Kubernetes way: one per type, and
//! `lastTransitionTime` changes only when the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::patchjob::{ActionPhase, PatchResults};

/// Condition status values.
pub const TRUE: &str = "True";
pub const FALSE: &str = "False";
pub const UNKNOWN: &str = "Unknown";

/// Sets condition `type_` in `conditions`. Returns whether anything changed.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed = existing.status != status
                || existing.reason != reason
                || existing.message != message
                || existing.observed_generation != observed_generation;
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status.to_string();
            existing.reason = reason.to_string();
            existing.message = message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message,
                observed_generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// A job's end as its agent saw it: `Complete` and `Failed` with the reason
/// `JobSucceeded` or `JobFailed`.
pub fn set_job_finished(
    conditions: &mut Vec<Condition>,
    succeeded: bool,
    message: &str,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let reason = if succeeded {
        "JobSucceeded"
    } else {
        "JobFailed"
    };
    set_outcome(
        conditions,
        succeeded,
        reason,
        message,
        observed_generation,
        now,
    )
}

/// The `Complete`/`Failed` pair of a finished job, so `kubectl wait --for=condition=...`
/// works either way: Complete True and Failed False when it succeeded, the reverse when
/// it did not. Returns whether anything changed.
pub fn set_outcome(
    conditions: &mut Vec<Condition>,
    succeeded: bool,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let (complete, failed) = if succeeded {
        (TRUE, FALSE)
    } else {
        (FALSE, TRUE)
    };
    let a = set(
        conditions,
        "Complete",
        complete,
        reason,
        message,
        observed_generation,
        now,
    );
    let b = set(
        conditions,
        "Failed",
        failed,
        reason,
        message,
        observed_generation,
        now,
    );
    a || b
}

/// Condition type of a job whose patch step succeeded although some of its patches
/// failed (`patches.failWhen: AllFailed`, JetPatch): status True, the failed patches in
/// the message.
pub const PATCHES_PARTIALLY_FAILED: &str = "PatchesPartiallyFailed";

/// Sets `PatchesPartiallyFailed` when `patches` succeeded with failures; leaves the
/// conditions alone otherwise. Returns whether anything changed.
pub fn set_patches_partially_failed(
    conditions: &mut Vec<Condition>,
    patches: Option<&PatchResults>,
    observed_generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let Some(patches) = patches.filter(|p| p.phase == ActionPhase::Succeeded) else {
        return false;
    };
    if patches.failed.is_empty() {
        return false;
    }
    const NAMED: usize = 10;
    let mut names: Vec<&str> = patches
        .failed
        .iter()
        .take(NAMED)
        .map(|p| p.name.as_str())
        .collect();
    if patches.failed.len() > NAMED {
        names.push("...");
    }
    let message = format!(
        "{} of {} patch(es) failed: {}",
        patches.failed.len(),
        patches.failed.len() + patches.installed.len(),
        names.join(", ")
    );
    set(
        conditions,
        PATCHES_PARTIALLY_FAILED,
        TRUE,
        "SomePatchesFailed",
        message,
        observed_generation,
        now,
    )
}

/// The status of condition `type_`, if present.
pub fn status<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::patchjob::PatchOutcome;

    #[test]
    fn partially_failed_patches_are_a_condition_naming_them() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let outcome = |name: &str| PatchOutcome {
            name: name.into(),
            ..PatchOutcome::default()
        };
        let partly = |conditions: &mut Vec<Condition>, patches: &PatchResults| {
            set_patches_partially_failed(conditions, Some(patches), None, now)
        };
        let mut patches = PatchResults {
            phase: ActionPhase::Succeeded,
            installed: vec![outcome("curl")],
            ..PatchResults::default()
        };
        let mut conditions = Vec::new();
        assert!(!partly(&mut conditions, &patches));
        patches.failed.push(outcome("openssl"));
        assert!(partly(&mut conditions, &patches));
        assert_eq!(status(&conditions, PATCHES_PARTIALLY_FAILED), Some(TRUE));
        assert_eq!(conditions[0].message, "1 of 2 patch(es) failed: openssl");
        // A failed step is the job's failure, not a partial one.
        patches.phase = ActionPhase::Failed;
        let mut conditions = Vec::new();
        assert!(!partly(&mut conditions, &patches));
        assert!(conditions.is_empty());
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2026-01-01T01:00:00Z".parse().unwrap();
        let t2: Timestamp = "2026-01-01T02:00:00Z".parse().unwrap();
        let mut conditions = Vec::new();
        assert!(set(
            &mut conditions,
            "Ready",
            FALSE,
            "Resolving",
            "a",
            Some(1),
            t0
        ));
        let missing = |conditions: &mut Vec<Condition>| {
            set(conditions, "Ready", FALSE, "Missing", "b", Some(1), t1)
        };
        assert!(missing(&mut conditions));
        assert_eq!(conditions[0].last_transition_time.0, t0);
        assert!(!missing(&mut conditions));
        assert!(set(
            &mut conditions,
            "Ready",
            TRUE,
            "Resolved",
            "",
            Some(2),
            t2
        ));
        assert_eq!(conditions[0].last_transition_time.0, t2);
        assert_eq!(conditions.len(), 1);
        assert_eq!(status(&conditions, "Ready"), Some(TRUE));
    }
}
