//! Federation relationships managed at run time: the real `tessera-server federation ...`
//! binary against a `tessera-server run` child process, and the admin API of an in-process
//! server across a restart (relationships persist; deleting one deletes its bundle). The
//! foreign trust domain is a real in-process server with an `https_spiffe` bundle endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::Output;

use cli_support::{ServerProcess, fails, json, ok};
use hyper_util::rt::TokioIo;
use tessera_server::config::{BundleEndpointConfig, FederationConfig, ServerConfig};
use tessera_server::server::{self, RunningServer};
use tessera_spiffe::TrustDomain;
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::admin::v1::admin_service_client::AdminServiceClient;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint, Uri};

fn config(dir: &Path, trust_domain: &str, endpoint: bool) -> ServerConfig {
    ServerConfig {
        trust_domain: TrustDomain::new(trust_domain).unwrap(),
        data_dir: dir.join("data"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: dir.join("private/admin.sock"),
        federation: FederationConfig {
            bundle_endpoint: BundleEndpointConfig {
                bind_address: endpoint.then(|| "127.0.0.1:0".parse().unwrap()),
                ..BundleEndpointConfig::default()
            },
            federates_with: vec![],
        },
        ..ServerConfig::default()
    }
}

/// The foreign trust domain `a.test`: its server and its bundle written to a file.
async fn foreign(dir: &Path) -> (RunningServer, String, PathBuf) {
    let a = server::start(config(dir, "a.test", true)).await.unwrap();
    let url = format!("https://{}/", a.bundle_endpoint_addr().unwrap());
    let bundle = dir.join("a.json");
    std::fs::write(&bundle, a.state().ca().bundle().to_json()).unwrap();
    (a, url, bundle)
}

async fn cli(socket: &Path, args: Vec<String>) -> Output {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_support::cli(&socket, &args)
    })
    .await
    .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_relationships_of_a_running_server() {
    let dir_a = cli_support::short_tempdir();
    let (a, url, bundle) = foreign(dir_a.path()).await;
    let b = tokio::task::spawn_blocking(ServerProcess::start).await.unwrap();
    let socket = b.socket.clone();
    let bundle = bundle.display().to_string();
    let create = |id: &str| {
        args(&[
            "federation",
            "create",
            "--trust-domain",
            "a.test",
            "--bundle-endpoint-url",
            &url,
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            id,
            "--trust-bundle-path",
            &bundle,
        ])
    };

    let text = ok(cli(&socket, create("spiffe://a.test/tessera/server")).await);
    assert!(text.contains("Trust domain       : a.test") && text.contains("Source             : api"), "{text}");
    let refreshed = args(&["federation", "refresh", "--trust-domain", "spiffe://a.test", "--output", "json"]);
    let relationship = json(cli(&socket, refreshed.clone()).await);
    assert!(relationship["bundle_sequence"].as_u64().unwrap() >= 1, "{relationship}");
    assert!(relationship["last_success"].is_string() && relationship["last_error"].is_null(), "{relationship}");
    let bundles = json(cli(&socket, args(&["bundle", "list", "--output", "json"])).await);
    assert_eq!(bundles["bundles"][0]["trust_domain"], "spiffe://a.test");
    let list = json(cli(&socket, args(&["federation", "list", "--output", "json"])).await);
    assert_eq!(list["relationships"].as_array().unwrap().len(), 1);
    assert_eq!(list["relationships"][0]["profile"], "https_spiffe");

    fails(cli(&socket, create("spiffe://a.test/tessera/server")).await, "use update");
    fails(cli(&socket, args(&["federation", "show", "--trust-domain", "z.test"])).await, "no federation relationship");

    // Pin the wrong SPIFFE ID: the fetch fails with the reason, the last good bundle stays.
    let mut update = create("spiffe://a.test/somebody-else");
    update[1] = "update".into();
    ok(cli(&socket, update).await);
    fails(cli(&socket, refreshed.clone()).await, "TLS handshake");
    let shown = json(cli(&socket, args(&["federation", "show", "--trust-domain", "a.test", "--output", "json"])).await);
    assert!(shown["last_error"].as_str().unwrap().contains("TLS handshake"), "{shown}");
    let bundles = json(cli(&socket, args(&["bundle", "list", "--output", "json"])).await);
    assert_eq!(bundles["bundles"].as_array().unwrap().len(), 1, "the last good bundle is kept");

    // Delete: the relationship and its bundle go.
    let deleted = ok(cli(&socket, args(&["federation", "delete", "--trust-domain", "a.test"])).await);
    assert_eq!(deleted, "Deleted a.test\n");
    let bundles = json(cli(&socket, args(&["bundle", "list", "--output", "json"])).await);
    assert!(bundles["bundles"].as_array().unwrap().is_empty(), "{bundles}");
    fails(cli(&socket, refreshed).await, "no federation relationship");

    // Bad input never reaches the server's state.
    let mut bad = create("spiffe://a.test/tessera/server");
    bad[5] = "http://127.0.0.1:1/".into();
    fails(cli(&socket, bad).await, "https://");
    let mut own = create("spiffe://a.test/tessera/server");
    own[3] = "example.org".into();
    fails(cli(&socket, own).await, "own trust domain");
    drop(b);
    a.shutdown().await.unwrap();
}

async fn admin(socket: &Path) -> AdminServiceClient<Channel> {
    let socket = socket.to_path_buf();
    let channel = Endpoint::from_static("http://admin")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .unwrap();
    AdminServiceClient::new(channel)
}

#[tokio::test]
async fn relationships_created_through_the_api_survive_a_restart() {
    let (dir_a, dir_b) = (cli_support::short_tempdir(), cli_support::short_tempdir());
    let (a, url, bundle) = foreign(dir_a.path()).await;
    let b = server::start(config(dir_b.path(), "b.test", false)).await.unwrap();
    let relationship = pb::FederationRelationship {
        trust_domain: "a.test".into(),
        bundle_endpoint_url: url,
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: "spiffe://a.test/tessera/server".into(),
        trust_bundle: std::fs::read(&bundle).unwrap(),
        ..Default::default()
    };
    let mut client = admin(b.admin_socket()).await;
    client
        .create_federation_relationship(pb::CreateFederationRelationshipRequest {
            relationship: Some(relationship.clone()),
        })
        .await
        .unwrap();
    let refreshed = client
        .refresh_federation_relationship(pb::RefreshFederationRelationshipRequest { trust_domain: "a.test".into() })
        .await
        .unwrap()
        .into_inner()
        .relationship
        .unwrap();
    assert!(refreshed.bundle_sequence >= 1);

    // Field errors name the field.
    let mut bad = relationship.clone();
    bad.trust_domain = "other.test".into();
    bad.profile = "https_jwt".into();
    let status = client
        .create_federation_relationship(pb::CreateFederationRelationshipRequest { relationship: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("relationship.profile"), "{status:?}");

    drop(client);
    b.shutdown().await.unwrap();
    let b = server::start(config(dir_b.path(), "b.test", false)).await.unwrap();
    let mut client = admin(b.admin_socket()).await;
    let listed = client
        .list_federation_relationships(pb::ListFederationRelationshipsRequest {})
        .await
        .unwrap()
        .into_inner()
        .relationships;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].trust_domain.as_str(), listed[0].source.as_str()), ("a.test", "api"));
    // The restarted relationship fetches again (with the stored bundle, or its bootstrap).
    client
        .refresh_federation_relationship(pb::RefreshFederationRelationshipRequest { trust_domain: "a.test".into() })
        .await
        .unwrap();
    client
        .delete_federation_relationship(pb::DeleteFederationRelationshipRequest { trust_domain: "a.test".into() })
        .await
        .unwrap();
    assert!(b.state().datastore().get_bundle(&TrustDomain::new("a.test").unwrap()).unwrap().is_none());
    let status = client
        .delete_federation_relationship(pb::DeleteFederationRelationshipRequest { trust_domain: "a.test".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    drop(client);
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
