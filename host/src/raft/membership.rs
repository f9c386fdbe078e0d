//! Who votes: the members of the group and the peer address each is reached at.
//!
//! A membership is in effect on a node from the moment its entry (`EntryKind::Config`) is in
//! the node's log, committed or not (Raft's single-server changes): a change adds or removes
//! one member, so any majority of the old members and any majority of the new ones share a
//! member, and two leaders cannot be elected for one term across the change. A leader appends
//! a change only once the previous one is committed. A truncated change is undone.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::NodeId;
use super::message::{DecodeError, MAX_WIRE_NUMBER, Reader, put_u64};

/// The largest member id. Ids travel in memberships as wire numbers, which readers refuse past
/// `MAX_WIRE_NUMBER`: a larger id would be written into the log and then refused by every node
/// that reads it back (followers, a restart).
pub const MAX_NODE_ID: NodeId = MAX_WIRE_NUMBER;

/// Whether `id` can be a member's: 1 to `MAX_NODE_ID`.
fn valid_id(id: NodeId) -> bool {
    (1..=MAX_NODE_ID).contains(&id)
}

/// The members, by id, with their peer (Raft) addresses. An address may be empty: the
/// members a cluster was started with are reached at the addresses in `--peers`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    members: BTreeMap<NodeId, String>,
}

/// Why a membership change was refused (nothing was appended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeRefused {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<NodeId> },
    #[error("a membership change is in progress (it is not committed yet); try again")]
    InProgress,
    #[error("leadership is moving to {to}; try again")]
    Transferring { to: NodeId },
    #[error("{0} is a member already")]
    AlreadyAMember(NodeId),
    #[error("{0} is not a member")]
    NotAMember(NodeId),
    #[error("the last member cannot be removed")]
    LastMember,
    #[error("member ids are 1 to {MAX_NODE_ID}, not {0}")]
    BadId(NodeId),
    #[error("a membership change adds or removes exactly one member, or moves one")]
    NotOneChange,
    #[error("{0} is reached at that address already")]
    SameAddress(NodeId),
    #[error("member {by} is reached at {address}")]
    AddressTaken { address: String, by: NodeId },
    /// The followers would send their answers to the new address, where nothing listens
    /// until this node is restarted there: nothing more could commit.
    #[error(
        "{0} is the leader: hand leadership to another member first (POST /v1/cluster/leader), \
         then change its address"
    )]
    MovingLeader(NodeId),
    /// etcd's strict reconfiguration check: after the change, fewer members than its quorum
    /// would be reachable, so nothing more could commit until the others came back.
    #[error(
        "refused: after this change {needed} of its members must be reachable to commit \
         anything, and only {reachable} are (not heard from in the last election timeout: {}); \
         bring them back or remove them first (a leader elected a moment ago may not have \
         heard from every member yet: retry in a second)",
        list(unreachable)
    )]
    TooFewReachable {
        needed: usize,
        reachable: usize,
        unreachable: Vec<NodeId>,
    },
}

fn list(ids: &[NodeId]) -> String {
    let ids: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    ids.join(", ")
}

impl Membership {
    /// The members `ids`, at addresses known elsewhere (`--peers`).
    pub fn of_ids(ids: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            members: ids.into_iter().map(|id| (id, String::new())).collect(),
        }
    }

    pub fn from_addresses(members: BTreeMap<NodeId, String>) -> Membership {
        Membership { members }
    }

    pub fn ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.keys().copied()
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.members.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `id`'s peer address, if this membership records one.
    pub fn address(&self, id: NodeId) -> Option<&str> {
        self.members
            .get(&id)
            .map(String::as_str)
            .filter(|a| !a.is_empty())
    }

    pub fn addresses(&self) -> &BTreeMap<NodeId, String> {
        &self.members
    }

    /// This membership with `id` added at `address`.
    pub fn with(&self, id: NodeId, address: String) -> Result<Membership, ChangeRefused> {
        if !valid_id(id) {
            return Err(ChangeRefused::BadId(id));
        }
        if self.contains(id) {
            return Err(ChangeRefused::AlreadyAMember(id));
        }
        let mut next = self.clone();
        next.members.insert(id, address);
        Ok(next)
    }

    /// This membership without `id`.
    pub fn without(&self, id: NodeId) -> Result<Membership, ChangeRefused> {
        if !self.contains(id) {
            return Err(ChangeRefused::NotAMember(id));
        }
        if self.len() == 1 {
            return Err(ChangeRefused::LastMember);
        }
        let mut next = self.clone();
        next.members.remove(&id);
        Ok(next)
    }

    /// This membership with member `id` reached at `address` instead.
    pub fn moved(&self, id: NodeId, address: String) -> Result<Membership, ChangeRefused> {
        if !self.contains(id) {
            return Err(ChangeRefused::NotAMember(id));
        }
        let mut next = self.clone();
        next.members.insert(id, address);
        Ok(next)
    }

    /// This membership plus the members of `other` it lacks (with `other`'s addresses).
    pub fn including(&self, other: &Membership) -> Membership {
        let mut all = self.clone();
        for (&id, address) in &other.members {
            all.members.entry(id).or_insert_with(|| address.clone());
        }
        all
    }

    /// This membership with the addresses it lacks filled in by `address_of`.
    pub fn with_addresses(mut self, address_of: impl Fn(NodeId) -> Option<String>) -> Membership {
        for (&id, address) in self.members.iter_mut() {
            if address.is_empty()
                && let Some(a) = address_of(id)
            {
                *address = a;
            }
        }
        self
    }

    /// Whether `next` adds or removes exactly one member (addresses may differ).
    pub fn one_change_to(&self, next: &Membership) -> bool {
        let added = next.ids().filter(|&id| !self.contains(id)).count();
        let removed = self.ids().filter(|&id| !next.contains(id)).count();
        added + removed == 1
    }

    pub fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        put_u64(&mut out, self.members.len() as u64);
        for (&id, address) in &self.members {
            put_u64(&mut out, id);
            put_u64(&mut out, address.len() as u64);
            out.extend_from_slice(address.as_bytes());
        }
        out.into()
    }

    pub fn decode(bytes: &[u8]) -> Result<Membership, DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let n = r.u64()?;
        let mut members = BTreeMap::new();
        for _ in 0..n {
            let id = r.u64()?;
            let address = r.bytes()?;
            let address = String::from_utf8(address.to_vec()).map_err(|_| DecodeError::BadText)?;
            if id == 0 || members.insert(id, address).is_some() {
                return Err(DecodeError::BadMembership);
            }
        }
        r.finish()?;
        Ok(Membership { members })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_and_refuses_garbage() {
        let m = Membership::of_ids([1, 2])
            .with(7, "10.0.0.7:7000".into())
            .expect("a new member");
        assert_eq!(Membership::decode(&m.encode()), Ok(m.clone()));
        assert_eq!(m.address(7), Some("10.0.0.7:7000"));
        assert_eq!(m.address(1), None);
        let bytes = m.encode();
        for cut in 0..bytes.len() {
            assert!(Membership::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut dup = Vec::new();
        for v in [2, 1, 0, 1, 0] {
            put_u64(&mut dup, v);
        }
        assert_eq!(
            Membership::decode(&dup),
            Err(DecodeError::BadMembership),
            "a member twice"
        );
    }

    #[test]
    fn every_member_id_it_takes_reads_back() {
        let m = Membership::of_ids([1]);
        let largest = m
            .with(MAX_NODE_ID, "10.0.0.9:7000".into())
            .expect("in range");
        assert_eq!(Membership::decode(&largest.encode()), Ok(largest));
        // Past it, a membership encodes and then fails to decode on every node that reads
        // the log...
        let past = Membership::of_ids([1, MAX_NODE_ID + 1]);
        assert!(Membership::decode(&past.encode()).is_err());
        // ...so it is refused before it is proposed.
        for id in [MAX_NODE_ID + 1, u64::MAX] {
            assert_eq!(m.with(id, String::new()), Err(ChangeRefused::BadId(id)));
        }
    }

    #[test]
    fn changes_are_one_member_at_a_time() {
        let m = Membership::of_ids([1, 2, 3]);
        assert_eq!(
            m.with(3, String::new()),
            Err(ChangeRefused::AlreadyAMember(3))
        );
        assert_eq!(m.with(0, String::new()), Err(ChangeRefused::BadId(0)));
        assert_eq!(m.without(4), Err(ChangeRefused::NotAMember(4)));
        assert_eq!(
            Membership::of_ids([1]).without(1),
            Err(ChangeRefused::LastMember)
        );
        let added = m.with(4, String::new()).expect("add");
        assert!(m.one_change_to(&added));
        assert!(m.one_change_to(&m.without(2).expect("remove")));
        assert!(!m.one_change_to(&m));
        assert!(!m.one_change_to(&added.without(1).expect("remove")));
        let moved = m.moved(2, "10.0.0.2:7000".into()).expect("a member moves");
        assert_eq!(moved.address(2), Some("10.0.0.2:7000"));
        assert!(moved.ids().eq(m.ids()));
        assert_eq!(
            m.moved(4, "10.0.0.4:7000".into()),
            Err(ChangeRefused::NotAMember(4))
        );
        let both = moved.including(&added);
        assert!(both.ids().eq([1, 2, 3, 4]));
        assert_eq!(
            both.address(2),
            Some("10.0.0.2:7000"),
            "its own addresses win"
        );
    }
}
