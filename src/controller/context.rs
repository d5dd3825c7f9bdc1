//! What every reconciler shares: the client, the caches, the Event queue, settings,
//! and the errors a reconcile can end with.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::json;

use crate::api::rules::{Catalog, Limits};
use crate::gateway::Gateway;
use crate::gateway::jobs::JobSigner;

use super::caches::Caches;
use super::metrics::Metrics;
use crate::api_errors;

/// Controller settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The controller's namespace: built-in library, Secrets, Leases.
    pub namespace: String,
    pub limits: Limits,
    /// Finished PatchJobs are deleted this long after they finish (once their run ended).
    pub job_ttl: Duration,
    /// An Agent without a heartbeat for this long is not Ready.
    pub heartbeat_timeout: Duration,
    /// Default deadline of a job when the plan sets none.
    pub default_job_deadline: Duration,
    /// Most cluster nodes rebooting at once, whatever plans they belong to.
    pub max_node_reboots: usize,
    /// Most reconciles of one kind in flight at once.
    pub workers: u16,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub caches: Arc<Caches>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub gateway: Arc<Gateway>,
    /// Signs the PatchJobs the controller makes; the gateway serves no other.
    pub signer: JobSigner,
    /// A client that does not retry `429`: for evictions, where a 429 is the answer
    /// (a PodDisruptionBudget forbids it now), not a hiccup.
    pub eviction_client: Client,
    /// Held while a node is claimed for a drain, so the reboot limits hold.
    pub drain_lock: tokio::sync::Mutex<()>,
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Short label for Events and metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube(err) if api_errors::is_throttled(err) => "Throttled",
            Self::Kube(err) if api_errors::is_conflict(err) => "Conflict",
            Self::Kube(_) => "ApiError",
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
    pub async fn apply_status<K, S>(&self, object: &K, status: &S) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        S: Serialize,
    {
        self.apply_status_over(object, status, None).await
    }

    /// Like [`Self::apply_status`], but only over `resource_version` (409 otherwise),
    /// for writes that must not land on a state they did not see.
    pub async fn apply_status_over<K, S>(
        &self,
        object: &K,
        status: &S,
        resource_version: Option<String>,
    ) -> Result<(), Error>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
        S: Serialize,
    {
        let resource = kube::api::ApiResource::erase::<K>(&());
        let api: Api<kube::api::DynamicObject> = match object.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let mut metadata = json!({"name": object.name_any()});
        if let Some(version) = resource_version {
            metadata["resourceVersion"] = json!(version);
        }
        let body = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "metadata": metadata, "status": status});
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(crate::field_manager::CONTROLLER).force(),
            &Patch::Apply(&body),
        )
        .await?;
        self.metrics.status_write(K::kind(&()).as_ref());
        Ok(())
    }

    /// Queues an Event on `object` without waiting (see `crate::events`: one task
    /// records them, within a budget per object; its note is cut to the API's 1 KiB).
    pub fn event<K: Resource<DynamicType = ()>>(
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
            note: Some(crate::gateway::story::bounded_note(note)),
            action: action.into(),
            secondary: None,
        };
        self.gateway.events.send(object.object_ref(&()), event);
    }
}
