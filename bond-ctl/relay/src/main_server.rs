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
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{
    chunk::{self, Manifest},
    db::{NetDb, Outcome},
    msg::{FileInfo, Report, Stripe, Target, TransportRequest},
    plan,
    service::Service,
};
use bond_proto::{CommunityKey, now_ms};

/// A target that has not acknowledged within this is sent its request by
/// the main server itself (its parent may be gone).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// How the file travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every target fetches from the main server (the baseline).
    Star,
    /// The seed's relay tree: the main server sends to the `fanout`
    /// fastest, each relays to its interleaved share.
    Tree,
    /// The file in `fanout` stripes, each down a tree of its own, so that
    /// every target uploads ([`plan::stripes`]).
    Striped,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Star => "star",
            Mode::Tree => "tree",
            Mode::Striped => "striped",
        }
    }
}

pub struct Options {
    pub file: PathBuf,
    /// Target ids; empty: every terminal in the database.
    pub to: Vec<String>,
    pub mode: Mode,
    /// Children per relay (tree), or stripes and children per relay
    /// (striped); not used by star.
    pub fanout: u32,
    pub chunk_size: u32,
    /// Give up on the rest when nothing was heard for this long.
    pub stall: Duration,
    /// Print progress (on a terminal: a line per target).
    pub progress: bool,
}

/// Where a target is in the transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetStatus {
    #[default]
    Waiting,
    Fetching,
    Done,
    Failed,
}

impl std::fmt::Display for TargetStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Waiting => "waiting",
            Self::Fetching => "fetching",
            Self::Done => "done",
            Self::Failed => "failed",
        })
    }
}

/// One target's state, as the final report shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TargetReport {
    pub id: String,
    pub endpoint: String,
    pub status: TargetStatus,
    /// Response time of its (first) transport request.
    pub ack_ms: Option<u64>,
    /// From its request to its last chunk verified.
    pub ms: Option<u64>,
    /// When, from the start of the transfer, it stored its first chunk and
    /// its last (the main server's clock: its report's arrival, less
    /// the time between the two it reports).
    pub first_chunk_at_ms: Option<u64>,
    pub done_at_ms: Option<u64>,
    pub chunks: u32,
    /// Where it fetched from last.
    pub source: Option<String>,
    pub why: Option<String>,
    /// Per stripe: acknowledged, sent again from the main server.
    #[serde(skip)]
    acked: Vec<bool>,
    #[serde(skip)]
    resent: Vec<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FinalReport {
    pub transfer: i64,
    pub file: String,
    pub root: String,
    pub size: u64,
    pub chunks: u32,
    pub mode: Mode,
    pub fanout: u32,
    /// Where the main server served the file from.
    pub main: String,
    pub ms: u64,
    pub done: usize,
    pub failed: usize,
    /// Relays that served a chunk that did not verify, by endpoint.
    pub corrupt: BTreeMap<String, u32>,
    pub targets: Vec<TargetReport>,
}

pub async fn distribute(key: &CommunityKey, state: &Path, o: Options) -> Result<FinalReport> {
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
        tracing::warn!("retrying {} that failed this file last time", retry.len());
    }

    // Serve the file from the address the targets reach us on.
    let ip = local_ip_towards(targets[0].endpoint)?;
    let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
    let me = listener.local_addr()?;
    let (tx, mut rx) = mpsc::channel(1024);
    let service = Service::new(key, &state.join("files"), me, Some(tx))?;
    service.offer(manifest.clone(), &o.file)?;
    let server = service.clone();
    tokio::spawn(async move { server.serve(listener).await });

    let started_ms = now_ms() as i64;
    let transfer = db.start_transfer(
        &root_hex,
        &name,
        manifest.size,
        o.mode.name(),
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
        stripe: None,
        sent_ms: 0,
    };
    // The first requests: one tree, or a tree per stripe.
    let (first, stripes): (Vec<_>, u32) = match o.mode {
        Mode::Star => (plan::split(&targets, targets.len()), 1),
        Mode::Tree => (plan::split(&targets, o.fanout as usize), 1),
        Mode::Striped => {
            let heads = plan::stripes(&targets, o.fanout as usize);
            let n = heads.len() as u32;
            (heads, n)
        }
    };
    let request = |j: u32| TransportRequest {
        stripe: (o.mode == Mode::Striped).then_some(Stripe {
            index: j,
            of: stripes,
        }),
        ..base.clone()
    };
    let mut state_of: BTreeMap<String, TargetReport> = targets
        .iter()
        .map(|t| {
            let r = TargetReport {
                id: t.id.clone(),
                endpoint: t.endpoint.to_string(),
                status: TargetStatus::Waiting,
                acked: vec![false; stripes as usize],
                resent: vec![false; stripes as usize],
                ..Default::default()
            };
            (t.id.clone(), r)
        })
        .collect();
    let start = Instant::now();
    for (j, a) in first.into_iter().enumerate() {
        let (s, req) = (service.clone(), request(j as u32));
        tokio::spawn(async move { s.send_with_promotion(req, a).await });
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
                    Report::Ack { id, sent_ms, stripe, .. } => {
                        let ms = now_ms().saturating_sub(sent_ms);
                        db.record_response(&id, ms as f64, now)?;
                        if let Some(t) = state_of.get_mut(&id) {
                            if let Some(a) = t.acked.get_mut(stripe.unwrap_or(0) as usize) {
                                *a = true;
                            }
                            t.ack_ms.get_or_insert(ms);
                            if t.status == TargetStatus::Waiting || t.status == TargetStatus::Failed {
                                t.status = TargetStatus::Fetching;
                            }
                        }
                    }
                    Report::Progress { id, chunks, source, .. } => {
                        if let Some(t) = state_of.get_mut(&id) {
                            t.chunks = t.chunks.max(chunks);
                            t.source = Some(source.to_string());
                        }
                    }
                    Report::Done { id, ms, first_ms, source, .. } => {
                        let at = start.elapsed().as_millis() as u64;
                        if ms > 0 {
                            let kbps = manifest.size as f64 * 8.0 / ms as f64;
                            db.record_throughput(&id, kbps, now)?;
                        }
                        let outcome = Outcome::Done { ms, source: source.to_string() };
                        db.target_outcome(transfer, &id, &outcome, now)?;
                        if let Some(t) = state_of.get_mut(&id) {
                            t.status = TargetStatus::Done;
                            t.ms = Some(ms);
                            t.done_at_ms = Some(at);
                            t.first_chunk_at_ms = Some(at.saturating_sub(ms.saturating_sub(first_ms)));
                            t.chunks = manifest.count();
                            t.source = Some(source.to_string());
                            t.why = None;
                        }
                    }
                    Report::Failed { id, why, .. } => {
                        if let Some(t) = state_of.get_mut(&id)
                            && t.status != TargetStatus::Done
                        {
                            db.target_outcome(transfer, &id, &Outcome::Failed { why: why.clone() }, now)?;
                            t.status = TargetStatus::Failed;
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
                if state_of.values().all(|t| t.status == TargetStatus::Done) {
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
                    for j in 0..stripes {
                        let orphans: Vec<Target> = targets
                            .iter()
                            .filter(|t| {
                                let s = &state_of[&t.id];
                                !s.acked[j as usize] && !s.resent[j as usize] && s.status != TargetStatus::Done
                            })
                            .cloned()
                            .collect();
                        if orphans.is_empty() {
                            continue;
                        }
                        tracing::warn!(
                            "{} target(s) did not acknowledge{} after {ACK_WAIT:?}: sending from here",
                            orphans.len(),
                            if stripes > 1 { format!(" stripe {}", j + 1) } else { String::new() },
                        );
                        for t in &orphans {
                            if let Some(s) = state_of.get_mut(&t.id) {
                                s.resent[j as usize] = true;
                            }
                        }
                        let (s, req) = (service.clone(), request(j));
                        tokio::spawn(async move { s.fan_out(&req, &orphans).await });
                    }
                }
            }
        }
    }
    display.show(&state_of, start.elapsed());
    let now = now_ms() as i64;
    for t in state_of.values_mut() {
        if t.status != TargetStatus::Done && t.status != TargetStatus::Failed {
            let why = format!("no word for {:?} (was {})", o.stall, t.status);
            db.target_outcome(transfer, &t.id, &Outcome::Failed { why: why.clone() }, now)?;
            t.status = TargetStatus::Failed;
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
        mode: o.mode,
        fanout: o.fanout,
        main: me.to_string(),
        ms: start.elapsed().as_millis() as u64,
        done: targets
            .iter()
            .filter(|t| t.status == TargetStatus::Done)
            .count(),
        failed: targets
            .iter()
            .filter(|t| t.status == TargetStatus::Failed)
            .count(),
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
        let done = targets
            .values()
            .filter(|t| t.status == TargetStatus::Done)
            .count();
        let failed = targets
            .values()
            .filter(|t| t.status == TargetStatus::Failed)
            .count();
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
