//! The gateway's HTTP server: authentication of agents, registration, heartbeats held
//! in memory, long-polled assignments and coalesced progress writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;

use crate::api::agent::{Agent, AgentMode, AgentSpec};
use crate::api::patchjob::PatchJob;

use super::coalesce::{Accepted, ProgressBook};
use super::credentials::{
    self, AGENT_LABEL, BOOTSTRAP_SECRET_TYPE, BootstrapToken, CREDENTIAL_SECRET_TYPE,
    USED_BY_ANNOTATION,
};
use super::protocol::{
    Assignment, Assignments, ErrorBody, Heartbeat, ProgressAck, ProgressReport, RebootDecision,
    RebootVerdict, RegisterRequest, RegisterResponse, encode_spec,
};

/// Field manager of every write the gateway makes.
pub const FIELD_MANAGER: &str = "fleetpatch.io/controller";
/// Header by which a node agent names its node.
pub const NODE_HEADER: &str = "x-fleetpatch-node";
/// TokenReview extra key carrying the node a projected token is bound to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// The last heartbeat of one agent.
#[derive(Clone, Debug)]
pub struct HeartbeatRecord {
    pub at: Instant,
    pub heartbeat: Heartbeat,
}

/// Heartbeats, shared with the Agent reconciler (which turns them into Ready).
pub type Heartbeats = Arc<Mutex<HashMap<String, HeartbeatRecord>>>;

/// Settings of the gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Namespace of bootstrap-token and credential Secrets.
    pub namespace: String,
    /// ServiceAccount username node agents authenticate as.
    pub node_agent_username: String,
    /// Audience node agents' projected tokens carry.
    pub audience: String,
    /// Longest a long-poll waits.
    pub max_wait: Duration,
    /// Least time between two status writes of one job.
    pub write_interval: Duration,
    /// Most status writes in flight at once.
    pub write_concurrency: usize,
}

/// Shared state of the gateway.
pub struct Gateway {
    client: Client,
    config: GatewayConfig,
    jobs: Store<PatchJob>,
    pub heartbeats: Heartbeats,
    progress: Mutex<ProgressBook>,
    /// One wake-up per agent, so a job change answers only its own agent's long-poll.
    pub job_signals: Arc<JobSignals>,
    credential_cache: Mutex<HashMap<String, String>>,
    /// Status writes made, for metrics and the benchmark.
    pub status_writes: std::sync::atomic::AtomicU64,
}

/// The job cache's index for the gateway (jobs by agent and by uid, so a long-poll or a
/// report never scans the whole fleet's jobs), and one wake-up per agent for its
/// long-polls. Fed by the job reflector after the cache has the change.
#[derive(Default)]
pub struct JobSignals {
    signals: Mutex<HashMap<String, Arc<Notify>>>,
    index: Mutex<JobIndex>,
}

#[derive(Default)]
struct JobIndex {
    by_agent: HashMap<String, HashSet<ObjectRef<PatchJob>>>,
    by_uid: HashMap<String, ObjectRef<PatchJob>>,
}

impl JobSignals {
    pub fn signal(&self, agent: &str) -> Arc<Notify> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(agent.to_string())
            .or_default()
            .clone()
    }

    /// Wakes `agent`'s waiting long-poll. Call it after the job cache has the change.
    pub fn notify(&self, agent: &str) {
        if let Some(signal) = self
            .signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
        {
            signal.notify_waiters();
        }
    }

    /// Indexes a job the cache has just seen (created, changed or deleted) and wakes
    /// its agent. Deleted jobs leave the index when a lookup no longer finds them.
    pub fn observe(&self, job: &PatchJob) {
        let reference = ObjectRef::from_obj(job);
        {
            let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(uid) = job.uid() {
                index.by_uid.insert(uid, reference.clone());
            }
            index
                .by_agent
                .entry(job.spec.agent.clone())
                .or_default()
                .insert(reference);
        }
        self.notify(&job.spec.agent);
    }

    /// The cached jobs of `agent`.
    fn jobs_of(&self, agent: &str, jobs: &Store<PatchJob>) -> Vec<Arc<PatchJob>> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let Some(references) = index.by_agent.get_mut(agent) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        references.retain(|reference| match jobs.get(reference) {
            Some(job) if job.spec.agent == agent => {
                found.push(job);
                true
            }
            _ => false,
        });
        found
    }

    /// Forgets jobs the cache no longer holds.
    fn prune(&self, jobs: &Store<PatchJob>) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        index.by_uid.retain(|uid, reference| {
            jobs.get(reference)
                .is_some_and(|j| j.uid().as_deref() == Some(uid.as_str()))
        });
        index.by_agent.retain(|_, references| {
            references.retain(|reference| jobs.get(reference).is_some());
            !references.is_empty()
        });
    }

    /// The cached job with this uid.
    fn job_by_uid(&self, uid: &str, jobs: &Store<PatchJob>) -> Option<Arc<PatchJob>> {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        let reference = index.by_uid.get(uid)?;
        match jobs.get(reference) {
            Some(job) if job.uid().as_deref() == Some(uid) => Some(job),
            _ => {
                index.by_uid.remove(uid);
                None
            }
        }
    }
}

/// An error answer with a JSON body.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::UNAUTHORIZED, message.into())
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent: String,
    pub node: Option<String>,
}

fn credential_secret_name(agent: &str) -> String {
    format!("fleetpatch-agent-{agent}")
}

impl Gateway {
    pub fn new(
        client: Client,
        config: GatewayConfig,
        jobs: Store<PatchJob>,
        job_signals: Arc<JobSignals>,
        heartbeats: Heartbeats,
    ) -> Arc<Self> {
        let interval = config.write_interval;
        Arc::new(Self {
            client,
            config,
            jobs,
            heartbeats,
            progress: Mutex::new(ProgressBook::new(interval)),
            job_signals,
            credential_cache: Mutex::new(HashMap::new()),
            status_writes: Default::default(),
        })
    }

    fn signal(&self, agent: &str) -> Arc<Notify> {
        self.job_signals.signal(agent)
    }

    /// Tells `agent`'s long-poll (if any) that its jobs changed.
    pub fn job_changed(&self, agent: &str) {
        self.job_signals.notify(agent);
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/agent/v1/register", post(register))
            .route("/agent/v1/heartbeat", post(heartbeat))
            .route("/agent/v1/assignments", get(assignments))
            .route("/agent/v1/jobs/{uid}/progress", post(progress))
            .route("/agent/v1/jobs/{uid}/reboot", get(reboot_decision))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone())
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Authenticates a request: an external agent's `Bearer <agent>.<credential>`, or a
    /// node agent's ServiceAccount token (checked by TokenReview) bound to its node.
    async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        let authorization = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("missing Authorization header"))?;
        if let Some(node) = headers.get(NODE_HEADER).and_then(|v| v.to_str().ok()) {
            let token = authorization
                .strip_prefix("Bearer ")
                .ok_or_else(|| unauthorized("expected a bearer token"))?;
            self.review_node_token(token, node).await?;
            return Ok(Identity {
                agent: node.to_string(),
                node: Some(node.to_string()),
            });
        }
        let (agent, secret) = credentials::parse_agent_bearer(authorization)
            .ok_or_else(|| unauthorized("malformed credential"))?;
        let cached = self
            .credential_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            .cloned();
        let stored = match cached {
            Some(hash) => hash,
            None => {
                let secret = self
                    .secrets()
                    .get_opt(&credential_secret_name(agent))
                    .await
                    .map_err(internal)?
                    .ok_or_else(|| unauthorized(format!("agent {agent} is not registered")))?;
                let hash = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get("credential-sha256"))
                    .map(|ByteString(b)| String::from_utf8_lossy(b).into_owned())
                    .ok_or_else(|| unauthorized(format!("agent {agent} has no credential")))?;
                self.credential_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(agent.to_string(), hash.clone());
                hash
            }
        };
        if !credentials::constant_time_eq(&credentials::hash(secret), &stored) {
            return Err(unauthorized("credential rejected"));
        }
        Ok(Identity {
            agent: agent.to_string(),
            node: None,
        })
    }

    async fn review_node_token(&self, token: &str, node: &str) -> Result<(), ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(internal)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(unauthorized(
                status.error.unwrap_or_else(|| "token rejected".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        if user.username.as_deref() != Some(self.config.node_agent_username.as_str()) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "{} is not the node agent",
                    user.username.unwrap_or_default()
                ),
            ));
        }
        let bound = user
            .extra
            .as_ref()
            .and_then(|extra| extra.get(NODE_NAME_EXTRA))
            .and_then(|nodes| nodes.first());
        if bound.map(String::as_str) != Some(node) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("the token is not bound to node {node}"),
            ));
        }
        Ok(())
    }

    /// An external host's registration: a bootstrap token for a fresh credential.
    async fn register_external(
        &self,
        request: &RegisterRequest,
    ) -> Result<RegisterResponse, ApiError> {
        let presented = request
            .bootstrap_token
            .as_deref()
            .ok_or_else(|| unauthorized("a bootstrap token is required"))?;
        if !crate::manifests::is_dns_subdomain(&request.name) {
            return Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("agent name {:?} is not a valid object name", request.name),
            ));
        }
        let secrets = self
            .secrets()
            .list(&ListParams::default().fields(&format!("type={BOOTSTRAP_SECRET_TYPE}")))
            .await
            .map_err(internal)?;
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut matched = None;
        for secret in secrets
            .items
            .iter()
            .filter(|s| s.type_.as_deref() == Some(BOOTSTRAP_SECRET_TYPE))
        {
            let Ok(token) = BootstrapToken::from_secret(secret) else {
                continue;
            };
            match token.check(presented, now) {
                Ok(()) => {
                    matched = Some((token, secret.clone()));
                    break;
                }
                Err(
                    err @ (credentials::BootstrapError::Expired(_)
                    | credentials::BootstrapError::Used(_)),
                ) => return Err(unauthorized(err.to_string())),
                Err(_) => {}
            }
        }
        let (token, secret) =
            matched.ok_or_else(|| unauthorized("bootstrap token is not valid"))?;
        if token.single_use {
            // Marked used by an update that carries the resourceVersion just read, so of
            // two hosts racing with one token exactly one wins (the other gets 409). The
            // Secret stays: a GitOps tool or Helm would bring a deleted one back, valid.
            let mut used = secret;
            used.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(USED_BY_ANNOTATION.to_string(), request.name.clone());
            self.secrets()
                .replace(&token.secret_name, &PostParams::default(), &used)
                .await
                .map_err(|err| match err {
                    kube::Error::Api(status) if status.code == 409 || status.code == 404 => {
                        unauthorized(format!(
                            "bootstrap token {} was already used",
                            token.secret_name
                        ))
                    }
                    other => internal(other),
                })?;
        }
        self.apply_agent(&request.name, AgentMode::External, request, None)
            .await?;
        let credential = credentials::generate_secret();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(credential_secret_name(&request.name)),
                labels: Some(BTreeMap::from([(
                    AGENT_LABEL.to_string(),
                    request.name.clone(),
                )])),
                ..Default::default()
            },
            type_: Some(CREDENTIAL_SECRET_TYPE.into()),
            data: Some(BTreeMap::from([(
                "credential-sha256".to_string(),
                ByteString(credentials::hash(&credential).into_bytes()),
            )])),
            ..Default::default()
        };
        self.secrets()
            .patch(
                &credential_secret_name(&request.name),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(internal)?;
        self.credential_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request.name);
        tracing::info!(agent = %request.name, token = %token.secret_name, "external agent registered");
        Ok(RegisterResponse {
            agent: request.name.clone(),
            credential: Some(credential),
        })
    }

    async fn apply_agent(
        &self,
        name: &str,
        mode: AgentMode,
        request: &RegisterRequest,
        node: Option<&str>,
    ) -> Result<(), ApiError> {
        let agents: Api<Agent> = Api::all(self.client.clone());
        let mut labels = request.labels.clone();
        labels.insert(
            "kubernetes.io/os".into(),
            request.os.as_str().to_ascii_lowercase(),
        );
        let body = json!({
            "apiVersion": "fleetpatch.io/v1alpha1",
            "kind": "Agent",
            "metadata": {"name": name, "labels": labels},
            "spec": AgentSpec { mode, os: request.os, node_name: node.map(String::from), paused: false },
        });
        // `paused` belongs to people: the gateway does not own it after creation.
        let mut body = body;
        body["spec"]
            .as_object_mut()
            .expect("object")
            .remove("paused");
        agents
            .patch(
                name,
                &PatchParams::apply("fleetpatch.io/gateway").force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(internal)?;
        Ok(())
    }

    fn assignments_for(&self, agent: &str) -> Vec<Assignment> {
        let mut out: Vec<Assignment> = self
            .job_signals
            .jobs_of(agent, &self.jobs)
            .iter()
            .filter(|job| job.metadata.deletion_timestamp.is_none())
            .filter(|job| !job.status.as_ref().is_some_and(|s| s.phase.is_finished()))
            .filter_map(|job| {
                let uid = job.uid()?;
                let stored = job
                    .status
                    .as_ref()
                    .and_then(|s| s.last_sequence)
                    .unwrap_or(0);
                let acknowledged = {
                    let mut book = self.progress.lock().unwrap_or_else(|p| p.into_inner());
                    book.seed(&uid, stored);
                    book.written(&uid)
                };
                Some(Assignment {
                    uid,
                    namespace: job.namespace().unwrap_or_default(),
                    name: job.name_any(),
                    spec: encode_spec(&job.spec),
                    acknowledged_sequence: acknowledged,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// The job `uid` if it is this agent's: 404 when there is none, 403 when it is
    /// another agent's (an agent asking for a job it was never given is worth an alarm).
    fn own_job(&self, identity: &Identity, uid: &str) -> Result<Arc<PatchJob>, ApiError> {
        let job = self
            .job_by_uid(uid)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no job with uid {uid}")))?;
        if job.spec.agent != identity.agent {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("job {uid} belongs to another agent"),
            ));
        }
        Ok(job)
    }

    /// Answers once `look` says its answer is final, or with its last answer after
    /// `wait_seconds` (at most the gateway's longest wait). Woken by changes to the
    /// agent's jobs.
    async fn long_poll<T>(
        &self,
        agent: &str,
        wait_seconds: u64,
        look: impl Fn() -> Result<(bool, T), ApiError>,
    ) -> Result<T, ApiError> {
        let deadline = Instant::now() + Duration::from_secs(wait_seconds).min(self.config.max_wait);
        loop {
            // Register interest before looking, so a change between the look and the
            // wait is not missed.
            let signal = self.signal(agent);
            let changed = signal.notified();
            let (done, answer) = look()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if done || remaining.is_zero() {
                return Ok(answer);
            }
            let _ = tokio::time::timeout(remaining, changed).await;
        }
    }

    fn job_by_uid(&self, uid: &str) -> Option<Arc<PatchJob>> {
        self.job_signals.job_by_uid(uid, &self.jobs)
    }

    /// Drops the bookkeeping of jobs that no longer exist (deleted after their TTL or
    /// with their plan), so it does not grow with every job ever run.
    pub fn prune(&self) {
        let idle = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .idle();
        let gone: Vec<String> = idle
            .into_iter()
            .filter(|uid| self.job_by_uid(uid).is_none())
            .collect();
        let mut book = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        for uid in &gone {
            book.forget(uid);
        }
        drop(book);
        self.job_signals.prune(&self.jobs);
    }

    /// Writes the progress that is due; run every few hundred milliseconds.
    pub async fn flush(&self) {
        use futures::StreamExt;
        let due = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .due(Instant::now());
        futures::stream::iter(due)
            .for_each_concurrent(self.config.write_concurrency, |(uid, sequence, status)| {
                self.write_status(uid, sequence, status)
            })
            .await;
    }

    async fn write_status(
        &self,
        uid: String,
        sequence: i64,
        mut status: crate::api::patchjob::PatchJobStatus,
    ) {
        {
            let Some(job) = self.job_by_uid(&uid) else {
                return;
            };
            status.last_sequence = Some(sequence);
            status.observed_generation = job.metadata.generation;
            let api: Api<PatchJob> =
                Api::namespaced(self.client.clone(), &job.namespace().unwrap_or_default());
            let body = json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "PatchJob", "metadata": {"name": job.name_any()}, "status": status});
            match api
                .patch_status(
                    &job.name_any(),
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => {
                    self.status_writes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.progress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .mark_written(&uid, sequence);
                }
                Err(kube::Error::Api(err)) if err.code == 404 => {
                    self.progress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget(&uid);
                }
                Err(err) => {
                    tracing::warn!(job = %job.name_any(), error = %err, "status write failed; will retry");
                    self.progress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retry(&uid, sequence, status);
                }
            }
        }
    }
}

async fn register(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Json(request): Json<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    if headers.contains_key(NODE_HEADER) {
        let identity = gateway.authenticate(&headers).await?;
        let node = identity.node.clone().unwrap_or_default();
        gateway
            .apply_agent(&identity.agent, AgentMode::Node, &request, Some(&node))
            .await?;
        return Ok(Json(RegisterResponse {
            agent: identity.agent,
            credential: None,
        }));
    }
    Ok(Json(gateway.register_external(&request).await?))
}

async fn heartbeat(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Json(beat): Json<Heartbeat>,
) -> Result<StatusCode, ApiError> {
    let identity = gateway.authenticate(&headers).await?;
    gateway
        .heartbeats
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(
            identity.agent,
            HeartbeatRecord {
                at: Instant::now(),
                heartbeat: beat,
            },
        );
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WaitQuery {
    #[serde(default)]
    wait_seconds: u64,
}

async fn assignments(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<WaitQuery>,
) -> Result<Json<Assignments>, ApiError> {
    let identity = gateway.authenticate(&headers).await?;
    let jobs = gateway
        .long_poll(&identity.agent, query.wait_seconds, || {
            let jobs = gateway.assignments_for(&identity.agent);
            Ok((!jobs.is_empty(), jobs))
        })
        .await?;
    Ok(Json(Assignments { jobs }))
}

/// The controller's reboot decision for a job, from the job's annotations.
fn reboot_verdict(job: &PatchJob) -> RebootDecision {
    use crate::api::common::{REBOOT_DECISION_ANNOTATION, REBOOT_MESSAGE_ANNOTATION};
    let annotations = job.annotations();
    let message = annotations
        .get(REBOOT_MESSAGE_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let phase = job.status.as_ref().map(|s| s.phase).unwrap_or_default();
    if phase.is_finished() {
        return RebootDecision {
            verdict: RebootVerdict::Denied,
            message: format!("the job already ended ({phase:?})"),
        };
    }
    if job.spec.node.is_none() {
        // Only cluster nodes are drained; any other host reboots when its job says so.
        return RebootDecision {
            verdict: RebootVerdict::Approved,
            message,
        };
    }
    let verdict = match annotations
        .get(REBOOT_DECISION_ANNOTATION)
        .map(String::as_str)
    {
        Some("Approved") => RebootVerdict::Approved,
        Some("Denied") => RebootVerdict::Denied,
        _ => RebootVerdict::Waiting,
    };
    RebootDecision { verdict, message }
}

/// Long-polls the controller's decision on rebooting the agent's node for a job.
async fn reboot_decision(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(uid): Path<String>,
    Query(query): Query<WaitQuery>,
) -> Result<Json<RebootDecision>, ApiError> {
    let identity = gateway.authenticate(&headers).await?;
    let decision = gateway
        .long_poll(&identity.agent, query.wait_seconds, || {
            let job = gateway.own_job(&identity, &uid)?;
            let decision = reboot_verdict(&job);
            Ok((decision.verdict != RebootVerdict::Waiting, decision))
        })
        .await?;
    Ok(Json(decision))
}

async fn progress(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(uid): Path<String>,
    Json(report): Json<ProgressReport>,
) -> Result<Json<ProgressAck>, ApiError> {
    let identity = gateway.authenticate(&headers).await?;
    let job = gateway.own_job(&identity, &uid)?;
    let mut book = gateway.progress.lock().unwrap_or_else(|p| p.into_inner());
    book.seed(
        &uid,
        job.status
            .as_ref()
            .and_then(|s| s.last_sequence)
            .unwrap_or(0),
    );
    if book.report(&uid, report.sequence, report.status) == Accepted::Duplicate {
        tracing::debug!(%uid, sequence = report.sequence, "duplicate progress report ignored");
    }
    Ok(Json(ProgressAck {
        acknowledged_sequence: book.written(&uid),
    }))
}
