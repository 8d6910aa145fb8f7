//! Workload identity federation, inbound: external OIDC tokens traded for SVIDs (RFC 8693).
//!
//! A CI job or a pod already holds a token from the identity provider it runs under (GitHub
//! Actions, GitLab CI, a Kubernetes service-account token, any OIDC issuer). It posts that
//! token to `POST /v1/token` with a CSR (or an audience) and receives an X.509-SVID chain for
//! its own key, or a JWT-SVID, with no stored secret anywhere.
//!
//! - [`policy`]: `[[token_exchange.issuer]]` and `[[token_exchange.policy]]` checked and
//!   compiled (CEL conditions that must pin an immutable claim, SPIFFE ID templates).
//! - [`jwks`]: the issuers' key sets; [`issuer`]: fetching and caching them.
//! - [`validate`]: the token checks as pure functions.
//! - [`endpoint`]: the HTTPS endpoint (form parsing, limits, RFC 6749/8693 responses).
//! - This module: [`TokenExchange::exchange`], the whole decision in the contract's order,
//!   and [`audit_exchange`], the one place every outcome is recorded.
//!
//! # Decision order
//!
//! Known issuer (before any network fetch) → signature → `aud` → time claims → lifetime →
//! `jti` single use (recorded in the datastore, so a replay is refused across restarts and by
//! every replica of a shared datastore) → the first policy of that issuer whose condition holds
//! → its SPIFFE ID mapping → signing. The caller learns only that the token was not accepted;
//! the audit line names the check that refused it.

pub mod endpoint;
pub mod issuer;
pub mod jwks;
pub mod policy;
pub mod validate;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tessera_spiffe::SpiffeId;
use tokio::sync::watch;

use crate::config::ServerConfig;
use crate::datastore::blocking;
use crate::server::ServerState;
pub use issuer::{Checked, IssuerSet, TrustedIssuer};
pub use policy::{Compiled, Policy, compile};
use validate::FailedCheck;

/// How often expired `jti`s are pruned from the replay cache.
pub const JTI_PRUNE_INTERVAL: Duration = Duration::from_secs(300);

/// What the caller asked for.
#[derive(Debug, Clone)]
pub enum Requested {
    /// An X.509-SVID over the key of this DER CSR (already verified).
    X509 {
        /// DER PKCS#10.
        csr_der: Vec<u8>,
    },
    /// A JWT-SVID for these audiences.
    Jwt {
        /// `aud` of the JWT-SVID.
        audiences: Vec<String>,
    },
}

impl Requested {
    fn kind(&self) -> &'static str {
        match self {
            Self::X509 { .. } => "x509_svid",
            Self::Jwt { .. } => "jwt_svid",
        }
    }
}

/// What was issued.
#[derive(Debug, Clone)]
pub enum Issued {
    /// An X.509-SVID.
    X509 {
        /// The SPIFFE ID.
        spiffe_id: SpiffeId,
        /// DER, leaf first.
        chain: Vec<Vec<u8>>,
        /// The leaf's `notAfter`.
        expires_at: SystemTime,
    },
    /// A JWT-SVID.
    Jwt {
        /// The SPIFFE ID.
        spiffe_id: SpiffeId,
        /// The token.
        token: String,
        /// Its `exp`.
        expires_at: SystemTime,
    },
}

/// Why an exchange was refused: what the caller is told is decided by the endpoint; the check
/// is only for the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub FailedCheck);

/// The exchange service: trusted issuers, policies and the server it signs with.
#[derive(Debug)]
pub struct TokenExchange {
    issuers: IssuerSet,
    policies: Vec<Policy>,
    state: Arc<ServerState>,
}

/// One audit record of an exchange attempt. Claim values are as the token carried them
/// (unverified when the token was refused before its signature was checked).
#[derive(Debug, Clone, Default)]
pub struct ExchangeAudit<'a> {
    /// `iss`.
    pub issuer: Option<&'a str>,
    /// `sub`.
    pub subject: Option<&'a str>,
    /// `jti`.
    pub jti: Option<&'a str>,
    /// The policy applied.
    pub policy: Option<&'a str>,
    /// The SPIFFE ID issued.
    pub spiffe_id: Option<&'a str>,
    /// `x509_svid` or `jwt_svid`.
    pub requested: Option<&'a str>,
    /// The check that refused it, `None` when issued.
    pub failed_check: Option<FailedCheck>,
}

/// Audit values come from hostile tokens: bounded and without control characters, so one
/// record stays one log line.
fn audit_value(value: Option<&str>) -> String {
    match value {
        None => "-".to_owned(),
        Some(text) => text.chars().take(256).map(|c| if c.is_control() { '?' } else { c }).collect(),
    }
}

/// Records one exchange attempt: the single place every outcome of the token exchange is
/// written, as a structured event with target `tessera_audit`.
pub fn audit_exchange(audit: &tessera_common::audit::AuditLog, record: &ExchangeAudit<'_>) {
    let outcome = if record.failed_check.is_none() { "issued" } else { "refused" };
    audit.emit(
        tessera_common::audit::AuditEvent::new("token_exchange")
            .field("outcome", outcome)
            .field("issuer", record.issuer)
            .field("subject", record.subject)
            .field("jti", record.jti)
            .field("policy", record.policy)
            .field("spiffe_id", record.spiffe_id)
            .field("requested", record.requested)
            .field("failed_check", record.failed_check.map(FailedCheck::as_str)),
    );
    tracing::info!(
        target: "tessera_audit",
        event = "token_exchange",
        outcome,
        issuer = %audit_value(record.issuer),
        subject = %audit_value(record.subject),
        jti = %audit_value(record.jti),
        policy = %audit_value(record.policy),
        spiffe_id = %audit_value(record.spiffe_id),
        requested = %audit_value(record.requested),
        failed_check = record.failed_check.map_or("-", FailedCheck::as_str),
        "token exchange {outcome}"
    );
}

/// Which replay cache a `jti` is recorded in. Both live in the datastore's one `jti` table,
/// under different keys: the exchange's under the bare `iss`, node attestation's under
/// `node:<iss>`, so the two never count each other's tokens. (What keeps a token meant for one
/// from being used at the other is its audience: each has its own issuer list.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayScope {
    /// The token exchange endpoint.
    Exchange,
    /// The `k8s_psat` and `oidc` node attestors.
    NodeAttestation,
}

impl ReplayScope {
    /// The key the `jti`s of `issuer` are recorded under.
    pub fn key(self, issuer: &str) -> String {
        match self {
            Self::Exchange => issuer.to_owned(),
            Self::NodeAttestation => format!("node:{issuer}"),
        }
    }
}

/// Records `jti` in `scope` until the token's `exp` plus the leeway; [`FailedCheck::Replay`] if
/// it was already recorded there, [`FailedCheck::Internal`] if the datastore does not answer.
pub(crate) async fn consume_jti(
    state: &ServerState,
    scope: ReplayScope,
    issuer: &policy::IssuerSettings,
    jti: &str,
    expires_at: u64,
) -> Result<(), FailedCheck> {
    let (key, jti) = (scope.key(&issuer.issuer), jti.to_owned());
    let keep_until = expires_at.saturating_add(issuer.leeway.as_secs());
    let first = blocking(state.datastore(), move |store| store.insert_jti_if_absent(&key, &jti, keep_until))
        .await
        .map_err(|err| {
            tracing::error!(error = %err, ?scope, "the jti replay cache is not answering");
            FailedCheck::Internal
        })?;
    if first { Ok(()) } else { Err(FailedCheck::Replay) }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs())
}

impl TokenExchange {
    /// The server's audit log.
    pub(crate) fn audit_log(&self) -> &tessera_common::audit::AuditLog {
        self.state.audit()
    }

    /// Builds the service from the configuration (blocking: reads the issuers' CA files).
    pub fn new(state: Arc<ServerState>) -> Result<Self, (&'static str, String)> {
        let config: &ServerConfig = state.config();
        let Compiled { issuers, policies } = compile(config)?;
        let paths = config.token_exchange.issuer.iter().map(|issuer| issuer.ca_bundle_path.as_deref());
        let issuers = IssuerSet::load(issuers, paths, &policy::EXCHANGE_ISSUER_KEYS)?;
        Ok(Self { issuers, policies, state })
    }

    /// The trusted issuer with this exact `iss`.
    pub fn issuer(&self, iss: &str) -> Option<&Arc<TrustedIssuer>> {
        self.issuers.get(iss)
    }

    /// Runs the whole decision for one subject token and records it with [`audit_exchange`].
    pub async fn exchange(&self, subject_token: &str, requested: Requested) -> Result<Issued, Refused> {
        let mut audit = ExchangeAudit { requested: Some(requested.kind()), ..ExchangeAudit::default() };
        let token = match validate::decode(subject_token) {
            Ok(token) => token,
            Err(check) => {
                audit.failed_check = Some(check);
                audit_exchange(self.state.audit(), &audit);
                return Err(Refused(check));
            }
        };
        audit.issuer = Some(&token.issuer);
        audit.subject = token.claimed("sub");
        audit.jti = token.claimed("jti");
        let outcome = self.decide(&token, requested).await;
        match &outcome {
            Ok((policy, issued)) => {
                audit.policy = Some(policy);
                let id = match issued {
                    Issued::X509 { spiffe_id, .. } | Issued::Jwt { spiffe_id, .. } => spiffe_id.as_str(),
                };
                audit.spiffe_id = Some(id);
                audit_exchange(self.state.audit(), &audit);
            }
            Err((policy, check)) => {
                audit.policy = policy.as_deref();
                audit.failed_check = Some(*check);
                audit_exchange(self.state.audit(), &audit);
            }
        }
        outcome.map(|(_, issued)| issued).map_err(|(_, check)| Refused(check))
    }

    /// The decision after decoding; on refusal, the policy concerned (if any) and the check.
    async fn decide(
        &self,
        token: &validate::Unverified,
        requested: Requested,
    ) -> Result<(String, Issued), (Option<String>, FailedCheck)> {
        let refuse = |check| (None, check);
        // Known issuer first (an unknown one is refused without any network access), then the
        // key, signature, audience, time claims and lifetime. The token's remaining life caps
        // what is issued.
        let Checked { issuer, token: verified, remaining } = self.issuers.verify(token).await.map_err(refuse)?;
        if let Some(jti) = &verified.jti {
            consume_jti(&self.state, ReplayScope::Exchange, &issuer.settings, jti, verified.expires_at)
                .await
                .map_err(refuse)?;
        }
        let policy = self
            .policies
            .iter()
            .filter(|policy| policy.issuer == issuer.settings.issuer)
            .find(|policy| policy.matches(&verified.claims))
            .ok_or(refuse(FailedCheck::Condition))?;
        let name = Some(policy.name.clone());
        let spiffe_id = policy.spiffe_id(&verified.claims).map_err(|reason| {
            tracing::debug!(policy = %policy.name, %reason, "token exchange: no SPIFFE ID from the claims");
            (name.clone(), FailedCheck::Mapping)
        })?;
        let issued =
            self.sign(policy, spiffe_id, requested, remaining).await.map_err(|_| (name, FailedCheck::Internal))?;
        Ok((policy.name.clone(), issued))
    }

    async fn sign(
        &self,
        policy: &Policy,
        spiffe_id: SpiffeId,
        requested: Requested,
        remaining: Duration,
    ) -> Result<Issued, ()> {
        let ca = Arc::clone(self.state.ca());
        let (x509_ttl, jwt_ttl) = (policy.x509_svid_ttl.min(remaining), policy.jwt_svid_ttl.min(remaining));
        let signed = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            match requested {
                Requested::X509 { csr_der } => ca
                    .sign_x509_svid_from_csr(&spiffe_id, &[], x509_ttl, &csr_der, now)
                    .map(|svid| Issued::X509 { spiffe_id, chain: svid.chain, expires_at: svid.expires_at }),
                Requested::Jwt { audiences } => ca
                    .sign_jwt_svid(&spiffe_id, &audiences, jwt_ttl, now)
                    .map(|(token, expires_at)| Issued::Jwt { spiffe_id, token, expires_at }),
            }
        })
        .await;
        match signed {
            Ok(Ok(issued)) => Ok(issued),
            Ok(Err(err)) => {
                tracing::error!(error = %err, policy = %policy.name, "token exchange: signing failed");
                Err(())
            }
            Err(err) => {
                tracing::error!(error = %err, "token exchange: the signing task failed");
                Err(())
            }
        }
    }

    /// The server's shared state.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }
}

/// Prunes expired `jti`s from the replay cache every [`JTI_PRUNE_INTERVAL`] until `stopped`.
pub(crate) async fn prune_loop(state: Arc<ServerState>, mut stopped: watch::Receiver<bool>) {
    loop {
        let now = unix_now();
        match blocking(state.datastore(), move |store| store.prune_jtis(now)).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "token exchange: expired jti records pruned"),
            Err(err) => tracing::warn!(error = %err, "token exchange: cannot prune the jti replay cache"),
        }
        tokio::select! {
            () = tokio::time::sleep(JTI_PRUNE_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
    }
}
