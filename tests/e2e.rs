//! Whole flows through real kernels: a community in namespaces, real
//! agents, real clients (curl, iperf3, ping).
//!
//! Run one at a time (`--test-threads=1`): they share two CPU cores and
//! measure rates.

use std::path::Path;

use bond_ctl::lab::{Lab, TerminalSpec};
use sha2::{Digest, Sha256};

fn bond_ctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bond-ctl"))
}

fn sha256(path: &Path) -> String {
    let data = std::fs::read(path).expect("read file");
    format!("{:x}", Sha256::digest(&data))
}

/// Figure 1: t1 with a 10 Mbit/s link, t2 with 20 and 30, t3 with none.
fn figure1() -> Lab {
    let spec = [
        TerminalSpec { links: vec![10] },
        TerminalSpec {
            links: vec![20, 30],
        },
        TerminalSpec { links: vec![] },
    ];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.start_agents().expect("start agents");
    lab
}

#[test]
fn http_download_from_origin_without_wan_link() {
    let mut lab = figure1();
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    Lab::make_file(&www.join("20m.bin"), 20).unwrap();
    lab.start_http(&www).unwrap();
    let t3 = lab.terminals[2].ns.clone();
    let (bytes, secs, out) = lab
        .download(&t3, "http://203.0.113.2/20m.bin", "t3-20m.bin")
        .expect("download");
    assert_eq!(bytes, 20 << 20);
    assert_eq!(
        sha256(&out),
        sha256(&www.join("20m.bin")),
        "downloaded file differs"
    );
    let mbit = bytes as f64 * 8.0 / secs / 1e6;
    eprintln!("20 MiB over bond from t3: {secs:.2} s, {mbit:.1} Mbit/s");
    let flows = lab.flows_json().unwrap();
    let f = flows["flows"].as_array().unwrap();
    assert!(
        f.iter()
            .any(|f| f["origin"] == "10.0.1.3" && f["proto"] == "tcp"),
        "{flows}"
    );
}
