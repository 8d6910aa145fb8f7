//! The in-memory fake: the same semantics as the sled store, in mutex-guarded maps.
//!
//! One mutex guards the whole state, so every method is trivially one atomic transaction.
//! Nothing is persisted; "durable" means "visible to the next call".

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::watch;

use super::error::{DataStoreError, ResourceKind};
use super::types::{
    AttestedNode, Bundle, CaJournal, ChangeKind, DataStoreOptions, EntryChange, EntryFilter,
    FederationRelationshipRecord, JoinToken, NodeFilter, NodeSerials, Page, PageRequest, RegistrationEntry,
    SharedEntry, check_continuity, compaction_target, duplicate_entry, entry_id_taken, entry_revision_conflict,
    paginate, validate_entry, validate_node, validate_serials, validate_token,
};
use super::{DataStore, Generations, Result, publish_revision};

/// The in-memory fake [`DataStore`] for tests.
pub struct MemoryDataStore {
    state: Mutex<State>,
    generations: Generations,
    revisions: watch::Sender<u64>,
    options: DataStoreOptions,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<String, RegistrationEntry>,
    /// Unique key (SPIFFE ID, parent, selectors) -> entry ID.
    unique: HashMap<String, String>,
    revision: u64,
    /// Every change up to and including this revision was compacted away.
    floor: u64,
    changes: BTreeMap<u64, EntryChange>,
    /// Keyed by the SPIFFE ID string, so listings order like the sled store.
    nodes: BTreeMap<String, AttestedNode>,
    tokens: HashMap<String, JoinToken>,
    bundles: BTreeMap<String, Bundle>,
    ca_journal: Option<CaJournal>,
    jtis: HashMap<(String, String), u64>,
    federation: BTreeMap<String, FederationRelationshipRecord>,
}

impl State {
    /// Bumps the revision and logs the change; returns the new revision.
    fn log_change(&mut self, entry_id: &str, kind: ChangeKind) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        self.changes.insert(revision, EntryChange { revision, entry_id: entry_id.to_owned(), kind });
        revision
    }

    fn compact(&mut self, new_floor: u64) -> u64 {
        if new_floor <= self.floor {
            return 0;
        }
        let kept = self.changes.split_off(&(new_floor + 1));
        let dropped = std::mem::replace(&mut self.changes, kept).len();
        self.floor = new_floor;
        u64::try_from(dropped).unwrap_or(u64::MAX)
    }

    fn delete_entry(&mut self, id: &str) -> Option<RegistrationEntry> {
        let entry = self.entries.remove(id)?;
        self.unique.remove(&entry.unique_key());
        self.log_change(id, ChangeKind::Delete);
        Some(entry)
    }

    fn node_mut(&mut self, spiffe_id: &SpiffeId) -> Result<&mut AttestedNode> {
        self.nodes
            .get_mut(spiffe_id.as_str())
            .ok_or_else(|| DataStoreError::NotFound { kind: ResourceKind::AttestedNode, id: spiffe_id.to_string() })
    }
}

impl MemoryDataStore {
    /// An empty store.
    pub fn new(options: DataStoreOptions) -> Self {
        Self {
            state: Mutex::new(State::default()),
            generations: Generations::default(),
            revisions: watch::Sender::new(0),
            options,
        }
    }

    /// The state, recovered even if a previous holder panicked: every mutation below is
    /// complete before it can fail, so the maps are never half-written.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// After an entry write: compact if due, then notify subscribers.
    fn entry_written(&self, mut state: MutexGuard<'_, State>) {
        if let Some(floor) = compaction_target(state.revision, state.floor, self.options.change_log_retention) {
            state.compact(floor);
        }
        let revision = state.revision;
        drop(state);
        publish_revision(&self.revisions, revision);
    }
}

impl Default for MemoryDataStore {
    fn default() -> Self {
        Self::new(DataStoreOptions::default())
    }
}

impl fmt::Debug for MemoryDataStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDataStore").field("options", &self.options).finish_non_exhaustive()
    }
}

impl DataStore for MemoryDataStore {
    fn create_entry(&self, entry: &RegistrationEntry) -> Result<RegistrationEntry> {
        validate_entry(entry)?;
        let mut state = self.state();
        if state.entries.contains_key(&entry.id) {
            return Err(entry_id_taken(&entry.id));
        }
        let unique = entry.unique_key();
        if let Some(other) = state.unique.get(&unique) {
            return Err(duplicate_entry(entry, other));
        }
        let mut stored = entry.clone();
        stored.revision = state.log_change(&entry.id, ChangeKind::Upsert);
        state.unique.insert(unique, entry.id.clone());
        state.entries.insert(entry.id.clone(), stored.clone());
        self.entry_written(state);
        Ok(stored)
    }

    fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        Ok(self.state().entries.get(id).cloned())
    }

    fn update_entry(&self, entry: &RegistrationEntry, expected_revision: Option<u64>) -> Result<RegistrationEntry> {
        validate_entry(entry)?;
        let mut state = self.state();
        let Some(old) = state.entries.get(&entry.id) else {
            return Err(DataStoreError::NotFound { kind: ResourceKind::Entry, id: entry.id.clone() });
        };
        if let Some(expected) = expected_revision.filter(|&expected| expected != old.revision) {
            return Err(entry_revision_conflict(&entry.id, expected, old.revision));
        }
        let old_unique = old.unique_key();
        let unique = entry.unique_key();
        if let Some(other) = state.unique.get(&unique).filter(|other| **other != entry.id) {
            return Err(duplicate_entry(entry, other));
        }
        let mut stored = entry.clone();
        stored.revision = state.log_change(&entry.id, ChangeKind::Upsert);
        state.unique.remove(&old_unique);
        state.unique.insert(unique, entry.id.clone());
        state.entries.insert(entry.id.clone(), stored.clone());
        self.entry_written(state);
        Ok(stored)
    }

    fn delete_entry(&self, id: &str) -> Result<RegistrationEntry> {
        let mut state = self.state();
        let Some(old) = state.delete_entry(id) else {
            return Err(DataStoreError::NotFound { kind: ResourceKind::Entry, id: id.to_owned() });
        };
        self.entry_written(state);
        Ok(old)
    }

    fn list_entries(&self, filter: &EntryFilter, page: &PageRequest) -> Result<Page<RegistrationEntry>> {
        let state = self.state();
        let matching =
            state.entries.iter().filter(|(_, e)| filter.matches(e)).map(|(id, e)| Ok((id.clone(), e.clone())));
        paginate(matching, page)
    }

    fn count_entries(&self) -> Result<u64> {
        Ok(u64::try_from(self.state().entries.len()).unwrap_or(u64::MAX))
    }

    fn list_entries_by_parents(&self, parent_ids: &[SpiffeId]) -> Result<Vec<RegistrationEntry>> {
        let parents: std::collections::HashSet<&SpiffeId> = parent_ids.iter().collect();
        let state = self.state();
        Ok(state.entries.values().filter(|e| parents.contains(&e.parent_id)).cloned().collect())
    }

    fn list_entries_by_parents_shared(&self, parent_ids: &[&SpiffeId]) -> Result<Vec<Arc<SharedEntry>>> {
        let parents: std::collections::HashSet<&SpiffeId> = parent_ids.iter().copied().collect();
        let state = self.state();
        Ok(state
            .entries
            .values()
            .filter(|e| parents.contains(&e.parent_id))
            .map(|e| Arc::new(SharedEntry::new(e.clone())))
            .collect())
    }

    fn list_entries_by_selector(&self, selector: &Selector) -> Result<Vec<RegistrationEntry>> {
        let state = self.state();
        Ok(state.entries.values().filter(|e| e.selectors.contains(selector)).cloned().collect())
    }

    fn prune_expired_entries(&self, now: u64) -> Result<u64> {
        let mut state = self.state();
        let expired: Vec<String> = state.entries.values().filter(|e| e.is_expired(now)).map(|e| e.id.clone()).collect();
        for id in &expired {
            state.delete_entry(id);
        }
        if expired.is_empty() {
            return Ok(0);
        }
        self.entry_written(state);
        Ok(u64::try_from(expired.len()).unwrap_or(u64::MAX))
    }

    fn current_revision(&self) -> Result<u64> {
        Ok(self.state().revision)
    }

    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<EntryChange>> {
        let state = self.state();
        let changes: Vec<EntryChange> =
            state.changes.range(revision.saturating_add(1)..).take(limit).map(|(_, c)| c.clone()).collect();
        if limit > 0 {
            check_continuity(revision, state.revision, state.floor, &changes)?;
        } else if revision > state.revision || revision < state.floor {
            return Err(DataStoreError::ResyncRequired {
                since: revision,
                floor: state.floor,
                current: state.revision,
            });
        }
        Ok(changes)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    fn compact_changes(&self, retain: u64) -> Result<u64> {
        let mut state = self.state();
        let floor = state.revision.saturating_sub(retain);
        Ok(state.compact(floor))
    }

    fn create_attested_node(&self, node: &AttestedNode) -> Result<()> {
        validate_node(node)?;
        let mut state = self.state();
        let key = node.spiffe_id.as_str();
        if state.nodes.contains_key(key) {
            return Err(DataStoreError::AlreadyExists {
                kind: ResourceKind::AttestedNode,
                id: key.to_owned(),
                reason: "the node is already attested (evict it first)".to_owned(),
            });
        }
        state.nodes.insert(key.to_owned(), node.clone());
        self.generations.node_written(&node.spiffe_id);
        Ok(())
    }

    fn get_attested_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>> {
        Ok(self.state().nodes.get(spiffe_id.as_str()).cloned())
    }

    fn list_attested_nodes(&self, filter: &NodeFilter, page: &PageRequest) -> Result<Page<AttestedNode>> {
        let state = self.state();
        let matching = state.nodes.iter().filter(|(_, n)| filter.matches(n)).map(|(id, n)| Ok((id.clone(), n.clone())));
        paginate(matching, page)
    }

    fn update_attested_node_serials(
        &self,
        spiffe_id: &SpiffeId,
        expected_serial: &str,
        serials: &NodeSerials,
    ) -> Result<AttestedNode> {
        validate_serials(serials)?;
        let mut state = self.state();
        self.generations.node_written(spiffe_id);
        let node = state.node_mut(spiffe_id)?;
        if node.banned {
            return Err(DataStoreError::NodeBanned { spiffe_id: spiffe_id.clone() });
        }
        if node.serial != expected_serial {
            return Err(DataStoreError::Conflict {
                kind: ResourceKind::AttestedNode,
                id: spiffe_id.to_string(),
                expected: format!("serial {expected_serial}"),
                found: format!("serial {}", node.serial),
            });
        }
        node.serial.clone_from(&serials.serial);
        node.new_serial.clone_from(&serials.new_serial);
        node.expires_at = serials.expires_at;
        Ok(node.clone())
    }

    fn set_attested_node_selectors(&self, spiffe_id: &SpiffeId, selectors: &SelectorSet) -> Result<AttestedNode> {
        let mut state = self.state();
        self.generations.node_written(spiffe_id);
        let node = state.node_mut(spiffe_id)?;
        node.selectors = selectors.clone();
        Ok(node.clone())
    }

    fn ban_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let mut state = self.state();
        self.generations.node_written(spiffe_id);
        let node = state.node_mut(spiffe_id)?;
        node.banned = true;
        node.serial.clear();
        node.new_serial = None;
        Ok(node.clone())
    }

    fn delete_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let mut state = self.state();
        self.generations.node_written(spiffe_id);
        state
            .nodes
            .remove(spiffe_id.as_str())
            .ok_or_else(|| DataStoreError::NotFound { kind: ResourceKind::AttestedNode, id: spiffe_id.to_string() })
    }

    fn node_generation(&self, spiffe_id: &SpiffeId) -> u64 {
        self.generations.node(spiffe_id)
    }

    fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        validate_token(token)?;
        let mut state = self.state();
        if state.tokens.contains_key(&token.token) {
            return Err(DataStoreError::AlreadyExists {
                kind: ResourceKind::JoinToken,
                id: token.token.clone(),
                reason: "the token exists".to_owned(),
            });
        }
        state.tokens.insert(token.token.clone(), token.clone());
        Ok(())
    }

    fn consume_join_token(&self, token: &str, now: u64) -> Result<JoinToken> {
        let consumed = self.state().tokens.remove(token).ok_or(DataStoreError::TokenNotFound)?;
        if consumed.is_expired(now) {
            return Err(DataStoreError::TokenExpired { expires_at: consumed.expires_at });
        }
        Ok(consumed)
    }

    fn prune_join_tokens(&self, now: u64) -> Result<u64> {
        let mut state = self.state();
        let before = state.tokens.len();
        state.tokens.retain(|_, t| !t.is_expired(now));
        Ok(u64::try_from(before - state.tokens.len()).unwrap_or(u64::MAX))
    }

    fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<Bundle>> {
        Ok(self.state().bundles.get(trust_domain.name()).cloned())
    }

    fn list_bundles(&self) -> Result<Vec<Bundle>> {
        Ok(self.state().bundles.values().cloned().collect())
    }

    fn set_bundle(&self, trust_domain: &TrustDomain, data: &[u8], expected_sequence: Option<u64>) -> Result<Bundle> {
        let mut state = self.state();
        self.generations.bundle_written();
        let current = state.bundles.get(trust_domain.name()).map_or(0, |b| b.sequence);
        if let Some(expected) = expected_sequence.filter(|&expected| expected != current) {
            return Err(DataStoreError::Conflict {
                kind: ResourceKind::Bundle,
                id: trust_domain.to_string(),
                expected: format!("sequence {expected}"),
                found: format!("sequence {current}"),
            });
        }
        let bundle = Bundle { trust_domain: trust_domain.clone(), data: data.to_vec(), sequence: current + 1 };
        state.bundles.insert(trust_domain.name().to_owned(), bundle.clone());
        Ok(bundle)
    }

    fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<Bundle> {
        let mut state = self.state();
        self.generations.bundle_written();
        state
            .bundles
            .remove(trust_domain.name())
            .ok_or_else(|| DataStoreError::NotFound { kind: ResourceKind::Bundle, id: trust_domain.to_string() })
    }

    fn bundle_generation(&self) -> u64 {
        self.generations.bundles()
    }

    fn get_ca_journal(&self) -> Result<Option<CaJournal>> {
        Ok(self.state().ca_journal.clone())
    }

    fn put_ca_journal(&self, data: &[u8], expected_version: u64) -> Result<CaJournal> {
        let mut state = self.state();
        let current = state.ca_journal.as_ref().map_or(0, |j| j.version);
        if current != expected_version {
            return Err(DataStoreError::Conflict {
                kind: ResourceKind::CaJournal,
                id: "journal".to_owned(),
                expected: format!("version {expected_version}"),
                found: format!("version {current}"),
            });
        }
        let journal = CaJournal { data: data.to_vec(), version: current + 1 };
        state.ca_journal = Some(journal.clone());
        Ok(journal)
    }

    fn insert_jti_if_absent(&self, issuer: &str, jti: &str, expires_at: u64) -> Result<bool> {
        let mut state = self.state();
        let key = (issuer.to_owned(), jti.to_owned());
        if state.jtis.contains_key(&key) {
            return Ok(false);
        }
        state.jtis.insert(key, expires_at);
        Ok(true)
    }

    fn prune_jtis(&self, now: u64) -> Result<u64> {
        let mut state = self.state();
        let before = state.jtis.len();
        state.jtis.retain(|_, expires_at| *expires_at > now);
        Ok(u64::try_from(before - state.jtis.len()).unwrap_or(u64::MAX))
    }

    fn get_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<Option<FederationRelationshipRecord>> {
        Ok(self.state().federation.get(trust_domain.name()).cloned())
    }

    fn list_federation_relationships(&self) -> Result<Vec<FederationRelationshipRecord>> {
        Ok(self.state().federation.values().cloned().collect())
    }

    fn put_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
        data: &[u8],
        expected_revision: Option<u64>,
    ) -> Result<FederationRelationshipRecord> {
        let mut state = self.state();
        let current = state.federation.get(trust_domain.name()).map_or(0, |r| r.revision);
        if let Some(expected) = expected_revision.filter(|&expected| expected != current) {
            return Err(DataStoreError::Conflict {
                kind: ResourceKind::FederationRelationship,
                id: trust_domain.to_string(),
                expected: format!("revision {expected}"),
                found: format!("revision {current}"),
            });
        }
        let record = FederationRelationshipRecord {
            trust_domain: trust_domain.clone(),
            data: data.to_vec(),
            revision: current + 1,
        };
        state.federation.insert(trust_domain.name().to_owned(), record.clone());
        Ok(record)
    }

    fn delete_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<FederationRelationshipRecord> {
        self.state().federation.remove(trust_domain.name()).ok_or_else(|| DataStoreError::NotFound {
            kind: ResourceKind::FederationRelationship,
            id: trust_domain.to_string(),
        })
    }
}
