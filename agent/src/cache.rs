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

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use equivalent::{Comparable, Equivalent};
use imbl::{OrdMap, OrdSet};
use tessera_spiffe::bundle::BundleSet;
use tessera_spiffe::selector::{Selector, SelectorSet};
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// An entry ID as the agent holds it: one allocation per entry, shared by the entry itself and
/// by every set that names the entry (the manager's mint work and timers), never copied.
pub type EntryId = Arc<str>;

/// A registration entry as the agent keeps it: parsed and validated once, at sync time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedEntry {
    /// Entry ID assigned by the server.
    pub id: EntryId,
    /// The SPIFFE ID workloads matching this entry receive.
    pub spiffe_id: SpiffeId,
    /// The workload selectors; a caller matches when these are a subset of its own.
    pub selectors: SelectorSet,
    /// Trust domains whose bundles are delivered with this identity (sorted, no duplicates).
    pub federates_with: Box<[TrustDomain]>,
    /// Operator-chosen hint passed through to workloads (`hint` in the Workload API).
    pub hint: String,
    /// Datastore revision of the entry's last change.
    pub revision: u64,
}

/// The intermediate certificates (DER) between an SVID's leaf and its trust domain's root.
/// SVIDs signed under the same intermediates share one copy ([`Intermediates::share`]); an
/// SVID signed by the root itself has none and allocates nothing for them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Intermediates(Option<Arc<[Box<[u8]>]>>);

impl Intermediates {
    /// No intermediates: the leaf is signed by a root of the bundle.
    pub fn none() -> Self {
        Self(None)
    }

    /// These intermediates (DER, closest to the leaf first), in a copy of their own.
    pub fn new(ders: &[Vec<u8>]) -> Self {
        if ders.is_empty() {
            return Self(None);
        }
        Self(Some(ders.iter().map(|der| der.clone().into_boxed_slice()).collect()))
    }

    /// The intermediates of `ders`: one of `recent` when it holds the same certificates (which
    /// is then moved to the front), else a new copy, put at the front of `recent`, which keeps
    /// at most `keep` of them. Every SVID minted under the same intermediates shares one copy.
    pub fn share(ders: &[Vec<u8>], recent: &mut Vec<Intermediates>, keep: usize) -> Self {
        if ders.is_empty() {
            return Self(None);
        }
        let found = recent
            .iter()
            .position(|known| known.len() == ders.len() && known.iter().zip(ders).all(|(a, b)| a == b.as_slice()));
        let shared = match found {
            Some(index) => recent.remove(index),
            None => Self::new(ders),
        };
        recent.insert(0, shared.clone());
        recent.truncate(keep);
        shared
    }

    /// How many certificates.
    pub fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |ders| ders.len())
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The certificates, closest to the leaf first.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.0.iter().flat_map(|ders| ders.iter().map(|der| &**der))
    }

    /// True when both are the same copy (not merely equal certificates), or both are empty.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl fmt::Debug for Intermediates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Intermediates({})", self.len())
    }
}

/// An X.509-SVID held by the agent, with its private key.
///
/// Kept compact (issue 7, bench A7: the agent's memory per cached SVID): the leaf certificate
/// and the PKCS#8 key are one buffer, zeroed on drop; intermediates are shared between SVIDs.
pub struct X509Svid {
    /// The leaf's DER, then the PKCS#8 DER of its private key.
    leaf_and_key: Zeroizing<Box<[u8]>>,
    /// Where the key starts in `leaf_and_key`.
    leaf_len: usize,
    intermediates: Intermediates,
    expires_at: SystemTime,
}

impl X509Svid {
    /// An SVID from its leaf (DER), intermediates, private key (PKCS#8 DER, generated on this
    /// node) and the leaf's notAfter.
    pub fn new(leaf: &[u8], intermediates: Intermediates, private_key_pkcs8: &[u8], expires_at: SystemTime) -> Self {
        let mut buffer = Zeroizing::new(vec![0u8; leaf.len() + private_key_pkcs8.len()].into_boxed_slice());
        buffer[..leaf.len()].copy_from_slice(leaf);
        buffer[leaf.len()..].copy_from_slice(private_key_pkcs8);
        Self { leaf_and_key: buffer, leaf_len: leaf.len(), intermediates, expires_at }
    }

    /// An SVID from a chain (leaf first; an empty chain gives an empty leaf), with
    /// intermediates of its own.
    pub fn from_chain(chain: &[Vec<u8>], private_key_pkcs8: &[u8], expires_at: SystemTime) -> Self {
        let (leaf, rest) = chain.split_first().map_or((&[][..], &[][..]), |(leaf, rest)| (leaf.as_slice(), rest));
        Self::new(leaf, Intermediates::new(rest), private_key_pkcs8, expires_at)
    }

    /// The leaf certificate, DER.
    pub fn leaf(&self) -> &[u8] {
        &self.leaf_and_key[..self.leaf_len]
    }

    /// The intermediates after the leaf.
    pub fn intermediates(&self) -> &Intermediates {
        &self.intermediates
    }

    /// The certificates, leaf first, then the intermediates (DER each).
    pub fn chain(&self) -> impl Iterator<Item = &[u8]> + '_ {
        std::iter::once(self.leaf()).chain(self.intermediates.iter())
    }

    /// The certificates as one list (leaf first).
    pub fn chain_refs(&self) -> Vec<&[u8]> {
        self.chain().collect()
    }

    /// The chain's DER certificates back to back (the Workload API's `x509_svid`).
    pub fn chain_der(&self) -> Vec<u8> {
        let mut der = Vec::with_capacity(self.chain().map(<[u8]>::len).sum());
        for certificate in self.chain() {
            der.extend_from_slice(certificate);
        }
        der
    }

    /// The PKCS#8 DER of the private key.
    pub fn private_key_pkcs8(&self) -> &[u8] {
        &self.leaf_and_key[self.leaf_len..]
    }

    /// notAfter of the leaf.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }
}

impl fmt::Debug for X509Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("X509Svid")
            .field("certificates", &(1 + self.intermediates.len()))
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

/// An X.509-SVID minted for an entry, with when to renew it.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The entry as it was when the SVID was requested (its revision and SPIFFE ID).
    pub entry: Arc<CachedEntry>,
    /// The SVID and its key.
    pub svid: Arc<X509Svid>,
    /// When to replace it (half-life ± jitter).
    pub renew_at: Deadline,
}

/// A moment the manager acts at (a renewal, a retry, an expiry), in whole milliseconds since
/// the UNIX epoch: 8 bytes where a `SystemTime` takes 16, held up to three times per entry.
/// Made from a `SystemTime` rounded up, so it is never earlier than the moment it stands for
/// (certificate times, whole seconds, are exact); moments before 1970 become its first, and
/// moments after the year 9999 its last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(NonZeroU64);

impl Deadline {
    /// 9999-12-31T23:59:59Z, in milliseconds: the last deadline.
    const LAST_MILLIS: u64 = 253_402_300_799_000;

    /// The deadline for `time`, rounded up to the millisecond.
    pub fn at(time: SystemTime) -> Self {
        let since = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let partial = u64::from(!since.subsec_nanos().is_multiple_of(1_000_000));
        let millis = u64::try_from(since.as_millis()).unwrap_or(u64::MAX).saturating_add(partial);
        let millis = millis.clamp(1, Self::LAST_MILLIS);
        Self(NonZeroU64::new(millis).unwrap_or(NonZeroU64::MIN))
    }

    /// The moment, as a `SystemTime`.
    pub fn time(self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(self.0.get())
    }
}

/// Everything the agent holds about one entry: the entry, its last minted SVID, and the
/// manager's schedule for it. One per entry, in the snapshot's one set of entries.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) entry: Arc<CachedEntry>,
    /// The last SVID minted for the entry; served while it was minted for the entry's current
    /// SPIFFE ID (an SVID minted for an older revision is served while it is re-minted).
    pub(crate) minted: Option<Minted>,
    /// When the entry is in the manager's timer set: its next renewal, retry or expiry.
    pub(crate) timer: Option<Deadline>,
}

impl Slot {
    pub(crate) fn new(entry: Arc<CachedEntry>) -> Self {
        Self { entry, minted: None, timer: None }
    }

    /// The SVID served for the entry, if any.
    pub(crate) fn served(&self) -> Option<&Arc<X509Svid>> {
        self.minted.as_ref().filter(|minted| minted.entry.spiffe_id == self.entry.spiffe_id).map(|minted| &minted.svid)
    }

    fn identity(&self) -> Option<Identity> {
        self.served().map(|svid| Identity { entry: Arc::clone(&self.entry), svid: Arc::clone(svid) })
    }

    /// Same entry, SVID and schedule (the same allocations, not merely equal values).
    pub(crate) fn same_as(&self, other: &Slot) -> bool {
        let same_minted = match (&self.minted, &other.minted) {
            (Some(a), Some(b)) => {
                Arc::ptr_eq(&a.entry, &b.entry) && Arc::ptr_eq(&a.svid, &b.svid) && a.renew_at == b.renew_at
            }
            (None, None) => true,
            _ => false,
        };
        Arc::ptr_eq(&self.entry, &other.entry) && same_minted && self.timer == other.timer
    }
}

/// Where a range of the selector index starts: the first key with this selector key.
struct IndexStart(u64);

impl Equivalent<(u64, EntryId)> for IndexStart {
    fn equivalent(&self, key: &(u64, EntryId)) -> bool {
        self.compare(key) == Ordering::Equal
    }
}

impl Comparable<(u64, EntryId)> for IndexStart {
    fn compare(&self, key: &(u64, EntryId)) -> Ordering {
        // Before every entry ID with that selector key: the empty ID sorts first.
        (self.0, "").cmp(&(key.0, &*key.1))
    }
}

/// Everything the agent can serve at one point in time.
///
/// Entries live in persistent maps (`imbl`): a snapshot shares its structure with the one
/// before it, so publishing one is O(1) and changing one entry or SVID is O(log N), whatever
/// the number of entries N. A caller's identities are found through an index on each entry's
/// first selector, so a reader's view costs O(log N) plus the entries that could match it, not
/// a scan of every entry (issue 7: entries created one by one cost a full copy and a full scan
/// each before).
///
/// Memory (issue 7, bench A7): one [`Slot`] per entry holds the entry, its SVID and the
/// manager's schedule, keyed by the entry's interned ID. The selector index holds a hash of
/// the first selector and the interned ID, nothing that owns entry data: an imbl B-tree keeps
/// copies of keys in its branch nodes after the entries they came from are replaced, so no key
/// may own more than the (shared) ID.
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
    slots: OrdMap<EntryId, Slot>,
    /// (selector key of the first selector, entry ID) of every entry: see
    /// [`AgentSnapshot::selector_key`].
    by_first_selector: OrdSet<(u64, EntryId)>,
    /// The hash behind the selector keys, keyed at random once per process start (a chosen
    /// selector cannot be made to collide with another caller's on purpose).
    selector_hash: RandomState,
    /// How many slots serve an SVID.
    identity_count: usize,
}

impl fmt::Debug for AgentSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSnapshot")
            .field("revision", &self.revision)
            .field("ready", &self.ready)
            .field("entries", &self.slots.len())
            .field("identities", &self.identity_count)
            .finish_non_exhaustive()
    }
}

impl AgentSnapshot {
    /// An empty, not-ready snapshot for a trust domain.
    pub fn empty(bundles: BundleSet) -> Self {
        Self {
            revision: 0,
            ready: false,
            bundles: Arc::new(bundles),
            slots: OrdMap::new(),
            by_first_selector: OrdSet::new(),
            selector_hash: RandomState::new(),
            identity_count: 0,
        }
    }

    /// Every entry, by entry ID.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<CachedEntry>> + '_ {
        self.slots.values().map(|slot| &slot.entry)
    }

    /// How many entries the agent holds.
    pub fn entry_count(&self) -> usize {
        self.slots.len()
    }

    /// The entry with this ID.
    pub fn entry(&self, id: &str) -> Option<&Arc<CachedEntry>> {
        self.slots.get(id).map(|slot| &slot.entry)
    }

    /// Every identity (entry with a current SVID), by entry ID.
    pub fn identities(&self) -> impl Iterator<Item = Identity> + '_ {
        self.slots.values().filter_map(Slot::identity)
    }

    /// How many entries have a current SVID.
    pub fn identity_count(&self) -> usize {
        self.identity_count
    }

    /// The identity of the entry with this ID.
    pub fn identity(&self, entry_id: &str) -> Option<Identity> {
        self.slots.get(entry_id).and_then(Slot::identity)
    }

    /// The slot of an entry (the manager's record of it).
    pub(crate) fn slot(&self, id: &str) -> Option<&Slot> {
        self.slots.get(id)
    }

    /// Every slot, by entry ID.
    pub(crate) fn slots(&self) -> impl Iterator<Item = &Slot> + '_ {
        self.slots.values()
    }

    /// The index key of an entry's first selector: a hash of it, never 0, or 0 for an entry
    /// without selectors (which matches every caller). Entries whose first selectors collide
    /// are only extra candidates: every candidate's selectors are compared in full.
    fn selector_key(&self, first: Option<&Selector>) -> u64 {
        first.map_or(0, |selector| self.selector_hash.hash_one(selector).max(1))
    }

    fn index_key(&self, entry: &CachedEntry) -> u64 {
        self.selector_key(entry.selectors.iter().next())
    }

    /// Adds or replaces the slot of an entry, keeping the index and the identity count.
    /// O(log N).
    pub(crate) fn put_slot(&mut self, slot: Slot) {
        let id = Arc::clone(&slot.entry.id);
        let key = self.index_key(&slot.entry);
        let serves = slot.served().is_some();
        match self.slots.insert(Arc::clone(&id), slot) {
            Some(old) => {
                let old_key = self.index_key(&old.entry);
                if old_key != key {
                    self.by_first_selector.remove(&(old_key, Arc::clone(&id)));
                    self.by_first_selector.insert((key, id));
                }
                self.identity_count -= usize::from(old.served().is_some());
            }
            None => {
                self.by_first_selector.insert((key, id));
            }
        }
        self.identity_count += usize::from(serves);
    }

    /// Removes the slot of an entry. O(log N).
    pub(crate) fn remove_slot(&mut self, id: &str) -> Option<Slot> {
        let (id, old) = self.slots.remove_with_key(id)?;
        self.by_first_selector.remove(&(self.index_key(&old.entry), id));
        self.identity_count -= usize::from(old.served().is_some());
        Some(old)
    }

    /// The IDs in the selector index, in its order (for tests of what it holds).
    #[cfg(test)]
    pub(crate) fn indexed_ids(&self) -> impl Iterator<Item = &EntryId> + '_ {
        self.by_first_selector.iter().map(|(_, id)| id)
    }

    /// The slots with their keys (for tests of what the map holds).
    #[cfg(test)]
    pub(crate) fn keyed_slots(&self) -> impl Iterator<Item = (&EntryId, &Slot)> + '_ {
        self.slots.iter()
    }

    /// Adds or replaces an entry. An identity already held for its ID keeps its SVID and
    /// takes the new entry (served while its SPIFFE ID is the entry's).
    pub fn insert_entry(&mut self, entry: Arc<CachedEntry>) {
        let slot = match self.slots.get(&*entry.id) {
            Some(old) => Slot { entry, ..old.clone() },
            None => Slot::new(entry),
        };
        self.put_slot(slot);
    }

    /// Adds or replaces an identity, and its entry.
    pub fn insert_identity(&mut self, identity: Identity) {
        let mut slot = match self.slots.get(&*identity.entry.id) {
            Some(old) => Slot { entry: Arc::clone(&identity.entry), ..old.clone() },
            None => Slot::new(Arc::clone(&identity.entry)),
        };
        let renew_at = Deadline::at(identity.svid.expires_at());
        slot.minted = Some(Minted { entry: identity.entry, svid: identity.svid, renew_at });
        self.put_slot(slot);
    }

    /// Removes the identity of an entry (the entry stays); returns whether there was one.
    pub fn remove_identity(&mut self, entry_id: &str) -> bool {
        let Some(old) = self.slots.get(entry_id) else {
            return false;
        };
        let had = old.served().is_some();
        let slot = Slot { minted: None, ..old.clone() };
        self.put_slot(slot);
        had
    }

    /// Removes an entry and its identity.
    pub fn remove_entry(&mut self, entry_id: &str) {
        self.remove_slot(entry_id);
    }

    /// Removes every identity (the entries stay). O(N).
    pub fn clear_identities(&mut self) {
        let ids: Vec<EntryId> =
            self.slots.values().filter(|slot| slot.minted.is_some()).map(|slot| Arc::clone(&slot.entry.id)).collect();
        for id in ids {
            self.remove_identity(&id);
        }
    }

    /// The entries that can match a caller with `selectors`: those whose first selector is one
    /// of the caller's (an entry matches only when all of its selectors are the caller's), and
    /// those without selectors; and a few whose first selector's key collides with one of
    /// those. O(|selectors| log N + candidates).
    fn candidates<'s, 'q>(
        &'s self,
        selectors: &'q SelectorSet,
    ) -> impl Iterator<Item = &'s Arc<CachedEntry>> + use<'s, 'q> {
        let starts = std::iter::once(None).chain(selectors.iter().map(Some));
        starts.flat_map(move |first| {
            let key = self.selector_key(first);
            self.by_first_selector
                .range(IndexStart(key)..)
                .take_while(move |(indexed, _)| *indexed == key)
                .filter_map(|(_, id)| self.slots.get(id).map(|slot| &slot.entry))
        })
    }

    /// The identities a caller with `selectors` is entitled to, in a stable order (entry
    /// SPIFFE ID, then entry ID), so that the first one is a deterministic default.
    pub fn identities_for(&self, selectors: &SelectorSet) -> Vec<Identity> {
        let mut found: Vec<Identity> = self
            .candidates(selectors)
            .filter(|entry| entry.selectors.is_subset_of(selectors))
            .filter_map(|entry| self.identity(&entry.id))
            .collect();
        found.sort_by(|a, b| {
            (a.entry.spiffe_id.as_str(), &*a.entry.id).cmp(&(b.entry.spiffe_id.as_str(), &*b.entry.id))
        });
        found
    }

    /// The entries matching `selectors`, whether or not they have an SVID yet, by entry ID.
    pub fn entries_for(&self, selectors: &SelectorSet) -> Vec<&Arc<CachedEntry>> {
        let mut found: Vec<&Arc<CachedEntry>> =
            self.candidates(selectors).filter(|entry| entry.selectors.is_subset_of(selectors)).collect();
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
            id: id.into(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: SelectorSet::parse_all(selectors).unwrap(),
            federates_with: Box::default(),
            hint: String::new(),
            revision: 1,
        })
    }

    fn identity(entry: Arc<CachedEntry>) -> Identity {
        let svid = X509Svid::from_chain(&[vec![1, 2, 3]], &[4, 5, 6], SystemTime::UNIX_EPOCH);
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
        let found = snapshot.identities_for(&caller);
        let ids: Vec<&str> = found.iter().map(|i| i.entry.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/db", "spiffe://example.org/web"]);

        let partial = SelectorSet::parse_all(&["unix:uid:1000"]).unwrap();
        let found = snapshot.identities_for(&partial);
        let ids: Vec<&str> = found.iter().map(|i| i.entry.spiffe_id.as_str()).collect();
        assert_eq!(ids, ["spiffe://example.org/web"]);

        assert!(snapshot.identities_for(&SelectorSet::new()).is_empty());
    }

    #[test]
    fn the_selector_index_follows_replaced_and_removed_entries() {
        let mut snapshot = snapshot();
        let caller = SelectorSet::parse_all(&["unix:uid:1000", "unix:gid:50"]).unwrap();
        let ids = |snapshot: &AgentSnapshot, selectors: &SelectorSet| -> Vec<String> {
            snapshot.entries_for(selectors).iter().map(|entry| entry.id.to_string()).collect()
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
    fn svids_with_the_same_intermediates_share_one_copy() {
        let mut recent = Vec::new();
        let (a, b) = (vec![vec![1u8, 2], vec![3]], vec![vec![9u8]]);
        let first = Intermediates::share(&a, &mut recent, 2);
        let again = Intermediates::share(&a.clone(), &mut recent, 2);
        assert!(first.ptr_eq(&again), "equal intermediates must be one copy");
        assert_eq!(first.iter().collect::<Vec<_>>(), [&[1u8, 2][..], &[3][..]]);
        let other = Intermediates::share(&b, &mut recent, 2);
        assert!(!other.ptr_eq(&first));
        // None: nothing allocated, nothing remembered.
        let none = Intermediates::share(&[], &mut recent, 2);
        assert!(none.is_empty() && none.ptr_eq(&Intermediates::none()));
        assert_eq!(recent.len(), 2);
        // Only the `keep` most recent are remembered: a third chain pushes out the oldest.
        let seven = Intermediates::share(&[vec![7u8]], &mut recent, 2);
        assert_eq!(recent.len(), 2);
        assert!(!Intermediates::share(&a, &mut recent, 2).ptr_eq(&first));
        assert!(Intermediates::share(&[vec![7u8]], &mut recent, 2).ptr_eq(&seven));
    }

    #[test]
    fn an_svid_holds_its_leaf_and_key_in_one_buffer() {
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let svid = X509Svid::from_chain(&[vec![1, 2, 3], vec![4, 5]], &[6, 7], expires);
        assert_eq!(svid.leaf(), [1, 2, 3]);
        assert_eq!(svid.private_key_pkcs8(), [6, 7]);
        assert_eq!(svid.intermediates().len(), 1);
        assert_eq!(svid.chain_refs(), [&[1u8, 2, 3][..], &[4, 5][..]]);
        assert_eq!(svid.chain_der(), [1, 2, 3, 4, 5]);
        assert_eq!(svid.expires_at(), expires);
        let empty = X509Svid::from_chain(&[], &[6], expires);
        assert!(empty.leaf().is_empty() && empty.intermediates().is_empty());
        assert_eq!(empty.private_key_pkcs8(), [6]);
    }

    #[test]
    fn deadlines_round_up_to_the_millisecond_and_stay_in_range() {
        let epoch = SystemTime::UNIX_EPOCH;
        let whole = epoch + Duration::from_millis(1_700_000_000_123);
        assert_eq!(Deadline::at(whole).time(), whole);
        let partial = whole + Duration::from_nanos(1);
        assert_eq!(Deadline::at(partial).time(), whole + Duration::from_millis(1), "never earlier than asked");
        assert!(Deadline::at(whole) < Deadline::at(partial));
        assert_eq!(Deadline::at(epoch - Duration::from_secs(5)).time(), epoch + Duration::from_millis(1));
        let far = epoch + Duration::from_secs(400_000_000_000);
        assert_eq!(Deadline::at(far).time(), epoch + Duration::from_millis(Deadline::LAST_MILLIS));
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
