//! `bond-delay`: a lab link's delay line (delay, jitter, loss, black hole),
//! for the namespace labs of the tests, demo and benchmarks. Not part of a
//! deployment. See `bond_lab::line`.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    bond_lab::line::main_with_args(&args)
}
