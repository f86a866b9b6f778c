//! `cargo xtask bench cache`: a community fetching a Zipf-distributed set
//! of objects from an origin behind its one slow link, with the peer cache
//! and referral, against the same requests with no sharing (every
//! terminal straight to the origin, as without bond); and a cached 10 MiB
//! object fetched through the cache against a plain LAN transfer of the
//! same bytes from the same peer.
//!
//! Every terminal's LAN upload is limited (tbf) so that a LAN transfer
//! takes a time worth comparing; t1 is the referral server and fetches
//! too. A request is a *repeat* if another request for the same object
//! had finished before it began: those are what the community can serve.

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bond_lab::{Lab, TerminalSpec};

struct Setup {
    terminals: usize,
    /// Requests each terminal makes, one after another.
    requests: usize,
    objects: usize,
    /// The origin link and every LAN upload, Mbit/s.
    origin_mbit: u32,
    lan_mbit: u32,
    /// The large object's size (MiB) and how many fetch it.
    big_mib: usize,
    big_fetches: usize,
}

const ORIGIN: &str = "http://203.0.113.2";

/// One request as it went.
#[derive(Clone, Debug, serde::Serialize)]
struct Done {
    terminal: usize,
    object: usize,
    start_s: f64,
    end_s: f64,
    /// origin, local or `peer ADDRESS`.
    source: String,
}

pub fn run(bond_ctl: &Path, quick: bool, out: &Path) -> Result<String> {
    let s = if quick {
        Setup {
            terminals: 6,
            requests: 4,
            objects: 8,
            origin_mbit: 20,
            lan_mbit: 100,
            big_mib: 4,
            big_fetches: 1,
        }
    } else {
        Setup {
            terminals: 10,
            requests: 10,
            objects: 20,
            origin_mbit: 10,
            lan_mbit: 100,
            big_mib: 10,
            big_fetches: 3,
        }
    };
    let plan = zipf_plan(&s, 1.0, 0x5eed);
    let mut t = String::new();
    writeln!(
        t,
        "{} terminals, {} requests each, one at a time, for {} objects of 1-2 MiB \
         (Zipf, s = 1); the origin behind one {} Mbit/s link; LAN uploads {} Mbit/s.\n",
        s.terminals, s.requests, s.objects, s.origin_mbit, s.lan_mbit
    )?;
    writeln!(
        t,
        "| mode | origin sent | of all bytes asked | repeat requests | repeats from a peer | repeats from the terminal's own copy | repeats from the origin | median fetch | wall time |"
    )?;
    writeln!(t, "|---|---|---|---|---|---|---|---|---|")?;
    let mut results = serde_json::Map::new();
    for shared in [false, true] {
        let name = if shared {
            "peer cache + referral"
        } else {
            "no sharing (origin)"
        };
        eprintln!("cache: {name}");
        let mut lab = community(bond_ctl, &s, shared)?;
        let sizes: Vec<u64> = (0..s.objects)
            .map(|k| {
                let p = lab.serve_file(&format!("o{k}.bin"), 1 + k % 2)?;
                Ok(std::fs::metadata(p)?.len())
            })
            .collect::<Result<_>>()?;
        let t0 = Instant::now();
        let done = run_plan(&lab, &plan, shared)?;
        let wall = t0.elapsed().as_secs_f64();
        let asked: u64 = done.iter().map(|d| sizes[d.object]).sum();
        let origin: u64 = done
            .iter()
            .filter(|d| d.source == "origin")
            .map(|d| sizes[d.object])
            .sum();
        let repeats: Vec<&Done> = done
            .iter()
            .filter(|d| {
                done.iter()
                    .any(|e| e.object == d.object && e.end_s < d.start_s)
            })
            .collect();
        // Where each repeat came from: a peer is what the community shared;
        // a terminal's own copy is its plain HTTP cache, no sharing.
        let from = |pick: fn(&str) -> bool| repeats.iter().filter(|d| pick(&d.source)).count();
        let peers = from(|s| s.starts_with("peer "));
        let own = from(|s| s == "local");
        let from_origin = from(|s| s == "origin");
        let pct = |n: usize| 100.0 * n as f64 / repeats.len().max(1) as f64;
        let mut secs: Vec<f64> = done.iter().map(|d| d.end_s - d.start_s).collect();
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        writeln!(
            t,
            "| {name} | {:.1} MB | {:.0}% | {} | {peers} ({:.0}%) | {own} ({:.0}%) | {from_origin} ({:.0}%) | {median:.2} s | {wall:.1} s |",
            origin as f64 / 1e6,
            100.0 * origin as f64 / asked as f64,
            repeats.len(),
            pct(peers),
            pct(own),
            pct(from_origin),
        )?;
        results.insert(
            if shared { "shared" } else { "direct" }.into(),
            serde_json::json!({ "requests": done, "origin_bytes": origin, "asked_bytes": asked,
                "repeats": repeats.len(), "repeats_from_peers": peers, "repeats_from_own_copy": own,
                "repeats_from_origin": from_origin, "median_s": median, "wall_s": wall }),
        );
        if shared {
            let big = big_object(&mut lab, &s)?;
            writeln!(
                t,
                "\nA cached {} MiB object, fetched by {} terminals with `bond-ctl fetch` (referral, \
                 probes, verification, the proxy): median {:.2} s; the same bytes from the same \
                 peer by a plain HTTP GET (the LAN transfer): median {:.2} s; ratio {:.2}.",
                s.big_mib,
                s.big_fetches,
                big.0,
                big.1,
                big.0 / big.1
            )?;
            results.insert(
                "big".into(),
                serde_json::json!({ "mib": s.big_mib, "fetch_s": big.0, "lan_s": big.1 }),
            );
        }
    }
    std::fs::write(
        out.join("cache.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    Ok(t)
}

/// Each terminal's requests: object numbers drawn from Zipf(`s_exp`) over
/// the objects, from a fixed seed (the same plan for both modes).
fn zipf_plan(s: &Setup, s_exp: f64, seed: u64) -> Vec<Vec<usize>> {
    let weights: Vec<f64> = (1..=s.objects).map(|k| (k as f64).powf(-s_exp)).collect();
    let total: f64 = weights.iter().sum();
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..s.terminals)
        .map(|_| {
            (0..s.requests)
                .map(|_| {
                    let mut u = next() * total;
                    weights
                        .iter()
                        .position(|w| {
                            u -= w;
                            u <= 0.0
                        })
                        .unwrap_or(s.objects - 1)
                })
                .collect()
        })
        .collect()
}

/// A community: the last terminal has the WAN link; with `shared`, every
/// terminal runs the cache and t1 the referral server.
fn community(bond_ctl: &Path, s: &Setup, shared: bool) -> Result<Lab> {
    let mut spec = vec![TerminalSpec { links: vec![] }; s.terminals];
    spec[s.terminals - 1].links = vec![s.origin_mbit];
    let mut lab = Lab::build(&spec, bond_ctl)?;
    lab.cache = shared;
    for i in 0..s.terminals {
        lab.limit_upload(i, s.lan_mbit)?;
    }
    lab.start_agents()?;
    Ok(lab)
}

fn config(lab: &Lab, i: usize) -> String {
    lab.dir
        .join(format!("t{}.toml", i + 1))
        .to_string_lossy()
        .into_owned()
}

/// `bond-ctl fetch` on terminal `i`: (seconds, source).
fn fetch(lab: &Lab, i: usize, url: &str) -> Result<(f64, String)> {
    let out = lab.dir.join(format!("t{}-out", i + 1));
    let json = lab.exec(
        &lab.terminals[i].ns,
        &lab.bond_ctl.to_string_lossy(),
        &[
            "fetch",
            url,
            "-o",
            out.to_str().context("path")?,
            "--config",
            &config(lab, i),
            "--json",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(json.trim())?;
    Ok((
        v["seconds"].as_f64().context("seconds")?,
        v["source"].as_str().context("source")?.to_string(),
    ))
}

/// Every terminal runs its requests one after another, all terminals at
/// once.
fn run_plan(lab: &Lab, plan: &[Vec<usize>], shared: bool) -> Result<Vec<Done>> {
    let t0 = Instant::now();
    let per: Vec<Result<Vec<Done>>> = std::thread::scope(|sc| {
        let handles: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(i, reqs)| {
                sc.spawn(move || {
                    let mut v = Vec::new();
                    for &k in reqs {
                        let url = format!("{ORIGIN}/o{k}.bin");
                        let start_s = t0.elapsed().as_secs_f64();
                        let source = if shared {
                            fetch(lab, i, &url)?.1
                        } else {
                            let out = lab.dir.join(format!("t{}-out", i + 1));
                            lab.exec(
                                &lab.terminals[i].ns,
                                "curl",
                                &["-sSf", "-o", out.to_str().context("path")?, &url],
                            )?;
                            "origin".to_string()
                        };
                        v.push(Done {
                            terminal: i + 1,
                            object: k,
                            start_s,
                            end_s: t0.elapsed().as_secs_f64(),
                            source,
                        });
                    }
                    Ok(v)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });
    let mut all = Vec::new();
    for p in per {
        all.extend(p?);
    }
    all.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    Ok(all)
}

/// The large object: t2 fetches it from the origin; then terminals
/// t3, t4, ... each time a plain GET of it from t2's cache service (the
/// LAN transfer), then fetch it with `bond-ctl fetch`. Medians (fetch,
/// LAN) in seconds.
fn big_object(lab: &mut Lab, s: &Setup) -> Result<(f64, f64)> {
    lab.serve_file("big.bin", s.big_mib)?;
    let url = format!("{ORIGIN}/big.bin");
    let (_, source) = fetch(lab, 1, &url)?;
    ensure!(source == "origin", "t2 got big.bin from {source}");
    // The referral server hears of it, and gives its hash.
    let t1 = lab.terminals[0].ns.clone();
    let bin = lab.bond_ctl.to_string_lossy().into_owned();
    let start = Instant::now();
    let hash = loop {
        let out = lab.exec(
            &t1,
            &bin,
            &["cache", "table", "--config", &config(lab, 0), "--json"],
        )?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let h = v["objects"].as_array().and_then(|a| {
            a.iter()
                .find(|o| o["object"]["url"] == url.as_str())
                .and_then(|o| o["object"]["hash"].as_str().map(str::to_string))
        });
        if let Some(h) = h {
            break h;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "big.bin never listed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let t2 = lab.terminals[1].lan_ip;
    let (mut fetched, mut lan) = (Vec::new(), Vec::new());
    for j in 0..s.big_fetches {
        let i = 2 + j;
        let out = lab.exec(
            &lab.terminals[i].ns,
            "curl",
            &[
                "-sSf",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total}",
                &format!("http://{t2}:7801/cache/obj/{hash}"),
            ],
        )?;
        lan.push(out.trim().parse::<f64>().context("curl time")?);
        let (secs, source) = fetch(lab, i, &url)?;
        ensure!(
            source.starts_with("peer "),
            "t{} got big.bin from {source}",
            i + 1
        );
        fetched.push(secs);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(&mut fetched), median(&mut lan)))
}
