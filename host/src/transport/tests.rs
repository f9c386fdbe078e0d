use std::sync::Mutex;

use tokio::io::AsyncReadExt;

use super::*;

#[derive(Debug, PartialEq)]
struct Ping(u64);

impl WireMessage for Ping {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
    }
    fn decode(b: &[u8]) -> Result<Self, String> {
        Ok(Ping(u64::from_be_bytes(
            b.try_into().map_err(|_| "bad ping".to_string())?,
        )))
    }
}

type Inbox = Arc<Mutex<Vec<(NodeId, u64)>>>;

async fn pair(cluster_b: &str) -> (PeerTransport<Ping>, PeerTransport<Ping>, Inbox, String) {
    pair_with(cluster_b, "limits").await
}

async fn pair_with(
    cluster_b: &str,
    limits_b: &str,
) -> (PeerTransport<Ping>, PeerTransport<Ping>, Inbox, String) {
    let (la, lb, peers) = two_members().await;
    let b_addr = peers[&2].clone();
    let a = PeerTransport::start(config(&peers, 1, "c", "limits"), la, |_, _| {});
    let (b, inbox) = recording(config(&peers, 2, cluster_b, limits_b), lb);
    (a, b, inbox, b_addr)
}

/// Listeners for members 1 and 2, and the peer map naming them.
async fn two_members() -> (TcpListener, TcpListener, BTreeMap<NodeId, String>) {
    let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peers = BTreeMap::from([
        (1, la.local_addr().unwrap().to_string()),
        (2, lb.local_addr().unwrap().to_string()),
    ]);
    (la, lb, peers)
}

fn config(
    peers: &BTreeMap<NodeId, String>,
    id: NodeId,
    cluster: &str,
    limits: &str,
) -> TransportConfig {
    TransportConfig {
        cluster_id: cluster.into(),
        node_id: id,
        http_addr: format!("http-{id}"),
        apply_limits: limits.into(),
        peers: peers.clone(),
        max_frame_bytes: 1024,
        queue_depth: 1024,
        peer_secret: PeerSecret::default(),
    }
}

/// A transport whose inbound messages land in the returned inbox.
fn recording(config: TransportConfig, listener: TcpListener) -> (PeerTransport<Ping>, Inbox) {
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    let t = PeerTransport::start(config, listener, move |from, Ping(n)| {
        sink.lock().unwrap().push((from, n))
    });
    (t, inbox)
}

async fn wait_for(inbox: &Inbox, n: usize) -> bool {
    for _ in 0..200 {
        if inbox.lock().unwrap().len() >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Sends `to` pings until `inbox` (`to`'s) holds one, for up to ten tries of two seconds.
async fn reaches(from: &PeerTransport<Ping>, to: NodeId, inbox: &Inbox) -> bool {
    for _ in 0..10 {
        from.send(to, Ping(to));
        if wait_for(inbox, 1).await {
            return true;
        }
    }
    false
}

/// 2 reaches 1 at its address, and then 1 (`a`, which was told another address for 2) reaches
/// 2 where 2's hello says it is.
async fn both_reach(a: &PeerTransport<Ping>, to_a: &Inbox, b: &PeerTransport<Ping>, to_b: &Inbox) {
    assert!(reaches(b, 1, to_a).await, "2 reaches 1 at its address");
    assert!(reaches(a, 2, to_b).await, "1 reaches 2 where 2 says it is");
}

#[tokio::test]
async fn delivers_in_order_and_learns_http_addresses() {
    let (a, b, inbox, _) = pair("c").await;
    // The first messages may be dropped while the connection is being set up: resend until seen.
    for _ in 0..100 {
        a.send(2, Ping(0));
        if wait_for(&inbox, 1).await {
            break;
        }
    }
    inbox.lock().unwrap().clear();
    for n in 1..=500 {
        a.send(2, Ping(n));
    }
    assert!(wait_for(&inbox, 500).await);
    let got: Vec<u64> = inbox.lock().unwrap().iter().map(|&(_, n)| n).collect();
    assert_eq!(got, (1..=500).collect::<Vec<_>>());
    assert_eq!(b.http_addr(1).as_deref(), Some("http-1"));
}

/// A peer that moved while this node missed the change: this node dials the old address,
/// where nothing answers, and once the peer connects, also where its hello says it is.
#[tokio::test]
async fn a_peer_that_moved_is_dialled_where_its_hello_says() {
    let (la, lb, peers) = two_members().await;
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old = gone.local_addr().unwrap().to_string();
    drop(gone);
    let mut stale = peers.clone();
    stale.insert(2, old.clone());
    let (a, to_a) = recording(config(&stale, 1, "c", "limits"), la);
    let (b, to_b) = recording(config(&peers, 2, "c", "limits"), lb);
    assert_eq!(
        a.peer_address(2).as_ref(),
        Some(&old),
        "dialled where it was"
    );
    both_reach(&a, &to_a, &b, &to_b).await;
    // The address it was given stays the one the membership knows, and is tried first.
    assert_eq!(a.peer_address(2), Some(old));
}

/// Something else answers where a member used to be: another member, or no Lockstep node at
/// all. Neither may be taken for the member: its messages must not go to the other one, and
/// it is dialled where its hello says it is, as when nothing answers there.
#[tokio::test]
async fn another_node_where_a_member_was_is_not_taken_for_it() {
    // Member 3 now listens where 1 believes 2 is.
    let (la, lb, peers) = two_members().await;
    let l3 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old = l3.local_addr().unwrap().to_string();
    let mut all = peers.clone();
    all.insert(3, old.clone());
    let mut stale = all.clone();
    stale.insert(2, old);
    let (a, to_a) = recording(config(&stale, 1, "c", "limits"), la);
    let (b, to_b) = recording(config(&all, 2, "c", "limits"), lb);
    let (_c, to_c) = recording(config(&all, 3, "c", "limits"), l3);
    both_reach(&a, &to_a, &b, &to_b).await;
    assert!(
        to_c.lock().unwrap().iter().all(|&(from, _)| from != 1),
        "1 sent nothing to 3: {:?}",
        to_c.lock().unwrap()
    );

    // A stranger (not a Lockstep node) answers where 1 believes 2 is.
    let (la, lb, peers) = two_members().await;
    let stranger = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut stale = peers.clone();
    stale.insert(2, stranger.local_addr().unwrap().to_string());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = stranger.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        }
    });
    let (a, to_a) = recording(config(&stale, 1, "c", "limits"), la);
    let (b, to_b) = recording(config(&peers, 2, "c", "limits"), lb);
    both_reach(&a, &to_a, &b, &to_b).await;
}

/// A member no longer named is still dialled while it calls in (a removed member still running
/// must hear that it was removed; a leader this node's log does not know yet must be answered),
/// and no longer once it is gone.
#[tokio::test]
async fn a_peer_not_named_is_dialled_only_while_it_calls_in() {
    let (la, lb, peers) = two_members().await;
    let (a, to_a) = recording(config(&peers, 1, "c", "limits"), la);
    let (b, to_b) = recording(config(&peers, 2, "c", "limits"), lb);
    both_reach(&a, &to_a, &b, &to_b).await;
    a.set_peers(&BTreeMap::from([(1, peers[&1].clone())]));
    to_b.lock().unwrap().clear();
    assert!(
        reaches(&a, 2, &to_b).await,
        "still answered while it calls in"
    );

    drop(b);
    let mut dialled = true;
    for _ in 0..200 {
        dialled = a.peer_address(2).is_some();
        if !dialled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!dialled, "a member removed and gone is not dialled");

    // Named again, it is dialled again.
    a.set_peers(&peers);
    assert_eq!(a.peer_address(2).as_ref(), Some(&peers[&2]));
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_their_connection() {
    let (a, _b, inbox, b_addr) = pair("c").await;
    // Random bytes, then a valid hello followed by a length prefix far over the limit. The node
    // greets each with its challenge, then closes it.
    let mut buf = Vec::new();
    let mut junk = TcpStream::connect(&b_addr).await.unwrap();
    read_frame(&mut junk, MAX_HELLO_BYTES, &mut buf)
        .await
        .unwrap();
    assert!(Challenge::decode(&buf).is_ok());
    junk.write_all(b"\x00\x00\x00\x10GARBAGEGARBAGE!!")
        .await
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(junk.read_to_end(&mut rest).await.unwrap_or(0), 0);

    let mut big = TcpStream::connect(&b_addr).await.unwrap();
    read_frame(&mut big, MAX_HELLO_BYTES, &mut buf)
        .await
        .unwrap();
    let nonce = Challenge::decode(&buf).unwrap().nonce;
    let mut wire = Vec::new();
    let mut hello = Hello {
        cluster_id: "c".into(),
        node_id: 1,
        http_addr: "x".into(),
        raft_addr: String::new(),
        apply_limits: "limits".into(),
        proof: [0; 32],
    };
    hello.seal(b"", &nonce);
    put_frame(&mut wire, &hello.encode());
    wire.extend_from_slice(&u32::MAX.to_be_bytes());
    big.write_all(&wire).await.unwrap();
    assert_eq!(big.read_to_end(&mut rest).await.unwrap_or(0), 0);

    // The real peer still gets through.
    for _ in 0..100 {
        a.send(2, Ping(9));
        if wait_for(&inbox, 1).await {
            break;
        }
    }
    assert!(inbox.lock().unwrap().contains(&(1, 9)));
}

/// Node 1 keeps sending to node 2 for 200 ms: nothing may arrive.
async fn assert_refused(a: PeerTransport<Ping>, inbox: Inbox) {
    for _ in 0..20 {
        a.send(2, Ping(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(inbox.lock().unwrap().is_empty());
}

#[tokio::test]
async fn another_cluster_is_refused() {
    let (a, _b, inbox, _) = pair("other").await;
    assert_refused(a, inbox).await;
}

#[tokio::test]
async fn a_peer_applying_under_other_limits_is_refused() {
    let (a, _b, inbox, _) = pair_with("c", "other limits").await;
    assert_refused(a, inbox).await;
}

/// Members 1 and 2 with these peer secrets; 2's inbox.
async fn with_secrets(a: &[u8], b: &[u8]) -> (PeerTransport<Ping>, PeerTransport<Ping>, Inbox) {
    let (la, lb, peers) = two_members().await;
    let mut ca = config(&peers, 1, "c", "limits");
    ca.peer_secret = PeerSecret(a.to_vec());
    let mut cb = config(&peers, 2, "c", "limits");
    cb.peer_secret = PeerSecret(b.to_vec());
    let ta = PeerTransport::start(ca, la, |_, _| {});
    let (tb, inbox) = recording(cb, lb);
    (ta, tb, inbox)
}

#[tokio::test]
async fn members_with_the_same_secret_talk_and_others_are_refused() {
    let (a, _b, inbox) = with_secrets(b"s3cret", b"s3cret").await;
    for _ in 0..100 {
        a.send(2, Ping(1));
        if wait_for(&inbox, 1).await {
            break;
        }
    }
    assert!(inbox.lock().unwrap().contains(&(1, 1)));
    let (a, _b, inbox) = with_secrets(b"guess", b"s3cret").await;
    assert_refused(a, inbox).await;
    let (a, _b, inbox) = with_secrets(b"", b"s3cret").await;
    assert_refused(a, inbox).await;
}

#[tokio::test]
async fn peer_sockets_give_up_on_a_silent_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dialled = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (accepted, _) = listener.accept().await.expect("accept");
    for stream in [&dialled, &accepted] {
        tune(stream);
        let sock = socket2::SockRef::from(stream);
        assert!(stream.nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(
                sock.tcp_user_timeout().expect("user timeout"),
                Some(PEER_TIMEOUT)
            );
            assert_eq!(sock.tcp_keepalive_time().expect("idle"), PEER_TIMEOUT / 2);
        }
    }
}

#[tokio::test]
async fn a_flood_of_silent_connections_cannot_keep_peers_out() {
    let (la, lb, peers) = two_members().await;
    let (b, inbox) = recording(config(&peers, 2, "c", "limits"), lb);
    let mut held = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(&peers[&2]).await.unwrap();
        // Each silent connection reports whether the node closed it within a second (well
        // inside the 5 s a connection has for its hello); the challenge may come first.
        held.spawn(async move {
            let mut greeting = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut greeting)).await;
            (read.is_ok(), s)
        });
    }
    let mut closed = 0;
    let mut open = Vec::new();
    while let Some(Ok((was_closed, s))) = held.join_next().await {
        closed += usize::from(was_closed);
        open.push(s);
    }
    // Only the newest connections that have not said hello are kept.
    assert_eq!(closed, 40 - MAX_PENDING_INBOUND);
    // A member that dials now gets through at once: its hello evicts no one it needs, and it
    // does not wait for the strangers' hello deadline (the old per-member slots were all held
    // by them until it passed).
    let a = PeerTransport::start(config(&peers, 1, "c", "limits"), la, |_, _| {});
    let mut delivered = false;
    for n in 0..40 {
        a.send(2, Ping(n));
        tokio::time::sleep(Duration::from_millis(50)).await;
        if !inbox.lock().unwrap().is_empty() {
            delivered = true;
            break;
        }
    }
    assert!(delivered, "no message within 2 s");
    drop((open, b));
}

#[test]
fn a_members_newer_connection_replaces_its_older_one() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let idle = || tokio::spawn(std::future::pending::<()>());
        let mut c = Inbound::default();
        let (old, new) = (idle(), idle());
        c.admit(1, old.abort_handle());
        c.admit(2, new.abort_handle());
        assert!(c.promote(1, 7));
        assert!(c.promote(2, 7));
        assert!(
            old.await.unwrap_err().is_cancelled(),
            "the older connection is closed"
        );
        assert_eq!(c.members[&7].0, 2);
        assert!(c.pending.is_empty());
        // An older connection whose hello is read after a newer one's is the one refused.
        let (late, newest) = (idle(), idle());
        c.admit(3, late.abort_handle());
        c.admit(4, newest.abort_handle());
        assert!(c.promote(4, 7));
        assert!(!c.promote(3, 7), "the newer connection stays");
        assert_eq!(c.members[&7].0, 4);
        c.forget(3);
        c.forget(4);
        assert!(c.members.is_empty());
        for t in [new, late, newest] {
            t.abort();
        }
    });
}
