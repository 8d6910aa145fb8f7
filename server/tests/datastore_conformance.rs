//! The datastore conformance suite: every test is written once against `&dyn DataStore` and
//! runs against both the in-memory fake and the sled store, so the fake keeps the real
//! semantics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use tessera_server::datastore::{
    AttestedNode, ChangeKind, DataStore, DataStoreError, DataStoreOptions, EntryFilter, JoinToken, MemoryDataStore,
    NodeFilter, NodeSerials, PageRequest, RegistrationEntry, ResourceKind, SelectorFilter, SelectorMatch,
    SledDataStore,
};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};

/// Small enough that the compaction test overflows it, large enough for every other test.
const RETENTION: u64 = 64;

fn options() -> DataStoreOptions {
    DataStoreOptions { change_log_retention: RETENTION }
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn selectors(items: &[&str]) -> SelectorSet {
    SelectorSet::parse_all(items).unwrap()
}

fn entry(entry_id: &str, spiffe_id: &str, parent_id: &str, sel: &[&str]) -> RegistrationEntry {
    RegistrationEntry::new(entry_id, id(spiffe_id), id(parent_id), selectors(sel))
}

const AGENT: &str = "spiffe://example.org/tessera/agent/join_token/abc";

fn web(entry_id: &str) -> RegistrationEntry {
    entry(entry_id, "spiffe://example.org/web", AGENT, &["unix:uid:1000"])
}

fn ids(entries: &[RegistrationEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

fn list_ids(store: &dyn DataStore, filter: &EntryFilter) -> Vec<String> {
    store.list_entries(filter, &PageRequest::all()).unwrap().items.into_iter().map(|e| e.id).collect()
}

fn node(spiffe_id: &str, serial: &str, sel: &[&str]) -> AttestedNode {
    AttestedNode {
        spiffe_id: id(spiffe_id),
        attestation_type: "join_token".to_owned(),
        serial: serial.to_owned(),
        new_serial: None,
        expires_at: 1_000,
        banned: false,
        selectors: selectors(sel),
        can_reattest: false,
    }
}

fn token(value: &str, expires_at: u64) -> JoinToken {
    JoinToken { token: value.to_owned(), expires_at, alias_spiffe_id: None }
}

mod conformance {
    use super::*;

    pub(crate) fn entry_crud(store: &dyn DataStore) {
        assert_eq!(store.count_entries().unwrap(), 0);
        let mut full = web("e1");
        full.x509_svid_ttl = Some(Duration::from_secs(3600));
        full.jwt_svid_ttl = Some(Duration::from_secs(300));
        full.dns_names = vec!["web.example.org".into()];
        full.federates_with = vec![td("partner.org")];
        full.hint = "web".into();
        full.admin = true;
        full.downstream = true;
        full.expires_at = Some(2_000_000_000);
        full.revision = 999; // ignored on input

        let created = store.create_entry(&full).unwrap();
        assert_eq!(created.revision, 1);
        assert_eq!(RegistrationEntry { revision: 999, ..created.clone() }, full);
        assert_eq!(store.get_entry("e1").unwrap(), Some(created.clone()));
        assert_eq!(store.count_entries().unwrap(), 1);

        let mut replaced = web("e1");
        replaced.spiffe_id = id("spiffe://example.org/api");
        let updated = store.update_entry(&replaced, None).unwrap();
        assert_eq!(updated.revision, 2);
        // Whole replacement: the optional fields went back to their defaults.
        assert_eq!(store.get_entry("e1").unwrap(), Some(updated.clone()));
        assert!(updated.dns_names.is_empty() && updated.x509_svid_ttl.is_none() && !updated.admin);

        let deleted = store.delete_entry("e1").unwrap();
        assert_eq!(deleted, updated);
        assert_eq!(store.get_entry("e1").unwrap(), None);
        assert_eq!(store.count_entries().unwrap(), 0);
        for err in [store.delete_entry("e1").unwrap_err(), store.update_entry(&web("e1"), None).unwrap_err()] {
            assert!(matches!(&err, DataStoreError::NotFound { kind: ResourceKind::Entry, id } if id == "e1"), "{err}");
        }
        assert_eq!(store.current_revision().unwrap(), 3);
    }

    pub(crate) fn entry_validation(store: &dyn DataStore) {
        let cases: Vec<(RegistrationEntry, &str)> = vec![
            (web(""), "entry id"),
            (web("bad\nid"), "entry id"),
            (web(&"x".repeat(256)), "entry id"),
            (RegistrationEntry { selectors: SelectorSet::new(), ..web("e1") }, "selectors"),
            (RegistrationEntry { x509_svid_ttl: Some(Duration::ZERO), ..web("e1") }, "x509_svid_ttl"),
            (RegistrationEntry { jwt_svid_ttl: Some(Duration::ZERO), ..web("e1") }, "jwt_svid_ttl"),
            (RegistrationEntry { dns_names: vec![String::new()], ..web("e1") }, "dns_names"),
        ];
        for (bad, field) in cases {
            match store.create_entry(&bad) {
                Err(DataStoreError::InvalidArgument { field: found, .. }) => assert_eq!(found, field),
                other => panic!("{field}: expected InvalidArgument, got {other:?}"),
            }
        }
        store.create_entry(&web("e1")).unwrap();
        let err = store.update_entry(&RegistrationEntry { selectors: SelectorSet::new(), ..web("e1") }, None);
        assert!(matches!(err, Err(DataStoreError::InvalidArgument { field: "selectors", .. })));
        assert_eq!(store.count_entries().unwrap(), 1);
        assert_eq!(store.current_revision().unwrap(), 1);
    }

    pub(crate) fn duplicate_detection(store: &dyn DataStore) {
        store.create_entry(&web("e1")).unwrap();
        let err = store.create_entry(&web("e1")).unwrap_err();
        assert!(matches!(&err, DataStoreError::AlreadyExists { kind: ResourceKind::Entry, id, .. } if id == "e1"));
        let err = store.create_entry(&web("e2")).unwrap_err();
        let DataStoreError::AlreadyExists { id: taken, reason, .. } = &err else { panic!("{err:?}") };
        assert_eq!(taken, "e2");
        assert!(reason.contains("\"e1\""), "{reason}");
        assert!(err.to_string().contains("same SPIFFE ID, parent ID and selectors"), "{err}");

        // Any difference in SPIFFE ID, parent or selectors makes a distinct entry.
        let mut other = web("e2");
        other.selectors = selectors(&["unix:uid:1000", "unix:gid:0"]);
        store.create_entry(&other).unwrap();
        let mut other_parent = web("e3");
        other_parent.parent_id = id("spiffe://example.org/other-agent");
        store.create_entry(&other_parent).unwrap();

        // Updating an entry into another's identity is refused; keeping its own is fine.
        let err = store.update_entry(&RegistrationEntry { id: "e2".into(), ..web("e1") }, None).unwrap_err();
        assert!(matches!(err, DataStoreError::AlreadyExists { .. }), "{err}");
        store.update_entry(&RegistrationEntry { hint: "same identity".into(), ..web("e1") }, None).unwrap();
        assert_eq!(store.count_entries().unwrap(), 3);

        // A deleted entry frees its identity.
        store.delete_entry("e1").unwrap();
        store.create_entry(&web("e4")).unwrap();
        // Moving an entry frees its old identity too.
        store
            .update_entry(&RegistrationEntry { spiffe_id: id("spiffe://example.org/moved"), ..web("e4") }, None)
            .unwrap();
        store.create_entry(&web("e5")).unwrap();
    }

    pub(crate) fn update_compare_and_set(store: &dyn DataStore) {
        let created = store.create_entry(&web("e1")).unwrap();
        let err = store.update_entry(&web("e1"), Some(created.revision + 5)).unwrap_err();
        let DataStoreError::Conflict { kind: ResourceKind::Entry, expected, found, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!((expected.as_str(), found.as_str()), ("revision 6", "revision 1"));
        let updated = store.update_entry(&web("e1"), Some(created.revision)).unwrap();
        assert!(store.update_entry(&web("e1"), Some(created.revision)).is_err());
        store.update_entry(&web("e1"), Some(updated.revision)).unwrap();
    }

    fn filter_fixture(store: &dyn DataStore) {
        let node_alias = "spiffe://example.org/tessera/server";
        for e in [
            entry("a", "spiffe://example.org/web", AGENT, &["unix:uid:1000"]),
            entry("b", "spiffe://example.org/web", AGENT, &["unix:uid:1000", "unix:gid:1000"]),
            entry("c", "spiffe://example.org/db", AGENT, &["unix:uid:2000"]),
            entry("d", "spiffe://example.org/web", "spiffe://example.org/other", &["unix:uid:1000"]),
            entry("e", "spiffe://example.org/alias", node_alias, &["k8s:cluster:prod"]),
            entry("f", "spiffe://example.org/alias2", node_alias, &["k8s:cluster:prod", "k8s:region:eu"]),
        ] {
            store.create_entry(&e).unwrap();
        }
    }

    pub(crate) fn list_filters(store: &dyn DataStore) {
        filter_fixture(store);
        let by_selectors = |sel: &[&str], mode| EntryFilter {
            selectors: Some(SelectorFilter::new(selectors(sel), mode)),
            ..EntryFilter::default()
        };
        let cases: Vec<(EntryFilter, &[&str])> = vec![
            (EntryFilter::default(), &["a", "b", "c", "d", "e", "f"]),
            (EntryFilter { spiffe_id: Some(id("spiffe://example.org/web")), ..Default::default() }, &["a", "b", "d"]),
            (EntryFilter { parent_id: Some(id(AGENT)), ..Default::default() }, &["a", "b", "c"]),
            (
                EntryFilter {
                    spiffe_id: Some(id("spiffe://example.org/web")),
                    parent_id: Some(id(AGENT)),
                    ..Default::default()
                },
                &["a", "b"],
            ),
            (EntryFilter { spiffe_id: Some(id("spiffe://example.org/none")), ..Default::default() }, &[]),
            (by_selectors(&["unix:uid:1000"], SelectorMatch::Exact), &["a", "d"]),
            (by_selectors(&["unix:uid:1000"], SelectorMatch::Superset), &["a", "b", "d"]),
            (by_selectors(&["unix:uid:1000", "unix:gid:1000"], SelectorMatch::Superset), &["b"]),
            (by_selectors(&["unix:uid:1000", "unix:gid:1000", "unix:user:x"], SelectorMatch::Subset), &["a", "b", "d"]),
            (by_selectors(&["unix:gid:1000"], SelectorMatch::Subset), &[]),
            (by_selectors(&["k8s:cluster:prod", "k8s:region:eu"], SelectorMatch::Subset), &["e", "f"]),
            (by_selectors(&["unix:uid:2000", "k8s:region:eu"], SelectorMatch::Any), &["c", "f"]),
            (by_selectors(&[], SelectorMatch::Superset), &["a", "b", "c", "d", "e", "f"]),
            (by_selectors(&[], SelectorMatch::Subset), &[]),
            (
                EntryFilter {
                    parent_id: Some(id(AGENT)),
                    selectors: Some(SelectorFilter::new(selectors(&["unix:uid:1000"]), SelectorMatch::Superset)),
                    ..Default::default()
                },
                &["a", "b"],
            ),
        ];
        for (filter, expected) in cases {
            assert_eq!(list_ids(store, &filter), expected, "{filter:?}");
        }
    }

    pub(crate) fn list_by_parents_and_selector(store: &dyn DataStore) {
        filter_fixture(store);
        let got = store.list_entries_by_parents(&[id(AGENT)]).unwrap();
        assert_eq!(ids(&got), ["a", "b", "c"]);
        let got =
            store.list_entries_by_parents(&[id("spiffe://example.org/tessera/server"), id(AGENT), id(AGENT)]).unwrap();
        assert_eq!(ids(&got), ["a", "b", "c", "e", "f"]);
        assert!(store.list_entries_by_parents(&[]).unwrap().is_empty());
        let got = store.list_entries_by_selector(&Selector::parse("unix:uid:1000").unwrap()).unwrap();
        assert_eq!(ids(&got), ["a", "b", "d"]);
        let got = store.list_entries_by_selector(&Selector::parse("k8s:cluster:prod").unwrap()).unwrap();
        assert_eq!(ids(&got), ["e", "f"]);
        assert!(store.list_entries_by_selector(&Selector::parse("unix:uid:1").unwrap()).unwrap().is_empty());
        // The index follows updates.
        store.update_entry(&entry("e", "spiffe://example.org/alias", AGENT, &["k8s:cluster:dev"]), None).unwrap();
        let got = store.list_entries_by_selector(&Selector::parse("k8s:cluster:prod").unwrap()).unwrap();
        assert_eq!(ids(&got), ["f"]);
        assert_eq!(ids(&store.list_entries_by_parents(&[id(AGENT)]).unwrap()), ["a", "b", "c", "e"]);
    }

    /// Children of many parents at once, listed or not, including parents that are prefixes
    /// of one another and parents with no children: exactly the entries of the listed ones,
    /// ordered by entry ID, each once.
    pub(crate) fn list_by_many_parents(store: &dyn DataStore) {
        let parents =
            ["spiffe://example.org/a", "spiffe://example.org/a/b", "spiffe://example.org/ab", "spiffe://example.org/b"];
        let mut n = 0;
        for (p, parent) in parents.iter().enumerate() {
            for c in 0..3 {
                // IDs interleave across parents, so the result must be merged, not concatenated.
                store
                    .create_entry(&entry(&format!("e{c}-{p}"), &format!("spiffe://example.org/w{n}"), parent, &["t:1"]))
                    .unwrap();
                n += 1;
            }
        }
        let listed = |wanted: &[&str]| {
            let ids: Vec<SpiffeId> = wanted.iter().map(|p| id(p)).collect();
            store.list_entries_by_parents(&ids).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>()
        };
        assert_eq!(listed(&[parents[1]]), ["e0-1", "e1-1", "e2-1"]);
        assert_eq!(
            listed(&[parents[3], parents[0], "spiffe://example.org/none", parents[0], parents[2]]),
            ["e0-0", "e0-2", "e0-3", "e1-0", "e1-2", "e1-3", "e2-0", "e2-2", "e2-3"]
        );
        assert_eq!(listed(&[parents[1], "spiffe://example.org/zzz"]), ["e0-1", "e1-1", "e2-1"]);
        assert!(listed(&["spiffe://example.org/a/a", "spiffe://example.org/aa", "spiffe://example.org/c"]).is_empty());
        // Many parents, almost none with children (an authorized set's second level).
        let mut many: Vec<String> = (0..500).map(|i| format!("spiffe://example.org/w{i}")).collect();
        many.push(parents[2].to_owned());
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(listed(&many), ["e0-2", "e1-2", "e2-2"]);
        store.delete_entry("e1-2").unwrap();
        assert_eq!(listed(&many), ["e0-2", "e2-2"]);
    }

    pub(crate) fn pagination(store: &dyn DataStore) {
        for i in 0..25 {
            let parent = if i % 2 == 0 { AGENT } else { "spiffe://example.org/other" };
            store
                .create_entry(&entry(
                    &format!("e{i:02}"),
                    "spiffe://example.org/web",
                    parent,
                    &[&format!("unix:uid:{i}")],
                ))
                .unwrap();
        }
        for filter in [EntryFilter::default(), EntryFilter { parent_id: Some(id(AGENT)), ..Default::default() }] {
            let expected = list_ids(store, &filter);
            let mut seen = Vec::new();
            let mut page = PageRequest::first(4);
            let mut pages = 0;
            loop {
                let got = store.list_entries(&filter, &page).unwrap();
                assert!(got.items.len() <= 4);
                seen.extend(got.items.into_iter().map(|e| e.id));
                pages += 1;
                match got.next_page_token {
                    Some(token) => page = PageRequest { token: Some(token), size: 4 },
                    None => break,
                }
            }
            assert_eq!(seen, expected);
            assert_eq!(pages, expected.len().div_ceil(4));
        }
        // A page token stays valid while entries come and go.
        let first = store.list_entries(&EntryFilter::default(), &PageRequest::first(10)).unwrap();
        assert_eq!(first.items.last().unwrap().id, "e09");
        store.delete_entry("e09").unwrap();
        store.delete_entry("e10").unwrap();
        let next = store
            .list_entries(&EntryFilter::default(), &PageRequest { token: first.next_page_token, size: 2 })
            .unwrap();
        assert_eq!(ids(&next.items), ["e11", "e12"]);
        let bad = PageRequest { token: Some("not a token".into()), size: 2 };
        assert!(matches!(
            store.list_entries(&EntryFilter::default(), &bad),
            Err(DataStoreError::InvalidArgument { field: "page_token", .. })
        ));
    }

    pub(crate) fn revisions_and_change_feed(store: &dyn DataStore) {
        assert_eq!(store.current_revision().unwrap(), 0);
        assert!(store.changes_since(0, 10).unwrap().is_empty());
        let a = store.create_entry(&web("a")).unwrap();
        let b = store.create_entry(&RegistrationEntry { spiffe_id: id("spiffe://example.org/b"), ..web("b") }).unwrap();
        assert!(store.create_entry(&web("dup")).is_err()); // a failed write bumps nothing
        let a2 = store.update_entry(&RegistrationEntry { hint: "x".into(), ..web("a") }, None).unwrap();
        store.delete_entry("b").unwrap();
        assert!(a.revision < b.revision && b.revision < a2.revision);
        assert_eq!(store.current_revision().unwrap(), 4);

        let changes = store.changes_since(0, 100).unwrap();
        let summary: Vec<(u64, &str, ChangeKind)> =
            changes.iter().map(|c| (c.revision, c.entry_id.as_str(), c.kind)).collect();
        assert_eq!(
            summary,
            [
                (1, "a", ChangeKind::Upsert),
                (2, "b", ChangeKind::Upsert),
                (3, "a", ChangeKind::Upsert),
                (4, "b", ChangeKind::Delete)
            ]
        );
        assert_eq!(store.changes_since(1, 2).unwrap(), changes[1..3]);
        assert_eq!(store.changes_since(3, 100).unwrap(), changes[3..]);
        assert!(store.changes_since(4, 100).unwrap().is_empty());
        assert!(store.changes_since(2, 0).unwrap().is_empty());
        let err = store.changes_since(5, 10).unwrap_err();
        assert!(matches!(err, DataStoreError::ResyncRequired { since: 5, current: 4, .. }), "{err}");
    }

    pub(crate) fn change_log_compaction(store: &dyn DataStore) {
        for i in 0..10 {
            store
                .create_entry(&entry(&format!("e{i}"), &format!("spiffe://example.org/w{i}"), AGENT, &["a:b"]))
                .unwrap();
        }
        assert_eq!(store.current_revision().unwrap(), 10);
        assert_eq!(store.compact_changes(4).unwrap(), 6);
        assert_eq!(store.compact_changes(4).unwrap(), 0);
        let err = store.changes_since(5, 10).unwrap_err();
        assert!(matches!(err, DataStoreError::ResyncRequired { since: 5, floor: 6, current: 10 }), "{err}");
        assert!(err.to_string().contains("resync"), "{err}");
        assert_eq!(store.changes_since(6, 10).unwrap().len(), 4);
        assert!(matches!(store.changes_since(0, 0), Err(DataStoreError::ResyncRequired { .. })));

        // Past the retention the store compacts on its own, in batches.
        let mut revision = store.get_entry("e1").unwrap().unwrap().revision;
        for _ in 0..2 * RETENTION {
            let e1 = entry("e1", "spiffe://example.org/w1", AGENT, &["a:b"]);
            revision = store.update_entry(&e1, Some(revision)).unwrap().revision;
        }
        let current = store.current_revision().unwrap();
        assert_eq!(current, 10 + 2 * RETENTION);
        assert!(matches!(store.changes_since(10, 10), Err(DataStoreError::ResyncRequired { .. })));
        let tail = store.changes_since(current - RETENTION, 1000).unwrap();
        assert_eq!(tail.len(), usize::try_from(RETENTION).unwrap());
        assert_eq!(tail.last().unwrap().revision, current);
    }

    pub(crate) fn subscription_wakes_on_write(store: &dyn DataStore) {
        let mut before = store.subscribe();
        assert_eq!(*before.borrow_and_update(), 0);
        store.create_entry(&web("a")).unwrap();
        assert!(before.has_changed().unwrap());
        assert_eq!(*before.borrow_and_update(), 1);

        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(move || {
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.expect("woken").unwrap();
                    *rx.borrow_and_update()
                })
            });
            std::thread::sleep(Duration::from_millis(50));
            store.delete_entry("a").unwrap();
            assert_eq!(waiter.join().unwrap(), 2);
        });
        // Failed writes do not notify.
        let mut rx = store.subscribe();
        rx.borrow_and_update();
        assert!(store.delete_entry("a").is_err());
        assert!(!rx.has_changed().unwrap());
    }

    pub(crate) fn concurrent_entry_writers(store: &dyn DataStore) {
        const THREADS: usize = 4;
        const PER_THREAD: usize = 15;
        let barrier = Barrier::new(THREADS);
        let revisions: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let barrier = &barrier;
                    scope.spawn(move || {
                        barrier.wait();
                        (0..PER_THREAD)
                            .map(|i| {
                                let e = entry(
                                    &format!("t{t}-{i}"),
                                    &format!("spiffe://example.org/w/{t}/{i}"),
                                    AGENT,
                                    &["a:b"],
                                );
                                store.create_entry(&e).unwrap().revision
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let total = u64::try_from(THREADS * PER_THREAD).unwrap();
        let unique: BTreeSet<u64> = revisions.iter().copied().collect();
        assert_eq!(unique, (1..=total).collect());
        let log = store.changes_since(0, 1000).unwrap();
        assert_eq!(log.iter().map(|c| c.revision).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
        assert_eq!(store.count_entries().unwrap(), total);
    }

    pub(crate) fn prune_expired_entries(store: &dyn DataStore) {
        store.create_entry(&RegistrationEntry { expires_at: Some(100), ..web("old") }).unwrap();
        store
            .create_entry(&RegistrationEntry {
                expires_at: Some(200),
                spiffe_id: id("spiffe://example.org/b"),
                ..web("later")
            })
            .unwrap();
        store.create_entry(&RegistrationEntry { spiffe_id: id("spiffe://example.org/c"), ..web("forever") }).unwrap();
        assert_eq!(store.prune_expired_entries(99).unwrap(), 0);
        assert_eq!(store.prune_expired_entries(100).unwrap(), 1);
        assert_eq!(store.get_entry("old").unwrap(), None);
        assert_eq!(store.prune_expired_entries(10_000).unwrap(), 1);
        assert_eq!(list_ids(store, &EntryFilter::default()), ["forever"]);
        let deletes: Vec<_> = store.changes_since(3, 10).unwrap().into_iter().map(|c| (c.entry_id, c.kind)).collect();
        assert_eq!(deletes, [("old".to_owned(), ChangeKind::Delete), ("later".to_owned(), ChangeKind::Delete)]);
    }

    pub(crate) fn join_token_consumed_once(store: &dyn DataStore) {
        let alias = id("spiffe://example.org/cluster/prod");
        let mut t = token("tok-1", 100);
        t.alias_spiffe_id = Some(alias.clone());
        store.create_join_token(&t).unwrap();
        assert!(matches!(
            store.create_join_token(&t),
            Err(DataStoreError::AlreadyExists { kind: ResourceKind::JoinToken, .. })
        ));
        assert!(matches!(store.create_join_token(&token("", 100)), Err(DataStoreError::InvalidArgument { .. })));
        assert_eq!(store.consume_join_token("tok-1", 99).unwrap(), t);
        assert!(matches!(store.consume_join_token("tok-1", 99), Err(DataStoreError::TokenNotFound)));
        assert!(matches!(store.consume_join_token("unknown", 0), Err(DataStoreError::TokenNotFound)));

        store.create_join_token(&token("tok-2", 100)).unwrap();
        let err = store.consume_join_token("tok-2", 100).unwrap_err();
        assert!(matches!(err, DataStoreError::TokenExpired { expires_at: 100 }), "{err}");
        assert_eq!(err.to_string(), "join token expired at 100 (unix seconds)");
        // An expired token is removed all the same.
        assert!(matches!(store.consume_join_token("tok-2", 0), Err(DataStoreError::TokenNotFound)));
    }

    pub(crate) fn join_token_race_has_one_winner(store: &dyn DataStore) {
        const CONSUMERS: usize = 32;
        for round in 0..3 {
            let value = format!("race-{round}");
            store.create_join_token(&token(&value, 1_000)).unwrap();
            let barrier = Barrier::new(CONSUMERS);
            let results: Vec<Result<JoinToken, DataStoreError>> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..CONSUMERS)
                    .map(|_| {
                        let (barrier, value) = (&barrier, &value);
                        scope.spawn(move || {
                            barrier.wait();
                            store.consume_join_token(value, 10)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners = results.iter().filter(|r| r.is_ok()).count();
            assert_eq!(winners, 1, "round {round}: {results:?}");
            assert!(
                results.iter().filter_map(|r| r.as_ref().err()).all(|e| matches!(e, DataStoreError::TokenNotFound))
            );
        }
    }

    pub(crate) fn prune_join_tokens(store: &dyn DataStore) {
        for (value, expires_at) in [("a", 10), ("b", 20), ("c", 30)] {
            store.create_join_token(&token(value, expires_at)).unwrap();
        }
        assert_eq!(store.prune_join_tokens(9).unwrap(), 0);
        assert_eq!(store.prune_join_tokens(20).unwrap(), 2);
        assert!(matches!(store.consume_join_token("a", 0), Err(DataStoreError::TokenNotFound)));
        assert!(store.consume_join_token("c", 0).is_ok());
    }

    pub(crate) fn attested_node_lifecycle(store: &dyn DataStore) {
        let n = node(AGENT, "aa01", &["k8s:cluster:prod"]);
        let agent = &n.spiffe_id;
        store.create_attested_node(&n).unwrap();
        assert_eq!(store.get_attested_node(agent).unwrap(), Some(n.clone()));
        assert!(matches!(
            store.create_attested_node(&n),
            Err(DataStoreError::AlreadyExists { kind: ResourceKind::AttestedNode, .. })
        ));

        // Renewal: the new serial is issued while the old one stays current.
        let renewed = NodeSerials { serial: "aa01".into(), new_serial: Some("bb02".into()), expires_at: 2_000 };
        let got = store.update_attested_node_serials(agent, "aa01", &renewed).unwrap();
        assert_eq!((got.serial.as_str(), got.new_serial.as_deref(), got.expires_at), ("aa01", Some("bb02"), 2_000));
        // Handover on first use of the new SVID.
        let handover = NodeSerials { serial: "bb02".into(), new_serial: None, expires_at: 2_000 };
        store.update_attested_node_serials(agent, "aa01", &handover).unwrap();
        // A stale compare-and-set loses.
        let err = store.update_attested_node_serials(agent, "aa01", &renewed).unwrap_err();
        let DataStoreError::Conflict { expected, found, .. } = &err else { panic!("{err:?}") };
        assert_eq!((expected.as_str(), found.as_str()), ("serial aa01", "serial bb02"));
        assert_eq!(store.get_attested_node(agent).unwrap().unwrap().serial, "bb02");

        let banned = store.ban_attested_node(agent).unwrap();
        assert!(banned.banned && banned.serial.is_empty() && banned.new_serial.is_none());
        assert_eq!(store.get_attested_node(agent).unwrap(), Some(banned.clone()));
        assert!(matches!(
            store.update_attested_node_serials(agent, "", &handover),
            Err(DataStoreError::NodeBanned { .. })
        ));

        assert_eq!(store.delete_attested_node(agent).unwrap(), banned);
        assert_eq!(store.get_attested_node(agent).unwrap(), None);
        for err in [
            store.delete_attested_node(agent).unwrap_err(),
            store.ban_attested_node(agent).unwrap_err(),
            store.update_attested_node_serials(agent, "bb02", &handover).unwrap_err(),
            store.set_attested_node_selectors(agent, &SelectorSet::new()).unwrap_err(),
        ] {
            assert!(matches!(err, DataStoreError::NotFound { kind: ResourceKind::AttestedNode, .. }), "{err}");
        }
        // Evicted, the agent attests again.
        store.create_attested_node(&n).unwrap();
        assert!(matches!(
            store.create_attested_node(&node(AGENT, "cc03", &[])),
            Err(DataStoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            store.create_attested_node(&node("spiffe://example.org/x", "", &[])),
            Err(DataStoreError::InvalidArgument { field: "serial", .. })
        ));
    }

    pub(crate) fn attested_node_listing(store: &dyn DataStore) {
        let a = "spiffe://example.org/tessera/agent/join_token/a";
        let b = "spiffe://example.org/tessera/agent/join_token/b";
        let c = "spiffe://example.org/tessera/agent/x509pop/c";
        store.create_attested_node(&node(a, "01", &["k8s:cluster:prod", "k8s:region:eu"])).unwrap();
        store.create_attested_node(&node(b, "02", &[])).unwrap();
        store
            .create_attested_node(&AttestedNode {
                attestation_type: "x509pop".into(),
                ..node(c, "03", &["k8s:cluster:prod"])
            })
            .unwrap();
        store.ban_attested_node(&id(b)).unwrap();

        let list = |filter: NodeFilter| -> Vec<String> {
            store
                .list_attested_nodes(&filter, &PageRequest::all())
                .unwrap()
                .items
                .into_iter()
                .map(|n| n.spiffe_id.to_string())
                .collect()
        };
        let by = |sel: &[&str], mode| NodeFilter {
            selectors: Some(SelectorFilter::new(selectors(sel), mode)),
            ..Default::default()
        };
        assert_eq!(list(NodeFilter::default()), [a, b, c]);
        assert_eq!(list(NodeFilter { banned: Some(true), ..Default::default() }), [b]);
        assert_eq!(list(NodeFilter { banned: Some(false), ..Default::default() }), [a, c]);
        assert_eq!(list(NodeFilter { attestation_type: Some("x509pop".into()), ..Default::default() }), [c]);
        assert_eq!(list(by(&["k8s:cluster:prod"], SelectorMatch::Superset)), [a, c]);
        assert_eq!(list(by(&["k8s:cluster:prod"], SelectorMatch::Exact)), [c]);
        assert_eq!(list(by(&["k8s:region:eu", "k8s:zone:1"], SelectorMatch::Any)), [a]);
        // A node without selectors is a subset of anything.
        assert_eq!(list(by(&["k8s:cluster:prod"], SelectorMatch::Subset)), [b, c]);
        assert_eq!(list(by(&[], SelectorMatch::Exact)), [b]);

        let page = store.list_attested_nodes(&NodeFilter::default(), &PageRequest::first(2)).unwrap();
        assert_eq!(page.items.len(), 2);
        let rest = store
            .list_attested_nodes(&NodeFilter::default(), &PageRequest { token: page.next_page_token, size: 2 })
            .unwrap();
        assert_eq!(rest.items.iter().map(|n| n.spiffe_id.as_str()).collect::<Vec<_>>(), [c]);
        assert_eq!(rest.next_page_token, None);

        // Re-attestation replaces the selectors, and the index follows.
        let updated = store.set_attested_node_selectors(&id(c), &selectors(&["k8s:cluster:dev"])).unwrap();
        assert_eq!(updated.selectors, selectors(&["k8s:cluster:dev"]));
        assert_eq!(list(by(&["k8s:cluster:prod"], SelectorMatch::Superset)), [a]);
        assert_eq!(list(by(&["k8s:cluster:dev"], SelectorMatch::Superset)), [c]);
        store.delete_attested_node(&id(a)).unwrap();
        assert!(list(by(&["k8s:cluster:prod"], SelectorMatch::Any)).is_empty());
    }

    pub(crate) fn bundles_and_sequences(store: &dyn DataStore) {
        let own = td("example.org");
        let partner = td("partner.org");
        assert_eq!(store.get_bundle(&own).unwrap(), None);
        let first = store.set_bundle(&own, b"{\"keys\":[]}", Some(0)).unwrap();
        assert_eq!(first.sequence, 1);
        assert_eq!(store.set_bundle(&own, b"v2", Some(1)).unwrap().sequence, 2);
        for stale in [Some(0), Some(1), Some(3)] {
            let err = store.set_bundle(&own, b"lost", stale).unwrap_err();
            assert!(matches!(err, DataStoreError::Conflict { kind: ResourceKind::Bundle, .. }), "{err}");
        }
        assert_eq!(store.set_bundle(&own, b"v3", None).unwrap().sequence, 3);
        let got = store.get_bundle(&own).unwrap().unwrap();
        assert_eq!((got.data.as_slice(), got.sequence), (&b"v3"[..], 3));

        store.set_bundle(&partner, b"partner", None).unwrap();
        let all = store.list_bundles().unwrap();
        assert_eq!(all.iter().map(|b| b.trust_domain.name()).collect::<Vec<_>>(), ["example.org", "partner.org"]);
        assert_eq!(store.delete_bundle(&partner).unwrap().data, b"partner");
        assert!(matches!(
            store.delete_bundle(&partner),
            Err(DataStoreError::NotFound { kind: ResourceKind::Bundle, .. })
        ));
        assert_eq!(store.list_bundles().unwrap().len(), 1);
    }

    pub(crate) fn federation_relationships(store: &dyn DataStore) {
        let a = td("a.test");
        let b = td("b.test");
        assert_eq!(store.get_federation_relationship(&a).unwrap(), None);
        let first = store.put_federation_relationship(&a, b"one", Some(0)).unwrap();
        assert_eq!(first.revision, 1);
        let err = store.put_federation_relationship(&a, b"dup", Some(0)).unwrap_err();
        assert!(matches!(err, DataStoreError::Conflict { kind: ResourceKind::FederationRelationship, .. }), "{err}");
        assert_eq!(store.put_federation_relationship(&a, b"two", Some(1)).unwrap().revision, 2);
        assert!(store.put_federation_relationship(&a, b"lost", Some(1)).is_err());
        store.put_federation_relationship(&b, b"bee", None).unwrap();
        let all = store.list_federation_relationships().unwrap();
        assert_eq!(all.iter().map(|r| r.trust_domain.name()).collect::<Vec<_>>(), ["a.test", "b.test"]);
        assert_eq!(store.get_federation_relationship(&a).unwrap().unwrap().data, b"two");
        assert_eq!(store.delete_federation_relationship(&a).unwrap().data, b"two");
        assert!(matches!(
            store.delete_federation_relationship(&a),
            Err(DataStoreError::NotFound { kind: ResourceKind::FederationRelationship, .. })
        ));
        // Relationships and bundles are separate: neither listing sees the other.
        assert!(store.list_bundles().unwrap().is_empty());
        assert_eq!(store.list_federation_relationships().unwrap().len(), 1);
    }

    pub(crate) fn ca_journal_compare_and_set(store: &dyn DataStore) {
        assert_eq!(store.get_ca_journal().unwrap(), None);
        assert!(matches!(store.put_ca_journal(b"x", 1), Err(DataStoreError::Conflict { .. })));
        let first = store.put_ca_journal(b"one", 0).unwrap();
        assert_eq!(first.version, 1);
        assert!(matches!(
            store.put_ca_journal(b"lost", 0),
            Err(DataStoreError::Conflict { kind: ResourceKind::CaJournal, .. })
        ));
        let second = store.put_ca_journal(b"two", 1).unwrap();
        assert_eq!(store.get_ca_journal().unwrap(), Some(second));
    }

    pub(crate) fn jti_replay_cache(store: &dyn DataStore) {
        assert!(store.insert_jti_if_absent("iss", "j1", 100).unwrap());
        assert!(!store.insert_jti_if_absent("iss", "j1", 100).unwrap());
        assert!(store.insert_jti_if_absent("other", "j1", 100).unwrap());
        // The key is unambiguous: ("ab", "c") is not ("a", "bc").
        assert!(store.insert_jti_if_absent("ab", "c", 100).unwrap());
        assert!(store.insert_jti_if_absent("a", "bc", 100).unwrap());
        assert!(store.insert_jti_if_absent("iss", "j2", 200).unwrap());
        assert_eq!(store.prune_jtis(99).unwrap(), 0);
        assert_eq!(store.prune_jtis(100).unwrap(), 4);
        assert!(store.insert_jti_if_absent("iss", "j1", 300).unwrap());
        assert!(!store.insert_jti_if_absent("iss", "j2", 300).unwrap());
    }
}

/// Instantiates every conformance test for both implementations.
macro_rules! conformance_suite {
    ($($test:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[test]
                fn $test() {
                    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::new(options()));
                    conformance::$test(store.as_ref());
                }
            )*
        }

        mod sled {
            use super::*;
            $(
                #[test]
                fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let store: Arc<dyn DataStore> =
                        Arc::new(SledDataStore::open(dir.path().join("datastore"), options()).unwrap());
                    conformance::$test(store.as_ref());
                }
            )*
        }
    };
}

conformance_suite!(
    entry_crud,
    entry_validation,
    duplicate_detection,
    update_compare_and_set,
    list_filters,
    list_by_parents_and_selector,
    list_by_many_parents,
    pagination,
    revisions_and_change_feed,
    change_log_compaction,
    subscription_wakes_on_write,
    concurrent_entry_writers,
    prune_expired_entries,
    join_token_consumed_once,
    join_token_race_has_one_winner,
    prune_join_tokens,
    attested_node_lifecycle,
    attested_node_listing,
    bundles_and_sequences,
    ca_journal_compare_and_set,
    jti_replay_cache,
    federation_relationships,
);

/// The async helper runs calls on the blocking pool and passes results through.
#[tokio::test]
async fn blocking_helper_runs_calls_off_the_runtime() {
    let store: Arc<dyn DataStore> = Arc::new(MemoryDataStore::new(options()));
    let created = tessera_server::datastore::blocking(&store, |s| s.create_entry(&web("e1"))).await.unwrap();
    assert_eq!(created.revision, 1);
    let err = tessera_server::datastore::blocking(&store, |s| s.delete_entry("nope")).await.unwrap_err();
    assert!(err.is_not_found());
}
