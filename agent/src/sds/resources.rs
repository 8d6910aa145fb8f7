//! SDS resource names and the `Secret`s built for them. Pure: no I/O, no clock, unit-tested
//! without a runtime.

use std::collections::HashSet;

use prost_types::value::Kind;
use tessera_spiffe::bundle::{Bundle, encode_pem_certificates};
use tessera_spiffe::selector::SelectorSet;
use tessera_spiffe::spiffe_id::{SpiffeId, TrustDomain};
use tessera_wire::envoy::config::core::v3::node::UserAgentVersionType;
use tessera_wire::envoy::config::core::v3::{DataSource, Node, TypedExtensionConfig, data_source};
use tessera_wire::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use tonic::Status;

use crate::cache::{AgentSnapshot, Identity};
use crate::workload_api::{Visibility, caller_identities};

/// The type URL of SDS resources (`envoy.extensions.transport_sockets.tls.v3.Secret`).
pub const SECRET_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The name of Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";

/// The Envoy node metadata key that selects legacy validation contexts (`trusted_ca`).
pub const DISABLE_SPIFFE_CERT_VALIDATION: &str = "disable_spiffe_cert_validation";

/// Most resource names in one request, and the longest name accepted.
const MAX_RESOURCE_NAMES: usize = 1024;
const MAX_RESOURCE_NAME_BYTES: usize = 2048;

/// How SDS names its well-known resources and which validation contexts it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsSettings {
    /// The resource name of the caller's default (first) X.509-SVID.
    pub default_svid_name: String,
    /// The resource name of the own trust domain's CA certificates.
    pub default_bundle_name: String,
    /// The resource name of the SPIFFE validator over every trust domain the caller may see.
    pub default_all_bundles_name: String,
    /// Send validation contexts as plain `trusted_ca` PEM instead of the SPIFFE validator
    /// (Envoy node metadata `disable_spiffe_cert_validation` overrides this per proxy).
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsSettings {
    fn default() -> Self {
        Self {
            default_svid_name: "default".to_owned(),
            default_bundle_name: "ROOTCA".to_owned(),
            default_all_bundles_name: "ALL".to_owned(),
            disable_spiffe_cert_validation: false,
        }
    }
}

/// What one requested resource name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resource {
    /// A SPIFFE ID with a path: the caller's X.509-SVID for that identity.
    Identity(SpiffeId),
    /// `default`: the caller's first X.509-SVID.
    DefaultIdentity,
    /// `spiffe://<td>`: that trust domain's CA certificates.
    TrustDomain(TrustDomain),
    /// `ROOTCA`: the own trust domain's CA certificates.
    OwnBundle,
    /// `ALL`: the SPIFFE validator over every trust domain the caller may see.
    AllBundles,
}

/// The resources a request subscribes to: `None` for an empty name list (everything the caller
/// may see), otherwise each distinct name in request order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    names: Option<Vec<(String, Resource)>>,
}

impl Subscription {
    /// Classifies `resource_names`. Malformed or unknown names, too many names, and more than
    /// one of {own trust domain ID, `ROOTCA`, `ALL`} are InvalidArgument.
    pub(crate) fn parse(names: &[String], settings: &SdsSettings, own: &TrustDomain) -> Result<Self, Status> {
        if names.is_empty() {
            return Ok(Self { names: None });
        }
        if names.len() > MAX_RESOURCE_NAMES {
            return Err(Status::invalid_argument(format!(
                "resource_names: at most {MAX_RESOURCE_NAMES} names are accepted"
            )));
        }
        let mut seen = HashSet::new();
        let mut parsed = Vec::new();
        let mut own_validation_contexts = 0;
        for name in names {
            if !seen.insert(name.as_str()) {
                continue;
            }
            let resource = classify(name, settings)?;
            if matches!(&resource, Resource::OwnBundle | Resource::AllBundles)
                || matches!(&resource, Resource::TrustDomain(td) if td == own)
            {
                own_validation_contexts += 1;
            }
            parsed.push((name.clone(), resource));
        }
        // spec §7: only one of these is honoured per request; naming several fails.
        if own_validation_contexts > 1 {
            return Err(Status::invalid_argument(format!(
                "resource_names: request at most one of \"{}\", \"{}\" and \"{}\" per subscription",
                own.id(),
                settings.default_bundle_name,
                settings.default_all_bundles_name
            )));
        }
        Ok(Self { names: Some(parsed) })
    }

    /// The requested names (empty for "everything"), for logs.
    pub(crate) fn names(&self) -> Vec<&str> {
        self.names.iter().flatten().map(|(name, _)| name.as_str()).collect()
    }

    /// Of the names `build` reported missing, those that may still appear without the caller
    /// doing anything: SVIDs of matching entries that are still being minted.
    pub(crate) fn all_pending(&self, missing: &[String], snapshot: &AgentSnapshot, selectors: &SelectorSet) -> bool {
        let entries = snapshot.entries_for(selectors);
        let Some(names) = &self.names else { return false };
        missing.iter().all(|name| {
            names.iter().any(|(n, resource)| {
                n == name
                    && match resource {
                        Resource::Identity(id) => entries.iter().any(|entry| entry.spiffe_id == *id),
                        Resource::DefaultIdentity => !entries.is_empty(),
                        _ => false,
                    }
            })
        })
    }
}

fn classify(name: &str, settings: &SdsSettings) -> Result<Resource, Status> {
    if name.len() > MAX_RESOURCE_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "resource_names: a name is longer than {MAX_RESOURCE_NAME_BYTES} bytes"
        )));
    }
    if name == settings.default_svid_name {
        return Ok(Resource::DefaultIdentity);
    }
    if name == settings.default_bundle_name {
        return Ok(Resource::OwnBundle);
    }
    if name == settings.default_all_bundles_name {
        return Ok(Resource::AllBundles);
    }
    match SpiffeId::parse(name) {
        Ok(id) if id.is_trust_domain_id() => Ok(Resource::TrustDomain(id.trust_domain())),
        Ok(id) => Ok(Resource::Identity(id)),
        Err(err) => Err(Status::invalid_argument(format!(
            "resource_names: {name:?} is neither a SPIFFE ID ({err}) nor one of \"{}\", \"{}\", \"{}\"",
            settings.default_svid_name, settings.default_bundle_name, settings.default_all_bundles_name
        ))),
    }
}

/// How validation contexts are encoded for one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValidationMode {
    /// `custom_validator_config` with Envoy's SPIFFE certificate validator (the default).
    SpiffeValidator,
    /// `trusted_ca` PEM only, for proxies without the SPIFFE validator.
    Legacy,
}

impl ValidationMode {
    /// spec §7: legacy when the agent disables the SPIFFE validator, unless the node metadata
    /// says otherwise (either way), or when the proxy is Envoy 1.17 or older.
    pub(crate) fn for_node(settings: &SdsSettings, node: Option<&Node>) -> Self {
        let mut disabled = settings.disable_spiffe_cert_validation;
        if let Some(value) = node
            .and_then(|node| node.metadata.as_ref())
            .and_then(|metadata| metadata.fields.get(DISABLE_SPIFFE_CERT_VALIDATION))
            .and_then(|value| value.kind.as_ref())
        {
            match value {
                Kind::BoolValue(flag) => disabled = *flag,
                Kind::StringValue(text) => {
                    if let Some(flag) = parse_bool(text) {
                        disabled = flag;
                    }
                }
                _ => {}
            }
        }
        let too_old = match node.and_then(|node| node.user_agent_version_type.as_ref()) {
            Some(UserAgentVersionType::UserAgentBuildVersion(build)) => {
                build.version.as_ref().is_some_and(|v| v.major_number == 1 && v.minor_number <= 17)
            }
            _ => false,
        };
        if disabled || too_old { Self::Legacy } else { Self::SpiffeValidator }
    }
}

/// The boolean spellings Envoy deployments use in string metadata.
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Why the secrets of a subscription could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BuildError {
    /// Names the caller holds no resource for (an identity it does not have, a trust domain it
    /// may not see): InvalidArgument.
    NotAuthorized(Vec<String>),
    /// `ALL` for a proxy in legacy mode: Internal.
    SpiffeValidatorUnavailable,
    /// A message could not be encoded: Internal.
    Encode(String),
}

impl BuildError {
    pub(crate) fn to_status(&self) -> Status {
        match self {
            Self::NotAuthorized(names) => {
                Status::invalid_argument(format!("workload is not authorized for the requested identities {names:?}"))
            }
            Self::SpiffeValidatorUnavailable => {
                Status::internal("unable to use \"SPIFFE validator\" on Envoy below 1.17")
            }
            Self::Encode(what) => Status::internal(format!("cannot encode the SDS response: {what}")),
        }
    }
}

/// Builds the secrets of `subscription` that a caller with `selectors` sees in `snapshot`.
/// Every named resource must be present, otherwise [`BuildError::NotAuthorized`] lists the
/// missing names.
pub(crate) fn build(
    snapshot: &AgentSnapshot,
    own: &TrustDomain,
    selectors: &SelectorSet,
    subscription: &Subscription,
    mode: ValidationMode,
) -> Result<Vec<Secret>, BuildError> {
    let identities = caller_identities(snapshot, selectors);
    let visible = Visibility::of(snapshot, own, selectors).unwrap_or_else(|| Visibility::own_only(own));
    let bundle_of =
        |td: &TrustDomain| -> Option<&Bundle> { if visible.contains(td) { snapshot.bundles.get(td) } else { None } };
    let Some(names) = &subscription.names else {
        // Everything: each visible bundle (own first), then each identity, named by their IDs.
        let mut secrets = Vec::new();
        let own_bundle = snapshot.bundles.own();
        secrets.push(validation_secret(own.id_string(), &[own_bundle], mode)?);
        for td in visible.domains().filter(|td| *td != own) {
            if let Some(bundle) = snapshot.bundles.get(td) {
                secrets.push(validation_secret(td.id_string(), &[bundle], mode)?);
            }
        }
        let mut seen = HashSet::new();
        for identity in &identities {
            if seen.insert(identity.entry.spiffe_id.as_str()) {
                secrets.push(tls_secret(identity.entry.spiffe_id.as_str().to_owned(), identity));
            }
        }
        return Ok(secrets);
    };
    let mut secrets = Vec::with_capacity(names.len());
    let mut missing = Vec::new();
    for (name, resource) in names {
        let secret = match resource {
            Resource::Identity(id) => identities
                .iter()
                .find(|identity| identity.entry.spiffe_id == *id)
                .map(|identity| tls_secret(name.clone(), identity)),
            Resource::DefaultIdentity => identities.first().map(|identity| tls_secret(name.clone(), identity)),
            Resource::TrustDomain(td) => {
                bundle_of(td).map(|bundle| validation_secret(name.clone(), &[bundle], mode)).transpose()?
            }
            Resource::OwnBundle => Some(validation_secret(name.clone(), &[snapshot.bundles.own()], mode)?),
            Resource::AllBundles => {
                if mode == ValidationMode::Legacy {
                    return Err(BuildError::SpiffeValidatorUnavailable);
                }
                let bundles: Vec<&Bundle> = visible.domains().filter_map(|td| snapshot.bundles.get(td)).collect();
                Some(validation_secret(name.clone(), &bundles, mode)?)
            }
        };
        match secret {
            Some(secret) => secrets.push(secret),
            None => missing.push(name.clone()),
        }
    }
    if missing.is_empty() { Ok(secrets) } else { Err(BuildError::NotAuthorized(missing)) }
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource { specifier: Some(data_source::Specifier::InlineBytes(bytes)) })
}

/// A `tls_certificate` secret: PEM chain (leaf first) and PEM PKCS#8 key.
fn tls_secret(name: String, identity: &Identity) -> Secret {
    let chain = encode_pem_certificates(identity.svid.chain());
    let key = pem::encode_config(
        &pem::Pem::new("PRIVATE KEY", identity.svid.private_key_pkcs8().to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    );
    Secret {
        name,
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(key.into_bytes()),
        })),
    }
}

/// A `validation_context` secret for `bundles`: the SPIFFE validator with one entry per trust
/// domain (bare name, PEM CAs), or in legacy mode the PEM CAs as `trusted_ca`.
fn validation_secret(name: String, bundles: &[&Bundle], mode: ValidationMode) -> Result<Secret, BuildError> {
    let context = match mode {
        ValidationMode::Legacy => CertificateValidationContext {
            trusted_ca: inline(bundles.iter().map(|bundle| bundle.x509_authorities_pem()).collect::<String>().into()),
            custom_validator_config: None,
        },
        ValidationMode::SpiffeValidator => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: bundles
                    .iter()
                    .map(|bundle| spiffe_cert_validator_config::TrustDomain {
                        name: bundle.trust_domain().name().to_owned(),
                        trust_bundle: inline(bundle.x509_authorities_pem().into_bytes()),
                    })
                    .collect(),
                trust_bundles: None,
            };
            let typed_config =
                prost_types::Any::from_msg(&config).map_err(|err| BuildError::Encode(err.to_string()))?;
            CertificateValidationContext {
                trusted_ca: None,
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR_NAME.to_owned(),
                    typed_config: Some(typed_config),
                }),
            }
        }
    };
    Ok(Secret { name, r#type: Some(secret::Type::ValidationContext(context)) })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use tessera_spiffe::bundle::BundleSet;
    use tessera_wire::envoy::config::core::v3::BuildVersion;
    use tessera_wire::envoy::r#type::v3::SemanticVersion;

    use super::*;
    use crate::cache::{CachedEntry, X509Svid};

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn parse(list: &[&str]) -> Result<Subscription, Status> {
        Subscription::parse(&names(list), &SdsSettings::default(), &td("example.org"))
    }

    fn entry(id: &str, path: &str, selectors: &[&str], federates_with: &[&str]) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: id.into(),
            spiffe_id: td("example.org").workload_id(path).unwrap(),
            selectors: SelectorSet::parse_all(selectors).unwrap(),
            federates_with: federates_with.iter().map(|n| td(n)).collect(),
            hint: String::new(),
            revision: 1,
        })
    }

    fn snapshot(entries: &[Arc<CachedEntry>]) -> AgentSnapshot {
        let mut bundles = BundleSet::new(Bundle::new(td("example.org")));
        bundles.insert_federated(Bundle::new(td("partner.test"))).unwrap();
        bundles.insert_federated(Bundle::new(td("zeta.test"))).unwrap();
        let mut snapshot = AgentSnapshot::empty(bundles);
        snapshot.ready = true;
        for e in entries {
            snapshot.insert_identity(Identity {
                entry: e.clone(),
                svid: Arc::new(X509Svid::from_chain(&[vec![1, 2, 3]], &[4, 5], SystemTime::UNIX_EPOCH)),
            });
        }
        snapshot
    }

    fn caller() -> SelectorSet {
        SelectorSet::parse_all(&["unix:uid:1000"]).unwrap()
    }

    fn secret_names(secrets: &[Secret]) -> Vec<&str> {
        secrets.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn names_are_classified_and_deduplicated() {
        let sub = parse(&["spiffe://example.org/web", "default", "spiffe://partner.test", "default"]).unwrap();
        assert_eq!(sub.names(), ["spiffe://example.org/web", "default", "spiffe://partner.test"]);
        assert_eq!(parse(&[]).unwrap().names(), Vec::<&str>::new());
        for bad in ["Default", "spiffe://EXAMPLE.org/x", "", "rootca"] {
            let status = parse(&[bad]).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(status.message().starts_with("resource_names:"), "{}", status.message());
        }
        let too_many: Vec<String> = (0..=MAX_RESOURCE_NAMES).map(|i| format!("spiffe://example.org/{i}")).collect();
        assert!(Subscription::parse(&too_many, &SdsSettings::default(), &td("example.org")).is_err());
    }

    #[test]
    fn only_one_own_validation_context_per_request() {
        assert!(parse(&["ROOTCA", "ALL"]).is_err());
        assert!(parse(&["ROOTCA", "spiffe://example.org"]).is_err());
        parse(&["ROOTCA", "spiffe://partner.test"]).unwrap();
    }

    #[test]
    fn legacy_mode_follows_settings_node_metadata_and_version() {
        let settings = SdsSettings::default();
        assert_eq!(ValidationMode::for_node(&settings, None), ValidationMode::SpiffeValidator);
        let with_metadata = |value: Kind| Node {
            metadata: Some(prost_types::Struct {
                fields: [(DISABLE_SPIFFE_CERT_VALIDATION.to_owned(), prost_types::Value { kind: Some(value) })]
                    .into_iter()
                    .collect(),
            }),
            ..Node::default()
        };
        let node = with_metadata(Kind::BoolValue(true));
        assert_eq!(ValidationMode::for_node(&settings, Some(&node)), ValidationMode::Legacy);
        let node = with_metadata(Kind::StringValue("True".into()));
        assert_eq!(ValidationMode::for_node(&settings, Some(&node)), ValidationMode::Legacy);
        let disabled = SdsSettings { disable_spiffe_cert_validation: true, ..SdsSettings::default() };
        assert_eq!(ValidationMode::for_node(&disabled, None), ValidationMode::Legacy);
        let node = with_metadata(Kind::StringValue("false".into()));
        assert_eq!(ValidationMode::for_node(&disabled, Some(&node)), ValidationMode::SpiffeValidator);
        let versioned = |minor| Node {
            user_agent_version_type: Some(UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                version: Some(SemanticVersion { major_number: 1, minor_number: minor, patch: 0 }),
                metadata: None,
            })),
            ..Node::default()
        };
        assert_eq!(ValidationMode::for_node(&settings, Some(&versioned(17))), ValidationMode::Legacy);
        assert_eq!(ValidationMode::for_node(&settings, Some(&versioned(18))), ValidationMode::SpiffeValidator);
    }

    #[test]
    fn empty_subscription_returns_every_visible_resource() {
        let own = td("example.org");
        let web = entry("e1", "/web", &["unix:uid:1000"], &["partner.test"]);
        let other = entry("e2", "/other", &["unix:uid:2"], &["zeta.test"]);
        let snap = snapshot(&[web, other]);
        let secrets = build(&snap, &own, &caller(), &parse(&[]).unwrap(), ValidationMode::SpiffeValidator).unwrap();
        assert_eq!(
            secret_names(&secrets),
            ["spiffe://example.org", "spiffe://partner.test", "spiffe://example.org/web"]
        );
        // A caller without entries still gets its own trust domain's bundle.
        let none = SelectorSet::parse_all(&["unix:uid:3"]).unwrap();
        let secrets = build(&snap, &own, &none, &parse(&[]).unwrap(), ValidationMode::SpiffeValidator).unwrap();
        assert_eq!(secret_names(&secrets), ["spiffe://example.org"]);
    }

    #[test]
    fn unauthorized_names_are_listed_and_pending_ones_recognised() {
        let own = td("example.org");
        let web = entry("e1", "/web", &["unix:uid:1000"], &[]);
        let mut snap = snapshot(&[web]);
        let sub = parse(&["spiffe://example.org/web", "spiffe://example.org/db", "spiffe://zeta.test"]).unwrap();
        let err = build(&snap, &own, &caller(), &sub, ValidationMode::SpiffeValidator).unwrap_err();
        assert_eq!(err, BuildError::NotAuthorized(names(&["spiffe://example.org/db", "spiffe://zeta.test"])));
        assert_eq!(
            err.to_status().message(),
            r#"workload is not authorized for the requested identities ["spiffe://example.org/db", "spiffe://zeta.test"]"#
        );
        // The SVID of a matching entry that is being minted is pending; a foreign one is not.
        snap.clear_identities();
        let sub = parse(&["default", "spiffe://example.org/web"]).unwrap();
        let Err(BuildError::NotAuthorized(missing)) = build(&snap, &own, &caller(), &sub, ValidationMode::Legacy)
        else {
            panic!("expected missing names")
        };
        assert!(sub.all_pending(&missing, &snap, &caller()));
        assert!(!sub.all_pending(&names(&["spiffe://example.org/db"]), &snap, &caller()));
    }

    #[test]
    fn all_is_spiffe_validator_only_and_sorted() {
        let own = td("example.org");
        let web = entry("e1", "/web", &["unix:uid:1000"], &["zeta.test", "partner.test"]);
        let snap = snapshot(&[web]);
        let sub = parse(&["ALL"]).unwrap();
        let secrets = build(&snap, &own, &caller(), &sub, ValidationMode::SpiffeValidator).unwrap();
        let Some(secret::Type::ValidationContext(context)) = &secrets[0].r#type else { panic!("no context") };
        let validator = context.custom_validator_config.as_ref().unwrap();
        assert_eq!(validator.name, SPIFFE_VALIDATOR_NAME);
        let config: SpiffeCertValidatorConfig = validator.typed_config.as_ref().unwrap().to_msg().unwrap();
        let tds: Vec<&str> = config.trust_domains.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tds, ["example.org", "partner.test", "zeta.test"]);
        assert_eq!(
            build(&snap, &own, &caller(), &sub, ValidationMode::Legacy).unwrap_err().to_status().code(),
            tonic::Code::Internal
        );
    }
}
