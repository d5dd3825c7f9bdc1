//! API errors as the Kubernetes API server reports them: every failure becomes a
//! `meta/v1 Status` object with the HTTP code, `reason` and `details` kubectl and
//! client-go interpret (404 NotFound, 409 AlreadyExists/Conflict, 422 Invalid with
//! per-field causes, 410 Expired, ...).

use axum::http::StatusCode;
use serde_json::{Value, json};

/// One field-level cause of a 422 Invalid or a 409 apply conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub reason: String,
    pub message: String,
    pub field: String,
}

/// Which object an error is about, as `Status.details` names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// API group, empty for core.
    pub group: String,
    /// Plural resource name (NotFound, AlreadyExists, Conflict) or Kind (Invalid).
    pub kind: String,
    pub name: String,
}

impl Target {
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{} \"{}\" not found", .0.qualified(), .0.name)]
    NotFound(Target),
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{} \"{}\" already exists", .0.qualified(), .0.name)]
    AlreadyExists(Target),
    #[error("Operation cannot be fulfilled on {} \"{}\": {}", .0.qualified(), .0.name, .1)]
    Conflict(Target, String),
    #[error("{}", apply_conflict_message(.0))]
    ApplyConflict(Vec<Cause>),
    #[error("{} \"{}\" is invalid: {}", .0.qualified(), .0.name, invalid_summary(.1))]
    Invalid(Target, Vec<Cause>),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Gone(String),
    /// 429, with the causes and the `Retry-After` an eviction refused by a disruption
    /// budget carries.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_seconds: u32,
        causes: Vec<Cause>,
    },
    #[error("Internal error occurred: {0}")]
    Internal(String),
    /// A `Status` answered as it is, with its own code (the eviction handler's 500 for
    /// a pod under two budgets is one).
    #[error("{}", .0["message"].as_str().unwrap_or_default())]
    Status(Value),
}

fn invalid_summary(causes: &[Cause]) -> String {
    let parts: Vec<String> = causes
        .iter()
        .map(|c| {
            if c.field.is_empty() {
                c.message.clone()
            } else {
                format!("{}: {}", c.field, c.message)
            }
        })
        .collect();
    if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    }
}

/// The API server's wording: one conflict on one line; several grouped by manager,
/// managers in order, each path on a line of its own.
fn apply_conflict_message(causes: &[Cause]) -> String {
    if let [only] = causes {
        return format!(
            "Apply failed with 1 conflict: {}: {}",
            only.message, only.field
        );
    }
    let mut managers: Vec<&str> = causes.iter().map(|c| c.message.as_str()).collect();
    managers.sort();
    managers.dedup();
    let mut lines = Vec::new();
    for manager in managers {
        lines.push(format!(
            "{}:",
            manager.replacen("conflict with", "conflicts with", 1)
        ));
        for cause in causes.iter().filter(|c| c.message == manager) {
            lines.push(format!("- {}", cause.field));
        }
    }
    format!(
        "Apply failed with {} conflicts: {}",
        causes.len(),
        lines.join("\n")
    )
}

impl ApiError {
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        Self::NotFound(Target {
            group: group.into(),
            kind: resource.into(),
            name: name.into(),
        })
    }

    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        Self::AlreadyExists(Target {
            group: group.into(),
            kind: resource.into(),
            name: name.into(),
        })
    }

    pub fn conflict(group: &str, resource: &str, name: &str) -> Self {
        Self::Conflict(
            Target {
                group: group.into(),
                kind: resource.into(),
                name: name.into(),
            },
            "the object has been modified; please apply your changes to the latest version and try again".into(),
        )
    }

    /// A 409 with the API server's own explanation (failed preconditions, a token bound
    /// to an object that was recreated).
    pub fn conflict_because(group: &str, kind: &str, name: &str, why: String) -> Self {
        Self::Conflict(
            Target {
                group: group.into(),
                kind: kind.into(),
                name: name.into(),
            },
            why,
        )
    }

    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        Self::Invalid(
            Target {
                group: group.into(),
                kind: kind.into(),
                name: name.into(),
            },
            causes,
        )
    }

    pub fn code(&self) -> StatusCode {
        match self {
            Self::NotFound(_) | Self::NoRoute => StatusCode::NOT_FOUND,
            Self::AlreadyExists(_) | Self::Conflict(..) | Self::ApplyConflict(_) => {
                StatusCode::CONFLICT
            }
            Self::Invalid(..) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Gone(_) => StatusCode::GONE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Status(status) => status["code"]
                .as_u64()
                .and_then(|c| StatusCode::from_u16(c as u16).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The `reason` field of the Status.
    pub fn reason(&self) -> &str {
        match self {
            Self::NotFound(_) | Self::NoRoute => "NotFound",
            Self::AlreadyExists(_) => "AlreadyExists",
            Self::Conflict(..) | Self::ApplyConflict(_) => "Conflict",
            Self::Invalid(..) => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::Forbidden(_) => "Forbidden",
            Self::Unauthorized => "Unauthorized",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Gone(_) => "Expired",
            Self::TooManyRequests { .. } => "TooManyRequests",
            Self::Internal(_) => "InternalError",
            Self::Status(status) => status["reason"].as_str().unwrap_or_default(),
        }
    }

    /// The error as a `meta/v1 Status` object.
    pub fn to_status(&self) -> Value {
        if let Self::Status(status) = self {
            return status.clone();
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        // Empty fields are left out, as Go's `omitempty` does.
        let causes_json = |causes: &[Cause]| -> Value {
            causes
                .iter()
                .map(|c| {
                    let mut cause = json!({"reason": c.reason, "message": c.message});
                    if !c.field.is_empty() {
                        cause["field"] = json!(c.field);
                    }
                    cause
                })
                .collect()
        };
        let about = |t: &Target| {
            let mut details = json!({"name": t.name, "kind": t.kind});
            if !t.group.is_empty() {
                details["group"] = json!(t.group);
            }
            if t.name.is_empty() {
                details.as_object_mut().map(|d| d.remove("name"));
            }
            details
        };
        let details = match self {
            Self::NotFound(t) | Self::AlreadyExists(t) | Self::Conflict(t, _) => Some(about(t)),
            Self::Invalid(t, causes) => {
                let mut details = about(t);
                details["causes"] = causes_json(causes);
                Some(details)
            }
            Self::ApplyConflict(causes) => Some(json!({"causes": causes_json(causes)})),
            Self::TooManyRequests {
                retry_after_seconds,
                causes,
                ..
            } => {
                let mut details = json!({"causes": causes_json(causes)});
                if *retry_after_seconds > 0 {
                    details["retryAfterSeconds"] = json!(retry_after_seconds);
                }
                Some(details)
            }
            _ => None,
        };
        if let Some(details) = details {
            status["details"] = details;
        }
        status
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let code = self.code();
        if code.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, code = code.as_u16(), "request refused");
        }
        let body = serde_json::to_vec(&self.to_status()).unwrap_or_default();
        let mut response = (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Self::TooManyRequests {
            retry_after_seconds,
            ..
        } = &self
            && *retry_after_seconds > 0
        {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(*retry_after_seconds),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_like_the_api_server() {
        let err = ApiError::not_found("fleetpatch.io", "patchjobs", "a");
        assert_eq!(err.to_string(), "patchjobs.fleetpatch.io \"a\" not found");
        assert_eq!(err.to_status()["code"], 404);
        let err = ApiError::not_found("", "namespaces", "x");
        assert_eq!(err.to_string(), "namespaces \"x\" not found");
        let err = ApiError::invalid(
            "fleetpatch.io",
            "Task",
            "t",
            vec![Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: \"x\": bad".into(),
                field: "spec.keyPath".into(),
            }],
        );
        assert_eq!(
            err.to_string(),
            "Task.fleetpatch.io \"t\" is invalid: spec.keyPath: Invalid value: \"x\": bad"
        );
        let status = err.to_status();
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(status["details"]["causes"][0]["field"], "spec.keyPath");
    }
}
