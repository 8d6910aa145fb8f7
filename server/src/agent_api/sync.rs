//! `SyncEntries`: the server-push stream of an agent's authorized entries and bundles
//! (spec: server-agent-flow §4; protocol in the `SyncEntriesResponse` comments of
//! `agent.proto`).
//!
//! One task per open stream:
//!
//! 1. `bundles` (own bundle + the federated bundles named by the agent's entries);
//! 2. the initial catch-up: when the agent's `revision` equals the store's current revision,
//!    nothing; otherwise a full snapshot, read the way the change-feed protocol prescribes
//!    (current revision first, then the authorized set), in pages of at most
//!    [`PAGE_SIZE`] entries and [`PAGE_BYTES`] bytes, each entry written from the encoding
//!    the store's `Arc` keeps (see [`super::wire`]); then `synced`;
//! 3. then it waits on the datastore's revision subscription. Each time the revision
//!    advances it moves the agent's [`AuthorizedSet`] forward with the change log and sends
//!    what changed: `entry_upserted` for new or changed entries (their revision),
//!    `entry_deleted` for entries that were deleted or left the set, in revision order. Each
//!    change costs reading the changed entry, not the agent's whole set; a change elsewhere in
//!    the parent graph (a node alias, an intermediate parent) that moves entries in or out of
//!    the set makes the set be computed again and the difference sent, so authorization stays
//!    exact (see [`super::authz`]);
//! 4. every [`RECHECK_INTERVAL`] it re-authenticates the agent (evicted, banned, SVID
//!    superseded or expired end the stream with `UNAUTHENTICATED`/`PERMISSION_DENIED`) and
//!    re-sends `bundles` when the own bundle's or a relevant federated bundle's sequence
//!    changed, or the set of tainted authorities (forced rotation) changed;
//! 5. server shutdown ends the stream with `UNAVAILABLE`.
//!
//! Known limitation: resuming from an older non-zero revision gets a snapshot, not a replay,
//! because the server does not know which entries the agent held at that revision (see the
//! module docs of `agent_api`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::Bundle;
use tessera_wire::tessera::agent::v1 as pb;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::auth::{AuthenticatedAgent, HeldNode, recheck};
use super::authz::{AgentIdentity, AuthorizedEntries, AuthorizedSet, SetChange, diff};
use super::convert::{bundle_to_proto, unix_seconds};
use super::feed::ChangeFeed;
#[cfg(doc)]
use super::wire::{PAGE_BYTES, PAGE_SIZE};
use super::wire::{SyncMessage, snapshot_pages};
use crate::ca::TaintedAuthorities;
use crate::datastore::{DataStoreError, SharedEntry, blocking};
use crate::server::ServerState;

/// How often an open stream re-authenticates its agent and looks at the bundles.
pub(crate) const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

use pb::sync_entries_response::Event;

pub(crate) type Sender = mpsc::Sender<Result<SyncMessage, Status>>;

/// Why the loop stopped early: the client went away (nothing to send) or a status to end with.
enum Stop {
    Gone,
    Status(Status),
}

impl From<Status> for Stop {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

async fn send(tx: &Sender, event: Event) -> Result<(), Stop> {
    send_message(tx, SyncMessage::Other(pb::SyncEntriesResponse { event: Some(event) })).await
}

async fn send_message(tx: &Sender, message: SyncMessage) -> Result<(), Stop> {
    tx.send(Ok(message)).await.map_err(|_| Stop::Gone)
}

fn now_secs() -> u64 {
    u64::try_from(unix_seconds(SystemTime::now())).unwrap_or(0)
}

fn datastore_status(err: DataStoreError) -> Status {
    Status::unavailable(format!("datastore: {err}"))
}

/// The agent's authorized set, computed at a revision read before its entries.
async fn read_set(state: &Arc<ServerState>, identity: &AgentIdentity) -> Result<AuthorizedSet, Status> {
    let (server_id, identity) = (state.server_id().clone(), identity.clone());
    blocking(state.datastore(), move |store| AuthorizedSet::compute(store, &server_id, &identity, now_secs()))
        .await
        .map_err(datastore_status)
}

/// Moves `set` to the store's current revision; returns it with what changed.
async fn advance_set(
    state: &Arc<ServerState>,
    mut set: AuthorizedSet,
) -> Result<(AuthorizedSet, Vec<SetChange>), Status> {
    let server_id = state.server_id().clone();
    blocking(state.datastore(), move |store| {
        let changes = set.advance(store, &server_id, now_secs())?;
        Ok((set, changes))
    })
    .await
    .map_err(datastore_status)
}

/// What identifies the bundles an agent holds: own sequence + (trust domain, sequence) of
/// each federated bundle + the tainted authorities of the own CA.
type BundlesKey = (u64, Vec<(String, u64)>, Arc<TaintedAuthorities>);

/// The federated bundles a stream last read: for which trust domains, at which bundle
/// generation ([`crate::datastore::DataStore::bundle_generation`], read before them). They
/// are read again only when either changed, so the periodic check of an idle stream costs no
/// datastore read (issue 7).
#[derive(Debug, Default)]
struct HeldBundles {
    domains: Vec<TrustDomain>,
    generation: u64,
    federated: Vec<Bundle>,
    /// Loads of the federated bundles so far.
    reads: u64,
}

impl HeldBundles {
    /// The own bundle (shared, not copied) and the federated bundles of `domains`.
    async fn current(
        &mut self,
        state: &Arc<ServerState>,
        domains: Vec<TrustDomain>,
    ) -> Result<(Arc<Bundle>, &[Bundle]), Status> {
        let own = state.ca().shared_bundle();
        let generation = state.datastore().bundle_generation();
        if self.reads == 0 || domains != self.domains || generation != self.generation {
            self.federated = load_federated(state, domains.clone()).await?;
            self.domains = domains;
            self.generation = generation;
            self.reads += 1;
        }
        Ok((own, &self.federated))
    }
}

/// The own bundle and the federated bundles of `domains` that exist and parse.
pub(crate) async fn load_bundles(
    state: &Arc<ServerState>,
    domains: Vec<TrustDomain>,
) -> Result<(Bundle, Vec<Bundle>), Status> {
    let own = state.ca().bundle();
    Ok((own, load_federated(state, domains).await?))
}

/// The federated bundles of `domains` that exist and parse (no datastore call for none).
async fn load_federated(state: &Arc<ServerState>, domains: Vec<TrustDomain>) -> Result<Vec<Bundle>, Status> {
    if domains.is_empty() {
        return Ok(Vec::new());
    }
    let stored = blocking(state.datastore(), move |store| {
        let mut out = Vec::new();
        for td in domains {
            if let Some(bundle) = store.get_bundle(&td)? {
                out.push(bundle);
            }
        }
        Ok(out)
    })
    .await
    .map_err(datastore_status)?;
    Ok(stored
        .into_iter()
        .filter_map(|b| match Bundle::from_json(b.trust_domain.clone(), &b.data) {
            Ok(mut bundle) => {
                bundle.set_sequence(b.sequence);
                Some(bundle)
            }
            Err(err) => {
                tracing::warn!(trust_domain = %b.trust_domain, error = %err, "stored federated bundle does not parse; not served");
                None
            }
        })
        .collect())
}

fn bundles_key(state: &ServerState, own: &Bundle, federated: &[Bundle]) -> BundlesKey {
    (
        own.sequence(),
        federated.iter().map(|b| (b.trust_domain().name().to_owned(), b.sequence())).collect(),
        state.ca().tainted(),
    )
}

/// The stream task: runs the protocol until the client leaves, the agent is refused, or the
/// server stops.
pub(crate) async fn run(
    state: Arc<ServerState>,
    feed: Arc<ChangeFeed>,
    agent: AuthenticatedAgent,
    from_revision: u64,
    tx: Sender,
    stopped: watch::Receiver<bool>,
) {
    let agent_id = agent.id().clone();
    let _open = state.metrics().sync_stream_opened();
    match run_inner(&state, &feed, agent, from_revision, &tx, stopped).await {
        Ok(()) | Err(Stop::Gone) => {}
        Err(Stop::Status(status)) => {
            tracing::info!(agent = %agent_id, code = ?status.code(), reason = %status.message(), "entry sync stream ended");
            let _ = tx.send(Err(status)).await;
        }
    }
}

async fn run_inner(
    state: &Arc<ServerState>,
    feed: &ChangeFeed,
    mut agent: AuthenticatedAgent,
    from_revision: u64,
    tx: &Sender,
    stopped: watch::Receiver<bool>,
) -> Result<(), Stop> {
    let stop = crate::server::stop_requested(stopped);
    tokio::pin!(stop);
    let mut revisions = state.datastore().subscribe();
    revisions.borrow_and_update();
    let own_td = state.trust_domain().clone();

    let mut held = read_set(state, &agent.identity).await?;
    let mut revision = held.revision();
    let mut held_bundles = HeldBundles::default();
    let (own, federated) = held_bundles.current(state, held.federated_domains(&own_td)).await?;
    let mut bundles = bundles_key(state, &own, federated);
    send(tx, bundles_event(&own, federated, &bundles.2)).await?;
    let mut held_node = HeldNode::default();

    if from_revision == 0 || from_revision != revision {
        send_snapshot(tx, revision, held.entries()).await?;
    }
    send(tx, Event::Synced(pb::Synced { revision })).await?;

    let mut ticker = tokio::time::interval(RECHECK_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => {
                return Err(Status::unavailable("server is shutting down").into());
            }
            () = tx.closed() => return Err(Stop::Gone),
            changed = revisions.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("datastore subscription closed").into());
                }
                let target = *revisions.borrow_and_update();
                if target <= revision {
                    continue;
                }
                // Changes of other agents' entries: passed over without a datastore read.
                if let Some(changes) = feed.since(state.datastore(), held.revision(), target).await
                    && changes.last().is_some_and(|last| last.revision >= target)
                    && !held.expires_by(now_secs())
                    && !changes.iter().any(|c| held.concerns(state.server_id(), &c.entry_id, c.entry.as_deref().map(SharedEntry::entry)))
                {
                    held.pass_to(target);
                    revision = held.revision();
                    continue;
                }
                let changed_at = std::time::Instant::now();
                let (set, changes) = advance_set(state, held).await?;
                held = set;
                send_changes(tx, changes).await?;
                state.metrics().sync_delivered(changed_at);
                revision = held.revision();
                // The federated bundles needed may have changed with the entries.
                bundles = resend_bundles_if_changed(state, tx, &held, &own_td, &bundles, &mut held_bundles).await?;
            }
            _ = ticker.tick() => {
                let node = recheck(state, &agent, &mut held_node).await?;
                if node.selectors != agent.identity.node_selectors {
                    // Re-attestation changed the node selectors: node aliases may differ.
                    agent.identity.node_selectors = node.selectors.clone();
                    let new_set = read_set(state, &agent.identity).await?;
                    send_changes(tx, diff(new_set.revision(), held.entries(), new_set.entries())).await?;
                    revision = new_set.revision().max(revision);
                    held = new_set;
                } else if held.expires_by(now_secs()) {
                    // An entry (or node alias) expired: it leaves the set now, not at the next
                    // change.
                    let (set, changes) = advance_set(state, held).await?;
                    held = set;
                    send_changes(tx, changes).await?;
                    revision = held.revision().max(revision);
                }
                bundles = resend_bundles_if_changed(state, tx, &held, &own_td, &bundles, &mut held_bundles).await?;
            }
        }
    }
}

fn bundles_event(own: &Bundle, federated: &[Bundle], tainted: &TaintedAuthorities) -> Event {
    Event::Bundles(pb::BundlesUpdate {
        bundle: Some(bundle_to_proto(own)),
        federated_bundles: federated.iter().map(bundle_to_proto).collect(),
        tainted_x509_authorities: tainted.x509.clone(),
        tainted_jwt_key_ids: tainted.jwt_key_ids.clone(),
    })
}

async fn resend_bundles_if_changed(
    state: &Arc<ServerState>,
    tx: &Sender,
    held: &AuthorizedSet,
    own_td: &TrustDomain,
    previous: &BundlesKey,
    held_bundles: &mut HeldBundles,
) -> Result<BundlesKey, Stop> {
    let (own, federated) = held_bundles.current(state, held.federated_domains(own_td)).await?;
    let key = bundles_key(state, &own, federated);
    if &key != previous {
        send(tx, bundles_event(&own, federated, &key.2)).await?;
    }
    Ok(key)
}

async fn send_snapshot(tx: &Sender, revision: u64, set: &AuthorizedEntries) -> Result<(), Stop> {
    let entries: Vec<&Arc<SharedEntry>> = set.sorted();
    for page in snapshot_pages(revision, &entries) {
        send_message(tx, page).await?;
    }
    Ok(())
}

/// The events that turn `old` into `new`, in revision order.
#[cfg(test)]
pub(crate) fn diff_events(revision: u64, old: &AuthorizedEntries, new: &AuthorizedEntries) -> Vec<Event> {
    diff(revision, old, new).into_iter().filter_map(|change| change_message(change).into_proto().event).collect()
}

/// An upsert is written from the entry's kept encoding, as snapshot pages are.
fn change_message(change: SetChange) -> SyncMessage {
    match change {
        SetChange::Upsert(entry) => {
            let revision = entry.revision;
            SyncMessage::Upserted { entry, revision }
        }
        SetChange::Delete { entry_id, revision } => SyncMessage::Other(pb::SyncEntriesResponse {
            event: Some(Event::EntryDeleted(pb::EntryDeleted { entry_id, revision })),
        }),
    }
}

async fn send_changes(tx: &Sender, changes: Vec<SetChange>) -> Result<(), Stop> {
    for change in changes {
        send_message(tx, change_message(change)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::RegistrationEntry;
    use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

    fn entry(id: &str, revision: u64) -> SharedEntry {
        let mut e = RegistrationEntry::new(
            id,
            SpiffeId::parse("spiffe://example.org/w").unwrap(),
            SpiffeId::parse("spiffe://example.org/a").unwrap(),
            SelectorSet::parse_all(&["t:1"]).unwrap(),
        );
        e.revision = revision;
        SharedEntry::new(e)
    }

    /// Issue 7: an idle stream's periodic look at the bundles reads the datastore only after a
    /// bundle write or when the trust domains it needs change.
    #[tokio::test]
    async fn held_bundles_are_read_again_only_after_a_bundle_write() {
        let (_dir, state, _agent) = crate::agent_api::auth::test_state_with_agent();
        let partner = TrustDomain::new("partner.test").unwrap();
        let mut held = HeldBundles::default();
        for _ in 0..5 {
            held.current(&state, vec![partner.clone()]).await.unwrap();
        }
        assert_eq!(held.reads, 1, "unchanged bundles were read again");
        state.datastore().set_bundle(&partner, b"{}", None).unwrap();
        held.current(&state, vec![partner.clone()]).await.unwrap();
        held.current(&state, vec![partner.clone()]).await.unwrap();
        assert_eq!(held.reads, 2, "a bundle write is read once");
        held.current(&state, Vec::new()).await.unwrap();
        assert_eq!(held.reads, 3, "other trust domains are read");
    }

    #[test]
    fn diff_sends_changes_in_revision_order() {
        let old: AuthorizedEntries =
            [("a", 1), ("b", 2), ("c", 3), ("e", 4)].map(|(id, r)| Arc::new(entry(id, r))).into_iter().collect();
        let new: AuthorizedEntries = [("a", 1), ("c", 7), ("d", 5), ("f", 5), ("e", 8)]
            .map(|(id, r)| Arc::new(entry(id, r)))
            .into_iter()
            .collect();
        let events = diff_events(8, &old, &new);
        let summary: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::EntryUpserted(u) => format!("+{}@{}", u.entry.as_ref().unwrap().id, u.revision),
                Event::EntryDeleted(d) => format!("-{}@{}", d.entry_id, d.revision),
                _ => "?".into(),
            })
            .collect();
        // At one revision: upserts, then deletions, each by entry ID.
        assert_eq!(summary, vec!["+d@5", "+f@5", "+c@7", "+e@8", "-b@8"]);
        assert!(diff_events(8, &new, &new).is_empty());
    }
}
