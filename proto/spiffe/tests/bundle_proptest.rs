//! Property tests for bundles: every encoding decodes back to the same bundle, and no decoder
//! panics on arbitrary or mutated input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;
use std::time::Duration;

use proptest::prelude::*;
use ring::rand::SystemRandom;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::{
    Bundle, decode_bundle_map, encode_bundle_map, parse_pem_certificates, split_der_certificates,
};
use tessera_spiffe::keys::{KeyType, PublicKey, SigningKey};

struct Pool {
    certificates: Vec<Vec<u8>>,
    keys: Vec<PublicKey>,
}

/// A pool of CA certificates and public keys of every supported type, made once (RSA
/// generation is slow in debug builds); strategies pick from it.
static POOL: LazyLock<Pool> = LazyLock::new(|| {
    let rng = SystemRandom::new();
    let signing_keys: Vec<SigningKey> = [KeyType::EcP256, KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048]
        .into_iter()
        .map(|key_type| SigningKey::generate(key_type, &rng).unwrap())
        .collect();
    let certificates = signing_keys
        .iter()
        .map(|key| {
            let key_pair = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key_pair).unwrap().der().to_vec()
        })
        .collect();
    let keys = signing_keys.iter().map(|key| key.public_key().clone()).collect();
    Pool { certificates, keys }
});

fn trust_domain() -> impl Strategy<Value = TrustDomain> {
    "[a-z0-9][a-z0-9_-]{0,9}(\\.[a-z0-9-]{1,10}){0,2}".prop_map(|name| TrustDomain::new(&name).unwrap())
}

fn bundle_in(trust_domain: TrustDomain) -> impl Strategy<Value = Bundle> {
    let pool = &*POOL;
    (
        proptest::sample::subsequence((0..pool.certificates.len()).collect::<Vec<_>>(), 0..=pool.certificates.len())
            .prop_shuffle(),
        proptest::collection::vec(("[A-Za-z0-9_.:+/=-]{1,24}", 0..pool.keys.len()), 0..6),
        any::<u64>(),
        proptest::option::of(1u64..=u64::from(u32::MAX)),
    )
        .prop_map(move |(certificates, jwt, sequence, hint)| {
            let mut bundle = Bundle::new(trust_domain.clone());
            for index in certificates {
                bundle.add_x509_authority(&pool.certificates[index]).unwrap();
            }
            for (kid, index) in jwt {
                // Later duplicates of a kid with another key are skipped.
                let _ = bundle.add_jwt_authority(kid, pool.keys[index].clone());
            }
            bundle.set_sequence(sequence);
            bundle.set_refresh_hint(hint.map(Duration::from_secs));
            bundle
        })
}

fn bundle() -> impl Strategy<Value = Bundle> {
    trust_domain().prop_flat_map(bundle_in)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn spiffe_json_round_trips(bundle in bundle()) {
        let decoded = Bundle::from_json(bundle.trust_domain().clone(), bundle.to_json().as_bytes())
            .unwrap();
        prop_assert_eq!(decoded, bundle);
    }

    #[test]
    fn jwks_round_trips_jwt_authorities(bundle in bundle()) {
        let decoded =
            Bundle::from_jwt_jwks(bundle.trust_domain().clone(), bundle.to_jwt_jwks().as_bytes())
                .unwrap();
        prop_assert_eq!(decoded.jwt_authorities(), bundle.jwt_authorities());
        prop_assert_eq!(decoded.x509_authorities().count(), 0);
    }

    #[test]
    fn pem_and_der_round_trip_x509_authorities(bundle in bundle()) {
        let td = bundle.trust_domain().clone();
        let from_pem =
            Bundle::from_x509_authorities_pem(td.clone(), bundle.x509_authorities_pem().as_bytes())
                .unwrap();
        prop_assert!(from_pem.x509_authorities().eq(bundle.x509_authorities()));
        let from_der = Bundle::from_x509_authorities_der(td, &bundle.x509_authorities_der()).unwrap();
        prop_assert!(from_der.x509_authorities().eq(bundle.x509_authorities()));
    }

    #[test]
    fn bundle_maps_round_trip(bundles in proptest::collection::btree_map(trust_domain(), any::<()>(), 0..4)
        .prop_flat_map(|tds| tds.into_keys().map(bundle_in).collect::<Vec<_>>()))
    {
        let map = encode_bundle_map(&bundles).unwrap();
        let decoded = decode_bundle_map(map.as_bytes()).unwrap();
        // Mapped bundles carry no refresh hint.
        let expected: Vec<Bundle> = bundles
            .into_iter()
            .map(|mut bundle| {
                bundle.set_refresh_hint(None);
                bundle
            })
            .collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let td = TrustDomain::new("example.org").unwrap();
        let _ = Bundle::from_json(td.clone(), &bytes);
        let _ = Bundle::from_jwt_jwks(td.clone(), &bytes);
        let _ = decode_bundle_map(&bytes);
        let _ = split_der_certificates(&bytes);
        let _ = parse_pem_certificates(&bytes);
        let _ = Bundle::from_x509_authorities_der(td.clone(), &bytes);
        let _ = Bundle::from_x509_authorities_pem(td, &bytes);
        let _ = PublicKey::from_spki_der(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_json_like_text(text in r#"[{}\[\]",:0-9a-z_ -]{0,200}"#) {
        let td = TrustDomain::new("example.org").unwrap();
        let _ = Bundle::from_json(td.clone(), text.as_bytes());
        let _ = Bundle::from_jwt_jwks(td, text.as_bytes());
        let _ = decode_bundle_map(text.as_bytes());
    }

    #[test]
    fn decoders_never_panic_on_mutated_bundles(
        bundle in bundle(),
        mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut json = bundle.to_json().into_bytes();
        let mut der = bundle.x509_authorities_der();
        for (index, byte) in mutations {
            let at = index.index(json.len());
            json[at] = byte;
            if !der.is_empty() {
                let at = index.index(der.len());
                der[at] ^= byte;
            }
        }
        let td = bundle.trust_domain().clone();
        let _ = Bundle::from_json(td.clone(), &json);
        let _ = Bundle::from_x509_authorities_der(td, &der);
        let _ = split_der_certificates(&der);
    }

    #[test]
    fn truncated_der_never_panics(bundle in bundle(), cut in any::<prop::sample::Index>()) {
        let der = bundle.x509_authorities_der();
        let cut = cut.index(der.len() + 1);
        let result = Bundle::from_x509_authorities_der(bundle.trust_domain().clone(), &der[..cut]);
        // A prefix decodes only when it ends on a certificate boundary, giving a prefix of
        // the authorities.
        if let Ok(decoded) = result {
            let count = decoded.x509_authorities().count();
            prop_assert!(decoded.x509_authorities().eq(bundle.x509_authorities().take(count)));
        }
    }
}
