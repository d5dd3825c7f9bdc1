//! Request routing: every request enters at [`dispatch`], is authenticated, and
//! `route` hands it to discovery, OpenAPI or the verb that serves it — `read.rs` (get,
//! list, watch), `write.rs` (create, update, status), `apply.rs` (patches and
//! server-side apply), `deletion.rs` (delete, deletecollection, garbage collection),
//! `eviction.rs` and `tokens.rs` (subresources). This file also owns what every verb
//! shares: the request's `Target` and `Request` context and answers in the API
//! server's JSON shapes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::{SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use super::Server;
use super::admission::FieldValidation;
use super::auth::Claims;
use super::body::{duplicate_fields, parse_body};
use super::discovery;
use super::errors::ApiError;
use super::registry::ResourceKind;
use super::store::StoreError;
use super::table;

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
pub(super) fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
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

pub(super) fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

pub(super) fn parse_query(uri: &Uri) -> Query {
    uri.query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

pub(super) fn is_true(query: &Query, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
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
        *server.writes.lock().entry(key).or_default() += 1;
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
    for (key, count) in server.writes.lock().iter() {
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

/// An object as the requested version presents it (versions share storage).
pub(super) fn present(kind: &ResourceKind, object: &Value) -> Value {
    let mut object = object.clone();
    if kind.custom {
        object["apiVersion"] = json!(kind.api_version());
    }
    object
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

    pub(super) fn field_validation(&self) -> FieldValidation {
        FieldValidation::parse(self.query.get("fieldValidation").map(String::as_str))
    }

    pub(super) fn respond(
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
}
