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
//! - `GET /dist/{root}/chunk/{i}`: chunk `i`, sealed. A chunk not stored
//!   yet is waited for (up to [`CHUNK_WAIT`]), so a relay serves its
//!   subtree from its first chunk on, not from its last;
//! - `POST /dist/report`: a signed [`Report`] (the main server only).

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
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
    msg::{self, Report, Target, TransportRequest},
    plan::{self, Assignment},
};
use crate::proto::now_ms;

/// How long a chunk request waits for a chunk its relay is still fetching.
pub const CHUNK_WAIT: Duration = Duration::from_secs(20);
/// Connecting to and posting a request to a child.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Fetching one chunk (waits included).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Failed fetches from a relay before the main server becomes the source.
const FAILURES_BEFORE_FALLBACK: u32 = 3;
/// Tries per chunk, over every source, before the transfer is given up.
const TRIES_PER_CHUNK: u32 = 8;
/// Chunks a terminal has in flight from its source.
const WINDOW: usize = 4;
/// How often a terminal reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// A file held or being fetched.
struct Job {
    root: Hash,
    manifest: Manifest,
    /// The file (complete), or its `.part` while it is fetched.
    path: Mutex<PathBuf>,
    have: Mutex<Vec<bool>>,
    /// Wakes chunk requests waiting for a chunk.
    stored: Notify,
}

impl Job {
    fn has(&self, i: u32) -> bool {
        self.have.lock().expect("lock").get(i as usize) == Some(&true)
    }

    fn read(&self, i: u32) -> std::io::Result<Vec<u8>> {
        let path = self.path.lock().expect("lock").clone();
        let mut buf = vec![0u8; self.manifest.len_of(i)];
        std::fs::File::open(path)?.read_exact_at(&mut buf, self.manifest.offset_of(i))?;
        Ok(buf)
    }
}

/// A fault to inject, for tests: serve this chunk corrupted
/// (`BOND_DIST_FAULT=corrupt:N`).
fn fault_from_env() -> Option<u32> {
    let v = std::env::var("BOND_DIST_FAULT").ok()?;
    let n = v.strip_prefix("corrupt:")?.parse().ok()?;
    eprintln!("bond-ctl: dist: FAULT INJECTION: chunk {n} is served corrupted (BOND_DIST_FAULT)");
    Some(n)
}

pub struct Service {
    key: Vec<u8>,
    seal: Seal,
    /// Where received files go.
    dir: PathBuf,
    /// This service's address, as its children fetch from it.
    me: SocketAddr,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    http: reqwest::Client,
    /// The main server's side: reports go here.
    reports: Option<mpsc::Sender<Report>>,
    corrupt: Option<u32>,
}

impl Service {
    pub fn new(
        key: &[u8],
        dir: &Path,
        me: SocketAddr,
        reports: Option<mpsc::Sender<Report>>,
    ) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Arc::new(Self {
            key: key.to_vec(),
            seal: Seal::new(key),
            dir: dir.to_path_buf(),
            me,
            jobs: Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            reports,
            corrupt: fault_from_env(),
        }))
    }

    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// Serves `path`, complete, as the file `manifest` describes (the main
    /// server's own copy).
    pub fn offer(&self, manifest: Manifest, path: &Path) -> Hash {
        let root = manifest.root();
        let n = manifest.chunks.len();
        self.jobs.lock().expect("lock").insert(
            hex::encode(root),
            Arc::new(Job {
                root,
                manifest,
                path: Mutex::new(path.to_path_buf()),
                have: Mutex::new(vec![true; n]),
                stored: Notify::new(),
            }),
        );
        root
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/dist/request", post(take_request))
            .route("/dist/report", post(take_report))
            .route("/dist/{root}/manifest", get(serve_manifest))
            .route("/dist/{root}/chunk/{i}", get(serve_chunk))
            .layer(DefaultBodyLimit::max(msg::MAX_BODY))
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
        let (body, sig) = msg::sign(&self.key, path, m, now_ms());
        let r = self
            .http
            .post(format!("http://{to}{path}"))
            .header(msg::SIG_HEADER, sig)
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
            eprintln!("bond-ctl: dist: report to {main}: {e:#}");
        }
    }

    /// Sends transport requests to the children of `share`, each with its
    /// own share and this service as the source. A child that cannot be
    /// reached is reported and replaced by the fastest of its share
    /// ([`plan::promote`]).
    pub async fn fan_out(self: &Arc<Self>, req: &TransportRequest, share: &[Target]) {
        let tasks: Vec<_> = plan::split(share, req.fanout as usize)
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

    async fn send_with_promotion(&self, req: TransportRequest, mut a: Assignment<Target>) {
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
                    eprintln!("bond-ctl: dist: {}: {why}", a.target.id);
                    let r = Report::Failed {
                        transfer: req.transfer,
                        id: a.target.id.clone(),
                        by: self.me.to_string(),
                        why,
                    };
                    self.report(req.main, r).await;
                    match plan::promote(a) {
                        Some(p) => a = p,
                        None => return,
                    }
                }
            }
        }
    }

    /// Carries out a transport request: acknowledge, fetch the manifest,
    /// pass the request on, fetch and verify every chunk, report.
    async fn run(self: Arc<Self>, req: TransportRequest) {
        let start = Instant::now();
        let main = req.main;
        self.report(
            main,
            Report::Ack {
                transfer: req.transfer,
                id: req.target.clone(),
                sent_ms: req.sent_ms,
            },
        )
        .await;
        if let Err(e) = self.fetch(&req, start).await {
            eprintln!("bond-ctl: dist: {}: {e:#}", req.file.name);
            let r = Report::Failed {
                transfer: req.transfer,
                id: req.target.clone(),
                by: req.target.clone(),
                why: format!("{e:#}"),
            };
            self.report(main, r).await;
        }
    }

    async fn fetch(self: &Arc<Self>, req: &TransportRequest, start: Instant) -> Result<()> {
        let root = parse_root(&req.file.root)?;
        let main = req.main;
        let mut source = req.source;
        let manifest = match self.get_manifest(source, &root).await {
            Ok(m) => m,
            Err(e) if source != main => {
                eprintln!("bond-ctl: dist: manifest from {source}: {e:#}; asking {main}");
                source = main;
                self.get_manifest(main, &root).await?
            }
            Err(e) => return Err(e),
        };
        let name = safe_name(&manifest.name)?;
        let part = self
            .dir
            .join(format!(".{name}.{}.part", &req.file.root[..16]));
        let file =
            std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
        file.set_len(manifest.size)?;
        let job = Arc::new(Job {
            root,
            manifest: manifest.clone(),
            path: Mutex::new(part.clone()),
            have: Mutex::new(vec![false; manifest.chunks.len()]),
            stored: Notify::new(),
        });
        self.jobs
            .lock()
            .expect("lock")
            .insert(req.file.root.clone(), job.clone());

        // The subtree starts now: its requests wait for chunks as they come.
        let (s, r, share) = (self.clone(), req.clone(), req.share.clone());
        tokio::spawn(async move { s.fan_out(&r, &share).await });

        // Up to WINDOW chunks in flight, stored in order: a request per
        // chunk costs a round trip through the sender's queue, which a
        // window hides.
        let from = Mutex::new(source);
        let failures = AtomicU32::new(0);
        let fetch_one = |i: u32| {
            let (from, failures, manifest) = (&from, &failures, &manifest);
            async move {
                for _ in 0..TRIES_PER_CHUNK {
                    let src = *from.lock().expect("lock");
                    match self.get_chunk(src, &root, i).await {
                        Ok(sealed) => match self.seal.open(manifest, &root, i, &sealed) {
                            Ok(plain) => return Ok(plain),
                            Err(e) => {
                                eprintln!("bond-ctl: dist: chunk {i} from {src}: {e}");
                                let r = Report::Corrupt {
                                    transfer: req.transfer,
                                    relay: src,
                                    by: req.target.clone(),
                                    chunk: i,
                                };
                                self.report(main, r).await;
                                // A relay that serves bad data is not asked again.
                                *from.lock().expect("lock") = main;
                            }
                        },
                        Err(e) => {
                            let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                            eprintln!("bond-ctl: dist: chunk {i} from {src}: {e:#}");
                            if src != main && n >= FAILURES_BEFORE_FALLBACK {
                                eprintln!("bond-ctl: dist: {src} failed: fetching from {main}");
                                *from.lock().expect("lock") = main;
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                bail!("chunk {i}: gave up after {TRIES_PER_CHUNK} tries")
            }
        };
        let mut chunks = futures::stream::iter(0..manifest.count())
            .map(fetch_one)
            .buffered(WINDOW);
        let (mut i, mut last_progress) = (0u32, Instant::now());
        while let Some(data) = chunks.next().await {
            let data = data?;
            file.write_all_at(&data, manifest.offset_of(i))?;
            job.have.lock().expect("lock")[i as usize] = true;
            job.stored.notify_waiters();
            i += 1;
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                let r = Report::Progress {
                    transfer: req.transfer,
                    id: req.target.clone(),
                    chunks: i,
                    source: *from.lock().expect("lock"),
                };
                let s = self.clone();
                tokio::spawn(async move { s.report(main, r).await });
            }
        }
        drop(chunks);
        let source = *from.lock().expect("lock");
        file.sync_all()?;
        let done = self.dir.join(name);
        std::fs::rename(&part, &done)?;
        *job.path.lock().expect("lock") = done;
        let r = Report::Done {
            transfer: req.transfer,
            id: req.target.clone(),
            ms: start.elapsed().as_millis() as u64,
            source,
        };
        self.report(main, r).await;
        Ok(())
    }

    async fn get_manifest(&self, from: SocketAddr, root: &Hash) -> Result<Manifest> {
        let url = format!("http://{from}/dist/{}/manifest", hex::encode(root));
        let r = self.http.get(url).timeout(FETCH_TIMEOUT).send().await?;
        if !r.status().is_success() {
            bail!("manifest from {from}: {}", r.status());
        }
        Ok(Manifest::decode(&r.bytes().await?, root)?)
    }

    async fn get_chunk(&self, from: SocketAddr, root: &Hash, i: u32) -> Result<Bytes> {
        let url = format!("http://{from}/dist/{}/chunk/{i}", hex::encode(root));
        let r = self.http.get(url).timeout(FETCH_TIMEOUT).send().await?;
        if !r.status().is_success() {
            bail!("{}", r.status());
        }
        Ok(r.bytes().await?)
    }

    fn job(&self, root: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("lock").get(root).cloned()
    }
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
    h.get(msg::SIG_HEADER).and_then(|v| v.to_str().ok())
}

async fn take_request(State(s): State<Arc<Service>>, h: HeaderMap, body: Bytes) -> Response {
    let req: TransportRequest = match msg::open(&s.key, "/dist/request", &body, sig(&h), now_ms()) {
        Ok(r) => r,
        Err(e) => return (StatusCode::FORBIDDEN, e.to_string()).into_response(),
    };
    if let Some(job) = s.job(&req.file.root) {
        // Held already (or on its way): acknowledge, report and pass on.
        let complete = job.have.lock().expect("lock").iter().all(|h| *h);
        let s2 = s.clone();
        tokio::spawn(async move {
            let ack = Report::Ack {
                transfer: req.transfer,
                id: req.target.clone(),
                sent_ms: req.sent_ms,
            };
            s2.report(req.main, ack).await;
            if complete {
                let done = Report::Done {
                    transfer: req.transfer,
                    id: req.target.clone(),
                    ms: 0,
                    source: s2.me,
                };
                s2.report(req.main, done).await;
            }
            s2.fan_out(&req, &req.share).await;
        });
        return StatusCode::ACCEPTED.into_response();
    }
    if parse_root(&req.file.root).is_err() {
        return (StatusCode::BAD_REQUEST, "bad root").into_response();
    }
    eprintln!(
        "bond-ctl: dist: {} ({} bytes) from {}, {} to pass on",
        req.file.name,
        req.file.size,
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
    match msg::open::<Report>(&s.key, "/dist/report", &body, sig(&h), now_ms()) {
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

async fn serve_chunk(
    State(s): State<Arc<Service>>,
    UrlPath((root, i)): UrlPath<(String, u32)>,
) -> Response {
    let Some(job) = s.job(&root) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if i >= job.manifest.count() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let deadline = tokio::time::Instant::now() + CHUNK_WAIT;
    loop {
        // Registered before the check, so a chunk stored in between wakes us.
        let stored = job.stored.notified();
        tokio::pin!(stored);
        stored.as_mut().enable();
        if job.has(i) {
            break;
        }
        if tokio::time::timeout_at(deadline, stored).await.is_err() {
            return (StatusCode::SERVICE_UNAVAILABLE, "chunk not here yet").into_response();
        }
    }
    let corrupt = s.corrupt == Some(i);
    let (s2, job2) = (s.clone(), job.clone());
    let sealed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
        let mut plain = job2.read(i)?;
        if corrupt && let Some(b) = plain.first_mut() {
            *b ^= 0xff;
        }
        Ok(s2.seal.seal(&job2.root, i, &plain))
    })
    .await;
    match sealed {
        Ok(Ok(b)) => b.into_response(),
        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
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
