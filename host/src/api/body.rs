//! A request body that is read to its end even when the handler answers without it.
//!
//! A handler that answers before reading the whole body (a follower's redirect, `413`, a
//! refused name) lets the body go, and hyper then stops reading and closes the connection with
//! bytes unread. The kernel answers those bytes with a reset, and a client still sending (the
//! CLI uploading a module to a follower) gets "broken pipe" instead of the answer. Dropped
//! unfinished, this body is read on in the background, within bounds, so the answer arrives.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

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
