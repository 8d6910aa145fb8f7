//! What one caller sees in a snapshot, and the protobuf messages built from it. Pure: no I/O,
//! no clock, unit-tested without a runtime.
//!
//! A *view* is the part of an [`AgentSnapshot`] a caller with given selectors is entitled to.
//! Streams keep the last view they sent and compare it with the view of each new snapshot, so
//! a caller is sent a message exactly when what *it* sees changed (its SVID rotated, one of its
//! entries was added, removed or edited, a bundle it sees changed), and not when another
//! workload's identity changed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use serde_json::Value as Json;
use tessera_spiffe::bundle::BundleSet;
use tessera_spiffe::jwt::{JwtAuthorities, MissingJwtAuthority};
use tessera_spiffe::keys::PublicKey;
use tessera_spiffe::selector::SelectorSet;
use tessera_spiffe::spiffe_id::TrustDomain;
use tessera_wire::workload as pb;

use crate::cache::{AgentSnapshot, CachedEntry, Identity};

/// The key of a trust domain in every Workload API bundle map: its SPIFFE ID, `spiffe://<td>`.
pub(crate) fn bundle_key(trust_domain: &TrustDomain) -> String {
    trust_domain.id_string()
}

/// The X.509 part of what a caller sees: its identities and the bundles that go with them.
#[derive(Debug, Clone)]
pub(crate) struct X509View {
    /// The caller's identities in response order (the first is the default identity).
    identities: Vec<Identity>,
    /// Concatenated DER CA certificates of each SVID's own trust domain.
    own_bundles: BTreeMap<TrustDomain, Vec<u8>>,
    /// `spiffe://<td>` -> concatenated DER CA certificates, for the federated trust domains of
    /// the caller's entries that the agent has a bundle for.
    federated: BTreeMap<String, Vec<u8>>,
}

impl PartialEq for X509View {
    /// Same entries (by value) with the same SVIDs (by identity: a re-minted SVID is always a
    /// new allocation) and the same bundle bytes.
    fn eq(&self, other: &Self) -> bool {
        self.identities.len() == other.identities.len()
            && self
                .identities
                .iter()
                .zip(&other.identities)
                .all(|(a, b)| a.entry == b.entry && Arc::ptr_eq(&a.svid, &b.svid))
            && self.own_bundles == other.own_bundles
            && self.federated == other.federated
    }
}

impl X509View {
    /// The caller's view, or `None` when the caller has no identity in this snapshot.
    pub(crate) fn of(snapshot: &AgentSnapshot, own: &TrustDomain, selectors: &SelectorSet) -> Option<Self> {
        let identities = caller_identities(snapshot, selectors);
        if identities.is_empty() {
            return None;
        }
        let mut own_bundles = BTreeMap::new();
        for identity in &identities {
            let trust_domain = identity.entry.spiffe_id.trust_domain();
            if let std::collections::btree_map::Entry::Vacant(slot) = own_bundles.entry(trust_domain) {
                let der = snapshot.bundles.get(slot.key()).map(|b| b.x509_authorities_der()).unwrap_or_default();
                slot.insert(der);
            }
        }
        let federated = federated_domains(identities.iter().map(|identity| &*identity.entry), own)
            .into_iter()
            .filter_map(|td| snapshot.bundles.get(&td).map(|bundle| (bundle_key(&td), bundle.x509_authorities_der())))
            .collect();
        Some(Self { identities, own_bundles, federated })
    }

    /// The SPIFFE IDs in response order, for logs.
    pub(crate) fn spiffe_ids(&self) -> Vec<&str> {
        self.identities.iter().map(|identity| identity.entry.spiffe_id.as_str()).collect()
    }

    /// The `X509SVIDResponse` for this view.
    pub(crate) fn to_response(&self) -> pb::X509svidResponse {
        let svids = self
            .identities
            .iter()
            .map(|identity| pb::X509svid {
                spiffe_id: identity.entry.spiffe_id.as_str().to_owned(),
                // spec: leaf first, then intermediates, DER back to back.
                x509_svid: identity.svid.chain_der(),
                // spec: unencrypted PKCS#8 DER.
                x509_svid_key: identity.svid.private_key_pkcs8().to_vec(),
                // spec: the CA certificates of the SVID's own trust domain.
                bundle: self.own_bundles.get(&identity.entry.spiffe_id.trust_domain()).cloned().unwrap_or_default(),
                hint: identity.entry.hint.clone(),
            })
            .collect();
        pb::X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: self.federated.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }
}

/// The identities (with an SVID) a caller with `selectors` gets, in response order: the first
/// is its default identity. Identities whose hint an earlier one has are left out.
pub(crate) fn caller_identities(snapshot: &AgentSnapshot, selectors: &SelectorSet) -> Vec<Identity> {
    unique_hints(snapshot.identities_for(selectors), |identity| &identity.entry.hint)
}

/// Which trust domains' bundles a caller may see: its own and those its entries federate with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Visibility {
    domains: BTreeSet<TrustDomain>,
}

impl Visibility {
    /// The own trust domain plus the federated trust domains of the caller's matching
    /// entries (with or without an SVID yet). `None` when the caller matches no entry.
    pub(crate) fn of(snapshot: &AgentSnapshot, own: &TrustDomain, selectors: &SelectorSet) -> Option<Self> {
        let entries = snapshot.entries_for(selectors);
        if entries.is_empty() {
            return None;
        }
        Some(Self::with_entries(own, entries.into_iter().map(|entry| &**entry)))
    }

    /// Only the own trust domain (a caller that has no entry may still validate JWT-SVIDs of
    /// its own trust domain).
    pub(crate) fn own_only(own: &TrustDomain) -> Self {
        Self { domains: BTreeSet::from([own.clone()]) }
    }

    fn with_entries<'a>(own: &TrustDomain, entries: impl IntoIterator<Item = &'a CachedEntry>) -> Self {
        let mut domains = federated_domains(entries, own);
        domains.insert(own.clone());
        Self { domains }
    }

    /// The visible trust domains, sorted by name; the own one is always among them.
    pub(crate) fn domains(&self) -> impl Iterator<Item = &TrustDomain> + '_ {
        self.domains.iter()
    }

    /// Whether the caller may see `trust_domain`'s bundle.
    pub(crate) fn contains(&self, trust_domain: &TrustDomain) -> bool {
        self.domains.contains(trust_domain)
    }

    /// `FetchX509Bundles`: `spiffe://<td>` -> concatenated DER CA certificates. The own trust
    /// domain is always present (spec), even when its bundle has no X.509 authority yet.
    pub(crate) fn x509_bundles(&self, bundles: &BundleSet, own: &TrustDomain) -> BTreeMap<String, Vec<u8>> {
        self.domains
            .iter()
            .filter_map(|td| match bundles.get(td) {
                Some(bundle) => Some((bundle_key(td), bundle.x509_authorities_der())),
                None if td == own => Some((bundle_key(td), Vec::new())),
                None => None,
            })
            .collect()
    }

    /// `FetchJWTBundles`: `spiffe://<td>` -> standard JWKS JSON (JWT authorities only).
    pub(crate) fn jwt_bundles(&self, bundles: &BundleSet, own: &TrustDomain) -> BTreeMap<String, Vec<u8>> {
        self.domains
            .iter()
            .filter_map(|td| match bundles.get(td) {
                Some(bundle) => Some((bundle_key(td), bundle.to_jwt_jwks().into_bytes())),
                None if td == own => Some((bundle_key(td), br#"{"keys":[]}"#.to_vec())),
                None => None,
            })
            .collect()
    }

    /// The JWT authorities of the visible trust domains only, for `ValidateJWTSVID`.
    pub(crate) fn jwt_authorities<'a>(&'a self, bundles: &'a BundleSet) -> VisibleJwtAuthorities<'a> {
        VisibleJwtAuthorities { visibility: self, bundles }
    }
}

/// JWT authorities restricted to the trust domains a caller may see.
#[derive(Debug)]
pub(crate) struct VisibleJwtAuthorities<'a> {
    visibility: &'a Visibility,
    bundles: &'a BundleSet,
}

impl JwtAuthorities for VisibleJwtAuthorities<'_> {
    fn jwt_authority(&self, trust_domain: &TrustDomain, key_id: &str) -> Result<&PublicKey, MissingJwtAuthority> {
        if !self.visibility.domains.contains(trust_domain) {
            return Err(MissingJwtAuthority::NoBundle);
        }
        self.bundles.jwt_authority(trust_domain, key_id)
    }
}

/// The federated trust domains of `entries`, without the own trust domain.
fn federated_domains<'a>(
    entries: impl IntoIterator<Item = &'a CachedEntry>,
    own: &TrustDomain,
) -> BTreeSet<TrustDomain> {
    entries.into_iter().flat_map(|entry| entry.federates_with.iter()).filter(|td| *td != own).cloned().collect()
}

/// Drops every item whose non-empty hint an earlier item already has (spec: hints are unique
/// within one response; the first one wins, as clients would pick it).
pub(crate) fn unique_hints<T>(items: Vec<T>, hint: impl Fn(&T) -> &String) -> Vec<T> {
    let mut seen = HashSet::new();
    items
        .into_iter()
        .filter(|item| {
            let hint = hint(item);
            hint.is_empty() || seen.insert(hint.clone())
        })
        .collect()
}

/// The entries whose JWT-SVIDs a caller gets: all matching entries in the stable order of
/// [`AgentSnapshot::identities_for`], one per SPIFFE ID, optionally only `requested`.
pub(crate) fn jwt_entries(
    snapshot: &AgentSnapshot,
    selectors: &SelectorSet,
    requested: Option<&tessera_spiffe::SpiffeId>,
) -> Vec<Arc<CachedEntry>> {
    let mut entries: Vec<&Arc<CachedEntry>> = snapshot
        .entries_for(selectors)
        .into_iter()
        .filter(|entry| requested.is_none_or(|id| entry.spiffe_id == *id))
        .collect();
    entries.sort_by(|a, b| (a.spiffe_id.as_str(), &*a.id).cmp(&(b.spiffe_id.as_str(), &*b.id)));
    entries.dedup_by(|a, b| a.spiffe_id == b.spiffe_id);
    unique_hints(entries, |entry| &entry.hint).into_iter().cloned().collect()
}

/// JSON claims as a `google.protobuf.Struct` (numbers become doubles, as the spec says).
pub(crate) fn claims_to_struct(claims: serde_json::Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct { fields: claims.into_iter().map(|(k, v)| (k, json_to_value(v))).collect() }
}

fn json_to_value(json: Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(json_to_value).collect() })
        }
        Json::Object(map) => Kind::StructValue(claims_to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use tessera_spiffe::SpiffeId;
    use tessera_spiffe::bundle::Bundle;

    use super::*;
    use crate::cache::X509Svid;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn entry(id: &str, spiffe_id: &str, selectors: &[&str], federates_with: &[&str], hint: &str) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: SelectorSet::parse_all(selectors).unwrap(),
            federates_with: federates_with.iter().map(|name| td(name)).collect(),
            hint: hint.to_owned(),
            revision: 1,
        })
    }

    fn svid(byte: u8) -> Arc<X509Svid> {
        Arc::new(X509Svid::from_chain(&[vec![byte, 1], vec![byte, 2]], &[byte, 9], SystemTime::UNIX_EPOCH))
    }

    fn snapshot(entries: &[Arc<CachedEntry>]) -> AgentSnapshot {
        let mut bundles = BundleSet::new(Bundle::new(td("example.org")));
        bundles.insert_federated(Bundle::new(td("partner.test"))).unwrap();
        let mut snapshot = AgentSnapshot::empty(bundles);
        snapshot.ready = true;
        for e in entries {
            snapshot.insert_identity(Identity { entry: e.clone(), svid: svid(1) });
        }
        snapshot
    }

    fn caller() -> SelectorSet {
        SelectorSet::parse_all(&["unix:uid:1000", "unix:gid:1000"]).unwrap()
    }

    #[test]
    fn x509_view_orders_svids_and_keys_bundles_by_trust_domain_id() {
        let own = td("example.org");
        let web = entry("e1", "spiffe://example.org/web", &["unix:uid:1000"], &["partner.test", "unknown.test"], "");
        let api = entry("e2", "spiffe://example.org/api", &["unix:gid:1000"], &[], "");
        let other = entry("e3", "spiffe://example.org/other", &["unix:uid:2000"], &[], "");
        let snap = snapshot(&[web, api, other]);
        let view = X509View::of(&snap, &own, &caller()).unwrap();
        assert_eq!(view.spiffe_ids(), ["spiffe://example.org/api", "spiffe://example.org/web"]);
        let response = view.to_response();
        assert_eq!(response.svids[0].x509_svid, vec![1, 1, 1, 2]);
        assert_eq!(response.svids[0].x509_svid_key, vec![1, 9]);
        // Only bundles the agent has; keyed by trust domain ID.
        assert_eq!(response.federated_bundles.keys().collect::<Vec<_>>(), ["spiffe://partner.test"]);
        assert!(X509View::of(&snap, &own, &SelectorSet::parse_all(&["unix:uid:3"]).unwrap()).is_none());
    }

    #[test]
    fn x509_view_changes_only_when_the_callers_part_changes() {
        let own = td("example.org");
        let web = entry("e1", "spiffe://example.org/web", &["unix:uid:1000"], &[], "");
        let other = entry("e3", "spiffe://example.org/other", &["unix:uid:2000"], &[], "");
        let mut snap = snapshot(&[web.clone(), other.clone()]);
        let before = X509View::of(&snap, &own, &caller()).unwrap();
        // Another workload's SVID rotates: no change for this caller.
        snap.insert_identity(Identity { entry: other, svid: svid(2) });
        assert_eq!(X509View::of(&snap, &own, &caller()).unwrap(), before);
        // This caller's SVID rotates (same bytes, new SVID): a change.
        snap.insert_identity(Identity { entry: web, svid: svid(1) });
        assert_ne!(X509View::of(&snap, &own, &caller()).unwrap(), before);
    }

    #[test]
    fn duplicate_hints_keep_the_first_item() {
        let items = vec!["a".to_owned(), String::new(), "a".to_owned(), String::new(), "b".to_owned()];
        assert_eq!(unique_hints(items, |s| s), ["a", "", "", "b"]);
    }

    #[test]
    fn visibility_always_includes_the_own_trust_domain() {
        let own = td("example.org");
        let web = entry("e1", "spiffe://example.org/web", &["unix:uid:1000"], &["partner.test", "gone.test"], "");
        let snap = snapshot(&[web]);
        let visibility = Visibility::of(&snap, &own, &caller()).unwrap();
        let x509 = visibility.x509_bundles(&snap.bundles, &own);
        assert_eq!(x509.keys().collect::<Vec<_>>(), ["spiffe://example.org", "spiffe://partner.test"]);
        let jwt = visibility.jwt_bundles(&snap.bundles, &own);
        assert_eq!(jwt["spiffe://example.org"], br#"{"keys":[]}"#);
        let own_only = Visibility::own_only(&own).x509_bundles(&snap.bundles, &own);
        assert_eq!(own_only.keys().collect::<Vec<_>>(), ["spiffe://example.org"]);
        assert!(Visibility::of(&snap, &own, &SelectorSet::new()).is_none());
    }

    #[test]
    fn jwt_validation_only_uses_visible_trust_domains() {
        use ring::rand::SystemRandom;
        use tessera_spiffe::keys::{KeyType, SigningKey};
        let own = td("example.org");
        let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        let mut bundles = BundleSet::new(Bundle::new(own.clone()));
        let mut partner = Bundle::new(td("partner.test"));
        partner.add_jwt_authority("k", key.public_key().clone()).unwrap();
        bundles.insert_federated(partner).unwrap();

        let own_only = Visibility::own_only(&own);
        let authorities = own_only.jwt_authorities(&bundles);
        assert_eq!(authorities.jwt_authority(&td("partner.test"), "k").unwrap_err(), MissingJwtAuthority::NoBundle);

        let web = entry("e1", "spiffe://example.org/web", &["unix:uid:1000"], &["partner.test"], "");
        let mut snap = snapshot(&[web]);
        snap.bundles = Arc::new(bundles);
        let visible = Visibility::of(&snap, &own, &caller()).unwrap();
        assert!(visible.jwt_authorities(&snap.bundles).jwt_authority(&td("partner.test"), "k").is_ok());
        assert_eq!(
            visible.jwt_authorities(&snap.bundles).jwt_authority(&td("partner.test"), "other").unwrap_err(),
            MissingJwtAuthority::UnknownKeyId
        );
    }

    #[test]
    fn jwt_entries_filter_by_requested_id_and_dedup() {
        let a = entry("e1", "spiffe://example.org/a", &["unix:uid:1000"], &[], "");
        let a2 = entry("e2", "spiffe://example.org/a", &["unix:gid:1000"], &[], "");
        let b = entry("e3", "spiffe://example.org/b", &["unix:uid:1000"], &[], "");
        let snap = snapshot(&[b, a2, a]);
        let ids: Vec<String> = jwt_entries(&snap, &caller(), None).iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["e1", "e3"]);
        let wanted = SpiffeId::parse("spiffe://example.org/b").unwrap();
        let ids: Vec<String> = jwt_entries(&snap, &caller(), Some(&wanted)).iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["e3"]);
        let unknown = SpiffeId::parse("spiffe://example.org/zzz").unwrap();
        assert!(jwt_entries(&snap, &caller(), Some(&unknown)).is_empty());
    }

    #[test]
    fn claims_become_a_struct_with_double_numbers() {
        let claims: serde_json::Map<String, Json> = serde_json::from_str(
            r#"{"sub":"spiffe://example.org/a","aud":["x"],"exp":1700000000,"n":null,"o":{"b":true}}"#,
        )
        .unwrap();
        let s = claims_to_struct(claims);
        use prost_types::value::Kind;
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(1_700_000_000.0)));
        assert!(matches!(&s.fields["aud"].kind, Some(Kind::ListValue(l)) if l.values.len() == 1));
        assert!(
            matches!(&s.fields["o"].kind, Some(Kind::StructValue(o)) if o.fields["b"].kind == Some(Kind::BoolValue(true)))
        );
        assert_eq!(s.fields["n"].kind, Some(Kind::NullValue(0)));
    }
}
