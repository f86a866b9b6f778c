//! The operator's requests: status, weights, reload, drain, metrics.

use super::*;
use crate::reply;

impl Agent {
    /// Reads the configuration file again and applies what may change
    /// while running: the community `key`, `announce_ms`, `misses`,
    /// `probe_ms` and the links' weights (a weight the file changes
    /// replaces one set with `bond-ctl weight`; one it leaves alone stays).
    /// A file that fails its checks, or that changes anything else (which
    /// takes a restart: `detach`, then start the agent), changes nothing;
    /// the error says why. Returns the fields that changed.
    pub(super) async fn reload(&mut self) -> Result<Vec<&'static str>, String> {
        let keep = "the running configuration stays";
        let new = match Config::load(&self.path) {
            Ok(Config::Terminal(t)) => t,
            Ok(Config::Server(_) | Config::Director(_)) => {
                return Err(format!("field `role` changed; {keep}"));
            }
            Err(e) => return Err(format!("{e}; {keep}")),
        };
        let old = &self.cfg;
        let unweighted = |c: &TerminalConfig| -> Vec<OwnLink> {
            c.links
                .iter()
                .map(|l| OwnLink {
                    weight: WeightSpec::Fixed(0),
                    up: None,
                    down: None,
                    ..l.clone()
                })
                .collect()
        };
        let restart: Vec<&str> = [
            ("instance", old.instance != new.instance),
            ("community", old.community != new.community),
            ("lan", old.lan != new.lan),
            ("data_port", old.data_port != new.data_port),
            ("device", old.device != new.device),
            ("capture", old.capture != new.capture),
            ("server", old.server != new.server),
            ("links", unweighted(old) != unweighted(&new)),
            ("metrics", old.metrics != new.metrics),
            ("dist", old.dist != new.dist),
            ("cache", old.cache != new.cache),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        crate::refuse_restart_fields(&restart, keep)?;
        let weights = |c: &TerminalConfig| -> Vec<(WeightSpec, WeightSpec)> {
            c.links.iter().map(|l| (l.up(), l.down())).collect()
        };
        // Read again each time: the file may hold a new key.
        let identity = super::start::load_identity(&new).map_err(|e| format!("{e:#}; {keep}"))?;
        let public = |id: &Option<Identity>| id.as_ref().map(Identity::public);
        let changed: Vec<&'static str> = [
            ("key", old.key != new.key),
            ("announce_ms", old.announce_ms != new.announce_ms),
            ("misses", old.misses != new.misses),
            ("probe_ms", old.probe_ms != new.probe_ms),
            ("weights", weights(old) != weights(&new)),
            ("identity", public(&self.identity) != public(&identity)),
        ]
        .into_iter()
        .filter_map(|(f, changed)| changed.then_some(f))
        .collect();
        for (o, (was, now)) in self.own.iter_mut().zip(old.links.iter().zip(&new.links)) {
            if was.up() != now.up() {
                o.up = Weight::new(now.up());
            }
            if was.down() != now.down() {
                o.down = Weight::new(now.down());
            }
        }
        if changed.contains(&"identity") {
            self.identity = identity;
            self.refused = false;
        }
        self.peers.set_misses(new.misses);
        self.interval = Duration::from_millis(u64::from(new.announce_ms));
        self.cfg = new;
        if changed.contains(&"weights") {
            self.update_weights().await.map_err(|e| format!("{e:#}"))?;
        }
        tracing::info!("configuration reloaded: changed {changed:?}");
        Ok(changed)
    }

    pub(super) async fn handle(&mut self, req: Request) -> Result<Value, String> {
        match req {
            Request::Status => reply(Status::Terminal(self.status())),
            Request::Peers => reply(Peers::Terminal {
                peers: self.peer_rows(),
            }),
            Request::Weight { link, up, down } => {
                let Some(o) = self.own.iter_mut().find(|o| o.ad.id == link) else {
                    return Err(match self.peers.owner(link) {
                        Some(ip) => format!("link {link} belongs to {ip}: set it there"),
                        None => format!("link {link} is not one of this host's links"),
                    });
                };
                if let Some(s) = up {
                    o.up = Weight::new(s);
                }
                if let Some(s) = down {
                    o.down = Weight::new(s);
                }
                let (up, down) = (o.up.spec, o.down.spec);
                tracing::info!("link {link} weights set: up {up}, down {down}");
                self.update_weights().await.map_err(|e| format!("{e:#}"))?;
                reply(WeightSet {
                    link,
                    up: up.to_string(),
                    down: down.to_string(),
                })
            }
            Request::Drain { timeout_ms } => {
                let now = Instant::now();
                self.drain = Some(Drain {
                    deadline: now + Duration::from_millis(timeout_ms),
                    quiet_since: now,
                    packets: 0,
                });
                tracing::info!("draining: this host's links leave the schedules");
                self.announce().await;
                self.apply_peers().await.map_err(|e| format!("{e:#}"))?;
                reply(Draining {
                    draining: true,
                    links: self.own.len(),
                })
            }
            Request::Detach => {
                tracing::info!("detaching: the datapath stays for the next agent");
                // The server is not to take the echoes' pause for dark links.
                if self.token.is_some() && !self.own.is_empty() {
                    self.restarting = true;
                    self.send_to_server(self.announce_body(), true).await;
                }
                reply(Detached { detached: true })
            }
            Request::Metrics => self
                .metrics()
                .map(Value::String)
                .map_err(|e| format!("{e:#}")),
            Request::Reload => {
                let changed = self.reload().await?;
                reply(Reloaded {
                    changed: changed.into_iter().map(String::from).collect(),
                })
            }
        }
    }

    pub(super) fn status(&self) -> TerminalStatus {
        let links = self
            .own
            .iter()
            .map(|o| api::OwnLink {
                link: o.ad.id,
                interface: o.iface.name.clone(),
                port: o.ad.port,
                up: o.ad.up,
                down: o.ad.down,
                up_weight: o.up.state(),
                down_weight: o.down.state(),
                active: o.entry.flags & LINK_VALID != 0,
                dark: o.dark(),
                carrier: o.iface.carrier,
                ethernet: o.iface.ethernet,
                address: o.addr,
                gateway: Some(o.gateway).filter(|g| !g.is_unspecified()),
                rtt_ms: o.echo.base_rtt().map(|r| r.as_secs_f64() * 1e3),
            })
            .collect();
        let schedule = self.schedule.iter().flatten();
        TerminalStatus {
            instance: self.cfg.instance.clone(),
            community: self.cfg.community,
            address: self.lan_ip,
            server: self.server(),
            logged_on: self.token.is_some(),
            identity: self.identity.as_ref().map(|i| i.public().to_string()),
            refused: self.refused,
            session_keyed: self.session.is_some(),
            announce_ms: self.cfg.announce_ms,
            uptime_s: self.started.elapsed().as_secs(),
            adopted: self.adopted,
            fallback: self.cfg.fallback,
            bonding: self.captured == Some(true) && self.can_bond(),
            attach: crate::attach_status(&self.attached),
            draining: self.drain.is_some(),
            links,
            peers: self.peers.peers().count(),
            schedule: schedule.clone().map(|&(l, k, _)| (l, k)).collect(),
            paths: schedule
                .map(|&(link, kbit, delay_ns)| UpPath {
                    link,
                    kbit,
                    delay_us: delay_ns / 1000,
                })
                .collect(),
            playout: self.playout.as_ref().map(|p| p.stats()),
            feedback: self.corrector.status(|_, id| u8::try_from(id).ok()),
            resend: self.resends,
            rejects: self.rejects.counts(),
            faults: self.faults.counts(),
        }
    }

    /// The seed's Table 1, one row per link (this host's own too), with
    /// whether the link is in this host's upstream schedule.
    pub(super) fn peer_rows(&self) -> Vec<PeerRow> {
        let sched: Vec<u8> = self
            .schedule
            .iter()
            .flatten()
            .filter(|(_, k, _)| *k > 0)
            .map(|(l, _, _)| *l)
            .collect();
        let mut rows: Vec<PeerRow> = self
            .own
            .iter()
            .map(|o| PeerRow {
                address: self.lan_ip,
                link: o.ad.id,
                port: o.ad.port,
                missed: 0,
                up: o.ad.up,
                down: o.ad.down,
                own: true,
                in_use: sched.contains(&o.ad.id),
            })
            .collect();
        for r in self.peers.rows(Instant::now()) {
            rows.push(PeerRow {
                address: r.address,
                link: r.link,
                port: r.port,
                missed: r.missed,
                up: r.up,
                down: r.down,
                own: false,
                in_use: r.link != 0 && sched.contains(&r.link),
            });
        }
        rows
    }

    pub(super) fn metrics(&self) -> Result<String> {
        let mut m = Metrics::default();
        let stats = self.maps.terminal_link_stats()?;
        m.family(
            "bond_link_packets_total",
            "counter",
            "Packets carried per link: up/down as origin, relay_up/relay_down for peers.",
        );
        for (id, _, s) in &stats {
            for (dir, v) in [
                ("up", s.up_pkts),
                ("down", s.down_pkts),
                ("relay_up", s.relay_up_pkts),
                ("relay_down", s.relay_down_pkts),
            ] {
                m.sample(
                    "bond_link_packets_total",
                    &[("link", id.to_string()), ("direction", dir.into())],
                    v,
                );
            }
        }
        m.family(
            "bond_link_bytes_total",
            "counter",
            "Bytes of carried (inner) packets per link.",
        );
        for (id, _, s) in &stats {
            for (dir, v) in [
                ("up", s.up_bytes),
                ("down", s.down_bytes),
                ("relay_up", s.relay_up_bytes),
                ("relay_down", s.relay_down_bytes),
            ] {
                m.sample(
                    "bond_link_bytes_total",
                    &[("link", id.to_string()), ("direction", dir.into())],
                    v,
                );
            }
        }
        m.family(
            "bond_link_late_packets_total",
            "counter",
            "Packets for this host that came over a link after one the server sent later.",
        );
        for (id, _, s) in &stats {
            m.sample(
                "bond_link_late_packets_total",
                &[("link", id.to_string())],
                s.down_late,
            );
        }
        // Links only: a peer without links has a row of its own (link 0,
        // which no link may have), and two such peers would repeat a
        // series, which Prometheus refuses for the whole scrape
        // (`bond_peers` counts them).
        let rows: Vec<_> = self
            .peer_rows()
            .into_iter()
            .filter(|r| r.link != 0)
            .collect();
        m.family(
            "bond_link_weight",
            "gauge",
            "Announced weight per link and direction.",
        );
        for r in &rows {
            for (dir, w) in [("up", r.up), ("down", r.down)] {
                m.sample(
                    "bond_link_weight",
                    &[("link", r.link.to_string()), ("direction", dir.into())],
                    w,
                );
            }
        }
        m.family(
            "bond_link_missed_announces",
            "gauge",
            "Announces missed by each link's owner.",
        );
        for r in &rows {
            m.sample(
                "bond_link_missed_announces",
                &[("link", r.link.to_string())],
                r.missed,
            );
        }
        m.family(
            "bond_drops_total",
            "counter",
            "Packets dropped by the datapath, by reason.",
        );
        for (why, v) in self.maps.terminal_drops()? {
            m.sample("bond_drops_total", &[("reason", why.into())], v);
        }
        self.rejects.metrics(&mut m);
        self.faults.metrics(&mut m);
        m.family(
            "bond_logged_on",
            "gauge",
            "1 while the terminal holds a session.",
        );
        m.sample("bond_logged_on", &[], u8::from(self.token.is_some()));
        m.family(
            "bond_capture_routed",
            "gauge",
            "1 while captured traffic goes into the capture device (bonded, or dropped with fallback = \"drop\"), 0 while it goes by the host's own routes.",
        );
        m.sample(
            "bond_capture_routed",
            &[],
            u8::from(self.captured == Some(true)),
        );
        m.family("bond_peers", "gauge", "Live LAN peers.");
        m.sample("bond_peers", &[], self.peers.peers().count());
        for s in &self.services {
            s.metrics(&mut m);
        }
        Ok(m.finish())
    }
}
