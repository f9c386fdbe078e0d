use super::*;
use crate::raft::message::TAIL_OVERHEAD;

struct NoStorage;
impl LogRead for NoStorage {
    fn entries(&self, _: u64, _: u64, _: usize) -> Option<Vec<LogEntry>> {
        None
    }
}

fn cfg(id: NodeId, n: u64) -> CoreConfig {
    CoreConfig {
        id,
        members: (1..=n).collect(),
        election_timeout_ms: (100, 200),
        heartbeat_ms: 20,
        max_batch_entries: 64,
        max_batch_bytes: 1 << 20,
        max_inflight: 4,
        snapshot_chunk_bytes: 8,
        max_unapplied_bytes: usize::MAX,
        unsafe_ack_before_durable: false,
    }
}

/// A follower's durable acknowledgement of everything up to `index`.
fn ack(term: u64, index: u64) -> Message {
    Message::AppendResp {
        term,
        success: true,
        index,
        last_index: index,
        seq: 0,
    }
}

fn entry(index: u64, term: u64) -> LogEntry {
    LogEntry {
        index,
        term,
        timestamp_ms: 0,
        kind: EntryKind::Normal,
        payload: Bytes::from(vec![term as u8]),
    }
}

/// A core whose log holds entries with the given terms (index = position + 1).
fn core(id: NodeId, n: u64, terms: &[u64], term: u64) -> RaftCore {
    let tail: Vec<LogEntry> = terms
        .iter()
        .enumerate()
        .map(|(i, &t)| entry(i as u64 + 1, t))
        .collect();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in &tail {
        if runs.last().map(|r| r.1) != Some(e.term) {
            runs.push((e.index, e.term));
        }
    }
    let hs = HardState {
        term,
        vote: 0,
        commit: 0,
    };
    let state = DurableState {
        hard: hs,
        term_runs: runs,
        tail,
        applied: 0,
        ..DurableState::default()
    };
    RaftCore::new(cfg(id, n), id, state, Box::new(NoStorage), 0)
}

/// Makes every write durable at once; returns all messages (immediate and after-durable).
fn flush(c: &mut RaftCore) -> Vec<(NodeId, Message)> {
    let mut out = Vec::new();
    while c.has_ready() {
        let r = c.take_ready();
        out.extend(r.messages);
        for w in r.writes {
            out.extend(w.after);
            c.persisted(w.id, w.last_index, w.last_term);
        }
    }
    out
}

/// Node 1 elected leader of {1, 2, 3}, its first entry acknowledged by `heard_from`.
fn leader_heard_from(heard_from: &[NodeId]) -> RaftCore {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let start = c.last_index();
    for &p in heard_from {
        c.step(p, ack(c.term(), start));
    }
    flush(&mut c);
    c
}

/// Appends the removal of member `id`, which a leader appends at once; returns its index.
fn remove(c: &mut RaftCore, id: NodeId) -> u64 {
    let next = c.membership().1.without(id).expect("a member");
    match c.change_membership(next, 0) {
        Ok(ChangeStarted::Appended(at)) => at,
        other => panic!("the removal of {id} is appended at once: {other:?}"),
    }
}

/// Member 3 acknowledges its removal at `at`: the leader sends it one last heartbeat, with
/// the removal's commit, and nothing else.
fn told_removal(c: &mut RaftCore, at: u64) {
    c.step(3, ack(c.term(), at));
    let to_3 = sent_to(flush(c), 3);
    assert!(
        matches!(to_3[..], [Message::Heartbeat { commit, .. }] if commit == at),
        "{to_3:?}"
    );
}

/// `f` takes `leader`'s log through `through` in one append, with commit `commit`.
fn take_log(f: &mut RaftCore, leader: &RaftCore, through: u64, commit: u64) {
    let append = Message::Append {
        term: leader.term(),
        prev_index: 0,
        prev_term: 0,
        commit,
        seq: 0,
        entries: leader.entries(1, through + 1).expect("in the tail"),
    };
    f.step(leader.id(), append);
    flush(f);
}

/// The messages in `out` addressed to `id`.
fn sent_to(out: Vec<(NodeId, Message)>, id: NodeId) -> Vec<Message> {
    out.into_iter()
        .filter(|(to, _)| *to == id)
        .map(|(_, m)| m)
        .collect()
}

/// Elects node 1 of `n` with the given log, votes granted by every peer.
fn elect(c: &mut RaftCore, n: u64) {
    c.tick(1_000, 0);
    flush(c);
    for p in 2..=n {
        c.step(
            p,
            Message::PreVoteResp {
                term: c.term() + 1,
                granted: true,
            },
        );
    }
    flush(c);
    for p in 2..=n {
        c.step(
            p,
            Message::VoteResp {
                term: c.term(),
                granted: true,
            },
        );
    }
    flush(c);
    assert!(c.is_leader());
}

#[test]
fn a_follower_behind_on_applying_takes_no_entries_until_it_catches_up() {
    let append =
        |term: u64, prev_index: u64, prev_term: u64, new: &[u64], commit: u64| Message::Append {
            term,
            prev_index,
            prev_term,
            commit,
            seq: prev_index,
            entries: new
                .iter()
                .enumerate()
                .map(|(k, &t)| entry(prev_index + 1 + k as u64, t))
                .collect(),
        };
    let answered = |out: &[(NodeId, Message)]| {
        out.iter()
            .any(|(to, m)| *to == 1 && matches!(m, Message::AppendResp { success: true, .. }))
    };
    let mut c = core(2, 3, &[1], 1);
    c.cfg.max_unapplied_bytes = 3 * tail_size(1);
    c.step(1, append(1, 1, 1, &[1, 1, 1], 4));
    assert!(answered(&flush(&mut c)));
    assert_eq!((c.last_index(), c.commit_index()), (4, 4));
    // Four entries committed and none applied: more entries are dropped, unanswered.
    c.step(1, append(1, 4, 1, &[1, 1], 4));
    assert!(flush(&mut c).is_empty());
    assert_eq!(c.last_index(), 4);
    // Heartbeats still go through (no election while the machine catches up).
    c.step(
        1,
        Message::Heartbeat {
            term: 1,
            commit: 4,
            seq: 9,
        },
    );
    assert!(!flush(&mut c).is_empty());
    c.set_applied(4);
    c.step(1, append(1, 4, 1, &[1, 1], 4));
    assert!(answered(&flush(&mut c)));
    assert_eq!(c.last_index(), 6);

    // A full tail of entries nobody committed (a deposed leader's) still gives way to
    // the new leader's: the machine has nothing left to apply.
    let mut c = core(2, 3, &[1, 1, 1, 1], 1);
    c.cfg.max_unapplied_bytes = 2 * tail_size(1);
    c.step(3, append(2, 1, 1, &[2], 0));
    assert!(
        flush(&mut c)
            .iter()
            .any(|(to, m)| *to == 3 && matches!(m, Message::AppendResp { success: true, .. }))
    );
    assert_eq!((c.last_index(), c.term_at(2)), (2, 2));
}

#[test]
fn a_forged_term_cannot_push_the_cluster_past_decodable_terms() {
    let heartbeat = |term| Message::Heartbeat {
        term,
        commit: 0,
        seq: 1,
    };
    let mut c = core(1, 3, &[1], 1);
    c.step(2, heartbeat(MAX_WIRE_NUMBER));
    assert_eq!(c.term(), 1, "the top of the range is not adopted");
    assert!(flush(&mut c).is_empty(), "nor answered");
    c.step(2, heartbeat(MAX_TERM + 1));
    assert_eq!(c.term(), 1, "nor anything above MAX_TERM from far below it");
    c.step(2, heartbeat(MAX_TERM));
    assert_eq!(
        c.term(),
        MAX_TERM,
        "MAX_TERM itself is a term like any other"
    );
    c.step(2, heartbeat(MAX_TERM + MAX_TERM_STEP + 1));
    assert_eq!(
        c.term(),
        MAX_TERM,
        "above it, a term moves in bounded steps only"
    );
    c.step(2, heartbeat(MAX_TERM + 3));
    assert_eq!(c.term(), MAX_TERM + 3, "as the elections after it do");
    // This node's own next election is decodable by its peers.
    c.tick(10_000, 0);
    c.step(
        2,
        Message::PreVoteResp {
            term: c.term() + 1,
            granted: true,
        },
    );
    let out = flush(&mut c);
    let votes: Vec<_> = out
        .iter()
        .filter(|(_, m)| matches!(m, Message::Vote { .. }))
        .collect();
    assert!(!votes.is_empty(), "{out:?}");
    for (_, m) in votes {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(Message::decode(&buf).as_ref(), Ok(m));
    }
}

#[test]
fn a_lone_member_leads_only_once_its_own_vote_is_durable() {
    // Regression (simulator, slow disks): a lone member led at once, crashed before its vote
    // was durable, came back in the older term and granted that term's vote to another
    // candidate (a member added since): two leaders in one term.
    let mut c = core(1, 1, &[1], 1);
    c.tick(1_000, 0);
    let r = c.take_ready();
    assert_eq!(c.term(), 2);
    assert!(!c.is_leader(), "not before its vote is durable");
    let w = r
        .writes
        .iter()
        .find(|w| w.hard_state.is_some())
        .expect("its vote is written");
    assert_eq!(w.hard_state.map(|h| (h.term, h.vote)), Some((2, 1)));
    c.persisted(w.id, w.last_index, w.last_term);
    assert!(c.is_leader(), "once it is");
}

#[test]
fn election_safety_one_vote_per_term_and_only_when_durable() {
    let mut c = core(1, 3, &[1, 1], 1);
    c.step(
        2,
        Message::Vote {
            term: 2,
            last_index: 2,
            last_term: 1,
            transfer: false,
        },
    );
    let r = c.take_ready();
    assert!(
        r.messages
            .iter()
            .all(|(_, m)| !matches!(m, Message::VoteResp { granted: true, .. }))
    );
    let w = r
        .writes
        .iter()
        .find(|w| w.hard_state.is_some())
        .expect("vote is persisted");
    assert_eq!(w.hard_state.map(|h| (h.term, h.vote)), Some((2, 2)));
    assert!(
        w.after.contains(&(
            2,
            Message::VoteResp {
                term: 2,
                granted: true
            }
        )),
        "granted only after durable"
    );
    // A second candidate in the same term is refused.
    c.step(
        3,
        Message::Vote {
            term: 2,
            last_index: 9,
            last_term: 1,
            transfer: false,
        },
    );
    assert!(c.take_ready().messages.contains(&(
        3,
        Message::VoteResp {
            term: 2,
            granted: false
        }
    )));
    // A candidate with a less up-to-date log is refused in a fresh term.
    let mut c = core(1, 3, &[1, 2], 2);
    c.step(
        3,
        Message::Vote {
            term: 3,
            last_index: 5,
            last_term: 1,
            transfer: false,
        },
    );
    assert!(c.take_ready().messages.contains(&(
        3,
        Message::VoteResp {
            term: 3,
            granted: false
        }
    )));
}

#[test]
fn election_safety_no_leader_without_a_quorum() {
    let mut c = core(1, 5, &[], 0);
    c.tick(1_000, 0);
    flush(&mut c);
    c.step(
        2,
        Message::PreVoteResp {
            term: 1,
            granted: true,
        },
    );
    flush(&mut c);
    assert_eq!(c.role(), CoreRole::PreCandidate, "2 of 5 is no quorum");
    assert_eq!(c.term(), 0, "pre-vote changes no term");
    c.step(
        3,
        Message::PreVoteResp {
            term: 1,
            granted: true,
        },
    );
    flush(&mut c);
    assert_eq!((c.role(), c.term()), (CoreRole::Candidate, 1));
    c.step(
        2,
        Message::VoteResp {
            term: 1,
            granted: true,
        },
    );
    c.step(
        2,
        Message::VoteResp {
            term: 1,
            granted: true,
        },
    ); // a duplicate counts once
    flush(&mut c);
    assert_eq!(c.role(), CoreRole::Candidate);
    c.step(
        4,
        Message::VoteResp {
            term: 1,
            granted: true,
        },
    );
    flush(&mut c);
    assert!(c.is_leader());
}

#[test]
fn log_matching_rejects_gaps_and_truncates_conflicts() {
    let mut f = core(2, 3, &[1, 1, 2, 2], 2);
    // prev entry missing: rejected with our last index as a hint.
    f.step(
        1,
        Message::Append {
            term: 3,
            prev_index: 6,
            prev_term: 3,
            commit: 0,
            seq: 0,
            entries: vec![],
        },
    );
    assert!(f.take_ready().messages.contains(&(
        1,
        Message::AppendResp {
            term: 3,
            success: false,
            index: 6,
            last_index: 4,
            seq: 0
        }
    )));
    // prev term differs: rejected.
    f.step(
        1,
        Message::Append {
            term: 3,
            prev_index: 3,
            prev_term: 3,
            commit: 0,
            seq: 0,
            entries: vec![],
        },
    );
    assert!(
        flush(&mut f)
            .iter()
            .any(|(_, m)| matches!(m, Message::AppendResp { success: false, .. }))
    );
    // Matching prev, conflicting suffix: truncated from the conflict, the rest kept.
    f.step(
        1,
        Message::Append {
            term: 3,
            prev_index: 1,
            prev_term: 1,
            commit: 2,
            seq: 0,
            entries: vec![entry(2, 1), entry(3, 3)],
        },
    );
    let r = f.take_ready();
    assert_eq!(r.writes.iter().find_map(|w| w.truncate_from), Some(3));
    assert_eq!((f.last_index(), f.term_at(2), f.term_at(3)), (3, 1, 3));
    assert_eq!(f.commit_index(), 2);
    // The ack waits for durability.
    assert!(
        r.messages
            .iter()
            .all(|(_, m)| !matches!(m, Message::AppendResp { success: true, .. }))
    );
    assert!(
        r.writes
            .iter()
            .any(|w| w.after.iter().any(|(_, m)| matches!(
                m,
                Message::AppendResp {
                    success: true,
                    index: 3,
                    ..
                }
            )))
    );
    // A stale, shorter append never truncates what matches.
    f.step(
        1,
        Message::Append {
            term: 3,
            prev_index: 1,
            prev_term: 1,
            commit: 2,
            seq: 0,
            entries: vec![entry(2, 1)],
        },
    );
    flush(&mut f);
    assert_eq!(f.last_index(), 3);
}

#[test]
#[should_panic(expected = "truncating committed entry")]
fn log_matching_never_truncates_committed_entries() {
    let mut f = core(2, 3, &[1, 1], 1);
    f.step(
        1,
        Message::Append {
            term: 1,
            prev_index: 2,
            prev_term: 1,
            commit: 2,
            seq: 0,
            entries: vec![],
        },
    );
    flush(&mut f);
    assert_eq!(f.commit_index(), 2);
    // Entry 1 at ≤ commit is skipped (known to match); forcing the check at the core level:
    f.truncate(2);
}

#[test]
fn commit_rule_counts_only_current_term_entries() {
    // Node 1 has entries of terms 1 and 2 and becomes leader of term 3 (no-op at 3).
    let mut c = core(1, 3, &[1, 2], 2);
    assert_eq!(c.term_start_index(), 0, "not a leader");
    elect(&mut c, 3);
    assert_eq!((c.term(), c.last_index()), (3, 3));
    assert_eq!(c.term_start_index(), 3, "the no-op");
    // A quorum holds index 2 (an older term's entry): it must not commit by counting.
    c.step(2, ack(3, 2));
    flush(&mut c);
    assert_eq!(
        c.commit_index(),
        0,
        "entries of an older term are not committed by counting replicas"
    );
    // Once the current term's no-op is on a quorum, everything up to it commits.
    c.step(2, ack(3, 3));
    flush(&mut c);
    assert_eq!(c.commit_index(), 3);
}

#[test]
fn commit_needs_the_leaders_own_durable_write() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let (first, _) = c
        .propose([Bytes::from_static(b"a")], 0, None)
        .expect("leader");
    let r = c.take_ready(); // not persisted: the leader's vote is missing
    c.step(2, ack(1, first));
    flush(&mut c);
    assert_eq!(
        c.commit_index(),
        1,
        "only the no-op (durable on the leader) commits"
    );
    for w in r.writes {
        c.persisted(w.id, w.last_index, w.last_term);
    }
    flush(&mut c);
    assert_eq!(c.commit_index(), first);
}

#[test]
fn the_leader_refuses_proposals_while_the_tail_is_full() {
    let mut c = core(1, 1, &[], 0);
    // Room for two entries' overhead and 100 payload bytes.
    c.cfg.max_unapplied_bytes = 2 * TAIL_OVERHEAD + 100;
    elect(&mut c, 1);
    let noop = c.last_index();
    c.set_applied(noop);
    let p = |n: usize| [Bytes::from(vec![7u8; n])];
    // An empty tail takes a batch larger than the bound.
    let (big, _) = c.propose(p(150), 0, None).expect("empty tail");
    assert!(matches!(
        c.propose(p(1), 0, None),
        Err(ProposeRefused::Overloaded)
    ));
    flush(&mut c);
    assert_eq!(
        c.commit_index(),
        big,
        "a lone member commits what is durable"
    );
    assert!(
        matches!(c.propose(p(1), 0, None), Err(ProposeRefused::Overloaded)),
        "durable but not applied still counts"
    );
    c.set_applied(big);
    let (a, _) = c.propose(p(60), 0, None).expect("the tail was trimmed");
    assert!(matches!(
        c.propose(p(41), 0, None),
        Err(ProposeRefused::Overloaded)
    ));
    c.propose(p(40), 0, None).expect("exactly at the bound");
    flush(&mut c);
    c.set_applied(a);
    c.propose(p(60), 0, None)
        .expect("the applied entry no longer counts");
}

#[test]
fn a_tail_of_tiny_tasks_is_bounded_by_their_count_not_only_their_bytes() {
    // Regression: the bound counted payload bytes alone, and a stalled machine let a tail of
    // 16-byte tasks hold 29 times the bound in memory.
    let bound = 1 << 20;
    let mut c = core(1, 1, &[], 0);
    c.cfg.max_unapplied_bytes = bound;
    elect(&mut c, 1);
    c.set_applied(c.last_index());
    let mut taken = 0;
    while c.propose([Bytes::from(vec![1u8; 16])], 0, None).is_ok() {
        taken += 1;
        assert!(taken <= bound / 16, "the bound never refused");
    }
    assert_eq!(taken, bound / tail_size(16));
}

#[test]
fn a_transfer_tells_the_target_to_campaign_once_it_holds_the_whole_log_committed() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let term = c.term();
    c.propose(
        [Bytes::from_static(b"a"), Bytes::from_static(b"b")],
        0,
        None,
    )
    .expect("leader");
    flush(&mut c);
    assert_eq!(
        c.transfer_leadership(7),
        Err(TransferRefused::NotAMember),
        "not a member"
    );
    c.transfer_leadership(2).expect("leader");
    assert_eq!(c.transferring_to(), Some(2));
    assert_eq!(
        c.propose([Bytes::from_static(b"c")], 0, None),
        Err(ProposeRefused::Transferring { to: 2 }),
        "nothing new is appended while leadership moves"
    );
    let timeout_now = |out: &[(NodeId, Message)]| {
        out.iter()
            .any(|m| matches!(m, (2, Message::TimeoutNow { term: t }) if *t == term))
    };
    assert!(!timeout_now(&flush(&mut c)), "the target holds nothing yet");
    // Committed by node 3, but the target still lacks entries: not yet.
    c.step(3, ack(term, 3));
    assert_eq!(c.commit_index(), 3);
    assert!(!timeout_now(&flush(&mut c)));
    c.step(2, ack(term, 2));
    assert!(!timeout_now(&flush(&mut c)), "the target lacks entry 3");
    c.step(2, ack(term, 3));
    let out = flush(&mut c);
    assert!(timeout_now(&out), "caught up and committed: {out:?}");
    assert!(c.is_leader(), "leads until the target's election");
}

#[test]
fn a_transfer_waits_for_the_leaders_own_write_so_every_proposal_is_committed_first() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let term = c.term();
    c.propose([Bytes::from_static(b"a")], 0, None)
        .expect("leader");
    // The leader's write of entry 2 is not durable yet; the target already holds it.
    let r = c.take_ready();
    let writes = r.writes;
    c.transfer_leadership(2).expect("leader");
    c.step(2, ack(term, 2));
    assert_eq!(
        c.commit_index(),
        1,
        "one durable copy of entry 2 is not a quorum"
    );
    let sent = |r: Ready| {
        r.messages
            .iter()
            .any(|m| matches!(m, (2, Message::TimeoutNow { .. })))
    };
    assert!(
        !sent(c.take_ready()),
        "a proposal's outcome would be unknown if the target took over now"
    );
    for w in writes {
        c.persisted(w.id, w.last_index, w.last_term);
    }
    assert_eq!(c.commit_index(), 2);
    assert!(sent(c.take_ready()));
}

#[test]
fn a_transfer_nobody_completes_is_given_up_and_proposals_resume() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let term = c.term();
    c.transfer_leadership(3).expect("leader");
    let mut t = 1_000;
    while c.transferring_to().is_some() && t < 1_500 {
        t += 10;
        // Node 2 answers, so check-quorum keeps this node leader; node 3 never does.
        c.step(2, ack(term, c.last_index()));
        c.tick(t, 0);
    }
    assert!(c.is_leader());
    assert_eq!(c.transferring_to(), None, "given up");
    assert!(
        t <= 1_000 + 200 + 10,
        "within a maximum election timeout: {t}"
    );
    c.propose([Bytes::from_static(b"a")], 0, None)
        .expect("proposals accepted again");
    // Asking for the leader itself is a no-op, and a follower names its leader.
    c.transfer_leadership(1).expect("itself");
    let mut f = core(2, 3, &[], 0);
    f.step(
        1,
        Message::Heartbeat {
            term: 1,
            commit: 0,
            seq: 0,
        },
    );
    assert_eq!(
        f.transfer_leadership(3),
        Err(TransferRefused::NotLeader { leader: Some(1) })
    );
}

#[test]
fn timeout_now_starts_an_election_that_members_hearing_the_leader_still_vote_in() {
    let heartbeat = Message::Heartbeat {
        term: 1,
        commit: 0,
        seq: 0,
    };
    let vote = |transfer| Message::Vote {
        term: 2,
        last_index: 0,
        last_term: 0,
        transfer,
    };
    // A follower that heard the leader ignores an ordinary candidate...
    let mut f = core(3, 3, &[], 1);
    f.step(1, heartbeat.clone());
    flush(&mut f);
    f.step(2, vote(false));
    assert!(flush(&mut f).is_empty(), "leader stickiness");
    assert_eq!(f.term(), 1);
    // ... but votes for one the leader sent to campaign.
    f.step(2, vote(true));
    let out = flush(&mut f);
    assert!(
        out.contains(&(
            2,
            Message::VoteResp {
                term: 2,
                granted: true
            }
        )),
        "{out:?}"
    );
    // The target campaigns at once, saying why.
    let mut t = core(2, 3, &[], 1);
    t.step(1, heartbeat.clone());
    flush(&mut t);
    t.step(1, Message::TimeoutNow { term: 1 });
    assert_eq!(t.role(), CoreRole::Candidate);
    let out = flush(&mut t);
    assert!(out.contains(&(3, vote(true))), "{out:?}");
    // A follower ignores a `TimeoutNow` from anyone but its leader (a forged or confused
    // one).
    let mut o = core(3, 3, &[], 1);
    o.step(1, heartbeat.clone());
    flush(&mut o);
    o.step(2, Message::TimeoutNow { term: 1 });
    assert_eq!(o.role(), CoreRole::Follower);
    assert!(flush(&mut o).is_empty());

    // A leader grants a transfer vote only from the member it told to campaign.
    let mut l = core(1, 3, &[], 0);
    elect(&mut l, 3);
    let (term, last) = (l.term(), l.last_index());
    let transfer_vote = Message::Vote {
        term: term + 1,
        last_index: last,
        last_term: term,
        transfer: true,
    };
    l.step(2, transfer_vote.clone());
    assert!(
        l.is_leader(),
        "no hand-over asked for: an ordinary disruptive vote"
    );
    assert!(flush(&mut l).is_empty());
    l.transfer_leadership(2).expect("leader");
    l.step(2, ack(term, last));
    assert!(flush(&mut l).contains(&(2, Message::TimeoutNow { term })));
    l.step(2, transfer_vote);
    assert!(!l.is_leader(), "the old leader steps down");
    let out = flush(&mut l);
    assert!(
        out.iter()
            .any(|m| matches!(m, (2, Message::VoteResp { granted: true, .. }))),
        "{out:?}"
    );
}

#[test]
fn one_hand_over_at_a_time_and_a_lost_timeout_now_is_sent_again() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let term = c.term();
    c.step(2, ack(term, c.last_index()));
    c.transfer_leadership(2).expect("leader");
    c.transfer_leadership(2).expect("the same target again");
    assert_eq!(
        c.transfer_leadership(3),
        Err(TransferRefused::InProgress { to: 2 })
    );
    assert_eq!(
        c.transfer_leadership(1),
        Err(TransferRefused::InProgress { to: 2 }),
        "a TimeoutNow already sent cannot be called back"
    );
    let timeouts = |out: Vec<(NodeId, Message)>| {
        out.iter()
            .filter(|m| matches!(m, (2, Message::TimeoutNow { .. })))
            .count()
    };
    assert_eq!(timeouts(flush(&mut c)), 1);
    // Lost: nothing more until a heartbeat interval has passed, then once again.
    c.tick(1_005, 0);
    assert_eq!(timeouts(flush(&mut c)), 0);
    c.tick(1_020, 0);
    assert_eq!(timeouts(flush(&mut c)), 1);
}

#[test]
fn check_quorum_steps_down_and_fails_reads() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    c.read_index(7).expect("leader");
    let mut t = 1_000;
    while c.is_leader() && t < 2_000 {
        t += 10;
        c.tick(t, 0);
    }
    assert!(!c.is_leader(), "a leader that hears nobody steps down");
    let r = c.take_ready();
    assert!(r.stepped_down);
    assert_eq!(r.reads_failed, vec![7]);
}

#[test]
fn read_index_waits_for_a_quorum_round() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    c.step(2, ack(1, 1));
    flush(&mut c);
    c.read_index(1).expect("leader");
    let seq = flush(&mut c)
        .iter()
        .find_map(|(_, m)| {
            if let Message::Heartbeat { seq, .. } = m {
                Some(*seq)
            } else {
                None
            }
        })
        .expect("a heartbeat round");
    assert!(c.take_ready().reads_ready.is_empty());
    c.step(
        3,
        Message::HeartbeatResp {
            term: 1,
            seq: seq - 1,
            last_index: 1,
        },
    );
    assert!(
        c.take_ready().reads_ready.is_empty(),
        "an older round does not confirm"
    );
    c.step(
        3,
        Message::HeartbeatResp {
            term: 1,
            seq,
            last_index: 1,
        },
    );
    assert_eq!(c.take_ready().reads_ready, vec![(1, 1)]);
}

#[test]
fn a_long_divergent_suffix_costs_one_rejected_probe_not_one_per_entry() {
    // The leader has 50 entries of term 3 after a common prefix; the follower 200 of term 2
    // (an old leader's uncommitted proposals).
    let mut leader_terms = vec![1, 1];
    leader_terms.extend([3; 50]);
    let mut follower_terms = vec![1, 1];
    follower_terms.extend([2; 200]);
    let mut l = core(1, 3, &leader_terms, 3);
    let mut f = core(2, 3, &follower_terms, 3);
    elect(&mut l, 3);
    // The election's own appends were dropped (`elect` flushes them away): the probe is
    // sent again a heartbeat later.
    l.tick(1_000 + 25, 0);
    let mut rejections = 0;
    let mut to_follower: Vec<Message> = flush(&mut l)
        .into_iter()
        .filter(|(to, _)| *to == 2)
        .map(|(_, m)| m)
        .collect();
    for _ in 0..100 {
        let mut to_leader = Vec::new();
        for m in to_follower.drain(..) {
            f.step(1, m);
            to_leader.extend(flush(&mut f).into_iter().map(|(_, m)| m));
        }
        if to_leader.is_empty() {
            break;
        }
        for m in to_leader {
            rejections += usize::from(matches!(m, Message::AppendResp { success: false, .. }));
            l.step(2, m);
            to_follower.extend(
                flush(&mut l)
                    .into_iter()
                    .filter(|(to, _)| *to == 2)
                    .map(|(_, m)| m),
            );
        }
    }
    assert_eq!(f.last_index(), l.last_index(), "the follower caught up");
    assert!(
        (1..=l.last_index()).all(|i| f.term_at(i) == l.term_at(i)),
        "the logs match"
    );
    assert!(rejections <= 2, "{rejections} rejected probes");
}

#[test]
fn timestamps_never_go_back_once_the_tail_is_trimmed() {
    let mut c = core(1, 1, &[], 0);
    elect(&mut c, 1);
    let (i, _) = c
        .propose([Bytes::from_static(b"a")], 5_000, None)
        .expect("leader");
    flush(&mut c);
    c.set_applied(i);
    // Everything is durable and applied: the in-memory tail is empty.
    let (j, _) = c
        .propose([Bytes::from_static(b"b")], 1_000, None)
        .expect("leader");
    let ts = c.entries(j, j).expect("in memory")[0].timestamp_ms;
    assert_eq!(ts, 5_000, "the clock went back, the log must not");
}

#[test]
fn a_restarted_core_takes_the_last_timestamp_from_storage() {
    struct Stored(Vec<LogEntry>);
    impl LogRead for Stored {
        fn entries(&self, lo: u64, hi: u64, _: usize) -> Option<Vec<LogEntry>> {
            Some(
                self.0
                    .iter()
                    .filter(|e| (lo..hi).contains(&e.index))
                    .cloned()
                    .collect(),
            )
        }
    }
    let mut last = entry(3, 1);
    last.timestamp_ms = 9_000;
    let state = DurableState {
        hard: HardState {
            term: 1,
            vote: 1,
            commit: 3,
        },
        term_runs: vec![(1, 1)],
        tail: Vec::new(),
        applied: 3,
        ..DurableState::default()
    };
    let stored = Stored(vec![entry(1, 1), entry(2, 1), last]);
    let mut c = RaftCore::new(cfg(1, 1), 1, state, Box::new(stored), 0);
    elect(&mut c, 1);
    let (i, _) = c
        .propose([Bytes::from_static(b"a")], 100, None)
        .expect("leader");
    assert_eq!(c.entries(i, i).expect("in memory")[0].timestamp_ms, 9_000);
}

#[test]
fn a_notice_from_before_a_truncation_does_not_make_reappended_entries_durable() {
    let append = |term: u64, entry_term: u64| Message::Append {
        term,
        prev_index: 2,
        prev_term: 1,
        commit: 0,
        seq: 0,
        entries: vec![entry(3, entry_term), entry(4, entry_term)],
    };
    let mut f = core(2, 3, &[1, 1], 1);
    f.step(1, append(2, 2));
    let w1 = f.take_ready().writes.pop().expect("append write");
    // A term-3 leader replaces 3..4; a term-4 leader sends the term-2 entries again.
    f.step(3, append(3, 3));
    f.step(1, append(4, 2));
    let later = f.take_ready().writes;
    assert!(later.iter().all(|w| w.id > w1.id));
    assert_eq!(f.term_at(4), 2);
    // W1's notice arrives now: its (4, term 2) matches the log again, but the entries it
    // made durable were truncated, and their copies are still queued.
    f.persisted(w1.id, w1.last_index, w1.last_term);
    assert_eq!(f.durable_index(), 2, "durable from a stale notice");
    let last = later.last().expect("writes");
    f.persisted(last.id, last.last_index, last.last_term);
    assert_eq!(f.durable_index(), 4);
}

#[test]
fn a_follower_cannot_confirm_read_rounds_not_yet_started() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    c.step(2, ack(1, 1));
    flush(&mut c);
    c.read_index(1).expect("leader");
    flush(&mut c);
    // A faulty peer echoes a round far ahead of any sent.
    c.step(
        2,
        Message::HeartbeatResp {
            term: 1,
            seq: 1_000,
            last_index: 1,
        },
    );
    assert!(
        c.take_ready().reads_ready.is_empty(),
        "confirmed by an echo of a round that had not started"
    );
}

#[test]
fn a_new_leader_nobody_answers_steps_down_at_the_first_check() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    // One minimum election timeout (100 ms) after winning, with no answer to its appends.
    c.tick(1_000 + 110, 0);
    assert!(!c.is_leader());
}

#[test]
fn an_append_after_an_idle_spell_is_not_retried_at_once() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    for p in [2, 3] {
        c.step(p, ack(1, 1));
    }
    flush(&mut c);
    // Idle for a while (heartbeats answered), then a proposal.
    let mut t = 1_000;
    for _ in 0..10 {
        t += 20;
        c.tick(t, 0);
        flush(&mut c);
        for p in [2, 3] {
            c.step(
                p,
                Message::HeartbeatResp {
                    term: 1,
                    seq: 0,
                    last_index: 1,
                },
            );
        }
    }
    c.propose([Bytes::from_static(b"a")], 0, None)
        .expect("leader");
    let sent = flush(&mut c);
    assert!(
        sent.iter()
            .any(|(_, m)| matches!(m, Message::Append { .. }))
    );
    // The next tick comes before any answer: nothing is resent.
    c.tick(t + 5, 0);
    let resent = flush(&mut c);
    assert!(
        !resent
            .iter()
            .any(|(_, m)| matches!(m, Message::Append { entries, .. } if !entries.is_empty())),
        "an append resent within a tick: {resent:?}"
    );
}

#[test]
fn a_follower_that_lost_its_log_is_replicated_again_not_probed_forever() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let (last, _) = c
        .propose((0..4).map(|_| Bytes::from_static(b"a")), 0, None)
        .expect("leader");
    flush(&mut c);
    c.step(2, ack(1, last));
    flush(&mut c);
    assert_eq!(c.match_index(2), last);
    // Node 2 comes back with an empty log and rejects every probe at its old match.
    let lost = Message::AppendResp {
        term: 1,
        success: false,
        index: last,
        last_index: 0,
        seq: 0,
    };
    c.step(2, lost.clone());
    assert_eq!(
        c.match_index(2),
        last,
        "one stale rejection changes nothing"
    );
    c.step(2, lost.clone());
    c.step(2, lost);
    assert_eq!(c.match_index(2), 0);
    let sent = flush(&mut c);
    assert!(
        sent.iter().any(|(to, m)| *to == 2
            && matches!(m, Message::Append { prev_index: 0, entries, .. } if !entries.is_empty())),
        "the log is sent again from its start: {sent:?}"
    );
}

/// A leader of {1,2,3} adds 4: 4 is first caught up, uncounted, and only then is the
/// change appended; it is in effect at once (commits then need 3 of 4); a second change
/// waits for the first to commit.
#[test]
fn a_new_member_is_caught_up_then_counts_and_changes_go_one_at_a_time() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let start = c.last_index();
    c.step(2, ack(c.term(), start));
    flush(&mut c);
    assert_eq!(c.commit_index(), start, "the term's first entry commits");
    let (_, m) = c.membership();
    let added = m.with(4, "10.0.0.4:7000".into()).expect("a new member");
    assert_eq!(
        c.change_membership(added.clone(), 0),
        Ok(ChangeStarted::CatchingUp)
    );
    let sent = flush(&mut c);
    assert!(sent.iter().any(|(to, _)| *to == 4), "4 is replicated to");
    assert_eq!(c.members(), &[1, 2, 3], "not counted while catching up");
    assert_eq!(
        c.change_membership(added.without(2).expect("member"), 0),
        Err(ChangeRefused::InProgress)
    );
    c.step(4, ack(c.term(), c.last_index()));
    let r = c.take_ready();
    let Some(ChangeOutcome::Appended(at)) = r.membership else {
        panic!("caught up: the change is appended ({:?})", r.membership);
    };
    for w in r.writes {
        c.persisted(w.id, w.last_index, w.last_term);
    }
    flush(&mut c);
    assert_eq!(c.members(), &[1, 2, 3, 4]);
    c.step(2, ack(c.term(), at));
    flush(&mut c);
    assert!(c.commit_index() < at, "2 of 4 is no quorum");
    c.step(3, ack(c.term(), at));
    flush(&mut c);
    assert_eq!(c.commit_index(), at, "3 of 4 is");
    assert!(
        c.change_membership(added.without(2).expect("member"), 0)
            .is_ok()
    );
}

/// A new member that never answers is given up: nothing is appended, and it is no longer
/// replicated to.
#[test]
fn a_new_member_that_does_not_catch_up_is_given_up() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    c.step(2, ack(c.term(), c.last_index()));
    flush(&mut c);
    let last = c.last_index();
    let (_, m) = c.membership();
    let added = m.with(4, String::new()).expect("a new member");
    assert_eq!(c.change_membership(added, 0), Ok(ChangeStarted::CatchingUp));
    flush(&mut c);
    let mut outcome = None;
    for t in (1_000..30_000).step_by(100) {
        c.tick(t, 0);
        c.step(2, ack(c.term(), c.last_index()));
        let r = c.take_ready();
        outcome = outcome.or(r.membership);
    }
    assert_eq!(outcome, Some(ChangeOutcome::NotCaughtUp(4)));
    assert_eq!(c.last_index(), last, "nothing appended");
    assert_eq!(c.members(), &[1, 2, 3]);
    c.tick(31_000, 0);
    let sent = flush(&mut c);
    assert!(!sent.iter().any(|(to, _)| *to == 4), "{sent:?}");
}

/// Regression (a second reader's review): a node campaigning while it installs a
/// snapshot whose membership drops a member that already granted its vote must not count
/// that vote among the new members.
#[test]
fn votes_from_members_a_snapshot_removes_do_not_count() {
    let mut c = core(1, 5, &[], 0);
    let snap = Snapshot {
        membership: Membership::of_ids([1, 2, 3]),
        ..snapshot_at(9, 1)
    };
    for part in chunks(1, &snap, 64) {
        c.step(2, part);
    }
    assert_eq!(c.take_ready().install, Some(snap.clone()));
    // The leader goes quiet; this node campaigns among {1..5} meanwhile.
    c.tick(10_000, 0);
    flush(&mut c);
    for p in [3, 4] {
        c.step(
            p,
            Message::PreVoteResp {
                term: 2,
                granted: true,
            },
        );
    }
    flush(&mut c);
    assert_eq!(c.role(), CoreRole::Candidate);
    c.step(
        4,
        Message::VoteResp {
            term: 2,
            granted: true,
        },
    );
    flush(&mut c);
    assert_eq!(c.role(), CoreRole::Candidate, "2 of 5");
    c.installed(9);
    flush(&mut c);
    assert_eq!(c.members(), &[1, 2, 3]);
    c.step(
        3,
        Message::VoteResp {
            term: 2,
            granted: false,
        },
    );
    flush(&mut c);
    assert!(
        !c.is_leader(),
        "4's vote counted among {{1, 2, 3}}: elected by 1 and a non-member"
    );
}

/// A follower takes a change when it is appended, and undoes it when the entry is
/// truncated by a new leader's log.
#[test]
fn a_truncated_change_is_undone() {
    let mut c = core(2, 3, &[1], 1);
    let change = LogEntry {
        kind: EntryKind::Config,
        payload: Membership::of_ids([1, 2]).encode(),
        ..entry(2, 1)
    };
    c.step(
        1,
        Message::Append {
            term: 1,
            prev_index: 1,
            prev_term: 1,
            commit: 0,
            seq: 0,
            entries: vec![change],
        },
    );
    flush(&mut c);
    assert_eq!(c.members(), &[1, 2]);
    c.step(
        3,
        Message::Append {
            term: 2,
            prev_index: 1,
            prev_term: 1,
            commit: 0,
            seq: 0,
            entries: vec![entry(2, 2)],
        },
    );
    flush(&mut c);
    assert_eq!(c.members(), &[1, 2, 3], "back to the members before it");
    assert_eq!(c.membership().0, 0);
}

/// A leader that removes itself leads on without counting itself until the removal
/// commits, then steps down and tells a member holding its whole log to campaign.
#[test]
fn a_leader_that_removes_itself_steps_down_once_that_commits() {
    let mut c = leader_heard_from(&[2, 3]);
    let at = remove(&mut c, 1);
    assert_eq!(c.members(), &[2, 3]);
    flush(&mut c);
    c.step(2, ack(c.term(), at));
    flush(&mut c);
    assert!(c.is_leader(), "its own copy does not count: 1 of {{2, 3}}");
    c.step(3, ack(c.term(), at));
    let sent = flush(&mut c);
    assert_eq!(c.commit_index(), at);
    assert!(!c.is_leader(), "removed: steps down");
    assert!(
        sent.iter()
            .any(|(to, m)| *to == 2 && matches!(m, Message::TimeoutNow { .. })),
        "{sent:?}"
    );
    // A node outside the members never campaigns.
    c.tick(100_000, 0);
    assert!(flush(&mut c).is_empty());
    assert_eq!(c.role(), CoreRole::Follower);
}

/// The strict reconfiguration check: a change after which fewer than a quorum of the new
/// members have answered lately is refused; removing the one that is down is not.
#[test]
fn a_change_that_leaves_too_few_members_reachable_is_refused() {
    // A leader of {1, 2, 3} that has heard from 2 only.
    let heard_by_2 = || {
        let c = leader_heard_from(&[2]);
        assert_eq!(c.commit_index(), c.last_index());
        c
    };
    let mut c = heard_by_2();
    let start = c.last_index();
    let (_, m) = c.membership();
    let m = m.clone();
    // 3 never answered: {1, 3} would need both.
    assert_eq!(
        c.change_membership(m.without(2).expect("member"), 0),
        Err(ChangeRefused::TooFewReachable {
            needed: 2,
            reachable: 1,
            unreachable: vec![3],
        })
    );
    assert_eq!(c.last_index(), start, "nothing appended");
    // Nor may the leader leave {2, 3}.
    assert!(matches!(
        c.change_membership(m.without(1).expect("member"), 0),
        Err(ChangeRefused::TooFewReachable { .. })
    ));
    // Removing the one that is down leaves {1, 2}, both reachable.
    assert!(matches!(
        c.change_membership(m.without(3).expect("member"), 0),
        Ok(ChangeStarted::Appended(_))
    ));
    // Adding 4 counts 4 (it is caught up before the change is appended): {1, 2, 3, 4}
    // needs 3, and has 1, 2 and 4.
    let mut c = heard_by_2();
    assert_eq!(
        c.change_membership(m.with(4, "127.0.0.1:4".into()).expect("new"), 0),
        Ok(ChangeStarted::CatchingUp)
    );
    // Once a member stops answering for longer than an election timeout, it no longer
    // counts: 2 answered at `now`, then nothing for two election timeouts.
    let mut c = leader_heard_from(&[2, 3]);
    let start = c.last_index();
    let later = c.now + 2 * c.cfg.election_timeout_ms.1;
    c.now = later; // no tick: check-quorum would step the leader down
    c.step(3, ack(c.term(), start));
    assert!(matches!(
        c.change_membership(m.without(3).expect("member"), 0),
        Err(ChangeRefused::TooFewReachable { unreachable, .. }) if unreachable == vec![2]
    ));
}

/// A member's new peer address is a membership change with the same voters: refused for the
/// leader itself, one at a time, and only while the others alone can commit it.
#[test]
fn a_member_moves_to_a_new_address_with_the_voters_unchanged() {
    let mut c = leader_heard_from(&[2, 3]);
    let start = c.last_index();
    let m = c.membership().1.clone();
    let to = |id: NodeId| m.moved(id, format!("10.0.0.{id}:7000")).expect("a member");
    assert_eq!(
        c.move_member(1, to(1), 0),
        Err(ChangeRefused::MovingLeader(1))
    );
    assert_eq!(
        c.move_member(3, m.with(4, "10.0.0.4:7000".into()).expect("new"), 0),
        Err(ChangeRefused::NotOneChange),
        "a move keeps the voters"
    );
    assert_eq!(
        c.move_member(3, m.clone(), 0),
        Err(ChangeRefused::NotOneChange),
        "a move gives the member an address"
    );
    assert_eq!(c.last_index(), start, "nothing appended");
    let at = c.move_member(3, to(3), 0).expect("3 moves");
    assert_eq!(at, start + 1);
    assert_eq!(c.membership(), (at, &to(3)));
    assert_eq!(
        c.move_member(2, to(2), 0),
        Err(ChangeRefused::InProgress),
        "one change at a time"
    );
    // 2 alone (with the leader) commits it: 3 is not needed at its new address.
    flush(&mut c);
    c.step(2, ack(c.term(), at));
    assert_eq!(c.commit_index(), at);
    assert!(c.members().iter().copied().eq([1, 2, 3]));
    assert_eq!(c.membership().1.address(3), Some("10.0.0.3:7000"));

    // With 2 down, moving 3 would leave only the leader answering until 3 restarts.
    let mut c = leader_heard_from(&[3]);
    assert_eq!(
        c.move_member(3, to(3), 0),
        Err(ChangeRefused::TooFewReachable {
            needed: 2,
            reachable: 1,
            unreachable: vec![2, 3],
        })
    );
    // Moving the one that is down passes: 1 and 3 commit it.
    assert!(c.move_member(2, to(2), 0).is_ok());
}

/// heartbeat with the commit, and nothing more; it then knows it is out and never
/// campaigns.
#[test]
fn a_removed_member_learns_its_removal_and_is_sent_nothing_more() {
    let mut c = leader_heard_from(&[2, 3]);
    let start = c.last_index();
    let at = remove(&mut c, 3);
    let sent = flush(&mut c);
    assert!(
        sent.iter().any(|(to, m)| *to == 3
            && matches!(m, Message::Append { entries, .. }
                if entries.iter().any(|e| e.index == at))),
        "the member being removed is sent its removal: {sent:?}"
    );
    c.step(3, ack(c.term(), at));
    flush(&mut c);
    assert_eq!(
        c.commit_index(),
        start,
        "3's answer does not count any more"
    );
    c.step(2, ack(c.term(), at));
    let sent = flush(&mut c);
    assert_eq!(c.commit_index(), at);
    let last: Vec<&Message> = sent
        .iter()
        .filter(|(to, _)| *to == 3)
        .map(|(_, m)| m)
        .collect();
    assert!(
        matches!(last[..], [Message::Heartbeat { commit, .. }] if *commit == at),
        "{last:?}"
    );
    c.tick(c.now + 10 * c.cfg.heartbeat_ms, 0);
    let sent = flush(&mut c);
    assert!(sent.iter().all(|(to, _)| *to != 3), "{sent:?}");
    assert!(sent.iter().any(|(to, _)| *to == 2));

    // The removed member's side: it takes the removal, then the commit, and stays quiet.
    let mut f = core(3, 3, &[], 0);
    take_log(&mut f, &c, at, start);
    assert_eq!(f.last_index(), at);
    assert_eq!(f.members(), &[1, 2], "in effect once in the log");
    // While its removal is not known to be committed it may campaign (it could hold entries
    // the members lack)...
    f.tick(f.now + 2 * f.cfg.election_timeout_ms.1, 0);
    assert!(
        flush(&mut f)
            .iter()
            .any(|(_, m)| matches!(m, Message::PreVote { .. })),
        "campaigns while its removal may not be committed"
    );
    // ...and the last heartbeat ends that.
    f.step(
        1,
        Message::Heartbeat {
            term: c.term(),
            commit: at,
            seq: 0,
        },
    );
    flush(&mut f);
    assert_eq!(f.commit_index(), at);
    assert_eq!(f.members(), &[1, 2]);
    f.tick(f.now + 100 * f.cfg.election_timeout_ms.1, 0);
    assert!(flush(&mut f).is_empty(), "a removed node never campaigns");
}

/// A removal that commits before the removed member has it (the other member answered
/// first, or the leader alone is the quorum) is replicated on until the member holds it, and
/// only then is the last heartbeat sent; a member that stays silent is dropped after an
/// election timeout without one. A new leader replicates to a member whose removal it finds
/// uncommitted in its log.
#[test]
fn a_removed_member_is_replicated_to_until_it_holds_its_removal() {
    // A leader of {1, 2, 3} whose removal of 3 is committed by 2 alone.
    let removal = || {
        let mut c = leader_heard_from(&[2, 3]);
        let at = remove(&mut c, 3);
        flush(&mut c);
        c.step(2, ack(c.term(), at));
        let sent = flush(&mut c);
        assert_eq!(c.commit_index(), at);
        assert!(
            sent.iter()
                .all(|(to, m)| *to != 3 || !matches!(m, Message::Heartbeat { .. })),
            "3 does not hold its removal yet: {sent:?}"
        );
        (c, at)
    };
    let (mut c, at) = removal();
    c.tick(c.now + c.cfg.heartbeat_ms, 0);
    assert!(
        flush(&mut c).iter().any(|(to, _)| *to == 3),
        "still replicated to"
    );
    told_removal(&mut c, at);
    c.tick(c.now + 10 * c.cfg.heartbeat_ms, 0);
    assert!(flush(&mut c).iter().all(|(to, _)| *to != 3));

    // Silent: dropped once an election timeout passes without an answer, with no heartbeat.
    let (mut c, _) = removal();
    let mut sent = Vec::new();
    for step in 1..=30 {
        c.tick(c.now + c.cfg.election_timeout_ms.1 / 10, 0);
        c.step(2, ack(c.term(), c.last_index())); // keeps the leader in office
        sent.push((step, flush(&mut c)));
    }
    let last_to_3 = sent
        .iter()
        .rev()
        .find(|(_, out)| out.iter().any(|(to, _)| *to == 3))
        .map(|(step, _)| *step)
        .expect("replicated to for a while");
    // Its last answer came just before step 1; an election timeout (200 ms) is ten steps of
    // 20 ms, and it is dropped once longer than that has passed.
    assert_eq!(last_to_3, 10, "dropped after step {last_to_3}");
    // Back, it campaigns (it does not know): the leader takes it on again until it holds its
    // removal, then tells it.
    let at = c.last_index();
    c.step(
        3,
        Message::PreVote {
            term: c.term() + 1,
            last_index: 1,
            last_term: 1,
        },
    );
    let sent = flush(&mut c);
    assert!(
        sent.iter()
            .any(|(to, m)| *to == 3 && matches!(m, Message::Append { .. })),
        "{sent:?}"
    );
    told_removal(&mut c, at);

    // A new leader whose log holds the uncommitted removal of 3 replicates to 3 as well.
    let mut c = leader_heard_from(&[2, 3]);
    let start = c.last_index();
    let at = remove(&mut c, 3);
    flush(&mut c);
    let mut n = core(2, 3, &[], 0);
    take_log(&mut n, &c, at, start);
    assert_eq!(n.members(), &[1, 2]);
    n.tick(n.now + 2 * n.cfg.election_timeout_ms.1, 0);
    flush(&mut n);
    n.step(
        1,
        Message::PreVoteResp {
            term: n.term() + 1,
            granted: true,
        },
    );
    flush(&mut n);
    n.step(
        1,
        Message::VoteResp {
            term: n.term(),
            granted: true,
        },
    );
    let sent = flush(&mut n);
    assert!(n.is_leader());
    assert!(
        sent.iter()
            .any(|(to, m)| *to == 3 && matches!(m, Message::Append { .. })),
        "{sent:?}"
    );
}

/// The chunks of `snap` as a leader in `term` sends them, `chunk` bytes each.
fn chunks(term: u64, snap: &Snapshot, chunk: usize) -> Vec<Message> {
    let total = snap.data.len();
    (0..total.max(1))
        .step_by(chunk)
        .map(|offset| Message::InstallSnapshot {
            term,
            index: snap.index,
            last_term: snap.term,
            timestamp_ms: snap.timestamp_ms,
            offset: offset as u64,
            total: total as u64,
            data: snap.data.slice(offset..(offset + chunk).min(total)),
            membership: snap.membership.encode(),
        })
        .collect()
}

fn snapshot_at(index: u64, term: u64) -> Snapshot {
    Snapshot {
        index,
        term,
        timestamp_ms: 7_000,
        data: Bytes::from((0..20u8).collect::<Vec<_>>()),
        membership: Membership::of_ids([1, 2, 3]),
    }
}

#[test]
fn a_follower_behind_the_compacted_log_is_sent_the_snapshot_then_the_entries_after_it() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    let (first, _) = c
        .propose((0..6).map(|_| Bytes::from_static(b"a")), 0, None)
        .expect("leader");
    let last = first + 5;
    flush(&mut c);
    c.step(3, ack(1, last));
    flush(&mut c);
    assert_eq!(c.commit_index(), last);
    // Applied up to 5, so 6 and 7 are still in memory (no storage in this test).
    c.set_applied(5);
    c.compact(snapshot_at(5, 1), 1);
    flush(&mut c);
    assert_eq!(c.compacted_index(), 4, "one entry kept before the snapshot");
    // Node 2 never answered the probe with the no-op: when it is probed again, entry 1
    // is compacted away.
    c.tick(1_100, 0);
    let sent = flush(&mut c);
    let chunk = |m: &Message| match m {
        Message::InstallSnapshot {
            index: 5,
            offset,
            data,
            ..
        } => Some((*offset, data.len())),
        _ => None,
    };
    let first_chunks: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
    assert_eq!(first_chunks, vec![(0, 8)], "one chunk in flight: {sent:?}");
    let holds = |received| Message::SnapshotResp {
        term: 1,
        index: 5,
        received,
    };
    for received in [8, 16] {
        c.step(2, holds(received));
        let sent = flush(&mut c);
        let next: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
        assert_eq!(next, vec![(received, (20 - received as usize).min(8))]);
    }
    // A duplicate answer sends nothing more (no chain of chunks runs on by itself), nor
    // does the answer that confirms the whole: the follower is installing it.
    for received in [16, 20, 20] {
        c.step(2, holds(received));
        let sent = flush(&mut c);
        assert!(sent.iter().all(|(_, m)| chunk(m).is_none()), "{sent:?}");
    }
    // Unanswered for two heartbeats: an empty chunk at the end asks again.
    c.tick(1_200, 0);
    let sent = flush(&mut c);
    let asked: Vec<_> = sent.iter().filter_map(|(_, m)| chunk(m)).collect();
    assert_eq!(asked, vec![(20, 0)], "{sent:?}");
    // Installed: the follower is at 5, and the entries after it follow.
    c.step(2, ack(1, 5));
    let sent = flush(&mut c);
    assert_eq!(c.match_index(2), 5);
    assert!(
        sent.iter().any(|(to, m)| *to == 2
            && matches!(m, Message::Append { prev_index: 5, prev_term: 1, entries, .. } if !entries.is_empty())),
        "{sent:?}"
    );
}

#[test]
fn a_follower_assembles_a_snapshot_from_chunks_in_order_only() {
    let mut c = core(2, 3, &[1, 1], 1);
    let snap = snapshot_at(9, 2);
    let parts = chunks(2, &snap, 8);
    assert_eq!(parts.len(), 3);
    // A chunk out of order is answered with what is held (nothing), and dropped.
    c.step(1, parts[1].clone());
    let r = c.take_ready();
    assert!(r.install.is_none());
    assert!(
        r.messages
            .iter()
            .any(|(_, m)| matches!(m, Message::SnapshotResp { received: 0, .. }))
    );
    // The first chunk of another leader's snapshot at the same index (its bytes may
    // differ): the next leader's chunks are not spliced onto it.
    let other = Snapshot {
        data: Bytes::from(vec![9u8; 20]),
        ..snap.clone()
    };
    c.step(3, chunks(2, &other, 8)[0].clone());
    c.take_ready();
    let next_leader = chunks(3, &snap, 8);
    c.step(1, next_leader[1].clone());
    let r = c.take_ready();
    assert!(
        r.messages
            .iter()
            .any(|(_, m)| matches!(m, Message::SnapshotResp { received: 0, .. })),
        "{:?}",
        r.messages
    );
    for (k, part) in next_leader.iter().enumerate() {
        c.step(1, part.clone());
        if k < 2 {
            // A duplicate of the chunk just taken changes nothing.
            c.step(1, part.clone());
        }
    }
    let r = c.take_ready();
    assert_eq!(r.install, Some(snap.clone()), "assembled whole, once");
    // Appends wait while it is being installed.
    c.step(
        1,
        Message::Append {
            term: 3,
            prev_index: 9,
            prev_term: 2,
            commit: 9,
            seq: 0,
            entries: vec![entry(10, 2)],
        },
    );
    assert_eq!(c.last_index(), 2);
    c.installed(9);
    let sent = flush(&mut c);
    assert_eq!(
        (c.last_index(), c.commit_index(), c.compacted_index()),
        (9, 9, 9)
    );
    assert_eq!(c.term_at(9), 2);
    assert!(
        sent.iter().any(|(to, m)| *to == 1 && *m == ack(3, 9)),
        "{sent:?}"
    );
}

#[test]
fn a_snapshot_keeps_the_log_after_it_when_the_log_holds_its_last_entry() {
    // Entries past the snapshot may be committed on the leader with this follower's
    // acknowledgement: dropping them could lose committed entries.
    let mut c = core(2, 3, &[1, 1, 1, 1, 1, 1], 1);
    let snap = snapshot_at(4, 1);
    for part in chunks(1, &snap, 8) {
        c.step(1, part);
    }
    assert!(c.take_ready().install.is_some());
    c.installed(4);
    flush(&mut c);
    assert_eq!((c.last_index(), c.compacted_index()), (6, 4));
    // A snapshot whose last entry this log holds in another term replaces the whole log.
    let mut c = core(2, 3, &[1, 1, 1, 1, 1, 1], 2);
    let snap = snapshot_at(4, 2);
    for part in chunks(2, &snap, 8) {
        c.step(1, part);
    }
    assert!(c.take_ready().install.is_some());
    c.installed(4);
    let mut truncated = None;
    while c.has_ready() {
        for w in c.take_ready().writes {
            truncated = truncated.or(w.truncate_from.zip(w.compact_through));
        }
    }
    assert_eq!(truncated, Some((5, (4, 2))));
    assert_eq!((c.last_index(), c.term_at(4)), (4, 2));
}

#[test]
fn a_follower_that_lost_its_log_is_noticed_from_its_heartbeat_answers() {
    let mut c = core(1, 3, &[], 0);
    elect(&mut c, 3);
    c.step(2, ack(1, 1));
    flush(&mut c);
    // Caught up, the follower is sent only heartbeats: their answers must tell.
    let answer = Message::HeartbeatResp {
        term: 1,
        seq: 0,
        last_index: 0,
    };
    for _ in 0..3 {
        c.step(2, answer.clone());
    }
    assert_eq!(c.match_index(2), 0);
    assert!(
        flush(&mut c)
            .iter()
            .any(|(to, m)| *to == 2 && matches!(m, Message::Append { prev_index: 0, .. }))
    );
}

/// A removed member can come back after the log was compacted past every membership that held
/// it: the leader no longer has a record of it, and must tell it all the same, or it campaigns
/// forever without ever hearing that it is out.
#[test]
fn a_removed_member_back_after_compaction_is_told_its_removal() {
    let mut c = leader_heard_from(&[2, 3]);
    let at = remove(&mut c, 3);
    flush(&mut c);
    c.step(2, ack(c.term(), at));
    flush(&mut c);
    // 3 is silent: dropped after an election timeout.
    for _ in 0..30 {
        c.tick(c.now + c.cfg.election_timeout_ms.1 / 10, 0);
        c.step(2, ack(c.term(), c.last_index()));
        flush(&mut c);
    }
    let (first, _) = c
        .propose((0..4).map(|_| Bytes::from_static(b"a")), 0, None)
        .expect("leader");
    let last = first + 3;
    flush(&mut c);
    c.step(2, ack(c.term(), last));
    flush(&mut c);
    assert_eq!(c.commit_index(), last);
    c.set_applied(last);
    let snapshot = Snapshot {
        membership: Membership::of_ids([1, 2]),
        ..snapshot_at(last, c.term())
    };
    c.compact(snapshot, 1);
    flush(&mut c);
    assert!(c.compacted_index() > at, "compacted past the removal");

    c.step(
        3,
        Message::PreVote {
            term: c.term() + 1,
            last_index: at - 1,
            last_term: 1,
        },
    );
    let to_3 = sent_to(flush(&mut c), 3);
    assert!(
        to_3.iter().any(|m| matches!(m, Message::Append { .. })),
        "replicated to again: {to_3:?}"
    );
    // It holds nothing the leader still has: it is sent the snapshot, the membership without it.
    c.step(
        3,
        Message::AppendResp {
            term: c.term(),
            success: false,
            index: last,
            last_index: at - 1,
            seq: 0,
        },
    );
    c.tick(c.now + c.cfg.heartbeat_ms, 0);
    let to_3 = sent_to(flush(&mut c), 3);
    assert!(
        to_3.iter()
            .any(|m| matches!(m, Message::InstallSnapshot { index, .. } if *index == last)),
        "{to_3:?}"
    );
}
