//! Vocabulary shared by every kind: object references, operating systems, limits,
//! and the schema helpers that put Kubernetes-specific markers into generated CRDs.

use kube::core::cel::Rule;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// A namespaced kind with a static type, as typed `kube::Api` calls read and write
/// it: ours, and the built-in ones the controller copies or applies.
pub trait NamespacedKind:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> NamespacedKind for K where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug
{
}

/// API group of every fleetpatch kind.
pub const API_GROUP: &str = "fleetpatch.io";
/// The one served and stored version.
pub const API_VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in manifests.
pub const GROUP_VERSION: &str = "fleetpatch.io/v1alpha1";
/// Label carried by the read-only built-in Scripts, Tasks and Workflows.
pub const BUILTIN_LABEL: &str = "fleetpatch.io/builtin";
/// Annotation that asks for a run of a plan now; any new value starts one.
pub const RUN_REQUESTED_ANNOTATION: &str = "fleetpatch.io/run-requested";
/// On a PatchJob: the controller's answer to a node agent that wants to reboot,
/// `Approved` (the node is drained) or `Denied`.
pub const REBOOT_DECISION_ANNOTATION: &str = "fleetpatch.io/reboot-decision";
/// On a PatchJob: why the reboot waits or was denied, in words.
pub const REBOOT_MESSAGE_ANNOTATION: &str = "fleetpatch.io/reboot-message";
/// Finalizer on PatchJobs: a deleted job stays (counted by its run) until the run ended,
/// so the run never makes a second job for the same host.
pub const RUN_FINALIZER: &str = "fleetpatch.io/run";
/// Labels on PatchJobs naming their plan, run and agent.
pub const PLAN_LABEL: &str = "fleetpatch.io/plan";
pub const RUN_LABEL: &str = "fleetpatch.io/run";
pub const AGENT_LABEL: &str = "fleetpatch.io/agent";

/// Category every kind is listed under, so `kubectl get fleetpatch` shows them all.
pub const CATEGORY: &str = "fleetpatch";

/// Longest script body accepted, in characters and in bytes of UTF-8 (both hold, as in
/// Qualys: 20 KB and 20,480 characters). Longer scripts are rejected, never truncated.
/// The CRD's rules spell the number out; a test checks they agree.
pub const SCRIPT_CONTENT_MAX: usize = 20480;
/// Longest an action may run before it is killed and the next action starts.
pub const ACTION_TIMEOUT_MAX_MINUTES: u32 = 180;
/// Default limit of pre-patching and of post-patching tasks per workflow.
pub const WORKFLOW_TASKS_MAX: usize = 5;

/// Operating system family a Task, Workflow, plan target or Agent is for.
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum OperatingSystem {
    Windows,
    Linux,
}

impl OperatingSystem {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Windows => "Windows",
            Self::Linux => "Linux",
        }
    }
}

impl std::fmt::Display for OperatingSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reference to another fleetpatch object by name. Without a namespace it means the
/// referring object's own namespace; another namespace is allowed only for the
/// built-in library namespace (checked by the cross-object rules).
#[derive(
    Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct ObjectRef {
    /// Name of the referenced object.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Namespace of the referenced object; only the built-in library namespace may be named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: Option<String>,
}

impl ObjectRef {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: None,
        }
    }

    /// The namespace this reference points into, given the referrer's namespace.
    pub fn namespace_or<'a>(&'a self, referrer_namespace: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(referrer_namespace)
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// Reference to a Script.
pub type ScriptRef = ObjectRef;
/// Reference to a Task.
pub type TaskRef = ObjectRef;
/// Reference to a Workflow.
pub type WorkflowRef = ObjectRef;

/// Schema for a string holding an environment-variable style name, used for script
/// parameters: they reach scripts as environment variables, never spliced into code.
pub fn parameter_name_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = String::json_schema(generator);
    let object = schema.ensure_object();
    object.insert("minLength".into(), 1.into());
    object.insert("maxLength".into(), 64.into());
    object.insert("pattern".into(), r"^[A-Za-z_][A-Za-z0-9_]*$".into());
    schema
}

/// Adds CEL rules to a schema. Panics only if a rule cannot be serialized, which is a
/// programming error caught by the CRD generation test.
pub(crate) fn with_rules(mut schema: Schema, rules: impl IntoIterator<Item = Rule>) -> Schema {
    for rule in rules {
        kube::core::validate(&mut schema, rule).expect("CEL rule serializes");
    }
    schema
}

/// The seed rules for a Windows registry key path, shared by ChangeRegistryKey and
/// UninstallSoftware.
pub fn registry_key_path_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = String::json_schema(generator);
    schema
        .ensure_object()
        .insert("maxLength".into(), 1024.into());
    with_rules(
        schema,
        [
            Rule::new(
                r"self.matches('^(HKEY_CURRENT_USER|HKEY_USERS|HKEY_LOCAL_MACHINE|HKEY_CLASSES_ROOT|HKEY_CURRENT_CONFIG)(\\\\|$)')",
            )
            .message(
                "must start with HKEY_CURRENT_USER, HKEY_USERS, HKEY_LOCAL_MACHINE, HKEY_CLASSES_ROOT or HKEY_CURRENT_CONFIG",
            ),
            Rule::new("!self.contains('/')").message(r"must not contain a forward slash; separate keys with \"),
            Rule::new(r"!self.endsWith('\\')").message(r"must not end with a backslash (\)"),
            Rule::new(r"self.matches('^[^\\\\]+\\\\[^\\\\]+')")
                .message(r"must name at least one subkey after the root, e.g. HKEY_LOCAL_MACHINE\SOFTWARE\Vendor"),
        ],
    )
}
