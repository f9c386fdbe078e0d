//! Request bodies: read whole within bounds of size, time and node-wide memory, and read to
//! their end even when the handler answers without them.
//!
//! A handler that answers before reading the whole body (a follower's redirect, `413`, a
//! refused name) lets the body go, and hyper then stops reading and closes the connection with
//! bytes unread. The kernel answers those bytes with a reset, and a client still sending (the
//! CLI uploading a module to a follower) gets "broken pipe" instead of the answer. Dropped
//! unfinished, this body is read on in the background, within bounds, so the answer arrives.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::{Request, header};

use super::ApiError;

/// Longest a client may go without sending any of a request's body it owes.
pub const BODY_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A body must also arrive whole within `BODY_STALL_TIMEOUT` plus its length at this rate, so a
/// client trickling a byte now and then cannot hold a connection (and its buffer) for ever.
pub const BODY_MIN_RATE: u64 = 64 * 1024;
/// Request bodies being read at once, node-wide: past it new ones are refused with `503
/// overloaded` (and Retry-After), so many clients sending large bodies cannot exhaust memory.
/// Larger than any one body, so a lone request always fits.
pub const BODY_BYTES_IN_FLIGHT: usize = 256 << 20;

/// Read at most this much of an unwanted body (a module's 16 MiB with room to spare)...
const DRAIN_MAX_BYTES: u64 = 64 << 20;
/// ...for at most this long; then the connection closes as it would have at once.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

pub struct RequestBody(Option<Incoming>);

impl RequestBody {
    pub fn new(body: Incoming) -> Self {
        RequestBody(Some(body))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().0.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(body) = self.0.take() else { return };
        if body.is_end_stream() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = tokio::time::timeout(DRAIN_DEADLINE, drain(body)).await;
            });
        }
    }
}

async fn drain(mut body: Incoming) {
    let mut read = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, |d| d.len() as u64);
        if read > DRAIN_MAX_BYTES {
            return;
        }
    }
}

/// The node's budget of request-body bytes being read (`BODY_BYTES_IN_FLIGHT`).
#[derive(Clone)]
pub struct BodyBudget {
    used: Arc<AtomicUsize>,
    cap: usize,
}

impl Default for BodyBudget {
    fn default() -> Self {
        BodyBudget::new(BODY_BYTES_IN_FLIGHT)
    }
}

impl BodyBudget {
    pub fn new(cap: usize) -> Self {
        BodyBudget {
            used: Arc::new(AtomicUsize::new(0)),
            cap,
        }
    }

    fn permit(&self) -> BodyPermit {
        BodyPermit {
            used: self.used.clone(),
            cap: self.cap,
            bytes: 0,
        }
    }
}

/// Bytes of one body counted against the budget, until dropped.
#[derive(Debug)]
pub struct BodyPermit {
    used: Arc<AtomicUsize>,
    cap: usize,
    bytes: usize,
}

impl BodyPermit {
    fn grow(&mut self, n: usize) -> bool {
        let cap = self.cap;
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= cap)
            });
        if taken.is_ok() {
            self.bytes += n;
        }
        taken.is_ok()
    }
}

impl Drop for BodyPermit {
    fn drop(&mut self) {
        self.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Reads the whole body. Refuses more than `limit` bytes with 413; with 408, a client that goes
/// `BODY_STALL_TIMEOUT` without sending any of it or sends it slower than `BODY_MIN_RATE`
/// allows; with 503 `overloaded`, a body that does not fit in the node's budget. The permit
/// holds the body's bytes in the budget until the caller has handed them on.
pub async fn read_body<B>(
    req: Request<B>,
    limit: usize,
    budget: &BodyBudget,
) -> Result<(Bytes, BodyPermit), ApiError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let expected = declared.unwrap_or(limit as u64);
    let whole =
        BODY_STALL_TIMEOUT + Duration::from_millis(expected.saturating_mul(1000) / BODY_MIN_RATE);
    let deadline = tokio::time::Instant::now() + whole;
    let mut permit = budget.permit();
    let mut body = Limited::new(req.into_body(), limit);
    // The usual body is one frame, kept as is; only a second one starts a list to join.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    loop {
        let stall = tokio::time::Instant::now() + BODY_STALL_TIMEOUT;
        let frame = match tokio::time::timeout_at(stall.min(deadline), body.frame()).await {
            Err(_) if stall < deadline => return Err(ApiError::body_stalled(BODY_STALL_TIMEOUT)),
            Err(_) => return Err(ApiError::body_too_slow(whole)),
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(ApiError::too_large(limit));
            }
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!("reading the body: {e}")));
            }
        };
        // Trailers carry no data.
        if let Ok(data) = frame.into_data() {
            if !permit.grow(data.len()) {
                return Err(ApiError::bodies_overloaded());
            }
            if first.is_none() {
                first = Some(data);
            } else {
                more.push(data);
            }
        }
    }
    let body = match first {
        None => Bytes::new(),
        Some(only) if more.is_empty() => only,
        Some(head) => {
            // `concat` allocates exactly the body's size: the budget counts no spare capacity.
            more.insert(0, head);
            Bytes::from(more.concat())
        }
    };
    Ok((body, permit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use std::convert::Infallible;

    /// A body whose client sent the headers and then nothing.
    struct Stalled;

    impl hyper::body::Body for Stalled {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_times_out_with_408() {
        let req = Request::new(Stalled);
        let budget = BodyBudget::default();
        let read = tokio::time::timeout(Duration::from_secs(600), read_body(req, 1024, &budget));
        let err = read
            .await
            .expect("read_body gave up by itself")
            .expect_err("a stalled body must not be read");
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code, "timeout");
    }

    /// A body sent in pieces, each `gap` after the previous one.
    struct Trickle {
        pieces: std::collections::VecDeque<&'static [u8]>,
        gap: Duration,
        wait: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl hyper::body::Body for Trickle {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
            let gap = self.gap;
            let wait = self
                .wait
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.wait = None;
            Poll::Ready(
                self.pieces
                    .pop_front()
                    .map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p)))),
            )
        }
    }

    fn trickle(pieces: &[&'static [u8]], gap_secs: u64) -> Trickle {
        Trickle {
            pieces: pieces.iter().copied().collect(),
            gap: Duration::from_secs(gap_secs),
            wait: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_is_read_whole_within_its_deadline_and_no_longer() {
        const LIMIT: usize = 4 << 20; // 30 s + 4 MiB at 64 KiB/s = 94 s
        let budget = BodyBudget::default();
        // Five pieces 15 s apart: 75 s in all, never 30 s of silence.
        let body = trickle(&[b"ab", b"cd", b"ef", b"gh", b"ij"], 15);
        let got = read_body(Request::new(body), LIMIT, &budget).await;
        assert_eq!(
            got.ok().map(|(b, _)| b),
            Some(Bytes::from_static(b"abcdefghij"))
        );
        // 40 s of silence is too long.
        let err = read_body(Request::new(trickle(&[b"ab"], 40)), LIMIT, &budget)
            .await
            .expect_err("40 s of silence");
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert!(
            err.message.starts_with("the request body stalled"),
            "{}",
            err.message
        );
        // A byte every 20 s never stalls, but the body is not whole after 94 s.
        let start = tokio::time::Instant::now();
        let err = read_body(Request::new(trickle(&[&b"a"[..]; 10], 20)), LIMIT, &budget)
            .await
            .expect_err("200 s for 10 bytes");
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert!(err.message.contains("whole within 94 s"), "{}", err.message);
        assert_eq!(start.elapsed().as_secs(), 94);
        // A declared length sets the deadline: 10 bytes get 30 s, however high the limit.
        let mut req = Request::new(trickle(&[b"abcde", b"fghij"], 20));
        req.headers_mut().insert(
            header::CONTENT_LENGTH,
            header::HeaderValue::from_static("10"),
        );
        let err = read_body(req, LIMIT, &budget)
            .await
            .expect_err("40 s for 10 bytes");
        assert!(err.message.contains("whole within 30 s"), "{}", err.message);
    }

    #[tokio::test]
    async fn bodies_beyond_the_node_budget_are_refused_until_one_is_done() {
        let budget = BodyBudget::new(10);
        let (first, held) = read_body(Request::new(trickle(&[b"12345678"], 0)), 64, &budget)
            .await
            .expect("fits");
        assert_eq!(first.len(), 8);
        let err = read_body(Request::new(trickle(&[b"12", b"34"], 0)), 64, &budget)
            .await
            .expect_err("8 + 4 > 10");
        assert_eq!(
            (err.status, err.code),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        assert_eq!(
            budget.used.load(Ordering::Acquire),
            8,
            "the refused body gave its bytes back"
        );
        drop(held);
        let (again, _held) = read_body(Request::new(trickle(&[b"12", b"34"], 0)), 64, &budget)
            .await
            .expect("room again");
        assert_eq!(again.as_ref(), b"1234");
    }
}
