//! Each BPF program on crafted packets through BPF_PROG_TEST_RUN, Katran
//! style: every fixture is an input packet, the expected verdict, the exact
//! expected output bytes (built independently in `common::packets`, every
//! checksum recomputed with etherparse) and the expected counters, read back
//! through `bond_datapath::Maps`. The programs are configured only
//! through `Maps`, as the agent configures them.
mod common;

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{Program, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use bond_common::maps::{
    FlowKey, LINK_VALID, LinkStats, RelayLink, ServerConfig, ServerLink, TerminalConfig, UpLink,
};
use bond_datapath::{self as datapath, Maps};
use common::{
    PinDir, isolate,
    packets::{
        ANNOUNCE, Bond, DATA_DOWN, DATA_UP, ETH_P_IP, Ip, L4, Mac, Outer, WRAP_LEN, arp_frame,
        assert_checksums, assert_wrapped_checksums, eth, fix_ipv4_checksum, ipv4_of,
        ipv6_udp_frame, set_total_len, udp_frame, wrapped,
    },
};

/// The queue the tests let a path count: long enough that the slow rates
/// they use (so that picks do not depend on how fast the test runs) are
/// never cut short.
const TEST_BACKLOG_US: u32 = 60_000_000;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

// ------------------------------------------------------------- harness --

/// One loaded object, its maps pinned in a directory of its own (removed on
/// drop, after the object is unloaded).
struct Obj {
    ebpf: Ebpf,
    maps: Maps,
    _pin: PinDir,
}

impl Obj {
    fn load(object: &[u8], tag: &str, progs: &[&str]) -> Self {
        Self::load_with_sizes(object, tag, progs, &[])
    }

    /// As [`Self::load`], with some maps' sizes set at load time.
    fn load_with_sizes(object: &[u8], tag: &str, progs: &[&str], sizes: &[(&str, u32)]) -> Self {
        let pin = PinDir::new(tag);
        let mut ebpf = datapath::load_with_sizes(object, pin.path(), sizes).expect("load object");
        for &name in progs {
            match ebpf.program_mut(name).expect("program in object") {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => panic!("{name}: unexpected program type"),
            }
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        let maps = Maps::new(pin.path());
        Self {
            ebpf,
            maps,
            _pin: pin,
        }
    }

    fn terminal(tag: &str) -> Self {
        Self::load(
            bond_datapath::ebpf::TERMINAL,
            tag,
            &[
                "bond_wrap",
                "bond_terminal",
                "bond_relay",
                "bond_terminal_l3",
            ],
        )
    }

    fn server(tag: &str) -> Self {
        Self::load(bond_datapath::ebpf::SERVER, tag, &["bond_server"])
    }

    /// Runs `prog` once on `input`; returns the verdict and the output packet.
    fn run(&self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, input)
            .unwrap_or_else(|errno| panic!("test_run {prog}: refused (errno {errno})"))
    }

    /// Runs `prog` and checks the verdict and, if given, the exact output.
    fn expect(&self, prog: &str, what: &str, input: &[u8], verdict: u32, output: Option<&[u8]>) {
        let (v, out) = self.run(prog, input);
        assert_eq!(v, verdict, "{what}: verdict");
        if let Some(want) = output {
            assert_bytes(&out, want, what);
        }
    }

    /// Runs `prog`, expects a drop counted under exactly `reason`.
    fn expect_drop(&self, prog: &str, what: &str, input: &[u8], verdict: u32, reason: &str) {
        let before = self.drops();
        let (v, _) = self.run(prog, input);
        assert_eq!(v, verdict, "{what}: verdict");
        let after = self.drops();
        let grew: Vec<_> = after
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        assert_eq!(grew, vec![(reason, 1)], "{what}: drop counters");
    }

    /// Drop counters of whichever role this object is.
    fn drops(&self) -> Vec<(&'static str, u64)> {
        if self.maps.has("T_DROPS") {
            self.maps.terminal_drops()
        } else {
            self.maps.server_drops()
        }
        .expect("drop counters")
    }

    fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        self.drops().into_iter().filter(|d| d.1 != 0).collect()
    }

    fn event(&self, name: &str) -> u64 {
        let ev = self.maps.server_events().expect("events");
        ev.into_iter()
            .find(|e| e.0 == name)
            .unwrap_or_else(|| panic!("no event {name}"))
            .1
    }
}

/// Byte comparison that says where the first difference is.
/// A bond header's send time that `want` leaves open (zero): the program
/// stamps the kernel's clock, so a test checks it is fresh instead.
const OPEN: u32 = 0;

/// `want` with the send time `got` carries where `want` leaves it open,
/// once checked: at most 10 s old by CLOCK_MONOTONIC (the clock of
/// `bpf_ktime_get_ns`), so a zero, a constant or a stale stamp fails.
fn with_stamp(got: &[u8], want: &[u8], what: &str) -> Vec<u8> {
    const SENT: std::ops::Range<usize> = 54..58;
    let wrapped =
        |f: &[u8]| f.len() >= 66 && f[12..14] == [8, 0] && f[23] == 17 && f[42..44] == [0xb0, 0x4d];
    let mut want = want.to_vec();
    if wrapped(&want) && wrapped(got) && get32(&want, SENT.start) == OPEN {
        let sent = get32(got, SENT.start);
        let now = (bond_datapath::monotonic_ns() / 1000) as u32;
        assert!(
            now.wrapping_sub(sent) < 10_000_000,
            "{what}: send time {sent} µs, now {now} µs"
        );
        want[SENT].copy_from_slice(&sent.to_be_bytes());
    }
    // Senders number each link's DATA (1 to 127, from wherever the link's
    // count stands): a test that leaves the number open (0) takes any;
    // `server_numbers_each_links_packets_and_keeps_copies` and
    // `wrap_numbers_each_links_packets_and_keeps_copies` check them.
    const SEQ: usize = 49;
    let data = |k: u8| k == DATA_UP || k == DATA_DOWN;
    if wrapped(&want) && wrapped(got) && data(want[45]) && want[SEQ] == 0 {
        want[SEQ] = got[SEQ];
    }
    want
}

fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    let want = &with_stamp(got, want, what)[..];
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: output differs (first difference at byte {at:?}, lengths {} vs {})\n got: {got:02x?}\nwant: {want:02x?}",
            got.len(),
            want.len()
        );
    }
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

// ============================================================ terminal ==

mod term {
    use super::*;

    pub const COMMUNITY: u16 = 7;
    pub const TOKEN: u64 = 0x0123_4567_89ab_cdef;
    pub const PEER_TOKEN: u64 = 0x5eed_0000_0000_0002;
    pub const LAN_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    pub const LAN_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
    pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    pub const PEER_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x02];
    /// A LAN peer with no T_NEIGH entry.
    pub const PEER3: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 3);
    pub const PEER3_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x03];
    pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
    pub const SERVER_PORT: u16 = 7000;
    pub const DATA_PORT: u16 = 7100;
    pub const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
    pub const WAN_MAC: Mac = [0x02, 0, 0, 0, 0x0a, 0x11];
    pub const GW_MAC: Mac = [0x02, 0, 0, 0, 0x0a, 0x01];
    pub const RELAY_PORT: u16 = 7001;
    pub const RELAY_LINK: u8 = 3;
    /// A second own link whose MTU is too small for the fixtures.
    pub const SMALL_RELAY_PORT: u16 = 7002;
    pub const SMALL_RELAY_LINK: u8 = 4;
    pub const CONTENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const BOND0_MAC: Mac = [0x02, 0, 0, 0, 0xb0, 0x00];

    /// A terminal configured as 10.0.1.1 with one WAN link (port 7001) and
    /// one LAN neighbour (10.0.1.2).
    pub fn setup(tag: &str) -> Obj {
        let t = Obj::terminal(tag);
        let m = &t.maps;
        m.set_terminal_config(TerminalConfig {
            token: TOKEN,
            lan_ip: LAN_IP.into(),
            server_ip: SERVER.into(),
            lan_ifindex: 2,
            community: COMMUNITY,
            data_port: DATA_PORT,
            server_port: SERVER_PORT,
            lan_mac: LAN_MAC,
        })
        .unwrap();
        for (port, link, mtu) in [
            (RELAY_PORT, RELAY_LINK, 1500),
            (SMALL_RELAY_PORT, SMALL_RELAY_LINK, 100),
        ] {
            m.set_relay_link(port, relay_link(port, link, mtu, 0))
                .unwrap();
        }
        m.set_neighbor(PEER, PEER_MAC).unwrap();
        t
    }

    /// An own link's entry: its port, id, MTU and flags.
    pub fn relay_link(port: u16, link: u8, mtu: u16, flags: u8) -> RelayLink {
        RelayLink {
            wan_ifindex: 3,
            wan_ip: WAN_IP.into(),
            link,
            flags,
            port,
            wan_mac: WAN_MAC,
            gw_mac: GW_MAC,
            mtu,
            _pad2: [0; 2],
        }
    }

    /// The pieces of a wrapped frame, for fixtures to edit.
    #[derive(Clone, Debug)]
    pub struct Wrapped {
        pub outer: Outer,
        pub bond: Bond,
        pub inner: Vec<u8>,
    }

    impl Wrapped {
        pub fn frame(&self) -> Vec<u8> {
            wrapped(&self.outer, &self.bond, &self.inner)
        }
    }

    /// A reply from the content server for `to`.
    pub fn reply_for(to: Ipv4Addr) -> Ip {
        Ip::new(CONTENT, to, L4::tcp(443, 40000))
    }

    /// DATA_DOWN for this host, from a LAN peer's relay to the data port.
    pub fn down_for_me() -> Wrapped {
        Wrapped {
            outer: Outer {
                dst_mac: LAN_MAC,
                src_mac: PEER_MAC,
                src: PEER,
                dst: LAN_IP,
                sport: 7001,
                dport: DATA_PORT,
                ttl: 64,
                id: 0x2222,
                more_fragments: false,
            },
            bond: Bond::data(DATA_DOWN, COMMUNITY, 5, LAN_IP, 0x300, TOKEN),
            inner: reply_for(LAN_IP).bytes(),
        }
    }

    /// DATA_UP from a LAN peer to this host's relay port.
    pub fn up_from_peer() -> Wrapped {
        Wrapped {
            outer: Outer {
                dst_mac: LAN_MAC,
                src_mac: PEER_MAC,
                src: PEER,
                dst: LAN_IP,
                sport: DATA_PORT,
                dport: RELAY_PORT,
                ttl: 61,
                id: 0x0077,
                more_fragments: false,
            },
            bond: Bond::data(DATA_UP, COMMUNITY, RELAY_LINK, PEER, 0x41, PEER_TOKEN),
            inner: Ip::new(PEER, CONTENT, L4::tcp(40000, 443)).bytes(),
        }
    }

    /// DATA_DOWN from the server, on this host's WAN link, for `origin`.
    pub fn down_from_server(origin: Ipv4Addr, token: u64) -> Wrapped {
        Wrapped {
            outer: Outer {
                dst_mac: WAN_MAC,
                src_mac: GW_MAC,
                src: SERVER,
                dst: WAN_IP,
                sport: SERVER_PORT,
                dport: RELAY_PORT,
                ttl: 57,
                id: 0x0009,
                more_fragments: false,
            },
            bond: Bond::data(DATA_DOWN, COMMUNITY, RELAY_LINK, origin, 0x1234, token),
            inner: reply_for(origin).bytes(),
        }
    }

    pub fn stats(t: &Obj, link: u8) -> LinkStats {
        t.maps
            .terminal_link_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.0 == link)
            .map_or_else(LinkStats::default, |s| s.2)
    }
}

// ------------------------------------------------------ bond_wrap (TC) --

mod wrap {
    use super::{term::*, *};

    pub const A: u8 = 3;
    pub const B: u8 = 5;
    pub const C: u8 = 9;
    /// A link with a small MTU, for the size limit.
    pub const SMALL: u8 = 6;

    pub fn up_link(id: u8) -> UpLink {
        let lan = |dst: Ipv4Addr, dst_port, dst_mac| UpLink {
            ifindex: 2,
            src_ip: LAN_IP.into(),
            dst_ip: dst.into(),
            src_port: DATA_PORT,
            dst_port,
            src_mac: LAN_MAC,
            dst_mac,
            mtu: 1500,
            flags: LINK_VALID,
            _pad: 0,
        };
        match id {
            A => lan(PEER, 7001, PEER_MAC),
            B => lan(PEER3, 7002, PEER3_MAC),
            SMALL => UpLink {
                mtu: 200,
                ..lan(PEER, 7001, PEER_MAC)
            },
            C => UpLink {
                ifindex: 3,
                src_ip: WAN_IP.into(),
                dst_ip: SERVER.into(),
                src_port: RELAY_PORT,
                dst_port: SERVER_PORT,
                src_mac: WAN_MAC,
                dst_mac: GW_MAC,
                mtu: 1500,
                flags: LINK_VALID,
                _pad: 0,
            },
            _ => unreachable!(),
        }
    }

    pub fn setup(tag: &str) -> Obj {
        let t = term::setup(tag);
        for id in [A, B, C, SMALL] {
            t.maps.set_up_link(id, up_link(id)).unwrap();
        }
        t
    }

    /// What bond0 hands the program: an inner packet behind an Ethernet
    /// header.
    pub fn on_bond0(inner: &Ip) -> Vec<u8> {
        inner.frame(BOND0_MAC, BOND0_MAC)
    }

    /// The exact frame expected for `inner` wrapped on `link` (its send
    /// time left open: see `assert_bytes`).
    pub fn expected(link: u8, inner: &[u8]) -> Vec<u8> {
        let l = up_link(link);
        wrapped(
            &Outer {
                dst_mac: l.dst_mac,
                src_mac: l.src_mac,
                src: l.src_ip.into(),
                dst: l.dst_ip.into(),
                sport: l.src_port,
                dport: l.dst_port,
                ttl: 64,
                id: 0,
                more_fragments: false,
            },
            &Bond::data(DATA_UP, COMMUNITY, link, LAN_IP, OPEN, TOKEN),
            inner,
        )
    }

    pub fn app_packets() -> Vec<Ip> {
        let l4s = [
            L4::tcp(40000, 443),
            L4::udp(40001, 53),
            L4::EchoRequest { id: 0x4242, seq: 1 },
            L4::tcp(40002, 80),
            L4::udp(40003, 123),
        ];
        l4s.into_iter()
            .map(|l4| Ip::new(LAN_IP, CONTENT, l4))
            .collect()
    }
}

/// Where earliest-delivery-path-first sends each of `lens` (wire bytes)
/// over `links` (id, kbit/s, delay ns), all sent at once. Each choice must
/// win by `margin_ns`, so that the microseconds a test takes between
/// packets cannot change it.
fn edpf_choices(links: &[(u8, u64, u32)], lens: &[u32], margin_ns: u64) -> Vec<u8> {
    use bond_common::edpf::Paths;
    let l: Vec<(u32, u64, u32)> = links
        .iter()
        .map(|&(i, k, d)| (u32::from(i), k, d))
        .collect();
    let mut p = Paths::from_links(&l).unwrap();
    p.backlog_us = TEST_BACKLOG_US;
    lens.iter()
        .map(|&len| {
            let mut at: Vec<u64> = p.links().map(|x| x.arrival(0, len)).collect();
            at.sort_unstable();
            assert!(
                at[1] - at[0] >= margin_ns,
                "fixture too close to call: {at:?}"
            );
            p.pick(0, len).unwrap() as u8
        })
        .collect()
}

#[test]
fn wrap_sends_each_packet_where_it_arrives_first() {
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-edpf");
        // Slow rates, so each packet queues tens of ms on its link, and a
        // 60 ms delay on C: the picks are the pure function's.
        let links = [(A, 20, 0), (B, 8, 0), (C, 33, 60_000_000)];
        t.maps.set_up_paths(&links, TEST_BACKLOG_US).unwrap();
        let lens: Vec<u32> = app_packets()
            .iter()
            .map(|p| (p.bytes().len() + WRAP_LEN) as u32)
            .collect();
        let want_links = edpf_choices(&links, &lens, 5_000_000);
        assert_eq!(
            want_links
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3,
            "{want_links:?}: every link used"
        );
        let mut bytes = std::collections::BTreeMap::<u8, u64>::new();
        for (k, (inner, &link)) in app_packets().iter().zip(&want_links).enumerate() {
            let what = format!("packet {k} ({:?})", inner.l4);
            let inner = inner.bytes();
            let (v, out) = t.run("bond_wrap", &eth(BOND0_MAC, BOND0_MAC, ETH_P_IP, &inner));
            assert_eq!(v, TC_ACT_REDIRECT, "{what}: verdict");
            assert_eq!(out[WRAP_LEN - 24 + 6], link, "{what}: link byte");
            assert_bytes(&out, &expected(link, &inner), &what);
            assert_eq!(&out[WRAP_LEN..], &inner[..], "{what}: inner untouched");
            assert_wrapped_checksums(&out, &what);
            *bytes.entry(link).or_default() += inner.len() as u64;
        }
        for link in [A, B, C] {
            let pkts = want_links.iter().filter(|&&l| l == link).count() as u64;
            assert_eq!(
                term::stats(&t, link),
                LinkStats {
                    up_pkts: pkts,
                    up_bytes: bytes[&link],
                    ..Default::default()
                },
                "stats of link {link}"
            );
        }
        assert_eq!(t.nonzero_drops(), vec![], "no drops");
    });
}

/// `bond_wrap` numbers each link's DATA_UP in a sequence of its own (1
/// to 127, round past 0), leaves a pure ACK unnumbered, and keeps a copy
/// of every numbered packet as it left (`T_KEPT`), for the server to ask
/// for again (`bond_agent::resend`).
#[test]
fn wrap_numbers_each_links_packets_and_keeps_copies() {
    use bond_common::{
        maps::{KEPT_SLOTS, Kept, name},
        wire::seq_next,
    };
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-seq");
        t.maps
            .set_up_paths(&[(A, 1_000, 0), (B, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let inner = app_packets()[0].bytes();
        let frame = eth(BOND0_MAC, BOND0_MAC, ETH_P_IP, &inner);
        let (ring, first) = t.maps.kept(name::T_KEPT, name::T_KEPT_NEXT).unwrap();
        let mut seqs: std::collections::BTreeMap<u8, Vec<u8>> = Default::default();
        for i in 0..300u32 {
            let (v, out) = t.run("bond_wrap", &frame);
            assert_eq!(v, TC_ACT_REDIRECT, "packet {i}");
            let bond = WRAP_LEN - 24;
            seqs.entry(out[bond + 6]).or_default().push(out[bond + 7]);
            let k: Kept = ring.get(&((first + i) % KEPT_SLOTS), 0).unwrap();
            assert_eq!(k.bytes(), Some(&out[bond..]), "packet {i}: its copy");
            assert_eq!(k.idx, u32::from(out[bond + 6]), "packet {i}: the link");
        }
        assert_eq!(seqs.keys().copied().collect::<Vec<_>>(), vec![A, B]);
        for (link, n) in &seqs {
            assert_eq!(n.len(), 150, "link {link}");
            assert_eq!(n[0], 1, "link {link}: the first");
            for w in n.windows(2) {
                assert_eq!(w[1], seq_next(w[0]), "link {link}: {n:?}");
            }
        }
        // A pure ACK (no payload, ACK alone): no number, no copy.
        let ack = Ip {
            payload: Vec::new(),
            ..app_packets()[0].clone()
        }
        .bytes();
        let (v, out) = t.run("bond_wrap", &eth(BOND0_MAC, BOND0_MAC, ETH_P_IP, &ack));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(out[WRAP_LEN - 24 + 7], 0, "a pure ACK's number");
        let (_, next) = t.maps.kept(name::T_KEPT, name::T_KEPT_NEXT).unwrap();
        assert_eq!(next, first + 300, "no copy kept");
    });
}

#[test]
fn wrap_counts_a_links_jitter_in_its_arrivals() {
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-jitter");
        let inner = app_packets()[0].bytes();
        // Two equal links; whichever the feedback found 30 ms late now
        // (`Path::extra_ns`) is passed over for the other.
        for (late, want) in [(A, B), (B, A)] {
            t.maps
                .set_up_paths(&[(A, 1_000, 0), (B, 1_000, 0)], TEST_BACKLOG_US)
                .unwrap();
            let mut p = t.maps.up_paths().unwrap();
            for l in [A, B] {
                p.set_extra(u32::from(l), 0);
                p.paths[usize::from(l == B)].finish_ns = 0;
            }
            assert!(p.set_extra(u32::from(late), 30_000_000));
            t.maps.put_up_paths(p).unwrap();
            let (v, out) = t.run("bond_wrap", &eth(BOND0_MAC, BOND0_MAC, ETH_P_IP, &inner));
            assert_eq!(v, TC_ACT_REDIRECT, "link {late} late: verdict");
            assert_eq!(out[WRAP_LEN - 24 + 6], want, "link {late} late: link byte");
        }
        assert_eq!(t.nonzero_drops(), vec![], "no drops");
    });
}

#[test]
fn wrap_refuses_what_it_cannot_send() {
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-drops");
        let pkt = on_bond0(&app_packets()[0]);
        t.expect_drop(
            "bond_wrap",
            "no schedule yet",
            &pkt,
            TC_ACT_SHOT,
            "no_links",
        );
        t.maps.set_up_paths(&[], TEST_BACKLOG_US).unwrap();
        t.expect_drop("bond_wrap", "empty schedule", &pkt, TC_ACT_SHOT, "no_links");
        t.maps
            .set_up_paths(&[(A, 0, 0), (B, 0, 0)], TEST_BACKLOG_US)
            .unwrap();
        t.expect_drop("bond_wrap", "all weights 0", &pkt, TC_ACT_SHOT, "no_links");

        t.maps
            .set_up_paths(&[(A, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let v6 = ipv6_udp_frame(BOND0_MAC, BOND0_MAC, 53);
        t.expect_drop("bond_wrap", "IPv6 frame", &v6, TC_ACT_SHOT, "not_ipv4");
        let arp = arp_frame(BOND0_MAC, LAN_IP, CONTENT);
        t.expect_drop("bond_wrap", "ARP frame", &arp, TC_ACT_SHOT, "not_ipv4");

        t.maps
            .set_up_paths(&[(4, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        t.expect_drop(
            "bond_wrap",
            "link without entry",
            &pkt,
            TC_ACT_SHOT,
            "link_missing",
        );

        // A 1 kbit/s link with a 1 ms buffer: no packet arrives within the
        // horizon, so the origin refuses it rather than queue it.
        t.maps.set_up_paths(&[(A, 1, 0)], 1_000).unwrap();
        t.expect_drop(
            "bond_wrap",
            "every link full",
            &pkt,
            TC_ACT_SHOT,
            "links_full",
        );

        // SMALL carries 200-byte outer packets: 148 inner bytes fit, 149 not.
        t.maps
            .set_up_paths(&[(SMALL, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let sized = |len: usize| {
            let mut ip = Ip::new(LAN_IP, CONTENT, L4::udp(1, 2));
            ip.payload = vec![0x5a; len - 28];
            on_bond0(&ip)
        };
        t.expect(
            "bond_wrap",
            "exactly the MTU",
            &sized(148),
            TC_ACT_REDIRECT,
            None,
        );
        t.expect_drop(
            "bond_wrap",
            "one over the MTU",
            &sized(149),
            TC_ACT_SHOT,
            "too_big",
        );

        let s = term::stats(&t, SMALL);
        assert_eq!(
            (s.up_pkts, s.up_bytes),
            (1, 148),
            "only the fitting packet counted"
        );
        for link in [A, B, C] {
            assert_eq!(term::stats(&t, link), LinkStats::default(), "link {link}");
        }
    });
}

// ------------------------------------------------- bond_terminal (XDP) --

#[test]
fn terminal_relays_up_to_the_server() {
    use term::*;
    let t = term::setup("relay-up");
    let input = up_from_peer();
    let mut want = input.clone();
    want.outer = Outer {
        dst_mac: GW_MAC,
        src_mac: WAN_MAC,
        src: WAN_IP,
        dst: SERVER,
        sport: RELAY_PORT,
        dport: SERVER_PORT,
        ttl: 64,
        ..input.outer
    };
    let frame = input.frame();
    let want = want.frame();
    t.expect(
        "bond_terminal",
        "relay up",
        &frame,
        XDP_REDIRECT,
        Some(&want),
    );
    assert_wrapped_checksums(&want, "relay up");
    assert_eq!(
        stats(&t, RELAY_LINK),
        LinkStats {
            relay_up_pkts: 1,
            relay_up_bytes: input.inner.len() as u64,
            ..Default::default()
        }
    );
    assert_eq!(t.nonzero_drops(), vec![]);
}

#[test]
fn terminal_relays_down_to_the_origin() {
    use term::*;
    let t = term::setup("relay-down");
    let input = down_from_server(PEER, PEER_TOKEN);
    let mut want = input.clone();
    want.outer = Outer {
        dst_mac: PEER_MAC,
        src_mac: LAN_MAC,
        src: LAN_IP,
        dst: PEER,
        sport: RELAY_PORT,
        dport: DATA_PORT,
        ttl: 64,
        ..input.outer
    };
    let frame = input.frame();
    t.expect(
        "bond_terminal",
        "relay down",
        &frame,
        XDP_REDIRECT,
        Some(&want.frame()),
    );
    assert_wrapped_checksums(&want.frame(), "relay down");
    assert_eq!(
        stats(&t, RELAY_LINK),
        LinkStats {
            relay_down_pkts: 1,
            relay_down_bytes: input.inner.len() as u64,
            ..Default::default()
        }
    );
    assert_eq!(t.nonzero_drops(), vec![]);
}

#[test]
fn terminal_unwraps_its_own_traffic() {
    use term::*;
    let t = term::setup("unwrap");
    // From a LAN relay to the data port, and from the server straight over
    // this host's own WAN link.
    let via_peer = down_for_me();
    let via_own_link = down_from_server(LAN_IP, TOKEN);
    for (what, w) in [("via a peer", &via_peer), ("via own link", &via_own_link)] {
        let want = eth(w.outer.dst_mac, w.outer.src_mac, ETH_P_IP, &w.inner);
        t.expect("bond_terminal", what, &w.frame(), XDP_PASS, Some(&want));
        assert_checksums(ipv4_of(&want), what);
    }
    for (what, w) in [("via a peer", &via_peer), ("via own link", &via_own_link)] {
        assert_eq!(
            stats(&t, w.bond.link),
            LinkStats {
                down_pkts: 1,
                down_bytes: w.inner.len() as u64,
                ..Default::default()
            },
            "{what}: stats"
        );
    }
    assert_eq!(t.nonzero_drops(), vec![]);
}

/// The origin checks the server's schedule: a packet that comes after one
/// the server sent later (by the send times in their headers, µs) is
/// counted late on the link it came over, and a rebooted server's clock,
/// far behind, is followed rather than counted.
#[test]
fn terminal_counts_downstream_packets_that_come_late_per_link() {
    use term::*;
    let t = term::setup("late");
    let own = |sent| {
        let mut w = down_from_server(LAN_IP, TOKEN);
        w.bond.sent = sent;
        w
    };
    let via_peer = |sent| {
        let mut w = down_for_me();
        w.bond.sent = sent;
        w
    };
    // Sent at 30.0001 s over the peer's link 5, then 30.0002 s and
    // 30.0003 s over this host's own link; the own link's arrive first.
    // Then the server's clock starts over.
    for (what, w) in [
        ("30.0002 own", own(30_000_200)),
        ("30.0003 own", own(30_000_300)),
        ("30.0001 via peer", via_peer(30_000_100)),
        ("30.0004 via peer", via_peer(30_000_400)),
        ("restarted clock, 0 own", own(0)),
        ("restarted clock, 1 own", own(1)),
    ] {
        t.expect("bond_terminal", what, &w.frame(), XDP_PASS, None);
    }
    let (peer, mine) = (stats(&t, 5), stats(&t, RELAY_LINK));
    assert_eq!((peer.down_pkts, peer.down_late), (2, 1), "{peer:?}");
    assert_eq!((mine.down_pkts, mine.down_late), (4, 0), "{mine:?}");
    assert_eq!(t.nonzero_drops(), vec![]);
}

/// With the playout reading, DATA_DOWN for this host goes to the hold
/// device still wrapped (checked first: a bad one is dropped, not held);
/// when the playout's sign of life is stale, it is unwrapped at once.
#[test]
fn terminal_sends_its_downstream_to_the_playout_while_it_reads() {
    use bond_common::maps::Hold;
    use term::*;
    let t = term::setup("hold");
    let now = bond_datapath::monotonic_ns();
    let w = down_from_server(LAN_IP, TOKEN);
    let hold = |alive_until_ns| Hold {
        ifindex: 4242,
        _pad: 0,
        alive_until_ns,
    };
    t.maps
        .set_hold(bond_common::maps::name::T_HOLD, hold(now + 60_000_000_000))
        .unwrap();
    t.expect(
        "bond_terminal",
        "held",
        &w.frame(),
        XDP_REDIRECT,
        Some(&w.frame()),
    );
    let mut bad = w.clone();
    bad.bond.token ^= 1;
    t.expect_drop(
        "bond_terminal",
        "bad token",
        &bad.frame(),
        XDP_DROP,
        "bad_token",
    );
    assert_eq!(
        stats(&t, RELAY_LINK).down_pkts,
        0,
        "counted when it comes back"
    );

    // A pure ACK goes up at once; a FIN without payload is held.
    let mut ack = w.clone();
    ack.inner = Ip {
        payload: Vec::new(),
        ..reply_for(LAN_IP)
    }
    .bytes();
    let (v, out) = t.run("bond_terminal", &ack.frame());
    assert_eq!(v, XDP_PASS, "pure ACK: at once");
    assert_eq!(out.len(), ack.frame().len() - 52, "unwrapped");
    assert_eq!(stats(&t, RELAY_LINK).down_late, 0, "an ACK is never late");
    let mut fin = ack.clone();
    fin.inner[20 + 13] |= 0x01;
    t.expect(
        "bond_terminal",
        "FIN held",
        &fin.frame(),
        XDP_REDIRECT,
        Some(&fin.frame()),
    );

    t.maps
        .set_hold(bond_common::maps::name::T_HOLD, hold(now))
        .unwrap();
    let (v, out) = t.run("bond_terminal", &w.frame());
    assert_eq!(v, XDP_PASS, "stale playout: delivered at once");
    assert_eq!(out.len(), w.frame().len() - 52, "unwrapped");
    assert_eq!(stats(&t, RELAY_LINK).down_pkts, 2);
}

#[test]
fn terminal_drops_and_counts_bad_input() {
    use term::*;
    type Edit = fn(&mut Wrapped);
    let cases: [(&str, Edit, &str); 14] = [
        ("wrong magic", |w| w.bond.magic = 0xB04E, "bad_magic"),
        ("old version", |w| w.bond.version = 1, "bad_version"),
        (
            "a sequence on a control kind",
            |w| (w.bond.kind, w.bond.seq) = (ANNOUNCE, 1),
            "bad_flags",
        ),
        (
            "wrong community",
            |w| w.bond.community = 8,
            "wrong_community",
        ),
        ("wrong token", |w| w.bond.token ^= 1, "bad_token"),
        (
            "DATA_UP on the data port",
            |w| w.bond.kind = DATA_UP,
            "bad_kind",
        ),
        (
            "DATA_DOWN for another origin on the data port",
            |w| w.bond.origin = PEER,
            "wrong_origin",
        ),
        ("inner IPv6", |w| w.inner[0] = 0x60, "inner_not_ipv4"),
        (
            "inner longer than the frame",
            |w| {
                let n = w.inner.len() as u16 + 1;
                set_total_len(&mut w.inner, n)
            },
            "inner_bad_header",
        ),
        (
            "inner shorter than its header",
            |w| set_total_len(&mut w.inner, 19),
            "inner_bad_header",
        ),
        (
            "relay down without a neighbour entry",
            |w| {
                w.outer.dport = RELAY_PORT;
                w.outer.src = SERVER;
                w.bond.origin = PEER3;
            },
            "no_neighbor",
        ),
        (
            "relay down from a LAN host, not the server",
            |w| {
                w.outer.dport = RELAY_PORT;
                w.bond.origin = PEER;
            },
            "unknown_source",
        ),
        (
            "relay up bigger than the link MTU",
            |w| {
                w.outer.dport = SMALL_RELAY_PORT;
                w.bond.kind = DATA_UP;
                w.bond.origin = PEER;
            },
            "too_big",
        ),
        (
            "relay up for another community",
            |w| {
                w.outer.dport = RELAY_PORT;
                w.bond.kind = DATA_UP;
                w.bond.community = 9;
            },
            "wrong_community",
        ),
    ];
    let t = term::setup("terminal-bad");
    for (what, edit, reason) in cases {
        let mut w = down_for_me();
        edit(&mut w);
        t.expect_drop("bond_terminal", what, &w.frame(), XDP_DROP, reason);
    }

    // Truncated anywhere in the outer and bond headers of a packet for a
    // bond port: passed while it cannot be told from other traffic (the
    // UDP destination port is not there yet), dropped once it can.
    for (port, full) in [(DATA_PORT, WRAP_LEN + 1), (RELAY_PORT, WRAP_LEN)] {
        let mut w = down_for_me();
        w.outer.dport = port;
        let frame = w.frame();
        for len in 14..full {
            let cut = &frame[..len];
            let what = format!("port {port} cut at {len}");
            if len < 14 + 20 + 4 {
                t.expect("bond_terminal", &what, cut, XDP_PASS, Some(cut));
            } else if len < WRAP_LEN {
                t.expect_drop("bond_terminal", &what, cut, XDP_DROP, "truncated");
            } else {
                // The bond header whole, the outer header says more came.
                t.expect_drop("bond_terminal", &what, cut, XDP_DROP, "outer_bad_header");
            }
        }
    }
    for link in [RELAY_LINK, SMALL_RELAY_LINK, 5] {
        assert_eq!(stats(&t, link), LinkStats::default(), "link {link}");
    }
}

#[test]
fn terminal_passes_other_traffic_unchanged() {
    use term::*;
    let t = term::setup("terminal-pass");
    let mut fragment = Ip::new(PEER, LAN_IP, L4::udp(7001, DATA_PORT));
    fragment.payload = down_for_me().frame()[WRAP_LEN - 24..].to_vec();
    fragment.more_fragments = true;
    let mut control = down_for_me();
    control.bond.kind = ANNOUNCE;
    let tcp = Ip::new(PEER, LAN_IP, L4::tcp(40000, DATA_PORT));
    let frames = [
        ("TCP to the data port", tcp.frame(LAN_MAC, PEER_MAC)),
        (
            "UDP to another port",
            udp_frame(LAN_MAC, PEER_MAC, (PEER, 7001), (LAN_IP, 53)),
        ),
        ("ARP", arp_frame(PEER_MAC, PEER, LAN_IP)),
        (
            "IPv6 UDP to the data port",
            ipv6_udp_frame(LAN_MAC, PEER_MAC, DATA_PORT),
        ),
        (
            "IPv4 fragment to the data port",
            fragment.frame(LAN_MAC, PEER_MAC),
        ),
        ("control message (ANNOUNCE)", control.frame()),
    ];
    for (what, f) in &frames {
        t.expect("bond_terminal", what, f, XDP_PASS, Some(f));
    }
    assert_eq!(t.nonzero_drops(), vec![]);
}

// ------------------------------------------------ L3 links (TC) --
//
// On an own link without an Ethernet header, `bond_terminal_l3` (TC
// ingress) sees packets from their IPv4 header; the relay towards such a
// link is `bond_relay` (TC ingress on the LAN), since XDP cannot send to
// it. BPF_PROG_TEST_RUN hands a TC program its input as it is (no
// Ethernet header is assumed in the bytes the program reads), but the skb
// around it is an Ethernet one: the one path whose helper depends on the
// skb's own headers (the unwrap for this host without a playout,
// `bpf_skb_adjust_room`) is shown end to end instead (tests/uplinks.rs).

const TC_ACT_OK: u32 = 0;

/// `w`'s frame as an L3 device carries it: from its IPv4 header.
fn l3(w: &term::Wrapped) -> Vec<u8> {
    w.frame()[OUTER_IP..].to_vec()
}

/// The test terminal with its own link (port 7001) on an L3 device.
fn l3_setup(tag: &str) -> Obj {
    use term::*;
    let t = term::setup(tag);
    for (port, link, mtu) in [
        (RELAY_PORT, RELAY_LINK, 1500),
        (SMALL_RELAY_PORT, SMALL_RELAY_LINK, 100),
    ] {
        let l3 = relay_link(port, link, mtu, bond_common::maps::LINK_L3);
        t.maps.set_relay_link(port, l3).unwrap();
    }
    t
}

#[test]
fn terminal_l3_relays_down_to_the_origin_behind_an_ethernet_header() {
    use term::*;
    let t = l3_setup("l3-relay-down");
    let input = down_from_server(PEER, PEER_TOKEN);
    let mut want = input.clone();
    want.outer = Outer {
        dst_mac: PEER_MAC,
        src_mac: LAN_MAC,
        src: LAN_IP,
        dst: PEER,
        sport: RELAY_PORT,
        dport: DATA_PORT,
        ttl: 64,
        ..input.outer
    };
    t.expect(
        "bond_terminal_l3",
        "relay down",
        &l3(&input),
        TC_ACT_REDIRECT,
        Some(&want.frame()),
    );
    assert_wrapped_checksums(&want.frame(), "relay down");
    assert_eq!(
        stats(&t, RELAY_LINK),
        LinkStats {
            relay_down_pkts: 1,
            relay_down_bytes: input.inner.len() as u64,
            ..Default::default()
        }
    );
    assert_eq!(t.nonzero_drops(), vec![]);
}

#[test]
fn terminal_l3_sends_its_downstream_to_the_playout_behind_an_ethernet_header() {
    use bond_common::maps::Hold;
    use term::*;
    let t = l3_setup("l3-hold");
    let now = bond_datapath::monotonic_ns();
    t.maps
        .set_hold(
            bond_common::maps::name::T_HOLD,
            Hold {
                ifindex: 4242,
                _pad: 0,
                alive_until_ns: now + 60_000_000_000,
            },
        )
        .unwrap();
    let w = down_from_server(LAN_IP, TOKEN);
    // The playout addresses the frame itself when it writes it back.
    let want = eth([0; 6], [0; 6], ETH_P_IP, &l3(&w));
    t.expect(
        "bond_terminal_l3",
        "held",
        &l3(&w),
        TC_ACT_REDIRECT,
        Some(&want),
    );
    assert_eq!(
        stats(&t, RELAY_LINK).down_pkts,
        0,
        "counted when it comes back"
    );
    assert_eq!(t.nonzero_drops(), vec![]);
}

#[test]
fn terminal_l3_drops_and_counts_bad_input_and_passes_the_rest() {
    use term::*;
    let t = l3_setup("l3-bad");
    type Edit = fn(&mut Wrapped);
    let cases: [(&str, Edit, &str); 6] = [
        (
            "upstream from the server's side",
            |w| w.bond.kind = DATA_UP,
            "bad_kind",
        ),
        (
            "not from the server",
            |w| w.outer.src = CONTENT,
            "unknown_source",
        ),
        (
            "for a peer without a neighbour entry",
            |w| w.bond.origin = PEER3,
            "no_neighbor",
        ),
        (
            "another community",
            |w| w.bond.community = COMMUNITY + 1,
            "wrong_community",
        ),
        ("bad magic", |w| w.bond.magic ^= 1, "bad_magic"),
        (
            "bad token for this host",
            |w| {
                w.bond.origin = LAN_IP;
                w.bond.token ^= 1;
            },
            "bad_token",
        ),
    ];
    for (what, edit, reason) in cases {
        let mut w = down_from_server(PEER, PEER_TOKEN);
        edit(&mut w);
        t.expect_drop("bond_terminal_l3", what, &l3(&w), TC_ACT_SHOT, reason);
    }
    let cut = l3(&down_from_server(PEER, PEER_TOKEN))[..40].to_vec();
    t.expect_drop(
        "bond_terminal_l3",
        "cut in the bond header",
        &cut,
        TC_ACT_SHOT,
        "truncated",
    );
    let mut control = down_from_server(PEER, PEER_TOKEN);
    control.bond.kind = ANNOUNCE;
    let tcp = Ip::new(SERVER, WAN_IP, L4::tcp(443, 40000)).bytes();
    let to_another_port = Ip::new(SERVER, WAN_IP, L4::udp(SERVER_PORT, 53)).bytes();
    for (what, p) in [
        ("control message (ANNOUNCE)", l3(&control)),
        ("TCP", tcp),
        ("UDP to another port", to_another_port),
    ] {
        t.expect("bond_terminal_l3", what, &p, TC_ACT_OK, Some(&p));
    }
    assert_eq!(stats(&t, RELAY_LINK), LinkStats::default());
}

/// DATA_UP from a LAN peer to an own L3 link: `bond_terminal` (XDP) lets
/// it pass, and `bond_relay` (TC, next on the LAN's path) sends it on to
/// the server, its Ethernet header left for the kernel to drop. For an
/// Ethernet link it is the other way round.
#[test]
fn terminal_relays_up_to_an_l3_link_from_tc() {
    use term::*;
    let t = l3_setup("l3-relay-up");
    let input = up_from_peer();
    let mut want = input.clone();
    want.outer = Outer {
        src: WAN_IP,
        dst: SERVER,
        sport: RELAY_PORT,
        dport: SERVER_PORT,
        ttl: 64,
        ..input.outer
    };
    let frame = input.frame();
    t.expect(
        "bond_terminal",
        "XDP passes it",
        &frame,
        XDP_PASS,
        Some(&frame),
    );
    t.expect(
        "bond_relay",
        "relay up",
        &frame,
        TC_ACT_REDIRECT,
        Some(&want.frame()),
    );
    assert_wrapped_checksums(&want.frame(), "relay up");
    assert_eq!(
        stats(&t, RELAY_LINK),
        LinkStats {
            relay_up_pkts: 1,
            relay_up_bytes: input.inner.len() as u64,
            ..Default::default()
        }
    );
    let mut big = up_from_peer();
    big.outer.dport = SMALL_RELAY_PORT;
    big.bond.link = SMALL_RELAY_LINK;
    t.expect_drop(
        "bond_relay",
        "too big for the link",
        &big.frame(),
        TC_ACT_SHOT,
        "too_big",
    );

    let e = term::setup("l3-relay-up-eth");
    for (what, f) in [
        ("DATA_UP to an Ethernet link (XDP's)", frame.clone()),
        ("DATA_DOWN for this host (XDP's)", down_for_me().frame()),
        (
            "TCP",
            Ip::new(PEER, LAN_IP, L4::tcp(40000, 80)).frame(LAN_MAC, PEER_MAC),
        ),
    ] {
        e.expect("bond_relay", what, &f, TC_ACT_OK, Some(&f));
    }
    assert_eq!(e.nonzero_drops(), vec![]);
}

// =========================================================== server ==

mod srv {
    use super::*;

    pub const COMMUNITY: u16 = 7;
    pub const WAN_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
    pub const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const PORT: u16 = 7000;
    pub const PORT_MIN: u16 = 20000;
    pub const PORT_MAX: u16 = 20010;
    /// The smallest community link MTU the server is told of.
    pub const LINK_MTU: u16 = 1500;
    /// The server's interfaces in its test namespace.
    pub const WAN_DEV_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0x01];
    pub const CNT_DEV_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0x02];
    /// The router that delivers WAN traffic to the server.
    pub const ROUTER_MAC: Mac = [0x02, 0x5e, 0, 0, 0, 0xfe];
    /// A content server with a permanent neighbour entry.
    pub const CONTENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const CONTENT_MAC: Mac = [0x02, 0xc0, 0, 0, 0, 0x02];
    /// One on a connected network, neighbour unknown (the slow path).
    pub const CONTENT_UNRESOLVED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
    /// No route at all.
    pub const UNROUTABLE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    pub const ORIGIN_A: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    pub const TOKEN_A: u64 = 0xa0a0_0000_0000_0001;
    pub const ORIGIN_B: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    pub const TOKEN_B: u64 = 0xb0b0_0000_0000_0002;

    /// A community link as registered with the server.
    #[derive(Clone, Copy)]
    pub struct Link {
        pub idx: u32,
        pub id: u8,
        pub ip: Ipv4Addr,
        pub port: u16,
        /// Its neighbour entry on the WAN interface, if any.
        pub mac: Option<Mac>,
    }

    pub const LINKS: [Link; 3] = [
        Link {
            idx: 0,
            id: 3,
            ip: Ipv4Addr::new(198, 51, 100, 11),
            port: 7001,
            mac: Some([0x02, 0x1a, 0, 0, 0, 0x11]),
        },
        Link {
            idx: 1,
            id: 9,
            ip: Ipv4Addr::new(198, 51, 100, 12),
            port: 7002,
            mac: Some([0x02, 0x1a, 0, 0, 0, 0x12]),
        },
        Link {
            idx: 2,
            id: 11,
            ip: Ipv4Addr::new(198, 51, 100, 13),
            port: 7003,
            mac: None,
        },
    ];

    /// Devices, addresses and neighbours of the server's namespace: a WAN
    /// veth (198.51.100.254/24) and a content veth (203.0.113.1/24).
    /// Run inside [`isolate::in_netns`]; the namespace takes them along
    /// when its thread ends.
    pub fn network() {
        let id = std::process::id();
        let (wan, cnt) = (format!("bw{id}"), format!("bc{id}"));
        let mac = |m: Mac| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        for (dev, m, addr) in [
            (&wan, WAN_DEV_MAC, "198.51.100.254/24"),
            (&cnt, CNT_DEV_MAC, "203.0.113.1/24"),
        ] {
            let peer = format!("{dev}p");
            isolate::ip(&[
                "link",
                "add",
                dev,
                "address",
                &mac(m),
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ]);
            isolate::ip(&["addr", "add", addr, "dev", dev]);
            isolate::ip(&["link", "set", dev, "up"]);
            isolate::ip(&["link", "set", &peer, "up"]);
        }
        let neigh = |ip: Ipv4Addr, m: Mac, dev: &str| {
            isolate::ip(&[
                "neigh",
                "add",
                &ip.to_string(),
                "lladdr",
                &mac(m),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        };
        neigh(CONTENT, CONTENT_MAC, &cnt);
        for l in LINKS {
            if let Some(m) = l.mac {
                neigh(l.ip, m, &wan);
            }
        }
    }

    /// A server with two sessions, three links, links 0 and 1 in the
    /// downstream paths at 5 kbit/s each, and `ports` in the free-port
    /// queue. So slow a rate queues each test reply for about 200 ms, far
    /// longer than a test takes between replies, so replies alternate
    /// 0, 1, 0, 1, ... as earliest arrival picks them (the first of two
    /// idle links is the lower index).
    pub fn setup(tag: &str, ports: impl IntoIterator<Item = u16>) -> Obj {
        setup_with_sizes(tag, ports, &[])
    }

    /// As [`setup`], with some maps' sizes set at load time.
    pub fn setup_with_sizes(
        tag: &str,
        ports: impl IntoIterator<Item = u16>,
        sizes: &[(&str, u32)],
    ) -> Obj {
        let s = Obj::load_with_sizes(bond_datapath::ebpf::SERVER, tag, &["bond_server"], sizes);
        let m = &s.maps;
        m.set_server_config(ServerConfig {
            wan_ip: WAN_IP.into(),
            nat_ip: NAT_IP.into(),
            port: PORT,
            port_min: PORT_MIN,
            port_max: PORT_MAX,
            link_mtu: LINK_MTU,
            per_origin: 0,
        })
        .unwrap();
        for l in LINKS {
            m.set_server_link(
                l.idx,
                ServerLink {
                    ip: l.ip.into(),
                    port: l.port,
                    community: COMMUNITY,
                    link: l.id,
                    flags: LINK_VALID,
                    _pad: [0; 2],
                    owner: 0,
                },
            )
            .unwrap();
        }
        m.set_session(COMMUNITY, ORIGIN_A, TOKEN_A).unwrap();
        m.set_session(COMMUNITY, ORIGIN_B, TOKEN_B).unwrap();
        m.set_down_paths(COMMUNITY, &[(0, 5, 0), (1, 5, 0)], TEST_BACKLOG_US, 0)
            .unwrap();
        m.push_free_ports(ports).unwrap();
        s
    }

    pub fn token_of(origin: Ipv4Addr) -> u64 {
        if origin == ORIGIN_A { TOKEN_A } else { TOKEN_B }
    }

    /// The pieces of an upstream frame, for fixtures to edit.
    #[derive(Clone, Debug)]
    pub struct Up {
        pub outer: Outer,
        pub bond: Bond,
        pub inner: Vec<u8>,
    }

    impl Up {
        /// `inner` from its source (an origin) over `link`.
        pub fn new(link: Link, inner: &Ip) -> Self {
            Self {
                outer: Outer {
                    dst_mac: WAN_DEV_MAC,
                    src_mac: ROUTER_MAC,
                    src: link.ip,
                    dst: WAN_IP,
                    sport: link.port,
                    dport: PORT,
                    ttl: 50,
                    id: 0x0abc,
                    more_fragments: false,
                },
                bond: Bond::data(
                    DATA_UP,
                    COMMUNITY,
                    link.id,
                    inner.src,
                    0x40,
                    token_of(inner.src),
                ),
                inner: inner.bytes(),
            }
        }

        pub fn frame(&self) -> Vec<u8> {
            wrapped(&self.outer, &self.bond, &self.inner)
        }
    }

    /// `inner` as it should leave towards the content server: from the NAT
    /// address and `nat_port`, one hop older.
    pub fn unwrapped(inner: &Ip, nat_port: u16) -> Vec<u8> {
        Ip {
            src: NAT_IP,
            ttl: inner.ttl - 1,
            l4: inner.l4.with_src_port(nat_port),
            ..inner.clone()
        }
        .bytes()
    }

    /// The content server's answer to `request`, sent to `nat_port`.
    pub fn reply(request: &Ip, nat_port: u16) -> Ip {
        Ip {
            src: request.dst,
            dst: NAT_IP,
            ttl: 64,
            id: 0x4321,
            l4: request.l4.reply().with_dst_port(nat_port),
            payload: b"reply from the content server".to_vec(),
            ..request.clone()
        }
    }

    /// The reply as it should leave, wrapped for `request`'s origin on `link`.
    pub fn rewrapped(request: &Ip, reply: &Ip, link: Link, eth: (Mac, Mac)) -> Vec<u8> {
        let inner = Ip {
            dst: request.src,
            ttl: reply.ttl - 1,
            l4: request.l4.reply(),
            ..reply.clone()
        };
        wrapped(
            &Outer {
                dst_mac: eth.0,
                src_mac: eth.1,
                src: WAN_IP,
                dst: link.ip,
                sport: PORT,
                dport: link.port,
                ttl: 64,
                id: 0,
                more_fragments: false,
            },
            &Bond::data(
                DATA_DOWN,
                COMMUNITY,
                link.id,
                request.src,
                OPEN,
                token_of(request.src),
            ),
            &inner.bytes(),
        )
    }

    /// The flow the server holds for (origin, proto, port), if any.
    pub fn flow(s: &Obj, origin: Ipv4Addr, l4: L4, port: u16) -> Option<bond_common::maps::Flow> {
        let key = FlowKey {
            community: COMMUNITY,
            proto: l4.proto(),
            _pad: 0,
            origin: origin.into(),
            port,
            _pad2: 0,
        };
        s.maps
            .flows()
            .unwrap()
            .into_iter()
            .find(|f| f.0 == key)
            .map(|f| f.1)
    }

    /// Sends `inner` upstream over `link`; expects it forwarded to the
    /// content server from `nat_port`.
    pub fn expect_up(s: &Obj, what: &str, link: Link, inner: &Ip, nat_port: u16) {
        let want = eth(
            CONTENT_MAC,
            CNT_DEV_MAC,
            ETH_P_IP,
            &unwrapped(inner, nat_port),
        );
        let frame = Up::new(link, inner).frame();
        s.expect("bond_server", what, &frame, XDP_REDIRECT, Some(&want));
        assert_checksums(ipv4_of(&want), what);
    }

    /// Sends the reply to `request` (on `nat_port`); expects it wrapped
    /// on `link`.
    pub fn expect_down(s: &Obj, what: &str, request: &Ip, nat_port: u16, link: Link) {
        let r = reply(request, nat_port);
        let neigh = link.mac.expect("link with a neighbour entry");
        let want = rewrapped(request, &r, link, (neigh, WAN_DEV_MAC));
        let frame = r.frame(CNT_DEV_MAC, CONTENT_MAC);
        s.expect("bond_server", what, &frame, XDP_REDIRECT, Some(&want));
        assert_wrapped_checksums(&want, what);
    }
}

/// Each link's DATA_DOWN is numbered in a sequence of its own (1 to 127,
/// round past 0), a pure ACK is not numbered, and a copy of every
/// numbered packet is kept as it left, bond header and inner packet, for
/// the origin to ask for again (`bond_agent::resend`).
#[test]
fn server_numbers_each_links_packets_and_keeps_copies() {
    use bond_common::{
        maps::{KEPT_SLOTS, Kept, name},
        wire::seq_next,
    };
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-seq", 20000..=20010);
        let [l0, l1, _] = LINKS;
        // Two links of one rate and delay: the replies alternate.
        s.maps
            .set_down_paths(
                COMMUNITY,
                &[(l0.idx, 1_000, 0), (l1.idx, 1_000, 0)],
                TEST_BACKLOG_US,
                0,
            )
            .unwrap();
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        expect_up(&s, "TCP up", l0, &tcp, 20000);
        let frame = reply(&tcp, 20000).frame(CNT_DEV_MAC, CONTENT_MAC);
        let (ring, first) = s.maps.kept(name::S_KEPT, name::S_KEPT_NEXT).unwrap();
        let mut seqs: std::collections::BTreeMap<u8, Vec<u8>> = Default::default();
        for i in 0..600u32 {
            let (v, out) = s.run("bond_server", &frame);
            assert_eq!(v, XDP_REDIRECT, "reply {i}");
            seqs.entry(out[BOND + 6]).or_default().push(out[BOND + 7]);
            let k: Kept = ring.get(&((first + i) % KEPT_SLOTS), 0).unwrap();
            assert_eq!(k.bytes(), Some(&out[BOND..]), "reply {i}: its copy");
            assert_eq!(
                k.idx,
                if out[BOND + 6] == l0.id {
                    l0.idx
                } else {
                    l1.idx
                }
            );
        }
        assert_eq!(seqs.keys().copied().collect::<Vec<_>>(), vec![l0.id, l1.id]);
        for (link, n) in &seqs {
            assert_eq!(n.len(), 300, "link {link}");
            assert_eq!(n[0], 1, "link {link}: the first");
            for w in n.windows(2) {
                assert_eq!(w[1], seq_next(w[0]), "link {link}: {n:?}");
            }
        }
        // A pure ACK: no number, no copy.
        let ack = Ip {
            payload: Vec::new(),
            ..reply(&tcp, 20000)
        };
        let (v, out) = s.run("bond_server", &ack.frame(CNT_DEV_MAC, CONTENT_MAC));
        assert_eq!(v, XDP_REDIRECT);
        assert_eq!(out[BOND + 7], 0, "a pure ACK's number");
        let (_, next) = s.maps.kept(name::S_KEPT, name::S_KEPT_NEXT).unwrap();
        assert_eq!(next, first + 600, "no copy kept");
    });
}

/// With the playout reading, checked DATA_UP goes to the hold device
/// still wrapped and makes no flow yet; when the playout's sign of life is
/// stale, it is unwrapped and sent on at once.
#[test]
fn server_sends_upstream_to_the_playout_while_it_reads() {
    use bond_common::maps::{Hold, name};
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-hold", 20000..=20010);
        let [l0, _, _] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let now = bond_datapath::monotonic_ns();
        let hold = |alive_until_ns| Hold {
            ifindex: 4242,
            _pad: 0,
            alive_until_ns,
        };
        s.maps
            .set_hold(name::S_HOLD, hold(now + 60_000_000_000))
            .unwrap();
        let frame = Up::new(l0, &tcp).frame();
        s.expect("bond_server", "held", &frame, XDP_REDIRECT, Some(&frame));
        assert_eq!(s.event("flows_created"), 0, "a flow once it comes back");
        // A FIN without payload is held; a pure ACK goes on at once.
        let ack = Ip {
            payload: Vec::new(),
            ..tcp.clone()
        };
        let mut fin = Up::new(l0, &ack).frame();
        fin[WRAP_LEN + 20 + 13] |= 0x01;
        s.expect("bond_server", "FIN held", &fin, XDP_REDIRECT, Some(&fin));
        assert_eq!(s.event("flows_created"), 0);
        expect_up(&s, "pure ACK: at once", l0, &ack, 20000);
        assert_eq!(s.event("flows_created"), 1);
        s.maps.set_hold(name::S_HOLD, hold(now)).unwrap();
        expect_up(&s, "stale playout: at once", l0, &tcp, 20000);
        assert_eq!(s.event("flows_created"), 1, "the ACK's flow");
    });
}

#[test]
fn server_nats_tcp_udp_icmp_and_wraps_replies() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-nat", 20000..=20010);
        let [l0, l1, _] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 53));
        let icmp = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 0x4242, seq: 7 });
        // Flows get ports in queue order.
        expect_up(&s, "TCP up", l0, &tcp, 20000);
        expect_up(&s, "UDP up", l1, &udp, 20001);
        expect_up(&s, "ICMP echo up", l0, &icmp, 20002);
        expect_up(&s, "TCP up again, same flow", l1, &tcp, 20000);
        assert_eq!(s.event("flows_created"), 3, "the repeat reused its flow");

        // Replies where they arrive first: link 0, then link 1, then link
        // 1 again (the TCP reply is 12 bytes longer than the UDP one, so
        // link 0's queue ends later).
        expect_down(&s, "TCP reply", &tcp, 20000, l0);
        expect_down(&s, "UDP reply", &udp, 20001, l1);
        expect_down(&s, "ICMP echo reply", &icmp, 20002, l1);

        for (what, ip, orig, nat, up) in [
            ("TCP", &tcp, 40000, 20000, 2),
            ("UDP", &udp, 40001, 20001, 1),
            ("ICMP", &icmp, 0x4242, 20002, 1),
        ] {
            let f = flow(&s, ORIGIN_A, ip.l4, orig).unwrap_or_else(|| panic!("{what}: no flow"));
            assert_eq!(f.nat_port, nat, "{what}: nat port");
            assert_eq!((f.up_pkts, f.down_pkts), (up, 1), "{what}: flow counters");
        }
        assert_eq!(s.maps.flows().unwrap().len(), 3);
        let (tl, ul, il) = (
            tcp.bytes().len() as u64,
            udp.bytes().len() as u64,
            icmp.bytes().len() as u64,
        );
        let rl = |ip: &Ip, nat| reply(ip, nat).bytes().len() as u64;
        assert_eq!(
            s.maps.server_link_stats(0).unwrap(),
            LinkStats {
                up_pkts: 2,
                up_bytes: tl + il,
                down_pkts: 1,
                down_bytes: rl(&tcp, 20000),
                ..Default::default()
            },
            "link 0"
        );
        assert_eq!(
            s.maps.server_link_stats(1).unwrap(),
            LinkStats {
                up_pkts: 2,
                up_bytes: ul + tl,
                down_pkts: 2,
                down_bytes: rl(&udp, 20001) + rl(&icmp, 20002),
                ..Default::default()
            },
            "link 1"
        );
        assert_eq!(s.nonzero_drops(), vec![]);
        assert_eq!(s.event("slow_path"), 0);
    });
}

#[test]
fn server_answers_replies_too_big_for_the_links_with_frag_needed() {
    use etherparse::{Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-too-big", 20000..=20010);
        let request = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 443));
        expect_up(&s, "request", LINKS[0], &request, 20000);
        let mut r = reply(&request, 20000);

        // The largest reply that fits a link once wrapped goes down.
        let fits = usize::from(LINK_MTU) - WRAP_LEN + 14 - 28;
        r.payload = vec![7; fits];
        let (v, out) = s.run("bond_server", &r.frame(CNT_DEV_MAC, CONTENT_MAC));
        assert_eq!(v, XDP_REDIRECT, "a reply that fits");
        assert_eq!(
            out.len(),
            14 + usize::from(LINK_MTU),
            "wrapped to the link MTU"
        );

        // One byte more: the sender gets fragmentation needed, with the
        // MTU that fits, from the NAT address, out of where it came in.
        r.payload = vec![7; fits + 1];
        let orig = r.bytes();
        let mut want = Vec::new();
        PacketBuilder::ethernet2(CNT_DEV_MAC, CONTENT_MAC)
            .ipv4(NAT_IP.octets(), CONTENT.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: LINK_MTU - 52,
                },
            ))
            .write(&mut want, &orig[..28])
            .unwrap();
        // An ICMP error goes without DF, as Linux sends them.
        want[14 + 6] &= !0x40;
        fix_ipv4_checksum(&mut want[14..34]);
        let before = s.drops();
        s.expect(
            "bond_server",
            "one byte too big",
            &r.frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_REDIRECT,
            Some(&want),
        );
        let grew: Vec<_> = s
            .drops()
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        assert_eq!(grew, vec![("too_big", 1)]);
        assert_eq!(s.event("frag_needed_sent"), 1);

        // Too big, but for no flow: dropped as such, nothing reflected.
        let mut stray = reply(&request, 20005);
        stray.payload = vec![7; fits + 1];
        s.expect_drop(
            "bond_server",
            "too big, no flow",
            &stray.frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "no_flow",
        );
        assert_eq!(s.event("frag_needed_sent"), 1);
    });
}

#[test]
fn server_keeps_a_zero_udp_checksum_zero() {
    use srv::*;
    // UDP checksum 0 means "none" (RFC 768): NAT must leave it 0, not
    // update it into a wrong non-zero value. Bytes 26..28 of a 20-byte-header
    // IPv4 packet are its UDP checksum.
    let no_sum = |mut ip: Vec<u8>| {
        ip[26..28].copy_from_slice(&[0, 0]);
        ip
    };
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-udp0", 20000..=20010);
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 53));
        let mut up = Up::new(LINKS[0], &ip);
        up.inner = no_sum(up.inner);
        let want = eth(
            CONTENT_MAC,
            CNT_DEV_MAC,
            ETH_P_IP,
            &no_sum(unwrapped(&ip, 20000)),
        );
        s.expect("bond_server", "up", &up.frame(), XDP_REDIRECT, Some(&want));
        assert_checksums(ipv4_of(&want), "up");

        let r = reply(&ip, 20000);
        let frame = eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &no_sum(r.bytes()));
        let mut want = rewrapped(&ip, &r, LINKS[0], (LINKS[0].mac.unwrap(), WAN_DEV_MAC));
        want[WRAP_LEN + 26..WRAP_LEN + 28].copy_from_slice(&[0, 0]);
        s.expect("bond_server", "down", &frame, XDP_REDIRECT, Some(&want));
        assert_wrapped_checksums(&want, "down");
    });
}

#[test]
fn server_keeps_two_origins_on_one_port_apart() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-two", 20000..=20010);
        let [l0, l1, _] = LINKS;
        let l4 = L4::udp(5000, 5001);
        let a = Ip::new(ORIGIN_A, CONTENT, l4);
        let b = Ip::new(ORIGIN_B, CONTENT, l4);
        expect_up(&s, "A up", l0, &a, 20000);
        expect_up(&s, "B up", l1, &b, 20001);
        // B's reply first: to B, with B's token and B's first sequence number.
        expect_down(&s, "reply to B", &b, 20001, l0);
        expect_down(&s, "reply to A", &a, 20000, l1);
        assert_eq!(flow(&s, ORIGIN_A, l4, 5000).unwrap().nat_port, 20000);
        assert_eq!(flow(&s, ORIGIN_B, l4, 5000).unwrap().nat_port, 20001);
        assert_eq!(s.nonzero_drops(), vec![]);
    });
}

#[test]
fn server_drops_bad_upstream_without_creating_flows() {
    use srv::*;
    type Edit = fn(&mut Up);
    let cases: [(&str, Edit, &str); 26] = [
        ("wrong token", |u| u.bond.token ^= 1, "bad_token"),
        (
            "inner destination without a route",
            |u| u.inner = Ip::new(ORIGIN_A, ip4("192.0.2.1"), L4::tcp(40000, 443)).bytes(),
            "no_route",
        ),
        (
            "origin without a session",
            |u| {
                u.bond.origin = ip4("10.0.1.9");
                u.inner = Ip::new(ip4("10.0.1.9"), CONTENT, L4::udp(1, 2)).bytes();
            },
            "bad_token",
        ),
        (
            "wrong outer source address",
            |u| u.outer.src = ip4("198.51.100.99"),
            "unknown_source",
        ),
        (
            "wrong outer source port",
            |u| u.outer.sport = 7999,
            "unknown_source",
        ),
        (
            "unknown community",
            |u| u.bond.community = 8,
            "unknown_source",
        ),
        ("unknown link", |u| u.bond.link = 4, "unknown_source"),
        (
            "another link's id from this link's address",
            |u| u.bond.link = LINKS[1].id,
            "unknown_source",
        ),
        (
            "inner source not the origin",
            |u| {
                // B's valid session, A's packet.
                u.bond.origin = ORIGIN_B;
                u.bond.token = TOKEN_B;
            },
            "inner_spoof",
        ),
        (
            "ICMP not an echo",
            |u| u.inner = Ip::new(ORIGIN_A, CONTENT, L4::Unreachable).bytes(),
            "unsupported_proto",
        ),
        (
            "ICMP echo reply upstream",
            |u| u.inner = Ip::new(ORIGIN_A, CONTENT, L4::EchoReply { id: 1, seq: 1 }).bytes(),
            "unsupported_proto",
        ),
        (
            "GRE",
            |u| {
                u.inner[9] = 47;
                fix_ipv4_checksum(&mut u.inner);
            },
            "unsupported_proto",
        ),
        (
            "inner fragment (more fragments)",
            |u| {
                u.inner[6] |= 0x20;
                fix_ipv4_checksum(&mut u.inner);
            },
            "inner_fragment",
        ),
        (
            "inner fragment (offset)",
            |u| {
                u.inner[7] = 1;
                fix_ipv4_checksum(&mut u.inner);
            },
            "inner_fragment",
        ),
        (
            "inner TTL 1",
            |u| {
                u.inner[8] = 1;
                fix_ipv4_checksum(&mut u.inner);
            },
            "ttl_exceeded",
        ),
        (
            "inner TTL 0",
            |u| {
                u.inner[8] = 0;
                fix_ipv4_checksum(&mut u.inner);
            },
            "ttl_exceeded",
        ),
        ("inner IPv6", |u| u.inner[0] = 0x60, "inner_not_ipv4"),
        (
            "inner IPv4 options",
            |u| {
                u.inner[0] = 0x46;
                fix_ipv4_checksum(&mut u.inner);
            },
            "inner_bad_header",
        ),
        (
            "inner longer than the frame",
            |u| {
                let n = u.inner.len() as u16 + 1;
                set_total_len(&mut u.inner, n);
            },
            "inner_bad_header",
        ),
        (
            "inner IPv4 header cut",
            |u| u.inner.truncate(12),
            "truncated",
        ),
        (
            "inner TCP header cut",
            |u| {
                u.inner.truncate(28);
                set_total_len(&mut u.inner, 28);
            },
            "truncated",
        ),
        (
            "inner ICMP header cut",
            |u| {
                u.inner = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 1, seq: 1 }).bytes();
                u.inner.truncate(24);
                set_total_len(&mut u.inner, 24);
            },
            "inner_bad_header",
        ),
        ("wrong magic", |u| u.bond.magic = 0x4DB0, "bad_magic"),
        ("wrong version", |u| u.bond.version = 0, "bad_version"),
        (
            "a sequence on a control kind",
            |u| (u.bond.kind, u.bond.seq) = (ANNOUNCE, 1),
            "bad_flags",
        ),
        (
            "DATA_DOWN to the server",
            |u| u.bond.kind = DATA_DOWN,
            "bad_kind",
        ),
    ];
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-bad", 20000..=20010);
        let good = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        for (what, edit, reason) in cases {
            let mut u = Up::new(LINKS[0], &good);
            edit(&mut u);
            s.expect_drop("bond_server", what, &u.frame(), XDP_DROP, reason);
        }
        let mut u = Up::new(LINKS[0], &good);
        u.outer.more_fragments = true;
        s.expect_drop(
            "bond_server",
            "outer fragment",
            &u.frame(),
            XDP_DROP,
            "outer_bad_header",
        );
        // Cut inside the outer UDP or bond header.
        let frame = Up::new(LINKS[0], &good).frame();
        for len in 14..WRAP_LEN {
            let cut = &frame[..len];
            let what = format!("cut at {len}");
            if len < 14 + 20 + 4 {
                s.expect("bond_server", &what, cut, XDP_PASS, Some(cut));
            } else {
                s.expect_drop("bond_server", &what, cut, XDP_DROP, "truncated");
            }
        }
        assert_eq!(s.maps.flows().unwrap(), vec![], "no flow created");
        assert_eq!(s.event("flows_created"), 0);
        for l in LINKS {
            assert_eq!(
                s.maps.server_link_stats(l.idx).unwrap(),
                LinkStats::default()
            );
        }
        // The queue still holds all its ports: the good packet gets the first.
        expect_up(&s, "good packet after all that", LINKS[0], &good, 20000);
    });
}

#[test]
fn server_without_free_ports_drops_new_flows() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-noport", []);
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::udp(1, 2));
        let frame = Up::new(LINKS[0], &ip).frame();
        s.expect_drop(
            "bond_server",
            "no free port",
            &frame,
            XDP_DROP,
            "no_free_port",
        );
        assert_eq!(s.maps.flows().unwrap(), vec![]);
        s.maps.push_free_ports([20007]).unwrap();
        expect_up(&s, "after a refill", LINKS[0], &ip, 20007);
    });
}

#[test]
fn server_drops_bad_downstream() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-bad-down", 20000..=20010);
        let request = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let reply = |edit: fn(&mut Vec<u8>)| {
            let mut ip = srv::reply(&request, 20005).bytes();
            edit(&mut ip);
            eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &ip)
        };
        type Edit = fn(&mut Vec<u8>);
        let cases: [(&str, Edit, &str); 6] = [
            ("reply to a port without a flow", |_| {}, "no_flow"),
            (
                "TTL 1",
                |ip| {
                    ip[8] = 1;
                    fix_ipv4_checksum(ip);
                },
                "ttl_exceeded",
            ),
            (
                "fragment",
                |ip| {
                    ip[6] |= 0x20;
                    fix_ipv4_checksum(ip);
                },
                "inner_fragment",
            ),
            (
                "longer than the frame",
                |ip| {
                    let n = ip.len() as u16 + 1;
                    set_total_len(ip, n);
                },
                "inner_bad_header",
            ),
            (
                "TCP header cut",
                |ip| {
                    ip.truncate(28);
                    set_total_len(ip, 28);
                },
                "truncated",
            ),
            (
                "IPv4 header shorter than it says",
                |ip| set_total_len(ip, 27),
                "inner_bad_header",
            ),
        ];
        for (what, edit, reason) in cases {
            s.expect_drop("bond_server", what, &reply(edit), XDP_DROP, reason);
        }
        assert_eq!(s.maps.server_link_stats(0).unwrap(), LinkStats::default());
    });
}

/// A reply when every link of the community is full (its queue reaches
/// the buffer) is dropped and counted, and nothing is charged to a link;
/// with room again, replies flow.
#[test]
fn server_refuses_replies_when_every_link_is_full() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-full", 20000..=20010);
        let [l0, _, _] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        expect_up(&s, "TCP up", l0, &tcp, 20000);
        s.maps
            .set_down_paths(COMMUNITY, &[(0, 1, 0)], 1_000, 0)
            .unwrap();
        let reply = srv::reply(&tcp, 20000).frame(CNT_DEV_MAC, CONTENT_MAC);
        s.expect_drop("bond_server", "links full", &reply, XDP_DROP, "links_full");
        assert_eq!(s.maps.server_link_stats(0).unwrap().down_pkts, 0);
        s.maps
            .set_down_paths(COMMUNITY, &[(0, 5, 0)], TEST_BACKLOG_US, 0)
            .unwrap();
        expect_down(&s, "room again", &tcp, 20000, l0);
    });
}

#[test]
fn server_passes_other_traffic_unchanged() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-pass", 20000..=20010);
        let from_content = |l4| Ip::new(CONTENT, NAT_IP, l4).frame(CNT_DEV_MAC, CONTENT_MAC);
        let mut control = Up::new(LINKS[0], &Ip::new(ORIGIN_A, CONTENT, L4::udp(1, 2)));
        control.bond.kind = ANNOUNCE;
        let frames = [
            ("ARP", arp_frame(ROUTER_MAC, LINKS[0].ip, WAN_IP)),
            ("IPv6", ipv6_udp_frame(WAN_DEV_MAC, ROUTER_MAC, PORT)),
            (
                "TCP to the WAN address",
                Ip::new(LINKS[0].ip, WAN_IP, L4::tcp(40000, 22)).frame(WAN_DEV_MAC, ROUTER_MAC),
            ),
            (
                "UDP to another port of the WAN address",
                udp_frame(WAN_DEV_MAC, ROUTER_MAC, (LINKS[0].ip, 7001), (WAN_IP, 53)),
            ),
            (
                "UDP to the bond port of another address",
                udp_frame(
                    WAN_DEV_MAC,
                    ROUTER_MAC,
                    (LINKS[0].ip, 7001),
                    (ip4("198.51.100.200"), PORT),
                ),
            ),
            ("control message (ANNOUNCE)", control.frame()),
            (
                "UDP to the NAT address below the port range",
                from_content(L4::udp(53, PORT_MIN - 1)),
            ),
            (
                "TCP to the NAT address above the port range",
                from_content(L4::tcp(443, PORT_MAX + 1)),
            ),
            (
                "echo request to the NAT address",
                from_content(L4::EchoRequest { id: 20001, seq: 1 }),
            ),
            (
                "echo reply outside the port range",
                from_content(L4::EchoReply { id: 5, seq: 1 }),
            ),
        ];
        for (what, f) in &frames {
            s.expect("bond_server", what, f, XDP_PASS, Some(f));
        }
        assert_eq!(s.nonzero_drops(), vec![]);
        assert_eq!(s.maps.flows().unwrap(), vec![]);
    });
}

#[test]
fn server_slow_path_and_no_route() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-slow", 20000..=20010);
        let [l0, _, l2] = LINKS;

        // Upstream to a neighbour the kernel has not resolved: rewritten,
        // handed to the kernel still addressed to this host.
        let ip = Ip::new(ORIGIN_A, CONTENT_UNRESOLVED, L4::udp(40000, 53));
        let up = Up::new(l0, &ip);
        let want = eth(
            up.outer.dst_mac,
            up.outer.src_mac,
            ETH_P_IP,
            &unwrapped(&ip, 20000),
        );
        s.expect(
            "bond_server",
            "upstream, no neighbour",
            &up.frame(),
            XDP_PASS,
            Some(&want),
        );
        assert_checksums(ipv4_of(&want), "upstream, no neighbour");
        assert_eq!(s.event("slow_path"), 1);

        // Downstream on a link whose address has no neighbour entry (the
        // schedule now names only it).
        s.maps
            .set_down_paths(COMMUNITY, &[(l2.idx, 1_000, 0)], TEST_BACKLOG_US, 0)
            .unwrap();
        let r = reply(&ip, 20000);
        let want = rewrapped(&ip, &r, l2, (CNT_DEV_MAC, CONTENT_MAC));
        let frame = r.frame(CNT_DEV_MAC, CONTENT_MAC);
        s.expect(
            "bond_server",
            "downstream, no neighbour",
            &frame,
            XDP_PASS,
            Some(&want),
        );
        assert_wrapped_checksums(&want, "downstream, no neighbour");
        assert_eq!(s.event("slow_path"), 2);
        assert_eq!(s.maps.server_link_stats(l2.idx).unwrap().down_pkts, 1);

        // No route at all.
        let ip = Ip::new(ORIGIN_A, UNROUTABLE, L4::udp(1, 2));
        let frame = Up::new(l0, &ip).frame();
        s.expect_drop("bond_server", "no route", &frame, XDP_DROP, "no_route");
    });
}

// ----------------------------------------------------- flow upkeep --

/// TCP header flags, from RFC 9293 (independent of the code under test).
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// An IPv4/TCP packet with its TCP flags set to `flags` and its TCP
/// checksum recomputed by etherparse.
fn with_tcp_flags(mut ip: Vec<u8>, flags: u8) -> Vec<u8> {
    ip[20 + 13] = flags;
    let h = etherparse::Ipv4HeaderSlice::from_slice(&ip)
        .unwrap()
        .to_header();
    let t = etherparse::TcpHeaderSlice::from_slice(&ip[20..])
        .unwrap()
        .to_header();
    let sum = t
        .calc_checksum_ipv4(&h, &ip[20 + t.header_len()..])
        .unwrap();
    ip[20 + 16..20 + 18].copy_from_slice(&sum.to_be_bytes());
    ip
}

/// Sends `ip` (TCP) upstream with `flags`; expects it forwarded, flags
/// untouched.
fn tcp_up(s: &Obj, what: &str, link: srv::Link, ip: &Ip, flags: u8) {
    let mut u = srv::Up::new(link, ip);
    u.inner = with_tcp_flags(u.inner, flags);
    let (v, out) = s.run("bond_server", &u.frame());
    assert_eq!(v, XDP_REDIRECT, "{what}: verdict");
    assert_eq!(out[14 + 20 + 13], flags, "{what}: TCP flags");
    assert_checksums(ipv4_of(&out), what);
}

/// Sends the content server's reply to `ip` (TCP, on `nat_port`) with
/// `flags`; expects it wrapped and sent.
fn tcp_down(s: &Obj, what: &str, ip: &Ip, nat_port: u16, flags: u8) {
    let r = with_tcp_flags(srv::reply(ip, nat_port).bytes(), flags);
    let frame = eth(srv::CNT_DEV_MAC, srv::CONTENT_MAC, ETH_P_IP, &r);
    let (v, out) = s.run("bond_server", &frame);
    assert_eq!(v, XDP_REDIRECT, "{what}: verdict");
    assert_eq!(out[WRAP_LEN + 20 + 13], flags, "{what}: TCP flags");
    assert_wrapped_checksums(&out, what);
}

#[test]
fn server_marks_tcp_flows_closing_on_fin_or_rst_both_ways() {
    use bond_common::maps::{FLOW_FIN, FLOW_RST};
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-closing", 20000..=20010);
        let l0 = LINKS[0];
        let state = |ip: &Ip| {
            let L4::Tcp { sport, .. } = ip.l4 else {
                unreachable!()
            };
            flow(&s, ORIGIN_A, ip.l4, sport).expect("flow").state
        };
        // (what, origin port, marking segment upstream?, its flags, state)
        let cases = [
            ("FIN upstream", 41000, true, FIN | ACK, FLOW_FIN),
            ("RST upstream", 41001, true, RST, FLOW_RST),
            ("FIN downstream", 41002, false, FIN | ACK, FLOW_FIN),
            ("RST downstream", 41003, false, RST | ACK, FLOW_RST),
            ("ACK upstream", 41004, true, ACK, 0),
            ("ACK downstream", 41005, false, ACK, 0),
            ("SYN+ACK downstream", 41006, false, SYN | ACK, 0),
            ("data upstream", 41007, true, ACK | 0x08, 0),
        ];
        for (i, (what, port, upward, flags, want)) in cases.into_iter().enumerate() {
            let ip = Ip::new(ORIGIN_A, CONTENT, L4::tcp(port, 443));
            let nat = 20000 + i as u16;
            tcp_up(&s, &format!("{what}: SYN"), l0, &ip, SYN);
            assert_eq!(flow(&s, ORIGIN_A, ip.l4, port).unwrap().nat_port, nat);
            assert_eq!(state(&ip), 0, "{what}: a new flow is not closing");
            if upward {
                tcp_up(&s, what, l0, &ip, flags);
            } else {
                tcp_down(&s, what, &ip, nat, flags);
            }
            assert_eq!(state(&ip), want, "{what}: state");
            // Later plain segments do not clear it.
            tcp_up(&s, &format!("{what}: then ACK"), l0, &ip, ACK);
            tcp_down(&s, &format!("{what}: then ACK down"), &ip, nat, ACK);
            assert_eq!(state(&ip), want, "{what}: state after ACKs");
        }
        // FIN one way and RST the other add up; a new connection from the
        // same origin port (a bare SYN) starts the flow afresh.
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::tcp(41000, 443));
        tcp_down(&s, "RST after FIN", &ip, 20000, RST);
        assert_eq!(state(&ip), FLOW_FIN | FLOW_RST);
        tcp_up(&s, "new connection", l0, &ip, SYN);
        assert_eq!(state(&ip), 0, "a bare SYN reopens the flow");
        assert_eq!(
            flow(&s, ORIGIN_A, ip.l4, 41000).unwrap().nat_port,
            20000,
            "and it keeps its port"
        );
        // UDP and ICMP flows never carry state bits.
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(41000, 53));
        expect_up(&s, "UDP", l0, &udp, 20008);
        let r = reply(&udp, 20008).frame(CNT_DEV_MAC, CONTENT_MAC);
        assert_eq!(s.run("bond_server", &r).0, XDP_REDIRECT, "UDP reply");
        assert_eq!(flow(&s, ORIGIN_A, udp.l4, 41000).unwrap().state, 0);
        assert_eq!(s.nonzero_drops(), vec![]);
    });
}

#[test]
fn server_sweep_expires_idle_flows_and_returns_their_ports() {
    use std::time::Duration;

    use bond_datapath::flows::{self, SweepReport, Timeouts};
    use srv::*;
    const S: u64 = 1_000_000_000;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-sweep", 20000..=20002);
        let [l0, l1, _] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 53));
        let icmp = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 0x4242, seq: 1 });
        let extra = Ip::new(ORIGIN_B, CONTENT, L4::udp(5000, 53));
        expect_up(&s, "TCP", l0, &tcp, 20000);
        expect_up(&s, "UDP", l0, &udp, 20001);
        expect_up(&s, "ICMP", l0, &icmp, 20002);
        let extra_frame = Up::new(l1, &extra).frame();
        s.expect_drop(
            "bond_server",
            "a fourth flow while all three ports are taken",
            &extra_frame,
            XDP_DROP,
            "no_free_port",
        );

        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            icmp: Duration::from_secs(20),
        };
        let seen = |origin, ip: &Ip, port| flow(&s, origin, ip.l4, port).unwrap().last_seen_ns;
        let sweep = |now| flows::sweep(&s.maps, &t, now).unwrap();
        let nat_ports = || {
            let mut v: Vec<u16> = s
                .maps
                .nat_entries()
                .unwrap()
                .iter()
                .map(|e| e.0.port)
                .collect();
            v.sort_unstable();
            v
        };

        // Just short of the shortest timeout: nothing goes.
        assert_eq!(
            sweep(seen(ORIGIN_A, &icmp, 0x4242) + 20 * S - 1),
            SweepReport {
                scanned: 3,
                kept: 3,
                ..Default::default()
            }
        );
        // ICMP's timeout: it goes, and nothing else.
        assert_eq!(
            sweep(seen(ORIGIN_A, &icmp, 0x4242) + 20 * S),
            SweepReport {
                scanned: 3,
                icmp: 1,
                ports_returned: 1,
                kept: 2,
                ..Default::default()
            }
        );
        assert_eq!(nat_ports(), vec![20000, 20001], "its NAT entry went");
        s.expect_drop(
            "bond_server",
            "a late echo reply",
            &reply(&icmp, 20002).frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "no_flow",
        );
        // Its port is back in the queue: the refused flow gets it now.
        expect_up(&s, "the fourth flow, again", l1, &extra, 20002);

        // UDP after 30 s idle; the newer UDP flow stays.
        assert_eq!(
            sweep(seen(ORIGIN_A, &udp, 40001) + 30 * S),
            SweepReport {
                scanned: 3,
                udp: 1,
                ports_returned: 1,
                kept: 2,
                ..Default::default()
            }
        );
        // An established TCP flow idle for 30 s stays (its timeout is
        // 100 s); after a FIN it goes 10 s after its last packet.
        tcp_up(&s, "FIN", l0, &tcp, FIN | ACK);
        let fin_at = seen(ORIGIN_A, &tcp, 40000);
        assert_eq!(sweep(fin_at + 10 * S - 1).tcp, 0);
        assert_eq!(
            sweep(fin_at + 10 * S),
            SweepReport {
                scanned: 2,
                tcp: 1,
                ports_returned: 1,
                kept: 1,
                ..Default::default()
            }
        );
        assert_eq!(nat_ports(), vec![20002], "only the fourth flow is left");

        // A flow that came alive between the listing and the delete is
        // kept: the predicate sees the value as it is at the delete.
        let key = FlowKey {
            community: COMMUNITY,
            proto: 17,
            _pad: 0,
            origin: ORIGIN_B.into(),
            port: 5000,
            _pad2: 0,
        };
        let listed = seen(ORIGIN_B, &extra, 5000);
        expect_up(&s, "the fourth flow, alive", l1, &extra, 20002);
        let removed = s
            .maps
            .remove_flows_if([key], |_, f| f.last_seen_ns == listed)
            .unwrap();
        assert_eq!(removed, vec![], "a flow seen since the listing stays");
        assert_eq!(nat_ports(), vec![20002]);
        let removed = s.maps.remove_flows_if([key, key], |_, _| true).unwrap();
        assert_eq!(removed.len(), 1, "removed once; the repeat is skipped");
        assert!(removed[0].port_returned);
        assert_eq!(s.maps.flows().unwrap(), vec![]);
        assert_eq!(s.maps.nat_entries().unwrap(), vec![]);

        // Every port is back, once each, in the order they came back.
        let mut got = Vec::new();
        for p in 6000..6003 {
            let ip = Ip::new(ORIGIN_B, CONTENT, L4::udp(p, 53));
            let (v, out) = s.run("bond_server", &Up::new(l1, &ip).frame());
            assert_eq!(v, XDP_REDIRECT, "flow {p}");
            got.push(u16::from_be_bytes([out[14 + 20], out[14 + 21]]));
        }
        assert_eq!(got, vec![20001, 20000, 20002]);
        let ip = Ip::new(ORIGIN_B, CONTENT, L4::udp(6003, 53));
        s.expect_drop(
            "bond_server",
            "and no more",
            &Up::new(l1, &ip).frame(),
            XDP_DROP,
            "no_free_port",
        );
    });
}

#[test]
fn server_map_sizes_come_from_the_loader() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        // A flow table of 2, a queue of 3 ports and 2 sessions (the
        // set-up logs on A and B).
        let sizes = bond_datapath::flows::server_map_sizes(2, 3, 2);
        let mut s = srv::setup_with_sizes("server-sizes", 20000..=20002, &sizes);
        assert!(
            s.maps.push_free_ports([20003]).is_err(),
            "a queue of 3 takes no fourth port"
        );
        let third = s.maps.set_session(COMMUNITY, Ipv4Addr::new(10, 0, 1, 9), 7);
        assert!(
            third.as_ref().is_err_and(|e| e.is_full()),
            "a session table of 2 takes no third terminal: {third:?}"
        );
        let [l0, _, _] = LINKS;
        let ip = |p| Ip::new(ORIGIN_A, CONTENT, L4::udp(p, 53));
        expect_up(&s, "first", l0, &ip(1), 20000);
        expect_up(&s, "second", l0, &ip(2), 20001);
        s.expect_drop(
            "bond_server",
            "a third flow in a table of 2",
            &Up::new(l0, &ip(3)).frame(),
            XDP_DROP,
            "flow_table_full",
        );
        // The refused flow put its port back (20002, at the head of the
        // queue); freeing a flow makes room for it.
        let key = s.maps.flows().unwrap()[0].0;
        assert_eq!(s.maps.remove_flows_if([key], |_, _| true).unwrap().len(), 1);
        expect_up(&s, "third, after a removal", l0, &ip(3), 20002);

        // The table of flows per origin, sized for 2 terminals, full with A
        // and a stale entry: B's first flow is refused for that table, not
        // for the flow table, which has room again.
        let key = s.maps.flows().unwrap()[0].0;
        assert_eq!(s.maps.remove_flows_if([key], |_, _| true).unwrap().len(), 1);
        let stale = SessionKey {
            community: COMMUNITY,
            _pad: 0,
            origin: Ipv4Addr::new(10, 0, 1, 99).into(),
        };
        BpfHashMap::<&mut MapData, SessionKey, u64>::try_from(
            s.ebpf.map_mut("S_ORIGIN_FLOWS").unwrap(),
        )
        .unwrap()
        .insert(stale, 0, 0)
        .unwrap();
        let b = Ip::new(ORIGIN_B, CONTENT, L4::udp(1, 53));
        s.expect_drop(
            "bond_server",
            "B's first flow, no room to count it",
            &Up::new(l0, &b).frame(),
            XDP_DROP,
            "origin_table_full",
        );
    });
}

#[test]
fn server_holds_each_origin_to_its_flow_limit() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-per-origin", 20000..=20009);
        let mut cfg = s.maps.server_config().unwrap();
        cfg.per_origin = 2;
        s.maps.set_server_config(cfg).unwrap();
        let [l0, l1, _] = LINKS;
        let a = |p| Ip::new(ORIGIN_A, CONTENT, L4::udp(p, 53));
        let b = |p| Ip::new(ORIGIN_B, CONTENT, L4::udp(p, 53));
        let held = |origin: Ipv4Addr| {
            let map: BpfHashMap<&MapData, SessionKey, u64> =
                BpfHashMap::try_from(s.ebpf.map("S_ORIGIN_FLOWS").unwrap()).unwrap();
            let key = SessionKey {
                community: COMMUNITY,
                _pad: 0,
                origin: origin.into(),
            };
            map.get(&key, 0).unwrap_or(0)
        };
        expect_up(&s, "A's first flow", l0, &a(1), 20000);
        expect_up(&s, "A's second flow", l1, &a(2), 20001);
        assert_eq!(held(ORIGIN_A), 2);
        s.expect_drop(
            "bond_server",
            "A's third flow, over its limit of 2",
            &Up::new(l0, &a(3)).frame(),
            XDP_DROP,
            "origin_flow_limit",
        );
        // The refusal took no port: B gets the next one.
        expect_up(&s, "B's first flow", l0, &b(1), 20002);
        assert_eq!((held(ORIGIN_A), held(ORIGIN_B)), (2, 1));
        // A's flows carry on at the limit.
        expect_up(&s, "A's first flow again", l1, &a(1), 20000);
        expect_up(&s, "A's second flow again", l0, &a(2), 20001);

        // The sweep expires A's second flow and recounts: room for one.
        let gone = s
            .maps
            .flows()
            .unwrap()
            .into_iter()
            .find(|(_, f)| f.nat_port == 20001);
        let (key, _) = gone.expect("the flow on 20001");
        assert_eq!(s.maps.remove_flows_if([key], |_, _| true).unwrap().len(), 1);
        let counts = [
            (ORIGIN_A, 1),
            (ORIGIN_B, 1),
            (Ipv4Addr::new(10, 0, 1, 99), 5),
        ]
        .into_iter()
        .map(|(o, n)| {
            let k = SessionKey {
                community: COMMUNITY,
                _pad: 0,
                origin: o.into(),
            };
            (k, n)
        })
        .collect();
        s.maps.recount_origin_flows(&counts).unwrap();
        assert_eq!((held(ORIGIN_A), held(ORIGIN_B)), (1, 1));
        assert_eq!(
            held(Ipv4Addr::new(10, 0, 1, 99)),
            0,
            "an origin without a session gets no entry"
        );
        expect_up(&s, "A's third flow, after the sweep", l0, &a(3), 20003);
        assert_eq!(held(ORIGIN_A), 2);
    });
}

#[test]
fn loads() {
    Obj::terminal("load");
    Obj::server("loads");
}

// ================================================= bad input (issue 5) ==
//
// Every program on hostile input, beyond the cases above: frames cut at
// every length, the header fields the issue names set wrong at every entry
// point, all 256 bond kinds, the sizes BPF_PROG_TEST_RUN takes, and
// mutants of every valid fixture. Each case states the rule it checks;
// where the rule is written only in the program (bond-ebpf/src/bin/*.rs),
// the comment says which check makes it. The last two tests were written
// against bugs this found (outer lengths not checked; an inner TCP packet
// shorter than its header taken), and now hold the fixes.

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::ProgramError,
    sys::SyscallError,
};
use bond_common::maps::{Flow, NatEntry, NatKey, Session, SessionKey, event};
use common::packets::{IPV4_NOPS, insert_ipv4_options, set_fragment, set_ttl};

const EINVAL: i32 = libc::EINVAL;
const ENOMEM: i32 = libc::ENOMEM;
/// Offsets in a wrapped frame (DESIGN.md, "Wire format").
const OUTER_IP: usize = 14;
const OUTER_UDP: usize = OUTER_IP + 20;
const BOND: usize = OUTER_UDP + 8;
const INNER: usize = WRAP_LEN;

/// What one frame must come to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    /// BPF_PROG_TEST_RUN refuses it with this errno: no program runs.
    Refused(i32),
    /// XDP_PASS with the frame as it came, nothing counted: not bond DATA
    /// (or a control message, for the agent's socket).
    Untouched,
    /// Dropped, and counted once under exactly this reason.
    Drop(&'static str),
    /// This verdict with exactly these bytes, nothing counted.
    Out(u32, Vec<u8>),
}

/// A loaded object's counters, read through its own map handles: cheap
/// enough to read around every one of thousands of runs.
struct Counters<'a> {
    drops: PerCpuArray<&'a MapData, u64>,
    events: Option<PerCpuArray<&'a MapData, u64>>,
}

/// The counters at one instant, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    drops: Vec<u64>,
    events: Vec<u64>,
}

impl Counters<'_> {
    fn read(&self) -> Snapshot {
        let sum = |m: &PerCpuArray<&MapData, u64>, n: u32| -> Vec<u64> {
            (0..n)
                .map(|i| m.get(&i, 0).expect("counter").iter().sum())
                .collect()
        };
        Snapshot {
            drops: sum(&self.drops, bond_common::drops::COUNT),
            events: self
                .events
                .as_ref()
                .map_or_else(Vec::new, |e| sum(e, event::COUNT)),
        }
    }
}

impl Snapshot {
    /// The drop reasons that grew since `before`, and by how much.
    fn drops_since(&self, before: &Self) -> Vec<(&'static str, u64)> {
        bond_common::drops::NAMES
            .iter()
            .zip(self.drops.iter().zip(&before.drops))
            .filter(|(_, (a, b))| a != b)
            .map(|(n, (a, b))| (*n, a - b))
            .collect()
    }

    /// How much server event `idx` grew since `before`.
    fn event_since(&self, before: &Self, idx: u32) -> u64 {
        self.events[idx as usize] - before.events[idx as usize]
    }
}

impl Obj {
    fn counters(&self) -> Counters<'_> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .map(|m| PerCpuArray::try_from(m).unwrap_or_else(|e| panic!("{name}: {e}")))
        };
        Counters {
            drops: map("T_DROPS")
                .or_else(|| map("S_DROPS"))
                .expect("a drop counter map"),
            events: map("S_EVENTS"),
        }
    }

    /// Runs `prog` once on `input`: the verdict and output packet, or the
    /// errno with which BPF_PROG_TEST_RUN refused the input.
    fn try_run(&self, prog: &str, input: &[u8]) -> Result<(u32, Vec<u8>), i32> {
        // Room for the input plus a wrap.
        let mut out = vec![0u8; input.len().max(4096) + 128];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let p = self.ebpf.program(prog).expect("program");
        let r = if let Ok(x) = <&Xdp>::try_from(p) {
            x.test_run(opts)
        } else {
            <&SchedClassifier>::try_from(p)
                .expect("XDP or TC program")
                .test_run(opts)
        };
        match r {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Ok((r.return_value, out))
            }
            Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
                Err(io_error.raw_os_error().expect("an errno"))
            }
            Err(e) => panic!("test_run {prog}: {e}"),
        }
    }

    /// Runs `prog` on `input` and checks what came of it against `want`:
    /// the verdict, the exact output, and the drop counters (one reason
    /// grown by one for a drop, none otherwise).
    fn check(&self, c: &Counters, prog: &str, what: &str, input: &[u8], want: &Want) {
        let before = c.read();
        let got = self.try_run(prog, input);
        let grew = c.read().drops_since(&before);
        match (want, got) {
            (Want::Refused(e), Err(g)) => assert_eq!(g, *e, "{what}: errno"),
            (_, Err(g)) => panic!("{what}: test_run refused it (errno {g}), want {want:?}"),
            (Want::Refused(e), Ok((v, _))) => panic!("{what}: ran (verdict {v}), want errno {e}"),
            (Want::Untouched, Ok((v, out))) => {
                assert_eq!(v, XDP_PASS, "{what}: verdict");
                assert_bytes(&out, input, what);
            }
            (Want::Drop(reason), Ok((v, _))) => {
                let shot = if prog == "bond_wrap" {
                    TC_ACT_SHOT
                } else {
                    XDP_DROP
                };
                assert_eq!(v, shot, "{what}: verdict");
                assert_eq!(grew, vec![(*reason, 1)], "{what}: drop counters");
                return;
            }
            (Want::Out(verdict, bytes), Ok((v, out))) => {
                assert_eq!(v, *verdict, "{what}: verdict");
                assert_bytes(&out, bytes, what);
            }
        }
        assert_eq!(grew, vec![], "{what}: drop counters");
    }
}

/// `frame` with `edit` applied to its bytes.
fn edited(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    f
}

/// Sets the big-endian u16 at `at`.
fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn get32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

/// Adds `by` to the outer IPv4 total length and UDP length of a wrapped
/// frame, after a test grew what it carries.
fn grow_outer(f: &mut [u8], by: u16) {
    let ip = get16(f, OUTER_IP + 2) + by;
    set_total_len(&mut f[OUTER_IP..], ip);
    let udp = get16(f, OUTER_UDP + 4) + by;
    put16(f, OUTER_UDP + 4, udp);
}

// ------------------------------------------- bond_terminal's ways in --

/// What `bond_terminal` does with a good wrapped frame, by DESIGN.md's
/// packet path; each derives the exact output from the input frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// DATA_DOWN for this host: the wrap stripped, XDP_PASS.
    Unwrap,
    /// DATA_UP to a relay port: on to the server over that link.
    Up,
    /// DATA_DOWN for a LAN peer on a relay port: on to the peer.
    Down,
}

impl Path {
    fn out(self, frame: &[u8]) -> Want {
        match self {
            Self::Unwrap => Want::Out(XDP_PASS, term_out::unwrapped(frame)),
            Self::Up => Want::Out(XDP_REDIRECT, term_out::up(frame)),
            Self::Down => Want::Out(XDP_REDIRECT, term_out::down(frame)),
        }
    }
}

mod term_out {
    use super::{term::*, *};

    /// A wrapped frame pointed at its next hop: new MACs, addresses and
    /// ports, TTL 64, the IPv4 checksum recomputed and no UDP checksum;
    /// everything else (IPv4 id and flags, the UDP length, the bond header
    /// and the inner packet) as it came.
    pub fn readdressed(
        frame: &[u8],
        (dst_mac, src_mac): (Mac, Mac),
        (src, dst): (Ipv4Addr, Ipv4Addr),
        (sport, dport): (u16, u16),
    ) -> Vec<u8> {
        let mut f = frame.to_vec();
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        f[OUTER_IP + 8] = 64;
        f[OUTER_IP + 12..OUTER_IP + 16].copy_from_slice(&src.octets());
        f[OUTER_IP + 16..OUTER_IP + 20].copy_from_slice(&dst.octets());
        fix_ipv4_checksum(&mut f[OUTER_IP..]);
        put16(&mut f, OUTER_UDP, sport);
        put16(&mut f, OUTER_UDP + 2, dport);
        put16(&mut f, OUTER_UDP + 6, 0);
        f
    }

    /// The UDP port a wrapped frame came to.
    pub fn port(frame: &[u8]) -> u16 {
        get16(frame, OUTER_UDP + 2)
    }

    /// Relayed up: to the server, from this host's link on that port.
    pub fn up(frame: &[u8]) -> Vec<u8> {
        readdressed(
            frame,
            (GW_MAC, WAN_MAC),
            (WAN_IP, SERVER),
            (port(frame), SERVER_PORT),
        )
    }

    /// Relayed down: to the peer (the only neighbour), from this host.
    pub fn down(frame: &[u8]) -> Vec<u8> {
        readdressed(
            frame,
            (PEER_MAC, LAN_MAC),
            (LAN_IP, PEER),
            (port(frame), DATA_PORT),
        )
    }

    /// Unwrapped: the frame's MACs, IPv4, and the inner packet (with
    /// whatever followed it).
    pub fn unwrapped(frame: &[u8]) -> Vec<u8> {
        eth(
            frame[0..6].try_into().unwrap(),
            frame[6..12].try_into().unwrap(),
            ETH_P_IP,
            &frame[INNER..],
        )
    }
}

/// One way a wrapped frame comes into `bond_terminal`, with a valid frame.
struct Entry {
    name: &'static str,
    frame: Vec<u8>,
    path: Path,
}

impl Entry {
    /// Whether it comes to one of this host's relay ports (else the data
    /// port).
    fn relay_port(&self) -> bool {
        term_out::port(&self.frame) != term::DATA_PORT
    }
}

fn terminal_entries() -> [Entry; 4] {
    use term::*;
    [
        Entry {
            name: "DATA_DOWN for this host on the data port",
            frame: down_for_me().frame(),
            path: Path::Unwrap,
        },
        Entry {
            name: "DATA_DOWN for this host on its own link",
            frame: down_from_server(LAN_IP, TOKEN).frame(),
            path: Path::Unwrap,
        },
        Entry {
            name: "DATA_UP from a peer to a relay port",
            frame: up_from_peer().frame(),
            path: Path::Up,
        },
        Entry {
            name: "DATA_DOWN for a peer on a relay port",
            frame: down_from_server(PEER, PEER_TOKEN).frame(),
            path: Path::Down,
        },
    ]
}

/// What `bond_terminal` does with the first `len` bytes of `e`'s frame
/// (`try_terminal`, `unwrap`, `rewrite_outer`).
fn terminal_cut(e: &Entry, len: usize) -> Want {
    match len {
        // BPF_PROG_TEST_RUN wants at least an Ethernet header.
        0..14 => Want::Refused(EINVAL),
        // No UDP destination port yet: nothing tells it from other traffic.
        14..38 => Want::Untouched,
        // To a bond port, the bond header cut.
        38..66 => Want::Drop("truncated"),
        _ if len == e.frame.len() => e.path.out(&e.frame),
        // Cut after the bond header: the outer IPv4 header says the frame
        // is longer than what came.
        _ => Want::Drop("outer_bad_header"),
    }
}

#[test]
fn terminal_cut_at_every_offset() {
    use term::*;
    let t = term::setup("terminal-cuts");
    let c = t.counters();
    for e in terminal_entries() {
        for len in 0..=e.frame.len() {
            let what = format!("{}, cut at {len}", e.name);
            t.check(
                &c,
                "bond_terminal",
                &what,
                &e.frame[..len],
                &terminal_cut(&e, len),
            );
        }
    }
    // Only the four whole frames went anywhere.
    let inner = reply_for(LAN_IP).bytes().len() as u64;
    assert_eq!(
        stats(&t, RELAY_LINK),
        LinkStats {
            down_pkts: 1,
            down_bytes: inner,
            relay_up_pkts: 1,
            relay_up_bytes: up_from_peer().inner.len() as u64,
            relay_down_pkts: 1,
            relay_down_bytes: inner,
            ..Default::default()
        }
    );
    assert_eq!(
        stats(&t, down_for_me().bond.link),
        LinkStats {
            down_pkts: 1,
            down_bytes: inner,
            ..Default::default()
        }
    );
}

/// What an entry does with one edited frame.
#[derive(Clone, Copy, Debug)]
enum Fate {
    /// What it does with a good frame (`Path::out` of the edited frame).
    Through,
    Untouched,
    Drop(&'static str),
}

impl Fate {
    fn want(self, path: Path, frame: &[u8]) -> Want {
        match self {
            Self::Through => path.out(frame),
            Self::Untouched => Want::Untouched,
            Self::Drop(r) => Want::Drop(r),
        }
    }
}

#[test]
fn terminal_outer_and_inner_header_cases() {
    type Edit = fn(&mut Vec<u8>);
    // (case, edit, fate when unwrapped for this host, fate when relayed)
    let cases: [(&str, Edit, Fate, Fate); 17] = [
        // `try_terminal`: "only IPv4/UDP without options or fragmentation
        // can be ours". The kernel reassembles fragments; what is not
        // DATA goes to the agent's socket.
        (
            "outer IPv4 options",
            |f| insert_ipv4_options(f, OUTER_IP, &IPV4_NOPS),
            Fate::Untouched,
            Fate::Untouched,
        ),
        (
            "outer fragment, more fragments",
            |f| set_fragment(&mut f[OUTER_IP..], true, 0),
            Fate::Untouched,
            Fate::Untouched,
        ),
        (
            "outer fragment, offset",
            |f| set_fragment(&mut f[OUTER_IP..], false, 8),
            Fate::Untouched,
            Fate::Untouched,
        ),
        (
            "outer IPv4 header of 16 bytes (IHL 4)",
            |f| f[OUTER_IP] = 0x44,
            Fate::Untouched,
            Fate::Untouched,
        ),
        (
            "outer version 6 in an IPv4 frame",
            |f| f[OUTER_IP] = 0x65,
            Fate::Untouched,
            Fate::Untouched,
        ),
        // The outer packet ends at this host: a relay sends a new one
        // (TTL 64) and an unwrap keeps only the inner packet.
        (
            "outer TTL 0",
            |f| set_ttl(&mut f[OUTER_IP..], 0),
            Fate::Through,
            Fate::Through,
        ),
        (
            "outer TTL 1",
            |f| set_ttl(&mut f[OUTER_IP..], 1),
            Fate::Through,
            Fate::Through,
        ),
        // A relay carries the inner packet untouched: the server is its
        // first router (it drops TTL 0 and 1 and inner fragments, see
        // `server_drops_bad_upstream_without_creating_flows`). Unwrapped
        // for this host, its own IPv4 input judges it like any packet it
        // receives; `unwrap` checks only that it is IPv4 and lies inside
        // the frame.
        (
            "inner TTL 0",
            |f| set_ttl(&mut f[INNER..], 0),
            Fate::Through,
            Fate::Through,
        ),
        (
            "inner TTL 1",
            |f| set_ttl(&mut f[INNER..], 1),
            Fate::Through,
            Fate::Through,
        ),
        (
            "inner fragment, more fragments",
            |f| set_fragment(&mut f[INNER..], true, 0),
            Fate::Through,
            Fate::Through,
        ),
        (
            "inner fragment, offset",
            |f| set_fragment(&mut f[INNER..], false, 3),
            Fate::Through,
            Fate::Through,
        ),
        (
            "inner IPv4 options",
            |f| {
                insert_ipv4_options(f, INNER, &IPV4_NOPS);
                grow_outer(f, 4);
            },
            Fate::Through,
            Fate::Through,
        ),
        (
            "inner IPv6",
            |f| f[INNER] = 0x60,
            Fate::Drop("inner_not_ipv4"),
            Fate::Through,
        ),
        (
            "inner longer than the frame",
            |f| {
                let n = get16(f, INNER + 2) + 1;
                set_total_len(&mut f[INNER..], n);
            },
            Fate::Drop("inner_bad_header"),
            Fate::Through,
        ),
        (
            "inner total length 0",
            |f| set_total_len(&mut f[INNER..], 0),
            Fate::Drop("inner_bad_header"),
            Fate::Through,
        ),
        (
            "inner total length 0xffff",
            |f| set_total_len(&mut f[INNER..], 0xffff),
            Fate::Drop("inner_bad_header"),
            Fate::Through,
        ),
        // Bytes after the inner packet (as Ethernet pads short frames) go
        // along; the next IPv4 input trims them.
        (
            "six bytes after the inner packet",
            |f| f.extend_from_slice(&[0; 6]),
            Fate::Through,
            Fate::Through,
        ),
    ];
    let t = term::setup("terminal-headers");
    let c = t.counters();
    for e in terminal_entries() {
        for (case, edit, mine, relayed) in &cases {
            let f = edited(&e.frame, edit);
            let fate = if e.path == Path::Unwrap {
                mine
            } else {
                relayed
            };
            let what = format!("{}: {case}", e.name);
            t.check(&c, "bond_terminal", &what, &f, &fate.want(e.path, &f));
        }
    }
}

/// Bond header fields every entry point checks first (`BondHdr::validate`).
const BAD_BOND_FIELDS: [(&str, usize, u8, &str); 6] = [
    ("magic high byte", 0, 0xB1, "bad_magic"),
    ("magic low byte", 1, 0x4E, "bad_magic"),
    ("version 0", 2, 0, "bad_version"),
    ("version 2", 2, 2, "bad_version"),
    ("version 4", 2, 4, "bad_version"),
    ("version 255", 2, 255, "bad_version"),
];

#[test]
fn every_kind_and_bad_bond_field_at_every_entry_point() {
    use srv::*;
    isolate::in_netns(|_| {
        // The entry points that read a bond header (`bond_wrap` writes
        // one, replies to the server's NAT address carry none).
        // The terminal: only DATA_UP (1) and DATA_DOWN (2) are the
        // programs'; every other kind goes to the agent's socket
        // untouched (DESIGN.md, "Wire format"), where it must be signed.
        let t = term::setup("terminal-kinds");
        let c = t.counters();
        for e in terminal_entries() {
            // Each kind with no sequence and with one: DATA's only.
            for (kind, seq) in (0..=255u8).flat_map(|k| [(k, 0), (k, 0x80)]) {
                let f = edited(&e.frame, |f| (f[BOND + 3], f[BOND + 7]) = (kind, seq));
                let for_me = get32(&f, BOND + 8) == u32::from(term::LAN_IP);
                let want = match (kind, e.relay_port(), for_me) {
                    // DATA_UP to a relay port goes up, whatever its origin.
                    (DATA_UP, true, _) => Path::Up.out(&f),
                    // "DATA_UP at an origin" (drops.rs).
                    (DATA_UP, false, _) => Want::Drop("bad_kind"),
                    (DATA_DOWN, _, true) => Path::Unwrap.out(&f),
                    // DATA_DOWN for a peer on a relay port goes to the peer
                    // if the server sent it (`relay_down`): a relay bounces
                    // nothing a LAN host sends it.
                    (DATA_DOWN, true, false)
                        if get32(&f, OUTER_IP + 12) == u32::from(term::SERVER) =>
                    {
                        Path::Down.out(&f)
                    }
                    (DATA_DOWN, true, false) => Want::Drop("unknown_source"),
                    (DATA_DOWN, false, false) => Want::Drop("wrong_origin"),
                    _ if seq != 0 => Want::Drop("bad_flags"),
                    _ => Want::Untouched,
                };
                let what = format!("{}: kind {kind}, seq {seq}", e.name);
                t.check(&c, "bond_terminal", &what, &f, &want);
            }
            for (field, at, v, reason) in BAD_BOND_FIELDS {
                let f = edited(&e.frame, |f| f[BOND + at] = v);
                let what = format!("{}: {field}", e.name);
                t.check(&c, "bond_terminal", &what, &f, &Want::Drop(reason));
            }
        }

        // The server: DATA_UP is unwrapped, DATA_DOWN is refused, every
        // other kind goes to the agent's socket.
        srv::network();
        let s = srv::setup("server-kinds", 20000..=20010);
        let c = s.counters();
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let up = Up::new(LINKS[0], &ip).frame();
        let forwarded = eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, &unwrapped(&ip, 20000));
        for (kind, seq) in (0..=255u8).flat_map(|k| [(k, 0), (k, 0x80)]) {
            let f = edited(&up, |f| (f[BOND + 3], f[BOND + 7]) = (kind, seq));
            let want = match kind {
                DATA_UP => Want::Out(XDP_REDIRECT, forwarded.clone()),
                DATA_DOWN => Want::Drop("bad_kind"),
                _ if seq != 0 => Want::Drop("bad_flags"),
                _ => Want::Untouched,
            };
            s.check(
                &c,
                "bond_server",
                &format!("upstream kind {kind}, seq {seq}"),
                &f,
                &want,
            );
        }
        for (field, at, v, reason) in BAD_BOND_FIELDS {
            let f = edited(&up, |f| f[BOND + at] = v);
            s.check(&c, "bond_server", field, &f, &Want::Drop(reason));
        }
        assert_eq!(s.maps.flows().unwrap().len(), 1, "the one DATA_UP flow");
    });
}

// ---------------------------------------------------------- server --

/// What `bond_server` does with the first `len` bytes of an upstream frame
/// (`try_server`, `upstream`, `Inner::parse`).
fn server_up_cut(frame: &[u8], len: usize, whole: &Want) -> Want {
    match len {
        0..14 => Want::Refused(EINVAL),
        // No IPv4 header, or no UDP destination port: not ours to judge.
        14..38 => Want::Untouched,
        // To the bond port: the bond header cut.
        38..66 => Want::Drop("truncated"),
        _ if len == frame.len() => whole.clone(),
        // After it, the outer IPv4 header says the frame is longer.
        _ => Want::Drop("outer_bad_header"),
    }
}

/// What `bond_server` does with the first `len` bytes of a reply to a
/// dedicated port (`try_server`, `downstream`).
fn server_down_cut(frame: &[u8], l4: L4, len: usize, whole: &Want) -> Want {
    // Where the dedicated port ends: the TCP or UDP destination port, or
    // the ICMP echo identifier.
    let port_end = if l4.proto() == 1 { 40 } else { 38 };
    match len {
        0..14 => Want::Refused(EINVAL),
        // Until the port can be read, nothing tells it from the server
        // host's own traffic.
        _ if len < port_end => Want::Untouched,
        _ if len == frame.len() => whole.clone(),
        // The IPv4 header says the packet is longer than what came.
        _ => Want::Drop("inner_bad_header"),
    }
}

#[test]
fn server_cut_at_every_offset() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-cuts", 20000..=20010);
        let c = s.counters();
        let l4s = [
            L4::tcp(40000, 443),
            L4::udp(40001, 53),
            L4::EchoRequest { id: 0x4242, seq: 1 },
        ];
        for (i, l4) in l4s.into_iter().enumerate() {
            let ip = Ip::new(ORIGIN_A, CONTENT, l4);
            let nat = 20000 + i as u16;
            let frame = Up::new(LINKS[0], &ip).frame();
            let whole = Want::Out(
                XDP_REDIRECT,
                eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, &unwrapped(&ip, nat)),
            );
            for len in 0..=frame.len() {
                let what = format!("upstream {l4:?} cut at {len}");
                let want = server_up_cut(&frame, len, &whole);
                s.check(&c, "bond_server", &what, &frame[..len], &want);
                let flows = s.maps.flows().unwrap().len();
                let made = if len == frame.len() { i + 1 } else { i };
                assert_eq!(flows, made, "{what}: flows");
            }
        }
        // Replies where they arrive first (links 0, 1, 1: the TCP reply is
        // 12 bytes longer than the others, so link 0's queue ends after
        // link 1's). At 1 kbit/s that is 96 ms: a busy machine takes tens
        // of ms over the cuts of one reply (at 5 kbit/s, 19 ms was not
        // always enough).
        s.maps
            .set_down_paths(COMMUNITY, &[(0, 1, 0), (1, 1, 0)], TEST_BACKLOG_US, 0)
            .unwrap();
        let [l0, l1, _] = LINKS;
        for (i, (l4, link)) in l4s.into_iter().zip([l0, l1, l1]).enumerate() {
            let request = Ip::new(ORIGIN_A, CONTENT, l4);
            let r = reply(&request, 20000 + i as u16);
            let frame = r.frame(CNT_DEV_MAC, CONTENT_MAC);
            let want = rewrapped(&request, &r, link, (link.mac.unwrap(), WAN_DEV_MAC));
            let whole = Want::Out(XDP_REDIRECT, want);
            for len in 0..=frame.len() {
                let what = format!("downstream {:?} cut at {len}", r.l4);
                let want = server_down_cut(&frame, r.l4, len, &whole);
                s.check(&c, "bond_server", &what, &frame[..len], &want);
            }
        }
        assert_eq!(s.maps.flows().unwrap().len(), 3);
        for (idx, up, down) in [(0, 3, 1), (1, 0, 2)] {
            let st = s.maps.server_link_stats(idx).unwrap();
            assert_eq!((st.up_pkts, st.down_pkts), (up, down), "link {idx}");
        }
        assert_eq!(s.event("slow_path"), 0);
    });
}

#[test]
fn server_outer_and_inner_header_cases() {
    use srv::*;
    type Edit = fn(&mut Vec<u8>);
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-headers", 20000..=20010);
        let c = s.counters();
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 53));
        let up = Up::new(LINKS[0], &ip).frame();
        let out = eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, &unwrapped(&ip, 20000));
        let fwd = Want::Out(XDP_REDIRECT, out.clone());
        // Upstream: `try_server` knows bond traffic by the UDP port at its
        // place behind a 20-byte header; `upstream` then takes only a
        // 20-byte outer header that is no fragment. The outer TTL is the
        // path's business (the outer packet ends here); bytes after the
        // inner packet go along, as padding.
        let cases: [(&str, Edit, Want); 8] = [
            // Options move the port: not bond traffic, so the kernel gets
            // it (and the agent's socket, which takes only signed control
            // messages)...
            (
                "outer IPv4 options",
                |f| insert_ipv4_options(f, OUTER_IP, &IPV4_NOPS),
                Want::Untouched,
            ),
            // ...unless the options read as the bond port where it would be.
            (
                "outer IPv4 options that read as the bond port",
                |f| insert_ipv4_options(f, OUTER_IP, &[1, 1, 0x1b, 0x58]),
                Want::Drop("outer_bad_header"),
            ),
            (
                "outer fragment, offset",
                |f| set_fragment(&mut f[OUTER_IP..], false, 8),
                Want::Drop("outer_bad_header"),
            ),
            (
                "outer fragment, more fragments and offset",
                |f| set_fragment(&mut f[OUTER_IP..], true, 8),
                Want::Drop("outer_bad_header"),
            ),
            (
                "outer IPv4 header of 16 bytes (IHL 4)",
                |f| f[OUTER_IP] = 0x44,
                Want::Drop("outer_bad_header"),
            ),
            (
                "outer TTL 0",
                |f| set_ttl(&mut f[OUTER_IP..], 0),
                fwd.clone(),
            ),
            (
                "outer TTL 1",
                |f| set_ttl(&mut f[OUTER_IP..], 1),
                fwd.clone(),
            ),
            (
                "inner total length 0xffff",
                |f| set_total_len(&mut f[INNER..], 0xffff),
                Want::Drop("inner_bad_header"),
            ),
        ];
        for (what, edit, want) in &cases {
            s.check(&c, "bond_server", what, &edited(&up, edit), want);
        }
        let padded = edited(&up, |f| f.extend_from_slice(&[0; 6]));
        let want = Want::Out(XDP_REDIRECT, edited(&out, |f| f.extend_from_slice(&[0; 6])));
        s.check(
            &c,
            "bond_server",
            "six bytes after the inner",
            &padded,
            &want,
        );

        // Downstream (replies to the flow's port 20000).
        let r = reply(&ip, 20000);
        let down = r.frame(CNT_DEV_MAC, CONTENT_MAC);
        let cases: [(&str, Edit, Want); 6] = [
            // `downstream` finds the port behind the options: to a
            // dedicated port it is a reply bond cannot carry (and the
            // kernel would reset), to another the server host's own.
            (
                "IPv4 options",
                |f| insert_ipv4_options(f, OUTER_IP, &IPV4_NOPS),
                Want::Drop("inner_bad_header"),
            ),
            (
                "IPv4 options, to a port that is not dedicated",
                |f| {
                    insert_ipv4_options(f, OUTER_IP, &IPV4_NOPS);
                    f[OUTER_IP + 24 + 2..][..2].copy_from_slice(&80u16.to_be_bytes());
                },
                Want::Untouched,
            ),
            (
                "fragment, offset",
                |f| set_fragment(&mut f[OUTER_IP..], false, 8),
                Want::Drop("inner_fragment"),
            ),
            (
                "TTL 0",
                |f| set_ttl(&mut f[OUTER_IP..], 0),
                Want::Drop("ttl_exceeded"),
            ),
            (
                "total length 0",
                |f| set_total_len(&mut f[OUTER_IP..], 0),
                Want::Drop("inner_bad_header"),
            ),
            (
                "total length 0xffff",
                |f| set_total_len(&mut f[OUTER_IP..], 0xffff),
                Want::Drop("inner_bad_header"),
            ),
        ];
        for (what, edit, want) in &cases {
            let what = format!("reply: {what}");
            s.check(&c, "bond_server", &what, &edited(&down, edit), want);
        }
        // A padded reply is wrapped for what its IPv4 header says; the
        // padding goes along after it.
        let link = LINKS[0];
        let want = rewrapped(&ip, &r, link, (link.mac.unwrap(), WAN_DEV_MAC));
        let padded = edited(&down, |f| f.extend_from_slice(&[0; 6]));
        let want = Want::Out(
            XDP_REDIRECT,
            edited(&want, |f| f.extend_from_slice(&[0; 6])),
        );
        s.check(
            &c,
            "bond_server",
            "reply with six bytes after it",
            &padded,
            &want,
        );
        assert_eq!(s.maps.flows().unwrap().len(), 1);
    });
}

// ----------------------------------------------------- bond_wrap --

#[test]
fn wrap_cut_at_every_offset() {
    use wrap::*;
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-cuts");
        t.maps
            .set_up_paths(&[(A, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let c = t.counters();
        let frame = on_bond0(&app_packets()[0]);
        let mut wrapped = 0u64;
        for len in 0..=frame.len() {
            let what = format!("cut at {len}");
            // BPF_PROG_TEST_RUN gives a TC program an skb of at least an
            // Ethernet header and, for IPv4, a whole 20-byte IPv4 header
            // (it pulls one, as the stack would have). From there on the
            // wrap carries whatever the kernel routed into bond0: it reads
            // the ethertype and the skb length, not the inner packet, and
            // its outer lengths count exactly the bytes it carries. The
            // server judges the inner packet (`server_cut_at_every_offset`
            // drops every cut).
            let want = if len < 14 + 20 {
                Want::Refused(EINVAL)
            } else {
                wrapped += 1;
                Want::Out(TC_ACT_REDIRECT, expected(A, &frame[14..len]))
            };
            t.check(&c, "bond_wrap", &what, &frame[..len], &want);
        }
        let s = term::stats(&t, A);
        let carried: u64 = (20..=frame.len() - 14).map(|n| n as u64).sum();
        assert_eq!((s.up_pkts, s.up_bytes), (wrapped, carried));
    });
}

#[test]
fn wrap_carries_inner_ttl_fragments_and_options_unchanged() {
    use wrap::*;
    type Edit = fn(&mut Vec<u8>);
    // The wrap carries the inner packet as the kernel routed it into bond0.
    // Its first router is the server, which drops TTL 0 and 1, fragments,
    // options and other versions, counted (see
    // `server_drops_bad_upstream_without_creating_flows`); the origin's
    // kernel fragments what does not fit bond0 unless DF is set.
    let cases: [(&str, Edit); 6] = [
        ("TTL 0", |f| set_ttl(&mut f[14..], 0)),
        ("TTL 1", |f| set_ttl(&mut f[14..], 1)),
        ("more fragments", |f| set_fragment(&mut f[14..], true, 0)),
        ("fragment offset", |f| set_fragment(&mut f[14..], false, 5)),
        ("IPv4 options", |f| insert_ipv4_options(f, 14, &IPV4_NOPS)),
        // Nor does it read the version: the ethertype says IPv4.
        ("version 6 behind the IPv4 ethertype", |f| f[14] = 0x65),
    ];
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-ttl");
        t.maps
            .set_up_paths(&[(C, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let c = t.counters();
        let frame = on_bond0(&app_packets()[1]);
        for (what, edit) in cases {
            let f = edited(&frame, edit);
            let want = Want::Out(TC_ACT_REDIRECT, expected(C, &f[14..]));
            t.check(&c, "bond_wrap", what, &f, &want);
        }
    });
}

// ------------------------------------------------------------ sizes --

/// BPF_PROG_TEST_RUN's limits (net/bpf/test_run.c) with 4 KiB pages and
/// x86_64's 320-byte `skb_shared_info`. An XDP frame's linear part, all a
/// program without `xdp.frags` (all of bond's) can read, is a page less
/// the XDP headroom (256) and the shared info; up to 17 more pages
/// (MAX_SKB_FRAGS) go in fragments, after which the kernel says ENOMEM. A
/// TC program gets one linear skb: a page less NET_SKB_PAD (64) and the
/// shared info, after which the kernel says EINVAL. Below an Ethernet
/// header, both say EINVAL.
const XDP_LINEAR_MAX: usize = 4096 - 256 - 320;
const XDP_FRAME_MAX: usize = XDP_LINEAR_MAX + 17 * 4096;
const TC_FRAME_MAX: usize = 4096 - 64 - 320;

#[test]
fn frame_sizes_from_empty_to_the_largest_test_run_takes() {
    use srv::*;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert_eq!(page, 4096, "the limits below assume 4 KiB pages");
    isolate::in_netns(|_| {
        let t = wrap::setup("sizes-terminal");
        t.maps
            .set_up_paths(&[(wrap::A, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let tc = t.counters();
        srv::network();
        let s = srv::setup("sizes-server", 20000..=20010);
        let sc = s.counters();
        let zeros = |n: usize| vec![0u8; n];

        // What the kernel takes, on frames of zeros (ethertype 0: not
        // IPv4, passed by the XDP programs, refused by the wrap).
        for (obj, c, prog, max, over, at_max) in [
            (
                &t,
                &tc,
                "bond_terminal",
                XDP_FRAME_MAX,
                ENOMEM,
                Want::Untouched,
            ),
            (
                &s,
                &sc,
                "bond_server",
                XDP_FRAME_MAX,
                ENOMEM,
                Want::Untouched,
            ),
            (
                &t,
                &tc,
                "bond_wrap",
                TC_FRAME_MAX,
                EINVAL,
                Want::Drop("not_ipv4"),
            ),
        ] {
            for n in 0..14 {
                let what = format!("{prog}: {n} bytes");
                obj.check(c, prog, &what, &zeros(n), &Want::Refused(EINVAL));
            }
            for n in [14, XDP_LINEAR_MAX, XDP_LINEAR_MAX + 1, max] {
                let what = format!("{prog}: {n} zero bytes");
                obj.check(c, prog, &what, &zeros(n), &at_max);
            }
            let what = format!("{prog}: {} bytes", max + 1);
            obj.check(c, prog, &what, &zeros(max + 1), &Want::Refused(over));
        }

        // The largest real packets. `sized(n)` is a UDP packet of n bytes.
        let sized = |src: Ipv4Addr, dst: Ipv4Addr, sport: u16, n: usize| {
            let mut ip = Ip::new(src, dst, L4::udp(sport, 53));
            ip.payload = vec![0x5a; n - 28];
            ip
        };
        // The terminal unwraps all it can read: the largest linear frame.
        // One byte more and the last byte lies in a page fragment the
        // program cannot see: the outer header says more than it has.
        for (n, fits) in [(XDP_LINEAR_MAX, true), (XDP_LINEAR_MAX + 1, false)] {
            let mut w = term::down_for_me();
            w.inner = sized(term::CONTENT, term::LAN_IP, 53, n - WRAP_LEN).bytes();
            let f = w.frame();
            let want = if fits {
                Path::Unwrap.out(&f)
            } else {
                Want::Drop("outer_bad_header")
            };
            t.check(
                &tc,
                "bond_terminal",
                &format!("unwrap, {n} bytes"),
                &f,
                &want,
            );
        }
        // A relay sends up what fits its link (MTU 1500, a 1514-byte
        // frame). Down to the LAN it has no limit of its own: the LAN
        // device's MTU is the kernel's to enforce. A frame larger than the
        // program can read (a multi-buffer frame, which never reaches a
        // program without xdp.frags in service) is refused either way: its
        // outer header says more than the program sees.
        for (n, path, want_drop) in [
            (1514, Path::Up, None),
            (1515, Path::Up, Some("too_big")),
            (XDP_LINEAR_MAX, Path::Up, Some("too_big")),
            (XDP_LINEAR_MAX + 1, Path::Up, Some("outer_bad_header")),
            (XDP_LINEAR_MAX, Path::Down, None),
            (XDP_LINEAR_MAX + 1, Path::Down, Some("outer_bad_header")),
        ] {
            let mut w = match path {
                Path::Up => term::up_from_peer(),
                _ => term::down_from_server(term::PEER, term::PEER_TOKEN),
            };
            let (src, dst) = (w.bond.origin, term::CONTENT);
            w.inner = sized(src, dst, 40000, n - WRAP_LEN).bytes();
            let f = w.frame();
            let want = want_drop.map_or_else(|| path.out(&f), Want::Drop);
            t.check(
                &tc,
                "bond_terminal",
                &format!("{path:?}, {n} bytes"),
                &f,
                &want,
            );
        }
        // The wrap sends what fits the link once wrapped (1500 - 52 bytes).
        for (n, fits) in [(1448, true), (1449, false), (TC_FRAME_MAX - 14, false)] {
            let ip = sized(term::LAN_IP, term::CONTENT, 40000, n);
            let f = wrap::on_bond0(&ip);
            let want = if fits {
                Want::Out(TC_ACT_REDIRECT, wrap::expected(wrap::A, &ip.bytes()))
            } else {
                Want::Drop("too_big")
            };
            t.check(&tc, "bond_wrap", &format!("wrap, {n} bytes"), &f, &want);
        }

        // The server forwards what fits the content network (MTU 1500);
        // the FIB refuses more, before a port is taken.
        let up = |n: usize, sport: u16| Up::new(LINKS[0], &sized(ORIGIN_A, CONTENT, sport, n));
        let fits = sized(ORIGIN_A, CONTENT, 1, 1500);
        let out = eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, &unwrapped(&fits, 20000));
        s.check(
            &sc,
            "bond_server",
            "up, 1500",
            &up(1500, 1).frame(),
            &Want::Out(XDP_REDIRECT, out),
        );
        for (n, reason) in [
            (1501, "too_big"),
            (XDP_LINEAR_MAX - WRAP_LEN, "too_big"),
            // Beyond what the program can read: the outer header says more.
            (XDP_LINEAR_MAX + 1 - WRAP_LEN, "outer_bad_header"),
        ] {
            let what = format!("up, {n}-byte inner packet");
            s.check(
                &sc,
                "bond_server",
                &what,
                &up(n, 2).frame(),
                &Want::Drop(reason),
            );
        }
        assert_eq!(s.maps.flows().unwrap().len(), 1, "only the one that fit");
        // Replies: too big for the links is answered (counted `too_big`,
        // the answer redirected); past the linear part, the packet seems
        // longer than the frame.
        let request = sized(ORIGIN_A, CONTENT, 1, 28);
        let big = |n: usize| {
            let mut r = reply(&request, 20000);
            r.payload = vec![0x5a; n - 28];
            r.frame(CNT_DEV_MAC, CONTENT_MAC)
        };
        let before = sc.read();
        let (v, out) = s.try_run("bond_server", &big(XDP_LINEAR_MAX - 14)).unwrap();
        assert_eq!(v, XDP_REDIRECT, "largest linear reply");
        assert_eq!(
            &out[14 + 12..14 + 16],
            &NAT_IP.octets(),
            "an error from the NAT address"
        );
        assert_eq!((out[34], out[35]), (3, 4), "fragmentation needed");
        assert_eq!(sc.read().drops_since(&before), vec![("too_big", 1)]);
        let what = "reply one byte past the linear part";
        s.check(
            &sc,
            "bond_server",
            what,
            &big(XDP_LINEAR_MAX + 1 - 14),
            &Want::Drop("inner_bad_header"),
        );
    });
}

// ------------------------------- lengths that lie (found by the above) --

#[test]
fn outer_lengths_that_lie_are_dropped() {
    use srv::*;
    type Edit = fn(&mut Vec<u8>);
    // As `inner_bad_header` counts an inner packet whose length lies, so
    // `outer_bad_header` would count an outer one. (More bytes than the
    // outer header says are padding, and go along: see the "six bytes
    // after the inner packet" cases.)
    let lies: [(&str, Edit); 8] = [
        ("outer total length + 1", |f| {
            let n = get16(f, OUTER_IP + 2) + 1;
            set_total_len(&mut f[OUTER_IP..], n);
        }),
        ("outer total length - 1", |f| {
            let n = get16(f, OUTER_IP + 2) - 1;
            set_total_len(&mut f[OUTER_IP..], n);
        }),
        ("outer total length 0", |f| {
            set_total_len(&mut f[OUTER_IP..], 0)
        }),
        ("outer total length 0xffff", |f| {
            set_total_len(&mut f[OUTER_IP..], 0xffff)
        }),
        ("UDP length + 1", |f| {
            let n = get16(f, OUTER_UDP + 4) + 1;
            put16(f, OUTER_UDP + 4, n);
        }),
        ("UDP length - 1", |f| {
            let n = get16(f, OUTER_UDP + 4) - 1;
            put16(f, OUTER_UDP + 4, n);
        }),
        ("UDP length 0", |f| put16(f, OUTER_UDP + 4, 0)),
        ("UDP length 0xffff", |f| put16(f, OUTER_UDP + 4, 0xffff)),
    ];
    isolate::in_netns(|_| {
        let t = term::setup("outer-lies");
        let c = t.counters();
        for e in terminal_entries() {
            for (lie, edit) in lies {
                let what = format!("{}: {lie}", e.name);
                let f = edited(&e.frame, edit);
                t.check(
                    &c,
                    "bond_terminal",
                    &what,
                    &f,
                    &Want::Drop("outer_bad_header"),
                );
            }
            // Cut inside the inner packet (the unwraps drop these already).
            for len in INNER..e.frame.len() {
                let what = format!("{}, cut at {len}", e.name);
                t.check(
                    &c,
                    "bond_terminal",
                    &what,
                    &e.frame[..len],
                    &terminal_cut(&e, len),
                );
            }
        }
        srv::network();
        let s = srv::setup("outer-lies-server", 20000..=20010);
        let c = s.counters();
        let up = Up::new(LINKS[0], &Ip::new(ORIGIN_A, CONTENT, L4::udp(1, 2))).frame();
        for (lie, edit) in lies {
            let f = edited(&up, edit);
            s.check(&c, "bond_server", lie, &f, &Want::Drop("outer_bad_header"));
        }
        assert_eq!(s.maps.flows().unwrap(), vec![]);
    });
}

#[test]
fn server_refuses_inner_tcp_shorter_than_its_header() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("short-tcp", 20000..=20010);
        let c = s.counters();
        let ip = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        for n in 28..40 {
            let mut u = Up::new(LINKS[0], &ip);
            set_total_len(&mut u.inner, n);
            let what = format!("upstream, total length {n}");
            s.check(
                &c,
                "bond_server",
                &what,
                &u.frame(),
                &Want::Drop("truncated"),
            );
        }
        assert_eq!(
            s.maps.flows().unwrap(),
            vec![],
            "no flow from a cut segment"
        );
        expect_up(&s, "the whole segment", LINKS[0], &ip, 20000);
        let r = reply(&ip, 20000).bytes();
        for n in 28..40 {
            let f = eth(
                CNT_DEV_MAC,
                CONTENT_MAC,
                ETH_P_IP,
                &edited(&r, |f| set_total_len(f, n)),
            );
            let what = format!("downstream, total length {n}");
            s.check(&c, "bond_server", &what, &f, &Want::Drop("truncated"));
        }
    });
}

// ---------------------------------------------------------- mutants --

/// A fixed-seed xorshift64* generator: every run tries the same mutants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A length field of a fixture: its offset, and where what it counts
/// starts.
type LenField = (usize, usize);
/// The outer (or only) IPv4 total length, and the UDP length behind it.
const OUTER_LENS: [LenField; 2] = [(OUTER_IP + 2, OUTER_IP), (OUTER_UDP + 4, OUTER_UDP)];
/// The inner IPv4 total length of a wrapped frame.
const INNER_LEN: LenField = (INNER + 2, INNER);

/// One to four mutations of `frame`: bits flipped, bytes overwritten
/// (random or boundary values), cut short (never below an Ethernet
/// header: shorter never reaches a program), garbage appended (up to
/// `max` bytes in all), or a length field set to a random value or to
/// within 4 of the truth. Three edits in four land in the first 100
/// bytes, where the headers are.
fn mutant(rng: &mut Rng, frame: &[u8], lens: &[LenField], max: usize) -> Vec<u8> {
    const BOUNDARY: [u8; 10] = [0, 1, 2, 0x40, 0x45, 0x46, 0x7f, 0x80, 0xfe, 0xff];
    let mut m = frame.to_vec();
    for _ in 0..=rng.below(4) {
        let at = if rng.below(4) > 0 {
            rng.below(m.len().min(100))
        } else {
            rng.below(m.len())
        };
        match rng.below(9) {
            0 | 1 => m[at] ^= 1 << rng.below(8),
            2 | 3 => m[at] = rng.next() as u8,
            4 => m[at] = BOUNDARY[rng.below(BOUNDARY.len())],
            5 => m.truncate(14 + rng.below(m.len() - 13)),
            6 if m.len() < max => {
                let n = if rng.below(8) == 0 {
                    rng.below(max - m.len()) + 1
                } else {
                    (rng.below(64) + 1).min(max - m.len())
                };
                m.extend((0..n).map(|_| rng.next() as u8));
            }
            _ => {
                let (field, from) = lens[rng.below(lens.len())];
                if field + 2 <= m.len() {
                    let truth = m.len().saturating_sub(from) as i64;
                    let v = match rng.below(3) {
                        0 => rng.next() as u16,
                        _ => (truth + rng.below(9) as i64 - 4).clamp(0, 0xffff) as u16,
                    };
                    put16(&mut m, field, v);
                }
            }
        }
    }
    m
}

/// Tallies of a fuzz run, for its report and its coverage checks.
#[derive(Debug, Default)]
struct Tally {
    runs: usize,
    verdicts: std::collections::BTreeMap<u32, usize>,
    reasons: std::collections::BTreeMap<&'static str, usize>,
    /// Outcomes by kind ("untouched", "unwrapped", "relayed up", ...).
    outcomes: std::collections::BTreeMap<&'static str, usize>,
}

impl Tally {
    fn add(&mut self, verdict: u32, grew: &[(&'static str, u64)], outcome: &'static str) {
        self.runs += 1;
        *self.verdicts.entry(verdict).or_default() += 1;
        for (r, _) in grew {
            *self.reasons.entry(r).or_default() += 1;
        }
        *self.outcomes.entry(outcome).or_default() += 1;
    }

    fn outcome(&self, o: &str) -> usize {
        self.outcomes.get(o).copied().unwrap_or(0)
    }
}

/// Checks the drop rule of every program for one run: a drop grew exactly
/// one reason by one, anything else grew none.
fn one_reason_per_drop(what: &str, dropped: bool, grew: &[(&'static str, u64)]) {
    if dropped {
        assert!(
            grew.len() == 1 && grew[0].1 == 1,
            "{what}: a drop must count one reason once, got {grew:?}"
        );
    } else {
        assert_eq!(grew, &[], "{what}: not dropped, yet counted");
    }
}

const MUTANTS: usize = 20_000;
const SEED: u64 = 0x5eed_b04d_0000_0005;

#[test]
fn terminal_survives_mutants() {
    use term::*;
    let t = term::setup("terminal-fuzz");
    let c = t.counters();
    let mut fixtures: Vec<Vec<u8>> = terminal_entries().into_iter().map(|e| e.frame).collect();
    let mut small = up_from_peer();
    small.outer.dport = SMALL_RELAY_PORT;
    small.bond.link = SMALL_RELAY_LINK;
    fixtures.push(small.frame());
    let lens = [OUTER_LENS[0], OUTER_LENS[1], INNER_LEN];
    let mut rng = Rng(SEED);
    let mut tally = Tally::default();
    // Nothing else runs the program: one run's counters after are the
    // next one's before.
    let mut before = c.read();
    for k in 0..MUTANTS {
        let input = mutant(&mut rng, &fixtures[k % fixtures.len()], &lens, 4200);
        let what = format!("mutant {k} {input:02x?}");
        let (v, out) = t.try_run("bond_terminal", &input).expect("test_run");
        let after = c.read();
        let grew = after.drops_since(&before);
        before = after;
        one_reason_per_drop(&what, v == XDP_DROP, &grew);
        let outcome = match v {
            XDP_DROP => "dropped",
            XDP_PASS if out == input => "untouched",
            XDP_PASS => {
                fuzz_check::unwrapped(&what, &input, &out);
                "unwrapped"
            }
            XDP_REDIRECT => fuzz_check::relayed(&what, &input, &out),
            v => panic!("{what}: verdict {v}"),
        };
        tally.add(v, &grew, outcome);
    }
    eprintln!("terminal mutants: {tally:#?}");
    // The mutants reach every path and many reasons.
    for o in [
        "untouched",
        "unwrapped",
        "relayed up",
        "relayed down",
        "dropped",
    ] {
        assert!(tally.outcome(o) >= 200, "only {} {o}", tally.outcome(o));
    }
    assert!(
        tally.reasons.len() >= 10,
        "reasons seen: {:?}",
        tally.reasons
    );
}

/// `bond_terminal_l3` on mutants of what an L3 link brings (DATA_DOWN
/// for a peer and for this host, a playout reading): each is dropped
/// under one reason, passed untouched, held or relayed down exactly as
/// the Ethernet program would relay it.
#[test]
fn terminal_l3_survives_mutants() {
    use term::*;
    let t = l3_setup("l3-fuzz");
    t.maps
        .set_hold(
            bond_common::maps::name::T_HOLD,
            bond_common::maps::Hold {
                ifindex: 4242,
                _pad: 0,
                alive_until_ns: bond_datapath::monotonic_ns() + 600_000_000_000,
            },
        )
        .unwrap();
    let c = t.counters();
    let fixtures = [
        l3(&down_from_server(PEER, PEER_TOKEN)),
        l3(&down_from_server(LAN_IP, TOKEN)),
    ];
    let shift = |(field, from): LenField| (field - OUTER_IP, from - OUTER_IP);
    let lens = [shift(OUTER_LENS[0]), shift(OUTER_LENS[1]), shift(INNER_LEN)];
    let mut rng = Rng(SEED ^ 0x13);
    let mut tally = Tally::default();
    let mut before = c.read();
    for k in 0..MUTANTS {
        let input = mutant(&mut rng, &fixtures[k % fixtures.len()], &lens, 3000);
        let what = format!("L3 mutant {k} {input:02x?}");
        let (v, out) = t.try_run("bond_terminal_l3", &input).expect("test_run");
        let after = c.read();
        let grew = after.drops_since(&before);
        before = after;
        one_reason_per_drop(&what, v == TC_ACT_SHOT, &grew);
        let framed = eth(WAN_MAC, GW_MAC, ETH_P_IP, &input);
        let outcome = match v {
            TC_ACT_SHOT => "dropped",
            TC_ACT_OK if out == input => "untouched",
            // A pure ACK for this host goes up at once; the test run's
            // Ethernet skb makes the helper cut elsewhere (see above).
            TC_ACT_OK if out.len() + 52 == input.len() => "unwrapped",
            TC_ACT_REDIRECT if out == eth([0; 6], [0; 6], ETH_P_IP, &input) => {
                assert_eq!(get32(&framed, BOND + 8), u32::from(LAN_IP), "{what}: held");
                "held"
            }
            TC_ACT_REDIRECT => fuzz_check::relayed(&what, &framed, &out),
            v => panic!("{what}: verdict {v}, output {out:02x?}"),
        };
        tally.add(v, &grew, outcome);
    }
    eprintln!("L3 mutants: {tally:#?}");
    for o in ["untouched", "held", "relayed down", "dropped"] {
        assert!(tally.outcome(o) >= 200, "only {} {o}", tally.outcome(o));
    }
    assert!(
        tally.reasons.len() >= 8,
        "reasons seen: {:?}",
        tally.reasons
    );
}

/// Invariants of one mutant's outcome: what may come out of a program, by
/// the input that went in. They look at nothing but the bytes and the maps.
mod fuzz_check {
    use super::*;

    /// A valid bond header at `BOND` (magic, version, community).
    fn bond_ok(what: &str, f: &[u8], community: u16) {
        assert_eq!(get16(f, BOND), 0xB04D, "{what}: magic");
        assert_eq!(f[BOND + 2], 3, "{what}: version");
        assert_eq!(get16(f, BOND + 4), community, "{what}: community");
    }

    /// An outer header a terminal takes: IPv4/UDP, 20 bytes, no fragment.
    fn outer_ok(what: &str, f: &[u8]) {
        assert_eq!(get16(f, 12), ETH_P_IP, "{what}: ethertype");
        assert_eq!((f[OUTER_IP], f[OUTER_IP + 9]), (0x45, 17), "{what}: outer");
        assert_eq!(get16(f, OUTER_IP + 6) & 0x3fff, 0, "{what}: outer fragment");
    }

    /// Unwrapped by the terminal: only DATA_DOWN for this host with its
    /// token and a whole IPv4 packet, and exactly that packet.
    pub fn unwrapped(what: &str, input: &[u8], out: &[u8]) {
        use term::*;
        outer_ok(what, input);
        bond_ok(what, input, COMMUNITY);
        assert_eq!(input[BOND + 3], DATA_DOWN, "{what}: kind");
        assert_eq!(get32(input, BOND + 8), u32::from(LAN_IP), "{what}: origin");
        let token = u64::from_be_bytes(input[BOND + 16..BOND + 24].try_into().unwrap());
        assert_eq!(token, TOKEN, "{what}: token");
        assert!(
            [DATA_PORT, RELAY_PORT, SMALL_RELAY_PORT].contains(&term_out::port(input)),
            "{what}: port"
        );
        assert_eq!(input[INNER] >> 4, 4, "{what}: inner version");
        let len = usize::from(get16(input, INNER + 2));
        assert!(
            (20..=input.len() - INNER).contains(&len),
            "{what}: inner length {len}"
        );
        assert_bytes(out, &term_out::unwrapped(input), what);
    }

    /// Relayed by the terminal: DATA_UP to a relay port goes to the server
    /// over that port's link if it fits; DATA_DOWN to a relay port goes to
    /// the neighbour its origin names. Nothing but the outer addresses
    /// changes.
    pub fn relayed(what: &str, input: &[u8], out: &[u8]) -> &'static str {
        use term::*;
        outer_ok(what, input);
        bond_ok(what, input, COMMUNITY);
        let port = term_out::port(input);
        let mtu = match port {
            RELAY_PORT => 1500,
            SMALL_RELAY_PORT => 100,
            p => panic!("{what}: relayed from port {p}"),
        };
        match input[BOND + 3] {
            DATA_UP => {
                assert!(input.len() <= mtu + 14, "{what}: over the link MTU");
                assert_bytes(out, &term_out::up(input), what);
                "relayed up"
            }
            DATA_DOWN => {
                assert_eq!(get32(input, BOND + 8), u32::from(PEER), "{what}: origin");
                assert_bytes(out, &term_out::down(input), what);
                "relayed down"
            }
            k => panic!("{what}: relayed kind {k}"),
        }
    }

    /// The server's maps, opened once.
    pub struct ServerMaps<'a> {
        pub flows: BpfHashMap<&'a MapData, FlowKey, Flow>,
        pub nat: BpfHashMap<&'a MapData, NatKey, NatEntry>,
        pub sessions: BpfHashMap<&'a MapData, SessionKey, Session>,
    }

    impl<'a> ServerMaps<'a> {
        pub fn new(s: &'a Obj) -> Self {
            let m = |n: &str| s.ebpf.map(n).unwrap_or_else(|| panic!("{n}"));
            Self {
                flows: BpfHashMap::try_from(m("S_FLOWS")).unwrap(),
                nat: BpfHashMap::try_from(m("S_NAT")).unwrap(),
                sessions: BpfHashMap::try_from(m("S_SESSIONS")).unwrap(),
            }
        }

        fn token(&self, community: u16, origin: u32) -> Option<u64> {
            let key = SessionKey {
                community,
                _pad: 0,
                origin,
            };
            self.sessions.get(&key, 0).ok().map(|s| s.token)
        }

        fn nat(&self, proto: u8, port: u16) -> Option<NatEntry> {
            let key = NatKey {
                proto,
                _pad: 0,
                port,
            };
            self.nat.get(&key, 0).ok()
        }
    }

    /// The port of the IPv4 packet at `ip`: its source or destination
    /// port, or its ICMP identifier.
    fn port_of(f: &[u8], ip: usize, dst: bool) -> u16 {
        match f[ip + 9] {
            1 => get16(f, ip + 24),
            _ if dst => get16(f, ip + 22),
            _ => get16(f, ip + 20),
        }
    }

    /// Forwarded upstream: from a registered link, with the token of a
    /// logged-on origin that is the inner source; it leaves from the NAT
    /// address and the port of that origin's flow, whose NAT entry points
    /// back to it.
    pub fn up(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        let community = get16(input, BOND + 4);
        let origin = get32(input, BOND + 8);
        let (src, sport) = (get32(input, OUTER_IP + 12), get16(input, OUTER_UDP));
        assert!(
            LINKS.iter().any(|l| u32::from(l.ip) == src
                && l.port == sport
                && l.id == input[BOND + 6]
                && community == COMMUNITY),
            "{what}: not from a registered link"
        );
        let token = u64::from_be_bytes(input[BOND + 16..BOND + 24].try_into().unwrap());
        assert_eq!(m.token(community, origin), Some(token), "{what}: token");
        assert_eq!(get32(input, INNER + 12), origin, "{what}: inner source");
        let ip = &out[14..];
        assert_eq!(&ip[12..16], &NAT_IP.octets(), "{what}: source address");
        assert_eq!(
            &ip[16..20],
            &input[INNER + 16..INNER + 20],
            "{what}: destination"
        );
        assert_eq!(ip[8], input[INNER + 8].wrapping_sub(1), "{what}: TTL");
        let proto = ip[9];
        let key = FlowKey {
            community,
            proto,
            _pad: 0,
            origin,
            port: port_of(input, INNER, false),
            _pad2: 0,
        };
        let flow = m
            .flows
            .get(&key, 0)
            .unwrap_or_else(|_| panic!("{what}: no flow"));
        assert_eq!(
            port_of(out, 14, false),
            flow.nat_port,
            "{what}: source port"
        );
        let back = NatEntry {
            origin,
            community,
            port: key.port,
        };
        assert_eq!(m.nat(proto, flow.nat_port), Some(back), "{what}: NAT entry");
    }

    /// Wrapped downstream: for the origin the NAT entry of its port names,
    /// with that origin's token, on a link of the schedule.
    pub fn down(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        assert_eq!(
            &input[30..34],
            &NAT_IP.octets(),
            "{what}: to the NAT address"
        );
        let proto = input[OUTER_IP + 9];
        let e = m
            .nat(proto, port_of(input, 14, true))
            .unwrap_or_else(|| panic!("{what}: no NAT entry"));
        bond_ok(what, out, e.community);
        assert_eq!(out[BOND + 3], DATA_DOWN, "{what}: kind");
        assert_eq!(get32(out, BOND + 8), e.origin, "{what}: origin");
        let token = u64::from_be_bytes(out[BOND + 16..BOND + 24].try_into().unwrap());
        assert_eq!(m.token(e.community, e.origin), Some(token), "{what}: token");
        let (dst, dport) = (get32(out, OUTER_IP + 16), get16(out, OUTER_UDP + 2));
        assert!(
            LINKS[..2]
                .iter()
                .any(|l| u32::from(l.ip) == dst && l.port == dport && l.id == out[BOND + 6]),
            "{what}: not on a scheduled link"
        );
        assert_eq!(
            get32(out, INNER + 16),
            e.origin,
            "{what}: inner destination"
        );
        assert_eq!(port_of(out, INNER, true), e.port, "{what}: inner port");
        assert_eq!(
            &out[INNER + 12..INNER + 16],
            &input[26..30],
            "{what}: inner source"
        );
    }

    /// The answer to a reply too big for the links: ICMP fragmentation
    /// needed from the NAT address to the reply's sender, for a flow's
    /// reply only.
    pub fn frag_needed(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        let proto = input[OUTER_IP + 9];
        assert!(
            m.nat(proto, port_of(input, 14, true)).is_some(),
            "{what}: no flow"
        );
        assert_eq!(out[OUTER_IP + 9], 1, "{what}: ICMP");
        assert_eq!(
            &out[26..30],
            &NAT_IP.octets(),
            "{what}: from the NAT address"
        );
        assert_eq!(&out[30..34], &input[26..30], "{what}: to the sender");
        assert_eq!((out[34], out[35]), (3, 4), "{what}: fragmentation needed");
    }
}

#[test]
fn server_survives_mutants() {
    use fuzz_check::ServerMaps;
    use srv::*;
    const PORTS: u16 = 300;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-fuzz", 20000..=20010);
        // Room for the flows mutants make: 300 dedicated ports.
        let cfg = s.maps.server_config().unwrap();
        let port_max = PORT_MIN + PORTS - 1;
        s.maps
            .set_server_config(ServerConfig { port_max, ..cfg })
            .unwrap();
        s.maps.push_free_ports(PORT_MAX + 1..=port_max).unwrap();
        let c = s.counters();
        let m = ServerMaps::new(&s);

        // A TCP, UDP and ICMP echo flow for each origin, and their replies.
        let mut fixtures = Vec::new();
        let l4s = [
            L4::tcp(40000, 443),
            L4::udp(40001, 53),
            L4::EchoRequest { id: 0x4242, seq: 1 },
        ];
        for (i, (origin, link)) in [(ORIGIN_A, LINKS[0]), (ORIGIN_B, LINKS[1])]
            .into_iter()
            .enumerate()
        {
            for (j, l4) in l4s.into_iter().enumerate() {
                let ip = Ip::new(origin, CONTENT, l4);
                let nat = PORT_MIN + (i * 3 + j) as u16;
                expect_up(&s, "a flow to mutate", link, &ip, nat);
                fixtures.push((Up::new(link, &ip).frame(), true));
                fixtures.push((reply(&ip, nat).frame(CNT_DEV_MAC, CONTENT_MAC), false));
            }
        }
        // And an inner UDP packet's UDP length.
        let wrapped_lens = [
            OUTER_LENS[0],
            OUTER_LENS[1],
            INNER_LEN,
            (INNER + 24, INNER + 20),
        ];
        let mut rng = Rng(SEED);
        let mut tally = Tally::default();
        let mut before = c.read();
        for k in 0..MUTANTS {
            let (fixture, wrapped) = &fixtures[k % fixtures.len()];
            let lens: &[LenField] = if *wrapped { &wrapped_lens } else { &OUTER_LENS };
            let input = mutant(&mut rng, fixture, lens, 4200);
            let what = format!("mutant {k} {input:02x?}");
            let (v, out) = s.try_run("bond_server", &input).expect("test_run");
            let after = c.read();
            let grew = after.drops_since(&before);
            let created = after.event_since(&before, event::FLOW_CREATED);
            let answered = after.event_since(&before, event::FRAG_NEEDED);
            before = after;
            let outcome = if answered > 0 {
                // The one redirect that counts a drop: the reply it answers.
                assert_eq!((v, answered), (XDP_REDIRECT, 1), "{what}: frag needed");
                assert_eq!(grew, vec![("too_big", 1)], "{what}: counted");
                fuzz_check::frag_needed(&what, &m, &input, &out);
                "answered too big"
            } else {
                one_reason_per_drop(&what, v == XDP_DROP, &grew);
                match v {
                    XDP_DROP => "dropped",
                    XDP_PASS if out == input => "untouched",
                    // Forwarded, by the FIB's next hop (redirect) or the
                    // kernel's (pass, the slow path).
                    XDP_PASS | XDP_REDIRECT if out.len() + 52 == input.len() => {
                        fuzz_check::up(&what, &m, &input, &out);
                        "forwarded up"
                    }
                    XDP_PASS | XDP_REDIRECT if out.len() == input.len() + 52 => {
                        fuzz_check::down(&what, &m, &input, &out);
                        "wrapped down"
                    }
                    v => panic!("{what}: verdict {v}, {} bytes out", out.len()),
                }
            };
            // A flow is made only by a packet forwarded upstream.
            let made_by = if outcome == "forwarded up" {
                0..=1
            } else {
                0..=0
            };
            assert!(made_by.contains(&created), "{what}: {created} flows made");
            tally.add(v, &grew, outcome);
            if created > 0 {
                *tally.outcomes.entry("flows made").or_default() += 1;
            }
        }
        eprintln!("server mutants: {tally:#?}");

        // Every flow belongs to a logged-on origin of the community, and
        // its NAT entry points back to it; each port serves one flow.
        let flows = s.maps.flows().unwrap();
        let nat = s.maps.nat_entries().unwrap();
        let mut ports: Vec<u16> = flows.iter().map(|f| f.1.nat_port).collect();
        for (k, f) in &flows {
            assert_eq!(k.community, COMMUNITY, "{k:?}");
            assert!(
                [ORIGIN_A, ORIGIN_B].contains(&Ipv4Addr::from(k.origin)),
                "{k:?}"
            );
            let back = NatEntry {
                origin: k.origin,
                community: k.community,
                port: k.port,
            };
            let nkey = NatKey {
                proto: k.proto,
                _pad: 0,
                port: f.nat_port,
            };
            assert!(nat.contains(&(nkey, back)), "{k:?}: NAT entry");
        }
        assert_eq!(nat.len(), flows.len(), "a NAT entry per flow, no more");
        assert_eq!(s.event("flows_created") as usize, flows.len());
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), flows.len(), "one flow per port");

        for o in [
            "untouched",
            "dropped",
            "forwarded up",
            "wrapped down",
            "flows made",
        ] {
            assert!(tally.outcome(o) >= 50, "only {} {o}", tally.outcome(o));
        }
        assert!(
            tally.reasons.len() >= 10,
            "reasons seen: {:?}",
            tally.reasons
        );
    });
}

#[test]
fn wrap_survives_mutants() {
    use wrap::*;
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-fuzz");
        t.maps
            .set_up_paths(
                &[(A, 1_000, 0), (C, 1_000, 0), (SMALL, 1_000, 0)],
                TEST_BACKLOG_US,
            )
            .unwrap();
        let c = t.counters();
        let fixtures: Vec<Vec<u8>> = app_packets().iter().map(on_bond0).collect();
        let lens = [OUTER_LENS[0]];
        let mut rng = Rng(SEED);
        let mut tally = Tally::default();
        let mut last_sent = None;
        let mut before = c.read();
        for k in 0..MUTANTS {
            let input = mutant(&mut rng, &fixtures[k % fixtures.len()], &lens, TC_FRAME_MAX);
            let what = format!("mutant {k} {input:02x?}");
            let (v, out) = match t.try_run("bond_wrap", &input) {
                Ok(r) => r,
                Err(e) => {
                    // BPF_PROG_TEST_RUN pulls a whole IPv4 or IPv6 header
                    // before a TC program runs (see `wrap_cut_at_every_offset`).
                    let short = match get16(&input, 12) {
                        0x0800 => input.len() < 14 + 20,
                        0x86dd => input.len() < 14 + 40,
                        _ => false,
                    };
                    assert!(e == EINVAL && short, "{what}: refused, errno {e}");
                    assert_eq!(c.read(), before, "{what}: refused, yet counted");
                    *tally.outcomes.entry("refused by test_run").or_default() += 1;
                    continue;
                }
            };
            let after = c.read();
            let grew = after.drops_since(&before);
            before = after;
            one_reason_per_drop(&what, v == TC_ACT_SHOT, &grew);
            let outcome = match v {
                TC_ACT_SHOT => "dropped",
                // Wrapped exactly, on a scheduled link it fits, stamped
                // with a send time no earlier than the last one's.
                TC_ACT_REDIRECT => {
                    let (link, sent) = (out[BOND + 6], get32(&out, BOND + 12));
                    assert!([A, C, SMALL].contains(&link), "{what}: link {link}");
                    assert_eq!(get16(&input, 12), ETH_P_IP, "{what}: ethertype");
                    assert!(
                        input.len() - 14 + 52 <= usize::from(up_link(link).mtu),
                        "{what}"
                    );
                    assert!(
                        last_sent.is_none_or(|l: u32| sent.wrapping_sub(l) < 1 << 31),
                        "{what}: sent {sent} after {last_sent:?}"
                    );
                    last_sent = Some(sent);
                    assert_bytes(&out, &expected(link, &input[14..]), &what);
                    "wrapped"
                }
                v => panic!("{what}: verdict {v}"),
            };
            tally.add(v, &grew, outcome);
        }
        eprintln!("wrap mutants: {tally:#?}");
        assert!(tally.outcome("wrapped") >= 1000, "{tally:?}");
        for r in ["not_ipv4", "too_big"] {
            assert!(
                tally.reasons.get(r).copied().unwrap_or(0) >= 100,
                "{tally:?}"
            );
        }
    });
}
