//! ServiceAccount tokens as a real API server hands them out and checks them:
//! `serviceaccounts/NAME/token` (TokenRequest, optionally bound to a Pod, Node or
//! Secret of the account), `tokenreviews` (TokenReview), and the same check for bearer
//! tokens on every request. A token is valid for the audiences it was issued for (the
//! API audience when none were asked for) while its ServiceAccount — and the object it
//! is bound to — still exist with the uids it was issued for.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::Response;
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

use super::Server;
use super::auth::{API_AUDIENCE, Claims};
use super::errors::{ApiError, Cause};
use super::handlers::{Request, Target, json_response, now};
use super::managed::{self, Entry};
use super::registry::strings;

/// The shortest validity a TokenRequest may ask for.
const MIN_EXPIRATION_SECONDS: i64 = 600;
/// How long after its deletion began a bound object still vouches for its tokens.
const DELETION_GRACE_SECONDS: i64 = 60;

const EXTRA: &str = "authentication.kubernetes.io";

/// A list as Go's `%q` prints it: `["a" "b"]`.
fn go_quoted(list: &[String]) -> String {
    let items: Vec<String> = list
        .iter()
        .map(|a| serde_json::to_string(a).unwrap_or_default())
        .collect();
    format!("[{}]", items.join(" "))
}

/// The managedFields entry an API server records for a request body it does not
/// store (a TokenRequest, a TokenReview): the fields the client set.
fn request_fields(body: &Value, manager: &str, subresource: &str) -> Value {
    let spec_only = json!({"spec": body["spec"]});
    let mut out = json!({"metadata": {}});
    managed::write_entries(
        &mut out,
        &[Entry {
            manager: manager.into(),
            operation: "Update".into(),
            subresource: subresource.into(),
            api_version: "authentication.k8s.io/v1".into(),
            time: now(),
            fields: managed::fields_of(&spec_only, None),
        }],
    );
    out["metadata"]["managedFields"].take()
}

fn alive_since(object: &Value) -> bool {
    match object["metadata"]["deletionTimestamp"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        None => true,
        Some(deleted) => deleted.timestamp() >= Utc::now().timestamp() - DELETION_GRACE_SECONDS,
    }
}

impl Server {
    /// The user a token stands for, checked for `audiences` (the API audience when
    /// empty); the audiences it is valid for among them. Errors read like a real
    /// server's TokenReview errors.
    pub fn authenticate_token(
        &self,
        token: &str,
        audiences: &[String],
    ) -> Result<(Claims, Vec<String>), String> {
        let claims = self
            .auth
            .verify(token)
            .ok_or_else(|| "invalid bearer token".to_string())?;
        let wanted: Vec<String> = if audiences.is_empty() {
            vec![API_AUDIENCE.to_string()]
        } else {
            audiences.to_vec()
        };
        // The admin's token predates audiences: it is good for any.
        if claims.audiences.is_empty() {
            return Ok((claims, wanted));
        }
        let valid: Vec<String> = wanted
            .iter()
            .filter(|a| claims.audiences.contains(a))
            .cloned()
            .collect();
        if valid.is_empty() {
            return Err(format!(
                "[invalid bearer token, token audiences {} is invalid for the target audiences {}]",
                go_quoted(&claims.audiences),
                go_quoted(&wanted)
            ));
        }
        self.still_bound(&claims)
            .map_err(|why| format!("[invalid bearer token, {why}]"))?;
        Ok((claims, valid))
    }

    /// A ServiceAccount token is good while its account and bound pod still exist.
    fn still_bound(&self, claims: &Claims) -> Result<(), String> {
        let Some(account) = claims.username.strip_prefix("system:serviceaccount:") else {
            return Ok(());
        };
        let (namespace, name) = account.split_once(':').unwrap_or((account, ""));
        let found = self
            .store
            .get("/serviceaccounts", namespace, name)
            .ok_or_else(|| format!("serviceaccounts {name:?} not found"))?;
        let uid = found["metadata"]["uid"].as_str().unwrap_or_default();
        if uid != claims.uid {
            return Err(format!(
                "service account UID ({uid}) does not match claim ({})",
                claims.uid
            ));
        }
        let extra = |key: &str| {
            claims
                .extra
                .get(&format!("{EXTRA}/{key}"))
                .and_then(|v| v.first())
        };
        if let (Some(pod), Some(pod_uid)) = (extra("pod-name"), extra("pod-uid")) {
            let invalidated = || "service account token has been invalidated".to_string();
            let found = self
                .store
                .get("/pods", namespace, pod)
                .ok_or_else(invalidated)?;
            let uid = found["metadata"]["uid"].as_str().unwrap_or_default();
            if uid != pod_uid {
                return Err(format!("pod UID ({uid}) does not match claim ({pod_uid})"));
            }
            if !alive_since(&found) {
                return Err(invalidated());
            }
        }
        Ok(())
    }
}

impl Request<'_> {
    pub(super) fn token_review(&self, body: Value) -> Result<Response, ApiError> {
        let token = body["spec"]["token"].as_str().unwrap_or_default();
        if token.is_empty() {
            return Err(ApiError::BadRequest(
                "token is required for TokenReview in authentication".into(),
            ));
        }
        let status = match self
            .server
            .authenticate_token(token, &strings(&body["spec"]["audiences"]))
        {
            Ok((claims, audiences)) => {
                let mut extra = claims.extra.clone();
                if !claims.jti.is_empty() {
                    extra.insert(
                        format!("{EXTRA}/credential-id"),
                        vec![format!("JTI={}", claims.jti)],
                    );
                }
                json!({
                    "authenticated": true,
                    "user": {"username": claims.username, "uid": claims.uid, "groups": claims.groups, "extra": extra},
                    "audiences": audiences,
                })
            }
            Err(error) => json!({"user": {}, "error": error}),
        };
        let mut spec = json!({"token": token});
        if !strings(&body["spec"]["audiences"]).is_empty() {
            spec["audiences"] = body["spec"]["audiences"].clone();
        }
        let review = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"managedFields": request_fields(&json!({"spec": spec}), &self.field_manager(), "")},
            "spec": spec,
            "status": status,
        });
        tracing::debug!(reviewer = ?self.user.map(|u| &u.username), "token review");
        Ok(json_response(StatusCode::CREATED, &review, &[]))
    }

    pub(super) fn token_request(&self, target: &Target, body: Value) -> Result<Response, ApiError> {
        let invalid = |field: &str, message: String| {
            ApiError::invalid(
                "authentication.k8s.io",
                "TokenRequest",
                "",
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message,
                    field: field.into(),
                }],
            )
        };
        for (field, wanted) in [("name", target.name()), ("namespace", target.ns())] {
            if let Some(given) = body["metadata"][field].as_str().filter(|g| !g.is_empty())
                && given != wanted
            {
                return Err(ApiError::invalid(
                    "authentication.k8s.io",
                    "TokenRequest",
                    target.name(),
                    vec![Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!(
                            "Invalid value: {given:?}: must match the service account {field} if specified"
                        ),
                        field: format!("metadata.{field}"),
                    }],
                ));
            }
        }
        let account = self
            .server
            .store
            .get(&target.key(), target.ns(), target.name())
            .ok_or_else(|| target.not_found())?;
        let seconds = body["spec"]["expirationSeconds"].as_i64().unwrap_or(3600);
        if seconds < MIN_EXPIRATION_SECONDS {
            return Err(invalid(
                "spec.expirationSeconds",
                format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
            ));
        }
        let mut audiences = strings(&body["spec"]["audiences"]);
        if audiences.is_empty() {
            audiences = vec![API_AUDIENCE.to_string()];
        }
        let extra = self.bound_object_extra(target, &body["spec"]["boundObjectRef"])?;
        let expires = Utc::now() + chrono::Duration::seconds(seconds);
        let uid = account["metadata"]["uid"].as_str().unwrap_or_default();
        let token = self.server.auth.issue(&Claims {
            username: format!("system:serviceaccount:{}:{}", target.ns(), target.name()),
            uid: uid.to_string(),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{}", target.ns()),
                "system:authenticated".into(),
            ],
            audiences: audiences.clone(),
            extra,
            exp: Some(expires.timestamp()),
            jti: uuid::Uuid::new_v4().to_string(),
        });
        let bound = match &body["spec"]["boundObjectRef"] {
            Value::Object(reference) => Value::Object(
                reference
                    .iter()
                    .filter(|(_, v)| v.as_str().is_some_and(|s| !s.is_empty()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            _ => Value::Null,
        };
        let response = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {
                "name": target.name(), "namespace": target.ns(), "uid": uid,
                "creationTimestamp": now(),
                "managedFields": request_fields(&body, &self.field_manager(), "token"),
            },
            "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": bound},
            "status": {
                "token": token,
                "expirationTimestamp": expires.to_rfc3339_opts(SecondsFormat::Secs, true),
            },
        });
        Ok(json_response(StatusCode::CREATED, &response, &[]))
    }

    /// A token bound to an object carries its identity, as a real server's does: for a
    /// Pod (which must run as the account) the pod's and its node's name and uid, for
    /// a Node its own; the object must exist and have the uid given, if one is.
    fn bound_object_extra(
        &self,
        target: &Target,
        bound: &Value,
    ) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        let mut extra = BTreeMap::new();
        if bound.is_null() {
            return Ok(extra);
        }
        let api_version = bound["apiVersion"].as_str().unwrap_or_default();
        let kind = bound["kind"].as_str().unwrap_or_default();
        let name = bound["name"].as_str().unwrap_or_default();
        let namespace = target.ns();
        let key = |k: &str| format!("{EXTRA}/{k}");
        let (found, plural) = match (api_version, kind) {
            ("v1", "Pod") => (self.server.store.get("/pods", namespace, name), "pods"),
            ("v1", "Node") => (self.server.store.get("/nodes", "", name), "nodes"),
            ("v1", "Secret") => (
                self.server.store.get("/secrets", namespace, name),
                "secrets",
            ),
            _ => {
                let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
                let version = api_version.rsplit('/').next().unwrap_or_default();
                return Err(ApiError::BadRequest(format!(
                    "cannot bind token to object of type {group}/{version}, Kind={kind}"
                )));
            }
        };
        let object = found.ok_or_else(|| ApiError::not_found("", plural, name))?;
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        if kind == "Pod" && object["spec"]["serviceAccountName"].as_str() != Some(target.name()) {
            return Err(ApiError::BadRequest(format!(
                "cannot bind token for serviceaccount {:?} to pod running with different serviceaccount name.",
                target.name()
            )));
        }
        if let Some(wanted) = bound["uid"].as_str().filter(|u| !u.is_empty())
            && wanted != uid
        {
            return Err(ApiError::conflict_because(
                "",
                kind,
                name,
                format!(
                    "the UID in the bound object reference ({wanted}) does not match the UID in record. The object might have been deleted and then recreated"
                ),
            ));
        }
        match kind {
            "Pod" => {
                extra.insert(key("pod-name"), vec![name.to_string()]);
                extra.insert(key("pod-uid"), vec![uid.to_string()]);
                if let Some(node) = object["spec"]["nodeName"]
                    .as_str()
                    .filter(|n| !n.is_empty())
                {
                    extra.insert(key("node-name"), vec![node.to_string()]);
                    if let Some(node) = self.server.store.get("/nodes", "", node) {
                        let uid = node["metadata"]["uid"].as_str().unwrap_or_default();
                        extra.insert(key("node-uid"), vec![uid.to_string()]);
                    }
                }
            }
            "Node" => {
                extra.insert(key("node-name"), vec![name.to_string()]);
                extra.insert(key("node-uid"), vec![uid.to_string()]);
            }
            _ => {}
        }
        Ok(extra)
    }
}
