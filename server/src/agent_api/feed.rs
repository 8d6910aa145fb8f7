//! The entry change log, read once for every open sync stream.
//!
//! Every entry write moves the datastore's revision, and every open `SyncEntries` stream is
//! woken by it. Each stream used to read the change log and every changed entry from the
//! datastore itself (a hop to the blocking pool, a log read and an entry read and decode per
//! stream), so one entry write cost N reads with N agents connected, and a fleet in which
//! entries are created while agents are connected cost O(N²) (issue 7). Here the first
//! stream to need a range of the log reads it, with the entries it names, into a window of
//! recent changes shared by all streams ([`ChangeFeed`]); the others take the changes from the
//! window. A stream then looks at each change with
//! [`AuthorizedSet::concerns`](super::authz::AuthorizedSet::concerns), a few in-memory
//! lookups: only when a change concerns it does it move its set forward through the datastore
//! as before, so the result is the computed set exactly as before. Changes that concern no
//! stream cost each stream no datastore read at all.
//!
//! The window holds the last [`WINDOW`] changes, contiguous. A stream further behind (or any
//! failure to read) falls back to reading the log itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::datastore::{ChangeKind, DataStore, DataStoreError, SharedEntry, blocking};

/// Changes kept in the window.
pub(crate) const WINDOW: usize = 4096;
/// Changes read from the log per datastore call.
const PAGE: usize = 1000;

/// One change of the log, with the entry as read after the change (`None`: deleted since, or a
/// deletion).
#[derive(Debug)]
pub(crate) struct ResolvedChange {
    pub(crate) revision: u64,
    pub(crate) entry_id: String,
    /// Shared with the store's entry index (see `datastore/entry_index.rs`).
    pub(crate) entry: Option<Arc<SharedEntry>>,
}

/// The shared window of recent changes; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct ChangeFeed {
    window: tokio::sync::Mutex<Window>,
    /// Datastore reads (log pages and entries) so far, for tests.
    reads: AtomicU64,
}

#[derive(Debug, Default)]
struct Window {
    /// The changes after `base`, contiguous up to the last one's revision.
    changes: VecDeque<Arc<ResolvedChange>>,
    /// Revision before the first change held (every change up to it was dropped).
    base: Option<u64>,
}

impl Window {
    fn last(&self) -> Option<u64> {
        self.changes.back().map(|c| c.revision).or(self.base)
    }
}

impl ChangeFeed {
    /// Datastore reads so far.
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The changes after `since`, through at least `until` when the log holds them; `None`
    /// when the window cannot give them (older than the window, the log compacted, a read
    /// failed): the caller reads the log itself.
    pub(crate) async fn since(
        &self,
        store: &Arc<dyn DataStore>,
        since: u64,
        until: u64,
    ) -> Option<Vec<Arc<ResolvedChange>>> {
        if until.saturating_sub(since) > WINDOW as u64 {
            return None;
        }
        let mut window = self.window.lock().await;
        let base = *window.base.get_or_insert(since);
        if since < base {
            return None;
        }
        if window.last().is_some_and(|last| last < until) {
            let last = window.last().unwrap_or(base);
            match self.read(store, last, until).await {
                Ok(read) => {
                    window.changes.extend(read);
                    while window.changes.len() > WINDOW {
                        if let Some(dropped) = window.changes.pop_front() {
                            window.base = Some(dropped.revision);
                        }
                    }
                }
                Err(err) => {
                    if matches!(err, DataStoreError::ResyncRequired { .. }) {
                        // The log moved past the window: start again from the current revision.
                        *window = Window::default();
                    }
                    tracing::debug!(error = %err, "shared change window not filled; streams read the log themselves");
                    return None;
                }
            }
        }
        let base = window.base.unwrap_or(since);
        if since < base {
            return None;
        }
        let skip = usize::try_from(since - base).unwrap_or(usize::MAX);
        Some(window.changes.iter().skip(skip).cloned().collect())
    }

    /// The changes after `last` through at least `until` (or as far as the log goes), each with
    /// its entry.
    async fn read(
        &self,
        store: &Arc<dyn DataStore>,
        last: u64,
        until: u64,
    ) -> crate::datastore::Result<Vec<Arc<ResolvedChange>>> {
        let reads = blocking(store, move |store| {
            let mut out = Vec::new();
            let mut at = last;
            let mut reads = 0u64;
            while at < until {
                let page = store.changes_since(at, PAGE)?;
                reads += 1;
                if page.is_empty() {
                    break;
                }
                for change in page {
                    let entry = match change.kind {
                        ChangeKind::Delete => None,
                        ChangeKind::Upsert => {
                            reads += 1;
                            store.get_entry_shared(&change.entry_id)?
                        }
                    };
                    at = change.revision;
                    out.push(Arc::new(ResolvedChange { revision: change.revision, entry_id: change.entry_id, entry }));
                }
            }
            Ok((out, reads))
        })
        .await?;
        self.reads.fetch_add(reads.1, Ordering::Relaxed);
        Ok(reads.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDataStore;
    use crate::datastore::RegistrationEntry;
    use tessera_spiffe::{SelectorSet, SpiffeId};

    fn write(store: &dyn DataStore, n: usize) {
        let entry = RegistrationEntry::new(
            format!("e{n}"),
            SpiffeId::parse(&format!("spiffe://example.org/w{n}")).unwrap(),
            SpiffeId::parse("spiffe://example.org/other-agent").unwrap(),
            SelectorSet::parse_all(&["unix:uid:1"]).unwrap(),
        );
        store.create_entry(&entry).unwrap();
    }

    /// Issue 7: the datastore reads behind a write are the same whether 2 or 200 streams
    /// follow it.
    #[tokio::test]
    async fn every_change_is_read_once_whatever_the_number_of_streams() {
        async fn reads_with(streams: usize) -> u64 {
            let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
            let feed = ChangeFeed::default();
            for round in 0..5 {
                let since = store.current_revision().unwrap();
                write(store.as_ref(), round * 2);
                store.delete_entry(&format!("e{}", round * 2)).unwrap();
                write(store.as_ref(), round * 2 + 1);
                let until = store.current_revision().unwrap();
                for _ in 0..streams {
                    let changes = feed.since(&store, since, until).await.unwrap();
                    let summary: Vec<(u64, bool)> = changes.iter().map(|c| (c.revision, c.entry.is_some())).collect();
                    assert_eq!(summary, [(since + 1, false), (since + 2, false), (since + 3, true)]);
                }
            }
            feed.reads()
        }
        let few = reads_with(2).await;
        let many = reads_with(200).await;
        assert!(few > 0, "the count must measure something");
        assert_eq!(many, few, "200 streams read {many} times, 2 streams {few}");
    }

    #[tokio::test]
    async fn the_window_refuses_what_it_does_not_hold() {
        let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::default());
        let feed = ChangeFeed::default();
        write(store.as_ref(), 0);
        assert_eq!(feed.since(&store, 0, 1).await.unwrap().len(), 1);
        write(store.as_ref(), 1);
        assert_eq!(feed.since(&store, 1, 2).await.unwrap().len(), 1);
        assert_eq!(feed.since(&store, 0, 2).await.unwrap().len(), 2, "the whole window");
        assert!(feed.since(&store, 0, 2 + WINDOW as u64).await.is_none(), "too far behind");
        // Compacted past the window: refused, then the window starts again.
        for n in 2..10 {
            write(store.as_ref(), n);
        }
        store.compact_changes(2).unwrap();
        assert!(feed.since(&store, 2, 10).await.is_none());
        assert_eq!(feed.since(&store, 8, 10).await.unwrap().len(), 2);
    }
}
