//! Session keys: one secret per terminal and session, shared by the
//! terminal and the server alone.
//!
//! The community key is every member's, and the session token rides in
//! every data header its peers relay: with those alone one member could
//! speak for another in every message that is not signed (echoes,
//! feedback, requests to send again, unchanged announces) and forge the
//! server's answers to it. Where the server has a site key that the
//! terminals pin (`site_key`, `server_key`):
//!
//! - the terminal's LOGIN (signed by its identity) carries a fresh X25519
//!   public key; the server's LOGIN_REPLY carries one of its own and the
//!   site key's signature (as does every LOGIN_REPLY it sends);
//! - both derive the session key from the exchange and what the login
//!   named ([`Exchange::key`]);
//! - every later message between them carries a MAC with that key
//!   ([`crate::control::flags::SESSION`]), checked before the message
//!   counts. A message of the session without it is refused.
//!
//! X25519 is curve25519-dalek's (RFC 7748); the key is BLAKE3's
//! `derive_key` over the shared secret and the transcript; the MAC is
//! BLAKE3 keyed by it, cut to [`MAC_LEN`] bytes.

use std::net::Ipv4Addr;

use curve25519_dalek::montgomery::MontgomeryPoint;

/// Bytes of an exchange's public key.
pub const EXCHANGE_LEN: usize = 32;
/// Bytes of a session MAC.
pub const MAC_LEN: usize = 16;

const CONTEXT: &str = "bond 2026-12 session key v1";

/// One side's fresh X25519 key pair for one login.
pub struct Exchange {
    secret: [u8; 32],
    public: [u8; EXCHANGE_LEN],
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Exchange({})", hex::encode(self.public))
    }
}

/// What the login named, bound into its key: a key made for one
/// terminal, community, token or pair of public keys is no other's.
#[derive(Clone, Copy, Debug)]
pub struct Transcript {
    pub community: u32,
    pub origin: Ipv4Addr,
    pub token: u64,
    /// The terminal's public key of the exchange, and the server's.
    pub terminal: [u8; EXCHANGE_LEN],
    pub server: [u8; EXCHANGE_LEN],
}

impl Exchange {
    /// A new key pair from the kernel's random source.
    pub fn generate() -> Result<Self, String> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("the kernel's random source: {e}"))?;
        Ok(Self::from_secret(secret))
    }

    /// The pair of a given secret (tests).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let public = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Self { secret, public }
    }

    pub fn public(&self) -> [u8; EXCHANGE_LEN] {
        self.public
    }

    /// The session key with the other side's public key `theirs`; None
    /// if the exchange gives nothing secret (a low-order point, all-zero
    /// shared secret: a forged key).
    pub fn key(&self, theirs: &[u8; EXCHANGE_LEN], t: &Transcript) -> Option<SessionKey> {
        let shared = MontgomeryPoint(*theirs).mul_clamped(self.secret).to_bytes();
        if shared == [0; 32] {
            return None;
        }
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        h.update(&shared)
            .update(&t.community.to_be_bytes())
            .update(&t.origin.octets())
            .update(&t.token.to_be_bytes())
            .update(&t.terminal)
            .update(&t.server);
        Some(SessionKey(*h.finalize().as_bytes()))
    }
}

/// A session's key.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    pub fn mac(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let h = blake3::keyed_hash(&self.0, data);
        let mut m = [0u8; MAC_LEN];
        m.copy_from_slice(&h.as_bytes()[..MAC_LEN]);
        m
    }

    /// Whether `mac` is this key's over `data`, in constant time.
    pub fn verify(&self, data: &[u8], mac: &[u8]) -> bool {
        mac.len() == MAC_LEN
            && self
                .mac(data)
                .iter()
                .zip(mac)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(t: &Exchange, s: &Exchange) -> Transcript {
        Transcript {
            community: 70_007,
            origin: Ipv4Addr::new(10, 0, 1, 2),
            token: 0x1234,
            terminal: t.public(),
            server: s.public(),
        }
    }

    #[test]
    fn both_sides_derive_one_key_and_nothing_else_gives_it() {
        let (t, s) = (Exchange::generate().unwrap(), Exchange::generate().unwrap());
        let tr = transcript(&t, &s);
        let kt = t.key(&s.public(), &tr).unwrap();
        let ks = s.key(&t.public(), &tr).unwrap();
        assert_eq!(kt, ks);
        // Another terminal, token or community: another key.
        let other = Transcript {
            origin: Ipv4Addr::new(10, 0, 1, 3),
            ..tr
        };
        assert_ne!(s.key(&t.public(), &other).unwrap(), ks);
        let other = Transcript { token: 1, ..tr };
        assert_ne!(s.key(&t.public(), &other).unwrap(), ks);
        // A third party's exchange with the server: another key.
        let m = Exchange::generate().unwrap();
        assert_ne!(s.key(&m.public(), &tr).unwrap(), ks);
        // A low-order point gives nothing.
        assert!(s.key(&[0; 32], &tr).is_none());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(s.key(&one, &tr).is_none());
    }

    #[test]
    fn a_mac_is_checked_whole_and_by_its_key_only() {
        let (t, s) = (Exchange::generate().unwrap(), Exchange::generate().unwrap());
        let k = t.key(&s.public(), &transcript(&t, &s)).unwrap();
        let mac = k.mac(b"an echo");
        assert!(k.verify(b"an echo", &mac));
        assert!(!k.verify(b"an echo!", &mac));
        assert!(!k.verify(b"an echo", &mac[..MAC_LEN - 1]));
        let mut flipped = mac;
        flipped[MAC_LEN - 1] ^= 1;
        assert!(!k.verify(b"an echo", &flipped));
        let other = Exchange::generate().unwrap();
        let k2 = other.key(&s.public(), &transcript(&other, &s)).unwrap();
        assert!(!k2.verify(b"an echo", &mac));
    }
}
