//! The server's datastore: registration entries, attested nodes, join tokens, bundles, the
//! CA journal and the JWT replay cache, behind one trait.
//!
//! # For a newcomer
//!
//! Everything the server persists goes through [`DataStore`]; nothing else in the server
//! knows how or where it is stored (invariant: `sled` types never leave this module). Two
//! implementations exist:
//!
//! - [`SledDataStore`], the default: an embedded [sled] database under
//!   `<data_dir>/datastore`. One sled *tree* per record type plus index trees, see
//!   `sled_store.rs` for the layout.
//!   It keeps every entry decoded once in memory (`entry_index.rs`), loaded when it opens
//!   and moved forward from the change log once each entry write is durable and before it is
//!   acknowledged (readers see durable writes only); entry
//!   reads come from there, and [`DataStore::get_entry_shared`] and
//!   [`DataStore::list_entries_by_parents_shared`] hand out its `Arc`s.
//! - [`MemoryDataStore`], a fake for tests: mutex-guarded maps with the same semantics. The
//!   conformance suite (`server/tests/datastore_conformance.rs`) runs the same tests against
//!   both, so the fake cannot drift from the real thing.
//!
//! The trait is grouped by resource (entries, the entry change feed, attested nodes, join
//! tokens, bundles, CA journal, JWT IDs). Every write that needs to read first (duplicate
//! checks, compare-and-set, token consumption) is one transaction inside the store; callers
//! never hold a transaction open across calls. Read-modify-write by a caller uses the
//! compare-and-set parameters (`expected_revision`, `expected_serial`, `expected_sequence`,
//! `expected_version`) and gets [`DataStoreError::Conflict`] when it lost a race.
//!
//! ## Durability
//!
//! An acknowledged write is durable: every write method returns `Ok` only after the change
//! is on disk (sled: `flush`, an fsync). A `kill -9` right after it loses nothing.
//! Concurrent writes share their flush (group commit, `group_commit.rs`): each writer
//! completes its transaction and then waits until a flush that *started after* its write
//! completed has succeeded; one flush covers every writer that completed before it began, so
//! N concurrent writes cost far fewer than N flushes, and a failed flush fails every write it
//! was to cover. The trait does not change: each call still returns once its own write is
//! durable.
//!
//! ## Revisions and the change feed
//!
//! Every entry create, update and delete bumps one global, gap-free revision and appends
//! `(revision, entry id, upsert|delete)` to a change log in the same transaction. An entry
//! carries the revision of its last write. The push sync of entries to agents follows this
//! protocol, which works the same against every implementation:
//!
//! 1. **Snapshot**: read [`DataStore::current_revision`] *first*, then list the entries.
//!    The listing may already include later changes; replaying them is harmless.
//! 2. **Follow**: wait on [`DataStore::subscribe`] ("the revision advanced"), then call
//!    [`DataStore::changes_since`] with the last revision processed, fetch upserted entries
//!    with [`DataStore::get_entry`] (a missing one was deleted by a later change) and page
//!    through with `limit`.
//! 3. **Fall behind**: the log keeps the last [`DataStoreOptions::change_log_retention`]
//!    changes. A reader further behind gets [`DataStoreError::ResyncRequired`] and starts
//!    again at 1.
//!
//! The subscription is a [`tokio::sync::watch`] channel of the latest committed revision.
//! It only ever moves forward and is updated after the write is durable, so a notified
//! reader always finds the change in the log. A watch channel coalesces: a slow reader sees
//! only the latest revision, which is all it needs since it reads the log from where it was.
//!
//! # Sync trait, called through `spawn_blocking`
//!
//! The trait is synchronous and object-safe, used as `Arc<dyn DataStore>`. sled is a
//! blocking library whose writes end in an fsync; an `async fn` trait would need boxed
//! futures for `dyn` and would only hide the same blocking call. A synchronous trait keeps
//! both implementations and their tests free of any runtime, and async callers use
//! [`blocking`] (a `spawn_blocking` wrapper) so no fsync ever stalls a tokio worker.
//!
//! # A PostgreSQL implementation (several server replicas on one database)
//!
//! It implements the same trait; callers do not change:
//!
//! - **Calls**: the synchronous `postgres` client (or `tokio-postgres` driven with
//!   `Handle::block_on` from the blocking thread) inside the `spawn_blocking` of [`blocking`].
//! - **Transactions**: each trait method is one SQL transaction. Uniqueness (entry ID; SPIFFE
//!   ID + parent + selectors) is a unique index, so a duplicate is a constraint violation
//!   mapped to [`DataStoreError::AlreadyExists`]. `consume_join_token` is
//!   `DELETE FROM join_tokens WHERE token = $1 RETURNING expires_at`: of two replicas racing,
//!   exactly one deletes the row.
//! - **Revisions**: a single-row counter updated with `UPDATE ... SET revision = revision + 1
//!   RETURNING revision` in the entry write's transaction. The row lock serialises entry
//!   writers until commit, so revisions become visible in order and the log stays gap-free.
//!   (A plain `SEQUENCE` would not: revision 7 can commit before 6, and a reader at 7 would
//!   skip 6 for ever.)
//! - **Change events every replica observes**: the entry write runs `NOTIFY entry_changes,
//!   '<revision>'` in its transaction (delivered on commit). Each replica runs one listener
//!   connection (`LISTEN entry_changes`) that feeds the same watch channel that
//!   [`DataStore::subscribe`] returns, and also polls `current_revision` every few seconds
//!   to cover notifications lost while the listener reconnects. Callers depend only on
//!   "the revision advanced" plus `changes_since`, which both work across replicas.
//! - **Compaction**: `DELETE FROM entry_changes WHERE revision <= $floor`, by any replica.
//!
//! [sled]: https://docs.rs/sled/0.34

mod codec;
mod entry_index;
mod error;
mod group_commit;
mod memory;
mod sled_store;
mod types;

use std::sync::Arc;

use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::watch;

pub use error::{BackendError, DataStoreError, ResourceKind};
pub(crate) use group_commit::error_chain;
pub use memory::MemoryDataStore;
pub use sled_store::SledDataStore;
pub(crate) use types::Generations;
pub use types::{
    AttestedNode, Bundle, CaJournal, ChangeKind, DEFAULT_CHANGE_LOG_RETENTION, DataStoreOptions, EntryChange,
    EntryFilter, FederationRelationshipRecord, JoinToken, MAX_KEY_LEN, NodeFilter, NodeSerials, Page, PageRequest,
    RegistrationEntry, SelectorFilter, SelectorMatch, SharedEntry,
};

/// The result of every datastore call.
pub type Result<T, E = DataStoreError> = std::result::Result<T, E>;

/// Everything the server persists. See the [module documentation](self) for the design.
///
/// Every method is one atomic operation; every write method returns only once the write is
/// durable. Times are unix seconds supplied by the caller.
pub trait DataStore: Send + Sync + std::fmt::Debug {
    // ---- Registration entries -------------------------------------------------------------

    /// Stores a new entry and returns it with its revision.
    ///
    /// Refuses ([`DataStoreError::AlreadyExists`]) an ID already in use and an entry with
    /// the same SPIFFE ID, parent ID and selectors as another; refuses
    /// ([`DataStoreError::InvalidArgument`]) an empty ID or selector list and zero TTLs.
    fn create_entry(&self, entry: &RegistrationEntry) -> Result<RegistrationEntry>;

    /// The entry with this ID, if any.
    fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>>;

    /// Replaces the entry with `entry.id` as a whole and returns it with its new revision.
    ///
    /// With `expected_revision`, fails with [`DataStoreError::Conflict`] unless the stored
    /// entry is still at that revision (read-modify-write). [`DataStoreError::NotFound`] for
    /// an unknown ID; the same duplicate check as [`Self::create_entry`].
    fn update_entry(&self, entry: &RegistrationEntry, expected_revision: Option<u64>) -> Result<RegistrationEntry>;

    /// Deletes the entry and returns it as it was. [`DataStoreError::NotFound`] for an
    /// unknown ID.
    fn delete_entry(&self, id: &str) -> Result<RegistrationEntry>;

    /// The entries passing `filter`, ordered by ID, one page at a time.
    fn list_entries(&self, filter: &EntryFilter, page: &PageRequest) -> Result<Page<RegistrationEntry>>;

    /// How many entries there are.
    fn count_entries(&self) -> Result<u64>;

    /// The entries whose parent is one of `parent_ids`, ordered by ID (authorization: the
    /// children of an agent, of its node aliases, and of their descendants).
    fn list_entries_by_parents(&self, parent_ids: &[SpiffeId]) -> Result<Vec<RegistrationEntry>>;

    /// [`Self::get_entry`], shared: a store that keeps its entries in memory hands out the
    /// one copy it holds (the sled store, see `entry_index.rs`) instead of a copy per caller.
    fn get_entry_shared(&self, id: &str) -> Result<Option<Arc<SharedEntry>>> {
        Ok(self.get_entry(id)?.map(|entry| Arc::new(SharedEntry::new(entry))))
    }

    /// [`Self::list_entries_by_parents`], shared as [`Self::get_entry_shared`], for borrowed
    /// parent IDs: a caller walking the parent graph level by level passes the SPIFFE IDs of the
    /// entries it got from the level before without a copy of each (issue 7, S6).
    fn list_entries_by_parents_shared(&self, parent_ids: &[&SpiffeId]) -> Result<Vec<Arc<SharedEntry>>>;

    /// The entries that have `selector` among theirs, ordered by ID, through an index
    /// (node-alias entries are found from a node's selectors this way).
    fn list_entries_by_selector(&self, selector: &Selector) -> Result<Vec<RegistrationEntry>>;

    /// Deletes the entries expired at `now` (each deletion is a change like any other) and
    /// returns how many.
    fn prune_expired_entries(&self, now: u64) -> Result<u64>;

    // ---- Entry change feed ----------------------------------------------------------------

    /// The revision of the latest entry write; 0 for a store never written.
    fn current_revision(&self) -> Result<u64>;

    /// The entry changes after `revision`, oldest first, at most `limit`.
    ///
    /// [`DataStoreError::ResyncRequired`] when the log no longer holds the change right
    /// after `revision` (compacted) or `revision` is ahead of the store.
    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<EntryChange>>;

    /// A channel holding the latest committed revision, updated after every durable entry
    /// write (by this replica or, for a shared database, any replica).
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Drops every change except the `retain` most recent; returns how many were dropped.
    /// Stores also compact on their own past [`DataStoreOptions::change_log_retention`].
    fn compact_changes(&self, retain: u64) -> Result<u64>;

    // ---- Attested nodes ---------------------------------------------------------------------

    /// Records a newly attested node. [`DataStoreError::AlreadyExists`] if its SPIFFE ID is
    /// already recorded (evict it first).
    fn create_attested_node(&self, node: &AttestedNode) -> Result<()>;

    /// The node with this SPIFFE ID, if any.
    fn get_attested_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>>;

    /// The nodes passing `filter`, ordered by SPIFFE ID, one page at a time.
    fn list_attested_nodes(&self, filter: &NodeFilter, page: &PageRequest) -> Result<Page<AttestedNode>>;

    /// Compare-and-set of the serials: writes `serials` only if the node's current serial is
    /// still `expected_serial` ([`DataStoreError::Conflict`] otherwise;
    /// [`DataStoreError::NodeBanned`] for a banned node). Renewal sets `new_serial`; the
    /// handover on first use of the new SVID makes it `serial`.
    fn update_attested_node_serials(
        &self,
        spiffe_id: &SpiffeId,
        expected_serial: &str,
        serials: &NodeSerials,
    ) -> Result<AttestedNode>;

    /// Replaces the node's selectors (re-attestation).
    fn set_attested_node_selectors(&self, spiffe_id: &SpiffeId, selectors: &SelectorSet) -> Result<AttestedNode>;

    /// Bans the node: it stays recorded with no valid serial, so it cannot call or attest.
    fn ban_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode>;

    /// Evicts the node: deletes it, so the agent must attest again. Returns it as it was.
    fn delete_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode>;

    /// A counter that moves forward after every write of the attested node `spiffe_id`
    /// (create, serial update, selector update, ban, delete; attempted or done) and never on a
    /// read. Writes of other nodes may move it too (the counters are shared between the IDs
    /// hashing alike), never the reverse. A caller that keeps a copy of a node reads this
    /// *before* reading the node and reuses the copy only while the counter has not moved, so
    /// a ban or eviction is seen by the very next check, while the attestation of other agents
    /// leaves the copy in place: the cost of holding N agents' node records does not grow
    /// with the rate at which other nodes are written (issue 7). A store shared between server
    /// replicas must move it for the other replicas' writes as well.
    fn node_generation(&self, spiffe_id: &SpiffeId) -> u64;

    // ---- Join tokens -------------------------------------------------------------------------

    /// Stores a new join token. [`DataStoreError::AlreadyExists`] if it exists.
    fn create_join_token(&self, token: &JoinToken) -> Result<()>;

    /// Looks up, deletes and checks the expiry of a token in one transaction: of any number
    /// of concurrent consumers of one token, exactly one gets it.
    /// [`DataStoreError::TokenNotFound`] for an unknown or used token,
    /// [`DataStoreError::TokenExpired`] for an expired one (which is deleted all the same).
    fn consume_join_token(&self, token: &str, now: u64) -> Result<JoinToken>;

    /// Deletes the tokens expired at `now`; returns how many.
    fn prune_join_tokens(&self, now: u64) -> Result<u64>;

    // ---- Bundles ------------------------------------------------------------------------------

    /// The bundle of this trust domain, if any.
    fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<Bundle>>;

    /// Every bundle, own and federated, ordered by trust domain.
    fn list_bundles(&self) -> Result<Vec<Bundle>>;

    /// Stores the bundle of `trust_domain`, bumping its sequence (1 for a new one), and
    /// returns it. `expected_sequence`: `None` writes unconditionally; `Some(0)` only if no
    /// bundle exists; `Some(n)` only if the stored sequence is `n`
    /// ([`DataStoreError::Conflict`] otherwise).
    fn set_bundle(&self, trust_domain: &TrustDomain, data: &[u8], expected_sequence: Option<u64>) -> Result<Bundle>;

    /// Deletes a bundle and returns it as it was.
    fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<Bundle>;

    /// A counter that moves forward after every bundle write ([`Self::set_bundle`],
    /// [`Self::delete_bundle`]; attempted or done) and never on a read: a caller that keeps
    /// bundles it read reads this first and reads them again only once it moved. The same
    /// rule for shared stores as [`Self::node_generation`].
    fn bundle_generation(&self) -> u64;

    // ---- CA journal ---------------------------------------------------------------------------

    /// The CA rotation journal, if one was written.
    fn get_ca_journal(&self) -> Result<Option<CaJournal>>;

    /// Writes the journal if its stored version is still `expected_version` (0: none
    /// stored yet) and returns it with the next version; [`DataStoreError::Conflict`]
    /// otherwise.
    fn put_ca_journal(&self, data: &[u8], expected_version: u64) -> Result<CaJournal>;

    // ---- JWT ID replay cache -----------------------------------------------------------------

    /// Records `(issuer, jti)` until `expires_at`; `false` if it was already recorded (a
    /// replay).
    fn insert_jti_if_absent(&self, issuer: &str, jti: &str, expires_at: u64) -> Result<bool>;

    /// Forgets the JWT IDs expired at `now`; returns how many.
    fn prune_jtis(&self, now: u64) -> Result<u64>;

    // ---- Federation relationships (issue 6) ----------------------------------------------------

    /// The relationship with this foreign trust domain, if any.
    fn get_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<Option<FederationRelationshipRecord>>;

    /// Every relationship, ordered by trust domain.
    fn list_federation_relationships(&self) -> Result<Vec<FederationRelationshipRecord>>;

    /// Stores the relationship with `trust_domain`, bumping its revision (1 for a new one).
    /// `expected_revision` as in [`Self::set_bundle`]: `None` unconditionally, `Some(0)` only
    /// if none exists, `Some(n)` only at revision `n` ([`DataStoreError::Conflict`] otherwise).
    fn put_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
        data: &[u8],
        expected_revision: Option<u64>,
    ) -> Result<FederationRelationshipRecord>;

    /// Deletes a relationship and returns it as it was ([`DataStoreError::NotFound`] if none).
    fn delete_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<FederationRelationshipRecord>;
}

/// Runs a datastore call on tokio's blocking pool, so an fsync never stalls a runtime
/// worker. A panic inside `call` becomes [`DataStoreError::Backend`].
pub async fn blocking<T, F>(store: &Arc<dyn DataStore>, call: F) -> Result<T>
where
    F: FnOnce(&dyn DataStore) -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || call(store.as_ref()))
        .await
        .map_err(|e| DataStoreError::backend("blocking task", e))?
}

/// Feeds a subscription: moves the watched revision forward to `revision`, never back
/// (concurrent writers may finish out of order).
fn publish_revision(sender: &watch::Sender<u64>, revision: u64) {
    sender.send_if_modified(|current| {
        if revision > *current {
            *current = revision;
            true
        } else {
            false
        }
    });
}
