#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Workload API on a real Unix socket, called by the test process itself (a real peer:
//! SO_PEERCRED, /proc, pidfd), through raw tonic clients.

mod workload_api_harness;

use std::io::Write as _;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tessera_agent::workload_api::{ServeError, WorkloadApiLimits, bind_socket};
use tessera_spiffe::bundle::{Bundle, split_der_certificates};
use tessera_spiffe::jwt;
use tessera_spiffe::x509::{X509Svid, verify_x509_svid};
use tessera_wire::workload as pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use workload_api_harness::*;

async fn first<T>(stream: &mut tonic::Streaming<T>) -> Result<T, tonic::Status> {
    match tokio::time::timeout(DEADLINE, stream.message()).await.expect("no message in time") {
        Ok(Some(message)) => Ok(message),
        Ok(None) => panic!("stream ended without a message"),
        Err(status) => Err(status),
    }
}

async fn fetch_x509(agent: &Agent) -> Result<tonic::Streaming<pb::X509svidResponse>, tonic::Status> {
    let mut client = raw_client(&agent.socket).await;
    client.fetch_x509svid(with_header(pb::X509svidRequest {})).await.map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_security_header_is_invalid_argument() {
    let agent = Agent::start().await;
    agent.add_identity(entry("e1", "/me", &[&my_uid_selector()], &[]));
    let mut client = raw_client(&agent.socket).await;

    let status = client.fetch_x509svid(pb::X509svidRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");
    let status = client.fetch_x509_bundles(pb::X509BundlesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client.fetch_jwt_bundles(pb::JwtBundlesRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let request = pb::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: String::new() };
    assert_eq!(client.fetch_jwtsvid(request).await.unwrap_err().code(), Code::InvalidArgument);
    let request = pb::ValidateJwtsvidRequest { audience: "a".into(), svid: "x.y.z".into() };
    assert_eq!(client.validate_jwtsvid(request).await.unwrap_err().code(), Code::InvalidArgument);

    let mut wrong = tonic::Request::new(pb::X509svidRequest {});
    wrong.metadata_mut().insert("workload.spiffe.io", "True".parse().unwrap());
    let status = client.fetch_x509svid(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // With the header, the same client is served.
    let mut stream = client.fetch_x509svid(with_header(pb::X509svidRequest {})).await.unwrap().into_inner();
    assert_eq!(first(&mut stream).await.unwrap().svids.len(), 1);
}

/// A `tracing` writer into a shared buffer, to read the "no identity" log line.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn unregistered_caller_gets_permission_denied_and_a_log_line_explaining_why() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let agent = Agent::start().await;
    let other = other_uid_selector();
    agent.add_identity(entry("not-mine", "/someone-else", &[&other], &[]));

    let status = fetch_x509(&agent).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");

    let mut client = raw_client(&agent.socket).await;
    let status = client.fetch_x509_bundles(with_header(pb::X509BundlesRequest {})).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = client.fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {})).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let request = pb::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: String::new() };
    let status = client.fetch_jwtsvid(with_header(request)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text.lines().find(|line| line.contains("no identity issued")).expect("no log line");
    assert!(line.contains(&format!("pid={}", std::process::id())), "{line}");
    assert!(line.contains(&my_uid_selector()), "{line}");
    assert!(line.contains(&format!("entry not-mine (spiffe://example.org/someone-else): missing {other}")), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_stream_follows_rotation_new_entries_and_ends_when_identity_is_gone() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    // Another workload's identity: changes to it must not produce messages here.
    agent.add_identity(entry("other", "/other", &[&other_uid_selector()], &[]));
    let mut stream = fetch_x509(&agent).await.unwrap();

    let message = first(&mut stream).await.unwrap();
    assert_eq!(message.svids.len(), 1);
    let svid = &message.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/web");
    let parsed = X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key, &ring::rand::SystemRandom::new()).unwrap();
    let bundle = Bundle::from_x509_authorities_der(td(TRUST_DOMAIN), &svid.bundle).unwrap();
    let chain: Vec<&[u8]> = split_der_certificates(&svid.x509_svid).unwrap();
    let verified = verify_x509_svid(&chain, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id(), parsed.spiffe_id());

    agent.rotate("other");
    agent.rotate("web");
    let rotated = first(&mut stream).await.unwrap();
    assert_eq!(rotated.svids.len(), 1);
    assert_ne!(rotated.svids[0].x509_svid, svid.x509_svid, "the rotated SVID was not sent");

    agent.add_identity(entry("api", "/api", &[&my_uid_selector()], &[]));
    let added = first(&mut stream).await.unwrap();
    let ids: Vec<&str> = added.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/api", "spiffe://example.org/web"]);

    agent.remove_entry("api");
    assert_eq!(first(&mut stream).await.unwrap().svids.len(), 1);
    agent.remove_entry("web");
    let status = first(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_only_for_entries_that_federate() {
    let agent = Agent::start().await;
    agent.add_identity(entry("plain", "/plain", &[&my_uid_selector()], &[]));
    let mut stream = fetch_x509(&agent).await.unwrap();
    let message = first(&mut stream).await.unwrap();
    assert!(message.federated_bundles.is_empty());
    let mut client = raw_client(&agent.socket).await;
    let mut bundles = client.fetch_x509_bundles(with_header(pb::X509BundlesRequest {})).await.unwrap().into_inner();
    let x509 = first(&mut bundles).await.unwrap();
    assert_eq!(x509.bundles.keys().collect::<Vec<_>>(), ["spiffe://example.org"]);
    assert_eq!(x509.bundles["spiffe://example.org"], agent.trust.ca.der());

    agent.add_identity(entry("fed", "/fed", &[&my_uid_selector()], &[FEDERATED]));
    let message = first(&mut stream).await.unwrap();
    assert_eq!(message.federated_bundles.keys().collect::<Vec<_>>(), ["spiffe://partner.test"]);
    assert_eq!(message.federated_bundles["spiffe://partner.test"], agent.trust.federated_ca.der());
    let x509 = first(&mut bundles).await.unwrap();
    let mut keys: Vec<&String> = x509.bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://partner.test"]);

    // The federation ends: the next messages omit the trust domain.
    agent.remove_entry("fed");
    assert!(first(&mut stream).await.unwrap().federated_bundles.is_empty());
    assert_eq!(first(&mut bundles).await.unwrap().bundles.len(), 1);

    // The JWT bundle of the own trust domain is a JWKS with the signing key.
    let mut jwt_bundles = client.fetch_jwt_bundles(with_header(pb::JwtBundlesRequest {})).await.unwrap().into_inner();
    let jwks = first(&mut jwt_bundles).await.unwrap();
    let own = Bundle::from_jwt_jwks(td(TRUST_DOMAIN), &jwks.bundles["spiffe://example.org"]).unwrap();
    assert!(own.jwt_authority_by_key_id(JWT_KEY_ID).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_need_an_audience_and_an_entitled_id() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut client = raw_client(&agent.socket).await;

    let empty = pb::JwtsvidRequest { audience: Vec::new(), spiffe_id: String::new() };
    let status = client.fetch_jwtsvid(with_header(empty)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "audience must be specified"));
    let bad = pb::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: "not-an-id".into() };
    let status = client.fetch_jwtsvid(with_header(bad)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("invalid requested SPIFFE ID"), "{}", status.message());
    let foreign = pb::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: "spiffe://example.org/db".into() };
    let status = client.fetch_jwtsvid(with_header(foreign)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "no identity issued"));

    let good = pb::JwtsvidRequest { audience: vec!["a".into(), "b".into()], spiffe_id: String::new() };
    let response = client.fetch_jwtsvid(with_header(good)).await.unwrap().into_inner();
    assert_eq!(response.svids.len(), 1);
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");
    let validated = jwt::validate(&response.svids[0].svid, &agent.trust.bundles(), &["b"], SystemTime::now()).unwrap();
    assert_eq!(validated.audience(), ["a", "b"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_jwt_svid_reports_the_reason() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut client = raw_client(&agent.socket).await;
    let request = pb::JwtsvidRequest { audience: vec!["svc".into()], spiffe_id: String::new() };
    let token = client.fetch_jwtsvid(with_header(request)).await.unwrap().into_inner().svids.remove(0).svid;

    let validate = |audience: &str, svid: &str| {
        with_header(pb::ValidateJwtsvidRequest { audience: audience.to_owned(), svid: svid.to_owned() })
    };
    let status = client.validate_jwtsvid(validate("", &token)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "audience must be specified"));
    let status = client.validate_jwtsvid(validate("svc", "")).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::InvalidArgument, "svid must be specified"));
    let status = client.validate_jwtsvid(validate("svc", "garbage")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("unable to parse JWT token"), "{}", status.message());
    let status = client.validate_jwtsvid(validate("other", &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("expected audience in [\"other\"]"), "{}", status.message());

    let response = client.validate_jwtsvid(validate("svc", &token)).await.unwrap().into_inner();
    assert_eq!(response.spiffe_id, "spiffe://example.org/web");
    let claims = response.claims.unwrap().fields;
    use prost_types::value::Kind;
    assert_eq!(claims["sub"].kind, Some(Kind::StringValue("spiffe://example.org/web".into())));
    assert!(matches!(&claims["aud"].kind, Some(Kind::ListValue(list)) if list.values.len() == 1));
    assert!(matches!(claims["exp"].kind, Some(Kind::NumberValue(exp)) if exp > 1.0e9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wit_rpcs_are_unimplemented() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut client = raw_client(&agent.socket).await;
    let status = client.fetch_witsvid(with_header(pb::WitsvidRequest { spiffe_id: String::new() })).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Unimplemented, "fetching WIT-SVIDs is not implemented"));
    let status = client.fetch_wit_bundles(with_header(pb::WitBundlesRequest {})).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_wait_for_the_first_sync_then_give_up_with_unavailable() {
    let limits = WorkloadApiLimits { ready_timeout: Duration::from_millis(300), ..WorkloadApiLimits::default() };
    let agent = Agent::start_with(limits, false).await;
    let status = fetch_x509(&agent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("first sync"), "{}", status.message());

    // The sync completes while a call waits: the call is answered.
    let limits = WorkloadApiLimits { ready_timeout: DEADLINE, ..WorkloadApiLimits::default() };
    let agent = Agent::start_with(limits, false).await;
    let socket = agent.socket.clone();
    let waiting = tokio::spawn(async move {
        let mut client = raw_client(&socket).await;
        let mut stream = client.fetch_x509svid(with_header(pb::X509svidRequest {})).await?.into_inner();
        stream.message().await
    });
    eventually("the call to wait on the cache", || agent.cache.subscribers() == 1).await;
    // The entry is synced first and its SVID minted later: the call waits for both.
    let web = entry("web", "/web", &[&my_uid_selector()], &[]);
    agent.add_entry_only(web.clone());
    agent.cache.update(|snapshot| snapshot.ready = true);
    let svid = agent.trust.ca.svid(&web.spiffe_id);
    agent.cache.update(|snapshot| snapshot.insert_identity(tessera_agent::cache::Identity { entry: web, svid }));
    let message = tokio::time::timeout(DEADLINE, waiting).await.unwrap().unwrap().unwrap().unwrap();
    assert_eq!(message.svids[0].spiffe_id, "spiffe://example.org/web");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_abandoned_streams_do_not_hurt_other_callers() {
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let baseline = agent.cache.subscribers();

    // Not HTTP/2: the server closes the connection.
    let mut raw = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\xff garbage \xfe").await.unwrap();
    let mut sink = Vec::new();
    tokio::time::timeout(DEADLINE, raw.read_to_end(&mut sink)).await.expect("connection not closed").ok();

    // A valid preface followed by garbage frames.
    let mut raw = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff").await.unwrap();
    tokio::time::timeout(DEADLINE, raw.read_to_end(&mut sink)).await.expect("connection not closed").ok();

    // A client that disconnects mid-stream.
    {
        let mut stream = fetch_x509(&agent).await.unwrap();
        first(&mut stream).await.unwrap();
        assert_eq!(agent.cache.subscribers(), baseline + 1);
    }
    eventually("the abandoned stream to be dropped", || agent.cache.subscribers() == baseline).await;

    // A client that cancels one stream (RST_STREAM) and keeps its connection.
    let mut client = raw_client(&agent.socket).await;
    {
        let mut stream = client.fetch_x509svid(with_header(pb::X509svidRequest {})).await.unwrap().into_inner();
        first(&mut stream).await.unwrap();
        assert_eq!(agent.cache.subscribers(), baseline + 1);
    }
    eventually("the cancelled stream to be dropped", || agent.cache.subscribers() == baseline).await;
    let mut stream = client.fetch_x509svid(with_header(pb::X509svidRequest {})).await.unwrap().into_inner();
    first(&mut stream).await.unwrap();
    drop(stream);
    // An oversized request is refused without reading it into a message.
    let mut client = raw_client(&agent.socket).await;
    let huge = pb::ValidateJwtsvidRequest { audience: "a".into(), svid: "x".repeat(100 * 1024) };
    let status = client.validate_jwtsvid(with_header(huge)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);

    // A half-open connection: connected, never speaks.
    let _silent = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();

    let mut stream = fetch_x509(&agent).await.unwrap();
    assert_eq!(first(&mut stream).await.unwrap().svids.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_open_and_close_without_leaks() {
    const CONNECTIONS: usize = 10;
    const STREAMS_PER_CONNECTION: usize = 100;
    raise_open_file_limit();
    let agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let baseline = agent.cache.subscribers();

    let mut streams = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = raw_client(&agent.socket).await;
        let mut opening = Vec::new();
        for _ in 0..STREAMS_PER_CONNECTION {
            let mut client = client.clone();
            opening.push(tokio::spawn(async move {
                let mut stream = client.fetch_x509svid(with_header(pb::X509svidRequest {})).await?.into_inner();
                let message = stream.message().await?;
                Ok::<_, tonic::Status>((stream, message))
            }));
        }
        for task in opening {
            let (stream, message) = tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
            assert_eq!(message.unwrap().svids.len(), 1);
            streams.push(stream);
        }
    }
    assert_eq!(agent.cache.subscribers(), baseline + CONNECTIONS * STREAMS_PER_CONNECTION);
    assert_eq!(agent.api.open_streams(), CONNECTIONS * STREAMS_PER_CONNECTION);

    // Every open stream sees a rotation.
    agent.rotate("web");
    for stream in streams.iter_mut().step_by(97) {
        assert_eq!(first(stream).await.unwrap().svids.len(), 1);
    }

    drop(streams);
    eventually("every stream to be dropped", || agent.cache.subscribers() == baseline).await;
    eventually("every stream slot to be released", || agent.api.open_streams() == 0).await;
    let mut stream = fetch_x509(&agent).await.unwrap();
    assert_eq!(first(&mut stream).await.unwrap().svids.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_streams_are_refused_with_unavailable() {
    let limits = WorkloadApiLimits { max_open_streams: 2, ..WorkloadApiLimits::default() };
    let agent = Agent::start_with(limits, true).await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut a = fetch_x509(&agent).await.unwrap();
    let mut b = fetch_x509(&agent).await.unwrap();
    first(&mut a).await.unwrap();
    first(&mut b).await.unwrap();
    let status = fetch_x509(&agent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop(a);
    eventually("a stream slot to be released", || agent.api.open_streams() == 1).await;
    let mut c = fetch_x509(&agent).await.unwrap();
    first(&mut c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_and_removes_nothing_it_does_not_own() {
    let mut agent = Agent::start().await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut stream = fetch_x509(&agent).await.unwrap();
    first(&mut stream).await.unwrap();
    agent.stop().await.unwrap();
    let status = first(&mut stream).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    eventually("the stream to be dropped", || agent.cache.subscribers() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_world_accessible_in_a_0755_directory_and_stale_sockets_are_replaced() {
    let dir = tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap();
    let socket = dir.path().join("a").join("b").join("api.sock");
    let listener = bind_socket(&socket).unwrap();
    let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o777);
    assert_eq!(mode(socket.parent().unwrap()), 0o755);

    // A live listener is not replaced.
    assert!(matches!(bind_socket(&socket), Err(ServeError::InUse { .. })));
    drop(listener);
    // A stale one is.
    assert!(std::fs::symlink_metadata(&socket).unwrap().file_type().is_socket());
    let _listener = bind_socket(&socket).unwrap();

    // A regular file is never removed.
    let file = dir.path().join("file.sock");
    std::fs::File::create(&file).unwrap().write_all(b"keep").unwrap();
    let err = bind_socket(&file).unwrap_err();
    assert!(matches!(err, ServeError::NotASocket { .. }));
    assert!(err.to_string().contains("is not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");

    // serve() removes its socket at shutdown.
    let agent = Agent::start().await;
    let path = dir.path().join("served.sock");
    let api = agent.api.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served_path = path.clone();
    let task = tokio::spawn(async move {
        api.serve(&served_path, async {
            let _ = rx.await;
        })
        .await
    });
    eventually("the socket to be bound", || path.exists()).await;
    tx.send(()).unwrap();
    tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap().unwrap();
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_after_the_handshake_timeout() {
    let limits = WorkloadApiLimits { handshake_timeout: Duration::from_millis(200), ..WorkloadApiLimits::default() };
    let agent = Agent::start_with(limits, true).await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut silent = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let mut sink = Vec::new();
    // (The server's own HTTP/2 SETTINGS frame arrives first.)
    tokio::time::timeout(DEADLINE, silent.read_to_end(&mut sink)).await.expect("silent connection kept open").ok();

    // Control: with the default timeout (10 s) the same connection stays open for a while.
    let patient = Agent::start().await;
    let mut silent = tokio::net::UnixStream::connect(&patient.socket).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(500), silent.read_to_end(&mut sink)).await;
    assert!(read.is_err(), "the connection was closed without a short handshake timeout");
    // Clients that speak at once are unaffected, also after the timeout.
    let mut stream = fetch_x509(&agent).await.unwrap();
    first(&mut stream).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    agent.rotate("web");
    first(&mut stream).await.unwrap();
}

/// The first message of a fresh connection's `FetchX509SVID`, without unwrapping anything.
async fn try_fetch(socket: &std::path::Path) -> Result<pb::X509svidResponse, String> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|err| err.to_string())?;
    let mut client = tessera_wire::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let mut stream =
        client.fetch_x509svid(with_header(pb::X509svidRequest {})).await.map_err(|s| s.to_string())?.into_inner();
    stream.message().await.map_err(|s| s.to_string())?.ok_or_else(|| "no message".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uid_cannot_take_every_connection_slot() {
    let limits = WorkloadApiLimits { max_connections_per_uid: 2, ..WorkloadApiLimits::default() };
    let agent = Agent::start_with(limits, true).await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut a = fetch_x509(&agent).await.unwrap();
    let mut b = fetch_x509(&agent).await.unwrap();
    first(&mut a).await.unwrap();
    first(&mut b).await.unwrap();

    // A third connection of the same uid is closed at once, before the handshake timeout.
    let mut third = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    // (It may already be closed when the preface is written.)
    let _ = third.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut sink))
        .await
        .expect("the connection over the limit was kept")
        .ok();
    assert!(try_fetch(&agent.socket).await.is_err());

    drop(a);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match try_fetch(&agent.socket).await {
            Ok(message) => {
                assert_eq!(message.svids.len(), 1);
                break;
            }
            Err(err) => assert!(tokio::time::Instant::now() < deadline, "no slot came free: {err}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // `b` was kept open the whole time.
    agent.rotate("web");
    first(&mut b).await.unwrap();
}

/// The pid is reused by another process between attestation and answer (simulated with the
/// attestor's fake process table): the caller gets Unavailable, never the identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_when_the_pid_names_another_process_by_then() {
    use tessera_agent::attestor::{FakeProcessInspector, ProcessFacts, UnixAttestor};
    let fake = FakeProcessInspector::new();
    let me = std::process::id();
    let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
    fake.set_process(me, ProcessFacts::new(uid, gid));
    let attestor = UnixAttestor::with_inspector(Arc::new(fake.clone()), 1);
    let agent = Agent::start_with_attestor(WorkloadApiLimits::default(), true, attestor).await;
    agent.add_identity(entry("web", "/web", &[&my_uid_selector()], &[]));
    let mut client = raw_client(&agent.socket).await;
    let request = || with_header(pb::JwtsvidRequest { audience: vec!["a".into()], spiffe_id: String::new() });
    assert_eq!(client.fetch_jwtsvid(request()).await.unwrap().into_inner().svids.len(), 1);

    let reuse = fake.clone();
    *agent.jwt_source.during_next_fetch.lock().unwrap() =
        Some(Box::new(move || reuse.set_process(me, ProcessFacts::new(uid, gid))));
    let status = client.fetch_jwtsvid(request()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().starts_with("workload attestation failed: "), "{}", status.message());
    assert!(status.message().contains("no longer the process that was attested"), "{}", status.message());

    // A caller that is gone before it is attested is not answered either.
    fake.exit(me);
    let status = fetch_x509(&agent).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("is gone"), "{}", status.message());
}
