//! Real uplinks come and go: a line loses its carrier, a USB modem is
//! unplugged and plugged back in, a lease renews with a new address. The
//! link's owner follows each from rtnetlink's events, with traffic
//! running and no restart (`bond_agent::linkwatch`).
//!
//! Run one at a time (`--test-threads=1`): they time how soon counters
//! stop and start.

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

mod common;
use common::bond_ctl;

use bond_api::reply::OwnLink;
use bond_datapath::{DEFAULT_BPFFS, Maps, pin_dir};
use bond_lab::{Lab, TerminalSpec};

use common::last_changes;

/// The link every test takes away: t2's second (wan1), 30 Mbit/s.
const LINK: u8 = 3;

/// The status row of t2's link [`LINK`].
fn own_link(lab: &Lab) -> OwnLink {
    let (ns, inst) = (&lab.terminals[1].ns, &lab.terminals[1].instance);
    let st = lab.terminal_status(ns, inst).expect("t2 answers");
    st.links
        .iter()
        .find(|l| l.link == LINK)
        .cloned()
        .unwrap_or_else(|| panic!("no link {LINK} in t2's status: {st:?}"))
}

/// An upload and a download from t3 (no link of its own, so every packet
/// goes over a peer's link), and the two senders' counters for link 3:
/// t3's upstream, the server's downstream.
struct Traffic {
    lab: Lab,
    origin: Maps,
    server: Maps,
}

impl Traffic {
    /// Starts the transfers (10 s each) and waits until link 3 carries
    /// both ways.
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    /// As [`Self::start`], with `prepare` run on the lab before the agents
    /// start.
    fn start_with(prepare: impl FnOnce(&mut Lab)) -> Self {
        let t = Self::launch(false, prepare);
        t.carries_within("before", Duration::from_secs(1));
        t
    }

    /// Starts the agents (with link 3's modem `unplugged` first: then the
    /// community is formed once the server has the other two links) and
    /// the transfers.
    fn launch(unplugged: bool, prepare: impl FnOnce(&mut Lab)) -> Self {
        let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
        prepare(&mut lab);
        if unplugged {
            lab.unplug(LINK).unwrap();
            lab.start_server().unwrap();
            for i in 0..lab.terminals.len() {
                lab.start_terminal(i).unwrap();
            }
            let start = Instant::now();
            let formed = |lab: &Lab| {
                let n = lab.server_links().ok().map(|v| v.links.len());
                n == Some(2)
                    && lab.terminals.iter().all(|t| {
                        lab.terminal_links(&t.ns, &t.instance)
                            .is_ok_and(|v| v.logged_on)
                    })
            };
            while !formed(&lab) {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "no community without link 3 after 20 s:\n{}",
                    lab.log("agent-t2")
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        } else {
            lab.start_agents().expect("start agents");
        }
        lab.start_iperf().expect("iperf3 server");
        let bpffs = Path::new(DEFAULT_BPFFS);
        let origin = Maps::new(pin_dir(bpffs, &lab.terminals[2].instance));
        let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
        let t3 = lab.terminals[2].ns.clone();
        lab.upload_and_download(&t3, &["-t", "10", "-J"]).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        Self {
            lab,
            origin,
            server,
        }
    }

    fn counts(&self) -> [u64; 2] {
        let up = self
            .origin
            .terminal_link_stats()
            .unwrap()
            .into_iter()
            .find(|s| s.0 == LINK)
            .map_or(0, |s| s.2.up_pkts);
        // The server's index for the link (none while it never had it).
        let down = self
            .server
            .server_link_index()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k.link == LINK)
            .map_or(0, |(_, idx)| {
                self.server.server_link_stats(idx).unwrap().down_pkts
            });
        [up, down]
    }

    /// Both senders stop sending on link 3 within `limit`, and t2 has it
    /// out of use.
    fn stops_within(&self, what: &str, limit: Duration) {
        let cut = Instant::now();
        let [up, down] = last_changes(|| self.counts(), limit + Duration::from_secs(1));
        let (up, down) = (up - cut, down - cut);
        eprintln!("{what}: out of t3's schedule after {up:?}, the server's after {down:?}");
        assert!(own_link(&self.lab).dark, "{what}: t2 still uses it");
        assert!(
            up <= limit && down <= limit,
            "{what}: still sent on after {up:?} (t3), {down:?} (server)"
        );
    }

    /// Both senders send on link 3 within `limit`.
    fn carries_within(&self, what: &str, limit: Duration) {
        let start = Instant::now();
        let first = self.counts();
        let mut at = [None; 2];
        loop {
            let now = self.counts();
            for k in 0..2 {
                if at[k].is_none() && now[k] > first[k] {
                    at[k] = Some(start.elapsed());
                }
            }
            if let [Some(up), Some(down)] = at {
                eprintln!("{what}: link {LINK} carries up after {up:?}, down after {down:?}");
                return;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: link {LINK} not in both schedules after {limit:?} (up {} -> {}, down {} -> {}): {:?}\n{}",
                first[0],
                now[0],
                first[1],
                now[1],
                own_link(&self.lab),
                self.lab.log("agent-t2")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Where each link stands, in a few lines (what a failure shows
    /// first): packets per link as t3 sent them up, t2 relayed them each
    /// way and the server sent them down; each sender's feedback (links
    /// left out for silence among it) and t3's playout.
    fn state(&self) -> String {
        let up: Vec<(u8, u64)> = (self.origin.terminal_link_stats().ok())
            .into_iter()
            .flatten()
            .map(|(id, _, s)| (id, s.up_pkts))
            .collect();
        let down: Vec<(u8, u64)> = (self.server.server_link_index().ok())
            .into_iter()
            .flatten()
            .filter_map(|(k, idx)| {
                Some((k.link, self.server.server_link_stats(idx).ok()?.down_pkts))
            })
            .collect();
        let (ns2, inst2) = self.lab.terminal_agent(1);
        let relayed: Vec<(u8, u64, u64)> = (self.lab.terminal_links(&ns2, &inst2).ok())
            .into_iter()
            .flat_map(|l| l.links)
            .map(|l| (l.link, l.counters.relay_up_pkts, l.counters.relay_down_pkts))
            .collect();
        let (ns3, inst3) = self.lab.terminal_agent(2);
        let t3 = self.lab.terminal_status(&ns3, &inst3);
        let srv = self.lab.server_status();
        format!(
            "t3 sent up (link, packets): {up:?}; the server sent down: {down:?}; \
             t2 relayed (link, up, down): {relayed:?}\n\
             t3's feedback: {:?}; playout: {:?}; schedule: {:?}\nthe server's feedback: {:?}",
            t3.as_ref().map(|s| s.feedback.counts),
            t3.as_ref().map(|s| s.playout),
            t3.as_ref().map(|s| s.schedule.clone()),
            srv.map(|s| s.feedback.counts),
        )
    }

    /// Both transfers ran to the end at a useful rate, and t2's agent
    /// followed without a restart.
    fn finish(mut self, what: &str) -> Lab {
        assert!(!own_link(&self.lab).dark, "{what}");
        for name in ["upload", "download"] {
            let log = match self.lab.wait_child(name, Duration::from_secs(30)) {
                Ok(log) => log,
                // A transfer that never ends (seen once in CI after a
                // replug): where its TCP stands, what each agent's
                // datapath counted, what the agents said.
                Err(e) => {
                    let t3 = self.lab.terminals[2].ns.clone();
                    let ss = self.lab.exec(&t3, "ss", &["-tin"]).unwrap_or_default();
                    panic!(
                        "{what}: {name}: {e:#}\n{}\nt3's sockets:\n{ss}\nt2:\n{}\nt3:\n{}\nserver:\n{}",
                        self.state(),
                        log_tail(&self.lab, "agent-t2"),
                        log_tail(&self.lab, "agent-t3"),
                        log_tail(&self.lab, "agent-srv")
                    );
                }
            };
            let v: serde_json::Value = serde_json::from_str(&log).expect(&log);
            let mbit = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or_else(|| panic!("{name}: {log}"))
                / 1e6;
            eprintln!("{what}: {name} {mbit:.1} Mbit/s");
            if mbit <= 10.0 {
                // What a rare stall looked like: each second's bytes and
                // retransmissions, and what the agents said meanwhile.
                let intervals: Vec<String> = v["intervals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|i| {
                        format!(
                            "{:.0}s {}B rx{}",
                            i["sum"]["end"].as_f64().unwrap_or(0.0),
                            i["sum"]["bytes"],
                            i["sum"]["retransmits"]
                        )
                    })
                    .collect();
                panic!(
                    "{what}: the {name} kept only {mbit:.1} Mbit/s\nintervals: {intervals:?}\n{}\n\
                     t2:\n{}\nserver:\n{}",
                    self.state(),
                    log_tail(&self.lab, "agent-t2"),
                    log_tail(&self.lab, "agent-srv")
                );
            }
        }
        let log = self.lab.log("agent-t2");
        assert_eq!(
            log.matches(" up: community").count(),
            1,
            "{what}: t2's agent started more than once:\n{log}"
        );
        self.lab
    }
}

/// The last 25 lines of a child's log (what a failure shows).
fn log_tail(lab: &Lab, name: &str) -> String {
    let log = lab.log(name);
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// The modem's side of link 3 goes down (the line lost sync) and up
/// again: out of both schedules and back in within 1 s each (measured:
/// out in under 45 ms, back in 48-66 ms: the agent resolves the next hop
/// afresh, where the kernel would retry its half-done resolution only
/// after 1 s).
#[test]
fn a_link_that_loses_its_carrier_leaves_at_once_and_returns_with_it() {
    let t = Traffic::start();
    t.lab.set_carrier(LINK, false).unwrap();
    t.stops_within("carrier lost", Duration::from_secs(1));
    assert!(!own_link(&t.lab).carrier);
    t.lab.set_carrier(LINK, true).unwrap();
    t.carries_within("carrier back", Duration::from_secs(1));
    assert!(own_link(&t.finish("carrier")).carrier);
}

/// Link 3's interface is removed (an unplugged modem) and comes back with
/// the same name and a new index: the program, the route and the socket
/// go on the new one. Out within 1 s, back within 1 s (measured: 23-120 ms).
#[test]
fn an_unplugged_modem_is_taken_back_when_it_returns() {
    let t = Traffic::start();
    let index = |lab: &Lab| {
        let out = lab.ip(&lab.terminals[1].ns, "-o link show wan1").unwrap();
        out.split(':')
            .next()
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let before = index(&t.lab);
    t.lab.unplug(LINK).unwrap();
    t.stops_within("unplugged", Duration::from_secs(1));
    t.lab.plug(LINK).unwrap();
    t.carries_within("plugged in", Duration::from_secs(1));
    assert_ne!(index(&t.lab), before, "the interface came back as it was");
    // What the server sends over it arrives: t2's program on the new
    // interface passes it on to t3.
    let relayed = || {
        let (ns, inst) = (&t.lab.terminals[1].ns, &t.lab.terminals[1].instance);
        let v = t.lab.terminal_links(ns, inst).unwrap();
        v.links
            .iter()
            .find(|l| l.link == LINK)
            .map(|l| l.counters.relay_down_pkts)
            .expect("link 3 in t2's links")
    };
    let r0 = relayed();
    std::thread::sleep(Duration::from_millis(500));
    let r1 = relayed();
    assert!(
        r1 > r0 + 100,
        "t2 relayed {} packets from the new wan1 in 0.5 s\nt2:\n{}\nserver:\n{}",
        r1 - r0,
        log_tail(&t.lab, "agent-t2"),
        log_tail(&t.lab, "agent-srv")
    );
    t.finish("replug");
}

/// Link 3 is renumbered (a new lease) with traffic on it: t2's agent moves
/// its socket and the datapath's source address to the new one, and the
/// server, told by an announce at once, sends there; the link carries on
/// within 1 s. Its address removed, it is out of use within 1 s, and back
/// within 1 s of the address and the route to its next hop returning
/// (the route to the server, which the kernel dropped, is put back by the
/// next upkeep: 150-175 ms).
#[test]
fn a_new_address_is_taken_up_and_the_server_sends_to_it() {
    let mut t = Traffic::start();
    let new = t.lab.readdress(LINK).unwrap();
    t.carries_within("renumbered", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(500));
    t.carries_within("renumbered, still", Duration::from_secs(1));
    assert_eq!(own_link(&t.lab).address, Some(new.into()));
    let links = t.lab.server_links().unwrap();
    let row = links
        .links
        .iter()
        .find(|l| l.link == LINK)
        .expect("link 3 at the server");
    assert_eq!(
        row.address.ip(),
        new,
        "the server sends link 3's packets elsewhere: {row:?}"
    );
    let tns = t.lab.terminals[1].ns.clone();
    t.lab
        .ip(&tns, &format!("addr del {new}/30 dev wan1"))
        .unwrap();
    t.stops_within("address removed", Duration::from_secs(1));
    // As a DHCP client does: the address, then the route to the next hop
    // (the kernel dropped it with the interface's last address).
    let modem = t.lab.terminals[1].links[1].modem_ip;
    t.lab
        .ip(&tns, &format!("addr add {new}/30 dev wan1"))
        .unwrap();
    t.lab
        .ip(&tns, &format!("route add {modem}/32 dev wan1"))
        .unwrap();
    t.carries_within("address back", Duration::from_secs(1));
    t.finish("renumbered");
}

/// t2's agent starts while link 3's modem is unplugged: it comes up with
/// the link out of use (announced dark, so the others leave it out too),
/// and takes it up when the modem is plugged in.
#[test]
fn an_agent_started_without_its_modem_takes_it_up_when_it_comes() {
    let t = Traffic::launch(true, |_| {});
    let row = own_link(&t.lab);
    assert_eq!((row.dark, row.carrier), (true, false), "{row:?}");
    let [up, down] = t.counts();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(t.counts(), [up, down], "sent on a link that is not there");
    t.lab.plug(LINK).unwrap();
    t.carries_within("plugged in", Duration::from_secs(1));
    t.finish("late modem");
}

/// Link 3's path starts dropping every packet over 400 bytes, both ways,
/// with its carrier up (a path MTU that shrank behind the modem, its
/// "fragmentation needed" lost): its echoes pass, so its owner keeps it,
/// but no data arrives over it. Each sender (t3 upstream, the server
/// downstream) sees from the other end's reports that it delivers nothing
/// and leaves it, and the upload and download carry on over links 1 and
/// 2 at a useful rate, though each flow had lost its window to it at once
/// (the lab's round trips are a few ms), and every packet it then sent
/// alone went, as the soonest, to link 3.
#[test]
fn a_link_that_loses_all_data_while_its_echoes_pass_is_left_out() {
    let t = Traffic::start();
    let silenced = |t: &Traffic| {
        let (ns, inst) = t.lab.terminal_agent(2);
        let up = t
            .lab
            .terminal_status(&ns, &inst)
            .unwrap()
            .feedback
            .counts
            .silenced;
        let down = t.lab.server_status().unwrap().feedback.counts.silenced;
        [up, down]
    };
    assert_eq!(silenced(&t), [0, 0], "silent links before the black hole");
    t.lab.black_hole_over(LINK, 400).unwrap();
    let start = Instant::now();
    loop {
        let [up, down] = silenced(&t);
        if up > 0 && down > 0 {
            eprintln!(
                "black hole: left out by both senders after {:?}",
                start.elapsed()
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "black hole: still in use after 3 s (silenced upstream {up}, downstream {down})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !own_link(&t.lab).dark,
        "its echoes pass: its owner keeps it"
    );
    eprintln!("{}", t.state());
    t.finish("black hole");
}

/// Link 3 takes its next hop from wan1's default route (`gateway =
/// "auto"`, as with DHCP), and a new lease moves both its address and its
/// next hop: the route to the server follows the new next hop, and the
/// link carries on within 1 s.
#[test]
fn a_new_next_hop_from_the_default_route_is_followed() {
    let mut t = Traffic::start_with(|lab| {
        lab.auto_gateways.push(LINK);
        let (tns, modem) = (
            lab.terminals[1].ns.clone(),
            lab.terminals[1].links[1].modem_ip,
        );
        lab.ip(
            &tns,
            &format!("route add default via {modem} dev wan1 metric 300"),
        )
        .unwrap();
    });
    let old = t.lab.terminals[1].links[1].modem_ip;
    assert_eq!(own_link(&t.lab).gateway, Some(old.into()));
    t.lab.renumber(LINK, true).unwrap();
    t.carries_within("new lease, new next hop", Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(300));
    t.carries_within("new next hop, still", Duration::from_secs(1));
    let row = own_link(&t.lab);
    assert_eq!(
        (row.address, row.gateway),
        (
            Some(Ipv4Addr::new(100, 64, 3, 2).into()),
            Some(Ipv4Addr::new(100, 64, 3, 1).into())
        ),
        "{row:?}"
    );
    let route = t
        .lab
        .ip(&t.lab.terminals[1].ns, "route show 198.51.100.1/32")
        .unwrap();
    assert!(
        route.contains("via 100.64.3.1 dev wan1"),
        "the route to the server does not follow the next hop: {route}"
    );
    t.finish("new next hop");
}

/// Link 1 (t1's only one) is on an L3 device, as PPP or a raw-IP LTE
/// modem is; link 2 (t2's) is Ethernet. Both carry each origin's share,
/// both ways: t1's own traffic leaves and arrives on its L3 device, and
/// t2's is relayed through it; t1's IPv6 too.
#[test]
fn an_l3_link_bonds_with_an_ethernet_link() {
    use bond_lab::LinkSpec;
    let spec = [vec![LinkSpec::rate(20).on_l3()], vec![LinkSpec::rate(20)]];
    let mut lab = Lab::build_links(&spec, bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    let (ns1, inst1) = (
        lab.terminals[0].ns.clone(),
        lab.terminals[0].instance.clone(),
    );
    let st = lab.terminal_status(&ns1, &inst1).unwrap();
    assert!(!st.links[0].ethernet, "{st:?}");
    assert!(st.links[0].active, "{st:?}");
    let want = each_origin_shares_both_links(&mut lab, "L3");
    // IPv6 inside, t1's own: its L3 link hands the replies up as IPv6 and
    // carries its wraps as IPv4 (the tunnel drops a packet whose kernel
    // protocol is not its version, as PPP or WireGuard would garble it).
    t1_shares_both_links_over_ipv6_inside(&lab, &want);
    let t1 = Maps::new(pin_dir(Path::new(DEFAULT_BPFFS), &inst1));
    // Nothing the L3 paths could have dropped (IPv6 into bond0 and a full
    // schedule are the origin's, whatever its links).
    let drops: Vec<_> = t1
        .terminal_drops()
        .unwrap()
        .into_iter()
        .filter(|d| d.1 != 0)
        .collect();
    eprintln!("t1's drops: {drops:?}");
    assert!(
        drops
            .iter()
            .all(|(r, _)| ["not_ipv4", "links_full"].contains(r)),
        "t1 dropped {drops:?}"
    );
}

/// Link 1 (t1's only one) has only IPv6, as many LTE uplinks do; link 2
/// (t2's) IPv4. t1 reaches the server's IPv6 address over it, by the next
/// hop of the link's IPv6 default route (`auto`: the modem's link-local
/// address): both links carry each origin's share both ways, t1's own
/// traffic and t2's relayed through the IPv6 link, IPv4 and IPv6 inside;
/// the server knows each link by the address of its family.
#[test]
fn a_link_with_only_ipv6_bonds_with_an_ipv4_link() {
    link_1_over_ipv6_bonds_with_link_2(bond_lab::LinkSpec::rate(20).over_ipv6(), "IPv6");
}

/// The same with link 1 on an L3 device over IPv6, as a raw-IP LTE modem
/// with only IPv6 is (no next hop: its far end takes every packet).
#[test]
fn an_l3_link_with_only_ipv6_bonds_with_an_ipv4_link() {
    let l1 = bond_lab::LinkSpec::rate(20).on_l3().over_ipv6();
    link_1_over_ipv6_bonds_with_link_2(l1, "L3 IPv6");
}

fn link_1_over_ipv6_bonds_with_link_2(l1: bond_lab::LinkSpec, kind: &str) {
    let l3 = l1.l3;
    let spec = [vec![l1], vec![bond_lab::LinkSpec::rate(20)]];
    let mut lab = Lab::build_links(&spec, bond_ctl()).expect("build lab");
    lab.auto_gateways.push(1);
    lab.start_agents().expect("start agents");
    let (wan6, _) = lab.terminals[0].links[0].v6.expect("link 1 over IPv6");
    let (ns1, inst1) = (&lab.terminals[0].ns, &lab.terminals[0].instance);
    let st = lab.terminal_status(ns1, inst1).unwrap();
    let l1 = &st.links[0];
    assert_eq!(l1.address, Some(wan6.into()), "{st:?}");
    let hop = (!l3).then(|| "fe80::1".parse().unwrap());
    assert_eq!((l1.ethernet, l1.gateway), (!l3, hop), "{st:?}");
    assert!(l1.active && !l1.dark, "{st:?}");
    // The server: link 1 at the terminal's IPv6 address, link 2 at its
    // IPv4 one, in its session table and its link counters.
    let rows = lab.server_terminals().unwrap();
    let at = |link: u8| {
        rows.iter()
            .flat_map(|t| &t.links)
            .find(|l| l.link == link)
            .map(|l| l.address)
            .unwrap_or_else(|| panic!("the server has no link {link}: {rows:?}"))
    };
    let port1 = lab.terminals[0].links[0].port;
    assert_eq!(at(1), std::net::SocketAddr::from((wan6, port1)));
    assert!(at(2).is_ipv4(), "{rows:?}");
    let counters = lab.server_links().unwrap();
    let shown: Vec<_> = counters.links.iter().map(|l| (l.link, l.address)).collect();
    assert!(shown.contains(&(1, at(1))), "{shown:?}");
    let want = each_origin_shares_both_links(&mut lab, kind);
    t1_shares_both_links_over_ipv6_inside(&lab, &want);
    // Nothing dropped on the way over IPv6 at either end.
    let bpffs = Path::new(DEFAULT_BPFFS);
    let t1 = Maps::new(pin_dir(bpffs, &lab.terminals[0].instance));
    let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
    let (td, sd) = (
        nonzero(t1.terminal_drops().unwrap()),
        nonzero(server.server_drops().unwrap()),
    );
    eprintln!("t1's drops: {td:?}; the server's: {sd:?}");
    let harmless = ["not_ipv4", "links_full", "no_flow", "slow_path"];
    for (who, d) in [("t1", &td), ("the server", &sd)] {
        assert!(
            d.iter().all(|(r, _)| harmless.contains(r)),
            "{who} dropped {d:?}"
        );
    }
}

/// Terminal `m`'s counters for link `link` (zero before it carried any).
fn link_stats(m: &Maps, link: u8) -> bond_common::maps::LinkStats {
    m.terminal_link_stats()
        .unwrap()
        .into_iter()
        .find(|s| s.0 == link)
        .map(|s| s.2)
        .unwrap_or_default()
}

/// The inner bytes the server has sent down link `link`.
fn server_down_bytes(server: &Maps, link: u8) -> u64 {
    let idx = server.server_link_index().unwrap();
    let (_, i) = idx.into_iter().find(|(k, _)| k.link == link).unwrap();
    server.server_link_stats(i).unwrap().down_bytes
}

/// The drop counters that are not zero.
fn nonzero(drops: Vec<(&'static str, u64)>) -> Vec<(&'static str, u64)> {
    drops.into_iter().filter(|d| d.1 != 0).collect()
}

/// t1's own IPv6 (inside): a 20 MiB `curl -6` download (its SHA-256
/// `want`) and a 10 MB `iperf3 -6` upload, each link carrying at least
/// 30% of each.
fn t1_shares_both_links_over_ipv6_inside(lab: &Lab, want: &str) {
    use sha2::{Digest, Sha256};
    let ns1 = lab.terminals[0].ns.clone();
    let inst1 = lab.terminals[0].instance.clone();
    let bpffs = Path::new(DEFAULT_BPFFS);
    let t1 = Maps::new(pin_dir(bpffs, &inst1));
    let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
    let server_down = |link: u8| server_down_bytes(&server, link);
    let up = |m: &Maps, link: u8| link_stats(m, link).up_bytes;
    let content6 = bond_lab::CONTENT6.to_string();
    let before = [server_down(1), server_down(2)];
    let t1_before = link_stats(&t1, 1);
    let out = lab.dir.join("t1-v6.bin");
    let url = format!("http://[{content6}]/20m.bin");
    let (bytes, secs) = lab.fetch(&ns1, &[], &url, &out).expect("curl over IPv6");
    let got = format!("{:x}", Sha256::digest(std::fs::read(&out).unwrap()));
    assert_eq!(
        (bytes, &got),
        (20 << 20, &want.to_string()),
        "IPv6: the file differs"
    );
    let down = [server_down(1) - before[0], server_down(2) - before[1]];
    eprintln!("t1 over IPv6: 20 MiB in {secs:.2} s; down per link {down:?}");
    let total = (down[0] + down[1]) as f64;
    for (l, d) in down.iter().enumerate() {
        assert!(
            *d as f64 > 0.3 * total,
            "IPv6: link {} carried {d} of {total}",
            l + 1
        );
    }
    assert!(link_stats(&t1, 1).down_bytes > t1_before.down_bytes);
    let before = [up(&t1, 1), up(&t1, 2)];
    lab.iperf3(&ns1, &[], &["-6", "-c", &content6, "-n", "10M"])
        .expect("upload over IPv6");
    let sent = [up(&t1, 1) - before[0], up(&t1, 2) - before[1]];
    eprintln!("t1 over IPv6: 10 MB up, per link {sent:?}");
    let total = (sent[0] + sent[1]) as f64;
    for (l, d) in sent.iter().enumerate() {
        assert!(
            *d as f64 > 0.3 * total,
            "IPv6: link {} sent {d} of {total} up",
            l + 1
        );
    }
}

/// A 20 MiB download and a 10 MB upload from each of t1 (whose only
/// link, 1, is `kind`) and t2 (link 2, and t1's relayed): each link
/// carries at least 30% of each, and link 1's counters at t1 show its own
/// traffic and t2's relayed. Returns the file's SHA-256.
fn each_origin_shares_both_links(lab: &mut Lab, kind: &str) -> String {
    use sha2::{Digest, Sha256};
    let inst1 = lab.terminals[0].instance.clone();
    let bpffs = Path::new(DEFAULT_BPFFS);
    let t1 = Maps::new(pin_dir(bpffs, &inst1));
    let server = Maps::new(pin_dir(bpffs, &lab.server_instance));
    let server_down = |link: u8| server_down_bytes(&server, link);
    let served = lab.serve_file("20m.bin", 20).unwrap();
    let want = format!("{:x}", Sha256::digest(std::fs::read(&served).unwrap()));
    for (i, what) in [
        (0, format!("t1 (its only link {kind})")),
        (1, format!("t2 (relayed through t1's {kind} link)")),
    ] {
        let before = [server_down(1), server_down(2)];
        let (t1_before, t1_own) = (link_stats(&t1, 1), i == 0);
        let ns = lab.terminals[i].ns.clone();
        let (bytes, secs, out) = lab
            .download(
                &ns,
                "http://203.0.113.2/20m.bin",
                &format!("t{}.bin", i + 1),
            )
            .expect("download");
        let got = format!("{:x}", Sha256::digest(std::fs::read(&out).unwrap()));
        assert_eq!((bytes, &got), (20 << 20, &want), "{what}: the file differs");
        let down = [server_down(1) - before[0], server_down(2) - before[1]];
        let mbit = bytes as f64 * 8.0 / secs / 1e6;
        eprintln!("{what}: 20 MiB in {secs:.2} s, {mbit:.1} Mbit/s; down per link {down:?}");
        let total = (down[0] + down[1]) as f64;
        for (l, d) in down.iter().enumerate() {
            assert!(
                *d as f64 > 0.3 * total,
                "{what}: link {} carried {d} of {total} bytes:\n{}",
                l + 1,
                lab.log(&format!("agent-t{}", i + 1))
            );
        }
        let s = link_stats(&t1, 1);
        if t1_own {
            assert!(s.down_bytes > t1_before.down_bytes, "{what}: {s:?}");
            assert!(s.up_pkts > t1_before.up_pkts, "{what}: {s:?}");
        } else {
            assert!(
                s.relay_down_bytes > t1_before.relay_down_bytes,
                "{what}: {s:?}"
            );
            assert!(s.relay_up_pkts > t1_before.relay_up_pkts, "{what}: {s:?}");
        }
    }
    // Uploads: 10 MB from each origin; its upstream counters show each
    // link's share (t2's relayed share through t1's L3 link on t1's).
    lab.start_iperf().unwrap();
    let up = |m: &Maps, link: u8, relayed: bool| {
        let s = link_stats(m, link);
        if relayed {
            s.relay_up_bytes
        } else {
            s.up_bytes
        }
    };
    let t2 = Maps::new(pin_dir(bpffs, &lab.terminals[1].instance));
    for (i, what) in [
        (0, format!("t1 (its only link {kind})")),
        (1, format!("t2 (relayed through t1's {kind} link)")),
    ] {
        let origin = if i == 0 { &t1 } else { &t2 };
        let l1 = |o: &Maps| {
            if i == 0 {
                up(o, 1, false)
            } else {
                up(&t1, 1, true)
            }
        };
        let before = [l1(origin), up(origin, 2, false)];
        let ns = lab.terminals[i].ns.clone();
        if let Err(e) = lab.iperf3(&ns, &[], &["-c", "203.0.113.2", "-n", "10M"]) {
            panic!(
                "{what}: upload: {e:#}\nt1 dropped {:?}, t2 {:?}, the server {:?}\nt1 link 1: {:?}",
                nonzero(t1.terminal_drops().unwrap()),
                nonzero(t2.terminal_drops().unwrap()),
                nonzero(server.server_drops().unwrap()),
                link_stats(&t1, 1),
            );
        }
        let sent = [l1(origin) - before[0], up(origin, 2, false) - before[1]];
        eprintln!("{what}: 10 MB up, per link {sent:?}");
        let total = (sent[0] + sent[1]) as f64;
        for (l, d) in sent.iter().enumerate() {
            assert!(
                *d as f64 > 0.3 * total,
                "{what}: link {} carried {d} of {total} bytes up",
                l + 1
            );
        }
    }
    want
}

/// Figure 1 with every veth left as `ip link add` makes it (checksum
/// offload on, GRO off), as a container's interfaces are. `bond-ctl
/// check` names the other ends that need setting. Trusted as they are
/// (`veth = "trust"`), the agents log on but a download does not pass;
/// by default each agent sets the other end of every veth it puts XDP on
/// (`bond_agent::veth`), and 20 MiB arrive whole.
#[test]
fn veths_left_as_created_are_set_by_the_agents_that_use_them() {
    use sha2::{Digest, Sha256};
    let t3 = |lab: &Lab| lab.terminals[2].ns.clone();

    let mut lab = Lab::build_untuned(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    let cfg = lab.dir.join("check-srv.toml");
    std::fs::write(&cfg, lab.server_config()).unwrap();
    let out = lab
        .cmd(&lab.server_ns, &bond_ctl().to_string_lossy())
        .args(["check", "--config", &cfg.to_string_lossy()])
        .output()
        .unwrap();
    let warned = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("check: {warned}");
    assert!(out.status.success(), "{warned}");
    for want in [
        "wan0 is a veth whose other end srv needs `tx off gro on`",
        "content0",
    ] {
        assert!(warned.contains(want), "{want:?} not in {warned}");
    }
    lab.server_extra = "[attach]\nveth = \"trust\"".into();
    lab.terminal_extra = "[attach]\nveth = \"trust\"".into();
    lab.start_server().unwrap();
    for i in 0..3 {
        lab.start_terminal(i).unwrap();
    }
    let (ns, inst) = lab.terminal_agent(2);
    let start = Instant::now();
    while !lab.terminal_status(&ns, &inst).is_ok_and(|s| s.logged_on) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "t3 never logged on"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    lab.serve_file("1m.bin", 1).unwrap();
    let url = "http://203.0.113.2/1m.bin";
    let stalled = lab.exec(
        &t3(&lab),
        "curl",
        &["-sS", "--fail", "--max-time", "8", "-o", "/dev/null", url],
    );
    assert!(stalled.is_err(), "a download passed veths left as created");
    drop(lab);

    let mut lab = Lab::build_untuned(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    let log = lab.log("agent-srv");
    assert!(
        log.contains("wan0 is a veth whose other end srv was set `tx off gro on`"),
        "{log}"
    );
    let inet = format!("{}-inet", lab.prefix);
    let k = lab.exec(&inet, "ethtool", &["-k", "srv"]).unwrap();
    for want in ["tx-checksumming: off", "generic-receive-offload: on"] {
        assert!(k.contains(want), "{want:?} not in {k}");
    }
    let served = lab.serve_file("20m.bin", 20).unwrap();
    let (bytes, secs, out) = lab
        .download(&t3(&lab), "http://203.0.113.2/20m.bin", "t3.bin")
        .expect("download");
    let sum = |p: &Path| format!("{:x}", Sha256::digest(std::fs::read(p).unwrap()));
    assert_eq!((bytes, sum(&out)), (20 << 20, sum(&served)));
    eprintln!("20 MiB through agent-set veths: {secs:.2} s");
}
