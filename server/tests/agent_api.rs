#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The agent API end to end: a real in-process server, real TLS, a test agent built from
//! tonic + tokio-rustls + the SPIFFE verifiers. Spec: server-agent-flow §2-6, §9.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::*;
use tessera_server::datastore::NodeSerials;
use tessera_spiffe::x509::verify_x509_svid;
use tessera_wire::tessera::agent::v1 as pb;
use tonic::Code;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use pb::sync_entries_response::Event;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap()
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// URI and DNS SANs of a DER certificate, and its lifetime in seconds.
fn inspect(der: &[u8]) -> (Vec<String>, Vec<String>, i64) {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::DNSName(d) => dns.push((*d).to_owned()),
                _ => {}
            }
        }
    }
    let v = cert.validity();
    (uris, dns, v.not_after.timestamp() - v.not_before.timestamp())
}

async fn sync(client: &mut Client, revision: u64) -> Result<tonic::Streaming<pb::SyncEntriesResponse>, tonic::Status> {
    client.sync_entries(pb::SyncEntriesRequest { revision }).await.map(tonic::Response::into_inner)
}

async fn batch(
    client: &mut Client,
    items: Vec<(String, Vec<u8>)>,
) -> Result<Vec<pb::NewX509SvidResult>, tonic::Status> {
    let params = items.into_iter().map(|(entry_id, csr)| pb::NewX509SvidParams { entry_id, csr }).collect();
    client.batch_new_x509_svid(pb::BatchNewX509SvidRequest { params }).await.map(|r| r.into_inner().results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attestation_issues_the_agent_svid_and_records_the_node() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let agent = attest(&server, "tok1").await;

    assert_eq!(agent.id.as_str(), "spiffe://example.org/tessera/agent/join_token/tok1");
    // The SVID verifies against the bundle returned with it and names the agent, not the CSR.
    let bundle = bundle(&server);
    let chain: Vec<&[u8]> = agent.chain.iter().map(Vec::as_slice).collect();
    let verified = verify_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id(), &agent.id);
    let (uris, dns, lifetime) = inspect(&agent.chain[0]);
    assert_eq!(uris, vec![agent.id.to_string()]);
    assert!(dns.is_empty(), "{dns:?}");
    assert!((3600..=3611).contains(&lifetime), "agent_ttl 1h, got {lifetime}");
    let returned = agent.result.bundle.as_ref().unwrap();
    assert_eq!(returned.x509_authorities.len(), bundle.x509_authorities().len());
    assert_eq!(agent.result.selectors.len(), 1);
    assert_eq!(agent.result.selectors[0].r#type, "spiffe_id");

    let node = store(&server).get_attested_node(&agent.id).unwrap().unwrap();
    assert_eq!(node.attestation_type, "join_token");
    assert_eq!(node.serial, tessera_spiffe::tls::certificate_serial_hex(&agent.chain[0]).unwrap());
    assert!(!node.banned);
    // The token is gone.
    assert!(store(&server).consume_join_token("tok1", 0).is_err());

    // The agent's SVID is accepted on an authenticated call.
    let mut client = agent.client.clone();
    let response = client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap().into_inner();
    assert_eq!(response.bundle.unwrap().trust_domain, TD);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_attests_exactly_once_under_concurrency() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    join_token(&store(&server), "race", 600);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut client = connect(server.agent_api_addr(), bundle(&server), None).await;
        tasks.push(tokio::spawn(async move { attest_call(&mut client, "race").await.map(|_| ()) }));
    }
    let mut ok = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(status) => assert!(matches!(status.code(), Code::PermissionDenied | Code::AlreadyExists), "{status:?}"),
        }
    }
    assert_eq!(ok, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_expired_and_malformed_attestations_are_refused() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut client = connect(server.agent_api_addr(), bundle(&server), None).await;

    let status = attest_call(&mut client, "never-issued").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    join_token(&store(&server), "old", -10);
    let status = attest_call(&mut client, "old").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("expired"), "{status:?}");

    // A malformed CSR does not burn the token.
    join_token(&store(&server), "keep", 600);
    let params = pb::AttestationParams {
        data: Some(pb::AttestationData { r#type: "join_token".into(), payload: b"keep".to_vec() }),
        csr: b"not a csr".to_vec(),
    };
    let message = pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) };
    let status = client.attest_agent(tokio_stream::iter(vec![message])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("csr"), "{status:?}");
    // Unknown attestor.
    let params = pb::AttestationParams {
        data: Some(pb::AttestationData { r#type: "x509pop".into(), payload: b"keep".to_vec() }),
        csr: key_and_csr().1,
    };
    let message = pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) };
    let status = client.attest_agent(tokio_stream::iter(vec![message])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Nothing was written: no node, and the token still works.
    assert!(attest_call(&mut client, "keep").await.is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_agent_is_refused_on_calls_streams_and_attestation() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "b1").await;
    let mut stream = sync(&mut agent.client, 0).await.unwrap();
    read_initial(&mut stream).await;

    store(&server).ban_attested_node(&agent.id).unwrap();
    // The open stream ends with PermissionDenied.
    let started = Instant::now();
    let status = loop {
        match next_event(&mut stream, 20).await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // Every later call too.
    let status = agent.client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = sync(&mut agent.client, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // Attesting again as the same agent (the token re-issued) is refused, and the token kept.
    join_token(&store(&server), "b1", 600);
    let mut anonymous = connect(server.agent_api_addr(), bundle(&server), None).await;
    let status = attest_call(&mut anonymous, "b1").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("banned"), "{status:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_agent_is_refused() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "e1").await;
    store(&server).delete_attested_node(&agent.id).unwrap();
    let status = agent.client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = sync(&mut agent.client, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_hands_over_the_serial_and_retires_the_old_svid() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "r1").await;
    let old_serial = store(&server).get_attested_node(&agent.id).unwrap().unwrap().serial;

    let (key, csr) = key_and_csr();
    let renewed = agent.client.renew_agent(pb::RenewAgentRequest { csr }).await.unwrap().into_inner().svid.unwrap();
    assert_eq!(renewed.spiffe_id, agent.id.to_string());
    let (uris, dns, _) = inspect(&renewed.cert_chain[0]);
    assert_eq!(uris, vec![agent.id.to_string()]);
    assert!(dns.is_empty());
    let new_serial = tessera_spiffe::tls::certificate_serial_hex(&renewed.cert_chain[0]).unwrap();
    let node = store(&server).get_attested_node(&agent.id).unwrap().unwrap();
    assert_eq!(node.serial, old_serial);
    assert_eq!(node.new_serial.as_deref(), Some(new_serial.as_str()));

    // Until the new SVID is used, the old one still works.
    agent.client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap();
    // First use of the new SVID makes it current...
    let new_key = key.serialize_der();
    let mut new_client = connect(server.agent_api_addr(), bundle(&server), Some((&renewed.cert_chain, &new_key))).await;
    new_client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap();
    let node = store(&server).get_attested_node(&agent.id).unwrap().unwrap();
    assert_eq!(node.serial, new_serial);
    assert_eq!(node.new_serial, None);
    // ... and the old one is refused from then on, on a new connection as on the old one.
    let status = agent.client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let mut old_again = connect(server.agent_api_addr(), bundle(&server), Some((&agent.chain, &agent.key))).await;
    let status = sync(&mut old_again, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    new_client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap();

    // A malformed renewal CSR is refused and changes nothing.
    let status = new_client.renew_agent(pb::RenewAgentRequest { csr: vec![0x30, 0x03, 1, 2, 3] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(store(&server).get_attested_node(&agent.id).unwrap().unwrap().new_serial, None);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_a_valid_agent_svid_are_refused() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let agent = attest(&server, "u1").await;
    entry(&store(&server), "w1", "/w1", &agent.id, &["unix:uid:1"]);

    let mut anonymous = connect(server.agent_api_addr(), bundle(&server), None).await;
    let status = sync(&mut anonymous, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = batch(&mut anonymous, vec![("w1".into(), key_and_csr().1)]).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = anonymous
        .new_jwt_svid(pb::NewJwtSvidRequest { entry_id: "w1".into(), audiences: vec!["a".into()] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    let status = anonymous.renew_agent(pb::RenewAgentRequest { csr: key_and_csr().1 }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A workload SVID of the same CA is a valid SVID but not an agent.
    let key = rcgen::KeyPair::generate().unwrap();
    let workload = server
        .state()
        .ca()
        .sign_x509_svid(
            &id("/w1"),
            &[],
            Duration::from_secs(600),
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            SystemTime::now(),
        )
        .unwrap();
    let mut impostor =
        connect(server.agent_api_addr(), bundle(&server), Some((&workload.chain, &key.serialize_der()))).await;
    let status = sync(&mut impostor, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A client certificate from another CA does not get through the handshake.
    let other_dir = tempdir();
    let other = start_memory(other_dir.path()).await;
    let stranger = attest(&other, "s1").await;
    let result = try_connect(server.agent_api_addr(), bundle(&server), Some((&stranger.chain, &stranger.key))).await;
    match result {
        Err(_) => {}
        Ok(mut client) => {
            let status = client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
            assert!(
                matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
                "{status:?}"
            );
        }
    }
    // The agent does not accept a server of another trust domain's CA either.
    assert!(try_connect(server.agent_api_addr(), bundle(&other), None).await.is_err());
    other.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_sends_snapshot_then_changes_as_they_happen() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "s1").await;
    let other = attest(&server, "s2").await;
    let store = store(&server);
    entry(&store, "mine", "/mine", &agent.id, &["unix:uid:1"]);
    entry(&store, "theirs", "/theirs", &other.id, &["unix:uid:1"]);

    let mut stream = sync(&mut agent.client, 0).await.unwrap();
    let (ids, pages, revision) = read_initial(&mut stream).await;
    assert_eq!(ids, vec!["mine"]);
    assert_eq!(pages, 1);
    assert_eq!(revision, store.current_revision().unwrap());

    // A new entry reaches the agent well under a second.
    let created_at = Instant::now();
    let created = entry(&store, "new", "/new", &agent.id, &["unix:uid:2"]);
    let event = next_event(&mut stream, 10).await.unwrap();
    let elapsed = created_at.elapsed();
    let Event::EntryUpserted(upserted) = event else { panic!("expected an upsert, got {event:?}") };
    assert_eq!(upserted.entry.as_ref().unwrap().id, "new");
    assert_eq!(upserted.entry.as_ref().unwrap().spiffe_id, "spiffe://example.org/new");
    assert_eq!(upserted.revision, created.revision);
    assert!(elapsed < Duration::from_secs(1), "propagation took {elapsed:?}");

    // Another agent's entry is not sent; the next event is the deletion.
    entry(&store, "theirs2", "/theirs2", &other.id, &["unix:uid:1"]);
    store.delete_entry("new").unwrap();
    let event = next_event(&mut stream, 10).await.unwrap();
    let Event::EntryDeleted(deleted) = event else { panic!("expected a deletion, got {event:?}") };
    assert_eq!(deleted.entry_id, "new");
    // The server reads the revision before the entries, so a change can be reported with the
    // revision of the wake-up that saw it (here possibly the other agent's write just before):
    // a lower bound, and replaying from it is harmless.
    assert!(deleted.revision > created.revision, "{} <= {}", deleted.revision, created.revision);
    assert!(deleted.revision <= store.current_revision().unwrap());

    // Reconnecting at the current revision: bundles and synced, no snapshot.
    let mut again = sync(&mut agent.client, store.current_revision().unwrap()).await.unwrap();
    let (ids, pages, _) = read_initial(&mut again).await;
    assert!(ids.is_empty() && pages == 0);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_aliases_and_descendants_are_synced_and_paged() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "a1").await;
    let other = attest(&server, "a2").await;
    let store = store(&server);
    let server_id = id("/tessera/server");
    let node_selector = format!("spiffe_id:{}", agent.id);
    entry(&store, "alias", "/cluster", &server_id, &[&node_selector]);
    entry(&store, "alias-child", "/cluster/db", &id("/cluster"), &["unix:uid:5"]);
    entry(&store, "alias-grandchild", "/cluster/db/side", &id("/cluster/db"), &["unix:uid:6"]);
    let other_selector = format!("spiffe_id:{}", other.id);
    entry(&store, "other-alias", "/other-cluster", &server_id, &[&other_selector]);
    entry(&store, "other-alias-child", "/other-cluster/db", &id("/other-cluster"), &["unix:uid:5"]);
    for i in 0..450 {
        entry(&store, &format!("bulk{i:03}"), &format!("/bulk/{i}"), &agent.id, &["unix:uid:7"]);
    }

    let mut stream = sync(&mut agent.client, 0).await.unwrap();
    let (ids, pages, _) = read_initial(&mut stream).await;
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 452);
    assert!(ids.contains(&"alias-child".to_owned()));
    assert!(ids.contains(&"alias-grandchild".to_owned()));
    assert!(!ids.iter().any(|id| id.starts_with("other") || id == "alias"), "{:?}", &ids[..5]);

    // Deleting the alias takes its descendants out of the set.
    store.delete_entry("alias").unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next_event(&mut stream, 10).await.unwrap() {
            Event::EntryDeleted(d) => deleted.push(d.entry_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    deleted.sort();
    assert_eq!(deleted, vec!["alias-child", "alias-grandchild"]);

    // Signing follows the same set: the other agent's alias child is not authorized.
    let results = batch(&mut agent.client, vec![("other-alias-child".into(), key_and_csr().1)]).await.unwrap();
    assert!(
        matches!(&results[0].result, Some(pb::new_x509_svid_result::Result::Error(e)) if e.code == Code::NotFound as i32)
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svids_take_identity_and_ttl_from_the_entry() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "x1").await;
    let other = attest(&server, "x2").await;
    let store = store(&server);
    let mut web = tessera_server::datastore::RegistrationEntry::new(
        "web",
        id("/web"),
        agent.id.clone(),
        tessera_spiffe::SelectorSet::parse_all(&["unix:uid:1"]).unwrap(),
    );
    web.dns_names = vec!["web.example.org".into()];
    web.x509_svid_ttl = Some(Duration::from_secs(120));
    store.create_entry(&web).unwrap();
    entry(&store, "default-ttl", "/default", &agent.id, &["unix:uid:2"]);
    entry(&store, "theirs", "/theirs", &other.id, &["unix:uid:1"]);

    let results = batch(
        &mut agent.client,
        vec![
            ("web".into(), key_and_csr().1),
            ("default-ttl".into(), key_and_csr().1),
            ("theirs".into(), key_and_csr().1),
            ("nope".into(), key_and_csr().1),
            ("web".into(), b"garbage".to_vec()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(results.len(), 5);
    let svid = |i: usize| match &results[i].result {
        Some(pb::new_x509_svid_result::Result::Svid(svid)) => svid.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let error = |i: usize| match &results[i].result {
        Some(pb::new_x509_svid_result::Result::Error(e)) => e.clone(),
        other => panic!("item {i}: {other:?}"),
    };
    let web_svid = svid(0);
    let (uris, dns, lifetime) = inspect(&web_svid.cert_chain[0]);
    assert_eq!(uris, vec!["spiffe://example.org/web".to_owned()]);
    assert_eq!(dns, vec!["web.example.org".to_owned()]);
    assert!((120..=131).contains(&lifetime), "{lifetime}");
    let chain: Vec<&[u8]> = web_svid.cert_chain.iter().map(Vec::as_slice).collect();
    verify_x509_svid(&chain, &bundle(&server), SystemTime::now()).unwrap();
    assert!((web_svid.expires_at - now_secs() - 120).abs() <= 5);
    let (_, _, lifetime) = inspect(&svid(1).cert_chain[0]);
    assert!((3600..=3611).contains(&lifetime), "default_x509_svid_ttl, got {lifetime}");
    assert_eq!(results[2].entry_id, "theirs");
    assert_eq!(error(2).code, Code::NotFound as i32);
    assert_eq!(error(2).message, "entry not found or not authorized");
    assert_eq!(error(3).code, Code::NotFound as i32);
    assert_eq!(error(4).code, Code::InvalidArgument as i32);

    // Oversized batch: refused as a whole.
    let csr = key_and_csr().1;
    let items = (0..501).map(|_| ("web".to_owned(), csr.clone())).collect();
    let status = batch(&mut agent.client, items).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("500"), "{status:?}");
    server.shutdown().await.unwrap();
}

/// A batch large enough to be signed on several threads (one per core, see
/// `signing_threads`) answers every item in request order, with each refusal at its own
/// position: the valid items carry their own entry's SPIFFE ID, so an item answered in another's place shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_signed_on_several_threads_answers_every_item_in_request_order() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "order").await;
    let store = store(&server);
    const ITEMS: usize = 64;
    for i in 0..ITEMS {
        entry(&store, &format!("e{i}"), &format!("/w{i}"), &agent.id, &["unix:uid:1"]);
    }
    let csr = key_and_csr().1;
    // Every fifth item is unauthorized, every seventh has a bad CSR, one is oversized.
    let expected = |i: usize| match i {
        _ if i % 5 == 3 => Err(Code::NotFound),
        _ if i % 7 == 1 || i == ITEMS - 1 => Err(Code::InvalidArgument),
        _ => Ok(format!("spiffe://example.org/w{i}")),
    };
    let items = (0..ITEMS)
        .map(|i| match i {
            _ if i % 5 == 3 => (format!("missing{i}"), csr.clone()),
            _ if i % 7 == 1 => (format!("e{i}"), format!("garbage {i}").into_bytes()),
            _ if i == ITEMS - 1 => (format!("e{i}"), vec![0x30; 64 * 1024]),
            _ => (format!("e{i}"), csr.clone()),
        })
        .collect::<Vec<_>>();
    let ids: Vec<String> = items.iter().map(|(entry_id, _)| entry_id.clone()).collect();
    for round in 0..3 {
        let results = batch(&mut agent.client, items.clone()).await.unwrap();
        assert_eq!(results.len(), ITEMS, "round {round}");
        for (i, result) in results.iter().enumerate() {
            assert_eq!(result.entry_id, ids[i], "round {round}: item {i} out of place");
            match (expected(i), &result.result) {
                (Ok(uri), Some(pb::new_x509_svid_result::Result::Svid(svid))) => {
                    assert_eq!(inspect(&svid.cert_chain[0]).0, vec![uri], "round {round}: item {i}");
                }
                (Err(code), Some(pb::new_x509_svid_result::Result::Error(error))) => {
                    assert_eq!(error.code, code as i32, "round {round}: item {i}: {error:?}");
                }
                (wanted, got) => panic!("round {round}: item {i}: wanted {wanted:?}, got {got:?}"),
            }
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_lifetimes_never_outlive_the_ca() {
    let dir = tempdir();
    let config = tessera_server::config::ServerConfig { ca_ttl: Duration::from_secs(7200), ..config(dir.path()) };
    let server = start_memory_with(config).await;
    let mut agent = attest(&server, "c1").await;
    let store = store(&server);
    let mut long = tessera_server::datastore::RegistrationEntry::new(
        "long",
        id("/long"),
        agent.id.clone(),
        tessera_spiffe::SelectorSet::parse_all(&["unix:uid:1"]).unwrap(),
    );
    long.x509_svid_ttl = Some(Duration::from_secs(100 * 3600));
    store.create_entry(&long).unwrap();
    let results = batch(&mut agent.client, vec![("long".into(), key_and_csr().1)]).await.unwrap();
    let Some(pb::new_x509_svid_result::Result::Svid(svid)) = &results[0].result else { panic!("{results:?}") };
    let ca_not_after =
        server.state().ca().x509_authority_not_after().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(svid.expires_at <= ca_not_after, "{} > {ca_not_after}", svid.expires_at);
    let (_, cert) = X509Certificate::from_der(&svid.cert_chain[0]).unwrap();
    assert!(cert.validity().not_after.timestamp() <= ca_not_after);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_need_an_authorized_entry_and_an_audience() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "j1").await;
    let other = attest(&server, "j2").await;
    let store = store(&server);
    entry(&store, "api", "/api", &agent.id, &["unix:uid:1"]);
    entry(&store, "theirs", "/theirs", &other.id, &["unix:uid:1"]);

    let status = agent
        .client
        .new_jwt_svid(pb::NewJwtSvidRequest { entry_id: "api".into(), audiences: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("audience"), "{status:?}");
    let status = agent
        .client
        .new_jwt_svid(pb::NewJwtSvidRequest { entry_id: "theirs".into(), audiences: vec!["db".into()] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let response = agent
        .client
        .new_jwt_svid(pb::NewJwtSvidRequest { entry_id: "api".into(), audiences: vec!["db".into(), "cache".into()] })
        .await
        .unwrap()
        .into_inner();
    let claims = tessera_spiffe::jwt::validate(&response.token, &bundle(&server), &["db"], SystemTime::now()).unwrap();
    assert_eq!(claims.spiffe_id().as_str(), "spiffe://example.org/api");
    assert!((response.expires_at - now_secs() - 300).abs() <= 5, "default_jwt_svid_ttl 5m");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svid_batches_check_every_item_on_its_own() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "jb1").await;
    let other = attest(&server, "jb2").await;
    let store = store(&server);
    entry(&store, "api", "/api", &agent.id, &["unix:uid:1"]);
    entry(&store, "web", "/web", &agent.id, &["unix:uid:2"]);
    entry(&store, "theirs", "/theirs", &other.id, &["unix:uid:1"]);
    let item = |entry_id: &str, audiences: &[&str]| pb::NewJwtSvidRequest {
        entry_id: entry_id.into(),
        audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
    };
    let params = vec![
        item("api", &["db"]),
        item("theirs", &["db"]),
        item("web", &[]),
        item("web", &["cache", "db"]),
        item("missing", &["db"]),
    ];
    let results =
        agent.client.batch_new_jwt_svid(pb::BatchNewJwtSvidRequest { params }).await.unwrap().into_inner().results;
    let outcome: Vec<(String, Result<String, i32>)> = results
        .into_iter()
        .map(|result| {
            let outcome = match result.result.unwrap() {
                pb::new_jwt_svid_result::Result::Svid(svid) => Ok(svid.token),
                pb::new_jwt_svid_result::Result::Error(status) => Err(status.code),
            };
            (result.entry_id, outcome)
        })
        .collect();
    let ids: Vec<&str> = outcome.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["api", "theirs", "web", "web", "missing"], "one result per item, in order");
    assert_eq!(outcome[1].1, Err(Code::NotFound as i32), "another agent's entry");
    assert_eq!(outcome[2].1, Err(Code::InvalidArgument as i32), "no audience");
    assert_eq!(outcome[4].1, Err(Code::NotFound as i32), "unknown entry");
    for (index, (spiffe_id, audience)) in
        [(0, ("spiffe://example.org/api", "db")), (3, ("spiffe://example.org/web", "cache"))]
    {
        let token = outcome[index].1.as_ref().unwrap();
        let claims = tessera_spiffe::jwt::validate(token, &bundle(&server), &[audience], SystemTime::now()).unwrap();
        assert_eq!(claims.spiffe_id().as_str(), spiffe_id);
    }

    let too_many = vec![item("api", &["db"]); tessera_server::agent_api::MAX_BATCH + 1];
    let status = agent.client.batch_new_jwt_svid(pb::BatchNewJwtSvidRequest { params: too_many }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.shutdown().await.unwrap();
}

/// A batch large enough to be signed on several threads answers every item once, in request
/// order, each refused or signed on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_jwt_svid_batch_keeps_request_order() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "jb3").await;
    let store = store(&server);
    entry(&store, "api", "/api", &agent.id, &["unix:uid:1"]);
    entry(&store, "web", "/web", &agent.id, &["unix:uid:2"]);
    let params: Vec<pb::NewJwtSvidRequest> = (0..96)
        .map(|i| match i % 4 {
            0 => pb::NewJwtSvidRequest { entry_id: "api".into(), audiences: vec![format!("aud-{i}")] },
            1 => pb::NewJwtSvidRequest { entry_id: "web".into(), audiences: vec![format!("aud-{i}")] },
            2 => pb::NewJwtSvidRequest { entry_id: "missing".into(), audiences: vec![format!("aud-{i}")] },
            _ => pb::NewJwtSvidRequest { entry_id: "api".into(), audiences: Vec::new() },
        })
        .collect();
    let results = agent
        .client
        .batch_new_jwt_svid(pb::BatchNewJwtSvidRequest { params: params.clone() })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), params.len(), "one result per item");
    let bundle = bundle(&server);
    for (i, (result, asked)) in results.into_iter().zip(&params).enumerate() {
        assert_eq!(result.entry_id, asked.entry_id, "item {i} out of order");
        match (i % 4, result.result.unwrap()) {
            (0 | 1, pb::new_jwt_svid_result::Result::Svid(svid)) => {
                let audience = format!("aud-{i}");
                let claims =
                    tessera_spiffe::jwt::validate(&svid.token, &bundle, &[audience.as_str()], SystemTime::now())
                        .unwrap();
                let path = if i % 4 == 0 { "/api" } else { "/web" };
                assert_eq!(claims.spiffe_id().as_str(), format!("spiffe://example.org{path}"), "item {i}");
            }
            (2, pb::new_jwt_svid_result::Result::Error(status)) => {
                assert_eq!(status.code, Code::NotFound as i32, "item {i}")
            }
            (3, pb::new_jwt_svid_result::Result::Error(status)) => {
                assert_eq!(status.code, Code::InvalidArgument as i32, "item {i}")
            }
            (_, other) => panic!("item {i}: unexpected {other:?}"),
        }
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_or_eviction_refuses_the_next_call_on_a_connection_that_was_just_served() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let store = store(&server);
    for (name, revoke) in [("nb1", "ban"), ("nb2", "evict")] {
        let mut agent = attest(&server, name).await;
        entry(&store, &format!("{name}-api"), &format!("/{name}"), &agent.id, &["unix:uid:1"]);
        let request = || pb::NewJwtSvidRequest { entry_id: format!("{name}-api"), audiences: vec!["db".into()] };
        // Served twice: the second call reuses what the connection remembered.
        agent.client.new_jwt_svid(request()).await.unwrap();
        agent.client.new_jwt_svid(request()).await.unwrap();
        if revoke == "ban" {
            store.ban_attested_node(&agent.id).unwrap();
        } else {
            store.delete_attested_node(&agent.id).unwrap();
        }
        let status = agent.client.new_jwt_svid(request()).await.unwrap_err();
        let expected = if revoke == "ban" { Code::PermissionDenied } else { Code::Unauthenticated };
        assert_eq!(status.code(), expected, "{revoke}: {status:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_ca_nodes_and_entries() {
    let dir = tempdir();
    let server = tessera_server::server::start(config(dir.path())).await.unwrap();
    let mut agent = attest(&server, "p1").await;
    entry(&store(&server), "kept", "/kept", &agent.id, &["unix:uid:1"]);
    let bundle_before = bundle(&server);
    // A sync stream is open when the server stops: its task must let go of the datastore
    // before `shutdown` returns, so the restart below can open it at once.
    let mut open_stream = sync(&mut agent.client, 0).await.unwrap();
    read_initial(&mut open_stream).await;
    server.shutdown().await.unwrap();

    let server = tessera_server::server::start(config(dir.path())).await.unwrap();
    drop(open_stream);
    assert_eq!(bundle(&server).x509_authorities_der(), bundle_before.x509_authorities_der());
    // The agent's cached bundle still authenticates the restarted server, and its SVID is
    // still accepted.
    let mut client = connect(server.agent_api_addr(), bundle_before, Some((&agent.chain, &agent.key))).await;
    let mut stream = sync(&mut client, 0).await.unwrap();
    let (ids, _, _) = read_initial(&mut stream).await;
    assert_eq!(ids, vec!["kept"]);
    drop(stream);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "d1").await;
    let mut stream = sync(&mut agent.client, 0).await.unwrap();
    read_initial(&mut stream).await;
    tokio::time::timeout(Duration::from_secs(20), server.shutdown()).await.unwrap().unwrap();
    match tokio::time::timeout(Duration::from_secs(20), stream.message()).await.unwrap() {
        Err(status) => {
            assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled), "{status:?}")
        }
        Ok(None) => {}
        Ok(Some(message)) => panic!("unexpected {message:?}"),
    }
}

/// `update_attested_node_serials` is what the handover relies on; a renewal issued while the
/// node was banned cannot be handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serials_cannot_be_handed_over_on_a_banned_node() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let agent = attest(&server, "h1").await;
    let store = store(&server);
    let node = store.get_attested_node(&agent.id).unwrap().unwrap();
    store
        .update_attested_node_serials(
            &agent.id,
            &node.serial,
            &NodeSerials { serial: node.serial.clone(), new_serial: Some("abcd".into()), expires_at: node.expires_at },
        )
        .unwrap();
    store.ban_attested_node(&agent.id).unwrap();
    let mut client = agent.client.clone();
    let status = client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_follow_the_entries_and_their_updates() {
    let dir = tempdir();
    let server = start_memory(dir.path()).await;
    let mut agent = attest(&server, "f1").await;
    let store = store(&server);
    let other_td = tessera_spiffe::TrustDomain::new("other.org").unwrap();
    let unrelated_td = tessera_spiffe::TrustDomain::new("unrelated.org").unwrap();
    let mut federated = tessera_spiffe::bundle::Bundle::new(other_td.clone());
    federated.add_x509_authority(bundle(&server).x509_authorities().next().unwrap()).unwrap();
    store.set_bundle(&other_td, federated.to_json().as_bytes(), None).unwrap();
    let mut unrelated = tessera_spiffe::bundle::Bundle::new(unrelated_td.clone());
    unrelated.add_x509_authority(bundle(&server).x509_authorities().next().unwrap()).unwrap();
    store.set_bundle(&unrelated_td, unrelated.to_json().as_bytes(), None).unwrap();

    let mut web = tessera_server::datastore::RegistrationEntry::new(
        "web",
        id("/web"),
        agent.id.clone(),
        tessera_spiffe::SelectorSet::parse_all(&["unix:uid:1"]).unwrap(),
    );
    web.federates_with = vec![other_td.clone()];
    store.create_entry(&web).unwrap();

    let fetched = agent.client.fetch_bundle(pb::FetchBundleRequest {}).await.unwrap().into_inner();
    let own = fetched.bundle.unwrap();
    assert_eq!(own.trust_domain, TD);
    tessera_spiffe::bundle::Bundle::from_json(tessera_spiffe::TrustDomain::new(TD).unwrap(), &own.spiffe_bundle)
        .unwrap();
    let names: Vec<_> = fetched.federated_bundles.iter().map(|b| b.trust_domain.as_str()).collect();
    assert_eq!(names, vec!["other.org"]);

    let mut stream = sync(&mut agent.client, 0).await.unwrap();
    let Event::Bundles(first) = next_event(&mut stream, 20).await.unwrap() else { panic!("bundles first") };
    let names: Vec<_> = first.federated_bundles.iter().map(|b| b.trust_domain.as_str()).collect();
    assert_eq!(names, vec!["other.org"]);
    let first_sequence = first.federated_bundles[0].sequence;
    loop {
        if let Event::Synced(_) = next_event(&mut stream, 20).await.unwrap() {
            break;
        }
    }
    // The federated bundle changes: the open stream gets the new set of bundles.
    let mut changed = federated.clone();
    changed.set_refresh_hint(Some(Duration::from_secs(60)));
    store.set_bundle(&other_td, changed.to_json().as_bytes(), None).unwrap();
    let Event::Bundles(update) = next_event(&mut stream, 20).await.unwrap() else { panic!("expected bundles") };
    assert_eq!(update.federated_bundles.len(), 1);
    assert!(update.federated_bundles[0].sequence > first_sequence);
    assert_eq!(update.federated_bundles[0].refresh_hint_seconds, 60);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_agent_svid_is_refused() {
    let dir = tempdir();
    let config = tessera_server::config::ServerConfig { agent_ttl: Duration::from_secs(2), ..config(dir.path()) };
    let server = start_memory_with(config).await;
    let mut agent = attest(&server, "exp").await;
    let expires_at = agent.result.svid.as_ref().unwrap().expires_at;
    // The connection was made while the SVID was valid; once it expires, calls on it are
    // refused. Poll with a deadline: expiry is the event waited for.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        match agent.client.fetch_bundle(pb::FetchBundleRequest {}).await {
            Ok(_) => {
                assert!(Instant::now() < deadline, "SVID still accepted long after expiry");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => break status,
        }
    };
    assert!(now_secs() >= expires_at, "refused before the SVID expired: {status:?}");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // A new connection with it fails at the handshake or on the call.
    if let Ok(mut client) =
        try_connect(server.agent_api_addr(), bundle(&server), Some((&agent.chain, &agent.key))).await
    {
        assert!(client.fetch_bundle(pb::FetchBundleRequest {}).await.is_err());
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_bind_address_fails_start_up_with_a_clear_error() {
    let dir = tempdir();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config =
        tessera_server::config::ServerConfig { bind_address: taken.local_addr().unwrap(), ..config(dir.path()) };
    let err = start_memory_try(config).await.unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with("bind_address 127.0.0.1:"), "{message}");
    // Nothing was left listening: the admin socket was not created.
    assert!(!dir.path().join("private/admin.sock").exists());
}
