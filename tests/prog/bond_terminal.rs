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
