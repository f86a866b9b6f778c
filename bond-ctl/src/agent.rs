//! The agent: loads and attaches the programs, sets up the capture device
//! and routes, and keeps the maps true. Runs until SIGINT or SIGTERM, then
//! removes what it made.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use bond_common::{
    maps::{
        LINK_VALID, RelayLink, ServerConfig as ServerMap, ServerLink,
        TerminalConfig as TerminalMap, UpLink,
    },
    wire::OUTER_LEN,
};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config::{Config, ServerConfig, TerminalConfig},
    datapath::{self, Maps},
    ebpf,
    net::{Iface, Net, poke_neighbor, sysctl},
};

/// How often the agent re-checks next-hop MAC addresses.
const REFRESH: Duration = Duration::from_secs(1);

pub async fn run(cfg: Config, bpffs: PathBuf) -> Result<()> {
    let dir = datapath::pin_dir(&bpffs, cfg.instance());
    datapath::ensure_bpffs(&bpffs)?;
    if dir.exists() {
        // No adoption yet (that comes with restarts): start clean.
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing stale pins in {}", dir.display()))?;
    }
    let result = match cfg {
        Config::Terminal(t) => run_terminal(t, &dir).await,
        Config::Server(s) => run_server(s, &dir).await,
    };
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn wait_for_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

fn attach_xdp(ebpf: &mut Ebpf, prog: &str, iface: &str) -> Result<()> {
    let p: &mut Xdp = ebpf
        .program_mut(prog)
        .context("program missing")?
        .try_into()?;
    if p.fd().is_err() {
        p.load().with_context(|| format!("loading {prog}"))?;
    }
    if p.attach(iface, XdpMode::Driver).is_err() {
        p.attach(iface, XdpMode::Skb)
            .with_context(|| format!("attaching {prog} to {iface}"))?;
        eprintln!("bond-ctl: {iface}: native XDP unavailable, using generic (slower)");
    }
    Ok(())
}

// ------------------------------------------------------------------ terminal --

/// One upstream link as the agent tracks it.
struct UpState {
    id: u8,
    weight: u32,
    /// Interface the packet leaves by, and the next hop to resolve there.
    out: Iface,
    next_hop: Ipv4Addr,
    entry: UpLink,
    /// For an own WAN link: its relay entry, keyed by port.
    relay: Option<(u16, RelayLink)>,
}

async fn run_terminal(cfg: TerminalConfig, dir: &std::path::Path) -> Result<()> {
    let net = Net::new()?;
    let lan = net.iface(&cfg.lan).await.context("field `lan`")?;
    let lan_ip = net.ipv4(&lan).await.context("field `lan`")?;

    let mut ebpf = datapath::load(ebpf::TERMINAL, dir)?;
    let maps = Maps::new(dir);
    maps.set_terminal_config(TerminalMap {
        token: cfg.token.0,
        lan_ip: u32::from(lan_ip),
        server_ip: u32::from(cfg.server.address),
        lan_ifindex: lan.index,
        community: cfg.community,
        data_port: cfg.data_port,
        server_port: cfg.server.port,
        lan_mac: lan.mac,
    })?;

    let mut ups = Vec::new();
    let mut path_mtu = lan.mtu;
    for (i, l) in cfg.links.iter().enumerate() {
        let wan = net
            .iface(&l.interface)
            .await
            .with_context(|| format!("field `links[{i}].interface`"))?;
        let wan_ip = net
            .ipv4(&wan)
            .await
            .with_context(|| format!("field `links[{i}].interface`"))?;
        let mtu = l.mtu.map_or(wan.mtu, u32::from);
        path_mtu = path_mtu.min(mtu);
        let gateway = l.gateway.unwrap_or(cfg.server.address);
        let entry = UpLink {
            ifindex: wan.index,
            src_ip: u32::from(wan_ip),
            dst_ip: u32::from(cfg.server.address),
            src_port: l.port,
            dst_port: cfg.server.port,
            src_mac: wan.mac,
            dst_mac: [0; 6],
            mtu: mtu as u16,
            flags: 0,
            _pad: 0,
        };
        let relay = RelayLink {
            wan_ifindex: wan.index,
            wan_ip: u32::from(wan_ip),
            link: l.id,
            _pad: 0,
            port: l.port,
            wan_mac: wan.mac,
            gw_mac: [0; 6],
            mtu: mtu as u16,
            _pad2: [0; 2],
        };
        sysctl(&format!("net.ipv4.conf.{}.rp_filter", l.interface), "2")?;
        ups.push(UpState {
            id: l.id,
            weight: l.weight,
            out: wan,
            next_hop: gateway,
            entry,
            relay: Some((l.port, relay)),
        });
    }
    for p in &cfg.peers {
        for l in &p.links {
            let entry = UpLink {
                ifindex: lan.index,
                src_ip: u32::from(lan_ip),
                dst_ip: u32::from(p.address),
                src_port: cfg.data_port,
                dst_port: l.port,
                src_mac: lan.mac,
                dst_mac: [0; 6],
                // A peer's WAN MTU is its business; the LAN hop must fit.
                mtu: lan.mtu as u16,
                flags: 0,
                _pad: 0,
            };
            ups.push(UpState {
                id: l.id,
                weight: l.weight,
                out: lan.clone(),
                next_hop: p.address,
                entry,
                relay: None,
            });
        }
    }
    sysctl(&format!("net.ipv4.conf.{}.rp_filter", cfg.lan), "2")?;

    // bond0: sized so a wrapped packet fits the smallest path.
    let capture_mtu = path_mtu - OUTER_LEN as u32;
    let dev = net.create_capture(&cfg.device, capture_mtu).await?;
    let result = async {
        let wrap: &mut SchedClassifier = ebpf
            .program_mut("bond_wrap")
            .context("bond_wrap missing")?
            .try_into()?;
        wrap.load()?;
        wrap.attach(&cfg.device, TcAttachType::Egress)
            .with_context(|| format!("attaching bond_wrap to {}", cfg.device))?;
        attach_xdp(&mut ebpf, "bond_terminal", &cfg.lan)?;
        for l in &cfg.links {
            attach_xdp(&mut ebpf, "bond_terminal", &l.interface)?;
        }
        for p in &cfg.capture {
            net.route_to(p.addr, p.len, dev.index, lan_ip).await?;
        }
        eprintln!(
            "bond-ctl: terminal {lan_ip} up: {} link(s), {} mtu {capture_mtu}, capturing {}",
            ups.len(),
            cfg.device,
            cfg.capture
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut tick = tokio::time::interval(REFRESH);
        let mut last_sched = None;
        let mut peers_seen = Vec::new();
        let stop = wait_for_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                r = &mut stop => return r,
                _ = tick.tick() => {}
            }
            refresh_terminal(
                &net,
                &maps,
                &cfg,
                &lan,
                &mut ups,
                &mut last_sched,
                &mut peers_seen,
            )
            .await?;
        }
    }
    .await;
    let _ = net.delete(&cfg.device).await;
    result
}

/// Re-resolves every next hop; writes entries whose MAC changed and the
/// schedule when the set of usable links changed.
async fn refresh_terminal(
    net: &Net,
    maps: &Maps,
    cfg: &TerminalConfig,
    lan: &Iface,
    ups: &mut [UpState],
    last_sched: &mut Option<Vec<(u8, u32)>>,
    peers_seen: &mut Vec<(Ipv4Addr, [u8; 6])>,
) -> Result<()> {
    for u in ups.iter_mut() {
        let mac = net.neighbor(u.out.index, u.next_hop).await?;
        match mac {
            Some(mac) if mac != u.entry.dst_mac || u.entry.flags & LINK_VALID == 0 => {
                u.entry.dst_mac = mac;
                u.entry.flags = LINK_VALID;
                maps.set_up_link(u.id, u.entry)?;
                if let Some((port, r)) = &mut u.relay {
                    r.gw_mac = mac;
                    maps.set_relay_link(*port, *r)?;
                }
            }
            Some(_) => {}
            None => {
                let _ = poke_neighbor(&u.out.name, u.next_hop);
            }
        }
    }
    // LAN peers, for DATA_DOWN relayed to them.
    for p in &cfg.peers {
        match net.neighbor(lan.index, p.address).await? {
            Some(mac) if !peers_seen.contains(&(p.address, mac)) => {
                maps.set_neighbor(p.address, mac)?;
                peers_seen.retain(|(ip, _)| *ip != p.address);
                peers_seen.push((p.address, mac));
            }
            Some(_) => {}
            None => {
                let _ = poke_neighbor(&lan.name, p.address);
            }
        }
    }
    let usable: Vec<(u8, u32)> = ups
        .iter()
        .filter(|u| u.entry.flags & LINK_VALID != 0)
        .map(|u| (u.id, u.weight))
        .collect();
    if last_sched.as_ref() != Some(&usable) {
        maps.set_up_schedule(&usable)?;
        eprintln!("bond-ctl: upstream schedule: {usable:?} (link, weight)");
        *last_sched = Some(usable);
    }
    Ok(())
}

// -------------------------------------------------------------------- server --

async fn run_server(cfg: ServerConfig, dir: &std::path::Path) -> Result<()> {
    let (lo, hi) = cfg
        .port_range()
        .map_err(anyhow::Error::msg)
        .context("field `nat_ports`")?;
    let mut ebpf = datapath::load(ebpf::SERVER, dir)?;
    let maps = Maps::new(dir);
    maps.set_server_config(ServerMap {
        wan_ip: u32::from(cfg.address),
        nat_ip: u32::from(cfg.nat_address),
        port: cfg.port,
        port_min: lo,
        port_max: hi,
        _pad: 0,
    })?;
    let mut idx = 0u32;
    for c in &cfg.communities {
        for t in &c.terminals {
            maps.set_session(c.id, t.address, t.token.0)?;
        }
        let mut weights = Vec::new();
        for l in &c.links {
            maps.set_server_link(
                idx,
                ServerLink {
                    ip: u32::from(l.address),
                    port: l.port,
                    community: c.id,
                    link: l.id,
                    flags: LINK_VALID,
                    _pad: [0; 2],
                },
            )?;
            weights.push((idx, l.weight));
            idx += 1;
        }
        maps.set_down_schedule(c.id, &weights)?;
    }
    let pushed = maps.push_free_ports(lo..=hi)?;

    // Forwarding for the slow path, which hands the kernel packets whose
    // source is one of our own addresses; the dedicated ports are kept from
    // the host's own sockets.
    sysctl("net.ipv4.ip_forward", "1")?;
    sysctl("net.ipv4.ip_local_reserved_ports", &format!("{lo}-{hi}"))?;
    for i in &cfg.interfaces {
        sysctl(&format!("net.ipv4.conf.{i}.accept_local"), "1")?;
        sysctl(&format!("net.ipv4.conf.{i}.rp_filter"), "0")?;
        attach_xdp(&mut ebpf, "bond_server", i)
            .with_context(|| format!("field `interfaces`: {i}"))?;
    }
    eprintln!(
        "bond-ctl: server {}:{} up: {} communities, {idx} links, {pushed} dedicated ports {lo}-{hi} on {}",
        cfg.address,
        cfg.port,
        cfg.communities.len(),
        cfg.nat_address
    );
    wait_for_signal().await
}
