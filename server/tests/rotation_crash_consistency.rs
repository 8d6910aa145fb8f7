//! Crash consistency of the server's state (the CA journal and keys, and the datastore):
//! `tessera-server run` is killed with SIGKILL during a burst of `entry create` and `token
//! generate` calls (the CLI, over the admin socket) and of real join-token attestations (over
//! the agent API, mTLS), many times over. After every restart:
//!
//! - the server starts cleanly on the same data, with the same CA (same bundle);
//! - every entry whose creation was acknowledged exists;
//! - every agent whose attestation was acknowledged (its SVID received) exists;
//! - every token acknowledged as consumed cannot attest again.
//!
//! At the end the datastore is opened directly: acknowledged agents are recorded, tokens
//! acknowledged as consumed are gone, and tokens acknowledged as generated but never tried are
//! still usable. An attestation interrupted by the kill (no answer) may or may not have
//! consumed its token; such tokens are only left out of the checks.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;
mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_support::{BIN, cli, ok, short_tempdir, stdout, wait_for_socket};
use tessera_server::datastore::{DataStore, DataStoreError, DataStoreOptions, SledDataStore};
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::Bundle;
use tessera_wire::tessera::agent::v1 as pb;
use tonic::Code;

/// Kill/restart cycles.
const CYCLES: usize = 8;
/// Concurrent CLI writers per cycle (each creates an entry, then a token, in a loop; the first
/// writer's tokens are kept aside, the others' are attested).
const WRITERS: usize = 2;
/// Concurrent attesting agents per cycle (each takes a fresh token and attests, in a loop).
const ATTESTERS: usize = 3;

fn spawn(config: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::options().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// What became of one attestation attempt.
enum Attempt {
    /// The SVID was received: the token is consumed and the agent recorded.
    Acknowledged,
    /// The call never reached the server (connection refused): the token is untouched.
    NotSent,
    /// Refused as overload before the token was looked at: the token is untouched.
    Overloaded,
    /// Refused as unknown, used or already attested: for a fresh token, a lost write.
    Refused(tonic::Status),
    /// Cut off by the kill: the token may or may not be consumed.
    Interrupted,
}

async fn attest(addr: SocketAddr, bundle: &Bundle, token: &str) -> Attempt {
    let Ok(Ok(mut client)) =
        tokio::time::timeout(Duration::from_secs(5), common::try_connect(addr, bundle.clone(), None)).await
    else {
        return Attempt::NotSent;
    };
    let (_, csr) = common::key_and_csr();
    let params = pb::AttestationParams {
        data: Some(pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }),
        csr,
    };
    let message = pb::AttestAgentRequest { step: Some(pb::attest_agent_request::Step::Params(params)) };
    let call = async {
        let mut responses = client.attest_agent(tokio_stream::iter(vec![message])).await?.into_inner();
        responses.message().await
    };
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(Some(pb::AttestAgentResponse { step: Some(pb::attest_agent_response::Step::Result(result)) }))) => {
            let svid = result.svid.unwrap();
            assert_eq!(svid.spiffe_id, format!("spiffe://example.org/tessera/agent/join_token/{token}"));
            Attempt::Acknowledged
        }
        Ok(Err(status)) if status.code() == Code::Unavailable && status.message().starts_with("server overloaded") => {
            Attempt::Overloaded
        }
        Ok(Err(status)) if matches!(status.code(), Code::PermissionDenied | Code::AlreadyExists) => {
            Attempt::Refused(status)
        }
        _ => Attempt::Interrupted,
    }
}

fn agent_id(token: &str) -> String {
    format!("spiffe://example.org/tessera/agent/join_token/{token}")
}

#[derive(Default)]
struct Acked {
    /// Entries whose creation was acknowledged.
    entries: Vec<String>,
    /// Tokens generated and not yet tried.
    fresh: Vec<String>,
    /// Tokens generated and kept aside, never tried: they must stay usable.
    kept: Vec<String>,
    /// Tokens acknowledged as consumed (their agent's attestation was answered).
    consumed: Vec<String>,
    /// Tokens whose attestation was cut off by the kill.
    uncertain: Vec<String>,
    /// Fresh tokens refused: each is a lost write.
    lost: Vec<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_and_attestations_survive_kill_9_during_bursts() {
    let dir = short_tempdir();
    let socket = dir.path().join("p/admin.sock");
    let config = dir.path().join("server.toml");
    let log = dir.path().join("server.log");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"{addr}\"\nadmin_socket = \"{}\"\n",
            dir.path().join("data").display(),
            socket.display()
        ),
    )
    .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut server = spawn(&config, &log);
    wait_for_socket(&socket, read_log);
    let bundle_pem = ok(cli(&socket, &["bundle", "show", "--format", "pem"]));
    let bundle =
        Bundle::from_x509_authorities_pem(TrustDomain::new("example.org").unwrap(), bundle_pem.as_bytes()).unwrap();
    let acked: Arc<Mutex<Acked>> = Arc::default();
    // Seed tokens so attestations run from the start of the first burst.
    for _ in 0..ATTESTERS * 2 {
        let token = ok(cli(&socket, &["token", "generate"]));
        acked.lock().unwrap().fresh.push(cli_support::field(&token, "Token:").to_owned());
    }

    for cycle in 0..CYCLES {
        let consumed_before = acked.lock().unwrap().consumed.len();
        // A burst of writes and attestations from several clients, killed part-way.
        let stop = Instant::now() + Duration::from_millis(500 + 150 * cycle as u64);
        let end = stop + Duration::from_millis(300);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (socket, acked) = (socket.clone(), Arc::clone(&acked));
                std::thread::spawn(move || {
                    let mut n = 0;
                    while Instant::now() < end {
                        n += 1;
                        let spiffe_id = format!("spiffe://example.org/crash/{cycle}/{w}/{n}");
                        let out = cli(
                            &socket,
                            &[
                                "entry",
                                "create",
                                "--parent-id",
                                "spiffe://example.org/tessera/agent/x",
                                "--spiffe-id",
                                &spiffe_id,
                                "--selector",
                                "unix:uid:1",
                            ],
                        );
                        if out.status.success() {
                            let id = cli_support::field(&stdout(&out), "Entry ID:").to_owned();
                            acked.lock().unwrap().entries.push(id);
                        }
                        let out = cli(&socket, &["token", "generate"]);
                        if out.status.success() {
                            let token = cli_support::field(&stdout(&out), "Token:").to_owned();
                            let mut acked = acked.lock().unwrap();
                            if w == 0 { acked.kept.push(token) } else { acked.fresh.push(token) }
                        }
                    }
                })
            })
            .collect();
        let attesters: Vec<_> = (0..ATTESTERS)
            .map(|_| {
                let (bundle, acked) = (bundle.clone(), Arc::clone(&acked));
                tokio::spawn(async move {
                    while Instant::now() < end {
                        let next = acked.lock().unwrap().fresh.pop();
                        let Some(token) = next else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            continue;
                        };
                        let attempt = attest(addr, &bundle, &token).await;
                        let mut acked = acked.lock().unwrap();
                        match attempt {
                            Attempt::Acknowledged => acked.consumed.push(token),
                            Attempt::NotSent | Attempt::Overloaded => acked.fresh.insert(0, token),
                            Attempt::Refused(status) => acked.lost.push((token, status.message().to_owned())),
                            Attempt::Interrupted => acked.uncertain.push(token),
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(stop.saturating_duration_since(Instant::now())).await;
        server.kill().unwrap(); // SIGKILL
        server.wait().unwrap();
        for attester in attesters {
            attester.await.unwrap();
        }
        for writer in writers {
            writer.join().unwrap();
        }

        // The restart opens the same data cleanly.
        server = spawn(&config, &log);
        wait_for_socket(&socket, read_log);
        assert_eq!(
            ok(cli(&socket, &["bundle", "show", "--format", "pem"])),
            bundle_pem,
            "cycle {cycle}: the CA changed after a crash"
        );
        let new_consumed = {
            let state = acked.lock().unwrap();
            assert!(state.lost.is_empty(), "cycle {cycle}: acknowledged tokens lost: {:?}", state.lost);
            assert!(!state.entries.is_empty(), "no entry creation was acknowledged before the kill");
            for id in &state.entries {
                ok(cli(&socket, &["entry", "show", "--entry-id", id]));
            }
            let count: usize = ok(cli(&socket, &["entry", "count"]))
                .split_whitespace()
                .find_map(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("entry count output"));
            assert!(
                count >= state.entries.len(),
                "cycle {cycle}: {count} entries stored, {} acknowledged",
                state.entries.len()
            );
            for token in &state.consumed {
                ok(cli(&socket, &["agent", "show", "--spiffe-id", &agent_id(token)]));
            }
            state.consumed[consumed_before..].to_vec()
        };
        for token in &new_consumed {
            match attest(addr, &bundle, token).await {
                Attempt::Refused(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
                Attempt::Acknowledged => panic!("cycle {cycle}: consumed token {token} attested again"),
                _ => panic!("cycle {cycle}: re-using consumed token {token} got no clear refusal"),
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();

    let state = acked.lock().unwrap();
    assert!(!state.consumed.is_empty(), "no attestation was acknowledged");
    let store = SledDataStore::open(dir.path().join("data/datastore"), DataStoreOptions::default()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for token in &state.consumed {
        let id = tessera_spiffe::SpiffeId::parse(&agent_id(token)).unwrap();
        assert!(store.get_attested_node(&id).unwrap().is_some(), "acknowledged agent {id} lost");
        assert!(
            matches!(store.consume_join_token(token, now), Err(DataStoreError::TokenNotFound)),
            "token {token} was acknowledged as consumed but is still usable"
        );
    }
    assert!(!state.kept.is_empty());
    for token in state.fresh.iter().chain(&state.kept) {
        store.consume_join_token(token, now).unwrap_or_else(|e| panic!("acknowledged token {token} lost: {e}"));
    }
    for id in &state.entries {
        assert!(store.get_entry(id).unwrap().is_some(), "acknowledged entry {id} lost");
    }
    eprintln!(
        "crash test: over {CYCLES} kills, {} entries, {} attestations and {} unused tokens acknowledged; {} \
         attestations cut off",
        state.entries.len(),
        state.consumed.len(),
        state.fresh.len() + state.kept.len(),
        state.uncertain.len()
    );
}
