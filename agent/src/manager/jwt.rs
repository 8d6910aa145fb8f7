//! JWT-SVIDs for the Workload API: signed by the server on demand, validated against the
//! agent's bundle (signature, `sub` = the entry's SPIFFE ID, audiences, `exp`), and cached per
//! (entry ID, entry revision, sorted and de-duplicated audiences) until half their lifetime has
//! passed.
//!
//! Cache misses go to the server in batches (`BatchNewJwtSvid`, [`batcher`]): the misses that
//! arrive while earlier batches are in flight travel together in the next call, so a burst of
//! workloads costs a few round trips instead of one each, and a lone miss is sent at once. A
//! server without the batch call (`UNIMPLEMENTED`) is asked item by item with `NewJwtSvid`.
//!
//! The cache holds at most [`MAX_CACHED`] tokens; when full, expired tokens are dropped
//! first, then the ones closest to their refresh point. A token for an entry that changed
//! (new revision) or left the agent's entry set is never served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_wire::tessera::agent::v1::{self as pb, NewJwtSvidRequest};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Code;

use super::Shared;
use crate::cache::{BoxFuture, CachedEntry, JwtSvid, JwtSvidError, JwtSvidSource};
use crate::client::CALL_TIMEOUT;

/// Most tokens kept.
pub const MAX_CACHED: usize = 4096;
/// Most tokens asked for in one `BatchNewJwtSvid` call.
pub const MAX_JWT_BATCH: usize = 128;
/// Most `BatchNewJwtSvid` calls in flight at once.
const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// Most misses waiting for a batch.
const MAX_WAITING: usize = 4096;
/// Longest token accepted from the server.
const MAX_TOKEN_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    entry_id: crate::cache::EntryId,
    revision: u64,
    audiences: Vec<String>,
}

#[derive(Debug, Clone)]
struct Cached {
    svid: JwtSvid,
    refresh_at: SystemTime,
}

/// The `kid` of a JWS compact token's header, if it can be read.
fn token_key_id(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("kid")?.as_str().map(str::to_owned)
}

/// The bounded token cache (no I/O; see [`JwtSvids`] for the source).
#[derive(Debug, Default)]
struct TokenCache {
    tokens: HashMap<Key, Cached>,
}

impl TokenCache {
    fn get(&self, key: &Key, now: SystemTime) -> Option<JwtSvid> {
        self.tokens.get(key).filter(|cached| now < cached.refresh_at).map(|cached| cached.svid.clone())
    }

    fn insert(&mut self, key: Key, cached: Cached, now: SystemTime, capacity: usize) {
        if self.tokens.len() >= capacity && !self.tokens.contains_key(&key) {
            self.tokens.retain(|_, cached| cached.refresh_at > now);
            while self.tokens.len() >= capacity {
                let Some(oldest) =
                    self.tokens.iter().min_by_key(|(_, cached)| cached.refresh_at).map(|(key, _)| key.clone())
                else {
                    break;
                };
                self.tokens.remove(&oldest);
            }
        }
        self.tokens.insert(key, cached);
    }
}

/// The manager's [`JwtSvidSource`].
#[derive(Debug)]
pub struct JwtSvids {
    shared: Arc<Shared>,
    cache: Mutex<TokenCache>,
    hits: AtomicU64,
    fetches: AtomicU64,
    /// The batcher's queue, started on the first miss (inside the runtime).
    batcher: std::sync::OnceLock<mpsc::Sender<batcher::Pending>>,
    /// Signing calls made to the server (a batch is one).
    calls: Arc<AtomicU64>,
}

impl JwtSvids {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            cache: Mutex::new(TokenCache::default()),
            hits: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            batcher: std::sync::OnceLock::new(),
            calls: Arc::default(),
        }
    }

    /// Signing calls made to the server so far: a batch of tokens is one call.
    pub fn server_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Asks the server for one token through the batcher.
    async fn sign(&self, request: NewJwtSvidRequest) -> Result<pb::NewJwtSvidResponse, JwtSvidError> {
        let queue = self.batcher.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(MAX_WAITING);
            tokio::spawn(batcher::run(Arc::clone(&self.shared), receiver, Arc::clone(&self.calls)));
            sender
        });
        let (reply, answer) = oneshot::channel();
        queue
            .try_send(batcher::Pending { request, reply })
            .map_err(|_| JwtSvidError::Unavailable("too many JWT-SVID requests are waiting for the server".into()))?;
        answer.await.map_err(|_| JwtSvidError::Unavailable("the JWT-SVID batcher stopped".into()))?
    }

    /// Tokens served from the cache so far.
    pub fn cache_hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Tokens fetched from the server so far.
    pub fn server_fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    async fn fetch(&self, entry: &CachedEntry, audiences: &[String]) -> Result<JwtSvid, JwtSvidError> {
        let mut sorted: Vec<String> = audiences.to_vec();
        sorted.sort();
        sorted.dedup();
        if sorted.is_empty() || sorted.iter().any(String::is_empty) {
            return Err(JwtSvidError::Refused("at least one non-empty audience is required".to_owned()));
        }
        // Only entries this agent currently holds, at their current revision.
        let known = self
            .shared
            .state()
            .entry(&entry.id)
            .is_some_and(|current| current.revision == entry.revision && current.spiffe_id == entry.spiffe_id);
        if !known {
            return Err(JwtSvidError::UnknownEntry(entry.id.to_string()));
        }
        let key = Key { entry_id: entry.id.clone(), revision: entry.revision, audiences: sorted };
        let now = SystemTime::now();
        let cached = self.lock().get(&key, now);
        if let Some(svid) = cached {
            // A token signed by a key the server tainted is fetched again.
            let tainted = &self.shared.state().tainted_jwt_key_ids;
            if tainted.is_empty() || !tainted.iter().any(|kid| token_key_id(&svid.token).as_deref() == Some(kid)) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(svid);
            }
        }
        let response =
            self.sign(NewJwtSvidRequest { entry_id: entry.id.to_string(), audiences: key.audiences.clone() }).await?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let fetched_at = SystemTime::now();
        if response.token.is_empty() || response.token.len() > MAX_TOKEN_LEN {
            return Err(JwtSvidError::Refused("the server returned an empty or oversized token".to_owned()));
        }
        // Never hand out a token that a workload's peer would refuse: it must validate against
        // the agent's bundle for these audiences and name the entry's SPIFFE ID.
        let validated = {
            let bundles = Arc::clone(&self.shared.cache.current().bundles);
            tessera_spiffe::jwt::validate(&response.token, bundles.as_ref(), &key.audiences, fetched_at)
                .map_err(|error| JwtSvidError::Refused(format!("the server returned an invalid JWT-SVID: {error}")))?
        };
        if validated.spiffe_id() != &entry.spiffe_id {
            return Err(JwtSvidError::Refused(format!(
                "the server returned a JWT-SVID for {}, expected {}",
                validated.spiffe_id(),
                entry.spiffe_id
            )));
        }
        let expires_at = validated.expires_at();
        if expires_at <= fetched_at {
            return Err(JwtSvidError::Refused("the server returned an expired token".to_owned()));
        }
        let lifetime = expires_at.duration_since(fetched_at).unwrap_or(Duration::ZERO);
        let svid =
            JwtSvid { spiffe_id: entry.spiffe_id.clone(), token: response.token, expires_at, hint: entry.hint.clone() };
        let cached = Cached { svid: svid.clone(), refresh_at: fetched_at + lifetime / 2 };
        self.lock().insert(key, cached, fetched_at, MAX_CACHED);
        Ok(svid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TokenCache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a refused call or item means for the workload that asked.
fn error_for(code: Code, message: String, entry_id: &str) -> JwtSvidError {
    match code {
        Code::NotFound | Code::PermissionDenied => JwtSvidError::UnknownEntry(entry_id.to_owned()),
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Unknown
        | Code::Cancelled => JwtSvidError::Unavailable(message),
        _ => JwtSvidError::Refused(message),
    }
}

mod batcher {
    //! One task that turns concurrent cache misses into `BatchNewJwtSvid` calls: it takes
    //! every miss waiting (up to [`MAX_JWT_BATCH`]) as one batch, with at most
    //! [`MAX_BATCHES_IN_FLIGHT`] calls in flight; misses that arrive meanwhile form the next.

    use super::*;

    /// A miss waiting for its token.
    pub(super) struct Pending {
        pub(super) request: NewJwtSvidRequest,
        pub(super) reply: oneshot::Sender<Result<pb::NewJwtSvidResponse, JwtSvidError>>,
    }

    /// Runs until every sender is gone (the agent is stopping).
    pub(super) async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Pending>, calls: Arc<AtomicU64>) {
        let slots = Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT));
        while let Some(first) = queue.recv().await {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            // Everything that queued up while waiting for the slot goes in this batch.
            let mut batch = vec![first];
            while batch.len() < MAX_JWT_BATCH {
                match queue.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let shared = Arc::clone(&shared);
            calls.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                send(&shared, batch).await;
                drop(slot);
            });
        }
    }

    async fn send(shared: &Shared, batch: Vec<Pending>) {
        let params: Vec<NewJwtSvidRequest> = batch.iter().map(|pending| pending.request.clone()).collect();
        let mut request = tonic::Request::new(pb::BatchNewJwtSvidRequest { params });
        request.set_timeout(CALL_TIMEOUT);
        match shared.client.agent().batch_new_jwt_svid(request).await {
            Ok(response) => {
                let results = response.into_inner().results;
                if results.len() != batch.len() {
                    let message =
                        format!("the server answered {} results for {} JWT-SVID requests", results.len(), batch.len());
                    for pending in batch {
                        let _ = pending.reply.send(Err(JwtSvidError::Refused(message.clone())));
                    }
                    return;
                }
                for (pending, result) in batch.into_iter().zip(results) {
                    let entry_id = &pending.request.entry_id;
                    let answer = if &result.entry_id != entry_id {
                        Err(JwtSvidError::Refused(format!(
                            "the server answered for entry {:?} instead of {entry_id:?}",
                            result.entry_id
                        )))
                    } else {
                        match result.result {
                            Some(pb::new_jwt_svid_result::Result::Svid(svid)) => Ok(svid),
                            Some(pb::new_jwt_svid_result::Result::Error(status)) => {
                                Err(error_for(Code::from(status.code), status.message, entry_id))
                            }
                            None => Err(JwtSvidError::Refused("the server answered an empty result".to_owned())),
                        }
                    };
                    let _ = pending.reply.send(answer);
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                // A server from before the batch call: one call per token.
                for pending in batch {
                    let mut request = tonic::Request::new(pending.request.clone());
                    request.set_timeout(CALL_TIMEOUT);
                    let answer = shared.client.agent().new_jwt_svid(request).await.map(tonic::Response::into_inner);
                    let entry_id = &pending.request.entry_id;
                    let _ = pending
                        .reply
                        .send(answer.map_err(|status| error_for(status.code(), status.message().to_owned(), entry_id)));
                }
            }
            Err(status) => {
                for pending in batch {
                    let error = error_for(status.code(), status.message().to_owned(), &pending.request.entry_id);
                    let _ = pending.reply.send(Err(error));
                }
            }
        }
    }
}

impl JwtSvidSource for JwtSvids {
    fn fetch_jwt_svid<'a>(
        &'a self,
        entry: &'a CachedEntry,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<JwtSvid, JwtSvidError>> {
        Box::pin(self.fetch(entry, audiences))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::SpiffeId;

    fn key(id: &str) -> Key {
        Key { entry_id: id.into(), revision: 1, audiences: vec!["a".to_owned()] }
    }

    fn cached(refresh_at: SystemTime) -> Cached {
        Cached {
            svid: JwtSvid {
                spiffe_id: SpiffeId::parse("spiffe://example.org/w").unwrap(),
                token: "t".to_owned(),
                expires_at: refresh_at + Duration::from_secs(10),
                hint: String::new(),
            },
            refresh_at,
        }
    }

    #[test]
    fn tokens_are_served_until_half_life_and_the_cache_is_bounded() {
        let now = SystemTime::now();
        let mut cache = TokenCache::default();
        cache.insert(key("a"), cached(now + Duration::from_secs(5)), now, 2);
        assert!(cache.get(&key("a"), now).is_some());
        assert!(cache.get(&key("a"), now + Duration::from_secs(5)).is_none(), "past half-life");
        assert!(cache.get(&key("b"), now).is_none());

        cache.insert(key("b"), cached(now + Duration::from_secs(9)), now, 2);
        cache.insert(key("c"), cached(now + Duration::from_secs(7)), now, 2);
        assert_eq!(cache.tokens.len(), 2);
        assert!(cache.get(&key("a"), now).is_none(), "the token closest to refresh is evicted first");
        assert!(cache.get(&key("b"), now).is_some() && cache.get(&key("c"), now).is_some());

        let expired = now - Duration::from_secs(1);
        let mut cache = TokenCache::default();
        cache.insert(key("x"), cached(expired), now, 2);
        cache.insert(key("y"), cached(now + Duration::from_secs(1)), now, 2);
        cache.insert(key("z"), cached(now + Duration::from_secs(1)), now, 2);
        assert!(!cache.tokens.contains_key(&key("x")));
        assert_eq!(cache.tokens.len(), 2);
    }
}
