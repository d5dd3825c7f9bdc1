//! The PatchJob reconciler (leader only): a job whose agent stopped reporting ends as
//! Unknown at its deadline (never Succeeded); a finished job is deleted after its TTL,
//! but never while its run is open; and a deleted job keeps the controller's finalizer
//! until its run has ended, so the run still counts it and never makes a second job for
//! that host. It also wakes the gateway's long-polls when jobs change (a deleted job's
//! agent is told to stop it).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use crate::api::common::RUN_FINALIZER;
use crate::api::conditions;
use crate::api::patchjob::{ActionPhase, JobPhase, PatchJob, PatchJobStatus};

use super::context::{Context, Error};
use super::plan::run_is_open;
use crate::api_errors;

/// The status of a job past its deadline without a final report, or `None` when it is
/// not (finished, no deadline, or not yet due).
pub fn expire_job(job: &PatchJob, now: Timestamp) -> Option<PatchJobStatus> {
    let mut status = job.status.clone().unwrap_or_default();
    let deadline = job.spec.deadline.as_ref()?.0;
    if status.phase.is_finished() || now < deadline {
        return None;
    }
    let message = format!(
        "no result from agent {} by the job's deadline",
        job.spec.agent
    );
    status.phase = JobPhase::Unknown;
    status.completion_time = Some(Time(now));
    status.message = message.clone();
    for action in status
        .pre_actions
        .iter_mut()
        .chain(status.post_actions.iter_mut())
    {
        if action.phase == ActionPhase::Running {
            action.phase = ActionPhase::Interrupted;
            action.message = "the agent stopped reporting while this action ran".into();
        }
    }
    conditions::set_outcome(
        &mut status.conditions,
        false,
        "DeadlineExceeded",
        &message,
        None,
        now,
    );
    Some(status)
}

/// When a finished job is deleted: `None` while its run is open, else how long until
/// its TTL has passed since it finished (zero: now). Times that cannot be added to
/// (a completion time at the end of time) count from `now`.
pub fn ttl_left(job: &PatchJob, run_open: bool, ttl: Duration, now: Timestamp) -> Option<Duration> {
    let status = job.status.as_ref()?;
    if !status.phase.is_finished() || run_open {
        return None;
    }
    let finished = status
        .completion_time
        .as_ref()
        .map_or(now, |t| t.0)
        .min(now);
    let ttl = SignedDuration::try_from(ttl).unwrap_or(SignedDuration::MAX);
    let due = finished.checked_add(ttl).unwrap_or(Timestamp::MAX);
    Some(Duration::try_from(due.duration_since(now)).unwrap_or(Duration::ZERO))
}

/// Whether the run `job` belongs to is still open in its plan's status.
fn run_open(ctx: &Context, job: &PatchJob) -> bool {
    let namespace = job.namespace().unwrap_or_default();
    ctx.caches
        .plans
        .get(&ObjectRef::new(&job.spec.plan).within(&namespace))
        .and_then(|plan| plan.status.clone())
        .and_then(|status| status.current_run)
        .is_some_and(|run| run.id == job.spec.run && run_is_open(&run))
}

pub async fn reconcile_job(job: Arc<PatchJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("PatchJob");
    ctx.gateway.job_changed(&job.spec.agent);
    let api: Api<PatchJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let open = run_open(&ctx, &job);
    if job.metadata.deletion_timestamp.is_some() {
        if open {
            // Stays (Terminating) until the run ends; its agent was told to stop it.
            // Deleted jobs of open runs are few: look again soon.
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        release_finalizer(&api, &job).await?;
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    if let Some(left) = ttl_left(&job, open, ctx.settings.job_ttl, now) {
        if left.is_zero() {
            match api
                .delete(&job.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(err) if api_errors::is_not_found(&err) => {}
                Err(err) => return Err(err.into()),
            }
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(
            left.clamp(Duration::from_secs(1), Duration::from_secs(3600)),
        ));
    }
    if job.status.as_ref().is_some_and(|s| s.phase.is_finished()) {
        // Finished in an open run: looked at again once the run may have ended.
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    if expire_job(&job, now).is_none() {
        let left = job
            .spec
            .deadline
            .as_ref()
            .map(|d| Duration::try_from(d.0.duration_since(now)).unwrap_or(Duration::ZERO))
            .unwrap_or(Duration::from_secs(300));
        return Ok(Action::requeue(
            left.clamp(Duration::from_secs(1), Duration::from_secs(300)),
        ));
    }
    // Past the deadline: decided on the full job (the cache holds no action details of
    // some jobs), written only over exactly that state, so a final report that landed
    // meanwhile is not overwritten.
    let Some(fresh) = api.get_opt(&job.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let Some(status) = expire_job(&fresh, now) else {
        return Ok(Action::await_change());
    };
    match ctx
        .apply_status_over(&fresh, &status, fresh.resource_version())
        .await
    {
        Ok(()) => {}
        Err(Error::Kube(err)) if api_errors::is_conflict(&err) => {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Err(err) => return Err(err),
    }
    ctx.event(
        job.as_ref(),
        EventType::Warning,
        "DeadlineExceeded",
        "Expire",
        status.message,
    );
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// Removes the controller's finalizer, leaving any other. The cache keeps only ours
/// (see `project_job`), so the others are read from the API server.
async fn release_finalizer(api: &Api<PatchJob>, cached: &PatchJob) -> Result<(), Error> {
    if !cached.finalizers().iter().any(|f| f == RUN_FINALIZER) {
        return Ok(());
    }
    let Some(job) = api.get_opt(&cached.name_any()).await? else {
        return Ok(());
    };
    if job.uid() != cached.uid() || !job.finalizers().iter().any(|f| f == RUN_FINALIZER) {
        return Ok(());
    }
    let rest: Vec<&String> = job
        .finalizers()
        .iter()
        .filter(|f| *f != RUN_FINALIZER)
        .collect();
    let patch =
        json!({"metadata": {"finalizers": rest, "resourceVersion": job.resource_version()}});
    match api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(err) if api_errors::is_not_found(&err) || api_errors::is_conflict(&err) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::patchjob::{ActionResult, PatchJobSpec};

    fn job(phase: JobPhase, deadline: Option<&str>, completed: Option<&str>) -> PatchJob {
        let mut job = PatchJob::new(
            "j",
            PatchJobSpec {
                deadline: deadline.map(|d| Time(d.parse().unwrap())),
                ..PatchJobSpec::bare("web-1", "p", "r")
            },
        );
        job.status = Some(PatchJobStatus {
            phase,
            completion_time: completed.map(|c| Time(c.parse().unwrap())),
            pre_actions: vec![ActionResult {
                name: "a".into(),
                phase: ActionPhase::Running,
                ..Default::default()
            }],
            ..Default::default()
        });
        job
    }

    #[test]
    fn a_job_past_its_deadline_ends_unknown_never_succeeded() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        assert!(
            expire_job(
                &job(JobPhase::Running, Some("2026-12-01T13:00:00Z"), None),
                now
            )
            .is_none()
        );
        assert!(expire_job(&job(JobPhase::Running, None, None), now).is_none());
        assert!(
            expire_job(
                &job(JobPhase::Succeeded, Some("2026-12-01T11:00:00Z"), None),
                now
            )
            .is_none()
        );
        let expired = expire_job(
            &job(JobPhase::Running, Some("2026-12-01T11:00:00Z"), None),
            now,
        )
        .unwrap();
        assert_eq!(expired.phase, JobPhase::Unknown);
        assert_eq!(expired.pre_actions[0].phase, ActionPhase::Interrupted);
        assert_eq!(
            conditions::status(&expired.conditions, "Failed"),
            Some("True")
        );
        assert_eq!(
            conditions::status(&expired.conditions, "Complete"),
            Some("False")
        );
    }

    #[test]
    fn finished_jobs_wait_for_their_ttl_and_for_their_run_to_end() {
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        let ttl = Duration::from_secs(3600);
        let done = job(JobPhase::Succeeded, None, Some("2026-12-01T11:30:00Z"));
        assert_eq!(
            ttl_left(&done, false, ttl, now),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            ttl_left(&done, true, ttl, now),
            None,
            "never while the run is open"
        );
        let old = job(JobPhase::Failed, None, Some("2026-11-01T00:00:00Z"));
        assert_eq!(ttl_left(&old, false, ttl, now), Some(Duration::ZERO));
        assert_eq!(
            ttl_left(&job(JobPhase::Running, None, None), false, ttl, now),
            None
        );
        // A completion time at the end of time (from a hostile or broken report) does
        // not overflow: it counts from now.
        let far = job(JobPhase::Succeeded, None, Some("9999-12-30T00:00:00Z"));
        assert_eq!(ttl_left(&far, false, ttl, now), Some(ttl));
        assert_eq!(
            ttl_left(&far, false, Duration::MAX, now).map(|d| d > Duration::ZERO),
            Some(true)
        );
    }
}
