//! What every reconciler shares: the client, the caches, the event recorder, settings,
//! and the errors a reconcile can end with.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::api::rules::{Catalog, Limits};
use crate::api::{Agent, PatchJob, RemediationPlan, Script, Task, Workflow};
use crate::gateway::server::{Gateway, Heartbeats};

use super::metrics::Metrics;

/// Field manager of the controller's writes.
pub const FIELD_MANAGER: &str = "fleetpatch.io/controller";

/// Controller settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The controller's namespace: built-in library, Secrets, Lease.
    pub namespace: String,
    pub limits: Limits,
    /// Finished PatchJobs are deleted this long after they finish.
    pub job_ttl: Duration,
    /// An Agent without a heartbeat for this long is not Ready.
    pub heartbeat_timeout: Duration,
    /// Default deadline of a job when the plan sets none.
    pub default_job_deadline: Duration,
}

/// The read caches the reconcilers use.
#[derive(Clone)]
pub struct Caches {
    pub scripts: Store<Script>,
    pub tasks: Store<Task>,
    pub workflows: Store<Workflow>,
    pub plans: Store<RemediationPlan>,
    pub jobs: Store<PatchJob>,
    pub agents: Store<Agent>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub caches: Caches,
    pub recorder: Recorder,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub heartbeats: Heartbeats,
    pub gateway: Arc<Gateway>,
    /// A client that does not retry `429`: for evictions, where a 429 is the answer
    /// (a PodDisruptionBudget forbids it now), not a hiccup.
    pub eviction_client: Client,
    /// Held while a node is claimed for a drain, so `maxConcurrentNodes` holds.
    pub drain_lock: tokio::sync::Mutex<()>,
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Short label for Events and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(status)) if status.code == 429 => "Throttled",
            Self::Kube(kube::Error::Api(status)) if status.code == 409 => "Conflict",
            Self::Kube(_) => "ApiError",
            Self::Invalid(_) => "InvalidSpec",
        }
    }
}

impl Context {
    /// The Scripts, Tasks, Workflows and plans the rules look at, as cached now.
    pub fn catalog(&self) -> Catalog {
        let mut catalog = Catalog::new(self.settings.namespace.clone());
        catalog.limits = self.settings.limits.clone();
        for script in self.caches.scripts.state() {
            catalog.add_script((*script).clone());
        }
        for task in self.caches.tasks.state() {
            catalog.add_task((*task).clone());
        }
        for workflow in self.caches.workflows.state() {
            catalog.add_workflow((*workflow).clone());
        }
        for plan in self.caches.plans.state() {
            catalog.add_plan((*plan).clone());
        }
        catalog
    }

    /// Writes `status` with server-side apply under the controller's field manager.
    pub async fn apply_status<K>(&self, object: &K, status: serde_json::Value) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let resource = kube::api::ApiResource::erase::<K>(&());
        let api: Api<kube::api::DynamicObject> = match object.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "metadata": {"name": object.name_any()}, "status": status});
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        self.metrics.status_write(K::kind(&()).as_ref());
        Ok(())
    }

    /// Records an Event on `object`; failures to record are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %err, reason, "cannot record event");
        }
    }
}
