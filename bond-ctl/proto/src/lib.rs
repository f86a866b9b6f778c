//! What the members of a bond community say to each other, and how they
//! know it is one of them speaking: the community key and its one HMAC
//! ([`CommunityKey`]), the signed control messages that ride the data
//! ports ([`control`]: announces, logins, echoes, feedback), and the signed
//! JSON bodies the distribution service and the peer cache post
//! ([`signed`]), and each terminal's own key pair ([`identity`]), with
//! which an ISP's node tells one terminal from another, and the key each
//! session shares between its terminal and the server ([`session`]). The agent, the relay tree and the peer cache depend on
//! this crate, not on each other.

pub mod control;
pub mod identity;
mod key;
pub mod session;
pub mod signed;

pub use key::{CommunityKey, MIN_KEY_LEN, SKEW_MS};

/// Wall-clock time, Unix milliseconds: what signed messages carry.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// Wall-clock time, Unix microseconds.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
