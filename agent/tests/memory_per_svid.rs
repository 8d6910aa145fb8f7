#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! calibration (temporary)

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_agent::cache::{Deadline, X509Svid};
use tessera_agent::manager::state::{Minted, State};
use tessera_spiffe::TrustDomain;
use tessera_wire::tessera::agent::v1::EntryUpserted;
use tessera_wire::tessera::agent::v1::sync_entries_response::Event;
use tessera_wire::tessera::common::v1 as common;
use zeroize::Zeroizing;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const LEAF: usize = 553;
const KEY: usize = 138;

fn id(n: usize) -> String {
    if std::env::var_os("SHORT").is_some() {
        return format!("mem-{n}");
    }
    format!("{:08x}-0000-4000-8000-{:012x}", n.wrapping_mul(2654435761) & 0xffff_ffff, n)
}

fn stats() -> (u64, u64) {
    let s = dhat::HeapStats::get();
    (s.curr_bytes as u64, s.curr_blocks as u64)
}

#[test]
fn calibrate() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let n: usize = std::env::var("N").map_or(4000, |v| v.parse().unwrap());
    let now = SystemTime::now();
    let mut state = State::new(TrustDomain::new("example.org").unwrap(), None);
    let mut published = state.snapshot(now);
    let m0 = stats();
    for i in 0..n {
        let wire = common::Entry {
            id: id(i),
            spiffe_id: format!("spiffe://example.org/workload/w{i}"),
            parent_id: "spiffe://example.org/tessera/agent/join_token/t".to_owned(),
            selectors: vec![common::Selector { r#type: "unix".to_owned(), value: format!("uid:{}", 2_000_000 + i) }],
            revision: i as u64 + 1,
            ..common::Entry::default()
        };
        state.apply(Event::EntryUpserted(EntryUpserted { entry: Some(wire), revision: i as u64 + 1 }), now).unwrap();
        published = state.snapshot(now);
    }
    let m1 = stats();
    for i in 0..n {
        let svid =
            X509Svid::from_chain(&[vec![0x30; LEAF]], &Zeroizing::new(vec![1; KEY]), now + Duration::from_secs(3600));
        let minted = Minted {
            entry: state.entry(&id(i)).unwrap().clone(),
            svid: Arc::new(svid),
            renew_at: Deadline::at(now + Duration::from_secs(1800 + (i as u64 * 7919) % 360)),
        };
        state.set_minted(&id(i), minted, now);
        if i % 100 == 99 {
            published = state.snapshot(now);
        }
    }
    published = state.snapshot(now);
    let m2 = stats();
    assert_eq!(published.identity_count(), n);
    let per = |a: (u64, u64), b: (u64, u64)| ((b.0 - a.0) as f64 / n as f64, (b.1 - a.1) as f64 / n as f64);
    eprintln!("entries: {:?} B, blocks per entry", per(m0, m1));
    eprintln!("svids: {:?}", per(m1, m2));
    eprintln!("total: {:?}", per(m0, m2));
}
