#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every configuration key the agent accepts is documented in docs/agent-configuration.md.

use tessera_agent::config::AGENT_KEYS;

#[test]
fn every_config_key_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent-configuration.md")).unwrap();
    let missing: Vec<&str> = AGENT_KEYS.iter().copied().filter(|key| !doc.contains(&format!("| `{key}` |"))).collect();
    assert!(missing.is_empty(), "undocumented agent configuration keys: {missing:?}");
}
