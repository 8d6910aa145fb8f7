//! Shared transactions: concurrent transactional writes of the sled store commit together.
//!
//! sled 0.34 runs every transaction under one process-wide lock and, at commit, rolls its
//! log buffer and writes a batch manifest: two log writes, each with a `sync_file_range`,
//! per transaction, whatever its size. Flushes shared through [`super::GroupCommit`] alone
//! therefore leave concurrent writers queued one transaction at a time (64 writers measured no
//! faster than one). Here a write is a *job* queued for the next shared transaction:
//!
//! - the first writer to find no transaction under way leads: it takes the queued jobs (at
//!   most [`MAX_JOBS`]), runs them one after the other in one transaction over every tree
//!   (each sees the writes of the jobs before it), makes the transaction durable through the
//!   group commit, and hands every job its outcome; the others wait for theirs;
//! - a job either writes (`Ok(Ok(value))`), refuses before writing anything (`Ok(Err(why))`:
//!   the entry exists, a compare-and-set lost...; the other jobs go on), or cannot commit
//!   (`Err(abort)`: a corrupt record, a storage error). In the last case the shared
//!   transaction is dropped and every job runs again in a transaction of its own, so a bad
//!   record fails only the write that met it, exactly as without sharing;
//! - a job's outcome is returned only after the flush covering the transaction succeeded; a
//!   failed flush fails every job that wrote.
//!
//! The writer's own code is unchanged in meaning: every datastore call still returns once its
//! own write is durable, with its own result.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sled::Transactional;
use sled::transaction::TransactionalTree;
use tessera_spiffe::SpiffeId;

use super::super::group_commit::{SharedFailure, error_chain};
use super::super::types::RegistrationEntry;
use super::{DataStoreError, EntryTx, NodeTx, Result, SledDataStore, Trees, TxResult, tx_error};

/// Most jobs in one shared transaction (bounds the transaction's memory).
pub(super) const MAX_JOBS: usize = 256;

/// The longest a leader waits for the queue to hold as many jobs as the last round took.
/// Writers whose jobs a round finished come back with their next write while the leader of
/// the next round would already run a transaction of one: without this wait, a steady load
/// of many writers alternates one full round with rounds of one or two (measured: about 9
/// jobs a round for 64 writers). A lone writer never waits (its last round took one job).
const GATHER_LIMIT: Duration = Duration::from_millis(2);

/// Every tree of the store, inside one transaction.
pub(super) struct Txn<'a> {
    pub(super) meta: &'a TransactionalTree,
    pub(super) entries: &'a TransactionalTree,
    pub(super) entry_unique: &'a TransactionalTree,
    pub(super) entry_changes: &'a TransactionalTree,
    pub(super) nodes: &'a TransactionalTree,
    pub(super) node_by_selector: &'a TransactionalTree,
    pub(super) join_tokens: &'a TransactionalTree,
    pub(super) bundles: &'a TransactionalTree,
    pub(super) ca_journal: &'a TransactionalTree,
    pub(super) federation: &'a TransactionalTree,
    /// The entry changes written so far in this attempt of the transaction, in revision order.
    pub(super) written: &'a RefCell<Vec<Written>>,
}

/// An entry change a transaction wrote: handed to the entry index once the transaction is
/// durable, so the index takes the round's writes without reading them back from sled.
// Deletes are the rare kind, and a boxed entry would cost one allocation per written entry.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Written {
    /// The entry as stored, at its revision.
    Put(RegistrationEntry),
    /// The entry with this ID was deleted at this revision.
    Delete { revision: u64, id: String },
}

impl Written {
    /// The revision of the change.
    pub(super) fn revision(&self) -> u64 {
        match self {
            Self::Put(entry) => entry.revision,
            Self::Delete { revision, .. } => *revision,
        }
    }
}

impl Txn<'_> {
    /// The entry trees.
    pub(super) fn entry(&self) -> EntryTx<'_> {
        EntryTx {
            entries: self.entries,
            unique: self.entry_unique,
            changes: self.entry_changes,
            meta: self.meta,
            written: self.written,
        }
    }

    /// The node trees.
    pub(super) fn node(&self) -> NodeTx<'_> {
        NodeTx { nodes: self.nodes, by_selector: self.node_by_selector }
    }
}

impl Trees {
    /// Runs `f` in one transaction over every tree (but the JWT ID cache, written without
    /// transactions). Once it committed, `written` holds the entry changes it wrote (those of
    /// the attempt that committed: sled may run `f` more than once).
    pub(super) fn transaction<T>(
        &self,
        written: &RefCell<Vec<Written>>,
        f: impl Fn(&Txn<'_>) -> TxResult<T>,
    ) -> sled::transaction::TransactionResult<T, DataStoreError> {
        (
            &self.meta,
            &self.entries,
            &self.entry_unique,
            &self.entry_changes,
            &self.nodes,
            &self.node_by_selector,
            &self.join_tokens,
            &self.bundles,
            &self.ca_journal,
            &self.federation,
        )
            .transaction(
                |(
                    meta,
                    entries,
                    entry_unique,
                    entry_changes,
                    nodes,
                    node_by_selector,
                    join_tokens,
                    bundles,
                    ca_journal,
                    federation,
                )| {
                    written.borrow_mut().clear();
                    f(&Txn {
                        meta,
                        entries,
                        entry_unique,
                        entry_changes,
                        nodes,
                        node_by_selector,
                        join_tokens,
                        bundles,
                        ca_journal,
                        federation,
                        written,
                    })
                },
            )
    }
}

/// What a job does inside the shared transaction (see the [module docs](self)).
pub(super) type Step<T> = TxResult<Result<T>>;

/// A queued write, its outcome hidden behind the trait so jobs of every type share a queue.
trait Job: Send + Sync {
    /// Runs the write in `tx`, keeping its outcome (a later run replaces it).
    fn apply(&self, tx: &Txn<'_>) -> TxResult<()>;
    /// Replaces the outcome with `err`.
    fn fail(&self, err: DataStoreError);
    /// Whether the kept outcome is a write (as opposed to a refusal or an error).
    fn wrote(&self) -> bool;
    /// The write's name, for storage errors.
    fn operation(&self) -> &'static str;
    /// The attested node the write is about, if any.
    fn node(&self) -> Option<&SpiffeId>;
    /// Set (under the batcher's lock) once the outcome is final.
    fn finished(&self) -> &AtomicBool;
}

struct TypedJob<T, F> {
    operation: &'static str,
    node: Option<SpiffeId>,
    apply: F,
    outcome: Mutex<Option<Result<T>>>,
    finished: AtomicBool,
}

impl<T, F> TypedJob<T, F> {
    fn outcome(&self) -> MutexGuard<'_, Option<Result<T>>> {
        self.outcome.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T, F> Job for TypedJob<T, F>
where
    T: Send,
    F: Fn(&Txn<'_>) -> Step<T> + Send + Sync,
{
    fn apply(&self, tx: &Txn<'_>) -> TxResult<()> {
        let outcome = (self.apply)(tx)?;
        *self.outcome() = Some(outcome);
        Ok(())
    }

    fn fail(&self, err: DataStoreError) {
        *self.outcome() = Some(Err(err));
    }

    fn wrote(&self) -> bool {
        matches!(*self.outcome(), Some(Ok(_)))
    }

    fn operation(&self) -> &'static str {
        self.operation
    }

    fn node(&self) -> Option<&SpiffeId> {
        self.node.as_ref()
    }

    fn finished(&self) -> &AtomicBool {
        &self.finished
    }
}

/// The queue of jobs and who leads; see the [module docs](self).
#[derive(Default)]
pub(super) struct Batcher {
    state: Mutex<BatchState>,
    /// Signalled when a shared transaction's jobs are finished.
    finished: Condvar,
    /// Signalled when a job is queued while a leader gathers.
    queued: Condvar,
    /// Shared transactions run so far.
    transactions: AtomicU64,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("transactions", &self.transactions).finish_non_exhaustive()
    }
}

#[derive(Default)]
struct BatchState {
    queue: Vec<Arc<dyn Job>>,
    leading: bool,
    /// A leader waits for more jobs (see [`GATHER_LIMIT`]).
    gathering: bool,
    /// How many jobs the last round took.
    last_round: usize,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shared transactions run so far.
    pub(super) fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Jobs queued and not yet taken by a leader (tests wait on it).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Takes the leader's role until the returned value is dropped, as a long transaction
    /// would (tests pile writers up behind it deterministically).
    #[cfg(test)]
    pub(super) fn hold(&self) -> HeldLead<'_> {
        let mut state = self.lock();
        assert!(!state.leading, "a shared transaction is under way");
        state.leading = true;
        HeldLead(self)
    }
}

/// See [`Batcher::hold`].
#[cfg(test)]
pub(super) struct HeldLead<'a>(&'a Batcher);

#[cfg(test)]
impl Drop for HeldLead<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
        self.0.finished.notify_all();
    }
}

/// Ends a leader's round even if a job panics: every job of the round is finished (failed if
/// it has no outcome yet) and the role released.
struct Round<'a> {
    batcher: &'a Batcher,
    jobs: Vec<Arc<dyn Job>>,
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        let mut state = self.batcher.lock();
        for job in &self.jobs {
            if std::thread::panicking() {
                job.fail(DataStoreError::backend(
                    job.operation(),
                    SharedFailure("a write in the shared transaction panicked".into()),
                ));
            }
            job.finished().store(true, Ordering::Release);
        }
        state.leading = false;
        drop(state);
        self.batcher.finished.notify_all();
    }
}

impl SledDataStore {
    /// Runs `apply` in the next shared transaction and returns its outcome once it is
    /// durable (see the [module docs](self)). `node` names the attested node the write is
    /// about: its generation moves after the transaction.
    pub(super) fn write<T, F>(&self, operation: &'static str, node: Option<SpiffeId>, apply: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(&Txn<'_>) -> Step<T> + Send + Sync + 'static,
    {
        let job =
            Arc::new(TypedJob { operation, node, apply, outcome: Mutex::new(None), finished: AtomicBool::new(false) });
        let batcher = &self.batcher;
        let mut state = batcher.lock();
        state.queue.push(Arc::clone(&job) as Arc<dyn Job>);
        if state.gathering {
            batcher.queued.notify_one();
        }
        while !job.finished.load(Ordering::Acquire) {
            if state.leading {
                state = batcher.finished.wait(state).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            state.leading = true;
            let target = state.last_round.min(MAX_JOBS);
            if state.queue.len() < target {
                state.gathering = true;
                let deadline = Instant::now() + GATHER_LIMIT;
                while state.queue.len() < target {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
                    state = batcher.queued.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
                }
                state.gathering = false;
            }
            let take = state.queue.len().min(MAX_JOBS);
            state.last_round = take;
            let round = Round { batcher, jobs: state.queue.drain(..take).collect() };
            drop(state);
            self.run_round(&round.jobs);
            drop(round);
            state = batcher.lock();
        }
        drop(state);
        let outcome = job.outcome().take();
        outcome.unwrap_or_else(|| {
            Err(DataStoreError::backend(operation, SharedFailure("the write has no outcome".into())))
        })
    }

    /// One leader's round: the jobs in one transaction (or each in its own when that one
    /// cannot commit), then one durable flush.
    fn run_round(&self, jobs: &[Arc<dyn Job>]) {
        self.batcher.transactions.fetch_add(1, Ordering::Relaxed);
        let pending = self.commit.begin();
        let written = RefCell::new(Vec::new());
        let shared = self.trees.transaction(&written, |tx| jobs.iter().try_for_each(|job| job.apply(tx)));
        // The entry changes of the transactions that committed, in revision order.
        let mut changes = Vec::new();
        match shared {
            Ok(()) => changes = written.take(),
            Err(err) => match jobs {
                [job] => job.fail(tx_error(job.operation())(err)),
                _ => {
                    for job in jobs {
                        match self.trees.transaction(&written, |tx| job.apply(tx)) {
                            Ok(()) => changes.append(&mut written.borrow_mut()),
                            Err(err) => job.fail(tx_error(job.operation())(err)),
                        }
                    }
                }
            },
        }
        // Moved after any attempt, committed or not: a spurious move only costs a re-read.
        for node in jobs.iter().filter_map(|job| job.node()) {
            self.node_written(node);
        }
        if !jobs.iter().any(|job| job.wrote()) {
            return;
        }
        // Once durable, and before any write is acknowledged, the entry index takes the round's
        // entry writes: readers see only durable writes, and every acknowledged one. Should
        // the flush or the catch-up fail, the index (and the revision readers see) stays where
        // it was, the writes fail, and the next round's catch-up takes them from the change log.
        let durable = self.commit.wait_durable(pending.completed(), || self.flush());
        if let Err(err) = durable.and_then(|()| self.index_written(changes)) {
            let why = error_chain(&err);
            for job in jobs.iter().filter(|job| job.wrote()) {
                job.fail(DataStoreError::backend(job.operation(), SharedFailure(why.clone())));
            }
        }
    }
}
