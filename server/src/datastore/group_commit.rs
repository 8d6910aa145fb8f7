//! Group commit: concurrent durable writes share one flush.
//!
//! A durable write has two halves: the write itself (a sled transaction, fast, in memory) and
//! the flush that makes it survive a crash (an `fsync`-class call, hundreds of microseconds).
//! Flushing once per write caps the store at one write per flush, whatever the number of
//! writers. Here every writer does its write, takes a *ticket* (the count of writes completed
//! so far, its own included) and waits until a flush covers that ticket:
//!
//! - when no flush is running, the waiting writer becomes the *leader*: it first lets the
//!   writes that had already begun finish (so one flush covers them as well; bounded by
//!   [`GATHER_LIMIT`]), then notes the highest ticket handed out and flushes. A flush makes
//!   durable every write completed before it started, so afterwards every ticket up to the
//!   noted one is durable;
//! - every other writer waits for that flush, or, when its ticket came after the noted one,
//!   for the next (which one of them leads).
//!
//! A write is acknowledged (the datastore call returns `Ok`) only once a flush that started
//! after the write completed has succeeded. A failed flush fails every write it was to cover;
//! a panicking one as well (the state is restored, no waiter is left hanging).
//!
//! The number of flushes is counted ([`GroupCommit::flushes`]) so tests can check that N
//! concurrent writes cost fewer than N flushes without measuring time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::error::DataStoreError;

/// The longest a leader waits for writes already under way before it flushes. Only a bound
/// for the case of a slow write: a write of the ordinary kind completes in microseconds.
pub(super) const GATHER_LIMIT: Duration = Duration::from_millis(5);

/// Shares flushes between concurrent writers; see the [module docs](self).
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    state: Mutex<State>,
    /// Signalled when a write ends (the gathering leader waits on it).
    write_ended: Condvar,
    /// Signalled when a flush ends (its followers wait on it).
    flush_ended: Condvar,
    flushes: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Writes begun so far.
    begun: u64,
    /// Writes that completed or gave up so far.
    ended: u64,
    /// Tickets handed out (writes completed) so far: the last ticket.
    completed: u64,
    /// Every ticket up to this one is durable.
    durable: u64,
    /// A leader is gathering or flushing.
    leading: bool,
    /// The latest failed flush: the last ticket it was to cover and why it failed.
    failed: Option<(u64, String)>,
}

/// A write under way; [`Write::completed`] turns it into a ticket. Dropped without that (the
/// write failed or wrote nothing), it only ends.
#[derive(Debug)]
#[must_use = "a write must be completed and made durable, or dropped when it wrote nothing"]
pub(super) struct Write<'a> {
    commit: &'a GroupCommit,
    ended: bool,
}

/// A completed write, to be made durable with [`GroupCommit::wait_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[must_use = "a completed write is not acknowledged before it is durable"]
pub(super) struct Ticket(u64);

impl Write<'_> {
    /// The write has completed (it is visible to readers): its ticket.
    pub(super) fn completed(mut self) -> Ticket {
        self.ended = true;
        let mut state = self.commit.lock();
        state.ended += 1;
        state.completed += 1;
        let ticket = Ticket(state.completed);
        drop(state);
        self.commit.write_ended.notify_all();
        ticket
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.commit.lock().ended += 1;
            self.commit.write_ended.notify_all();
        }
    }
}

/// Restores the state if a leader's flush panics: the round counts as failed, followers wake.
struct Leading<'a> {
    commit: &'a GroupCommit,
    target: u64,
    done: bool,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut state = self.commit.lock();
            state.leading = false;
            state.failed = Some((self.target, "the flush panicked".to_owned()));
            drop(state);
            self.commit.flush_ended.notify_all();
        }
    }
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Announces a write about to be made (call it right before the write, not before reads
    /// that precede it: a leader may wait for it).
    pub(super) fn begin(&self) -> Write<'_> {
        self.lock().begun += 1;
        Write { commit: self, ended: false }
    }

    /// How many flushes ran so far.
    pub(super) fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Returns once a flush covering `ticket` succeeded, running that flush (`flush`) when it
    /// is this writer's turn to lead; an error when the flush that was to cover it failed.
    pub(super) fn wait_durable(
        &self,
        ticket: Ticket,
        flush: impl FnOnce() -> Result<(), DataStoreError>,
    ) -> Result<(), DataStoreError> {
        let Ticket(ticket) = ticket;
        let mut state = self.lock();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if let Some((up_to, why)) = &state.failed
                && *up_to >= ticket
            {
                return Err(DataStoreError::backend("flush", SharedFailure(why.clone())));
            }
            if !state.leading {
                break;
            }
            state = self.flush_ended.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
        // This writer leads the next flush. First the writes already under way, so that this
        // flush covers them too.
        state.leading = true;
        let horizon = state.begun;
        let deadline = Instant::now() + GATHER_LIMIT;
        while state.ended < horizon {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            state = self.write_ended.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        let target = state.completed;
        drop(state);
        let mut leading = Leading { commit: self, target, done: false };
        let outcome = flush();
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        leading.done = true;
        state.leading = false;
        let result = match outcome {
            Ok(()) => {
                state.durable = state.durable.max(target);
                Ok(())
            }
            Err(err) => {
                state.failed = Some((target, error_chain(&err)));
                Err(err)
            }
        };
        drop(state);
        self.flush_ended.notify_all();
        result
    }
}

/// Test support: holds the leader's role, as a flush that takes as long as the test wants
/// would, so writers pile up behind it deterministically.
#[cfg(test)]
pub(super) struct HeldFlush<'a>(&'a GroupCommit);

#[cfg(test)]
impl GroupCommit {
    /// Takes the leader's role until the returned value is dropped (none may be held).
    pub(super) fn hold_flush(&self) -> HeldFlush<'_> {
        let mut state = self.lock();
        assert!(!state.leading, "a flush is running");
        state.leading = true;
        HeldFlush(self)
    }

    /// Writes completed so far.
    pub(super) fn completed_writes(&self) -> u64 {
        self.lock().completed
    }
}

#[cfg(test)]
impl Drop for HeldFlush<'_> {
    fn drop(&mut self) {
        self.0.lock().leading = false;
        self.0.flush_ended.notify_all();
    }
}

/// `err` and its sources, one line.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A failure shared by the writes of one flush (or one shared transaction): the writer that
/// met it gets the original error, the others this, with its text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct SharedFailure(pub(super) String);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, mpsc};

    /// Waits until `done` holds (no time limit: a bug shows as a hang the harness reports).
    fn wait_until(commit: &GroupCommit, done: impl Fn(&State) -> bool) {
        while !done(&commit.lock()) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_writer_flushes_once_per_write() {
        let commit = GroupCommit::default();
        for n in 1..=3 {
            let ticket = commit.begin().completed();
            commit.wait_durable(ticket, || Ok(())).unwrap();
            assert_eq!(commit.flushes(), n);
        }
        // A write that wrote nothing costs no flush.
        drop(commit.begin());
        assert_eq!(commit.flushes(), 3);
    }

    /// While one flush runs, N more writers complete; the next single flush covers them all.
    #[test]
    fn writers_that_complete_during_a_flush_share_the_next() {
        const WRITERS: usize = 16;
        let commit = Arc::new(GroupCommit::default());
        let (release, blocked) = mpsc::channel::<()>();
        let first = {
            let commit = Arc::clone(&commit);
            std::thread::spawn(move || {
                let ticket = commit.begin().completed();
                commit.wait_durable(ticket, move || {
                    blocked.recv().unwrap();
                    Ok(())
                })
            })
        };
        wait_until(&commit, |s| s.leading && s.completed == 1);
        let flushed_with = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (commit, flushed_with) = (Arc::clone(&commit), Arc::clone(&flushed_with));
                std::thread::spawn(move || {
                    let ticket = commit.begin().completed();
                    commit.wait_durable(ticket, || {
                        flushed_with.lock().unwrap().push(commit.lock().completed);
                        Ok(())
                    })
                })
            })
            .collect();
        wait_until(&commit, |s| s.completed == 1 + WRITERS as u64);
        release.send(()).unwrap();
        first.join().unwrap().unwrap();
        for writer in writers {
            writer.join().unwrap().unwrap();
        }
        assert_eq!(commit.flushes(), 2, "{WRITERS} writers behind one flush needed one more");
        assert_eq!(*flushed_with.lock().unwrap(), [1 + WRITERS as u64]);
        assert_eq!(commit.lock().durable, 1 + WRITERS as u64);
    }

    /// A leader lets the writes already begun complete before it flushes.
    #[test]
    fn a_leader_waits_for_the_writes_under_way() {
        let commit = Arc::new(GroupCommit::default());
        let slow = commit.begin();
        let leader = {
            let commit = Arc::clone(&commit);
            std::thread::spawn(move || {
                let ticket = commit.begin().completed();
                commit.wait_durable(ticket, || Ok(()))
            })
        };
        wait_until(&commit, |s| s.leading);
        let ticket = slow.completed();
        // Either the leader saw the slow write complete in time (one flush for both) or its
        // bound ran out first (then this writer leads the second); either way both are durable.
        leader.join().unwrap().unwrap();
        commit.wait_durable(ticket, || Ok(())).unwrap();
        assert!(commit.flushes() <= 2);
        assert_eq!(commit.lock().durable, 2);
    }

    #[test]
    fn a_failed_flush_fails_every_write_it_covered_and_the_next_flush_runs_again() {
        const WRITERS: usize = 8;
        let commit = Arc::new(GroupCommit::default());
        let start = Arc::new(Barrier::new(WRITERS));
        // Every writer completes before any waits, so the first flush covers all of them.
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (commit, start) = (Arc::clone(&commit), Arc::clone(&start));
                std::thread::spawn(move || {
                    let ticket = commit.begin().completed();
                    start.wait();
                    commit.wait_durable(ticket, || {
                        Err(DataStoreError::backend("flush", SharedFailure("disk full".into())))
                    })
                })
            })
            .collect();
        for writer in writers {
            let err = writer.join().unwrap().unwrap_err();
            assert!(error_chain(&err).contains("disk full"), "{err:?}");
        }
        assert_eq!(commit.flushes(), 1);
        assert_eq!(commit.lock().durable, 0);
        let ticket = commit.begin().completed();
        commit.wait_durable(ticket, || Ok(())).unwrap();
        assert_eq!(commit.lock().durable, WRITERS as u64 + 1);
    }

    #[test]
    fn a_panicking_flush_leaves_no_writer_hanging() {
        let commit = Arc::new(GroupCommit::default());
        let ticket = commit.begin().completed();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = commit.wait_durable(ticket, || panic!("flush bug"));
        }));
        assert!(panicked.is_err());
        let state = commit.lock();
        assert!(!state.leading);
        assert_eq!(state.failed.as_ref().map(|f| f.0), Some(1));
        drop(state);
        let ticket = commit.begin().completed();
        commit.wait_durable(ticket, || Ok(())).unwrap();
    }
}
