//! Hydration: loading every stored entry into the entry index when the store opens (issue 7,
//! S9: a million entries in under 5 s).
//!
//! Three stages run at once: one thread walks the `entries` tree and hands out chunks of
//! raw records in key order, one decoding thread per core turns chunks into entries, and the
//! calling thread adds the decoded chunks to the index in key order. Walking sled's tree and
//! adding to the index are each one thread's work; decoding, the larger part of the cost per
//! entry, is shared by every core. A store of at most one chunk is loaded on the calling
//! thread alone.
//!
//! Memory stays bounded by the channels (a few chunks in flight per decoding thread) plus
//! the decoded chunks waiting for an earlier, slower one, which the index would hold anyway.

use std::collections::BTreeMap;
use std::num::NonZero;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Mutex, PoisonError};

use sled::IVec;

use super::super::entry_index::EntryIndex;
use super::super::types::RegistrationEntry;
use super::{DataStoreError, KEY_REVISION, Result, SledDataStore, decode_entry, storage};

/// Records per chunk handed to a decoding thread.
pub(super) const CHUNK: usize = 2048;

/// Most decoding threads, whatever the number of cores.
const MAX_DECODERS: usize = 8;

/// Raw records of the `entries` tree, in key order.
type RawChunk = Vec<(IVec, IVec)>;

/// What one record decodes to: the entry, or the record's key and the reason it is corrupt.
type Decoded = std::result::Result<RegistrationEntry, (Vec<u8>, DataStoreError)>;

fn decode_record(key: &[u8], bytes: &[u8]) -> Decoded {
    decode_entry(key, bytes).map_err(|err| (key.to_vec(), err))
}

/// Adds a decoded record to the index: the entry, or a note that it is corrupt.
fn add(index: &mut EntryIndex, record: Decoded) {
    match record {
        Ok(entry) => index.insert(entry),
        Err((key, err)) => {
            tracing::error!(error = %err, "a stored registration entry does not decode; it is not authorized for any agent");
            index.mark_corrupt(key);
        }
    }
}

impl SledDataStore {
    /// Every stored entry, decoded, at the current revision (no write may run meanwhile:
    /// at open, or under the index's write lock from the writer's leader). A record that does
    /// not decode is noted as corrupt, not loaded, with the parents its unique key names: the
    /// reads that could meet it report it.
    pub(super) fn hydrate(&self) -> Result<EntryIndex> {
        let decoders = std::thread::available_parallelism().map_or(1, NonZero::get).min(MAX_DECODERS);
        self.hydrate_with(CHUNK, decoders)
    }

    /// [`Self::hydrate`] with chunks of `chunk` records and `decoders` decoding threads.
    pub(super) fn hydrate_with(&self, chunk: usize, decoders: usize) -> Result<EntryIndex> {
        let mut index = self.hydrate_records(chunk, decoders)?;
        self.locate_corrupt(&mut index)?;
        Ok(index)
    }

    /// [`Self::hydrate_with`] but for the parents of corrupt records.
    fn hydrate_records(&self, chunk: usize, decoders: usize) -> Result<EntryIndex> {
        let chunk = chunk.max(1);
        let mut index = EntryIndex::new(self.read_meta_u64(KEY_REVISION)?, []);
        let mut records = self.trees.entries.iter();
        let first: RawChunk = records.by_ref().take(chunk).collect::<sled::Result<_>>().map_err(storage("read"))?;
        if first.len() < chunk {
            for (key, bytes) in &first {
                add(&mut index, decode_record(key, bytes));
            }
            return Ok(index);
        }
        let decoders = decoders.max(1);
        let (raw_tx, raw_rx) = sync_channel::<(usize, RawChunk)>(decoders * 2);
        let (decoded_tx, decoded_rx) = sync_channel::<(usize, Vec<Decoded>)>(decoders * 2);
        let raw_rx = Mutex::new(raw_rx);
        std::thread::scope(|scope| {
            let reader = scope.spawn(move || read_chunks(first, records, chunk, &raw_tx));
            for _ in 0..decoders {
                let decoded_tx = decoded_tx.clone();
                let raw_rx = &raw_rx;
                scope.spawn(move || decode_chunks(raw_rx, &decoded_tx));
            }
            // Ends once every decoder has stopped, which they do once the reader has.
            drop(decoded_tx);
            add_in_order(&mut index, &decoded_rx);
            // A reader that failed stopped early: its error, not a partial index.
            reader.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        Ok(index)
    }
}

/// The reader: `first`, then the rest of `records` in chunks of `chunk`, numbered in order.
/// Stops at a storage error (returned) or when the decoders are gone.
fn read_chunks(
    first: RawChunk,
    records: sled::Iter,
    chunk: usize,
    raw_tx: &SyncSender<(usize, RawChunk)>,
) -> Result<()> {
    if raw_tx.send((0, first)).is_err() {
        return Ok(());
    }
    let mut records = records.peekable();
    let mut seq = 1;
    while records.peek().is_some() {
        let next: RawChunk = records.by_ref().take(chunk).collect::<sled::Result<_>>().map_err(storage("read"))?;
        if raw_tx.send((seq, next)).is_err() {
            return Ok(());
        }
        seq += 1;
    }
    Ok(())
}

/// A decoder: decodes chunks until the reader is done.
fn decode_chunks(raw_rx: &Mutex<Receiver<(usize, RawChunk)>>, decoded_tx: &SyncSender<(usize, Vec<Decoded>)>) {
    loop {
        let next = raw_rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((seq, raw)) = next else {
            return;
        };
        let decoded = raw.iter().map(|(key, bytes)| decode_record(key, bytes)).collect();
        if decoded_tx.send((seq, decoded)).is_err() {
            return;
        }
    }
}

/// Adds the decoded chunks to `index` in chunk order, holding back any that arrive early.
fn add_in_order(index: &mut EntryIndex, decoded_rx: &Receiver<(usize, Vec<Decoded>)>) {
    let mut waiting = BTreeMap::new();
    let mut next = 0;
    for (seq, chunk) in decoded_rx {
        waiting.insert(seq, chunk);
        while let Some(chunk) = waiting.remove(&next) {
            chunk.into_iter().for_each(|record| add(index, record));
            next += 1;
        }
    }
}
