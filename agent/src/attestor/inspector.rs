//! The source of process facts: a trait, so that the Workload API can be tested with a fake.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use super::{AttestError, PeerCredentials, PeerPidfd, ProcessChange, ProcessFacts};

/// A caller's process, pinned when attestation began.
///
/// [`verify_still_same`](Self::verify_still_same) is called after attestation and before
/// answering: between reading the pid from the socket and answering, the caller can exit and its
/// pid be given to another process, which must not receive the caller's identity.
pub trait PinnedProcess: Send + Sync + fmt::Debug {
    /// The pid.
    fn pid(&self) -> u32;

    /// Checks that the pid still names the same, live process with the same credentials and
    /// executable as when it was inspected. Errors satisfy [`AttestError::is_caller_gone`] when
    /// it does not.
    fn verify_still_same(&self) -> Result<(), AttestError>;
}

/// A pinned process and the facts read from it.
#[derive(Debug)]
pub struct InspectedProcess {
    /// What was learned.
    pub facts: ProcessFacts,
    /// The pin, to check before answering.
    pub process: Box<dyn PinnedProcess>,
}

/// Reads the facts about a socket peer's process.
pub trait ProcessInspector: Send + Sync + fmt::Debug {
    /// Pins the process behind `peer` and reads its facts. `pidfd` is the connection's pidfd
    /// for the process that connected ([`PeerPidfd::from_socket`]), when the kernel gave one.
    /// May block (name lookups and hashing on cache misses): call it from a blocking context.
    fn inspect(&self, peer: &PeerCredentials, pidfd: Option<&PeerPidfd>) -> Result<InspectedProcess, AttestError>;

    /// Like [`inspect`](Self::inspect) when everything slow is cached; `Ok(None)` when it would
    /// have to block, so that async callers can move to a blocking thread only then. The
    /// default always answers `Ok(None)`.
    fn inspect_without_blocking(
        &self,
        peer: &PeerCredentials,
        pidfd: Option<&PeerPidfd>,
    ) -> Result<Option<InspectedProcess>, AttestError> {
        let _ = (peer, pidfd);
        Ok(None)
    }
}

/// An in-memory [`ProcessInspector`] for tests: processes are declared with their facts, and
/// can exit or have their pid reused while an attestation is pending.
///
/// Like the real inspector, it refuses a peer whose uid or gid differ from the declared
/// process's effective ids ([`AttestError::CredentialsMismatch`]). Clones share their processes.
#[derive(Debug, Clone, Default)]
pub struct FakeProcessInspector {
    state: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    processes: HashMap<u32, FakeProcess>,
    generations: u64,
}

#[derive(Debug)]
struct FakeProcess {
    facts: ProcessFacts,
    generation: u64,
}

impl FakeProcessInspector {
    /// No processes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares the process `pid`. If one was declared already, it is replaced as if its pid
    /// had been reused: its pins fail with [`ProcessChange::StartTime`].
    pub fn set_process(&self, pid: u32, facts: ProcessFacts) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.generations += 1;
        let generation = state.generations;
        state.processes.insert(pid, FakeProcess { facts, generation });
    }

    /// The process `pid` exits: inspecting it and verifying its pins fail with
    /// [`AttestError::ProcessGone`].
    pub fn exit(&self, pid: u32) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).processes.remove(&pid);
    }
}

impl ProcessInspector for FakeProcessInspector {
    /// The fake has no real processes: `pidfd` is ignored.
    fn inspect(&self, peer: &PeerCredentials, _pidfd: Option<&PeerPidfd>) -> Result<InspectedProcess, AttestError> {
        let pid = peer.pid;
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let process = state.processes.get(&pid).ok_or(AttestError::ProcessGone { pid })?;
        let facts = process.facts.clone();
        if (facts.uid, facts.gid) != (peer.uid, peer.gid) {
            return Err(AttestError::CredentialsMismatch {
                pid,
                peer_uid: peer.uid,
                peer_gid: peer.gid,
                proc_uid: facts.uid,
                proc_gid: facts.gid,
            });
        }
        let pin = FakePin { pid, generation: process.generation, state: Arc::clone(&self.state) };
        Ok(InspectedProcess { facts, process: Box::new(pin) })
    }

    fn inspect_without_blocking(
        &self,
        peer: &PeerCredentials,
        pidfd: Option<&PeerPidfd>,
    ) -> Result<Option<InspectedProcess>, AttestError> {
        self.inspect(peer, pidfd).map(Some)
    }
}

#[derive(Debug)]
struct FakePin {
    pid: u32,
    generation: u64,
    state: Arc<Mutex<FakeState>>,
}

impl PinnedProcess for FakePin {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn verify_still_same(&self) -> Result<(), AttestError> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.processes.get(&self.pid) {
            None => Err(AttestError::ProcessGone { pid: self.pid }),
            Some(p) if p.generation != self.generation => {
                Err(AttestError::ProcessChanged { pid: self.pid, change: ProcessChange::StartTime })
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(pid: u32, uid: u32) -> PeerCredentials {
        PeerCredentials { pid, uid, gid: uid }
    }

    #[test]
    fn fake_processes_exit_and_get_their_pid_reused() {
        let fake = FakeProcessInspector::new();
        assert!(matches!(fake.inspect(&peer(10, 1000), None), Err(AttestError::ProcessGone { pid: 10 })));

        fake.set_process(10, ProcessFacts::new(1000, 1000));
        let first = fake.inspect(&peer(10, 1000), None).unwrap();
        assert_eq!(first.facts, ProcessFacts::new(1000, 1000));
        assert_eq!(first.process.pid(), 10);
        first.process.verify_still_same().unwrap();

        // A peer that connected as another user is refused.
        let err = fake.inspect(&peer(10, 0), None).unwrap_err();
        assert!(matches!(err, AttestError::CredentialsMismatch { .. }) && err.is_caller_gone());

        fake.set_process(10, ProcessFacts::new(1000, 1000));
        let err = first.process.verify_still_same().unwrap_err();
        assert!(matches!(err, AttestError::ProcessChanged { pid: 10, change: ProcessChange::StartTime }));

        let second = fake.inspect_without_blocking(&peer(10, 1000), None).unwrap().unwrap();
        second.process.verify_still_same().unwrap();
        fake.clone().exit(10);
        assert!(matches!(second.process.verify_still_same(), Err(AttestError::ProcessGone { pid: 10 })));
    }
}
