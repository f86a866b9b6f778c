//! Every program on hostile input: frames cut at every length, bad header
//! fields at every entry point, every bond kind, every frame size, and
//! lengths that lie.

use super::*;

// ------------------------------------------- bond_terminal's ways in --

/// What `bond_terminal` does with a good wrapped frame, by docs/architecture.md's
/// packet path; each derives the exact output from the input frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
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

/// One way a wrapped frame comes into `bond_terminal`, with a valid frame.
pub(crate) struct Entry {
    pub(crate) name: &'static str,
    pub(crate) frame: Vec<u8>,
    pub(crate) path: Path,
}

impl Entry {
    /// Whether it comes to one of this host's relay ports (else the data
    /// port).
    fn relay_port(&self) -> bool {
        term_out::port(&self.frame) != term::DATA_PORT
    }
}

pub(crate) fn terminal_entries() -> [Entry; 4] {
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
        38..WRAP_LEN => Want::Drop("truncated"),
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
    let cases: [(&str, Edit, Fate, Fate); 18] = [
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
        // first router (it answers TTL 0 and 1 with time exceeded, see
        // `server_answers_what_expires_there_with_time_exceeded`). Unwrapped
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
            "inner version 6 on IPv4",
            |f| f[INNER] = 0x60,
            Fate::Drop("inner_bad_header"),
            Fate::Through,
        ),
        (
            "inner version 5",
            |f| f[INNER] = 0x50,
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
const BAD_BOND_FIELDS: [(&str, usize, u8, &str); 8] = [
    ("magic high byte", 0, 0xB1, "bad_magic"),
    ("magic low byte", 1, 0x4E, "bad_magic"),
    ("version 0", 2, 0, "bad_version"),
    ("version 3", 2, 3, "bad_version"),
    ("version 5", 2, 5, "bad_version"),
    ("version 255", 2, 255, "bad_version"),
    ("reserved high byte", 10, 0x01, "bad_flags"),
    ("reserved low byte", 11, 0x80, "bad_flags"),
];

#[test]
fn every_kind_and_bad_bond_field_at_every_entry_point() {
    use srv::*;
    isolate::in_netns(|_| {
        // The entry points that read a bond header (`bond_wrap` writes
        // one, replies to the server's NAT address carry none).
        // The terminal: only DATA_UP (1) and DATA_DOWN (2) are the
        // programs'; every other kind goes to the agent's socket
        // untouched (docs/architecture.md, "Wire format"), where it must be signed.
        let t = term::setup("terminal-kinds");
        let c = t.counters();
        for e in terminal_entries() {
            // Each kind with no sequence and with one: DATA's only.
            for (kind, seq) in (0..=255u8).flat_map(|k| [(k, 0), (k, 0x80)]) {
                let f = edited(&e.frame, |f| (f[BOND + 3], f[BOND + 9]) = (kind, seq));
                let for_me = bond_of(&f).origin() == u32::from(term::LAN_IP);
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
            let f = edited(&up, |f| (f[BOND + 3], f[BOND + 9]) = (kind, seq));
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
        38..WRAP_LEN => Want::Drop("truncated"),
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
        // An ICMP error about the UDP flow's packet, where link 0's queue
        // (one reply) ends first: until its type can be read it is like
        // any ICMP to the NAT address (the kernel's), then the IPv4 header
        // says more came.
        let udp = Ip::new(ORIGIN_A, CONTENT, l4s[1]);
        let left = Ip {
            src: NAT_IP,
            ttl: 1,
            l4: l4s[1].with_src_port(20001),
            ..udp.clone()
        };
        let error = error_about(ip4("203.0.113.254"), IcmpError::TimeExceeded, &left, 28);
        let mine = Ip { ttl: 1, ..udp };
        let frame = error.frame(CNT_DEV_MAC, CONTENT_MAC);
        let whole = Want::Out(XDP_REDIRECT, error_for_origin(&error, &mine, 28, l0));
        for len in 0..=frame.len() {
            let what = format!("ICMP error cut at {len}");
            let want = match len {
                0..14 => Want::Refused(EINVAL),
                14..36 => Want::Untouched,
                _ if len == frame.len() => whole.clone(),
                _ => Want::Drop("inner_bad_header"),
            };
            s.check(&c, "bond_server", &what, &frame[..len], &want);
        }
        assert_eq!(s.maps.flows().unwrap().len(), 3);

        // IPv6 inside, through `bond_server6`: upstream the same as IPv4
        // (the outer checks come first); downstream, nothing is judged
        // until the IPv6 header and the 8 bytes of the transport header
        // that hold the port are in (62 bytes), then the IPv6 header says
        // more came.
        for (i, l4) in l4s.into_iter().enumerate() {
            let ip = Ip6::new(ORIGIN_A6, CONTENT6, l4);
            let nat = 20003 + i as u16;
            let frame = Up::v6(LINKS[0], ORIGIN_A, &ip).frame();
            let left = Ip6 {
                src: NAT_IP6,
                hop: ip.hop - 1,
                l4: l4.with_src_port(nat),
                ..ip.clone()
            };
            let whole = Want::Out(XDP_REDIRECT, left.frame(CONTENT_MAC, CNT_DEV_MAC));
            for len in 0..=frame.len() {
                let what = format!("upstream IPv6 {l4:?} cut at {len}");
                let want = server_up_cut(&frame, len, &whole);
                s.check(&c, "bond_server", &what, &frame[..len], &want);
            }
            let r = Ip6 {
                src: CONTENT6,
                dst: NAT_IP6,
                l4: l4.reply().with_dst_port(nat),
                ..ip.clone()
            };
            let frame = r.frame(CNT_DEV_MAC, CONTENT_MAC);
            for len in 0..frame.len() {
                let what = format!("downstream IPv6 {:?} cut at {len}", r.l4);
                let want = match len {
                    0..14 => Want::Refused(EINVAL),
                    14..62 => Want::Untouched,
                    _ => Want::Drop("inner_bad_header"),
                };
                s.check(&c, "bond_server", &what, &frame[..len], &want);
            }
            // Whole: wrapped on whichever link the schedule picks.
            let (v, out) = s.run("bond_server", &frame);
            assert_eq!(v, XDP_REDIRECT, "IPv6 reply {l4:?}");
            let link = *LINKS[..2]
                .iter()
                .find(|l| l.id == bond_of(&out).link)
                .unwrap();
            let inner = Ip6 {
                dst: ORIGIN_A6,
                hop: r.hop - 1,
                l4: l4.reply(),
                ..r.clone()
            };
            let want = wrapped_for(
                ORIGIN_A,
                &inner.bytes(),
                link,
                (link.mac.unwrap(), WAN_DEV_MAC),
            );
            assert_bytes(&out, &want, &format!("IPv6 reply {l4:?}"));
        }
        assert_eq!(s.maps.flows6().unwrap().len(), 3);
        let st: Vec<_> = (0..2)
            .map(|i| s.maps.server_link_stats(i).unwrap())
            .collect();
        assert_eq!((st[0].up_pkts, st[1].up_pkts), (6, 0), "upstream links");
        assert_eq!(st[0].down_pkts + st[1].down_pkts, 7, "downstream");
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
            // A later fragment whose first was not seen is no flow's: the
            // server host's own, for its kernel to put together.
            (
                "fragment, offset",
                |f| set_fragment(&mut f[OUTER_IP..], false, 8),
                Want::Untouched,
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
    // Its first router is the server, which answers TTL 0 and 1 with
    // time exceeded, drops options and other versions, counted, and
    // carries fragments (see `server_drops_bad_upstream_without_creating_flows`
    // and `server_answers_what_expires_there_with_time_exceeded`); the origin's
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
        // The wrap sends what fits the link once wrapped (1500 - 56 bytes).
        let most = 1500 - (WRAP_LEN - 14);
        for (n, fits) in [(most, true), (most + 1, false), (TC_FRAME_MAX - 14, false)] {
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

/// Each program stays well inside the verifier's budget (1,000,000
/// instructions processed per program): under half of it, so that
/// growth shows here long before a kernel refuses a program. The counts
/// are printed for whoever changes a program.
#[test]
fn programs_stay_well_inside_the_verifier_budget() {
    const BUDGET: u32 = 1_000_000 / 2;
    isolate::pinned(|_| {
        for (obj, progs) in [
            (
                Obj::terminal("budget-terminal"),
                &[
                    "bond_wrap",
                    "bond_terminal",
                    "bond_relay",
                    "bond_terminal_l3",
                ][..],
            ),
            (
                {
                    let mut s = Obj::server("budget-server");
                    bond_datapath::server_jumps(&mut s.ebpf).expect("the jump table");
                    s
                },
                // (`bond_server` among them: `bond_server_in6` hands back.)
                &bond_common::maps::JUMP_PROGRAMS[..],
            ),
        ] {
            for &name in progs {
                let info = obj
                    .ebpf
                    .program(name)
                    .expect("program")
                    .info()
                    .expect("program info");
                let n = info
                    .verified_instruction_count()
                    .expect("the kernel reports verified instructions");
                eprintln!("{name}: {n} instructions verified");
                assert!(n < BUDGET, "{name}: {n} of the verifier's 1,000,000");
            }
        }
    });
}

/// An agent upgraded across a new tail call finds the older, smaller jump
/// table still pinned: it is made again at its new size, and every slot
/// filled (reused, it would refuse the new slot and the agent not start).
#[test]
fn a_jump_table_pinned_by_an_older_build_is_made_again() {
    use aya::maps::MapInfo;
    use bond_common::maps::{JUMP_SLOTS, name::S_JUMP};
    isolate::pinned(|_| {
        let pin = PinDir::new("old-jumps");
        let object = bond_datapath::ebpf::SERVER;
        let old = datapath::load_with_sizes(object, pin.path(), &[(S_JUMP, JUMP_SLOTS - 1)])
            .expect("load as an older build");
        drop(old);
        let size = || {
            MapInfo::from_pin(pin.path().join(S_JUMP))
                .unwrap()
                .max_entries()
        };
        assert_eq!(size(), JUMP_SLOTS - 1, "pinned by the older build");
        let mut ebpf = datapath::load(object, pin.path()).expect("load");
        bond_datapath::server_jumps(&mut ebpf).expect("every slot filled");
        assert_eq!(size(), JUMP_SLOTS);
    });
}
