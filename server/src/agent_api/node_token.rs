//! The `k8s_psat` and `oidc` node attestors: the agent presents a JWT and the server verifies it
//! with the token exchange's checks ([`IssuerSet::verify`]), then applies the attestor's own.
//!
//! The payload is the compact token (UTF-8, at most [`MAX_TOKEN_LEN`] bytes), sent in one
//! message with the CSR; there is no challenge. Both attestors are re-attestable: an agent
//! evicted, or whose SVID expired, attests again with the token it holds then.
//!
//! # `k8s_psat` (`[[node_attestor.k8s_psat.cluster]]`)
//!
//! 1. the cluster is the one whose `issuer` is the token's exact `iss` (unknown: refused
//!    before anything is fetched);
//! 2. the shared checks: key, signature, `aud` (the cluster's `audience`), time claims with
//!    the leeway, lifetime;
//! 3. `sub` is `system:serviceaccount:<ns>:<name>` for the `kubernetes.io.namespace` and
//!    `kubernetes.io.serviceaccount.name` of the token, and `<ns>:<name>` is on the cluster's
//!    `service_account_allow_list` ([`FailedCheck::ServiceAccount`]);
//! 4. the token names its pod and node (`kubernetes.io.pod.{name,uid}`,
//!    `kubernetes.io.node.{name,uid}`): a pod-bound token of Kubernetes 1.30 or later
//!    ([`FailedCheck::NodeClaims`]);
//! 5. the agent is `spiffe://<td>/tessera/agent/k8s_psat/<cluster>/<node uid>`, with the node
//!    selectors `k8s_psat:cluster:<name>`, `k8s_psat:agent_ns:<ns>`, `k8s_psat:agent_sa:<name>`,
//!    `k8s_psat:agent_sa_uid:<uid>`, `k8s_psat:agent_pod_name:<name>`,
//!    `k8s_psat:agent_pod_uid:<uid>`, `k8s_psat:agent_node_name:<name>`,
//!    `k8s_psat:agent_node_uid:<uid>` and `spiffe_id:<agent ID>`;
//! 6. with `single_use`, the `jti` is recorded and a second use refused.
//!
//! # `oidc` (`[[node_attestor.oidc.issuer]]`, `[[node_attestor.oidc.policy]]`)
//!
//! 1. and 2. as above, with the oidc issuers (a list of its own: a token meant for the token
//!    exchange carries another audience and is refused here, and the other way round);
//! 3. the first policy of that issuer whose condition holds ([`FailedCheck::Condition`]); its
//!    template gives the agent ID, which is always under `spiffe://<td>/tessera/agent/oidc/`
//!    ([`FailedCheck::Mapping`]);
//! 4. node selectors: `oidc:issuer:<iss>`, `oidc:policy:<name>`, `oidc:sub:<sub>`, one
//!    `oidc:claim:<path>:<value>` per `selector_claims` entry the token carries, and
//!    `spiffe_id:<agent ID>`;
//! 5. with the policy's `single_use` (the default), the `jti` is recorded and a second use
//!    refused.
//!
//! The `jti` is recorded last, once every other check passed, so a token refused for another
//! reason is not spent. A single-use attestor refuses a token without `jti`, whatever the
//! issuer's `require_jti` says. `jti`s are kept in the exchange's replay cache under their own
//! key ([`ReplayScope::NodeAttestation`]).
//!
//! # Hostile claims
//!
//! Every value that becomes a selector comes from the token: a string, number or boolean of at
//! most [`MAX_CLAIM_SELECTOR_LEN`] bytes without control characters. A value that cannot be a
//! selector refuses the attestation ([`FailedCheck::Selector`], the reason in the server's
//! log) rather than being dropped, so an agent never gets fewer selectors than its token says.
//!
//! The agent only learns "node token was not accepted"; the server's warning and the
//! `agent.attestation_refused` audit line name the check (`failed_check`).

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Map, Value};
use tessera_common::node_token::{K8S_PSAT, MAX_TOKEN_LEN, OIDC};
use tessera_spiffe::{Selector, SelectorSet, SpiffeId, TrustDomain};

use crate::config::{K8sPsatConfig, OidcNodeAttestorConfig, ServerConfig};
use crate::token_exchange::policy::{
    IssuerKeys, IssuerSettings, SpiffeIdTemplate, compile_condition, compile_issuers, condition_holds, lookup_claim,
};
use crate::token_exchange::validate::{self, FailedCheck, Unverified};
use crate::token_exchange::{Checked, IssuerSet, ReplayScope, TrustedIssuer};

/// Longest claim value put into a node selector, in bytes.
pub(crate) const MAX_CLAIM_SELECTOR_LEN: usize = 512;
/// Longest cluster name.
pub(crate) const MAX_CLUSTER_NAME_LEN: usize = 64;
/// Most `selector_claims` of one policy.
pub(crate) const MAX_SELECTOR_CLAIMS: usize = 32;
/// Longest `selector_claims` entry, in bytes.
const MAX_SELECTOR_CLAIM_PATH_LEN: usize = 256;
/// Longest node policy name.
const MAX_POLICY_NAME_LEN: usize = 128;
/// What the agent is told when its token is refused.
pub(crate) const NOT_ACCEPTED: &str = "node token was not accepted; the server's log and audit log name the check";

/// `[[node_attestor.k8s_psat.cluster]]`.
pub(crate) const K8S_PSAT_CLUSTER_KEYS: IssuerKeys = IssuerKeys {
    table: "[[node_attestor.k8s_psat.cluster]]",
    issuer: "node_attestor.k8s_psat.cluster.issuer",
    jwks_uri: "node_attestor.k8s_psat.cluster.jwks_uri",
    jwks: "node_attestor.k8s_psat.cluster.jwks",
    ca_bundle_path: "node_attestor.k8s_psat.cluster.ca_bundle_path",
    allowed_algorithms: "node_attestor.k8s_psat.cluster.allowed_algorithms",
    audience: "node_attestor.k8s_psat.cluster.audience",
    // Clusters have no conditions, hence no immutable claims to configure.
    immutable_claims: "node_attestor.k8s_psat.cluster.issuer",
};

/// `[[node_attestor.oidc.issuer]]`.
pub(crate) const OIDC_ISSUER_KEYS: IssuerKeys = IssuerKeys {
    table: "[[node_attestor.oidc.issuer]]",
    issuer: "node_attestor.oidc.issuer.issuer",
    jwks_uri: "node_attestor.oidc.issuer.jwks_uri",
    jwks: "node_attestor.oidc.issuer.jwks",
    ca_bundle_path: "node_attestor.oidc.issuer.ca_bundle_path",
    allowed_algorithms: "node_attestor.oidc.issuer.allowed_algorithms",
    audience: "node_attestor.oidc.issuer.audience",
    immutable_claims: "node_attestor.oidc.issuer.immutable_claims",
};

/// One cluster, compiled.
#[derive(Debug)]
struct Cluster {
    name: String,
    issuer: String,
    allow_list: BTreeSet<String>,
    single_use: bool,
}

/// One node policy, compiled.
#[derive(Debug)]
struct NodePolicy {
    name: String,
    issuer: String,
    condition: cel::Program,
    template: SpiffeIdTemplate,
    selector_claims: Vec<String>,
    single_use: bool,
}

/// A configuration error: the key to blame and the message.
type ConfigResult<T> = Result<T, (&'static str, String)>;

/// `[node_attestor.k8s_psat]`, checked: the clusters' issuers and the clusters.
type CompiledK8sPsat = (Vec<IssuerSettings>, Vec<Cluster>);

/// `[node_attestor.oidc]`, checked: the issuers and the policies.
type CompiledOidc = (Vec<IssuerSettings>, Vec<NodePolicy>);

/// `[node_attestor]`'s token attestors, checked (no I/O).
#[derive(Debug, Default)]
pub(crate) struct Compiled {
    k8s_psat: Option<CompiledK8sPsat>,
    oidc: Option<CompiledOidc>,
}

/// Checks `[node_attestor.k8s_psat]` and `[node_attestor.oidc]`; the error names the key.
pub(crate) fn compile(config: &ServerConfig) -> ConfigResult<Compiled> {
    let k8s_psat = config.node_attestor.k8s_psat.as_ref().map(compile_k8s_psat).transpose()?;
    let oidc = config.node_attestor.oidc.as_ref().map(|oidc| compile_oidc(oidc, &config.trust_domain)).transpose()?;
    Ok(Compiled { k8s_psat, oidc })
}

fn compile_k8s_psat(config: &K8sPsatConfig) -> ConfigResult<CompiledK8sPsat> {
    if config.cluster.is_empty() {
        return Err(("node_attestor.k8s_psat", "needs at least one [[node_attestor.k8s_psat.cluster]]".into()));
    }
    let issuer_configs: Vec<_> = config.cluster.iter().map(|cluster| cluster.issuer_config()).collect();
    let settings = compile_issuers(&issuer_configs, &K8S_PSAT_CLUSTER_KEYS)?;
    let mut clusters: Vec<Cluster> = Vec::new();
    for (index, cluster) in config.cluster.iter().enumerate() {
        let fail = |key: &'static str, message: String| {
            (key, format!("cluster {:?} ([[node_attestor.k8s_psat.cluster]] #{}): {message}", cluster.name, index + 1))
        };
        let name = &cluster.name;
        let name_ok = !name.is_empty()
            && name.len() <= MAX_CLUSTER_NAME_LEN
            && name != "."
            && name != ".."
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(fail(
                "node_attestor.k8s_psat.cluster.name",
                format!("must be 1 to {MAX_CLUSTER_NAME_LEN} of letters, digits, '.', '_' and '-' (not . or ..)"),
            ));
        }
        if clusters.iter().any(|known| &known.name == name) {
            return Err(fail("node_attestor.k8s_psat.cluster.name", "is used by another cluster".into()));
        }
        if cluster.service_account_allow_list.is_empty() {
            return Err(fail(
                "node_attestor.k8s_psat.cluster.service_account_allow_list",
                "must name at least one service account (\"namespace:name\") that agent pods run as".into(),
            ));
        }
        let mut allow_list = BTreeSet::new();
        for entry in &cluster.service_account_allow_list {
            check_service_account(entry)
                .map_err(|message| fail("node_attestor.k8s_psat.cluster.service_account_allow_list", message))?;
            allow_list.insert(entry.clone());
        }
        clusters.push(Cluster {
            name: name.clone(),
            issuer: cluster.issuer.clone(),
            allow_list,
            single_use: cluster.single_use,
        });
    }
    Ok((settings, clusters))
}

/// `namespace:name`, both Kubernetes object names (lowercase letters, digits, `-` and `.`).
fn check_service_account(entry: &str) -> Result<(), String> {
    let name_ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 253
            && part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    match entry.split_once(':') {
        Some((namespace, name)) if name_ok(namespace) && name_ok(name) => Ok(()),
        _ => Err(format!(
            "{entry:?} is not \"namespace:name\" of a service account (lowercase letters, digits, '-' and '.')"
        )),
    }
}

fn compile_oidc(config: &OidcNodeAttestorConfig, trust_domain: &TrustDomain) -> ConfigResult<CompiledOidc> {
    if config.issuer.is_empty() {
        return Err(("node_attestor.oidc", "needs at least one [[node_attestor.oidc.issuer]]".into()));
    }
    if config.policy.is_empty() {
        return Err(("node_attestor.oidc", "needs at least one [[node_attestor.oidc.policy]]".into()));
    }
    let issuers = compile_issuers(&config.issuer, &OIDC_ISSUER_KEYS)?;
    let prefix = format!("spiffe://{}/tessera/agent/{OIDC}/", trust_domain.name());
    let mut policies: Vec<NodePolicy> = Vec::new();
    for (index, policy) in config.policy.iter().enumerate() {
        let fail = |key: &'static str, message: String| {
            (key, format!("policy {:?} ([[node_attestor.oidc.policy]] #{}): {message}", policy.name, index + 1))
        };
        let name = &policy.name;
        if name.is_empty()
            || name.len() > MAX_POLICY_NAME_LEN
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(fail(
                "node_attestor.oidc.policy.name",
                format!("must be 1 to {MAX_POLICY_NAME_LEN} of letters, digits, '.', '_' and '-'"),
            ));
        }
        if policies.iter().any(|known| &known.name == name) {
            return Err(fail("node_attestor.oidc.policy.name", "is used by another policy".into()));
        }
        let Some(issuer) = issuers.iter().find(|issuer| issuer.issuer == policy.issuer) else {
            return Err(fail(
                "node_attestor.oidc.policy.issuer",
                format!("{:?} is not the issuer of any [[node_attestor.oidc.issuer]]", policy.issuer),
            ));
        };
        let condition = compile_condition(&policy.condition, &issuer.immutable_claims)
            .map_err(|message| fail("node_attestor.oidc.policy.condition", message))?;
        let template = SpiffeIdTemplate::parse(&policy.spiffe_id, trust_domain)
            .map_err(|message| fail("node_attestor.oidc.policy.spiffe_id", message))?;
        if !template.literal_prefix().starts_with(&prefix) {
            return Err(fail(
                "node_attestor.oidc.policy.spiffe_id",
                format!("{:?} must start with {prefix:?}: oidc agents have IDs of their own", policy.spiffe_id),
            ));
        }
        if policy.selector_claims.len() > MAX_SELECTOR_CLAIMS {
            return Err(fail(
                "node_attestor.oidc.policy.selector_claims",
                format!("lists {} claims; the limit is {MAX_SELECTOR_CLAIMS}", policy.selector_claims.len()),
            ));
        }
        let mut selector_claims: Vec<String> = Vec::new();
        for claim in &policy.selector_claims {
            if claim.is_empty() || claim.len() > MAX_SELECTOR_CLAIM_PATH_LEN || claim.chars().any(char::is_control) {
                return Err(fail(
                    "node_attestor.oidc.policy.selector_claims",
                    format!(
                        "{claim:?} is not a claim path (1 to {MAX_SELECTOR_CLAIM_PATH_LEN} bytes, no control characters)"
                    ),
                ));
            }
            if selector_claims.contains(claim) {
                return Err(fail("node_attestor.oidc.policy.selector_claims", format!("{claim:?} is listed twice")));
            }
            selector_claims.push(claim.clone());
        }
        policies.push(NodePolicy {
            name: name.clone(),
            issuer: policy.issuer.clone(),
            condition,
            template,
            selector_claims,
            single_use: policy.single_use,
        });
    }
    Ok((issuers, policies))
}

/// The configured token attestors, with their issuers' keys cached.
#[derive(Debug, Default)]
pub(crate) struct NodeTokenAttestors {
    k8s_psat: Option<(IssuerSet, Vec<Cluster>)>,
    oidc: Option<(IssuerSet, Vec<NodePolicy>)>,
}

/// What a token established about a node.
#[derive(Debug)]
pub(crate) struct TokenNode {
    /// The agent ID.
    pub(crate) agent_id: SpiffeId,
    /// Its node selectors.
    pub(crate) selectors: SelectorSet,
    /// The `jti` to record before issuing, for a single-use attestor.
    pub(crate) single_use: Option<SingleUse>,
}

/// A `jti` to record.
#[derive(Debug)]
pub(crate) struct SingleUse {
    /// The issuer (its `iss` and leeway).
    pub(crate) issuer: Arc<TrustedIssuer>,
    /// The token's `jti`.
    pub(crate) jti: String,
    /// The token's `exp`.
    pub(crate) expires_at: u64,
}

impl SingleUse {
    /// Records the `jti`: [`FailedCheck::Replay`] when it was used before.
    pub(crate) async fn consume(&self, state: &crate::server::ServerState) -> Result<(), FailedCheck> {
        crate::token_exchange::consume_jti(
            state,
            ReplayScope::NodeAttestation,
            &self.issuer.settings,
            &self.jti,
            self.expires_at,
        )
        .await
    }
}

/// Why a token was refused: the check (audit log) and the details (server log only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenRefused {
    /// The check that failed.
    pub(crate) check: FailedCheck,
    /// What exactly, for the server's log.
    pub(crate) reason: String,
}

impl TokenRefused {
    fn new(check: FailedCheck, reason: impl Into<String>) -> Self {
        Self { check, reason: reason.into() }
    }
}

impl From<FailedCheck> for TokenRefused {
    fn from(check: FailedCheck) -> Self {
        Self { check, reason: check.as_str().replace('_', " ") }
    }
}

impl NodeTokenAttestors {
    /// Compiles the configuration and loads each issuer's CA file (blocking). Errors name the
    /// key and the file.
    pub(crate) fn load(config: &ServerConfig) -> ConfigResult<Self> {
        let Compiled { k8s_psat, oidc } = compile(config)?;
        let k8s_psat = match (k8s_psat, &config.node_attestor.k8s_psat) {
            (Some((settings, clusters)), Some(table)) => {
                let paths = table.cluster.iter().map(|cluster| cluster.ca_bundle_path.as_deref());
                Some((IssuerSet::load(settings, paths, &K8S_PSAT_CLUSTER_KEYS)?, clusters))
            }
            _ => None,
        };
        let oidc = match (oidc, &config.node_attestor.oidc) {
            (Some((settings, policies)), Some(table)) => {
                let paths = table.issuer.iter().map(|issuer| issuer.ca_bundle_path.as_deref());
                Some((IssuerSet::load(settings, paths, &OIDC_ISSUER_KEYS)?, policies))
            }
            _ => None,
        };
        Ok(Self { k8s_psat, oidc })
    }

    /// Whether `attestor` (`k8s_psat` or `oidc`) is configured.
    pub(crate) fn enabled(&self, attestor: &str) -> bool {
        match attestor {
            K8S_PSAT => self.k8s_psat.is_some(),
            OIDC => self.oidc.is_some(),
            _ => false,
        }
    }

    /// Whether any token attestor is configured (their `jti`s then need pruning).
    pub(crate) fn any(&self) -> bool {
        self.k8s_psat.is_some() || self.oidc.is_some()
    }

    /// Verifies a token for `attestor` and derives the node; everything but the `jti` record.
    pub(crate) async fn check(
        &self,
        attestor: &str,
        trust_domain: &TrustDomain,
        token: &Unverified,
    ) -> Result<TokenNode, TokenRefused> {
        match attestor {
            K8S_PSAT => {
                let (issuers, clusters) =
                    self.k8s_psat.as_ref().ok_or_else(|| TokenRefused::new(FailedCheck::Internal, "not configured"))?;
                // The cluster by exact `iss`: an unknown issuer is refused before any fetch.
                let cluster = clusters
                    .iter()
                    .find(|cluster| cluster.issuer == token.issuer)
                    .ok_or(TokenRefused::from(FailedCheck::UnknownIssuer))?;
                let Checked { issuer, token, .. } = issuers.verify(token).await?;
                let (agent_id, selectors) = k8s_node(cluster, trust_domain, &token.claims)?;
                let single_use = single_use(cluster.single_use, issuer, &token)?;
                Ok(TokenNode { agent_id, selectors, single_use })
            }
            OIDC => {
                let (issuers, policies) =
                    self.oidc.as_ref().ok_or_else(|| TokenRefused::new(FailedCheck::Internal, "not configured"))?;
                let Checked { issuer, token, .. } = issuers.verify(token).await?;
                let policy = policies
                    .iter()
                    .filter(|policy| policy.issuer == issuer.settings.issuer)
                    .find(|policy| condition_holds(&policy.condition, &token.claims))
                    .ok_or(TokenRefused::from(FailedCheck::Condition))?;
                let (agent_id, selectors) = oidc_node(policy, &issuer.settings.issuer, &token.claims)?;
                let single_use = single_use(policy.single_use, issuer, &token)?;
                Ok(TokenNode { agent_id, selectors, single_use })
            }
            other => Err(TokenRefused::new(FailedCheck::Internal, format!("{other:?} is not a token attestor"))),
        }
    }
}

fn single_use(
    on: bool,
    issuer: Arc<TrustedIssuer>,
    token: &validate::Verified,
) -> Result<Option<SingleUse>, TokenRefused> {
    if !on {
        return Ok(None);
    }
    let jti = token
        .jti
        .clone()
        .ok_or_else(|| TokenRefused::new(FailedCheck::Jti, "single_use is on and the token has no jti"))?;
    Ok(Some(SingleUse { issuer, jti, expires_at: token.expires_at }))
}

/// Decodes the attestation payload: at most [`MAX_TOKEN_LEN`] bytes of UTF-8 holding a compact
/// JWS with an asymmetric `alg`, an `iss` and a `kid`. The error is for the agent.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<Unverified, String> {
    if payload.len() > MAX_TOKEN_LEN {
        return Err(format!("params.data.payload: the token is larger than {MAX_TOKEN_LEN} bytes"));
    }
    let text = std::str::from_utf8(payload).map_err(|_| "params.data.payload: the token is not UTF-8".to_owned())?;
    validate::decode(text.trim())
        .map_err(|_| "params.data.payload: not a compact JWS with an asymmetric alg, an iss and a kid".to_owned())
}

/// A string claim (dotted path) of at most [`MAX_CLAIM_SELECTOR_LEN`] bytes without control
/// characters; `None` when absent.
fn claim_text<'a>(claims: &'a Map<String, Value>, path: &str) -> Result<Option<&'a str>, String> {
    match lookup_claim(claims, path) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) if text.is_empty() => Err(format!("claim {path} is empty")),
        Some(Value::String(text)) if text.len() > MAX_CLAIM_SELECTOR_LEN => {
            Err(format!("claim {path} is longer than {MAX_CLAIM_SELECTOR_LEN} bytes"))
        }
        Some(Value::String(text)) if text.chars().any(char::is_control) => {
            Err(format!("claim {path} contains control characters"))
        }
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("claim {path} is not a string")),
    }
}

fn selector(kind: &str, value: String) -> Result<Selector, TokenRefused> {
    Selector::new(kind, &value)
        .map_err(|err| TokenRefused::new(FailedCheck::Selector, format!("node selector {kind}:{value:?}: {err}")))
}

/// Steps 3 to 5 of `k8s_psat`: the service account, the pod and node, the agent ID and selectors.
fn k8s_node(
    cluster: &Cluster,
    trust_domain: &TrustDomain,
    claims: &Map<String, Value>,
) -> Result<(SpiffeId, SelectorSet), TokenRefused> {
    let account = |reason: String| TokenRefused::new(FailedCheck::ServiceAccount, reason);
    let node_claim = |reason: String| TokenRefused::new(FailedCheck::NodeClaims, reason);
    let required = |path: &str, refuse: &dyn Fn(String) -> TokenRefused| -> Result<String, TokenRefused> {
        claim_text(claims, path)
            .map_err(|reason| TokenRefused::new(FailedCheck::Selector, reason))?
            .map(str::to_owned)
            .ok_or_else(|| refuse(format!("the token has no {path} claim")))
    };
    let namespace = required("kubernetes.io.namespace", &account)?;
    let account_name = required("kubernetes.io.serviceaccount.name", &account)?;
    let account_uid = required("kubernetes.io.serviceaccount.uid", &account)?;
    let expected_sub = format!("system:serviceaccount:{namespace}:{account_name}");
    match claims.get("sub") {
        Some(Value::String(sub)) if *sub == expected_sub => {}
        Some(Value::String(sub)) => {
            return Err(account(format!(
                "sub {:?} is not {expected_sub:?}, the service account the kubernetes.io claims name",
                sub.chars().take(MAX_CLAIM_SELECTOR_LEN).collect::<String>()
            )));
        }
        _ => return Err(account("the token has no string sub".into())),
    }
    let service_account = format!("{namespace}:{account_name}");
    if !cluster.allow_list.contains(&service_account) {
        return Err(account(format!(
            "service account {service_account} is not on the service_account_allow_list of cluster {:?}",
            cluster.name
        )));
    }
    let why_bound = "(a pod-bound projected token of Kubernetes 1.30 or later names its pod and node)";
    let not_bound = |reason: String| node_claim(format!("{reason} {why_bound}"));
    let pod_name = required("kubernetes.io.pod.name", &not_bound)?;
    let pod_uid = required("kubernetes.io.pod.uid", &not_bound)?;
    let node_name = required("kubernetes.io.node.name", &not_bound)?;
    let node_uid = required("kubernetes.io.node.uid", &not_bound)?;

    let agent_id = trust_domain
        .id_from_segments(&["tessera", "agent", K8S_PSAT, &cluster.name, &node_uid])
        .map_err(|err| TokenRefused::new(FailedCheck::Mapping, format!("node uid {node_uid:?}: {err}")))?;
    let selectors = [
        selector(K8S_PSAT, format!("cluster:{}", cluster.name))?,
        selector(K8S_PSAT, format!("agent_ns:{namespace}"))?,
        selector(K8S_PSAT, format!("agent_sa:{account_name}"))?,
        selector(K8S_PSAT, format!("agent_sa_uid:{account_uid}"))?,
        selector(K8S_PSAT, format!("agent_pod_name:{pod_name}"))?,
        selector(K8S_PSAT, format!("agent_pod_uid:{pod_uid}"))?,
        selector(K8S_PSAT, format!("agent_node_name:{node_name}"))?,
        selector(K8S_PSAT, format!("agent_node_uid:{node_uid}"))?,
        selector("spiffe_id", agent_id.to_string())?,
    ];
    Ok((agent_id, selectors.into_iter().collect()))
}

/// A claim value as a selector value: a string, number or boolean, bounded and without
/// control characters; `None` when absent.
fn claim_selector_value(claims: &Map<String, Value>, path: &str) -> Result<Option<String>, String> {
    let text = match lookup_claim(claims, path) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(_)) => return claim_text(claims, path).map(|text| text.map(str::to_owned)),
        Some(Value::Number(number)) => number.to_string(),
        Some(Value::Bool(value)) => value.to_string(),
        Some(_) => return Err(format!("claim {path} is an array or an object, which cannot be a selector")),
    };
    Ok(Some(text))
}

/// Steps 3 and 4 of `oidc`: the agent ID from the policy's template, and the selectors.
fn oidc_node(
    policy: &NodePolicy,
    issuer: &str,
    claims: &Map<String, Value>,
) -> Result<(SpiffeId, SelectorSet), TokenRefused> {
    let agent_id = policy.template.render(claims).map_err(|reason| {
        TokenRefused::new(FailedCheck::Mapping, format!("policy {:?}: no agent ID: {reason}", policy.name))
    })?;
    let refuse = |reason: String| TokenRefused::new(FailedCheck::Selector, reason);
    let mut selectors = vec![
        selector(OIDC, format!("issuer:{issuer}"))?,
        selector(OIDC, format!("policy:{}", policy.name))?,
        selector("spiffe_id", agent_id.to_string())?,
    ];
    match claims.get("sub") {
        None | Some(Value::Null) => {}
        Some(Value::String(_)) => {
            if let Some(sub) = claim_text(claims, "sub").map_err(refuse)? {
                selectors.push(selector(OIDC, format!("sub:{sub}"))?);
            }
        }
        Some(_) => return Err(refuse("claim sub is not a string".into())),
    }
    for path in &policy.selector_claims {
        if let Some(value) = claim_selector_value(claims, path).map_err(refuse)? {
            selectors.push(selector(OIDC, format!("claim:{path}:{value}"))?);
        }
    }
    Ok((agent_id, selectors.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::rand::SystemRandom;
    use serde_json::json;
    use tessera_spiffe::jwt::JwsAlgorithm;
    use tessera_spiffe::keys::{KeyType, SigningKey};

    use super::*;

    const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
    const CLOUD_ISSUER: &str = "https://cloud.example/oidc";

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("not an object"),
        }
    }

    fn k8s_claims() -> Value {
        json!({
            "iss": K8S_ISSUER,
            "sub": "system:serviceaccount:tessera:tessera-agent",
            "aud": ["tessera-server"],
            "kubernetes.io": {
                "namespace": "tessera",
                "serviceaccount": {"name": "tessera-agent", "uid": "sa-uid-1"},
                "pod": {"name": "tessera-agent-x7k2p", "uid": "pod-uid-1"},
                "node": {"name": "worker-3", "uid": "node-uid-3"},
            },
        })
    }

    fn cluster() -> Cluster {
        Cluster {
            name: "prod".into(),
            issuer: K8S_ISSUER.into(),
            allow_list: BTreeSet::from(["tessera:tessera-agent".to_owned()]),
            single_use: false,
        }
    }

    fn patched(patch: impl FnOnce(&mut Value)) -> Map<String, Value> {
        let mut claims = k8s_claims();
        patch(&mut claims);
        object(claims)
    }

    fn strings(selectors: &SelectorSet) -> Vec<String> {
        selectors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn k8s_agent_id_and_selectors_come_from_the_token() {
        let (agent_id, selectors) = k8s_node(&cluster(), &td(), &object(k8s_claims())).unwrap();
        assert_eq!(agent_id.as_str(), "spiffe://example.org/tessera/agent/k8s_psat/prod/node-uid-3");
        assert_eq!(
            strings(&selectors),
            [
                "k8s_psat:agent_node_name:worker-3",
                "k8s_psat:agent_node_uid:node-uid-3",
                "k8s_psat:agent_ns:tessera",
                "k8s_psat:agent_pod_name:tessera-agent-x7k2p",
                "k8s_psat:agent_pod_uid:pod-uid-1",
                "k8s_psat:agent_sa:tessera-agent",
                "k8s_psat:agent_sa_uid:sa-uid-1",
                "k8s_psat:cluster:prod",
                "spiffe_id:spiffe://example.org/tessera/agent/k8s_psat/prod/node-uid-3",
            ]
        );
    }

    #[test]
    fn k8s_service_account_checks() {
        let check = |claims: Map<String, Value>| k8s_node(&cluster(), &td(), &claims).unwrap_err();
        let other_account = patched(|c| {
            c["sub"] = json!("system:serviceaccount:default:builder");
            c["kubernetes.io"]["namespace"] = json!("default");
            c["kubernetes.io"]["serviceaccount"]["name"] = json!("builder");
        });
        let refused = check(other_account);
        assert_eq!(refused.check, FailedCheck::ServiceAccount);
        assert!(refused.reason.contains("default:builder is not on the service_account_allow_list"), "{refused:?}");
        // sub must name the same service account as the kubernetes.io claims.
        let mismatch = check(patched(|c| c["sub"] = json!("system:serviceaccount:tessera:other")));
        assert_eq!(mismatch.check, FailedCheck::ServiceAccount, "{mismatch:?}");
        assert_eq!(check(patched(|c| c["sub"] = json!(5))).check, FailedCheck::ServiceAccount);
        assert_eq!(
            check(patched(|c| {
                c.as_object_mut().unwrap().remove("sub");
            }))
            .check,
            FailedCheck::ServiceAccount
        );
        let no_uid = patched(|c| {
            c["kubernetes.io"]["serviceaccount"].as_object_mut().unwrap().remove("uid");
        });
        assert_eq!(check(no_uid).check, FailedCheck::ServiceAccount);
        let no_kubernetes = patched(|c| {
            c.as_object_mut().unwrap().remove("kubernetes.io");
        });
        assert_eq!(check(no_kubernetes).check, FailedCheck::ServiceAccount);
    }

    #[test]
    fn k8s_tokens_must_name_their_pod_and_node() {
        for (object_name, claim) in [("pod", "name"), ("pod", "uid"), ("node", "name"), ("node", "uid")] {
            let claims = patched(|c| {
                c["kubernetes.io"][object_name].as_object_mut().unwrap().remove(claim);
            });
            let refused = k8s_node(&cluster(), &td(), &claims).unwrap_err();
            assert_eq!(refused.check, FailedCheck::NodeClaims, "{object_name}.{claim}");
            assert!(refused.reason.contains("Kubernetes 1.30"), "{refused:?}");
        }
        // A token of an older release: no node at all.
        let old = patched(|c| {
            c["kubernetes.io"].as_object_mut().unwrap().remove("node");
        });
        assert_eq!(k8s_node(&cluster(), &td(), &old).unwrap_err().check, FailedCheck::NodeClaims);
    }

    #[test]
    fn hostile_k8s_claim_values_refuse_the_attestation() {
        let check = |patch: Value| {
            let claims = patched(|c| c["kubernetes.io"]["pod"]["name"] = patch);
            k8s_node(&cluster(), &td(), &claims).unwrap_err()
        };
        for bad in [json!("a\nb"), json!("x".repeat(MAX_CLAIM_SELECTOR_LEN + 1)), json!(""), json!(7), json!(["a"])] {
            assert_eq!(check(bad.clone()).check, FailedCheck::Selector, "{bad}");
        }
        // A node uid that cannot be a path segment cannot name an agent.
        let claims = patched(|c| c["kubernetes.io"]["node"]["uid"] = json!("../../server"));
        assert_eq!(k8s_node(&cluster(), &td(), &claims).unwrap_err().check, FailedCheck::Mapping);
    }

    fn server_config(text: &str) -> Result<ServerConfig, crate::config::ConfigError> {
        crate::config::parse(text, Path::new("/etc/tessera/server.toml"))
    }

    const CLUSTER: &str = r#"
[[node_attestor.k8s_psat.cluster]]
name = "prod"
issuer = "https://kubernetes.default.svc.cluster.local"
jwks_uri = "https://10.0.0.1:6443/openid/v1/jwks"
audience = "tessera-server"
service_account_allow_list = ["tessera:tessera-agent"]
"#;

    const OIDC_TABLES: &str = r#"
[[node_attestor.oidc.issuer]]
issuer = "https://accounts.google.com"
audience = "tessera-nodes"
immutable_claims = ["google.compute_engine.project_id", "google.compute_engine.instance_id"]

[[node_attestor.oidc.policy]]
name = "gce-nodes"
issuer = "https://accounts.google.com"
condition = 'claims.google.compute_engine.project_id == "p-1"'
spiffe_id = "spiffe://example.org/tessera/agent/oidc/gce/{google.compute_engine.instance_id}"
selector_claims = ["google.compute_engine.zone"]
"#;

    fn refused(text: &str) -> (String, String) {
        let err = server_config(text).unwrap_err();
        (err.key().unwrap_or_default().to_owned(), err.to_string())
    }

    #[test]
    fn good_tables_compile() {
        let config = server_config(&format!("{CLUSTER}{OIDC_TABLES}")).unwrap();
        let k8s = config.node_attestor.k8s_psat.as_ref().unwrap();
        assert!(!k8s.cluster[0].single_use, "k8s_psat tokens are reused by default");
        assert!(config.node_attestor.oidc.as_ref().unwrap().policy[0].single_use, "oidc tokens are single use");
        let compiled = compile(&config).unwrap();
        assert_eq!(compiled.k8s_psat.unwrap().1[0].name, "prod");
        assert_eq!(compiled.oidc.unwrap().1[0].selector_claims, ["google.compute_engine.zone"]);
    }

    #[test]
    fn cluster_checks_name_the_key() {
        for (from, to, key, expected) in [
            ("name = \"prod\"", "name = \"pr/od\"", "node_attestor.k8s_psat.cluster.name", "letters, digits"),
            ("name = \"prod\"", "name = \"\"", "node_attestor.k8s_psat.cluster.name", "must be 1 to 64"),
            ("name = \"prod\"", "name = \"..\"", "node_attestor.k8s_psat.cluster.name", "not . or .."),
            (
                "[\"tessera:tessera-agent\"]",
                "[]",
                "node_attestor.k8s_psat.cluster.service_account_allow_list",
                "at least one service account",
            ),
            (
                "[\"tessera:tessera-agent\"]",
                "[\"tessera-agent\"]",
                "node_attestor.k8s_psat.cluster.service_account_allow_list",
                "is not \"namespace:name\"",
            ),
            (
                "audience = \"tessera-server\"",
                "audience = \"\"",
                "node_attestor.k8s_psat.cluster.audience",
                "must not be empty",
            ),
            (
                "audience = \"tessera-server\"",
                "audience = \"a\"\nallowed_algorithms = [\"HS256\"]",
                "node_attestor.k8s_psat.cluster.allowed_algorithms",
                "never accepted",
            ),
            (
                "jwks_uri = \"https://10.0.0.1:6443/openid/v1/jwks\"",
                "jwks_uri = \"http://10.0.0.1/jwks\"",
                "node_attestor.k8s_psat.cluster.jwks_uri",
                "https",
            ),
            (
                "audience = \"tessera-server\"",
                "audience = \"a\"\npreset = \"kubernetes\"",
                "node_attestor.k8s_psat.cluster[0].preset",
                "unknown key",
            ),
        ] {
            let (got_key, message) = refused(&CLUSTER.replace(from, to));
            assert_eq!(got_key, key, "{to}: {message}");
            assert!(message.contains(expected), "{to}: {message}");
            assert!(message.starts_with("config file /etc/tessera/server.toml: "), "{message}");
            assert!(message.contains(key), "{message}");
        }
        let (key, message) = refused(&format!("{CLUSTER}{}", CLUSTER.replace("prod", "staging")));
        assert_eq!(key, "node_attestor.k8s_psat.cluster.issuer", "{message}");
        assert!(message.contains("listed twice"), "{message}");
        let (key, message) = refused("[node_attestor.k8s_psat]\n");
        assert_eq!(key, "node_attestor.k8s_psat", "{message}");
        let (key, message) =
            refused(&format!("{CLUSTER}{}", CLUSTER.replace("kubernetes.default.svc.cluster.local", "k8s.example")));
        assert_eq!(key, "node_attestor.k8s_psat.cluster.name", "{message}");
        assert!(message.contains("used by another cluster"), "{message}");
    }

    #[test]
    fn oidc_policy_rules() {
        let td_prefix = "spiffe://example.org/tessera/agent/oidc/gce/";
        for (from, to, key, expected) in [
            (
                td_prefix,
                "spiffe://example.org/nodes/gce/",
                "node_attestor.oidc.policy.spiffe_id",
                "must start with \"spiffe://example.org/tessera/agent/oidc/\"",
            ),
            (
                td_prefix,
                "spiffe://example.org/tessera/agent/x509pop/",
                "node_attestor.oidc.policy.spiffe_id",
                "must start with",
            ),
            (
                "spiffe://example.org/tessera/agent/oidc/gce/{google.compute_engine.instance_id}",
                "spiffe://example.org/tessera/agent/oidc{google.compute_engine.instance_id}",
                "node_attestor.oidc.policy.spiffe_id",
                "must start with",
            ),
            (
                td_prefix,
                "spiffe://other.org/tessera/agent/oidc/",
                "node_attestor.oidc.policy.spiffe_id",
                "must start with",
            ),
            (
                r#"claims.google.compute_engine.project_id == "p-1""#,
                r#"claims.google.compute_engine.zone == "us-east1-b""#,
                "node_attestor.oidc.policy.condition",
                "pins no immutable claim",
            ),
            (
                r#"claims.google.compute_engine.project_id == "p-1""#,
                r#"claims.aud == "tessera-nodes""#,
                "node_attestor.oidc.policy.condition",
                "pins no immutable claim",
            ),
            (
                "issuer = \"https://accounts.google.com\"\ncondition",
                "issuer = \"https://elsewhere.example\"\ncondition",
                "node_attestor.oidc.policy.issuer",
                "is not the issuer of any [[node_attestor.oidc.issuer]]",
            ),
            ("name = \"gce-nodes\"", "name = \"gce nodes\"", "node_attestor.oidc.policy.name", "letters, digits"),
            (
                "selector_claims = [\"google.compute_engine.zone\"]",
                "selector_claims = [\"zone\", \"zone\"]",
                "node_attestor.oidc.policy.selector_claims",
                "listed twice",
            ),
            (
                "selector_claims = [\"google.compute_engine.zone\"]",
                "selector_claims = [\"\"]",
                "node_attestor.oidc.policy.selector_claims",
                "not a claim path",
            ),
            (
                "audience = \"tessera-nodes\"",
                "audience = \"tessera-nodes\"\nallowed_algorithms = [\"none\"]",
                "node_attestor.oidc.issuer.allowed_algorithms",
                "never accepted",
            ),
        ] {
            let text = OIDC_TABLES.replacen(from, to, 1);
            assert_ne!(text, OIDC_TABLES, "{from} not found");
            let (got_key, message) = refused(&text);
            assert_eq!(got_key, key, "{to}: {message}");
            assert!(message.contains(expected), "{to}: {message}");
        }
        let (key, message) = refused(&OIDC_TABLES[..OIDC_TABLES.find("[[node_attestor.oidc.policy]]").unwrap()]);
        assert_eq!(key, "node_attestor.oidc", "{message}");
        assert!(message.contains("at least one [[node_attestor.oidc.policy]]"), "{message}");
        // Node attestation issuers are not the exchange's: a policy cannot name an exchange issuer.
        let exchange_only = format!(
            "[[token_exchange.issuer]]\nissuer = \"https://token.example\"\naudience = \"x\"\n{}",
            OIDC_TABLES.replacen(
                "issuer = \"https://accounts.google.com\"\ncondition",
                "issuer = \"https://token.example\"\ncondition",
                1
            )
        );
        let (key, _) = refused(&exchange_only);
        assert_eq!(key, "node_attestor.oidc.policy.issuer");
    }

    fn oidc_policy(selector_claims: &[&str]) -> NodePolicy {
        NodePolicy {
            name: "vms".into(),
            issuer: CLOUD_ISSUER.into(),
            condition: compile_condition(r#"claims.project_id == "p-1""#, &BTreeSet::from(["project_id".to_owned()]))
                .unwrap(),
            template: SpiffeIdTemplate::parse("spiffe://example.org/tessera/agent/oidc/vm/{instance_id}", &td())
                .unwrap(),
            selector_claims: selector_claims.iter().map(|c| (*c).to_owned()).collect(),
            single_use: true,
        }
    }

    #[test]
    fn oidc_selectors_from_claims() {
        let policy = oidc_policy(&["zone", "meta.preemptible", "meta.cores", "absent"]);
        let claims = object(json!({
            "sub": "vm-17", "project_id": "p-1", "instance_id": "i-0abc", "zone": "eu-west-3:b",
            "meta": {"preemptible": false, "cores": 8},
        }));
        let (agent_id, selectors) = oidc_node(&policy, CLOUD_ISSUER, &claims).unwrap();
        assert_eq!(agent_id.as_str(), "spiffe://example.org/tessera/agent/oidc/vm/i-0abc");
        assert_eq!(
            strings(&selectors),
            [
                "oidc:claim:meta.cores:8",
                "oidc:claim:meta.preemptible:false",
                "oidc:claim:zone:eu-west-3:b",
                "oidc:issuer:https://cloud.example/oidc",
                "oidc:policy:vms",
                "oidc:sub:vm-17",
                "spiffe_id:spiffe://example.org/tessera/agent/oidc/vm/i-0abc",
            ]
        );
        for (claim, value) in [
            ("zone", json!({"a": 1})),
            ("zone", json!(["a"])),
            ("zone", json!("tab\there")),
            ("zone", json!("z".repeat(MAX_CLAIM_SELECTOR_LEN + 1))),
            ("zone", json!("")),
            ("sub", json!(17)),
        ] {
            let mut bad = claims.clone();
            bad.insert(claim.to_owned(), value.clone());
            let refused = oidc_node(&policy, CLOUD_ISSUER, &bad).unwrap_err();
            assert_eq!(refused.check, FailedCheck::Selector, "{claim}: {value}");
        }
        let mut unmappable = claims.clone();
        unmappable.insert("instance_id".into(), json!("a/b"));
        assert_eq!(oidc_node(&policy, CLOUD_ISSUER, &unmappable).unwrap_err().check, FailedCheck::Mapping);
    }

    fn mint(key: &SigningKey, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "kid": "k1"});
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature = key.sign(JwsAlgorithm::Es256, input.as_bytes(), &SystemRandom::new()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn inline_jwks(key: &SigningKey) -> String {
        let mut jwk = serde_json::to_value(key.public_key().to_jwk()).unwrap();
        jwk["kid"] = json!("k1");
        json!({"keys": [jwk]}).to_string()
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    #[tokio::test]
    async fn tokens_are_verified_before_any_attestor_check() {
        let key = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        let text = format!(
            "{}\n[[node_attestor.oidc.issuer]]\nissuer = \"{CLOUD_ISSUER}\"\naudience = \"tessera-nodes\"\njwks = '{}'\n\
             immutable_claims = [\"project_id\"]\n\n[[node_attestor.oidc.policy]]\nname = \"vms\"\nissuer = \"{CLOUD_ISSUER}\"\n\
             condition = 'claims.project_id == \"p-1\"'\nspiffe_id = \"spiffe://example.org/tessera/agent/oidc/vm/{{instance_id}}\"\n",
            CLUSTER.replace(
                "jwks_uri = \"https://10.0.0.1:6443/openid/v1/jwks\"",
                &format!("jwks = '{}'", inline_jwks(&key))
            ),
            inline_jwks(&key),
        );
        let config = server_config(&text).unwrap();
        let attestors = NodeTokenAttestors::load(&config).unwrap();
        assert!(attestors.enabled(K8S_PSAT) && attestors.enabled(OIDC) && !attestors.enabled("x509pop"));
        let t = now();
        let mut k8s = k8s_claims();
        for (claim, value) in [("iat", json!(t)), ("exp", json!(t + 600)), ("jti", json!("j-1"))] {
            k8s[claim] = value;
        }
        let check = |attestor: &'static str, claims: Value| {
            let token = decode_payload(mint(&key, &claims).as_bytes()).unwrap();
            let attestors = &attestors;
            async move { attestors.check(attestor, &td(), &token).await }
        };
        let node = check(K8S_PSAT, k8s.clone()).await.unwrap();
        assert_eq!(node.agent_id.as_str(), "spiffe://example.org/tessera/agent/k8s_psat/prod/node-uid-3");
        assert!(node.single_use.is_none(), "single_use is off for the cluster");

        let mut wrong_audience = k8s.clone();
        wrong_audience["aud"] = json!("tessera-nodes");
        assert_eq!(check(K8S_PSAT, wrong_audience).await.unwrap_err().check, FailedCheck::Audience);
        let mut expired = k8s.clone();
        expired["iat"] = json!(t - 4000);
        expired["exp"] = json!(t - 3000);
        assert_eq!(check(K8S_PSAT, expired).await.unwrap_err().check, FailedCheck::Expired);
        // The signature is checked before the claims: a forged allow-listed token is refused
        // as forged.
        let other = SigningKey::generate(KeyType::EcP256, &SystemRandom::new()).unwrap();
        let forged = decode_payload(mint(&other, &k8s).as_bytes()).unwrap();
        assert_eq!(attestors.check(K8S_PSAT, &td(), &forged).await.unwrap_err().check, FailedCheck::Signature);
        // A token of the oidc issuer is not a cluster's, and the other way round.
        let vm = json!({"iss": CLOUD_ISSUER, "aud": "tessera-nodes", "sub": "vm", "project_id": "p-1",
                        "instance_id": "i-1", "iat": t, "exp": t + 600, "jti": "vm-1"});
        assert_eq!(check(K8S_PSAT, vm.clone()).await.unwrap_err().check, FailedCheck::UnknownIssuer);
        assert_eq!(check(OIDC, k8s.clone()).await.unwrap_err().check, FailedCheck::UnknownIssuer);
        let node = check(OIDC, vm.clone()).await.unwrap();
        assert_eq!(node.agent_id.as_str(), "spiffe://example.org/tessera/agent/oidc/vm/i-1");
        assert_eq!(node.single_use.as_ref().map(|s| s.jti.as_str()), Some("vm-1"));
        let mut other_project = vm.clone();
        other_project["project_id"] = json!("p-2");
        assert_eq!(check(OIDC, other_project).await.unwrap_err().check, FailedCheck::Condition);
    }

    #[test]
    fn payloads_are_bounded_utf8_jws() {
        assert!(decode_payload(&vec![b'a'; MAX_TOKEN_LEN + 1]).unwrap_err().contains("larger than"));
        assert!(decode_payload(&[0xff, 0xfe]).unwrap_err().contains("not UTF-8"));
        assert!(decode_payload(b"not.a.jwt").unwrap_err().contains("not a compact JWS"));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k"}"#),
            URL_SAFE_NO_PAD.encode(k8s_claims().to_string())
        );
        assert!(decode_payload(none.as_bytes()).is_err());
    }
}
