//! Network partitions between real nodes on one machine: a [`PeerProxy`] listens at the peer
//! address the cluster knows for a node and passes connections on to the node's own listener,
//! and a test cuts and heals the link from one node to another ([`Links`]).
//!
//! A connection's dialer names itself in the first frame it sends, its hello, so the proxy knows
//! which link each direction of a connection travels: dialer to node, and node to dialer. While
//! a direction's link is cut the proxy stops reading that side, as a partition drops packets:
//! the sender's writes back up in its socket, and what it sent arrives late, once the link
//! heals, unless either end has given the connection up by then. (The peer transport sends each
//! way on a connection of its own, so in practice only the dialer's side carries messages; the
//! node's side carries its challenge, which goes back before the dialer is known.)

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use lockstep::transport::frame::{Hello, MAX_HELLO_BYTES};

/// The links that are cut, as (from, to) node ids; shared by every proxy of a cluster.
#[derive(Default)]
pub struct Links {
    cut: Mutex<HashSet<(u64, u64)>>,
    healed: Condvar,
}

impl Links {
    /// Cuts the link from `from` to `to` (one way).
    pub fn cut(&self, from: u64, to: u64) {
        self.lock().insert((from, to));
    }

    /// Cuts every link between `node` and `others`, both ways.
    pub fn isolate(&self, node: u64, others: impl IntoIterator<Item = u64>) {
        let mut cut = self.lock();
        for other in others {
            cut.insert((node, other));
            cut.insert((other, node));
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        self.lock().clear();
        self.healed.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, u64)>> {
        self.cut.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while `link` is cut; false if the connection was closed meanwhile.
    fn wait_open(&self, link: Option<(u64, u64)>, closed: &AtomicBool) -> bool {
        let mut cut = self.lock();
        while link.is_some_and(|l| cut.contains(&l)) {
            if closed.load(Ordering::Relaxed) {
                return false;
            }
            // Polled as well, so that a connection closed during a cut is let go.
            cut = self
                .healed
                .wait_timeout(cut, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !closed.load(Ordering::Relaxed)
    }
}

/// The peer address of one node: connections accepted here go on to the address the node
/// itself listens on, for as long as the proxy lives (across restarts of the node).
pub struct PeerProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl PeerProxy {
    /// A proxy for node `to`, which listens at `target`.
    pub fn start(to: u64, target: SocketAddr, links: Arc<Links>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                match conn {
                    Ok(conn) => {
                        let links = links.clone();
                        std::thread::spawn(move || pass_on(conn, to, target, links));
                    }
                    // Out of descriptors, say: try again in a moment rather than spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(PeerProxy { addr, stop })
    }
}

impl Drop for PeerProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One connection from a dialer to node `to`, each direction passed on while its link is open.
fn pass_on(dialer: TcpStream, to: u64, target: SocketAddr, links: Arc<Links>) {
    let Ok(node) = TcpStream::connect(target) else {
        return;
    };
    // As the transport does on its own sockets: small frames (heartbeats) are not held back.
    let _ = (dialer.set_nodelay(true), node.set_nodelay(true));
    let closed = Arc::new(AtomicBool::new(false));
    let from: Arc<OnceLock<u64>> = Arc::default();
    let back = match (node.try_clone(), dialer.try_clone()) {
        (Ok(node), Ok(dialer)) => {
            let (closed, from, links) = (closed.clone(), from.clone(), links.clone());
            std::thread::spawn(move || {
                // Until the dialer has said who it is, nothing but the challenge can come.
                pump(
                    &node,
                    &dialer,
                    || from.get().map(|&f| (to, f)),
                    &links,
                    &closed,
                );
                close(&node, &dialer, &closed);
            })
        }
        _ => return close(&node, &dialer, &closed),
    };
    if let Some(hello) = read_hello(&mut &dialer)
        && let Ok(h) = Hello::decode(&hello[4..])
    {
        let _ = from.set(h.node_id);
        let link = Some((h.node_id, to));
        if links.wait_open(link, &closed) && (&node).write_all(&hello).is_ok() {
            pump(&dialer, &node, || link, &links, &closed);
        }
    }
    close(&node, &dialer, &closed);
    let _ = back.join();
}

/// Copies `src` to `dst` until either closes, reading and writing only while `link()` is open.
fn pump(
    mut src: &TcpStream,
    mut dst: &TcpStream,
    link: impl Fn() -> Option<(u64, u64)>,
    links: &Links,
    closed: &AtomicBool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // Not read while the link is cut, so the sender's writes back up as in a partition; and a
    // chunk read just before a cut is held until the heal.
    while links.wait_open(link(), closed) {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !links.wait_open(link(), closed) || dst.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Ends both sides of a connection (and wakes the thread reading the other direction).
fn close(a: &TcpStream, b: &TcpStream, closed: &AtomicBool) {
    closed.store(true, Ordering::Relaxed);
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// The first frame of a connection, length prefix included (`None`: not a frame).
fn read_hello(r: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len);
    if n > MAX_HELLO_BYTES {
        return None;
    }
    let mut frame = len.to_vec();
    frame.resize(4 + n as usize, 0);
    r.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}
