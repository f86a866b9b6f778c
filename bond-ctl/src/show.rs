//! Operator listings: a table for people, `--json` for programs.
//!
//! JSON shapes (stable; fields may be added, never renamed):
//! - `links` on a terminal: `{"role":"terminal","logged_on":true,
//!   "links":[{"link":1,"active":true,"up_pkts":..,
//!   "up_bytes":..,"down_pkts":..,"down_bytes":..,"relay_up_pkts":..,
//!   "relay_up_bytes":..,"relay_down_pkts":..,"relay_down_bytes":..}],
//!   "drops":{"<reason>":n,...}}`
//! - `links` on a server: as above with `"community"`, `"address"`, `"port"`
//!   per link, and `"events"`.
//! - `flows`: `{"flows":[{"community":1,"origin":"10.0.1.3","proto":"tcp",
//!   "port":40000,"nat_port":20000,"up_pkts":..,"up_bytes":..,"down_pkts":..,
//!   "down_bytes":..,"idle_ms":..}]}`

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use bond_common::maps::{LinkStats, name};
use serde_json::{Value, json};

use crate::datapath::Maps;

fn stats_json(s: &LinkStats) -> serde_json::Map<String, Value> {
    let v = json!({
        "up_pkts": s.up_pkts, "up_bytes": s.up_bytes,
        "down_pkts": s.down_pkts, "down_bytes": s.down_bytes,
        "relay_up_pkts": s.relay_up_pkts, "relay_up_bytes": s.relay_up_bytes,
        "relay_down_pkts": s.relay_down_pkts, "relay_down_bytes": s.relay_down_bytes,
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
                "{:>4} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}",
                "link", "up_pkts", "up_bytes", "down_pkts", "down_bytes", "relay_up", "relay_down"
            );
            for (id, active, s) in &links {
                println!(
                    "{:>4} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}{}",
                    id,
                    s.up_pkts,
                    s.up_bytes,
                    s.down_pkts,
                    s.down_bytes,
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
                })
            })
            .collect();
        println!("{}", json!({ "flows": v }));
    } else {
        println!(
            "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}",
            "community", "origin", "proto", "port", "nat_port", "up_pkts", "down_pkts", "idle_ms"
        );
        for (k, f) in &flows {
            println!(
                "{:>9} {:>15} {:>5} {:>6} {:>8} {:>10} {:>10} {:>9}",
                k.community,
                Ipv4Addr::from(k.origin),
                proto_name(k.proto),
                k.port,
                f.nat_port,
                f.up_pkts,
                f.down_pkts,
                now.saturating_sub(f.last_seen_ns) / 1_000_000
            );
        }
        println!("{} flow(s)", flows.len());
    }
    Ok(())
}

/// CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
