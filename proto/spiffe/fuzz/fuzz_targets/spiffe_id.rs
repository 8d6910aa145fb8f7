//! SPIFFE ID, trust domain and selector parsers on arbitrary bytes: never panic, and whatever
//! parses is kept byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = SpiffeId::parse_bytes(data) {
        assert_eq!(id.as_str().as_bytes(), data);
        let reparsed = SpiffeId::parse(id.as_str()).expect("an accepted ID re-parses");
        assert_eq!(reparsed, id);
        assert!(id.trust_domain_name().len() <= 255);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = TrustDomain::new(s);
        if let Ok(sel) = Selector::parse(s) {
            assert_eq!(sel.to_string(), s);
        }
    }
});
