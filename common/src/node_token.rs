//! Node attestation with a JWT (`k8s_psat`, `oidc`), as both ends see it: the agent sends the
//! compact token it was given as the attestation payload, in one message, with its CSR; there
//! is no challenge. The server verifies the token against its configured issuers.

/// The attestation type of a Kubernetes projected service-account token; also the agent ID
/// segment (`spiffe://<td>/tessera/agent/k8s_psat/<cluster>/<node uid>`).
pub const K8S_PSAT: &str = "k8s_psat";

/// The attestation type of a token from any trusted OIDC issuer; agent IDs are under
/// `spiffe://<td>/tessera/agent/oidc/`.
pub const OIDC: &str = "oidc";

/// Largest token accepted (and read from the agent's token file), in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
