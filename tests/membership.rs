//! Membership with real traffic: terminals join, crash and leave during
//! downloads, and the counters in the maps show where packets went.
//!
//! Run one at a time (`--test-threads=1`): they share two CPU cores and
//! measure rates and times.

mod common;
use common::bond_ctl;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use bond_common::maps::LinkKey;
use bond_datapath::{DEFAULT_BPFFS, Maps, pin_dir};
use bond_lab::{COMMUNITY, Lab, TerminalSpec};
use sha2::{Digest, Sha256};

/// Figure 1: t1 with a 10 Mbit/s link, t2 with 20 and 30, t3 with none.
fn figure1(announce_ms: u32) -> Lab {
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.announce_ms = announce_ms;
    lab
}

/// Packet counters of one link, read straight from the pinned maps: what
/// the origin t3 sent up on it, and what the server sent down on it.
struct Counters {
    origin: Maps,
    server: Maps,
    server_idx: u32,
    link: u8,
}

impl Counters {
    fn new(lab: &Lab, link: u8) -> Self {
        let bpffs = Path::new(DEFAULT_BPFFS);
        let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
        let key = LinkKey::new(COMMUNITY, link);
        let server_idx = server
            .server_link_index()
            .unwrap()
            .into_iter()
            .find(|(k, _)| *k == key)
            .expect("link registered at the server")
            .1;
        Self {
            origin: Maps::new(pin_dir(bpffs, &lab.terminals[2].instance)),
            server,
            server_idx,
            link,
        }
    }

    /// (packets up from the origin, packets down from the server).
    fn read(&self) -> (u64, u64) {
        let up = self
            .origin
            .terminal_link_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.0 == self.link)
            .map_or(0, |s| s.2.up_pkts);
        let down = self
            .server
            .server_link_stats(self.server_idx)
            .unwrap()
            .down_pkts;
        (up, down)
    }
}

/// iperf3 from t3 in the background: download (-R) for `secs`.
fn start_download(lab: &mut Lab, secs: u32) {
    let t3 = lab.terminals[2].ns.clone();
    let secs = secs.to_string();
    lab.spawn(
        &t3,
        "iperf-client",
        "iperf3",
        &["-c", "203.0.113.2", "-R", "-t", &secs, "-J", "-i", "1"],
    )
    .unwrap();
}

/// Received Mbit/s in each one-second interval of an iperf3 JSON report.
fn per_second(log: &str) -> Vec<f64> {
    let v: serde_json::Value = serde_json::from_str(log).expect("iperf3 JSON");
    v["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap() / 1e6)
        .collect()
}

/// Per-link packets at the server over a window: (link, packets).
fn server_window(lab: &Lab, window: Duration) -> Vec<(u8, u64)> {
    let server = Maps::new(pin_dir(Path::new(DEFAULT_BPFFS), &lab.server_instance));
    let snap = || -> Vec<(u8, u64)> {
        let mut v: Vec<(u8, u64)> = server
            .server_link_index()
            .unwrap()
            .into_iter()
            .map(|(k, i)| (k.link, server.server_link_stats(i).unwrap().down_pkts))
            .collect();
        v.sort_unstable();
        v
    };
    let a = snap();
    std::thread::sleep(window);
    snap()
        .into_iter()
        .map(|(l, n)| (l, n - a.iter().find(|x| x.0 == l).map_or(0, |x| x.1)))
        .collect()
}

#[test]
fn a_joining_terminal_carries_its_share_within_three_intervals() {
    let mut lab = figure1(1000);
    lab.start_iperf().unwrap();
    lab.start_some(&[1, 2]).expect("t2, t3 and the server");
    start_download(&mut lab, 10);
    std::thread::sleep(Duration::from_secs(2));
    let joined = Instant::now();
    lab.start_terminal(0).unwrap();
    // Three announce intervals from the start of its agent.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(joined.elapsed()));
    let window = server_window(&lab, Duration::from_secs(1));
    let total: u64 = window.iter().map(|w| w.1).sum();
    let share = |l: u8| window.iter().find(|w| w.0 == l).map_or(0, |w| w.1) as f64 / total as f64;
    eprintln!("server, packets per link in the second after 3 intervals: {window:?}");
    assert!(total > 1000, "too little traffic to judge: {window:?}");
    // Link 1 has weight 10 of 60.
    assert!(
        (share(1) - 10.0 / 60.0).abs() < 0.05,
        "link 1 carries {:.1}% downstream, want 16.7%",
        share(1) * 100.0
    );
    // Upstream too: the origin's paths have it (a download sends only
    // ACKs upstream, and those take the link where they arrive first).
    let t3 = Maps::new(pin_dir(
        Path::new(DEFAULT_BPFFS),
        &lab.terminals[2].instance,
    ));
    let paths = t3.up_paths().unwrap();
    assert!(
        paths.links().any(|p| p.id == 1),
        "the origin's paths lack link 1: {paths:?}"
    );
    let rates = per_second(
        &lab.wait_child("iperf-client", Duration::from_secs(30))
            .unwrap(),
    );
    eprintln!("download Mbit/s per second: {rates:.1?}");
}

/// Kills t1 (link 1, 10 Mbit/s) during a download; returns the instant of
/// its death and the counters to watch.
/// Before it, link 1 carries the download and is in the origin's upstream
/// paths (the download's ACKs take whichever link they arrive first on, so
/// they need not be on it).
fn crash_t1(lab: &mut Lab) -> (Instant, Counters) {
    let c = Counters::new(lab, 1);
    let before = c.read();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        c.read().1 > before.1,
        "link 1 carries the download before the crash"
    );
    assert!(
        c.origin.up_paths().unwrap().links().any(|p| p.id == 1),
        "link 1 is in the origin's paths before the crash"
    );
    lab.crash_terminal(0).unwrap();
    (Instant::now(), c)
}

#[test]
fn a_crashed_terminal_gets_no_packets_after_k_intervals() {
    let mut lab = figure1(1000);
    // A download of 240 MiB at 7 MiB/s: more than t2's links alone carry,
    // so link 1 is in use (each packet goes where it arrives first, and
    // the 10 Mbit/s link is the last to fill); after the crash the rest
    // goes over t2's links.
    let served = lab.serve_file("240m.bin", 240).unwrap();
    lab.start_agents().unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let out = lab.dir.join("t3-240m.bin");
    let out_s = out.to_string_lossy().into_owned();
    lab.spawn(
        &t3,
        "curl",
        "curl",
        &[
            "-sS",
            "--fail",
            "--limit-rate",
            "7M",
            "-o",
            &out_s,
            "http://203.0.113.2/240m.bin",
        ],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let (died, c) = crash_t1(&mut lab);
    // K = 3 missed announces of 1 s: then nothing more on link 1. The
    // last announce came at most one interval before the death; the 100 ms
    // are for the agents' timers to fire and the packets in flight to land.
    std::thread::sleep(Duration::from_millis(3100).saturating_sub(died.elapsed()));
    let after_k = c.read();
    lab.wait_child("curl", Duration::from_secs(120))
        .expect("download completes");
    let end = c.read();
    eprintln!(
        "link 1 counters (up at origin, down at server): at K intervals {after_k:?}, at the end {end:?}"
    );
    assert_eq!(
        end, after_k,
        "packets went to the dead terminal after K intervals"
    );
    let digest = |p: &Path| format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()));
    assert_eq!(digest(&out), digest(&served), "downloaded file differs");
}

#[test]
fn with_100ms_announces_traffic_leaves_a_dead_link_within_300ms() {
    let mut lab = figure1(100);
    lab.start_iperf().unwrap();
    lab.start_agents().unwrap();
    start_download(&mut lab, 6);
    std::thread::sleep(Duration::from_secs(2));
    let (died, c) = crash_t1(&mut lab);
    // Watch the counters; the last change is when traffic left the link.
    let mut last = c.read();
    let (mut up_moved, mut down_moved) = (Duration::ZERO, Duration::ZERO);
    while died.elapsed() < Duration::from_secs(2) {
        let now = c.read();
        if now.0 != last.0 {
            up_moved = died.elapsed();
        }
        if now.1 != last.1 {
            down_moved = died.elapsed();
        }
        last = now;
        std::thread::sleep(Duration::from_millis(2));
    }
    eprintln!(
        "after the crash, the last packet towards link 1 left the origin after {} ms, the server after {} ms",
        up_moved.as_millis(),
        down_moved.as_millis()
    );
    assert!(
        up_moved <= Duration::from_millis(300),
        "origin: {up_moved:?}"
    );
    assert!(
        down_moved <= Duration::from_millis(300),
        "server: {down_moved:?}"
    );
    lab.wait_child("iperf-client", Duration::from_secs(30))
        .expect("download completes");
}

#[test]
fn after_shutdown_no_packet_goes_to_the_departed_links() {
    let mut lab = figure1(1000);
    lab.start_iperf().unwrap();
    lab.start_agents().unwrap();
    start_download(&mut lab, 10);
    std::thread::sleep(Duration::from_secs(4));
    let c = Counters::new(&lab, 1);
    lab.stop("agent-t1", false).unwrap(); // SIGTERM: SHUTDOWN, then exit
    let at_exit = c.read();
    let rates = per_second(
        &lab.wait_child("iperf-client", Duration::from_secs(30))
            .unwrap(),
    );
    let end = c.read();
    eprintln!(
        "link 1 counters: at exit {at_exit:?}, at the end {end:?}; Mbit/s per second {rates:.1?}"
    );
    assert_eq!(end, at_exit, "packets went to a departed terminal's link");
    // Seconds 6-10 have links of 20 and 30 Mbit/s: bonding still beats
    // the better of them by 10%. (Not "loses only link 1's share": one TCP
    // flow keeps a smaller part of two links' sum than of three, measured
    // 36-45 Mbit/s of 50 after 52-53 of 60.)
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (before, after) = (mean(&rates[1..4]), mean(&rates[5..10]));
    assert!(
        after > 30.0 * 1.1,
        "after the departure: {before:.1} -> {after:.1} Mbit/s, not above the best remaining link"
    );
}
