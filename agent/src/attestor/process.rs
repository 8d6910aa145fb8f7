//! The real inspector: a pidfd and `/proc/<pid>` (Linux).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags};

use super::digest::{ExecutableDigests, FileKey};
use super::inspector::{InspectedProcess, PinnedProcess, ProcessInspector};
use super::names::{NameCache, SystemNames, WouldBlock};
use super::procfs::{self, ProcStat, ProcStatus};
use super::{
    AttestError, PeerCredentials, PeerPidfd, ProcessChange, ProcessFacts, SupplementaryGroup, UnixAttestorConfig,
};

/// Largest `/proc/<pid>/status` accepted. 65,536 supplementary groups (`NGROUPS_MAX`) of up to
/// ten digits each fit.
const MAX_PROC_FILE: usize = 1024 * 1024;

/// Initial read buffer: `status` is about 1.5 KiB with a few groups.
const BUFFER: usize = 4096;

/// Set once `pidfd_open` has failed for another reason than a gone process (kernel before
/// 5.3, or a seccomp filter), so that the fallback is logged once.
static PIDFD_UNAVAILABLE_LOGGED: AtomicBool = AtomicBool::new(false);

/// Set once `getsockopt(SO_PEERPIDFD)` has answered `ENOPROTOOPT` (a kernel before 6.5): the
/// fallback is logged once and the option is not asked for again.
static PEERPIDFD_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// The pidfd of the process that connected `socket` (SO_PEERPIDFD, Linux 6.5+): it names that
/// process as of `connect`, whatever has happened to its pid since. `None` when the kernel has
/// no such option (logged once, not asked again) or refuses it for this connection (logged at
/// debug level): the caller is then pinned by `pidfd_open` of the SO_PEERCRED pid, as before.
pub(super) fn socket_peer_pidfd(socket: BorrowedFd<'_>) -> Option<OwnedFd> {
    use nix::errno::Errno as NixErrno;
    if PEERPIDFD_UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    match nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerPidfd) {
        Ok(pidfd) => Some(pidfd),
        Err(NixErrno::ENOPROTOOPT) => {
            if !PEERPIDFD_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the kernel has no SO_PEERPIDFD (Linux 6.5+): pinning Workload API callers by pidfd_open of their pid"
                );
            }
            None
        }
        // EINVAL on kernels 6.5 to 6.15: the process that connected has already been reaped.
        // The fallback then fails on a gone pid, or compares a reused pid's ids with SO_PEERCRED.
        Err(error) => {
            tracing::debug!(%error, "no SO_PEERPIDFD for this connection: pinning its callers by pidfd_open");
            None
        }
    }
}

/// A caller's process, pinned: see the [module docs](super) for why and how.
///
/// Holds a pidfd (the connection's, or one opened for the pid, when the kernel has them), an
/// open `/proc/<pid>` directory, its open `status` file, the credentials read from it and, once
/// the executable was looked at, its [`FileKey`]. Without a pidfd it also holds the open `stat` file and the start time. That is
/// three file descriptors (four in the fallback): drop it once the caller has been answered.
///
/// `status` (and `stat`) stay open because re-reading an open procfs file from offset 0
/// regenerates it, which skips an `openat` and a `close` per re-read. Files opened under
/// `/proc/<pid>` stay bound to the process they were opened for, like the directory (reads
/// answer `ESRCH` once it has been reaped, even if the pid has been given to another process).
#[derive(Debug)]
pub struct PeerProcess {
    pid: u32,
    liveness: Liveness,
    dir: OwnedFd,
    status_file: File,
    status: ProcStatus,
    exe: Option<FileKey>,
}

/// How a [`PeerProcess`] tells that its process is still the live caller.
#[derive(Debug)]
enum Liveness {
    /// A pidfd: it names one process for good and polls readable once that process has exited
    /// (a zombie included). A live pidfd proves that the pid was not reused, so the start time
    /// is neither read nor compared (see `docs/security-model.md`, "Pinning a caller").
    Pidfd(Pidfd),
    /// No pidfd (a kernel before 5.3, or a seccomp filter): the open `stat` file, bound to the
    /// process like the directory, shows a zombie in its state field; the start time read when
    /// pinning is compared again as a second guard against a reused pid.
    StartTime { stat_file: File, start_time: u64 },
}

/// Where a pin's pidfd comes from.
#[derive(Debug)]
enum Pidfd {
    /// The connection's, from SO_PEERPIDFD: the process that connected, shared by every call
    /// on the connection.
    Socket(PeerPidfd),
    /// `pidfd_open` of the SO_PEERCRED pid, when the pin began.
    Opened(OwnedFd),
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Socket(pidfd) => pidfd.as_fd(),
            Self::Opened(pidfd) => pidfd.as_fd(),
        }
    }
}

/// How [`PeerProcess::open_with`] gets its pidfd.
#[derive(Debug, Clone, Copy)]
enum PidfdSource<'a> {
    /// The connection's pidfd; `pidfd_open` when there is none.
    Socket(Option<&'a PeerPidfd>),
    /// No pidfd at all: the pre-5.3 fallback, for tests.
    #[cfg(test)]
    None,
}

impl PeerProcess {
    /// Pins the process behind `peer`: opens a pidfd and `/proc/<pid>`, reads the credentials
    /// (and, without a pidfd, the start time), and checks that its effective uid and gid are
    /// the ones the kernel captured when the socket connected.
    pub fn open(peer: &PeerCredentials) -> Result<Self, AttestError> {
        Self::open_with(peer, PidfdSource::Socket(None))
    }

    /// [`open`](Self::open) for a caller on a connection whose socket gave a pidfd
    /// ([`PeerPidfd::from_socket`]): that pidfd pins the process that connected, and no
    /// `pidfd_open` is made. With `None`, the same as `open`.
    pub fn open_connection(peer: &PeerCredentials, pidfd: Option<&PeerPidfd>) -> Result<Self, AttestError> {
        Self::open_with(peer, PidfdSource::Socket(pidfd))
    }

    fn open_with(peer: &PeerCredentials, source: PidfdSource<'_>) -> Result<Self, AttestError> {
        let pid = peer.pid;
        let raw = i32::try_from(pid).ok().and_then(Pid::from_raw).ok_or(AttestError::NoPeerPid)?;
        let pidfd = match source {
            PidfdSource::Socket(Some(pidfd)) => Some(Pidfd::Socket(pidfd.clone())),
            PidfdSource::Socket(None) => open_pidfd(raw, pid)?.map(Pidfd::Opened),
            #[cfg(test)]
            PidfdSource::None => None,
        };
        let dir = rustix::fs::open(
            format!("/proc/{pid}"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno(pid, || format!("/proc/{pid}"), e))?;
        let mut buffer = Vec::with_capacity(BUFFER);
        let (liveness, stat) = match pidfd {
            Some(pidfd) => (Liveness::Pidfd(pidfd), None),
            None => {
                let stat_file = open_proc_file(&dir, pid, "stat")?;
                let stat = read_stat(&stat_file, pid, &mut buffer)?;
                (Liveness::StartTime { stat_file, start_time: stat.start_time }, Some(stat))
            }
        };
        let status_file = open_proc_file(&dir, pid, "status")?;
        let status = read_status(&status_file, pid, &mut buffer)?;
        if (status.effective_uid(), status.effective_gid()) != (peer.uid, peer.gid) {
            return Err(AttestError::CredentialsMismatch {
                pid,
                peer_uid: peer.uid,
                peer_gid: peer.gid,
                proc_uid: status.effective_uid(),
                proc_gid: status.effective_gid(),
            });
        }
        let process = Self { pid, liveness, dir, status_file, status, exe: None };
        // The pidfd was taken before /proc/<pid> was opened: if its process is still alive after
        // the reads, the pid was not reused meanwhile and everything read is that process's.
        process.check_alive(stat.as_ref())?;
        Ok(process)
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when the process is pinned by a pidfd (kernel 5.3 or later), not only by
    /// `/proc/<pid>` and its start time.
    pub fn has_pidfd(&self) -> bool {
        matches!(self.liveness, Liveness::Pidfd(_))
    }

    /// True when the pidfd is the connection's (SO_PEERPIDFD), not one `pidfd_open` gave.
    pub fn has_socket_pidfd(&self) -> bool {
        matches!(self.liveness, Liveness::Pidfd(Pidfd::Socket(_)))
    }

    /// Field 22 of `/proc/<pid>/stat` when pinned, in clock ticks since boot; `None` when the
    /// process is pinned by a pidfd, which needs no start time.
    pub fn start_time(&self) -> Option<u64> {
        match self.liveness {
            Liveness::Pidfd(_) => None,
            Liveness::StartTime { start_time, .. } => Some(start_time),
        }
    }

    /// The credentials read from `/proc/<pid>/status` when pinned.
    pub fn status(&self) -> &ProcStatus {
        &self.status
    }

    /// Checks that the pid still names the pinned process, alive, with the same credentials
    /// and (if it was looked at) the same executable.
    ///
    /// With a pidfd that is `pread` of the open `status`, `statx` of `exe` (when pinned) and a
    /// poll of the pidfd: three system calls. Without one, `stat` is read again as well.
    pub fn verify_still_same(&self) -> Result<(), AttestError> {
        let pid = self.pid;
        let mut buffer = Vec::with_capacity(BUFFER);
        let stat = match &self.liveness {
            Liveness::Pidfd(_) => None,
            Liveness::StartTime { stat_file, start_time } => {
                let stat = read_stat(stat_file, pid, &mut buffer)?;
                if stat.start_time != *start_time {
                    return Err(AttestError::ProcessChanged { pid, change: ProcessChange::StartTime });
                }
                Some(stat)
            }
        };
        if read_status(&self.status_file, pid, &mut buffer)? != self.status {
            return Err(AttestError::ProcessChanged { pid, change: ProcessChange::Credentials });
        }
        if let Some(pinned) = self.exe
            && self.executable_key()? != pinned
        {
            return Err(AttestError::ProcessChanged { pid, change: ProcessChange::Executable });
        }
        // Last, so that a live process proves every read above was of this process.
        self.check_alive(stat.as_ref())
    }

    /// Fails with [`AttestError::ProcessGone`] when the process has exited (a zombie counts as
    /// exited: its socket may live on in a child, but it is no longer the caller). `stat` is
    /// the one just read in the fallback without a pidfd.
    fn check_alive(&self, stat: Option<&ProcStat>) -> Result<(), AttestError> {
        let gone = AttestError::ProcessGone { pid: self.pid };
        let pidfd = match &self.liveness {
            Liveness::Pidfd(pidfd) => pidfd,
            Liveness::StartTime { .. } => {
                return if stat.is_none_or(ProcStat::has_exited) { Err(gone) } else { Ok(()) };
            }
        };
        // A pidfd polls readable once the process (the whole thread group) has exited.
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let now = Timespec { tv_sec: 0, tv_nsec: 0 };
        loop {
            match rustix::event::poll(&mut fds, Some(&now)) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(gone),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(errno(self.pid, || format!("pidfd of process {}", self.pid), e)),
            }
        }
    }

    /// `stat` of `/proc/<pid>/exe`: the executable's identity.
    fn executable_key(&self) -> Result<FileKey, AttestError> {
        rustix::fs::statat(&self.dir, "exe", AtFlags::empty())
            .map(|st| FileKey::from_stat(&st))
            .map_err(|e| errno(self.pid, || self.exe_path(), e))
    }

    /// Records the executable's identity, so that [`verify_still_same`](Self::verify_still_same)
    /// notices an `execve` after attestation.
    fn pin_executable(&mut self) -> Result<FileKey, AttestError> {
        let key = self.executable_key()?;
        self.exe = Some(key);
        Ok(key)
    }

    /// The executable's path as the kernel reports it; `None` when it is not UTF-8 (a lossy
    /// conversion could collide with another path, so no `unix:path` selector at all).
    fn read_executable_path(&self) -> Result<Option<String>, AttestError> {
        let target =
            rustix::fs::readlinkat(&self.dir, "exe", Vec::new()).map_err(|e| errno(self.pid, || self.exe_path(), e))?;
        match String::from_utf8(target.into_bytes()) {
            Ok(path) => Ok(Some(path)),
            Err(_) => {
                tracing::warn!(pid = self.pid, "executable path is not UTF-8: no unix:path selector");
                Ok(None)
            }
        }
    }

    /// Opens the executable through `/proc/<pid>/exe`: the file the process runs, whatever
    /// has been renamed or replaced at its path since.
    fn open_executable(&self) -> Result<File, AttestError> {
        rustix::fs::openat(&self.dir, "exe", OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty())
            .map(File::from)
            .map_err(|e| errno(self.pid, || self.exe_path(), e))
    }

    fn exe_path(&self) -> String {
        format!("/proc/{}/exe", self.pid)
    }
}

impl PinnedProcess for PeerProcess {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn verify_still_same(&self) -> Result<(), AttestError> {
        PeerProcess::verify_still_same(self)
    }
}

fn open_pidfd(raw: Pid, pid: u32) -> Result<Option<OwnedFd>, AttestError> {
    match rustix::process::pidfd_open(raw, PidfdFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::SRCH) => Err(AttestError::ProcessGone { pid }),
        Err(error) => {
            if !PIDFD_UNAVAILABLE_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(%error, "pidfd_open failed: pinning callers by /proc/<pid> and start time only");
            }
            Ok(None)
        }
    }
}

fn errno(pid: u32, path: impl FnOnce() -> String, e: Errno) -> AttestError {
    AttestError::from_io(pid, path, std::io::Error::from(e))
}

/// Opens `/proc/<pid>/<name>` through the pinned directory.
fn open_proc_file(dir: &OwnedFd, pid: u32, name: &str) -> Result<File, AttestError> {
    rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map(File::from)
        .map_err(|e| errno(pid, || format!("/proc/{pid}/{name}"), e))
}

/// Reads a whole procfs file into `buffer`, from offset 0 (which makes procfs regenerate it),
/// without the `statx` and `lseek` that `read_to_end` spends on a size hint procfs does not give.
///
/// `stat` and `status` are generated whole on a read from offset 0 (one record of the kernel's
/// `seq_file`), and a read that has room for all of it returns all of it: a read that leaves
/// room and ends a line is the whole file, so the usual second read, the one answering 0 for
/// end of file, is skipped. A file that fills the buffer is read again from offset 0 into one
/// twice as large, so that its content comes from a single generation. A short read that does
/// not end a line (which procfs does not give) is continued at its offset until end of file.
fn read_proc_file(file: &File, pid: u32, name: &str, buffer: &mut Vec<u8>) -> Result<(), AttestError> {
    let path = || format!("/proc/{pid}/{name}");
    buffer.clear();
    buffer.reserve(BUFFER);
    loop {
        let room = buffer.capacity() - buffer.len();
        let offset = buffer.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut *buffer), offset) {
            Ok(0) => return Ok(()),
            Ok(read) if read < room && buffer.ends_with(b"\n") => return Ok(()),
            Ok(_) if buffer.len() == buffer.capacity() => {
                let capacity = buffer.capacity();
                if capacity >= MAX_PROC_FILE {
                    return Err(AttestError::Malformed { path: path(), reason: "larger than 1 MiB" });
                }
                buffer.clear();
                buffer.reserve(capacity * 2);
            }
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(errno(pid, path, e)),
        }
    }
}

fn read_stat(file: &File, pid: u32, buffer: &mut Vec<u8>) -> Result<ProcStat, AttestError> {
    read_proc_file(file, pid, "stat", buffer)?;
    procfs::parse_stat(buffer).map_err(|reason| AttestError::Malformed { path: format!("/proc/{pid}/stat"), reason })
}

fn read_status(file: &File, pid: u32, buffer: &mut Vec<u8>) -> Result<ProcStatus, AttestError> {
    read_proc_file(file, pid, "status", buffer)?;
    procfs::parse_status(buffer)
        .map_err(|reason| AttestError::Malformed { path: format!("/proc/{pid}/status"), reason })
}

/// `unix:path` and `unix:sha256` values.
type PathAndDigest = (Option<String>, Option<String>);

/// The [`ProcessInspector`] of real processes: `/proc`, a pidfd, the system's user and group
/// databases, and the executable digest cache.
#[derive(Debug)]
pub struct ProcfsInspector {
    digests: Option<Arc<ExecutableDigests>>,
    names: NameCache,
}

impl ProcfsInspector {
    /// An inspector configured by `config`.
    pub fn new(config: &UnixAttestorConfig) -> Self {
        let digests = (config.max_sha256_file_size > 0)
            .then(|| Arc::new(ExecutableDigests::new(config.max_sha256_file_size, config.sha256_cache_entries)));
        let names = NameCache::new(Box::new(SystemNames), config.name_cache_ttl, config.name_cache_entries);
        Self { digests, names }
    }

    /// The executable digest cache; `None` when hashing is disabled.
    pub fn digests(&self) -> Option<&Arc<ExecutableDigests>> {
        self.digests.as_ref()
    }

    fn inspect_inner(
        &self,
        peer: &PeerCredentials,
        pidfd: Option<&PeerPidfd>,
        may_block: bool,
    ) -> Result<Result<InspectedProcess, WouldBlock>, AttestError> {
        let mut process = PeerProcess::open_connection(peer, pidfd)?;
        let (exe_path, sha256) = match self.inspect_executable(&mut process, may_block)? {
            Ok(found) => found,
            Err(WouldBlock) => return Ok(Err(WouldBlock)),
        };
        let uid = process.status.effective_uid();
        let gid = process.status.effective_gid();
        let names = || -> Result<_, WouldBlock> {
            let user_name = self.names.user(uid, may_block)?;
            let group_name = self.names.group(gid, may_block)?;
            let supplementary_groups = process
                .status
                .groups
                .iter()
                .map(|&gid| Ok(SupplementaryGroup { gid, name: self.names.group(gid, may_block)? }))
                .collect::<Result<Vec<_>, WouldBlock>>()?;
            Ok((user_name, group_name, supplementary_groups))
        };
        let Ok((user_name, group_name, supplementary_groups)) = names() else {
            return Ok(Err(WouldBlock));
        };
        let facts = ProcessFacts { uid, user_name, gid, group_name, supplementary_groups, exe_path, sha256 };
        Ok(Ok(InspectedProcess { facts, process: Box::new(process) }))
    }

    /// The executable's path and digest. An executable the agent may not look at (it is not
    /// root and the caller is another user, or the file is not readable) gives neither: fewer
    /// selectors can only make fewer entries match.
    fn inspect_executable(
        &self,
        process: &mut PeerProcess,
        may_block: bool,
    ) -> Result<Result<PathAndDigest, WouldBlock>, AttestError> {
        let denied = |error: &AttestError| {
            tracing::debug!(%error, "no unix:path or unix:sha256 selector");
        };
        let key = match process.pin_executable() {
            Ok(key) => key,
            Err(error @ AttestError::PermissionDenied { .. }) => {
                denied(&error);
                return Ok(Ok((None, None)));
            }
            Err(error) => return Err(error),
        };
        let path = match process.read_executable_path() {
            Ok(path) => path,
            Err(error @ AttestError::PermissionDenied { .. }) => {
                denied(&error);
                return Ok(Ok((None, None)));
            }
            Err(error) => return Err(error),
        };
        let Some(digests) = &self.digests else {
            return Ok(Ok((path, None)));
        };
        let shown = || process.exe_path();
        let digest = match digests.cached(&key) {
            Some(digest) => digest,
            None if key.size > digests.max_file_size() => digests.too_large(key, &shown),
            None if !may_block => return Ok(Err(WouldBlock)),
            None => match process.open_executable().and_then(|file| digests.digest_file(&file, key, &shown)) {
                Ok(digest) => digest,
                Err(error @ AttestError::PermissionDenied { .. }) => {
                    tracing::debug!(%error, "no unix:sha256 selector");
                    return Ok(Ok((path, None)));
                }
                Err(error) => return Err(error),
            },
        };
        Ok(Ok((path, digest.sha256().map(str::to_owned))))
    }
}

impl ProcessInspector for ProcfsInspector {
    fn inspect(&self, peer: &PeerCredentials, pidfd: Option<&PeerPidfd>) -> Result<InspectedProcess, AttestError> {
        match self.inspect_inner(peer, pidfd, true)? {
            Ok(inspected) => Ok(inspected),
            // Unreachable: with blocking allowed, neither the name cache nor the digest path
            // answers WouldBlock. Refuse rather than panic should that ever change.
            Err(WouldBlock) => Err(AttestError::Unsupported),
        }
    }

    fn inspect_without_blocking(
        &self,
        peer: &PeerCredentials,
        pidfd: Option<&PeerPidfd>,
    ) -> Result<Option<InspectedProcess>, AttestError> {
        Ok(self.inspect_inner(peer, pidfd, false)?.ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn eventually(mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Without a pidfd, the pin is `/proc/<pid>` and the start time: a zombie is seen in
    /// `stat`, and a reaped process makes the directory handle answer `ENOENT`.
    #[test]
    fn the_fallback_pin_sees_exit_without_a_pidfd() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let peer = PeerCredentials {
            pid: child.id(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        };
        let pinned = PeerProcess::open_with(&peer, PidfdSource::None).unwrap();
        assert!(!pinned.has_pidfd());
        assert!(pinned.start_time().is_some_and(|ticks| ticks > 0));
        pinned.verify_still_same().unwrap();
        child.kill().unwrap();
        eventually(|| pinned.verify_still_same().is_err());
        assert!(matches!(pinned.verify_still_same(), Err(AttestError::ProcessGone { .. })));
        child.wait().unwrap();
        assert!(matches!(pinned.verify_still_same(), Err(AttestError::ProcessGone { .. })));
    }

    /// A `sleep 30` child, once it runs `sleep` (not the forked test binary before its exec).
    fn sleeper() -> (std::process::Child, PeerCredentials) {
        let child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let test_binary = std::env::current_exe().unwrap();
        let exe = format!("/proc/{}/exe", child.id());
        eventually(|| std::fs::read_link(&exe).is_ok_and(|path| path != test_binary));
        let peer = PeerCredentials {
            pid: child.id(),
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        };
        (child, peer)
    }

    /// The race a pidfd closes: it was opened for process P, P exited and was reaped, and
    /// `/proc/<pid>` now names another process Q. Everything read through the directory is Q's,
    /// and Q is alive, so only the pidfd can tell; `verify_still_same` must refuse as soon as P
    /// is gone, without a start time to compare.
    #[test]
    fn a_pin_whose_pidfd_process_exited_is_refused_even_if_the_pid_names_a_live_process() {
        let (mut first, first_peer) = sleeper();
        let (mut second, second_peer) = sleeper();
        let first_pidfd = open_pidfd(Pid::from_raw(first_peer.pid as i32).unwrap(), first_peer.pid).unwrap().unwrap();
        let mut reused = PeerProcess::open(&second_peer).unwrap();
        reused.pin_executable().unwrap();
        // The pin as if `/proc/<pid>` had been opened after the pid passed from P to Q.
        reused.liveness = Liveness::Pidfd(Pidfd::Opened(first_pidfd));
        reused.verify_still_same().unwrap();
        first.kill().unwrap();
        first.wait().unwrap();
        assert!(matches!(reused.verify_still_same(), Err(AttestError::ProcessGone { .. })));
        // Q itself is still fine, through its own pin.
        PeerProcess::open(&second_peer).unwrap().verify_still_same().unwrap();
        second.kill().unwrap();
        second.wait().unwrap();
    }

    /// `status` is kept open and read again with `pread` at offset 0: the second read sees the
    /// process as it is then, not a copy of the first.
    #[test]
    fn the_kept_status_file_is_read_afresh() {
        let (mut child, peer) = sleeper();
        let pinned = PeerProcess::open(&peer).unwrap();
        let mut buffer = Vec::new();
        read_proc_file(&pinned.status_file, peer.pid, "status", &mut buffer).unwrap();
        assert!(buffer.starts_with(b"Name:\tsleep\n"), "{}", String::from_utf8_lossy(&buffer));
        child.kill().unwrap();
        eventually(|| {
            read_proc_file(&pinned.status_file, peer.pid, "status", &mut buffer).unwrap();
            buffer.windows(10).any(|w| w == b"State:\tZ (")
        });
        child.wait().unwrap();
        // Reaped: the file stays bound to the process that is gone.
        let err = read_proc_file(&pinned.status_file, peer.pid, "status", &mut buffer).unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    }

    /// The read of a whole file, with regular files standing in for procfs: one that fills the
    /// first buffer is read again from the start into a larger one, one without a final newline
    /// is read to end of file, and one over the limit is refused.
    #[test]
    fn whole_files_are_read_and_large_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = Vec::new();
        let lines: Vec<u8> = (0..2000).flat_map(|i| format!("Line{i}:\t{i}\n").into_bytes()).collect();
        let cases: [(&str, Vec<u8>); 5] = [
            ("short", b"Uid:\t0\t0\t0\t0\n".to_vec()),
            ("exact", vec![b'\n'; BUFFER]),
            ("large", lines),
            ("unterminated", vec![b'x'; BUFFER + 17]),
            ("empty", Vec::new()),
        ];
        for (name, content) in cases {
            let path = dir.path().join(name);
            std::fs::write(&path, &content).unwrap();
            let file = File::open(&path).unwrap();
            read_proc_file(&file, 7, name, &mut buffer).unwrap();
            assert!(buffer == content, "{name}: read {} of {} bytes", buffer.len(), content.len());
        }
        let path = dir.path().join("huge");
        std::fs::write(&path, vec![b'\n'; MAX_PROC_FILE + 1]).unwrap();
        let err = read_proc_file(&File::open(&path).unwrap(), 7, "status", &mut buffer).unwrap_err();
        assert!(
            matches!(err, AttestError::Malformed { ref path, reason: "larger than 1 MiB" } if path == "/proc/7/status")
        );
    }

    #[test]
    fn pids_that_cannot_be_pids_are_refused() {
        for pid in [0, u32::MAX] {
            let peer = PeerCredentials { pid, uid: 0, gid: 0 };
            assert!(matches!(PeerProcess::open(&peer), Err(AttestError::NoPeerPid)), "{pid}");
        }
    }
}
