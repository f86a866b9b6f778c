//! Start-up: the sockets, the programs and their maps, the capture device,
//! the services, the links; then the event loop.

use super::*;

pub async fn run(
    cfg: TerminalConfig,
    path: &Path,
    pins: &mut Pins,
    calls: mpsc::Receiver<Call>,
    signals: crate::Signals,
    services: &StartServices,
) -> Result<Exit> {
    let identity = load_identity(&cfg)?;
    let net = Net::new()?;
    let lan = net.iface(&cfg.lan).await.context("field `lan`")?;
    let lan_ip = net.ipv4(&lan).await.context("field `lan`")?;

    let mut ebpf = datapath::load(ebpf::TERMINAL, &pins.dir)?;
    crate::read_drop_log(&mut ebpf)?;
    let maps = Maps::new(&pins.dir);
    let mut map_cfg = TerminalMap {
        token: 0,
        lan_ip: u32::from(lan_ip),
        server_ip: u32::from(cfg.server.address),
        lan_ifindex: lan.index,
        community: cfg.community,
        data_port: cfg.data_port,
        server_port: cfg.server.port,
        lan_mac: lan.mac,
        _pad: [0; 6],
        server_ip6: cfg.server.address6.map_or([0; 16], |a| a.octets()),
    };
    // An adopted session goes on: same community and server, same token.
    let mut token = None;
    if pins.adopted
        && let Ok(old) = maps.terminal_config()
        && old.token != 0
        && (old.community, old.server_ip, old.server_ip6, old.lan_ip)
            == (
                map_cfg.community,
                map_cfg.server_ip,
                map_cfg.server_ip6,
                map_cfg.lan_ip,
            )
    {
        map_cfg.token = old.token;
        map_cfg.server_port = old.server_port;
        token = Some(old.token);
    }
    maps.set_terminal_config(map_cfg)?;

    let mut own = Vec::new();
    let v6 = cfg.server.address6.is_some();
    for (i, l) in cfg.links.iter().enumerate() {
        // A link whose interface is not there yet (a modem not plugged in)
        // or has no address (a lease not taken) starts out of use, and is
        // taken up when it comes (`link_changed`).
        let wan = match net.iface(&l.interface).await {
            Ok(wan) => wan,
            Err(_) => Iface {
                name: l.interface.clone(),
                index: 0,
                mac: [0; 6],
                mtu: l.mtu.map_or(1500, u32::from),
                carrier: false,
                ethernet: true,
            },
        };
        let addr = link_address(&net, &wan, v6).await;
        if addr.is_none() {
            tracing::warn!(
                "link {}: interface {} {}: out of use until it has",
                l.id,
                l.interface,
                match (wan.index, v6) {
                    (0, _) => "not there yet",
                    (_, true) => "has no IPv4 or global IPv6 address",
                    (_, false) => "has no IPv4 address",
                }
            );
        }
        let mtu = l.mtu.map_or(wan.mtu, u32::from);
        let server = server_for(&cfg.server, addr);
        let gateway = next_hop(&net, l.gateway, server.ip(), &wan).await?;
        if addr.is_some() && wan.ethernet && gateway.is_unspecified() {
            tracing::warn!(
                "link {}: no next hop on {} to the server at {}: out of use until there is",
                l.id,
                l.interface,
                server.ip()
            );
        }
        // Control messages for the server leave by this link: a socket
        // tied to the interface (and a route to the server over it, put
        // in once the agent is up). Until the link has an address, a
        // socket that sends nowhere stands in.
        let sock = match addr {
            Some(ip) => udp_socket((ip, l.port), Some(&l.interface)),
            None => udp_socket((Ipv4Addr::UNSPECIFIED, 0), None),
        }
        .with_context(|| format!("field `links[{i}].port`"))?;
        timestamp_arrivals(&sock)?;
        let v4 = ipv4_word(addr);
        if let Some(IpAddr::V6(a)) = addr {
            maps.set_link6(l.id, a)?;
        }
        let (mut up, mut down) = (Weight::new(l.up()), Weight::new(l.down()));
        let mut o = Own {
            ad: LinkAd {
                id: l.id,
                port: l.port,
                up: up.value(),
                down: down.value(),
                ..Default::default()
            },
            up,
            down,
            entry: UpLink {
                ifindex: wan.index,
                src_ip: v4,
                dst_ip: u32::from(cfg.server.address),
                src_port: l.port,
                dst_port: map_cfg.server_port,
                src_mac: wan.mac,
                dst_mac: [0; 6],
                mtu: mtu as u16,
                flags: 0,
                _pad: 0,
            },
            relay: RelayLink {
                wan_ifindex: wan.index,
                wan_ip: v4,
                link: l.id,
                flags: 0,
                port: l.port,
                wan_mac: wan.mac,
                gw_mac: [0; 6],
                mtu: mtu as u16,
                _pad2: [0; 2],
            },
            iface: wan,
            server,
            gateway,
            next_hop: l.gateway,
            sock: Arc::new(sock),
            rx: None,
            up_train: None,
            carried: None,
            busy: (false, false),
            echo: LinkEcho::default(),
            addr,
            reader: None,
            route: Route::Wanted,
        };
        o.relay.flags = o.kind();
        o.ad.mtu = o.ipv4_form_mtu();
        o.filter_sources()?;
        own.push(o);
    }
    sysctl(&format!("net.ipv4.conf.{}.rp_filter", cfg.lan), "2")?;
    // Peers relay to this host by the MAC their neighbour table gives for
    // its LAN address: only the LAN interface may answer for it (and ask
    // with it). A host in two communities with two interfaces on one
    // segment otherwise answers ARP on both, and a peer that learns the
    // other one's MAC sends this community's packets where the other
    // community's agent drops them (seen: a first download's SYN-ACKs for
    // 4 s).
    sysctl(&format!("net.ipv4.conf.{}.arp_ignore", cfg.lan), "1")?;
    sysctl(&format!("net.ipv4.conf.{}.arp_announce", cfg.lan), "2")?;
    let lan_sock = udp_socket(
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.data_port),
        Some(&cfg.lan),
    )
    .context("field `data_port`")?;

    // bond0: sized so a wrapped packet fits the smallest path.
    let own_mtu = own.iter().map(|o| u32::from(o.ipv4_form_mtu()));
    let capture_mtu = own_mtu.fold(lan.mtu, u32::min) - OUTER_LEN as u32;
    let dev = net
        .create_capture(&cfg.device, capture_mtu, pins.adopted)
        .await?;
    let services = services(cfg.clone(), lan_ip).await?;
    let mut agent = Agent {
        interval: Duration::from_millis(u64::from(cfg.announce_ms)),
        path: path.to_path_buf(),
        services,
        peers: PeerTable::new(cfg.misses),
        cfg,
        net,
        maps,
        lan,
        lan_ip,
        map_cfg,
        own,
        peer_links: BTreeMap::new(),
        neighbors: HashMap::new(),
        token,
        identity,
        exchange: None,
        session: None,
        unkeyed: false,
        sent: std::collections::VecDeque::with_capacity(super::SENT_KEPT),
        logins: std::collections::VecDeque::with_capacity(super::LOGINS_KEPT),
        refused: false,
        session_checked: None,
        counter: Counter::new(),
        guard: Guard::new(bond_proto::SKEW_MS),
        lan_sock: Arc::new(lan_sock),
        schedule: None,
        down_seen: HashMap::new(),
        rejects: Tally::rejects(),
        faults: Tally::faults(),
        next_train: getrandom::u32().unwrap_or(1),
        drain: None,
        restarting: false,
        adopted: pins.adopted,
        started: Instant::now(),
        captured: None,
        attached: Default::default(),
        capture: dev.clone(),
        capture_mtu,
        playout: None,
        corrector: Corrector::start(Maps::new(&pins.dir))?,
        resends: resend::Resend::default(),
        probe_round: 0,
    };
    if agent.adopted {
        agent.adopt_peers()?;
    }
    // Control messages for the server leave by each link: a host route
    // to the server over it.
    for i in 0..agent.own.len() {
        agent.route(i).await;
    }
    let result = async {
        pins.attach_tc(&mut ebpf, "bond_wrap", &agent.cfg.device, TcAttachType::Egress)?;
        let how = agent.cfg.attach.veth;
        crate::veth::ready(&agent.net, &agent.cfg.lan, how).await?;
        pins.attach_xdp(&mut ebpf, "bond_terminal", &agent.cfg.lan)?;
        // What bond_terminal passes on for own L3 links.
        pins.attach_tc(&mut ebpf, "bond_relay", &agent.cfg.lan, TcAttachType::Ingress)?;
        for o in agent.own.iter().filter(|o| o.iface.index != 0) {
            crate::veth::ready(&agent.net, &o.iface.name, how).await?;
            attach_link(pins, &mut ebpf, &o.iface)?;
        }
        // What the playout sees of the server's packets (`crate::feedback`);
        // without a playout, nothing sends on it.
        let (feedback_tx, feedback) = mpsc::unbounded_channel();
        if agent.cfg.playout {
            agent.start_playout(&mut ebpf, pins, feedback_tx).await?;
        } else {
            agent.maps.set_hold(name::T_HOLD, Default::default())?;
        }
        agent.sync_capture().await?;
        let up = format!(
            "terminal {lan_ip} up: community {}, {} own link(s), {} mtu {capture_mtu}, announcing every {} ms{}",
            agent.cfg.community,
            agent.own.len(),
            agent.cfg.device,
            agent.cfg.announce_ms,
            if agent.adopted { " (adopted the running datapath)" } else { "" },
        );
        tracing::info!("{up}");
        crate::notify_ready(&up);
        agent.attached = pins.attached.clone();
        agent.run(calls, feedback, &mut ebpf, pins, signals).await
    }
    .await;
    if let Ok(Exit::Detach) = result {
        return result;
    }
    // Leave the host as found: SHUTDOWN, no capture device, no routes.
    agent.shutdown().await;
    let _ = agent.net.delete(&agent.cfg.device).await;
    for o in &agent.own {
        let _ = agent
            .net
            .delete_host_route(
                o.server.ip(),
                o.via(),
                o.iface.index,
                METRIC_BASE + u32::from(o.ad.id),
            )
            .await;
    }
    result
}

/// The terminal's own key, if its file names one (`identity`).
pub(super) fn load_identity(cfg: &TerminalConfig) -> Result<Option<Identity>> {
    let Some(path) = &cfg.identity else {
        return Ok(None);
    };
    let id = Identity::load(path).map_err(|e| anyhow::anyhow!("field `identity`: {e}"))?;
    tracing::info!("identity {}: public key {}", path.display(), id.public());
    Ok(Some(id))
}
