//! Wire format of the peer transport.
//!
//! A connection carries length-prefixed frames: a big-endian `u32` length, then that many bytes.
//! The accepting side speaks first, a [`Challenge`] with its id and a fresh nonce; the dialing
//! side checks it reached the member it dialled, and answers
//! with a [`Hello`] that proves, over that nonce, it holds the cluster's peer secret; every later
//! frame (dialer to acceptor) is one encoded Raft message. A length above the limit, a short read
//! or a bad hello closes the connection: nothing in a frame is trusted.

use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Marks a Lockstep peer connection, so garbage is refused before any length is believed.
pub const MAGIC: [u8; 4] = *b"LKSP";
/// Bumped on any incompatible change of the frame or message encoding.
pub const PROTOCOL_VERSION: u8 = 6;
/// A hello carries two short strings and an id: anything larger is not a hello.
pub const MAX_HELLO_BYTES: u32 = 4 * 1024;

/// Errors reading a frame; each one closes the connection it came from.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: u32, limit: u32 },
    #[error("bad hello: {0}")]
    BadHello(&'static str),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("undecodable message: {0}")]
    BadMessage(String),
}

/// Appends one frame (length prefix + body) to `out`.
pub fn put_frame(out: &mut Vec<u8>, body: &[u8]) {
    put_frame_with(out, |out| out.extend_from_slice(body));
}

/// Appends one frame whose body `write` appends to `out` in place (no intermediate buffer).
pub fn put_frame_with(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    write(out);
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Reads one frame body into `buf` (reused between calls), refusing lengths above `limit`.
/// A clean end of stream before a frame starts is [`FrameError::Closed`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    limit: u32,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    match reader.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    // Grow with the bytes that actually arrive, not with what the prefix claims.
    buf.clear();
    let got = reader.take(u64::from(len)).read_to_end(buf).await?;
    if got != len as usize {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

/// The acceptor's first frame: who it is, so a caller that reached another node where it
/// expected a member (an address the member moved from) can try elsewhere; and a nonce the
/// caller's hello must prove the peer secret over, fresh for every connection, so a hello
/// overheard on one cannot be replayed on another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub node_id: u64,
    pub nonce: [u8; 32],
}

impl Challenge {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.nonce.len());
        put_version(&mut out);
        out.extend_from_slice(&self.node_id.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        out
    }

    pub fn decode(mut b: &[u8]) -> Result<Self, FrameError> {
        check_version(&mut b)?;
        let node_id = u64::from_be_bytes(*take::<8>(&mut b)?);
        let nonce = *take::<32>(&mut b)?;
        if !b.is_empty() {
            return Err(FrameError::BadHello("trailing bytes"));
        }
        Ok(Challenge { node_id, nonce })
    }
}

/// The caller's answer: who it is, from which cluster, where its HTTP API listens (so any node
/// can send a client to the leader), and the proof that it holds the cluster's peer secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub cluster_id: String,
    pub node_id: u64,
    pub http_addr: String,
    /// Where the caller takes peer connections: a node that does not know it yet (it has not
    /// seen the change that added it) dials it there to answer.
    pub raft_addr: String,
    /// The limits the peer applies entries under (`Limits::describe`): members must agree.
    pub apply_limits: String,
    /// HMAC-SHA256, keyed by the peer secret, over the challenge's nonce and the fields above.
    pub proof: [u8; 32],
}

impl Hello {
    /// The fields the proof covers, encoded (everything but the proof).
    fn fields(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.cluster_id.len() + self.http_addr.len());
        put_version(&mut out);
        out.extend_from_slice(&self.node_id.to_be_bytes());
        put_str(&mut out, &self.cluster_id);
        put_str(&mut out, &self.http_addr);
        put_str(&mut out, &self.raft_addr);
        put_str(&mut out, &self.apply_limits);
        out
    }

    fn mac(&self, secret: &[u8], nonce: &[u8; 32]) -> Hmac<Sha256> {
        // HMAC takes keys of any length, the empty one included.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(nonce);
        mac.update(&self.fields());
        mac
    }

    /// Sets the proof for `nonce` under `secret` (empty: no secret configured).
    pub fn seal(&mut self, secret: &[u8], nonce: &[u8; 32]) {
        self.proof = self.mac(secret, nonce).finalize().into_bytes().into();
    }

    /// Whether the proof was made for `nonce` with `secret` (compared in constant time).
    pub fn proves(&self, secret: &[u8], nonce: &[u8; 32]) -> bool {
        self.mac(secret, nonce).verify_slice(&self.proof).is_ok()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.fields();
        out.extend_from_slice(&self.proof);
        out
    }

    pub fn decode(mut b: &[u8]) -> Result<Self, FrameError> {
        check_version(&mut b)?;
        let node_id = u64::from_be_bytes(*take::<8>(&mut b)?);
        let cluster_id = take_str(&mut b)?;
        let http_addr = take_str(&mut b)?;
        let raft_addr = take_str(&mut b)?;
        let apply_limits = take_str(&mut b)?;
        let proof = *take::<32>(&mut b)?;
        if !b.is_empty() {
            return Err(FrameError::BadHello("trailing bytes"));
        }
        Ok(Hello {
            cluster_id,
            node_id,
            http_addr,
            raft_addr,
            apply_limits,
            proof,
        })
    }
}

/// What every greeting starts with: the magic and the protocol version (`check_version`).
fn put_version(out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
}

fn check_version(b: &mut &[u8]) -> Result<(), FrameError> {
    if *take::<4>(b)? != MAGIC {
        return Err(FrameError::BadHello("not a lockstep peer"));
    }
    let version = take::<1>(b)?[0];
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Refused(format!(
            "peer speaks protocol version {version}, this node {PROTOCOL_VERSION}: every member \
             must run the same lockstep release"
        )));
    }
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..len as usize]);
}

fn take<'a, const N: usize>(b: &mut &'a [u8]) -> Result<&'a [u8; N], FrameError> {
    let (head, tail) = b
        .split_first_chunk::<N>()
        .ok_or(FrameError::BadHello("short"))?;
    *b = tail;
    Ok(head)
}

fn take_str(b: &mut &[u8]) -> Result<String, FrameError> {
    let len = u16::from_be_bytes(*take::<2>(b)?) as usize;
    let s = b.split_off(..len).ok_or(FrameError::BadHello("short"))?;
    String::from_utf8(s.to_vec()).map_err(|_| FrameError::BadHello("string is not utf-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            cluster_id: "c1".into(),
            node_id: 7,
            http_addr: "127.0.0.1:8080".into(),
            raft_addr: "127.0.0.1:7070".into(),
            apply_limits: "fuel 1".into(),
            proof: [0; 32],
        }
    }

    #[test]
    fn hello_roundtrips() {
        let mut h = hello();
        h.seal(b"secret", &[9; 32]);
        assert_eq!(Hello::decode(&h.encode()).ok(), Some(h));
        let c = Challenge {
            node_id: 3,
            nonce: [5; 32],
        };
        assert_eq!(Challenge::decode(&c.encode()).ok(), Some(c));
    }

    #[test]
    fn a_hello_proves_the_secret_for_its_nonce_only() {
        let mut h = hello();
        let nonce = [1; 32];
        h.seal(b"secret", &nonce);
        assert!(h.proves(b"secret", &nonce));
        assert!(!h.proves(b"another", &nonce), "another secret");
        assert!(!h.proves(b"", &nonce), "no secret");
        assert!(
            !h.proves(b"secret", &[2; 32]),
            "replayed on another connection"
        );
        let mut posing = h.clone();
        posing.node_id = 8;
        assert!(
            !posing.proves(b"secret", &nonce),
            "the fields are covered too"
        );
        // Without a secret on either side, the hello still proves the empty one.
        h.seal(b"", &nonce);
        assert!(h.proves(b"", &nonce));
        assert!(!h.proves(b"secret", &nonce));
    }

    #[test]
    fn hello_refuses_garbage_and_every_truncation() {
        let bytes = Hello {
            cluster_id: "c1".into(),
            node_id: 7,
            http_addr: "x".into(),
            raft_addr: String::new(),
            apply_limits: String::new(),
            proof: [3; 32],
        }
        .encode();
        for n in 0..bytes.len() {
            assert!(Hello::decode(&bytes[..n]).is_err(), "prefix {n} accepted");
        }
        assert!(Hello::decode(b"GET / HTTP/1.1\r\n\r\n").is_err());
        let bytes = Challenge {
            node_id: 3,
            nonce: [4; 32],
        }
        .encode();
        for n in 0..bytes.len() {
            assert!(
                Challenge::decode(&bytes[..n]).is_err(),
                "prefix {n} accepted"
            );
        }
    }

    #[tokio::test]
    async fn read_frame_enforces_the_limit() {
        let mut wire = Vec::new();
        put_frame(&mut wire, &[1, 2, 3]);
        wire.extend_from_slice(&u32::MAX.to_be_bytes());
        let mut r = &wire[..];
        let mut buf = Vec::new();
        read_frame(&mut r, 16, &mut buf).await.ok();
        assert_eq!(buf, [1, 2, 3]);
        assert!(matches!(
            read_frame(&mut r, 16, &mut buf).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
