//! The server's splitter: a reply too big for the community's links once
//! wrapped, and free to be fragmented (no DF), is cut into IPv4 fragments
//! that fit, as a router on its path would (RFC 791 section 3.2).
//!
//! How: the datapath redirects such packets, as they arrived, to a TAP
//! device (`<device>-split`, `S_SPLIT`); [`run`] reads each, splits it with
//! [`bond_common::frag::split`] to the link MTU the datapath works with
//! (`S_CONFIG`) less the wrap, and writes the pieces back into the TAP,
//! where the same XDP program takes them as replies of the flow: the first
//! piece by its port, the rest by the datagram's identification
//! (`S_FRAGS`). This is the slow path, for the rare datagram sent without
//! DF: TCP and QUIC set DF and learn the MTU instead.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use bond_common::{
    frag::{self, SplitError},
    maps::Hold,
    wire::{ETH_LEN, ETH_P_IP, OUTER_LEN},
};
use bond_datapath::{Maps, monotonic_ns};

use crate::{playout::Tap, worker::Worker};

/// How long the datapath trusts the splitter to be reading after each
/// sign of life; it renews every [`BEAT`].
const ALIVE: Duration = Duration::from_millis(500);
const BEAT: Duration = Duration::from_millis(100);

/// What the splitter did, since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Packets cut into pieces, and the pieces sent back.
    pub split: AtomicU64,
    pub pieces: AtomicU64,
    /// Packets that could not be split (each reason is logged once).
    pub refused: AtomicU64,
}

/// The running splitter.
pub struct Splitter {
    stats: Arc<Stats>,
    _worker: Worker,
}

impl Splitter {
    /// Starts splitting what the datapath sends to `tap` (whose XDP program
    /// is attached already); tells the datapath through `S_SPLIT`.
    pub fn start(tap: Tap, ifindex: u32, mac: [u8; 6], maps: Maps) -> Result<Self> {
        maps.set_hold(bond_common::maps::name::S_SPLIT, alive(ifindex))?;
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let worker = Worker::spawn("split", move |stop| {
            run(&tap, ifindex, mac, &maps, stop, &st)
        })?;
        Ok(Self {
            stats,
            _worker: worker,
        })
    }
}

impl Splitter {
    pub fn stats(&self) -> bond_api::reply::Split {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        bond_api::reply::Split {
            packets: get(&self.stats.split),
            pieces: get(&self.stats.pieces),
            refused: get(&self.stats.refused),
        }
    }
}

fn alive(ifindex: u32) -> Hold {
    Hold {
        ifindex,
        _pad: 0,
        alive_until_ns: monotonic_ns() + ALIVE.as_nanos() as u64,
    }
}

fn run(tap: &Tap, ifindex: u32, mac: [u8; 6], maps: &Maps, stop: &AtomicBool, stats: &Stats) {
    let mut buf = vec![0u8; 65_536];
    let mut frame = Vec::with_capacity(9_216);
    let mut beat = 0;
    let mut told = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = monotonic_ns();
        if now >= beat {
            if let Err(e) = maps.set_hold(bond_common::maps::name::S_SPLIT, alive(ifindex)) {
                tracing::warn!("split: {e}");
            }
            beat = now + BEAT.as_nanos() as u64;
        }
        tap.wait(BEAT);
        let n = match tap.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::warn!("split: reading {}: {e}", tap.name);
                std::thread::sleep(BEAT);
                continue;
            }
        };
        let mtu = match maps.server_config() {
            Ok(c) => usize::from(c.link_mtu),
            Err(e) => {
                tracing::warn!("split: {e}");
                continue;
            }
        };
        let sent = pieces(
            &buf[..n],
            mac,
            mtu.saturating_sub(OUTER_LEN),
            &mut frame,
            |f| tap.write(f).map(|_| ()),
        );
        match sent {
            Ok(k) => {
                stats.split.fetch_add(1, Ordering::Relaxed);
                stats.pieces.fetch_add(k as u64, Ordering::Relaxed);
            }
            Err(why) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if !told.contains(&why) {
                    tracing::warn!("split: a packet refused ({why}); further ones are counted");
                    told.push(why);
                }
            }
        }
    }
}

/// Splits Ethernet frame `eth` (IPv4) into frames of at most `room` bytes
/// of IPv4 each, addressed to `mac` (the TAP, or its stack would take them
/// for another host's), and hands each to `send` in order, the first
/// fragment first. Returns how many went.
pub fn pieces(
    eth: &[u8],
    mac: [u8; 6],
    room: usize,
    frame: &mut Vec<u8>,
    mut send: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<usize, Refused> {
    if eth.len() < ETH_LEN || eth[12..14] != ETH_P_IP.to_be_bytes() {
        return Err(Refused::NotIpv4);
    }
    let parts = frag::split(&eth[ETH_LEN..], room).map_err(Refused::Split)?;
    let mut n = 0;
    for (hdr, body) in parts {
        frame.clear();
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&eth[6..ETH_LEN]);
        frame.extend_from_slice(&hdr);
        frame.extend_from_slice(body);
        send(frame).map_err(|e| Refused::Write(e.kind()))?;
        n += 1;
    }
    Ok(n)
}

/// Why a packet was not split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    NotIpv4,
    Split(SplitError),
    Write(std::io::ErrorKind),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotIpv4 => write!(f, "not IPv4"),
            Self::Split(e) => write!(f, "cannot be split: {e:?}"),
            Self::Write(k) => write!(f, "writing a piece: {k}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: usize, flags: u16) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN + 20 + payload];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
        let ip = &mut f[ETH_LEN..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        f
    }

    #[test]
    fn pieces_go_to_the_tap_in_order_from_the_sender() {
        let mut sent = Vec::new();
        let tap = [2, 0, 0, 0, 0, 9];
        let n = pieces(&frame(3000, 0), tap, 1448, &mut Vec::new(), |f| {
            sent.push(f.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(sent.len(), 3);
        let mut offsets = Vec::new();
        for f in &sent {
            assert_eq!(f[..6], tap, "to the TAP");
            assert_eq!(f[6..12], [2, 0, 0, 0, 0, 2], "from the sender");
            assert_eq!(f[12..14], ETH_P_IP.to_be_bytes());
            assert!(f.len() - ETH_LEN <= 1448);
            offsets.push(u16::from_be_bytes([f[20], f[21]]) & 0x1fff);
        }
        assert_eq!(offsets, [0, 178, 356], "the first fragment first");
    }

    #[test]
    fn what_cannot_be_split_is_refused_and_nothing_sent() {
        let mut sent = 0;
        let mut send = |_: &[u8]| {
            sent += 1;
            Ok(())
        };
        let mut buf = Vec::new();
        let df = frame(3000, 0x4000);
        assert_eq!(
            pieces(&df, [0; 6], 1448, &mut buf, &mut send),
            Err(Refused::Split(SplitError::DontFragment))
        );
        let mut arp = frame(3000, 0);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(
            pieces(&arp, [0; 6], 1448, &mut buf, &mut send),
            Err(Refused::NotIpv4)
        );
        assert_eq!(
            pieces(&arp[..10], [0; 6], 1448, &mut buf, &mut send),
            Err(Refused::NotIpv4)
        );
        assert_eq!(sent, 0);
    }
}
