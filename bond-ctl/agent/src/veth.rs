//! Veth ends under XDP, and what their other ends must do.
//!
//! A veth end's stack hands frames on with their checksums left to the
//! hardware (`CHECKSUM_PARTIAL`: tx checksum offload, on by default); a
//! frame bond's XDP rewrites or redirects loses that mark and goes on with
//! a checksum never finished, so TCP through bond stalls while ping works.
//! And a frame XDP redirects into a veth is dropped unless the other end
//! runs XDP itself or has GRO on. Real NICs need neither: this is what a
//! container's interface, or a lab's, needs.
//!
//! Before XDP goes on a veth, the agent finds the other end, in this
//! network namespace or in another one (found by the id this namespace
//! knows it by, among `/run/netns` and the processes' namespaces), and
//! sets it `tx off gro on`. If it cannot reach it (a container's agent
//! cannot see the host), it refuses to start, naming the command to run
//! where the other end is; `[attach] veth = "trust"` then says it was run.

use std::{collections::HashSet, fs::File, net::UdpSocket, os::unix::fs::MetadataExt as _};

use anyhow::{Context as _, Result, bail};

use crate::net::{Net, VethPeer, ethtool};

/// What was found of a veth's other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Other {
    /// The interface is not a veth.
    NotVeth,
    /// Reached: its name, and what it needs (or needed, if set).
    Reached {
        name: String,
        needs: Vec<&'static str>,
    },
    /// In a namespace this agent cannot reach.
    Unreachable(VethPeer),
}

impl Other {
    /// What to tell the operator about `iface`'s other end, if anything:
    /// `set` says whether the agent set it.
    pub fn report(&self, iface: &str, set: bool) -> Option<String> {
        match self {
            Self::NotVeth => None,
            Self::Reached { needs, .. } if needs.is_empty() => None,
            Self::Reached { name, needs } => Some(format!(
                "{iface} is a veth whose other end {name} {} `{}` (frames it hands on \
                 with unfinished checksums, or will not take from XDP, break TCP through bond)",
                if set { "was set" } else { "needs" },
                needs.join(" ")
            )),
            Self::Unreachable(p) => Some(unreachable(iface, p)),
        }
    }
}

/// Why an agent will not start on `iface`, and what to run.
fn unreachable(iface: &str, p: &VethPeer) -> String {
    format!(
        "{iface} is a veth whose other end (interface {} in another network namespace, \
         id {}) this agent cannot reach to check: unless that end hands frames on with \
         finished checksums and takes frames from XDP, TCP through bond stalls. Run \
         `ethtool -K IFACE tx off gro on` where it is (IFACE: the interface with index {} \
         there, `ip -o link | grep '^{}:'`), then set `veth = \"trust\"` under [attach]",
        p.ifindex,
        p.netnsid.map_or("?".into(), |n| n.to_string()),
        p.ifindex,
        p.ifindex
    )
}

/// Finds `iface`'s other end, if it is a veth, and (with `set`) sets it
/// `tx off gro on` where it needs it.
pub async fn other_end(net: &Net, iface: &str, set: bool) -> Result<Other> {
    let Some(peer) = net.veth_peer(iface).await? else {
        return Ok(Other::NotVeth);
    };
    let ns = match peer.netnsid {
        None => None,
        Some(id) => match namespace(net, id).await? {
            Some(ns) => Some(ns),
            None => return Ok(Other::Unreachable(peer)),
        },
    };
    let ifindex = peer.ifindex;
    let reached = std::thread::spawn(move || -> Result<(String, Vec<&'static str>)> {
        if let Some(ns) = &ns {
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .context("entering the other end's namespace")?;
        }
        offloads(ifindex, set)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("checking {iface}'s other end: the thread panicked"))?;
    match reached {
        Ok((name, needs)) => Ok(Other::Reached { name, needs }),
        Err(e) if !set => Err(e),
        Err(e) => Err(e.context(unreachable(iface, &peer))),
    }
}

/// In the other end's namespace: its name, what it needs of `tx off gro
/// on`, and (with `set`) sets it.
fn offloads(ifindex: u32, set: bool) -> Result<(String, Vec<&'static str>)> {
    let name = nix::net::if_::if_indextoname(ifindex)
        .with_context(|| format!("no interface {ifindex}"))?
        .to_string_lossy()
        .into_owned();
    let sock = UdpSocket::bind("0.0.0.0:0").context("a socket for ethtool")?;
    let mut needs = Vec::new();
    if ethtool::value(&sock, &name, ethtool::GTXCSUM, 0)? != 0 {
        needs.push("tx off");
        if set {
            ethtool::value(&sock, &name, ethtool::STXCSUM, 0)?;
        }
    }
    if ethtool::value(&sock, &name, ethtool::GGRO, 0)? == 0 {
        needs.push("gro on");
        if set {
            ethtool::value(&sock, &name, ethtool::SGRO, 1)?;
        }
    }
    Ok((name, needs))
}

/// The network namespace this one knows by `id`, open, if this agent can
/// find it: among `/run/netns` (`ip netns`) and every process's.
async fn namespace(net: &Net, id: i32) -> Result<Option<File>> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .map(|e| e.path().join("ns/net"));
    let mut seen = HashSet::new();
    for path in named.chain(processes) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(ns) = File::open(&path) else {
            continue;
        };
        if net.nsid_of(&ns).await? == Some(id) {
            return Ok(Some(ns));
        }
    }
    Ok(None)
}

/// Readies `iface`'s other end before XDP goes on it, as `[attach] veth`
/// says: logs what was set, fails naming the command when it cannot be
/// reached.
pub async fn ready(net: &Net, iface: &str, how: bond_config::VethAttach) -> Result<()> {
    if how == bond_config::VethAttach::Trust {
        return Ok(());
    }
    let other = other_end(net, iface, true).await?;
    if let Other::Unreachable(p) = &other {
        bail!("{}", unreachable(iface, p));
    }
    if let Some(r) = other.report(iface, true) {
        tracing::warn!("{r}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_name_the_other_end_and_the_command() {
        assert_eq!(Other::NotVeth.report("eth0", true), None);
        let fine = Other::Reached {
            name: "veth7".into(),
            needs: vec![],
        };
        assert_eq!(fine.report("eth0", true), None);
        let set = Other::Reached {
            name: "veth7".into(),
            needs: vec!["tx off", "gro on"],
        };
        let r = set.report("eth0", true).unwrap();
        assert!(
            r.contains("eth0") && r.contains("veth7 was set `tx off gro on`"),
            "{r}"
        );
        let r = set.report("eth0", false).unwrap();
        assert!(r.contains("veth7 needs `tx off gro on`"), "{r}");
        let far = Other::Unreachable(VethPeer {
            ifindex: 7,
            netnsid: Some(3),
        });
        let r = far.report("eth0", false).unwrap();
        for want in [
            "eth0",
            "interface 7",
            "id 3",
            "ethtool -K IFACE tx off gro on",
            "'^7:'",
            "veth = \"trust\"",
        ] {
            assert!(r.contains(want), "{want:?} not in {r}");
        }
    }
}
