//! The bond header parser (shared by the programs and the agent): any
//! bytes either fail with a reason or give a header that validates and
//! writes back exactly the bytes it was read from.
#![no_main]

use bond_common::wire::BondHdr;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match BondHdr::parse(data) {
        Ok(h) => {
            assert!(h.validate().is_ok());
            let mut out = [0u8; BondHdr::LEN];
            assert_eq!(h.emit(&mut out), Ok(BondHdr::LEN));
            assert_eq!(&out[..], &data[..BondHdr::LEN]);
        }
        Err(_) => assert!(
            data.len() < BondHdr::LEN
                || BondHdr::from_bytes(data[..BondHdr::LEN].try_into().unwrap())
                    .validate()
                    .is_err()
        ),
    }
});
