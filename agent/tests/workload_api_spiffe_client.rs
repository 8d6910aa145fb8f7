#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Wire compatibility: the Rust SPIFFE client library (crate `spiffe`), unmodified, against the
//! agent's Workload API socket. It adds the security header, parses and checks every message
//! the way a third-party workload would.

mod workload_api_harness;

use futures_util::StreamExt as _;
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient, WorkloadApiError};
use workload_api_harness::*;

async fn client(agent: &Agent) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix://{}", agent.socket.display())).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_x509_svids_and_bundles() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[FEDERATED]));
    agent.add_identity(entry("api", "/api", &[&my_uid_selector()], &[]));
    let client = client(&agent).await;

    // The default identity is the first in the response: sorted by SPIFFE ID.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/api");
    let all = client.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|svid| svid.spiffe_id().to_string()).collect();
    assert_eq!(ids, ["spiffe://example.org/api", "spiffe://example.org/web"]);

    let own = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let partner = TrustDomain::new(FEDERATED).unwrap();
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let own_bundle = bundles.get(&own).expect("no bundle of the own trust domain");
    assert_eq!(own_bundle.authorities()[0].as_bytes(), agent.trust.ca.der());
    assert_eq!(bundles.get(&partner).unwrap().authorities()[0].as_bytes(), agent.trust.federated_ca.der());

    let context = client.fetch_x509_context().await.unwrap();
    assert_eq!(context.svids().len(), 2);
    assert!(context.bundle_set().get(&partner).is_some(), "federated bundle missing from the X.509 context");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_fetches_and_validates_jwt_svids() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let client = client(&agent).await;

    let svid = client.fetch_jwt_svid(["service-a"], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.audience(), ["service-a"]);

    // Local validation with the JWT bundles from the Workload API.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    let validated = JwtSvid::parse_and_validate(svid.token(), &bundles, &["service-a"]).unwrap();
    assert_eq!(validated.spiffe_id(), svid.spiffe_id());
    assert!(JwtSvid::parse_and_validate(svid.token(), &bundles, &["service-b"]).is_err());

    // Validation by the agent.
    let checked = client.validate_jwt_token("service-a", svid.token()).await.unwrap();
    assert_eq!(checked.spiffe_id(), svid.spiffe_id());
    let err = client.validate_jwt_token("service-b", svid.token()).await.unwrap_err();
    assert!(err.to_string().contains("expected audience"), "{err}");

    // A requested SPIFFE ID the caller is not entitled to.
    let other = spiffe::SpiffeId::new("spiffe://example.org/db").unwrap();
    let err = client.fetch_jwt_svid(["service-a"], Some(&other)).await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spiffe_crate_sees_rotations_on_its_stream_and_no_identity_as_such() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let client = client(&agent).await;
    let mut contexts = client.stream_x509_contexts().await.unwrap();
    let first = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    let before = first.default_svid().unwrap().leaf().as_bytes().to_vec();

    agent.rotate("web");
    let second = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap().unwrap();
    assert_ne!(second.default_svid().unwrap().leaf().as_bytes(), before.as_slice());

    agent.remove_entry("web");
    let ended = tokio::time::timeout(DEADLINE, contexts.next()).await.unwrap().unwrap();
    assert!(matches!(ended, Err(WorkloadApiError::NoIdentityIssued)), "{ended:?}");

    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(matches!(err, WorkloadApiError::NoIdentityIssued), "{err:?}");
}
