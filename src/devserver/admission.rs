//! What an object must pass before it is stored: metadata checks for every kind, and
//! for custom resources the CRD schema pipeline an API server runs — unknown fields
//! rejected (`fieldValidation=Strict`) or pruned with a warning, defaults applied,
//! structural validation (`crate::structural`), then the `x-kubernetes-validations`
//! CEL rules with `oldSelf` on updates.

use serde_json::Value;

use kube::core::cel::Validator;

use super::errors::{ApiError, Cause};
use super::registry::ResourceKind;
use crate::manifests::{is_dns_label, is_dns_subdomain};
use crate::structural::{self, FieldErrorKind};

/// How to treat fields the schema does not declare (`fieldValidation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(text: Option<&str>) -> Self {
        match text {
            Some("Strict") => Self::Strict,
            Some("Ignore") => Self::Ignore,
            _ => Self::Warn,
        }
    }
}

thread_local! {
    // Not Sync; one per worker thread, built on first use.
    static VALIDATOR: Validator = Validator::new();
}

fn cause(field: &str, reason: &str, message: String) -> Cause {
    Cause {
        reason: reason.into(),
        message,
        field: field.into(),
    }
}

/// The steps of a field path like `spec.targets[0].name`: fields, and list indices.
fn steps(path: &str) -> Vec<Result<String, usize>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (field, indices) = part.split_once('[').map_or((part, ""), |(f, i)| (f, i));
        if !field.is_empty() {
            out.push(Ok(field.to_string()));
        }
        for index in indices.split('[').filter(|i| !i.is_empty()) {
            let index = index.trim_end_matches(']');
            out.push(match index.parse::<usize>() {
                Ok(i) => Err(i),
                Err(_) => Ok(index.trim_matches('"').to_string()),
            });
        }
    }
    out
}

fn value_at<'a>(object: &'a Value, path: &str) -> &'a Value {
    steps(path).iter().fold(object, |current, step| match step {
        Ok(field) => &current[field.as_str()],
        Err(index) => &current[*index],
    })
}

/// The schema nodes along a field path, the root's first.
fn schemas_along<'a>(schema: &'a Value, path: &str) -> Vec<&'a Value> {
    let mut nodes = vec![schema];
    let mut current = schema;
    for step in steps(path) {
        let next = match step {
            Ok(field) => current["properties"].get(&field).or_else(|| {
                current
                    .get("additionalProperties")
                    .filter(|a| a.is_object())
            }),
            Err(_) => current.get("items"),
        };
        match next {
            Some(next) => {
                nodes.push(next);
                current = next;
            }
            None => break,
        }
    }
    nodes
}

/// The schema type of the node a CEL rule sits on, which the API server names in its
/// errors (`Invalid value: "object": ...`) — the node the rule is declared on, not the
/// field its `fieldPath` points at.
fn rule_type(schema: &Value, field_path: &str, rule: &str) -> String {
    schemas_along(schema, field_path)
        .into_iter()
        .rev()
        .find(|node| {
            node["x-kubernetes-validations"]
                .as_array()
                .is_some_and(|rules| rules.iter().any(|r| r["rule"] == rule))
        })
        .and_then(|node| node["type"].as_str())
        .unwrap_or("object")
        .to_string()
}

/// A number as Go's `%v` prints it.
fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// The API server's cause for one schema violation (kube-openapi's wording, as the
/// apiextensions server passes it on): `Invalid` errors are told apart by checking the
/// node's keywords in the order the validator checked them.
fn schema_causes(
    schema: &Value,
    object: &Value,
    errors: &[structural::FieldError],
    body_root: &str,
) -> Vec<Cause> {
    let mut seen: Vec<(String, usize)> = Vec::new();
    errors
        .iter()
        .map(|e| {
            let path = e.path.as_str();
            let body_path = path.strip_prefix(body_root).unwrap_or(path);
            let in_body =
                |detail: String| format!("Invalid value: {}: {body_path} in body {detail}", e.value);
            match &e.kind {
                FieldErrorKind::Type { expected, found } => cause(
                    path,
                    "FieldValueTypeInvalid",
                    format!("Invalid value: \"{found}\": {body_path} in body must be of type {expected}: \"{found}\""),
                ),
                FieldErrorKind::Invalid(_) => {
                    let n = match seen.iter_mut().find(|(p, _)| p == path) {
                        Some((_, n)) => {
                            *n += 1;
                            *n
                        }
                        None => {
                            seen.push((path.to_string(), 0));
                            0
                        }
                    };
                    let node = schemas_along(schema, path).pop().unwrap_or(schema);
                    match failed_keywords(node, value_at(object, path)).get(n) {
                        Some(Keyword::MaxLength(max)) => cause(
                            path,
                            "FieldValueTooLong",
                            format!("Too long: may not be more than {max} bytes"),
                        ),
                        Some(Keyword::MaxItems(count, max)) => cause(
                            path,
                            "FieldValueTooMany",
                            format!("Too many: {count}: must have at most {max} items"),
                        ),
                        Some(Keyword::Detail(detail)) => {
                            cause(path, "FieldValueInvalid", in_body(detail.clone()))
                        }
                        None => cause(path, e.reason(), e.message()),
                    }
                }
                _ => cause(path, e.reason(), e.message()),
            }
        })
        .collect()
}

enum Keyword {
    MaxLength(u64),
    MaxItems(usize, u64),
    Detail(String),
}

/// The keywords of a schema node a value fails, in the order `crate::structural`
/// reports them.
fn failed_keywords(node: &Value, value: &Value) -> Vec<Keyword> {
    let mut failed = Vec::new();
    match value {
        Value::String(text) => {
            let chars = text.chars().count() as u64;
            if let Some(max) = node["maxLength"].as_u64().filter(|m| chars > *m) {
                failed.push(Keyword::MaxLength(max));
            }
            if let Some(min) = node["minLength"].as_u64().filter(|m| chars < *m) {
                failed.push(Keyword::Detail(format!(
                    "should be at least {min} chars long"
                )));
            }
            if let Some(pattern) = node["pattern"].as_str()
                && regex::Regex::new(pattern).is_ok_and(|r| !r.is_match(text))
            {
                failed.push(Keyword::Detail(format!("should match '{pattern}'")));
            }
            if node["format"] == "date-time" && chrono::DateTime::parse_from_rfc3339(text).is_err()
            {
                failed.push(Keyword::Detail(format!(
                    "must be of type date-time: {value}"
                )));
            }
        }
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = node["maximum"].as_f64().filter(|m| n > *m) {
                failed.push(Keyword::Detail(format!(
                    "should be less than or equal to {}",
                    number(max)
                )));
            }
            if let Some(min) = node["minimum"].as_f64().filter(|m| n < *m) {
                failed.push(Keyword::Detail(format!(
                    "should be greater than or equal to {}",
                    number(min)
                )));
            }
        }
        Value::Array(items) => {
            if let Some(max) = node["maxItems"]
                .as_u64()
                .filter(|m| items.len() as u64 > *m)
            {
                failed.push(Keyword::MaxItems(items.len(), max));
            }
            if let Some(min) = node["minItems"]
                .as_u64()
                .filter(|m| (items.len() as u64) < *m)
            {
                failed.push(Keyword::Detail(format!("should have at least {min} items")));
            }
        }
        Value::Object(fields) => {
            if let Some(max) = node["maxProperties"]
                .as_u64()
                .filter(|m| fields.len() as u64 > *m)
            {
                failed.push(Keyword::MaxItems(fields.len(), max));
            }
        }
        _ => {}
    }
    failed
}

/// Schema errors that keep the API server from evaluating CEL rules at all.
fn blocks_cel(cause: &Cause) -> bool {
    matches!(
        cause.reason.as_str(),
        "FieldValueNotSupported"
            | "FieldValueRequired"
            | "FieldValueTooLong"
            | "FieldValueTooMany"
            | "FieldValueTypeInvalid"
    )
}

/// What strict decoding says about unknown fields.
fn strict_decoding_error(kind: &ResourceKind, unknown: &[String]) -> ApiError {
    ApiError::BadRequest(format!(
        "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
        kind.kind,
        kind.version,
        kind.kind,
        unknown.join(", ")
    ))
}

/// ConfigMap and Secret keys: what a file name in a volume can be.
fn config_key_causes(object: &Value) -> Vec<Cause> {
    let valid = |key: &str| {
        !key.is_empty()
            && key.len() <= 253
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ["data", "binaryData"]
        .iter()
        .flat_map(|field| {
            object[*field]
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|key| !valid(key))
                .map(move |key| {
                    cause(
                        &format!("{field}[{key}]"),
                        "FieldValueInvalid",
                        format!(
                            "Invalid value: {key:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
                        ),
                    )
                })
        })
        .collect()
}

/// Under `fieldValidation=Strict`: every field the schema lacks, sorted, in one
/// strict decoding error.
fn refuse_unknown_fields(
    kind: &ResourceKind,
    schema: &Value,
    object: &Value,
) -> Result<(), ApiError> {
    let options = structural::Options {
        reject_unknown_fields: true,
    };
    let mut unknown: Vec<String> = structural::validate(schema, object, options)
        .into_iter()
        .filter(|e| e.kind == FieldErrorKind::Unknown)
        .map(|e| format!("unknown field \"{}\"", e.path))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort();
    Err(strict_decoding_error(kind, &unknown))
}

/// Built-in kinds are stored as sent, except for fields their Kubernetes schema does
/// not have: refused under Strict, dropped (with a warning under Warn) otherwise.
fn admit_builtin(
    kind: &ResourceKind,
    object: &mut Value,
    validation: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let Some(schema) = super::discovery::builtin_field_schema(&kind.group, &kind.plural) else {
        return Ok(Vec::new());
    };
    if validation == FieldValidation::Strict {
        refuse_unknown_fields(kind, &schema, object)?;
    }
    let mut pruned = structural::prune(&schema, object);
    pruned.sort();
    Ok(match validation {
        FieldValidation::Warn => pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect(),
        _ => Vec::new(),
    })
}

/// What is wrong with an object's name, labels and (for ConfigMaps and Secrets) keys.
fn metadata_causes(kind: &ResourceKind, object: &Value) -> Vec<Cause> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut causes = Vec::new();
    let name_ok = if kind.plural == "namespaces" {
        is_dns_label(name)
    } else {
        is_dns_subdomain(name) || kind.is_virtual()
    };
    if !name_ok {
        let message = if kind.plural == "namespaces" {
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
            )
        } else {
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
            )
        };
        causes.push(cause("metadata.name", "FieldValueInvalid", message));
    }
    if !kind.custom && matches!(kind.plural.as_str(), "configmaps" | "secrets") {
        causes.extend(config_key_causes(object));
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        for (key, value) in labels {
            if !value.is_string() {
                causes.push(cause(
                    &format!("metadata.labels.{key}"),
                    "FieldValueTypeInvalid",
                    "label values must be strings".into(),
                ));
            } else if value.as_str().is_some_and(|v| v.len() > 63) {
                causes.push(cause(
                    "metadata.labels",
                    "FieldValueInvalid",
                    format!("Invalid value: {value}: must be no more than 63 characters"),
                ));
            }
        }
    }
    causes
}

/// Checks (and defaults, and prunes) `object` for `kind`. Returns warnings for the
/// response's `Warning` headers.
pub fn admit(
    kind: &ResourceKind,
    object: &mut Value,
    old: Option<&Value>,
    validation: FieldValidation,
    subresource: &str,
) -> Result<Vec<String>, ApiError> {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let invalid = |causes: Vec<Cause>| ApiError::invalid(&kind.group, &kind.kind, &name, causes);

    let causes = metadata_causes(kind, object);
    if !causes.is_empty() {
        return Err(invalid(causes));
    }

    let Some(schema) = kind.schema.as_ref() else {
        return admit_builtin(kind, object, validation);
    };

    let mut warnings = Vec::new();
    if validation == FieldValidation::Strict {
        refuse_unknown_fields(kind, &schema.json, object)?;
    }
    let mut pruned = structural::prune(&schema.json, object);
    pruned.sort();
    if validation == FieldValidation::Warn {
        warnings.extend(pruned.iter().map(|p| format!("unknown field \"{p}\"")));
    }

    *object = kube::core::cel::apply_defaults(&schema.json, object);

    let errors = structural::validate(
        &schema.json,
        object,
        structural::Options {
            reject_unknown_fields: false,
        },
    );
    // The status subresource validates the status on its own: its messages name
    // fields from there.
    let body_root = if subresource == "status" {
        "status."
    } else {
        ""
    };
    let mut causes = schema_causes(&schema.json, object, &errors, body_root);
    if causes.iter().any(blocks_cel) {
        causes.push(cause(
            "<nil>",
            "FieldValueInvalid",
            "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
        ));
    } else if let Err(errors) =
        VALIDATOR.with(|v| v.validate_compiled(&schema.compiled, object, old))
    {
        causes.extend(errors.as_slice().iter().map(|e| {
            cause(
                &e.field_path,
                e.reason.as_deref().unwrap_or("FieldValueInvalid"),
                format!(
                    "Invalid value: \"{}\": {}",
                    rule_type(&schema.json, &e.field_path, &e.rule),
                    e.message
                ),
            )
        }));
    }
    if !causes.is_empty() {
        return Err(invalid(causes));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devserver::registry::Registry;
    use serde_json::json;

    fn kind(plural: &str) -> std::sync::Arc<ResourceKind> {
        let registry = Registry::with_our_crds();
        registry.find("fleetpatch.io", "v1alpha1", plural).unwrap()
    }

    fn task(key_path: &str) -> Value {
        json!({"apiVersion": "fleetpatch.io/v1alpha1", "kind": "Task",
               "metadata": {"name": "t", "namespace": "default"},
               "spec": {"os": "Windows", "type": "ChangeRegistryKey", "timeoutMinutes": 5,
                        "changeRegistryKey": {"keyPath": key_path, "valueType": "REG_SZ",
                                              "valueName": "v", "valueData": "d"}}})
    }

    #[test]
    fn defaults_prunes_and_validates_a_task() {
        let kind = kind("tasks");
        let mut ok = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X");
        ok["spec"]["bogus"] = json!(1);
        let warnings = admit(&kind, &mut ok, None, FieldValidation::Warn, "").unwrap();
        assert_eq!(warnings, vec!["unknown field \"spec.bogus\""]);
        assert!(ok["spec"].get("bogus").is_none());
        assert_eq!(ok["spec"]["successExitCodes"], json!([0]));

        let mut strict = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X");
        strict["spec"]["bogus"] = json!(1);
        let err = admit(&kind, &mut strict, None, FieldValidation::Strict, "").unwrap_err();
        assert!(
            err.to_string().contains("unknown field \"spec.bogus\""),
            "{err}"
        );
    }

    #[test]
    fn cel_errors_name_the_field_and_its_type() {
        let kind = kind("tasks");
        let mut bad = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X\");
        let err = admit(&kind, &mut bad, None, FieldValidation::Strict, "").unwrap_err();
        let status = err.to_status();
        assert_eq!(status["code"], 422);
        let cause = &status["details"]["causes"][0];
        assert_eq!(cause["field"], "spec.changeRegistryKey.keyPath");
        assert!(
            cause["message"]
                .as_str()
                .unwrap()
                .starts_with("Invalid value: \"string\": "),
            "{cause}"
        );
    }

    #[test]
    fn built_in_kinds_refuse_or_drop_fields_their_schema_lacks() {
        let registry = Registry::new();
        let deployments = registry.find("apps", "v1", "deployments").unwrap();
        let deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "labels": {"a": "b"}},
            "spec": {"replicaz": 1, "selector": {"matchLabels": {"a": "b"}},
                     "template": {"metadata": {"labels": {"a": "b"}},
                                  "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "x",
                                           "resources": {"limits": {"cpu": "1"}}}]}}}});
        let err = admit(
            &deployments,
            &mut deployment.clone(),
            None,
            FieldValidation::Strict,
            "",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field \"spec.replicaz\""), "{text}");
        assert!(
            text.contains("spec.template.spec.containers[0].imagePullPolicyy"),
            "{text}"
        );
        let mut lenient = deployment.clone();
        let warnings = admit(&deployments, &mut lenient, None, FieldValidation::Warn, "").unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(lenient["spec"].get("replicaz").is_none());
        assert_eq!(
            lenient["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "1"
        );

        // Free-form parts (a CRD's schema, a ConfigMap's data) keep everything.
        let crds = registry
            .find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .unwrap();
        for crd in crate::api::crds() {
            let mut value = serde_json::to_value(crd).unwrap();
            let before = value.clone();
            admit(&crds, &mut value, None, FieldValidation::Strict, "").unwrap();
            assert_eq!(value, before);
        }
    }

    #[test]
    fn metadata_names_are_checked() {
        let kind = kind("tasks");
        let mut bad = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X");
        bad["metadata"]["name"] = json!("Not_Valid");
        let err = admit(&kind, &mut bad, None, FieldValidation::Strict, "").unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }
}
