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
    #[error("{0}")]
    TooManyRequests(String),
    #[error("Internal error occurred: {0}")]
    Internal(String),
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

fn apply_conflict_message(causes: &[Cause]) -> String {
    let lines: Vec<String> = causes.iter().map(|c| format!("- {}", c.message)).collect();
    format!(
        "Apply failed with {} conflict{}: {}",
        causes.len(),
        if causes.len() == 1 { "" } else { "s" },
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
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `reason` field of the Status.
    pub fn reason(&self) -> &'static str {
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
            Self::TooManyRequests(_) => "TooManyRequests",
            Self::Internal(_) => "InternalError",
        }
    }

    /// The error as a `meta/v1 Status` object.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        let causes_json = |causes: &[Cause]| -> Value {
            causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect()
        };
        let details = match self {
            Self::NotFound(t) | Self::AlreadyExists(t) | Self::Conflict(t, _) => {
                Some(json!({"name": t.name, "group": t.group, "kind": t.kind}))
            }
            Self::Invalid(t, causes) => Some(
                json!({"name": t.name, "group": t.group, "kind": t.kind, "causes": causes_json(causes)}),
            ),
            Self::ApplyConflict(causes) => Some(json!({"causes": causes_json(causes)})),
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
        (
            code,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
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
