//! The control message decoder. Raw input exercises the header, length and
//! signature checks; the same input signed with the key (as a member would)
//! reaches the body parser. Whatever decodes must encode back to a message
//! that decodes to the same value, and signed by a terminal's key, to one
//! that its key and no other verifies, and with a session's MAC, to one
//! that session's key and no other takes; nothing may panic.
#![no_main]

use bond_proto::{
    CommunityKey,
    control::{Msg, TAG_LEN, flags, tag},
    identity::Identity,
    session::{Exchange, SessionKey, Transcript},
};
use libfuzzer_sys::fuzz_target;

static KEY: std::sync::LazyLock<CommunityKey> =
    std::sync::LazyLock::new(|| CommunityKey::new("fuzzing community key"));
static TERMINAL: std::sync::LazyLock<Identity> =
    std::sync::LazyLock::new(|| Identity::from_seed([7; 32]));
static OTHER: std::sync::LazyLock<Identity> =
    std::sync::LazyLock::new(|| Identity::from_seed([8; 32]));
static SESSIONS: std::sync::LazyLock<[SessionKey; 2]> = std::sync::LazyLock::new(|| {
    let server = Exchange::from_secret([9; 32]);
    [[1; 32], [2; 32]].map(|s| {
        let t = Exchange::from_secret(s);
        let tr = Transcript {
            community: 1,
            origin: std::net::Ipv4Addr::new(10, 0, 1, 1),
            token: 1,
            terminal: t.public(),
            server: server.public(),
        };
        t.key(&server.public(), &tr).expect("a session key")
    })
});

fuzz_target!(|data: &[u8]| {
    let key = |_: u32| Some(&*KEY);
    if let Ok(m) = Msg::decode(data, key) {
        check(&m, data);
    }
    let mut signed = data.to_vec();
    signed.extend_from_slice(&tag(&KEY, data));
    if let Ok(m) = Msg::decode(&signed, key) {
        check(&m, &signed);
    }
    // A wrong key never decodes.
    if data.len() >= TAG_LEN {
        let other = CommunityKey::new("another key, not the community's");
        assert!(Msg::decode(&signed, |_| Some(&other)).is_err());
    }
});

fn check(m: &Msg, buf: &[u8]) {
    // Whatever signature it carries, checking it never panics.
    let _ = Msg::signed_by(buf, &TERMINAL.public());
    let _ = Msg::session_ok(buf, &SESSIONS[0]);
    let plain = Msg {
        flags: m.flags & !(flags::SIGNED | flags::SESSION),
        ..m.clone()
    };
    let again = Msg::decode(&m.encode(&KEY), |_| Some(&*KEY)).expect("a decoded message re-encodes");
    assert_eq!(again, plain);
    let by_terminal = m.encode_as(&KEY, Some(&TERMINAL));
    let again = Msg::decode(&by_terminal, |_| Some(&*KEY)).expect("and signed by a terminal");
    assert_eq!(again.flags, plain.flags | flags::SIGNED);
    assert!(Msg::signed_by(&by_terminal, &TERMINAL.public()));
    assert!(!Msg::signed_by(&by_terminal, &OTHER.public()));
    let keyed = m.encode_with(&KEY, Some(&TERMINAL), Some(&SESSIONS[0]));
    let again = Msg::decode(&keyed, |_| Some(&*KEY)).expect("and with a session's MAC");
    assert_eq!(again.flags, plain.flags | flags::SIGNED | flags::SESSION);
    assert!(Msg::signed_by(&keyed, &TERMINAL.public()));
    assert!(Msg::session_ok(&keyed, &SESSIONS[0]));
    assert!(!Msg::session_ok(&keyed, &SESSIONS[1]));
    assert!(!Msg::session_ok(&by_terminal, &SESSIONS[0]));
}
