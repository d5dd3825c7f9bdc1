//! The agent gateway: the HTTPS JSON API under `/agent/v1` through which agents
//! register, send heartbeats, receive their jobs and report progress. Agents never get
//! write access to the Kubernetes API; the gateway writes for them, and only to their
//! own Agent and PatchJobs. Everything an agent or the network sends is data to check:
//! see `auth` (who is calling), `registration`, `jobs` (what may be served to whom),
//! `progress` (what a report may change), `limits` and `serve` (what a caller may cost).

pub mod auth;
pub mod coalesce;
pub mod credentials;
pub mod handlers;
pub mod jobs;
pub mod limits;
pub mod presence;
pub mod progress;
pub mod protocol;
pub mod registration;
#[cfg(test)]
mod scenarios;
pub mod serve;
pub mod slots;
pub mod story;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::runtime::reflector::Store;
use parking_lot::Mutex;

use crate::api::agent::{Agent, AllowedPlans};
use crate::api::patchjob::{PatchJob, PatchJobSpec};
use crate::events::EventQueue;

use auth::{Authenticator, NodePolicy, TokenReviewer};
use coalesce::ProgressBook;
use jobs::{JobSignals, JobSigner};
use limits::{AgentBudget, SourceLimiter, UnauthenticatedLimits};
use protocol::{ErrorBody, Heartbeat};

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
    /// The controller's namespace: bootstrap tokens, credentials, the signing key.
    pub namespace: String,
    /// Who node agents are and what their tokens are for.
    pub node_policy: NodePolicy,
    /// Which plans may target node agents (the controller's flag; the chart sets it).
    pub node_agent_plans: AllowedPlans,
    /// Longest a long-poll waits.
    pub max_wait: Duration,
    /// Least time between two status writes of one job.
    pub write_interval: Duration,
    /// Most status writes in flight at once.
    pub write_concurrency: usize,
    pub unauthenticated: UnauthenticatedLimits,
}

/// The caches the gateway reads, shared with the reconcilers where they overlap.
#[derive(Clone)]
pub struct GatewayCaches {
    /// PatchJobs without their script bodies (see `progress::strip_for_cache`).
    pub jobs: Store<PatchJob>,
    pub agents: Store<Agent>,
    /// Credential Secrets of the controller's namespace, holding hashes only.
    pub credentials: Store<Secret>,
    /// Bootstrap-token Secrets of the controller's namespace.
    pub tokens: Store<Secret>,
    /// Namespaces (their labels decide which plans may target which agents).
    pub namespaces: Store<Namespace>,
}

/// Why the gateway refuses a request. Callers learn what they can act on and nothing
/// more: every authentication failure is the same 401, and an error from the API
/// server is logged, never returned.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("too many requests; slow down")]
    Throttled,
    #[error("the gateway is busy; try again shortly")]
    Busy,
    #[error("the gateway cannot do this right now; try again shortly")]
    Unavailable,
}

impl Refusal {
    /// An API error while doing `what`: logged here, `Unavailable` to the caller.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %err, "{what} failed");
        Self::Unavailable
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Gone(_) => StatusCode::GONE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Throttled => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy | Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = axum::Json(ErrorBody {
            error: self.to_string(),
        });
        match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                (status, [(axum::http::header::RETRY_AFTER, "5")], body).into_response()
            }
            _ => (status, body).into_response(),
        }
    }
}

/// Shared state of the gateway.
/// Full job specs by uid, each with when it was last asked for.
pub(crate) type FetchedSpecs = HashMap<String, (Option<Arc<PatchJobSpec>>, Instant)>;

pub struct Gateway {
    pub(crate) client: Client,
    pub(crate) config: GatewayConfig,
    pub(crate) caches: GatewayCaches,
    pub(crate) auth: Authenticator,
    pub(crate) limiter: SourceLimiter,
    pub(crate) signer: JobSigner,
    pub(crate) progress: Mutex<ProgressBook>,
    /// Full specs fetched for handing out (the cache holds none), by uid; `None` for a
    /// job whose fetched spec did not check out, so it is not fetched again and again.
    pub(crate) specs: Mutex<FetchedSpecs>,
    /// API reads each agent may cause beyond the caches.
    pub(crate) agent_reads: AgentBudget,
    /// Writes of its own Agent each agent may cause.
    pub(crate) agent_writes: AgentBudget,
    /// One wake-up per agent, so a job change answers only its own agent's long-poll.
    pub job_signals: Arc<JobSignals>,
    pub heartbeats: Heartbeats,
    /// Status writes made, for metrics and the benchmark.
    pub status_writes: std::sync::atomic::AtomicU64,
    /// Events on the jobs whose progress the gateway writes (see `story`).
    pub(crate) events: EventQueue,
}

impl Gateway {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: GatewayConfig,
        caches: GatewayCaches,
        reviewer: Box<dyn TokenReviewer>,
        signer: JobSigner,
        job_signals: Arc<JobSignals>,
        heartbeats: Heartbeats,
        events: EventQueue,
    ) -> Arc<Self> {
        let auth = Authenticator::new(
            config.namespace.clone(),
            caches.credentials.clone(),
            caches.agents.clone(),
            reviewer,
            config.node_policy.clone(),
        );
        Arc::new(Self {
            client,
            limiter: SourceLimiter::new(&config.unauthenticated),
            progress: Mutex::new(ProgressBook::new(config.write_interval)),
            config,
            caches,
            auth,
            signer,
            specs: Mutex::new(HashMap::new()),
            agent_reads: AgentBudget::reads(),
            agent_writes: AgentBudget::writes(),
            job_signals,
            heartbeats,
            status_writes: Default::default(),
            events,
        })
    }

    /// Tells `agent`'s long-poll (if any) that its jobs changed.
    pub fn job_changed(&self, agent: &str) {
        self.job_signals.notify(agent);
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        handlers::router(self.clone())
    }

    /// Drops what the gateway keeps about jobs that are gone and sources that went
    /// quiet, so its memory does not grow with every job ever run. Run every few minutes.
    pub fn prune(&self) {
        self.prune_progress();
        self.job_signals.prune(&self.caches.jobs);
        self.limiter.prune();
        self.agent_reads.prune();
        self.agent_writes.prune();
        let now = Instant::now();
        self.specs
            .lock()
            .retain(|_, (_, used)| now.duration_since(*used) < Duration::from_secs(600));
    }
}
