//! Operator listings: a table for people, `--json` for programs.
//!
//! JSON shapes (stable; fields may be added, never renamed):
//! - `links` on a terminal: `{"role":"terminal","logged_on":true,
//!   "links":[{"link":1,"active":true,"up_pkts":..,
//!   "up_bytes":..,"down_pkts":..,"down_bytes":..,"relay_up_pkts":..,
//!   "relay_up_bytes":..,"relay_down_pkts":..,"relay_down_bytes":..,
//!   "down_late":..}],"drops":{"<reason>":n,...}}` (`down_late`: packets
//!   for this host that came after one the server sent later: reordered)
//! - `links` on a server: as above with `"community"`, `"address"`, `"port"`
//!   per link, and `"events"`.
//! - `flows`: `{"flows":[{"community":1,"origin":"10.0.1.3","proto":"tcp",
//!   "port":40000,"nat_port":20000,"up_pkts":..,"up_bytes":..,"down_pkts":..,
//!   "down_bytes":..,"idle_ms":..,"closing":false}]}` (`closing`: a TCP
//!   flow that saw FIN or RST, on the short timeout)
//! - `peers` on a terminal: `{"ok":true,"peers":[{"address":"10.0.1.2",
//!   "link":2,"port":7702,"missed":0,"up":20,"down":20,"self":false,
//!   "in_use":true}]}`, one row per link (the seed's Table 1: LAN address,
//!   port, missed announces, weight per direction), this host's own links
//!   first with `"self":true`; a peer without links has one row with link 0.
//! - `peers` on a server: `{"ok":true,"terminals":[{"community":1,
//!   "address":"10.0.1.1","missed":0,"links":[{"link":1,
//!   "address":"198.51.100.130:7701","down":10,"missed":0}]}]}`
//! - `status`: see docs/operator.md; `role` tells which shape.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use bond_common::maps::{FLOW_CLOSING, LinkStats, name};
use serde_json::{Value, json};

use bond_datapath::{Maps, monotonic_ns};

/// `bond-ctl status`.
pub fn status(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let tally = |k: &str| {
        v[k].as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{k}={n}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    if v["role"] == "server" {
        println!(
            "server {} (instance {}), up {}s{}",
            v["address"].as_str().unwrap_or("?"),
            v["instance"].as_str().unwrap_or("?"),
            v["uptime_s"],
            if v["adopted"] == true {
                ", adopted a running datapath"
            } else {
                ""
            }
        );
        println!(
            "{:>9} {:>9} {:>6} {:>7}",
            "community", "terminals", "links", "flows"
        );
        for c in v["communities"].as_array().into_iter().flatten() {
            println!(
                "{:>9} {:>9} {:>6} {:>7}",
                c["id"], c["terminals"], c["links"], c["flows"]
            );
        }
        println!("flows {}, free ports {}", v["flows"], v["free_ports"]);
    } else {
        println!(
            "terminal {} (instance {}), community {}, server {}: {}{}",
            v["address"].as_str().unwrap_or("?"),
            v["instance"].as_str().unwrap_or("?"),
            v["community"],
            v["server"].as_str().unwrap_or("?"),
            if v["logged_on"] == true {
                "logged on"
            } else {
                "not logged on"
            },
            if v["draining"] == true {
                ", DRAINING"
            } else {
                ""
            }
        );
        println!(
            "{} peer(s), announcing every {} ms",
            v["peers"], v["announce_ms"]
        );
        println!(
            "{:>4} {:>10} {:>6} {:>10} {:>10} {:>7}",
            "link", "interface", "port", "up", "down", "active"
        );
        for l in v["links"].as_array().into_iter().flatten() {
            let w = |d: &str| {
                let mode = l[format!("{d}_weight")]["mode"].as_str().unwrap_or("?");
                format!("{}{}", l[d], if mode == "auto" { "*" } else { "" })
            };
            println!(
                "{:>4} {:>10} {:>6} {:>10} {:>10} {:>7}",
                l["link"],
                l["interface"].as_str().unwrap_or("?"),
                l["port"],
                w("up"),
                w("down"),
                l["active"]
            );
        }
        println!("(* measured, kbit/s)");
    }
    println!("control messages rejected: {}", tally("rejects"));
    println!("failed steps survived: {}", tally("faults"));
    Ok(())
}

/// `bond-ctl peers`.
pub fn peers(v: &Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    if let Some(terms) = v["terminals"].as_array() {
        println!(
            "{:>9} {:>15} {:>6} {:>4} {:>21} {:>8} {:>6}",
            "community", "terminal", "missed", "link", "address", "down", "missed"
        );
        for t in terms {
            let links = t["links"].as_array().cloned().unwrap_or_default();
            if links.is_empty() {
                println!(
                    "{:>9} {:>15} {:>6}",
                    t["community"],
                    t["address"].as_str().unwrap_or("?"),
                    t["missed"]
                );
            }
            for l in links {
                println!(
                    "{:>9} {:>15} {:>6} {:>4} {:>21} {:>8} {:>6}",
                    t["community"],
                    t["address"].as_str().unwrap_or("?"),
                    t["missed"],
                    l["link"],
                    l["address"].as_str().unwrap_or("?"),
                    l["down"],
                    l["missed"]
                );
            }
        }
        return Ok(());
    }
    println!(
        "{:>15} {:>4} {:>6} {:>6} {:>10} {:>10} {:>6}",
        "address", "link", "port", "missed", "up", "down", "in use"
    );
    for r in v["peers"].as_array().into_iter().flatten() {
        println!(
            "{:>15} {:>4} {:>6} {:>6} {:>10} {:>10} {:>6}{}",
            r["address"].as_str().unwrap_or("?"),
            r["link"],
            r["port"],
            r["missed"],
            r["up"],
            r["down"],
            if r["in_use"] == true { "yes" } else { "no" },
            if r["self"] == true {
                "  (this host)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn stats_json(s: &LinkStats) -> serde_json::Map<String, Value> {
    let v = json!({
        "up_pkts": s.up_pkts, "up_bytes": s.up_bytes,
        "down_pkts": s.down_pkts, "down_bytes": s.down_bytes,
        "relay_up_pkts": s.relay_up_pkts, "relay_up_bytes": s.relay_up_bytes,
        "relay_down_pkts": s.relay_down_pkts, "relay_down_bytes": s.relay_down_bytes,
        "down_late": s.down_late,
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("json! of an object literal"),
    }
}

fn counters_json(c: &[(&str, u64)]) -> Value {
    Value::Object(
        c.iter()
            .map(|(k, v)| ((*k).to_string(), json!(v)))
            .collect(),
    )
}

fn print_nonzero(title: &str, c: &[(&str, u64)]) {
    let nz: Vec<String> = c
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{title}: {}",
        if nz.is_empty() {
            "none".to_string()
        } else {
            nz.join(" ")
        }
    );
}

pub fn links(maps: &Maps, json: bool) -> Result<()> {
    if maps.has(name::T_CONFIG) {
        let links = maps.terminal_link_stats()?;
        let drops = maps.terminal_drops()?;
        if json {
            let l: Vec<Value> = links
                .iter()
                .map(|(id, active, s)| {
                    let mut m = stats_json(s);
                    m.insert("link".into(), json!(id));
                    m.insert("active".into(), json!(active));
                    Value::Object(m)
                })
                .collect();
            println!(
                "{}",
                json!({
                    "role": "terminal",
                    "logged_on": maps.terminal_config()?.token != 0,
                    "links": l,
                    "drops": counters_json(&drops),
                })
            );
        } else {
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
            for (id, active, s) in &links {
                println!(
                    "{:>4} {:>10} {:>12} {:>10} {:>12} {:>9} {:>10} {:>10}{}",
                    id,
                    s.up_pkts,
                    s.up_bytes,
                    s.down_pkts,
                    s.down_bytes,
                    s.down_late,
                    s.relay_up_pkts,
                    s.relay_down_pkts,
                    if *active { "" } else { "  (not in use)" }
                );
            }
            print_nonzero("drops", &drops);
        }
        return Ok(());
    }
    if maps.has(name::S_CONFIG) {
        let mut idx = maps.server_link_index()?;
        idx.sort_by_key(|(k, _)| (k.community, k.link));
        let mut rows = Vec::new();
        for (k, i) in idx {
            let l = maps.server_link(i)?;
            rows.push((
                k.community,
                k.link,
                Ipv4Addr::from(l.ip),
                l.port,
                maps.server_link_stats(i)?,
            ));
        }
        let drops = maps.server_drops()?;
        let events = maps.server_events()?;
        if json {
            let l: Vec<Value> = rows
                .iter()
                .map(|(c, id, ip, port, s)| {
                    let mut m = stats_json(s);
                    m.insert("community".into(), json!(c));
                    m.insert("link".into(), json!(id));
                    m.insert("address".into(), json!(ip.to_string()));
                    m.insert("port".into(), json!(port));
                    Value::Object(m)
                })
                .collect();
            println!(
                "{}",
                json!({"role": "server", "links": l, "drops": counters_json(&drops), "events": counters_json(&events)})
            );
        } else {
            println!(
                "{:>9} {:>4} {:>21} {:>10} {:>12} {:>10} {:>12}",
                "community", "link", "address", "up_pkts", "up_bytes", "down_pkts", "down_bytes"
            );
            for (c, id, ip, port, s) in &rows {
                println!(
                    "{:>9} {:>4} {:>21} {:>10} {:>12} {:>10} {:>12}",
                    c,
                    id,
                    format!("{ip}:{port}"),
                    s.up_pkts,
                    s.up_bytes,
                    s.down_pkts,
                    s.down_bytes
                );
            }
            print_nonzero("drops", &drops);
            print_nonzero("events", &events);
        }
        return Ok(());
    }
    bail!(
        "no bond instance pinned at {} (is the agent running? `--instance`?)",
        maps.dir().display()
    )
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        n => n.to_string(),
    }
}

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
    if json {
        let v: Vec<Value> = flows
            .iter()
            .map(|(k, f)| {
                json!({
                    "community": k.community, "origin": Ipv4Addr::from(k.origin).to_string(),
                    "proto": proto_name(k.proto), "port": k.port, "nat_port": f.nat_port,
                    "up_pkts": f.up_pkts, "up_bytes": f.up_bytes,
                    "down_pkts": f.down_pkts, "down_bytes": f.down_bytes,
                    "idle_ms": now.saturating_sub(f.last_seen_ns) / 1_000_000,
                    "closing": f.state & FLOW_CLOSING != 0,
                })
            })
            .collect();
        println!("{}", json!({ "flows": v }));
    } else {
        println!(
            "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}",
            "community", "origin", "proto", "port", "nat_port", "up_pkts", "down_pkts", "idle_ms"
        );
        let closing = |f: &bond_common::maps::Flow| {
            if f.state & FLOW_CLOSING != 0 {
                "  closing"
            } else {
                ""
            }
        };
        for (k, f) in &flows {
            println!(
                "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}{}",
                k.community,
                Ipv4Addr::from(k.origin),
                proto_name(k.proto),
                k.port,
                f.nat_port,
                f.up_pkts,
                f.down_pkts,
                now.saturating_sub(f.last_seen_ns) / 1_000_000,
                closing(f)
            );
        }
        println!("{} flow(s)", flows.len());
    }
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
        println!("{}", serde_json::json!({ "terminals": rows }));
        return Ok(());
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
pub fn cache_status(v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let mb = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / 1e6;
    println!(
        "cache on {}: {} objects, {:.1} of {:.1} MB; referral server {}",
        v["endpoint"].as_str().unwrap_or("?"),
        v["objects"],
        mb("bytes"),
        mb("max_bytes"),
        if v["referral_server"] == true {
            "here".to_string()
        } else {
            v["referral"].as_str().unwrap_or("none").to_string()
        }
    );
    let l = &v["load"];
    println!(
        "uploads {} of {}, {} MB sent to peers, {} refused at the limit",
        l["uploads"],
        l["max_uploads"],
        l["sent"].as_u64().unwrap_or(0) as f64 / 1e6,
        l["refused"]
    );
    println!(
        "fetched: {} local, {} from peers ({:.1} MB), {} from the origin ({:.1} MB); {} corrupt caught, {} LAN queries",
        v["from_local"],
        v["from_peers"],
        mb("bytes_from_peers"),
        v["from_origin"],
        mb("bytes_from_origin"),
        v["corrupt_caught"],
        v["lan_queries"]
    );
    Ok(())
}

/// `bond-ctl cache table`.
pub fn cache_table(v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{v}");
        return Ok(());
    }
    let empty = Vec::new();
    for o in v["objects"].as_array().unwrap_or(&empty) {
        let obj = &o["object"];
        println!(
            "{} ({} bytes, {})",
            obj["url"].as_str().unwrap_or("?"),
            obj["size"],
            &obj["hash"].as_str().unwrap_or("?")
                [..16.min(obj["hash"].as_str().unwrap_or("?").len())]
        );
        for s in o["sources"].as_array().unwrap_or(&empty) {
            println!(
                "  {:<21} {:>8} MB/s  uploads {}/{}{}{}",
                s["endpoint"].as_str().unwrap_or("?"),
                s["bps"]
                    .as_f64()
                    .map_or("-".into(), |b| format!("{:.1}", b / 1e6)),
                s["uploads"],
                s["max_uploads"],
                if s["demoted"] == true {
                    "  demoted"
                } else {
                    ""
                },
                if s["busy"] == true { "  busy" } else { "" },
            );
        }
    }
    Ok(())
}
