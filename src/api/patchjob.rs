//! `PatchJob`: one host, one run. The spec is a frozen snapshot of everything the agent
//! needs (script bodies and their SHA-256 inline); the status is the job's progress.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

use super::common::{ObjectRef, OperatingSystem};
use super::plan::{PatchSelection, RebootPolicy};
use super::script::ScriptLanguage;
use super::task::{ChangeRegistryKey, DownloadSource, Reboot, TaskType, UninstallSoftware};
use super::workflow::FailurePolicy;

/// A script as the agent receives it: the body, its hash and where it came from.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedScript {
    /// The Script object this body was copied from.
    pub source: ObjectRef,
    pub language: ScriptLanguage,
    pub content: String,
    /// Lower-case hex SHA-256 of `content`; the agent refuses to run a body that does not match.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// A Task resolved for one job: the task's settings with its scripts inlined and its
/// parameters merged with the scripts' defaults.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedAction {
    /// Name of the action (the Task's name).
    pub name: String,
    /// The Task this action was resolved from.
    pub task: ObjectRef,
    #[serde(rename = "type")]
    pub action_type: TaskType,
    pub timeout_minutes: u32,
    pub success_exit_codes: Vec<i32>,
    /// Environment passed to the scripts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub bypass_execution_policy: bool,
    /// The script of a RunScript action, or the install script of an InstallSoftware action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<ResolvedScript>,
    /// The detection script of an InstallSoftware action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection_script: Option<ResolvedScript>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<ResolvedDownload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_registry_key: Option<ChangeRegistryKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uninstall_software: Option<UninstallSoftware>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<Reboot>,
    /// The Task's limits, in bytes and cgroup weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResolvedLimits>,
}

/// What an action's processes may use together.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

/// The installer an InstallSoftware action downloads and verifies.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedDownload {
    pub source: DownloadSource,
    pub sha256: String,
    pub file_name: String,
}

fleetpatch_kind! {
    /// One host, one run: the frozen snapshot the agent executes.
    #[kube(
        kind = "PatchJob",
        namespaced,
        status = "PatchJobStatus",
        shortname = "pj",
        doc = "One host, one run: a frozen snapshot of the resolved workflow and its progress.",
        printcolumn(name = "Plan", type_ = "string", json_path = ".spec.plan"),
        printcolumn(name = "Agent", type_ = "string", json_path = ".spec.agent"),
        printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
        printcolumn(
            name = "Actions",
            type_ = "string",
            json_path = ".status.progress",
            description = "actions done/total"
        ),
        printcolumn(
            name = "Reboot",
            type_ = "string",
            json_path = ".status.reboot.state",
            priority = 1
        ),
        printcolumn(name = "Run", type_ = "string", json_path = ".spec.run", priority = 1),
        printcolumn(
            name = "Age",
            type_ = "date",
            json_path = ".metadata.creationTimestamp"
        )
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("PatchJob spec is immutable; delete the job and run the plan again"))]
    pub struct PatchJobSpec {
        /// Name of the Agent (host) that runs this job.
        #[schemars(length(min = 1, max = 253))]
        pub agent: String,
        /// RemediationPlan the job belongs to; empty for jobs run locally with `fleetpatch agent exec`.
        #[serde(default)]
        #[schemars(length(max = 253))]
        pub plan: String,
        /// Run identifier within the plan.
        #[serde(default)]
        #[schemars(length(max = 63))]
        pub run: String,
        pub os: OperatingSystem,
        /// Workflow the actions were resolved from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub workflow: Option<ObjectRef>,
        #[serde(default)]
        #[schemars(length(max = 5))]
        pub pre_actions: Vec<ResolvedAction>,
        #[serde(default)]
        #[schemars(length(max = 5))]
        pub post_actions: Vec<ResolvedAction>,
        #[serde(default)]
        pub failure_policy: FailurePolicy,
        #[serde(default)]
        pub patches: PatchSelection,
        #[serde(default)]
        pub reboot: RebootPolicy,
        /// The job ends as Unknown if it has not finished by then.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deadline: Option<Time>,
        /// The cluster node the job runs on (node agents only). Before such a host reboots,
        /// the controller cordons and drains the node, and uncordons it afterwards.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 253))]
        pub node: Option<String>,
    }
}

#[cfg(test)]
impl PatchJobSpec {
    /// A Linux job for `agent` of `plan`'s `run` with no actions and every policy at
    /// its default: the spec tests start from.
    pub(crate) fn bare(agent: &str, plan: &str, run: &str) -> Self {
        Self {
            agent: agent.into(),
            plan: plan.into(),
            run: run.into(),
            os: OperatingSystem::Linux,
            workflow: None,
            pre_actions: vec![],
            post_actions: vec![],
            failure_policy: Default::default(),
            patches: Default::default(),
            reboot: Default::default(),
            deadline: None,
            node: None,
        }
    }
}

/// Where a job stands.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum JobPhase {
    #[default]
    Pending,
    Running,
    Rebooting,
    Succeeded,
    Failed,
    /// The agent stopped reporting before the deadline; the outcome is not known.
    Unknown,
}

impl JobPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Unknown)
    }
}

/// Outcome of one action.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
pub enum ActionPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not needed: the detection script said so.
    Skipped,
    /// Killed after its timeout.
    TimedOut,
    /// The agent died while it ran; it is not run again.
    Interrupted,
    /// Not run because an earlier failure stopped the phase.
    NotRun,
}

impl ActionPhase {
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ActionResult {
    pub name: String,
    pub phase: ActionPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The action asked for a reboot (exit code 10 or 11).
    #[serde(default)]
    pub reboot_requested: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<Time>,
    /// The last lines of the action's output, or why it did not run.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PatchOutcome {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the patch step did.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PatchResults {
    pub phase: ActionPhase,
    /// Patcher used: apt, dnf, yum, zypper or windows-update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patcher: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub installed: Vec<PatchOutcome>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<PatchOutcome>,
    #[serde(default)]
    pub reboot_required: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// State of the job's single reboot.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum RebootState {
    #[default]
    NotRequired,
    /// Required, but the reboot policy is Never.
    RequiredNotPerformed,
    Pending,
    InProgress,
    Completed,
}

#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RebootRecord {
    pub state: RebootState,
    /// What asked for the reboot: an action name, `patches`, or `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Why a reboot that was attempted did not happen (a drain that timed out, a
    /// reboot command that failed); the job then fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Progress and results of a PatchJob.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PatchJobStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: JobPhase,
    /// Actions finished / actions total, e.g. `3/6`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_actions: Vec<ActionResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patches: Option<PatchResults>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_actions: Vec<ActionResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot: Option<RebootRecord>,
    /// Highest progress report sequence number applied; reports at or below it are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sequence: Option<i64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
