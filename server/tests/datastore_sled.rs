//! What only the sled store has to show: everything survives a reopen, the directory is
//! locked while open, and an acknowledged write survives `kill -9` of the writing process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tessera_server::datastore::{
    AttestedNode, ChangeKind, DataStore, DataStoreError, DataStoreOptions, EntryFilter, JoinToken, NodeFilter,
    PageRequest, RegistrationEntry, SelectorFilter, SelectorMatch, SledDataStore,
};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};

const AGENT: &str = "spiffe://example.org/tessera/agent/join_token/abc";
const CHILD_DIR_VAR: &str = "TESSERA_TEST_DATASTORE_CHILD_DIR";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn entry(entry_id: &str, path: &str) -> RegistrationEntry {
    RegistrationEntry::new(
        entry_id,
        id(&format!("spiffe://example.org/{path}")),
        id(AGENT),
        SelectorSet::parse_all(&["unix:uid:1000"]).unwrap(),
    )
}

fn open(path: &Path) -> SledDataStore {
    SledDataStore::open(path, DataStoreOptions::default()).unwrap()
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore");
    let td = TrustDomain::new("example.org").unwrap();
    let node = AttestedNode {
        spiffe_id: id(AGENT),
        attestation_type: "join_token".into(),
        serial: "01".into(),
        new_serial: Some("02".into()),
        expires_at: 500,
        banned: false,
        selectors: SelectorSet::parse_all(&["k8s:cluster:prod"]).unwrap(),
        can_reattest: true,
    };
    let (entries, bundle, journal) = {
        let store = open(&path);
        let a = store.create_entry(&entry("a", "web")).unwrap();
        let b = store.create_entry(&entry("b", "db")).unwrap();
        store.create_entry(&entry("c", "gone")).unwrap();
        store.delete_entry("c").unwrap();
        store.create_attested_node(&node).unwrap();
        store.create_join_token(&JoinToken { token: "tok".into(), expires_at: 100, alias_spiffe_id: None }).unwrap();
        store.create_join_token(&JoinToken { token: "used".into(), expires_at: 100, alias_spiffe_id: None }).unwrap();
        store.consume_join_token("used", 0).unwrap();
        let bundle = store.set_bundle(&td, b"bundle", None).unwrap();
        let journal = store.put_ca_journal(b"journal", 0).unwrap();
        assert!(store.insert_jti_if_absent("iss", "jti", 100).unwrap());
        (vec![a, b], bundle, journal)
    };

    let store = open(&path);
    assert_eq!(store.list_entries(&EntryFilter::default(), &PageRequest::all()).unwrap().items, entries);
    assert_eq!(store.current_revision().unwrap(), 4);
    assert_eq!(*store.subscribe().borrow(), 4);
    let kinds: Vec<ChangeKind> = store.changes_since(0, 10).unwrap().into_iter().map(|c| c.kind).collect();
    assert_eq!(kinds, [ChangeKind::Upsert, ChangeKind::Upsert, ChangeKind::Upsert, ChangeKind::Delete]);
    assert_eq!(store.get_attested_node(&node.spiffe_id).unwrap(), Some(node.clone()));
    assert_eq!(store.list_attested_nodes(&NodeFilter::default(), &PageRequest::all()).unwrap().items, [node]);
    assert!(matches!(store.consume_join_token("used", 0), Err(DataStoreError::TokenNotFound)));
    assert_eq!(store.consume_join_token("tok", 0).unwrap().expires_at, 100);
    assert_eq!(store.get_bundle(&td).unwrap(), Some(bundle));
    assert_eq!(store.get_ca_journal().unwrap(), Some(journal));
    assert!(!store.insert_jti_if_absent("iss", "jti", 100).unwrap());
    // The duplicate index survived too, and revisions carry on.
    assert!(matches!(store.create_entry(&entry("z", "web")), Err(DataStoreError::AlreadyExists { .. })));
    assert_eq!(store.create_entry(&entry("d", "new")).unwrap().revision, 5);
}

/// Opens the sled database of a closed store directly, waiting for the store's file lock to
/// be released (sled's I/O threads may hold it a moment after the store is dropped).
fn open_raw(path: &Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(err) if Instant::now() < deadline => {
                assert!(err.to_string().contains("could not acquire lock"), "{err}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(err) => panic!("{err}"),
        }
    }
}

fn by_spiffe_id(store: &SledDataStore, spiffe_id: &str) -> Vec<RegistrationEntry> {
    let filter = EntryFilter { spiffe_id: Some(id(spiffe_id)), ..EntryFilter::default() };
    store.list_entries(&filter, &PageRequest::all()).unwrap().items
}

const OTHER_AGENT: &str = "spiffe://example.org/tessera/agent/join_token/other";

fn by_parent(store: &SledDataStore, parent: &str) -> Vec<RegistrationEntry> {
    let filter = EntryFilter { parent_id: Some(id(parent)), ..EntryFilter::default() };
    store.list_entries(&filter, &PageRequest::all()).unwrap().items
}

fn ids(entries: &[RegistrationEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.id.as_str()).collect()
}

/// Which older layout [`older_layout`] makes.
#[derive(Debug, Clone, Copy)]
enum Older {
    /// Layout 1: `entry_by_spiffe_id`, `entry_by_parent` and `entry_by_selector`, version
    /// byte 1.
    V1,
    /// Layout 1 whose migration crashed after dropping `entry_by_spiffe_id`.
    V1HalfMigrated,
    /// Layout 2: `entry_by_parent` and `entry_by_selector`, version byte 2.
    V2,
    /// Layout 2 whose migration crashed after dropping `entry_by_parent`.
    V2HalfMigrated,
    /// Layout 3: `entry_by_selector`, version byte 3.
    V3,
    /// Layout 3 whose migration crashed after dropping `entry_by_selector`.
    V3HalfMigrated,
}

/// Writes three entries with this build (two under `AGENT`, one under `OTHER_AGENT`), then
/// turns the store into an older layout with sled directly: that layout's version byte and
/// the index trees its build wrote (SPIFFE ID `\0` entry ID, parent ID `\0` entry ID, selector
/// `\0` entry ID), each with a stale key of an entry that does not exist.
fn older_layout(path: &Path, older: Older) -> Vec<RegistrationEntry> {
    let written = {
        let store = open(path);
        let mut twin = entry("b2", "web");
        twin.selectors = SelectorSet::parse_all(&["unix:uid:2000"]).unwrap();
        let mut other = entry("c", "db");
        other.parent_id = id(OTHER_AGENT);
        vec![
            store.create_entry(&entry("a", "web")).unwrap(),
            store.create_entry(&twin).unwrap(),
            store.create_entry(&other).unwrap(),
        ]
    };
    let db = open_raw(path);
    let meta = db.open_tree("meta").unwrap();
    assert_eq!(meta.get("schema_version").unwrap().unwrap().as_ref(), [4]);
    let (version, by_spiffe_id, by_parent, by_selector) = match older {
        Older::V1 => (1, true, true, true),
        Older::V1HalfMigrated => (1, false, true, true),
        Older::V2 => (2, false, true, true),
        Older::V2HalfMigrated => (2, false, false, true),
        Older::V3 => (3, false, false, true),
        Older::V3HalfMigrated => (3, false, false, false),
    };
    meta.insert("schema_version", &[version]).unwrap();
    if by_spiffe_id {
        let tree = db.open_tree("entry_by_spiffe_id").unwrap();
        for e in &written {
            tree.insert(format!("{}\0{}", e.spiffe_id, e.id), &[]).unwrap();
        }
        tree.insert("spiffe://example.org/ghost\0ghost", &[]).unwrap();
    }
    if by_parent {
        let tree = db.open_tree("entry_by_parent").unwrap();
        for e in &written {
            tree.insert(format!("{}\0{}", e.parent_id, e.id), &[]).unwrap();
        }
        tree.insert(format!("{AGENT}\0ghost"), &[]).unwrap();
    }
    if by_selector {
        let tree = db.open_tree("entry_by_selector").unwrap();
        for e in &written {
            for selector in &e.selectors {
                tree.insert(format!("{selector}\0{}", e.id), &[]).unwrap();
            }
        }
        tree.insert("unix:uid:1000\0ghost", &[]).unwrap();
    }
    db.flush().unwrap();
    written
}

fn by_selector(store: &SledDataStore, selector: &str) -> Vec<RegistrationEntry> {
    store.list_entries_by_selector(&Selector::parse(selector).unwrap()).unwrap()
}

fn by_selectors(store: &SledDataStore, selectors: &[&str], mode: SelectorMatch) -> Vec<RegistrationEntry> {
    let filter = EntryFilter {
        selectors: Some(SelectorFilter::new(SelectorSet::parse_all(selectors).unwrap(), mode)),
        ..EntryFilter::default()
    };
    store.list_entries(&filter, &PageRequest::all()).unwrap().items
}

/// A store of an older layout (1, 2 or 3, or one whose migration a crash cut short) opens:
/// the old trees are dropped and the layout becomes 4, every entry is there, listings by
/// SPIFFE ID answer from the entries' unique keys and listings by parent and by selector from
/// the entry index (a stale key of an old tree plays no part), and writes go on; opened again,
/// it stays at layout 4.
#[test]
fn a_store_of_an_older_layout_is_migrated_at_open_and_works() {
    for older in [Older::V1, Older::V1HalfMigrated, Older::V2, Older::V2HalfMigrated, Older::V3, Older::V3HalfMigrated]
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("datastore");
        let written = older_layout(&path, older);
        {
            let store = open(&path);
            assert_eq!(store.list_entries(&EntryFilter::default(), &PageRequest::all()).unwrap().items, written);
            assert_eq!(by_spiffe_id(&store, "spiffe://example.org/web"), written[..2], "{older:?}");
            assert_eq!(by_spiffe_id(&store, "spiffe://example.org/db"), written[2..], "{older:?}");
            assert!(by_spiffe_id(&store, "spiffe://example.org/ghost").is_empty(), "{older:?}");
            assert!(by_spiffe_id(&store, "spiffe://example.org/we").is_empty(), "a prefix of an ID is not the ID");
            assert_eq!(by_parent(&store, AGENT), written[..2], "{older:?}");
            assert_eq!(by_parent(&store, OTHER_AGENT), written[2..], "{older:?}");
            assert_eq!(store.list_entries_by_parents(&[id(AGENT), id(OTHER_AGENT)]).unwrap(), written, "{older:?}");
            assert_eq!(ids(&by_selector(&store, "unix:uid:1000")), ["a", "c"], "{older:?}");
            assert_eq!(ids(&by_selectors(&store, &["unix:uid:1000"], SelectorMatch::Exact)), ["a", "c"], "{older:?}");
            assert_eq!(by_selector(&store, "unix:uid:2000"), written[1..2], "{older:?}");
            // Duplicates are still refused; creates, moves and deletes show in the listings.
            assert!(matches!(store.create_entry(&entry("z", "web")), Err(DataStoreError::AlreadyExists { .. })));
            let d = store.create_entry(&entry("d", "web/d")).unwrap();
            assert_eq!(by_spiffe_id(&store, "spiffe://example.org/web/d"), [d]);
            let mut moved = entry("c", "web/d");
            moved.selectors = SelectorSet::parse_all(&["unix:uid:3000"]).unwrap();
            let moved = store.update_entry(&moved, None).unwrap();
            assert!(by_spiffe_id(&store, "spiffe://example.org/db").is_empty());
            assert_eq!(by_spiffe_id(&store, "spiffe://example.org/web/d").len(), 2);
            assert!(by_parent(&store, OTHER_AGENT).is_empty(), "{older:?}");
            assert_eq!(ids(&by_parent(&store, AGENT)), ["a", "b2", "c", "d"], "{older:?}");
            assert_eq!(ids(&by_selector(&store, "unix:uid:1000")), ["a", "d"], "{older:?}");
            assert_eq!(
                ids(&by_selectors(&store, &["unix:uid:2000", "unix:uid:3000"], SelectorMatch::Any)),
                ["b2", "c"],
                "{older:?}"
            );
            store.delete_entry("d").unwrap();
            assert_eq!(by_spiffe_id(&store, "spiffe://example.org/web/d"), [moved]);
            assert_eq!(ids(&store.list_entries_by_parents(&[id(AGENT)]).unwrap()), ["a", "b2", "c"], "{older:?}");
        }
        {
            let db = open_raw(&path);
            assert_eq!(db.open_tree("meta").unwrap().get("schema_version").unwrap().unwrap().as_ref(), [4]);
            for old in ["entry_by_spiffe_id", "entry_by_parent", "entry_by_selector"] {
                assert!(!db.tree_names().iter().any(|name| name.as_ref() == old.as_bytes()), "{old} kept, {older:?}");
            }
        }
        let store = open(&path);
        assert_eq!(store.list_entries(&EntryFilter::default(), &PageRequest::all()).unwrap().items.len(), 3);
        assert_eq!(by_parent(&store, AGENT).len(), 3, "{older:?}");
        assert_eq!(ids(&by_selector(&store, "unix:uid:1000")), ["a"], "{older:?}");
        assert_eq!(store.current_revision().unwrap(), 6);
    }
}

/// A layout this build does not know (as layout 4 is to a build of layout 3) is refused at
/// open, naming the store's path, and left as it is.
#[test]
fn a_store_of_an_unknown_layout_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore");
    drop(open(&path));
    {
        let db = open_raw(&path);
        db.open_tree("meta").unwrap().insert("schema_version", &[5]).unwrap();
        db.flush().unwrap();
    }
    let err = SledDataStore::open(&path, DataStoreOptions::default()).unwrap_err();
    assert!(matches!(err, DataStoreError::UnsupportedSchema { found: 5, supported: 4, .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    let db = open_raw(&path);
    assert_eq!(db.open_tree("meta").unwrap().get("schema_version").unwrap().unwrap().as_ref(), [5]);
}

#[test]
fn a_store_open_elsewhere_is_refused_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore");
    let _first = open(&path);
    let err = SledDataStore::open(&path, DataStoreOptions::default()).unwrap_err();
    assert!(matches!(err, DataStoreError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// The writer half of [`acknowledged_writes_survive_kill_9`]: runs only when that test
/// starts this test binary as a child process; otherwise it does nothing.
#[test]
fn durability_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let store = open(Path::new(&dir));
    let mut stdout = std::io::stdout().lock();
    for i in 0.. {
        let created = store.create_entry(&entry(&format!("e{i:06}"), &format!("w/{i}"))).unwrap();
        // Printed only after `create_entry` returned: the write is acknowledged.
        writeln!(stdout, "acked {}", created.id).unwrap();
        stdout.flush().unwrap();
    }
}

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("datastore");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "durability_child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_VAR, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 100 && Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        if let Some(entry_id) = line.unwrap().strip_prefix("acked ") {
            acked.push(entry_id.to_owned());
        }
    }
    assert!(acked.len() >= 10, "the child acknowledged only {} writes", acked.len());
    child.kill().unwrap(); // SIGKILL: no destructor, no flush
    child.wait().unwrap();
    // Acknowledgements already in the pipe count too.
    acked.extend(lines.map_while(Result::ok).filter_map(|line| line.strip_prefix("acked ").map(str::to_owned)));

    let store = open(&path);
    for entry_id in &acked {
        assert!(store.get_entry(entry_id).unwrap().is_some(), "acknowledged entry {entry_id} was lost");
    }
    let revision = store.current_revision().unwrap();
    assert!(revision >= u64::try_from(acked.len()).unwrap());
    assert_eq!(store.count_entries().unwrap(), revision, "entries and revisions agree after the crash");
}
