//! The operator interface: a Unix socket per instance
//! (`<run_dir>/<instance>.sock`, mode 0600), one JSON request line in and
//! one JSON reply line out per connection, and an optional Prometheus
//! endpoint serving the same agent's metrics.
//!
//! The agent answers requests in its own event loop (they arrive through a
//! channel), so a reply always reflects one consistent state and nothing is
//! shared between tasks.
//!
//! Replies: `{"ok":true, ...}` or `{"ok":false,"error":"..."}`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot},
};

use bond_config::WeightSpec;

pub mod reply;

/// Where instances put their sockets.
pub const DEFAULT_RUN_DIR: &str = "/run/bond";

pub fn socket_path(run_dir: &Path, instance: &str) -> PathBuf {
    run_dir.join(format!("{instance}.sock"))
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Peers,
    /// Pin a link's weights (or hand them to measurement); `None` leaves a
    /// direction as it is.
    Weight {
        link: u8,
        up: Option<WeightSpec>,
        down: Option<WeightSpec>,
    },
    /// Stop using this host's links, let what is on them finish, then
    /// SHUTDOWN and exit.
    Drain {
        timeout_ms: u64,
    },
    /// Exit leaving the datapath running, for the next agent to adopt
    /// (restart, upgrade). No SHUTDOWN: peers keep using the links.
    Detach,
    /// Prometheus text.
    Metrics,
    /// Read the configuration file again and apply what can change while
    /// running; a file that fails its checks changes nothing.
    Reload,
}

/// A request and where its answer goes.
pub struct Call {
    pub req: Request,
    pub reply: oneshot::Sender<Result<Value, String>>,
}

/// Listens on the instance's socket; requests go to `tx`.
/// A socket file nobody answers on is stale and replaced; one that answers
/// belongs to a running agent, and that is an error.
pub fn serve(path: &Path, tx: mpsc::Sender<Call>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "{} answers: an agent of this instance is running already",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = tokio::io::BufReader::new(r.take(64 * 1024));
                if r.read_line(&mut line).await.is_err() {
                    return;
                }
                let answer = match serde_json::from_str::<Request>(&line) {
                    Ok(req) => forward(&tx, req).await,
                    Err(e) => Err(format!("bad request: {e}")),
                };
                let v = match answer {
                    Ok(Value::Object(mut m)) => {
                        m.insert("ok".into(), json!(true));
                        Value::Object(m)
                    }
                    Ok(other) => json!({"ok": true, "value": other}),
                    Err(e) => json!({"ok": false, "error": e}),
                };
                let _ = w.write_all(format!("{v}\n").as_bytes()).await;
            });
        }
    });
    Ok(())
}

async fn forward(tx: &mpsc::Sender<Call>, req: Request) -> Result<Value, String> {
    let (reply, rx) = oneshot::channel();
    tx.send(Call { req, reply })
        .await
        .map_err(|_| "the agent is stopping".to_string())?;
    rx.await.map_err(|_| "the agent is stopping".to_string())?
}

/// Serves `GET /metrics` (Prometheus text format) on `addr`, asking the
/// agent through `tx` for each scrape.
pub async fn serve_metrics(addr: SocketAddr, tx: mpsc::Sender<Call>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("field `metrics`: listening on {addr}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                // The request line and headers; the body (none) is ignored.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let first = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                let (status, body) = if first.starts_with(b"GET /metrics ") {
                    match forward(&tx, Request::Metrics).await {
                        Ok(v) => ("200 OK", v.as_str().unwrap_or_default().to_string()),
                        Err(e) => ("503 Service Unavailable", e),
                    }
                } else {
                    ("404 Not Found", "see /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Sends one request to an instance and returns its reply (an error if the
/// agent refused it).
pub fn request(path: &Path, req: &Request) -> Result<Value> {
    request_within(path, req, Duration::from_secs(30))
}

/// As [`request`], giving up on an agent that has not answered within
/// `limit` (a live view cannot wait on a stuck agent).
pub fn request_within(path: &Path, req: &Request, limit: Duration) -> Result<Value> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is the agent running? `--instance`?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line)
        .with_context(|| format!("bad reply from the agent: {line:?}"))?;
    if v["ok"] != true {
        bail!("{}", v["error"].as_str().unwrap_or("the agent refused"));
    }
    Ok(v)
}

/// The count of an event that may come once per packet or per request,
/// and whether to log this one: the first, then every 1000th (a flood
/// cannot fill the journal; the count says how many there were).
#[derive(Debug, Default)]
pub struct LogEvery(std::sync::atomic::AtomicU64);

impl LogEvery {
    pub const fn new() -> Self {
        LogEvery(std::sync::atomic::AtomicU64::new(0))
    }

    /// Counts one; `Some(count)` when it is to be logged.
    pub fn count(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (n == 1 || n.is_multiple_of(1000)).then_some(n)
    }
}

/// A community service running beside a terminal's agent (the relay tree,
/// the peer cache): the agent tells it what it learns of the LAN and asks it
/// for its metrics. `bond-ctl` starts them; the agent knows only this.
pub trait Service: Send + Sync {
    /// A LAN peer announced itself; `up_kbps` is its links' summed upstream
    /// rate, if it has links.
    fn saw_peer(&self, _ip: Ipv4Addr, _up_kbps: Option<f64>) {}
    /// Adds the service's families to the agent's metrics.
    fn metrics(&self, _m: &mut Metrics) {}
}

impl<T: Service + ?Sized> Service for std::sync::Arc<T> {
    fn saw_peer(&self, ip: Ipv4Addr, up_kbps: Option<f64>) {
        (**self).saw_peer(ip, up_kbps);
    }
    fn metrics(&self, m: &mut Metrics) {
        (**self).metrics(m);
    }
}

/// Sends `req` to the agent on `path` and reads its reply as `T` (a type of
/// [`reply`]).
pub fn ask<T: serde::de::DeserializeOwned>(path: &Path, req: &Request) -> Result<T> {
    let v = request(path, req)?;
    serde_json::from_value(v).with_context(|| format!("reading the agent's reply to {req:?}"))
}

/// Prometheus text exposition, one family at a time.
#[derive(Default)]
pub struct Metrics {
    out: String,
}

impl Metrics {
    /// Starts a family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        use std::fmt::Write as _;
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, String)], v: impl std::fmt::Display) {
        use std::fmt::Write as _;
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.out, "{name} {v}");
        } else {
            let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_at_its_first_and_every_thousandth() {
        let e = LogEvery::new();
        let logged: Vec<u64> = (0..2500).filter_map(|_| e.count()).collect();
        assert_eq!(logged, vec![1, 1000, 2000]);
    }

    #[test]
    fn requests_have_a_stable_json_form() {
        let r = Request::Weight {
            link: 2,
            up: Some(WeightSpec::Fixed(30)),
            down: Some(WeightSpec::Auto),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"cmd":"weight","link":2,"up":{"fixed":30},"down":"auto"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }

    #[test]
    fn weight_spec_parses_numbers_and_auto() {
        assert_eq!("auto".parse(), Ok(WeightSpec::Auto));
        assert_eq!("40".parse(), Ok(WeightSpec::Fixed(40)));
        assert!("-1".parse::<WeightSpec>().is_err());
        assert!("fast".parse::<WeightSpec>().is_err());
        assert!("99999999999".parse::<WeightSpec>().is_err());
    }

    #[test]
    fn metrics_escape_labels() {
        let mut m = Metrics::default();
        m.family("bond_x", "counter", "x");
        m.sample("bond_x", &[("a", "q\"b".into())], 3);
        m.sample("bond_y", &[], 1);
        assert_eq!(
            m.finish(),
            "# HELP bond_x x\n# TYPE bond_x counter\nbond_x{a=\"q\\\"b\"} 3\nbond_y 1\n"
        );
    }
}
