//! Overload protection on the agent API (issue 5): the per-agent signing rate limit
//! (`agent_svid_rate_limit`) answers excess with the retryable `RESOURCE_EXHAUSTED`, per agent,
//! over real mTLS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use tessera_server::agent_api::MAX_BATCH;
use tessera_wire::tessera::agent::v1 as pb;
use tonic::Code;

fn batch(items: usize) -> pb::BatchNewX509SvidRequest {
    let (_, csr) = common::key_and_csr();
    pb::BatchNewX509SvidRequest {
        params: (0..items).map(|i| pb::NewX509SvidParams { entry_id: format!("e{i}"), csr: csr.clone() }).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_rate_limit_answers_resource_exhausted() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let config = tessera_server::config::ServerConfig { agent_svid_rate_limit: 1, ..common::config(dir.path()) };
    let server = common::start_memory_with(config).await;
    let mut a = common::attest(&server, "tok-a").await;
    let mut b = common::attest(&server, "tok-b").await;

    // A full batch fits the bucket (capacity max(rate, MAX_BATCH)); the items are refused
    // individually (unknown entries) but the call is served.
    let served = a.client.batch_new_x509_svid(batch(MAX_BATCH)).await.unwrap().into_inner();
    assert_eq!(served.results.len(), MAX_BATCH);
    // The next call of the same agent exceeds its rate.
    let status = a.client.batch_new_x509_svid(batch(2)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("agent_svid_rate_limit"), "{}", status.message());
    // Another agent has its own bucket.
    b.client.batch_new_x509_svid(batch(1)).await.unwrap();
    server.shutdown().await.unwrap();
}
