//! Conversions between the admin API's protobuf messages and the server's domain types.
//!
//! Generated types stop here: everything below the API module speaks
//! [`RegistrationEntry`], [`SpiffeId`], [`Selector`]... Parsing a request is where its input
//! is validated, so every error names the protobuf field at fault ([`FieldError`]).

use std::time::Duration;

use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::keys::PublicKey;
use tessera_spiffe::x509::X509SvidTemplate;
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};
use tessera_wire::tessera::admin::v1 as admin;
use tessera_wire::tessera::common::v1 as common;
use tonic::Status;

use crate::datastore::{AttestedNode, EntryFilter, RegistrationEntry, SelectorFilter, SelectorMatch};

/// An invalid request field: becomes `INVALID_ARGUMENT` with the message
/// `invalid <field>: <reason>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub(crate) struct FieldError {
    /// The protobuf field name (`spiffe_id`, `parent_id`, `selectors`...).
    pub(crate) field: &'static str,
    /// Why it is refused.
    pub(crate) reason: String,
}

impl FieldError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self { field, reason: reason.into() }
    }
}

impl From<FieldError> for Status {
    fn from(err: FieldError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

/// Parses a SPIFFE ID of this trust domain that names a workload (has a path).
pub(crate) fn parse_member_id(
    field: &'static str,
    input: &str,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, FieldError> {
    if input.is_empty() {
        return Err(FieldError::new(field, "must be set"));
    }
    let id = SpiffeId::parse(input)
        .map_err(|err| FieldError::new(field, format!("{input:?} is not a valid SPIFFE ID: {err}")))?;
    if !id.is_member_of(trust_domain) {
        return Err(FieldError::new(
            field,
            format!("{input:?} is not in this server's trust domain {:?}", trust_domain.name()),
        ));
    }
    id.require_workload().map_err(|_| {
        FieldError::new(field, format!("{input:?} names a trust domain, not a workload (it needs a path)"))
    })?;
    Ok(id)
}

/// Parses the SPIFFE ID a workload SVID will carry: as [`parse_member_id`], and outside the
/// reserved `/tessera` namespace of the server's and agents' own identities.
pub(crate) fn parse_workload_id(
    field: &'static str,
    input: &str,
    trust_domain: &TrustDomain,
) -> Result<SpiffeId, FieldError> {
    let id = parse_member_id(field, input, trust_domain)?;
    if crate::ca::is_reserved_id(&id) {
        return Err(FieldError::new(
            field,
            format!(
                "{input:?} is in the reserved {} namespace of the server's and agents' own identities; \
                 choose another path",
                crate::ca::RESERVED_PATH
            ),
        ));
    }
    Ok(id)
}

/// Parses the selectors of an entry: at least one, each well formed.
pub(crate) fn parse_selectors(field: &'static str, selectors: &[common::Selector]) -> Result<SelectorSet, FieldError> {
    if selectors.is_empty() {
        return Err(FieldError::new(field, "an entry needs at least one selector"));
    }
    selectors.iter().map(|s| parse_selector(field, s)).collect()
}

fn parse_selector(field: &'static str, selector: &common::Selector) -> Result<Selector, FieldError> {
    Selector::new(&selector.r#type, &selector.value).map_err(|err| FieldError::new(field, err.to_string()))
}

/// The domain selector as a protobuf message.
pub(crate) fn selector_to_proto(selector: &Selector) -> common::Selector {
    common::Selector { r#type: selector.kind().to_owned(), value: selector.value().to_owned() }
}

fn parse_ttl(ttl: u32) -> Option<Duration> {
    // 0 means "server default" on the wire; the CLI refuses an explicit 0.
    (ttl != 0).then(|| Duration::from_secs(u64::from(ttl)))
}

fn ttl_to_proto(ttl: Option<Duration>) -> u32 {
    ttl.map_or(0, |ttl| u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX))
}

/// DNS SANs, checked with the very rule the X.509-SVID template applies when signing (so an
/// entry can never hold a name its SVIDs cannot carry): ASCII labels, an optional leading `*`
/// label, at most 253 bytes.
pub(crate) fn parse_dns_names(names: &[String]) -> Result<Vec<String>, FieldError> {
    let probe = SpiffeId::parse("spiffe://dns-name-check.invalid/probe")
        .map_err(|err| FieldError::new("dns_names", format!("cannot check DNS names: {err}")))?;
    for name in names {
        X509SvidTemplate::new(probe.clone(), Duration::from_secs(1))
            .and_then(|template| template.with_dns_names([name.as_str()]))
            .map_err(|_| FieldError::new("dns_names", format!("{name:?} is not a DNS name")))?;
    }
    Ok(names.to_vec())
}

fn parse_federates_with(names: &[String], own: &TrustDomain) -> Result<Vec<TrustDomain>, FieldError> {
    names
        .iter()
        .map(|name| {
            let td = TrustDomain::new(name)
                .map_err(|err| FieldError::new("federates_with", format!("{name:?} is not a trust domain: {err}")))?;
            if &td == own {
                return Err(FieldError::new("federates_with", format!("{name:?} is this server's own trust domain")));
            }
            Ok(td)
        })
        .collect()
}

fn parse_expires_at(expires_at: i64) -> Result<Option<u64>, FieldError> {
    match expires_at {
        0 => Ok(None),
        at => u64::try_from(at).map(Some).map_err(|_| FieldError::new("expires_at", format!("{at} is before 1970"))),
    }
}

/// Which fields of an update apply; `None` in the request means all of them.
pub(crate) fn full_mask() -> admin::EntryMask {
    admin::EntryMask {
        spiffe_id: true,
        parent_id: true,
        selectors: true,
        x509_svid_ttl: true,
        jwt_svid_ttl: true,
        dns_names: true,
        federates_with: true,
        hint: true,
        admin: true,
        downstream: true,
        expires_at: true,
    }
}

/// Applies the masked fields of `proto` to `entry`, validating each. With [`full_mask`] the
/// result is `proto` parsed as a whole (creation uses it on an empty template).
pub(crate) fn apply_entry(
    mut entry: RegistrationEntry,
    proto: &common::Entry,
    mask: &admin::EntryMask,
    trust_domain: &TrustDomain,
) -> Result<RegistrationEntry, FieldError> {
    if mask.spiffe_id {
        entry.spiffe_id = parse_workload_id("spiffe_id", &proto.spiffe_id, trust_domain)?;
    }
    if mask.parent_id {
        entry.parent_id = parse_member_id("parent_id", &proto.parent_id, trust_domain)?;
    }
    if mask.selectors {
        entry.selectors = parse_selectors("selectors", &proto.selectors)?;
    }
    if mask.x509_svid_ttl {
        entry.x509_svid_ttl = parse_ttl(proto.x509_svid_ttl);
    }
    if mask.jwt_svid_ttl {
        entry.jwt_svid_ttl = parse_ttl(proto.jwt_svid_ttl);
    }
    if mask.dns_names {
        entry.dns_names = parse_dns_names(&proto.dns_names)?;
    }
    if mask.federates_with {
        entry.federates_with = parse_federates_with(&proto.federates_with, trust_domain)?;
    }
    if mask.hint {
        if proto.hint.len() > 1024 || proto.hint.chars().any(char::is_control) {
            return Err(FieldError::new("hint", "must be at most 1024 bytes without control characters"));
        }
        entry.hint.clone_from(&proto.hint);
    }
    if mask.admin {
        entry.admin = proto.admin;
    }
    if mask.downstream {
        entry.downstream = proto.downstream;
    }
    if mask.expires_at {
        entry.expires_at = parse_expires_at(proto.expires_at)?;
    }
    Ok(entry)
}

/// Parses a whole entry for creation; `id` is the ID to store it under.
pub(crate) fn entry_from_proto(
    id: String,
    proto: &common::Entry,
    trust_domain: &TrustDomain,
) -> Result<RegistrationEntry, FieldError> {
    // The mandatory fields first, so their errors come in a natural order.
    let spiffe_id = parse_workload_id("spiffe_id", &proto.spiffe_id, trust_domain)?;
    let parent_id = parse_member_id("parent_id", &proto.parent_id, trust_domain)?;
    let selectors = parse_selectors("selectors", &proto.selectors)?;
    let template = RegistrationEntry::new(id, spiffe_id, parent_id, selectors);
    let rest = admin::EntryMask { spiffe_id: false, parent_id: false, selectors: false, ..full_mask() };
    apply_entry(template, proto, &rest, trust_domain)
}

/// The entry as a protobuf message.
pub(crate) fn entry_to_proto(entry: &RegistrationEntry) -> common::Entry {
    common::Entry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.to_string(),
        parent_id: entry.parent_id.to_string(),
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

/// Parses a listing filter. Unlike entry fields, filter IDs may name any trust domain (a
/// foreign ID simply matches nothing), but they must be well formed.
pub(crate) fn entry_filter_from_proto(filter: Option<&admin::EntryFilter>) -> Result<EntryFilter, FieldError> {
    let Some(filter) = filter else {
        return Ok(EntryFilter::default());
    };
    let parse_id = |field: &'static str, input: &str| -> Result<Option<SpiffeId>, FieldError> {
        if input.is_empty() {
            return Ok(None);
        }
        SpiffeId::parse(input)
            .map(Some)
            .map_err(|err| FieldError::new(field, format!("{input:?} is not a valid SPIFFE ID: {err}")))
    };
    let selectors = match &filter.selectors {
        Some(matcher) if !matcher.selectors.is_empty() => {
            let set: SelectorSet =
                matcher.selectors.iter().map(|s| parse_selector("filter.selectors", s)).collect::<Result<_, _>>()?;
            let mode = match admin::SelectorMatchMode::try_from(matcher.mode) {
                Ok(admin::SelectorMatchMode::Exact) => SelectorMatch::Exact,
                Ok(admin::SelectorMatchMode::Subset) => SelectorMatch::Subset,
                Ok(admin::SelectorMatchMode::Any) => SelectorMatch::Any,
                Ok(admin::SelectorMatchMode::Superset | admin::SelectorMatchMode::Unspecified) => {
                    SelectorMatch::Superset
                }
                Err(_) => {
                    return Err(FieldError::new("filter.selectors.mode", format!("unknown mode {}", matcher.mode)));
                }
            };
            Some(SelectorFilter::new(set, mode))
        }
        _ => None,
    };
    Ok(EntryFilter {
        spiffe_id: parse_id("filter.spiffe_id", &filter.spiffe_id)?,
        parent_id: parse_id("filter.parent_id", &filter.parent_id)?,
        selectors,
    })
}

/// Parses a trust domain given as a bare name (`example.com`) or as a trust domain SPIFFE ID
/// (`spiffe://example.com`). A SPIFFE ID with a path names a workload and is refused.
pub(crate) fn parse_trust_domain(field: &'static str, input: &str) -> Result<TrustDomain, FieldError> {
    if input.is_empty() {
        return Err(FieldError::new(field, "must be set"));
    }
    if input.contains(":/") {
        let id = SpiffeId::parse(input)
            .map_err(|err| FieldError::new(field, format!("{input:?} is not a valid trust domain ID: {err}")))?;
        if !id.is_trust_domain_id() {
            return Err(FieldError::new(
                field,
                format!("{input:?} names a workload, not a trust domain (expected spiffe://<trust domain>)"),
            ));
        }
        return Ok(id.trust_domain());
    }
    TrustDomain::new(input)
        .map_err(|err| FieldError::new(field, format!("{input:?} is not a valid trust domain: {err}")))
}

/// A trust bundle as the protobuf `Bundle`.
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

/// The protobuf `Bundle` as a trust bundle, every authority checked (the CLI turns what the
/// server sends into PEM or SPIFFE bundle JSON with it). The error names what is wrong.
pub(crate) fn bundle_from_proto(proto: &common::Bundle) -> Result<Bundle, String> {
    let trust_domain = TrustDomain::new(&proto.trust_domain)
        .map_err(|err| format!("invalid trust domain {:?}: {err}", proto.trust_domain))?;
    let mut bundle = Bundle::new(trust_domain);
    for der in &proto.x509_authorities {
        bundle.add_x509_authority(der).map_err(|err| format!("invalid X.509 authority: {err}"))?;
    }
    for authority in &proto.jwt_authorities {
        let key = PublicKey::from_spki_der(&authority.public_key)
            .map_err(|err| format!("invalid JWT authority {:?}: {err}", authority.key_id))?;
        bundle
            .add_jwt_authority(authority.key_id.clone(), key)
            .map_err(|err| format!("invalid JWT authority {:?}: {err}", authority.key_id))?;
    }
    bundle.set_sequence(proto.sequence);
    let hint = u64::try_from(proto.refresh_hint_seconds).ok().filter(|&secs| secs > 0);
    bundle.set_refresh_hint(hint.map(Duration::from_secs));
    Ok(bundle)
}

/// An attested node as the admin API's `Agent`.
pub(crate) fn agent_to_proto(node: &AttestedNode) -> admin::Agent {
    admin::Agent {
        spiffe_id: node.spiffe_id.to_string(),
        attestation_type: node.attestation_type.clone(),
        serial: node.serial.clone(),
        expires_at: i64::try_from(node.expires_at).unwrap_or(i64::MAX),
        banned: node.banned,
        selectors: node.selectors.iter().map(selector_to_proto).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn proto_entry() -> common::Entry {
        common::Entry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/tessera/agent/join_token/abc".into(),
            selectors: vec![common::Selector { r#type: "unix".into(), value: "uid:1000".into() }],
            x509_svid_ttl: 60,
            dns_names: vec!["web.example.org".into()],
            federates_with: vec!["other.org".into()],
            hint: "web".into(),
            expires_at: 4_000_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn round_trip() {
        let entry = entry_from_proto("e1".into(), &proto_entry(), &td()).unwrap();
        assert_eq!(entry.x509_svid_ttl, Some(Duration::from_secs(60)));
        assert_eq!(entry.jwt_svid_ttl, None);
        let back = entry_to_proto(&entry);
        assert_eq!(common::Entry { id: String::new(), ..back }, proto_entry());
    }

    #[test]
    fn errors_name_the_field() {
        type Mutation = fn(&mut common::Entry);
        let cases: Vec<(Mutation, &str)> = vec![
            (|e| e.spiffe_id = "not-an-id".into(), "invalid spiffe_id"),
            (|e| e.spiffe_id = "spiffe://other.org/web".into(), "invalid spiffe_id"),
            (|e| e.spiffe_id = "spiffe://example.org".into(), "invalid spiffe_id"),
            (|e| e.spiffe_id = String::new(), "invalid spiffe_id: must be set"),
            (|e| e.parent_id = "spiffe://other.org/agent".into(), "invalid parent_id"),
            (|e| e.selectors.clear(), "invalid selectors"),
            (|e| e.selectors[0].value = String::new(), "invalid selectors"),
            (|e| e.federates_with = vec!["example.org".into()], "invalid federates_with"),
            (|e| e.dns_names = vec![String::new()], "invalid dns_names"),
            (|e| e.dns_names = vec!["bad name".into()], "invalid dns_names"),
            (|e| e.dns_names = vec!["-web.example.org".into()], "invalid dns_names"),
            (|e| e.dns_names = vec!["a..b".into()], "invalid dns_names"),
            (|e| e.expires_at = -1, "invalid expires_at"),
        ];
        for (mutate, expected) in cases {
            let mut proto = proto_entry();
            mutate(&mut proto);
            let err = entry_from_proto("e1".into(), &proto, &td()).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{err} should start with {expected}");
        }
    }

    #[test]
    fn masked_update_only_touches_masked_fields() {
        let entry = entry_from_proto("e1".into(), &proto_entry(), &td()).unwrap();
        let change = common::Entry { hint: "new".into(), ..Default::default() };
        let mask = admin::EntryMask { hint: true, ..Default::default() };
        let updated = apply_entry(entry.clone(), &change, &mask, &td()).unwrap();
        assert_eq!(updated, RegistrationEntry { hint: "new".into(), ..entry });
    }

    #[test]
    fn trust_domains_bare_or_as_ids() {
        assert_eq!(parse_trust_domain("trust_domain", "other.org").unwrap().name(), "other.org");
        assert_eq!(parse_trust_domain("trust_domain", "spiffe://other.org").unwrap().name(), "other.org");
        for bad in ["", "spiffe://other.org/workload", "Other.org", "http://other.org", "spiffe://"] {
            let err = parse_trust_domain("trust_domain", bad).unwrap_err();
            assert_eq!(err.field, "trust_domain", "{bad:?}");
        }
    }

    #[test]
    fn bundles_round_trip_through_proto() {
        let rng = ring::rand::SystemRandom::new();
        let key = tessera_spiffe::keys::SigningKey::generate(tessera_spiffe::keys::KeyType::EcP256, &rng).unwrap();
        let mut bundle = Bundle::new(td());
        bundle.add_jwt_authority("kid-1", key.public_key().clone()).unwrap();
        bundle.set_sequence(7);
        bundle.set_refresh_hint(Some(Duration::from_secs(300)));
        let proto = bundle_to_proto(&bundle);
        assert_eq!(proto.trust_domain, "example.org");
        assert_eq!(proto.refresh_hint_seconds, 300);
        assert_eq!(bundle_from_proto(&proto).unwrap(), bundle);
        let broken = common::Bundle { x509_authorities: vec![b"junk".to_vec()], ..proto };
        assert!(bundle_from_proto(&broken).unwrap_err().contains("X.509 authority"));
    }

    #[test]
    fn filter_modes() {
        let filter = admin::EntryFilter {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: String::new(),
            selectors: Some(admin::SelectorMatch {
                selectors: vec![common::Selector { r#type: "unix".into(), value: "uid:1".into() }],
                mode: admin::SelectorMatchMode::Exact as i32,
            }),
        };
        let parsed = entry_filter_from_proto(Some(&filter)).unwrap();
        assert_eq!(parsed.selectors.unwrap().mode, SelectorMatch::Exact);
        assert!(parsed.parent_id.is_none());
        let bad = admin::EntryFilter { parent_id: "x".into(), ..filter };
        assert_eq!(entry_filter_from_proto(Some(&bad)).unwrap_err().field, "filter.parent_id");
    }
}
