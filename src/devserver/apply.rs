//! PATCH: JSON merge, JSON and strategic merge patches applied to the stored object,
//! and server-side apply (`application/apply-patch+yaml`) with field managers,
//! conflicts and `force`, creating the object when it does not exist.

use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::body::parse_body;
use super::errors::{ApiError, Cause};
use super::handlers::{Request, Target, is_true, now};
use super::managed::{self, Writer};
use super::patch::{self, PatchType};
use super::store;
use super::write::with_ownership_schema;

/// The object without resourceVersion and managedFields timestamps.
pub(super) fn without_times(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
        if let Some(Value::Array(entries)) = meta.get_mut("managedFields") {
            for entry in entries {
                if let Some(entry) = entry.as_object_mut() {
                    entry.remove("time");
                }
            }
        }
    }
    copy
}

impl Request<'_> {
    pub(super) fn patch(&self, target: &Target, body: &[u8]) -> Result<Response, ApiError> {
        let content_type = self
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|c| c.to_str().ok())
            .unwrap_or_default();
        let patch_type = PatchType::from_content_type(content_type).ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json".into(),
            )
        })?;
        let patch_value = parse_body(self.headers, body)?;
        for _attempt in 0..8 {
            let old = self
                .server
                .store
                .get(&target.key(), target.ns(), target.name());
            let result = match (old, patch_type) {
                (None, PatchType::Apply) if target.subresource.is_none() => {
                    return self.apply_create(target, &patch_value);
                }
                (None, _) => return Err(target.not_found()),
                (Some(old), PatchType::Apply) => self.apply_update(target, &old, &patch_value),
                (Some(old), _) => {
                    let mut doc = (*old).clone();
                    let applied = match patch_type {
                        PatchType::Merge => patch::merge_patch(&mut doc, &patch_value),
                        PatchType::Json => patch::json_patch(&mut doc, patch_value.clone()),
                        _ => patch::strategic_merge_patch(
                            &mut doc,
                            &patch_value,
                            !target.kind.custom,
                        ),
                    };
                    applied.map_err(|e| match patch_type {
                        // The API server reports a JSON patch that does not apply as a
                        // bare 422.
                        PatchType::Json => {
                            tracing::debug!(error = %e, "JSON patch does not apply");
                            ApiError::Status(json!({
                                "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "Invalid", "details": {}, "code": 422,
                                "message": "the server rejected our request due to an error in our request",
                            }))
                        }
                        _ => ApiError::BadRequest(e.to_string()),
                    })?;
                    self.check_identity(target, &doc)?;
                    let pinned = doc["metadata"]["resourceVersion"]
                        .as_str()
                        .filter(|rv| {
                            *rv != old["metadata"]["resourceVersion"]
                                .as_str()
                                .unwrap_or_default()
                        })
                        .map(|rv| rv.parse::<u64>().unwrap_or(u64::MAX));
                    if pinned.is_some() {
                        return Err(ApiError::conflict(
                            &target.kind.group,
                            &target.kind.plural,
                            target.name(),
                        ));
                    }
                    self.write(target, &old, doc, None)
                }
            };
            match result {
                Err(ApiError::Conflict(..)) if !self.pins_version(&patch_value) => continue,
                Err(err) => return Err(err),
                Ok((code, object, warnings)) => {
                    return Ok(self.respond(target, code, &object, &warnings));
                }
            }
        }
        Err(ApiError::conflict(
            &target.kind.group,
            &target.kind.plural,
            target.name(),
        ))
    }

    pub(super) fn pins_version(&self, patch: &Value) -> bool {
        patch["metadata"]["resourceVersion"].is_string()
    }

    pub(super) fn apply_writer_parts(
        &self,
        target: &Target,
    ) -> Result<(String, String, String), ApiError> {
        let manager = self.query.get("fieldManager").cloned().ok_or_else(|| {
            ApiError::invalid(
                "meta.k8s.io",
                "PatchOptions",
                "",
                vec![Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value: is required for apply patch".into(),
                    field: "fieldManager".into(),
                }],
            )
        })?;
        Ok((manager, target.kind.api_version(), now()))
    }

    pub(super) fn applied_config(&self, target: &Target, patch: &Value) -> Result<Value, ApiError> {
        self.check_identity(target, patch)?;
        if patch["apiVersion"].is_null() || patch["kind"].is_null() {
            return Err(ApiError::BadRequest(
                "apiVersion and kind must be set in an applied configuration".into(),
            ));
        }
        let mut applied = patch.clone();
        if let Some(meta) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "managedFields",
                "generation",
                "deletionTimestamp",
            ] {
                meta.remove(field);
            }
        }
        let sub = target.subresource.as_deref().unwrap_or_default();
        if let Some(map) = applied.as_object_mut() {
            if sub == "status" {
                map.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                });
                if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.retain(|k, _| matches!(k.as_str(), "name" | "namespace"));
                }
            } else if target.kind.status_subresource {
                map.remove("status");
            }
        }
        Ok(applied)
    }

    pub(super) fn conflict_error(conflicts: Vec<managed::Conflict>) -> ApiError {
        ApiError::ApplyConflict(
            conflicts
                .into_iter()
                .map(|c| Cause {
                    reason: "FieldManagerConflict".into(),
                    message: format!("conflict with {}", c.manager),
                    field: c.path,
                })
                .collect(),
        )
    }

    pub(super) fn apply_create(
        &self,
        target: &Target,
        patch: &Value,
    ) -> Result<Response, ApiError> {
        let applied = self.applied_config(target, patch)?;
        let (manager, api_version, now) = self.apply_writer_parts(target)?;
        let writer = Writer {
            manager: &manager,
            subresource: "",
            api_version: &api_version,
            now: &now,
        };
        let object = with_ownership_schema(&target.kind, |schema| {
            managed::apply(None, &applied, schema, &writer, true)
        })
        .map_err(Self::conflict_error)?;
        let managed_fields = object["metadata"]["managedFields"].clone();
        self.create_object(target, object, Some(managed_fields))
    }

    pub(super) fn apply_update(
        &self,
        target: &Target,
        old: &Value,
        patch: &Value,
    ) -> Result<(StatusCode, Arc<Value>, Vec<String>), ApiError> {
        let applied = self.applied_config(target, patch)?;
        let (manager, api_version, now) = self.apply_writer_parts(target)?;
        let sub = target.subresource.as_deref().unwrap_or_default();
        let writer = Writer {
            manager: &manager,
            subresource: sub,
            api_version: &api_version,
            now: &now,
        };
        let force = is_true(self.query, "force");
        let mut new = with_ownership_schema(&target.kind, |schema| {
            managed::apply(Some(old), &applied, schema, &writer, force)
        })
        .map_err(Self::conflict_error)?;
        let kind = &target.kind;
        if kind.status_subresource && sub.is_empty() {
            match old.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    if let Some(map) = new.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        let warnings = self.admit_change(kind, sub, old, &mut new)?;
        if without_times(&new) == without_times(old) {
            // Same values, same owners: a no-op apply writes nothing.
            return Ok((StatusCode::OK, Arc::new(old.clone()), warnings));
        }
        let expected = applied["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|rv| rv.parse().ok())
            .or(Some(store::resource_version(old)));
        self.store_update(target, new, expected, warnings)
    }
}
