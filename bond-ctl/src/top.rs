//! `bond-ctl top`: the links live. Each second it reads the counters from
//! the pinned maps (they work while the agent is down) and the agent's
//! `status` and `peers`, and shows each link's rate up and down against
//! its weight, its delay where measured, missed announces, and the drops;
//! on a server also the flows and free ports, per community.
//!
//! The rates come from two readings and the time between them
//! ([`Frame::between`], pure and tested); drawing is ratatui's.

use std::time::{Duration, Instant};

use anyhow::Result;
use bond_api::{
    Request,
    reply::{Counts, LinkCounters, Links, Peers, Status},
};
use bond_datapath::Maps;
use ratatui::{
    Frame as Screen,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::Line,
    widgets::{Block, Paragraph, Row as TableRow, Table},
};
use serde_json::Value;

/// One reading of an instance.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    /// The counters (`None` with no instance pinned).
    pub links: Option<Links>,
    pub status: Option<Status>,
    pub peers: Option<Peers>,
    /// Why the counters or the agent could not be read.
    pub trouble: Vec<String>,
}

/// One line of the table: a link of this host's community (a terminal),
/// or of one community (the server).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub community: Option<u32>,
    pub link: u8,
    /// Whose link it is (a terminal's address), or its public address at
    /// the server.
    pub host: String,
    /// Mbit/s of this host's traffic over the link (a terminal), or of
    /// the community's (the server), in each direction.
    pub up: f64,
    pub down: f64,
    /// Mbit/s relayed for peers over this host's own link.
    pub relay: Option<f64>,
    /// Announced weights, kbit/s.
    pub weight_up: Option<u32>,
    pub weight_down: Option<u32>,
    /// Measured round trip to the server (own links), ms.
    pub rtt_ms: Option<f64>,
    /// Its delay beyond the nearest link's in the schedule, ms.
    pub extra_ms: Option<f64>,
    pub missed: Option<u32>,
    pub state: &'static str,
}

/// What one refresh shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub title: String,
    pub rows: Vec<Row>,
    /// Drops by reason: total and how many in the last interval.
    pub drops: Vec<(String, u64, u64)>,
    pub notes: Vec<String>,
}

fn mbit(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs / 1e6
    }
}

/// Mbit/s of one counter over the `secs` between two readings: 0 for a
/// link not in the last one, and for counters that went back.
fn rate(
    now: &LinkCounters,
    was: Option<&LinkCounters>,
    secs: f64,
    f: fn(&LinkCounters) -> u64,
) -> f64 {
    mbit(f(now).saturating_sub(was.map_or(f(now), f)), secs)
}

fn changes(was: Option<&Counts>, now: &Counts) -> Vec<(String, u64, u64)> {
    now.iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| {
            let before = was.and_then(|w| w.get(k)).copied().unwrap_or(*n);
            (k.clone(), *n, n.saturating_sub(before))
        })
        .collect()
}

impl Frame {
    /// The view of `now`, with rates over the `secs` since `was`.
    pub fn between(was: &Reading, now: &Reading, secs: f64) -> Frame {
        let mut rows = Vec::new();
        let mut drops = Vec::new();
        let mut notes = now.trouble.clone();
        let title;
        match (&now.links, &now.status) {
            (Some(Links::Terminal(t)), status) => {
                let before = match &was.links {
                    Some(Links::Terminal(w)) => Some(w),
                    _ => None,
                };
                let status = match status {
                    Some(Status::Terminal(s)) => Some(s),
                    _ => None,
                };
                let peers = match &now.peers {
                    Some(Peers::Terminal { peers }) => peers.as_slice(),
                    _ => &[],
                };
                title = match status {
                    Some(s) => format!(
                        "terminal {} ({}): community {}, {}, {} peer link(s), up {}s",
                        s.address,
                        s.instance,
                        s.community,
                        if s.logged_on {
                            format!("logged on to {}", s.server)
                        } else {
                            "not logged on".into()
                        },
                        s.peers,
                        s.uptime_s
                    ),
                    None => format!(
                        "terminal: the agent does not answer ({})",
                        if t.logged_on {
                            "the datapath holds a session"
                        } else {
                            "no session"
                        }
                    ),
                };
                for l in &t.links {
                    let w = before.and_then(|b| b.links.iter().find(|x| x.link == l.link));
                    let d = |f| rate(&l.counters, w.map(|w| &w.counters), secs, f);
                    let own = status.and_then(|s| s.links.iter().find(|o| o.link == l.link));
                    let peer = peers.iter().find(|p| p.link == l.link);
                    let path = status.and_then(|s| s.paths.iter().find(|p| p.link == l.link));
                    rows.push(Row {
                        community: None,
                        link: l.link,
                        host: peer.map_or_else(|| "-".into(), |p| p.address.to_string()),
                        up: d(|c| c.up_bytes),
                        down: d(|c| c.down_bytes),
                        relay: own.map(|_| d(|c| c.relay_up_bytes) + d(|c| c.relay_down_bytes)),
                        weight_up: peer.map(|p| p.up),
                        weight_down: peer.map(|p| p.down),
                        rtt_ms: own.and_then(|o| o.rtt_ms),
                        extra_ms: path.map(|p| p.delay_us as f64 / 1e3),
                        missed: peer.map(|p| p.missed),
                        state: match (own, peer, l.active) {
                            (Some(o), _, _) if o.dark => "dark",
                            (Some(_), _, true) => "own",
                            (_, Some(p), true) if p.in_use => "in use",
                            (_, _, true) => "listed",
                            (_, _, false) => "unused",
                        },
                    });
                }
                drops = changes(before.map(|b| &b.drops), &t.drops);
                if let Some(p) = status.and_then(|s| s.playout.as_ref()) {
                    notes.push(format!(
                        "playout: {} packets, {} reordered, {} lost, {} resent",
                        p.packets, p.reordered, p.lost, p.resent
                    ));
                }
            }
            (Some(Links::Server(s)), status) => {
                let before = match &was.links {
                    Some(Links::Server(w)) => Some(w),
                    _ => None,
                };
                let status = match status {
                    Some(Status::Server(s)) => Some(s),
                    _ => None,
                };
                let terminals = match &now.peers {
                    Some(Peers::Server { terminals }) => terminals.as_slice(),
                    _ => &[],
                };
                title = match status {
                    Some(st) => format!(
                        "server {} ({}): {} communit{}, {} flows, {} free ports, up {}s",
                        st.address,
                        st.instance,
                        st.communities.len(),
                        if st.communities.len() == 1 {
                            "y"
                        } else {
                            "ies"
                        },
                        st.flows,
                        st.free_ports,
                        st.uptime_s
                    ),
                    None => "server: the agent does not answer".into(),
                };
                for l in &s.links {
                    let w = before.and_then(|b| {
                        b.links
                            .iter()
                            .find(|x| (x.community, x.link) == (l.community, l.link))
                    });
                    let d = |f| rate(&l.counters, w.map(|w| &w.counters), secs, f);
                    let row = terminals
                        .iter()
                        .filter(|t| t.community == l.community)
                        .flat_map(|t| t.links.iter())
                        .find(|r| r.link == l.link);
                    let path = status
                        .and_then(|st| st.communities.iter().find(|c| c.id == l.community))
                        .and_then(|c| c.paths.iter().find(|p| p.link == Some(l.link)));
                    rows.push(Row {
                        community: Some(l.community),
                        link: l.link,
                        host: l.address.to_string(),
                        up: d(|c| c.up_bytes),
                        down: d(|c| c.down_bytes),
                        relay: None,
                        weight_up: None,
                        weight_down: row.map(|r| r.down),
                        rtt_ms: None,
                        extra_ms: path.map(|p| (p.delay_us + p.extra_us) as f64 / 1e3),
                        missed: row.map(|r| r.missed),
                        state: match path {
                            Some(p) if p.usable => "in use",
                            Some(_) => "dark",
                            None => "listed",
                        },
                    });
                }
                drops = changes(before.map(|b| &b.drops), &s.drops);
                if let Some(st) = status {
                    let per: Vec<String> = st
                        .communities
                        .iter()
                        .map(|c| format!("{}: {} flows, {} terminals", c.id, c.flows, c.terminals))
                        .collect();
                    if !per.is_empty() {
                        notes.push(format!("communities {}", per.join("; ")));
                    }
                }
            }
            (None, _) => title = "no bond instance here".into(),
        }
        Frame {
            title,
            rows,
            drops,
            notes,
        }
    }
}

/// Smaller than this, the view says so instead of a table cut to pieces.
const MIN_WIDTH: u16 = 60;
const MIN_HEIGHT: u16 = 8;

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn draw(screen: &mut Screen<'_>, f: &Frame, interval: Duration) {
    let area = screen.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        screen.render_widget(
            Paragraph::new(format!(
                "bond-ctl top: the window is {}x{}; it needs {MIN_WIDTH}x{MIN_HEIGHT} (q quits)",
                area.width, area.height
            )),
            area,
        );
        return;
    }
    let drops_height = (f.drops.len().max(1) + f.notes.len()) as u16 + 2;
    let [title, table, drops, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(drops_height),
        Constraint::Length(1),
    ])
    .areas(area);
    screen.render_widget(
        Paragraph::new(f.title.as_str()).style(Style::new().add_modifier(Modifier::BOLD)),
        title,
    );
    // The server's rows say their community first.
    let server = f.rows.iter().any(|r| r.community.is_some());
    let skip = usize::from(!server);
    let header = TableRow::new(
        [
            "comm",
            "link",
            if server { "address" } else { "host" },
            "up Mbit/s",
            "down Mbit/s",
            "relay",
            "weight up/down kbit/s",
            "rtt ms",
            "+delay ms",
            "missed",
            "state",
        ]
        .into_iter()
        .skip(skip),
    )
    .style(Style::new().add_modifier(Modifier::REVERSED));
    let rows = f.rows.iter().map(|r| {
        let ms = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        TableRow::new(
            [
                opt(r.community),
                r.link.to_string(),
                r.host.clone(),
                format!("{:.1}", r.up),
                format!("{:.1}", r.down),
                ms(r.relay),
                format!("{}/{}", opt(r.weight_up), opt(r.weight_down)),
                ms(r.rtt_ms),
                ms(r.extra_ms),
                opt(r.missed),
                r.state.to_string(),
            ]
            .into_iter()
            .skip(skip),
        )
    });
    let widths = [
        Constraint::Length(5),
        Constraint::Length(4),
        Constraint::Min(12),
        Constraint::Length(9),
        Constraint::Length(11),
        Constraint::Length(6),
        Constraint::Length(21),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(7),
    ];
    let widths = &widths[skip..];
    screen.render_widget(Table::new(rows, widths).header(header), table);
    let mut lines: Vec<Line> = if f.drops.is_empty() {
        vec![Line::from("no drops")]
    } else {
        f.drops
            .iter()
            .map(|(k, n, d)| Line::from(format!("{k:<24} {n:>12} total {d:>8} last interval")))
            .collect()
    };
    lines.extend(f.notes.iter().map(|n| Line::from(n.as_str())));
    screen.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" drops ")),
        drops,
    );
    screen.render_widget(
        Paragraph::new(format!(
            "every {:.1} s; q or Esc quits",
            interval.as_secs_f64()
        )),
        help,
    );
}

/// The counters and when they were read, then what the agent says.
fn read(maps: &Maps, ask: &dyn Fn(Request) -> Result<Value>) -> (Reading, Instant) {
    let mut r = Reading::default();
    match crate::show::links_report(maps) {
        Ok(l) => r.links = Some(l),
        Err(e) => r.trouble.push(format!("counters: {e:#}")),
    }
    let at = Instant::now();
    match ask(Request::Status).and_then(|v| Ok(serde_json::from_value(v)?)) {
        Ok(s) => r.status = Some(s),
        Err(e) => r.trouble.push(format!("agent: {e:#}")),
    }
    r.peers = ask(Request::Peers)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok());
    (r, at)
}

/// Runs until q, Esc or Ctrl-C; the terminal is given back as it was
/// (also on a panic: ratatui's hook restores it first).
pub fn run(maps: &Maps, ask: &dyn Fn(Request) -> Result<Value>, interval: Duration) -> Result<()> {
    let mut terminal = ratatui::init();
    let result = (|| -> Result<()> {
        let (mut was, mut at) = read(maps, ask);
        let mut frame = Frame::between(&was, &was, 0.0);
        loop {
            terminal.draw(|s| draw(s, &frame, interval))?;
            let due = at + interval;
            while let Some(left) = due.checked_duration_since(Instant::now()) {
                if event::poll(left)? {
                    if let Event::Key(k) = event::read()? {
                        let ctrl_c = k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL);
                        if k.kind == KeyEventKind::Press
                            && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                        {
                            return Ok(());
                        }
                    }
                    // A resize or another key: draw again at once.
                    terminal.draw(|s| draw(s, &frame, interval))?;
                }
            }
            let (now, now_at) = read(maps, ask);
            frame = Frame::between(&was, &now, (now_at - at).as_secs_f64());
            (was, at) = (now, now_at);
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bond_api::reply::{LinkCounters, PeerRow, TerminalLinkCounters, TerminalLinks};

    use super::*;

    fn terminal(bytes: &[(u8, u64, u64)], drops: &[(&str, u64)]) -> Reading {
        Reading {
            links: Some(Links::Terminal(TerminalLinks {
                logged_on: true,
                links: bytes
                    .iter()
                    .map(|&(link, up, down)| TerminalLinkCounters {
                        link,
                        active: link != 3,
                        counters: LinkCounters {
                            up_bytes: up,
                            down_bytes: down,
                            ..Default::default()
                        },
                    })
                    .collect(),
                drops: drops.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })),
            status: None,
            peers: Some(Peers::Terminal {
                peers: vec![PeerRow {
                    address: Ipv4Addr::new(10, 0, 1, 2),
                    link: 2,
                    port: 7701,
                    missed: 1,
                    up: 20_000,
                    down: 30_000,
                    own: false,
                    in_use: true,
                }],
            }),
            trouble: vec!["agent: not answering".into()],
        }
    }

    #[test]
    fn rates_are_the_bytes_between_two_readings_over_the_time_between() {
        let was = terminal(&[(1, 1_000, 0), (2, 0, 5_000_000)], &[("no_link", 4)]);
        let now = terminal(
            &[(1, 2_501_000, 0), (2, 0, 10_000_000), (3, 7, 7)],
            &[("no_link", 6), ("bad_len", 0)],
        );
        let f = Frame::between(&was, &now, 2.0);
        let row = |l: u8| f.rows.iter().find(|r| r.link == l).unwrap();
        assert_eq!(row(1).up, 10.0); // 2.5 MB in 2 s
        assert_eq!(row(1).down, 0.0);
        assert_eq!(row(2).down, 20.0);
        assert_eq!(
            (row(2).host.as_str(), row(2).weight_up, row(2).weight_down),
            ("10.0.1.2", Some(20_000), Some(30_000))
        );
        assert_eq!((row(2).missed, row(2).state), (Some(1), "in use"));
        // A link not in the last reading starts from nothing moving.
        assert_eq!((row(3).up, row(3).state), (0.0, "unused"));
        // Only reasons that happened, with what happened since.
        assert_eq!(f.drops, vec![("no_link".to_string(), 6, 2)]);
        assert!(f.title.contains("does not answer"), "{}", f.title);
        assert_eq!(f.notes, vec!["agent: not answering".to_string()]);
    }

    #[test]
    fn counters_that_went_back_show_no_negative_rate() {
        // An agent that started anew (counters from zero) in between.
        let was = terminal(&[(1, 9_000_000, 9_000_000)], &[]);
        let now = terminal(&[(1, 1_000, 1_000)], &[]);
        let f = Frame::between(&was, &now, 1.0);
        assert_eq!((f.rows[0].up, f.rows[0].down), (0.0, 0.0));
        // The first frame (no time between) shows no rate at all.
        let f = Frame::between(&now, &now, 0.0);
        assert_eq!(f.rows[0].up, 0.0);
    }

    #[test]
    fn the_servers_rows_are_each_communitys_links() {
        use bond_api::reply::{LinkRow, ServerLinkCounters, ServerLinks, TerminalRow};
        let server = |bytes: u64, drops: u64| Reading {
            links: Some(Links::Server(ServerLinks {
                links: [(1, 1), (1, 2), (2, 1)]
                    .into_iter()
                    .map(|(community, link)| ServerLinkCounters {
                        community,
                        link,
                        address: "198.51.100.7:7701".parse().unwrap(),
                        counters: LinkCounters {
                            up_bytes: bytes * u64::from(community),
                            down_bytes: bytes * u64::from(link),
                            ..Default::default()
                        },
                    })
                    .collect(),
                drops: [("denied".to_string(), drops)].into(),
                events: Default::default(),
            })),
            status: None,
            peers: Some(Peers::Server {
                terminals: vec![TerminalRow {
                    community: 2,
                    address: Ipv4Addr::new(10, 0, 2, 1),
                    missed: 0,
                    links: vec![LinkRow {
                        link: 1,
                        address: "198.51.100.7:7701".parse().unwrap(),
                        down: 5_000,
                        missed: 2,
                    }],
                }],
            }),
            trouble: Vec::new(),
        };
        let f = Frame::between(&server(0, 1), &server(1_000_000, 3), 1.0);
        let row = |c: u32, l: u8| {
            f.rows
                .iter()
                .find(|r| (r.community, r.link) == (Some(c), l))
                .unwrap()
        };
        assert_eq!((row(1, 1).up, row(1, 1).down), (8.0, 8.0));
        assert_eq!((row(1, 2).up, row(1, 2).down), (8.0, 16.0));
        assert_eq!((row(2, 1).up, row(2, 1).down), (16.0, 8.0));
        // The weight and missed announces of community 2's link 1, not
        // community 1's (the same link id).
        assert_eq!(
            (row(2, 1).weight_down, row(2, 1).missed),
            (Some(5_000), Some(2))
        );
        assert_eq!((row(1, 1).weight_down, row(1, 1).missed), (None, None));
        assert_eq!(f.drops, vec![("denied".to_string(), 3, 2)]);
    }
}
