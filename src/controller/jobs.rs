//! The PatchJob reconciler: a job whose agent stopped reporting ends as Unknown at its
//! deadline (never Succeeded), and finished jobs are deleted after their TTL. It also
//! wakes the gateway's long-polls when jobs change.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::conditions;
use crate::api::patchjob::{ActionPhase, JobPhase, PatchJob};

use super::context::{Context, Error};

pub async fn reconcile_job(job: Arc<PatchJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("PatchJob");
    ctx.gateway.job_changed(&job.spec.agent);
    let now = Timestamp::now();
    let mut status = job.status.clone().unwrap_or_default();
    if status.phase.is_finished() {
        let finished = status.completion_time.as_ref().map_or(now, |t| t.0);
        let ttl =
            k8s_openapi::jiff::SignedDuration::from_secs(ctx.settings.job_ttl.as_secs() as i64);
        if now >= finished + ttl {
            let api: Api<PatchJob> =
                Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
            match api
                .delete(&job.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
            return Ok(Action::await_change());
        }
        let left = (finished + ttl).duration_since(now).as_secs().max(1) as u64;
        return Ok(Action::requeue(Duration::from_secs(left.min(3600))));
    }
    let Some(deadline) = job.spec.deadline.as_ref().map(|d| d.0) else {
        return Ok(Action::requeue(Duration::from_secs(300)));
    };
    if now < deadline {
        let left = deadline.duration_since(now).as_secs().max(1) as u64;
        return Ok(Action::requeue(Duration::from_secs(left.min(300))));
    }
    // Past the deadline without a final report: the outcome is not known.
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
    conditions::set(
        &mut status.conditions,
        "Failed",
        conditions::TRUE,
        "DeadlineExceeded",
        message.clone(),
        None,
        now,
    );
    conditions::set(
        &mut status.conditions,
        "Complete",
        conditions::FALSE,
        "DeadlineExceeded",
        message.clone(),
        None,
        now,
    );
    ctx.apply_status(
        job.as_ref(),
        serde_json::to_value(&status).expect("serializes"),
    )
    .await?;
    ctx.event(
        job.as_ref(),
        EventType::Warning,
        "DeadlineExceeded",
        "Expire",
        message,
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(60)))
}
