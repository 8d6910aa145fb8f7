//! The one error type of the datastore boundary.

use std::fmt;
use std::path::PathBuf;

use tessera_spiffe::SpiffeId;

/// A boxed backend error, type-erased so that no backend type (sled, a PostgreSQL driver)
/// leaks through the [`DataStore`](super::DataStore) trait.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The kind of record an error is about, named the way an operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResourceKind {
    /// A registration entry.
    Entry,
    /// An attested node (agent).
    AttestedNode,
    /// A join token.
    JoinToken,
    /// A trust bundle (own or federated).
    Bundle,
    /// The CA rotation journal.
    CaJournal,
    /// A federation relationship.
    FederationRelationship,
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Entry => "registration entry",
            Self::AttestedNode => "attested node",
            Self::JoinToken => "join token",
            Self::Bundle => "bundle",
            Self::CaJournal => "CA journal",
            Self::FederationRelationship => "federation relationship",
        })
    }
}

/// Why a datastore operation failed.
///
/// The variants callers branch on (not found, already exists, conflict, token states,
/// resync) are precise; everything the backend itself reports ends in [`Self::Backend`] with
/// its source kept, so the backend's types never leave the datastore module.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataStoreError {
    /// No record with this key.
    #[error("{kind} {id:?} not found")]
    NotFound {
        /// What was looked for.
        kind: ResourceKind,
        /// Its key (entry ID, SPIFFE ID, trust domain...).
        id: String,
    },
    /// A record with this key, or an equivalent record, already exists.
    #[error("{kind} {id:?} already exists: {reason}")]
    AlreadyExists {
        /// What was being created.
        kind: ResourceKind,
        /// Its key.
        id: String,
        /// Which record it collides with and on what.
        reason: String,
    },
    /// A compare-and-set precondition failed: someone else changed the record first.
    /// Read it again and retry if that still makes sense.
    #[error("{kind} {id:?} was changed concurrently: expected {expected}, found {found}")]
    Conflict {
        /// What was being changed.
        kind: ResourceKind,
        /// Its key.
        id: String,
        /// The precondition the caller gave (revision, serial, sequence, version).
        expected: String,
        /// What the store holds.
        found: String,
    },
    /// A value the store refuses to keep (an empty selector list, a TTL of zero...).
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field at fault, in the words of the record type.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// The join token is unknown or was already used. Deliberately the same error for both:
    /// the store cannot tell them apart once a token is consumed.
    #[error("join token not found (unknown or already used)")]
    TokenNotFound,
    /// The join token existed but had expired; it has been removed all the same.
    #[error("join token expired at {expires_at} (unix seconds)")]
    TokenExpired {
        /// When it expired.
        expires_at: u64,
    },
    /// The attested node is banned: its serials cannot be updated until it is evicted and
    /// attests again.
    #[error("attested node {spiffe_id} is banned")]
    NodeBanned {
        /// The banned node.
        spiffe_id: SpiffeId,
    },
    /// The entry change log no longer holds every change after `since` (it was compacted, or
    /// `since` is ahead of this store). The caller must take a fresh snapshot: read
    /// [`current_revision`](super::DataStore::current_revision), list the entries, then follow
    /// the change log from that revision.
    #[error(
        "entry change log cannot continue from revision {since} (it holds the changes after revision {floor} up to {current}); resync from a full listing"
    )]
    ResyncRequired {
        /// The revision the caller asked to continue from.
        since: u64,
        /// Every change up to and including this revision has been compacted away.
        floor: u64,
        /// The store's current revision.
        current: u64,
    },
    /// A stored value cannot be decoded: unknown schema version, truncated or garbage bytes.
    #[error("corrupt value in datastore tree {tree:?} at key {key:?}: {reason}")]
    Corrupt {
        /// The tree (table) holding it.
        tree: &'static str,
        /// Its key, as text when printable, else as hex.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The database on disk was written by a newer (or unknown) layout.
    #[error("datastore at {path} has schema version {found}; this build supports version {supported}")]
    UnsupportedSchema {
        /// The datastore directory.
        path: PathBuf,
        /// The version found on disk.
        found: u8,
        /// The version this build reads and writes.
        supported: u8,
    },
    /// The datastore could not be opened.
    #[error("cannot open the datastore at {path}")]
    Open {
        /// The datastore directory.
        path: PathBuf,
        /// The backend's reason.
        #[source]
        source: BackendError,
    },
    /// The backend failed (I/O error, fsync failure, lost connection, a crashed worker).
    #[error("datastore {operation} failed")]
    Backend {
        /// What the store was doing.
        operation: &'static str,
        /// The backend's reason.
        #[source]
        source: BackendError,
    },
}

impl DataStoreError {
    /// Wraps a backend failure during `operation`.
    pub(crate) fn backend(operation: &'static str, source: impl Into<BackendError>) -> Self {
        Self::Backend { operation, source: source.into() }
    }

    /// A corrupt value in `tree` at `key`.
    pub(crate) fn corrupt(tree: &'static str, key: &[u8], reason: impl Into<String>) -> Self {
        Self::Corrupt { tree, key: printable_key(key), reason: reason.into() }
    }

    /// True for [`Self::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

/// Shows a key as text when it is printable UTF-8, else as hex.
fn printable_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
        _ => format!("0x{}", hex::encode(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_thing() {
        let err = DataStoreError::NotFound { kind: ResourceKind::Entry, id: "abc".into() };
        assert_eq!(err.to_string(), "registration entry \"abc\" not found");
        let err = DataStoreError::corrupt("entries", &[0, 1, 0xff], "truncated");
        assert_eq!(err.to_string(), "corrupt value in datastore tree \"entries\" at key \"0x0001ff\": truncated");
        let err = DataStoreError::corrupt("entries", b"e1", "truncated");
        assert!(err.to_string().contains("\"e1\""));
    }
}
