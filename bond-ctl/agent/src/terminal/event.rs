//! The terminal's event loop and its messages: announces to the LAN,
//! log-on, echoes and feedback to the server, relaying for peers, and what
//! arrives on its sockets.

use super::*;

impl Agent {
    pub(super) async fn run(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut playout_reports: playout::ReportRx,
        ebpf: &mut aya::Ebpf,
        pins: &mut Pins,
        mut signals: crate::Signals,
    ) -> Result<Exit> {
        let (tx, mut rx) = mpsc::channel::<Received>(1024);
        spawn_reader(self.lan_sock.clone(), Socket::Lan, tx.clone());
        for (i, o) in self.own.iter_mut().enumerate() {
            o.reader = Some(spawn_reader(o.sock.clone(), Socket::Link(i), tx.clone()));
        }
        let mut changes = crate::linkwatch::watch()?;
        let probe_period = |a: &Self| Duration::from_millis(u64::from(a.cfg.probe_ms));
        let mut announce = tokio::time::interval(self.interval);
        let mut refresh = tokio::time::interval(REFRESH);
        let mut probe = tokio::time::interval(probe_period(self));
        let mut echo = tokio::time::interval(pathmon::ECHO_INTERVAL);
        echo.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A reload may change the periods.
            if announce.period() != self.interval {
                announce = tokio::time::interval(self.interval);
            }
            if probe.period() != probe_period(self) {
                probe = tokio::time::interval(probe_period(self));
            }
            let deadline = self
                .peers
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = signals.stop.recv() => return Ok(Exit::Leave),
                _ = signals.hangup.recv() => {
                    if let Err(e) = self.reload().await {
                        tracing::warn!("SIGHUP: {e}");
                    }
                }
                _ = announce.tick() => self.announce().await,
                Some(report) = playout_reports.recv() => match report {
                    playout::Report::Feedback((_, links, shared)) => {
                        self.send_feedback(links, shared).await;
                    }
                    playout::Report::Resend(_, gaps) => {
                        self.send_to_server(Body::Resend { gaps }, false).await;
                    }
                },
                _ = refresh.tick() => {
                    let r = self.refresh().await;
                    self.faults.survive("refresh", r);
                    match self.drained() {
                        Ok(true) => {
                            tracing::info!("drained: leaving");
                            return Ok(Exit::Leave);
                        }
                        Ok(false) => {}
                        Err(e) => self.faults.survive("drain", Err(e)),
                    }
                }
                _ = probe.tick() => self.probe().await,
                _ = echo.tick() => {
                    let r = self.echo().await;
                    self.faults.survive("echo", r);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let gone = self.peers.expire(Instant::now());
                    if !gone.is_empty() {
                        tracing::warn!("peer(s) {gone:?} missed {} announces: dropped", self.cfg.misses);
                        let r = self.apply_peers().await;
                        self.faults.survive("apply_peers", r);
                    }
                }
                Some(r) = rx.recv() => {
                    let r = self.receive(r).await;
                    self.faults.survive("control_message", r);
                }
                Some(change) = changes.recv() => {
                    let r = self.link_changed(change, ebpf, pins, &tx).await;
                    self.faults.survive("link_change", r);
                }
                Some(call) = calls.recv() => {
                    let detach = call.req == Request::Detach;
                    let answer = self.handle(call.req).await;
                    let _ = call.reply.send(answer);
                    if detach {
                        return Ok(Exit::Detach);
                    }
                }
            }
            let r = self.sync_capture().await;
            self.faults.survive("capture", r);
        }
    }

    /// Whether this terminal can bond now: it holds a session and some
    /// link in its schedule reaches the server.
    pub(super) fn can_bond(&self) -> bool {
        self.token.is_some() && self.schedule.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// The message, signed with the community key, with this terminal's
    /// own key too if it makes or changes its session
    /// (`crate::server::admit`), and with the session key's MAC if it
    /// rides on a keyed session (its token: what goes to the server).
    pub(super) fn sign(&mut self, body: Body, link: u8, flags: u8, token: u64) -> Vec<u8> {
        let restarting = matches!(body, Body::Announce { .. }) && self.restarting;
        let identity = self.identity.as_ref().filter(|_| body.changes_session());
        let session = self.session.as_ref().filter(|_| token != 0);
        // What a LOGIN_REPLY may answer (`check_server_word`): what goes
        // to the server (over a link, or through a peer), not what the
        // whole LAN hears, and no probe (a train would push the rest out).
        let kept = match (&body, flags & (flags::VIA_LINK | flags::RELAY) != 0) {
            (_, false) | (Body::Probe { .. }, _) => None,
            (Body::Login { .. }, true) => Some(true),
            (_, true) => Some(false),
        };
        let bytes = Msg {
            community: self.cfg.community,
            origin: self.lan_ip,
            link,
            flags: flags | if restarting { flags::RESTARTING } else { 0 },
            token,
            time_ms: bond_proto::now_ms(),
            counter: self.counter.bump(),
            body,
        }
        .encode_with(&self.cfg.key, identity, session);
        if let (Some(login), Some(t)) = (kept, control::tag_of(&bytes)) {
            let (ring, max) = match login {
                true => (&mut self.logins, LOGINS_KEPT),
                false => (&mut self.sent, SENT_KEPT),
            };
            if ring.len() == max {
                ring.pop_front();
            }
            ring.push_back(t);
        }
        bytes
    }

    /// Whether this terminal waits for a session key: it pins the site
    /// key, and its session has none (its agent restarted and took the
    /// token from its maps) though the server keys sessions here (it has
    /// not said otherwise). It then logs on again at once, keeping its
    /// token, and takes no other word of the server's until it has one.
    pub(super) fn wants_key(&self) -> bool {
        self.cfg.server.key.is_some() && self.session.is_none() && !self.unkeyed
    }

    /// A LOGIN: with this login's exchange key where the server's site key
    /// is pinned (the same until the server asks for a new login, so a
    /// LOGIN sent again makes the same session key).
    pub(super) fn login_body(&mut self) -> Body {
        if self.cfg.server.key.is_none() {
            return Body::Login { exchange: None };
        }
        if self.exchange.is_none() {
            match session::Exchange::generate() {
                Ok(e) => self.exchange = Some(e),
                Err(e) => self.faults.survive("session_key", Err(anyhow::anyhow!(e))),
            }
        }
        Body::Login {
            exchange: self.exchange.as_ref().map(session::Exchange::public),
        }
    }

    /// Whether a message from the server to this host is the server's: a
    /// LOGIN_REPLY signed by the site key this terminal pins and answering
    /// a message this terminal sent in its current session (not one a
    /// member asked for and passes on, nor one to a message of an earlier
    /// session); anything else with its session's MAC while the session
    /// is keyed. Checked before its counter counts, so no member can push
    /// the server's window ahead here with forged ones.
    fn check_server_word(&self, msg: &Msg, buf: &[u8]) -> Result<(), &'static str> {
        match (&msg.body, &self.cfg.server.key, &self.session) {
            (Body::LoginReply { .. }, Some(site), _) if !Msg::signed_by(buf, site) => {
                Err("reply_not_signed")
            }
            // Logged on: only in answer to a LOGIN with this login's
            // exchange key (a crossed answer to an earlier one would make
            // a key the server does not hold).
            (
                Body::LoginReply {
                    reply: Reply::Ok { .. },
                    answers,
                },
                Some(_),
                _,
            ) if !answers.is_some_and(|a| self.logins.contains(&a)) => Err("reply_unbound"),
            (Body::LoginReply { answers, .. }, Some(_), _)
                if !answers.is_some_and(|a| self.sent.contains(&a) || self.logins.contains(&a)) =>
            {
                Err("reply_unbound")
            }
            (Body::LoginReply { .. }, ..) => Ok(()),
            (_, _, Some(k)) if !Msg::session_ok(buf, k) => Err("bad_session_mac"),
            (_, _, None) if self.token.is_some() && self.wants_key() => Err("session_unkeyed"),
            _ => Ok(()),
        }
    }

    pub(super) fn announce_body(&self) -> Body {
        let draining = self.drain.is_some();
        Body::Announce {
            interval_ms: self.cfg.announce_ms,
            links: self
                .own
                .iter()
                .map(|o| LinkAd {
                    up: if draining { 0 } else { o.ad.up },
                    down: if draining { 0 } else { o.ad.down },
                    rtt_us: o.echo.announced_us(),
                    dark: o.dark() || self.refused,
                    ..o.ad
                })
                .collect(),
        }
    }

    pub(super) fn server(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(
            self.cfg.server.address,
            self.cfg.server.port,
        ))
    }

    /// Every interval: ACTIVE to the LAN, and to the server over each own
    /// link (or through a peer); a LOGIN instead while not logged on.
    pub(super) async fn announce(&mut self) {
        self.announce_to_lan(0).await;
        match self.token {
            Some(_) if !self.wants_key() => self.send_to_server(self.announce_body(), true).await,
            _ => {
                let login = self.login_body();
                self.send_to_server(login, false).await
            }
        }
    }

    /// ACTIVE to the LAN: this host's links as they are now, with `flags`.
    pub(super) async fn announce_to_lan(&mut self, flags: u8) {
        let lan = self.sign(self.announce_body(), 0, flags, 0);
        let bcast = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&lan, bcast).await;
    }

    /// Sends to the server: over each own link (`every`) or the first that
    /// answers echoes, and through a LAN peer whose link does when none of
    /// this host's own links does. A host whose only link went dark keeps
    /// its session that way (its announces reach the server), and so the
    /// flows it carries over its peers' links.
    pub(super) async fn send_to_server(&mut self, body: Body, every: bool) {
        let token = self.token.unwrap_or(0);
        let lit = self.own.iter().position(|o| !o.dark());
        let relay = match lit {
            Some(_) => None,
            None => self.relay_peer(true).or_else(|| self.relay_peer(false)),
        };
        for i in own_links_to_server(self.own.len(), every, lit, relay.is_some()) {
            if self.own[i].addr.is_none() {
                continue; // nowhere to send from
            }
            let id = self.own[i].ad.id;
            let m = self.sign(body.clone(), id, flags::VIA_LINK, token);
            if let Err(e) = self.own[i].sock.send_to(&m, self.own[i].server).await {
                self.rejects.count("send_failed");
                tracing::warn!("link {id}: sending to the server: {e}");
            }
        }
        match relay {
            Some(ip) => self.relay(body, ip).await,
            None if self.own.is_empty() => self.rejects.count("no_way_to_server"),
            None => {}
        }
    }

    /// A peer that can pass a message on to the server: one with a link
    /// not announced dark (`lit_only`), or with any link at all.
    pub(super) fn relay_peer(&self, lit_only: bool) -> Option<Ipv4Addr> {
        self.peers
            .peers()
            .find(|(_, p)| p.links.iter().any(|l| !(lit_only && l.dark)))
            .map(|(ip, _)| ip)
    }

    /// Hands `body` to peer `ip` to pass on to the server.
    pub(super) async fn relay(&mut self, body: Body, ip: Ipv4Addr) {
        let m = self.sign(body, 0, flags::RELAY, self.token.unwrap_or(0));
        let to = SocketAddr::V4(SocketAddrV4::new(ip, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&m, to).await;
    }

    /// What this host's playout saw of the server's packets, to the
    /// server ([`send_to_server`](Self::send_to_server)) and, when that
    /// went over a link of our own, through a peer's lit link too: a
    /// report lost with a link that went dark would hide that it did
    /// (`crate::feedback`).
    pub(super) async fn send_feedback(&mut self, links: Vec<LinkQueue>, shared: Vec<LinkShare>) {
        let body = Body::Feedback { links, shared };
        self.send_to_server(body.clone(), false).await;
        if self.own.iter().all(Own::dark) {
            return; // relayed already, if at all
        }
        if let Some(ip) = self.relay_peer(true) {
            self.relay(body, ip).await;
        }
    }

    /// SHUTDOWN to the LAN and the server, then a grace period in which
    /// this host still relays: packets already on their way to its links
    /// get through while everyone takes the links out of use.
    pub(super) async fn shutdown(&mut self) {
        let lan = self.sign(Body::Shutdown, 0, 0, 0);
        let bcast = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, self.cfg.data_port));
        let _ = self.lan_sock.send_to(&lan, bcast).await;
        if self.token.is_some() {
            self.send_to_server(Body::Shutdown, false).await;
        }
        if !self.own.is_empty() && self.drain.is_none() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    }

    pub(super) async fn receive(&mut self, r: Received) -> Result<()> {
        let Received {
            from,
            buf,
            src,
            at_ns,
        } = r;
        let community = self.cfg.community;
        let key = &self.cfg.key;
        let msg = match Msg::decode(&buf, |c| (c == community).then_some(key)) {
            Ok(m) => m,
            Err(why) => {
                self.rejects.count(why.name());
                return Ok(());
            }
        };
        let from_server = msg.flags & flags::FROM_SERVER != 0;
        if from_server
            && msg.origin == self.lan_ip
            && let Err(why) = self.check_server_word(&msg, &buf)
        {
            self.rejects.count(why);
            return Ok(());
        }
        // What this host only passes on (the server's word to a peer, a
        // peer's to the server) it cannot authenticate: its window is left
        // to the end that can, or a member's forgeries would push it
        // ahead here and have the real ones dropped.
        let passed_on = match from {
            Socket::Link(_) => from_server && msg.origin != self.lan_ip,
            Socket::Lan => msg.flags & flags::RELAY != 0 && !from_server,
        };
        if !passed_on && let Err(why) = self.guard.check(&msg, bond_proto::now_ms()) {
            self.rejects.count(why.name());
            return Ok(());
        }
        let now = Instant::now();
        if let Socket::Link(i) = from
            && from_server
            && src.ip() != self.own[i].server.ip()
        {
            self.rejects.count("reply_not_from_server");
            return Ok(());
        }
        match (from, &msg.body) {
            // The server's answer: over our link, or passed on by the peer
            // that relayed our LOGIN.
            (_, Body::LoginReply { reply: r, .. }) if from_server && msg.origin == self.lan_ip => {
                let (had, refused) = (self.token, self.refused);
                self.login_reply(r)?;
                if self.refused != refused {
                    // Refused, its links are dark to its peers (the server
                    // drops what comes over them); taken again, lit.
                    self.announce_to_lan(0).await;
                }
                if had.is_some() && self.token.is_none() {
                    // Asked for a new login: at once, not at the next
                    // announce. A node that has just taken this community
                    // over (an ISP tier) knows nothing of this host, and
                    // its flows wait; nor of its peers, which a peer
                    // without links of its own (no echoes) would learn
                    // only at its next announce: they are told.
                    let login = self.login_body();
                    self.send_to_server(login, false).await;
                    if !self.refused {
                        self.announce_to_lan(flags::SESSION_LOST).await;
                    }
                } else if self.token.is_some() && self.token != had {
                    // A new session: its links at once, or the server
                    // schedules this host's traffic over none of them
                    // until the next announce.
                    self.send_to_server(self.announce_body(), true).await;
                }
            }
            // Measurements of our own links.
            (
                Socket::Link(i),
                Body::Probe {
                    train, seq, len, ..
                },
            ) if from_server && msg.origin == self.lan_ip => {
                let o = &mut self.own[i];
                if let Some(rx) = o.rx.as_mut().filter(|rx| rx.id == *train)
                    && rx.add(*seq, at_ns, usize::from(*len))
                {
                    let rx = o.rx.take().expect("checked above");
                    self.train_done(i, &rx);
                    self.update_weights().await?;
                }
            }
            (Socket::Link(i), Body::EchoReply { sent_ns })
                if from_server && msg.origin == self.lan_ip =>
            {
                let rtt = Duration::from_nanos(datapath::monotonic_ns().saturating_sub(*sent_ns));
                let o = &mut self.own[i];
                let before = o.echo.announced_us();
                if o.echo.reply(now, rtt) {
                    tracing::info!("link {}: answers again: back in use", o.ad.id);
                    self.announce().await;
                    self.apply_peers().await?;
                } else if o.echo.announced_us() != before {
                    // A first or a new base round trip: this host's own
                    // delays follow at once. A first is announced at once
                    // too: until peers know it, the link is out of their
                    // schedules (unmeasured), and a flow they start then
                    // begins on fewer links (a second at the default
                    // interval).
                    if before == 0 {
                        self.announce().await;
                    }
                    self.apply_peers().await?;
                }
            }
            // What the server's playout saw of our upstream: over our
            // link, or passed on by a peer.
            (_, Body::Feedback { links, shared }) if from_server && msg.origin == self.lan_ip => {
                for q in links {
                    self.corrector.report(feedback::Report {
                        model: Model::Up,
                        id: u32::from(q.link),
                        queue: *q,
                    });
                }
                self.corrector.shares(
                    Model::Up,
                    shared
                        .iter()
                        .map(|s| (u32::from(s.link), s.others.clone()))
                        .collect(),
                );
            }
            // Upstream packets the server's playout saw a link lose.
            (_, Body::Resend { gaps }) if from_server && msg.origin == self.lan_ip => {
                let r = self.resend(gaps).await;
                self.faults.survive("resend", r);
            }
            (Socket::Link(i), Body::ProbeReport { train, kbps })
                if from_server && msg.origin == self.lan_ip =>
            {
                let o = &mut self.own[i];
                if o.up_train == Some(*train) && o.up.spec == WeightSpec::Auto {
                    o.up.est.add(*kbps);
                    self.update_weights().await?;
                }
            }
            // For the server, from a peer without links of its own.
            (Socket::Lan, _) if msg.flags & flags::RELAY != 0 => {
                let usable = |o: &&Own| o.entry.flags & LINK_VALID != 0;
                let lit = self.own.iter().filter(usable).find(|o| !o.dark());
                if let Some(o) = lit.or_else(|| self.own.iter().find(usable)) {
                    let _ = o.sock.send_to(&buf, o.server).await;
                } else {
                    self.rejects.count("cannot_relay");
                }
            }
            (Socket::Lan, _) if msg.origin == self.lan_ip => {} // our own broadcast
            (Socket::Lan, _) if src.ip() != msg.origin => self.rejects.count("origin_mismatch"),
            (Socket::Lan, Body::Announce { interval_ms, links }) => {
                let up: u32 = links.iter().map(|l| l.up).sum();
                for s in &self.services {
                    s.saw_peer(msg.origin, (up > 0).then_some(f64::from(up)));
                }
                let interval = Duration::from_millis(u64::from(*interval_ms));
                if self.peers.announce(msg.origin, interval, links, now) {
                    tracing::info!("peer {} announces links {links:?}", msg.origin);
                    self.apply_peers().await?;
                }
                // A peer's session ended at the server: ours may have too.
                // An announce asks (answered NEED_LOGIN if so); at most
                // every SESSION_CHECK, however many peers say it.
                if msg.flags & flags::SESSION_LOST != 0
                    && self.token.is_some()
                    && self
                        .session_checked
                        .is_none_or(|t| now.duration_since(t) >= SESSION_CHECK)
                {
                    self.session_checked = Some(now);
                    self.send_to_server(self.announce_body(), false).await;
                }
            }
            (Socket::Lan, Body::Shutdown) => {
                if self.peers.shutdown(msg.origin) {
                    tracing::info!("peer {} shut down", msg.origin);
                    self.apply_peers().await?;
                }
            }
            // A reply for a peer we relayed for, or the server's feedback
            // or request to send again for a peer: on to it over the LAN.
            (
                Socket::Link(_),
                Body::LoginReply { .. } | Body::Feedback { .. } | Body::Resend { .. },
            ) if from_server => {
                let to = SocketAddr::V4(SocketAddrV4::new(msg.origin, self.cfg.data_port));
                let _ = self.lan_sock.send_to(&buf, to).await;
            }
            _ => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    /// Sends the server again what its playout saw this host's links
    /// lose upstream (`crate::resend`), each copy on the link where it
    /// arrives first now: out of an own link from its socket, or to a
    /// peer's relay port over the LAN.
    pub(super) async fn resend(&mut self, gaps: &[Gap]) -> Result<()> {
        let ring = self.maps.kept(name::T_KEPT, name::T_KEPT_NEXT)?;
        let (c, o) = (self.cfg.community, u32::from(self.lan_ip));
        for k in &resend::asked_for(&mut self.resends, ring, c, o, gaps) {
            let Some(bytes) = k.bytes() else { continue };
            let Some(id) = self.maps.pick_up_path(resend::frame_len(bytes))? else {
                self.resends.no_link += 1;
                continue;
            };
            // To the server's data port: over an own link at its address
            // of the link's family, else to the peer's relay port.
            let e = self.maps.up_link(id)?;
            let (sock, to) = match self.own.iter().find(|o| o.ad.id == id) {
                Some(o) => (o.sock.clone(), SocketAddr::new(o.server.ip(), e.dst_port)),
                None => {
                    let peer = SocketAddrV4::new(Ipv4Addr::from(e.dst_ip), e.dst_port);
                    (self.lan_sock.clone(), peer.into())
                }
            };
            match sock.send_to(&resend::again(bytes, id), to).await {
                Ok(_) => self.resends.sent += 1,
                Err(_) => self.rejects.count("send_failed"),
            }
        }
        Ok(())
    }

    /// The session is over (the server asked for a new login, or refused
    /// this terminal): its token and key go, and the next LOGIN brings a
    /// new exchange key.
    fn end_session(&mut self) {
        (self.token, self.exchange, self.session, self.unkeyed) = (None, None, None, false);
        self.logins.clear();
    }

    pub(super) fn login_reply(&mut self, r: &Reply) -> Result<()> {
        match *r {
            Reply::Ok {
                token,
                port,
                exchange,
            } => {
                let key = match (exchange, &self.exchange, self.cfg.server.key) {
                    (_, _, None) | (None, _, _) => None,
                    (Some(theirs), Some(mine), Some(_)) => {
                        let t = session::Transcript {
                            community: self.cfg.community,
                            origin: self.lan_ip,
                            token,
                            terminal: mine.public(),
                            server: theirs,
                        };
                        match mine.key(&theirs, &t) {
                            Some(k) => Some(k),
                            None => {
                                self.rejects.count("bad_exchange");
                                return Ok(());
                            }
                        }
                    }
                    (Some(_), None, Some(_)) => {
                        self.rejects.count("unasked_exchange");
                        return Ok(());
                    }
                };
                if key.is_some() && self.session != key {
                    tracing::info!("session keyed with the server's site key");
                } else if key.is_none() && self.cfg.server.key.is_some() && !self.unkeyed {
                    tracing::warn!(
                        "the server keys no session here (its community takes any member): \
                         its messages carry only the community key"
                    );
                }
                self.unkeyed = key.is_none();
                self.session = key;
                // A reply to a message of an earlier session answers
                // nothing now.
                self.sent.clear();
                self.logins.clear();
                self.refused = false;
                if self.token != Some(token) || self.map_cfg.server_port != port {
                    tracing::info!("logged on to {} (port {port})", self.cfg.server.address);
                }
                if self.token != Some(token)
                    && let Some(p) = &self.playout
                {
                    p.restart(self.cfg.community);
                }
                self.token = Some(token);
                self.map_cfg.token = token;
                self.map_cfg.server_port = port;
                self.maps.set_terminal_config(self.map_cfg)?;
                for o in &mut self.own {
                    if o.entry.dst_port != port {
                        o.entry.dst_port = port;
                        if o.entry.flags & LINK_VALID != 0 {
                            self.maps.set_up_link(o.ad.id, o.entry)?;
                        }
                    }
                }
            }
            Reply::NeedLogin => {
                // Another answer to what it sent before it asked again:
                // its new login stands.
                if self.token.is_none() {
                    return Ok(());
                }
                self.end_session();
                tracing::info!("the server asks for a new login");
            }
            Reply::Refused => {
                self.end_session();
                if !self.refused {
                    self.refused = true;
                    tracing::error!(
                        "the server refuses this terminal: community {} takes terminals by \
                         key, and not {} with {}; its links are out of use until it is \
                         authorised (asked again every announce)",
                        self.cfg.community,
                        self.lan_ip,
                        match &self.identity {
                            Some(id) => format!("public key {}", id.public()),
                            None => "no identity (field `identity`)".into(),
                        }
                    );
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------ measurement --

    /// Every echo interval: an ECHO to the server over each own link; a
    /// link that has stopped answering turns dark, leaves this host's
    /// schedule and is announced dark to the LAN at once
    /// (`crate::pathmon`).
    pub(super) async fn echo(&mut self) -> Result<()> {
        // Nothing on a token whose key it waits for (each would be
        // refused and draw another login).
        let Some(token) = self.token.filter(|_| !self.wants_key()) else {
            return Ok(());
        };
        for i in 0..self.own.len() {
            if self.own[i].entry.flags & LINK_VALID == 0 {
                continue;
            }
            let id = self.own[i].ad.id;
            let body = Body::Echo {
                sent_ns: datapath::monotonic_ns(),
            };
            let m = self.sign(body, id, flags::VIA_LINK, token);
            let o = &mut self.own[i];
            if o.sock.send_to(&m, o.server).await.is_ok() {
                o.echo.sent(Instant::now());
            }
        }
        let now = Instant::now();
        let received = self
            .maps
            .terminal_links_stats(self.own.iter().map(|o| o.ad.id))?;
        let mut dark = Vec::new();
        for (o, (_, s)) in self.own.iter_mut().zip(received) {
            o.echo.traffic(now, s.down_pkts + s.relay_down_pkts);
            if o.echo.check(now) {
                dark.push(o.ad.id);
            }
        }
        if !dark.is_empty() {
            tracing::warn!("link(s) {dark:?} stopped answering: dark, out of use");
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }

    // ----------------------------------------------------- link changes --
}
