//! CA and JWT-key rotation on a controlled clock: prepare at half-life (published at once),
//! activate at a sixth remaining, drop after expiry, resume after a restart at every step,
//! and refuse a damaged prepared authority.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use tessera_server::ca::storage::{SlotKind, SlotStatus};
use tessera_server::ca::{AuthorityChange, CaError, CertificateAuthority};
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{DataStore, DataStoreOptions, MemoryDataStore};
use tessera_spiffe::SpiffeId;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt;
use tessera_spiffe::x509::verify_x509_svid;

/// `ca_ttl` of the tests: prepare at +300 s, activate at +500 s, expire at +600 s.
const CA_TTL: Duration = Duration::from_secs(600);
const SVID_TTL: Duration = Duration::from_secs(100);

fn t(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_750_000_000 + secs)
}

fn config() -> ServerConfig {
    ServerConfig {
        trust_domain: "example.org".parse().unwrap(),
        ca_ttl: CA_TTL,
        default_x509_svid_ttl: SVID_TTL,
        default_jwt_svid_ttl: SVID_TTL,
        ..ServerConfig::default()
    }
}

fn store() -> MemoryDataStore {
    MemoryDataStore::new(DataStoreOptions::default())
}

fn load(dir: &Path, store: &dyn DataStore, at: SystemTime) -> Result<CertificateAuthority, CaError> {
    CertificateAuthority::load_or_create(dir, &config(), store, at, &SystemRandom::new())
}

fn workload() -> SpiffeId {
    SpiffeId::parse("spiffe://example.org/web").unwrap()
}

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    rcgen::CertificateParams::default().serialize_request(&key).unwrap().der().to_vec()
}

fn verifies(chain: &[Vec<u8>], bundle: &Bundle, at: SystemTime) -> bool {
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    verify_x509_svid(&refs, bundle, at).is_ok()
}

fn statuses(ca: &CertificateAuthority, kind: SlotKind) -> Vec<SlotStatus> {
    ca.journal().slots.iter().filter(|s| s.kind == kind).map(|s| s.status).collect()
}

fn stored_sequence(store: &dyn DataStore) -> u64 {
    store.get_bundle(&"example.org".parse().unwrap()).unwrap().unwrap().sequence
}

#[test]
fn schedule_prepares_activates_and_drops() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &store, t(0)).unwrap();
    let first_x509 = ca.x509_authority_der();
    let first_kid = ca.jwt_key_id();
    assert_eq!(ca.bundle().sequence(), 1);
    assert_eq!(ca.next_rotation_at(), t(300));

    // Nothing due before half-life.
    assert!(!ca.rotate(&store, t(299)).unwrap());
    assert_eq!(ca.bundle().sequence(), 1);

    // Half-life: the next authorities are published, the current ones still sign.
    assert!(ca.rotate(&store, t(300)).unwrap());
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence(), 2);
    assert_eq!(stored_sequence(&store), 2, "the datastore holds the published bundle");
    assert_eq!(bundle.x509_authorities().count(), 2);
    assert_eq!(bundle.jwt_authorities().len(), 2);
    assert_eq!(ca.x509_authority_der(), first_x509);
    assert_eq!(ca.jwt_key_id(), first_kid);
    assert_eq!(statuses(&ca, SlotKind::X509), [SlotStatus::Active, SlotStatus::Prepared]);
    assert_eq!(ca.next_rotation_at(), t(500));
    let old_svid = ca.sign_x509_svid_from_csr(&workload(), &[], SVID_TTL, &csr(), t(450)).unwrap();
    let (old_jwt, _) = ca.sign_jwt_svid(&workload(), &["aud".into()], SVID_TTL, t(450)).unwrap();

    // A sixth remains: the prepared authorities sign; the old ones stay published.
    assert!(!ca.rotate(&store, t(499)).unwrap());
    assert!(ca.rotate(&store, t(500)).unwrap());
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence(), 2, "activation does not change the bundle's content");
    assert_ne!(ca.x509_authority_der(), first_x509);
    assert_ne!(ca.jwt_key_id(), first_kid);
    assert_eq!(statuses(&ca, SlotKind::X509), [SlotStatus::Retired, SlotStatus::Active]);
    assert_eq!(statuses(&ca, SlotKind::Jwt), [SlotStatus::Retired, SlotStatus::Active]);
    assert!(verifies(&old_svid.chain, &bundle, t(540)), "an SVID of the old CA stays valid");
    jwt::validate(&old_jwt, &bundle, &["aud"], t(540)).unwrap();
    let new_svid = ca.sign_x509_svid_from_csr(&workload(), &[], SVID_TTL, &csr(), t(500)).unwrap();
    assert!(verifies(&new_svid.chain, &bundle, t(510)));
    // Signed before the old CA ended: no SVID outlives its authority.
    assert!(old_svid.expires_at <= t(600));

    // The old authorities leave after their notAfter (the new one's half-life is at +600).
    assert_eq!(ca.next_rotation_at(), t(600));
    assert!(ca.rotate(&store, t(600)).unwrap());
    let bundle = ca.bundle();
    assert_eq!(bundle.sequence(), 3);
    assert_eq!(bundle.x509_authorities().count(), 2, "old one gone, the next one prepared at the new half-life");
    assert_eq!(statuses(&ca, SlotKind::X509), [SlotStatus::Active, SlotStatus::Prepared]);
    assert!(!verifies(&old_svid.chain, &bundle, t(600)));
    // Files of dropped authorities are removed.
    let files = fs::read_dir(dir.path().join("ca")).unwrap().count();
    assert_eq!(files, 1 + 2 * 2 + 2, "journal + two X.509 CAs (key, cert) + two JWT keys");
}

#[test]
fn a_restart_resumes_the_schedule_at_every_step() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &store, t(0)).unwrap();
    assert!(ca.rotate(&store, t(300)).unwrap());
    let prepared = ca.journal();
    drop(ca);

    // Restart between prepare and activation: the same journal and bundle.
    let ca = load(dir.path(), &store, t(400)).unwrap();
    assert_eq!(ca.journal(), prepared);
    assert_eq!(ca.bundle().sequence(), 2);
    drop(ca);

    // Down across the activation point: the start-up activates the prepared authority.
    let ca = load(dir.path(), &store, t(550)).unwrap();
    let journal = ca.journal();
    let prepared_x509 = prepared.prepared(SlotKind::X509).unwrap();
    assert_eq!(journal.active(SlotKind::X509).unwrap().id, prepared_x509.id);
    assert_eq!(journal.active(SlotKind::Jwt).unwrap().id, prepared.prepared(SlotKind::Jwt).unwrap().id);
    assert_eq!(ca.bundle().sequence(), 2);
    drop(ca);

    // Down for longer than the whole lifetime of both: a fresh pair, old ones gone.
    let ca = load(dir.path(), &store, t(5000)).unwrap();
    let journal = ca.journal();
    assert_eq!(journal.slots.len(), 2, "{journal:?}");
    assert_ne!(journal.active(SlotKind::X509).unwrap().id, prepared_x509.id);
    ca.can_sign(t(5000)).unwrap();
}

#[test]
fn a_damaged_prepared_authority_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &store, t(0)).unwrap();
    assert!(ca.rotate(&store, t(300)).unwrap());
    let prepared = ca.journal().prepared(SlotKind::X509).unwrap().clone();
    drop(ca);
    let key = prepared.key_path(&dir.path().join("ca"));
    let bytes = fs::read(&key).unwrap();
    fs::write(&key, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(dir.path(), &store, t(350)).unwrap_err().to_string();
    assert!(err.contains(&key.display().to_string()) && err.contains("corrupt"), "{err}");

    fs::remove_file(&key).unwrap();
    let err = load(dir.path(), &store, t(350)).unwrap_err().to_string();
    assert!(err.contains(&key.display().to_string()) && err.contains("missing"), "{err}");

    // A journal listing two prepared CAs is refused too.
    let journal_path = dir.path().join("ca/journal.json");
    let text = fs::read_to_string(&journal_path).unwrap();
    let twice = text.replace("\"active\"", "\"prepared\"");
    fs::write(&journal_path, twice).unwrap();
    let err = load(dir.path(), &store, t(350)).unwrap_err().to_string();
    assert!(err.contains("journal.json"), "{err}");
}

#[test]
fn forced_rotation_states_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = store();
    let ca = load(dir.path(), &store, t(0)).unwrap();
    let first = ca.journal().active(SlotKind::X509).unwrap().id.clone();
    let next = ca.change_authority(SlotKind::X509, AuthorityChange::Prepare, &store, t(10)).unwrap().id;
    ca.change_authority(SlotKind::X509, AuthorityChange::Activate(next.clone()), &store, t(11)).unwrap();
    let tainted = ca.change_authority(SlotKind::X509, AuthorityChange::Taint(first.clone()), &store, t(12)).unwrap();
    assert!(tainted.tainted);
    assert_eq!(ca.tainted().x509.len(), 1);
    let journal = ca.journal();
    drop(ca);

    let ca = load(dir.path(), &store, t(20)).unwrap();
    assert_eq!(ca.journal(), journal);
    assert_eq!(ca.tainted().x509.len(), 1, "the taint is still announced to agents");
    let err = ca.change_authority(SlotKind::X509, AuthorityChange::Revoke(next.clone()), &store, t(21)).unwrap_err();
    assert!(matches!(err, CaError::AuthorityState { .. }), "{err}");
    ca.change_authority(SlotKind::X509, AuthorityChange::Revoke(first.clone()), &store, t(22)).unwrap();
    assert!(ca.tainted().x509.is_empty());
    assert_eq!(ca.bundle().x509_authorities().count(), 1);
    drop(ca);
    let ca = load(dir.path(), &store, t(30)).unwrap();
    assert_eq!(ca.journal().slots.len(), 2, "revoked authority stays gone");
    // The revoked authority's files are removed.
    assert!(!dir.path().join(format!("ca/x509-{first}.key.der")).exists());
}

/// Issue 5: `tessera-server run` reports at start-up the largest SVID lifetime that CA rotation
/// never truncates (a sixth of `ca_ttl`) when a configured default exceeds it, naming the keys
/// and the figure; with the defaults (24h CA, 1h and 5m SVIDs) it says nothing.
#[test]
fn start_up_warns_when_a_default_svid_ttl_exceeds_what_rotation_never_truncates() {
    let server = cli_support::ServerProcess::start_with(
        "ca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"30m\"\ndefault_jwt_svid_ttl = \"5m\"\n",
    );
    let log = server.log();
    let line = log
        .lines()
        .find(|line| line.contains("default_x509_svid_ttl (30m) exceeds 10m (a sixth of ca_ttl)"))
        .unwrap_or_else(|| panic!("no truncation warning in the start-up log:\n{log}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("largest SVID lifetime CA rotation never truncates"), "{line}");
    assert!(!log.contains("default_jwt_svid_ttl (5m) exceeds"), "5m fits within 10m:\n{log}");
    drop(server);

    let quiet = cli_support::ServerProcess::start();
    assert!(!quiet.log().contains("exceeds"), "the defaults fit:\n{}", quiet.log());
}
