//! The `SecretDiscoveryService` gRPC service and the per-stream state machine of the
//! [module docs](super).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use ring::rand::SecureRandom as _;
use tessera_spiffe::SpiffeId;
use tessera_spiffe::selector::SelectorSet;
use tessera_wire::envoy::config::core::v3::Node;
use tessera_wire::envoy::extensions::transport_sockets::tls::v3::Secret;
use tessera_wire::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tessera_wire::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tonic::{Request, Response, Status, Streaming};

use super::SecretDiscovery;
use super::resources::{BuildError, SECRET_TYPE_URL, Subscription, ValidationMode, build};
use crate::attestor::PeerCredentials;
use crate::cache::AgentSnapshot;
use crate::workload_api::{Caller, Wait, log_no_identity, shutting_down};

/// A server stream of SDS.
type SdsStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send + 'static>>;

/// How long a new `StreamSecrets` stream may wait for its first request (Envoy sends it at
/// once).
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// spec §7: the request's type URL must be the `Secret` type (or empty, which means it).
fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url: {type_url:?} is not served here; the Secret Discovery Service serves only {SECRET_TYPE_URL}"
        )))
    }
}

/// A random 8-hex-character nonce; `fallback` (unique per stream) if the system RNG fails.
fn new_nonce(fallback: u64) -> String {
    let mut bytes = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => hex::encode(bytes),
        Err(_) => format!("{fallback:08x}"),
    }
}

/// The response carrying `secrets`.
fn response(secrets: &[Secret], version_info: String, nonce: String) -> Result<DiscoveryResponse, Status> {
    let resources = secrets
        .iter()
        .map(prost_types::Any::from_msg)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| BuildError::Encode(err.to_string()).to_status())?;
    Ok(DiscoveryResponse {
        version_info,
        resources,
        canary: false,
        type_url: SECRET_TYPE_URL.to_owned(),
        nonce,
        control_plane: None,
    })
}

impl SecretDiscovery {
    /// The status for a failed build, with the "no identity" explanation logged when the caller
    /// asked for identities it does not hold.
    fn build_status(
        &self,
        method: &str,
        err: &BuildError,
        peer: &PeerCredentials,
        selectors: &SelectorSet,
        snapshot: &AgentSnapshot,
    ) -> Status {
        match err {
            BuildError::NotAuthorized(names) => {
                tracing::warn!(method, pid = peer.pid, names = ?names, "SDS caller is not authorized for the requested resources");
                // For identities, explain which selectors the caller lacks.
                let identity = names.iter().find(|name| SpiffeId::parse(name).is_ok_and(|id| !id.is_trust_domain_id()));
                if let Some(identity) = identity {
                    log_no_identity(self.api.audit(), method, peer, selectors, snapshot, Some(identity));
                } else if names.contains(&self.settings.default_svid_name) {
                    log_no_identity(self.api.audit(), method, peer, selectors, snapshot, None);
                }
            }
            BuildError::SpiffeValidatorUnavailable | BuildError::Encode(_) => {
                tracing::warn!(method, pid = peer.pid, error = ?err, "cannot build SDS secrets");
            }
        }
        err.to_status()
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for SecretDiscovery {
    type DeltaSecretsStream = SdsStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = SdsStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("Method is not implemented"))
    }

    async fn stream_secrets(
        &self,
        mut request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let slot = self.api.stream_slot()?;
        let first = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, request.get_mut().message()).await {
            Ok(Ok(Some(first))) => first,
            Ok(Ok(None)) => return Err(Status::invalid_argument("the stream ended before its first DiscoveryRequest")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no DiscoveryRequest received on the stream in time")),
        };
        check_type_url(&first.type_url)?;
        let own = self.api.trust_domain().clone();
        let subscription = Subscription::parse(&first.resource_names, &self.settings, &own)?;
        let caller = self.api.attest(&request, Wait::Identity).await?;
        let mut stream = SecretStream::new(self.clone(), &caller, request.into_inner(), subscription, slot);
        let first_response = stream.on_first_request(first, &caller)?;
        caller.verify_still_same()?;
        tracing::debug!(pid = caller.peer.pid, names = ?stream.subscription.names(), "StreamSecrets");
        // The pinned process and the attestation slot are released here, as for Workload API
        // streams: the stream is bound to its connection.
        drop(caller);
        stream.pending = Some(first_response);
        Ok(Response::new(Box::pin(futures_util::stream::unfold(stream, |mut stream| async move {
            let item = stream.next().await?;
            Some((item, stream))
        }))))
    }

    async fn fetch_secrets(&self, request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let message = request.get_ref();
        check_type_url(&message.type_url)?;
        let own = self.api.trust_domain().clone();
        let subscription = Subscription::parse(&message.resource_names, &self.settings, &own)?;
        let mode = ValidationMode::for_node(&self.settings, message.node.as_ref());
        let caller = self.api.attest(&request, Wait::Identity).await?;
        let secrets = build(&caller.snapshot, &own, caller.selectors(), &subscription, mode).map_err(|err| {
            self.build_status("FetchSecrets", &err, &caller.peer, caller.selectors(), &caller.snapshot)
        })?;
        let answer = response(&secrets, String::new(), String::new())?;
        caller.verify_still_same()?;
        tracing::debug!(pid = caller.peer.pid, names = ?subscription.names(), "FetchSecrets");
        Ok(Response::new(answer))
    }
}

/// The state of one `StreamSecrets` stream; dropped (with its cache subscription and stream
/// slot) when the stream ends or its connection closes.
struct SecretStream {
    sds: SecretDiscovery,
    inbound: Streaming<DiscoveryRequest>,
    receiver: watch::Receiver<Arc<AgentSnapshot>>,
    closing: watch::Receiver<bool>,
    selectors: SelectorSet,
    peer: PeerCredentials,
    /// The last node the proxy sent (follow-up requests usually omit it).
    node: Option<Node>,
    mode: ValidationMode,
    subscription: Subscription,
    /// The secrets of the last response, to tell whether a publish changed anything.
    last_sent: Vec<Secret>,
    /// How many responses were sent; the last one's `version_info`.
    version: u64,
    /// The last response's nonce; empty before the first.
    nonce: String,
    /// The first response, sent when the stream is first polled.
    pending: Option<DiscoveryResponse>,
    done: bool,
    _slot: OwnedSemaphorePermit,
}

impl SecretStream {
    fn new(
        sds: SecretDiscovery,
        caller: &Caller,
        inbound: Streaming<DiscoveryRequest>,
        subscription: Subscription,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let closing = sds.api.closing();
        let mode = ValidationMode::for_node(&sds.settings, None);
        Self {
            sds,
            inbound,
            receiver: caller.receiver.clone(),
            closing,
            selectors: caller.selectors().clone(),
            peer: caller.peer,
            node: None,
            mode,
            subscription,
            last_sent: Vec::new(),
            version: 0,
            nonce: String::new(),
            pending: None,
            done: false,
            _slot: slot,
        }
    }

    /// Takes the node of a request if it has one (follow-ups usually do not) and recomputes
    /// the validation mode. Returns whether the mode changed.
    fn update_node(&mut self, node: Option<Node>) -> bool {
        if let Some(node) = node {
            self.node = Some(node);
        }
        let mode = ValidationMode::for_node(&self.sds.settings, self.node.as_ref());
        std::mem::replace(&mut self.mode, mode) != mode
    }

    /// The first response, built from the snapshot the caller was attested against.
    fn on_first_request(&mut self, request: DiscoveryRequest, caller: &Caller) -> Result<DiscoveryResponse, Status> {
        self.update_node(request.node);
        let own = self.sds.api.trust_domain();
        let secrets = build(&caller.snapshot, own, &self.selectors, &self.subscription, self.mode).map_err(|err| {
            self.sds.build_status("StreamSecrets", &err, &self.peer, &self.selectors, &caller.snapshot)
        })?;
        self.respond(secrets)
    }

    /// A new response for `secrets`, remembered as the last one sent.
    fn respond(&mut self, secrets: Vec<Secret>) -> Result<DiscoveryResponse, Status> {
        self.version += 1;
        self.nonce = new_nonce(self.version);
        let answer = response(&secrets, self.version.to_string(), self.nonce.clone())?;
        self.last_sent = secrets;
        Ok(answer)
    }

    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        if self.done {
            return None;
        }
        if let Some(first) = self.pending.take() {
            return Some(Ok(first));
        }
        loop {
            if *self.closing.borrow_and_update() {
                return self.finish(shutting_down());
            }
            let outcome = tokio::select! {
                message = self.inbound.message() => match message {
                    Ok(Some(request)) => self.on_request(request),
                    Ok(None) => {
                        tracing::debug!(pid = self.peer.pid, "SDS client closed its stream");
                        self.done = true;
                        return None;
                    }
                    Err(status) => {
                        tracing::debug!(pid = self.peer.pid, error = %status, "SDS request stream failed");
                        self.done = true;
                        return None;
                    }
                },
                changed = self.receiver.changed() => match changed {
                    Ok(()) => self.on_publish(),
                    Err(_) => Err(shutting_down()),
                },
                changed = self.closing.changed() => match changed {
                    Ok(()) => Ok(None),
                    Err(_) => Err(shutting_down()),
                },
            };
            match outcome {
                Ok(Some(answer)) => return Some(Ok(answer)),
                Ok(None) => {}
                Err(status) => return self.finish(status),
            }
        }
    }

    /// A follow-up request: stale ones are ignored, ACKs and NACKs noted, and a response sent
    /// when the subscription (or the proxy's validation mode) changed.
    fn on_request(&mut self, request: DiscoveryRequest) -> Result<Option<DiscoveryResponse>, Status> {
        check_type_url(&request.type_url)?;
        let pid = self.peer.pid;
        if request.response_nonce != self.nonce {
            // xDS: a request answering an older response is superseded by that newer response.
            tracing::debug!(pid, nonce = %request.response_nonce, current = %self.nonce, "ignoring a stale SDS request");
            return Ok(None);
        }
        if let Some(error) = &request.error_detail {
            tracing::warn!(
                pid,
                version = %self.version,
                code = error.code,
                error = %error.message,
                "Envoy rejected the SDS response (NACK)"
            );
        } else if request.version_info != self.version.to_string() {
            tracing::warn!(pid, version = %self.version, accepted = %request.version_info, "Envoy did not accept the SDS response (NACK)");
        } else {
            tracing::debug!(pid, version = %self.version, "SDS response acknowledged");
        }
        let own = self.sds.api.trust_domain().clone();
        let subscription = Subscription::parse(&request.resource_names, &self.sds.settings, &own)?;
        let mode_changed = self.update_node(request.node);
        if subscription == self.subscription && !mode_changed {
            return Ok(None);
        }
        self.subscription = subscription;
        let snapshot = Arc::clone(&self.receiver.borrow_and_update());
        let secrets = build(&snapshot, &own, &self.selectors, &self.subscription, self.mode)
            .map_err(|err| self.sds.build_status("StreamSecrets", &err, &self.peer, &self.selectors, &snapshot))?;
        tracing::debug!(pid, names = ?self.subscription.names(), "SDS subscription changed");
        self.respond(secrets).map(Some)
    }

    /// A cache publish: a response when the caller's secrets changed. A named identity that is
    /// being re-minted is waited for; one that is gone ends the stream.
    fn on_publish(&mut self) -> Result<Option<DiscoveryResponse>, Status> {
        let snapshot = Arc::clone(&self.receiver.borrow_and_update());
        let own = self.sds.api.trust_domain();
        match build(&snapshot, own, &self.selectors, &self.subscription, self.mode) {
            Ok(secrets) if secrets == self.last_sent => Ok(None),
            Ok(secrets) => {
                tracing::debug!(pid = self.peer.pid, version = self.version + 1, "pushing updated SDS secrets");
                self.respond(secrets).map(Some)
            }
            Err(BuildError::NotAuthorized(missing))
                if self.subscription.all_pending(&missing, &snapshot, &self.selectors) =>
            {
                tracing::debug!(pid = self.peer.pid, names = ?missing, "waiting for SVIDs being minted");
                Ok(None)
            }
            Err(err) => Err(self.sds.build_status("StreamSecrets", &err, &self.peer, &self.selectors, &snapshot)),
        }
    }

    fn finish(&mut self, status: Status) -> Option<Result<DiscoveryResponse, Status>> {
        self.done = true;
        Some(Err(status))
    }
}
