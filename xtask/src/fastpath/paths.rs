//! The paths measured: what runs in `dut` for each, which side of it the
//! generator plays, the frame it sends and what the sink must get.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::Array,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use bond_common::{
    edpf::DEFAULT_BACKLOG_US,
    maps::{
        DirectorConfig, LINK_VALID, NodeSlot, RelayLink, ServerConfig, ServerLink, TerminalConfig,
        event,
    },
};
use bond_datapath::{self as datapath, Maps};

use super::{
    COMMUNITY, CONTENT_IP, DATA_PORT, DUT_IN, DUT_OUT, GEN_MAC, IN_MAC, LAN_IP, LINK_ID, LINK_IP,
    NAT_PORTS, ORIGIN_TOKEN, OUT_IP, OUT_MAC, PEER_IP, RELAY_PORT, RELAY_SPORT, RELAY_TOKEN,
    SERVER_IP, SERVER_PORT, SINK_DEV, SINK_MAC, USER_DPORT, USER_SPORT,
    netns::{PinDir, Topology, cmd, ifindex, in_netns, ip, load_and_attach, neigh, ns_exec},
    relay::Relay,
};
use crate::packets::{Bond, DATA_DOWN, DATA_UP, ETH_P_IP, Ip, L4, OPEN, Outer, eth, wrapped};

/// What forwards the packets in `dut`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Forwarder {
    /// XDP redirect to the egress veth and nothing else.
    Floor,
    /// The kernel's IPv4 forwarding with an nftables masquerade rule.
    Kernel,
    /// The same with an nftables flowtable, the kernel's own fast path.
    Flowtable,
    UdpRelay,
    UdpRelayMmsg,
    BondRelay,
    BondServer,
    /// An ISP tier's director: steers by community to a node's MAC.
    BondDirector,
}

/// Which way the packets go: from the LAN towards the Internet, or back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dir {
    Up,
    Down,
}

/// One path: a forwarder and, where the two differ, a direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kind {
    pub fwd: Forwarder,
    /// `None` where both directions are the same work (the floor, the
    /// userspace relays).
    pub dir: Option<Dir>,
}

impl Kind {
    const fn new(fwd: Forwarder, dir: Option<Dir>) -> Self {
        Self { fwd, dir }
    }

    /// The paths in the order of the table.
    pub const ALL: [Self; 12] = {
        use {Dir::*, Forwarder::*};
        [
            Self::new(Floor, None),
            Self::new(Kernel, Some(Up)),
            Self::new(Kernel, Some(Down)),
            Self::new(Flowtable, Some(Up)),
            Self::new(Flowtable, Some(Down)),
            Self::new(UdpRelay, None),
            Self::new(UdpRelayMmsg, None),
            Self::new(BondRelay, Some(Up)),
            Self::new(BondRelay, Some(Down)),
            Self::new(BondServer, Some(Up)),
            Self::new(BondServer, Some(Down)),
            Self::new(BondDirector, None),
        ]
    };

    pub fn name(self) -> String {
        let fwd = match self.fwd {
            Forwarder::Floor => "floor: XDP redirect, no work",
            Forwarder::Kernel => "kernel forwarding + nft masquerade",
            Forwarder::Flowtable => "kernel nft flowtable + masquerade",
            Forwarder::UdpRelay => "userspace UDP relay, 1 syscall/packet each way",
            Forwarder::UdpRelayMmsg => "userspace UDP relay, recvmmsg/sendmmsg (64)",
            Forwarder::BondRelay => "bond relay terminal (XDP)",
            Forwarder::BondServer => "bond server (XDP)",
            Forwarder::BondDirector => "bond director (XDP): by community to a node",
        };
        let dir = match (self.fwd, self.dir) {
            (_, None) => "",
            (Forwarder::BondRelay, Some(Dir::Up)) => ", up: LAN peer to server",
            (Forwarder::BondRelay, Some(Dir::Down)) => ", down: server to origin",
            (Forwarder::BondServer, Some(Dir::Up)) => ", up: unwrap + NAT",
            (Forwarder::BondServer, Some(Dir::Down)) => ", down: NAT + wrap",
            (_, Some(Dir::Up)) => ", up: new flow, SNAT",
            (_, Some(Dir::Down)) => ", down: replies, de-NAT",
        };
        format!("{fwd}{dir}")
    }

    /// Short tag for progress lines and namespace and pin names.
    pub fn tag(self) -> String {
        let fwd = match self.fwd {
            Forwarder::Floor => "floor",
            Forwarder::Kernel => "kernel",
            Forwarder::Flowtable => "flowtable",
            Forwarder::UdpRelay => "udp",
            Forwarder::UdpRelayMmsg => "mmsg",
            Forwarder::BondRelay => "relay",
            Forwarder::BondServer => "server",
            Forwarder::BondDirector => "director",
        };
        match self.dir {
            None => fwd.to_string(),
            Some(Dir::Up) => format!("{fwd}-up"),
            Some(Dir::Down) => format!("{fwd}-down"),
        }
    }

    pub fn is_userspace(self) -> bool {
        matches!(self.fwd, Forwarder::UdpRelay | Forwarder::UdpRelayMmsg)
    }

    /// The addresses of dut's two veths, and the hosts at their far ends
    /// (gen's and sink's), which get permanent neighbour entries.
    fn layout(self) -> Layout {
        use {Dir::*, Forwarder::*};
        let (gen_side, sink_side) = match (self.fwd, self.dir) {
            (Kernel | Flowtable, Some(Down)) => ((OUT_IP, CONTENT_IP), (LAN_IP, PEER_IP)),
            (BondRelay, Some(Up)) => ((LAN_IP, PEER_IP), (LINK_IP, SERVER_IP)),
            (BondRelay, Some(Down)) => ((LINK_IP, SERVER_IP), (LAN_IP, PEER_IP)),
            (BondServer, Some(Up)) | (BondDirector, _) => {
                ((SERVER_IP, LINK_IP), (OUT_IP, CONTENT_IP))
            }
            (BondServer, Some(Down)) => ((OUT_IP, CONTENT_IP), (SERVER_IP, LINK_IP)),
            _ => ((LAN_IP, PEER_IP), (OUT_IP, CONTENT_IP)),
        };
        Layout {
            gen_side,
            sink_side,
        }
    }

    /// The device on dut's Internet side, where the kernel masquerades.
    fn nat_dev(self) -> &'static str {
        match self.dir {
            Some(Dir::Down) => DUT_IN,
            _ => DUT_OUT,
        }
    }
}

impl Forwarder {
    /// Why this kernel cannot run the path, if it cannot.
    pub fn unavailable(self) -> Option<String> {
        (self == Self::Flowtable && super::kernel_option("CONFIG_NF_FLOW_TABLE") == Some(false))
            .then(|| {
                "this kernel has no nftables flowtable (CONFIG_NF_FLOW_TABLE is not set)"
                    .to_string()
            })
    }
}

/// dut's address on each side and the host at the other end.
struct Layout {
    gen_side: (Ipv4Addr, Ipv4Addr),
    sink_side: (Ipv4Addr, Ipv4Addr),
}

/// What runs in `dut` for one path. Fields drop in order: the relay
/// thread stops, bond's programs detach, their pins go.
#[derive(Default)]
pub(super) struct Dut {
    pub relay: Option<Relay>,
    bond: Option<(Ebpf, Maps)>,
    pin: Option<PinDir>,
    /// dut's namespace, for the flowtable paths (their forward chain's
    /// counter).
    flowtable: Option<String>,
}

impl Dut {
    /// Configures `dut` for a path of `kind`: addresses, neighbours, and
    /// what forwards (the bench object's programs come from `tools`; a
    /// userspace relay runs on CPU `relay_cpu`).
    pub fn setup(kind: Kind, topo: &Topology, tools: &mut Ebpf, relay_cpu: usize) -> Result<Self> {
        let mut this = Self::default();
        let dut = topo.dut.clone();
        let (in_idx, out_idx) = in_netns(&dut, || Ok((ifindex(DUT_IN)?, ifindex(DUT_OUT)?)))?;
        let layout = kind.layout();
        for (dev, (addr, far), far_mac) in [
            (DUT_IN, layout.gen_side, GEN_MAC),
            (DUT_OUT, layout.sink_side, SINK_MAC),
        ] {
            ip(&dut, &["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            neigh(&dut, far, far_mac, dev)?;
        }
        let down = kind.dir == Some(Dir::Down);
        match kind.fwd {
            Forwarder::Floor => {
                let mut to: Array<_, u32> = tools
                    .map_mut("REDIRECT_TO")
                    .context("map REDIRECT_TO")?
                    .try_into()?;
                to.set(0, out_idx, 0).context("setting REDIRECT_TO")?;
                load_and_attach(tools, "bench_redirect", &dut, DUT_IN)?;
            }
            Forwarder::Kernel | Forwarder::Flowtable => {
                ns_exec(&dut, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                let nat = kind.nat_dev();
                let mut rules = String::from("table ip bfp {\n");
                if kind.fwd == Forwarder::Flowtable {
                    // Every UDP flow into the flowtable; the counter sees
                    // the packets that still take the forward path.
                    rules += &format!(
                        "  flowtable ft {{\n    hook ingress priority 0;\n    \
                         devices = {{ {DUT_IN}, {DUT_OUT} }};\n  }}\n  \
                         chain forward {{\n    type filter hook forward priority 0;\n    \
                         counter meta l4proto udp flow add @ft\n  }}\n"
                    );
                }
                rules += &format!(
                    "  chain post {{\n    type nat hook postrouting priority srcnat;\n    \
                     oifname \"{nat}\" masquerade\n  }}\n}}\n"
                );
                let args = ["netns", "exec", &dut, "nft", "-f", "-"];
                cmd("ip", &args, Some(&rules)).context("nftables rules")?;
                if kind.fwd == Forwarder::Flowtable {
                    this.flowtable = Some(dut.clone());
                }
                // Conntrack entries outlive the pauses between a path's
                // runs (the other paths' turns).
                ns_exec(
                    &dut,
                    "sysctl",
                    &[
                        "-qw",
                        "net.netfilter.nf_conntrack_udp_timeout=3600",
                        "net.netfilter.nf_conntrack_udp_timeout_stream=3600",
                    ],
                )?;
                load_and_attach(tools, "bench_pass", &dut, DUT_IN)?;
                if down {
                    open_conntrack(&topo.sink)?;
                }
            }
            Forwarder::UdpRelay | Forwarder::UdpRelayMmsg => {
                load_and_attach(tools, "bench_pass", &dut, DUT_IN)?;
                this.relay = Some(Relay::start(
                    &dut,
                    relay_cpu,
                    kind.fwd == Forwarder::UdpRelayMmsg,
                )?);
            }
            Forwarder::BondRelay => {
                let pin = PinDir::new(&kind.tag())?;
                let ebpf = datapath::load(bond_datapath::ebpf::TERMINAL, &pin.0)
                    .context("loading bond's terminal object")?;
                let maps = Maps::new(&pin.0);
                // A terminal at 10.0.1.1 whose WAN link relays between its
                // LAN peer 10.0.1.2 and the server: up, from the LAN (in0)
                // to the link (out0); down, from the link (in0) to the LAN
                // (out0).
                let (lan, lan_mac, wan, wan_mac, gw_mac, peer_mac) = if down {
                    (out_idx, OUT_MAC, in_idx, IN_MAC, GEN_MAC, SINK_MAC)
                } else {
                    (in_idx, IN_MAC, out_idx, OUT_MAC, SINK_MAC, GEN_MAC)
                };
                maps.set_terminal_config(TerminalConfig {
                    token: RELAY_TOKEN,
                    lan_ip: LAN_IP.into(),
                    server_ip: SERVER_IP.into(),
                    lan_ifindex: lan,
                    community: COMMUNITY,
                    data_port: DATA_PORT,
                    server_port: SERVER_PORT,
                    lan_mac,
                    _pad: [0; 6],
                    server_ip6: [0; 16],
                })?;
                maps.set_relay_link(
                    RELAY_PORT,
                    RelayLink {
                        wan_ifindex: wan,
                        wan_ip: LINK_IP.into(),
                        link: LINK_ID,
                        flags: 0,
                        port: RELAY_PORT,
                        wan_mac,
                        gw_mac,
                        mtu: 1500,
                        _pad2: [0; 2],
                    },
                )?;
                maps.set_neighbor(PEER_IP, peer_mac)?;
                this.attach_bond(ebpf, maps, pin, &dut, "bond_terminal")?;
            }
            Forwarder::BondServer => {
                // bpf_fib_lookup needs forwarding on, as the agent sets it.
                ns_exec(&dut, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                let pin = PinDir::new(&kind.tag())?;
                let ebpf = datapath::load(bond_datapath::ebpf::SERVER, &pin.0)
                    .context("loading bond's server object")?;
                let maps = Maps::new(&pin.0);
                // A server at 198.51.100.254:7000 with one community link
                // (198.51.100.11:7001), one logged-on origin (10.0.1.1) and
                // content servers on the NAT side (203.0.113.0/24).
                maps.set_server_config(ServerConfig {
                    wan_ip: SERVER_IP.into(),
                    nat_ip: OUT_IP.into(),
                    port: SERVER_PORT,
                    port_min: *NAT_PORTS.start(),
                    port_max: *NAT_PORTS.end(),
                    link_mtu: 1500,
                    per_origin: 0,
                    nat_ip6: [0; 16],
                    wan_ip6: [0; 16],
                    nat_count: 1,
                    nat_block: NAT_PORTS.len() as u16,
                    // The bench names the port its one flow gets.
                    nat_order: bond_common::maps::NAT_SEQUENTIAL,
                    _pad: 0,
                })?;
                maps.set_server_link(
                    0,
                    ServerLink {
                        ip: LINK_IP.into(),
                        port: RELAY_PORT,
                        community: COMMUNITY,
                        link: LINK_ID,
                        flags: LINK_VALID,
                        owner: LAN_IP.into(),
                    },
                )?;
                maps.set_session(COMMUNITY, LAN_IP, ORIGIN_TOKEN)?;
                // A link far faster than the generator: the bench measures
                // packet handling, not a full link (`links_full`).
                maps.set_down_paths(COMMUNITY, &[(0, 1_000_000_000, 0)], DEFAULT_BACKLOG_US, 0)?;
                // The community holds every port, one block.
                let mut share = bond_common::maps::NatBlocks {
                    index: 0,
                    count: 1,
                    next: 0,
                    first: [0; bond_common::maps::MAX_NAT_BLOCKS],
                };
                share.first[0] = *NAT_PORTS.start();
                maps.set_nat_blocks(COMMUNITY, &share)?;
                this.attach_bond(ebpf, maps, pin, &dut, "bond_server")?;
                if down {
                    this.open_server_flow(&dut, out_idx)?;
                }
            }
            Forwarder::BondDirector => {
                let pin = PinDir::new(&kind.tag())?;
                let ebpf = datapath::load(bond_datapath::ebpf::DIRECTOR, &pin.0)
                    .context("loading bond's director object")?;
                let maps = Maps::new(&pin.0);
                // The front address is the server's; the community's
                // owner is the node behind out0 (the sink).
                maps.set_director_config(DirectorConfig {
                    front_ip: SERVER_IP.into(),
                    port: SERVER_PORT,
                    _pad: 0,
                    front_ip6: [0; 16],
                })?;
                maps.set_node(
                    bond_datapath::Owners::Director,
                    0,
                    NodeSlot {
                        ifindex: out_idx,
                        dst_mac: SINK_MAC,
                        src_mac: OUT_MAC,
                    },
                )?;
                maps.set_owner(bond_datapath::Owners::Director, COMMUNITY, Some(0))?;
                this.attach_bond(ebpf, maps, pin, &dut, "bond_director")?;
            }
        }
        Ok(this)
    }

    /// Loads bond's program `prog` and attaches it to dut's in0; keeps the
    /// object, its maps and their pins.
    fn attach_bond(
        &mut self,
        mut ebpf: Ebpf,
        maps: Maps,
        pin: PinDir,
        dut: &str,
        prog: &str,
    ) -> Result<()> {
        load_and_attach(&mut ebpf, prog, dut, DUT_IN)?;
        self.bond = Some((ebpf, maps));
        self.pin = Some(pin);
        Ok(())
    }

    /// For the server's down path: the flow the replies belong to, from
    /// one up packet (the up path's frame) run through `bond_server` as if
    /// it had come in on the WAN side, out0. It takes the first NAT port.
    fn open_server_flow(&self, dut: &str, wan_idx: u32) -> Result<()> {
        let (ebpf, maps) = self.bond.as_ref().context("no bond object")?;
        let prog: &Xdp = ebpf
            .program("bond_server")
            .context("no program bond_server")?
            .try_into()?;
        let (up, _) = frames(Kind::new(Forwarder::BondServer, Some(Dir::Up)), 64);
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
        let ctx: Vec<u8> = [0, up.len() as u32, 0, wan_idx, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let verdict = in_netns(dut, || {
            prog.test_run(TestRunOptions {
                data_in: Some(&up),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN of bond_server with the opening up packet")
        })?;
        const XDP_REDIRECT: u32 = 4;
        ensure!(
            verdict.return_value == XDP_REDIRECT,
            "the opening up packet got verdict {}, not XDP_REDIRECT",
            verdict.return_value
        );
        let flows = maps.flows().context("reading the server's flows")?;
        ensure!(
            flows.len() == 1,
            "the opening up packet left {} flows, not 1",
            flows.len()
        );
        Ok(())
    }

    /// bond's non-zero drop counters and slow-path events, if any.
    pub fn bond_counters(&self) -> Result<Option<String>> {
        let Some((_, maps)) = self.bond.as_ref() else {
            return Ok(None);
        };
        let mut bad = if maps.has("T_DROPS") {
            maps.terminal_drops()
        } else if maps.has("D_DROPS") {
            maps.director_drops()
        } else {
            maps.server_drops()
        }
        .context("reading bond's drop counters")?;
        if maps.has("S_EVENTS") {
            let ev = maps
                .server_events()
                .context("reading the server's events")?;
            bad.extend(
                ev.into_iter()
                    .filter(|e| e.0 == event::NAMES[event::SLOW_PATH as usize]),
            );
        }
        let bad: Vec<String> = bad
            .into_iter()
            .filter(|c| c.1 != 0)
            .map(|(n, v)| format!("{n} = {v}"))
            .collect();
        Ok((!bad.is_empty()).then(|| bad.join(", ")))
    }

    /// For the flowtable paths: how many packets have gone through the
    /// forward chain (not the flowtable) so far, by its counter.
    pub fn forwarded_slowly(&self) -> Result<Option<u64>> {
        let Some(dut) = &self.flowtable else {
            return Ok(None);
        };
        let listing = ns_exec(dut, "nft", &["list", "chain", "ip", "bfp", "forward"])?;
        let packets = listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no packet counter in the forward chain:\n{listing}"))?;
        Ok(Some(packets))
    }
}

/// For the kernel's down paths: the conntrack entry the replies belong
/// to, from one datagram the LAN host (at the sink) sends to the
/// content server (at gen) through dut, masqueraded on the way.
fn open_conntrack(sink: &str) -> Result<()> {
    ip(
        sink,
        &["addr", "add", &format!("{PEER_IP}/24"), "dev", SINK_DEV],
    )?;
    neigh(sink, LAN_IP, OUT_MAC, SINK_DEV)?;
    ip(
        sink,
        &["route", "add", "default", "via", &LAN_IP.to_string()],
    )?;
    in_netns(sink, || {
        let s = UdpSocket::bind(SocketAddrV4::new(PEER_IP, USER_SPORT))
            .context("binding the LAN host's socket")?;
        s.send_to(b"open", SocketAddrV4::new(CONTENT_IP, USER_DPORT))
            .context("sending the LAN host's first datagram")?;
        Ok(())
    })
}

/// What a path should deliver for one test frame.
pub(super) enum Expect {
    /// Exactly these bytes.
    Frame(Vec<u8>),
    /// These bytes, but for the bond header's send time and link number,
    /// which the program chooses ([`packets::fill_open`]).
    Wrapped(Vec<u8>),
    /// A UDP datagram with this payload between these endpoints (the IP
    /// header's id and flags are the sender kernel's choice).
    Udp {
        src: SocketAddrV4,
        dst: SocketAddrV4,
        payload: Vec<u8>,
    },
}

/// The frame the generator sends on a path, and what the sink should get
/// for it, with a user packet of `size` bytes.
pub(super) fn frames(kind: Kind, size: usize) -> (Vec<u8>, Expect) {
    let user = |src, dst, l4| {
        let mut p = Ip::new(src, dst, l4);
        p.payload = vec![0x5a; size - 28];
        p
    };
    let up = L4::udp(USER_SPORT, USER_DPORT);
    let down = up.reply();
    // The kernel forwards: one hop less to live, new addresses, the
    // checksums fixed.
    let forwarded = |p: &Ip, src: Ipv4Addr, dst: Ipv4Addr, l4: L4| {
        let out = Ip {
            src,
            dst,
            ttl: p.ttl - 1,
            l4,
            ..p.clone()
        };
        out.frame(SINK_MAC, OUT_MAC)
    };
    match (kind.fwd, kind.dir) {
        (Forwarder::Floor, _) => {
            let f = user(PEER_IP, CONTENT_IP, up).frame(IN_MAC, GEN_MAC);
            (f.clone(), Expect::Frame(f))
        }
        (Forwarder::Kernel | Forwarder::Flowtable, Some(Dir::Down)) => {
            // A reply to the masqueraded flow, back to the LAN host.
            let p = user(CONTENT_IP, OUT_IP, down);
            let out = forwarded(&p, CONTENT_IP, PEER_IP, down);
            (p.frame(IN_MAC, GEN_MAC), Expect::Frame(out))
        }
        (Forwarder::Kernel | Forwarder::Flowtable, _) => {
            let p = user(PEER_IP, CONTENT_IP, up);
            let out = forwarded(&p, OUT_IP, CONTENT_IP, up);
            (p.frame(IN_MAC, GEN_MAC), Expect::Frame(out))
        }
        (Forwarder::UdpRelay | Forwarder::UdpRelayMmsg, _) => {
            let p = user(PEER_IP, LAN_IP, up);
            let payload = p.payload.clone();
            (
                p.frame(IN_MAC, GEN_MAC),
                Expect::Udp {
                    src: SocketAddrV4::new(OUT_IP, RELAY_SPORT),
                    dst: SocketAddrV4::new(CONTENT_IP, USER_DPORT),
                    payload,
                },
            )
        }
        (Forwarder::BondRelay, Some(Dir::Down)) => {
            // DATA_DOWN from the server on the WAN link, for the LAN peer:
            // out to its data port with bond's own outer header, the bond
            // header and the inner packet untouched (tests/prog/,
            // terminal_relays_down_to_the_origin).
            let inner = user(CONTENT_IP, PEER_IP, down).bytes();
            let outer = Outer {
                dst_mac: IN_MAC,
                src_mac: GEN_MAC,
                src: SERVER_IP,
                dst: LINK_IP,
                sport: SERVER_PORT,
                dport: RELAY_PORT,
                ttl: 57,
                id: 0x0009,
                more_fragments: false,
            };
            let bond = Bond::data(DATA_DOWN, COMMUNITY, LINK_ID, PEER_IP, 0x1234, ORIGIN_TOKEN);
            let out = Outer {
                dst_mac: SINK_MAC,
                src_mac: OUT_MAC,
                src: LAN_IP,
                dst: PEER_IP,
                sport: RELAY_PORT,
                dport: DATA_PORT,
                ttl: 64,
                id: 0,
                ..outer
            };
            (
                wrapped(&outer, &bond, &inner),
                Expect::Frame(wrapped(&out, &bond, &inner)),
            )
        }
        (Forwarder::BondRelay, _) => {
            // DATA_UP from the LAN peer to the relay port, out on the
            // WAN link towards the server (tests/prog/,
            // terminal_relays_up_to_the_server).
            let inner = user(PEER_IP, CONTENT_IP, up).bytes();
            let outer = Outer {
                dst_mac: IN_MAC,
                src_mac: GEN_MAC,
                src: PEER_IP,
                dst: LAN_IP,
                sport: DATA_PORT,
                dport: RELAY_PORT,
                ttl: 64,
                id: 0x0077,
                more_fragments: false,
            };
            let bond = Bond::data(DATA_UP, COMMUNITY, LINK_ID, PEER_IP, 0x41, ORIGIN_TOKEN);
            let out = Outer {
                dst_mac: SINK_MAC,
                src_mac: OUT_MAC,
                src: LINK_IP,
                dst: SERVER_IP,
                sport: RELAY_PORT,
                dport: SERVER_PORT,
                // The relay writes bond's own outer header
                // (`wire::outer_headers`): identification 0.
                id: 0,
                ..outer
            };
            (
                wrapped(&outer, &bond, &inner),
                Expect::Frame(wrapped(&out, &bond, &inner)),
            )
        }
        (Forwarder::BondServer, Some(Dir::Down)) => {
            // The content server's reply to the flow's NAT port, wrapped
            // for the origin on the community link, the server's clock
            // and the link's number in its bond header (tests/prog/,
            // server_nats_tcp_udp_icmp_and_wraps_replies).
            let nat_port = *NAT_PORTS.start();
            let reply = user(CONTENT_IP, OUT_IP, down.with_dst_port(nat_port));
            let inner = Ip {
                dst: LAN_IP,
                ttl: reply.ttl - 1,
                l4: down,
                ..reply.clone()
            };
            let out = Outer {
                dst_mac: SINK_MAC,
                src_mac: OUT_MAC,
                src: SERVER_IP,
                dst: LINK_IP,
                sport: SERVER_PORT,
                dport: RELAY_PORT,
                ttl: 64,
                id: 0,
                more_fragments: false,
            };
            let bond = Bond::data(DATA_DOWN, COMMUNITY, LINK_ID, LAN_IP, OPEN, ORIGIN_TOKEN);
            (
                reply.frame(IN_MAC, GEN_MAC),
                Expect::Wrapped(wrapped(&out, &bond, &inner.bytes())),
            )
        }
        (Forwarder::BondDirector, _) => {
            // The server path's DATA_UP, to the front address: out to the
            // owning node with only the Ethernet addresses changed.
            let (frame, _) = frames(Kind::new(Forwarder::BondServer, Some(Dir::Up)), size);
            let mut out = frame.clone();
            out[..6].copy_from_slice(&SINK_MAC);
            out[6..12].copy_from_slice(&OUT_MAC);
            (frame, Expect::Frame(out))
        }
        (Forwarder::BondServer, _) => {
            // DATA_UP from the community link, unwrapped and NATed to
            // the first free port, out to the content server.
            let p = user(LAN_IP, CONTENT_IP, up);
            let outer = Outer {
                dst_mac: IN_MAC,
                src_mac: GEN_MAC,
                src: LINK_IP,
                dst: SERVER_IP,
                sport: RELAY_PORT,
                dport: SERVER_PORT,
                ttl: 50,
                id: 0x0abc,
                more_fragments: false,
            };
            let bond = Bond::data(DATA_UP, COMMUNITY, LINK_ID, LAN_IP, 0x40, ORIGIN_TOKEN);
            let out = Ip {
                src: OUT_IP,
                ttl: p.ttl - 1,
                l4: p.l4.with_src_port(*NAT_PORTS.start()),
                ..p.clone()
            };
            (
                wrapped(&outer, &bond, &p.bytes()),
                Expect::Frame(eth(SINK_MAC, OUT_MAC, ETH_P_IP, &out.bytes())),
            )
        }
    }
}
