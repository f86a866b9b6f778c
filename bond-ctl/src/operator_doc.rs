//! docs/operator.md against the reply types: every JSON example there is
//! read back through the type `bond-ctl` prints or reads for its section
//! and must come out the same. A field the page shows that the type lacks,
//! or one the type has that the page leaves out, fails; so does a type no
//! example shows.

use std::collections::BTreeSet;

use bond_api::reply::{Detached, Draining, Flows, Links, Peers, Status, WeightSet};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

const PAGE: &str = include_str!("../../docs/operator.md");

/// `text` without `// comments` (outside strings), as the page annotates
/// its examples.
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            in_str = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_str = true;
        } else if c == '/' && chars.peek() == Some(&'/') {
            while chars.peek().is_some_and(|&c| c != '\n') {
                chars.next();
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Each JSON example with the heading it is under: the ```json blocks,
/// and the inline replies (`{"ok":true,...}`) of the prose.
fn examples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut lines = PAGE.lines();
    let mut prose = String::new();
    let flush = |heading: &str, prose: &mut String, out: &mut Vec<(String, Value)>| {
        for span in prose.split('`').skip(1).step_by(2) {
            if span.starts_with("{\"ok\":true") {
                let v = serde_json::from_str(&span.replace('\n', " "))
                    .unwrap_or_else(|e| panic!("under {heading}: `{span}`: {e}"));
                out.push((heading.to_string(), v));
            }
        }
        prose.clear();
    };
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("## ") {
            flush(&heading, &mut prose, &mut out);
            heading = h.to_string();
        } else if line == "```json" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            let text = strip_comments(&block.join("\n"));
            let v = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the example under {heading}: {e}\n{text}"));
            out.push((heading.clone(), v));
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    flush(&heading, &mut prose, &mut out);
    out
}

/// Reads `v` as a `T` and writes it back: it must not change.
fn round_trip<T: Serialize + DeserializeOwned>(heading: &str, mut v: Value) -> &'static str {
    let name = std::any::type_name::<T>();
    if let Some(m) = v.as_object_mut() {
        m.remove("ok");
    }
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("the example under {heading} is no {name}: {e}"));
    let back = serde_json::to_value(&t).expect("serialize");
    assert_eq!(back, v, "the example under {heading} and {name} differ");
    name
}

#[test]
fn every_example_reads_back_through_its_type_unchanged() {
    let (mut seen, mut roles) = (BTreeSet::new(), BTreeSet::new());
    for (heading, v) in examples() {
        let has = |k: &str| v.get(k).is_some();
        if let Some(role) = v.get("role").and_then(Value::as_str) {
            roles.insert(format!("{heading} {role}"));
        }
        let ty = match heading.as_str() {
            h if h.starts_with("`status") => round_trip::<Status>(h, v),
            h if h.starts_with("`peers") => round_trip::<Peers>(h, v),
            h if h.starts_with("`links") && has("flows") => round_trip::<Flows>(h, v),
            h if h.starts_with("`links") => round_trip::<Links>(h, v),
            h if h.starts_with("`weight") && has("detached") => round_trip::<Detached>(h, v),
            h if h.starts_with("`weight") && has("draining") => round_trip::<Draining>(h, v),
            h if h.starts_with("`weight") => round_trip::<WeightSet>(h, v),
            h if h.starts_with("`terminals") => round_trip::<bond_relay::db::Terminals>(h, v),
            h if h.starts_with("`distribute") => {
                round_trip::<bond_relay::main_server::FinalReport>(h, v)
            }
            h if h.starts_with("`fetch") => round_trip::<bond_cache::fetch::FetchReport>(h, v),
            h if h.starts_with("`cache status") => round_trip::<bond_cache::Status>(h, v),
            h if h.starts_with("`cache table") => round_trip::<bond_cache::TableReport>(h, v),
            h if h.starts_with("`tier") && has("nodes") => {
                round_trip::<bond_tier::admin::Nodes>(h, v)
            }
            h if h.starts_with("`tier") && has("terminal_keys") => {
                round_trip::<bond_tier::admin::Terminals>(h, v)
            }
            h if h.starts_with("`tier") => round_trip::<bond_tier::admin::Communities>(h, v),
            h if h.starts_with("`nat who") => round_trip::<bond_agent::nat::WhoReport>(h, v),
            h => panic!("a JSON example under {h}, which names no reply"),
        };
        seen.insert(ty);
    }
    use std::any::type_name;
    let want = [
        type_name::<Status>(),
        type_name::<Peers>(),
        type_name::<Links>(),
        type_name::<Flows>(),
        type_name::<WeightSet>(),
        type_name::<Draining>(),
        type_name::<Detached>(),
        type_name::<bond_relay::db::Terminals>(),
        type_name::<bond_relay::main_server::FinalReport>(),
        type_name::<bond_cache::fetch::FetchReport>(),
        type_name::<bond_cache::Status>(),
        type_name::<bond_cache::TableReport>(),
        type_name::<bond_tier::admin::Nodes>(),
        type_name::<bond_tier::admin::Communities>(),
        type_name::<bond_tier::admin::Terminals>(),
        type_name::<bond_agent::nat::WhoReport>(),
    ];
    for ty in want {
        assert!(seen.contains(ty), "docs/operator.md shows no {ty}");
    }
    for role in [
        "`status --json` terminal",
        "`status --json` server",
        "`links --json`, `flows --json` terminal",
        "`links --json`, `flows --json` server",
    ] {
        assert!(roles.contains(role), "docs/operator.md shows no {role}");
    }
}

#[test]
fn comments_go_but_not_inside_strings() {
    assert_eq!(
        strip_comments("{\"u\": \"http://x/\\\"//\", // note\n\"n\": 1}"),
        "{\"u\": \"http://x/\\\"//\", \n\"n\": 1}"
    );
}
