//! `bond-ctl distribute`: the main server's side of a transfer. It ranks
//! the targets from the network information database, serves the file,
//! sends transport requests to the fastest `fanout` with their
//! interleaved shares, follows every terminal's reports, re-parents those
//! whose request never arrived, and records the outcome.

use std::{
    collections::BTreeMap,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tokio::sync::mpsc;

use super::{
    chunk::{self, Manifest},
    db::{NetDb, Outcome},
    msg::{FileInfo, Report, Target, TransportRequest},
    service::Service,
};
use crate::proto::now_ms;

/// A target that has not acknowledged within this is sent its request by
/// the main server itself (its parent may be gone).
const ACK_WAIT: Duration = Duration::from_secs(5);

pub struct Options {
    pub file: PathBuf,
    /// Target ids; empty: every terminal in the database.
    pub to: Vec<String>,
    pub fanout: u32,
    pub chunk_size: u32,
    /// Give up on the rest when nothing was heard for this long.
    pub stall: Duration,
    /// Print progress (on a terminal: a line per target).
    pub progress: bool,
}

/// One target's state, as the final report shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetReport {
    pub id: String,
    pub endpoint: String,
    pub status: &'static str,
    /// Response time of its transport request.
    pub ack_ms: Option<u64>,
    /// From its request to its last chunk verified.
    pub ms: Option<u64>,
    pub chunks: u32,
    /// Where it fetched from last.
    pub source: Option<String>,
    pub why: Option<String>,
    #[serde(skip)]
    resent: bool,
}

#[derive(Debug, Serialize)]
pub struct FinalReport {
    pub transfer: i64,
    pub file: String,
    pub root: String,
    pub size: u64,
    pub chunks: u32,
    pub fanout: u32,
    pub ms: u64,
    pub done: usize,
    pub failed: usize,
    /// Relays that served a chunk that did not verify, by endpoint.
    pub corrupt: BTreeMap<String, u32>,
    pub targets: Vec<TargetReport>,
}

pub async fn distribute(key: &[u8], state: &Path, o: Options) -> Result<FinalReport> {
    let mut db = NetDb::open(&state.join("net.db"))?;
    let path = o.file.clone();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("the file needs a plain UTF-8 name")?
        .to_string();
    let (chunk_size, n2) = (o.chunk_size, name.clone());
    let manifest = tokio::task::spawn_blocking(move || -> Result<Manifest> {
        let f = std::fs::File::open(&path).with_context(|| format!("{}", path.display()))?;
        Ok(Manifest::build(
            &n2,
            std::io::BufReader::new(f),
            chunk_size,
        )?)
    })
    .await??;
    let root_hex = hex::encode(manifest.root());

    // Targets, fastest first: the operator's list, or every terminal known,
    // and those that failed this file last time.
    let ranked = db.ranked()?;
    let mut targets: Vec<Target> = Vec::new();
    let retry = db.failed_for(&root_hex)?;
    for row in &ranked {
        let wanted = o.to.is_empty() || o.to.contains(&row.id) || retry.contains(&row.id);
        if wanted && let Ok(endpoint) = row.endpoint.parse() {
            targets.push(Target {
                id: row.id.clone(),
                endpoint,
                kbps: row.throughput_kbps.or(row.link_kbps),
            });
        }
    }
    for id in &o.to {
        if !targets.iter().any(|t| &t.id == id) {
            bail!(
                "target {id:?} is not in the network information database (`bond-ctl terminals` lists it)"
            );
        }
    }
    if targets.is_empty() {
        bail!("no targets: no terminal has announced a distribution service yet");
    }
    if !retry.is_empty() {
        eprintln!(
            "bond-ctl: retrying {} that failed this file last time",
            retry.len()
        );
    }

    // Serve the file from the address the targets reach us on.
    let ip = local_ip_towards(targets[0].endpoint)?;
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let me = listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel(1024);
    let service = Service::new(key, &state.join("files"), me, Some(tx))?;
    service.offer(manifest.clone(), &o.file);
    let server = service.clone();
    tokio::spawn(async move { server.serve(listener).await });

    let started_ms = now_ms() as i64;
    let transfer = db.start_transfer(
        &root_hex,
        &name,
        manifest.size,
        "tree",
        o.fanout,
        started_ms,
    )?;
    let base = TransportRequest {
        transfer,
        file: FileInfo {
            name: name.clone(),
            size: manifest.size,
            chunk_size: manifest.chunk_size,
            root: root_hex.clone(),
            compression: chunk::COMPRESSION.into(),
            encryption: chunk::ENCRYPTION.into(),
        },
        source: me,
        main: me,
        target: String::new(),
        share: Vec::new(),
        fanout: o.fanout,
        sent_ms: 0,
    };
    let mut state_of: BTreeMap<String, TargetReport> = targets
        .iter()
        .map(|t| {
            let r = TargetReport {
                id: t.id.clone(),
                endpoint: t.endpoint.to_string(),
                status: "waiting",
                ..Default::default()
            };
            (t.id.clone(), r)
        })
        .collect();
    let start = Instant::now();
    {
        let (s, b, t) = (service.clone(), base.clone(), targets.clone());
        tokio::spawn(async move { s.fan_out(&b, &t).await });
    }

    let mut corrupt: BTreeMap<String, u32> = BTreeMap::new();
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut display = Display::new(o.progress, manifest.count());
    loop {
        tokio::select! {
            Some(r) = rx.recv() => {
                if r.transfer() != transfer {
                    continue;
                }
                last_heard = Instant::now();
                let now = now_ms() as i64;
                match r {
                    Report::Ack { id, sent_ms, .. } => {
                        let ms = now_ms().saturating_sub(sent_ms);
                        db.record_response(&id, ms as f64, now)?;
                        if let Some(t) = state_of.get_mut(&id) {
                            t.ack_ms = Some(ms);
                            if t.status == "waiting" || t.status == "failed" {
                                t.status = "fetching";
                            }
                        }
                    }
                    Report::Progress { id, chunks, source, .. } => {
                        if let Some(t) = state_of.get_mut(&id) {
                            t.chunks = t.chunks.max(chunks);
                            t.source = Some(source.to_string());
                        }
                    }
                    Report::Done { id, ms, source, .. } => {
                        if ms > 0 {
                            let kbps = manifest.size as f64 * 8.0 / ms as f64;
                            db.record_throughput(&id, kbps, now)?;
                        }
                        let outcome = Outcome::Done { ms, source: source.to_string() };
                        db.target_outcome(transfer, &id, &outcome, now)?;
                        if let Some(t) = state_of.get_mut(&id) {
                            t.status = "done";
                            t.ms = Some(ms);
                            t.chunks = manifest.count();
                            t.source = Some(source.to_string());
                            t.why = None;
                        }
                    }
                    Report::Failed { id, why, .. } => {
                        if let Some(t) = state_of.get_mut(&id)
                            && t.status != "done"
                        {
                            db.target_outcome(transfer, &id, &Outcome::Failed { why: why.clone() }, now)?;
                            t.status = "failed";
                            t.why = Some(why);
                        }
                    }
                    Report::Corrupt { relay, by, chunk, .. } => {
                        let relay_id = targets
                            .iter()
                            .find(|t| t.endpoint == relay)
                            .map_or_else(|| relay.to_string(), |t| t.id.clone());
                        db.report_corrupt(transfer, &relay_id, &by, chunk, now)?;
                        *corrupt.entry(relay_id).or_default() += 1;
                    }
                }
                if state_of.values().all(|t| t.status == "done") {
                    break;
                }
            }
            _ = tick.tick() => {
                display.show(&state_of, start.elapsed());
                if last_heard.elapsed() >= o.stall {
                    break;
                }
                // Requests that never arrived (a parent died first): the
                // main server sends them itself, as a tree of their own.
                if start.elapsed() >= ACK_WAIT {
                    let orphans: Vec<Target> = targets
                        .iter()
                        .filter(|t| {
                            let s = &state_of[&t.id];
                            s.ack_ms.is_none() && !s.resent && s.status != "done"
                        })
                        .cloned()
                        .collect();
                    if !orphans.is_empty() {
                        eprintln!(
                            "bond-ctl: {} target(s) not acknowledged after {ACK_WAIT:?}: sending their requests from here",
                            orphans.len()
                        );
                        for t in &orphans {
                            if let Some(s) = state_of.get_mut(&t.id) {
                                s.resent = true;
                            }
                        }
                        let (s, b) = (service.clone(), base.clone());
                        tokio::spawn(async move { s.fan_out(&b, &orphans).await });
                    }
                }
            }
        }
    }
    display.show(&state_of, start.elapsed());
    let now = now_ms() as i64;
    for t in state_of.values_mut() {
        if t.status != "done" && t.status != "failed" {
            let why = format!("no word for {:?} (was {})", o.stall, t.status);
            db.target_outcome(transfer, &t.id, &Outcome::Failed { why: why.clone() }, now)?;
            t.status = "failed";
            t.why = Some(why);
        }
    }
    db.finish_transfer(transfer, now)?;
    let targets: Vec<TargetReport> = state_of.into_values().collect();
    Ok(FinalReport {
        transfer,
        file: name,
        root: root_hex,
        size: manifest.size,
        chunks: manifest.count(),
        fanout: o.fanout,
        ms: start.elapsed().as_millis() as u64,
        done: targets.iter().filter(|t| t.status == "done").count(),
        failed: targets.iter().filter(|t| t.status == "failed").count(),
        corrupt,
        targets,
    })
}

/// The local address the kernel would send from towards `to` (no packet
/// is sent).
fn local_ip_towards(to: SocketAddr) -> Result<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
    s.connect(to)
        .with_context(|| format!("no route to the first target, {to}"))?;
    Ok(s.local_addr()?.ip())
}

/// Progress on stderr: on a terminal, a line per target redrawn in place;
/// otherwise a summary line every few seconds.
struct Display {
    on: bool,
    tty: bool,
    chunks: u32,
    lines: usize,
    last: Option<Instant>,
}

impl Display {
    fn new(on: bool, chunks: u32) -> Self {
        Self {
            on,
            tty: std::io::stderr().is_terminal(),
            chunks,
            lines: 0,
            last: None,
        }
    }

    fn show(&mut self, targets: &BTreeMap<String, TargetReport>, elapsed: Duration) {
        if !self.on {
            return;
        }
        let done = targets.values().filter(|t| t.status == "done").count();
        let failed = targets.values().filter(|t| t.status == "failed").count();
        let summary = format!(
            "{:>6.1}s  {done}/{} done, {failed} failed",
            elapsed.as_secs_f64(),
            targets.len()
        );
        let mut err = std::io::stderr().lock();
        if !self.tty {
            if self
                .last
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
            {
                self.last = Some(Instant::now());
                let _ = writeln!(err, "{summary}");
            }
            return;
        }
        if self.lines > 0 {
            let _ = write!(err, "\x1b[{}A", self.lines);
        }
        for t in targets.values() {
            let pct = u64::from(t.chunks) * 100 / u64::from(self.chunks.max(1));
            let bar: String = (0..20)
                .map(|i| if i * 5 < pct { '#' } else { '.' })
                .collect();
            let _ = writeln!(
                err,
                "\x1b[2K{:<16} [{bar}] {pct:>3}% {:<9} {}",
                t.id,
                t.status,
                t.source.as_deref().unwrap_or("")
            );
        }
        let _ = writeln!(err, "\x1b[2K{summary}");
        self.lines = targets.len() + 1;
    }
}
