//! Network partitions between real nodes on one machine: a [`LinkProxy`] listens at the peer
//! address the cluster knows for each node and passes connections on to the node's own
//! listener, and a test cuts and heals the link from one node to another.
//!
//! The peer transport sends each way on its own connection: a node dials every peer and only
//! writes to it (the acceptor speaks once, its challenge). So the dialer of a connection is
//! the sender of everything on it, and it names itself in the first frame it sends, its hello.
//! While the link from
//! that node to this one is cut, the proxy stops reading the connection, as a partition drops
//! packets: the sender's writes back up in its socket, and what it sent reaches the node late,
//! once the link heals, unless either end has given the connection up by then.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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

    /// Cuts every link to and from `node`.
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

    /// Waits while the link from `from` to `to` is cut; false if `closed` was set meanwhile.
    fn wait_open(&self, from: u64, to: u64, closed: &AtomicBool) -> bool {
        let mut cut = self.lock();
        while cut.contains(&(from, to)) {
            if closed.load(Ordering::Relaxed) {
                return false;
            }
            cut = self
                .healed
                .wait_timeout(cut, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        !closed.load(Ordering::Relaxed)
    }
}

/// The peer address of node `to`: connections accepted here go on to `target`, the address the
/// node itself listens on, for as long as the proxy lives (across restarts of the node).
pub struct LinkProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl LinkProxy {
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
                let Ok(conn) = conn else { continue };
                let links = links.clone();
                std::thread::spawn(move || pass_on(conn, to, target, &links));
            }
        });
        Ok(LinkProxy { addr, stop })
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

/// One connection from a dialer to node `to`, passed on while its link is open.
fn pass_on(dialer: TcpStream, to: u64, target: SocketAddr, links: &Links) {
    let Ok(node) = TcpStream::connect(target) else {
        return;
    };
    let closed = Arc::new(AtomicBool::new(false));
    let close = |closed: &AtomicBool| {
        closed.store(true, Ordering::Relaxed);
        let _ = dialer.shutdown(Shutdown::Both);
        let _ = node.shutdown(Shutdown::Both);
    };
    // The node's side (its challenge) goes back as it comes.
    let back = match (node.try_clone(), dialer.try_clone()) {
        (Ok(mut from), Ok(mut into)) => {
            let closed = closed.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut into);
                closed.store(true, Ordering::Relaxed);
                let _ = from.shutdown(Shutdown::Both);
                let _ = into.shutdown(Shutdown::Both);
            })
        }
        _ => return close(&closed),
    };
    let (mut dialer_r, mut node_w) = (&dialer, &node);
    let hello = read_hello(&mut dialer_r);
    let from = hello
        .as_ref()
        .and_then(|h| Hello::decode(&h[4..]).ok())
        .map(|h| h.node_id);
    if let (Some(hello), Some(from)) = (hello, from) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: &[u8] = &hello;
        loop {
            if !links.wait_open(from, to, &closed) || node_w.write_all(pending).is_err() {
                break;
            }
            // Not read while the link is cut: the dialer's writes back up, as in a partition.
            if !links.wait_open(from, to, &closed) {
                break;
            }
            match dialer_r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => pending = &buf[..n],
            }
        }
    }
    close(&closed);
    let _ = back.join();
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
