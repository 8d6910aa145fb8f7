//! The one error type of workload attestation.

use std::fmt;
use std::io;

/// Why a caller could not be attested.
///
/// Messages name the pid and, where a file was involved, the file. The variants for which
/// [`AttestError::is_caller_gone`] is true mean "the caller exited, changed, or its pid now
/// names another process": the Workload API answers `Unavailable` for them (the client may
/// retry on a fresh connection) and never hands out an identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The socket peer credentials carry no (or a nonsensical) pid.
    #[error("the socket peer credentials carry no process id")]
    NoPeerPid,
    /// The process exited (or its pid is no longer in use) before or during attestation.
    #[error("process {pid} is gone: the caller exited or its pid was reused")]
    ProcessGone {
        /// The caller's pid.
        pid: u32,
    },
    /// The pid still names a live process, but not the one that was attested.
    #[error("process {pid} is no longer the process that was attested: {change}")]
    ProcessChanged {
        /// The caller's pid.
        pid: u32,
        /// What differs.
        change: ProcessChange,
    },
    /// The process behind the pid has other effective ids than the socket's peer credentials:
    /// either the pid was reused by another process before attestation began, or the caller
    /// changed its effective uid or gid after connecting (it must reconnect then).
    #[error(
        "process {pid} runs as uid {proc_uid} gid {proc_gid} (/proc/{pid}/status) but connected as uid {peer_uid} gid {peer_gid}"
    )]
    CredentialsMismatch {
        /// The caller's pid.
        pid: u32,
        /// Effective uid captured by the kernel when the caller connected.
        peer_uid: u32,
        /// Effective gid captured by the kernel when the caller connected.
        peer_gid: u32,
        /// Effective uid in `/proc/<pid>/status`.
        proc_uid: u32,
        /// Effective gid in `/proc/<pid>/status`.
        proc_gid: u32,
    },
    /// The agent may not read a file it needs (`/proc` mounted with `hidepid`, an agent that is
    /// not root attesting another user's process, ...).
    #[error("permission denied reading {path}")]
    PermissionDenied {
        /// The file, e.g. `/proc/1234/status`.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file does not have the expected shape. Never a panic: procfs content is treated
    /// as untrusted input (the command name in it is chosen by the caller).
    #[error("malformed {path}: {reason}")]
    Malformed {
        /// The file, e.g. `/proc/1234/stat`.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Any other I/O error.
    #[error("cannot read {path}")]
    Io {
        /// The file, e.g. `/proc/1234/exe`.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The executable changed (size, mtime, ctime or inode) while it was being hashed.
    #[error("executable {path} changed while it was being hashed")]
    ExecutableChanged {
        /// The file that was hashed, e.g. `/proc/1234/exe`.
        path: String,
    },
    /// The blocking attestation task failed (it panicked or the runtime is shutting down).
    #[error("the attestation task of process {pid} failed")]
    Task {
        /// The caller's pid.
        pid: u32,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
    /// This platform has no `/proc` to attest from (the attestor works on Linux only).
    #[error("unix workload attestation is only supported on Linux")]
    Unsupported,
}

/// What made a pinned process differ from the process that was attested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcessChange {
    /// The start time in `/proc/<pid>/stat` differs: the pid was reused.
    StartTime,
    /// The uids, gids or supplementary groups in `/proc/<pid>/status` differ.
    Credentials,
    /// `/proc/<pid>/exe` now names another file (the process called `execve`).
    Executable,
}

impl fmt::Display for ProcessChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::StartTime => "its start time differs (the pid was reused)",
            Self::Credentials => "its uids, gids or supplementary groups changed",
            Self::Executable => "it runs another executable now",
        })
    }
}

impl AttestError {
    /// True when the caller exited, changed, or its pid names another process now: the
    /// Workload API answers `Unavailable` ("caller exited or PID was reused") for these.
    /// Everything else is an agent-side failure (`Internal`/`Unavailable` at the API's
    /// discretion) and is logged.
    pub fn is_caller_gone(&self) -> bool {
        matches!(
            self,
            Self::ProcessGone { .. }
                | Self::ProcessChanged { .. }
                | Self::CredentialsMismatch { .. }
                | Self::ExecutableChanged { .. }
        )
    }

    /// Classifies an I/O error met while reading `path` of process `pid`.
    ///
    /// `ENOENT` and `ESRCH` from procfs mean the process is gone (a `/proc/<pid>` directory
    /// handle of an exited process answers `ENOENT`, reads of its open files `ESRCH`).
    pub(crate) fn from_io(pid: u32, path: impl FnOnce() -> String, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(code) if code == ENOENT || code == ESRCH => Self::ProcessGone { pid },
            Some(code) if code == EACCES || code == EPERM => Self::PermissionDenied { path: path(), source },
            _ => Self::Io { path: path(), source },
        }
    }
}

// errno values, identical on every Linux architecture (asm-generic/errno-base.h).
const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EACCES: i32 = 13;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classified() {
        let path = || "/proc/7/status".to_owned();
        assert!(matches!(
            AttestError::from_io(7, path, io::Error::from_raw_os_error(ENOENT)),
            AttestError::ProcessGone { pid: 7 }
        ));
        assert!(matches!(
            AttestError::from_io(7, path, io::Error::from_raw_os_error(ESRCH)),
            AttestError::ProcessGone { pid: 7 }
        ));
        let denied = AttestError::from_io(7, path, io::Error::from_raw_os_error(EACCES));
        assert_eq!(denied.to_string(), "permission denied reading /proc/7/status");
        assert!(!denied.is_caller_gone());
        let other = AttestError::from_io(7, path, io::Error::from_raw_os_error(5));
        assert!(matches!(other, AttestError::Io { .. }));
        assert!(std::error::Error::source(&other).is_some());
    }

    #[test]
    fn messages_name_the_pid() {
        let e = AttestError::ProcessChanged { pid: 42, change: ProcessChange::StartTime };
        assert_eq!(
            e.to_string(),
            "process 42 is no longer the process that was attested: its start time differs (the pid was reused)"
        );
        assert!(e.is_caller_gone());
        let e = AttestError::CredentialsMismatch { pid: 42, peer_uid: 1, peer_gid: 2, proc_uid: 3, proc_gid: 4 };
        assert_eq!(e.to_string(), "process 42 runs as uid 3 gid 4 (/proc/42/status) but connected as uid 1 gid 2");
    }
}
