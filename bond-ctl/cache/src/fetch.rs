//! The client: where an object comes from.
//!
//! 1. Our own copy, if fresh (fetched or confirmed by the origin within
//!    `cache.fresh_s`, and the client did not ask to revalidate).
//! 2. Who holds it: the referral server, if it answers within
//!    `cache.referral_wait_ms`; else the LAN, in stages ([`Cache::lan_query`]).
//! 3. A stale version is confirmed with the origin first (a conditional
//!    GET: a 304 costs a few hundred bytes of uplink; a changed object
//!    simply comes from the origin).
//! 4. From the peers: the first few are probed at once (a ranged GET of
//!    the first [`PROBE`] bytes); the first to meet `cache.target_mbit`,
//!    or else the fastest, sends the rest; the whole is checked against
//!    the hash before anyone sees it. A peer at its limit answers 503 and
//!    is passed over; one that sends bad bytes is reported.
//! 5. Else the origin, streamed to the client as it arrives and cached.
//!
//! Every fetch is reported to the referral server (source, speeds, bad
//! peers), which is how it learns who holds what and how fast peers are.

use std::{
    collections::HashSet,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::Response,
};
use futures::StreamExt as _;
use tokio::sync::mpsc;

use super::{
    Cache,
    msg::{Ask, Decision, Lan, Object, Outcome, Referral, Update},
    serve::ANSWER_PATH,
};
use bond_proto::{now_ms, signed};

/// Bytes each probe asks for.
pub const PROBE: u64 = 128 * 1024;
/// Peers probed at once.
const PROBES: usize = 3;
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// A peer that sends nothing for this long has failed.
const SILENCE: Duration = Duration::from_secs(10);
/// An origin that sends nothing for this long has failed: it is behind
/// the slow links, shared by every fetch under way.
const ORIGIN_SILENCE: Duration = Duration::from_secs(60);
/// LAN query: how long the known peers have, then the broadcast.
const STAGE_KNOWN: Duration = Duration::from_millis(150);
const STAGE_BROADCAST: Duration = Duration::from_millis(400);
/// After the first "have", how long others may still answer.
const MORE_ANSWERS: Duration = Duration::from_millis(30);

/// Where a response came from (header on every proxied response).
pub const SOURCE_HEADER: &str = "x-bond-source";
/// How the holders were found: referral, lan, none.
pub const FOUND_HEADER: &str = "x-bond-found";

/// Response headers passed on from an origin.
const KEEP: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::ETAG,
    header::LAST_MODIFIED,
    header::CACHE_CONTROL,
    header::EXPIRES,
    header::LOCATION,
    header::CONTENT_DISPOSITION,
];

fn copy_headers(from: &reqwest::header::HeaderMap, to: &mut HeaderMap) {
    for k in KEEP {
        if let Some(v) = from.get(k.as_str()) {
            to.insert(
                k.clone(),
                HeaderValue::from_bytes(v.as_bytes()).expect("valid"),
            );
        }
    }
}

/// The client asked for a fresh copy.
fn wants_revalidation(h: &HeaderMap) -> bool {
    let cc = h
        .get(header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    cc.contains("no-cache")
        || cc.split(',').any(|d| d.trim() == "max-age=0")
        || h.get(header::PRAGMA).is_some_and(|v| v == "no-cache")
}

/// The origin's response may be kept and shared.
fn cacheable(r: &reqwest::Response) -> bool {
    let cc = r
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    r.status() == reqwest::StatusCode::OK
        && !cc.contains("no-store")
        && !cc.contains("private")
        && !r.headers().contains_key(reqwest::header::SET_COOKIE)
}

fn validator(h: &reqwest::header::HeaderMap) -> Option<String> {
    h.get(reqwest::header::ETAG)
        .or_else(|| h.get(reqwest::header::LAST_MODIFIED))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Holders found for a URL, and how.
struct Found {
    object: Option<Object>,
    sources: Vec<SocketAddr>,
    /// The referral server will send it itself (the first source): no
    /// probing.
    serve: bool,
    how: &'static str,
}

impl Cache {
    /// Answers a proxy client's GET of `url`.
    pub async fn get(self: &Arc<Self>, url: &str, req: &HeaderMap) -> Result<Response> {
        let fresh_ms = u64::from(self.cfg.fresh_s) * 1000;
        let revalidate = wants_revalidation(req);
        let mine = self.store.by_url(url);
        if let Some(o) = &mine
            && !revalidate
            && now_ms().saturating_sub(o.fetched_ms) < fresh_ms
        {
            self.stats.local.fetch_add(1, Ordering::Relaxed);
            return self.local(o, "local", "none");
        }
        let found = self.find(url).await;
        let mut object = match (found.object.clone(), mine.clone()) {
            (Some(a), Some(b)) if b.fetched_ms > a.fetched_ms => Some(b),
            (a, b) => a.or(b),
        };
        let Some(o) = &mut object else {
            return self.origin(url, None, found.how).await;
        };
        if revalidate || now_ms().saturating_sub(o.fetched_ms) >= fresh_ms {
            match self.revalidate(o).await {
                Ok(None) => {
                    o.fetched_ms = now_ms();
                    self.store.revalidated(url, o.fetched_ms);
                }
                Ok(Some(changed)) => return Ok(self.stream_origin(url, changed, found.how)),
                Err(e) => tracing::warn!(
                    "cache: {url}: origin unreachable, using the community's copy: {e:#}"
                ),
            }
        }
        if mine.as_ref().is_some_and(|m| m.hash == o.hash) {
            self.stats.local.fetch_add(1, Ordering::Relaxed);
            return self.local(o, "local", found.how);
        }
        let sources: Vec<SocketAddr> = found
            .sources
            .iter()
            .copied()
            .filter(|s| *s != self.me)
            .collect();
        if !sources.is_empty() {
            // Served by the referral server: it alone is asked first.
            let first = if found.serve { 1 } else { PROBES };
            match self.from_peers(o, &sources, first).await {
                Ok((peer, obj)) => {
                    self.stats.peer.fetch_add(1, Ordering::Relaxed);
                    self.stats.peer_bytes.fetch_add(obj.size, Ordering::Relaxed);
                    return self.local(&obj, &format!("peer {peer}"), found.how);
                }
                Err(e) => {
                    tracing::warn!("cache: {url}: no peer could send it ({e:#}): the origin")
                }
            }
        }
        self.origin(url, None, found.how).await
    }

    /// A response from our own copy of `o`.
    fn local(&self, o: &Object, source: &str, how: &str) -> Result<Response> {
        let file = std::fs::File::open(self.store.path_of(&o.hash))
            .with_context(|| format!("opening the cached {}", o.url))?;
        let body =
            tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024);
        let mut r = Response::new(Body::from_stream(body));
        let h = r.headers_mut();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(o.size));
        if let Some(ct) = o
            .content_type
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            h.insert(header::CONTENT_TYPE, ct);
        }
        if let Some(v) = o
            .validator
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            let k = if v.as_bytes().first() == Some(&b'"') || v.as_bytes().starts_with(b"W/") {
                header::ETAG
            } else {
                header::LAST_MODIFIED
            };
            h.insert(k, v);
        }
        tag(h, source, how);
        Ok(r)
    }

    /// Who holds `url`: the referral server's answer, or the LAN's.
    async fn find(self: &Arc<Self>, url: &str) -> Found {
        if let Some(r) = self.referral {
            match self.ask(url).await {
                Ok(answer) => {
                    let sources: Vec<_> = answer.sources.iter().map(|s| s.endpoint).collect();
                    self.known
                        .lock()
                        .expect("lock")
                        .learn(url, sources.iter().copied());
                    return Found {
                        object: answer.object.filter(|o| {
                            answer.decision != Decision::Origin && Object::hash_ok(&o.hash)
                        }),
                        sources,
                        serve: answer.decision == Decision::Serve,
                        how: "referral",
                    };
                }
                Err(e) => tracing::warn!(
                    "cache: referral server {r} did not answer within {} ms ({e:#}): asking the LAN",
                    self.cfg.referral_wait_ms
                ),
            }
        }
        self.lan_query(url).await
    }

    async fn ask(self: &Arc<Self>, url: &str) -> Result<Referral> {
        let ask = Ask {
            client: self.me,
            url: url.to_string(),
        };
        if let Some(t) = &self.table {
            return Ok(t.lock().expect("lock").refer(ask.client, url, self.me));
        }
        let to = self.referral.context("no referral server")?;
        let r = self.post(to, "/cache/refer", &ask).await?;
        let sig = r
            .headers()
            .get(signed::SIG_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = r.bytes().await?;
        Ok(signed::open(
            &self.key,
            ANSWER_PATH,
            &body,
            sig.as_deref(),
            now_ms(),
        )?)
    }

    /// Asks the LAN who holds `url`: first the peers we know of (those
    /// that held it when we last heard, and those that served us best),
    /// then, if none has it, everyone (broadcast). A peer that does not
    /// hold it but knows who did says so, and those are asked in turn.
    async fn lan_query(self: &Arc<Self>, url: &str) -> Found {
        self.stats.lan_queries.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).expect("random");
        let id = u64::from_ne_bytes(id);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.pending.lock().expect("lock").insert(id, tx);
        let q = Lan::Query {
            id,
            url: url.to_string(),
        };
        let mut asked = HashSet::from([self.me]);
        let mut haves: Vec<(Object, SocketAddr)> = Vec::new();
        let first: Vec<SocketAddr> = {
            let k = self.known.lock().expect("lock");
            let mut v = k.holders(url);
            v.extend(k.best(PROBES));
            v
        };
        for p in first {
            if asked.insert(p) {
                self.send_lan(&q, p).await;
            }
        }
        let everyone = SocketAddr::from((Ipv4Addr::BROADCAST, self.cfg.port));
        for (stage, wait) in [(0, STAGE_KNOWN), (1, STAGE_BROADCAST)] {
            if stage == 1 {
                if !haves.is_empty() {
                    break;
                }
                self.send_lan(&q, everyone).await;
            } else if asked.len() == 1 {
                continue;
            }
            let mut deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some((m, src))) = tokio::time::timeout_at(deadline, rx.recv()).await {
                match m {
                    Lan::Have {
                        object, endpoint, ..
                    } if object.url == url && Object::hash_ok(&object.hash) => {
                        if haves.is_empty() {
                            deadline = deadline.min(tokio::time::Instant::now() + MORE_ANSWERS);
                        }
                        haves.push((object, SocketAddr::new(src.ip(), endpoint.port())));
                    }
                    Lan::Know { peers, .. } => {
                        for p in peers.into_iter().take(8) {
                            if asked.insert(p) {
                                self.send_lan(&q, p).await;
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        self.pending.lock().expect("lock").remove(&id);
        // The newest version, and the peers holding it.
        let newest = haves
            .iter()
            .map(|(o, _)| o)
            .max_by_key(|o| o.fetched_ms)
            .cloned();
        let sources: Vec<SocketAddr> = match &newest {
            Some(n) => haves
                .iter()
                .filter(|(o, _)| o.hash == n.hash)
                .map(|(_, p)| *p)
                .collect(),
            None => Vec::new(),
        };
        self.known
            .lock()
            .expect("lock")
            .learn(url, sources.iter().copied());
        Found {
            object: newest,
            sources,
            serve: false,
            how: "lan",
        }
    }

    /// Asks the origin whether `o` is still current: None if so, else
    /// its (new) response.
    async fn revalidate(&self, o: &Object) -> Result<Option<reqwest::Response>> {
        // A timeout on the answer only: a changed object's body streams on.
        let mut req = self.http.get(&o.url);
        match o.validator.as_deref() {
            Some(v) if v.starts_with('"') || v.starts_with("W/") => {
                req = req.header(reqwest::header::IF_NONE_MATCH, v)
            }
            Some(v) => req = req.header(reqwest::header::IF_MODIFIED_SINCE, v),
            None => {}
        }
        let r = tokio::time::timeout(ORIGIN_SILENCE, req.send())
            .await
            .map_err(|_| anyhow!("no answer in {ORIGIN_SILENCE:?}"))??;
        Ok((r.status() != reqwest::StatusCode::NOT_MODIFIED).then_some(r))
    }

    /// Probes `sources` a few at a time (`first` of them in the first
    /// batch); the first to meet the target speed, or the fastest, sends
    /// the rest, which is verified. Returns the peer and the object, stored.
    async fn from_peers(
        self: &Arc<Self>,
        o: &Object,
        sources: &[SocketAddr],
        first: usize,
    ) -> Result<(SocketAddr, Object)> {
        let t0 = Instant::now();
        let target_bps = f64::from(self.cfg.target_mbit) * 125_000.0;
        let mut outcomes: Vec<(SocketAddr, Outcome)> = Vec::new();
        let mut result = Err(anyhow!("every peer failed"));
        let (head, tail) = sources.split_at(first.min(sources.len()));
        let batches = std::iter::once(head).chain(tail.chunks(PROBES));
        'batches: for batch in batches.filter(|b| !b.is_empty()) {
            let mut probes: futures::stream::FuturesUnordered<_> =
                batch.iter().map(|p| self.probe(*p, o)).collect();
            // (peer, first bytes, speed), best first once all are in.
            let mut ready: Vec<(SocketAddr, Bytes, f64)> = Vec::new();
            while let Some((p, r)) = probes.next().await {
                match r {
                    Ok((bytes, bps)) => {
                        outcomes.push((p, Outcome::Speed(bps)));
                        let fast = target_bps > 0.0 && bps >= target_bps;
                        ready.push((p, bytes, bps));
                        if fast {
                            break;
                        }
                    }
                    Err(out) => outcomes.push((p, out)),
                }
            }
            drop(probes);
            ready.sort_by(|a, b| b.2.total_cmp(&a.2));
            // The target-meeting one came last; it goes first.
            if target_bps > 0.0
                && let Some(i) = ready.iter().position(|r| r.2 >= target_bps)
            {
                let r = ready.remove(i);
                ready.insert(0, r);
            }
            for (p, first, _) in ready {
                match self.rest_from(p, o, first).await {
                    Ok((part, bps)) => {
                        if let Some(x) = outcomes.iter_mut().find(|x| x.0 == p) {
                            x.1 = Outcome::Speed(bps);
                        }
                        self.known.lock().expect("lock").good.insert(p, bps);
                        result = Ok((p, part));
                        break 'batches;
                    }
                    Err(out) => {
                        if out == Outcome::Corrupt {
                            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "cache: {p} sent {} with the wrong hash: reported",
                                o.url
                            );
                            self.known.lock().expect("lock").forget(&o.url, p);
                        }
                        if let Some(x) = outcomes.iter_mut().find(|x| x.0 == p) {
                            x.1 = out;
                        }
                    }
                }
            }
        }
        let stored = match result {
            Ok((p, part)) => {
                let obj = o.clone();
                self.keep(obj.clone(), &part)?;
                Ok((p, obj))
            }
            Err(e) => Err(e),
        };
        let elapsed = t0.elapsed().as_secs_f64().max(1e-6);
        self.report(Update::Got {
            client: self.me,
            object: o.clone(),
            cached: stored.is_ok(),
            source: stored.as_ref().ok().map(|(p, _)| *p),
            bps: o.size as f64 / elapsed,
            probes: outcomes,
        });
        stored
    }

    /// The first bytes of `o` from `p`, and the speed they came at.
    async fn probe(
        &self,
        p: SocketAddr,
        o: &Object,
    ) -> (SocketAddr, Result<(Bytes, f64), Outcome>) {
        let n = PROBE.min(o.size);
        let t0 = Instant::now();
        let r = async {
            let mut req = self
                .http
                .get(format!("http://{p}/cache/obj/{}", o.hash))
                .timeout(PROBE_TIMEOUT);
            if n > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes=0-{}", n - 1));
            }
            let r = req.send().await.map_err(|_| Outcome::Failed)?;
            if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                return Err(Outcome::Busy);
            }
            if !r.status().is_success() {
                return Err(Outcome::Failed);
            }
            let b = r.bytes().await.map_err(|_| Outcome::Failed)?;
            if b.len() as u64 != n {
                return Err(Outcome::Corrupt);
            }
            Ok(b)
        }
        .await;
        let secs = t0.elapsed().as_secs_f64().max(1e-6);
        (p, r.map(|b| (b, n as f64 / secs)))
    }

    /// The rest of `o` from `p` after `first`, into a part file, verified;
    /// the part and the speed of the whole transfer.
    async fn rest_from(
        &self,
        p: SocketAddr,
        o: &Object,
        first: Bytes,
    ) -> Result<(PathBuf, f64), Outcome> {
        let t0 = Instant::now();
        let part = self.store.part();
        let r = async {
            let mut f = std::fs::File::create(&part).map_err(|_| Outcome::Failed)?;
            let mut hasher = blake3::Hasher::new();
            f.write_all(&first).map_err(|_| Outcome::Failed)?;
            hasher.update(&first);
            let mut size = first.len() as u64;
            if size < o.size {
                let r = self
                    .http
                    .get(format!("http://{p}/cache/obj/{}", o.hash))
                    .header(reqwest::header::RANGE, format!("bytes={size}-"))
                    .send()
                    .await
                    .map_err(|_| Outcome::Failed)?;
                match r.status() {
                    reqwest::StatusCode::PARTIAL_CONTENT => {}
                    reqwest::StatusCode::SERVICE_UNAVAILABLE => return Err(Outcome::Busy),
                    _ => return Err(Outcome::Failed),
                }
                let mut body = r.bytes_stream();
                while let Some(b) = tokio::time::timeout(SILENCE, body.next())
                    .await
                    .map_err(|_| Outcome::Failed)?
                {
                    let b = b.map_err(|_| Outcome::Failed)?;
                    size += b.len() as u64;
                    if size > o.size {
                        return Err(Outcome::Corrupt);
                    }
                    f.write_all(&b).map_err(|_| Outcome::Failed)?;
                    hasher.update(&b);
                }
            }
            if size != o.size {
                return Err(Outcome::Failed);
            }
            if hasher.finalize().to_hex().as_str() != o.hash {
                return Err(Outcome::Corrupt);
            }
            Ok(o.size as f64 / t0.elapsed().as_secs_f64().max(1e-6))
        }
        .await;
        match r {
            Ok(bps) => Ok((part, bps)),
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }

    /// Keeps a verified part as `o`, and tells the referral server what
    /// that evicted.
    fn keep(self: &Arc<Self>, o: Object, part: &Path) -> Result<()> {
        let evicted = self.store.insert(o, part)?;
        if !evicted.is_empty() {
            self.report(Update::Evicted {
                peer: self.me,
                hashes: evicted.into_iter().map(|o| o.hash).collect(),
            });
        }
        Ok(())
    }

    /// GETs `url` from the origin (or uses `resp`, already had).
    async fn origin(
        self: &Arc<Self>,
        url: &str,
        resp: Option<reqwest::Response>,
        how: &str,
    ) -> Result<Response> {
        let resp = match resp {
            Some(r) => r,
            None => self
                .http
                .get(url)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?,
        };
        Ok(self.stream_origin(url, resp, how))
    }

    /// Streams an origin's response to the client as it arrives; a
    /// cacheable one is written and hashed on the way, kept, and reported.
    /// The download goes on if the client leaves, so the cache still gets
    /// it.
    fn stream_origin(self: &Arc<Self>, url: &str, resp: reqwest::Response, how: &str) -> Response {
        let status = resp.status();
        let keep = cacheable(&resp);
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        copy_headers(resp.headers(), r.headers_mut());
        tag(r.headers_mut(), "origin", how);
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let validator = validator(resp.headers());
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let (c, url) = (self.clone(), url.to_string());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let part = c.store.part();
            let mut file = if keep {
                std::fs::File::create(&part).ok()
            } else {
                None
            };
            let mut hasher = blake3::Hasher::new();
            let mut size = 0u64;
            let mut client = Some(tx);
            let mut body = resp.bytes_stream();
            loop {
                let next = tokio::time::timeout(ORIGIN_SILENCE, body.next()).await;
                let why = match next {
                    Ok(Some(Ok(b))) => Ok(b),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => Err(format!("{e:#}")),
                    Err(_) => Err(format!("silent for {ORIGIN_SILENCE:?}")),
                };
                let b = match why {
                    Ok(b) => b,
                    Err(why) => {
                        tracing::warn!("cache: {url}: origin broke off after {size} bytes: {why}");
                        if let Some(tx) = client {
                            let _ = tx.send(Err(std::io::Error::other(why))).await;
                        }
                        let _ = std::fs::remove_file(&part);
                        return;
                    }
                };
                size += b.len() as u64;
                if let Some(f) = &mut file {
                    hasher.update(&b);
                    if f.write_all(&b).is_err() {
                        file = None;
                    }
                }
                if let Some(tx) = &client
                    && tx.send(Ok(b)).await.is_err()
                {
                    client = None; // gone: finish for the cache
                    if file.is_none() {
                        return;
                    }
                }
            }
            drop(client);
            c.stats.origin.fetch_add(1, Ordering::Relaxed);
            c.stats.origin_bytes.fetch_add(size, Ordering::Relaxed);
            if file.is_none() {
                let _ = std::fs::remove_file(&part);
                return;
            }
            let o = Object {
                url: url.clone(),
                validator,
                hash: hasher.finalize().to_hex().to_string(),
                size,
                content_type,
                fetched_ms: now_ms(),
            };
            let kept = c.keep(o.clone(), &part);
            if let Err(e) = &kept {
                tracing::warn!("cache: keeping {url}: {e:#}");
            }
            c.report(Update::Got {
                client: c.me,
                object: o,
                cached: kept.is_ok(),
                source: None,
                bps: size as f64 / t0.elapsed().as_secs_f64().max(1e-6),
                probes: Vec::new(),
            });
        });
        let body =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
        *r.body_mut() = Body::from_stream(body);
        r
    }
}

fn tag(h: &mut HeaderMap, source: &str, how: &str) {
    if let Ok(v) = HeaderValue::from_str(source) {
        h.insert(SOURCE_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(how) {
        h.insert(FOUND_HEADER, v);
    }
}

/// Fetches `url` through a running agent's proxy into `out`; for
/// `bond-ctl fetch`. Progress goes to `progress`.
pub async fn through_proxy(
    proxy: SocketAddr,
    url: &str,
    out: &Path,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<FetchReport> {
    let t0 = Instant::now();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}"))?)
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    let r = client.get(url).send().await.map_err(|e| {
        if e.is_connect() {
            anyhow!("no proxy at {proxy}: is the agent running, with a [cache] table? ({e})")
        } else {
            anyhow!("GET {url}: {e}")
        }
    })?;
    if !r.status().is_success() {
        bail!("GET {url}: {}", r.status());
    }
    let header = |name| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_string()
    };
    let (source, found) = (header(SOURCE_HEADER), header(FOUND_HEADER));
    let total = r.content_length();
    let part = out.with_extension("bond-part");
    let mut f =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut got = 0u64;
    let mut body = r.bytes_stream();
    while let Some(b) = body.next().await {
        let b = b.with_context(|| format!("GET {url}: broken off after {got} bytes"))?;
        f.write_all(&b)?;
        hasher.update(&b);
        got += b.len() as u64;
        progress(got, total);
    }
    if let Some(t) = total
        && t != got
    {
        bail!("GET {url}: {got} of {t} bytes");
    }
    std::fs::rename(&part, out)?;
    Ok(FetchReport {
        url: url.to_string(),
        bytes: got,
        seconds: t0.elapsed().as_secs_f64(),
        source,
        found,
        blake3: hasher.finalize().to_hex().to_string(),
    })
}

/// What `bond-ctl fetch --json` prints.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct FetchReport {
    pub url: String,
    pub bytes: u64,
    pub seconds: f64,
    /// local, origin, or `peer ADDRESS`.
    pub source: String,
    /// How the holders were found: referral, lan, none.
    pub found: String,
    pub blake3: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revalidation_requests() {
        let h = |k: HeaderName, v: &str| {
            let mut m = HeaderMap::new();
            m.insert(k, HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(wants_revalidation(&h(header::CACHE_CONTROL, "max-age=0")));
        assert!(wants_revalidation(&h(header::CACHE_CONTROL, "No-Cache")));
        assert!(wants_revalidation(&h(header::PRAGMA, "no-cache")));
        assert!(!wants_revalidation(&h(
            header::CACHE_CONTROL,
            "max-age=600"
        )));
        assert!(!wants_revalidation(&HeaderMap::new()));
    }
}
