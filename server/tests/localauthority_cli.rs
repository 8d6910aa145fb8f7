//! `tessera-server localauthority x509|jwt show|prepare|activate|taint|revoke`: the real binary
//! against a real `tessera-server run` child process. Walks the forced-rotation sequence for
//! both kinds, checks the bundle `bundle show` prints at each step and the refusals (the state
//! machine SPIRE defines). Persistence of the states is covered in `rotation_schedule.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::time::SystemTime;

use cli_support::{ServerProcess, fails, json, ok};
use serde_json::Value;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt;

fn authorities(server: &ServerProcess, kind: &str) -> Vec<Value> {
    let shown = json(server.cli(&["localauthority", kind, "show", "--output", "json"]));
    shown["authorities"].as_array().unwrap().clone()
}

fn id_in_state(list: &[Value], state: &str) -> String {
    list.iter().find(|a| a["state"] == state).unwrap_or_else(|| panic!("no {state} authority in {list:?}"))["authority_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn change(server: &ServerProcess, kind: &str, verb: &str, id: &str) -> Value {
    let mut args = vec!["localauthority", kind, verb, "--output", "json"];
    if !id.is_empty() {
        args.extend(["--authority-id", id]);
    }
    json(server.cli(&args))
}

fn bundle_roots(server: &ServerProcess) -> usize {
    ok(server.cli(&["bundle", "show", "--format", "pem"])).matches("BEGIN CERTIFICATE").count()
}

fn bundle_jwt_keys(server: &ServerProcess) -> Vec<String> {
    let doc: Value = serde_json::from_str(&ok(server.cli(&["bundle", "show", "--format", "spiffe"]))).unwrap();
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn x509_prepare_activate_taint_revoke_and_refusals() {
    let server = ServerProcess::start();
    let list = authorities(&server, "x509");
    assert_eq!(list.len(), 1);
    let first = id_in_state(&list, "active");
    assert_eq!(bundle_roots(&server), 1);

    // Nothing to activate, taint or revoke yet.
    fails(server.cli(&["localauthority", "x509", "taint", "--authority-id", &first]), "only an old authority");
    fails(server.cli(&["localauthority", "x509", "activate", "--authority-id", &first]), "only the prepared");
    fails(server.cli(&["localauthority", "x509", "revoke", "--authority-id", &first]), "only a tainted");
    fails(server.cli(&["localauthority", "x509", "taint", "--authority-id", "nope"]), "no x509 authority with id nope");
    fails(server.cli(&["localauthority", "x509", "activate", "--authority-id", ""]), "--authority-id");

    let prepared = change(&server, "x509", "prepare", "");
    assert_eq!(prepared["authority"]["state"], "prepared");
    let next = prepared["authority"]["authority_id"].as_str().unwrap().to_owned();
    assert_eq!(bundle_roots(&server), 2, "a prepared CA is published at once");

    let activated = change(&server, "x509", "activate", &next);
    assert_eq!(activated["authority"]["state"], "active");
    let list = authorities(&server, "x509");
    assert_eq!(id_in_state(&list, "active"), next);
    assert_eq!(id_in_state(&list, "old"), first);
    fails(server.cli(&["localauthority", "x509", "revoke", "--authority-id", &first]), "not tainted");
    fails(server.cli(&["localauthority", "x509", "taint", "--authority-id", &next]), "is active");

    let tainted = change(&server, "x509", "taint", &first);
    assert_eq!(tainted["authority"]["tainted"], true);
    fails(server.cli(&["localauthority", "x509", "taint", "--authority-id", &first]), "already tainted");
    let human = ok(server.cli(&["localauthority", "x509", "show"]));
    assert!(human.contains(&format!("Authority ID: {first}")) && human.contains("State: old (tainted)"), "{human}");

    change(&server, "x509", "revoke", &first);
    assert_eq!(bundle_roots(&server), 1, "the revoked CA left the bundle");
    let list = authorities(&server, "x509");
    assert_eq!(list.len(), 1);
    assert_eq!(id_in_state(&list, "active"), next);
    fails(server.cli(&["localauthority", "x509", "revoke", "--authority-id", &first]), "no x509 authority");
}

#[test]
fn jwt_prepare_activate_taint_revoke() {
    let server = ServerProcess::start();
    let first = id_in_state(&authorities(&server, "jwt"), "active");
    assert_eq!(bundle_jwt_keys(&server), vec![first.clone()]);
    let next = change(&server, "jwt", "prepare", "")["authority"]["authority_id"].as_str().unwrap().to_owned();
    assert!(bundle_jwt_keys(&server).contains(&next));
    change(&server, "jwt", "activate", &next);
    change(&server, "jwt", "taint", &first);

    let list = authorities(&server, "jwt");
    assert_eq!(id_in_state(&list, "active"), next);
    let old = list.iter().find(|a| a["authority_id"] == first.as_str()).unwrap();
    assert_eq!(old["state"], "old");
    assert_eq!(old["tainted"], true);

    change(&server, "jwt", "revoke", &first);
    assert_eq!(bundle_jwt_keys(&server), vec![next.clone()]);
    // A token minted now is signed by the new key.
    let minted = json(server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "a",
        "--output",
        "json",
    ]));
    let token = minted["token"].as_str().unwrap();
    // After the revocation the bundle holds only the new key, so validating proves the kid.
    let spiffe = ok(server.cli(&["bundle", "show", "--format", "spiffe"]));
    let bundle = Bundle::from_json(TrustDomain::new("example.org").unwrap(), spiffe.as_bytes()).unwrap();
    jwt::validate(token, &bundle, &["a"], SystemTime::now()).unwrap();
}
