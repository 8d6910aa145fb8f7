//! The server's certificate authority for one trust domain: the X.509 CA, the JWT signing
//! key, and the trust bundle that publishes them.
//!
//! [`CertificateAuthority::load_or_create`] reads the CA from `<data_dir>/ca/` (layout in
//! [`storage`]) or creates it there on first start, publishes the trust bundle in the
//! datastore, and checks that it can sign. Afterwards every signing method is synchronous,
//! takes `&self` and is cheap, so one `Arc<CertificateAuthority>` serves every task.
//!
//! # Invariants
//!
//! - An existing CA is never replaced because it cannot be read: a missing, corrupt or
//!   mismatched file named by the journal stops the server with an error naming the file.
//! - No SVID outlives its CA: X.509 lifetimes are capped by `X509Issuer`, JWT lifetimes by the
//!   JWT key's `not_after`.
//! - An authority leaves the bundle only once it has expired, so everything it signed stays
//!   verifiable.
//! - Only IDs of the CA's trust domain are signed.
//!
//! # Rotation
//!
//! The journal holds, per kind (X.509 CA, JWT key), one active authority, at most one
//! prepared ("next") one and the retired ones. The same schedule runs at start-up and from
//! the server's background task ([`rotation::run`], which calls
//! [`CertificateAuthority::rotate`] whenever [`CertificateAuthority::next_rotation_at`] has
//! passed):
//!
//! 1. when half of the active authority's lifetime remains, the next one is created with a
//!    full `ca_ttl` and published in the bundle at once (the bundle sequence grows), so agents
//!    and workloads trust it long before it signs anything;
//! 2. when a sixth remains, the prepared one becomes active and the old one is retired (a
//!    new one is created and activated directly if none was prepared, e.g. after a long
//!    outage);
//! 3. a retired authority leaves the bundle after its `notAfter`: no SVID outlives the
//!    authority that signed it, so nothing it signed is valid any more.
//!
//! Every step writes the journal (atomically, after the key files) before the new state is
//! used, so a restart at any point resumes the schedule. The JWT key follows the same
//! schedule with a lifetime of `ca_ttl`. SVIDs are capped by their authority's end, so the
//! largest lifetime rotation never truncates is `ca_ttl / 6` (logged at start when a default
//! TTL exceeds it).
//!
//! Forced rotation ([`CertificateAuthority::change_authority`], the admin API's
//! `localauthority` commands) uses the same journal: prepare, activate the prepared one, taint
//! an old one (the taint is published to agents through [`CertificateAuthority::tainted`]),
//! revoke a tainted old one (it leaves the journal, the bundle and the disk at once).

pub mod rotation;
pub mod storage;

mod error;
mod upstream;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ring::rand::{SecureRandom, SystemRandom};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt::{self, JwtSvidClaims};
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::x509::{CaTemplate, X509Issuer, X509SvidTemplate, verify_x509_svid};
use tessera_spiffe::{SpiffeId, TrustDomain, ttl};
use tracing::{info, warn};

pub use error::CaError;
use storage::{
    CA_DIR, JOURNAL_FILE, JOURNAL_VERSION, Journal, STAGING_DIR, Slot, SlotKind, SlotStatus, create_private_dir,
    from_unix, is_absent_or_empty, publish_staging, read_file, read_journal, remove_dir_if_exists, to_unix,
    write_atomic,
};
use upstream::Upstream;

use crate::config::{self, ServerConfig};
use crate::datastore::DataStore;

/// Audience of the self-check JWT-SVID.
const SELF_CHECK_AUDIENCE: &str = "tessera-self-check";
/// Lifetime of the self-check SVIDs.
const SELF_CHECK_TTL: Duration = Duration::from_secs(60);

/// A signed X.509-SVID with the chain to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509SvidChain {
    /// DER certificates, leaf first, then any intermediates (never the root).
    pub chain: Vec<Vec<u8>>,
    /// The leaf's `notAfter`.
    pub expires_at: SystemTime,
}

/// The authorities that sign now, and the bundle that publishes them.
struct ActiveAuthorities {
    x509: X509Issuer,
    /// Served after the leaf: the server's intermediate and the upstream's intermediates
    /// (empty for a self-signed CA, whose certificate is in the bundle).
    chain_tail: Vec<Vec<u8>>,
    jwt_key: SigningKey,
    jwt_key_id: String,
    jwt_not_after: SystemTime,
    bundle: Arc<Bundle>,
    /// What an operator tainted, for agents to replace.
    tainted: Arc<TaintedAuthorities>,
}

/// Old authorities an operator tainted (forced rotation): agents replace every SVID they
/// signed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaintedAuthorities {
    /// DER certificates of tainted X.509 CAs.
    pub x509: Vec<Vec<u8>>,
    /// Key IDs of tainted JWT keys.
    pub jwt_key_ids: Vec<String>,
}

/// The CA of one trust domain. See the [module documentation](self).
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    ca_dir: PathBuf,
    jwt_issuer: Option<String>,
    /// Randomness for serial numbers and signatures (not worth injecting: tests cannot
    /// observe it beyond uniqueness).
    rng: SystemRandom,
    current: RwLock<Arc<ActiveAuthorities>>,
    /// What rotation needs: the settings, the upstream authority and the journal in force.
    rotation: Mutex<RotationState>,
    /// Signing counts and latency (served as metrics).
    signing: crate::metrics::SigningMetrics,
}

/// The schedule's state: the journal as written, and whether the bundle still has to be
/// published (a datastore failure after a journal write is retried at the next tick).
struct RotationState {
    settings: Settings,
    upstream: Option<Upstream>,
    journal: Journal,
    publish_pending: bool,
}

/// Whether `spiffe_id` lies in the namespace of the deployment's own identities
/// (`/tessera`, `/tessera/...`: the server and its agents). Only the server's own SVID and
/// agent SVIDs are signed there; a workload SVID in it could pass for the server to agents.
pub fn is_reserved_id(spiffe_id: &SpiffeId) -> bool {
    let path = spiffe_id.path();
    path == RESERVED_PATH || path.strip_prefix(RESERVED_PATH).is_some_and(|rest| rest.starts_with('/'))
}

/// The path prefix of the deployment's own identities.
pub const RESERVED_PATH: &str = "/tessera";

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("ca_dir", &self.ca_dir)
            .finish_non_exhaustive()
    }
}

/// What `load_or_create` needs from the configuration.
struct Settings {
    trust_domain: TrustDomain,
    ca_key_type: KeyType,
    jwt_key_type: KeyType,
    ca_ttl: Duration,
}

fn key_type(value: config::KeyType) -> KeyType {
    match value {
        config::KeyType::EcP256 => KeyType::EcP256,
        config::KeyType::EcP384 => KeyType::EcP384,
        config::KeyType::Rsa2048 => KeyType::Rsa2048,
    }
}

/// The authority ID of an X.509 CA: the first 16 bytes of its certificate's SHA-256, hex.
fn x509_id(cert_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    hex::encode(&digest.as_ref()[..16])
}

/// A forced-rotation step on one kind of authority (SPIRE's `localauthority` verbs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorityChange {
    /// Create a new authority and publish it (replaces an unused prepared one).
    Prepare,
    /// Make the prepared authority with this ID the active one.
    Activate(String),
    /// Mark this old authority tainted.
    Taint(String),
    /// Remove this tainted old authority from the journal and the bundle.
    Revoke(String),
}

/// Operator-facing name of a kind of authority.
pub fn kind_name(kind: SlotKind) -> &'static str {
    match kind {
        SlotKind::X509 => "x509",
        SlotKind::Jwt => "jwt",
    }
}

/// Operator-facing name of a state ("old" for retired, as SPIRE calls it).
pub fn state_name(status: SlotStatus) -> &'static str {
    match status {
        SlotStatus::Active => "active",
        SlotStatus::Prepared => "prepared",
        SlotStatus::Retired => "old",
    }
}

/// The earliest unix second at which the schedule has something to do for `journal`.
fn next_deadline(journal: &Journal) -> u64 {
    let mut next = u64::MAX;
    for slot in &journal.slots {
        match slot.status {
            SlotStatus::Retired | SlotStatus::Prepared => next = next.min(slot.not_after),
            SlotStatus::Active => {
                next = next.min(slot.activate_next_at());
                if journal.prepared(slot.kind).is_none() {
                    next = next.min(slot.prepare_at());
                }
            }
        }
    }
    next
}

/// Whole seconds, as certificates and JWTs encode times.
fn floor_seconds(time: SystemTime) -> SystemTime {
    from_unix(to_unix(time))
}

impl CertificateAuthority {
    /// Loads the CA of `config.trust_domain` from `<data_dir>/ca/`, creating it on first
    /// start, renewing authorities that expire soon, and publishing the bundle in `datastore`
    /// (its sequence grows only when its content changes).
    ///
    /// Blocking (file I/O, fsync, datastore); call it from `spawn_blocking` in async code.
    pub fn load_or_create(
        data_dir: &Path,
        config: &ServerConfig,
        datastore: &dyn DataStore,
        now: SystemTime,
        rng: &dyn SecureRandom,
    ) -> Result<Self, CaError> {
        let settings = Settings {
            trust_domain: config.trust_domain.clone(),
            ca_key_type: key_type(config.ca_key_type),
            jwt_key_type: key_type(config.jwt_key_type),
            ca_ttl: config.ca_ttl,
        };
        let ca_dir = data_dir.join(CA_DIR);
        let upstream = config.upstream_authority.as_ref().map(upstream::load).transpose()?;
        create_private_dir(data_dir)?;

        let mut loaded = Loaded::default();
        let journal = if is_absent_or_empty(&ca_dir)? {
            create_first(data_dir, &ca_dir, &settings, upstream.as_ref(), now, rng, &mut loaded)?
        } else {
            read_journal(&ca_dir)?
        };
        let (journal, active, bundle) = advance(&ca_dir, journal, loaded, &settings, upstream.as_ref(), now, rng)?;
        let bundle = publish_bundle(datastore, &settings.trust_domain, bundle)?;

        let untruncated = settings.ca_ttl / 6;
        for (key, value) in [
            ("default_x509_svid_ttl", config.default_x509_svid_ttl),
            ("default_jwt_svid_ttl", config.default_jwt_svid_ttl),
        ] {
            if value > untruncated {
                warn!(
                    "{key} ({}) exceeds {} (a sixth of ca_ttl), the largest SVID lifetime CA rotation never \
                     truncates: SVIDs signed shortly before a rotation are cut at their authority's expiry",
                    humantime::format_duration(value),
                    humantime::format_duration(untruncated)
                );
            }
        }

        let ca = Self {
            trust_domain: settings.trust_domain.clone(),
            ca_dir,
            jwt_issuer: config.jwt_issuer.clone().filter(|s| !s.is_empty()),
            rng: SystemRandom::new(),
            current: RwLock::new(Arc::new(ActiveAuthorities { bundle: Arc::new(bundle), ..active })),
            rotation: Mutex::new(RotationState { settings, upstream, journal, publish_pending: false }),
            signing: crate::metrics::SigningMetrics::default(),
        };
        ca.can_sign(now)?;
        Ok(ca)
    }

    /// When the rotation schedule next has something to do ([`CertificateAuthority::rotate`]
    /// does nothing before). In the past when a previous publication must be retried.
    pub fn next_rotation_at(&self) -> SystemTime {
        let rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        if rotation.publish_pending { SystemTime::UNIX_EPOCH } else { from_unix(next_deadline(&rotation.journal)) }
    }

    /// When the schedule next acts on the authorities of `kind` (prepare, activate or drop).
    pub fn next_step_at(&self, kind: SlotKind) -> SystemTime {
        let rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let journal = Journal {
            slots: rotation.journal.slots.iter().filter(|s| s.kind == kind).cloned().collect(),
            ..rotation.journal.clone()
        };
        from_unix(next_deadline(&journal))
    }

    /// The signing counters (metrics).
    pub fn signing_metrics(&self) -> &crate::metrics::SigningMetrics {
        &self.signing
    }

    /// A copy of the journal in force (authorities and their states).
    pub fn journal(&self) -> Journal {
        self.rotation.lock().unwrap_or_else(PoisonError::into_inner).journal.clone()
    }

    /// Runs the rotation schedule at `now` (see the [module documentation](self)): prepares,
    /// activates and drops authorities that are due, writes the journal, publishes the new
    /// bundle in `datastore` and switches signing to the new active authorities. Returns
    /// whether anything changed. Cheap when nothing is due.
    ///
    /// Blocking (key generation, file I/O, datastore); call it from `spawn_blocking`.
    pub fn rotate(&self, datastore: &dyn DataStore, now: SystemTime) -> Result<bool, CaError> {
        let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        if !rotation.publish_pending && to_unix(now) < next_deadline(&rotation.journal) {
            return Ok(false);
        }
        self.commit(&mut rotation, datastore, now)?;
        Ok(true)
    }

    fn current(&self) -> Arc<ActiveAuthorities> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The trust domain this CA signs for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Runs the schedule over the journal in force (already written), publishes the bundle
    /// and switches to the resulting authorities.
    fn commit(&self, state: &mut RotationState, datastore: &dyn DataStore, now: SystemTime) -> Result<(), CaError> {
        let advanced = advance(
            &self.ca_dir,
            state.journal.clone(),
            Loaded::default(),
            &state.settings,
            state.upstream.as_ref(),
            now,
            &self.rng,
        );
        let (journal, active, bundle) = match advanced {
            Ok(advanced) => advanced,
            Err(err) => {
                // The journal may have been written before the failure: continue from disk.
                if let Ok(on_disk) = read_journal(&self.ca_dir) {
                    state.journal = on_disk;
                }
                state.publish_pending = true;
                return Err(err);
            }
        };
        // The journal on disk is the new one from here on, whatever happens to the bundle.
        state.journal = journal;
        state.publish_pending = true;
        let bundle = publish_bundle(datastore, &self.trust_domain, bundle)?;
        state.publish_pending = false;
        let sequence = bundle.sequence();
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            Arc::new(ActiveAuthorities { bundle: Arc::new(bundle), ..active });
        info!(
            sequence,
            x509_authority = ?state.journal.active(SlotKind::X509).map(|s| &s.id),
            jwt_authority = ?state.journal.active(SlotKind::Jwt).map(|s| &s.id),
            "CA authorities in force"
        );
        Ok(())
    }

    /// Old authorities an operator tainted.
    pub fn tainted(&self) -> Arc<TaintedAuthorities> {
        Arc::clone(&self.current().tainted)
    }

    /// The authorities of `kind`: active first, then prepared, then old ones (oldest first).
    pub fn authorities(&self, kind: SlotKind) -> Vec<Slot> {
        let journal = self.journal();
        let rank = |s: &Slot| match s.status {
            SlotStatus::Active => 0,
            SlotStatus::Prepared => 1,
            SlotStatus::Retired => 2,
        };
        let mut slots: Vec<Slot> = journal.slots.into_iter().filter(|s| s.kind == kind).collect();
        slots.sort_by_key(|s| (rank(s), s.created));
        slots
    }

    /// Forced rotation (see [`AuthorityChange`]): applies the change to the journal, writes it,
    /// publishes the bundle and switches signing. Returns the authority acted on.
    ///
    /// Blocking (key generation, file I/O, datastore); call it from `spawn_blocking`.
    pub fn change_authority(
        &self,
        kind: SlotKind,
        change: AuthorityChange,
        datastore: &dyn DataStore,
        now: SystemTime,
    ) -> Result<Slot, CaError> {
        let mut rotation = self.rotation.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *rotation;
        let mut journal = state.journal.clone();
        let mut loaded = Loaded::default();
        let find = |journal: &Journal, id: &str| -> Result<Slot, CaError> {
            journal
                .slots
                .iter()
                .find(|s| s.kind == kind && s.id == id)
                .cloned()
                .ok_or_else(|| CaError::AuthorityNotFound { kind: kind_name(kind), authority_id: id.to_owned() })
        };
        let refuse = |reason: String| CaError::AuthorityState { reason };
        let acted = match change {
            AuthorityChange::Prepare => {
                discard_prepared(&mut journal, kind, &mut loaded);
                let mut slot = match kind {
                    SlotKind::X509 => create_x509(
                        &self.ca_dir,
                        &state.settings,
                        state.upstream.as_ref(),
                        now,
                        &self.rng,
                        &mut loaded,
                    )?,
                    SlotKind::Jwt => create_jwt(&self.ca_dir, &state.settings, now, &self.rng, &mut loaded)?,
                };
                slot.status = SlotStatus::Prepared;
                journal.slots.push(slot.clone());
                slot
            }
            AuthorityChange::Activate(id) => {
                let slot = find(&journal, &id)?;
                if slot.status != SlotStatus::Prepared {
                    return Err(refuse(format!(
                        "{} authority {id} is {}; only the prepared authority can be activated",
                        kind_name(kind),
                        state_name(slot.status)
                    )));
                }
                activate(&mut journal, kind, &id, now, &mut loaded);
                find(&journal, &id)?
            }
            AuthorityChange::Taint(id) => {
                let slot = find(&journal, &id)?;
                if slot.status != SlotStatus::Retired {
                    return Err(refuse(format!(
                        "{} authority {id} is {}; only an old authority can be tainted (prepare and activate a \
                         new one first)",
                        kind_name(kind),
                        state_name(slot.status)
                    )));
                }
                if slot.tainted {
                    return Err(refuse(format!("{} authority {id} is already tainted", kind_name(kind))));
                }
                for s in journal.slots.iter_mut().filter(|s| s.kind == kind && s.id == id) {
                    s.tainted = true;
                }
                find(&journal, &id)?
            }
            AuthorityChange::Revoke(id) => {
                let slot = find(&journal, &id)?;
                if slot.status != SlotStatus::Retired || !slot.tainted {
                    return Err(refuse(format!(
                        "{} authority {id} is {}{}; only a tainted old authority can be revoked",
                        kind_name(kind),
                        state_name(slot.status),
                        if slot.tainted { ", tainted" } else { ", not tainted" }
                    )));
                }
                journal.slots.retain(|s| !(s.kind == kind && s.id == id));
                loaded.replaced.push(slot.clone());
                slot
            }
        };
        write_atomic(&self.ca_dir.join(JOURNAL_FILE), &journal.encode())?;
        for slot in &loaded.replaced {
            // Best effort: these files are no longer named by the journal.
            let _ = std::fs::remove_file(slot.key_path(&self.ca_dir));
            if slot.kind == SlotKind::X509 {
                let _ = std::fs::remove_file(slot.cert_path(&self.ca_dir));
            }
        }
        state.journal = journal;
        warn!(kind = kind_name(kind), authority = %acted.id, change = ?acted.status, tainted = acted.tainted, "local authority changed by an operator");
        self.commit(state, datastore, now)?;
        Ok(acted)
    }

    /// The CA directory (`<data_dir>/ca`).
    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// The current trust bundle (X.509 roots and JWT keys, with its sequence).
    pub fn bundle(&self) -> Bundle {
        Bundle::clone(&self.current().bundle)
    }

    /// The current trust bundle without copying it: the same `Arc` until the next rotation
    /// step or bundle change, so callers can tell "unchanged" with [`Arc::ptr_eq`].
    pub fn shared_bundle(&self) -> Arc<Bundle> {
        Arc::clone(&self.current().bundle)
    }

    /// End of validity of the X.509 CA that signs now; no X.509-SVID outlives it.
    pub fn x509_authority_not_after(&self) -> SystemTime {
        self.current().x509.not_after()
    }

    /// DER certificate of the X.509 CA that signs now (the root, or the intermediate when an
    /// upstream authority is configured).
    pub fn x509_authority_der(&self) -> Vec<u8> {
        self.current().x509.certificate_der().to_vec()
    }

    /// Key ID of the JWT signing key.
    pub fn jwt_key_id(&self) -> String {
        self.current().jwt_key_id.clone()
    }

    /// End of the JWT signing key's intended lifetime; no JWT-SVID outlives it.
    pub fn jwt_authority_not_after(&self) -> SystemTime {
        self.current().jwt_not_after
    }

    /// A workload SVID's ID: in the trust domain and outside the reserved namespace.
    fn check_workload(&self, spiffe_id: &SpiffeId) -> Result<(), CaError> {
        self.check_member(spiffe_id)?;
        if is_reserved_id(spiffe_id) {
            return Err(CaError::ReservedId { spiffe_id: spiffe_id.clone() });
        }
        Ok(())
    }

    fn check_member(&self, spiffe_id: &SpiffeId) -> Result<(), CaError> {
        if spiffe_id.is_member_of(&self.trust_domain) {
            Ok(())
        } else {
            Err(CaError::ForeignTrustDomain { spiffe_id: spiffe_id.clone(), trust_domain: self.trust_domain.clone() })
        }
    }

    fn template(&self, spiffe_id: &SpiffeId, dns_names: &[String], ttl: Duration) -> Result<X509SvidTemplate, CaError> {
        self.check_member(spiffe_id)?;
        let x509_err = |source| CaError::X509Svid { spiffe_id: spiffe_id.clone(), source };
        X509SvidTemplate::new(spiffe_id.clone(), ttl)
            .and_then(|t| t.with_dns_names(dns_names.iter().cloned()))
            .map_err(x509_err)
    }

    fn chain(active: &ActiveAuthorities, leaf: Vec<u8>, ttl: Duration, now: SystemTime) -> X509SvidChain {
        let mut chain = Vec::with_capacity(1 + active.chain_tail.len());
        chain.push(leaf);
        chain.extend(active.chain_tail.iter().cloned());
        // The same computation the issuer used, in the whole seconds the certificate holds.
        let expires_at = floor_seconds(ttl::validity(now, ttl, Some(active.x509.not_after())).not_after);
        X509SvidChain { chain, expires_at }
    }

    /// Signs an X.509-SVID for `spiffe_id` over the key of a DER PKCS#10 CSR (whose signature
    /// is checked; nothing else in it is used). The lifetime is `ttl`, capped by the CA.
    pub fn sign_x509_svid_from_csr(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        let start = Instant::now();
        let signed =
            self.check_workload(spiffe_id).and_then(|()| self.sign_from_csr(spiffe_id, dns_names, ttl, csr_der, now));
        self.signing.x509.record(signed.is_ok(), start);
        signed
    }

    fn sign_from_csr(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        let template = self.template(spiffe_id, dns_names, ttl)?;
        let active = self.current();
        let leaf = active
            .x509
            .sign_x509_svid_from_csr(&template, csr_der, now, &self.rng)
            .map_err(|source| CaError::X509Svid { spiffe_id: spiffe_id.clone(), source })?;
        Ok(Self::chain(&active, leaf, ttl, now))
    }

    /// Signs an X.509-SVID over a DER SubjectPublicKeyInfo whose private key the caller has
    /// already proven possession of.
    pub fn sign_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        subject_public_key_info_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        let start = Instant::now();
        let signed = self
            .check_workload(spiffe_id)
            .and_then(|()| self.sign_from_public_key(spiffe_id, dns_names, ttl, subject_public_key_info_der, now));
        self.signing.x509.record(signed.is_ok(), start);
        signed
    }

    fn sign_from_public_key(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
        subject_public_key_info_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        let template = self.template(spiffe_id, dns_names, ttl)?;
        let active = self.current();
        let leaf = active
            .x509
            .sign_x509_svid(&template, subject_public_key_info_der, now, &self.rng)
            .map_err(|source| CaError::X509Svid { spiffe_id: spiffe_id.clone(), source })?;
        Ok(Self::chain(&active, leaf, ttl, now))
    }

    /// Signs the server's own X.509-SVID (`spiffe://<td>/tessera/server`, the identity agents
    /// check when they connect) over a public key the server generated.
    pub fn sign_server_svid(
        &self,
        server_id: &SpiffeId,
        ttl: Duration,
        subject_public_key_info_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        self.sign_from_public_key(server_id, &[], ttl, subject_public_key_info_der, now)
    }

    /// Signs an agent's X.509-SVID from its CSR (same rules as
    /// [`CertificateAuthority::sign_x509_svid_from_csr`], without DNS names).
    pub fn sign_agent_svid(
        &self,
        agent_id: &SpiffeId,
        ttl: Duration,
        csr_der: &[u8],
        now: SystemTime,
    ) -> Result<X509SvidChain, CaError> {
        let start = Instant::now();
        let signed = self.sign_from_csr(agent_id, &[], ttl, csr_der, now);
        self.signing.agent_x509.record(signed.is_ok(), start);
        signed
    }

    /// Signs a JWT-SVID for `spiffe_id` and `audiences`, valid for `ttl` capped by the JWT
    /// key's lifetime; `iss` is `jwt_issuer` when configured. Returns the token and its `exp`.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, SystemTime), CaError> {
        let start = Instant::now();
        let signed = self.check_workload(spiffe_id).and_then(|()| self.sign_jwt(spiffe_id, audiences, ttl, now));
        self.signing.jwt.record(signed.is_ok(), start);
        signed
    }

    fn sign_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(String, SystemTime), CaError> {
        self.check_member(spiffe_id)?;
        let active = self.current();
        if now >= active.jwt_not_after {
            return Err(CaError::JwtKeyExpired { key_id: active.jwt_key_id.clone() });
        }
        let requested = now.checked_add(ttl).unwrap_or(now);
        let expires_at = floor_seconds(ttl::cap_not_after(requested, active.jwt_not_after));
        let claims = JwtSvidClaims {
            subject: spiffe_id.clone(),
            audience: audiences.to_vec(),
            issued_at: now,
            expires_at,
            issuer: self.jwt_issuer.clone(),
            jwt_id: None,
        };
        let token = jwt::sign(&claims, &active.jwt_key, &active.jwt_key_id, &self.rng)
            .map_err(|source| CaError::JwtSvid { spiffe_id: spiffe_id.clone(), source })?;
        Ok((token, expires_at))
    }

    /// Health probe: signs a throwaway X.509-SVID and JWT-SVID and verifies both against the
    /// current bundle.
    pub fn can_sign(&self, now: SystemTime) -> Result<(), CaError> {
        let id = self
            .trust_domain
            .id_from_segments(&["tessera", "server"])
            .map_err(|e| CaError::SelfCheck(e.to_string()))?;
        let key = SigningKey::generate(KeyType::EcP256, &self.rng)
            .map_err(|source| CaError::KeyGeneration { what: "self-check key", source })?;
        // The unmetered paths: a health probe is not an issued SVID.
        let svid = self.sign_from_public_key(&id, &[], SELF_CHECK_TTL, key.public_key().spki_der(), now)?;
        let bundle = self.bundle();
        let chain: Vec<&[u8]> = svid.chain.iter().map(Vec::as_slice).collect();
        verify_x509_svid(&chain, &bundle, now)
            .map_err(|e| CaError::SelfCheck(format!("X.509-SVID does not verify against the bundle: {e}")))?;
        let (token, _) = self.sign_jwt(&id, &[SELF_CHECK_AUDIENCE.to_owned()], SELF_CHECK_TTL, now)?;
        jwt::validate(&token, &bundle, &[SELF_CHECK_AUDIENCE], now)
            .map_err(|e| CaError::SelfCheck(format!("JWT-SVID does not validate against the bundle: {e}")))?;
        Ok(())
    }
}

/// Authorities read from (or just written to) the CA directory, by authority ID.
#[derive(Default)]
struct Loaded {
    x509: HashMap<String, X509Issuer>,
    jwt: HashMap<String, SigningKey>,
    /// Slots replaced during this start, whose files can go.
    replaced: Vec<Slot>,
}

impl Loaded {
    fn contains(&self, slot: &Slot) -> bool {
        match slot.kind {
            SlotKind::X509 => self.x509.contains_key(&slot.id),
            SlotKind::Jwt => self.jwt.contains_key(&slot.id),
        }
    }

    /// Reads and checks the files of `slot`, refusing any damage.
    fn load(
        &mut self,
        ca_dir: &Path,
        slot: &Slot,
        trust_domain: &TrustDomain,
        rng: &dyn SecureRandom,
    ) -> Result<(), CaError> {
        let key_path = slot.key_path(ca_dir);
        let what_key = if slot.kind == SlotKind::X509 { "ca key file" } else { "jwt key file" };
        let key_der = read_file(&key_path, what_key, ca_dir, None)?;
        let key = SigningKey::from_pkcs8_der(&key_der, rng).map_err(|e| CaError::Corrupt {
            what: what_key,
            path: key_path.clone(),
            reason: e.to_string(),
            ca_dir: ca_dir.to_path_buf(),
        })?;
        match slot.kind {
            SlotKind::Jwt => {
                let thumbprint = key.public_key().thumbprint();
                if thumbprint != slot.id {
                    return Err(CaError::Mismatch {
                        key_path,
                        other_path: ca_dir.join(JOURNAL_FILE),
                        reason: format!("its key id is {thumbprint}, the journal records {}", slot.id),
                        ca_dir: ca_dir.to_path_buf(),
                    });
                }
                self.jwt.insert(slot.id.clone(), key);
            }
            SlotKind::X509 => {
                let cert_path = slot.cert_path(ca_dir);
                let cert_der = read_file(&cert_path, "ca certificate file", ca_dir, None)?;
                let corrupt_cert = |reason: String| CaError::Corrupt {
                    what: "ca certificate file",
                    path: cert_path.clone(),
                    reason,
                    ca_dir: ca_dir.to_path_buf(),
                };
                Bundle::new(trust_domain.clone())
                    .add_x509_authority(&cert_der)
                    .map_err(|e| corrupt_cert(e.to_string()))?;
                if x509_id(&cert_der) != slot.id {
                    return Err(corrupt_cert(format!(
                        "its digest does not match authority id {} recorded in {JOURNAL_FILE}",
                        slot.id
                    )));
                }
                let issuer = X509Issuer::from_pkcs8_der(cert_der, &key_der).map_err(|e| CaError::Mismatch {
                    key_path: key_path.clone(),
                    other_path: cert_path.clone(),
                    reason: e.to_string(),
                    ca_dir: ca_dir.to_path_buf(),
                })?;
                if issuer.trust_domain() != Some(trust_domain) {
                    return Err(CaError::TrustDomainChanged {
                        path: cert_path,
                        found: issuer.trust_domain().map_or_else(|| "none".to_owned(), ToString::to_string),
                        configured: trust_domain.clone(),
                        ca_dir: ca_dir.to_path_buf(),
                    });
                }
                self.x509.insert(slot.id.clone(), issuer);
            }
        }
        Ok(())
    }

    /// The active authorities and the bundle (sequence 0) of the journal.
    fn assemble(
        mut self,
        journal: &Journal,
        trust_domain: &TrustDomain,
        upstream: Option<&Upstream>,
        ca_dir: &Path,
    ) -> Result<(ActiveAuthorities, Bundle), CaError> {
        let corrupt = |reason: &str| CaError::Corrupt {
            what: "ca journal file",
            path: ca_dir.join(JOURNAL_FILE),
            reason: reason.to_owned(),
            ca_dir: ca_dir.to_path_buf(),
        };
        let mut bundle = Bundle::new(trust_domain.clone());
        for root in upstream.map(|u| u.roots.as_slice()).unwrap_or_default() {
            bundle.add_x509_authority(root)?;
        }
        for slot in &journal.slots {
            match slot.kind {
                // Intermediates travel in SVID chains; only roots go in the bundle.
                SlotKind::X509 if !slot.upstream => {
                    if let Some(issuer) = self.x509.get(&slot.id) {
                        bundle.add_x509_authority(issuer.certificate_der())?;
                    }
                }
                SlotKind::X509 => {}
                SlotKind::Jwt => {
                    if let Some(key) = self.jwt.get(&slot.id) {
                        bundle.add_jwt_authority(slot.id.clone(), key.public_key().clone())?;
                    }
                }
            }
        }
        let mut tainted = TaintedAuthorities::default();
        for slot in journal.slots.iter().filter(|s| s.tainted) {
            match slot.kind {
                SlotKind::X509 => {
                    if let Some(issuer) = self.x509.get(&slot.id) {
                        tainted.x509.push(issuer.certificate_der().to_vec());
                    }
                }
                SlotKind::Jwt => tainted.jwt_key_ids.push(slot.id.clone()),
            }
        }
        let x509_slot = journal.active(SlotKind::X509).ok_or_else(|| corrupt("no active x509 authority"))?;
        let jwt_slot = journal.active(SlotKind::Jwt).ok_or_else(|| corrupt("no active jwt authority"))?;
        let x509 = self.x509.remove(&x509_slot.id).ok_or_else(|| corrupt("active x509 authority not loaded"))?;
        let jwt_key = self.jwt.remove(&jwt_slot.id).ok_or_else(|| corrupt("active jwt authority not loaded"))?;
        let chain_tail = if x509_slot.upstream {
            std::iter::once(x509.certificate_der().to_vec())
                .chain(upstream.map(|u| u.chain.clone()).unwrap_or_default())
                .collect()
        } else {
            Vec::new()
        };
        let active = ActiveAuthorities {
            x509,
            chain_tail,
            jwt_key,
            jwt_key_id: jwt_slot.id.clone(),
            jwt_not_after: jwt_slot.not_after_time(),
            bundle: Arc::new(Bundle::new(trust_domain.clone())),
            tainted: Arc::new(tainted),
        };
        Ok((active, bundle))
    }
}

/// Builds the first CA in `<data_dir>/ca.new/` and renames it to `<data_dir>/ca/`.
fn create_first(
    data_dir: &Path,
    ca_dir: &Path,
    settings: &Settings,
    upstream: Option<&Upstream>,
    now: SystemTime,
    rng: &dyn SecureRandom,
    loaded: &mut Loaded,
) -> Result<Journal, CaError> {
    let staging = data_dir.join(STAGING_DIR);
    // A staging directory is a first creation that was interrupted before it was published:
    // nothing was ever signed with it.
    remove_dir_if_exists(&staging)?;
    create_private_dir(&staging)?;
    let x509 = create_x509(&staging, settings, upstream, now, rng, loaded)?;
    let jwt = create_jwt(&staging, settings, now, rng, loaded)?;
    let journal = Journal { version: JOURNAL_VERSION, slots: vec![x509, jwt] };
    write_atomic(&staging.join(JOURNAL_FILE), &journal.encode())?;
    if ca_dir.exists() {
        // Checked empty by the caller; remove_dir refuses anything else.
        std::fs::remove_dir(ca_dir).map_err(|source| CaError::Io {
            action: "remove empty directory",
            path: ca_dir.to_path_buf(),
            source,
        })?;
    }
    publish_staging(&staging, ca_dir, data_dir)?;
    info!(ca_dir = %ca_dir.display(), trust_domain = %settings.trust_domain, "created a new CA");
    Ok(journal)
}

/// Creates a new X.509 CA (self-signed, or an intermediate of `upstream`) in `dir`.
fn create_x509(
    dir: &Path,
    settings: &Settings,
    upstream: Option<&Upstream>,
    now: SystemTime,
    rng: &dyn SecureRandom,
    loaded: &mut Loaded,
) -> Result<Slot, CaError> {
    let key = SigningKey::generate(settings.ca_key_type, rng)
        .map_err(|source| CaError::KeyGeneration { what: "CA key", source })?;
    let template = CaTemplate::new(settings.trust_domain.clone(), settings.ca_ttl).map_err(CaError::CaCertificate)?;
    let cert_der = match upstream {
        None => {
            let key_pair = rcgen::KeyPair::try_from(key.pkcs8_der())
                .map_err(|e| CaError::SelfCheck(format!("generated CA key is unusable: {e}")))?;
            template.self_signed(&key_pair, now, rng)
        }
        Some(up) => up.issuer.sign_intermediate_ca(&template, key.public_key().spki_der(), now, rng),
    }
    .map_err(CaError::CaCertificate)?;
    let issuer = X509Issuer::from_pkcs8_der(cert_der.clone(), key.pkcs8_der()).map_err(CaError::CaCertificate)?;
    let slot = Slot {
        id: x509_id(&cert_der),
        kind: SlotKind::X509,
        status: SlotStatus::Active,
        upstream: upstream.is_some(),
        not_after: to_unix(issuer.not_after()),
        created: to_unix(now),
        tainted: false,
    };
    write_atomic(&slot.key_path(dir), key.pkcs8_der())?;
    write_atomic(&slot.cert_path(dir), &cert_der)?;
    loaded.x509.insert(slot.id.clone(), issuer);
    Ok(slot)
}

/// Creates a new JWT signing key in `dir`, meant to live as long as a CA.
fn create_jwt(
    dir: &Path,
    settings: &Settings,
    now: SystemTime,
    rng: &dyn SecureRandom,
    loaded: &mut Loaded,
) -> Result<Slot, CaError> {
    let key = SigningKey::generate(settings.jwt_key_type, rng)
        .map_err(|source| CaError::KeyGeneration { what: "JWT signing key", source })?;
    let not_after = now.checked_add(settings.ca_ttl).unwrap_or(now);
    let slot = Slot {
        id: key.public_key().thumbprint(),
        kind: SlotKind::Jwt,
        status: SlotStatus::Active,
        upstream: false,
        not_after: to_unix(not_after),
        created: to_unix(now),
        tainted: false,
    };
    write_atomic(&slot.key_path(dir), key.pkcs8_der())?;
    loaded.jwt.insert(slot.id.clone(), key);
    Ok(slot)
}

/// One run of the rotation schedule over `journal` at `now` (see the module documentation):
/// drops expired retired authorities, loads (and checks) every file the journal names,
/// prepares/activates what is due, writes the journal when it changed, and returns it with
/// the active authorities and the bundle to publish (sequence 0).
#[allow(clippy::too_many_arguments)]
fn advance(
    ca_dir: &Path,
    mut journal: Journal,
    mut loaded: Loaded,
    settings: &Settings,
    upstream: Option<&Upstream>,
    now: SystemTime,
    rng: &dyn SecureRandom,
) -> Result<(Journal, ActiveAuthorities, Bundle), CaError> {
    // Retired (and never activated) authorities leave once expired: nothing they signed is
    // valid any more.
    let (keep, dropped): (Vec<Slot>, Vec<Slot>) =
        journal.slots.drain(..).partition(|s| s.status == SlotStatus::Active || s.not_after_time() > now);
    journal.slots = keep;
    let mut changed = !dropped.is_empty();
    loaded.replaced.extend(dropped);

    for slot in &journal.slots {
        if !loaded.contains(slot) {
            loaded.load(ca_dir, slot, &settings.trust_domain, rng)?;
        }
    }

    changed |= rotate_x509(ca_dir, &mut journal, &mut loaded, settings, upstream, now, rng)?;
    changed |= rotate_jwt(ca_dir, &mut journal, &mut loaded, settings, now, rng)?;
    if changed {
        write_atomic(&ca_dir.join(JOURNAL_FILE), &journal.encode())?;
        for slot in &loaded.replaced {
            // Best effort: these files are no longer named by the journal.
            let _ = std::fs::remove_file(slot.key_path(ca_dir));
            if slot.kind == SlotKind::X509 {
                let _ = std::fs::remove_file(slot.cert_path(ca_dir));
            }
        }
    }
    let (active, bundle) = loaded.assemble(&journal, &settings.trust_domain, upstream, ca_dir)?;
    Ok((journal, active, bundle))
}

/// Makes `new_id` (already in the journal as prepared, or appended by the caller) the active
/// authority of `kind`: the old active one is retired (kept while valid and publishable,
/// dropped otherwise).
fn activate(journal: &mut Journal, kind: SlotKind, new_id: &str, now: SystemTime, loaded: &mut Loaded) {
    let mut keep = Vec::with_capacity(journal.slots.len());
    for mut slot in journal.slots.drain(..) {
        if slot.kind == kind && slot.id == new_id {
            slot.status = SlotStatus::Active;
        } else if slot.kind == kind && slot.status == SlotStatus::Active {
            // Intermediates are not in the bundle, so they need not be kept.
            if slot.not_after_time() > now && !slot.upstream {
                slot.status = SlotStatus::Retired;
            } else {
                loaded.replaced.push(slot);
                continue;
            }
        }
        keep.push(slot);
    }
    journal.slots = keep;
}

/// Removes the prepared slot of `kind` (it no longer fits the configuration).
fn discard_prepared(journal: &mut Journal, kind: SlotKind, loaded: &mut Loaded) {
    if let Some(pos) = journal.slots.iter().position(|s| s.kind == kind && s.status == SlotStatus::Prepared) {
        loaded.replaced.push(journal.slots.remove(pos));
    }
}

/// Runs the X.509 schedule: replaces the active CA when a sixth of its lifetime remains (or it
/// no longer fits the upstream setting), prepares the next one at half-life.
fn rotate_x509(
    ca_dir: &Path,
    journal: &mut Journal,
    loaded: &mut Loaded,
    settings: &Settings,
    upstream: Option<&Upstream>,
    now: SystemTime,
    rng: &dyn SecureRandom,
) -> Result<bool, CaError> {
    let Some(slot) = journal.active(SlotKind::X509).cloned() else {
        return Ok(false);
    };
    let Some(issuer) = loaded.x509.get(&slot.id) else {
        return Ok(false);
    };
    let now_secs = to_unix(now);
    let key_type_changed = key_type_of(issuer) != Some(settings.ca_key_type);
    let mismatch = match (upstream, slot.upstream) {
        (Some(_), false) => Some("upstream_authority is now configured".to_owned()),
        (None, true) => Some("upstream_authority is no longer configured".to_owned()),
        (Some(up), true) => chains_to_upstream(issuer, up, &settings.trust_domain, now, rng)
            .err()
            .map(|e| format!("it does not chain to the configured upstream authority ({e})")),
        (None, false) => None,
    };
    let mut changed = false;
    // A prepared CA made under another upstream setting is not used.
    if let Some(prepared) = journal.prepared(SlotKind::X509)
        && prepared.upstream != upstream.is_some()
    {
        discard_prepared(journal, SlotKind::X509, loaded);
        changed = true;
    }
    if let Some(reason) = mismatch {
        discard_prepared(journal, SlotKind::X509, loaded);
        let mut new_slot = create_x509(ca_dir, settings, upstream, now, rng, loaded)?;
        new_slot.status = SlotStatus::Prepared;
        let new_id = new_slot.id.clone();
        journal.slots.push(new_slot);
        activate(journal, SlotKind::X509, &new_id, now, loaded);
        warn!(old = %slot.id, new = %new_id, "replaced the X.509 CA: {reason}");
        return Ok(true);
    }
    if now_secs >= slot.activate_next_at() {
        let new_id = match journal.prepared(SlotKind::X509) {
            Some(prepared) => prepared.id.clone(),
            None => {
                let mut new_slot = create_x509(ca_dir, settings, upstream, now, rng, loaded)?;
                new_slot.status = SlotStatus::Prepared;
                let id = new_slot.id.clone();
                journal.slots.push(new_slot);
                id
            }
        };
        activate(journal, SlotKind::X509, &new_id, now, loaded);
        info!(old = %slot.id, new = %new_id, "activated the next X.509 CA: less than a sixth of the old one's lifetime remains");
        return Ok(true);
    }
    if now_secs >= slot.prepare_at() && journal.prepared(SlotKind::X509).is_none() {
        let mut new_slot = create_x509(ca_dir, settings, upstream, now, rng, loaded)?;
        new_slot.status = SlotStatus::Prepared;
        info!(active = %slot.id, next = %new_slot.id, not_after = new_slot.not_after, "prepared the next X.509 CA and published it in the bundle");
        journal.slots.push(new_slot);
        return Ok(true);
    }
    if key_type_changed {
        warn!(ca_key_type = %settings.ca_key_type, "ca_key_type changed; it applies to the next X.509 CA");
    }
    Ok(changed)
}

fn key_type_of(issuer: &X509Issuer) -> Option<KeyType> {
    let alg = issuer.key_pair().algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Some(KeyType::EcP256)
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        Some(KeyType::EcP384)
    } else if alg == &rcgen::PKCS_RSA_SHA256 {
        Some(KeyType::Rsa2048)
    } else {
        None
    }
}

/// Runs the JWT key schedule (same thresholds as the X.509 CA).
fn rotate_jwt(
    ca_dir: &Path,
    journal: &mut Journal,
    loaded: &mut Loaded,
    settings: &Settings,
    now: SystemTime,
    rng: &dyn SecureRandom,
) -> Result<bool, CaError> {
    let Some(slot) = journal.active(SlotKind::Jwt).cloned() else {
        return Ok(false);
    };
    let now_secs = to_unix(now);
    if now_secs >= slot.activate_next_at() {
        let new_id = match journal.prepared(SlotKind::Jwt) {
            Some(prepared) => prepared.id.clone(),
            None => {
                let mut new_slot = create_jwt(ca_dir, settings, now, rng, loaded)?;
                new_slot.status = SlotStatus::Prepared;
                let id = new_slot.id.clone();
                journal.slots.push(new_slot);
                id
            }
        };
        activate(journal, SlotKind::Jwt, &new_id, now, loaded);
        info!(old = %slot.id, new = %new_id, "activated the next JWT signing key: less than a sixth of the old one's lifetime remains");
        return Ok(true);
    }
    if now_secs >= slot.prepare_at() && journal.prepared(SlotKind::Jwt).is_none() {
        let mut new_slot = create_jwt(ca_dir, settings, now, rng, loaded)?;
        new_slot.status = SlotStatus::Prepared;
        info!(active = %slot.id, next = %new_slot.id, "prepared the next JWT signing key and published it in the bundle");
        journal.slots.push(new_slot);
        return Ok(true);
    }
    Ok(false)
}

/// Whether an SVID signed by `issuer` verifies against the upstream roots.
fn chains_to_upstream(
    issuer: &X509Issuer,
    upstream: &Upstream,
    trust_domain: &TrustDomain,
    now: SystemTime,
    rng: &dyn SecureRandom,
) -> Result<(), String> {
    let id = trust_domain.id_from_segments(&["tessera", "server"]).map_err(|e| e.to_string())?;
    let key = SigningKey::generate(KeyType::EcP256, rng).map_err(|e| e.to_string())?;
    let template = X509SvidTemplate::new(id, SELF_CHECK_TTL).map_err(|e| e.to_string())?;
    let leaf = issuer.sign_x509_svid(&template, key.public_key().spki_der(), now, rng).map_err(|e| e.to_string())?;
    let mut roots = Bundle::new(trust_domain.clone());
    for root in &upstream.roots {
        roots.add_x509_authority(root).map_err(|e| e.to_string())?;
    }
    let mut chain: Vec<&[u8]> = vec![&leaf, issuer.certificate_der()];
    chain.extend(upstream.chain.iter().map(Vec::as_slice));
    verify_x509_svid(&chain, &roots, now).map(|_| ()).map_err(|e| e.to_string())
}

/// Stores `bundle` in the datastore when its content differs from the stored one (sequence
/// + 1) and returns it with the stored sequence.
fn publish_bundle(
    datastore: &dyn DataStore,
    trust_domain: &TrustDomain,
    mut bundle: Bundle,
) -> Result<Bundle, CaError> {
    let stored = datastore.get_bundle(trust_domain)?;
    let expected = match &stored {
        Some(stored) => {
            if let Ok(mut old) = Bundle::from_json(trust_domain.clone(), &stored.data) {
                old.set_sequence(0);
                bundle.set_sequence(0);
                if old == bundle {
                    bundle.set_sequence(stored.sequence);
                    return Ok(bundle);
                }
            }
            stored.sequence
        }
        None => 0,
    };
    bundle.set_sequence(expected.saturating_add(1));
    let written = datastore.set_bundle(trust_domain, bundle.to_json().as_bytes(), Some(expected))?;
    bundle.set_sequence(written.sequence);
    info!(trust_domain = %trust_domain, sequence = written.sequence, "published the trust bundle");
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, kind: SlotKind, status: SlotStatus, created: u64, not_after: u64) -> Slot {
        Slot { id: id.into(), kind, status, upstream: false, not_after, created, tainted: false }
    }

    #[test]
    fn schedule_prepares_at_half_and_activates_at_a_sixth() {
        let s = slot("a", SlotKind::X509, SlotStatus::Active, 1000, 1600);
        assert_eq!(s.prepare_at(), 1300);
        assert_eq!(s.activate_next_at(), 1500);
        let mut journal = Journal {
            version: storage::JOURNAL_VERSION,
            slots: vec![s, slot("j", SlotKind::Jwt, SlotStatus::Active, 1000, 1600)],
        };
        assert_eq!(next_deadline(&journal), 1300);
        journal.slots.push(slot("b", SlotKind::X509, SlotStatus::Prepared, 1300, 1900));
        journal.slots.push(slot("k", SlotKind::Jwt, SlotStatus::Prepared, 1300, 1900));
        assert_eq!(next_deadline(&journal), 1500);
        journal.slots.push(slot("r", SlotKind::X509, SlotStatus::Retired, 900, 1400));
        assert_eq!(next_deadline(&journal), 1400);
    }

    #[test]
    fn x509_id_is_hex_and_safe() {
        let id = x509_id(b"cert");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
