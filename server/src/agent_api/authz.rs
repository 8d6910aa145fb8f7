//! Which registration entries an agent is authorized for (spec: server-agent-flow §4).
//!
//! The one place this rule lives; entry sync, X.509-SVID and JWT-SVID minting and bundle
//! delivery all call [`authorized_entries`]:
//!
//! 1. the *roots*: the agent's own SPIFFE ID, and the SPIFFE IDs of the node-alias entries
//!    that match the agent (entries parented to the server ID, `spiffe://<td>/tessera/server`,
//!    whose selectors are all among the agent's node selectors, found through the selector
//!    index);
//! 2. every entry whose parent is a root, then every entry whose parent is the SPIFFE ID of
//!    an entry already included, and so on (descendants), breadth first. Each SPIFFE ID is
//!    expanded once, so cycles in the parent graph terminate; the depth is bounded by
//!    [`MAX_DEPTH`].
//!
//! Node-alias entries themselves are not in the set (they are an authorization device, not a
//! workload identity). Entries that have expired at `now` are neither included nor expanded.
//!
//! # Keeping a set up to date: [`AuthorizedSet`]
//!
//! Computing the set reads every authorized entry. The sync stream and the signing calls keep
//! an [`AuthorizedSet`] per agent instead and move it forward with the datastore's change log
//! ([`AuthorizedSet::advance`]): each change costs reading the changed entry, whatever the
//! number N of entries the agent holds (issue 7: with entries created one by one, recomputing
//! per revision made each creation cost O(N), O(N²) in all). The rule applied per change is
//! the one above, with the breadth-first depth of every expanded SPIFFE ID kept:
//!
//! - a changed entry is authorized when it has not expired and its parent is expanded at a
//!   depth of at most [`MAX_DEPTH`];
//! - whenever a change would move the graph under an authorized entry (an entry whose SPIFFE
//!   ID has children gets or loses an expansion, or its depth changes; a node alias that
//!   concerns the agent changes; the log was compacted past the set's revision), the set is
//!   computed again from scratch and the difference returned, so the result is always exactly
//!   what [`authorized_entries`] gives.
//!
//! Entries that expire leave the set at the first advance after their expiry.

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

use crate::datastore::{ChangeKind, DataStore, DataStoreError, RegistrationEntry, Result, SharedEntry};

/// The hasher of the per-agent maps: keyed by entry and SPIFFE IDs, looked up once or twice per
/// entry of every agent's set (SipHash was 6.6 % of a full sync's profile, issue 7).
type Fast = foldhash::fast::RandomState;

/// Hashed and compared by one field of the entry it holds, and looked up by a borrow of that
/// field: a per-agent map keyed by it holds a pointer to the entry the store's index shares,
/// not a copy of the ID (issue 7: the copies were about 390 B per entry per agent, and their
/// allocation a good part of a full sync).
macro_rules! entry_key {
    ($(#[$doc:meta])* $name:ident, $field:ident, $ty:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        struct $name(Arc<SharedEntry>);

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.$field == other.0.$field
            }
        }

        impl Eq for $name {}

        impl Hash for $name {
            fn hash<H: Hasher>(&self, state: &mut H) {
                // The same as the hash of the borrowed form, as `Borrow` requires.
                let key: &$ty = &self.0.$field;
                key.hash(state);
            }
        }

        impl Borrow<$ty> for $name {
            fn borrow(&self) -> &$ty {
                &self.0.$field
            }
        }
    };
}

entry_key!(
    /// An authorized entry, keyed by its entry ID.
    ById, id, str
);
entry_key!(
    /// A SPIFFE ID carried by authorized entries, held through one of them (any: they all carry
    /// it). It may be an older version of an entry that has changed since (same SPIFFE ID); it
    /// is let go when the ID leaves the map.
    BySpiffeId, spiffe_id, SpiffeId
);
entry_key!(
    /// A parent ID of authorized entries, held through one of them (as [`BySpiffeId`]).
    ByParentId, parent_id, SpiffeId
);

/// The entries of an [`AuthorizedSet`]: each held once, shared with the store's entry index,
/// keyed by entry ID. In no order; [`Self::sorted`] gives them by ID.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthorizedEntries(HashSet<ById, Fast>);

impl AuthorizedEntries {
    /// The entry with this ID.
    pub(crate) fn get(&self, id: &str) -> Option<&Arc<SharedEntry>> {
        self.0.get(id).map(|entry| &entry.0)
    }

    /// Whether the entry with this ID is held.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }

    /// How many entries it holds.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The entries, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<SharedEntry>> {
        self.0.iter().map(|entry| &entry.0)
    }

    /// The entries, ordered by ID.
    ///
    /// Sorted by the first bytes of each ID, kept next to the pointer, and by the whole ID only
    /// where those are equal: the same order, with few trips to the entries themselves (issue
    /// 7, S6: sorting by the IDs alone was 9 % of a full sync, most of it fetching the IDs).
    pub(crate) fn sorted(&self) -> Vec<&Arc<SharedEntry>> {
        let mut keyed: Vec<(u128, &Arc<SharedEntry>)> =
            self.iter().map(|entry| (id_prefix(&entry.id), entry)).collect();
        keyed.sort_unstable_by(|(a_key, a), (b_key, b)| a_key.cmp(b_key).then_with(|| a.id.cmp(&b.id)));
        keyed.into_iter().map(|(_, entry)| entry).collect()
    }

    /// Adds `entry`; `false` (and nothing changed) when its ID is held already.
    fn insert(&mut self, entry: Arc<SharedEntry>) -> bool {
        // `insert` leaves a held value in place and drops the new one.
        self.0.insert(ById(entry))
    }

    fn remove(&mut self, id: &str) -> Option<Arc<SharedEntry>> {
        self.0.take(id).map(|entry| entry.0)
    }

    /// The entries by ID, compared by value (tests).
    #[cfg(test)]
    pub(crate) fn to_map(&self) -> BTreeMap<String, Arc<SharedEntry>> {
        self.iter().map(|entry| (entry.id.clone(), Arc::clone(entry))).collect()
    }
}

/// The first 16 bytes of `id` as a big-endian number, a shorter ID padded with zero bytes. It
/// never orders two IDs against their order: where the IDs differ within those bytes, the
/// numbers differ the same way, and an ID that is a prefix of another pads with bytes no greater
/// than the other's. Equal numbers leave the order to the whole IDs.
fn id_prefix(id: &str) -> u128 {
    let mut bytes = [0u8; 16];
    let len = id.len().min(bytes.len());
    bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
    u128::from_be_bytes(bytes)
}

impl FromIterator<Arc<SharedEntry>> for AuthorizedEntries {
    fn from_iter<I: IntoIterator<Item = Arc<SharedEntry>>>(entries: I) -> Self {
        let mut set = Self::default();
        for entry in entries {
            set.insert(entry);
        }
        set
    }
}

/// Most parent levels followed below the roots.
pub(crate) const MAX_DEPTH: usize = 32;

/// Who is asking: the agent's ID and its node selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentIdentity {
    pub(crate) agent_id: SpiffeId,
    pub(crate) node_selectors: SelectorSet,
}

/// The node-alias entries (parent `server_id`) whose selectors are all among `node_selectors`.
pub(crate) fn matching_aliases(
    store: &dyn DataStore,
    server_id: &SpiffeId,
    node_selectors: &SelectorSet,
    now: u64,
) -> Result<Vec<RegistrationEntry>> {
    let mut seen = HashSet::new();
    let mut aliases = Vec::new();
    for selector in node_selectors {
        for entry in store.list_entries_by_selector(selector)? {
            if entry.parent_id == *server_id
                && !entry.is_expired(now)
                && entry.selectors.is_subset_of(node_selectors)
                && seen.insert(entry.id.clone())
            {
                aliases.push(entry);
            }
        }
    }
    Ok(aliases)
}

/// The entries `agent` is authorized for, by entry ID. See the [module docs](self).
#[cfg(test)]
pub(crate) fn authorized_entries(
    store: &dyn DataStore,
    server_id: &SpiffeId,
    agent: &AgentIdentity,
    now: u64,
) -> Result<BTreeMap<String, Arc<SharedEntry>>> {
    Ok(AuthorizedSet::compute(store, server_id, agent, now)?.entries.to_map())
}

/// Changes log entries read per page while advancing.
const CHANGES_PAGE: usize = 1_000;

/// One change to an agent's authorized set.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SetChange {
    /// An entry joined the set or changed (its revision is the entry's). Shared with the
    /// store's entry index and every other set holding it.
    Upsert(Arc<SharedEntry>),
    /// An entry left the set (deleted, expired, or no longer authorized) at `revision`.
    Delete { entry_id: String, revision: u64 },
}

impl SetChange {
    fn revision(&self) -> u64 {
        match self {
            Self::Upsert(entry) => entry.revision,
            Self::Delete { revision, .. } => *revision,
        }
    }

    fn is_delete(&self) -> bool {
        matches!(self, Self::Delete { .. })
    }

    fn entry_id(&self) -> &str {
        match self {
            Self::Upsert(entry) => &entry.id,
            Self::Delete { entry_id, .. } => entry_id,
        }
    }
}

/// A change that moves the graph under authorized entries: the set is computed again.
#[derive(Debug)]
struct Recompute;

/// How many authorized entries carry one SPIFFE ID at each depth: nearly always a single
/// depth, kept without an allocation of its own.
#[derive(Debug, Clone)]
enum Depths {
    One { depth: usize, count: usize },
    Many(BTreeMap<usize, usize>),
}

impl Depths {
    fn add(&mut self, at: usize) {
        match self {
            Self::One { depth, count } if *depth == at => *count += 1,
            Self::One { depth, count } => *self = Self::Many(BTreeMap::from([(*depth, *count), (at, 1)])),
            Self::Many(depths) => *depths.entry(at).or_default() += 1,
        }
    }

    /// Takes one away at `at`; whether none is left.
    fn remove(&mut self, at: usize) -> bool {
        match self {
            Self::One { depth, count } => {
                if *depth == at {
                    *count -= 1;
                }
                *count == 0
            }
            Self::Many(depths) => {
                if let Some(count) = depths.get_mut(&at) {
                    *count -= 1;
                    if *count == 0 {
                        depths.remove(&at);
                    }
                }
                depths.is_empty()
            }
        }
    }

    /// The least depth.
    fn least(&self) -> Option<usize> {
        match self {
            Self::One { depth, .. } => Some(*depth),
            Self::Many(depths) => depths.keys().next().copied(),
        }
    }

    /// The least depth once one carrier at `without` is taken away.
    fn least_without(&self, without: usize) -> Option<usize> {
        match self {
            Self::One { depth, count } => (*depth != without || *count > 1).then_some(*depth),
            Self::Many(depths) => {
                depths.iter().find(|(depth, count)| **depth != without || **count > 1).map(|(depth, _)| *depth)
            }
        }
    }
}

/// An agent's authorized set with what it takes to move it forward change by change; see
/// the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) struct AuthorizedSet {
    identity: AgentIdentity,
    /// The datastore revision the set reflects.
    revision: u64,
    /// The entries as the store hands them out: with the sled store, the `Arc`s of its entry
    /// index, so N agents' sets hold N pointers to one copy of an entry, not N copies.
    entries: AuthorizedEntries,
    /// The roots: the agent's ID and its matching node aliases' SPIFFE IDs (depth 0).
    roots: HashSet<SpiffeId, Fast>,
    /// Entry IDs of the matching node aliases.
    alias_ids: HashSet<String, Fast>,
    /// The earliest expiry of a matching node alias (its children leave with it).
    alias_expiry: Option<u64>,
    /// For each SPIFFE ID carried by authorized entries: how many carry it at each depth
    /// (the depth of an entry is its parent's plus one). The ID's depth is the least.
    depths: HashMap<BySpiffeId, Depths, Fast>,
    /// Authorized entries per parent ID.
    children: HashMap<ByParentId, usize, Fast>,
    /// (expiry, entry ID) of the authorized entries that expire.
    expiries: BTreeSet<(u64, String)>,
    /// Authorized entries per trust domain they federate with.
    federated: BTreeMap<TrustDomain, usize>,
    /// Entries read from the datastore so far (tests hold the cost of a change flat with it).
    reads: u64,
}

impl AuthorizedSet {
    /// The set computed from scratch at the store's current revision (read first, so a write
    /// in between is replayed by the next [`Self::advance`]).
    pub(crate) fn compute(
        store: &dyn DataStore,
        server_id: &SpiffeId,
        agent: &AgentIdentity,
        now: u64,
    ) -> Result<Self> {
        let revision = store.current_revision()?;
        let mut set = Self {
            identity: agent.clone(),
            revision,
            entries: AuthorizedEntries::default(),
            roots: HashSet::default(),
            alias_ids: HashSet::default(),
            alias_expiry: None,
            depths: HashMap::default(),
            children: HashMap::default(),
            expiries: BTreeSet::new(),
            federated: BTreeMap::new(),
            reads: 0,
        };
        let mut roots = vec![agent.agent_id.clone()];
        for alias in matching_aliases(store, server_id, &agent.node_selectors, now)? {
            set.reads += 1;
            if let Some(at) = alias.expires_at {
                set.alias_expiry = Some(set.alias_expiry.map_or(at, |earliest| earliest.min(at)));
            }
            set.alias_ids.insert(alias.id);
            roots.push(alias.spiffe_id);
        }
        // The server ID is never a parent to expand here: its children are node aliases, which
        // only count through the selector match above.
        roots.retain(|id| id != server_id);
        set.roots = roots.into_iter().collect();

        // Breadth first, so the first time a SPIFFE ID is met is at its least depth: it is
        // expanded then (an ID is expanded when it has no depth yet: not a root, carried by no
        // entry of the set so far). The level after the roots expands the SPIFFE IDs of the
        // entries that carried them first, borrowed from those entries (no copy per entry).
        let mut frontier: Vec<Arc<SharedEntry>> = Vec::new();
        for level in 0..=MAX_DEPTH {
            let parents: Vec<&SpiffeId> = if level == 0 {
                set.roots.iter().collect()
            } else {
                frontier.iter().map(|entry| &entry.spiffe_id).collect()
            };
            if parents.is_empty() {
                break;
            }
            let children = store.list_entries_by_parents_shared(&parents)?;
            drop(parents);
            set.reads += children.len() as u64;
            set.reserve(children.len());
            frontier = Vec::new();
            // Every parent of this level is at depth `level`: a root (0), or an ID first carried
            // by an entry of the level before, whose depth is the least it will ever have.
            let depth = level + 1;
            for child in children {
                if child.is_expired(now) {
                    continue;
                }
                if set.insert(&child, depth) && child.spiffe_id != *server_id && !set.roots.contains(&child.spiffe_id) {
                    frontier.push(child);
                }
            }
        }
        if !frontier.is_empty() {
            tracing::warn!(agent = %agent.agent_id, "entry parent chain deeper than {MAX_DEPTH} levels; deeper entries are not authorized");
        }
        Ok(set)
    }

    /// The agent this set is for.
    pub(crate) fn identity(&self) -> &AgentIdentity {
        &self.identity
    }

    /// The datastore revision the set reflects.
    pub(crate) fn revision(&self) -> u64 {
        self.revision
    }

    /// The authorized entries, by entry ID.
    pub(crate) fn entries(&self) -> &AuthorizedEntries {
        &self.entries
    }

    /// Entries read from the datastore so far.
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads
    }

    /// What the set keeps beside its entries, in a comparable form (tests: a set moved forward
    /// change by change keeps exactly what a computed one does). The keys of the ID maps are
    /// checked to carry the ID of an entry of the set.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    fn bookkeeping(
        &self,
    ) -> (BTreeMap<SpiffeId, usize>, BTreeMap<SpiffeId, usize>, Vec<(u64, String)>, BTreeMap<TrustDomain, usize>) {
        for key in self.depths.keys() {
            assert!(self.entries.iter().any(|e| e.spiffe_id == key.0.spiffe_id), "a depth key no entry carries");
        }
        for key in self.children.keys() {
            assert!(self.entries.iter().any(|e| e.parent_id == key.0.parent_id), "a parent key no entry has");
        }
        let depths = self.depths.iter().filter_map(|(id, d)| Some((id.0.spiffe_id.clone(), d.least()?))).collect();
        let children = self.children.iter().map(|(id, n)| (id.0.parent_id.clone(), *n)).collect();
        (depths, children, self.expiries.iter().cloned().collect(), self.federated.clone())
    }

    /// The trust domains other than `own` that authorized entries federate with, sorted.
    pub(crate) fn federated_domains(&self, own: &TrustDomain) -> Vec<TrustDomain> {
        self.federated.keys().filter(|td| *td != own).cloned().collect()
    }

    /// Whether an authorized entry or a matching node alias has expired at `now` (the next
    /// [`Self::advance`] takes it out).
    pub(crate) fn expires_by(&self, now: u64) -> bool {
        self.alias_expiry.is_some_and(|at| at <= now) || self.expiries.first().is_some_and(|(at, _)| *at <= now)
    }

    /// Whether the change of entry `entry_id` to `entry` (`None`: deleted) can alter the set:
    /// `false` means [`Self::advance`] over it would change nothing (it names no entry of the
    /// set, no matching node alias, and its parent is expanded nowhere in the set). In-memory
    /// lookups only, so a stream can pass over changes of other agents' entries without a
    /// datastore read (see [`super::feed`]). Judged on the set as it stands: a batch of changes
    /// none of which concerns the set leaves it as it is.
    pub(crate) fn concerns(&self, server_id: &SpiffeId, entry_id: &str, entry: Option<&RegistrationEntry>) -> bool {
        if self.entries.contains(entry_id) || self.alias_ids.contains(entry_id) {
            return true;
        }
        match entry {
            None => false,
            Some(entry) if entry.parent_id == *server_id => entry.selectors.is_subset_of(&self.identity.node_selectors),
            Some(entry) => self.depth(&entry.parent_id).is_some(),
        }
    }

    /// Moves the set's revision to `revision` over changes none of which
    /// [`concerns`](Self::concerns) it.
    pub(crate) fn pass_to(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// The least depth of a SPIFFE ID: 0 for a root, else that of the entries carrying it.
    fn depth(&self, id: &SpiffeId) -> Option<usize> {
        if self.roots.contains(id) {
            return Some(0);
        }
        self.depths.get(id).and_then(Depths::least)
    }

    /// Adds an authorized entry at `depth` (nothing if its ID is in the set already); whether it
    /// is the first entry of the set to carry its SPIFFE ID.
    fn insert(&mut self, entry: &Arc<SharedEntry>, depth: usize) -> bool {
        if !self.entries.insert(Arc::clone(entry)) {
            return false;
        }
        let first = match self.depths.entry(BySpiffeId(Arc::clone(entry))) {
            Entry::Occupied(mut depths) => {
                depths.get_mut().add(depth);
                false
            }
            Entry::Vacant(vacant) => {
                vacant.insert(Depths::One { depth, count: 1 });
                true
            }
        };
        match self.children.get_mut(&entry.parent_id) {
            Some(count) => *count += 1,
            None => {
                self.children.insert(ByParentId(Arc::clone(entry)), 1);
            }
        }
        if let Some(at) = entry.expires_at {
            self.expiries.insert((at, entry.id.clone()));
        }
        for td in &entry.federates_with {
            *self.federated.entry(td.clone()).or_default() += 1;
        }
        first
    }

    /// Makes room for `additional` more entries without growing the maps one step at a time.
    fn reserve(&mut self, additional: usize) {
        self.entries.0.reserve(additional);
        self.depths.reserve(additional);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<SharedEntry>> {
        let entry = self.entries.remove(id)?;
        let depth = self.depth(&entry.parent_id).map_or(0, |d| d + 1);
        if let Some(depths) = self.depths.get_mut(&entry.spiffe_id)
            && depths.remove(depth)
        {
            self.depths.remove(&entry.spiffe_id);
        }
        if let Some(count) = self.children.get_mut(&entry.parent_id) {
            *count -= 1;
            if *count == 0 {
                self.children.remove(&entry.parent_id);
            }
        }
        if let Some(at) = entry.expires_at {
            self.expiries.remove(&(at, entry.id.clone()));
        }
        for td in &entry.federates_with {
            if let Some(count) = self.federated.get_mut(td) {
                *count -= 1;
                if *count == 0 {
                    self.federated.remove(td);
                }
            }
        }
        Some(entry)
    }

    /// Whether `id` is the parent of authorized entries.
    fn has_children(&self, id: &SpiffeId) -> bool {
        self.children.contains_key(id)
    }

    /// Applies the new state `new` (`None`: deleted) of entry `id`, changed at `revision`.
    fn apply_one(
        &mut self,
        store: &dyn DataStore,
        server_id: &SpiffeId,
        id: &str,
        new: Option<Arc<SharedEntry>>,
        revision: u64,
        now: u64,
    ) -> Result<std::result::Result<Option<SetChange>, Recompute>> {
        // Node aliases decide the roots.
        if self.alias_ids.contains(id) {
            return Ok(Err(Recompute));
        }
        if let Some(entry) = &new
            && entry.parent_id == *server_id
        {
            let concerns_agent = !entry.is_expired(now) && entry.selectors.is_subset_of(&self.identity.node_selectors);
            if concerns_agent {
                return Ok(Err(Recompute));
            }
            // A node alias of other agents is not in the set; if the entry was (it became that
            // alias), it leaves below like any entry that is no longer authorized.
        }
        // Whether `entry` belongs in the set as the set stands (its parent expanded).
        let belongs = |set: &Self, entry: &RegistrationEntry| {
            entry.parent_id != *server_id
                && !entry.is_expired(now)
                && set.depth(&entry.parent_id).is_some_and(|depth| depth <= MAX_DEPTH)
        };
        match (self.entries.get(id), new) {
            (None, None) => Ok(Ok(None)),
            (Some(old), Some(entry)) if *old == entry && belongs(self, &entry) => Ok(Ok(None)),
            // Same place in the graph: only the entry's own fields change. (Its parent's depth
            // cannot rest on the entry itself: that depth is less than the entry's.)
            (Some(old), Some(entry))
                if old.spiffe_id == entry.spiffe_id && old.parent_id == entry.parent_id && belongs(self, &entry) =>
            {
                let depth = self.depth(&entry.parent_id).map_or(0, |d| d + 1);
                self.remove(id);
                self.insert(&entry, depth);
                Ok(Ok(Some(SetChange::Upsert(entry))))
            }
            (old, new) => {
                let held = old.is_some();
                if let Some(old) = old {
                    // Losing the entry must not move the graph under it.
                    let spiffe_id = old.spiffe_id.clone();
                    if self.has_children(&spiffe_id) && self.depth(&spiffe_id) != self.depth_without(old) {
                        return Ok(Err(Recompute));
                    }
                    self.remove(id);
                }
                // Judged without its old version: that may have been what expanded its new
                // parent (an entry moved under its own former SPIFFE ID).
                let Some(entry) = new.filter(|entry| belongs(self, entry)) else {
                    return Ok(Ok(held.then(|| SetChange::Delete { entry_id: id.to_owned(), revision })));
                };
                let depth = self.depth(&entry.parent_id).map_or(0, |d| d + 1);
                match self.depth(&entry.spiffe_id) {
                    // A SPIFFE ID expanded for the first time: its children (held by no one
                    // yet) would join.
                    None => {
                        let children = store.list_entries_by_parents_shared(&[&entry.spiffe_id])?;
                        self.reads += children.len() as u64;
                        if !children.is_empty() {
                            return Ok(Err(Recompute));
                        }
                    }
                    // A shallower path to an ID with children moves their depth.
                    Some(current) if depth < current && self.has_children(&entry.spiffe_id) => {
                        return Ok(Err(Recompute));
                    }
                    Some(_) => {}
                }
                self.insert(&entry, depth);
                Ok(Ok(Some(SetChange::Upsert(entry))))
            }
        }
    }

    /// The depth `old.spiffe_id` would have without `old`.
    fn depth_without(&self, old: &RegistrationEntry) -> Option<usize> {
        if self.roots.contains(&old.spiffe_id) {
            return Some(0);
        }
        let own = self.depth(&old.parent_id).map_or(0, |d| d + 1);
        self.depths.get(&old.spiffe_id)?.least_without(own)
    }

    /// Moves the set to the store's current revision and returns what changed, in revision
    /// order. Reads only the changed entries, unless a change moves the graph (see the
    /// [module docs](self)), in which case the set is computed again and the difference
    /// returned. Entries expired at `now` leave the set. On an error the set may stand between
    /// two revisions, which the next call resumes from.
    pub(crate) fn advance(&mut self, store: &dyn DataStore, server_id: &SpiffeId, now: u64) -> Result<Vec<SetChange>> {
        let mut changes = Vec::new();
        match self.follow(store, server_id, now, &mut changes)? {
            Ok(()) => Ok(changes),
            Err(Recompute) => {
                let mut fresh = Self::compute(store, server_id, &self.identity, now)?;
                fresh.reads += self.reads;
                changes.extend(diff(fresh.revision, &self.entries, &fresh.entries));
                *self = fresh;
                Ok(changes)
            }
        }
    }

    fn follow(
        &mut self,
        store: &dyn DataStore,
        server_id: &SpiffeId,
        now: u64,
        changes: &mut Vec<SetChange>,
    ) -> Result<std::result::Result<(), Recompute>> {
        if self.alias_expiry.is_some_and(|at| at <= now) {
            return Ok(Err(Recompute));
        }
        // Entries that expired since.
        while let Some((at, id)) = self.expiries.first().cloned() {
            if at > now {
                break;
            }
            self.expiries.remove(&(at, id.clone()));
            match self.apply_one(store, server_id, &id, None, self.revision, now)? {
                Ok(change) => changes.extend(change),
                Err(recompute) => return Ok(Err(recompute)),
            }
        }
        let mut read = 0usize;
        loop {
            let page = match store.changes_since(self.revision, CHANGES_PAGE) {
                Ok(page) => page,
                Err(DataStoreError::ResyncRequired { .. }) => return Ok(Err(Recompute)),
                Err(err) => return Err(err),
            };
            if page.is_empty() {
                return Ok(Ok(()));
            }
            read += page.len();
            // Far behind: one computation is cheaper than replaying the log.
            if read > CHANGES_PAGE.max(self.entries.len()) {
                return Ok(Err(Recompute));
            }
            for change in page {
                let new = match change.kind {
                    ChangeKind::Delete => None,
                    ChangeKind::Upsert => {
                        self.reads += 1;
                        store.get_entry_shared(&change.entry_id)?
                    }
                };
                match self.apply_one(store, server_id, &change.entry_id, new, change.revision, now)? {
                    Ok(applied) => changes.extend(applied),
                    Err(recompute) => return Ok(Err(recompute)),
                }
                self.revision = self.revision.max(change.revision);
            }
        }
    }
}

/// The changes that turn `old` into `new` (at `revision`), in revision order.
pub(crate) fn diff(revision: u64, old: &AuthorizedEntries, new: &AuthorizedEntries) -> Vec<SetChange> {
    let mut changes: Vec<SetChange> = Vec::new();
    for entry in new.iter() {
        if old.get(&entry.id) != Some(entry) {
            changes.push(SetChange::Upsert(Arc::clone(entry)));
        }
    }
    for entry in old.iter() {
        if !new.contains(&entry.id) {
            changes.push(SetChange::Delete { entry_id: entry.id.clone(), revision });
        }
    }
    // Revision order; at one revision, upserts before deletions, each by entry ID.
    changes
        .sort_by(|a, b| (a.revision(), a.is_delete(), a.entry_id()).cmp(&(b.revision(), b.is_delete(), b.entry_id())));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDataStore;
    use tessera_spiffe::Selector;

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap()
    }

    fn selectors(list: &[&str]) -> SelectorSet {
        SelectorSet::parse_all(list).unwrap()
    }

    fn entry(store: &MemoryDataStore, entry_id: &str, spiffe: &str, parent: &SpiffeId, sel: &[&str]) {
        store.create_entry(&RegistrationEntry::new(entry_id, id(spiffe), parent.clone(), selectors(sel))).unwrap();
    }

    fn ids(map: &BTreeMap<String, Arc<SharedEntry>>) -> Vec<&str> {
        map.keys().map(String::as_str).collect()
    }

    fn shared(entry_id: &str) -> Arc<SharedEntry> {
        Arc::new(SharedEntry::new(RegistrationEntry::new(entry_id, id("/w"), id("/a"), selectors(&["t:1"]))))
    }

    proptest::proptest! {
        /// The order of a snapshot is the order of the entry IDs, whatever they share: long
        /// common prefixes, IDs that are prefixes of others, zero bytes, multi-byte characters.
        #[test]
        fn sorted_is_the_order_of_the_ids(ids in proptest::collection::btree_set("(s10000-|[a-b\\x00é]{0,3}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-){0,3}[0-9a-z\\x00]{0,4}", 0..60)) {
            let set: AuthorizedEntries = ids.iter().map(|entry_id| shared(entry_id)).collect();
            let sorted: Vec<&str> = set.sorted().iter().map(|entry| entry.id.as_str()).collect();
            let expected: Vec<&str> = ids.iter().map(String::as_str).collect();
            proptest::prop_assert_eq!(sorted, expected);
        }
    }

    #[test]
    fn id_prefixes_order_as_the_ids_do() {
        let ids = [
            "",
            "\0",
            "a",
            "a\0",
            "a\0\0",
            "ab",
            "s10000-1",
            "s10000-10",
            "s10000-9",
            "0123456789abcdef",
            "0123456789abcdef0",
            "0123456789abcdeg",
        ];
        for a in ids {
            for b in ids {
                if a < b {
                    assert!(id_prefix(a) <= id_prefix(b), "{a:?} {b:?}");
                }
            }
        }
        assert!(id_prefix("s10000-10") < id_prefix("s10000-9"));
        assert_eq!(id_prefix("0123456789abcdef0"), id_prefix("0123456789abcdef1"), "only 16 bytes");
    }

    #[test]
    fn children_aliases_and_descendants_are_authorized_and_nothing_else() {
        let store = MemoryDataStore::default();
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        let other_agent = id("/tessera/agent/join_token/b");
        // Direct child of the agent, and its child (a descendant).
        entry(&store, "direct", "/web", &agent, &["unix:uid:1"]);
        entry(&store, "grandchild", "/web/sidecar", &id("/web"), &["unix:uid:2"]);
        // A node alias matching the agent's node selectors, and a child of the alias.
        entry(&store, "alias", "/cluster", &server, &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a"]);
        entry(&store, "alias-child", "/cluster/db", &id("/cluster"), &["unix:uid:3"]);
        // An alias that needs a selector the agent lacks, and its child.
        entry(
            &store,
            "alias-x",
            "/other-cluster",
            &server,
            &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a", "k8s:ns:x"],
        );
        entry(&store, "alias-x-child", "/other-cluster/db", &id("/other-cluster"), &["unix:uid:3"]);
        // Another agent's entries.
        entry(&store, "other", "/other", &other_agent, &["unix:uid:1"]);

        let identity = AgentIdentity {
            agent_id: agent.clone(),
            node_selectors: [Selector::new("spiffe_id", agent.as_str()).unwrap()].into_iter().collect(),
        };
        let set = authorized_entries(&store, &server, &identity, 0).unwrap();
        assert_eq!(ids(&set), vec!["alias-child", "direct", "grandchild"]);

        // With the extra node selector, the second alias matches too.
        let mut more = identity.clone();
        more.node_selectors.insert(Selector::new("k8s", "ns:x").unwrap());
        let set = authorized_entries(&store, &server, &more, 0).unwrap();
        assert_eq!(ids(&set), vec!["alias-child", "alias-x-child", "direct", "grandchild"]);

        // The other agent sees only its own entry.
        let other = AgentIdentity { agent_id: other_agent, node_selectors: SelectorSet::new() };
        assert_eq!(ids(&authorized_entries(&store, &server, &other, 0).unwrap()), vec!["other"]);
    }

    /// Applies `changes` to `held` as an agent does.
    fn replay(held: &mut BTreeMap<String, Arc<SharedEntry>>, changes: Vec<SetChange>) {
        for change in changes {
            match change {
                SetChange::Upsert(entry) => {
                    held.insert(entry.id.clone(), entry);
                }
                SetChange::Delete { entry_id, .. } => {
                    held.remove(&entry_id);
                }
            }
        }
    }

    /// Every kind of change, one after the other: after each, the advanced set is exactly the
    /// set computed from scratch, and so is what an agent holds after replaying the changes.
    #[test]
    fn advancing_gives_the_computed_set_after_every_kind_of_change() {
        let store = MemoryDataStore::default();
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        let identity = AgentIdentity {
            agent_id: agent.clone(),
            node_selectors: [Selector::new("spiffe_id", agent.as_str()).unwrap()].into_iter().collect(),
        };
        let mut set = AuthorizedSet::compute(&store, &server, &identity, 50).unwrap();
        let mut held = set.entries().to_map();
        let mut check = |set: &mut AuthorizedSet, store: &MemoryDataStore, now: u64, what: &str| {
            let changes = set.advance(store, &server, now).unwrap();
            replay(&mut held, changes);
            let expected = authorized_entries(store, &server, &identity, now).unwrap();
            assert_eq!(ids(&set.entries().to_map()), ids(&expected), "after {what}");
            assert_eq!(set.entries().to_map(), expected, "after {what}");
            assert_eq!(
                set.bookkeeping(),
                AuthorizedSet::compute(store, &server, &identity, now).unwrap().bookkeeping()
            );
            assert_eq!(&held, &expected, "the agent's copy after {what}");
            assert_eq!(set.revision(), store.current_revision().unwrap(), "after {what}");
        };
        entry(&store, "w1", "/w1", &agent, &["unix:uid:1"]);
        check(&mut set, &store, 50, "a child of the agent");
        entry(&store, "orphan", "/o/child", &id("/o"), &["unix:uid:2"]);
        check(&mut set, &store, 50, "an entry under an unknown parent");
        entry(&store, "o", "/o", &agent, &["unix:uid:3"]);
        check(&mut set, &store, 50, "the parent of an existing entry (it joins too)");
        entry(&store, "o2", "/o", &agent, &["unix:uid:4"]);
        check(&mut set, &store, 50, "a second entry with the same SPIFFE ID");
        store.delete_entry("o").unwrap();
        check(&mut set, &store, 50, "one of two entries carrying a parent ID");
        store.delete_entry("o2").unwrap();
        check(&mut set, &store, 50, "the last entry carrying a parent ID (its child leaves)");
        entry(&store, "alias", "/cluster", &server, &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a"]);
        entry(&store, "c1", "/cluster/db", &id("/cluster"), &["unix:uid:5"]);
        check(&mut set, &store, 50, "a node alias and its child");
        entry(&store, "other-alias", "/elsewhere", &server, &["k8s:ns:x"]);
        check(&mut set, &store, 50, "a node alias of another agent");
        let mut moved = store.get_entry("w1").unwrap().unwrap();
        moved.parent_id = id("/nowhere");
        store.update_entry(&moved, None).unwrap();
        check(&mut set, &store, 50, "a child moved away");
        let mut back = store.get_entry("w1").unwrap().unwrap();
        back.parent_id = agent.clone();
        back.selectors = selectors(&["unix:uid:9"]);
        back.federates_with = vec![TrustDomain::new("partner.test").unwrap()];
        store.update_entry(&back, None).unwrap();
        check(&mut set, &store, 50, "a child moved back, with new selectors and a federation");
        assert_eq!(
            set.federated_domains(&TrustDomain::new("example.org").unwrap()),
            [TrustDomain::new("partner.test").unwrap()]
        );
        let mut expiring = RegistrationEntry::new("x", id("/x"), agent.clone(), selectors(&["t:1"]));
        expiring.expires_at = Some(100);
        store.create_entry(&expiring).unwrap();
        check(&mut set, &store, 99, "an entry that expires later");
        assert!(set.expires_by(100) && !set.expires_by(99));
        check(&mut set, &store, 100, "its expiry");
        store.delete_entry("alias").unwrap();
        check(&mut set, &store, 100, "the node alias deleted (its child leaves)");
        store.delete_entry("w1").unwrap();
        check(&mut set, &store, 100, "a deleted child");
        assert!(set.federated_domains(&TrustDomain::new("example.org").unwrap()).is_empty());
    }

    /// Issue 7: with N entries authorized, one more entry must cost the same datastore reads
    /// whatever N (it read all N before).
    #[test]
    fn one_new_entry_reads_the_same_whatever_the_set_holds() {
        fn reads_for_one_more(held: usize) -> u64 {
            let store = MemoryDataStore::default();
            let server = id("/tessera/server");
            let agent = id("/tessera/agent/join_token/a");
            for n in 0..held {
                entry(&store, &format!("e{n}"), &format!("/w/{n}"), &agent, &["unix:uid:1"]);
            }
            let identity = AgentIdentity { agent_id: agent.clone(), node_selectors: SelectorSet::new() };
            let mut set = AuthorizedSet::compute(&store, &server, &identity, 0).unwrap();
            assert_eq!(set.entries().len(), held);
            let before = set.reads();
            entry(&store, "new", "/w/new", &agent, &["unix:uid:2"]);
            let changes = set.advance(&store, &server, 0).unwrap();
            assert!(matches!(&changes[..], [SetChange::Upsert(e)] if e.id == "new"), "{changes:?}");
            store.delete_entry("new").unwrap();
            let changes = set.advance(&store, &server, 0).unwrap();
            assert!(matches!(&changes[..], [SetChange::Delete { entry_id, .. }] if entry_id == "new"));
            set.reads() - before
        }
        let small = reads_for_one_more(10);
        let large = reads_for_one_more(2_000);
        assert!(small > 0, "the count must measure something");
        assert_eq!(large, small, "one entry read {large} entries with 2,000 held, {small} with 10");
    }

    #[test]
    fn cycles_terminate_and_expired_entries_are_skipped() {
        let store = MemoryDataStore::default();
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        entry(&store, "a", "/x", &agent, &["t:1"]);
        entry(&store, "b", "/y", &id("/x"), &["t:1"]);
        // A cycle: /x is also a child of /y, and the agent ID itself is a child of /y.
        entry(&store, "c", "/x", &id("/y"), &["t:2"]);
        entry(&store, "d", "/tessera/agent/join_token/a", &id("/y"), &["t:3"]);
        let mut expired = RegistrationEntry::new("e", id("/z"), agent.clone(), selectors(&["t:1"]));
        expired.expires_at = Some(100);
        store.create_entry(&expired).unwrap();
        entry(&store, "f", "/z/child", &id("/z"), &["t:1"]);

        let identity = AgentIdentity { agent_id: agent, node_selectors: SelectorSet::new() };
        assert_eq!(ids(&authorized_entries(&store, &server, &identity, 100).unwrap()), vec!["a", "b", "c", "d"]);
        // Before its expiry the entry and its child are in.
        assert_eq!(
            ids(&authorized_entries(&store, &server, &identity, 99).unwrap()),
            vec!["a", "b", "c", "d", "e", "f"]
        );
    }

    /// The rule of the module docs, written as plainly as possible (no incremental state),
    /// to hold the optimised computation and the change-by-change advance to.
    fn reference(
        store: &dyn DataStore,
        server: &SpiffeId,
        agent: &AgentIdentity,
        now: u64,
    ) -> BTreeMap<String, Arc<SharedEntry>> {
        let all = store.list_entries(&crate::datastore::EntryFilter::default(), &crate::datastore::PageRequest::all());
        let all = all.unwrap().items;
        let mut expanded: HashSet<SpiffeId> = HashSet::from([server.clone(), agent.agent_id.clone()]);
        let mut frontier = vec![agent.agent_id.clone()];
        for alias in &all {
            if alias.parent_id == *server
                && !alias.is_expired(now)
                && alias.selectors.iter().all(|s| agent.node_selectors.contains(s))
                && expanded.insert(alias.spiffe_id.clone())
            {
                frontier.push(alias.spiffe_id.clone());
            }
        }
        let mut out = BTreeMap::new();
        for _ in 0..=MAX_DEPTH {
            let mut next = Vec::new();
            for entry in &all {
                if frontier.contains(&entry.parent_id) && !entry.is_expired(now) {
                    out.insert(entry.id.clone(), Arc::new(SharedEntry::new(entry.clone())));
                    if expanded.insert(entry.spiffe_id.clone()) {
                        next.push(entry.spiffe_id.clone());
                    }
                }
            }
            frontier = next;
        }
        out
    }

    /// Random graphs (parents drawn from a small pool of IDs, so chains, shared IDs at several
    /// depths, cycles and node aliases all occur), changed one write at a time: after each,
    /// the computed set, the advanced set and what an agent replaying the changes holds are
    /// all exactly the reference.
    #[test]
    fn random_graphs_match_the_rule_after_every_write() {
        random_graphs(200, MemoryDataStore::default);
    }

    /// The same against the sled store, whose reads come from its entry index (each write is
    /// durable, hence fewer rounds).
    #[test]
    fn random_graphs_match_the_rule_after_every_write_through_the_entry_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut round = 0;
        random_graphs(12, || {
            round += 1;
            let path = dir.path().join(round.to_string());
            crate::datastore::SledDataStore::open(path, crate::datastore::DataStoreOptions::default()).unwrap()
        });
    }

    fn random_graphs<S: DataStore>(rounds: usize, mut open: impl FnMut() -> S) {
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        let identity = AgentIdentity {
            agent_id: agent.clone(),
            node_selectors: [
                Selector::new("spiffe_id", agent.as_str()).unwrap(),
                Selector::new("k8s", "ns:x").unwrap(),
            ]
            .into_iter()
            .collect(),
        };
        let pool = ["/a", "/b", "/c", "/d", "/tessera/agent/join_token/a", "/tessera/server"];
        let alias_selectors = [
            &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a"][..],
            &["k8s:ns:x", "k8s:ns:y"][..],
            &["k8s:ns:x"][..],
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            usize::try_from(seed % bound as u64).unwrap()
        };
        for _round in 0..rounds {
            let store = open();
            let mut set = AuthorizedSet::compute(&store, &server, &identity, 10).unwrap();
            let mut held = set.entries().to_map();
            for step in 0..60 {
                let entry_id = format!("e{}", next(12));
                let now = 10 + (step as u64) / 10;
                match (next(10), store.get_entry(&entry_id).unwrap()) {
                    (0..=1, Some(_)) => {
                        store.delete_entry(&entry_id).unwrap();
                    }
                    (_, existing) => {
                        let parent = id(pool[next(pool.len())]);
                        let sel: &[&str] = if parent == server { alias_selectors[next(3)] } else { &["unix:uid:1"] };
                        let mut e = RegistrationEntry::new(&entry_id, id(pool[next(4)]), parent, selectors(sel));
                        e.selectors.insert(Selector::new("n", &entry_id).unwrap());
                        if next(5) == 0 {
                            e.expires_at = Some(now + 1 + next(3) as u64);
                        }
                        let written = match existing {
                            Some(_) => store.update_entry(&e, None),
                            None => store.create_entry(&e),
                        };
                        // A duplicate (same SPIFFE ID, parent and selectors) is refused: fine.
                        let _ = written;
                    }
                }
                let expected = reference(&store, &server, &identity, now);
                let computed = AuthorizedSet::compute(&store, &server, &identity, now).unwrap();
                // Changes that do not concern the set leave it as it is.
                let pending = store.changes_since(set.revision(), 100).unwrap();
                let concerned = pending.iter().any(|c| {
                    let entry = store.get_entry(&c.entry_id).unwrap();
                    set.concerns(&server, &c.entry_id, entry.as_ref())
                });
                if !concerned && !set.expires_by(now) {
                    let mut passed = set.clone();
                    let changes = passed.advance(&store, &server, now).unwrap();
                    assert!(
                        changes.is_empty(),
                        "changes that concern no one changed the set, step {step}: {changes:?}"
                    );
                    assert_eq!(passed.entries().to_map(), set.entries().to_map());
                }
                assert_eq!(computed.entries().to_map(), expected, "computed set, step {step}");
                replay(&mut held, set.advance(&store, &server, now).unwrap());
                assert_eq!(set.entries().to_map(), expected, "advanced set, step {step}");
                assert_eq!(set.bookkeeping(), computed.bookkeeping(), "advanced set's bookkeeping, step {step}");
                assert_eq!(held, expected, "the agent's copy, step {step}");
            }
        }
    }
}
