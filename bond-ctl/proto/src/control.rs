//! Control messages: ANNOUNCE, SHUTDOWN, LOGIN, LOGIN_REPLY, the
//! measurement messages PROBE, PROBE_REQUEST, PROBE_REPORT, ECHO,
//! ECHO_REPLY and FEEDBACK, and RESEND.
//!
//! They ride the same UDP ports as data, behind the same 28-byte bond
//! header (a control `kind`, which the XDP programs pass to the agent's
//! socket). After the header:
//!
//! ```text
//! time_ms  u64   sender's wall clock, Unix milliseconds (freshness)
//! counter  u64   per-sender, +1 per message, starts at the sender's start
//!                time in microseconds (replay window)
//! flags    u8    VIA_LINK: sent over the WAN link in the header's `link`
//!                RELAY:    a LAN peer is to pass it on to the server
//!                FROM_SERVER: sent by the server
//!                RESTARTING: the sender's agent restarts (ANNOUNCE)
//!                SIGNED:   a signature follows the body
//!                SESSION_LOST: the server just asked the sender to log on
//!                          again (ANNOUNCE to the LAN)
//!                SESSION:  the session key's MAC follows
//! body     ...   by kind, below
//! sig      64 B  with SIGNED only: an Ed25519 signature over everything
//!                before it: the sending terminal's (`identity`), or on
//!                a LOGIN_REPLY the server's site key
//! mac      16 B  with SESSION only: BLAKE3 keyed by the session's key
//!                over everything before it (`session`)
//! tag      16 B  HMAC-SHA256 over everything before it, with the
//!                community key, truncated
//! ```
//!
//! A terminal with an identity signs the messages that make or change its
//! session: LOGIN, ANNOUNCE and SHUTDOWN; the rest ride on the session's
//! token, and where the server has a site key, on the session's key too.
//!
//! Bodies: ANNOUNCE `interval_ms u32, n u8, n × (id u8, port u16, up u32,
//! down u32, mtu u16, rtt_us u32, state u8)` (state bit 0: dark); SHUTDOWN:
//! empty; LOGIN: empty, or the terminal's exchange key (32 B) for a session
//! key; LOGIN_REPLY `status u8, token u64, port u16`, then the server's
//! exchange key (32 B) if the LOGIN had one, then from a server with a site
//! key the tag of the message it answers (16 B: what binds the signed
//! reply to one request of one terminal) (status 0: logged
//! on, 1: log on again, 2: refused, this terminal is not authorised); PROBE
//! `train u32, seq u16, count u16, pad u16, pad × 0` (padded to a train's
//! packet size); PROBE_REQUEST `train u32, count u16`; PROBE_REPORT `train
//! u32, kbps u32`; ECHO and ECHO_REPLY `sent_ns u64` (the owner's clock);
//! FEEDBACK `n u8, n × (link u8, sent_us u32, queue_us u32), m u8, m ×
//! (link u8, k u8, k × kbps u32)` (the second list: what other origins
//! carried on each link, the agent's `share`); RESEND `n u8, n × (link u8,
//! after_us u32, before_us u32, first u8, count u8)` (packets `first`,
//! `first + 1`, ... of a link's sequence, sent between two it delivered,
//! the agent's `resend`). All numbers
//! are network byte order. The decoder checks the length of every part
//! before reading it and accepts nothing unsigned.

use std::{collections::HashMap, net::Ipv4Addr};

use bond_common::wire::{BondHdr, WireError, kind};

use crate::{
    CommunityKey,
    identity::{Identity, PublicKey, SIG_LEN},
    now_ms, now_us,
    session::{EXCHANGE_LEN, MAC_LEN, SessionKey},
};

pub const TAG_LEN: usize = 16;
/// Links one terminal may announce.
pub const MAX_LINKS: usize = 32;
const FIXED_LEN: usize = BondHdr::LEN + 8 + 8 + 1;
/// The largest message: a PROBE (an ANNOUNCE with [`MAX_LINKS`] links is
/// shorter).
pub const MAX_LEN: usize = PROBE_LEN;
/// Bytes of a PROBE, the packets of a measurement train: near a full
/// packet, so a train shows a link's rate, and the largest message.
pub const PROBE_LEN: usize = 1200;
/// Other senders a FEEDBACK reports per link.
pub const MAX_SHARERS: usize = 8;
const _: () =
    assert!(FIXED_LEN + 5 + MAX_LINKS * LINK_AD_LEN + SIG_LEN + MAC_LEN + TAG_LEN <= MAX_LEN);
const LINK_AD_LEN: usize = 18;

pub mod flags {
    /// Sent over the WAN link named in the header (the server learns the
    /// link's public address and port from the packet's source).
    pub const VIA_LINK: u8 = 1;
    /// For the server, handed to a LAN peer with a WAN link to pass on.
    pub const RELAY: u8 = 2;
    /// Sent by the server (its own counter, its own replay window).
    pub const FROM_SERVER: u8 = 4;
    /// On an ANNOUNCE: the sender's agent is restarting and its datapath
    /// runs on; its links' echoes stop for a moment
    /// (the agent's `pathmon::RESTART_GRACE`).
    pub const RESTARTING: u8 = 8;
    /// A signature follows the body: the sending terminal's
    /// ([`crate::identity`]), or on a LOGIN_REPLY the server's site key.
    pub const SIGNED: u8 = 16;
    /// On an ANNOUNCE to the LAN: the server has just asked the sender to
    /// log on again (it restarted, or an ISP tier moved the community to
    /// another node); its peers ask after their own sessions at once
    /// rather than at their next announce.
    pub const SESSION_LOST: u8 = 32;
    /// The session key's MAC follows ([`crate::session`]).
    pub const SESSION: u8 = 64;
    pub const ALL: u8 =
        VIA_LINK | RELAY | FROM_SERVER | RESTARTING | SIGNED | SESSION_LOST | SESSION;
}

/// One WAN link as its terminal announces it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkAd {
    pub id: u8,
    /// UDP port the link's owner relays on (LAN and WAN side).
    pub port: u16,
    /// Upstream weight (origin to server) and downstream weight.
    pub up: u32,
    pub down: u32,
    /// The link's MTU (0: not said), for a wrap with an outer IPv4 header:
    /// a link over IPv6 says 20 bytes less than its own. Origins keep
    /// their packets small enough to cross the smallest link wrapped, and
    /// so does the server.
    pub mtu: u16,
    /// The link's base round trip to the server, µs (0: not measured yet):
    /// senders derive its relative one-way delay from it.
    pub rtt_us: u32,
    /// Its owner's echoes get no answer: out of every schedule.
    pub dark: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Logged on: DATA carries `token`; send to the server's `port`. With
    /// the server's exchange key when the LOGIN had one
    /// ([`crate::session`]).
    Ok {
        token: u64,
        port: u16,
        exchange: Option<[u8; EXCHANGE_LEN]>,
    },
    /// The server holds no session for this origin (or a different token).
    NeedLogin,
    /// The server does not take this terminal: its community authorises
    /// terminals by key, and this one's is not (or no longer) among them.
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Announce {
        /// How often the sender announces: peers count misses against it.
        interval_ms: u32,
        links: Vec<LinkAd>,
    },
    Shutdown,
    /// With the terminal's exchange key, for a session key
    /// ([`crate::session`]).
    Login {
        exchange: Option<[u8; EXCHANGE_LEN]>,
    },
    LoginReply {
        reply: Reply,
        /// The tag of the message it answers (from a server with a site
        /// key, whose signature covers it): a terminal takes a reply only
        /// to what it sent itself.
        answers: Option<[u8; TAG_LEN]>,
    },
    /// Packet `seq` of `count` in a measurement train, padded to `len`
    /// bytes on the wire.
    Probe {
        train: u32,
        seq: u16,
        count: u16,
        len: u16,
    },
    ProbeRequest {
        train: u32,
        count: u16,
    },
    ProbeReport {
        train: u32,
        kbps: u32,
    },
    Echo {
        sent_ns: u64,
    },
    EchoReply {
        sent_ns: u64,
    },
    /// What a receiving end's playout saw per link (the agent's
    /// `feedback`), and what other senders carried on each (its `share`).
    Feedback {
        links: Vec<LinkQueue>,
        shared: Vec<LinkShare>,
    },
    /// Packets the receiving end's playout saw a link lose: send them
    /// again (the agent's `resend`).
    Resend {
        gaps: Vec<Gap>,
    },
}

/// Packets a link lost, as the receiving end saw them: on `link`, the
/// `count` packets of its sequence from `first` on (the bond header's
/// `seq`, mod 256), sent after `after_us` and before `before_us` (the
/// send times of the packets the link delivered around them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gap {
    pub link: u8,
    pub after_us: u32,
    pub before_us: u32,
    pub first: u8,
    pub count: u8,
}

/// Gaps one RESEND may name.
pub const MAX_GAPS: usize = 64;
const _: () = assert!(FIXED_LEN + 1 + MAX_GAPS * 11 + SIG_LEN + MAC_LEN + TAG_LEN <= MAX_LEN);

/// What the other origins of a community carried on one link lately,
/// kbit/s each, the busiest first (the server tells each origin).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkShare {
    pub link: u8,
    pub others: Vec<u32>,
}

/// The queue one link's packets met on their way, as the receiving end
/// saw it: of the packets it delivered lately, the one that waited least,
/// by its send time (the sender's clock, µs, as in the bond header) and
/// its transit beyond the link's least (µs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkQueue {
    pub link: u8,
    pub sent_us: u32,
    pub queue_us: u32,
}

/// Links one FEEDBACK may name: a sender's every link.
pub const MAX_FEEDBACK_LINKS: usize = bond_common::edpf::MAX_PATHS;
const _: () = assert!(
    FIXED_LEN
        + 2
        + MAX_FEEDBACK_LINKS * 9
        + MAX_FEEDBACK_LINKS * (2 + MAX_SHARERS * 4)
        + SIG_LEN
        + MAC_LEN
        + TAG_LEN
        <= MAX_LEN
);

impl Body {
    /// Whether it makes or changes its sender's session (LOGIN, ANNOUNCE,
    /// SHUTDOWN): what a terminal with an identity signs, and what a
    /// server that takes terminals by key checks the signature of.
    pub const fn changes_session(&self) -> bool {
        matches!(
            self,
            Self::Login { .. } | Self::Announce { .. } | Self::Shutdown
        )
    }

    const fn kind(&self) -> u8 {
        match self {
            Self::Announce { .. } => kind::ANNOUNCE,
            Self::Shutdown => kind::SHUTDOWN,
            Self::Login { .. } => kind::LOGIN,
            Self::LoginReply { .. } => kind::LOGIN_REPLY,
            Self::Probe { .. } => kind::PROBE,
            Self::ProbeRequest { .. } => kind::PROBE_REQUEST,
            Self::ProbeReport { .. } => kind::PROBE_REPORT,
            Self::Echo { .. } => kind::ECHO,
            Self::EchoReply { .. } => kind::ECHO_REPLY,
            Self::Feedback { .. } => kind::FEEDBACK,
            Self::Resend { .. } => kind::RESEND,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub community: u32,
    /// The terminal the message is about (its LAN address); for a reply,
    /// the terminal it answers.
    pub origin: Ipv4Addr,
    /// The WAN link it was sent over, with [`flags::VIA_LINK`].
    pub link: u8,
    pub flags: u8,
    /// The sender's session token (zero before login).
    pub token: u64,
    pub time_ms: u64,
    pub counter: u64,
    pub body: Body,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bond header: {0:?}")]
    Header(WireError),
    #[error("not a control message")]
    NotControl,
    #[error("unknown community {0}")]
    UnknownCommunity(u32),
    #[error("truncated")]
    Truncated,
    #[error("bad signature")]
    BadSignature,
    #[error("malformed body")]
    Malformed,
}

impl DecodeError {
    /// Counter name, for the agent's rejection counts.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Header(_) => "bad_header",
            Self::NotControl => "not_control",
            Self::UnknownCommunity(_) => "unknown_community",
            Self::Truncated => "truncated",
            Self::BadSignature => "bad_signature",
            Self::Malformed => "malformed",
        }
    }
}

/// An exchange key and the tag answered, after a LOGIN_REPLY's port: the
/// parts tell themselves apart by length.
const REPLY_BOTH: usize = EXCHANGE_LEN + TAG_LEN;
const _: () = assert!(EXCHANGE_LEN != TAG_LEN);

/// The tag a message ends with (what a LOGIN_REPLY names as the message
/// it answers).
pub fn tag_of(buf: &[u8]) -> Option<[u8; TAG_LEN]> {
    buf.len()
        .checked_sub(TAG_LEN)
        .and_then(|at| buf[at..].try_into().ok())
}

/// The truncated HMAC-SHA256 tag a control message ends with.
pub fn tag(key: &CommunityKey, data: &[u8]) -> [u8; TAG_LEN] {
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&key.tag(&[data])[..TAG_LEN]);
    t
}

impl Msg {
    /// The signed wire form.
    pub fn encode(&self, key: &CommunityKey) -> Vec<u8> {
        self.encode_as(key, None)
    }

    /// The signed wire form, signed by `identity` too if given (and then
    /// flagged [`flags::SIGNED`]; every kind has room for it within
    /// [`MAX_LEN`], a PROBE keeps its length).
    pub fn encode_as(&self, key: &CommunityKey, identity: Option<&Identity>) -> Vec<u8> {
        self.encode_with(key, identity, None)
    }

    /// As [`Self::encode_as`], with the session key's MAC too if given
    /// (flagged [`flags::SESSION`]).
    pub fn encode_with(
        &self,
        key: &CommunityKey,
        identity: Option<&Identity>,
        session: Option<&SessionKey>,
    ) -> Vec<u8> {
        let sig_len = if identity.is_some() { SIG_LEN } else { 0 };
        let mac_len = if session.is_some() { MAC_LEN } else { 0 };
        let hdr = BondHdr::new(
            self.body.kind(),
            self.community,
            self.link,
            u32::from(self.origin),
            0,
            self.token,
        );
        let mut b = Vec::with_capacity(MAX_LEN);
        b.extend_from_slice(&hdr.to_bytes());
        b.extend_from_slice(&self.time_ms.to_be_bytes());
        b.extend_from_slice(&self.counter.to_be_bytes());
        let mut f = self.flags & !(flags::SIGNED | flags::SESSION);
        if identity.is_some() {
            f |= flags::SIGNED;
        }
        if session.is_some() {
            f |= flags::SESSION;
        }
        b.push(f);
        match &self.body {
            Body::Announce { interval_ms, links } => {
                b.extend_from_slice(&interval_ms.to_be_bytes());
                let links = &links[..links.len().min(MAX_LINKS)];
                b.push(links.len() as u8);
                for l in links {
                    b.push(l.id);
                    b.extend_from_slice(&l.port.to_be_bytes());
                    b.extend_from_slice(&l.up.to_be_bytes());
                    b.extend_from_slice(&l.down.to_be_bytes());
                    b.extend_from_slice(&l.mtu.to_be_bytes());
                    b.extend_from_slice(&l.rtt_us.to_be_bytes());
                    b.push(u8::from(l.dark));
                }
            }
            Body::Shutdown => {}
            Body::Login { exchange } => {
                if let Some(e) = exchange {
                    b.extend_from_slice(e);
                }
            }
            Body::LoginReply { reply, answers } => {
                let (status, token, port, exchange) = match reply {
                    Reply::Ok {
                        token,
                        port,
                        exchange,
                    } => (0u8, *token, *port, exchange.as_ref()),
                    Reply::NeedLogin => (1, 0, 0, None),
                    Reply::Refused => (2, 0, 0, None),
                };
                b.push(status);
                b.extend_from_slice(&token.to_be_bytes());
                b.extend_from_slice(&port.to_be_bytes());
                if let Some(e) = exchange {
                    b.extend_from_slice(e);
                }
                if let Some(a) = answers {
                    b.extend_from_slice(a);
                }
            }
            Body::Probe {
                train,
                seq,
                count,
                len,
            } => {
                b.extend_from_slice(&train.to_be_bytes());
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&count.to_be_bytes());
                let pad = usize::from(*len)
                    .min(MAX_LEN)
                    .saturating_sub(b.len() + 2 + sig_len + mac_len + TAG_LEN);
                b.extend_from_slice(&(pad as u16).to_be_bytes());
                b.resize(b.len() + pad, 0);
            }
            Body::ProbeRequest { train, count } => {
                b.extend_from_slice(&train.to_be_bytes());
                b.extend_from_slice(&count.to_be_bytes());
            }
            Body::ProbeReport { train, kbps } => {
                b.extend_from_slice(&train.to_be_bytes());
                b.extend_from_slice(&kbps.to_be_bytes());
            }
            Body::Echo { sent_ns } | Body::EchoReply { sent_ns } => {
                b.extend_from_slice(&sent_ns.to_be_bytes());
            }
            Body::Feedback { links, shared } => {
                let links = &links[..links.len().min(MAX_FEEDBACK_LINKS)];
                b.push(links.len() as u8);
                for l in links {
                    b.push(l.link);
                    b.extend_from_slice(&l.sent_us.to_be_bytes());
                    b.extend_from_slice(&l.queue_us.to_be_bytes());
                }
                let shared = &shared[..shared.len().min(MAX_FEEDBACK_LINKS)];
                b.push(shared.len() as u8);
                for s in shared {
                    let others = &s.others[..s.others.len().min(MAX_SHARERS)];
                    b.push(s.link);
                    b.push(others.len() as u8);
                    for o in others {
                        b.extend_from_slice(&o.to_be_bytes());
                    }
                }
            }
            Body::Resend { gaps } => {
                let gaps = &gaps[..gaps.len().min(MAX_GAPS)];
                b.push(gaps.len() as u8);
                for g in gaps {
                    b.push(g.link);
                    b.extend_from_slice(&g.after_us.to_be_bytes());
                    b.extend_from_slice(&g.before_us.to_be_bytes());
                    b.push(g.first);
                    b.push(g.count);
                }
            }
        }
        if let Some(id) = identity {
            let sig = id.sign(&b);
            b.extend_from_slice(&sig);
        }
        if let Some(k) = session {
            let mac = k.mac(&b);
            b.extend_from_slice(&mac);
        }
        let t = tag(key, &b);
        b.extend_from_slice(&t);
        b
    }

    /// Whether `buf`, a message [`decode`](Self::decode) took, carries
    /// `key`'s signature ([`flags::SIGNED`]).
    pub fn signed_by(buf: &[u8], key: &PublicKey) -> bool {
        let Some(signed) = Self::mac_start(buf) else {
            return false;
        };
        let Some(body_end) = signed.checked_sub(SIG_LEN) else {
            return false;
        };
        if body_end < FIXED_LEN || buf[FIXED_LEN - 1] & flags::SIGNED == 0 {
            return false;
        }
        let sig: &[u8; SIG_LEN] = buf[body_end..signed].try_into().expect("SIG_LEN bytes");
        key.verify(&buf[..body_end], sig)
    }

    /// Whether `buf`, a message [`decode`](Self::decode) took, carries
    /// `key`'s MAC ([`flags::SESSION`]).
    pub fn session_ok(buf: &[u8], key: &SessionKey) -> bool {
        let Some(end) = buf.len().checked_sub(TAG_LEN) else {
            return false;
        };
        match end.checked_sub(MAC_LEN) {
            Some(start) if start >= FIXED_LEN && buf[FIXED_LEN - 1] & flags::SESSION != 0 => {
                key.verify(&buf[..start], &buf[start..end])
            }
            _ => false,
        }
    }

    /// Where the session MAC starts (where the signature or body ends
    /// without one), in a message of at least the fixed part.
    fn mac_start(buf: &[u8]) -> Option<usize> {
        let end = buf.len().checked_sub(TAG_LEN)?;
        if end < FIXED_LEN {
            return None;
        }
        match buf[FIXED_LEN - 1] & flags::SESSION {
            0 => Some(end),
            _ => end.checked_sub(MAC_LEN),
        }
    }

    /// Parses and authenticates a message; `key` gives a community's key.
    pub fn decode<'k>(
        buf: &[u8],
        key: impl FnOnce(u32) -> Option<&'k CommunityKey>,
    ) -> Result<Self, DecodeError> {
        let hdr = BondHdr::parse(buf).map_err(DecodeError::Header)?;
        if hdr.is_data() {
            return Err(DecodeError::NotControl);
        }
        let community = hdr.community();
        let key = key(community).ok_or(DecodeError::UnknownCommunity(community))?;
        if buf.len() < FIXED_LEN + TAG_LEN || buf.len() > MAX_LEN {
            return Err(DecodeError::Truncated);
        }
        let (signed, got) = buf.split_at(buf.len() - TAG_LEN);
        if !key.verify(&[signed], got) {
            return Err(DecodeError::BadSignature);
        }

        let flags = signed[FIXED_LEN - 1];
        if flags & !flags::ALL != 0 {
            return Err(DecodeError::Malformed);
        }
        // A session MAC and a signature end the part the body is read
        // from; they are checked by whoever holds the session's key
        // (`session_ok`) or knows the signer's (`signed_by`).
        let macd = match flags & flags::SESSION {
            0 => signed.len(),
            _ => signed
                .len()
                .checked_sub(MAC_LEN)
                .filter(|&end| end >= FIXED_LEN)
                .ok_or(DecodeError::Truncated)?,
        };
        let body_end = match flags & flags::SIGNED {
            0 => macd,
            _ => macd
                .checked_sub(SIG_LEN)
                .filter(|&end| end >= FIXED_LEN)
                .ok_or(DecodeError::Truncated)?,
        };
        let mut r = Reader(&signed[BondHdr::LEN..body_end]);
        let time_ms = r.u64()?;
        let counter = r.u64()?;
        let flags = r.u8()?;
        let body = match hdr.kind {
            kind::ANNOUNCE => {
                let interval_ms = r.u32()?;
                let links = r.list(MAX_LINKS, |r| {
                    Ok(LinkAd {
                        id: r.u8()?,
                        port: r.u16()?,
                        up: r.u32()?,
                        down: r.u32()?,
                        mtu: r.u16()?,
                        rtt_us: r.u32()?,
                        dark: match r.u8()? {
                            0 => false,
                            1 => true,
                            _ => return Err(DecodeError::Malformed),
                        },
                    })
                })?;
                Body::Announce { interval_ms, links }
            }
            kind::SHUTDOWN => Body::Shutdown,
            kind::LOGIN => Body::Login {
                exchange: r.exchange()?,
            },
            kind::LOGIN_REPLY => {
                let status = r.u8()?;
                let token = r.u64()?;
                let port = r.u16()?;
                // What follows tells itself by its length: an exchange key
                // (32), the tag answered (16), both (48) or nothing.
                let exchange = match r.0.len() {
                    EXCHANGE_LEN | REPLY_BOTH if status == 0 => Some(r.take()?),
                    _ => None,
                };
                let answers = match r.0.len() {
                    TAG_LEN => Some(r.take()?),
                    _ => None,
                };
                let reply = match status {
                    0 => Reply::Ok {
                        token,
                        port,
                        exchange,
                    },
                    1 => Reply::NeedLogin,
                    2 => Reply::Refused,
                    _ => return Err(DecodeError::Malformed),
                };
                Body::LoginReply { reply, answers }
            }
            kind::PROBE => {
                let train = r.u32()?;
                let seq = r.u16()?;
                let count = r.u16()?;
                let pad = usize::from(r.u16()?);
                let rest = r.0.get(pad..).ok_or(DecodeError::Malformed)?;
                if r.0[..pad].iter().any(|&b| b != 0) {
                    return Err(DecodeError::Malformed);
                }
                r.0 = rest;
                Body::Probe {
                    train,
                    seq,
                    count,
                    len: buf.len() as u16,
                }
            }
            kind::PROBE_REQUEST => Body::ProbeRequest {
                train: r.u32()?,
                count: r.u16()?,
            },
            kind::PROBE_REPORT => Body::ProbeReport {
                train: r.u32()?,
                kbps: r.u32()?,
            },
            kind::ECHO => Body::Echo { sent_ns: r.u64()? },
            kind::ECHO_REPLY => Body::EchoReply { sent_ns: r.u64()? },
            kind::FEEDBACK => Body::Feedback {
                links: r.list(MAX_FEEDBACK_LINKS, |r| {
                    Ok(LinkQueue {
                        link: r.u8()?,
                        sent_us: r.u32()?,
                        queue_us: r.u32()?,
                    })
                })?,
                shared: r.list(MAX_FEEDBACK_LINKS, |r| {
                    Ok(LinkShare {
                        link: r.u8()?,
                        others: r.list(MAX_SHARERS, Reader::u32)?,
                    })
                })?,
            },
            kind::RESEND => Body::Resend {
                gaps: r.list(MAX_GAPS, |r| {
                    Ok(Gap {
                        link: r.u8()?,
                        after_us: r.u32()?,
                        before_us: r.u32()?,
                        first: r.u8()?,
                        count: r.u8()?,
                    })
                })?,
            },
            _ => return Err(DecodeError::Malformed),
        };
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed);
        }
        Ok(Self {
            community,
            origin: Ipv4Addr::from(hdr.origin()),
            link: hdr.link,
            flags,
            token: hdr.token(),
            time_ms,
            counter,
            body,
        })
    }
}

/// Bounds-checked big-endian reads.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Malformed)?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.take().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take().map(u64::from_be_bytes)
    }
    /// An exchange key if the body goes on (nothing, or all 32 bytes).
    fn exchange(&mut self) -> Result<Option<[u8; EXCHANGE_LEN]>, DecodeError> {
        match self.0.is_empty() {
            true => Ok(None),
            false => self.take().map(Some),
        }
    }
    /// A count (u8, at most `max`) and that many items.
    fn list<T>(
        &mut self,
        max: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = usize::from(self.u8()?);
        if n > max {
            return Err(DecodeError::Malformed);
        }
        (0..n).map(|_| item(self)).collect()
    }
}

/// Why an authentic message was still refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    #[error("too old")]
    TooOld,
    #[error("from the future")]
    FromTheFuture,
    #[error("replayed")]
    Replayed,
}

impl Stale {
    pub const fn name(self) -> &'static str {
        match self {
            Self::TooOld => "too_old",
            Self::FromTheFuture => "from_the_future",
            Self::Replayed => "replayed",
        }
    }
}

/// Freshness and replay protection: a message's clock must be within
/// `skew_ms` of ours, and each sender's counter is accepted once, within a
/// window of the last 64 values (messages over different links may arrive
/// out of order).
///
/// A sender's window outlives its session: a SHUTDOWN or an expiry does not
/// clear it, or a captured message would be accepted once more within the
/// skew. A restarted sender needs no clearing either, as its [`Counter`]
/// starts above what it sent before. A window goes once the newest message
/// it accepted is older than the skew: a replay of anything it saw is then
/// refused as too old.
#[derive(Debug)]
pub struct Guard {
    skew_ms: u64,
    /// By community, origin, whether the server sent it (a reply names
    /// the terminal it answers, but counts with the server's counter), and
    /// the link it was sent over: trains on links of different speeds
    /// overtake each other by more than the window.
    seen: HashMap<(u32, Ipv4Addr, bool, u8), Window>,
    /// When windows were last swept for age.
    swept_ms: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Window {
    top: u64,
    /// Bit i: `top - i` was seen.
    bits: u64,
    /// The newest sending time among the messages accepted.
    newest_ms: u64,
}

impl Guard {
    pub fn new(skew_ms: u64) -> Self {
        Self {
            skew_ms,
            seen: HashMap::new(),
            swept_ms: 0,
        }
    }

    /// Accepts `msg` (and remembers its counter) or says why not. Senders
    /// are told apart by community and origin, and the server's replies
    /// from the terminal's own messages.
    pub fn check(&mut self, msg: &Msg, now_ms: u64) -> Result<(), Stale> {
        if msg.time_ms > now_ms.saturating_add(self.skew_ms) {
            return Err(Stale::FromTheFuture);
        }
        if msg.time_ms.saturating_add(self.skew_ms) < now_ms {
            return Err(Stale::TooOld);
        }
        if now_ms >= self.swept_ms.saturating_add(self.skew_ms) {
            self.sweep(now_ms);
        }
        let from_server = msg.flags & flags::FROM_SERVER != 0;
        let w = self
            .seen
            .entry((msg.community, msg.origin, from_server, msg.link))
            .or_default();
        let c = msg.counter;
        if w.bits == 0 || c > w.top {
            let shift = c.saturating_sub(w.top);
            w.bits = if w.bits == 0 || shift >= 64 {
                1
            } else {
                (w.bits << shift) | 1
            };
            w.top = c;
        } else {
            let age = w.top - c;
            if age >= 64 || w.bits & (1 << age) != 0 {
                return Err(Stale::Replayed);
            }
            w.bits |= 1 << age;
        }
        w.newest_ms = w.newest_ms.max(msg.time_ms);
        Ok(())
    }

    /// Drops the windows whose every message is now too old to pass.
    fn sweep(&mut self, now_ms: u64) {
        let skew = self.skew_ms;
        self.seen
            .retain(|_, w| w.newest_ms.saturating_add(skew) >= now_ms);
        self.swept_ms = now_ms;
    }

    /// Senders with a window (for tests and the operator).
    pub fn senders(&self) -> usize {
        self.seen.len()
    }

    /// Decodes, authenticates and checks a received message: the message,
    /// or the name of the reason it was refused (for the reject counters).
    pub fn open<'k>(
        &mut self,
        buf: &[u8],
        key: impl FnOnce(u32) -> Option<&'k CommunityKey>,
    ) -> Result<Msg, &'static str> {
        let msg = Msg::decode(buf, key).map_err(DecodeError::name)?;
        self.check(&msg, now_ms()).map_err(Stale::name)?;
        Ok(msg)
    }
}

/// A sender's counter: starts at the start time in microseconds, so a
/// restarted sender continues above what its peers have seen.
#[derive(Debug)]
pub struct Counter {
    last: u64,
    clocked: bool,
}

impl Counter {
    pub fn new() -> Self {
        Self {
            last: now_us(),
            clocked: false,
        }
    }

    /// A counter that never falls behind the clock (in microseconds): a
    /// server's. Another node that takes over a community then continues
    /// above what the one before sent, though that one counted thousands
    /// of messages since it started (a terminal's window would take the
    /// new owner's replies for replays). Only for a sender whose messages
    /// to one receiver go one way, in order: the window takes 64 counts
    /// of reordering, which are 64 µs here.
    pub fn clocked() -> Self {
        Self {
            last: now_us(),
            clocked: true,
        }
    }

    pub fn bump(&mut self) -> u64 {
        self.last += 1;
        if self.clocked {
            self.last = self.last.max(now_us());
        }
        self.last
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static KEY: std::sync::LazyLock<CommunityKey> =
        std::sync::LazyLock::new(|| CommunityKey::new("community one key"));

    fn announce() -> Msg {
        Msg {
            community: 7,
            origin: Ipv4Addr::new(10, 0, 1, 2),
            link: 3,
            flags: flags::VIA_LINK,
            token: 0x1122_3344_5566_7788,
            time_ms: 1_700_000_000_000,
            counter: 42,
            body: Body::Announce {
                interval_ms: 1000,
                links: vec![
                    LinkAd {
                        id: 3,
                        port: 7701,
                        up: 20,
                        down: 30,
                        mtu: 1500,
                        rtt_us: 40_000,
                        dark: false,
                    },
                    LinkAd {
                        id: 4,
                        port: 7702,
                        up: 1,
                        down: 2,
                        mtu: 1492,
                        rtt_us: 0,
                        dark: true,
                    },
                ],
            },
        }
    }

    fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
        Msg::decode(b, |c| (c == 7).then_some(&*KEY))
    }

    #[test]
    fn every_kind_round_trips() {
        let base = announce();
        for body in [
            base.body.clone(),
            Body::Shutdown,
            Body::Login { exchange: None },
            Body::Login {
                exchange: Some([7; 32]),
            },
            Body::LoginReply {
                reply: Reply::Ok {
                    token: 9,
                    port: 7700,
                    exchange: None,
                },
                answers: None,
            },
            Body::LoginReply {
                reply: Reply::Ok {
                    token: 9,
                    port: 7700,
                    exchange: Some([9; 32]),
                },
                answers: None,
            },
            Body::LoginReply {
                reply: Reply::Ok {
                    token: 9,
                    port: 7700,
                    exchange: Some([9; 32]),
                },
                answers: Some([4; TAG_LEN]),
            },
            Body::LoginReply {
                reply: Reply::Ok {
                    token: 9,
                    port: 7700,
                    exchange: None,
                },
                answers: Some([4; TAG_LEN]),
            },
            Body::LoginReply {
                reply: Reply::NeedLogin,
                answers: None,
            },
            Body::LoginReply {
                reply: Reply::Refused,
                answers: Some([5; TAG_LEN]),
            },
            Body::Probe {
                train: 3,
                seq: 39,
                count: 40,
                len: MAX_LEN as u16,
            },
            Body::ProbeRequest {
                train: 4,
                count: 40,
            },
            Body::ProbeReport {
                train: 4,
                kbps: 41_000,
            },
            Body::Echo { sent_ns: u64::MAX },
            Body::EchoReply { sent_ns: 12_345 },
            Body::Feedback {
                links: Vec::new(),
                shared: Vec::new(),
            },
            Body::Feedback {
                links: vec![
                    LinkQueue {
                        link: 1,
                        sent_us: u32::MAX,
                        queue_us: 0,
                    };
                    MAX_FEEDBACK_LINKS
                ],
                shared: vec![
                    LinkShare {
                        link: 2,
                        others: vec![u32::MAX; MAX_SHARERS],
                    };
                    MAX_FEEDBACK_LINKS
                ],
            },
            Body::Resend { gaps: Vec::new() },
            Body::Resend {
                gaps: vec![
                    Gap {
                        link: 3,
                        after_us: u32::MAX,
                        before_us: 7,
                        first: 255,
                        count: 2,
                    };
                    MAX_GAPS
                ],
            },
        ] {
            let m = Msg {
                body,
                ..base.clone()
            };
            let wire = m.encode(&KEY);
            assert!(wire.len() <= MAX_LEN);
            assert_eq!(decode(&wire), Ok(m));
        }
    }

    /// A terminal's signature rides between body and tag: the message
    /// reads the same, is flagged SIGNED, and is its key's only; a member
    /// of the community (who can make the tag) cannot move it to another
    /// message or make one.
    /// A message with the session key's MAC reads as without it, with
    /// or without a signature too; the MAC is the session's only: another
    /// key, a changed byte (re-tagged with the community key, as any
    /// member could) or a MAC moved from another message fail, and a
    /// message without one is not taken as having it.
    #[test]
    fn session_macs_read_the_same_and_are_the_sessions_only() {
        use crate::{
            identity::Identity,
            session::{Exchange, Transcript},
        };
        let (t, s) = (Exchange::generate().unwrap(), Exchange::generate().unwrap());
        let tr = Transcript {
            community: 7,
            origin: Ipv4Addr::new(10, 0, 1, 1),
            token: 5,
            terminal: t.public(),
            server: s.public(),
        };
        let k = t.key(&s.public(), &tr).unwrap();
        let other = Exchange::generate().unwrap().key(&s.public(), &tr).unwrap();
        let id = Identity::generate().unwrap();
        for (body, signer) in [
            (Body::Echo { sent_ns: 3 }, None),
            (announce().body, Some(&id)),
            (
                Body::Probe {
                    train: 1,
                    seq: 2,
                    count: 3,
                    len: 900,
                },
                None,
            ),
            (
                Body::Login {
                    exchange: Some(t.public()),
                },
                Some(&id),
            ),
        ] {
            let m = Msg { body, ..announce() };
            let b = m.encode_with(&KEY, signer, Some(&k));
            let got = decode(&b).unwrap();
            assert_eq!(got.body, m.body);
            assert_eq!(got.flags & flags::SESSION, flags::SESSION);
            assert!(Msg::session_ok(&b, &k));
            assert!(!Msg::session_ok(&b, &other), "another session's key");
            if let Some(id) = signer {
                assert!(Msg::signed_by(&b, &id.public()), "signed and MAC'd");
            }
            if let Body::Probe { len, .. } = m.body {
                assert_eq!(b.len(), usize::from(len), "padded to its size");
            }
            let plain = m.encode_as(&KEY, signer);
            assert!(!Msg::session_ok(&plain, &k), "no MAC");
            // A changed byte, re-tagged: the community's tag holds, the
            // session's MAC does not.
            let mut bent = b.clone();
            bent[BondHdr::LEN + 3] ^= 1; // the time
            bent.truncate(bent.len() - TAG_LEN);
            let t = tag(&KEY, &bent);
            bent.extend_from_slice(&t);
            assert!(decode(&bent).is_ok());
            assert!(!Msg::session_ok(&bent, &k));
        }
        // SESSION with no room for a MAC: refused, not misread.
        let mut short = Msg {
            body: Body::Shutdown,
            ..announce()
        }
        .encode(&KEY);
        short[FIXED_LEN - 1] |= flags::SESSION;
        short.truncate(short.len() - TAG_LEN);
        let t = tag(&KEY, &short);
        short.extend_from_slice(&t);
        assert_eq!(decode(&short), Err(DecodeError::Truncated));
        assert!(!Msg::session_ok(&short, &k));
        // A LOGIN's exchange key is all 32 bytes or none.
        let mut login = Msg {
            body: Body::Login {
                exchange: Some([1; 32]),
            },
            ..announce()
        }
        .encode(&KEY);
        login.drain(login.len() - TAG_LEN - 1..login.len() - TAG_LEN);
        login.truncate(login.len() - TAG_LEN);
        let t = tag(&KEY, &login);
        login.extend_from_slice(&t);
        assert_eq!(decode(&login), Err(DecodeError::Malformed));
    }

    #[test]
    fn signed_messages_read_the_same_and_are_their_terminals_only() {
        use crate::identity::Identity;
        let (t1, t2) = (Identity::generate().unwrap(), Identity::generate().unwrap());
        for body in [
            announce().body,
            Body::Login { exchange: None },
            Body::Shutdown,
            Body::Probe {
                train: 1,
                seq: 2,
                count: 3,
                len: 700,
            },
        ] {
            let m = Msg { body, ..announce() };
            let b = m.encode_as(&KEY, Some(&t1));
            let got = decode(&b).unwrap();
            assert_eq!(got.flags, m.flags | flags::SIGNED);
            assert_eq!(got.body, m.body);
            assert!(Msg::signed_by(&b, &t1.public()));
            assert!(!Msg::signed_by(&b, &t2.public()), "another's key");
            let plain = m.encode(&KEY);
            assert!(!Msg::signed_by(&plain, &t1.public()), "unsigned");
            assert_eq!(decode(&plain).unwrap().flags & flags::SIGNED, 0);
            if let Body::Probe { len, .. } = m.body {
                assert_eq!(b.len(), usize::from(len), "padded to its size, signed");
            }
        }
        // Re-tagged after a change (as any member could), the signature
        // no longer holds; a signature from another message neither.
        let b = announce().encode_as(&KEY, Some(&t1));
        let retag = |mut v: Vec<u8>| {
            v.truncate(v.len() - TAG_LEN);
            let t = tag(&KEY, &v);
            v.extend_from_slice(&t);
            v
        };
        let mut bent = b.clone();
        bent[BondHdr::LEN + 20] ^= 1; // the announce interval
        let bent = retag(bent);
        assert!(decode(&bent).is_ok(), "the community key's tag holds");
        assert!(!Msg::signed_by(&bent, &t1.public()));
        let login = Msg {
            body: Body::Login { exchange: None },
            ..announce()
        }
        .encode_as(&KEY, Some(&t1));
        let sig = &login[login.len() - TAG_LEN - SIG_LEN..login.len() - TAG_LEN];
        let mut moved = b[..b.len() - TAG_LEN - SIG_LEN].to_vec();
        moved.extend_from_slice(sig);
        moved.extend_from_slice(&[0; TAG_LEN]);
        let moved = retag(moved);
        assert!(decode(&moved).is_ok());
        assert!(!Msg::signed_by(&moved, &t1.public()));
        // SIGNED with no room for a signature: refused, not misread.
        let mut short = Msg {
            body: Body::Shutdown,
            ..announce()
        }
        .encode(&KEY);
        short[FIXED_LEN - 1] |= flags::SIGNED;
        let short = retag(short);
        assert_eq!(decode(&short), Err(DecodeError::Truncated));
        assert!(!Msg::signed_by(&short, &t1.public()));
        assert!(!Msg::signed_by(&[], &t1.public()));
    }

    #[test]
    fn layout_is_as_documented() {
        let wire = announce().encode(&KEY);
        // After the bond header: counter, token, flags, then the body.
        let h = BondHdr::LEN;
        assert_eq!(wire.len(), h + 8 + 8 + 1 + 4 + 1 + 2 * 18 + 16);
        assert_eq!(&wire[..2], &[0xB0, 0x4D]);
        assert_eq!(wire[3], kind::ANNOUNCE);
        assert_eq!(&wire[h..h + 8], &1_700_000_000_000u64.to_be_bytes());
        assert_eq!(&wire[h + 8..h + 16], &42u64.to_be_bytes());
        assert_eq!(wire[h + 16], flags::VIA_LINK);
        assert_eq!(&wire[h + 17..h + 21], &1000u32.to_be_bytes());
        assert_eq!(wire[h + 21], 2);
        assert_eq!(&wire[h + 22..h + 25], &[3, 0x1e, 0x15]);
        assert_eq!(
            &wire[h + 33..h + 35],
            &1500u16.to_be_bytes(),
            "the first link's MTU"
        );
        assert_eq!(
            &wire[h + 35..h + 39],
            &40_000u32.to_be_bytes(),
            "its base rtt"
        );
        assert_eq!(wire[h + 39], 0, "not dark");
        assert_eq!(wire[h + 39 + 18], 1, "the second is dark");
    }

    #[test]
    fn refuses_what_is_not_authentic() {
        let wire = announce().encode(&KEY);
        // Any flipped bit anywhere breaks the signature (or the header).
        for i in 0..wire.len() {
            for bit in 0..8 {
                let mut w = wire.clone();
                w[i] ^= 1 << bit;
                assert!(decode(&w).is_err(), "byte {i} bit {bit} accepted");
            }
        }
        let another = CommunityKey::new("another key");
        assert_eq!(
            Msg::decode(&wire, |_| Some(&another)),
            Err(DecodeError::BadSignature)
        );
        assert_eq!(
            Msg::decode(&wire, |_| None),
            Err(DecodeError::UnknownCommunity(7))
        );
        // Unsigned: the tag cut off, or zeroed.
        assert!(decode(&wire[..wire.len() - TAG_LEN]).is_err());
        let mut zeroed = wire.clone();
        let n = zeroed.len();
        zeroed[n - TAG_LEN..].fill(0);
        assert_eq!(decode(&zeroed), Err(DecodeError::BadSignature));
    }

    #[test]
    fn refuses_every_truncation_and_oversize() {
        let wire = announce().encode(&KEY);
        for len in 0..wire.len() {
            assert!(decode(&wire[..len]).is_err(), "cut at {len}");
        }
        let mut long = wire.clone();
        long.resize(MAX_LEN + 1, 0);
        assert_eq!(decode(&long), Err(DecodeError::Truncated));
    }

    #[test]
    fn signed_but_malformed_bodies_are_refused() {
        // A signer with the key can still send nonsense: the body is checked.
        let sign = |mut b: Vec<u8>| {
            let t = tag(&KEY, &b);
            b.extend_from_slice(&t);
            b
        };
        let good = announce().encode(&KEY);
        let body = &good[..good.len() - TAG_LEN];
        // The flags byte, then the announce's interval and link count.
        let (flags_at, count_at) = (BondHdr::LEN + 16, BondHdr::LEN + 21);
        let mut too_many = body.to_vec();
        too_many[count_at] = 33;
        let mut lying_count = body.to_vec();
        lying_count[count_at] = 3;
        let mut trailing = body.to_vec();
        trailing.push(0);
        let mut bad_flags = body.to_vec();
        bad_flags[flags_at] = 0x80;
        let mut bad_kind = body.to_vec();
        bad_kind[3] = 0x1f;
        let feedback = Msg {
            body: Body::Feedback {
                links: vec![LinkQueue::default(); MAX_FEEDBACK_LINKS],
                shared: Vec::new(),
            },
            ..announce()
        }
        .encode(&KEY);
        let mut feedback = feedback[..feedback.len() - TAG_LEN].to_vec();
        feedback[41] += 1;
        feedback.extend_from_slice(&[0; 9]);
        let sharers = Msg {
            body: Body::Feedback {
                links: Vec::new(),
                shared: vec![LinkShare {
                    link: 1,
                    others: vec![7; MAX_SHARERS],
                }],
            },
            ..announce()
        }
        .encode(&KEY);
        let mut sharers = sharers[..sharers.len() - TAG_LEN].to_vec();
        let at = BondHdr::LEN + 17;
        assert_eq!(sharers[at..at + 4], [0, 1, 1, 8]);
        sharers[at + 3] += 1;
        sharers.extend_from_slice(&[0; 4]);
        for (what, b) in [
            ("17 feedback links", feedback),
            ("9 others on a link", sharers),
            ("33 links", too_many),
            ("count beyond the body", lying_count),
            ("trailing byte", trailing),
            ("unknown flag", bad_flags),
            ("unknown control kind", bad_kind),
        ] {
            assert_eq!(decode(&sign(b)), Err(DecodeError::Malformed), "{what}");
        }
    }

    #[test]
    fn data_is_not_a_control_message() {
        let mut wire = announce().encode(&KEY);
        wire[3] = kind::DATA_UP;
        assert_eq!(decode(&wire), Err(DecodeError::NotControl));
    }

    #[test]
    fn guard_refuses_replays_old_and_future_messages() {
        let now = 1_700_000_000_000;
        let mut g = Guard::new(30_000);
        let m = |counter, time_ms| Msg {
            counter,
            time_ms,
            ..announce()
        };
        assert_eq!(g.check(&m(100, now), now), Ok(()));
        assert_eq!(g.check(&m(100, now), now), Err(Stale::Replayed));
        // Out of order within the window: each accepted once.
        assert_eq!(g.check(&m(105, now), now), Ok(()));
        assert_eq!(g.check(&m(103, now), now), Ok(()));
        assert_eq!(g.check(&m(103, now), now), Err(Stale::Replayed));
        assert_eq!(g.check(&m(101, now), now), Ok(()));
        // Far behind the newest: refused (cannot tell it was not seen).
        assert_eq!(g.check(&m(300, now), now), Ok(()));
        assert_eq!(g.check(&m(200, now), now), Err(Stale::Replayed));
        assert_eq!(
            g.check(&m(301, now + 31_000), now),
            Err(Stale::FromTheFuture)
        );
        assert_eq!(g.check(&m(302, now - 31_000), now), Err(Stale::TooOld));
        // Another sender has its own window.
        let other = Msg {
            origin: Ipv4Addr::new(10, 0, 1, 9),
            ..m(100, now)
        };
        assert_eq!(g.check(&other, now), Ok(()));
        // The server's reply about this origin counts on its own: a low
        // counter from the server is no replay of the terminal's.
        let reply = Msg {
            body: Body::LoginReply {
                reply: Reply::NeedLogin,
                answers: None,
            },
            flags: flags::FROM_SERVER,
            ..m(5, now)
        };
        assert_eq!(g.check(&reply, now), Ok(()));
        // So do messages over another link: a slow link's train is
        // overtaken by a fast one's by more than the window.
        let other_link = Msg {
            link: 9,
            ..m(6, now)
        };
        assert_eq!(g.check(&other_link, now), Ok(()));
        assert_eq!(g.check(&other_link, now), Err(Stale::Replayed));
        assert_eq!(g.check(&m(306, now), now), Ok(()));
    }

    /// A message captured before its sender shut down (or went silent and
    /// expired) is no fresher after it: refused while within the skew, then
    /// too old; the window goes only once nothing it saw could pass.
    #[test]
    fn guard_refuses_a_replay_after_its_sender_left() {
        let now = 1_700_000_000_000;
        let mut g = Guard::new(30_000);
        let captured = Msg {
            counter: 100,
            time_ms: now,
            ..announce()
        };
        assert_eq!(g.check(&captured, now), Ok(()));
        let shutdown = Msg {
            counter: 101,
            time_ms: now + 1_000,
            body: Body::Shutdown,
            ..announce()
        };
        assert_eq!(g.check(&shutdown, now + 1_000), Ok(()));
        for later in [2_000, 20_000, 30_000] {
            assert_eq!(
                g.check(&captured, now + later),
                Err(Stale::Replayed),
                "{later} ms on"
            );
        }
        assert_eq!(g.check(&captured, now + 30_001), Err(Stale::TooOld));
        // The restarted sender counts on from its start time, above.
        let again = Msg {
            counter: 200,
            time_ms: now + 5_000,
            ..announce()
        };
        assert_eq!(g.check(&again, now + 5_000), Ok(()));
        // Windows go once all they saw is too old to pass.
        assert_eq!(g.senders(), 1);
        let other = Msg {
            origin: Ipv4Addr::new(10, 0, 1, 9),
            counter: 1,
            time_ms: now + 80_000,
            ..announce()
        };
        assert_eq!(g.check(&other, now + 80_000), Ok(()));
        assert_eq!(g.senders(), 1, "only the new sender's window is left");
    }

    #[test]
    fn counters_only_grow() {
        let mut c = Counter::new();
        let a = c.bump();
        let b = c.bump();
        assert!(b > a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(Counter::new().bump() > b, "a restart continues above");
    }

    /// A node that sent many messages is followed by another that takes
    /// its community over: the newcomer's replies pass the terminal's
    /// window, where a plain counter's (started at the same time, but
    /// fewer messages on) were replays.
    #[test]
    fn a_clocked_counter_stays_above_a_busy_peer_started_at_once() {
        let (mut busy, mut plain, mut clocked) =
            (Counter::clocked(), Counter::new(), Counter::clocked());
        let mut top = 0;
        // Thousands of messages as fast as they go: the busy one runs
        // ahead of the clock by at most that burst, which the clock then
        // overtakes.
        for _ in 0..5_000 {
            top = busy.bump();
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        let mut g = Guard::new(1000);
        let now = now_ms();
        let from = |counter| Msg {
            counter,
            time_ms: now,
            flags: flags::FROM_SERVER,
            ..announce()
        };
        assert_eq!(g.check(&from(top), now), Ok(()));
        let mut c = clocked.bump();
        assert!(c > top, "{c} after {top}");
        assert_eq!(g.check(&from(c), now), Ok(()));
        c = clocked.bump();
        assert_eq!(g.check(&from(c), now), Ok(()));
        // A plain counter started as early is far behind the busy one.
        assert_eq!(g.check(&from(plain.bump()), now), Err(Stale::Replayed));
    }
}
