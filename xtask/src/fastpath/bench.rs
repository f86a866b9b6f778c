//! One path under test: its namespaces and programs, the generator that
//! loads it, the sink that counts, the checks of its output, and one
//! measured run.

use std::{
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray},
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};

use super::{
    BATCH, CAPTURE_MAX, CHECK_FRAMES, CHUNK, GEN_DEV, PACE_SHARE, Plan, SETTLE, SINK_DEV,
    TEMPLATE_MAX,
    cpu::{Cpus, pin_to, run_time, thread_cpu},
    netns::{Topology, ifindex, in_netns, xdp_mut},
    paths::{self, Dut, Expect, Kind},
};
use crate::packets;

/// One path under test: its topology, the benchmark's own programs, and
/// what runs in `dut`. Fields drop in order: what runs in dut first (the
/// relay thread, bond's programs), then the namespaces go.
pub(super) struct Bench {
    pub kind: Kind,
    pub cpus: Cpus,
    secs: f64,
    /// What runs in dut for this path.
    dut: Dut,
    /// bond-ebpf's `bench` object: generator, pass, redirect, sink.
    pub tools: Ebpf,
    /// Whichever of `bench_sink` and `bench_capture` is on the sink.
    sink_link: Option<(&'static str, XdpLinkId)>,
    pub topo: Topology,
}

/// A path readied for one packet size.
pub(super) struct Prepared {
    size: usize,
    pub frame: Vec<u8>,
    expect: Expect,
    /// The rate to offer (frames per second), for the userspace relays.
    pub paced: Option<f64>,
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sample {
    pub sent: u64,
    pub delivered: u64,
    pub wall: Duration,
    /// Run time of the threads doing the work.
    pub cpu: Duration,
    /// The generator thread's run time over the wall time: below 1 when
    /// other processes took turns on its CPU.
    pub gen_share: f64,
}

impl Sample {
    pub fn ns_per_packet(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e9 / self.delivered as f64
    }
}

/// One line of the table.
pub(super) struct Row {
    pub kind: Kind,
    pub size: usize,
    pub sample: Sample,
    /// The offered rate, if the generator was paced.
    pub paced: Option<f64>,
}

impl Bench {
    pub fn new(kind: Kind, plan: &Plan) -> Result<Self> {
        let topo = Topology::new(&kind.tag())?;
        let mut tools = EbpfLoader::new()
            .load(bond_lab::BENCH)
            .context("loading the bench object (bond-ebpf/src/bin/bench.rs)")?;
        for p in ["bench_tx", "bench_sink", "bench_capture"] {
            xdp_mut(&mut tools, p)?
                .load()
                .with_context(|| format!("loading {p}"))?;
        }
        // Each test run with repeat > 1 adds its program to the kernel's XDP
        // dispatcher and removes it again, two RCU grace periods that leave
        // the generator idle most of the time, unless the program is in the
        // dispatcher already: attached to an interface. gen's loopback
        // carries no traffic.
        let tx = xdp_mut(&mut tools, "bench_tx")?;
        in_netns(&topo.load, || {
            tx.attach("lo", XdpMode::Skb)
                .context("attaching bench_tx to gen's loopback")
        })?;
        let mut b = Self {
            kind,
            cpus: plan.cpus.clone(),
            secs: plan.secs,
            dut: Dut::default(),
            tools,
            sink_link: None,
            topo,
        };
        b.set_sink("bench_capture")?;
        b.dut = Dut::setup(kind, &b.topo, &mut b.tools, plan.cpus.relay)?;
        Ok(b)
    }

    /// Puts `prog` (`bench_sink` or `bench_capture`) on the sink's veth in
    /// place of whichever is there.
    fn set_sink(&mut self, prog: &'static str) -> Result<()> {
        if self.sink_link.as_ref().is_some_and(|(p, _)| *p == prog) {
            return Ok(());
        }
        if let Some((old, id)) = self.sink_link.take() {
            xdp_mut(&mut self.tools, old)?
                .detach(id)
                .with_context(|| format!("detaching {old}"))?;
        }
        let p = xdp_mut(&mut self.tools, prog)?;
        let id = in_netns(&self.topo.sink, || {
            p.attach(SINK_DEV, XdpMode::default())
                .with_context(|| format!("attaching {prog} to {SINK_DEV}"))
        })?;
        self.sink_link = Some((prog, id));
        Ok(())
    }

    /// Readies the path for `size`-byte packets: checks its output, puts
    /// the counting sink on and warms it up.
    pub fn prepare(&mut self, size: usize) -> Result<Prepared> {
        let (frame, expect) = paths::frames(self.kind, size);
        self.set_template(&frame)?;
        self.check(&frame, &expect)?;
        self.set_sink("bench_sink")?;
        // A short warm-up (flows, conntrack and page pools settle). For the
        // userspace relays it is flat out and gives the rate to offer, a
        // little below it, so that few packets are generated only to be
        // dropped at the socket.
        let warm = self.sample(&frame, Duration::from_secs_f64(self.secs / 4.0), None)?;
        ensure!(warm.delivered > 0, "the warm-up delivered nothing");
        let paced = self
            .kind
            .is_userspace()
            .then(|| PACE_SHARE * warm.delivered as f64 / warm.wall.as_secs_f64());
        Ok(Prepared {
            size,
            frame,
            expect,
            paced,
        })
    }

    /// After the runs at one size: checks the counters and the output again
    /// (with the pages of the run's pool reused many times), and returns
    /// the median run.
    pub fn conclude(&mut self, p: Prepared, mut runs: Vec<Sample>) -> Result<Row> {
        self.check_counters()?;
        self.check(&p.frame, &p.expect)
            .context("after the measurement")?;
        self.check_counters()?;
        runs.sort_by(|a, b| a.ns_per_packet().total_cmp(&b.ns_per_packet()));
        let sample = *runs.get(runs.len() / 2).context("no runs")?;
        Ok(Row {
            kind: self.kind,
            size: p.size,
            sample,
            paced: p.paced,
        })
    }

    /// Sends CHECK_FRAMES frames in one test run with `bench_capture` on the
    /// sink: all must arrive, the last one as expected.
    fn check(&mut self, frame: &[u8], expect: &Expect) -> Result<()> {
        self.set_sink("bench_capture")?;
        let before = self.delivered()?;
        let slow_before = self.dut.forwarded_slowly()?;
        self.generate(frame, Amount::Frames(CHECK_FRAMES), None)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = 0;
        while Instant::now() < deadline {
            got = self.delivered()? - before;
            if got >= u64::from(CHECK_FRAMES) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if got != u64::from(CHECK_FRAMES) {
            bail!(
                "{got} of {CHECK_FRAMES} test frames reached the sink{}",
                match self.dut.bond_counters() {
                    Ok(Some(c)) => format!(" (bond: {c})"),
                    _ => String::new(),
                }
            );
        }
        if let (Some(a), Some(b)) = (slow_before, self.dut.forwarded_slowly()?) {
            // A new flow's first packets take the forward path (the
            // flowtable takes confirmed flows only); then none may.
            ensure!(
                b - a <= u64::from(CHECK_FRAMES / 100),
                "the flowtable did not carry the flow: {} of {CHECK_FRAMES} test frames took \
                 the forward path",
                b - a
            );
        }
        let out = self.captured()?;
        match expect {
            Expect::Frame(want) => same_bytes(&out, want)?,
            Expect::Wrapped(want) => {
                let want = packets::fill_open(&out, want)
                    .map_err(|e| anyhow!("the sink's bond header: {e}"))?;
                same_bytes(&out, &want)?;
            }
            Expect::Udp { src, dst, payload } => {
                let got = udp_of(&out).context("the sink got no IPv4/UDP frame")?;
                ensure!(
                    got == (*src, *dst, payload.clone()),
                    "the sink got {got:?}, expected {:?}",
                    (src, dst, payload)
                );
            }
        }
        Ok(())
    }

    /// For bond's paths: no drops counted, and the server never handed a
    /// packet to the kernel (its slow path).
    fn check_counters(&self) -> Result<()> {
        if let Some(c) = self.dut.bond_counters()? {
            bail!("bond counted {c}");
        }
        Ok(())
    }

    /// One run: the generator for `dur`, CPU time and deliveries around it.
    pub fn sample(&self, frame: &[u8], dur: Duration, pace: Option<f64>) -> Result<Sample> {
        let c0 = self.delivered()?;
        let h0 = self.helpers_cpu()?;
        let start = Instant::now();
        let g = self.generate(frame, Amount::For(dur), pace)?;
        let wall = start.elapsed();
        let h1 = self.helpers_cpu()?;
        thread::sleep(SETTLE);
        let delivered = self.delivered()? - c0;
        Ok(Sample {
            sent: g.sent,
            delivered,
            wall,
            cpu: g.cpu + h1.saturating_sub(h0),
            gen_share: g.cpu.as_secs_f64() / wall.as_secs_f64(),
        })
    }

    /// Run time so far of the threads that work for the path besides the
    /// generator: the ksoftirqd threads of the CPUs used, the relay thread.
    fn helpers_cpu(&self) -> Result<Duration> {
        let mut t = Duration::ZERO;
        for &(cpu, pid) in &self.cpus.softirqd {
            if cpu == self.cpus.generator || (self.dut.relay.is_some() && cpu == self.cpus.relay) {
                t += run_time(&format!("/proc/{pid}/schedstat"))?;
            }
        }
        if let Some(r) = &self.dut.relay {
            t += run_time(&format!("/proc/self/task/{}/schedstat", r.tid))?;
        }
        Ok(t)
    }

    /// Sends `frame` out of the generator's veth from its pinned CPU. `pace`
    /// (frames per second) spaces batches.
    fn generate(&self, frame: &[u8], amount: Amount, pace: Option<f64>) -> Result<Generated> {
        let prog: &Xdp = self
            .tools
            .program("bench_tx")
            .context("no program bench_tx")?
            .try_into()?;
        let cpu = self.cpus.generator;
        in_netns(&self.topo.load, || {
            pin_to(cpu)?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
            // rx_queue_index, egress_ifindex. XDP_TX in live mode goes out
            // of the ingress interface.
            let ctx: Vec<u8> = [0, frame.len() as u32, 0, ifindex(GEN_DEV)?, 0, 0]
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect();
            let send = |n: u32| {
                prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat: n,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..Default::default()
                })
                .context("BPF_PROG_TEST_RUN (live frames) of bench_tx")
            };
            let cpu0 = thread_cpu()?;
            let mut sent = 0u64;
            match amount {
                Amount::Frames(n) => {
                    send(n)?;
                    sent = u64::from(n);
                }
                Amount::For(dur) => {
                    // Paced: about a millisecond of traffic per call (each
                    // call costs some 20 us to set up its page pool).
                    let chunk = match pace {
                        Some(rate) => {
                            ((rate / 1000.0 / f64::from(BATCH)).round() as u32)
                                .clamp(1, CHUNK / BATCH)
                                * BATCH
                        }
                        None => CHUNK,
                    };
                    let start = Instant::now();
                    while start.elapsed() < dur {
                        if let Some(rate) = pace {
                            let due = start + Duration::from_secs_f64(sent as f64 / rate);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                thread::sleep(wait);
                            }
                        }
                        send(chunk)?;
                        sent += u64::from(chunk);
                    }
                }
            }
            Ok(Generated {
                sent,
                cpu: thread_cpu()? - cpu0,
            })
        })
    }

    /// Gives `bench_tx` the head of `frame` to restore in every frame.
    fn set_template(&mut self, frame: &[u8]) -> Result<()> {
        let n = frame.len().min(TEMPLATE_MAX);
        let mut t = [0u8; 8 + TEMPLATE_MAX];
        t[..4].copy_from_slice(&(n as u32).to_ne_bytes());
        t[8..8 + n].copy_from_slice(&frame[..n]);
        let mut m: Array<_, [u8; 8 + TEMPLATE_MAX]> = self
            .tools
            .map_mut("TEMPLATE")
            .context("map TEMPLATE")?
            .try_into()?;
        m.set(0, t, 0).context("setting TEMPLATE")
    }

    /// Frames the sink has counted so far.
    fn delivered(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> = self
            .tools
            .map("SINK_COUNT")
            .context("map SINK_COUNT")?
            .try_into()?;
        Ok(m.get(&0, 0).context("reading SINK_COUNT")?.iter().sum())
    }

    /// The last frame `bench_capture` kept.
    fn captured(&self) -> Result<Vec<u8>> {
        let m: Array<_, [u8; 8 + CAPTURE_MAX]> = self
            .tools
            .map("CAPTURE")
            .context("map CAPTURE")?
            .try_into()?;
        let c = m.get(&0, 0).context("reading CAPTURE")?;
        let len = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as usize;
        ensure!(
            (1..=CAPTURE_MAX).contains(&len),
            "bench_capture kept no frame"
        );
        Ok(c[8..8 + len].to_vec())
    }

    /// Stops the userspace relay, if any, and reports how it ended.
    pub fn finish(mut self) -> Result<()> {
        match self.dut.relay.take() {
            Some(r) => r.stop().context("userspace relay"),
            None => Ok(()),
        }
    }
}

/// What a generator run did.
struct Generated {
    sent: u64,
    /// The generator thread's run time (with the softirq work it did).
    cpu: Duration,
}

/// How much the generator sends.
#[derive(Clone, Copy)]
enum Amount {
    Frames(u32),
    For(Duration),
}

/// Source, destination and payload of an Ethernet/IPv4/UDP frame.
fn udp_of(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, Vec<u8>)> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) = (p.net, p.transport) else {
        return None;
    };
    let h = ip.header();
    Some((
        SocketAddrV4::new(h.source_addr(), udp.source_port()),
        SocketAddrV4::new(h.destination_addr(), udp.destination_port()),
        udp.payload().to_vec(),
    ))
}

/// `got` must be `want`, byte for byte.
fn same_bytes(got: &[u8], want: &[u8]) -> Result<()> {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        bail!(
            "the sink got other bytes than expected (first difference at byte {at:?}, \
             lengths {} vs {})\n got: {got:02x?}\nwant: {want:02x?}",
            got.len(),
            want.len()
        );
    }
    Ok(())
}
