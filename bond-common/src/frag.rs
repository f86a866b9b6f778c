//! IPv4 fragmentation (RFC 791 section 3.2): splitting a packet without
//! "don't fragment" that is too big for a link into fragments that fit.
//!
//! The server's datapath hands such packets to its agent (`S_SPLIT`), which
//! splits them here and sends the pieces back through the datapath, each
//! small enough to be wrapped. A piece of a packet that was itself a
//! fragment keeps its place in the whole datagram: offsets count from the
//! original's, and only the original's last piece may end the datagram.

use crate::{csum, wire};

/// Why a packet cannot be split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitError {
    /// Shorter than its header or its total length, or not IPv4.
    Malformed,
    /// IP options: bond carries none.
    Options,
    /// "Don't fragment" is set: the sender is told the MTU instead.
    DontFragment,
    /// `max_len` leaves no room for 8 bytes of payload.
    MtuTooSmall,
    /// The pieces would run past the largest fragment offset.
    TooLong,
}

/// The pieces of a packet: each an IPv4 header and the payload bytes
/// that follow it.
#[derive(Clone, Debug)]
pub struct Pieces<'a> {
    hdr: [u8; 20],
    payload: &'a [u8],
    /// The packet's own fragment offset, in 8-byte units.
    base: u16,
    /// Whether the packet itself had more fragments after it.
    more: bool,
    /// Payload bytes per piece, a multiple of 8.
    step: usize,
    at: usize,
    /// The packet fits: it comes back once, unchanged.
    whole: bool,
}

/// Splits IPv4 packet `pkt` (header first; bytes past its total length are
/// ignored) into pieces of at most `max_len` bytes each, header included.
/// A packet that fits comes back as one piece, unchanged.
pub fn split(pkt: &[u8], max_len: usize) -> Result<Pieces<'_>, SplitError> {
    let hdr: [u8; 20] = pkt
        .get(..20)
        .and_then(|h| h.try_into().ok())
        .ok_or(SplitError::Malformed)?;
    if hdr[0] >> 4 != 4 {
        return Err(SplitError::Malformed);
    }
    if hdr[0] != wire::IPV4_VIHL {
        return Err(SplitError::Options);
    }
    let tot = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if tot < 20 || tot > pkt.len() {
        return Err(SplitError::Malformed);
    }
    let flags = u16::from_be_bytes([hdr[6], hdr[7]]);
    let payload = &pkt[20..tot];
    if tot <= max_len {
        return Ok(Pieces {
            hdr,
            payload,
            base: 0,
            more: false,
            step: 8,
            at: 0,
            whole: true,
        });
    }
    if flags & wire::IPV4_DF != 0 {
        return Err(SplitError::DontFragment);
    }
    let step = max_len.saturating_sub(20) & !7;
    if step == 0 {
        return Err(SplitError::MtuTooSmall);
    }
    // A fragment with more after it carries a multiple of 8 bytes.
    if flags & MORE != 0 && !payload.len().is_multiple_of(8) {
        return Err(SplitError::Malformed);
    }
    let base = flags & OFFSET;
    // The last piece's offset must fit the 13-bit field.
    let last = usize::from(base) + (payload.len() - 1) / step * (step / 8);
    if last > usize::from(OFFSET) {
        return Err(SplitError::TooLong);
    }
    Ok(Pieces {
        hdr,
        payload,
        base,
        more: flags & MORE != 0,
        step,
        at: 0,
        whole: false,
    })
}

const MORE: u16 = wire::IPV4_MF;
const OFFSET: u16 = wire::IPV4_OFFSET;

impl Pieces<'_> {
    /// How many pieces there are in all.
    pub fn total(&self) -> usize {
        if self.whole {
            1
        } else {
            self.payload.len().div_ceil(self.step)
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = ([u8; 20], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.whole {
            self.whole = false;
            self.at = self.payload.len();
            return Some((self.hdr, self.payload));
        }
        if self.at >= self.payload.len() {
            return None;
        }
        let end = self.payload.len().min(self.at + self.step);
        let body = &self.payload[self.at..end];
        let last = end == self.payload.len();
        let mut h = self.hdr;
        let tot = (20 + body.len()) as u16;
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        let off = self.base + (self.at / 8) as u16;
        let more = if last { self.more } else { true };
        let flags = off | if more { MORE } else { 0 };
        h[6..8].copy_from_slice(&flags.to_be_bytes());
        let check = csum::ipv4_header(&h);
        h[10..12].copy_from_slice(&check.to_be_bytes());
        self.at = end;
        Some((h, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A UDP packet of `payload` bytes from 10.0.0.1 to 203.0.113.1, with
    /// `flags` (DF, MF, offset) as given.
    fn packet(payload: usize, flags: u16) -> Vec<u8> {
        let tot = 20 + payload;
        let mut p = vec![0u8; tot];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(tot as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&flags.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[203, 0, 113, 1]);
        let h: [u8; 20] = p[..20].try_into().unwrap();
        let check = csum::ipv4_header(&h);
        p[10..12].copy_from_slice(&check.to_be_bytes());
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        p
    }

    /// Puts the pieces back together as a receiver does: by offset, with
    /// every header checked against the original's. Returns the payload,
    /// whether the last piece has "more fragments", and the first offset.
    fn reassemble(orig: &[u8], pieces: Pieces<'_>, max_len: usize) -> (Vec<u8>, bool, u16) {
        let mut out = Vec::new();
        let mut first = None;
        let mut more_after_last = true;
        for (h, body) in pieces {
            let ip = etherparse::Ipv4HeaderSlice::from_slice(&h).expect("valid header");
            assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
            assert_eq!(usize::from(ip.total_len()), 20 + body.len());
            assert!(20 + body.len() <= max_len.max(orig.len()));
            assert!(!ip.dont_fragment());
            // Everything but length, flags and checksum as the original.
            assert_eq!(h[..2], orig[..2]);
            assert_eq!(h[4..6], orig[4..6]);
            assert_eq!(h[8..10], orig[8..10]);
            assert_eq!(h[12..20], orig[12..20]);
            let off = u16::from(ip.fragments_offset()) * 8;
            let start = *first.get_or_insert(off);
            assert_eq!(
                usize::from(off - start),
                out.len(),
                "pieces in order, no gaps"
            );
            if ip.more_fragments() {
                assert_eq!(body.len() % 8, 0, "only the last piece may be ragged");
            }
            more_after_last = ip.more_fragments();
            out.extend_from_slice(body);
        }
        (out, more_after_last, first.unwrap_or(0))
    }

    #[test]
    fn a_4000_byte_datagram_splits_to_fit_a_1448_byte_room() {
        let p = packet(3980, 0);
        let pieces = split(&p, 1448).unwrap();
        assert_eq!(pieces.total(), 3);
        let sizes: Vec<usize> = pieces.clone().map(|(_, b)| b.len()).collect();
        assert_eq!(sizes, [1424, 1424, 1132]);
        let (payload, more, first) = reassemble(&p, pieces, 1448);
        assert_eq!(payload, p[20..]);
        assert!(!more && first == 0);
    }

    #[test]
    fn a_fragment_splits_into_fragments_of_the_same_datagram() {
        // The middle fragment of a larger datagram (offset 1480 bytes, MF):
        // every piece keeps MF, and offsets count from 1480.
        let p = packet(1480, 0x2000 | 185);
        let pieces = split(&p, 1000).unwrap();
        let (payload, more, first) = reassemble(&p, pieces, 1000);
        assert_eq!(payload, p[20..]);
        assert!(more && first == 1480);
        // The last fragment (no MF): only its last piece ends the datagram.
        let p = packet(1000, 370);
        let (payload, more, first) = reassemble(&p, split(&p, 600).unwrap(), 600);
        assert_eq!(payload, p[20..]);
        assert!(!more && first == 2960);
    }

    #[test]
    fn a_packet_that_fits_comes_back_unchanged() {
        let p = packet(1000, 0x4000);
        let mut pieces = split(&p, 1500).unwrap();
        assert_eq!(pieces.total(), 1);
        let (h, body) = pieces.next().unwrap();
        assert_eq!(h[..], p[..20]);
        assert_eq!(body, &p[20..]);
        assert!(pieces.next().is_none());
    }

    #[test]
    fn what_cannot_be_split_says_why() {
        assert_eq!(
            split(&packet(2000, 0x4000), 1500).unwrap_err(),
            SplitError::DontFragment
        );
        assert_eq!(
            split(&packet(2000, 0), 27).unwrap_err(),
            SplitError::MtuTooSmall
        );
        let mut opts = packet(2000, 0);
        opts[0] = 0x46;
        assert_eq!(split(&opts, 1500).unwrap_err(), SplitError::Options);
        let mut v6 = packet(2000, 0);
        v6[0] = 0x60;
        assert_eq!(split(&v6, 1500).unwrap_err(), SplitError::Malformed);
        let p = packet(2000, 0);
        assert_eq!(split(&p[..1000], 1500).unwrap_err(), SplitError::Malformed);
        assert_eq!(split(&p[..19], 1500).unwrap_err(), SplitError::Malformed);
        // A fragment with more after it must end on an 8-byte boundary.
        let p = packet(2001, 0x2000);
        assert_eq!(split(&p, 1500).unwrap_err(), SplitError::Malformed);
        // A last fragment near the top of the offset range cannot grow.
        let p = packet(2000, 0x1fff - 10);
        assert_eq!(split(&p, 100).unwrap_err(), SplitError::TooLong);
    }

    proptest! {
        #[test]
        fn pieces_fit_and_reassemble_to_the_original(
            payload in 1usize..9000,
            max_len in 28usize..9100,
            off in 0u16..1000,
            more: bool,
        ) {
            let flags = off | if more { 0x2000 } else { 0 };
            let payload = if more { payload.next_multiple_of(8) } else { payload };
            let p = packet(payload, flags);
            let pieces = split(&p, max_len).unwrap();
            prop_assert_eq!(pieces.clone().count(), pieces.total());
            let (body, more_last, first) = reassemble(&p, pieces, max_len);
            prop_assert_eq!(&body[..], &p[20..]);
            if p.len() > max_len {
                prop_assert_eq!(more_last, more);
                prop_assert_eq!(first, off * 8);
            }
        }

        #[test]
        fn any_bytes_split_or_refuse_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            max_len in 0usize..4000,
        ) {
            if let Ok(pieces) = split(&bytes, max_len) {
                let total: usize = pieces.map(|(_, b)| b.len()).sum();
                prop_assert!(total <= bytes.len());
            }
        }
    }
}
