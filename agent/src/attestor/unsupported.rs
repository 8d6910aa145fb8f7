//! Stand-in for the `/proc` inspector on platforms other than Linux: every attestation fails
//! with [`AttestError::Unsupported`], so the agent builds everywhere but attests only on Linux.

use std::sync::Arc;

use super::digest::ExecutableDigests;
use super::inspector::{InspectedProcess, ProcessInspector};
use super::{AttestError, PeerCredentials, PeerPidfd, UnixAttestorConfig};

/// The [`ProcessInspector`] of real processes; on this platform it attests nothing.
#[derive(Debug)]
pub struct ProcfsInspector {
    _private: (),
}

impl ProcfsInspector {
    /// An inspector that refuses every caller.
    pub fn new(config: &UnixAttestorConfig) -> Self {
        let _ = config;
        Self { _private: () }
    }

    /// Always `None`: nothing is hashed on this platform.
    pub fn digests(&self) -> Option<&Arc<ExecutableDigests>> {
        None
    }
}

impl ProcessInspector for ProcfsInspector {
    fn inspect(&self, _peer: &PeerCredentials, _pidfd: Option<&PeerPidfd>) -> Result<InspectedProcess, AttestError> {
        Err(AttestError::Unsupported)
    }

    fn inspect_without_blocking(
        &self,
        _peer: &PeerCredentials,
        _pidfd: Option<&PeerPidfd>,
    ) -> Result<Option<InspectedProcess>, AttestError> {
        Err(AttestError::Unsupported)
    }
}

/// No SO_PEERPIDFD on this platform.
pub(super) fn socket_peer_pidfd(_socket: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    None
}
