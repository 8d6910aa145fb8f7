//! Envoy's Secret Discovery Service (SDS v3), served on the Workload API socket.
//!
//! # For a newcomer
//!
//! Envoy fetches its TLS certificate and the CA certificates it validates peers with from an
//! SDS server. The agent is one: the service `envoy.service.secret.v3.SecretDiscoveryService`
//! is added to the Workload API's gRPC router (`workload_api/socket.rs`), so it shares the
//! socket, the connection and stream limits, and the shutdown signal. Each call is attested
//! exactly like a Workload API call (peer credentials -> unix attestor -> matching entries in
//! the snapshot cache), except that Envoy does not send the `workload.spiffe.io` header and SDS
//! does not ask for it.
//!
//! Resource names (`DiscoveryRequest.resource_names`, see `resources.rs`):
//!
//! | name | secret |
//! | --- | --- |
//! | a SPIFFE ID the caller holds | `tls_certificate` (PEM chain, leaf first; PEM PKCS#8 key) |
//! | `default` | `tls_certificate` of the caller's first identity (the Workload API's order) |
//! | `spiffe://<td>` (own, or federated and visible to the caller) | `validation_context` for that trust domain |
//! | `ROOTCA` | `validation_context` for the own trust domain |
//! | `ALL` | `validation_context`: the SPIFFE validator over every trust domain the caller may see |
//! | *(no names)* | every visible bundle and every identity, each named by its ID |
//!
//! A name the caller holds nothing for fails the whole request with InvalidArgument
//! (`workload is not authorized for the requested identities [...]`). Validation contexts use
//! Envoy's SPIFFE certificate validator unless the proxy is Envoy 1.17 or older or its node
//! metadata sets `disable_spiffe_cert_validation`; then they are plain `trusted_ca` PEM (and
//! `ALL` is refused).
//!
//! # The stream protocol (`StreamSecrets`, state of the world)
//!
//! The handler reads the stream's first request, checks it, attests the caller and answers.
//! After that one state machine per stream (`service.rs`, polled by the connection, no task of
//! its own) reacts to three things:
//!
//! - **a request**: one whose `response_nonce` is not the nonce of the last response is stale
//!   and ignored; otherwise it is an ACK (its `version_info` is the last version) or a NACK
//!   (`error_detail` set, or another version: logged). Either way, if the requested names (or
//!   the proxy's validation mode) changed, a new response is sent for the new names.
//! - **a cache publish**: the secrets of the current names are rebuilt for the caller and sent
//!   when they differ from the last ones sent (an SVID rotated, a bundle changed). If a named
//!   identity disappears for good the stream ends with InvalidArgument; if it is only being
//!   re-minted the stream waits for it.
//! - **shutdown**: the stream ends with Unavailable.
//!
//! Each response has a new `version_info` (a decimal counter, `"1"`, `"2"`, ...) and a random
//! 8-hex-character `nonce`. `FetchSecrets` answers once, with empty `version_info` and `nonce`.
//! `DeltaSecrets` is Unimplemented.
//!
//! Type URLs: an empty `type_url` or the `Secret` type URL is served; any other is refused with
//! InvalidArgument (an SDS stream carries only secrets, so another type is a misconfigured
//! client, and answering it with secrets would be wrong).
//!
//! The names `default`, `ROOTCA`, `ALL` and the default validation mode come from
//! [`SdsSettings`]; the agent configuration has no keys for them yet, so the defaults apply.

mod resources;
mod service;

use tessera_wire::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;

use crate::workload_api::WorkloadApi;

pub use resources::{DISABLE_SPIFFE_CERT_VALIDATION, SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME, SdsSettings};

/// Largest request message accepted. Envoy's `Node` lists every extension compiled into the
/// proxy, which takes tens of kilobytes.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The SDS service: cheap to clone, clones share state with the Workload API they wrap.
#[derive(Clone, Debug)]
pub struct SecretDiscovery {
    api: WorkloadApi,
    settings: std::sync::Arc<SdsSettings>,
}

impl SecretDiscovery {
    /// SDS sharing `api`'s cache, attestor, limits and shutdown, with default settings.
    pub fn new(api: WorkloadApi) -> Self {
        Self::with_settings(api, SdsSettings::default())
    }

    /// SDS with explicit settings.
    pub fn with_settings(api: WorkloadApi, settings: SdsSettings) -> Self {
        Self { api, settings: std::sync::Arc::new(settings) }
    }

    /// The tonic service, ready to be added to a router.
    pub fn into_server(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}
