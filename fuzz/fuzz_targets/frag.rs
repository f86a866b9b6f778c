//! The splitter's IPv4 reader (`bond_common::frag`): any bytes and room
//! either fail with a reason or split into pieces that fit the room, each
//! with a valid header, and that put back together by offset give exactly
//! the packet's payload.
#![no_main]

use bond_common::{csum, frag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((room, pkt)) = data.split_first_chunk::<2>() else {
        return;
    };
    let room = usize::from(u16::from_be_bytes(*room));
    let Ok(pieces) = frag::split(pkt, room) else {
        return;
    };
    let total = pieces.total();
    let tot = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    let mut whole = Vec::new();
    let mut n = 0;
    let mut first_off = None;
    for (h, body) in pieces {
        n += 1;
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        assert_eq!(len, 20 + body.len());
        if total > 1 {
            assert!(len <= room, "{len} > {room}");
            assert_eq!(csum::ipv4_header(&h), u16::from_be_bytes([h[10], h[11]]));
            let off = usize::from(u16::from_be_bytes([h[6], h[7]]) & 0x1fff) * 8;
            let first = *first_off.get_or_insert(off);
            assert_eq!(off - first, whole.len());
        } else {
            assert_eq!(h[..], pkt[..20]);
        }
        whole.extend_from_slice(body);
    }
    assert_eq!(n, total);
    assert_eq!(whole, pkt[20..tot]);
});
