//! The agent as an operator runs it: under its systemd unit's command
//! lines, watched live with `bond-ctl top`, graphed by the dashboard. Real
//! agents in namespaces, real traffic.
//!
//! Run one at a time (`--test-threads=1`): they share two CPU cores.

mod common;
use common::bond_ctl;

use std::{
    collections::BTreeSet,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use bond_lab::{Lab, TerminalSpec};
use serde_json::Value;

fn figure1() -> Lab {
    Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The value of `key=` in the unit's [Service] section (one line each).
fn unit_line(unit: &str, key: &str) -> String {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}= in bond@.service: {lines:?}");
    lines[0].to_string()
}

/// Datagrams to a `NOTIFY_SOCKET`, as systemd reads them.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(path: &Path) -> Notify {
        let sock = UnixDatagram::bind(path).expect("binding the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            sock,
            seen: Vec::new(),
        }
    }

    /// Waits for a message with `line` among its lines from child `name`;
    /// the message (or a failure with the child's log).
    fn wait(&mut self, lab: &Lab, name: &str, line: &str, limit: Duration) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < limit {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == line) {
                    return msg;
                }
            }
        }
        panic!(
            "no {line} from {name} within {limit:?}; got {:?}; its log:\n{}",
            self.seen,
            lab.log(name)
        );
    }
}

/// How systemd would run an agent of the unit: its `ExecStart` line (the
/// binary and /etc/bond moved into the lab), under the unit's capability
/// bounding set and without new privileges (setpriv), with a
/// `NOTIFY_SOCKET` of its own.
struct Unit {
    exec: String,
    reload: String,
    /// How long systemd waits before starting a crashed agent again.
    restart: Duration,
    caps: String,
    etc: PathBuf,
}

impl Unit {
    fn read(lab: &Lab) -> Unit {
        let unit = std::fs::read_to_string(repo("packaging/bond@.service")).unwrap();
        assert_eq!(unit_line(&unit, "Type"), "notify");
        assert_eq!(unit_line(&unit, "Restart"), "on-failure");
        assert_eq!(unit_line(&unit, "NoNewPrivileges"), "yes");
        let exec = unit_line(&unit, "ExecStart");
        let reload = unit_line(&unit, "ExecReload");
        assert_eq!(
            exec, "/usr/bin/bond-ctl --instance %i agent --config /etc/bond/%i.toml",
            "this test runs that line"
        );
        let restart_sec = unit_line(&unit, "RestartSec");
        let restart = Duration::from_secs(
            restart_sec
                .strip_suffix('s')
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("RestartSec={restart_sec}: seconds")),
        );
        assert_eq!(
            reload, "/bin/kill -HUP $MAINPID",
            "this test runs that line"
        );
        // CAP_NET_ADMIN CAP_BPF ... as setpriv takes it: -all,+net_admin,+bpf
        let caps = unit_line(&unit, "CapabilityBoundingSet")
            .split_whitespace()
            .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
            .collect::<String>();
        let etc = lab.dir.join("etc/bond");
        std::fs::create_dir_all(&etc).unwrap();
        Unit {
            exec,
            reload,
            restart,
            caps: format!("-all{caps}"),
            etc,
        }
    }

    /// Starts child `name` in `ns` as `bond@instance` with `config`; its
    /// notify socket.
    fn start(&self, lab: &mut Lab, ns: &str, name: &str, instance: &str, config: &str) -> Notify {
        std::fs::write(self.etc.join(format!("{instance}.toml")), config).unwrap();
        let line = self
            .exec
            .replace("/usr/bin/bond-ctl", &bond_ctl().to_string_lossy())
            .replace("/etc/bond/", &format!("{}/", self.etc.display()))
            .replace("%i", instance);
        let path = lab.dir.join(format!("notify-{name}.sock"));
        let _ = std::fs::remove_file(&path);
        let notify = Notify::bind(&path);
        let env = format!("NOTIFY_SOCKET={}", path.display());
        let mut args = vec![
            "--no-new-privs",
            "--bounding-set",
            &self.caps,
            "--inh-caps=-all",
            "--ambient-caps=-all",
            "env",
            &env,
        ];
        args.extend(line.split_whitespace());
        lab.spawn(ns, name, "setpriv", &args).unwrap();
        notify
    }

    /// Runs `ExecReload` for child `name`, as systemd does.
    fn reload(&self, lab: &Lab, name: &str) {
        let line = self
            .reload
            .replace("$MAINPID", &lab.pid(name).unwrap().to_string());
        let mut words = line.split_whitespace();
        let st = Command::new(words.next().unwrap())
            .args(words)
            .status()
            .unwrap();
        assert!(st.success(), "{line}: {st}");
        lab.wait_for(
            &format!("{name} to reload"),
            Duration::from_secs(5),
            |lab| Ok(lab.log(name).contains("configuration reloaded")),
        )
        .unwrap();
    }
}

#[test]
fn under_the_units_command_lines_and_capabilities_agents_bond_reload_restart_and_stop() {
    let mut lab = figure1();
    let unit = Unit::read(&lab);
    let (srv_ns, srv) = (lab.server_ns.clone(), lab.server_instance.clone());
    let config = lab.server_config();
    let mut server = unit.start(&mut lab, &srv_ns, "agent-srv", &srv, &config);
    let ready = server.wait(&lab, "agent-srv", "READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=server "), "{ready}");
    // Ready means attached: its maps are pinned and it answers.
    lab.server_links()
        .expect("the server's pinned maps at READY=1");
    lab.server_status().expect("the server's socket at READY=1");

    // Every terminal the same way; the community forms.
    let mut terminals = Vec::new();
    for i in 0..lab.terminals.len() {
        let (ns, inst) = lab.terminal_agent(i);
        let config = lab.terminal_config(i);
        let name = format!("agent-t{}", i + 1);
        let mut n = unit.start(&mut lab, &ns, &name, &inst, &config);
        let ready = n.wait(&lab, &name, "READY=1", Duration::from_secs(20));
        assert!(ready.contains("STATUS=terminal "), "{ready}");
        terminals.push((name, n));
    }
    lab.wait_for_community(Duration::from_secs(20))
        .expect("the community forms under the unit");

    unit.reload(&lab, "agent-srv");
    unit.reload(&lab, "agent-t1");

    // A crash during a download (Restart=on-failure starts the same line
    // again, RestartSec later): the pinned datapath carries on meanwhile,
    // the new agent adopts it and is ready again, the download loses
    // nothing.
    let served = lab.serve_file("unit.bin", 20).unwrap();
    let (ns3, _) = lab.terminal_agent(2);
    let out = lab.dir.join("unit.out");
    let mut curl = lab
        .cmd(&ns3, "curl")
        .args(["-sS", "--fail", "--limit-rate", "2M", "-o"])
        .arg(&out)
        .arg("http://203.0.113.2/unit.bin")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    lab.stop("agent-srv", true).unwrap();
    std::thread::sleep(unit.restart);
    let mut server = unit.start(&mut lab, &srv_ns, "agent-srv", &srv, &config);
    let ready = server.wait(&lab, "agent-srv", "READY=1", Duration::from_secs(20));
    assert!(ready.contains("STATUS=server "), "{ready}");
    assert!(
        lab.log("agent-srv")
            .contains("adopting the running datapath"),
        "{}",
        lab.log("agent-srv")
    );
    lab.wait_for_community(Duration::from_secs(20))
        .expect("the community after the restart");
    let st = curl.wait().unwrap();
    assert!(st.success(), "the download across the crash: {st}");
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&served).unwrap(),
        "the download across the crash differs from the file"
    );

    // `systemctl stop` (SIGTERM): each says it is stopping.
    for (name, mut n) in terminals {
        lab.stop(&name, false).unwrap();
        n.wait(&lab, &name, "STOPPING=1", Duration::from_secs(5));
    }
    lab.stop("agent-srv", false).unwrap();
    server.wait(&lab, "agent-srv", "STOPPING=1", Duration::from_secs(5));
}

/// A tmux server of its own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .expect("running tmux (apt install tmux)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The table's rows on a terminal's screen: (link, down Mbit/s).
fn link_rows(screen: &str) -> Vec<(u8, f64)> {
    screen
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let link = w.first()?.parse().ok()?;
            let down = w.get(3)?.parse().ok()?;
            Some((link, down))
        })
        .collect()
}

#[test]
fn top_shows_each_links_rate_live_and_gives_the_terminal_back() {
    let mut lab = figure1();
    lab.start_agents().expect("agents");
    let (ns, inst) = lab.terminal_agent(2);
    let tmux = Tmux {
        socket: format!("bond-top-{}", std::process::id()),
    };
    let top = format!(
        "nsenter --net=/run/netns/{ns} -- {} --instance {inst} top; echo top-exit=$?; stty -a; sleep 600",
        bond_ctl().display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "132",
        "-y",
        "30",
        "sh",
        "-c",
        &top,
    ]);
    // Waits for every link of the community on the screen, their rates
    // down adding up to a value in `range`; that screen.
    let until = |what: &str, range: std::ops::Range<f64>| {
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let s = tmux.screen();
            let rows = link_rows(&s);
            let links: BTreeSet<u8> = rows.iter().map(|r| r.0).collect();
            let down: f64 = rows.iter().map(|r| r.1).sum();
            if links == BTreeSet::from([1, 2, 3]) && range.contains(&down) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{what}: no screen with the links at {range:?} Mbit/s:\n{s}"
            );
        }
    };

    let idle = until("before any traffic", 0.0..0.5);
    assert!(idle.contains("logged on to"), "{idle}");
    assert!(idle.contains("weight up/down"), "{idle}");
    // A steady 20 Mbit/s down to t3 (UDP: no congestion control to vary
    // it): what the links carry for t3 adds up to it (and inner headers).
    lab.start_iperf().unwrap();
    lab.spawn(
        &ns,
        "load",
        "iperf3",
        &["-c", "203.0.113.2", "-u", "-b", "20M", "-R", "-t", "60"],
    )
    .unwrap();
    let busy = until("under 20 Mbit/s", 18.0..23.0);
    eprintln!("{busy}");
    lab.stop("load", false).unwrap();
    until("after the traffic", 0.0..0.5);

    // A small window says so instead of a table cut to pieces.
    tmux.run(&["resize-window", "-t", "top", "-x", "40", "-y", "6"]);
    let start = Instant::now();
    while !tmux.screen().contains("the window is 40x6") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no word of the small window:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    tmux.run(&["resize-window", "-t", "top", "-x", "132", "-y", "30"]);

    // q: it ends at once, with the terminal as it was (canonical mode,
    // echo on, off the alternate screen).
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let start = Instant::now();
    let after = loop {
        let s = tmux.screen();
        if s.contains("top-exit=") && s.contains("icanon") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "top did not end on q:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(after.contains("top-exit=0"), "{after}");
    let modes: Vec<&str> = after.split_whitespace().collect();
    for (on, off) in [("icanon", "-icanon"), ("echo", "-echo")] {
        assert!(modes.contains(&on) && !modes.contains(&off), "{after}");
    }
    assert!(
        !after.contains("weight up/down"),
        "still on top's screen:\n{after}"
    );
}

/// Every `bond_*` name in the dashboard's queries.
fn dashboard_metrics(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if let (true, Value::String(expr)) = (k == "expr" || k == "query", v) {
                    let mut rest = expr.as_str();
                    while let Some(i) = rest.find("bond_") {
                        let name: String = rest[i..]
                            .chars()
                            .take_while(|c| {
                                c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'
                            })
                            .collect();
                        rest = &rest[i + name.len()..];
                        out.insert(name);
                    }
                } else {
                    dashboard_metrics(v, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_metrics(v, out)),
        _ => {}
    }
}

#[test]
fn every_metric_the_dashboard_graphs_is_served() {
    let mut lab = figure1();
    lab.start_agents().expect("agents");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("packaging/grafana/bond.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut used = BTreeSet::new();
    dashboard_metrics(&dashboard, &mut used);
    for family in [
        "bond_link_bytes_total",
        "bond_link_weight",
        "bond_drops_total",
        "bond_community_flows",
        "bond_free_ports",
        "bond_link_missed_announces",
    ] {
        assert!(
            used.contains(family),
            "the dashboard has no {family}: {used:?}"
        );
    }

    // What a terminal with links, one without, and the server serve.
    let mut served = BTreeSet::new();
    let mut scrape = |text: String| {
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                served.insert(rest.split_whitespace().next().unwrap().to_string());
            }
        }
    };
    for i in [0, 2] {
        let (ns, inst) = lab.terminal_agent(i);
        scrape(lab.ctl(&ns, &inst, &["metrics"]).unwrap());
    }
    scrape(
        lab.exec(
            &lab.server_ns,
            "curl",
            &["-sf", "http://127.0.0.1:9477/metrics"],
        )
        .unwrap(),
    );
    let missing: Vec<&String> = used.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "graphed but not served: {missing:?}; served {served:?}"
    );
    // Each panel asks the dashboard's own data source.
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        }
    }
}
