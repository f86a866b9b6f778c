//! Relay-tree distribution (US 8,495,167): a main server pushes a file to
//! many terminals, the fastest first, each relaying to its share of the
//! rest while it still receives.
//!
//! - [`plan`]: who sends to whom (interleaved shares, promotion);
//! - [`chunk`]: the manifest, chunk verification and the seal chunks
//!   travel in;
//! - [`db`]: the network information database;
//! - [`msg`]: the signed messages between services;
//! - [`frame`]: the frames chunks stream in;
//! - [`service`]: the HTTP service every terminal runs;
//! - [`main_server`]: `bond-ctl distribute`.

pub mod chunk;
pub mod db;
pub mod frame;
pub mod main_server;
pub mod msg;
pub mod plan;
pub mod service;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use bond_proto::{CommunityKey, now_ms};

/// How often a peer's row is refreshed from its announces.
const SEEN_EVERY: Duration = Duration::from_secs(10);

/// The distribution service inside a terminal's agent: it serves and
/// fetches files, and keeps the network information database up to date
/// from the peers' announces.
pub struct Dist {
    pub service: Arc<service::Service>,
    port: u16,
    seen: std_mpsc::Sender<(String, SocketAddr, Option<f64>)>,
    last: Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl Dist {
    /// Starts the service on `lan_ip:port`, with its state under `state`.
    pub async fn start(
        key: &CommunityKey,
        lan_ip: Ipv4Addr,
        port: u16,
        state: &Path,
    ) -> Result<Self> {
        let me = SocketAddr::from((lan_ip, port));
        let service = service::Service::new(key, &state.join("files"), me, None)?;
        let listener = tokio::net::TcpListener::bind(me)
            .await
            .with_context(|| format!("field `dist.port`: listening on {me}"))?;
        let s = service.clone();
        tokio::spawn(async move {
            if let Err(e) = s.serve(listener).await {
                tracing::error!("dist: service stopped: {e:#}");
            }
        });
        // SQLite is blocking: the database has a thread of its own.
        let mut db = db::NetDb::open(&state.join("net.db"))?;
        let (seen, rx) = std_mpsc::channel::<(String, SocketAddr, Option<f64>)>();
        std::thread::spawn(move || {
            for (id, endpoint, kbps) in rx {
                if let Err(e) = db.saw_terminal(&id, endpoint, kbps, now_ms() as i64) {
                    tracing::warn!("dist: database: {e:#}");
                }
            }
        });
        tracing::info!("dist: serving on {me}, state in {}", state.display());
        Ok(Self {
            service,
            port,
            seen,
            last: Mutex::default(),
        })
    }
}

impl bond_api::Service for Dist {
    /// A peer announced itself with links of these upstream rates.
    fn saw_peer(&self, ip: Ipv4Addr, up_kbps: Option<f64>) {
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.get(&ip).is_some_and(|t| now - *t < SEEN_EVERY) {
                return;
            }
            last.insert(ip, now);
        }
        let _ = self
            .seen
            .send((ip.to_string(), SocketAddr::from((ip, self.port)), up_kbps));
    }
}
