//! The server's flow table kept by the agent's calls: closing flags,
//! sweeps, map sizes, per-origin limits.

use super::*;

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
fn server_sweep_expires_idle_flows_and_frees_their_ports() {
    use std::time::Duration;

    use bond_datapath::flows::{self, Sweep, Timeouts};
    use srv::*;
    const S: u64 = 1_000_000_000;
    isolate::in_netns(|_| {
        srv::network();
        // One port: a dedicated port is one protocol's, so a TCP, a UDP
        // and an ICMP flow can all hold it.
        let s = srv::setup("server-sweep", [20000]);
        let [l0, l1, _] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 53));
        let icmp = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 0x4242, seq: 1 });
        let extra = Ip::new(ORIGIN_B, CONTENT, L4::udp(5000, 53));
        expect_up(&s, "TCP", l0, &tcp, 20000);
        expect_up(&s, "UDP", l0, &udp, 20000);
        expect_up(&s, "ICMP", l0, &icmp, 20000);
        let extra_frame = Up::new(l1, &extra).frame();
        let refused =
            |what| s.expect_drop("bond_server", what, &extra_frame, XDP_DROP, "no_free_port");
        refused("a second UDP flow while the one UDP port is taken");

        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            icmp: Duration::from_secs(20),
        };
        let seen = |origin, ip: &Ip, port| flow(&s, origin, ip.l4, port).unwrap().last_seen_ns;
        let sweep = |now| flows::sweep(&s.maps, &t, now).unwrap();
        let nat_protos = || {
            let mut v: Vec<(u8, u16)> = s
                .maps
                .nat_entries()
                .unwrap()
                .iter()
                .map(|e| (e.0.proto, e.0.port))
                .collect();
            v.sort_unstable();
            v
        };

        // Just short of the shortest timeout: nothing goes.
        assert_eq!(
            sweep(seen(ORIGIN_A, &icmp, 0x4242) + 20 * S - 1),
            Sweep {
                scanned: 3,
                kept: 3,
                ..Default::default()
            }
        );
        // ICMP's timeout: it goes, and nothing else.
        assert_eq!(
            sweep(seen(ORIGIN_A, &icmp, 0x4242) + 20 * S),
            Sweep {
                scanned: 3,
                icmp: 1,
                ports_returned: 1,
                kept: 2,
                ..Default::default()
            }
        );
        assert_eq!(
            nat_protos(),
            vec![(6, 20000), (17, 20000)],
            "its NAT entry went"
        );
        s.expect_drop(
            "bond_server",
            "a late echo reply",
            &reply(&icmp, 20000).frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "no_flow",
        );
        refused("ICMP's port is free, UDP's is not");

        // UDP after 30 s idle: its port is free, and the refused flow
        // gets it now.
        assert_eq!(
            sweep(seen(ORIGIN_A, &udp, 40001) + 30 * S),
            Sweep {
                scanned: 2,
                udp: 1,
                ports_returned: 1,
                kept: 1,
                ..Default::default()
            }
        );
        expect_up(&s, "the refused flow, again", l1, &extra, 20000);
        // An established TCP flow idle for 30 s stays (its timeout is
        // 100 s); after a FIN it goes 10 s after its last packet.
        tcp_up(&s, "FIN", l0, &tcp, FIN | ACK);
        let fin_at = seen(ORIGIN_A, &tcp, 40000);
        assert_eq!(sweep(fin_at + 10 * S - 1).tcp, 0);
        assert_eq!(
            sweep(fin_at + 10 * S),
            Sweep {
                scanned: 2,
                tcp: 1,
                ports_returned: 1,
                kept: 1,
                ..Default::default()
            }
        );
        assert_eq!(nat_protos(), vec![(17, 20000)], "only B's flow is left");

        // A flow that came alive between the listing and the delete is
        // kept: the predicate sees the value as it is at the delete.
        let key = FlowKey::new(COMMUNITY, 17, ORIGIN_B.into(), 5000);
        let listed = seen(ORIGIN_B, &extra, 5000);
        expect_up(&s, "B's flow, alive", l1, &extra, 20000);
        let removed = s
            .maps
            .remove_flows_if([key], |_, f| f.last_seen_ns == listed)
            .unwrap();
        assert_eq!(removed, vec![], "a flow seen since the listing stays");
        assert_eq!(nat_protos(), vec![(17, 20000)]);
        let removed = s.maps.remove_flows_if([key, key], |_, _| true).unwrap();
        assert_eq!(removed.len(), 1, "removed once; the repeat is skipped");
        assert!(removed[0].port_returned);
        assert_eq!(s.maps.flows().unwrap(), vec![]);
        assert_eq!(s.maps.nat_entries().unwrap(), vec![]);

        // The port is free once, for one flow.
        let ip = |p| Ip::new(ORIGIN_B, CONTENT, L4::udp(p, 53));
        expect_up(&s, "a new flow", l1, &ip(6000), 20000);
        s.expect_drop(
            "bond_server",
            "and no more",
            &Up::new(l1, &ip(6001)).frame(),
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
        // A flow table of 2 and 2 sessions (the set-up logs on A and B),
        // outside a tier: an owner table of one entry.
        let sizes = bond_datapath::flows::server_map_sizes(2, 2, false);
        let mut s = srv::setup_with_sizes("server-sizes", 20000..=20002, &sizes);
        let third = s.maps.set_session(COMMUNITY, Ipv4Addr::new(10, 0, 1, 9), 7);
        assert!(
            third.as_ref().is_err_and(|e| e.is_full()),
            "a session table of 2 takes no third terminal: {third:?}"
        );
        let owners = bond_datapath::Owners::Node;
        s.maps.set_owner(owners, COMMUNITY + 1, Some(0)).unwrap();
        let second = s.maps.set_owner(owners, COMMUNITY + 2, Some(0));
        assert!(
            second.as_ref().is_err_and(|e| e.is_full()),
            "an owner table of one entry outside a tier: {second:?}"
        );
        s.maps.set_owner(owners, COMMUNITY + 1, None).unwrap();
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
        // The refused flow claimed no port (the next in order is 20002);
        // freeing a flow makes room for it.
        let key = s.maps.flows().unwrap()[0].0;
        assert_eq!(s.maps.remove_flows_if([key], |_, _| true).unwrap().len(), 1);
        expect_up(&s, "third, after a removal", l0, &ip(3), 20002);

        // The table of flows per origin, sized for 2 terminals, full with A
        // and a stale entry: B's first flow is refused for that table, not
        // for the flow table, which has room again.
        let key = s.maps.flows().unwrap()[0].0;
        assert_eq!(s.maps.remove_flows_if([key], |_, _| true).unwrap().len(), 1);
        let stale = SessionKey::new(COMMUNITY, Ipv4Addr::new(10, 0, 1, 99).into());
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
            let key = SessionKey::new(COMMUNITY, origin.into());
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
            let k = SessionKey::new(COMMUNITY, o.into());
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

/// IPv6 flows expire by the same timeouts as IPv4 ones and give their
/// ports back to the one queue; their NAT entries go with them, so a late
/// reply finds no flow.
#[test]
fn server_sweep_expires_ipv6_flows_too() {
    use std::time::Duration;

    use bond_datapath::flows::{self, Sweep, Timeouts};
    use srv::*;
    const S: u64 = 1_000_000_000;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-sweep6", 20000..=20000);
        let ip = Ip6::new(ORIGIN_A6, CONTENT6, L4::udp(40001, 53));
        let up = |ip: &Ip6| Up::v6(LINKS[0], ORIGIN_A, ip).frame();
        assert_eq!(s.run("bond_server", &up(&ip)).0, XDP_REDIRECT, "the flow");
        let other = Ip6::new(ORIGIN_A6, CONTENT6, L4::udp(40002, 53));
        s.expect_drop(
            "bond_server",
            "the one port taken",
            &up(&other),
            XDP_DROP,
            "no_free_port",
        );
        let flows6 = s.maps.flows6().unwrap();
        assert_eq!(flows6.len(), 1);
        let seen = flows6[0].1.flow.last_seen_ns;
        let t = Timeouts {
            tcp_established: Duration::from_secs(100),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            icmp: Duration::from_secs(20),
        };
        let sweep = |now| flows::sweep(&s.maps, &t, now).unwrap();
        assert_eq!(
            sweep(seen + 30 * S - 1),
            Sweep {
                scanned: 1,
                kept: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            sweep(seen + 30 * S),
            Sweep {
                scanned: 1,
                udp: 1,
                ports_returned: 1,
                ..Default::default()
            }
        );
        assert!(s.maps.flows6().unwrap().is_empty());
        let late = Ip6 {
            src: CONTENT6,
            dst: NAT_IP6,
            l4: L4::udp(53, 20000),
            ..ip.clone()
        };
        s.expect_drop(
            "bond_server",
            "a late reply",
            &late.frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "no_flow",
        );
        assert_eq!(
            s.run("bond_server", &up(&other)).0,
            XDP_REDIRECT,
            "the port, again"
        );
    });
}
