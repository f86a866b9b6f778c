//! The ISP tier: many reconstitution nodes share one site's communities,
//! coordinated through etcd.
//!
//! Each node registers itself under a lease ([`node::join`]), mirrors the
//! registry ([`layout::View`]) through a watch and serves the communities
//! the registry says it owns. One node at a time, elected through etcd,
//! is the controller: it places communities that have no live owner
//! ([`owner::assign`]) and writes `P/owners/`. Flow and NAT state never
//! leave the node that made them; etcd holds only membership and
//! configuration. [`admin`] is the operator's side.

pub mod admin;
pub mod health;
pub mod layout;
pub mod mirror;
pub mod node;
pub mod owner;

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions, WatchStream};

pub use layout::{Layout, View};

/// How long a call to etcd may take before the node gives up on it (and
/// on the connection).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The time as the registry's deadlines count it: Unix seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The registry's etcd, and who this client is to it.
#[derive(Clone)]
pub struct Etcd {
    /// Client URLs, `http://host:port`: any member will do.
    pub endpoints: Vec<String>,
    /// A user and its password, where etcd's authentication is on.
    pub user: Option<(String, String)>,
}

impl Etcd {
    /// No authentication.
    pub fn open(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            user: None,
        }
    }
}

impl std::fmt::Debug for Etcd {
    /// The user's name, never its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Connects to any member of `etcd`; each call may take
/// [`CALL_TIMEOUT`].
pub async fn connect(etcd: &Etcd) -> Result<Client> {
    Ok(connect_with(etcd, None, Some(CALL_TIMEOUT)).await?.0)
}

/// As [`connect`], and which endpoint answered.
pub async fn connect_one(etcd: &Etcd) -> Result<(Client, usize)> {
    connect_with(etcd, None, Some(CALL_TIMEOUT)).await
}

/// As [`connect`], for calls that wait as long as they must (standing
/// for election), trying endpoint `first` first (a node keeps to one
/// member): a dead connection is still found by its keep-alive pings.
pub async fn connect_patient(etcd: &Etcd, first: usize) -> Result<Client> {
    Ok(connect_with(etcd, Some(first), None).await?.0)
}

/// One member at a time: a balanced channel over all of them sends some
/// calls to a member that is down and fails them. The first member (from
/// `first`, or a varying start, to spread the nodes) that answers a
/// status call is used until a call fails; the caller then connects
/// again (which also authenticates again: an idle token expires).
async fn connect_with(
    etcd: &Etcd,
    first: Option<usize>,
    timeout: Option<Duration>,
) -> Result<(Client, usize)> {
    let endpoints = &etcd.endpoints;
    if endpoints.is_empty() {
        bail!("no etcd endpoint given");
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(CALL_TIMEOUT)
        // etcd refuses pings more often than every 5 s (its
        // --grpc-keepalive-min-time) and closes the connection.
        .with_keep_alive(Duration::from_secs(6), CALL_TIMEOUT)
        .with_keep_alive_while_idle(true);
    if let Some(t) = timeout {
        opts = opts.with_timeout(t);
    }
    if let Some((user, password)) = &etcd.user {
        opts = opts.with_user(user, password);
    }
    let start = first.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize)
    });
    let mut errors = Vec::new();
    for k in 0..endpoints.len() {
        let i = (start + k) % endpoints.len();
        let ep = &endpoints[i];
        let tried = async {
            let mut c = Client::connect([ep], Some(opts.clone())).await?;
            c.status().await?;
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(CALL_TIMEOUT, tried).await {
            Ok(Ok(c)) => return Ok((c, i)),
            Ok(Err(e)) => errors.push(format!("{ep}: {e}")),
            Err(_) => errors.push(format!("{ep}: no answer in {CALL_TIMEOUT:?}")),
        }
    }
    bail!("no etcd member answers ({})", errors.join("; "))
}

/// The registry as of now, and a watch on every change after it: how a
/// node, its controller and a director each follow it.
pub async fn follow_from_now(client: &mut Client, layout: &Layout) -> Result<(View, WatchStream)> {
    let (view, rev) = snapshot(client, layout).await?;
    let stream = client
        .watch(
            layout.all(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .context("watching the registry")?;
    Ok((view, stream))
}

/// Keys read per call: a whole registry of tens of thousands of
/// communities in one answer would pass gRPC's 4 MiB message limit.
const PAGE: i64 = 2000;

/// Everything under the layout's prefix, and the revision it is as of
/// (read page by page, every page at that one revision).
pub async fn snapshot(client: &mut Client, layout: &Layout) -> Result<(View, i64)> {
    let prefix = layout.all().into_bytes();
    // The end of the prefix's range: its last byte plus one ("/" + 1).
    let mut end = prefix.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let mut view = View::default();
    let mut from = prefix;
    let mut rev = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if rev > 0 {
            opts = opts.with_revision(rev);
        }
        let resp = client
            .get(from.clone(), Some(opts))
            .await
            .context("reading the registry")?;
        if rev == 0 {
            rev = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            view.put(layout, &String::from_utf8_lossy(kv.key()), kv.value());
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((view, rev)),
        }
    }
}
