//! Elections: pre-votes and votes among the members in effect, taking and leaving
//! leadership, and the leader's check-quorum.

use super::*;

impl RaftCore {
    pub(super) fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    pub(super) fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id)
    }

    /// The leader's view of the other members (not of a member being caught up).
    pub(super) fn voting_replicators(&self) -> impl Iterator<Item = &Replicator> {
        self.replicators
            .iter()
            .filter(|(id, _)| self.voters.contains(id))
            .map(|(_, p)| p)
    }

    /// Whether no other member's answer is needed (a lone member).
    pub(super) fn alone(&self) -> bool {
        self.voting_replicators().next().is_none()
    }

    /// A member campaigns; so does a node whose own removal is in its log but not committed
    /// (a leader that removed itself and lost leadership before the removal committed): it
    /// may hold entries no member has, which the members' votes need it to pass on. Its votes
    /// are counted among the members as anybody's are.
    pub(super) fn may_campaign(&self) -> bool {
        if self.is_voter(self.cfg.id) {
            return true;
        }
        let (made_at, _) = self.membership();
        let before = self.memberships.len().checked_sub(2);
        made_at > self.commit && before.is_some_and(|k| self.memberships[k].1.contains(self.cfg.id))
    }

    /// Takes the latest membership into effect; a leader starts or stops replicating to the
    /// members it adds or removes.
    pub(super) fn refresh_voters(&mut self) {
        self.voters = self.membership().1.ids().collect();
        self.was_member |= self.is_voter(self.cfg.id);
        if self.role != CoreRole::Leader {
            // A campaign's votes count among the members in effect: grants from members just
            // removed (a snapshot installed mid-campaign, say) must not make a quorum.
            let voters = &self.voters;
            self.votes.retain(|id, _| voters.contains(id));
            return;
        }
        let voters = std::mem::take(&mut self.voters);
        let learner = self.catch_up.as_ref().map(|c| c.id);
        // A member being removed is still replicated to, uncounted, until its removal
        // commits and it holds it: so it learns it was removed (see `forget_removed`). A new
        // leader whose log holds an uncommitted removal replicates to that member too.
        let committed: Vec<NodeId> = self.membership_at(self.commit).ids().collect();
        self.replicators
            .retain(|id, _| voters.contains(id) || Some(*id) == learner || committed.contains(id));
        for &p in voters.iter().chain(&committed) {
            if p != self.cfg.id && !self.replicators.contains_key(&p) {
                let fresh = self.fresh_replicator();
                self.replicators.insert(p, fresh);
            }
        }
        self.voters = voters;
    }

    pub(super) fn fresh_replicator(&self) -> Replicator {
        Replicator {
            next: self.last_index + 1,
            matched: 0,
            state: ReplicatorState::Probe,
            inflight: VecDeque::new(),
            probe_sent_at: None,
            last_progress_at: self.now,
            // Earned by answering: a leader nobody hears steps down at the first check-quorum.
            active: false,
            heard_at: None,
            seq_acked: 0,
            reported_less: 0,
            sending: None,
        }
    }

    pub(super) fn reset_election_deadline(&mut self) {
        let (lo, hi) = self.cfg.election_timeout_ms;
        self.election_deadline = self.now + self.rng.gen_range(lo..=hi.max(lo));
    }

    /// Within a minimum election timeout of hearing from a leader (leader stickiness).
    pub(super) fn in_lease(&self) -> bool {
        if self.role == CoreRole::Leader {
            return true;
        }
        match self.last_leader_contact {
            Some(t) => self.leader.is_some() && self.now < t + self.cfg.election_timeout_ms.0,
            None => false,
        }
    }

    pub(super) fn log_ok(&self, last_index: u64, last_term: u64) -> bool {
        let my_term = self.term_at(self.last_index);
        last_term > my_term || (last_term == my_term && last_index >= self.last_index)
    }

    pub(super) fn heard_from_leader(&mut self, from: NodeId) {
        if self.role != CoreRole::Follower {
            self.become_follower(self.term, Some(from));
        }
        self.leader = Some(from);
        self.last_leader_contact = Some(self.now);
        self.reset_election_deadline();
    }

    pub(super) fn start_pre_vote(&mut self) {
        tracing::info!(
            id = self.cfg.id,
            term = self.term + 1,
            "no leader heard for an election timeout: asking the members for pre-votes"
        );
        self.role = CoreRole::PreCandidate;
        self.leader = None;
        self.votes.clear();
        if self.is_voter(self.cfg.id) {
            self.votes.insert(self.cfg.id, true);
        }
        self.reset_election_deadline();
        let (last_index, last_term) = (self.last_index, self.term_at(self.last_index));
        for &p in &self.voters {
            if p != self.cfg.id {
                let m = Message::PreVote {
                    term: self.term + 1,
                    last_index,
                    last_term,
                };
                self.ready.messages.push((p, m));
            }
        }
        self.tally(true);
    }

    /// `transfer`: asked to by the leader (`TimeoutNow`), which pre-votes would refuse while
    /// it is alive; the votes say so.
    pub(super) fn start_election(&mut self, transfer: bool) {
        self.role = CoreRole::Candidate;
        self.term += 1;
        self.vote = self.cfg.id;
        self.leader = None;
        self.votes.clear();
        self.reset_election_deadline();
        let hs = self.hard_state();
        let w = self.write_mut(false);
        w.hard_state = Some(hs);
        // Our own vote counts once durable: a lone member that led before, then crashed and
        // forgot the vote, could grant it to another candidate of the same term.
        self.own_vote_write = Some(w.id);
        let (last_index, last_term) = (self.last_index, self.term_at(self.last_index));
        let peers: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|&p| p != self.cfg.id)
            .collect();
        for p in peers {
            // Our own vote must be durable before anybody else's can make us leader.
            let m = Message::Vote {
                term: self.term,
                last_index,
                last_term,
                transfer,
            };
            self.send_after_durable(p, m, u64::MAX);
        }
    }

    /// The write holding a candidate's own vote is durable: the vote counts.
    pub(super) fn own_vote_durable(&mut self) {
        self.own_vote_write = None;
        if self.role == CoreRole::Candidate && self.is_voter(self.cfg.id) {
            self.votes.insert(self.cfg.id, true);
            self.tally(false);
        }
    }

    pub(super) fn tally(&mut self, pre: bool) {
        let granted = self.votes.values().filter(|&&g| g).count();
        let rejected = self.votes.values().filter(|&&g| !g).count();
        if granted >= self.quorum() {
            if pre {
                self.start_election(false);
            } else {
                self.become_leader();
            }
        } else if rejected >= self.quorum() {
            self.become_follower(self.term, None);
        }
    }

    pub(super) fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        let was_leader = self.role == CoreRole::Leader;
        if was_leader && term > self.term {
            tracing::info!(term, "a newer term: stepping down");
        }
        if term > self.term {
            self.term = term;
            self.vote = 0;
            let hs = self.hard_state();
            self.write_mut(false).hard_state = Some(hs);
        }
        self.role = CoreRole::Follower;
        self.leader = leader;
        self.votes.clear();
        self.own_vote_write = None;
        self.transfer = None;
        self.catch_up = None;
        if was_leader {
            self.replicators.clear();
            self.ready.stepped_down = true;
            for r in self.reads.drain(..) {
                self.ready.reads_failed.push(r.id);
            }
        }
        self.reset_election_deadline();
    }

    fn become_leader(&mut self) {
        self.role = CoreRole::Leader;
        self.leader = Some(self.cfg.id);
        self.ready.became_leader = true;
        self.transfer = None;
        self.catch_up = None;
        self.replicators.clear();
        self.refresh_voters();
        self.next_quorum_check = self.now + self.cfg.election_timeout_ms.0;
        self.next_heartbeat = self.now + self.cfg.heartbeat_ms;
        // The term's first entry. In a log with no membership entry yet it records the
        // members the cluster started with, so a member added later learns them from the log.
        let (made_at, membership) = self.membership();
        let (kind, payload) = if made_at == 0 && !membership.is_empty() {
            (EntryKind::Config, membership.encode())
        } else {
            (EntryKind::Noop, Bytes::new())
        };
        let noop = LogEntry {
            index: self.last_index + 1,
            term: self.term,
            timestamp_ms: self.wall_ms.max(self.last_timestamp),
            kind,
            payload,
        };
        self.term_start_index = noop.index;
        self.append_local(vec![noop]);
        self.replicate_all();
        self.maybe_commit();
    }

    pub(super) fn check_quorum(&mut self) {
        self.next_quorum_check = self.now + self.cfg.election_timeout_ms.0;
        let me = usize::from(self.is_voter(self.cfg.id));
        let active = me + self.voting_replicators().filter(|p| p.active).count();
        for p in self.replicators.values_mut() {
            p.active = false;
        }
        if active < self.quorum() {
            tracing::warn!(
                term = self.term,
                active,
                "too few members heard from in an election timeout: stepping down"
            );
            self.become_follower(self.term, None);
        }
    }
}
