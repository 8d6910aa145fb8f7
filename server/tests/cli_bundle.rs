//! `tessera-server bundle show|list|set|delete`: the real binary against a real
//! `tessera-server run` child process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::time::{Duration, SystemTime};

use cli_support::{ServerProcess, fails, json, ok};
use ring::rand::SystemRandom;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::{Bundle, encode_pem_certificates, parse_pem_certificates};
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::x509::CaTemplate;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

/// A self-signed CA certificate (DER) of another trust domain.
fn foreign_ca(trust_domain: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    CaTemplate::new(td(trust_domain), Duration::from_secs(3600))
        .unwrap()
        .self_signed(&key, SystemTime::now(), &SystemRandom::new())
        .unwrap()
}

#[test]
fn own_bundle_in_both_formats() {
    let server = ServerProcess::start();

    let pem = ok(server.cli(&["bundle", "show"]));
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"), "only the PEM, so it can be redirected: {pem}");
    let roots = parse_pem_certificates(pem.as_bytes()).unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(ok(server.cli(&["bundle", "show", "--format", "pem"])), pem);

    let spiffe = ok(server.cli(&["bundle", "show", "--format", "spiffe"]));
    let bundle = Bundle::from_json(td("example.org"), spiffe.as_bytes()).unwrap();
    assert_eq!(bundle.x509_authorities().collect::<Vec<_>>(), [roots[0].as_slice()]);
    assert_eq!(bundle.jwt_authorities().len(), 1, "the JWT signing key is published");
    assert!(bundle.sequence() >= 1);

    let shown = json(server.cli(&["bundle", "show", "--format", "spiffe", "--output", "json"]));
    assert_eq!(shown["trust_domain"], "spiffe://example.org");
    assert_eq!(shown["format"], "spiffe");
    assert_eq!(shown["sequence"], bundle.sequence());
    assert_eq!(shown["bundle"], spiffe.as_str());
}

#[test]
fn federated_bundles_set_list_and_delete() {
    let server = ServerProcess::start();
    let dir = server.dir.path();
    assert_eq!(ok(server.cli(&["bundle", "list"])), "Found 0 federated bundles\n");

    // PEM file.
    let other_ca = foreign_ca("other.org");
    let other_pem = encode_pem_certificates([other_ca.as_slice()]);
    let pem_path = dir.join("other.pem");
    std::fs::write(&pem_path, &other_pem).unwrap();
    let set = ok(server.cli(&["bundle", "set", "--id", "spiffe://other.org", "--path", pem_path.to_str().unwrap()]));
    assert_eq!(set, "Set bundle of spiffe://other.org (sequence 1): 1 X.509 authority, 0 JWT authorities\n");

    // SPIFFE bundle JSON file with an X.509 and a JWT authority.
    let mut third = Bundle::new(td("third.org"));
    third.add_x509_authority(&foreign_ca("third.org")).unwrap();
    let jwt_key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
    third.add_jwt_authority("third-key", jwt_key.public_key().clone()).unwrap();
    let json_path = dir.join("third.json");
    std::fs::write(&json_path, third.to_json()).unwrap();
    let set = json(server.cli(&[
        "bundle",
        "set",
        "--id",
        "spiffe://third.org",
        "--path",
        json_path.to_str().unwrap(),
        "--format",
        "spiffe",
        "--output",
        "json",
    ]));
    assert_eq!(set["trust_domain"], "spiffe://third.org");
    assert_eq!((set["x509_authorities"].as_u64(), set["jwt_authorities"].as_u64()), (Some(1), Some(1)));

    // Setting again replaces it and bumps the sequence.
    let again = ok(server.cli(&["bundle", "set", "--id", "other.org", "--path", pem_path.to_str().unwrap()]));
    assert!(again.contains("(sequence 2)"), "{again}");

    // List, as text and as JSON, in both formats.
    let listed = ok(server.cli(&["bundle", "list"]));
    assert!(listed.starts_with("Found 2 federated bundles\n"), "{listed}");
    assert!(listed.contains(&format!("\nTrust domain: spiffe://other.org\nSequence: 2\n{other_pem}")), "{listed}");
    assert!(listed.contains("Trust domain: spiffe://third.org\n"), "{listed}");
    let listed = json(server.cli(&["bundle", "list", "--format", "spiffe", "--output", "json"]));
    let bundles = listed["bundles"].as_array().unwrap();
    assert_eq!(bundles.len(), 2);
    assert_eq!(bundles[0]["trust_domain"], "spiffe://other.org");
    let other = Bundle::from_json(td("other.org"), bundles[0]["bundle"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(other.x509_authorities().collect::<Vec<_>>(), [other_ca.as_slice()]);
    let stored_third = Bundle::from_json(td("third.org"), bundles[1]["bundle"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(stored_third.jwt_authority_by_key_id("third-key"), Some(jwt_key.public_key()));

    // Delete removes it; deleting again says it is not there.
    assert_eq!(ok(server.cli(&["bundle", "delete", "--id", "spiffe://other.org"])), "Deleted spiffe://other.org\n");
    let listed = ok(server.cli(&["bundle", "list"]));
    assert!(listed.starts_with("Found 1 federated bundle\n") && !listed.contains("other.org"), "{listed}");
    fails(server.cli(&["bundle", "delete", "--id", "spiffe://other.org"]), "not found");
    // The own bundle was never touched.
    assert_eq!(parse_pem_certificates(ok(server.cli(&["bundle", "show"])).as_bytes()).unwrap().len(), 1);
}

#[test]
fn bundle_errors_are_one_clear_line() {
    let server = ServerProcess::start();
    let dir = server.dir.path();
    let pem_path = dir.join("other.pem");
    std::fs::write(&pem_path, encode_pem_certificates([foreign_ca("other.org").as_slice()])).unwrap();
    let pem = pem_path.to_str().unwrap();
    let set = |id: &str, path: &str, extra: &[&str]| {
        let mut args = vec!["bundle", "set", "--id", id, "--path", path];
        args.extend_from_slice(extra);
        server.cli(&args)
    };

    // An unreadable file is named, before any connection.
    let missing = dir.join("missing.pem");
    fails(
        set("spiffe://other.org", missing.to_str().unwrap(), &[]),
        &format!("cannot read bundle file {}", missing.display()),
    );
    fails(set("spiffe://other.org", dir.to_str().unwrap(), &[]), "cannot read bundle file");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a bundle").unwrap();
    fails(set("spiffe://other.org", garbage.to_str().unwrap(), &[]), "invalid bundle");
    fails(set("spiffe://other.org", pem, &["--format", "spiffe"]), "invalid bundle");

    // The own trust domain and malformed IDs are refused, naming the field.
    fails(set("spiffe://example.org", pem, &[]), "own trust domain");
    fails(set("spiffe://other.org/workload", pem, &[]), "invalid trust_domain");
    fails(set("spiffe://Other.org", pem, &[]), "invalid trust_domain");
    fails(server.cli(&["bundle", "delete", "--id", "spiffe://example.org"]), "own trust domain");
    fails(server.cli(&["bundle", "delete", "--id", "not a domain"]), "invalid trust_domain");
    fails(server.cli(&["bundle", "delete", "--id", "spiffe://nowhere.org"]), "not found");

    // Nothing was stored by any of this.
    assert_eq!(ok(server.cli(&["bundle", "list"])), "Found 0 federated bundles\n");
}
