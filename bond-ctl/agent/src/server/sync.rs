//! Keeping the maps true: reloads, link MTUs, dark links and each
//! community's sessions, links and downstream schedule.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    time::Instant,
};

use anyhow::Result;
use bond_common::{
    edpf::DEFAULT_BACKLOG_US,
    maps::{LINK_V6, LINK_VALID, ServerLink},
};
use bond_config::{Config, ServerConfig};
use bond_proto::CommunityKey;

use super::{Agent, Applied};
use crate::{feedback::Model, pathmon, playout};

impl Agent {
    /// Reads the configuration file again and applies what may change
    /// while running: the communities and their keys, `misses`, `link_mtu`,
    /// `deny` (with `"local"` taken afresh from the host's interfaces) and
    /// the `[flows]` timeouts, sweep interval and `per_origin`. A file
    /// that fails its checks, or that changes anything else (which takes a
    /// restart: `detach`, then start the agent), changes nothing; the error
    /// says why. Returns the fields that changed.
    pub(super) fn reload(&mut self) -> Result<Vec<&'static str>, String> {
        let keep = "the running configuration stays";
        let new = match Config::load(&self.path) {
            Ok(Config::Server(s)) => s,
            Ok(Config::Terminal(_) | Config::Director(_)) => {
                return Err(format!("field `role` changed; {keep}"));
            }
            Err(e) => return Err(format!("{e}; {keep}")),
        };
        let (old, flows) = (&self.cfg, (&self.cfg.flows, &new.flows));
        let restart: Vec<&str> = [
            ("instance", old.instance != new.instance),
            ("address", old.address != new.address),
            ("port", old.port != new.port),
            ("nat_address", old.nat_address != new.nat_address),
            ("nat_address6", old.nat_address6 != new.nat_address6),
            ("nat_ports", old.nat_ports != new.nat_ports),
            ("nat_addresses", old.nat_addresses != new.nat_addresses),
            ("nat_block", old.nat_block != new.nat_block),
            ("nat_port_order", old.nat_port_order != new.nat_port_order),
            ("nat_log", old.nat_log != new.nat_log),
            ("interfaces", old.interfaces != new.interfaces),
            ("metrics", old.metrics != new.metrics),
            ("max_terminals", old.max_terminals != new.max_terminals),
            ("flows.max", flows.0.max != flows.1.max),
            ("tier", old.tier != new.tier),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        crate::refuse_restart_fields(&restart, keep)?;
        let keys = |c: &ServerConfig| -> Vec<(u32, CommunityKey)> {
            c.communities
                .iter()
                .map(|c| (c.id, c.key.clone()))
                .collect()
        };
        let changed: Vec<&'static str> = [
            ("communities", keys(old) != keys(&new)),
            (
                "terminals",
                old.communities
                    .iter()
                    .map(|c| &c.terminals)
                    .ne(new.communities.iter().map(|c| &c.terminals)),
            ),
            ("misses", old.misses != new.misses),
            ("link_mtu", old.link_mtu != new.link_mtu),
            ("flows", flows.0 != flows.1),
            ("deny", old.deny != new.deny),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        // "local" follows the host's interfaces as they are now.
        let deny =
            super::deny::prefixes(&new).map_err(|e| format!("field `deny`: {e:#}; {keep}"))?;
        let deny6 =
            super::deny::prefixes6(&new).map_err(|e| format!("field `deny`: {e:#}; {keep}"))?;
        // A node of a tier takes its communities from the registry.
        if new.tier.is_none() {
            self.keys = new
                .communities
                .iter()
                .map(|c| (c.id, c.key.clone()))
                .collect();
            self.set_identities(super::admit::Identities::from_config(&new));
        }
        self.table.set_misses(new.misses);
        self.cfg = new;
        self.map_cfg.per_origin = self.cfg.flows.per_origin;
        self.map_cfg.link_mtu = self.link_mtu();
        self.maps
            .set_server_config(self.map_cfg)
            .and_then(|()| self.maps.set_deny(&deny))
            .and_then(|()| self.maps.set_deny6(&deny6))
            .map_err(|e| format!("applying the new configuration: {e:#}"))?;
        // A log rotated away (logrotate's `create`) is written anew.
        self.nat
            .reopen_log(&self.cfg.nat_log())
            .map_err(|e| format!("NAT log {}: {e}", self.cfg.nat_log().display()))?;
        tracing::info!("configuration reloaded: {changed:?} changed");
        Ok(changed)
    }

    /// Serves what the registry says this node owns (`[tier]`): a new
    /// community is taken at once; one that moved away has its sessions
    /// closed and its links cleared, so its terminals log on at the new
    /// owner (its flows here are left to their idle timeouts: their
    /// packets go to the new owner now).
    pub(super) fn follow_registry(&mut self, served: bond_tier::node::Served) {
        let keys: BTreeMap<u32, CommunityKey> = served
            .communities
            .iter()
            .map(|(&id, key)| (id, CommunityKey::new(key.clone())))
            .collect();
        let gone: Vec<u32> = self
            .keys
            .keys()
            .filter(|c| !keys.contains_key(c))
            .copied()
            .collect();
        let taken = keys.keys().filter(|c| !self.keys.contains_key(c)).count();
        self.keys = keys;
        self.set_identities(super::admit::Identities::from_registry(
            &served.view,
            self.keys.keys(),
        ));
        for &c in &gone {
            for o in self.table.forget(c) {
                let r = self.maps.remove_session(c, o);
                self.faults.survive("remove_session", r.map_err(Into::into));
            }
            let r = self.apply(c);
            self.faults.survive("apply_links", r);
        }
        let was = (&self.served.registered, &self.served.controller);
        if taken > 0 || !gone.is_empty() || was != (&served.registered, &served.controller) {
            tracing::info!(
                "registry: serving {} communities ({taken} taken, {} given up){}{}",
                self.keys.len(),
                gone.len(),
                if served.registered {
                    ""
                } else {
                    "; not registered"
                },
                if served.controller {
                    "; controller"
                } else {
                    ""
                },
            );
        }
        self.served = served;
    }

    /// Takes `next` as the terminals each community takes by key; the
    /// sessions of those taken out or given a new key end at once (their
    /// packets are dropped from now on, both ways), and they are refused
    /// from their next login.
    pub(super) fn set_identities(&mut self, next: super::admit::Identities) {
        if next == self.identities {
            return;
        }
        let sessions = self.table.sessions(Instant::now());
        let revoked = self
            .identities
            .revoked(&next, sessions.iter().map(|&(c, o, ..)| (c, o)));
        self.identities = next;
        let mut changed = std::collections::BTreeSet::new();
        for (c, o) in revoked {
            let Some(token) = self.table.token(c, o) else {
                continue;
            };
            self.table.shutdown(c, o, token);
            tracing::warn!("community {c}: terminal {o} revoked: session ended");
            let r = self.maps.remove_session(c, o);
            self.faults.survive("remove_session", r.map_err(Into::into));
            changed.insert(c);
        }
        for c in changed {
            let r = self.apply(c);
            self.faults.survive("apply_links", r);
        }
    }

    /// While this node drains: lets the registry move each community it
    /// owns that has no live flows, as counted by a sweep that began
    /// after the drain did (one from before would miss a flow made just
    /// before); asked again every 2 s until the registry shows it. No
    /// longer draining, takes back what it let go.
    pub(super) fn release_idle(&mut self) {
        use bond_tier::node::Release;
        let (Some(node), Some(t)) = (&self.tier, &self.cfg.tier) else {
            return;
        };
        let view = &self.served.view;
        let me = &t.node;
        if !view.draining(me) {
            self.drain_seen = None;
            if !self.released.is_empty() || view.released.iter().any(|(n, _)| n == me) {
                node.release(Release::TakeBack);
                self.released.clear();
            }
            return;
        }
        let seen = *self.drain_seen.get_or_insert_with(Instant::now);
        let (live, counted) = &self.live_flows;
        if counted.is_none_or(|at| at < seen) {
            return;
        }
        for &c in self.served.communities.keys() {
            let live = live.get(&c).copied().unwrap_or(0);
            let shown = view.released.contains(&(me.clone(), c));
            let due = self
                .released
                .get(&c)
                .is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(2));
            if live == 0 && !shown && due {
                if !self.released.contains_key(&c) {
                    tracing::info!("draining: community {c} has no live flows: released");
                }
                node.release(Release::One(c));
                self.released.insert(c, Instant::now());
            }
        }
    }

    /// Lowers the datapath's `link_mtu` to the smallest MTU any live link
    /// announced (never above the configured one), and raises it again
    /// when that link leaves: replies that would not fit it wrapped get
    /// fragmentation needed. One value for all communities.
    pub(super) fn follow_link_mtu(
        &mut self,
        community: u32,
        rows: &[crate::membership::ServerLinkRow],
    ) -> Result<()> {
        // (A link over IPv6 announces its MTU less the 20 bytes more of
        // its outer header: the IPv4 form the datapath checks against.)
        match rows.iter().map(|r| r.mtu).filter(|&m| m != 0).min() {
            Some(m) => self.community_mtu.insert(community, m),
            None => self.community_mtu.remove(&community),
        };
        let mtu = self.link_mtu();
        if mtu != self.map_cfg.link_mtu {
            tracing::info!(
                "link_mtu {} -> {mtu} (smallest link announced)",
                self.map_cfg.link_mtu
            );
            self.map_cfg.link_mtu = mtu;
            self.maps.set_server_config(self.map_cfg)?;
        }
        Ok(())
    }

    /// The configured `link_mtu`, lowered to the smallest a link announced.
    pub(super) fn link_mtu(&self) -> u16 {
        self.community_mtu
            .values()
            .copied()
            .fold(self.cfg.link_mtu, u16::min)
            .max(bond_config::MIN_LINK_MTU)
    }

    /// Links whose owner's echoes stopped coming leave their community's
    /// downstream schedule. Only links whose echoes are late are looked
    /// at, and only their counters read.
    pub(super) fn check_dark(&mut self) -> Result<()> {
        let now = Instant::now();
        let due = self.echoes.due(now);
        if due.is_empty() {
            return Ok(());
        }
        let idxs: Vec<u32> = due
            .iter()
            .filter_map(|k| self.applied.get(k))
            .map(|a| a.idx)
            .collect();
        let received: HashMap<u32, u64> = match self.maps.server_links_stats(idxs) {
            Ok(stats) => stats.into_iter().map(|(i, s)| (i, s.up_pkts)).collect(),
            Err(e) => {
                // Looked at again on the next check.
                for key in due {
                    self.echoes.requeue(key);
                }
                return Err(e.into());
            }
        };
        let mut changed = Vec::new();
        for key @ (c, link) in due {
            let n = self
                .applied
                .get(&key)
                .and_then(|a| received.get(&a.idx))
                .copied();
            if self.echoes.look(key, now, n) {
                tracing::warn!("community {c}: link {link} silent: dark, out of use");
                changed.push(c);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        for c in changed {
            self.apply(c)?;
        }
        Ok(())
    }

    /// Writes a community's live links and downstream schedule. New links
    /// get an index before the schedule names them; departed ones leave the
    /// schedule before their entry is cleared. A link that is dark (by its
    /// owner's word or its missing echoes) stays registered but out of the
    /// schedule; each link's relative delay comes from the base round trips
    /// owners announce.
    pub(super) fn apply(&mut self, community: u32) -> Result<()> {
        let rows = self.table.links(Some(community), Instant::now());
        let mut weights = Vec::new();
        let mut rtts = Vec::new();
        let mut keep = Vec::new();
        for r in &rows {
            // A link over IPv6: its address in `S_LINKS6`, `ip` 0.
            let (ip, v6) = match r.addr {
                SocketAddr::V4(a) => (u32::from(*a.ip()), None),
                SocketAddr::V6(a) => (0, Some(*a.ip())),
            };
            let entry = ServerLink {
                ip,
                port: r.addr.port(),
                community,
                link: r.link,
                flags: LINK_VALID | if v6.is_some() { LINK_V6 } else { 0 },
                owner: u32::from(r.owner),
            };
            let write = |idx: u32| match v6 {
                Some(a) => self.maps.set_server_link6(idx, a, entry),
                None => self.maps.set_server_link(idx, entry),
            };
            let idx = match self.applied.get(&(community, r.link)) {
                Some(old) => {
                    if (old.entry, old.addr) != (entry, r.addr) {
                        write(old.idx)?;
                    }
                    old.idx
                }
                None => {
                    let idx = self.free_idx.pop().unwrap_or(self.next_idx);
                    write(idx)?;
                    self.next_idx = self.next_idx.max(idx + 1);
                    idx
                }
            };
            let applied = Applied {
                idx,
                entry,
                addr: r.addr,
            };
            self.applied.insert((community, r.link), applied);
            let dark = r.dark || self.echoes.is_dark(&(community, r.link));
            if !dark {
                // A rate learnt from the origins' feedback stands in for
                // the weight while it lasts.
                let rate = self.corrector.rate(Model::Down(community), idx);
                weights.push((idx, rate.unwrap_or(u64::from(r.down)), 0));
                rtts.push(r.rtt_us);
            }
            keep.push(r.link);
        }
        for ((w, d), rtt) in weights
            .iter_mut()
            .zip(pathmon::relative_delays(&rtts))
            .zip(&rtts)
        {
            // An adopted link keeps the delay the last agent gave it until
            // its owner announces a round trip: counted as unmeasured, it
            // would leave the schedule for up to an announce interval.
            w.2 = match self.adopted_delay.get(&(community, w.0)) {
                Some(&adopted) if *rtt == 0 => adopted,
                _ => d,
            };
        }
        if let Some(p) = &self.playout {
            // Upstream comes over the same links.
            p.set_floor(community, playout::floor_us(weights.iter().map(|w| w.2)));
        }
        self.maps.set_down_paths(
            community,
            &weights,
            DEFAULT_BACKLOG_US,
            crate::playout::MAX_WAIT_US as u32,
        )?;
        self.follow_link_mtu(community, &rows)?;
        tracing::info!(
            "community {community}: downstream paths {weights:?} (index, kbit/s, relative delay ns)"
        );
        let gone: Vec<(u32, u8)> = self
            .applied
            .range((community, 0)..=(community, u8::MAX))
            .filter(|((_, l), _)| !keep.contains(l))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.echoes.remove(k);
            if let Some(Applied { idx, .. }) = self.applied.remove(&k) {
                self.maps.clear_server_link(idx)?;
                self.corrector.forget(Model::Down(community), idx);
                self.adopted_delay.remove(&(community, idx));
                self.free_idx.push(idx);
            }
        }
        Ok(())
    }
}
