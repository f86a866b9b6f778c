//! The control message decoder. Raw input exercises the header, length and
//! signature checks; the same input signed with the key (as a member would)
//! reaches the body parser. Whatever decodes must encode back to a message
//! that decodes to the same value; nothing may panic.
#![no_main]

use bond_proto::{
    CommunityKey,
    control::{Msg, TAG_LEN, tag},
};
use libfuzzer_sys::fuzz_target;

static KEY: std::sync::LazyLock<CommunityKey> =
    std::sync::LazyLock::new(|| CommunityKey::new("fuzzing community key"));

fuzz_target!(|data: &[u8]| {
    let key = |_: u16| Some(&*KEY);
    if let Ok(m) = Msg::decode(data, key) {
        check(&m);
    }
    let mut signed = data.to_vec();
    signed.extend_from_slice(&tag(&KEY, data));
    if let Ok(m) = Msg::decode(&signed, key) {
        check(&m);
    }
    // A wrong key never decodes.
    if data.len() >= TAG_LEN {
        let other = CommunityKey::new("another key, not the community's");
        assert!(Msg::decode(&signed, |_| Some(&other)).is_err());
    }
});

fn check(m: &Msg) {
    let again = Msg::decode(&m.encode(&KEY), |_| Some(&*KEY)).expect("a decoded message re-encodes");
    assert_eq!(&again, m);
}
