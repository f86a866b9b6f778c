//! `bond_terminal` (XDP) and the L3 link programs (`bond_terminal_l3`,
//! `bond_relay`, TC): relaying up and down, unwrapping, what they drop.

use super::*;

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
        id: 0,
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
        id: 0,
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
    // IPv6 inside: handed up as IPv6, behind the IPv6 ethertype.
    let mut v6 = down_for_me();
    v6.bond.sent = via_peer.bond.sent.max(via_own_link.bond.sent) + 1; // not late
    v6.inner = Ip6::new(
        "2001:db8:71::2".parse().unwrap(),
        "2001:db8:1::11".parse().unwrap(),
        L4::tcp(443, 40000),
    )
    .bytes();
    let want = eth(v6.outer.dst_mac, v6.outer.src_mac, 0x86dd, &v6.inner);
    t.expect(
        "bond_terminal",
        "IPv6 inside",
        &v6.frame(),
        XDP_PASS,
        Some(&want),
    );
    assert_checksums6(&want[14..], "IPv6 inside");
    // The IPv6 packet came over the peer's link too.
    let peer_link = (2, (via_peer.inner.len() + v6.inner.len()) as u64);
    let own_link = (1, via_own_link.inner.len() as u64);
    for (what, w, (pkts, bytes)) in [
        ("via a peer", &via_peer, peer_link),
        ("via own link", &via_own_link, own_link),
    ] {
        assert_eq!(
            stats(&t, w.bond.link),
            LinkStats {
                down_pkts: pkts,
                down_bytes: bytes,
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
    assert_eq!(out.len(), ack.frame().len() - (WRAP_LEN - 14), "unwrapped");
    assert_eq!(stats(&t, RELAY_LINK).down_late, 0, "an ACK is never late");
    // An IPv6 one too (held, the playout stretched every upload's round
    // trip by the far link's delay).
    let mut ack6 = w.clone();
    ack6.inner = Ip6 {
        payload: Vec::new(),
        ..Ip6::new(
            "2001:db8:71::2".parse().unwrap(),
            "2001:db8:1::1".parse().unwrap(),
            L4::tcp(443, 40000),
        )
    }
    .bytes();
    let (v, out) = t.run("bond_terminal", &ack6.frame());
    assert_eq!(v, XDP_PASS, "IPv6 pure ACK: at once");
    assert_eq!(out.len(), ack6.frame().len() - (WRAP_LEN - 14), "unwrapped");
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
    assert_eq!(out.len(), w.frame().len() - (WRAP_LEN - 14), "unwrapped");
    // (The two pure ACKs, and this one.)
    assert_eq!(stats(&t, RELAY_LINK).down_pkts, 3);
}

#[test]
fn terminal_drops_and_counts_bad_input() {
    use term::*;
    type Edit = fn(&mut Wrapped);
    let cases: [(&str, Edit, &str); 15] = [
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
        // Version 6 on an IPv4 packet: its IPv6 payload length (the IPv4
        // identification) runs past the wrap.
        ("inner version 6", |w| w.inner[0] = 0x60, "inner_bad_header"),
        ("inner version 5", |w| w.inner[0] = 0x50, "inner_not_ipv4"),
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
    // On one CPU: the log's "first drop" is per CPU.
    let (t, logged) = isolate::pinned(|_| {
        let mut t = term::setup("terminal-bad");
        for (what, edit, reason) in cases {
            let mut w = down_for_me();
            edit(&mut w);
            t.expect_drop("bond_terminal", what, &w.frame(), XDP_DROP, reason);
        }
        let logged = t.logged();
        (t, logged)
    });
    // The first drop of each reason is logged, by name, and only the first
    // (two cases each drop for wrong_community and inner_bad_header).
    let mut reasons: Vec<&str> = cases.iter().map(|c| c.2).collect();
    reasons.sort_unstable();
    reasons.dedup();
    let mut named: Vec<&str> = logged
        .iter()
        .map(|l| {
            let (_, rest) = l
                .split_once("dropped a packet for ")
                .unwrap_or_else(|| panic!("not a drop line: {l}"));
            rest.split(' ').next().unwrap()
        })
        .collect();
    named.sort_unstable();
    assert_eq!(named, reasons, "{logged:#?}");

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
    fragment.payload = down_for_me().frame()[BOND..].to_vec();
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
        id: 0,
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
        id: 0,
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

/// An own link over IPv6 (`LINK_V6`): a LAN peer's DATA_UP leaves on it in
/// outer IPv6 from the link's address to the server's; DATA_DOWN from the
/// server's IPv6 address is relayed to its origin over the LAN, or
/// unwrapped for this host, exactly as over IPv4. DATA to the link from
/// another IPv6 address is dropped; other IPv6 passes untouched.
#[test]
fn terminal_carries_an_own_link_over_ipv6() {
    use bond_common::maps::LINK_V6;
    use term::*;
    let t = term::setup("relay6");
    let link = relay_link(RELAY_PORT, RELAY_LINK, 1500, LINK_V6);
    t.maps.set_link6(RELAY_LINK, WAN6).unwrap();
    t.maps.set_relay_link(RELAY_PORT, link).unwrap();

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
        id: 0,
        ..input.outer
    };
    let want = over_ipv6(&want.frame(), WAN6, SERVER6, 64);
    let what = "relay up over IPv6";
    t.expect(
        "bond_terminal",
        what,
        &input.frame(),
        XDP_REDIRECT,
        Some(&want),
    );

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
        id: 0,
        ..input.outer
    };
    let frame = over_ipv6(&input.frame(), SERVER6, WAN6, 60);
    let what = "relay down from IPv6";
    t.expect(
        "bond_terminal",
        what,
        &frame,
        XDP_REDIRECT,
        Some(&want.frame()),
    );
    assert_wrapped_checksums(&want.frame(), what);

    let mine = down_from_server(LAN_IP, TOKEN);
    let want = eth(
        mine.outer.dst_mac,
        mine.outer.src_mac,
        ETH_P_IP,
        &mine.inner,
    );
    let frame = over_ipv6(&mine.frame(), SERVER6, WAN6, 60);
    t.expect(
        "bond_terminal",
        "unwrap from IPv6",
        &frame,
        XDP_PASS,
        Some(&want),
    );
    let s = stats(&t, RELAY_LINK);
    assert_eq!((s.relay_up_pkts, s.relay_down_pkts, s.down_pkts), (1, 1, 1));
    assert_eq!(t.nonzero_drops(), vec![]);

    let stranger = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x66);
    let frame = over_ipv6(&input.frame(), stranger, WAN6, 60);
    let what = "DATA_DOWN from another IPv6 address";
    t.expect_drop("bond_terminal", what, &frame, XDP_DROP, "unknown_source");
    let other = ipv6_udp_frame(WAN_MAC, GW_MAC, RELAY_PORT + 100);
    t.expect(
        "bond_terminal",
        "other IPv6",
        &other,
        XDP_PASS,
        Some(&other),
    );
}

/// An own L3 link over IPv6 (`LINK_L3 | LINK_V6`, a raw-IP LTE modem with
/// only IPv6): a LAN peer's DATA_UP leaves it from `bond_relay` in outer
/// IPv6 from the link's address to the server's, the skb made IPv6 (the
/// L3 device frames by it). `bond_terminal_l3` refuses DATA to the link
/// from another IPv6 address and passes other IPv6 and control messages
/// untouched. (Its conversion of the server's DATA to the IPv4 form takes
/// the packet's first 20 bytes away: BPF_PROG_TEST_RUN's skb is an
/// Ethernet one, so that is shown end to end, `tests/uplinks.rs`,
/// `an_l3_link_with_only_ipv6_bonds_with_an_ipv4_link`.)
#[test]
fn terminal_carries_an_own_l3_link_over_ipv6() {
    use bond_common::maps::{LINK_L3, LINK_V6};
    use term::*;
    let t = term::setup("l3-relay6");
    let link = relay_link(RELAY_PORT, RELAY_LINK, 1500, LINK_L3 | LINK_V6);
    t.maps.set_link6(RELAY_LINK, WAN6).unwrap();
    t.maps.set_relay_link(RELAY_PORT, link).unwrap();
    let small = relay_link(SMALL_RELAY_PORT, SMALL_RELAY_LINK, 100, LINK_L3 | LINK_V6);
    t.maps.set_link6(SMALL_RELAY_LINK, WAN6).unwrap();
    t.maps.set_relay_link(SMALL_RELAY_PORT, small).unwrap();

    let input = up_from_peer();
    let mut want = input.clone();
    want.outer = Outer {
        src: WAN_IP,
        dst: SERVER,
        sport: RELAY_PORT,
        dport: SERVER_PORT,
        ttl: 64,
        id: 0,
        ..input.outer
    };
    let want = over_ipv6(&want.frame(), WAN6, SERVER6, 64);
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
        "relay up over IPv6 on L3",
        &frame,
        TC_ACT_REDIRECT,
        Some(&want),
    );
    let s = stats(&t, RELAY_LINK);
    assert_eq!(
        (s.relay_up_pkts, s.relay_up_bytes),
        (1, input.inner.len() as u64)
    );
    // The 20 bytes more count against the link's MTU.
    let mut big = up_from_peer();
    big.outer.dport = SMALL_RELAY_PORT;
    big.bond.link = SMALL_RELAY_LINK;
    t.expect_drop(
        "bond_relay",
        "too big",
        &big.frame(),
        TC_ACT_SHOT,
        "too_big",
    );
    assert_eq!(t.nonzero_drops(), vec![("too_big", 1)]);

    // From the server's IPv6 address only; the rest passes as it came.
    let l3_6 = |f: Vec<u8>| f[14..].to_vec();
    let down = down_from_server(PEER, PEER_TOKEN);
    let stranger = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x66);
    let from_stranger = l3_6(over_ipv6(&down.frame(), stranger, WAN6, 60));
    t.expect_drop(
        "bond_terminal_l3",
        "DATA_DOWN from another IPv6 address",
        &from_stranger,
        TC_ACT_SHOT,
        "unknown_source",
    );
    let mut control = down.clone();
    control.bond.kind = ANNOUNCE;
    for (what, p) in [
        (
            "a control message from the server over IPv6",
            l3_6(over_ipv6(&control.frame(), SERVER6, WAN6, 60)),
        ),
        (
            "IPv6 to another port",
            l3_6(ipv6_udp_frame(WAN_MAC, GW_MAC, RELAY_PORT + 100)),
        ),
    ] {
        t.expect("bond_terminal_l3", what, &p, TC_ACT_OK, Some(&p));
    }
}
