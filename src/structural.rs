//! Validation of JSON values against Kubernetes structural OpenAPI v3 schemas: the
//! checks an API server makes before CEL rules run (types, required fields, enums,
//! patterns, lengths, item and property caps, list-map keys, unknown fields).
//!
//! Used offline by `fleetpatch validate` and by the dev server. Field paths and
//! messages follow the API server's wording so a person sees the same thing in CI as
//! at `kubectl apply`.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};

use regex::Regex;
use serde_json::Value;

/// What is wrong with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldErrorKind {
    /// A required field is missing.
    Required,
    /// A field the schema does not declare.
    Unknown,
    /// The value is of the wrong type.
    Type {
        expected: String,
        found: &'static str,
    },
    /// The value is not one of the allowed ones.
    NotSupported { allowed: Vec<String> },
    /// Two list items share a list-map key.
    Duplicate,
    /// Anything else: pattern, length, range, item count.
    Invalid(String),
}

/// A problem at one field path, like the API server's `field.Error`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path with list indices, e.g. `spec.targets[1].selector`.
    pub path: String,
    pub kind: FieldErrorKind,
    /// The offending value, rendered compactly; empty for Required.
    pub value: String,
}

impl FieldError {
    /// The message in plain words, without the path.
    pub fn message(&self) -> String {
        match &self.kind {
            FieldErrorKind::Required => "Required value".to_string(),
            FieldErrorKind::Unknown => "unknown field; the schema does not declare it".to_string(),
            FieldErrorKind::Type { expected, found } => {
                format!("must be of type {expected}, not {found}: {}", self.value)
            }
            FieldErrorKind::NotSupported { allowed } => {
                let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
                format!(
                    "Unsupported value: {}: supported values: {}",
                    self.value,
                    allowed.join(", ")
                )
            }
            FieldErrorKind::Duplicate => format!("Duplicate value: {}", self.value),
            FieldErrorKind::Invalid(detail) => format!("Invalid value: {}: {detail}", self.value),
        }
    }

    /// Reason as in a Kubernetes `StatusCause`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Unknown => "FieldValueInvalid",
            FieldErrorKind::Type { .. } => "FieldValueTypeInvalid",
            FieldErrorKind::NotSupported { .. } => "FieldValueNotSupported",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::Invalid(_) => "FieldValueInvalid",
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message())
    }
}

/// Options for [`validate`].
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Report fields the schema does not declare (kubectl's strict field validation).
    pub reject_unknown_fields: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            reject_unknown_fields: true,
        }
    }
}

/// Checks `value` against a structural `schema`. `path` is the prefix for field paths
/// (empty at an object's root). Root-level `apiVersion`, `kind` and `metadata` are
/// left to the caller, as the API server validates them separately.
pub fn validate(schema: &Value, value: &Value, options: Options) -> Vec<FieldError> {
    let mut errors = Vec::new();
    walk(schema, value, "", true, options, &mut errors);
    errors
}

/// Like [`validate`], for a value found at `path` inside a larger object.
pub fn validate_at(schema: &Value, value: &Value, path: &str, options: Options) -> Vec<FieldError> {
    let mut errors = Vec::new();
    walk(schema, value, path, false, options, &mut errors);
    errors
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn render(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn compiled(pattern: &str) -> Option<Regex> {
    static CACHE: Mutex<Option<HashMap<String, Option<Regex>>>> = Mutex::new(None);
    let mut cache = CACHE.lock();
    cache
        .get_or_insert_with(HashMap::new)
        .entry(pattern.to_string())
        .or_insert_with(|| Regex::new(pattern).ok())
        .clone()
}

fn walk(
    schema: &Value,
    value: &Value,
    path: &str,
    root: bool,
    options: Options,
    errors: &mut Vec<FieldError>,
) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    let error = |kind: FieldErrorKind| FieldError {
        path: path.to_string(),
        kind,
        value: render(value),
    };
    if value.is_null() {
        errors.extend(null_mismatch(schema).map(error));
        return;
    }
    if let Some(mismatch) = type_mismatch(schema, value) {
        errors.push(error(mismatch));
        return;
    }
    errors.extend(enum_mismatch(schema, value).map(error));
    let invalid = match value {
        Value::String(text) => string_bounds(schema, text),
        Value::Number(number) => number_bounds(schema, number.as_f64().unwrap_or_default()),
        Value::Array(items) => array_bounds(schema, items.len()),
        Value::Object(fields) => {
            errors.extend(missing_required(schema, fields, path));
            object_bounds(schema, fields.len())
        }
        _ => Vec::new(),
    };
    errors.extend(invalid.into_iter().map(FieldErrorKind::Invalid).map(error));
    match value {
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{index}]");
                    walk(item_schema, item, &item_path, false, options, errors);
                }
            }
            check_list_type(schema, items, path, errors);
        }
        Value::Object(fields) => walk_fields(schema, fields, path, root, options, errors),
        _ => {}
    }
}

fn flag(schema: &serde_json::Map<String, Value>, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

/// A null for a non-nullable field: the API server drops nulls for fields with
/// defaults and otherwise reports a type error.
fn null_mismatch(schema: &serde_json::Map<String, Value>) -> Option<FieldErrorKind> {
    if flag(schema, "nullable") || schema.contains_key("default") {
        return None;
    }
    let expected = schema.get("type").and_then(Value::as_str)?;
    Some(FieldErrorKind::Type {
        expected: expected.to_string(),
        found: "null",
    })
}

fn type_mismatch(schema: &serde_json::Map<String, Value>, value: &Value) -> Option<FieldErrorKind> {
    let found = type_name(value);
    if flag(schema, "x-kubernetes-int-or-string") {
        return (!matches!(found, "integer" | "string")).then(|| FieldErrorKind::Type {
            expected: "integer or string".into(),
            found,
        });
    }
    let expected = schema.get("type").and_then(Value::as_str)?;
    let ok = match expected {
        "number" => matches!(found, "integer" | "number"),
        other => other == found,
    };
    (!ok).then(|| FieldErrorKind::Type {
        expected: expected.to_string(),
        found,
    })
}

fn enum_mismatch(schema: &serde_json::Map<String, Value>, value: &Value) -> Option<FieldErrorKind> {
    let allowed = schema.get("enum").and_then(Value::as_array)?;
    if allowed.contains(value) {
        return None;
    }
    let allowed = allowed
        .iter()
        .map(|a| {
            a.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| a.to_string())
        })
        .collect();
    Some(FieldErrorKind::NotSupported { allowed })
}

/// What is wrong with a string against its schema's length, pattern and format.
fn string_bounds(schema: &serde_json::Map<String, Value>, text: &str) -> Vec<String> {
    let mut invalid = Vec::new();
    let chars = text.chars().count() as u64;
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && chars > max
    {
        invalid.push(format!("may not be longer than {max} characters"));
    }
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && chars < min
    {
        invalid.push(if min == 1 {
            "must not be empty".to_string()
        } else {
            format!("must be at least {min} characters long")
        });
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && let Some(regex) = compiled(pattern)
        && !regex.is_match(text)
    {
        invalid.push(format!("must match the pattern '{pattern}'"));
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") && !is_rfc3339(text) {
        invalid.push("must be an RFC 3339 date-time".into());
    }
    invalid
}

/// What is wrong with a number against its schema's bounds and format.
fn number_bounds(schema: &serde_json::Map<String, Value>, n: f64) -> Vec<String> {
    let mut invalid = Vec::new();
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && n > max
    {
        invalid.push(format!("must be less than or equal to {max}"));
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && n < min
    {
        invalid.push(format!("must be greater than or equal to {min}"));
    }
    if schema.get("format").and_then(Value::as_str) == Some("int32")
        && (n > i32::MAX as f64 || n < i32::MIN as f64)
    {
        invalid.push("must fit in a 32-bit integer".into());
    }
    invalid
}

fn array_bounds(schema: &serde_json::Map<String, Value>, len: usize) -> Vec<String> {
    let mut invalid = Vec::new();
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len as u64 > max
    {
        invalid.push(format!("must have at most {max} items"));
    }
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && (len as u64) < min
    {
        invalid.push(format!("must have at least {min} item(s)"));
    }
    invalid
}

fn object_bounds(schema: &serde_json::Map<String, Value>, len: usize) -> Vec<String> {
    match schema.get("maxProperties").and_then(Value::as_u64) {
        Some(max) if len as u64 > max => vec![format!("must have at most {max} entries")],
        _ => Vec::new(),
    }
}

fn missing_required<'a>(
    schema: &'a serde_json::Map<String, Value>,
    fields: &'a serde_json::Map<String, Value>,
    path: &'a str,
) -> impl Iterator<Item = FieldError> + 'a {
    schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|name| !fields.contains_key(*name))
        .map(|name| FieldError {
            path: join(path, name),
            kind: FieldErrorKind::Required,
            value: String::new(),
        })
}

/// Each field against its property's schema, or `additionalProperties`; a field
/// neither declares is unknown unless the schema preserves unknown fields.
fn walk_fields(
    schema: &serde_json::Map<String, Value>,
    fields: &serde_json::Map<String, Value>,
    path: &str,
    root: bool,
    options: Options,
    errors: &mut Vec<FieldError>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let preserve_unknown = flag(schema, "x-kubernetes-preserve-unknown-fields");
    for (name, field_value) in fields {
        if root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        let field_path = join(path, name);
        match (properties.and_then(|p| p.get(name)), additional) {
            (Some(field_schema), _) => walk(
                field_schema,
                field_value,
                &field_path,
                false,
                options,
                errors,
            ),
            (None, Some(additional)) if additional.is_object() => {
                walk(additional, field_value, &field_path, false, options, errors)
            }
            (None, Some(Value::Bool(true))) => {}
            (None, _) if preserve_unknown => {}
            (None, _) => {
                if options.reject_unknown_fields {
                    errors.push(FieldError {
                        path: field_path,
                        kind: FieldErrorKind::Unknown,
                        value: String::new(),
                    });
                }
            }
        }
    }
}

fn check_list_type(
    schema: &serde_json::Map<String, Value>,
    items: &[Value],
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            let mut seen = BTreeSet::new();
            for (index, item) in items.iter().enumerate() {
                if !seen.insert(item.to_string()) {
                    errors.push(FieldError {
                        path: format!("{path}[{index}]"),
                        kind: FieldErrorKind::Duplicate,
                        value: render(item),
                    });
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut seen = BTreeSet::new();
            for (index, item) in items.iter().enumerate() {
                let key: Vec<String> = keys
                    .iter()
                    .map(|k| item.get(*k).map(Value::to_string).unwrap_or_default())
                    .collect();
                if !seen.insert(key.clone()) {
                    errors.push(FieldError {
                        path: format!("{path}[{index}]"),
                        kind: FieldErrorKind::Duplicate,
                        value: format!(
                            "{{{}}}",
                            keys.iter()
                                .zip(&key)
                                .map(|(k, v)| format!("\"{k}\":{v}"))
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    });
                }
            }
        }
        _ => {}
    }
}

/// Removes the fields `schema` does not declare (where it does not preserve unknown
/// fields), as the API server prunes custom resources, and returns their paths.
/// Root-level `apiVersion`, `kind` and `metadata` are kept.
pub fn prune(schema: &Value, value: &mut Value) -> Vec<String> {
    let mut pruned = Vec::new();
    prune_walk(schema, value, "", true, &mut pruned);
    pruned
}

fn prune_walk(schema: &Value, value: &mut Value, path: &str, root: bool, pruned: &mut Vec<String>) {
    let Some(schema) = schema.as_object() else {
        return;
    };
    let preserve_unknown = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    match value {
        Value::Object(fields) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut unknown = Vec::new();
            for (name, field_value) in fields.iter_mut() {
                if root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let field_path = join(path, name);
                match (properties.and_then(|p| p.get(name)), additional) {
                    (Some(field_schema), _) => {
                        prune_walk(field_schema, field_value, &field_path, false, pruned)
                    }
                    (None, Some(additional)) if additional.is_object() => {
                        prune_walk(additional, field_value, &field_path, false, pruned)
                    }
                    (None, Some(Value::Bool(true))) => {}
                    (None, _) if preserve_unknown => {}
                    (None, _) => unknown.push(name.clone()),
                }
            }
            for name in unknown {
                fields.remove(&name);
                pruned.push(join(path, &name));
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter_mut().enumerate() {
                    prune_walk(
                        item_schema,
                        item,
                        &format!("{path}[{index}]"),
                        false,
                        pruned,
                    );
                }
            }
        }
        _ => {}
    }
}

/// True for the RFC 3339 date-times Kubernetes accepts, e.g. `2026-11-22T21:00:00Z`.
pub fn is_rfc3339(text: &str) -> bool {
    static PATTERN: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    PATTERN
        .get_or_init(|| {
            Regex::new(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
                .expect("valid regex")
        })
        .is_match(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["os"],
                    "properties": {
                        "os": {"type": "string", "enum": ["Windows", "Linux"]},
                        "timeout": {"type": "integer", "maximum": 180, "minimum": 1},
                        "name": {"type": "string", "maxLength": 5, "pattern": "^[a-z]+$"},
                        "limit": {"x-kubernetes-int-or-string": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "targets": {
                            "type": "array", "maxItems": 2,
                            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                            "items": {"type": "object", "properties": {"name": {"type": "string"}}}
                        },
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }
                }
            }
        })
    }

    fn paths(value: Value) -> Vec<String> {
        validate(&schema(), &value, Options::default())
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn accepts_a_valid_object_and_ignores_root_metadata() {
        let value = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"},
            "spec": {"os": "Linux", "timeout": 5, "name": "abc", "limit": "10%", "labels": {"a": "b"},
                     "targets": [{"name": "a"}, {"name": "b"}], "free": {"anything": [1]}}});
        assert_eq!(paths(value), Vec::<String>::new());
    }

    #[test]
    fn names_every_broken_field() {
        let value = json!({"spec": {"os": "Mac", "timeout": 500, "name": "ABCDEFG", "limit": true,
            "labels": {"a": 1}, "targets": [{"name": "a"}, {"name": "a"}, {"name": "c"}], "extra": 1}});
        let errors = paths(value);
        let joined = errors.join("\n");
        for expected in [
            "spec.os: Unsupported value: \"Mac\": supported values: \"Windows\", \"Linux\"",
            "spec.timeout: Invalid value: 500: must be less than or equal to 180",
            "spec.name: Invalid value: \"ABCDEFG\": may not be longer than 5 characters",
            "spec.name: Invalid value: \"ABCDEFG\": must match the pattern '^[a-z]+$'",
            "spec.limit: must be of type integer or string, not boolean: true",
            "spec.labels.a: must be of type string, not integer: 1",
            "spec.targets: Invalid value",
            "spec.targets[1]: Duplicate value: {\"name\":\"a\"}",
            "spec.extra: unknown field",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
    }

    #[test]
    fn prunes_undeclared_fields_and_keeps_preserved_ones() {
        let mut value = json!({"apiVersion": "x/v1", "kind": "K", "metadata": {"name": "a"}, "extra": 1,
            "spec": {"os": "Linux", "bogus": true, "targets": [{"name": "a", "zzz": 1}],
                     "free": {"anything": [1]}, "labels": {"k": "v"}}});
        let mut pruned = prune(&schema(), &mut value);
        pruned.sort();
        assert_eq!(pruned, vec!["extra", "spec.bogus", "spec.targets[0].zzz"]);
        assert_eq!(value["spec"]["free"]["anything"], json!([1]));
        assert_eq!(value["spec"]["labels"]["k"], "v");
        assert_eq!(value["metadata"]["name"], "a");
        assert!(value["spec"].get("bogus").is_none());
        assert!(validate(&schema(), &value, Options::default()).is_empty());
    }

    #[test]
    fn reports_missing_required_fields() {
        assert_eq!(paths(json!({"spec": {}})), vec!["spec.os: Required value"]);
        assert_eq!(paths(json!({})), vec!["spec: Required value"]);
    }
}
