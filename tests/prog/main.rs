//! Each BPF program on crafted packets through BPF_PROG_TEST_RUN, Katran
//! style: every fixture is an input packet, the expected verdict, the exact
//! expected output bytes (built independently in `common::packets`, every
//! checksum recomputed with etherparse) and the expected counters, read back
//! through `bond_datapath::Maps`. The programs are configured only
//! through `Maps`, as the agent configures them.
#[path = "../common/mod.rs"]
mod common;
mod fixtures;

mod bond_director;
mod bond_server;
mod bond_terminal;
mod bond_wrap;
mod flow_upkeep;
mod hostile;
mod mutants;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf,
    programs::{Program, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use bond_common::maps::{
    FlowKey, LINK_VALID, LinkStats, MAX_NAT_BLOCKS, NAT_SEQUENTIAL, NatBlocks, RelayLink,
    ServerConfig, ServerLink, TerminalConfig, UpLink,
};
use bond_datapath::{self as datapath, Maps};
use common::{
    PinDir, isolate,
    packets::{
        ANNOUNCE, Bond, DATA_DOWN, DATA_UP, ETH_P_IP, ETH_P_IPV6, IcmpError, Ip, Ip6, L4, Mac,
        OPEN, Outer, WRAP_LEN, arp_frame, assert_checksums, assert_checksums6,
        assert_wrapped_checksums, eth, fill_open, fix_ipv4_checksum, ipv4_of, ipv6_udp_frame,
        set_total_len, udp_frame, wrapped,
    },
};
use fixtures::{srv, term, term_out, wrap};

/// The queue the tests let a path count: long enough that the slow rates
/// they use (so that picks do not depend on how fast the test runs) are
/// never cut short.
const TEST_BACKLOG_US: u32 = 60_000_000;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const TC_ACT_OK: u32 = 0;
/// BPF_PROG_TEST_RUN's limits (net/bpf/test_run.c) with 4 KiB pages and
/// x86_64's 320-byte `skb_shared_info`. An XDP frame's linear part, all a
/// program without `xdp.frags` (all of bond's) can read, is a page less
/// the XDP headroom (256) and the shared info; up to 17 more pages
/// (MAX_SKB_FRAGS) go in fragments, after which the kernel says ENOMEM. A
/// TC program gets one linear skb: a page less NET_SKB_PAD (64) and the
/// shared info, after which the kernel says EINVAL. Below an Ethernet
/// header, both say EINVAL.
const XDP_LINEAR_MAX: usize = 4096 - 256 - 320;
const XDP_FRAME_MAX: usize = XDP_LINEAR_MAX + 17 * 4096;
const TC_FRAME_MAX: usize = 4096 - 64 - 320;

// ------------------------------------------------------------- harness --

/// One loaded object, its maps pinned in a directory of its own (removed on
/// drop, after the object is unloaded).
struct Obj {
    ebpf: Ebpf,
    maps: Maps,
    /// The programs' log (the first drop of each reason), read as the
    /// agent reads it; its lines collect in `lines`.
    log: aya_log::EbpfLogger<datapath::DropLog<LogSink>>,
    lines: Arc<Mutex<Vec<String>>>,
    _pin: PinDir,
}

type LogSink = Box<dyn Fn(&str) + Send + Sync>;

impl Obj {
    fn load(object: &[u8], tag: &str, progs: &[&str]) -> Self {
        Self::load_with_sizes(object, tag, progs, &[])
    }

    /// As [`Self::load`], with some maps' sizes set at load time.
    fn load_with_sizes(object: &[u8], tag: &str, progs: &[&str], sizes: &[(&str, u32)]) -> Self {
        let pin = PinDir::new(tag);
        let mut ebpf = datapath::load_with_sizes(object, pin.path(), sizes).expect("load object");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let write: LogSink = Box::new(move |l| sink.lock().unwrap().push(l.to_string()));
        let log = datapath::drop_log(&mut ebpf, write).expect("the programs' log");
        for &name in progs {
            match ebpf.program_mut(name).expect("program in object") {
                Program::Xdp(p) => p.load(),
                Program::SchedClassifier(p) => p.load(),
                _ => panic!("{name}: unexpected program type"),
            }
            .unwrap_or_else(|e| panic!("loading {name}: {e}"));
        }
        let maps = Maps::new(pin.path());
        Self {
            ebpf,
            maps,
            log,
            lines,
            _pin: pin,
        }
    }

    /// What the programs logged since the last call.
    fn logged(&mut self) -> Vec<String> {
        self.log.flush();
        std::mem::take(&mut *self.lines.lock().unwrap())
    }

    fn terminal(tag: &str) -> Self {
        Self::load(
            bond_datapath::ebpf::TERMINAL,
            tag,
            &[
                "bond_wrap",
                "bond_terminal",
                "bond_relay",
                "bond_terminal_l3",
            ],
        )
    }

    fn server(tag: &str) -> Self {
        Self::load(bond_datapath::ebpf::SERVER, tag, &["bond_server"])
    }

    /// Runs `prog` once on `input`; returns the verdict and the output packet.
    fn run(&self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(prog, input)
            .unwrap_or_else(|errno| panic!("test_run {prog}: refused (errno {errno})"))
    }

    /// Runs `prog` and checks the verdict and, if given, the exact output.
    fn expect(&self, prog: &str, what: &str, input: &[u8], verdict: u32, output: Option<&[u8]>) {
        let (v, out) = self.run(prog, input);
        assert_eq!(v, verdict, "{what}: verdict");
        if let Some(want) = output {
            assert_bytes(&out, want, what);
        }
    }

    /// Runs `prog`, expects a drop counted under exactly `reason`.
    fn expect_drop(&self, prog: &str, what: &str, input: &[u8], verdict: u32, reason: &str) {
        let before = self.drops();
        let (v, _) = self.run(prog, input);
        assert_eq!(v, verdict, "{what}: verdict");
        let after = self.drops();
        let grew: Vec<_> = after
            .iter()
            .zip(&before)
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1 - b.1))
            .collect();
        assert_eq!(grew, vec![(reason, 1)], "{what}: drop counters");
    }

    /// Drop counters of whichever role this object is.
    fn drops(&self) -> Vec<(&'static str, u64)> {
        if self.maps.has("T_DROPS") {
            self.maps.terminal_drops()
        } else if self.maps.has("D_DROPS") {
            self.maps.director_drops()
        } else {
            self.maps.server_drops()
        }
        .expect("drop counters")
    }

    fn nonzero_drops(&self) -> Vec<(&'static str, u64)> {
        self.drops().into_iter().filter(|d| d.1 != 0).collect()
    }

    fn event(&self, name: &str) -> u64 {
        let ev = self.maps.server_events().expect("events");
        ev.into_iter()
            .find(|e| e.0 == name)
            .unwrap_or_else(|| panic!("no event {name}"))
            .1
    }
}

/// Byte comparison that says where the first difference is.
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    let want = &fill_open(got, want).unwrap_or_else(|e| panic!("{what}: {e}"))[..];
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: output differs (first difference at byte {at:?}, lengths {} vs {})\n got: {got:02x?}\nwant: {want:02x?}",
            got.len(),
            want.len()
        );
    }
}

fn ip4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

// --------------------------------------------- hostile-input harness --

// ================================================= bad input (issue 5) ==
//
// Every program on hostile input, beyond the cases above: frames cut at
// every length, the header fields the issue names set wrong at every entry
// point, all 256 bond kinds, the sizes BPF_PROG_TEST_RUN takes, and
// mutants of every valid fixture. Each case states the rule it checks;
// where the rule is written only in the program (bond-ebpf/src/bin/*.rs),
// the comment says which check makes it. The last two tests were written
// against bugs this found (outer lengths not checked; an inner TCP packet
// shorter than its header taken), and now hold the fixes.

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::ProgramError,
    sys::SyscallError,
};
use bond_common::maps::{
    Flow, Flow6, Flow6Key, FragFlow, FragKey, Nat6Entry, NatEntry, NatKey, Session, SessionKey,
    event,
};
use common::packets::{IPV4_NOPS, fragments, insert_ipv4_options, set_fragment, set_ttl};

const EINVAL: i32 = libc::EINVAL;
const ENOMEM: i32 = libc::ENOMEM;
/// Offsets in a wrapped frame (docs/architecture.md, "Wire format").
const OUTER_IP: usize = 14;
const OUTER_UDP: usize = OUTER_IP + 20;
const BOND: usize = OUTER_UDP + 8;
const INNER: usize = WRAP_LEN;
/// What a wrap adds in front of the inner packet.
const OUTER: usize = WRAP_LEN - 14;

/// What one frame must come to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Want {
    /// BPF_PROG_TEST_RUN refuses it with this errno: no program runs.
    Refused(i32),
    /// XDP_PASS with the frame as it came, nothing counted: not bond DATA
    /// (or a control message, for the agent's socket).
    Untouched,
    /// Dropped, and counted once under exactly this reason.
    Drop(&'static str),
    /// This verdict with exactly these bytes, nothing counted.
    Out(u32, Vec<u8>),
}

/// A loaded object's counters, read through its own map handles: cheap
/// enough to read around every one of thousands of runs.
struct Counters<'a> {
    drops: PerCpuArray<&'a MapData, u64>,
    events: Option<PerCpuArray<&'a MapData, u64>>,
}

/// The counters at one instant, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Snapshot {
    drops: Vec<u64>,
    events: Vec<u64>,
}

impl Counters<'_> {
    fn read(&self) -> Snapshot {
        let sum = |m: &PerCpuArray<&MapData, u64>, n: u32| -> Vec<u64> {
            (0..n)
                .map(|i| m.get(&i, 0).expect("counter").iter().sum())
                .collect()
        };
        Snapshot {
            drops: sum(&self.drops, bond_common::drops::COUNT),
            events: self
                .events
                .as_ref()
                .map_or_else(Vec::new, |e| sum(e, event::COUNT)),
        }
    }
}

impl Snapshot {
    /// The drop reasons that grew since `before`, and by how much.
    fn drops_since(&self, before: &Self) -> Vec<(&'static str, u64)> {
        bond_common::drops::NAMES
            .iter()
            .zip(self.drops.iter().zip(&before.drops))
            .filter(|(_, (a, b))| a != b)
            .map(|(n, (a, b))| (*n, a - b))
            .collect()
    }

    /// How much server event `idx` grew since `before`.
    fn event_since(&self, before: &Self, idx: u32) -> u64 {
        self.events[idx as usize] - before.events[idx as usize]
    }
}

impl Obj {
    fn counters(&self) -> Counters<'_> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .map(|m| PerCpuArray::try_from(m).unwrap_or_else(|e| panic!("{name}: {e}")))
        };
        Counters {
            drops: map("T_DROPS")
                .or_else(|| map("S_DROPS"))
                .expect("a drop counter map"),
            events: map("S_EVENTS"),
        }
    }

    /// Runs `prog` once on `input`: the verdict and output packet, or the
    /// errno with which BPF_PROG_TEST_RUN refused the input.
    fn try_run(&self, prog: &str, input: &[u8]) -> Result<(u32, Vec<u8>), i32> {
        // Room for the input plus a wrap.
        let mut out = vec![0u8; input.len().max(4096) + 128];
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let p = self.ebpf.program(prog).expect("program");
        let r = if let Ok(x) = <&Xdp>::try_from(p) {
            x.test_run(opts)
        } else {
            <&SchedClassifier>::try_from(p)
                .expect("XDP or TC program")
                .test_run(opts)
        };
        match r {
            Ok(r) => {
                out.truncate(r.data_size_out as usize);
                Ok((r.return_value, out))
            }
            Err(ProgramError::SyscallError(SyscallError { io_error, .. })) => {
                Err(io_error.raw_os_error().expect("an errno"))
            }
            Err(e) => panic!("test_run {prog}: {e}"),
        }
    }

    /// Runs `prog` on `input` and checks what came of it against `want`:
    /// the verdict, the exact output, and the drop counters (one reason
    /// grown by one for a drop, none otherwise).
    fn check(&self, c: &Counters, prog: &str, what: &str, input: &[u8], want: &Want) {
        let before = c.read();
        let got = self.try_run(prog, input);
        let grew = c.read().drops_since(&before);
        match (want, got) {
            (Want::Refused(e), Err(g)) => assert_eq!(g, *e, "{what}: errno"),
            (_, Err(g)) => panic!("{what}: test_run refused it (errno {g}), want {want:?}"),
            (Want::Refused(e), Ok((v, _))) => panic!("{what}: ran (verdict {v}), want errno {e}"),
            (Want::Untouched, Ok((v, out))) => {
                assert_eq!(v, XDP_PASS, "{what}: verdict");
                assert_bytes(&out, input, what);
            }
            (Want::Drop(reason), Ok((v, _))) => {
                let shot = if prog == "bond_wrap" {
                    TC_ACT_SHOT
                } else {
                    XDP_DROP
                };
                assert_eq!(v, shot, "{what}: verdict");
                assert_eq!(grew, vec![(*reason, 1)], "{what}: drop counters");
                return;
            }
            (Want::Out(verdict, bytes), Ok((v, out))) => {
                assert_eq!(v, *verdict, "{what}: verdict");
                assert_bytes(&out, bytes, what);
            }
        }
        assert_eq!(grew, vec![], "{what}: drop counters");
    }
}

/// `frame` with `edit` applied to its bytes.
fn edited(frame: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut f = frame.to_vec();
    edit(&mut f);
    f
}

/// Sets the big-endian u16 at `at`.
fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn get16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn get32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

/// The bond header of a wrapped frame, at `at` (unchecked).
fn bond_at(f: &[u8], at: usize) -> bond_common::wire::BondHdr {
    use bond_common::wire::BondHdr;
    BondHdr::from_bytes(f[at..at + BondHdr::LEN].try_into().unwrap())
}

/// The bond header of a wrapped IPv4 frame ([`BOND`]).
fn bond_of(f: &[u8]) -> bond_common::wire::BondHdr {
    bond_at(f, BOND)
}

/// Adds `by` to the outer IPv4 total length and UDP length of a wrapped
/// frame, after a test grew what it carries.
fn grow_outer(f: &mut [u8], by: u16) {
    let ip = get16(f, OUTER_IP + 2) + by;
    set_total_len(&mut f[OUTER_IP..], ip);
    let udp = get16(f, OUTER_UDP + 4) + by;
    put16(f, OUTER_UDP + 4, udp);
}

/// A wrapped frame (outer IPv4) as a link over IPv6 carries it: the
/// outer header IPv6 from `src` to `dst` with hop limit `hop`, the UDP
/// checksum zero (RFC 6935), the rest as it was (bytes past the outer
/// IPv4 total length too, which the payload length does not count).
fn over_ipv6(frame: &[u8], src: Ipv6Addr, dst: Ipv6Addr, hop: u8) -> Vec<u8> {
    let plen = get16(frame, OUTER_IP + 2) - 20;
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&plen.to_be_bytes());
    f.extend_from_slice(&[17, hop]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&frame[OUTER_UDP..]);
    f[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
    f
}

/// `w`'s frame as an L3 device carries it: from its IPv4 header.
fn l3(w: &term::Wrapped) -> Vec<u8> {
    w.frame()[OUTER_IP..].to_vec()
}
