//! Relay-tree distribution end to end (issue 6): a community of 21
//! terminals, each sending at most 20 Mbit/s on the LAN; t1 is the main
//! server and pushes a file to the other 20 with `bond-ctl distribute`.
//!
//! Run one at a time (`--test-threads=1`), like the other namespace tests.

mod common;
use common::bond_ctl;

use std::{path::Path, time::Duration};

use bond_lab::{Lab, TerminalSpec};

const TERMINALS: usize = 21;
const UPLOAD_MBIT: u32 = 20;

/// t1 (the main server) has the community's one WAN link, so every agent
/// can log on; everyone's LAN upload is limited.
fn lab() -> Lab {
    let mut spec = vec![TerminalSpec { links: vec![] }; TERMINALS];
    spec[0].links = vec![0];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.dist = true;
    for i in 0..TERMINALS {
        lab.limit_upload(i, UPLOAD_MBIT).unwrap();
    }
    lab.start_agents().expect("start agents");
    // t1's database learns every peer from its announces.
    let start = std::time::Instant::now();
    while ranked(&lab).len() < TERMINALS - 1 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "t1 knows {} terminals",
            ranked(&lab).len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    lab
}

fn t1_config(lab: &Lab) -> String {
    lab.dir.join("t1.toml").to_string_lossy().into_owned()
}

/// `bond-ctl terminals --json` on t1: ids, fastest first.
fn ranked(lab: &Lab) -> Vec<String> {
    let out = lab
        .exec(
            &lab.terminals[0].ns.clone(),
            &lab.bond_ctl.to_string_lossy(),
            &["terminals", "--config", &t1_config(lab), "--json"],
        )
        .expect("terminals");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["terminals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// A file of `mib` MiB that does not compress.
fn file(lab: &Lab, name: &str, mib: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; mib << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let path = lab.dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Runs `bond-ctl distribute` on t1 in the background; its child name.
fn distribute(lab: &mut Lab, path: &Path, extra: &[&str]) -> &'static str {
    let (ns, bin, cfg) = (
        lab.terminals[0].ns.clone(),
        lab.bond_ctl.to_string_lossy().into_owned(),
        t1_config(lab),
    );
    let mut args = vec![
        "distribute",
        path.to_str().unwrap(),
        "--config",
        &cfg,
        "--chunk-kib",
        "64",
        "--stall",
        "12s",
        "--json",
    ];
    args.extend_from_slice(extra);
    lab.spawn(&ns, "distribute", &bin, &args).unwrap();
    "distribute"
}

/// The JSON report on the last line of the child's output; its exit
/// status is not judged here (2 means some target failed).
fn report(lab: &mut Lab, child: &str) -> serde_json::Value {
    let _ = lab.wait_child(child, Duration::from_secs(120));
    let log = lab.log(child);
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no report:\n{log}"));
    serde_json::from_str(line).unwrap()
}

fn received(lab: &Lab, i: usize, name: &str) -> Option<Vec<u8>> {
    std::fs::read(lab.dist_state(i).join("files").join(name)).ok()
}

fn status_of<'a>(r: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in the report"))
}

fn is_byte_identical_everywhere(lab: &Lab, name: &str, data: &[u8], except: Option<usize>) {
    for i in (1..TERMINALS).filter(|&i| Some(i) != except) {
        assert!(
            received(lab, i, name).as_deref() == Some(data),
            "t{} has a different {name}",
            i + 1
        );
    }
}

#[test]
fn a_file_reaches_twenty_terminals_byte_identical_through_the_tree() {
    let mut lab = lab();
    let (path, data) = file(&lab, "update.bin", 4);
    let child = distribute(&mut lab, &path, &["--mode", "tree", "--fanout", "3"]);
    let r = report(&mut lab, child);
    assert_eq!(r["done"], TERMINALS - 1, "{r:#}");
    assert_eq!(r["failed"], 0, "{r:#}");
    is_byte_identical_everywhere(&lab, "update.bin", &data, None);
    // The main server sent to three; everyone else got it from a relay,
    // which started relaying before it had the whole file: the child's
    // first chunk came before the relay's last.
    let targets = r["targets"].as_array().unwrap();
    let from_main = targets.iter().filter(|t| t["source"] == r["main"]).count();
    assert_eq!(from_main, 3, "{r:#}");
    for t in targets.iter().filter(|t| t["source"] != r["main"]) {
        let relay = targets
            .iter()
            .find(|p| p["endpoint"] == t["source"])
            .unwrap_or_else(|| panic!("{}'s source is not a target", t["id"]));
        assert!(
            t["first_chunk_at_ms"].as_u64().unwrap() < relay["done_at_ms"].as_u64().unwrap(),
            "{} waited for {} to finish:\n{t:#}\n{relay:#}",
            t["id"],
            relay["id"]
        );
    }
    // The database learnt every terminal's response time and throughput.
    let out = lab
        .exec(
            &lab.terminals[0].ns.clone(),
            &lab.bond_ctl.to_string_lossy(),
            &["terminals", "--config", &t1_config(&lab), "--json"],
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for t in v["terminals"].as_array().unwrap() {
        assert!(t["throughput_kbps"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["response_ms"].is_number(), "{t}");
        assert_eq!(t["transfers_done"], 1, "{t}");
    }
}

/// Striped (the default): the file in three stripes, each down a tree of
/// its own. Every target uploads its part, and the main server sends the
/// file about once, where the tree's main server sends it three times.
#[test]
fn striped_trees_deliver_everywhere_and_every_terminal_uploads() {
    let mut lab = lab();
    let (path, data) = file(&lab, "stripes.bin", 6);
    let before: Vec<u64> = (0..TERMINALS).map(|i| lab.lan_sent(i).unwrap()).collect();
    let child = distribute(&mut lab, &path, &[]);
    let r = report(&mut lab, child);
    assert_eq!(r["mode"], "striped", "{r:#}");
    assert_eq!(r["done"], TERMINALS - 1, "{r:#}");
    is_byte_identical_everywhere(&lab, "stripes.bin", &data, None);
    let size = data.len() as u64;
    let sent: Vec<u64> = (0..TERMINALS)
        .map(|i| lab.lan_sent(i).unwrap() - before[i])
        .collect();
    assert!(
        sent[0] < size * 13 / 10,
        "the main server sent {} bytes of a {size}-byte file",
        sent[0]
    );
    for (i, &n) in sent.iter().enumerate().skip(1) {
        assert!(
            n > size / 4,
            "t{} sent only {n} bytes of a {size}-byte file: {sent:?}",
            i + 1
        );
    }
}

#[test]
fn a_relay_killed_mid_transfer_has_its_subtree_served_from_elsewhere() {
    let mut lab = lab();
    let (path, data) = file(&lab, "map.bin", 8);
    let victim_id = ranked(&lab)[0].clone();
    let victim = lab
        .terminals
        .iter()
        .position(|t| t.lan_ip.to_string() == victim_id)
        .unwrap();
    // Striped: the victim heads the first stripe's tree and relays it.
    let child = distribute(&mut lab, &path, &["--mode", "striped"]);
    // Once it has started relaying, it dies.
    std::thread::sleep(Duration::from_millis(1500));
    lab.crash_terminal(victim).unwrap();
    let r = report(&mut lab, child);
    assert_eq!(r["done"], TERMINALS - 2, "{r:#}");
    assert_eq!(status_of(&r, &victim_id)["status"], "failed", "{r:#}");
    is_byte_identical_everywhere(&lab, "map.bin", &data, Some(victim));
}

#[test]
fn a_corrupt_chunk_from_a_relay_is_caught_refetched_and_reported() {
    let mut lab = lab();
    let relay_id = ranked(&lab)[0].clone();
    let relay = lab
        .terminals
        .iter()
        .position(|t| t.lan_ip.to_string() == relay_id)
        .unwrap();
    // The fastest terminal gets the file first, alone; then its copy rots
    // on its disk: one byte of chunk 2 (64 KiB chunks).
    let (path, data) = file(&lab, "media.bin", 2);
    let child = distribute(&mut lab, &path, &["--to", &relay_id, "--mode", "tree"]);
    let r = report(&mut lab, child);
    assert_eq!(r["done"], 1, "{r:#}");
    flip_byte(
        &lab.dist_state(relay).join("files").join("media.bin"),
        2 * 65_536 + 100,
    );
    assert_eq!(ranked(&lab)[0], relay_id, "the same ranking");
    // To everyone: the relay holds the file already and serves its
    // children from that copy; they catch chunk 2 and fetch it again.
    let child = distribute(&mut lab, &path, &["--mode", "tree", "--fanout", "3"]);
    let r = report(&mut lab, child);
    assert_eq!(r["done"], TERMINALS - 1, "{r:#}");
    assert!(r["corrupt"][&relay_id].as_u64().unwrap() >= 1, "{r:#}");
    // Everyone but the relay, whose own copy is the rotten one.
    is_byte_identical_everywhere(&lab, "media.bin", &data, Some(relay));
    let v: serde_json::Value = serde_json::from_str(
        &lab.exec(
            &lab.terminals[0].ns.clone(),
            &lab.bond_ctl.to_string_lossy(),
            &["terminals", "--config", &t1_config(&lab), "--json"],
        )
        .unwrap(),
    )
    .unwrap();
    let row = v["terminals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == relay_id.as_str())
        .unwrap();
    assert!(row["corrupt_served"].as_u64().unwrap() >= 1, "{row}");
    assert_ne!(
        ranked(&lab)[0],
        relay_id,
        "the corrupt relay is no longer first"
    );
}

/// Flips the byte at `at` of the file at `path`, in place.
fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}
