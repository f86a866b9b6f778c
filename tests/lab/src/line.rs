//! A lab link's delay line: what a real uplink does to frames that `tbf`
//! cannot (this kernel has no netem). One process per link, in a namespace
//! of its own between the link's modem and the internet bridge, forwards
//! every Ethernet frame between its two interfaces (AF_PACKET, both
//! directions) after
//!
//! - a one-way delay,
//! - correlated jitter that keeps order (a link does not reorder its own
//!   frames: a frame leaves no earlier than the one before it),
//! - random loss,
//! - and, on command, a black hole: frames vanish while carrier stays up.
//!
//! The link's rate stays the modem's `tbf`, so the bottleneck queue sits
//! where a real modem's does; the lab steps it for rate changes.
//!
//! An end given as `tun:NS/DEV` is a TUN device the line creates in
//! namespace NS instead: two of them make an L3 link (no Ethernet header,
//! as PPP or a raw-IP modem), whose carrier is the line's life. Its
//! packets carry the kernel's packet information, and one whose protocol
//! there is not its IP version's is dropped (`misframed`), as an L3 driver
//! framing by it would garble it.
//!
//! The process reads commands on stdin, one a line: `dark`, `light`,
//! `stats` (prints a JSON line of counters on stdout). It exits when stdin
//! closes. The timing rules are pure ([`Line`], [`Jitter`]) and unit-tested.

use std::{
    io::BufRead,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bond_agent::net::Frames;

/// What a link does to each frame, the same in both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impair {
    /// One-way delay.
    pub delay: Duration,
    /// Bound of the correlated jitter: the delay wanders within
    /// `delay ± jitter` (never below zero).
    pub jitter: Duration,
    /// Probability that a frame is lost, 0 to 1.
    pub loss: f64,
}

impl Impair {
    pub const fn delay_ms(ms: u64) -> Self {
        Self {
            delay: Duration::from_millis(ms),
            jitter: Duration::ZERO,
            loss: 0.0,
        }
    }

    /// The command-line arguments of `bond-delay` for this impairment.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--delay-us".into(),
            self.delay.as_micros().to_string(),
            "--jitter-us".into(),
            self.jitter.as_micros().to_string(),
            "--loss".into(),
            self.loss.to_string(),
        ]
    }
}

/// How fast the jitter wanders: its correlation time. Delay changes over
/// this scale, as an LTE cell's queue or scheduler does, not frame to frame.
pub const JITTER_TAU: Duration = Duration::from_millis(200);

/// Correlated jitter: an Ornstein-Uhlenbeck walk (mean zero, standard
/// deviation `bound / 2`, correlation time [`JITTER_TAU`]) held within
/// `±bound`.
#[derive(Clone, Debug)]
pub struct Jitter {
    bound_ns: f64,
    x: f64,
    last_ns: Option<u64>,
}

impl Jitter {
    pub fn new(bound: Duration) -> Self {
        Self {
            bound_ns: bound.as_nanos() as f64,
            x: 0.0,
            last_ns: None,
        }
    }

    /// The jitter at time `now_ns` (nanoseconds, non-decreasing), with
    /// `normal` a standard normal draw.
    pub fn at(&mut self, now_ns: u64, normal: f64) -> f64 {
        if self.bound_ns == 0.0 {
            return 0.0;
        }
        let dt = self
            .last_ns
            .map_or(f64::INFINITY, |l| now_ns.saturating_sub(l) as f64);
        self.last_ns = Some(now_ns);
        let keep = (-dt / JITTER_TAU.as_nanos() as f64).exp();
        let sigma = self.bound_ns / 2.0;
        self.x = (self.x * keep + sigma * (1.0 - keep * keep).sqrt() * normal)
            .clamp(-self.bound_ns, self.bound_ns);
        self.x
    }
}

/// One direction of a link: when each frame leaves.
#[derive(Clone, Debug)]
pub struct Line {
    delay_ns: f64,
    loss: f64,
    jitter: Jitter,
    last_release_ns: u64,
}

impl Line {
    pub fn new(imp: Impair) -> Self {
        Self {
            delay_ns: imp.delay.as_nanos() as f64,
            loss: imp.loss.clamp(0.0, 1.0),
            jitter: Jitter::new(imp.jitter),
            last_release_ns: 0,
        }
    }

    /// A frame that arrived at `now_ns`: its release time, or `None` if it
    /// is lost. `uniform` is a draw from [0, 1), `normal` a standard normal
    /// one. Release times never decrease, so frames keep their order.
    pub fn admit(&mut self, now_ns: u64, uniform: f64, normal: f64) -> Option<u64> {
        if uniform < self.loss {
            return None;
        }
        let d = (self.delay_ns + self.jitter.at(now_ns, normal)).max(0.0);
        let release = (now_ns + d as u64).max(self.last_release_ns);
        self.last_release_ns = release;
        Some(release)
    }
}

/// Counters of one delay line (both directions).
#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    lost: AtomicU64,
    dark: AtomicU64,
    /// Frames that could not be sent (the other side refused them).
    send_failed: AtomicU64,
    /// Frames larger than the receive buffer (an offload left on).
    oversize: AtomicU64,
    /// Packets from a TUN end whose packet information names another
    /// protocol than their IP version: an L3 driver (PPP, WireGuard)
    /// frames by that protocol and would garble or drop them; so does the
    /// line.
    misframed: AtomicU64,
    /// Frames the kernel dropped because a socket's receive buffer was
    /// full (the line fell behind).
    rx_dropped: AtomicU64,
    /// Frames sent more than [`LATE_NS`] after their due time (the line's
    /// thread was not scheduled in time: the machine is too busy for the
    /// delays asked), and the latest any frame left.
    late: AtomicU64,
    late_max_ns: AtomicU64,
}

/// How late past its due time a frame may leave before it counts as late.
const LATE_NS: u64 = 1_000_000;

/// Frames the kernel dropped on `fd` since the last call (reading
/// PACKET_STATISTICS resets it).
fn socket_drops(fd: &OwnedFd) -> Result<u64> {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: st and len are live and len is st's size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&raw mut st).cast(),
            &raw mut len,
        )
    };
    ensure!(
        rc == 0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    Ok(u64::from(st.tp_drops))
}

/// The largest frame forwarded: a 1500-byte MTU plus its Ethernet header
/// (and a VLAN tag). A larger one means a segmentation offload was left on.
const MAX_FRAME: usize = 1522;

/// One end of the line: an AF_PACKET socket on an interface, or a TUN
/// device's fd (`tun`), read and written whole packets at a time.
struct End {
    fd: OwnedFd,
    tun: bool,
}

impl End {
    /// `tun:NS/DEV`: a TUN device created in namespace NS; anything else
    /// names an interface here.
    fn open(spec: &str) -> Result<Self> {
        let Some(at) = spec.strip_prefix("tun:") else {
            return Ok(Self {
                fd: packet_socket(spec)?,
                tun: false,
            });
        };
        let (ns, dev) = at
            .split_once('/')
            .with_context(|| format!("{spec}: tun:NAMESPACE/DEVICE"))?;
        let home = std::fs::File::open("/proc/thread-self/ns/net")?;
        let there = std::fs::File::open(format!("/run/netns/{ns}"))
            .with_context(|| format!("{spec}: namespace {ns}"))?;
        nix::sched::setns(&there, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("{spec}: entering namespace {ns}"))?;
        let fd = bond_agent::net::open_tun(dev, Frames::IpWithInfo, false);
        nix::sched::setns(&home, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("back to the line's namespace")?;
        Ok(Self { fd: fd?, tun: true })
    }

    /// Reads one frame into `buf`: its whole length (a socket's may be
    /// more than `buf` holds), or the error.
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: buf is a live buffer of the length given.
        let n = unsafe {
            if self.tun {
                libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
            } else {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            }
        };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }

    fn send(&self, frame: &[u8]) -> bool {
        // SAFETY: frame is a live buffer of the length given.
        let n = unsafe {
            if self.tun {
                libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len())
            } else {
                libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0)
            }
        };
        n >= 0
    }

    /// Whether a packet read from this end is framed as what it is: from
    /// a TUN end, its packet information's protocol (bytes 2 and 3) must
    /// be its IP version's.
    fn framed_right(&self, frame: &[u8]) -> bool {
        if !self.tun {
            return true;
        }
        let (Some(proto), Some(first)) = (frame.get(2..4), frame.get(4)) else {
            return false;
        };
        match first >> 4 {
            4 => proto == [0x08, 0x00],
            6 => proto == [0x86, 0xdd],
            _ => false,
        }
    }

    /// Frames the kernel dropped for a full receive buffer (a socket's).
    fn drops(&self) -> Result<u64> {
        if self.tun {
            Ok(0)
        } else {
            socket_drops(&self.fd)
        }
    }
}

/// An AF_PACKET socket bound to one interface, all protocols, not seeing
/// its own transmissions.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(ifname)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    ensure!(ifindex != 0, "no interface {ifname}");
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a fresh socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the length given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "binding to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    // Room for a burst at 100 Mbit/s while the reader is descheduled.
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20)?;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20)?;
    Ok(fd)
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, v: i32) -> Result<()> {
    // SAFETY: v is an int that lives across the call; its size is given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u = rng.f64().max(f64::MIN_POSITIVE);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.f64()).cos()
}

/// Priority of the line's threads under `SCHED_FIFO`: above every
/// ordinary task, as netem's softirq is, so a busy host (iperf3, builds,
/// the agents) does not make the line late; still below the kernel's own
/// real-time threads.
const LINE_PRIORITY: i32 = 10;

/// Makes the calling thread keep time as a kernel qdisc would: real-time
/// scheduling and no timer slack (the default 50 µs slack is a fifth of a
/// 1 Mbit/s frame's time). A host that refuses (no CAP_SYS_NICE) gets a
/// line that still works, with the host scheduler's lateness, and is told.
fn keep_time() {
    let param = libc::sched_param {
        sched_priority: LINE_PRIORITY,
    };
    // SAFETY: a plain call on the calling thread with a valid argument.
    let sched =
        unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
    if sched != 0 {
        let e = std::io::Error::from_raw_os_error(sched);
        eprintln!("delay line: real-time scheduling refused ({e}), frames may leave late");
    }
    // SAFETY: as above; PR_SET_TIMERSLACK takes the slack in ns.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("delay line: timer slack kept ({e}), frames may leave late");
    }
}

/// Forwards frames from `rx` to `tx` through a [`Line`]: this thread
/// reads and stamps, a second one sleeps until each release and sends.
/// Both keep real time ([`keep_time`]).
fn direction(
    rx: Arc<End>,
    tx: Arc<End>,
    imp: Impair,
    seed: u64,
    dark: Arc<AtomicBool>,
    stats: Arc<Stats>,
    epoch: Instant,
) {
    let (queue, frames) = mpsc::channel::<(u64, Vec<u8>)>();
    let sender_stats = stats.clone();
    std::thread::spawn(move || {
        keep_time();
        for (release, frame) in frames {
            let now = epoch.elapsed().as_nanos() as u64;
            if release > now {
                std::thread::sleep(Duration::from_nanos(release - now));
            }
            let late = (epoch.elapsed().as_nanos() as u64).saturating_sub(release);
            sender_stats.late_max_ns.fetch_max(late, Relaxed);
            if late > LATE_NS {
                sender_stats.late.fetch_add(1, Relaxed);
            }
            let c = if tx.send(&frame) {
                &sender_stats.forwarded
            } else {
                &sender_stats.send_failed
            };
            c.fetch_add(1, Relaxed);
        }
    });
    keep_time();
    let mut line = Line::new(imp);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = vec![0u8; 65536];
    loop {
        let n = match rx.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        if n > MAX_FRAME {
            stats.oversize.fetch_add(1, Relaxed);
            continue;
        }
        if !rx.framed_right(&buf[..n]) {
            if stats.misframed.fetch_add(1, Relaxed) == 0 {
                eprintln!("misframed: packet information {:02x?}", &buf[..n.min(8)]);
            }
            continue;
        }
        if dark.load(Relaxed) {
            stats.dark.fetch_add(1, Relaxed);
            continue;
        }
        let now = epoch.elapsed().as_nanos() as u64;
        let (u, z) = (rng.f64(), normal(&mut rng));
        match line.admit(now, u, z) {
            Some(release) => {
                if queue.send((release, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            None => {
                stats.lost.fetch_add(1, Relaxed);
            }
        }
    }
}

/// `bond-delay --a END --b END [--delay-us N] [--jitter-us N] [--loss P]
/// [--seed N]`: runs a delay line between ends `a` and `b` (interfaces,
/// or `tun:NS/DEV` devices it creates) until stdin closes.
pub fn main_with_args(args: &[String]) -> Result<()> {
    let mut a = None;
    let mut b = None;
    let mut imp = Impair::default();
    let mut seed = 1u64;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = || {
            val.parse::<u64>()
                .with_context(|| format!("{flag} {val}: not a number"))
        };
        match flag.as_str() {
            "--a" => a = Some(val.clone()),
            "--b" => b = Some(val.clone()),
            "--delay-us" => imp.delay = Duration::from_micros(num()?),
            "--jitter-us" => imp.jitter = Duration::from_micros(num()?),
            "--loss" => {
                imp.loss = val.parse().with_context(|| format!("--loss {val}"))?;
                ensure!(
                    (0.0..=1.0).contains(&imp.loss),
                    "--loss {val}: not within 0 to 1"
                );
            }
            "--seed" => seed = num()?,
            _ => bail!("unknown argument {flag}"),
        }
    }
    let (a, b) = (a.context("--a IF missing")?, b.context("--b IF missing")?);
    let sa = Arc::new(End::open(&a)?);
    let sb = Arc::new(End::open(&b)?);
    ensure!(
        sa.tun == sb.tun,
        "{a} and {b}: both ends TUN devices, or neither (a line does not convert frames)"
    );
    let sockets = [sa.clone(), sb.clone()];
    let dark = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let epoch = Instant::now();
    for (rx, tx, s) in [(sa.clone(), sb.clone(), seed), (sb, sa, seed ^ 0x9e37_79b9)] {
        let (dark, stats) = (dark.clone(), stats.clone());
        std::thread::spawn(move || direction(rx, tx, imp, s, dark, stats, epoch));
    }
    println!("delay line {a} <-> {b}: {imp:?}");
    for cmd in std::io::stdin().lock().lines() {
        match cmd?.trim() {
            "dark" => dark.store(true, Relaxed),
            "light" => dark.store(false, Relaxed),
            "stats" => {
                for s in &sockets {
                    stats.rx_dropped.fetch_add(s.drops()?, Relaxed);
                }
                let c = |a: &AtomicU64| a.load(Relaxed);
                println!(
                    "{}",
                    serde_json::json!({
                        "forwarded": c(&stats.forwarded),
                        "lost": c(&stats.lost),
                        "dark": c(&stats.dark),
                        "send_failed": c(&stats.send_failed),
                        "oversize": c(&stats.oversize),
                        "misframed": c(&stats.misframed),
                        "rx_dropped": c(&stats.rx_dropped),
                        "late": c(&stats.late),
                        "late_max_us": c(&stats.late_max_ns) / 1000,
                    })
                );
            }
            other => eprintln!("unknown command {other:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_plain_delay_shifts_every_frame_by_it() {
        let mut l = Line::new(Impair::delay_ms(20));
        assert_eq!(l.admit(0, 0.5, 0.0), Some(20 * MS));
        assert_eq!(
            l.admit(5 * MS, 0.5, 3.0),
            Some(25 * MS),
            "no jitter configured"
        );
    }

    #[test]
    fn loss_drops_the_share_asked_for() {
        let mut l = Line::new(Impair {
            loss: 0.25,
            ..Impair::delay_ms(1)
        });
        assert_eq!(l.admit(0, 0.2, 0.0), None);
        assert!(l.admit(0, 0.3, 0.0).is_some());
        let mut rng = fastrand::Rng::with_seed(7);
        let lost = (0..100_000)
            .filter(|&i| l.admit(i, rng.f64(), 0.0).is_none())
            .count();
        assert!((24_000..26_000).contains(&lost), "{lost}");
    }

    /// Jitter of ±10 ms: the delay wanders over its whole range, stays
    /// within it, changes little between frames a millisecond apart, and
    /// frames leave in the order they came.
    #[test]
    fn jitter_is_bounded_correlated_and_keeps_order() {
        let imp = Impair {
            jitter: Duration::from_millis(10),
            ..Impair::delay_ms(40)
        };
        let mut l = Line::new(imp);
        let mut rng = fastrand::Rng::with_seed(1);
        let (mut lo, mut hi, mut last, mut prev_d) = (u64::MAX, 0u64, 0u64, None::<f64>);
        let mut max_step = 0f64;
        for i in 0..60_000u64 {
            let now = i * MS / 2; // a frame every 0.5 ms for 30 s
            let r = l.admit(now, 1.0, normal(&mut rng)).unwrap();
            assert!(r >= last, "frame {i} would overtake the one before");
            last = r;
            let d = l.jitter.x;
            if let Some(p) = prev_d {
                max_step = max_step.max((d - p).abs());
            }
            prev_d = Some(d);
            lo = lo.min(r - now);
            hi = hi.max(r - now);
        }
        assert!(
            lo >= 30 * MS && hi <= 50 * MS + MS,
            "delay left 40±10 ms: {lo}..{hi}"
        );
        assert!(lo < 34 * MS && hi > 46 * MS, "jitter too timid: {lo}..{hi}");
        assert!(
            max_step < 3.0 * MS as f64,
            "not correlated: a {max_step} ns step in 0.5 ms"
        );
    }

    #[test]
    fn jitter_never_makes_a_delay_negative() {
        let imp = Impair {
            jitter: Duration::from_millis(10),
            ..Impair::delay_ms(2)
        };
        let mut l = Line::new(imp);
        for i in 0..1000 {
            let now = i * MS;
            assert!(l.admit(now, 1.0, -5.0).unwrap() >= now);
        }
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_are_named() {
        let imp = Impair {
            loss: 0.001,
            jitter: Duration::from_millis(10),
            ..Impair::delay_ms(40)
        };
        assert_eq!(imp.args()[1], "40000");
        let err = |a: &[&str]| {
            let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
            main_with_args(&a).unwrap_err().to_string()
        };
        assert!(err(&["--loss", "2"]).contains("--loss 2"));
        assert!(err(&["--delay-us", "x"]).contains("--delay-us x"));
        assert!(err(&["--bogus", "1"]).contains("--bogus"));
        assert!(err(&["--b", "x"]).contains("--a IF missing"));
    }
}
