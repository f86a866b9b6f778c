//! The distribution service's parsers: the chunk stream's frames (cut at
//! every place the input's first byte picks), a manifest (named by its own
//! hash, so the input reaches the parser), and signed messages (signed with
//! the key, so the input reaches the JSON). Whatever parses must encode
//! back to the same; nothing may panic.
#![no_main]

use bond_relay::{
    chunk::Manifest,
    frame::{self, Frame, Reader},
    msg::{Report, TransportRequest},
};
use bond_proto::{CommunityKey, signed as msg};
use libfuzzer_sys::fuzz_target;

static KEY: std::sync::LazyLock<CommunityKey> =
    std::sync::LazyLock::new(|| CommunityKey::new("fuzzing community key"));

fuzz_target!(|data: &[u8]| {
    frames(data);
    let root = *blake3::hash(data).as_bytes();
    if let Ok(m) = Manifest::decode(data, &root) {
        assert_eq!(m.encode(), data, "a manifest has one encoding");
        assert_eq!(m.root(), root);
    }
    assert!(Manifest::decode(data, &[0; 32]).is_err() || root == [0; 32]);
    for path in ["/dist/request", "/dist/report"] {
        let sig = hex::encode(msg::tag(&KEY, path, data));
        if let Ok(r) = msg::open::<TransportRequest>(&KEY, path, data, Some(&sig), now(data)) {
            let (b, s) = msg::sign(&KEY, path, &r, 1);
            assert_eq!(msg::open(&KEY, path, &b, Some(&s), 1), Ok(r));
        }
        if let Ok(r) = msg::open::<Report>(&KEY, path, data, Some(&sig), now(data)) {
            let (b, s) = msg::sign(&KEY, path, &r, 1);
            assert_eq!(msg::open(&KEY, path, &b, Some(&s), 1), Ok(r));
        }
    }
});

/// The time in the message, if it has one, so freshness passes.
fn now(data: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v["ts"].as_u64())
        .unwrap_or(0)
}

fn frames(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let mut r = Reader::new(4096);
    let mut out = Vec::new();
    for piece in rest.chunks(usize::from(step.max(1))) {
        r.push(piece);
        loop {
            match r.next_frame() {
                Ok(Some(Frame::Heartbeat)) => out.extend(frame::heartbeat()),
                Ok(Some(Frame::Chunk(i, sealed))) => {
                    assert!(sealed.len() <= 4096);
                    out.extend(frame::encode(i, &sealed));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    // What came out is what went in, up to the last whole frame.
    assert_eq!(out, rest[..out.len()]);
}
