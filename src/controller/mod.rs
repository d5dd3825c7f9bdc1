//! The controller: one reconciler per kind, with the decisions they make (rollout
//! planning, schedules, job names) as pure functions. `run` starts everything in one
//! process: leader election, the reconcilers, the built-in library, the agent gateway,
//! and the metrics and health endpoints.

pub mod agents;
pub mod context;
pub mod definitions;
pub mod drain;
pub mod jobs;
pub mod leader;
pub mod library;
pub mod metrics;
pub mod plan;
pub mod rollout;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Config as WatchConfig};
use kube::{Client, Resource};
use serde_json::json;

use crate::api::{Agent, PatchJob, RemediationPlan, Script, Task, Workflow};
use crate::gateway::server::{Gateway, GatewayConfig};

use context::{Caches, Context, Error, Settings};
use metrics::Metrics;

/// Options of `fleetpatch controller`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerOptions {
    /// The controller's namespace: built-in library, Secrets, leader Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = crate::api::rules::DEFAULT_LIBRARY_NAMESPACE)]
    pub namespace: String,
    /// Address of the agent gateway.
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub gateway_listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
    /// Identity in the leader Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Finished PatchJobs are deleted this many hours after they finish.
    #[arg(long, default_value_t = 168)]
    pub job_ttl_hours: u64,
    /// An Agent is not Ready after this many seconds without a heartbeat.
    #[arg(long, default_value_t = 45)]
    pub heartbeat_timeout_seconds: u64,
    /// Deadline of a job, in minutes, when its plan sets none.
    #[arg(long, default_value_t = 240)]
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
    /// Serving certificate of the gateway (PEM, with its chain). With --tls-key-file the
    /// gateway speaks HTTPS; both files are read again when they change on disk.
    #[arg(long, requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// Private key of --tls-cert-file (PEM).
    #[arg(long, requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Most reconciles of one kind, and most job status writes, in flight at once: the
    /// controller's share of the API server.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// Label this controller's own pod (named by --identity) `fleetpatch.io/leader=true`
    /// while it leads, so the gateway Service can select the leader only.
    #[arg(long, requires = "identity")]
    pub label_leader_pod: bool,
}

/// Label on the leading controller's pod; the gateway Service selects it.
pub const LEADER_LABEL: &str = "fleetpatch.io/leader";

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

/// What `/readyz` answers: a standby replica is ready (it has nothing to start); the
/// leader is ready once its caches are filled and the gateway listens.
const STANDBY: u8 = 0;
const STARTING: u8 = 1;
const LEADING: u8 = 2;

/// The gateway's certificate, loaded at start so a bad file fails at once.
async fn load_certificate(
    options: &ControllerOptions,
) -> anyhow::Result<Option<axum_server::tls_rustls::RustlsConfig>> {
    use anyhow::Context as _;
    let (Some(cert), Some(key)) = (&options.tls_cert_file, &options.tls_key_file) else {
        return Ok(None);
    };
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .with_context(|| {
            format!(
                "loading the gateway certificate {} and key {}",
                cert.display(),
                key.display()
            )
        })?;
    offer_http1_only(&config);
    tokio::spawn(reload_certificate(
        config.clone(),
        cert.clone(),
        key.clone(),
    ));
    Ok(Some(config))
}

/// The gateway speaks HTTP/1.1 only (see [`serve_gateway`]): offer only http/1.1 in
/// ALPN, so clients that would pick h2 (curl, say) do not. Applied after every load.
fn offer_http1_only(config: &axum_server::tls_rustls::RustlsConfig) {
    let mut adjusted = (*config.get_inner()).clone();
    adjusted.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.reload_from_config(Arc::new(adjusted));
}

/// Serves the gateway: HTTPS when a certificate is configured, else plain HTTP; HTTP/1.1
/// only. Agents speak nothing else, and a connection that can only be HTTP/1.1 costs far
/// less memory than one that may still turn out to be HTTP/2 (measured with 8,000 idle
/// long-polls: about 10 KiB each instead of 17.5 KiB), which counts at one connection
/// per agent.
async fn serve_gateway(
    listener: std::net::TcpListener,
    router: axum::Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %err, "gateway cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        // The current configuration: a reloaded certificate applies to new connections.
        let acceptor = tls
            .as_ref()
            .map(|config| tokio_rustls::TlsAcceptor::from(config.get_inner()));
        tokio::spawn(async move {
            let http = hyper::server::conn::http1::Builder::new();
            let served = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(error = %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await
                }
            };
            if let Err(err) = served {
                tracing::debug!(error = %err, "gateway connection ended with an error");
            }
        });
    }
}

/// Reloads a rotated certificate (cert-manager, a renewed Secret) without a restart.
async fn reload_certificate(
    config: axum_server::tls_rustls::RustlsConfig,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
) {
    let modified = |path: &std::path::Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = (modified(&cert), modified(&key));
    loop {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let now = (modified(&cert), modified(&key));
        if now == seen {
            continue;
        }
        match config.reload_from_pem_file(&cert, &key).await {
            Ok(()) => {
                offer_http1_only(&config);
                tracing::info!(cert = %cert.display(), "gateway certificate reloaded");
                seen = now;
            }
            Err(err) => tracing::warn!(error = %err, "cannot reload the gateway certificate"),
        }
    }
}

fn error_policy<K>(_object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics.failure(&K::kind(&()), error.category());
    tracing::warn!(kind = %K::kind(&()), error = %error, "reconcile failed");
    let jitter = Duration::from_millis(u64::from(rand::random::<u16>() % 1000));
    match error {
        Error::Invalid(_) => Action::await_change(),
        Error::Kube(kube::Error::Api(status)) if status.code == 429 => {
            Action::requeue(Duration::from_secs(10) + jitter * 5)
        }
        _ => Action::requeue(Duration::from_secs(2) + jitter),
    }
}

/// Objects each shared cache buffers for a controller that has not taken them yet.
const SHARED_BUFFER: usize = 256;

/// One cache per kind over all namespaces, shared by the gateway and every controller
/// that needs the kind (`subscribe` on the writer before `reflect`), so each object is
/// held once. `managedFields` are dropped: nothing here reads them, and they are often
/// half an object's size.
fn shared_cache<K>() -> (Store<K>, reflector::store::Writer<K>)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    reflector::store_shared(SHARED_BUFFER)
}

/// The stream that fills a shared cache; it must be polled for the cache to fill and
/// its subscribers to hear.
fn reflect<K>(
    client: &Client,
    writer: reflector::store::Writer<K>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    watcher::watcher(Api::<K>::all(client.clone()), WatchConfig::default())
        .default_backoff()
        .modify(|object: &mut K| object.meta_mut().managed_fields = None)
        .reflect_shared(writer)
}

fn subscribe<K>(writer: &reflector::store::Writer<K>) -> reflector::ReflectHandle<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    writer
        .subscribe()
        .expect("shared caches can be subscribed to")
}

async fn serve_health(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicU8>,
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
                let ready = ready.clone();
                async move {
                    match ready.load(std::sync::atomic::Ordering::Relaxed) {
                        STANDBY => (axum::http::StatusCode::OK, "standby"),
                        LEADING => (axum::http::StatusCode::OK, "leading"),
                        _ => (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "leading; filling caches",
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

/// Runs the controller until leadership is lost or a server fails.
pub async fn run(client: Client, options: ControllerOptions) -> anyhow::Result<()> {
    let identity = options
        .identity
        .clone()
        .unwrap_or_else(|| format!("fleetpatch-{}", std::process::id()));
    let tls = load_certificate(&options).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(std::sync::atomic::AtomicU8::new(STANDBY));
    let health_listener = tokio::net::TcpListener::bind(options.metrics_listen).await?;
    // Plain lines on stdout, like `fleetpatch dev`, so scripts and tests can find the ports.
    println!(
        "fleetpatch controller: metrics listening on http://{}",
        health_listener.local_addr()?
    );
    tokio::spawn(serve_health(
        health_listener,
        metrics.clone(),
        ready.clone(),
    ));

    let lease = leader::LeaseSettings {
        name: "fleetpatch-controller".into(),
        namespace: options.namespace.clone(),
        identity: identity.clone(),
        duration: Duration::from_secs(15),
    };
    tracing::info!(%identity, namespace = %options.namespace, "waiting for leadership");
    if options.label_leader_pod {
        // A restarted container may find the label its previous run left on the pod.
        label_own_pod(&client, &options.namespace, &identity, false).await;
    }
    leader::acquire(&client, &lease).await;
    tracing::info!(%identity, "leading");
    ready.store(STARTING, std::sync::atomic::Ordering::Relaxed);

    library::install(&client, &options.namespace).await?;
    tokio::spawn(library::keep_installed(
        client.clone(),
        options.namespace.clone(),
        Duration::from_secs(60),
    ));

    let (scripts, scripts_writer) = shared_cache::<Script>();
    let (tasks, tasks_writer) = shared_cache::<Task>();
    let (workflows, workflows_writer) = shared_cache::<Workflow>();
    let (plans, plans_writer) = shared_cache::<RemediationPlan>();
    let (jobs, jobs_writer) = shared_cache::<PatchJob>();
    let (agents, agents_writer) = shared_cache::<Agent>();
    // Every subscription is taken before its cache starts filling, so none misses the
    // initial objects.
    let scripts_events = subscribe(&scripts_writer);
    let tasks_events = subscribe(&tasks_writer);
    let workflows_events = subscribe(&workflows_writer);
    let plans_events = subscribe(&plans_writer);
    let plans_events_for_workflows = subscribe(&plans_writer);
    let jobs_events = subscribe(&jobs_writer);
    let jobs_events_for_plans = subscribe(&jobs_writer);
    let jobs_events_for_nodes = subscribe(&jobs_writer);
    let agents_events = subscribe(&agents_writer);
    // The job cache also indexes jobs for the gateway and wakes an agent's long-poll
    // once the cache holds its new job.
    let job_signals: Arc<crate::gateway::server::JobSignals> = Arc::default();
    let signals = job_signals.clone();
    let jobs_stream = reflect(&client, jobs_writer)
        .touched_objects()
        .map(move |job| {
            if let Ok(job) = job {
                signals.observe(&job);
            }
        });
    let drained = |stream: futures::stream::BoxStream<'static, ()>| {
        tokio::spawn(stream.for_each(|()| async {}))
    };
    drained(reflect(&client, scripts_writer).map(|_| ()).boxed());
    drained(reflect(&client, tasks_writer).map(|_| ()).boxed());
    drained(reflect(&client, workflows_writer).map(|_| ()).boxed());
    drained(reflect(&client, plans_writer).map(|_| ()).boxed());
    drained(jobs_stream.boxed());
    drained(reflect(&client, agents_writer).map(|_| ()).boxed());
    scripts.wait_until_ready().await?;
    tasks.wait_until_ready().await?;
    workflows.wait_until_ready().await?;
    plans.wait_until_ready().await?;
    jobs.wait_until_ready().await?;
    agents.wait_until_ready().await?;

    let heartbeats: crate::gateway::server::Heartbeats = Arc::default();
    let gateway = Gateway::new(
        client.clone(),
        GatewayConfig {
            namespace: options.namespace.clone(),
            node_agent_username: format!(
                "system:serviceaccount:{}:{}",
                options.namespace, options.node_agent_service_account
            ),
            audience: options.gateway_audience.clone(),
            max_wait: Duration::from_secs(30),
            write_interval: Duration::from_secs(1),
            write_concurrency: usize::from(options.workers),
        },
        jobs.clone(),
        job_signals,
        heartbeats.clone(),
    );
    let router = gateway.router();
    let gateway_listener = std::net::TcpListener::bind(options.gateway_listen)?;
    gateway_listener.set_nonblocking(true)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %gateway_listener.local_addr()?, scheme, "agent gateway listening");
    println!(
        "fleetpatch controller: gateway listening on {scheme}://{}",
        gateway_listener.local_addr()?
    );
    let gateway_server = tokio::spawn(serve_gateway(gateway_listener, router, tls));
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

    let eviction_client = {
        let mut config = kube::Config::infer()
            .await
            .map_err(|err| anyhow::anyhow!("reading the Kubernetes client configuration: {err}"))?;
        config.default_retry = false;
        Client::try_from(config)?
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        caches: Caches {
            scripts,
            tasks,
            workflows,
            plans,
            jobs,
            agents,
        },
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "fleetpatch-controller".into(),
                instance: Some(identity.clone()),
            },
        ),
        settings: Settings {
            namespace: options.namespace.clone(),
            limits: crate::api::rules::Limits {
                max_pre_tasks: usize::from(options.max_pre_tasks),
                max_post_tasks: usize::from(options.max_post_tasks),
            },
            job_ttl: Duration::from_secs(options.job_ttl_hours * 3600),
            heartbeat_timeout: Duration::from_secs(options.heartbeat_timeout_seconds),
            default_job_deadline: Duration::from_secs(options.job_deadline_minutes * 60),
        },
        metrics,
        heartbeats,
        gateway,
        eviction_client,
        drain_lock: tokio::sync::Mutex::new(()),
    });
    ready.store(LEADING, std::sync::atomic::Ordering::Relaxed);
    if options.label_leader_pod {
        label_own_pod(&client, &options.namespace, &identity, true).await;
    }

    let config = watcher::Config::default();
    let workers = kube::runtime::controller::Config::default().concurrency(options.workers);
    let scripts = Controller::for_shared_stream(scripts_events, ctx.caches.scripts.clone())
        .with_config(workers.clone())
        .run(definitions::reconcile_script, error_policy, ctx.clone())
        .for_each(|result| log_result("Script", result));
    let tasks = Controller::for_shared_stream(tasks_events, ctx.caches.tasks.clone())
        .with_config(workers.clone())
        .run(definitions::reconcile_task, error_policy, ctx.clone())
        .for_each(|result| log_result("Task", result));
    let workflows = Controller::for_shared_stream(workflows_events, ctx.caches.workflows.clone())
        .with_config(workers.clone())
        // A plan naming a workflow changes the workflow's activePlans.
        .watches_shared_stream(plans_events_for_workflows, |plan: Arc<RemediationPlan>| {
            let namespace = plan.metadata.namespace.clone().unwrap_or_default();
            plan.spec
                .targets
                .iter()
                .filter_map(|t| t.workflow_ref.as_ref())
                .map(|r| {
                    kube::runtime::reflector::ObjectRef::new(&r.name)
                        .within(r.namespace_or(&namespace))
                })
                .collect::<Vec<_>>()
        })
        .run(definitions::reconcile_workflow, error_policy, ctx.clone())
        .for_each(|result| log_result("Workflow", result));
    let plans = Controller::for_shared_stream(plans_events, ctx.caches.plans.clone())
        .with_config(workers.clone())
        .owns_shared_stream(jobs_events_for_plans)
        .run(plan::reconcile_plan, error_policy, ctx.clone())
        .for_each(|result| log_result("RemediationPlan", result));
    let patch_jobs = Controller::for_shared_stream(jobs_events, ctx.caches.jobs.clone())
        .with_config(workers.clone())
        .run(jobs::reconcile_job, error_policy, ctx.clone())
        .for_each(|result| log_result("PatchJob", result));
    let agents = Controller::for_shared_stream(agents_events, ctx.caches.agents.clone())
        .with_config(workers.clone())
        .run(agents::reconcile_agent, error_policy, ctx.clone())
        .for_each(|result| log_result("Agent", result));

    // Nodes: cordon, drain and uncordon around node agents' reboots.
    let nodes = Controller::new(
        Api::<k8s_openapi::api::core::v1::Node>::all(client.clone()),
        config.clone(),
    )
    .with_config(workers.clone())
    .watches_shared_stream(jobs_events_for_nodes, drain::node_of_job)
    .run(drain::reconcile_node, error_policy, ctx.clone())
    .for_each(|result| log_result("Node", result));

    tokio::select! {
        _ = async { tokio::join!(scripts, tasks, workflows, plans, patch_jobs, agents, nodes) } => {
            anyhow::bail!("the reconcilers stopped")
        }
        () = leader::hold(client.clone(), lease) => anyhow::bail!("leadership lost; exiting so a new leader can take over"),
        served = gateway_server => match served {
            Ok(Ok(())) => anyhow::bail!("the agent gateway stopped"),
            Ok(Err(err)) => Err(err.context("the agent gateway failed")),
            Err(err) => anyhow::bail!("the agent gateway panicked: {err}"),
        },
    }
}
