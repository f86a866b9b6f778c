//! The community key, and the one HMAC every signed message uses.

use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use sha2::Sha256;

/// Clock difference tolerated between members: a signed message older or
/// newer than this is refused.
pub const SKEW_MS: u64 = 30_000;

/// Shortest key accepted, in bytes.
pub const MIN_KEY_LEN: usize = 16;

/// A community's shared key, as its configuration gives it. Never printed;
/// its bytes leave only as HMAC-SHA256 tags and keys derived from it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct CommunityKey(String);

impl std::fmt::Debug for CommunityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommunityKey(..)")
    }
}

impl CommunityKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// Why the key is too weak to use, if it is.
    pub fn weakness(&self) -> Option<String> {
        (self.0.len() < MIN_KEY_LEN)
            .then(|| format!("key is {} bytes; use at least {MIN_KEY_LEN}", self.0.len()))
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut m =
            Hmac::<Sha256>::new_from_slice(self.0.as_bytes()).expect("HMAC takes any key length");
        for p in parts {
            m.update(p);
        }
        m
    }

    /// HMAC-SHA256 over `parts`, one after the other.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// A key for another use (sealing chunks, say), derived from this one
    /// under `context` (BLAKE3's key derivation).
    pub fn derive_key(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.0.as_bytes())
    }

    /// Whether `tag` is the tag of `parts`, or its first bytes (at least
    /// half of it); compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() >= 16 && self.mac(parts).verify_truncated_left(tag).is_ok()
    }
}
