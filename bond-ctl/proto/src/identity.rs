//! A terminal's own identity: an Ed25519 key pair.
//!
//! The community key proves a message comes from *a* member; on a node
//! that serves thousands of communities for an ISP that is not enough (a
//! stolen terminal would hold every member's say). A terminal with an
//! [`Identity`] also signs each control message that makes or changes
//! its session (LOGIN, ANNOUNCE, SHUTDOWN: see [`crate::control`]); the
//! server holds each authorised terminal's [`PublicKey`] by community and
//! LAN address, refuses what is not signed by that terminal's key, and
//! ends a session the moment its key is revoked.
//!
//! On disk, a secret key is its 32-byte seed in hex on one line (mode
//! 0600); a public key is 32 bytes in hex.

use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _, path::Path};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

/// Bytes of a signature.
pub const SIG_LEN: usize = 64;

/// A terminal's secret key.
pub struct Identity(SigningKey);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.public())
    }
}

impl Identity {
    /// A new key from the kernel's random source.
    pub fn generate() -> Result<Self, String> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| format!("the kernel's random source: {e}"))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// The key of a given seed (tests, fuzz seeds; a real one comes from
    /// [`Self::generate`]).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// Reads a secret key file (its seed in hex).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let seed = hex32(text.trim())
            .map_err(|e| format!("{}: not a bond identity ({e})", path.display()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// Writes the secret key to a new file, readable by its owner only;
    /// an existing file is left alone and named.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(f, "{}", hex::encode(self.0.to_bytes()))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, data: &[u8]) -> [u8; SIG_LEN] {
        self.0.sign(data).to_bytes()
    }
}

/// A terminal's public key, as the registry or the server's configuration
/// authorises it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0.as_bytes()))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = hex32(s.trim())?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|_| "not a point of Ed25519's curve".to_string())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("public key {s:?}: {e}")))
    }
}

impl PublicKey {
    /// Whether `sig` is this key's signature of `data` (strict: no
    /// malleable or small-order forms).
    pub fn verify(&self, data: &[u8], sig: &[u8; SIG_LEN]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        self.0.verify_strict(data, &sig).is_ok()
    }
}

fn hex32(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s).map_err(|_| "not hex".to_string())?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes, not 32", b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_identity_loads_signs_and_is_verified_by_its_public_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t1.key");
        let id = Identity::generate().unwrap();
        id.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let err = id.save(&path).unwrap_err();
        assert!(err.contains("t1.key"), "{err}");
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public(), id.public());

        let public: PublicKey = id.public().to_string().parse().unwrap();
        let sig = loaded.sign(b"announce");
        assert!(public.verify(b"announce", &sig));
        assert!(!public.verify(b"announcf", &sig));
        let other = Identity::generate().unwrap();
        assert!(!other.public().verify(b"announce", &sig));
        let mut bent = sig;
        bent[5] ^= 1;
        assert!(!public.verify(b"announce", &bent));
    }

    #[test]
    fn bad_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, "00ff\n").unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(err.contains("bad.key") && err.contains("2 bytes"), "{err}");
        std::fs::write(&path, "zz").unwrap();
        assert!(Identity::load(&path).unwrap_err().contains("not hex"));
        assert!("abc".parse::<PublicKey>().is_err());
        assert_eq!(
            "00".repeat(31).parse::<PublicKey>().unwrap_err(),
            "31 bytes, not 32"
        );
    }
}
