//! `cargo xtask package`: the Debian package, then what an operator's
//! machine would make of it: its contents, its dependencies, an install
//! into a scratch root and the binary run from there, the unit as systemd
//! reads it, each manual page as man renders it, each completion script
//! loaded by its shell.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, ensure};

/// What must be in the package beside the manual pages.
const CONTENTS: &[&str] = &[
    "usr/bin/bond-ctl",
    "usr/lib/systemd/system/bond@.service",
    "usr/share/doc/bond/examples/terminal.toml",
    "usr/share/doc/bond/examples/server.toml",
    "usr/share/doc/bond/examples/node.toml",
    "usr/share/doc/bond/examples/director.toml",
    "usr/share/doc/bond/grafana/bond.json",
    "usr/share/doc/bond/README.md",
    "usr/share/bash-completion/completions/bond-ctl",
    "usr/share/zsh/vendor-completions/_bond-ctl",
    "usr/share/fish/vendor_completions.d/bond-ctl.fish",
];

/// The only packages bond may need beyond the kernel: the C library and
/// the unwinder every Rust binary links.
const RUNTIME: &[&str] = &["libc6", "libgcc-s1"];

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the package and checks it; its path.
pub fn run() -> Result<PathBuf> {
    crate::sh(Command::new("cargo").args(["build", "--release", "-p", "bond-ctl"]))?;
    let bin = Path::new("target/release/bond-ctl").canonicalize()?;
    // Generated assets under target/release/, where cargo-deb looks for
    // built files; the package in target/package/.
    let assets = PathBuf::from("target/release/deb-assets");
    let out = PathBuf::from("target/package");
    for d in [&assets, &out] {
        if d.exists() {
            std::fs::remove_dir_all(d)?;
        }
    }
    // Manual pages and completions, from the binary's own definition.
    let pages: Vec<String> = output(Command::new(&bin).arg("man").arg(assets.join("man")))?
        .lines()
        .map(str::to_owned)
        .collect();
    ensure!(pages.len() > 10, "only {} manual pages", pages.len());
    for p in &pages {
        crate::sh(Command::new("gzip").args(["-9n", p]))?;
    }
    std::fs::create_dir_all(assets.join("completions"))?;
    for (shell, file) in [
        ("bash", "bond-ctl"),
        ("zsh", "_bond-ctl"),
        ("fish", "bond-ctl.fish"),
    ] {
        let script = output(Command::new(&bin).args(["completions", shell]))?;
        std::fs::write(assets.join("completions").join(file), script)?;
    }
    crate::sh(
        Command::new("cargo")
            .args(["deb", "-p", "bond-ctl", "--no-build", "--output"])
            .arg(&out),
    )?;
    let deb = std::fs::read_dir(&out)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb left no .deb in target/package")?
        .canonicalize()?;
    let names: Vec<String> = pages
        .iter()
        .map(|p| {
            let name = Path::new(p).file_name().unwrap_or_default();
            format!("usr/share/man/man8/{}.gz", name.to_string_lossy())
        })
        .collect();
    check(&deb, &names)?;
    println!("{}", deb.display());
    Ok(deb)
}

fn check(deb: &Path, pages: &[String]) -> Result<()> {
    // Contents.
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|f| f.trim_start_matches("./"))
        .collect();
    for want in CONTENTS
        .iter()
        .copied()
        .chain(pages.iter().map(String::as_str))
    {
        ensure!(
            files.contains(&want),
            "{want} is not in the package:\n{listing}"
        );
    }
    eprintln!(
        "package: {} files, {} manual pages",
        files.len(),
        pages.len()
    );
    // Dependencies: nothing beyond the C library.
    let depends = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(deb)
            .arg("Depends"),
    )?;
    for dep in depends
        .split(',')
        .map(|d| d.trim())
        .filter(|d| !d.is_empty())
    {
        let name = dep.split_whitespace().next().unwrap_or(dep);
        ensure!(
            RUNTIME.contains(&name),
            "the package depends on {dep}: only {RUNTIME:?} expected"
        );
    }
    eprintln!("package: depends on {}", depends.trim());

    // Installed into a scratch root: an empty dpkg database, the
    // maintainer scripts run outside it (they see DPKG_ROOT and leave the
    // host's systemd alone), the C library the host's.
    let root = std::env::temp_dir().join(format!("bond-package-root-{}", std::process::id()));
    let _cleanup = Remove(root.clone());
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "")?;
    output(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-depends",
                "--force-script-chrootless",
                "--log=/dev/null",
                "-i",
            ])
            .arg(deb),
    )?;
    let etc = std::fs::metadata(root.join("etc/bond")).context("postinst made no /etc/bond")?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = etc.permissions().mode() & 0o777;
        ensure!(mode == 0o750, "/etc/bond is {mode:o}, not 750");
    }
    let installed = root.join("usr/bin/bond-ctl");
    let version = output(Command::new(&installed).arg("--version"))?;
    ensure!(
        version.trim() == format!("bond-ctl {}", env!("CARGO_PKG_VERSION")),
        "`bond-ctl --version` from the scratch root said {version:?}"
    );
    eprintln!(
        "package: installed into {}: {}",
        root.display(),
        version.trim()
    );
    for example in ["terminal", "server", "node", "director"] {
        let cfg = root.join(format!("usr/share/doc/bond/examples/{example}.toml"));
        output(
            Command::new(&installed)
                .arg("check")
                .arg("--config")
                .arg(&cfg),
        )
        .with_context(|| format!("the {example} example"))?;
    }

    // The unit, as systemd would load it (an instance of the template),
    // with the installed binary and manual pages: the one change is the
    // binary's path, into the scratch root.
    let units = root.join("units");
    std::fs::create_dir_all(&units)?;
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/bond@.service"))?;
    std::fs::write(
        units.join("bond@.service"),
        unit.replace("/usr/bin/bond-ctl", &installed.to_string_lossy()),
    )?;
    let instance = units.join("bond@example.service");
    let man_path = root.join("usr/share/man");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .env("MANPATH", &man_path)
        .output()
        .context("running systemd-analyze (apt install systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    // An unknown key is only a warning to systemd: a failure here.
    ensure!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        verify.status
    );
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&instance),
    )?;
    eprintln!(
        "package: systemd-analyze verify accepts bond@.service; {}",
        security
            .lines()
            .find(|l| l.contains("Overall exposure"))
            .map_or("no exposure level", |l| l.trim_start_matches('→').trim())
    );

    // Each page as man renders it.
    for page in pages {
        let path = root.join(page);
        let text = output(
            Command::new("man")
                .args(["--warnings", "-l"])
                .arg(&path)
                .env("MANWIDTH", "80")
                .env("MANPAGER", "cat"),
        )?;
        let cmd = Path::new(page)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_end_matches(".8.gz")
            .to_string();
        ensure!(
            text.contains("NAME") && text.contains(&cmd),
            "{page} renders without its name:\n{text}"
        );
    }
    eprintln!("package: man renders {} pages", pages.len());

    // Each completion script, loaded by its shell, completes a subcommand.
    let share = root.join("usr/share");
    let bash = share.join("bash-completion/completions/bond-ctl");
    let said = output(Command::new("bash").arg("-c").arg(format!(
        "source {} && f=$(complete -p bond-ctl | sed -E 's/.*-F ([^ ]+).*/\\1/') && \
         COMP_WORDS=(bond-ctl dr) COMP_CWORD=1 COMP_LINE='bond-ctl dr' COMP_POINT=11 && \
         $f bond-ctl dr bond-ctl && echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    )))?;
    ensure!(
        said.split_whitespace().any(|w| w == "drain"),
        "bash completes `bond-ctl dr` as {said:?}"
    );
    let zsh = share.join("zsh/vendor-completions");
    output(Command::new("zsh").args(["-f", "-c"]).arg(format!(
        "fpath=({} $fpath) && autoload -U compinit && compinit -u -D && \
         autoload -U _bond-ctl && (( $+functions[_bond-ctl] )) && \
         [[ $_comps[bond-ctl] == _bond-ctl ]]",
        zsh.display()
    )))
    .context("zsh does not take _bond-ctl as bond-ctl's completion")?;
    let fish = share.join("fish/vendor_completions.d/bond-ctl.fish");
    let said = output(Command::new("fish").arg("-c").arg(format!(
        "source {} && complete -C 'bond-ctl dr'",
        fish.display()
    )))?;
    ensure!(
        said.lines().any(|l| l.starts_with("drain")),
        "fish completes `bond-ctl dr` as {said:?}"
    );
    eprintln!("package: bash, zsh and fish load their completions");
    Ok(())
}

/// Removes a directory when dropped (on every path out of `check`).
struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("package: removing {}: {e}", self.0.display());
        }
    }
}
