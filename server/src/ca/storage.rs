//! The CA directory: file names, the journal, and crash-safe writes.
//!
//! Layout of `<data_dir>/ca/` (directory mode 0700):
//!
//! ```text
//! journal.json              which authorities exist and their state (written last)
//! x509-<id>.key.der         an X.509 CA private key, PKCS#8 DER, mode 0600
//! x509-<id>.cert.der        its certificate, DER
//! jwt-<kid>.key.der         a JWT signing key, PKCS#8 DER, mode 0600
//! ```
//!
//! The journal is the source of truth: a file it does not name is an orphan left by an
//! interrupted write and is ignored; a file it names must exist and be intact, or the server
//! refuses to start. The first CA is built in `<data_dir>/ca.new/` and renamed into place in
//! one step, so `ca/` either holds a complete CA or does not exist.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::CaError;

/// Name of the CA directory under `data_dir`.
pub const CA_DIR: &str = "ca";
/// Name of the staging directory the first CA is built in.
pub const STAGING_DIR: &str = "ca.new";
/// Name of the journal file in the CA directory.
pub const JOURNAL_FILE: &str = "journal.json";
/// Current journal format version.
pub const JOURNAL_VERSION: u32 = 1;
/// Largest journal accepted, in bytes.
const MAX_JOURNAL_LEN: u64 = 1024 * 1024;
/// Largest key or certificate file accepted, in bytes.
const MAX_FILE_LEN: u64 = 64 * 1024;

/// The journal: every authority the CA directory holds.
///
/// Per kind: exactly one active authority, at most one prepared ("next") one, and any number
/// of retired ones kept in the bundle until they expire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Journal {
    /// Format version ([`JOURNAL_VERSION`]).
    pub version: u32,
    /// The authorities, oldest first.
    pub slots: Vec<Slot>,
}

/// One authority: an X.509 CA or a JWT signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slot {
    /// X.509: the first 16 bytes of the certificate's SHA-256, hex. JWT: the key ID (RFC 7638
    /// thumbprint). Also names the slot's files, so it is restricted to `[A-Za-z0-9_-]`.
    pub id: String,
    /// Which kind of authority.
    pub kind: SlotKind,
    /// Whether it signs now or is only kept in the bundle until it expires.
    pub status: SlotStatus,
    /// X.509 only: the certificate was signed by an upstream authority (an intermediate).
    #[serde(default)]
    pub upstream: bool,
    /// End of validity, unix seconds.
    pub not_after: u64,
    /// When it was created, unix seconds.
    pub created: u64,
    /// Tainted by an operator (forced rotation): agents replace what it signed. Only a
    /// retired authority can be tainted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tainted: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_false(value: &bool) -> bool {
    !*value
}

/// Kind of authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    /// An X.509 CA (key + certificate).
    X509,
    /// A JWT signing key.
    Jwt,
}

/// State of an authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotStatus {
    /// Signs new SVIDs; exactly one per kind.
    Active,
    /// Replaced; published in the bundle until it expires so what it signed stays valid.
    Retired,
    /// The next authority: published in the bundle, not signing yet; activated when less than
    /// a sixth of the active one's lifetime remains.
    Prepared,
}

impl Slot {
    /// Path of the slot's private key in `dir`.
    pub fn key_path(&self, dir: &Path) -> PathBuf {
        match self.kind {
            SlotKind::X509 => dir.join(format!("x509-{}.key.der", self.id)),
            SlotKind::Jwt => dir.join(format!("jwt-{}.key.der", self.id)),
        }
    }

    /// Path of the slot's certificate in `dir` (X.509 slots only).
    pub fn cert_path(&self, dir: &Path) -> PathBuf {
        dir.join(format!("x509-{}.cert.der", self.id))
    }

    /// End of validity.
    pub fn not_after_time(&self) -> SystemTime {
        from_unix(self.not_after)
    }

    /// Unix second from which the next authority of this kind is prepared: when half of this
    /// one's lifetime remains.
    pub fn prepare_at(&self) -> u64 {
        let lifetime = self.not_after.saturating_sub(self.created);
        self.created.saturating_add(lifetime / 2)
    }

    /// Unix second from which this one is replaced: when a sixth of its lifetime remains.
    pub fn activate_next_at(&self) -> u64 {
        let lifetime = self.not_after.saturating_sub(self.created);
        self.not_after.saturating_sub(lifetime / 6)
    }
}

/// Unix seconds of `time` (0 before 1970).
pub fn to_unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The time of unix second `secs`.
pub fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH.checked_add(Duration::from_secs(secs)).unwrap_or(UNIX_EPOCH)
}

fn is_safe_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Journal {
    /// Decodes and checks a journal read from `path` in `ca_dir`.
    pub fn decode(bytes: &[u8], path: &Path, ca_dir: &Path) -> Result<Self, CaError> {
        let corrupt = |reason: String| CaError::Corrupt {
            what: "ca journal file",
            path: path.to_path_buf(),
            reason,
            ca_dir: ca_dir.to_path_buf(),
        };
        let journal: Journal = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if journal.version != JOURNAL_VERSION {
            return Err(corrupt(format!(
                "unsupported journal version {} (expected {JOURNAL_VERSION})",
                journal.version
            )));
        }
        for slot in &journal.slots {
            if !is_safe_id(&slot.id) {
                return Err(corrupt(format!("invalid authority id {:?}", slot.id)));
            }
        }
        for kind in [SlotKind::X509, SlotKind::Jwt] {
            let active = journal.slots.iter().filter(|s| s.kind == kind && s.status == SlotStatus::Active).count();
            if active != 1 {
                return Err(corrupt(format!("expected exactly one active {kind:?} authority, found {active}")));
            }
            let prepared = journal.slots.iter().filter(|s| s.kind == kind && s.status == SlotStatus::Prepared).count();
            if prepared > 1 {
                return Err(corrupt(format!("expected at most one prepared {kind:?} authority, found {prepared}")));
            }
        }
        let mut ids: Vec<(SlotKind, &str)> = journal.slots.iter().map(|s| (s.kind, s.id.as_str())).collect();
        ids.sort_by(|a, b| (a.0 as u8, a.1).cmp(&(b.0 as u8, b.1)));
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(corrupt(format!("authority id {} is listed twice", pair[0].1)));
        }
        Ok(journal)
    }

    /// Encodes the journal (pretty JSON, for operators reading it).
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings and integers cannot fail; an empty journal
        // would be refused at the next start rather than silently accepted.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The active authority of `kind` (the journal is checked to hold exactly one).
    pub fn active(&self, kind: SlotKind) -> Option<&Slot> {
        self.slots.iter().find(|s| s.kind == kind && s.status == SlotStatus::Active)
    }

    /// The prepared (next) authority of `kind`, if any.
    pub fn prepared(&self, kind: SlotKind) -> Option<&Slot> {
        self.slots.iter().find(|s| s.kind == kind && s.status == SlotStatus::Prepared)
    }
}

/// Reads a CA file, refusing anything implausibly large.
pub fn read_file(
    path: &Path,
    what: &'static str,
    ca_dir: &Path,
    limit_override: Option<u64>,
) -> Result<Vec<u8>, CaError> {
    let limit = limit_override.unwrap_or(MAX_FILE_LEN);
    match fs::metadata(path) {
        Ok(meta) if meta.len() > limit => {
            return Err(CaError::Corrupt {
                what,
                path: path.to_path_buf(),
                reason: format!("larger than {limit} bytes"),
                ca_dir: ca_dir.to_path_buf(),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(CaError::Missing { what, path: path.to_path_buf(), ca_dir: ca_dir.to_path_buf() });
        }
        Err(source) => return Err(CaError::Io { action: "read", path: path.to_path_buf(), source }),
    }
    fs::read(path).map_err(|source| CaError::Io { action: "read", path: path.to_path_buf(), source })
}

/// Reads the journal of `ca_dir`.
pub fn read_journal(ca_dir: &Path) -> Result<Journal, CaError> {
    let path = ca_dir.join(JOURNAL_FILE);
    let bytes = read_file(&path, "ca journal file", ca_dir, Some(MAX_JOURNAL_LEN))?;
    Journal::decode(&bytes, &path, ca_dir)
}

/// Whether `dir` is absent or an empty directory (no CA to protect).
pub fn is_absent_or_empty(dir: &Path) -> Result<bool, CaError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(CaError::Io { action: "read directory", path: dir.to_path_buf(), source }),
    }
}

/// Creates `dir` (and parents) with mode 0700 for what is created.
pub fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| CaError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Removes a directory tree if it exists.
pub fn remove_dir_if_exists(dir: &Path) -> Result<(), CaError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CaError::Io { action: "remove directory", path: dir.to_path_buf(), source }),
    }
}

/// fsyncs a directory so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), CaError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| CaError::Io {
        action: "sync directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `data` to `path` atomically: a temporary file (mode 0600) in the same directory,
/// fsync, rename over `path`, fsync the directory. A crash leaves either the old file or the
/// new one, never a truncated one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| CaError::Io { action, path: p, source }
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        // A leftover temporary file keeps its old mode; make sure it is private.
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err("chmod", &tmp))?;
        file.write_all(data).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    sync_dir(dir)
}

/// Renames the staging directory to the CA directory and makes it durable.
pub fn publish_staging(staging: &Path, ca_dir: &Path, data_dir: &Path) -> Result<(), CaError> {
    sync_dir(staging)?;
    fs::rename(staging, ca_dir).map_err(|source| CaError::Io {
        action: "rename into place",
        path: ca_dir.to_path_buf(),
        source,
    })?;
    sync_dir(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal() -> Journal {
        Journal {
            version: JOURNAL_VERSION,
            slots: vec![
                Slot {
                    id: "abc".into(),
                    kind: SlotKind::X509,
                    status: SlotStatus::Active,
                    upstream: false,
                    not_after: 10,
                    created: 1,
                    tainted: false,
                },
                Slot {
                    id: "k-1_x".into(),
                    kind: SlotKind::Jwt,
                    status: SlotStatus::Active,
                    upstream: false,
                    not_after: 10,
                    created: 1,
                    tainted: false,
                },
            ],
        }
    }

    #[test]
    fn journal_round_trips() {
        let j = journal();
        let p = Path::new("/x/ca/journal.json");
        assert_eq!(Journal::decode(&j.encode(), p, Path::new("/x/ca")).unwrap(), j);
    }

    #[test]
    fn journal_refuses_path_traversal_and_missing_active() {
        let p = Path::new("/x/ca/journal.json");
        let mut j = journal();
        j.slots[0].id = "../evil".into();
        let err = Journal::decode(&j.encode(), p, Path::new("/x/ca")).unwrap_err().to_string();
        assert!(err.contains("/x/ca/journal.json") && err.contains("invalid authority id"), "{err}");
        let mut j = journal();
        j.slots[1].status = SlotStatus::Retired;
        let err = Journal::decode(&j.encode(), p, Path::new("/x/ca")).unwrap_err().to_string();
        assert!(err.contains("exactly one active"), "{err}");
        let err = Journal::decode(b"{\"version\":1,", p, Path::new("/x/ca")).unwrap_err().to_string();
        assert!(err.contains("move /x/ca away"), "{err}");
    }

    #[test]
    fn atomic_write_is_private_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!dir.path().join("f.tmp").exists());
    }
}
