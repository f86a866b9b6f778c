//! How many announces per second one server core absorbs, through a real
//! UDP socket on loopback, doing what the server agent does with each:
//! receive, authenticate, check freshness and replay, update the table.
//!
//! Run by `cargo xtask bench announce`. The baseline, measured in the same
//! run on the same socket, is a receiver that only receives, so the ratio
//! shows what bond's processing costs on top of the kernel's.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use bond_agent::membership::ServerTable;
use bond_proto::{
    CommunityKey,
    control::{Body, Guard, LinkAd, Msg, flags},
    now_ms,
};

const TERMINALS: u32 = 10_000;
/// Rounds of announces; `BOND_ANNOUNCE_ROUNDS` sets it (`bench --quick`: 2).
const ROUNDS: u32 = 10;

fn main() -> anyhow::Result<()> {
    // Every terminal announces its two links, ROUNDS times, each over its link.
    let rounds: u32 = std::env::var("BOND_ANNOUNCE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    let key = key();
    let now = now_ms();
    let mut msgs = Vec::new();
    for round in 0..rounds {
        for t in 0..TERMINALS {
            let origin = Ipv4Addr::from(0x0a00_0000 + t);
            let links = vec![
                LinkAd {
                    id: 1,
                    port: 7701,
                    up: 10,
                    down: 10,
                    mtu: 1500,
                    ..Default::default()
                },
                LinkAd {
                    id: 2,
                    port: 7702,
                    up: 20,
                    down: 20,
                    mtu: 1500,
                    ..Default::default()
                },
            ];
            let link = 1 + (round % 2) as u8;
            msgs.push(
                Msg {
                    // One community per terminal: no link-id clashes.
                    community: (t % 60_000),
                    origin,
                    link,
                    flags: flags::VIA_LINK,
                    token: u64::from(t) + 1,
                    time_ms: now,
                    counter: u64::from(round) + 1,
                    body: Body::Announce {
                        interval_ms: 100,
                        links,
                    },
                }
                .encode(&key),
            );
        }
    }
    println!(
        "{} announces ({TERMINALS} terminals x {rounds}), {} bytes each",
        msgs.len(),
        msgs[0].len()
    );
    let base = run(&msgs, false)?;
    let bond = run(&msgs, true)?;
    let need = f64::from(TERMINALS) * 10.0; // every 100 ms
    println!();
    println!("| receiver | announces/s on one core | CPU per announce | vs receive only |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("receive only (baseline)", base),
        ("receive + verify + table", bond),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} us | {:.2}x |",
            r.rate,
            r.cpu_us,
            r.cpu_us / base.cpu_us
        );
    }
    println!(
        "10,000 terminals at 100 ms send {need:.0} announces/s: {:.0}% of one core for bond's agent",
        need * bond.cpu_us / 1e4
    );
    Ok(())
}

fn key() -> CommunityKey {
    CommunityKey::new("bench community key")
}

#[derive(Clone, Copy)]
struct Result {
    rate: f64,
    cpu_us: f64,
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Sends every message to a receiver thread, paced so the receiver is not
/// overrun; returns the receiver's rate and CPU time per message.
fn run(msgs: &[Vec<u8>], process: bool) -> anyhow::Result<Result> {
    let rx = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let addr = rx.local_addr()?;
    let n = msgs.len();
    let receiver = std::thread::spawn(move || {
        let mut table = ServerTable::new(3);
        let mut guard = Guard::new(30_000);
        let key = key();
        let mut buf = [0u8; 2048];
        let (mut got, mut ok) = (0usize, 0usize);
        let cpu0 = thread_cpu();
        let t = Instant::now();
        while let Ok((len, src)) = rx.recv_from(&mut buf) {
            got += 1;
            if process {
                let std::net::SocketAddr::V4(src) = src else {
                    continue;
                };
                let Ok(m) = Msg::decode(&buf[..len], |_| Some(&key)) else {
                    continue;
                };
                if guard.check(&m, now_ms()).is_err() {
                    continue;
                }
                if let Body::Announce { interval_ms, links } = &m.body {
                    table.login(m.community, m.origin, Duration::from_secs(60), t, || {
                        m.token
                    });
                    let via = Some((m.link, src.into()));
                    let interval = Duration::from_millis(u64::from(*interval_ms));
                    if table
                        .announce(m.community, m.origin, m.token, via, interval, links, t)
                        .is_ok()
                    {
                        ok += 1;
                    }
                }
            }
            if got == n {
                break;
            }
        }
        (got, ok, thread_cpu() - cpu0)
    });
    let tx = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))?;
    for chunk in msgs.chunks(64) {
        for m in chunk {
            tx.send_to(m, addr)?;
        }
        // Keep within the socket buffer: the receiver's pace is measured
        // by its CPU time, not by how fast we can send.
        std::thread::sleep(Duration::from_micros(200));
    }
    let (got, ok, cpu) = receiver.join().expect("receiver");
    anyhow::ensure!(got > n / 2, "only {got} of {n} announces arrived");
    if process {
        anyhow::ensure!(ok == got, "{} of {got} announces refused", got - ok);
    }
    Ok(Result {
        rate: got as f64 / cpu.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / got as f64,
    })
}
