//! Raft messages and log entries, with a compact binary encoding.
//!
//! Messages are one-way (a response is a message of its own, as in etcd-raft) so a transport may
//! pipeline, reorder or lose any of them. Decoding never panics: garbage gives a `DecodeError`.

use bytes::Bytes;

/// What a log entry carries. Only `Normal` entries reach the user's state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A user payload.
    Normal = 0,
    /// The entry a new leader appends at the start of its term (commits earlier terms' entries).
    Noop = 1,
    /// A new membership (`Membership::encode`), in effect from the moment it is in a log.
    Config = 2,
}

/// What an entry costs in memory besides its payload while it is in the log's tail, as the
/// backpressure bound counts it: the entry in the tail and in the state-machine queue, its
/// payload's shared header and allocator rounding, a waiting caller's completion. A leader
/// stalled by its machine held about 460 bytes per 16-byte task (`/proc` RSS over a million
/// of them); a bound on payload bytes alone let such a tail grow to 29 times the bound.
pub const TAIL_OVERHEAD: usize = 512;

/// `LogEntry::tail_size` of an entry with a payload of `payload` bytes.
pub fn tail_size(payload: usize) -> usize {
    payload + TAIL_OVERHEAD
}

/// What the backpressure bound counts for `entries` together.
pub fn tail_bytes<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> usize {
    entries.into_iter().map(LogEntry::tail_size).sum()
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub index: u64,
    pub term: u64,
    /// Chosen by the leader at propose time; the same on every replica.
    pub timestamp_ms: u64,
    pub kind: EntryKind,
    pub payload: Bytes,
}

impl LogEntry {
    /// What the state machine sees of this entry, if anything: no-ops stay in the pipeline.
    pub fn into_user_entry(self) -> Option<crate::state_machine::Entry> {
        (self.kind == EntryKind::Normal).then(|| crate::state_machine::Entry {
            index: self.index,
            term: self.term,
            timestamp_ms: self.timestamp_ms,
            payload: self.payload,
        })
    }

    /// Bytes this entry adds to a batch (payload plus a fixed header estimate).
    pub fn size(&self) -> usize {
        self.payload.len() + 24
    }

    /// What the backpressure bound (`max_unapplied_bytes`) counts for this entry while it is in
    /// the log's tail: its payload and `TAIL_OVERHEAD`.
    pub fn tail_size(&self) -> usize {
        tail_size(self.payload.len())
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.index);
        put_u64(out, self.term);
        put_u64(out, self.timestamp_ms);
        out.push(self.kind as u8);
        put_u64(out, self.payload.len() as u64);
        out.extend_from_slice(&self.payload);
    }

    pub fn decode(bytes: &[u8]) -> Result<LogEntry, DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let e = r.entry()?;
        r.finish()?;
        Ok(e)
    }

    /// Decodes back-to-back encoded entries (a storage row), calling `f` on each.
    pub fn decode_all(bytes: &[u8], mut f: impl FnMut(LogEntry)) -> Result<(), DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        while r.remaining() > 0 {
            f(r.entry()?);
        }
        Ok(())
    }
}

/// A Raft message between peers. `term` is the sender's term.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Pre-vote: "would you vote for me at `term`?" Changes nobody's term.
    PreVote {
        term: u64,
        last_index: u64,
        last_term: u64,
    },
    PreVoteResp {
        term: u64,
        granted: bool,
    },
    /// `transfer`: the candidate was told to campaign by the leader handing leadership over
    /// (`TimeoutNow`), so a voter that still hears that leader votes anyway.
    Vote {
        term: u64,
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResp {
        term: u64,
        granted: bool,
    },
    /// `seq` is the leader's read-index round; the follower echoes it back.
    Append {
        term: u64,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        seq: u64,
        entries: Vec<LogEntry>,
    },
    /// On success `index` is the follower's durable match; on rejection it is the rejected
    /// `prev_index` and `last_index` is where to probe next (the follower's last index, or the
    /// entry before its conflicting term run).
    AppendResp {
        term: u64,
        success: bool,
        index: u64,
        last_index: u64,
        seq: u64,
    },
    Heartbeat {
        term: u64,
        commit: u64,
        seq: u64,
    },
    /// `last_index` lets the leader notice a follower that lost entries it acknowledged.
    HeartbeatResp {
        term: u64,
        seq: u64,
        last_index: u64,
    },
    /// One chunk (bytes `offset..offset + data.len()` of `total`) of the leader's snapshot of
    /// the applied state at `index` (whose entry has `last_term`): sent to a follower that needs
    /// entries the leader compacted away.
    InstallSnapshot {
        term: u64,
        index: u64,
        last_term: u64,
        /// The timestamp of entry `index`: later entries are never stamped earlier.
        timestamp_ms: u64,
        offset: u64,
        total: u64,
        data: Bytes,
        /// The membership in effect at `index` (`Membership::encode`): the entries that say
        /// so may be compacted away.
        membership: Bytes,
    },
    /// The follower holds the first `received` bytes of snapshot `index`: the next chunk starts
    /// there. (Once installed it answers with an `AppendResp` at `index`.)
    SnapshotResp {
        term: u64,
        index: u64,
        received: u64,
    },
    /// From a leader handing leadership over to a follower whose log it knows matches its own:
    /// campaign now, without waiting for an election timeout or a pre-vote.
    TimeoutNow {
        term: u64,
    },
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("unknown entry kind {0}")]
    UnknownKind(u8),
    #[error("varint overflows u64")]
    VarintOverflow,
    #[error("number {0} is beyond any term or index a peer can reach")]
    OutOfRange(u64),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("bad boolean {0}")]
    BadBool(u8),
    #[error("text is not UTF-8")]
    BadText,
    #[error("a membership names member 0 or a member twice")]
    BadMembership,
}

/// The largest number a message may carry (terms, indexes, lengths, timestamps): far beyond
/// any a cluster reaches, far enough below `u64::MAX` that the core's arithmetic cannot wrap.
pub const MAX_WIRE_NUMBER: u64 = 1 << 62;

const TAG_PREVOTE: u8 = 1;
const TAG_PREVOTE_RESP: u8 = 2;
const TAG_VOTE: u8 = 3;
const TAG_VOTE_RESP: u8 = 4;
const TAG_APPEND: u8 = 5;
const TAG_APPEND_RESP: u8 = 6;
const TAG_HEARTBEAT: u8 = 7;
const TAG_HEARTBEAT_RESP: u8 = 8;
const TAG_INSTALL_SNAPSHOT: u8 = 9;
const TAG_SNAPSHOT_RESP: u8 = 10;
const TAG_TIMEOUT_NOW: u8 = 11;

impl Message {
    pub fn term(&self) -> u64 {
        match self {
            Message::PreVote { term, .. }
            | Message::PreVoteResp { term, .. }
            | Message::Vote { term, .. }
            | Message::VoteResp { term, .. }
            | Message::Append { term, .. }
            | Message::AppendResp { term, .. }
            | Message::Heartbeat { term, .. }
            | Message::HeartbeatResp { term, .. }
            | Message::InstallSnapshot { term, .. }
            | Message::SnapshotResp { term, .. }
            | Message::TimeoutNow { term } => *term,
        }
    }

    /// Appends the encoding of `self` to `out` (no length prefix: the transport frames it).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::PreVote {
                term,
                last_index,
                last_term,
            } => {
                out.push(TAG_PREVOTE);
                put_u64(out, *term);
                put_u64(out, *last_index);
                put_u64(out, *last_term);
            }
            Message::PreVoteResp { term, granted } => {
                out.push(TAG_PREVOTE_RESP);
                put_u64(out, *term);
                out.push(*granted as u8);
            }
            Message::Vote {
                term,
                last_index,
                last_term,
                transfer,
            } => {
                out.push(TAG_VOTE);
                put_u64(out, *term);
                put_u64(out, *last_index);
                put_u64(out, *last_term);
                out.push(*transfer as u8);
            }
            Message::VoteResp { term, granted } => {
                out.push(TAG_VOTE_RESP);
                put_u64(out, *term);
                out.push(*granted as u8);
            }
            Message::Append {
                term,
                prev_index,
                prev_term,
                commit,
                seq,
                entries,
            } => {
                out.push(TAG_APPEND);
                put_u64(out, *term);
                put_u64(out, *prev_index);
                put_u64(out, *prev_term);
                put_u64(out, *commit);
                put_u64(out, *seq);
                put_u64(out, entries.len() as u64);
                for e in entries {
                    e.encode(out);
                }
            }
            Message::AppendResp {
                term,
                success,
                index,
                last_index,
                seq,
            } => {
                out.push(TAG_APPEND_RESP);
                put_u64(out, *term);
                out.push(*success as u8);
                put_u64(out, *index);
                put_u64(out, *last_index);
                put_u64(out, *seq);
            }
            Message::Heartbeat { term, commit, seq } => {
                out.push(TAG_HEARTBEAT);
                put_u64(out, *term);
                put_u64(out, *commit);
                put_u64(out, *seq);
            }
            Message::HeartbeatResp {
                term,
                seq,
                last_index,
            } => {
                out.push(TAG_HEARTBEAT_RESP);
                put_u64(out, *term);
                put_u64(out, *seq);
                put_u64(out, *last_index);
            }
            Message::InstallSnapshot {
                term,
                index,
                last_term,
                timestamp_ms,
                offset,
                total,
                data,
                membership,
            } => {
                out.push(TAG_INSTALL_SNAPSHOT);
                put_u64(out, *term);
                put_u64(out, *index);
                put_u64(out, *last_term);
                put_u64(out, *timestamp_ms);
                put_u64(out, *offset);
                put_u64(out, *total);
                put_u64(out, data.len() as u64);
                out.extend_from_slice(data);
                put_u64(out, membership.len() as u64);
                out.extend_from_slice(membership);
            }
            Message::SnapshotResp {
                term,
                index,
                received,
            } => {
                out.push(TAG_SNAPSHOT_RESP);
                put_u64(out, *term);
                put_u64(out, *index);
                put_u64(out, *received);
            }
            Message::TimeoutNow { term } => {
                out.push(TAG_TIMEOUT_NOW);
                put_u64(out, *term);
            }
        }
    }

    /// Decodes one message occupying all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut r = Reader { buf: bytes, pos: 0 };
        let tag = r.byte()?;
        let msg = match tag {
            TAG_PREVOTE => Message::PreVote {
                term: r.u64()?,
                last_index: r.u64()?,
                last_term: r.u64()?,
            },
            TAG_PREVOTE_RESP => Message::PreVoteResp {
                term: r.u64()?,
                granted: r.bool()?,
            },
            TAG_VOTE => Message::Vote {
                term: r.u64()?,
                last_index: r.u64()?,
                last_term: r.u64()?,
                transfer: r.bool()?,
            },
            TAG_VOTE_RESP => Message::VoteResp {
                term: r.u64()?,
                granted: r.bool()?,
            },
            TAG_APPEND => {
                let term = r.u64()?;
                let prev_index = r.u64()?;
                let prev_term = r.u64()?;
                let commit = r.u64()?;
                let seq = r.u64()?;
                let n = r.u64()?;
                // Each entry takes at least 5 bytes: a garbage count cannot make us allocate.
                let cap = (n as usize).min(r.remaining() / 5);
                let mut entries = Vec::with_capacity(cap);
                for _ in 0..n {
                    entries.push(r.entry()?);
                }
                Message::Append {
                    term,
                    prev_index,
                    prev_term,
                    commit,
                    seq,
                    entries,
                }
            }
            TAG_APPEND_RESP => Message::AppendResp {
                term: r.u64()?,
                success: r.bool()?,
                index: r.u64()?,
                last_index: r.u64()?,
                seq: r.u64()?,
            },
            TAG_HEARTBEAT => Message::Heartbeat {
                term: r.u64()?,
                commit: r.u64()?,
                seq: r.u64()?,
            },
            TAG_HEARTBEAT_RESP => Message::HeartbeatResp {
                term: r.u64()?,
                seq: r.u64()?,
                last_index: r.u64()?,
            },
            TAG_INSTALL_SNAPSHOT => Message::InstallSnapshot {
                term: r.u64()?,
                index: r.u64()?,
                last_term: r.u64()?,
                timestamp_ms: r.u64()?,
                offset: r.u64()?,
                total: r.u64()?,
                data: r.bytes()?,
                membership: r.bytes()?,
            },
            TAG_SNAPSHOT_RESP => Message::SnapshotResp {
                term: r.u64()?,
                index: r.u64()?,
                received: r.u64()?,
            },
            TAG_TIMEOUT_NOW => Message::TimeoutNow { term: r.u64()? },
            other => return Err(DecodeError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

pub(super) fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::BadBool(b)),
        }
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let bits = (b & 0x7f) as u64;
            if shift == 63 && bits > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                // The core adds to terms and indexes: a peer's number near u64::MAX would
                // overflow there (and a term of u64::MAX, adopted, would end all elections).
                return if v > MAX_WIRE_NUMBER {
                    Err(DecodeError::OutOfRange(v))
                } else {
                    Ok(v)
                };
            }
        }
        Err(DecodeError::VarintOverflow)
    }

    /// A length-prefixed byte string.
    pub(super) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(DecodeError::Truncated);
        }
        let len = len as usize;
        let bytes = Bytes::copy_from_slice(&self.buf[self.pos..self.pos + len]);
        self.pos += len;
        Ok(bytes)
    }

    fn entry(&mut self) -> Result<LogEntry, DecodeError> {
        let index = self.u64()?;
        let term = self.u64()?;
        let timestamp_ms = self.u64()?;
        let kind = match self.byte()? {
            0 => EntryKind::Normal,
            1 => EntryKind::Noop,
            2 => EntryKind::Config,
            k => return Err(DecodeError::UnknownKind(k)),
        };
        let payload = self.bytes()?;
        Ok(LogEntry {
            index,
            term,
            timestamp_ms,
            kind,
            payload,
        })
    }

    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn samples() -> Vec<Message> {
        let e = |i: u64, k| LogEntry {
            index: i,
            term: 3,
            timestamp_ms: 1_700_000_000_000 + i,
            kind: k,
            payload: Bytes::from(vec![i as u8; i as usize]),
        };
        vec![
            Message::PreVote {
                term: 1,
                last_index: 2,
                last_term: 3,
            },
            Message::PreVoteResp {
                term: MAX_WIRE_NUMBER,
                granted: true,
            },
            Message::Vote {
                term: 7,
                last_index: 0,
                last_term: 0,
                transfer: false,
            },
            Message::Vote {
                term: 8,
                last_index: 12,
                last_term: 7,
                transfer: true,
            },
            Message::TimeoutNow { term: 8 },
            Message::VoteResp {
                term: 7,
                granted: false,
            },
            Message::Append {
                term: 3,
                prev_index: 9,
                prev_term: 2,
                commit: 8,
                seq: 4,
                entries: vec![
                    e(10, EntryKind::Noop),
                    e(11, EntryKind::Normal),
                    e(300, EntryKind::Normal),
                ],
            },
            Message::Append {
                term: 3,
                prev_index: 0,
                prev_term: 0,
                commit: 0,
                seq: 0,
                entries: vec![],
            },
            Message::AppendResp {
                term: 3,
                success: true,
                index: 11,
                last_index: 11,
                seq: 4,
            },
            Message::Heartbeat {
                term: 3,
                commit: 11,
                seq: 5,
            },
            Message::HeartbeatResp {
                term: 3,
                seq: 5,
                last_index: 11,
            },
            Message::InstallSnapshot {
                term: 4,
                index: 1_000,
                last_term: 3,
                timestamp_ms: 1_700_000_000_000,
                offset: 64,
                total: 200,
                data: Bytes::from(vec![7u8; 64]),
                membership: crate::raft::Membership::of_ids([1, 2, 3]).encode(),
            },
            Message::SnapshotResp {
                term: 4,
                index: 1_000,
                received: 128,
            },
        ]
    }

    #[test]
    fn roundtrip() {
        for m in samples() {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            assert_eq!(Message::decode(&buf), Ok(m.clone()));
            // Every strict prefix is an error, never a panic or a wrong message.
            for cut in 0..buf.len() {
                assert!(Message::decode(&buf[..cut]).is_err(), "{m:?} cut at {cut}");
            }
            buf.push(0);
            assert_eq!(Message::decode(&buf), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut encoded = Vec::new();
        for m in samples() {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            encoded.push(buf);
        }
        for i in 0..200_000 {
            let mut buf = if i % 2 == 0 {
                let len = rng.gen_range(0..64);
                (0..len).map(|_| rng.r#gen::<u8>()).collect::<Vec<u8>>()
            } else {
                encoded[i % encoded.len()].clone()
            };
            // Flip a few bytes of a valid message.
            for _ in 0..rng.gen_range(0..4) {
                if !buf.is_empty() {
                    let at = rng.gen_range(0..buf.len());
                    buf[at] = rng.r#gen();
                }
            }
            let _ = Message::decode(&buf);
        }
        // A huge entry count with no bytes behind it fails cleanly without allocating.
        let mut buf = vec![TAG_APPEND, 1, 0, 0, 0, 0];
        put_u64(&mut buf, MAX_WIRE_NUMBER);
        assert_eq!(Message::decode(&buf), Err(DecodeError::Truncated));
        assert_eq!(
            Message::decode(&[
                TAG_VOTE, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f
            ]),
            Err(DecodeError::VarintOverflow)
        );
    }

    #[test]
    fn numbers_beyond_the_wire_bound_are_refused() {
        let vote = |term: u64| {
            let mut buf = Vec::new();
            Message::Vote {
                term,
                last_index: 1,
                last_term: 1,
                transfer: false,
            }
            .encode(&mut buf);
            Message::decode(&buf)
        };
        assert!(vote(MAX_WIRE_NUMBER).is_ok());
        for term in [MAX_WIRE_NUMBER + 1, u64::MAX] {
            assert_eq!(vote(term), Err(DecodeError::OutOfRange(term)));
        }
        let mut buf = Vec::new();
        Message::AppendResp {
            term: 1,
            success: false,
            index: u64::MAX,
            last_index: 0,
            seq: 0,
        }
        .encode(&mut buf);
        assert_eq!(
            Message::decode(&buf),
            Err(DecodeError::OutOfRange(u64::MAX))
        );
    }
}
