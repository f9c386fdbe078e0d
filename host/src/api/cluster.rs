//! The members as this node sees them: adding and removing them, moving leadership between
//! them.

use std::time::Duration;

use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::body::{RequestBody, read_body};
use super::{ApiError, ApiState, Body, json_response, leader_or_redirect, redirect, role_name};
use crate::raft::{ChangeRefused, MemberChange, MembershipError, NodeId, TransferError};

/// Longest a leadership transfer is waited for: the leader gives one up after an election
/// timeout, but a cluster that loses its quorum meanwhile may elect nobody.
const TRANSFER_WAIT: Duration = Duration::from_secs(10);

pub(super) fn cluster(state: &ApiState) -> Response<Body> {
    let s = state.node.status();
    let leader = s
        .leader
        .map(|id| json!({"id": id, "http": (state.http_addr)(id)}));
    let members: Vec<_> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "raft": (state.raft_addr)(m.id),
                "http": (state.http_addr)(m.id),
                "match_index": m.match_index,
            })
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
            "last_index": s.last_index,
            "snapshot_index": s.snapshot_index,
            "compacted_index": s.compacted_index,
            "members": members,
        }),
    )
}

/// `POST /v1/cluster/leader` with `{"id": N}`: hands leadership to member N and answers once
/// it leads (200, the new leader), or why it does not (400 not a member, 503
/// `transfer_failed` when it did not take over). A follower redirects to the leader.
pub(super) async fn transfer_leader(
    state: &ApiState,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    let uri = req.uri().clone();
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Target {
        id: u64,
    }
    let Target { id } = read_json(state, req, r#"{"id": <member id>}"#).await?;
    let failed = |message: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transfer_failed", message)
    };
    match tokio::time::timeout(TRANSFER_WAIT, state.node.transfer_leadership(id)).await {
        Ok(Ok(())) => {
            let term = state.node.status().term;
            Ok(json_response(
                StatusCode::OK,
                &json!({"leader": {"id": id, "http": (state.http_addr)(id)}, "term": term}),
            ))
        }
        Ok(Err(TransferError::NotLeader { leader })) => Ok(redirect(state, leader, &uri)),
        Ok(Err(TransferError::NotAMember(id))) => {
            let members: Vec<String> = state
                .node
                .status()
                .members
                .iter()
                .map(|m| m.id.to_string())
                .collect();
            Err(ApiError::bad_request(format!(
                "node {id} is not a member (members: {})",
                members.join(", ")
            )))
        }
        Ok(Err(e @ TransferError::InProgress { .. })) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "transfer_in_progress",
            e.to_string(),
        )),
        Ok(Err(e @ (TransferError::GaveUp { .. } | TransferError::WentElsewhere { .. }))) => {
            Err(failed(e.to_string()))
        }
        Ok(Err(TransferError::ShuttingDown)) => Err(ApiError::shutting_down()),
        Err(_) => Err(failed(format!(
            "no leader was known {} s after the hand-over to node {id} began",
            TRANSFER_WAIT.as_secs()
        ))),
    }
}

/// Longest a membership change is waited for: a new member is first caught up with the log
/// (given up after 10 maximum election timeouts, 20 s), then the change commits within a round
/// trip or two when a quorum of the new members answers.
const CHANGE_WAIT: Duration = Duration::from_secs(30);

/// `POST /v1/cluster/members` with `{"id": N, "raft": "HOST:PORT"}`: adds member N, reached at
/// that peer address (start it first with `--join`). Answers once the change commits.
pub(super) async fn add_member(
    state: &ApiState,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    let uri = req.uri().clone();
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewMember {
        id: NodeId,
        raft: String,
    }
    let NewMember { id, raft } = read_json(
        state,
        req,
        r#"{"id": <new member id>, "raft": "HOST:PORT"}"#,
    )
    .await?;
    check_peer_address(&raft)?;
    let change = MemberChange::Add { id, address: raft };
    change_members(state, change, &uri).await
}

/// `PUT /v1/cluster/members/{id}` with `{"raft": "HOST:PORT"}`: member `id` is now reached
/// at that peer address (etcd's member update); restart it there with its data directory.
/// Answers once the change commits.
pub(super) async fn move_member(
    state: &ApiState,
    id: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    let uri = req.uri().clone();
    let id = parse_id(id)?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct NewAddress {
        raft: String,
    }
    let NewAddress { raft } = read_json(state, req, r#"{"raft": "HOST:PORT"}"#).await?;
    check_peer_address(&raft)?;
    change_members(state, MemberChange::Move { id, address: raft }, &uri).await
}

/// `DELETE /v1/cluster/members/{id}`: removes member `id` (the leader included: it steps down
/// once the change commits). Answers once the change commits.
pub(super) async fn remove_member(
    state: &ApiState,
    id: &str,
    req: Request<RequestBody>,
) -> Result<Response<Body>, ApiError> {
    if let Some(r) = leader_or_redirect(state, req.uri()) {
        return Ok(r);
    }
    change_members(state, MemberChange::Remove(parse_id(id)?), req.uri()).await
}

fn parse_id(id: &str) -> Result<NodeId, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request(format!("{id:?} is not a member id")))
}

fn check_peer_address(raft: &str) -> Result<(), ApiError> {
    // HOST:PORT, an IPv6 host in brackets; an address peers can dial (not 0.0.0.0 or [::]).
    let valid = raft.rsplit_once(':').is_some_and(|(host, port)| {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        !bare.is_empty()
            && (bare == host) != bare.contains(':')
            && !bare
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_unspecified())
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    }) && !raft.contains(char::is_whitespace);
    if !valid {
        return Err(ApiError::bad_request(format!(
            "\"raft\" must be the member's peer address, HOST:PORT (got {raft:?})"
        )));
    }
    Ok(())
}

async fn change_members(
    state: &ApiState,
    change: MemberChange,
    uri: &hyper::Uri,
) -> Result<Response<Body>, ApiError> {
    let unknown = |message: String| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown", message)
    };
    match tokio::time::timeout(CHANGE_WAIT, state.node.change_members(change)).await {
        Ok(Ok(index)) => {
            let members: Vec<NodeId> = state.node.status().members.iter().map(|m| m.id).collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"index": index, "members": members}),
            ))
        }
        Ok(Err(MembershipError::NotLeader { leader })) => Ok(redirect(state, leader, uri)),
        Ok(Err(MembershipError::Refused(
            e @ (ChangeRefused::InProgress | ChangeRefused::Transferring { .. }),
        ))) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "membership_change_in_progress",
            e.to_string(),
        )),
        Ok(Err(MembershipError::Refused(e @ ChangeRefused::TooFewReachable { .. }))) => Err(
            ApiError::new(StatusCode::CONFLICT, "too_few_reachable", e.to_string()),
        ),
        Ok(Err(MembershipError::Refused(e @ ChangeRefused::MovingLeader(_)))) => Err(
            ApiError::new(StatusCode::CONFLICT, "member_is_leader", e.to_string()),
        ),
        Ok(Err(MembershipError::Refused(e @ ChangeRefused::AddressTaken { .. }))) => Err(
            ApiError::new(StatusCode::CONFLICT, "address_in_use", e.to_string()),
        ),
        Ok(Err(MembershipError::Refused(e))) => Err(ApiError::bad_request(e.to_string())),
        Ok(Err(e @ MembershipError::OutcomeUnknown)) => Err(unknown(e.to_string())),
        Ok(Err(e @ MembershipError::NotCaughtUp(_))) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_caught_up",
            e.to_string(),
        )),
        Ok(Err(MembershipError::ShuttingDown)) => Err(ApiError::shutting_down()),
        Err(_) => Err(unknown(format!(
            "the change did not commit within {} s (is a quorum of the new members up?); it \
             may still commit: see GET /v1/cluster",
            CHANGE_WAIT.as_secs()
        ))),
    }
}

/// A small JSON body of the given `shape` (named in the error when it is not one).
async fn read_json<T: serde::de::DeserializeOwned>(
    state: &ApiState,
    req: Request<RequestBody>,
    shape: &str,
) -> Result<T, ApiError> {
    let (body, _read) = read_body(req, 4096, &state.bodies).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body must be {shape}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::check_peer_address;

    #[test]
    fn peer_addresses_are_host_and_port_a_peer_can_dial() {
        for ok in ["10.0.0.1:7000", "node-3.example:7000", "[::1]:7000"] {
            assert!(check_peer_address(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ":",
            "h:",
            "h:+70",
            "h:0",
            "h:70000",
            "::1",
            "[::1]",
            "[h]:1",
            "0.0.0.0:7000",
            "[::]:7000",
            " h:1",
            "h :1",
        ] {
            assert!(check_peer_address(bad).is_err(), "{bad:?}");
        }
    }
}
