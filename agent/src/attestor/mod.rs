//! The unix workload attestor: from a Workload API caller's socket peer credentials to its
//! `unix:` selectors.
//!
//! # What it produces
//!
//! `unix:uid:<n>`, `unix:user:<name>`, `unix:gid:<n>`, `unix:group:<name>`,
//! `unix:supplementary_gid:<n>`, `unix:supplementary_group:<name>`, `unix:path:<exe path>` and
//! `unix:sha256:<hex>` (interface.md, "Workload attestation (unix)"). The derivation is the pure
//! function [`derive_selectors`] over a plain [`ProcessFacts`]; everything that reads the
//! system sits behind the [`ProcessInspector`] trait, whose real implementation is
//! [`ProcfsInspector`] and whose fake, for tests of the Workload API, is
//! [`FakeProcessInspector`].
//!
//! # PID reuse, and why a process is pinned
//!
//! The kernel captures the caller's pid, euid and egid when it connects (SO_PEERCRED). The pid
//! is only a number: by the time the agent reads `/proc/<pid>`, or answers, the caller may have
//! exited and the number been given to another process, possibly another user's. Attesting or
//! answering for that process would hand the caller's identity to a stranger, or the stranger's
//! identity to whoever still holds the caller's socket (a forked child, or a process it passed
//! the descriptor to). So [`PeerProcess::open_connection`] pins the process when attestation
//! begins:
//!
//! - a **pidfd**, which refers to that one process forever and polls readable once it has
//!   exited: the connection's own, taken once from the socket when it is accepted
//!   ([`PeerPidfd::from_socket`], SO_PEERPIDFD, Linux 6.5+), which names the process that
//!   connected; or, without one, `pidfd_open` of the SO_PEERCRED pid (Linux 5.3+);
//! - an open **`/proc/<pid>` directory**, read through with `openat`: such a handle stays bound
//!   to the process it was opened for, and answers `ENOENT` after that process is gone, even
//!   if the pid is reused (this is the fallback pin when `pidfd_open` is unavailable);
//! - without a pidfd only, the **start time** (field 22 of `/proc/<pid>/stat`), which a reused
//!   pid cannot share (with a pidfd it adds nothing: a pidfd that has not polled readable
//!   proves the pid was not reused);
//! - the **uids, gids and supplementary groups** of `/proc/<pid>/status`, whose file stays open
//!   for the re-check.
//!
//! When pinning, the process's effective uid and gid must equal the socket's peer credentials,
//! otherwise [`AttestError::CredentialsMismatch`] (a process that changes its euid or egid after
//! connecting must reconnect). With the socket's pidfd there is no window between `connect` and
//! the pin: that pidfd names the process that connected, not whichever has its pid now. Without
//! it (`pidfd_open`), the comparison closes most of that window: a pid reused meanwhile by
//! another user's process is refused. The pidfd is polled *after* the `/proc` reads: if the
//! process is still alive then, its pid was not reused in between, so the reads were of that
//! process.
//!
//! After attestation and **before answering**, the caller runs
//! [`Attestation::verify_still_same`]: the pidfd must not have exited (or, without a pidfd,
//! `stat` must not show a zombie nor another start time), the credentials in
//! `/proc/<pid>/status` must be unchanged, and `/proc/<pid>/exe` must still be the same file
//! (an `execve` after attestation would otherwise give the new program the old one's
//! selectors). With a pidfd that is three system calls (`pread`, `statx`, `poll`); what each
//! read proves, and why nothing else is read, is in `docs/security-model.md` ("Pinning a
//! caller"). Errors for which
//! [`AttestError::is_caller_gone`] holds mean "the caller exited or its pid was reused": the
//! Workload API answers `Unavailable` then.
//!
//! # Choices
//!
//! - **Effective ids.** `unix:uid` and `unix:gid` are the effective uid and gid, as in SPIRE and
//!   as SO_PEERCRED reports them.
//! - **Deleted executables.** `unix:path` is the path exactly as the kernel reports it, with a
//!   trailing ` (deleted)` when the binary was unlinked or replaced. SPIRE does the same (a raw
//!   readlink), and it is the safe reading: an entry for `/usr/bin/app` must not match a process
//!   still running the old, deleted `/usr/bin/app`. Its `unix:sha256` is still computed, from the
//!   file the process actually runs.
//! - **Unrepresentable or unreadable facts give no selector**: a path that is not UTF-8, a name
//!   that failed to resolve, a value with control characters, an executable the agent may not
//!   look at (an agent that is not root attesting another user's process), a file over the hash
//!   limit. Entries match when *all* their selectors are among the caller's, so fewer selectors
//!   can only mean fewer matches, never a wrong one.
//! - **Hashing** reads `/proc/<pid>/exe` opened directly, so a path swapped after exec cannot be
//!   substituted, and is bounded by [`UnixAttestorConfig::max_sha256_file_size`]; digests are
//!   cached by device, inode, size, mtime and ctime (see [`ExecutableDigests`]).
//! - **Names** are cached with a TTL, "no such user" included (see `names.rs`).
//!
//! # Blocking
//!
//! Reading `/proc` costs microseconds and never waits on a disk; name lookups (NSS, maybe
//! LDAP) and hashing can take milliseconds. [`UnixAttestor::attest`] is async: it attests
//! inline when names and digest are cached (the common case, which keeps the Workload API's
//! latency at the `/proc` floor), and otherwise moves to tokio's blocking pool, with at most
//! [`UnixAttestorConfig::max_blocking_inspections`] such attestations at once so that a flood of
//! uncached binaries cannot occupy every blocking thread. [`UnixAttestor::attest_blocking`] is
//! the synchronous form for threads that may block. `verify_still_same` only reads `/proc`
//! and stats the executable: call it inline.
//!
//! ```no_run
//! # async fn serve(stream: tokio::net::UnixStream) -> Result<(), Box<dyn std::error::Error>> {
//! use tessera_agent::attestor::{PeerCredentials, UnixAttestor, UnixAttestorConfig};
//!
//! use tessera_agent::attestor::PeerPidfd;
//!
//! let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
//! let peer = PeerCredentials::try_from(stream.peer_cred()?)?;
//! let pidfd = PeerPidfd::from_socket(&stream); // once per connection
//! let attestation = attestor.attest_connection(peer, pidfd.as_ref()).await?;
//! // ... find the entries whose selectors are a subset of attestation.selectors() ...
//! attestation.verify_still_same()?; // then answer
//! # Ok(()) }
//! ```
//!
//! Only Linux has the `/proc` this needs; elsewhere [`ProcfsInspector`] refuses every caller
//! with [`AttestError::Unsupported`].

mod digest;
mod error;
mod facts;
mod inspector;
mod names;
#[cfg(target_os = "linux")]
mod process;
#[cfg(not(target_os = "linux"))]
#[path = "unsupported.rs"]
mod process;
pub mod procfs;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tessera_spiffe::SelectorSet;
use tokio::sync::Semaphore;

pub use digest::{ExecutableDigest, ExecutableDigests, FileKey};
pub use error::{AttestError, ProcessChange};
pub use facts::{ProcessFacts, SupplementaryGroup, UNIX_SELECTOR_TYPE, derive_selectors};
pub use inspector::{FakeProcessInspector, InspectedProcess, PinnedProcess, ProcessInspector};
#[cfg(target_os = "linux")]
pub use process::PeerProcess;
pub use process::ProcfsInspector;

/// The socket peer credentials of a Workload API caller, as the kernel captured them when it
/// connected (SO_PEERCRED: pid, effective uid, effective gid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCredentials {
    /// Process id (the thread group id) of the process that connected.
    pub pid: u32,
    /// Its effective uid at `connect`.
    pub uid: u32,
    /// Its effective gid at `connect`.
    pub gid: u32,
}

impl TryFrom<tokio::net::unix::UCred> for PeerCredentials {
    type Error = AttestError;

    /// From tokio's `UnixStream::peer_cred` (also what tonic's `UdsConnectInfo::peer_cred`
    /// holds). Fails when the credentials carry no positive pid.
    fn try_from(cred: tokio::net::unix::UCred) -> Result<Self, AttestError> {
        let pid = cred.pid().and_then(|pid| u32::try_from(pid).ok()).filter(|&pid| pid > 0);
        let pid = pid.ok_or(AttestError::NoPeerPid)?;
        Ok(Self { pid, uid: cred.uid(), gid: cred.gid() })
    }
}

/// A pidfd for the process that connected a Unix socket, taken from the socket itself
/// (SO_PEERPIDFD, Linux 6.5+). Take it once per connection and pass it to every attestation of
/// a caller on that connection: it names the process that called `connect` (like SO_PEERCRED's
/// pid, which comes from the same kernel record, but for good: once that process has exited it
/// polls readable, even if its pid names another process by then). A connection passed to
/// another process still attests the process that connected, as SO_PEERCRED does.
///
/// Cheap to clone (the descriptor is shared, and closed when the last clone is dropped).
#[derive(Debug, Clone)]
pub struct PeerPidfd(Arc<OwnedFd>);

impl PeerPidfd {
    /// The pidfd of `socket`'s peer; `None` when the kernel has no SO_PEERPIDFD (logged once)
    /// or gives none for this connection, or on platforms other than Linux: attestation then
    /// pins by `pidfd_open` of the SO_PEERCRED pid.
    pub fn from_socket(socket: &impl AsFd) -> Option<Self> {
        process::socket_peer_pidfd(socket.as_fd()).map(|fd| Self(Arc::new(fd)))
    }
}

impl AsFd for PeerPidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Settings of the unix workload attestor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAttestorConfig {
    /// Largest executable hashed for `unix:sha256`, in bytes; `0` disables hashing. Same
    /// meaning as the agent configuration key `max_sha256_file_size`.
    pub max_sha256_file_size: u64,
    /// How many executable digests are cached (least recently used evicted first).
    pub sha256_cache_entries: usize,
    /// How long a user or group name (or its absence) is trusted.
    pub name_cache_ttl: Duration,
    /// How many user and group names are cached.
    pub name_cache_entries: usize,
    /// How many attestations may run on the blocking pool at once (those that hash or look up
    /// an uncached name).
    pub max_blocking_inspections: usize,
}

impl Default for UnixAttestorConfig {
    fn default() -> Self {
        Self {
            max_sha256_file_size: crate::config::DEFAULT_MAX_SHA256_FILE_SIZE,
            sha256_cache_entries: 1024,
            name_cache_ttl: Duration::from_secs(60),
            name_cache_entries: 4096,
            max_blocking_inspections: 4,
        }
    }
}

/// The unix workload attestor. Cheap to clone; clones share caches.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    inspector: Arc<dyn ProcessInspector>,
    blocking: Arc<Semaphore>,
}

impl UnixAttestor {
    /// The attestor of real processes ([`ProcfsInspector`]).
    pub fn new(config: &UnixAttestorConfig) -> Self {
        Self::with_inspector(Arc::new(ProcfsInspector::new(config)), config.max_blocking_inspections)
    }

    /// An attestor over any source of process facts (a [`FakeProcessInspector`] in tests), with
    /// at most `max_blocking_inspections` (at least 1) inspections on the blocking pool at once.
    pub fn with_inspector(inspector: Arc<dyn ProcessInspector>, max_blocking_inspections: usize) -> Self {
        Self { inspector, blocking: Arc::new(Semaphore::new(max_blocking_inspections.max(1))) }
    }

    /// The source of process facts.
    pub fn inspector(&self) -> &Arc<dyn ProcessInspector> {
        &self.inspector
    }

    /// Attests the caller behind `peer`, with no pidfd from its socket: see
    /// [`attest_connection`](Self::attest_connection).
    pub async fn attest(&self, peer: PeerCredentials) -> Result<Attestation, AttestError> {
        self.attest_connection(peer, None).await
    }

    /// Attests the caller behind `peer` on a connection whose socket gave `pidfd`
    /// ([`PeerPidfd::from_socket`]; with `None` the process is pinned by `pidfd_open` of its
    /// pid): inline when nothing slow is needed, else on tokio's blocking pool. Must run inside
    /// a tokio runtime. If the future is dropped while on the blocking pool, that work still
    /// completes (and fills the caches).
    pub async fn attest_connection(
        &self,
        peer: PeerCredentials,
        pidfd: Option<&PeerPidfd>,
    ) -> Result<Attestation, AttestError> {
        if let Some(inspected) = self.inspector.inspect_without_blocking(&peer, pidfd)? {
            return Ok(Attestation::from(inspected));
        }
        // The semaphore is never closed, so acquiring only waits.
        let permit = Arc::clone(&self.blocking).acquire_owned().await.ok();
        let inspector = Arc::clone(&self.inspector);
        let pidfd = pidfd.cloned();
        let inspected = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            inspector.inspect(&peer, pidfd.as_ref())
        })
        .await
        .map_err(|source| AttestError::Task { pid: peer.pid, source })??;
        Ok(Attestation::from(inspected))
    }

    /// Attests the caller behind `peer` on the current thread, which may block (name lookups,
    /// hashing): call it from a blocking context.
    pub fn attest_blocking(&self, peer: &PeerCredentials) -> Result<Attestation, AttestError> {
        self.attest_connection_blocking(peer, None)
    }

    /// [`attest_connection`](Self::attest_connection) on the current thread, which may block.
    pub fn attest_connection_blocking(
        &self,
        peer: &PeerCredentials,
        pidfd: Option<&PeerPidfd>,
    ) -> Result<Attestation, AttestError> {
        self.inspector.inspect(peer, pidfd).map(Attestation::from)
    }
}

/// A caller's selectors, with the pinned process to re-check before answering.
#[derive(Debug)]
pub struct Attestation {
    selectors: SelectorSet,
    facts: ProcessFacts,
    process: Box<dyn PinnedProcess>,
}

impl Attestation {
    /// The caller's selectors.
    pub fn selectors(&self) -> &SelectorSet {
        &self.selectors
    }

    /// The facts they were derived from.
    pub fn facts(&self) -> &ProcessFacts {
        &self.facts
    }

    /// The caller's pid.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Checks that the caller is still alive and the same process; call it after attestation
    /// and matching, right before answering. See the [module docs](self).
    pub fn verify_still_same(&self) -> Result<(), AttestError> {
        self.process.verify_still_same()
    }
}

impl From<InspectedProcess> for Attestation {
    fn from(inspected: InspectedProcess) -> Self {
        Self { selectors: derive_selectors(&inspected.facts), facts: inspected.facts, process: inspected.process }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attests_through_an_injected_inspector() {
        let fake = FakeProcessInspector::new();
        fake.set_process(
            77,
            ProcessFacts {
                user_name: Some("alice".into()),
                supplementary_groups: vec![SupplementaryGroup { gid: 27, name: None }],
                ..ProcessFacts::new(1000, 1000)
            },
        );
        let attestor = UnixAttestor::with_inspector(Arc::new(fake.clone()), 1);
        let peer = PeerCredentials { pid: 77, uid: 1000, gid: 1000 };
        let attestation = attestor.attest(peer).await.unwrap();
        assert_eq!(
            attestation.selectors(),
            &SelectorSet::parse_all(&[
                "unix:uid:1000",
                "unix:user:alice",
                "unix:gid:1000",
                "unix:supplementary_gid:27"
            ])
            .unwrap()
        );
        assert_eq!(attestation.pid(), 77);
        assert_eq!(attestation.facts().uid, 1000);
        attestation.verify_still_same().unwrap();
        fake.exit(77);
        assert!(attestation.verify_still_same().unwrap_err().is_caller_gone());
        assert!(matches!(attestor.attest_blocking(&peer), Err(AttestError::ProcessGone { pid: 77 })));
    }

    /// An inspector that always needs to block: `attest` must take the blocking-pool path.
    #[derive(Debug)]
    struct SlowOnly(FakeProcessInspector);

    impl ProcessInspector for SlowOnly {
        fn inspect(&self, peer: &PeerCredentials, pidfd: Option<&PeerPidfd>) -> Result<InspectedProcess, AttestError> {
            self.0.inspect(peer, pidfd)
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn slow_inspections_run_on_the_blocking_pool() {
        let fake = FakeProcessInspector::new();
        fake.set_process(5, ProcessFacts::new(1, 2));
        let attestor = UnixAttestor::with_inspector(Arc::new(SlowOnly(fake)), 0);
        let peer = PeerCredentials { pid: 5, uid: 1, gid: 2 };
        // Two at once through a single permit (0 is raised to 1).
        let (a, b) = tokio::join!(attestor.attest(peer), attestor.attest(peer));
        assert_eq!(a.unwrap().selectors().len(), 2);
        assert_eq!(b.unwrap().selectors().len(), 2);
    }
}
