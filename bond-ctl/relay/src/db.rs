//! The network information database (the seed's): every terminal's
//! distribution endpoint, measured response time and throughput,
//! transfer history and failures. SQLite, one file in the agent's state
//! directory; the agent writes what announces say, `bond-ctl distribute`
//! what transfers measure.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

/// Weight of a new sample in the running averages.
const ALPHA: f64 = 0.3;
/// How long serving a corrupt chunk counts against a terminal.
const CORRUPT_MEMORY_MS: i64 = 24 * 3600 * 1000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS terminals (
    id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL DEFAULT '',
    link_kbps REAL,
    throughput_kbps REAL,
    response_ms REAL,
    last_seen_ms INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    root TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    mode TEXT NOT NULL,
    fanout INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS outcomes (
    transfer INTEGER NOT NULL REFERENCES transfers(id),
    terminal TEXT NOT NULL,
    status TEXT NOT NULL,
    ms INTEGER,
    source TEXT,
    why TEXT,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (transfer, terminal)
);
CREATE TABLE IF NOT EXISTS corrupt (
    transfer INTEGER NOT NULL,
    relay TEXT NOT NULL,
    by TEXT NOT NULL,
    chunk INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
PRAGMA user_version = 1;
";

/// A terminal's outcome in one transfer.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Done { ms: u64, source: String },
    Failed { why: String },
}

/// `bond-ctl terminals --json`: the database's terminals, fastest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Terminals {
    pub terminals: Vec<TerminalRow>,
}

/// A terminal, as `bond-ctl terminals` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TerminalRow {
    /// 1-based position, fastest first.
    pub rank: u32,
    pub id: String,
    pub endpoint: String,
    /// Sum of its links' announced upstream rates.
    pub link_kbps: Option<f64>,
    /// Measured in transfers (running average).
    pub throughput_kbps: Option<f64>,
    /// Transport request to acknowledgement (running average).
    pub response_ms: Option<f64>,
    pub transfers_done: u64,
    pub transfers_failed: u64,
    pub corrupt_served: u64,
    /// Why its latest outcome failed, if it did.
    pub last_failure: Option<String>,
    pub last_seen_ms: i64,
}

pub struct NetDb {
    conn: Connection,
}

impl NetDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        Self::init(conn).with_context(|| format!("database {}", path.display()))
    }

    pub fn open_in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    fn ensure(&self, id: &str) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO terminals (id) VALUES (?1)",
            params![id],
        )?;
        Ok(())
    }

    /// A terminal announced itself: where its service listens, and its
    /// links' upstream rates if known.
    pub fn saw_terminal(
        &mut self,
        id: &str,
        endpoint: SocketAddr,
        link_kbps: Option<f64>,
        now_ms: i64,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO terminals (id, endpoint, link_kbps, last_seen_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET endpoint = ?2, link_kbps = ?3, last_seen_ms = ?4",
            params![id, endpoint.to_string(), link_kbps, now_ms],
        )?;
        Ok(())
    }

    fn average(&mut self, column: &str, id: &str, sample: f64) -> Result<()> {
        self.ensure(id)?;
        let sql = format!(
            "UPDATE terminals SET {column} = CASE WHEN {column} IS NULL THEN ?2
             ELSE {column} * (1 - ?3) + ?2 * ?3 END WHERE id = ?1"
        );
        self.conn.execute(&sql, params![id, sample, ALPHA])?;
        Ok(())
    }

    /// A transport request was acknowledged after `ms`.
    pub fn record_response(&mut self, id: &str, ms: f64, _now_ms: i64) -> Result<()> {
        self.average("response_ms", id, ms)
    }

    /// A terminal received a file at `kbps`.
    pub fn record_throughput(&mut self, id: &str, kbps: f64, _now_ms: i64) -> Result<()> {
        self.average("throughput_kbps", id, kbps)
    }

    pub fn start_transfer(
        &mut self,
        root_hex: &str,
        name: &str,
        size: u64,
        mode: &str,
        fanout: u32,
        now_ms: i64,
    ) -> Result<i64> {
        self.conn.execute(
            "INSERT INTO transfers (root, name, size, mode, fanout, started_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![root_hex, name, size as i64, mode, fanout, now_ms],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// A target's outcome in a transfer; the last report wins.
    pub fn target_outcome(
        &mut self,
        transfer: i64,
        id: &str,
        outcome: &Outcome,
        now_ms: i64,
    ) -> Result<()> {
        self.ensure(id)?;
        let (status, ms, source, why) = match outcome {
            Outcome::Done { ms, source } => ("done", Some(*ms as i64), Some(source.as_str()), None),
            Outcome::Failed { why } => ("failed", None, None, Some(why.as_str())),
        };
        self.conn.execute(
            "INSERT OR REPLACE INTO outcomes (transfer, terminal, status, ms, source, why, at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![transfer, id, status, ms, source, why, now_ms],
        )?;
        Ok(())
    }

    /// `relay` served chunk `chunk` that did not verify at `by`.
    pub fn report_corrupt(
        &mut self,
        transfer: i64,
        relay: &str,
        by: &str,
        chunk: u32,
        now_ms: i64,
    ) -> Result<()> {
        self.ensure(relay)?;
        self.conn.execute(
            "INSERT INTO corrupt (transfer, relay, by, chunk, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![transfer, relay, by, chunk, now_ms],
        )?;
        Ok(())
    }

    pub fn finish_transfer(&mut self, transfer: i64, now_ms: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE transfers SET finished_ms = ?2 WHERE id = ?1",
            params![transfer, now_ms],
        )?;
        Ok(())
    }

    /// Every terminal, fastest first: those whose latest outcome failed or
    /// that served a corrupt chunk lately go last; then by throughput
    /// (measured, else announced; unknown last), response time (unknown
    /// last) and id.
    pub fn ranked(&self) -> Result<Vec<TerminalRow>> {
        let since = now_ms_for_ranking() - CORRUPT_MEMORY_MS;
        let mut st = self.conn.prepare(
            "SELECT t.id, t.endpoint, t.link_kbps, t.throughput_kbps, t.response_ms, t.last_seen_ms,
               (SELECT COUNT(*) FROM outcomes o WHERE o.terminal = t.id AND o.status = 'done'),
               (SELECT COUNT(*) FROM outcomes o WHERE o.terminal = t.id AND o.status = 'failed'),
               (SELECT COUNT(*) FROM corrupt c WHERE c.relay = t.id),
               (SELECT o.why FROM outcomes o WHERE o.terminal = t.id
                  ORDER BY o.at_ms DESC, o.transfer DESC LIMIT 1),
               (SELECT COUNT(*) FROM corrupt c WHERE c.relay = t.id AND c.at_ms >= ?1)
             FROM terminals t",
        )?;
        let mut rows: Vec<(bool, TerminalRow)> = st
            .query_map(params![since], |r| {
                let last_failure: Option<String> = r.get(9)?;
                let recent_corrupt: i64 = r.get(10)?;
                Ok((
                    last_failure.is_some() || recent_corrupt > 0,
                    TerminalRow {
                        rank: 0,
                        id: r.get(0)?,
                        endpoint: r.get(1)?,
                        link_kbps: r.get(2)?,
                        throughput_kbps: r.get(3)?,
                        response_ms: r.get(4)?,
                        last_seen_ms: r.get(5)?,
                        transfers_done: r.get::<_, i64>(6)? as u64,
                        transfers_failed: r.get::<_, i64>(7)? as u64,
                        corrupt_served: r.get::<_, i64>(8)? as u64,
                        last_failure,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let speed = |t: &TerminalRow| t.throughput_kbps.or(t.link_kbps);
        rows.sort_by(|(bad_a, a), (bad_b, b)| {
            bad_a
                .cmp(bad_b)
                .then_with(|| cmp_desc_unknown_last(speed(a), speed(b)))
                .then_with(|| cmp_asc_unknown_last(a.response_ms, b.response_ms))
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, (_, mut t))| {
                t.rank = i as u32 + 1;
                t
            })
            .collect())
    }

    pub fn terminal(&self, id: &str) -> Result<Option<TerminalRow>> {
        Ok(self.ranked()?.into_iter().find(|t| t.id == id))
    }

    /// Targets whose latest outcome for the file `root_hex` is a failure:
    /// the next transfer of it retries them.
    pub fn failed_for(&self, root_hex: &str) -> Result<Vec<String>> {
        let mut st = self.conn.prepare(
            "SELECT o.terminal, o.status FROM outcomes o JOIN transfers x ON x.id = o.transfer
             WHERE x.root = ?1 ORDER BY o.at_ms, o.transfer",
        )?;
        let mut last: std::collections::BTreeMap<String, String> = Default::default();
        for row in st.query_map(params![root_hex], |r| Ok((r.get(0)?, r.get(1)?)))? {
            let (id, status): (String, String) = row?;
            last.insert(id, status);
        }
        Ok(last
            .into_iter()
            .filter(|(_, s)| s == "failed")
            .map(|(id, _)| id)
            .collect())
    }

    /// The status of `id` in `transfer`, if reported.
    pub fn outcome_status(&self, transfer: i64, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT status FROM outcomes WHERE transfer = ?1 AND terminal = ?2",
                params![transfer, id],
                |r| r.get(0),
            )
            .optional()?)
    }
}

fn now_ms_for_ranking() -> i64 {
    bond_proto::now_ms() as i64
}

fn cmp_desc_unknown_last(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(a), Some(b)) => b.total_cmp(&a),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

fn cmp_asc_unknown_last(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(&b),
        _ => cmp_desc_unknown_last(a, b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 1, i], 7800))
    }

    fn ids(db: &NetDb) -> Vec<String> {
        db.ranked().unwrap().into_iter().map(|t| t.id).collect()
    }

    #[test]
    fn averages_and_ranking() {
        let mut db = NetDb::open_in_memory().unwrap();
        for i in 1..=4 {
            db.saw_terminal(&format!("t{i}"), ep(i), None, 1).unwrap();
        }
        // Nothing known: by id.
        assert_eq!(ids(&db), ["t1", "t2", "t3", "t4"]);
        // Announced rates rank; unknown after known.
        db.saw_terminal("t3", ep(3), Some(5000.0), 2).unwrap();
        db.saw_terminal("t4", ep(4), Some(1000.0), 2).unwrap();
        assert_eq!(ids(&db), ["t3", "t4", "t1", "t2"]);
        // A measurement beats an announce.
        db.record_throughput("t1", 100.0, 3).unwrap();
        db.record_throughput("t1", 200.0, 3).unwrap();
        let t1 = db.terminal("t1").unwrap().unwrap();
        assert!((t1.throughput_kbps.unwrap() - 130.0).abs() < 1e-9);
        db.record_throughput("t2", 9000.0, 3).unwrap();
        assert_eq!(ids(&db), ["t2", "t3", "t4", "t1"]);
        // Equal speed: the quicker to respond first.
        db.record_throughput("t4", 5000.0, 3).unwrap();
        db.record_response("t4", 3.0, 3).unwrap();
        db.record_response("t3", 9.0, 3).unwrap();
        assert_eq!(ids(&db), ["t2", "t4", "t3", "t1"]);
        assert_eq!(db.terminal("t4").unwrap().unwrap().rank, 2);
    }

    #[test]
    fn outcomes_last_report_wins_and_failures_rank_last_until_they_recover() {
        let mut db = NetDb::open_in_memory().unwrap();
        db.saw_terminal("a", ep(1), Some(9000.0), 1).unwrap();
        db.saw_terminal("b", ep(2), Some(10.0), 1).unwrap();
        let x = db.start_transfer("r00t", "f", 10, "tree", 3, 1).unwrap();
        let failed = Outcome::Failed {
            why: "unreachable".into(),
        };
        db.target_outcome(x, "a", &failed, 2).unwrap();
        assert_eq!(ids(&db), ["b", "a"]);
        assert_eq!(db.failed_for("r00t").unwrap(), ["a"]);
        let a = db.terminal("a").unwrap().unwrap();
        assert_eq!(a.last_failure.as_deref(), Some("unreachable"));
        let done = Outcome::Done {
            ms: 5,
            source: "10.0.1.9:7800".into(),
        };
        db.target_outcome(x, "a", &done, 3).unwrap();
        assert_eq!(ids(&db), ["a", "b"]);
        assert!(db.failed_for("r00t").unwrap().is_empty());
        let a = db.terminal("a").unwrap().unwrap();
        assert_eq!((a.transfers_done, a.transfers_failed), (1, 0));
        assert_eq!(db.outcome_status(x, "a").unwrap().as_deref(), Some("done"));
        // An outcome for a terminal never seen is kept.
        db.target_outcome(x, "ghost", &failed, 4).unwrap();
        assert_eq!(db.terminal("ghost").unwrap().unwrap().endpoint, "");
        db.finish_transfer(x, 5).unwrap();
    }

    #[test]
    fn a_corrupt_relay_ranks_last() {
        let mut db = NetDb::open_in_memory().unwrap();
        db.saw_terminal("a", ep(1), Some(9000.0), 1).unwrap();
        db.saw_terminal("b", ep(2), Some(10.0), 1).unwrap();
        db.report_corrupt(1, "a", "b", 2, now_ms_for_ranking())
            .unwrap();
        assert_eq!(ids(&db), ["b", "a"]);
        assert_eq!(db.terminal("a").unwrap().unwrap().corrupt_served, 1);
    }

    #[test]
    fn the_file_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/net.db");
        NetDb::open(&path)
            .unwrap()
            .saw_terminal("a", ep(1), None, 1)
            .unwrap();
        let db = NetDb::open(&path).unwrap();
        assert_eq!(ids(&db), ["a"]);
        let v: i64 = db
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
    }
}
