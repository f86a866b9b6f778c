//! `cargo xtask bench scale` (being written).

use anyhow::{Result, bail};

/// Runs the suite; returns its markdown table.
pub fn run(_quick: bool) -> Result<String> {
    bail!("the scale suite is not written yet")
}
