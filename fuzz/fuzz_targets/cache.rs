//! The peer cache's parsers: LAN datagrams (raw, and signed with the key
//! so the input reaches the JSON), byte ranges, signed updates fed to the
//! referral table, and the store's index. Whatever parses must encode
//! back to the same; nothing may panic; the table and the LRU keep their
//! invariants whatever they are fed.
#![no_main]

use bond_cache::{
    msg::{self, Object, Update},
    serve::parse_range,
    store::Lru,
    table::Table,
};
use bond_proto::{CommunityKey, signed};
use libfuzzer_sys::fuzz_target;

static KEY: std::sync::LazyLock<CommunityKey> =
    std::sync::LazyLock::new(|| CommunityKey::new("fuzzing community key"));

fuzz_target!(|data: &[u8]| {
    let now = now(data);
    let _ = msg::open_lan(&KEY, data, now);
    let mut d = hex::encode(signed::tag(&KEY, msg::LAN_PATH, data)).into_bytes();
    d.push(b'\n');
    d.extend_from_slice(data);
    if let Ok(m) = msg::open_lan(&KEY, &d, now) {
        assert_eq!(msg::open_lan(&KEY, &msg::seal_lan(&KEY, &m, 1), 1), Ok(m));
    }

    if let Ok(s) = std::str::from_utf8(data) {
        let size = data.len() as u64 * 977;
        if let Some(r) = parse_range(s, size) {
            assert!(r.start < r.end && r.end <= size, "{s:?} -> {r:?}");
        }
    }

    let sig = hex::encode(signed::tag(&KEY, "/cache/update", data));
    if let Ok(u) = signed::open::<Update>(&KEY, "/cache/update", data, Some(&sig), now) {
        let mut t = Table::default();
        t.apply(&u);
        t.apply(&u);
        let me = "10.0.1.1:7801".parse().unwrap();
        let client = "10.0.1.9:7801".parse().unwrap();
        for (o, sources) in t.dump() {
            let r = t.refer(client, &o.url, me);
            assert!(r.sources.iter().all(|s| s.endpoint != client));
            assert_eq!(r.sources.len(), sources.iter().filter(|s| s.endpoint != client).count());
        }
        for p in t.peers() {
            t.probe_failed(p);
        }
    }

    if let Ok(index) = serde_json::from_slice::<Vec<Object>>(data) {
        let max = 1 << 20;
        let mut lru = Lru::default();
        for o in index {
            let size = o.size;
            lru.insert(o, max);
            // Only the one just put in may hold more than the bound.
            assert!(lru.bytes() <= max || lru.list().len() == 1 && lru.bytes() == size);
        }
    }
});

/// The time in the message, if it has one, so freshness passes.
fn now(data: &[u8]) -> u64 {
    let body = data.splitn(2, |b| *b == b'\n').last().unwrap_or(data);
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["ts"].as_u64())
        .unwrap_or(0)
}
