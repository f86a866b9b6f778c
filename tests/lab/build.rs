//! The bench programs (`BENCH`) come from the objects bond-datapath's build
//! script made; it says where through its `links` metadata.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_BOND_EBPF_OBJECTS");
    let dir = std::env::var("DEP_BOND_EBPF_OBJECTS").unwrap_or_default();
    println!("cargo:rustc-env=BOND_EBPF_OBJECTS={dir}");
    println!("cargo::rustc-check-cfg=cfg(bond_no_ebpf)");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        println!("cargo:rustc-cfg=bond_no_ebpf");
    }
}
