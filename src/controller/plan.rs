//! The RemediationPlan reconciler: starts runs (on schedule, inside the window, or on
//! request), creates one PatchJob per host as the rollout allows, and rolls the jobs'
//! phases up into the plan's status. The decisions are pure functions; this file reads
//! caches, applies decisions and writes status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::common::{AGENT_LABEL, PLAN_LABEL, RUN_LABEL, RUN_REQUESTED_ANNOTATION};
use crate::api::conditions;
use crate::api::patchjob::{JobPhase, PatchJob, PatchJobSpec, PatchJobStatus};
use crate::api::plan::{PlanRun, RemediationPlan, RunFailure, RunPhase};
use crate::api::resolve::{self, JobTarget};
use crate::api::schedule::ParsedSchedule;

use super::context::{Context, Error};
use super::rollout::{FleetAgent, RunJob, plan_rollout};

/// Most failures kept in a run's status.
pub const MAX_FAILURES_LISTED: usize = 20;
/// Most finished runs kept in a plan's status.
pub const MAX_RECENT_RUNS: usize = 10;

/// The run id for a run request: the digits of a timestamp value, else a hash.
pub fn run_id_for_request(value: &str) -> String {
    let digits: String = value.chars().filter(char::is_ascii_digit).collect();
    if (8..=20).contains(&digits.len()) {
        format!("m{digits}")
    } else {
        format!("m{}", &hex::encode(Sha256::digest(value.as_bytes()))[..12])
    }
}

/// The run id of a scheduled run.
pub fn run_id_for_schedule(at: chrono::DateTime<Utc>) -> String {
    format!("s{}", at.format("%Y%m%d%H%M"))
}

/// Deterministic job name: a restarted controller finds the job it created before.
pub fn job_name(plan: &str, run: &str, agent: &str) -> String {
    let name = format!("{plan}-{run}-{agent}");
    if name.len() <= 253 {
        return name;
    }
    let digest = hex::encode(Sha256::digest(name.as_bytes()));
    let keep: String = plan.chars().take(200).collect();
    format!("{}-{}", keep.trim_end_matches(['-', '.']), &digest[..16])
}

fn run_is_open(run: &PlanRun) -> bool {
    matches!(run.phase, RunPhase::Running | RunPhase::Halted) && run.completion_time.is_none()
}

pub async fn reconcile_plan(
    plan: Arc<RemediationPlan>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("RemediationPlan");
    let mut status = plan.status.clone().unwrap_or_default();
    let before = serde_json::to_value(&status).unwrap_or_default();
    let generation = plan.metadata.generation;
    let now = Utc::now();

    let problems = ctx.catalog().check_plan(&plan);
    let schedule = plan
        .spec
        .schedule
        .as_ref()
        .map(ParsedSchedule::parse)
        .transpose();
    let ready_message = problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    if problems.is_empty() {
        conditions::set(
            &mut status.conditions,
            "Ready",
            conditions::TRUE,
            "Valid",
            "",
            generation,
            Timestamp::now(),
        );
    } else {
        conditions::set(
            &mut status.conditions,
            "Ready",
            conditions::FALSE,
            "InvalidPlan",
            ready_message.clone(),
            generation,
            Timestamp::now(),
        );
    }
    status.observed_generation = generation;
    let schedule = schedule.ok().flatten();
    status.next_schedule_time = schedule
        .as_ref()
        .and_then(|s| s.next_after(now))
        .map(|t| Time(to_timestamp(t)));

    // Start a run when none is open.
    if problems.is_empty()
        && !plan.spec.suspend
        && status.current_run.as_ref().is_none_or(|r| !run_is_open(r))
    {
        let requested = plan.annotations().get(RUN_REQUESTED_ANNOTATION).cloned();
        let new_request = requested.filter(|value| status.last_run_request.as_ref() != Some(value));
        let due = schedule.as_ref().and_then(|s| {
            s.due(
                now,
                status
                    .last_schedule_time
                    .as_ref()
                    .map(|t| from_timestamp(t.0)),
            )
        });
        let run_id = match (&new_request, due) {
            (Some(value), _) => Some(run_id_for_request(value)),
            (None, Some(at)) => Some(run_id_for_schedule(at)),
            (None, None) => None,
        };
        // Ids are deterministic, so a trigger seen again through a stale cache maps to a
        // run that already exists and starts nothing.
        let known = |id: &str| {
            status
                .current_run
                .iter()
                .chain(&status.recent_runs)
                .any(|run| run.id == id)
        };
        let run_id = run_id.filter(|id| !known(id));
        if let Some(id) = run_id {
            if let Some(value) = new_request {
                status.last_run_request = Some(value);
            } else if let Some(at) = due {
                status.last_schedule_time = Some(Time(to_timestamp(at)));
            }
            if let Some(finished) = status.current_run.take() {
                status.recent_runs.retain(|run| run.id != finished.id);
                status.recent_runs.insert(0, finished);
                status.recent_runs.truncate(MAX_RECENT_RUNS);
            }
            status.current_run = Some(PlanRun {
                id: id.clone(),
                phase: RunPhase::Running,
                start_time: Time(Timestamp::now()),
                completion_time: None,
                counts: Default::default(),
                failures: vec![],
            });
            // Record the run before creating any job, so a restart continues this run.
            ctx.apply_status(
                plan.as_ref(),
                serde_json::to_value(&status).expect("status serializes"),
            )
            .await?;
            ctx.event(
                plan.as_ref(),
                EventType::Normal,
                "RunStarted",
                "Run",
                format!("run {id} started"),
            )
            .await;
        }
    }

    let mut requeue = match &status.next_schedule_time {
        Some(next) => {
            Duration::from_secs((from_timestamp(next.0) - now).num_seconds().clamp(1, 300) as u64)
        }
        None => Duration::from_secs(300),
    };
    if let Some(run) = status.current_run.clone().filter(run_is_open) {
        let run = advance_run(&plan, &ctx, run).await?;
        if !run_is_open(&run) {
            let (reason, type_) = match run.phase {
                RunPhase::Succeeded => ("RunSucceeded", EventType::Normal),
                RunPhase::Halted => ("RunHalted", EventType::Warning),
                _ => ("RunFailed", EventType::Warning),
            };
            let note = format!(
                "run {}: {} succeeded, {} failed, {} unknown of {} host(s)",
                run.id,
                run.counts.succeeded,
                run.counts.failed,
                run.counts.unknown,
                run.counts.total
            );
            ctx.event(plan.as_ref(), type_, reason, "Run", note).await;
        } else {
            requeue = Duration::from_secs(2);
        }
        status.current_run = Some(run);
    }

    let after = serde_json::to_value(&status).unwrap_or_default();
    if after != before {
        ctx.apply_status(plan.as_ref(), after).await?;
    }
    Ok(Action::requeue(requeue))
}

/// Creates the jobs the rollout allows and recounts the run.
async fn advance_run(
    plan: &RemediationPlan,
    ctx: &Context,
    mut run: PlanRun,
) -> Result<PlanRun, Error> {
    let namespace = plan.namespace().unwrap_or_default();
    let name = plan.name_any();
    let jobs: Vec<Arc<PatchJob>> = ctx
        .caches
        .jobs
        .state()
        .into_iter()
        .filter(|job| job.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|job| {
            job.labels().get(PLAN_LABEL) == Some(&name)
                && job.labels().get(RUN_LABEL) == Some(&run.id)
        })
        .collect();
    let run_jobs: Vec<RunJob> = jobs
        .iter()
        .map(|job| RunJob {
            agent: job.spec.agent.clone(),
            phase: job.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        })
        .collect();
    let agents: Vec<FleetAgent> = ctx
        .caches
        .agents
        .state()
        .iter()
        .map(|agent| FleetAgent {
            name: agent.name_any(),
            os: agent.spec.os,
            labels: agent.labels().clone(),
            paused: agent.spec.paused,
        })
        .collect();
    let rollout = &plan.spec.rollout;
    let decision = plan_rollout(
        &plan.spec.targets,
        &rollout.max_concurrent,
        &rollout.max_failures,
        plan.spec.suspend,
        &agents,
        &run_jobs,
    );
    let in_flight =
        run_jobs.iter().filter(|j| !j.phase.is_finished()).count() + decision.create.len();

    let catalog = ctx.catalog();
    let api: Api<PatchJob> = Api::namespaced(ctx.client.clone(), &namespace);
    let deadline_after = plan
        .spec
        .job_deadline_minutes
        .map(|m| Duration::from_secs(u64::from(m) * 60))
        .unwrap_or(ctx.settings.default_job_deadline);
    let mut failures: Vec<RunFailure> = Vec::new();
    let mut pending = Vec::new();
    for assignment in &decision.create {
        let target = &plan.spec.targets[assignment.target];
        let agent = agents
            .iter()
            .find(|a| a.name == assignment.agent)
            .expect("assignments name known agents");
        let job_target = JobTarget {
            agent: agent.name.clone(),
            plan: name.clone(),
            run: run.id.clone(),
            patches: plan.spec.patches.clone(),
            reboot: plan.spec.reboot.policy,
        };
        let resolved = match &target.workflow_ref {
            Some(reference) => catalog
                .workflow(reference, &namespace)
                .map_err(|err| resolve::ResolveError::WorkflowNotFound(err.to_string()))
                .and_then(|workflow| resolve::resolve_job(&catalog, workflow, job_target.clone())),
            None => match catalog.default_workflow(&namespace, agent.os) {
                Some(workflow) => resolve::resolve_job(&catalog, workflow, job_target.clone()),
                None => Err(resolve::ResolveError::WorkflowNotFound(format!(
                    "no default workflow for {}",
                    agent.os
                ))),
            },
        };
        let deadline = Timestamp::now()
            + k8s_openapi::jiff::SignedDuration::from_secs(deadline_after.as_secs() as i64);
        let (spec, failed) = match resolved {
            Ok(mut spec) => {
                spec.deadline = Some(Time(deadline));
                (spec, None)
            }
            // The job is still created, empty and Failed, so the run counts the host and a
            // person sees why on the job itself.
            Err(err) => (
                PatchJobSpec {
                    agent: agent.name.clone(),
                    plan: name.clone(),
                    run: run.id.clone(),
                    os: agent.os,
                    workflow: target.workflow_ref.clone(),
                    pre_actions: vec![],
                    post_actions: vec![],
                    failure_policy: Default::default(),
                    patches: plan.spec.patches.clone(),
                    reboot: plan.spec.reboot.policy,
                    deadline: Some(Time(deadline)),
                    node: None,
                },
                Some(err),
            ),
        };
        let mut spec = spec;
        spec.node = ctx
            .caches
            .agents
            .get(&kube::runtime::reflector::ObjectRef::new(&agent.name))
            .filter(|a| a.spec.mode == crate::api::agent::AgentMode::Node)
            .and_then(|a| a.spec.node_name.clone());
        let job_name = job_name(&name, &run.id, &agent.name);
        let job = PatchJob {
            metadata: ObjectMeta {
                name: Some(job_name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(BTreeMap::from([
                    (PLAN_LABEL.to_string(), name.clone()),
                    (RUN_LABEL.to_string(), run.id.clone()),
                    (AGENT_LABEL.to_string(), agent.name.clone()),
                ])),
                owner_references: Some(vec![owner(plan)]),
                ..Default::default()
            },
            spec,
            status: None,
        };
        pending.push((job, failed, agent.name.clone()));
    }
    // Creations run a few at a time: a large fleet's first wave is thousands of jobs.
    let created: Vec<Result<Option<RunFailure>, Error>> = futures::stream::iter(pending)
        .map(|(job, failed, agent)| create_job(ctx, &api, plan, job, failed, agent))
        .buffer_unordered(16)
        .collect()
        .await;
    for result in created {
        failures.extend(result?);
    }

    for job in &jobs {
        let Some(status) = &job.status else { continue };
        if matches!(status.phase, JobPhase::Failed | JobPhase::Unknown)
            && failures.len() < MAX_FAILURES_LISTED
        {
            let reason = if status.message.is_empty() {
                format!("{:?}", status.phase)
            } else {
                status.message.clone()
            };
            failures.push(RunFailure {
                agent: job.spec.agent.clone(),
                job: job.name_any(),
                reason,
            });
        }
    }
    failures.sort_by(|a, b| a.job.cmp(&b.job));
    failures.dedup_by(|a, b| a.job == b.job);
    failures.truncate(MAX_FAILURES_LISTED);
    run.counts = decision.counts;
    run.failures = failures;
    run.phase = decision.phase;
    if in_flight == 0 && run.phase != RunPhase::Running {
        run.completion_time = Some(Time(Timestamp::now()));
    }
    Ok(run)
}

/// Creates one job; a job whose workflow could not be resolved is marked Failed at once.
async fn create_job(
    ctx: &Context,
    api: &Api<PatchJob>,
    plan: &RemediationPlan,
    job: PatchJob,
    failed: Option<resolve::ResolveError>,
    agent: String,
) -> Result<Option<RunFailure>, Error> {
    let job_name = job.name_any();
    match api
        .create(
            &PostParams {
                field_manager: Some(super::context::FIELD_MANAGER.into()),
                ..Default::default()
            },
            &job,
        )
        .await
    {
        Ok(created) => {
            ctx.metrics.job_created();
            ctx.gateway.job_changed(&agent);
            if let Some(err) = failed {
                let message = format!("cannot resolve the workflow: {err}");
                let mut status = PatchJobStatus {
                    phase: JobPhase::Failed,
                    message: message.clone(),
                    ..Default::default()
                };
                conditions::set(
                    &mut status.conditions,
                    "Failed",
                    conditions::TRUE,
                    err.category(),
                    message.clone(),
                    None,
                    Timestamp::now(),
                );
                conditions::set(
                    &mut status.conditions,
                    "Complete",
                    conditions::FALSE,
                    err.category(),
                    message.clone(),
                    None,
                    Timestamp::now(),
                );
                status.completion_time = Some(Time(Timestamp::now()));
                ctx.apply_status(&created, serde_json::to_value(&status).expect("serializes"))
                    .await?;
                ctx.event(
                    plan,
                    EventType::Warning,
                    err.category(),
                    "CreateJob",
                    format!("{job_name}: {message}"),
                )
                .await;
                return Ok(Some(RunFailure {
                    agent: agent.clone(),
                    job: job_name,
                    reason: message,
                }));
            }
        }
        // Created by an earlier incarnation of this controller: nothing to do.
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => return Err(err.into()),
    }
    Ok(None)
}

fn owner(plan: &RemediationPlan) -> OwnerReference {
    plan.controller_owner_ref(&())
        .expect("plans from the API have a uid")
}

fn to_timestamp(at: chrono::DateTime<Utc>) -> Timestamp {
    Timestamp::from_second(at.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn from_timestamp(at: Timestamp) -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp(at.as_second(), 0).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_and_job_names_are_deterministic() {
        assert_eq!(
            run_id_for_request("2026-11-22T22:35:01Z"),
            "m20261122223501"
        );
        assert_eq!(
            run_id_for_request("again please"),
            run_id_for_request("again please")
        );
        assert!(run_id_for_request("again please").starts_with('m'));
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-28T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(run_id_for_schedule(at), "s202611280200");
        assert_eq!(
            job_name("weekly", "s202611280200", "web-1"),
            "weekly-s202611280200-web-1"
        );
        let long = job_name(&"p".repeat(120), "m1", &"a".repeat(200));
        assert!(
            long.len() <= 253 && crate::manifests::is_dns_subdomain(&long),
            "{long}"
        );
        assert_eq!(long, job_name(&"p".repeat(120), "m1", &"a".repeat(200)));
    }
}
