//! The HTTP API (hyper 1.x, HTTP/1.1 keep-alive): where a task enters the pipeline and where
//! its outcome leaves it. Routes and status codes are README.md's API reference.
//!
//! `server` accepts and bounds connections, `route` (here) dispatches a request, `tasks` takes
//! tasks in, `machines` deploys and reads machines, `cluster` shows the members and moves
//! leadership, `body` reads request bodies within the node's budget, `error` is every
//! refusal's status and stable code, and `metrics` renders `/metrics`.

mod body;
mod cluster;
pub mod error;
mod machines;
pub mod metrics;
mod server;
mod tasks;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::json;

use crate::machines::{Catalog, MachineSet, validate_name};
use crate::raft::{Node, NodeId, Role};
use crate::wasm::ModuleRegistry;
use body::{BodyBudget, RequestBody};
use cluster::{add_member, cluster, move_member, remove_member, transfer_leader};
pub use error::{ApiError, Body, Clipped};
use machines::{delete, deploy, describe, list, query};
pub use server::serve;
use tasks::{submit, submit_batch};

/// Largest task payload accepted.
pub const MAX_TASK_BYTES: usize = 1024 * 1024;
/// Largest component accepted by a deploy.
pub const MAX_MODULE_BYTES: usize = 16 * 1024 * 1024;
/// Largest body of a batch of tasks.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most tasks in one batch request.
pub const MAX_BATCH_TASKS: usize = 10_000;
/// HTTP connections served at once unless `--max-connections` says otherwise (and the process's
/// file-descriptor limit allows).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;
/// Header carrying the term a caller expects the leader to be in.
pub const EXPECTED_TERM: &str = "lockstep-expected-term";

/// Everything a request handler can reach.
pub struct ApiState {
    pub cluster_id: String,
    pub node: Node<MachineSet>,
    pub registry: Arc<ModuleRegistry>,
    pub catalog: Catalog,
    /// The peer address this node reaches a member at.
    pub raft_addr: Box<dyn Fn(NodeId) -> Option<String> + Send + Sync>,
    /// HTTP address of a member, as learnt from the peer transport.
    pub http_addr: Box<dyn Fn(NodeId) -> Option<String> + Send + Sync>,
    pub metrics: metrics::Metrics,
    /// Request bodies being read, node-wide.
    pub bodies: BodyBudget,
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
    // HEAD is GET without the body (hyper leaves it out): what health checkers often send.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    match (method, &segs[..n]) {
        (Method::GET, ["healthz"]) if state.node.is_stopped() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopped",
            "the replication pipeline stopped (see the node's log)",
        )),
        (Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n")),
        (Method::GET, ["metrics"]) => Ok(text(StatusCode::OK, &state.metrics.render(state))),
        (Method::GET, ["v1", "cluster"]) => Ok(cluster(state)),
        (Method::POST, ["v1", "cluster", "leader"]) => transfer_leader(state, req).await,
        (Method::POST, ["v1", "cluster", "members"]) => add_member(state, req).await,
        (Method::DELETE, ["v1", "cluster", "members", id]) => remove_member(state, id, req).await,
        (Method::PUT, ["v1", "cluster", "members", id]) => move_member(state, id, req).await,
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
        (_, segs) => match allowed_methods(segs) {
            Some(allow) => {
                let mut r = ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!(
                        "{} is not allowed on {} (allowed: {allow})",
                        Clipped(req.method().as_str()),
                        Clipped(path)
                    ),
                )
                .into_response();
                r.headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static(allow));
                Ok(r)
            }
            None => Err(ApiError::not_found(format!(
                "no route for {}",
                Clipped(path)
            ))),
        },
    }
}

/// The methods a known path takes, for a 405's `Allow` header; `None` for an unknown path.
fn allowed_methods(segs: &[&str]) -> Option<&'static str> {
    Some(match segs {
        ["healthz" | "metrics"] | ["v1", "cluster" | "machines"] => "GET, HEAD",
        ["v1", "machines", _] => "GET, HEAD, PUT, DELETE",
        ["v1", "machines", _, "tasks" | "tasks:batch" | "query"]
        | ["v1", "cluster", "leader" | "members"] => "POST",
        ["v1", "cluster", "members", _] => "PUT, DELETE",
        _ => return None,
    })
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
    let given = req.headers().get_all(EXPECTED_TERM).iter();
    at_most_one(given, "Lockstep-Expected-Term")?
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

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
    }
}

/// The value of `key` in the query string, if given (at most once).
fn query_param(uri: &hyper::Uri, key: &str) -> Result<Option<String>, ApiError> {
    let values = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == key).then(|| v.to_owned())
        });
    at_most_one(values, &format!("query parameter {key}"))
}

/// The one value a caller gave for `what`, if any. Given twice (`?consistency=local&
/// consistency=linearizable`), it is refused: which one the caller meant would be a guess.
fn at_most_one<T>(mut values: impl Iterator<Item = T>, what: &str) -> Result<Option<T>, ApiError> {
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!(
            "{what} given more than once"
        )));
    }
    Ok(first)
}
