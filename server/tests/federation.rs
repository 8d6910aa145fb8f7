//! SPIFFE federation between real servers in-process (two trust domains, sled datastores,
//! real HTTPS bundle endpoints on 127.0.0.1), and relationships against a hostile endpoint
//! this test controls: garbage, a bundle of the wrong trust domain, oversized and endless
//! bodies, HTTP errors, the wrong TLS identity. Fetches are triggered with the relationship's
//! `refresh` (the same code path as the scheduled fetch), so no test waits for a timer.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tessera_server::config::{
    BundleEndpointConfig, BundleEndpointProfile, FederatesWithConfig, FederationConfig, ServerConfig,
};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::Bundle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("t").tempdir_in("/tmp").unwrap()
}

fn config(
    dir: &Path,
    trust_domain: &str,
    endpoint: Option<SocketAddr>,
    federates_with: Vec<FederatesWithConfig>,
) -> ServerConfig {
    ServerConfig {
        trust_domain: td(trust_domain),
        data_dir: dir.join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("private/admin.sock"),
        federation: FederationConfig {
            bundle_endpoint: BundleEndpointConfig { bind_address: endpoint, ..BundleEndpointConfig::default() },
            federates_with,
        },
        ..ServerConfig::default()
    }
}

fn spiffe_relationship(trust_domain: &str, addr: SocketAddr, bootstrap: Option<PathBuf>) -> FederatesWithConfig {
    FederatesWithConfig {
        trust_domain: td(trust_domain),
        bundle_endpoint_url: format!("https://{addr}/"),
        profile: BundleEndpointProfile::HttpsSpiffe,
        endpoint_spiffe_id: Some(format!("spiffe://{trust_domain}/tessera/server")),
        trust_bundle_path: bootstrap,
        ca_bundle_path: None,
    }
}

fn web_relationship(trust_domain: &str, url: String, ca_file: &Path) -> FederatesWithConfig {
    FederatesWithConfig {
        trust_domain: td(trust_domain),
        bundle_endpoint_url: url,
        profile: BundleEndpointProfile::HttpsWeb,
        endpoint_spiffe_id: None,
        trust_bundle_path: None,
        ca_bundle_path: Some(ca_file.to_path_buf()),
    }
}

/// Writes `server`'s bundle (SPIFFE JSON) to `path`, the operator's bootstrap file.
fn write_bundle(server: &RunningServer, path: &Path) -> PathBuf {
    std::fs::write(path, server.state().ca().bundle().to_json()).unwrap();
    path.to_path_buf()
}

/// The bundle `server` stores for `trust_domain`, with the datastore's sequence.
fn stored(server: &RunningServer, trust_domain: &str) -> Option<Bundle> {
    let record = server.state().datastore().get_bundle(&td(trust_domain)).unwrap()?;
    let mut bundle = Bundle::from_json(td(trust_domain), &record.data).unwrap();
    bundle.set_sequence(record.sequence);
    Some(bundle)
}

fn same_authorities(a: &Bundle, b: &Bundle) -> bool {
    let mut left: Vec<&[u8]> = a.x509_authorities().collect();
    let mut right: Vec<&[u8]> = b.x509_authorities().collect();
    left.sort();
    right.sort();
    left == right && a.jwt_authorities() == b.jwt_authorities()
}

async fn refresh(server: &RunningServer, trust_domain: &str) -> Result<Bundle, String> {
    tokio::time::timeout(Duration::from_secs(60), server.federation().refresh(&td(trust_domain))).await.unwrap()
}

#[tokio::test]
async fn two_trust_domains_federate_both_ways_over_https_spiffe_and_survive_restarts() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    // A serves its bundle; B federates with A (bootstrapped with A's bundle file).
    let a = server::start(config(dir_a.path(), "a.test", Some("127.0.0.1:0".parse().unwrap()), vec![])).await.unwrap();
    let a_endpoint = a.bundle_endpoint_addr().unwrap();
    let a_bootstrap = write_bundle(&a, &dir_b.path().join("a.json"));
    let b_config = config(
        dir_b.path(),
        "b.test",
        Some("127.0.0.1:0".parse().unwrap()),
        vec![spiffe_relationship("a.test", a_endpoint, Some(a_bootstrap))],
    );
    let b = server::start(b_config.clone()).await.unwrap();
    let b_endpoint = b.bundle_endpoint_addr().unwrap();
    let fetched = refresh(&b, "a.test").await.unwrap();
    assert!(same_authorities(&fetched, &a.state().ca().bundle()));
    assert_eq!(fetched.refresh_hint(), Some(Duration::from_secs(300)));
    let stored_a = stored(&b, "a.test").unwrap();
    assert!(same_authorities(&stored_a, &a.state().ca().bundle()));
    assert!(!stored_a.jwt_authorities().is_empty() && stored_a.x509_authorities().len() > 0);

    // A restarts on the same address, now federating with B too (mutual = two relationships).
    let b_bootstrap = write_bundle(&b, &dir_a.path().join("b.json"));
    let a_own = a.state().ca().bundle();
    a.shutdown().await.unwrap();
    let a = server::start(config(
        dir_a.path(),
        "a.test",
        Some(a_endpoint),
        vec![spiffe_relationship("b.test", b_endpoint, Some(b_bootstrap))],
    ))
    .await
    .unwrap();
    assert!(same_authorities(&a.state().ca().bundle(), &a_own), "same CA after the restart");
    let fetched_b = refresh(&a, "b.test").await.unwrap();
    assert!(same_authorities(&fetched_b, &b.state().ca().bundle()));
    // B keeps fetching from the restarted A; nothing changed, so nothing is rewritten.
    let again = refresh(&b, "a.test").await.unwrap();
    assert_eq!(again.sequence(), stored_a.sequence());
    assert_eq!(stored(&b, "a.test").unwrap().sequence(), stored_a.sequence());

    // B restarts without the bootstrap file: the stored bundle of A authenticates A's endpoint.
    b.shutdown().await.unwrap();
    let mut b_config = b_config;
    b_config.federation.federates_with = vec![spiffe_relationship("a.test", a_endpoint, None)];
    b_config.federation.bundle_endpoint.bind_address = Some(b_endpoint);
    let b = server::start(b_config).await.unwrap();
    assert!(same_authorities(&stored(&b, "a.test").unwrap(), &a_own), "the federated bundle survives the restart");
    refresh(&b, "a.test").await.unwrap();
    refresh(&a, "b.test").await.unwrap();
    let status = b.federation().status();
    assert_eq!(status.len(), 1);
    assert!(status[0].last_success.is_some() && status[0].last_error.is_none(), "{status:?}");

    // Workloads of each side authenticate each other with the federated bundles: an SVID
    // minted by A verifies against the bundle B stores for a.test, and the other way round.
    let now = std::time::SystemTime::now();
    for (issuer, verifier, issuer_td) in [(&a, &b, "a.test"), (&b, &a, "b.test")] {
        let key = tessera_spiffe::keys::SigningKey::generate(
            tessera_spiffe::keys::KeyType::EcP256,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap();
        let id = tessera_spiffe::SpiffeId::parse(&format!("spiffe://{issuer_td}/workload")).unwrap();
        let svid = issuer
            .state()
            .ca()
            .sign_x509_svid(&id, &[], Duration::from_secs(300), key.public_key().spki_der(), now)
            .unwrap();
        let federated = stored(verifier, issuer_td).unwrap();
        let peer = tessera_spiffe::tls::verify_peer_svid(&svid.chain, &federated, now).unwrap();
        assert_eq!(peer.spiffe_id, id);
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A test CA and a server certificate for `localhost` and 127.0.0.1, as PEM files.
struct WebPki {
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn web_pki(dir: &Path) -> WebPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let pki = WebPki { ca_file: dir.join("ca.pem"), cert_file: dir.join("cert.pem"), key_file: dir.join("key.pem") };
    std::fs::write(&pki.ca_file, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert_file, leaf.pem()).unwrap();
    std::fs::write(&pki.key_file, leaf_key.serialize_pem()).unwrap();
    pki
}

#[tokio::test]
async fn https_web_profile_with_an_operator_certificate() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let pki = web_pki(dir_a.path());
    let mut a_config = config(dir_a.path(), "a.test", Some("127.0.0.1:0".parse().unwrap()), vec![]);
    a_config.federation.bundle_endpoint.profile = BundleEndpointProfile::HttpsWeb;
    a_config.federation.bundle_endpoint.cert_path = Some(pki.cert_file.clone());
    a_config.federation.bundle_endpoint.key_path = Some(pki.key_file.clone());
    a_config.federation.bundle_endpoint.refresh_hint = Duration::from_secs(120);
    let a = server::start(a_config).await.unwrap();
    let port = a.bundle_endpoint_addr().unwrap().port();

    // A second, unrelated CA: an endpoint it does not sign is refused.
    let other_pki = web_pki(dir_b.path());
    let b = server::start(config(
        dir_b.path(),
        "b.test",
        None,
        vec![
            web_relationship("a.test", format!("https://localhost:{port}/"), &pki.ca_file),
            web_relationship("c.test", format!("https://localhost:{port}/"), &other_pki.ca_file),
        ],
    ))
    .await
    .unwrap();
    let fetched = refresh(&b, "a.test").await.unwrap();
    assert!(same_authorities(&fetched, &a.state().ca().bundle()));
    assert_eq!(fetched.refresh_hint(), Some(Duration::from_secs(120)));
    let err = refresh(&b, "c.test").await.unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
    assert!(stored(&b, "c.test").is_none());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// What the hostile endpoint answers.
#[derive(Debug, Clone)]
enum Answer {
    Body(Vec<u8>),
    Status(u16),
    Endless,
}

/// An HTTPS endpoint (test Web PKI certificate) answering whatever the test sets.
async fn hostile_endpoint(pki: &WebPki, answer: Arc<Mutex<Answer>>) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&pki.cert_file).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(&pki.key_file).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, answer) = (acceptor.clone(), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = answer.lock().unwrap().clone();
                match answer {
                    Answer::Body(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = tls.write_all(head.as_bytes()).await;
                        let _ = tls.write_all(&body).await;
                    }
                    Answer::Status(code) => {
                        let head = format!(
                            "HTTP/1.1 {code} Nope\r\nlocation: https://elsewhere.example/\r\ncontent-length: 0\r\n\r\n"
                        );
                        let _ = tls.write_all(head.as_bytes()).await;
                    }
                    Answer::Endless => {
                        let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await;
                        let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                        while tls.write_all(chunk.as_bytes()).await.is_ok() {}
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_hostile_endpoint_never_replaces_the_last_good_bundle() {
    let (dir_a, dir_b, dir_c) = (tempdir(), tempdir(), tempdir());
    let pki = web_pki(dir_b.path());
    // The genuine bundle of a.test, and the bundle of an unrelated trust domain c.test.
    let a = server::start(config(dir_a.path(), "a.test", None, vec![])).await.unwrap();
    let c = server::start(config(dir_c.path(), "c.test", None, vec![])).await.unwrap();
    let mut good = a.state().ca().bundle();
    good.set_refresh_hint(Some(Duration::from_secs(60)));
    let answer = Arc::new(Mutex::new(Answer::Body(good.to_json().into_bytes())));
    let endpoint = hostile_endpoint(&pki, Arc::clone(&answer)).await;

    let b = server::start(config(
        dir_b.path(),
        "b.test",
        None,
        vec![web_relationship("a.test", format!("https://localhost:{}/bundle", endpoint.port()), &pki.ca_file)],
    ))
    .await
    .unwrap();
    refresh(&b, "a.test").await.unwrap();
    let last_good = stored(&b, "a.test").unwrap();
    assert!(same_authorities(&last_good, &good));

    let oversized = {
        let mut json = good.to_json();
        json.insert_str(1, &format!("\"padding\":\"{}\",", "x".repeat(2 * 1024 * 1024)));
        json.into_bytes()
    };
    let cases: Vec<(&str, Answer, &str)> = vec![
        ("garbage", Answer::Body(b"<html>hello</html>".to_vec()), "not a valid SPIFFE bundle"),
        ("empty JSON", Answer::Body(b"{\"keys\":[]}".to_vec()), "no X.509 or JWT authority"),
        ("wrong trust domain", Answer::Body(c.state().ca().bundle().to_json().into_bytes()), "c.test"),
        ("oversized", Answer::Body(oversized), "larger than"),
        ("endless", Answer::Endless, "larger than"),
        ("not found", Answer::Status(404), "HTTP 404"),
        ("redirect", Answer::Status(302), "not followed"),
    ];
    for (name, bad, needle) in cases {
        *answer.lock().unwrap() = bad;
        let err = refresh(&b, "a.test").await.expect_err(name);
        assert!(err.contains(needle), "{name}: {err:?} should mention {needle:?}");
        let kept = stored(&b, "a.test").unwrap();
        assert_eq!(kept.sequence(), last_good.sequence(), "{name}");
        assert!(same_authorities(&kept, &last_good), "{name}");
        let status = b.federation().status();
        assert_eq!(status[0].last_error.as_deref(), Some(err.as_str()), "{name}");
        assert!(status[0].next_refresh.is_some());
    }

    // Back to the genuine bundle: accepted, nothing rewritten since nothing changed.
    *answer.lock().unwrap() = Answer::Body(good.to_json().into_bytes());
    let again = refresh(&b, "a.test").await.unwrap();
    assert_eq!(again.sequence(), last_good.sequence());
    assert!(b.federation().status()[0].last_error.is_none());
    for server in [a, b, c] {
        server.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn https_spiffe_refuses_an_endpoint_with_the_wrong_identity() {
    let (dir_a, dir_b) = (tempdir(), tempdir());
    let a = server::start(config(dir_a.path(), "a.test", Some("127.0.0.1:0".parse().unwrap()), vec![])).await.unwrap();
    let endpoint = a.bundle_endpoint_addr().unwrap();
    let bootstrap = write_bundle(&a, &dir_b.path().join("a.json"));
    let mut wrong_id = spiffe_relationship("a.test", endpoint, Some(bootstrap.clone()));
    wrong_id.endpoint_spiffe_id = Some("spiffe://a.test/not-the-bundle-server".into());
    // Authenticated with the bundle of an unrelated trust domain: the chain does not verify.
    let other_dir = tempdir();
    let other = server::start(config(other_dir.path(), "a.test", None, vec![])).await.unwrap();
    let wrong_bundle = write_bundle(&other, &dir_b.path().join("other.json"));
    let mut wrong_roots = spiffe_relationship("x.test", endpoint, None);
    wrong_roots.endpoint_spiffe_id = Some("spiffe://a.test/tessera/server".into());
    wrong_roots.trust_bundle_path = Some(wrong_bundle);
    // https_web against an SVID endpoint: no Web PKI root signs it.
    let pki = web_pki(dir_b.path());
    let web = web_relationship("y.test", format!("https://localhost:{}/", endpoint.port()), &pki.ca_file);

    let b = server::start(config(dir_b.path(), "b.test", None, vec![wrong_id, wrong_roots, web])).await.unwrap();
    for trust_domain in ["a.test", "x.test", "y.test"] {
        let err = refresh(&b, trust_domain).await.unwrap_err();
        assert!(err.contains("TLS handshake"), "{trust_domain}: {err}");
        assert!(stored(&b, trust_domain).is_none(), "{trust_domain}");
    }
    for server in [a, b, other] {
        server.shutdown().await.unwrap();
    }
}

#[test]
fn relationship_configuration_is_checked() {
    let parse =
        |text: &str| tessera_server::config::parse(text, Path::new("server.toml")).map(|_| ()).unwrap_err().to_string();
    let base = "[[federation.federates_with]]\ntrust_domain = \"a.test\"\n";
    let err = parse(&format!("{base}bundle_endpoint_url = \"http://a.test/\"\nprofile = \"https_web\"\n"));
    assert!(err.contains("federation.federates_with.bundle_endpoint_url") && err.contains("https://"), "{err}");
    let err = parse(&format!("{base}bundle_endpoint_url = \"https://a.test/\"\nprofile = \"https_spiffe\"\n"));
    assert!(err.contains("endpoint_spiffe_id") && err.contains("required"), "{err}");
    let err = parse(&format!("{base}bundle_endpoint_url = \"https://a.test/\"\nprofile = \"https_jwt\"\n"));
    assert!(err.contains("profile"), "{err}");
    let err = parse(
        "trust_domain = \"a.test\"\n[[federation.federates_with]]\ntrust_domain = \"a.test\"\nbundle_endpoint_url = \"https://a.test/\"\nprofile = \"https_web\"\n",
    );
    assert!(err.contains("own trust domain"), "{err}");
    let err = parse("[federation.bundle_endpoint]\nbind_address = \"127.0.0.1:0\"\nprofile = \"https_web\"\n");
    assert!(err.contains("federation.bundle_endpoint.cert_path"), "{err}");
}
