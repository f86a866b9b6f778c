//! What distribution services say to each other: JSON over HTTP, each
//! message signed with the community key (HMAC-SHA256 over the path and
//! the body, which carries its time). Chunks need no signature: they are
//! sealed (`chunk::Seal`) and checked against the manifest.

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::Sha256;

/// The header that carries a message's signature (hex).
pub const SIG_HEADER: &str = "x-bond-sig";
/// Clock difference tolerated between hosts.
pub const SKEW_MS: u64 = 30_000;
/// Largest message body accepted.
pub const MAX_BODY: usize = 1 << 20;

/// A terminal as a transport request lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// Its community address ("10.0.1.3"): how the main server names it.
    pub id: String,
    /// Where its distribution service listens.
    pub endpoint: SocketAddr,
    /// Its measured (or announced) throughput, kbit/s, if known.
    pub kbps: Option<f64>,
}

/// The file a transport request is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub chunk_size: u32,
    /// The manifest's BLAKE3 hash, hex.
    pub root: String,
    pub compression: String,
    pub encryption: String,
}

/// Part of a file: the chunks `i` with `i % of == index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stripe {
    pub index: u32,
    pub of: u32,
}

impl Stripe {
    /// Whether the numbers make sense (a request's are checked).
    pub fn valid(&self) -> bool {
        self.index < self.of
    }

    pub fn holds(&self, chunk: u32) -> bool {
        chunk.checked_rem(self.of) == Some(self.index)
    }
}

/// "Fetch this file from `source`, pass it on to `share`, report to `main`."
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransportRequest {
    /// The main server's transfer id.
    pub transfer: i64,
    pub file: FileInfo,
    pub source: SocketAddr,
    pub main: SocketAddr,
    /// The recipient's id.
    pub target: String,
    /// The terminals this recipient relays to, fastest first.
    pub share: Vec<Target>,
    pub fanout: u32,
    /// Only this stripe of the file comes from `source` and goes to the
    /// share, which is then in level order ([`super::plan::split_filled`]);
    /// None: the whole file, and a share dealt as in the seed
    /// ([`super::plan::split`]).
    #[serde(default)]
    pub stripe: Option<Stripe>,
    /// When the sender sent it (unix ms): the recipient's acknowledgement
    /// carries it back, and the main server takes the response time.
    pub sent_ms: u64,
}

/// What terminals tell the main server, straight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Report {
    /// The request (for `stripe`, if striped) arrived; it was sent at
    /// `sent_ms`.
    Ack {
        transfer: i64,
        id: String,
        sent_ms: u64,
        #[serde(default)]
        stripe: Option<u32>,
    },
    /// Chunks stored so far, and where they come from.
    Progress {
        transfer: i64,
        id: String,
        chunks: u32,
        source: SocketAddr,
    },
    /// The whole file is stored and verified, `ms` after the (first)
    /// request came; its first chunk was stored `first_ms` after it.
    Done {
        transfer: i64,
        id: String,
        ms: u64,
        #[serde(default)]
        first_ms: u64,
        source: SocketAddr,
    },
    /// `id` could not be served (by `by`): unreachable, or gave up.
    Failed {
        transfer: i64,
        id: String,
        by: String,
        why: String,
    },
    /// `relay` served chunk `chunk` that did not verify at `by`.
    Corrupt {
        transfer: i64,
        relay: SocketAddr,
        by: String,
        chunk: u32,
    },
}

impl Report {
    pub fn transfer(&self) -> i64 {
        match self {
            Report::Ack { transfer, .. }
            | Report::Progress { transfer, .. }
            | Report::Done { transfer, .. }
            | Report::Failed { transfer, .. }
            | Report::Corrupt { transfer, .. } => *transfer,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    ts: u64,
    body: T,
}

fn mac(key: &[u8], path: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(b"bond-dist\0");
    m.update(path.as_bytes());
    m.update(b"\0");
    m.update(body);
    m
}

/// The signature of `body` posted to `path`.
pub fn tag(key: &[u8], path: &str, body: &[u8]) -> Vec<u8> {
    mac(key, path, body).finalize().into_bytes().to_vec()
}

/// The body and signature of `msg` posted to `path` at `now_ms`.
pub fn sign<T: Serialize>(key: &[u8], path: &str, msg: &T, now_ms: u64) -> (Vec<u8>, String) {
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
    key: &[u8],
    path: &str,
    body: &[u8],
    sig: Option<&str>,
    now_ms: u64,
) -> Result<T, Refused> {
    if body.len() > MAX_BODY {
        return Err(Refused::TooLarge);
    }
    let sig = hex::decode(sig.ok_or(Refused::Unsigned)?).map_err(|_| Refused::BadSignature)?;
    mac(key, path, body)
        .verify_slice(&sig)
        .map_err(|_| Refused::BadSignature)?;
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

    fn report() -> Report {
        Report::Done {
            transfer: 4,
            id: "10.0.1.3".into(),
            ms: 1200,
            first_ms: 30,
            source: "10.0.1.2:7800".parse().unwrap(),
        }
    }

    #[test]
    fn signed_messages_open_only_with_the_key_path_and_time() {
        let (body, sig) = sign(b"key one", "/dist/report", &report(), 1_000_000);
        let ok = open::<Report>(b"key one", "/dist/report", &body, Some(&sig), 1_010_000);
        assert_eq!(ok, Ok(report()));
        let r = |key: &[u8], path, body: &[u8], sig, now| {
            open::<Report>(key, path, body, sig, now).unwrap_err()
        };
        assert_eq!(
            r(b"key two", "/dist/report", &body, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(b"key one", "/dist/request", &body, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(b"key one", "/dist/report", &body, None, 1_000_000),
            Refused::Unsigned
        );
        assert_eq!(
            r(b"key one", "/dist/report", &body, Some("zz"), 1_000_000),
            Refused::BadSignature
        );
        assert_eq!(
            r(b"key one", "/dist/report", &body, Some(&sig), 1_040_000),
            Refused::Stale
        );
        assert_eq!(
            r(b"key one", "/dist/report", &body, Some(&sig), 960_000),
            Refused::Stale
        );
        let mut bent = body.clone();
        bent[10] ^= 1;
        assert_eq!(
            r(b"key one", "/dist/report", &bent, Some(&sig), 1_000_000),
            Refused::BadSignature
        );
        // Signed, but not a report.
        let (body, sig) = sign(b"key one", "/dist/report", &"hello", 1_000_000);
        assert!(matches!(
            r(b"key one", "/dist/report", &body, Some(&sig), 1_000_000),
            Refused::Malformed(_)
        ));
    }
}
