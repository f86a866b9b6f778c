//! Drop reasons: indices into the programs' per-CPU drop counters. Every
//! packet a program drops is counted under exactly one of these.

macro_rules! reasons {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal;)*) => {
        $($(#[$doc])* pub const $name: u32 = $idx;)*
        /// Number of reasons (the size of the drop-counter array).
        pub const COUNT: u32 = [$($idx),*].len() as u32;
        /// Stable names, as shown by `bond-ctl` and in metrics.
        pub const NAMES: [&str; COUNT as usize] = [$($label),*];
        // Indices must be dense and in order: they index a BPF array.
        const _: () = {
            let v = [$($idx),*];
            let mut i = 0;
            while i < v.len() {
                assert!(v[i] == i as u32);
                i += 1;
            }
        };
    };
}

reasons! {
    /// A header ended before the packet said it would.
    TRUNCATED = 0, "truncated";
    BAD_MAGIC = 1, "bad_magic";
    BAD_VERSION = 2, "bad_version";
    /// A control message with the sequence byte (DATA's only) set.
    BAD_FLAGS = 3, "bad_flags";
    /// A DATA kind arriving where it has no meaning (DATA_UP at an origin).
    BAD_KIND = 4, "bad_kind";
    WRONG_COMMUNITY = 5, "wrong_community";
    /// Outer source is not a registered link of the community (server), or
    /// DATA_DOWN to relay is not from the server (relay).
    UNKNOWN_SOURCE = 6, "unknown_source";
    BAD_TOKEN = 7, "bad_token";
    /// Inner packet is not IPv4.
    INNER_NOT_IPV4 = 8, "inner_not_ipv4";
    /// Inner IPv4 header has options, or a length that lies.
    INNER_BAD_HEADER = 9, "inner_bad_header";
    INNER_FRAGMENT = 10, "inner_fragment";
    /// Not TCP, UDP or ICMP echo.
    UNSUPPORTED_PROTO = 11, "unsupported_proto";
    /// Inner source differs from the bond header's origin.
    INNER_SPOOF = 12, "inner_spoof";
    NO_FREE_PORT = 13, "no_free_port";
    FLOW_TABLE_FULL = 14, "flow_table_full";
    /// A reply to a dedicated port that maps to no flow.
    NO_FLOW = 15, "no_flow";
    /// The schedule is empty: no link to send on.
    NO_LINKS = 16, "no_links";
    /// The schedule names a link that has no entry.
    LINK_MISSING = 17, "link_missing";
    NO_ROUTE = 18, "no_route";
    /// The next hop's MAC address is not known yet.
    NO_NEIGHBOR = 19, "no_neighbor";
    TTL_EXCEEDED = 20, "ttl_exceeded";
    /// A GSO superpacket reached the wrap (bond0 must run with GSO off).
    GSO = 21, "gso";
    /// A kernel helper (adjust head/room, store) failed.
    HELPER_FAILED = 22, "helper_failed";
    /// DATA_DOWN for another origin arrived on the data port.
    WRONG_ORIGIN = 23, "wrong_origin";
    /// Outer IPv4 header has options or is a fragment.
    OUTER_BAD_HEADER = 24, "outer_bad_header";
    /// A non-IPv4 frame routed into bond0.
    NOT_IPV4 = 25, "not_ipv4";
    /// Packet plus wrap exceeds the link MTU.
    TOO_BIG = 26, "too_big";
    /// A new flow from an origin that holds its `per_origin` limit.
    ORIGIN_FLOW_LIMIT = 27, "origin_flow_limit";
    /// Every link's queue is as long as its buffer: the sender drops
    /// rather than deliver the packet after later ones (`edpf`).
    LINKS_FULL = 28, "links_full";
    /// A new flow from an origin the table of flows per origin has no room
    /// to count (`[flows]` sized for fewer terminals than made flows).
    ORIGIN_TABLE_FULL = 29, "origin_table_full";
    /// A reply to a flow's dedicated port from a remote endpoint the
    /// origin never sent to on that flow (address-and-port-dependent
    /// filtering, RFC 4787): a port sweep, or a stranger's injection.
    FILTERED = 30, "filtered";
    /// A member's packet to a destination the server's `deny` policy
    /// names (by default its own addresses and internal networks).
    DENIED = 31, "denied";
    /// At a director: bond traffic of a community no live node owns; at
    /// a node: of a community its table gives to a node it cannot reach.
    NO_OWNER = 32, "no_owner";
    /// At a node: bond traffic another node passed on for a community
    /// this node's table gives to a third (their views of the registry
    /// disagree for a moment): dropped, never passed on twice.
    OWNER_DISAGREES = 33, "owner_disagrees";
}

#[cfg(test)]
mod tests {
    #[test]
    fn indices_are_dense_and_names_unique() {
        assert_eq!(super::NAMES.len() as u32, super::COUNT);
        let mut names = super::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len() as u32, super::COUNT);
        assert_eq!(super::NAMES[super::TOO_BIG as usize], "too_big");
        assert_eq!(super::NAMES[super::TRUNCATED as usize], "truncated");
    }
}
