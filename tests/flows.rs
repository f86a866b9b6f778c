//! Flows with real traffic through real kernels: idle UDP, closed TCP and
//! ICMP echo flows leave the server's table after their timeouts, and
//! their dedicated ports serve new flows; replies come in only from where
//! an origin sent; ICMP errors about a flow reach its origin (port
//! unreachable, traceroute, path MTU); members cannot reach what the
//! server denies.
//!
//! Run one at a time (`--test-threads=1`): they measure times.

mod common;
use common::bond_ctl;

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use bond_api::reply::FlowRow;
use bond_common::maps::{FLOW_CLOSING, FLOW_FIN};
use bond_datapath::{DEFAULT_BPFFS, Maps, pin_dir};
use bond_lab::{Lab, TerminalSpec};

/// The content host's UDP echo port.
const ECHO_PORT: u16 = 9000;
/// How often the server sweeps in these tests.
const SWEEP_MS: u64 = 100;

/// One terminal with a 20 Mbit/s link, and a server whose config gets
/// `nat_ports` and the `[flows]` table `flows`.
fn lab(nat_ports: &str, flows: &str) -> Lab {
    let spec = [TerminalSpec { links: vec![20] }];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.nat_ports = nat_ports.into();
    lab.server_extra = format!("\n[flows]\nsweep_ms = {SWEEP_MS}\n{flows}");
    lab.start_agents().expect("start agents");
    lab
}

fn server_maps(lab: &Lab) -> Maps {
    Maps::new(pin_dir(Path::new(DEFAULT_BPFFS), &lab.server_instance))
}

fn server_drop(lab: &Lab, reason: &str) -> u64 {
    server_maps(lab)
        .server_drops()
        .unwrap()
        .into_iter()
        .find(|d| d.0 == reason)
        .unwrap_or_else(|| panic!("no drop reason {reason}"))
        .1
}

/// The flows of `lab.flows()` for which `pick` holds.
fn flows_where(lab: &Lab, pick: impl Fn(&FlowRow) -> bool) -> Vec<FlowRow> {
    let mut v = lab.flows().expect("flows --json");
    v.retain(|f| pick(f));
    v
}

fn is(proto: &'static str, port: Option<u16>) -> impl Fn(&FlowRow) -> bool {
    move |f| f.proto == proto && port.is_none_or(|p| f.port == p)
}

/// Polls the flow table until no flow matches `pick`. Returns how long
/// that took and the largest `idle_ms` a matching flow showed meanwhile.
fn wait_gone(lab: &Lab, pick: impl Fn(&FlowRow) -> bool, limit: Duration) -> (Duration, u64) {
    let start = Instant::now();
    let mut idle = 0;
    loop {
        let f = flows_where(lab, &pick);
        if f.is_empty() {
            return (start.elapsed(), idle);
        }
        for x in &f {
            idle = idle.max(x.idle_ms);
        }
        assert!(
            start.elapsed() < limit,
            "flows still there after {limit:?}: {f:?}\n{}",
            lab.log("agent-srv")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the flows `pick` matches to expire on a `timeout_ms` idle
/// timeout, counted from `quiet` (their last packet): they must still be
/// there at 3/4 of it (0.7 of a second's), and gone within it and a
/// sweep (plus a second for the polling).
fn expires_on_time(
    lab: &Lab,
    pick: impl Fn(&FlowRow) -> bool,
    quiet: Instant,
    timeout_ms: u64,
    what: &str,
) {
    let (_, idle) = wait_gone(lab, pick, Duration::from_millis(timeout_ms + 4000));
    let since = quiet.elapsed();
    eprintln!("{what} gone {since:?} after its last packet (seen idle up to {idle} ms)");
    let early = if timeout_ms <= 1000 {
        700
    } else {
        timeout_ms * 3 / 4
    };
    assert!(
        idle >= early,
        "{what}: still there at {early} ms idle (seen up to {idle} ms)"
    );
    assert!(
        since < Duration::from_millis(timeout_ms + SWEEP_MS + 1000),
        "{what}: gone within the timeout and a sweep: {since:?}"
    );
}

/// A UDP echo server on the content host.
fn start_echo(lab: &mut Lab) {
    let web = lab.web_ns.clone();
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('203.0.113.2', {ECHO_PORT}))\nprint('ready', flush=True)\n\
         while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(d, a)\n"
    );
    lab.spawn(&web, "udp-echo", "python3", &["-c", &script])
        .unwrap();
    let start = Instant::now();
    while !lab.log("udp-echo").contains("ready") {
        assert!(start.elapsed() < Duration::from_secs(5), "echo server");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// From terminal 0, one datagram to the echo server from each local port
/// in `ports`, waiting up to `wait` for each echo: whether it came back.
fn udp_echo(lab: &Lab, ports: &[u16], wait: Duration) -> Vec<bool> {
    udp_echo_from(lab, 0, ports, wait)
}

/// As [`udp_echo`], from terminal `t`.
fn udp_echo_from(lab: &Lab, t: usize, ports: &[u16], wait: Duration) -> Vec<bool> {
    let content = Ipv4Addr::new(203, 0, 113, 2);
    ports
        .iter()
        .zip(udp_replies(lab, t, content, ports, wait))
        .map(|(p, r)| match r {
            Some(r) if r == format!("bond {p}") => true,
            Some(other) => panic!("echo: {other}"),
            None => false,
        })
        .collect()
}

/// From terminal `t`, one datagram ("bond PORT") to `dst`'s UDP
/// `ECHO_PORT` from each local port in `ports`, waiting up to `wait` for
/// each answer: the answers (None: none came).
fn udp_replies(
    lab: &Lab,
    t: usize,
    dst: Ipv4Addr,
    ports: &[u16],
    wait: Duration,
) -> Vec<Option<String>> {
    let script = format!(
        "import socket, sys\nfor p in sys.argv[1:]:\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.bind(('0.0.0.0', int(p)))\n\
         \x20   s.settimeout({})\n\
         \x20   s.sendto(b'bond ' + p.encode(), ('{dst}', {ECHO_PORT}))\n\
         \x20   try:\n\
         \x20       print('reply ' + s.recvfrom(2048)[0].decode())\n\
         \x20   except socket.timeout:\n\
         \x20       print('timeout')\n\
         \x20   s.close()\n",
        wait.as_secs_f64()
    );
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut args = vec!["-c", script.as_str()];
    args.extend(ports.iter().map(String::as_str));
    let out = lab
        .exec(&lab.terminals[t].ns, "python3", &args)
        .expect("udp client");
    out.lines()
        .map(|l| l.strip_prefix("reply ").map(str::to_string))
        .collect()
}

#[test]
fn idle_udp_flows_expire_and_their_ports_serve_new_flows() {
    let mut lab = lab("20000-20002", "udp_s = 2\n");
    start_echo(&mut lab);
    let ports = [41001, 41002, 41003];
    assert_eq!(
        udp_echo(&lab, &ports, Duration::from_secs(2)),
        [true; 3],
        "three flows, three ports"
    );
    let quiet = Instant::now();
    let udp = flows_where(&lab, is("udp", None));
    let mut held: Vec<u64> = udp.iter().map(|f| u64::from(f.nat_port)).collect();
    held.sort_unstable();
    assert_eq!(held, [20000, 20001, 20002], "{udp:?}");

    // A fourth flow finds no port: refused at the server, no flow.
    let refused = server_drop(&lab, "no_free_port");
    assert_eq!(
        udp_echo(&lab, &[41004], Duration::from_millis(500)),
        [false]
    );
    assert!(
        server_drop(&lab, "no_free_port") > refused,
        "the fourth flow counts as no_free_port"
    );
    assert!(flows_where(&lab, is("udp", Some(41004))).is_empty());

    // Idle for the UDP timeout (2 s): all three go, not before.
    expires_on_time(&lab, is("udp", None), quiet, 2000, "UDP flows");
    assert!(server_maps(&lab).nat_entries().unwrap().is_empty());
    // The three may go in one sweep or, created a few ms apart, in two.
    let log = lab.log("agent-srv");
    let udp_expired: u64 = log
        .lines()
        .filter_map(|l| l.split("udp ").nth(1))
        .filter_map(|r| r.split(',').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(udp_expired, 3, "{log}");
    assert!(log.contains("; 3 ports free"), "{log}");

    // A new flow works again, on a port that came back to the queue.
    let refused = server_drop(&lab, "no_free_port");
    assert_eq!(
        udp_echo(&lab, &[41004], Duration::from_secs(2)),
        [true],
        "a new flow after expiry"
    );
    let f = flows_where(&lab, is("udp", Some(41004)));
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(held.contains(&u64::from(f[0].nat_port)), "{f:?}");
    assert_eq!(server_drop(&lab, "no_free_port"), refused);
}

#[test]
fn a_closed_tcp_connection_expires_on_the_closing_timeout() {
    let mut lab = lab(
        "20000-20099",
        "tcp_closing_s = 1\ntcp_established_s = 3600\n",
    );
    lab.serve_file("1m.bin", 1).unwrap();
    let t1 = lab.terminals[0].ns.clone();
    // An open, idle connection: established, so it stays.
    lab.spawn(
        &t1,
        "idle-tcp",
        "python3",
        &[
            "-c",
            "import socket, time\n\
             s = socket.create_connection(('203.0.113.2', 80))\n\
             print('port', s.getsockname()[1], flush=True)\ntime.sleep(60)\n",
        ],
    )
    .unwrap();
    let start = Instant::now();
    let idle_port: u16 = loop {
        if let Some(p) = lab
            .log("idle-tcp")
            .strip_prefix("port ")
            .and_then(|l| l.trim().parse().ok())
        {
            break p;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "idle connection");
        std::thread::sleep(Duration::from_millis(20));
    };

    let out = lab
        .exec(
            &t1,
            "curl",
            &[
                "-sS",
                "--fail",
                "--local-port",
                "45000",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "http://203.0.113.2/1m.bin",
            ],
        )
        .expect("curl");
    let done = Instant::now();
    assert_eq!(out.trim(), (1 << 20).to_string());

    // The finished download's flow saw FIN; the idle connection's did not.
    let maps = server_maps(&lab);
    let state = |port: u16| {
        maps.flows()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.proto == 6 && k.port == port)
            .map(|(_, f)| f.state)
    };
    let s = state(45000).expect("the download's flow");
    assert!(s & FLOW_FIN != 0, "download flow state {s:#x}");
    assert_eq!(state(idle_port), Some(0), "the idle connection is open");

    expires_on_time(&lab, is("tcp", Some(45000)), done, 1000, "closed TCP flow");
    // The idle connection has been quiet for longer than the closing
    // timeout, and stays: it is established.
    let f = flows_where(&lab, is("tcp", Some(idle_port)));
    assert_eq!(f.len(), 1, "idle connection's flow: {f:?}");
    let idle_ms = f[0].idle_ms;
    assert!(idle_ms > 1000, "quiet for {idle_ms} ms only");
    assert_eq!(state(idle_port).map(|s| s & FLOW_CLOSING), Some(0));
    let log = lab.log("agent-srv");
    assert!(log.contains("(tcp 1, udp 0, icmp 0)"), "{log}");
}

#[test]
fn an_icmp_echo_flow_expires_on_the_icmp_timeout() {
    let lab = lab("20000-20099", "icmp_s = 2\n");
    let t1 = lab.terminals[0].ns.clone();
    let out = lab
        .exec(
            &t1,
            "ping",
            &["-c", "2", "-i", "0.2", "-W", "2", "203.0.113.2"],
        )
        .expect("ping");
    let quiet = Instant::now();
    assert!(out.contains("2 received"), "{out}");
    let f = flows_where(&lab, is("icmp", None));
    assert_eq!(f.len(), 1, "one echo flow: {f:?}");
    assert!(f[0].down_pkts >= 2, "{f:?}");

    expires_on_time(&lab, is("icmp", None), quiet, 2000, "ICMP flow");
    let log = lab.log("agent-srv");
    assert!(log.contains("(tcp 0, udp 0, icmp 1)"), "{log}");
    // Another ping makes a new flow.
    let out = lab
        .exec(&t1, "ping", &["-c", "1", "-W", "2", "203.0.113.2"])
        .expect("ping again");
    assert!(out.contains("1 received"), "{out}");
    assert_eq!(flows_where(&lab, is("icmp", None)).len(), 1);
}

/// A flood of new flows from one origin stops at its `per_origin` limit:
/// another origin still gets ports, the flooder's existing flows carry on,
/// and once its flows expire it may make new ones again.
#[test]
fn one_origin_cannot_take_every_port() {
    let spec = [
        TerminalSpec { links: vec![20] },
        TerminalSpec { links: vec![20] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.nat_ports = "20000-20009".into();
    lab.server_extra = format!("\n[flows]\nsweep_ms = {SWEEP_MS}\nudp_s = 2\nper_origin = 4\n");
    lab.start_agents().expect("start agents");
    start_echo(&mut lab);
    let short = Duration::from_millis(300);
    let long = Duration::from_secs(2);

    // t1 tries 8 flows: the first 4 get ports, the rest are refused.
    let flood: Vec<u16> = (41000..41008).collect();
    let got = udp_echo_from(&lab, 0, &flood, short);
    assert_eq!(got, [[true; 4], [false; 4]].concat(), "t1's flood");
    assert_eq!(server_drop(&lab, "origin_flow_limit"), 4);
    assert_eq!(server_drop(&lab, "no_free_port"), 0, "ports were left");

    // t2 is not starved, and t1's existing flows carry on.
    assert_eq!(
        udp_echo_from(&lab, 1, &[42000, 42001, 42002], long),
        [true; 3]
    );
    assert_eq!(udp_echo_from(&lab, 0, &[41000, 41003], long), [true; 2]);
    assert_eq!(server_drop(&lab, "origin_flow_limit"), 4);

    // When t1's flows have expired, it may make new ones again.
    wait_gone(
        &lab,
        |f| f.origin == std::net::Ipv4Addr::new(10, 0, 1, 1),
        Duration::from_secs(10),
    );
    let again: Vec<u16> = (41010..41014).collect();
    assert_eq!(udp_echo_from(&lab, 0, &again, long), [true; 4]);
}

/// A host on the Internet sweeping the server's dedicated ports, from a
/// stranger's address and from the content server's own address but
/// another port, gets nothing through to an origin with a live flow
/// (address-and-port-dependent filtering, RFC 4787): the origin hears its
/// echo server alone, and every sweep packet is dropped and counted.
#[test]
fn a_port_sweep_from_the_internet_reaches_no_origin() {
    let mut lab = lab("20000-20009", "");
    start_echo(&mut lab);
    // The origin: one datagram to the echo server from port 43000, then
    // every datagram it hears for 3 s, one line each: "address port".
    let listen = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('0.0.0.0', 43000))\n\
         s.sendto(b'hello', ('203.0.113.2', {ECHO_PORT}))\n\
         end = time.time() + 3\n\
         while time.time() < end:\n\
         \x20   s.settimeout(max(end - time.time(), 0.01))\n\
         \x20   try:\n\
         \x20       d, a = s.recvfrom(2048)\n\
         \x20       print(a[0], a[1], flush=True)\n\
         \x20   except socket.timeout:\n\
         \x20       pass\n"
    );
    let origin = lab.terminals[0].ns.clone();
    lab.spawn(&origin, "origin", "python3", &["-c", &listen])
        .unwrap();
    let start = Instant::now();
    while flows_where(&lab, is("udp", Some(43000))).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "no flow for 43000"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (filtered, no_flow) = (server_drop(&lab, "filtered"), server_drop(&lab, "no_flow"));

    let web = lab.web_ns.clone();
    lab.ip(&web, "addr add 203.0.113.66/24 dev eth0").unwrap();
    let sweep = format!(
        "import socket\n\
         for src in [('203.0.113.66', {ECHO_PORT}), ('203.0.113.2', {ECHO_PORT} + 1)]:\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.bind(src)\n\
         \x20   for port in range(20000, 20010):\n\
         \x20       s.sendto(b'injected', ('{}', port))\n",
        bond_lab::SERVER_NAT
    );
    lab.exec(&web, "python3", &["-c", &sweep]).unwrap();

    let heard = lab.wait_child("origin", Duration::from_secs(10)).unwrap();
    assert_eq!(
        heard.lines().collect::<Vec<_>>(),
        [format!("203.0.113.2 {ECHO_PORT}")],
        "the origin heard only its echo server"
    );
    // Two sweep packets reached the flow's port, 18 ports without one.
    assert_eq!(server_drop(&lab, "filtered") - filtered, 2);
    assert_eq!(server_drop(&lab, "no_flow") - no_flow, 18);
}

/// A member cannot reach what the server denies: its own addresses (the
/// default, `"local"`) and the prefixes listed; the pings go unanswered
/// and are counted. Reloaded without the prefix, the host answers.
#[test]
fn a_member_cannot_reach_what_the_server_denies() {
    let spec = [TerminalSpec { links: vec![20] }];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.server_keys = "deny = [\"local\", \"203.0.113.2/32\"]".into();
    lab.start_agents().expect("start agents");
    let t1 = lab.terminals[0].ns.clone();
    let ping = |lab: &Lab, host: &str| {
        lab.cmd(&t1, "ping")
            .args(["-c", "2", "-i", "0.2", "-W", "1", host])
            .output()
            .expect("ping")
            .status
            .success()
    };
    for host in [bond_lab::SERVER_NAT, bond_lab::CONTENT] {
        let before = server_drop(&lab, "denied");
        assert!(
            !ping(&lab, &host.to_string()),
            "{host} answered through bond"
        );
        assert_eq!(server_drop(&lab, "denied") - before, 2, "{host}");
    }

    let path = lab.dir.join("server.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(", \"203.0.113.2/32\"", "")).unwrap();
    let (srv, inst) = (lab.server_ns.clone(), lab.server_instance.clone());
    let reloaded = lab.ctl(&srv, &inst, &["reload"]).expect("reload");
    assert!(reloaded.contains("deny"), "{reloaded}");
    assert!(
        ping(&lab, "203.0.113.2"),
        "no longer denied, the host answers"
    );
    assert!(
        !ping(&lab, &bond_lab::SERVER_NAT.to_string()),
        "still local"
    );
}

/// An ICMP error about a flow reaches the application that sent the
/// packet: a datagram to a closed port of the content host comes back as
/// "connection refused" on the origin's connected socket, the server
/// having translated the port-unreachable back to it.
#[test]
fn a_port_unreachable_reaches_the_application_through_bond() {
    let lab = lab("20000-20009", "");
    assert_refused_through_bond(&lab, "AF_INET", &bond_lab::CONTENT.to_string());
}

/// The same over IPv6: the content host's ICMPv6 port unreachable about a
/// member's datagram comes back through bond (`bond_server6`) as
/// "connection refused" on the member's socket.
#[test]
fn an_ipv6_port_unreachable_reaches_the_application_through_bond() {
    let lab = lab("20000-20009", "");
    assert_refused_through_bond(&lab, "AF_INET6", &bond_lab::CONTENT6.to_string());
}

/// From terminal 0, a connected UDP socket of `family` sends a datagram
/// to a closed port of `host`: it must hear "connection refused", the
/// server having relayed one ICMP error.
fn assert_refused_through_bond(lab: &Lab, family: &str, host: &str) {
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         s.settimeout(3)\n\
         s.connect(('{host}', 9999))\n\
         s.send(b'anyone there?')\n\
         try:\n\
         \x20   s.recv(2048)\n\
         \x20   print('answered')\n\
         except ConnectionRefusedError:\n\
         \x20   print('refused')\n\
         except socket.timeout:\n\
         \x20   print('timeout')\n"
    );
    let relayed = || {
        server_maps(lab)
            .server_events()
            .unwrap()
            .into_iter()
            .find(|e| e.0 == "icmp_errors_relayed")
            .expect("event icmp_errors_relayed")
            .1
    };
    let before = relayed();
    let out = lab
        .exec(&lab.terminals[0].ns, "python3", &["-c", &script])
        .expect("udp client");
    assert_eq!(out.trim(), "refused", "{family} to {host}");
    assert_eq!(relayed() - before, 1, "{family}: errors relayed");
}

/// Through bond, a traceroute shows the server as the first hop (it
/// answers what expires there) and the router beyond it (its
/// time-exceeded errors come back), and a DF sender learns the smaller MTU
/// of the link past that router (its fragmentation-needed error does).
#[test]
fn traceroute_and_path_mtu_discovery_work_beyond_the_server() {
    let mut lab = lab("20000-20999", "");
    lab.add_far_host(1280).expect("far host");
    let hops = [bond_lab::SERVER_NAT, bond_lab::CONTENT, bond_lab::FAR];
    trace_and_learn_mtu(&lab, "-4", hops.map(|a| a.to_string()));
}

/// The same over IPv6: the server's and the router's ICMPv6 time
/// exceeded and the router's packet too big come back through
/// `bond_server6` (`traceroute -6`, `ping -6`).
#[test]
fn traceroute6_and_ipv6_path_mtu_discovery_work_beyond_the_server() {
    let mut lab = lab("20000-20999", "");
    lab.add_far_host(1280).expect("far host");
    let hops = [bond_lab::SERVER_NAT6, bond_lab::CONTENT6, bond_lab::FAR6];
    trace_and_learn_mtu(&lab, "-6", hops.map(|a| a.to_string()));
}

/// From terminal 0 over `family` ("-4" or "-6"): a traceroute to the far
/// host shows `hops` (the server's NAT address, the content host routing,
/// the far host itself), and the server counted its answer; 1300-byte
/// pings with DF learn the 1280-byte link before the far host.
fn trace_and_learn_mtu(lab: &Lab, family: &str, hops: [String; 3]) {
    let far = hops[2].as_str();
    let answered = || {
        server_maps(lab)
            .server_events()
            .unwrap()
            .into_iter()
            .find(|e| e.0 == "time_exceeded_sent")
            .expect("event time_exceeded_sent")
            .1
    };
    let before = answered();
    let t1 = lab.terminals[0].ns.clone();
    let trace = lab
        .exec(
            &t1,
            "traceroute",
            &[family, "-n", "-q", "1", "-w", "2", "-m", "4", far],
        )
        .expect("traceroute");
    let lines: Vec<Vec<&str>> = trace
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let seen: Vec<Option<&str>> = (0..3)
        .map(|n| lines.get(n).and_then(|h| h.get(1)).copied())
        .collect();
    let want: Vec<Option<&str>> = hops.iter().map(|h| Some(h.as_str())).collect();
    assert_eq!(seen, want, "{trace}");
    assert_eq!(answered() - before, 1, "one probe expired at the server");

    // 1300 bytes of payload with DF: the router says 1280, the origin
    // learns it.
    let ping = lab
        .cmd(&t1, "ping")
        .args([
            family, "-M", "do", "-s", "1300", "-c", "3", "-i", "0.3", "-W", "1", far,
        ])
        .output()
        .expect("ping");
    let said =
        String::from_utf8_lossy(&ping.stdout).into_owned() + &String::from_utf8_lossy(&ping.stderr);
    assert!(
        said.contains("mtu = 1280") || said.contains("mtu=1280"),
        "{said}"
    );
    let route = lab.ip(&t1, &format!("{family} route get {far}")).unwrap();
    assert!(route.contains("mtu 1280"), "{route}");
}

/// A UDP server on the content host's address `at` that answers each
/// datagram with the address and port it came from (bound to `at`: the
/// answer must come from where the datagram went, or the server's NAT
/// lets it not in).
fn start_reporter(lab: &mut Lab, at: Ipv4Addr) {
    let web = lab.web_ns.clone();
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{at}', {ECHO_PORT}))\nprint('ready', flush=True)\n\
         while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(('%s:%d' % a).encode(), a)\n"
    );
    let name = format!("reporter-{at}");
    lab.spawn(&web, &name, "python3", &["-c", &script]).unwrap();
    let start = Instant::now();
    while !lab.log(&name).contains("ready") {
        assert!(start.elapsed() < Duration::from_secs(5), "reporter");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// From terminal `t`, one datagram to the reporter at `dst` from each
/// local port: where the content host saw each come from.
fn seen_from(lab: &Lab, t: usize, dst: Ipv4Addr, ports: &[u16]) -> Vec<(Ipv4Addr, u16)> {
    udp_replies(lab, t, dst, ports, Duration::from_secs(2))
        .into_iter()
        .map(|r| {
            let r = r.unwrap_or_else(|| panic!("terminal {t} to {dst}: no answer"));
            let (a, p) = r.split_once(':').expect(&r);
            (a.parse().unwrap(), p.parse().unwrap())
        })
        .collect()
}

/// `bond-ctl nat who ADDRESS PORT [--at T]` against the lab server's file:
/// the communities it names.
fn who(lab: &Lab, at_port: (Ipv4Addr, u16), at: Option<&str>) -> Vec<u64> {
    let cfg = lab.dir.join("server.toml");
    who_in(lab, &["--config", cfg.to_str().unwrap()], at_port, at)
}

/// As [`who`], reading the log from `source` (`--config F` or `--log F`...).
fn who_in(
    lab: &Lab,
    source: &[&str],
    (address, port): (Ipv4Addr, u16),
    at: Option<&str>,
) -> Vec<u64> {
    let (a, p) = (address.to_string(), port.to_string());
    let mut args = vec!["nat", "who", &a, &p, "--json"];
    args.extend(source);
    if let Some(t) = at {
        args.extend(["--at", t]);
    }
    let out = lab
        .exec(&lab.server_ns, &lab.bond_ctl.to_string_lossy(), &args)
        .expect("nat who");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    v["held"]
        .as_array()
        .expect(&out)
        .iter()
        .map(|h| h["community"].as_u64().expect(&out))
        .collect()
}

#[test]
fn a_pool_gives_each_community_an_address_of_its_own_and_the_log_names_it() {
    use bond_lab::{COMMUNITY, COMMUNITY2, CONTENT2};
    const CONTENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    let spec = [TerminalSpec { links: vec![20] }];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    let (member, again) = lab.join_second_community(0, 20).unwrap();
    // A pool of two addresses, the server's own on the content side, in
    // blocks of 32 ports; idle UDP flows go after 2 s.
    let pool = [
        Ipv4Addr::new(203, 0, 113, 64),
        Ipv4Addr::new(203, 0, 113, 65),
    ];
    let srv = lab.server_ns.clone();
    for a in pool {
        lab.ip(&srv, &format!("addr add {a}/32 dev content0"))
            .unwrap();
    }
    lab.nat_address = pool[0];
    lab.server_keys = "nat_addresses = 2\nnat_block = 32\n".into();
    // (After community 2's table, which joining it wrote.)
    let flows = format!("\n[flows]\nsweep_ms = {SWEEP_MS}\nudp_s = 2\n");
    lab.server_extra.push_str(&flows);
    lab.start_agents().expect("start agents");
    start_reporter(&mut lab, CONTENT);
    start_reporter(&mut lab, CONTENT2);

    // Each community's flows leave from one address of the pool, each
    // from its own.
    let c1 = seen_from(&lab, 0, CONTENT, &[42001, 42002]);
    let c2 = seen_from(&lab, member, CONTENT2, &[42001, 42002]);
    for (c, seen) in [(1, &c1), (2, &c2)] {
        assert!(pool.contains(&seen[0].0), "community {c}: {seen:?}");
        assert!(
            seen.iter().all(|s| s.0 == seen[0].0),
            "community {c}: {seen:?}"
        );
    }
    assert_ne!(c1[0].0, c2[0].0, "two communities, two addresses");
    let st = lab.server_status().unwrap();
    let share = |st: &bond_api::reply::ServerStatus, id| {
        st.communities
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.nat.clone())
    };
    assert_eq!(share(&st, COMMUNITY).unwrap().address, c1[0].0);
    assert_eq!(share(&st, COMMUNITY2).unwrap().address, c2[0].0);
    assert_eq!((st.nat.addresses, st.nat.block), (2, 32));

    // The log names each community behind its address and port.
    for s in &c1 {
        assert_eq!(who(&lab, *s, None), [u64::from(COMMUNITY)], "{s:?}");
    }
    for s in &c2 {
        assert_eq!(who(&lab, *s, None), [u64::from(COMMUNITY2)], "{s:?}");
    }

    // Community 1 grows: rounds of 8 new flows, a few sweeps apart; it
    // gets more blocks on its own address, and every flow a port.
    let mut all = c1.clone();
    for round in 0..5u16 {
        let ports: Vec<u16> = (0..8).map(|i| 43000 + round * 8 + i).collect();
        let seen = seen_from(&lab, 0, CONTENT, &ports);
        assert!(
            seen.iter().all(|s| s.0 == c1[0].0),
            "round {round}: {seen:?}"
        );
        all.extend(seen);
        std::thread::sleep(Duration::from_millis(3 * SWEEP_MS));
    }
    let distinct: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), all.len(), "a port each: {all:?}");
    let st = lab.server_status().unwrap();
    let grown = share(&st, COMMUNITY).unwrap();
    assert!(
        grown.ports.len() >= 2,
        "42 flows on blocks of 32: {grown:?}"
    );
    let last = all.last().unwrap();
    assert_eq!(who(&lab, *last, None), [u64::from(COMMUNITY)], "{last:?}");
    let log = std::fs::read_to_string(lab.nat_log()).unwrap();
    let assigned = |c: u32| {
        log.lines()
            .filter(|l| l.contains("\"assigned\"") && l.contains(&format!("\"community\":{c},")))
            .count()
    };
    // (A block its first flows left may have gone back already.)
    assert!(assigned(COMMUNITY) >= grown.ports.len(), "{log}");

    // Community 2's terminals leave: once its flows are idle 2 s, its
    // block goes back, logged; the log still names it for the time it
    // held the port.
    let during = lab
        .exec(&srv, "date", &["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .unwrap();
    // The log is rotated (moved away, as logrotate's `create` does) and
    // the agent told (`reload`): what follows goes to a new file.
    let rotated = lab.dir.join("server-nat.log.1");
    std::fs::rename(lab.nat_log(), &rotated).unwrap();
    lab.ctl(&srv, &lab.server_instance, &["reload"]).unwrap();
    for t in [member, again] {
        lab.stop(&format!("agent-t{}", t + 1), false).unwrap();
    }
    let start = Instant::now();
    loop {
        let st = lab.server_status().unwrap();
        if share(&st, COMMUNITY2).is_none() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "community 2 still holds {:?}",
            share(&st, COMMUNITY2)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(lab.nat_log()).expect("a new log after the rotation");
    assert!(
        log.lines()
            .any(|l| l.contains("\"released\"")
                && l.contains(&format!("\"community\":{COMMUNITY2},"))),
        "{log}"
    );
    assert_eq!(
        who(&lab, c2[0], None),
        Vec::<u64>::new(),
        "no one holds it now"
    );
    let (old, new) = (rotated.to_str().unwrap(), lab.nat_log());
    let both = ["--log", old, "--log", new.to_str().unwrap()];
    assert_eq!(
        who_in(&lab, &both, c2[0], Some(during.trim())),
        [u64::from(COMMUNITY2)],
        "community 2 held it then (both files of the log)"
    );
    assert_eq!(who_in(&lab, &both, c2[0], None), Vec::<u64>::new());
    // Community 1 keeps a block (the log names it for its first port),
    // though blocks its flows left may have gone back meanwhile.
    let held = share(&lab.server_status().unwrap(), COMMUNITY).unwrap();
    let first: u16 = held.ports[0].split('-').next().unwrap().parse().unwrap();
    let log = std::fs::read_to_string(&rotated).unwrap()
        + &std::fs::read_to_string(lab.nat_log()).unwrap();
    assert_eq!(
        who_in(&lab, &both, (held.address, first), None),
        [u64::from(COMMUNITY)],
        "{held:?}\n{log}"
    );
}
