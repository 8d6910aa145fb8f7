//! The `SpiffeWorkloadAPI` gRPC service: the per-call steps of the [module docs](super).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::Stream;
use serde_json::Value as Json;
use tessera_spiffe::SpiffeId;
use tessera_spiffe::jwt;
use tessera_spiffe::selector::SelectorSet;
use tessera_wire::workload as pb;
use tessera_wire::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::WorkloadApi;
use super::caller::{
    ATTESTATION_FAILED, NO_IDENTITY, attestation_status, check_security_header, log_no_identity, peer_credentials,
};
use super::socket::ConnectionInfo;
use super::views::{Visibility, X509View, claims_to_struct, jwt_entries};
use crate::attestor::{Attestation, PeerCredentials};
use crate::cache::{AgentSnapshot, JwtSvidError};

/// A server stream of the Workload API.
pub(crate) type WorkloadStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send + 'static>>;

/// Longest wait for the attestor (user and group names may come from a slow directory).
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Most audiences in one `FetchJWTSVID` request, and their total length.
const MAX_AUDIENCES: usize = 32;
const MAX_AUDIENCE_BYTES: usize = 4096;

/// What a call must see before it decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A ready snapshot.
    Ready,
    /// A ready snapshot in which every matching entry has its X.509-SVID (or none matches).
    Identity,
}

/// An attested caller, between attestation and answer (also used by SDS, `crate::sds`).
pub(crate) struct Caller {
    pub(crate) peer: PeerCredentials,
    attestation: Attestation,
    /// The snapshot the call decides on.
    pub(crate) snapshot: Arc<AgentSnapshot>,
    /// Subscribed before `snapshot` was read: streams wake on every later publish.
    pub(crate) receiver: watch::Receiver<Arc<AgentSnapshot>>,
    /// Held until the answer: bounds how many pinned processes are open at once.
    _attesting: OwnedSemaphorePermit,
}

impl Caller {
    pub(crate) fn selectors(&self) -> &SelectorSet {
        self.attestation.selectors()
    }

    /// spec (server-agent-flow §7): the pinned process must still be the caller right before
    /// the answer, otherwise the answer could reach another process that now has its pid.
    pub(crate) fn verify_still_same(&self) -> Result<(), Status> {
        self.attestation.verify_still_same().map_err(|err| attestation_status(&err, Some(&self.peer)))
    }
}

/// Unavailable: the agent is shutting down (streams end with it so that connections drain).
pub(crate) fn shutting_down() -> Status {
    Status::unavailable("the agent is shutting down")
}

impl WorkloadApi {
    /// Attests the caller of `request` and waits (bounded) until the cache can answer it.
    pub(crate) async fn attest<T>(&self, request: &Request<T>, wait: Wait) -> Result<Caller, Status> {
        let connection = request.extensions().get::<ConnectionInfo>();
        let peer = peer_credentials(connection.map(|info| &info.uds))?;
        let pidfd = connection.and_then(|info| info.pidfd.as_ref());
        let attesting = Arc::clone(&self.inner.attesting).acquire_owned().await.map_err(|_| shutting_down())?;
        let attest = self.inner.attestor.attest_connection(peer, pidfd);
        let attestation = match tokio::time::timeout(ATTESTATION_TIMEOUT, attest).await {
            Ok(Ok(attestation)) => attestation,
            Ok(Err(err)) => return Err(attestation_status(&err, Some(&peer))),
            Err(_) => {
                tracing::warn!(pid = peer.pid, uid = peer.uid, "workload attestation timed out");
                return Err(Status::unavailable(format!("{ATTESTATION_FAILED}: timed out")));
            }
        };
        let mut receiver = self.inner.cache.subscribe();
        let snapshot = self.wait_until_settled(&mut receiver, attestation.selectors(), wait).await?;
        Ok(Caller { peer, attestation, snapshot, receiver, _attesting: attesting })
    }

    /// Waits, at most `ready_timeout`, for a ready snapshot (and, for [`Wait::Identity`], for
    /// the SVIDs of matching entries that are still being minted).
    async fn wait_until_settled(
        &self,
        receiver: &mut watch::Receiver<Arc<AgentSnapshot>>,
        selectors: &SelectorSet,
        wait: Wait,
    ) -> Result<Arc<AgentSnapshot>, Status> {
        let deadline = Instant::now() + self.inner.limits.ready_timeout;
        loop {
            let snapshot = Arc::clone(&receiver.borrow_and_update());
            let settled = snapshot.ready
                && match wait {
                    Wait::Ready => true,
                    Wait::Identity => {
                        !snapshot.identities_for(selectors).is_empty() || snapshot.entries_for(selectors).is_empty()
                    }
                };
            if settled {
                return Ok(snapshot);
            }
            match tokio::time::timeout_at(deadline, receiver.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(shutting_down()),
                Err(_) if snapshot.ready => return Ok(snapshot),
                Err(_) => {
                    return Err(Status::unavailable(
                        "the agent has not completed its first sync with the server yet; retry later",
                    ));
                }
            }
        }
    }

    /// A stream slot, or Unavailable when too many streams are open.
    pub(crate) fn stream_slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        if *self.inner.closing.borrow() {
            return Err(shutting_down());
        }
        Arc::clone(&self.inner.streams).try_acquire_owned().map_err(|_| {
            tracing::warn!(max = self.inner.limits.max_open_streams, "too many open Workload API streams");
            Status::unavailable("too many open Workload API streams; retry later")
        })
    }

    /// PermissionDenied `no identity issued`, with the log line explaining why.
    fn no_identity(&self, method: &str, caller: &Caller, requested: Option<&str>) -> Status {
        log_no_identity(&self.inner.audit, method, &caller.peer, caller.selectors(), &caller.snapshot, requested);
        Status::permission_denied(NO_IDENTITY)
    }

    /// The stream that sends `first` now, then a message built by `build` each time `view` of
    /// a newly published snapshot differs from the last view sent. Ends with PermissionDenied
    /// when `view` is `None` (the caller lost its identities) and with Unavailable at shutdown.
    fn watch_stream<V, M>(
        &self,
        method: &'static str,
        caller: Caller,
        slot: OwnedSemaphorePermit,
        first_view: V,
        view: impl Fn(&AgentSnapshot) -> Option<V> + Send + 'static,
        build: impl Fn(&V) -> M + Send + 'static,
    ) -> WorkloadStream<M>
    where
        V: PartialEq + Send + 'static,
        M: Send + 'static,
    {
        let first = build(&first_view);
        // The pinned process and the attestation slot are released here (see the module docs).
        let Caller { peer, receiver, .. } = caller;
        let state = StreamState {
            receiver,
            closing: self.inner.closing.subscribe(),
            last: first_view,
            first: Some(first),
            done: false,
            view,
            build,
            method,
            pid: peer.pid,
            _slot: slot,
        };
        Box::pin(futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next().await?;
            Some((item, state))
        }))
    }
}

/// The state of one server stream; dropped (with its cache subscription and stream slot) when
/// the stream ends or its connection closes.
struct StreamState<V, M, F, B> {
    receiver: watch::Receiver<Arc<AgentSnapshot>>,
    closing: watch::Receiver<bool>,
    last: V,
    first: Option<M>,
    done: bool,
    view: F,
    build: B,
    method: &'static str,
    pid: u32,
    _slot: OwnedSemaphorePermit,
}

impl<V, M, F, B> StreamState<V, M, F, B>
where
    V: PartialEq,
    F: Fn(&AgentSnapshot) -> Option<V>,
    B: Fn(&V) -> M,
{
    async fn next(&mut self) -> Option<Result<M, Status>> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(Ok(first));
        }
        loop {
            if *self.closing.borrow_and_update() {
                return self.finish(shutting_down());
            }
            tokio::select! {
                changed = self.receiver.changed() => if changed.is_err() {
                    return self.finish(shutting_down());
                },
                changed = self.closing.changed() => {
                    if changed.is_err() {
                        return self.finish(shutting_down());
                    }
                    continue;
                }
            }
            let snapshot = Arc::clone(&self.receiver.borrow_and_update());
            match (self.view)(&snapshot) {
                Some(view) if view == self.last => {}
                Some(view) => {
                    let message = (self.build)(&view);
                    self.last = view;
                    tracing::debug!(method = self.method, pid = self.pid, "sending an updated Workload API message");
                    return Some(Ok(message));
                }
                None => {
                    tracing::info!(
                        method = self.method,
                        pid = self.pid,
                        "Workload API caller lost its last identity; ending the stream"
                    );
                    return self.finish(Status::permission_denied(NO_IDENTITY));
                }
            }
        }
    }

    fn finish(&mut self, status: Status) -> Option<Result<M, Status>> {
        self.done = true;
        Some(Err(status))
    }
}

/// spec: the audience list is required; each value must be non-empty.
fn check_audiences(audiences: &[String]) -> Result<(), Status> {
    if audiences.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audiences.iter().any(String::is_empty) {
        return Err(Status::invalid_argument("audience must not contain empty values"));
    }
    if audiences.len() > MAX_AUDIENCES || audiences.iter().map(String::len).sum::<usize>() > MAX_AUDIENCE_BYTES {
        return Err(Status::invalid_argument(format!(
            "audience: at most {MAX_AUDIENCES} values of {MAX_AUDIENCE_BYTES} bytes in total are accepted"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = WorkloadStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = WorkloadStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = WorkloadStream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = WorkloadStream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = WorkloadStream<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_security_header(request.metadata())?;
        let slot = self.stream_slot()?;
        let caller = self.attest(&request, Wait::Identity).await?;
        let own = self.inner.trust_domain.clone();
        let selectors = caller.selectors().clone();
        let Some(view) = X509View::of(&caller.snapshot, &own, &selectors) else {
            return Err(self.no_identity("FetchX509SVID", &caller, None));
        };
        caller.verify_still_same()?;
        tracing::debug!(pid = caller.peer.pid, spiffe_ids = ?view.spiffe_ids(), "FetchX509SVID");
        let stream = self.watch_stream(
            "FetchX509SVID",
            caller,
            slot,
            view,
            move |snapshot| X509View::of(snapshot, &own, &selectors),
            X509View::to_response,
        );
        Ok(Response::new(stream))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_security_header(request.metadata())?;
        let slot = self.stream_slot()?;
        let caller = self.attest(&request, Wait::Ready).await?;
        let own = self.inner.trust_domain.clone();
        let selectors = caller.selectors().clone();
        let view = move |snapshot: &AgentSnapshot| {
            Visibility::of(snapshot, &own, &selectors).map(|visible| visible.x509_bundles(&snapshot.bundles, &own))
        };
        let Some(first) = view(&caller.snapshot) else {
            return Err(self.no_identity("FetchX509Bundles", &caller, None));
        };
        caller.verify_still_same()?;
        let stream = self.watch_stream("FetchX509Bundles", caller, slot, first, view, |bundles| {
            pb::X509BundlesResponse { crl: Vec::new(), bundles: bundles.clone().into_iter().collect() }
        });
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        check_security_header(request.metadata())?;
        let pb::JwtsvidRequest { audience, spiffe_id } = request.get_ref();
        check_audiences(audience)?;
        let requested = if spiffe_id.is_empty() {
            None
        } else {
            Some(
                SpiffeId::parse(spiffe_id)
                    .map_err(|err| Status::invalid_argument(format!("invalid requested SPIFFE ID: {err}")))?,
            )
        };
        let caller = self.attest(&request, Wait::Ready).await?;
        let entries = jwt_entries(&caller.snapshot, caller.selectors(), requested.as_ref());
        if entries.is_empty() {
            return Err(self.no_identity("FetchJWTSVID", &caller, requested.as_ref().map(SpiffeId::as_str)));
        }
        let mut svids = Vec::with_capacity(entries.len());
        for entry in &entries {
            let fetch = self.inner.jwt_source.fetch_jwt_svid(entry, audience);
            match tokio::time::timeout(self.inner.limits.jwt_timeout, fetch).await {
                Ok(Ok(svid)) => svids.push(pb::Jwtsvid {
                    spiffe_id: svid.spiffe_id.as_str().to_owned(),
                    svid: svid.token,
                    hint: if svid.hint.is_empty() { entry.hint.clone() } else { svid.hint },
                }),
                // The entry went away between the snapshot and the signing request.
                Ok(Err(JwtSvidError::UnknownEntry(id))) => {
                    tracing::debug!(entry = %id, "entry vanished while its JWT-SVID was requested");
                }
                Ok(Err(err @ JwtSvidError::Unavailable(_))) => {
                    tracing::warn!(entry = %entry.id, error = %err, "cannot fetch a JWT-SVID");
                    return Err(Status::unavailable(format!("cannot fetch a JWT-SVID for {}: {err}", entry.spiffe_id)));
                }
                Ok(Err(err)) => {
                    tracing::warn!(entry = %entry.id, error = %err, "cannot fetch a JWT-SVID");
                    return Err(Status::internal(format!("cannot fetch a JWT-SVID for {}: {err}", entry.spiffe_id)));
                }
                Err(_) => {
                    tracing::warn!(entry = %entry.id, "fetching a JWT-SVID timed out");
                    return Err(Status::unavailable(format!(
                        "cannot fetch a JWT-SVID for {}: the server did not answer in time",
                        entry.spiffe_id
                    )));
                }
            }
        }
        if svids.is_empty() {
            return Err(self.no_identity("FetchJWTSVID", &caller, requested.as_ref().map(SpiffeId::as_str)));
        }
        caller.verify_still_same()?;
        Ok(Response::new(pb::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_security_header(request.metadata())?;
        let slot = self.stream_slot()?;
        let caller = self.attest(&request, Wait::Ready).await?;
        let own = self.inner.trust_domain.clone();
        let selectors = caller.selectors().clone();
        let view = move |snapshot: &AgentSnapshot| {
            Visibility::of(snapshot, &own, &selectors).map(|visible| visible.jwt_bundles(&snapshot.bundles, &own))
        };
        let Some(first) = view(&caller.snapshot) else {
            return Err(self.no_identity("FetchJWTBundles", &caller, None));
        };
        caller.verify_still_same()?;
        let stream = self.watch_stream("FetchJWTBundles", caller, slot, first, view, |bundles| {
            pb::JwtBundlesResponse { bundles: bundles.clone().into_iter().collect() }
        });
        Ok(Response::new(stream))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        check_security_header(request.metadata())?;
        let pb::ValidateJwtsvidRequest { audience, svid } = request.get_ref();
        if audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let caller = self.attest(&request, Wait::Ready).await?;
        let own = &self.inner.trust_domain;
        // spec: validate against every bundle the caller may see. A caller without an entry
        // sees only its own trust domain's.
        let visible =
            Visibility::of(&caller.snapshot, own, caller.selectors()).unwrap_or_else(|| Visibility::own_only(own));
        let authorities = visible.jwt_authorities(&caller.snapshot.bundles);
        let validated = jwt::validate(svid, &authorities, std::slice::from_ref(audience), SystemTime::now())
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        caller.verify_still_same()?;
        let spiffe_id = validated.spiffe_id().as_str().to_owned();
        let audiences = validated.audience().iter().map(|aud| Json::String(aud.clone())).collect();
        let mut claims = validated.into_claims();
        // `aud` always as a list, whatever shape the token used.
        claims.insert("aud".to_owned(), Json::Array(audiences));
        Ok(Response::new(pb::ValidateJwtsvidResponse { spiffe_id, claims: Some(claims_to_struct(claims)) }))
    }

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented("fetching WIT-SVIDs is not implemented"))
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(request.metadata())?;
        Err(Status::unimplemented("fetching WIT bundles is not implemented"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_are_required_and_bounded() {
        assert_eq!(check_audiences(&[]).unwrap_err().message(), "audience must be specified");
        assert!(check_audiences(&[String::new()]).is_err());
        check_audiences(&["a".to_owned(), "b".to_owned()]).unwrap();
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| i.to_string()).collect();
        assert_eq!(check_audiences(&many).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
