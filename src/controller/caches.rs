//! The caches every replica keeps: one per kind, filled by one watch each and shared by
//! the gateway and the reconcilers, each object projected to what is read (no
//! managedFields, no script bodies in PatchJobs, only hashes in credential Secrets).
//! Changes fan out to the reconcilers through [`Fanout`]s, which only a leading replica
//! listens to: a standby keeps its caches warm without buffering events for anyone.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Config as WatchConfig};
use kube::{Client, Resource};
use tokio::sync::broadcast;

use crate::api::{Agent, PatchJob, RemediationPlan, Script, Task, Workflow};
use crate::gateway::GatewayCaches;
use crate::gateway::credentials::{
    BOOTSTRAP_SECRET_TYPE, CREDENTIAL_HASH_KEY, CREDENTIAL_SECRET_TYPE,
};
use crate::gateway::jobs::JobSignals;
use crate::gateway::jobs::JobSigner;
use crate::gateway::progress::project_job;

/// Changes of one kind for whoever listens now; nobody listening costs nothing.
pub struct Fanout<K> {
    tx: broadcast::Sender<Arc<K>>,
}

impl<K: Clone + Send + Sync + 'static> Fanout<K> {
    fn new() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
        }
    }

    fn send(&self, object: K) {
        let _ = self.tx.send(Arc::new(object));
    }

    /// Changes from now on. A listener that falls behind skips what it missed; the
    /// reconcilers' periodic pass over every object makes up for it.
    pub fn subscribe(&self) -> impl Stream<Item = Arc<K>> + Send + 'static {
        futures::stream::unfold(self.tx.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(object) => return Some((object, rx)),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "a reconciler fell behind its cache");
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// Every cache, and the fan-outs of the kinds a reconciler follows.
pub struct Caches {
    pub scripts: Store<Script>,
    pub tasks: Store<Task>,
    pub workflows: Store<Workflow>,
    pub plans: Store<RemediationPlan>,
    pub jobs: Store<PatchJob>,
    pub agents: Store<Agent>,
    pub namespaces: Store<Namespace>,
    pub credentials: Store<Secret>,
    pub tokens: Store<Secret>,
    /// The controller namespace's Leases: leadership and the replicas' presence.
    pub leases: Store<Lease>,
    pub fanouts: Arc<Fanouts>,
    /// The gateway's job index, fed by the job cache.
    pub job_signals: Arc<JobSignals>,
}

pub struct Fanouts {
    pub scripts: Fanout<Script>,
    pub tasks: Fanout<Task>,
    pub workflows: Fanout<Workflow>,
    pub plans: Fanout<RemediationPlan>,
    pub jobs: Fanout<PatchJob>,
    pub agents: Fanout<Agent>,
}

impl Fanouts {
    fn new() -> Self {
        Self {
            scripts: Fanout::new(),
            tasks: Fanout::new(),
            workflows: Fanout::new(),
            plans: Fanout::new(),
            jobs: Fanout::new(),
            agents: Fanout::new(),
        }
    }
}

impl Caches {
    /// The gateway's view of them.
    pub fn for_gateway(&self) -> GatewayCaches {
        GatewayCaches {
            jobs: self.jobs.clone(),
            agents: self.agents.clone(),
            credentials: self.credentials.clone(),
            tokens: self.tokens.clone(),
            namespaces: self.namespaces.clone(),
        }
    }
}

/// Starts every watch and returns once every cache holds the current state.
pub async fn start(
    client: &Client,
    namespace: &str,
    signer: JobSigner,
) -> anyhow::Result<Arc<Caches>> {
    let fanouts = Arc::new(Fanouts::new());
    let job_signals: Arc<JobSignals> = Arc::default();
    let all = WatchConfig::default();
    let scripts = follow(Api::all(client.clone()), all.clone(), drop_managed, {
        let fanouts = fanouts.clone();
        move |o| fanouts.scripts.send(o)
    });
    let tasks = follow(Api::all(client.clone()), all.clone(), drop_managed, {
        let fanouts = fanouts.clone();
        move |o| fanouts.tasks.send(o)
    });
    let workflows = follow(Api::all(client.clone()), all.clone(), drop_managed, {
        let fanouts = fanouts.clone();
        move |o| fanouts.workflows.send(o)
    });
    let plans = follow(Api::all(client.clone()), all.clone(), drop_managed, {
        let fanouts = fanouts.clone();
        move |o| fanouts.plans.send(o)
    });
    let jobs = follow(
        Api::all(client.clone()),
        all.clone(),
        move |job: &mut PatchJob| project_job(job, &signer),
        {
            let fanouts = fanouts.clone();
            let signals = job_signals.clone();
            // The index and the agent's long-poll learn of a job after the cache has it.
            move |job: PatchJob| {
                signals.observe(&job);
                fanouts.jobs.send(job);
            }
        },
    );
    let agents = follow(Api::all(client.clone()), all.clone(), drop_managed, {
        let fanouts = fanouts.clone();
        move |o| fanouts.agents.send(o)
    });
    let namespaces = follow(Api::all(client.clone()), all, keep_labels_only, |_| {});
    let credentials = follow(
        Api::namespaced(client.clone(), namespace),
        WatchConfig::default().fields(&format!("type={CREDENTIAL_SECRET_TYPE}")),
        keep_credential_hash,
        |_| {},
    );
    let tokens = follow(
        Api::namespaced(client.clone(), namespace),
        WatchConfig::default().fields(&format!("type={BOOTSTRAP_SECRET_TYPE}")),
        drop_managed,
        |_| {},
    );
    let leases = follow(
        Api::namespaced(client.clone(), namespace),
        WatchConfig::default(),
        drop_managed,
        |_| {},
    );
    scripts.wait_until_ready().await?;
    tasks.wait_until_ready().await?;
    workflows.wait_until_ready().await?;
    plans.wait_until_ready().await?;
    jobs.wait_until_ready().await?;
    agents.wait_until_ready().await?;
    namespaces.wait_until_ready().await?;
    credentials.wait_until_ready().await?;
    tokens.wait_until_ready().await?;
    leases.wait_until_ready().await?;
    Ok(Arc::new(Caches {
        scripts,
        tasks,
        workflows,
        plans,
        jobs,
        agents,
        namespaces,
        credentials,
        tokens,
        leases,
        fanouts,
        job_signals,
    }))
}

/// A cache of `api` filled by a watch in the background: each object projected by
/// `project`, then handed to `changed` once the cache has it.
fn follow<K>(
    api: Api<K>,
    config: WatchConfig,
    project: impl FnMut(&mut K) + Send + 'static,
    changed: impl Fn(K) + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .modify(project)
        .reflect(writer)
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(object) => changed(object),
                Err(err) => tracing::debug!(kind = %K::kind(&()), error = %err, "watch error"),
            }
        }
    });
    store
}

fn drop_managed<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

fn keep_labels_only(namespace: &mut Namespace) {
    let labels = namespace.metadata.labels.take();
    let name = namespace.metadata.name.take();
    let version = namespace.metadata.resource_version.take();
    *namespace = Namespace::default();
    namespace.metadata.name = name;
    namespace.metadata.labels = labels;
    namespace.metadata.resource_version = version;
}

/// Only the name and the credential's hash: nothing else of a credential is read.
fn keep_credential_hash(secret: &mut Secret) {
    let hash = secret
        .data
        .as_mut()
        .and_then(|data| data.remove(CREDENTIAL_HASH_KEY));
    let meta = std::mem::take(&mut secret.metadata);
    *secret = Secret::default();
    secret.metadata.name = meta.name;
    secret.metadata.namespace = meta.namespace;
    secret.metadata.resource_version = meta.resource_version;
    secret.type_ = Some(CREDENTIAL_SECRET_TYPE.into());
    if let Some(hash) = hash {
        secret.data = Some([(CREDENTIAL_HASH_KEY.to_string(), hash)].into());
    }
}

/// Writers of every cache, for tests that fill the caches directly.
#[cfg(test)]
#[derive(Default)]
pub struct TestWriters {
    pub scripts: reflector::store::Writer<Script>,
    pub tasks: reflector::store::Writer<Task>,
    pub workflows: reflector::store::Writer<Workflow>,
    pub plans: reflector::store::Writer<RemediationPlan>,
    pub jobs: reflector::store::Writer<PatchJob>,
    pub agents: reflector::store::Writer<Agent>,
    pub namespaces: reflector::store::Writer<Namespace>,
    pub credentials: reflector::store::Writer<Secret>,
    pub tokens: reflector::store::Writer<Secret>,
    pub leases: reflector::store::Writer<Lease>,
}

#[cfg(test)]
impl Caches {
    /// Empty caches and their writers.
    pub fn for_tests() -> (Arc<Self>, TestWriters) {
        let writers = TestWriters::default();
        let caches = Arc::new(Self {
            scripts: writers.scripts.as_reader(),
            tasks: writers.tasks.as_reader(),
            workflows: writers.workflows.as_reader(),
            plans: writers.plans.as_reader(),
            jobs: writers.jobs.as_reader(),
            agents: writers.agents.as_reader(),
            namespaces: writers.namespaces.as_reader(),
            credentials: writers.credentials.as_reader(),
            tokens: writers.tokens.as_reader(),
            leases: writers.leases.as_reader(),
            fanouts: Arc::new(Fanouts::new()),
            job_signals: Arc::default(),
        });
        (caches, writers)
    }
}
