//! Signed JSON over HTTP, as the distribution service and the peer cache
//! speak it: the body carries its sending time, and the signature header
//! an HMAC-SHA256 ([`CommunityKey::tag`]) over the path and the body.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{CommunityKey, SKEW_MS};

/// The header that carries a message's signature (hex).
pub const SIG_HEADER: &str = "x-bond-sig";
/// Largest message body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// What every signature starts with, so a tag made for one protocol
/// means nothing in another.
const DOMAIN: &[u8] = b"bond-dist\0";

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    ts: u64,
    body: T,
}

fn parts<'a>(path: &'a str, body: &'a [u8]) -> [&'a [u8]; 4] {
    [DOMAIN, path.as_bytes(), b"\0", body]
}

/// The signature of `body` posted to `path`.
pub fn tag(key: &CommunityKey, path: &str, body: &[u8]) -> [u8; 32] {
    key.tag(&parts(path, body))
}

/// The body and signature of `msg` posted to `path` at `now_ms`.
pub fn sign<T: Serialize>(
    key: &CommunityKey,
    path: &str,
    msg: &T,
    now_ms: u64,
) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(&Envelope {
        ts: now_ms,
        body: msg,
    })
    .expect("serialisable");
    let sig = hex::encode(tag(key, path, &body));
    (body, sig)
}

/// Why a message was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no signature")]
    Unsigned,
    #[error("bad signature")]
    BadSignature,
    #[error("too old or from the future")]
    Stale,
    #[error("too large")]
    TooLarge,
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Checks a message's signature and age, then parses it.
pub fn open<T: DeserializeOwned>(
    key: &CommunityKey,
    path: &str,
    body: &[u8],
    sig: Option<&str>,
    now_ms: u64,
) -> Result<T, Refused> {
    if body.len() > MAX_BODY {
        return Err(Refused::TooLarge);
    }
    let sig = hex::decode(sig.ok_or(Refused::Unsigned)?).map_err(|_| Refused::BadSignature)?;
    if sig.len() != 32 || !key.verify(&parts(path, body), &sig) {
        return Err(Refused::BadSignature);
    }
    let env: Envelope<T> =
        serde_json::from_slice(body).map_err(|e| Refused::Malformed(e.to_string()))?;
    if env.ts.abs_diff(now_ms) > SKEW_MS {
        return Err(Refused::Stale);
    }
    Ok(env.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Report {
        id: String,
        ms: u64,
    }

    fn report() -> Report {
        Report {
            id: "10.0.1.3".into(),
            ms: 1200,
        }
    }

    #[test]
    fn signed_messages_open_only_with_the_key_path_and_time() {
        let (one, two) = (CommunityKey::new("key one"), CommunityKey::new("key two"));
        let (body, sig) = sign(&one, "/dist/report", &report(), 1_000_000);
        let ok = open::<Report>(&one, "/dist/report", &body, Some(&sig), 1_010_000);
        assert_eq!(ok, Ok(report()));
        let r = |key: &CommunityKey, path, body: &[u8], sig, now| {
            open::<Report>(key, path, body, sig, now).unwrap_err()
        };
        assert_eq!(
            r(&two, "/dist/report", &body, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(&one, "/dist/request", &body, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(&one, "/dist/report", &body, None, 1_000_000),
            Refused::Unsigned
        );
        assert_eq!(
            r(&one, "/dist/report", &body, Some("zz"), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(&one, "/dist/report", &body, Some(&sig), 1_040_000),
            Refused::Stale
        );
        assert_eq!(
            r(&one, "/dist/report", &body, Some(&sig), 960_000),
            Refused::Stale
        );
        let mut bent = body.clone();
        bent[10] ^= 1;
        assert_eq!(
            r(&one, "/dist/report", &bent, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        // Signed, but not a report.
        let (body, sig) = sign(&one, "/dist/report", &"hello", 1_000_000);
        assert!(matches!(
            r(&one, "/dist/report", &body, Some(&sig), 1_000_000),
            Refused::Malformed(_)
        ));
    }
}
