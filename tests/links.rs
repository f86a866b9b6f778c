//! The lab's links against what they promise (`lab::line`, `lab::profile`):
//! a delay line adds its delay and nothing else, keeps order under jitter,
//! and a black hole keeps carrier up. Plain routing, no bond: these check
//! the ground the datapath tests stand on.
//!
//! Run one at a time (`--test-threads=1`): they measure rates and delays.

mod common;
use common::bond_ctl;

use std::time::Duration;

use bond_lab::{Lab, LinkSpec, line::Impair};

/// A lab of one terminal whose one link is `spec`; iperf3 on the content host.
fn one_link(spec: LinkSpec) -> Lab {
    let mut lab = Lab::build_links(&[vec![spec]], bond_ctl()).expect("build lab");
    lab.start_iperf().expect("iperf3 server");
    lab
}

/// The round trips in ms of `n` pings from t1 to the content host, sorted,
/// after one that warms up ARP (whose request and reply cross the delay
/// line too).
fn ping(lab: &Lab, n: u32) -> Vec<f64> {
    let t1 = &lab.terminals[0].ns;
    let _ = lab.exec(t1, "ping", &["-q", "-c", "1", "-W", "2", "203.0.113.2"]);
    let out = lab
        .exec(
            t1,
            "ping",
            &["-c", &n.to_string(), "-i", "0.05", "203.0.113.2"],
        )
        .expect("ping");
    // 64 bytes from 203.0.113.2: icmp_seq=1 ttl=63 time=40.1 ms
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .map(|t| t.trim_end_matches(" ms").parse().expect(t))
        .collect();
    assert_eq!(rtts.len(), n as usize, "every ping answered:\n{out}");
    rtts.sort_by(f64::total_cmp);
    rtts
}

/// The middle of sorted samples.
fn median(sorted: &[f64]) -> f64 {
    sorted[sorted.len() / 2]
}

/// What the receiver of one iperf3 UDP run saw.
#[derive(Debug)]
struct Udp {
    total: u64,
    lost: u64,
    out_of_order: u64,
    /// Datagrams the receiving host's own UDP socket refused for a full
    /// buffer (iperf3 read too slowly on a busy machine): lost, but not on
    /// the link.
    refused: u64,
}

/// Datagrams the kernel in `ns` refused for a full UDP receive buffer
/// (`RcvbufErrors` in /proc/net/snmp).
fn udp_rcvbuf_errors(lab: &Lab, ns: &str) -> u64 {
    let snmp = lab.exec(ns, "cat", &["/proc/net/snmp"]).expect("snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().expect(&snmp), udp.next().expect(&snmp));
    let at = names
        .split_whitespace()
        .position(|n| n == "RcvbufErrors")
        .expect(names);
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// iperf3 UDP at `mbit` for `secs` from t1 (`reverse`: to t1).
fn udp(lab: &Lab, mbit: u32, secs: u32, reverse: bool) -> Udp {
    let receiver = if reverse {
        &lab.terminals[0].ns
    } else {
        &lab.web_ns
    };
    let refused_before = udp_rcvbuf_errors(lab, receiver);
    let rate = format!("{mbit}M");
    let t = secs.to_string();
    let mut args = vec![
        "-c",
        "203.0.113.2",
        "-u",
        "-b",
        &rate,
        "-l",
        "1400",
        "-t",
        &t,
        "--json",
    ];
    if reverse {
        args.push("-R");
    }
    let out = lab
        .iperf3(&lab.terminals[0].ns, &[], &args)
        .expect("iperf3");
    let v: serde_json::Value = serde_json::from_str(&out).expect("iperf3 json");
    let s = &v["end"]["sum"];
    let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("no {k} in {s}"));
    Udp {
        total: n("packets"),
        lost: n("lost_packets"),
        out_of_order: v["end"]["streams"][0]["udp"]["out_of_order"]
            .as_u64()
            .unwrap_or(0),
        refused: udp_rcvbuf_errors(lab, receiver) - refused_before,
    }
}

#[test]
fn a_delay_line_adds_its_delay_within_a_millisecond() {
    let lab = one_link(LinkSpec::delayed(0, 20));
    // The line never releases early. A round trip crosses it twice, and
    // each crossing is a wake-up of its sender thread (0.15-0.3 ms late
    // on these VMs, real-time or not) and two veth hops: measured 0.4-0.8
    // ms over the delay in all, and on a busy or noisy host a run of
    // round trips a millisecond or more over now and then, while the
    // line's own counter showed no frame released over 1 ms late. So the
    // round trips are judged by their median and three in four of them,
    // and the line's counters are printed beside. A second of pings
    // first is not counted: the kernel tears the suite's previous labs
    // down in the background, and in CI the line (real-time) was 8.5 ms
    // late meanwhile, which it never is alone.
    let _ = ping(&lab, 20);
    let rtt = ping(&lab, 40);
    let line = lab.line_stats(1).unwrap();
    eprintln!("20 ms each way: rtt {rtt:.2?} ms; the line: {line}");
    let med = median(&rtt);
    assert!((med - 40.0).abs() < 1.0, "median rtt {med} ms, want 40 ± 1");
    assert!(rtt[0] > 39.5, "a round trip under the delay: {rtt:?}");
    let within = rtt.iter().filter(|&&r| r < 41.0).count();
    assert!(
        within >= 30,
        "{within} of 40 within 1 ms of 40: {rtt:?}; the line: {line}"
    );
}

/// The line itself drops nothing at 100 Mbit/s: its sockets never overflow
/// and every frame it reads it sends. A datagram the receiving host's own
/// UDP socket refuses (iperf3 reads too slowly on a busy machine) is not
/// the line's, and is counted apart.
#[test]
fn a_delay_line_carries_100_mbit_without_loss_both_ways() {
    let lab = one_link(LinkSpec::delayed(0, 10));
    for reverse in [false, true] {
        let u = udp(&lab, 100, 4, reverse);
        let line = lab.line_stats(1).expect("line stats");
        eprintln!("100 Mbit/s UDP (reverse: {reverse}): {u:?}; line {line}");
        assert!(u.total > 30_000, "iperf3 sent only {} datagrams", u.total);
        for k in ["lost", "send_failed", "rx_dropped", "oversize"] {
            assert_eq!(line[k], 0, "the delay line's {k}: {line}");
        }
        assert!(u.lost <= u.refused, "lost on the link: {u:?}");
        assert_eq!(u.out_of_order, 0, "{u:?}");
    }
}

/// ±10 ms of jitter moves the round trip over most of its range, yet no
/// frame overtakes another.
#[test]
fn jitter_moves_the_delay_but_keeps_order() {
    let spec = LinkSpec {
        impair: Impair {
            jitter: Duration::from_millis(10),
            ..Impair::delay_ms(30)
        },
        ..LinkSpec::rate(0)
    };
    let lab = one_link(spec);
    let rtt = ping(&lab, 100);
    // The bound itself is unit-tested (`jitter_is_bounded_correlated_and_
    // keeps_order`); here the host's scheduler may add a few ms to a rare
    // echo on a busy machine, so the 5th and 95th percentiles are held to it.
    let (min, max) = (rtt[0], rtt[rtt.len() - 1]);
    let (p5, p95) = (rtt[rtt.len() / 20], rtt[rtt.len() * 19 / 20]);
    eprintln!("30 ± 10 ms each way: rtt {min:.2}..{max:.2} ms, p5..p95 {p5:.2}..{p95:.2}");
    assert!(
        min >= 39.0 && p95 <= 81.5,
        "rtt {min}..{p95} ms (min..p95) outside 2 x (30 ± 10): {rtt:?}"
    );
    assert!(
        p95 - p5 > 6.0,
        "jitter did not move the delay: p5..p95 {p5}..{p95} ms"
    );
    let u = udp(&lab, 20, 3, false);
    assert!(u.lost <= u.refused && u.out_of_order == 0, "{u:?}");
}

#[test]
fn loss_takes_about_its_share() {
    let spec = LinkSpec {
        impair: Impair {
            loss: 0.02,
            ..Impair::delay_ms(1)
        },
        ..LinkSpec::rate(0)
    };
    let lab = one_link(spec);
    let u = udp(&lab, 20, 3, false);
    let share = (u.lost - u.refused.min(u.lost)) as f64 / u.total as f64;
    eprintln!("2% loss: {u:?} ({:.2}% on the link)", share * 100.0);
    assert!((0.01..0.03).contains(&share), "{share}");
}

/// A black hole: nothing gets through, either way, while the interfaces
/// on both sides keep carrier; healed, traffic flows again.
#[test]
fn a_dark_link_keeps_carrier_and_heals() {
    let lab = one_link(LinkSpec::delayed(0, 5));
    let t1 = lab.terminals[0].ns.clone();
    lab.set_dark(1, true).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let dark = lab
        .cmd(&t1, "ping")
        .args(["-q", "-c", "5", "-i", "0.1", "-W", "1", "203.0.113.2"])
        .output()
        .unwrap();
    assert!(
        !dark.status.success(),
        "pings crossed a dark link: {}",
        String::from_utf8_lossy(&dark.stdout)
    );
    let link = lab.ip(&t1, "link show wan0").unwrap();
    assert!(
        link.contains("LOWER_UP") && link.contains("state UP"),
        "carrier lost: {link}"
    );
    lab.set_dark(1, false).unwrap();
    let rtt = ping(&lab, 5);
    assert!(
        (median(&rtt) - 10.0).abs() < 1.0,
        "after healing: {rtt:?} ms"
    );
}

/// A profile's rate steps play on the modem's tbf: the stepping link of
/// `lte` carries about its low rate in the second period.
#[test]
fn rate_steps_change_the_link_rate() {
    let spec = LinkSpec {
        steps: Some((10, Duration::from_millis(2500))),
        ..LinkSpec::rate(40)
    };
    let mut lab = one_link(spec);
    lab.start_events();
    let tcp = |lab: &Lab| {
        let out = lab
            .iperf3(
                &lab.terminals[0].ns,
                &[],
                &["-c", "203.0.113.2", "-t", "1", "--json"],
            )
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 1e6
    };
    let high = tcp(&lab);
    std::thread::sleep(Duration::from_millis(1700)); // into the low period
    let low = tcp(&lab);
    eprintln!("rate steps: {high:.1} then {low:.1} Mbit/s");
    assert!(high > 30.0 && low < 12.0, "high {high:.1}, low {low:.1}");
}

/// A profile's dark window plays from `start_events`: dark inside it,
/// light after it, and light again at once when the events are started
/// anew while dark (the bench starts them for every transfer).
#[test]
fn a_dark_window_plays_and_ends_light() {
    let spec = LinkSpec {
        dark: Some((Duration::from_millis(200), Duration::from_millis(1500))),
        ..LinkSpec::delayed(0, 2)
    };
    let mut lab = one_link(spec);
    let t1 = lab.terminals[0].ns.clone();
    let reach = |lab: &Lab| {
        lab.cmd(&t1, "ping")
            .args(["-q", "-c", "1", "-W", "1", "203.0.113.2"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(reach(&lab), "light before the events");
    lab.start_events();
    std::thread::sleep(Duration::from_millis(400));
    assert!(!reach(&lab), "inside the dark window");
    lab.start_events(); // stopped while dark, started again
    assert!(reach(&lab), "a new start begins light");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!reach(&lab), "dark again in the new window");
    std::thread::sleep(Duration::from_millis(1600));
    assert!(reach(&lab), "light after the window");
}

/// Every lab namespace runs the congestion control the lab pins, not the
/// host's default (which may be BBR): one TCP flow's numbers depend on it.
#[test]
fn every_namespace_uses_the_pinned_congestion_control() {
    let lab = one_link(LinkSpec::delayed(0, 1));
    let want = bond_lab::tcp_cc();
    for ns in [&lab.terminals[0].ns, &lab.web_ns, &lab.server_ns] {
        let got = lab
            .exec(ns, "sysctl", &["-n", "net.ipv4.tcp_congestion_control"])
            .expect("sysctl");
        assert_eq!(got.trim(), want, "in {ns}");
    }
}
