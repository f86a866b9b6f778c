//! `[attach]`: how the programs go on their interfaces (both roles).

use super::*;

/// `[attach]`: how the programs are attached to their interfaces. The
/// defaults choose what the kernel and driver offer; the others force a
/// way, for a kernel or driver that misreports what it has, or to run the
/// fallbacks on a kernel that would not need them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachConfig {
    #[serde(default)]
    pub tc: TcAttach,
    #[serde(default)]
    pub xdp: XdpAttach,
    #[serde(default)]
    pub veth: VethAttach,
}

/// What the agent does about a veth it attaches XDP to (a container's or
/// a lab's interface): its other end must hand frames on with finished
/// checksums and take the frames XDP sends it (`crate::veth`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VethAttach {
    /// Find the other end and set it so (`tx off`, `gro on`); refuse to
    /// start if it cannot be reached, saying what to run there.
    #[default]
    Auto,
    /// The operator has set the other end: nothing is checked.
    Trust,
}

/// How the TC program goes on the capture device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcAttach {
    /// TCX where the kernel has it (6.6 and later), else netlink.
    #[default]
    Auto,
    /// A BPF link on the TCX hook (kernel 6.6 and later).
    Tcx,
    /// A `cls_bpf` filter on a `clsact` qdisc, through netlink (any kernel
    /// bond runs on).
    Netlink,
}

/// How the XDP programs go on their interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttach {
    /// In the driver where it has XDP, else generic.
    #[default]
    Auto,
    /// In the driver only: an interface whose driver has no XDP is refused.
    Native,
    /// Generic XDP (in the stack, after the socket buffer is built):
    /// slower, on any interface.
    Generic,
}
