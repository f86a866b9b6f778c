//! `bond-ctl`: run the agent, or look at a running one.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use bond_agent as agent;
use bond_api::{self as control, Request};
use bond_config::{Config, WeightSpec};
use bond_datapath::{self as datapath, Maps};
use bond_relay as dist;

mod logs;
mod manual;
#[cfg(test)]
mod operator_doc;
mod services;
mod show;
mod tier;
mod top;

#[derive(Parser)]
#[command(
    name = "bond-ctl",
    version,
    about = "bond: bandwidth bonding for a community of hosts",
    after_long_help = manual::FILES
)]
pub(crate) struct Cli {
    /// bpffs mount the maps are pinned under (as `<bpffs>/bond/<instance>`).
    #[arg(long, global = true, env = "BOND_BPFFS", default_value = datapath::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Directory of the agents' sockets (`<run-dir>/<instance>.sock`).
    #[arg(long, global = true, env = "BOND_RUN_DIR", default_value = control::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// The agent instance to talk to.
    #[arg(long, global = true, default_value = "default")]
    instance: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (role from the file: terminal or server).
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// The agent's state: session, links and their weights, peers, rejects.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The peer table: every link of the community as this agent sees it.
    Peers {
        #[arg(long)]
        json: bool,
    },
    /// Per-link packet and byte counters, and drops by reason (read from
    /// the pinned maps; works while the agent is down).
    Links {
        #[arg(long)]
        json: bool,
    },
    /// The server's flow table: each flow's dedicated port and counters.
    Flows {
        #[arg(long)]
        json: bool,
    },
    /// Set a link's weights by hand, or hand them to measurement.
    Weight {
        #[command(subcommand)]
        cmd: WeightCmd,
    },
    /// Take this host's links out of use, let traffic on them finish, then
    /// leave the community (SHUTDOWN) and stop the agent.
    Drain {
        /// Leave after this long even if traffic is still on the links.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        /// Return at once instead of waiting for the agent to leave.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the agent but leave the datapath running; the next agent of
    /// this instance adopts it (restarts and upgrades without a gap).
    Detach,
    /// Read the agent's configuration file again (as SIGHUP does): what
    /// can change while running is applied; a file with an error, or a
    /// change that takes a restart, changes nothing and says why.
    Reload,
    /// The links live: each one's rate up and down against its weight, its
    /// delay, missed announces, and the drops (q quits).
    Top {
        /// How often to read and redraw.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Prometheus metrics, as the agent's `metrics` endpoint serves them.
    Metrics,
    /// Push a file to many terminals through relay trees, fastest first
    /// (this host is the main server; its `[dist]` state holds the
    /// network information database).
    Distribute {
        file: PathBuf,
        /// A terminal configuration with a `[dist]` table (its key and
        /// state directory are used).
        #[arg(long)]
        config: PathBuf,
        /// `all`, or target ids (community addresses) separated by commas.
        #[arg(long, default_value = "all")]
        to: String,
        /// striped: the file in `--fanout` stripes, each down a tree of its
        /// own, so every terminal uploads; tree: the seed's relay tree;
        /// star: every terminal fetches from here (a baseline).
        #[arg(long, value_enum, default_value = "striped")]
        mode: dist::main_server::Mode,
        /// Requests each relay (and the main server, for a tree) sends; the
        /// number of stripes.
        #[arg(long, default_value_t = 3)]
        fanout: u32,
        /// Chunk size in KiB.
        #[arg(long, default_value_t = dist::chunk::DEFAULT_CHUNK / 1024)]
        chunk_kib: u32,
        /// Give up on the rest when nothing was heard for this long.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        stall: Duration,
        /// The final report as JSON on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
    /// The network information database: every terminal, ranked fastest
    /// first, with its response time, throughput and history.
    Terminals {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Get a URL through this host's peer cache (the agent's proxy): from
    /// a community peer that holds it, else from the origin.
    Fetch {
        url: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
        /// A terminal configuration with a `[cache]` table (its proxy
        /// address is used).
        #[arg(long)]
        config: PathBuf,
        /// What was fetched, from where, as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The peer cache: this host's, or the referral server's table.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// The ISP tier's registry in etcd: nodes, communities and their
    /// owners, draining.
    Tier {
        /// etcd's client URLs (http://host:port), separated by commas.
        #[arg(long, env = "BOND_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// etcd's user, where its authentication is on (with
        /// --etcd-password-file).
        #[arg(long, env = "BOND_ETCD_USER", requires = "etcd_password_file")]
        etcd_user: Option<String>,
        /// A file whose first line is that user's password.
        #[arg(long, env = "BOND_ETCD_PASSWORD_FILE", requires = "etcd_user")]
        etcd_password_file: Option<PathBuf>,
        /// Where the registry lives in etcd's key space.
        #[arg(long, default_value = "/bond")]
        prefix: String,
        #[command(subcommand)]
        cmd: tier::TierCmd,
    },
    /// A terminal's own key pair, for a community whose server takes only
    /// the terminals it knows by key (`identity` in the terminal's file;
    /// its public key in the server's `terminals`, or `bond-ctl tier
    /// authorize`).
    Identity {
        #[command(subcommand)]
        cmd: IdentityCmd,
    },
    /// The server's NAT allocation log (RFC 7422): which community held an
    /// address and port at a time, for an abuse request.
    Nat {
        #[command(subcommand)]
        cmd: NatCmd,
    },
    /// A completion script for a shell, on stdout (the package installs
    /// them; `source <(bond-ctl completions bash)` for this shell only).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (bond-ctl(8) and one per subcommand) into a
    /// directory.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum IdentityCmd {
    /// Make a new secret key in a new file (mode 0600) and print its
    /// public key.
    New {
        /// The file to write; an existing one is never overwritten.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Print the public key of a secret key file.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NatCmd {
    /// The community that held ADDRESS:PORT at a time, from the log of
    /// blocks given and taken back (`nat_log` in the server's file).
    Who {
        address: std::net::Ipv4Addr,
        port: u16,
        /// When, RFC 3339 (e.g. 2026-12-05T13:00:00Z); default: now.
        #[arg(long)]
        at: Option<String>,
        /// The server's configuration file (its `nat_log` is read).
        #[arg(long, required_unless_present = "log")]
        config: Option<PathBuf>,
        /// The log itself, instead of `--config`; again for each file of a
        /// rotated log, oldest first.
        #[arg(long, conflicts_with = "config")]
        log: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// What this host's cache holds, its workload, where its objects came
    /// from.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The referral server's table: every URL with its holders, best
    /// first, and every peer with its measured speed and workload.
    Table {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WeightCmd {
    /// Pin weights: the link's rate in kbit/s, or `auto` (measured).
    Set {
        link: u8,
        /// Both directions (unless --up or --down say otherwise).
        #[arg(long)]
        both: Option<WeightSpec>,
        #[arg(long)]
        up: Option<WeightSpec>,
        #[arg(long)]
        down: Option<WeightSpec>,
    },
    /// Measure both directions of a link and weigh it by its rate.
    Auto { link: u8 },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.len()),
    );
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: want e.g. 30s, 500ms, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?}: unit must be ms, s or m")),
    }
}

/// An agent started as `--instance NAME` (`bond@NAME`) runs only a file of
/// that instance: its socket and pins are found by that name.
fn same_instance(named: Option<&str>, cfg: &Config, path: &std::path::Path) -> Result<()> {
    match named {
        Some(name) if name != cfg.instance() => bail!(
            "--instance {name}: {} is instance {:?} (`instance = ...`); name the file after its instance",
            path.display(),
            cfg.instance()
        ),
        _ => Ok(()),
    }
}

/// A terminal configuration with a `[dist]` table.
fn dist_config(path: &std::path::Path) -> Result<bond_config::TerminalConfig> {
    match Config::load(path)? {
        Config::Terminal(t) if t.dist.is_some() => Ok(t),
        _ => bail!(
            "{}: not a terminal configuration with a [dist] table",
            path.display()
        ),
    }
}

/// A terminal configuration with a `[cache]` table.
fn cache_config(
    path: &std::path::Path,
) -> Result<(bond_config::TerminalConfig, bond_config::CacheConfig)> {
    match Config::load(path)? {
        Config::Terminal(t) => match t.cache.clone() {
            Some(c) => Ok((t, c)),
            None => bail!("{}: no [cache] table", path.display()),
        },
        _ => bail!("{}: not a terminal configuration", path.display()),
    }
}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // `--instance` given (as the unit does), not its default.
    let named = matches.value_source("instance") == Some(clap::parser::ValueSource::CommandLine);
    logs::init();
    let maps = Maps::new(datapath::pin_dir(&cli.bpffs, &cli.instance));
    let socket = control::socket_path(&cli.run_dir, &cli.instance);
    let ask = |req: Request| control::request(&socket, &req);
    match cli.cmd {
        Cmd::Agent { config } => {
            // The agent's end, and a panic, go to its log at their level
            // (under systemd, the journal's priority), not only to stderr.
            logs::panics_to_log();
            let run = || -> Result<()> {
                let cfg = Config::load(&config)?;
                same_instance(named.then_some(cli.instance.as_str()), &cfg, &config)?;
                let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
                let paths = agent::Paths {
                    bpffs: cli.bpffs.clone(),
                    run_dir: cli.run_dir.clone(),
                    config: config.clone(),
                };
                rt.block_on(agent::run(cfg, paths, services::start()))
            };
            if let Err(e) = run() {
                tracing::error!("stopped: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Check { config } => {
            let cfg = Config::load(&config)?;
            println!("{}: ok", config.display());
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            for warning in rt.block_on(veth_warnings(&cfg)) {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Cmd::Status { json } => show::status(&ask(Request::Status)?, json),
        Cmd::Peers { json } => show::peers(&ask(Request::Peers)?, json),
        Cmd::Links { json } => show::links(&maps, json),
        Cmd::Flows { json } => show::flows(&maps, json),
        Cmd::Weight { cmd } => {
            let req = match cmd {
                WeightCmd::Set {
                    link,
                    both,
                    up,
                    down,
                } => {
                    if both.is_none() && up.is_none() && down.is_none() {
                        bail!("say which weight: --both, --up or --down");
                    }
                    Request::Weight {
                        link,
                        up: up.or(both),
                        down: down.or(both),
                    }
                }
                WeightCmd::Auto { link } => Request::Weight {
                    link,
                    up: Some(WeightSpec::Auto),
                    down: Some(WeightSpec::Auto),
                },
            };
            let v = ask(req)?;
            println!(
                "link {}: up {}, down {}",
                v["link"],
                v["up"].as_str().unwrap_or("?"),
                v["down"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        Cmd::Drain { timeout, no_wait } => {
            ask(Request::Drain {
                timeout_ms: timeout.as_millis() as u64,
            })?;
            eprintln!("draining: this host's links are leaving the schedules");
            if no_wait {
                return Ok(());
            }
            // The agent leaves once its links are quiet; its socket goes
            // with it.
            let start = std::time::Instant::now();
            while ask(Request::Status).is_ok() {
                std::thread::sleep(Duration::from_millis(250));
                if start.elapsed() > timeout + Duration::from_secs(10) {
                    bail!(
                        "the agent is still running {}s after the drain began",
                        start.elapsed().as_secs()
                    );
                }
            }
            eprintln!(
                "drained and left after {:.1}s",
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Cmd::Reload => {
            let v = ask(Request::Reload)?;
            println!("reloaded: {}", v["changed"]);
            Ok(())
        }
        Cmd::Detach => {
            ask(Request::Detach)?;
            eprintln!("detached: the datapath keeps running; start the agent again to adopt it");
            Ok(())
        }
        Cmd::Distribute {
            file,
            config,
            to,
            mode,
            fanout,
            chunk_kib,
            stall,
            json,
        } => {
            let cfg = dist_config(&config)?;
            if !(1..=64).contains(&fanout) {
                bail!("--fanout {fanout}: must be 1..=64");
            }
            let chunk_size = chunk_kib
                .checked_mul(1024)
                .filter(|c| (1..=dist::chunk::MAX_CHUNK).contains(c))
                .with_context(|| {
                    format!(
                        "--chunk-kib {chunk_kib}: must be 1..={}",
                        dist::chunk::MAX_CHUNK / 1024
                    )
                })?;
            let opts = dist::main_server::Options {
                file,
                to: if to == "all" {
                    Vec::new()
                } else {
                    to.split(',').map(|s| s.trim().to_string()).collect()
                },
                mode,
                fanout,
                chunk_size,
                stall,
                progress: true,
            };
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            let report = rt.block_on(dist::main_server::distribute(
                &cfg.key,
                &cfg.dist_state(),
                opts,
            ))?;
            show::distribution(&report, json)?;
            if report.failed > 0 {
                std::process::exit(2);
            }
            Ok(())
        }
        Cmd::Tier {
            etcd,
            etcd_user,
            etcd_password_file,
            prefix,
            cmd,
        } => {
            let user = bond_config::etcd_login(etcd_user.as_deref(), etcd_password_file.as_deref())
                .map_err(|e| anyhow::anyhow!("--etcd-password-file {e}"))?;
            let etcd = bond_tier::Etcd {
                endpoints: etcd,
                user,
            };
            tier::run(&etcd, &prefix, cmd)
        }
        Cmd::Nat {
            cmd:
                NatCmd::Who {
                    address,
                    port,
                    at,
                    config,
                    log,
                    json,
                },
        } => {
            let logs = match (log, config) {
                (l, _) if !l.is_empty() => l,
                (_, Some(c)) => match Config::load(&c)? {
                    Config::Server(s) => vec![s.nat_log()],
                    _ => bail!("{}: not a server's configuration (`role`)", c.display()),
                },
                _ => bail!("name the log: --config FILE or --log FILE"),
            };
            let at = match at {
                Some(t) => humantime::parse_rfc3339_weak(&t)
                    .with_context(|| format!("--at {t:?}: want e.g. 2026-12-05T13:00:00Z"))?,
                None => std::time::SystemTime::now(),
            };
            let mut text = String::new();
            for l in &logs {
                let t = std::fs::read_to_string(l)
                    .with_context(|| format!("NAT log {}", l.display()))?;
                text.push_str(&t);
                if !text.ends_with('\n') {
                    text.push('\n');
                }
            }
            let held = agent::nat::who(&text, address, port, at)
                .map_err(anyhow::Error::msg)
                .context("NAT log")?;
            let report =
                agent::nat::WhoReport::new(address, port, at, &held).map_err(anyhow::Error::msg)?;
            if json {
                return show::print_json(&report);
            }
            if report.held.is_empty() {
                println!(
                    "{address}:{port}: no community held it at {} (as far as the log goes)",
                    report.at
                );
            }
            for h in &report.held {
                let until = h
                    .until
                    .as_ref()
                    .map_or("still held".to_string(), |u| format!("until {u}"));
                println!(
                    "{address}:{port}: community {} since {}, {until}",
                    h.community, h.since
                );
            }
            Ok(())
        }
        Cmd::Identity { cmd } => {
            use bond_proto::identity::Identity;
            let (id, file, json) = match cmd {
                IdentityCmd::New { out, json } => {
                    let id = Identity::generate().map_err(anyhow::Error::msg)?;
                    id.save(&out).map_err(anyhow::Error::msg)?;
                    (id, out, json)
                }
                IdentityCmd::Show { file, json } => (
                    Identity::load(&file).map_err(anyhow::Error::msg)?,
                    file,
                    json,
                ),
            };
            if json {
                return show::print_json(&serde_json::json!({
                    "file": file,
                    "public": id.public().to_string(),
                }));
            }
            println!("{}", id.public());
            Ok(())
        }
        Cmd::Terminals { config, json } => {
            let cfg = dist_config(&config)?;
            let db = dist::db::NetDb::open(&cfg.dist_state().join("net.db"))?;
            show::terminals(&db.ranked()?, json)
        }
        Cmd::Fetch {
            url,
            output,
            config,
            json,
        } => {
            let (_, c) = cache_config(&config)?;
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            let report = rt.block_on(bond_cache::fetch::through_proxy(
                c.proxy,
                &url,
                &output,
                show::progress_bar(),
            ))?;
            show::fetched(&report, json)
        }
        Cmd::Cache { cmd } => {
            let rt = tokio::runtime::Runtime::new().context("starting tokio")?;
            let (config, json, table) = match cmd {
                CacheCmd::Status { config, json } => (config, json, false),
                CacheCmd::Table { config, json } => (config, json, true),
            };
            let (t, c) = cache_config(&config)?;
            let v = rt.block_on(async {
                let net = bond_agent::net::Net::new()?;
                let lan = net.iface(&t.lan).await.context("field `lan`")?;
                let ip = net.ipv4(&lan).await.context("field `lan`")?;
                bond_cache::ask_service(&t.key, ip, &c, table).await
            })?;
            if table {
                show::cache_table(&v, json)
            } else {
                show::cache_status(&v, json)
            }
        }
        Cmd::Top { interval } => {
            use std::io::IsTerminal as _;
            if !std::io::stdout().is_terminal() {
                bail!(
                    "`top` draws on a terminal; for a program, `links --json` and `status --json`"
                );
            }
            if interval < Duration::from_millis(100) {
                bail!("--interval {interval:?}: at least 100ms");
            }
            // A stuck agent holds each refresh up by at most this much
            // (and the counters, read from the maps, go on).
            let limit = (interval / 2).clamp(Duration::from_millis(200), Duration::from_secs(1));
            top::run(
                &maps,
                &|req| control::request_within(&socket, &req, limit),
                interval,
            )
        }
        Cmd::Completions { shell } => {
            manual::completions(shell, &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { dir } => {
            for page in manual::pages(&dir)? {
                println!("{}", page.display());
            }
            Ok(())
        }
        Cmd::Metrics => {
            print!(
                "{}",
                ask(Request::Metrics)?["value"].as_str().unwrap_or_default()
            );
            Ok(())
        }
    }
}

/// What `check` warns of on this host: veths XDP would go on whose other
/// ends need setting (the agent sets them at start) or cannot be reached
/// (the agent will not start), and interfaces not here (yet).
async fn veth_warnings(cfg: &Config) -> Vec<String> {
    let (ifaces, how): (Vec<&str>, _) = match cfg {
        Config::Terminal(t) => (
            std::iter::once(t.lan.as_str())
                .chain(t.links.iter().map(|l| l.interface.as_str()))
                .collect(),
            t.attach.veth,
        ),
        Config::Server(s) => (
            s.interfaces.iter().map(String::as_str).collect(),
            s.attach.veth,
        ),
        Config::Director(d) => (
            d.interfaces.iter().map(String::as_str).collect(),
            d.attach.veth,
        ),
    };
    if how == bond_config::VethAttach::Trust {
        return Vec::new();
    }
    let Ok(net) = bond_agent::net::Net::new() else {
        return vec!["rtnetlink unavailable: interfaces not checked".into()];
    };
    let mut out = Vec::new();
    for i in ifaces {
        match bond_agent::veth::other_end(&net, i, false).await {
            Ok(other) => out.extend(other.report(i, false)),
            Err(e) => out.push(format!("{i}: {e:#}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_examples_parse_and_a_unit_runs_only_its_own_instance() {
        let t = Config::parse(
            include_str!("../../packaging/examples/terminal.toml"),
            "terminal.toml",
        )
        .unwrap();
        let s = Config::parse(
            include_str!("../../packaging/examples/server.toml"),
            "server.toml",
        )
        .unwrap();
        for (text, role) in [
            (include_str!("../../packaging/examples/node.toml"), "server"),
            (
                include_str!("../../packaging/examples/director.toml"),
                "director",
            ),
        ] {
            match (Config::parse(text, role).unwrap(), role) {
                (Config::Server(s), "server") => assert!(s.tier.is_some()),
                (Config::Director(_), "director") => {}
                _ => panic!("the {role} example is of another role"),
            }
        }
        let path = std::path::Path::new("/etc/bond/t1.toml");
        same_instance(Some("t1"), &t, path).unwrap();
        same_instance(None, &s, path).unwrap();
        let e = same_instance(Some("t1"), &s, path).unwrap_err().to_string();
        assert!(
            e.contains("--instance t1") && e.contains("\"srv\"") && e.contains("/etc/bond/t1.toml"),
            "{e}"
        );
    }
}
