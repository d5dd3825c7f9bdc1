//! Reconcilers of the definitions: Script (hash and syntax), Task and Workflow
//! (references, cross-object rules, default workflow conflicts, plans using them).
//! Each writes only its status, and only when something changed.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::api::common::ObjectRef;
use crate::api::conditions;
use crate::api::resolve::content_sha256;
use crate::api::rules::Problem;
use crate::api::syntax;
use crate::api::{Script, ScriptStatus, Task, TaskStatus, Workflow, WorkflowStatus};

use super::context::{Context, Error};

const RECHECK: Duration = Duration::from_secs(300);

fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Ready condition from a list of problems: the reason names the first kind of trouble.
fn ready(
    existing: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    problems: &[Problem],
    generation: Option<i64>,
    not_ready_reason: &str,
) -> (
    Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    bool,
) {
    let mut conditions = existing.to_vec();
    let changed = if problems.is_empty() {
        conditions::set(
            &mut conditions,
            "Ready",
            conditions::TRUE,
            "Valid",
            "",
            generation,
            Timestamp::now(),
        )
    } else {
        conditions::set(
            &mut conditions,
            "Ready",
            conditions::FALSE,
            not_ready_reason,
            describe(problems),
            generation,
            Timestamp::now(),
        )
    };
    (conditions, changed)
}

pub async fn reconcile_script(script: Arc<Script>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Script");
    let status = script.status.clone().unwrap_or_default();
    let generation = script.metadata.generation;
    let sha256 = content_sha256(&script.spec.content);
    let mut diagnostics = syntax::check(script.spec.language, &script.spec.content);
    diagnostics.truncate(syntax::MAX_DIAGNOSTICS);
    let problems = crate::api::rules::check_script(&script);
    let (conditions, flipped) = ready(&status.conditions, &problems, generation, "SyntaxError");
    if status.sha256.as_deref() == Some(sha256.as_str())
        && status.diagnostics == diagnostics
        && status.observed_generation == generation
        && !flipped
    {
        return Ok(Action::requeue(RECHECK));
    }
    if !problems.is_empty() {
        ctx.event(
            script.as_ref(),
            EventType::Warning,
            "SyntaxError",
            "Check",
            describe(&problems),
        );
    }
    ctx.apply_status(
        script.as_ref(),
        &ScriptStatus {
            observed_generation: generation,
            sha256: Some(sha256),
            diagnostics,
            conditions,
        },
    )
    .await?;
    Ok(Action::requeue(RECHECK))
}

pub async fn reconcile_task(task: Arc<Task>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Task");
    let catalog = ctx.catalog();
    let problems = catalog.check_task(&task);
    let status = task.status.clone().unwrap_or_default();
    let generation = task.metadata.generation;
    let (conditions, flipped) = ready(
        &status.conditions,
        &problems,
        generation,
        "InvalidReference",
    );
    if flipped || status.observed_generation != generation {
        if flipped && !problems.is_empty() {
            ctx.event(
                task.as_ref(),
                EventType::Warning,
                "NotReady",
                "Check",
                describe(&problems),
            );
        }
        let status = TaskStatus {
            observed_generation: generation,
            conditions,
        };
        ctx.apply_status(task.as_ref(), &status).await?;
    }
    // References may appear later: look again soon while not Ready.
    Ok(Action::requeue(if problems.is_empty() {
        RECHECK
    } else {
        Duration::from_secs(15)
    }))
}

pub async fn reconcile_workflow(
    workflow: Arc<Workflow>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("Workflow");
    let catalog = ctx.catalog();
    let namespace = workflow.namespace().unwrap_or_default();
    let name = workflow.name_any();
    let mut problems = catalog.check_workflow(&workflow);
    problems.extend(
        catalog
            .check_default_workflows()
            .into_iter()
            .filter(|p| p.namespace == namespace && p.name == name),
    );
    let default_for = catalog
        .default_workflow(&namespace, workflow.spec.os)
        .filter(|w| w.name_any() == name && w.namespace().as_deref() == Some(namespace.as_str()))
        .map(|w| w.spec.os);
    let this = ObjectRef {
        name: name.clone(),
        namespace: Some(namespace.clone()),
    };
    let active_plans = ctx
        .caches
        .plans
        .state()
        .iter()
        .filter(|plan| {
            let plan_ns = plan.namespace().unwrap_or_default();
            plan.spec
                .targets
                .iter()
                .any(|target| match &target.workflow_ref {
                    Some(reference) => {
                        reference.name == this.name && reference.namespace_or(&plan_ns) == namespace
                    }
                    None => {
                        target.os == workflow.spec.os
                            && catalog
                                .default_workflow(&plan_ns, target.os)
                                .is_some_and(|d| {
                                    d.name_any() == name
                                        && d.namespace().as_deref() == Some(namespace.as_str())
                                })
                    }
                })
        })
        .count() as i32;
    let status = workflow.status.clone().unwrap_or_default();
    let generation = workflow.metadata.generation;
    let reason = if problems.iter().any(|p| p.field == "spec.default") {
        "DefaultConflict"
    } else {
        "InvalidTasks"
    };
    let (conditions, flipped) = ready(&status.conditions, &problems, generation, reason);
    if flipped
        || status.observed_generation != generation
        || status.active_plans != active_plans
        || status.default_for != default_for
    {
        if flipped && !problems.is_empty() {
            ctx.event(
                workflow.as_ref(),
                EventType::Warning,
                reason,
                "Check",
                describe(&problems),
            );
        }
        ctx.apply_status(
            workflow.as_ref(),
            &WorkflowStatus {
                observed_generation: generation,
                active_plans,
                default_for,
                conditions,
            },
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}
