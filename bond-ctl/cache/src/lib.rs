//! Peer-cache referral (the browser-cache seed): every terminal keeps what
//! it fetched and serves it to the community; a referral server knows who
//! holds what and sends clients to the best holder; a local forward proxy
//! looks among the peers before it spends the slow uplinks.
//!
//! - [`store`]: the size-bounded cache on disk, least recently used out;
//! - [`workload`]: the limit on uploads to peers;
//! - [`table`]: the referral server's look-up table and ranking;
//! - [`msg`]: what the services say to each other;
//! - [`serve`]: the HTTP side every cache runs (objects, status, and the
//!   referral server's routes);
//! - [`fetch`]: the client: referral, LAN query, probes, verification,
//!   origin;
//! - [`proxy`]: the forward proxy.
//!
//! One port (`cache.port`, on the LAN address) carries HTTP (TCP) and the
//! LAN queries (UDP).

pub mod fetch;
pub mod msg;
pub mod proxy;
pub mod serve;
pub mod store;
pub mod table;
pub mod workload;

use std::{
    collections::{HashMap, VecDeque},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use bond_proto::{CommunityKey, now_ms};

use bond_config::CacheConfig;
use msg::{Lan, Update};

/// How often the referral server probes the peers it lists.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often a cache sends the referral server its whole list (so a
/// restarted referral server learns it again).
const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// URLs remembered with their holders, for LAN queries.
const KNOWN_URLS: usize = 4096;

/// What a client remembers of the community: who held a URL when it last
/// heard (from referrals and LAN answers), and which peers served it well.
/// This is the auxiliary proxy list a LAN query starts from, and what this
/// cache tells others who ask for something it does not hold.
#[derive(Default)]
struct Known {
    holders: HashMap<String, Vec<SocketAddr>>,
    order: VecDeque<String>,
    /// Peers that sent us something, with the speed, bytes/s.
    good: HashMap<SocketAddr, f64>,
}

impl Known {
    fn learn(&mut self, url: &str, peers: impl IntoIterator<Item = SocketAddr>) {
        if !self.holders.contains_key(url) {
            if self.order.len() >= KNOWN_URLS
                && let Some(old) = self.order.pop_front()
            {
                self.holders.remove(&old);
            }
            self.order.push_back(url.to_string());
        }
        let h = self.holders.entry(url.to_string()).or_default();
        for p in peers {
            if !h.contains(&p) {
                h.push(p);
            }
        }
    }

    fn forget(&mut self, url: &str, peer: SocketAddr) {
        if let Some(h) = self.holders.get_mut(url) {
            h.retain(|p| *p != peer);
        }
        self.good.remove(&peer);
    }

    fn holders(&self, url: &str) -> Vec<SocketAddr> {
        self.holders.get(url).cloned().unwrap_or_default()
    }

    /// The `n` fastest peers that served us.
    fn best(&self, n: usize) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self.good.iter().map(|(p, b)| (*p, *b)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v.into_iter().take(n).map(|x| x.0).collect()
    }
}

/// Where objects came from, counted for `status`.
#[derive(Default)]
pub struct Stats {
    pub local: AtomicU64,
    pub peer: AtomicU64,
    pub origin: AtomicU64,
    pub peer_bytes: AtomicU64,
    pub origin_bytes: AtomicU64,
    /// Objects from peers that failed verification.
    pub corrupt: AtomicU64,
    /// LAN queries made (the referral server did not answer).
    pub lan_queries: AtomicU64,
}

/// `GET /cache/status` (`bond-ctl cache status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub endpoint: SocketAddr,
    pub referral: Option<SocketAddr>,
    pub referral_server: bool,
    pub objects: usize,
    pub bytes: u64,
    pub max_bytes: u64,
    pub load: msg::Load,
    pub from_local: u64,
    pub from_peers: u64,
    pub from_origin: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    pub corrupt_caught: u64,
    pub lan_queries: u64,
}

pub struct Cache {
    key: CommunityKey,
    cfg: CacheConfig,
    /// This cache's HTTP service, as peers reach it.
    me: SocketAddr,
    pub store: store::Store,
    work: Arc<workload::Workload>,
    /// The referral server's table, if this agent is one.
    table: Option<Mutex<table::Table>>,
    referral: Option<SocketAddr>,
    /// Talks to peers and origins directly (never through a proxy).
    http: reqwest::Client,
    udp: tokio::net::UdpSocket,
    known: Mutex<Known>,
    /// LAN queries waiting for answers, by id.
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<(Lan, SocketAddr)>>>,
    pub stats: Stats,
}

impl Cache {
    /// Starts the cache of a terminal on `lan_ip`: its HTTP service on
    /// `cfg.port`, its UDP service on `udp` (bound to `cfg.port` on the LAN
    /// interface, broadcast allowed), the proxy on `cfg.proxy`, and the
    /// referral server if configured.
    pub async fn start(
        key: &CommunityKey,
        lan_ip: Ipv4Addr,
        udp: tokio::net::UdpSocket,
        cfg: &CacheConfig,
        dir: &Path,
    ) -> Result<Arc<Self>> {
        let me = SocketAddr::from((lan_ip, cfg.port));
        let store = store::Store::open(dir, cfg.max_mib << 20)
            .with_context(|| format!("field `cache.dir`: {}", dir.display()))?;
        let listener = tokio::net::TcpListener::bind(me)
            .await
            .with_context(|| format!("field `cache.port`: listening on {me}"))?;
        let proxy = tokio::net::TcpListener::bind(cfg.proxy)
            .await
            .with_context(|| format!("field `cache.proxy`: listening on {}", cfg.proxy))?;
        let referral = if cfg.referral_server {
            Some(me)
        } else {
            cfg.referral.map(|ip| SocketAddr::from((ip, cfg.port)))
        };
        let cache = Arc::new(Self {
            key: key.clone(),
            cfg: cfg.clone(),
            me,
            store,
            work: workload::Workload::new(cfg.max_uploads, u64::from(cfg.upload_mbit) * 125_000),
            table: cfg
                .referral_server
                .then(|| Mutex::new(table::Table::default())),
            referral,
            http: reqwest::Client::builder()
                .no_proxy()
                .connect_timeout(Duration::from_secs(2))
                .build()?,
            udp,
            known: Mutex::new(Known::default()),
            pending: Mutex::new(HashMap::new()),
            stats: Stats::default(),
        });
        let c = cache.clone();
        tokio::spawn(async move {
            if let Err(e) = serve::serve(c, listener).await {
                tracing::error!("cache: service stopped: {e:#}");
            }
        });
        let c = cache.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy::serve(c, proxy).await {
                tracing::error!("cache: proxy stopped: {e:#}");
            }
        });
        tokio::spawn(cache.clone().lan_loop());
        tokio::spawn(cache.clone().resync_loop());
        if cache.table.is_some() {
            tokio::spawn(cache.clone().probe_loop());
        }
        tracing::info!(
            "cache: serving on {me}, proxy on {}, {} objects in {}{}",
            cfg.proxy,
            cache.store.list().len(),
            dir.display(),
            match (cfg.referral_server, referral) {
                (true, _) => ", referral server here".to_string(),
                (false, Some(r)) => format!(", referral server {r}"),
                (false, None) => ", no referral server: LAN queries only".to_string(),
            }
        );
        Ok(cache)
    }

    pub fn status(&self) -> Status {
        let s = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Status {
            endpoint: self.me,
            referral: self.referral,
            referral_server: self.table.is_some(),
            objects: self.store.list().len(),
            bytes: self.store.bytes(),
            max_bytes: self.store.max_bytes(),
            load: self.work.load(),
            from_local: n(&s.local),
            from_peers: n(&s.peer),
            from_origin: n(&s.origin),
            bytes_from_peers: n(&s.peer_bytes),
            bytes_from_origin: n(&s.origin_bytes),
            corrupt_caught: n(&s.corrupt),
            lan_queries: n(&s.lan_queries),
        }
    }

    /// Sends the referral server an update; one that is lost is made good
    /// by the next resync.
    fn report(self: &Arc<Self>, u: Update) {
        let Some(to) = self.referral else { return };
        if let Some(t) = &self.table {
            t.lock().expect("lock").apply(&u);
            return;
        }
        let c = self.clone();
        tokio::spawn(async move {
            if let Err(e) = c.post(to, "/cache/update", &u).await {
                tracing::warn!("cache: update to {to}: {e:#}");
            }
        });
    }

    async fn post<T: Serialize>(
        &self,
        to: SocketAddr,
        path: &str,
        m: &T,
    ) -> Result<reqwest::Response> {
        let (body, sig) = bond_proto::signed::sign(&self.key, path, m, now_ms());
        let r = self
            .http
            .post(format!("http://{to}{path}"))
            .header(bond_proto::signed::SIG_HEADER, sig)
            .body(body)
            .timeout(Duration::from_millis(u64::from(self.cfg.referral_wait_ms)))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "{to}{path}: {}", r.status());
        Ok(r)
    }

    async fn resync_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(RESYNC_EVERY);
        loop {
            tick.tick().await;
            let objects = self.store.list();
            if !objects.is_empty() {
                self.report(Update::Added {
                    peer: self.me,
                    objects,
                });
            }
        }
    }

    /// The referral server asks every peer it lists for its workload; a
    /// peer that does not answer [`table::DEAD_AFTER`] times is dropped.
    async fn probe_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        loop {
            tick.tick().await;
            let peers = match &self.table {
                Some(t) => t.lock().expect("lock").peers(),
                None => return,
            };
            let probes = peers.into_iter().map(|p| {
                let c = self.clone();
                async move {
                    let r = async {
                        let s: serde_json::Value = c
                            .http
                            .get(format!("http://{p}/cache/status"))
                            .timeout(PROBE_TIMEOUT)
                            .send()
                            .await?
                            .json()
                            .await?;
                        anyhow::Ok(serde_json::from_value::<msg::Load>(s["load"].clone())?)
                    }
                    .await;
                    (p, r)
                }
            });
            for (p, r) in futures::future::join_all(probes).await {
                let mut t = self
                    .table
                    .as_ref()
                    .expect("referral server")
                    .lock()
                    .expect("lock");
                match r {
                    Ok(load) => t.probed(p, load),
                    Err(_) => {
                        if t.probe_failed(p) {
                            tracing::warn!("cache: {p} does not answer: dropped from the table");
                        }
                    }
                }
            }
        }
    }

    /// Answers LAN queries, and hands answers to the queries waiting.
    async fn lan_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; msg::LAN_MAX + 1];
        loop {
            let Ok((n, src)) = self.udp.recv_from(&mut buf).await else {
                continue;
            };
            let m = match msg::open_lan(&self.key, &buf[..n], now_ms()) {
                Ok(m) => m,
                Err(e) => {
                    static REFUSED: bond_api::LogEvery = bond_api::LogEvery::new();
                    if let Some(n) = REFUSED.count() {
                        tracing::warn!("cache: LAN datagram from {src} refused: {e} ({n} so far)");
                    }
                    continue;
                }
            };
            match m {
                Lan::Query { id, url } => {
                    if src.ip() == self.me.ip() {
                        continue; // our own broadcast
                    }
                    let answer = match self.store.by_url(&url) {
                        Some(object) => Some(Lan::Have {
                            id,
                            object,
                            endpoint: self.me,
                        }),
                        None => {
                            let peers: Vec<_> = self
                                .known
                                .lock()
                                .expect("lock")
                                .holders(&url)
                                .into_iter()
                                .filter(|p| p.ip() != src.ip())
                                .collect();
                            (!peers.is_empty()).then_some(Lan::Know { id, peers })
                        }
                    };
                    // Nothing to say: say nothing, or a broadcast would
                    // bring an answer from everyone.
                    if let Some(a) = answer {
                        let _ = self
                            .udp
                            .send_to(&msg::seal_lan(&self.key, &a, now_ms()), src)
                            .await;
                    }
                }
                Lan::Have { id, .. } | Lan::Know { id, .. } => {
                    let tx = self.pending.lock().expect("lock").get(&id).cloned();
                    if let Some(tx) = tx {
                        let _ = tx.send((m, src));
                    }
                }
            }
        }
    }

    /// Sends a LAN datagram.
    async fn send_lan(&self, m: &Lan, to: SocketAddr) {
        let _ = self
            .udp
            .send_to(&msg::seal_lan(&self.key, m, now_ms()), to)
            .await;
    }
}

/// Prometheus families for the agent's `metrics`.
impl bond_api::Service for Cache {
    fn metrics(&self, m: &mut bond_api::Metrics) {
        let s = self.status();
        m.family(
            "bond_cache_fetches_total",
            "counter",
            "Objects the proxy answered, by where they came from.",
        );
        for (from, v) in [
            ("local", s.from_local),
            ("peer", s.from_peers),
            ("origin", s.from_origin),
        ] {
            m.sample("bond_cache_fetches_total", &[("source", from.into())], v);
        }
        m.family(
            "bond_cache_fetched_bytes_total",
            "counter",
            "Bytes fetched into the cache, by where they came from.",
        );
        for (from, v) in [
            ("peer", s.bytes_from_peers),
            ("origin", s.bytes_from_origin),
        ] {
            m.sample(
                "bond_cache_fetched_bytes_total",
                &[("source", from.into())],
                v,
            );
        }
        for (name, kind, help, v) in [
            ("bond_cache_bytes", "gauge", "Bytes held.", s.bytes),
            (
                "bond_cache_objects",
                "gauge",
                "Objects held.",
                s.objects as u64,
            ),
            (
                "bond_cache_uploads",
                "gauge",
                "Uploads to peers under way.",
                u64::from(s.load.uploads),
            ),
            (
                "bond_cache_sent_bytes_total",
                "counter",
                "Bytes sent to peers.",
                s.load.sent,
            ),
            (
                "bond_cache_refused_total",
                "counter",
                "Peer requests refused at the workload limit.",
                s.load.refused,
            ),
            (
                "bond_cache_corrupt_total",
                "counter",
                "Peer copies that failed verification.",
                s.corrupt_caught,
            ),
            (
                "bond_cache_lan_queries_total",
                "counter",
                "LAN queries (the referral server did not answer).",
                s.lan_queries,
            ),
        ] {
            m.family(name, kind, help);
            m.sample(name, &[], v);
        }
    }
}

/// `POST /cache/table` (`bond-ctl cache table`): the referral server's
/// table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableReport {
    pub objects: Vec<TableObject>,
    pub peers: Vec<PeerReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableObject {
    pub object: msg::Object,
    /// Best first.
    pub sources: Vec<msg::Source>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReport {
    pub endpoint: SocketAddr,
    /// Bytes/s clients measured from it (running average).
    pub bps: Option<f64>,
    pub load: msg::Load,
    /// Probes missed in a row.
    pub misses: u32,
    /// Times it was caught sending bad data.
    pub strikes: u32,
    /// Objects it has sent.
    pub uses: u64,
}

/// For the operator CLI: the cache status of this host (`GET /cache/status`
/// on its LAN address `ip`), or the referral server's table.
pub async fn ask_service(
    key: &CommunityKey,
    ip: Ipv4Addr,
    c: &CacheConfig,
    table: bool,
) -> Result<serde_json::Value> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let r = if table {
        let to = match (c.referral_server, c.referral) {
            (true, _) => SocketAddr::from((ip, c.port)),
            (false, Some(r)) => SocketAddr::from((r, c.port)),
            (false, None) => {
                anyhow::bail!("no referral server in [cache] (referral, referral_server)")
            }
        };
        let (body, sig) = bond_proto::signed::sign(key, "/cache/table", &(), now_ms());
        http.post(format!("http://{to}/cache/table"))
            .header(bond_proto::signed::SIG_HEADER, sig)
            .body(body)
            .send()
            .await
            .with_context(|| format!("asking the referral server at {to}"))?
    } else {
        let to = SocketAddr::from((ip, c.port));
        http.get(format!("http://{to}/cache/status"))
            .send()
            .await
            .with_context(|| format!("asking the cache at {to}: is the agent running?"))?
    };
    anyhow::ensure!(r.status().is_success(), "{}", r.status());
    Ok(r.json().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_holders_are_bounded_and_best_peers_ranked() {
        let mut k = Known::default();
        let p = |i: u8| SocketAddr::from(([10, 0, 1, i], 7801));
        for i in 0..KNOWN_URLS + 10 {
            k.learn(&format!("u{i}"), [p(2)]);
        }
        assert_eq!(k.holders.len(), KNOWN_URLS);
        assert!(k.holders("u0").is_empty());
        k.learn("x", [p(2), p(3)]);
        k.learn("x", [p(3), p(4)]);
        assert_eq!(k.holders("x"), [p(2), p(3), p(4)]);
        k.good.insert(p(2), 1e6);
        k.good.insert(p(3), 5e6);
        k.good.insert(p(4), 2e6);
        assert_eq!(k.best(2), [p(3), p(4)]);
        k.forget("x", p(3));
        assert_eq!(k.holders("x"), [p(2), p(4)]);
        assert_eq!(k.best(2), [p(4), p(2)]);
    }
}
