//! Which registration entries an agent is authorized for (spec: server-agent-flow §4).
//!
//! The one place this rule lives; entry sync, X.509-SVID and JWT-SVID minting and bundle
//! delivery all call [`authorized_entries`]:
//!
//! 1. the *roots*: the agent's own SPIFFE ID, and the SPIFFE IDs of the node-alias entries
//!    that match the agent (entries parented to the server ID, `spiffe://<td>/tessera/server`,
//!    whose selectors are all among the agent's node selectors, found through the selector
//!    index);
//! 2. every entry whose parent is a root, then every entry whose parent is the SPIFFE ID of
//!    an entry already included, and so on (descendants), breadth first. Each SPIFFE ID is
//!    expanded once, so cycles in the parent graph terminate; the depth is bounded by
//!    [`MAX_DEPTH`].
//!
//! Node-alias entries themselves are not in the set (they are an authorization device, not a
//! workload identity). Entries that have expired at `now` are neither included nor expanded.

use std::collections::{BTreeMap, HashSet};

use tessera_spiffe::{SelectorSet, SpiffeId};

use crate::datastore::{DataStore, RegistrationEntry, Result};

/// Most parent levels followed below the roots.
pub(crate) const MAX_DEPTH: usize = 32;

/// Who is asking: the agent's ID and its node selectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentIdentity {
    pub(crate) agent_id: SpiffeId,
    pub(crate) node_selectors: SelectorSet,
}

/// The node-alias entries (parent `server_id`) whose selectors are all among `node_selectors`.
pub(crate) fn matching_aliases(
    store: &dyn DataStore,
    server_id: &SpiffeId,
    node_selectors: &SelectorSet,
    now: u64,
) -> Result<Vec<RegistrationEntry>> {
    let mut seen = HashSet::new();
    let mut aliases = Vec::new();
    for selector in node_selectors {
        for entry in store.list_entries_by_selector(selector)? {
            if entry.parent_id == *server_id
                && !entry.is_expired(now)
                && entry.selectors.is_subset_of(node_selectors)
                && seen.insert(entry.id.clone())
            {
                aliases.push(entry);
            }
        }
    }
    Ok(aliases)
}

/// The entries `agent` is authorized for, by entry ID. See the [module docs](self).
pub(crate) fn authorized_entries(
    store: &dyn DataStore,
    server_id: &SpiffeId,
    agent: &AgentIdentity,
    now: u64,
) -> Result<BTreeMap<String, RegistrationEntry>> {
    let mut expanded: HashSet<SpiffeId> = HashSet::new();
    let mut frontier = vec![agent.agent_id.clone()];
    for alias in matching_aliases(store, server_id, &agent.node_selectors, now)? {
        frontier.push(alias.spiffe_id);
    }
    // The server ID is never a parent to expand here: its children are node aliases, which
    // only count through the selector match above.
    expanded.insert(server_id.clone());
    frontier.retain(|id| expanded.insert(id.clone()));

    let mut authorized = BTreeMap::new();
    for _ in 0..=MAX_DEPTH {
        if frontier.is_empty() {
            break;
        }
        let children = store.list_entries_by_parents(&frontier)?;
        frontier = Vec::new();
        for child in children {
            if child.is_expired(now) || authorized.contains_key(&child.id) {
                continue;
            }
            if expanded.insert(child.spiffe_id.clone()) {
                frontier.push(child.spiffe_id.clone());
            }
            authorized.insert(child.id.clone(), child);
        }
    }
    if !frontier.is_empty() {
        tracing::warn!(agent = %agent.agent_id, "entry parent chain deeper than {MAX_DEPTH} levels; deeper entries are not authorized");
    }
    Ok(authorized)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::MemoryDataStore;
    use tessera_spiffe::Selector;

    fn id(path: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap()
    }

    fn selectors(list: &[&str]) -> SelectorSet {
        SelectorSet::parse_all(list).unwrap()
    }

    fn entry(store: &MemoryDataStore, entry_id: &str, spiffe: &str, parent: &SpiffeId, sel: &[&str]) {
        store.create_entry(&RegistrationEntry::new(entry_id, id(spiffe), parent.clone(), selectors(sel))).unwrap();
    }

    fn ids(map: &BTreeMap<String, RegistrationEntry>) -> Vec<&str> {
        map.keys().map(String::as_str).collect()
    }

    #[test]
    fn children_aliases_and_descendants_are_authorized_and_nothing_else() {
        let store = MemoryDataStore::default();
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        let other_agent = id("/tessera/agent/join_token/b");
        // Direct child of the agent, and its child (a descendant).
        entry(&store, "direct", "/web", &agent, &["unix:uid:1"]);
        entry(&store, "grandchild", "/web/sidecar", &id("/web"), &["unix:uid:2"]);
        // A node alias matching the agent's node selectors, and a child of the alias.
        entry(&store, "alias", "/cluster", &server, &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a"]);
        entry(&store, "alias-child", "/cluster/db", &id("/cluster"), &["unix:uid:3"]);
        // An alias that needs a selector the agent lacks, and its child.
        entry(
            &store,
            "alias-x",
            "/other-cluster",
            &server,
            &["spiffe_id:spiffe://example.org/tessera/agent/join_token/a", "k8s:ns:x"],
        );
        entry(&store, "alias-x-child", "/other-cluster/db", &id("/other-cluster"), &["unix:uid:3"]);
        // Another agent's entries.
        entry(&store, "other", "/other", &other_agent, &["unix:uid:1"]);

        let identity = AgentIdentity {
            agent_id: agent.clone(),
            node_selectors: [Selector::new("spiffe_id", agent.as_str()).unwrap()].into_iter().collect(),
        };
        let set = authorized_entries(&store, &server, &identity, 0).unwrap();
        assert_eq!(ids(&set), vec!["alias-child", "direct", "grandchild"]);

        // With the extra node selector, the second alias matches too.
        let mut more = identity.clone();
        more.node_selectors.insert(Selector::new("k8s", "ns:x").unwrap());
        let set = authorized_entries(&store, &server, &more, 0).unwrap();
        assert_eq!(ids(&set), vec!["alias-child", "alias-x-child", "direct", "grandchild"]);

        // The other agent sees only its own entry.
        let other = AgentIdentity { agent_id: other_agent, node_selectors: SelectorSet::new() };
        assert_eq!(ids(&authorized_entries(&store, &server, &other, 0).unwrap()), vec!["other"]);
    }

    #[test]
    fn cycles_terminate_and_expired_entries_are_skipped() {
        let store = MemoryDataStore::default();
        let server = id("/tessera/server");
        let agent = id("/tessera/agent/join_token/a");
        entry(&store, "a", "/x", &agent, &["t:1"]);
        entry(&store, "b", "/y", &id("/x"), &["t:1"]);
        // A cycle: /x is also a child of /y, and the agent ID itself is a child of /y.
        entry(&store, "c", "/x", &id("/y"), &["t:2"]);
        entry(&store, "d", "/tessera/agent/join_token/a", &id("/y"), &["t:3"]);
        let mut expired = RegistrationEntry::new("e", id("/z"), agent.clone(), selectors(&["t:1"]));
        expired.expires_at = Some(100);
        store.create_entry(&expired).unwrap();
        entry(&store, "f", "/z/child", &id("/z"), &["t:1"]);

        let identity = AgentIdentity { agent_id: agent, node_selectors: SelectorSet::new() };
        assert_eq!(ids(&authorized_entries(&store, &server, &identity, 100).unwrap()), vec!["a", "b", "c", "d"]);
        // Before its expiry the entry and its child are in.
        assert_eq!(
            ids(&authorized_entries(&store, &server, &identity, 99).unwrap()),
            vec!["a", "b", "c", "d", "e", "f"]
        );
    }
}
