//! Decoding of the Kubernetes protobuf encoding for the few built-in kinds kubectl's
//! typed clients send that way (`kubectl create namespace|configmap|secret|
//! serviceaccount|token`, evictions). Requests only: responses are always JSON,
//! which every client accepts. Other kinds sent as protobuf get 415.
//!
//! Field numbers are those of `k8s.io/api` `generated.proto`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("not a Kubernetes protobuf envelope")]
    NoEnvelope,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("protobuf bodies are not supported for kind {0}; send JSON")]
    UnsupportedKind(String),
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Iterates over (field number, value) pairs of one message.
fn fields(mut data: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ProtobufError> {
    fn varint(data: &mut &[u8]) -> Result<u64, ProtobufError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = data.split_first().ok_or(ProtobufError::Malformed)?;
            *data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ProtobufError::Malformed)
    }
    let mut out = Vec::new();
    while !data.is_empty() {
        let tag = varint(&mut data)?;
        let field = match tag & 7 {
            0 => Field::Varint(varint(&mut data)?),
            1 | 5 => {
                let width = if tag & 7 == 1 { 8 } else { 4 };
                if data.len() < width {
                    return Err(ProtobufError::Malformed);
                }
                data = &data[width..];
                Field::Fixed
            }
            2 => {
                let len = varint(&mut data)? as usize;
                if data.len() < len {
                    return Err(ProtobufError::Malformed);
                }
                let (bytes, rest) = data.split_at(len);
                data = rest;
                Field::Bytes(bytes)
            }
            _ => return Err(ProtobufError::Malformed),
        };
        out.push((tag >> 3, field));
    }
    Ok(out)
}

fn string(field: &Field) -> String {
    match field {
        Field::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        _ => String::new(),
    }
}

fn message<'a>(field: &Field<'a>) -> &'a [u8] {
    match field {
        Field::Bytes(b) => b,
        _ => &[],
    }
}

fn varint_of(field: &Field) -> u64 {
    match field {
        Field::Varint(v) => *v,
        _ => 0,
    }
}

/// A `map<string, string>` (or bytes, base64-encoded as JSON does) entry.
fn map_entry(field: &Field, bytes_values: bool) -> Result<(String, Value), ProtobufError> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (number, f) in fields(message(field))? {
        match number {
            1 => key = string(&f),
            2 if bytes_values => value = json!(STANDARD.encode(message(&f))),
            2 => value = json!(string(&f)),
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_entry(map: &mut Value, field: &Field, bytes_values: bool) -> Result<(), ProtobufError> {
    let (key, value) = map_entry(field, bytes_values)?;
    if !map.is_object() {
        *map = Value::Object(Map::new());
    }
    map[key] = value;
    Ok(())
}

fn push(list: &mut Value, value: Value) {
    match list {
        Value::Array(items) => items.push(value),
        other => *other = json!([value]),
    }
}

fn object_meta(data: &[u8]) -> Result<Value, ProtobufError> {
    let mut meta = json!({});
    for (number, f) in fields(data)? {
        match number {
            1 if !string(&f).is_empty() => meta["name"] = json!(string(&f)),
            2 if !string(&f).is_empty() => meta["generateName"] = json!(string(&f)),
            3 if !string(&f).is_empty() => meta["namespace"] = json!(string(&f)),
            6 if !string(&f).is_empty() => meta["resourceVersion"] = json!(string(&f)),
            11 => insert_entry(&mut meta["labels"], &f, false)?,
            12 => insert_entry(&mut meta["annotations"], &f, false)?,
            13 => {
                let mut owner = json!({});
                for (n, o) in fields(message(&f))? {
                    match n {
                        1 => owner["kind"] = json!(string(&o)),
                        3 => owner["name"] = json!(string(&o)),
                        4 => owner["uid"] = json!(string(&o)),
                        5 => owner["apiVersion"] = json!(string(&o)),
                        6 => owner["controller"] = json!(varint_of(&o) != 0),
                        7 => owner["blockOwnerDeletion"] = json!(varint_of(&o) != 0),
                        _ => {}
                    }
                }
                push(&mut meta["ownerReferences"], owner);
            }
            14 => push(&mut meta["finalizers"], json!(string(&f))),
            _ => {}
        }
    }
    Ok(meta)
}

/// The kinds a protobuf body may carry here: those kubectl and client-go send as
/// protobuf to the endpoints the dev server serves.
const DECODED_KINDS: &[&str] = &[
    "Namespace",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "TokenRequest",
    "Eviction",
    "DeleteOptions",
];

/// Decodes a protobuf request body into the JSON object it stands for.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let envelope = body
        .strip_prefix(b"k8s\x00")
        .ok_or(ProtobufError::NoEnvelope)?;
    let (api_version, kind, raw) = unknown_envelope(envelope)?;
    let mut object = json!({"apiVersion": api_version, "kind": kind, "metadata": {}});
    for (number, f) in fields(raw)? {
        match (kind.as_str(), number) {
            ("DeleteOptions", _) => delete_options_field(&mut object, number, &f)?,
            (_, 1) => object["metadata"] = object_meta(message(&f))?,
            _ => kind_field(&mut object, &kind, number, &f)?,
        }
    }
    if !DECODED_KINDS.contains(&kind.as_str()) {
        return Err(ProtobufError::UnsupportedKind(kind));
    }
    Ok(object)
}

/// The `runtime.Unknown` envelope: apiVersion, kind and the raw object bytes.
fn unknown_envelope(envelope: &[u8]) -> Result<(String, String, &[u8]), ProtobufError> {
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (number, f) in fields(envelope)? {
        match number {
            1 => {
                for (n, t) in fields(message(&f))? {
                    match n {
                        1 => api_version = string(&t),
                        2 => kind = string(&t),
                        _ => {}
                    }
                }
            }
            2 => raw = message(&f),
            _ => {}
        }
    }
    Ok((api_version, kind, raw))
}

fn delete_options_field(object: &mut Value, number: u64, f: &Field) -> Result<(), ProtobufError> {
    match number {
        2 => {
            for (n, p) in fields(message(f))? {
                match n {
                    1 => object["preconditions"]["uid"] = json!(string(&p)),
                    2 => object["preconditions"]["resourceVersion"] = json!(string(&p)),
                    _ => {}
                }
            }
        }
        4 => object["propagationPolicy"] = json!(string(f)),
        _ => {}
    }
    Ok(())
}

/// One top-level field (after metadata) of an object of `kind`.
fn kind_field(object: &mut Value, kind: &str, number: u64, f: &Field) -> Result<(), ProtobufError> {
    match (kind, number) {
        ("Namespace", 2) => {
            object["spec"] = json!({});
            for (n, s) in fields(message(f))? {
                if n == 1 {
                    push(&mut object["spec"]["finalizers"], json!(string(&s)));
                }
            }
        }
        ("ConfigMap", 2) => insert_entry(&mut object["data"], f, false)?,
        ("ConfigMap", 3) => insert_entry(&mut object["binaryData"], f, true)?,
        ("ConfigMap", 4) | ("Secret", 5) => object["immutable"] = json!(varint_of(f) != 0),
        ("Secret", 2) => insert_entry(&mut object["data"], f, true)?,
        ("Secret", 3) => object["type"] = json!(string(f)),
        ("Secret", 4) => insert_entry(&mut object["stringData"], f, false)?,
        ("ServiceAccount", 3) => {
            let mut reference = json!({});
            for (n, r) in fields(message(f))? {
                if n == 1 {
                    reference["name"] = json!(string(&r));
                }
            }
            push(&mut object["imagePullSecrets"], reference);
        }
        ("ServiceAccount", 4) => object["automountServiceAccountToken"] = json!(varint_of(f) != 0),
        ("TokenRequest", 2) => object["spec"] = token_request_spec(message(f))?,
        (other, _) if !DECODED_KINDS.contains(&other) => {
            return Err(ProtobufError::UnsupportedKind(other.to_string()));
        }
        _ => {}
    }
    Ok(())
}

fn token_request_spec(data: &[u8]) -> Result<Value, ProtobufError> {
    let mut spec = json!({});
    for (n, s) in fields(data)? {
        match n {
            1 => push(&mut spec["audiences"], json!(string(&s))),
            // BoundObjectReference: kind, apiVersion, name, uid.
            3 => {
                let mut bound = json!({});
                for (m, r) in fields(message(&s))? {
                    let key = match m {
                        1 => "kind",
                        2 => "apiVersion",
                        3 => "name",
                        4 => "uid",
                        _ => continue,
                    };
                    bound[key] = json!(string(&r));
                }
                spec["boundObjectRef"] = bound;
            }
            4 => spec["expirationSeconds"] = json!(varint_of(&s)),
            _ => {}
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![((number << 3) | 2) as u8, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn decodes_a_namespace_as_kubectl_create_sends_it() {
        let meta = [
            field(1, b"fleetpatch-system"),
            field(11, &[field(1, b"a"), field(2, b"b")].concat()),
        ]
        .concat();
        let raw = field(1, &meta);
        let type_meta = [field(1, b"v1"), field(2, b"Namespace")].concat();
        let envelope = [field(1, &type_meta), field(2, &raw)].concat();
        let body = [b"k8s\x00".to_vec(), envelope].concat();
        let object = decode(&body).unwrap();
        assert_eq!(object["kind"], "Namespace");
        assert_eq!(object["metadata"]["name"], "fleetpatch-system");
        assert_eq!(object["metadata"]["labels"]["a"], "b");
    }

    #[test]
    fn refuses_kinds_it_does_not_know() {
        let type_meta = [field(1, b"apps/v1"), field(2, b"Deployment")].concat();
        let body = [
            b"k8s\x00".to_vec(),
            field(1, &type_meta),
            field(2, &field(2, b"x")),
        ]
        .concat();
        assert!(matches!(
            decode(&body),
            Err(ProtobufError::UnsupportedKind(_))
        ));
    }
}
