//! `bond_server` (XDP): NAT, wrapping replies, numbering, what it drops.

use super::*;

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
            seqs.entry(bond_of(&out).link)
                .or_default()
                .push(bond_of(&out).seq);
            let k: Kept = ring.get(&((first + i) % KEPT_SLOTS), 0).unwrap();
            assert_eq!(k.bytes(), Some(&out[BOND..]), "reply {i}: its copy");
            assert_eq!(
                k.idx,
                if bond_of(&out).link == l0.id {
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
        assert_eq!(bond_of(&out).seq, 0, "a pure ACK's number");
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
                    next_hop_mtu: LINK_MTU - (WRAP_LEN - 14) as u16,
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

/// A datagram in fragments, as the origin's kernel cuts it to fit bond0
/// and as a content server's path delivers it: the first fragment takes
/// the flow's port, the later ones (no ports) follow it by address,
/// protocol and identification, in either order upstream. The translated
/// fragments must be exactly the fragments of the translated datagram,
/// whose UDP checksum etherparse computes over the whole.
#[test]
fn server_carries_fragments_both_ways() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-frags", 20000..=20010);
        let mut ip = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 5353));
        ip.payload = (0..1200).map(|i| (i % 251) as u8).collect();
        let sent = fragments(&ip.bytes(), &[600]);
        let left = fragments(&unwrapped(&ip, 20000), &[600]);
        let up = |inner: &[u8]| {
            Up {
                inner: inner.to_vec(),
                ..Up::new(LINKS[0], &ip)
            }
            .frame()
        };
        let to_content = |ip: &[u8]| eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, ip);

        // Up, the later fragment first (links of different delays deliver
        // them so): it needs no flow and makes none.
        let want = to_content(&left[1]);
        s.expect(
            "bond_server",
            "later fragment up",
            &up(&sent[1]),
            XDP_REDIRECT,
            Some(&want),
        );
        assert_eq!(s.event("flows_created"), 0);
        let want = to_content(&left[0]);
        s.expect(
            "bond_server",
            "first fragment up",
            &up(&sent[0]),
            XDP_REDIRECT,
            Some(&want),
        );
        assert_eq!(s.event("flows_created"), 1);
        // A later fragment of someone else's datagram is still checked as
        // any packet: a spoofed source is dropped.
        let mut spoof = sent[1].clone();
        spoof[12..16].copy_from_slice(&ORIGIN_B.octets());
        fix_ipv4_checksum(&mut spoof);
        s.expect_drop(
            "bond_server",
            "later fragment, spoofed",
            &up(&spoof),
            XDP_DROP,
            "inner_spoof",
        );

        // Down: the reply in fragments. A later fragment before its first
        // is no flow's yet (the server host's own, for its kernel).
        let mut r = reply(&ip, 20000);
        r.payload = (0..1100).map(|i| (i % 13) as u8).collect();
        let came = fragments(&r.bytes(), &[504]);
        let goes = fragments(&translated(&ip, &r), &[504]);
        let frame = |ip: &[u8]| eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, ip);
        s.expect(
            "bond_server",
            "later fragment first",
            &frame(&came[1]),
            XDP_PASS,
            Some(&frame(&came[1])),
        );
        // (On whichever link the schedule picks: the bytes are checked for
        // the link the bond header names.)
        for (i, what) in [(0, "first fragment down"), (1, "later fragment down")] {
            let (v, out) = s.run("bond_server", &frame(&came[i]));
            assert_eq!(v, XDP_REDIRECT, "{what}: verdict");
            let link = *LINKS[..2]
                .iter()
                .find(|l| l.id == bond_of(&out).link)
                .unwrap_or_else(|| panic!("{what}: on link {}", bond_of(&out).link));
            let neigh = link.mac.expect("a link with a neighbour");
            let want = wrapped_for(ORIGIN_A, &goes[i], link, (neigh, WAN_DEV_MAC));
            assert_wrapped_checksums(&want, what);
            assert_bytes(&out, &want, what);
        }
        // The same identification from another host is not that datagram.
        let mut other = came[1].clone();
        other[12..16].copy_from_slice(&CONTENT_2.octets());
        fix_ipv4_checksum(&mut other);
        s.expect(
            "bond_server",
            "later fragment, another sender",
            &frame(&other),
            XDP_PASS,
            Some(&frame(&other)),
        );
        assert_eq!(s.nonzero_drops(), vec![("inner_spoof", 1)]);
    });
}

/// A reply too big for the links once wrapped: with DF the sender is told
/// the MTU (see above); without, it goes to the agent's splitter, which
/// sends the pieces back in (`bond_common::frag`), or is dropped and
/// counted when no splitter is reading. A piece from the splitter that
/// still does not fit is not sent back to it.
#[test]
fn server_hands_replies_too_big_without_df_to_the_splitter() {
    use bond_common::maps::Hold;
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-split", 20000..=20010);
        let request = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 443));
        expect_up(&s, "request", LINKS[0], &request, 20000);
        let mut r = reply(&request, 20000);
        r.payload = vec![7; usize::from(LINK_MTU)];
        let mut big = r.bytes();
        set_fragment(&mut big, false, 0);
        let big = eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &big);
        s.expect_drop("bond_server", "no splitter", &big, XDP_DROP, "too_big");

        let split = |ifindex, alive: bool| Hold {
            ifindex,
            _pad: 0,
            alive_until_ns: if alive { u64::MAX } else { 0 },
        };
        s.maps.set_hold("S_SPLIT", split(99, false)).unwrap();
        s.expect_drop(
            "bond_server",
            "a splitter gone quiet",
            &big,
            XDP_DROP,
            "too_big",
        );
        s.maps.set_hold("S_SPLIT", split(99, true)).unwrap();
        s.expect(
            "bond_server",
            "to the splitter",
            &big,
            XDP_REDIRECT,
            Some(&big),
        );
        assert_eq!(s.event("split"), 1);
        // Its first fragment is followed already: the rest may come
        // straight from the sender while the splitter works.
        let mut first = fragments(&r.bytes(), &[1456]);
        let later = first.pop().unwrap();
        let first = eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &first[0]);
        s.expect(
            "bond_server",
            "a first fragment too big",
            &first,
            XDP_REDIRECT,
            Some(&first),
        );
        let (v, out) = s.run(
            "bond_server",
            &eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &later),
        );
        assert_eq!(
            (v, out.len()),
            (XDP_REDIRECT, 14 + WRAP_LEN - 14 + later.len()),
            "the later fragment, wrapped"
        );
        assert_eq!(s.event("split"), 2);
        // Back from the splitter and still too big: dropped. (Test runs
        // arrive on the loopback device, ifindex 1.)
        s.maps.set_hold("S_SPLIT", split(1, true)).unwrap();
        s.expect_drop(
            "bond_server",
            "too big from the splitter",
            &big,
            XDP_DROP,
            "too_big",
        );
        assert_eq!(s.event("split"), 2);
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

/// Replies reach a flow only from the remote endpoints its origin sent to
/// on it (address-and-port-dependent filtering, RFC 4787): the first, and
/// any other once the origin sends to it; a stranger, or a known host from
/// another port, is dropped and counted (`filtered`) before anything is
/// charged to a link.
#[test]
fn server_lets_in_replies_only_from_where_the_origin_sent() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-filter", 20000..=20010);
        let [l0, l1, _] = LINKS;
        let to_content = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 443));
        expect_up(&s, "first datagram", l0, &to_content, 20000);
        expect_down(&s, "reply from where it went", &to_content, 20000, l0);

        let stranger = |src: Ipv4Addr, sport: u16| {
            let r = srv::reply(&to_content, 20000);
            Ip {
                src,
                l4: r.l4.with_src_port(sport),
                ..r
            }
            .frame(CNT_DEV_MAC, CONTENT_MAC)
        };
        let stats = s.maps.server_link_stats(0).unwrap();
        for (what, src, sport) in [
            ("the same host from another port", CONTENT, 444),
            ("another host from the same port", CONTENT_2, 443),
            ("another host", Ipv4Addr::new(192, 0, 2, 99), 53),
        ] {
            s.expect_drop(
                "bond_server",
                what,
                &stranger(src, sport),
                XDP_DROP,
                "filtered",
            );
        }
        assert_eq!(
            s.maps.server_link_stats(0).unwrap(),
            stats,
            "nothing charged"
        );

        // The origin sends from the same port to a second host: one flow,
        // and that host's replies come in too, as do the first's still.
        let to_second = Ip::new(ORIGIN_A, CONTENT_2, L4::udp(40000, 443));
        expect_up(&s, "to a second host", l0, &to_second, 20000);
        expect_down(&s, "reply from the second host", &to_second, 20000, l1);
        expect_down(&s, "reply from the first host", &to_content, 20000, l0);
        assert_eq!(s.maps.flows().unwrap().len(), 1);
        s.expect_drop(
            "bond_server",
            "the second host from another port",
            &stranger(CONTENT_2, 444),
            XDP_DROP,
            "filtered",
        );

        // ICMP echo: the replies of the host pinged, no one else's.
        let ping = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 0x77, seq: 1 });
        expect_up(&s, "echo request", l0, &ping, 20001);
        expect_down(&s, "echo reply", &ping, 20001, l1);
        let forged = Ip {
            src: CONTENT_2,
            ..srv::reply(&ping, 20001)
        };
        s.expect_drop(
            "bond_server",
            "echo reply from another host",
            &forged.frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "filtered",
        );
        assert_eq!(
            s.nonzero_drops(),
            vec![("filtered", 5)],
            "every stranger counted, nothing else"
        );
    });
}

/// A host sweeping the dedicated ports gets nothing to an origin: ports
/// with a flow filter it, the rest have no flow.
#[test]
fn server_gives_a_port_sweep_nothing() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-sweep", 20000..=20003);
        let [l0, _, _] = LINKS;
        for (i, origin) in [ORIGIN_A, ORIGIN_B].into_iter().enumerate() {
            let up = Ip::new(origin, CONTENT, L4::udp(40000, 443));
            expect_up(&s, "a flow", l0, &up, 20000 + i as u16);
        }
        let sweeper = Ipv4Addr::new(192, 0, 2, 66);
        for port in 20000..=20003u16 {
            for sport in [443, 40000] {
                let probe = Ip::new(sweeper, NAT_IP, L4::udp(sport, port));
                let (verdict, _) = s.run("bond_server", &probe.frame(CNT_DEV_MAC, CONTENT_MAC));
                assert_eq!(verdict, XDP_DROP, "port {port} from {sweeper}:{sport}");
            }
        }
        assert_eq!(
            s.nonzero_drops(),
            vec![("no_flow", 4), ("filtered", 4)],
            "two ports with a flow (filtered), two without"
        );
        for idx in 0..3 {
            let sent = s.maps.server_link_stats(idx).unwrap().down_pkts;
            assert_eq!(sent, 0, "link {idx} sent the sweep something");
        }
    });
}

/// A permit outlives nothing: once a flow expires, the next flow on its
/// port lets in only its own remote endpoints, not the old flow's.
#[test]
fn server_forgets_an_expired_flows_permits() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        // One port, so the next flow gets the same one.
        let s = srv::setup("server-stale-permit", 20000..=20000);
        let [l0, _, _] = LINKS;
        let a1 = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 443));
        let a2 = Ip::new(ORIGIN_A, CONTENT_2, L4::udp(40000, 443));
        expect_up(&s, "A to the first host", l0, &a1, 20000);
        expect_up(&s, "A to the second host (a permit)", l0, &a2, 20000);
        let keys: Vec<_> = s.maps.flows().unwrap().into_iter().map(|f| f.0).collect();
        assert_eq!(s.maps.remove_flows_if(keys, |_, _| true).unwrap().len(), 1);

        let b = Ip::new(ORIGIN_B, CONTENT, L4::udp(5000, 443));
        expect_up(&s, "B takes the port", l0, &b, 20000);
        let old = srv::reply(&a2, 20000).frame(CNT_DEV_MAC, CONTENT_MAC);
        s.expect_drop(
            "bond_server",
            "the old flow's second host",
            &old,
            XDP_DROP,
            "filtered",
        );
        expect_down(&s, "B's own reply", &b, 20000, l0);
    });
}

/// A member's packet to a destination the deny policy names is dropped
/// and counted before it makes a flow; any covering prefix denies; an
/// emptied policy lets it through again.
#[test]
fn server_refuses_members_packets_to_denied_destinations() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-deny", 20000..=20010);
        let [l0, _, _] = LINKS;
        let policy = [(Ipv4Addr::new(192, 0, 2, 1), 32), (ip4("203.0.113.0"), 30)];
        s.maps.set_deny(&policy).unwrap();
        let mut sorted = policy.to_vec();
        sorted.sort();
        assert_eq!(s.maps.deny().unwrap(), sorted);
        for dst in [CONTENT, NAT_IP, Ipv4Addr::new(192, 0, 2, 1)] {
            let p = Ip::new(ORIGIN_A, dst, L4::udp(40000, 443));
            s.expect_drop(
                "bond_server",
                &format!("to {dst}"),
                &Up::new(l0, &p).frame(),
                XDP_DROP,
                "denied",
            );
        }
        assert!(
            s.maps.flows().unwrap().is_empty(),
            "no flow for a denied packet"
        );
        // Outside the /30, and with the policy emptied, packets go.
        let outside = Ip::new(ORIGIN_A, CONTENT_2, L4::udp(40000, 443));
        expect_up(&s, "outside the denied prefixes", l0, &outside, 20000);
        s.maps.set_deny(&[]).unwrap();
        assert_eq!(s.maps.deny().unwrap(), []);
        let p = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 443));
        expect_up(&s, "once the policy is emptied", l0, &p, 20001);
    });
}

/// ICMP errors about a flow's packets reach its origin: time exceeded
/// (traceroute), port unreachable, fragmentation needed (path MTU), about
/// UDP, TCP and echo, with 8 bytes of the packet or more; the error's
/// destination, the embedded source address and port, and every checksum
/// as if the origin had sent the packet itself (exact bytes, built apart).
#[test]
fn server_sends_icmp_errors_about_a_flow_back_to_its_origin() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-icmp-errors", 20000..=20010);
        let [l0, l1, _] = LINKS;
        let router = ip4("203.0.113.254");
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 53));
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40001, 443));
        let ping = Ip::new(ORIGIN_A, CONTENT, L4::EchoRequest { id: 0x99, seq: 3 });
        expect_up(&s, "UDP up", l0, &udp, 20000);
        expect_up(&s, "TCP up", l0, &tcp, 20001);
        expect_up(&s, "echo up", l0, &ping, 20002);
        use crate::IcmpError::*;
        // (what, from, error, packet, its dedicated port, its TTL where it
        // failed, bytes of it carried)
        let cases = [
            (
                "time exceeded, UDP",
                router,
                TimeExceeded,
                &udp,
                20000,
                1,
                28,
            ),
            (
                "port unreachable, all of the UDP",
                CONTENT,
                PortUnreachable,
                &udp,
                20000,
                63,
                999,
            ),
            (
                "fragmentation needed, TCP, 8 bytes",
                router,
                FragNeeded(1400),
                &tcp,
                20001,
                5,
                28,
            ),
            (
                "fragmentation needed, TCP with its checksum",
                router,
                FragNeeded(1280),
                &tcp,
                20001,
                5,
                48,
            ),
            (
                "time exceeded, echo",
                router,
                TimeExceeded,
                &ping,
                20002,
                1,
                28,
            ),
        ];
        for (i, (what, from, kind, p, port, ttl, n)) in cases.into_iter().enumerate() {
            let left = Ip {
                src: NAT_IP,
                ttl,
                l4: p.l4.with_src_port(port),
                ..p.clone()
            };
            let error = error_about(from, kind, &left, n);
            let mine = Ip { ttl, ..p.clone() };
            let link = [l0, l1][i % 2];
            let want = error_for_origin(&error, &mine, n, link);
            let frame = error.frame(CNT_DEV_MAC, CONTENT_MAC);
            s.expect("bond_server", what, &frame, XDP_REDIRECT, Some(&want));
            assert_wrapped_checksums(&want, what);
        }
        assert_eq!(s.event("icmp_errors_relayed"), cases.len() as u64);
        assert_eq!(s.nonzero_drops(), vec![]);
    });
}

/// An ICMP error about a port without a flow, or about a packet to a host
/// the origin never sent to, is dropped and counted; one about the
/// server's own traffic is the kernel's; one cut short is truncated.
#[test]
fn server_drops_icmp_errors_about_strangers_and_passes_its_own() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-icmp-strangers", 20000..=20010);
        let [l0, _, _] = LINKS;
        let udp = Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 53));
        expect_up(&s, "UDP up", l0, &udp, 20000);
        let router = ip4("203.0.113.254");
        let left = |dst: Ipv4Addr, src: Ipv4Addr, port: u16| Ip {
            src,
            dst,
            l4: L4::udp(port, 53),
            ..udp.clone()
        };
        let error = |p: &Ip, n| {
            error_about(router, IcmpError::TimeExceeded, p, n).frame(CNT_DEV_MAC, CONTENT_MAC)
        };
        let cases = [
            (
                "no flow on the port",
                error(&left(CONTENT, NAT_IP, 20005), 28),
                "no_flow",
            ),
            (
                "a host the origin never sent to",
                error(&left(CONTENT_2, NAT_IP, 20000), 28),
                "filtered",
            ),
            (
                "fewer than 8 bytes of it",
                error(&left(CONTENT, NAT_IP, 20000), 27),
                "truncated",
            ),
        ];
        for (what, frame, reason) in cases {
            s.expect_drop("bond_server", what, &frame, XDP_DROP, reason);
        }
        let own = error(&left(CONTENT, WAN_IP, 20000), 28);
        s.expect(
            "bond_server",
            "about the server's own traffic",
            &own,
            XDP_PASS,
            Some(&own),
        );
        assert_eq!(s.event("icmp_errors_relayed"), 0);
        assert_eq!(s.maps.server_link_stats(0).unwrap().down_pkts, 0);
    });
}

/// An origin's packet whose TTL (hop limit) runs out at the server is
/// answered from the NAT address with ICMP time exceeded carrying its
/// header and first 8 bytes, wrapped down to the origin as any reply, and
/// makes no flow: traceroute sees the server as a hop. A fragment after
/// the first is only dropped (RFC 792), and past `EXPIRED_PER_SEC`
/// answers a second on a CPU so is every other.
#[test]
fn server_answers_what_expires_there_with_time_exceeded() {
    use bond_common::maps::EXPIRED_PER_SEC;
    use etherparse::{Icmpv6Type, PacketBuilder, icmpv6::TimeExceededCode};
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-expired", 20000..=20010);
        let [l0, l1, _] = LINKS;
        let on = |l: Link| (l.mac.expect("neighbour"), WAN_DEV_MAC);

        // A UDP traceroute probe with TTL 1, and one with TTL 0.
        for (i, ttl) in [1u8, 0].into_iter().enumerate() {
            let probe = Ip {
                ttl,
                ..Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 33434))
            };
            let mut answer = Ip {
                ttl: 64,
                id: 0,
                payload: probe.bytes()[..28].to_vec(),
                ..Ip::new(NAT_IP, ORIGIN_A, L4::Error(IcmpError::TimeExceeded))
            }
            .bytes();
            answer[6] &= !0x40; // no DF, as a router's ICMP errors
            fix_ipv4_checksum(&mut answer);
            let link = [l0, l1][i];
            let want = wrapped_for(ORIGIN_A, &answer, link, on(link));
            let what = format!("UDP, TTL {ttl}");
            let frame = Up::new(l0, &probe).frame();
            s.expect("bond_server", &what, &frame, XDP_REDIRECT, Some(&want));
            assert_wrapped_checksums(&want, &what);
        }
        assert!(s.maps.flows().unwrap().is_empty(), "no flow for a probe");

        // IPv6: ICMPv6 Time Exceeded from the IPv6 NAT address.
        let probe6 = Ip6 {
            hop: 1,
            ..Ip6::new(ORIGIN_A6, CONTENT6, L4::EchoRequest { id: 7, seq: 1 })
        };
        let mut answer6 = Vec::new();
        PacketBuilder::ipv6(NAT_IP6.octets(), ORIGIN_A6.octets(), 255)
            .icmpv6(Icmpv6Type::TimeExceeded(TimeExceededCode::HopLimitExceeded))
            .write(&mut answer6, &probe6.bytes()[..48])
            .unwrap();
        let want6 = wrapped_for(ORIGIN_A, &answer6, l0, on(l0));
        let frame6 = Up::v6(l1, ORIGIN_A, &probe6).frame();
        let what = "echo over IPv6, hop limit 1";
        s.expect("bond_server", what, &frame6, XDP_REDIRECT, Some(&want6));
        assert_checksums6(&want6[WRAP_LEN..], what);
        assert_eq!(s.event("time_exceeded_sent"), 3);
        assert_eq!(
            s.nonzero_drops(),
            vec![("ttl_exceeded", 3)],
            "each probe counted"
        );

        // A fragment after the first: no answer.
        let later = Ip {
            ttl: 1,
            frag_offset: 8,
            ..Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 33434))
        };
        let what = "a later fragment, TTL 1";
        s.expect_drop(
            "bond_server",
            what,
            &Up::new(l0, &later).frame(),
            XDP_DROP,
            "ttl_exceeded",
        );
        assert_eq!(s.event("time_exceeded_sent"), 3);

        // The limit: this CPU's second allows EXPIRED_PER_SEC answers.
        let frame = Up::new(
            l0,
            &Ip {
                ttl: 1,
                ..Ip::new(ORIGIN_A, CONTENT, L4::udp(40000, 33434))
            },
        )
        .frame();
        let verdicts: Vec<u32> = (0..EXPIRED_PER_SEC)
            .map(|_| s.run("bond_server", &frame).0)
            .collect();
        let answered = verdicts.iter().filter(|&&v| v == XDP_REDIRECT).count() as u64;
        assert!(
            (EXPIRED_PER_SEC - 3..EXPIRED_PER_SEC).contains(&answered),
            "{answered} of {EXPIRED_PER_SEC} answered after 3: {verdicts:?}"
        );
        assert!(verdicts.iter().all(|&v| v == XDP_REDIRECT || v == XDP_DROP));
    });
}

#[test]
fn server_drops_bad_upstream_without_creating_flows() {
    use srv::*;
    type Edit = fn(&mut Up);
    let cases: [(&str, Edit, &str); 24] = [
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
        // Protocols bond does not carry (issue 19): refused and counted.
        (
            "GRE",
            |u| {
                u.inner[9] = 47;
                fix_ipv4_checksum(&mut u.inner);
            },
            "unsupported_proto",
        ),
        (
            "ESP without NAT traversal",
            |u| {
                u.inner[9] = 50;
                fix_ipv4_checksum(&mut u.inner);
            },
            "unsupported_proto",
        ),
        (
            "SCTP",
            |u| {
                u.inner[9] = 132;
                fix_ipv4_checksum(&mut u.inner);
            },
            "unsupported_proto",
        ),
        // Version 6 on an IPv4 packet: read as IPv6 (`bond_server6`), its
        // payload length is the IPv4 identification, past the frame.
        ("inner version 6", |u| u.inner[0] = 0x60, "inner_bad_header"),
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
        s.maps
            .set_nat_blocks(COMMUNITY, &srv::share(0, [20007]))
            .unwrap();
        expect_up(&s, "once the community has a port", LINKS[0], &ip, 20007);
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
        let cases: [(&str, Edit, &str); 5] = [
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
        // handed to the kernel still addressed to this host, with its TTL
        // as it came (the kernel's forwarding takes the hop off: once).
        let ip = Ip::new(ORIGIN_A, CONTENT_UNRESOLVED, L4::udp(40000, 53));
        let up = Up::new(l0, &ip);
        let unwrapped = Ip {
            src: NAT_IP,
            l4: ip.l4.with_src_port(20000),
            ..ip.clone()
        };
        let want = eth(
            up.outer.dst_mac,
            up.outer.src_mac,
            ETH_P_IP,
            &unwrapped.bytes(),
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

// ------------------------------------------------------------------ IPv6 --

/// Inner IPv6 through the server, both ways (`bond_server6`, reached by a
/// tail call): TCP, UDP and ICMPv6 echo from an origin leave from the IPv6
/// NAT address and a dedicated port, one hop older; their replies go back
/// wrapped to the origin's IPv6 address and port. The exact bytes are
/// built by etherparse, whose TCP, UDP and ICMPv6 checksums cover the
/// pseudo-header the rewrite changes.
#[test]
fn server_nats_ipv6_tcp_udp_and_echo_both_ways() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-nat6", 20000..=20010);
        let l4s = [
            L4::tcp(40000, 443),
            L4::udp(40001, 53),
            L4::EchoRequest { id: 0x4242, seq: 7 },
        ];
        for (i, l4) in l4s.into_iter().enumerate() {
            let what = format!("{l4:?}");
            let ip = Ip6::new(ORIGIN_A6, CONTENT6, l4);
            let nat = 20000 + i as u16;
            let up = Up::v6(LINKS[0], ORIGIN_A, &ip);
            let left = Ip6 {
                src: NAT_IP6,
                hop: ip.hop - 1,
                l4: l4.with_src_port(nat),
                ..ip.clone()
            }
            .frame(CONTENT_MAC, CNT_DEV_MAC);
            assert_checksums6(&left[14..], &what);
            s.expect(
                "bond_server",
                &format!("{what} up"),
                &up.frame(),
                XDP_REDIRECT,
                Some(&left),
            );

            let reply = Ip6 {
                src: CONTENT6,
                dst: NAT_IP6,
                l4: l4.reply().with_dst_port(nat),
                payload: b"reply over IPv6".to_vec(),
                ..ip.clone()
            };
            let (v, out) = s.run("bond_server", &reply.frame(CNT_DEV_MAC, CONTENT_MAC));
            assert_eq!(v, XDP_REDIRECT, "{what} down: verdict");
            let link = *LINKS[..2]
                .iter()
                .find(|l| l.id == bond_of(&out).link)
                .unwrap_or_else(|| panic!("{what}: on link {}", bond_of(&out).link));
            let inner = Ip6 {
                dst: ORIGIN_A6,
                hop: reply.hop - 1,
                l4: l4.reply(),
                ..reply.clone()
            }
            .bytes();
            assert_checksums6(&inner, &what);
            let neigh = link.mac.expect("a link with a neighbour");
            let want = wrapped_for(ORIGIN_A, &inner, link, (neigh, WAN_DEV_MAC));
            assert_bytes(&out, &want, &format!("{what} down"));
        }
        assert_eq!(s.event("flows_created"), 3);
        assert_eq!(s.nonzero_drops(), vec![]);
        // The ports came from the one queue: an IPv4 flow takes the next.
        expect_up(
            &s,
            "IPv4 after IPv6",
            LINKS[0],
            &Ip::new(ORIGIN_A, CONTENT, L4::udp(40009, 53)),
            20003,
        );
    });
}

/// What the IPv6 program refuses or leaves alone: replies from where the
/// origin did not send (filtered, as for IPv4), to ports without a flow,
/// replies too big for the links (answered with Packet Too Big), members'
/// packets to denied prefixes, extension headers; the host's own IPv6
/// passes untouched. Without an IPv6 NAT address, members' IPv6 is
/// dropped.
#[test]
fn server_filters_and_refuses_ipv6_as_ipv4() {
    use bond_common::maps::ServerConfig;
    use etherparse::{Icmpv6Type, PacketBuilder};
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-refuse6", 20000..=20010);
        let ip = Ip6::new(ORIGIN_A6, CONTENT6, L4::udp(40001, 53));
        let up = |ip: &Ip6| Up::v6(LINKS[0], ORIGIN_A, ip).frame();
        let (v, _) = s.run("bond_server", &up(&ip));
        assert_eq!(v, XDP_REDIRECT, "the flow");
        let reply = |from: Ipv6Addr, sport: u16, port: u16, n: usize| {
            Ip6 {
                src: from,
                dst: NAT_IP6,
                l4: L4::udp(sport, port),
                payload: vec![9; n],
                ..ip.clone()
            }
            .frame(CNT_DEV_MAC, CONTENT_MAC)
        };
        s.expect_drop(
            "bond_server",
            "another host",
            &reply(CONTENT6_2, 53, 20000, 8),
            XDP_DROP,
            "filtered",
        );
        s.expect_drop(
            "bond_server",
            "another port",
            &reply(CONTENT6, 54, 20000, 8),
            XDP_DROP,
            "filtered",
        );
        s.expect_drop(
            "bond_server",
            "no flow",
            &reply(CONTENT6, 53, 20004, 8),
            XDP_DROP,
            "no_flow",
        );
        let own = reply(CONTENT6, 53, 8080, 8);
        s.expect(
            "bond_server",
            "not a dedicated port",
            &own,
            XDP_PASS,
            Some(&own),
        );

        // Too big once wrapped: Packet Too Big, MTU 1444, from the NAT
        // address to the sender, carrying its header and first 8 bytes.
        let fits = usize::from(LINK_MTU) - (WRAP_LEN - 14) - 48;
        let (v, _) = s.run("bond_server", &reply(CONTENT6, 53, 20000, fits));
        assert_eq!(v, XDP_REDIRECT, "the largest reply that fits");
        let big = reply(CONTENT6, 53, 20000, fits + 1);
        let mut want = Vec::new();
        PacketBuilder::ethernet2(CNT_DEV_MAC, CONTENT_MAC)
            .ipv6(NAT_IP6.octets(), CONTENT6.octets(), 255)
            .icmpv6(Icmpv6Type::PacketTooBig {
                mtu: u32::from(LINK_MTU) - (WRAP_LEN - 14) as u32,
            })
            .write(&mut want, &big[14..14 + 48])
            .unwrap();
        let before = s.event("frag_needed_sent");
        s.expect(
            "bond_server",
            "one byte too big",
            &big,
            XDP_REDIRECT,
            Some(&want),
        );
        assert_eq!(s.event("frag_needed_sent"), before + 1);

        // Members' packets: a denied prefix, an extension header.
        s.maps
            .set_deny6(&[(Ipv6Addr::new(0x2001, 0xdb8, 0x71, 0, 0, 0, 0, 0), 64)])
            .unwrap();
        s.expect_drop("bond_server", "denied", &up(&ip), XDP_DROP, "denied");
        // The agent's "local": neighbours of the denied, but not them.
        let local: Vec<(Ipv6Addr, u8)> = vec![
            (Ipv6Addr::UNSPECIFIED, 128),
            (Ipv6Addr::LOCALHOST, 128),
            (NAT_IP6, 128),
            ("::ffff:0.0.0.0".parse().unwrap(), 96),
            ("fe80::2404:ff:fea3:5f8a".parse().unwrap(), 128),
            ("fe80::c852:b6ff:fe53:f55c".parse().unwrap(), 128),
            ("fe80::".parse().unwrap(), 10),
            ("ff00::".parse().unwrap(), 8),
        ];
        s.maps.set_deny6(&local).unwrap();
        let (v, _) = s.run("bond_server", &up(&ip));
        assert_eq!(
            v,
            XDP_REDIRECT,
            "only what is listed is denied: {:?}",
            s.nonzero_drops()
        );
        s.maps.set_deny6(&[]).unwrap();
        let mut hop_by_hop = ip.bytes();
        hop_by_hop[6] = 0;
        s.expect_drop(
            "bond_server",
            "an extension header",
            &Up {
                inner: hop_by_hop,
                ..Up::new(LINKS[0], &Ip::new(ORIGIN_A, CONTENT, ip.l4))
            }
            .frame(),
            XDP_DROP,
            "unsupported_proto",
        );

        // No IPv6 NAT address: not carried.
        let cfg = s.maps.server_config().unwrap();
        s.maps
            .set_server_config(ServerConfig {
                nat_ip6: [0; 16],
                ..cfg
            })
            .unwrap();
        s.expect_drop(
            "bond_server",
            "no IPv6 here",
            &up(&ip),
            XDP_DROP,
            "inner_not_ipv4",
        );
        let r = reply(CONTENT6, 53, 20000, 8);
        s.expect("bond_server", "no IPv6 here, down", &r, XDP_PASS, Some(&r));
    });
}

/// ICMPv6 errors about a flow's packet go back to its origin, as ICMP
/// ones do: the error's destination, the embedded source and port become
/// the origin's, the embedded checksum (where carried) and the ICMPv6
/// checksum follow. The expected errors are built by etherparse about the
/// packet as the origin sent it (one hop older, as it left the server).
#[test]
fn server_sends_icmpv6_errors_about_a_flow_back_to_its_origin() {
    use etherparse::{
        Icmpv6Type as T, PacketBuilder,
        icmpv6::{DestUnreachableCode, TimeExceededCode},
    };
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-errors6", 20000..=20010);
        let router: Ipv6Addr = "2001:db8:71::fe".parse().unwrap();
        let cases = [
            (
                L4::udp(40001, 53),
                T::DestinationUnreachable(DestUnreachableCode::Port),
                48,
            ),
            (
                L4::tcp(40000, 443),
                T::TimeExceeded(TimeExceededCode::HopLimitExceeded),
                usize::MAX,
            ),
            (
                L4::EchoRequest { id: 0x4242, seq: 3 },
                T::PacketTooBig { mtu: 1280 },
                usize::MAX,
            ),
        ];
        for (i, (l4, kind, n)) in cases.into_iter().enumerate() {
            let what = format!("{kind:?} about {l4:?}");
            let ip = Ip6::new(ORIGIN_A6, CONTENT6, l4);
            let up = Up::v6(LINKS[0], ORIGIN_A, &ip);
            assert_eq!(
                s.run("bond_server", &up.frame()).0,
                XDP_REDIRECT,
                "{what}: flow"
            );
            let nat = 20000 + i as u16;
            let left = Ip6 {
                src: NAT_IP6,
                hop: ip.hop - 1,
                l4: l4.with_src_port(nat),
                ..ip.clone()
            }
            .bytes();
            let mine = Ip6 {
                hop: ip.hop - 1,
                ..ip.clone()
            }
            .bytes();
            let error = |to: Ipv6Addr, hop: u8, about: &[u8]| {
                let mut out = Vec::new();
                PacketBuilder::ipv6(router.octets(), to.octets(), hop)
                    .icmpv6(kind)
                    .write(&mut out, &about[..n.min(about.len())])
                    .unwrap();
                out
            };
            let frame = eth(
                CNT_DEV_MAC,
                CONTENT_MAC,
                ETH_P_IPV6,
                &error(NAT_IP6, 60, &left),
            );
            let (v, out) = s.run("bond_server", &frame);
            assert_eq!(v, XDP_REDIRECT, "{what}: verdict {:?}", s.nonzero_drops());
            let link = *LINKS[..2]
                .iter()
                .find(|l| l.id == bond_of(&out).link)
                .unwrap();
            let inner = error(ORIGIN_A6, 59, &mine);
            assert_checksums6(&inner, &what);
            let want = wrapped_for(ORIGIN_A, &inner, link, (link.mac.unwrap(), WAN_DEV_MAC));
            assert_bytes(&out, &want, &what);
        }
        assert_eq!(s.event("icmp_errors_relayed"), 3);

        // Strangers: a port without a flow, a host the origin never sent
        // to; and an error about the server's own traffic is its kernel's.
        let ip = Ip6::new(ORIGIN_A6, CONTENT6, L4::udp(40001, 53));
        let about = |src: Ipv6Addr, dst: Ipv6Addr, port: u16| {
            let left = Ip6 {
                src,
                dst,
                l4: L4::udp(port, 53),
                ..ip.clone()
            }
            .bytes();
            let mut out = Vec::new();
            PacketBuilder::ethernet2(CNT_DEV_MAC, CONTENT_MAC)
                .ipv6(router.octets(), NAT_IP6.octets(), 60)
                .icmpv6(T::DestinationUnreachable(DestUnreachableCode::Port))
                .write(&mut out, &left[..48])
                .unwrap();
            out
        };
        let no_flow = about(NAT_IP6, CONTENT6, 20009);
        s.expect_drop("bond_server", "no flow", &no_flow, XDP_DROP, "no_flow");
        let stranger = about(NAT_IP6, CONTENT6_2, 20000);
        s.expect_drop(
            "bond_server",
            "never sent there",
            &stranger,
            XDP_DROP,
            "filtered",
        );
        let own = about("2001:db8:71::9".parse().unwrap(), CONTENT6, 20000);
        s.expect("bond_server", "the host's own", &own, XDP_PASS, Some(&own));
        assert_eq!(s.event("icmp_errors_relayed"), 3);
    });
}

/// A link that has only IPv6 (`LINK_V6`): its DATA_UP arrives in outer
/// IPv6 to the server's IPv6 address and leaves unwrapped exactly as an
/// IPv4 link's would; the reply is wrapped in outer IPv6 back to the
/// link's address and port (zero UDP checksum, RFC 6935). DATA from
/// another IPv6 address or port, or in IPv4 from the link's placeholder
/// address, is refused; control messages go to the agent's socket.
#[test]
fn server_carries_a_link_over_ipv6_both_ways() {
    use bond_common::maps::{LINK_VALID, ServerLink};
    use etherparse::PacketBuilder;
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-outer6", 20000..=20010);
        let l = LINKS[2];
        let link = ServerLink {
            ip: 0,
            port: l.port,
            community: COMMUNITY,
            link: l.id,
            flags: LINK_VALID,
            owner: 0,
        };
        s.maps.set_server_link6(l.idx, LINK6, link).unwrap();
        s.maps
            .set_down_paths(COMMUNITY, &[(l.idx, 5, 0)], TEST_BACKLOG_US, 0)
            .unwrap();
        // The IPv4 form's pieces, under an outer IPv6 header.
        let over6 = |src: Ipv6Addr, sport: u16, up: &Up| {
            let v4 = up.frame();
            let mut f = Vec::new();
            PacketBuilder::ethernet2(ROUTER_MAC, WAN_DEV_MAC)
                .ipv6(src.octets(), WAN_IP6.octets(), 50)
                .udp(sport, PORT)
                .write(&mut f, &v4[42..])
                .unwrap();
            f[..6].copy_from_slice(&WAN_DEV_MAC);
            f[6..12].copy_from_slice(&ROUTER_MAC);
            f
        };
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let up = Up::new(l, &tcp);
        let want = eth(CONTENT_MAC, CNT_DEV_MAC, ETH_P_IP, &unwrapped(&tcp, 20000));
        let what = "DATA_UP over IPv6";
        s.expect(
            "bond_server",
            what,
            &over6(LINK6, l.port, &up),
            XDP_REDIRECT,
            Some(&want),
        );
        assert_checksums(ipv4_of(&want), what);

        // The reply: outer IPv6 from the server's address to the link's.
        let r = reply(&tcp, 20000);
        let v4 = wrapped_for(ORIGIN_A, &translated(&tcp, &r), l, (LINK6_MAC, WAN_DEV_MAC));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(WAN_DEV_MAC, LINK6_MAC)
            .ipv6(WAN_IP6.octets(), LINK6.octets(), 64)
            .udp(PORT, l.port)
            .write(&mut want, &v4[42..])
            .unwrap();
        want[..6].copy_from_slice(&LINK6_MAC);
        want[6..12].copy_from_slice(&WAN_DEV_MAC);
        want[54 + 6..54 + 8].copy_from_slice(&[0, 0]); // no UDP checksum
        let frame = r.frame(CNT_DEV_MAC, CONTENT_MAC);
        s.expect(
            "bond_server",
            "the reply over IPv6",
            &frame,
            XDP_REDIRECT,
            Some(&want),
        );
        assert_eq!(s.maps.server_link_stats(l.idx).unwrap().down_pkts, 1);

        // Refused: another address, another port, the IPv4 placeholder.
        let other = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x66);
        let placeholder = Up {
            outer: Outer {
                src: Ipv4Addr::UNSPECIFIED,
                ..up.outer
            },
            ..up.clone()
        };
        for (what, f) in [
            ("another IPv6 address", over6(other, l.port, &up)),
            ("another port", over6(LINK6, l.port + 1, &up)),
            ("in IPv4 from the placeholder", placeholder.frame()),
        ] {
            s.expect_drop("bond_server", what, &f, XDP_DROP, "unknown_source");
        }
        let mut cut = over6(LINK6, l.port, &up);
        cut.truncate(14 + 40 + 8 + 10);
        s.expect_drop(
            "bond_server",
            "cut in the bond header",
            &cut,
            XDP_DROP,
            "outer_bad_header",
        );
        // A control message: the agent's socket.
        let mut ctl = up.clone();
        ctl.bond.kind = ANNOUNCE;
        let ctl = over6(LINK6, l.port, &ctl);
        s.expect(
            "bond_server",
            "ANNOUNCE over IPv6",
            &ctl,
            XDP_PASS,
            Some(&ctl),
        );
    });
}

/// In an ISP tier: bond traffic of a community another node owns (a
/// director steered it here by an older view) is passed on to that node,
/// data and control alike, changed only in its Ethernet addresses, and
/// counted; the node's own communities are served as before; what
/// another node passed on is never passed on again; an owner in a slot
/// with no node is a drop.
#[test]
fn server_passes_on_what_another_node_owns() {
    use bond_common::maps::NodeSlot;
    use bond_datapath::Owners;
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let s = srv::setup("server-pass-on", 20000..=20010);
        let other = NodeSlot {
            ifindex: 9,
            dst_mac: [0x02, 0x0e, 0, 0, 0, 0x02],
            src_mac: [0x02, 0x0e, 0, 0, 0, 0x01],
        };
        s.maps.set_node(Owners::Node, 3, other).unwrap();
        s.maps.set_owner(Owners::Node, 8, Some(3)).unwrap();
        let [l0, ..] = LINKS;
        let tcp = Ip::new(ORIGIN_A, CONTENT, L4::tcp(40000, 443));
        let of = |kind, community| {
            let mut up = Up::new(l0, &tcp);
            up.bond = Bond::data(kind, community, l0.id, ORIGIN_A, 0x40, 1);
            up.frame()
        };
        let passed = |frame: &[u8]| {
            let mut f = frame.to_vec();
            f[..6].copy_from_slice(&other.dst_mac);
            f[6..12].copy_from_slice(&other.src_mac);
            f
        };
        for (what, frame) in [("data", of(DATA_UP, 8)), ("an announce", of(ANNOUNCE, 8))] {
            s.expect(
                "bond_server",
                what,
                &frame,
                XDP_REDIRECT,
                Some(&passed(&frame)),
            );
        }
        let events = s.maps.server_events().unwrap();
        assert!(events.contains(&("forwarded_to_owner", 2)), "{events:?}");
        // Its own community: NAT as ever.
        expect_up(&s, "its own", l0, &tcp, 20000);
        // From a node (its MAC known): this node's view gives the
        // community to a third; never passed on twice.
        let mut from_node = of(DATA_UP, 8);
        from_node[6..12].copy_from_slice(&[0x02, 0x0e, 0, 0, 0, 0x03]);
        s.maps
            .set_node_mac([0x02, 0x0e, 0, 0, 0, 0x03], true)
            .unwrap();
        let p = "bond_server";
        s.expect_drop(p, "from a node", &from_node, XDP_DROP, "owner_disagrees");
        // The MAC forgotten (the node left), it is passed on.
        s.maps
            .set_node_mac([0x02, 0x0e, 0, 0, 0, 0x03], false)
            .unwrap();
        let (v, _) = s.run(p, &from_node);
        assert_eq!(v, XDP_REDIRECT);
        // An owner whose slot is empty.
        s.maps.set_owner(Owners::Node, 8, Some(4)).unwrap();
        s.expect_drop(p, "empty slot", &of(DATA_UP, 8), XDP_DROP, "no_owner");
        // Back to this node: served here (its session check refuses a
        // stranger's token, as for any community).
        s.maps.set_owner(Owners::Node, 8, None).unwrap();
        s.expect_drop(p, "ours again", &of(DATA_UP, 8), XDP_DROP, "unknown_source");
    });
}

/// The pool of the pool tests: two addresses after the fixtures' content
/// servers, blocks of 4 ports; the community holds blocks 20000 and
/// 20008 on the second address.
fn pool_setup(tag: &str, order: u16) -> (Obj, Ipv4Addr, Vec<u16>) {
    use srv::*;
    let s = srv::setup(tag, []);
    let cfg = s.maps.server_config().unwrap();
    let base = Ipv4Addr::new(203, 0, 113, 64);
    s.maps
        .set_server_config(ServerConfig {
            nat_ip: base.into(),
            nat_count: 2,
            nat_block: 4,
            nat_order: order,
            // The share's blocks of 4 from 20000 and 20008: its last port,
            // 20011, is the pool's too (the fixtures' range ends at 20010).
            port_max: 20011,
            ..cfg
        })
        .unwrap();
    s.maps
        .set_nat_blocks(COMMUNITY, &srv::share(1, [20000, 20008]))
        .unwrap();
    let ports = (20000..20004).chain(20008..20012).collect();
    (s, Ipv4Addr::new(203, 0, 113, 65), ports)
}

#[test]
fn server_pool_gives_a_community_its_address_and_ports_of_its_blocks_only() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let (s, second, share) = pool_setup("server-pool", bond_common::maps::NAT_RANDOM);
        // Four flows of eight ports: each from the community's address, on
        // a port of its blocks, no port twice.
        let mut taken = std::collections::HashSet::new();
        for p in 0..4 {
            let ip = Ip::new(ORIGIN_A, CONTENT, L4::udp(1000 + p, 53));
            let (v, out) = s.run("bond_server", &Up::new(LINKS[0], &ip).frame());
            assert_eq!(v, XDP_REDIRECT, "flow {p}");
            let inner = ipv4_of(&out);
            assert_eq!(
                inner[12..16],
                second.octets(),
                "flow {p}: from the community's address"
            );
            let port = u16::from_be_bytes([inner[20], inner[21]]);
            assert!(
                share.contains(&port),
                "flow {p}: port {port} outside the blocks"
            );
            assert!(taken.insert(port), "flow {p}: port {port} twice");
            assert_checksums(inner, "a pool flow");
        }
        for (_, f) in s.maps.flows().unwrap() {
            assert_eq!(f.nat_index, 1, "the flow keeps its address");
        }
        for (k, _) in s.maps.nat_entries().unwrap() {
            assert_eq!(k.index, 1, "its way back names the address");
        }
        // A reply to the community's address and a flow's port goes back
        // to its origin; the same port on the pool's other address is no
        // flow's.
        let (k, f) = s.maps.flows().unwrap()[0];
        let request = Ip::new(ORIGIN_A, CONTENT, L4::udp(k.port, 53));
        let to = |dst| Ip {
            dst,
            ..reply(&request, f.nat_port)
        };
        let (v, out) = s.run("bond_server", &to(second).frame(CNT_DEV_MAC, CONTENT_MAC));
        assert_eq!(v, XDP_REDIRECT, "reply to the flow's address");
        assert_wrapped_checksums(&out, "a pool reply");
        let first = Ipv4Addr::new(203, 0, 113, 64);
        s.expect_drop(
            "bond_server",
            "the flow's port on the pool's other address",
            &to(first).frame(CNT_DEV_MAC, CONTENT_MAC),
            XDP_DROP,
            "no_flow",
        );
        // An address past the pool is not the server's to answer.
        let past = Ipv4Addr::new(203, 0, 113, 66);
        let (v, _) = s.run("bond_server", &to(past).frame(CNT_DEV_MAC, CONTENT_MAC));
        assert_eq!(v, XDP_PASS, "past the pool");
        // The old address of the fixtures is not in this pool either.
        let (v, _) = s.run("bond_server", &to(NAT_IP).frame(CNT_DEV_MAC, CONTENT_MAC));
        assert_eq!(v, XDP_PASS, "before the pool");
    });
}

#[test]
fn server_pool_in_order_takes_each_port_of_the_blocks_then_refuses() {
    use srv::*;
    isolate::in_netns(|_| {
        srv::network();
        let (s, second, share) = pool_setup("server-pool-seq", NAT_SEQUENTIAL);
        for (p, want) in (0..).zip(&share) {
            let ip = Ip::new(ORIGIN_B, CONTENT, L4::udp(2000 + p, 53));
            let (v, out) = s.run("bond_server", &Up::new(LINKS[1], &ip).frame());
            assert_eq!(v, XDP_REDIRECT, "flow {p}");
            let inner = ipv4_of(&out);
            assert_eq!(inner[12..16], second.octets());
            assert_eq!(
                u16::from_be_bytes([inner[20], inner[21]]),
                *want,
                "flow {p}"
            );
        }
        let ip = Ip::new(ORIGIN_B, CONTENT, L4::udp(2100, 53));
        s.expect_drop(
            "bond_server",
            "a ninth flow on eight ports",
            &Up::new(LINKS[1], &ip).frame(),
            XDP_DROP,
            "no_free_port",
        );
        // The same ports are free for another protocol.
        let tcp = Ip::new(ORIGIN_B, CONTENT, L4::tcp(2100, 443));
        let (v, out) = s.run("bond_server", &Up::new(LINKS[1], &tcp).frame());
        assert_eq!(v, XDP_REDIRECT, "TCP on UDP's ports");
        assert_eq!(
            u16::from_be_bytes([ipv4_of(&out)[20], ipv4_of(&out)[21]]),
            20000
        );
        // No share, no flow: the agent has not given the community its
        // ports (or has taken them back).
        s.maps.remove_nat_blocks(COMMUNITY).unwrap();
        let ip = Ip::new(ORIGIN_B, CONTENT, L4::udp(2200, 53));
        s.expect_drop(
            "bond_server",
            "a community without a share",
            &Up::new(LINKS[1], &ip).frame(),
            XDP_DROP,
            "no_free_port",
        );
    });
}

#[test]
fn server_pool_holds_more_flows_than_one_address_has_ports() {
    use srv::*;
    // Two communities on the pool's two addresses, 33,000 UDP flows each:
    // 66,000 flows, more than the 64,512 ports (1024-65535) of one
    // address; the same port numbers serve both, one on each address.
    const FLOWS: u16 = 33_000;
    const OTHER: u32 = COMMUNITY + 1;
    isolate::in_netns(|_| {
        srv::network();
        let (s, second, _) = pool_setup("server-pool-many", NAT_SEQUENTIAL);
        let cfg = s.maps.server_config().unwrap();
        s.maps
            .set_server_config(ServerConfig {
                port_min: 20_000,
                port_max: 20_000 + 33 * 1024 - 1,
                nat_block: 1024,
                ..cfg
            })
            .unwrap();
        let blocks = |_| (0..33).map(|b| 20_000 + b * 1024);
        s.maps
            .set_nat_blocks(COMMUNITY, &srv::share(1, blocks(())))
            .unwrap();
        s.maps
            .set_nat_blocks(OTHER, &srv::share(0, blocks(())))
            .unwrap();
        // The other community: one link, one logged-on origin.
        let link = LINKS[2];
        s.maps
            .set_server_link(
                7,
                ServerLink {
                    ip: Ipv4Addr::new(198, 51, 100, 40).into(),
                    port: 7040,
                    community: OTHER,
                    link: 1,
                    flags: LINK_VALID,
                    owner: 0,
                },
            )
            .unwrap();
        let origin = Ipv4Addr::new(10, 0, 1, 40);
        s.maps.set_session(OTHER, origin, 0x4040).unwrap();
        let first = Ipv4Addr::new(203, 0, 113, 64);
        for (c, addr) in [(COMMUNITY, second), (OTHER, first)] {
            for p in 0..FLOWS {
                let (src, l) = if c == COMMUNITY {
                    (ORIGIN_A, LINKS[0])
                } else {
                    (origin, link)
                };
                let ip = Ip::new(src, CONTENT, L4::udp(1000 + p, 53));
                let mut up = Up::new(l, &ip);
                if c == OTHER {
                    up.outer.src = Ipv4Addr::new(198, 51, 100, 40);
                    up.outer.sport = 7040;
                    up.bond = Bond::data(DATA_UP, OTHER, 1, origin, 0x40, 0x4040);
                }
                let (v, out) = s.run("bond_server", &up.frame());
                assert_eq!(v, XDP_REDIRECT, "community {c}, flow {p}");
                let inner = ipv4_of(&out);
                assert_eq!(inner[12..16], addr.octets(), "community {c}, flow {p}");
            }
        }
        let flows = s.maps.flows().unwrap();
        assert_eq!(flows.len(), 2 * usize::from(FLOWS));
        let nat = s.maps.nat_entries().unwrap();
        assert_eq!(nat.len(), flows.len(), "one way back per flow");
        let mut per_address = [std::collections::HashSet::new(), Default::default()];
        for (k, e) in nat {
            assert!(per_address[usize::from(k.index)].insert(k.port));
            assert_eq!(e.community, if k.index == 1 { COMMUNITY } else { OTHER });
        }
        assert_eq!(per_address[0], per_address[1], "the same ports, twice");
        assert_eq!(s.nonzero_drops(), vec![]);
    });
}
