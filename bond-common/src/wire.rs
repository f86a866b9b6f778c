//! The bond wire format: outer IPv4 (20) + UDP (8) + bond header (28) + the
//! inner IPv4 packet, unmodified. All multi-byte fields are network order.

use crate::maps::CommunityId;

/// Rejects strays: the first two bytes of every bond header.
pub const MAGIC: u16 = 0xB04D;
/// The only version this code speaks. Version 2 replaced the sequence
/// number with the sender's clock (`BondHdr::sent_us`); version 3 turned
/// the reserved flags byte into the per-link sequence (`BondHdr::seq`);
/// version 4 widened the community id from 16 to 32 bits, so that an ISP
/// tier can tell millions of communities apart (the header grew by four
/// bytes: two for the id, two reserved).
pub const VERSION: u8 = 4;

/// Message kinds. DATA kinds are handled by the eBPF programs; every other
/// kind is passed up to the agent's socket.
pub mod kind {
    pub const DATA_UP: u8 = 1;
    pub const DATA_DOWN: u8 = 2;
    pub const ANNOUNCE: u8 = 0x10;
    pub const SHUTDOWN: u8 = 0x11;
    pub const LOGIN: u8 = 0x12;
    pub const LOGIN_REPLY: u8 = 0x13;
    /// One packet of a measurement train.
    pub const PROBE: u8 = 0x14;
    /// A terminal asks the server for a downstream train on a link.
    pub const PROBE_REQUEST: u8 = 0x15;
    /// The server's measurement of an upstream train.
    pub const PROBE_REPORT: u8 = 0x16;
    /// A link's owner to the server over that link: its send time, for
    /// the round trip and to show the link alive (`bond_agent::pathmon`).
    pub const ECHO: u8 = 0x17;
    /// The server's answer to an ECHO, over the same link.
    pub const ECHO_REPLY: u8 = 0x18;
    /// A receiving end's playout to the sender: how much queue each link's
    /// recent packets met (`bond_agent::feedback`).
    pub const FEEDBACK: u8 = 0x19;
    /// A receiving end's playout to the sender: packets a link lost,
    /// to send again (`bond_agent::resend`).
    pub const RESEND: u8 = 0x1a;
}

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
/// Bytes a wrap adds in front of the inner IPv4 packet.
pub const OUTER_LEN: usize = IPV4_LEN + UDP_LEN + BondHdr::LEN;
/// Offset of the inner IPv4 header in a wrapped Ethernet frame.
pub const INNER_OFF: usize = ETH_LEN + OUTER_LEN;
/// A sender's clock as the bond header carries it: CLOCK_MONOTONIC in
/// microseconds, wrapping every 71 minutes. Only differences between two
/// stamps of one sender mean anything, and only within half a wrap.
#[inline(always)]
pub const fn sent_us(now_ns: u64) -> u32 {
    (now_ns / 1000) as u32
}

/// The per-link sequence runs 1 to [`SEQ_MAX`] and round again
/// ([`BondHdr::seq`]); 0 is "not counted".
pub const SEQ_MAX: u8 = 127;
/// Set in [`BondHdr::seq`] on a copy sent again (`bond_agent::resend`): the
/// rest is the packet's number on the link it was first sent on, `link`
/// the link it comes on now.
pub const SEQ_COPY: u8 = 0x80;

/// The per-link sequence number after `s`: 1 to [`SEQ_MAX`], skipping 0.
#[inline(always)]
pub const fn seq_next(s: u8) -> u8 {
    if s >= SEQ_MAX { 1 } else { s + 1 }
}

/// How many numbers of a link's sequence lie strictly between `last` and
/// `seq` (both 1 to [`SEQ_MAX`]): the packets lost in between, or, when
/// `seq` is not after `last` (the same again, or older), more than half
/// the sequence.
#[inline(always)]
pub const fn seq_missing(last: u8, seq: u8) -> u8 {
    (seq as i16 - last as i16 - 1).rem_euclid(SEQ_MAX as i16) as u8
}

/// Offset of the bond header in a wrapped Ethernet frame.
pub const BOND_OFF: usize = ETH_LEN + IPV4_LEN + UDP_LEN;
/// Offset of the inner packet in a wrapped Ethernet frame whose outer
/// header is IPv6 (a link over IPv6).
pub const INNER6_OFF: usize = ETH_LEN + IPV6_LEN + UDP_LEN + BondHdr::LEN;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// An IPv6 header (RFC 8200); bond carries none with extension headers.
pub const IPV6_LEN: usize = 40;
/// The smallest link MTU IPv6 allows (RFC 8200 section 5).
pub const IPV6_MIN_MTU: u16 = 1280;
/// An IPv4 header's first byte without options: version 4, IHL 5 words.
pub const IPV4_VIHL: u8 = 0x45;
/// The IPv4 flags-and-offset field's "don't fragment" bit.
pub const IPV4_DF: u16 = 0x4000;
/// The IPv4 flags-and-offset field's "more fragments" bit and fragment
/// offset: either set makes the packet a fragment.
pub const IPV4_FRAGMENT: u16 = 0x3fff;
/// The "more fragments" bit alone.
pub const IPV4_MF: u16 = 0x2000;
/// The fragment offset alone (8-byte units): set on every fragment but the
/// first, which alone carries the transport header.
pub const IPV4_OFFSET: u16 = 0x1fff;
/// The TTL of every IPv4 header bond writes.
pub const TTL: u8 = 64;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 message types (RFC 4443): errors below 128, echo above.
pub const ICMPV6_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// The bond header. Byte arrays throughout: alignment 1, no padding, and
/// safe to read from any offset of a packet. Every field lies at an offset
/// of its own size's multiple.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BondHdr {
    pub magic: [u8; 2],
    pub version: u8,
    pub kind: u8,
    /// The community id ([`crate::maps::CommunityId`]).
    pub community: [u8; 4],
    pub link: u8,
    /// DATA: the sender's count of the packets it sent on `link`, 1 to
    /// [`SEQ_MAX`] and round again ([`seq_next`]), so the receiving end
    /// sees a packet the link lost when the next one arrives and can ask
    /// for a copy; with [`SEQ_COPY`], such a copy. 0: not counted (pure
    /// ACKs, which no playout holds, and control messages).
    pub seq: u8,
    /// Zero (a receiver refuses anything else, so that a later version
    /// can give these bytes a meaning).
    pub reserved: [u8; 2],
    pub origin: [u8; 4],
    pub sent: [u8; 4],
    pub token: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<BondHdr>() == 28);
const _: () = assert!(core::mem::align_of::<BondHdr>() == 1);

/// Why a bond header was refused. The discriminants are drop-counter
/// indices (see [`crate::drops`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Truncated,
    BadMagic,
    BadVersion,
    BadFlags,
}

impl WireError {
    pub const fn drop_reason(self) -> u32 {
        match self {
            Self::Truncated => crate::drops::TRUNCATED,
            Self::BadMagic => crate::drops::BAD_MAGIC,
            Self::BadVersion => crate::drops::BAD_VERSION,
            Self::BadFlags => crate::drops::BAD_FLAGS,
        }
    }
}

impl BondHdr {
    pub const LEN: usize = 28;

    #[inline(always)]
    pub const fn new(
        kind: u8,
        community: CommunityId,
        link: u8,
        origin: u32,
        sent_us: u32,
        token: u64,
    ) -> Self {
        Self {
            magic: MAGIC.to_be_bytes(),
            version: VERSION,
            kind,
            community: community.to_be_bytes(),
            link,
            seq: 0,
            reserved: [0; 2],
            origin: origin.to_be_bytes(),
            sent: sent_us.to_be_bytes(),
            token: token.to_be_bytes(),
        }
    }

    /// The same header with per-link sequence `seq` ([`BondHdr::seq`]).
    #[inline(always)]
    pub const fn with_seq(mut self, seq: u8) -> Self {
        self.seq = seq;
        self
    }

    #[inline(always)]
    pub const fn community(&self) -> CommunityId {
        u32::from_be_bytes(self.community)
    }
    /// The origin terminal's LAN address, host order.
    #[inline(always)]
    pub const fn origin(&self) -> u32 {
        u32::from_be_bytes(self.origin)
    }
    /// When the sender sent the packet, by its own clock ([`sent_us`]):
    /// the receiver orders and paces its release by it.
    #[inline(always)]
    pub const fn sent_us(&self) -> u32 {
        u32::from_be_bytes(self.sent)
    }
    #[inline(always)]
    pub const fn token(&self) -> u64 {
        u64::from_be_bytes(self.token)
    }
    #[inline(always)]
    pub const fn is_data(&self) -> bool {
        self.kind == kind::DATA_UP || self.kind == kind::DATA_DOWN
    }

    /// Checks the fields every receiver checks: magic, version, the
    /// reserved bytes zero, and no sequence on a control message. Kind,
    /// community and token are the receiver's business.
    #[inline(always)]
    pub const fn validate(&self) -> Result<(), WireError> {
        if u16::from_be_bytes(self.magic) != MAGIC {
            return Err(WireError::BadMagic);
        }
        if self.version != VERSION {
            return Err(WireError::BadVersion);
        }
        if (self.seq != 0 && !self.is_data()) || u16::from_be_bytes(self.reserved) != 0 {
            return Err(WireError::BadFlags);
        }
        Ok(())
    }

    /// Parses and validates a header from the front of `buf`.
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let Some(b) = buf.get(..Self::LEN) else {
            return Err(WireError::Truncated);
        };
        let mut h = [0u8; Self::LEN];
        h.copy_from_slice(b);
        let hdr = Self::from_bytes(h);
        hdr.validate()?;
        Ok(hdr)
    }

    #[inline(always)]
    pub const fn from_bytes(b: [u8; Self::LEN]) -> Self {
        Self {
            magic: [b[0], b[1]],
            version: b[2],
            kind: b[3],
            community: [b[4], b[5], b[6], b[7]],
            link: b[8],
            seq: b[9],
            reserved: [b[10], b[11]],
            origin: [b[12], b[13], b[14], b[15]],
            sent: [b[16], b[17], b[18], b[19]],
            token: [b[20], b[21], b[22], b[23], b[24], b[25], b[26], b[27]],
        }
    }

    pub const fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.magic[0];
        b[1] = self.magic[1];
        b[2] = self.version;
        b[3] = self.kind;
        b[8] = self.link;
        b[9] = self.seq;
        b[10] = self.reserved[0];
        b[11] = self.reserved[1];
        let mut i = 0;
        while i < 4 {
            b[4 + i] = self.community[i];
            b[12 + i] = self.origin[i];
            b[16 + i] = self.sent[i];
            i += 1;
        }
        let mut i = 0;
        while i < 8 {
            b[20 + i] = self.token[i];
            i += 1;
        }
        b
    }

    /// Writes the header to the front of `buf`; returns the bytes written.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let Some(out) = buf.get_mut(..Self::LEN) else {
            return Err(WireError::Truncated);
        };
        out.copy_from_slice(&self.to_bytes());
        Ok(Self::LEN)
    }
}

/// The outer IPv4 and UDP headers of a wrapped packet: the one place they
/// are built, by the origin's wrap, the server's and a relay's rewrite.
/// `inner_len` is the inner IPv4 packet's total length.
///
/// IPv4: no options, DF set and the identification zero (an atomic
/// datagram's means nothing: RFC 6864), TTL 64, the checksum computed in
/// full. UDP: the checksum zero ("none"), as VXLAN and GUE send it; the
/// inner packet keeps its own checksums end to end.
#[inline(always)]
pub fn outer_headers(
    (src_ip, src_port): (u32, u16),
    (dst_ip, dst_port): (u32, u16),
    inner_len: u16,
) -> [u8; IPV4_LEN + UDP_LEN] {
    let tot = inner_len.wrapping_add(OUTER_LEN as u16).to_be_bytes();
    let udp_len = inner_len
        .wrapping_add((UDP_LEN + BondHdr::LEN) as u16)
        .to_be_bytes();
    let df = IPV4_DF.to_be_bytes();
    let (s, d) = (src_ip.to_be_bytes(), dst_ip.to_be_bytes());
    let (sp, dp) = (src_port.to_be_bytes(), dst_port.to_be_bytes());
    #[rustfmt::skip]
    let mut h = [
        IPV4_VIHL, 0, tot[0], tot[1], 0, 0, df[0], df[1], TTL, IPPROTO_UDP, 0, 0, s[0], s[1], s[2],
        s[3], d[0], d[1], d[2], d[3], // IPv4
        sp[0], sp[1], dp[0], dp[1], udp_len[0], udp_len[1], 0, 0, // UDP
    ];
    let mut ip = [0u8; IPV4_LEN];
    ip.copy_from_slice(&h[..IPV4_LEN]);
    let c = crate::csum::ipv4_header(&ip).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

/// The outer IPv6 header of a link over IPv6, for `plen` bytes of UDP
/// (its checksum zero, RFC 6935) from `src` to `dst`: hop limit 64, no
/// flow label, no extension headers.
#[inline(always)]
pub fn outer6_header(plen: u16, src: &[u8; 16], dst: &[u8; 16]) -> [u8; IPV6_LEN] {
    let mut ip = [0u8; IPV6_LEN];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&plen.to_be_bytes());
    ip[6] = IPPROTO_UDP;
    ip[7] = TTL;
    ip[8..24].copy_from_slice(src);
    ip[24..40].copy_from_slice(dst);
    ip
}

/// ICMP error types (RFC 792): destination unreachable, time exceeded,
/// parameter problem.
pub const ICMP_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Destination unreachable's code "fragmentation needed and DF set" (RFC
/// 1191: the next-hop MTU in the last two bytes).
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// What an ICMP error bond writes carries after its Ethernet header:
/// IPv4, ICMP, and the offending packet's IPv4 header and first 8 bytes
/// (all RFC 792 asks for, and what a sender needs to find its socket).
pub const ICMP_ERROR_LEN: usize = IPV4_LEN + 8 + IPV4_LEN + 8;

/// What an ICMPv6 error bond writes (Packet Too Big, Time Exceeded)
/// carries after its Ethernet header: IPv6, ICMPv6, and the offending
/// packet's IPv6 header and first 8 bytes (RFC 4443 asks for as much as
/// fits in 1280 bytes; this is what a sender needs to find its socket).
pub const ICMP6_ERROR_LEN: usize = IPV6_LEN + 8 + IPV6_LEN + 8;

/// The IPv4 and ICMP headers of a fragmentation-needed error from `src`
/// about the packet whose IPv4 header (no options) is `orig` and whose
/// transport header starts with `l4`, telling its sender that `mtu` is the
/// largest packet that fits ([`icmp_error`]).
#[inline(always)]
pub fn frag_needed(src: u32, orig: &[u8; 20], l4: &[u8; 8], mtu: u16) -> ([u8; 20], [u8; 8]) {
    let m = mtu.to_be_bytes();
    let head = [ICMP_UNREACHABLE, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]];
    icmp_error(src, orig, l4, head)
}

/// The IPv4 and ICMP headers of a time-exceeded-in-transit error from
/// `src` about the packet `orig`, `l4` ([`icmp_error`]): a router's answer
/// to a packet whose TTL ran out there, which traceroute reads as a hop.
#[inline(always)]
pub fn time_exceeded(src: u32, orig: &[u8; 20], l4: &[u8; 8]) -> ([u8; 20], [u8; 8]) {
    icmp_error(src, orig, l4, [ICMP_TIME_EXCEEDED, 0, 0, 0, 0, 0, 0, 0])
}

/// The IPv4 and ICMP headers of an ICMP error from `src` whose ICMP header
/// is `head` (its checksum left zero), about the packet whose IPv4 header
/// (no options) is `orig` and whose transport header starts with `l4`:
/// addressed to that packet's source. The error's payload is `orig`
/// followed by `l4`, which the checksum covers ([`ICMP_ERROR_LEN`] in all).
#[inline(always)]
pub fn icmp_error(
    src: u32,
    orig: &[u8; 20],
    l4: &[u8; 8],
    mut icmp: [u8; 8],
) -> ([u8; 20], [u8; 8]) {
    let t = (ICMP_ERROR_LEN as u16).to_be_bytes();
    let s = src.to_be_bytes();
    let mut ip = [
        IPV4_VIHL,
        0,
        t[0],
        t[1],
        0,
        0,
        0,
        0,
        TTL,
        IPPROTO_ICMP,
        0,
        0,
        s[0],
        s[1],
        s[2],
        s[3],
        orig[12],
        orig[13],
        orig[14],
        orig[15],
    ];
    let c = crate::csum::ipv4_header(&ip).to_be_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    icmp[2] = 0;
    icmp[3] = 0;
    // Plain loops over fixed sizes: the verifier sees bounded indices.
    let mut sum = 0u32;
    let mut i = 0;
    while i < 8 {
        sum += u32::from(u16::from_be_bytes([icmp[i], icmp[i + 1]]));
        sum += u32::from(u16::from_be_bytes([l4[i], l4[i + 1]]));
        i += 2;
    }
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([orig[i], orig[i + 1]]));
        i += 2;
    }
    let c = (!crate::csum::fold(sum)).to_be_bytes();
    icmp[2] = c[0];
    icmp[3] = c[1];
    (ip, icmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frag_needed_is_a_valid_icmp_error_to_the_sender() {
        use etherparse::{
            Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder, icmpv4::DestUnreachableHeader,
        };
        // A 1500-byte UDP packet from a content server to the NAT address.
        let mut orig = Vec::new();
        PacketBuilder::ipv4([203, 0, 113, 2], [203, 0, 113, 1], 61)
            .udp(9999, 20001)
            .write(&mut orig, &[7u8; 1472])
            .unwrap();
        let h: [u8; 20] = orig[..20].try_into().unwrap();
        let l4: [u8; 8] = orig[20..28].try_into().unwrap();
        let nat = u32::from_be_bytes([203, 0, 113, 1]);
        let (ip, icmp) = frag_needed(nat, &h, &l4, 1448);

        let mut pkt = ip.to_vec();
        pkt.extend_from_slice(&icmp);
        pkt.extend_from_slice(&orig[..28]);
        assert_eq!(pkt.len(), ICMP_ERROR_LEN);
        let iph = Ipv4HeaderSlice::from_slice(&pkt).unwrap().to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(iph.source, [203, 0, 113, 1]);
        assert_eq!(iph.destination, [203, 0, 113, 2], "back to the sender");
        assert_eq!(usize::from(iph.total_len), ICMP_ERROR_LEN);
        assert_eq!(iph.protocol, etherparse::IpNumber::ICMP);
        let msg = Icmpv4Slice::from_slice(&pkt[20..]).unwrap();
        assert_eq!(
            msg.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1448
            })
        );
        assert_eq!(msg.checksum(), msg.icmp_type().calc_checksum(msg.payload()));
        assert_eq!(
            msg.payload(),
            &orig[..28],
            "the offending header and 8 bytes"
        );
    }

    #[test]
    fn time_exceeded_is_a_valid_icmp_error_to_the_sender() {
        use etherparse::{Icmpv4Slice, Icmpv4Type, Ipv4HeaderSlice, PacketBuilder};
        // A traceroute probe from an origin whose TTL runs out at the server.
        let mut orig = Vec::new();
        PacketBuilder::ipv4([10, 0, 1, 11], [203, 0, 113, 9], 1)
            .udp(41000, 33434)
            .write(&mut orig, &[0u8; 32])
            .unwrap();
        let h: [u8; 20] = orig[..20].try_into().unwrap();
        let l4: [u8; 8] = orig[20..28].try_into().unwrap();
        let (ip, icmp) = time_exceeded(u32::from_be_bytes([203, 0, 113, 1]), &h, &l4);
        let mut pkt = ip.to_vec();
        pkt.extend_from_slice(&icmp);
        pkt.extend_from_slice(&orig[..28]);
        let iph = Ipv4HeaderSlice::from_slice(&pkt).unwrap().to_header();
        assert_eq!(iph.header_checksum, iph.calc_header_checksum());
        assert_eq!(
            (iph.source, iph.destination),
            ([203, 0, 113, 1], [10, 0, 1, 11])
        );
        assert_eq!(usize::from(iph.total_len), ICMP_ERROR_LEN);
        let msg = Icmpv4Slice::from_slice(&pkt[20..]).unwrap();
        assert_eq!(
            msg.icmp_type(),
            Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit)
        );
        assert_eq!(msg.checksum(), msg.icmp_type().calc_checksum(msg.payload()));
        assert_eq!(msg.payload(), &orig[..28]);
    }

    #[test]
    fn header_roundtrip() {
        let h = BondHdr::new(
            kind::DATA_UP,
            4_000_000_007,
            3,
            0x0a00_0102,
            99,
            0xdead_beef_0123_4567,
        );
        let mut buf = [0u8; 30];
        assert_eq!(h.emit(&mut buf), Ok(28));
        let p = BondHdr::parse(&buf).unwrap();
        assert_eq!(p, h);
        assert_eq!(p.community(), 4_000_000_007);
        assert_eq!(p.link, 3);
        assert_eq!(p.origin(), 0x0a00_0102);
        assert_eq!(p.sent_us(), 99);
        assert_eq!(p.token(), 0xdead_beef_0123_4567);
        assert!(p.is_data());
        let s = BondHdr::parse(&h.with_seq(0xfe).to_bytes()).unwrap();
        assert_eq!((s.seq, s.to_bytes()[9]), (0xfe, 0xfe));
    }

    #[test]
    fn sequence_skips_zero_and_counts_what_is_missing() {
        assert_eq!((seq_next(1), seq_next(126), seq_next(127)), (2, 127, 1));
        assert_eq!(seq_missing(1, 2), 0);
        assert_eq!(seq_missing(1, 5), 3);
        assert_eq!(seq_missing(127, 1), 0, "round past 0");
        assert_eq!(seq_missing(126, 3), 3, "127, 1, 2");
        // The same again, or one back: the whole sequence less one or two.
        assert_eq!(seq_missing(7, 7), 126);
        assert_eq!(seq_missing(7, 6), 125);
        let mut s = 9u8;
        for n in 0..126u8 {
            assert_eq!(seq_missing(9, seq_next(s)), n);
            s = seq_next(s);
        }
        assert_eq!(
            seq_next(SEQ_MAX) & SEQ_COPY,
            0,
            "a number never looks like a copy"
        );
    }

    #[test]
    fn header_bytes_are_network_order() {
        let h = BondHdr::new(
            kind::DATA_DOWN,
            0x0a0b_0102,
            5,
            0x0a000103,
            0x01020304,
            0x1122334455667788,
        );
        assert_eq!(
            h.to_bytes(),
            [
                0xB0, 0x4D, 4, 2, 0x0a, 0x0b, 0x01, 0x02, 5, 0, 0, 0, 10, 0, 1, 3, 1, 2, 3, 4,
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
    }

    #[test]
    fn parse_rejects_bad_input() {
        let good = BondHdr::new(kind::DATA_UP, 1, 0, 1, 1, 1).to_bytes();
        for n in 0..BondHdr::LEN {
            assert_eq!(
                BondHdr::parse(&good[..n]),
                Err(WireError::Truncated),
                "len {n}"
            );
        }
        let mut bad = good;
        bad[0] = 0;
        assert_eq!(BondHdr::parse(&bad), Err(WireError::BadMagic));
        // Version 3, the last with a 16-bit community, is refused as a
        // whole (its fields lie elsewhere).
        for v in [1, 3, 5] {
            let mut bad = good;
            bad[2] = v;
            assert_eq!(BondHdr::parse(&bad), Err(WireError::BadVersion));
        }
        // A sequence is DATA's only.
        let mut seq = good;
        seq[9] = 1;
        assert!(BondHdr::parse(&seq).is_ok());
        let mut bad = BondHdr::new(kind::ECHO, 1, 0, 1, 1, 1).to_bytes();
        bad[9] = 1;
        assert_eq!(BondHdr::parse(&bad), Err(WireError::BadFlags));
        for i in [10, 11] {
            let mut bad = good;
            bad[i] = 0x80;
            assert_eq!(
                BondHdr::parse(&bad),
                Err(WireError::BadFlags),
                "reserved byte {i}"
            );
        }
        assert_eq!(
            BondHdr::emit(&BondHdr::from_bytes(good), &mut [0u8; 27]),
            Err(WireError::Truncated)
        );
    }

    #[test]
    fn outer_headers_are_valid() {
        let h = outer_headers((0x0a000101, 7001), (0xc6336401, 7000), 100);
        let (ip, rest) = etherparse::Ipv4Header::from_slice(&h).unwrap();
        assert_eq!(ip.total_len, 156);
        assert_eq!(ip.header_checksum, ip.calc_header_checksum());
        assert!(ip.dont_fragment && !ip.more_fragments);
        assert_eq!((ip.identification, ip.time_to_live), (0, 64));
        assert_eq!(ip.protocol, etherparse::IpNumber::UDP);
        assert_eq!(ip.source, [10, 0, 1, 1]);
        assert_eq!(ip.destination, [198, 51, 100, 1]);
        let udp = etherparse::UdpHeader::from_slice(rest).unwrap().0;
        assert_eq!(
            (
                udp.source_port,
                udp.destination_port,
                udp.length,
                udp.checksum
            ),
            (7001, 7000, 136, 0)
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            if let Ok(h) = BondHdr::parse(&bytes) {
                proptest::prop_assert_eq!(&h.to_bytes()[..], &bytes[..BondHdr::LEN]);
            }
        }
    }
}
