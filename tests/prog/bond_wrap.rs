//! `bond_wrap` (TC egress on the capture device): where each packet goes,
//! its numbering and copies, what it refuses.

use super::*;

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
            assert_eq!(bond_of(&out).link, link, "{what}: link byte");
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
            let bond = BOND;
            seqs.entry(bond_at(&out, bond).link)
                .or_default()
                .push(bond_at(&out, bond).seq);
            let k: Kept = ring.get(&((first + i) % KEPT_SLOTS), 0).unwrap();
            assert_eq!(k.bytes(), Some(&out[bond..]), "packet {i}: its copy");
            assert_eq!(
                k.idx,
                u32::from(bond_at(&out, bond).link),
                "packet {i}: the link"
            );
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
        assert_eq!(bond_of(&out).seq, 0, "a pure ACK's number");
        // Over IPv6 alike (numbered, the server's playout held every one
        // for the far link's delay, stretching the downloads' round trip).
        let ack6 = Ip6 {
            payload: Vec::new(),
            ..Ip6::new(
                "2001:db8:1::11".parse().unwrap(),
                "2001:db8:71::2".parse().unwrap(),
                L4::tcp(40000, 443),
            )
        }
        .bytes();
        let (v, out) = t.run("bond_wrap", &eth(BOND0_MAC, BOND0_MAC, ETH_P_IPV6, &ack6));
        assert_eq!(v, TC_ACT_REDIRECT);
        assert_eq!(bond_of(&out).seq, 0, "an IPv6 pure ACK's number");
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
            assert_eq!(bond_of(&out).link, want, "link {late} late: link byte");
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

        // SMALL carries 200-byte outer packets: 144 inner bytes fit, 145 not.
        let fits = 200 - (WRAP_LEN - 14);
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
            &sized(fits),
            TC_ACT_REDIRECT,
            None,
        );
        t.expect_drop(
            "bond_wrap",
            "one over the MTU",
            &sized(fits + 1),
            TC_ACT_SHOT,
            "too_big",
        );

        let s = term::stats(&t, SMALL);
        assert_eq!(
            (s.up_pkts, s.up_bytes),
            (1, fits as u64),
            "only the fitting packet counted"
        );
        for link in [A, B, C] {
            assert_eq!(term::stats(&t, link), LinkStats::default(), "link {link}");
        }
    });
}

/// An IPv6 packet routed into bond0 is wrapped as it is, as an IPv4 one:
/// the same outer header and bond header, the inner bytes untouched.
#[test]
fn wrap_carries_ipv6_as_it_is() {
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-v6");
        t.maps
            .set_up_paths(&[(A, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let v6 = Ip6::new(
            "2001:db8:1::11".parse().unwrap(),
            "2001:db8:71::2".parse().unwrap(),
            L4::tcp(40000, 443),
        )
        .bytes();
        let (v, out) = t.run("bond_wrap", &eth(BOND0_MAC, BOND0_MAC, ETH_P_IPV6, &v6));
        assert_eq!(v, TC_ACT_REDIRECT, "verdict");
        assert_bytes(&out, &expected(A, &v6), "IPv6 wrapped");
        assert_eq!(&out[WRAP_LEN..], &v6[..], "inner untouched");
    });
}

/// To an own link over IPv6 (`LINK_V6`) the wrap is outer IPv6 from the
/// link's address to the server's, its UDP checksum zero, for IPv4 and
/// IPv6 inside alike; the copy kept for a resend is the bond header and
/// the inner packet, as over IPv4.
#[test]
fn wrap_sends_over_an_own_link_over_ipv6() {
    use bond_common::maps::{KEPT_SLOTS, Kept, LINK_V6, LINK_VALID, name};
    use {term::*, wrap::*};
    isolate::pinned(|_| {
        let t = wrap::setup("wrap-outer6");
        t.maps.set_link6(C, WAN6).unwrap();
        let l = UpLink {
            flags: LINK_VALID | LINK_V6,
            ..up_link(C)
        };
        t.maps.set_up_link(C, l).unwrap();
        t.maps
            .set_up_paths(&[(C, 1_000, 0)], TEST_BACKLOG_US)
            .unwrap();
        let v4 = Ip::new(LAN_IP, CONTENT, L4::tcp(40000, 443)).bytes();
        let v6 = Ip6::new(
            "2001:db8:1::11".parse().unwrap(),
            "2001:db8:71::2".parse().unwrap(),
            L4::udp(40001, 53),
        )
        .bytes();
        let (ring, first) = t.maps.kept(name::T_KEPT, name::T_KEPT_NEXT).unwrap();
        for (i, (what, inner, ethertype)) in [
            ("IPv4 inside", &v4, ETH_P_IP),
            ("IPv6 inside", &v6, ETH_P_IPV6),
        ]
        .into_iter()
        .enumerate()
        {
            let want = over_ipv6(&expected(C, inner), WAN6, SERVER6, 64);
            let frame = eth(BOND0_MAC, BOND0_MAC, ethertype, inner);
            let (v, out) = t.run("bond_wrap", &frame);
            assert_eq!(v, TC_ACT_REDIRECT, "{what}: verdict");
            assert_bytes(&out, &want, what);
            let k: Kept = ring.get(&((first + i as u32) % KEPT_SLOTS), 0).unwrap();
            assert_eq!(k.bytes(), Some(&out[BOND + 20..]), "{what}: its copy");
        }
    });
}
