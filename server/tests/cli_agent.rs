//! `tessera-server agent list|show|ban|evict`: the real binary against a real server started
//! in-process (real admin socket), whose datastore the test holds so it can plant an attested
//! node the way node attestation records one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::sync::Arc;

use cli_support::{cli, fails, field, json, ok, short_tempdir};
use tessera_server::config::ServerConfig;
use tessera_server::datastore::{AttestedNode, DataStore, DataStoreOptions, MemoryDataStore};
use tessera_server::server;
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};

const AGENT: &str = "spiffe://example.org/tessera/agent/join_token/t1";
const OTHER: &str = "spiffe://example.org/tessera/agent/join_token/t2";

fn node(spiffe_id: &str, token: &str) -> AttestedNode {
    AttestedNode {
        spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
        attestation_type: "join_token".into(),
        serial: "0a1b2c".into(),
        new_serial: None,
        // 2096-10-02T07:06:40Z
        expires_at: 4_000_000_000,
        banned: false,
        selectors: [Selector::new("join_token", token).unwrap()].into_iter().collect::<SelectorSet>(),
        can_reattest: false,
    }
}

#[test]
fn agent_commands_on_attested_nodes() {
    let dir = short_tempdir();
    let config = ServerConfig {
        trust_domain: TrustDomain::new("example.org").unwrap(),
        data_dir: dir.path().join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.path().join("private/admin.sock"),
        ..ServerConfig::default()
    };
    let store = Arc::new(MemoryDataStore::new(DataStoreOptions::default()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let running = runtime.block_on(server::start_with(config, Arc::clone(&store) as Arc<dyn DataStore>)).unwrap();
    let socket = running.admin_socket().to_path_buf();
    let run = |args: &[&str]| cli(&socket, args);

    assert_eq!(ok(run(&["agent", "list"])), "Found 0 attested agents\n");
    store.create_attested_node(&node(AGENT, "t1")).unwrap();
    store.create_attested_node(&node(OTHER, "t2")).unwrap();

    // list and show: SPIFFE ID, attestation type, serial, SVID expiry, selectors.
    let listed = ok(run(&["agent", "list"]));
    assert!(listed.starts_with("Found 2 attested agents\n"), "{listed}");
    assert!(listed.contains(&format!("SPIFFE ID: {AGENT}\n")) && listed.contains(&format!("SPIFFE ID: {OTHER}\n")));
    let shown = ok(run(&["agent", "show", "--spiffe-id", AGENT]));
    assert_eq!(field(&shown, "SPIFFE ID: "), AGENT);
    assert_eq!(field(&shown, "Attestation type: "), "join_token");
    assert_eq!(field(&shown, "Serial: "), "0a1b2c");
    assert_eq!(field(&shown, "Expires at: "), "2096-10-02T07:06:40Z");
    assert_eq!(field(&shown, "Banned: "), "false");
    assert_eq!(field(&shown, "Selector: "), "join_token:t1");
    let shown = json(run(&["agent", "show", "--spiffe-id", AGENT, "--output", "json"]));
    assert_eq!(shown["spiffe_id"], AGENT);
    assert_eq!(shown["selectors"], serde_json::json!(["join_token:t1"]));
    assert_eq!(shown["expires_at"], "2096-10-02T07:06:40Z");
    let listed = json(run(&["agent", "list", "--output", "json"]));
    assert_eq!(listed["agents"].as_array().unwrap().len(), 2);

    // ban: kept, marked banned, serial invalidated.
    assert_eq!(ok(run(&["agent", "ban", "--spiffe-id", AGENT])), format!("Banned {AGENT}\n"));
    let banned = store.get_attested_node(&SpiffeId::parse(AGENT).unwrap()).unwrap().unwrap();
    assert!(banned.banned && banned.serial.is_empty(), "{banned:?}");
    assert_eq!(field(&ok(run(&["agent", "show", "--spiffe-id", AGENT])), "Banned: "), "true");

    // evict: deleted, so it must attest again.
    let evicted = json(run(&["agent", "evict", "--spiffe-id", AGENT, "--output", "json"]));
    assert_eq!(evicted, serde_json::json!({"action": "evicted", "id": AGENT}));
    assert!(store.get_attested_node(&SpiffeId::parse(AGENT).unwrap()).unwrap().is_none());
    let listed = ok(run(&["agent", "list"]));
    assert!(listed.starts_with("Found 1 attested agent\n") && !listed.contains(AGENT), "{listed}");

    // Unknown and malformed IDs.
    fails(run(&["agent", "show", "--spiffe-id", AGENT]), "not found");
    fails(run(&["agent", "ban", "--spiffe-id", AGENT]), "not found");
    fails(run(&["agent", "evict", "--spiffe-id", AGENT]), "not found");
    fails(run(&["agent", "show", "--spiffe-id", "agent-1"]), "invalid spiffe_id");
    fails(run(&["agent", "ban", "--spiffe-id", "spiffe://other.org/tessera/agent/x"]), "invalid spiffe_id");
    // The other agent was not affected by any of this.
    assert_eq!(field(&ok(run(&["agent", "show", "--spiffe-id", OTHER])), "Banned: "), "false");

    runtime.block_on(running.shutdown()).unwrap();
    fails(cli(&socket, &["agent", "list"]), "cannot connect to admin socket");
}
