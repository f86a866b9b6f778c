use which::which;

/// Builds depend on bpf-linker; rebuild when it changes (aya-template does
/// the same), and fail with a hint when it is missing.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => {
            panic!("bpf-linker not found: run `cargo xtask setup` (installs bpf-linker 0.10.2)")
        }
    }
}
