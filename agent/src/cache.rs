//! The agent's view of its identities and bundles, published as immutable snapshots.
//!
//! # For a newcomer
//!
//! Two halves of the agent meet here:
//!
//! - the **manager** (server side: attestation, entry sync, SVID minting and rotation) is the
//!   only writer. Every change (an entry synced, an SVID minted or rotated, a bundle updated)
//!   produces a new [`AgentSnapshot`] and publishes it with [`Cache::publish`];
//! - the **Workload API** (and later SDS) are readers. Each open stream holds a
//!   [`Cache::subscribe`] receiver, wakes on every publish, filters the snapshot with the
//!   caller's selectors ([`AgentSnapshot::identities_for`]) and sends a full message when what
//!   *that caller* sees changed.
//!
//! A snapshot is never mutated after it is published (everything inside is behind `Arc`), so
//! readers never lock anything and a slow reader cannot stall the writer. A
//! [`tokio::sync::watch`] channel coalesces: a reader that was busy sees only the latest
//! snapshot, which is all a full-snapshot stream needs.
//!
//! JWT-SVIDs are not kept in snapshots: they are minted on demand for a caller's audience.
//! The Workload API asks a [`JwtSvidSource`] (the manager, which caches tokens until half
//! their life) for them.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use imbl::{OrdMap, OrdSet};
use tessera_spiffe::bundle::BundleSet;
use tessera_spiffe::selector::{Selector, SelectorSet};
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// A registration entry as the agent keeps it: parsed and validated once, at sync time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedEntry {
    /// Entry ID assigned by the server.
    pub id: String,
    /// The SPIFFE ID workloads matching this entry receive.
    pub spiffe_id: SpiffeId,
    /// The workload selectors; a caller matches when these are a subset of its own.
    pub selectors: SelectorSet,
    /// Trust domains whose bundles are delivered with this identity.
    pub federates_with: BTreeSet<TrustDomain>,
    /// Operator-chosen hint passed through to workloads (`hint` in the Workload API).
    pub hint: String,
    /// X.509-SVID TTL in seconds (0 = server default).
    pub x509_svid_ttl: u32,
    /// JWT-SVID TTL in seconds (0 = server default).
    pub jwt_svid_ttl: u32,
    /// Datastore revision of the entry's last change.
    pub revision: u64,
}

/// An X.509-SVID held by the agent, with its private key.
pub struct X509Svid {
    /// DER certificates, leaf first, then intermediates.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the private key, generated on this node. Zeroed on drop.
    pub private_key_pkcs8: Zeroizing<Vec<u8>>,
    /// notBefore of the leaf.
    pub issued_at: SystemTime,
    /// notAfter of the leaf.
    pub expires_at: SystemTime,
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("certificates", &self.cert_chain.len())
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// An entry together with the SVID currently issued for it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub entry: Arc<CachedEntry>,
    pub svid: Arc<X509Svid>,
}

/// Everything the agent can serve at one point in time.
///
/// Entries and identities live in persistent maps (`imbl`): a snapshot shares its structure
/// with the one before it, so publishing one is O(1) and changing one entry or SVID is
/// O(log N), whatever the number of entries N. A caller's identities are found through an
/// index on each entry's first selector, so a reader's view costs O(log N) plus the entries
/// that could match it, not a scan of every entry (issue 7: entries created one by one cost a
/// full copy and a full scan each before).
#[derive(Clone)]
pub struct AgentSnapshot {
    /// Datastore revision of the entry set (0 before the first sync).
    pub revision: u64,
    /// True once the agent has completed at least one sync with the server or loaded a
    /// persisted state; before that an empty identity list means "not known yet", not
    /// "no identity".
    pub ready: bool,
    /// The own trust domain's bundle and every federated bundle the agent received.
    pub bundles: Arc<BundleSet>,
    /// Every entry the agent is authorized for, whether or not it has an SVID yet, by ID.
    entries: OrdMap<String, Arc<CachedEntry>>,
    /// Entries with a current SVID, by entry ID.
    identities: OrdMap<String, Identity>,
    /// (first selector, entry ID) of every entry; `None` for an entry without selectors
    /// (which matches every caller).
    by_first_selector: OrdSet<(Option<Selector>, String)>,
}

impl fmt::Debug for AgentSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSnapshot")
            .field("revision", &self.revision)
            .field("ready", &self.ready)
            .field("entries", &self.entries.len())
            .field("identities", &self.identities.len())
            .finish_non_exhaustive()
    }
}

fn first_selector(entry: &CachedEntry) -> (Option<Selector>, String) {
    (entry.selectors.iter().next().cloned(), entry.id.clone())
}

impl AgentSnapshot {
    /// An empty, not-ready snapshot for a trust domain.
    pub fn empty(bundles: BundleSet) -> Self {
        Self {
            revision: 0,
            ready: false,
            bundles: Arc::new(bundles),
            entries: OrdMap::new(),
            identities: OrdMap::new(),
            by_first_selector: OrdSet::new(),
        }
    }

    /// Every entry, by entry ID.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<CachedEntry>> + '_ {
        self.entries.values()
    }

    /// How many entries the agent holds.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The entry with this ID.
    pub fn entry(&self, id: &str) -> Option<&Arc<CachedEntry>> {
        self.entries.get(id)
    }

    /// Every identity (entry with a current SVID), by entry ID.
    pub fn identities(&self) -> impl Iterator<Item = &Identity> + '_ {
        self.identities.values()
    }

    /// How many entries have a current SVID.
    pub fn identity_count(&self) -> usize {
        self.identities.len()
    }

    /// The identity of the entry with this ID.
    pub fn identity(&self, entry_id: &str) -> Option<&Identity> {
        self.identities.get(entry_id)
    }

    /// Adds or replaces an entry. An identity already held for its ID keeps its SVID and
    /// takes the new entry (the manager decides whether the SVID is still served).
    pub fn insert_entry(&mut self, entry: Arc<CachedEntry>) {
        if let Some(old) = self.entries.insert(entry.id.clone(), Arc::clone(&entry)) {
            self.by_first_selector.remove(&first_selector(&old));
        }
        self.by_first_selector.insert(first_selector(&entry));
        if let Some(identity) = self.identities.get(&entry.id) {
            let svid = Arc::clone(&identity.svid);
            self.identities.insert(entry.id.clone(), Identity { entry, svid });
        }
    }

    /// Adds or replaces an identity, and its entry.
    pub fn insert_identity(&mut self, identity: Identity) {
        let stored = self.entries.get(&identity.entry.id);
        if stored.is_none_or(|stored| !Arc::ptr_eq(stored, &identity.entry)) {
            self.insert_entry(Arc::clone(&identity.entry));
        }
        self.identities.insert(identity.entry.id.clone(), identity);
    }

    /// Removes the identity of an entry (the entry stays); returns whether there was one.
    pub fn remove_identity(&mut self, entry_id: &str) -> bool {
        self.identities.remove(entry_id).is_some()
    }

    /// Removes an entry and its identity.
    pub fn remove_entry(&mut self, entry_id: &str) {
        if let Some(old) = self.entries.remove(entry_id) {
            self.by_first_selector.remove(&first_selector(&old));
        }
        self.identities.remove(entry_id);
    }

    /// Removes every identity (the entries stay).
    pub fn clear_identities(&mut self) {
        self.identities = OrdMap::new();
    }

    /// The IDs of the entries that can match a caller with `selectors`: those whose first
    /// selector is one of the caller's (an entry matches only when all of its selectors are
    /// the caller's), and those without selectors. O(|selectors| log N + candidates).
    fn candidates<'a>(&'a self, selectors: &'a SelectorSet) -> impl Iterator<Item = &'a str> + 'a {
        let without = self
            .by_first_selector
            .range((None, String::new())..)
            .take_while(|(first, _)| first.is_none())
            .map(|(_, id)| id.as_str());
        let with = selectors.iter().flat_map(move |selector| {
            self.by_first_selector
                .range((Some(selector.clone()), String::new())..)
                .take_while(move |(first, _)| first.as_ref() == Some(selector))
                .map(|(_, id)| id.as_str())
        });
        without.chain(with)
    }

    /// The identities a caller with `selectors` is entitled to, in a stable order (entry
    /// SPIFFE ID, then entry ID), so that the first one is a deterministic default.
    pub fn identities_for(&self, selectors: &SelectorSet) -> Vec<&Identity> {
        let mut found: Vec<&Identity> = self
            .candidates(selectors)
            .filter_map(|id| self.identities.get(id))
            .filter(|identity| identity.entry.selectors.is_subset_of(selectors))
            .collect();
        found.sort_by(|a, b| {
            (a.entry.spiffe_id.as_str(), a.entry.id.as_str()).cmp(&(b.entry.spiffe_id.as_str(), b.entry.id.as_str()))
        });
        found
    }

    /// The entries matching `selectors`, whether or not they have an SVID yet, by entry ID.
    pub fn entries_for(&self, selectors: &SelectorSet) -> Vec<&Arc<CachedEntry>> {
        let mut found: Vec<&Arc<CachedEntry>> = self
            .candidates(selectors)
            .filter_map(|id| self.entries.get(id))
            .filter(|entry| entry.selectors.is_subset_of(selectors))
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        found
    }

    /// The federated trust domains the given identities may see bundles of.
    pub fn federated_domains<'a>(&self, identities: impl IntoIterator<Item = &'a Identity>) -> BTreeSet<TrustDomain> {
        identities.into_iter().flat_map(|identity| identity.entry.federates_with.iter().cloned()).collect()
    }
}

/// The single-writer, many-reader holder of the current [`AgentSnapshot`].
#[derive(Debug)]
pub struct Cache {
    sender: watch::Sender<Arc<AgentSnapshot>>,
}

impl Cache {
    /// A cache starting from `initial`.
    pub fn new(initial: AgentSnapshot) -> Self {
        let (sender, _) = watch::channel(Arc::new(initial));
        Self { sender }
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<AgentSnapshot> {
        self.sender.borrow().clone()
    }

    /// A receiver that wakes on every publish. The first `changed()` resolves only after the
    /// next publish; read [`watch::Receiver::borrow_and_update`] first for the current state.
    pub fn subscribe(&self) -> watch::Receiver<Arc<AgentSnapshot>> {
        self.sender.subscribe()
    }

    /// Replace the snapshot and wake every reader.
    pub fn publish(&self, snapshot: AgentSnapshot) {
        self.sender.send_replace(Arc::new(snapshot));
    }

    /// Build the next snapshot from the current one and publish it.
    pub fn update(&self, change: impl FnOnce(&mut AgentSnapshot)) {
        self.sender.send_modify(|current| {
            let mut next = AgentSnapshot::clone(current);
            change(&mut next);
            *current = Arc::new(next);
        });
    }

    /// How many readers are subscribed (open Workload API streams and internal watchers).
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }
}

/// A JWT-SVID as handed to a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtSvid {
    /// The SPIFFE ID in the token's `sub`.
    pub spiffe_id: SpiffeId,
    /// JWS compact serialization.
    pub token: String,
    /// The token's `exp`.
    pub expires_at: SystemTime,
    /// The entry's hint.
    pub hint: String,
}

/// Why a JWT-SVID could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum JwtSvidError {
    /// The entry is not (or no longer) authorized for this agent.
    #[error("entry {0} is not known to this agent")]
    UnknownEntry(String),
    /// The server could not be reached or refused for a retryable reason.
    #[error("the server is unavailable: {0}")]
    Unavailable(String),
    /// The server refused the request.
    #[error("the server refused to sign: {0}")]
    Refused(String),
}

/// A boxed future, for object-safe async traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the Workload API gets JWT-SVIDs from: the manager in production, a fake in tests.
pub trait JwtSvidSource: Send + Sync + 'static {
    /// A JWT-SVID for `entry` with exactly these audiences (at least one), from a cache
    /// while it has more than half its lifetime left, otherwise freshly signed.
    fn fetch_jwt_svid<'a>(
        &'a self,
        entry: &'a CachedEntry,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSvidError>>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::bundle::Bundle;

    fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: id.to_owned(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: SelectorSet::parse_all(selectors).unwrap(),
            federates_with: BTreeSet::new(),
            hint: String::new(),
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            revision: 1,
        })
    }

    fn identity(entry: Arc<CachedEntry>) -> Identity {
        let svid = X509Svid {
            cert_chain: vec![vec![1, 2, 3]],
            private_key_pkcs8: Zeroizing::new(vec![4, 5, 6]),
            issued_at: SystemTime::UNIX_EPOCH,
            expires_at: SystemTime::UNIX_EPOCH,
        };
        Identity { entry, svid: Arc::new(svid) }
    }

    fn snapshot() -> AgentSnapshot {
        let td = TrustDomain::new("example.org").unwrap();
        let mut snapshot = AgentSnapshot::empty(BundleSet::new(Bundle::new(td)));
        let web = entry("e2", "spiffe://example.org/web", &["unix:uid:1000"]);
        let db = entry("e1", "spiffe://example.org/db", &["unix:uid:1000", "unix:gid:50"]);
        let other = entry("e3", "spiffe://example.org/other", &["unix:uid:2000"]);
        for entry in [web, db, other] {
            snapshot.insert_identity(identity(entry));
        }
        snapshot
    }

    #[test]
    fn identities_are_filtered_by_selector_subset_and_sorted() {
        let snapshot = snapshot();
        let caller = SelectorSet::parse_all(&["unix:uid:1000", "unix:gid:50", "unix:user:app"]).unwrap();
        let ids: Vec<&str> = snapshot.identities_for(&caller).iter().map(|i| i.entry.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/db", "spiffe://example.org/web"]);

        let partial = SelectorSet::parse_all(&["unix:uid:1000"]).unwrap();
        let ids: Vec<&str> = snapshot.identities_for(&partial).iter().map(|i| i.entry.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/web"]);

        assert!(snapshot.identities_for(&SelectorSet::new()).is_empty());
    }

    #[test]
    fn the_selector_index_follows_replaced_and_removed_entries() {
        let mut snapshot = snapshot();
        let caller = SelectorSet::parse_all(&["unix:uid:1000", "unix:gid:50"]).unwrap();
        let ids = |snapshot: &AgentSnapshot, selectors: &SelectorSet| -> Vec<String> {
            snapshot.entries_for(selectors).iter().map(|entry| entry.id.clone()).collect()
        };
        assert_eq!(ids(&snapshot, &caller), ["e1", "e2"]);
        // e2 moves to another uid: the caller loses it, the other uid gains it.
        snapshot.insert_entry(entry("e2", "spiffe://example.org/web", &["unix:uid:2000"]));
        assert_eq!(ids(&snapshot, &caller), ["e1"]);
        let other = SelectorSet::parse_all(&["unix:uid:2000"]).unwrap();
        assert_eq!(ids(&snapshot, &other), ["e2", "e3"]);
        // The identity of a replaced entry carries the new entry.
        assert_eq!(snapshot.identity("e2").unwrap().entry.selectors, other);
        assert_eq!(snapshot.identities_for(&other).len(), 2);
        snapshot.remove_entry("e3");
        assert_eq!(ids(&snapshot, &other), ["e2"]);
        assert!(snapshot.identity("e3").is_none());
        assert_eq!((snapshot.entry_count(), snapshot.identity_count()), (2, 2));
        // An entry whose first selector the caller lacks does not match, even when the
        // caller has its others; one without selectors matches everybody.
        snapshot.insert_entry(entry("e4", "spiffe://example.org/x", &["unix:gid:50", "unix:uid:1000", "unix:user:z"]));
        assert_eq!(ids(&snapshot, &caller), ["e1"]);
        snapshot.insert_entry(entry("e5", "spiffe://example.org/any", &[]));
        assert_eq!(ids(&snapshot, &caller), ["e1", "e5"]);
        assert_eq!(ids(&snapshot, &SelectorSet::new()), ["e5"]);
        snapshot.remove_identity("e1");
        assert!(snapshot.identities_for(&caller).is_empty());
        assert_eq!(ids(&snapshot, &caller), ["e1", "e5"], "the entry stays without its SVID");
    }

    #[test]
    fn publish_wakes_subscribers_with_the_new_snapshot() {
        let td = TrustDomain::new("example.org").unwrap();
        let cache = Cache::new(AgentSnapshot::empty(BundleSet::new(Bundle::new(td))));
        let mut receiver = cache.subscribe();
        assert!(!receiver.borrow_and_update().ready);
        cache.update(|snapshot| {
            snapshot.ready = true;
            snapshot.revision = 7;
        });
        assert!(receiver.has_changed().unwrap());
        let seen = receiver.borrow_and_update().clone();
        assert!(seen.ready);
        assert_eq!(seen.revision, 7);
        assert_eq!(cache.current().revision, 7);
    }
}
