//! Operator listings: a table for people, `--json` for programs.
//!
//! Every listing is one of `bond_api::reply`'s types: the agents' replies
//! (`status`, `peers`) pass through as they came (a newer agent's fields
//! too), and `links` and `flows`, read from the maps here, are built as
//! those types. docs/operator.md shows each shape.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context as _, Result, bail};
use bond_api::reply::{
    Counts, FlowRow, Flows, LinkCounters, Links, Peers, ServerLinkCounters, ServerLinks, Status,
    TerminalLinkCounters, TerminalLinks, WeightMode,
};
use bond_common::maps::{FLOW_CLOSING, LINK_V6, name};
use serde_json::Value;

use bond_datapath::{Maps, monotonic_ns};

/// Prints `v` as one JSON line.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

/// Counts by reason on one line (`none` when there are none).
fn tally(c: &Counts) -> String {
    let nz: Vec<String> = c
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if nz.is_empty() {
        "none".into()
    } else {
        nz.join(" ")
    }
}

/// `bond-ctl status`.
pub fn status(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let status: Status = serde_json::from_value(v.clone()).context("reading the agent's status")?;
    let (rejects, faults) = match &status {
        Status::Director(d) => {
            println!(
                "director {} (instance {}), up {}s, {}",
                d.address,
                d.instance,
                d.uptime_s,
                if d.registry {
                    "following the registry"
                } else {
                    "NOT reading the registry"
                }
            );
            println!(
                "{:<12} {:<16} {:<10} {:<18} {:<14} {:>11} {:>12}",
                "node", "address", "interface", "mac", "health", "communities", "packets"
            );
            for n in &d.nodes {
                let health = match n.rtt_us {
                    Some(us) if n.health == "up" => format!("up {:.1}ms", us as f64 / 1000.0),
                    _ => n.health.clone(),
                };
                println!(
                    "{:<12} {:<16} {:<10} {:<18} {:<14} {:>11} {:>12}",
                    n.name,
                    n.address,
                    n.interface.as_deref().unwrap_or("-"),
                    n.mac.as_deref().unwrap_or("unresolved"),
                    health,
                    n.communities,
                    n.packets
                );
            }
            println!(
                "communities steered {}, not steerable {}; nodes fenced {}; dropped: {}",
                d.steered,
                d.unsteered,
                d.fenced,
                tally(&d.drops)
            );
            return Ok(());
        }
        Status::Server(s) => {
            println!(
                "server {} (instance {}), up {}s{}",
                s.address,
                s.instance,
                s.uptime_s,
                if s.adopted {
                    ", adopted a running datapath"
                } else {
                    ""
                }
            );
            println!(
                "{:>9} {:>9} {:>6} {:>7}",
                "community", "terminals", "links", "flows"
            );
            for c in &s.communities {
                println!(
                    "{:>9} {:>9} {:>6} {:>7}",
                    c.id, c.terminals, c.links, c.flows
                );
            }
            println!("flows {}, free ports {}", s.flows, s.free_ports);
            println!(
                "NAT pool: {} address(es) from {}, blocks of {} ports: {} held by {} communities, {} free",
                s.nat.addresses,
                s.nat_address,
                s.nat.block,
                s.nat.blocks_held,
                s.nat.communities,
                s.nat.blocks_free
            );
            if s.nat.starved > 0 {
                println!(
                    "  {} communities have terminals on and no ports: the pool ran out (nat_addresses, nat_block)",
                    s.nat.starved
                );
            }
            (&s.rejects, &s.faults)
        }
        Status::Terminal(t) => {
            println!(
                "terminal {} (instance {}), community {}, server {}: {}{}",
                t.address,
                t.instance,
                t.community,
                t.server,
                if t.logged_on {
                    "logged on"
                } else {
                    "not logged on"
                },
                if t.draining { ", DRAINING" } else { "" }
            );
            println!("{} peer(s), announcing every {} ms", t.peers, t.announce_ms);
            println!(
                "{:>4} {:>10} {:>6} {:>10} {:>10} {:>7}",
                "link", "interface", "port", "up", "down", "active"
            );
            for l in &t.links {
                let w = |kbit: u32, mode: WeightMode| {
                    format!("{kbit}{}", if mode == WeightMode::Auto { "*" } else { "" })
                };
                println!(
                    "{:>4} {:>10} {:>6} {:>10} {:>10} {:>7}",
                    l.link,
                    l.interface,
                    l.port,
                    w(l.up, l.up_weight.mode),
                    w(l.down, l.down_weight.mode),
                    l.active
                );
            }
            println!("(* measured, kbit/s)");
            (&t.rejects, &t.faults)
        }
    };
    println!("control messages rejected: {}", tally(rejects));
    println!("failed steps survived: {}", tally(faults));
    Ok(())
}

/// `bond-ctl peers`.
pub fn peers(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    match serde_json::from_value(v.clone()).context("reading the agent's peers")? {
        Peers::Server { terminals } => {
            println!(
                "{:>9} {:>15} {:>6} {:>4} {:>21} {:>8} {:>6}",
                "community", "terminal", "missed", "link", "address", "down", "missed"
            );
            for t in terminals {
                if t.links.is_empty() {
                    println!("{:>9} {:>15} {:>6}", t.community, t.address, t.missed);
                }
                for l in &t.links {
                    println!(
                        "{:>9} {:>15} {:>6} {:>4} {:>21} {:>8} {:>6}",
                        t.community, t.address, t.missed, l.link, l.address, l.down, l.missed
                    );
                }
            }
        }
        Peers::Terminal { peers } => {
            println!(
                "{:>15} {:>4} {:>6} {:>6} {:>10} {:>10} {:>6}",
                "address", "link", "port", "missed", "up", "down", "in use"
            );
            for r in peers {
                println!(
                    "{:>15} {:>4} {:>6} {:>6} {:>10} {:>10} {:>6}{}",
                    r.address,
                    r.link,
                    r.port,
                    r.missed,
                    r.up,
                    r.down,
                    if r.in_use { "yes" } else { "no" },
                    if r.own { "  (this host)" } else { "" }
                );
            }
        }
    }
    Ok(())
}

fn counts(c: &[(&str, u64)]) -> Counts {
    c.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
}

/// `bond-ctl links`: read from the pinned maps.
pub fn links(maps: &Maps, json: bool) -> Result<()> {
    let report = links_report(maps)?;
    if json {
        return print_json(&report);
    }
    match &report {
        Links::Terminal(TerminalLinks { links, drops, .. }) => {
            println!(
                "{:>4} {:>10} {:>12} {:>10} {:>12} {:>9} {:>10} {:>10}",
                "link",
                "up_pkts",
                "up_bytes",
                "down_pkts",
                "down_bytes",
                "down_late",
                "relay_up",
                "relay_down"
            );
            for l in links {
                let c: &LinkCounters = &l.counters;
                println!(
                    "{:>4} {:>10} {:>12} {:>10} {:>12} {:>9} {:>10} {:>10}{}",
                    l.link,
                    c.up_pkts,
                    c.up_bytes,
                    c.down_pkts,
                    c.down_bytes,
                    c.down_late,
                    c.relay_up_pkts,
                    c.relay_down_pkts,
                    if l.active { "" } else { "  (not in use)" }
                );
            }
            println!("drops: {}", tally(drops));
        }
        Links::Server(ServerLinks {
            links,
            drops,
            events,
        }) => {
            println!(
                "{:>9} {:>4} {:>21} {:>10} {:>12} {:>10} {:>12}",
                "community", "link", "address", "up_pkts", "up_bytes", "down_pkts", "down_bytes"
            );
            for l in links {
                let c = &l.counters;
                println!(
                    "{:>9} {:>4} {:>21} {:>10} {:>12} {:>10} {:>12}",
                    l.community,
                    l.link,
                    l.address.to_string(),
                    c.up_pkts,
                    c.up_bytes,
                    c.down_pkts,
                    c.down_bytes
                );
            }
            println!("drops: {}", tally(drops));
            println!("events: {}", tally(events));
        }
    }
    Ok(())
}

/// Every link's counters and the drops, from the pinned maps: a
/// terminal's or the server's (they work while the agent is down).
pub fn links_report(maps: &Maps) -> Result<Links> {
    Ok(if maps.has(name::T_CONFIG) {
        Links::Terminal(TerminalLinks {
            logged_on: maps.terminal_config()?.token != 0,
            links: maps
                .terminal_link_stats()?
                .iter()
                .map(|(link, active, s)| TerminalLinkCounters {
                    link: *link,
                    active: *active,
                    counters: s.into(),
                })
                .collect(),
            drops: counts(&maps.terminal_drops()?),
        })
    } else if maps.has(name::S_CONFIG) {
        let mut idx = maps.server_link_index()?;
        idx.sort_by_key(|(k, _)| (k.community, k.link));
        let mut links = Vec::new();
        for (k, i) in idx {
            let l = maps.server_link(i)?;
            let ip = match l.flags & LINK_V6 {
                0 => IpAddr::from(Ipv4Addr::from(l.ip)),
                _ => maps.server_link6(i)?.into(),
            };
            links.push(ServerLinkCounters {
                community: k.community,
                link: k.link,
                address: SocketAddr::new(ip, l.port),
                counters: (&maps.server_link_stats(i)?).into(),
            });
        }
        Links::Server(ServerLinks {
            links,
            drops: counts(&maps.server_drops()?),
            events: counts(&maps.server_events()?),
        })
    } else {
        bail!(
            "no bond instance pinned at {} (is the agent running? `--instance`?)",
            maps.dir().display()
        )
    })
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

/// `bond-ctl flows`: the server's flow table, read from the pinned maps.
pub fn flows(maps: &Maps, json: bool) -> Result<()> {
    if !maps.has(name::S_FLOWS) {
        bail!(
            "no bond server pinned at {} (flows live on the server)",
            maps.dir().display()
        );
    }
    let now = monotonic_ns();
    let mut flows = maps.flows()?;
    flows.sort_by_key(|(k, f)| (k.community, k.origin, f.nat_port));
    let report = Flows {
        flows: flows
            .iter()
            .map(|(k, f)| FlowRow {
                community: k.community,
                origin: Ipv4Addr::from(k.origin),
                proto: proto_name(k.proto),
                port: k.port,
                nat_port: f.nat_port,
                up_pkts: f.up_pkts,
                up_bytes: f.up_bytes,
                down_pkts: f.down_pkts,
                down_bytes: f.down_bytes,
                idle_ms: now.saturating_sub(f.last_seen_ns) / 1_000_000,
                closing: f.state & FLOW_CLOSING != 0,
            })
            .collect(),
    };
    if json {
        return print_json(&report);
    }
    println!(
        "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}",
        "community", "origin", "proto", "port", "nat_port", "up_pkts", "down_pkts", "idle_ms"
    );
    for f in &report.flows {
        println!(
            "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}{}",
            f.community,
            f.origin,
            f.proto,
            f.port,
            f.nat_port,
            f.up_pkts,
            f.down_pkts,
            f.idle_ms,
            if f.closing { "  closing" } else { "" }
        );
    }
    println!("{} flow(s)", report.flows.len());
    Ok(())
}

/// `bond-ctl distribute`: the final report.
pub fn distribution(r: &bond_relay::main_server::FinalReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{} ({} bytes, {} chunks, root {}, {} {}): {} of {} done in {:.1}s, {} failed",
        r.file,
        r.size,
        r.chunks,
        &r.root[..16],
        r.mode.name(),
        r.fanout,
        r.done,
        r.targets.len(),
        r.ms as f64 / 1000.0,
        r.failed
    );
    println!(
        "{:<16} {:<7} {:>8} {:>8} {:>8}  {:<22} why",
        "target", "status", "ack ms", "first s", "done s", "source"
    );
    let secs = |v: Option<u64>| v.map_or("-".into(), |v| format!("{:.1}", v as f64 / 1000.0));
    for t in &r.targets {
        println!(
            "{:<16} {:<7} {:>8} {:>8} {:>8}  {:<22} {}",
            t.id,
            t.status,
            t.ack_ms.map_or("-".into(), |v| v.to_string()),
            secs(t.first_chunk_at_ms),
            secs(t.done_at_ms),
            t.source.as_deref().unwrap_or("-"),
            t.why.as_deref().unwrap_or("")
        );
    }
    for (relay, n) in &r.corrupt {
        println!("relay {relay} served {n} corrupt chunk(s): reported");
    }
    Ok(())
}

/// `bond-ctl terminals`: the network information database, ranked.
pub fn terminals(rows: &[bond_relay::db::TerminalRow], json: bool) -> Result<()> {
    if json {
        return print_json(&bond_relay::db::Terminals {
            terminals: rows.to_vec(),
        });
    }
    println!(
        "{:>4} {:<16} {:<22} {:>10} {:>10} {:>6} {:>6} {:>7}  last failure",
        "rank", "terminal", "endpoint", "kbit/s", "resp ms", "done", "failed", "corrupt"
    );
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for r in rows {
        println!(
            "{:>4} {:<16} {:<22} {:>10} {:>10} {:>6} {:>6} {:>7}  {}",
            r.rank,
            r.id,
            r.endpoint,
            opt(r.throughput_kbps.or(r.link_kbps)),
            opt(r.response_ms),
            r.transfers_done,
            r.transfers_failed,
            r.corrupt_served,
            r.last_failure.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// A progress line on stderr for long transfers (at most every 200 ms,
/// and only to a terminal).
pub fn progress_bar() -> impl FnMut(u64, Option<u64>) {
    use std::io::IsTerminal as _;
    let tty = std::io::stderr().is_terminal();
    let start = std::time::Instant::now();
    let mut last = start;
    move |got, total| {
        let now = std::time::Instant::now();
        let done = total == Some(got);
        if !tty || (now - last < std::time::Duration::from_millis(200) && !done) {
            return;
        }
        last = now;
        let rate = got as f64 / (now - start).as_secs_f64().max(1e-3) / 1e6;
        match total {
            Some(t) if t > 0 => eprint!(
                "\r{:>6.1} of {:.1} MB ({:>3}%) {rate:.1} MB/s ",
                got as f64 / 1e6,
                t as f64 / 1e6,
                got * 100 / t
            ),
            _ => eprint!("\r{:>6.1} MB {rate:.1} MB/s ", got as f64 / 1e6),
        }
        if done {
            eprintln!();
        }
    }
}

/// `bond-ctl fetch`: what came from where.
pub fn fetched(r: &bond_cache::fetch::FetchReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    println!(
        "{}: {} bytes in {:.2}s ({:.1} MB/s) from {} (found by {})",
        r.url,
        r.bytes,
        r.seconds,
        r.bytes as f64 / r.seconds.max(1e-6) / 1e6,
        r.source,
        r.found
    );
    Ok(())
}

/// `bond-ctl cache status`.
pub fn cache_status(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let s: bond_cache::Status =
        serde_json::from_value(v.clone()).context("reading the cache's status")?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "cache on {}: {} objects, {:.1} of {:.1} MB; referral server {}",
        s.endpoint,
        s.objects,
        mb(s.bytes),
        mb(s.max_bytes),
        match (s.referral_server, s.referral) {
            (true, _) => "here".to_string(),
            (false, Some(r)) => r.to_string(),
            (false, None) => "none".to_string(),
        }
    );
    let l = &s.load;
    println!(
        "uploads {} of {}, {} MB sent to peers, {} refused at the limit",
        l.uploads,
        l.max_uploads,
        mb(l.sent),
        l.refused
    );
    println!(
        "fetched: {} local, {} from peers ({:.1} MB), {} from the origin ({:.1} MB); {} corrupt caught, {} LAN queries",
        s.from_local,
        s.from_peers,
        mb(s.bytes_from_peers),
        s.from_origin,
        mb(s.bytes_from_origin),
        s.corrupt_caught,
        s.lan_queries
    );
    Ok(())
}

/// `bond-ctl cache table`.
pub fn cache_table(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let t: bond_cache::TableReport =
        serde_json::from_value(v.clone()).context("reading the referral server's table")?;
    for o in &t.objects {
        let obj = &o.object;
        println!(
            "{} ({} bytes, {})",
            obj.url,
            obj.size,
            &obj.hash[..16.min(obj.hash.len())]
        );
        for s in &o.sources {
            println!(
                "  {:<21} {:>8} MB/s  uploads {}/{}{}{}",
                s.endpoint,
                s.bps.map_or("-".into(), |b| format!("{:.1}", b / 1e6)),
                s.uploads,
                s.max_uploads,
                if s.demoted { "  demoted" } else { "" },
                if s.busy { "  busy" } else { "" },
            );
        }
    }
    Ok(())
}
