//! The leader side of replication, one `Replicator` per follower (braft's replicator, etcd's
//! progress): pipelined appends, probing for the match point, snapshots for followers behind the
//! compacted log, heartbeats and read rounds, and the ballot box that commits.

use super::*;

/// Reports in a row of a last index below a follower's match that mean it lost its log.
const LOST_LOG_REPORTS: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ReplicatorState {
    /// One probe in flight at a time while the match point is unknown.
    Probe,
    /// Match known: stream appends, up to `max_inflight` in flight.
    Replicate,
    /// The entries it needs were compacted: sending `Replicator::sending`, one chunk in flight.
    Snapshot,
}

/// A snapshot on its way to one follower.
#[derive(Clone, Debug)]
pub(super) struct Sending {
    pub(super) snapshot: Snapshot,
    /// Bytes the follower confirmed it holds.
    pub(super) acked: u64,
    pub(super) sent_at: Option<u64>,
}

/// The leader's view of one follower and what it has sent it (braft's `Replicator`, etcd's
/// `Progress`).
#[derive(Clone, Debug)]
pub(super) struct Replicator {
    pub(super) next: u64,
    pub(super) matched: u64,
    pub(super) state: ReplicatorState,
    /// Last index of each append in flight, oldest first.
    pub(super) inflight: VecDeque<u64>,
    pub(super) probe_sent_at: Option<u64>,
    pub(super) last_progress_at: u64,
    /// Heard from in the current check-quorum window.
    pub(super) active: bool,
    /// When the follower last answered (`None`: not yet this term).
    pub(super) heard_at: Option<u64>,
    /// Highest read-index round the follower has answered.
    pub(super) seq_acked: u64,
    /// Reports in a row of a last index below `matched` (see `lost_log`).
    pub(super) reported_less: u8,
    /// In `ReplicatorState::Snapshot`: the snapshot being sent.
    pub(super) sending: Option<Sending>,
}

impl RaftCore {
    pub(super) fn replicate_all(&mut self) {
        let peers: Vec<NodeId> = self.replicators.keys().copied().collect();
        for p in peers {
            self.send_append(p);
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        let peers: Vec<(NodeId, u64)> = self
            .replicators
            .iter()
            .map(|(&p, pr)| (p, pr.matched))
            .collect();
        for (p, matched) in peers {
            let m = Message::Heartbeat {
                term: self.term,
                commit: self.commit.min(matched),
                seq: self.read_seq,
            };
            self.ready.messages.push((p, m));
        }
    }

    /// Sends what `peer` can take now: one probe, or appends up to the in-flight bound.
    pub(super) fn send_append(&mut self, peer: NodeId) {
        loop {
            let Some(p) = self.replicators.get(&peer) else {
                return;
            };
            match p.state {
                ReplicatorState::Probe => {
                    if let Some(at) = p.probe_sent_at
                        && self.now < at + self.cfg.heartbeat_ms
                    {
                        return;
                    }
                }
                ReplicatorState::Replicate => {
                    if p.inflight.len() >= self.cfg.max_inflight || p.next > self.last_index {
                        return;
                    }
                }
                ReplicatorState::Snapshot => {
                    self.send_snapshot_chunk(peer);
                    return;
                }
            }
            if p.next <= self.compacted {
                self.start_snapshot(peer);
                return;
            }
            let next = p.next;
            let hi = next.saturating_add(self.cfg.max_batch_entries as u64);
            let Some(entries) = self.slice(next, hi, self.cfg.max_batch_bytes) else {
                tracing::error!(peer, next, "log read failed; will retry");
                return;
            };
            if entries.is_empty() && p.state == ReplicatorState::Replicate {
                return;
            }
            let last = next + entries.len() as u64 - 1;
            let prev_index = next - 1;
            let msg = Message::Append {
                term: self.term,
                prev_index,
                prev_term: self.term_at(prev_index),
                commit: self.commit,
                seq: self.read_seq,
                entries,
            };
            self.ready.messages.push((peer, msg));
            let now = self.now;
            let Some(p) = self.replicators.get_mut(&peer) else {
                return;
            };
            match p.state {
                ReplicatorState::Probe => {
                    p.probe_sent_at = Some(now);
                    return;
                }
                ReplicatorState::Replicate => {
                    // Unanswered time counts from the oldest append in flight, not from the
                    // last answer before an idle spell.
                    if p.inflight.is_empty() {
                        p.last_progress_at = now;
                    }
                    p.inflight.push_back(last);
                    p.next = last + 1;
                }
                ReplicatorState::Snapshot => return,
            }
        }
    }

    /// `peer` needs entries compacted away: it is sent the latest snapshot instead.
    fn start_snapshot(&mut self, peer: NodeId) {
        let Some(snapshot) = self.snapshot.clone() else {
            tracing::error!(peer, "entries compacted without a snapshot to send");
            return;
        };
        let Some(p) = self.replicators.get_mut(&peer) else {
            return;
        };
        tracing::info!(peer, index = snapshot.index, "sending a snapshot");
        p.state = ReplicatorState::Snapshot;
        p.inflight.clear();
        p.probe_sent_at = None;
        p.sending = Some(Sending {
            snapshot,
            acked: 0,
            sent_at: None,
        });
        self.send_snapshot_chunk(peer);
    }

    /// Sends the chunk after what `peer` confirmed, unless one is in flight (resent after two
    /// heartbeats unanswered).
    fn send_snapshot_chunk(&mut self, peer: NodeId) {
        let (now, term, chunk) = (self.now, self.term, self.cfg.snapshot_chunk_bytes.max(1));
        let latest = self.snapshot.as_ref();
        let Some(sending) = self
            .replicators
            .get_mut(&peer)
            .and_then(|p| p.sending.as_mut())
        else {
            return;
        };
        // Nothing of it received yet (a follower down all along): a newer snapshot, taken
        // since, spares it entries, or a second snapshot once this one is installed.
        if sending.acked == 0
            && let Some(latest) = latest.filter(|l| l.index > sending.snapshot.index)
        {
            sending.snapshot = latest.clone();
        }
        if sending
            .sent_at
            .is_some_and(|at| now < at + 2 * self.cfg.heartbeat_ms)
        {
            return;
        }
        let snap = &sending.snapshot;
        let total = snap.data.len() as u64;
        // All of it confirmed: an empty chunk at the end asks whether it is installed (the
        // answer is an `AppendResp` once it is, or where to start again if it was lost).
        let offset = sending.acked.min(total);
        let end = (offset + chunk as u64).min(total);
        let msg = Message::InstallSnapshot {
            term,
            index: snap.index,
            last_term: snap.term,
            timestamp_ms: snap.timestamp_ms,
            offset,
            total,
            data: snap.data.slice(offset as usize..end as usize),
            membership: snap.membership.encode(),
        };
        sending.sent_at = Some(now);
        self.ready.messages.push((peer, msg));
    }

    pub(super) fn handle_snapshot_resp(&mut self, from: NodeId, index: u64, received: u64) {
        let Some(p) = self.replicators.get_mut(&from) else {
            return;
        };
        p.active = true;
        p.heard_at = Some(self.now);
        let Some(s) = p.sending.as_mut().filter(|s| s.snapshot.index == index) else {
            return;
        };
        // Only an answer that moves the follower on sends the next chunk: a duplicate or late
        // one, or the whole being installed, leaves the resend to the timer, so no chain of
        // chunks and answers runs on by itself.
        let total = s.snapshot.data.len() as u64;
        let received = received.min(total);
        if received == s.acked {
            return;
        }
        p.last_progress_at = self.now;
        s.acked = received;
        s.sent_at = None;
        if received < total {
            self.send_snapshot_chunk(from);
        }
    }

    pub(super) fn handle_append_resp(
        &mut self,
        from: NodeId,
        success: bool,
        index: u64,
        last_index: u64,
        seq: u64,
    ) {
        self.ack_seq(from, seq);
        let now = self.now;
        let Some(p) = self.replicators.get_mut(&from) else {
            return;
        };
        if success {
            if index > self.last_index {
                return; // not an answer to anything this leader sent
            }
            if index > p.matched {
                p.matched = index;
                p.last_progress_at = now;
            }
            while p.inflight.front().is_some_and(|&l| l <= p.matched) {
                p.inflight.pop_front();
            }
            let installed = p
                .sending
                .as_ref()
                .is_some_and(|s| p.matched >= s.snapshot.index);
            if p.state == ReplicatorState::Probe
                || (p.state == ReplicatorState::Snapshot && installed)
            {
                p.state = ReplicatorState::Replicate;
                p.next = p.matched + 1;
                p.inflight.clear();
                p.probe_sent_at = None;
                p.sending = None;
            }
            p.next = p.next.max(p.matched + 1);
            self.maybe_commit();
            if self.role != CoreRole::Leader {
                return;
            }
            self.maybe_caught_up();
        } else {
            if index <= p.matched {
                self.lost_log(from, last_index);
                return; // stale rejection
            }
            if p.state == ReplicatorState::Probe && index + 1 != p.next
                || p.state == ReplicatorState::Snapshot
            {
                return; // answer to an older probe or append
            }
            p.state = ReplicatorState::Probe;
            p.inflight.clear();
            p.probe_sent_at = None;
            p.next = index.min(last_index + 1).max(p.matched + 1);
        }
        self.send_append(from);
    }

    /// Whether `peer`, reporting `last_index` below its match, has lost its log. A stale
    /// report (delayed past later successes) is a one-off; a follower that keeps reporting
    /// less than it acknowledged as durable lost it (a wiped data directory, outside what Raft
    /// tolerates). It is started over from what it has, so it catches up instead of being
    /// probed at its old match, or sent nothing, forever.
    pub(super) fn lost_log(&mut self, peer: NodeId, last_index: u64) -> bool {
        let Some(p) = self.replicators.get_mut(&peer) else {
            return false;
        };
        if last_index >= p.matched {
            p.reported_less = 0;
            return false;
        }
        p.reported_less = p.reported_less.saturating_add(1);
        if p.reported_less < LOST_LOG_REPORTS {
            return false;
        }
        tracing::error!(
            follower = peer,
            matched = p.matched,
            last_index,
            "the follower lost entries it had acknowledged as durable (was its data directory \
             wiped?); replicating them again"
        );
        p.reported_less = 0;
        // Nothing it reports is checked yet: its match starts over from 0 (so heartbeats
        // commit nothing on it), and the next probe checks its log from `last_index` down.
        p.matched = 0;
        p.sending = None;
        p.state = ReplicatorState::Probe;
        p.inflight.clear();
        p.probe_sent_at = None;
        p.next = last_index + 1;
        self.send_append(peer);
        true
    }

    /// Resets a follower whose appends went unanswered (lost messages) to probing.
    pub(super) fn retry_if_stuck(&mut self, peer: NodeId) {
        let retry_after = 2 * self.cfg.heartbeat_ms;
        let now = self.now;
        let Some(p) = self.replicators.get_mut(&peer) else {
            return;
        };
        if p.state == ReplicatorState::Replicate
            && !p.inflight.is_empty()
            && now >= p.last_progress_at + retry_after
        {
            p.state = ReplicatorState::Probe;
            p.inflight.clear();
            p.next = p.matched + 1;
            p.probe_sent_at = None;
            p.last_progress_at = now;
        }
        self.send_append(peer);
    }

    pub(super) fn ack_seq(&mut self, from: NodeId, seq: u64) {
        if let Some(p) = self.replicators.get_mut(&from) {
            p.active = true;
            p.heard_at = Some(self.now);
            // A follower only echoes rounds it was sent: a higher seq would confirm rounds
            // not yet started.
            if seq > p.seq_acked && seq <= self.read_seq {
                p.seq_acked = seq;
                self.release_reads();
            }
        }
    }

    /// Serves reads whose round a quorum has answered, once this term's no-op is committed.
    pub(super) fn release_reads(&mut self) {
        if self.commit < self.term_start_index {
            return;
        }
        let mut acked: Vec<u64> = self.voting_replicators().map(|p| p.seq_acked).collect();
        if self.is_voter(self.cfg.id) {
            acked.push(u64::MAX);
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_seq = acked[self.quorum() - 1];
        while self.reads.front().is_some_and(|r| r.seq <= quorum_seq) {
            if let Some(r) = self.reads.pop_front() {
                self.ready
                    .reads_ready
                    .push((r.id, r.index.max(self.term_start_index)));
            }
        }
    }

    /// The ballot box: commit the highest index a quorum holds durably, if it is of this term.
    pub(super) fn maybe_commit(&mut self) {
        let mut bb = BallotBox::new(self.voters.len());
        if self.is_voter(self.cfg.id) {
            bb.vote(self.durable);
        }
        for p in self.voting_replicators() {
            bb.vote(p.matched);
        }
        let q = bb.quorum_index();
        if q > self.commit && self.term_at(q) == self.term {
            self.advance_commit(q);
            self.release_reads();
            self.leave_if_removed();
            if self.role != CoreRole::Leader {
                return;
            }
            self.forget_removed();
        }
        self.maybe_timeout_now();
    }

    /// A removed member is replicated to (uncounted) until its removal commits and it holds
    /// the membership then in effect; it is then sent a last heartbeat carrying the commit
    /// (so it knows it is out and never campaigns) and nothing more. One that has not answered
    /// for an election timeout is dropped as it is.
    pub(super) fn forget_removed(&mut self) {
        if self.role != CoreRole::Leader {
            return;
        }
        let (made_at, committed) = self.membership_record_at(self.commit);
        let (made_at, window, now) = (*made_at, self.cfg.election_timeout_ms.1, self.now);
        let gone: Vec<(NodeId, u64)> = self
            .replicators
            .iter()
            .filter(|(id, p)| {
                // Silent since its last answer, or since this leader took it on.
                let heard = p.heard_at.unwrap_or(p.last_progress_at);
                !self.voters.contains(id)
                    && !committed.contains(**id)
                    && self.catch_up.as_ref().is_none_or(|c| c.id != **id)
                    && (p.matched >= made_at || now.saturating_sub(heard) > window)
            })
            .map(|(&id, p)| (id, p.matched))
            .collect();
        for (id, matched) in gone {
            if matched >= made_at {
                let m = Message::Heartbeat {
                    term: self.term,
                    commit: self.commit.min(matched),
                    seq: self.read_seq,
                };
                self.ready.messages.push((id, m));
            }
            self.replicators.remove(&id);
        }
    }

    /// A node campaigning that is no member does not know it was removed (it was down or cut
    /// off when it would have been told): the leader replicates to it again, uncounted, until
    /// it holds the membership in effect (`forget_removed`). The log may no longer record that
    /// it ever was a member (compacted past every membership that held it), so none is looked
    /// for: only a node that passed the hello (the cluster's identity, and its secret where
    /// one is set) reaches the core.
    pub(super) fn tell_removed(&mut self, from: NodeId) {
        if self.role == CoreRole::Leader
            && !self.is_voter(from)
            && !self.replicators.contains_key(&from)
        {
            let fresh = self.fresh_replicator();
            self.replicators.insert(from, fresh);
            self.send_append(from);
        }
    }

    /// A leader whose own removal is committed steps down. The members hear the commit at
    /// once, and one holding the whole log is told to campaign, so the group is not left
    /// without a leader for an election timeout.
    fn leave_if_removed(&mut self) {
        if self.role != CoreRole::Leader
            || self.is_voter(self.cfg.id)
            || self.membership().0 > self.commit
        {
            return;
        }
        tracing::info!(id = self.cfg.id, "removed from the members: stepping down");
        self.broadcast_heartbeat();
        let successor = self
            .replicators
            .iter()
            .find(|(id, p)| self.is_voter(**id) && p.matched >= self.last_index)
            .map(|(&id, _)| id);
        if let Some(to) = successor {
            self.ready
                .messages
                .push((to, Message::TimeoutNow { term: self.term }));
        }
        self.become_follower(self.term, None);
    }
}
