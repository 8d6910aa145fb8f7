#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Envoy SDS v3 on the agent's Workload API socket, called by the test process itself (a real
//! peer: SO_PEERCRED, /proc, pidfd) through a client generated from Envoy's protos.

mod workload_api_harness;

use std::time::SystemTime;

use tessera_agent::sds::{SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME};
use tessera_spiffe::bundle::{Bundle, parse_pem_certificates};
use tessera_spiffe::x509::{X509Svid, verify_x509_svid};
use tessera_wire::envoy::config::core::v3::{DataSource, Node, data_source};
use tessera_wire::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
};
use tessera_wire::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};
use tessera_wire::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tessera_wire::google::rpc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use workload_api_harness::*;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

async fn sds_client(agent: &Agent) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(channel(&agent.socket).await)
}

fn request(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node { id: "envoy-1".into(), cluster: "test".into(), ..Node::default() }),
        resource_names: names.iter().map(|name| (*name).to_owned()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..DiscoveryRequest::default()
    }
}

/// A follow-up request answering `response` (an ACK when `error` is `None`).
fn answer(
    response: &DiscoveryResponse,
    accepted_version: &str,
    names: &[&str],
    error: Option<&str>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: accepted_version.to_owned(),
        response_nonce: response.nonce.clone(),
        error_detail: error.map(|message| rpc::Status { code: 3, message: message.to_owned(), details: Vec::new() }),
        node: None,
        ..request(names)
    }
}

/// An open `StreamSecrets` stream.
struct SdsStream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
}

impl SdsStream {
    async fn open(agent: &Agent, first: DiscoveryRequest) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(16);
        requests.send(first).await.unwrap();
        let mut client = sds_client(agent).await;
        let responses = tokio::time::timeout(DEADLINE, client.stream_secrets(ReceiverStream::new(rx)))
            .await
            .expect("no answer in time")?
            .into_inner();
        Ok(Self { requests, responses })
    }

    async fn send(&self, request: DiscoveryRequest) {
        self.requests.send(request).await.unwrap();
    }

    async fn next(&mut self) -> Result<DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(DEADLINE, self.responses.message()).await.expect("no response in time") {
            Ok(Some(response)) => Ok(response),
            Ok(None) => panic!("the stream ended without a response"),
            Err(status) => Err(status),
        }
    }
}

fn secrets(response: &DiscoveryResponse) -> Vec<Secret> {
    response
        .resources
        .iter()
        .map(|any| {
            assert_eq!(any.type_url, SECRET_TYPE_URL);
            any.to_msg::<Secret>().unwrap()
        })
        .collect()
}

fn names(response: &DiscoveryResponse) -> Vec<String> {
    secrets(response).into_iter().map(|secret| secret.name).collect()
}

fn inline(source: &Option<DataSource>) -> &[u8] {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(bytes)) => bytes,
        other => panic!("expected inline_bytes, got {other:?}"),
    }
}

fn tls(secret: &Secret) -> &TlsCertificate {
    match &secret.r#type {
        Some(secret::Type::TlsCertificate(tls)) => tls,
        other => panic!("{}: expected a tls_certificate, got {other:?}", secret.name),
    }
}

fn validation(secret: &Secret) -> &CertificateValidationContext {
    match &secret.r#type {
        Some(secret::Type::ValidationContext(context)) => context,
        other => panic!("{}: expected a validation_context, got {other:?}", secret.name),
    }
}

/// Checks a `tls_certificate` secret: PEM chain and PKCS#8 key that belong together, an
/// X.509-SVID for `spiffe_id` signed by `ca`. Returns the chain's DER.
fn check_svid(secret: &Secret, spiffe_id: &str, ca: &TestCa) -> Vec<u8> {
    let tls = tls(secret);
    let chain_pem = inline(&tls.certificate_chain);
    assert!(chain_pem.starts_with(b"-----BEGIN CERTIFICATE-----\n"));
    let chain = parse_pem_certificates(chain_pem).unwrap();
    let key = pem::parse(inline(&tls.private_key)).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    let parsed = X509Svid::parse(&chain.concat(), key.contents(), &ring::rand::SystemRandom::new()).unwrap();
    assert_eq!(parsed.spiffe_id().as_str(), spiffe_id);
    let bundle = Bundle::from_x509_authorities_der(td(spiffe_id_td(spiffe_id)), ca.der()).unwrap();
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    verify_x509_svid(&refs, &bundle, SystemTime::now()).unwrap();
    chain.concat()
}

fn spiffe_id_td(id: &str) -> &str {
    id.trim_start_matches("spiffe://").split('/').next().unwrap()
}

/// The SPIFFE validator's trust domains of a validation context: (bare name, CA DERs).
fn spiffe_validator(context: &CertificateValidationContext) -> Vec<(String, Vec<Vec<u8>>)> {
    assert!(context.trusted_ca.is_none());
    let validator = context.custom_validator_config.as_ref().expect("no custom validator");
    assert_eq!(validator.name, SPIFFE_VALIDATOR_NAME);
    let any = validator.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig");
    let config: SpiffeCertValidatorConfig = any.to_msg().unwrap();
    config
        .trust_domains
        .iter()
        .map(|td| (td.name.clone(), parse_pem_certificates(inline(&td.trust_bundle)).unwrap()))
        .collect()
}

/// An agent with two identities for this process (`/api` federating with the partner trust
/// domain, `/web`) and one for another uid.
async fn agent_with_identities() -> Agent {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    agent.add_identity(entry("api", "/api", &[&my_uid_selector()], &[FEDERATED]));
    agent.add_identity(entry("other", "/other", &[&other_uid_selector()], &[]));
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_resource_name_gets_its_secret_without_the_security_header() {
    let agent = agent_with_identities().await;
    let own_ca = vec![agent.trust.ca.der().to_vec()];
    let partner_ca = vec![agent.trust.federated_ca.der().to_vec()];

    // A SPIFFE ID the caller holds.
    let mut stream = SdsStream::open(&agent, request(&[WEB])).await.unwrap();
    let response = stream.next().await.unwrap();
    assert_eq!(response.type_url, SECRET_TYPE_URL);
    assert_eq!(response.version_info, "1");
    assert_eq!(response.nonce.len(), 8);
    assert!(response.nonce.bytes().all(|b| b.is_ascii_hexdigit()));
    let got = secrets(&response);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].name, WEB);
    check_svid(&got[0], WEB, &agent.trust.ca);

    let mut client = sds_client(&agent).await;
    let mut fetch = async |names: &[&str]| client.fetch_secrets(request(names)).await.map(tonic::Response::into_inner);

    // `default`: the first identity in the Workload API's order (`/api` before `/web`).
    let response = fetch(&["default"]).await.unwrap();
    let got = secrets(&response);
    assert_eq!(got[0].name, "default");
    check_svid(&got[0], API, &agent.trust.ca);

    // `ROOTCA` and the own trust domain ID: the own CA, through the SPIFFE validator.
    for name in ["ROOTCA", "spiffe://example.org"] {
        let got = secrets(&fetch(&[name]).await.unwrap());
        assert_eq!(got[0].name, name);
        assert_eq!(spiffe_validator(validation(&got[0])), [(TRUST_DOMAIN.to_owned(), own_ca.clone())]);
    }

    // A federated trust domain the caller's entries federate with.
    let got = secrets(&fetch(&["spiffe://partner.test"]).await.unwrap());
    assert_eq!(spiffe_validator(validation(&got[0])), [(FEDERATED.to_owned(), partner_ca.clone())]);

    // `ALL`: every trust domain the caller may see, sorted by name.
    let got = secrets(&fetch(&["ALL"]).await.unwrap());
    assert_eq!(got[0].name, "ALL");
    assert_eq!(
        spiffe_validator(validation(&got[0])),
        [(TRUST_DOMAIN.to_owned(), own_ca.clone()), (FEDERATED.to_owned(), partner_ca.clone())]
    );

    // No names: every bundle and every identity, named by ID.
    let response = fetch(&[]).await.unwrap();
    assert_eq!(names(&response), ["spiffe://example.org", "spiffe://partner.test", API, WEB]);
    // FetchSecrets answers are neither versioned nor nonce'd.
    assert_eq!(response.version_info, "");
    assert_eq!(response.nonce, "");

    // Several names in one request, in request order.
    let response = fetch(&[WEB, "ROOTCA", API]).await.unwrap();
    assert_eq!(names(&response), [WEB, "ROOTCA", API]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_the_caller_does_not_hold_are_invalid_argument() {
    let agent = agent_with_identities().await;
    let mut client = sds_client(&agent).await;
    for (names, expected) in [
        (vec!["spiffe://example.org/other"], r#"["spiffe://example.org/other"]"#),
        (vec![WEB, "spiffe://example.org/nobody"], r#"["spiffe://example.org/nobody"]"#),
        (vec!["spiffe://unknown.test"], r#"["spiffe://unknown.test"]"#),
    ] {
        let status = client.fetch_secrets(request(&names)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{names:?}: {status:?}");
        assert_eq!(status.message(), format!("workload is not authorized for the requested identities {expected}"));
    }
    let status = SdsStream::open(&agent, request(&["spiffe://example.org/other"])).await.err().unwrap();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("spiffe://example.org/other"), "{status:?}");

    // Malformed names and contradictory ones.
    for names in [vec!["spiffe://Example.org/x"], vec!["rootca"], vec!["ROOTCA", "ALL"]] {
        let status = client.fetch_secrets(request(&names)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{names:?}");
        assert!(status.message().starts_with("resource_names:"), "{status:?}");
    }

    // A caller without any entry holds no identity (but may see its trust domain's CAs).
    let agent = Agent::start().await;
    let mut client = sds_client(&agent).await;
    assert_eq!(client.fetch_secrets(request(&["default"])).await.unwrap_err().code(), Code::InvalidArgument);
    let response = client.fetch_secrets(request(&["ROOTCA"])).await.unwrap().into_inner();
    assert_eq!(names(&response), ["ROOTCA"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_bundle_changes_are_pushed_with_new_versions() {
    let agent = agent_with_identities().await;
    let mut stream = SdsStream::open(&agent, request(&[WEB])).await.unwrap();
    let first = stream.next().await.unwrap();
    let before = check_svid(&secrets(&first)[0], WEB, &agent.trust.ca);
    stream.send(answer(&first, &first.version_info, &[WEB], None)).await;

    // Another identity rotates (nothing to send here), then this one does: the next response
    // is version 2 with the new SVID.
    agent.rotate("other");
    agent.rotate("api");
    agent.rotate("web");
    let second = stream.next().await.unwrap();
    assert_eq!(second.version_info, "2");
    assert_ne!(second.nonce, first.nonce);
    let after = check_svid(&secrets(&second)[0], WEB, &agent.trust.ca);
    assert_ne!(after, before, "the rotated SVID was not sent");

    // A bundle change reaches an `ALL` subscription.
    let mut all = SdsStream::open(&agent, request(&["ALL"])).await.unwrap();
    let response = all.next().await.unwrap();
    assert_eq!(spiffe_validator(validation(&secrets(&response)[0])).len(), 2);
    let new_partner = TestCa::new(FEDERATED);
    agent.cache.update(|snapshot| {
        let mut bundles = (*snapshot.bundles).clone();
        let mut partner = Bundle::new(td(FEDERATED));
        partner.add_x509_authority(new_partner.der()).unwrap();
        bundles.insert_federated(partner).unwrap();
        snapshot.bundles = std::sync::Arc::new(bundles);
    });
    let pushed = all.next().await.unwrap();
    assert_eq!(pushed.version_info, "2");
    let domains = spiffe_validator(validation(&secrets(&pushed)[0]));
    assert_eq!(domains[1], (FEDERATED.to_owned(), vec![new_partner.der().to_vec()]));

    // The identity goes away for good: the stream ends with InvalidArgument.
    agent.remove_entry("web");
    let status = stream.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains(WEB), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_nacks_and_stale_nonces_follow_the_xds_protocol() {
    let agent = agent_with_identities().await;
    let mut stream = SdsStream::open(&agent, request(&[WEB])).await.unwrap();
    let first = stream.next().await.unwrap();
    assert_eq!(names(&first), [WEB]);

    // An ACK with the same names: nothing to send.
    stream.send(answer(&first, "1", &[WEB], None)).await;
    // A request with a nonce that is not the last one's is stale: ignored, even though it
    // names other resources.
    let mut stale = answer(&first, "1", &[API], None);
    stale.response_nonce = "0000beef".to_owned();
    stream.send(stale).await;
    // A NACK (error_detail set) with unchanged names: logged, nothing to send.
    stream.send(answer(&first, "", &[WEB], Some("Envoy rejected the certificate"))).await;
    // A request answering the last response with new names: a new response for them.
    stream.send(answer(&first, "1", &[API, "default"], None)).await;
    let second = stream.next().await.unwrap();
    assert_eq!(second.version_info, "2", "an ACK, stale request or NACK produced a response");
    assert_eq!(names(&second), [API, "default"]);

    // The stale request of an earlier response cannot change the subscription any more.
    stream.send(answer(&first, "1", &[WEB], None)).await;
    stream.send(answer(&second, "2", &[API, "default"], None)).await;
    agent.rotate("api");
    let third = stream.next().await.unwrap();
    assert_eq!(third.version_info, "3");
    assert_eq!(names(&third), [API, "default"]);

    // A follow-up naming an identity the caller does not hold ends the stream.
    stream.send(answer(&third, "3", &["spiffe://example.org/other"], None)).await;
    assert_eq!(stream.next().await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_urls_are_invalid_argument_and_delta_is_unimplemented() {
    let agent = agent_with_identities().await;
    let mut client = sds_client(&agent).await;
    let mut wrong = request(&[WEB]);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".to_owned();
    let status = client.fetch_secrets(wrong.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("type_url:"), "{status:?}");
    assert_eq!(SdsStream::open(&agent, wrong).await.err().unwrap().code(), Code::InvalidArgument);

    // An empty type URL means the Secret type.
    let mut empty = request(&[WEB]);
    empty.type_url.clear();
    assert_eq!(names(&client.fetch_secrets(empty).await.unwrap().into_inner()), [WEB]);

    let (tx, rx) = mpsc::channel(1);
    tx.send(DeltaDiscoveryRequest { type_url: SECRET_TYPE_URL.to_owned(), ..DeltaDiscoveryRequest::default() })
        .await
        .unwrap();
    let status = client.delta_secrets(ReceiverStream::new(rx)).await.err().unwrap();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_proxies_get_trusted_ca_and_no_all() {
    let agent = agent_with_identities().await;
    let mut client = sds_client(&agent).await;
    let mut legacy = request(&["ROOTCA"]);
    let metadata = prost_types::Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::BoolValue(true)) },
        )]
        .into_iter()
        .collect(),
    };
    legacy.node.as_mut().unwrap().metadata = Some(metadata);
    let got = secrets(&client.fetch_secrets(legacy.clone()).await.unwrap().into_inner());
    let context = validation(&got[0]);
    assert!(context.custom_validator_config.is_none());
    assert_eq!(parse_pem_certificates(inline(&context.trusted_ca)).unwrap(), [agent.trust.ca.der().to_vec()]);

    legacy.resource_names = vec!["ALL".to_owned()];
    let status = client.fetch_secrets(legacy).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "unable to use \"SPIFFE validator\" on Envoy below 1.17");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_with_unavailable_at_shutdown() {
    let mut agent = agent_with_identities().await;
    let mut stream = SdsStream::open(&agent, request(&[WEB])).await.unwrap();
    stream.next().await.unwrap();
    eventually("the SDS stream to count as open", || agent.api.open_streams() == 1).await;
    let stopping = tokio::spawn(async move {
        agent.stop().await.unwrap();
    });
    assert_eq!(stream.next().await.unwrap_err().code(), Code::Unavailable);
    drop(stream);
    tokio::time::timeout(DEADLINE, stopping).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_waits_for_an_svid_that_is_being_minted() {
    let agent = Agent::start().await;
    let web = entry("web", "/web", &[&my_uid_selector()], &[]);
    agent.add_entry_only(web.clone());
    let opening = {
        let socket = agent.socket.clone();
        tokio::spawn(async move {
            let (requests, rx) = mpsc::channel(1);
            requests.send(request(&[WEB])).await.unwrap();
            let mut client = SecretDiscoveryServiceClient::new(channel(&socket).await);
            let mut responses = client.stream_secrets(ReceiverStream::new(rx)).await?.into_inner();
            let first = responses.message().await?.expect("no response");
            drop(requests);
            Ok::<_, tonic::Status>(first)
        })
    };
    // The call is attested and waiting for the SVID when a cache subscriber appears.
    eventually("the stream to wait on the cache", || agent.cache.subscribers() > 0).await;
    let svid = agent.trust.ca.svid(&web.spiffe_id);
    agent.cache.update(|snapshot| {
        snapshot.insert_identity(tessera_agent::cache::Identity { entry: web, svid });
    });
    let first = tokio::time::timeout(DEADLINE, opening).await.unwrap().unwrap().unwrap();
    assert_eq!(first.version_info, "1");
    check_svid(&secrets(&first)[0], WEB, &agent.trust.ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_ups_without_a_node_keep_the_first_requests_node() {
    let agent = agent_with_identities().await;
    let mut legacy = request(&["ROOTCA"]);
    legacy.node.as_mut().unwrap().metadata = Some(prost_types::Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("true".into())) },
        )]
        .into_iter()
        .collect(),
    });
    let mut stream = SdsStream::open(&agent, legacy).await.unwrap();
    let first = stream.next().await.unwrap();
    assert!(validation(&secrets(&first)[0]).trusted_ca.is_some());
    // `answer` sends no node: the legacy mode of the first request still applies.
    stream.send(answer(&first, "1", &["ROOTCA", "spiffe://partner.test"], None)).await;
    let second = stream.next().await.unwrap();
    assert_eq!(names(&second), ["ROOTCA", "spiffe://partner.test"]);
    let partner = validation(&secrets(&second)[1]).clone();
    assert!(partner.custom_validator_config.is_none());
    assert_eq!(parse_pem_certificates(inline(&partner.trusted_ca)).unwrap(), [agent.trust.federated_ca.der().to_vec()]);
}
