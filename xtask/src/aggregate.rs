//! `cargo xtask bench aggregate`: goodput over the lab's named link profiles
//! (`bond_lab::Profile`: rate, one-way delay, jitter, loss, rate steps,
//! a dark window), bond against the alternatives on the same links in the
//! same run.
//!
//! Per profile, a community of three terminals t1..t3 on one LAN (Figure 1),
//! each owning one of the profile's links in order; the origin is t1. Each
//! carries downloads (iperf3 `-R`) and uploads (iperf3 from the origin) of
//! one TCP flow and of eight, and one HTTP download, over
//!
//! - the best single link, with plain routing from the host that owns it:
//!   every distinct link is measured and the best measured one reported
//!   (with unequal delays the fastest link need not be the best);
//! - kernel MPTCP as bonding routers deploy it: the origin opens one subflow
//!   per link (source-routed through the peer that owns it, which
//!   masquerades) to a proxy in the server's namespace, which relays to the
//!   content host over plain TCP;
//! - bond from the origin, configured as a user would: measured weights
//!   (`weight = "auto"`); in full runs also with static weights equal to the
//!   link rates.
//!
//! Every figure is a share of the profile's summed mean link rates, with the
//! sender's retransmitted segments (share of the data segments it sent) and
//! the DSACKs it received, from its namespace's TCP counters; each cell also
//! shows how the bytes split over the links (the modems' counters). On
//! `flap` the events (link 1 dark from 3 s to 8 s) start with each measured
//! transfer, and the goodput inside the dark window is reported as a share
//! of the other links' rates.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bond_lab::{CONTENT, CONTENT6, Lab, LinkSpec, PROFILES, Profile, SERVER_WAN};

use crate::floors::Figure;

#[derive(Clone, Copy, PartialEq)]
enum Dir {
    /// From the content host to the origin (iperf3 `-R`, HTTP).
    Down,
    /// From the origin to the content host.
    Up,
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// iperf3 with this many parallel TCP flows.
    Tcp(u32),
    /// One HTTP download (curl) of the served file.
    Http,
}

/// One column of a profile's table.
#[derive(Clone, Copy)]
struct Cell {
    load: Load,
    dir: Dir,
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    /// Plain routing over link `.0` (0-based), from the terminal owning it.
    Single(usize),
    Mptcp,
    /// bond with measured weights (`weight = "auto"`).
    Bond,
    /// The same, the traffic inside IPv6 (to `CONTENT6`).
    Bond6,
    /// bond with static weights equal to the link rates.
    BondStatic,
}

/// The proxy's ports in the server namespace (on the server's WAN address).
const PROXY_IPERF: u16 = 5202;
const PROXY_HTTP: u16 = 8080;

/// One measurement.
#[derive(Clone)]
struct Sample {
    /// Goodput, Mbit/s.
    mbit: f64,
    /// Goodput inside the dark window (`flap`), Mbit/s.
    dark_mbit: Option<f64>,
    /// The sender's TCP counters over the transfer.
    tcp: TcpDelta,
    /// Each link's share of the bytes.
    split: Vec<f64>,
    /// Links the sending agent left out as silent during the transfer
    /// (`feedback.silenced`; bond only).
    silenced: Option<u64>,
}

/// TCP counters of one namespace (`/proc/net/snmp`, `/proc/net/netstat`),
/// or the difference of two readings.
#[derive(Clone, Copy, Default)]
struct TcpDelta {
    /// `TcpRetransSegs`.
    retrans: u64,
    /// `TcpExtTCPOrigDataSent`: data segments sent, retransmissions aside.
    data: u64,
    /// `TcpExtTCPDSACKRecv`.
    dsack: u64,
}

impl TcpDelta {
    /// Retransmitted segments as a share of all data segments sent.
    fn retrans_share(&self) -> f64 {
        self.retrans as f64 / (self.data + self.retrans).max(1) as f64
    }
}

/// The settings of one run of the suite.
struct Plan {
    /// iperf3 seconds (after a 1 s warm-up, except on profiles with a dark
    /// window, whose transfers are measured from their first second).
    secs: u32,
    /// iperf3 seconds on profiles with a dark window.
    event_secs: u32,
    /// HTTP file size, MiB.
    mb: usize,
    runs: usize,
    cells: Vec<Cell>,
    static_row: bool,
}

pub fn run(
    bond_ctl: &Path,
    quick: bool,
    runs: usize,
    only: &[String],
) -> Result<(String, Vec<Figure>)> {
    let profiles: Vec<&str> = if !only.is_empty() {
        only.iter().map(String::as_str).collect()
    } else if quick {
        vec!["equal", "mixed", "flap"]
    } else {
        PROFILES.to_vec()
    };
    let mut cells = Vec::new();
    for dir in [Dir::Down, Dir::Up] {
        for flows in [1, 8] {
            cells.push(Cell {
                load: Load::Tcp(flows),
                dir,
            });
        }
    }
    cells.push(Cell {
        load: Load::Http,
        dir: Dir::Down,
    });
    let plan = Plan {
        secs: if quick { 3 } else { 10 },
        event_secs: if quick { 9 } else { 12 },
        mb: if quick { 4 } else { 20 },
        runs: runs.max(1),
        cells,
        static_row: !quick,
    };
    let mut out = String::new();
    writeln!(
        out,
        "Goodput between the origin t1 and the content host, as a share of the profile's \
         summed mean link rates (Mbit/s in brackets), each the median of {runs} run(s). \
         Under it: the sender's retransmitted segments (share of the data segments it sent) \
         and the DSACKs it received, from its namespace's TCP counters, and each link's \
         share of the bytes (its modem's counters). iperf3 runs {} s after a 1 s warm-up \
         ({} s from the start on `flap`, whose events start with each transfer: link 1 dark \
         from 3 s to 8 s; \"dark\" is the goodput from 3.5 s to 8 s as a share of the other \
         links' rates); HTTP fetches {} MiB with curl. Best single link: every distinct link \
         measured with plain routing, the best median per column reported (the link in the \
         cell). MPTCP: the kernel's, one subflow per link, to a proxy in the server namespace. \
         bond: measured weights (`weight = \"auto\"`), as a user would configure it.",
        plan.secs,
        plan.event_secs,
        plan.mb,
        runs = plan.runs
    )?;
    let mut figures = Vec::new();
    for name in profiles {
        let profile = Profile::named(name)?;
        eprintln!("aggregate: {name}");
        let rows = measure_profile(bond_ctl, &profile, &plan)?;
        figures.extend(report(&mut out, &profile, &plan, &rows)?);
    }
    Ok((out, figures))
}

/// One row of a table: its label and a sample per cell.
struct Row {
    name: String,
    system: System,
    samples: Vec<Sample>,
    /// For the best single link: which link each cell's sample is from.
    links: Vec<usize>,
}

/// Builds the profile's community and measures every system on it.
fn measure_profile(bond_ctl: &Path, profile: &Profile, plan: &Plan) -> Result<Vec<Row>> {
    let origin = 0;
    let spec: Vec<Vec<LinkSpec>> = profile.links.iter().map(|l| vec![l.clone()]).collect();
    let mut lab = new_lab(&spec, bond_ctl, plan, profile)?;
    // Links with equal specs (and no events) measure alike: one of each.
    let mut candidates: Vec<usize> = Vec::new();
    for (k, l) in profile.links.iter().enumerate() {
        if !candidates.iter().any(|&c| profile.links[c] == *l) {
            candidates.push(k);
        }
    }
    // The systems take turns within each run, so that a slow spell of the
    // machine falls on all of them alike; each cell is the median of the
    // runs.
    let systems: Vec<System> = candidates
        .iter()
        .map(|&k| System::Single(k))
        .chain([System::Mptcp, System::Bond, System::Bond6])
        .chain(plan.static_row.then_some(System::BondStatic))
        .collect();
    let mut runs: Vec<Vec<Vec<Sample>>> = vec![Vec::new(); systems.len()];
    for run in 0..plan.runs {
        eprintln!("  run {} of {}", run + 1, plan.runs);
        for (i, &system) in systems.iter().enumerate() {
            let samples = match system {
                System::Single(_) => measure_cells(&mut lab, profile, plan, system, origin)?,
                System::Mptcp => {
                    let m = Mptcp::set_up(&mut lab, origin)?;
                    let samples = measure_cells(&mut lab, profile, plan, system, origin);
                    m.tear_down(&lab)?;
                    samples?
                }
                System::Bond | System::Bond6 | System::BondStatic => {
                    // Fresh agents each run: the weights are measured (or
                    // read) anew, as after a user's start.
                    lab.auto_weights = system != System::BondStatic;
                    lab.start_agents()?;
                    let took = lab.wait_for_measured(Duration::from_secs(20))?;
                    eprintln!(
                        "  {}: every link measured {:.1} s after the community formed",
                        system_name(system),
                        took.as_secs_f64()
                    );
                    let samples = measure_cells(&mut lab, profile, plan, system, origin);
                    lab.stop_agents()?;
                    samples?
                }
            };
            runs[i].push(samples);
        }
    }
    let medians: Vec<Vec<Sample>> = runs.iter().map(|r| medians(r, plan)).collect();
    let single_rows = candidates.len();
    let mut rows = Vec::new();
    let mut best = Row {
        name: "best single link".into(),
        system: System::Single(0),
        samples: Vec::new(),
        links: Vec::new(),
    };
    for (c, _) in plan.cells.iter().enumerate() {
        let i = (0..single_rows)
            .max_by(|&a, &b| medians[a][c].mbit.total_cmp(&medians[b][c].mbit))
            .context("no links")?;
        best.samples.push(medians[i][c].clone());
        best.links.push(candidates[i]);
    }
    rows.push(best);
    for (i, &system) in systems.iter().enumerate().skip(single_rows) {
        rows.push(Row {
            name: match system {
                System::Mptcp => format!("MPTCP, {} subflows", profile.links.len()),
                System::Bond => "bond (measured weights)".into(),
                System::Bond6 => "bond, IPv6 inside (measured weights)".into(),
                _ => "bond, static weights = link rates".into(),
            },
            system,
            samples: medians[i].clone(),
            links: Vec::new(),
        });
    }
    Ok(rows)
}

/// A lab on the profile's links with the content servers running; the
/// rate steps play from now on (a dark window is started per transfer).
fn new_lab(spec: &[Vec<LinkSpec>], bond_ctl: &Path, plan: &Plan, profile: &Profile) -> Result<Lab> {
    let mut lab = Lab::build_links(spec, bond_ctl)?;
    lab.serve_file("file.bin", plan.mb)?;
    lab.start_iperf()?;
    if !has_dark(profile) {
        lab.start_events();
    }
    Ok(lab)
}

fn has_dark(profile: &Profile) -> bool {
    profile.links.iter().any(|l| l.dark.is_some())
}

/// The dark window to report: from half a second after the first dark link
/// goes dark until it comes back, in seconds from the transfer's start.
fn dark_window(profile: &Profile) -> Option<(f64, f64)> {
    let (from, len) = profile.links.iter().find_map(|l| l.dark)?;
    Some((from.as_secs_f64() + 0.5, (from + len).as_secs_f64()))
}

/// The summed mean rates of the links that stay up in the dark window.
fn lit_mbit(profile: &Profile) -> f64 {
    profile
        .links
        .iter()
        .filter(|l| l.dark.is_none())
        .map(LinkSpec::mean_mbit)
        .sum()
}

/// Every cell of the plan over one system, once.
fn measure_cells(
    lab: &mut Lab,
    profile: &Profile,
    plan: &Plan,
    system: System,
    origin: usize,
) -> Result<Vec<Sample>> {
    let client = match system {
        System::Single(k) => lab.terminals[k].ns.clone(),
        _ => lab.terminals[origin].ns.clone(),
    };
    let mut samples = Vec::new();
    for &cell in &plan.cells {
        let s = measure(lab, profile, plan, &client, system, cell)?;
        eprintln!(
            "  {:<28} {:<22} {:5.1} Mbit/s{}  retrans {} ({:.2}%)  dsack {}  [{}]{}",
            system_name(system),
            cell_name(cell, plan.mb),
            s.mbit,
            s.dark_mbit
                .map(|d| format!(" (dark window {d:.1})"))
                .unwrap_or_default(),
            s.tcp.retrans,
            s.tcp.retrans_share() * 100.0,
            s.tcp.dsack,
            split(&s.split),
            s.silenced
                .map(|n| format!("  silenced {n}"))
                .unwrap_or_default()
        );
        samples.push(s);
    }
    Ok(samples)
}

/// Per cell, the run of median goodput (its counters and split with it).
fn medians(runs: &[Vec<Sample>], plan: &Plan) -> Vec<Sample> {
    (0..plan.cells.len())
        .map(|c| {
            let mut tries: Vec<&Sample> = runs.iter().map(|r| &r[c]).collect();
            tries.sort_by(|a, b| a.mbit.total_cmp(&b.mbit));
            tries[tries.len() / 2].clone()
        })
        .collect()
}

fn system_name(s: System) -> String {
    match s {
        System::Single(k) => format!("single link {}", k + 1),
        System::Mptcp => "MPTCP".into(),
        System::Bond => "bond".into(),
        System::Bond6 => "bond, IPv6".into(),
        System::BondStatic => "bond, static weights".into(),
    }
}

fn cell_name(c: Cell, mb: usize) -> String {
    let dir = match c.dir {
        Dir::Down => "down",
        Dir::Up => "up",
    };
    match c.load {
        Load::Tcp(1) => format!("1 flow {dir}"),
        Load::Tcp(n) => format!("{n} flows {dir}"),
        Load::Http => format!("HTTP {mb} MiB {dir}"),
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

/// Writes one profile's table and the comparison of bond with the
/// baselines; returns bond's ratios to them as figures.
fn report(out: &mut String, profile: &Profile, plan: &Plan, rows: &[Row]) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let sum = profile.sum_mbit();
    let links: Vec<String> = profile.links.iter().map(describe_link).collect();
    writeln!(
        out,
        "\n### {} (sum of mean rates {sum:.0} Mbit/s)\n\nLinks: {}.\n",
        profile.name,
        links.join("; ")
    )?;
    let heads: Vec<String> = plan.cells.iter().map(|&c| cell_name(c, plan.mb)).collect();
    writeln!(out, "| | {} |", heads.join(" | "))?;
    writeln!(out, "|---{}|", "|---".repeat(plan.cells.len()))?;
    let lit = lit_mbit(profile);
    for row in rows {
        let cells: Vec<String> = row
            .samples
            .iter()
            .enumerate()
            .map(|(c, s)| {
                let mut t = format!("**{:.0}%** ({:.1})", s.mbit / sum * 100.0, s.mbit);
                if let Some(&k) = row.links.get(c) {
                    let _ = write!(t, " link {}", k + 1);
                }
                if let Some(d) = s.dark_mbit {
                    let _ = write!(t, "<br>dark: {:.0}% of {lit:.0}", d / lit * 100.0);
                }
                let _ = write!(
                    t,
                    "<br>rtx {} ({:.2}%), dsack {}<br>[{}]",
                    s.tcp.retrans,
                    s.tcp.retrans_share() * 100.0,
                    s.tcp.dsack,
                    split(&s.split)
                );
                if let Some(n) = s.silenced {
                    let _ = write!(t, "<br>silenced {n}");
                }
                t
            })
            .collect();
        writeln!(out, "| {} | {} |", row.name, cells.join(" | "))?;
    }
    let row = |system: System| {
        rows.iter()
            .find(|r| r.system == system)
            .with_context(|| format!("no {} row", system_name(system)))
    };
    let (bond, bond6) = (row(System::Bond)?, row(System::Bond6)?);
    let best = rows
        .iter()
        .find(|r| r.links.len() == plan.cells.len())
        .context("no best single link row")?;
    let mut below: Vec<String> = Vec::new();
    // bond against each baseline, and bond's IPv6 against its IPv4.
    for (who, what, vs, base) in [
        ("bond", bond, "best single link", best),
        ("bond", bond, "MPTCP", row(System::Mptcp)?),
        ("bond IPv6", bond6, "IPv4", bond),
    ] {
        let mut cells = Vec::new();
        let mut worse = Vec::new();
        for (c, (b, o)) in what.samples.iter().zip(&base.samples).enumerate() {
            let r = b.mbit / o.mbit.max(1e-9);
            figures.push(Figure {
                name: format!(
                    "aggregate {}: {who} / {vs}, {}",
                    profile.name,
                    cell_name(plan.cells[c], plan.mb)
                ),
                value: r,
            });
            if r < 1.0 {
                // Rounded down: 0.998 is below, and shows so.
                let shown = (r * 100.0).floor() / 100.0;
                cells.push(format!("**{shown:.2}x below**"));
                worse.push(heads[c].clone());
            } else {
                cells.push(format!("{r:.2}x"));
            }
        }
        writeln!(out, "| {who} / {vs} | {} |", cells.join(" | "))?;
        if !worse.is_empty() {
            below.push(format!("{who} is below {vs} in {}", worse.join(", ")));
        }
    }
    writeln!(out)?;
    if below.is_empty() {
        writeln!(
            out,
            "On `{}`, bond is at or above the best single link and MPTCP in every column, \
             and as fast over IPv6 as over IPv4.",
            profile.name
        )?;
    } else {
        writeln!(
            out,
            "On `{}` (measured weights): {}.",
            profile.name,
            below.join("; ")
        )?;
    }
    Ok(figures)
}

/// "40 Mbit/s, 40 ms ±10 ms, 0.1% loss, steps to 20 every 3 s".
fn describe_link(l: &LinkSpec) -> String {
    let mut s = format!("{} Mbit/s", l.rate_mbit);
    let i = &l.impair;
    if !i.delay.is_zero() {
        let _ = write!(s, ", {} ms", i.delay.as_millis());
    }
    if !i.jitter.is_zero() {
        let _ = write!(s, " ±{} ms", i.jitter.as_millis());
    }
    if i.loss > 0.0 {
        let _ = write!(s, ", {}% loss", i.loss * 100.0);
    }
    if let Some((low, every)) = l.steps {
        let _ = write!(s, ", steps to {low} every {} s", every.as_secs_f64());
    }
    if let Some((from, len)) = l.dark {
        let _ = write!(
            s,
            ", dark {}..{} s",
            from.as_secs_f64(),
            (from + len).as_secs_f64()
        );
    }
    s
}

/// Bytes each link's modem has sent towards its terminal (`acc`,
/// downstream) or towards the internet (`uplink`, upstream).
fn link_bytes(lab: &Lab, dir: Dir) -> Result<Vec<u64>> {
    let dev = match dir {
        Dir::Down => "acc",
        Dir::Up => "uplink",
    };
    lab.all_links()
        .map(|l| {
            let j = lab.exec(&l.modem_ns, "ip", &["-s", "-j", "link", "show", dev])?;
            let v: serde_json::Value = serde_json::from_str(&j)?;
            v[0]["stats64"]["tx"]["bytes"]
                .as_u64()
                .with_context(|| format!("tx bytes of {dev} in {}", l.modem_ns))
        })
        .collect()
}

/// The TCP counters of a namespace, read inside it.
fn tcp_counters(lab: &Lab, ns: &str) -> Result<TcpDelta> {
    let text = lab.exec(ns, "cat", &["/proc/net/snmp", "/proc/net/netstat"])?;
    // Each group is a line of names and a line of values, both "Prefix: ...".
    let mut names: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut values: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        let Some((prefix, rest)) = line.split_once(':') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        match names.remove(prefix) {
            Some(keys) => {
                for (k, v) in keys.iter().zip(&fields) {
                    if let Ok(v) = v.parse::<i64>() {
                        values.insert(format!("{prefix}{k}"), v.max(0) as u64);
                    }
                }
            }
            None => {
                names.insert(prefix, fields);
            }
        }
    }
    let get = |k: &str| {
        values
            .get(k)
            .copied()
            .with_context(|| format!("no {k} in the TCP counters of {ns}"))
    };
    Ok(TcpDelta {
        retrans: get("TcpRetransSegs")?,
        data: get("TcpExtTCPOrigDataSent")?,
        dsack: get("TcpExtTCPDSACKRecv")?,
    })
}

/// Runs one cell over one system, the client in `client`.
fn measure(
    lab: &mut Lab,
    profile: &Profile,
    plan: &Plan,
    client: &str,
    system: System,
    cell: Cell,
) -> Result<Sample> {
    let mptcp = system == System::Mptcp;
    let (host, iperf_port, url): (IpAddr, _, _) = match system {
        System::Mptcp => (
            SERVER_WAN.into(),
            PROXY_IPERF,
            format!("http://{SERVER_WAN}:{PROXY_HTTP}/file.bin"),
        ),
        System::Bond6 => (
            CONTENT6.into(),
            5201,
            format!("http://[{CONTENT6}]/file.bin"),
        ),
        _ => (CONTENT.into(), 5201, format!("http://{CONTENT}/file.bin")),
    };
    // mptcpize turns the client's TCP sockets into MPTCP ones.
    let wrap: &[&str] = if mptcp { &["mptcpize", "run"] } else { &[] };
    // The sender over the links: the content host, or for MPTCP downloads
    // the proxy in the server namespace; the client for uploads.
    let sender = match (cell.dir, mptcp) {
        (Dir::Down, false) => lab.web_ns.clone(),
        (Dir::Down, true) => lab.server_ns.clone(),
        (Dir::Up, _) => client.to_string(),
    };
    let events = has_dark(profile) && matches!(cell.load, Load::Tcp(_));
    if has_dark(profile) {
        // Every link lit before the next transfer, whatever the last did.
        let dark: Vec<u8> = lab
            .all_links()
            .filter(|l| lab.link_spec(l.id).is_some_and(|s| s.dark.is_some()))
            .map(|l| l.id)
            .collect();
        for id in dark {
            lab.set_dark(id, false)?;
        }
    }
    let bonded = matches!(system, System::Bond | System::Bond6 | System::BondStatic);
    let silenced = |lab: &Lab| -> Result<Option<u64>> {
        if !bonded {
            return Ok(None);
        }
        let counts = match cell.dir {
            Dir::Down => lab.server_status()?.feedback.counts,
            Dir::Up => {
                let t = lab
                    .terminals
                    .iter()
                    .find(|t| t.ns == client)
                    .context("the client is no terminal of the lab")?;
                lab.terminal_status(&t.ns, &t.instance)?.feedback.counts
            }
        };
        Ok(Some(counts.silenced))
    };
    let silenced_before = silenced(lab)?;
    let before = link_bytes(lab, cell.dir)?;
    let tcp_before = tcp_counters(lab, &sender)?;
    let (mbit, dark_mbit) = match cell.load {
        Load::Tcp(flows) => {
            let secs = if events { plan.event_secs } else { plan.secs };
            let window = if events { dark_window(profile) } else { None };
            iperf(
                lab, client, wrap, host, iperf_port, flows, secs, cell.dir, window,
            )?
        }
        Load::Http => (http(lab, client, wrap, &url)?, None),
    };
    let tcp_after = tcp_counters(lab, &sender)?;
    let after = link_bytes(lab, cell.dir)?;
    let silenced = silenced(lab)?
        .zip(silenced_before)
        .map(|(a, b)| a.saturating_sub(b));
    let moved: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total = moved.iter().sum::<u64>().max(1) as f64;
    Ok(Sample {
        mbit,
        dark_mbit,
        tcp: TcpDelta {
            retrans: tcp_after.retrans.saturating_sub(tcp_before.retrans),
            data: tcp_after.data.saturating_sub(tcp_before.data),
            dsack: tcp_after.dsack.saturating_sub(tcp_before.dsack),
        },
        split: moved.iter().map(|&m| m as f64 / total).collect(),
        silenced,
    })
}

/// Goodput of an iperf3 transfer in Mbit/s (`Dir::Down`: `-R`), and with a
/// `window` (seconds from the start), the goodput inside it from the
/// receiver's half-second intervals. With a window the lab's events start
/// as the transfer does, and there is no warm-up.
#[allow(clippy::too_many_arguments)]
fn iperf(
    lab: &mut Lab,
    ns: &str,
    wrap: &[&str],
    host: IpAddr,
    port: u16,
    flows: u32,
    secs: u32,
    dir: Dir,
    window: Option<(f64, f64)>,
) -> Result<(f64, Option<f64>)> {
    let mut args: Vec<String> = [
        "iperf3",
        "-c",
        &host.to_string(),
        "-p",
        &port.to_string(),
        "-P",
        &flows.to_string(),
        "-t",
        &secs.to_string(),
        "-i",
        "0.5",
        "-J",
    ]
    .map(str::to_string)
    .to_vec();
    match dir {
        Dir::Down => args.push("-R".into()),
        // The receiver's intervals are the server's.
        Dir::Up => args.push("--get-server-output".into()),
    }
    if window.is_none() {
        args.extend(["-O".into(), "1".into()]);
    }
    let argv: Vec<&str> = wrap
        .iter()
        .copied()
        .chain(args.iter().map(String::as_str))
        .collect();
    let out = if window.is_some() {
        // As `Lab::iperf3`, a start the server refused between tests is
        // tried again (the events start over with it: the dark window is
        // seconds in, and a refusal comes at once).
        let start = Instant::now();
        loop {
            let child = lab
                .cmd(ns, argv[0])
                .args(&argv[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("iperf3 in {ns}"))?;
            lab.start_events();
            let o = child.wait_with_output()?;
            let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            let said = format!("{stdout}{}", String::from_utf8_lossy(&o.stderr));
            let not_started = bond_lab::iperf3_not_started(&said);
            if o.status.success() && !not_started {
                break stdout;
            }
            ensure!(
                not_started && start.elapsed() < Duration::from_secs(3),
                "iperf3 in {ns}: {said}"
            );
            eprintln!("  iperf3 in {ns} not started (the server was between tests); again");
            thread::sleep(Duration::from_millis(250));
        }
    } else {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.iperf3(ns, wrap, &args)?
    };
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("iperf3's JSON from {ns}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no received rate in iperf3's report from {ns}: {out:.400}"))?;
    let Some((from, to)) = window else {
        return Ok((bps / 1e6, None));
    };
    // The receiver's intervals: the client's for downloads, the server's for
    // uploads (if the server sent none back, the client's, as sent).
    let server = v["server_output_json"]["intervals"].as_array();
    let intervals = match (dir, server) {
        (Dir::Up, Some(s)) if !s.is_empty() => s,
        _ => v["intervals"]
            .as_array()
            .with_context(|| format!("no intervals in iperf3's report from {ns}: {out:.400}"))?,
    };
    let rates: Vec<f64> = intervals
        .iter()
        .filter(|i| {
            let s = &i["sum"];
            let (a, b) = (s["start"].as_f64(), s["end"].as_f64());
            matches!((a, b), (Some(a), Some(b)) if a >= from - 0.05 && b <= to + 0.05)
        })
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect();
    ensure!(
        !rates.is_empty(),
        "no iperf3 intervals inside {from}..{to} s from {ns}"
    );
    let dark = rates.iter().sum::<f64>() / rates.len() as f64 / 1e6;
    Ok((bps / 1e6, Some(dark)))
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
        let links: Vec<(usize, bond_lab::WanLink)> = lab
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
