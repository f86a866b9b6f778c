//! Manual pages and shell completions, made from the CLI's own definition
//! so they cannot drift from it.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;

use crate::Cli;

/// The end of `bond-ctl --help` and of bond-ctl(8).
pub const FILES: &str = "\
Files:
  /etc/bond/NAME.toml        the configuration of instance NAME (bond@NAME.service)
  /sys/fs/bpf/bond/NAME/     its pinned maps and programs (kept across a restart)
  /run/bond/NAME.sock        its operator socket (status, peers, weight, drain...)
  /usr/share/doc/bond/examples/   a terminal and a server configuration

Environment:
  RUST_LOG       log filter (default info; e.g. warn, or bond_agent::terminal=debug)
  BOND_BPFFS     as --bpffs
  BOND_RUN_DIR   as --run-dir

Service:
  systemctl enable --now bond@NAME    start instance NAME now and at boot
  systemctl reload bond@NAME          read the configuration again (SIGHUP)
  journalctl -u bond@NAME -p warning  its warnings and errors";

/// Writes bond-ctl(8) and one page per subcommand (bond-ctl-status(8),
/// bond-ctl-weight-set(8), ...) into `dir`; returns their paths.
pub fn pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // `help` is not a page; building names the subcommands' pages
    // bond-ctl-<sub>.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    page(cmd, dir, &mut out)?;
    Ok(out)
}

fn page(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        page(sub.clone(), dir, out)?;
    }
    let man = clap_mangen::Man::new(cmd).section("8").manual("bond");
    let path = man
        .generate_to(dir)
        .with_context(|| format!("writing a page into {}", dir.display()))?;
    out.push(path);
    Ok(())
}

pub fn completions(shell: clap_complete::Shell, to: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "bond-ctl", to);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand, nested ones too, that the CLI shows.
    fn visible(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
        for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = format!("{prefix}-{}", s.get_name());
            visible(s, &name, out);
            out.push(name);
        }
    }

    #[test]
    fn one_page_per_subcommand_in_section_8() {
        let dir = tempfile::tempdir().unwrap();
        let mut got: Vec<String> = pages(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let mut want = vec!["bond-ctl".to_string()];
        visible(&Cli::command(), "bond-ctl", &mut want);
        let mut want: Vec<String> = want.iter().map(|n| format!("{n}.8")).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        for must in [
            "bond-ctl-agent.8",
            "bond-ctl-weight-set.8",
            "bond-ctl-top.8",
        ] {
            assert!(got.iter().any(|g| g == must), "{must} in {got:?}");
        }
        assert!(!got.iter().any(|g| g.contains("-man")), "the hidden one");
        let main = std::fs::read_to_string(dir.path().join("bond-ctl.8")).unwrap();
        assert!(main.contains(".TH bond-ctl 8"), "{main}");
        assert!(main.contains("/etc/bond/NAME.toml"), "the files section");
        // Where the package puts them (bond-ctl/Cargo.toml).
        assert!(main.contains("/usr/share/doc/bond/examples/"), "{main}");
        let deb = include_str!("../Cargo.toml");
        assert!(
            deb.contains("\"usr/share/doc/bond/examples/\""),
            "the package moved them"
        );
        let set = std::fs::read_to_string(dir.path().join("bond-ctl-weight-set.8")).unwrap();
        assert!(set.contains("\\-\\-both"), "{set}");
    }

    #[test]
    fn completions_know_the_subcommands() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let s = String::from_utf8(out).unwrap();
            for word in ["drain", "weight", "completions", "top"] {
                assert!(s.contains(word), "{shell}: {word} missing");
            }
        }
    }
}
