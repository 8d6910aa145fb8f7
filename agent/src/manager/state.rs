//! The manager's mutable state and the pure rules that change it: applying sync events,
//! deciding which entries need an X.509-SVID, and building the published snapshot.
//!
//! Nothing here does I/O, so every rule is unit-tested with plain values.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_spiffe::bundle::{Bundle, BundleSet};
use tessera_spiffe::selector::{Selector, SelectorSet};
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_wire::tessera::agent::v1::sync_entries_response::Event;
use tessera_wire::tessera::common::v1 as common;

pub use crate::cache::Minted;
use crate::cache::{AgentSnapshot, CachedEntry, Deadline, EntryId, Intermediates, Slot};

/// How many distinct intermediate chains [`State::share_intermediates`] remembers (one per
/// signing authority in use: a rotation has two at once).
const RECENT_INTERMEDIATES: usize = 4;

/// A snapshot being received page by page.
#[derive(Debug, Default)]
struct PendingSnapshot {
    revision: u64,
    next_page: u32,
    entries: BTreeMap<EntryId, CachedEntry>,
}

/// An entry's next time-based event, in the timer set: ordered by time, then entry ID. It
/// holds the entry itself (a pointer), not a copy of its ID.
#[derive(Debug, Clone)]
struct Timer {
    at: Deadline,
    entry: Arc<CachedEntry>,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Timer {}

impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, &*self.entry.id).cmp(&(other.at, &*other.entry.id))
    }
}

/// What a sync event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The entry set changed (minting may be needed, a snapshot must be published).
    pub entries_changed: bool,
    /// The bundles changed (persist the own bundle, update TLS trust).
    pub bundles_changed: bool,
    /// The stream reported `synced`.
    pub synced: bool,
    /// The server's set of tainted X.509 authorities changed: SVIDs they signed were scheduled
    /// for early renewal (wake the minter and the agent SVID renewal).
    pub taint_changed: bool,
}

/// SVIDs of a tainted authority are re-minted spread over this interval (by a hash of the
/// entry ID), in the minter's normal batches, rather than all at once.
pub const TAINT_SPREAD: Duration = Duration::from_secs(10);

/// The manager's view of the world.
///
/// # Cost per change
///
/// Every rule here costs O(log N) per changed entry, whatever the number N of entries held
/// (issue 7: entries created one by one used to cost a scan and a copy of all N each):
///
/// - the published view (one slot per entry with its SVID, and the selector index) is an
///   [`AgentSnapshot`] kept up to date change by change in persistent sets;
///   [`State::snapshot`] clones it in O(1);
/// - the entries that need an SVID now are a set (`pending`), kept by [`State::touch`] each
///   time something about an entry changes, so [`State::mint_work`] returns them without a
///   scan;
/// - each entry's next time-based event (renewal point, retry, SVID expiry) is one key in an
///   ordered set (`timers`): the next deadline is its first key, and only entries whose time
///   has come are looked at again.
///
/// [`State::work`] counts the entries these operations visit, so a test can hold the cost of
/// one change flat as N grows. A whole snapshot from the server and a newly tainted authority
/// visit every entry once, as they must.
///
/// # Memory per entry
///
/// Issue 7 (bench A7): the agent's memory per cached SVID must stay within twice the leaf and
/// key themselves. So each entry is held once: its slot in the view carries the entry, the
/// minted SVID (leaf and key in one buffer, intermediates shared) and its timer; `pending`
/// and `retries` name the entry by its interned ID, the same allocation as `entry.id` (a
/// changed entry keeps the ID allocation of the one it replaces), and `timers` point at the
/// entry itself. No set copies an ID, a SPIFFE ID or a selector
/// (`tests::every_set_shares_the_entry_and_its_id`, `agent/tests/memory_per_svid.rs`).
#[derive(Debug)]
pub struct State {
    trust_domain: TrustDomain,
    /// Last fully applied datastore revision.
    pub revision: u64,
    /// True after the first `synced`.
    pub ready: bool,
    /// What is published: one slot per entry (entry, SVID, schedule) and the selector index.
    view: AgentSnapshot,
    /// Entries that need an SVID now.
    pending: BTreeSet<EntryId>,
    /// Entries whose last mint failed (few), and when to try again.
    retries: BTreeMap<EntryId, Deadline>,
    /// Each entry's next renewal point, retry or SVID expiry, by time. An entry's time is also
    /// in its slot (`Slot::timer`), so that it can be found and removed.
    timers: BTreeSet<Timer>,
    /// The intermediates of recent SVIDs, most recent first: SVIDs minted under the same
    /// intermediates share one copy.
    recent_intermediates: Vec<Intermediates>,
    /// Own and federated bundles.
    pub bundles: BundleSet,
    /// DER certificates of the server's tainted X.509 authorities (forced rotation).
    pub tainted_x509: Vec<Vec<u8>>,
    /// Key IDs of the server's tainted JWT keys: cached JWT-SVIDs they signed are not served.
    pub tainted_jwt_key_ids: Vec<String>,
    pending_snapshot: Option<PendingSnapshot>,
    work: u64,
}

impl State {
    /// Empty state; `bundle` is the cached own bundle, if any.
    pub fn new(trust_domain: TrustDomain, bundle: Option<Bundle>) -> Self {
        let own = bundle.unwrap_or_else(|| Bundle::new(trust_domain.clone()));
        let bundles = BundleSet::new(own);
        Self {
            trust_domain,
            revision: 0,
            ready: false,
            view: AgentSnapshot::empty(bundles.clone()),
            pending: BTreeSet::new(),
            retries: BTreeMap::new(),
            timers: BTreeSet::new(),
            recent_intermediates: Vec::new(),
            bundles,
            tainted_x509: Vec::new(),
            tainted_jwt_key_ids: Vec::new(),
            pending_snapshot: None,
            work: 0,
        }
    }

    /// Entries visited by the operations so far (see the type's docs): the measure of work
    /// per change that the scale tests hold flat.
    pub fn work(&self) -> u64 {
        self.work
    }

    /// The bundles as published (the same set as [`State::bundles`], shared): what a check
    /// done outside the lock verifies against.
    pub fn shared_bundles(&self) -> Arc<BundleSet> {
        Arc::clone(&self.view.bundles)
    }

    /// The authorized entry with this ID.
    pub fn entry(&self, id: &str) -> Option<&Arc<CachedEntry>> {
        self.view.entry(id)
    }

    /// How many entries are held.
    pub fn entry_count(&self) -> usize {
        self.view.entry_count()
    }

    /// The IDs of the entries held, in order.
    pub fn entry_ids(&self) -> Vec<&str> {
        self.view.entries().map(|entry| &*entry.id).collect()
    }

    /// The SVID minted for an entry.
    pub fn minted(&self, entry_id: &str) -> Option<&Minted> {
        self.view.slot(entry_id).and_then(|slot| slot.minted.as_ref())
    }

    /// How many SVIDs are held. O(N).
    pub fn minted_count(&self) -> usize {
        self.view.slots().filter(|slot| slot.minted.is_some()).count()
    }

    /// The intermediates `ders` (the chain after the leaf) as the SVID will keep them: the
    /// copy an earlier SVID holds when it has the same ones, so that thousands of SVIDs under
    /// one intermediate CA hold one copy of it.
    pub fn share_intermediates(&mut self, ders: &[Vec<u8>]) -> Intermediates {
        Intermediates::share(ders, &mut self.recent_intermediates, RECENT_INTERMEDIATES)
    }

    /// Records an SVID minted for `entry_id` (clearing a retry mark). Ignored when the entry
    /// is no longer held.
    pub fn set_minted(&mut self, entry_id: &str, minted: Minted, now: SystemTime) {
        self.touch_with(entry_id, now, |slot, retry| {
            *retry = None;
            slot.minted = Some(minted);
        });
    }

    /// Marks `entry_id` to be minted again no earlier than `at` (its last mint failed).
    pub fn set_retry(&mut self, entry_id: &str, at: SystemTime, now: SystemTime) {
        self.touch_with(entry_id, now, |_, retry| *retry = Some(Deadline::at(at)));
    }

    /// Forgets a half-received snapshot (the stream broke).
    pub fn stream_reset(&mut self) {
        self.pending_snapshot = None;
    }

    /// Brings the indexes of one entry up to date with its entry, SVID and retry mark at
    /// `now`: drops an expired SVID, adds the entry to or removes it from the mint work, and
    /// sets its next timer. Returns whether an SVID was dropped. O(log N).
    fn touch(&mut self, id: &str, now: SystemTime) -> bool {
        self.touch_with(id, now, |_, _| {})
    }

    /// [`State::touch`] after `change` to the entry's slot and retry point (nothing when the
    /// entry is not held).
    fn touch_with(&mut self, id: &str, now: SystemTime, change: impl FnOnce(&mut Slot, &mut Option<Deadline>)) -> bool {
        self.work += 1;
        let Some(old) = self.view.slot(id) else {
            return false;
        };
        let mut slot = old.clone();
        let mut retry = self.retries.remove(id);
        change(&mut slot, &mut retry);
        if let Some(at) = slot.timer.take() {
            self.timers.remove(&Timer { at, entry: Arc::clone(&slot.entry) });
        }
        let mut dropped = false;
        if slot.minted.as_ref().is_some_and(|minted| minted.svid.expires_at() <= now) {
            slot.minted = None;
            dropped = true;
        }
        // Only a retry still to come counts; a past one is forgotten.
        let retry = retry.filter(|at| at.time() > now);
        let minted = slot.minted.as_ref();
        let needs_svid = retry.is_none()
            && minted
                .is_none_or(|minted| minted.entry.revision != slot.entry.revision || minted.renew_at.time() <= now);
        slot.timer = [retry, minted.map(|m| m.renew_at), minted.map(|m| Deadline::at(m.svid.expires_at()))]
            .into_iter()
            .flatten()
            .filter(|at| at.time() > now)
            .min();
        if let Some(at) = retry {
            self.retries.insert(Arc::clone(&slot.entry.id), at);
        }
        if needs_svid {
            self.pending.insert(Arc::clone(&slot.entry.id));
        } else {
            self.pending.remove(id);
        }
        if let Some(at) = slot.timer {
            self.timers.insert(Timer { at, entry: Arc::clone(&slot.entry) });
        }
        // Unchanged slots are not written: a write copies the path the published snapshot
        // shares.
        if self.view.slot(id).is_none_or(|old| !old.same_as(&slot)) {
            self.view.put_slot(slot);
        }
        dropped
    }

    /// Adds or replaces an entry (the replacement keeps the allocation of the ID it replaces,
    /// so every set naming the entry keeps sharing it); an upsert also clears a retry mark.
    fn put_entry(&mut self, mut entry: CachedEntry, clear_retry: bool, now: SystemTime) {
        let slot = match self.view.slot(&entry.id) {
            Some(old) => {
                entry.id = Arc::clone(&old.entry.id);
                Slot { entry: Arc::new(entry), ..old.clone() }
            }
            None => Slot::new(Arc::new(entry)),
        };
        let id = Arc::clone(&slot.entry.id);
        if clear_retry {
            self.retries.remove(&id);
        }
        self.view.put_slot(slot);
        self.touch(&id, now);
    }

    /// Forgets an entry, its SVID, retry mark and timer. O(log N).
    fn remove_entry(&mut self, id: &str) {
        self.work += 1;
        if let Some(old) = self.view.remove_slot(id) {
            if let Some(at) = old.timer {
                self.timers.remove(&Timer { at, entry: old.entry });
            }
            self.pending.remove(id);
            self.retries.remove(id);
        }
    }

    /// Looks again at every entry whose timer is due at `now`; returns whether an SVID was
    /// dropped because it expired. O(log N) per due entry.
    fn advance(&mut self, now: SystemTime) -> bool {
        let mut dropped = false;
        while let Some(first) = self.timers.first().cloned() {
            if first.at.time() > now {
                break;
            }
            if self.view.slot(&first.entry.id).is_none_or(|slot| slot.timer != Some(first.at)) {
                // Not the entry's current timer (cannot happen: the slot and the set change
                // together); drop it rather than look at it forever.
                self.timers.remove(&first);
                continue;
            }
            dropped |= self.touch(&first.entry.id, now);
        }
        dropped
    }

    /// Applies one sync event. A malformed entry is logged and skipped; a protocol violation
    /// (pages out of order) is an error, after which the caller reopens the stream.
    pub fn apply(&mut self, event: Event, now: SystemTime) -> Result<Applied, String> {
        let mut applied = Applied::default();
        match event {
            Event::SnapshotPage(page) => {
                if page.page == 0 {
                    self.pending_snapshot =
                        Some(PendingSnapshot { revision: page.revision, ..PendingSnapshot::default() });
                }
                let pending = self
                    .pending_snapshot
                    .as_mut()
                    .ok_or_else(|| format!("snapshot page {} arrived without page 0", page.page))?;
                if page.page != pending.next_page || page.revision != pending.revision {
                    let expected = pending.next_page;
                    self.pending_snapshot = None;
                    return Err(format!(
                        "snapshot page {} (revision {}) arrived, expected page {expected}",
                        page.page, page.revision
                    ));
                }
                pending.next_page = pending.next_page.saturating_add(1);
                for wire in page.entries {
                    if let Some(entry) = convert_entry(&self.trust_domain, wire, now) {
                        pending.entries.insert(Arc::clone(&entry.id), entry);
                    }
                }
                if page.last_page
                    && let Some(done) = self.pending_snapshot.take()
                {
                    // The whole set is replaced: every entry is visited once.
                    let removed: Vec<EntryId> = self
                        .view
                        .entries()
                        .filter(|entry| !done.entries.contains_key(&entry.id))
                        .map(|entry| Arc::clone(&entry.id))
                        .collect();
                    for id in removed {
                        self.remove_entry(&id);
                    }
                    for (id, entry) in done.entries {
                        if self.view.entry(&id).is_some_and(|held| **held == entry) {
                            self.touch(&id, now);
                        } else {
                            self.put_entry(entry, false, now);
                        }
                    }
                    self.revision = done.revision;
                    applied.entries_changed = true;
                }
            }
            Event::EntryUpserted(upsert) => {
                let Some(wire) = upsert.entry else {
                    return Err("entry_upserted without an entry".to_owned());
                };
                let id = wire.id.clone();
                match convert_entry(&self.trust_domain, wire, now) {
                    Some(entry) => self.put_entry(entry, true, now),
                    // An entry this agent cannot use is as good as absent.
                    None => self.remove_entry(&id),
                }
                self.revision = self.revision.max(upsert.revision);
                applied.entries_changed = true;
            }
            Event::EntryDeleted(deleted) => {
                self.remove_entry(&deleted.entry_id);
                self.revision = self.revision.max(deleted.revision);
                applied.entries_changed = true;
            }
            Event::Bundles(update) => {
                let own = update.bundle.ok_or_else(|| "bundles update without the own bundle".to_owned())?;
                let own = convert_bundle(own)?;
                if own.trust_domain() != &self.trust_domain {
                    return Err(format!(
                        "the server sent the bundle of {} as its own, expected {}",
                        own.trust_domain(),
                        self.trust_domain
                    ));
                }
                if own.x509_authorities().len() == 0 {
                    return Err("the server's own bundle has no X.509 authority".to_owned());
                }
                let mut bundles = BundleSet::new(own);
                for wire in update.federated_bundles {
                    match convert_bundle(wire) {
                        Ok(bundle) if bundle.trust_domain() != &self.trust_domain => {
                            if let Err(error) = bundles.insert_federated(bundle) {
                                tracing::warn!("skipping a federated bundle: {error}");
                            }
                        }
                        Ok(_) => tracing::warn!("skipping a federated bundle for the agent's own trust domain"),
                        Err(error) => tracing::warn!("skipping a malformed federated bundle: {error}"),
                    }
                }
                applied.bundles_changed = bundles != self.bundles;
                if applied.bundles_changed {
                    self.view.bundles = Arc::new(bundles.clone());
                }
                self.bundles = bundles;
                self.tainted_jwt_key_ids = update.tainted_jwt_key_ids;
                if update.tainted_x509_authorities != self.tainted_x509 {
                    self.tainted_x509 = update.tainted_x509_authorities;
                    self.reschedule_tainted(now);
                    applied.taint_changed = true;
                }
            }
            Event::Synced(synced) => {
                self.revision = self.revision.max(synced.revision);
                self.ready = true;
                applied.synced = true;
            }
        }
        Ok(applied)
    }

    /// Brings the renewal of every SVID signed by a tainted X.509 authority forward to a point
    /// in the next [`TAINT_SPREAD`] (spread by entry ID). Returns whether any moved.
    pub fn reschedule_tainted(&mut self, now: SystemTime) -> bool {
        let mut moved = Vec::new();
        for slot in self.view.slots() {
            self.work += 1;
            let Some(minted) = &slot.minted else {
                continue;
            };
            if !signed_by_any(&minted.svid.chain_refs(), &self.tainted_x509, &self.trust_domain, now) {
                continue;
            }
            let at = Deadline::at(now + spread(&slot.entry.id, TAINT_SPREAD));
            if minted.renew_at > at {
                moved.push((Arc::clone(&slot.entry.id), at));
            }
        }
        for (entry_id, at) in &moved {
            self.touch_with(entry_id, now, |slot, _| {
                if let Some(minted) = &mut slot.minted {
                    minted.renew_at = *at;
                }
            });
        }
        if !moved.is_empty() {
            tracing::warn!("the server tainted an X.509 authority; re-minting the SVIDs it signed");
        }
        !moved.is_empty()
    }

    /// Forgets SVIDs that have expired at `now` (they must not be served; their entries are
    /// minted again). Returns whether any was dropped, i.e. whether to publish.
    pub fn drop_expired(&mut self, now: SystemTime) -> bool {
        self.advance(now)
    }

    /// Entries that need a (new) X.509-SVID at `now`: none yet, minted for an older
    /// revision, or past the renewal point; except those waiting for a retry. O(log N) per
    /// entry whose time came, plus the entries returned.
    pub fn mint_work(&mut self, now: SystemTime) -> Vec<Arc<CachedEntry>> {
        self.advance(now);
        let work: Vec<Arc<CachedEntry>> = self.pending.iter().filter_map(|id| self.view.entry(id).cloned()).collect();
        self.work += work.len() as u64;
        work
    }

    /// The next moment something time-based happens: a renewal, a retry, or an SVID expiring
    /// (it must leave the published snapshot). A moment already past means "now".
    pub fn next_deadline(&self, _now: SystemTime) -> Option<SystemTime> {
        self.timers.first().map(|timer| timer.at.time())
    }

    /// The snapshot to publish: every entry, and an identity for each entry with an
    /// unexpired SVID carrying the entry's SPIFFE ID (an SVID minted for an older revision is
    /// still served while it is re-minted, unless the SPIFFE ID changed). SVIDs expired at
    /// `now` are dropped first. O(1) plus the entries whose time came.
    pub fn snapshot(&mut self, now: SystemTime) -> AgentSnapshot {
        self.advance(now);
        let mut snapshot = self.view.clone();
        snapshot.revision = self.revision;
        snapshot.ready = self.ready;
        snapshot
    }
}

/// Whether `chain` (leaf first) was signed by one of the `authorities` (DER): one of them is
/// in the chain (an intermediate), or the chain verifies against it as the only root.
pub fn signed_by_any(chain: &[&[u8]], authorities: &[Vec<u8>], trust_domain: &TrustDomain, now: SystemTime) -> bool {
    authorities.iter().any(|authority| {
        if chain.iter().skip(1).any(|cert| *cert == authority.as_slice()) {
            return true;
        }
        let mut single = Bundle::new(trust_domain.clone());
        single.add_x509_authority(authority).is_ok()
            && tessera_spiffe::x509::verify_x509_svid(chain, &single, now).is_ok()
    })
}

/// A deterministic offset in `[0, window)` for `key`, so work on many keys spreads out.
pub fn spread(key: &str, window: Duration) -> Duration {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    let fraction = u64::from_be_bytes(first) as f64 / u64::MAX as f64;
    window.mul_f64(fraction)
}

/// Converts a wire entry, or logs why it is unusable and returns `None`.
pub fn convert_entry(trust_domain: &TrustDomain, wire: common::Entry, now: SystemTime) -> Option<CachedEntry> {
    let id = wire.id.clone();
    match try_convert_entry(trust_domain, wire, now) {
        Ok(entry) => entry,
        Err(reason) => {
            tracing::warn!(entry_id = %id.escape_debug(), "skipping an entry from the server: {reason}");
            None
        }
    }
}

fn try_convert_entry(
    trust_domain: &TrustDomain,
    wire: common::Entry,
    now: SystemTime,
) -> Result<Option<CachedEntry>, String> {
    if wire.id.is_empty() || wire.id.len() > 256 {
        return Err("the entry ID is empty or longer than 256 bytes".to_owned());
    }
    let spiffe_id = SpiffeId::parse(&wire.spiffe_id).map_err(|error| format!("spiffe_id: {error}"))?;
    if !spiffe_id.is_member_of(trust_domain) || spiffe_id.is_trust_domain_id() {
        return Err(format!("spiffe_id {spiffe_id} is not a workload ID in {trust_domain}"));
    }
    if wire.selectors.is_empty() {
        return Err("the entry has no selectors (it would match every caller)".to_owned());
    }
    let mut selectors = Vec::with_capacity(wire.selectors.len());
    for selector in &wire.selectors {
        selectors.push(Selector::new(&selector.r#type, &selector.value).map_err(|error| format!("selector: {error}"))?);
    }
    // Held for the entry's life: no spare capacity (duplicates removed first).
    selectors.sort();
    selectors.dedup();
    selectors.shrink_to_fit();
    let selectors = SelectorSet::from(selectors);
    let mut federates_with = Vec::with_capacity(wire.federates_with.len());
    for name in &wire.federates_with {
        if name.contains(':') {
            return Err(format!("federates_with {name:?}: expected a bare trust domain name"));
        }
        federates_with.push(TrustDomain::new(name).map_err(|error| format!("federates_with {name:?}: {error}"))?);
    }
    federates_with.sort();
    federates_with.dedup();
    if wire.expires_at > 0 {
        let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(wire.expires_at.unsigned_abs());
        if expires <= now {
            tracing::debug!(entry_id = %wire.id, "ignoring an expired entry");
            return Ok(None);
        }
    }
    let mut hint = wire.hint;
    hint.shrink_to_fit();
    Ok(Some(CachedEntry {
        id: EntryId::from(wire.id.as_str()),
        spiffe_id,
        selectors,
        federates_with: federates_with.into_boxed_slice(),
        hint,
        revision: wire.revision,
    }))
}

/// Converts a wire bundle.
pub fn convert_bundle(wire: common::Bundle) -> Result<Bundle, String> {
    let trust_domain = TrustDomain::new(&wire.trust_domain).map_err(|error| format!("bundle trust domain: {error}"))?;
    let mut bundle = Bundle::new(trust_domain.clone());
    for der in &wire.x509_authorities {
        bundle.add_x509_authority(der).map_err(|error| format!("bundle of {trust_domain}: {error}"))?;
    }
    for authority in &wire.jwt_authorities {
        let key = tessera_spiffe::keys::PublicKey::from_spki_der(&authority.public_key)
            .map_err(|error| format!("bundle of {trust_domain}: JWT authority {:?}: {error}", authority.key_id))?;
        bundle
            .add_jwt_authority(authority.key_id.clone(), key)
            .map_err(|error| format!("bundle of {trust_domain}: {error}"))?;
    }
    bundle.set_sequence(wire.sequence);
    if wire.refresh_hint_seconds > 0 {
        bundle.set_refresh_hint(Some(Duration::from_secs(wire.refresh_hint_seconds.unsigned_abs())));
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::X509Svid;
    use tessera_wire::tessera::agent::v1::{BundlesUpdate, EntryDeleted, EntrySnapshotPage, EntryUpserted, Synced};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn wire_entry(id: &str, path: &str, revision: u64) -> common::Entry {
        common::Entry {
            id: id.to_owned(),
            spiffe_id: format!("spiffe://example.org/{path}"),
            parent_id: "spiffe://example.org/tessera/agent/join_token/t".to_owned(),
            selectors: vec![common::Selector { r#type: "unix".to_owned(), value: "uid:1000".to_owned() }],
            revision,
            ..common::Entry::default()
        }
    }

    fn page(revision: u64, page: u32, entries: Vec<common::Entry>, last_page: bool) -> Event {
        Event::SnapshotPage(EntrySnapshotPage { revision, page, entries, last_page })
    }

    /// The current time to the millisecond (what the manager's deadlines hold).
    fn now() -> SystemTime {
        let since = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
    }

    fn minted(spiffe_id: &str, revision: u64, renew_at: SystemTime, expires_at: SystemTime) -> Minted {
        let entry = CachedEntry {
            id: "minted-for".into(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: SelectorSet::new(),
            federates_with: Box::default(),
            hint: String::new(),
            revision,
        };
        let svid = X509Svid::from_chain(&[vec![1]], &[2], expires_at);
        Minted { entry: Arc::new(entry), svid: Arc::new(svid), renew_at: Deadline::at(renew_at) }
    }

    #[test]
    fn paged_snapshot_replaces_the_entry_set_on_the_last_page() {
        let now = now();
        let mut state = State::new(td(), None);
        state.apply(page(5, 0, vec![wire_entry("a", "a", 1)], true), now).unwrap();
        assert_eq!(state.entry_count(), 1);

        let applied = state.apply(page(9, 0, vec![wire_entry("b", "b", 7)], false), now).unwrap();
        assert!(!applied.entries_changed);
        assert!(state.entry("a").is_some(), "the old set stays until the last page");
        assert_eq!(state.revision, 5);
        let applied = state.apply(page(9, 1, vec![wire_entry("c", "c", 8)], true), now).unwrap();
        assert!(applied.entries_changed);
        assert_eq!(state.entry_ids(), ["b", "c"]);
        assert_eq!(state.revision, 9);

        assert!(state.apply(page(10, 3, vec![], true), now).is_err(), "page without page 0");
        state.apply(page(10, 0, vec![], false), now).unwrap();
        assert!(state.apply(page(10, 2, vec![], true), now).is_err(), "skipped page");
    }

    #[test]
    fn upserts_and_deletes_track_revisions_and_drop_svids() {
        let now = now();
        let later = now + Duration::from_secs(60);
        let mut state = State::new(td(), None);
        let upsert = |entry, revision| Event::EntryUpserted(EntryUpserted { entry: Some(entry), revision });
        state.apply(upsert(wire_entry("a", "a", 3), 3), now).unwrap();
        state.apply(upsert(wire_entry("b", "b", 4), 4), now).unwrap();
        assert_eq!(state.revision, 4);
        assert_eq!(state.mint_work(now).len(), 2);

        state.set_minted("a", minted("spiffe://example.org/a", 3, later, later), now);
        state.set_minted("b", minted("spiffe://example.org/b", 4, later, later), now);
        assert!(state.mint_work(now).is_empty());
        assert_eq!(state.snapshot(now).identity_count(), 2);

        // A changed entry is re-minted; with the same SPIFFE ID the old SVID is served meanwhile.
        state.apply(upsert(wire_entry("a", "a", 5), 5), now).unwrap();
        assert_eq!(state.mint_work(now).iter().map(|e| &*e.id).collect::<Vec<_>>(), ["a"]);
        assert_eq!(state.snapshot(now).identity_count(), 2);
        // A changed SPIFFE ID hides the old SVID at once.
        state.apply(upsert(wire_entry("a", "renamed", 6), 6), now).unwrap();
        assert_eq!(state.snapshot(now).identity_count(), 1);

        state.apply(Event::EntryDeleted(EntryDeleted { entry_id: "b".to_owned(), revision: 7 }), now).unwrap();
        assert!(state.minted("b").is_none());
        assert_eq!(state.revision, 7);
        assert!(state.snapshot(now).identity_count() == 0);
        state.apply(Event::Synced(Synced { revision: 7 }), now).unwrap();
        assert!(state.snapshot(now).ready);
    }

    #[test]
    fn renewal_and_expiry_drive_work_and_deadlines() {
        let now = now();
        let mut state = State::new(td(), None);
        state.apply(page(1, 0, vec![wire_entry("a", "a", 1)], true), now).unwrap();
        let renew = now + Duration::from_secs(5);
        let expires = now + Duration::from_secs(10);
        state.set_minted("a", minted("spiffe://example.org/a", 1, renew, expires), now);
        assert!(state.mint_work(now).is_empty());
        assert_eq!(state.next_deadline(now), Some(renew));
        assert_eq!(state.mint_work(renew).len(), 1);
        assert_eq!(state.next_deadline(renew), Some(expires));
        assert!(!state.drop_expired(renew));
        assert_eq!(state.snapshot(renew).identity_count(), 1, "served until it expires");
        assert!(state.drop_expired(expires));
        assert_eq!(state.snapshot(expires).identity_count(), 0, "an expired SVID is not served");
        assert_eq!(state.minted_count(), 0);
        assert_eq!(state.mint_work(expires).len(), 1, "an entry whose SVID expired is minted again");

        state.set_retry("a", now + Duration::from_secs(7), renew);
        assert!(state.mint_work(renew).is_empty(), "waiting for the retry");
    }

    /// Issue 7: entries created one by one while the agent holds N must cost the same per
    /// entry whatever N. The state counts the entries its operations visit; one entry's whole
    /// life (synced, minted, published, renewed, deleted) must visit as many at N = 10 as at
    /// N = 3,000. A scan of every entry per change (the mint work, the next deadline, the
    /// published snapshot) makes the large count grow by thousands.
    #[test]
    fn the_work_of_one_change_does_not_grow_with_the_entries_held() {
        fn one_entry_life(held: usize) -> (u64, usize) {
            let now = now();
            let renew = now + Duration::from_secs(1800);
            let expires = now + Duration::from_secs(3600);
            let upsert = |entry, revision| Event::EntryUpserted(EntryUpserted { entry: Some(entry), revision });
            let mut state = State::new(td(), None);
            for n in 0..held {
                let id = format!("e{n}");
                state.apply(upsert(wire_entry(&id, &id, n as u64 + 1), n as u64 + 1), now).unwrap();
                let path = format!("spiffe://example.org/{id}");
                state.set_minted(&id, minted(&path, n as u64 + 1, renew, expires), now);
            }
            assert!(state.mint_work(now).is_empty());
            let base = held as u64 + 1;
            let before = state.work();

            state.apply(upsert(wire_entry("new", "new", base), base), now).unwrap();
            let published = state.snapshot(now);
            assert_eq!(published.entry_count(), held + 1);
            let work = state.mint_work(now);
            assert_eq!(work.iter().map(|e| &*e.id).collect::<Vec<_>>(), ["new"]);
            let (new_renew, new_expires) = (now + Duration::from_secs(60), now + Duration::from_secs(120));
            state.set_minted("new", minted("spiffe://example.org/new", base, new_renew, new_expires), now);
            assert_eq!(state.snapshot(now).identity_count(), held + 1);
            assert_eq!(state.next_deadline(now), Some(new_renew));
            assert!(state.mint_work(now).is_empty());
            // Its renewal point comes: only it is looked at again.
            assert_eq!(state.mint_work(new_renew).len(), 1);
            state.set_retry("new", new_renew + Duration::from_secs(5), new_renew);
            assert!(!state.drop_expired(new_renew));
            state
                .apply(Event::EntryDeleted(EntryDeleted { entry_id: "new".to_owned(), revision: base + 1 }), now)
                .unwrap();
            let after = state.snapshot(now);
            assert_eq!((after.entry_count(), after.identity_count()), (held, held));
            (state.work() - before, held)
        }
        let (small, _) = one_entry_life(10);
        let (large, held) = one_entry_life(3_000);
        assert!(small > 0, "the count must measure something");
        assert_eq!(large, small, "one entry's life visited {large} entries with {held} held, {small} with 10");
    }

    /// Issue 7 (A7): one allocation per entry ID, shared by the entry, the map, the selector
    /// index, the mint work and the retries, and the timers and minted records point at the
    /// entry itself; a changed entry keeps its ID's allocation, and a deleted one's is freed.
    #[test]
    fn every_set_shares_the_entry_and_its_id() {
        let now = now();
        let later = now + Duration::from_secs(60);
        let mut state = State::new(td(), None);
        let upsert = |entry, revision| Event::EntryUpserted(EntryUpserted { entry: Some(entry), revision });
        for (revision, id) in (1..).zip(["a", "b", "c"]) {
            state.apply(upsert(wire_entry(id, id, revision), revision), now).unwrap();
        }
        // a has an SVID, b waits for a retry, c waits to be minted.
        let a = Arc::clone(state.entry("a").unwrap());
        let svid = Arc::new(X509Svid::from_chain(&[vec![1]], &[2], later + Duration::from_secs(60)));
        state.set_minted("a", Minted { entry: Arc::clone(&a), svid, renew_at: Deadline::at(later) }, now);
        state.set_retry("b", later, now);
        // a changes: re-minted, its SVID served meanwhile, and its ID allocation kept.
        state.apply(upsert(wire_entry("a", "a", 9), 9), now).unwrap();
        assert!(!Arc::ptr_eq(state.entry("a").unwrap(), &a));
        assert!(Arc::ptr_eq(&state.entry("a").unwrap().id, &a.id));

        let shares = |state: &State| {
            for (key, slot) in state.view.keyed_slots() {
                let id = &slot.entry.id;
                assert!(Arc::ptr_eq(key, id), "{id}: the map's key is a copy");
                assert_eq!(
                    state.view.indexed_ids().filter(|indexed| Arc::ptr_eq(indexed, id)).count(),
                    1,
                    "{id}: index"
                );
                if let Some(minted) = &slot.minted {
                    assert!(Arc::ptr_eq(&minted.entry.id, id), "{id}: the minted record's entry has a copy");
                }
                if let Some(at) = slot.timer {
                    let timer = state.timers.iter().find(|timer| *timer.entry.id == **id).unwrap();
                    assert!(Arc::ptr_eq(&timer.entry, &slot.entry) && timer.at == at, "{id}: timer");
                }
            }
            for id in state.pending.iter().chain(state.retries.keys()) {
                let held = &state.view.slot(id).unwrap().entry.id;
                assert!(Arc::ptr_eq(id, held), "{id}: mint work or retries hold a copy");
            }
        };
        shares(&state);
        assert_eq!(state.pending.iter().map(|id| &**id).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(state.retries.keys().map(|id| &**id).collect::<Vec<_>>(), ["b"]);
        assert_eq!(state.timers.len(), 2, "a's renewal, b's retry");

        // Deleting an entry frees its ID: nothing else still holds it.
        let c = Arc::clone(&state.entry("c").unwrap().id);
        state.apply(Event::EntryDeleted(EntryDeleted { entry_id: "c".to_owned(), revision: 10 }), now).unwrap();
        assert_eq!(Arc::strong_count(&c), 1, "a set still holds the deleted entry's ID");
        shares(&state);
        // A whole snapshot with unchanged entries keeps them (and their IDs) as they are.
        let held_b = Arc::clone(state.entry("b").unwrap());
        state.apply(page(11, 0, vec![wire_entry("a", "a", 9), wire_entry("b", "b", 2)], true), now).unwrap();
        assert!(Arc::ptr_eq(state.entry("b").unwrap(), &held_b));
        shares(&state);
    }

    #[test]
    fn malformed_entries_are_skipped() {
        let now = now();
        let mut bad_id = wire_entry("x", "x", 1);
        bad_id.spiffe_id = "not a spiffe id".to_owned();
        let mut foreign = wire_entry("y", "y", 1);
        foreign.spiffe_id = "spiffe://other.org/y".to_owned();
        let mut no_selectors = wire_entry("z", "z", 1);
        no_selectors.selectors.clear();
        let mut bad_selector = wire_entry("s", "s", 1);
        bad_selector.selectors[0].r#type = String::new();
        let mut bad_federation = wire_entry("f", "f", 1);
        bad_federation.federates_with = vec!["spiffe://nope".to_owned()];
        let mut expired = wire_entry("e", "e", 1);
        expired.expires_at = 1;
        let mut empty_id = wire_entry("", "empty", 1);
        empty_id.id.clear();

        let mut state = State::new(td(), None);
        let entries = vec![
            bad_id,
            foreign,
            no_selectors,
            bad_selector,
            bad_federation,
            expired,
            empty_id,
            wire_entry("ok", "ok", 1),
        ];
        state.apply(page(1, 0, entries, true), now).unwrap();
        assert_eq!(state.entry_ids(), ["ok"]);
    }

    #[test]
    fn bundles_must_be_for_the_own_trust_domain() {
        let now = now();
        let issuer = crate::manager::keys::test_issuer("example.org");
        let wire = |td: &str, authorities: Vec<Vec<u8>>| common::Bundle {
            trust_domain: td.to_owned(),
            x509_authorities: authorities,
            sequence: 2,
            ..common::Bundle::default()
        };
        let ca = issuer.certificate_der().to_vec();
        let mut state = State::new(td(), None);
        let update = |own, federated| {
            Event::Bundles(BundlesUpdate {
                bundle: Some(own),
                federated_bundles: federated,
                tainted_x509_authorities: Vec::new(),
                tainted_jwt_key_ids: Vec::new(),
            })
        };
        let applied = state
            .apply(update(wire("example.org", vec![ca.clone()]), vec![wire("partner.org", vec![ca.clone()])]), now)
            .unwrap();
        assert!(applied.bundles_changed);
        assert_eq!(state.bundles.len(), 2);
        assert_eq!(state.bundles.own().sequence(), 2);
        // Federated bundles missing from an update are dropped.
        state.apply(update(wire("example.org", vec![ca.clone()]), vec![]), now).unwrap();
        assert_eq!(state.bundles.len(), 1);

        assert!(state.apply(update(wire("other.org", vec![ca.clone()]), vec![]), now).is_err());
        assert!(state.apply(update(wire("example.org", vec![]), vec![]), now).is_err());
        assert!(state.apply(update(wire("example.org", vec![vec![1, 2, 3]]), vec![]), now).is_err());
        assert_eq!(state.bundles.own().x509_authorities().len(), 1, "a refused update changes nothing");
    }

    #[test]
    fn taint_spread_stays_in_its_window_and_differs_by_entry() {
        let window = Duration::from_secs(10);
        let offsets: Vec<Duration> = (0..50).map(|i| spread(&format!("entry-{i}"), window)).collect();
        assert!(offsets.iter().all(|d| *d < window));
        let mut distinct = offsets.clone();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() > 40, "offsets should spread out: {offsets:?}");
        assert_eq!(spread("entry-1", window), spread("entry-1", window));
    }

    #[test]
    fn signed_by_any_recognises_the_signing_root_only() {
        let rng = ring::rand::SystemRandom::new();
        let td = td();
        let issuer = |now| {
            let key = tessera_spiffe::keys::SigningKey::generate(tessera_spiffe::keys::KeyType::EcP256, &rng).unwrap();
            let pair = rcgen::KeyPair::try_from(key.pkcs8_der()).unwrap();
            let template = tessera_spiffe::x509::CaTemplate::new(td.clone(), Duration::from_secs(3600)).unwrap();
            let der = template.self_signed(&pair, now, &rng).unwrap();
            tessera_spiffe::x509::X509Issuer::from_pkcs8_der(der, key.pkcs8_der()).unwrap()
        };
        let now = now();
        let (a, b) = (issuer(now), issuer(now));
        let leaf_key = tessera_spiffe::keys::SigningKey::generate(tessera_spiffe::keys::KeyType::EcP256, &rng).unwrap();
        let template = tessera_spiffe::x509::X509SvidTemplate::new(
            SpiffeId::parse("spiffe://example.org/w").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        let leaf = a.sign_x509_svid(&template, leaf_key.public_key().spki_der(), now, &rng).unwrap();
        let chain = [leaf.as_slice()];
        assert!(signed_by_any(&chain, &[a.certificate_der().to_vec()], &td, now));
        assert!(!signed_by_any(&chain, &[b.certificate_der().to_vec()], &td, now));
        assert!(!signed_by_any(&chain, &[], &td, now));
    }
}
