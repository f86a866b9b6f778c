//! Whole flows through real kernels: a community in namespaces, real
//! agents, real clients (curl, iperf3, ping).
//!
//! Run one at a time (`--test-threads=1`): they share two CPU cores and
//! measure rates.

use std::path::Path;

use bond_ctl::lab::{Lab, TerminalSpec};
use sha2::{Digest, Sha256};

fn bond_ctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bond-ctl"))
}

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
    let flows = lab.flows_json().unwrap();
    let f = flows["flows"].as_array().unwrap();
    assert!(
        f.iter()
            .any(|f| f["origin"] == "10.0.1.3" && f["proto"] == "tcp"),
        "{flows}"
    );
}

/// Sums a terminal's or the server's per-link counters by link id.
fn link_counts(v: &serde_json::Value, field: &str) -> std::collections::BTreeMap<u64, u64> {
    v["links"]
        .as_array()
        .expect("links array")
        .iter()
        .map(|l| (l["link"].as_u64().unwrap(), l[field].as_u64().unwrap()))
        .collect()
}

/// Asserts counts are spread in the ratio of `weights` (by link id), within
/// `tol` of each link's expected share.
fn assert_ratio(
    what: &str,
    counts: &std::collections::BTreeMap<u64, u64>,
    weights: &[(u64, f64)],
    tol: f64,
) {
    let total: u64 = weights
        .iter()
        .map(|(id, _)| counts.get(id).copied().unwrap_or(0))
        .sum();
    let wsum: f64 = weights.iter().map(|(_, w)| w).sum();
    assert!(total > 1000, "{what}: too few packets to judge: {counts:?}");
    for (id, w) in weights {
        let share = counts.get(id).copied().unwrap_or(0) as f64 / total as f64;
        let want = w / wsum;
        assert!(
            (share - want).abs() <= want * tol,
            "{what}: link {id} carried {:.1}% of packets, want {:.1}% ±{:.0}%: {counts:?}",
            share * 100.0,
            want * 100.0,
            tol * 100.0
        );
    }
}

#[test]
fn tcp_iperf_and_weighted_spread_both_directions() {
    let mut lab = figure1();
    lab.start_iperf().unwrap();
    let t3 = lab.terminals[2].ns.clone();
    // Upload (origin -> server) then download (-R), 5 s each.
    for reverse in [false, true] {
        let mut args = vec!["-c", "203.0.113.2", "-t", "5", "-J"];
        if reverse {
            args.push("-R");
        }
        let _ = lab.exec(&t3, "nstat", &["-n"]);
        let out = lab.exec(&t3, "iperf3", &args).expect("iperf3");
        let ns = lab.exec(&t3, "nstat", &[]).unwrap_or_default();
        eprintln!(
            "{}",
            ns.lines()
                .filter(|l| l.contains("Retrans")
                    || l.contains("DSACK")
                    || l.contains("Reorder")
                    || l.contains("Lost")
                    || l.contains("SACKRecovery")
                    || l.contains("Timeouts"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap();
        eprintln!(
            "iperf3 TCP {}: {:.1} Mbit/s, {} retransmits",
            if reverse { "down" } else { "up" },
            bps / 1e6,
            v["end"]["sum_sent"]["retransmits"]
        );
        // Both ways must beat the best single link (30 Mbit/s): only
        // bonding gets there. (Target figures are `cargo xtask bench`'s.)
        let floor = 31e6;
        assert!(
            bps > floor,
            "iperf3 TCP: {:.1} Mbit/s, want > {:.0}",
            bps / 1e6,
            floor / 1e6
        );
    }
    // Weights are the link rates 10:20:30, upstream at the origin and
    // downstream at the server.
    let weights = [(1, 10.0), (2, 20.0), (3, 30.0)];
    let up = lab
        .links_json(&t3, &lab.terminals[2].instance.clone())
        .unwrap();
    assert_ratio(
        "upstream at origin",
        &link_counts(&up, "up_pkts"),
        &weights,
        0.05,
    );
    let srv = lab
        .links_json(&lab.server_ns.clone(), &lab.server_instance.clone())
        .unwrap();
    assert_ratio(
        "downstream at server",
        &link_counts(&srv, "down_pkts"),
        &weights,
        0.05,
    );
    assert_ratio(
        "upstream at server",
        &link_counts(&srv, "up_pkts"),
        &weights,
        0.05,
    );
    assert_eq!(
        srv["drops"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v.as_u64())
            .sum::<u64>(),
        0,
        "{srv}"
    );
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
        let out = lab.exec(&t3, "iperf3", &args).expect("iperf3 udp");
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
    let flows = lab.flows_json().unwrap();
    let protos: Vec<&str> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["proto"].as_str())
        .collect();
    assert!(
        protos.contains(&"icmp") && protos.contains(&"udp") && protos.contains(&"tcp"),
        "{flows}"
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
    let flows = lab.flows_json().unwrap();
    let f: Vec<&serde_json::Value> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["port"] == 40000 && f["proto"] == "tcp")
        .collect();
    assert_eq!(f.len(), 2, "one flow per origin: {flows}");
    assert_ne!(f[0]["origin"], f[1]["origin"]);
    assert_ne!(
        f[0]["nat_port"], f[1]["nat_port"],
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
        mbit > 13.0,
        "two 10 Mbit/s links must beat one: {mbit:.1} Mbit/s"
    );
    let srv = lab
        .links_json(&lab.server_ns.clone(), &lab.server_instance.clone())
        .unwrap();
    let down = link_counts(&srv, "down_pkts");
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
