//! Bundle decoders on arbitrary bytes: never panic, and whatever decodes re-encodes to a
//! document that decodes to the same bundle.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::{Bundle, decode_bundle_map, encode_bundle_map, parse_pem_certificates, split_der_certificates};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").expect("trust domain");
    if let Ok(bundle) = Bundle::from_json(td.clone(), data) {
        let json = bundle.to_json();
        let again = Bundle::from_json(td.clone(), json.as_bytes()).expect("an encoded bundle decodes");
        assert_eq!(again, bundle);
    }
    let _ = Bundle::from_jwt_jwks(td.clone(), data);
    if let Ok(bundles) = decode_bundle_map(data) {
        let json = encode_bundle_map(&bundles).expect("decoded bundles encode");
        let again = decode_bundle_map(json.as_bytes()).expect("an encoded map decodes");
        assert_eq!(again.len(), bundles.len());
    }
    let _ = parse_pem_certificates(data);
    let _ = split_der_certificates(data);
    let _ = Bundle::from_x509_authorities_pem(td.clone(), data);
    let _ = Bundle::from_x509_authorities_der(td, data);
});
