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

/// The JSON type name of the value at a field path like `spec.targets[0].name`, as
/// the API server names it in CEL errors (`Invalid value: "string": ...`).
fn type_at(object: &Value, path: &str) -> &'static str {
    let mut current = object;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (field, indices) = part.split_once('[').map_or((part, ""), |(f, i)| (f, i));
        if !field.is_empty() {
            current = &current[field];
        }
        for index in indices.split('[').filter(|i| !i.is_empty()) {
            let index = index.trim_end_matches(']');
            current = match index.parse::<usize>() {
                Ok(i) => &current[i],
                Err(_) => &current[index.trim_matches('"')],
            };
        }
    }
    match current {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
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
        let unknown: Vec<String> = structural::validate(
            &schema,
            object,
            structural::Options {
                reject_unknown_fields: true,
            },
        )
        .into_iter()
        .filter(|e| e.kind == FieldErrorKind::Unknown)
        .map(|e| format!("unknown field \"{}\"", e.path))
        .collect();
        if !unknown.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "strict decoding error: {}",
                unknown.join(", ")
            )));
        }
    }
    let pruned = structural::prune(&schema, object);
    Ok(match validation {
        FieldValidation::Warn => pruned
            .iter()
            .map(|p| format!("unknown field \"{p}\""))
            .collect(),
        _ => Vec::new(),
    })
}

/// Checks (and defaults, and prunes) `object` for `kind`. Returns warnings for the
/// response's `Warning` headers.
pub fn admit(
    kind: &ResourceKind,
    object: &mut Value,
    old: Option<&Value>,
    validation: FieldValidation,
) -> Result<Vec<String>, ApiError> {
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let invalid = |causes: Vec<Cause>| ApiError::invalid(&kind.group, &kind.kind, &name, causes);

    let mut causes = Vec::new();
    let name_ok = if kind.plural == "namespaces" {
        is_dns_label(&name)
    } else {
        is_dns_subdomain(&name) || kind.is_virtual()
    };
    if !name_ok {
        causes.push(cause(
            "metadata.name",
            "FieldValueInvalid",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                if kind.plural == "namespaces" { "label" } else { "subdomain" }
            ),
        ));
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
    if !causes.is_empty() {
        return Err(invalid(causes));
    }

    let Some(schema) = kind.schema.as_ref() else {
        return admit_builtin(kind, object, validation);
    };

    let mut warnings = Vec::new();
    if validation == FieldValidation::Strict {
        let unknown: Vec<String> = structural::validate(
            &schema.json,
            object,
            structural::Options {
                reject_unknown_fields: true,
            },
        )
        .into_iter()
        .filter(|e| e.kind == FieldErrorKind::Unknown)
        .map(|e| format!("unknown field \"{}\"", e.path))
        .collect();
        if !unknown.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "strict decoding error: {}",
                unknown.join(", ")
            )));
        }
    }
    let pruned = structural::prune(&schema.json, object);
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
    if !errors.is_empty() {
        return Err(invalid(
            errors
                .iter()
                .map(|e| cause(&e.path, e.reason(), e.message()))
                .collect(),
        ));
    }

    let cel = VALIDATOR.with(|v| v.validate_compiled(&schema.compiled, object, old));
    if let Err(errors) = cel {
        return Err(invalid(
            errors
                .as_slice()
                .iter()
                .map(|e| {
                    cause(
                        &e.field_path,
                        e.reason.as_deref().unwrap_or("FieldValueInvalid"),
                        format!(
                            "Invalid value: \"{}\": {}",
                            type_at(object, &e.field_path),
                            e.message
                        ),
                    )
                })
                .collect(),
        ));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devserver::registry::Registry;
    use serde_json::json;

    fn kind(plural: &str) -> std::sync::Arc<ResourceKind> {
        let registry = Registry::new();
        let crds: Vec<Value> = crate::api::crds()
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        registry.set_crds(crds.iter());
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
        let warnings = admit(&kind, &mut ok, None, FieldValidation::Warn).unwrap();
        assert_eq!(warnings, vec!["unknown field \"spec.bogus\""]);
        assert!(ok["spec"].get("bogus").is_none());
        assert_eq!(ok["spec"]["successExitCodes"], json!([0]));

        let mut strict = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X");
        strict["spec"]["bogus"] = json!(1);
        let err = admit(&kind, &mut strict, None, FieldValidation::Strict).unwrap_err();
        assert!(
            err.to_string().contains("unknown field \"spec.bogus\""),
            "{err}"
        );
    }

    #[test]
    fn cel_errors_name_the_field_and_its_type() {
        let kind = kind("tasks");
        let mut bad = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X\");
        let err = admit(&kind, &mut bad, None, FieldValidation::Strict).unwrap_err();
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
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("unknown field \"spec.replicaz\""), "{text}");
        assert!(
            text.contains("spec.template.spec.containers[0].imagePullPolicyy"),
            "{text}"
        );
        let mut lenient = deployment.clone();
        let warnings = admit(&deployments, &mut lenient, None, FieldValidation::Warn).unwrap();
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
            admit(&crds, &mut value, None, FieldValidation::Strict).unwrap();
            assert_eq!(value, before);
        }
    }

    #[test]
    fn metadata_names_are_checked() {
        let kind = kind("tasks");
        let mut bad = task(r"HKEY_LOCAL_MACHINE\SOFTWARE\X");
        bad["metadata"]["name"] = json!("Not_Valid");
        let err = admit(&kind, &mut bad, None, FieldValidation::Strict).unwrap_err();
        assert!(err.to_string().contains("metadata.name"), "{err}");
    }
}
