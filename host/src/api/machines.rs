//! A machine's life through the log (deploy, upgrade, delete) and the reads of its state
//! (listing, description, query).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::body::{RequestBody, read_body};
use super::{
    ApiError, ApiState, Body, Clipped, MAX_MODULE_BYTES, MAX_TASK_BYTES, check_name, json_response,
    leader_or_redirect, query_param, redirect,
};
use crate::machines::{Command, Effect, MachineSet};
use crate::raft::{ProposeError, ReadError};

pub(super) fn list(state: &ApiState) -> Response<Body> {
    let machines: Vec<_> = state
        .catalog
        .read()
        .map(|c| c.values().cloned().collect())
        .unwrap_or_default();
    json_response(StatusCode::OK, &json!({ "machines": machines }))
}

pub(super) async fn deploy(
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

pub(super) async fn describe(
    state: &ApiState,
    name: &str,
    req: &Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    let with_digest = match query_param(req.uri(), "digest")?.as_deref() {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "digest must be 1, true, 0 or false, not {}",
                Clipped(other)
            )));
        }
    };
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

pub(super) async fn delete(
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

pub(super) async fn query(
    state: &ApiState,
    name: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    check_name(name)?;
    let linearizable = match query_param(req.uri(), "consistency")?.as_deref() {
        None | Some("linearizable") => true,
        Some("local") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "consistency must be linearizable or local, not {}",
                Clipped(other)
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
