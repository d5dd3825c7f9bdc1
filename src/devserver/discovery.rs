//! Discovery (`/version`, `/api`, `/apis`, `/apis/GROUP`, per group-version resource
//! lists, in the legacy format every kubectl accepts) and OpenAPI v3 (`/openapi/v3`
//! index and one document per group-version): CRD schemas as they were registered,
//! built-in kinds as open objects, and for every kind the PATCH operation with the
//! `fieldValidation` parameter, which is how kubectl learns it may leave field
//! validation to the server.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use schemars::JsonSchema;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::registry::ResourceKind;

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fleetpatch-dev",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}

/// Group-versions in serving order: core first, then groups as first registered.
fn group_versions(kinds: &[Arc<ResourceKind>]) -> Vec<(String, Vec<String>)> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for kind in kinds {
        match groups.iter_mut().find(|(g, _)| *g == kind.group) {
            Some((_, versions)) => {
                if !versions.contains(&kind.version) {
                    versions.push(kind.version.clone());
                }
            }
            None => groups.push((kind.group.clone(), vec![kind.version.clone()])),
        }
    }
    groups
}

pub fn core_versions(address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
    })
}

fn api_group(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": versions,
        "preferredVersion": versions[0],
    })
}

pub fn group_list(kinds: &[Arc<ResourceKind>]) -> Value {
    let groups: Vec<Value> = group_versions(kinds)
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, v)| {
            let mut group = api_group(g, v);
            if let Some(map) = group.as_object_mut() {
                map.remove("kind");
                map.remove("apiVersion");
            }
            group
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(kinds: &[Arc<ResourceKind>], name: &str) -> Option<Value> {
    group_versions(kinds)
        .into_iter()
        .find(|(g, _)| g == name && !g.is_empty())
        .map(|(g, v)| api_group(&g, &v))
}

/// The kinds of one group-version; `None` when it serves none.
fn served_in<'a>(
    kinds: &'a [Arc<ResourceKind>],
    group: &str,
    version: &str,
) -> Option<Vec<&'a Arc<ResourceKind>>> {
    let served: Vec<&Arc<ResourceKind>> = kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    (!served.is_empty()).then_some(served)
}

pub fn resource_list(kinds: &[Arc<ResourceKind>], group: &str, version: &str) -> Option<Value> {
    let served = served_in(kinds, group, version)?;
    let mut resources = Vec::new();
    for kind in served {
        let mut resource = json!({
            "name": kind.plural,
            "singularName": kind.singular,
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": kind.verbs,
        });
        if !kind.short_names.is_empty() {
            resource["shortNames"] = json!(kind.short_names);
        }
        if !kind.categories.is_empty() {
            resource["categories"] = json!(kind.categories);
        }
        if kind.custom || kind.status_subresource {
            resource["storageVersionHash"] = json!(hash(&kind.storage_key())[..12]);
        }
        resources.push(resource);
        if kind.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        for (sub, sub_kind) in &kind.extra_subresources {
            let (group, version) = match *sub {
                "eviction" => ("policy", "v1"),
                _ => ("authentication.k8s.io", "v1"),
            };
            resources.push(json!({
                "name": format!("{}/{sub}", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "group": group,
                "version": version,
                "kind": sub_kind,
                "verbs": ["create"],
            }));
        }
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

fn hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// `fleetpatch.io` → `io.fleetpatch`; core → `io.k8s.api.core`, as the API server names
/// definitions.
pub fn definition_name(kind: &ResourceKind) -> String {
    let prefix = if kind.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else if kind.custom {
        kind.group.split('.').rev().collect::<Vec<_>>().join(".")
    } else {
        let short = kind.group.split('.').next().unwrap_or_default();
        format!("io.k8s.api.{short}")
    };
    format!("{prefix}.{}.{}", kind.version, kind.kind)
}

fn object_meta_schema() -> Value {
    let string = |d: &str| json!({"type": "string", "description": d});
    json!({
        "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
        "type": "object",
        "properties": {
            "name": string("Name must be unique within a namespace."),
            "generateName": string("GenerateName is an optional prefix, used by the server, to generate a unique name."),
            "namespace": string("Namespace defines the space within which each name must be unique."),
            "uid": string("UID is the unique in time and space value for this object."),
            "resourceVersion": string("An opaque value that represents the internal version of this object."),
            "generation": {"type": "integer", "format": "int64", "description": "A sequence number representing a specific generation of the desired state."},
            "creationTimestamp": string("CreationTimestamp is a timestamp representing the server time when this object was created."),
            "deletionTimestamp": string("DeletionTimestamp is RFC 3339 date and time at which this resource will be deleted."),
            "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Map of string keys and values that can be used to organize and categorize objects."},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Annotations is an unstructured key value map stored with a resource."},
            "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before the object is deleted from the registry."},
            "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "description": "List of objects depended by this object."},
            "managedFields": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "description": "Maps workflow-id and version to the set of fields that are managed by that workflow."},
        },
    })
}

fn kind_schema(kind: &ResourceKind) -> Value {
    let gvk = json!([{"group": kind.group, "version": kind.version, "kind": kind.kind}]);
    let mut schema = match &kind.schema {
        Some(schema) => schema.json.clone(),
        None => json!({
            "description": format!("{} (stored as sent by the fleetpatch dev server)", kind.kind),
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        }),
    };
    if let Some(map) = schema.as_object_mut() {
        let properties = map
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(properties) = properties.as_object_mut() {
            properties.insert(
                "apiVersion".into(),
                json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}),
            );
            properties.insert(
                "kind".into(),
                json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}),
            );
            properties.insert(
                "metadata".into(),
                json!({"allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}], "default": {},
                       "description": "Standard object's metadata."}),
            );
        }
        map.insert("x-kubernetes-group-version-kind".into(), gvk);
    }
    schema
}

/// The schema of a built-in kind with its `$ref`s inlined, for checking unknown fields
/// (`fieldValidation=Strict`) and pruning them, as an API server's decoding into its
/// Go types does. Computed once per kind. Nodes that do not declare their fields
/// (free-form JSON, raw extensions, and references nested too deep to inline)
/// preserve unknown fields, so only fields the schema positively lacks are caught.
pub fn builtin_field_schema(group: &str, plural: &str) -> Option<Arc<Value>> {
    static CACHE: SchemaCache = OnceLock::new();
    cached(&CACHE, group, plural, || {
        let mut generator = SchemaSettings::openapi3()
            .with(|s| s.meta_schema = None)
            .into_generator();
        let name = builtin_definition(&mut generator, group, plural)?;
        let definitions = generator.take_definitions(true);
        let root = definitions.get(&name)?;
        Some(Arc::new(inline_refs(
            root,
            &definitions,
            &mut vec![name.clone()],
        )))
    })
}

/// [`builtin_field_schema`] with the list and map semantics the API server's own
/// schemas declare for the fields people apply most (k8s-openapi's schemas leave them
/// out): lists of containers, volumes, env, ports and conditions are maps by their key
/// fields, label selectors are atomic. Server-side apply and managedFields use it.
pub fn builtin_ownership_schema(group: &str, plural: &str) -> Option<Arc<Value>> {
    static CACHE: SchemaCache = OnceLock::new();
    cached(&CACHE, group, plural, || {
        builtin_field_schema(group, plural).map(|schema| {
            let mut schema = (*schema).clone();
            declare_list_semantics(&mut schema);
            Arc::new(schema)
        })
    })
}

/// Schemas of built-in kinds by `group/plural`, each computed at most once.
type SchemaCache = OnceLock<Mutex<HashMap<String, Option<Arc<Value>>>>>;

fn cached(
    cache: &'static SchemaCache,
    group: &str,
    plural: &str,
    compute: impl FnOnce() -> Option<Arc<Value>>,
) -> Option<Arc<Value>> {
    let cache = cache.get_or_init(Mutex::default);
    let key = format!("{group}/{plural}");
    if let Some(found) = cache.lock().get(&key) {
        return found.clone();
    }
    let computed = compute();
    cache.lock().insert(key, computed.clone());
    computed
}

fn declare_list_semantics(schema: &mut Value) {
    let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        if let Some(items) = schema.get_mut("items") {
            declare_list_semantics(items);
        }
        return;
    };
    let is_selector =
        properties.contains_key("matchLabels") && properties.contains_key("matchExpressions");
    for (name, child) in properties.iter_mut() {
        let item_fields: Vec<String> = child["items"]["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let has = |f: &str| item_fields.iter().any(|i| i == f);
        let keys: Option<&[&str]> = match name.as_str() {
            "conditions" if has("type") => Some(&["type"]),
            "containers" | "initContainers" | "ephemeralContainers" | "volumes" | "env"
                if has("name") =>
            {
                Some(&["name"])
            }
            "ports" if has("containerPort") => Some(&["containerPort", "protocol"]),
            "ports" if has("port") && has("targetPort") => Some(&["port", "protocol"]),
            "volumeMounts" if has("mountPath") => Some(&["mountPath"]),
            "volumeDevices" if has("devicePath") => Some(&["devicePath"]),
            "hostAliases" if has("ip") => Some(&["ip"]),
            _ => None,
        };
        if let (Some(keys), Some(map)) = (keys, child.as_object_mut()) {
            map.insert("x-kubernetes-list-type".into(), json!("map"));
            map.insert("x-kubernetes-list-map-keys".into(), json!(keys));
        }
        declare_list_semantics(child);
    }
    if is_selector && let Some(map) = schema.as_object_mut() {
        map.insert("x-kubernetes-map-type".into(), json!("atomic"));
    }
}

/// Inlines `$ref`s. A definition referring back to one being inlined (recursive types
/// such as a CRD's JSONSchemaProps) becomes an open node instead, so the result stays
/// proportional to the schema rather than growing exponentially.
fn inline_refs(
    schema: &Value,
    definitions: &Map<String, Value>,
    expanding: &mut Vec<String>,
) -> Value {
    let open = || json!({"x-kubernetes-preserve-unknown-fields": true});
    let Some(map) = schema.as_object() else {
        return schema.clone();
    };
    if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or_default().to_string();
        if expanding.contains(&name) {
            return open();
        }
        let Some(target) = definitions.get(&name) else {
            return open();
        };
        expanding.push(name);
        let inlined = inline_refs(target, definitions, expanding);
        expanding.pop();
        return inlined;
    }
    if let Some(Value::Array(all_of)) = map.get("allOf")
        && all_of.len() == 1
    {
        return inline_refs(&all_of[0], definitions, expanding);
    }
    let mut out = Map::new();
    for (key, value) in map {
        let value = match key.as_str() {
            "properties" => Value::Object(
                value
                    .as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(k, v)| (k.clone(), inline_refs(v, definitions, expanding)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" if value.is_object() => {
                inline_refs(value, definitions, expanding)
            }
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    if !out.contains_key("properties") && !out.contains_key("additionalProperties") {
        out.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
    }
    Value::Object(out)
}

/// Registers the k8s-openapi schema of a built-in kind; returns its definition name.
fn builtin_definition(
    generator: &mut SchemaGenerator,
    group: &str,
    plural: &str,
) -> Option<String> {
    use k8s_openapi::api::{apps, authentication, batch, coordination, core, events, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions;
    fn define<T: JsonSchema>(generator: &mut SchemaGenerator) -> Option<String> {
        generator.subschema_for::<T>();
        Some(T::schema_name().into_owned())
    }
    match (group, plural) {
        ("", "namespaces") => define::<core::v1::Namespace>(generator),
        ("", "secrets") => define::<core::v1::Secret>(generator),
        ("", "configmaps") => define::<core::v1::ConfigMap>(generator),
        ("", "serviceaccounts") => define::<core::v1::ServiceAccount>(generator),
        ("", "events") => define::<core::v1::Event>(generator),
        ("", "nodes") => define::<core::v1::Node>(generator),
        ("", "pods") => define::<core::v1::Pod>(generator),
        ("", "services") => define::<core::v1::Service>(generator),
        ("", "endpoints") => define::<core::v1::Endpoints>(generator),
        ("", "persistentvolumeclaims") => define::<core::v1::PersistentVolumeClaim>(generator),
        ("events.k8s.io", "events") => define::<events::v1::Event>(generator),
        ("coordination.k8s.io", "leases") => define::<coordination::v1::Lease>(generator),
        ("apps", "deployments") => define::<apps::v1::Deployment>(generator),
        ("apps", "daemonsets") => define::<apps::v1::DaemonSet>(generator),
        ("apps", "statefulsets") => define::<apps::v1::StatefulSet>(generator),
        ("apps", "replicasets") => define::<apps::v1::ReplicaSet>(generator),
        ("batch", "jobs") => define::<batch::v1::Job>(generator),
        ("batch", "cronjobs") => define::<batch::v1::CronJob>(generator),
        ("policy", "poddisruptionbudgets") => define::<policy::v1::PodDisruptionBudget>(generator),
        ("rbac.authorization.k8s.io", "roles") => define::<rbac::v1::Role>(generator),
        ("rbac.authorization.k8s.io", "clusterroles") => define::<rbac::v1::ClusterRole>(generator),
        ("rbac.authorization.k8s.io", "rolebindings") => define::<rbac::v1::RoleBinding>(generator),
        ("rbac.authorization.k8s.io", "clusterrolebindings") => {
            define::<rbac::v1::ClusterRoleBinding>(generator)
        }
        ("authentication.k8s.io", "tokenreviews") => {
            define::<authentication::v1::TokenReview>(generator)
        }
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            define::<apiextensions::v1::CustomResourceDefinition>(generator)
        }
        _ => None,
    }
}

fn operation(kind: &ResourceKind, action: &str, schema_ref: &str, params: &[&str]) -> Value {
    let parameters: Vec<Value> = params
        .iter()
        .map(|p| json!({"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": true}}))
        .collect();
    json!({
        "operationId": format!("{action}{}", kind.kind),
        "parameters": parameters,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"$ref": schema_ref}}}}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
    })
}

/// The OpenAPI v3 document of one group-version.
pub fn openapi_document(kinds: &[Arc<ResourceKind>], group: &str, version: &str) -> Option<Value> {
    let served = served_in(kinds, group, version)?;
    let mut schemas = BTreeMap::new();
    let mut paths = BTreeMap::new();
    let mut generator = SchemaSettings::openapi3()
        .with(|s| s.meta_schema = None)
        .into_generator();
    let mut builtin_definitions = Vec::new();
    let prefix = if group.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{group}/{version}")
    };
    for kind in served {
        let name = match builtin_definition(&mut generator, &kind.group, &kind.plural) {
            Some(name) => {
                builtin_definitions.push((name.clone(), kind));
                name
            }
            None => {
                let name = definition_name(kind);
                schemas.insert(name.clone(), kind_schema(kind));
                name
            }
        };
        let schema_ref = format!("#/components/schemas/{name}");
        paths.extend(kind_paths(kind, &prefix, &schema_ref));
    }
    // Built-in kinds: the schemas k8s-openapi carries, with every type they use.
    for (name, definition) in generator.take_definitions(true) {
        schemas.entry(name).or_insert(definition);
    }
    for (name, kind) in builtin_definitions {
        if let Some(Value::Object(schema)) = schemas.get_mut(&name) {
            schema.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": kind.group, "version": kind.version, "kind": kind.kind}]),
            );
        }
    }
    schemas
        .entry(OBJECT_META.to_string())
        .or_insert_with(object_meta_schema);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (fleetpatch dev server)", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The paths one kind is served at under `prefix`, with their operations.
fn kind_paths(kind: &ResourceKind, prefix: &str, schema_ref: &str) -> Vec<(String, Value)> {
    if kind.is_virtual() {
        // Only POST is served, but kubectl looks for the fieldValidation parameter on
        // a PATCH operation of the kind to leave validation to the server (a real
        // server would send it to OpenAPI v2 instead, which this one does not serve).
        return vec![(
            format!("{prefix}/{}", kind.plural),
            json!({
                "post": operation(kind, "post", schema_ref, &["dryRun", "fieldManager", "fieldValidation"]),
                "patch": operation(kind, "patch", schema_ref, &["dryRun", "fieldManager", "fieldValidation"]),
            }),
        )];
    }
    let collection = if kind.namespaced {
        format!("{prefix}/namespaces/{{namespace}}/{}", kind.plural)
    } else {
        format!("{prefix}/{}", kind.plural)
    };
    let write = ["dryRun", "fieldManager", "fieldValidation"];
    let patch = ["dryRun", "fieldManager", "fieldValidation", "force"];
    let mut item = json!({
        "get": operation(kind, "get", schema_ref, &[]),
        "put": operation(kind, "put", schema_ref, &write),
        "patch": operation(kind, "patch", schema_ref, &patch),
        "delete": operation(kind, "delete", schema_ref, &["dryRun", "propagationPolicy"]),
    });
    item["parameters"] =
        json!([{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let mut paths = vec![(
        collection.clone(),
        json!({
            "get": operation(kind, "list", schema_ref, &["labelSelector", "fieldSelector", "limit", "continue", "watch", "resourceVersion"]),
            "post": operation(kind, "post", schema_ref, &write),
        }),
    )];
    if kind.status_subresource {
        paths.push((
            format!("{collection}/{{name}}/status"),
            json!({
                "get": operation(kind, "get", schema_ref, &[]),
                "put": operation(kind, "put", schema_ref, &write),
                "patch": operation(kind, "patch", schema_ref, &patch),
            }),
        ));
    }
    paths.push((format!("{collection}/{{name}}"), item));
    paths
}

/// `/openapi/v3`: every group-version with a URL that changes when its document does.
pub fn openapi_index(kinds: &[Arc<ResourceKind>]) -> Value {
    let mut paths = Map::new();
    for (group, versions) in group_versions(kinds) {
        for version in versions {
            let key = if group.is_empty() {
                "api/v1".to_string()
            } else {
                format!("apis/{group}/{version}")
            };
            let document = openapi_document(kinds, &group, &version).unwrap_or_default();
            let digest = hash(&document.to_string());
            paths.insert(
                key.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{key}?hash={}", &digest[..32].to_uppercase())}),
            );
        }
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devserver::registry::Registry;

    #[test]
    fn discovery_lists_our_kinds_with_short_names_and_categories() {
        let registry = Registry::with_our_crds();
        let kinds = registry.all();
        let groups = group_list(&kinds);
        assert!(
            groups["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == "fleetpatch.io")
        );
        let list = resource_list(&kinds, "fleetpatch.io", "v1alpha1").unwrap();
        let pj = list["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "patchjobs")
            .unwrap();
        assert_eq!(pj["shortNames"], json!(["pj"]));
        assert_eq!(pj["categories"], json!(["fleetpatch"]));
        let doc = openapi_document(&kinds, "fleetpatch.io", "v1alpha1").unwrap();
        let schema = &doc["components"]["schemas"]["io.fleetpatch.v1alpha1.PatchJob"];
        assert!(schema["properties"]["spec"]["properties"]["agent"].is_object());
        let patch = &doc["paths"]["/apis/fleetpatch.io/v1alpha1/namespaces/{namespace}/patchjobs/{name}"]
            ["patch"];
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        assert!(
            openapi_index(&kinds)["paths"]["apis/fleetpatch.io/v1alpha1"]["serverRelativeURL"]
                .is_string()
        );
    }
}
