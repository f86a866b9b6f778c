//! Lab links that look like real uplinks, and the named profiles that the
//! demo, the tests and the benchmarks share.
//!
//! | profile | links |
//! |---|---|
//! | `equal` | 3 x 20 Mbit/s, no delay (the ideal lab) |
//! | `mixed` | 10, 20, 40 Mbit/s at 5, 20, 40 ms one way (DSL, cable, LTE) |
//! | `lte` | 20 Mbit/s 10 ms, 30 Mbit/s 20 ms, and an LTE link of 40 Mbit/s at 40 ms ±10 ms correlated jitter, 0.1% loss, its rate stepping between 20 and 40 every 3 s |
//! | `sat` | 10 Mbit/s 10 ms, 20 Mbit/s 20 ms, and a satellite link of 30 Mbit/s at 300 ms |
//! | `flap` | 3 x 20 Mbit/s at 10 ms, link 1 black-holed (carrier up) 3 s to 8 s after the events start |

use std::{
    io::Write as _,
    process::ChildStdin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::line::Impair;
use bond_agent::worker::Worker;

/// One WAN link of a lab community.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// Rate in Mbit/s, both directions (`tbf` at the modem; 0: unlimited).
    pub rate_mbit: u32,
    /// Delay, jitter and loss (a delay line when any is set, or `dark` is).
    pub impair: Impair,
    /// The rate alternates between `rate_mbit` and this every `.1`.
    pub steps: Option<(u32, Duration)>,
    /// Black-holed from `.0` until `.0 + .1` after the events start.
    pub dark: Option<(Duration, Duration)>,
    /// The terminal's side is an L3 device (no Ethernet header: a TUN
    /// device, as PPP or a raw-IP modem are), not a veth.
    pub l3: bool,
    /// The link has only IPv6 (as many LTE uplinks): the terminal reaches
    /// the server's IPv6 address over it.
    pub v6: bool,
}

impl LinkSpec {
    /// A plain `tbf` link: no delay line.
    pub const fn rate(rate_mbit: u32) -> Self {
        Self {
            rate_mbit,
            impair: Impair {
                delay: Duration::ZERO,
                jitter: Duration::ZERO,
                loss: 0.0,
            },
            steps: None,
            dark: None,
            l3: false,
            v6: false,
        }
    }

    /// The same link with only IPv6 on it.
    pub const fn over_ipv6(mut self) -> Self {
        self.v6 = true;
        self
    }

    /// The same link on an L3 device.
    pub const fn on_l3(mut self) -> Self {
        self.l3 = true;
        self
    }

    pub const fn delayed(rate_mbit: u32, delay_ms: u64) -> Self {
        let mut l = Self::rate(rate_mbit);
        l.impair = Impair::delay_ms(delay_ms);
        l
    }

    /// Whether the link needs a delay line (anything `tbf` cannot do).
    pub fn needs_line(&self) -> bool {
        self.impair != Impair::default() || self.dark.is_some()
    }

    /// The link's average rate over a run (what "the summed rates" sums).
    pub fn mean_mbit(&self) -> f64 {
        match self.steps {
            Some((low, _)) => f64::from(self.rate_mbit + low) / 2.0,
            None => f64::from(self.rate_mbit),
        }
    }
}

/// A named set of links.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub links: Vec<LinkSpec>,
}

/// Every profile's name, in the order reports list them.
pub const PROFILES: [&str; 5] = ["equal", "mixed", "lte", "sat", "flap"];

impl Profile {
    pub fn named(name: &str) -> Result<Self> {
        let ms = Duration::from_millis;
        let links = match name {
            "equal" => vec![LinkSpec::rate(20); 3],
            "mixed" => vec![
                LinkSpec::delayed(10, 5),
                LinkSpec::delayed(20, 20),
                LinkSpec::delayed(40, 40),
            ],
            "lte" => vec![
                LinkSpec::delayed(20, 10),
                LinkSpec::delayed(30, 20),
                LinkSpec {
                    impair: Impair {
                        delay: ms(40),
                        jitter: ms(10),
                        loss: 0.001,
                    },
                    steps: Some((20, ms(3000))),
                    ..LinkSpec::rate(40)
                },
            ],
            "sat" => vec![
                LinkSpec::delayed(10, 10),
                LinkSpec::delayed(20, 20),
                LinkSpec::delayed(30, 300),
            ],
            "flap" => {
                let mut l = vec![LinkSpec::delayed(20, 10); 3];
                l[0].dark = Some((ms(3000), ms(5000)));
                l
            }
            _ => bail!(
                "no lab profile {name:?} (profiles: {})",
                PROFILES.join(", ")
            ),
        };
        Ok(Self {
            name: PROFILES.into_iter().find(|p| *p == name).unwrap_or("?"),
            links,
        })
    }

    /// The summed mean rates of the links, Mbit/s.
    pub fn sum_mbit(&self) -> f64 {
        self.links.iter().map(LinkSpec::mean_mbit).sum()
    }
}

/// A link's delay line process: commands go to its stdin.
pub(super) type LineControl = Arc<Mutex<ChildStdin>>;

pub(super) fn command(line: &LineControl, cmd: &str) -> Result<()> {
    let mut w = line.lock().unwrap_or_else(|e| e.into_inner());
    writeln!(w, "{cmd}")?;
    w.flush()?;
    Ok(())
}

/// One link's scripted changes, as the events thread plays them.
pub(super) struct Script {
    pub spec: LinkSpec,
    pub modem_ns: String,
    pub line: Option<LineControl>,
}

/// Plays every link's rate steps and dark windows until stopped.
pub(super) struct Events {
    _worker: Worker,
}

impl Events {
    pub fn start(scripts: Vec<Script>) -> Self {
        // As std::thread::spawn: a thread that cannot start is a panic.
        let w = Worker::spawn("link events", move |stop| play(&scripts, stop));
        Self {
            _worker: w.expect("starting the link events thread"),
        }
    }
}

fn play(scripts: &[Script], stop: &AtomicBool) {
    let start = Instant::now();
    let mut rate = vec![None::<u32>; scripts.len()];
    // Unknown at first: an earlier run may have been stopped in its dark
    // window, so every line with a window is told its state at once.
    let mut dark = vec![true; scripts.len()];
    while !stop.load(Ordering::Relaxed) {
        let t = start.elapsed();
        for (i, s) in scripts.iter().enumerate() {
            if let Some((low, period)) = s.spec.steps {
                let phase = (t.as_nanos() / period.as_nanos().max(1)) % 2;
                let want = if phase == 0 { s.spec.rate_mbit } else { low };
                if rate[i] != Some(want) {
                    rate[i] = Some(want);
                    for dev in ["acc", "uplink"] {
                        if let Err(e) = super::set_tbf(&s.modem_ns, dev, want) {
                            eprintln!("lab: rate step on {}: {e:#}", s.modem_ns);
                        }
                    }
                }
            }
            if let (Some((from, len)), Some(line)) = (s.spec.dark, &s.line) {
                let want = t >= from && t < from + len;
                if dark[i] != want {
                    dark[i] = want;
                    let _ = command(line, if want { "dark" } else { "light" });
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Stopped: no link stays dark behind the script's back.
    for (s, _) in scripts.iter().zip(&dark).filter(|(_, d)| **d) {
        if let (Some(_), Some(line)) = (s.spec.dark, &s.line) {
            let _ = command(line, "light");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_defined_and_unknown_ones_are_named() {
        for p in PROFILES {
            let prof = Profile::named(p).unwrap();
            assert_eq!(prof.name, p);
            assert_eq!(prof.links.len(), 3);
        }
        let e = Profile::named("moon").unwrap_err().to_string();
        assert!(e.contains("moon") && e.contains("mixed"), "{e}");
    }

    #[test]
    fn profiles_say_what_the_issue_asks() {
        let mixed = Profile::named("mixed").unwrap();
        let r: Vec<u32> = mixed.links.iter().map(|l| l.rate_mbit).collect();
        let d: Vec<u128> = mixed
            .links
            .iter()
            .map(|l| l.impair.delay.as_millis())
            .collect();
        assert_eq!((r, d), (vec![10, 20, 40], vec![5, 20, 40]));
        assert_eq!(mixed.sum_mbit(), 70.0);
        let lte = Profile::named("lte").unwrap();
        assert!(
            lte.links
                .iter()
                .any(|l| l.steps.is_some() && l.impair.loss > 0.0)
        );
        assert_eq!(
            lte.sum_mbit(),
            20.0 + 30.0 + 30.0,
            "the stepping link counts at its mean"
        );
        let equal = Profile::named("equal").unwrap();
        assert!(equal.links.iter().all(|l| !l.needs_line()));
        let flap = Profile::named("flap").unwrap();
        assert!(flap.links[0].needs_line() && flap.links[0].dark.is_some());
    }
}
