//! What cache services say to each other. HTTP bodies are JSON signed as
//! the distribution service's are ([`bond_proto::signed`]: HMAC-SHA256
//! with the community key over the path and the body, which carries its
//! time); the referral server signs its answers too, since they name the
//! hash a client checks what it gets against. Objects themselves travel
//! unsigned and are checked against that hash.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use bond_proto::{CommunityKey, signed};

/// A cached object: a URL's body at one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub url: String,
    /// The origin's ETag, or else its Last-Modified, if it gave one.
    pub validator: Option<String>,
    /// BLAKE3 of the body, hex.
    pub hash: String,
    pub size: u64,
    pub content_type: Option<String>,
    /// When the origin last gave or confirmed this version (unix ms).
    pub fetched_ms: u64,
}

impl Object {
    /// Whether `h` can name an object (and a file): 64 hex digits.
    pub fn hash_ok(h: &str) -> bool {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }
}

/// How a source did, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Sent at this many bytes per second.
    Speed(f64),
    /// At its workload limit.
    Busy,
    /// Sent bytes that did not match the hash.
    Corrupt,
    /// Did not answer, or broke off.
    Failed,
}

/// Signed, to the referral server (`POST /cache/update`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Update {
    /// `peer` cached these.
    Added {
        peer: SocketAddr,
        objects: Vec<Object>,
    },
    /// `peer` no longer holds these hashes.
    Evicted {
        peer: SocketAddr,
        hashes: Vec<String>,
    },
    /// A client got `object`: from `source` (None: the origin), after
    /// probing `probes`.
    Got {
        client: SocketAddr,
        object: Object,
        /// The client kept it in its cache (and can serve it).
        cached: bool,
        source: Option<SocketAddr>,
        /// The client's own speed for this fetch, bytes/s.
        bps: f64,
        probes: Vec<(SocketAddr, Outcome)>,
    },
}

/// Signed, to the referral server (`POST /cache/refer`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ask {
    pub client: SocketAddr,
    pub url: String,
}

/// What the referral server decided for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The referral server sends it itself (within the client's target
    /// period); `sources` starts with it.
    Serve,
    /// Peers first, the referral server last if it holds it.
    Peers,
    /// Nobody in the community holds it: go to the origin.
    Origin,
}

/// One place to get an object from, as a referral lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub endpoint: SocketAddr,
    /// Measured speed to clients, bytes/s, if known.
    pub bps: Option<f64>,
    /// Uploads under way and the most it takes, as last heard.
    pub uploads: u32,
    pub max_uploads: u32,
    /// Slow against the others, or caught sending bad data: listed after
    /// the rest.
    pub demoted: bool,
    /// At its workload limit when last heard: listed last.
    pub busy: bool,
}

/// The referral server's answer (signed, in the response).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Referral {
    pub decision: Decision,
    pub object: Option<Object>,
    pub sources: Vec<Source>,
}

/// A cache service's workload, as `GET /cache/status` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub uploads: u32,
    pub max_uploads: u32,
    /// The limit on what all uploads send together, bytes/s (0: none).
    pub limit_bps: u64,
    /// Bytes sent to peers so far.
    pub sent: u64,
    /// Requests refused at the limit so far.
    pub refused: u64,
}

/// LAN query datagrams (UDP, on the cache port).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Lan {
    /// "Who has `url`?" Answers go back to the sender.
    Query { id: u64, url: String },
    /// "I hold it; fetch it from `endpoint`."
    Have {
        id: u64,
        object: Object,
        endpoint: SocketAddr,
    },
    /// "I do not, but these did when I last heard."
    Know { id: u64, peers: Vec<SocketAddr> },
}

/// The path a LAN datagram is signed under.
pub const LAN_PATH: &str = "udp:/cache/lan";
/// Largest LAN datagram.
pub const LAN_MAX: usize = 8192;

/// A signed datagram: the signature (hex), a newline, the body.
pub fn seal_lan(key: &CommunityKey, m: &Lan, now_ms: u64) -> Vec<u8> {
    let (body, sig) = signed::sign(key, LAN_PATH, m, now_ms);
    let mut out = sig.into_bytes();
    out.push(b'\n');
    out.extend_from_slice(&body);
    out
}

/// Checks and parses a datagram.
pub fn open_lan(key: &CommunityKey, d: &[u8], now_ms: u64) -> Result<Lan, signed::Refused> {
    if d.len() > LAN_MAX {
        return Err(signed::Refused::TooLarge);
    }
    let nl = d
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(signed::Refused::Unsigned)?;
    let sig = std::str::from_utf8(&d[..nl]).map_err(|_| signed::Refused::BadSignature)?;
    signed::open(key, LAN_PATH, &d[nl + 1..], Some(sig), now_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lan_datagrams_open_only_with_the_key() {
        let q = Lan::Query {
            id: 7,
            url: "http://203.0.113.2/a".into(),
        };
        let k = CommunityKey::new("k");
        let d = seal_lan(&k, &q, 1_000);
        assert_eq!(open_lan(&k, &d, 2_000), Ok(q));
        assert_eq!(
            open_lan(&CommunityKey::new("other"), &d, 2_000),
            Err(signed::Refused::BadSignature)
        );
        let mut bad = d.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            open_lan(&k, &bad, 2_000),
            Err(signed::Refused::BadSignature)
        );
        assert_eq!(
            open_lan(&k, b"no newline", 0),
            Err(signed::Refused::Unsigned)
        );
        assert_eq!(open_lan(&k, &d, 1_000_000), Err(signed::Refused::Stale));
        assert_eq!(
            open_lan(&k, &vec![b'a'; LAN_MAX + 1], 0),
            Err(signed::Refused::TooLarge)
        );
    }

    #[test]
    fn hashes_name_files_safely() {
        assert!(Object::hash_ok(&blake3::hash(b"x").to_hex()));
        for bad in ["", "../etc/passwd", &"A".repeat(64), &"0".repeat(63)] {
            assert!(!Object::hash_ok(bad), "{bad}");
        }
    }
}
