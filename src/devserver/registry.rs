//! The resource kinds the dev server serves: a fixed set of built-in kinds
//! (schemaless: stored as sent) and the kinds every stored CustomResourceDefinition
//! declares, with their compiled schemas and printer columns. Looked up by
//! group/version/plural for routing and by group/kind for discovery and OpenAPI.

use std::sync::Arc;

use parking_lot::RwLock;

use kube::core::cel::CompiledSchema;
use serde_json::Value;

/// A CRD version's schema, parsed and with its CEL rules compiled once.
pub struct Schema {
    pub json: Value,
    pub compiled: CompiledSchema,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug)]
pub struct PrinterColumn {
    pub name: String,
    pub type_: String,
    pub format: String,
    pub description: String,
    pub priority: i64,
    pub json_path: String,
}

/// One served resource at one version.
#[derive(Clone, Debug)]
pub struct ResourceKind {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub verbs: Vec<&'static str>,
    pub status_subresource: bool,
    /// Subresources other than status, e.g. `eviction` on pods, `token` on serviceaccounts.
    pub extra_subresources: Vec<(&'static str, &'static str)>,
    pub schema: Option<Arc<Schema>>,
    pub printer_columns: Vec<PrinterColumn>,
    /// Defined by a CRD (true) or built in.
    pub custom: bool,
}

impl ResourceKind {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Where the objects live in the store: shared by every version of a resource.
    pub fn storage_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// True for kinds only ever created and answered, never stored (TokenReview).
    pub fn is_virtual(&self) -> bool {
        self.verbs == ["create"]
    }
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

struct Builtin {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
}

/// The RBAC group, four of whose kinds the dev server serves.
const RBAC: &str = "rbac.authorization.k8s.io";

/// Kind `kind` (resource `plural`) of `group`/`version`.
const fn builtin(
    kind: &'static str,
    plural: &'static str,
    group: &'static str,
    version: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
    status: bool,
) -> Builtin {
    Builtin {
        group,
        version,
        kind,
        plural,
        namespaced,
        short_names,
        categories: &[],
        status,
    }
}

const BUILTINS: &[Builtin] = &[
    builtin("Namespace", "namespaces", "", "v1", false, &["ns"], true),
    builtin("Secret", "secrets", "", "v1", true, &[], false),
    builtin("ConfigMap", "configmaps", "", "v1", true, &["cm"], false),
    builtin(
        "ServiceAccount",
        "serviceaccounts",
        "",
        "v1",
        true,
        &["sa"],
        false,
    ),
    builtin("Event", "events", "", "v1", true, &["ev"], false),
    builtin("Node", "nodes", "", "v1", false, &["no"], true),
    Builtin {
        categories: &["all"],
        ..builtin("Pod", "pods", "", "v1", true, &["po"], true)
    },
    Builtin {
        categories: &["all"],
        ..builtin("Service", "services", "", "v1", true, &["svc"], true)
    },
    builtin("Endpoints", "endpoints", "", "v1", true, &["ep"], false),
    builtin(
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "",
        "v1",
        true,
        &["pvc"],
        true,
    ),
    builtin(
        "Event",
        "events",
        "events.k8s.io",
        "v1",
        true,
        &["ev"],
        false,
    ),
    builtin(
        "Lease",
        "leases",
        "coordination.k8s.io",
        "v1",
        true,
        &[],
        false,
    ),
    Builtin {
        categories: &["all"],
        ..builtin(
            "Deployment",
            "deployments",
            "apps",
            "v1",
            true,
            &["deploy"],
            true,
        )
    },
    Builtin {
        categories: &["all"],
        ..builtin("DaemonSet", "daemonsets", "apps", "v1", true, &["ds"], true)
    },
    Builtin {
        categories: &["all"],
        ..builtin(
            "StatefulSet",
            "statefulsets",
            "apps",
            "v1",
            true,
            &["sts"],
            true,
        )
    },
    Builtin {
        categories: &["all"],
        ..builtin(
            "ReplicaSet",
            "replicasets",
            "apps",
            "v1",
            true,
            &["rs"],
            true,
        )
    },
    Builtin {
        categories: &["all"],
        ..builtin("Job", "jobs", "batch", "v1", true, &[], true)
    },
    Builtin {
        categories: &["all"],
        ..builtin("CronJob", "cronjobs", "batch", "v1", true, &["cj"], true)
    },
    builtin(
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "policy",
        "v1",
        true,
        &["pdb"],
        true,
    ),
    builtin("Role", "roles", RBAC, "v1", true, &[], false),
    builtin("ClusterRole", "clusterroles", RBAC, "v1", false, &[], false),
    builtin("RoleBinding", "rolebindings", RBAC, "v1", true, &[], false),
    builtin(
        "ClusterRoleBinding",
        "clusterrolebindings",
        RBAC,
        "v1",
        false,
        &[],
        false,
    ),
    builtin(
        "CustomResourceDefinition",
        "customresourcedefinitions",
        "apiextensions.k8s.io",
        "v1",
        false,
        &["crd", "crds"],
        true,
    ),
];

fn column(name: &str, type_: &str, json_path: &str, priority: i64) -> PrinterColumn {
    PrinterColumn {
        name: name.into(),
        type_: type_.into(),
        format: String::new(),
        description: String::new(),
        priority,
        json_path: json_path.into(),
    }
}

/// Columns for `kubectl get` of built-in kinds, close to what a cluster prints.
fn builtin_columns(group: &str, plural: &str) -> Vec<PrinterColumn> {
    let age = column("Age", "date", ".metadata.creationTimestamp", 0);
    let mut columns = match (group, plural) {
        ("", "namespaces") => vec![column("Status", "string", ".status.phase", 0)],
        ("", "nodes") => vec![
            column(
                "Status",
                "string",
                ".status.conditions[?(@.type==\"Ready\")].status",
                0,
            ),
            column("Unschedulable", "boolean", ".spec.unschedulable", 1),
        ],
        ("", "pods") => vec![
            column("Status", "string", ".status.phase", 0),
            column("Node", "string", ".spec.nodeName", 1),
        ],
        ("", "secrets") => vec![column("Type", "string", ".type", 0)],
        ("", "services") => vec![
            column("Type", "string", ".spec.type", 0),
            column("Cluster-IP", "string", ".spec.clusterIP", 0),
        ],
        ("", "events") => vec![
            column("Type", "string", ".type", 0),
            column("Reason", "string", ".reason", 0),
            column("Object", "string", ".involvedObject.name", 0),
            column("Message", "string", ".message", 0),
        ],
        ("events.k8s.io", "events") => vec![
            column("Type", "string", ".type", 0),
            column("Reason", "string", ".reason", 0),
            column("Object", "string", ".regarding.name", 0),
            column("Note", "string", ".note", 0),
        ],
        ("coordination.k8s.io", "leases") => {
            vec![column("Holder", "string", ".spec.holderIdentity", 0)]
        }
        ("apps", "deployments" | "statefulsets" | "replicasets") => vec![
            column("Replicas", "integer", ".spec.replicas", 0),
            column("Ready", "integer", ".status.readyReplicas", 0),
        ],
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            vec![column(
                "Created At",
                "string",
                ".metadata.creationTimestamp",
                0,
            )]
        }
        _ => return Vec::new(),
    };
    if plural != "customresourcedefinitions" {
        columns.push(age);
    }
    columns
}

fn builtin_kinds() -> Vec<Arc<ResourceKind>> {
    let mut kinds: Vec<Arc<ResourceKind>> = BUILTINS
        .iter()
        .map(|b| {
            let mut extra = Vec::new();
            if b.plural == "pods" {
                extra.push(("eviction", "Eviction"));
            }
            if b.plural == "serviceaccounts" {
                extra.push(("token", "TokenRequest"));
            }
            Arc::new(ResourceKind {
                group: b.group.into(),
                version: b.version.into(),
                plural: b.plural.into(),
                singular: b.kind.to_lowercase(),
                kind: b.kind.into(),
                namespaced: b.namespaced,
                short_names: b.short_names.iter().map(|s| s.to_string()).collect(),
                categories: b.categories.iter().map(|s| s.to_string()).collect(),
                verbs: ALL_VERBS.to_vec(),
                status_subresource: b.status,
                extra_subresources: extra,
                schema: None,
                printer_columns: builtin_columns(b.group, b.plural),
                custom: false,
            })
        })
        .collect();
    kinds.push(Arc::new(ResourceKind {
        group: "authentication.k8s.io".into(),
        version: "v1".into(),
        plural: "tokenreviews".into(),
        singular: "tokenreview".into(),
        kind: "TokenReview".into(),
        namespaced: false,
        short_names: Vec::new(),
        categories: Vec::new(),
        verbs: vec!["create"],
        status_subresource: false,
        extra_subresources: Vec::new(),
        schema: None,
        printer_columns: Vec::new(),
        custom: false,
    }));
    kinds
}

/// The strings of a JSON list; none when it is not a list.
pub(crate) fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The kinds one CRD serves, one per served version.
pub fn kinds_of_crd(crd: &Value) -> Vec<Arc<ResourceKind>> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let Some(versions) = spec["versions"].as_array() else {
        return Vec::new();
    };
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    versions
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| {
            let schema = v["schema"]["openAPIV3Schema"].as_object().map(|_| {
                let json = v["schema"]["openAPIV3Schema"].clone();
                let compiled = kube::core::cel::compile_schema(&json);
                Arc::new(Schema { json, compiled })
            });
            let printer_columns = v["additionalPrinterColumns"]
                .as_array()
                .map(|cols| {
                    cols.iter()
                        .map(|c| PrinterColumn {
                            name: c["name"].as_str().unwrap_or_default().into(),
                            type_: c["type"].as_str().unwrap_or("string").into(),
                            format: c["format"].as_str().unwrap_or_default().into(),
                            description: c["description"].as_str().unwrap_or_default().into(),
                            priority: c["priority"].as_i64().unwrap_or(0),
                            json_path: c["jsonPath"].as_str().unwrap_or_default().into(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Arc::new(ResourceKind {
                group: spec["group"].as_str().unwrap_or_default().into(),
                version: v["name"].as_str().unwrap_or_default().into(),
                plural: plural.clone(),
                singular: names["singular"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| kind.to_lowercase()),
                kind: kind.clone(),
                namespaced: spec["scope"].as_str() != Some("Cluster"),
                short_names: strings(&names["shortNames"]),
                categories: strings(&names["categories"]),
                verbs: ALL_VERBS.to_vec(),
                status_subresource: v["subresources"]["status"].is_object(),
                extra_subresources: Vec::new(),
                schema,
                printer_columns,
                custom: true,
            })
        })
        .collect()
}

/// All served kinds; replaced wholesale when a CRD changes.
pub struct Registry {
    kinds: RwLock<Arc<Vec<Arc<ResourceKind>>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            kinds: RwLock::new(Arc::new(builtin_kinds())),
        }
    }

    pub fn all(&self) -> Arc<Vec<Arc<ResourceKind>>> {
        self.kinds.read().clone()
    }

    /// Rebuilds the custom kinds from the given CRDs (those not being deleted).
    pub fn set_crds<'a>(&self, crds: impl Iterator<Item = &'a Value>) {
        let mut kinds = builtin_kinds();
        for crd in crds {
            if crd["metadata"]["deletionTimestamp"].is_string() {
                continue;
            }
            kinds.extend(kinds_of_crd(crd));
        }
        *self.kinds.write() = Arc::new(kinds);
    }

    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceKind>> {
        self.all()
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
    }

    /// Any served version of a resource, to name it in errors and to find its storage.
    pub fn find_any_version(&self, group: &str, plural: &str) -> Option<Arc<ResourceKind>> {
        self.all()
            .iter()
            .find(|k| k.group == group && k.plural == plural)
            .cloned()
    }
}

/// fleetpatch's CRDs as JSON, as the API server is given them.
#[cfg(test)]
pub(crate) fn our_crds() -> Vec<Value> {
    crate::api::crds()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect()
}

#[cfg(test)]
impl Registry {
    /// The built-in kinds and fleetpatch's.
    pub(crate) fn with_our_crds() -> Self {
        let registry = Registry::new();
        registry.set_crds(our_crds().iter());
        registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_the_kinds_of_our_crds() {
        let registry = Registry::new();
        assert!(registry.find("", "v1", "namespaces").is_some());
        assert!(
            registry
                .find("fleetpatch.io", "v1alpha1", "patchjobs")
                .is_none()
        );
        registry.set_crds(our_crds().iter());
        let pj = registry
            .find("fleetpatch.io", "v1alpha1", "patchjobs")
            .unwrap();
        assert_eq!(pj.kind, "PatchJob");
        assert_eq!(pj.short_names, vec!["pj"]);
        assert_eq!(pj.categories, vec!["fleetpatch"]);
        assert!(pj.status_subresource && pj.namespaced && pj.schema.is_some());
        assert!(pj.printer_columns.iter().any(|c| c.name == "Phase"));
        let agent = registry
            .find("fleetpatch.io", "v1alpha1", "agents")
            .unwrap();
        assert!(!agent.namespaced);
    }
}
