//! Every reconciler, with the exact requests one reconcile makes against a mock API
//! server (and none when nothing changed).

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::api::agent::{Agent, AgentStatus};
use crate::api::conditions;
use crate::api::patchjob::{JobPhase, PatchJob, PatchJobStatus, RebootRecord, RebootState};
use crate::api::plan::RemediationPlan;
use crate::api::resolve::content_sha256;
use crate::api::{Script, ScriptStatus, Task, Workflow};

use super::fixtures::{ApiServer, Fixture, NAMESPACE, cache, next_event, stored};
use super::{Action, Context, Error};
use crate::events::QueuedEvent;

/// Runs a reconcile that must make no request: an unanswered request would keep it
/// waiting, so it must end on its own within a moment.
async fn quietly<F: std::future::Future>(reconcile: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(2), reconcile)
        .await
        .expect("the reconcile made a request (it is waiting for an answer)")
}

fn typed<K: serde::de::DeserializeOwned>(value: Value) -> K {
    serde_json::from_value(value).unwrap()
}

fn script(name: &str) -> Script {
    let mut script: Script = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Script",
        "metadata": {"name": name}, "spec": {"language": "Bash", "content": "echo hi"}}),
    );
    script.metadata = stored(name, Some("team"));
    script
}

fn task(name: &str, script: &str) -> Task {
    let mut task: Task = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task",
        "metadata": {"name": name}, "spec": {"os": "Linux", "type": "RunScript", "runScript": {"scriptRef": {"name": script}}}}),
    );
    task.metadata = stored(name, Some("team"));
    task
}

fn workflow(name: &str, tasks: &[&str]) -> Workflow {
    let pre: Vec<Value> = tasks
        .iter()
        .map(|t| json!({"taskRef": {"name": t}}))
        .collect();
    let mut workflow: Workflow = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Workflow",
        "metadata": {"name": name}, "spec": {"os": "Linux", "preTasks": pre}}),
    );
    workflow.metadata = stored(name, Some("team"));
    workflow
}

fn agent(name: &str, status: Option<AgentStatus>) -> Agent {
    let mut agent: Agent = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": name, "labels": {"group": "web"}},
        "spec": {"mode": "External", "os": "Linux", "allowedPlans": {"namespaces": {"from": "All"}}}}),
    );
    let labels = agent.metadata.labels.clone();
    agent.metadata = stored(name, None);
    agent.metadata.labels = labels;
    agent.status = status;
    agent
}

fn plan(max_concurrent: i32) -> RemediationPlan {
    let mut plan: RemediationPlan = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "RemediationPlan",
        "metadata": {"name": "weekly"},
        "spec": {"targets": [{"name": "web", "os": "Linux", "selector": {"matchLabels": {"group": "web"}}, "workflowRef": {"name": "flow"}}],
                 "patches": {"skip": true}, "rollout": {"maxConcurrent": max_concurrent, "maxFailures": 0}}}),
    );
    plan.metadata = stored("weekly", Some("team"));
    plan
}

fn job(name: &str, status: PatchJobStatus, deadline: Timestamp) -> PatchJob {
    let mut job: PatchJob = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob",
        "metadata": {"name": name}, "spec": {"agent": "web-1", "plan": "weekly", "run": "m1", "os": "Linux"}}),
    );
    job.metadata = stored(name, Some("team"));
    job.metadata.finalizers = Some(vec![crate::api::common::RUN_FINALIZER.into()]);
    job.spec.deadline = Some(Time(deadline));
    job.status = Some(status);
    job
}

/// The Ready condition of a definition whose spec checked out.
fn set_valid(conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>) {
    conditions::set(
        conditions,
        "Ready",
        conditions::TRUE,
        "Valid",
        "",
        Some(1),
        Timestamp::now(),
    );
}

/// Asks for a run of `plan` now, as `fleetpatch run plan` does.
const PLAN_STATUS_PATH: &str =
    "/apis/fleetpatch.io/v1alpha1/namespaces/team/remediationplans/weekly/status";

/// Requests a run of `plan` (team/weekly) whose one job, for `host`, fails as soon as
/// it is created, and answers the reconcile's first requests: the run's status write,
/// then the job's creation (checking it runs nothing) and its failure. Returns the
/// reconcile, which goes on to count the run, and the failure written.
async fn start_a_run_whose_one_job_fails(
    ctx: &Arc<Context>,
    server: &mut ApiServer,
    queued_events: &mut tokio::sync::mpsc::Receiver<QueuedEvent>,
    mut plan: RemediationPlan,
    host: &str,
    os: &str,
) -> (tokio::task::JoinHandle<Result<Action, Error>>, Value) {
    request_run(&mut plan);
    let reconcile = tokio::spawn(super::plan::reconcile_plan(Arc::new(plan), ctx.clone()));
    server
        .answer("PATCH", PLAN_STATUS_PATH, 200, json!({}))
        .await;
    assert_eq!(next_event(queued_events).await["reason"], "RunStarted");
    let job = format!("weekly-m20261201120000-{host}");
    let created = server
        .answer("POST", "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs", 201,
            json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": job, "namespace": "team", "uid": "u1"}, "spec": {"agent": host, "os": os}}))
        .await;
    assert_eq!(created["spec"]["preActions"], json!([]), "nothing to run");
    let failed = server
        .answer(
            "PATCH",
            &format!("/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/{job}/status"),
            200,
            json!({}),
        )
        .await;
    assert_eq!(failed["status"]["phase"], "Failed");
    (reconcile, failed)
}

fn request_run(plan: &mut RemediationPlan) {
    plan.metadata.annotations = Some(
        [(
            crate::api::common::RUN_REQUESTED_ANNOTATION.to_string(),
            "2026-12-01T12:00:00Z".to_string(),
        )]
        .into(),
    );
}

/// Node `name`, cordoned by the drain for job team/weekly-m1-node-a.
fn drained_for_weekly_m1(name: &str) -> Node {
    let mut node = Node {
        metadata: stored(name, None),
        ..Default::default()
    };
    node.metadata.annotations = Some(
        [
            (
                super::drain::DRAIN_FOR_ANNOTATION.to_string(),
                "team/weekly-m1-node-a".to_string(),
            ),
            (
                super::drain::CORDONED_ANNOTATION.to_string(),
                "true".to_string(),
            ),
        ]
        .into(),
    );
    node
}

/// Answers the next request, a merge patch of Node `name`, and returns the patch.
async fn patched_node(server: &mut ApiServer, name: &str) -> Value {
    server
        .answer(
            "PATCH",
            &format!("/api/v1/nodes/{name}"),
            200,
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
        )
        .await
}

/// The Agent of the cluster node `name`.
fn node_agent(name: &str) -> Agent {
    let mut agent: Agent = typed(
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Agent",
        "metadata": {"name": name}, "spec": {"mode": "Node", "os": "Linux", "nodeName": name}}),
    );
    agent.metadata = stored(name, None);
    agent
}

/// A running job, due in an hour, whose agent asks to reboot.
fn waiting_for_reboot(name: &str) -> PatchJob {
    job(
        name,
        PatchJobStatus {
            phase: JobPhase::Running,
            reboot: Some(RebootRecord {
                state: RebootState::Pending,
                ..Default::default()
            }),
            ..Default::default()
        },
        Timestamp::now() + SignedDuration::from_hours(1),
    )
}

#[tokio::test]
async fn a_script_whose_status_is_current_makes_no_request_and_a_new_one_one_status_write() {
    let (ctx, mut server, _, _) = Fixture::new().into_parts();
    let mut current = script("hello");
    let mut status = ScriptStatus {
        observed_generation: Some(1),
        sha256: Some(content_sha256("echo hi")),
        diagnostics: vec![],
        conditions: vec![],
    };
    set_valid(&mut status.conditions);
    current.status = Some(status);
    quietly(super::definitions::reconcile_script(
        Arc::new(current),
        ctx.clone(),
    ))
    .await
    .unwrap();
    let reconcile = tokio::spawn(super::definitions::reconcile_script(
        Arc::new(script("hello")),
        ctx,
    ));
    let written = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/namespaces/team/scripts/hello/status",
            200,
            json!({}),
        )
        .await;
    assert_eq!(written["status"]["sha256"], content_sha256("echo hi"));
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_task_whose_script_is_missing_says_so_once_in_an_event_and_its_status() {
    let (ctx, mut server, _, mut queued_events) = Fixture::new().into_parts();
    let reconcile = tokio::spawn(super::definitions::reconcile_task(
        Arc::new(task("say", "missing")),
        ctx,
    ));
    let event = next_event(&mut queued_events).await;
    assert_eq!(event["reason"], "NotReady");
    let written = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/namespaces/team/tasks/say/status",
            200,
            json!({}),
        )
        .await;
    assert_eq!(written["status"]["conditions"][0]["status"], "False");
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_workflow_of_existing_tasks_becomes_ready_in_one_write() {
    let (ctx, mut server, mut writers, _) = Fixture::new().into_parts();
    cache(&mut writers.scripts, script("hello"));
    cache(&mut writers.tasks, task("say", "hello"));
    let reconcile = tokio::spawn(super::definitions::reconcile_workflow(
        Arc::new(workflow("flow", &["say"])),
        ctx,
    ));
    let written = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/namespaces/team/workflows/flow/status",
            200,
            json!({}),
        )
        .await;
    assert_eq!(
        written["status"]["conditions"][0]["status"], "True",
        "{written}"
    );
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_requested_run_with_max_concurrent_one_creates_exactly_one_signed_job() {
    let (ctx, mut server, mut writers, mut queued_events) = Fixture::new().into_parts();
    cache(&mut writers.scripts, script("hello"));
    cache(&mut writers.tasks, task("say", "hello"));
    cache(&mut writers.workflows, workflow("flow", &["say"]));
    for name in ["web-1", "web-2", "web-3"] {
        cache(&mut writers.agents, agent(name, None));
    }
    let mut plan = plan(1);
    request_run(&mut plan);
    let reconcile = tokio::spawn(super::plan::reconcile_plan(Arc::new(plan), ctx.clone()));
    let status_path = "/apis/fleetpatch.io/v1alpha1/namespaces/team/remediationplans/weekly/status";
    let started = server.answer("PATCH", status_path, 200, json!({})).await;
    assert_eq!(started["status"]["currentRun"]["id"], "m20261201120000");
    assert_eq!(next_event(&mut queued_events).await["reason"], "RunStarted");
    let created = server
        .answer("POST", "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs", 201, json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": "x"}, "spec": {"agent": "web-1", "os": "Linux"}}))
        .await;
    assert_eq!(created["spec"]["agent"], "web-1");
    assert_eq!(
        created["metadata"]["finalizers"],
        json!([crate::api::common::RUN_FINALIZER])
    );
    let job: PatchJob = typed(created.clone());
    assert!(ctx.signer.verify(&job), "the job is signed: {created}");
    let counted = server.answer("PATCH", status_path, 200, json!({})).await;
    assert_eq!(counted["status"]["currentRun"]["counts"]["pending"], 3);
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A target without a workflowRef whose hosts' OS has no default workflow, neither in
/// the plan's namespace nor in the library: the host is left out — its job is created
/// failed, runs nothing, and says why, in its status, the run's failures and an Event.
#[tokio::test]
async fn a_host_whose_os_has_no_default_workflow_is_left_out_with_the_reason() {
    let (ctx, mut server, mut writers, mut queued_events) = Fixture::new().into_parts();
    cache(&mut writers.scripts, script("hello"));
    cache(&mut writers.tasks, task("say", "hello"));
    let mut linux_default = workflow("flow", &["say"]);
    linux_default.spec.default = true;
    cache(&mut writers.workflows, linux_default);
    let mut windows = agent("win-1", None);
    windows.spec.os = crate::api::OperatingSystem::Windows;
    cache(&mut writers.agents, windows);
    let mut plan = plan(1);
    let target = &mut plan.spec.targets[0];
    target.os = crate::api::OperatingSystem::Windows;
    target.workflow_ref = None;
    let (reconcile, failed) = start_a_run_whose_one_job_fails(
        &ctx,
        &mut server,
        &mut queued_events,
        plan,
        "win-1",
        "Windows",
    )
    .await;
    let status_path = PLAN_STATUS_PATH;
    let message = failed["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("no default workflow for Windows"),
        "{message}"
    );
    let event = next_event(&mut queued_events).await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .contains("no default workflow for Windows"),
        "{event}"
    );
    let counted = server.answer("PATCH", status_path, 200, json!({})).await;
    let failures = &counted["status"]["currentRun"]["failures"];
    assert!(
        failures
            .to_string()
            .contains("no default workflow for Windows"),
        "{counted}"
    );
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn an_unchanged_plan_makes_no_request() {
    let (ctx, server, mut writers, _) = Fixture::new().into_parts();
    cache(&mut writers.scripts, script("hello"));
    cache(&mut writers.tasks, task("say", "hello"));
    cache(&mut writers.workflows, workflow("flow", &["say"]));
    let mut plan = plan(1);
    let mut status = crate::api::plan::RemediationPlanStatus {
        observed_generation: Some(1),
        ..Default::default()
    };
    set_valid(&mut status.conditions);
    plan.status = Some(status);
    quietly(super::plan::reconcile_plan(Arc::new(plan), ctx))
        .await
        .unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_gets_one_status_write_over_what_was_read_and_one_event() {
    let (ctx, mut server, _, mut queued_events) = Fixture::new().into_parts();
    let past = Timestamp::now() - SignedDuration::from_mins(5);
    let running = PatchJobStatus {
        phase: JobPhase::Running,
        ..Default::default()
    };
    let cached = job("weekly-m1-web-1", running.clone(), past);
    let reconcile = tokio::spawn(super::jobs::reconcile_job(Arc::new(cached.clone()), ctx));
    let path = "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-web-1";
    server
        .answer("GET", path, 200, serde_json::to_value(&cached).unwrap())
        .await;
    let written = server
        .answer("PATCH", &format!("{path}/status"), 200, json!({}))
        .await;
    assert_eq!(written["status"]["phase"], "Unknown");
    assert_eq!(
        written["metadata"]["resourceVersion"], "7",
        "written over what was read"
    );
    assert_eq!(
        next_event(&mut queued_events).await["reason"],
        "DeadlineExceeded"
    );
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_finished_job_of_an_ended_run_is_deleted_after_its_ttl_then_let_go() {
    let (ctx, mut server, _, _) = Fixture::new().into_parts();
    let long_ago = Timestamp::now() - SignedDuration::from_hours(5);
    let done = job(
        "weekly-m1-web-1",
        PatchJobStatus {
            phase: JobPhase::Succeeded,
            completion_time: Some(Time(long_ago)),
            ..Default::default()
        },
        long_ago,
    );
    let path = "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-web-1";
    let reconcile = tokio::spawn(super::jobs::reconcile_job(
        Arc::new(done.clone()),
        ctx.clone(),
    ));
    server
        .answer("DELETE", path, 200, serde_json::to_value(&done).unwrap())
        .await;
    reconcile.await.unwrap().unwrap();
    // Deleted (the finalizer holds it) and its run is over: the finalizer goes.
    let mut deleting = done;
    deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let reconcile = tokio::spawn(super::jobs::reconcile_job(Arc::new(deleting.clone()), ctx));
    // The cache keeps only our finalizer: the others are read before ours is removed.
    let mut stored = deleting.clone();
    stored
        .metadata
        .finalizers
        .as_mut()
        .unwrap()
        .push("example.com/keep".into());
    server
        .answer("GET", path, 200, serde_json::to_value(&stored).unwrap())
        .await;
    let patch = server
        .answer("PATCH", path, 200, serde_json::to_value(&deleting).unwrap())
        .await;
    assert_eq!(patch["metadata"]["finalizers"], json!(["example.com/keep"]));
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn agents_no_gateway_can_judge_are_judged_by_the_leader_and_others_cost_nothing() {
    let (ctx, mut server, mut writers, _) = Fixture::new().into_parts();
    // Never heard from: one write, Unknown.
    let reconcile = tokio::spawn(super::agents::reconcile_agent(
        Arc::new(agent("new", None)),
        ctx.clone(),
    ));
    let written = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/agents/new/status",
            200,
            json!({}),
        )
        .await;
    assert_eq!(written["status"]["conditions"][0]["status"], "Unknown");
    reconcile.await.unwrap().unwrap();
    // Ready through a replica whose presence Lease is current: nothing to do.
    let mut ready = AgentStatus {
        gateway: Some("replica-a".into()),
        ..Default::default()
    };
    conditions::set(
        &mut ready.conditions,
        "Ready",
        conditions::TRUE,
        "Heartbeat",
        "",
        Some(1),
        Timestamp::now(),
    );
    let lease = |renewed: Timestamp| Lease {
        metadata: stored(
            &crate::gateway::presence::presence_lease_name("replica-a"),
            Some(NAMESPACE),
        ),
        spec: Some(LeaseSpec {
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(20),
            ..Default::default()
        }),
    };
    cache(&mut writers.leases, lease(Timestamp::now()));
    quietly(super::agents::reconcile_agent(
        Arc::new(agent("web-1", Some(ready.clone()))),
        ctx.clone(),
    ))
    .await
    .unwrap();
    // The replica went away long ago: not Ready, one write.
    cache(
        &mut writers.leases,
        lease(Timestamp::now() - SignedDuration::from_mins(10)),
    );
    let reconcile = tokio::spawn(super::agents::reconcile_agent(
        Arc::new(agent("web-1", Some(ready))),
        ctx,
    ));
    let written = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/agents/web-1/status",
            200,
            json!({}),
        )
        .await;
    assert_eq!(written["status"]["conditions"][0]["reason"], "GatewayGone");
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_node_whose_agent_waits_to_reboot_is_claimed_cordoned_and_the_job_told() {
    node_claimed_for_a_waiting_job(None).await;
}

/// A plan author may write their job's annotations: an "Approved" put there by hand is
/// nobody's approval. The node is cordoned and drained as for any other job, and the
/// false verdict cleared.
#[tokio::test]
async fn a_job_that_approves_its_own_reboot_is_drained_like_any_other() {
    node_claimed_for_a_waiting_job(Some("Approved")).await;
}

async fn node_claimed_for_a_waiting_job(decision_on_the_job: Option<&str>) {
    let (ctx, mut server, mut writers, mut queued_events) = Fixture::new().into_parts();
    cache(&mut writers.agents, node_agent("node-a"));
    let mut plan = plan(5);
    plan.status = None;
    cache(&mut writers.plans, plan);
    let mut waiting = waiting_for_reboot("weekly-m1-node-a");
    waiting.spec.agent = "node-a".into();
    waiting.spec.node = Some("node-a".into());
    let signature = ctx.signer.sign("team", "weekly-m1-node-a", &waiting.spec);
    let mut annotations: std::collections::BTreeMap<String, String> = [(
        crate::gateway::jobs::SIGNATURE_ANNOTATION.to_string(),
        signature,
    )]
    .into();
    if let Some(decision) = decision_on_the_job {
        annotations.insert(
            crate::api::common::REBOOT_DECISION_ANNOTATION.into(),
            decision.into(),
        );
    }
    waiting.metadata.annotations = Some(annotations);
    cache(&mut writers.jobs, waiting);
    let node = Node {
        metadata: stored("node-a", None),
        ..Default::default()
    };
    let reconcile = tokio::spawn(super::drain::reconcile_node(Arc::new(node), ctx));
    server
        .answer(
            "GET",
            "/api/v1/nodes",
            200,
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": []}),
        )
        .await;
    let cordon = patched_node(&mut server, "node-a").await;
    assert_eq!(cordon["spec"]["unschedulable"], true);
    assert_eq!(
        cordon["metadata"]["annotations"]["fleetpatch.io/drain-for"],
        "team/weekly-m1-node-a"
    );
    assert_eq!(next_event(&mut queued_events).await["reason"], "Cordoned");
    let told = server
        .answer(
            "PATCH",
            "/apis/fleetpatch.io/v1alpha1/namespaces/team/patchjobs/weekly-m1-node-a",
            200,
            json!({}),
        )
        .await;
    assert!(
        told["metadata"]["annotations"]["fleetpatch.io/reboot-message"]
            .as_str()
            .unwrap()
            .starts_with("draining node node-a")
    );
    assert_eq!(
        told["metadata"]["annotations"]
            .as_object()
            .unwrap()
            .get("fleetpatch.io/reboot-decision"),
        Some(&Value::Null),
        "any verdict on the job is cleared: there is none until the drain gives one"
    );
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// A job's author writes Denied on their job while its node is held for the drain: the
/// node is given back at once, not left cordoned until the job ends.
#[tokio::test]
async fn a_denial_while_the_node_is_held_gives_the_node_back() {
    let (ctx, mut server, mut writers, mut queued_events) = Fixture::new().into_parts();
    let mut held = waiting_for_reboot("weekly-m1-node-a");
    held.spec.node = Some("node-a".into());
    held.metadata.annotations = Some(
        [(
            crate::api::common::REBOOT_DECISION_ANNOTATION.to_string(),
            "Denied".to_string(),
        )]
        .into(),
    );
    cache(&mut writers.jobs, held);
    let node = drained_for_weekly_m1("node-a");
    let reconcile = tokio::spawn(super::drain::reconcile_node(Arc::new(node), ctx));
    let released = patched_node(&mut server, "node-a").await;
    assert!(
        released["spec"]
            .as_object()
            .is_some_and(|spec| spec.contains_key("unschedulable")),
        "uncordoned: {released}"
    );
    assert_eq!(
        released["metadata"]["annotations"]["fleetpatch.io/drain-for"],
        Value::Null
    );
    assert_eq!(next_event(&mut queued_events).await["reason"], "Uncordoned");
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

#[tokio::test]
async fn a_forged_job_never_gets_a_node_cordoned() {
    let (ctx, server, mut writers, _) = Fixture::new().into_parts();
    cache(&mut writers.agents, node_agent("node-a"));
    // Unsigned, and for node-b although its agent is node-a's.
    let mut forged = waiting_for_reboot("forged");
    forged.spec.agent = "node-a".into();
    forged.spec.node = Some("node-b".into());
    cache(&mut writers.jobs, forged);
    for name in ["node-a", "node-b"] {
        let node = Node {
            metadata: stored(name, None),
            ..Default::default()
        };
        quietly(super::drain::reconcile_node(Arc::new(node), ctx.clone()))
            .await
            .unwrap();
    }
    server.done().await;
}

/// Attack (a plan author, in their own namespace): the drain approved node-a's reboot
/// (the Node records it) and wrote "Approved" on the job; the agent's long-poll hears
/// it at once and the host goes down — its `InProgress` report reaches the API only a
/// moment later, or not at all (it waits at most 5 s for the acknowledgement after
/// asking for the reboot). The author, watching their job, writes Denied over the
/// approval in that moment: the reconciler, seeing a Pending job with a denial, gives
/// the node back — uncordons it and drops its drain annotations — while it reboots.
/// From then on nothing counts node-a as rebooting: `maxConcurrentNodes`,
/// `--max-node-reboots` and the one-control-plane-node-at-a-time rule let the next
/// node be claimed and rebooted at once; an author with jobs on every control-plane
/// node takes them down together (etcd quorum), and pods scheduled back onto node-a
/// are killed by its reboot undrained. (Removing the job's signature does the same: an
/// unsigned job is cached without its reboot record, so the node is released as
/// "no longer needs the reboot".) A denial must not release a node whose approval is
/// recorded: hold it until the job reports the reboot or the approval lapses.
#[tokio::test]
async fn a_denial_written_after_the_approval_does_not_release_a_rebooting_node() {
    let (ctx, server, mut writers, _) = Fixture::new().into_parts();
    cache(&mut writers.agents, node_agent("node-a"));
    cache(&mut writers.plans, plan(5));
    let mut held = waiting_for_reboot("weekly-m1-node-a");
    held.spec.agent = "node-a".into();
    held.spec.node = Some("node-a".into());
    let signature = ctx.signer.sign("team", "weekly-m1-node-a", &held.spec);
    held.metadata.annotations = Some(
        [
            (
                crate::gateway::jobs::SIGNATURE_ANNOTATION.to_string(),
                signature,
            ),
            // The author's, over the drain's "Approved".
            (
                crate::api::common::REBOOT_DECISION_ANNOTATION.to_string(),
                "Denied".to_string(),
            ),
        ]
        .into(),
    );
    cache(&mut writers.jobs, held);
    let mut node = drained_for_weekly_m1("node-a");
    node.metadata.annotations.get_or_insert_default().insert(
        super::drain::DRAIN_APPROVED_ANNOTATION.to_string(),
        (Timestamp::now() - SignedDuration::from_secs(2)).to_string(),
    );
    // Nothing to do but wait for the reboot's report (or the approval to lapse): no
    // request, above all no uncordon.
    quietly(super::drain::reconcile_node(Arc::new(node), ctx))
        .await
        .unwrap();
    server.done().await;
}

/// Attack (anyone whose text reaches an Event: a drain's eviction errors, a plan's
/// names): the reconcilers recorded their Events themselves, one API request each on
/// the reconcile's path, outside the per-object budget the gateway's Events have, and
/// with the note as long as it came — events.k8s.io refuses a note over 1 KiB, so
/// such an Event was lost. Every Event goes through the one queue: no request on the
/// reconcile's path, the note cut to what the API takes.
#[tokio::test]
async fn a_reconcilers_event_is_queued_with_a_note_the_api_takes() {
    let (ctx, server, _, mut queued_events) = Fixture::new().into_parts();
    let node = Node {
        metadata: stored("node-a", None),
        ..Default::default()
    };
    ctx.event(
        &node,
        kube::runtime::events::EventType::Warning,
        "DrainTimedOut",
        "Drain",
        "cannot evict ".repeat(400),
    );
    let event = next_event(&mut queued_events).await;
    assert_eq!(event["reason"], "DrainTimedOut");
    assert!(event["note"].as_str().unwrap().len() <= 1024, "{event}");
    server.done().await;
}

/// A plan selecting Bugfix updates, and a host whose agent patches with apt (which
/// marks no bug fixes): the job is created failed with the reason, before anything
/// runs on the host — not at its patch step, after its pre actions ran.
#[tokio::test]
async fn a_classification_the_hosts_patcher_cannot_honour_fails_its_job_before_anything_runs() {
    let (ctx, mut server, mut writers, mut queued_events) = Fixture::new().into_parts();
    cache(&mut writers.scripts, script("hello"));
    cache(&mut writers.tasks, task("say", "hello"));
    cache(&mut writers.workflows, workflow("flow", &["say"]));
    let status: AgentStatus = typed(json!({"platform": {"name": "debian", "patcher": "apt"}}));
    cache(&mut writers.agents, agent("web-1", Some(status)));
    let mut plan = plan(1);
    plan.spec.patches = typed(json!({"classifications": ["Bugfix"]}));
    let (reconcile, failed) = start_a_run_whose_one_job_fails(
        &ctx,
        &mut server,
        &mut queued_events,
        plan,
        "web-1",
        "Linux",
    )
    .await;
    let status_path = PLAN_STATUS_PATH;
    let message = failed["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("spec.patches.classifications")
            && message.contains("apt cannot select Bugfix"),
        "{message}"
    );
    let event = next_event(&mut queued_events).await;
    assert_eq!(event["reason"], "ClassificationNotSupported", "{event}");
    server.answer("PATCH", status_path, 200, json!({})).await;
    reconcile.await.unwrap().unwrap();
    server.done().await;
}

/// The built-in library is put back object by object with forced server-side apply
/// under the controller's field manager (what a team edited there is taken back),
/// scripts before the tasks that need them and tasks before workflows; each body is
/// the object alone, without the namespace or status the API sets.
#[tokio::test]
async fn the_library_is_put_back_with_one_forced_apply_per_object() {
    let (ctx, mut server, _, _) = Fixture::new().into_parts();
    let library = crate::api::library::Library::load(NAMESPACE);
    let client = ctx.client.clone();
    let install = tokio::spawn(async move { super::library::install(&client, NAMESPACE).await });
    let objects = library
        .scripts
        .iter()
        .map(|o| ("scripts", "Script", o.metadata.name.clone()))
        .chain(
            library
                .tasks
                .iter()
                .map(|o| ("tasks", "Task", o.metadata.name.clone())),
        )
        .chain(
            library
                .workflows
                .iter()
                .map(|o| ("workflows", "Workflow", o.metadata.name.clone())),
        );
    let mut applied = 0;
    for (plural, kind, name) in objects {
        let name = name.expect("a built-in object has a name");
        let body = server
            .answer_with(
                "PATCH",
                &format!("/apis/fleetpatch.io/v1alpha1/namespaces/{NAMESPACE}/{plural}/{name}"),
                "force=true&fieldManager=fleetpatch.io%2Fcontroller",
                200,
                Value::clone,
            )
            .await;
        assert_eq!(body["kind"], kind, "{body}");
        assert_eq!(body["apiVersion"], "fleetpatch.io/v1alpha1", "{body}");
        assert!(body["metadata"]["namespace"].is_null(), "{body}");
        assert!(body.get("status").is_none(), "{body}");
        applied += 1;
    }
    assert!(applied >= 3, "the library has scripts, tasks and workflows");
    install.await.unwrap().unwrap();
    server.done().await;
}
