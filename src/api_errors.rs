//! What a caller decides on in an error from the API server: its HTTP status, never
//! its text.

/// The HTTP status of an error the API server answered with.
pub fn status_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

pub fn is_not_found(err: &kube::Error) -> bool {
    status_code(err) == Some(404)
}

pub fn is_conflict(err: &kube::Error) -> bool {
    status_code(err) == Some(409)
}

pub fn is_throttled(err: &kube::Error) -> bool {
    status_code(err) == Some(429)
}
