//! Each BPF program on crafted packets through BPF_PROG_TEST_RUN.
mod common;

#[test]
fn loads() {
    let t = common::PinDir::new("load");
    let mut ebpf = bond_ctl::datapath::load(bond_ctl::ebpf::TERMINAL, t.path()).unwrap();
    let p: &mut aya::programs::Xdp = ebpf
        .program_mut("bond_terminal")
        .unwrap()
        .try_into()
        .unwrap();
    p.load().unwrap();
    let p: &mut aya::programs::SchedClassifier =
        ebpf.program_mut("bond_wrap").unwrap().try_into().unwrap();
    p.load().unwrap();
    let s = common::PinDir::new("loads");
    let mut ebpf = bond_ctl::datapath::load(bond_ctl::ebpf::SERVER, s.path()).unwrap();
    let p: &mut aya::programs::Xdp = ebpf.program_mut("bond_server").unwrap().try_into().unwrap();
    p.load().unwrap();
}
