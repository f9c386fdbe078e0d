//! Where a task enters: `POST …/tasks` (one task, its outcome as the response) and
//! `POST …/tasks:batch` (many, one outcome each, in order).

use std::io::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, header};

use super::body::{self, RequestBody, read_body};
use super::{
    ApiError, ApiState, Body, MAX_BATCH_BYTES, MAX_BATCH_TASKS, MAX_TASK_BYTES, check_name,
    expected_term, leader_or_redirect, redirect,
};
use crate::machines::{Command, Effect};
use crate::raft::{Applied, ProposeError};

// A task's response carries the log position it was applied at. The names are built once:
// parsing and validating them from a `&str` on every response showed in the leader's profile.
/// Header of a task's response: the index of its log entry.
const INDEX_HEADER: header::HeaderName = header::HeaderName::from_static("lockstep-index");
/// Header of a task's response: the term of its log entry.
const TERM_HEADER: header::HeaderName = header::HeaderName::from_static("lockstep-term");

/// Where a task submission stands once its request has been read.
enum Admitted {
    /// This node does not lead: nothing will be proposed here.
    Redirect(Response<Body>),
    Task(Admission),
}

/// A request this leader will propose from.
struct Admission {
    term: Option<u64>,
    uri: hyper::Uri,
    body: Bytes,
    /// The body's bytes in the node's budget, until proposed.
    read: body::BodyPermit,
}

/// What `submit` and `submit_batch` share: the name, the leader check, the expected term, the
/// body (read before any refusal, so the connection stays usable) and the machine's existence.
async fn admit(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
    limit: usize,
) -> Result<Admitted, ApiError> {
    check_name(name)?;
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(Admitted::Redirect(r));
    }
    let term = expected_term(&req)?;
    let uri = req.uri().clone();
    let (body, read) = read_body(req, limit, &state.bodies).await?;
    if !machine_known(state, name) {
        return Err(ApiError::not_found(format!("no machine named {name:?}")));
    }
    Ok(Admitted::Task(Admission {
        term,
        uri,
        body,
        read,
    }))
}

pub(super) async fn submit(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let task = match admit(state, name, req, MAX_TASK_BYTES).await? {
        Admitted::Redirect(r) => return Ok(r),
        Admitted::Task(a) => a,
    };
    let entry = Command::encode_task(name, &task.body);
    drop((task.body, task.read));
    let applied = match state.node.propose(entry, task.term).await {
        Ok(a) => a,
        Err(ProposeError::NotLeader { leader }) => return Ok(redirect(state, leader, &task.uri)),
        Err(e) => return Err(e.into()),
    };
    // Committed either way: a guest's failure is an outcome at a log position too.
    let mut r = match applied.output {
        Ok(Effect::Output(bytes)) => Response::new(Full::new(bytes)),
        Ok(other) => return Err(ApiError::unexpected(&other)),
        Err(f) => ApiError::from(f).into_response(),
    };
    let h = r.headers_mut();
    h.insert(INDEX_HEADER, applied.index.into());
    h.insert(TERM_HEADER, applied.term.into());
    Ok(r)
}

/// False only when the machine is surely absent: this leader has applied everything committed,
/// its own term's no-op included. Before that, a deploy an earlier leader acknowledged may not
/// be applied (or even known committed) here yet: then the task goes through the log and apply
/// answers `not_found` itself.
fn machine_known(state: &ApiState, name: &str) -> bool {
    if state
        .catalog
        .read()
        .map(|c| c.contains_key(name))
        .unwrap_or(false)
    {
        return true;
    }
    !absence_is_final(&state.node.status())
}

/// Whether this node's applied state holds everything acknowledged before it: everything
/// committed, and this leader's no-op (see `machine_known`).
fn absence_is_final(s: &crate::raft::Status) -> bool {
    s.applied_index >= s.commit_index.max(s.term_start_index)
}

/// Many tasks in one request: a JSON array of task payloads (each any JSON value, passed to the
/// machine as its JSON text), answered by an array of per-task results in the same order.
pub(super) async fn submit_batch(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let batch = match admit(state, name, req, MAX_BATCH_BYTES).await? {
        Admitted::Redirect(r) => return Ok(r),
        Admitted::Task(a) => a,
    };
    let tasks = parse_batch(&batch.body)?;
    let entries: Vec<Bytes> = tasks
        .iter()
        .map(|t| Command::encode_task(name, t.get().as_bytes()))
        .collect();
    drop(tasks);
    drop((batch.body, batch.read));
    let results = state.node.propose_many(entries, batch.term).await;
    // Refused as a whole, nothing proposed: one answer (a redirect, a 409, a 503 with
    // Retry-After) rather than a 200 full of them.
    if let Some(Err(
        first @ (ProposeError::NotLeader { .. }
        | ProposeError::Overloaded
        | ProposeError::LeaderMoving { .. }
        | ProposeError::TermMismatch { .. }
        | ProposeError::ShuttingDown),
    )) = results.first()
        && results.iter().all(
            |r| matches!(r, Err(e) if std::mem::discriminant(e) == std::mem::discriminant(first)),
        )
    {
        return match first {
            ProposeError::NotLeader { leader } => Ok(redirect(state, *leader, &batch.uri)),
            refused => Err(refused.clone().into()),
        };
    }
    // Written by hand rather than through serde_json::Value: building and dropping a Value
    // tree per task was the largest cost of this endpoint.
    let mut out = Vec::with_capacity(32 + results.len() * 64);
    out.extend_from_slice(b"{\"results\":[");
    for (i, r) in results.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        match r {
            Ok(Applied {
                index,
                term,
                output: Ok(Effect::Output(bytes)),
            }) => {
                let _ = write!(
                    out,
                    "{{\"status\":200,\"index\":{index},\"term\":{term},\"output\":"
                );
                write_json_or_string(&mut out, &bytes);
                out.push(b'}');
            }
            Ok(Applied {
                output: Ok(other), ..
            }) => write_batch_error(&mut out, &ApiError::unexpected(&other), None),
            Ok(Applied {
                index,
                term,
                output: Err(f),
            }) => write_batch_error(&mut out, &ApiError::from(f), Some((index, term))),
            Err(e) => write_batch_error(&mut out, &ApiError::from(e), None),
        }
    }
    out.extend_from_slice(b"]}");
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

/// The tasks of a batch body: a JSON array of at most `MAX_BATCH_TASKS` values of at most
/// `MAX_TASK_BYTES` each. Parsing stops at the first task too many or too large, so a body of
/// millions of tiny elements costs no more memory than the limit allows.
fn parse_batch(body: &[u8]) -> Result<Vec<&serde_json::value::RawValue>, ApiError> {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde_json::value::RawValue;

    struct Tasks<'f>(&'f std::cell::Cell<Option<ApiError>>);

    impl<'de> Visitor<'de> for Tasks<'_> {
        type Value = Vec<&'de RawValue>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of tasks")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut tasks = Vec::new();
            while let Some(task) = seq.next_element::<&'de RawValue>()? {
                let refused = if tasks.len() == MAX_BATCH_TASKS {
                    format!("more than {MAX_BATCH_TASKS} tasks; a batch takes at most that many")
                } else if task.get().len() > MAX_TASK_BYTES {
                    let i = tasks.len();
                    format!("task {i} exceeds the limit of {MAX_TASK_BYTES} bytes")
                } else {
                    tasks.push(task);
                    continue;
                };
                let e = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", refused);
                self.0.set(Some(e));
                return Err(A::Error::custom("refused"));
            }
            Ok(tasks)
        }
    }

    let refused = std::cell::Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_seq(Tasks(&refused))
        .and_then(|tasks| de.end().map(|()| tasks));
    match (parsed, refused.take()) {
        (_, Some(e)) => Err(e),
        (Ok(tasks), None) => Ok(tasks),
        (Err(e), None) => Err(ApiError::bad_request(format!(
            "expected a JSON array of tasks: {e}"
        ))),
    }
}

/// Embeds a machine's output as JSON when it is JSON, else as a JSON string.
fn write_json_or_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // serde_json skips the bytes of strings it ignores without checking their UTF-8: a string
    // holding invalid UTF-8 would pass and make the whole response invalid JSON.
    if std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        out.extend_from_slice(bytes);
    } else {
        let _ = serde_json::to_writer(&mut *out, &String::from_utf8_lossy(bytes));
    }
}

/// A task's error; one that was committed and applied also says where.
fn write_batch_error(out: &mut Vec<u8>, e: &ApiError, at: Option<(u64, u64)>) {
    let _ = write!(out, "{{\"status\":{},", e.status.as_u16());
    if let Some((index, term)) = at {
        let _ = write!(out, "\"index\":{index},\"term\":{term},");
    }
    out.extend_from_slice(b"\"error\":");
    e.write_fields(out);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Role;

    #[test]
    fn a_new_leader_trusts_a_missing_machine_only_once_its_no_op_is_applied() {
        let status = |commit_index, applied_index, term_start_index| crate::raft::Status {
            id: 1,
            role: Role::Leader,
            term: 2,
            leader: Some(1),
            commit_index,
            applied_index,
            last_index: 9,
            term_start_index,
            snapshot_index: 0,
            compacted_index: 0,
            members: Vec::new(),
        };
        // Elected with commit 4 applied, its no-op at 6: an earlier leader may have
        // acknowledged entry 5 (a deploy) before anyone else learnt it was committed.
        assert!(!absence_is_final(&status(4, 4, 6)));
        assert!(!absence_is_final(&status(6, 5, 6)));
        assert!(absence_is_final(&status(6, 6, 6)));
        assert!(absence_is_final(&status(8, 8, 6)));
    }

    #[test]
    fn a_batch_is_parsed_only_as_far_as_its_limits() {
        let tasks = parse_batch(br#"[{"add":1}, 2, "x"]"#).expect("three tasks");
        let texts: Vec<&str> = tasks.iter().map(|t| t.get()).collect();
        assert_eq!(texts, [r#"{"add":1}"#, "2", r#""x""#]);
        for bad in [&b"{}"[..], b"[1,", b"[1] 2", b""] {
            let e = parse_batch(bad).expect_err("not an array");
            assert_eq!(e.code, "bad_request", "{}", e.message);
        }
        // Millions of tiny tasks: refused at the first one too many.
        let many = format!("[{}0]", "0,".repeat(4_000_000));
        let e = parse_batch(many.as_bytes()).expect_err("too many");
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "too_large")
        );
        assert!(e.message.contains("more than 10000 tasks"), "{}", e.message);
        let big = format!("[1, \"{}\"]", "x".repeat(MAX_TASK_BYTES));
        let e = parse_batch(big.as_bytes()).expect_err("too large");
        assert_eq!(e.code, "too_large");
        assert!(e.message.starts_with("task 1 "), "{}", e.message);
    }

    #[test]
    fn a_batch_response_is_valid_json_whatever_a_machine_outputs() {
        for (output, embedded) in [
            (&b"{\"n\":1}"[..], "{\"n\":1}"),
            (b"plain text", "\"plain text\""),
            // A JSON string holding invalid UTF-8: embedded as-is, it would break the response.
            (b"\"\xff\"", "\"\\\"\u{fffd}\\\"\""),
            (b"\xff\xfe", "\"\u{fffd}\u{fffd}\""),
        ] {
            let mut out = Vec::new();
            write_json_or_string(&mut out, output);
            let text = std::str::from_utf8(&out).expect("UTF-8");
            assert_eq!(text, embedded);
            serde_json::from_str::<serde_json::Value>(text).expect("valid JSON");
        }
    }
}
