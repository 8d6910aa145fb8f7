#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Issue 7, bench A7: the heap the agent holds per cached X.509-SVID.
//!
//! The manager's state is driven the way the sync and mint tasks drive it (one upsert per
//! entry, a snapshot published after each, then an SVID per entry in batches, a snapshot
//! published after each batch) and the live heap is read from dhat's counting allocator
//! before and after. Bytes and blocks are counted, nothing is timed; the counts move by about
//! a byte and 0.01 blocks per entry between runs (the selector index's hash is keyed at
//! random per process, which changes how its nodes fill), far inside the bounds.
//!
//! The bound is the suite's: what the agent holds per SVID must stay within twice the leaf
//! and key themselves, counted the way glibc's allocator spends memory (16 bytes of header
//! and rounding per block on top of the bytes asked for). The blocks per entry are bounded
//! too, so that a copy of an ID, a SPIFFE ID or a selector in one more map fails here. A
//! second round (every entry changed and its SVID minted again) must hold no more than the
//! first: replaced entries and SVIDs are released, not kept by some index.
//!
//! Its own test binary: dhat counts every thread of the process, and this is its only test.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_agent::cache::{AgentSnapshot, Deadline, X509Svid};
use tessera_agent::manager::state::{Minted, State};
use tessera_spiffe::TrustDomain;
use tessera_wire::tessera::agent::v1::EntryUpserted;
use tessera_wire::tessera::agent::v1::sync_entries_response::Event;
use tessera_wire::tessera::common::v1 as common;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// Entries held.
const ENTRIES: usize = 4_000;
/// A workload leaf from the Tessera CA (EC P-256, one SPIFFE ID SAN), DER bytes.
const LEAF: usize = 553;
/// The agent's PKCS#8 DER of an EC P-256 key (with its public key).
const KEY: usize = 138;
/// glibc: an 8-byte header per block, rounded up to 16 bytes.
const PER_BLOCK: u64 = 16;
/// Blocks per entry today: ID, entry, SPIFFE ID, selector list, selector, SVID, leaf and key
/// (7), plus a share of the map, index and timer nodes (about 7.3 in all). One more copy of
/// anything per entry is 8.3.
const MAX_BLOCKS_PER_ENTRY: f64 = 7.8;

/// A server-style entry ID (a UUID's shape), in no particular order.
fn id(n: usize) -> String {
    let scrambled = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        scrambled >> 32,
        n & 0xffff,
        n & 0xfff,
        n & 0xfff,
        scrambled & 0xffff_ffff_ffff
    )
}

fn upsert(n: usize, revision: u64) -> Event {
    let entry = common::Entry {
        id: id(n),
        spiffe_id: format!("spiffe://example.org/ns/default/sa/workload-{n}"),
        parent_id: "spiffe://example.org/tessera/agent/join_token/t".to_owned(),
        selectors: vec![common::Selector { r#type: "unix".to_owned(), value: format!("uid:{}", 2_000_000 + n) }],
        revision,
        ..common::Entry::default()
    };
    Event::EntryUpserted(EntryUpserted { entry: Some(entry), revision })
}

/// Live heap bytes and blocks.
fn heap() -> (u64, u64) {
    let stats = dhat::HeapStats::get();
    (stats.curr_bytes as u64, stats.curr_blocks as u64)
}

/// Syncs every entry at `revision` (a snapshot published after each), then mints an SVID for
/// each in batches of 100 (a snapshot published after each batch). Returns the last snapshot.
fn sync_and_mint(state: &mut State, revision: u64, now: SystemTime) -> AgentSnapshot {
    let mut published = state.snapshot(now);
    for n in 0..ENTRIES {
        state.apply(upsert(n, revision), now).unwrap();
        published = state.snapshot(now);
    }
    drop(published);
    let work = state.mint_work(now);
    assert_eq!(work.len(), ENTRIES);
    let expires = now + Duration::from_secs(3600);
    for (i, entry) in work.into_iter().enumerate() {
        // As the minter builds it: a leaf and key decoded and generated apart, copied in.
        let leaf = vec![0x30; LEAF];
        let key = zeroize::Zeroizing::new(vec![0x02; KEY]);
        let svid = Arc::new(X509Svid::from_chain(&[leaf], &key, expires));
        let renew_at = Deadline::at(now + Duration::from_secs(1800 + (i as u64 * 7919) % 360));
        let id = Arc::clone(&entry.id);
        state.set_minted(&id, Minted { entry, svid, renew_at }, now);
        if i % 100 == 99 {
            state.snapshot(now);
        }
    }
    let published = state.snapshot(now);
    assert_eq!((published.entry_count(), published.identity_count()), (ENTRIES, ENTRIES));
    assert!(state.mint_work(now).is_empty());
    published
}

#[test]
fn heap_per_cached_svid_stays_within_twice_the_leaf_and_key() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let now = SystemTime::now();
    let mut state = State::new(TrustDomain::new("example.org").unwrap(), None);
    let before = heap();

    let published = sync_and_mint(&mut state, 1, now);
    let first = heap();
    let entries = ENTRIES as f64;
    let bytes = (first.0 - before.0) as f64 / entries;
    let blocks = (first.1 - before.1) as f64 / entries;
    let footprint = bytes + blocks * PER_BLOCK as f64;
    let limit = 2.0 * (LEAF + KEY) as f64;
    eprintln!(
        "per cached SVID: {bytes:.0} B in {blocks:.2} blocks, {footprint:.0} B with allocator overhead; \
         limit {limit:.0} B (2 x (leaf {LEAF} + key {KEY}))"
    );
    assert!(footprint <= limit, "{footprint:.0} B per cached SVID, more than {limit:.0} B");
    assert!(blocks <= MAX_BLOCKS_PER_ENTRY, "{blocks:.2} heap blocks per entry, more than {MAX_BLOCKS_PER_ENTRY}");

    // Every entry changed and re-minted: the replaced entries, SVIDs and their index keys are
    // released (a snapshot still held by a reader would keep them; none is).
    drop(published);
    let published = sync_and_mint(&mut state, 2, now);
    let second = heap();
    drop(published);
    // The sets' nodes split and merge a little differently the second time (a few dozen
    // blocks over all entries); anything kept per replaced entry is a block or more each.
    let grown_bytes = second.0.saturating_sub(first.0) as f64 / entries;
    let grown_blocks = second.1.saturating_sub(first.1) as f64 / entries;
    assert!(
        grown_bytes <= 8.0 && grown_blocks <= 0.05,
        "a second round holds {grown_bytes:.1} B and {grown_blocks:.3} blocks more per entry: {second:?} (bytes, \
         blocks) after {first:?}"
    );
}
