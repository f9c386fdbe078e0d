//! Accepting and keeping HTTP connections: how many at once, what a stop does to them, and the
//! deadlines that keep a client from holding one without progress.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::Request;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use super::body::RequestBody;
use super::{ApiState, handle};

/// Time a client has to send a request's headers (also the longest a keep-alive connection may
/// sit idle between requests: hyper starts this clock as soon as it waits for the next head).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest that data this node sent may stay unacknowledged (also a zero window: a client that
/// stops reading its responses) before the kernel drops the connection.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves HTTP/1.1 on `listener` until the task is dropped, at most `max_connections` at once.
/// At the cap the node stops accepting: further clients (health checks too) wait in the
/// kernel's listen backlog until a connection closes, as behind Go's `LimitListener`, which etcd
/// puts on its client listener. Memory then stays bounded however many clients arrive, and no
/// client holds a slot for long without making progress: headers, body and unacknowledged
/// responses each have a deadline.
///
/// Once `stop` turns true the node accepts no more connections; requests in flight are
/// answered (idle connections close at once), and `serve` returns when every connection has
/// ended: an operator's stop does not reset a client mid-request.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    max_connections: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let budget = connection_budget(max_connections);
    let slots = Arc::new(tokio::sync::Semaphore::new(budget));
    loop {
        let accepted = tokio::select! {
            _ = stopped(&mut stop) => break,
            // The semaphore is never closed, so this waits rather than fails.
            accepted = async {
                let slot = slots.clone().acquire_owned().await.ok()?;
                Some((slot, listener.accept().await))
            } => accepted,
        };
        let Some((slot, accepted)) = accepted else {
            break;
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        tune(&stream);
        let state = state.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                let req = req.map(RequestBody::new);
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            // A client that never finishes its headers must not hold a connection forever.
            // Half-closes are allowed: otherwise, while a request is in flight, hyper polls the
            // socket for an early EOF and reserves a new 8 KiB read buffer for it every time
            // (the request still holds slices of the old one), a malloc and a free per task.
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .half_close(true);
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), svc));
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stopped(&mut stop) => {
                    // Finish the request in flight, then close (at once if idle).
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, "http connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every slot back: every connection has ended.
    let _ = slots
        .acquire_many(u32::try_from(budget).unwrap_or(u32::MAX))
        .await;
}

/// Resolves once `stop` turns true; never if its sender is dropped instead (a dropped
/// `RunningNode` keeps serving, as documented there).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|&s| s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Descriptors kept for everything but client connections: peers, the log, the runtime's own.
const RESERVED_DESCRIPTORS: u64 = 256;

/// `wanted` connections, fewer if the process's descriptor limit cannot hold them: at the limit
/// `accept` would fail anyway, and so could peer dials and the log.
fn connection_budget(wanted: usize) -> usize {
    let wanted = wanted.max(1);
    let Some(limit) = crate::fd_limit::soft() else {
        return wanted;
    };
    let fit = fit_descriptors(wanted, limit);
    if fit < wanted {
        tracing::warn!(
            wanted,
            serving = fit,
            descriptor_limit = limit,
            "fewer HTTP connections than --max-connections: the descriptor limit is lower"
        );
    }
    fit
}

/// At most `wanted`, leaving `RESERVED_DESCRIPTORS` of `limit` free (and never below 16).
fn fit_descriptors(wanted: usize, limit: u64) -> usize {
    let fit = limit.saturating_sub(RESERVED_DESCRIPTORS).max(16);
    wanted.min(usize::try_from(fit).unwrap_or(usize::MAX))
}

/// Socket options of an accepted client connection.
fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(SEND_TIMEOUT));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_bounds_the_connections() {
        assert_eq!(fit_descriptors(4096, 1024), 768);
        assert_eq!(fit_descriptors(100, 1024), 100);
        assert_eq!(
            fit_descriptors(4096, 100),
            16,
            "a tiny limit still serves some"
        );
        assert_eq!(fit_descriptors(4096, u64::MAX), 4096);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_connections_drop_clients_that_stop_reading() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (_client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (stream, _) = accepted?;
        tune(&stream);
        let sock = socket2::SockRef::from(&stream);
        assert_eq!(sock.tcp_user_timeout()?, Some(SEND_TIMEOUT));
        assert!(stream.nodelay()?);
        Ok(())
    }
}
