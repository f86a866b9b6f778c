//! The HTTP side of a cache, on its LAN address:
//!
//! - `GET /cache/obj/{hash}`: an object, whole or one byte range, within
//!   the workload limit (503 past it, with the load as JSON);
//! - `GET /cache/status`: what it holds, its load, where its objects came
//!   from;
//!
//! and on the referral server:
//!
//! - `POST /cache/refer`: a signed [`Ask`]; the answer is a signed
//!   [`msg::Referral`] (signature in the response's header);
//! - `POST /cache/update`: a signed [`Update`];
//! - `POST /cache/table`: the whole table (signed request), for
//!   `bond-ctl cache table`.

use std::{io::SeekFrom, sync::Arc};

use anyhow::Result;
use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, Path as UrlPath, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};

use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;

use super::{
    Cache, PeerReport, TableObject, TableReport,
    msg::{Ask, Object, Update},
};
use bond_proto::{now_ms, signed};

/// Bytes read and sent at a time.
const BLOCK: usize = 64 * 1024;
/// The path a referral answer is signed under.
pub const ANSWER_PATH: &str = "/cache/refer#answer";

pub async fn serve(cache: Arc<Cache>, listener: tokio::net::TcpListener) -> Result<()> {
    let app = Router::new()
        .route("/cache/obj/{hash}", get(object))
        .route("/cache/status", get(status))
        .route("/cache/refer", post(refer))
        .route("/cache/update", post(update))
        .route("/cache/table", post(table))
        .layer(DefaultBodyLimit::max(signed::MAX_BODY))
        .with_state(cache);
    axum::serve(listener, app).await?;
    Ok(())
}

/// The byte range `bytes=a-b`, `bytes=a-` or `bytes=-n` of an object of
/// `size` bytes, as `start..end`; None for anything else (several ranges,
/// other units, out of bounds), which is served whole.
pub fn parse_range(h: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = h.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        size.checked_sub(n.min(size))?..size
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>().ok()?.checked_add(1)?.min(size)
        };
        start..end
    };
    (r.start < r.end).then_some(r)
}

async fn object(
    State(c): State<Arc<Cache>>,
    UrlPath(hash): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if !Object::hash_ok(&hash) {
        return (StatusCode::BAD_REQUEST, "not an object hash\n").into_response();
    }
    let Some(obj) = c.store.by_hash(&hash) else {
        return (StatusCode::NOT_FOUND, "not cached here\n").into_response();
    };
    let Some(slot) = c.work.start() else {
        let mut r = (StatusCode::SERVICE_UNAVAILABLE, Json(c.work.load())).into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    };
    // Open now: the upload keeps the bytes even if the object is evicted.
    let file = match std::fs::File::open(c.store.path_of(&hash)) {
        Ok(f) => f,
        Err(_) => return (StatusCode::NOT_FOUND, "not cached here\n").into_response(),
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| parse_range(h, obj.size));
    let (status, span) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        None => (StatusCode::OK, 0..obj.size),
    };
    let mut file = tokio::fs::File::from_std(file);
    if file.seek(SeekFrom::Start(span.start)).await.is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let work = c.work.clone();
    let stream =
        ReaderStream::with_capacity(file.take(span.end - span.start), BLOCK).then(move |block| {
            // Naming the slot moves it into the closure: the upload holds
            // it until the stream is dropped, done or broken off.
            let _ = &slot;
            let work = work.clone();
            async move {
                if let Ok(b) = &block {
                    work.pace(b.len()).await;
                }
                block
            }
        });
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(span.end - span.start),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if range.is_some() {
        let v = format!("bytes {}-{}/{}", span.start, span.end - 1, obj.size);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&v).expect("ascii"),
        );
    }
    r
}

async fn status(State(c): State<Arc<Cache>>) -> Response {
    Json(c.status()).into_response()
}

fn open<T: serde::de::DeserializeOwned>(
    c: &Cache,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, signed::Refused> {
    let sig = headers
        .get(signed::SIG_HEADER)
        .and_then(|v| v.to_str().ok());
    signed::open(&c.key, path, body, sig, now_ms())
}

fn refused(e: signed::Refused) -> Response {
    (StatusCode::FORBIDDEN, format!("refused: {e}\n")).into_response()
}

fn no_table() -> Response {
    (StatusCode::NOT_FOUND, "not a referral server\n").into_response()
}

async fn refer(State(c): State<Arc<Cache>>, headers: HeaderMap, body: Bytes) -> Response {
    let ask: Ask = match open(&c, "/cache/refer", &headers, &body) {
        Ok(a) => a,
        Err(e) => return refused(e),
    };
    let Some(t) = &c.table else { return no_table() };
    let answer = t.lock().expect("lock").refer(ask.client, &ask.url, c.me);
    let (body, sig) = signed::sign(&c.key, ANSWER_PATH, &answer, now_ms());
    let mut r = Response::new(Body::from(body));
    r.headers_mut().insert(
        signed::SIG_HEADER,
        HeaderValue::from_str(&sig).expect("hex"),
    );
    r
}

async fn update(State(c): State<Arc<Cache>>, headers: HeaderMap, body: Bytes) -> Response {
    let u: Update = match open(&c, "/cache/update", &headers, &body) {
        Ok(u) => u,
        Err(e) => return refused(e),
    };
    let Some(t) = &c.table else { return no_table() };
    t.lock().expect("lock").apply(&u);
    StatusCode::NO_CONTENT.into_response()
}

async fn table(State(c): State<Arc<Cache>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = open::<()>(&c, "/cache/table", &headers, &body) {
        return refused(e);
    }
    let Some(t) = &c.table else { return no_table() };
    let t = t.lock().expect("lock");
    let report = TableReport {
        objects: t
            .dump()
            .into_iter()
            .map(|(object, sources)| TableObject { object, sources })
            .collect(),
        peers: t
            .peers()
            .into_iter()
            .filter_map(|p| {
                let i = t.peer_info(p)?;
                Some(PeerReport {
                    endpoint: p,
                    bps: i.bps,
                    load: i.load,
                    misses: i.misses,
                    strikes: i.strikes,
                    uses: i.uses,
                })
            })
            .collect(),
    };
    Json(report).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-99", 1000), Some(0..100));
        assert_eq!(parse_range("bytes=100-", 1000), Some(100..1000));
        assert_eq!(parse_range("bytes=-10", 1000), Some(990..1000));
        assert_eq!(parse_range("bytes=-5000", 1000), Some(0..1000));
        assert_eq!(parse_range("bytes=900-5000", 1000), Some(900..1000));
        for bad in [
            "bytes=1000-",
            "bytes=5-4",
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=18446744073709551615-18446744073709551615",
            "",
        ] {
            assert_eq!(parse_range(bad, 1000), None, "{bad}");
        }
        assert_eq!(parse_range("bytes=0-", 0), None);
    }
}
