//! The weighted round-robin builder: any weights give a schedule whose
//! slots are links with a non-zero weight, each of which appears, or
//! TooManyLinks.
#![no_main]

use bond_common::{
    maps::{MAX_SLOTS, Schedule},
    sched::build,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|links: Vec<(u16, u32)>| {
    let mut s = Schedule::EMPTY;
    let live: Vec<u16> = links.iter().filter(|l| l.1 > 0).map(|l| l.0).collect();
    match build(&links, &mut s) {
        Ok(()) => {
            let len = s.len as usize;
            assert!(len <= MAX_SLOTS);
            assert_eq!(len == 0, live.is_empty());
            for slot in &s.slots[..len] {
                assert!(live.contains(slot), "slot {slot} is not a live link");
            }
            for id in &live {
                assert!(s.slots[..len].contains(id), "link {id} has no slot");
            }
        }
        Err(_) => assert!(live.len() > MAX_SLOTS),
    }
});
