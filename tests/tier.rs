//! The ISP tier's registry with a real etcd: a three-member cluster and
//! three reconstitution nodes (server agents with `[tier]`), each in a
//! namespace of its own. Communities are registered with `bond-ctl tier`
//! and placed by the elected controller; each node serves what the
//! registry says it owns.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use bond_api::reply::ServerStatus;
use bond_lab::site::Site;
use common::{bond_ctl, require_root};

const COMMUNITIES: u32 = 30;

/// Owner of each community, as `bond-ctl tier communities --json` says
/// (None: no owner).
fn owners(site: &Site) -> BTreeMap<u32, Option<String>> {
    let out = site.tier(&["communities", "--json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["communities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_u64().unwrap() as u32,
                c["owner"].as_str().map(String::from),
            )
        })
        .collect()
}

fn status(site: &Site, i: usize) -> ServerStatus {
    let out = site.node_ctl(i, &["status", "--json"]).unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The communities node `i` serves, by its own status.
fn serving(site: &Site, i: usize) -> BTreeSet<u32> {
    status(site, i)
        .communities
        .iter()
        .map(|c| u32::from(c.id))
        .collect()
}

/// What the registry gives each node.
fn by_node(owners: &BTreeMap<u32, Option<String>>) -> BTreeMap<String, BTreeSet<u32>> {
    let mut m: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (c, o) in owners {
        if let Some(o) = o {
            m.entry(o.clone()).or_default().insert(*c);
        }
    }
    m
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// The cluster up, nodes `1..=nodes` up and registered, and
/// [`COMMUNITIES`] communities registered and placed; each node serving
/// exactly what the registry gives it.
fn site_with_communities(nodes: usize) -> Site {
    require_root();
    let mut site = Site::build(bond_ctl(), 3, nodes).expect("build the site");
    site.start_etcd().expect("etcd");
    for i in 1..=nodes {
        site.start_node(i, "").expect("node");
    }
    let registered = |site: &Site| {
        site.tier(&["nodes", "--json"]).is_ok_and(|out| {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            v["nodes"].as_array().unwrap().len() == nodes
        })
    };
    wait_until("every node registered", Duration::from_secs(20), || {
        registered(&site)
    });
    let key = site.dir.join("key");
    for c in 1..=COMMUNITIES {
        std::fs::write(&key, format!("community {c} key, long enough\n")).unwrap();
        site.tier(&["add", &c.to_string(), "--key-file", &key.to_string_lossy()])
            .unwrap();
    }
    wait_until("every community placed", Duration::from_secs(5), || {
        owners(&site).values().all(Option::is_some)
    });
    agree(&site, nodes);
    site
}

/// Each node serves what the registry gives it (within 2 s).
fn agree(site: &Site, nodes: usize) {
    let mut last = String::new();
    let ok = |last: &mut String| {
        let given = by_node(&owners(site));
        (1..=nodes).all(|i| {
            let want = given.get(&format!("n{i}")).cloned().unwrap_or_default();
            let have = serving(site, i);
            *last = format!("n{i}: serves {have:?}, owns {want:?}");
            have == want
        })
    };
    let start = Instant::now();
    while !ok(&mut last) {
        assert!(start.elapsed() < Duration::from_secs(2), "{last}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node that is the controller now (1-based).
fn controller(site: &Site, nodes: usize) -> usize {
    (1..=nodes)
        .find(|&i| status(site, i).tier.unwrap().controller)
        .expect("a controller")
}

/// 30 communities over three nodes of equal weight: each gets some; the
/// controller's node is killed (SIGKILL: no goodbye), and within its
/// lease (2 s) and a little more its communities, and only they, are
/// owned and served by the two left, one of which is now controller.
#[test]
fn a_lost_node_moves_only_its_communities_and_another_takes_control() {
    let mut site = site_with_communities(3);
    let before = owners(&site);
    let given = by_node(&before);
    for i in 1..=3 {
        let n = given.get(&format!("n{i}")).map_or(0, BTreeSet::len);
        assert!(n >= 4, "n{i} owns {n} of {COMMUNITIES}: {given:?}");
    }
    let dead = controller(&site, 3);
    let lost = given[&format!("n{dead}")].clone();
    site.stop(&format!("n{dead}"), true).unwrap();
    let gone = Instant::now();
    let took = wait_until(
        "the dead node's communities moved",
        Duration::from_secs(6),
        || {
            owners(&site)
                .values()
                .all(|o| o.as_deref() != Some(&format!("n{dead}")))
        },
    );
    eprintln!("{} communities moved {took:?} after the kill", lost.len());
    let after = owners(&site);
    let moved: BTreeSet<u32> = before
        .iter()
        .filter(|(c, o)| after[*c] != **o)
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(moved, lost, "moved: exactly the dead node's communities");
    assert!(after.values().all(Option::is_some), "{after:?}");
    let alive: Vec<usize> = (1..=3).filter(|&i| i != dead).collect();
    let mut agreed = false;
    let start = Instant::now();
    while !agreed {
        let given = by_node(&owners(&site));
        agreed = alive.iter().all(|&i| {
            serving(&site, i) == given.get(&format!("n{i}")).cloned().unwrap_or_default()
        });
        assert!(start.elapsed() < Duration::from_secs(2), "{given:?}");
    }
    let served: usize = alive.iter().map(|&i| serving(&site, i).len()).sum();
    assert_eq!(served, COMMUNITIES as usize);
    let controllers: Vec<usize> = alive
        .iter()
        .copied()
        .filter(|&i| status(&site, i).tier.unwrap().controller)
        .collect();
    assert_eq!(controllers.len(), 1, "one controller among {alive:?}");
    eprintln!(
        "all served by n{} and n{} {:?} after the kill",
        alive[0],
        alive[1],
        gone.elapsed()
    );
}

/// A drained node gives up its communities to the others, none of
/// theirs move, and it takes no new ones; undrained, it keeps what it
/// has (nothing moves back) and takes new ones again. A node stopped
/// with SIGTERM gives its lease back: its communities move at once, not
/// when the lease would have run out.
#[test]
fn draining_and_stopping_a_node_move_its_communities_and_no_others() {
    let mut site = site_with_communities(3);
    let before = owners(&site);
    let n1 = by_node(&before)["n1"].clone();
    site.tier(&["drain", "n1"]).unwrap();
    wait_until("n1 drained", Duration::from_secs(3), || {
        serving(&site, 1).is_empty()
    });
    let after = owners(&site);
    for (c, o) in &before {
        if n1.contains(c) {
            assert!(
                matches!(after[c].as_deref(), Some("n2" | "n3")),
                "{c}: {after:?}"
            );
        } else {
            assert_eq!(
                &after[c], o,
                "community {c} moved though n1 is not its owner"
            );
        }
    }
    agree(&site, 3);
    let nodes = site.tier(&["nodes"]).unwrap();
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("n1 ") && l.contains("draining")),
        "{nodes}"
    );
    // New communities while n1 drains: none to it.
    let key = site.dir.join("key");
    std::fs::write(&key, "a new community's key\n").unwrap();
    for c in 101..=110 {
        site.tier(&["add", &c.to_string(), "--key-file", &key.to_string_lossy()])
            .unwrap();
    }
    wait_until("new ones placed", Duration::from_secs(3), || {
        owners(&site).values().all(Option::is_some)
    });
    assert!(
        owners(&site).values().all(|o| o.as_deref() != Some("n1")),
        "a draining node took a community"
    );
    // A community registered twice is refused, with its id.
    let e = site
        .tier(&["add", "101", "--key-file", &key.to_string_lossy()])
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("community 101 is already registered"),
        "{e:#}"
    );
    site.tier(&["undrain", "n1"]).unwrap();
    let settled = owners(&site);
    for c in 111..=140 {
        site.tier(&["add", &c.to_string(), "--key-file", &key.to_string_lossy()])
            .unwrap();
    }
    wait_until("n1 takes new ones", Duration::from_secs(3), || {
        owners(&site).values().any(|o| o.as_deref() == Some("n1"))
    });
    let now = owners(&site);
    for (c, o) in &settled {
        assert_eq!(&now[c], o, "community {c} moved on undrain");
    }
    agree(&site, 3);

    // SIGTERM: the lease is given back, so the move takes well under the
    // lease's 2 s.
    let n2 = by_node(&now)["n2"].clone();
    site.stop("n2", false).unwrap();
    let took = wait_until("n2's communities moved", Duration::from_secs(5), || {
        owners(&site).values().all(|o| o.as_deref() != Some("n2"))
    });
    eprintln!("{} communities moved {took:?} after n2 stopped", n2.len());
    assert!(
        took < Duration::from_millis(1500),
        "{took:?}: the lease was not given back"
    );
    assert!(
        site.log("n2").contains("lease given back"),
        "{}",
        site.log("n2")
    );
}

/// Killing the etcd leader of the three members, which is also the
/// member n1 talks to: the cluster elects another, n1 goes on from
/// another member with the same lease, the nodes stay registered and
/// keep what they serve throughout, a community added after is placed,
/// and an entry in the registry that is not bond's (or does not parse)
/// is left out and named, never taken.
#[test]
fn losing_the_etcd_leader_pauses_nothing() {
    let mut site = site_with_communities(3);
    let before = owners(&site);
    let leader = site.member_used_by(1).unwrap();
    site.make_leader(leader).unwrap();
    site.stop(&format!("e{leader}"), true).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        for i in 1..=3 {
            let s = status(&site, i);
            assert!(
                s.tier.as_ref().unwrap().registered,
                "n{i} lost its registration:\n{}",
                site.log(&format!("n{i}"))
            );
            assert_eq!(
                s.communities.len(),
                by_node(&before)
                    .get(&format!("n{i}"))
                    .map_or(0, BTreeSet::len),
                "n{i} changed what it serves"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<String> = site
        .etcd
        .iter()
        .enumerate()
        .filter(|(i, _)| i + 1 != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let new_leader = site.etcd_leader_among(&left).unwrap();
    assert_ne!(new_leader, leader);
    let key = site.dir.join("key");
    std::fs::write(&key, "added after the leader died\n").unwrap();
    site.tier(&["add", "200", "--key-file", &key.to_string_lossy()])
        .unwrap();
    wait_until("the new community placed", Duration::from_secs(3), || {
        owners(&site).get(&200).is_some_and(Option::is_some)
    });
    assert_eq!(owners(&site).len(), before.len() + 1);
    // n1 went on with the lease it had: registered twice, one lease.
    let log = site.log("n1");
    let leases: BTreeSet<&str> = log
        .lines()
        .filter_map(|l| l.split("registered (lease ").nth(1))
        .filter_map(|l| l.split(',').next())
        .collect();
    assert_eq!(log.matches("registered (lease").count(), 2, "{log}");
    assert_eq!(leases.len(), 1, "{log}");
    // Garbage in the registry: a node names it and serves on.
    site.etcdctl(&["put", "/bond/communities/300", "{not json"])
        .unwrap();
    site.etcdctl(&["put", "/bond/owners/300", "n1"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!serving(&site, 1).contains(&300));
    let log = site.log("n1");
    assert!(log.contains("/bond/communities/300 left out"), "{log}");
    agree(&site, 3);
}

// ------------------------------------------------ through the director --

fn sha256(path: &std::path::Path) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// Waits until node `node` holds the lab's first community with its
/// three terminals and three links (after a move).
fn wait_all_at(lab: &bond_lab::Lab, node: usize) {
    use bond_lab::COMMUNITY;
    lab.wait_for(
        "every terminal at the new owner",
        Duration::from_secs(10),
        |lab| {
            let s = lab.node_status(node)?;
            Ok(s.communities
                .iter()
                .any(|c| c.id == COMMUNITY && c.terminals == 3 && c.links == 3))
        },
    )
    .unwrap();
}

/// Figure 1 and a second community (u1's link, and t3 again) behind a
/// director with three nodes: each community's terminals log on at the
/// node that owns it (through the front address, which every node
/// answers from), a download runs at a bonded rate, and only that node
/// carries it. The first community's node then dies (its link down, its
/// agent SIGKILLed) while both communities download: the director's
/// health checks fence it, the registry moves its community (and not the
/// other), the terminals log on again at the new owner within 2 s and a
/// new download works, and the other community's download never pauses.
#[test]
fn terminals_follow_their_community_when_its_node_dies_and_the_others_never_pause() {
    use bond_lab::{COMMUNITY, COMMUNITY2, CONTENT2, Lab, TerminalSpec};
    require_root();
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.add_tier(3).expect("the tier");
    let (_, second) = lab.join_second_community(2, 20).unwrap();
    lab.start_agents().expect("start agents");
    // Placement puts both communities on n1; a drain and undrain splits
    // them (n3 and n2 by score) as a larger site's would be.
    assert_eq!(
        (
            lab.owner(COMMUNITY).unwrap(),
            lab.owner(COMMUNITY2).unwrap()
        ),
        (Some(1), Some(1))
    );
    lab.tier_ctl(&["drain", "n1"]).unwrap();
    lab.wait_for("the drain", Duration::from_secs(10), |lab| {
        Ok(lab.owner(COMMUNITY)? != Some(1) && lab.owner(COMMUNITY2)? != Some(1))
    })
    .unwrap();
    lab.tier_ctl(&["undrain", "n1"]).unwrap();
    let (o1, o2) = (
        lab.owner(COMMUNITY).unwrap().unwrap(),
        lab.owner(COMMUNITY2).unwrap().unwrap(),
    );
    assert_ne!(o1, o2, "the two communities on one node");
    lab.wait_for_community(Duration::from_secs(10)).unwrap();
    lab.wait_for(
        "the director to steer to both",
        Duration::from_secs(10),
        |lab| {
            let d = lab.director_status()?;
            Ok(d.nodes.iter().filter(|n| n.communities == 1).count() == 2
                && d.nodes.iter().all(|n| n.health == "up"))
        },
    )
    .unwrap();

    let took = lab.wait_for_measured(Duration::from_secs(20)).unwrap();
    eprintln!("every link measured at its owner after {took:?}");
    let served = lab.serve_file("8m.bin", 8).unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let steered = |lab: &Lab| -> BTreeMap<String, u64> {
        let d = lab.director_status().unwrap();
        d.nodes.into_iter().map(|n| (n.name, n.packets)).collect()
    };
    let before = steered(&lab);
    let (bytes, secs, out) = lab
        .download(&t3, "http://203.0.113.2/8m.bin", "before.bin")
        .expect("download through the tier");
    assert_eq!(bytes, 8 << 20);
    assert_eq!(sha256(&out), sha256(&served));
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("8 MiB through n{o1}: {mbit:.1} Mbit/s");
    // (With t3 in a second community too, this download runs at 50-55
    // Mbit/s in most runs and at 10-13 in some: not yet understood, and
    // not the tier's; the bonded rate through the tier is the single
    // community's, in `bench tier` and the e2e suite.)
    assert!(mbit > 8.0, "{mbit:.1} Mbit/s over links of 10+20+30");
    let status = lab.node_status(o1).unwrap();
    let c = status
        .communities
        .iter()
        .find(|c| c.id == COMMUNITY)
        .expect("the owner serves the community");
    assert_eq!((c.terminals, c.links), (3, 3), "{c:?}");
    let after = steered(&lab);
    let delta = |n: usize| after[&format!("n{n}")] - before[&format!("n{n}")];
    // The download's upstream (its ACKs, announces, echoes) all to its
    // owner; the second community's announces and echoes to its own; none
    // to the third.
    let third = 6 - o1 - o2;
    assert!(delta(o1) > 1000, "{before:?} {after:?}");
    assert!(delta(o2) < 200, "{before:?} {after:?}");
    assert_eq!(delta(third), 0, "{before:?} {after:?}");

    // Both communities download, t3 in the first and u1 in the second
    // (rate-limited, so both run through the failure); the second one's
    // progress is sampled every 20 ms.
    let out1 = lab.dir.join("during1.bin");
    let out2 = lab.dir.join("during2.bin");
    let u1 = lab.terminals[3].ns.clone();
    for (ns, name, out, url) in [
        (
            &t3,
            "curl-c1",
            &out1,
            "http://203.0.113.2/8m.bin".to_string(),
        ),
        (&u1, "curl-c2", &out2, format!("http://{CONTENT2}/8m.bin")),
    ] {
        let out = out.to_string_lossy().into_owned();
        let args = ["-sS", "--fail", "--limit-rate", "1M", "-o", &out, &url];
        lab.spawn(ns, name, "curl", &args).unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, out2) = (stop.clone(), out2.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let len = std::fs::metadata(&out2).map_or(0, |m| m.len());
                seen.push((Instant::now(), len));
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        })
    };
    lab.wait_for("both downloads under way", Duration::from_secs(10), |_| {
        let len = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        Ok(len(&out1) > 1 << 20 && len(&out2) > 1 << 20)
    })
    .unwrap();

    // The second community's member logs on again only if its community
    // moves.
    let logons = |lab: &Lab| lab.log("agent-t4").matches("logged on to").count();
    let logged_on = logons(&lab);
    lab.crash_node(o1).unwrap();
    let killed = Instant::now();
    lab.wait_for("the community to move", Duration::from_secs(10), |lab| {
        Ok(lab.owner(COMMUNITY)?.is_some_and(|o| o != o1))
    })
    .unwrap();
    let moved = killed.elapsed();
    let new = lab.owner(COMMUNITY).unwrap().unwrap();
    let t3_instance = lab.terminals[2].instance.clone();
    lab.wait_for(
        "every terminal at the new owner, t3 bonding over every link",
        Duration::from_secs(10),
        |lab| {
            let s = lab.node_status(new)?;
            let all = s
                .communities
                .iter()
                .any(|c| c.id == COMMUNITY && c.terminals == 3 && c.links == 3);
            let rows = lab.peer_rows(&t3, &t3_instance)?;
            let links: Vec<_> = rows.iter().filter(|r| r.link != 0).collect();
            Ok(all && links.len() == 3 && links.iter().all(|r| r.in_use))
        },
    )
    .unwrap();
    let back = killed.elapsed();
    eprintln!(
        "n{o1} died: community {COMMUNITY} owned by n{new} after {moved:?}, every link of t3 in use again after {back:?}"
    );
    let d = lab.director_status().unwrap();
    assert_eq!(d.fenced, 1, "{d:?}");
    assert!(lab.log("agent-srv").contains(&format!("node n{o1} fenced")));
    assert!(moved < Duration::from_secs(2), "moved after {moved:?}");
    assert!(back < Duration::from_secs(2), "links back after {back:?}");
    // Only the dead node's community moved.
    assert_eq!(lab.owner(COMMUNITY2).unwrap(), Some(o2));
    assert_eq!(logons(&lab), logged_on, "{}", lab.log("agent-t4"));

    lab.wait_child("curl-c2", Duration::from_secs(30))
        .expect("the second community's download");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = sampler.join().unwrap();
    assert_eq!(sha256(&out2), sha256(&served));
    // The longest time the second community's download made no progress
    // from a second before the failure to two after it.
    let window =
        |t: Instant| t + Duration::from_secs(1) >= killed && t <= killed + Duration::from_secs(2);
    let (mut stall, mut elsewhere) = (Duration::ZERO, Duration::ZERO);
    let mut last_growth = None::<Instant>;
    let mut last_len = 0;
    for &(t, len) in &seen {
        if len > last_len {
            (last_len, last_growth) = (len, Some(t));
        } else if let Some(g) = last_growth {
            if window(t) {
                stall = stall.max(t - g);
            } else {
                elsewhere = elsewhere.max(t - g);
            }
        }
    }
    eprintln!(
        "the second community's download: longest pause {stall:?} around the failure, {elsewhere:?} elsewhere"
    );
    // No longer than its own pauses (curl's rate limit makes some) and
    // a little: a moved community would pause for the move and a login.
    let most = elsewhere.max(Duration::from_millis(100)) + Duration::from_millis(300);
    assert!(stall <= most, "paused {stall:?}, elsewhere {elsewhere:?}");
    let st = lab
        .terminal_status(&t3, &lab.terminals[second].instance)
        .unwrap();
    assert!(st.logged_on, "{st:?}");

    let (bytes, _, out) = lab
        .download(&t3, "http://203.0.113.2/8m.bin", "after.bin")
        .expect("download after the move");
    assert_eq!(bytes, 8 << 20);
    assert_eq!(sha256(&out), sha256(&served));
    let d = lab.director_status().unwrap();
    assert!(d.nodes.iter().all(|n| n.name != format!("n{o1}")), "{d:?}");
}

/// Directors that disagree for a moment never split a community: the
/// director's agent detached (its owner table frozen as it was, its
/// program still steering), the community's owner is drained; the old
/// owner passes the terminals' packets on to the new one over the site's
/// segment, so they log on there and a download works, while the old
/// owner serves nothing.
#[test]
fn a_node_passes_on_what_a_director_steers_to_it_by_an_older_view() {
    use bond_api::reply::Links;
    use bond_lab::{COMMUNITY, Lab, TerminalSpec};
    require_root();
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.add_tier(3).expect("the tier");
    lab.start_agents().expect("start agents");
    let old = lab.owner(COMMUNITY).unwrap().expect("an owner");
    let (srv, inst) = (lab.server_ns.clone(), lab.server_instance.clone());
    lab.ctl(&srv, &inst, &["detach"]).unwrap();
    lab.wait_child("agent-srv", Duration::from_secs(10))
        .expect("the director's agent detached");
    lab.tier_ctl(&["drain", &format!("n{old}"), "--now"])
        .unwrap();
    lab.wait_for("the community to move", Duration::from_secs(10), |lab| {
        Ok(lab.owner(COMMUNITY)?.is_some_and(|o| o != old))
    })
    .unwrap();
    let new = lab.owner(COMMUNITY).unwrap().unwrap();
    wait_all_at(&lab, new);
    let served = lab.serve_file("8m.bin", 8).unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let (bytes, secs, out) = lab
        .download(&t3, "http://203.0.113.2/8m.bin", "passed-on.bin")
        .expect("a download through the old owner");
    assert_eq!(bytes, 8 << 20);
    assert_eq!(sha256(&out), sha256(&served));
    eprintln!(
        "8 MiB with the director steering to n{old} and n{new} owning: {:.1} Mbit/s",
        bytes as f64 * 8.0 / secs / 1e6
    );
    let forwarded = |i: usize| -> u64 {
        match lab.links(&lab.node_ns(i), &lab.node_ns(i)).unwrap() {
            Links::Server(s) => s
                .events
                .get("forwarded_to_owner")
                .copied()
                .unwrap_or_default(),
            Links::Terminal(_) => panic!("node {i} is not a server"),
        }
    };
    // The download's upstream (its ACKs) all went through the old owner.
    assert!(forwarded(old) > 1000, "n{old} passed on {}", forwarded(old));
    assert_eq!(forwarded(new), 0);
    let s = lab.node_status(old).unwrap();
    assert!(s.communities.is_empty(), "{s:?}");
}

/// Draining a node loses no flow: a transfer running in its community
/// (iperf3, paced by its sender, so its flows stay open to the end) goes
/// on at the draining node to its end (the community stays there
/// meanwhile; one without flows moves at once), then the community moves
/// and its terminals log on at the new owner.
#[test]
fn draining_a_node_waits_for_its_flows_to_end() {
    use bond_lab::{COMMUNITY, COMMUNITY2, Lab, TerminalSpec};
    require_root();
    let mut lab = Lab::build(&TerminalSpec::figure1(), bond_ctl()).expect("build lab");
    lab.add_tier(3).expect("the tier");
    lab.start_agents().expect("start agents");
    lab.start_iperf().unwrap();
    let owner = lab.owner(COMMUNITY).unwrap().expect("an owner");
    assert_eq!(lab.owner(COMMUNITY2).unwrap(), Some(owner));
    let t3 = lab.terminals[2].ns.clone();
    let args = ["-c", "203.0.113.2", "-R", "-b", "8M", "-t", "6", "-J"];
    lab.spawn(&t3, "iperf", "iperf3", &args).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    lab.tier_ctl(&["drain", &format!("n{owner}")]).unwrap();
    let drained = Instant::now();
    // The community without flows moves at once; the one with the
    // transfer stays.
    lab.wait_for(
        "the idle community to move",
        Duration::from_secs(5),
        |lab| Ok(lab.owner(COMMUNITY2)? != Some(owner)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        lab.owner(COMMUNITY).unwrap(),
        Some(owner),
        "moved mid-flow: {}",
        lab.log(&format!("agent-n{owner}"))
    );
    let nodes = lab.tier_ctl(&["nodes", "--json"]).unwrap();
    assert!(nodes.contains("\"draining\":true"), "{nodes}");
    let report = lab
        .wait_child("iperf", Duration::from_secs(30))
        .expect("the transfer through the drain");
    let ended = Instant::now();
    let v: serde_json::Value = serde_json::from_str(&report).expect("iperf3's report");
    let got = v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    // 8 Mbit/s for 6 s: 6 MB.
    assert!(got > 5_000_000, "received {got} bytes: {report}");
    lab.wait_for("the community to move", Duration::from_secs(10), |lab| {
        Ok(lab.owner(COMMUNITY)?.is_some_and(|o| o != owner))
    })
    .unwrap();
    eprintln!(
        "n{owner} drained: the transfer ({got} bytes) ended {:?} into the drain; its community \
         moved {:?} after",
        ended - drained,
        ended.elapsed()
    );
    let new = lab.owner(COMMUNITY).unwrap().unwrap();
    wait_all_at(&lab, new);
    let served = lab.serve_file("8m.bin", 8).unwrap();
    let url = "http://203.0.113.2/8m.bin";
    let (bytes, _, out) = lab.download(&t3, url, "after-drain.bin").unwrap();
    assert_eq!(bytes, 8 << 20);
    assert_eq!(sha256(&out), sha256(&served));
    assert!(lab.node_status(owner).unwrap().communities.is_empty());
}
