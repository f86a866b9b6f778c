//! Measuring the own links: probe trains, the rates they carried, and the
//! weights that follow.

use super::*;

impl Agent {
    /// Every probe interval, for each own link with a measured weight: an
    /// upstream train to the server (which reports its rate), and a
    /// request for a downstream train (which we time).
    pub(super) async fn probe(&mut self) {
        let Some(token) = self.token.filter(|_| !self.wants_key()) else {
            return;
        };
        if let Err(e) = self.observe_carried() {
            tracing::warn!("reading link counters: {e:#}");
        }
        self.probe_round = self.probe_round.wrapping_add(1);
        let busy_round = self.probe_round.is_multiple_of(BUSY_PROBE_EVERY);
        for i in 0..self.own.len() {
            if self.own[i].entry.flags & LINK_VALID == 0 || self.drain.is_some() {
                continue;
            }
            // What arrived of the last downstream train counts, if enough.
            if let Some(rx) = self.own[i].rx.take() {
                self.train_done(i, &rx);
            }
            let id = self.own[i].ad.id;
            let (busy_up, busy_down) = self.own[i].busy;
            if self.own[i].down.spec == WeightSpec::Auto && (!busy_down || busy_round) {
                let train = self.next_train();
                let m = self.sign(
                    Body::ProbeRequest {
                        train,
                        count: TRAIN_LEN,
                    },
                    id,
                    flags::VIA_LINK,
                    token,
                );
                self.own[i].rx = Some(TrainRx::new(train, TRAIN_LEN));
                let _ = self.own[i].sock.send_to(&m, self.own[i].server).await;
            }
            if self.own[i].up.spec == WeightSpec::Auto && (!busy_up || busy_round) {
                let train = self.next_train();
                self.own[i].up_train = Some(train);
                // Signed first, so the train leaves back to back.
                let msgs: Vec<Vec<u8>> = (0..TRAIN_LEN)
                    .map(|seq| {
                        self.sign(
                            Body::Probe {
                                train,
                                seq,
                                count: TRAIN_LEN,
                                len: PROBE_LEN as u16,
                            },
                            id,
                            flags::VIA_LINK,
                            token,
                        )
                    })
                    .collect();
                // The train queues at the link like data: the schedule
                // counts it, or the packets sent behind it arrive late.
                match self
                    .maps
                    .charge_up_path(id, u32::from(TRAIN_LEN), PROBE_FRAME_LEN)
                {
                    Ok(Some(left)) => self.corrector.probed(Model::Up, u32::from(id), left),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("charging a probe train: {e:#}"),
                }
                for m in &msgs {
                    if self.own[i]
                        .sock
                        .send_to(m, self.own[i].server)
                        .await
                        .is_err()
                    {
                        self.rejects.count("send_failed");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.update_weights().await {
            tracing::warn!("updating weights: {e:#}");
        }
    }

    /// Feeds what each own link carried since the last tick (as origin
    /// and as relay) to its estimators, as a lower bound.
    pub(super) fn observe_carried(&mut self) -> Result<()> {
        let stats = self.maps.terminal_link_stats()?;
        let now = Instant::now();
        for o in &mut self.own {
            let Some((_, _, s)) = stats.iter().find(|(id, _, _)| *id == o.ad.id) else {
                continue;
            };
            let (up, down) = (
                s.up_bytes + s.relay_up_bytes,
                s.down_bytes + s.relay_down_bytes,
            );
            if let Some((up0, down0, t0)) = o.carried {
                let secs = now.duration_since(t0).as_secs_f64();
                let kbps = |b: u64| (b as f64 * 8.0 / 1000.0 / secs) as u32;
                if secs > 0.1 {
                    let (up_kbps, down_kbps) = (
                        kbps(up.saturating_sub(up0)),
                        kbps(down.saturating_sub(down0)),
                    );
                    o.busy = (up_kbps >= o.ad.up / 2, down_kbps >= o.ad.down / 2);
                    if o.up.spec == WeightSpec::Auto {
                        o.up.est.observe(kbps(up.saturating_sub(up0)));
                    }
                    if o.down.spec == WeightSpec::Auto {
                        o.down.est.observe(kbps(down.saturating_sub(down0)));
                    }
                }
            }
            o.carried = Some((up, down, now));
        }
        Ok(())
    }

    pub(super) fn next_train(&mut self) -> u32 {
        self.next_train = self.next_train.wrapping_add(1);
        self.next_train
    }

    pub(super) fn train_done(&mut self, i: usize, rx: &TrainRx) {
        let o = &mut self.own[i];
        match rx.rate_kbps() {
            Some(kbps) if o.down.spec == WeightSpec::Auto => o.down.est.add(kbps),
            Some(_) => {}
            None => self.rejects.count("probe_train_lost"),
        }
    }

    /// Takes the links' current weights; if any changed, tells the LAN and
    /// the server at once and rebuilds our own schedule.
    pub(super) async fn update_weights(&mut self) -> Result<()> {
        let mut changed = false;
        for o in &mut self.own {
            let (up, down) = (o.up.value(), o.down.value());
            if (up, down) != (o.ad.up, o.ad.down) {
                tracing::info!(
                    "link {} weights: up {} -> {up}, down {} -> {down}",
                    o.ad.id,
                    o.ad.up,
                    o.ad.down
                );
                (o.ad.up, o.ad.down) = (up, down);
                changed = true;
            }
        }
        if changed {
            self.announce().await;
            self.apply_peers().await?;
        }
        Ok(())
    }

    // ----------------------------------------------------------- upkeep --
}
