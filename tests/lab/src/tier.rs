//! Figure 1 with an ISP tier in place of the one server: the server's
//! namespace becomes the site's router and director (`bond_director` on
//! `wan0`, the front address 198.51.100.1 as before), an etcd cluster of
//! three members runs there (on 10.0.9.1-3), and `nodes` reconstitution
//! nodes share one Ethernet segment with it (the site's switch, a bridge
//! in a namespace of its own): the router is 10.0.10.1/24 there, node `i`
//! 10.0.10.(10+i). Each node holds the front address on its loopback and
//! answers terminals from it directly; its NAT address is
//! 203.0.113.(128+i), routed to it by the router (the content host
//! reaches 203.0.113.128/25 through the router). On one segment, the
//! director reaches every node and each node every other by Ethernet
//! address, as a real site's switch allows.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, bail};

use crate::{KEY, KEY2, Lab, PORT, SERVER_WAN, run};

/// etcd member `m`'s client URL (1-based).
pub fn etcd_url(m: usize) -> String {
    format!("http://10.0.9.{m}:2379")
}

/// Node `i`'s own address on the site's segment (1-based).
pub fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 10, 10 + i as u8)
}

/// Node `i`'s NAT address (1-based).
pub fn node_nat(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 128 + i as u8)
}

impl Lab {
    /// Turns the server's namespace into a site of `nodes` nodes (call
    /// before starting anything; [`Self::start_server`] then starts the
    /// cluster, the nodes and the director).
    pub fn add_tier(&mut self, nodes: usize) -> Result<()> {
        let srv = self.server_ns.clone();
        let web = self.web_ns.clone();
        for m in 1..=3 {
            self.ip(&srv, &format!("addr add 10.0.9.{m}/32 dev lo"))?;
        }
        let switch = self.ns("site")?;
        self.ip(&switch, "link add br0 type bridge")?;
        self.ip(&switch, "link set br0 up")?;
        self.veth((&srv, "site0", Some("10.0.10.1/24")), (&switch, "r0", None))?;
        self.ip(&switch, "link set r0 master br0")?;
        // Nodes answer from the front address: the router forwards what
        // comes from it.
        self.sysctl(&srv, "net.ipv4.conf.all.rp_filter=0")?;
        self.sysctl(&srv, "net.ipv4.conf.site0.accept_local=1")?;
        self.sysctl(&srv, "net.ipv4.conf.site0.rp_filter=0")?;
        for i in 1..=nodes {
            let ns = self.ns(&format!("n{i}"))?;
            let node = node_address(i);
            self.veth(
                (&ns, "site0", Some(&format!("{node}/24"))),
                (&switch, &format!("n{i}"), None),
            )?;
            self.ip(&switch, &format!("link set n{i} master br0"))?;
            self.ip(&ns, &format!("addr add {SERVER_WAN}/32 dev lo"))?;
            self.ip(&ns, &format!("addr add {}/32 dev lo", node_nat(i)))?;
            self.ip(&ns, "route add default via 10.0.10.1")?;
            self.ip(&srv, &format!("route add {}/32 via {node}", node_nat(i)))?;
        }
        self.ip(&web, "route add 203.0.113.128/25 via 203.0.113.1")?;
        self.tier = nodes;
        Ok(())
    }

    /// Node `i` dies: its link goes down and its agent is SIGKILLed.
    pub fn crash_node(&mut self, i: usize) -> Result<()> {
        self.ip(&self.node_ns(i), "link set site0 down")?;
        self.stop(&format!("agent-n{i}"), true)
    }

    /// Node `i`'s namespace and agent instance (1-based).
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    /// Node `i`'s server configuration.
    pub fn node_config(&self, i: usize) -> String {
        let etcd: Vec<String> = (1..=3).map(|m| format!("{:?}", etcd_url(m))).collect();
        format!(
            "role = \"server\"\ninstance = \"{}\"\naddress = \"{SERVER_WAN}\"\nport = {PORT}\n\
             nat_address = \"{}\"\nnat_ports = \"{}\"\nnat_log = {:?}\ninterfaces = [\"site0\"]\n{}{}\
             \n[tier]\netcd = [{}]\nnode = \"n{i}\"\nnode_address = \"{}\"\n",
            self.node_ns(i),
            node_nat(i),
            self.nat_ports,
            self.dir.join(format!("n{i}-nat.log")),
            self.site_key_line(),
            self.server_keys,
            etcd.join(", "),
            node_address(i)
        )
    }

    /// The cluster, the nodes, the director, and the lab's communities
    /// registered (as [`Self::start_server`] does in a tier).
    pub(crate) fn start_tier(&mut self) -> Result<()> {
        let srv = self.server_ns.clone();
        for m in 1..=3 {
            let args = crate::site::etcd_member_args(m, 3, &self.dir, &self.prefix);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.spawn(&srv, &format!("etcd-e{m}"), "etcd", &args)?;
        }
        self.wait_for("etcd", Duration::from_secs(20), |lab| {
            Ok(lab.tier_ctl(&["nodes"]).is_ok())
        })?;
        self.make_site_key()?;
        let bond_ctl = self.bond_ctl.to_string_lossy().into_owned();
        for i in 1..=self.tier {
            let cfg = self.dir.join(format!("n{i}.toml"));
            std::fs::write(&cfg, self.node_config(i))?;
            let (ns, cfg) = (self.node_ns(i), cfg.to_string_lossy().into_owned());
            self.spawn(
                &ns,
                &format!("agent-n{i}"),
                &bond_ctl,
                &["agent", "--config", &cfg],
            )?;
        }
        let etcd: Vec<String> = (1..=3).map(|m| format!("{:?}", etcd_url(m))).collect();
        let mut director = format!(
            "role = \"director\"\ninstance = \"{}\"\naddress = \"{SERVER_WAN}\"\nport = {PORT}\n\
             interfaces = [\"wan0\"]\netcd = [{}]\n",
            self.server_instance,
            etcd.join(", ")
        );
        if let Some(ms) = self.health_timeout_ms {
            director.push_str(&format!("health_timeout_ms = {ms}\n"));
        }
        let cfg = self.dir.join("director.toml");
        std::fs::write(&cfg, director)?;
        let cfg = cfg.to_string_lossy().into_owned();
        self.spawn(&srv, "agent-srv", &bond_ctl, &["agent", "--config", &cfg])?;
        let nodes = self.tier;
        self.wait_for("every node registered", Duration::from_secs(20), |lab| {
            let out = lab.tier_ctl(&["nodes", "--json"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            Ok(v["nodes"].as_array().map(Vec::len) == Some(nodes))
        })?;
        let key = self.dir.join("community.key");
        for (c, k) in [(crate::COMMUNITY, KEY), (crate::COMMUNITY2, KEY2)] {
            std::fs::write(&key, k)?;
            let (c, key) = (c.to_string(), key.to_string_lossy().into_owned());
            let mut args = vec!["add", &c, "--key-file", &key];
            if self.identities && c == crate::COMMUNITY.to_string() {
                args.push("--terminal-keys");
            }
            self.tier_ctl(&args)?;
        }
        if self.identities {
            self.authorize_terminals()?;
        }
        // The director steers both once the controller placed them and it
        // has found each owner's MAC.
        self.wait_for("the director to steer", Duration::from_secs(10), |lab| {
            let s = lab.director_status()?;
            Ok(s.steered == 2 && s.nodes.iter().all(|n| n.mac.is_some()))
        })
    }

    /// A new identity for each terminal of the first community, each
    /// authorised in the registry by its LAN address.
    fn authorize_terminals(&mut self) -> Result<()> {
        for i in 0..self.terminals.len() {
            if self.terminals[i].community != crate::COMMUNITY {
                continue;
            }
            let file = self.identity_file(i);
            let _ = std::fs::remove_file(&file);
            let public = run(std::process::Command::new(&self.bond_ctl)
                .args(["identity", "new", "--out"])
                .arg(&file))?;
            let addr = self.terminals[i].lan_ip.to_string();
            let c = crate::COMMUNITY.to_string();
            self.tier_ctl(&["authorize", &c, &addr, public.trim()])?;
        }
        Ok(())
    }

    /// `bond-ctl tier ARGS` from the site's router.
    pub fn tier_ctl(&self, args: &[&str]) -> Result<String> {
        let etcd: Vec<String> = (1..=3).map(etcd_url).collect();
        run(self
            .cmd(&self.server_ns, &self.bond_ctl.to_string_lossy())
            .args(["tier", "--etcd", &etcd.join(",")])
            .args(args))
    }

    pub fn director_status(&self) -> Result<bond_api::reply::DirectorStatus> {
        match self.ctl_reply(&self.server_ns, &self.server_instance, "status")? {
            bond_api::reply::Status::Director(d) => Ok(d),
            _ => bail!("the server's namespace runs no director"),
        }
    }

    /// The node (1-based) that owns `community`, as the registry says.
    pub fn owner(&self, community: u32) -> Result<Option<usize>> {
        let out = self.tier_ctl(&["communities", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let row = v["communities"]
            .as_array()
            .context("communities")?
            .iter()
            .find(|c| c["id"] == u64::from(community));
        Ok(row
            .and_then(|r| r["owner"].as_str())
            .and_then(|o| o.strip_prefix('n'))
            .and_then(|n| n.parse().ok()))
    }

    /// Node `i`'s server status.
    pub fn node_status(&self, i: usize) -> Result<bond_api::reply::ServerStatus> {
        match self.ctl_reply(&self.node_ns(i), &self.node_ns(i), "status")? {
            bond_api::reply::Status::Server(s) => Ok(s),
            _ => bail!("node {i} is not a server"),
        }
    }
}
