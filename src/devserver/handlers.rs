//! Request routing and the verbs: get, list, watch, create, update, patch, delete,
//! deletecollection, the status subresource, pod eviction, ServiceAccount tokens and
//! TokenReview; plus what follows a write — CRD registration, namespace clean-up and
//! ownerReference garbage collection. Everything answers in the API server's JSON
//! shapes, errors as `Status` objects.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::admission::{self, FieldValidation};
use super::auth::Claims;
use super::discovery;
use super::errors::{ApiError, Cause};
use super::managed::{self, Writer};
use super::patch::{self, PatchType};
use super::registry::ResourceKind;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{self, EventType, StoreError};
use super::table;
use super::{DeleteOptions, Deleted, Server};

type Query = HashMap<String, String>;

pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(super) fn json_response(
    code: StatusCode,
    value: &impl Serialize,
    warnings: &[String],
) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = (code, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

/// Adds `Warning` headers to a response, before those it has.
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    if warnings.is_empty() {
        return response;
    }
    let existing: Vec<HeaderValue> = response
        .headers()
        .get_all(header::WARNING)
        .iter()
        .cloned()
        .collect();
    response.headers_mut().remove(header::WARNING);
    let mut all: Vec<HeaderValue> = warnings
        .iter()
        .filter_map(|w| {
            HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\""))).ok()
        })
        .collect();
    all.extend(existing);
    for value in all {
        response.headers_mut().append(header::WARNING, value);
    }
    response
}

/// What a request names: a resource (maybe one object, maybe a subresource).
pub(super) struct Target {
    pub(super) kind: Arc<ResourceKind>,
    pub(super) namespace: Option<String>,
    pub(super) name: Option<String>,
    pub(super) subresource: Option<String>,
}

impl Target {
    pub(super) fn key(&self) -> String {
        self.kind.storage_key()
    }
    pub(super) fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }
    pub(super) fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }
    pub(super) fn not_found(&self) -> ApiError {
        ApiError::not_found(&self.kind.group, &self.kind.plural, self.name())
    }
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

fn parse_query(uri: &Uri) -> Query {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn is_true(query: &Query, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
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
fn duplicate_fields(body: &[u8]) -> Vec<String> {
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

/// The entry point for every request.
pub async fn dispatch(
    State(server): State<Arc<Server>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    let public = matches!(
        path.as_str(),
        "/healthz" | "/readyz" | "/livez" | "/version" | "/metrics"
    );
    // kubectl (client-go) never sends a bearer token over plain HTTP, so a request
    // without credentials is the loopback user, the dev server's admin. A request that
    // does carry a token must carry one this server issued.
    let user = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(_) => match authenticate(&server, &headers) {
            Some(user) => Some(user),
            None if public => None,
            None => return ApiError::Unauthorized.into_response(),
        },
    };
    let started = std::time::Instant::now();
    let response = route(&server, &method, &uri, &path, &headers, body, user.as_ref()).await;
    let response = response.unwrap_or_else(IntoResponse::into_response);
    if response.status().is_success()
        && matches!(
            method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        )
    {
        let key = format!("{method} {}", written_resource(&path));
        *server
            .writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default() += 1;
    }
    tracing::debug!(
        %method,
        uri = %uri,
        status = response.status().as_u16(),
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
    response
}

/// `resource` or `resource/subresource` of an API path, for the write counters.
fn written_resource(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // /api/v1/... or /apis/group/version/...
    let rest = match segments.first() {
        Some(&"api") => segments.get(2..).unwrap_or_default(),
        Some(&"apis") => segments.get(3..).unwrap_or_default(),
        _ => return path.to_string(),
    };
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    match rest {
        [resource, _, subresource, ..] => format!("{resource}/{subresource}"),
        [resource, ..] => resource.to_string(),
        [] => "namespaces".to_string(),
    }
}

/// Write counters in the Prometheus text format.
fn write_metrics(server: &Server) -> String {
    let mut out = String::from("# TYPE fleetpatch_devserver_writes_total counter\n");
    for (key, count) in server
        .writes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let (verb, resource) = key.split_once(' ').unwrap_or((key, ""));
        out.push_str(&format!(
            "fleetpatch_devserver_writes_total{{verb=\"{verb}\",resource=\"{resource}\"}} {count}\n"
        ));
    }
    out
}

/// The caller of a request with a bearer token: one this server issued, for the API
/// audience, whose ServiceAccount (and bound object) still exist.
fn authenticate(server: &Server, headers: &HeaderMap) -> Option<Claims> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    server
        .authenticate_token(token, &[])
        .ok()
        .map(|(claims, _)| claims)
}

async fn route(
    server: &Arc<Server>,
    method: &Method,
    uri: &Uri,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    user: Option<&Claims>,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let kinds = server.registry.all();
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value, &[]));
    match segments.as_slice() {
        ["healthz"] | ["readyz"] | ["livez"] => {
            return Ok((StatusCode::OK, "ok").into_response());
        }
        ["metrics"] => return Ok((StatusCode::OK, write_metrics(server)).into_response()),
        ["version"] => return ok(discovery::version()),
        ["api"] => return ok(discovery::core_versions(&server.address)),
        ["apis"] => return ok(discovery::group_list(&kinds)),
        ["api", "v1"] => {
            return discovery::resource_list(&kinds, "", "v1")
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or(ApiError::NoRoute);
        }
        ["apis", group] => {
            return discovery::group(&kinds, group)
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or(ApiError::NoRoute);
        }
        ["apis", group, version] => {
            return discovery::resource_list(&kinds, group, version)
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or(ApiError::NoRoute);
        }
        ["openapi", "v3"] => return ok(discovery::openapi_index(&kinds)),
        ["openapi", "v3", "api", "v1"] => {
            return discovery::openapi_document(&kinds, "", "v1")
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or(ApiError::NoRoute);
        }
        ["openapi", "v3", "apis", group, version] => {
            return discovery::openapi_document(&kinds, group, version)
                .map(|v| json_response(StatusCode::OK, &v, &[]))
                .ok_or(ApiError::NoRoute);
        }
        _ => {}
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::NoRoute),
    };
    let find = |plural: &str| server.registry.find(group, version, plural);
    let target = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if !matches!(*plural, "status" | "finalize") || !tail.is_empty() =>
        {
            let kind = find(plural).ok_or(ApiError::NoRoute)?;
            if !kind.namespaced {
                // No such route at all: the API server's mux answers in plain text.
                return Ok((StatusCode::NOT_FOUND, "404 page not found\n").into_response());
            }
            match tail {
                [] => Target {
                    kind,
                    namespace: Some(ns.to_string()),
                    name: None,
                    subresource: None,
                },
                [name] => Target {
                    kind,
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                    subresource: None,
                },
                [name, sub] => Target {
                    kind,
                    namespace: Some(ns.to_string()),
                    name: Some(name.to_string()),
                    subresource: Some(sub.to_string()),
                },
                _ => return Err(ApiError::NoRoute),
            }
        }
        [plural, tail @ ..] => {
            let kind = find(plural).ok_or(ApiError::NoRoute)?;
            match tail {
                [] => Target {
                    kind,
                    namespace: None,
                    name: None,
                    subresource: None,
                },
                [name] if !kind.namespaced => Target {
                    kind,
                    namespace: None,
                    name: Some(name.to_string()),
                    subresource: None,
                },
                [name, sub] if !kind.namespaced => Target {
                    kind,
                    namespace: None,
                    name: Some(name.to_string()),
                    subresource: Some(sub.to_string()),
                },
                _ => return Err(ApiError::NoRoute),
            }
        }
        _ => return Err(ApiError::NoRoute),
    };
    let query = parse_query(uri);
    let ctx = Request {
        server,
        headers,
        query: &query,
        user,
        duplicates: &[],
    };
    if let Some(sub) = target.subresource.as_deref() {
        return match (sub, method.as_str()) {
            ("status", "GET") => ctx.get(&target),
            ("status", "PUT") => ctx.update(&target, parse_body(headers, &body)?),
            ("status", "PATCH") => ctx.patch(&target, &body),
            ("finalize", "PUT") if target.kind.plural == "namespaces" => {
                ctx.update(&target, parse_body(headers, &body)?)
            }
            ("eviction", "POST") if target.kind.plural == "pods" => {
                ctx.evict(&target, parse_body(headers, &body)?)
            }
            ("token", "POST") if target.kind.plural == "serviceaccounts" => {
                ctx.token_request(&target, parse_body(headers, &body)?)
            }
            ("status" | "finalize" | "eviction" | "token", _) => Err(ApiError::MethodNotAllowed),
            _ => Err(ApiError::NoRoute),
        };
    }
    if target.kind.is_virtual() {
        return match method.as_str() {
            "POST" if target.kind.kind == "TokenReview" => {
                ctx.token_review(parse_body(headers, &body)?)
            }
            _ => Err(ApiError::MethodNotAllowed),
        };
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_none_or(|c| c.contains("json"));
    let duplicates = if is_json && matches!(method.as_str(), "POST" | "PUT") {
        duplicate_fields(&body)
    } else {
        Vec::new()
    };
    let ctx = Request {
        duplicates: &duplicates,
        ..ctx
    };
    match (method.as_str(), target.name.is_some()) {
        ("GET", true) => ctx.get(&target),
        ("GET", false) if is_true(&query, "watch") => ctx.watch(&target),
        ("GET", false) => ctx.list(&target),
        ("POST", false) => ctx.create(&target, parse_body(headers, &body)?),
        ("PUT", true) => ctx.update(&target, parse_body(headers, &body)?),
        ("PATCH", true) => ctx.patch(&target, &body),
        ("DELETE", true) => ctx.delete(&target, parse_body(headers, &body)?),
        ("DELETE", false) => ctx.delete_collection(&target),
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// One request's context.
pub(super) struct Request<'a> {
    pub(super) server: &'a Arc<Server>,
    pub(super) headers: &'a HeaderMap,
    pub(super) query: &'a Query,
    pub(super) user: Option<&'a Claims>,
    /// Fields the JSON body has twice.
    pub(super) duplicates: &'a [String],
}

/// Calls `f` with the schema that decides list and map semantics for managedFields:
/// the CRD's, or the built-in kind's.
fn with_ownership_schema<R>(kind: &ResourceKind, f: impl FnOnce(Option<&Value>) -> R) -> R {
    match &kind.schema {
        Some(schema) => f(Some(&schema.json)),
        None => {
            let builtin = discovery::builtin_ownership_schema(&kind.group, &kind.plural);
            f(builtin.as_deref())
        }
    }
}

/// An object as the requested version presents it (versions share storage).
fn present(kind: &ResourceKind, object: &Value) -> Value {
    let mut object = object.clone();
    if kind.custom {
        object["apiVersion"] = json!(kind.api_version());
    }
    object
}

fn spec_like(object: &Value, status_subresource: bool) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        if status_subresource {
            map.remove("status");
        }
    }
    copy
}

fn without_volatile(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    copy
}

/// The object without resourceVersion and managedFields timestamps.
fn without_times(object: &Value) -> Value {
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

/// The event a watch with selectors reports for a change: an object that starts
/// matching is ADDED, one that stops matching is DELETED, one that never matches is
/// not reported — as the API server does it.
fn selected_event(change: &store::Change, matches: &impl Fn(&Value) -> bool) -> Option<EventType> {
    let now_matches = matches(&change.object);
    let matched_before = change.previous.as_deref().map(matches);
    match (change.kind, matched_before, now_matches) {
        (EventType::Modified, Some(false), true) => Some(EventType::Added),
        (EventType::Modified, Some(true), false) => Some(EventType::Deleted),
        (_, _, false) => None,
        (kind, _, true) => Some(kind),
    }
}

pub(super) fn map_store_error(target: &Target, err: StoreError) -> ApiError {
    let kind = &target.kind;
    match err {
        StoreError::NotFound => target.not_found(),
        StoreError::AlreadyExists => {
            ApiError::already_exists(&kind.group, &kind.plural, target.name())
        }
        StoreError::Conflict => ApiError::conflict(&kind.group, &kind.plural, target.name()),
        StoreError::Gone { requested, oldest } => {
            ApiError::Gone(format!("too old resource version: {requested} ({oldest})"))
        }
        StoreError::Journal(err) => ApiError::Internal(err.to_string()),
    }
}

/// What decoding a built-in object into its Go type does to it, before field
/// ownership is recorded (so the writer owns the result): defaults such as a Secret's
/// type and a namespace's name label, a Secret's `stringData` folded into `data`, and
/// empty maps that `omitempty` leaves out.
fn decode_defaults(kind: &ResourceKind, object: &mut Value) {
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
fn qos_class(pod: &Value) -> &'static str {
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
    pub(super) fn field_manager(&self) -> String {
        if let Some(manager) = self.query.get("fieldManager") {
            return manager.clone();
        }
        self.headers
            .get(header::USER_AGENT)
            .and_then(|u| u.to_str().ok())
            .and_then(|u| u.split('/').next())
            .filter(|u| !u.is_empty())
            .unwrap_or("unknown")
            .to_string()
    }

    pub(super) fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|d| d == "All")
    }

    fn field_validation(&self) -> FieldValidation {
        FieldValidation::parse(self.query.get("fieldValidation").map(String::as_str))
    }

    fn respond(
        &self,
        target: &Target,
        code: StatusCode,
        object: &Value,
        warnings: &[String],
    ) -> Response {
        if wants_table(self.headers) {
            let table = table::render(
                &target.kind,
                &[object],
                json!({"resourceVersion": object["metadata"]["resourceVersion"]}),
                self.query
                    .get("includeObject")
                    .map(String::as_str)
                    .unwrap_or("Metadata"),
                true,
            );
            return json_response(code, &table, warnings);
        }
        json_response(code, &present(&target.kind, object), warnings)
    }

    fn get(&self, target: &Target) -> Result<Response, ApiError> {
        let object = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        Ok(self.respond(target, StatusCode::OK, &object, &[]))
    }

    fn selectors(&self, target: &Target) -> Result<(LabelSelector, FieldSelector), ApiError> {
        let labels = LabelSelector::parse(
            self.query
                .get("labelSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let fields = FieldSelector::parse(
            self.query
                .get("fieldSelector")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        // Custom resources can be selected by name and namespace only (our CRDs declare
        // no selectableFields).
        if target.kind.custom
            && let Some(path) = fields
                .paths()
                .find(|p| !matches!(*p, "metadata.name" | "metadata.namespace"))
        {
            return Err(ApiError::BadRequest(format!(
                "field label not supported: {path}"
            )));
        }
        Ok((labels, fields))
    }

    fn list(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let (items, rv) = self
            .server
            .store
            .list(&target.key(), target.namespace.as_deref());
        let start_after: Option<(String, String)> =
            match self.query.get("continue").filter(|c| !c.is_empty()) {
                Some(token) => {
                    let decoded = base64::Engine::decode(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                        token,
                    )
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| {
                        s.split_once('\0')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                    })
                    .ok_or_else(|| ApiError::BadRequest("invalid continue token".into()))?;
                    Some(decoded)
                }
                None => None,
            };
        let limit: usize = self
            .query
            .get("limit")
            .and_then(|l| l.parse().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let key_of = |o: &Value| {
            (
                o["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        let mut selected: Vec<&Value> = Vec::new();
        let mut more = false;
        let mut remaining = 0usize;
        for item in &items {
            if let Some(after) = &start_after
                && key_of(item) <= *after
            {
                continue;
            }
            if !labels.matches(item) || !fields.matches(item) {
                continue;
            }
            if selected.len() >= limit {
                more = true;
                remaining += 1;
                continue;
            }
            selected.push(item);
        }
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if more && let Some(last) = selected.last() {
            let (ns, name) = key_of(last);
            meta["continue"] = json!(base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                format!("{ns}\0{name}")
            ));
            meta["remainingItemCount"] = json!(remaining);
        }
        if wants_table(self.headers) {
            let table = table::render(
                &target.kind,
                &selected,
                meta,
                self.query
                    .get("includeObject")
                    .map(String::as_str)
                    .unwrap_or("Metadata"),
                true,
            );
            return Ok(json_response(StatusCode::OK, &table, &[]));
        }
        if target.kind.custom && meta["continue"].is_null() {
            // Unstructured lists always carry the field.
            meta["continue"] = json!("");
        }
        #[derive(Serialize)]
        struct List<'a> {
            kind: String,
            #[serde(rename = "apiVersion")]
            api_version: String,
            metadata: Value,
            items: Vec<&'a Value>,
        }
        let api_version = target.kind.api_version();
        let converted: Vec<Value>;
        let items: Vec<&Value> = if target.kind.custom
            && selected
                .iter()
                .any(|o| o["apiVersion"].as_str() != Some(api_version.as_str()))
        {
            converted = selected.iter().map(|o| present(&target.kind, o)).collect();
            converted.iter().collect()
        } else {
            selected
        };
        Ok(json_response(
            StatusCode::OK,
            &List {
                kind: target.kind.list_kind(),
                api_version,
                metadata: meta,
                items,
            },
            &[],
        ))
    }

    fn watch(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let since = match self.query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(
                rv.parse::<u64>()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
            ),
        };
        let send_initial = is_true(self.query, "sendInitialEvents");
        let since = if send_initial { None } else { since };
        let bookmarks = is_true(self.query, "allowWatchBookmarks");
        let timeout = self
            .query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let key = target.key();
        let namespace = target.namespace.clone();
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let as_table = wants_table(self.headers);
        let include_object = self
            .query
            .get("includeObject")
            .cloned()
            .unwrap_or_else(|| "Metadata".into());
        let kind = target.kind.clone();
        let store_ref = self.server.clone();
        let interval = self.server.bookmark_interval;

        let subscription = store_ref.store.subscribe(&key, namespace.as_deref(), since);
        tokio::spawn(async move {
            let mut first = true;
            let encode = |kind_name: &str, object: &Value, first: &mut bool| -> Bytes {
                let object = if as_table && kind_name != "BOOKMARK" && kind_name != "ERROR" {
                    let table = table::render(&kind, &[object], json!({}), &include_object, *first);
                    *first = false;
                    table
                } else {
                    present(&kind, object)
                };
                let mut line = serde_json::to_vec(&json!({"type": kind_name, "object": object}))
                    .unwrap_or_default();
                line.push(b'\n');
                Bytes::from(line)
            };
            let mut subscription = match subscription {
                Ok(s) => s,
                Err(err) => {
                    let status = ApiError::Gone(err.to_string()).to_status();
                    let _ = tx.send(encode("ERROR", &status, &mut first)).await;
                    return;
                }
            };
            let matches = |object: &Value| labels.matches(object) && fields.matches(object);
            let bookmark = |rv: u64, initial_end: bool| {
                let mut meta = json!({"resourceVersion": rv.to_string()});
                if initial_end {
                    meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                json!({"apiVersion": kind.api_version(), "kind": kind.kind, "metadata": meta})
            };
            let mut last = since.unwrap_or(subscription.rv);
            for change in subscription.backlog.drain(..) {
                last = last.max(change.rv);
                let Some(event) = selected_event(&change, &matches) else {
                    continue;
                };
                if tx
                    .send(encode(event.as_str(), &change.object, &mut first))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            last = last.max(subscription.rv);
            if send_initial {
                let _ = tx
                    .send(encode("BOOKMARK", &bookmark(last, true), &mut first))
                    .await;
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                let changes = tokio::select! {
                    _ = &mut deadline => return,
                    _ = ticker.tick() => {
                        if bookmarks && tx.send(encode("BOOKMARK", &bookmark(last, false), &mut first)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    _ = tx.closed() => return,
                    received = subscription.live.recv() => match received {
                        Ok(change) => vec![change],
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            match store_ref.store.replay(&key, namespace.as_deref(), last) {
                                Ok(changes) => changes,
                                Err(err) => {
                                    let status = ApiError::Gone(err.to_string()).to_status();
                                    let _ = tx.send(encode("ERROR", &status, &mut first)).await;
                                    return;
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                for change in changes {
                    if change.rv <= last {
                        continue;
                    }
                    last = change.rv;
                    if change.key != key
                        || namespace
                            .as_deref()
                            .is_some_and(|ns| ns != change.namespace)
                    {
                        continue;
                    }
                    let Some(event) = selected_event(&change, &matches) else {
                        continue;
                    };
                    if tx
                        .send(encode(event.as_str(), &change.object, &mut first))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(bytes), rx))
        });
        let mut response = Response::new(Body::from_stream(stream));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache, private"),
        );
        Ok(response)
    }

    fn check_namespace(&self, target: &Target) -> Result<(), ApiError> {
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

    fn check_identity(&self, target: &Target, object: &Value) -> Result<(), ApiError> {
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

    fn create(&self, target: &Target, object: Value) -> Result<Response, ApiError> {
        let warnings = self.check_duplicates(target)?;
        let response = self.create_object(target, object, None)?;
        Ok(with_warnings(response, &warnings))
    }

    /// Duplicate fields: refused under strict validation, a warning under Warn.
    fn check_duplicates(&self, target: &Target) -> Result<Vec<String>, ApiError> {
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

    /// Creates an object; `managed_fields` = Some keeps the given ownership (an apply
    /// that creates) instead of recording the creation as an Update.
    fn create_object(
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
            meta.insert("namespace".into(), json!(target.ns()));
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
    fn prepare_builtin(
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

    fn update(&self, target: &Target, body: Value) -> Result<Response, ApiError> {
        let duplicate_warnings = self.check_duplicates(target)?;
        let response = self.update_object(target, body)?;
        Ok(with_warnings(response, &duplicate_warnings))
    }

    fn update_object(&self, target: &Target, body: Value) -> Result<Response, ApiError> {
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

    /// Turns a requested new state into the stored one (status subresource rules,
    /// immutable metadata, generation, admission, ownership) and stores it.
    fn write(
        &self,
        target: &Target,
        old: &Value,
        requested: Value,
        expected_rv: Option<u64>,
    ) -> Result<(StatusCode, Arc<Value>, Vec<String>), ApiError> {
        let kind = &target.kind;
        let sub = target.subresource.as_deref().unwrap_or_default();
        let mut new = if sub == "status" {
            let mut new = old.clone();
            match requested.get("status") {
                Some(status) => new["status"] = status.clone(),
                None => {
                    if let Some(map) = new.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            new
        } else {
            let mut new = requested;
            if kind.status_subresource {
                match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => {
                        if let Some(map) = new.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
            }
            new
        };
        new["apiVersion"] = json!(kind.api_version());
        new["kind"] = json!(kind.kind);
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
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
            // Finalizers may only shrink while an object is being deleted.
            let before: Vec<Value> = old["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let after: Vec<Value> = new["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if after.iter().any(|f| !before.contains(f)) {
                return Err(ApiError::Forbidden(
                    "no new finalizers can be added if the object is being deleted".into(),
                ));
            }
        }
        if spec_like(&new, kind.status_subresource) != spec_like(old, kind.status_subresource)
            && let Some(generation) = old["metadata"]["generation"].as_i64()
        {
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let warnings = admission::admit(kind, &mut new, Some(old), self.field_validation(), sub)?;
        decode_defaults(kind, &mut new);
        self.prepare_builtin(kind, &mut new, Some(old))?;
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

    fn store_update(
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

    fn patch(&self, target: &Target, body: &[u8]) -> Result<Response, ApiError> {
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

    fn pins_version(&self, patch: &Value) -> bool {
        patch["metadata"]["resourceVersion"].is_string()
    }

    fn apply_writer_parts(&self, target: &Target) -> Result<(String, String, String), ApiError> {
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

    fn applied_config(&self, target: &Target, patch: &Value) -> Result<Value, ApiError> {
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

    fn conflict_error(conflicts: Vec<managed::Conflict>) -> ApiError {
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

    fn apply_create(&self, target: &Target, patch: &Value) -> Result<Response, ApiError> {
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

    fn apply_update(
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
        if spec_like(&new, kind.status_subresource) != spec_like(old, kind.status_subresource)
            && let Some(generation) = old["metadata"]["generation"].as_i64()
        {
            new["metadata"]["generation"] = json!(generation + 1);
        }
        let warnings = admission::admit(kind, &mut new, Some(old), self.field_validation(), sub)?;
        decode_defaults(kind, &mut new);
        self.prepare_builtin(kind, &mut new, Some(old))?;
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

    fn delete(&self, target: &Target, options: Value) -> Result<Response, ApiError> {
        let old = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        let pre = &options["preconditions"];
        let kind = &target.kind;
        let precondition_failed =
            |why: String| ApiError::conflict_because(&kind.group, &kind.kind, target.name(), why);
        if let Some(uid) = pre["uid"].as_str() {
            let actual = old["metadata"]["uid"].as_str().unwrap_or_default();
            if uid != actual {
                return Err(precondition_failed(format!(
                    "the UID in the precondition ({uid}) does not match the UID in record ({actual}). The object might have been deleted and then recreated"
                )));
            }
        }
        if let Some(rv) = pre["resourceVersion"].as_str() {
            let actual = old["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            if rv != actual {
                return Err(precondition_failed(format!(
                    "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({actual}). The object might have been modified"
                )));
            }
        }
        let options = DeleteOptions::parse(&options, self.query);
        if self.dry_run() {
            let answer = Deleted::Removed(old.clone()).answer(kind);
            return Ok(self.respond(target, StatusCode::OK, &answer, &[]));
        }
        let deleted = self
            .server
            .delete_object(kind, &old, options)
            .map_err(|e| map_store_error(target, e))?;
        let answer = deleted.answer(kind);
        if answer["kind"] == "Status" {
            return Ok(json_response(StatusCode::OK, &answer, &[]));
        }
        Ok(self.respond(target, StatusCode::OK, &answer, &[]))
    }

    fn delete_collection(&self, target: &Target) -> Result<Response, ApiError> {
        let (labels, fields) = self.selectors(target)?;
        let (items, _) = self
            .server
            .store
            .list(&target.key(), target.namespace.as_deref());
        for item in items
            .iter()
            .filter(|i| labels.matches(i) && fields.matches(i))
        {
            match self.server.delete_object(
                &target.kind,
                item,
                DeleteOptions::parse(&Value::Null, self.query),
            ) {
                Ok(_) | Err(StoreError::NotFound) => {}
                Err(err) => return Err(map_store_error(target, err)),
            }
        }
        Ok(json_response(
            StatusCode::OK,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            &[],
        ))
    }
}
