//! Own links coming and going: carrier, address, next hop and interface
//! changes (from linkwatch), each applied without a restart.

use super::*;

impl Agent {
    /// Something changed on an interface (`crate::linkwatch`): if it is an
    /// own link's, its state is read again from the kernel and followed.
    /// A modem unplugged and plugged in again comes back with a new index:
    /// the program, the route to the server and the socket go on it again.
    /// A new address gets a new socket and is the datapath's new source;
    /// the server takes it from the announce sent at once. A link that
    /// lost its carrier, address or interface leaves every schedule at
    /// once (announced dark), and returns when they are back.
    pub(super) async fn link_changed(
        &mut self,
        change: Change,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
        tx: &mpsc::Sender<Received>,
    ) -> Result<()> {
        let i = match &change {
            Change::Link { name, .. } | Change::Gone { name, .. } => {
                self.own.iter().position(|o| o.iface.name == *name)
            }
            Change::Address { index } | Change::DefaultRoute { index } => {
                self.own.iter().position(|o| o.iface.index == *index)
            }
        };
        let Some(i) = i else {
            return Ok(());
        };
        let (id, was_dark) = (self.own[i].ad.id, self.own[i].dark());
        let name = self.own[i].iface.name.clone();
        let Ok(now) = self.net.iface(&name).await else {
            if self.own[i].iface.index != 0 {
                tracing::warn!("link {id}: interface {name} is gone: out of use");
                let o = &mut self.own[i];
                (o.iface.index, o.iface.carrier, o.addr) = (0, false, None);
                self.invalidate(i)?;
            }
            return self.relink(i, was_dark, false).await;
        };
        let replugged = now.index != self.own[i].iface.index;
        if replugged {
            tracing::info!("link {id}: interface {name} is back (index {})", now.index);
            crate::veth::ready(&self.net, &name, self.cfg.attach.veth).await?;
            attach_link(pins, ebpf, &now)?;
            self.attached = pins.attached.clone();
        }
        self.own[i].set_iface(now);
        if replugged {
            self.own[i].filter_sources()?;
            self.invalidate(i)?;
        }
        let v6 = self.cfg.server.address6.is_some();
        let addr = link_address(&self.net, &self.own[i].iface, v6).await;
        let readdressed = addr != self.own[i].addr;
        if readdressed {
            tracing::info!(
                "link {id}: address {} -> {}",
                show_addr(self.own[i].addr),
                show_addr(addr)
            );
        }
        if let Some(ip) = addr
            && (replugged || readdressed)
        {
            self.rebind(i, ip, tx).await?;
        }
        self.own[i].addr = addr;
        let rerouted = self.own[i].iface.ethernet && self.follow_gateway(i).await?;
        let o = &self.own[i];
        if o.dark_by_kernel() {
            // It may come back behind another next hop (another modem).
            if o.entry.flags & LINK_VALID != 0 {
                self.invalidate(i)?;
            }
        } else if o.entry.flags & LINK_VALID == 0 {
            if o.iface.ethernet {
                // Resolved by the next `refresh`.
                o.resolve_afresh(&self.net).await;
            } else {
                self.l3_valid(i)?;
            }
        }
        self.relink(i, was_dark, replugged || readdressed || rerouted)
            .await
    }

    /// Takes link `i`'s next hop again: from its interface's default route
    /// (`gateway = "auto"`), or of the family its address now is; true if
    /// it changed. The route to the server moves to the new one, and the
    /// datapath waits for it to be resolved.
    pub(super) async fn follow_gateway(&mut self, i: usize) -> Result<bool> {
        let o = &self.own[i];
        let now = next_hop(&self.net, o.next_hop, o.server.ip(), &o.iface).await?;
        if now == o.gateway {
            return Ok(false);
        }
        tracing::info!(
            "link {}: next hop {} -> {}",
            o.ad.id,
            show_addr(Some(o.gateway).filter(|g| !g.is_unspecified())),
            show_addr(Some(now).filter(|g| !g.is_unspecified()))
        );
        self.unroute(i).await;
        self.own[i].gateway = now;
        self.own[i].route = Route::Wanted;
        self.invalidate(i)?;
        self.route(i).await;
        Ok(true)
    }

    /// Link `i`'s datapath entries wait for the next hop to be resolved
    /// again (`refresh`): a new interface has a new neighbour table.
    pub(super) fn invalidate(&mut self, i: usize) -> Result<()> {
        let o = &mut self.own[i];
        (o.entry.flags, o.entry.dst_mac, o.relay.gw_mac) = (0, [0; 6], [0; 6]);
        self.maps.set_up_link(o.ad.id, o.entry)?;
        Ok(self.maps.set_relay_link(o.ad.port, o.relay)?)
    }

    /// L3 link `i`'s datapath entries are in use: it has no next hop to
    /// resolve.
    pub(super) fn l3_valid(&mut self, i: usize) -> Result<()> {
        let o = &mut self.own[i];
        // (`LINK_L3`: `bond_wrap` gives the skb the outer protocol.)
        o.entry.flags = LINK_VALID | o.kind();
        self.maps.set_up_link(o.ad.id, o.entry)?;
        Ok(self.maps.set_relay_link(o.ad.port, o.relay)?)
    }

    /// Takes away link `i`'s host route to the server, if it has one.
    pub(super) async fn unroute(&mut self, i: usize) {
        let o = &self.own[i];
        if o.via().is_some_and(|g| g.is_unspecified()) {
            return;
        }
        let metric = METRIC_BASE + u32::from(o.ad.id);
        let (server, via) = (o.server.ip(), o.via());
        let _ = self
            .net
            .delete_host_route(server, via, o.iface.index, metric)
            .await;
    }

    /// Link `i` sends from `ip` now, on its interface as it is: a new
    /// socket for a new address (the same one tied to the new interface
    /// for a replugged modem that kept its address), the datapath's source
    /// address, and the route to the server (the kernel drops it with the
    /// address or interface it went by). An address of the other family
    /// (IPv4 gone, IPv6 left) moves the link to the server's address of
    /// that family, by a next hop of it.
    pub(super) async fn rebind(
        &mut self,
        i: usize,
        ip: IpAddr,
        tx: &mpsc::Sender<Received>,
    ) -> Result<()> {
        let server = server_for(&self.cfg.server, Some(ip));
        if server != self.own[i].server {
            self.unroute(i).await;
            let o = &mut self.own[i];
            o.server = server;
            o.gateway = next_hop(&self.net, o.next_hop, server.ip(), &o.iface).await?;
            self.invalidate(i)?;
        }
        if let IpAddr::V6(a) = ip {
            self.maps.set_link6(self.own[i].ad.id, a)?;
        }
        let o = &mut self.own[i];
        let at = SocketAddr::new(ip, o.ad.port);
        if o.sock.local_addr().ok() == Some(at) {
            bind_to_device(&*o.sock, &o.iface.name)?;
        } else {
            let sock = udp_socket(at, Some(&o.iface.name))
                .with_context(|| format!("link {}: a socket on {at}", o.ad.id))?;
            timestamp_arrivals(&sock)?;
            o.sock = Arc::new(sock);
            let reader = spawn_reader(o.sock.clone(), Socket::Link(i), tx.clone());
            if let Some(old) = o.reader.replace(reader) {
                old.abort();
            }
        }
        let v4 = ipv4_word(Some(ip));
        (o.entry.src_ip, o.relay.wan_ip) = (v4, v4);
        o.addr = Some(ip);
        o.relay.flags = o.kind();
        o.ad.mtu = o.ipv4_form_mtu();
        o.filter_sources()?;
        if o.entry.flags & LINK_VALID != 0 {
            o.entry.flags = LINK_VALID | o.kind();
            self.maps.set_up_link(o.ad.id, o.entry)?;
        }
        self.maps.set_relay_link(o.ad.port, o.relay)?;
        o.route = Route::Wanted;
        self.route(i).await;
        Ok(())
    }

    /// Puts the host route to the server over link `i` in place if it is
    /// wanted; says so once when its next hop cannot be reached.
    pub(super) async fn route(&mut self, i: usize) {
        let o = &self.own[i];
        let server = o.server.ip();
        if o.route == Route::In || o.addr.is_none() || o.via().is_some_and(|g| g.is_unspecified()) {
            return;
        }
        let metric = METRIC_BASE + u32::from(o.ad.id);
        let r = self
            .net
            .host_route_via(server, o.via(), o.iface.index, metric)
            .await;
        let o = &mut self.own[i];
        match r {
            Ok(()) if o.route == Route::Waiting => {
                tracing::info!("link {}: route to the server in place", o.ad.id);
                o.route = Route::In;
            }
            Ok(()) => o.route = Route::In,
            Err(e) if o.route == Route::Wanted => {
                tracing::warn!("link {}: {e:#}; trying again", o.ad.id);
                o.route = Route::Waiting;
            }
            Err(_) => {}
        }
    }

    /// After a change on link `i`: if it went dark or lit, or `moved` (a new
    /// address or interface), the LAN and the server hear it now and the
    /// schedule is rebuilt.
    pub(super) async fn relink(&mut self, i: usize, was_dark: bool, moved: bool) -> Result<()> {
        let o = &self.own[i];
        let dark = o.dark();
        if dark != was_dark {
            tracing::warn!(
                "link {}: {}",
                o.ad.id,
                if dark {
                    "no interface, carrier, address or next hop: out of use"
                } else {
                    "interface, carrier, address and next hop back: in use"
                }
            );
        }
        if dark != was_dark || moved {
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }
}
