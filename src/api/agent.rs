//! `Agent`: one host — a cluster node served by the node agent DaemonSet, or an
//! external host whose agent registered itself.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
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

fleetpatch_kind! {
    /// One host in the fleet.
    #[kube(
        kind = "Agent",
        status = "AgentStatus",
        shortname = "fpagent",
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
    pub struct AgentSpec {
        pub mode: AgentMode,
        pub os: OperatingSystem,
        /// The cluster node this agent runs on (mode Node).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 253))]
        pub node_name: Option<String>,
        /// A paused agent receives no new jobs, and the job it runs is cancelled.
        #[serde(default)]
        pub paused: bool,
        /// The namespaces whose RemediationPlans may target this host. Set by the bootstrap
        /// token the host registered with, or by the controller for node agents; changed by
        /// cluster admins only (plan authors have no access to Agents).
        #[serde(default)]
        pub allowed_plans: AllowedPlans,
    }
}

#[cfg(all(test, feature = "full"))]
impl Agent {
    /// The Agent tests start from: an external Linux host, not paused, open to the
    /// controller namespace's plans only (the default).
    pub(crate) fn external_linux(name: &str) -> Self {
        Agent::new(
            name,
            AgentSpec {
                mode: AgentMode::External,
                os: OperatingSystem::Linux,
                node_name: None,
                paused: false,
                allowed_plans: Default::default(),
            },
        )
    }
}

/// Who may target a host, in the spirit of Gateway API's `allowedRoutes`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AllowedPlans {
    #[serde(default)]
    pub namespaces: PlanNamespaces,
}

/// The namespaces plans may come from.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.from == 'Selector' ? has(self.selector) : !has(self.selector)")
        .message("selector is required when from is Selector, and only then").field_path(".selector"),
)]
pub struct PlanNamespaces {
    #[serde(default)]
    pub from: NamespacesFrom,
    /// Namespace label selector (with `from: Selector`); the automatic label
    /// `kubernetes.io/metadata.name` selects namespaces by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
}

/// Where plans that may target a host live.
#[derive(
    Serialize, Deserialize, schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum NamespacesFrom {
    /// Only the controller's own namespace (the default).
    #[default]
    Controller,
    /// Every namespace.
    All,
    /// Namespaces whose labels match `selector`.
    Selector,
}

impl AllowedPlans {
    /// Every namespace.
    pub fn all() -> Self {
        Self {
            namespaces: PlanNamespaces {
                from: NamespacesFrom::All,
                selector: None,
            },
        }
    }

    /// The namespaces named (by their `kubernetes.io/metadata.name` label).
    pub fn named<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            LabelSelector, LabelSelectorRequirement,
        };
        Self {
            namespaces: PlanNamespaces {
                from: NamespacesFrom::Selector,
                selector: Some(LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: NAMESPACE_NAME_LABEL.into(),
                        operator: "In".into(),
                        values: Some(names.into_iter().map(str::to_string).collect()),
                    }]),
                    match_labels: None,
                }),
            },
        }
    }

    /// Parses the short form bootstrap tokens and controller flags use: empty for the
    /// controller's namespace only, `*` for all, else comma-separated namespace names.
    pub fn parse_names(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        if text == "*" {
            return Ok(Self::all());
        }
        let names: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        if let Some(bad) = names.iter().find(|n| !crate::manifests::is_dns_label(n)) {
            return Err(format!("{bad:?} is not a namespace name"));
        }
        Ok(Self::named(names))
    }

    /// Whether a plan in `namespace` (with `labels`, when known) may target the host.
    /// `controller_namespace` is the controller's own. An invalid selector admits nothing.
    pub fn admits(
        &self,
        namespace: &str,
        labels: Option<&std::collections::BTreeMap<String, String>>,
        controller_namespace: &str,
    ) -> bool {
        use kube::core::{Selector, SelectorExt};
        match self.namespaces.from {
            NamespacesFrom::All => true,
            NamespacesFrom::Controller => namespace == controller_namespace,
            NamespacesFrom::Selector => {
                let Some(selector) = self
                    .namespaces
                    .selector
                    .clone()
                    .and_then(|s| Selector::try_from(s).ok())
                else {
                    return false;
                };
                // Every namespace carries its name as a label; known labels add the rest.
                let mut all = labels.cloned().unwrap_or_default();
                all.insert(NAMESPACE_NAME_LABEL.into(), namespace.into());
                selector.matches(&all)
            }
        }
    }

    /// In words, for messages.
    pub fn describe(&self) -> String {
        match self.namespaces.from {
            NamespacesFrom::All => "plans from every namespace".into(),
            NamespacesFrom::Controller => "plans from the controller's namespace only".into(),
            NamespacesFrom::Selector => "plans from namespaces matching its selector".into(),
        }
    }
}

/// Longest agent name: agent names are label values (on PatchJobs and credentials).
pub const AGENT_NAME_MAX: usize = 63;

/// What is wrong with `name` as an agent's name, if anything: it must be an object name
/// (lower-case DNS subdomain) and fit in a label value.
pub fn agent_name_problem(name: &str) -> Option<String> {
    if name.len() > AGENT_NAME_MAX {
        return Some(format!(
            "agent name is {} characters long; at most {AGENT_NAME_MAX} are allowed",
            name.len()
        ));
    }
    if !crate::manifests::is_dns_subdomain(name) {
        return Some(format!(
            "agent name {name:?} must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
        ));
    }
    None
}

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

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
    /// The controller replica whose gateway the agent is connected to (its pod name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
