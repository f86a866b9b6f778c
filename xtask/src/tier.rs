//! `cargo xtask bench tier`: the ISP tier, in one run.
//!
//! - **Moves**: 100,000 communities placed over three nodes (equal
//!   weights, and one of double weight), one node lost: the share that
//!   moved against its 1/N (its weight's share), and the collateral moves
//!   (communities of the nodes still alive that moved: bond's placement is
//!   sticky, so none); beside it what plain modulo hashing would move.
//! - **Recovery**: Figure 1 behind a director with three nodes; the
//!   community's owner is killed (SIGKILL) right after a download: the
//!   time until the registry names another owner, and until every link of
//!   the terminal without links is in use again. Median over the runs.
//! - **Steering per core**: the director against the node's own program
//!   (bond server, up) and the kernel's forwarding + NAT, by the fastpath
//!   suite's harness.
//! - **Announce load**: 100,000 communities (6,000 with `--quick`), their
//!   ids spread over the 32 bits, registered over three nodes, a
//!   simulated terminal each logging on and announcing every second; each
//!   node agent's CPU. Twice: with the community key alone, and with
//!   terminal keys (each login and announce signed by the terminal's own
//!   key and checked by the node).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bond_lab::{COMMUNITY, Lab, TerminalSpec};
use bond_tier::owner::{Candidate, assign};

use crate::fastpath;

pub fn run(bond_ctl: &Path, quick: bool, runs: usize) -> Result<String> {
    let mut out = String::new();
    out.push_str(&moves());
    out.push_str(&recovery(bond_ctl, runs)?);
    out.push_str("\n### Steering per core\n\n");
    out.push_str(&fastpath::run_tier(quick)?);
    let n = if quick { 6_000 } else { 100_000 };
    let secs = if quick { 5 } else { 10 };
    let open = announce_load(bond_ctl, n, secs, false)?;
    let keyed = announce_load(bond_ctl, n, secs, true)?;
    let _ = write!(
        out,
        "\n### Announce load\n\n{}{}\nTerminal keys cost the nodes {:.2}x the CPU per message \
         of the community key alone ({:.1} against {:.1} µs): a node checks the \
         signature of each login and of each announce that changes something (35 µs), not of one \
         that repeats what it holds. Community ids are 32 bits on the wire (version 4); these \
         were spread over all of them, {} to {}.\n",
        open.text,
        keyed.text,
        keyed.per_message_us / open.per_message_us.max(0.001),
        keyed.per_message_us,
        open.per_message_us,
        community_id(1),
        community_id(n),
    );
    Ok(out)
}

const COMMUNITIES: u32 = 100_000;

fn moves() -> String {
    let mut out = String::from(
        "### Communities moved when a node is lost\n\n\
         | nodes (weights) | lost | its share | moved | collateral | modulo hashing would move |\n\
         |---|---|---|---|---|---|\n",
    );
    for weights in [[1u32, 1, 1], [1, 2, 1]] {
        let names = ["n1", "n2", "n3"];
        let all: Vec<Candidate> = names
            .iter()
            .zip(weights)
            .map(|(&name, weight)| Candidate {
                name,
                weight,
                draining: false,
            })
            .collect();
        let placed: BTreeMap<u32, String> =
            assign(0..COMMUNITIES, &all, &BTreeMap::new(), |_, _| false)
                .into_iter()
                .map(|(c, o)| (c, o.expect("placed").to_string()))
                .collect();
        let lost = "n2";
        let alive: Vec<Candidate> = all.iter().copied().filter(|n| n.name != lost).collect();
        let after = assign(0..COMMUNITIES, &alive, &placed, |_, _| false);
        let (mut moved, mut collateral) = (0u32, 0u32);
        for (c, o) in &after {
            if o.map(str::to_string) != Some(placed[c].clone()) {
                moved += 1;
                if placed[c] != lost {
                    collateral += 1;
                }
            }
        }
        let owned = placed.values().filter(|o| *o == lost).count();
        // Modulo hashing over the nodes left: every community whose
        // index changes moves.
        let modulo = (0..COMMUNITIES)
            .filter(|c| {
                let before = names[(*c % 3) as usize];
                let left = ["n1", "n3"][(*c % 2) as usize];
                before != left
            })
            .count();
        let pct = |n: usize| 100.0 * n as f64 / f64::from(COMMUNITIES);
        let _ = writeln!(
            out,
            "| 3 ({weights:?}) | {lost} | {:.1}% ({owned}) | {:.1}% ({moved}) | {collateral} | {:.1}% |",
            100.0 * f64::from(weights[1]) / f64::from(weights.iter().sum::<u32>()),
            pct(moved as usize),
            pct(modulo),
        );
    }
    out.push_str(
        "\n\"its share\": its weight's share, and the communities it owned; bond's \
         placement (weighted rendezvous, sticky) moves those and no others.\n",
    );
    out
}

/// One node death: (moved after, every link of t3 in use again after),
/// with the director's health checks after `health_ms` (0: off, the
/// lease alone).
fn recover_once(bond_ctl: &Path, health_ms: u32) -> Result<(Duration, Duration)> {
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl)?;
    lab.add_tier(3)?;
    lab.health_timeout_ms = Some(health_ms);
    lab.start_agents()?;
    let owner = lab.owner(COMMUNITY)?.context("no owner")?;
    let t3 = lab.terminals[2].ns.clone();
    let inst = lab.terminals[2].instance.clone();
    lab.serve_file("4m.bin", 4)?;
    lab.download(&t3, "http://203.0.113.2/4m.bin", "before.bin")?;
    lab.crash_node(owner)?;
    let killed = Instant::now();
    lab.wait_for("the community to move", Duration::from_secs(15), |lab| {
        Ok(lab.owner(COMMUNITY)?.is_some_and(|o| o != owner))
    })?;
    let m = killed.elapsed();
    lab.wait_for("t3's links in use", Duration::from_secs(15), |lab| {
        let rows = lab.peer_rows(&t3, &inst)?;
        let links: Vec<_> = rows.iter().filter(|r| r.link != 0).collect();
        Ok(links.len() == 3 && links.iter().all(|r| r.in_use))
    })?;
    let b = killed.elapsed();
    let (bytes, _, _) = lab.download(&t3, "http://203.0.113.2/4m.bin", "after.bin")?;
    ensure!(
        bytes == 4 << 20,
        "the download after the move got {bytes} bytes"
    );
    eprintln!(
        "tier: health checks {health_ms} ms: n{owner} died; moved after {m:?}, links in use after {b:?}"
    );
    Ok((m, b))
}

fn recovery(bond_ctl: &Path, runs: usize) -> Result<String> {
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut rows = Vec::new();
    let mut with = Duration::ZERO;
    for (health_ms, what) in [
        (300, "health checks (300 ms)"),
        (0, "the lease alone (2 s, etcd's least)"),
    ] {
        let (mut moved, mut back) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let (m, b) = recover_once(bond_ctl, health_ms)?;
            moved.push(m);
            back.push(b);
        }
        let (m, b) = (median(moved), median(back));
        if health_ms > 0 {
            with = b;
        }
        rows.push(format!(
            "| {what} | {:.2} s | {:.2} s |",
            m.as_secs_f64(),
            b.as_secs_f64()
        ));
    }
    Ok(format!(
        "\n### Recovery from a node's death\n\n\
         | the director finds out by | community owned by another node | every link of the \
         terminal without links in use again |\n|---|---|---|\n{}\n\n\
         Median of {runs} run(s) each. Figure 1 (links of 10, 20, 30 Mbit/s) behind a director \
         and three nodes, announces every second; the owner's link down and its agent SIGKILLed. \
         Target (issue 21): every link in use within 2 s with health checks: **{}**. The dead \
         node's flows are lost (their NAT was there); a download started after the move \
         completes.\n",
        rows.join("\n"),
        if with <= Duration::from_secs(2) {
            "met"
        } else {
            "not met"
        }
    ))
}

/// What the announce simulator saw.
struct Load {
    registered: Duration,
    placed: Duration,
    logged_on: usize,
    login: Duration,
    announces: u64,
    /// Logins sent again in the window: sessions that lapsed.
    relogins: u64,
    window: Duration,
    /// Messages sent to each node (by address) in the window.
    to_node: std::collections::HashMap<std::net::Ipv4Addr, u64>,
}

/// CPU seconds a process has used (user + system), from /proc.
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) in its parentheses.
    let rest = stat.rsplit_once(')').context("/proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// What one announce-load run found: its text, and the nodes' CPU per
/// community per second (µs, all nodes together).
struct AnnounceLoad {
    text: String,
    /// Node CPU per control message (announce or login), all nodes.
    per_message_us: f64,
}

/// Messages a second the one-threaded simulator sends steadily (it
/// measured 20,000 with the community key alone; signing halves that).
const SIMULATOR_RATE: u64 = 10_000;

/// The announce load: `n` communities registered over three nodes, one
/// terminal each with one link, logging on and then announcing, every
/// second if the simulator keeps up ([`SIMULATOR_RATE`]), else as often as
/// it does (the terminals announce that interval, so no session lapses),
/// for `secs` or two intervals; each node agent's CPU over that window,
/// per message and per community. `keyed`: the communities take
/// terminals by key, and each terminal signs.
fn announce_load(bond_ctl: &Path, n: u32, secs: u64, keyed: bool) -> Result<AnnounceLoad> {
    let every_s = u64::from(n).div_ceil(SIMULATOR_RATE).max(1);
    let secs = secs.max(2 * every_s);
    use bond_lab::site::{SITE_NET, Site};
    let mut site = Site::build(bond_ctl, 3, 3)?;
    site.start_etcd()?;
    for i in 1..=3 {
        site.start_node(i, "")?;
    }
    let start = Instant::now();
    while site.tier(&["nodes", "--json"])?.matches("\"name\"").count() < 3 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "nodes not registered"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pids: Vec<u32> = (1..=3)
        .map(|i| site.pid(&format!("n{i}")).context("node agent"))
        .collect::<Result<_>>()?;
    let etcd = bond_tier::Etcd::open(site.etcd.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let before = Instant::now();
    let cpu0 = std::sync::Mutex::new(Vec::new());
    let load = fastpath::netns::in_netns(&site.ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(simulate(&etcd, n, (secs, every_s), keyed, &|| {
            *cpu0.lock().unwrap() = pids.iter().map(|&p| cpu_s(p).unwrap_or(0.0)).collect();
            let _ = tx.send(Instant::now());
        }))
    })?;
    let cpu1: Vec<f64> = pids.iter().map(|&p| cpu_s(p).unwrap_or(0.0)).collect();
    let began = rx.recv().unwrap_or(before);
    let wall = began.elapsed().as_secs_f64().max(load.window.as_secs_f64());
    let cpu0 = cpu0.into_inner().unwrap();
    let mut rows = String::new();
    let per_message_us = |used: f64, msgs: u64| used / msgs.max(1) as f64 * 1e6;
    let mut rejects = Vec::new();
    let (mut all_used, mut all_msgs) = (0.0, 0u64);
    for (i, after) in cpu1.iter().enumerate() {
        let used = after - cpu0.get(i).copied().unwrap_or(0.0);
        let st: serde_json::Value =
            serde_json::from_str(&site.node_ctl(i + 1, &["status", "--json"])?)?;
        let owned = st["tier"]["owned"].as_u64().unwrap_or(0);
        let address: std::net::Ipv4Addr = format!("{SITE_NET}.{}", 11 + i).parse()?;
        let msgs = load.to_node.get(&address).copied().unwrap_or(0);
        (all_used, all_msgs) = (all_used + used, all_msgs + msgs);
        rejects.push(format!("n{}: {}", i + 1, st["rejects"]));
        let per = if owned > 0 {
            used / wall / owned as f64 * 1e6
        } else {
            0.0
        };
        let _ = writeln!(
            rows,
            "| n{} ({address}) | {owned} | {:.0} | {:.0}% | {:.1} µs | {per:.1} µs |",
            i + 1,
            msgs as f64 / wall,
            used / wall * 100.0,
            per_message_us(used, msgs)
        );
    }
    let all_per_message = per_message_us(all_used, all_msgs);
    let text = format!(
        "**{}.** {n} communities registered in {:.1} s (transactions of 100) and placed by the \
         controller {:.1} s later; one simulated terminal each, with one link, logging on ({} of \
         {n} logged on in {:.1} s) and then announcing every {every_s} s for {secs} s ({} \
         announces sent, {:.0} a second; {} logins again for sessions that lapsed). Each node \
         agent's CPU over that window:\n\n\
         | node | communities | messages a second | agent CPU (of one core) | per message | per \
         community per second |\n|---|---|---|---|---|---|\n{rows}\n\
         {:.1} µs per message in all: at one announce per community per second, a node's \
         {:.0} communities would take {:.2} cores. Control messages refused: {}.\n\n",
        if keyed {
            "Terminal keys (each login and announce signed by the terminal's own key)"
        } else {
            "The community key alone"
        },
        load.registered.as_secs_f64(),
        load.placed.as_secs_f64(),
        load.logged_on,
        load.login.as_secs_f64(),
        load.announces,
        load.announces as f64 / load.window.as_secs_f64().max(0.001),
        load.relogins,
        all_per_message,
        f64::from(n) / 3.0,
        all_per_message * f64::from(n) / 3.0 / 1e6,
        rejects.join("; ")
    );
    Ok(AnnounceLoad {
        text,
        per_message_us: all_per_message,
    })
}

/// The simulator, inside the site's operator seat: registers `n`
/// communities, logs one terminal of each on at its owner, announces for
/// `secs`; `window_starts` is called when the announcing begins.
async fn simulate(
    etcd: &bond_tier::Etcd,
    n: u32,
    (secs, every_s): (u64, u64),
    keyed: bool,
    window_starts: &(dyn Fn() + Sync),
) -> Result<Load> {
    use bond_lab::site::SITE_NET;
    use bond_proto::{
        CommunityKey,
        control::{Body, Counter, LinkAd, Msg, flags},
        identity::Identity,
    };
    use std::collections::HashMap;
    let key_of = |c: u32| format!("bench community key {c:06}");
    let mut reg = bond_tier::admin::Registry::connect(etcd, "/bond").await?;
    let t0 = Instant::now();
    let ids: Vec<u32> = (1..=n).map(community_id).collect();
    let all: Vec<(u32, String)> = ids.iter().map(|&c| (c, key_of(c))).collect();
    let origin = std::net::Ipv4Addr::new(10, 0, 1, 1);
    // Each community's terminal, its own key (from a seed: nothing random
    // in a bench), authorised before the community is registered.
    let identities: HashMap<u32, Identity> = match keyed {
        true => ids
            .iter()
            .map(|&c| {
                let mut seed = [0u8; 32];
                seed[..4].copy_from_slice(&c.to_be_bytes());
                (c, Identity::from_seed(seed))
            })
            .collect(),
        false => HashMap::new(),
    };
    if keyed {
        let list: Vec<_> = ids
            .iter()
            .map(|&c| (c, origin, identities[&c].public()))
            .collect();
        reg.authorize_many(&list).await?;
    }
    reg.add_communities(&all, keyed).await?;
    let registered = t0.elapsed();
    let t1 = Instant::now();
    let owners = loop {
        let v = reg.view().await?;
        if v.owners.len() as u32 == n {
            break v
                .owners
                .iter()
                .map(|(&c, o)| (c, v.nodes.get(o).map(|r| r.address)))
                .collect::<HashMap<u32, Option<std::net::Ipv4Addr>>>();
        }
        ensure!(
            t1.elapsed() < Duration::from_secs(120),
            "{} of {n} placed after 120 s",
            v.owners.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let placed = t1.elapsed();
    let keys: HashMap<u32, CommunityKey> = ids
        .iter()
        .map(|&c| (c, CommunityKey::new(key_of(c))))
        .collect();
    let sock = tokio::net::UdpSocket::bind((format!("{SITE_NET}.254").as_str(), 0)).await?;
    let port = sock.local_addr()?.port();
    let mut counter = Counter::new();
    let mut tokens: HashMap<u32, u64> = HashMap::new();
    let msg = |c: u32, token: u64, counter: &mut Counter, body: Body| Msg {
        community: c,
        origin,
        link: 1,
        flags: flags::VIA_LINK,
        token,
        time_ms: bond_proto::now_ms(),
        counter: counter.bump(),
        body,
    };
    let to = |c: u32| -> Option<std::net::SocketAddr> {
        owners
            .get(&c)
            .copied()
            .flatten()
            .map(|a| std::net::SocketAddr::from((a, bond_config::DEFAULT_PORT)))
    };
    // Logins, paced, with answers read as they come; those unanswered
    // are asked again.
    let t2 = Instant::now();
    let mut buf = vec![0u8; 2048];
    // Until every one is on (the nodes may still be taking in the
    // registry), at most a minute.
    while t2.elapsed() < Duration::from_secs(60) {
        let missing: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|c| !tokens.contains_key(c))
            .collect();
        if missing.is_empty() {
            break;
        }
        for chunk in missing.chunks(50) {
            for &c in chunk {
                let Some(dst) = to(c) else { continue };
                let m = msg(c, 0, &mut counter, Body::Login { exchange: None });
                let id = identities.get(&c);
                let _ = sock.send_to(&m.encode_as(&keys[&c], id), dst).await;
            }
            read_replies(
                &sock,
                &mut buf,
                &keys,
                &mut tokens,
                Duration::from_millis(2),
            )
            .await;
        }
        read_replies(
            &sock,
            &mut buf,
            &keys,
            &mut tokens,
            Duration::from_millis(1500),
        )
        .await;
    }
    let login = t2.elapsed();
    let logged_on = tokens.len();
    let link = LinkAd {
        id: 1,
        port,
        up: 10_000,
        down: 10_000,
        mtu: 1500,
        rtt_us: 0,
        dark: false,
    };
    window_starts();
    let t3 = Instant::now();
    let (mut announces, mut relogins) = (0u64, 0u64);
    let mut to_node: HashMap<std::net::Ipv4Addr, u64> = HashMap::new();
    let sessions: Vec<u32> = tokens.keys().copied().collect();
    // Each second, the terminals whose turn it is: all of them when
    // announcing every second, a fifth when every five.
    let every = every_s.max(1) as usize;
    for s in 0..secs {
        let second = t3 + Duration::from_secs(s);
        let turn: Vec<u32> = sessions
            .iter()
            .copied()
            .skip(s as usize % every)
            .step_by(every)
            .collect();
        // Spread over the second, as terminals' clocks spread them.
        for (k, chunk) in turn.chunks(100).enumerate() {
            let at = second + Duration::from_secs(1) * (k * 100) as u32 / turn.len().max(1) as u32;
            tokio::time::sleep_until(at.into()).await;
            for &c in chunk {
                let Some(dst) = to(c) else {
                    continue;
                };
                if let std::net::SocketAddr::V4(a) = dst {
                    *to_node.entry(*a.ip()).or_default() += 1;
                }
                let m = match tokens.get(&c) {
                    Some(&token) => {
                        let body = Body::Announce {
                            interval_ms: every_s as u32 * 1000,
                            links: vec![link],
                        };
                        announces += 1;
                        msg(c, token, &mut counter, body)
                    }
                    None => {
                        relogins += 1;
                        msg(c, 0, &mut counter, Body::Login { exchange: None })
                    }
                };
                let _ = sock
                    .send_to(&m.encode_as(&keys[&c], identities.get(&c)), dst)
                    .await;
            }
            read_replies(&sock, &mut buf, &keys, &mut tokens, Duration::ZERO).await;
        }
    }
    Ok(Load {
        registered,
        placed,
        logged_on,
        login,
        announces,
        relogins,
        window: t3.elapsed(),
        to_node,
    })
}

/// Community `i`'s id (1-based): spread over the whole 32 bits, the
/// 100,000th near 2^32, as an ISP's ids may be.
fn community_id(i: u32) -> u32 {
    i * 42_949
}

/// Reads the replies that come within `wait` (at least those already
/// queued), keeping each login's token.
async fn read_replies(
    sock: &tokio::net::UdpSocket,
    buf: &mut [u8],
    keys: &std::collections::HashMap<u32, bond_proto::CommunityKey>,
    tokens: &mut std::collections::HashMap<u32, u64>,
    wait: Duration,
) {
    use bond_proto::control::{Body, Msg, Reply};
    let until = tokio::time::Instant::now() + wait;
    loop {
        let got = match sock.try_recv_from(buf) {
            Ok((len, _)) => Some(len),
            Err(_) if tokio::time::Instant::now() >= until => return,
            Err(_) => match tokio::time::timeout_at(until, sock.readable()).await {
                Ok(_) => None,
                Err(_) => return,
            },
        };
        let Some(len) = got else { continue };
        match Msg::decode(&buf[..len], |c| keys.get(&c)).map(|m| (m.community, m.body)) {
            Ok((
                c,
                Body::LoginReply {
                    reply: Reply::Ok { token, .. },
                    ..
                },
            )) => {
                tokens.insert(c, token);
            }
            // The session lapsed (announces late): a terminal logs on
            // again at once.
            Ok((
                c,
                Body::LoginReply {
                    reply: Reply::NeedLogin,
                    ..
                },
            )) => {
                tokens.remove(&c);
            }
            _ => {}
        }
    }
}
