//! `Agent`: one host — a cluster node served by the node agent DaemonSet, or an
//! external host whose agent registered itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::OperatingSystem;

/// How the host is reached.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentMode {
    /// A cluster node, served by the node agent DaemonSet.
    Node,
    /// A host outside the cluster that registered with a bootstrap token.
    External,
}

/// One host in the fleet.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fleetpatch.io",
    version = "v1alpha1",
    kind = "Agent",
    status = "AgentStatus",
    shortname = "fpagent",
    category = "fleetpatch",
    cel,
    doc = "One host in the fleet: a cluster node or an external host.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "OS", type_ = "string", json_path = ".spec.os"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Paused", type_ = "boolean", json_path = ".spec.paused"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version"),
    printcolumn(name = "Job", type_ = "string", json_path = ".status.currentJob"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.mode != 'Node' || has(self.nodeName)")
        .message("nodeName is required when mode is Node").field_path(".nodeName"),
    validation = Rule::new("self.mode == oldSelf.mode").message("mode is immutable").field_path(".mode"),
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    pub mode: AgentMode,
    pub os: OperatingSystem,
    /// The cluster node this agent runs on (mode Node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
    /// A paused agent receives no new jobs.
    #[serde(default)]
    pub paused: bool,
}

/// Operating system details reported by the agent.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    /// Distribution or product, e.g. `debian`, `Windows Server 2022`.
    pub name: String,
    #[serde(default)]
    pub version: String,
    /// CPU architecture, e.g. `x86_64`, `aarch64`.
    #[serde(default)]
    pub arch: String,
    /// Package manager the agent patches with: apt, dnf, yum, zypper or windows-update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patcher: Option<String>,
}

/// Pending updates last seen on the host.
#[derive(Serialize, Deserialize, schemars::JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateInventory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    pub available: i32,
    pub security: i32,
    pub reboot_required: bool,
}

/// Observed state of an Agent.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// Agent software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdateInventory>,
    /// PatchJob the agent is working on, as namespace/name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_job: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
