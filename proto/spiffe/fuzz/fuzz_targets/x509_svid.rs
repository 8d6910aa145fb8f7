//! X.509-SVID validation and client-side parsing on arbitrary chains: never panics, and no
//! chain the fuzzer makes can verify against a CA whose key it does not have.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::SystemRandom;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::x509::{CaTemplate, X509Svid, split_der_certificates, verify_x509_svid};

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn bundles() -> &'static HashMap<TrustDomain, Vec<Vec<u8>>> {
    static BUNDLES: OnceLock<HashMap<TrustDomain, Vec<Vec<u8>>>> = OnceLock::new();
    BUNDLES.get_or_init(|| {
        let td = TrustDomain::new("example.org").expect("trust domain");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let ca = CaTemplate::new(td.clone(), Duration::from_secs(86_400))
            .expect("template")
            .self_signed(&key, now(), &SystemRandom::new())
            .expect("ca");
        HashMap::from([(td, vec![ca])])
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(chain) = split_der_certificates(data) {
        assert!(verify_x509_svid(&chain, bundles(), now()).is_err(), "a forged chain verified");
    }
    // The first byte splits the rest into a chain and a private key for the client-side parser.
    if let Some((&split, rest)) = data.split_first() {
        let at = usize::from(split).min(rest.len());
        let (chain, key) = rest.split_at(rest.len() - at);
        let _ = X509Svid::parse(chain, key, &SystemRandom::new());
    }
});
