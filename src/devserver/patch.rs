//! Patch application for PATCH requests other than server-side apply: JSON merge
//! patch (RFC 7386), JSON patch (RFC 6902, via the `json-patch` crate) and
//! Kubernetes strategic merge patch.
//!
//! Strategic merge patch needs the Go types' merge keys, which a schemaless store
//! does not have; built-in kinds use a table of the well-known list merge keys
//! (containers by name, ports by port, ...), custom resources are merged like a
//! JSON merge patch, and the patch directives (`$patch`, `$setElementOrder/...`,
//! `$retainKeys`, `$deleteFromPrimitiveList/...`) are honoured or stripped.

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let media = content_type.split(';').next().unwrap_or_default().trim();
        match media {
            "application/merge-patch+json" => Some(Self::Merge),
            "application/json-patch+json" => Some(Self::Json),
            "application/strategic-merge-patch+json" => Some(Self::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Some(Self::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the JSON patch is not valid: {0}")]
    BadJsonPatch(serde_json::Error),
    #[error("the JSON patch does not apply: {0}")]
    JsonPatchFailed(#[from] json_patch::PatchError),
    #[error("the patch must be a JSON object")]
    NotAnObject,
}

pub fn json_patch(doc: &mut Value, patch: Value) -> Result<(), PatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch).map_err(PatchError::BadJsonPatch)?;
    json_patch::patch(doc, &ops)?;
    Ok(())
}

pub fn merge_patch(doc: &mut Value, patch: &Value) -> Result<(), PatchError> {
    if !patch.is_object() {
        return Err(PatchError::NotAnObject);
    }
    json_patch::merge(doc, patch);
    Ok(())
}

/// Strategic merge patch. `known_types` = false (custom resources) merges every list
/// wholesale, like a JSON merge patch.
pub fn strategic_merge_patch(
    doc: &mut Value,
    patch: &Value,
    known_types: bool,
) -> Result<(), PatchError> {
    if !patch.is_object() {
        return Err(PatchError::NotAnObject);
    }
    smp(doc, patch, known_types);
    Ok(())
}

/// List fields merged by key in the built-in kinds, and the key fields to try.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    let candidates: &[&'static str] = match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        "ports" => &["containerPort", "port"],
        "hostAliases" => &["ip"],
        "conditions" | "taints" => &["type", "key"],
        "ownerReferences" => &["uid"],
        _ => return None,
    };
    candidates.iter().copied().find(|key| {
        items
            .iter()
            .all(|i| i.get(key).is_some() || is_directive_only(i))
    })
}

fn is_directive_only(item: &Value) -> bool {
    item.as_object()
        .is_some_and(|m| m.keys().all(|k| k.starts_with('$')))
}

/// The patch value with directives removed, for inserting where nothing is merged.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn smp(doc: &mut Value, patch: &Value, known_types: bool) {
    let Some(patch_map) = patch.as_object() else {
        *doc = patch.clone();
        return;
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *doc = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *doc = Value::Object(Map::new());
            return;
        }
        _ => {}
    }
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    let target = doc.as_object_mut().expect("made an object above");
    if let Some(retain) = patch_map.get("$retainKeys").and_then(Value::as_array) {
        let keep: Vec<&str> = retain.iter().filter_map(Value::as_str).collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (key, value) in patch_map {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Some(remove)) =
                (target.get_mut(field), value.as_array())
            {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        if value.is_null() {
            target.remove(key);
            continue;
        }
        match (target.get_mut(key), value) {
            (Some(existing @ Value::Object(_)), Value::Object(_)) => {
                smp(existing, value, known_types)
            }
            (Some(Value::Array(existing)), Value::Array(items))
                if known_types && merge_key(key, items).is_some() =>
            {
                let merge_key = merge_key(key, items).expect("checked");
                merge_list(existing, items, merge_key, known_types);
                if let Some(order) = patch_map
                    .get(&format!("$setElementOrder/{key}"))
                    .and_then(Value::as_array)
                {
                    reorder(existing, order, merge_key);
                }
            }
            _ => {
                target.insert(key.clone(), strip_directives(value));
            }
        }
    }
}

fn merge_list(existing: &mut Vec<Value>, items: &[Value], key: &str, known_types: bool) {
    for item in items {
        let Some(id) = item.get(key) else { continue };
        let position = existing.iter().position(|e| e.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(at), true) => {
                existing.remove(at);
            }
            (None, true) => {}
            (Some(at), false) => smp(&mut existing[at], item, known_types),
            (None, false) => existing.push(strip_directives(item)),
        }
    }
}

fn reorder(existing: &mut Vec<Value>, order: &[Value], key: &str) {
    let mut sorted = Vec::with_capacity(existing.len());
    for wanted in order {
        if let Some(at) = existing.iter().position(|e| e.get(key) == wanted.get(key)) {
            sorted.push(existing.remove(at));
        }
    }
    sorted.append(existing);
    *existing = sorted;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_by_name() {
        let mut doc = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "a:2"}, {"name": "b", "$patch": "delete"}]}});
        strategic_merge_patch(&mut doc, &patch, true).unwrap();
        assert_eq!(
            doc,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}]}]}})
        );
    }

    #[test]
    fn strategic_merge_on_custom_resources_replaces_lists() {
        let mut doc = json!({"spec": {"containers": [{"name": "a", "image": "a:1"}], "x": 1}});
        let patch = json!({"spec": {"containers": [{"name": "a"}], "x": null}});
        strategic_merge_patch(&mut doc, &patch, false).unwrap();
        assert_eq!(doc, json!({"spec": {"containers": [{"name": "a"}]}}));
    }

    #[test]
    fn json_patch_and_merge_patch_apply() {
        let mut doc = json!({"spec": {"a": 1, "b": 2}});
        merge_patch(&mut doc, &json!({"spec": {"a": null, "c": 3}})).unwrap();
        assert_eq!(doc, json!({"spec": {"b": 2, "c": 3}}));
        json_patch(
            &mut doc,
            json!([{"op": "replace", "path": "/spec/b", "value": 5}]),
        )
        .unwrap();
        assert_eq!(doc["spec"]["b"], 5);
        assert!(json_patch(&mut doc, json!([{"op": "remove", "path": "/nope"}])).is_err());
    }
}
