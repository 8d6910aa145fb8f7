#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! gRPC service names and method paths of the generated code.
//!
//! Standard clients (SPIFFE libraries, Envoy) address methods by path, so these must be exact.
//! Each round-trip test drives the generated client into the generated server in process,
//! recording the HTTP/2 `:path` the client used on the way.

use std::sync::{Arc, Mutex};

use tessera_wire::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tessera_wire::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tessera_wire::envoy::service::secret::v3::secret_discovery_service_server::{
    self as sds_server, SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use tessera_wire::tessera::{admin, agent};
use tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_wire::workload::spiffe_workload_api_server::{
    self as workload_server, SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tessera_wire::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest, WitsvidResponse,
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse,
};
use tonic::codegen::tokio_stream::{self, Empty};
use tonic::codegen::{Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

/// Forwards requests to `inner`, remembering each request's path.
#[derive(Clone)]
struct PathRecorder<S> {
    inner: S,
    paths: Arc<Mutex<Vec<String>>>,
}

impl<S> PathRecorder<S> {
    fn new(inner: S) -> Self {
        Self { inner, paths: Arc::default() }
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

impl<S, B> Service<http::Request<B>> for PathRecorder<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        self.paths.lock().unwrap().push(req.uri().path().to_owned());
        self.inner.call(req)
    }
}

type EmptyStream<T> = Empty<Result<T, Status>>;

/// A Workload API that answers `FetchJWTSVID` and nothing else.
struct FakeWorkloadApi;

#[tonic::async_trait]
impl SpiffeWorkloadApi for FakeWorkloadApi {
    type FetchX509SVIDStream = EmptyStream<X509svidResponse>;
    type FetchX509BundlesStream = EmptyStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = EmptyStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = EmptyStream<WitsvidResponse>;
    type FetchWITBundlesStream = EmptyStream<WitBundlesResponse>;

    async fn fetch_x509svid(&self, _: Request<X509svidRequest>) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_x509_bundles(
        &self,
        _: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_jwtsvid(&self, request: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: "spiffe://example.org/web".to_owned(),
                svid: request.audience.join(","),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn validate_jwtsvid(
        &self,
        _: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_witsvid(&self, _: Request<WitsvidRequest>) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("test"))
    }
}

/// An SDS server that answers `FetchSecrets` and nothing else.
struct FakeSds;

#[tonic::async_trait]
impl SecretDiscoveryService for FakeSds {
    type DeltaSecretsStream = EmptyStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = EmptyStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn stream_secrets(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }

    async fn fetch_secrets(&self, request: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let request = request.into_inner();
        Ok(Response::new(DiscoveryResponse {
            type_url: request.type_url,
            version_info: request.resource_names.join(","),
            ..Default::default()
        }))
    }
}

#[test]
fn workload_api_service_name_has_no_package() {
    assert_eq!(workload_server::SERVICE_NAME, "SpiffeWorkloadAPI");
    assert_eq!(<SpiffeWorkloadApiServer<FakeWorkloadApi> as NamedService>::NAME, "SpiffeWorkloadAPI");
}

#[test]
fn workload_api_method_paths_are_standard() {
    let generated = include_str!("../src/gen/_.rs");
    for method in [
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
        "FetchWITSVID",
        "FetchWITBundles",
    ] {
        let path = format!("\"/SpiffeWorkloadAPI/{method}\"");
        // Once in the client, once in the server's router.
        assert_eq!(generated.matches(&path).count(), 2, "method path {path} not found in client and server");
    }
}

#[tokio::test]
async fn workload_api_round_trip_uses_standard_path() {
    let recorder = PathRecorder::new(SpiffeWorkloadApiServer::new(FakeWorkloadApi));
    let mut client = SpiffeWorkloadApiClient::new(recorder.clone());

    let response = client
        .fetch_jwtsvid(JwtsvidRequest { audience: vec!["a".to_owned(), "b".to_owned()], spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner();

    assert_eq!(response.svids.len(), 1);
    assert_eq!(response.svids[0].svid, "a,b");
    assert_eq!(recorder.paths(), ["/SpiffeWorkloadAPI/FetchJWTSVID"]);

    let status = client.validate_jwtsvid(ValidateJwtsvidRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(recorder.paths()[1..], ["/SpiffeWorkloadAPI/ValidateJWTSVID"]);
}

#[test]
fn sds_service_name_is_envoys() {
    assert_eq!(sds_server::SERVICE_NAME, "envoy.service.secret.v3.SecretDiscoveryService");
    assert_eq!(
        <SecretDiscoveryServiceServer<FakeSds> as NamedService>::NAME,
        "envoy.service.secret.v3.SecretDiscoveryService"
    );
}

#[tokio::test]
async fn sds_round_trip_uses_envoy_paths() {
    let recorder = PathRecorder::new(SecretDiscoveryServiceServer::new(FakeSds));
    let mut client = SecretDiscoveryServiceClient::new(recorder.clone());

    let type_url = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let response = client
        .fetch_secrets(DiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names: vec!["ROOTCA".to_owned(), "default".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.type_url, type_url);
    assert_eq!(response.version_info, "ROOTCA,default");

    let mut stream =
        client.stream_secrets(tokio_stream::iter([DiscoveryRequest::default()])).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_none());

    assert_eq!(
        recorder.paths(),
        [
            "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
            "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        ]
    );
}

#[test]
fn tessera_service_names_are_versioned() {
    assert_eq!(agent::v1::agent_service_server::SERVICE_NAME, "tessera.agent.v1.AgentService");
    assert_eq!(admin::v1::admin_service_server::SERVICE_NAME, "tessera.admin.v1.AdminService");
}
