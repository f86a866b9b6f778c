//! `bond_director` (XDP): bond traffic to the front address steered by
//! its community to the owning node, by the Ethernet header alone;
//! everything else left to the kernel; what it cannot steer dropped and
//! counted.

use bond_common::maps::{DirectorConfig, NodeSlot};
use bond_datapath::Owners;

use super::*;

const FRONT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const FRONT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
const PORT: u16 = 7700;
const LINK_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const WAN_MAC: Mac = [0x02, 0xd1, 0, 0, 0, 0x01];
const LINK_MAC: Mac = [0x02, 0x1a, 0, 0, 0, 0x11];
/// Two nodes behind two interfaces of the director.
const N0: NodeSlot = NodeSlot {
    ifindex: 11,
    dst_mac: [0x02, 0x0e, 0, 0, 0, 0x01],
    src_mac: [0x02, 0xd1, 0, 0, 0, 0x11],
};
const N1: NodeSlot = NodeSlot {
    ifindex: 12,
    dst_mac: [0x02, 0x0e, 0, 0, 0, 0x02],
    src_mac: [0x02, 0xd1, 0, 0, 0, 0x12],
};

fn director(tag: &str) -> Obj {
    let d = Obj::load(bond_datapath::ebpf::DIRECTOR, tag, &["bond_director"]);
    let mut front6 = [0u8; 16];
    front6.copy_from_slice(&FRONT6.octets());
    d.maps
        .set_director_config(DirectorConfig {
            front_ip: u32::from(FRONT),
            port: PORT,
            _pad: 0,
            front_ip6: front6,
        })
        .unwrap();
    d.maps.set_node(Owners::Director, 0, N0).unwrap();
    d.maps.set_node(Owners::Director, 1, N1).unwrap();
    d.maps.set_owner(Owners::Director, 7, Some(0)).unwrap();
    d.maps.set_owner(Owners::Director, 8, Some(1)).unwrap();
    d
}

fn outer(dst: Ipv4Addr, dport: u16) -> Outer {
    Outer {
        dst_mac: WAN_MAC,
        src_mac: LINK_MAC,
        src: LINK_IP,
        dst,
        sport: 7701,
        dport,
        ttl: 60,
        id: 1,
        more_fragments: false,
    }
}

fn to_front(kind: u8, community: u32) -> Vec<u8> {
    let inner = Ip::new(
        Ipv4Addr::new(10, 0, 1, 1),
        Ipv4Addr::new(203, 0, 113, 2),
        L4::tcp(40000, 443),
    )
    .bytes();
    let bond = Bond::data(kind, community, 1, Ipv4Addr::new(10, 0, 1, 1), 5, 0xab);
    wrapped(&outer(FRONT, PORT), &bond, &inner)
}

/// The frame as it leaves for `node`: its MACs, nothing else changed.
fn steered(frame: &[u8], node: NodeSlot) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&node.dst_mac);
    f[6..12].copy_from_slice(&node.src_mac);
    f
}

#[test]
fn director_steers_each_community_to_its_owner_and_nothing_else() {
    let d = director("director-steer");
    let (c7, c8) = (to_front(DATA_UP, 7), to_front(DATA_UP, 8));
    d.expect(
        "bond_director",
        "community 7",
        &c7,
        XDP_REDIRECT,
        Some(&steered(&c7, N0)),
    );
    d.expect(
        "bond_director",
        "community 8",
        &c8,
        XDP_REDIRECT,
        Some(&steered(&c8, N1)),
    );
    // The id is 32 bits: one that shares community 7's low 16 bits is
    // another community, steered by its own entry, and so is the largest.
    for (c, node) in [(7 + (1 << 16), 1), (u32::MAX, 0)] {
        d.maps.set_owner(Owners::Director, c, Some(node)).unwrap();
        let f = to_front(DATA_UP, c);
        let to = if node == 1 { N1 } else { N0 };
        d.expect(
            "bond_director",
            &format!("community {c}"),
            &f,
            XDP_REDIRECT,
            Some(&steered(&f, to)),
        );
        d.maps.set_owner(Owners::Director, c, None).unwrap();
    }
    let mut owners = d.maps.owners(Owners::Director).unwrap();
    owners.sort();
    assert_eq!(owners, [(7, 0), (8, 1)], "the table as it was");
    // A control message (its kind the agent's) goes the same way: the
    // owner's agent logs the terminal on.
    let ad = to_front(ANNOUNCE, 8);
    d.expect(
        "bond_director",
        "announce",
        &ad,
        XDP_REDIRECT,
        Some(&steered(&ad, N1)),
    );
    let s0 = d.maps.director_stats(0).unwrap();
    let s1 = d.maps.director_stats(1).unwrap();
    let wide = to_front(DATA_UP, 0).len() as u64;
    assert_eq!((s0.up_pkts, s0.up_bytes), (2, c7.len() as u64 + wide));
    assert_eq!(
        (s1.up_pkts, s1.up_bytes),
        (3, (c8.len() + ad.len()) as u64 + wide)
    );
    // The owner moves: the next packet follows at once.
    d.maps.set_owner(Owners::Director, 7, Some(1)).unwrap();
    d.expect(
        "bond_director",
        "moved",
        &c7,
        XDP_REDIRECT,
        Some(&steered(&c7, N1)),
    );
    // Over IPv6 to the front's IPv6 address.
    let mut v6 = ipv6_udp_frame(WAN_MAC, LINK_MAC, PORT);
    v6[38..54].copy_from_slice(&FRONT6.octets());
    v6.truncate(14 + 40 + 8);
    v6.extend_from_slice(&Bond::data(DATA_UP, 8, 2, Ipv4Addr::new(10, 0, 1, 1), 5, 1).bytes());
    d.expect(
        "bond_director",
        "IPv6",
        &v6,
        XDP_REDIRECT,
        Some(&steered(&v6, N1)),
    );
    assert_eq!(d.nonzero_drops(), vec![]);
}

#[test]
fn director_leaves_what_is_not_bond_traffic_to_the_front_to_the_kernel() {
    let d = director("director-pass");
    let c7 = to_front(DATA_UP, 7);
    let inner = &c7[WRAP_LEN..];
    let bond = |o: Outer| wrapped(&o, &Bond::data(DATA_UP, 7, 1, LINK_IP, 5, 1), inner);
    for (what, frame) in [
        ("ARP", arp_frame(LINK_MAC, LINK_IP, FRONT)),
        ("another port", bond(outer(FRONT, PORT + 1))),
        (
            "another address",
            bond(outer(Ipv4Addr::new(198, 51, 100, 2), PORT)),
        ),
        (
            "UDP elsewhere",
            udp_frame(WAN_MAC, LINK_MAC, (LINK_IP, 5353), (FRONT, 53)),
        ),
        ("IPv6 elsewhere", ipv6_udp_frame(WAN_MAC, LINK_MAC, PORT)),
        ("no IP header", c7[..20].to_vec()),
    ] {
        d.expect("bond_director", what, &frame, XDP_PASS, Some(&frame));
    }
    let tcp = Ip::new(LINK_IP, FRONT, L4::tcp(40000, PORT)).frame(WAN_MAC, LINK_MAC);
    d.expect(
        "bond_director",
        "TCP to the front",
        &tcp,
        XDP_PASS,
        Some(&tcp),
    );
    assert_eq!(d.nonzero_drops(), vec![]);
    assert_eq!(d.maps.director_stats(0).unwrap().up_pkts, 0);
}

#[test]
fn director_drops_and_counts_what_it_cannot_steer() {
    // On one CPU: the log's "first drop" is per CPU.
    let logged = isolate::pinned(|_| drops_each_reason());
    // The first drop of each reason is logged, by name, and only the first.
    for reason in ["no_owner", "bad_magic", "truncated", "outer_bad_header"] {
        let n = logged
            .iter()
            .filter(|l| l.contains(&format!(" {reason} ")))
            .count();
        assert_eq!(n, 1, "{reason}: {logged:?}");
    }
}

fn drops_each_reason() -> Vec<String> {
    let mut d = director("director-drop");
    let p = "bond_director";
    d.expect_drop(p, "no owner", &to_front(DATA_UP, 9), XDP_DROP, "no_owner");
    // An owner whose node slot is empty (the node left).
    d.maps.set_owner(Owners::Director, 9, Some(5)).unwrap();
    d.expect_drop(p, "empty slot", &to_front(DATA_UP, 9), XDP_DROP, "no_owner");
    d.maps.set_owner(Owners::Director, 7, None).unwrap();
    d.expect_drop(
        p,
        "owner cleared",
        &to_front(DATA_UP, 7),
        XDP_DROP,
        "no_owner",
    );
    let mut bad = to_front(DATA_UP, 8);
    bad[14 + 28] ^= 0xff;
    d.expect_drop(p, "bad magic", &bad, XDP_DROP, "bad_magic");
    // Version 3's header had the community elsewhere: not steered by
    // what lies where version 4's is.
    let mut old = to_front(DATA_UP, 8);
    old[14 + 28 + 2] = 3;
    d.expect_drop(p, "version 3", &old, XDP_DROP, "bad_version");
    // A bond header cut after the magic: no community to read.
    let short = to_front(DATA_UP, 8)[..14 + 28 + 3].to_vec();
    d.expect_drop(p, "cut short", &short, XDP_DROP, "truncated");
    let frag = wrapped(
        &Outer {
            more_fragments: true,
            ..outer(FRONT, PORT)
        },
        &Bond::data(DATA_UP, 8, 1, LINK_IP, 5, 1),
        &[0u8; 40],
    );
    d.expect_drop(p, "fragment", &frag, XDP_DROP, "outer_bad_header");
    let mut opts = to_front(DATA_UP, 8);
    opts[14] = 0x46;
    d.expect_drop(p, "IPv4 options", &opts, XDP_DROP, "outer_bad_header");
    assert_eq!(d.maps.director_stats(1).unwrap().up_pkts, 0);
    d.logged()
}

/// A steered frame cut at every length: whatever ends before the front
/// address and protocol is the kernel's; a cut between there and the
/// community is dropped as truncated; from the community on it is
/// steered. Never anything else.
#[test]
fn director_takes_a_frame_cut_anywhere() {
    let d = director("director-cut");
    let full = to_front(DATA_UP, 8);
    for len in 14..=full.len() {
        let f = &full[..len];
        let what = format!("IPv4 cut at {len}");
        match len {
            ..34 => d.expect("bond_director", &what, f, XDP_PASS, Some(f)),
            34..50 => d.expect_drop("bond_director", &what, f, XDP_DROP, "truncated"),
            _ => d.expect(
                "bond_director",
                &what,
                f,
                XDP_REDIRECT,
                Some(&steered(f, N1)),
            ),
        }
    }
    let mut v6 = ipv6_udp_frame(WAN_MAC, LINK_MAC, PORT);
    v6[38..54].copy_from_slice(&FRONT6.octets());
    v6.truncate(14 + 40 + 8);
    v6.extend_from_slice(&Bond::data(DATA_UP, 7, 2, Ipv4Addr::new(10, 0, 1, 1), 5, 1).bytes());
    for len in 14..=v6.len() {
        let f = &v6[..len];
        let what = format!("IPv6 cut at {len}");
        match len {
            ..54 => d.expect("bond_director", &what, f, XDP_PASS, Some(f)),
            54..70 => d.expect_drop("bond_director", &what, f, XDP_DROP, "truncated"),
            _ => d.expect(
                "bond_director",
                &what,
                f,
                XDP_REDIRECT,
                Some(&steered(f, N0)),
            ),
        }
    }
}
