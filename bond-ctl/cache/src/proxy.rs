//! The forward proxy (`cache.proxy`, loopback by default) for browsers,
//! package managers and `bond-ctl fetch`: a GET of an `http://` URL goes
//! through the cache ([`Cache::get`]); anything else (other methods,
//! ranges, requests with credentials) is passed to the origin untouched;
//! `CONNECT` (HTTPS) is tunnelled, and so not cached.

use std::sync::Arc;

use anyhow::Result;
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::TryStreamExt as _;

use super::Cache;

pub async fn serve(cache: Arc<Cache>, listener: tokio::net::TcpListener) -> Result<()> {
    let app = Router::new().fallback(handle).with_state(cache);
    axum::serve(listener, app).await?;
    Ok(())
}

fn bad(status: StatusCode, why: String) -> Response {
    (status, format!("bond-ctl proxy: {why}\n")).into_response()
}

async fn handle(State(c): State<Arc<Cache>>, req: Request) -> Response {
    if req.method() == Method::CONNECT {
        return tunnel(req);
    }
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return bad(
            StatusCode::BAD_REQUEST,
            format!("{uri}: this is a forward proxy; ask for an absolute http:// URL"),
        );
    }
    let url = uri.to_string();
    let h = req.headers();
    let shared = req.method() == Method::GET
        && !h.contains_key(header::AUTHORIZATION)
        && !h.contains_key(header::COOKIE)
        && !h.contains_key(header::RANGE);
    if shared {
        return match c.get(&url, h).await {
            Ok(r) => r,
            Err(e) => bad(StatusCode::BAD_GATEWAY, format!("{url}: {e:#}")),
        };
    }
    match pass(&c, req).await {
        Ok(r) => r,
        Err(e) => bad(StatusCode::BAD_GATEWAY, format!("{url}: {e:#}")),
    }
}

/// Headers that belong to one hop, not passed on.
const HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

fn end_to_end(h: &HeaderMap) -> impl Iterator<Item = (&header::HeaderName, &HeaderValue)> {
    h.iter().filter(|(k, _)| !HOP.contains(&k.as_str()))
}

/// The request, to the origin and back, untouched.
async fn pass(c: &Cache, req: Request) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())?;
    let mut out = c.http.request(method, parts.uri.to_string());
    for (k, v) in end_to_end(&parts.headers) {
        out = out.header(k.as_str(), v.as_bytes());
    }
    let body = body.into_data_stream().map_err(std::io::Error::other);
    let r = out.body(reqwest::Body::wrap_stream(body)).send().await?;
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status().as_u16())?;
    for (k, v) in r.headers() {
        if !HOP.contains(&k.as_str()) {
            resp.headers_mut().append(
                header::HeaderName::from_bytes(k.as_str().as_bytes())?,
                HeaderValue::from_bytes(v.as_bytes())?,
            );
        }
    }
    *resp.body_mut() = Body::from_stream(r.bytes_stream());
    Ok(resp)
}

/// `CONNECT host:port`: a byte tunnel once the client has its 200.
fn tunnel(req: Request) -> Response {
    let Some(to) = req.uri().authority().map(|a| a.to_string()) else {
        return bad(StatusCode::BAD_REQUEST, "CONNECT needs host:port".into());
    };
    tokio::spawn(async move {
        let up = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("proxy: CONNECT {to}: {e}");
                return;
            }
        };
        match tokio::net::TcpStream::connect(&to).await {
            Ok(mut server) => {
                let mut client = hyper_util::rt::TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            // The client hears it (its tunnel closes); one per request.
            Err(e) => tracing::debug!("proxy: CONNECT {to}: {e}"),
        }
    });
    StatusCode::OK.into_response()
}
