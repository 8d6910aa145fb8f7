//! JWT-SVIDs for the Workload API: signed by the server on demand (`NewJwtSvid`), validated
//! against the agent's bundle (signature, `sub` = the entry's SPIFFE ID, audiences, `exp`),
//! and cached per (entry ID, entry revision, sorted and de-duplicated audiences) until half
//! their lifetime has passed.
//!
//! The cache holds at most [`MAX_CACHED`] tokens; when full, expired tokens are dropped
//! first, then the ones closest to their refresh point. A token for an entry that changed
//! (new revision) or left the agent's entry set is never served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_wire::tessera::agent::v1::NewJwtSvidRequest;
use tonic::Code;

use super::Shared;
use crate::cache::{BoxFuture, CachedEntry, JwtSvid, JwtSvidError, JwtSvidSource};
use crate::client::CALL_TIMEOUT;

/// Most tokens kept.
pub const MAX_CACHED: usize = 4096;
/// Longest token accepted from the server.
const MAX_TOKEN_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    entry_id: String,
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
}

impl JwtSvids {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared, cache: Mutex::new(TokenCache::default()), hits: AtomicU64::new(0), fetches: AtomicU64::new(0) }
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
            return Err(JwtSvidError::UnknownEntry(entry.id.clone()));
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
        let mut request =
            tonic::Request::new(NewJwtSvidRequest { entry_id: entry.id.clone(), audiences: key.audiences.clone() });
        request.set_timeout(CALL_TIMEOUT);
        let response = self.shared.client.agent().new_jwt_svid(request).await.map_err(|status| {
            let message = status.message().to_owned();
            match status.code() {
                Code::NotFound | Code::PermissionDenied => JwtSvidError::UnknownEntry(entry.id.clone()),
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Unknown
                | Code::Cancelled => JwtSvidError::Unavailable(message),
                _ => JwtSvidError::Refused(message),
            }
        })?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let response = response.into_inner();
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
        Key { entry_id: id.to_owned(), revision: 1, audiences: vec!["a".to_owned()] }
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
