//! Following the host's interfaces as they change: rtnetlink's link,
//! address and default route events (IPv4 and IPv6), reduced to what an
//! agent acts on. A
//! modem is unplugged and plugged back (the interface goes and comes with
//! a new index), a line loses its carrier, a DHCP lease renews with a new
//! address or next hop: the agent hears it at once, with no polling.

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::AddressMessage,
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAttribute, RouteMessage},
};
use rtnetlink::{
    packet_core::NetlinkPayload,
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc;

/// A change the agent may act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Interface `name` is there with `index`; `carrier`: it is up and has
    /// its carrier (IFF_UP and IFF_LOWER_UP).
    Link {
        name: String,
        index: u32,
        carrier: bool,
    },
    /// Interface `name` (`index`) was removed.
    Gone { name: String, index: u32 },
    /// An address came or went (or passed duplicate address detection)
    /// on interface `index`.
    Address { index: u32 },
    /// A default route came or went, out of interface `index`.
    DefaultRoute { index: u32 },
}

/// rtnetlink multicast groups (`RTMGRP_*`, the bit of group n is 1 << (n-1)).
const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_IFADDR: u32 = 1 << 4;
const RTMGRP_IPV4_ROUTE: u32 = 1 << 6;
const RTMGRP_IPV6_IFADDR: u32 = 1 << 8;
const RTMGRP_IPV6_ROUTE: u32 = 1 << 10;

/// Starts listening; changes arrive on the channel until it is dropped.
pub fn watch() -> Result<mpsc::UnboundedReceiver<Change>> {
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink for link events")?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            RTMGRP_LINK
                | RTMGRP_IPV4_IFADDR
                | RTMGRP_IPV4_ROUTE
                | RTMGRP_IPV6_IFADDR
                | RTMGRP_IPV6_ROUTE,
        ))
        .context("joining rtnetlink's link, address and route groups")?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            if let NetlinkPayload::InnerMessage(m) = msg.payload
                && let Some(c) = change(&m)
                && tx.send(c).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// What one rtnetlink message means for the agent, if anything.
pub fn change(m: &RouteNetlinkMessage) -> Option<Change> {
    match m {
        RouteNetlinkMessage::NewLink(l) => Some(Change::Link {
            name: name(l)?,
            index: l.header.index,
            carrier: l.header.flags.contains(LinkFlags::Up | LinkFlags::LowerUp),
        }),
        RouteNetlinkMessage::DelLink(l) => Some(Change::Gone {
            name: name(l)?,
            index: l.header.index,
        }),
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => address(a),
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => default_route(r),
        _ => None,
    }
}

fn name(l: &LinkMessage) -> Option<String> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// A default route's interface: the agent's own host routes to the
/// server, and every other route, change nothing it follows.
fn default_route(r: &RouteMessage) -> Option<Change> {
    let ip = matches!(
        r.header.address_family,
        AddressFamily::Inet | AddressFamily::Inet6
    );
    if !ip || r.header.destination_prefix_length != 0 {
        return None;
    }
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(Change::DefaultRoute { index: *index }),
        _ => None,
    })
}

fn address(a: &AddressMessage) -> Option<Change> {
    let ip = matches!(a.header.family, AddressFamily::Inet | AddressFamily::Inet6);
    ip.then_some(Change::Address {
        index: a.header.index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, flags: LinkFlags) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.header.flags = flags;
        l.attributes.push(LinkAttribute::IfName(name.into()));
        l
    }

    #[test]
    fn carrier_is_up_and_lower_up_together() {
        let up = LinkFlags::Up | LinkFlags::LowerUp | LinkFlags::Running;
        for (flags, carrier) in [
            (up, true),
            (LinkFlags::Up, false),      // no carrier
            (LinkFlags::LowerUp, false), // set down by hand
            (LinkFlags::empty(), false),
        ] {
            assert_eq!(
                change(&RouteNetlinkMessage::NewLink(link(7, "wwan0", flags))),
                Some(Change::Link {
                    name: "wwan0".into(),
                    index: 7,
                    carrier
                }),
                "{flags:?}"
            );
        }
    }

    #[test]
    fn removal_names_the_interface_and_a_nameless_one_is_ignored() {
        assert_eq!(
            change(&RouteNetlinkMessage::DelLink(link(
                9,
                "ppp0",
                LinkFlags::empty()
            ))),
            Some(Change::Gone {
                name: "ppp0".into(),
                index: 9
            })
        );
        let nameless = LinkMessage::default();
        assert_eq!(change(&RouteNetlinkMessage::NewLink(nameless)), None);
    }

    #[test]
    fn ip_addresses_of_either_family_count() {
        let mut a = AddressMessage::default();
        a.header.index = 4;
        a.header.family = AddressFamily::Inet;
        assert_eq!(
            change(&RouteNetlinkMessage::DelAddress(a.clone())),
            Some(Change::Address { index: 4 })
        );
        // (A link over IPv6 follows its address, and its passing DAD.)
        a.header.family = AddressFamily::Inet6;
        assert_eq!(
            change(&RouteNetlinkMessage::NewAddress(a.clone())),
            Some(Change::Address { index: 4 })
        );
        a.header.family = AddressFamily::Packet;
        assert_eq!(change(&RouteNetlinkMessage::NewAddress(a)), None);
    }

    #[test]
    fn only_default_routes_count() {
        let route = |len: u8, family: AddressFamily| {
            let mut r = RouteMessage::default();
            r.header.address_family = family;
            r.header.destination_prefix_length = len;
            r.attributes.push(RouteAttribute::Oif(5));
            RouteNetlinkMessage::NewRoute(r)
        };
        assert_eq!(
            change(&route(0, AddressFamily::Inet)),
            Some(Change::DefaultRoute { index: 5 })
        );
        // The agent's own host routes to the server.
        assert_eq!(change(&route(32, AddressFamily::Inet)), None);
        assert_eq!(change(&route(128, AddressFamily::Inet6)), None);
        assert_eq!(
            change(&route(0, AddressFamily::Inet6)),
            Some(Change::DefaultRoute { index: 5 })
        );
    }
}
