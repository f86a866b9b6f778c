//! The agent's log: one line per event on stderr, filtered by `RUST_LOG`
//! (default `info`). Under systemd, with stderr going to the journal,
//! each line starts with its syslog priority (`<4>` for a warning), which
//! journald takes as the entry's priority (`journalctl -p warning`), and
//! carries no time of its own (the journal stamps it); elsewhere a line
//! reads `2026-12-04T23:10:00.123456Z  WARN bond_agent::terminal: ...`.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

/// Installs the subscriber. `RUST_LOG` with a bad directive says so and
/// falls back to `info`, rather than losing the log.
pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("bond-ctl: RUST_LOG={spec:?}: {e}; logging at info");
            EnvFilter::new("info")
        }),
        _ => EnvFilter::new("info"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(Line {
            journal: to_journal(),
        })
        .init();
}

/// A panic is logged as an error (one line, with where) before the
/// default report.
pub fn panics_to_log() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {}", info.to_string().replace('\n', " "));
        report(info);
    }));
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM`
/// to that stream's `device:inode`, which stays in the environment of
/// children whose stderr goes elsewhere, so it is compared with fd 2's.
fn to_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| is_stream(&stream, &m))
}

fn is_stream(stream: &str, file: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    stream == format!("{}:{}", file.dev(), file.ino())
}

/// syslog(3) priorities, as sd-daemon(3) prefixes take them.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

struct Line {
    journal: bool,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if self.journal {
            write!(w, "<{}>", priority(meta.level()))?;
        } else {
            SystemTime.format_time(&mut w)?;
            write!(w, " {:>5} ", meta.level())?;
        }
        write!(w, "{}: ", meta.target())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_and_errors_reach_the_journal_at_their_priority() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }

    #[test]
    fn the_journal_is_known_by_its_device_and_inode() {
        let f = tempfile::tempfile().unwrap().metadata().unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert!(is_stream(&format!("{}:{}", f.dev(), f.ino()), &f));
        assert!(!is_stream(&format!("{}:{}", f.dev(), f.ino() + 1), &f));
        assert!(!is_stream("", &f));
    }
}
