//! Server-side printing: `meta.k8s.io/v1 Table` responses (`Accept: ...;as=Table`)
//! whose columns are a CRD's additionalPrinterColumns, evaluated with JSONPath
//! (`jsonpath-rust`, RFC 9535, which also reads the Kubernetes filter form
//! `[?(@.type=="Ready")]`), or Name and Age for built-in kinds.

use chrono::{DateTime, Utc};
use jsonpath_rust::JsonPath;
use serde_json::{Value, json};

use super::registry::{PrinterColumn, ResourceKind};

/// How the API server describes the Name column.
const NAME_DESCRIPTION: &str = "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names";

fn columns(kind: &ResourceKind) -> Vec<PrinterColumn> {
    let mut columns = vec![PrinterColumn {
        name: "Name".into(),
        type_: "string".into(),
        format: "name".into(),
        description: NAME_DESCRIPTION.into(),
        priority: 0,
        json_path: ".metadata.name".into(),
    }];
    if kind.printer_columns.is_empty() {
        columns.push(PrinterColumn {
            name: "Age".into(),
            type_: "date".into(),
            format: String::new(),
            description: "CreationTimestamp is a timestamp representing the server time when this object was created.".into(),
            priority: 0,
            json_path: ".metadata.creationTimestamp".into(),
        });
    } else {
        // A printer column without a description is described by its JSONPath.
        columns.extend(kind.printer_columns.iter().map(|c| {
            let mut column = c.clone();
            if column.description.is_empty() && kind.custom {
                column.description = format!(
                    "Custom resource definition column (in JSONPath format): {}",
                    column.json_path
                );
            }
            column
        }));
    }
    columns
}

/// Kubernetes' short "age" rendering: 45s, 12m, 3h4m, 5d, 2y.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => {
            let (m, r) = (s / 60, s % 60);
            if r == 0 {
                format!("{m}m")
            } else {
                format!("{m}m{r}s")
            }
        }
        s if s < 3 * 3600 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if h == 0 {
                format!("{m}m")
            } else if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => {
            let (d, h) = (s / 86400, (s % 86400) / 3600);
            if h == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{h}h")
            }
        }
        s if s < 2 * 365 * 86400 => format!("{}d", s / 86400),
        s => format!("{}y", s / (365 * 86400)),
    }
}

fn cell(object: &Value, column: &PrinterColumn, now: DateTime<Utc>) -> Value {
    let path = column.json_path.trim();
    let path = path
        .strip_prefix('{')
        .and_then(|p| p.strip_suffix('}'))
        .unwrap_or(path);
    let query = if path.starts_with('$') {
        path.to_string()
    } else {
        format!("${path}")
    };
    let found: Vec<&Value> = object.query(&query).unwrap_or_default();
    let Some(first) = found.first() else {
        return Value::Null;
    };
    match column.type_.as_str() {
        "date" => match first
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        {
            Some(at) => json!(human_duration((now - at.with_timezone(&Utc)).num_seconds())),
            None => Value::Null,
        },
        "integer" | "number" | "boolean" => (*first).clone(),
        _ => match first {
            Value::String(s) => json!(s),
            other => {
                let parts: Vec<String> = found
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                if found.len() > 1 {
                    json!(parts.join(","))
                } else {
                    json!(other.to_string())
                }
            }
        },
    }
}

/// A Table of `objects`. `include_object` is the `includeObject` parameter
/// (`None`, `Object` or the default `Metadata`).
pub fn render(
    kind: &ResourceKind,
    objects: &[&Value],
    list_meta: Value,
    include_object: &str,
    with_columns: bool,
) -> Value {
    let now = Utc::now();
    let columns = columns(kind);
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let cells: Vec<Value> = columns.iter().map(|c| cell(object, c, now)).collect();
            let row_object = match include_object {
                "None" => Value::Null,
                "Object" => (*object).clone(),
                _ => json!({
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": object["metadata"],
                }),
            };
            json!({"cells": cells, "object": row_object})
        })
        .collect();
    let definitions: Vec<Value> = if with_columns {
        columns
            .iter()
            .map(|c| {
                json!({"name": c.name, "type": c.type_, "format": c.format,
                       "description": c.description, "priority": c.priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind() -> ResourceKind {
        let crds = super::super::registry::our_crds();
        let crd = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == "PatchJob")
            .unwrap();
        let mut kind = (*super::super::registry::kinds_of_crd(crd)[0]).clone();
        kind.printer_columns.push(PrinterColumn {
            name: "Ready".into(),
            type_: "string".into(),
            format: String::new(),
            description: String::new(),
            priority: 0,
            json_path: ".status.conditions[?(@.type==\"Ready\")].status".into(),
        });
        kind
    }

    #[test]
    fn renders_printer_columns_with_filters() {
        let created = (Utc::now() - chrono::Duration::seconds(300)).to_rfc3339();
        let object = json!({"metadata": {"name": "job-1", "creationTimestamp": created},
            "spec": {"plan": "p", "agent": "a"},
            "status": {"phase": "Running", "conditions": [
                {"type": "Complete", "status": "False"}, {"type": "Ready", "status": "True"}]}});
        let table = render(&kind(), &[&object], json!({}), "Metadata", true);
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names[..4], ["Name", "Plan", "Agent", "Phase"]);
        let cells = &table["rows"][0]["cells"];
        let at = |name: &str| &cells[names.iter().position(|n| *n == name).unwrap()];
        assert_eq!(at("Name"), "job-1");
        assert_eq!(at("Phase"), "Running");
        assert_eq!(at("Age"), "5m");
        assert_eq!(at("Ready"), "True");
        assert_eq!(at("Actions"), &Value::Null);
        assert_eq!(table["rows"][0]["object"]["metadata"]["name"], "job-1");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3 * 3600 + 60), "3h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(30 * 86400), "30d");
    }
}
