//! The controller: one reconciler per kind, with the decisions they make (rollout
//! planning, schedules, job names, expiry, readiness) as pure functions. `run` starts a
//! replica: the caches, the agent gateway (which serves on every replica, so agents
//! spread over them and a leader change does not reconnect the fleet), the metrics and
//! health endpoints — and, while this replica holds the leader Lease, the reconcilers,
//! drains and reboot approvals, the built-in library.

pub mod agents;
pub mod caches;
pub mod context;
pub mod definitions;
pub mod drain;
#[cfg(test)]
pub mod fixtures;
pub mod jobs;
pub mod leader;
pub mod library;
pub mod metrics;
pub mod plan;
pub mod rollout;
#[cfg(test)]
mod scenarios;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource};
use serde_json::json;

use crate::api::RemediationPlan;
use crate::api::agent::AllowedPlans;
use crate::gateway::auth::{ApiTokenReviewer, NodePolicy};
use crate::gateway::jobs::{JobSigner, SIGNING_KEY_SECRET};
use crate::gateway::limits::UnauthenticatedLimits;
use crate::gateway::serve::{self, ServeLimits};
use crate::gateway::{Gateway, GatewayConfig};

use crate::api_errors;
use caches::Caches;
use context::{Context, Error, Settings};
use metrics::Metrics;

/// Options of `fleetpatch controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerOptions {
    /// The controller's namespace: built-in library, Secrets, Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = crate::api::rules::DEFAULT_LIBRARY_NAMESPACE)]
    pub namespace: String,
    /// Address of the agent gateway.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub gateway_listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Identity of this replica in the Leases (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Finished PatchJobs are deleted this many hours after they finish (never while
    /// their run is still open).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..=87_600))]
    pub job_ttl_hours: u64,
    /// An Agent is not Ready after this many seconds without a heartbeat.
    #[arg(long, default_value_t = 45, value_parser = clap::value_parser!(u64).range(5..=3600))]
    pub heartbeat_timeout_seconds: u64,
    /// Deadline of a job, in minutes, when its plan sets none.
    #[arg(long, default_value_t = 240, value_parser = clap::value_parser!(u64).range(1..=10_080))]
    pub job_deadline_minutes: u64,
    /// Most pre-patching tasks a workflow may have (at most the API's cap of 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=5))]
    pub max_pre_tasks: u8,
    /// Most post-patching tasks a workflow may have (at most the API's cap of 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(0..=5))]
    pub max_post_tasks: u8,
    /// Audience of node agents' projected ServiceAccount tokens.
    #[arg(long, default_value = "fleetpatch-gateway")]
    pub gateway_audience: String,
    /// ServiceAccount of the node agent DaemonSet.
    #[arg(long, default_value = "fleetpatch-node-agent")]
    pub node_agent_service_account: String,
    /// Which namespaces' plans may target node agents: empty for the controller's
    /// namespace only, `*` for all, else comma-separated namespace names.
    #[arg(long, default_value = "")]
    pub node_agent_plan_namespaces: String,
    /// Most cluster nodes rebooting at once, across every plan. Nodes with the
    /// control-plane role never reboot together whatever this says.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_node_reboots: u16,
    /// Serving certificate of the gateway (PEM, with its chain). With --tls-key-file the
    /// gateway speaks HTTPS; both files are read again when they change on disk.
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// Private key of --tls-cert-file (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Seconds a client has for a request's headers (and an idle connection stays open).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub gateway_header_timeout_seconds: u64,
    /// Most connections the gateway holds open.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub gateway_max_connections: u64,
    /// Most connections from one source address (0: no limit). Agents behind one NAT, or
    /// arriving through a load balancer that hides their address, share one source.
    #[arg(long, default_value_t = 1024)]
    pub gateway_max_connections_per_source: u64,
    /// Requests per second one source may make that fail authentication or need the
    /// API server to check (token reviews, registrations).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub gateway_unauthenticated_rate: u32,
    /// Burst of such requests one source may make after being quiet.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub gateway_unauthenticated_burst: u32,
    /// Most registrations handled at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub gateway_max_registrations: u32,
    /// Most reconciles of one kind, and most job status writes, in flight at once: the
    /// controller's share of the API server.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// Label this controller's own pod (named by --identity) `fleetpatch.io/leader=true`
    /// while it leads, for people looking for the leader.
    #[arg(long, requires = "identity")]
    pub label_leader_pod: bool,
}

/// Label on the leading controller's pod.
pub const LEADER_LABEL: &str = "fleetpatch.io/leader";
/// Name of the leader Lease.
pub const LEADER_LEASE: &str = "fleetpatch-controller";

/// What `/readyz` answers: a replica is ready once its caches are filled and its
/// gateway listens, leader or not.
const STARTING: u8 = 0;
const STANDBY: u8 = 1;
const LEADING: u8 = 2;

/// Runs one controller replica until SIGTERM or a server fails.
pub async fn run(client: Client, options: ControllerOptions) -> anyhow::Result<()> {
    let identity = options
        .identity
        .clone()
        .unwrap_or_else(|| format!("fleetpatch-{}", std::process::id()));
    let tls = serve::load_certificate(
        options.tls_cert_file.as_deref(),
        options.tls_key_file.as_deref(),
    )
    .await?;
    let metrics = Arc::new(Metrics::new());
    let role = Arc::new(AtomicU8::new(STARTING));
    let health_listener = tokio::net::TcpListener::bind(options.metrics_listen).await?;
    // Plain lines on stdout, like `fleetpatch dev`, so scripts and tests can find the ports.
    println!(
        "fleetpatch controller: metrics listening on http://{}",
        health_listener.local_addr()?
    );
    tokio::spawn(serve_health(health_listener, metrics.clone(), role.clone()));

    let signer = signing_key(&client, &options.namespace).await?;
    let caches = caches::start(&client, &options.namespace, signer.clone()).await?;
    let gateway = start_gateway(&client, &options, &caches, signer.clone(), &identity);
    let gateway_listener = std::net::TcpListener::bind(options.gateway_listen)?;
    gateway_listener.set_nonblocking(true)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %gateway_listener.local_addr()?, scheme, "agent gateway listening");
    println!(
        "fleetpatch controller: gateway listening on {scheme}://{}",
        gateway_listener.local_addr()?
    );
    let limits = ServeLimits {
        header_timeout: Duration::from_secs(options.gateway_header_timeout_seconds),
        max_connections: options.gateway_max_connections as usize,
        max_connections_per_source: options.gateway_max_connections_per_source as usize,
        ..ServeLimits::default()
    };
    let mut gateway_server = tokio::spawn(serve::serve(
        gateway_listener,
        gateway.router(),
        tls,
        limits,
    ));
    role.store(STANDBY, Ordering::Relaxed);

    let ctx = context(client.clone(), &options, caches, gateway, signer, metrics).await?;
    let lease = leader::LeaseSettings::new(LEADER_LEASE, &options.namespace, &identity);
    let shutdown = crate::shutdown::requested();
    tokio::pin!(shutdown);
    loop {
        tracing::info!(%identity, namespace = %options.namespace, "standing by for leadership");
        tokio::select! {
            () = leader::acquire(&client, &lease) => {}
            () = &mut shutdown => return Ok(()),
            served = &mut gateway_server => return gateway_ended(served),
        }
        tracing::info!(%identity, "leading");
        role.store(LEADING, Ordering::Relaxed);
        if options.label_leader_pod {
            label_own_pod(&client, &options.namespace, &identity, true).await;
        }
        let ended = tokio::select! {
            () = lead(ctx.clone()) => "the reconcilers stopped",
            () = leader::hold(client.clone(), lease.clone()) => "leadership lost",
            () = &mut shutdown => {
                leader::release(&client, &lease).await;
                return Ok(());
            }
            served = &mut gateway_server => {
                leader::release(&client, &lease).await;
                return gateway_ended(served);
            }
        };
        // Everything leader-only stopped when `lead` was dropped; the gateway serves on.
        role.store(STANDBY, Ordering::Relaxed);
        tracing::warn!(%identity, "{ended}; back to standby");
        if options.label_leader_pod {
            label_own_pod(&client, &options.namespace, &identity, false).await;
        }
    }
}

fn gateway_ended(served: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match served {
        Ok(Ok(())) => anyhow::bail!("the agent gateway stopped"),
        Ok(Err(err)) => Err(err.context("the agent gateway failed")),
        Err(err) => anyhow::bail!("the agent gateway panicked: {err}"),
    }
}

/// The key PatchJobs are signed with, shared by every replica through a Secret in the
/// controller's namespace (made by whichever replica starts first).
async fn signing_key(client: &Client, namespace: &str) -> anyhow::Result<JobSigner> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |secret: &Secret| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get("key"))
            .map(|ByteString(key)| JobSigner::new(key))
    };
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(SIGNING_KEY_SECRET).await? {
            return read(&secret).ok_or_else(|| {
                anyhow::anyhow!("Secret {namespace}/{SIGNING_KEY_SECRET} has no data.key")
            });
        }
        let mut key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SIGNING_KEY_SECRET.into()),
                ..Default::default()
            },
            data: Some([("key".to_string(), ByteString(key.to_vec()))].into()),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(JobSigner::new(&key)),
            // Another replica made it first: read theirs.
            Err(err) if api_errors::is_conflict(&err) => continue,
            Err(err) => return Err(err.into()),
        }
    }
    anyhow::bail!("cannot read or create the job signing key {namespace}/{SIGNING_KEY_SECRET}")
}

fn start_gateway(
    client: &Client,
    options: &ControllerOptions,
    caches: &Arc<Caches>,
    signer: JobSigner,
    identity: &str,
) -> Arc<Gateway> {
    let node_agent_plans = AllowedPlans::parse_names(&options.node_agent_plan_namespaces)
        .unwrap_or_else(|why| {
            tracing::error!(%why, "--node-agent-plan-namespaces is not valid; node agents accept plans from the controller's namespace only");
            AllowedPlans::default()
        });
    let gateway = Gateway::new(
        client.clone(),
        GatewayConfig {
            namespace: options.namespace.clone(),
            node_policy: NodePolicy {
                audience: options.gateway_audience.clone(),
                username: format!(
                    "system:serviceaccount:{}:{}",
                    options.namespace, options.node_agent_service_account
                ),
            },
            node_agent_plans,
            max_wait: Duration::from_secs(30),
            write_interval: Duration::from_secs(1),
            write_concurrency: usize::from(options.workers),
            unauthenticated: UnauthenticatedLimits {
                per_second: options.gateway_unauthenticated_rate,
                burst: options.gateway_unauthenticated_burst,
                max_registrations: options.gateway_max_registrations as usize,
            },
        },
        caches.for_gateway(),
        Box::new(ApiTokenReviewer(client.clone())),
        signer,
        caches.job_signals.clone(),
        Arc::default(),
        job_events(client, identity),
    );
    let flusher = gateway.clone();
    tokio::spawn(async move {
        let mut pruned = std::time::Instant::now();
        loop {
            flusher.flush().await;
            if pruned.elapsed() >= Duration::from_secs(300) {
                flusher.prune();
                pruned = std::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::spawn(gateway.clone().keep_presence(
        identity.to_string(),
        Duration::from_secs(options.heartbeat_timeout_seconds),
    ));
    gateway
}

/// The queue of every Event the process records (the gateway's on jobs, the
/// reconcilers'), and the one task that records them.
fn job_events(client: &Client, identity: &str) -> crate::events::EventQueue {
    let (queue, receiver) = crate::events::EventQueue::new(crate::events::QUEUE_CAPACITY);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "fleetpatch-controller".into(),
            instance: Some(identity.to_string()),
        },
    );
    tokio::spawn(crate::events::drain(receiver, recorder));
    queue
}

async fn context(
    client: Client,
    options: &ControllerOptions,
    caches: Arc<Caches>,
    gateway: Arc<Gateway>,
    signer: JobSigner,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<Context>> {
    let eviction_client = {
        let mut config = kube::Config::infer()
            .await
            .map_err(|err| anyhow::anyhow!("reading the Kubernetes client configuration: {err}"))?;
        config.default_retry = false;
        Client::try_from(config)?
    };
    Ok(Arc::new(Context {
        client,
        caches,
        settings: Settings {
            namespace: options.namespace.clone(),
            limits: crate::api::rules::Limits {
                max_pre_tasks: usize::from(options.max_pre_tasks),
                max_post_tasks: usize::from(options.max_post_tasks),
            },
            job_ttl: Duration::from_secs(options.job_ttl_hours * 3600),
            heartbeat_timeout: Duration::from_secs(options.heartbeat_timeout_seconds),
            default_job_deadline: Duration::from_secs(options.job_deadline_minutes * 60),
            max_node_reboots: usize::from(options.max_node_reboots),
            workers: options.workers,
        },
        metrics,
        gateway,
        signer,
        eviction_client,
        drain_lock: tokio::sync::Mutex::new(()),
    }))
}

/// What only the leader does, until the future is dropped: the built-in library and
/// every reconciler.
async fn lead(ctx: Arc<Context>) {
    let library = library::keep_installed(
        ctx.client.clone(),
        ctx.settings.namespace.clone(),
        Duration::from_secs(60),
    );
    tokio::join!(library, reconcilers(ctx));
}

/// A pass over every object when the reconcilers start (they hear only changes from
/// then on) and every few minutes after, so nothing a lagging listener missed is lost.
fn every_object() -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::once(async {}).chain(futures::stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_secs(300)).await;
        Some(((), ()))
    }))
}

async fn reconcilers(ctx: Arc<Context>) {
    let fanouts = &ctx.caches.fanouts;
    let caches = &ctx.caches;
    let workers = kube::runtime::controller::Config::default().concurrency(ctx.settings.workers);
    let scripts =
        Controller::for_shared_stream(fanouts.scripts.subscribe(), caches.scripts.clone())
            .with_config(workers.clone())
            .reconcile_all_on(every_object())
            .run(
                traced(definitions::reconcile_script, no_run),
                error_policy,
                ctx.clone(),
            )
            .for_each(|result| log_result("Script", result));
    let tasks = Controller::for_shared_stream(fanouts.tasks.subscribe(), caches.tasks.clone())
        .with_config(workers.clone())
        .reconcile_all_on(every_object())
        .run(
            traced(definitions::reconcile_task, no_run),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("Task", result));
    let workflows =
        Controller::for_shared_stream(fanouts.workflows.subscribe(), caches.workflows.clone())
            .with_config(workers.clone())
            .reconcile_all_on(every_object())
            // A plan naming a workflow changes the workflow's activePlans.
            .watches_shared_stream(fanouts.plans.subscribe(), |plan: Arc<RemediationPlan>| {
                let namespace = plan.metadata.namespace.clone().unwrap_or_default();
                plan.spec
                    .targets
                    .iter()
                    .filter_map(|t| t.workflow_ref.as_ref())
                    .map(|r| ObjectRef::new(&r.name).within(r.namespace_or(&namespace)))
                    .collect::<Vec<_>>()
            })
            .run(
                traced(definitions::reconcile_workflow, no_run),
                error_policy,
                ctx.clone(),
            )
            .for_each(|result| log_result("Workflow", result));
    let plans = Controller::for_shared_stream(fanouts.plans.subscribe(), caches.plans.clone())
        .with_config(workers.clone())
        .reconcile_all_on(every_object())
        .owns_shared_stream(fanouts.jobs.subscribe())
        .run(
            traced(plan::reconcile_plan, plan_run),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("RemediationPlan", result));
    let patch_jobs = Controller::for_shared_stream(fanouts.jobs.subscribe(), caches.jobs.clone())
        .with_config(workers.clone())
        .reconcile_all_on(every_object())
        .run(
            traced(jobs::reconcile_job, job_run),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("PatchJob", result));
    let agents = Controller::for_shared_stream(fanouts.agents.subscribe(), caches.agents.clone())
        .with_config(workers.clone())
        .reconcile_all_on(every_object())
        .run(
            traced(agents::reconcile_agent, no_run),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("Agent", result));
    // Nodes: cordon, drain and uncordon around node agents' reboots.
    let nodes = Controller::new(Api::<Node>::all(ctx.client.clone()), Default::default())
        .with_config(workers)
        .watches_shared_stream(fanouts.jobs.subscribe(), drain::node_of_job)
        .run(
            traced(drain::reconcile_node, no_run),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_result("Node", result));
    tokio::join!(scripts, tasks, workflows, plans, patch_jobs, agents, nodes);
}

/// `reconcile` inside the span of its object, so every line it logs names the object
/// (`crate::logs`); `run` says which run the object is about, if any.
fn traced<K, F, Fut>(
    reconcile: F,
    run: fn(&K) -> Option<String>,
) -> impl FnMut(Arc<K>, Arc<Context>) -> tracing::instrument::Instrumented<Fut>
where
    K: Resource<DynamicType = ()>,
    F: Fn(Arc<K>, Arc<Context>) -> Fut,
{
    use tracing::Instrument;
    move |object, ctx| {
        let span = crate::logs::object_span(
            &K::kind(&()),
            object.meta().namespace.as_deref(),
            object.meta().name.as_deref().unwrap_or_default(),
            run(&object).as_deref(),
        );
        reconcile(object, ctx).instrument(span)
    }
}

fn no_run<K>(_: &K) -> Option<String> {
    None
}

fn job_run(job: &crate::api::PatchJob) -> Option<String> {
    Some(job.spec.run.clone())
}

fn plan_run(plan: &RemediationPlan) -> Option<String> {
    plan.status
        .as_ref()?
        .current_run
        .as_ref()
        .map(|run| run.id.clone())
}

fn error_policy<K>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics.failure(&K::kind(&()), error.category());
    let _span = crate::logs::object_span(
        &K::kind(&()),
        object.meta().namespace.as_deref(),
        object.meta().name.as_deref().unwrap_or_default(),
        None,
    )
    .entered();
    tracing::warn!(error = %error, "reconcile failed");
    let jitter = Duration::from_millis(u64::from(rand::random::<u16>() % 1000));
    match error {
        Error::Kube(err) if api_errors::is_throttled(err) => {
            Action::requeue(Duration::from_secs(10) + jitter * 5)
        }
        _ => Action::requeue(Duration::from_secs(2) + jitter),
    }
}

/// Sets (or removes) the leader label on this controller's pod.
async fn label_own_pod(client: &Client, namespace: &str, pod: &str, leading: bool) {
    use kube::api::{Patch, PatchParams};
    let value = if leading { json!("true") } else { json!(null) };
    let patch = json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    if let Err(err) = pods
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::warn!(%pod, error = %err, leading, "cannot label the controller's pod");
    }
}

async fn serve_health(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    role: Arc<AtomicU8>,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let role = role.clone();
                async move {
                    match role.load(Ordering::Relaxed) {
                        STANDBY => (axum::http::StatusCode::OK, "ready; standby"),
                        LEADING => (axum::http::StatusCode::OK, "ready; leading"),
                        _ => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "filling caches",
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app).await?;
    Ok(())
}

async fn log_result<T, E: std::fmt::Display>(kind: &'static str, result: Result<T, E>) {
    if let Err(err) = result {
        tracing::debug!(kind, error = %err, "controller stream error");
    }
}
