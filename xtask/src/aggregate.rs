//! `cargo xtask bench aggregate`: goodput over tbf-limited WAN links, bond
//! against the alternatives on the same links in the same run.
//!
//! Three communities of terminals on one LAN (Figure 1): three equal links;
//! links of 10, 20 and 40 Mbit/s; and the same with an origin that has no
//! link of its own. Each carries one iperf3 TCP download, eight parallel
//! ones, and one HTTP download, over
//!
//! - the best single link, with plain routing from the host that owns it;
//! - kernel MPTCP as bonding routers deploy it: the origin opens one subflow
//!   per link (source-routed through the peer that owns it, which
//!   masquerades) to a proxy in the server's namespace, which relays to the
//!   content host over plain TCP;
//! - bond, from the origin.
//!
//! Every figure is a share of the summed link rates, and each row shows how
//! the bytes split over the links (the modems' counters), which tells
//! whether a system really used them all.

use std::{
    fmt::Write as _,
    io,
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use bond_ctl::lab::{CONTENT, Lab, SERVER_WAN, TerminalSpec};

/// A community to measure: each terminal's link rates, and the origin.
struct Scenario {
    name: &'static str,
    links: Vec<Vec<u32>>,
    origin: usize,
}

#[derive(Clone, Copy)]
enum Load {
    /// iperf3 download with this many parallel TCP flows.
    Tcp(u32),
    /// One HTTP download (curl) of the served file.
    Http,
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    Single,
    Mptcp,
    Bond,
}

/// The proxy's ports in the server namespace (on the server's WAN address).
const PROXY_IPERF: u16 = 5202;
const PROXY_HTTP: u16 = 8080;

/// One measurement: goodput and the share of bytes on each link.
struct Sample {
    mbit: f64,
    split: Vec<f64>,
}

pub fn run(bond_ctl: &Path, quick: bool, runs: usize) -> Result<String> {
    let scenarios = if quick {
        vec![Scenario {
            name: "links of 10, 20 and 40 Mbit/s, origin t1",
            links: vec![vec![10], vec![20], vec![40]],
            origin: 0,
        }]
    } else {
        vec![
            Scenario {
                name: "three equal links of 20 Mbit/s, origin t1",
                links: vec![vec![20], vec![20], vec![20]],
                origin: 0,
            },
            Scenario {
                name: "links of 10, 20 and 40 Mbit/s, origin t1",
                links: vec![vec![10], vec![20], vec![40]],
                origin: 0,
            },
            Scenario {
                name: "links of 10, 20 and 40 Mbit/s, origin t4 (no link of its own)",
                links: vec![vec![10], vec![20], vec![40], vec![]],
                origin: 3,
            },
        ]
    };
    let (secs, mb) = if quick { (3, 4) } else { (8, 20) };
    let loads: Vec<Load> = if quick {
        vec![Load::Tcp(1), Load::Http]
    } else {
        vec![Load::Tcp(1), Load::Tcp(8), Load::Http]
    };
    let mut out = String::new();
    writeln!(
        out,
        "Goodput of downloads from the content host, as a share of the summed link \
         rates; in brackets, each link's share of the bytes (from its modem's counters). \
         iperf3 runs {secs} s after a 1 s warm-up; HTTP fetches {mb} MiB with curl; \
         each the median of {runs}. MPTCP: the kernel's, one subflow per link, to a proxy in the server namespace."
    )?;
    for sc in &scenarios {
        eprintln!("aggregate: {}", sc.name);
        let spec: Vec<TerminalSpec> = sc
            .links
            .iter()
            .map(|l| TerminalSpec { links: l.clone() })
            .collect();
        let mut lab = Lab::build(&spec, bond_ctl)?;
        lab.serve_file("file.bin", mb)?;
        lab.start_iperf()?;
        let rates: Vec<u32> = lab.all_links().map(|l| l.rate_mbit).collect();
        let sum: u32 = rates.iter().sum();
        let best = (0..lab.terminals.len())
            .max_by_key(|&i| lab.terminals[i].links.iter().map(|l| l.rate_mbit).max())
            .context("no links")?;
        let best_rate = lab.terminals[best].links[0].rate_mbit;

        let mut rows: Vec<(String, Vec<Sample>)> = Vec::new();
        for system in [System::Single, System::Mptcp, System::Bond] {
            let ns = if system == System::Single {
                lab.terminals[best].ns.clone()
            } else {
                lab.terminals[sc.origin].ns.clone()
            };
            let mptcp = match system {
                System::Mptcp => Some(Mptcp::set_up(&mut lab, sc.origin)?),
                System::Bond => {
                    lab.start_agents()?;
                    None
                }
                System::Single => None,
            };
            let mut samples = Vec::new();
            for &load in &loads {
                let mut tries = (0..runs.max(1))
                    .map(|_| measure(&lab, &ns, system, load, secs))
                    .collect::<Result<Vec<_>>>()?;
                tries.sort_by(|a, b| a.mbit.total_cmp(&b.mbit));
                let s = tries.swap_remove(tries.len() / 2);
                eprintln!(
                    "  {:<22} {:<14} {:5.1} Mbit/s  {}",
                    system_name(system, best_rate, rates.len()),
                    load_name(load, mb),
                    s.mbit,
                    split(&s.split)
                );
                samples.push(s);
            }
            if let Some(m) = mptcp {
                m.tear_down(&lab)?;
            }
            rows.push((system_name(system, best_rate, rates.len()), samples));
        }

        let rate_list: Vec<String> = rates.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "\n### {} (links {} Mbit/s, sum {sum})\n",
            sc.name,
            rate_list.join("/")
        )?;
        let heads: Vec<String> = loads.iter().map(|&l| load_name(l, mb)).collect();
        writeln!(out, "| | {} |", heads.join(" | "))?;
        writeln!(out, "|---{}|", "|---".repeat(loads.len()))?;
        for (name, samples) in &rows {
            let cells: Vec<String> = samples
                .iter()
                .map(|s| {
                    format!(
                        "{:.1} Mbit/s, {:.0}% [{}]",
                        s.mbit,
                        s.mbit / f64::from(sum) * 100.0,
                        split(&s.split)
                    )
                })
                .collect();
            writeln!(out, "| {name} | {} |", cells.join(" | "))?;
        }
        for (vs, idx) in [("best single link", 0), ("MPTCP", 1)] {
            let cells: Vec<String> = rows[2]
                .1
                .iter()
                .zip(&rows[idx].1)
                .map(|(b, o)| format!("{:.2}x", b.mbit / o.mbit))
                .collect();
            writeln!(out, "| bond / {vs} | {} |", cells.join(" | "))?;
        }
    }
    Ok(out)
}

fn system_name(s: System, best_rate: u32, links: usize) -> String {
    match s {
        System::Single => format!("best single link ({best_rate})"),
        System::Mptcp => format!("MPTCP, {links} subflows"),
        System::Bond => "bond".into(),
    }
}

fn load_name(l: Load, mb: usize) -> String {
    match l {
        Load::Tcp(1) => "iperf3, 1 flow".into(),
        Load::Tcp(n) => format!("iperf3, {n} flows"),
        Load::Http => format!("HTTP, {mb} MiB"),
    }
}

/// Link shares as whole percentages, "14/29/57".
fn split(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|s| format!("{:.0}", s * 100.0))
        .collect::<Vec<_>>()
        .join("/")
}

/// Bytes each link's modem has sent towards its terminal (downstream).
pub fn link_bytes(lab: &Lab) -> Result<Vec<u64>> {
    lab.all_links()
        .map(|l| {
            let j = lab.exec(&l.modem_ns, "ip", &["-s", "-j", "link", "show", "acc"])?;
            let v: serde_json::Value = serde_json::from_str(&j)?;
            v[0]["stats64"]["tx"]["bytes"]
                .as_u64()
                .with_context(|| format!("tx bytes of acc in {}", l.modem_ns))
        })
        .collect()
}

/// Runs one load over one system from `ns`.
fn measure(lab: &Lab, ns: &str, system: System, load: Load, secs: u32) -> Result<Sample> {
    let (host, iperf_port, url) = if system == System::Mptcp {
        (
            SERVER_WAN,
            PROXY_IPERF,
            format!("http://{SERVER_WAN}:{PROXY_HTTP}/file.bin"),
        )
    } else {
        (CONTENT, 5201, format!("http://{CONTENT}/file.bin"))
    };
    // mptcpize turns the client's TCP sockets into MPTCP ones.
    let wrap: &[&str] = if system == System::Mptcp {
        &["mptcpize", "run"]
    } else {
        &[]
    };
    let before = link_bytes(lab)?;
    let mbit = match load {
        Load::Tcp(flows) => iperf(lab, ns, wrap, host, iperf_port, flows, secs)?,
        Load::Http => http(lab, ns, wrap, &url)?,
    };
    let after = link_bytes(lab)?;
    let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total = moved.iter().sum::<u64>().max(1) as f64;
    Ok(Sample {
        mbit,
        split: moved.iter().map(|&m| m as f64 / total).collect(),
    })
}

/// Goodput of an iperf3 download (`-R`) in Mbit/s.
fn iperf(
    lab: &Lab,
    ns: &str,
    wrap: &[&str],
    host: Ipv4Addr,
    port: u16,
    flows: u32,
    secs: u32,
) -> Result<f64> {
    let args = [
        "iperf3",
        "-c",
        &host.to_string(),
        "-p",
        &port.to_string(),
        "-R",
        "-P",
        &flows.to_string(),
        "-t",
        &secs.to_string(),
        "-O",
        "1",
        "-J",
    ]
    .map(str::to_string);
    let argv: Vec<&str> = wrap
        .iter()
        .copied()
        .chain(args.iter().map(String::as_str))
        .collect();
    let out = lab.exec(ns, argv[0], &argv[1..])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3's JSON from {ns}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no received rate in iperf3's report from {ns}: {out:.400}"))?;
    Ok(bps / 1e6)
}

/// Goodput of one HTTP download in Mbit/s.
fn http(lab: &Lab, ns: &str, wrap: &[&str], url: &str) -> Result<f64> {
    let (bytes, secs) = lab.fetch(ns, wrap, url, Path::new("/dev/null"))?;
    ensure!(
        bytes > 0 && secs > 0.0,
        "curl in {ns} fetched nothing from {url}"
    );
    Ok(bytes as f64 * 8.0 / secs / 1e6)
}

/// Kernel MPTCP over the community's links, set up on the origin, the
/// peers and the server; [`Mptcp::tear_down`] undoes it before bond runs.
///
/// Link k gets a source address on the origin: the link's own WAN address
/// if the origin owns it, else 10.0.1.(100+k) on the LAN, which a policy
/// rule routes through the owner (who forwards and masquerades it onto its
/// link). The first link carries the initial subflow (main table); each
/// other link is a `subflow` endpoint, so the path manager opens exactly
/// one subflow per link.
struct Mptcp {
    origin: String,
    peers: Vec<String>,
    sources: Vec<(Ipv4Addr, bool)>,
}

impl Mptcp {
    fn set_up(lab: &mut Lab, origin: usize) -> Result<Self> {
        let srv = lab.server_ns.clone();
        lab.ip(&srv, "mptcp limits set subflow 8 add_addr_accepted 8")?;
        let exe = std::env::current_exe()?.to_string_lossy().into_owned();
        for (name, port, to) in [
            ("proxy-iperf", PROXY_IPERF, 5201),
            ("proxy-http", PROXY_HTTP, 80),
        ] {
            lab.spawn(
                &srv,
                name,
                &exe,
                &[
                    "mptcp-proxy",
                    &format!("{SERVER_WAN}:{port}"),
                    &format!("{CONTENT}:{to}"),
                ],
            )?;
        }
        let o = lab.terminals[origin].clone();
        lab.ip(&o.ns, "mptcp limits set subflow 8 add_addr_accepted 8")?;
        let mut m = Self {
            origin: o.ns.clone(),
            peers: Vec::new(),
            sources: Vec::new(),
        };
        let links: Vec<(usize, bond_ctl::lab::WanLink)> = lab
            .terminals
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.links.iter().map(move |l| (i, l.clone())))
            .collect();
        for (k, (owner, link)) in links.into_iter().enumerate() {
            let table = 100 + k;
            let (src, via, dev) = if owner == origin {
                (link.wan_ip, link.modem_ip, link.iface.clone())
            } else {
                let src = Ipv4Addr::new(10, 0, 1, 100 + k as u8);
                lab.ip(&o.ns, &format!("addr add {src}/24 dev lan0"))?;
                let peer = &lab.terminals[owner];
                lab.exec(&peer.ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
                let rule = format!(
                    "add rule ip bondbench post oifname {} ip saddr 10.0.1.0/24 masquerade",
                    link.iface
                );
                for cmd in [
                    "add table ip bondbench",
                    "add chain ip bondbench post { type nat hook postrouting priority 100 ; }",
                    &rule,
                ] {
                    nft(lab, &peer.ns, cmd)?;
                }
                if !m.peers.contains(&peer.ns) {
                    m.peers.push(peer.ns.clone());
                }
                (src, peer.lan_ip, "lan0".to_string())
            };
            m.sources.push((src, owner != origin));
            lab.ip(&o.ns, &format!("rule add from {src} table {table}"))?;
            lab.ip(
                &o.ns,
                &format!("route add {SERVER_WAN} via {via} dev {dev} src {src} table {table}"),
            )?;
            if k == 0 {
                lab.ip(
                    &o.ns,
                    &format!("route add {SERVER_WAN} via {via} dev {dev} src {src}"),
                )?;
            } else {
                lab.ip(
                    &o.ns,
                    &format!("mptcp endpoint add {src} dev {dev} subflow"),
                )?;
            }
        }
        // The proxies listen by now (they bind before anything else).
        thread::sleep(Duration::from_millis(300));
        Ok(m)
    }

    fn tear_down(self, lab: &Lab) -> Result<()> {
        lab.ip(&self.origin, "mptcp endpoint flush")?;
        lab.ip(&self.origin, &format!("route del {SERVER_WAN}"))?;
        for (k, (src, on_lan)) in self.sources.iter().enumerate() {
            lab.ip(
                &self.origin,
                &format!("rule del from {src} table {}", 100 + k),
            )?;
            lab.ip(&self.origin, &format!("route flush table {}", 100 + k))?;
            if *on_lan {
                lab.ip(&self.origin, &format!("addr del {src}/24 dev lan0"))?;
            }
        }
        for p in &self.peers {
            nft(lab, p, "delete table ip bondbench")?;
        }
        Ok(())
    }
}

/// One nft command (`add rule ...`) in a namespace.
fn nft(lab: &Lab, ns: &str, script: &str) -> Result<()> {
    lab.exec(ns, "nft", &[script])
        .map(drop)
        .with_context(|| format!("nft in {ns}: {script}"))
}

/// `xtask mptcp-proxy LISTEN TO`: accepts MPTCP connections and relays
/// each, both ways, to TO over plain TCP, one thread per direction.
pub fn proxy(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP))
        .context("an MPTCP socket (is net.mptcp.enabled 1?)")?;
    sock.set_reuse_address(true)?;
    sock.bind(&listen.into())
        .with_context(|| format!("binding {listen}"))?;
    sock.listen(128)?;
    let listener: TcpListener = sock.into();
    for client in listener.incoming() {
        let client = client?;
        thread::spawn(move || {
            if let Err(e) = relay(client, to) {
                eprintln!("mptcp-proxy: {e:#}");
            }
        });
    }
    bail!("the listener on {listen} closed")
}

fn relay(client: TcpStream, to: SocketAddr) -> Result<()> {
    let server = TcpStream::connect(to).with_context(|| format!("connecting to {to}"))?;
    let (mut c, mut s) = (client.try_clone()?, server.try_clone()?);
    let up = thread::spawn(move || {
        let _ = io::copy(&mut c, &mut s);
        let _ = s.shutdown(Shutdown::Write);
    });
    let _ = io::copy(&mut &server, &mut &client);
    let _ = client.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
