//! The routes under `/agent/v1`, thin: authenticate (before any body is read), check
//! the input, hand over to the gateway, answer. Every request has a deadline and a
//! bounded body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use serde::Deserialize;

use crate::api::common::{REBOOT_DECISION_ANNOTATION, REBOOT_MESSAGE_ANNOTATION};
use crate::api::patchjob::{PatchJob, RebootState};
use crate::controller::drain;

use super::auth::{Identity, NODE_HEADER, Purpose};
use super::protocol::{
    self, Assignments, Heartbeat, HeartbeatAnswer, ProgressAck, ProgressReport, RebootDecision,
    RebootVerdict, RegisterRequest, RegisterResponse,
};
use super::{Gateway, HeartbeatRecord, Refusal};

/// Largest request body: a progress report with long messages and patch lists.
const MAX_BODY: usize = 512 * 1024;
/// Largest registration: a name, an OS, at most 32 labels and the platform, with room.
const MAX_REGISTRATION_BODY: usize = 8 * 1024;
/// Longest a registration body may take to arrive once its headers are in.
const REGISTRATION_BODY_DEADLINE: Duration = Duration::from_secs(10);
/// Longest any request may take, long-polls included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

pub fn router(gateway: Arc<Gateway>) -> Router {
    let authenticated = Router::new()
        .route("/agent/v1/heartbeat", post(heartbeat))
        .route("/agent/v1/assignments", get(assignments))
        .route("/agent/v1/jobs/{uid}/progress", post(progress))
        .route("/agent/v1/jobs/{uid}/reboot", get(reboot_decision))
        .route_layer(middleware::from_fn_with_state(
            gateway.clone(),
            authenticate,
        ));
    Router::new()
        .route("/agent/v1/register", post(register))
        .merge(authenticated)
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(deadline))
        .with_state(gateway)
}

/// Ends a request that takes too long (a client dribbling its body, say).
async fn deadline(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "request took too long").into_response(),
    }
}

fn source(request: &Request) -> SocketAddr {
    super::serve::peer(request.extensions())
}

/// Authenticates from the headers alone, before the body is read, and passes the
/// caller's [`Identity`] on.
async fn authenticate(
    State(gateway): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Result<Response, Refusal> {
    let source = source(&request).ip();
    let connection = request
        .extensions()
        .get::<Arc<super::slots::ConnectionState>>()
        .cloned();
    let identity = match gateway
        .auth
        .authenticate(request.headers(), source, Purpose::Serve, &gateway.limiter)
        .await
    {
        Ok(identity) => identity,
        Err(refusal) => {
            // A refused credential (revoked, say) does not keep its connection: it
            // closes once the refusal is written.
            if matches!(refusal, Refusal::Unauthorized)
                && let Some(connection) = &connection
            {
                connection.close();
            }
            return Err(refusal);
        }
    };
    // An agent's connection is never closed to make room for a stranger's.
    if let Some(connection) = &connection {
        connection.trust(&identity.agent);
    }
    // Every line about this request names the agent (see `crate::logs`).
    let span = crate::logs::object_span("Agent", None, &identity.agent, None);
    request.extensions_mut().insert(identity);
    Ok(tracing::Instrument::instrument(next.run(request), span).await)
}

/// A registration. Nothing of its body is read before the caller is authenticated (a
/// node agent) or charged to its source's bucket and given one of the few body-reading
/// slots (anyone else); the body is small and must arrive quickly.
async fn register(
    State(gateway): State<Arc<Gateway>>,
    Extension(peer): Extension<axum::extract::ConnectInfo<SocketAddr>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<RegisterResponse>, Refusal> {
    let source = peer.0.ip();
    if headers.contains_key(NODE_HEADER) {
        let identity = gateway
            .auth
            .authenticate(&headers, source, Purpose::Register, &gateway.limiter)
            .await?;
        let request = read_registration(body).await?;
        return Ok(Json(gateway.register_node(&identity, &request).await?));
    }
    if !gateway.limiter.allow(source) {
        return Err(Refusal::Throttled);
    }
    let request = {
        let reading = gateway
            .limiter
            .registration_read(source)
            .ok_or(Refusal::Busy)?;
        tokio::select! {
            request = read_registration(body) => request?,
            () = reading.cut() => return Err(Refusal::Busy),
        }
    };
    Ok(Json(gateway.register_external(&request, source).await?))
}

async fn read_registration(body: axum::body::Body) -> Result<RegisterRequest, Refusal> {
    let bytes = tokio::time::timeout(
        REGISTRATION_BODY_DEADLINE,
        axum::body::to_bytes(body, MAX_REGISTRATION_BODY),
    )
    .await
    .map_err(|_| Refusal::Invalid("the registration took too long to arrive".into()))?
    .map_err(|_| {
        Refusal::Invalid(format!(
            "a registration is at most {MAX_REGISTRATION_BODY} bytes"
        ))
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|err| Refusal::Invalid(format!("not a registration: {err}")))
}

async fn heartbeat(
    State(gateway): State<Arc<Gateway>>,
    Extension(identity): Extension<Identity>,
    Json(beat): Json<Heartbeat>,
) -> Json<HeartbeatAnswer> {
    let jobs = gateway
        .job_signals
        .jobs_of(&identity.agent, &gateway.caches.jobs);
    let own: Vec<String> = jobs
        .iter()
        .map(|job| {
            format!(
                "{}/{}",
                kube::ResourceExt::namespace(job.as_ref()).unwrap_or_default(),
                kube::ResourceExt::name_any(job.as_ref())
            )
        })
        .collect();
    let beat = protocol::accept_heartbeat(beat, &own);
    let answer = HeartbeatAnswer {
        cancel: gateway.cancelled_jobs(&identity, &jobs),
    };
    gateway.heartbeats.lock().insert(
        identity.agent,
        HeartbeatRecord {
            at: Instant::now(),
            heartbeat: beat,
        },
    );
    Json(answer)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    #[serde(default)]
    wait_seconds: u64,
}

/// A long-poll: answers when the agent has work, when the wait is over, or when its
/// connection must close (to make room, say: the agent polls again on another).
async fn assignments(
    State(gateway): State<Arc<Gateway>>,
    Extension(identity): Extension<Identity>,
    connection: Option<Extension<Arc<super::slots::ConnectionState>>>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<Assignments>, Refusal> {
    let deadline = Instant::now()
        + Duration::from_secs(query.wait_seconds.min(3600)).min(gateway.config.max_wait);
    loop {
        // Interest is registered before looking, so a change in between is not missed.
        let signal = gateway.job_signals.signal(&identity.agent);
        let changed = signal.notified();
        let jobs = gateway.assignments_for(&identity).await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if !jobs.is_empty() || remaining.is_zero() {
            return Ok(Json(Assignments { jobs }));
        }
        tokio::select! {
            _ = tokio::time::timeout(remaining, changed) => {}
            () = closing(&connection) => return Ok(Json(Assignments { jobs: Vec::new() })),
        }
    }
}

/// Resolves when the request's connection must close (never, for a request served
/// without one): a long-poll then answers at once.
async fn closing(connection: &Option<Extension<Arc<super::slots::ConnectionState>>>) {
    match connection {
        Some(Extension(connection)) => connection.closing().await,
        None => std::future::pending().await,
    }
}

async fn progress(
    State(gateway): State<Arc<Gateway>>,
    Extension(identity): Extension<Identity>,
    Path(uid): Path<String>,
    Json(report): Json<ProgressReport>,
) -> Result<Json<ProgressAck>, Refusal> {
    Ok(Json(gateway.report(&identity, &uid, report).await?))
}

/// The controller's reboot decision for a job. External hosts are approved unless the
/// job ended or was cancelled. A node agent's job waits for the drain reconciler, and
/// its approval counts only when `node` (the job's Node, read by the caller) records the
/// drain for this job as done: the job's own annotations may be written by its plan's
/// authors, so they carry the message and a denial, never the permission.
pub fn reboot_verdict(job: &PatchJob, paused: bool, node: Option<&Node>) -> RebootDecision {
    let annotations = kube::ResourceExt::annotations(job);
    let message = annotations
        .get(REBOOT_MESSAGE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let denied = |message: String| RebootDecision {
        verdict: RebootVerdict::Denied,
        message,
    };
    if phase.is_finished() {
        return denied(format!("the job already ended ({phase:?})"));
    }
    if job.metadata.deletion_timestamp.is_some() {
        return denied("the job was deleted".into());
    }
    if paused {
        return denied("the agent is paused".into());
    }
    if job.spec.node.is_none() {
        return RebootDecision {
            verdict: RebootVerdict::Approved,
            message,
        };
    }
    let verdict = match drain::decision(job, node) {
        // The drain calls an approval off once it lapsed, on its next pass: from the
        // moment it lapses it approves nothing.
        Some(drain::Verdict::Approved)
            if node.is_some_and(|node| drain::approval_lapsed(node, Timestamp::now())) =>
        {
            RebootVerdict::Waiting
        }
        Some(drain::Verdict::Approved) => RebootVerdict::Approved,
        Some(drain::Verdict::Denied) => RebootVerdict::Denied,
        None => RebootVerdict::Waiting,
    };
    RebootDecision { verdict, message }
}

/// Whether the job's annotations claim an approval, which only its Node can confirm.
fn claims_approval(job: &PatchJob) -> bool {
    job.spec.node.is_some()
        && kube::ResourceExt::annotations(job)
            .get(REBOOT_DECISION_ANNOTATION)
            .is_some_and(|verdict| verdict == "Approved")
}

/// Long-polls the controller's decision on rebooting for a job.
async fn reboot_decision(
    State(gateway): State<Arc<Gateway>>,
    Extension(identity): Extension<Identity>,
    connection: Option<Extension<Arc<super::slots::ConnectionState>>>,
    Path(uid): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<RebootDecision>, Refusal> {
    let deadline = Instant::now()
        + Duration::from_secs(query.wait_seconds.min(3600)).min(gateway.config.max_wait);
    loop {
        let signal = gateway.job_signals.signal(&identity.agent);
        let changed = signal.notified();
        let job = gateway
            .job_signals
            .job_by_uid(&uid, &gateway.caches.jobs)
            .ok_or_else(|| {
                Refusal::Gone(format!("no job with uid {}", protocol::bounded(&uid, 64)))
            })?;
        gateway.check_serving(&identity, &job)?;
        // Only a pending reboot of an unfinished job is worth reading the Node for, and
        // only within the caller's read budget.
        let pending = job.status.as_ref().is_some_and(|s| {
            !s.phase.is_finished()
                && s.reboot
                    .as_ref()
                    .is_some_and(|r| r.state == RebootState::Pending)
        });
        let node = match job.spec.node.as_deref() {
            Some(node) if pending && claims_approval(&job) => {
                if !gateway.agent_reads.allow(&identity.agent) {
                    return Err(Refusal::Throttled);
                }
                gateway.node(node).await?
            }
            _ => None,
        };
        let decision = reboot_verdict(&job, gateway.paused(&identity.agent), node.as_ref());
        if claims_approval(&job) && decision.verdict == RebootVerdict::Waiting {
            tracing::warn!(job = %job.name_any(), "the job's annotations approve a reboot its Node does not record; waiting for the drain");
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if decision.verdict != RebootVerdict::Waiting || remaining.is_zero() {
            return Ok(Json(decision));
        }
        tokio::select! {
            _ = tokio::time::timeout(remaining, changed) => {}
            () = closing(&connection) => return Ok(Json(decision)),
        }
    }
}

impl Gateway {
    /// The Node a node agent's job runs on, read when the job claims its reboot was
    /// approved (so at most once per change of the job).
    async fn node(&self, name: &str) -> Result<Option<Node>, Refusal> {
        Api::<Node>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(|err| Refusal::internal("reading a Node", err))
    }

    /// Whether the Agent is paused (its running job is cancelled).
    pub fn paused(&self, agent: &str) -> bool {
        self.caches
            .agents
            .get(&kube::runtime::reflector::ObjectRef::new(agent))
            .is_some_and(|a| a.spec.paused)
    }

    /// The caller's unfinished jobs it must stop: deleted ones, or all when paused.
    fn cancelled_jobs(&self, identity: &Identity, jobs: &[Arc<PatchJob>]) -> Vec<String> {
        let paused = self.paused(&identity.agent);
        jobs.iter()
            .filter(|job| !job.status.as_ref().is_some_and(|s| s.phase.is_finished()))
            .filter(|job| paused || job.metadata.deletion_timestamp.is_some())
            .filter_map(|job| kube::ResourceExt::uid(job.as_ref()))
            .collect()
    }
}

#[cfg(test)]
mod lapsed_approval {
    use super::*;
    use crate::api::patchjob::PatchJobSpec;
    use std::collections::BTreeMap;

    /// Attack (timing; a node agent that asks late, e.g. after a network partition or a
    /// slow restart): the drain reconciler calls an approved reboot off once it has not
    /// happened within `APPROVED_REBOOT_TIMEOUT` (5 min) — it writes Denied and
    /// uncordons the node, and pods come back onto it. It only notices on its next pass
    /// (up to 10 s later), and the gateway does not look at the approval's age at all:
    /// any ask in between — or for as long as the leader's drain loop is stalled — is
    /// answered Approved, and the host reboots a node that is being (or has been) handed
    /// back. The gateway must not approve on an approval the drain treats as lapsed.
    #[test]
    fn a_lapsed_drain_approval_is_not_an_approval() {
        let mut job = PatchJob::new(
            "weekly-m1-node-a",
            PatchJobSpec {
                node: Some("node-a".into()),
                ..PatchJobSpec::bare("node-a", "weekly", "m1")
            },
        );
        job.metadata.namespace = Some("team".into());
        job.metadata.annotations = Some(BTreeMap::from([(
            REBOOT_DECISION_ANNOTATION.to_string(),
            "Approved".to_string(),
        )]));
        job.status = Some(
            serde_json::from_value(serde_json::json!(
                {"phase": "Running", "reboot": {"state": "Pending"}}
            ))
            .unwrap(),
        );
        let approved_at =
            k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_mins(30);
        let mut node = Node::default();
        node.metadata.name = Some("node-a".into());
        node.metadata.annotations = Some(BTreeMap::from([
            (
                drain::DRAIN_FOR_ANNOTATION.to_string(),
                "team/weekly-m1-node-a".to_string(),
            ),
            (
                drain::DRAIN_APPROVED_ANNOTATION.to_string(),
                approved_at.to_string(),
            ),
        ]));
        let decision = reboot_verdict(&job, false, Some(&node));
        assert_ne!(
            decision.verdict,
            RebootVerdict::Approved,
            "a drain approved 30 minutes ago (lapsed after {}s) still approves the reboot",
            drain::APPROVED_REBOOT_TIMEOUT.as_secs()
        );
    }
}
