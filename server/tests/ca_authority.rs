//! The server CA: creation, reload, signing, upstream authority, refusal of damaged CA
//! directories, and the bundle sequence.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use tessera_server::ca::{CaError, CertificateAuthority};
use tessera_server::config::{KeyType, ServerConfig, UpstreamAuthorityConfig, UpstreamAuthorityKind};
use tessera_server::datastore::{DataStore, DataStoreOptions, MemoryDataStore};
use tessera_spiffe::SpiffeId;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt::{self, JwsAlgorithm};
use tessera_spiffe::x509::{CaTemplate, verify_x509_svid};

const HOUR: Duration = Duration::from_secs(3600);

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000)
}

fn config() -> ServerConfig {
    ServerConfig { trust_domain: "example.org".parse().unwrap(), ..ServerConfig::default() }
}

fn store() -> MemoryDataStore {
    MemoryDataStore::new(DataStoreOptions::default())
}

fn load(
    dir: &Path,
    config: &ServerConfig,
    store: &dyn DataStore,
    at: SystemTime,
) -> Result<CertificateAuthority, CaError> {
    CertificateAuthority::load_or_create(dir, config, store, at, &SystemRandom::new())
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

fn verify(ca: &CertificateAuthority, chain: &[Vec<u8>], bundle: &Bundle, at: SystemTime) -> SpiffeId {
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let _ = ca;
    verify_x509_svid(&refs, bundle, at).unwrap().spiffe_id().clone()
}

/// Every file of the CA directory with its bytes.
fn snapshot(ca_dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(ca_dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), fs::read(&p).unwrap())).collect()
}

fn find(ca_dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    fs::read_dir(ca_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .unwrap()
}

#[test]
fn creates_private_files_and_reloads_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &config(), &store, now()).unwrap();
    let ca_dir = dir.path().join("ca");
    assert!(ca_dir.join("journal.json").is_file());
    assert!(!dir.path().join("ca.new").exists());
    assert_eq!(fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777, 0o700);
    let keys: Vec<PathBuf> =
        snapshot(&ca_dir).into_keys().filter(|p| p.to_str().unwrap().ends_with(".key.der")).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        assert_eq!(fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
    }
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence(), 1);
    assert_eq!(bundle.x509_authorities().count(), 1);
    assert_eq!(bundle.jwt_authorities().len(), 1);
    assert!(bundle.jwt_authority_by_key_id(&ca.jwt_key_id()).is_some());
    assert_eq!(store.get_bundle(&"example.org".parse().unwrap()).unwrap().unwrap().sequence, 1);
    let files = snapshot(&ca_dir);

    let again = load(dir.path(), &config(), &store, now() + HOUR).unwrap();
    assert_eq!(again.x509_authority_der(), ca.x509_authority_der());
    assert_eq!(again.jwt_key_id(), ca.jwt_key_id());
    assert_eq!(again.bundle(), bundle);
    assert_eq!(again.bundle().sequence(), 1);
    assert_eq!(snapshot(&ca_dir), files, "a reload rewrites nothing");
    again.can_sign(now() + HOUR).unwrap();
}

#[test]
fn signs_from_csr_and_caps_ttl_at_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = load(dir.path(), &config(), &store(), now()).unwrap();
    let workload = id("spiffe://example.org/web");
    let svid = ca.sign_x509_svid_from_csr(&workload, &["web.example.org".to_owned()], HOUR, &csr(), now()).unwrap();
    assert_eq!(svid.chain.len(), 1, "a self-signed CA serves the leaf alone");
    assert_eq!(svid.expires_at, now() + HOUR);
    assert_eq!(verify(&ca, &svid.chain, &ca.bundle(), now()), workload);

    let agent =
        ca.sign_agent_svid(&id("spiffe://example.org/tessera/agent/join_token/t"), HOUR, &csr(), now()).unwrap();
    verify(&ca, &agent.chain, &ca.bundle(), now());

    let long = ca.sign_x509_svid_from_csr(&workload, &[], 1000 * HOUR, &csr(), now()).unwrap();
    assert_eq!(long.expires_at, ca.x509_authority_not_after());
    assert_eq!(ca.x509_authority_not_after(), now() + 24 * HOUR);

    let err = ca.sign_x509_svid_from_csr(&id("spiffe://other.org/web"), &[], HOUR, &csr(), now()).unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }));
    assert!(err.to_string().contains("spiffe://other.org/web"), "{err}");
    let err = ca.sign_jwt_svid(&id("spiffe://other.org/web"), &["a".to_owned()], HOUR, now()).unwrap_err();
    assert!(err.to_string().contains("spiffe://other.org/web"), "{err}");

    let err = ca.sign_x509_svid_from_csr(&workload, &[], HOUR, b"not a csr", now()).unwrap_err();
    assert!(matches!(err, CaError::X509Svid { .. }), "{err}");
}

#[test]
fn jwt_svids_validate_and_carry_iss_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = load(dir.path(), &config(), &store(), now()).unwrap();
    let workload = id("spiffe://example.org/web");
    let (token, exp) = ca.sign_jwt_svid(&workload, &["db".to_owned()], 5 * 60 * Duration::from_secs(1), now()).unwrap();
    assert_eq!(exp, now() + Duration::from_secs(300));
    let valid = jwt::validate(&token, &ca.bundle(), &["db"], now()).unwrap();
    assert_eq!(valid.spiffe_id(), &workload);
    assert_eq!(valid.algorithm(), JwsAlgorithm::Es256);
    assert_eq!(valid.key_id(), ca.jwt_key_id());
    assert!(!valid.claims().contains_key("iss"));
    // Capped by the JWT key's lifetime.
    let (_, exp) = ca.sign_jwt_svid(&workload, &["db".to_owned()], 1000 * HOUR, now()).unwrap();
    assert_eq!(exp, ca.jwt_authority_not_after());

    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { jwt_issuer: Some("https://issuer.example.org".to_owned()), ..config() };
    let ca = load(dir.path(), &config, &store(), now()).unwrap();
    let (token, _) = ca.sign_jwt_svid(&workload, &["db".to_owned()], HOUR, now()).unwrap();
    let valid = jwt::validate(&token, &ca.bundle(), &["db"], now()).unwrap();
    assert_eq!(valid.claims().get("iss").and_then(|v| v.as_str()), Some("https://issuer.example.org"));
}

#[test]
fn rsa_jwt_key_signs_rs256_and_p384_ca_signs() {
    // One CA with both non-default key types: RSA generation is slow in debug builds.
    let dir = tempfile::tempdir().unwrap();
    let config = ServerConfig { jwt_key_type: KeyType::Rsa2048, ca_key_type: KeyType::EcP384, ..config() };
    let store = store();
    let ca = load(dir.path(), &config, &store, now()).unwrap();
    let workload = id("spiffe://example.org/web");
    let (token, _) = ca.sign_jwt_svid(&workload, &["db".to_owned()], HOUR, now()).unwrap();
    let valid = jwt::validate(&token, &ca.bundle(), &["db"], now()).unwrap();
    assert_eq!(valid.algorithm(), JwsAlgorithm::Rs256);
    let svid = ca.sign_x509_svid_from_csr(&workload, &[], HOUR, &csr(), now()).unwrap();
    assert_eq!(verify(&ca, &svid.chain, &ca.bundle(), now()), workload);
    let again = load(dir.path(), &config, &store, now()).unwrap();
    assert_eq!(again.jwt_key_id(), ca.jwt_key_id());
    assert_eq!(again.x509_authority_der(), ca.x509_authority_der());
}

#[test]
fn upstream_disk_authority_signs_an_intermediate() {
    let rng = SystemRandom::new();
    let dir = tempfile::tempdir().unwrap();
    let upstream_key = rcgen::KeyPair::generate().unwrap();
    let template = CaTemplate::new("example.org".parse().unwrap(), 1000 * HOUR).unwrap();
    let root = template.self_signed(&upstream_key, now() - HOUR, &rng).unwrap();
    let cert_file = dir.path().join("upstream.crt");
    let key_file = dir.path().join("upstream.key");
    fs::write(&cert_file, pem::encode(&pem::Pem::new("CERTIFICATE", root.clone()))).unwrap();
    fs::write(&key_file, upstream_key.serialize_pem()).unwrap();
    let config = ServerConfig {
        upstream_authority: Some(UpstreamAuthorityConfig {
            kind: UpstreamAuthorityKind::Disk,
            cert_file,
            key_file,
            bundle_file: None,
        }),
        ..config()
    };
    let data_dir = dir.path().join("data");
    let store = store();
    let ca = load(&data_dir, &config, &store, now()).unwrap();
    let bundle = ca.bundle();
    assert_eq!(bundle.x509_authorities().collect::<Vec<_>>(), vec![root.as_slice()]);
    let workload = id("spiffe://example.org/web");
    let svid = ca.sign_x509_svid_from_csr(&workload, &[], HOUR, &csr(), now()).unwrap();
    assert_eq!(svid.chain.len(), 2);
    assert_eq!(svid.chain[1], ca.x509_authority_der());
    let only_root = Bundle::from_x509_authorities_der("example.org".parse().unwrap(), &root).unwrap();
    assert_eq!(verify(&ca, &svid.chain, &only_root, now()), workload);
    // The leaf alone does not verify: the intermediate is needed.
    assert!(verify_x509_svid(&[svid.chain[0].as_slice()], &only_root, now()).is_err());

    let again = load(&data_dir, &config, &store, now()).unwrap();
    assert_eq!(again.x509_authority_der(), ca.x509_authority_der());
    assert_eq!(again.bundle().sequence(), 1);
}

#[test]
fn damaged_ca_directory_is_refused_and_left_untouched() {
    // A second CA whose X.509 key is the "wrong" key for the first.
    let other = tempfile::tempdir().unwrap();
    load(other.path(), &config(), &store(), now()).unwrap();
    let other_key = fs::read(find(&other.path().join("ca"), "x509-", ".key.der")).unwrap();

    type Damage = Box<dyn Fn(&Path) -> PathBuf>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            "corrupt key",
            Box::new(|ca: &Path| {
                let p = find(ca, "x509-", ".key.der");
                fs::write(&p, b"garbage").unwrap();
                p
            }),
            "is corrupt",
        ),
        (
            "truncated cert",
            Box::new(|ca: &Path| {
                let p = find(ca, "x509-", ".cert.der");
                let bytes = fs::read(&p).unwrap();
                fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
                p
            }),
            "is corrupt",
        ),
        (
            "missing cert",
            Box::new(|ca: &Path| {
                let p = find(ca, "x509-", ".cert.der");
                fs::remove_file(&p).unwrap();
                p
            }),
            "is missing",
        ),
        (
            "key of another CA",
            Box::new(move |ca: &Path| {
                let p = find(ca, "x509-", ".key.der");
                fs::write(&p, &other_key).unwrap();
                p
            }),
            "does not match",
        ),
        (
            "corrupt jwt key",
            Box::new(|ca: &Path| {
                let p = find(ca, "jwt-", ".key.der");
                let bytes = fs::read(&p).unwrap();
                fs::write(&p, &bytes[..10]).unwrap();
                p
            }),
            "is corrupt",
        ),
        (
            "missing journal",
            Box::new(|ca: &Path| {
                let p = ca.join("journal.json");
                fs::remove_file(&p).unwrap();
                p
            }),
            "is missing",
        ),
        (
            "truncated journal",
            Box::new(|ca: &Path| {
                let p = ca.join("journal.json");
                fs::write(&p, b"{\"version\": 1, \"slo").unwrap();
                p
            }),
            "is corrupt",
        ),
    ];
    for (name, damage, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = store();
        load(dir.path(), &config(), &store, now()).unwrap();
        let ca_dir = dir.path().join("ca");
        let file = damage(&ca_dir);
        let before = snapshot(&ca_dir);
        let err = load(dir.path(), &config(), &store, now()).unwrap_err().to_string();
        assert!(err.contains(file.to_str().unwrap()), "{name}: {err}");
        assert!(err.contains(expected), "{name}: {err}");
        assert!(err.contains("move") && err.contains(ca_dir.to_str().unwrap()), "{name}: {err}");
        assert_eq!(snapshot(&ca_dir), before, "{name}: files must be untouched");
        assert_eq!(store.get_bundle(&"example.org".parse().unwrap()).unwrap().unwrap().sequence, 1, "{name}");
    }
}

#[test]
fn another_trust_domain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    load(dir.path(), &config(), &store(), now()).unwrap();
    let before = snapshot(&dir.path().join("ca"));
    let other = ServerConfig { trust_domain: "other.org".parse().unwrap(), ..config() };
    let err = load(dir.path(), &other, &store(), now()).unwrap_err();
    assert!(matches!(err, CaError::TrustDomainChanged { .. }), "{err}");
    assert!(err.to_string().contains("other.org"), "{err}");
    assert_eq!(snapshot(&dir.path().join("ca")), before);
}

#[test]
fn interrupted_first_creation_is_discarded() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("ca.new")).unwrap();
    fs::write(dir.path().join("ca.new/x509-abc.key.der"), b"half").unwrap();
    fs::create_dir_all(dir.path().join("ca")).unwrap();
    let ca = load(dir.path(), &config(), &store(), now()).unwrap();
    ca.can_sign(now()).unwrap();
    assert!(!dir.path().join("ca.new").exists());
}

#[test]
fn bundle_sequence_grows_only_when_the_ca_is_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &config(), &store, now()).unwrap();
    let workload = id("spiffe://example.org/web");
    let old_svid = ca.sign_x509_svid_from_csr(&workload, &[], 24 * HOUR, &csr(), now()).unwrap();
    assert_eq!(load(dir.path(), &config(), &store, now() + HOUR).unwrap().bundle().sequence(), 1);

    // 23h into a 24h CA: less than a sixth remains, so the CA and JWT key are renewed and the
    // old ones stay in the bundle until they expire.
    let later = now() + 23 * HOUR;
    let renewed = load(dir.path(), &config(), &store, later).unwrap();
    assert_ne!(renewed.x509_authority_der(), ca.x509_authority_der());
    assert_ne!(renewed.jwt_key_id(), ca.jwt_key_id());
    let bundle = renewed.bundle();
    assert_eq!(bundle.sequence(), 2);
    assert_eq!(bundle.x509_authorities().count(), 2);
    assert_eq!(bundle.jwt_authorities().len(), 2);
    assert_eq!(verify(&renewed, &old_svid.chain, &bundle, later), workload);
    let new_svid = renewed.sign_x509_svid_from_csr(&workload, &[], HOUR, &csr(), later).unwrap();
    verify(&renewed, &new_svid.chain, &bundle, later);

    let same = load(dir.path(), &config(), &store, later).unwrap();
    assert_eq!(same.bundle(), bundle);
    assert_eq!(same.x509_authority_der(), renewed.x509_authority_der());

    // Far in the future: everything has expired; a new CA replaces it and the expired ones leave.
    let far = now() + 10 * 365 * 24 * HOUR;
    let fresh = load(dir.path(), &config(), &store, far).unwrap();
    let bundle = fresh.bundle();
    assert_eq!(bundle.sequence(), 3);
    assert_eq!(bundle.x509_authorities().count(), 1);
    assert_eq!(bundle.jwt_authorities().len(), 1);
    assert_eq!(store.get_bundle(&"example.org".parse().unwrap()).unwrap().unwrap().sequence, 3);
    let keys =
        snapshot(&dir.path().join("ca")).into_keys().filter(|p| p.to_str().unwrap().ends_with(".key.der")).count();
    assert_eq!(keys, 2, "files of expired authorities are removed");
}

#[test]
fn workload_svids_are_never_signed_in_the_reserved_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let ca = load(dir.path(), &config(), &store(), now()).unwrap();
    let ttl = Duration::from_secs(600);
    let key = tessera_spiffe::keys::SigningKey::generate(tessera_spiffe::keys::KeyType::EcP256, &SystemRandom::new())
        .unwrap();
    for reserved in ["/tessera", "/tessera/server", "/tessera/agent/join_token/t"] {
        let spiffe_id = id(&format!("spiffe://example.org{reserved}"));
        let refused = [
            ca.sign_x509_svid_from_csr(&spiffe_id, &[], ttl, &csr(), now()).map(|_| ()),
            ca.sign_x509_svid(&spiffe_id, &[], ttl, key.public_key().spki_der(), now()).map(|_| ()),
            ca.sign_jwt_svid(&spiffe_id, &["aud".to_owned()], ttl, now()).map(|_| ()),
        ];
        for result in refused {
            assert!(matches!(result, Err(CaError::ReservedId { .. })), "{reserved}: {result:?}");
        }
    }
    // The deployment's own identities are still signed through their own paths.
    let server = ca
        .sign_server_svid(&id("spiffe://example.org/tessera/server"), ttl, key.public_key().spki_der(), now())
        .unwrap();
    assert_eq!(verify(&ca, &server.chain, &ca.bundle(), now()), id("spiffe://example.org/tessera/server"));
    let agent = ca.sign_agent_svid(&id("spiffe://example.org/tessera/agent/join_token/t"), ttl, &csr(), now()).unwrap();
    assert_eq!(verify(&ca, &agent.chain, &ca.bundle(), now()), id("spiffe://example.org/tessera/agent/join_token/t"));
    // Paths that merely start with the same letters are ordinary workloads.
    for ordinary in ["/tesseract", "/web/tessera/server"] {
        ca.sign_jwt_svid(&id(&format!("spiffe://example.org{ordinary}")), &["aud".to_owned()], ttl, now()).unwrap();
    }
}
