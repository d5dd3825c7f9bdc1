//! Create and update, the status subresource included: what a write must be (identity,
//! namespace, admission), what the server adds (names from `generateName`, uids,
//! generation, defaults of built-in kinds, the status they start with), field
//! ownership of ordinary writes, and storing with resourceVersion checks.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::admission;
use super::discovery;
use super::errors::{ApiError, Cause};
use super::handlers::{Request, Target, map_store_error, now, with_warnings};
use super::managed::{self, Writer};
use super::registry::ResourceKind;
use super::store;

/// Calls `f` with the schema that decides list and map semantics for managedFields:
/// the CRD's, or the built-in kind's.
pub(super) fn with_ownership_schema<R>(
    kind: &ResourceKind,
    f: impl FnOnce(Option<&Value>) -> R,
) -> R {
    match &kind.schema {
        Some(schema) => f(Some(&schema.json)),
        None => {
            let builtin = discovery::builtin_ownership_schema(&kind.group, &kind.plural);
            f(builtin.as_deref())
        }
    }
}

pub(super) fn spec_like(object: &Value, status_subresource: bool) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        if status_subresource {
            map.remove("status");
        }
    }
    copy
}

pub(super) fn without_volatile(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    copy
}

/// What decoding a built-in object into its Go type does to it, before field
/// ownership is recorded (so the writer owns the result): defaults such as a Secret's
/// type and a namespace's name label, a Secret's `stringData` folded into `data`, and
/// empty maps that `omitempty` leaves out.
pub(super) fn decode_defaults(kind: &ResourceKind, object: &mut Value) {
    if kind.custom {
        return;
    }
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "secrets") => {
            if let Some(Value::Object(plain)) =
                object.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                for (key, value) in plain {
                    let text = value.as_str().unwrap_or_default();
                    object["data"][key] = json!(base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        text
                    ));
                }
            }
            if object["type"].is_null() {
                object["type"] = json!("Opaque");
            }
        }
        ("", "namespaces") => {
            let name = object["metadata"]["name"].clone();
            if object["metadata"]["labels"]["kubernetes.io/metadata.name"].is_null() {
                object["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
            }
        }
        _ => {}
    }
    for (parent, field) in [
        (None, "data"),
        (None, "binaryData"),
        (Some("metadata"), "labels"),
        (Some("metadata"), "annotations"),
    ] {
        let holder = match parent {
            Some(p) => object.get_mut(p),
            None => Some(&mut *object),
        };
        if let Some(map) = holder.and_then(Value::as_object_mut)
            && map
                .get(field)
                .is_some_and(|v| v.as_object().is_some_and(|m| m.is_empty()))
        {
            map.remove(field);
        }
    }
}

/// A pod's quality-of-service class from its containers' requests and limits.
pub(super) fn qos_class(pod: &Value) -> &'static str {
    let containers: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .flat_map(|f| pod["spec"][f].as_array().into_iter().flatten())
        .collect();
    let resources = |c: &Value, which: &str, what: &str| c["resources"][which][what].clone();
    let any = containers.iter().any(|c| {
        ["requests", "limits"]
            .iter()
            .any(|w| c["resources"][w].as_object().is_some_and(|m| !m.is_empty()))
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|what| {
            let limit = resources(c, "limits", what);
            let request = resources(c, "requests", what);
            !limit.is_null() && (request.is_null() || request == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The object a write asks for: through the status subresource only the status
/// changes; through the main resource everything but the status (for kinds with a
/// status subresource).
fn requested_state(kind: &ResourceKind, sub: &str, old: &Value, requested: Value) -> Value {
    let status_from = |mut new: Value, source: &Value| {
        match source.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(map) = new.as_object_mut() {
                    map.remove("status");
                }
            }
        }
        new
    };
    let mut new = if sub == "status" {
        status_from(old.clone(), &requested)
    } else if kind.status_subresource {
        status_from(requested, old)
    } else {
        requested
    };
    new["apiVersion"] = json!(kind.api_version());
    new["kind"] = json!(kind.kind);
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    new
}

/// What an update cannot change in metadata: identity, timestamps, generation and
/// ownership come from the stored object; finalizers may only shrink while the object
/// is being deleted.
fn keep_server_metadata(old: &Value, new: &mut Value) -> Result<(), ApiError> {
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
        "managedFields",
    ] {
        match old["metadata"].get(field) {
            Some(value) => new["metadata"][field] = value.clone(),
            None => {
                if let Some(meta) = new["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    if old["metadata"]["deletionTimestamp"].is_string() {
        let listed = |o: &Value| -> Vec<Value> {
            o["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let before = listed(old);
        if listed(new).iter().any(|f| !before.contains(f)) {
            return Err(ApiError::Forbidden(
                "no new finalizers can be added if the object is being deleted".into(),
            ));
        }
    }
    Ok(())
}

/// The metadata the server sets on create: a name from `generateName` when there is
/// none, the namespace of the URL, a uid and creation time; what only the server
/// writes is dropped. The object's name.
fn assign_server_metadata(
    kind: &ResourceKind,
    namespace: &str,
    object: &mut Value,
) -> Result<String, ApiError> {
    let meta = object["metadata"].as_object_mut().expect("made an object");
    if meta
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        match meta.get("generateName").and_then(Value::as_str) {
            Some(prefix) if !prefix.is_empty() => {
                meta.insert("name".into(), json!(format!("{prefix}{}", random_suffix())));
            }
            _ => {
                return Err(ApiError::invalid(
                    &kind.group,
                    &kind.kind,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value: name or generateName is required".into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
        }
    }
    let name = meta["name"].as_str().unwrap_or_default().to_string();
    if kind.namespaced {
        meta.insert("namespace".into(), json!(namespace));
    } else {
        meta.remove("namespace");
    }
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(field);
    }
    meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    meta.insert("creationTimestamp".into(), json!(now()));
    Ok(name)
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

impl Request<'_> {
    pub(super) fn check_namespace(&self, target: &Target) -> Result<(), ApiError> {
        if !target.kind.namespaced {
            return Ok(());
        }
        let ns = self
            .server
            .store
            .get("/namespaces", "", target.ns())
            .ok_or_else(|| ApiError::not_found("", "namespaces", target.ns()))?;
        if ns["metadata"]["deletionTimestamp"].is_string() {
            return Err(ApiError::Forbidden(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {} because it is being terminated",
                target.kind.plural,
                target.name(),
                target.ns()
            )));
        }
        Ok(())
    }

    pub(super) fn check_identity(&self, target: &Target, object: &Value) -> Result<(), ApiError> {
        if !object.is_object() {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        // Shapes the server writes into must be what they claim, or it would be
        // writing into a string or a list.
        let meta = &object["metadata"];
        let shape_ok = (meta.is_null() || meta.is_object())
            && ["labels", "annotations"]
                .iter()
                .all(|f| meta[*f].is_null() || meta[*f].is_object())
            && ["finalizers", "ownerReferences", "managedFields"]
                .iter()
                .all(|f| meta[*f].is_null() || meta[*f].is_array())
            && (target.kind.plural != "secrets"
                || ["data", "stringData"]
                    .iter()
                    .all(|f| object[*f].is_null() || object[*f].is_object()));
        if !shape_ok {
            return Err(ApiError::BadRequest(
                "metadata must be an object, with object labels and annotations and list finalizers and ownerReferences".into(),
            ));
        }
        let kind = &target.kind;
        if let Some(k) = object["kind"].as_str()
            && k != kind.kind
            && kind.custom
        {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            return Err(ApiError::invalid(
                &kind.group,
                k,
                name,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {k:?}: must be {}", kind.kind),
                    field: "kind".into(),
                }],
            ));
        }
        if let Some(k) = object["kind"].as_str()
            && k != kind.kind
        {
            return Err(ApiError::BadRequest(format!(
                "the kind {k:?} in the body does not match the resource {} ({})",
                kind.plural, kind.kind
            )));
        }
        if let Some(api_version) = object["apiVersion"].as_str()
            && api_version != kind.api_version()
        {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                kind.api_version()
            )));
        }
        if let (Some(ns), Some(want)) = (
            object["metadata"]["namespace"].as_str(),
            target.namespace.as_deref(),
        ) && ns != want
            && !ns.is_empty()
        {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn create(&self, target: &Target, object: Value) -> Result<Response, ApiError> {
        let warnings = self.check_duplicates(target)?;
        let response = self.create_object(target, object, None)?;
        Ok(with_warnings(response, &warnings))
    }

    /// Creates an object; `managed_fields` = Some keeps the given ownership (an apply
    /// that creates) instead of recording the creation as an Update.
    pub(super) fn create_object(
        &self,
        target: &Target,
        mut object: Value,
        managed_fields: Option<Value>,
    ) -> Result<Response, ApiError> {
        self.check_identity(target, &object)?;
        let kind = target.kind.clone();
        object["apiVersion"] = json!(kind.api_version());
        object["kind"] = json!(kind.kind);
        if !object["metadata"].is_object() {
            object["metadata"] = json!({});
        }
        let name = assign_server_metadata(&kind, target.ns(), &mut object)?;
        if kind.custom || object.get("spec").is_some() {
            object["metadata"]["generation"] = json!(1);
        }
        if kind.custom
            && kind.status_subresource
            && let Some(map) = object.as_object_mut()
        {
            map.remove("status");
        }
        let target = Target {
            kind: kind.clone(),
            namespace: target.namespace.clone(),
            name: Some(name),
            subresource: None,
        };
        self.check_namespace(&target)?;
        let warnings = admission::admit(&kind, &mut object, None, self.field_validation(), "")?;
        decode_defaults(&kind, &mut object);
        match managed_fields {
            Some(fields) => object["metadata"]["managedFields"] = fields,
            None => {
                let manager = self.field_manager();
                let api_version = kind.api_version();
                let now = now();
                with_ownership_schema(&kind, |schema| {
                    managed::record_update(
                        None,
                        &mut object,
                        schema,
                        !kind.custom,
                        &Writer {
                            manager: &manager,
                            subresource: "",
                            api_version: &api_version,
                            now: &now,
                        },
                    )
                });
            }
        }
        self.prepare_builtin(&kind, &mut object, None)?;
        if self.dry_run() {
            return Ok(self.respond(&target, StatusCode::CREATED, &object, &warnings));
        }
        let stored = self
            .server
            .store
            .create(&target.key(), object)
            .map_err(|e| map_store_error(&target, e))?;
        self.server.after_write(&kind, &stored);
        Ok(self.respond(&target, StatusCode::CREATED, &stored, &warnings))
    }

    /// What built-in kinds' strategies do before an object is stored, after its field
    /// ownership is recorded: CRD names and status; the status a namespace, pod or
    /// disruption budget starts with; a namespace's `kubernetes` finalizer.
    pub(super) fn prepare_builtin(
        &self,
        kind: &ResourceKind,
        object: &mut Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        match (kind.group.as_str(), kind.plural.as_str()) {
            ("apiextensions.k8s.io", "customresourcedefinitions") => {
                let spec = &object["spec"];
                let expected = format!(
                    "{}.{}",
                    spec["names"]["plural"].as_str().unwrap_or_default(),
                    spec["group"].as_str().unwrap_or_default()
                );
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                if name != expected {
                    return Err(ApiError::invalid(
                        &kind.group,
                        &kind.kind,
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            message: format!(
                                "Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"
                            ),
                            field: "metadata.name".into(),
                        }],
                    ));
                }
                let mut accepted = spec["names"].clone();
                if accepted["singular"].is_null() {
                    accepted["singular"] = json!(
                        spec["names"]["kind"]
                            .as_str()
                            .unwrap_or_default()
                            .to_lowercase()
                    );
                }
                if accepted["listKind"].is_null() {
                    accepted["listKind"] = json!(format!(
                        "{}List",
                        spec["names"]["kind"].as_str().unwrap_or_default()
                    ));
                }
                let stored: Vec<Value> = spec["versions"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter(|v| v["storage"] == json!(true))
                            .map(|v| v["name"].clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let time = object["metadata"]["creationTimestamp"].clone();
                object["status"] = json!({
                    "acceptedNames": accepted,
                    "storedVersions": stored,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": time},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": time},
                    ],
                });
            }
            ("", "namespaces") if old.is_none() => {
                object["status"] = json!({"phase": "Active"});
                let mut finalizers: Vec<Value> = object["spec"]["finalizers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !finalizers.contains(&json!("kubernetes")) {
                    finalizers.push(json!("kubernetes"));
                }
                object["spec"]["finalizers"] = json!(finalizers);
            }
            // What a pod's status starts as, whatever the client sent: no kubelet has
            // seen it yet.
            ("", "pods") if old.is_none() => {
                object["status"] = json!({"phase": "Pending", "qosClass": qos_class(object)});
            }
            ("policy", "poddisruptionbudgets") if old.is_none() => {
                object["status"] = super::disruption::initial_status();
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn update(&self, target: &Target, body: Value) -> Result<Response, ApiError> {
        let duplicate_warnings = self.check_duplicates(target)?;
        let response = self.update_object(target, body)?;
        Ok(with_warnings(response, &duplicate_warnings))
    }

    pub(super) fn update_object(&self, target: &Target, body: Value) -> Result<Response, ApiError> {
        self.check_identity(target, &body)?;
        if let Some(name) = body["metadata"]["name"].as_str()
            && name != target.name()
        {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({name}) does not match the name on the URL ({})",
                target.name()
            )));
        }
        let expected = body["metadata"]["resourceVersion"]
            .as_str()
            .filter(|rv| !rv.is_empty())
            .map(|rv| rv.parse::<u64>().unwrap_or(u64::MAX));
        let old = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        // Custom resources may not be updated without saying which version they replace.
        if expected.is_none() && target.kind.custom {
            return Err(ApiError::invalid(
                &target.kind.group,
                &target.kind.plural,
                target.name(),
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: 0: must be specified for an update".into(),
                    field: "metadata.resourceVersion".into(),
                }],
            ));
        }
        if expected.is_some_and(|e| e != store::resource_version(&old)) {
            return Err(ApiError::conflict(
                &target.kind.group,
                &target.kind.plural,
                target.name(),
            ));
        }
        let (code, object, warnings) = self.write(target, &old, body, expected)?;
        Ok(self.respond(target, code, &object, &warnings))
    }

    /// What every change of a stored object goes through once its new state is known:
    /// a new generation when more than metadata and status changed, admission, the
    /// defaults decoding applies, and the built-in kinds' own preparation. Returns the
    /// admission's warnings.
    pub(super) fn admit_change(
        &self,
        kind: &ResourceKind,
        sub: &str,
        old: &Value,
        new: &mut Value,
    ) -> Result<Vec<String>, ApiError> {
        if spec_like(new, kind.status_subresource) != spec_like(old, kind.status_subresource)
            && let Some(generation) = old["metadata"]["generation"].as_i64()
        {
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let warnings = admission::admit(kind, new, Some(old), self.field_validation(), sub)?;
        decode_defaults(kind, new);
        self.prepare_builtin(kind, new, Some(old))?;
        Ok(warnings)
    }

    /// Turns a requested new state into the stored one (status subresource rules,
    /// immutable metadata, generation, admission, ownership) and stores it.
    pub(super) fn write(
        &self,
        target: &Target,
        old: &Value,
        requested: Value,
        expected_rv: Option<u64>,
    ) -> Result<(StatusCode, Arc<Value>, Vec<String>), ApiError> {
        let kind = &target.kind;
        let sub = target.subresource.as_deref().unwrap_or_default();
        let mut new = requested_state(kind, sub, old, requested);
        keep_server_metadata(old, &mut new)?;
        let warnings = self.admit_change(kind, sub, old, &mut new)?;
        if without_volatile(&new) == without_volatile(old) {
            // Nothing changed: no write, no event, same resourceVersion.
            return Ok((StatusCode::OK, Arc::new(old.clone()), warnings));
        }
        let manager = self.field_manager();
        let api_version = kind.api_version();
        let now = now();
        with_ownership_schema(kind, |schema| {
            managed::record_update(
                Some(old),
                &mut new,
                schema,
                !kind.custom,
                &Writer {
                    manager: &manager,
                    subresource: sub,
                    api_version: &api_version,
                    now: &now,
                },
            )
        });
        self.store_update(
            target,
            new,
            expected_rv.or(Some(store::resource_version(old))),
            warnings,
        )
    }

    pub(super) fn store_update(
        &self,
        target: &Target,
        new: Value,
        expected_rv: Option<u64>,
        warnings: Vec<String>,
    ) -> Result<(StatusCode, Arc<Value>, Vec<String>), ApiError> {
        if self.dry_run() {
            return Ok((StatusCode::OK, Arc::new(new), warnings));
        }
        let finished = new["metadata"]["deletionTimestamp"].is_string()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        let stored = self
            .server
            .store
            .replace(&target.key(), new, expected_rv)
            .map_err(|e| map_store_error(target, e))?;
        self.server.after_write(&target.kind, &stored);
        if finished {
            self.server
                .remove_now(&target.kind, target.ns(), target.name());
        }
        Ok((StatusCode::OK, stored, warnings))
    }
}
