//! An ISP's site for the tier's tests: an etcd cluster and reconstitution
//! nodes, each in a namespace of its own, on one bridged network
//! (10.0.9.0/24, only inside these namespaces). etcd member `i` is
//! 10.0.9.`i`, node `i` 10.0.9.`10+i` (its NAT address 10.0.9.`20+i`),
//! and the bridge's own namespace, from which the operator's commands
//! run, 10.0.9.254. Everything is stopped and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// The network the site's namespaces share.
pub const SITE_NET: &str = "10.0.9";

pub struct Site {
    pub prefix: String,
    pub dir: PathBuf,
    bond_ctl: PathBuf,
    /// The bridge's namespace (the operator's seat).
    pub ns: String,
    /// etcd's client URLs, member by member.
    pub etcd: Vec<String>,
    members: usize,
    nodes: usize,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    /// Set by [`Site::enable_etcd_auth`]: root's password, for the
    /// lab's own etcdctl calls.
    root_password: Option<String>,
    /// The user the nodes and the operator's commands log in as, and the
    /// file holding its password (when etcd's authentication is on).
    pub etcd_user: Option<(String, PathBuf)>,
}

/// The user and role [`Site::enable_etcd_auth`] makes for bond.
pub const ETCD_USER: &str = "bond-site";

fn ip(args: &str) -> Result<String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

/// etcd member `m`'s command line (1-based, of `members`), listening on
/// 10.0.9.`m`, its data under `dir`.
pub fn etcd_member_args(m: usize, members: usize, dir: &Path, token: &str) -> Vec<String> {
    let peers: Vec<String> = (1..=members)
        .map(|i| format!("e{i}=http://{SITE_NET}.{i}:2380"))
        .collect();
    let me = format!("{SITE_NET}.{m}");
    vec![
        format!("--name=e{m}"),
        format!("--data-dir={}", dir.join(format!("e{m}.etcd")).display()),
        format!("--listen-client-urls=http://{me}:2379"),
        format!("--advertise-client-urls=http://{me}:2379"),
        format!("--listen-peer-urls=http://{me}:2380"),
        format!("--initial-advertise-peer-urls=http://{me}:2380"),
        format!("--initial-cluster={}", peers.join(",")),
        "--initial-cluster-state=new".into(),
        format!("--initial-cluster-token={token}"),
    ]
}

impl Site {
    /// The namespaces and the network; nothing started yet.
    pub fn build(bond_ctl: &Path, members: usize, nodes: usize) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        run(Command::new("etcd").arg("--version")).context(
            "etcd is not installed (Debian's etcd-server; `cargo xtask setup` installs it)",
        )?;
        let prefix = format!(
            "bs{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("bond-site-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut site = Self {
            ns: format!("{prefix}-site"),
            etcd: (1..=members)
                .map(|i| format!("http://{SITE_NET}.{i}:2379"))
                .collect(),
            prefix,
            dir,
            bond_ctl: bond_ctl.to_path_buf(),
            members,
            nodes,
            namespaces: Vec::new(),
            children: Vec::new(),
            root_password: None,
            etcd_user: None,
        };
        site.wire()?;
        Ok(site)
    }

    fn wire(&mut self) -> Result<()> {
        let ns = self.ns.clone();
        self.add_ns(&ns)?;
        ip(&format!("-n {ns} link add br0 type bridge"))?;
        ip(&format!("-n {ns} addr add {SITE_NET}.254/24 dev br0"))?;
        ip(&format!("-n {ns} link set br0 up"))?;
        let hosts: Vec<(String, u8)> = (1..=self.members)
            .map(|i| (format!("e{i}"), i as u8))
            .chain((1..=self.nodes).map(|i| (format!("n{i}"), 10 + i as u8)))
            .collect();
        for (name, host) in hosts {
            let full = self.name(&name);
            self.add_ns(&full)?;
            ip(&format!(
                "-n {ns} link add {name} type veth peer name site0 netns {full}"
            ))?;
            ip(&format!("-n {ns} link set {name} master br0 up"))?;
            ip(&format!(
                "-n {full} addr add {SITE_NET}.{host}/24 dev site0"
            ))?;
            if let Some(i) = name.strip_prefix('n') {
                let first = nat_first(i.parse()?);
                for nat in first..first + NAT_ADDRESSES {
                    ip(&format!("-n {full} addr add {SITE_NET}.{nat}/24 dev site0"))?;
                }
            }
            ip(&format!("-n {full} link set site0 up"))?;
            // XDP on a veth wants GRO on the receiving end.
            self.exec(&full, "ethtool", &["-K", "site0", "gro", "on", "tx", "off"])?;
        }
        Ok(())
    }

    fn add_ns(&mut self, full: &str) -> Result<()> {
        ip(&format!("netns add {full}"))?;
        self.namespaces.push(full.to_string());
        ip(&format!("-n {full} link set lo up")).map(drop)
    }

    /// A namespace's full name (`n1` -> `<prefix>-n1`).
    pub fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    pub fn cmd(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(program);
        c
    }

    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Result<String> {
        run(self.cmd(ns, program).args(args))
    }

    fn spawn(&mut self, short: &str, program: &str, args: &[String]) -> Result<()> {
        let log = std::fs::File::create(self.dir.join(format!("{short}.log")))?;
        let child = self
            .cmd(&self.name(short), program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program} for {short}"))?;
        self.children.push((short.to_string(), child));
        Ok(())
    }

    pub fn log(&self, short: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{short}.log"))).unwrap_or_default()
    }

    /// Starts every etcd member and waits until the cluster answers.
    pub fn start_etcd(&mut self) -> Result<()> {
        for i in 1..=self.members {
            let args = etcd_member_args(i, self.members, &self.dir, &self.prefix);
            self.spawn(&format!("e{i}"), "etcd", &args)?;
        }
        let start = Instant::now();
        while self.etcdctl(&["endpoint", "health", "--cluster"]).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("etcd not healthy after 20 s:\n{}", self.log("e1"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// etcdctl against the whole cluster, from the operator's seat (as
    /// root once authentication is on).
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        self.etcdctl_at(&self.etcd, args)
    }

    /// etcdctl with no user, whatever the site's authentication.
    pub fn etcdctl_anonymous(&self, args: &[&str]) -> Result<String> {
        run(self.etcdctl_cmd(&self.etcd).args(args))
    }

    fn etcdctl_at(&self, endpoints: &[String], args: &[&str]) -> Result<String> {
        let mut c = self.etcdctl_cmd(endpoints);
        if let Some(pw) = &self.root_password {
            c.arg(format!("--user=root:{pw}"));
        }
        run(c.args(args))
    }

    fn etcdctl_cmd(&self, endpoints: &[String]) -> Command {
        let mut c = self.cmd(&self.ns, "etcdctl");
        c.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--dial-timeout=2s");
        c
    }

    /// Turns etcd's authentication on, as an operator would: a root user,
    /// a role with read and write on the registry's prefix (`/bond`) and
    /// nothing else, and [`ETCD_USER`] in that role, whose password goes
    /// in a file of mode 0600. Nodes started after, and [`Site::tier`],
    /// log in as it.
    pub fn enable_etcd_auth(&mut self) -> Result<()> {
        let root = format!("root-{}", self.prefix);
        let password = format!("pw-{}-{ETCD_USER}", self.prefix);
        let file = self.dir.join("etcd-password");
        std::fs::write(&file, format!("{password}\n"))?;
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        for args in [
            vec!["user", "add", &format!("root:{root}")],
            vec!["role", "add", ETCD_USER],
            vec![
                "role",
                "grant-permission",
                ETCD_USER,
                "--prefix=true",
                "readwrite",
                "/bond/",
            ],
            vec!["user", "add", &format!("{ETCD_USER}:{password}")],
            vec!["user", "grant-role", ETCD_USER, ETCD_USER],
            vec!["auth", "enable"],
        ] {
            self.etcdctl(&args)?;
        }
        self.root_password = Some(root);
        self.etcd_user = Some((ETCD_USER.into(), file));
        Ok(())
    }

    /// The etcd member that leads the cluster now (1-based).
    pub fn etcd_leader(&self) -> Result<usize> {
        self.etcd_leader_among(&self.etcd)
    }

    /// The leader as the members at `endpoints` (those still up) say.
    pub fn etcd_leader_among(&self, endpoints: &[String]) -> Result<usize> {
        let out = self.etcdctl_at(endpoints, &["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        for m in v.as_array().context("a list")? {
            let s = &m["Status"];
            if s["leader"].is_u64() && s["leader"] == s["header"]["member_id"] {
                let url = m["Endpoint"].as_str().unwrap_or_default();
                return self
                    .etcd
                    .iter()
                    .position(|u| u == url)
                    .map(|i| i + 1)
                    .with_context(|| format!("{url} is not a member"));
            }
        }
        bail!("no leader among {out}")
    }

    /// The etcd member (1-based) node `i` is connected to now.
    pub fn member_used_by(&self, i: usize) -> Result<usize> {
        let ns = self.name(&format!("n{i}"));
        let out = self.exec(
            &ns,
            "ss",
            &["-Htn", "state", "established", "( dport = :2379 )"],
        )?;
        for line in out.lines() {
            let peer = line.split_whitespace().last().unwrap_or_default();
            if let Some(host) = peer
                .strip_suffix(":2379")
                .and_then(|a| a.strip_prefix(&format!("{SITE_NET}.")))
            {
                return host.parse().context("a member's address");
            }
        }
        bail!("n{i} has no connection to etcd: {out:?}")
    }

    /// Hands the cluster's leadership to member `m` (1-based).
    pub fn make_leader(&self, m: usize) -> Result<()> {
        let out = self.etcdctl_at(&self.etcd[m - 1..m], &["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let id = v[0]["Status"]["header"]["member_id"]
            .as_u64()
            .context("member id")?;
        let leader = self.etcd_leader()?;
        if leader != m {
            self.etcdctl_at(
                &self.etcd[leader - 1..leader],
                &["move-leader", &format!("{id:x}")],
            )?;
        }
        let start = Instant::now();
        while self.etcd_leader()? != m {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("member {m} did not become leader");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The agent instance of node `i`.
    pub fn instance(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }

    /// Node `i`'s server configuration: its own addresses, `[tier]`
    /// naming the cluster, and `extra` lines in `[tier]`. Its NAT pool of
    /// 16 addresses has 45,536 blocks of 8 ports (below the kernel's
    /// ephemeral ports, which the agent leaves to the host): a block for
    /// each of the tens of thousands of communities `bench tier` logs on
    /// at a node (they carry no flows).
    pub fn node_config(&self, i: usize, extra: &str) -> String {
        let etcd: Vec<String> = self.etcd.iter().map(|u| format!("{u:?}")).collect();
        let login = match &self.etcd_user {
            Some((user, file)) => format!("etcd_user = {user:?}\netcd_password_file = {file:?}\n"),
            None => String::new(),
        };
        format!(
            "role = \"server\"\ninstance = \"{}\"\naddress = \"{SITE_NET}.{}\"\n\
             nat_address = \"{SITE_NET}.{}\"\nnat_addresses = {NAT_ADDRESSES}\nnat_ports = \"10000-32767\"\n\
             nat_block = 8\nnat_log = {:?}\n\
             interfaces = [\"site0\"]\n\
             \n[tier]\netcd = [{}]\nnode = \"n{i}\"\n{login}{extra}",
            self.instance(i),
            10 + i,
            nat_first(i),
            self.dir.join(format!("n{i}-nat.log")),
            etcd.join(", ")
        )
    }

    /// Starts node `i`'s agent (its config as [`Self::node_config`]).
    pub fn start_node(&mut self, i: usize, extra: &str) -> Result<()> {
        let path = self.dir.join(format!("n{i}.toml"));
        std::fs::write(&path, self.node_config(i, extra))?;
        let bond_ctl = self.bond_ctl.to_string_lossy().into_owned();
        let args = [
            "--instance".to_string(),
            self.instance(i),
            "agent".into(),
            "--config".into(),
            path.to_string_lossy().into_owned(),
        ];
        self.spawn(&format!("n{i}"), &bond_ctl, &args)
    }

    /// Stops a child by its short name (`n2`, `e1`): SIGKILL, or SIGTERM
    /// and a wait.
    pub fn stop(&mut self, short: &str, kill: bool) -> Result<()> {
        let pos = self
            .children
            .iter()
            .position(|(n, _)| n == short)
            .with_context(|| format!("no {short} running"))?;
        let (_, mut c) = self.children.remove(pos);
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: plain kill(2) of a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
        c.wait()?;
        Ok(())
    }

    /// A running child's process id, by its short name.
    pub fn pid(&self, short: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == short)
            .map(|(_, c)| c.id())
    }

    pub fn is_running(&mut self, short: &str) -> bool {
        self.children
            .iter_mut()
            .any(|(n, c)| n == short && matches!(c.try_wait(), Ok(None)))
    }

    /// `bond-ctl tier ARGS` from the operator's seat, logged in as
    /// [`ETCD_USER`] once authentication is on.
    pub fn tier(&self, args: &[&str]) -> Result<String> {
        let mut c = self.tier_cmd();
        if let Some((user, file)) = &self.etcd_user {
            c.arg("--etcd-user")
                .arg(user)
                .arg("--etcd-password-file")
                .arg(file);
        }
        run(c.args(args))
    }

    /// `bond-ctl tier` with no login of its own (`--etcd` only).
    pub fn tier_cmd(&self) -> Command {
        let mut c = self.cmd(&self.ns, &self.bond_ctl.to_string_lossy());
        c.args(["tier", "--etcd", &self.etcd.join(",")]);
        c
    }

    /// `bond-ctl ARGS` against node `i`'s agent.
    pub fn node_ctl(&self, i: usize, args: &[&str]) -> Result<String> {
        run(self
            .cmd(
                &self.name(&format!("n{i}")),
                &self.bond_ctl.to_string_lossy(),
            )
            .args(["--instance", &self.instance(i)])
            .args(args))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            crate::remove_netns(ns);
        }
        for i in 1..=self.nodes {
            crate::remove_instance(&self.instance(i));
        }
        if std::env::var_os("BOND_LAB_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Addresses in each node's NAT pool.
const NAT_ADDRESSES: usize = 16;

/// The host number of node `i`'s first NAT address (its pool follows).
fn nat_first(i: usize) -> usize {
    100 + NAT_ADDRESSES * (i - 1)
}
