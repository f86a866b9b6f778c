//! Peer-cache referral end to end (issue 7): a community of 7 terminals
//! whose one WAN link (t7's, 10 Mbit/s) leads to a real HTTP origin
//! (python's http.server, whose log proves what it served); t1 is the
//! referral server; every terminal runs the cache and its proxy.
//!
//! Run one at a time (`--test-threads=1`), like the other namespace tests.

mod common;
use common::bond_ctl;

use std::time::{Duration, Instant};

use bond_lab::{Lab, TerminalSpec};

const TERMINALS: usize = 7;
const ORIGIN: &str = "http://203.0.113.2";

/// `extra`: more `[cache]` lines for a terminal; `env`: for one agent;
/// `www`: files to serve, (name, MiB).
fn lab(extra: &[(usize, &str)], www: &[(&str, usize)]) -> Lab {
    let mut spec = vec![TerminalSpec { links: vec![] }; TERMINALS];
    spec[TERMINALS - 1].links = vec![10];
    let mut lab = Lab::build(&spec, bond_ctl()).expect("build lab");
    lab.cache = true;
    lab.cache_extra = extra.iter().map(|(i, s)| (*i, s.to_string())).collect();
    for (name, mib) in www {
        lab.serve_file(name, *mib).expect("serve file");
    }
    lab.start_agents().expect("start agents");
    lab
}

fn config(lab: &Lab, i: usize) -> String {
    lab.dir
        .join(format!("t{}.toml", i + 1))
        .to_string_lossy()
        .into_owned()
}

/// `bond-ctl fetch URL` on terminal `i`: its report, and the bytes.
fn fetch(lab: &Lab, i: usize, name: &str) -> (serde_json::Value, Vec<u8>) {
    let out = lab.dir.join(format!("t{}-got-{name}", i + 1));
    let _ = std::fs::remove_file(&out);
    let json = lab
        .exec(
            &lab.terminals[i].ns,
            &lab.bond_ctl.to_string_lossy(),
            &[
                "fetch",
                &format!("{ORIGIN}/{name}"),
                "-o",
                out.to_str().unwrap(),
                "--config",
                &config(lab, i),
                "--json",
            ],
        )
        .unwrap_or_else(|e| panic!("t{} fetch {name}: {e:#}", i + 1));
    let r: serde_json::Value = serde_json::from_str(json.trim()).expect("json");
    (r, std::fs::read(&out).expect("fetched file"))
}

fn origin_file(lab: &Lab, name: &str) -> Vec<u8> {
    std::fs::read(lab.dir.join("www").join(name)).unwrap()
}

/// Requests for `path` the origin answered with `status`, from its log.
fn origin_served(lab: &Lab, path: &str, status: u16) -> usize {
    let needle = format!("\"GET {path} HTTP/1.1\" {status}");
    lab.log("http").matches(&needle).count()
}

fn peer(lab: &Lab, i: usize) -> String {
    format!("peer {}:7801", lab.terminals[i].lan_ip)
}

/// `bond-ctl cache table --json` (asked on t1, the referral server).
fn table(lab: &Lab) -> serde_json::Value {
    let out = lab
        .exec(
            &lab.terminals[0].ns,
            &lab.bond_ctl.to_string_lossy(),
            &["cache", "table", "--config", &config(lab, 0), "--json"],
        )
        .expect("cache table");
    serde_json::from_str(out.trim()).expect("json")
}

fn cache_status(lab: &Lab, i: usize) -> serde_json::Value {
    let out = lab
        .exec(
            &lab.terminals[i].ns,
            &lab.bond_ctl.to_string_lossy(),
            &["cache", "status", "--config", &config(lab, i), "--json"],
        )
        .expect("cache status");
    serde_json::from_str(out.trim()).expect("json")
}

/// The table's entry for `name`.
fn entry<'a>(t: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    let url = format!("{ORIGIN}/{name}");
    t["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["object"]["url"] == url.as_str())
}

/// The sources the referral server lists for `name`, best first.
fn sources(t: &serde_json::Value, name: &str) -> Vec<serde_json::Value> {
    entry(t, name)
        .map(|o| o["sources"].as_array().unwrap().clone())
        .unwrap_or_default()
}

fn endpoint(lab: &Lab, i: usize) -> String {
    format!("{}:7801", lab.terminals[i].lan_ip)
}

/// Polls the referral server's table until `ok` holds (clients report
/// after they have stored what they fetched); panics with `what` and the
/// table after 10 s.
fn until_table(lab: &Lab, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let t = table(lab);
        if ok(&t) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{what}: {t:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the referral server lists terminal `i` as holding `name`.
fn wait_listed(lab: &Lab, name: &str, i: usize) {
    until_table(lab, &format!("t{} never listed for {name}", i + 1), |t| {
        sources(t, name)
            .iter()
            .any(|s| s["endpoint"] == endpoint(lab, i).as_str())
    });
}

#[test]
fn a_second_fetch_comes_from_the_first_terminals_cache_through_fetch_curl_and_pip() {
    let lab = lab(&[], &[("map.bin", 2)]);
    let want = origin_file(&lab, "map.bin");

    // t2 is first: the origin, over the community's slow link.
    let (r, got) = fetch(&lab, 1, "map.bin");
    assert_eq!(r["source"], "origin", "{r}");
    assert!(got == want, "t2's copy differs");
    assert_eq!(origin_served(&lab, "/map.bin", 200), 1);
    wait_listed(&lab, "map.bin", 1);

    // t3 next: from t2's cache, found through the referral server; the
    // origin saw nothing more.
    let (r, got) = fetch(&lab, 2, "map.bin");
    assert_eq!(r["source"], peer(&lab, 1).as_str(), "{r}");
    assert_eq!(r["found"], "referral", "{r}");
    assert!(got == want, "t3's copy differs");
    assert_eq!(origin_served(&lab, "/map.bin", 200), 1);
    let t3 = &lab.terminals[2];
    let metrics = lab.ctl(&t3.ns, &t3.instance, &["metrics"]).unwrap();
    assert!(
        metrics.contains("bond_cache_fetches_total{source=\"peer\"} 1\n"),
        "{metrics}"
    );

    // curl through t4's proxy: the same, and the proxy says where from.
    wait_listed(&lab, "map.bin", 2);
    let out = lab.dir.join("t4-curl.bin");
    let headers = lab
        .exec(
            &lab.terminals[3].ns,
            "curl",
            &[
                "-sS",
                "-f",
                "-x",
                "http://127.0.0.1:3128",
                "-D",
                "-",
                "-o",
                out.to_str().unwrap(),
                &format!("{ORIGIN}/map.bin"),
            ],
        )
        .expect("curl through the proxy");
    assert!(std::fs::read(&out).unwrap() == want, "curl's copy differs");
    let source = headers
        .lines()
        .find_map(|l| l.strip_prefix("x-bond-source: "))
        .unwrap_or_else(|| panic!("no source header:\n{headers}"))
        .trim();
    assert!(source.starts_with("peer 10.0.1."), "{headers}");
    assert_eq!(origin_served(&lab, "/map.bin", 200), 1);
    // Through a CONNECT tunnel (as HTTPS goes) the proxy only carries
    // bytes: the origin serves it again.
    let out = lab.dir.join("t4-tunnel.bin");
    lab.exec(
        &lab.terminals[3].ns,
        "curl",
        &[
            "-sS",
            "-f",
            "--proxytunnel",
            "-x",
            "http://127.0.0.1:3128",
            "-o",
            out.to_str().unwrap(),
            &format!("{ORIGIN}/map.bin"),
        ],
    )
    .expect("curl through a CONNECT tunnel");
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the tunnel's copy differs"
    );
    assert_eq!(origin_served(&lab, "/map.bin", 200), 2);

    // pip on t5, then t6, from a simple index on the origin, through
    // their proxies: the wheel leaves the origin once.
    let wheel = make_index(&lab);
    for i in [4, 5] {
        let target = lab.dir.join(format!("t{}-site", i + 1));
        let out = lab
            .cmd(&lab.terminals[i].ns, "python3")
            .args([
                "-m",
                "pip",
                "install",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--index-url",
                &format!("{ORIGIN}/simple/"),
                "--trusted-host",
                "203.0.113.2",
                "--proxy",
                "http://127.0.0.1:3128",
                "--target",
                target.to_str().unwrap(),
                "bondtest",
            ])
            .output()
            .expect("pip");
        assert!(
            out.status.success(),
            "pip on t{}: {}\n{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let module = std::fs::read_to_string(target.join("bondtest.py")).expect("installed");
        assert!(module.contains("bonded"), "{module}");
        if i == 4 {
            wait_listed(&lab, &format!("simple/bondtest/{wheel}"), 4);
        }
    }
    assert_eq!(
        origin_served(&lab, &format!("/simple/bondtest/{wheel}"), 200),
        1,
        "{}",
        lab.log("http")
    );
    let s = cache_status(&lab, 5);
    assert!(s["from_peers"].as_u64().unwrap() >= 1, "{s}");
}

/// A one-module wheel and a PEP 503 index for it under www/simple; the
/// wheel's file name.
fn make_index(lab: &Lab) -> String {
    let dir = lab.dir.join("www/simple/bondtest");
    std::fs::create_dir_all(&dir).unwrap();
    let name = "bondtest-1.0-py3-none-any.whl";
    let script = format!(
        r#"
import zipfile, hashlib, base64
files = {{
    "bondtest.py": "WHAT = 'bonded'\n",
    "bondtest-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: bondtest\nVersion: 1.0\n",
    "bondtest-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: bond\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}}
record = []
with zipfile.ZipFile("{dir}/{name}", "w") as z:
    for path, text in files.items():
        data = text.encode()
        z.writestr(path, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
    record.append("bondtest-1.0.dist-info/RECORD,,")
    z.writestr("bondtest-1.0.dist-info/RECORD", "\n".join(record) + "\n")
open("{dir}/index.html", "w").write('<html><body><a href="{name}">{name}</a></body></html>\n')
"#,
        dir = dir.display()
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    name.to_string()
}

/// Terminal `i` holds `name` (fetched from the origin), listed.
fn seed(lab: &Lab, i: usize, name: &str) {
    let (r, _) = fetch(lab, i, name);
    assert_eq!(r["source"], "origin", "{r}");
    wait_listed(lab, name, i);
}

#[test]
fn slow_busy_and_corrupt_peers_are_passed_over_and_the_lan_answers_without_the_referral_server() {
    let mut lab = lab(
        &[(3, "max_uploads = 1")],
        &[("a.bin", 2), ("b.bin", 1), ("c.bin", 1), ("d.bin", 1)],
    );
    // A slow peer: t3 sends at 4 Mbit/s, the others at LAN speed.
    lab.limit_upload(2, 4).unwrap();

    // a.bin on t2 and t3; t5 probes both, takes t2, and the referral
    // server, told t3's speed, demotes it.
    seed(&lab, 1, "a.bin");
    let (r, _) = fetch(&lab, 2, "a.bin");
    assert_eq!(r["source"], peer(&lab, 1).as_str(), "{r}");
    wait_listed(&lab, "a.bin", 2);
    let (r, got) = fetch(&lab, 4, "a.bin");
    assert_eq!(r["source"], peer(&lab, 1).as_str(), "{r}");
    assert!(got == origin_file(&lab, "a.bin"));
    // The slow peer, demoted, is listed last (once t5's report is in).
    until_table(&lab, "t3 not demoted", |t| {
        let s = sources(t, "a.bin");
        let last = s.last().cloned().unwrap_or_default();
        s.len() >= 3 && last["endpoint"] == endpoint(&lab, 2).as_str() && last["demoted"] == true
    });

    // b.bin only on t4, which takes one upload at a time: with that one
    // taken, t6 is refused by it and goes to the origin.
    seed(&lab, 3, "b.bin");
    let hash = t_hash(&table(&lab), "b.bin");
    // The hog asks for it and never reads: with a 4 KiB receive buffer
    // the upload cannot finish, and holds t4's one slot.
    let hog = format!(
        "import socket, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\n\
         s.connect(('{}', 7801))\n\
         s.sendall(b'GET /cache/obj/{hash} HTTP/1.1\\r\\nHost: t4\\r\\n\\r\\n')\n\
         time.sleep(600)\n",
        lab.terminals[3].lan_ip
    );
    lab.spawn(
        &lab.terminals[6].ns.clone(),
        "hog",
        "python3",
        &["-c", &hog],
    )
    .unwrap();
    let start = Instant::now();
    while cache_status(&lab, 3)["load"]["uploads"] != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the hog never took the slot: {}\n{}",
            cache_status(&lab, 3),
            lab.log("hog")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (r, got) = fetch(&lab, 5, "b.bin");
    assert_eq!(r["source"], "origin", "{r}");
    assert!(got == origin_file(&lab, "b.bin"));
    assert_eq!(origin_served(&lab, "/b.bin", 200), 2);
    let load = &cache_status(&lab, 3)["load"];
    assert!(load["refused"].as_u64().unwrap() >= 1, "{load}");
    lab.stop("hog", true).unwrap();

    // c.bin only on t6, whose copy then rots on its disk (one byte, in
    // the middle): t6 serves bad bytes, t7 catches it, gets a good copy
    // from the origin, and the referral server drops t6 as a holder and
    // demotes it.
    seed(&lab, 5, "c.bin");
    let stored = lab
        .cache_dir(5)
        .join("objects")
        .join(t_hash(&table(&lab), "c.bin"));
    flip_middle_byte(&stored);
    let (r, got) = fetch(&lab, 6, "c.bin");
    assert_eq!(r["source"], "origin", "{r}");
    assert!(
        got == origin_file(&lab, "c.bin"),
        "the bad copy got through"
    );
    assert_eq!(cache_status(&lab, 6)["corrupt_caught"], 1);
    until_table(&lab, "t6 not reported", |t| {
        let bad = t["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["endpoint"] == endpoint(&lab, 5).as_str())
            .cloned();
        let listed = sources(t, "c.bin")
            .iter()
            .any(|s| s["endpoint"] == endpoint(&lab, 5).as_str());
        bad.is_some_and(|b| b["strikes"] == 1) && !listed
    });

    // The referral server stops answering (frozen, not gone): t5 waits
    // its referral_wait_ms, asks the LAN, and gets d.bin from t2.
    seed(&lab, 1, "d.bin");
    lab.signal("agent-t1", libc::SIGSTOP).unwrap();
    let (r, got) = fetch(&lab, 4, "d.bin");
    assert_eq!(r["found"], "lan", "{r}");
    assert_eq!(r["source"], peer(&lab, 1).as_str(), "{r}");
    assert!(got == origin_file(&lab, "d.bin"));
    assert_eq!(origin_served(&lab, "/d.bin", 200), 1);
    assert!(cache_status(&lab, 4)["lan_queries"].as_u64().unwrap() >= 1);
    lab.signal("agent-t1", libc::SIGCONT).unwrap();
}

fn t_hash(t: &serde_json::Value, name: &str) -> String {
    entry(t, name)
        .and_then(|o| o["object"]["hash"].as_str())
        .unwrap_or_else(|| panic!("{name} not in {t:#}"))
        .to_string()
}

/// Flips one byte in the middle of the file at `path`, in place.
fn flip_middle_byte(path: &std::path::Path) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0xff], at).unwrap();
}
