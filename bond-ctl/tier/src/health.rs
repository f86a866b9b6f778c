//! Health checks: a director asks every node "are you there?" several
//! times a second over UDP, and fences a node that stops answering by
//! revoking its lease ([`fence`]): etcd drops its record at once, the
//! controller moves its communities as when a node stops, and terminals
//! log on at the new owner well before the lease would have run out.
//!
//! The node's agent answers (the process that also keeps its lease), on
//! its own address, so each node is asked apart from the others behind
//! the front address. A probe is `bondhc`, a version byte and a sequence
//! number; the answer is the probe followed by the node's name.
//!
//! Fencing wrongly costs a node its communities (they move; their flows'
//! NAT state stays behind), so [`Health`] fences only a node that has
//! answered before and fell silent while another node still answers: a
//! director cut off from all nodes fences none.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use etcd_client::Client;

use crate::Layout;

const MAGIC: &[u8; 6] = b"bondhc";
const VERSION: u8 = 1;
/// A probe's length: magic, version, sequence number.
pub const PROBE_LEN: usize = MAGIC.len() + 1 + 4;

/// The probe numbered `seq`.
pub fn probe(seq: u32) -> [u8; PROBE_LEN] {
    let mut p = [0; PROBE_LEN];
    p[..6].copy_from_slice(MAGIC);
    p[6] = VERSION;
    p[7..].copy_from_slice(&seq.to_be_bytes());
    p
}

/// A node's answer to `datagram`, if it is a probe.
pub fn answer(datagram: &[u8], node: &str) -> Option<Vec<u8>> {
    let probe = datagram.get(..PROBE_LEN)?;
    if datagram.len() != PROBE_LEN || probe[..6] != *MAGIC || probe[6] != VERSION {
        return None;
    }
    Some([probe, node.as_bytes()].concat())
}

/// The sequence number and node name an answer carries.
pub fn parse_answer(datagram: &[u8]) -> Option<(u32, &str)> {
    let (probe, name) = datagram.split_at_checked(PROBE_LEN)?;
    if probe[..6] != *MAGIC || probe[6] != VERSION {
        return None;
    }
    let seq = u32::from_be_bytes(probe[7..].try_into().ok()?);
    Some((seq, std::str::from_utf8(name).ok()?))
}

/// What the checks know of one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeHealth {
    /// When it last answered (never: not known to run checks, so never
    /// fenced).
    pub heard: Option<Instant>,
    /// Its last answer's round trip.
    pub rtt: Option<Duration>,
    /// When it was last fenced (tried again a second later if its
    /// record is still there).
    pub fenced: Option<Instant>,
}

/// The checks' state over the registry's nodes.
#[derive(Debug, Clone, Default)]
pub struct Health {
    nodes: BTreeMap<String, NodeHealth>,
    /// Probes in flight: sequence number -> when it was sent.
    sent: BTreeMap<u32, Instant>,
    seq: u32,
}

/// How long after fencing a node that is still registered it is fenced
/// again (the first revocation was lost, or etcd was out of reach).
const FENCE_AGAIN: Duration = Duration::from_secs(1);

impl Health {
    /// Keeps the nodes named (the registry's), forgetting the others; a
    /// node new to it is not known to answer yet.
    pub fn keep<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        let mut kept = BTreeMap::new();
        for n in names {
            kept.insert(n.to_string(), self.nodes.remove(n).unwrap_or_default());
        }
        self.nodes = kept;
    }

    /// The next probe to send to every node, at `now`.
    pub fn next_probe(&mut self, now: Instant) -> [u8; PROBE_LEN] {
        self.seq = self.seq.wrapping_add(1);
        self.sent.insert(self.seq, now);
        // Only the last few matter: an answer later than that is silence.
        while self.sent.len() > 64 {
            self.sent.pop_first();
        }
        probe(self.seq)
    }

    /// Takes an answer received at `now`; false if it answers nothing
    /// sent (or names a node not in the registry).
    pub fn heard(&mut self, datagram: &[u8], now: Instant) -> bool {
        let Some((seq, name)) = parse_answer(datagram) else {
            return false;
        };
        let (Some(&sent), Some(n)) = (self.sent.get(&seq), self.nodes.get_mut(name)) else {
            return false;
        };
        n.heard = Some(now);
        n.rtt = Some(now.saturating_duration_since(sent));
        n.fenced = None;
        true
    }

    /// Nodes to fence at `now`: each answered once, has been silent for
    /// `timeout`, and was not fenced in the last second, while another
    /// node answered within `timeout`.
    pub fn to_fence(&self, now: Instant, timeout: Duration) -> Vec<String> {
        let silent = |h: &NodeHealth| h.heard.is_some_and(|t| now.duration_since(t) >= timeout);
        if !self.nodes.values().any(|h| h.heard.is_some() && !silent(h)) {
            return Vec::new();
        }
        self.nodes
            .iter()
            .filter(|(_, h)| silent(h))
            .filter(|(_, h)| {
                h.fenced
                    .is_none_or(|f| now.duration_since(f) >= FENCE_AGAIN)
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn fenced(&mut self, node: &str, now: Instant) {
        if let Some(h) = self.nodes.get_mut(node) {
            h.fenced = Some(now);
        }
    }

    pub fn get(&self, node: &str) -> Option<&NodeHealth> {
        self.nodes.get(node)
    }
}

/// Answers every probe that comes to `sock` with `node`'s name, until
/// the task is aborted (a node's agent: see [`crate::node::Node::join`]).
pub async fn answer_on(sock: tokio::net::UdpSocket, node: String) {
    let mut buf = [0u8; 64];
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                if let Some(a) = answer(&buf[..n], &node) {
                    // A lost answer is a missed probe: the next one counts.
                    let _ = sock.send_to(&a, from).await;
                }
            }
            Err(e) => {
                tracing::warn!("health checks: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Revokes `node`'s lease: etcd deletes its record (and its candidacy)
/// at once, and the controller places its communities elsewhere. False
/// if it has no record (or no lease) any more.
pub async fn fence(client: &mut Client, layout: &Layout, node: &str) -> Result<bool> {
    let got = client
        .get(layout.node(node), None)
        .await
        .with_context(|| format!("reading node {node}'s record"))?;
    let Some(lease) = got.kvs().first().map(|kv| kv.lease()).filter(|&l| l != 0) else {
        return Ok(false);
    };
    match client.lease_revoke(lease).await {
        Ok(_) => Ok(true),
        // Gone meanwhile (another director, or it ran out).
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Ok(false),
        Err(e) => Err(e).with_context(|| format!("revoking node {node}'s lease {lease:x}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_is_answered_with_its_number_and_the_name() {
        let p = probe(7);
        let a = answer(&p, "n2").unwrap();
        assert_eq!(parse_answer(&a), Some((7, "n2")));
        // Not probes: short, long, another magic or version.
        assert_eq!(answer(&p[..PROBE_LEN - 1], "n2"), None);
        assert_eq!(answer(&[&p[..], b"x"].concat(), "n2"), None);
        let mut other = p;
        other[0] = b'x';
        assert_eq!(answer(&other, "n2"), None);
        other = p;
        other[6] = 2;
        assert_eq!(answer(&other, "n2"), None);
        assert_eq!(parse_answer(&p[..5]), None);
        assert_eq!(parse_answer(&[&p[..], &[0xff][..]].concat()), None);
    }

    #[test]
    fn a_silent_node_is_fenced_only_while_another_answers() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let timeout = Duration::from_millis(300);
        let mut h = Health::default();
        h.keep(["n1", "n2", "n3"]);
        let p = h.next_probe(t0);
        assert!(h.heard(&answer(&p, "n1").unwrap(), ms(1)));
        assert!(h.heard(&answer(&p, "n2").unwrap(), ms(2)));
        assert!(
            !h.heard(&answer(&p, "n9").unwrap(), ms(2)),
            "not in the registry"
        );
        assert!(
            !h.heard(&answer(&probe(999), "n1").unwrap(), ms(2)),
            "never sent"
        );
        assert_eq!(h.get("n1").unwrap().rtt, Some(Duration::from_millis(1)));
        // n3 never answered: not known to run checks, never fenced.
        assert!(h.to_fence(ms(250), timeout).is_empty());
        let p = h.next_probe(ms(300));
        assert!(h.heard(&answer(&p, "n2").unwrap(), ms(301)));
        assert_eq!(h.to_fence(ms(301), timeout), ["n1"]);
        h.fenced("n1", ms(301));
        assert!(
            h.to_fence(ms(400), timeout).is_empty(),
            "fenced a moment ago"
        );
        // Everyone silent: this director is the one cut off.
        assert!(h.to_fence(ms(2000), timeout).is_empty());
        // n1 answers again: up, and no longer fenced.
        let p = h.next_probe(ms(2000));
        assert!(h.heard(&answer(&p, "n1").unwrap(), ms(2001)));
        assert_eq!(h.to_fence(ms(2001), timeout), ["n2"]);
        // A node that leaves the registry is forgotten; one that comes
        // back starts unknown.
        h.keep(["n1", "n3"]);
        assert!(h.get("n2").is_none());
        h.keep(["n1", "n2", "n3"]);
        assert_eq!(h.get("n2").unwrap().heard, None);
    }
}
