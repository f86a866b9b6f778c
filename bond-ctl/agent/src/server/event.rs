//! The server agent's event loop: control messages from terminals,
//! trains, feedback and resends.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use bond_api::{Call, Request};
use bond_common::maps::name;
use bond_datapath::flows;
use bond_proto::{
    control::{self, Body, Gap, Msg, Reply, flags},
    session,
};
use tokio::sync::mpsc;

use super::{
    Agent, Applied, DARK_CHECK, NUDGE_EVERY, TRAIN_MIN_GAP, TRAIN_WAIT, TrainKey, admit::Refused,
};
use crate::{
    Exit,
    feedback::{self, Model},
    membership::Refusal,
    net::recv_stamped,
    playout,
    probe::{PROBE_FRAME_LEN, PROBE_LEN, TRAIN_LEN, TrainRx},
    resend,
};

/// How often the server looks for terminals and links that missed their
/// announces: a miss is seen at most this late.
const EXPIRE_EVERY: Duration = Duration::from_millis(50);

impl Agent {
    /// The server's index of link `link` of community `c`, if origin `o`
    /// announced it and `src` is its address: where echoes are answered
    /// and trains sent, so nobody can aim them elsewhere.
    pub(super) fn owned_link(&self, c: u32, link: u8, o: Ipv4Addr, src: SocketAddr) -> Option<u32> {
        let a = self.applied.get(&(c, link))?;
        (a.entry.owner == u32::from(o) && a.addr == src).then_some(a.idx)
    }

    /// The ways to origin `o` of community `c`: its own lit link, and a
    /// lit link of a peer, which passes messages on over the LAN.
    pub(super) fn ways_to(&self, c: u32, o: Ipv4Addr) -> [Option<(u8, SocketAddr)>; 2] {
        let lit = || {
            self.applied
                .range((c, 0)..=(c, u8::MAX))
                .filter(|(k, _)| !self.echoes.is_dark(k))
                .map(|(&(_, id), a)| (id, a))
        };
        let owner = |a: &Applied| a.entry.owner == u32::from(o);
        let own = lit().find(|(_, a)| owner(a)).map(|(id, a)| (id, a.addr));
        let peer = lit().find(|(_, a)| !owner(a)).map(|(id, a)| (id, a.addr));
        [own, peer]
    }

    /// Tells origin `o` of community `c` what its upstream packets met on
    /// each link: both ways ([`Self::ways_to`]; either alone where there
    /// is no other), because a report lost with a link that went dark
    /// would hide that it did (`crate::feedback`).
    pub(super) async fn send_feedback(&mut self, ((c, o), links, shared): playout::Feedback) {
        let o = Ipv4Addr::from(o);
        for (id, to) in self.ways_to(c, o).into_iter().flatten() {
            self.send(
                (c, o, id),
                Body::Feedback {
                    links: links.clone(),
                    shared: shared.clone(),
                },
                to,
            )
            .await;
        }
    }

    /// Asks origin `o` of community `c` for the packets its links lost
    /// upstream (`crate::resend`): one way, its own link first.
    pub(super) async fn ask_resend(&mut self, (c, o): playout::Sender, gaps: Vec<Gap>) {
        let o = Ipv4Addr::from(o);
        let [own, peer] = self.ways_to(c, o);
        if let Some((id, to)) = own.or(peer) {
            self.send((c, o, id), Body::Resend { gaps }, to).await;
        }
    }

    pub(super) async fn run(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut playout_reports: playout::ReportRx,
        mut signals: crate::Signals,
    ) -> Result<Exit> {
        let (mut buf, mut buf6) = (vec![0u8; 2048], vec![0u8; 2048]);
        let mut trains = tokio::time::interval(TRAIN_WAIT / 5);
        let mut dark_check = tokio::time::interval(DARK_CHECK);
        dark_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (swept_tx, mut swept) = mpsc::channel(1);
        let mut sweeping = false;
        let mut sweep_began = Instant::now();
        let mut sweep = tokio::time::interval(self.cfg.flows.sweep());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut registry = self.tier.as_ref().map(|n| n.served.clone());
        let mut resolve = tokio::time::interval(crate::nodes::RESOLVE_EVERY);
        let mut expire = tokio::time::interval(EXPIRE_EVERY);
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if sweep.period() != self.cfg.flows.sweep() {
                sweep = tokio::time::interval(self.cfg.flows.sweep());
                sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            tokio::select! {
                _ = signals.stop.recv() => return Ok(Exit::Leave),
                _ = signals.hangup.recv() => {
                    if let Err(e) = self.reload() {
                        tracing::warn!("SIGHUP: {e}");
                    }
                }
                Some(call) = calls.recv() => {
                    let detach = call.req == Request::Detach;
                    let answer = self.handle(call.req);
                    let _ = call.reply.send(answer);
                    if detach {
                        return Ok(Exit::Detach);
                    }
                }
                () = registry_changed(registry.as_mut()) => {
                    if let Some(rx) = registry.as_mut() {
                        let served = rx.borrow_and_update().clone();
                        let view = served.view.clone();
                        self.follow_registry(served);
                        self.release_idle();
                        if let Some(nodes) = self.nodes.as_mut() {
                            nodes.sync(&view).await;
                        }
                    }
                }
                _ = resolve.tick(), if self.nodes.as_ref().is_some_and(|n| n.unresolved()) => {
                    if let Some(nodes) = self.nodes.as_mut() {
                        nodes.resolve_all().await;
                    }
                }
                _ = trains.tick() => self.finish_trains(false).await,
                Some(report) = playout_reports.recv() => match report {
                    playout::Report::Feedback(feedback) => self.send_feedback(feedback).await,
                    playout::Report::Resend(sender, gaps) => self.ask_resend(sender, gaps).await,
                },
                _ = dark_check.tick() => {
                    let r = self.check_dark();
                    self.faults.survive("apply_links", r);
                }
                // The sweep walks the whole table (a second for a full
                // one): on a thread of its own, never in this loop, where
                // it would hold up announces and their deadlines.
                _ = sweep.tick(), if !sweeping => {
                    sweeping = true;
                    sweep_began = Instant::now();
                    let (maps, timeouts, tx) =
                        (self.maps.clone(), self.cfg.flows.timeouts(), swept_tx.clone());
                    let blocks = Some(self.nat.shape());
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.blocking_send(flows::sweep_counted(
                            &maps,
                            &timeouts,
                            flows::monotonic_ns(),
                            blocks,
                        ));
                    });
                }
                Some(result) = swept.recv() => {
                    sweeping = false;
                    match result {
                        Ok((r, counted)) => {
                            let table = &self.table;
                            let r2 = self.nat.after_sweep(&self.maps, &counted, |c| {
                                table.has_sessions(c)
                            });
                            self.faults.survive("nat_blocks", r2);
                            self.flows.record(&r);
                            self.flows.by_community = counted.all;
                            self.live_flows = (counted.live, Some(sweep_began));
                            self.release_idle();
                            if r.removed() > 0 {
                                tracing::info!(
                                    "expired {} flow(s) (tcp {}, udp {}, icmp {}); {} ports free",
                                    r.removed(), r.tcp, r.udp, r.icmp, self.flows.free_ports
                                );
                            }
                        }
                        // A failed map call leaves the flows for the next sweep.
                        Err(e) => tracing::warn!("flow sweep: {e}"),
                    }
                }
                // Missed announces are looked for every EXPIRE_EVERY, at the
                // terminals whose deadline came (a queue: a node holds tens
                // of thousands, and walking them all was most of its time).
                _ = expire.tick() => {
                    let ch = self.table.expire(Instant::now());
                    for (c, o) in &ch.sessions_gone {
                        tracing::warn!("community {c}: terminal {o} silent: session closed");
                        let r = self.maps.remove_session(*c, *o);
                        self.faults.survive("remove_session", r.map_err(Into::into));
                    }
                    for c in ch.communities {
                        let r = self.apply(c);
                        self.faults.survive("apply_links", r);
                    }
                }
                r = recv_stamped(&self.sock, &mut buf) => {
                    let Ok((n, src, at_ns)) = r else { continue };
                    let msg = buf[..n].to_vec();
                    let r = self.receive(&msg, src, at_ns).await;
                    self.faults.survive("control_message", r);
                }
                r = recv_on(self.sock6.as_ref(), &mut buf6) => {
                    let Ok((n, src, at_ns)) = r else { continue };
                    let msg = buf6[..n].to_vec();
                    let r = self.receive(&msg, src, at_ns).await;
                    self.faults.survive("control_message", r);
                }
            }
        }
    }

    pub(super) async fn receive(&mut self, buf: &[u8], src: SocketAddr, at_ns: u64) -> Result<()> {
        let keys = &self.keys;
        let msg = match Msg::decode(buf, |c| keys.get(&c)) {
            Ok(m) => m,
            Err(why) => {
                self.rejects.count(why.name());
                return Ok(());
            }
        };
        let now = Instant::now();
        let (c, o) = (msg.community, msg.origin);
        // Who may say it, before its counter counts (`admit`).
        let repeats = || match &msg.body {
            Body::Announce { interval_ms, links } => {
                let via = (msg.flags & flags::VIA_LINK != 0).then_some((msg.link, src));
                let interval = Duration::from_millis(u64::from(*interval_ms));
                self.table.repeats(c, o, msg.token, via, interval, links)
            }
            _ => false,
        };
        let session = self.table.token(c, o).map(|t| (t, self.table.key(c, o)));
        if let Err(why) = self.identities.admit(&msg, buf, session, repeats) {
            self.rejects.count(why.name());
            let reply = match (why, &msg.body) {
                (Refused::UnknownTerminal | Refused::BadIdentity, Body::Login { .. }) => {
                    // Once per terminal until it is taken (it asks every
                    // announce); a flood of strangers cannot grow the set.
                    if self.refused.len() >= 4096 {
                        self.refused.clear();
                    }
                    if self.refused.insert((c, o)) {
                        tracing::warn!(
                            "community {c}: terminal {o} refused: {}",
                            match why {
                                Refused::UnknownTerminal => "not authorised",
                                _ => "not signed by its authorised key",
                            }
                        );
                    }
                    Some(Reply::Refused)
                }
                // As for any member's echo without a session, below: the
                // answer goes back where the echo came from, no larger.
                (Refused::NoSession, Body::Echo { .. }) if msg.flags & flags::VIA_LINK != 0 => {
                    Some(Reply::NeedLogin)
                }
                // An echo without its session's MAC from the link's own
                // address: the terminal holds another key (the reply that
                // made its key was lost) and logs on again for a new one.
                // From elsewhere (a member forging it), no answer.
                // One with the key this session had before its last login
                // (in flight while the terminal logged on again): dropped,
                // or each would ask for yet another login.
                (Refused::BadSession, Body::Echo { .. })
                    if msg.flags & flags::VIA_LINK != 0
                        && self.owned_link(c, msg.link, o, src).is_some()
                        && !self.table.keyed(c, o).is_some_and(|k| {
                            k.previous.as_ref().is_some_and(|p| Msg::session_ok(buf, p))
                        }) =>
                {
                    Some(Reply::NeedLogin)
                }
                // A terminal taken out (or one signing as another), sending
                // what it has no say in any more: asked to log on, where
                // it learns that it is refused (a terminal without links
                // of its own too, through the peer that relays it).
                (Refused::UnknownTerminal | Refused::BadIdentity, Body::Announce { .. }) => {
                    Some(Reply::NeedLogin)
                }
                _ => None,
            };
            if let Some(r) = reply {
                self.answer(&msg, buf, r, src).await;
            }
            return Ok(());
        }
        if let Err(why) = self.guard.check(&msg, bond_proto::now_ms()) {
            self.rejects.count(why.name());
            return Ok(());
        }
        // A terminal that keys its session, whose session here has no key
        // (this agent restarted and adopted it): asked to log on again (over
        // its link, or back through the peer that relayed it), and what it
        // said still counts.
        if msg.flags & flags::SESSION != 0
            && self.site.is_some()
            && !matches!(msg.body, Body::Login { .. })
            && self.table.token(c, o).is_some()
            && self.table.key(c, o).is_none()
        {
            self.rejects.count("session_unkeyed");
            self.answer(&msg, buf, Reply::NeedLogin, src).await;
        }
        match &msg.body {
            Body::Login { exchange } => {
                let (token, new) =
                    self.table
                        .login(c, o, Duration::from_secs(60), now, fresh_token);
                if new {
                    if let Err(e) = self.maps.set_session(c, o, token) {
                        // No token the program does not know: the terminal
                        // is refused and tries again on its next announce.
                        self.table.shutdown(c, o, token);
                        if e.is_full() {
                            self.rejects.count("max_terminals");
                            return Ok(());
                        }
                        return Err(anyhow::Error::new(e)
                            .context(format!("community {c}: terminal {o}: login")));
                    }
                    tracing::info!("community {c}: terminal {o} logged on");
                    self.refused.remove(&(c, o));
                }
                // Its community's ports, before the terminal sends a packet.
                let r = self.nat.logged_on(&self.maps, c);
                self.faults.survive("nat_blocks", r);
                let Ok(exchange) = self.key_session(c, o, token, exchange.as_ref()) else {
                    self.rejects.count("bad_exchange");
                    return Ok(());
                };
                let port = self.cfg.port;
                let reply = Reply::Ok {
                    token,
                    port,
                    exchange,
                };
                self.answer(&msg, buf, reply, src).await;
            }
            Body::Announce { interval_ms, links } => {
                if msg.flags & flags::RESTARTING != 0 {
                    tracing::info!("community {c}: terminal {o} restarting its agent");
                    let own = links
                        .iter()
                        .filter(|l| self.table.owns(c, o, msg.token, l.id));
                    for l in own {
                        self.echoes.restarting((c, l.id), now);
                    }
                }
                let via = (msg.flags & flags::VIA_LINK != 0).then_some((msg.link, src));
                let interval = Duration::from_millis(u64::from(*interval_ms));
                match self
                    .table
                    .announce(c, o, msg.token, via, interval, links, now)
                {
                    Ok(true) => self.apply(c)?,
                    Ok(false) => {}
                    Err(Refusal::NeedLogin) => {
                        self.rejects.count("need_login");
                        self.answer(&msg, buf, Reply::NeedLogin, src).await;
                    }
                    Err(Refusal::LinkTaken { owner }) => {
                        self.rejects.count("link_taken");
                        tracing::warn!(
                            "community {c}: {o} announces link {} of {owner}: refused",
                            msg.link
                        );
                    }
                    Err(Refusal::UnknownLink) => self.rejects.count("unknown_link"),
                }
            }
            Body::Shutdown => {
                if self.table.shutdown(c, o, msg.token) {
                    tracing::info!("community {c}: terminal {o} shut down");
                    self.apply(c)?;
                    self.maps.remove_session(c, o)?;
                } else {
                    self.rejects.count("shutdown_without_session");
                }
            }
            Body::Probe {
                train, seq, len, ..
            } if msg.flags & flags::VIA_LINK != 0 => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("probe_without_session");
                    return Ok(());
                }
                let key = (c, o, msg.link, *train);
                if !self.trains.contains_key(&key) {
                    // A new train on this link ends the one before it.
                    self.trains
                        .retain(|k, _| (k.0, k.1, k.2) != (c, o, msg.link));
                    if self.trains.len() >= 4096 {
                        self.rejects.count("too_many_trains");
                        return Ok(());
                    }
                    self.trains
                        .insert(key, (TrainRx::new(*train, TRAIN_LEN), Instant::now(), src));
                }
                let done = self
                    .trains
                    .get_mut(&key)
                    .is_some_and(|(rx, _, _)| rx.add(*seq, at_ns, usize::from(*len)));
                if done {
                    self.finish_train(key).await;
                }
            }
            Body::Feedback { links, .. } => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("feedback_without_session");
                    return Ok(());
                }
                for q in links {
                    if let Some(a) = self.applied.get(&(c, q.link)) {
                        self.corrector.report(feedback::Report {
                            model: Model::Down(c),
                            id: a.idx,
                            queue: *q,
                        });
                    }
                }
            }
            Body::Resend { gaps } => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("resend_without_session");
                    return Ok(());
                }
                let r = self.resend(c, o, gaps).await;
                self.faults.survive("resend", r);
            }
            Body::Echo { sent_ns } if msg.flags & flags::VIA_LINK != 0 => {
                // From the link's owner, from the link's address: answered
                // there (the same size: no amplifier), and the link is alive.
                let known = self.owned_link(c, msg.link, o, src).is_some();
                if self.table.token(c, o).is_none() {
                    // A terminal this server has no session for (it
                    // restarted, or took the community over from another
                    // node): asked to log on at once, as an announce
                    // would be a second later.
                    self.rejects.count("need_login");
                    self.answer(&msg, buf, Reply::NeedLogin, src).await;
                    return Ok(());
                }
                if self.table.token(c, o) != Some(msg.token) || !known {
                    self.rejects.count("echo_refused");
                    return Ok(());
                }
                let body = Body::EchoReply { sent_ns: *sent_ns };
                self.send((c, o, msg.link), body, src).await;
                if self.echoes.seen((c, msg.link), now) {
                    tracing::info!("community {c}: link {} echoes again: back in use", msg.link);
                    self.apply(c)?;
                }
            }
            Body::ProbeRequest { train, count } if msg.flags & flags::VIA_LINK != 0 => {
                if self.table.token(c, o) != Some(msg.token) {
                    self.rejects.count("probe_without_session");
                    return Ok(());
                }
                // Only to a link this terminal announced from that address,
                // and not too often: no amplifier for anyone.
                let idx = self.owned_link(c, msg.link, o, src);
                let now = Instant::now();
                let recent = self
                    .sent_trains
                    .get(&(c, msg.link))
                    .is_some_and(|t| now.duration_since(*t) < TRAIN_MIN_GAP);
                let Some(idx) = idx.filter(|_| !recent && *count <= TRAIN_LEN) else {
                    self.rejects.count("probe_request_refused");
                    return Ok(());
                };
                self.sent_trains.insert((c, msg.link), now);
                // The train queues at the link like data: the schedule
                // counts it, or the packets sent behind it arrive late.
                match self
                    .maps
                    .charge_down_path(c, idx, u32::from(*count), PROBE_FRAME_LEN)
                {
                    Ok(Some(left)) => self.corrector.probed(Model::Down(c), idx, left),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("charging a probe train: {e:#}"),
                }
                for seq in 0..*count {
                    let body = Body::Probe {
                        train: *train,
                        seq,
                        count: *count,
                        len: PROBE_LEN as u16,
                    };
                    self.send((c, o, msg.link), body, src).await;
                }
            }
            _ => self.rejects.count("unexpected"),
        }
        Ok(())
    }

    /// Measures upstream trains whose last packet came, or (`all` or
    /// stale) that waited long enough, and reports their rates.
    pub(super) async fn finish_trains(&mut self, all: bool) {
        let now = Instant::now();
        let stale: Vec<TrainKey> = self
            .trains
            .iter()
            .filter(|(_, (_, t, _))| all || now.duration_since(*t) >= TRAIN_WAIT)
            .map(|(k, _)| *k)
            .collect();
        for k in stale {
            self.finish_train(k).await;
        }
    }

    pub(super) async fn finish_train(&mut self, key: TrainKey) {
        let Some((rx, _, src)) = self.trains.remove(&key) else {
            return;
        };
        let (c, o, link, train) = key;
        let Some(kbps) = rx.rate_kbps() else {
            self.rejects.count("probe_train_lost");
            return;
        };
        self.send((c, o, link), Body::ProbeReport { train, kbps }, src)
            .await;
    }

    /// Sends origin `o` of community `c` again what its playout saw the
    /// links lose (`crate::resend`), each copy on the link where it
    /// arrives first now.
    pub(super) async fn resend(&mut self, c: u32, o: Ipv4Addr, gaps: &[Gap]) -> Result<()> {
        let ring = self.maps.kept(name::S_KEPT, name::S_KEPT_NEXT)?;
        for k in &resend::asked_for(&mut self.resends, ring, c, u32::from(o), gaps) {
            let Some(bytes) = k.bytes() else { continue };
            let Some(idx) = self.maps.pick_down_path(c, resend::frame_len(bytes))? else {
                self.resends.no_link += 1;
                continue;
            };
            let mut of_c = self.applied.range((c, 0)..=(c, u8::MAX));
            let Some((_, a)) = of_c.find(|(_, a)| a.idx == idx) else {
                self.resends.no_link += 1;
                continue;
            };
            let (link, to) = (a.entry.link, a.addr);
            match self
                .socket_for(to)
                .send_to(&resend::again(bytes, link), to)
                .await
            {
                Ok(_) => self.resends.sent += 1,
                Err(_) => self.rejects.count("send_failed"),
            }
        }
        Ok(())
    }

    /// Sends `body` about a terminal's link (community, origin, link),
    /// signed with its community's key, to `dst`.
    /// A login's session key, where this server has a site key, the
    /// community takes terminals by key and the LOGIN brought an exchange
    /// key: the server's exchange key for the reply (None: the session
    /// is not keyed). Err: the terminal's exchange key gives nothing
    /// secret (a forged one).
    fn key_session(
        &mut self,
        c: u32,
        o: Ipv4Addr,
        token: u64,
        theirs: Option<&[u8; session::EXCHANGE_LEN]>,
    ) -> Result<Option<[u8; session::EXCHANGE_LEN]>, ()> {
        let keyed = matches!(self.identities.auth(c, o), super::admit::Auth::Key(_));
        let (Some(theirs), Some(_), true) = (theirs, &self.site, keyed) else {
            self.table.set_key(c, o, None);
            return Ok(None);
        };
        // The same LOGIN again (its reply was lost, or it crossed it): the
        // same answer.
        let before = self.table.keyed(c, o);
        if let Some(k) = before
            && k.terminal == *theirs
        {
            return Ok(Some(k.server));
        }
        let previous = before.map(|k| k.key.clone());
        let mine = session::Exchange::generate().map_err(|e| {
            self.faults.survive("session_key", Err(anyhow::anyhow!(e)));
        })?;
        let t = session::Transcript {
            community: c,
            origin: o,
            token,
            terminal: *theirs,
            server: mine.public(),
        };
        let key = mine.key(theirs, &t).ok_or(())?;
        let keyed = crate::membership::Keyed {
            terminal: *theirs,
            server: mine.public(),
            key,
            previous,
        };
        self.table.set_key(c, o, Some(keyed));
        Ok(Some(mine.public()))
    }

    /// Answers `msg` (the bytes `buf`, from `src`) with a LOGIN_REPLY:
    /// only what came for the server (over a link, or relayed by a peer),
    /// never what a member replays of a terminal's LAN broadcast; from a
    /// server with a site key, naming the message's tag (the site key's
    /// signature binds the two, so no member can pass a reply to its own
    /// request on to another terminal). Asked to log on, or refused, a
    /// terminal is told at most every [`NUDGE_EVERY`] (each reply costs a
    /// signature).
    async fn answer(&mut self, msg: &Msg, buf: &[u8], reply: Reply, src: SocketAddr) {
        if msg.flags & (flags::VIA_LINK | flags::RELAY) == 0 {
            return;
        }
        let key = (msg.community, msg.origin);
        if !matches!(reply, Reply::Ok { .. }) {
            let now = Instant::now();
            if self
                .nudged
                .get(&key)
                .is_some_and(|&t| now.duration_since(t) < NUDGE_EVERY)
            {
                self.rejects.count("reply_held");
                return;
            }
            if self.nudged.len() >= 4096 {
                self.nudged
                    .retain(|_, t| now.duration_since(*t) < NUDGE_EVERY);
            }
            self.nudged.insert(key, now);
        }
        let answers = self.site.as_ref().and_then(|_| control::tag_of(buf));
        let body = Body::LoginReply { reply, answers };
        self.send((msg.community, msg.origin, msg.link), body, src)
            .await;
    }

    /// Sends `body` to terminal `origin` of `community` (over `link`, to
    /// `dst`): tagged with the community key, a LOGIN_REPLY signed with
    /// the site key (where there is one), anything else with the
    /// session's MAC where its session is keyed.
    pub(super) async fn send(&mut self, about: (u32, Ipv4Addr, u8), body: Body, dst: SocketAddr) {
        let (community, origin, link) = about;
        let Some(key) = self.keys.get(&community) else {
            return;
        };
        let reply = matches!(body, Body::LoginReply { .. });
        let site = self.site.as_ref().filter(|_| reply);
        let session = match reply {
            true => None,
            false => self.table.key(community, origin),
        };
        let m = Msg {
            community,
            origin,
            link,
            flags: flags::FROM_SERVER,
            token: 0,
            time_ms: bond_proto::now_ms(),
            counter: self.counter.bump(),
            body,
        }
        .encode_with(key, site, session);
        if self.socket_for(dst).send_to(&m, dst).await.is_err() {
            self.rejects.count("send_failed");
        }
    }

    /// The socket that reaches `dst`: the IPv6 one for an IPv6 address
    /// (the IPv4 one, which refuses it, when there is none).
    pub(super) fn socket_for(&self, dst: SocketAddr) -> &tokio::net::UdpSocket {
        match (dst, &self.sock6) {
            (SocketAddr::V6(_), Some(s)) => s,
            _ => &self.sock,
        }
    }
}

/// [`recv_stamped`] on `sock`, or never without one.
async fn recv_on(
    sock: Option<&tokio::net::UdpSocket>,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, u64)> {
    match sock {
        Some(s) => recv_stamped(s, buf).await,
        None => std::future::pending().await,
    }
}

/// A session token nobody can guess; never zero (zero means "none").
/// The registry's next word on what this node serves (never, without a
/// tier or once the registry's task has ended).
async fn registry_changed(rx: Option<&mut tokio::sync::watch::Receiver<bond_tier::node::Served>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

fn fresh_token() -> u64 {
    loop {
        match getrandom::u64() {
            Ok(0) => continue,
            Ok(t) => return t,
            Err(e) => panic!("the kernel's random source failed: {e}"),
        }
    }
}
