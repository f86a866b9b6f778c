//! Earliest delivery path first: any links, queue bound, send times and
//! lengths. A pick never panics, names a usable link of the set, counts
//! no queue past the bound, refuses for want of links only when none is
//! usable within the buffer, and a refusal changes nothing.
#![no_main]

use bond_common::edpf::{MAX_PATHS, PATH_USABLE, Paths, Refused};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (Vec<(u32, u32, u32, bool)>, u32, u32, Vec<(u16, u16)>)| {
    let (links, backlog_us, len_field, sends) = input;
    let spec: Vec<(u32, u64, u32)> = links.iter().map(|&(id, k, d, _)| (id, u64::from(k), d)).collect();
    let Ok(mut p) = Paths::from_links(&spec) else {
        assert!(spec.iter().filter(|l| l.1 > 0).count() > MAX_PATHS);
        return;
    };
    p.backlog_us = backlog_us;
    // A corrupt length from the map is clamped, not trusted.
    if len_field as usize > MAX_PATHS {
        p.len = len_field;
    }
    for (i, l) in p.paths.iter_mut().enumerate() {
        if links.get(i).is_some_and(|l| l.3) {
            l.flags = 0;
        }
    }
    let mut now = 0u64;
    for (dt, len) in sends {
        now += u64::from(dt);
        let before = p;
        match p.pick(now, u32::from(len)) {
            Ok(id) => {
                let chosen = before
                    .paths
                    .iter()
                    .take((before.len as usize).min(MAX_PATHS))
                    .position(|x| x.id == id && x.flags & PATH_USABLE != 0);
                let i = chosen.expect("picked a link that is not in the set");
                let x = p.paths[i];
                let cap = now + u64::from(backlog_us) * 1000;
                assert!(x.finish_ns <= cap, "a queue counted past the buffer");
            }
            // No link usable, or none of a delay a buffer can cover.
            Err(Refused::NoLinks) => assert!(before.links().all(|x| {
                x.flags & PATH_USABLE == 0 || u64::from(x.delay_ns) > u64::from(backlog_us) * 1000
            })),
            Err(Refused::Full) => assert_eq!(p, before, "a refusal changed the queues"),
        }
    }
});
