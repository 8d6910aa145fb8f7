//! The in-memory entry index of a store: every registration entry decoded once, shared as
//! `Arc<SharedEntry>`, by ID and by parent ID (issue 7, S6 and S9).
//!
//! # For a newcomer
//!
//! Computing an agent's authorized set reads every entry the agent is authorized for, and a
//! server keeps one such set per connected agent. Read from the database, each computation
//! decoded each entry again and each set held its own copy: a full sync cost a database read
//! and a decode per entry, and N agents holding the same entries held N copies. The index
//! holds each entry once; readers get `Arc`s of the same allocation.
//!
//! # Kept current with the change log
//!
//! The index reflects the store at one revision, [`EntryIndex::revision`]. It is loaded whole
//! when the store opens (hydration) and then moved forward by the store's writer once each
//! committed transaction is durable and *before* its writes are acknowledged or published to
//! subscribers:
//! the writer applies the entries its transactions wrote, as written, and replays the change
//! log (reading each changed entry back) only for revisions the index lacks.
//! Writes are applied in revision order by one writer at a time, so the
//! index is, at every moment, exactly the store's entries at its revision. A store that serves
//! reads from the index reports that revision as its current one and hands out changes only
//! up to it: a reader following the protocol (revision first, then the entries; then the
//! changes after it) never misses a change and never meets one the index does not hold yet.
//!
//! # Corrupt records
//!
//! A stored record that does not decode is not in the index; its key is kept instead, with
//! the parents its `entry_unique` key names (written in the same transaction as the record,
//! so it tells whose child the record was when the record itself no longer does). Reads that
//! could meet such a record go to the database, which reports it: any read while one exists
//! for reads by ID, selector or expiry, and for reads by parent only those whose parents
//! include one of its parents, or every one when its parents are unknown (no unique key
//! names it). Store layout 3 has no parent index on disk, so this is what keeps a corrupt
//! child from being skipped silently.
//!
//! Store layout 4 has no selector index on disk either: the index lists its entries per
//! selector (`selectors.rs`), and keeps with each corrupt record the selectors its
//! `entry_unique` key names, so reads by selector do as reads by parent: those that could
//! meet a corrupt record (it has one of their selectors, or its selectors are unknown) read it
//! from the database, which reports it.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tessera_spiffe::{Selector, SpiffeId};

use super::types::{RegistrationEntry, SharedEntry};

mod selectors;

/// An entry compared, ordered and hashed by its ID (so sets of them are looked up by `&str`
/// without a copy of the ID).
#[derive(Debug, Clone)]
struct ById(Arc<SharedEntry>);

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for ById {}

impl PartialOrd for ById {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ById {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

impl Hash for ById {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.as_str().hash(state);
    }
}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.id
    }
}

/// Every entry of a store at one revision, by ID and by parent; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct EntryIndex {
    /// The store revision the index reflects.
    revision: u64,
    /// (foldhash: looked up once per parent in every full sync, SipHash showed in its profile.)
    by_id: HashSet<ById, foldhash::fast::RandomState>,
    /// The entries per parent ID, ordered by entry ID.
    by_parent: HashMap<SpiffeId, BTreeSet<ById>, foldhash::fast::RandomState>,
    /// Keys of stored records that did not decode, each with the parents it may be listed
    /// under (empty: unknown, so under any). While there is one, the store answers the reads
    /// that could meet it from the database, which reports it as corrupt (see the
    /// [module docs](self)).
    corrupt: BTreeMap<Vec<u8>, Vec<SpiffeId>>,
    /// The entries per selector (`selectors.rs`).
    by_selector: selectors::BySelector,
    /// The selectors of corrupt records (keys of `corrupt`), as their unique keys name them;
    /// a corrupt record missing here may have any selector.
    corrupt_selectors: BTreeMap<Vec<u8>, Vec<Selector>>,
}

impl EntryIndex {
    /// An index of `entries`, at `revision`.
    pub(crate) fn new(revision: u64, entries: impl IntoIterator<Item = RegistrationEntry>) -> Self {
        let mut index = Self { revision, ..Self::default() };
        for entry in entries {
            index.insert(entry);
        }
        index
    }

    /// The IDs of the entries whose parent is `parent`, in ID order.
    pub(crate) fn child_ids(&self, parent: &SpiffeId) -> impl Iterator<Item = &str> {
        self.by_parent.get(parent).into_iter().flat_map(|set| set.iter().map(|entry| entry.0.id.as_str()))
    }

    /// Adds (or replaces) an entry while the index is loaded, at its revision.
    pub(crate) fn insert(&mut self, entry: RegistrationEntry) {
        self.put(entry);
    }

    /// The store revision the index reflects.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether a stored record did not decode (see [`Self::mark_corrupt`]).
    pub(crate) fn has_corrupt(&self) -> bool {
        !self.corrupt.is_empty()
    }

    /// Records that the stored record under `key` did not decode: the index no longer holds
    /// a version of it, and its parents are not known yet (see [`Self::set_corrupt_parent`]).
    pub(crate) fn mark_corrupt(&mut self, key: Vec<u8>) {
        if let Ok(id) = std::str::from_utf8(&key) {
            self.remove(id);
        }
        self.corrupt_selectors.remove(&key);
        self.corrupt.insert(key, Vec::new());
    }

    /// Moves the revision to `revision` (if later) without a change to the entries: for a
    /// change whose entry did not decode (marked corrupt instead).
    pub(crate) fn pass(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// The keys of the corrupt records whose parents are not known.
    pub(crate) fn corrupt_without_parent(&self) -> HashSet<Vec<u8>> {
        self.corrupt.iter().filter(|(_, parents)| parents.is_empty()).map(|(key, _)| key.clone()).collect()
    }

    /// Notes that the corrupt record under `key` (if it is one) may be listed under `parent`.
    pub(crate) fn set_corrupt_parent(&mut self, key: &[u8], parent: SpiffeId) {
        if let Some(parents) = self.corrupt.get_mut(key)
            && !parents.contains(&parent)
        {
            parents.push(parent);
        }
    }

    /// The keys of the corrupt records a read of the children of `parents` could meet: those
    /// listed under one of `parents`, and those whose parents are unknown.
    pub(crate) fn corrupt_children_of(&self, parents: &[&SpiffeId]) -> Vec<&[u8]> {
        self.corrupt
            .iter()
            .filter(|(_, under)| under.is_empty() || under.iter().any(|parent| parents.contains(&parent)))
            .map(|(key, _)| key.as_slice())
            .collect()
    }

    /// Notes that the corrupt record under `key` (if it is one) may have `selectors` (those its
    /// unique key names).
    pub(crate) fn set_corrupt_selectors(&mut self, key: &[u8], selectors: Vec<Selector>) {
        if !self.corrupt.contains_key(key) {
            return;
        }
        let known = self.corrupt_selectors.entry(key.to_vec()).or_default();
        for selector in selectors {
            if !known.contains(&selector) {
                known.push(selector);
            }
        }
    }

    /// The keys of the corrupt records a read by one of `selectors` could meet: those with one
    /// of `selectors`, and those whose selectors are unknown.
    pub(crate) fn corrupt_with_selectors(&self, selectors: &[&Selector]) -> Vec<&[u8]> {
        self.corrupt
            .keys()
            .filter(|key| {
                self.corrupt_selectors
                    .get(*key)
                    .is_none_or(|known| known.is_empty() || known.iter().any(|s| selectors.contains(&s)))
            })
            .map(Vec::as_slice)
            .collect()
    }

    /// The entries that have `selector` among theirs, ordered by ID.
    pub(crate) fn with_selector(&self, selector: &Selector) -> Vec<Arc<SharedEntry>> {
        let mut entries: Vec<Arc<SharedEntry>> = self.by_selector.with(selector).map(Arc::clone).collect();
        entries.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        entries
    }

    /// The IDs of the entries that have `selector` among theirs, in no particular order.
    pub(crate) fn ids_with_selector(&self, selector: &Selector) -> impl Iterator<Item = &str> {
        self.by_selector.with(selector).map(|entry| entry.id.as_str())
    }

    /// How many entries it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// The entry with this ID.
    pub(crate) fn get(&self, id: &str) -> Option<&Arc<SharedEntry>> {
        self.by_id.get(id).map(|entry| &entry.0)
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<SharedEntry>> {
        self.by_id.iter().map(|entry| &entry.0)
    }

    /// The entries whose parent is one of `parents`, ordered by ID, each once.
    pub(crate) fn children_of(&self, parents: &[&SpiffeId]) -> Vec<Arc<SharedEntry>> {
        let mut sets: Vec<&BTreeSet<ById>> = parents.iter().filter_map(|parent| self.by_parent.get(*parent)).collect();
        // The same parent listed twice must not list its children twice.
        sets.sort_unstable_by_key(|set| std::ptr::from_ref(*set));
        sets.dedup_by_key(|set| std::ptr::from_ref(*set));
        let mut children: Vec<Arc<SharedEntry>> =
            sets.iter().flat_map(|set| set.iter().map(|entry| Arc::clone(&entry.0))).collect();
        // One parent's children come sorted; several parents' are merged (a stable sort finds
        // the sorted runs and merges them).
        if sets.len() > 1 {
            children.sort_by(|a, b| a.id.cmp(&b.id));
        }
        children
    }

    /// Stores `entry`, replacing the entry with its ID.
    ///
    /// The entry's parent ID becomes a clone of the `by_parent` key when its parent has
    /// entries already: the entries under one parent share one text of its ID (S9 memory:
    /// a million entries under a few agents hold a few parent IDs, not a million copies).
    fn put(&mut self, mut entry: RegistrationEntry) {
        self.remove(&entry.id);
        if let Some((parent, _)) = self.by_parent.get_key_value(&entry.parent_id) {
            entry.parent_id = parent.clone();
        }
        let entry = Arc::new(SharedEntry::new(entry));
        self.by_parent.entry(entry.parent_id.clone()).or_default().insert(ById(Arc::clone(&entry)));
        self.by_selector.add(&entry);
        self.by_id.insert(ById(entry));
    }

    /// Removes the entry with this ID, if any.
    fn remove(&mut self, id: &str) {
        self.corrupt.remove(id.as_bytes());
        self.corrupt_selectors.remove(id.as_bytes());
        let Some(old) = self.by_id.take(id) else {
            return;
        };
        self.by_selector.remove(&old.0);
        if let Some(siblings) = self.by_parent.get_mut(&old.0.parent_id) {
            siblings.remove(id);
            if siblings.is_empty() {
                self.by_parent.remove(&old.0.parent_id);
            }
        }
    }

    /// Applies the change of entry `id` at `revision` to its state `entry` (`None`: deleted)
    /// as the store holds it now. Changes must come in revision order (the store may already
    /// hold a later version; replaying the later change again is harmless).
    pub(crate) fn apply(&mut self, revision: u64, id: &str, entry: Option<RegistrationEntry>) {
        match entry {
            Some(entry) => self.put(entry),
            None => self.remove(id),
        }
        self.revision = self.revision.max(revision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::SelectorSet;

    fn entry(id: &str, parent: &str) -> RegistrationEntry {
        RegistrationEntry::new(
            id,
            SpiffeId::parse(&format!("spiffe://example.org/w/{id}")).unwrap(),
            SpiffeId::parse(&format!("spiffe://example.org/{parent}")).unwrap(),
            SelectorSet::parse_all(&["t:1"]).unwrap(),
        )
    }

    fn ids(entries: &[Arc<SharedEntry>]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn children_follow_moves_and_deletes_in_id_order() {
        let parent = |p: &str| SpiffeId::parse(&format!("spiffe://example.org/{p}")).unwrap();
        let mut index = EntryIndex::new(3, [entry("c", "a"), entry("b", "a"), entry("d", "x")]);
        assert_eq!(index.len(), 3);
        assert_eq!(ids(&index.children_of(&[&parent("a")])), ["b", "c"]);
        assert_eq!(ids(&index.children_of(&[&parent("x"), &parent("a"), &parent("x")])), ["b", "c", "d"]);
        // "c" moves under x; "b" goes.
        index.apply(4, "c", Some(entry("c", "x")));
        index.apply(5, "b", None);
        assert_eq!(index.revision(), 5);
        assert!(index.children_of(&[&parent("a")]).is_empty());
        assert!(!index.by_parent.contains_key(&parent("a")), "an empty parent set is dropped");
        assert_eq!(ids(&index.children_of(&[&parent("x")])), ["c", "d"]);
        assert!(index.get("b").is_none());
        assert_eq!(index.get("c").unwrap().parent_id, parent("x"));
        // An older change replayed does not move the revision back.
        index.apply(2, "z", None);
        assert_eq!(index.revision(), 5);
    }

    fn with_selectors(id: &str, selectors: &[&str]) -> RegistrationEntry {
        RegistrationEntry { selectors: SelectorSet::parse_all(selectors).unwrap(), ..entry(id, "a") }
    }

    fn listed(index: &EntryIndex, selector: &str) -> Vec<String> {
        let selector = Selector::parse(selector).unwrap();
        let entries: Vec<String> = index.with_selector(&selector).iter().map(|e| e.id.clone()).collect();
        let mut ids: Vec<String> = index.ids_with_selector(&selector).map(str::to_owned).collect();
        ids.sort();
        assert_eq!(entries, ids, "the two reads by {selector} disagree");
        entries
    }

    /// Entries are listed under each of their selectors, in ID order, through creates,
    /// updates that change selectors and deletes; a selector's list goes from one entry to a
    /// group, to a large group and back, and is gone with its last entry.
    #[test]
    fn entries_are_listed_per_selector_through_writes() {
        let mut index =
            EntryIndex::new(1, [with_selectors("b", &["k:1", "k:shared"]), with_selectors("a", &["k:shared"])]);
        assert_eq!(listed(&index, "k:shared"), ["a", "b"]);
        assert_eq!(listed(&index, "k:1"), ["b"]);
        assert!(listed(&index, "k:none").is_empty());
        assert_eq!((index.by_selector.selectors(), index.by_selector.groups()), (2, 1));
        // "b" loses k:shared and gains k:2: k:shared is one entry's again.
        index.apply(2, "b", Some(with_selectors("b", &["k:1", "k:2"])));
        assert_eq!(listed(&index, "k:shared"), ["a"]);
        assert_eq!(listed(&index, "k:2"), ["b"]);
        assert_eq!((index.by_selector.selectors(), index.by_selector.groups()), (3, 0));
        // Many entries share one selector: a large group, in ID order, shrinking back.
        let many: Vec<String> = (0..100).map(|n| format!("m{n:03}")).collect();
        for (n, id) in many.iter().enumerate().rev() {
            index.apply(3 + n as u64, id, Some(with_selectors(id, &["k:many", &format!("k:own{n}")])));
        }
        assert_eq!(listed(&index, "k:many"), many);
        assert_eq!(listed(&index, "k:own42"), ["m042"]);
        for (n, id) in many.iter().enumerate().skip(1) {
            index.apply(200 + n as u64, id, None);
            assert_eq!(
                listed(&index, "k:many"),
                many[..n.min(1)].iter().chain(&many[n + 1..]).cloned().collect::<Vec<_>>()
            );
        }
        assert_eq!(listed(&index, "k:many"), ["m000"]);
        assert!(listed(&index, "k:own42").is_empty());
        index.apply(300, "m000", None);
        index.apply(301, "a", None);
        index.apply(302, "b", None);
        assert_eq!(index.by_selector.selectors(), 0, "a selector without entries is dropped");
    }

    /// A corrupt record is met by the reads by one of the selectors its unique key names, or by
    /// every read by selector while they are unknown.
    #[test]
    fn corrupt_records_are_met_by_reads_by_their_selectors() {
        let s = |text: &str| Selector::parse(text).unwrap();
        let (one, two, other) = (s("k:1"), s("k:2"), s("k:other"));
        let mut index = EntryIndex::new(1, [with_selectors("a", &["k:1"])]);
        index.mark_corrupt(b"x".to_vec());
        assert_eq!(index.corrupt_with_selectors(&[&other]), [b"x".as_slice()], "unknown selectors: any read");
        index.set_corrupt_selectors(b"x", vec![one.clone(), two.clone()]);
        index.set_corrupt_selectors(b"not corrupt", vec![other.clone()]);
        assert!(index.corrupt_with_selectors(&[&other]).is_empty());
        assert_eq!(index.corrupt_with_selectors(&[&other, &two]), [b"x".as_slice()]);
        // Written again (it decodes now): no longer corrupt.
        index.apply(2, "x", Some(with_selectors("x", &["k:1"])));
        assert!(index.corrupt_with_selectors(&[&one]).is_empty());
        assert_eq!(listed(&index, "k:1"), ["a", "x"]);
        // Corrupt again: its selectors are unknown until they are looked up again.
        index.mark_corrupt(b"x".to_vec());
        assert_eq!(listed(&index, "k:1"), ["a"]);
        assert_eq!(index.corrupt_with_selectors(&[&other]), [b"x".as_slice()]);
    }

    /// Entries under one parent hold one text of the parent ID, whether loaded or applied,
    /// and a moved entry takes its new parent's.
    #[test]
    fn entries_under_one_parent_share_its_id_text() {
        let text = |id: &SpiffeId| id.as_str().as_ptr();
        let mut index = EntryIndex::new(1, [entry("a", "p"), entry("b", "p"), entry("c", "q")]);
        index.apply(2, "d", Some(entry("d", "p")));
        index.apply(3, "c", Some(entry("c", "p")));
        let parent = |id: &str| index.get(id).unwrap().parent_id.clone();
        let shared = text(&parent("a"));
        for id in ["b", "c", "d"] {
            assert_eq!(text(&parent(id)), shared, "{id} has a copy of its parent ID");
        }
        let (key, _) = index.by_parent.get_key_value(&parent("a")).unwrap();
        assert_eq!(text(key), shared);
        assert_eq!(index.by_parent.len(), 1, "q has no entries left");
    }
}
