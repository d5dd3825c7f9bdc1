//! Safe reboots of cluster nodes. A node agent that must reboot reports its job's
//! reboot as `Pending` and asks the gateway for permission. This reconciler (one per
//! Node, leader only) then — for a signed job of this node's own node agent, at most
//! `maxConcurrentNodes` nodes of a plan and `--max-node-reboots` nodes of the cluster at
//! a time, never two control-plane nodes together — cordons the node,
//! evicts its pods through the eviction API (so PodDisruptionBudgets hold) and approves
//! the reboot on the job; or, when the pods do not leave within the drain timeout,
//! denies it and uncordons. After the reboot it waits for the node to be Ready and
//! uncordons it. An approved reboot that does not happen within five minutes is
//! called off, so a node is never left cordoned for a host that stayed up.
//!
//! Everything it needs to finish is recorded on the Node itself (annotations), so a
//! node cordoned by us is uncordoned even when the job fails, the plan is deleted or
//! the controller restarts mid-way.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, EvictParams, ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use crate::api::common::{REBOOT_DECISION_ANNOTATION, REBOOT_MESSAGE_ANNOTATION};
use crate::api::patchjob::{PatchJob, RebootState};
use crate::api::plan::{DrainSettings, RemediationPlan};
use crate::api_errors;

use super::context::{Context, Error};

/// On a Node: the PatchJob (`namespace/name`) the node is drained for.
pub const DRAIN_FOR_ANNOTATION: &str = "fleetpatch.io/drain-for";
/// On a Node: the plan (`namespace/name`) of that job, to count the plan's nodes.
pub const DRAIN_PLAN_ANNOTATION: &str = "fleetpatch.io/drain-plan";
/// On a Node: when the drain started (RFC 3339).
pub const DRAIN_STARTED_ANNOTATION: &str = "fleetpatch.io/drain-started";
/// On a Node: `"true"` when fleetpatch cordoned it (and so must uncordon it). A node
/// somebody else had cordoned stays cordoned.
pub const CORDONED_ANNOTATION: &str = "fleetpatch.io/cordoned";
/// On a Node: when the reboot was approved (RFC 3339).
pub const DRAIN_APPROVED_ANNOTATION: &str = "fleetpatch.io/drain-approved";
/// Labels of nodes with the control-plane role.
const CONTROL_PLANE_LABELS: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];
/// How long an approved reboot may take to begin before it is called off.
pub const APPROVED_REBOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A node being drained or rebooted for a job, as its annotations record it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub plan: String,
    pub control_plane: bool,
}

/// Why a node may not be claimed yet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Wait {
    #[error("{0} node(s) of plan {1} are being drained or rebooted (maxConcurrentNodes {2})")]
    Plan(usize, String, u32),
    #[error("{0} node(s) of the cluster are being drained or rebooted (--max-node-reboots {1})")]
    Cluster(usize, usize),
    #[error("another control-plane node is being drained or rebooted")]
    ControlPlane,
}

/// Whether one more node may start draining: the plan's limit, the cluster's, and never
/// two control-plane nodes at once.
pub fn claim_decision(
    claimed: &[Claimed],
    plan: &str,
    max_of_plan: u32,
    control_plane: bool,
    max_of_cluster: usize,
) -> Result<(), Wait> {
    let of_plan = claimed.iter().filter(|c| c.plan == plan).count();
    if !may_claim(of_plan, max_of_plan) {
        return Err(Wait::Plan(of_plan, plan.to_string(), max_of_plan));
    }
    if claimed.len() >= max_of_cluster.max(1) {
        return Err(Wait::Cluster(claimed.len(), max_of_cluster.max(1)));
    }
    if control_plane && claimed.iter().any(|c| c.control_plane) {
        return Err(Wait::ControlPlane);
    }
    Ok(())
}

fn is_control_plane(node: &Node) -> bool {
    CONTROL_PLANE_LABELS
        .iter()
        .any(|label| node.labels().contains_key(*label))
}

/// What drain does with one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodFate {
    /// Evict it.
    Evict,
    /// Already terminating: wait for it to go.
    Wait,
    /// Leave it: a DaemonSet or static pod, a finished pod, or one the plan ignores.
    Stay,
}

/// The drain's decision for one pod.
pub fn pod_fate(pod: &Pod, ignore: Option<&Selector>) -> PodFate {
    let owned_by_daemonset = pod
        .owner_references()
        .iter()
        .any(|owner| owner.kind == "DaemonSet" && owner.controller == Some(true));
    let mirror = pod
        .annotations()
        .contains_key("kubernetes.io/config.mirror");
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    let ignored = ignore.is_some_and(|selector| selector.matches(pod.labels()));
    if owned_by_daemonset || mirror || finished || ignored {
        PodFate::Stay
    } else if pod.metadata.deletion_timestamp.is_some() {
        PodFate::Wait
    } else {
        PodFate::Evict
    }
}

/// Whether one more node of a plan may start draining, given how many of its nodes
/// are claimed already.
pub fn may_claim(claimed_by_plan: usize, max_concurrent_nodes: u32) -> bool {
    claimed_by_plan < max_concurrent_nodes.max(1) as usize
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn job_for(ctx: &Context, key: &str) -> Option<Arc<PatchJob>> {
    let (namespace, name) = key.split_once('/')?;
    ctx.caches.jobs.get(&ObjectRef::new(name).within(namespace))
}

fn plan_of(ctx: &Context, job: &PatchJob) -> Option<Arc<RemediationPlan>> {
    let namespace = job.namespace().unwrap_or_default();
    ctx.caches
        .plans
        .get(&ObjectRef::new(&job.spec.plan).within(&namespace))
}

fn reboot_state(job: &PatchJob) -> Option<RebootState> {
    job.status
        .as_ref()
        .and_then(|s| s.reboot.as_ref())
        .map(|r| r.state)
}

/// The reboot decision that counts for `job` on `node`. A job's annotations can be
/// written by whoever may edit the job — its plan's authors too — so they carry the
/// message and a denial, never the permission: a reboot is approved only when the Node
/// itself (which plan authors cannot write) records the drain for this very job as done.
pub fn decision(job: &PatchJob, node: Option<&Node>) -> Option<Verdict> {
    match job
        .annotations()
        .get(REBOOT_DECISION_ANNOTATION)
        .map(String::as_str)
    {
        Some("Denied") => Some(Verdict::Denied),
        Some("Approved") if node.is_some_and(|node| node_approves(node, job)) => {
            Some(Verdict::Approved)
        }
        _ => None,
    }
}

/// A reboot decision, as [`decision`] reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Approved,
    Denied,
}

/// Whether `node` records that it was drained for `job` and its reboot approved.
pub fn node_approves(node: &Node, job: &PatchJob) -> bool {
    let annotations = node.annotations();
    let job_key = key(&job.namespace().unwrap_or_default(), &job.name_any());
    annotations.get(DRAIN_FOR_ANNOTATION) == Some(&job_key)
        && annotations.contains_key(DRAIN_APPROVED_ANNOTATION)
        && job.spec.node.as_deref() == Some(node.name_any().as_str())
}

fn is_finished(job: &PatchJob) -> bool {
    job.status.as_ref().is_some_and(|s| s.phase.is_finished())
}

/// Whether `job` is a signed job of `node`'s own node agent: only those drain a node.
fn is_node_agents_job(ctx: &Context, job: &PatchJob, node: &str) -> bool {
    let agent = ctx.caches.agents.get(&ObjectRef::new(&job.spec.agent));
    let own = agent.is_some_and(|agent| {
        agent.spec.mode == crate::api::agent::AgentMode::Node
            && agent.spec.node_name.as_deref() == Some(node)
    });
    own && ctx.signer.verify(job)
}

/// Whether an approved reboot has not happened for longer than it may take.
pub fn approval_lapsed(node: &Node, now: Timestamp) -> bool {
    node.annotations()
        .get(DRAIN_APPROVED_ANNOTATION)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .is_some_and(|approved| {
            now.duration_since(approved).as_secs() >= APPROVED_REBOOT_TIMEOUT.as_secs() as i64
        })
}

/// A job on this node waiting for a reboot decision.
fn waiting_job(ctx: &Context, node: &str) -> Option<Arc<PatchJob>> {
    let mut waiting: Vec<Arc<PatchJob>> = ctx
        .caches
        .jobs
        .state()
        .into_iter()
        .filter(|job| {
            job.spec.node.as_deref() == Some(node)
                && !is_finished(job)
                && reboot_state(job) == Some(RebootState::Pending)
                // An "Approved" the node does not record is nobody's approval: the node
                // is drained as for any other job.
                && decision(job, None) != Some(Verdict::Denied)
                && is_node_agents_job(ctx, job, node)
        })
        .collect();
    // The oldest first, should there ever be more than one.
    waiting.sort_by_key(|job| job.metadata.creation_timestamp.clone().map(|t| t.0));
    waiting.into_iter().next()
}

/// Longest reboot message written on a job (and kept of it in the cache).
pub const MAX_REBOOT_MESSAGE: usize = 8 * 1024;

/// Whether the job already says `message` (as bounded when written).
pub fn says(job: &PatchJob, message: &str) -> bool {
    job.annotations()
        .get(REBOOT_MESSAGE_ANNOTATION)
        .map(String::as_str)
        == Some(crate::gateway::protocol::bounded(message, MAX_REBOOT_MESSAGE).as_str())
}

async fn annotate_job(ctx: &Context, job: &PatchJob, verdict: Option<&str>, message: &str) {
    let message = &crate::gateway::protocol::bounded(message, MAX_REBOOT_MESSAGE);
    let api: Api<PatchJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let mut annotations = serde_json::Map::new();
    // No verdict clears one: a decision on the job is only ever the drain's own.
    annotations.insert(REBOOT_DECISION_ANNOTATION.into(), json!(verdict));
    annotations.insert(REBOOT_MESSAGE_ANNOTATION.into(), json!(message));
    let patch = json!({"metadata": {"annotations": annotations}});
    if let Err(err) = api
        .patch(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        tracing::warn!(job = %job.name_any(), error = %err, "cannot record the reboot decision");
    }
}

fn nodes(ctx: &Context) -> Api<Node> {
    Api::all(ctx.client.clone())
}

/// Takes the node for `job`: cordons it (remembering whether it was us) and records the
/// drain on the node. Serialised per controller, so two nodes of one plan never both
/// pass the `maxConcurrentNodes` check.
async fn claim(ctx: &Context, node: &Node, job: &PatchJob) -> Result<Action, Error> {
    let name = node.name_any();
    let namespace = job.namespace().unwrap_or_default();
    let Some(plan) = plan_of(ctx, job) else {
        annotate_job(
            ctx,
            job,
            Some("Denied"),
            "the job's RemediationPlan no longer exists",
        )
        .await;
        return Ok(Action::await_change());
    };
    let plan_key = key(&namespace, &plan.name_any());
    let _serial = ctx.drain_lock.lock().await;
    // A fresh list, not the cache: the previous claim's write must be counted.
    let claimed: Vec<Claimed> = nodes(ctx)
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|n| n.name_any() != name)
        .filter_map(|n| {
            n.annotations()
                .get(DRAIN_PLAN_ANNOTATION)
                .map(|plan| Claimed {
                    plan: plan.clone(),
                    control_plane: is_control_plane(n),
                })
        })
        .collect();
    let max = plan.spec.reboot.max_concurrent_nodes;
    if let Err(wait) = claim_decision(
        &claimed,
        &plan_key,
        max,
        is_control_plane(node),
        ctx.settings.max_node_reboots,
    ) {
        let message = format!("waiting: {wait}");
        if !says(job, &message) {
            annotate_job(ctx, job, None, &message).await;
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let already_cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        DRAIN_FOR_ANNOTATION.into(),
        json!(key(&namespace, &job.name_any())),
    );
    annotations.insert(DRAIN_PLAN_ANNOTATION.into(), json!(plan_key));
    annotations.insert(
        DRAIN_STARTED_ANNOTATION.into(),
        json!(Timestamp::now().to_string()),
    );
    if !already_cordoned {
        annotations.insert(CORDONED_ANNOTATION.into(), json!("true"));
    }
    // The annotations and the cordon in one write: there is never a node cordoned by
    // us without the record that says so.
    let patch = json!({"metadata": {"annotations": annotations}, "spec": {"unschedulable": true}});
    nodes(ctx)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    ctx.event(
        node,
        EventType::Normal,
        "Cordoned",
        "Drain",
        format!(
            "cordoned for the reboot of job {}/{}",
            namespace,
            job.name_any()
        ),
    );
    annotate_job(
        ctx,
        job,
        None,
        &format!("draining node {name} before the reboot"),
    )
    .await;
    Ok(Action::requeue(Duration::from_millis(200)))
}

/// Gives the node back: uncordons it if we cordoned it and removes our annotations.
async fn release(ctx: &Context, node: &Node, why: &str) -> Result<(), Error> {
    let ours = node
        .annotations()
        .get(CORDONED_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let mut patch = json!({"metadata": {"annotations": {
        DRAIN_FOR_ANNOTATION: null,
        DRAIN_PLAN_ANNOTATION: null,
        DRAIN_STARTED_ANNOTATION: null,
        DRAIN_APPROVED_ANNOTATION: null,
        CORDONED_ANNOTATION: null,
    }}});
    if ours {
        patch["spec"] = json!({"unschedulable": null});
    }
    nodes(ctx)
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    let note = if ours {
        format!("uncordoned: {why}")
    } else {
        format!("left cordoned as it was before fleetpatch drained it: {why}")
    };
    ctx.event(node, EventType::Normal, "Uncordoned", "Drain", note);
    Ok(())
}

/// One pass of the drain: evicts what must go; approves the reboot once nothing is
/// left, denies it (and releases the node) once the timeout has passed.
async fn drain(ctx: &Context, node: &Node, job: &PatchJob) -> Result<Action, Error> {
    let name = node.name_any();
    let settings: DrainSettings = plan_of(ctx, job)
        .map(|plan| plan.spec.reboot.drain.clone())
        .unwrap_or_default();
    let ignore = settings
        .ignore_pod_selector
        .clone()
        .and_then(|s| Selector::try_from(s).ok());
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let pass = evict_pass(ctx, &pods, &name, ignore.as_ref()).await?;
    // Evicted pods may take a while to terminate; a pod counts as gone once it is.
    let still_there = if pass.left.is_empty() {
        0
    } else {
        pods.list(&pods_on(&name))
            .await?
            .items
            .iter()
            .filter(|pod| pod_fate(pod, ignore.as_ref()) != PodFate::Stay)
            .count()
    };
    if still_there == 0 {
        approve_reboot(ctx, node, job).await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let started = node
        .annotations()
        .get(DRAIN_STARTED_ANNOTATION)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or_else(Timestamp::now);
    let elapsed = Timestamp::now().duration_since(started);
    tracing::debug!(node = %name, left = pass.left.len(), blocked = pass.blocked.len(), elapsed = elapsed.as_secs(), "drain pass");
    if elapsed.as_secs() >= i64::from(settings.timeout_seconds) {
        let message = pass.timed_out_message(&name, settings.timeout_seconds);
        annotate_job(ctx, job, Some("Denied"), &message).await;
        ctx.event(node, EventType::Warning, "DrainTimedOut", "Drain", message);
        release(ctx, node, "the drain timed out, the reboot was called off").await?;
        return Ok(Action::await_change());
    }
    // Live progress for whoever follows the job: why the drain is held, written only
    // when it changes.
    if let Some(message) = pass.held_message(&name)
        && !says(job, &message)
    {
        annotate_job(ctx, job, None, &message).await;
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

fn pods_on(node: &str) -> ListParams {
    ListParams::default().fields(&format!("spec.nodeName={node}"))
}

/// What one drain pass left: the pods still to go, and the evictions refused (a
/// disruption budget's 429) with the API's reason.
struct DrainPass {
    left: Vec<String>,
    blocked: Vec<String>,
}

impl DrainPass {
    fn timed_out_message(&self, node: &str, timeout_seconds: u32) -> String {
        let mut message = format!(
            "drain of node {node} timed out after {timeout_seconds}s with {} pod(s) left: {}",
            self.left.len(),
            self.left.join(", ")
        );
        if !self.blocked.is_empty() {
            message.push_str(&format!("; evictions refused: {}", self.blocked.join("; ")));
        }
        message
    }

    /// Why the drain is held, when evictions were refused.
    fn held_message(&self, node: &str) -> Option<String> {
        (!self.blocked.is_empty()).then(|| {
            format!(
                "draining node {node}: {} pod(s) left; evictions refused: {}",
                self.left.len(),
                self.blocked.join("; ")
            )
        })
    }
}

/// Evicts every pod on the node that must go and is not gone.
async fn evict_pass(
    ctx: &Context,
    pods: &Api<Pod>,
    node: &str,
    ignore: Option<&Selector>,
) -> Result<DrainPass, Error> {
    let on_node = pods.list(&pods_on(node)).await?;
    let mut pass = DrainPass {
        left: Vec::new(),
        blocked: Vec::new(),
    };
    for pod in &on_node.items {
        let namespace = pod.namespace().unwrap_or_default();
        let pod_key = key(&namespace, &pod.name_any());
        match pod_fate(pod, ignore) {
            PodFate::Stay => {}
            PodFate::Wait => pass.left.push(pod_key),
            PodFate::Evict => {
                let api: Api<Pod> = Api::namespaced(ctx.eviction_client.clone(), &namespace);
                match api.evict(&pod.name_any(), &EvictParams::default()).await {
                    Ok(_) => {
                        tracing::info!(node = %node, pod = %pod_key, "evicted");
                        pass.left.push(pod_key);
                    }
                    Err(err) if api_errors::is_not_found(&err) => {}
                    Err(kube::Error::Api(status)) if status.code == 429 => {
                        pass.blocked.push(format!("{pod_key} ({})", status.message));
                        pass.left.push(pod_key);
                    }
                    Err(err) => return Err(err.into()),
                }
            }
        }
    }
    Ok(pass)
}

/// The node is drained: it records the approval, and the job hears it.
async fn approve_reboot(ctx: &Context, node: &Node, job: &PatchJob) -> Result<(), Error> {
    let name = node.name_any();
    let patch = json!({"metadata": {"annotations": {DRAIN_APPROVED_ANNOTATION: Timestamp::now().to_string()}}});
    nodes(ctx)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    annotate_job(
        ctx,
        job,
        Some("Approved"),
        &format!("node {name} is cordoned and drained"),
    )
    .await;
    ctx.event(
        node,
        EventType::Normal,
        "Drained",
        "Drain",
        format!("drained; job {} may reboot the node", job.name_any()),
    );
    Ok(())
}

/// Reconciles one Node: claims it for a job that wants to reboot it, drains it, and
/// gives it back once the reboot is over (or called off).
pub async fn reconcile_node(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    tracing::debug!(node = %name, annotations = ?node.annotations(), "reconciling node");
    let Some(job_key) = node.annotations().get(DRAIN_FOR_ANNOTATION).cloned() else {
        return match waiting_job(&ctx, &name) {
            Some(job) => claim(&ctx, &node, &job).await,
            None => Ok(Action::await_change()),
        };
    };
    let job = job_for(&ctx, &job_key);
    let state = job.as_deref().and_then(reboot_state);
    match job.as_deref() {
        Some(job) if !is_finished(job) && state == Some(RebootState::Pending) => {
            match decision(job, Some(&node)) {
                None => drain(&ctx, &node, job).await,
                Some(Verdict::Approved) if approval_lapsed(&node, Timestamp::now()) => {
                    let message = format!(
                        "the reboot of node {name} was approved but the host did not go down within {}s; called off",
                        APPROVED_REBOOT_TIMEOUT.as_secs()
                    );
                    annotate_job(&ctx, job, Some("Denied"), &message).await;
                    release(&ctx, &node, "the approved reboot did not happen").await?;
                    Ok(Action::await_change())
                }
                // Approved: the agent reboots shortly.
                Some(Verdict::Approved) => Ok(Action::requeue(Duration::from_secs(10))),
                // Denied after the Node recorded its approval: the host may be going
                // down already, so the node stays held (and counted against the limits)
                // until the job reports the reboot or the approval lapses.
                Some(Verdict::Denied)
                    if node.annotations().contains_key(DRAIN_APPROVED_ANNOTATION)
                        && !approval_lapsed(&node, Timestamp::now()) =>
                {
                    Ok(Action::requeue(Duration::from_secs(10)))
                }
                // Denied while the node is still being drained (by the job's author, or a
                // release that failed): the node is given back, not left cordoned.
                Some(Verdict::Denied) => {
                    release(&ctx, &node, "the reboot was called off").await?;
                    Ok(Action::await_change())
                }
            }
        }
        // Rebooting: wait for the host to come back and report.
        Some(job) if !is_finished(job) && state == Some(RebootState::InProgress) => {
            Ok(Action::requeue(Duration::from_secs(10)))
        }
        // The reboot is over, called off, the job ended or is gone (plan deleted):
        // give the node back once it is Ready.
        _ => {
            if !node_ready(&node) {
                tracing::info!(node = %name, "waiting for the node to be Ready before uncordoning");
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            let why = match (job.as_deref(), state) {
                (None, _) => format!("job {job_key} no longer exists"),
                (Some(_), Some(RebootState::Completed)) => {
                    format!("job {job_key} rebooted the node and it is Ready")
                }
                (Some(job), _) if is_finished(job) => format!("job {job_key} ended"),
                (Some(_), _) => format!("job {job_key} no longer needs the reboot"),
            };
            release(&ctx, &node, &why).await?;
            Ok(Action::await_change())
        }
    }
}

/// The Nodes a PatchJob change concerns: its node, if it has one.
pub fn node_of_job(job: Arc<PatchJob>) -> Option<ObjectRef<Node>> {
    job.spec.node.as_deref().map(ObjectRef::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference, Time};
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn pod(labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn ordinary_pods_are_evicted() {
        assert_eq!(pod_fate(&pod(&[("app", "web")]), None), PodFate::Evict);
    }

    #[test]
    fn daemonset_static_finished_and_ignored_pods_stay() {
        let mut daemon = pod(&[]);
        daemon.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "DaemonSet".into(),
            name: "agent".into(),
            uid: "u".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        assert_eq!(pod_fate(&daemon, None), PodFate::Stay);

        let mut mirror = pod(&[]);
        mirror.metadata.annotations = Some(BTreeMap::from([(
            "kubernetes.io/config.mirror".to_string(),
            "x".to_string(),
        )]));
        assert_eq!(pod_fate(&mirror, None), PodFate::Stay);

        let mut done = pod(&[]);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert_eq!(pod_fate(&done, None), PodFate::Stay);

        let selector = Selector::try_from(LabelSelector {
            match_labels: Some(BTreeMap::from([("keep".to_string(), "yes".to_string())])),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            pod_fate(&pod(&[("keep", "yes")]), Some(&selector)),
            PodFate::Stay
        );
        assert_eq!(
            pod_fate(&pod(&[("keep", "no")]), Some(&selector)),
            PodFate::Evict
        );
    }

    #[test]
    fn terminating_pods_are_waited_for_not_evicted_again() {
        let mut leaving = pod(&[]);
        leaving.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(pod_fate(&leaving, None), PodFate::Wait);
    }

    #[test]
    fn the_cluster_limit_and_the_control_plane_rule_hold_across_plans() {
        let claimed = |plan: &str, control_plane: bool| Claimed {
            plan: plan.into(),
            control_plane,
        };
        assert_eq!(claim_decision(&[], "a/p", 1, true, 1), Ok(()));
        // Two plans, one node each: the second waits for the cluster-wide limit.
        assert_eq!(
            claim_decision(&[claimed("a/p", false)], "b/q", 1, false, 1),
            Err(Wait::Cluster(1, 1))
        );
        assert_eq!(
            claim_decision(&[claimed("a/p", false)], "b/q", 1, false, 2),
            Ok(())
        );
        // Never two control-plane nodes, whatever the limits say.
        assert_eq!(
            claim_decision(&[claimed("a/p", true)], "b/q", 5, true, 10),
            Err(Wait::ControlPlane)
        );
        assert_eq!(
            claim_decision(&[claimed("a/p", true)], "b/q", 5, false, 10),
            Ok(())
        );
        assert_eq!(
            claim_decision(&[claimed("a/p", false)], "a/p", 1, false, 10),
            Err(Wait::Plan(1, "a/p".into(), 1))
        );
    }

    #[test]
    fn an_approval_lapses_after_the_timeout() {
        let mut node = Node::default();
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().unwrap();
        assert!(!approval_lapsed(&node, now));
        node.metadata.annotations = Some(BTreeMap::from([(
            DRAIN_APPROVED_ANNOTATION.to_string(),
            "2026-12-01T11:58:00Z".to_string(),
        )]));
        assert!(!approval_lapsed(&node, now));
        node.metadata.annotations = Some(BTreeMap::from([(
            DRAIN_APPROVED_ANNOTATION.to_string(),
            "2026-12-01T11:54:00Z".to_string(),
        )]));
        assert!(approval_lapsed(&node, now));
    }

    #[test]
    fn a_plan_drains_at_most_its_max_concurrent_nodes() {
        assert!(may_claim(0, 1));
        assert!(!may_claim(1, 1));
        assert!(may_claim(2, 3));
        assert!(!may_claim(3, 3));
        // Zero is not a valid setting (the schema says >= 1); treat it as 1.
        assert!(may_claim(0, 0));
        assert!(!may_claim(1, 0));
    }
}
