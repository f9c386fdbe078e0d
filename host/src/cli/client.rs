//! A small HTTP/1.1 client for the CLI: one request per connection, following redirects to the
//! leader.

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long the CLI waits for one answer (a deploy compiles the module first).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Reply {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

/// Sends one request and follows up to five 307/308 redirects, re-sending the body.
pub async fn request(
    method: Method,
    url: &str,
    body: Bytes,
    headers: &[(&str, String)],
) -> anyhow::Result<Reply> {
    let mut url = url.to_owned();
    for _ in 0..5 {
        let reply = tokio::time::timeout(
            REQUEST_TIMEOUT,
            once(method.clone(), &url, body.clone(), headers),
        )
        .await
        .map_err(|_| anyhow!("no answer from {url} within {REQUEST_TIMEOUT:?}"))??;
        if matches!(
            reply.status,
            StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
        ) && let Some(loc) = reply
            .headers
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
        {
            url = loc.to_owned();
            continue;
        }
        return Ok(reply);
    }
    bail!("too many redirects (last: {url})")
}

async fn once(
    method: Method,
    url: &str,
    body: Bytes,
    headers: &[(&str, String)],
) -> anyhow::Result<Reply> {
    let uri: Uri = url.parse().with_context(|| format!("bad url {url:?}"))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        bail!("only http:// urls are supported, not {url}");
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("url {url:?} has no host"))?
        .clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .with_context(|| format!("connecting to {authority} (is the node running?)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, authority.as_str());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

/// Turns an error reply into a readable message: `code: message` from the JSON error body.
pub fn describe_error(reply: &Reply) -> String {
    let parsed: Option<(String, String)> = serde_json::from_slice::<serde_json::Value>(&reply.body)
        .ok()
        .and_then(|v| {
            let e = v.get("error")?;
            Some((
                e.get("code")?.as_str()?.to_owned(),
                e.get("message")?.as_str()?.to_owned(),
            ))
        });
    match parsed {
        Some((code, message)) => format!("{} {code}: {message}", reply.status.as_u16()),
        None => format!(
            "{}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body).trim()
        ),
    }
}
