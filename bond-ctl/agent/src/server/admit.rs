//! Which terminals the server takes, and which of their messages.
//!
//! A community may take only the terminals it knows by key (`terminals`
//! in the server's file, or `terminal_keys` in the tier's registry). Then
//! a message that makes or changes a session (LOGIN, ANNOUNCE, SHUTDOWN)
//! counts only if the terminal its origin names signed it with the key
//! authorised for that origin; every other message only with the token of
//! that origin's session. Both are checked before the replay window counts
//! the message, so a member holding only the community key can neither act
//! as another terminal nor push another's counter ahead to have its real
//! messages refused. A community without that list takes any member that
//! signs with the community key, as before.
//!
//! When the list changes, the sessions of terminals taken out or given a
//! new key end at once ([`Identities::revoked`]).

use std::{collections::BTreeMap, net::Ipv4Addr};

use bond_proto::{
    control::{Body, Msg, flags},
    identity::PublicKey,
    session::SessionKey,
};

/// The terminals each community takes by key; a community not listed
/// takes any member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identities(BTreeMap<u32, BTreeMap<Ipv4Addr, PublicKey>>);

/// What a community says of one terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    /// The community takes any member.
    Open,
    /// Only with this key's signature.
    Key(PublicKey),
    /// Not one of its terminals.
    Denied,
}

/// Why a message was not admitted (the names count as rejects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its origin is not among the community's terminals.
    UnknownTerminal,
    /// Not signed by its origin's key.
    BadIdentity,
    /// An unsigned message from an origin with no session.
    NoSession,
    /// An unsigned message with another token than its origin's session.
    WrongToken,
    /// A message of a keyed session without the session key's MAC.
    BadSession,
}

impl Refused {
    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownTerminal => "unknown_terminal",
            Self::BadIdentity => "bad_identity",
            Self::NoSession => "no_session",
            Self::WrongToken => "wrong_token",
            Self::BadSession => "bad_session_mac",
        }
    }
}

impl Identities {
    /// From each community's list, if it has one.
    pub fn new(lists: impl IntoIterator<Item = (u32, BTreeMap<Ipv4Addr, PublicKey>)>) -> Self {
        Self(lists.into_iter().collect())
    }

    /// As the server's file lists them (`terminals` of each community).
    pub fn from_config(cfg: &bond_config::ServerConfig) -> Self {
        Self::new(
            cfg.communities
                .iter()
                .filter_map(|c| Some((c.id, c.terminals.clone()?))),
        )
    }

    /// As the tier's registry lists them, for the communities served.
    pub fn from_registry<'a>(
        view: &bond_tier::layout::View,
        served: impl IntoIterator<Item = &'a u32>,
    ) -> Self {
        Self::new(
            served
                .into_iter()
                .filter_map(|&c| Some((c, view.terminal_keys(c)?))),
        )
    }

    pub fn auth(&self, community: u32, origin: Ipv4Addr) -> Auth {
        match self.0.get(&community) {
            None => Auth::Open,
            Some(list) => list.get(&origin).map_or(Auth::Denied, |k| Auth::Key(*k)),
        }
    }

    /// Whether `msg` (decoded from `buf`, its community key checked) may
    /// count, given the token of its origin's session and its key, if
    /// any, and whether it is an announce that would change nothing but
    /// the session's liveness (`repeats`, asked only for an announce with
    /// the session's token: such one needs no signature check, as an echo
    /// needs none; the check costs more than all else a node does per
    /// announce). What rides on a keyed session's token needs its MAC too.
    pub fn admit(
        &self,
        msg: &Msg,
        buf: &[u8],
        session: Option<(u64, Option<&SessionKey>)>,
        repeats: impl FnOnce() -> bool,
    ) -> Result<(), Refused> {
        let auth = self.auth(msg.community, msg.origin);
        if auth == Auth::Open {
            return Ok(());
        }
        let keyed = |key: Option<&SessionKey>| match key {
            Some(k) if !Msg::session_ok(buf, k) => Err(Refused::BadSession),
            _ => Ok(()),
        };
        let token = session.map(|(t, _)| t);
        // Without the session's MAC (a terminal whose agent restarted holds
        // no key yet), its signature decides, below.
        if let Body::Announce { .. } = msg.body
            && matches!(auth, Auth::Key(_))
            && token == Some(msg.token)
            && msg.flags & flags::RESTARTING == 0
            && keyed(session.and_then(|(_, k)| k)).is_ok()
            && repeats()
        {
            return Ok(());
        }
        if msg.body.changes_session() {
            return match auth {
                Auth::Key(key) if Msg::signed_by(buf, &key) => Ok(()),
                Auth::Key(_) => Err(Refused::BadIdentity),
                _ => Err(Refused::UnknownTerminal),
            };
        }
        match session {
            Some((token, key)) if token == msg.token => keyed(key),
            Some(_) => Err(Refused::WrongToken),
            None => Err(Refused::NoSession),
        }
    }

    /// Of `sessions`, those that must end when `next` replaces this: their
    /// terminal was taken out, or given another key, or its community
    /// takes terminals by key from now on (it logs on again, signed).
    pub fn revoked(
        &self,
        next: &Self,
        sessions: impl IntoIterator<Item = (u32, Ipv4Addr)>,
    ) -> Vec<(u32, Ipv4Addr)> {
        sessions
            .into_iter()
            .filter(|&(c, o)| match next.auth(c, o) {
                Auth::Open => false,
                Auth::Denied => true,
                Auth::Key(k) => self.auth(c, o) != Auth::Key(k),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use bond_proto::{CommunityKey, identity::Identity};

    use super::*;

    const T1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    const T2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);

    fn msg(origin: Ipv4Addr, body: Body, token: u64) -> Msg {
        Msg {
            community: 1,
            origin,
            link: 1,
            flags: flags::VIA_LINK,
            token,
            time_ms: 1,
            counter: 1,
            body,
        }
    }

    /// A stolen terminal (its secret key and the community key) can do
    /// nothing as another terminal: not log on, not announce, not shut
    /// it down, not ride its session without its token.
    #[test]
    fn only_a_terminals_own_key_makes_or_changes_its_session() {
        let key = CommunityKey::new("community one key");
        let (k1, k2) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        let ids = Identities::new([(1, BTreeMap::from([(T1, k1.public()), (T2, k2.public())]))]);
        let announce = Body::Announce {
            interval_ms: 1000,
            links: vec![],
        };
        for body in [
            Body::Login { exchange: None },
            announce.clone(),
            Body::Shutdown,
        ] {
            let own = msg(T1, body.clone(), 5).encode_as(&key, Some(&k1));
            let m = Msg::decode(&own, |_| Some(&key)).unwrap();
            assert_eq!(ids.admit(&m, &own, None, || false), Ok(()), "{body:?}");
            let as_t2 = msg(T2, body.clone(), 5).encode_as(&key, Some(&k1));
            let m = Msg::decode(&as_t2, |_| Some(&key)).unwrap();
            assert_eq!(
                ids.admit(&m, &as_t2, Some((5, None)), || false),
                Err(Refused::BadIdentity)
            );
            let unsigned = msg(T1, body.clone(), 5).encode(&key);
            let m = Msg::decode(&unsigned, |_| Some(&key)).unwrap();
            assert_eq!(
                ids.admit(&m, &unsigned, Some((5, None)), || false),
                Err(Refused::BadIdentity)
            );
            let stranger = msg(Ipv4Addr::new(10, 0, 1, 9), body, 0).encode_as(&key, Some(&k1));
            let m = Msg::decode(&stranger, |_| Some(&key)).unwrap();
            assert_eq!(
                ids.admit(&m, &stranger, None, || false),
                Err(Refused::UnknownTerminal)
            );
        }
        // The rest rides on the session's token, checked before any
        // window counts it.
        let echo = msg(T2, Body::Echo { sent_ns: 1 }, 9).encode(&key);
        let m = Msg::decode(&echo, |_| Some(&key)).unwrap();
        assert_eq!(ids.admit(&m, &echo, Some((9, None)), || false), Ok(()));
        assert_eq!(
            ids.admit(&m, &echo, Some((8, None)), || false),
            Err(Refused::WrongToken)
        );
        assert_eq!(
            ids.admit(&m, &echo, None, || false),
            Err(Refused::NoSession)
        );
        // An announce that changes nothing (its session's token, the
        // same links) needs no signature, as an echo needs none; one that
        // changes something, or says its agent restarts, does.
        let repeat = msg(T2, announce.clone(), 9).encode(&key);
        let m = Msg::decode(&repeat, |_| Some(&key)).unwrap();
        assert_eq!(ids.admit(&m, &repeat, Some((9, None)), || true), Ok(()));
        assert_eq!(
            ids.admit(&m, &repeat, Some((9, None)), || false),
            Err(Refused::BadIdentity)
        );
        assert_eq!(
            ids.admit(&m, &repeat, Some((8, None)), || true),
            Err(Refused::BadIdentity)
        );
        let restarting = Msg {
            flags: flags::VIA_LINK | flags::RESTARTING,
            ..msg(T2, announce, 9)
        }
        .encode(&key);
        let m = Msg::decode(&restarting, |_| Some(&key)).unwrap();
        assert_eq!(
            ids.admit(&m, &restarting, Some((9, None)), || true),
            Err(Refused::BadIdentity)
        );
        // A community without a list takes any member, signed or not.
        let other = Msg {
            community: 2,
            ..msg(T2, Body::Login { exchange: None }, 0)
        };
        let b = other.encode(&key);
        assert_eq!(ids.admit(&other, &b, None, || false), Ok(()));
        assert_eq!(ids.auth(2, T2), Auth::Open);
    }

    /// A keyed session: what rides on its token (an echo, an unchanged
    /// announce) counts only with the session key's MAC. A member that
    /// holds the community key and the token (it rides in every data
    /// header a peer relays) but not the key is refused; signed messages
    /// stand on their signature as before.
    #[test]
    fn a_keyed_session_takes_only_what_carries_its_mac() {
        use bond_proto::session::{Exchange, Transcript};
        let key = CommunityKey::new("community one key");
        let k2 = Identity::generate().unwrap();
        let ids = Identities::new([(1, BTreeMap::from([(T2, k2.public())]))]);
        let (t, s) = (Exchange::generate().unwrap(), Exchange::generate().unwrap());
        let tr = Transcript {
            community: 1,
            origin: T2,
            token: 9,
            terminal: t.public(),
            server: s.public(),
        };
        let sk = s.key(&t.public(), &tr).unwrap();
        let stolen = Exchange::generate().unwrap().key(&s.public(), &tr).unwrap();
        let session = Some((9, Some(&sk)));
        let echo = msg(T2, Body::Echo { sent_ns: 1 }, 9);
        let m = echo.clone();
        let with = echo.encode_with(&key, None, Some(&sk));
        assert_eq!(ids.admit(&m, &with, session, || false), Ok(()));
        let without = echo.encode(&key);
        assert_eq!(
            ids.admit(&m, &without, session, || false),
            Err(Refused::BadSession)
        );
        let other = echo.encode_with(&key, None, Some(&stolen));
        assert_eq!(
            ids.admit(&m, &other, session, || false),
            Err(Refused::BadSession)
        );
        // An unchanged announce: its MAC, not a signature.
        let announce = msg(
            T2,
            Body::Announce {
                interval_ms: 1000,
                links: vec![],
            },
            9,
        );
        let b = announce.encode(&key);
        assert_eq!(
            ids.admit(&announce, &b, session, || true),
            Err(Refused::BadIdentity)
        );
        let b = announce.encode_with(&key, None, Some(&sk));
        assert_eq!(ids.admit(&announce, &b, session, || true), Ok(()));
        // Signed, it stands on its signature: one that changes the
        // session, and an unchanged one without the MAC (its agent
        // restarted and has no key yet).
        let b = announce.encode_as(&key, Some(&k2));
        assert_eq!(ids.admit(&announce, &b, session, || false), Ok(()));
        assert_eq!(ids.admit(&announce, &b, session, || true), Ok(()));
    }

    #[test]
    fn sessions_end_when_their_terminal_is_taken_out_or_rekeyed() {
        let (k1, k2, k3) = (
            Identity::generate().unwrap().public(),
            Identity::generate().unwrap().public(),
            Identity::generate().unwrap().public(),
        );
        let t3 = Ipv4Addr::new(10, 0, 1, 3);
        let before = Identities::new([(1, BTreeMap::from([(T1, k1), (T2, k2), (t3, k3)]))]);
        let after = Identities::new([(1, BTreeMap::from([(T1, k1), (t3, k2)]))]);
        let sessions = [(1, T1), (1, T2), (1, t3), (2, T1)];
        assert_eq!(before.revoked(&after, sessions), vec![(1, T2), (1, t3)]);
        // A community that starts taking terminals by key ends every
        // session made without one (those it lists log on again, signed);
        // one that stops ends none.
        let open = Identities::default();
        assert_eq!(
            open.revoked(&after, sessions),
            vec![(1, T1), (1, T2), (1, t3)]
        );
        assert!(after.revoked(&open, sessions).is_empty());
        assert!(
            after
                .revoked(&after, [(1, T1), (1, t3), (2, T1)])
                .is_empty()
        );
        // An empty list takes no one.
        let nobody = Identities::new([(1, BTreeMap::new())]);
        assert_eq!(nobody.auth(1, T1), Auth::Denied);
        assert_eq!(after.revoked(&nobody, sessions).len(), 3);
    }
}
