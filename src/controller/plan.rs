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

use crate::api::OperatingSystem;
use crate::api::agent::Agent;
use crate::api::common::{
    AGENT_LABEL, PLAN_LABEL, RUN_FINALIZER, RUN_LABEL, RUN_REQUESTED_ANNOTATION,
};
use crate::api::conditions;
use crate::api::patchjob::{JobPhase, PatchJob, PatchJobSpec, PatchJobStatus};
use crate::api::plan::{
    PatchSelection, PlanRun, RemediationPlan, RemediationPlanStatus, RunFailure, RunPhase,
};
use crate::api::resolve::{self, JobTarget};
use crate::api::rules::Catalog;
use crate::api::schedule::ParsedSchedule;
use crate::gateway::jobs::SIGNATURE_ANNOTATION;

use super::context::{Context, Error};
use super::rollout::{Assignment, FleetAgent, RunJob, plan_rollout};
use crate::api_errors;

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

/// Whether a run may still create jobs or is waiting for them to finish.
pub fn run_is_open(run: &PlanRun) -> bool {
    matches!(run.phase, RunPhase::Running | RunPhase::Halted) && run.completion_time.is_none()
}

/// What starts a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `fleetpatch run plan` set the run-requested annotation to this value.
    Request(String),
    /// The schedule's occurrence at this time.
    Schedule(chrono::DateTime<Utc>),
}

/// The run to start now, if any: none while one is open, while suspended or invalid;
/// else a new run request, else a due schedule. Run ids are deterministic, so a
/// trigger seen again through a stale cache maps to a run that exists and starts
/// nothing.
pub fn decide_run(
    spec: &crate::api::plan::RemediationPlanSpec,
    status: &RemediationPlanStatus,
    requested: Option<&String>,
    schedule: Option<&ParsedSchedule>,
    valid: bool,
    now: chrono::DateTime<Utc>,
) -> Option<(String, Trigger)> {
    if !valid || spec.suspend || status.current_run.as_ref().is_some_and(run_is_open) {
        return None;
    }
    let new_request = requested.filter(|value| status.last_run_request.as_ref() != Some(*value));
    let trigger = match new_request {
        Some(value) => Trigger::Request(value.clone()),
        None => Trigger::Schedule(
            schedule?.due(
                now,
                status
                    .last_schedule_time
                    .as_ref()
                    .map(|t| from_timestamp(t.0)),
            )?,
        ),
    };
    let id = match &trigger {
        Trigger::Request(value) => run_id_for_request(value),
        Trigger::Schedule(at) => run_id_for_schedule(*at),
    };
    let known = status
        .current_run
        .iter()
        .chain(&status.recent_runs)
        .any(|run| run.id == id);
    (!known).then_some((id, trigger))
}

/// `status` with run `id` started by `trigger`: the previous run moves to the recent ones.
pub fn start_run(status: &mut RemediationPlanStatus, id: &str, trigger: &Trigger, now: Timestamp) {
    match trigger {
        Trigger::Request(value) => status.last_run_request = Some(value.clone()),
        Trigger::Schedule(at) => status.last_schedule_time = Some(Time(to_timestamp(*at))),
    }
    if let Some(finished) = status.current_run.take() {
        status.recent_runs.retain(|run| run.id != finished.id);
        status.recent_runs.insert(0, finished);
        status.recent_runs.truncate(MAX_RECENT_RUNS);
    }
    status.current_run = Some(PlanRun {
        id: id.to_string(),
        phase: RunPhase::Running,
        start_time: Time(now),
        completion_time: None,
        counts: Default::default(),
        failures: vec![],
    });
}

/// The PatchJob for one host of one run, whether its workflow resolved or not: one
/// builder for every path. A job whose workflow did not resolve has no actions and is
/// marked Failed right after it is created, so the run counts the host and a person
/// sees why on the job. Every job is signed (the gateway serves no other), owned by its
/// plan, and carries the finalizer that keeps a deleted job counted until its run ends.
pub fn build_job(
    plan: &RemediationPlan,
    target: &crate::api::plan::PlanTarget,
    agent: &crate::api::Agent,
    run: &str,
    resolved: &Result<PatchJobSpec, resolve::ResolveError>,
    deadline: Timestamp,
    signer: &crate::gateway::jobs::JobSigner,
) -> PatchJob {
    let namespace = plan.namespace().unwrap_or_default();
    let plan_name = plan.name_any();
    let agent_name = agent.name_any();
    let mut spec = match resolved {
        Ok(spec) => spec.clone(),
        Err(_) => PatchJobSpec {
            agent: agent_name.clone(),
            plan: plan_name.clone(),
            run: run.to_string(),
            os: agent.spec.os,
            workflow: target.workflow_ref.clone(),
            pre_actions: vec![],
            post_actions: vec![],
            failure_policy: Default::default(),
            patches: plan.spec.patches.clone(),
            reboot: plan.spec.reboot.policy,
            deadline: None,
            node: None,
        },
    };
    spec.deadline = Some(Time(deadline));
    spec.node = (agent.spec.mode == crate::api::agent::AgentMode::Node)
        .then(|| agent.spec.node_name.clone())
        .flatten();
    let name = job_name(&plan_name, run, &agent_name);
    let signature = signer.sign(&namespace, &name, &spec);
    PatchJob {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace),
            labels: Some(BTreeMap::from([
                (PLAN_LABEL.to_string(), plan_name),
                (RUN_LABEL.to_string(), run.to_string()),
                (AGENT_LABEL.to_string(), agent_name),
            ])),
            annotations: Some(BTreeMap::from([(
                SIGNATURE_ANNOTATION.to_string(),
                signature,
            )])),
            owner_references: Some(vec![owner(plan)]),
            finalizers: Some(vec![RUN_FINALIZER.to_string()]),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// The status of a job that could not be resolved.
pub fn unresolved_status(err: &resolve::ResolveError, now: Timestamp) -> PatchJobStatus {
    let message = format!("cannot resolve the workflow: {err}");
    let mut status = PatchJobStatus {
        phase: JobPhase::Failed,
        message: message.clone(),
        completion_time: Some(Time(now)),
        ..Default::default()
    };
    conditions::set_outcome(
        &mut status.conditions,
        false,
        err.category(),
        &message,
        None,
        now,
    );
    status
}

/// The plan's Ready condition from its problems.
fn set_ready(
    status: &mut RemediationPlanStatus,
    problems: &[crate::api::rules::Problem],
    generation: Option<i64>,
) {
    let (state, reason, message) = if problems.is_empty() {
        (conditions::TRUE, "Valid", String::new())
    } else {
        let message = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        (conditions::FALSE, "InvalidPlan", message)
    };
    conditions::set(
        &mut status.conditions,
        "Ready",
        state,
        reason,
        message,
        generation,
        Timestamp::now(),
    );
}

pub async fn reconcile_plan(
    plan: Arc<RemediationPlan>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("RemediationPlan");
    let mut status = plan.status.clone().unwrap_or_default();
    let before = status.clone();
    let now = Utc::now();

    let problems = ctx.catalog().check_plan(&plan);
    let schedule = plan
        .spec
        .schedule
        .as_ref()
        .map(ParsedSchedule::parse)
        .transpose()
        .ok()
        .flatten();
    set_ready(&mut status, &problems, plan.metadata.generation);
    status.observed_generation = plan.metadata.generation;
    status.next_schedule_time = schedule
        .as_ref()
        .and_then(|s| s.next_after(now))
        .map(|t| Time(to_timestamp(t)));

    if let Some((id, trigger)) = decide_run(
        &plan.spec,
        &status,
        plan.annotations().get(RUN_REQUESTED_ANNOTATION),
        schedule.as_ref(),
        problems.is_empty(),
        now,
    ) {
        start_run(&mut status, &id, &trigger, Timestamp::now());
        // Recorded before any job is created, so a restart continues this run.
        ctx.apply_status(plan.as_ref(), &status).await?;
        ctx.event(
            plan.as_ref(),
            EventType::Normal,
            "RunStarted",
            "Run",
            format!("run {id} started"),
        );
    }

    let mut requeue = match &status.next_schedule_time {
        Some(next) => {
            Duration::from_secs((from_timestamp(next.0) - now).num_seconds().clamp(1, 300) as u64)
        }
        None => Duration::from_secs(300),
    };
    if let Some(run) = status.current_run.clone().filter(run_is_open) {
        let run = advance_run(&plan, &ctx, run).await?;
        if run_is_open(&run) {
            requeue = Duration::from_secs(2);
        } else {
            let (reason, type_) = match run.phase {
                RunPhase::Succeeded => ("RunSucceeded", EventType::Normal),
                RunPhase::Halted => ("RunHalted", EventType::Warning),
                _ => ("RunFailed", EventType::Warning),
            };
            let mut note = format!(
                "run {}: {} succeeded, {} failed, {} unknown of {} host(s)",
                run.id,
                run.counts.succeeded,
                run.counts.failed,
                run.counts.unknown,
                run.counts.total
            );
            if run.counts.not_permitted > 0 {
                note.push_str(&format!(
                    "; {} selected host(s) skipped: their Agents do not accept plans from namespace {}",
                    run.counts.not_permitted,
                    plan.namespace().unwrap_or_default()
                ));
            }
            ctx.event(plan.as_ref(), type_, reason, "Run", note);
        }
        status.current_run = Some(run);
    }

    if status != before {
        ctx.apply_status(plan.as_ref(), &status).await?;
    }
    Ok(Action::requeue(requeue))
}

/// The hosts as the planner sees them for `plan`: whether each accepts plans from its
/// namespace comes from the Agent's `allowedPlans` and the namespace's labels.
fn fleet_for(ctx: &Context, plan: &RemediationPlan) -> Vec<FleetAgent> {
    let namespace = plan.namespace().unwrap_or_default();
    let labels = ctx
        .caches
        .namespaces
        .get(&kube::runtime::reflector::ObjectRef::new(&namespace))
        .map(|ns| ns.labels().clone());
    ctx.caches
        .agents
        .state()
        .iter()
        .map(|agent| FleetAgent {
            name: agent.name_any(),
            os: agent.spec.os,
            labels: agent.labels().clone(),
            paused: agent.spec.paused,
            permitted: agent.spec.allowed_plans.admits(
                &namespace,
                labels.as_ref(),
                &ctx.settings.namespace,
            ),
        })
        .collect()
}

/// Creates the jobs the rollout allows and recounts the run.
async fn advance_run(
    plan: &RemediationPlan,
    ctx: &Context,
    mut run: PlanRun,
) -> Result<PlanRun, Error> {
    let namespace = plan.namespace().unwrap_or_default();
    let jobs = jobs_of_run(ctx, &namespace, &plan.name_any(), &run.id);
    let run_jobs: Vec<RunJob> = jobs
        .iter()
        .map(|job| RunJob {
            agent: job.spec.agent.clone(),
            phase: job.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        })
        .collect();
    let rollout = &plan.spec.rollout;
    let decision = plan_rollout(
        &plan.spec.targets,
        &rollout.max_concurrent,
        &rollout.max_failures,
        plan.spec.suspend,
        &fleet_for(ctx, plan),
        &run_jobs,
    );
    let in_flight =
        run_jobs.iter().filter(|j| !j.phase.is_finished()).count() + decision.create.len();

    let deadline = job_deadline(
        plan.spec.job_deadline_minutes,
        ctx.settings.default_job_deadline,
        Timestamp::now(),
    );
    let pending = build_jobs(plan, ctx, &run.id, &decision.create, deadline);
    let api: Api<PatchJob> = Api::namespaced(ctx.client.clone(), &namespace);
    // Creations run a few at a time: a large fleet's first wave is thousands of jobs.
    let created: Vec<Result<Option<RunFailure>, Error>> = futures::stream::iter(pending)
        .map(|(job, failed, agent)| create_job(ctx, &api, plan, job, failed, agent))
        .buffer_unordered(16)
        .collect()
        .await;
    let mut failures: Vec<RunFailure> = Vec::new();
    for result in created {
        failures.extend(result?);
    }
    run.failures = listed_failures(failures, &jobs);
    run.counts = decision.counts;
    run.phase = decision.phase;
    if in_flight == 0 && run.phase != RunPhase::Running {
        run.completion_time = Some(Time(Timestamp::now()));
    }
    Ok(run)
}

/// The plan's jobs of one run. Deleted jobs of the run count too (they keep a
/// finalizer until the run ends), so a host whose job was deleted never gets a second
/// one in the same run.
fn jobs_of_run(ctx: &Context, namespace: &str, plan: &str, run: &str) -> Vec<Arc<PatchJob>> {
    ctx.caches
        .jobs
        .state()
        .into_iter()
        .filter(|job| job.namespace().as_deref() == Some(namespace))
        .filter(|job| {
            job.labels().get(PLAN_LABEL).map(String::as_str) == Some(plan)
                && job.labels().get(RUN_LABEL).map(String::as_str) == Some(run)
        })
        .collect()
}

/// When a job created `now` must be done: the plan's `jobDeadlineMinutes`, else the
/// controller's default.
fn job_deadline(minutes: Option<u32>, default: Duration, now: Timestamp) -> Timestamp {
    let after = minutes
        .map(|m| Duration::from_secs(u64::from(m) * 60))
        .unwrap_or(default);
    now.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(
        after.as_secs() as i64,
    ))
    .unwrap_or(Timestamp::MAX)
}

/// The jobs to create for the rollout's assignments, each with the error that keeps
/// its workflow from resolving (the job is then created Failed) and its agent's name.
/// An assignment whose agent has left the cache gets none.
fn build_jobs(
    plan: &RemediationPlan,
    ctx: &Context,
    run: &str,
    assignments: &[Assignment],
    deadline: Timestamp,
) -> Vec<(PatchJob, Option<resolve::ResolveError>, String)> {
    let namespace = plan.namespace().unwrap_or_default();
    let catalog = ctx.catalog();
    let mut pending = Vec::new();
    for assignment in assignments {
        let target = &plan.spec.targets[assignment.target];
        let Some(agent) = ctx
            .caches
            .agents
            .get(&kube::runtime::reflector::ObjectRef::new(&assignment.agent))
        else {
            continue;
        };
        let job_target = JobTarget {
            agent: assignment.agent.clone(),
            plan: plan.name_any(),
            run: run.to_string(),
            patches: plan.spec.patches.clone(),
            reboot: plan.spec.reboot.policy,
        };
        let resolved = resolve_target(&catalog, target, agent.spec.os, &namespace, job_target)
            .and_then(|job| match patcher_refusal(&agent, &plan.spec.patches) {
                Some(refusal) => Err(refusal),
                None => Ok(job),
            });
        let job = build_job(plan, target, &agent, run, &resolved, deadline, &ctx.signer);
        pending.push((job, resolved.err(), assignment.agent.clone()));
    }
    pending
}

/// The job spec for one host of a target: its workflow, or the namespace's default
/// workflow for the host's OS.
/// Why the host cannot install what the plan selects, when its agent has told which
/// package manager it patches with: the job is then failed before anything runs on the
/// host, instead of at its patch step after the pre actions ran.
pub fn patcher_refusal(agent: &Agent, patches: &PatchSelection) -> Option<resolve::ResolveError> {
    let patcher = agent
        .status
        .as_ref()?
        .platform
        .as_ref()?
        .patcher
        .as_deref()?;
    patches
        .refusal_on(patcher)
        .map(resolve::ResolveError::Unsupported)
}

fn resolve_target(
    catalog: &Catalog,
    target: &crate::api::plan::PlanTarget,
    os: OperatingSystem,
    namespace: &str,
    job_target: JobTarget,
) -> Result<PatchJobSpec, resolve::ResolveError> {
    match &target.workflow_ref {
        Some(reference) => catalog
            .workflow(reference, namespace)
            .map_err(|err| resolve::ResolveError::WorkflowNotFound(err.to_string()))
            .and_then(|workflow| resolve::resolve_job(catalog, workflow, job_target)),
        None => match catalog.default_workflow(namespace, os) {
            Some(workflow) => resolve::resolve_job(catalog, workflow, job_target),
            None => Err(resolve::ResolveError::WorkflowNotFound(format!(
                "no default workflow for {os}"
            ))),
        },
    }
}

/// The failures a run's status lists: those of this pass's creations and the run's
/// failed or lost jobs, one per job, in job order, at most [`MAX_FAILURES_LISTED`].
fn listed_failures(mut failures: Vec<RunFailure>, jobs: &[Arc<PatchJob>]) -> Vec<RunFailure> {
    for job in jobs {
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
    failures
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
    let params = PostParams {
        field_manager: Some(crate::field_manager::CONTROLLER.into()),
        ..Default::default()
    };
    match api.create(&params, &job).await {
        Ok(created) => {
            ctx.metrics.job_created();
            ctx.gateway.job_changed(&agent);
            if let Some(err) = failed {
                let status = unresolved_status(&err, Timestamp::now());
                ctx.apply_status(&created, &status).await?;
                ctx.event(
                    plan,
                    EventType::Warning,
                    err.category(),
                    "CreateJob",
                    format!("{job_name}: {}", status.message),
                );
                return Ok(Some(RunFailure {
                    agent,
                    job: job_name,
                    reason: status.message,
                }));
            }
        }
        // Created by an earlier incarnation of this controller: nothing to do.
        Err(err) if api_errors::is_conflict(&err) => {}
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
