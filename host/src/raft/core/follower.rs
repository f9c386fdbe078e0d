//! The follower side of replication: appends checked against the log (Raft's log matching),
//! conflicts truncated, snapshots assembled from chunks and installed.

use super::*;

/// A snapshot being received, chunk by chunk.
#[derive(Debug)]
pub(super) struct Receiving {
    /// The term of the leader sending it: one leader per term, one snapshot per leader and
    /// index, so chunks of two leaders' snapshots (which may differ) are never spliced.
    pub(super) leader_term: u64,
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) timestamp_ms: u64,
    pub(super) total: u64,
    pub(super) data: Vec<u8>,
    pub(super) membership: Membership,
}

impl RaftCore {
    pub(super) fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        commit: u64,
        seq: u64,
        entries: Vec<LogEntry>,
    ) {
        let reject = |core: &mut RaftCore| {
            let m = Message::AppendResp {
                term: core.term,
                success: false,
                index: prev_index,
                last_index: core.match_hint(prev_index),
                seq,
            };
            core.ready.messages.push((from, m));
        };
        // A well-formed append carries consecutive entries after `prev_index`, in terms that
        // never decrease nor exceed the leader's; anything else is dropped, not trusted.
        let well_formed = entries.iter().enumerate().all(|(k, e)| {
            (e.kind != EntryKind::Config || Membership::decode(&e.payload).is_ok())
                && e.index == prev_index + 1 + k as u64
                && e.term <= self.term
                && e.term
                    >= if k == 0 {
                        prev_term
                    } else {
                        entries[k - 1].term
                    }
        });
        if !well_formed {
            tracing::warn!(from, prev_index, "dropping a malformed append");
            return;
        }
        // A snapshot being installed replaces the log: the leader resends after it.
        if self.installing.is_some() {
            return;
        }
        // A follower whose machine lags behind its commit takes no more entries while its tail
        // holds `max_unapplied_bytes` (the leader bounds only its own): dropped unanswered, the
        // append is sent again later, as if lost. Otherwise a slow machine (say, under a flood
        // of local queries) would let the tail, and the state-machine queue sharing its
        // payloads, grow without bound. Only while something committed is unapplied, which the
        // machine works off by itself: a tail full of a deposed leader's entries still truncates.
        if !entries.is_empty()
            && self.mem_bytes >= self.cfg.max_unapplied_bytes
            && self.applied < self.commit
        {
            return;
        }
        if prev_index > self.last_index || self.term_at(prev_index) != prev_term {
            // Below our commit the entries are known to match: the leader just lags behind.
            if prev_index >= self.commit {
                reject(self);
                return;
            }
        }
        let last_new = prev_index + entries.len() as u64;
        // Skip what we already have; truncate at the first conflict; append the rest.
        let mut to_append = Vec::new();
        for e in entries {
            if e.index <= self.commit {
                continue;
            }
            if to_append.is_empty() && e.index <= self.last_index {
                if self.term_at(e.index) == e.term {
                    continue;
                }
                self.truncate(e.index);
            }
            to_append.push(e);
        }
        if !to_append.is_empty() {
            self.append_local(to_append);
        }
        self.advance_commit(commit.min(last_new));
        let resp = Message::AppendResp {
            term: self.term,
            success: true,
            index: last_new,
            last_index: self.last_index,
            seq,
        };
        self.send_after_durable(from, resp, last_new);
    }

    /// One chunk of the leader's snapshot. Chunks are taken in order only; anything else is
    /// answered with what is held, so the leader resends from there.
    pub(super) fn handle_snapshot(
        &mut self,
        from: NodeId,
        chunk: Snapshot,
        offset: u64,
        total: u64,
    ) {
        let index = chunk.index;
        if index <= self.commit {
            // Everything it holds is committed here already: the leader may go on from our
            // commit, once that much of our log is durable.
            let resp = Message::AppendResp {
                term: self.term,
                success: true,
                index: self.commit,
                last_index: self.last_index,
                seq: 0,
            };
            self.send_after_durable(from, resp, self.commit);
            return;
        }
        if let Some(s) = &self.installing {
            // One install at a time. The leader waits for its answer (sending this one) or
            // resends later (another one, from a new leader): no answer keeps it waiting.
            if s.index == index {
                self.snapshot_resp(from, index, total);
            }
            return;
        }
        let fits = offset
            .checked_add(chunk.data.len() as u64)
            .is_some_and(|end| end <= total);
        let key = (self.term, index, chunk.term, total);
        let held = match &self.receiving {
            Some(r) if (r.leader_term, r.index, r.term, r.total) == key => {
                Some(r.data.len() as u64)
            }
            _ => None,
        };
        let continues = held == Some(offset);
        if !fits || !(continues || offset == 0) {
            self.snapshot_resp(from, index, held.unwrap_or(0));
            return;
        }
        if !continues {
            self.receiving = Some(Receiving {
                leader_term: self.term,
                index,
                term: chunk.term,
                timestamp_ms: chunk.timestamp_ms,
                total,
                data: Vec::new(),
                membership: chunk.membership,
            });
        }
        let Some(r) = self.receiving.as_mut() else {
            return;
        };
        r.data.extend_from_slice(&chunk.data);
        let received = r.data.len() as u64;
        if received == total
            && let Some(r) = self.receiving.take()
        {
            let snapshot = Snapshot {
                index: r.index,
                term: r.term,
                timestamp_ms: r.timestamp_ms,
                data: Bytes::from(r.data),
                membership: r.membership,
            };
            self.installing = Some(snapshot.clone());
            self.ready.install = Some(snapshot);
        }
        self.snapshot_resp(from, index, received);
    }

    fn snapshot_resp(&mut self, to: NodeId, index: u64, received: u64) {
        let resp = Message::SnapshotResp {
            term: self.term,
            index,
            received,
        };
        self.ready.messages.push((to, resp));
    }

    /// Where a leader whose append at `prev_index` this log rejects should probe next: its
    /// last index when shorter, else the entry before the term run holding `prev_index` (the
    /// leader has another term there, so that run is suspect from its start; the logs may
    /// still match partway into it, which costs only resending entries), never below commit. The leader skips a whole run per round trip
    /// instead of one index, so a long divergent suffix costs one probe, not one per entry.
    fn match_hint(&self, prev_index: u64) -> u64 {
        if prev_index > self.last_index {
            return self.last_index;
        }
        let pos = self
            .term_runs
            .partition_point(|&(start, _)| start <= prev_index);
        let run_start = pos.checked_sub(1).map(|p| self.term_runs[p].0).unwrap_or(1);
        run_start.saturating_sub(1).max(self.commit)
    }
}
