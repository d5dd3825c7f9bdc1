//! `fleetpatch agent run`: the agent connected to a gateway. It registers (bootstrap
//! token for external hosts, ServiceAccount token for nodes), sends heartbeats,
//! long-polls for its jobs, runs them with the executor, and reports progress until the
//! gateway acknowledges it. Results produced while the gateway is unreachable stay in
//! the journal and are delivered when it is back.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::api::OperatingSystem;
use crate::api::agent::Platform;
use crate::api::patchjob::PatchJobStatus;
use crate::gateway::protocol::{
    Assignment, Assignments, Heartbeat, HeartbeatAnswer, JobName, NODE_HEADER, ProgressAck,
    ProgressReport, RebootDecision, RebootVerdict, RegisterRequest, RegisterResponse, decode_spec,
};

use super::executor::{self, Cancellation, Event, Executor, RunOutcome};
use super::journal::{JobRecord, Journal};
use super::patcher;
use super::reboot::{HostRebooter, Rebooter, SimulatedRebooter};

/// Options of `agent run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Base URL of the gateway, e.g. https://fleetpatch-gateway.fleetpatch-system.svc:8443.
    #[arg(long)]
    pub server: String,
    /// File holding the bootstrap token (external hosts; used once to register).
    #[arg(long, conflicts_with = "node")]
    pub token_file: Option<PathBuf>,
    /// Run as the node agent of this cluster node (DaemonSet mode).
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Projected ServiceAccount token of the node agent.
    #[arg(long, default_value = "/var/run/secrets/fleetpatch/token")]
    pub service_account_token_file: PathBuf,
    /// Agent name for an external host [default: the host name].
    #[arg(long)]
    pub name: Option<String>,
    /// Labels for the Agent resource, as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where the credential, journal, scripts and downloads are kept.
    #[arg(long, default_value = "/var/lib/fleetpatch")]
    pub state_dir: PathBuf,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 15)]
    pub heartbeat_seconds: u64,
    /// Extra CA certificate (PEM) to trust for the gateway.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Run scripts, package managers and reboots in the namespaces of the host's PID 1
    /// (`/proc/1/ns`): for the node agent DaemonSet, whose pod shares the host's PID
    /// namespace and mounts the state directory at the same path as the host.
    #[arg(long)]
    pub host_namespaces: bool,
    /// Let this external host's agent reboot the host when a job needs it (the shipped
    /// systemd unit and the Windows service instructions pass it). Without it a required
    /// reboot is reported `RequiredNotPerformed` and the host is left alone. Node agents
    /// (--node) always may: the controller drains the node and approves each reboot.
    #[arg(long)]
    pub allow_reboot: bool,
    #[command(flatten)]
    pub host: super::HostOptions,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SavedCredential {
    agent: String,
    credential: String,
}

/// How this agent proves who it is.
#[derive(Clone, Debug)]
enum Auth {
    External { agent: String, credential: String },
    Node { node: String, token_file: PathBuf },
}

/// Why a request to the gateway did not succeed: what it answered (the agent decides
/// by the status, never by the text), or that it could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway answered {0}: {1}")]
    Refused(reqwest::StatusCode, String),
    #[error("cannot reach the gateway: {0}")]
    Transport(reqwest::Error),
    #[error("{0}")]
    Local(String),
}

impl GatewayError {
    fn status(&self) -> Option<reqwest::StatusCode> {
        match self {
            Self::Refused(status, _) => Some(*status),
            _ => None,
        }
    }

    /// An answer that will not change by asking again (bad input, refused credentials):
    /// anything but a throttle, a server-side hiccup or an unreachable gateway.
    fn is_final(&self) -> bool {
        self.status().is_some_and(|status| {
            status.is_client_error()
                && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                && status != reqwest::StatusCode::REQUEST_TIMEOUT
        })
    }
}

#[derive(Clone)]
struct GatewayClient {
    http: reqwest::Client,
    base: String,
    auth: Auth,
}

impl GatewayClient {
    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, GatewayError> {
        let builder = self
            .http
            .request(method, format!("{}{path}", self.base.trim_end_matches('/')));
        Ok(match &self.auth {
            Auth::External { agent, credential } => {
                builder.bearer_auth(format!("{agent}.{credential}"))
            }
            Auth::Node { node, token_file } => {
                let token = std::fs::read_to_string(token_file).map_err(|err| {
                    GatewayError::Local(format!("reading {}: {err}", token_file.display()))
                })?;
                builder.bearer_auth(token.trim()).header(NODE_HEADER, node)
            }
        })
    }

    async fn send<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, GatewayError> {
        let response = request.send().await.map_err(GatewayError::Transport)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(GatewayError::Refused(
                status,
                body.chars().take(512).collect(),
            ));
        }
        response.json().await.map_err(GatewayError::Transport)
    }

    fn agent(&self) -> &str {
        match &self.auth {
            Auth::External { agent, .. } => agent,
            Auth::Node { node, .. } => node,
        }
    }
}

fn this_os() -> OperatingSystem {
    if cfg!(windows) {
        OperatingSystem::Windows
    } else {
        OperatingSystem::Linux
    }
}

/// What the Agent's status shows about the host: distribution and version (from
/// os-release, the host's when children run in its namespaces), CPU, package manager.
fn platform(patcher: Option<&str>) -> Platform {
    let (name, version) = if cfg!(windows) {
        ("windows".to_string(), String::new())
    } else {
        let root = super::process::host_root().unwrap_or_else(|| PathBuf::from("/"));
        let text = ["etc/os-release", "usr/lib/os-release"]
            .iter()
            .find_map(|file| std::fs::read_to_string(root.join(file)).ok())
            .unwrap_or_default();
        os_release(&text)
    };
    Platform {
        name,
        version,
        arch: std::env::consts::ARCH.to_string(),
        patcher: patcher.map(str::to_string),
    }
}

/// `ID` and `VERSION_ID` of an os-release file.
fn os_release(text: &str) -> (String, String) {
    let field = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
            .map(|value| value.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let id = field("ID");
    (
        if id.is_empty() { "linux".into() } else { id },
        field("VERSION_ID"),
    )
}

/// The host name as an object name: lower case.
fn hostname() -> String {
    super::local::hostname().to_ascii_lowercase()
}

fn http_client(options: &RunOptions) -> anyhow::Result<reqwest::Client> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .user_agent(concat!("fleetpatch-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &options.ca_file {
        let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// Registers (or finds the saved credential) and returns a client for the gateway.
/// `Local` errors and answers that will not change are final; the rest are retried.
async fn connect(options: &RunOptions) -> Result<GatewayClient, GatewayError> {
    let local = |what: String| GatewayError::Local(what);
    let http = http_client(options).map_err(|err| local(format!("{err:#}")))?;
    let labels: BTreeMap<String, String> = options.labels.iter().cloned().collect();
    if let Some(node) = &options.node {
        let client = GatewayClient {
            http,
            base: options.server.clone(),
            auth: Auth::Node {
                node: node.clone(),
                token_file: options.service_account_token_file.clone(),
            },
        };
        let request = RegisterRequest {
            name: node.clone(),
            os: this_os(),
            bootstrap_token: None,
            labels,
            platform: None,
        };
        let _: RegisterResponse = client
            .send(
                client
                    .request(reqwest::Method::POST, "/agent/v1/register")?
                    .json(&request),
            )
            .await?;
        return Ok(client);
    }
    let saved_path = options.state_dir.join("credential.json");
    if let Ok(bytes) = std::fs::read(&saved_path) {
        let saved: SavedCredential = serde_json::from_slice(&bytes).map_err(|err| {
            local(format!(
                "the saved credential {} is unreadable: {err}",
                saved_path.display()
            ))
        })?;
        return Ok(GatewayClient {
            http,
            base: options.server.clone(),
            auth: Auth::External {
                agent: saved.agent,
                credential: saved.credential,
            },
        });
    }
    let token_file = options.token_file.as_ref().ok_or_else(|| {
        local("this agent has no credential yet: give --token-file with a bootstrap token".into())
    })?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|err| local(format!("reading {}: {err}", token_file.display())))?;
    let name = options.name.clone().unwrap_or_else(hostname);
    let request = RegisterRequest {
        name: name.clone(),
        os: this_os(),
        bootstrap_token: Some(token.trim().to_string()),
        labels,
        platform: None,
    };
    let url = format!("{}/agent/v1/register", options.server.trim_end_matches('/'));
    let unregistered = GatewayClient {
        http: http.clone(),
        base: options.server.clone(),
        auth: Auth::External {
            agent: name,
            credential: String::new(),
        },
    };
    let registered: RegisterResponse = unregistered.send(http.post(url).json(&request)).await?;
    let credential = registered
        .credential
        .ok_or_else(|| local("the gateway sent no credential".into()))?;
    let saved = SavedCredential {
        agent: registered.agent.clone(),
        credential: credential.clone(),
    };
    std::fs::create_dir_all(&options.state_dir)
        .and_then(|()| write_private(&saved_path, &serde_json::to_vec(&saved).unwrap_or_default()))
        .map_err(|err| {
            local(format!(
                "saving the credential in {}: {err}",
                saved_path.display()
            ))
        })?;
    tracing::info!(agent = %registered.agent, "registered with the gateway");
    Ok(GatewayClient {
        http,
        base: options.server.clone(),
        auth: Auth::External {
            agent: registered.agent,
            credential,
        },
    })
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Latest status per job waiting to be acknowledged, with the job's namespace/name.
#[derive(Default)]
struct Outbox {
    pending: Mutex<HashMap<String, (i64, PatchJobStatus, String)>>,
    acknowledged: Mutex<HashMap<String, i64>>,
    /// Jobs the gateway will take no more reports for (finished there, or deleted):
    /// their journal entries are dropped.
    closed: Mutex<std::collections::HashSet<String>>,
    wake: Notify,
}

impl Outbox {
    fn put(&self, record: &JobRecord) {
        self.pending.lock().insert(
            record.id.clone(),
            (record.sequence, record.status.clone(), record.name.clone()),
        );
        self.wake.notify_one();
    }

    fn acknowledged(&self, uid: &str) -> i64 {
        self.acknowledged.lock().get(uid).copied().unwrap_or(0)
    }

    fn closed(&self, uid: &str) -> bool {
        self.closed.lock().contains(uid)
    }
}

/// The gateway's permission to reboot: node agents wait for the controller to cordon
/// and drain their node; every agent is refused when its job ended or was cancelled.
struct GatewayRebootGate {
    client: GatewayClient,
}

impl executor::RebootGate for GatewayRebootGate {
    fn permit<'a>(
        &'a self,
        record: &'a JobRecord,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let mut backoff = Duration::from_secs(1);
            let mut last_message = String::new();
            loop {
                let asked = async {
                    let request = self.client.request(
                        reqwest::Method::GET,
                        &format!("/agent/v1/jobs/{}/reboot?waitSeconds=25", record.id),
                    )?;
                    self.client.send::<RebootDecision>(request).await
                }
                .await;
                match asked {
                    Ok(decision) => {
                        backoff = Duration::from_secs(1);
                        match decision.verdict {
                            RebootVerdict::Approved => return Ok(()),
                            RebootVerdict::Denied => {
                                return Err(format!(
                                    "the controller called the reboot off: {}",
                                    decision.message
                                ));
                            }
                            RebootVerdict::Waiting => {
                                if decision.message != last_message {
                                    tracing::info!(job = %record.name, message = %decision.message, "waiting to reboot");
                                    last_message = decision.message;
                                }
                            }
                        }
                    }
                    Err(err) if err.is_final() => {
                        return Err(format!("the gateway refused the reboot: {err}"));
                    }
                    Err(err) => {
                        tracing::warn!(job = %record.name, error = %err, "cannot ask whether to reboot; retrying");
                        tokio::time::sleep(jitter(backoff)).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        })
    }
}

fn job_name(record_name: &str) -> Option<JobName> {
    let (namespace, name) = record_name.split_once('/')?;
    Some(JobName {
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// Retires a finished job from the journal: its result is with the gateway, or the
/// gateway takes none (an unfinished one stays: the executor still needs it). The
/// journal remembers that it ran, so it is never run again.
fn forget_if_finished(journal: &Journal, uid: &str) {
    match journal.load(uid) {
        Ok(Some(record)) if record.is_finished() => {
            if let Err(err) = journal.retire(&record) {
                tracing::warn!(job = %record.name, error = %err, "cannot retire a finished job from the journal");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(job = %uid, error = %err, "cannot read the journal"),
    }
}

/// Sends what the outbox holds until the gateway has written it, retrying with backoff.
/// A job the gateway takes no more reports for (409: it is finished there; 404/410: it
/// is gone; 403: it is no longer served to this agent — its signature broke, or the
/// agent stopped accepting its namespace) is closed: the agent stops reporting it, stops running it, and forgets it.
async fn deliver(client: GatewayClient, outbox: Arc<Outbox>, journal: Journal, running: Running) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let batch: Vec<(String, i64, PatchJobStatus, String)> = outbox
            .pending
            .lock()
            .iter()
            .map(|(k, (s, st, n))| (k.clone(), *s, st.clone(), n.clone()))
            .collect();
        let mut all_done = true;
        for (uid, sequence, status, name) in batch {
            let report = ProgressReport {
                sequence,
                status,
                job: job_name(&name),
            };
            let sent = async {
                let request = client
                    .request(
                        reqwest::Method::POST,
                        &format!("/agent/v1/jobs/{uid}/progress"),
                    )?
                    .json(&report);
                client.send::<ProgressAck>(request).await
            }
            .await;
            match sent {
                Ok(ack) => {
                    outbox
                        .acknowledged
                        .lock()
                        .insert(uid.clone(), ack.acknowledged_sequence);
                    if ack.acknowledged_sequence >= sequence {
                        let mut pending = outbox.pending.lock();
                        if pending
                            .get(&uid)
                            .is_some_and(|(s, _, _)| *s <= ack.acknowledged_sequence)
                        {
                            pending.remove(&uid);
                            drop(pending);
                            forget_if_finished(&journal, &uid);
                        }
                    } else {
                        all_done = false; // accepted, not yet written: ask again shortly
                    }
                    backoff = Duration::from_millis(200);
                }
                Err(err)
                    if matches!(
                        err.status(),
                        Some(
                            reqwest::StatusCode::CONFLICT
                                | reqwest::StatusCode::GONE
                                | reqwest::StatusCode::NOT_FOUND
                                | reqwest::StatusCode::FORBIDDEN
                        )
                    ) =>
                {
                    tracing::warn!(job = %name, error = %err, "the gateway takes no more reports for this job; forgetting it");
                    let current = running.lock().clone();
                    if let Some(job) = current.filter(|job| job.uid == uid) {
                        job.cancel
                            .cancel("the gateway takes no more reports for this job (it ended there, or is gone)");
                    }
                    outbox.pending.lock().remove(&uid);
                    forget_if_finished(&journal, &uid);
                    outbox.closed.lock().insert(uid);
                }
                Err(err) => {
                    tracing::warn!(job = %uid, error = %err, "cannot deliver progress; keeping it");
                    all_done = false;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
        let wait = if all_done {
            Duration::from_secs(5)
        } else {
            jitter(backoff)
        };
        let _ = tokio::time::timeout(wait, outbox.wake.notified()).await;
    }
}

/// The job the agent runs now.
#[derive(Clone)]
struct RunningJob {
    uid: String,
    name: String,
    cancel: Arc<Cancellation>,
}

type Running = Arc<Mutex<Option<RunningJob>>>;

/// Sends heartbeats forever; the gateway answers with the jobs to stop, which cancels
/// the running one.
async fn send_heartbeats(
    client: GatewayClient,
    every: Duration,
    platform: Platform,
    running: Running,
) {
    loop {
        let job = running.lock().clone();
        let beat = Heartbeat {
            version: env!("CARGO_PKG_VERSION").into(),
            hostname: Some(hostname()),
            platform: Some(platform.clone()),
            updates: None,
            current_job: job.as_ref().map(|j| j.name.clone()),
        };
        let sent = async {
            let request = client
                .request(reqwest::Method::POST, "/agent/v1/heartbeat")?
                .json(&beat);
            client.send::<HeartbeatAnswer>(request).await
        }
        .await;
        match sent {
            Ok(answer) => {
                if let Some(job) = job.filter(|j| answer.cancel.contains(&j.uid)) {
                    tracing::warn!(job = %job.name, "the gateway cancelled the running job");
                    job.cancel
                        .cancel("the job was deleted, or its agent paused");
                }
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed"),
        }
        tokio::time::sleep(every).await;
    }
}

fn jitter(base: Duration) -> Duration {
    base + Duration::from_millis(
        u64::from(rand::random::<u16>()) % (base.as_millis() as u64 / 2 + 1),
    )
}

/// Marks a job failed without the journal (it cannot be written, or the job must not
/// run and so has no journal), with the condition's `reason`.
fn fail_in_memory(record: &mut JobRecord, reason: &str, message: &str) {
    let now = k8s_openapi::jiff::Timestamp::now();
    let status = &mut record.status;
    status.phase = crate::api::patchjob::JobPhase::Failed;
    status.message = message.to_string();
    status.completion_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
    crate::api::conditions::set_outcome(&mut status.conditions, false, reason, message, None, now);
    record.sequence += 1;
}

/// What to do with an assigned job the journal does not hold.
#[derive(Debug, PartialEq, Eq)]
enum FirstSight {
    /// A new job: run it.
    Run,
    /// It already ran here under this very uid: a gateway whose cache lags its own
    /// final write lists it once more. Nothing to do or say.
    Skip,
    /// Report it failed and do not run it: a copy of a job that ran here (its signed
    /// spec recreated under its old name), or a job the gateway has results of from
    /// this host although this agent has no record of it (its state directory was
    /// lost): what ran of it is unknown.
    Refuse {
        reason: &'static str,
        message: String,
    },
}

fn first_sight(
    journal: &Journal,
    uid: &str,
    acknowledged: i64,
    name: &str,
    spec: &crate::api::patchjob::PatchJobSpec,
) -> FirstSight {
    let digest = super::journal::job_digest(name, spec);
    match journal
        .retired(&digest)
        .or_else(|| journal.holding(&digest))
    {
        Some(ran) if ran == uid => FirstSight::Skip,
        Some(ran) => FirstSight::Refuse {
            reason: "AlreadyRun",
            message: format!(
                "this host already took on a job with this very name and signed spec (uid {ran}); a copy is not run again"
            ),
        },
        None if acknowledged > 0 => FirstSight::Refuse {
            reason: "NoRecord",
            message: "the gateway has results of this job from this host, but the agent has no record of it (was its state directory lost?); not run again".into(),
        },
        None => FirstSight::Run,
    }
}

/// Connects, retrying what may succeed later; gives up on answers that will not.
async fn connect_until_done(options: &RunOptions) -> anyhow::Result<GatewayClient> {
    let mut backoff = Duration::from_secs(2);
    loop {
        match connect(options).await {
            Ok(client) => return Ok(client),
            Err(err @ GatewayError::Local(_)) => return Err(err.into()),
            Err(err) if err.is_final() => {
                anyhow::bail!("registration refused: {err}");
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot reach the gateway; retrying");
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Runs the agent until it is stopped (or, with a simulated reboot, until it "reboots").
pub async fn run(options: RunOptions) -> anyhow::Result<u8> {
    if options.host_namespaces {
        super::process::use_host_namespaces(PathBuf::from("/proc/1/ns"))
            .context("--host-namespaces")?;
    }
    super::containment::start_agent(options.host.action_cgroup.as_deref())
        .map_err(anyhow::Error::msg)
        .context("--action-cgroup")?;
    let journal = Journal::open(&options.state_dir)?;
    // Windows: SYSTEM and Administrators only (scripts there run as SYSTEM).
    super::process::protect_state_dir(&options.state_dir)
        .with_context(|| format!("protecting {}", options.state_dir.display()))?;
    let client = connect_until_done(&options).await?;
    tracing::info!(agent = %client.agent(), server = %options.server, "agent started");

    let outbox = Arc::new(Outbox::default());
    // Whatever the journal holds is (re)delivered: the gateway ignores what it has.
    for record in journal.all()? {
        outbox.put(&record);
    }
    let running: Running = Arc::default();
    tokio::spawn(deliver(
        client.clone(),
        outbox.clone(),
        journal.clone(),
        running.clone(),
    ));
    let detected = patcher::detect();
    tokio::spawn(send_heartbeats(
        client.clone(),
        Duration::from_secs(options.heartbeat_seconds.max(1)),
        platform(detected.as_deref().map(|p| p.name())),
        running.clone(),
    ));
    let simulated = SimulatedRebooter {
        counter_file: options.state_dir.join("simulated-boot-id"),
    };
    let worker = Worker {
        gate: GatewayRebootGate {
            client: client.clone(),
        },
        client,
        journal,
        outbox,
        running,
        patcher: detected,
        rebooter: if options.host.simulate_reboot {
            &simulated
        } else {
            &HostRebooter
        },
        reboot_refusal: (options.node.is_none() && !options.allow_reboot).then_some(
            "this agent reboots its host only when started with --allow-reboot (as the shipped systemd unit does)",
        ),
        options: &options,
    };
    worker.work().await
}

/// What the agent's work loop needs: the journal, the gateway, and how to run a job.
struct Worker<'a> {
    client: GatewayClient,
    journal: Journal,
    outbox: Arc<Outbox>,
    running: Running,
    patcher: Option<Box<dyn patcher::Patcher>>,
    rebooter: &'a dyn Rebooter,
    /// Every agent asks before it reboots: node agents wait for the drain, and any
    /// agent's reboot is called off when its job was cancelled.
    gate: GatewayRebootGate,
    /// Why this agent does not reboot its host, if it does not.
    reboot_refusal: Option<&'static str>,
    options: &'a RunOptions,
}

impl Worker<'_> {
    /// Runs jobs until the agent is stopped; returns only for a simulated reboot.
    async fn work(&self) -> anyhow::Result<u8> {
        let mut backoff = Duration::from_millis(500);
        let mut idle = Duration::from_secs(1);
        loop {
            // Unfinished jobs in the journal first: they were cut off by a crash or a reboot.
            let mut work: Vec<JobRecord> = self.journal.unfinished()?;
            if work.is_empty() {
                let Some(assignments) = self.poll(&mut backoff).await else {
                    continue;
                };
                for assignment in assignments.jobs {
                    work.extend(self.take(assignment).await?);
                }
                if work.is_empty() {
                    // Handed only what must not run (a lagging gateway lists a job that
                    // just ended): ask again after a pause rather than at once.
                    tokio::time::sleep(jitter(idle)).await;
                    idle = (idle * 2).min(Duration::from_secs(30));
                    continue;
                }
                idle = Duration::from_secs(1);
            }
            for record in work {
                if let Some(exit) = self.execute(record).await {
                    return Ok(exit);
                }
            }
            self.retire_delivered()?;
        }
    }

    /// The caller's assignments, long-polled; `None` (after a pause) when the gateway
    /// could not be asked.
    async fn poll(&self, backoff: &mut Duration) -> Option<Assignments> {
        let polled = async {
            let request = self
                .client
                .request(reqwest::Method::GET, "/agent/v1/assignments?waitSeconds=25")?;
            self.client.send::<Assignments>(request).await
        }
        .await;
        match polled {
            Ok(assignments) => {
                *backoff = Duration::from_millis(500);
                Some(assignments)
            }
            Err(err) => {
                if err.status() == Some(reqwest::StatusCode::UNAUTHORIZED) {
                    tracing::error!(error = %err, "the gateway no longer accepts this agent's credential (revoked, or its Agent deleted)");
                    *backoff = (*backoff).max(Duration::from_secs(15));
                } else {
                    tracing::warn!(error = %err, "cannot fetch assignments; retrying");
                }
                tokio::time::sleep(jitter(*backoff)).await;
                *backoff = (*backoff * 2).min(Duration::from_secs(60));
                None
            }
        }
    }

    /// What an assignment adds to the work: its journaled record, or a new one — or
    /// nothing, when it must not run (it is then reported, where there is something to
    /// say).
    async fn take(&self, assignment: Assignment) -> anyhow::Result<Option<JobRecord>> {
        let name = format!("{}/{}", assignment.namespace, assignment.name);
        let journaled = match self.journal.load(&assignment.uid) {
            Ok(journaled) => journaled,
            // What the host did for this job is unknown: it is not run (again) but
            // reported failed, so a person looks.
            Err(err @ super::journal::JournalError::Quarantined { .. }) => {
                tracing::error!(job = %name, error = %err, "the journal of a job is unreadable; reporting it failed, not running it");
                self.refuse(&assignment, name, "JournalFailed", &format!(
                    "the agent's journal of this job was unreadable and moved aside; not run again: {err}"
                ));
                return Ok(None);
            }
            Err(err) => return Err(err.into()),
        };
        match journaled {
            // Finished here but not yet recorded there: report again, never re-run.
            Some(record) if record.is_finished() => {
                self.outbox.put(&record);
                return Ok(None);
            }
            Some(record) => return Ok(Some(record)),
            None if self.outbox.closed(&assignment.uid) => return Ok(None),
            None => {}
        }
        let spec = match decode_spec(&assignment.spec) {
            Ok(spec) => spec,
            Err(err) => {
                tracing::error!(job = %name, error = %err, "refusing a job whose scripts do not verify");
                return Ok(None);
            }
        };
        match first_sight(
            &self.journal,
            &assignment.uid,
            assignment.acknowledged_sequence,
            &name,
            &spec,
        ) {
            FirstSight::Run => {}
            FirstSight::Skip => return Ok(None),
            FirstSight::Refuse { reason, message } => {
                tracing::error!(job = %name, %message, "not running a job again");
                self.refuse(&assignment, name, reason, &message);
                return Ok(None);
            }
        }
        let mut record = executor::new_record(&assignment.uid, name, spec);
        record.sequence = assignment.acknowledged_sequence;
        match self.journal.save(&record) {
            Ok(()) => Ok(Some(record)),
            // Without a journal the job cannot be run at most once.
            Err(err) => {
                tracing::error!(job = %record.name, error = %err, "cannot journal a new job (is the disk full?); not starting it");
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(None)
            }
        }
    }

    /// Reports an assigned job failed without running it.
    fn refuse(&self, assignment: &Assignment, name: String, reason: &str, message: &str) {
        let Ok(spec) = decode_spec(&assignment.spec) else {
            return;
        };
        let mut record = executor::new_record(&assignment.uid, name, spec);
        record.sequence = assignment.acknowledged_sequence;
        fail_in_memory(&mut record, reason, message);
        self.outbox.put(&record);
    }

    /// Runs one job to its end, or until the host reboots: `Some(exit code)` when a
    /// simulated reboot ends the agent.
    async fn execute(&self, mut record: JobRecord) -> Option<u8> {
        let cancel = Arc::new(Cancellation::default());
        if self.outbox.closed(&record.id) {
            cancel.cancel("the gateway takes no more reports for this job");
        }
        *self.running.lock() = Some(RunningJob {
            uid: record.id.clone(),
            name: record.name.clone(),
            cancel: cancel.clone(),
        });
        let events = self.outbox.clone();
        let on_event = move |record: &JobRecord, _event: &Event| events.put(record);
        let executor = Executor {
            journal: &self.journal,
            work_dir: self.options.state_dir.join("work"),
            patcher: if record.spec.patches.skip {
                None
            } else {
                self.patcher.as_deref()
            },
            rebooter: self.rebooter,
            minute: Duration::from_millis(self.options.host.minute_ms),
            max_download_bytes: super::download::DEFAULT_MAX_BYTES,
            on_event: &on_event,
            reboot_gate: Some(&self.gate),
            cancel: Some(&cancel),
            reboot_refusal: self.reboot_refusal,
        };
        let outcome = executor.run(&mut record).await;
        if !matches!(outcome, Ok(RunOutcome::Rebooting)) {
            *self.running.lock() = None;
        }
        match outcome {
            Ok(RunOutcome::Rebooting) => {
                self.outbox.put(&record);
                // Give the gateway a moment to hear that the host is rebooting.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while self.outbox.acknowledged(&record.id) < record.sequence
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if self.options.host.simulate_reboot {
                    return Some(super::local::EXIT_REBOOTING);
                }
                tracing::info!("waiting for the host to reboot");
                std::future::pending::<()>().await;
                None
            }
            Ok(_) => {
                self.outbox.put(&record);
                None
            }
            Err(err) => {
                // A full disk, say: the job cannot go on safely. Its failure is reported
                // from memory; once the journal can be written again the journaled
                // state is picked up (and any report of it is refused as the job is
                // final).
                tracing::error!(job = %record.name, error = %err, "cannot write the journal; the job is reported failed");
                fail_in_memory(
                    &mut record,
                    "JournalFailed",
                    &format!("the agent cannot write its journal: {err}"),
                );
                self.outbox.put(&record);
                tokio::time::sleep(Duration::from_secs(30)).await;
                None
            }
        }
    }

    /// Retires finished jobs the gateway has written, or will take nothing more for.
    fn retire_delivered(&self) -> anyhow::Result<()> {
        for record in self.journal.all()? {
            let delivered = self.outbox.acknowledged(&record.id) >= record.sequence;
            if record.is_finished() && (delivered || self.outbox.closed(&record.id)) {
                self.journal.retire(&record)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal in a temporary directory, and the spec of a job of web-1.
    fn scratch() -> (
        tempfile::TempDir,
        Journal,
        crate::api::patchjob::PatchJobSpec,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        let spec = serde_json::from_value(
            serde_json::json!({"agent": "web-1", "plan": "weekly", "run": "m1", "os": "Linux"}),
        )
        .unwrap();
        (dir, journal, spec)
    }

    #[test]
    fn a_job_that_ran_here_is_never_run_again_under_any_uid() {
        let (_dir, journal, spec) = scratch();
        let name = "team/weekly-m1-web-1";
        assert_eq!(
            first_sight(&journal, "uid-1", 0, name, &spec),
            FirstSight::Run
        );
        let mut record = executor::new_record("uid-1", name.to_string(), spec.clone());
        record.status.phase = crate::api::patchjob::JobPhase::Succeeded;
        record.sequence = 4;
        journal.save(&record).unwrap();
        journal.retire(&record).unwrap();
        // Listed again by a gateway whose cache lags.
        assert_eq!(
            first_sight(&journal, "uid-1", 4, name, &spec),
            FirstSight::Skip
        );
        // The same signed job recreated under its name: a new uid, nothing acknowledged.
        assert!(matches!(
            first_sight(&journal, "uid-2", 0, name, &spec),
            FirstSight::Refuse {
                reason: "AlreadyRun",
                ..
            }
        ));
        // Results were written from here, but the journal knows nothing of the job.
        let mut other = spec.clone();
        other.run = "m2".into();
        assert!(matches!(
            first_sight(&journal, "uid-3", 2, "team/weekly-m2-web-1", &other),
            FirstSight::Refuse {
                reason: "NoRecord",
                ..
            }
        ));
        assert_eq!(
            first_sight(&journal, "uid-3", 0, "team/weekly-m2-web-1", &other),
            FirstSight::Run
        );
    }

    /// Job `uid-1` under `name`, Succeeded after its fourth report.
    fn finished_record(name: &str, spec: &crate::api::PatchJobSpec) -> JobRecord {
        let mut record = executor::new_record("uid-1", name.to_string(), spec.clone());
        record.status.phase = crate::api::patchjob::JobPhase::Succeeded;
        record.sequence = 4;
        record
    }

    /// Attack (a plan author, who may edit and recreate PatchJobs in their namespace):
    /// a job finishes on its host, but its final report is not delivered — the author
    /// broke the job's signature annotation just before (every report is then refused
    /// 403 and kept for ever), or the gateway was unreachable and the agent is backing
    /// off. A finished job leaves the journal for `jobs/done/` only once delivered, and
    /// the agent polls for new work meanwhile. The author deletes the job (dropping the
    /// finalizer) and recreates it with its original spec and signature: a new uid,
    /// nothing acknowledged, and no retired digest yet — so the host runs the whole job a
    /// second time.
    #[test]
    fn a_copy_of_a_finished_job_whose_report_is_still_undelivered_is_not_run_again() {
        let (_dir, journal, spec) = scratch();
        let name = "team/weekly-m1-web-1";
        let record = finished_record(name, &spec);
        // Finished and journaled; its final report not yet acknowledged, so not retired.
        journal.save(&record).unwrap();
        assert!(
            journal.unfinished().unwrap().is_empty(),
            "the agent polls for work"
        );
        assert!(
            matches!(
                first_sight(&journal, "uid-2", 0, name, &spec),
                FirstSight::Refuse { .. }
            ),
            "a signed copy under a new uid is run while the original still sits finished in the journal"
        );
    }

    /// Attack (a plan author): the run finalizer keeps a deleted job counted until its
    /// run ends, so the controller creates no second job for the host in that run. An
    /// author who deletes a finished job and strips its finalizer gets one anyway —
    /// the same name, signed, with a new deadline and so a new spec digest — and the
    /// host patched (and rebooted) a second time in one run. A run's job is its host's
    /// once, whatever its deadline says.
    #[test]
    fn a_second_job_of_the_same_run_is_not_run_whatever_its_deadline() {
        let (_dir, journal, spec) = scratch();
        let name = "team/weekly-m1-web-1";
        let record = finished_record(name, &spec);
        journal.save(&record).unwrap();
        journal.retire(&record).unwrap();
        let mut again = spec.clone();
        again.deadline = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(
            matches!(
                first_sight(&journal, "uid-2", 0, name, &again),
                FirstSight::Refuse {
                    reason: "AlreadyRun",
                    ..
                }
            ),
            "the run's job created again with a new deadline is run a second time"
        );
    }

    #[test]
    fn os_release_gives_the_distribution_and_its_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"13\"\nID=debian\n";
        assert_eq!(os_release(debian), ("debian".into(), "13".into()));
        let rocky = "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.4\"\n";
        assert_eq!(os_release(rocky), ("rocky".into(), "9.4".into()));
        assert_eq!(os_release(""), ("linux".into(), String::new()));
    }
}
