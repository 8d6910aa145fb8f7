//! The `SyncEntries` route, with a stream message written from each entry's kept encoding
//! (issue 7, S6).
//!
//! # Why
//!
//! A full sync converted every authorized entry to a new `common::Entry` message and tonic
//! encoded it, for every agent and every sync: about half of the server's share of a sync
//! of 10,000 entries. Each entry is now encoded once, the first time any agent's sync sends it,
//! and kept next to the store's `Arc` ([`SharedEntry::encoded_with`]); a written entry is a
//! new `Arc` with nothing kept yet, so the kept bytes always encode the entry next to them.
//!
//! # How
//!
//! protobuf writes an embedded message as a length-delimited field holding the message's own
//! encoding, so an entry's kept bytes written as field 3 of `EntrySnapshotPage` (or field 1 of
//! `EntryUpserted`) are exactly what the generated types write. [`SyncMessage`] implements
//! `prost::Message` by hand: snapshot pages and upserts are written from the kept bytes, every
//! other event through the generated type. Its encoding is byte for byte the generated
//! `SyncEntriesResponse` of the same content (tests below), so agents see no difference.
//!
//! The generated `AgentServiceServer` fixes the stream's item to the generated type, so
//! [`AgentRoutes`] sits in front of it: `/tessera.agent.v1.AgentService/SyncEntries` goes to a
//! `tonic::server::Grpc` with a codec for [`SyncMessage`], every other path to the generated
//! server. Both get the same settings: requests up to [`MAX_REQUEST_BYTES`], responses
//! unbounded (tonic's defaults, as before), no compression (tonic is built without it). The
//! request reaches the handler with its extensions (the TLS peer chain), so authentication is
//! the generated route's, and the handler is the same `AgentApi::open_sync`.
//!
//! # Pages by size
//!
//! A snapshot page holds at most [`PAGE_SIZE`] entries and, now that each entry's size is
//! known, at most [`PAGE_BYTES`] of entries (a page always holds at least one entry). Before,
//! 200 large entries (many DNS names or selectors) could make a page larger than the 4 MiB an
//! agent decodes.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::tessera::agent::v1::agent_service_server::{AgentServiceServer, SERVICE_NAME};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::convert::{encoded_entry, entry_to_proto};
use super::{AgentApi, BoxStream};
use crate::datastore::SharedEntry;

/// Entries per snapshot page, at most.
pub(crate) const PAGE_SIZE: usize = 200;
/// Bytes of entries per snapshot page, at most (a page holds at least one entry whatever its
/// size): a quarter of the 4 MiB a tonic client decodes by default.
pub(crate) const PAGE_BYTES: usize = 1024 * 1024;
/// Largest request message the agent API decodes, on every route (tonic's default).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// The path of `SyncEntries`.
pub(crate) const SYNC_ENTRIES_PATH: &str = "/tessera.agent.v1.AgentService/SyncEntries";

/// Field numbers of `SyncEntriesResponse.event`, `EntrySnapshotPage` and `EntryUpserted`
/// (`proto/schema/tessera/agent/v1/agent.proto`).
const EVENT_SNAPSHOT_PAGE: u32 = 1;
const EVENT_ENTRY_UPSERTED: u32 = 2;
const PAGE_REVISION: u32 = 1;
const PAGE_PAGE: u32 = 2;
const PAGE_ENTRIES: u32 = 3;
const PAGE_LAST_PAGE: u32 = 4;
const UPSERTED_ENTRY: u32 = 1;
const UPSERTED_REVISION: u32 = 2;

/// The kept encoding of `entry` (made now if no sync sent it yet).
fn entry_bytes(entry: &SharedEntry) -> &[u8] {
    entry.encoded_with(encoded_entry)
}

/// One message of the `SyncEntries` stream; see the [module docs](self).
#[derive(Debug, Clone)]
pub(crate) enum SyncMessage {
    /// A snapshot page, its entries written from their kept encoding.
    Page { revision: u64, page: u32, entries: Vec<Arc<SharedEntry>>, last_page: bool },
    /// An entry created, changed or now visible, written from its kept encoding.
    Upserted { entry: Arc<SharedEntry>, revision: u64 },
    /// Every other event, as the generated type.
    Other(pb::SyncEntriesResponse),
}

impl Default for SyncMessage {
    fn default() -> Self {
        Self::Other(pb::SyncEntriesResponse::default())
    }
}

/// Length of a length-delimited field of `len` bytes with tag `tag`.
fn delimited_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

fn put_delimited(tag: u32, bytes: &[u8], buf: &mut impl BufMut) {
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

/// Length of a `uint64`/`uint32` field, left out at 0 as proto3 does.
fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 { 0 } else { key_len(tag) + encoded_len_varint(value) }
}

fn put_varint_field(tag: u32, value: u64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value, buf);
    }
}

impl SyncMessage {
    /// Length of the embedded page or upsert message (without its key and length).
    fn body_len(&self) -> usize {
        match self {
            Self::Page { revision, page, entries, last_page } => {
                varint_field_len(PAGE_REVISION, *revision)
                    + varint_field_len(PAGE_PAGE, u64::from(*page))
                    + entries.iter().map(|e| delimited_len(PAGE_ENTRIES, entry_bytes(e).len())).sum::<usize>()
                    + varint_field_len(PAGE_LAST_PAGE, u64::from(*last_page))
            }
            Self::Upserted { entry, revision } => {
                delimited_len(UPSERTED_ENTRY, entry_bytes(entry).len()) + varint_field_len(UPSERTED_REVISION, *revision)
            }
            Self::Other(_) => 0,
        }
    }

    /// The same message as the generated type, each entry converted anew (the stream of the
    /// generated `AgentService::sync_entries`, and the reference of the tests).
    pub(crate) fn into_proto(self) -> pb::SyncEntriesResponse {
        use pb::sync_entries_response::Event;
        let event = match self {
            Self::Page { revision, page, entries, last_page } => Event::SnapshotPage(pb::EntrySnapshotPage {
                revision,
                page,
                entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
                last_page,
            }),
            Self::Upserted { entry, revision } => {
                Event::EntryUpserted(pb::EntryUpserted { entry: Some(entry_to_proto(&entry)), revision })
            }
            Self::Other(message) => return message,
        };
        pb::SyncEntriesResponse { event: Some(event) }
    }
}

impl Message for SyncMessage {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match self {
            Self::Page { revision, page, entries, last_page } => {
                encode_key(EVENT_SNAPSHOT_PAGE, WireType::LengthDelimited, buf);
                encode_varint(self.body_len() as u64, buf);
                put_varint_field(PAGE_REVISION, *revision, buf);
                put_varint_field(PAGE_PAGE, u64::from(*page), buf);
                for entry in entries {
                    put_delimited(PAGE_ENTRIES, entry_bytes(entry), buf);
                }
                put_varint_field(PAGE_LAST_PAGE, u64::from(*last_page), buf);
            }
            Self::Upserted { entry, revision } => {
                encode_key(EVENT_ENTRY_UPSERTED, WireType::LengthDelimited, buf);
                encode_varint(self.body_len() as u64, buf);
                put_delimited(UPSERTED_ENTRY, entry_bytes(entry), buf);
                put_varint_field(UPSERTED_REVISION, *revision, buf);
            }
            Self::Other(message) => message.encode_raw(buf),
        }
    }

    /// The server only sends this message; decoding one (tests) gives the generated form.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        let mut message = match std::mem::take(self) {
            Self::Other(message) => message,
            other => other.into_proto(),
        };
        let merged = message.merge_field(tag, wire_type, buf, ctx);
        *self = Self::Other(message);
        merged
    }

    fn encoded_len(&self) -> usize {
        match self {
            Self::Page { .. } => delimited_len(EVENT_SNAPSHOT_PAGE, self.body_len()),
            Self::Upserted { .. } => delimited_len(EVENT_ENTRY_UPSERTED, self.body_len()),
            Self::Other(message) => message.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A snapshot of `entries` (ordered by ID) at `revision`: pages of at most [`PAGE_SIZE`]
/// entries and [`PAGE_BYTES`] bytes of entries, at least one entry each; one empty page when
/// there is no entry.
pub(crate) fn snapshot_pages(revision: u64, entries: &[&Arc<SharedEntry>]) -> Vec<SyncMessage> {
    let mut pages = Vec::with_capacity(entries.len() / PAGE_SIZE + 1);
    let mut current: Vec<Arc<SharedEntry>> = Vec::new();
    let mut bytes = 0usize;
    let close = |current: &mut Vec<Arc<SharedEntry>>, pages: &mut Vec<SyncMessage>| {
        let page = u32::try_from(pages.len()).unwrap_or(u32::MAX);
        pages.push(SyncMessage::Page { revision, page, entries: std::mem::take(current), last_page: false });
    };
    for entry in entries {
        let size = delimited_len(PAGE_ENTRIES, entry_bytes(entry).len());
        if !current.is_empty() && (current.len() >= PAGE_SIZE || bytes + size > PAGE_BYTES) {
            close(&mut current, &mut pages);
            bytes = 0;
        }
        bytes += size;
        current.push(Arc::clone(entry));
    }
    if !current.is_empty() || pages.is_empty() {
        close(&mut current, &mut pages);
    }
    if let Some(SyncMessage::Page { last_page, .. }) = pages.last_mut() {
        *last_page = true;
    }
    pages
}

/// The agent API's routes: `SyncEntries` here, everything else through the generated server
/// (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct AgentRoutes {
    api: AgentApi,
    generated: AgentServiceServer<AgentApi>,
}

impl AgentRoutes {
    pub(crate) fn new(api: AgentApi) -> Self {
        let generated = AgentServiceServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST_BYTES);
        Self { api, generated }
    }
}

impl NamedService for AgentRoutes {
    const NAME: &'static str = SERVICE_NAME;
}

/// `SyncEntries` as a tonic streaming method with [`SyncMessage`] items.
struct SyncEntriesMethod(AgentApi);

impl ServerStreamingService<pb::SyncEntriesRequest> for SyncEntriesMethod {
    type Response = SyncMessage;
    type ResponseStream = BoxStream<SyncMessage>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<pb::SyncEntriesRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.open_sync(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for AgentRoutes
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SYNC_ENTRIES_PATH {
            return self.generated.call(request);
        }
        let method = SyncEntriesMethod(self.api.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<SyncMessage, pb::SyncEntriesRequest>::default();
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};
    use tessera_wire::tessera::common::v1 as common;
    use tower::ServiceExt;

    use super::*;
    use crate::datastore::{DataStore, DataStoreOptions, RegistrationEntry, SledDataStore};

    fn entry_strategy() -> impl Strategy<Value = RegistrationEntry> {
        let ids = ("[a-z0-9]{1,12}", "[a-z]{1,8}(/[a-z0-9]{1,6}){0,2}", "[a-z]{1,8}");
        let selectors = proptest::collection::vec(("[a-z]{1,6}", "[a-z0-9:]{1,12}"), 1..4);
        let names = (
            proptest::collection::vec("[a-z]{1,10}\\.example", 0..3),
            proptest::collection::vec("[a-z]{1,8}\\.test", 0..3),
            "\\PC{0,12}",
        );
        let flags = (any::<bool>(), any::<bool>(), any::<Option<u64>>(), any::<Option<u64>>(), any::<Option<u64>>());
        (ids, selectors, names, flags, any::<u64>()).prop_map(
            |((id, path, parent), selectors, (dns, federates, hint), (admin, downstream, x509, jwt, expires), rev)| {
                let selectors: Vec<String> = selectors.iter().map(|(kind, value)| format!("{kind}:{value}")).collect();
                let selectors: Vec<&str> = selectors.iter().map(String::as_str).collect();
                let mut entry = RegistrationEntry::new(
                    id,
                    SpiffeId::parse(&format!("spiffe://example.org/{path}")).unwrap(),
                    SpiffeId::parse(&format!("spiffe://example.org/{parent}")).unwrap(),
                    SelectorSet::parse_all(&selectors).unwrap(),
                );
                entry.dns_names = dns;
                entry.federates_with = federates.iter().map(|td| TrustDomain::new(td).unwrap()).collect();
                entry.hint = hint;
                entry.admin = admin;
                entry.downstream = downstream;
                // Zero TTLs are refused by the store; any other value, also past u32 seconds.
                entry.x509_svid_ttl = x509.map(|s| Duration::from_secs(s.max(1)));
                entry.jwt_svid_ttl = jwt.map(|s| Duration::from_secs(s.max(1)));
                entry.expires_at = expires;
                entry.revision = rev;
                entry
            },
        )
    }

    fn shared(entries: Vec<RegistrationEntry>) -> Vec<Arc<SharedEntry>> {
        entries.into_iter().map(|entry| Arc::new(SharedEntry::new(entry))).collect()
    }

    /// What the stream sent before this route: the generated types, each entry converted.
    fn generated_page(revision: u64, page: u32, entries: &[Arc<SharedEntry>], last_page: bool) -> Vec<u8> {
        pb::SyncEntriesResponse {
            event: Some(pb::sync_entries_response::Event::SnapshotPage(pb::EntrySnapshotPage {
                revision,
                page,
                entries: entries.iter().map(|e| entry_to_proto(e)).collect(),
                last_page,
            })),
        }
        .encode_to_vec()
    }

    fn decoded_page(bytes: &[u8]) -> pb::EntrySnapshotPage {
        match pb::SyncEntriesResponse::decode(bytes).unwrap().event {
            Some(pb::sync_entries_response::Event::SnapshotPage(page)) => page,
            other => panic!("not a snapshot page: {other:?}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Pages and upserts written from the kept bytes are byte for byte the generated
        /// messages, and decode with the generated types to the same entries in the same order.
        #[test]
        fn pages_and_upserts_are_the_generated_messages(
            entries in proptest::collection::vec(entry_strategy(), 0..12),
            revision in any::<u64>(),
            page in any::<u32>(),
            last_page in any::<bool>(),
        ) {
            let entries = shared(entries);
            // Twice: the first encodes and keeps each entry, the second reads the kept bytes.
            for _ in 0..2 {
                let message = SyncMessage::Page { revision, page, entries: entries.clone(), last_page };
                let bytes = message.encode_to_vec();
                prop_assert_eq!(bytes.len(), message.encoded_len());
                prop_assert_eq!(&bytes, &generated_page(revision, page, &entries, last_page));
                let decoded = decoded_page(&bytes);
                let expected: Vec<common::Entry> = entries.iter().map(|e| entry_to_proto(e)).collect();
                prop_assert_eq!(decoded.entries, expected);
                prop_assert_eq!((decoded.revision, decoded.page, decoded.last_page), (revision, page, last_page));
                prop_assert!(entries.iter().all(|e| e.is_encoded()));
            }
            for entry in &entries {
                let message = SyncMessage::Upserted { entry: Arc::clone(entry), revision };
                let generated = pb::SyncEntriesResponse {
                    event: Some(pb::sync_entries_response::Event::EntryUpserted(pb::EntryUpserted {
                        entry: Some(entry_to_proto(entry)),
                        revision,
                    })),
                };
                prop_assert_eq!(message.encoded_len(), generated.encoded_len());
                prop_assert_eq!(message.encode_to_vec(), generated.encode_to_vec());
            }
        }
    }

    #[test]
    fn other_events_and_decoding_use_the_generated_type() {
        let synced = pb::SyncEntriesResponse {
            event: Some(pb::sync_entries_response::Event::Synced(pb::Synced { revision: 7 })),
        };
        let message = SyncMessage::Other(synced.clone());
        assert_eq!(message.encode_to_vec(), synced.encode_to_vec());
        let decoded = SyncMessage::decode(synced.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.into_proto(), synced);
    }

    fn numbered(n: usize, dns_names: usize) -> Vec<Arc<SharedEntry>> {
        shared(
            (0..n)
                .map(|i| {
                    let mut entry = RegistrationEntry::new(
                        format!("e{i:06}"),
                        SpiffeId::parse(&format!("spiffe://example.org/w/{i}")).unwrap(),
                        SpiffeId::parse("spiffe://example.org/agent").unwrap(),
                        SelectorSet::parse_all(&["unix:uid:1"]).unwrap(),
                    );
                    entry.dns_names = (0..dns_names).map(|d| format!("name-{d:04}.{i}.example.org")).collect();
                    entry
                })
                .collect(),
        )
    }

    /// Every entry once, in order, in pages numbered from 0, the last one flagged.
    fn check_pages(pages: &[SyncMessage], entries: &[Arc<SharedEntry>], revision: u64) {
        let mut seen = Vec::new();
        for (index, message) in pages.iter().enumerate() {
            let bytes = message.encode_to_vec();
            // Under what an agent decodes (tonic's default, 4 MiB).
            assert!(bytes.len() < 4 * 1024 * 1024, "page {index}: {} bytes", bytes.len());
            let page = decoded_page(&bytes);
            assert_eq!((page.revision, page.page, page.last_page), (revision, index as u32, index + 1 == pages.len()));
            assert!(!page.entries.is_empty() || entries.is_empty());
            assert!(page.entries.len() <= PAGE_SIZE);
            seen.extend(page.entries.into_iter().map(|e| e.id));
        }
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        assert_eq!(seen, ids);
    }

    #[test]
    fn small_entries_make_pages_of_page_size() {
        let entries = numbered(1001, 0);
        let refs: Vec<&Arc<SharedEntry>> = entries.iter().collect();
        let pages = snapshot_pages(9, &refs);
        assert_eq!(pages.len(), 6);
        check_pages(&pages, &entries, 9);
        let empty = snapshot_pages(3, &[]);
        assert_eq!(empty.len(), 1);
        check_pages(&empty, &[], 3);
    }

    /// 200 entries of about 60 KiB made a page of about 12 MiB, which no agent decodes.
    #[test]
    fn pages_of_large_entries_are_cut_by_size() {
        let entries = numbered(200, 2000);
        assert!(entries[0].encoded_with(encoded_entry).len() > 50_000);
        let refs: Vec<&Arc<SharedEntry>> = entries.iter().collect();
        let pages = snapshot_pages(5, &refs);
        assert!(pages.len() >= 10, "{} pages", pages.len());
        check_pages(&pages, &entries, 5);
        for page in &pages {
            assert!(page.encoded_len() <= PAGE_BYTES + 64, "{}", page.encoded_len());
        }
        // An entry larger than the page budget gets a page of its own.
        let huge = numbered(3, 60_000);
        let refs: Vec<&Arc<SharedEntry>> = huge.iter().collect();
        let pages = snapshot_pages(5, &refs);
        assert_eq!(pages.len(), 3);
        check_pages(&pages, &huge, 5);
    }

    /// The kept bytes never go stale: a written entry is a new `Arc` with nothing kept, and the
    /// old `Arc` keeps encoding the old version.
    #[test]
    fn a_written_entry_is_encoded_anew() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledDataStore::open(dir.path(), DataStoreOptions::default()).unwrap();
        let entry = numbered(1, 0)[0].entry().clone();
        store.create_entry(&entry).unwrap();
        let old = store.get_entry_shared(&entry.id).unwrap().unwrap();
        let old_bytes = old.encoded_with(encoded_entry).to_vec();
        assert!(Arc::ptr_eq(&old, &store.get_entry_shared(&entry.id).unwrap().unwrap()), "the index's Arc");
        assert!(store.get_entry_shared(&entry.id).unwrap().unwrap().is_encoded(), "kept for the next reader");

        let updated = RegistrationEntry { hint: "changed".into(), ..store.get_entry(&entry.id).unwrap().unwrap() };
        let stored = store.update_entry(&updated, None).unwrap();
        let new = store.get_entry_shared(&entry.id).unwrap().unwrap();
        assert!(!Arc::ptr_eq(&old, &new));
        assert!(!new.is_encoded(), "a new version starts with nothing kept");
        let new_bytes = new.encoded_with(encoded_entry);
        assert_eq!(common::Entry::decode(new_bytes).unwrap(), entry_to_proto(&stored));
        assert_eq!(common::Entry::decode(new_bytes).unwrap().hint, "changed");
        assert_eq!(old.encoded_with(encoded_entry), old_bytes.as_slice());
        assert_eq!(common::Entry::decode(old_bytes.as_slice()).unwrap(), entry_to_proto(&old));
    }

    fn grpc_request(path: &str) -> http::Request<tonic::body::Body> {
        // An empty request message: a gRPC frame of length 0.
        let frame = vec![0u8; 5];
        http::Request::builder()
            .method("POST")
            .uri(format!("http://server{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(prost::bytes::Bytes::from(frame))))
            .unwrap()
    }

    fn routes() -> (tempfile::TempDir, AgentRoutes, tokio::sync::watch::Sender<bool>) {
        let (dir, state, _agent) = crate::agent_api::auth::test_state_with_agent();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        (dir, AgentRoutes::new(AgentApi::new(state, stopped)), stop)
    }

    fn grpc_status(response: &http::Response<tonic::body::Body>) -> Option<i32> {
        response.headers().get("grpc-status").map(|v| v.to_str().unwrap().parse().unwrap())
    }

    /// `SyncEntries` on the new route still authenticates the caller (no client certificate:
    /// UNAUTHENTICATED); other paths reach the generated server (an unknown method:
    /// UNIMPLEMENTED; `FetchBundle` needs the certificate too).
    #[tokio::test]
    async fn routes_send_sync_entries_here_and_the_rest_to_the_generated_server() {
        let (_dir, routes, _stop) = routes();
        let response = routes.clone().oneshot(grpc_request(SYNC_ENTRIES_PATH)).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::Unauthenticated as i32));
        let response = routes.clone().oneshot(grpc_request("/tessera.agent.v1.AgentService/Nope")).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::Unimplemented as i32));
        let response =
            routes.clone().oneshot(grpc_request("/tessera.agent.v1.AgentService/FetchBundle")).await.unwrap();
        assert_eq!(grpc_status(&response), Some(tonic::Code::Unauthenticated as i32));
        assert_eq!(<AgentRoutes as NamedService>::NAME, "tessera.agent.v1.AgentService");
    }

    /// Both routes refuse a request message over [`MAX_REQUEST_BYTES`] alike.
    #[tokio::test]
    async fn both_routes_keep_the_request_size_limit() {
        let (_dir, routes, _stop) = routes();
        let oversized = |path: &str| {
            let mut frame = vec![0u8];
            frame.extend_from_slice(&u32::try_from(MAX_REQUEST_BYTES + 1).unwrap().to_be_bytes());
            frame.resize(frame.len() + MAX_REQUEST_BYTES + 1, 0);
            let mut request = grpc_request(path);
            *request.body_mut() = tonic::body::Body::new(http_body_util::Full::new(prost::bytes::Bytes::from(frame)));
            request
        };
        for path in [SYNC_ENTRIES_PATH, "/tessera.agent.v1.AgentService/FetchBundle"] {
            let response = routes.clone().oneshot(oversized(path)).await.unwrap();
            assert_eq!(grpc_status(&response), Some(tonic::Code::OutOfRange as i32), "{path}");
        }
    }
}
