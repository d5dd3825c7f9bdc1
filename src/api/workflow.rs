//! `Workflow`: the ordered pre- and post-patching Tasks for one operating system,
//! and what happens when one of them fails.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::{OperatingSystem, TaskRef};

/// One step of a workflow.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStep {
    pub task_ref: TaskRef,
}

/// What a failed pre-patching task does to the rest of the job.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PreFailurePolicy {
    /// Stop the remaining pre tasks and skip patching.
    #[default]
    AbortPatching,
    /// Run the remaining pre tasks and patch anyway.
    Continue,
}

/// What a failed post-patching task does to the rest of the job.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum PostFailurePolicy {
    /// Stop the remaining post tasks.
    #[default]
    StopRemaining,
    /// Run the remaining post tasks.
    Continue,
}

fn default_true() -> bool {
    true
}

/// Failure handling. The defaults stop early (a pre failure skips patching); set both
/// to `Continue` for "every action runs and patches are always attempted".
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    #[serde(default)]
    pub pre: PreFailurePolicy,
    #[serde(default)]
    pub post: PostFailurePolicy,
    /// Run post tasks even when patching failed or was skipped.
    #[serde(default = "default_true")]
    pub run_post_tasks_after_patch_failure: bool,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self {
            pre: PreFailurePolicy::default(),
            post: PostFailurePolicy::default(),
            run_post_tasks_after_patch_failure: true,
        }
    }
}

fleetpatch_kind! {
    /// Ordered pre- and post-patching tasks for one operating system.
    #[kube(
        kind = "Workflow",
        namespaced,
        status = "WorkflowStatus",
        shortname = "fpwf",
        doc = "Ordered pre- and post-patching Tasks for one operating system.",
        printcolumn(name = "OS", type_ = "string", json_path = ".spec.os"),
        printcolumn(name = "Default", type_ = "boolean", json_path = ".spec.default"),
        printcolumn(
            name = "Ready",
            type_ = "string",
            json_path = ".status.conditions[?(@.type==\"Ready\")].status"
        ),
        printcolumn(
            name = "Plans",
            type_ = "integer",
            json_path = ".status.activePlans",
            description = "plans using this workflow"
        ),
        printcolumn(
            name = "Pre",
            type_ = "string",
            json_path = ".spec.preTasks[*].taskRef.name",
            priority = 1
        ),
        printcolumn(
            name = "Post",
            type_ = "string",
            json_path = ".spec.postTasks[*].taskRef.name",
            priority = 1
        ),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )]
    pub struct WorkflowSpec {
        pub os: OperatingSystem,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 1024))]
        pub description: Option<String>,
        /// Used for hosts of this OS when a plan target names no workflow. At most one per OS and namespace.
        #[serde(default)]
        pub default: bool,
        /// Tasks run before patching, in order (at most 5).
        #[serde(default)]
        #[schemars(length(max = 64))]
        #[x_kube(validation = Rule::new("size(self) <= 5").message("a workflow may have at most 5 pre-patching tasks"))]
        pub pre_tasks: Vec<WorkflowStep>,
        /// Tasks run after patching, in order (at most 5).
        #[serde(default)]
        #[schemars(length(max = 64))]
        #[x_kube(validation = Rule::new("size(self) <= 5").message("a workflow may have at most 5 post-patching tasks"))]
        pub post_tasks: Vec<WorkflowStep>,
        #[serde(default)]
        pub failure_policy: FailurePolicy,
    }
}

/// Observed state of a Workflow.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Number of RemediationPlans that use this workflow, directly or as the OS default.
    #[serde(default)]
    pub active_plans: i32,
    /// The OS this workflow is the effective default for, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_for: Option<OperatingSystem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
