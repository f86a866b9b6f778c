//! The distribution service every terminal runs (and the main server, for
//! the length of a transfer): it serves the chunks it holds, takes
//! transport requests, fetches, verifies and stores files, and passes the
//! requests on down its tree.
//!
//! HTTP, on the terminal's LAN address:
//!
//! - `POST /dist/request`: a signed [`TransportRequest`];
//! - `GET /dist/{root}/manifest`: the manifest of a file held or being
//!   fetched;
//! - `GET /dist/{root}/stream/{index}/{of}/{from}`: the chunks of stripe
//!   `index` of `of` (the whole file: 0 of 1) from chunk `from` on, sealed,
//!   one [`frame`] each, in order. A chunk not stored yet is waited for
//!   (up to [`CHUNK_WAIT`], with a heartbeat frame every [`HEARTBEAT`] so
//!   the child can tell waiting from dead), so a
//!   relay serves its subtree from its first chunk on, not from its last. One connection per child and
//!   stripe, busy from first chunk to last: a request per chunk left each
//!   connection idle between chunks and many flows fighting for the
//!   upload's queue;
//! - `POST /dist/report`: a signed [`Report`] (the main server only).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures::StreamExt as _;
use tokio::sync::{Notify, mpsc};

use super::{
    chunk::{Hash, Manifest, Seal},
    frame::{self, Frame},
    msg::{Report, Stripe, Target, TransportRequest},
    plan::{self, Assignment},
};
use bond_proto::{CommunityKey, now_ms, signed};

/// How long a chunk request waits for a chunk its relay is still fetching.
pub const CHUNK_WAIT: Duration = Duration::from_secs(20);
/// Connecting to and posting a request to a child.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Waiting for a stream's answer, or its next frame: a source that sends
/// nothing, not even a heartbeat, for this long is taken for dead.
const SILENCE: Duration = Duration::from_secs(4);
/// A stream waiting for a chunk sends an empty frame this often.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Failed streams from a relay before the main server becomes the source.
const FAILURES_BEFORE_FALLBACK: u32 = 2;
/// Failed streams in a row, with no chunk between, before the transfer is
/// given up.
const TRIES: u32 = 8;
/// How often a terminal reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A file held or being fetched.
struct Job {
    root: Hash,
    manifest: Manifest,
    /// The file (complete), or its `.part` while it is fetched; the open
    /// handle outlives the rename.
    file: std::fs::File,
    /// Where the file is now.
    path: Mutex<PathBuf>,
    have: Mutex<Have>,
    /// Wakes chunk requests waiting for a chunk.
    stored: Notify,
    /// The stripes being fetched (the whole file is stripe 0 of 1).
    claimed: Mutex<Vec<Stripe>>,
    /// When the first request for it came, and when its first chunk was
    /// stored (ms after that).
    since: Instant,
    first_ms: std::sync::OnceLock<u64>,
    last_progress: Mutex<Instant>,
}

struct Have {
    bits: Vec<bool>,
    count: usize,
}

/// The whole file, as a stripe.
const WHOLE: Stripe = Stripe { index: 0, of: 1 };

impl Job {
    fn new(root: Hash, manifest: Manifest, file: std::fs::File, path: PathBuf, have: bool) -> Self {
        let n = manifest.chunks.len();
        Self {
            root,
            manifest,
            file,
            path: Mutex::new(path),
            have: Mutex::new(Have {
                bits: vec![have; n],
                count: if have { n } else { 0 },
            }),
            stored: Notify::new(),
            claimed: Mutex::new(Vec::new()),
            since: Instant::now(),
            first_ms: std::sync::OnceLock::new(),
            last_progress: Mutex::new(Instant::now()),
        }
    }

    fn has(&self, i: u32) -> bool {
        self.have.lock().expect("lock").bits.get(i as usize) == Some(&true)
    }

    fn count(&self) -> usize {
        self.have.lock().expect("lock").count
    }

    fn complete(&self) -> bool {
        self.count() == self.manifest.chunks.len()
    }

    fn read(&self, i: u32) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; self.manifest.len_of(i)];
        self.file
            .read_exact_at(&mut buf, self.manifest.offset_of(i))?;
        Ok(buf)
    }

    /// Writes verified chunk `i`; true if it was the file's last one.
    fn store(&self, i: u32, data: &[u8]) -> std::io::Result<bool> {
        self.file.write_all_at(data, self.manifest.offset_of(i))?;
        let last = {
            let mut h = self.have.lock().expect("lock");
            let fresh = !std::mem::replace(&mut h.bits[i as usize], true);
            h.count += usize::from(fresh);
            fresh && h.count == h.bits.len()
        };
        let _ = self.first_ms.set(self.since.elapsed().as_millis() as u64);
        self.stored.notify_waiters();
        Ok(last)
    }

    /// Claims `stripe` for fetching; false if it is being fetched already.
    fn claim(&self, stripe: Stripe) -> bool {
        let mut c = self.claimed.lock().expect("lock");
        if c.contains(&stripe) || c.contains(&WHOLE) {
            return false;
        }
        c.push(stripe);
        true
    }

    fn release(&self, stripe: Stripe) {
        self.claimed.lock().expect("lock").retain(|s| *s != stripe);
    }

    /// True at most every [`PROGRESS_EVERY`].
    fn progress_due(&self) -> bool {
        let mut last = self.last_progress.lock().expect("lock");
        let due = last.elapsed() >= PROGRESS_EVERY;
        if due {
            *last = Instant::now();
        }
        due
    }
}

pub struct Service {
    key: CommunityKey,
    seal: Seal,
    /// Where received files go.
    dir: PathBuf,
    /// This service's address, as its children fetch from it.
    me: SocketAddr,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    http: reqwest::Client,
    /// The main server's side: reports go here.
    reports: Option<mpsc::Sender<Report>>,
}

impl Service {
    pub fn new(
        key: &CommunityKey,
        dir: &Path,
        me: SocketAddr,
        reports: Option<mpsc::Sender<Report>>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Arc::new(Self {
            key: key.clone(),
            seal: Seal::new(key),
            dir: dir.to_path_buf(),
            me,
            jobs: Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            reports,
        }))
    }

    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// Serves `path`, complete, as the file `manifest` describes (the main
    /// server's own copy).
    pub fn offer(&self, manifest: Manifest, path: &Path) -> Result<Hash> {
        let root = manifest.root();
        let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
        let job = Job::new(root, manifest, file, path.to_path_buf(), true);
        self.jobs
            .lock()
            .expect("lock")
            .insert(hex::encode(root), Arc::new(job));
        Ok(root)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/dist/request", post(take_request))
            .route("/dist/report", post(take_report))
            .route("/dist/{root}/manifest", get(serve_manifest))
            .route("/dist/{root}/stream/{index}/{of}/{from}", get(serve_stream))
            .layer(DefaultBodyLimit::max(signed::MAX_BODY))
            .with_state(self.clone())
    }

    /// Listens on `addr` until the process ends.
    pub async fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) -> Result<()> {
        use axum::serve::ListenerExt as _;
        // Chunks go out whole, not held back for the previous one's ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, self.router()).await?;
        Ok(())
    }

    async fn post<T: serde::Serialize>(&self, to: SocketAddr, path: &str, m: &T) -> Result<()> {
        let (body, sig) = signed::sign(&self.key, path, m, now_ms());
        let r = self
            .http
            .post(format!("http://{to}{path}"))
            .header(signed::SIG_HEADER, sig)
            .body(body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("{to}{path}: {}", r.status());
        }
        Ok(())
    }

    /// Sends a report to the main server; a lost report is logged (the
    /// main server notices what it misses).
    async fn report(&self, main: SocketAddr, r: Report) {
        if let Err(e) = self.post(main, "/dist/report", &r).await {
            tracing::warn!("dist: report to {main}: {e:#}");
        }
    }

    /// Sends transport requests to the children of `share`, each with its
    /// own share and this service as the source. A child that cannot be
    /// reached is reported and replaced by the fastest of its share
    /// ([`plan::promote`]).
    pub async fn fan_out(self: &Arc<Self>, req: &TransportRequest, share: &[Target]) {
        let deal = if req.stripe.is_some() {
            plan::split_filled
        } else {
            plan::split
        };
        let tasks: Vec<_> = deal(share, req.fanout as usize)
            .into_iter()
            .map(|a| {
                let (s, req) = (self.clone(), req.clone());
                tokio::spawn(async move { s.send_with_promotion(req, a).await })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Sends `req` to `a.target` with `a.share` to pass on, promoting past
    /// a target that cannot be reached.
    pub async fn send_with_promotion(&self, req: TransportRequest, mut a: Assignment<Target>) {
        let mut failed = Vec::new();
        loop {
            let child = TransportRequest {
                source: self.me,
                target: a.target.id.clone(),
                share: a.share.clone(),
                sent_ms: now_ms(),
                ..req.clone()
            };
            match self.post(a.target.endpoint, "/dist/request", &child).await {
                Ok(()) => return,
                Err(e) => {
                    let why = format!("unreachable from {}: {e:#}", self.me);
                    tracing::warn!("dist: {}: {why}", a.target.id);
                    let r = Report::Failed {
                        transfer: req.transfer,
                        id: a.target.id.clone(),
                        by: self.me.to_string(),
                        why,
                    };
                    self.report(req.main, r).await;
                    match plan::promote(a, &mut failed) {
                        Some(p) => a = p,
                        None => return,
                    }
                }
            }
        }
    }

    /// Carries out a transport request: acknowledge, pass it on, fetch
    /// and verify the chunks it is about, report.
    async fn run(self: Arc<Self>, req: TransportRequest) {
        let main = req.main;
        let ack = Report::Ack {
            transfer: req.transfer,
            id: req.target.clone(),
            sent_ms: req.sent_ms,
            stripe: req.stripe.map(|s| s.index),
        };
        self.report(main, ack).await;
        let stripe = req.stripe.unwrap_or(WHOLE);
        let job = match self.job_for(&req).await {
            Ok(job) => job,
            Err(e) => return self.failed(&req, &e).await,
        };
        // The subtree starts now: its requests wait for chunks as they come.
        let (s, r) = (self.clone(), req.clone());
        tokio::spawn(async move { s.fan_out(&r, &r.share).await });
        if job.complete() {
            // Held already (an earlier transfer, or a repeated request).
            self.done(&req, &job, self.me).await;
            return;
        }
        if !job.claim(stripe) {
            return; // a repeated request: the first one is fetching
        }
        match self.fetch(&req, &job, stripe).await {
            Ok(Some(source)) => self.done(&req, &job, source).await,
            Ok(None) => {} // another stripe stored the last chunk
            Err(e) => {
                job.release(stripe);
                self.failed(&req, &e).await;
            }
        }
    }

    async fn failed(&self, req: &TransportRequest, e: &anyhow::Error) {
        tracing::warn!("dist: {}: {e:#}", req.file.name);
        let r = Report::Failed {
            transfer: req.transfer,
            id: req.target.clone(),
            by: req.target.clone(),
            why: format!("{e:#}"),
        };
        self.report(req.main, r).await;
    }

    async fn done(&self, req: &TransportRequest, job: &Job, source: SocketAddr) {
        let r = Report::Done {
            transfer: req.transfer,
            id: req.target.clone(),
            ms: job.since.elapsed().as_millis() as u64,
            first_ms: job.first_ms.get().copied().unwrap_or(0),
            source,
        };
        self.report(req.main, r).await;
    }

    /// The job for the request's file: held or being fetched already, or
    /// new, with the manifest from the request's source (or the main
    /// server's) and an empty `.part` file.
    async fn job_for(&self, req: &TransportRequest) -> Result<Arc<Job>> {
        if let Some(job) = self.job(&req.file.root) {
            return Ok(job);
        }
        let root = parse_root(&req.file.root)?;
        let manifest = match self.get_manifest(req.source, &root).await {
            Ok(m) => m,
            Err(e) if req.source != req.main => {
                tracing::warn!(
                    "dist: manifest from {}: {e:#}; asking {}",
                    req.source,
                    req.main
                );
                self.get_manifest(req.main, &root).await?
            }
            Err(e) => return Err(e),
        };
        let name = safe_name(&manifest.name)?;
        let mut jobs = self.jobs.lock().expect("lock");
        // Another stripe's request may have got here first.
        if let Some(job) = jobs.get(&req.file.root) {
            return Ok(job.clone());
        }
        let part = self
            .dir
            .join(format!(".{name}.{}.part", &req.file.root[..16]));
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .with_context(|| format!("creating {}", part.display()))?;
        file.set_len(manifest.size)?;
        let job = Arc::new(Job::new(root, manifest, file, part, false));
        jobs.insert(req.file.root.clone(), job.clone());
        Ok(job)
    }

    /// Fetches the chunks of `stripe` the job lacks, verifies and stores
    /// them: one stream from the source, then, after a failure, a new one
    /// from the first chunk still missing (from the main server after a
    /// corrupt chunk or [`FAILURES_BEFORE_FALLBACK`] failures). If that
    /// completed the file, it is moved into place and the source of its
    /// last chunk returned.
    async fn fetch(
        self: &Arc<Self>,
        req: &TransportRequest,
        job: &Arc<Job>,
        stripe: Stripe,
    ) -> Result<Option<SocketAddr>> {
        let main = req.main;
        let (mut source, mut failures, mut in_a_row) = (req.source, 0, 0);
        let mut last = false;
        let missing =
            |job: &Job| (0..job.manifest.count()).find(|&i| stripe.holds(i) && !job.has(i));
        while let Some(first) = missing(job) {
            let mut pulled = Pull::default();
            let result = self
                .pull(req, job, stripe, source, first, &mut pulled)
                .await;
            last |= pulled.last;
            if pulled.stored > 0 {
                in_a_row = 0;
            }
            match result {
                Ok(()) => {}
                Err(Fail::Corrupt(i, e)) => {
                    tracing::warn!("dist: chunk {i} from {source}: {e}");
                    let r = Report::Corrupt {
                        transfer: req.transfer,
                        relay: source,
                        by: req.target.clone(),
                        chunk: i,
                    };
                    self.report(main, r).await;
                    // A relay that serves bad data is not asked again.
                    source = main;
                    in_a_row += 1;
                }
                Err(Fail::Broken(e)) => {
                    failures += 1;
                    in_a_row += 1;
                    tracing::warn!("dist: stream from {source}: {e}");
                    if source != main && failures >= FAILURES_BEFORE_FALLBACK {
                        tracing::warn!("dist: {source} failed: fetching from {main}");
                        source = main;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if in_a_row >= TRIES {
                bail!("chunk {first}: gave up after {TRIES} failed tries");
            }
        }
        if !last {
            return Ok(None);
        }
        job.file.sync_all()?;
        let name = safe_name(&job.manifest.name)?;
        let done = self.dir.join(name);
        let mut path = job.path.lock().expect("lock");
        std::fs::rename(&*path, &done)?;
        *path = done;
        Ok(Some(source))
    }

    /// One stream from `from`: the chunks of `stripe` from `first` on,
    /// each verified and stored as it comes.
    async fn pull(
        self: &Arc<Self>,
        req: &TransportRequest,
        job: &Arc<Job>,
        stripe: Stripe,
        from: SocketAddr,
        first: u32,
        pulled: &mut Pull,
    ) -> Result<(), Fail> {
        let (root, m) = (&job.root, &job.manifest);
        let url = format!(
            "http://{from}/dist/{}/stream/{}/{}/{first}",
            hex::encode(root),
            stripe.index,
            stripe.of
        );
        let r = tokio::time::timeout(SILENCE, self.http.get(url).send())
            .await
            .map_err(|_| Fail::broken("no answer"))?
            .map_err(Fail::broken)?;
        if !r.status().is_success() {
            return Err(Fail::broken(r.status()));
        }
        let mut body = r.bytes_stream();
        // Sealed: compressed (zstd's bound is a little over the input)
        // plus the tag; anything longer is not a chunk.
        let mut frames =
            frame::Reader::new(m.chunk_size as usize + m.chunk_size as usize / 64 + 1024);
        let mut expect = (first..m.count()).filter(|&i| stripe.holds(i));
        let mut next = expect.next();
        while let Some(want) = next {
            let sealed = loop {
                match frames.next_frame() {
                    Err(e) => return Err(Fail::Corrupt(want, e.to_string())),
                    Ok(Some(Frame::Heartbeat)) => continue,
                    Ok(Some(Frame::Chunk(i, sealed))) if i == want => break sealed,
                    Ok(Some(Frame::Chunk(i, _))) => {
                        return Err(Fail::Corrupt(want, format!("chunk {i} came instead")));
                    }
                    Ok(None) => {}
                }
                match tokio::time::timeout(SILENCE, body.next()).await {
                    Err(_) => return Err(Fail::broken(format!("chunk {want}: no data"))),
                    Ok(None) => return Err(Fail::broken(format!("ended before chunk {want}"))),
                    Ok(Some(Err(e))) => return Err(Fail::broken(e)),
                    Ok(Some(Ok(b))) => frames.push(&b),
                }
            };
            let plain = self
                .seal
                .open(m, root, want, &sealed)
                .map_err(|e| Fail::Corrupt(want, e.to_string()))?;
            pulled.last |= job.store(want, &plain).map_err(Fail::broken)?;
            pulled.stored += 1;
            if job.progress_due() {
                let r = Report::Progress {
                    transfer: req.transfer,
                    id: req.target.clone(),
                    chunks: job.count() as u32,
                    source: from,
                };
                let (s, main) = (self.clone(), req.main);
                tokio::spawn(async move { s.report(main, r).await });
            }
            next = expect.next();
        }
        Ok(())
    }

    /// Chunk `i`, sealed, in a frame, once it is stored; a heartbeat
    /// frame if it is not after [`HEARTBEAT`]; an error if it still is not
    /// at `deadline`.
    async fn frame(
        self: Arc<Self>,
        job: Arc<Job>,
        i: u32,
        deadline: tokio::time::Instant,
    ) -> std::io::Result<Option<Bytes>> {
        if !job.has(i) {
            // Registered before the check, so a chunk stored in between
            // wakes us.
            let stored = job.stored.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            let beat = (tokio::time::Instant::now() + HEARTBEAT).min(deadline);
            if !job.has(i) && (tokio::time::timeout_at(beat, stored).await.is_err() || !job.has(i))
            {
                if tokio::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("chunk {i} not here after {CHUNK_WAIT:?}"),
                    ));
                }
                return Ok(None);
            }
        }
        tokio::task::spawn_blocking(move || {
            let plain = job.read(i)?;
            let sealed = self.seal.seal(&job.root, i, &plain);
            Ok(Some(Bytes::from(frame::encode(i, &sealed))))
        })
        .await?
    }

    async fn get_manifest(&self, from: SocketAddr, root: &Hash) -> Result<Manifest> {
        let url = format!("http://{from}/dist/{}/manifest", hex::encode(root));
        let r = self.http.get(url).timeout(SILENCE).send().await?;
        if !r.status().is_success() {
            bail!("manifest from {from}: {}", r.status());
        }
        Ok(Manifest::decode(&r.bytes().await?, root)?)
    }

    fn job(&self, root: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("lock").get(root).cloned()
    }
}

/// Why a stream stopped short.
enum Fail {
    /// The connection failed, timed out or ended early.
    Broken(String),
    /// Chunk `.0` did not verify.
    Corrupt(u32, String),
}

impl Fail {
    fn broken(e: impl std::fmt::Display) -> Self {
        Fail::Broken(e.to_string())
    }
}

/// What one stream brought.
#[derive(Default)]
struct Pull {
    stored: u32,
    /// It stored the file's last missing chunk.
    last: bool,
}

fn parse_root(hex_root: &str) -> Result<Hash> {
    hex::decode(hex_root)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| anyhow!("root {hex_root:?} is not a 32-byte hex hash"))
}

/// A manifest's file name as a plain name in the service's directory.
fn safe_name(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0']);
    ok.then_some(name)
        .ok_or_else(|| anyhow!("file name {name:?} is not a plain name"))
}

fn sig(h: &HeaderMap) -> Option<&str> {
    h.get(signed::SIG_HEADER).and_then(|v| v.to_str().ok())
}

async fn take_request(State(s): State<Arc<Service>>, h: HeaderMap, body: Bytes) -> Response {
    let req: TransportRequest =
        match signed::open(&s.key, "/dist/request", &body, sig(&h), now_ms()) {
            Ok(r) => r,
            Err(e) => return (StatusCode::FORBIDDEN, e.to_string()).into_response(),
        };
    if parse_root(&req.file.root).is_err() {
        return (StatusCode::BAD_REQUEST, "bad root").into_response();
    }
    if req.stripe.is_some_and(|st| !st.valid()) {
        return (StatusCode::BAD_REQUEST, "bad stripe").into_response();
    }
    tracing::info!(
        "dist: {} ({} bytes{}) from {}, {} to pass on",
        req.file.name,
        req.file.size,
        req.stripe
            .map(|st| format!(", stripe {} of {}", st.index + 1, st.of))
            .unwrap_or_default(),
        req.source,
        req.share.len()
    );
    tokio::spawn(s.clone().run(req));
    StatusCode::ACCEPTED.into_response()
}

async fn take_report(State(s): State<Arc<Service>>, h: HeaderMap, body: Bytes) -> Response {
    let Some(tx) = &s.reports else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match signed::open::<Report>(&s.key, "/dist/report", &body, sig(&h), now_ms()) {
        Ok(r) => {
            let _ = tx.send(r).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => (StatusCode::FORBIDDEN, e.to_string()).into_response(),
    }
}

async fn serve_manifest(State(s): State<Arc<Service>>, UrlPath(root): UrlPath<String>) -> Response {
    match s.job(&root) {
        Some(job) => job.manifest.encode().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve_stream(
    State(s): State<Arc<Service>>,
    UrlPath((root, index, of, from)): UrlPath<(String, u32, u32, u32)>,
) -> Response {
    let Some(job) = s.job(&root) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let stripe = Stripe { index, of };
    if !stripe.valid() || from >= job.manifest.count() {
        return (StatusCode::BAD_REQUEST, "no such chunks").into_response();
    }
    let chunks: Vec<u32> = (from..job.manifest.count())
        .filter(|&i| stripe.holds(i))
        .collect();
    // One frame at a time, as the connection takes them; heartbeats while
    // a chunk is awaited.
    let frames = futures::stream::unfold((0usize, None), move |(at, deadline)| {
        let (s, job) = (s.clone(), job.clone());
        let (i, end) = (chunks.get(at).copied(), chunks.len());
        async move {
            let deadline = deadline.unwrap_or_else(|| tokio::time::Instant::now() + CHUNK_WAIT);
            Some(match s.frame(job, i?, deadline).await {
                Ok(Some(f)) => (Ok(f), (at + 1, None)),
                Ok(None) => (Ok(Bytes::from(frame::heartbeat())), (at, Some(deadline))),
                // The body ends in an error: the child sees the stream break.
                Err(e) => (Err(e), (end, None)),
            })
        }
    });
    axum::body::Body::from_stream(frames).into_response()
}

#[cfg(test)]
mod tests {
    use super::safe_name;

    #[test]
    fn only_plain_names_are_stored() {
        assert_eq!(safe_name("update-1.2.bin").unwrap(), "update-1.2.bin");
        for bad in [
            "",
            ".",
            "..",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "a\0b",
            "a\\b",
        ] {
            assert!(safe_name(bad).is_err(), "{bad:?}");
        }
    }
}
