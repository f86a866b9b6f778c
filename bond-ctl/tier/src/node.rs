//! A node's part in the tier: it registers under a lease and keeps it,
//! mirrors the registry through a watch, publishes what it serves, and
//! stands for controller.
//!
//! Whatever goes wrong with etcd (a member down, the connection lost, the
//! lease run out) ends the session; the node keeps serving what it last
//! knew and starts a new one at once, with the same lease if it is still
//! alive (so a member's death moves nothing). A session's controller task
//! ends with it.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use etcd_client::{
    Client, Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn,
    TxnOp, WatchResponse,
};
use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use crate::layout::{Layout, NodeRecord, OwnerChange, View};

/// What a node is told to be.
#[derive(Debug, Clone)]
pub struct Settings {
    pub etcd: crate::Etcd,
    pub layout: Layout,
    pub name: String,
    pub record: NodeRecord,
    /// The lease's time to live: how long after the node stops renewing
    /// it (dies, or loses etcd) its communities move.
    pub lease: Duration,
}

/// What the node serves, as the registry last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// Its record is in etcd, on a live lease.
    pub registered: bool,
    /// It is the elected controller.
    pub controller: bool,
    /// The communities it owns, with their keys.
    pub communities: BTreeMap<u32, String>,
    /// Registry entries it could not read (named in its log).
    pub bad: usize,
    /// The whole registry as last read (who owns the other communities,
    /// and where the other nodes are).
    pub view: std::sync::Arc<View>,
}

/// What a draining node tells the registry of its communities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// It has no live flows in this community: it may move.
    One(u32),
    /// No longer draining: what it released is taken back.
    TakeBack,
}

/// A node in the tier. Dropping it leaves the lease to run out.
pub struct Node {
    pub served: watch::Receiver<Served>,
    release: tokio::sync::mpsc::UnboundedSender<Release>,
    leave: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    /// Answers directors' health checks (`crate::health`).
    health: Option<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Starts registering (in the background: an etcd that is not up
    /// yet is tried again each second), and answering health checks on
    /// `health` (bound to the record's address and port) while the node
    /// lives.
    pub fn join(settings: Settings, health: Option<tokio::net::UdpSocket>) -> Self {
        let (tx, served) = watch::channel(Served::default());
        let (leave, left) = oneshot::channel();
        let (release, released) = tokio::sync::mpsc::unbounded_channel();
        let health =
            health.map(|sock| tokio::spawn(crate::health::answer_on(sock, settings.name.clone())));
        let task = tokio::spawn(run(settings, tx, left, released));
        Self {
            served,
            release,
            leave: Some(leave),
            task,
            health,
        }
    }

    /// While draining: tells the registry what this node lets go (written
    /// on its lease, so a node that dies takes its word with it).
    pub fn release(&self, r: Release) {
        let _ = self.release.send(r);
    }

    /// Gives the lease back, so the node's communities move at once rather
    /// than when it runs out (a stop, not a detach).
    pub async fn leave(mut self) {
        if let Some(tx) = self.leave.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(crate::CALL_TIMEOUT, &mut self.task).await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(h) = &self.health {
            h.abort();
        }
    }
}

/// The lease a node holds across sessions: a session that breaks (the
/// etcd member it talked to died) goes on with the same lease from
/// another member, as long as the lease has not run out meanwhile, so
/// the node's record, its communities and its candidacy stay.
#[derive(Debug, Default)]
struct Held {
    lease: Option<i64>,
    /// When etcd last said the lease is alive.
    renewed: Option<Instant>,
}

impl Held {
    /// The lease, if etcd renewed it within `within`.
    fn renewed_within(&self, within: Duration) -> Option<i64> {
        self.lease
            .filter(|_| self.renewed.is_some_and(|r| r.elapsed() < within))
    }
}

type Releases = tokio::sync::mpsc::UnboundedReceiver<Release>;

async fn run(
    s: Settings,
    tx: watch::Sender<Served>,
    mut left: oneshot::Receiver<()>,
    mut releases: Releases,
) {
    let mut held = Held::default();
    let mut fails = 0u32;
    loop {
        let start = Instant::now();
        match session(&s, &tx, &mut held, &mut left, &mut releases).await {
            Ok(()) => return,
            Err(e) => {
                // Quickly at first (another member will do), then less
                // often while etcd stays out of reach.
                if start.elapsed() > Duration::from_secs(10) {
                    fails = 0;
                }
                let wait = Duration::from_millis(100 << fails.min(4));
                fails += 1;
                tracing::warn!("registry: {e:#}; trying again in {wait:?}");
                // etcd alone says when a lease is gone (it extends every
                // lease when a new etcd leader takes over, so renewals that
                // stall through an election lose nothing); a node that
                // cannot ask for three lease times counts itself out.
                let alive = held.renewed_within(s.lease * 3).is_some();
                tx.send_modify(|s| {
                    s.registered &= alive;
                    s.controller = false;
                });
                tokio::select! {
                    _ = &mut left => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Aborts a task when dropped: the controller ends with its session.
struct Abort(tokio::task::AbortHandle);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The lease `held` if etcd still has it (renewed now), else a new one;
/// with its renewal stream.
async fn hold_lease(
    client: &mut Client,
    held: &mut Held,
    ttl: Duration,
) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream)> {
    if let Some(lease) = held.lease {
        let (mut keeper, mut kept) = client
            .lease_keep_alive(lease)
            .await
            .context("keeping the lease")?;
        keeper.keep_alive().await.context("renewing the lease")?;
        let answer = tokio::time::timeout(crate::CALL_TIMEOUT, kept.message())
            .await
            .context("renewing the lease: no answer")?;
        match answer.context("renewing the lease")? {
            Some(r) if r.ttl() > 0 => {
                held.renewed = Some(Instant::now());
                return Ok((lease, keeper, kept));
            }
            _ => tracing::warn!("registry: lease {lease:x} ran out; taking a new one"),
        }
    }
    let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(secs, None)
        .await
        .context("asking for a lease")?
        .id();
    *held = Held {
        lease: Some(lease),
        renewed: Some(Instant::now()),
    };
    let (keeper, kept) = client
        .lease_keep_alive(lease)
        .await
        .context("keeping the lease")?;
    Ok((lease, keeper, kept))
}

async fn session(
    s: &Settings,
    tx: &watch::Sender<Served>,
    held: &mut Held,
    left: &mut oneshot::Receiver<()>,
    releases: &mut Releases,
) -> Result<()> {
    let (mut client, member) = crate::connect_one(&s.etcd).await?;
    let ttl = i64::try_from(s.lease.as_secs().max(1)).unwrap_or(i64::MAX);
    let (lease, mut keeper, mut kept) = hold_lease(&mut client, held, s.lease).await?;
    client
        .put(
            s.layout.node(&s.name),
            serde_json::to_vec(&s.record)?,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .context("registering")?;
    // The candidacy's calls go to the same member: losing it ends the
    // session either way.
    let patient = crate::connect_patient(&s.etcd, member).await?;
    let stand = stand(patient, client.clone(), s.clone(), lease, tx.clone());
    let mut controller = tokio::spawn(stand);
    let _controller = Abort(controller.abort_handle());
    let (mut view, mut watch) = crate::follow_from_now(&mut client, &s.layout).await?;
    tracing::info!(
        "registry: node {} registered (lease {lease:x}, {} s)",
        s.name,
        ttl
    );
    publish(tx, &view, &s.name);
    let mut renew = tokio::time::interval(s.lease / 4);
    loop {
        tokio::select! {
            _ = &mut *left => {
                let r = tokio::time::timeout(crate::CALL_TIMEOUT, client.lease_revoke(lease)).await;
                match r {
                    Ok(Ok(_)) => tracing::info!("registry: node {} left (lease given back)", s.name),
                    _ => tracing::warn!("registry: giving the lease back failed; it runs out in {ttl} s"),
                }
                return Ok(());
            }
            _ = renew.tick() => {
                // Renewals go through etcd's leader: a member cut off from
                // it answers none. Another member may do better.
                if held.renewed_within(s.lease).is_none() {
                    bail!("the lease was not renewed for {:?}", s.lease);
                }
                keeper.keep_alive().await.context("renewing the lease")?;
            }
            m = kept.message() => match m.context("renewing the lease")? {
                Some(r) if r.ttl() > 0 => held.renewed = Some(Instant::now()),
                Some(_) => {
                    held.lease = None;
                    bail!("the lease ran out");
                }
                None => bail!("etcd ended the lease's renewals"),
            },
            // The controller's task ends only on an error: a new session
            // stands again (with the same lease: etcd resumes the same
            // candidacy) rather than a node that won the election and
            // controls nothing.
            _ = &mut controller => bail!("the controller stopped"),
            Some(r) = releases.recv() => match r {
                Release::One(c) => {
                    let opts = PutOptions::new().with_lease(lease);
                    client
                        .put(s.layout.released(&s.name, c), "", Some(opts))
                        .await
                        .context("releasing a community")?;
                }
                Release::TakeBack => {
                    let opts = etcd_client::DeleteOptions::new().with_prefix();
                    client
                        .delete(s.layout.released_by(&s.name), Some(opts))
                        .await
                        .context("taking released communities back")?;
                }
            },
            m = watch.message() => {
                apply(&mut view, &s.layout, m)?;
                apply_queued(&mut view, &s.layout, &mut watch).await?;
                if !view.nodes.contains_key(&s.name) {
                    bail!("this node's record is gone from the registry");
                }
                publish(tx, &view, &s.name);
            }
        }
    }
}

/// Takes every watch message already waiting into `view` too, so that a
/// node behind a burst (a controller placing thousands of communities)
/// publishes once for all of it rather than once per message (each
/// publish copies the whole registry).
pub(crate) async fn apply_queued(
    view: &mut View,
    layout: &Layout,
    watch: &mut etcd_client::WatchStream,
) -> Result<()> {
    while let Ok(m) = tokio::time::timeout(Duration::ZERO, watch.message()).await {
        apply(view, layout, m)?;
    }
    Ok(())
}

/// Takes one watch message into `view`.
pub(crate) fn apply(
    view: &mut View,
    layout: &Layout,
    m: Result<Option<WatchResponse>, etcd_client::Error>,
) -> Result<()> {
    let m = m
        .context("watching the registry")?
        .context("etcd ended the watch")?;
    if m.canceled() {
        bail!("etcd cancelled the watch: {}", m.cancel_reason());
    }
    for ev in m.events() {
        let Some(kv) = ev.kv() else { continue };
        let key = String::from_utf8_lossy(kv.key());
        match ev.event_type() {
            EventType::Put => view.put(layout, &key, kv.value()),
            EventType::Delete => view.delete(layout, &key),
        }
    }
    Ok(())
}

fn publish(tx: &watch::Sender<Served>, view: &View, name: &str) {
    let communities = view.served(name);
    tx.send_if_modified(|s| {
        if s.bad != view.bad.len() {
            for (key, why) in &view.bad {
                tracing::warn!("registry: {key} left out: {why}");
            }
        }
        let new = Served {
            registered: true,
            controller: s.controller,
            communities: communities.clone(),
            bad: view.bad.len(),
            view: std::sync::Arc::new(view.clone()),
        };
        let changed = *s != new;
        *s = new;
        changed
    });
}

/// Most operations in one transaction (etcd's default limit is 128).
const TXN_OPS: usize = 100;

/// Stands for controller with the session's lease (on `patient`, whose
/// calls have no timeout: the campaign returns only once elected); once
/// elected, places communities until the session ends.
async fn stand(
    mut patient: Client,
    mut client: Client,
    s: Settings,
    lease: i64,
    tx: watch::Sender<Served>,
) {
    if let Err(e) = lead(&mut patient, &mut client, &s, lease, &tx).await {
        tracing::warn!("controller: {e:#}");
    }
    tx.send_modify(|s| s.controller = false);
}

async fn lead(
    patient: &mut Client,
    client: &mut Client,
    s: &Settings,
    lease: i64,
    tx: &watch::Sender<Served>,
) -> Result<()> {
    let elected = patient
        .campaign(s.layout.election(), s.name.as_str(), lease)
        .await
        .context("standing for controller")?;
    let leader = elected.leader().context("etcd named no leader key")?;
    let (key, rev) = (leader.key().to_vec(), leader.rev());
    tx.send_modify(|s| s.controller = true);
    tracing::info!("controller: node {} elected", s.name);
    let (mut view, mut watch) = crate::follow_from_now(client, &s.layout).await?;
    // Drains' deadlines pass without a change in the registry.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let plan = view.plan(crate::unix_now());
        if !plan.is_empty() {
            for chunk in plan.chunks(TXN_OPS) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|ch| match ch {
                        OwnerChange::Set(c, node) => {
                            TxnOp::put(s.layout.owner(*c), node.as_str(), None)
                        }
                        OwnerChange::Remove(c) => TxnOp::delete(s.layout.owner(*c), None),
                    })
                    .collect();
                // Written only while this node's election key is the one
                // etcd made when it won: a deposed controller writes nothing.
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, rev)])
                    .and_then(ops);
                if !client.txn(txn).await.context("writing owners")?.succeeded() {
                    bail!("no longer the controller");
                }
            }
            log_plan(&view, &plan);
            // Written: the view has it now, not when the watch brings it
            // back (messages queued before it would otherwise each plan
            // and write every owner still on the way again).
            for ch in &plan {
                match ch {
                    OwnerChange::Set(c, node) => {
                        view.put(&s.layout, &s.layout.owner(*c), node.as_bytes())
                    }
                    OwnerChange::Remove(c) => view.delete(&s.layout, &s.layout.owner(*c)),
                }
            }
        }
        tokio::select! {
            m = watch.message() => {
                apply(&mut view, &s.layout, m)?;
                apply_queued(&mut view, &s.layout, &mut watch).await?;
            }
            _ = tick.tick() => {}
        }
    }
}

fn log_plan(view: &View, plan: &[OwnerChange]) {
    let (mut placed, mut moved, mut removed) = (0, 0, 0);
    for ch in plan {
        match ch {
            OwnerChange::Set(c, node) => match view.owners.get(c) {
                Some(from) => {
                    moved += 1;
                    tracing::debug!("controller: community {c} moves from {from} to {node}");
                }
                None => {
                    placed += 1;
                    tracing::debug!("controller: community {c} placed on {node}");
                }
            },
            OwnerChange::Remove(c) => {
                removed += 1;
                tracing::debug!("controller: community {c} has no owner now");
            }
        }
    }
    tracing::info!(
        "controller: {placed} communities placed, {moved} moved, {removed} owners removed"
    );
}
