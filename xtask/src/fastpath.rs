//! `cargo xtask bench fastpath` (being written).

use anyhow::{Result, bail};

/// Runs the suite; returns its markdown table.
pub fn run(_quick: bool) -> Result<String> {
    bail!("the fastpath suite is not written yet")
}
