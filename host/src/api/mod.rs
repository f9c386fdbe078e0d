//! The HTTP API (hyper 1.x, HTTP/1.1 keep-alive): where a task enters the pipeline and where
//! its outcome leaves it. Routes and status codes are README.md's API reference.

mod body;
pub mod error;
pub mod metrics;

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::debug;

use crate::machines::{Catalog, Command, Effect, MachineSet, validate_name};
use crate::raft::{Applied, Node, NodeId, ProposeError, ReadError, Role};
use crate::wasm::ModuleRegistry;
use body::{BodyBudget, RequestBody, read_body};
pub use error::{ApiError, Body};

/// Largest task payload accepted.
pub const MAX_TASK_BYTES: usize = 1024 * 1024;
/// Largest component accepted by a deploy.
pub const MAX_MODULE_BYTES: usize = 16 * 1024 * 1024;
/// Largest body of a batch of tasks.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most tasks in one batch request.
pub const MAX_BATCH_TASKS: usize = 10_000;
/// Time a client has to send a request's headers (also the longest a keep-alive connection may
/// sit idle between requests: hyper starts this clock as soon as it waits for the next head).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest that data this node sent may stay unacknowledged (also a zero window: a client that
/// stops reading its responses) before the kernel drops the connection.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// HTTP connections served at once unless `--max-connections` says otherwise (and the process's
/// file-descriptor limit allows).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Header carrying the term a caller expects the leader to be in.
pub const EXPECTED_TERM: &str = "lockstep-expected-term";
// A task's response carries the log position it was applied at. The names are built once:
// parsing and validating them from a `&str` on every response showed in the leader's profile.
/// Header of a task's response: the index of its log entry.
const INDEX_HEADER: header::HeaderName = header::HeaderName::from_static("lockstep-index");
/// Header of a task's response: the term of its log entry.
const TERM_HEADER: header::HeaderName = header::HeaderName::from_static("lockstep-term");

/// Everything a request handler can reach.
pub struct ApiState {
    pub cluster_id: String,
    pub node: Node<MachineSet>,
    pub registry: Arc<ModuleRegistry>,
    pub catalog: Catalog,
    /// Raft address of every member.
    pub members: Vec<(NodeId, String)>,
    /// HTTP address of a member, as learnt from the peer transport.
    pub http_addr: Box<dyn Fn(NodeId) -> Option<String> + Send + Sync>,
    pub metrics: metrics::Metrics,
    /// Request bodies being read, node-wide.
    pub bodies: BodyBudget,
}

/// Serves HTTP/1.1 on `listener` until the task is dropped, at most `max_connections` at once.
/// At the cap the node stops accepting: further clients (health checks too) wait in the
/// kernel's listen backlog until a connection closes, as behind Go's `LimitListener`, which etcd
/// puts on its client listener. Memory then stays bounded however many clients arrive, and no
/// client holds a slot for long without making progress: headers, body and unacknowledged
/// responses each have a deadline.
///
/// Once `stop` turns true the node accepts no more connections; requests in flight are
/// answered (idle connections close at once), and `serve` returns when every connection has
/// ended: an operator's stop does not reset a client mid-request.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    max_connections: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let budget = connection_budget(max_connections);
    let slots = Arc::new(tokio::sync::Semaphore::new(budget));
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            // The semaphore is never closed, so this waits rather than fails.
            accepted = async {
                let slot = slots.clone().acquire_owned().await.ok()?;
                Some((slot, listener.accept().await))
            } => accepted,
        };
        let Some((slot, accepted)) = accepted else {
            break;
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        tune(&stream);
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                let req = req.map(RequestBody::new);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            // A client that never finishes its headers must not hold a connection forever.
            // Half-closes are allowed: otherwise, while a request is in flight, hyper polls the
            // socket for an early EOF and reserves a new 8 KiB read buffer for it every time
            // (the request still holds slices of the old one), a malloc and a free per task.
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .half_close(true);
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), svc));
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stopped(&mut stop) => {
                    // Finish the request in flight, then close (at once if idle).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, "http connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every slot back: every connection has ended.
    let _ = slots
        .acquire_many(u32::try_from(budget).unwrap_or(u32::MAX))
        .await;
}

/// Resolves once `stop` turns true; never if its sender is dropped instead (a dropped
/// `RunningNode` keeps serving, as documented there).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|&s| s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Descriptors kept for everything but client connections: peers, the log, the runtime's own.
const RESERVED_DESCRIPTORS: u64 = 256;

/// `wanted` connections, fewer if the process's descriptor limit cannot hold them: at the limit
/// `accept` would fail anyway, and so could peer dials and the log.
fn connection_budget(wanted: usize) -> usize {
    let wanted = wanted.max(1);
    let Some(limit) = crate::fd_limit::soft() else {
        return wanted;
    };
    let fit = fit_descriptors(wanted, limit);
    if fit < wanted {
        tracing::warn!(
            wanted,
            serving = fit,
            descriptor_limit = limit,
            "fewer HTTP connections than --max-connections: the descriptor limit is lower"
        );
    }
    fit
}

/// At most `wanted`, leaving `RESERVED_DESCRIPTORS` of `limit` free (and never below 16).
fn fit_descriptors(wanted: usize, limit: u64) -> usize {
    let fit = limit.saturating_sub(RESERVED_DESCRIPTORS).max(16);
    wanted.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// Socket options of an accepted client connection.
fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(SEND_TIMEOUT));
}

async fn handle(state: &ApiState, req: Request<RequestBody>) -> Response<Body> {
    let resp = match route(state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.count_response(resp.status());
    resp
}

async fn route(state: &ApiState, req: Request<RequestBody>) -> Result<Response<Body>, ApiError> {
    // The path's segments, without an allocation per request (the clone shares the URI's
    // bytes): one slot more than the longest route, so a longer path matches none.
    let uri = req.uri().clone();
    let path = uri.path();
    let mut segs = [""; 6];
    let n = segs
        .iter_mut()
        .zip(path.trim_matches('/').split('/'))
        .map(|(slot, seg)| *slot = seg)
        .count();
    match (req.method().clone(), &segs[..n]) {
        (Method::GET, ["healthz"]) if state.node.is_stopped() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopped",
            "the replication pipeline stopped (see the node's log)",
        )),
        (Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (Method::GET, ["metrics"]) => Ok(text(StatusCode::OK, &state.metrics.render(state))),
        (Method::GET, ["v1", "cluster"]) => Ok(cluster(state)),
        (Method::GET, ["v1", "machines"]) => Ok(list(state)),
        (Method::PUT, ["v1", "machines", name]) => deploy(state, name, req).await,
        (Method::GET, ["v1", "machines", name]) => describe(state, name, &req).await,
        (Method::DELETE, ["v1", "machines", name]) => delete(state, name, &req).await,
        (Method::POST, ["v1", "machines", name, "tasks"]) => submit(state, name, req).await,
        (Method::POST, ["v1", "machines", name, "tasks:batch"]) => {
            submit_batch(state, name, req).await
        }
        (Method::POST, ["v1", "machines", name, "query"]) => query(state, name, req).await,
        // A known route with another method; an unknown path is a 404 whatever the method.
        (
            _,
            ["healthz" | "metrics"]
            | ["v1", "cluster" | "machines"]
            | ["v1", "machines", _]
            | ["v1", "machines", _, "tasks" | "tasks:batch" | "query"],
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {path}", req.method()),
        )),
        _ => Err(ApiError::not_found(format!("no route for {path}"))),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn check_name(name: &str) -> Result<(), ApiError> {
    validate_name(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// 307 to the same URL on the leader, or 503 when no leader (or its address) is known.
fn redirect(state: &ApiState, leader: Option<NodeId>, uri: &hyper::Uri) -> Response<Body> {
    let Some(http) = leader.and_then(|id| (state.http_addr)(id)) else {
        return ApiError::no_leader().into_response();
    };
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let location = format!("http://{http}{pq}");
    let mut r = json_response(
        StatusCode::TEMPORARY_REDIRECT,
        &json!({"leader": {"id": leader, "http": http}}),
    );
    if let Ok(v) = header::HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// `Some(redirect)` when this node is not the leader: nothing is proposed on a follower.
fn leader_or_redirect(state: &ApiState, uri: &hyper::Uri) -> Option<Response<Body>> {
    let (role, leader) = state.node.role();
    (role != Role::Leader).then(|| redirect(state, leader, uri))
}

fn expected_term(req: &Request<RequestBody>) -> Result<Option<u64>, ApiError> {
    req.headers()
        .get(EXPECTED_TERM)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Lockstep-Expected-Term must be an unsigned integer")
                })
        })
        .transpose()
}

fn cluster(state: &ApiState) -> Response<Body> {
    let s = state.node.status();
    let leader = s
        .leader
        .map(|id| json!({"id": id, "http": (state.http_addr)(id)}));
    let members: Vec<_> = state
        .members
        .iter()
        .map(|(id, raft)| {
            let match_index = s
                .members
                .iter()
                .find(|m| m.id == *id)
                .and_then(|m| m.match_index);
            json!({"id": id, "raft": raft, "http": (state.http_addr)(*id), "match_index": match_index})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "cluster_id": state.cluster_id,
            "node_id": s.id,
            "role": role_name(s.role),
            "term": s.term,
            "leader": leader,
            "commit_index": s.commit_index,
            "applied_index": s.applied_index,
            "members": members,
        }),
    )
}

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
    }
}

fn list(state: &ApiState) -> Response<Body> {
    let machines: Vec<_> = state
        .catalog
        .read()
        .map(|c| c.values().cloned().collect())
        .unwrap_or_default();
    json_response(StatusCode::OK, &json!({ "machines": machines }))
}

async fn deploy(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    let uri = req.uri().clone();
    let (module, _read) = read_body(req, MAX_MODULE_BYTES, &state.bodies).await?;
    // Refuse a bad component here, before it costs a log entry on every replica.
    let registry = state.registry.clone();
    let bytes = module.clone();
    tokio::task::spawn_blocking(move || registry.add(&bytes))
        .await
        .map_err(|e| ApiError::internal(format!("validating the module: {e}")))?
        .map_err(ApiError::from)?;
    let entry = Command::Deploy {
        machine: name.to_owned(),
        module,
    }
    .encode();
    let applied = match state.node.propose(entry, None).await {
        Ok(a) => a,
        Err(ProposeError::NotLeader { leader }) => return Ok(redirect(state, leader, &uri)),
        Err(e) => return Err(e.into()),
    };
    match applied.output? {
        Effect::Deployed {
            digest,
            version,
            created,
        } => Ok(json_response(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            &json!({"name": name, "digest": digest, "version": version, "index": applied.index}),
        )),
        other => Err(ApiError::unexpected(&other)),
    }
}

async fn describe(
    state: &ApiState,
    name: &str,
    req: &Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    let with_digest = query_param(req.uri(), "digest").is_some_and(|v| v == "1" || v == "true");
    let name_owned = name.to_owned();
    let status = state
        .node
        .read(false, move |sm: &mut MachineSet| {
            sm.status(&name_owned, with_digest)
        })
        .await??;
    Ok(json_response(
        StatusCode::OK,
        &serde_json::to_value(status).unwrap_or_default(),
    ))
}

async fn delete(
    state: &ApiState,
    name: &str,
    req: &Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    let entry = Command::Delete {
        machine: name.to_owned(),
    }
    .encode();
    let applied = match state.node.propose(entry, None).await {
        Ok(a) => a,
        Err(ProposeError::NotLeader { leader }) => return Ok(redirect(state, leader, req.uri())),
        Err(e) => return Err(e.into()),
    };
    applied.output?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"name": name, "deleted": true, "index": applied.index}),
    ))
}

/// Where a task submission stands once its request has been read.
enum Admitted {
    /// This node does not lead: nothing will be proposed here.
    Redirect(Response<Body>),
    Task {
        term: Option<u64>,
        uri: hyper::Uri,
        body: Bytes,
        /// The body's bytes in the node's budget, until proposed.
        read: body::BodyPermit,
    },
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
    Ok(Admitted::Task {
        term,
        uri,
        body,
        read,
    })
}

async fn submit(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let (term, uri, payload, read) = match admit(state, name, req, MAX_TASK_BYTES).await? {
        Admitted::Redirect(r) => return Ok(r),
        Admitted::Task {
            term,
            uri,
            body,
            read,
        } => (term, uri, body, read),
    };
    let entry = Command::encode_task(name, &payload);
    drop((payload, read));
    let applied = match state.node.propose(entry, term).await {
        Ok(a) => a,
        Err(ProposeError::NotLeader { leader }) => return Ok(redirect(state, leader, &uri)),
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
async fn submit_batch(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    let (term, uri, body, read) = match admit(state, name, req, MAX_BATCH_BYTES).await? {
        Admitted::Redirect(r) => return Ok(r),
        Admitted::Task {
            term,
            uri,
            body,
            read,
        } => (term, uri, body, read),
    };
    let tasks = parse_batch(&body)?;
    let entries: Vec<Bytes> = tasks
        .iter()
        .map(|t| Command::encode_task(name, t.get().as_bytes()))
        .collect();
    drop(tasks);
    drop((body, read));
    let results = state.node.propose_many(entries, term).await;
    // Refused as a whole, nothing proposed: one answer (a redirect, a 409, a 503 with
    // Retry-After) rather than a 200 full of them.
    if let Some(Err(
        first @ (ProposeError::NotLeader { .. }
        | ProposeError::Overloaded
        | ProposeError::TermMismatch { .. }
        | ProposeError::ShuttingDown),
    )) = results.first()
        && results.iter().all(
            |r| matches!(r, Err(e) if std::mem::discriminant(e) == std::mem::discriminant(first)),
        )
    {
        return match first {
            ProposeError::NotLeader { leader } => Ok(redirect(state, *leader, &uri)),
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
    if serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok() {
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

async fn query(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    let linearizable = match query_param(req.uri(), "consistency").as_deref() {
        None | Some("linearizable") => true,
        Some("local") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "consistency must be linearizable or local, not {other:?}"
            )));
        }
    };
    let uri = req.uri().clone();
    let (request, _read) = read_body(req, MAX_TASK_BYTES, &state.bodies).await?;
    let name_owned = name.to_owned();
    let result = state
        .node
        .read(linearizable, move |sm: &mut MachineSet| {
            sm.query(&name_owned, &request)
        })
        .await;
    match result {
        Ok(Ok(bytes)) => Ok(Response::new(Full::new(Bytes::from(bytes)))),
        Ok(Err(f)) => Err(f.into()),
        Err(ReadError::NotLeader { leader }) => Ok(redirect(state, leader, &uri)),
        Err(e) => Err(e.into()),
    }
}

fn query_param(uri: &hyper::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overloaded_leader_says_retry_later() {
        let r = ApiError::from(ProposeError::Overloaded).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        let r = ApiError::from(ProposeError::OutcomeUnknown).into_response();
        assert!(
            r.headers().get(header::RETRY_AFTER).is_none(),
            "retrying an outcome_unknown could apply a task twice"
        );
    }

    #[test]
    fn the_descriptor_limit_bounds_the_connections() {
        assert_eq!(fit_descriptors(4096, 1024), 768);
        assert_eq!(fit_descriptors(100, 1024), 100);
        assert_eq!(
            fit_descriptors(4096, 100),
            16,
            "a tiny limit still serves some"
        );
        assert_eq!(fit_descriptors(4096, u64::MAX), 4096);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_drop_clients_that_stop_reading() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (stream, _) = accepted?;
        tune(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert_eq!(sock.tcp_user_timeout()?, Some(SEND_TIMEOUT));
        assert!(stream.nodelay()?);
        Ok(())
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
}
