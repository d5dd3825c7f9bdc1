//! Request bodies: JSON, YAML and (for the kinds kubectl sends that way) protobuf
//! decoded into JSON values, and the fields a JSON body has twice, which strict field
//! validation refuses and the others warn about.

use axum::http::{HeaderMap, header};
use serde_json::Value;

use super::admission::FieldValidation;
use super::errors::ApiError;
use super::handlers::{Request, Target};

pub(super) fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("application/json");
    if content_type.contains("protobuf") {
        return super::protobuf::decode(body).map_err(|e| match e {
            super::protobuf::ProtobufError::UnsupportedKind(_) => {
                ApiError::UnsupportedMediaType("application/json, application/yaml".into())
            }
            other => ApiError::BadRequest(other.to_string()),
        });
    }
    if content_type.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType(
            "application/json, application/yaml".into(),
        ));
    }
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding JSON: {e}")))
    }
}

/// Field paths that occur twice in one JSON object of `body` (`spec.os`), which strict
/// decoding refuses and the others warn about (the last one wins, as in serde_json).
pub(super) fn duplicate_fields(body: &[u8]) -> Vec<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

    struct Walk<'a> {
        path: String,
        found: &'a mut Vec<String>,
    }

    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Walk { path, found } = self;
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if !seen.insert(key) && !found.contains(&child) {
                    found.push(child.clone());
                }
                map.next_value_seed(Walk {
                    path: child,
                    found: &mut *found,
                })?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Walk { path, found } = self;
            let mut index = 0;
            while seq
                .next_element_seed(Walk {
                    path: format!("{path}[{index}]"),
                    found: &mut *found,
                })?
                .is_some()
            {
                index += 1;
            }
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }

    let mut found = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let _ = Walk {
        path: String::new(),
        found: &mut found,
    }
    .deserialize(&mut deserializer);
    found
}

impl Request<'_> {
    /// Duplicate fields: refused under strict validation, a warning under Warn.
    pub(super) fn check_duplicates(&self, target: &Target) -> Result<Vec<String>, ApiError> {
        let found: Vec<String> = self
            .duplicates
            .iter()
            .map(|d| format!("duplicate field \"{d}\""))
            .collect();
        match self.field_validation() {
            _ if found.is_empty() => Ok(Vec::new()),
            FieldValidation::Strict => {
                let kind = &target.kind;
                Err(ApiError::BadRequest(format!(
                    "{} in version {:?} cannot be handled as a {}: strict decoding error: {}",
                    kind.kind,
                    kind.version,
                    kind.kind,
                    found.join(", ")
                )))
            }
            FieldValidation::Warn => Ok(found),
            FieldValidation::Ignore => Ok(Vec::new()),
        }
    }
}
