//! Keeping the maps true: the schedule and links the programs read, the
//! capture route, the peers' links, and the playout.

use super::*;

impl Agent {
    /// Creates the hold device, puts the receive program on it and starts
    /// the playout, which then tells the datapath to hold.
    pub(super) async fn start_playout(
        &mut self,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
        reports: playout::ReportTx,
    ) -> Result<()> {
        let name = hold_name(&self.cfg.device);
        // What comes back is addressed to this host from anywhere: not a
        // spoof on this device (loose reverse-path filtering).
        let (tap, dev) = playout::hold_device(&self.net, &name, "2", true).await?;
        pins.attach_xdp(ebpf, "bond_terminal", &name)?;
        let maps = self.maps.clone();
        let p = playout::Handle::start(tap, dev.index, dev.mac, maps, name::T_HOLD, reports)?;
        self.playout = Some(p);
        Ok(())
    }

    /// Routes the capture prefixes into the capture device while the
    /// terminal can bond; with `fallback = "direct"`, withdraws them while
    /// it cannot, so that the host's own routes carry its traffic (new
    /// connections; those already bonded had the server's address and
    /// end).
    pub(super) async fn sync_capture(&mut self) -> Result<()> {
        if self.schedule.is_none() && self.adopted {
            // Until this agent has its schedule, an adopted datapath keeps
            // the routes the last agent left.
            return Ok(());
        }
        let want = capture_wanted(self.cfg.fallback, self.can_bond());
        if self.captured == Some(want) {
            return Ok(());
        }
        for p in &self.cfg.capture {
            if want {
                self.net
                    .route_to(p.addr, p.len, self.capture.index, self.lan_ip)
                    .await?;
            } else {
                self.net
                    .delete_route_to(p.addr, p.len, self.capture.index)
                    .await?;
            }
        }
        if !want {
            tracing::warn!(
                "cannot bond ({}): captured traffic goes by the host's own routes \
                 until it can (fallback = \"direct\")",
                if self.token.is_none() {
                    "no session"
                } else {
                    "no link reaches the server"
                }
            );
        } else if self.cfg.fallback == Fallback::Direct {
            tracing::info!("bonding: captured traffic goes into {}", self.cfg.device);
        }
        self.captured = Some(want);
        Ok(())
    }

    /// Puts back routes to the server that could not be put in, re-resolves
    /// next hops, reads the links' counters (traffic from a peer's link is
    /// a sign of that peer's life), and rewrites what changed.
    pub(super) async fn refresh(&mut self) -> Result<()> {
        for i in 0..self.own.len() {
            self.route(i).await;
        }
        let mut resolved = false;
        for i in 0..self.own.len() {
            let o = &self.own[i];
            if !o.iface.ethernet && !o.dark_by_kernel() && o.entry.flags & LINK_VALID == 0 {
                resolved = true;
                self.l3_valid(i)?;
            }
        }
        let placed =
            |o: &&mut Own| o.iface.index != 0 && o.iface.ethernet && !o.gateway.is_unspecified();
        for o in self.own.iter_mut().filter(placed) {
            match self.net.neighbor(o.iface.index, o.gateway).await? {
                Some(mac) if mac != o.entry.dst_mac || o.entry.flags & LINK_VALID == 0 => {
                    resolved |= o.entry.flags & LINK_VALID == 0;
                    o.entry.dst_mac = mac;
                    o.entry.flags = LINK_VALID | o.kind();
                    o.relay.gw_mac = mac;
                    self.maps.set_up_link(o.ad.id, o.entry)?;
                    self.maps.set_relay_link(o.ad.port, o.relay)?;
                }
                Some(_) => {}
                None if o.entry.flags & LINK_VALID == 0 && !o.dark_by_kernel() => {
                    o.resolve_afresh(&self.net).await;
                }
                None => {
                    let _ = poke_neighbor(&o.iface.name, o.gateway);
                }
            }
        }
        if resolved && self.token.is_some() {
            // A link that came (back) can carry now: the server hears it
            // over that link at once (an announce sent while its next hop
            // was being resolved may have been lost with the resolution).
            self.announce().await;
        }
        let now = Instant::now();
        for (id, _, s) in self.maps.terminal_link_stats()? {
            let seen = self.down_seen.insert(id, s.down_pkts).unwrap_or(0);
            if s.down_pkts > seen
                && let Some((owner, _)) = self.peer_links.get(&id)
            {
                self.peers.heard(*owner, now);
            }
        }
        self.apply_peers().await
    }

    /// While draining: whether this host's links have carried nothing for
    /// [`DRAIN_QUIET`], or the drain's time is up.
    pub(super) fn drained(&mut self) -> Result<bool> {
        let Some(d) = self.drain.as_mut() else {
            return Ok(false);
        };
        let ids: Vec<u8> = self.own.iter().map(|o| o.ad.id).collect();
        let packets: u64 = self
            .maps
            .terminal_link_stats()?
            .iter()
            .filter(|(id, _, _)| ids.contains(id))
            .map(|(_, _, s)| s.up_pkts + s.down_pkts + s.relay_up_pkts + s.relay_down_pkts)
            .sum();
        let now = Instant::now();
        if packets != d.packets {
            d.packets = packets;
            d.quiet_since = now;
        }
        if now >= d.deadline {
            tracing::warn!("drain timed out with traffic still on this host's links");
            return Ok(true);
        }
        Ok(now.duration_since(d.quiet_since) >= DRAIN_QUIET)
    }

    /// Rebuilds the peer table from the maps an earlier agent left: every
    /// valid LAN link entry names its owner and port, and the schedule
    /// holds its weight. They count as alive until they miss announces.
    pub(super) fn adopt_peers(&mut self) -> Result<()> {
        let rates: BTreeMap<u32, u32> = self
            .maps
            .up_paths()?
            .links()
            .map(|l| (l.id, l.kbit() as u32))
            .collect();
        let mut found: BTreeMap<Ipv4Addr, Vec<LinkAd>> = BTreeMap::new();
        for id in 0..MAX_LINK_IDS {
            let id = id as u8;
            let Ok(e) = self.maps.up_link(id) else {
                continue;
            };
            if e.flags & LINK_VALID == 0 || e.ifindex != self.lan.index {
                continue;
            }
            let w = rates.get(&u32::from(id)).copied().unwrap_or(0);
            found
                .entry(Ipv4Addr::from(e.dst_ip))
                .or_default()
                .push(LinkAd {
                    id,
                    port: e.dst_port,
                    up: w,
                    down: w,
                    mtu: e.mtu,
                    ..Default::default()
                });
            self.peer_links.insert(id, (Ipv4Addr::from(e.dst_ip), e));
        }
        let now = Instant::now();
        for (ip, links) in &found {
            self.peers.announce(*ip, ADOPT_INTERVAL, links, now);
        }
        tracing::info!(
            "adopted {} peer link(s) from the maps{}",
            self.peer_links.len(),
            if self.token.is_some() {
                " and the session"
            } else {
                ""
            }
        );
        Ok(())
    }

    /// Brings T_NEIGH, T_UP_LINKS and the schedule in line with the peer
    /// table. A departed link leaves the schedule before its entry goes.
    pub(super) async fn apply_peers(&mut self) -> Result<()> {
        let live: Vec<Ipv4Addr> = self.peers.peers().map(|(ip, _)| ip).collect();
        for ip in &live {
            match self.net.neighbor(self.lan.index, *ip).await? {
                Some(mac) if self.neighbors.get(ip) != Some(&mac) => {
                    self.maps.set_neighbor(*ip, mac)?;
                    self.neighbors.insert(*ip, mac);
                }
                Some(_) => {}
                None => {
                    let _ = poke_neighbor(&self.lan.name, *ip);
                }
            }
        }
        let draining = self.drain.is_some();
        // (link, weight, base round trip µs) of every link this host may
        // send on: its own that answer, and peers' not announced dark.
        let mut usable: Vec<(u8, u32, u32)> = self
            .own
            .iter()
            .filter(|o| o.entry.flags & LINK_VALID != 0 && !draining && !o.dark())
            .map(|o| (o.ad.id, o.ad.up, o.echo.announced_us()))
            .collect();
        let mut want: BTreeMap<u8, (Ipv4Addr, UpLink)> = BTreeMap::new();
        for (ip, p) in self.peers.peers() {
            let Some(mac) = self.neighbors.get(&ip) else {
                continue;
            };
            for l in &p.links {
                if self.own.iter().any(|o| o.ad.id == l.id) || want.contains_key(&l.id) {
                    self.rejects.count("link_id_clash");
                    continue;
                }
                if !l.dark {
                    usable.push((l.id, l.up, l.rtt_us));
                }
                want.insert(
                    l.id,
                    (
                        ip,
                        UpLink {
                            ifindex: self.lan.index,
                            src_ip: u32::from(self.lan_ip),
                            dst_ip: u32::from(ip),
                            src_port: self.cfg.data_port,
                            dst_port: l.port,
                            src_mac: self.lan.mac,
                            dst_mac: *mac,
                            // The LAN hop and the peer's link must fit (an
                            // MTU below IPv4's minimum plus the wrap is not
                            // believed).
                            mtu: match l.mtu {
                                0 => self.lan.mtu as u16,
                                m => m.max(MIN_LINK_MTU).min(self.lan.mtu as u16),
                            },
                            flags: LINK_VALID,
                            _pad: 0,
                        },
                    ),
                );
            }
        }
        // bond0 shrinks to the smallest link in use, so the kernel sizes
        // segments (and refuses DF datagrams) to fit it wrapped; it grows
        // back when that link leaves. TCP follows on its next segment.
        let mtu = want
            .values()
            .map(|(_, e)| u32::from(e.mtu))
            .fold(self.own_mtu(), u32::min)
            .saturating_sub(OUTER_LEN as u32);
        if mtu != self.capture_mtu {
            self.net.set_mtu(self.capture.index, mtu).await?;
            tracing::info!(
                "{} mtu {} -> {mtu} (smallest link in use)",
                self.cfg.device,
                self.capture_mtu
            );
            self.capture_mtu = mtu;
        }
        for (id, (_, e)) in &want {
            if self.peer_links.get(id).map(|(_, old)| old) != Some(e) {
                self.maps.set_up_link(*id, *e)?;
            }
        }
        usable.sort_unstable();
        let rtts: Vec<u32> = usable.iter().map(|u| u.2).collect();
        // A rate learnt from the server's feedback stands in for the
        // weight while it lasts.
        let paths: Vec<(u8, u64, u32)> = usable
            .iter()
            .zip(pathmon::relative_delays(&rtts))
            .map(|(&(l, w, _), d)| {
                let rate = self.corrector.rate(Model::Up, u32::from(l));
                (l, rate.unwrap_or(u64::from(w)), d)
            })
            .collect();
        if self.schedule.as_ref() != Some(&paths) {
            self.maps
                // The server's playout (on by default) puts right what
                // arrives up to its wait late.
                .set_up_paths_reordered(
                    &paths,
                    bond_common::edpf::DEFAULT_BACKLOG_US,
                    playout::MAX_WAIT_US as u32,
                )?;
            tracing::info!("upstream paths: {paths:?} (link, kbit/s, relative delay ns)");
            if let Some(p) = &self.playout {
                // The server schedules over the same links.
                let floor = playout::floor_us(paths.iter().map(|p| p.2));
                p.set_floor(self.cfg.community, floor);
            }
            self.schedule = Some(paths);
        }
        for id in self.peer_links.keys() {
            if !want.contains_key(id) {
                self.maps.clear_up_link(*id)?;
            }
        }
        self.peer_links = want;
        for ip in self.neighbors.keys().copied().collect::<Vec<_>>() {
            if !live.contains(&ip) {
                self.maps.remove_neighbor(ip)?;
                self.neighbors.remove(&ip);
            }
        }
        Ok(())
    }

    // --------------------------------------------------------- operator --
}
