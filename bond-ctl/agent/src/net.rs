//! The agent's view of the host's network: interfaces, addresses, routes and
//! neighbours over rtnetlink; sysctls; and the offload switches of bond0.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_route::{
    RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType},
};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVeth, RouteMessageBuilder};

/// The other end of a veth: its interface index, and the id of its
/// network namespace as this one knows it (`None`: this namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VethPeer {
    pub ifindex: u32,
    pub netnsid: Option<i32>,
}

/// An interface as the agent needs it.
#[derive(Debug, Clone)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Up, with its carrier (IFF_UP and IFF_LOWER_UP).
    pub carrier: bool,
    /// Whether frames on it carry an Ethernet header; false for L3
    /// devices (PPP, raw-IP modems, tun, WireGuard).
    pub ethernet: bool,
}

pub struct Net {
    handle: Handle,
}

impl Net {
    /// Opens an rtnetlink connection (driven by a tokio task).
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// What rtnetlink says of interface `name`.
    async fn link(&self, name: &str) -> Result<LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .with_context(|| format!("interface {name:?} not found"))?
            .ok_or_else(|| anyhow!("interface {name:?} not found"))
    }

    pub async fn iface(&self, name: &str) -> Result<Iface> {
        let msg = self.link(name).await?;
        let mut iface = Iface {
            name: name.to_string(),
            index: msg.header.index,
            mac: [0; 6],
            mtu: 1500,
            carrier: msg
                .header
                .flags
                .contains(LinkFlags::Up | LinkFlags::LowerUp),
            ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
        };
        for a in msg.attributes {
            match a {
                LinkAttribute::Address(m) if m.len() == 6 => iface.mac.copy_from_slice(&m),
                LinkAttribute::Mtu(m) => iface.mtu = m,
                _ => {}
            }
        }
        Ok(iface)
    }

    /// The other end of interface `name`, if it is a veth.
    pub async fn veth_peer(&self, name: &str) -> Result<Option<VethPeer>> {
        let (mut veth, mut ifindex, mut netnsid) = (false, None, None);
        for a in self.link(name).await?.attributes {
            match a {
                LinkAttribute::LinkInfo(info) => {
                    veth = info
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                LinkAttribute::Link(i) => ifindex = Some(i),
                LinkAttribute::LinkNetNsId(n) => netnsid = Some(n),
                _ => {}
            }
        }
        Ok(ifindex
            .filter(|_| veth)
            .map(|ifindex| VethPeer { ifindex, netnsid }))
    }

    /// The id this namespace knows the network namespace open at `ns` by,
    /// if it has given it one.
    pub async fn nsid_of(&self, ns: &impl AsRawFd) -> Result<Option<i32>> {
        use rtnetlink::packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
        let mut msg = NsidMessage::default();
        msg.attributes
            .push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut replies = self.handle.clone().request(req)?;
        while let Some(reply) = replies.next().await {
            match reply.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    return Ok(m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                        _ => None,
                    }));
                }
                NetlinkPayload::Error(e) => bail!("RTM_GETNSID: {e}"),
                _ => {}
            }
        }
        Ok(None)
    }

    /// The first IPv4 address of an interface.
    pub async fn ipv4(&self, iface: &Iface) -> Result<Ipv4Addr> {
        for msg in self.addresses(iface).await? {
            for a in msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) = a
                {
                    return Ok(ip);
                }
            }
        }
        bail!("interface {} has no IPv4 address", iface.name)
    }

    /// The interface whose IPv4 network holds `ip` (on-link, as a node
    /// behind a director must be), with its name; the longest prefix wins.
    pub async fn on_link(&self, ip: Ipv4Addr) -> Result<Option<(u32, String)>> {
        let all: Vec<AddressMessage> = self.handle.address().get().execute().try_collect().await?;
        let mut best: Option<(u8, u32)> = None;
        for msg in all {
            let len = msg.header.prefix_len;
            for a in &msg.attributes {
                if let AddressAttribute::Local(IpAddr::V4(net)) = a {
                    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                    let same = u32::from(*net) & mask == u32::from(ip) & mask;
                    if same && *net != ip && best.is_none_or(|b| len > b.0) {
                        best = Some((len, msg.header.index));
                    }
                }
            }
        }
        let Some((_, index)) = best else {
            return Ok(None);
        };
        let mut links = self.handle.link().get().match_index(index).execute();
        let name = links.try_next().await?.and_then(|l| {
            l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        });
        Ok(name.map(|n| (index, n)))
    }

    /// Every address of an interface, as rtnetlink lists them.
    async fn addresses(&self, iface: &Iface) -> Result<Vec<AddressMessage>> {
        let addrs = self.handle.address().get();
        let addrs = addrs.set_link_index_filter(iface.index).execute();
        Ok(addrs.try_collect().await?)
    }

    /// A global IPv6 address of an interface, once duplicate address
    /// detection has passed it; one not deprecated if there is one.
    pub async fn ipv6(&self, iface: &Iface) -> Result<Ipv6Addr> {
        let mut best = None;
        for msg in self.addresses(iface).await? {
            let h = &msg.header;
            let unusable = AddressHeaderFlags::Tentative | AddressHeaderFlags::Dadfailed;
            if h.scope != AddressScope::Universe || h.flags.intersects(unusable) {
                continue;
            }
            let deprecated = h.flags.contains(AddressHeaderFlags::Deprecated);
            for a in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V6(ip)) = a
                    && best.is_none_or(|(old, _)| old && !deprecated)
                {
                    best = Some((deprecated, *ip));
                }
            }
        }
        best.map(|(_, ip)| ip)
            .ok_or_else(|| anyhow!("interface {} has no global IPv6 address", iface.name))
    }

    /// Creates the capture device: a veth pair whose far end only sinks what
    /// bond_wrap does not redirect. No ARP (routes point straight at it),
    /// Sets an interface's MTU.
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
            .execute()
            .await
            .with_context(|| format!("setting the MTU of interface {index} to {mtu}"))
    }

    /// `mtu` sized for the wrap. With `keep`, an existing one (an earlier
    /// agent's, with its program and routes) is reconfigured, not replaced.
    pub async fn create_capture(&self, name: &str, mtu: u32, keep: bool) -> Result<Iface> {
        let peer = sink_name(name);
        let exists = self.iface(name).await.is_ok() && self.iface(&peer).await.is_ok();
        if !(keep && exists) {
            let _ = self.delete(name).await;
            self.handle
                .link()
                .add(LinkVeth::new(name, &peer).build())
                .execute()
                .await
                .with_context(|| format!("creating {name}"))?;
        }
        for (dev, m) in [(peer.as_str(), 65535u32.min(mtu.max(1500))), (name, mtu)] {
            // Captured IPv6 leaves from the host's own addresses; the
            // capture device needs none, and without one it sends nothing
            // of its own (router solicitations, listener reports) into bond.
            let _ = sysctl(&format!("net.ipv6.conf.{dev}.addr_gen_mode"), "1");
            let i = self.iface(dev).await?;
            // TCP always builds GSO superpackets and leaves segmentation to
            // the device, after the TC hook; one segment per skb keeps one
            // striping decision per wire packet.
            let msg = LinkUnspec::new_with_index(i.index)
                .mtu(m)
                .arp(false)
                .up()
                .append_extra_attribute(LinkAttribute::GsoMaxSegs(1))
                .build();
            self.handle
                .link()
                .set(msg)
                .execute()
                .await
                .with_context(|| format!("configuring {dev}"))?;
        }
        disable_offloads(name).with_context(|| format!("turning offloads off on {name}"))?;
        self.iface(name).await
    }

    /// Adds an IPv4 address to an interface.
    pub async fn add_address(&self, index: u32, addr: Ipv4Addr, len: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr), len)
            .execute()
            .await
            .with_context(|| format!("adding {addr}/{len} to interface {index}"))
    }

    /// Sets an interface up.
    pub async fn set_up(&self, index: u32) -> Result<()> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("setting interface {index} up"))
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let i = self.iface(name).await?;
        self.handle.link().del(i.index).execute().await?;
        Ok(())
    }

    /// `ip route replace PREFIX dev IFACE src SRC`.
    pub async fn route_to(&self, dst: IpAddr, len: u8, dev: u32, src: Ipv4Addr) -> Result<()> {
        let msg = match dst {
            IpAddr::V4(dst) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, len)
                .output_interface(dev)
                .pref_source(src)
                .build(),
            // IPv6 picks its source address itself (the host's global one).
            IpAddr::V6(dst) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(dst, len)
                .output_interface(dev)
                .build(),
        };
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {dst}/{len}"))
    }

    /// `ip route del PREFIX dev IFACE`; a route that is not there is not an
    /// error.
    pub async fn delete_route_to(&self, dst: IpAddr, len: u8, dev: u32) -> Result<()> {
        let msg = match dst {
            IpAddr::V4(dst) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst, len)
                .output_interface(dev)
                .build(),
            IpAddr::V6(dst) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(dst, len)
                .output_interface(dev)
                .build(),
        };
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ESRCH => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting route {dst}/{len}")),
        }
    }

    /// The next hop of interface `dev`'s default route of the family
    /// (`v6`: IPv6) the one of least metric, as a DHCP client, router
    /// advertisements or an LTE modem manager set it; `None` if it has
    /// none.
    pub async fn default_gateway(&self, dev: u32, v6: bool) -> Result<Option<IpAddr>> {
        let family = match v6 {
            true => RouteMessageBuilder::<Ipv6Addr>::new().build(),
            false => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(family).execute();
        let mut best: Option<(u32, IpAddr)> = None;
        while let Some(r) = routes.try_next().await? {
            if r.header.destination_prefix_length != 0 {
                continue;
            }
            let (mut oif, mut gw, mut metric) = (None, None, 0);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(IpAddr::V4(*g)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = Some(IpAddr::V6(*g)),
                    RouteAttribute::Priority(m) => metric = *m,
                    _ => {}
                }
            }
            if let (Some(i), Some(g)) = (oif, gw)
                && i == dev
                && best.is_none_or(|(m, _)| metric < m)
            {
                best = Some((metric, g));
            }
        }
        Ok(best.map(|(_, g)| g))
    }

    /// `ip route replace DST via GW dev DEV metric METRIC`, a host route
    /// (/32, /128) by way of `gw` if given: how a socket tied to one WAN
    /// interface reaches the server over it.
    pub async fn host_route_via(
        &self,
        dst: IpAddr,
        gw: Option<IpAddr>,
        dev: u32,
        metric: u32,
    ) -> Result<()> {
        self.handle
            .route()
            .add(host_route(dst, gw, dev, metric)?)
            .replace()
            .execute()
            .await
            .with_context(|| match gw {
                Some(gw) => format!("route {dst} via {gw} metric {metric}"),
                None => format!("route {dst} dev {dev} metric {metric}"),
            })
    }

    pub async fn delete_host_route(
        &self,
        dst: IpAddr,
        gw: Option<IpAddr>,
        dev: u32,
        metric: u32,
    ) -> Result<()> {
        self.handle
            .route()
            .del(host_route(dst, gw, dev, metric)?)
            .execute()
            .await?;
        Ok(())
    }

    /// What the kernel knows of `ip` on interface `dev`: its neighbour
    /// entry, if it has one.
    async fn neighbor_entry(&self, dev: u32, ip: IpAddr) -> Result<Option<NeighbourMessage>> {
        let family = if ip.is_ipv4() {
            IpVersion::V4
        } else {
            IpVersion::V6
        };
        let mut neighs = self.handle.neighbours().get().set_family(family).execute();
        while let Some(n) = neighs.try_next().await? {
            let is_ip = n.attributes.iter().any(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => ip == *d,
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => ip == *d,
                _ => false,
            });
            if n.header.ifindex == dev && n.header.kind == RouteType::Unicast && is_ip {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }

    /// Forgets what the kernel knows of `ip` on interface `dev` (nothing
    /// if it knows nothing): a line whose carrier is back resolves its next
    /// hop at once, instead of when a resolution begun while it was down
    /// next tries (a second later).
    pub async fn forget_neighbor(&self, dev: u32, ip: impl Into<IpAddr>) -> Result<()> {
        if let Some(n) = self.neighbor_entry(dev, ip.into()).await? {
            self.handle.neighbours().del(n).execute().await?;
        }
        Ok(())
    }

    /// The resolved MAC of `ip` on interface `dev`, if the kernel has one.
    pub async fn neighbor(&self, dev: u32, ip: impl Into<IpAddr>) -> Result<Option<[u8; 6]>> {
        let Some(n) = self.neighbor_entry(dev, ip.into()).await? else {
            return Ok(None);
        };
        if matches!(
            n.header.state,
            NeighbourState::Incomplete | NeighbourState::Failed
        ) {
            return Ok(None);
        }
        Ok(n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLocalAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        }))
    }
}

/// `DST/32 via GW dev DEV metric METRIC` (/128 for IPv6); the next hop
/// of the destination's family.
fn host_route(dst: IpAddr, gw: Option<IpAddr>, dev: u32, metric: u32) -> Result<RouteMessage> {
    if gw.is_some_and(|gw| gw.is_ipv4() != dst.is_ipv4()) {
        bail!(
            "route {dst}: next hop {} is of the other family",
            gw.unwrap_or(dst)
        );
    }
    let len = if dst.is_ipv4() { 32 } else { 128 };
    let r = RouteMessageBuilder::<IpAddr>::new().destination_prefix(dst, len)?;
    Ok(match gw {
        Some(gw) => r.gateway(gw)?,
        None => r.scope(RouteScope::Link),
    }
    .output_interface(dev)
    .priority(metric)
    .build())
}

/// Name of the playout's hold device.
pub fn hold_name(name: &str) -> String {
    let mut s = format!("{name}-hold");
    s.truncate(15);
    s
}

/// Name of the server's split device (`crate::split`): a prefix of `name`
/// short enough that the suffix survives, so it is never the hold device.
pub fn split_name(name: &str) -> String {
    let keep = name.char_indices().nth(9).map_or(name.len(), |(i, _)| i);
    format!("{}-split", &name[..keep])
}

/// Name of the capture device's sink end.
pub fn sink_name(name: &str) -> String {
    let mut s = format!("{name}-sink");
    s.truncate(15);
    s
}

/// What a TUN/TAP device's reads and writes carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frames {
    /// A TAP device: Ethernet frames.
    Ethernet,
    /// A TUN device: IP packets, each behind 4 bytes of packet information
    /// (flags, then the protocol the kernel's skb says it is), as an L3
    /// driver (PPP, WireGuard) frames them by that protocol.
    IpWithInfo,
}

/// Creates (and owns: it goes when the fd closes) a TUN or TAP device
/// `name` carrying `frames`; its reads and writes do not block if
/// `nonblock`.
pub fn open_tun(name: &str, frames: Frames, nonblock: bool) -> Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: libc::c_short = 0x0001;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let tap = frames == Frames::Ethernet;
    let what = if tap { "TAP" } else { "TUN" };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        bail!("{what} device name {name:?}: 1 to 15 bytes");
    }
    let flags = libc::O_RDWR | libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: a NUL-terminated path; the returned fd is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), flags) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("opening /dev/net/tun");
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: match frames {
            Frames::Ethernet => IFF_TAP | IFF_NO_PI,
            Frames::IpWithInfo => IFF_TUN,
        },
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out
    // as; the fd is a tun control fd.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("creating {what} device {name}"));
    }
    Ok(fd)
}

/// Makes the kernel resolve `ip` on `dev` (ARP, or neighbour discovery):
/// one empty datagram to the discard port, sent out of that interface.
pub fn poke_neighbor(dev: &str, ip: impl Into<IpAddr>) -> Result<()> {
    // (A link-local next hop is on the interface the socket is tied to.)
    let to = SocketAddr::new(ip.into(), 9);
    let any: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let sock = UdpSocket::bind((any, 0))?;
    bind_to_device(&sock, dev)?;
    let _ = sock.send_to(&[], to);
    Ok(())
}

/// `SO_BINDTODEVICE`: the socket sends and receives on `dev` only. Called
/// again for a re-added interface of the same name: the kernel took the
/// old one's index.
pub fn bind_to_device(sock: &impl AsRawFd, dev: &str) -> Result<()> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: valid socket fd; the option value is a NUL-terminated name of
    // the given length.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.as_bytes_with_nul().len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("SO_BINDTODEVICE {dev}"));
    }
    Ok(())
}

/// A non-blocking UDP socket on `addr`, tied to `dev` if given, allowed
/// to send broadcasts, for tokio.
pub fn udp_socket(addr: impl Into<SocketAddr>, dev: Option<&str>) -> Result<tokio::net::UdpSocket> {
    let addr = addr.into();
    let sock = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
    if let Some(dev) = dev {
        bind_to_device(&sock, dev)?;
    }
    sock.set_broadcast(true)?;
    sock.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(sock)?)
}

/// Writes a sysctl under /proc/sys (of this process's network namespace).
pub fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("sysctl {key}={value}"))
}

/// Turns off checksum offload, scatter-gather, TSO, GSO and GRO: the wrap
/// must see finished, wire-sized packets with their checksums filled in.
fn disable_offloads(dev: &str) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    for cmd in [
        ethtool::STSO,
        ethtool::SGSO,
        ethtool::SGRO,
        ethtool::SSG,
        ethtool::STXCSUM,
    ] {
        ethtool::value(&sock, dev, cmd, 0)?;
    }
    Ok(())
}

/// The ethtool ioctl's one-value commands (`ETHTOOL_G*` read, `ETHTOOL_S*`
/// set), on an interface of the socket's network namespace.
pub mod ethtool {
    use std::os::fd::AsRawFd;

    use anyhow::{Context as _, Result};

    pub const GTXCSUM: u32 = 0x16;
    pub const STXCSUM: u32 = 0x17;
    pub const SSG: u32 = 0x19;
    pub const STSO: u32 = 0x1f;
    pub const SGSO: u32 = 0x24;
    pub const GGRO: u32 = 0x2b;
    pub const SGRO: u32 = 0x2c;

    /// Runs `cmd` on `dev` with `data`; returns the value the kernel
    /// leaves (what a `G` command reads).
    pub fn value(sock: &impl AsRawFd, dev: &str, cmd: u32, data: u32) -> Result<u32> {
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        #[repr(C)]
        struct IfReq {
            name: [libc::c_char; libc::IFNAMSIZ],
            data: *mut EthtoolValue,
            _pad: [u8; 16],
        }
        let mut value = EthtoolValue { cmd, data };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: &mut value,
            _pad: [0; 16],
        };
        for (d, s) in req
            .name
            .iter_mut()
            .zip(dev.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a
        // live ethtool_value for the duration of the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("{dev}: ethtool command {cmd:#x}"));
        }
        Ok(value.data)
    }
}

/// Asks the kernel to timestamp every datagram `sock` receives
/// (SO_TIMESTAMPNS), for [`recv_stamped`].
pub fn timestamp_arrivals(sock: &tokio::net::UdpSocket) -> Result<()> {
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
        .context("SO_TIMESTAMPNS")?;
    Ok(())
}

/// A received datagram: its length, source (IPv4 or IPv6, as the socket
/// is), and the kernel's receive time (CLOCK_REALTIME, ns; 0 without
/// [`timestamp_arrivals`]).
pub async fn recv_stamped(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, u64)> {
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{
        ControlMessageOwned, MsgFlags, SockaddrLike as _, SockaddrStorage, recvmsg,
    };
    loop {
        sock.readable().await?;
        let r = sock.try_io(tokio::io::Interest::READABLE, || {
            let mut iov = [std::io::IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
            let msg = recvmsg::<SockaddrStorage>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)?;
            let at = msg
                .cmsgs()
                .map_err(std::io::Error::from)?
                .find_map(|c| match c {
                    ControlMessageOwned::ScmTimestampns(t) => {
                        Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
                    }
                    _ => None,
                })
                .unwrap_or(0);
            let src = match msg.address {
                Some(a) if a.family() == Some(nix::sys::socket::AddressFamily::Inet6) => a
                    .as_sockaddr_in6()
                    .map(|a| SocketAddr::V6(SocketAddrV6::new(a.ip(), a.port(), 0, 0))),
                Some(a) => a
                    .as_sockaddr_in()
                    .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port()))),
                None => None,
            }
            .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
            Ok((msg.bytes, src, at))
        });
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}
