//! Crash consistency of the server's state (the CA journal and keys, and the datastore):
//! `tessera-server run` is killed with SIGKILL during a burst of `entry create` and `token
//! generate` calls, many times over. After every restart the server starts cleanly with the
//! same CA (same bundle), and every write it acknowledged is present.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cli_support::{BIN, cli, ok, short_tempdir, stdout, wait_for_socket};
use tessera_server::datastore::{DataStore, DataStoreOptions, SledDataStore};

/// Kill/restart cycles.
const CYCLES: usize = 6;
/// Concurrent writers per cycle.
const WRITERS: usize = 3;

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

#[test]
fn acknowledged_writes_survive_kill_9_during_bursts() {
    let dir = short_tempdir();
    let socket = dir.path().join("p/admin.sock");
    let config = dir.path().join("server.toml");
    let log = dir.path().join("server.log");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:0\"\nadmin_socket = \"{}\"\n",
            dir.path().join("data").display(),
            socket.display()
        ),
    )
    .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let mut server = spawn(&config, &log);
    wait_for_socket(&socket, read_log);
    let bundle = ok(cli(&socket, &["bundle", "show"]));
    let acked_entries: Arc<Mutex<Vec<String>>> = Arc::default();
    let acked_tokens: Arc<Mutex<Vec<String>>> = Arc::default();

    for cycle in 0..CYCLES {
        // A burst of writes from several clients, killed part-way.
        let stop = Instant::now() + Duration::from_millis(400 + 150 * cycle as u64);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (socket, entries, tokens) = (socket.clone(), Arc::clone(&acked_entries), Arc::clone(&acked_tokens));
                std::thread::spawn(move || {
                    let mut n = 0;
                    while Instant::now() < stop + Duration::from_millis(300) {
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
                            let text = stdout(&out);
                            let id = text.lines().find_map(|l| l.strip_prefix("Entry ID:")).unwrap().trim().to_owned();
                            entries.lock().unwrap().push(id);
                        }
                        let out = cli(&socket, &["token", "generate"]);
                        if out.status.success() {
                            let text = stdout(&out);
                            let token = text.lines().find_map(|l| l.strip_prefix("Token:")).unwrap().trim().to_owned();
                            tokens.lock().unwrap().push(token);
                        }
                    }
                })
            })
            .collect();
        while Instant::now() < stop {
            std::thread::sleep(Duration::from_millis(10));
        }
        server.kill().unwrap(); // SIGKILL
        server.wait().unwrap();
        for writer in writers {
            writer.join().unwrap();
        }

        server = spawn(&config, &log);
        wait_for_socket(&socket, read_log);
        assert_eq!(ok(cli(&socket, &["bundle", "show"])), bundle, "cycle {cycle}: the CA changed after a crash");
        let entries = acked_entries.lock().unwrap().clone();
        assert!(!entries.is_empty() || cycle > 0, "no write was acknowledged before the kill");
        for id in &entries {
            ok(cli(&socket, &["entry", "show", "--entry-id", id]));
        }
        let count: usize = ok(cli(&socket, &["entry", "count"]))
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("entry count output"));
        assert!(count >= entries.len(), "cycle {cycle}: {count} entries stored, {} acknowledged", entries.len());
    }
    let _ = server.kill();
    let _ = server.wait();

    // Every acknowledged join token is in the datastore (consuming proves it is stored and
    // valid; there is no listing command for tokens).
    let tokens = acked_tokens.lock().unwrap().clone();
    assert!(!tokens.is_empty());
    let store = SledDataStore::open(dir.path().join("data/datastore"), DataStoreOptions::default()).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    for token in &tokens {
        store.consume_join_token(token, now).unwrap_or_else(|e| panic!("acknowledged token {token} lost: {e}"));
    }
    for id in acked_entries.lock().unwrap().iter() {
        assert!(store.get_entry(id).unwrap().is_some(), "acknowledged entry {id} lost");
    }
    eprintln!(
        "crash test: {} entries and {} tokens acknowledged over {CYCLES} kills",
        acked_entries.lock().unwrap().len(),
        tokens.len()
    );
}
