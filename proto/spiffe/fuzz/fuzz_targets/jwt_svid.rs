//! JWT-SVID validation on arbitrary tokens: never panics; nothing validates unless it was
//! signed by the bundle's key (which the fuzzer cannot do), so every input must be refused.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use ring::rand::SystemRandom;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt;
use tessera_spiffe::keys::{KeyType, SigningKey};

fn bundle() -> &'static Bundle {
    static BUNDLE: OnceLock<Bundle> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).expect("key generation");
        let mut bundle = Bundle::new(TrustDomain::new("example.org").expect("trust domain"));
        bundle.add_jwt_authority("fuzz-key", key.public_key().clone()).expect("authority");
        bundle
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let result = jwt::validate(token, bundle(), &["svc"], now);
    assert!(result.is_err(), "an unsigned token validated: {token:?}");
});
