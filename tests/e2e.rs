//! Whole flows through real kernels: a community in namespaces, real
//! agents, real clients (curl, iperf3, ping).
//!
//! Run one at a time (`--test-threads=1`): they share two CPU cores and
//! measure rates.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path, time::Duration};

mod common;
use common::bond_ctl;

use bond_api::reply::{LinkCounters, Links};
use bond_lab::{Lab, TerminalSpec};
use sha2::{Digest, Sha256};

use common::{floors, last_changes};

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).expect("read file");
    format!("{:x}", Sha256::digest(&data))
}

/// Figure 1: t1 with a 10 Mbit/s link, t2 with 20 and 30, t3 with none.
fn figure1() -> Lab {
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    lab
}

#[test]
fn http_download_from_origin_without_wan_link() {
    let mut lab = figure1();
    let served = lab.serve_file("20m.bin", 20).unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let (bytes, secs, out) = lab
        .download(&t3, "http://203.0.113.2/20m.bin", "t3-20m.bin")
        .expect("download");
    assert_eq!(bytes, 20 << 20);
    assert_eq!(sha256(&out), sha256(&served), "downloaded file differs");
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("20 MiB over bond from t3: {secs:.2} s, {mbit:.1} Mbit/s");
    assert!(
        mbit > floors::FIGURE1_HTTP_MBIT,
        "{mbit:.1} Mbit/s over links of 60, want > {}",
        floors::FIGURE1_HTTP_MBIT
    );
    let flows = lab.flows().unwrap();
    assert!(
        flows
            .iter()
            .any(|f| f.origin == Ipv4Addr::new(10, 0, 1, 3) && f.proto == "tcp"),
        "{flows:?}"
    );
}

/// One of a terminal's or the server's per-link counters, by link id.
fn link_counts(v: &Links, field: fn(&LinkCounters) -> u64) -> BTreeMap<u8, u64> {
    v.per_link()
        .into_iter()
        .map(|(id, c)| (id, field(c)))
        .collect()
}

/// One TCP flow each way over links of 10, 20 and 30 Mbit/s from t3 (no
/// link of its own). Both ways beat the best single link (30 Mbit/s): only
/// bonding gets there. Each packet goes where it arrives first, so under
/// a saturating flow every link carries traffic and none more than its
/// rate (with 5% for measurement); the only drops are the senders' own
/// when every link is full. (Target figures are `cargo xtask bench`'s.)
#[test]
fn tcp_iperf_fills_every_link_to_its_rate_both_directions() {
    let mut lab = figure1();
    lab.start_iperf().unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let (srv_ns, srv) = (lab.server_ns.clone(), lab.server_instance.clone());
    let origin = lab.terminals[2].instance.clone();
    let rates = [(1u8, 10.0), (2, 20.0), (3, 30.0)];
    let secs = 5.0;
    for reverse in [false, true] {
        // Upstream the origin counts what it sends; downstream the server.
        let (ns, inst, field): (_, _, fn(&LinkCounters) -> u64) = if reverse {
            (&srv_ns, &srv, |c| c.down_bytes)
        } else {
            (&t3, &origin, |c| c.up_bytes)
        };
        let before = link_counts(&lab.links(ns, inst).unwrap(), field);
        let mut args = vec!["-c", "203.0.113.2", "-t", "5", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = lab.iperf3(&t3, &[], &args).expect("iperf3");
        let after = link_counts(&lab.links(ns, inst).unwrap(), field);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap();
        let way = if reverse { "down" } else { "up" };
        let per_link: Vec<(u8, f64)> = rates
            .iter()
            .map(|&(id, _)| {
                let b =
                    after.get(&id).copied().unwrap_or(0) - before.get(&id).copied().unwrap_or(0);
                (id, b as f64 * 8.0 / secs / 1e6)
            })
            .collect();
        eprintln!(
            "iperf3 TCP {way}: {:.1} Mbit/s, {} retransmits; per link {per_link:.1?} Mbit/s",
            bps / 1e6,
            v["end"]["sum_sent"]["retransmits"]
        );
        assert!(
            bps / 1e6 > floors::FIGURE1_TCP_MBIT,
            "iperf3 TCP {way}: {:.1} Mbit/s, want > {}",
            bps / 1e6,
            floors::FIGURE1_TCP_MBIT
        );
        for ((id, mbit), (_, rate)) in per_link.iter().zip(rates) {
            assert!(
                *mbit <= rate * 1.05,
                "{way}: link {id} carried {mbit:.1} Mbit/s of {rate}"
            );
            assert!(
                *mbit >= rate * floors::FIGURE1_LINK_SHARE,
                "{way}: link {id} carried only {mbit:.1} Mbit/s of {rate}"
            );
        }
    }
    for (ns, inst) in [(&srv_ns, &srv), (&t3, &origin)] {
        let v = lab.links(ns, inst).unwrap();
        let drops: Vec<(&String, &u64)> = v
            .drops()
            .iter()
            .filter(|&(k, n)| *n > 0 && k != "links_full" && k != "not_ipv4")
            .collect();
        assert!(drops.is_empty(), "{inst}: {drops:?}");
    }
}

#[test]
fn udp_both_ways_and_ping() {
    let mut lab = figure1();
    lab.start_iperf().unwrap();
    let t3 = lab.terminals[2].ns.clone();
    for reverse in [false, true] {
        let mut args = vec![
            "-c",
            "203.0.113.2",
            "-u",
            "-b",
            "20M",
            "-t",
            "3",
            "-l",
            "1200",
            "-J",
        ];
        if reverse {
            args.push("-R");
        }
        let out = lab.iperf3(&t3, &[], &args).expect("iperf3 udp");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let sum = &v["end"]["sum"];
        let lost = sum["lost_percent"].as_f64().unwrap();
        let bps = sum["bits_per_second"].as_f64().unwrap();
        eprintln!(
            "iperf3 UDP {}: {:.1} Mbit/s, {lost:.2}% lost",
            if reverse { "down" } else { "up" },
            bps / 1e6
        );
        assert!(
            lost < 1.0,
            "UDP at 20 Mbit/s over 60 Mbit/s of links lost {lost}%"
        );
        assert!(sum["packets"].as_u64().unwrap() > 1000);
    }
    let out = lab
        .exec(
            &t3,
            "ping",
            &["-c", "5", "-i", "0.2", "-W", "2", "203.0.113.2"],
        )
        .expect("ping");
    assert!(out.contains("5 received"), "{out}");
    let flows = lab.flows().unwrap();
    let protos: Vec<&str> = flows.iter().map(|f| f.proto.as_str()).collect();
    assert!(
        protos.contains(&"icmp") && protos.contains(&"udp") && protos.contains(&"tcp"),
        "{flows:?}"
    );
}

#[test]
fn origin_with_own_link_and_two_origins_on_one_port() {
    let mut lab = figure1();
    let served = lab.serve_file("4m.bin", 4).unwrap();
    let want = sha256(&served);
    // t1 has its own link; t3 has none. Both use local port 40000 at once.
    let (t1, t3) = (lab.terminals[0].ns.clone(), lab.terminals[2].ns.clone());
    let dir = lab.dir.clone();
    let run = |ns: String, name: &'static str| {
        let out = dir.join(name);
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .args(["--", "curl", "-sS", "--fail", "--local-port", "40000", "-o"])
            .arg(&out)
            .arg("http://203.0.113.2/4m.bin");
        std::thread::spawn(move || (c.output().expect("curl"), out))
    };
    let a = run(t1, "t1.bin");
    let b = run(t3, "t3.bin");
    for h in [a, b] {
        let (o, out) = h.join().unwrap();
        assert!(
            o.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(
            sha256(&out),
            want,
            "{} got someone else's bytes",
            out.display()
        );
    }
    let flows = lab.flows().unwrap();
    let f: Vec<_> = flows
        .iter()
        .filter(|f| f.port == 40000 && f.proto == "tcp")
        .collect();
    assert_eq!(f.len(), 2, "one flow per origin: {flows:?}");
    assert_ne!(f[0].origin, f[1].origin);
    assert_ne!(
        f[0].nat_port, f[1].nat_port,
        "each origin gets its own dedicated port"
    );
}

#[test]
fn single_host_with_two_links_gets_both() {
    // The parallel-access seed: one host, two WAN links, no LAN peers.
    let spec = [TerminalSpec {
        links: vec![10, 10],
    }];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    let served = lab.serve_file("8m.bin", 8).unwrap();
    let t1 = lab.terminals[0].ns.clone();
    let (bytes, secs, out) = lab
        .download(&t1, "http://203.0.113.2/8m.bin", "t1.bin")
        .expect("download");
    assert_eq!(sha256(&out), sha256(&served));
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("one host, two 10 Mbit/s links: {mbit:.1} Mbit/s");
    assert!(
        mbit > floors::TWO_LINKS_MBIT,
        "two 10 Mbit/s links: {mbit:.1} Mbit/s, want > {}",
        floors::TWO_LINKS_MBIT
    );
    let srv = lab
        .links(&lab.server_ns.clone(), &lab.server_instance.clone())
        .unwrap();
    let down = link_counts(&srv, |c| c.down_pkts);
    assert!(
        down.values().all(|&n| n > 1000),
        "replies spread over both source addresses: {down:?}"
    );
}

/// The first run on a fresh machine: no bpffs mounted, and the server and
/// three terminal agents started at the same moment, as `cargo xtask demo`
/// does. Each must find or make the one mount and all must come up. (Each
/// agent once mounted its own bpffs; later mounts hid earlier pins and the
/// agents died.) Runs in a private mount namespace, so the host's bpffs is
/// untouched.
#[test]
fn agents_started_at_once_without_bpffs_share_one_mount() {
    let lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    let bin = bond_ctl().display();
    let mut agents = vec![(
        lab.server_ns.clone(),
        lab.server_instance.clone(),
        lab.server_config(),
    )];
    for (i, t) in lab.terminals.iter().enumerate() {
        agents.push((t.ns.clone(), t.instance.clone(), lab.terminal_config(i)));
    }
    let mut start = String::new();
    let mut wait = String::new();
    for (ns, inst, cfg) in &agents {
        let path = lab.dir.join(format!("{inst}.toml"));
        std::fs::write(&path, cfg).unwrap();
        let log = lab.dir.join(format!("{inst}.log"));
        start += &format!(
            "nsenter --net=/run/netns/{ns} -- {bin} agent --config {} >{} 2>&1 &\n",
            path.display(),
            log.display()
        );
        if inst != &lab.server_instance {
            wait += &format!(
                "until nsenter --net=/run/netns/{ns} -- {bin} --instance {inst} status --json 2>/dev/null \
                 | grep -q '\"logged_on\":true'; do\n\
                   [ $SECONDS -lt 30 ] || {{ echo 'timed out: {inst}'; break; }}; sleep 0.2\n\
                 done\n"
            );
        }
    }
    let script = format!(
        "while umount /sys/fs/bpf 2>/dev/null; do :; done\n\
         echo before=$(stat -f -c %T /sys/fs/bpf)\n\
         {start}{wait}\
         echo mounts=$(grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts)\n\
         kill $(jobs -p); wait\n"
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let logs: String = agents
        .iter()
        .map(|(_, inst, _)| {
            let log =
                std::fs::read_to_string(lab.dir.join(format!("{inst}.log"))).unwrap_or_default();
            format!("--- {inst}:\n{log}\n")
        })
        .collect();
    assert!(
        out.contains("before=sysfs"),
        "bpffs was not unmounted first:\n{out}"
    );
    assert!(
        !out.contains("timed out"),
        "an agent did not come up:\n{out}\n{logs}"
    );
    assert!(
        out.contains("mounts=1\n"),
        "want one bpffs mount:\n{out}\n{logs}"
    );
}

/// A lab of three terminals, each owning one of `profile`'s links, with
/// iperf3 and a file on the content host, agents started.
fn profile_lab(profile: &str, file_mb: usize) -> (Lab, std::path::PathBuf) {
    use bond_lab::Profile;
    let p = Profile::named(profile).unwrap();
    let spec: Vec<Vec<_>> = p.links.iter().map(|l| vec![l.clone()]).collect();
    let mut lab = Lab::build_links(&spec, bond_ctl()).expect("build lab");
    let served = lab.serve_file("file.bin", file_mb).unwrap();
    lab.start_iperf().unwrap();
    lab.start_agents().expect("start agents");
    (lab, served)
}

/// iperf3 TCP from `ns` for `secs` (`reverse`: download): Mbit/s received.
fn iperf_mbit(lab: &Lab, ns: &str, secs: u32, reverse: bool) -> f64 {
    iperf_port_mbit(lab, ns, "5201", secs, reverse)
}

/// [`iperf_mbit`] to the iperf3 server on `port`.
fn iperf_port_mbit(lab: &Lab, ns: &str, port: &str, secs: u32, reverse: bool) -> f64 {
    iperf_steady_mbit(lab, ns, port, secs, 0, reverse)
}

/// [`iperf_port_mbit`], the first `omit` seconds left out of the figure
/// (iperf3 `-O`): the steady state once the flows have found their share.
fn iperf_steady_mbit(lab: &Lab, ns: &str, port: &str, secs: u32, omit: u32, reverse: bool) -> f64 {
    let (t, o) = (secs.to_string(), omit.to_string());
    let mut args = vec!["-c", "203.0.113.2", "-p", port, "-t", &t, "-O", &o, "-J"];
    if reverse {
        args.push("-R");
    }
    let out = lab.iperf3(ns, &[], &args).expect("iperf3");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Shown when the test fails: each second's rate and retransmissions.
    let seconds: Vec<String> = v["intervals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let s = &i["sum"];
            let mbit = s["bits_per_second"].as_f64().unwrap() / 1e6;
            format!("{mbit:.0}/{}", s["retransmits"].as_u64().unwrap_or(0))
        })
        .collect();
    eprintln!(
        "{ns} port {port}, Mbit/s/retransmits each second: {}",
        seconds.join(" ")
    );
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6
}

/// `mixed` (10/20/40 Mbit/s at 5/20/40 ms one way): a file arrives intact,
/// and one TCP flow (the lab's CUBIC) each way beats the best single link
/// (40 Mbit/s). Weighted round-robin, which ignores the delays, reordered
/// this flow into 13.7 Mbit/s; earliest arrival first alone kept 24.8-26.0
/// down, CUBIC's HyStart taking the round trip that rose with the near
/// links' queues for congestion. With the playouts holding every packet to
/// the far link's delay: 57-62 down, 56 up here.
#[test]
fn mixed_links_keep_one_tcp_flow_above_the_best_link_both_ways() {
    let (lab, served) = profile_lab("mixed", 8);
    // The server's downstream schedule, as `bond-ctl status` shows it:
    // each link at its rate, its one-way delay over the nearest link's
    // (5, 20 and 40 ms: 0, 15 and 35), in use.
    lab.wait_for_measured(Duration::from_secs(10))
        .expect("links measured");
    let status = lab.server_status().unwrap();
    let paths = &status.communities[0].paths;
    let mut seen: Vec<(u8, u64, u32)> = paths
        .iter()
        .map(|p| {
            assert!(p.usable, "{p:?}");
            (p.link.expect("a link"), p.kbit, p.delay_us)
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen.len(), 3, "{paths:?}");
    for ((link, kbit, delay_us), (rate, delay_ms)) in
        seen.iter().zip([(10_000, 0), (20_000, 15), (40_000, 35)])
    {
        assert_eq!(*kbit, rate, "link {link}: {paths:?}");
        assert!(
            delay_us.abs_diff(delay_ms * 1000) <= 3000,
            "link {link}: {delay_us} µs over the nearest, want {delay_ms} ms: {paths:?}"
        );
    }
    let t1 = lab.terminals[0].ns.clone();
    let (_, secs, out) = lab
        .download(&t1, "http://203.0.113.2/file.bin", "mixed.bin")
        .expect("download");
    assert_eq!(sha256(&out), sha256(&served), "downloaded file differs");
    eprintln!("8 MiB over mixed links: {secs:.2} s");
    for reverse in [true, false] {
        let mbit = iperf_mbit(&lab, &t1, 6, reverse);
        let way = if reverse { "down" } else { "up" };
        eprintln!("mixed: one TCP flow {way}: {mbit:.1} Mbit/s");
        assert!(
            mbit > floors::MIXED_TCP_MBIT,
            "{way}: {mbit:.1} Mbit/s, want > {} (the best link is 40)",
            floors::MIXED_TCP_MBIT
        );
    }
}

/// `lte`: its third link loses 0.1% of its packets (and jitters, and
/// steps its rate). Each sender numbers each link's packets and keeps
/// copies; the receiving end's playout sees each loss when the link's next
/// packet arrives, holds what came after, and asks for it again
/// (`bond_agent::resend`). Before, each loss cut the flow's window: one TCP
/// download kept 48 Mbit/s (median of 3) of the 80; with the copies, 59-71
/// in the lab's runs, uploads 35-50 with two or three retransmissions.
/// Asserted, each way: losses were seen, nine in ten (or all but two, of
/// few) filled by a copy the sender sent again; the file intact; the flow
/// above the best link (30).
#[test]
fn a_links_losses_are_sent_again_both_ways() {
    let (lab, served) = profile_lab("lte", 8);
    lab.wait_for_measured(Duration::from_secs(10))
        .expect("links measured");
    let t1 = lab.terminals[0].ns.clone();
    let (_, _, out) = lab
        .download(&t1, "http://203.0.113.2/file.bin", "lte.bin")
        .expect("download");
    assert_eq!(sha256(&out), sha256(&served), "downloaded file differs");
    let (ns, instance) = lab.terminal_agent(0);
    for reverse in [true, false] {
        // Upstream, the lossy link carries less (its rate steps down): a
        // 6 s upload sees 1-3 losses, none in about one run of five, so
        // it goes on (up to five times) until one is seen. The counters
        // add up over the runs; the rate is the last run's.
        let mut runs = 0;
        let (mbit, way, playout, sender) = loop {
            let mbit = iperf_mbit(&lab, &t1, 6, reverse);
            runs += 1;
            let terminal = lab.terminal_status(&ns, &instance).unwrap();
            let server = lab.server_status().unwrap();
            // The receiving end's playout, and the sender's copies.
            let (way, playout, sender) = if reverse {
                ("down", terminal.playout, server.resend)
            } else {
                ("up", server.playout, terminal.resend)
            };
            let playout = playout.expect("a playout");
            if playout.lost > 0 || reverse || runs == 5 {
                break (mbit, way, playout, sender);
            }
        };
        eprintln!(
            "lte: one TCP flow {way}: {mbit:.1} Mbit/s ({runs} run(s)); playout {playout:?}; sender {sender:?}"
        );
        let (lost, resent) = (playout.lost, playout.resent);
        assert!(lost > 0, "{way}: no loss seen on a lossy link: {playout:?}");
        // Nine in ten, and with a handful of losses two may go unfilled:
        // a copy can be lost again, arrive after the playout gave up on
        // it, or be torn in the sender's lock-free ring and not sent
        // (seen: 8 of 10, the sender short of one copy).
        assert!(
            resent >= (lost * 9 / 10).min(lost.saturating_sub(2)),
            "{way}: copies filled {resent} of {lost} losses"
        );
        assert!(
            sender.asked >= lost,
            "{way}: the sender was asked for every loss: {sender:?}"
        );
        assert!(sender.sent >= resent, "{way}: {sender:?}");
        let floor = if reverse {
            floors::LTE_DOWN_MBIT
        } else {
            floors::LTE_UP_MBIT
        };
        assert!(
            mbit > floor,
            "{way}: {mbit:.1} Mbit/s, want > {floor} (the best link is 30)"
        );
    }
}

/// `mixed`, two origins uploading at once, each striping over all three
/// links: t1 and t2 share every link (their own and each other's) and t3's.
/// Each origin's model counts every link as its own, so without sharing
/// they offered each link twice its rate: the nearest link's modem
/// dropped, both flows kept halving, and neither built the queues that
/// reach the far link (measured: 17-21 Mbit/s between them, below the best
/// single link, the 40 Mbit/s link carrying 2). The server tells each
/// origin what the others carry on each link and each counts a link at
/// its fair share (`bond_agent::share`): 58-61 Mbit/s between them in this
/// test's runs; of eleven such starts in the lab nine kept 56-62 and two
/// 30-40, their slow starts both overshooting (CUBIC then regrows for
/// seconds, as one flow alone does). Asserted: half the summed rates,
/// which no run before shares came near.
#[test]
fn two_origins_uploading_at_once_share_the_links() {
    let (mut lab, _) = profile_lab("mixed", 1);
    let web = lab.web_ns.clone();
    lab.spawn(
        &web,
        "iperf3-5202",
        "iperf3",
        &["-s", "-B", "203.0.113.2", "-p", "5202"],
    )
    .unwrap();
    // A community that has formed: each origin has heard its peers'
    // links' delays (an unmeasured link stays out of the schedule, and a
    // flow started on its own link alone keeps a window too small for the
    // others long after they join).
    let start = std::time::Instant::now();
    while !(0..2).all(|i| {
        let (ns, instance) = lab.terminal_agent(i);
        let st = lab.terminal_status(&ns, &instance).unwrap();
        st.paths.len() == 3 && st.paths.iter().all(|p| p.delay_us < 1_000_000)
    }) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the origins did not measure every link's delay in 10 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (t1, t2) = (lab.terminals[0].ns.clone(), lab.terminals[1].ns.clone());
    let (a, b) = std::thread::scope(|s| {
        // Two flows starting at once take a few seconds to find their
        // shares (the origins learn each other's load from the feedback):
        // the first 2 s are left out, 8 s measured.
        let a = s.spawn(|| iperf_steady_mbit(&lab, &t1, "5201", 8, 2, false));
        let b = s.spawn(|| iperf_steady_mbit(&lab, &t2, "5202", 8, 2, false));
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("two uploads at once over mixed: t1 {a:.1} + t2 {b:.1} Mbit/s");
    for i in 0..2 {
        let (ns, instance) = lab.terminal_agent(i);
        let fb = lab.terminal_status(&ns, &instance).unwrap().feedback;
        eprintln!("t{}: feedback {fb:?}", i + 1);
        assert!(
            fb.counts.shared >= 1,
            "t{} never counted a link at its share",
            i + 1
        );
    }
    assert!(
        a + b > floors::TWO_ORIGINS_MBIT,
        "{:.1} Mbit/s between them of the links' 70, want > {}",
        a + b,
        floors::TWO_ORIGINS_MBIT
    );
    assert!(a > 8.0 && b > 8.0, "one origin starved: {a:.1} / {b:.1}");
}

/// `flap`: link 1 (t1's own, and its only one) goes dark with carrier up
/// for 5 s during an upload from t1 and a download to it. Within 300 ms it
/// leaves t1's own upstream schedule and the server's downstream one
/// (their counters for it stop); both senders saw it silent in the
/// feedback first (`feedback.silenced`: measured about 100 ms after its
/// last report, where the echoes take 150-275 ms); t1 keeps its session,
/// its announces going through a peer (dark longer than the server waits
/// for announces, the session used to close and every packet of t1's was
/// dropped for a bad token); neither transfer stalls while it is dark;
/// and the link is back in both schedules once it delivers again.
///
/// "Stalls" is judged against each flow's own pace before: a third of its
/// packets for the 100-200 ms until the link is out are lost, and CUBIC
/// halves or more and regrows for seconds; with the upload's ACKs queued
/// behind the download, one flow's pace before varies from 20 to 55
/// Mbit/s run to run. Measured while dark: 34-100% of that pace, most
/// runs over 60%. A retransmission timeout (taken in 3 of 9 runs before
/// the feedback saw silent links) left 10% (5.5 of 55). How much of the
/// other links' 40 Mbit/s a flow keeps is the benchmark's `flap` column.
#[test]
fn a_dark_link_leaves_every_schedule_within_300ms_and_comes_back() {
    use bond_datapath::{DEFAULT_BPFFS, Maps, pin_dir};
    use std::time::{Duration, Instant};
    let (mut lab, _) = profile_lab("flap", 1);
    let t1 = lab.terminals[0].ns.clone();
    let bpffs = std::path::Path::new(DEFAULT_BPFFS);
    let origin = Maps::new(pin_dir(bpffs, &lab.terminals[0].instance));
    let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
    let idx = server
        .server_link_index()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.link == 1)
        .expect("link 1 at the server")
        .1;
    let up = || {
        origin
            .terminal_link_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.0 == 1)
            .map_or(0, |s| s.2.up_pkts)
    };
    let down = || server.server_link_stats(idx).unwrap().down_pkts;
    lab.upload_and_download(&t1, &["-t", "11", "-i", "0.5", "-J"])
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let (up0, down0) = (up(), down());
    std::thread::sleep(Duration::from_millis(500));
    let (up1, down1) = (up(), down());
    assert!(
        up1 > up0 && down1 > down0,
        "link 1 carries both ways before: up {up0} -> {up1}, down {down0} -> {down1}"
    );
    lab.set_dark(1, true).unwrap();
    let dark_at = Instant::now();
    let [up_stop, down_stop] = last_changes(|| [up(), down()], Duration::from_millis(1500));
    let (up_in, down_in) = (up_stop - dark_at, down_stop - dark_at);
    eprintln!(
        "dark link: out of the origin's schedule after {up_in:?}, the server's after {down_in:?}"
    );
    assert!(
        up_in <= Duration::from_millis(300),
        "the origin sent on it for {up_in:?}"
    );
    assert!(
        down_in <= Duration::from_millis(300),
        "the server sent on it for {down_in:?}"
    );
    // Dark for 5 s: past the 3 s the server waits for t1's announces.
    std::thread::sleep(
        (dark_at + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    );
    lab.set_dark(1, false).unwrap();
    let (up1, down1) = (up(), down());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        up() > up1 && down() > down1,
        "link 1 back in both schedules after healing"
    );
    let metrics = lab
        .ctl(&lab.server_ns, &lab.server_instance, &["metrics"])
        .unwrap();
    let bad_token = metrics
        .lines()
        .find(|l| l.starts_with("bond_drops_total{reason=\"bad_token\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert_eq!(
        bad_token, 0,
        "t1's session closed while its link was dark: its packets dropped for a bad token"
    );
    // Whichever sender had a burst on it when it went dark (the other's
    // flow may have left it idle just then, and the echoes are then first).
    let silenced: Vec<u64> = vec![
        lab.terminal_status(&t1, &lab.terminals[0].instance)
            .unwrap()
            .feedback
            .counts
            .silenced,
        lab.server_status().unwrap().feedback.counts.silenced,
    ];
    eprintln!("silenced: origin {}, server {}", silenced[0], silenced[1]);
    assert!(
        silenced.iter().sum::<u64>() >= 1,
        "neither sender's feedback saw link 1 silent"
    );
    for name in ["upload", "download"] {
        let log = lab.wait_child(name, Duration::from_secs(30)).expect(name);
        let v: serde_json::Value = serde_json::from_str(&log).expect(&log);
        let mbit = |from: f64, to: f64| {
            let r: Vec<f64> = v["intervals"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: no intervals: {log}"))
                .iter()
                .filter(|i| {
                    let start = i["sum"]["start"].as_f64().unwrap_or(-1.0);
                    (from - 0.01..to - 0.01).contains(&start)
                })
                .map(|i| i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6)
                .collect();
            assert_eq!(
                r.len(),
                ((to - from) * 2.0) as usize,
                "{name}: {from}-{to} s in {log}"
            );
            r.iter().sum::<f64>() / r.len() as f64
        };
        // iperf3's 0.5 to 2 s before the dark (from about 2.5 s), and its
        // 4 to 7 s inside it.
        let (before, dark) = (mbit(0.5, 2.0), mbit(4.0, 7.0));
        eprintln!("flap {name}: {before:.1} Mbit/s before, {dark:.1} while link 1 is dark");
        assert!(
            dark > floors::FLAP_DARK_SHARE * before,
            "{name}: {dark:.1} Mbit/s while dark, under {} of its {before:.1} before",
            floors::FLAP_DARK_SHARE
        );
    }
}

/// Members' IPv6 through bond, in Figure 1 from t3 (no link of its own):
/// `ping -6` answers; a 20 MiB download with `curl -6` arrives intact;
/// one `iperf3 -6` TCP flow each way bonds the links as IPv4 does; the
/// server holds the flows as IPv6 flows from its IPv6 NAT address.
#[test]
fn ipv6_goes_through_bond() {
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    let served = lab.serve_file("v6.bin", 20).expect("serve");
    lab.start_agents().expect("start agents");
    let t3 = lab.terminals[2].ns.clone();
    let content6 = bond_lab::CONTENT6.to_string();
    let ping = lab
        .cmd(&t3, "ping")
        .args(["-6", "-c", "3", "-i", "0.2", "-W", "2", &content6])
        .output()
        .expect("ping");
    assert!(
        ping.status.success(),
        "ping -6: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let out = lab.dir.join("v6.bin");
    let url = format!("http://[{content6}]/v6.bin");
    lab.exec(
        &t3,
        "curl",
        &[
            "-6",
            "-sS",
            "--fail",
            "--max-time",
            "120",
            "-o",
            &out.to_string_lossy(),
            &url,
        ],
    )
    .expect("curl -6");
    assert_eq!(sha256(&out), sha256(&served), "downloaded file differs");

    let web = lab.web_ns.clone();
    lab.spawn(
        &web,
        "iperf3-6",
        "iperf3",
        &["-s", "-B", &content6, "-p", "5206"],
    )
    .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    for reverse in [true, false] {
        let mut args = vec!["-6", "-c", &content6, "-p", "5206", "-t", "5", "-J"];
        if reverse {
            args.push("-R");
        }
        let out = lab.iperf3(&t3, &[], &args).expect("iperf3 -6");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mbit = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or_else(|| panic!("iperf3 -6: {}", v["error"]))
            / 1e6;
        let way = if reverse { "down" } else { "up" };
        eprintln!("IPv6, one TCP flow {way}: {mbit:.1} Mbit/s");
        assert!(
            mbit > floors::FIGURE1_IPV6_TCP_MBIT,
            "IPv6 {way}: {mbit:.1} Mbit/s, want > {} (the best link is 30)",
            floors::FIGURE1_IPV6_TCP_MBIT
        );
    }
    let maps = bond_datapath::Maps::new(bond_datapath::pin_dir(
        Path::new(bond_datapath::DEFAULT_BPFFS),
        &lab.server_instance,
    ));
    let flows6 = maps.flows6().expect("IPv6 flows");
    assert!(
        flows6.iter().any(|(k, _)| k.proto == 6),
        "TCP flows in S_FLOWS6: {flows6:?}"
    );
}
