//! Internet checksum arithmetic (RFC 1071, RFC 1624).
//!
//! All values are host-order numbers: a checksum field is read with
//! `u16::from_be_bytes`, updated here, and written back with `to_be_bytes`.
//! The small outer IPv4 header is recomputed in full; inner headers are
//! updated incrementally, as Katran does.

/// Folds a 32-bit one's-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum of a 20-byte IPv4 header (no options), ignoring whatever the
/// checksum field (bytes 10..12) holds.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        }
        i += 2;
    }
    !fold(sum)
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changes from `old`
/// to `new`: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32 & 0xffff) + new as u32;
    !fold(sum)
}

/// As [`replace16`] for a 32-bit field (an address), one word at a time.
#[inline(always)]
pub const fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let check = replace16(check, (old >> 16) as u16, (new >> 16) as u16);
    replace16(check, old as u16, new as u16)
}

/// As [`replace16`] for an IPv6 address, one word at a time.
#[inline(always)]
pub fn replace128(mut check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    let mut i = 0;
    while i < 16 {
        check = replace16(
            check,
            u16::from_be_bytes([old[i], old[i + 1]]),
            u16::from_be_bytes([new[i], new[i + 1]]),
        );
        i += 2;
    }
    check
}

/// UDP's rule on top of the arithmetic: a zero checksum means "none" and
/// stays zero; a computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
pub const fn udp_replace32(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace32(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// As [`udp_replace32`] for a 16-bit field (a port).
#[inline(always)]
pub const fn udp_replace16(check: u16, old: u16, new: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace16(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Full one's-complement sum over a byte slice (host side: tests and the
/// agent's control messages; the eBPF side never sums a whole payload).
#[cfg(any(feature = "user", test))]
pub fn sum_bytes(bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    let mut sum: u32 = chunks
        .by_ref()
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(bytes: &[u8]) -> u16 {
        // Independent RFC 1071 implementation: u64 accumulator, fold at end.
        let mut sum: u64 = 0;
        for pair in bytes.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u64::from(*b));
            sum += hi | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn ipv4_header_matches_known_vector() {
        // Wikipedia's worked example: checksum 0xb861.
        let hdr: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(ipv4_header(&hdr), 0xb861);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(ipv4_header(&zeroed), 0xb861, "the old checksum is ignored");
    }

    #[test]
    fn ipv4_header_agrees_with_etherparse() {
        let ip = etherparse::Ipv4Header::new(
            1234,
            17,
            etherparse::IpNumber::UDP,
            [10, 0, 1, 2],
            [203, 0, 113, 2],
        )
        .unwrap();
        let bytes = ip.to_bytes();
        let arr: [u8; 20] = bytes[..20].try_into().unwrap();
        assert_eq!(ipv4_header(&arr), ip.calc_header_checksum());
    }

    #[test]
    fn sum_bytes_handles_odd_lengths() {
        assert_eq!(!fold(sum_bytes(&[1, 2, 3])), reference(&[1, 2, 3]));
        assert_eq!(!fold(sum_bytes(&[])), reference(&[]));
    }

    proptest::proptest! {
        #[test]
        fn incremental_equals_recompute(
            mut data in proptest::collection::vec(proptest::prelude::any::<u8>(), 10..64),
            at in 0usize..4,
            new in proptest::prelude::any::<u32>(),
        ) {
            // Place a 32-bit field at an even offset, change it, and compare
            // the incremental update against a full recomputation.
            let off = at * 2;
            let before = reference(&data);
            let old = u32::from_be_bytes(data[off..off + 4].try_into().unwrap());
            data[off..off + 4].copy_from_slice(&new.to_be_bytes());
            let after = reference(&data);
            let inc = replace32(before, old, new);
            // 0x0000 and 0xffff are the same one's-complement value.
            proptest::prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0),
                "incremental {inc:#06x} vs recomputed {after:#06x}");
        }

        #[test]
        fn incremental16_equals_recompute(
            mut data in proptest::collection::vec(proptest::prelude::any::<u8>(), 4..64),
            at in 0usize..2,
            new in proptest::prelude::any::<u16>(),
        ) {
            let off = at * 2;
            let before = reference(&data);
            let old = u16::from_be_bytes([data[off], data[off + 1]]);
            data[off..off + 2].copy_from_slice(&new.to_be_bytes());
            let after = reference(&data);
            let inc = replace16(before, old, new);
            proptest::prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0));
        }
    }

    proptest::proptest! {
        #[test]
        fn incremental128_equals_recompute(
            mut data in proptest::collection::vec(proptest::prelude::any::<u8>(), 40..80),
            at in 0usize..8,
            new in proptest::prelude::any::<[u8; 16]>(),
        ) {
            let off = at * 2;
            let before = reference(&data);
            let old: [u8; 16] = data[off..off + 16].try_into().unwrap();
            data[off..off + 16].copy_from_slice(&new);
            let after = reference(&data);
            let inc = replace128(before, &old, &new);
            proptest::prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0));
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace32(0, 1, 2), 0);
        assert_eq!(udp_replace16(0, 1, 2), 0);
    }
}
