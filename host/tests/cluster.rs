//! The runtime end to end: three in-process nodes with real redb logs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lockstep::raft::local::LocalNetwork;
use lockstep::raft::{Node, NodeId, ProposeError, RaftConfig, ReadError, Role};
use lockstep::state_machine::{Entry, StateMachine};
use lockstep::storage::LogStore;

/// Appends payloads; outputs how many entries it has seen.
#[derive(Default)]
struct Journal {
    seen: Vec<(u64, Bytes)>,
}

impl StateMachine for Journal {
    type Output = u64;
    fn apply(&mut self, batch: Vec<Entry>) -> Vec<u64> {
        batch
            .iter()
            .map(|e| {
                self.seen.push((e.index, e.payload.clone()));
                self.seen.len() as u64
            })
            .collect()
    }

    /// Index, length and bytes of each payload seen.
    fn snapshot(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        for (index, payload) in &self.seen {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            out.extend_from_slice(payload);
        }
        Ok(out)
    }

    fn restore(&mut self, mut bytes: &[u8]) -> anyhow::Result<()> {
        let mut seen = Vec::new();
        let word = |b: &mut &[u8]| -> anyhow::Result<u64> {
            let (w, rest) = b.split_at_checked(8).ok_or(anyhow::anyhow!("cut short"))?;
            *b = rest;
            Ok(u64::from_le_bytes(w.try_into()?))
        };
        while !bytes.is_empty() {
            let index = word(&mut bytes)?;
            let len = word(&mut bytes)? as usize;
            let (p, rest) = bytes
                .split_at_checked(len)
                .ok_or(anyhow::anyhow!("cut short"))?;
            seen.push((index, Bytes::copy_from_slice(p)));
            bytes = rest;
        }
        self.seen = seen;
        Ok(())
    }
}

const MEMBERS: [NodeId; 3] = [1, 2, 3];

fn config(id: NodeId) -> RaftConfig {
    let mut c = RaftConfig::new(id, MEMBERS.to_vec());
    c.election_timeout = (Duration::from_millis(150), Duration::from_millis(300));
    c.heartbeat_interval = Duration::from_millis(30);
    c
}

fn start(dir: &std::path::Path, net: &Arc<LocalNetwork>) -> Vec<Node<Journal>> {
    MEMBERS
        .iter()
        .map(|&id| {
            let log = LogStore::open(&dir.join(format!("n{id}/log.redb"))).expect("open log");
            let node =
                Node::start(config(id), log, net.transport(id), Journal::default()).expect("start");
            net.register(id, node.clone());
            node
        })
        .collect()
}

async fn leader(nodes: &[Node<Journal>]) -> usize {
    for _ in 0..500 {
        if let Some(i) = nodes
            .iter()
            .position(|n| n.status().role == Role::Leader && !n.is_stopped())
        {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader elected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_read_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = LocalNetwork::new();
    let nodes = start(dir.path(), &net);
    let l = leader(&nodes).await;
    let f = (l + 1) % 3;

    // A follower refuses with a hint and proposes nothing.
    match nodes[f].propose(Bytes::from_static(b"x"), None).await {
        Err(ProposeError::NotLeader { leader: Some(id) }) => assert_eq!(id, nodes[l].status().id),
        other => panic!("follower answered {other:?}"),
    }
    let term = nodes[l].status().term;
    assert_eq!(
        nodes[l]
            .propose(Bytes::from_static(b"x"), Some(term + 1))
            .await,
        Err(ProposeError::TermMismatch {
            expected: term + 1,
            current: term
        })
    );

    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let n = nodes[l].clone();
        tasks.push(tokio::spawn(async move {
            n.propose(Bytes::from(i.to_string()), Some(term)).await
        }));
    }
    let mut outputs = Vec::new();
    for t in tasks {
        let a = t.await.expect("join").expect("applied");
        assert_eq!(a.term, term);
        outputs.push(a.output);
    }
    outputs.sort();
    assert_eq!(
        outputs,
        (1..=200).collect::<Vec<u64>>(),
        "each caller gets its own entry's output"
    );
    let many = nodes[l]
        .propose_many(
            vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            None,
        )
        .await;
    let idx: Vec<u64> = many
        .iter()
        .map(|r| r.as_ref().expect("applied").index)
        .collect();
    assert_eq!(idx[1], idx[0] + 1);

    // Linearizable read on the leader sees everything acknowledged; followers refuse.
    let n = nodes[l]
        .read(true, |sm: &mut Journal| sm.seen.len())
        .await
        .expect("read");
    assert_eq!(n, 202);
    assert!(matches!(
        nodes[f].read(true, |sm: &mut Journal| sm.seen.len()).await,
        Err(ReadError::NotLeader { .. })
    ));
    // Followers catch up.
    for _ in 0..200 {
        if nodes.iter().all(|n| n.status().applied_index >= idx[1]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let local = nodes[f]
        .read(false, |sm: &mut Journal| sm.seen.clone())
        .await
        .expect("local read");
    assert_eq!(local.len(), 202);
    let m = nodes[l].metrics();
    assert!(m.proposals >= 202 && m.fsync_latency_us.count > 0);

    for n in &nodes {
        n.shutdown().await;
    }
    assert_eq!(
        nodes[l].propose(Bytes::new(), None).await,
        Err(ProposeError::ShuttingDown)
    );
    for id in MEMBERS {
        net.unregister(id);
    }

    // Restart from the same files: state is rebuilt from the log, and the cluster goes on.
    let nodes = start(dir.path(), &net);
    let l = leader(&nodes).await;
    let seen = nodes[l]
        .read(true, |sm: &mut Journal| sm.seen.clone())
        .await
        .expect("read after restart");
    assert_eq!(seen, local);
    let a = nodes[l]
        .propose(Bytes::from_static(b"after"), None)
        .await
        .expect("applied");
    assert_eq!(a.output, 203);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_down_resolves_every_pending_completion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = LocalNetwork::new();
    let nodes = start(dir.path(), &net);
    let l = leader(&nodes).await;
    nodes[l]
        .propose(Bytes::from_static(b"warm"), None)
        .await
        .expect("applied");
    let id = nodes[l].status().id;
    net.isolate(id, &MEMBERS, true);

    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let n = nodes[l].clone();
        tasks.push(tokio::spawn(async move {
            n.propose(Bytes::from(i.to_string()), None).await
        }));
    }
    let n = nodes[l].clone();
    let read = tokio::spawn(async move { n.read(true, |sm: &mut Journal| sm.seen.len()).await });
    // Check-quorum deposes the isolated leader; every caller hears "outcome unknown".
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("resolved")
            .expect("join");
        assert_eq!(r, Err(ProposeError::OutcomeUnknown));
    }
    let r = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("resolved")
        .expect("join");
    assert_eq!(r, Err(ReadError::LeadershipLost));
    assert_ne!(nodes[l].status().role, Role::Leader);

    // The rest elect a new leader; shutting down with work in flight resolves it too.
    net.isolate(id, &MEMBERS, false);
    let l2 = leader(&nodes).await;
    let n = nodes[l2].clone();
    let pending = tokio::spawn(async move { n.propose(Bytes::from_static(b"late"), None).await });
    nodes[l2].shutdown().await;
    let r = pending.await.expect("join");
    assert!(
        r.is_ok()
            || matches!(
                r,
                Err(ProposeError::OutcomeUnknown | ProposeError::ShuttingDown)
            ),
        "{r:?}"
    );
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_member_cluster_serves_alone_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("solo/log.redb");
    let net = LocalNetwork::new();
    for round in 1..=2u64 {
        let log = LogStore::open(&path).expect("open log");
        let node = Node::start(
            RaftConfig::new(7, vec![7]),
            log,
            net.transport(7),
            Journal::default(),
        )
        .expect("start");
        let mut ok = None;
        for _ in 0..200 {
            match node.propose(Bytes::from(format!("r{round}")), None).await {
                Ok(a) => {
                    ok = Some(a);
                    break;
                }
                Err(ProposeError::NotLeader { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        let a = ok.expect("a lone member elects itself");
        assert_eq!(
            a.output, round,
            "round {round} sees the entries of earlier rounds replayed"
        );
        let seen = node
            .read(true, |sm: &mut Journal| sm.seen.len())
            .await
            .expect("read");
        assert_eq!(seen as u64, round);
        node.shutdown().await;
    }
}

/// A node restarts from its latest snapshot and the log after it; without the snapshot its
/// compacted log cannot rebuild the state, and it refuses to start rather than serve a state
/// missing the compacted entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_starts_from_the_snapshot_and_refuses_a_compacted_log_without_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("solo/log.redb");
    let net = LocalNetwork::new();
    let mut config = RaftConfig::new(7, vec![7]);
    config.snapshot_every = 5;
    config.snapshot_keep = 0;
    let start = || {
        let log = LogStore::open(&path).expect("open log");
        Node::start(config.clone(), log, net.transport(7), Journal::default())
    };
    let node = start().expect("start");
    for k in 0..12u64 {
        let mut done = false;
        for _ in 0..200 {
            match node.propose(Bytes::from(format!("p{k}")), None).await {
                Ok(_) => {
                    done = true;
                    break;
                }
                Err(ProposeError::NotLeader { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(done, "a lone member elects itself");
    }
    // Written on a thread of its own, then reported to the core.
    let mut status = node.status();
    for _ in 0..500 {
        if status.snapshot_index >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = node.status();
    }
    assert!(status.snapshot_index >= 10, "{status:?}");
    assert_eq!(status.compacted_index, status.snapshot_index, "{status:?}");
    node.shutdown().await;

    let node = start().expect("restart");
    // A linearizable read, once the node leads again: the last entry's commit may not have
    // been durable before the stop (it is committed again by the new term's no-op).
    let mut seen = None;
    for _ in 0..200 {
        match node.read(true, |sm: &mut Journal| sm.seen.clone()).await {
            Ok(s) => {
                seen = Some(s);
                break;
            }
            Err(ReadError::NotLeader { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("{e}"),
        }
    }
    let seen = seen.expect("a lone member elects itself");
    let payloads: Vec<Bytes> = seen.into_iter().map(|(_, p)| p).collect();
    let expected: Vec<Bytes> = (0..12).map(|k| Bytes::from(format!("p{k}"))).collect();
    assert_eq!(
        payloads, expected,
        "the snapshot's entries and the log's after it"
    );
    node.shutdown().await;

    std::fs::remove_dir_all(dir.path().join("solo/snapshots")).expect("remove snapshots");
    let refused = start().err().expect("a compacted log without its snapshot");
    assert!(
        refused.to_string().contains("the latest snapshot"),
        "{refused:#}"
    );
}

/// A machine that breaks (panics) on the payload `boom`.
struct Brittle;

impl StateMachine for Brittle {
    type Output = ();
    fn apply(&mut self, batch: Vec<Entry>) -> Vec<()> {
        for e in &batch {
            assert!(e.payload != "boom", "the machine broke");
        }
        vec![(); batch.len()]
    }
}

/// A pipeline thread that panics stops its node: the node must not stay up looking healthy
/// while it can no longer apply anything (`serve` exits on it, `/healthz` answers 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_state_machine_thread_stops_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(&dir.path().join("log.redb")).expect("open log");
    let net = LocalNetwork::new();
    let node =
        Node::start(RaftConfig::new(7, vec![7]), log, net.transport(7), Brittle).expect("start");
    let mut elected = false;
    for _ in 0..200 {
        match node.propose(Bytes::from_static(b"fine"), None).await {
            Ok(_) => {
                elected = true;
                break;
            }
            Err(ProposeError::NotLeader { .. }) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(elected, "a lone member elects itself");
    assert!(!node.is_stopped());

    // Committed, then the machine broke while applying it: nobody can say it took effect.
    let broke = node.propose(Bytes::from_static(b"boom"), None).await;
    assert!(
        matches!(broke, Err(ProposeError::OutcomeUnknown)),
        "{broke:?}"
    );
    for _ in 0..500 {
        if node.is_stopped() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        node.is_stopped(),
        "the node stops once its FSM thread is gone"
    );
    let after = node.propose(Bytes::from_static(b"fine"), None).await;
    assert!(
        matches!(after, Err(ProposeError::ShuttingDown)),
        "{after:?}"
    );
    let read = node.read(false, |_: &mut Brittle| ()).await;
    assert!(matches!(read, Err(ReadError::ShuttingDown)), "{read:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_id_0_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = LogStore::open(&dir.path().join("log.redb")).expect("open log");
    let net = LocalNetwork::new();
    let refused = Node::start(
        RaftConfig::new(1, vec![0, 1, 2]),
        log,
        net.transport(1),
        Journal::default(),
    );
    let err = refused.err().expect("a member 0 is refused");
    assert!(err.to_string().contains("id 0 is reserved"), "{err}");
}
