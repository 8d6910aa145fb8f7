//! Domain types to `tessera.agent.v1` / `tessera.common.v1` messages (protobuf types stop in
//! the API modules).

use std::time::{SystemTime, UNIX_EPOCH};

use tessera_spiffe::Selector;
use tessera_spiffe::bundle::Bundle;
use tessera_wire::tessera::agent::v1 as pb;
use tessera_wire::tessera::common::v1 as common;

use crate::datastore::RegistrationEntry;

pub(crate) fn selector_to_proto(selector: &Selector) -> common::Selector {
    common::Selector { r#type: selector.kind().to_owned(), value: selector.value().to_owned() }
}

fn ttl_to_proto(ttl: Option<std::time::Duration>) -> u32 {
    ttl.map_or(0, |ttl| u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX))
}

/// The entry as the agent receives it.
pub(crate) fn entry_to_proto(entry: &RegistrationEntry) -> common::Entry {
    common::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.as_str().to_owned(),
        parent_id: entry.parent_id.as_str().to_owned(),
        selectors: entry.selectors.iter().map(selector_to_proto).collect(),
        x509_svid_ttl: ttl_to_proto(entry.x509_svid_ttl),
        jwt_svid_ttl: ttl_to_proto(entry.jwt_svid_ttl),
        dns_names: entry.dns_names.clone(),
        federates_with: entry.federates_with.iter().map(|td| td.name().to_owned()).collect(),
        hint: entry.hint.clone(),
        admin: entry.admin,
        downstream: entry.downstream,
        expires_at: entry.expires_at.map_or(0, |at| i64::try_from(at).unwrap_or(i64::MAX)),
        revision: entry.revision,
    }
}

/// The entry's `common::Entry` encoding: what a sync keeps next to the store's `Arc`
/// ([`crate::datastore::SharedEntry::encoded_with`]) and writes into its messages.
pub(crate) fn encoded_entry(entry: &RegistrationEntry) -> Vec<u8> {
    prost::Message::encode_to_vec(&entry_to_proto(entry))
}

/// Unix seconds of a time, saturating (certificates cannot go past 9999 anyway).
pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

/// The structured form of a bundle.
pub(crate) fn bundle_to_proto(bundle: &Bundle) -> common::Bundle {
    common::Bundle {
        trust_domain: bundle.trust_domain().name().to_owned(),
        x509_authorities: bundle.x509_authorities().map(<[u8]>::to_vec).collect(),
        jwt_authorities: bundle
            .jwt_authorities()
            .iter()
            .map(|(key_id, key)| common::JwtAuthority {
                key_id: key_id.clone(),
                public_key: key.spki_der().to_vec(),
                expires_at: 0,
            })
            .collect(),
        sequence: bundle.sequence(),
        refresh_hint_seconds: bundle.refresh_hint().map_or(0, |hint| i64::try_from(hint.as_secs()).unwrap_or(i64::MAX)),
    }
}

/// The SPIFFE bundle document form of a bundle.
pub(crate) fn bundle_document(bundle: &Bundle) -> pb::BundleDocument {
    pb::BundleDocument {
        trust_domain: bundle.trust_domain().name().to_owned(),
        sequence: bundle.sequence(),
        spiffe_bundle: bundle.to_json().into_bytes(),
    }
}
