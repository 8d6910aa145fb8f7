//! The default [`DataStore`]: an embedded sled database.
//!
//! # Layout
//!
//! One sled tree per record type, plus index trees whose keys are `<indexed value>\0<key>`
//! with an empty value (`\0` cannot occur in SPIFFE IDs, selectors or entry IDs, so a
//! prefix scan of `<value>\0` finds exactly the records with that value):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `schema_version`, `entry_revision`, `change_floor` | version byte; big-endian `u64`s |
//! | `entries` | entry ID | entry record |
//! | `entry_unique` | SPIFFE ID `\0` parent ID (`\0` selector)* | entry ID |
//! | `entry_changes` | big-endian revision | change record |
//! | `nodes` | node SPIFFE ID | node record |
//! | `node_by_selector` | selector `\0` node SPIFFE ID | - |
//! | `join_tokens` | token | token record |
//! | `bundles` | trust domain name | bundle record |
//! | `ca_journal` | `journal` | journal record |
//! | `jtis` | big-endian issuer length, issuer, JWT ID | expiry record |
//! | `federation` | foreign trust domain name | relationship record (the bundle record layout: data + revision) |
//!
//! `entry_unique` doubles as the index by SPIFFE ID: its keys start with `<SPIFFE ID>\0`, so a
//! prefix scan finds every entry with that SPIFFE ID (the values are the entry IDs).
//!
//! There is no index by parent or by selector on disk: the in-memory entry index
//! (`entry_index.rs`) answers reads by parent and by selector. For a record that does not
//! decode, the index keeps the parent and the selectors its `entry_unique` key names, so a
//! read by parent or by selector that could meet the record still reads it from the database
//! and reports it (see `entry_index.rs`, "Corrupt records").
//!
//! # Layout versions
//!
//! Version 1 also kept an `entry_by_spiffe_id` tree (SPIFFE ID `\0` entry ID), which repeated
//! what `entry_unique` holds at the cost of one more key written per entry write (issue 7,
//! S8). A version-1 store is migrated when it opens: the tree is dropped, then the version is
//! set to 2 and flushed (a crash in between leaves version 1, and the next open drops the tree
//! again). A build that knows only version 1 refuses a version-2 store, so an older build
//! never reads a store whose SPIFFE ID index it would find empty.
//!
//! Version 2 also kept an `entry_by_parent` tree (parent ID `\0` entry ID), one more key per
//! entry write that only the reads met while a corrupt record was stored needed (S8). A
//! version-2 store is migrated when it opens the same way: the tree is dropped, then the
//! version is set to 3 and flushed (a crash in between leaves version 2 and the next open
//! drops the tree again). A version-1 store goes through version 2 (each step flushed). A
//! build that knows versions up to 2 refuses a version-3 store (an unknown version, reported
//! with the store's path), so an older build never reads children from a tree that is no
//! longer written.
//!
//! Version 3 also kept an `entry_by_selector` tree (selector `\0` entry ID): one more key per
//! selector of every entry write, for reads by selector (node-alias lookups, listings filtered
//! by selector) that the entry index answers since (S8). A version-3 store is migrated when it
//! opens the same way: the tree is dropped, then the version is set to 4 and flushed (a crash
//! in between leaves version 3 and the next open drops the tree again). Older versions go
//! through version 3, each step flushed. A build that knows versions up to 3 refuses a
//! version-4 store, naming its path, so an older build never reads entries by selector from a
//! tree that is no longer written.
//!
//! Records are encoded by `codec` (version byte + postcard). A record and its index keys
//! are always written in one multi-tree transaction, so indexes never disagree with a
//! committed record. sled 0.34 runs transactions under a global lock, so they are
//! serialisable; reads outside a transaction see each transaction entirely or not at all
//! per key, and listings tolerate an index key whose record was deleted meanwhile.
//!
//! Every write is durable before it returns, then subscribers are notified: sled's flush
//! writes its log with `sync_file_range`, which starts and waits for the pages' write-back but
//! neither flushes the device's write cache nor commits the file's metadata, so each flush is
//! followed by an `fdatasync` of sled's log file (`<path>/db`), which does both, after a sync
//! of the files sled wrote to `blobs/` for items over 128 KiB, which it never syncs. Without it an
//! acknowledged write survives the process, not a power loss or a kernel crash.
//! Concurrent transactional writes share one transaction (`batch.rs`) and every write shares
//! its flush with the concurrent ones (group commit, `group_commit.rs`): a writer's call
//! returns once a flush that started after its write completed has succeeded.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tokio::sync::watch;

use self::batch::{Step, Txn, Written};
use super::codec::{
    BundleRecordV1, CaJournalRecordV1, ChangeRecordV1, ChangeRecordV1Ref, EntryRecordV1, EntryRecordV1Ref, JtiRecordV1,
    NodeRecordV1, TokenRecordV1, decode, decode_u64, encode, u64_bytes,
};
use super::entry_index::EntryIndex;
use super::error::{DataStoreError, ResourceKind};
use super::group_commit::{GroupCommit, Write};
use super::types::{
    AttestedNode, Bundle, CaJournal, ChangeKind, DataStoreOptions, EntryChange, EntryFilter,
    FederationRelationshipRecord, JoinToken, NodeFilter, NodeSerials, Page, PageRequest, RegistrationEntry,
    SelectorIndexPlan, SharedEntry, check_continuity, compaction_target, duplicate_entry, entry_id_taken,
    entry_revision_conflict, paginate, plan_selector_index, validate_entry, validate_node, validate_serials,
    validate_token,
};
use super::{DataStore, Generations, Result, publish_revision};

mod batch;
mod hydrate;

/// The layout version this build reads and writes (the `schema_version` key of `meta`).
const SCHEMA_VERSION: u8 = 4;

/// The older layout versions this build migrates at open (see the module docs).
const SCHEMA_VERSION_1: u8 = 1;
const SCHEMA_VERSION_2: u8 = 2;
const SCHEMA_VERSION_3: u8 = 3;

const META: &str = "meta";
const ENTRIES: &str = "entries";
const ENTRY_UNIQUE: &str = "entry_unique";
/// Version 1's index by SPIFFE ID, dropped when such a store opens.
const V1_ENTRY_BY_SPIFFE_ID: &str = "entry_by_spiffe_id";
/// Version 2's (and 1's) index by parent ID, dropped when such a store opens.
const V2_ENTRY_BY_PARENT: &str = "entry_by_parent";
/// Version 3's (and older) index by selector, dropped when such a store opens.
const V3_ENTRY_BY_SELECTOR: &str = "entry_by_selector";
const ENTRY_CHANGES: &str = "entry_changes";
const NODES: &str = "nodes";
const NODE_BY_SELECTOR: &str = "node_by_selector";
const JOIN_TOKENS: &str = "join_tokens";
const BUNDLES: &str = "bundles";
const CA_JOURNAL: &str = "ca_journal";
const JTIS: &str = "jtis";
const FEDERATION: &str = "federation";

const KEY_SCHEMA_VERSION: &[u8] = b"schema_version";
const KEY_REVISION: &[u8] = b"entry_revision";
const KEY_CHANGE_FLOOR: &[u8] = b"change_floor";
const KEY_JOURNAL: &[u8] = b"journal";

/// Changes read per page when the entry index catches up.
const CATCH_UP_PAGE: usize = 1_000;

/// What a transaction closure returns: a value, or an abort carrying our error.
type TxResult<T> = std::result::Result<T, ConflictableTransactionError<DataStoreError>>;

/// Aborts a transaction with `err`.
fn abort(err: DataStoreError) -> ConflictableTransactionError<DataStoreError> {
    ConflictableTransactionError::Abort(err)
}

/// Maps the outcome of a transaction to our error.
fn tx_error(operation: &'static str) -> impl FnOnce(TransactionError<DataStoreError>) -> DataStoreError {
    move |err| match err {
        TransactionError::Abort(err) => err,
        TransactionError::Storage(err) => DataStoreError::backend(operation, err),
    }
}

/// Maps a sled error outside transactions.
fn storage(operation: &'static str) -> impl FnOnce(sled::Error) -> DataStoreError {
    move |err| DataStoreError::backend(operation, err)
}

/// `<value>\0`: the prefix of every index key for `value`.
fn index_prefix(value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(value.len() + 1);
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key
}

/// `<selector>\0<record key>` (the selector as `type:value`, without a copy of its text
/// first).
fn selector_key(selector: &Selector, record_key: &str) -> Vec<u8> {
    let (kind, value) = (selector.kind(), selector.value());
    let mut key = Vec::with_capacity(kind.len() + 1 + value.len() + 1 + record_key.len());
    key.extend_from_slice(kind.as_bytes());
    key.push(b':');
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key.extend_from_slice(record_key.as_bytes());
    key
}

/// The JWT ID key: big-endian issuer length, issuer, JWT ID (unambiguous for any strings).
fn jti_key(issuer: &str, jti: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(4 + issuer.len() + jti.len());
    key.extend_from_slice(&u32::try_from(issuer.len()).unwrap_or(u32::MAX).to_be_bytes());
    key.extend_from_slice(issuer.as_bytes());
    key.extend_from_slice(jti.as_bytes());
    key
}

fn utf8_key(tree: &'static str, key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|_| DataStoreError::corrupt(tree, key, "key is not UTF-8"))
}

fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<RegistrationEntry> {
    let record: EntryRecordV1 = decode(ENTRIES, key, bytes)?;
    Ok(record.into_entry(utf8_key(ENTRIES, key)?))
}

fn decode_node(key: &[u8], bytes: &[u8]) -> Result<AttestedNode> {
    let record: NodeRecordV1 = decode(NODES, key, bytes)?;
    let spiffe_id = SpiffeId::parse(&utf8_key(NODES, key)?)
        .map_err(|e| DataStoreError::corrupt(NODES, key, format!("key is not a SPIFFE ID: {e}")))?;
    Ok(record.into_node(spiffe_id))
}

/// A federation relationship record: stored in the bundle record layout (data + a counter).
fn decode_relationship(key: &[u8], bytes: &[u8]) -> Result<FederationRelationshipRecord> {
    let bundle = decode_bundle_in(FEDERATION, key, bytes)?;
    Ok(FederationRelationshipRecord { trust_domain: bundle.trust_domain, data: bundle.data, revision: bundle.sequence })
}

fn decode_bundle(key: &[u8], bytes: &[u8]) -> Result<Bundle> {
    decode_bundle_in(BUNDLES, key, bytes)
}

fn decode_bundle_in(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<Bundle> {
    let record: BundleRecordV1 = decode(tree, key, bytes)?;
    let trust_domain = TrustDomain::new(&utf8_key(tree, key)?)
        .map_err(|e| DataStoreError::corrupt(tree, key, format!("key is not a trust domain: {e}")))?;
    Ok(record.into_bundle(trust_domain))
}

/// The trees of the database. Private: sled types never leave this module.
#[derive(Clone)]
struct Trees {
    meta: sled::Tree,
    entries: sled::Tree,
    entry_unique: sled::Tree,
    entry_changes: sled::Tree,
    nodes: sled::Tree,
    node_by_selector: sled::Tree,
    join_tokens: sled::Tree,
    bundles: sled::Tree,
    ca_journal: sled::Tree,
    jtis: sled::Tree,
    federation: sled::Tree,
}

/// The trees of an entry write, inside a transaction.
struct EntryTx<'a> {
    entries: &'a TransactionalTree,
    unique: &'a TransactionalTree,
    changes: &'a TransactionalTree,
    meta: &'a TransactionalTree,
    /// Where the transaction notes the entry changes it writes (see [`Written`]).
    written: &'a std::cell::RefCell<Vec<Written>>,
}

impl EntryTx<'_> {
    fn get(&self, id: &str) -> TxResult<Option<RegistrationEntry>> {
        match self.entries.get(id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_entry(id.as_bytes(), &bytes).map(Some).map_err(abort),
        }
    }

    /// The ID of the entry holding this unique key, if any.
    fn unique_owner(&self, unique: &str) -> TxResult<Option<String>> {
        match self.unique.get(unique.as_bytes())? {
            None => Ok(None),
            Some(id) => utf8_key(ENTRY_UNIQUE, &id).map(Some).map_err(abort),
        }
    }

    /// Bumps the global revision and logs the change under it.
    fn log_change(&self, entry_id: &str, kind: ChangeKind) -> TxResult<u64> {
        let revision = match self.meta.get(KEY_REVISION)? {
            None => 0,
            Some(bytes) => decode_u64(META, KEY_REVISION, &bytes).map_err(abort)?,
        } + 1;
        self.meta.insert(KEY_REVISION, &u64_bytes(revision))?;
        let record = encode(&ChangeRecordV1Ref::new(entry_id, kind)).map_err(abort)?;
        self.changes.insert(&u64_bytes(revision), record)?;
        Ok(revision)
    }

    /// Writes the entry and its index keys; `unique` is its [`RegistrationEntry::unique_key`].
    /// The entry is kept as written, for the entry index.
    fn put(&self, entry: RegistrationEntry, unique: &str) -> TxResult<()> {
        let record = encode(&EntryRecordV1Ref::from_entry(&entry)).map_err(abort)?;
        self.entries.insert(entry.id.as_bytes(), record)?;
        self.unique.insert(unique.as_bytes(), entry.id.as_bytes())?;
        self.written.borrow_mut().push(Written::Put(entry));
        Ok(())
    }

    /// Removes the entry's index keys (not the entry itself).
    fn remove_indexes(&self, entry: &RegistrationEntry) -> TxResult<()> {
        self.unique.remove(entry.unique_key().as_bytes())?;
        Ok(())
    }

    /// Deletes the entry if it exists, logging the change. Returns it and the revision.
    fn delete(&self, id: &str) -> TxResult<Option<(RegistrationEntry, u64)>> {
        let Some(old) = self.get(id)? else {
            return Ok(None);
        };
        self.remove_indexes(&old)?;
        self.entries.remove(id.as_bytes())?;
        let revision = self.log_change(id, ChangeKind::Delete)?;
        self.written.borrow_mut().push(Written::Delete { revision, id: id.to_owned() });
        Ok(Some((old, revision)))
    }
}

/// The trees of a node write, inside a transaction.
struct NodeTx<'a> {
    nodes: &'a TransactionalTree,
    by_selector: &'a TransactionalTree,
}

impl NodeTx<'_> {
    fn get(&self, spiffe_id: &SpiffeId) -> TxResult<Option<AttestedNode>> {
        let key = spiffe_id.as_str().as_bytes();
        match self.nodes.get(key)? {
            None => Ok(None),
            Some(bytes) => decode_node(key, &bytes).map(Some).map_err(abort),
        }
    }

    /// The node, or the refusal `NotFound`.
    fn get_existing(&self, spiffe_id: &SpiffeId) -> Step<AttestedNode> {
        Ok(self
            .get(spiffe_id)?
            .ok_or_else(|| DataStoreError::NotFound { kind: ResourceKind::AttestedNode, id: spiffe_id.to_string() }))
    }

    fn put(&self, node: &AttestedNode) -> TxResult<()> {
        let record = encode(&NodeRecordV1::from_node(node)).map_err(abort)?;
        self.nodes.insert(node.spiffe_id.as_str().as_bytes(), record)?;
        for selector in &node.selectors {
            self.by_selector.insert(selector_key(selector, node.spiffe_id.as_str()), &[])?;
        }
        Ok(())
    }

    fn remove(&self, node: &AttestedNode) -> TxResult<()> {
        self.nodes.remove(node.spiffe_id.as_str().as_bytes())?;
        self.remove_indexes(node)
    }

    fn remove_indexes(&self, node: &AttestedNode) -> TxResult<()> {
        for selector in &node.selectors {
            self.by_selector.remove(selector_key(selector, node.spiffe_id.as_str()))?;
        }
        Ok(())
    }
}

/// The sled-backed [`DataStore`], the server's default.
pub struct SledDataStore {
    db: sled::Db,
    /// sled's log file (`<path>/db`), synced after every flush (see the [module docs](self)).
    log_file: std::fs::File,
    /// `fdatasync`s of the log file so far (tests check that every flush is followed by one).
    log_syncs: AtomicU64,
    /// The files of sled's `blobs` directory already synced (see [`Self::sync_blobs`]).
    synced_blobs: Mutex<std::collections::HashSet<std::ffi::OsString>>,
    trees: Trees,
    path: PathBuf,
    options: DataStoreOptions,
    revisions: watch::Sender<u64>,
    /// [`DataStore::node_generation`], [`DataStore::bundle_generation`].
    generations: Generations,
    /// Serialises compactions, so the floor only moves forward.
    compaction: Mutex<()>,
    /// The change-log floor as last written (read after every entry write to see whether a
    /// compaction is due, without a read of `meta`).
    change_floor: AtomicU64,
    /// Shares flushes between concurrent writes.
    commit: GroupCommit,
    /// Shares transactions between concurrent transactional writes.
    batcher: batch::Batcher,
    /// Every entry, decoded once, at the revision readers see (`entry_index.rs`): loaded at
    /// open, moved forward by each shared transaction's leader once the transaction is durable
    /// and before its writes are acknowledged.
    index: RwLock<EntryIndex>,
    /// Entry changes the index took as the writer's transactions wrote them (tests count
    /// work with it).
    handed_to_index: AtomicU64,
    /// Entries the index read back from the database after a change-log replay (tests count
    /// work with it).
    read_back_to_index: AtomicU64,
}

impl fmt::Debug for SledDataStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SledDataStore")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A tree of versioned blobs keyed by trust domain (bundles, federation relationships), for
/// [`SledDataStore::put_versioned_blob`].
#[derive(Clone, Copy)]
struct VersionedTree {
    /// Which tree of a transaction.
    tree: for<'t> fn(&Txn<'t>) -> &'t TransactionalTree,
    /// The tree's name, for decode errors.
    name: &'static str,
    kind: ResourceKind,
    /// What the record's counter is called in conflict messages ("sequence", "revision").
    counter: &'static str,
    /// The write, for storage errors.
    operation: &'static str,
}

/// Opens sled's log file (`<path>/db`, where sled 0.34 keeps every segment) to sync it, and
/// syncs the directory, so that the file's name is as durable as its contents. Fails, naming
/// the file, when sled keeps its log elsewhere (another sled version): every flush would
/// otherwise stop short of the disk without a word.
fn open_log_file(path: &Path) -> std::io::Result<std::fs::File> {
    let log = path.join("db");
    let file = std::fs::File::open(&log).map_err(|e| {
        std::io::Error::new(e.kind(), format!("opening sled's log file {} to sync it: {e}", log.display()))
    })?;
    std::fs::File::open(path)?.sync_all()?;
    Ok(file)
}

/// How long [`open_db`] waits for the database's file lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the sled database at `path`. A store closed in this process may hold its file lock
/// a moment longer (sled's I/O threads finish their last log writes after the handles are
/// dropped), so a lock that is busy is tried again for up to [`LOCK_WAIT`]; a database
/// another process holds open still fails, after that wait, with sled's lock error.
fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(err))
                if err.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl SledDataStore {
    /// Opens (creating it if needed, with mode 0700) the datastore directory at `path`.
    ///
    /// Fails if another process (or another store in this process) has it open, or if it
    /// was written with a layout this build does not know.
    pub fn open(path: impl AsRef<Path>, options: DataStoreOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source: crate::datastore::BackendError| DataStoreError::Open { path: path.clone(), source };
        create_private_dir(&path).map_err(|e| open_error(Box::new(e)))?;
        let db = open_db(&path).map_err(|e| open_error(Box::new(e)))?;
        let log_file = open_log_file(&path).map_err(|e| open_error(Box::new(e)))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| open_error(Box::new(e)));
        let trees = Trees {
            meta: tree(META)?,
            entries: tree(ENTRIES)?,
            entry_unique: tree(ENTRY_UNIQUE)?,
            entry_changes: tree(ENTRY_CHANGES)?,
            nodes: tree(NODES)?,
            node_by_selector: tree(NODE_BY_SELECTOR)?,
            join_tokens: tree(JOIN_TOKENS)?,
            bundles: tree(BUNDLES)?,
            ca_journal: tree(CA_JOURNAL)?,
            jtis: tree(JTIS)?,
            federation: tree(FEDERATION)?,
        };
        // Each migration step drops a tree, then records the next version and flushes: a crash
        // in between leaves the older version, and the next open takes the step again.
        let set_version = |version: u8| -> Result<()> {
            trees.meta.insert(KEY_SCHEMA_VERSION, &[version]).map_err(|e| open_error(Box::new(e)))?;
            db.flush().map_err(|e| open_error(Box::new(e)))?;
            log_file.sync_data().map_err(|e| open_error(Box::new(e)))
        };
        let drop_tree = |name: &str| db.drop_tree(name).map(drop).map_err(|e| open_error(Box::new(e)));
        loop {
            match trees.meta.get(KEY_SCHEMA_VERSION).map_err(|e| open_error(Box::new(e)))? {
                None => {
                    set_version(SCHEMA_VERSION)?;
                    break;
                }
                Some(found) if found.as_ref() == [SCHEMA_VERSION] => break,
                Some(found) if found.as_ref() == [SCHEMA_VERSION_1] => {
                    drop_tree(V1_ENTRY_BY_SPIFFE_ID)?;
                    set_version(SCHEMA_VERSION_2)?;
                }
                Some(found) if found.as_ref() == [SCHEMA_VERSION_2] => {
                    drop_tree(V2_ENTRY_BY_PARENT)?;
                    set_version(SCHEMA_VERSION_3)?;
                }
                Some(found) if found.as_ref() == [SCHEMA_VERSION_3] => {
                    drop_tree(V3_ENTRY_BY_SELECTOR)?;
                    set_version(SCHEMA_VERSION)?;
                }
                Some(found) => {
                    let Some(&found) = found.first().filter(|_| found.len() == 1) else {
                        return Err(DataStoreError::corrupt(META, KEY_SCHEMA_VERSION, "expected one byte"));
                    };
                    return Err(DataStoreError::UnsupportedSchema { path, found, supported: SCHEMA_VERSION });
                }
            }
        }
        let store = Self {
            db,
            log_file,
            log_syncs: AtomicU64::new(0),
            synced_blobs: Mutex::default(),
            trees,
            path,
            options,
            revisions: watch::Sender::new(0),
            generations: Generations::default(),
            compaction: Mutex::new(()),
            change_floor: AtomicU64::new(0),
            commit: GroupCommit::default(),
            batcher: batch::Batcher::default(),
            index: RwLock::new(EntryIndex::default()),
            handed_to_index: AtomicU64::new(0),
            read_back_to_index: AtomicU64::new(0),
        };
        let index = store.hydrate()?;
        store.revisions.send_replace(index.revision());
        *store.index_mut() = index;
        store.change_floor.store(store.read_meta_u64(KEY_CHANGE_FLOOR)?, Ordering::Relaxed);
        Ok(store)
    }

    fn index(&self) -> RwLockReadGuard<'_, EntryIndex> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn index_mut(&self) -> RwLockWriteGuard<'_, EntryIndex> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the entry index to the latest committed revision: replays the change log from
    /// the index's revision, reading each changed entry (or loads it again when the log was
    /// compacted past it). Called by the shared transaction's leader once the transaction is
    /// durable and before its writes are acknowledged (after [`Self::index_written`]), so
    /// writes reach the index one round at a time, in revision order, and readers never see a
    /// write that is not durable.
    #[cfg(test)]
    fn catch_up_index(&self) -> Result<()> {
        self.catch_up(&mut self.index_mut())
    }

    /// Moves the index forward with a durable round's entry changes, as its transactions wrote
    /// them (no read back from sled, no decode), then catches up from the change log with
    /// whatever the index still lacks. The changes are taken only from the index's next
    /// revision on, one after the other: when an earlier round's changes are missing (its
    /// flush failed) or the change log holds writes made outside the writer, the log replay
    /// takes them and these, reading each entry back as stored.
    fn index_written(&self, changes: Vec<Written>) -> Result<()> {
        let mut index = self.index_mut();
        for change in changes {
            if change.revision() != index.revision() + 1 {
                break;
            }
            self.handed_to_index.fetch_add(1, Ordering::Relaxed);
            match change {
                Written::Put(entry) => {
                    let (revision, id) = (entry.revision, entry.id.clone());
                    index.apply(revision, &id, Some(entry));
                }
                Written::Delete { revision, id } => index.apply(revision, &id, None),
            }
        }
        self.catch_up(&mut index)
    }

    /// See [`Self::catch_up_index`]; `index` is the index, locked.
    fn catch_up(&self, index: &mut EntryIndex) -> Result<()> {
        let current = self.read_meta_u64(KEY_REVISION)?;
        let mut found_corrupt = false;
        while index.revision() < current {
            let changes = self.logged_changes(index.revision(), current, CATCH_UP_PAGE)?;
            if changes.first().is_none_or(|first| first.revision != index.revision() + 1) {
                // Compacted past the index (a `compact_changes` that ran meanwhile).
                *index = self.hydrate()?;
                continue;
            }
            for change in changes {
                let entry = match change.kind {
                    ChangeKind::Delete => None,
                    ChangeKind::Upsert => {
                        self.read_back_to_index.fetch_add(1, Ordering::Relaxed);
                        match self.load_entry(&change.entry_id) {
                            Ok(entry) => entry,
                            Err(err @ DataStoreError::Corrupt { .. }) => {
                                tracing::error!(error = %err, "a stored registration entry does not decode; it is not authorized for any agent");
                                index.mark_corrupt(change.entry_id.into_bytes());
                                // Taken as far as it can be: the replay moves on past it.
                                index.pass(change.revision);
                                found_corrupt = true;
                                continue;
                            }
                            Err(err) => return Err(err),
                        }
                    }
                };
                index.apply(change.revision, &change.entry_id, entry);
            }
        }
        if found_corrupt {
            self.locate_corrupt(index)?;
        }
        Ok(())
    }

    /// Notes, for each corrupt record of `index` whose parents are not known, the parent and
    /// the selectors its `entry_unique` key names (one scan of `entry_unique`, made only while
    /// there is such a record). A unique key that does not parse names none: a record no key
    /// names stays listed under every parent and every selector.
    fn locate_corrupt(&self, index: &mut EntryIndex) -> Result<()> {
        let wanted = index.corrupt_without_parent();
        if wanted.is_empty() {
            return Ok(());
        }
        for item in self.trees.entry_unique.iter() {
            let (key, id) = item.map_err(storage("read"))?;
            if !wanted.contains(id.as_ref()) {
                continue;
            }
            let parent = key
                .split(|&b| b == 0)
                .nth(1)
                .and_then(|parent| std::str::from_utf8(parent).ok())
                .and_then(|parent| SpiffeId::parse(parent).ok());
            if let Some(parent) = parent {
                index.set_corrupt_parent(&id, parent);
            }
            // `<SPIFFE ID>\0<parent>(\0<selector>)*`: every selector must parse (an entry has
            // at least one), else none is noted.
            let selectors: Option<Vec<Selector>> = key
                .split(|&b| b == 0)
                .skip(2)
                .map(|selector| std::str::from_utf8(selector).ok().and_then(|s| Selector::parse(s).ok()))
                .collect();
            if let Some(selectors) = selectors.filter(|selectors| !selectors.is_empty()) {
                index.set_corrupt_selectors(&id, selectors);
            }
        }
        Ok(())
    }

    /// The logged changes after `after` up to `until` (inclusive), oldest first, at most
    /// `limit`.
    fn logged_changes(&self, after: u64, until: u64, limit: usize) -> Result<Vec<EntryChange>> {
        let mut changes = Vec::new();
        let range = u64_bytes(after.saturating_add(1))..=u64_bytes(until);
        if after >= until {
            return Ok(changes);
        }
        for item in self.trees.entry_changes.range(range).take(limit) {
            let (key, bytes) = item.map_err(storage("read"))?;
            let at = decode_u64(ENTRY_CHANGES, &key, &key)?;
            let record: ChangeRecordV1 = decode(ENTRY_CHANGES, &key, &bytes)?;
            changes.push(record.into_change(at));
        }
        Ok(changes)
    }

    /// The directory this store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_meta_u64(&self, key: &'static [u8]) -> Result<u64> {
        match self.trees.meta.get(key).map_err(storage("read"))? {
            None => Ok(0),
            Some(bytes) => decode_u64(META, key, &bytes),
        }
    }

    /// Writes `data` under `trust_domain` in a tree of [`BundleRecordV1`] values, bumping the
    /// record's counter in one transaction: when `expected` is given and differs from the
    /// stored counter (0 when absent), nothing is written and the conflict is reported. Flushed
    /// before it returns the new counter.
    fn put_versioned_blob(
        &self,
        target: VersionedTree,
        trust_domain: &TrustDomain,
        data: &[u8],
        expected: Option<u64>,
    ) -> Result<u64> {
        let (trust_domain, data) = (trust_domain.clone(), data.to_vec());
        self.write(target.operation, None, move |tx| {
            let tree = (target.tree)(tx);
            let key = trust_domain.name().as_bytes();
            let current = match tree.get(key)? {
                None => 0,
                Some(bytes) => decode::<BundleRecordV1>(target.name, key, &bytes).map_err(abort)?.sequence(),
            };
            if let Some(expected) = expected.filter(|&expected| expected != current) {
                return Ok(Err(DataStoreError::Conflict {
                    kind: target.kind,
                    id: trust_domain.to_string(),
                    expected: format!("{} {expected}", target.counter),
                    found: format!("{} {current}", target.counter),
                }));
            }
            let next = current + 1;
            tree.insert(key, encode(&BundleRecordV1::new(&data, next)).map_err(abort)?)?;
            Ok(Ok(next))
        })
    }

    /// Makes every write completed so far durable (one flush, not shared): sled's flush, then
    /// an `fdatasync` of its log file (see the [module docs](self)).
    fn flush(&self) -> Result<()> {
        self.db.flush().map_err(storage("flush"))?;
        self.sync_blobs().map_err(|e| DataStoreError::backend("sync sled's blob files", e))?;
        self.log_file.sync_data().map_err(|e| DataStoreError::backend("sync the log file", e))?;
        self.log_syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Returns once the completed `write` is durable: a flush that started after it completed
    /// succeeded, shared with the concurrent writes (see `group_commit`).
    fn make_durable(&self, write: Write<'_>) -> Result<()> {
        self.commit.wait_durable(write.completed(), || self.flush())
    }

    /// Reads from the database the records the entry index holds as corrupt that a read could
    /// meet (`suspects`), which reports the first that still does not decode; returns those
    /// that decode now and are `wanted` by the read.
    fn read_suspects(
        &self,
        suspects: &[Vec<u8>],
        wanted: impl Fn(&RegistrationEntry) -> bool,
    ) -> Result<Vec<RegistrationEntry>> {
        let mut found = Vec::new();
        for key in suspects {
            if let Some(bytes) = self.trees.entries.get(key).map_err(storage("read"))? {
                let entry = decode_entry(key, &bytes)?;
                if wanted(&entry) {
                    found.push(entry);
                }
            }
        }
        Ok(found)
    }

    /// Syncs the files sled wrote to its `blobs` directory since the last flush, and the
    /// directory when it holds new ones. sled writes a log item larger than a quarter of its
    /// segment (128 KiB: a large bundle, or a node page holding large values) to a file of its
    /// own there, and never syncs it. A blob is never rewritten (each is named by the log
    /// position it was written at), so each is synced once; one sled removed meanwhile is no
    /// longer needed. Without blobs this is one read of an empty directory per flush.
    fn sync_blobs(&self) -> std::io::Result<()> {
        let dir = self.path.join("blobs");
        let listing = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            listing => listing?,
        };
        let mut synced = self.synced_blobs.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = std::collections::HashSet::with_capacity(synced.len());
        let mut new = false;
        for blob in listing {
            let name = blob?.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(dir.join(&name)) {
                    Ok(file) => file.sync_data()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }

    /// How many flushes this store ran (tests count work with it).
    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    /// How many `fdatasync`s of sled's log file this store ran (tests check the flushes).
    #[cfg(test)]
    fn log_syncs(&self) -> u64 {
        self.log_syncs.load(Ordering::Relaxed)
    }

    /// How many shared transactions this store ran (tests count work with it).
    pub fn transactions(&self) -> u64 {
        self.batcher.transactions()
    }

    /// Runs a node write in the shared transaction, durable when it returns.
    fn node_write<T, F>(&self, operation: &'static str, spiffe_id: &SpiffeId, write: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&NodeTx<'_>) -> Step<T> + Send + Sync + 'static,
    {
        self.write(operation, Some(spiffe_id.clone()), move |tx| write(&tx.node()))
    }

    /// After a write of the node `spiffe_id` (committed or not).
    fn node_written(&self, spiffe_id: &SpiffeId) {
        self.generations.node_written(spiffe_id);
    }

    /// After a durable entry write at `revision`: tell subscribers, compact the change log if
    /// due.
    fn entry_written(&self, revision: u64) {
        publish_revision(&self.revisions, revision);
        let floor = self.change_floor.load(Ordering::Relaxed);
        if let Some(floor) = compaction_target(revision, floor, self.options.change_log_retention) {
            // The write itself is durable and must not be reported as failed; a compaction
            // that fails leaves a longer log and is retried after the next write.
            let _ = self.compact_to(floor);
        }
    }

    /// Drops every change up to and including `new_floor`. The floor is recorded first, so
    /// a crash in between leaves extra log records below the floor, removed next time.
    fn compact_to(&self, new_floor: u64) -> Result<u64> {
        let _serialised = self.compaction.lock().unwrap_or_else(PoisonError::into_inner);
        if new_floor <= self.read_meta_u64(KEY_CHANGE_FLOOR)? {
            return Ok(0);
        }
        self.trees.meta.insert(KEY_CHANGE_FLOOR, &u64_bytes(new_floor)).map_err(storage("compaction"))?;
        self.change_floor.fetch_max(new_floor, Ordering::Relaxed);
        let mut batch = sled::Batch::default();
        let mut dropped = 0;
        for key in self.trees.entry_changes.range(..=u64_bytes(new_floor)).keys() {
            batch.remove(key.map_err(storage("compaction"))?);
            dropped += 1;
        }
        self.trees.entry_changes.apply_batch(batch).map_err(storage("compaction"))?;
        Ok(dropped)
    }

    fn load_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        match self.trees.entries.get(id.as_bytes()).map_err(storage("read"))? {
            None => Ok(None),
            Some(bytes) => decode_entry(id.as_bytes(), &bytes).map(Some),
        }
    }

    fn load_node(&self, spiffe_id: &str) -> Result<Option<AttestedNode>> {
        match self.trees.nodes.get(spiffe_id.as_bytes()).map_err(storage("read"))? {
            None => Ok(None),
            Some(bytes) => decode_node(spiffe_id.as_bytes(), &bytes).map(Some),
        }
    }

    /// The record keys listed in `index` under `value`, in key order.
    fn index_lookup(&self, index: &sled::Tree, tree: &'static str, value: &str) -> Result<Vec<String>> {
        let prefix = index_prefix(value);
        index
            .scan_prefix(&prefix)
            .keys()
            .map(|key| {
                let key = key.map_err(storage("read"))?;
                utf8_key(tree, &key[prefix.len()..])
            })
            .collect()
    }

    /// The record keys a selector plan yields from `index`, sorted and de-duplicated;
    /// `None` for a full scan.
    fn selector_candidates(
        &self,
        plan: SelectorIndexPlan<'_>,
        index: &sled::Tree,
        tree: &'static str,
    ) -> Result<Option<BTreeSet<String>>> {
        let selectors: Vec<&Selector> = match plan {
            SelectorIndexPlan::FullScan => return Ok(None),
            SelectorIndexPlan::One(selector) => vec![selector],
            SelectorIndexPlan::Union(set) => set.iter().collect(),
        };
        let mut keys = BTreeSet::new();
        for selector in selectors {
            keys.extend(self.index_lookup(index, tree, &selector.to_string())?);
        }
        Ok(Some(keys))
    }

    /// The IDs of the entries with this SPIFFE ID: the values of the `entry_unique` keys that
    /// start with `<SPIFFE ID>\0` (see the module docs).
    fn entries_with_spiffe_id(&self, spiffe_id: &SpiffeId) -> Result<BTreeSet<String>> {
        self.trees
            .entry_unique
            .scan_prefix(index_prefix(spiffe_id.as_str()))
            .values()
            .map(|id| utf8_key(ENTRY_UNIQUE, &id.map_err(storage("read"))?))
            .collect()
    }

    /// The entry IDs the most selective index gives for `filter`; `None` for a full scan.
    fn entry_candidates(&self, filter: &EntryFilter) -> Result<Option<BTreeSet<String>>> {
        if let Some(spiffe_id) = &filter.spiffe_id {
            return self.entries_with_spiffe_id(spiffe_id).map(Some);
        }
        if let Some(parent_id) = &filter.parent_id {
            // From the entry index (there is no parent index on disk), with every corrupt
            // record that could be a child: loaded from the database, it is reported.
            let index = self.index();
            let mut ids: BTreeSet<String> = index.child_ids(parent_id).map(str::to_owned).collect();
            for key in index.corrupt_children_of(&[parent_id]) {
                ids.insert(utf8_key(ENTRIES, key)?);
            }
            return Ok(Some(ids));
        }
        let Some(selectors) = &filter.selectors else {
            return Ok(None);
        };
        // From the entry index too (there is no selector index on disk), with every corrupt
        // record that could have one of the selectors.
        let selectors: Vec<&Selector> = match plan_selector_index(selectors, true) {
            SelectorIndexPlan::FullScan => return Ok(None),
            SelectorIndexPlan::One(selector) => vec![selector],
            SelectorIndexPlan::Union(set) => set.iter().collect(),
        };
        let index = self.index();
        let mut ids = BTreeSet::new();
        for selector in &selectors {
            ids.extend(index.ids_with_selector(selector).map(str::to_owned));
        }
        for key in index.corrupt_with_selectors(&selectors) {
            ids.insert(utf8_key(ENTRIES, key)?);
        }
        Ok(Some(ids))
    }
}

/// Creates the datastore directory readable by its owner only (it holds join tokens).
fn create_private_dir(path: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(path)
}

/// Records after `after` (exclusive) in key order, for a full-scan listing.
fn range_after(tree: &sled::Tree, after: Option<&str>) -> sled::Iter {
    match after {
        Some(after) => tree.range::<&[u8], _>((Bound::Excluded(after.as_bytes()), Bound::Unbounded)),
        None => tree.iter(),
    }
}

impl DataStore for SledDataStore {
    fn create_entry(&self, entry: &RegistrationEntry) -> Result<RegistrationEntry> {
        validate_entry(entry)?;
        let unique = entry.unique_key();
        let to_write = entry.clone();
        let revision = self.write("entry create", None, move |tx| {
            let tx = tx.entry();
            let entry = &to_write;
            if tx.entries.get(entry.id.as_bytes())?.is_some() {
                return Ok(Err(entry_id_taken(&entry.id)));
            }
            if let Some(other) = tx.unique_owner(&unique)? {
                return Ok(Err(duplicate_entry(entry, &other)));
            }
            let revision = tx.log_change(&entry.id, ChangeKind::Upsert)?;
            tx.put(RegistrationEntry { revision, ..entry.clone() }, &unique)?;
            Ok(Ok(revision))
        })?;
        self.entry_written(revision);
        // The stored entry is built here, outside the shared transaction (its leader runs
        // every write of the round one after the other).
        Ok(RegistrationEntry { revision, ..entry.clone() })
    }

    fn get_entry(&self, id: &str) -> Result<Option<RegistrationEntry>> {
        Ok(self.get_entry_shared(id)?.map(SharedEntry::unwrap_or_clone))
    }

    fn get_entry_shared(&self, id: &str) -> Result<Option<Arc<SharedEntry>>> {
        let index = self.index();
        if index.has_corrupt() {
            drop(index);
            return Ok(self.load_entry(id)?.map(|entry| Arc::new(SharedEntry::new(entry))));
        }
        Ok(index.get(id).cloned())
    }

    fn update_entry(&self, entry: &RegistrationEntry, expected_revision: Option<u64>) -> Result<RegistrationEntry> {
        validate_entry(entry)?;
        let unique = entry.unique_key();
        let to_write = entry.clone();
        let revision = self.write("entry update", None, move |tx| {
            let tx = tx.entry();
            let entry = &to_write;
            let Some(old) = tx.get(&entry.id)? else {
                return Ok(Err(DataStoreError::NotFound { kind: ResourceKind::Entry, id: entry.id.clone() }));
            };
            if let Some(expected) = expected_revision.filter(|&expected| expected != old.revision) {
                return Ok(Err(entry_revision_conflict(&entry.id, expected, old.revision)));
            }
            if let Some(other) = tx.unique_owner(&unique)?.filter(|other| *other != entry.id) {
                return Ok(Err(duplicate_entry(entry, &other)));
            }
            tx.remove_indexes(&old)?;
            let revision = tx.log_change(&entry.id, ChangeKind::Upsert)?;
            tx.put(RegistrationEntry { revision, ..entry.clone() }, &unique)?;
            Ok(Ok(revision))
        })?;
        self.entry_written(revision);
        Ok(RegistrationEntry { revision, ..entry.clone() })
    }

    fn delete_entry(&self, id: &str) -> Result<RegistrationEntry> {
        let id = id.to_owned();
        let (old, revision) = self.write("entry delete", None, move |tx| {
            Ok(tx
                .entry()
                .delete(&id)?
                .ok_or_else(|| DataStoreError::NotFound { kind: ResourceKind::Entry, id: id.clone() }))
        })?;
        self.entry_written(revision);
        Ok(old)
    }

    fn list_entries(&self, filter: &EntryFilter, page: &PageRequest) -> Result<Page<RegistrationEntry>> {
        let after = page.after_key()?;
        match self.entry_candidates(filter)? {
            Some(ids) => {
                let ids = ids.into_iter().filter(|id| after.as_ref().is_none_or(|after| id > after));
                let records = ids.filter_map(|id| match self.load_entry(&id) {
                    Ok(Some(entry)) => filter.matches(&entry).then_some(Ok((id, entry))),
                    Ok(None) => None,
                    Err(err) => Some(Err(err)),
                });
                paginate(records, page)
            }
            None => {
                let records = range_after(&self.trees.entries, after.as_deref()).filter_map(|item| {
                    let entry = item.map_err(storage("read")).and_then(|(key, bytes)| decode_entry(&key, &bytes));
                    match entry {
                        Ok(entry) => filter.matches(&entry).then(|| Ok((entry.id.clone(), entry))),
                        Err(err) => Some(Err(err)),
                    }
                });
                paginate(records, page)
            }
        }
    }

    fn count_entries(&self) -> Result<u64> {
        // sled counts by scanning the tree: fine for an admin command. A hot path that needs
        // it would keep a counter in `meta`, updated in the entry transactions.
        Ok(u64::try_from(self.trees.entries.len()).unwrap_or(u64::MAX))
    }

    fn list_entries_by_parents(&self, parent_ids: &[SpiffeId]) -> Result<Vec<RegistrationEntry>> {
        let parents: Vec<&SpiffeId> = parent_ids.iter().collect();
        Ok(self.list_entries_by_parents_shared(&parents)?.into_iter().map(SharedEntry::unwrap_or_clone).collect())
    }

    fn list_entries_by_parents_shared(&self, parent_ids: &[&SpiffeId]) -> Result<Vec<Arc<SharedEntry>>> {
        let index = self.index();
        let mut children = index.children_of(parent_ids);
        let suspects: Vec<Vec<u8>> = index.corrupt_children_of(parent_ids).into_iter().map(<[u8]>::to_vec).collect();
        drop(index);
        if suspects.is_empty() {
            return Ok(children);
        }
        for entry in self.read_suspects(&suspects, |entry| parent_ids.contains(&&entry.parent_id))? {
            if children.iter().all(|child| child.id != entry.id) {
                children.push(Arc::new(SharedEntry::new(entry)));
            }
        }
        children.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(children)
    }

    fn list_entries_by_selector(&self, selector: &Selector) -> Result<Vec<RegistrationEntry>> {
        let index = self.index();
        let mut entries: Vec<RegistrationEntry> =
            index.with_selector(selector).iter().map(|entry| RegistrationEntry::clone(entry)).collect();
        let suspects: Vec<Vec<u8>> =
            index.corrupt_with_selectors(&[selector]).into_iter().map(<[u8]>::to_vec).collect();
        drop(index);
        if suspects.is_empty() {
            return Ok(entries);
        }
        for entry in self.read_suspects(&suspects, |entry| entry.selectors.contains(selector))? {
            if entries.iter().all(|listed| listed.id != entry.id) {
                entries.push(entry);
            }
        }
        entries.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(entries)
    }

    fn prune_expired_entries(&self, now: u64) -> Result<u64> {
        let mut expired = Vec::new();
        let index = self.index();
        if index.has_corrupt() {
            drop(index);
            for item in self.trees.entries.iter() {
                let (key, bytes) = item.map_err(storage("read"))?;
                let entry = decode_entry(&key, &bytes)?;
                if entry.is_expired(now) {
                    expired.push(entry.id);
                }
            }
        } else {
            // From memory; each is checked again inside the transaction.
            expired.extend(index.iter().filter(|entry| entry.is_expired(now)).map(|entry| entry.id.clone()));
            drop(index);
        }
        // In ID order, as a scan of the database gives them.
        expired.sort_unstable();
        if expired.is_empty() {
            return Ok(0);
        }
        let (pruned, revision) = self.write("entry prune", None, move |tx| {
            let tx = tx.entry();
            let (mut pruned, mut revision) = (0, 0);
            for id in &expired {
                // Re-checked inside the transaction: the entry may have been updated since.
                if tx.get(id)?.is_some_and(|entry| entry.is_expired(now))
                    && let Some((_, at)) = tx.delete(id)?
                {
                    pruned += 1;
                    revision = at;
                }
            }
            Ok(Ok((pruned, revision)))
        })?;
        if pruned > 0 {
            self.entry_written(revision);
        }
        Ok(pruned)
    }

    /// The entry index's revision: a write is visible to readers once the index holds it
    /// (the stored revision may be ahead while a shared transaction's leader catches up).
    fn current_revision(&self) -> Result<u64> {
        // Read so that a corrupt counter is reported; never behind the index.
        let stored = self.read_meta_u64(KEY_REVISION)?;
        Ok(self.index().revision().min(stored))
    }

    fn changes_since(&self, revision: u64, limit: usize) -> Result<Vec<EntryChange>> {
        // Up to the index's revision only: the entries of later changes are not readable yet.
        let current = self.current_revision()?;
        let floor = self.read_meta_u64(KEY_CHANGE_FLOOR)?;
        if limit == 0 {
            if revision > current || revision < floor {
                return Err(DataStoreError::ResyncRequired { since: revision, floor, current });
            }
            return Ok(Vec::new());
        }
        let changes = self.logged_changes(revision, current, limit)?;
        check_continuity(revision, current, floor, &changes)?;
        Ok(changes)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    fn compact_changes(&self, retain: u64) -> Result<u64> {
        let floor = self.read_meta_u64(KEY_REVISION)?.saturating_sub(retain);
        self.compact_to(floor)
    }

    fn create_attested_node(&self, node: &AttestedNode) -> Result<()> {
        validate_node(node)?;
        let node = node.clone();
        let id = node.spiffe_id.clone();
        self.node_write("attested node create", &id, move |tx| {
            if tx.get(&node.spiffe_id)?.is_some() {
                return Ok(Err(DataStoreError::AlreadyExists {
                    kind: ResourceKind::AttestedNode,
                    id: node.spiffe_id.to_string(),
                    reason: "the node is already attested (evict it first)".to_owned(),
                }));
            }
            tx.put(&node).map(Ok)
        })
    }

    fn get_attested_node(&self, spiffe_id: &SpiffeId) -> Result<Option<AttestedNode>> {
        self.load_node(spiffe_id.as_str())
    }

    fn list_attested_nodes(&self, filter: &NodeFilter, page: &PageRequest) -> Result<Page<AttestedNode>> {
        let after = page.after_key()?;
        let candidates = match &filter.selectors {
            Some(selectors) => self.selector_candidates(
                plan_selector_index(selectors, false),
                &self.trees.node_by_selector,
                NODE_BY_SELECTOR,
            )?,
            None => None,
        };
        match candidates {
            Some(ids) => {
                let ids = ids.into_iter().filter(|id| after.as_ref().is_none_or(|after| id > after));
                let records = ids.filter_map(|id| match self.load_node(&id) {
                    Ok(Some(node)) => filter.matches(&node).then_some(Ok((id, node))),
                    Ok(None) => None,
                    Err(err) => Some(Err(err)),
                });
                paginate(records, page)
            }
            None => {
                let records = range_after(&self.trees.nodes, after.as_deref()).filter_map(|item| {
                    let node = item.map_err(storage("read")).and_then(|(key, bytes)| decode_node(&key, &bytes));
                    match node {
                        Ok(node) => filter.matches(&node).then(|| Ok((node.spiffe_id.to_string(), node))),
                        Err(err) => Some(Err(err)),
                    }
                });
                paginate(records, page)
            }
        }
    }

    fn update_attested_node_serials(
        &self,
        spiffe_id: &SpiffeId,
        expected_serial: &str,
        serials: &NodeSerials,
    ) -> Result<AttestedNode> {
        validate_serials(serials)?;
        let (id, expected_serial, serials) = (spiffe_id.clone(), expected_serial.to_owned(), serials.clone());
        self.node_write("attested node serial update", spiffe_id, move |tx| {
            let mut node = match tx.get_existing(&id)? {
                Ok(node) => node,
                Err(refused) => return Ok(Err(refused)),
            };
            if node.banned {
                return Ok(Err(DataStoreError::NodeBanned { spiffe_id: id.clone() }));
            }
            if node.serial != expected_serial {
                return Ok(Err(DataStoreError::Conflict {
                    kind: ResourceKind::AttestedNode,
                    id: id.to_string(),
                    expected: format!("serial {expected_serial}"),
                    found: format!("serial {}", node.serial),
                }));
            }
            node.serial.clone_from(&serials.serial);
            node.new_serial.clone_from(&serials.new_serial);
            node.expires_at = serials.expires_at;
            tx.put(&node)?;
            Ok(Ok(node))
        })
    }

    fn set_attested_node_selectors(&self, spiffe_id: &SpiffeId, selectors: &SelectorSet) -> Result<AttestedNode> {
        let (id, selectors) = (spiffe_id.clone(), selectors.clone());
        self.node_write("attested node selector update", spiffe_id, move |tx| {
            let mut node = match tx.get_existing(&id)? {
                Ok(node) => node,
                Err(refused) => return Ok(Err(refused)),
            };
            tx.remove_indexes(&node)?;
            node.selectors = selectors.clone();
            tx.put(&node)?;
            Ok(Ok(node))
        })
    }

    fn ban_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let id = spiffe_id.clone();
        self.node_write("attested node ban", spiffe_id, move |tx| {
            let mut node = match tx.get_existing(&id)? {
                Ok(node) => node,
                Err(refused) => return Ok(Err(refused)),
            };
            node.banned = true;
            node.serial.clear();
            node.new_serial = None;
            tx.put(&node)?;
            Ok(Ok(node))
        })
    }

    fn delete_attested_node(&self, spiffe_id: &SpiffeId) -> Result<AttestedNode> {
        let id = spiffe_id.clone();
        self.node_write("attested node delete", spiffe_id, move |tx| {
            let node = match tx.get_existing(&id)? {
                Ok(node) => node,
                Err(refused) => return Ok(Err(refused)),
            };
            tx.remove(&node)?;
            Ok(Ok(node))
        })
    }

    fn node_generation(&self, spiffe_id: &SpiffeId) -> u64 {
        self.generations.node(spiffe_id)
    }

    fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        validate_token(token)?;
        let record = encode(&TokenRecordV1::from_token(token))?;
        let pending = self.commit.begin();
        let swapped = self
            .trees
            .join_tokens
            .compare_and_swap(token.token.as_bytes(), None::<&[u8]>, Some(record))
            .map_err(storage("join token create"))?;
        if swapped.is_err() {
            return Err(DataStoreError::AlreadyExists {
                kind: ResourceKind::JoinToken,
                id: token.token.clone(),
                reason: "the token exists".to_owned(),
            });
        }
        self.make_durable(pending)
    }

    fn consume_join_token(&self, token: &str, now: u64) -> Result<JoinToken> {
        let token = token.to_owned();
        // The value is removed, decoded and checked in one transaction; an expired token is
        // removed all the same (the inner result), so it commits. Durable before anyone is told
        // the token was theirs: after a crash it must not be usable again.
        self.write("join token consume", None, move |tx| {
            let key = token.as_bytes();
            let Some(bytes) = tx.join_tokens.get(key)? else {
                return Ok(Err(DataStoreError::TokenNotFound));
            };
            let record: TokenRecordV1 = decode(JOIN_TOKENS, key, &bytes).map_err(abort)?;
            tx.join_tokens.remove(key)?;
            if now >= record.expires_at() {
                return Ok(Ok(Err(DataStoreError::TokenExpired { expires_at: record.expires_at() })));
            }
            Ok(Ok(Ok(record.into_token(token.clone()))))
        })?
    }

    fn prune_join_tokens(&self, now: u64) -> Result<u64> {
        let mut pruned = 0;
        let mut pending = None;
        for item in self.trees.join_tokens.iter() {
            let (key, bytes) = item.map_err(storage("read"))?;
            let record: TokenRecordV1 = decode(JOIN_TOKENS, &key, &bytes)?;
            if now >= record.expires_at() {
                pending.get_or_insert_with(|| self.commit.begin());
                let removed = self
                    .trees
                    .join_tokens
                    .compare_and_swap(&key, Some(&bytes), None::<&[u8]>)
                    .map_err(storage("join token prune"))?;
                pruned += u64::from(removed.is_ok());
            }
        }
        if let Some(pending) = pending.filter(|_| pruned > 0) {
            self.make_durable(pending)?;
        }
        Ok(pruned)
    }

    fn get_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<Bundle>> {
        let key = trust_domain.name().as_bytes();
        match self.trees.bundles.get(key).map_err(storage("read"))? {
            None => Ok(None),
            Some(bytes) => decode_bundle(key, &bytes).map(Some),
        }
    }

    fn list_bundles(&self) -> Result<Vec<Bundle>> {
        self.trees
            .bundles
            .iter()
            .map(|item| {
                let (key, bytes) = item.map_err(storage("read"))?;
                decode_bundle(&key, &bytes)
            })
            .collect()
    }

    fn set_bundle(&self, trust_domain: &TrustDomain, data: &[u8], expected_sequence: Option<u64>) -> Result<Bundle> {
        let written = self.put_versioned_blob(
            VersionedTree {
                tree: |tx| tx.bundles,
                name: BUNDLES,
                kind: ResourceKind::Bundle,
                counter: "sequence",
                operation: "bundle set",
            },
            trust_domain,
            data,
            expected_sequence,
        );
        // After the write (attempted or done): a reader never keeps an old bundle under the
        // new generation.
        self.generations.bundle_written();
        Ok(Bundle { trust_domain: trust_domain.clone(), data: data.to_vec(), sequence: written? })
    }

    fn delete_bundle(&self, trust_domain: &TrustDomain) -> Result<Bundle> {
        let key = trust_domain.name().as_bytes();
        let pending = self.commit.begin();
        let removed = self.trees.bundles.remove(key).map_err(storage("bundle delete"));
        self.generations.bundle_written();
        let Some(bytes) = removed? else {
            return Err(DataStoreError::NotFound { kind: ResourceKind::Bundle, id: trust_domain.to_string() });
        };
        self.make_durable(pending)?;
        decode_bundle(key, &bytes)
    }

    fn bundle_generation(&self) -> u64 {
        self.generations.bundles()
    }

    fn get_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<Option<FederationRelationshipRecord>> {
        let key = trust_domain.name().as_bytes();
        match self.trees.federation.get(key).map_err(storage("read"))? {
            None => Ok(None),
            Some(bytes) => decode_relationship(key, &bytes).map(Some),
        }
    }

    fn list_federation_relationships(&self) -> Result<Vec<FederationRelationshipRecord>> {
        self.trees
            .federation
            .iter()
            .map(|item| {
                let (key, bytes) = item.map_err(storage("read"))?;
                decode_relationship(&key, &bytes)
            })
            .collect()
    }

    fn put_federation_relationship(
        &self,
        trust_domain: &TrustDomain,
        data: &[u8],
        expected_revision: Option<u64>,
    ) -> Result<FederationRelationshipRecord> {
        let revision = self.put_versioned_blob(
            VersionedTree {
                tree: |tx| tx.federation,
                name: FEDERATION,
                kind: ResourceKind::FederationRelationship,
                counter: "revision",
                operation: "federation relationship put",
            },
            trust_domain,
            data,
            expected_revision,
        )?;
        Ok(FederationRelationshipRecord { trust_domain: trust_domain.clone(), data: data.to_vec(), revision })
    }

    fn delete_federation_relationship(&self, trust_domain: &TrustDomain) -> Result<FederationRelationshipRecord> {
        let key = trust_domain.name().as_bytes();
        let pending = self.commit.begin();
        let removed = self.trees.federation.remove(key).map_err(storage("federation relationship delete"))?;
        let Some(bytes) = removed else {
            return Err(DataStoreError::NotFound {
                kind: ResourceKind::FederationRelationship,
                id: trust_domain.to_string(),
            });
        };
        self.make_durable(pending)?;
        decode_relationship(key, &bytes)
    }

    fn get_ca_journal(&self) -> Result<Option<CaJournal>> {
        match self.trees.ca_journal.get(KEY_JOURNAL).map_err(storage("read"))? {
            None => Ok(None),
            Some(bytes) => decode::<CaJournalRecordV1>(CA_JOURNAL, KEY_JOURNAL, &bytes).map(|r| Some(r.into_journal())),
        }
    }

    fn put_ca_journal(&self, data: &[u8], expected_version: u64) -> Result<CaJournal> {
        let record = data.to_vec();
        let version = self.write("CA journal put", None, move |tx| {
            let current = match tx.ca_journal.get(KEY_JOURNAL)? {
                None => 0,
                Some(bytes) => {
                    decode::<CaJournalRecordV1>(CA_JOURNAL, KEY_JOURNAL, &bytes).map_err(abort)?.into_journal().version
                }
            };
            if current != expected_version {
                return Ok(Err(DataStoreError::Conflict {
                    kind: ResourceKind::CaJournal,
                    id: "journal".to_owned(),
                    expected: format!("version {expected_version}"),
                    found: format!("version {current}"),
                }));
            }
            let version = current + 1;
            tx.ca_journal.insert(KEY_JOURNAL, encode(&CaJournalRecordV1::new(&record, version)).map_err(abort)?)?;
            Ok(Ok(version))
        })?;
        Ok(CaJournal { data: data.to_vec(), version })
    }

    fn insert_jti_if_absent(&self, issuer: &str, jti: &str, expires_at: u64) -> Result<bool> {
        let record = encode(&JtiRecordV1 { expires_at })?;
        let pending = self.commit.begin();
        let swapped = self
            .trees
            .jtis
            .compare_and_swap(jti_key(issuer, jti), None::<&[u8]>, Some(record))
            .map_err(storage("JWT ID insert"))?;
        if swapped.is_err() {
            return Ok(false);
        }
        // Durable like every write: a replay must stay detectable across a restart.
        self.make_durable(pending)?;
        Ok(true)
    }

    fn prune_jtis(&self, now: u64) -> Result<u64> {
        let mut pruned = 0;
        let mut pending = None;
        for item in self.trees.jtis.iter() {
            let (key, bytes) = item.map_err(storage("read"))?;
            let record: JtiRecordV1 = decode(JTIS, &key, &bytes)?;
            if record.expires_at <= now {
                pending.get_or_insert_with(|| self.commit.begin());
                let removed = self
                    .trees
                    .jtis
                    .compare_and_swap(&key, Some(&bytes), None::<&[u8]>)
                    .map_err(storage("JWT ID prune"))?;
                pruned += u64::from(removed.is_ok());
            }
        }
        if let Some(pending) = pending.filter(|_| pruned > 0) {
            self.make_durable(pending)?;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::super::types::{SelectorFilter, SelectorMatch};
    use super::*;
    use std::collections::BTreeMap;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn entry(entry_id: &str) -> RegistrationEntry {
        RegistrationEntry::new(
            entry_id,
            id("spiffe://example.org/web"),
            id("spiffe://example.org/agent"),
            SelectorSet::parse_all(&["unix:uid:1000"]).unwrap(),
        )
    }

    fn open(dir: &Path) -> SledDataStore {
        SledDataStore::open(dir, DataStoreOptions::default()).unwrap()
    }

    fn assert_corrupt<T: fmt::Debug>(result: Result<T>, tree: &str) {
        match result {
            Err(DataStoreError::Corrupt { tree: found, .. }) => assert_eq!(found, tree),
            other => panic!("expected corrupt value in {tree}, got {other:?}"),
        }
    }

    #[test]
    fn garbage_values_are_reported_as_corrupt_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_entry(&entry("e1")).unwrap();
        let node_id = id("spiffe://example.org/tessera/agent/join_token/t");

        store.trees.entries.insert("e1", &[1, 0xff, 0xff, 0xff][..]).unwrap();
        store.flush().unwrap();
        // Met by the entry index when the store opens: the reads that could meet the record
        // then go to the database, and report it.
        drop(store);
        let store = open(dir.path());
        assert_corrupt(store.get_entry("e1"), ENTRIES);
        assert_corrupt(store.list_entries(&EntryFilter::default(), &PageRequest::all()), ENTRIES);
        assert_corrupt(store.list_entries_by_parents(&[id("spiffe://example.org/agent")]), ENTRIES);
        assert_corrupt(store.delete_entry("e1"), ENTRIES);

        store.trees.entries.insert("e2", &[7, 1, 2][..]).unwrap();
        let err = store.get_entry("e2").unwrap_err();
        assert!(err.to_string().contains("unknown record version 7"), "{err}");

        store.trees.nodes.insert(node_id.as_str(), &[][..]).unwrap();
        assert_corrupt(store.get_attested_node(&node_id), NODES);
        assert_corrupt(store.list_attested_nodes(&NodeFilter::default(), &PageRequest::all()), NODES);

        store.trees.join_tokens.insert("tok", &[1][..]).unwrap();
        assert_corrupt(store.consume_join_token("tok", 0), JOIN_TOKENS);

        store.trees.entry_changes.insert(u64_bytes(1), &[1, 9, 9][..]).unwrap();
        assert_corrupt(store.changes_since(0, 10), ENTRY_CHANGES);

        store.trees.meta.insert(KEY_REVISION, &[1, 2, 3][..]).unwrap();
        assert_corrupt(store.current_revision(), META);
        let mut other = entry("e3");
        other.spiffe_id = id("spiffe://example.org/other");
        assert_corrupt(store.create_entry(&other), META);

        store.trees.bundles.insert("example.org", &[1][..]).unwrap();
        assert_corrupt(store.list_bundles(), BUNDLES);
        store.trees.ca_journal.insert(KEY_JOURNAL, &[0][..]).unwrap();
        assert_corrupt(store.get_ca_journal(), CA_JOURNAL);
    }

    #[test]
    fn an_unknown_schema_version_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            store.trees.meta.insert(KEY_SCHEMA_VERSION, &[9][..]).unwrap();
            store.flush().unwrap();
        }
        let err = SledDataStore::open(dir.path(), DataStoreOptions::default()).unwrap_err();
        assert!(matches!(err, DataStoreError::UnsupportedSchema { found: 9, supported: SCHEMA_VERSION, .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    #[test]
    fn indexes_follow_updates_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_entry(&entry("e1")).unwrap();
        let mut changed = entry("e1");
        changed.parent_id = id("spiffe://example.org/other");
        changed.selectors = SelectorSet::parse_all(&["unix:uid:2000"]).unwrap();
        store.update_entry(&changed, None).unwrap();
        let t = &store.trees;
        let keys = |tree: &sled::Tree| {
            tree.iter().keys().map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(keys(&t.entry_unique), ["spiffe://example.org/web\0spiffe://example.org/other\0unix:uid:2000"]);
        // Layout 4: no index by parent or by selector on disk; reads by selector follow.
        for old in [V2_ENTRY_BY_PARENT, V3_ENTRY_BY_SELECTOR] {
            assert!(!store.db.tree_names().iter().any(|name| name.as_ref() == old.as_bytes()), "{old}");
        }
        let by_selector = |s: &str| store.list_entries_by_selector(&Selector::parse(s).unwrap()).unwrap();
        assert!(by_selector("unix:uid:1000").is_empty());
        assert_eq!(by_selector("unix:uid:2000").len(), 1);
        store.delete_entry("e1").unwrap();
        assert!(by_selector("unix:uid:2000").is_empty());
        for tree in [&t.entries, &t.entry_unique] {
            assert!(tree.is_empty());
        }
    }

    fn ids_of(entries: &[Arc<SharedEntry>]) -> Vec<&str> {
        entries.iter().map(|e| e.id.as_str()).collect()
    }

    fn by_parent(store: &SledDataStore, parent: &str) -> Result<Vec<String>> {
        let filter = EntryFilter { parent_id: Some(id(parent)), ..EntryFilter::default() };
        Ok(store.list_entries(&filter, &PageRequest::all())?.items.into_iter().map(|e| e.id).collect())
    }

    /// Without an index by parent on disk, a corrupt record is still reported by every read by
    /// parent that could meet it, found at open or by a catch-up: under the parent its unique
    /// key names; under every parent when no unique key names it (or its key is not UTF-8).
    /// Reads by other parents are answered from the entry index.
    #[test]
    fn a_corrupt_record_is_reported_by_the_reads_by_parent_that_could_meet_it() {
        const A: &str = "spiffe://example.org/a";
        const B: &str = "spiffe://example.org/b";
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for n in 0..6 {
            let mut e = numbered_entry(n);
            e.parent_id = id(if n % 2 == 0 { A } else { B });
            store.create_entry(&e).unwrap();
        }
        // e2 (under A) stops decoding; found when the store opens.
        store.trees.entries.insert("e2", &[1, 0xff, 0xff, 0xff][..]).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(store.list_entries_by_parents_shared(&[&id(A)]), ENTRIES);
        assert_corrupt(store.list_entries_by_parents_shared(&[&id(B), &id(A)]), ENTRIES);
        assert_corrupt(by_parent(&store, A), ENTRIES);
        assert_eq!(ids_of(&store.list_entries_by_parents_shared(&[&id(B)]).unwrap()), ["e1", "e3", "e5"]);
        assert_eq!(by_parent(&store, B).unwrap(), ["e1", "e3", "e5"]);

        // e5 (under B) is written outside the writer, then stops decoding: found by the
        // index's catch-up from the change log, under B.
        let mut moved = numbered_entry(5);
        moved.parent_id = id(B);
        moved.hint = "moved".into();
        commit_unindexed(&store, &moved);
        store.trees.entries.insert("e5", &[1, 0xff][..]).unwrap();
        store.catch_up_index().unwrap();
        assert_corrupt(store.list_entries_by_parents_shared(&[&id(B)]), ENTRIES);
        assert_corrupt(by_parent(&store, B), ENTRIES);
        assert!(store.list_entries_by_parents_shared(&[&id("spiffe://example.org/c")]).unwrap().is_empty());

        // A corrupt record no unique key names could be anyone's child.
        let unique = store.trees.entry_unique.iter().map(Result::unwrap).find(|(_, owner)| owner == b"e2").unwrap().0;
        store.trees.entry_unique.remove(unique).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(store.list_entries_by_parents_shared(&[&id("spiffe://example.org/c")]), ENTRIES);
        assert_corrupt(by_parent(&store, "spiffe://example.org/c"), ENTRIES);

        // Once the records are gone (removed by hand), the reads answer again.
        let store = remove_records_and_reopen(store, dir.path(), &["e2", "e5"]);
        assert!(!store.index().has_corrupt());
        assert_eq!(ids_of(&store.list_entries_by_parents_shared(&[&id(A), &id(B)]).unwrap()), ["e0", "e1", "e3", "e4"]);

        // A record whose key is not UTF-8 is no entry ID any unique key could name.
        store.trees.entries.insert(&[0xff, 0x01][..], &[1, 2][..]).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(store.list_entries_by_parents_shared(&[&id(A)]), ENTRIES);
        assert_corrupt(by_parent(&store, B), ENTRIES);
    }

    fn by_selectors(store: &SledDataStore, selectors: &[&str], mode: SelectorMatch) -> Result<Vec<String>> {
        let filter = EntryFilter {
            selectors: Some(SelectorFilter::new(SelectorSet::parse_all(selectors).unwrap(), mode)),
            ..EntryFilter::default()
        };
        Ok(store.list_entries(&filter, &PageRequest::all())?.items.into_iter().map(|e| e.id).collect())
    }

    fn with_selector(store: &SledDataStore, selector: &str) -> Result<Vec<String>> {
        Ok(store.list_entries_by_selector(&Selector::parse(selector).unwrap())?.into_iter().map(|e| e.id).collect())
    }

    /// Without an index by selector on disk, a corrupt record is still reported by every read
    /// by selector that could meet it (by one of the selectors its unique key names; by every
    /// selector when no unique key names it), found at open or by a catch-up. Reads by other
    /// selectors are answered from the entry index.
    #[test]
    fn a_corrupt_record_is_reported_by_the_reads_by_selector_that_could_meet_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for n in 0..6 {
            let mut e = numbered_entry(n);
            let parity = if n % 2 == 0 { "k:even" } else { "k:odd" };
            e.selectors = SelectorSet::parse_all(&[parity, &format!("k:own{n}")]).unwrap();
            store.create_entry(&e).unwrap();
        }
        // e2 (k:even, k:own2) stops decoding; found when the store opens.
        store.trees.entries.insert("e2", &[1, 0xff, 0xff, 0xff][..]).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(with_selector(&store, "k:even"), ENTRIES);
        assert_corrupt(with_selector(&store, "k:own2"), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:even"], SelectorMatch::Superset), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:odd", "k:own2"], SelectorMatch::Any), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:own2", "k:own9"], SelectorMatch::Subset), ENTRIES);
        assert_eq!(with_selector(&store, "k:odd").unwrap(), ["e1", "e3", "e5"]);
        assert_eq!(by_selectors(&store, &["k:odd", "k:own3"], SelectorMatch::Exact).unwrap(), ["e3"]);
        assert_eq!(by_selectors(&store, &["k:own0", "k:own1"], SelectorMatch::Any).unwrap(), ["e0", "e1"]);
        assert!(with_selector(&store, "k:none").unwrap().is_empty());

        // e5 is written outside the writer with a new selector, then stops decoding: found by
        // the index's catch-up from the change log, under its new selectors.
        let mut moved = numbered_entry(5);
        moved.selectors = SelectorSet::parse_all(&["k:moved"]).unwrap();
        commit_unindexed(&store, &moved);
        store.trees.entries.insert("e5", &[1, 0xff][..]).unwrap();
        store.catch_up_index().unwrap();
        assert_corrupt(with_selector(&store, "k:moved"), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:moved"], SelectorMatch::Exact), ENTRIES);
        assert_eq!(with_selector(&store, "k:odd").unwrap(), ["e1", "e3"]);

        // A corrupt record no unique key names could have any selector.
        let unique = store.trees.entry_unique.iter().map(Result::unwrap).find(|(_, owner)| owner == b"e2").unwrap().0;
        store.trees.entry_unique.remove(unique).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(with_selector(&store, "k:none"), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:odd"], SelectorMatch::Superset), ENTRIES);

        // Once the records are gone (removed by hand), the reads answer again.
        let store = remove_records_and_reopen(store, dir.path(), &["e2", "e5"]);
        assert!(!store.index().has_corrupt());
        assert_eq!(with_selector(&store, "k:even").unwrap(), ["e0", "e4"]);
        assert!(with_selector(&store, "k:moved").unwrap().is_empty());

        // A record whose key is not UTF-8 is no entry ID any unique key could name.
        store.trees.entries.insert(&[0xff, 0x01][..], &[1, 2][..]).unwrap();
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_corrupt(with_selector(&store, "k:none"), ENTRIES);
        assert_corrupt(by_selectors(&store, &["k:odd"], SelectorMatch::Any), ENTRIES);
    }

    /// The entry index as readers see it, and the stored entries, read from the database.
    fn indexed_and_stored(
        store: &SledDataStore,
    ) -> (u64, BTreeMap<String, RegistrationEntry>, u64, BTreeMap<String, RegistrationEntry>) {
        let index = store.index();
        let indexed = index.iter().map(|e| (e.id.clone(), RegistrationEntry::clone(e))).collect();
        let fresh = store.hydrate().unwrap();
        assert!(!fresh.has_corrupt());
        let stored = fresh.iter().map(|e| (e.id.clone(), RegistrationEntry::clone(e))).collect();
        (index.revision(), indexed, fresh.revision(), stored)
    }

    fn assert_index_is_the_store(store: &SledDataStore, what: &str) {
        let (index_revision, indexed, stored_revision, stored) = indexed_and_stored(store);
        assert_eq!(index_revision, stored_revision, "index revision, {what}");
        assert_eq!(indexed, stored, "indexed entries, {what}");
        // The parent index too: every stored entry is listed under its parent, in ID order.
        let parents: BTreeSet<SpiffeId> = stored.values().map(|e| e.parent_id.clone()).collect();
        for parent in parents {
            let listed: Vec<String> =
                store.list_entries_by_parents_shared(&[&parent]).unwrap().iter().map(|e| e.id.clone()).collect();
            let expected: Vec<String> =
                stored.values().filter(|e| e.parent_id == parent).map(|e| e.id.clone()).collect();
            assert_eq!(listed, expected, "children of {parent}, {what}");
        }
        // And the selector lists: every stored entry is listed under each of its selectors.
        let selectors: BTreeSet<Selector> = stored.values().flat_map(|e| e.selectors.iter().cloned()).collect();
        for selector in selectors {
            let listed: Vec<String> =
                store.list_entries_by_selector(&selector).unwrap().into_iter().map(|e| e.id).collect();
            let expected: Vec<String> =
                stored.values().filter(|e| e.selectors.contains(&selector)).map(|e| e.id.clone()).collect();
            assert_eq!(listed, expected, "entries with {selector}, {what}");
        }
    }

    /// Random creates, updates (moving entries between parents), deletes and prunes, from
    /// several threads at once (so writes share transactions): the index is the store after
    /// every acknowledged write, after all of them, and after a restart.
    #[test]
    fn the_entry_index_is_the_store_after_random_writes_and_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let parents = ["spiffe://example.org/p0", "spiffe://example.org/p1", "spiffe://example.org/p2"];
        let threads: Vec<_> = (0..4u64)
            .map(|thread| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ (thread + 1);
                    let mut next = move |bound: u64| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed % bound
                    };
                    for step in 0..60 {
                        let n = next(20);
                        let entry_id = format!("e{n}");
                        let existing = store.get_entry(&entry_id).unwrap();
                        match next(6) {
                            0 | 1 if existing.is_some() => {
                                // Another thread may delete it first.
                                let _ = store.delete_entry(&entry_id);
                            }
                            _ => {
                                let mut e = entry(&entry_id);
                                e.spiffe_id = id(&format!("spiffe://example.org/w{n}/{step}/{thread}"));
                                e.parent_id = id(parents[usize::try_from(next(3)).unwrap()]);
                                e.hint = format!("{thread}/{step}");
                                e.selectors = SelectorSet::parse_all(&[
                                    format!("unix:uid:{}", next(3)),
                                    format!("k:{}", next(40)),
                                ])
                                .unwrap();
                                e.expires_at = (next(4) == 0).then_some(100);
                                // A create may race another thread's: refused, fine.
                                let written = match existing {
                                    Some(_) => store.update_entry(&e, None),
                                    None => store.create_entry(&e),
                                };
                                if let Ok(written) = written {
                                    // Acknowledged: readable at once, at its revision or later.
                                    let read = store.get_entry_shared(&entry_id).unwrap();
                                    assert!(read.is_none_or(|r| r.revision >= written.revision));
                                    assert!(store.current_revision().unwrap() >= written.revision);
                                }
                            }
                        }
                        if step % 20 == 19 {
                            store.prune_expired_entries(200).unwrap();
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(store.count_entries().unwrap() > 0);
        assert_index_is_the_store(&store, "after the writes");
        let revision = store.current_revision().unwrap();
        // Every change reached the index as written, none was read back from the database.
        assert_eq!(store.handed_to_index.load(Ordering::Relaxed), revision);
        assert_eq!(store.read_back_to_index.load(Ordering::Relaxed), 0);
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.current_revision().unwrap(), revision);
        assert_index_is_the_store(&store, "after a restart");
        let some_id = store.index().iter().next().unwrap().id.clone();
        store.delete_entry(&some_id).unwrap();
        assert_index_is_the_store(&store, "after a delete past the restart");
    }

    /// Hydration in chunks on several decoding threads loads exactly what one pass over the
    /// `entries` tree in key order does, whatever the chunk size and the number of threads,
    /// corrupt records (a garbage value, a key that is not UTF-8) included.
    #[test]
    fn hydration_in_chunks_on_several_threads_loads_what_one_pass_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let parents = ["spiffe://example.org/p0", "spiffe://example.org/p1", "spiffe://example.org/p2"];
        for n in 0..40 {
            let mut e = numbered_entry(n);
            e.parent_id = id(parents[n % 3]);
            store.create_entry(&e).unwrap();
        }
        store.delete_entry("e7").unwrap();
        store.trees.entries.insert("e20", &[1, 0xff, 0xff, 0xff][..]).unwrap();
        store.trees.entries.insert(&[0xff, 0x01][..], store.trees.entries.get("e3").unwrap().unwrap()).unwrap();
        // One pass over the tree, in key order, on this thread.
        let mut expected = BTreeMap::new();
        for item in store.trees.entries.iter() {
            let (key, bytes) = item.unwrap();
            if let Ok(entry) = decode_entry(&key, &bytes) {
                expected.insert(entry.id.clone(), entry);
            }
        }
        assert_eq!(expected.len(), 38);
        for (chunk, decoders) in [(1, 1), (1, 4), (3, 2), (7, 3), (16, 2), (39, 2), (40, 2), (41, 2), (1000, 2)] {
            let index = store.hydrate_with(chunk, decoders).unwrap();
            let what = format!("chunks of {chunk}, {decoders} decoders");
            assert_eq!(index.revision(), 41, "{what}");
            let loaded: BTreeMap<String, RegistrationEntry> =
                index.iter().map(|e| (e.id.clone(), RegistrationEntry::clone(e))).collect();
            assert_eq!(loaded, expected, "{what}");
            assert!(index.has_corrupt(), "{what}");
            assert!(index.get("e20").is_none(), "{what}");
            for parent in parents {
                let children: Vec<String> = index.children_of(&[&id(parent)]).iter().map(|e| e.id.clone()).collect();
                let wanted: Vec<String> =
                    expected.values().filter(|e| e.parent_id.as_str() == parent).map(|e| e.id.clone()).collect();
                assert_eq!(children, wanted, "{what}, children of {parent}");
            }
        }
    }

    /// Commits an entry write in a transaction of its own, outside the writer (as a shared
    /// transaction does before its leader catches the index up).
    fn commit_unindexed(store: &SledDataStore, entry: &RegistrationEntry) -> u64 {
        store
            .trees
            .transaction(&std::cell::RefCell::default(), |tx| {
                let tx = tx.entry();
                if let Some(old) = tx.get(&entry.id)? {
                    tx.remove_indexes(&old)?;
                }
                let revision = tx.log_change(&entry.id, ChangeKind::Upsert)?;
                tx.put(RegistrationEntry { revision, ..entry.clone() }, &entry.unique_key())?;
                Ok(revision)
            })
            .unwrap()
    }

    /// A committed write the index has not taken yet is invisible to readers: not in the
    /// revision, the change log or the entries; the catch-up makes it visible, also after the
    /// change log was compacted past the index.
    #[test]
    fn readers_see_a_write_only_once_the_index_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let first = store.create_entry(&numbered_entry(1)).unwrap();
        let mut moved = numbered_entry(1);
        moved.parent_id = id("spiffe://example.org/elsewhere");
        let at = commit_unindexed(&store, &moved);
        assert_eq!(at, first.revision + 1);
        assert_eq!(store.current_revision().unwrap(), first.revision);
        assert_eq!(store.changes_since(first.revision, 10).unwrap(), []);
        assert_eq!(store.changes_since(0, 10).unwrap().len(), 1);
        assert_eq!(store.get_entry("e1").unwrap().unwrap().parent_id, first.parent_id);
        store.catch_up_index().unwrap();
        assert_eq!(store.current_revision().unwrap(), at);
        assert_eq!(store.changes_since(first.revision, 10).unwrap().len(), 1);
        assert_eq!(store.get_entry("e1").unwrap().unwrap().parent_id, moved.parent_id);
        assert_index_is_the_store(&store, "after the catch-up");

        // Compacted past the index: loaded again.
        commit_unindexed(&store, &numbered_entry(2));
        commit_unindexed(&store, &numbered_entry(3));
        let dropped = store.compact_to(store.read_meta_u64(KEY_REVISION).unwrap()).unwrap();
        assert_eq!(dropped, 4);
        assert_eq!(store.index().revision(), at);
        store.catch_up_index().unwrap();
        assert_index_is_the_store(&store, "after a catch-up past a compaction");
        assert_eq!(store.index().len(), 3);
    }

    fn node(n: usize) -> AttestedNode {
        AttestedNode {
            spiffe_id: id(&format!("spiffe://example.org/tessera/agent/join_token/n{n}")),
            attestation_type: "join_token".into(),
            serial: format!("{n:02x}"),
            new_serial: None,
            expires_at: 1,
            banned: false,
            selectors: SelectorSet::parse_all(&[format!("spiffe_id:n{n}").as_str()]).unwrap(),
            can_reattest: false,
        }
    }

    fn numbered_entry(n: usize) -> RegistrationEntry {
        let mut e = entry(&format!("e{n}"));
        e.spiffe_id = id(&format!("spiffe://example.org/w{n}"));
        e
    }

    fn token(n: usize) -> JoinToken {
        JoinToken { token: format!("t{n}"), expires_at: 10, alias_spiffe_id: None }
    }

    /// Waits until `done` holds (no time limit: a bug shows as a hang the harness reports).
    fn wait_until(done: impl Fn() -> bool) {
        while !done() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Removes the records with these keys by hand, bypassing the store, and opens it again.
    fn remove_records_and_reopen(store: SledDataStore, dir: &Path, keys: &[&str]) -> SledDataStore {
        for key in keys {
            store.trees.entries.remove(key).unwrap();
        }
        store.flush().unwrap();
        drop(store);
        open(dir)
    }

    /// sled's flush stops at `sync_file_range`; every flush that acknowledges writes is followed
    /// by an `fdatasync` of the file sled writes its log to, the store's `db` file.
    #[test]
    fn every_flush_ends_with_an_fdatasync_of_the_file_sled_logs_to() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let log = std::fs::metadata(dir.path().join("db")).unwrap();
        let synced = store.log_file.metadata().unwrap();
        assert_eq!((synced.dev(), synced.ino()), (log.dev(), log.ino()), "the synced file is not sled's log");

        let (flushes, syncs) = (store.flushes(), store.log_syncs());
        store.create_entry(&numbered_entry(1)).unwrap();
        store.create_attested_node(&node(2)).unwrap();
        std::thread::scope(|scope| {
            for n in 3..11 {
                let store = &store;
                scope.spawn(move || store.create_entry(&numbered_entry(n)).unwrap());
            }
        });
        let flushed = store.flushes() - flushes;
        assert!(flushed >= 3, "{flushed} flushes for ten writes in three rounds");
        assert_eq!(store.log_syncs() - syncs, flushed, "a flush without its fdatasync");
    }

    /// A value larger than a quarter of sled's segment goes to a file of its own under
    /// `blobs/`, which sled does not sync: the flush syncs it, once.
    #[test]
    fn the_flush_syncs_the_blob_files_sled_writes_for_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let blobs = || std::fs::read_dir(dir.path().join("blobs")).unwrap().count();
        assert_eq!(blobs(), 0);
        store.trees.meta.insert(b"large value", vec![7_u8; 200 * 1024]).unwrap();
        store.flush().unwrap();
        assert!(blobs() >= 1, "sled kept the large value in its log: the test no longer writes a blob");
        let synced = store.synced_blobs.lock().unwrap().clone();
        assert_eq!(synced.len(), blobs(), "every blob file is synced by the flush");
        store.flush().unwrap();
        assert_eq!(*store.synced_blobs.lock().unwrap(), synced, "a blob is synced once");
    }

    /// Transactional writes queued while a shared transaction runs share the next one and its
    /// flush, and every acknowledged write is on disk (found after the store is closed and
    /// opened again).
    #[test]
    fn concurrent_writes_share_one_transaction_and_flush_and_every_acknowledged_write_is_durable() {
        const WRITERS: usize = 24;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for n in (2..WRITERS).step_by(3) {
            store.create_join_token(&token(n)).unwrap();
        }
        let (flushes, transactions) = (store.flushes(), store.transactions());
        std::thread::scope(|scope| {
            let held = store.batcher.hold();
            let writers: Vec<_> = (0..WRITERS)
                .map(|n| {
                    let store = &store;
                    scope.spawn(move || match n % 3 {
                        0 => store.create_entry(&numbered_entry(n)).map(drop),
                        1 => store.create_attested_node(&node(n)),
                        _ => store.consume_join_token(&format!("t{n}"), 0).map(drop),
                    })
                })
                .collect();
            wait_until(|| store.batcher.queued() == WRITERS);
            // Nothing is acknowledged before its flush: entry subscribers have not been told.
            assert_eq!(*store.subscribe().borrow(), 0);
            drop(held);
            for writer in writers {
                writer.join().unwrap().unwrap();
            }
        });
        assert_eq!(store.transactions() - transactions, 1, "{WRITERS} queued writes took more than one transaction");
        assert_eq!(store.flushes() - flushes, 1, "{WRITERS} writes in one transaction took more than one flush");
        let entry_writes = WRITERS.div_ceil(3) as u64;
        assert_eq!(*store.subscribe().borrow(), entry_writes);
        drop(store);

        let store = open(dir.path());
        for n in 0..WRITERS {
            match n % 3 {
                0 => assert_eq!(
                    store.get_entry(&format!("e{n}")).unwrap().unwrap().spiffe_id,
                    numbered_entry(n).spiffe_id
                ),
                1 => assert_eq!(store.get_attested_node(&node(n).spiffe_id).unwrap(), Some(node(n))),
                _ => assert!(
                    matches!(store.consume_join_token(&format!("t{n}"), 0), Err(DataStoreError::TokenNotFound)),
                    "token t{n} consumed again after the restart"
                ),
            }
        }
        assert_eq!(store.current_revision().unwrap(), entry_writes);
        let page = store.list_attested_nodes(&NodeFilter::default(), &PageRequest::all()).unwrap();
        assert_eq!(page.items.len(), WRITERS / 3);
    }

    /// In one shared transaction a refused write refuses alone, and a write that cannot commit
    /// (a corrupt record) fails alone: the others are written as if each had its own
    /// transaction.
    #[test]
    fn a_refused_or_failing_write_in_a_shared_transaction_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_entry(&numbered_entry(9)).unwrap();
        store.trees.entries.insert("e9", &[1, 0xff, 0xff][..]).unwrap();
        store.flush().unwrap();
        // Found corrupt by the entry index at open.
        drop(store);
        let store = open(dir.path());
        let transactions = store.transactions();
        std::thread::scope(|scope| {
            let held = store.batcher.hold();
            let store = &store;
            let first = scope.spawn(move || store.create_entry(&numbered_entry(1)));
            wait_until(|| store.batcher.queued() == 1);
            let duplicate = scope.spawn(move || store.create_entry(&numbered_entry(1)));
            wait_until(|| store.batcher.queued() == 2);
            let corrupt = scope.spawn(move || store.delete_entry("e9"));
            wait_until(|| store.batcher.queued() == 3);
            let second = scope.spawn(move || store.create_entry(&numbered_entry(2)));
            wait_until(|| store.batcher.queued() == 4);
            drop(held);
            assert_eq!(first.join().unwrap().unwrap().revision, 2);
            assert!(matches!(duplicate.join().unwrap(), Err(DataStoreError::AlreadyExists { .. })));
            assert_corrupt(corrupt.join().unwrap(), ENTRIES);
            assert_eq!(second.join().unwrap().unwrap().revision, 3);
        });
        assert_eq!(store.transactions() - transactions, 1);
        let revisions: Vec<u64> = store.changes_since(0, 10).unwrap().iter().map(|c| c.revision).collect();
        assert_eq!(revisions, [1, 2, 3], "the failed delete must log no change");
        assert_corrupt(store.get_entry("e9"), ENTRIES);
        assert!(store.get_entry("e1").unwrap().is_some() && store.get_entry("e2").unwrap().is_some());
        // The index took the two writes of the transactions that committed, not the create
        // the dropped shared transaction had made before the corrupt record aborted it.
        assert_eq!(store.handed_to_index.load(Ordering::Relaxed), 2);
        assert_eq!(store.read_back_to_index.load(Ordering::Relaxed), 0);
        let index = store.index();
        assert_eq!(index.revision(), 3);
        assert_eq!(index.get("e1").unwrap().revision, 2);
        assert_eq!(index.get("e2").unwrap().revision, 3);
        assert!(index.get("e9").is_none() && index.has_corrupt());
    }

    /// A round whose changes do not follow the index's revision (an earlier write the index
    /// has not taken, as after a failed flush) catches up from the change log, reading each
    /// entry back as stored, its own changes included.
    #[test]
    fn a_round_after_a_write_the_index_lacks_catches_up_from_the_change_log() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create_entry(&numbered_entry(1)).unwrap();
        let mut moved = numbered_entry(1);
        moved.parent_id = id("spiffe://example.org/elsewhere");
        commit_unindexed(&store, &moved);
        assert_eq!((store.handed_to_index.load(Ordering::Relaxed), store.index().revision()), (1, 1));
        let second = store.create_entry(&numbered_entry(2)).unwrap();
        assert_eq!(second.revision, 3);
        assert_eq!(store.handed_to_index.load(Ordering::Relaxed), 1);
        assert_eq!(store.read_back_to_index.load(Ordering::Relaxed), 2);
        assert_eq!(store.get_entry("e1").unwrap().unwrap().parent_id, moved.parent_id);
        assert_index_is_the_store(&store, "after the catch-up");
        // The index follows on again from the writes as written.
        store.delete_entry("e1").unwrap();
        assert_eq!(store.handed_to_index.load(Ordering::Relaxed), 2);
        assert_eq!(store.read_back_to_index.load(Ordering::Relaxed), 2);
        assert_index_is_the_store(&store, "after a delete");
    }

    /// Writes outside transactions (join token creation, JWT IDs) share flushes too.
    #[test]
    fn writes_that_complete_during_a_flush_share_the_next() {
        const WRITERS: usize = 16;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let flushes = store.flushes();
        std::thread::scope(|scope| {
            let held = store.commit.hold_flush();
            let writers: Vec<_> = (0..WRITERS)
                .map(|n| {
                    let store = &store;
                    scope.spawn(move || {
                        if n % 2 == 0 {
                            store.create_join_token(&token(n))
                        } else {
                            assert!(store.insert_jti_if_absent("https://issuer", &format!("j{n}"), 10)?);
                            Ok(())
                        }
                    })
                })
                .collect();
            wait_until(|| store.commit.completed_writes() == WRITERS as u64);
            drop(held);
            for writer in writers {
                writer.join().unwrap().unwrap();
            }
        });
        assert_eq!(store.flushes() - flushes, 1);
        drop(store);
        let store = open(dir.path());
        for n in 0..WRITERS {
            if n % 2 == 0 {
                assert!(store.consume_join_token(&format!("t{n}"), 0).is_ok(), "token t{n} lost");
            } else {
                assert!(
                    !store.insert_jti_if_absent("https://issuer", &format!("j{n}"), 10).unwrap(),
                    "JWT ID j{n} lost"
                );
            }
        }
    }

    /// One writer at a time: one flush per write, and a write that writes nothing none.
    #[test]
    fn a_lone_writer_flushes_once_per_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let before = store.flushes();
        store.create_entry(&entry("e1")).unwrap();
        assert_eq!(store.flushes() - before, 1);
        assert!(store.create_entry(&entry("e1")).is_err());
        assert!(store.consume_join_token("missing", 0).is_err());
        assert_eq!(store.prune_jtis(u64::MAX).unwrap(), 0);
        assert_eq!(store.flushes() - before, 1, "refused writes and empty prunes flushed");
        store.delete_entry("e1").unwrap();
        assert_eq!(store.flushes() - before, 2);
    }

    #[test]
    fn the_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/datastore");
        let _store = open(&path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
