//! Mutants of every valid fixture, through every program: each is
//! dropped with one reason counted, or passed unchanged.

use super::*;
use crate::hostile::terminal_entries;

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
/// A wrapped IPv4 frame's lengths: outer, inner, and an inner UDP length.
const WRAPPED_LENS: [LenField; 4] = [
    OUTER_LENS[0],
    OUTER_LENS[1],
    INNER_LEN,
    (INNER + 24, INNER + 20),
];
/// A wrapped IPv6 frame's: outer, the inner payload length (which counts
/// from past the 40-byte header), and an inner UDP length.
const WRAPPED6_LENS: [LenField; 4] = [
    OUTER_LENS[0],
    OUTER_LENS[1],
    (INNER + 4, INNER + 40),
    (INNER + 44, INNER + 40),
];
/// A wrapped IPv4 frame over a link over IPv6: the outer payload and UDP
/// lengths, the inner total length and an inner UDP length.
const OVER6_LENS: [LenField; 4] = [
    (OUTER_IP + 4, OUTER_IP + 40),
    (OUTER_IP + 44, OUTER_IP + 40),
    (INNER + 20 + 2, INNER + 20),
    (INNER + 20 + 24, INNER + 40),
];
/// An IPv6 reply's payload length, and its UDP length.
const REPLY6_LENS: [LenField; 2] = [
    (OUTER_IP + 4, OUTER_IP + 40),
    (OUTER_IP + 44, OUTER_IP + 40),
];

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

/// `bond_terminal` with its link over IPv6 (`LINK_V6`) on mutants of
/// what that link brings (DATA_DOWN for a peer and for this host, in
/// outer IPv6 from the server) and of a peer's DATA_UP to it: each is
/// dropped under one reason, passed untouched, unwrapped or relayed
/// exactly as the IPv4 form would be (the one `bond_terminal` makes of
/// it), and what goes up leaves in outer IPv6.
#[test]
fn terminal_survives_mutants_over_ipv6() {
    use bond_common::maps::LINK_V6;
    use term::*;
    let t = term::setup("terminal-fuzz6");
    t.maps.set_link6(RELAY_LINK, WAN6).unwrap();
    let link = relay_link(RELAY_PORT, RELAY_LINK, 1500, LINK_V6);
    t.maps.set_relay_link(RELAY_PORT, link).unwrap();
    let c = t.counters();
    let over6 = |w: &Wrapped| over_ipv6(&w.frame(), SERVER6, WAN6, 60);
    let fixtures = [
        (over6(&down_from_server(PEER, PEER_TOKEN)), &OVER6_LENS[..]),
        (over6(&down_from_server(LAN_IP, TOKEN)), &OVER6_LENS[..]),
        (up_from_peer().frame(), &OUTER_LENS[..]),
    ];
    // The IPv4 form `bond_terminal` makes of DATA from the server over
    // IPv6 to the link's port; `None` for anything else.
    let ipv4_form = |f: &[u8]| -> Option<Vec<u8>> {
        let ours = f.len() >= 14 + 40 + 8
            && get16(f, 12) == ETH_P_IPV6
            && f[20] == 17
            && f[22..38] == SERVER6.octets()
            && get16(f, 56) == RELAY_PORT;
        if !ours {
            return None;
        }
        let mut ip = etherparse::Ipv4Header::new(
            get16(f, 18),
            f[21],
            etherparse::IpNumber::UDP,
            SERVER.octets(),
            [0; 4],
        )
        .ok()?;
        ip.dont_fragment = true;
        ip.header_checksum = ip.calc_header_checksum();
        let mut v4 = f[..12].to_vec();
        v4.extend_from_slice(&ETH_P_IP.to_be_bytes());
        v4.extend_from_slice(&ip.to_bytes());
        v4.extend_from_slice(&f[54..]);
        Some(v4)
    };
    let mut rng = Rng(SEED);
    let mut tally = Tally::default();
    let mut before = c.read();
    for k in 0..MUTANTS {
        let (fixture, lens) = &fixtures[k % fixtures.len()];
        let input = mutant(&mut rng, fixture, lens, 4200);
        let what = format!("mutant {k} {input:02x?}");
        let (v, out) = t.try_run("bond_terminal", &input).expect("test_run");
        let after = c.read();
        let grew = after.drops_since(&before);
        before = after;
        one_reason_per_drop(&what, v == XDP_DROP, &grew);
        let seen = ipv4_form(&input);
        let outcome = match (v, &seen) {
            (XDP_DROP, _) => "dropped",
            (XDP_PASS, _) if out == input => "untouched",
            (XDP_PASS, Some(f)) => {
                fuzz_check::unwrapped(&what, f, &out);
                "unwrapped"
            }
            // A DATA_UP to the relay port, from the server's address: a
            // relay takes it up whatever its source, over IPv6 here.
            (XDP_REDIRECT, Some(f)) if f[BOND + 3] == DATA_UP => {
                assert_eq!(term_out::port(f), RELAY_PORT, "{what}: port");
                let up = over_ipv6(&term_out::up(f), WAN6, SERVER6, 64);
                assert!(
                    out == up,
                    "{what}: relayed up\n got: {out:02x?}\nwant: {up:02x?}"
                );
                "relayed up"
            }
            (XDP_REDIRECT, Some(f)) => fuzz_check::relayed(&what, f, &out),
            (XDP_REDIRECT, None) => {
                // Up from a peer: readdressed as over IPv4, in outer IPv6.
                assert_eq!(input[BOND + 3], DATA_UP, "{what}: kind");
                assert_eq!(term_out::port(&input), RELAY_PORT, "{what}: port");
                assert!(input.len() + 20 <= 1500 + 14, "{what}: over the MTU");
                // (Compared whole: a relay stamps nothing, and a mutant's
                // send time of 0 is no open field.)
                let up = over_ipv6(&term_out::up(&input), WAN6, SERVER6, 64);
                assert!(
                    out == up,
                    "{what}: relayed up\n got: {out:02x?}\nwant: {up:02x?}"
                );
                "relayed up"
            }
            (v, _) => panic!("{what}: verdict {v}"),
        };
        tally.add(v, &grew, outcome);
    }
    eprintln!("terminal mutants over IPv6: {tally:#?}");
    for o in [
        "untouched",
        "unwrapped",
        "relayed up",
        "relayed down",
        "dropped",
    ] {
        assert!(tally.outcome(o) >= 200, "only {} {o}", tally.outcome(o));
    }
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
            TC_ACT_OK if out.len() + OUTER == input.len() => "unwrapped",
            TC_ACT_REDIRECT if out == eth([0; 6], [0; 6], ETH_P_IP, &input) => {
                assert_eq!(bond_of(&framed).origin(), u32::from(LAN_IP), "{what}: held");
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
    fn bond_ok(what: &str, f: &[u8], community: u32) {
        assert_eq!(get16(f, BOND), 0xB04D, "{what}: magic");
        assert_eq!(f[BOND + 2], bond_common::wire::VERSION, "{what}: version");
        assert_eq!(bond_of(f).community(), community, "{what}: community");
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
        assert_eq!(bond_of(input).origin(), u32::from(LAN_IP), "{what}: origin");
        let token = bond_of(input).token();
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
        // Compared whole: a relay stamps nothing, and a mutant's send time
        // of 0 is no open field.
        let whole = |want: Vec<u8>| {
            assert!(
                out == want,
                "{what}: relayed\n got: {out:02x?}\nwant: {want:02x?}"
            );
        };
        match input[BOND + 3] {
            DATA_UP => {
                assert!(input.len() <= mtu + 14, "{what}: over the link MTU");
                whole(term_out::up(input));
                "relayed up"
            }
            DATA_DOWN => {
                assert_eq!(bond_of(input).origin(), u32::from(PEER), "{what}: origin");
                whole(term_out::down(input));
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
        pub frags: BpfHashMap<&'a MapData, FragKey, FragFlow>,
        pub flows6: BpfHashMap<&'a MapData, Flow6Key, Flow6>,
        pub nat6: BpfHashMap<&'a MapData, NatKey, Nat6Entry>,
    }

    impl<'a> ServerMaps<'a> {
        pub fn new(s: &'a Obj) -> Self {
            let m = |n: &str| s.ebpf.map(n).unwrap_or_else(|| panic!("{n}"));
            Self {
                flows: BpfHashMap::try_from(m("S_FLOWS")).unwrap(),
                nat: BpfHashMap::try_from(m("S_NAT")).unwrap(),
                sessions: BpfHashMap::try_from(m("S_SESSIONS")).unwrap(),
                frags: BpfHashMap::try_from(m("S_FRAGS")).unwrap(),
                flows6: BpfHashMap::try_from(m("S_FLOWS6")).unwrap(),
                nat6: BpfHashMap::try_from(m("S_NAT6")).unwrap(),
            }
        }

        fn token(&self, community: u32, origin: u32) -> Option<u64> {
            let key = SessionKey::new(community, origin);
            self.sessions.get(&key, 0).ok().map(|s| s.token)
        }

        fn nat(&self, proto: u8, port: u16) -> Option<NatEntry> {
            let key = NatKey {
                proto,
                index: 0,
                port,
            };
            self.nat.get(&key, 0).ok()
        }
    }

    /// Whether the IPv4 packet at `ip` is a fragment after the first (no
    /// transport header).
    fn later_fragment(f: &[u8], ip: usize) -> bool {
        get16(f, ip + 6) & 0x1fff != 0
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
    pub fn up(what: &str, m: &ServerMaps, input: &[u8], out: &[u8], slow_path: bool) {
        use srv::*;
        let community = bond_of(input).community();
        let origin = bond_of(input).origin();
        let (src, sport) = (get32(input, OUTER_IP + 12), get16(input, OUTER_UDP));
        assert!(
            LINKS.iter().any(|l| u32::from(l.ip) == src
                && l.port == sport
                && l.id == bond_of(input).link
                && community == COMMUNITY),
            "{what}: not from a registered link"
        );
        let token = bond_of(input).token();
        assert_eq!(m.token(community, origin), Some(token), "{what}: token");
        if input[INNER] >> 4 == 6 {
            return up6(what, m, input, out, slow_path, (community, origin));
        }
        assert_eq!(get32(input, INNER + 12), origin, "{what}: inner source");
        let ip = &out[14..];
        assert_eq!(&ip[12..16], &NAT_IP.octets(), "{what}: source address");
        assert_eq!(
            &ip[16..20],
            &input[INNER + 16..INNER + 20],
            "{what}: destination"
        );
        // One hop less, taken here, or by the kernel on the slow path.
        let hop = u8::from(!slow_path);
        assert_eq!(ip[8], input[INNER + 8].wrapping_sub(hop), "{what}: TTL");
        if later_fragment(input, INNER) {
            // No ports, and no flow of its own: nothing else changes.
            assert_eq!(ip[20..], input[INNER + 20..], "{what}: fragment payload");
            return;
        }
        let proto = ip[9];
        let key = FlowKey::new(community, proto, origin, port_of(input, INNER, false));
        let flow = m
            .flows
            .get(&key, 0)
            .unwrap_or_else(|_| panic!("{what}: no flow"));
        assert_eq!(
            port_of(out, 14, false),
            flow.nat_port,
            "{what}: source port"
        );
        let back = NatEntry::new(community, origin, key.port);
        assert_eq!(m.nat(proto, flow.nat_port), Some(back), "{what}: NAT entry");
    }

    /// Wrapped downstream: for the origin the NAT entry of its port names,
    /// with that origin's token, on a link of the schedule.
    pub fn down(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        if get16(input, 12) == ETH_P_IPV6 {
            return down6(what, m, input, out);
        }
        assert_eq!(
            &input[30..34],
            &NAT_IP.octets(),
            "{what}: to the NAT address"
        );
        if is_icmp_error(input) {
            return down_error(what, m, input, out);
        }
        let proto = input[OUTER_IP + 9];
        if later_fragment(input, OUTER_IP) {
            // To the flow its datagram's first fragment went to.
            let key = FragKey {
                remote: get32(input, OUTER_IP + 12),
                id: get16(input, OUTER_IP + 4),
                proto,
                index: 0,
            };
            let f = m
                .frags
                .get(&key, 0)
                .unwrap_or_else(|_| panic!("{what}: no first fragment"));
            let e = m
                .nat(proto, f.nat_port)
                .unwrap_or_else(|| panic!("{what}: no NAT entry"));
            to_origin(what, m, &e, out);
            assert_eq!(out[INNER + 20..], input[OUTER_IP + 20..], "{what}: payload");
            return;
        }
        let e = m
            .nat(proto, port_of(input, 14, true))
            .unwrap_or_else(|| panic!("{what}: no NAT entry"));
        to_origin(what, m, &e, out);
        assert_eq!(port_of(out, INNER, true), e.port, "{what}: inner port");
        assert_eq!(
            &out[INNER + 12..INNER + 16],
            &input[26..30],
            "{what}: inner source"
        );
    }

    /// Whether a frame is an ICMP error with a plain IPv4 header.
    pub fn is_icmp_error(f: &[u8]) -> bool {
        f.len() > 35 && f[14] == 0x45 && f[23] == 1 && matches!(f[34], 3 | 11 | 12)
    }

    /// An ICMP error passed on: to the origin of the flow its embedded
    /// packet belongs to, the embedded source address and port the
    /// origin's, the error's source unchanged.
    fn down_error(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        const EMB: usize = 14 + 20 + 8;
        let e = m
            .nat(input[EMB + 9], port_of(input, EMB, false))
            .unwrap_or_else(|| panic!("{what}: no NAT entry for the embedded packet"));
        to_origin(what, m, &e, out);
        let emb = INNER + 28;
        assert_eq!(get32(out, emb + 12), e.origin, "{what}: embedded source");
        assert_eq!(port_of(out, emb, false), e.port, "{what}: embedded port");
        assert_eq!(
            &out[INNER + 12..INNER + 16],
            &input[26..30],
            "{what}: the error's source"
        );
    }

    /// A wrapped packet for `e`'s origin, with its token, on a scheduled
    /// link, its inner destination the origin.
    fn to_origin(what: &str, m: &ServerMaps, e: &NatEntry, out: &[u8]) {
        use srv::*;
        bond_ok(what, out, e.community);
        assert_eq!(out[BOND + 3], DATA_DOWN, "{what}: kind");
        assert_eq!(bond_of(out).origin(), e.origin, "{what}: origin");
        let token = bond_of(out).token();
        assert_eq!(m.token(e.community, e.origin), Some(token), "{what}: token");
        let (dst, dport) = (get32(out, OUTER_IP + 16), get16(out, OUTER_UDP + 2));
        assert!(
            LINKS[..2]
                .iter()
                .any(|l| u32::from(l.ip) == dst && l.port == dport && l.id == bond_of(out).link),
            "{what}: not on a scheduled link"
        );
        if out[INNER] >> 4 == 4 {
            assert_eq!(
                get32(out, INNER + 16),
                e.origin,
                "{what}: inner destination"
            );
        }
    }

    /// The port (or ICMPv6 echo identifier) of the IPv6 packet at `ip`,
    /// its source or destination one.
    fn port6_of(f: &[u8], ip: usize, dst: bool) -> u16 {
        match f[ip + 6] {
            58 => get16(f, ip + 44),
            _ if dst => get16(f, ip + 42),
            _ => get16(f, ip + 40),
        }
    }

    /// An inner IPv6 packet forwarded upstream (checked as IPv4 up to the
    /// token): IPv6 out, from the IPv6 NAT address and the port of the
    /// origin's IPv6 flow, whose NAT entry points back to the origin's
    /// address and port.
    fn up6(
        what: &str,
        m: &ServerMaps,
        input: &[u8],
        out: &[u8],
        slow_path: bool,
        (community, origin): (u32, u32),
    ) {
        use srv::*;
        assert_eq!(get16(out, 12), ETH_P_IPV6, "{what}: IPv6 out");
        let ip = &out[14..];
        assert_eq!(&ip[8..24], &NAT_IP6.octets(), "{what}: source address");
        assert_eq!(
            &ip[24..40],
            &input[INNER + 24..INNER + 40],
            "{what}: destination"
        );
        let hop = u8::from(!slow_path);
        assert_eq!(
            ip[7],
            input[INNER + 7].wrapping_sub(hop),
            "{what}: hop limit"
        );
        let proto = ip[6];
        let key = Flow6Key::new(
            community,
            proto,
            origin,
            input[INNER + 8..INNER + 24].try_into().unwrap(),
            port6_of(input, INNER, false),
        );
        let flow = m
            .flows6
            .get(&key, 0)
            .unwrap_or_else(|_| panic!("{what}: no IPv6 flow"));
        assert_eq!(
            port6_of(out, 14, false),
            flow.flow.nat_port,
            "{what}: source port"
        );
        let back = key.nat();
        let nkey = NatKey {
            proto,
            index: 0,
            port: flow.flow.nat_port,
        };
        assert_eq!(m.nat6.get(&nkey, 0).ok(), Some(back), "{what}: NAT entry");
    }

    /// An IPv6 reply wrapped down: for the origin its dedicated port's
    /// NAT entry names, to that origin's IPv6 address and port.
    fn down6(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        assert_eq!(
            &input[14 + 24..14 + 40],
            &NAT_IP6.octets(),
            "{what}: to the NAT address"
        );
        let proto = input[14 + 6];
        if proto == 58 && (1..=4).contains(&input[14 + 40]) {
            // An ICMPv6 error: to the origin of the embedded packet's flow,
            // its embedded source address and port the origin's.
            const EMB: usize = 14 + 48;
            let nkey = NatKey {
                proto: input[EMB + 6],
                index: 0,
                port: port6_of(input, EMB, false),
            };
            let e = m
                .nat6
                .get(&nkey, 0)
                .unwrap_or_else(|_| panic!("{what}: no IPv6 NAT entry for the embedded packet"));
            let back = NatEntry::new(e.community, e.origin, e.port);
            to_origin(what, m, &back, out);
            let emb = INNER + 48;
            assert_eq!(
                &out[INNER + 24..INNER + 40],
                &e.src,
                "{what}: to the origin"
            );
            assert_eq!(&out[emb + 8..emb + 24], &e.src, "{what}: embedded source");
            assert_eq!(port6_of(out, emb, false), e.port, "{what}: embedded port");
            return;
        }
        let nkey = NatKey {
            proto,
            index: 0,
            port: port6_of(input, 14, true),
        };
        let e = m
            .nat6
            .get(&nkey, 0)
            .unwrap_or_else(|_| panic!("{what}: no IPv6 NAT entry"));
        let back = NatEntry::new(e.community, e.origin, e.port);
        to_origin(what, m, &back, out);
        assert_eq!(out[INNER] >> 4, 6, "{what}: IPv6 inside");
        assert_eq!(
            &out[INNER + 24..INNER + 40],
            &e.src,
            "{what}: inner destination"
        );
        assert_eq!(port6_of(out, INNER, true), e.port, "{what}: inner port");
        assert_eq!(
            &out[INNER + 8..INNER + 24],
            &input[14 + 8..14 + 24],
            "{what}: inner source"
        );
    }

    /// A frame to the server over IPv6 from the link over IPv6 (`LINK6`,
    /// `LINKS[2]`'s port) as the IPv4 form `bond_server_in6` makes of it,
    /// with the link's registered IPv4 address in place of its
    /// placeholder, so the IPv4 checks apply; `None` for anything else.
    pub fn ipv4_form(f: &[u8]) -> Option<Vec<u8>> {
        use srv::*;
        let over6 = f.len() >= 14 + 40 + 8
            && get16(f, 12) == ETH_P_IPV6
            && f[20] == 17
            && f[22..38] == LINK6.octets()
            && f[38..54] == WAN_IP6.octets()
            && get16(f, 54) == LINKS[2].port
            && get16(f, 56) == PORT;
        if !over6 {
            return None;
        }
        let mut ip = etherparse::Ipv4Header::new(
            get16(f, 18),
            f[21],
            etherparse::IpNumber::UDP,
            LINKS[2].ip.octets(),
            WAN_IP.octets(),
        )
        .ok()?;
        ip.dont_fragment = true;
        ip.header_checksum = ip.calc_header_checksum();
        let mut v4 = f[..12].to_vec();
        v4.extend_from_slice(&ETH_P_IP.to_be_bytes());
        v4.extend_from_slice(&ip.to_bytes());
        v4.extend_from_slice(&f[54..]);
        Some(v4)
    }

    /// The answer to an origin's packet that expired at the server: ICMP
    /// time exceeded (or ICMPv6 Time Exceeded) from the NAT address to the
    /// packet's source, carrying its header and first 8 bytes, wrapped for
    /// the origin (a logged-on one: its token) on a scheduled link.
    pub fn time_exceeded(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        let back = NatEntry::new(bond_of(input).community(), bond_of(input).origin(), 0);
        to_origin(what, m, &back, out);
        if input[INNER] >> 4 == 6 {
            assert_eq!(out.len(), INNER + 96, "{what}: length");
            assert_eq!(
                &out[INNER + 8..INNER + 24],
                &NAT_IP6.octets(),
                "{what}: from"
            );
            assert_eq!(
                &out[INNER + 24..INNER + 40],
                &input[INNER + 8..INNER + 24],
                "{what}: to"
            );
            assert_eq!(out[INNER + 40..INNER + 42], [3, 0], "{what}: Time Exceeded");
            assert_eq!(
                &out[INNER + 48..],
                &input[INNER..INNER + 48],
                "{what}: embedded"
            );
            assert_checksums6(&out[INNER..], what);
        } else {
            assert_eq!(out.len(), INNER + 56, "{what}: length");
            assert_eq!(get32(out, INNER + 12), u32::from(NAT_IP), "{what}: from");
            assert_eq!(
                out[INNER + 20..INNER + 22],
                [11, 0],
                "{what}: time exceeded"
            );
            assert_eq!(
                &out[INNER + 28..],
                &input[INNER..INNER + 28],
                "{what}: embedded"
            );
            assert_checksums(&out[INNER..], what);
        }
    }

    /// The answer to a reply too big for the links: ICMP fragmentation
    /// needed from the NAT address to the reply's sender, for a flow's
    /// reply only.
    pub fn frag_needed(what: &str, m: &ServerMaps, input: &[u8], out: &[u8]) {
        use srv::*;
        if get16(input, 12) == ETH_P_IPV6 {
            let nkey = NatKey {
                proto: input[14 + 6],
                index: 0,
                port: port6_of(input, 14, true),
            };
            assert!(m.nat6.get(&nkey, 0).is_ok(), "{what}: no IPv6 flow");
            assert_eq!(get16(out, 12), ETH_P_IPV6, "{what}: IPv6");
            assert_eq!(
                &out[14 + 8..14 + 24],
                &NAT_IP6.octets(),
                "{what}: from the NAT address"
            );
            assert_eq!(
                &out[14 + 24..14 + 40],
                &input[14 + 8..14 + 24],
                "{what}: to the sender"
            );
            assert_eq!(out[14 + 40], 2, "{what}: Packet Too Big");
            return;
        }
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
        // Room for the flows mutants make: 300 dedicated ports, in blocks
        // of 50 (the first 11 are the set-up's).
        let cfg = s.maps.server_config().unwrap();
        let port_max = PORT_MIN + PORTS - 1;
        s.maps
            .set_server_config(ServerConfig {
                port_max,
                nat_block: 50,
                ..cfg
            })
            .unwrap();
        let blocks = (0..PORTS / 50).map(|b| PORT_MIN + b * 50);
        s.maps
            .set_nat_blocks(COMMUNITY, &srv::share(0, blocks))
            .unwrap();
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
                fixtures.push((Up::new(link, &ip).frame(), &WRAPPED_LENS[..]));
                fixtures.push((
                    reply(&ip, nat).frame(CNT_DEV_MAC, CONTENT_MAC),
                    &OUTER_LENS[..],
                ));
                // An ICMP error about the flow's packet, with all of it.
                let left = Ip {
                    src: NAT_IP,
                    l4: l4.with_src_port(nat),
                    ..ip.clone()
                };
                let error = error_about(CONTENT, IcmpError::PortUnreachable, &left, 999);
                fixtures.push((error.frame(CNT_DEV_MAC, CONTENT_MAC), &OUTER_LENS[..]));
            }
        }
        // A datagram in fragments, each way, on A's UDP flow.
        let mut big = Ip::new(ORIGIN_A, CONTENT, L4::udp(40001, 53));
        big.payload = vec![0x5a; 200];
        for f in fragments(&big.bytes(), &[96]) {
            let up = Up {
                inner: f,
                ..Up::new(LINKS[0], &big)
            };
            fixtures.push((up.frame(), &WRAPPED_LENS[..]));
        }
        let mut r = reply(&big, PORT_MIN + 1);
        r.payload = vec![0xa5; 200];
        for f in fragments(&r.bytes(), &[96]) {
            fixtures.push((eth(CNT_DEV_MAC, CONTENT_MAC, ETH_P_IP, &f), &OUTER_LENS[..]));
        }
        // IPv6 inside: A's TCP, UDP and echo flows and their replies.
        for (j, l4) in l4s.into_iter().enumerate() {
            let ip = Ip6::new(ORIGIN_A6, CONTENT6, l4);
            let up = Up::v6(LINKS[0], ORIGIN_A, &ip);
            let nat = PORT_MIN + 6 + j as u16;
            let (v, _) = s.run("bond_server", &up.frame());
            assert_eq!(v, XDP_REDIRECT, "an IPv6 flow to mutate");
            let reply = Ip6 {
                src: CONTENT6,
                dst: NAT_IP6,
                l4: l4.reply().with_dst_port(nat),
                ..ip.clone()
            };
            fixtures.push((up.frame(), &WRAPPED6_LENS[..]));
            fixtures.push((reply.frame(CNT_DEV_MAC, CONTENT_MAC), &REPLY6_LENS[..]));
            // An ICMPv6 error about the flow's packet, with all of it.
            let left = Ip6 {
                src: NAT_IP6,
                l4: l4.with_src_port(nat),
                ..ip.clone()
            };
            let mut error = Vec::new();
            etherparse::PacketBuilder::ethernet2(CNT_DEV_MAC, CONTENT_MAC)
                .ipv6(CONTENT6.octets(), NAT_IP6.octets(), 60)
                .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                    etherparse::icmpv6::DestUnreachableCode::Port,
                ))
                .write(&mut error, &left.bytes())
                .unwrap();
            fixtures.push((error, &REPLY6_LENS[..1]));
        }
        // Over a link over IPv6 (link 2 becomes one): A's flows again.
        let l6 = LINKS[2];
        let link6 = bond_common::maps::ServerLink {
            ip: 0,
            port: l6.port,
            community: COMMUNITY,
            link: l6.id,
            flags: bond_common::maps::LINK_VALID,
            owner: 0,
        };
        s.maps.set_server_link6(l6.idx, LINK6, link6).unwrap();
        for l4 in l4s {
            let up = Up::new(l6, &Ip::new(ORIGIN_A, CONTENT, l4)).frame();
            let frame = over_ipv6(&up, LINK6, WAN_IP6, 50);
            let (v, _) = s.run("bond_server", &frame);
            assert_eq!(v, XDP_REDIRECT, "over IPv6, a flow to mutate");
            fixtures.push((frame, &OVER6_LENS[..]));
        }
        let mut rng = Rng(SEED);
        let mut tally = Tally::default();
        let mut before = c.read();
        for k in 0..MUTANTS {
            let (fixture, lens) = &fixtures[k % fixtures.len()];
            let input = mutant(&mut rng, fixture, lens, 4200);
            let what = format!("mutant {k} {input:02x?}");
            let (v, out) = s.try_run("bond_server", &input).expect("test_run");
            // Over IPv6 to the server: checked as the IPv4 form it takes.
            let (seen, over6) = match fuzz_check::ipv4_form(&input) {
                Some(f) => (f, true),
                None => (input.clone(), false),
            };
            let after = c.read();
            let grew = after.drops_since(&before);
            let created = after.event_since(&before, event::FLOW_CREATED);
            let answered = after.event_since(&before, event::FRAG_NEEDED);
            let expired = after.event_since(&before, event::TIME_EXCEEDED);
            before = after;
            let outcome = if expired > 0 {
                assert_eq!((v, expired), (XDP_REDIRECT, 1), "{what}: time exceeded");
                assert_eq!(grew, vec![("ttl_exceeded", 1)], "{what}: counted");
                fuzz_check::time_exceeded(&what, &m, &seen, &out);
                "answered time exceeded"
            } else if answered > 0 {
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
                    XDP_PASS | XDP_REDIRECT if out.len() + OUTER == seen.len() => {
                        fuzz_check::up(&what, &m, &seen, &out, v == XDP_PASS);
                        if seen[INNER] >> 4 == 6 {
                            *tally.outcomes.entry("IPv6 forwarded up").or_default() += 1;
                        }
                        if over6 {
                            *tally.outcomes.entry("over IPv6 forwarded up").or_default() += 1;
                        }
                        "forwarded up"
                    }
                    XDP_PASS | XDP_REDIRECT if out.len() == input.len() + OUTER => {
                        fuzz_check::down(&what, &m, &input, &out);
                        if input[12..14] == [0x86, 0xdd] {
                            *tally.outcomes.entry("IPv6 wrapped down").or_default() += 1;
                        }
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
            let back = k.nat();
            let nkey = NatKey {
                proto: k.proto,
                index: f.nat_index,
                port: f.nat_port,
            };
            assert!(nat.contains(&(nkey, back)), "{k:?}: NAT entry");
        }
        assert_eq!(nat.len(), flows.len(), "a NAT entry per flow, no more");
        // And IPv6 flows the same, on ports of the same queue.
        let flows6 = s.maps.flows6().unwrap();
        let nat6: Vec<(NatKey, Nat6Entry)> = m.nat6.iter().map(|e| e.unwrap()).collect();
        for (k, f) in &flows6 {
            assert_eq!(k.community, COMMUNITY, "{k:?}");
            let back = k.nat();
            let nkey = NatKey {
                proto: k.proto,
                index: 0,
                port: f.flow.nat_port,
            };
            assert!(nat6.contains(&(nkey, back)), "{k:?}: NAT entry");
            ports.push(f.flow.nat_port);
        }
        assert_eq!(
            nat6.len(),
            flows6.len(),
            "a NAT entry per IPv6 flow, no more"
        );
        let all = flows.len() + flows6.len();
        assert_eq!(s.event("flows_created") as usize, all);
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), all, "one flow per port");

        for o in [
            "untouched",
            "dropped",
            "forwarded up",
            "wrapped down",
            "flows made",
        ] {
            assert!(tally.outcome(o) >= 50, "only {} {o}", tally.outcome(o));
        }
        // Three fixtures each way of about thirty: fewer of these.
        for o in ["IPv6 forwarded up", "IPv6 wrapped down"] {
            assert!(tally.outcome(o) >= 20, "only {} {o}", tally.outcome(o));
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
                    let (link, sent) = (bond_of(&out).link, bond_of(&out).sent_us());
                    assert!([A, C, SMALL].contains(&link), "{what}: link {link}");
                    assert_eq!(get16(&input, 12), ETH_P_IP, "{what}: ethertype");
                    assert!(
                        input.len() - 14 + OUTER <= usize::from(up_link(link).mtu),
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
