//! The `fleetpatch.io/v1alpha1` API: one file per kind, the shared vocabulary in
//! [`common`], and the offline validation that runs without a cluster.
//!
//! Nothing here talks to an API server. The controller, the gateway, the agent and the
//! dev server all speak these types.

// kube's `printcolumn(...)` repeats keys like `type_ = "string"`, which clippy
// mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

/// Declares the spec of a fleetpatch kind with what every kind shares: the derives,
/// the API group and version, the `fleetpatch` category, CEL rules and camelCase
/// fields. Each declaration then says only what is its own: kind, scope, status,
/// short name, columns and rules.
macro_rules! fleetpatch_kind {
    ($(#[$attr:meta])* pub struct $spec:ident $body:tt) => {
        #[derive(
            kube::CustomResource,
            kube::KubeSchema,
            serde::Serialize,
            serde::Deserialize,
            Clone,
            Debug,
            PartialEq,
        )]
        #[kube(group = "fleetpatch.io", version = "v1alpha1", category = "fleetpatch", cel)]
        #[serde(rename_all = "camelCase")]
        $(#[$attr])*
        pub struct $spec $body
    };
}

pub mod agent;
pub mod common;
pub mod conditions;
pub mod library;
pub mod patchjob;
pub mod plan;
pub mod resolve;
pub mod rules;
pub mod schedule;
pub mod script;
pub mod syntax;
pub mod task;
pub mod workflow;

pub use agent::{Agent, AgentMode, AgentSpec, AgentStatus};
pub use common::{
    ACTION_TIMEOUT_MAX_MINUTES, API_GROUP, API_VERSION, BUILTIN_LABEL, OperatingSystem, ScriptRef,
    TaskRef, WorkflowRef,
};
pub use patchjob::{PatchJob, PatchJobSpec, PatchJobStatus};
pub use plan::{RemediationPlan, RemediationPlanSpec, RemediationPlanStatus};
pub use script::{Script, ScriptCategory, ScriptLanguage, ScriptSpec, ScriptStatus};
pub use task::{Task, TaskSpec, TaskStatus, TaskType};
pub use workflow::{Workflow, WorkflowSpec, WorkflowStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CustomResourceDefinition this operator owns, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        Script::crd(),
        Task::crd(),
        Workflow::crd(),
        RemediationPlan::crd(),
        PatchJob::crd(),
        Agent::crd(),
    ]
}
