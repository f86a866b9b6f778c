//! What distribution services say to each other: JSON over HTTP, each
//! message signed with the community key (`bond_proto::signed`). Chunks need no signature: they are
//! sealed (`chunk::Seal`) and checked against the manifest.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

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
