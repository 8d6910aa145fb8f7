//! User and group names for the `unix:user`, `unix:group` and `unix:supplementary_group`
//! selectors, with a small cache.
//!
//! Names come from the system databases (`getpwuid_r`/`getgrgid_r`, so NSS: files, sssd,
//! LDAP...), which may block on the network and cost far more than the rest of attestation.
//! They change rarely, so each answer, "no such id" included, is cached for a TTL. The cache is
//! bounded: when it is full, expired answers are dropped, and if that frees nothing it is
//! cleared (a refill costs one lookup per id in use, and NSS keeps its own caches).
//! A lookup that *fails* (as opposed to "no such id") is not cached and yields no name: a
//! missing name selector can only make fewer entries match.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The user and group databases.
pub(crate) trait NameSource: Send + Sync + fmt::Debug {
    /// The name of `uid`; `Ok(None)` when the database has none.
    fn user_name(&self, uid: u32) -> Result<Option<String>, String>;
    /// The name of `gid`; `Ok(None)` when the database has none.
    fn group_name(&self, gid: u32) -> Result<Option<String>, String>;
}

/// The system's databases through NSS.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SystemNames;

impl NameSource for SystemNames {
    fn user_name(&self, uid: u32) -> Result<Option<String>, String> {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .map(|user| user.and_then(|u| usable_name(u.name)))
            .map_err(|e| e.to_string())
    }

    fn group_name(&self, gid: u32) -> Result<Option<String>, String> {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .map(|group| group.and_then(|g| usable_name(g.name)))
            .map_err(|e| e.to_string())
    }
}

/// nix converts names lossily: a name that was not UTF-8 carries U+FFFD and could collide with
/// another name, so it gives no selector at all.
fn usable_name(name: String) -> Option<String> {
    (!name.is_empty() && !name.contains(char::REPLACEMENT_CHARACTER)).then_some(name)
}

/// The cache had no fresh answer and the caller did not allow a (possibly blocking) lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WouldBlock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Id {
    User(u32),
    Group(u32),
}

#[derive(Debug)]
struct Cached {
    name: Option<String>,
    fetched: Instant,
}

/// User and group names, cached for a TTL.
#[derive(Debug)]
pub(crate) struct NameCache {
    source: Box<dyn NameSource>,
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<Id, Cached>>,
}

impl NameCache {
    pub(crate) fn new(source: Box<dyn NameSource>, ttl: Duration, capacity: usize) -> Self {
        Self { source, ttl, capacity: capacity.max(1), entries: Mutex::new(HashMap::new()) }
    }

    /// The name of `uid`. Without `may_block`, a cache miss is [`WouldBlock`].
    pub(crate) fn user(&self, uid: u32, may_block: bool) -> Result<Option<String>, WouldBlock> {
        self.get(Id::User(uid), may_block)
    }

    /// The name of `gid`. Without `may_block`, a cache miss is [`WouldBlock`].
    pub(crate) fn group(&self, gid: u32, may_block: bool) -> Result<Option<String>, WouldBlock> {
        self.get(Id::Group(gid), may_block)
    }

    fn get(&self, id: Id, may_block: bool) -> Result<Option<String>, WouldBlock> {
        let now = Instant::now();
        {
            let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(cached) = entries.get(&id).filter(|c| now.duration_since(c.fetched) < self.ttl) {
                return Ok(cached.name.clone());
            }
        }
        if !may_block {
            return Err(WouldBlock);
        }
        // The lookup runs without the lock: it may take long, and two threads looking up the
        // same id at once merely do it twice.
        let looked_up = match id {
            Id::User(uid) => self.source.user_name(uid),
            Id::Group(gid) => self.source.group_name(gid),
        };
        let name = match looked_up {
            Ok(name) => name,
            Err(error) => {
                tracing::warn!(?id, %error, "user or group name lookup failed; no name selector for it");
                return Ok(None);
            }
        };
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&id) {
            entries.retain(|_, c| now.duration_since(c.fetched) < self.ttl);
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(id, Cached { name: name.clone(), fetched: now });
        Ok(name)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// uid/gid 0 is "root", 1000 is "alice", 666 fails, anything else has no name.
    #[derive(Debug, Default, Clone)]
    struct CountingNames(Arc<AtomicUsize>);

    impl CountingNames {
        fn answer(&self, id: u32) -> Result<Option<String>, String> {
            self.0.fetch_add(1, Ordering::SeqCst);
            match id {
                0 => Ok(Some("root".into())),
                1000 => Ok(Some("alice".into())),
                666 => Err("ldap is down".into()),
                _ => Ok(None),
            }
        }
    }

    impl NameSource for CountingNames {
        fn user_name(&self, uid: u32) -> Result<Option<String>, String> {
            self.answer(uid)
        }
        fn group_name(&self, gid: u32) -> Result<Option<String>, String> {
            self.answer(gid)
        }
    }

    fn cache(ttl: Duration, capacity: usize) -> (NameCache, Arc<AtomicUsize>) {
        let names = CountingNames::default();
        let lookups = Arc::clone(&names.0);
        (NameCache::new(Box::new(names), ttl, capacity), lookups)
    }

    #[test]
    fn answers_are_cached_including_absent_names() {
        let (cache, lookups) = cache(Duration::from_secs(60), 16);
        assert_eq!(cache.user(1000, true), Ok(Some("alice".into())));
        assert_eq!(cache.user(1000, true), Ok(Some("alice".into())));
        assert_eq!(cache.user(1000, false), Ok(Some("alice".into())));
        assert_eq!(cache.user(5, true), Ok(None));
        assert_eq!(cache.user(5, false), Ok(None));
        // Users and groups are separate namespaces.
        assert_eq!(cache.group(1000, false), Err(WouldBlock));
        assert_eq!(cache.group(1000, true), Ok(Some("alice".into())));
        assert_eq!(lookups.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn failed_lookups_give_no_name_and_are_not_cached() {
        let (cache, lookups) = cache(Duration::from_secs(60), 16);
        assert_eq!(cache.user(666, true), Ok(None));
        assert_eq!(cache.user(666, false), Err(WouldBlock));
        assert_eq!(cache.user(666, true), Ok(None));
        assert_eq!(lookups.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn expired_answers_are_looked_up_again() {
        let (cache, lookups) = cache(Duration::ZERO, 16);
        assert_eq!(cache.user(0, true), Ok(Some("root".into())));
        assert_eq!(cache.user(0, false), Err(WouldBlock));
        assert_eq!(cache.user(0, true), Ok(Some("root".into())));
        assert_eq!(lookups.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_cache_is_bounded() {
        let (cache, _) = cache(Duration::from_secs(60), 4);
        for uid in 0..100 {
            cache.user(uid, true).unwrap();
            assert!(cache.len() <= 4);
        }
        assert_eq!(cache.user(99, false), Ok(None));
    }

    #[test]
    fn lossy_names_are_refused() {
        assert_eq!(usable_name("alice".into()), Some("alice".into()));
        assert_eq!(usable_name("al\u{FFFD}ce".into()), None);
        assert_eq!(usable_name(String::new()), None);
    }

    #[test]
    fn system_names_know_root() {
        // Every Linux user database names uid 0 and gid 0 (the names may differ: root/wheel).
        assert!(SystemNames.user_name(0).unwrap().is_some());
        assert!(SystemNames.group_name(0).unwrap().is_some());
    }
}
