//! The records the datastore keeps, the filters and pages used to list them, and the rules
//! both implementations share (validation, matching, pagination, compaction policy).
//!
//! Times are unix seconds (`u64`) passed in by the caller: the store never reads a clock, so
//! tests drive expiry with a fake clock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};

use super::error::{DataStoreError, ResourceKind};

/// Longest entry ID, join token, attestation type or serial accepted, in bytes.
pub const MAX_KEY_LEN: usize = 255;

/// How many entry changes the log keeps by default before compacting the oldest.
pub const DEFAULT_CHANGE_LOG_RETENTION: u64 = 100_000;

/// Settings shared by every implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataStoreOptions {
    /// How many of the most recent entry changes the change log keeps. Older ones are
    /// compacted away in batches after writes; a reader further behind gets
    /// [`DataStoreError::ResyncRequired`]. At least 1.
    pub change_log_retention: u64,
}

impl Default for DataStoreOptions {
    fn default() -> Self {
        Self { change_log_retention: DEFAULT_CHANGE_LOG_RETENTION }
    }
}

/// A registration entry: "a workload with these selectors, under this parent, gets this
/// SPIFFE ID".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationEntry {
    /// Opaque, caller-chosen ID (random hex, or `--entry-id`). Non-empty, at most
    /// [`MAX_KEY_LEN`] bytes, no control characters.
    pub id: String,
    /// The SPIFFE ID the workload gets.
    pub spiffe_id: SpiffeId,
    /// The agent (or node-alias entry, or another entry) the workload runs under.
    pub parent_id: SpiffeId,
    /// The selectors a caller must all have. Never empty.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime; `None` takes the server default. Never zero.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` takes the server default. Never zero.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs of the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the workload also receives.
    pub federates_with: Vec<TrustDomain>,
    /// Free-form hint shown to workloads that get several identities.
    pub hint: String,
    /// The workload may use the admin API.
    pub admin: bool,
    /// The workload is a downstream server.
    pub downstream: bool,
    /// When the entry stops being valid (unix seconds); pruned after that.
    pub expires_at: Option<u64>,
    /// The global revision of the entry's last write. Set by the store; ignored on input.
    pub revision: u64,
}

impl RegistrationEntry {
    /// An entry with the mandatory fields and every optional one at its default.
    pub fn new(id: impl Into<String>, spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: SelectorSet) -> Self {
        Self {
            id: id.into(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: Vec::new(),
            federates_with: Vec::new(),
            hint: String::new(),
            admin: false,
            downstream: false,
            expires_at: None,
            revision: 0,
        }
    }

    /// The identity of an entry for duplicate detection: SPIFFE ID, parent ID and selectors.
    /// `\0` separates the parts; none of them can contain it.
    pub(crate) fn unique_key(&self) -> String {
        let mut key = String::with_capacity(self.spiffe_id.as_str().len() + self.parent_id.as_str().len() + 64);
        key.push_str(self.spiffe_id.as_str());
        key.push('\0');
        key.push_str(self.parent_id.as_str());
        for selector in &self.selectors {
            key.push('\0');
            key.push_str(selector.kind());
            key.push(':');
            key.push_str(selector.value());
        }
        key
    }

    /// True when the entry has expired at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// A registration entry as the store shares it (the entry index's `Arc`s, see
/// `entry_index.rs`), with room for the entry's encoded form on the agent API.
///
/// The entry cannot be changed through a `SharedEntry` (it derefs to `&RegistrationEntry`
/// only, and it is not `Clone`): a written entry is a new `SharedEntry` in a new `Arc`, whose
/// encoded form starts empty. So the encoded form, filled at first use by
/// [`Self::encoded_with`], always encodes the entry next to it (issue 7, S6: a full sync
/// encoded every entry again for every agent).
#[derive(Debug)]
pub struct SharedEntry {
    entry: RegistrationEntry,
    /// The agent API's protobuf encoding of `entry`, filled by the first sync that sends it
    /// (lazily: an entry no agent syncs costs only the empty cell, see the S9 memory goal).
    encoded: OnceLock<Box<[u8]>>,
}

impl SharedEntry {
    /// `entry`, with no encoded form yet.
    pub fn new(entry: RegistrationEntry) -> Self {
        Self { entry, encoded: OnceLock::new() }
    }

    /// The entry.
    pub fn entry(&self) -> &RegistrationEntry {
        &self.entry
    }

    /// The entry of a shared one: moved out when this was the last reference, else copied.
    pub fn unwrap_or_clone(shared: Arc<Self>) -> RegistrationEntry {
        Arc::try_unwrap(shared).map_or_else(|shared| shared.entry.clone(), |owned| owned.entry)
    }

    /// The encoded form of the entry, made by `encode` the first time it is asked for and
    /// kept. There is one encoding in the server (the agent API's `Entry` message,
    /// `agent_api::convert::encoded_entry`); every caller passes it.
    pub(crate) fn encoded_with(&self, encode: impl FnOnce(&RegistrationEntry) -> Vec<u8>) -> &[u8] {
        self.encoded.get_or_init(|| encode(&self.entry).into_boxed_slice())
    }

    /// Whether the encoded form was made already.
    #[cfg(test)]
    pub(crate) fn is_encoded(&self) -> bool {
        self.encoded.get().is_some()
    }
}

impl std::ops::Deref for SharedEntry {
    type Target = RegistrationEntry;

    fn deref(&self) -> &RegistrationEntry {
        &self.entry
    }
}

/// Compared by the entry (the encoded form is made from it).
impl PartialEq for SharedEntry {
    fn eq(&self, other: &Self) -> bool {
        self.entry == other.entry
    }
}

impl Eq for SharedEntry {}

impl From<RegistrationEntry> for SharedEntry {
    fn from(entry: RegistrationEntry) -> Self {
        Self::new(entry)
    }
}

/// What happened to an entry at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// Created or replaced: fetch it with [`get_entry`](super::DataStore::get_entry).
    Upsert,
    /// Deleted.
    Delete,
}

/// One record of the entry change log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryChange {
    /// The revision this change created. Revisions are gap-free: every entry write bumps the
    /// global revision by exactly one and logs exactly one change.
    pub revision: u64,
    /// The entry concerned.
    pub entry_id: String,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// How a [`SelectorFilter`] compares its selectors with a record's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SelectorMatch {
    /// The record's selectors equal the given set.
    Exact,
    /// The record's selectors are all among the given ones (the workload matching rule: the
    /// records a caller with the given selectors matches).
    Subset,
    /// The record has every given selector, and maybe more (SPIRE's CLI default).
    Superset,
    /// The record has at least one of the given selectors.
    Any,
}

/// A selector condition of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectorFilter {
    /// The selectors to compare with.
    pub selectors: SelectorSet,
    /// How to compare.
    pub mode: SelectorMatch,
}

impl SelectorFilter {
    /// A filter comparing with `selectors` in `mode`.
    pub fn new(selectors: SelectorSet, mode: SelectorMatch) -> Self {
        Self { selectors, mode }
    }

    /// True when a record with `record` selectors passes.
    pub fn matches(&self, record: &SelectorSet) -> bool {
        match self.mode {
            SelectorMatch::Exact => record == &self.selectors,
            SelectorMatch::Subset => record.is_subset_of(&self.selectors),
            SelectorMatch::Superset => self.selectors.is_subset_of(record),
            SelectorMatch::Any => self.selectors.iter().any(|s| record.contains(s)),
        }
    }
}

/// Conditions of an entry listing; every condition given must hold. The default lists all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryFilter {
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Only entries with this parent ID.
    pub parent_id: Option<SpiffeId>,
    /// Only entries whose selectors pass.
    pub selectors: Option<SelectorFilter>,
}

impl EntryFilter {
    /// True when `entry` passes every condition.
    pub fn matches(&self, entry: &RegistrationEntry) -> bool {
        self.spiffe_id.as_ref().is_none_or(|id| id == &entry.spiffe_id)
            && self.parent_id.as_ref().is_none_or(|id| id == &entry.parent_id)
            && self.selectors.as_ref().is_none_or(|f| f.matches(&entry.selectors))
    }
}

/// One page of a listing.
///
/// Listings are ordered by key (entry ID, node SPIFFE ID) byte-wise. The token is opaque to
/// callers; it encodes the last key returned, so a listing stays correct while records are
/// added or removed between pages (each record is returned at most once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// The `next_page_token` of the previous page; `None` for the first page.
    pub token: Option<String>,
    /// The most records to return; 0 means no limit.
    pub size: usize,
}

impl PageRequest {
    /// Everything in one page.
    pub fn all() -> Self {
        Self::default()
    }

    /// The first page of `size` records.
    pub fn first(size: usize) -> Self {
        Self { token: None, size }
    }

    /// The key the listing continues after, decoded from the token.
    pub(crate) fn after_key(&self) -> Result<Option<String>, DataStoreError> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        let invalid = || DataStoreError::InvalidArgument {
            field: "page_token",
            reason: format!("{token:?} is not a token this store returned"),
        };
        let bytes = hex::decode(token).map_err(|_| invalid())?;
        String::from_utf8(bytes).map(Some).map_err(|_| invalid())
    }
}

/// A page of records and the token of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The records, in key order.
    pub items: Vec<T>,
    /// Pass this in [`PageRequest::token`] for the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Builds a page from records already filtered and sorted by key, skipping keys up to and
/// including the page token's. Reads at most one record past the page.
pub(crate) fn paginate<T>(
    records: impl Iterator<Item = Result<(String, T), DataStoreError>>,
    page: &PageRequest,
) -> Result<Page<T>, DataStoreError> {
    let after = page.after_key()?;
    let mut items = Vec::new();
    let mut last_key = None;
    for record in records {
        let (key, item) = record?;
        if after.as_ref().is_some_and(|after| key.as_str() <= after.as_str()) {
            continue;
        }
        if page.size != 0 && items.len() == page.size {
            return Ok(Page { items, next_page_token: last_key.map(|k: String| hex::encode(k.as_bytes())) });
        }
        items.push(item);
        last_key = Some(key);
    }
    Ok(Page { items, next_page_token: None })
}

/// An agent the server attested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedNode {
    /// The agent's SPIFFE ID (the key).
    pub spiffe_id: SpiffeId,
    /// The node attestor that attested it (`join_token`...).
    pub attestation_type: String,
    /// Serial (hex) of the agent SVID currently in use; empty once banned.
    pub serial: String,
    /// Serial (hex) of the renewal just issued, until the agent first presents it.
    pub new_serial: Option<String>,
    /// When the current agent SVID expires (unix seconds).
    pub expires_at: u64,
    /// Banned: attestation and every call are refused until the node is evicted.
    pub banned: bool,
    /// The node selectors the attestor produced (node-alias entries match on them).
    pub selectors: SelectorSet,
    /// The agent may attest again with the same ID (attestors that support it).
    pub can_reattest: bool,
}

/// The serial state a renewal or handover writes to an attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSerials {
    /// The serial now current.
    pub serial: String,
    /// The serial of a renewal just issued, if any.
    pub new_serial: Option<String>,
    /// Expiry of the SVID with `serial` (unix seconds).
    pub expires_at: u64,
}

/// Conditions of an attested-node listing; the default lists all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFilter {
    /// Only nodes attested by this attestor.
    pub attestation_type: Option<String>,
    /// Only banned (`Some(true)`) or only not banned (`Some(false)`) nodes.
    pub banned: Option<bool>,
    /// Only nodes whose selectors pass.
    pub selectors: Option<SelectorFilter>,
}

impl NodeFilter {
    /// True when `node` passes every condition.
    pub fn matches(&self, node: &AttestedNode) -> bool {
        self.attestation_type.as_ref().is_none_or(|t| t == &node.attestation_type)
            && self.banned.is_none_or(|b| b == node.banned)
            && self.selectors.as_ref().is_none_or(|f| f.matches(&node.selectors))
    }
}

/// A single-use join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// The secret itself (the key).
    pub token: String,
    /// When it stops being accepted (unix seconds): expired when `now >= expires_at`.
    pub expires_at: u64,
    /// The node-alias SPIFFE ID registered with the token (`token generate --spiffe-id`).
    pub alias_spiffe_id: Option<SpiffeId>,
}

impl JoinToken {
    /// True when the token is no longer accepted at `now`.
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }
}

/// A trust bundle, stored opaquely as the bytes of its SPIFFE bundle JSON.
///
/// The server's own bundle is the one whose trust domain is the server's; every other is
/// federated. The store does not look inside `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// Whose bundle this is (the key).
    pub trust_domain: TrustDomain,
    /// SPIFFE bundle JSON.
    pub data: Vec<u8>,
    /// Grows by one on every `set_bundle`; 1 for a new bundle.
    pub sequence: u64,
}

/// A federation relationship (issue 6), as the federation module encoded it. The store does
/// not look inside `data`; `revision` grows by one on every write (1 for a new one), for
/// compare-and-set like a bundle's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederationRelationshipRecord {
    /// The foreign trust domain (the key).
    pub trust_domain: TrustDomain,
    /// The relationship, encoded by `crate::federation`.
    pub data: Vec<u8>,
    /// Grows by one on every write.
    pub revision: u64,
}

/// The CA rotation journal: an opaque blob with a version for compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaJournal {
    /// The journal, encoded by the CA module.
    pub data: Vec<u8>,
    /// Grows by one on every put; 1 for the first.
    pub version: u64,
}

fn check_key(field: &'static str, value: &str) -> Result<(), DataStoreError> {
    let reason = if value.is_empty() {
        "must not be empty"
    } else if value.len() > MAX_KEY_LEN {
        "must be at most 255 bytes"
    } else if value.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(DataStoreError::InvalidArgument { field, reason: reason.to_owned() })
}

/// The rules every stored entry obeys, checked by both implementations before writing.
pub(crate) fn validate_entry(entry: &RegistrationEntry) -> Result<(), DataStoreError> {
    check_key("entry id", &entry.id)?;
    if entry.selectors.is_empty() {
        return Err(DataStoreError::InvalidArgument {
            field: "selectors",
            reason: "an entry needs at least one selector".to_owned(),
        });
    }
    for (field, ttl) in [("x509_svid_ttl", entry.x509_svid_ttl), ("jwt_svid_ttl", entry.jwt_svid_ttl)] {
        if ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(DataStoreError::InvalidArgument { field, reason: "must be at least 1 second".to_owned() });
        }
    }
    if entry.dns_names.iter().any(|name| name.is_empty()) {
        return Err(DataStoreError::InvalidArgument { field: "dns_names", reason: "must not be empty".to_owned() });
    }
    Ok(())
}

/// The rules every stored attested node obeys.
pub(crate) fn validate_node(node: &AttestedNode) -> Result<(), DataStoreError> {
    check_key("attestation_type", &node.attestation_type)?;
    if !node.banned {
        check_key("serial", &node.serial)?;
    }
    Ok(())
}

/// The rules every serial update obeys.
pub(crate) fn validate_serials(serials: &NodeSerials) -> Result<(), DataStoreError> {
    check_key("serial", &serials.serial)?;
    if let Some(new_serial) = &serials.new_serial {
        check_key("new_serial", new_serial)?;
    }
    Ok(())
}

/// The rules every stored join token obeys.
pub(crate) fn validate_token(token: &JoinToken) -> Result<(), DataStoreError> {
    check_key("join token", &token.token)
}

/// The error for an entry whose SPIFFE ID, parent and selectors match `other`'s.
pub(crate) fn duplicate_entry(entry: &RegistrationEntry, other: &str) -> DataStoreError {
    DataStoreError::AlreadyExists {
        kind: ResourceKind::Entry,
        id: entry.id.clone(),
        reason: format!("entry {other:?} has the same SPIFFE ID, parent ID and selectors"),
    }
}

/// The error for an entry ID already taken.
pub(crate) fn entry_id_taken(id: &str) -> DataStoreError {
    DataStoreError::AlreadyExists {
        kind: ResourceKind::Entry,
        id: id.to_owned(),
        reason: "an entry with this ID exists".to_owned(),
    }
}

/// The error for a compare-and-set on an entry's revision that failed.
pub(crate) fn entry_revision_conflict(id: &str, expected: u64, found: u64) -> DataStoreError {
    DataStoreError::Conflict {
        kind: ResourceKind::Entry,
        id: id.to_owned(),
        expected: format!("revision {expected}"),
        found: format!("revision {found}"),
    }
}

/// Checks a change-log read: the log must continue right after `since`.
///
/// Revisions are gap-free, so a read that does not start at `since + 1` while `since` is
/// behind `current` means the changes in between were compacted away.
pub(crate) fn check_continuity(
    since: u64,
    current: u64,
    floor: u64,
    changes: &[EntryChange],
) -> Result<(), DataStoreError> {
    let continues = match changes.first() {
        Some(first) => first.revision == since + 1,
        None => since >= current,
    };
    if since > current || !continues {
        return Err(DataStoreError::ResyncRequired { since, floor, current });
    }
    Ok(())
}

/// When the change log should be compacted after a write, the new floor: every change up
/// to and including it goes. Compaction runs in batches of about 1/16 of the retention so a
/// busy store does not pay for it on every write.
pub(crate) fn compaction_target(revision: u64, floor: u64, retention: u64) -> Option<u64> {
    let retention = retention.max(1);
    let slack = (retention / 16).max(1);
    let kept = revision.saturating_sub(floor);
    (kept > retention + slack).then(|| revision - retention)
}

/// The selector whose index narrows a listing the most cheaply, and whether the index
/// alone yields every candidate (see [`SelectorIndexPlan`]).
pub(crate) enum SelectorIndexPlan<'a> {
    /// Scan everything and filter.
    FullScan,
    /// Candidates are the records carrying this one selector.
    One(&'a Selector),
    /// Candidates are the records carrying any of these selectors.
    Union(&'a SelectorSet),
}

/// Chooses how to use a selector index for `filter`. `records_never_empty` says whether
/// every record has at least one selector (entries do; nodes may not), which is what makes
/// the index usable for [`SelectorMatch::Subset`].
pub(crate) fn plan_selector_index(filter: &SelectorFilter, records_never_empty: bool) -> SelectorIndexPlan<'_> {
    let Some(first) = filter.selectors.iter().next() else {
        return SelectorIndexPlan::FullScan;
    };
    match filter.mode {
        SelectorMatch::Exact | SelectorMatch::Superset => SelectorIndexPlan::One(first),
        SelectorMatch::Any => SelectorIndexPlan::Union(&filter.selectors),
        SelectorMatch::Subset if records_never_empty => SelectorIndexPlan::Union(&filter.selectors),
        SelectorMatch::Subset => SelectorIndexPlan::FullScan,
    }
}

/// Counters of writes per attested node, shared between the IDs that hash to the same slot
/// (see [`super::DataStore::node_generation`]), and of bundle writes.
pub(crate) struct Generations {
    nodes: Box<[AtomicU64]>,
    bundles: AtomicU64,
}

/// Node counters: a write moves one of 4,096, so the nodes written while an agent stays
/// connected leave its copy in place unless they hash alike (about 1 in 4,096).
const NODE_SLOTS: usize = 4096;

impl Default for Generations {
    fn default() -> Self {
        Self { nodes: (0..NODE_SLOTS).map(|_| AtomicU64::new(0)).collect(), bundles: AtomicU64::new(0) }
    }
}

impl fmt::Debug for Generations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generations").field("bundles", &self.bundles).finish_non_exhaustive()
    }
}

impl Generations {
    fn slot(&self, spiffe_id: &SpiffeId) -> &AtomicU64 {
        // FNV-1a: stable, and collisions cost only a re-read.
        let hash = spiffe_id
            .as_str()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
        let index = usize::try_from(hash % NODE_SLOTS as u64).unwrap_or(0);
        &self.nodes[index]
    }

    /// After a write of the node `spiffe_id` (attempted or done).
    pub(crate) fn node_written(&self, spiffe_id: &SpiffeId) {
        self.slot(spiffe_id).fetch_add(1, Ordering::AcqRel);
    }

    /// [`super::DataStore::node_generation`].
    pub(crate) fn node(&self, spiffe_id: &SpiffeId) -> u64 {
        self.slot(spiffe_id).load(Ordering::Acquire)
    }

    /// After a bundle write (attempted or done).
    pub(crate) fn bundle_written(&self) {
        self.bundles.fetch_add(1, Ordering::AcqRel);
    }

    /// [`super::DataStore::bundle_generation`].
    pub(crate) fn bundles(&self) -> u64 {
        self.bundles.load(Ordering::Acquire)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> SelectorSet {
        SelectorSet::parse_all(items).unwrap()
    }

    #[test]
    fn selector_match_modes() {
        let record = set(&["a:1", "b:2"]);
        let cases = [
            (SelectorMatch::Exact, &["a:1", "b:2"][..], true),
            (SelectorMatch::Exact, &["a:1"][..], false),
            (SelectorMatch::Subset, &["a:1", "b:2", "c:3"][..], true),
            (SelectorMatch::Subset, &["a:1"][..], false),
            (SelectorMatch::Superset, &["a:1"][..], true),
            (SelectorMatch::Superset, &["a:1", "c:3"][..], false),
            (SelectorMatch::Any, &["c:3", "b:2"][..], true),
            (SelectorMatch::Any, &["c:3"][..], false),
        ];
        for (mode, given, expected) in cases {
            assert_eq!(SelectorFilter::new(set(given), mode).matches(&record), expected, "{mode:?} {given:?}");
        }
    }

    #[test]
    fn pagination_skips_the_token_and_reports_more() {
        let records = || (1..=5).map(|i| Ok((format!("k{i}"), i)));
        let page = paginate(records(), &PageRequest::first(2)).unwrap();
        assert_eq!(page.items, [1, 2]);
        let next = PageRequest { token: page.next_page_token, size: 2 };
        let page = paginate(records(), &next).unwrap();
        assert_eq!(page.items, [3, 4]);
        let page = paginate(records(), &PageRequest { token: page.next_page_token, size: 2 }).unwrap();
        assert_eq!((page.items, page.next_page_token), (vec![5], None));
        let exact = paginate(records(), &PageRequest::first(5)).unwrap();
        assert_eq!(exact.next_page_token, None);
        let bad = PageRequest { token: Some("zz".into()), size: 1 };
        assert!(matches!(paginate(records(), &bad), Err(DataStoreError::InvalidArgument { field: "page_token", .. })));
    }

    #[test]
    fn compaction_runs_in_batches() {
        assert_eq!(compaction_target(10, 0, 10), None);
        assert_eq!(compaction_target(11, 0, 10), None);
        assert_eq!(compaction_target(12, 0, 10), Some(2));
        assert_eq!(compaction_target(1000, 0, 160), Some(840));
        assert_eq!(compaction_target(1000, 839, 160), None);
    }

    #[test]
    fn continuity() {
        let change = |revision| EntryChange { revision, entry_id: "e".into(), kind: ChangeKind::Upsert };
        assert!(check_continuity(3, 5, 0, &[change(4), change(5)]).is_ok());
        assert!(check_continuity(5, 5, 0, &[]).is_ok());
        assert!(check_continuity(2, 5, 3, &[change(4), change(5)]).is_err());
        assert!(check_continuity(6, 5, 0, &[]).is_err());
        assert!(check_continuity(4, 5, 5, &[]).is_err());
    }
}
