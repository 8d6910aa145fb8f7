//! What the agent keeps in `data_dir` across restarts, written atomically.
//!
//! Layout (the directory is created `0700`):
//!
//! | file | mode | content |
//! | --- | --- | --- |
//! | `agent_svid.pem` | `0600` | the agent SVID chain (`CERTIFICATE` blocks, leaf first) followed by the agent's private key (`PRIVATE KEY`, PKCS#8) |
//! | `bundle.json` | `0644` | the server's trust bundle as a SPIFFE bundle document (X.509 and JWT authorities, sequence) |
//!
//! The chain and its key live in one file so that a crash can never leave a new key next to
//! an old certificate (or the reverse): every write goes to a temporary file in the same
//! directory, which is fsynced, renamed over the old file, and the directory is fsynced.
//!
//! Reading is strict: a file that exists but does not parse, or whose key does not match the
//! leaf certificate, is an error naming the file, never silently ignored (the operator must
//! decide, since re-attesting needs a fresh join token).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ring::rand::SystemRandom;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_spiffe::x509::{X509Svid as ParsedSvid, concat_der_certificates};
use zeroize::Zeroizing;

/// File name of the agent SVID and key.
pub const AGENT_SVID_FILE: &str = "agent_svid.pem";
/// File name of the cached trust bundle.
pub const BUNDLE_FILE: &str = "bundle.json";

/// Why persisted state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A file or directory operation failed.
    #[error("{path}: {message}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A file exists but its content is unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

fn io_error(path: &Path, what: &str, error: &io::Error) -> StorageError {
    StorageError::Io { path: path.to_path_buf(), message: format!("{what}: {}", crate::config::io_message(error)) }
}

/// The agent's own credential: its SVID chain and private key.
#[derive(Clone)]
pub struct AgentCredential {
    /// The agent's SPIFFE ID (the leaf's URI SAN).
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the private key.
    pub private_key_pkcs8: Zeroizing<Vec<u8>>,
    /// notAfter of the leaf.
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for AgentCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredential")
            .field("spiffe_id", &self.spiffe_id)
            .field("certificates", &self.cert_chain.len())
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AgentCredential {
    /// Checks a chain and key the way a Workload API client checks an SVID (one SPIFFE ID URI
    /// SAN, leaf not a CA, key matching the leaf) and builds the credential.
    pub fn new(cert_chain: Vec<Vec<u8>>, private_key_pkcs8: Zeroizing<Vec<u8>>) -> Result<Self, String> {
        let parsed = ParsedSvid::parse(&concat_der_certificates(&cert_chain), &private_key_pkcs8, &SystemRandom::new())
            .map_err(|error| format!("not a usable X.509-SVID: {error}"))?;
        Ok(Self {
            spiffe_id: parsed.spiffe_id().clone(),
            cert_chain,
            private_key_pkcs8,
            expires_at: parsed.not_after(),
        })
    }

    /// True while the leaf has not expired at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }
}

/// Reads and writes the agent's persisted state under one directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Storage rooted at `data_dir`, creating it (`0700`) if needed.
    pub fn open(data_dir: &Path) -> Result<Self, StorageError> {
        if !data_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(|error| io_error(data_dir, "cannot create the data directory", &error))?;
        }
        let metadata =
            fs::metadata(data_dir).map_err(|error| io_error(data_dir, "cannot read the data directory", &error))?;
        if !metadata.is_dir() {
            return Err(StorageError::Invalid {
                path: data_dir.to_path_buf(),
                message: "is not a directory (data_dir)".to_owned(),
            });
        }
        Ok(Self { dir: data_dir.to_path_buf() })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the agent SVID file.
    pub fn agent_svid_path(&self) -> PathBuf {
        self.dir.join(AGENT_SVID_FILE)
    }

    /// Path of the bundle file.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.join(BUNDLE_FILE)
    }

    /// The persisted agent credential, `None` when there is none.
    pub fn load_agent_credential(&self) -> Result<Option<AgentCredential>, StorageError> {
        let path = self.agent_svid_path();
        let Some(text) = read_optional(&path)?.map(Zeroizing::new) else {
            return Ok(None);
        };
        let invalid = |message: String| StorageError::Invalid { path: path.clone(), message };
        let blocks = pem::parse_many(text.as_slice()).map_err(|error| invalid(format!("not PEM: {error}")))?;
        let mut chain = Vec::new();
        let mut key: Option<Zeroizing<Vec<u8>>> = None;
        for block in blocks {
            match block.tag() {
                "CERTIFICATE" => chain.push(block.into_contents()),
                "PRIVATE KEY" if key.is_none() => key = Some(Zeroizing::new(block.into_contents())),
                "PRIVATE KEY" => return Err(invalid("holds more than one PRIVATE KEY block".to_owned())),
                other => return Err(invalid(format!("unexpected PEM block {other:?}"))),
            }
        }
        let key = key.ok_or_else(|| invalid("has no PRIVATE KEY block".to_owned()))?;
        if chain.is_empty() {
            return Err(invalid("has no CERTIFICATE block".to_owned()));
        }
        AgentCredential::new(chain, key).map(Some).map_err(invalid)
    }

    /// Persists the agent credential atomically (mode `0600`).
    pub fn save_agent_credential(&self, credential: &AgentCredential) -> Result<(), StorageError> {
        let mut text = Zeroizing::new(String::new());
        for der in &credential.cert_chain {
            text.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())));
        }
        let key_block =
            Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", credential.private_key_pkcs8.to_vec())));
        text.push_str(&key_block);
        write_atomic(&self.agent_svid_path(), text.as_bytes(), 0o600)
    }

    /// The persisted bundle of `trust_domain`, `None` when there is none.
    pub fn load_bundle(&self, trust_domain: &TrustDomain) -> Result<Option<Bundle>, StorageError> {
        let path = self.bundle_path();
        let Some(json) = read_optional(&path)? else {
            return Ok(None);
        };
        let bundle = Bundle::from_json(trust_domain.clone(), &json)
            .map_err(|error| StorageError::Invalid { path: path.clone(), message: format!("not a bundle: {error}") })?;
        if bundle.x509_authorities().len() == 0 {
            return Err(StorageError::Invalid { path, message: "the bundle has no X.509 authority".to_owned() });
        }
        Ok(Some(bundle))
    }

    /// Persists the bundle atomically (mode `0644`).
    pub fn save_bundle(&self, bundle: &Bundle) -> Result<(), StorageError> {
        write_atomic(&self.bundle_path(), bundle.to_json().as_bytes(), 0o644)
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(io_error(path, "cannot read", &error)),
    }
}

/// Writes `contents` to `path` so that a reader (or a crash) sees either the old file or the
/// complete new one: temporary file in the same directory, fsync, rename, fsync of the
/// directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .map_err(|error| io_error(&temp, "cannot create", &error))?;
        // The mode given to open() is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|error| io_error(&temp, "cannot set permissions", &error))?;
        file.write_all(contents).map_err(|error| io_error(&temp, "cannot write", &error))?;
        file.sync_all().map_err(|error| io_error(&temp, "cannot sync", &error))?;
        fs::rename(&temp, path).map_err(|error| io_error(path, "cannot replace", &error))?;
        if let Ok(dir_handle) = fs::File::open(dir) {
            dir_handle.sync_all().map_err(|error| io_error(dir, "cannot sync the directory", &error))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::keys::test_issuer as issuer;

    #[test]
    fn credential_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&dir.path().join("data")).unwrap();
        assert_eq!(fs::metadata(storage.dir()).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(storage.load_agent_credential().unwrap().is_none());

        let issuer = issuer("example.org");
        let (chain, key) = crate::manager::keys::test_svid(&issuer, "spiffe://example.org/tessera/agent/x");
        let credential = AgentCredential::new(chain, key).unwrap();
        storage.save_agent_credential(&credential).unwrap();
        let mode = fs::metadata(storage.agent_svid_path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = storage.load_agent_credential().unwrap().unwrap();
        assert_eq!(loaded.spiffe_id, credential.spiffe_id);
        assert_eq!(loaded.cert_chain, credential.cert_chain);
        assert_eq!(loaded.private_key_pkcs8.as_slice(), credential.private_key_pkcs8.as_slice());
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(storage.dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        fs::write(storage.agent_svid_path(), "garbage").unwrap();
        let error = storage.load_agent_credential().unwrap_err().to_string();
        assert!(error.contains(AGENT_SVID_FILE), "{error}");

        let issuer = issuer("example.org");
        let (chain, _) = crate::manager::keys::test_svid(&issuer, "spiffe://example.org/a");
        let (_, other_key) = crate::manager::keys::test_svid(&issuer, "spiffe://example.org/b");
        let mut text = String::new();
        for der in &chain {
            text.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())));
        }
        text.push_str(&pem::encode(&pem::Pem::new("PRIVATE KEY", other_key.to_vec())));
        fs::write(storage.agent_svid_path(), text).unwrap();
        assert!(storage.load_agent_credential().is_err(), "a key that does not match the leaf is refused");

        fs::write(storage.bundle_path(), "{}").unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        assert!(storage.load_bundle(&td).unwrap_err().to_string().contains(BUNDLE_FILE));
    }

    #[test]
    fn bundle_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        assert!(storage.load_bundle(&td).unwrap().is_none());
        let issuer = issuer("example.org");
        let mut bundle = Bundle::new(td.clone());
        bundle.add_x509_authority(issuer.certificate_der()).unwrap();
        bundle.set_sequence(3);
        storage.save_bundle(&bundle).unwrap();
        assert_eq!(storage.load_bundle(&td).unwrap().unwrap(), bundle);
    }
}
