//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/, each run for a
//! while from seeds of valid input.
//!
//! The targets need libFuzzer's instrumentation, which takes `-Z` flags:
//! the stable toolchain gives them with `RUSTC_BOOTSTRAP=1`, as it does for
//! the eBPF build (the parsers' crates do not load eBPF objects).

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use bond_proto::{
    CommunityKey,
    control::{Body, LinkAd, Msg, Reply, TAG_LEN, flags},
    signed,
};

use crate::sh;

pub const TARGETS: &[&str] = &["wire", "control", "config", "edpf", "dist", "cache", "frag"];
const CARGO_FUZZ: &str = "0.13.2";
/// The targets' key (fuzz/fuzz_targets/).
fn key() -> CommunityKey {
    CommunityKey::new("fuzzing community key")
}

pub fn run(targets: &[String], secs: u64) -> Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    if let Some(bad) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!("unknown fuzz target {bad:?} (have: {})", TARGETS.join(", "));
    }
    xtask_setup::cargo_tool(
        "cargo-fuzz",
        CARGO_FUZZ,
        Command::new("cargo").args(["fuzz", "--version"]),
    )?;
    seed()?;
    for t in targets {
        eprintln!("fuzz: {t} for {secs} s");
        sh(fuzz_cmd().args([
            "run",
            t,
            &format!("corpus/{t}"),
            "--",
            &format!("-max_total_time={secs}"),
        ]))
        .with_context(|| format!("fuzz target {t} failed: the input is in fuzz/artifacts/{t}/"))?;
    }
    Ok(())
}

fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.arg("fuzz")
        .current_dir("fuzz")
        .env("RUSTC_BOOTSTRAP", "1");
    c
}

/// Valid input for each target, so the fuzzer starts past the magic
/// numbers: a message of every kind (signed for the raw path, unsigned for
/// the target to sign), the README's example configurations, a bond header.
fn seed() -> Result<()> {
    let write = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let dir = Path::new("fuzz/corpus").join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes).with_context(|| format!("seeding {target}"))
    };
    let bodies = [
        Body::Announce {
            interval_ms: 1000,
            links: vec![LinkAd {
                id: 1,
                port: 7701,
                up: 10,
                down: 20,
                mtu: 1500,
                ..Default::default()
            }],
        },
        Body::Shutdown,
        Body::Login { exchange: None },
        Body::Login {
            exchange: Some([3; 32]),
        },
        Body::LoginReply {
            reply: Reply::Ok {
                token: 7,
                port: 7700,
                exchange: None,
            },
            answers: None,
        },
        Body::LoginReply {
            reply: Reply::Ok {
                token: 7,
                port: 7700,
                exchange: Some([5; 32]),
            },
            answers: Some([6; 16]),
        },
        Body::LoginReply {
            reply: Reply::NeedLogin,
            answers: None,
        },
        Body::LoginReply {
            reply: Reply::Refused,
            answers: Some([6; 16]),
        },
        Body::Probe {
            train: 1,
            seq: 0,
            count: 40,
            len: 1200,
        },
        Body::ProbeRequest {
            train: 1,
            count: 40,
        },
        Body::ProbeReport {
            train: 1,
            kbps: 10_000,
        },
    ];
    // Signed by a terminal's own key too (a fixed one: seeds stay the same).
    let identity = bond_proto::identity::Identity::from_seed([7; 32]);
    for (i, body) in bodies.into_iter().enumerate() {
        let msg = Msg {
            community: 1,
            origin: [10, 0, 1, 1].into(),
            link: 1,
            flags: flags::VIA_LINK,
            token: 0,
            time_ms: 1,
            counter: 1,
            body,
        };
        let m = msg.encode(&key());
        write("control", &format!("signed-{i}"), &m)?;
        let by_terminal = msg.encode_as(&key(), Some(&identity));
        write("control", &format!("terminal-signed-{i}"), &by_terminal)?;
        write("control", &format!("unsigned-{i}"), &m[..m.len() - TAG_LEN])?;
        if i == 0 {
            write("wire", "header", &m[..bond_common::wire::BondHdr::LEN])?;
        }
    }
    let readme = std::fs::read_to_string("README.md")?;
    for (i, block) in readme.split("```toml\n").skip(1).enumerate() {
        let toml = block.split("```").next().unwrap_or_default();
        write("config", &format!("readme-{i}"), toml.as_bytes())?;
    }
    // Three links (id, kbit/s, delay, unusable), a bound, and sends.
    let edpf: Vec<u8> = (0u8..96).map(|i| i.wrapping_mul(37)).collect();
    write("edpf", "links", &edpf)?;
    // A 1,000-byte UDP datagram without DF, and a 600-byte room.
    let mut ip = vec![0u8; 1000];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&1000u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    let frag = [&600u16.to_be_bytes()[..], &ip].concat();
    write("frag", "udp-1000", &frag)?;
    dist_seeds(write)?;
    cache_seeds(write)?;
    Ok(())
}

/// A LAN query and answer, an update and a store index, as the cache
/// target reads them (it signs the bodies itself), and a range.
fn cache_seeds(write: impl Fn(&str, &str, &[u8]) -> Result<()>) -> Result<()> {
    use bond_cache::msg::{Lan, Object, Outcome, Update};
    let object = Object {
        url: "http://203.0.113.2/map.bin".into(),
        validator: Some("\"abc\"".into()),
        hash: "ab".repeat(32),
        size: 2 << 20,
        content_type: Some("application/octet-stream".into()),
        fetched_ms: 1,
    };
    let body = |m: &Lan| {
        let sealed = bond_cache::msg::seal_lan(&key(), m, 1);
        let nl = sealed.iter().position(|b| *b == b'\n').unwrap_or(0);
        sealed[nl + 1..].to_vec()
    };
    write(
        "cache",
        "query",
        &body(&Lan::Query {
            id: 1,
            url: object.url.clone(),
        }),
    )?;
    write(
        "cache",
        "have",
        &body(&Lan::Have {
            id: 1,
            object: object.clone(),
            endpoint: "10.0.1.2:7801".parse()?,
        }),
    )?;
    let got = Update::Got {
        client: "10.0.1.3:7801".parse()?,
        object: object.clone(),
        cached: true,
        source: Some("10.0.1.2:7801".parse()?),
        bps: 1e7,
        probes: vec![
            ("10.0.1.2:7801".parse()?, Outcome::Speed(1e7)),
            ("10.0.1.4:7801".parse()?, Outcome::Corrupt),
        ],
    };
    write(
        "cache",
        "update",
        &signed::sign(&key(), "/cache/update", &got, 1).0,
    )?;
    write("cache", "index", &serde_json::to_vec(&vec![object])?)?;
    write("cache", "range", b"bytes=100-")?;
    Ok(())
}

/// A manifest, a stream of frames (cut in pieces of 7), a transport request
/// and a report, as the dist target reads them.
fn dist_seeds(write: impl Fn(&str, &str, &[u8]) -> Result<()>) -> Result<()> {
    use bond_relay::{chunk::Manifest, frame, msg};
    let m = Manifest::build("update.bin", &[7u8; 5000][..], 1024)?;
    write("dist", "manifest", &m.encode())?;
    let stream = [
        frame::encode(0, b"sealed"),
        frame::heartbeat(),
        frame::encode(3, &[1; 40]),
    ];
    write("dist", "frames", &[&[7u8][..], &stream.concat()].concat())?;
    let request = msg::TransportRequest {
        transfer: 1,
        file: msg::FileInfo {
            name: "update.bin".into(),
            size: 5000,
            chunk_size: 1024,
            root: hex::encode(m.root()),
            compression: "zstd".into(),
            encryption: "xchacha20poly1305".into(),
        },
        source: "10.0.1.1:7800".parse()?,
        main: "10.0.1.1:7800".parse()?,
        target: "10.0.1.2".into(),
        share: vec![msg::Target {
            id: "10.0.1.3".into(),
            endpoint: "10.0.1.3:7800".parse()?,
            kbps: Some(20_000.0),
        }],
        fanout: 3,
        stripe: Some(msg::Stripe { index: 1, of: 3 }),
        sent_ms: 1,
    };
    write(
        "dist",
        "request",
        &signed::sign(&key(), "/dist/request", &request, 1).0,
    )?;
    let report = msg::Report::Done {
        transfer: 1,
        id: "10.0.1.2".into(),
        ms: 900,
        first_ms: 40,
        source: "10.0.1.1:7800".parse()?,
    };
    write(
        "dist",
        "report",
        &signed::sign(&key(), "/dist/report", &report, 1).0,
    )?;
    Ok(())
}
