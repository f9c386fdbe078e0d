//! Errors as callers see them: an HTTP status and `{"error": {"code", "message"}}` with a
//! stable code (DESIGN.md's outcome table).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode, header};

use crate::machines::{Effect, Failure, ReadFailure};
use crate::raft::{ProposeError, ReadError};
use crate::wasm::ModuleError;

pub type Body = Full<Bytes>;

/// A caller's input quoted in an error message, cut short: a 10 KB path or method is not worth
/// sending back whole.
pub struct Clipped<'a>(pub &'a str);

impl Clipped<'_> {
    const SHOWN: usize = 80;
}

impl std::fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.0;
        if s.len() <= Self::SHOWN {
            return write!(f, "{s:?}");
        }
        let mut cut = Self::SHOWN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &s[..cut], s.len())
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for `Retry-After` where the wait is known; else 1 for the codes that say retry.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds the limit of {limit} bytes"),
        )
    }

    pub fn body_stalled(after: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body stalled: no more of it arrived for {} s",
                after.as_secs()
            ),
        )
    }

    pub fn body_too_slow(allowed: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body did not arrive whole within {} s",
                allowed.as_secs()
            ),
        )
    }

    /// Nothing was read into memory, nothing proposed: safe to retry.
    pub fn bodies_overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "this node is reading too many large request bodies at once",
        )
    }

    pub fn no_leader() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no leader is known right now; nothing was proposed, retry shortly",
        )
    }

    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this node is shutting down",
        )
    }

    /// An outcome the route cannot have produced (a task answered with a deploy, say).
    pub fn unexpected(outcome: &Effect) -> Self {
        Self::internal(format!("unexpected outcome {outcome:?}"))
    }

    /// Appends `{"code": ..., "message": ...}`: the object under `error` in a response body,
    /// and in each failed task's entry of a batch.
    pub fn write_fields(&self, out: &mut Vec<u8>) {
        #[derive(serde::Serialize)]
        struct Fields<'a> {
            code: &'a str,
            message: &'a str,
        }
        let fields = Fields {
            code: self.code,
            message: &self.message,
        };
        // Serializing two strings into a Vec cannot fail.
        let _ = serde_json::to_writer(out, &fields);
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = Vec::with_capacity(48 + self.message.len());
        body.extend_from_slice(b"{\"error\":");
        self.write_fields(&mut body);
        body.push(b'}');
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        // Only where nothing was done: retrying an `outcome_unknown` could apply a task twice.
        if let Some(secs) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, secs.into());
        } else if matches!(
            self.code,
            "no_leader" | "shutting_down" | "overloaded" | "leader_moving" | "transfer_failed"
        ) {
            h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match &f {
            Failure::Guest(g) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, g.code(), f.to_string())
            }
            Failure::NotFound(_) => Self::not_found(f.to_string()),
            Failure::InvalidModule(_) => {
                Self::new(StatusCode::BAD_REQUEST, "invalid_module", f.to_string())
            }
            Failure::BadEntry(_) => Self::bad_request(f.to_string()),
        }
    }
}

impl From<ReadFailure> for ApiError {
    fn from(f: ReadFailure) -> Self {
        match f {
            ReadFailure::Failed(f) => f.into(),
            ReadFailure::Throttled { retry_after, .. } => ApiError {
                // Whole seconds, rounded up: a client retrying sooner is refused again.
                retry_after_secs: Some(
                    u64::try_from(retry_after.as_millis().div_ceil(1000))
                        .unwrap_or(u64::MAX)
                        .max(1),
                ),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "reads_throttled",
                    f.to_string(),
                )
            },
        }
    }
}

/// A module refused at deploy: its own fault is a 400, the node's storage a 500.
impl From<ModuleError> for ApiError {
    fn from(e: ModuleError) -> Self {
        let status = match e.code() {
            "invalid_module" => StatusCode::BAD_REQUEST,
            "not_found" => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

/// Proposal failures other than "not leader" (which the caller turns into a redirect).
impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NotLeader { .. } => Self::no_leader(),
            ProposeError::TermMismatch { .. } => {
                Self::new(StatusCode::CONFLICT, "term_mismatch", e.to_string())
            }
            ProposeError::OutcomeUnknown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                "the task was proposed, then leadership was lost: it may or may not be applied",
            ),
            ProposeError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "this node is shutting down; nothing was proposed",
            ),
            ProposeError::Overloaded => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the leader's log is too far ahead of what is committed and applied; nothing was proposed",
            ),
            ProposeError::LeaderMoving { to } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "leader_moving",
                format!("leadership is moving to node {to}; nothing was proposed, retry shortly"),
            ),
        }
    }
}

/// A read changes nothing, so every failure is one to retry: each carries Retry-After.
impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            // Lost before the read was confirmed: the new leader is not known yet either.
            ReadError::NotLeader { .. } | ReadError::LeadershipLost => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                format!("{e}; retry (on the new leader)"),
            ),
            ReadError::ShuttingDown => Self::shutting_down(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_input_is_clipped() {
        assert_eq!(Clipped("/v1/x").to_string(), r#""/v1/x""#);
        let long = "é".repeat(5_000);
        let shown = Clipped(&long).to_string();
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.ends_with("… (10000 bytes)"), "{shown}");
    }

    #[test]
    fn an_overloaded_or_moving_leader_says_retry_later() {
        for e in [
            ProposeError::Overloaded,
            ProposeError::LeaderMoving { to: 2 },
        ] {
            let r = ApiError::from(e.clone()).into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
                Some(&b"1"[..]),
                "{e}"
            );
        }
        let r = ApiError::from(ProposeError::OutcomeUnknown).into_response();
        assert!(
            r.headers().get(header::RETRY_AFTER).is_none(),
            "retrying an outcome_unknown could apply a task twice"
        );
    }

    #[test]
    fn throttled_reads_say_retry_later() {
        let r = ApiError::from(ReadFailure::Throttled {
            machine: "m".into(),
            retry_after: std::time::Duration::from_millis(300),
        })
        .into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry = |r: &Response<Body>| r.headers().get(header::RETRY_AFTER).cloned();
        assert_eq!(retry(&r), Some(header::HeaderValue::from_static("1")));
        let body = format!("{:?}", r.body());
        assert!(body.contains("reads_throttled"), "{body}");
        assert!(body.contains("300 ms"), "{body}");
        // The header is the wait, rounded up to whole seconds.
        let wait = |ms| {
            let r = ApiError::from(ReadFailure::Throttled {
                machine: "m".into(),
                retry_after: std::time::Duration::from_millis(ms),
            })
            .into_response();
            retry(&r)
        };
        assert_eq!(wait(2_000), Some(header::HeaderValue::from_static("2")));
        assert_eq!(wait(2_001), Some(header::HeaderValue::from_static("3")));
        assert_eq!(wait(0), Some(header::HeaderValue::from_static("1")));
    }

    #[test]
    fn a_failed_read_says_retry_later_in_a_documented_code() {
        for (e, code) in [
            (ReadError::LeadershipLost, "no_leader"),
            (ReadError::NotLeader { leader: None }, "no_leader"),
            (ReadError::ShuttingDown, "shutting_down"),
        ] {
            let r = ApiError::from(e).into_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(r.headers().contains_key(header::RETRY_AFTER), "{code}");
            let body = format!("{:?}", r.body());
            assert!(body.contains(code), "{code}: {body}");
        }
    }
}
