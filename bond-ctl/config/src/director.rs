//! A director's file (`role = "director"`): the front address of an ISP
//! tier, the interfaces its traffic arrives on, and the registry that
//! says which node owns each community.

use super::*;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectorConfig {
    /// Always [`Role::Director`].
    pub role: Role,
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The front address terminals send to; every node holds it too and
    /// answers from it.
    pub address: Ipv4Addr,
    /// The front IPv6 address, for links that have only IPv6.
    pub address6: Option<std::net::Ipv6Addr>,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Interfaces the front address's traffic arrives on (the director's
    /// program is attached to each). The nodes must be on networks this
    /// host is directly attached to: the director forwards by Ethernet
    /// address.
    pub interfaces: Vec<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    pub metrics: Option<std::net::SocketAddr>,
    /// How the program is attached (`[attach]`, optional; `xdp` only).
    #[serde(default)]
    pub attach: AttachConfig,
    /// etcd's client URLs, `http://host:port`: any member will do.
    pub etcd: Vec<String>,
    /// etcd's user for this director, where etcd's authentication is on
    /// (with `etcd_password_file`).
    pub etcd_user: Option<String>,
    /// The file whose first line is that user's password (mode 0600).
    pub etcd_password_file: Option<PathBuf>,
    /// Where the registry lives in etcd's key space.
    #[serde(default = "default_registry_prefix")]
    pub prefix: String,
    /// A node that stops answering health checks for this long is fenced
    /// (its lease revoked: its communities move at once). Probes go out
    /// every third of it. 0 turns the checks off: a dead node's
    /// communities then move when its lease runs out.
    #[serde(default = "default_health_timeout_ms")]
    pub health_timeout_ms: u32,
}

fn default_registry_prefix() -> String {
    "/bond".into()
}
fn default_health_timeout_ms() -> u32 {
    300
}

impl DirectorConfig {
    pub(crate) fn check(&self) -> Check {
        check_instance(&self.instance)?;
        check_port("port", self.port)?;
        if self.attach.tc != TcAttach::Auto {
            return err(
                "attach.tc",
                "the director has no TC program (only `attach.xdp` applies)",
            );
        }
        if self.interfaces.is_empty() {
            return err("interfaces", "list the interfaces to attach to");
        }
        for (i, n) in self.interfaces.iter().enumerate() {
            check_ifname(&format!("interfaces[{i}]"), n)?;
        }
        check_etcd("etcd", &self.etcd)?;
        check_etcd_user(
            "",
            self.etcd_user.as_deref(),
            self.etcd_password_file.is_some(),
        )?;
        check_prefix("prefix", &self.prefix)?;
        if self.health_timeout_ms != 0 && !(100..=60_000).contains(&self.health_timeout_ms) {
            return err(
                "health_timeout_ms",
                format!(
                    "{} is outside 100..=60000 (0 turns health checks off)",
                    self.health_timeout_ms
                ),
            );
        }
        Ok(())
    }
}

/// etcd's client URLs: `http://host:port`, at least one.
pub(crate) fn check_etcd(field: &str, urls: &[String]) -> Check {
    if urls.is_empty() {
        return err(field, "list etcd's client URLs (http://host:port)");
    }
    for (i, url) in urls.iter().enumerate() {
        let Some(rest) = url.strip_prefix("http://") else {
            return err(
                format!("{field}[{i}]"),
                format!("{url:?} is not http://host:port (TLS is not built in)"),
            );
        };
        let port = rest.trim_end_matches('/').rsplit_once(':').map(|(_, p)| p);
        if port
            .and_then(|p| p.parse::<u16>().ok())
            .is_none_or(|p| p == 0)
        {
            return err(
                format!("{field}[{i}]"),
                format!("{url:?} names no port (etcd's clients use 2379)"),
            );
        }
    }
    Ok(())
}

/// `etcd_user` and `etcd_password_file` (fields under `table`, "" or
/// "tier."): both or neither, a user name with no spaces.
pub(crate) fn check_etcd_user(table: &str, user: Option<&str>, file: bool) -> Check {
    match user {
        None if file => err(
            format!("{table}etcd_password_file"),
            "without etcd_user: name the user it is the password of",
        ),
        None => Ok(()),
        Some(_) if !file => err(
            format!("{table}etcd_user"),
            "without etcd_password_file: name the file holding its password",
        ),
        Some(u) if u.is_empty() || u.chars().any(|c| c.is_whitespace() || c.is_control()) => err(
            format!("{table}etcd_user"),
            format!("{u:?}: a user name with no spaces"),
        ),
        Some(_) => Ok(()),
    }
}

/// etcd's user and its password (the first line of `password_file`),
/// where etcd's authentication is on: read when an agent or command
/// starts. The error names the file (the caller, the field).
pub fn etcd_login(
    user: Option<&str>,
    password_file: Option<&Path>,
) -> Result<Option<(String, String)>, String> {
    let (Some(user), Some(path)) = (user, password_file) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let password = text.lines().next().unwrap_or("");
    if password.is_empty() {
        return Err(format!("{}: its first line is empty", path.display()));
    }
    Ok(Some((user.to_string(), password.to_string())))
}

/// A key prefix such as `/bond`.
pub(crate) fn check_prefix(field: &str, prefix: &str) -> Check {
    if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
        return err(field, format!("{prefix:?}: a key prefix such as \"/bond\""));
    }
    Ok(())
}
