//! Packets for the BPF fixtures, built from scratch and checked
//! independently of the code under test: IPv4 and L4 headers (and their
//! checksums) come from `etherparse`; Ethernet, the outer UDP header and the
//! bond header are assembled by hand from the wire format in docs/architecture.md.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, NetHeaders, PacketBuilder, PacketHeaders, TransportHeader,
};

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// A bond header (version 4).
pub const BOND_LEN: usize = 28;
/// Ethernet + outer IPv4 + UDP + bond header.
pub const WRAP_LEN: usize = 14 + 20 + 8 + BOND_LEN;

/// An Ethernet II frame.
pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The transport part of an inner packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    EchoRequest {
        id: u16,
        seq: u16,
    },
    EchoReply {
        id: u16,
        seq: u16,
    },
    /// ICMP destination unreachable (port unreachable): not an echo.
    Unreachable,
    /// An ICMP error; the packet's payload is the offending packet's
    /// header and first bytes.
    Error(IcmpError),
}

/// The ICMP errors the fixtures send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// Time exceeded in transit (type 11, code 0): traceroute's answer.
    TimeExceeded,
    /// Destination unreachable, port unreachable (type 3, code 3).
    PortUnreachable,
    /// Destination unreachable, fragmentation needed (type 3, code 4),
    /// with the next hop's MTU.
    FragNeeded(u16),
}

impl L4 {
    pub fn tcp(sport: u16, dport: u16) -> Self {
        Self::Tcp { sport, dport }
    }

    pub fn udp(sport: u16, dport: u16) -> Self {
        Self::Udp { sport, dport }
    }

    /// With the sender-side port (source port, or the ICMP identifier).
    pub fn with_src_port(self, p: u16) -> Self {
        match self {
            Self::Tcp { dport, .. } => Self::Tcp { sport: p, dport },
            Self::Udp { dport, .. } => Self::Udp { sport: p, dport },
            Self::EchoRequest { seq, .. } => Self::EchoRequest { id: p, seq },
            Self::EchoReply { seq, .. } => Self::EchoReply { id: p, seq },
            Self::Unreachable | Self::Error(_) => self,
        }
    }

    /// With the receiver-side port (destination port, or the ICMP identifier).
    pub fn with_dst_port(self, p: u16) -> Self {
        match self {
            Self::Tcp { sport, .. } => Self::Tcp { sport, dport: p },
            Self::Udp { sport, .. } => Self::Udp { sport, dport: p },
            Self::EchoRequest { seq, .. } => Self::EchoRequest { id: p, seq },
            Self::EchoReply { seq, .. } => Self::EchoReply { id: p, seq },
            Self::Unreachable | Self::Error(_) => self,
        }
    }

    /// The answer's transport: ports swapped, echo request becomes reply.
    pub fn reply(self) -> Self {
        match self {
            Self::Tcp { sport, dport } => Self::Tcp {
                sport: dport,
                dport: sport,
            },
            Self::Udp { sport, dport } => Self::Udp {
                sport: dport,
                dport: sport,
            },
            Self::EchoRequest { id, seq } => Self::EchoReply { id, seq },
            other => other,
        }
    }

    pub fn proto(self) -> u8 {
        match self {
            Self::Tcp { .. } => 6,
            Self::Udp { .. } => 17,
            _ => 1,
        }
    }
}

/// An IPv4 packet (no options) with a TCP, UDP or ICMP payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ip {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    /// More-fragments flag and fragment offset (in 8-byte units).
    pub more_fragments: bool,
    pub frag_offset: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ip {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Self {
        Self {
            src,
            dst,
            ttl: 64,
            id: 0x1c46,
            more_fragments: false,
            frag_offset: 0,
            l4,
            payload: b"bond fixture payload: 0123456789".to_vec(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut h = Ipv4Header::new(
            0,
            self.ttl,
            IpNumber::TCP,
            self.src.octets(),
            self.dst.octets(),
        )
        .expect("ipv4 header");
        h.identification = self.id;
        h.more_fragments = self.more_fragments;
        h.fragment_offset = self.frag_offset.try_into().expect("fragment offset");
        let ip = PacketBuilder::ip(IpHeaders::Ipv4(h, Default::default()));
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { sport, dport } => ip
                .tcp(sport, dport, 0x0102_0304, 64240)
                .ack(0x0a0b_0c0d)
                .psh()
                .write(&mut out, &self.payload),
            L4::Udp { sport, dport } => ip.udp(sport, dport).write(&mut out, &self.payload),
            L4::EchoRequest { id, seq } => ip
                .icmpv4_echo_request(id, seq)
                .write(&mut out, &self.payload),
            L4::EchoReply { id, seq } => {
                ip.icmpv4_echo_reply(id, seq).write(&mut out, &self.payload)
            }
            L4::Unreachable => ip
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::Port,
                ))
                .write(&mut out, &self.payload),
            L4::Error(e) => {
                use etherparse::{
                    Icmpv4Type as T,
                    icmpv4::{DestUnreachableHeader as U, TimeExceededCode},
                };
                let kind = match e {
                    IcmpError::TimeExceeded => {
                        T::TimeExceeded(TimeExceededCode::TtlExceededInTransit)
                    }
                    IcmpError::PortUnreachable => T::DestinationUnreachable(U::Port),
                    IcmpError::FragNeeded(mtu) => {
                        T::DestinationUnreachable(U::FragmentationNeeded { next_hop_mtu: mtu })
                    }
                };
                ip.icmpv4(kind).write(&mut out, &self.payload)
            }
        }
        .expect("build inner packet");
        out
    }

    /// The same packet as a frame.
    pub fn frame(&self, dst: Mac, src: Mac) -> Vec<u8> {
        eth(dst, src, ETH_P_IP, &self.bytes())
    }
}

/// An IPv6 packet (no extension headers) with a TCP, UDP or ICMPv6 echo
/// payload, built by etherparse (its checksums cover the pseudo-header).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ip6 {
    pub src: std::net::Ipv6Addr,
    pub dst: std::net::Ipv6Addr,
    pub hop: u8,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Ip6 {
    pub fn new(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, l4: L4) -> Self {
        Self {
            src,
            dst,
            hop: 64,
            l4,
            payload: b"bond fixture payload over IPv6".to_vec(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let ip = PacketBuilder::ipv6(self.src.octets(), self.dst.octets(), self.hop);
        let mut out = Vec::new();
        match self.l4 {
            L4::Tcp { sport, dport } => ip
                .tcp(sport, dport, 0x0102_0304, 64240)
                .ack(0x0a0b_0c0d)
                .psh()
                .write(&mut out, &self.payload),
            L4::Udp { sport, dport } => ip.udp(sport, dport).write(&mut out, &self.payload),
            L4::EchoRequest { id, seq } => ip
                .icmpv6_echo_request(id, seq)
                .write(&mut out, &self.payload),
            L4::EchoReply { id, seq } => {
                ip.icmpv6_echo_reply(id, seq).write(&mut out, &self.payload)
            }
            other => panic!("no IPv6 fixture for {other:?}"),
        }
        .expect("build IPv6 packet");
        out
    }

    /// The same packet as a frame.
    pub fn frame(&self, dst: Mac, src: Mac) -> Vec<u8> {
        eth(dst, src, ETH_P_IPV6, &self.bytes())
    }

    /// The IPv6 protocol number of its transport.
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            _ => 58,
        }
    }
}

/// Asserts every checksum of an IPv6 packet, recomputed by etherparse.
pub fn assert_checksums6(ip: &[u8], what: &str) {
    let h = PacketHeaders::from_ip_slice(ip)
        .unwrap_or_else(|e| panic!("{what}: not a parseable IPv6 packet: {e}"));
    let Some(NetHeaders::Ipv6(ip6, _)) = &h.net else {
        panic!("{what}: not IPv6");
    };
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => assert_eq!(
            t.checksum,
            t.calc_checksum_ipv6(ip6, payload).expect("tcp checksum"),
            "{what}: TCP checksum"
        ),
        Some(TransportHeader::Udp(u)) => assert_eq!(
            u.checksum,
            u.calc_checksum_ipv6(ip6, payload).expect("udp checksum"),
            "{what}: UDP checksum"
        ),
        Some(TransportHeader::Icmpv6(i)) => assert_eq!(
            i.checksum,
            i.icmp_type
                .calc_checksum(ip6.source, ip6.destination, payload)
                .expect("icmpv6 checksum"),
            "{what}: ICMPv6 checksum"
        ),
        other => panic!("{what}: unexpected transport {other:?}"),
    }
}

/// Bond message kinds (docs/architecture.md, "Wire format").
pub const DATA_UP: u8 = 1;
pub const DATA_DOWN: u8 = 2;
pub const ANNOUNCE: u8 = 0x10;

/// A bond header, field by field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bond {
    pub magic: u16,
    pub version: u8,
    pub kind: u8,
    pub community: u32,
    pub link: u8,
    /// The per-link sequence (DATA), 0 in control messages.
    pub seq: u8,
    /// Zero in every header bond sends.
    pub reserved: u16,
    pub origin: Ipv4Addr,
    /// The sender's clock, µs.
    pub sent: u32,
    pub token: u64,
}

impl Bond {
    pub fn data(
        kind: u8,
        community: u32,
        link: u8,
        origin: Ipv4Addr,
        sent: u32,
        token: u64,
    ) -> Self {
        Self {
            magic: 0xB04D,
            version: 4,
            kind,
            community,
            link,
            seq: 0,
            reserved: 0,
            origin,
            sent,
            token,
        }
    }

    /// Version 4's layout (docs/architecture.md, "Wire format").
    pub fn bytes(&self) -> [u8; BOND_LEN] {
        let mut b = [0u8; BOND_LEN];
        b[0..2].copy_from_slice(&self.magic.to_be_bytes());
        b[2] = self.version;
        b[3] = self.kind;
        b[4..8].copy_from_slice(&self.community.to_be_bytes());
        b[8] = self.link;
        b[9] = self.seq;
        b[10..12].copy_from_slice(&self.reserved.to_be_bytes());
        b[12..16].copy_from_slice(&self.origin.octets());
        b[16..20].copy_from_slice(&self.sent.to_be_bytes());
        b[20..28].copy_from_slice(&self.token.to_be_bytes());
        b
    }
}

/// The Ethernet, IPv4 and UDP headers in front of a bond header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outer {
    pub dst_mac: Mac,
    pub src_mac: Mac,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub id: u16,
    /// More-fragments flag (DF is set otherwise).
    pub more_fragments: bool,
}

/// A wrapped frame: Ethernet, outer IPv4 (DF, valid checksum), UDP (zero
/// checksum), bond header, inner packet.
pub fn wrapped(o: &Outer, b: &Bond, inner: &[u8]) -> Vec<u8> {
    let udp_len = 8 + BOND_LEN + inner.len();
    let mut ip = Ipv4Header::new(
        udp_len as u16,
        o.ttl,
        IpNumber::UDP,
        o.src.octets(),
        o.dst.octets(),
    )
    .expect("outer ipv4");
    ip.identification = o.id;
    ip.more_fragments = o.more_fragments;
    ip.header_checksum = ip.calc_header_checksum();
    let mut payload = ip.to_bytes().to_vec();
    payload.extend_from_slice(&o.sport.to_be_bytes());
    payload.extend_from_slice(&o.dport.to_be_bytes());
    payload.extend_from_slice(&(udp_len as u16).to_be_bytes());
    payload.extend_from_slice(&[0, 0]);
    payload.extend_from_slice(&b.bytes());
    payload.extend_from_slice(inner);
    eth(o.dst_mac, o.src_mac, ETH_P_IP, &payload)
}

/// A bond header's send time that an expected frame leaves open (zero):
/// the programs stamp the kernel's clock, so a check takes any fresh one.
pub const OPEN: u32 = 0;

/// `want` with the fields the program chooses filled in from `got`, where
/// `want` leaves them open: the bond header's send time (if `want`'s is
/// [`OPEN`]; `got`'s must be at most 10 s old by CLOCK_MONOTONIC, the clock
/// of `bpf_ktime_get_ns`, so a zero, a constant or a stale stamp fails) and
/// a DATA packet's per-link number (if `want`'s is 0: senders number each
/// link's DATA, 1 to 127, from wherever its count stands).
pub fn fill_open(got: &[u8], want: &[u8]) -> Result<Vec<u8>, String> {
    // Where the bond header starts: behind outer IPv4, or outer IPv6 (a
    // link over IPv6), 20 bytes further.
    let bond_at = |f: &[u8]| {
        match f.get(12..14) {
            Some([8, 0]) if f.get(23) == Some(&17) => Some(42),
            Some([0x86, 0xdd]) if f.get(20) == Some(&17) => Some(62),
            _ => None,
        }
        .filter(|&b| f.len() >= b + BOND_LEN && f[b..b + 2] == [0xb0, 0x4d])
    };
    let mut want = want.to_vec();
    let (Some(b), Some(g)) = (bond_at(&want), bond_at(got)) else {
        return Ok(want);
    };
    if b != g {
        return Ok(want);
    }
    let (sent_at, seq, kind) = (b + 16, b + 9, b + 3);
    let at =
        |f: &[u8]| u32::from_be_bytes([f[sent_at], f[sent_at + 1], f[sent_at + 2], f[sent_at + 3]]);
    if at(&want) == OPEN {
        let sent = at(got);
        let now = (bond_datapath::monotonic_ns() / 1000) as u32;
        if now.wrapping_sub(sent) >= 10_000_000 {
            return Err(format!("send time {sent} µs, now {now} µs"));
        }
        want[sent_at..sent_at + 4].copy_from_slice(&sent.to_be_bytes());
    }
    if matches!(want[kind], DATA_UP | DATA_DOWN) && want[seq] == 0 {
        want[seq] = got[seq];
    }
    Ok(want)
}

/// A plain UDP frame (not bond traffic unless the payload says so).
pub fn udp_frame(
    dst_mac: Mac,
    src_mac: Mac,
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
) -> Vec<u8> {
    Ip::new(
        src.0,
        dst.0,
        L4::Udp {
            sport: src.1,
            dport: dst.1,
        },
    )
    .frame(dst_mac, src_mac)
}

/// An ARP request frame.
pub fn arp_frame(src_mac: Mac, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    eth([0xff; 6], src_mac, ETH_P_ARP, &a)
}

/// An IPv6/UDP frame to `dport`.
pub fn ipv6_udp_frame(dst_mac: Mac, src_mac: Mac, dport: u16) -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let mut out = Vec::new();
    PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .udp(40000, dport)
        .write(&mut out, b"not ipv4")
        .expect("ipv6 frame");
    out
}

/// Asserts every checksum of an IPv4 packet, recomputed by etherparse:
/// the header's, and the TCP, UDP (zero = none) or ICMP one (but in a
/// fragment, which carries only part of what that one covers).
pub fn assert_checksums(ip: &[u8], what: &str) {
    let h = PacketHeaders::from_ip_slice(ip)
        .unwrap_or_else(|e| panic!("{what}: not a parseable IPv4 packet: {e}"));
    let Some(NetHeaders::Ipv4(ip4, _)) = &h.net else {
        panic!("{what}: not IPv4");
    };
    assert_eq!(
        ip4.header_checksum,
        ip4.calc_header_checksum(),
        "{what}: IPv4 header checksum"
    );
    let payload = h.payload.slice();
    match &h.transport {
        Some(TransportHeader::Tcp(t)) => assert_eq!(
            t.checksum,
            t.calc_checksum_ipv4(ip4, payload).expect("tcp checksum"),
            "{what}: TCP checksum"
        ),
        Some(TransportHeader::Udp(u)) => {
            if u.checksum != 0 {
                assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv4(ip4, payload).expect("udp checksum"),
                    "{what}: UDP checksum"
                );
            }
        }
        Some(TransportHeader::Icmpv4(i)) => assert_eq!(
            i.checksum,
            i.icmp_type.calc_checksum(payload),
            "{what}: ICMP checksum"
        ),
        // A fragment's transport checksum covers the whole datagram.
        None if ip4.is_fragmenting_payload() => {}
        other => panic!("{what}: unexpected transport {other:?}"),
    }
}

/// Asserts the checksums of a wrapped frame: the outer IPv4 header's, a
/// zero ("none") outer UDP checksum, and all of the inner packet's.
pub fn assert_wrapped_checksums(frame: &[u8], what: &str) {
    assert!(frame.len() > WRAP_LEN, "{what}: too short for a wrap");
    let outer = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..34])
        .unwrap_or_else(|e| panic!("{what}: outer IPv4: {e}"))
        .to_header();
    assert_eq!(
        outer.header_checksum,
        outer.calc_header_checksum(),
        "{what}: outer IPv4 header checksum"
    );
    assert_eq!(&frame[40..42], &[0, 0], "{what}: outer UDP checksum");
    assert_checksums(&frame[WRAP_LEN..], &format!("{what} (inner)"));
}

/// A frame's IPv4 packet, after checking the Ethernet header says IPv4.
pub fn ipv4_of(frame: &[u8]) -> &[u8] {
    assert_eq!(&frame[12..14], &ETH_P_IP.to_be_bytes(), "ethertype");
    &frame[14..]
}

/// Recomputes the header checksum of the IPv4 packet at the front of `ip`
/// after a test edited its header bytes.
pub fn fix_ipv4_checksum(ip: &mut [u8]) {
    ip[10] = 0;
    ip[11] = 0;
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let mut sum: u32 = ip[..ihl]
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Sets the total-length field of the IPv4 packet at the front of `ip`.
pub fn set_total_len(ip: &mut [u8], len: u16) {
    ip[2..4].copy_from_slice(&len.to_be_bytes());
    fix_ipv4_checksum(ip);
}

/// Sets the TTL of the IPv4 packet at the front of `ip`.
pub fn set_ttl(ip: &mut [u8], ttl: u8) {
    ip[8] = ttl;
    fix_ipv4_checksum(ip);
}

/// Makes the IPv4 packet at the front of `ip` a fragment: the more-fragments
/// flag and the offset (in 8-byte units); the don't-fragment flag is cleared,
/// as a fragment cannot carry it.
pub fn set_fragment(ip: &mut [u8], more_fragments: bool, offset: u16) {
    assert!(offset < 1 << 13, "fragment offset {offset}");
    let v = (u16::from(more_fragments) << 13) | offset;
    ip[6..8].copy_from_slice(&v.to_be_bytes());
    fix_ipv4_checksum(ip);
}

/// Cuts IPv4 packet `ip` (20-byte header) into fragments, its payload cut
/// at byte offsets `at` (multiples of 8), as a router fragments (RFC 791
/// section 3.2): every fragment gets the header with its own total length,
/// offset and "more fragments" (all but the last), and no DF.
pub fn fragments(ip: &[u8], at: &[usize]) -> Vec<Vec<u8>> {
    assert_eq!(ip[0], 0x45, "an IPv4 header without options");
    let payload = &ip[20..];
    let mut cuts = vec![0];
    cuts.extend_from_slice(at);
    cuts.push(payload.len());
    cuts.windows(2)
        .map(|w| {
            assert!(w[0] % 8 == 0 && w[0] < w[1], "cut at {}", w[0]);
            let mut f = ip[..20].to_vec();
            f.extend_from_slice(&payload[w[0]..w[1]]);
            let tot = f.len() as u16;
            f[2..4].copy_from_slice(&tot.to_be_bytes());
            set_fragment(&mut f, w[1] < payload.len(), (w[0] / 8) as u16);
            f
        })
        .collect()
}

/// Inserts `options` (a multiple of 4 bytes) after the 20-byte IPv4 header
/// that starts at `frame[ip_off]`, and raises its header and total lengths
/// to match (RFC 791: IHL counts 32-bit words).
pub fn insert_ipv4_options(frame: &mut Vec<u8>, ip_off: usize, options: &[u8]) {
    assert_eq!(options.len() % 4, 0, "options fill whole words");
    assert_eq!(frame[ip_off], 0x45, "an IPv4 header without options");
    let at = ip_off + 20;
    frame.splice(at..at, options.iter().copied());
    let ip = &mut frame[ip_off..];
    ip[0] = 0x40 | (5 + options.len() / 4) as u8;
    let total = u16::from_be_bytes([ip[2], ip[3]]) + options.len() as u16;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    fix_ipv4_checksum(ip);
}

/// Four bytes of IPv4 options: three no-operations and end of list.
pub const IPV4_NOPS: [u8; 4] = [1, 1, 1, 0];
