//! bond at its limits, end to end (issue 5): packets too big for the
//! wrapped path are refused with an error their sender acts on, never lost
//! in silence.
//!
//! Run one at a time (`--test-threads=1`), like the other namespace tests.

mod common;
use common::bond_ctl;

use std::{path::Path, time::Duration};

use bond_api::reply::TerminalStatus;
use bond_lab::{Lab, TerminalSpec};

/// Two terminals, each with one unlimited link of MTU 1500, agents up.
fn lab() -> Lab {
    let spec = vec![
        TerminalSpec { links: vec![0] },
        TerminalSpec { links: vec![0] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    lab
}

/// Linux socket options the scripts use: IP_MTU_DISCOVER with
/// IP_PMTUDISC_DO (set DF, never fragment locally), IP_MTU.
/// What a wrap adds to a packet: outer IPv4, UDP and the bond header.
const WRAP: u64 = (bond_lab::packets::WRAP_LEN - 14) as u64;

const PY_PRELUDE: &str =
    "import socket, errno, json, time\nIP_MTU_DISCOVER, IP_PMTUDISC_DO, IP_MTU = 10, 2, 14\n";

/// On the origin: a UDP datagram with DF that does not fit bond0.
const ORIGIN_DF: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
s.connect(("203.0.113.2", 9998))
try:
    s.send(b"x" * 1472)
    r = "sent"
except OSError as e:
    r = errno.errorcode[e.errno]
print(json.dumps({"send": r, "mtu": s.getsockopt(socket.IPPROTO_IP, IP_MTU)}))
"#;

/// On the content host: answers the first datagram with one that is too
/// big for the links once wrapped (DF set), then reports the error queued
/// on its socket, what its kernel learnt, and answers again with the
/// largest datagram that fits.
const CONTENT_DF: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(30)
_, peer = s.recvfrom(100)
s.connect(peer)
s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
r = {}
s.send(b"y" * 1472)
time.sleep(0.5)
# The ICMP error is queued on the socket (and clears on reading).
r["error"] = errno.errorcode.get(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "none")
try:
    s.send(b"y" * 1472)
    r["again"] = "sent"
except OSError as e:
    r["again"] = errno.errorcode[e.errno]
r["mtu"] = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
s.send(b"z" * (r["mtu"] - 28))
print(json.dumps(r), flush=True)
"#;

/// On the origin: asks the content host, prints the size of what comes.
const ORIGIN_ASK: &str = r#"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.connect(("203.0.113.2", 9999))
s.send(b"hi")
print(len(s.recv(65535)))
"#;

/// On the content host: one TCP connection; reports the MSS it got from
/// the origin's SYN and the bytes it read, and sends 4 MiB back.
const CONTENT_TCP: &str = r#"
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 9997))
l.listen(1)
l.settimeout(30)
c, _ = l.accept()
mss = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
got = 0
while got < 4 << 20:
    b = c.recv(65536)
    if not b:
        break
    got += len(b)
c.sendall(b"d" * (4 << 20))
c.close()
print(json.dumps({"mss": mss, "read": got}), flush=True)
"#;

/// On the origin: sends 4 MiB, then reads until the content host closes.
const ORIGIN_TCP: &str = r#"
s = socket.create_connection(("203.0.113.2", 9997), timeout=30)
s.sendall(b"u" * (4 << 20))
got = 0
while True:
    b = s.recv(65536)
    if not b:
        break
    got += len(b)
print(got)
"#;

/// Starts a script on the content host as child `name`; gives it half a
/// second to bind.
fn serve(lab: &mut Lab, name: &str, script: &str) {
    let web = lab.web_ns.clone();
    lab.spawn(
        &web,
        name,
        "python3",
        &["-c", &format!("{PY_PRELUDE}{script}")],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
}

/// 4 MiB up from the origin in `ns` and 4 MiB down, over one TCP
/// connection; asserts both arrived whole and returns the MSS the content
/// host got from the origin's SYN.
fn tcp_both_ways(lab: &mut Lab, ns: &str) -> u64 {
    serve(lab, "tcp", CONTENT_TCP);
    let down = python(lab, ns, ORIGIN_TCP);
    let r = json_line(
        &lab.wait_child("tcp", Duration::from_secs(30))
            .expect("content TCP script"),
    );
    assert_eq!(r["read"], 4 << 20, "{r}");
    assert_eq!(down, (4 << 20).to_string());
    r["mss"].as_u64().unwrap()
}

fn python(lab: &Lab, ns: &str, script: &str) -> String {
    lab.exec(ns, "python3", &["-c", &format!("{PY_PRELUDE}{script}")])
        .unwrap_or_else(|e| panic!("python in {ns}: {e:#}"))
        .trim()
        .to_string()
}

fn json_line(s: &str) -> serde_json::Value {
    let line = s.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("no JSON in {s:?}: {e}"))
}

#[test]
fn packets_too_big_for_the_wrapped_path_are_refused_aloud() {
    let mut lab = lab();
    let t1 = lab.terminals[0].ns.clone();

    // Upstream: bond0's MTU is the link's less the wrap, so the origin's
    // own kernel refuses a DF datagram that would not fit once wrapped.
    let r = json_line(&python(&lab, &t1, ORIGIN_DF));
    assert_eq!(r["send"], "EMSGSIZE", "{r}");
    assert_eq!(r["mtu"], 1500 - WRAP, "{r}");

    // Downstream: the content host's too-big reply is answered by the
    // server with fragmentation needed; its kernel learns the MTU, refuses
    // the next one, and a reply that fits arrives.
    serve(&mut lab, "udp-df", CONTENT_DF);
    let got = lab.exec(
        &t1,
        "python3",
        &["-c", &format!("{PY_PRELUDE}{ORIGIN_ASK}")],
    );
    let log = lab
        .wait_child("udp-df", Duration::from_secs(30))
        .expect("content script");
    let srv = lab.server_links().unwrap();
    let got = got
        .unwrap_or_else(|e| {
            panic!("the origin got no reply ({e:#}); content host: {log}; server: {srv:?}")
        })
        .trim()
        .to_string();
    let r = json_line(&log);
    assert_eq!(
        r["again"], "EMSGSIZE",
        "the content host did not learn: {r}"
    );
    assert_eq!(r["mtu"], 1500 - WRAP, "{r}");
    assert_eq!(got, (1500 - WRAP - 28).to_string(), "the reply that fits");
    assert_eq!(srv.events["frag_needed_sent"], 1, "{srv:?}");
    assert_eq!(srv.drops["too_big"], 1, "{srv:?}");

    // TCP both ways: the content host sees the MSS bond0 allows, and
    // 4 MiB each way arrive whole (no segment too big to wrap).
    let mss = tcp_both_ways(&mut lab, &t1);
    assert!(
        (1000..=1500 - WRAP - 40).contains(&mss),
        "MSS {mss} does not fit the wrapped path"
    );
    let srv = lab.server_links().unwrap();
    assert_eq!(
        srv.drops["too_big"], 1,
        "no TCP segment was too big: {srv:?}"
    );
}

/// The MTU of an interface in a namespace.
fn mtu(lab: &Lab, ns: &str, dev: &str) -> u64 {
    let j = lab.ip(ns, &format!("-j link show {dev}")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    v[0]["mtu"].as_u64().unwrap()
}

#[test]
fn the_smallest_link_sets_the_mtu_of_the_whole_path() {
    // Links of 10 Mbit/s: the 4 MiB each way need both (each packet goes
    // where it arrives first, so unlimited links would leave t2's idle).
    let spec = vec![
        TerminalSpec { links: vec![10] },
        TerminalSpec { links: vec![10] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    // t2's line is PPPoE-like: 1400 bytes on both ends of its access link.
    let (t1, t2) = (lab.terminals[0].clone(), lab.terminals[1].clone());
    lab.ip(&t2.ns, &format!("link set {} mtu 1400", t2.links[0].iface))
        .unwrap();
    lab.ip(&t2.links[0].modem_ns, "link set acc mtu 1400")
        .unwrap();
    lab.start_agents().expect("start agents");

    // t1's own link is 1500, but it spreads over t2's too: its bond0
    // follows t2's announce down to 1400 less the wrap; so does t2's.
    let start = std::time::Instant::now();
    while mtu(&lab, &t1.ns, "bond0") != 1400 - WRAP {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "t1's bond0 is at {} after 5 s",
            mtu(&lab, &t1.ns, "bond0")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(mtu(&lab, &t2.ns, "bond0"), 1400 - WRAP);
    assert!(
        lab.log("agent-srv").contains("link_mtu 1500 -> 1400"),
        "the server did not lower its limit:\n{}",
        lab.log("agent-srv")
    );

    // 4 MiB each way over both links: the MSS fits the smallest link, and
    // nothing anywhere was too big.
    let mss = tcp_both_ways(&mut lab, &t1.ns);
    assert!(mss <= 1400 - WRAP - 40, "MSS {mss} does not fit t2's link");
    for (ns, instance) in [
        (t1.ns.as_str(), t1.instance.as_str()),
        (t2.ns.as_str(), t2.instance.as_str()),
        (lab.server_ns.as_str(), lab.server_instance.as_str()),
    ] {
        let v = lab.links(ns, instance).unwrap();
        assert_eq!(v.drops()["too_big"], 0, "{instance}: {v:?}");
    }
    // Both links carried the upload (t1's schedule spreads over both).
    let srv = lab.server_links().unwrap();
    for l in &srv.links {
        assert!(
            l.counters.up_bytes > 1 << 20,
            "link {} carried little: {srv:?}",
            l.link
        );
    }
}

/// The routes a namespace has for the captured prefix: (device, count).
fn capture_routes(lab: &Lab, ns: &str) -> Vec<String> {
    let j = lab.ip(ns, "-j route show 203.0.113.0/24").unwrap();
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["dev"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn an_agent_killed_with_sigkill_is_adopted_or_cleaned_by_the_next() {
    let spec = vec![
        TerminalSpec { links: vec![20] },
        TerminalSpec { links: vec![20] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    let served = lab.serve_file("16m.bin", 16).unwrap();
    lab.start_agents().expect("start agents");
    let t1 = lab.terminals[0].ns.clone();
    let out = lab.dir.join("t1-16m.bin");
    let out_s = out.to_string_lossy().into_owned();
    lab.spawn(
        &t1,
        "curl",
        "curl",
        &[
            "-sS",
            "--fail",
            "--max-time",
            "60",
            "-o",
            &out_s,
            "http://203.0.113.2/16m.bin",
        ],
    )
    .unwrap();

    // SIGKILL mid-download: no goodbye, pins and bond0 left behind. The
    // pinned datapath goes on carrying the download meanwhile.
    std::thread::sleep(Duration::from_secs(1));
    lab.stop("agent-t1", true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(capture_routes(&lab, &t1), ["bond0"]);
    // The next agent adopts all of it: no new login, one route.
    lab.start_terminal(0).unwrap();
    lab.wait_for_community(Duration::from_secs(10)).unwrap();
    lab.wait_child("curl", Duration::from_secs(60))
        .expect("the download survives a SIGKILL of its origin's agent");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&served).unwrap()
    );
    let log = lab.log("agent-t1");
    assert!(log.contains("adopting the running datapath"), "{log}");
    assert!(!log.contains("logged on to"), "logged on again:\n{log}");
    assert_eq!(capture_routes(&lab, &t1), ["bond0"]);

    // SIGKILL again, and leave the next agent a layout it does not know
    // (as after an upgrade that changed the maps): it cleans up and starts
    // afresh, and traffic flows through the new bond0 by one route.
    lab.stop("agent-t1", true).unwrap();
    let inst = lab.terminals[0].instance.clone();
    std::fs::write(format!("/run/bond/{inst}.layout"), "terminal layout 0\n").unwrap();
    lab.start_terminal(0).unwrap();
    lab.wait_for_community(Duration::from_secs(10)).unwrap();
    let log = lab.log("agent-t1");
    assert!(!log.contains("adopting"), "adopted another layout:\n{log}");
    assert_eq!(capture_routes(&lab, &t1), ["bond0"]);
    let (bytes, _, _) = lab
        .download(&t1, "http://203.0.113.2/16m.bin", "t1-again.bin")
        .expect("download after a clean start");
    assert_eq!(bytes, 16 << 20);
}

/// The server's S_CONFIG as the datapath reads it.
fn server_map_config(lab: &Lab) -> bond_common::maps::ServerConfig {
    bond_datapath::Maps::new(bond_datapath::pin_dir(
        Path::new(bond_datapath::DEFAULT_BPFFS),
        &lab.server_instance,
    ))
    .server_config()
    .expect("S_CONFIG")
}

#[test]
fn a_reload_applies_what_it_can_and_a_bad_one_changes_nothing() {
    let lab = lab();
    let (srv, inst) = (lab.server_ns.clone(), lab.server_instance.clone());
    let path = lab.dir.join("server.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let reload = |lab: &Lab, text: &str| {
        std::fs::write(&path, text).unwrap();
        lab.ctl(&srv, &inst, &["reload"])
    };
    let before = server_map_config(&lab);
    assert_eq!((before.link_mtu, before.per_origin), (1500, 4096));

    // A file with an error: refused, naming the field and the value.
    let e = reload(
        &lab,
        &good.replace("interfaces", "link_mtu = 10\ninterfaces"),
    )
    .expect_err("a bad file is refused");
    let e = format!("{e:#}");
    assert!(e.contains("link_mtu") && e.contains("10 is outside"), "{e}");
    assert!(e.contains("running configuration stays"), "{e}");
    // A change that takes a restart: refused, naming it.
    let e = reload(&lab, &good.replace("20000-29999", "20000-20999"))
        .expect_err("a restart-only change is refused");
    let e = format!("{e:#}");
    assert!(e.contains("nat_ports") && e.contains("restart"), "{e}");
    assert_eq!(server_map_config(&lab), before, "nothing changed");
    // The agent carries on as before.
    let t1 = lab.terminals[0].ns.clone();
    lab.exec(&t1, "ping", &["-c", "2", "-W", "2", "203.0.113.2"])
        .expect("traffic after refused reloads");

    // What may change while running is applied.
    let live = format!(
        "{}\n[flows]\nper_origin = 2\n",
        good.replace("interfaces", "link_mtu = 1400\ninterfaces")
    );
    let out = reload(&lab, &live).expect("a live change is applied");
    assert!(
        out.contains("link_mtu") && out.contains("flows"),
        "reload names what changed: {out}"
    );
    let now = server_map_config(&lab);
    assert_eq!((now.link_mtu, now.per_origin), (1400, 2));

    // SIGHUP reads the file again, as `bond-ctl reload` does.
    std::fs::write(&path, &good).unwrap();
    lab.signal("agent-srv", libc::SIGHUP).unwrap();
    let start = std::time::Instant::now();
    while server_map_config(&lab) != before {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "SIGHUP did not reload:\n{}",
            lab.log("agent-srv")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lab.is_running("agent-srv"));
}

/// Polls `ok` every 100 ms for up to `limit`.
fn eventually(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_full_session_table_refuses_a_login_and_the_server_carries_on() {
    let spec = vec![TerminalSpec { links: vec![0] }; 3];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.server_keys = "max_terminals = 2\n".into();
    lab.start_some(&[0, 1]).expect("two terminals join");
    lab.start_terminal(2).unwrap();
    let t3 = lab.terminals[2].clone();
    let refused = |lab: &Lab| {
        let st = lab.server_status().expect("server status");
        st.rejects.get("max_terminals").copied().unwrap_or(0)
    };
    // The kernel refuses the third session (the map is full): the agent
    // counts it, sends no token, and carries on.
    eventually(
        "the third login to be refused twice",
        Duration::from_secs(10),
        || refused(&lab) >= 2,
    );
    assert!(lab.is_running("agent-srv"), "{}", lab.log("agent-srv"));
    let st = lab.terminal_status(&t3.ns, &t3.instance).unwrap();
    assert!(!st.logged_on, "{st:?}");
    for t in &lab.terminals[..2] {
        lab.exec(&t.ns, "ping", &["-c", "2", "-W", "2", "203.0.113.2"])
            .expect("the two logged on carry on");
    }
    // One leaves: its session is freed and the third gets in.
    lab.stop("agent-t1", false).unwrap();
    eventually(
        "the third terminal to log on",
        Duration::from_secs(10),
        || lab.terminal_status(&t3.ns, &t3.instance).unwrap().logged_on,
    );
    lab.wait_for_community(Duration::from_secs(10))
        .expect("the community forms again");
    // (t1's flows outlive its session until they expire. A recount that
    // counted them gave t1 back its entry in S_ORIGIN_FLOWS, a map as big
    // as the session table, and t3's flows were refused.)
    lab.exec(&t3.ns, "ping", &["-c", "2", "-W", "2", "203.0.113.2"])
        .expect("the third carries traffic once in");
    let st = lab.server_status().unwrap();
    assert!(
        st.faults.is_empty(),
        "a full table is a refusal, not a fault: {st:?}"
    );
}

#[test]
fn a_terminal_reload_applies_weights_and_timers_and_refuses_the_rest() {
    let lab = lab();
    let t = lab.terminals[0].clone();
    let id = t.links[0].id;
    let path = lab.dir.join("t1.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let reload = |text: &str| {
        std::fs::write(&path, text).unwrap();
        lab.ctl(&t.ns, &t.instance, &["reload"])
    };
    let status = || lab.terminal_status(&t.ns, &t.instance).unwrap();
    let before = status();
    let weight_of = |st: &TerminalStatus| st.schedule.iter().find(|s| s.0 == id).map(|s| s.1);
    assert_ne!(weight_of(&before), Some(7), "{before:?}");

    // A bad file, and a change that takes a restart: refused, named.
    let e = format!(
        "{:#}",
        reload(&good.replace("announce_ms", "misses = 0\nannounce_ms")).unwrap_err()
    );
    assert!(
        e.contains("misses") && e.contains("running configuration stays"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        reload(&good.replace("data_port = ", "data_port = 1")).unwrap_err()
    );
    assert!(e.contains("data_port") && e.contains("restart"), "{e}");
    assert_eq!(status().schedule, before.schedule);

    // Weights and timers change live.
    let live = good
        .replace(
            &format!("announce_ms = {}", lab.announce_ms),
            "announce_ms = 300",
        )
        .lines()
        .map(|l| {
            if l.starts_with("weight = ") {
                "weight = 7"
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let out = reload(&live).expect("a live change is applied");
    assert!(
        out.contains("weights") && out.contains("announce_ms"),
        "{out}"
    );
    let now = status();
    assert_eq!(now.announce_ms, 300, "{now:?}");
    assert_eq!(weight_of(&now), Some(7), "{now:?}");
    // The peer hears the new weight in the next announce.
    let peer = lab.terminals[1].clone();
    let start = std::time::Instant::now();
    loop {
        let rows = lab.peer_rows(&peer.ns, &peer.instance).unwrap();
        let row = rows.into_iter().find(|r| r.link == id);
        if row.as_ref().is_some_and(|r| r.up == 7) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "peer sees {row:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.exec(&t.ns, "ping", &["-c", "2", "-W", "2", "203.0.113.2"])
        .expect("traffic after the reload");
}
