//! `cargo xtask ARGS`: sets the machine up, then runs `xtask ARGS`
//! (`cargo xtask setup` stops after the first step).

use std::{os::unix::process::CommandExt as _, process::Command};

fn main() -> anyhow::Result<()> {
    xtask_setup::setup()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("setup") {
        eprintln!("xtask: set up");
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let err = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--"])
        .args(&args)
        .exec();
    Err(anyhow::anyhow!("running xtask: {err}"))
}
