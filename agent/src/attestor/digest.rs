//! SHA-256 of executables for the `unix:sha256` selector, bounded in size and cached.
//!
//! Hashing a 50 MB binary takes about 26 ms (1,700 attestations' worth), so digests are cached
//! by [`FileKey`]: device, inode, size, mtime **and ctime**. The brief asks for (device, inode,
//! mtime, size); ctime is added because mtime can be set back by anyone who can write the file
//! (`touch -r`), so a same-size rewrite with a restored mtime would otherwise keep the old
//! digest, while ctime is set by the kernel on every change and cannot be forged.
//!
//! The cache holds at most `capacity` digests and evicts the least recently used one when full
//! (an O(capacity) scan, paid only on a miss, which also pays for hashing a file). LRU rather
//! than clear-when-full so that a flood of distinct small binaries cannot repeatedly evict the
//! digests of the large ones every workload uses.
//!
//! Files larger than the limit are not read at all: the outcome is
//! [`ExecutableDigest::TooLarge`] (cached too, with one warning per file), and the attestor
//! emits no `unix:sha256` selector for them.
//!
//! Hashing is blocking I/O: the attestor only calls [`ExecutableDigests::digest_file`] from a
//! blocking context (see the module docs of [`crate::attestor`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use super::AttestError;

/// Identity and version of a file, as far as the digest cache is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, u64),
    /// Status change time: seconds and nanoseconds.
    pub ctime: (i64, u64),
}

impl FileKey {
    /// The key of a `stat` result.
    // The field types of `Stat` differ between architectures (`c_ulong` on x86_64, `u32`
    // nanoseconds on 32-bit targets): the conversions are no-ops only on some of them.
    #[allow(clippy::useless_conversion)]
    pub fn from_stat(st: &rustix::fs::Stat) -> Self {
        Self {
            dev: u64::from(st.st_dev),
            ino: u64::from(st.st_ino),
            size: u64::try_from(st.st_size).unwrap_or(u64::MAX),
            mtime: (i64::from(st.st_mtime), u64::from(st.st_mtime_nsec)),
            ctime: (i64::from(st.st_ctime), u64::from(st.st_ctime_nsec)),
        }
    }

    /// The key of an open file (`fstat`).
    pub fn of_file(file: &File) -> std::io::Result<Self> {
        Ok(Self::from_stat(&rustix::fs::fstat(file)?))
    }
}

/// What hashing an executable gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutableDigest {
    /// Lowercase hex SHA-256 of the whole file.
    Sha256(String),
    /// The file is larger than the limit and was not read.
    TooLarge {
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
}

impl ExecutableDigest {
    /// The hex digest, if the file was hashed.
    pub fn sha256(&self) -> Option<&str> {
        match self {
            Self::Sha256(hex) => Some(hex),
            Self::TooLarge { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    digest: ExecutableDigest,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<FileKey, Entry>,
    clock: u64,
}

/// A size-bounded, cached SHA-256 of executables.
#[derive(Debug)]
pub struct ExecutableDigests {
    max_file_size: u64,
    capacity: usize,
    lru: Mutex<Lru>,
    files_hashed: AtomicU64,
    bytes_hashed: AtomicU64,
}

/// Read size when hashing. Measured on 64 MiB in the page cache: 64-128 KiB chunks hash at
/// about 1.1x the in-memory SHA-256 time (the copy stays in the CPU caches), 256 KiB-1 MiB are
/// slower; 64 KiB also stays below glibc's mmap threshold, so the buffer costs no page faults.
const CHUNK: usize = 64 * 1024;

impl ExecutableDigests {
    /// A cache of at most `capacity` digests (at least 1) of files of at most `max_file_size`
    /// bytes.
    pub fn new(max_file_size: u64, capacity: usize) -> Self {
        Self {
            max_file_size,
            capacity: capacity.max(1),
            lru: Mutex::new(Lru::default()),
            files_hashed: AtomicU64::new(0),
            bytes_hashed: AtomicU64::new(0),
        }
    }

    /// The size limit in bytes.
    pub fn max_file_size(&self) -> u64 {
        self.max_file_size
    }

    /// The cached outcome for `key`, without any I/O.
    pub fn cached(&self, key: &FileKey) -> Option<ExecutableDigest> {
        let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        lru.clock += 1;
        let now = lru.clock;
        lru.entries.get_mut(key).map(|entry| {
            entry.last_used = now;
            entry.digest.clone()
        })
    }

    /// The outcome for a file whose size is known to exceed the limit, cached without reading
    /// the file (and warned about once per file).
    pub(crate) fn too_large(&self, key: FileKey, shown_path: &dyn Fn() -> String) -> ExecutableDigest {
        let digest = ExecutableDigest::TooLarge { size: key.size, limit: self.max_file_size };
        if self.insert(key, digest.clone()) {
            tracing::warn!(
                path = %shown_path(),
                size = key.size,
                limit = self.max_file_size,
                "executable is larger than max_sha256_file_size: no unix:sha256 selector for it"
            );
        }
        digest
    }

    /// The digest of the file at `path`, from the cache or by hashing it. Blocking.
    pub fn digest_path(&self, path: &Path) -> Result<ExecutableDigest, AttestError> {
        let shown = || path.display().to_string();
        let file = File::open(path).map_err(|source| AttestError::Io { path: shown(), source })?;
        let key = FileKey::of_file(&file).map_err(|source| AttestError::Io { path: shown(), source })?;
        self.digest_file(&file, key, &shown)
    }

    /// The digest of an open file whose `fstat` key is expected to be `expected`, from the cache
    /// or by hashing it. Blocking. The file is read with positioned reads from offset 0, and its
    /// key is checked before and after: a file that changes meanwhile gives
    /// [`AttestError::ExecutableChanged`] and nothing is cached.
    pub fn digest_file(
        &self,
        file: &File,
        expected: FileKey,
        shown_path: &dyn Fn() -> String,
    ) -> Result<ExecutableDigest, AttestError> {
        let io_error = |source| AttestError::Io { path: shown_path(), source };
        let changed = || AttestError::ExecutableChanged { path: shown_path() };
        let key = FileKey::of_file(file).map_err(io_error)?;
        if key != expected {
            return Err(changed());
        }
        if let Some(digest) = self.cached(&key) {
            return Ok(digest);
        }
        if key.size > self.max_file_size {
            return Ok(self.too_large(key, shown_path));
        }
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buffer = vec![0u8; CHUNK];
        let mut offset = 0u64;
        // Read one byte past the recorded size so that a file that grew is noticed.
        while offset <= key.size {
            let n = match file.read_at(&mut buffer, offset) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(e)),
            };
            context.update(buffer.get(..n).unwrap_or_default());
            offset += n as u64;
        }
        self.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.bytes_hashed.fetch_add(offset, Ordering::Relaxed);
        if offset != key.size || FileKey::of_file(file).map_err(io_error)? != key {
            return Err(changed());
        }
        let digest = ExecutableDigest::Sha256(hex::encode(context.finish()));
        self.insert(key, digest.clone());
        Ok(digest)
    }

    /// Number of files hashed so far (cache misses that read a file).
    pub fn files_hashed(&self) -> u64 {
        self.files_hashed.load(Ordering::Relaxed)
    }

    /// Number of bytes hashed so far.
    pub fn bytes_hashed(&self) -> u64 {
        self.bytes_hashed.load(Ordering::Relaxed)
    }

    /// Number of cached outcomes.
    pub fn len(&self) -> usize {
        self.lru.lock().unwrap_or_else(PoisonError::into_inner).entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Caches `digest` for `key`, evicting the least recently used entry when full. Returns
    /// false when the key was already cached (another thread hashed the same file meanwhile).
    fn insert(&self, key: FileKey, digest: ExecutableDigest) -> bool {
        let mut lru = self.lru.lock().unwrap_or_else(PoisonError::into_inner);
        lru.clock += 1;
        let now = lru.clock;
        if !lru.entries.contains_key(&key) && lru.entries.len() >= self.capacity {
            let oldest = lru.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                lru.entries.remove(&oldest);
            }
        }
        lru.entries.insert(key, Entry { digest, last_used: now }).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> FileKey {
        FileKey { dev: 1, ino, size: 10, mtime: (1, 0), ctime: (1, 0) }
    }

    fn sha(n: u8) -> ExecutableDigest {
        ExecutableDigest::Sha256(format!("{n:02x}"))
    }

    #[test]
    fn eviction_is_least_recently_used() {
        let cache = ExecutableDigests::new(100, 3);
        for i in 1..=3 {
            assert!(cache.insert(key(u64::from(i)), sha(i)));
        }
        // Touch 1, so 2 is the least recently used.
        assert_eq!(cache.cached(&key(1)), Some(sha(1)));
        assert!(cache.insert(key(4), sha(4)));
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.cached(&key(2)), None);
        for i in [1, 3, 4] {
            assert_eq!(cache.cached(&key(u64::from(i))), Some(sha(i)));
        }
        // Re-inserting a cached key evicts nothing.
        assert!(!cache.insert(key(4), sha(4)));
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn keys_differ_by_every_field() {
        let base = key(1);
        let variants = [
            FileKey { dev: 2, ..base },
            FileKey { ino: 2, ..base },
            FileKey { size: 11, ..base },
            FileKey { mtime: (1, 1), ..base },
            FileKey { ctime: (2, 0), ..base },
        ];
        let cache = ExecutableDigests::new(100, 16);
        cache.insert(base, sha(0));
        for variant in variants {
            assert_eq!(cache.cached(&variant), None, "{variant:?}");
        }
    }

    #[test]
    fn hashing_a_file_matches_ring_and_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        let content: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let cache = ExecutableDigests::new(u64::MAX, 8);
        let expected = hex::encode(ring::digest::digest(&ring::digest::SHA256, &content));
        assert_eq!(cache.digest_path(&path).unwrap(), ExecutableDigest::Sha256(expected.clone()));
        assert_eq!(cache.digest_path(&path).unwrap().sha256(), Some(expected.as_str()));
        assert_eq!(cache.files_hashed(), 1);
        assert_eq!(cache.bytes_hashed(), content.len() as u64);
    }

    #[test]
    fn a_stale_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        std::fs::write(&path, b"abc").unwrap();
        let file = File::open(&path).unwrap();
        let stale = FileKey { size: 2, ..FileKey::of_file(&file).unwrap() };
        let cache = ExecutableDigests::new(100, 8);
        let err = cache.digest_file(&file, stale, &|| "/proc/9/exe".into()).unwrap_err();
        assert_eq!(err.to_string(), "executable /proc/9/exe changed while it was being hashed");
        assert!(cache.is_empty());
    }
}
