//! The on-disk encoding of stored values: one schema-version byte, then the record in
//! postcard (a compact, stable serde format).
//!
//! The record types here are private and separate from the public domain types on purpose:
//! changing a domain type must not silently change what is on disk. When a record changes
//! shape, add `...V2`, bump [`RECORD_VERSION`] for new writes and keep decoding version 1,
//! converting on read (or in a migration at open). A value with an unknown version byte or
//! bytes that do not decode is reported as [`DataStoreError::Corrupt`], never a panic.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tessera_spiffe::{SelectorSet, SpiffeId, TrustDomain};

use super::error::DataStoreError;
use super::types::{AttestedNode, Bundle, CaJournal, ChangeKind, EntryChange, JoinToken, RegistrationEntry};

/// The version byte every value written by this build starts with.
pub(super) const RECORD_VERSION: u8 = 1;

/// Encodes `record` behind the version byte.
pub(super) fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, DataStoreError> {
    postcard::to_extend(record, vec![RECORD_VERSION]).map_err(|e| DataStoreError::backend("encoding a record", e))
}

/// Decodes a value of `tree` at `key`, checking the version byte and that every byte is used.
pub(super) fn decode<T: DeserializeOwned>(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, DataStoreError> {
    let Some((&version, body)) = bytes.split_first() else {
        return Err(DataStoreError::corrupt(tree, key, "empty value"));
    };
    if version != RECORD_VERSION {
        return Err(DataStoreError::corrupt(tree, key, format!("unknown record version {version}")));
    }
    let (record, rest) = postcard::take_from_bytes(body)
        .map_err(|e| DataStoreError::corrupt(tree, key, format!("cannot decode record: {e}")))?;
    if !rest.is_empty() {
        return Err(DataStoreError::corrupt(tree, key, format!("{} unexpected trailing bytes", rest.len())));
    }
    Ok(record)
}

/// Encodes a revision or counter as a big-endian key or value, so byte order is numeric
/// order.
pub(super) fn u64_bytes(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Decodes a big-endian `u64` stored in `tree` at `key`.
pub(super) fn decode_u64(tree: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, DataStoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| DataStoreError::corrupt(tree, key, format!("expected 8 bytes, found {}", bytes.len())))
}

/// A registration entry; its ID is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EntryRecordV1 {
    spiffe_id: SpiffeId,
    parent_id: SpiffeId,
    selectors: SelectorSet,
    x509_svid_ttl: Option<Duration>,
    jwt_svid_ttl: Option<Duration>,
    dns_names: Vec<String>,
    federates_with: Vec<TrustDomain>,
    hint: String,
    admin: bool,
    downstream: bool,
    expires_at: Option<u64>,
    revision: u64,
}

impl EntryRecordV1 {
    /// (Writes use [`EntryRecordV1Ref`]; tests check both give the same bytes.)
    #[cfg(test)]
    pub(super) fn from_entry(entry: &RegistrationEntry) -> Self {
        Self {
            spiffe_id: entry.spiffe_id.clone(),
            parent_id: entry.parent_id.clone(),
            selectors: entry.selectors.clone(),
            x509_svid_ttl: entry.x509_svid_ttl,
            jwt_svid_ttl: entry.jwt_svid_ttl,
            dns_names: entry.dns_names.clone(),
            federates_with: entry.federates_with.clone(),
            hint: entry.hint.clone(),
            admin: entry.admin,
            downstream: entry.downstream,
            expires_at: entry.expires_at,
            revision: entry.revision,
        }
    }

    pub(super) fn into_entry(self, id: String) -> RegistrationEntry {
        RegistrationEntry {
            id,
            spiffe_id: self.spiffe_id,
            parent_id: self.parent_id,
            selectors: self.selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names,
            federates_with: self.federates_with,
            hint: self.hint,
            admin: self.admin,
            downstream: self.downstream,
            expires_at: self.expires_at,
            revision: self.revision,
        }
    }
}

/// [`EntryRecordV1`] borrowed from an entry, for writing: the same fields in the same order,
/// so the same bytes, without copying the entry's strings first.
#[derive(Serialize)]
pub(super) struct EntryRecordV1Ref<'a> {
    spiffe_id: &'a SpiffeId,
    parent_id: &'a SpiffeId,
    selectors: &'a SelectorSet,
    x509_svid_ttl: Option<Duration>,
    jwt_svid_ttl: Option<Duration>,
    dns_names: &'a [String],
    federates_with: &'a [TrustDomain],
    hint: &'a str,
    admin: bool,
    downstream: bool,
    expires_at: Option<u64>,
    revision: u64,
}

impl<'a> EntryRecordV1Ref<'a> {
    pub(super) fn from_entry(entry: &'a RegistrationEntry) -> Self {
        Self {
            spiffe_id: &entry.spiffe_id,
            parent_id: &entry.parent_id,
            selectors: &entry.selectors,
            x509_svid_ttl: entry.x509_svid_ttl,
            jwt_svid_ttl: entry.jwt_svid_ttl,
            dns_names: &entry.dns_names,
            federates_with: &entry.federates_with,
            hint: &entry.hint,
            admin: entry.admin,
            downstream: entry.downstream,
            expires_at: entry.expires_at,
            revision: entry.revision,
        }
    }
}

/// What happened to an entry, as stored in the change log.
#[derive(Debug, Serialize, Deserialize)]
enum ChangeKindV1 {
    Upsert,
    Delete,
}

/// A change-log record; its revision is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ChangeRecordV1 {
    entry_id: String,
    kind: ChangeKindV1,
}

/// [`ChangeRecordV1`] borrowing its entry ID, for writing (the same bytes).
#[derive(Serialize)]
pub(super) struct ChangeRecordV1Ref<'a> {
    entry_id: &'a str,
    kind: ChangeKindV1,
}

impl<'a> ChangeRecordV1Ref<'a> {
    pub(super) fn new(entry_id: &'a str, kind: ChangeKind) -> Self {
        Self { entry_id, kind: ChangeKindV1::from(kind) }
    }
}

impl From<ChangeKind> for ChangeKindV1 {
    fn from(kind: ChangeKind) -> Self {
        match kind {
            ChangeKind::Upsert => Self::Upsert,
            ChangeKind::Delete => Self::Delete,
        }
    }
}

impl ChangeRecordV1 {
    /// (Writes use [`ChangeRecordV1Ref`]; tests check both give the same bytes.)
    #[cfg(test)]
    pub(super) fn new(entry_id: &str, kind: ChangeKind) -> Self {
        Self { entry_id: entry_id.to_owned(), kind: ChangeKindV1::from(kind) }
    }

    pub(super) fn into_change(self, revision: u64) -> EntryChange {
        let kind = match self.kind {
            ChangeKindV1::Upsert => ChangeKind::Upsert,
            ChangeKindV1::Delete => ChangeKind::Delete,
        };
        EntryChange { revision, entry_id: self.entry_id, kind }
    }
}

/// An attested node; its SPIFFE ID is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct NodeRecordV1 {
    attestation_type: String,
    serial: String,
    new_serial: Option<String>,
    expires_at: u64,
    banned: bool,
    selectors: SelectorSet,
    can_reattest: bool,
}

impl NodeRecordV1 {
    pub(super) fn from_node(node: &AttestedNode) -> Self {
        Self {
            attestation_type: node.attestation_type.clone(),
            serial: node.serial.clone(),
            new_serial: node.new_serial.clone(),
            expires_at: node.expires_at,
            banned: node.banned,
            selectors: node.selectors.clone(),
            can_reattest: node.can_reattest,
        }
    }

    pub(super) fn into_node(self, spiffe_id: SpiffeId) -> AttestedNode {
        AttestedNode {
            spiffe_id,
            attestation_type: self.attestation_type,
            serial: self.serial,
            new_serial: self.new_serial,
            expires_at: self.expires_at,
            banned: self.banned,
            selectors: self.selectors,
            can_reattest: self.can_reattest,
        }
    }
}

/// A join token; the token is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct TokenRecordV1 {
    expires_at: u64,
    alias_spiffe_id: Option<SpiffeId>,
}

impl TokenRecordV1 {
    pub(super) fn from_token(token: &JoinToken) -> Self {
        Self { expires_at: token.expires_at, alias_spiffe_id: token.alias_spiffe_id.clone() }
    }

    pub(super) fn expires_at(&self) -> u64 {
        self.expires_at
    }

    pub(super) fn into_token(self, token: String) -> JoinToken {
        JoinToken { token, expires_at: self.expires_at, alias_spiffe_id: self.alias_spiffe_id }
    }
}

/// A bundle; the trust domain name is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct BundleRecordV1 {
    data: Vec<u8>,
    sequence: u64,
}

impl BundleRecordV1 {
    pub(super) fn new(data: &[u8], sequence: u64) -> Self {
        Self { data: data.to_vec(), sequence }
    }

    pub(super) fn sequence(&self) -> u64 {
        self.sequence
    }

    pub(super) fn into_bundle(self, trust_domain: TrustDomain) -> Bundle {
        Bundle { trust_domain, data: self.data, sequence: self.sequence }
    }
}

/// The CA journal, under a single key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CaJournalRecordV1 {
    data: Vec<u8>,
    version: u64,
}

impl CaJournalRecordV1 {
    pub(super) fn new(data: &[u8], version: u64) -> Self {
        Self { data: data.to_vec(), version }
    }

    pub(super) fn into_journal(self) -> CaJournal {
        CaJournal { data: self.data, version: self.version }
    }
}

/// A JWT ID in the replay cache; `(issuer, jti)` is the key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JtiRecordV1 {
    pub(super) expires_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let record = JtiRecordV1 { expires_at: 42 };
        let bytes = encode(&record).unwrap();
        assert_eq!(bytes[0], RECORD_VERSION);
        let back: JtiRecordV1 = decode("jtis", b"k", &bytes).unwrap();
        assert_eq!(back.expires_at, 42);

        let mut wrong_version = bytes.clone();
        wrong_version[0] = 9;
        let err = decode::<JtiRecordV1>("jtis", b"k", &wrong_version).unwrap_err();
        assert!(err.to_string().contains("unknown record version 9"), "{err}");
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(decode::<JtiRecordV1>("jtis", b"k", &trailing), Err(DataStoreError::Corrupt { .. })));
        assert!(matches!(decode::<JtiRecordV1>("jtis", b"k", &[]), Err(DataStoreError::Corrupt { .. })));
        assert!(matches!(decode::<EntryRecordV1>("entries", b"k", &[1, 0xff]), Err(DataStoreError::Corrupt { .. })));
        assert!(matches!(decode_u64("meta", b"k", &[1, 2]), Err(DataStoreError::Corrupt { .. })));
    }

    /// The borrowed entry record writes exactly the owned record's bytes, which decode back
    /// to the entry.
    #[test]
    fn the_borrowed_entry_record_encodes_as_the_owned_one() {
        let mut entry = RegistrationEntry::new(
            "e1",
            SpiffeId::parse("spiffe://example.org/w/1").unwrap(),
            SpiffeId::parse("spiffe://example.org/agent").unwrap(),
            SelectorSet::parse_all(&["unix:uid:1000", "k8s:ns:default"]).unwrap(),
        );
        entry.x509_svid_ttl = Some(Duration::from_secs(3600));
        entry.jwt_svid_ttl = Some(Duration::from_millis(1500));
        entry.dns_names = vec!["a.example.org".into(), "b.example.org".into()];
        entry.federates_with = vec![TrustDomain::new("other.org").unwrap()];
        entry.hint = "hint".into();
        entry.admin = true;
        entry.downstream = true;
        entry.expires_at = Some(1_700_000_000);
        entry.revision = 42;
        let borrowed = encode(&EntryRecordV1Ref::from_entry(&entry)).unwrap();
        assert_eq!(borrowed, encode(&EntryRecordV1::from_entry(&entry)).unwrap());
        let back: EntryRecordV1 = decode("entries", b"e1", &borrowed).unwrap();
        assert_eq!(back.into_entry("e1".into()), entry);
        for kind in [ChangeKind::Upsert, ChangeKind::Delete] {
            let borrowed = encode(&ChangeRecordV1Ref::new("e1", kind)).unwrap();
            assert_eq!(borrowed, encode(&ChangeRecordV1::new("e1", kind)).unwrap());
            let back: ChangeRecordV1 = decode("entry_changes", b"k", &borrowed).unwrap();
            assert_eq!(back.into_change(7), EntryChange { revision: 7, entry_id: "e1".into(), kind });
        }
    }
}
