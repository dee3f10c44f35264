//! Typed answers of the control operations: what failed, and so which
//! HTTP status the API gives.

/// Why a request failed: the socket answers `"ok": false` with the text,
/// the HTTP API with the status of its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The request is malformed, or asks what cannot be done (400).
    Invalid(String),
    /// What it names is not there: a message, a tag, a webhook (404).
    NotFound(String),
    /// Not for this API token: read-only, or scoped to a tenant (403).
    Forbidden(String),
    /// The storage failed (503): try again later.
    Storage(String),
}

impl Failure {
    pub fn http_status(&self) -> u16 {
        match self {
            Failure::Invalid(_) => 400,
            Failure::NotFound(_) => 404,
            Failure::Forbidden(_) => 403,
            Failure::Storage(_) => 503,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Invalid(m)
            | Failure::NotFound(m)
            | Failure::Forbidden(m)
            | Failure::Storage(m) => f.write_str(m),
        }
    }
}

impl From<String> for Failure {
    fn from(m: String) -> Failure {
        Failure::Invalid(m)
    }
}

impl From<&str> for Failure {
    fn from(m: &str) -> Failure {
        Failure::Invalid(m.to_string())
    }
}

impl From<crate::state::spool::QueueError> for Failure {
    fn from(e: crate::state::spool::QueueError) -> Failure {
        Failure::Storage(e.to_string())
    }
}
