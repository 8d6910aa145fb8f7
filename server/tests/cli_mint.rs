//! `tessera-server x509 mint` and `jwt mint`: the real binary against a real
//! `tessera-server run` child process. Every minted SVID is checked with tessera-spiffe's
//! validators against the bundle `bundle show` prints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cli_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use cli_support::{ServerProcess, fails, field, json, ok, stderr, unix_now};
use ring::rand::SystemRandom;
use tessera_spiffe::TrustDomain;
use tessera_spiffe::bundle::{Bundle, parse_pem_certificates};
use tessera_spiffe::x509::{X509Svid, verify_x509_svid};

/// The PEM blocks of `text` with the given tag, as DER.
fn blocks(text: &str, tag: &str) -> Vec<Vec<u8>> {
    pem::parse_many(text).unwrap().into_iter().filter(|p| p.tag() == tag).map(|p| p.into_contents()).collect()
}

/// Checks an X.509-SVID chain and key against the PEM bundle: it verifies, names `spiffe_id`
/// and the key belongs to the leaf. Returns the leaf.
fn check_svid(chain: &[Vec<u8>], key_der: &[u8], bundle_pem: &str, spiffe_id: &str) -> Vec<u8> {
    let bundle =
        Bundle::from_x509_authorities_pem(TrustDomain::new("example.org").unwrap(), bundle_pem.as_bytes()).unwrap();
    let refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let verified = verify_x509_svid(&refs, &bundle, SystemTime::now()).unwrap();
    assert_eq!(verified.spiffe_id().as_str(), spiffe_id);
    let svid = X509Svid::parse(&chain.concat(), key_der, &SystemRandom::new()).unwrap();
    assert_eq!(svid.spiffe_id().as_str(), spiffe_id);
    chain[0].clone()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[test]
fn x509_mint_writes_files_that_validate() {
    let server = ServerProcess::start();
    let bundle_pem = ok(server.cli(&["bundle", "show", "--format", "pem"]));
    let out = server.dir.path().join("svid");
    let printed = ok(server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--ttl",
        "300",
        "--dns-name",
        "web.example.org",
        "--dns-name",
        "www.example.org",
        "--write",
        out.to_str().unwrap(),
    ]));
    assert_eq!(field(&printed, "SPIFFE ID: "), "spiffe://example.org/web");
    assert!(printed.contains(&format!("Private key written to {}", out.join("key.pem").display())), "{printed}");
    assert!(!printed.contains("BEGIN"), "--write prints no key material: {printed}");

    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    let mode = |name: &str| std::fs::metadata(out.join(name)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("key.pem"), 0o600, "the key is private");
    assert_eq!(mode("svid.pem") & 0o077, 0o044);
    let chain = blocks(&read("svid.pem"), "CERTIFICATE");
    let keys = blocks(&read("key.pem"), "PRIVATE KEY");
    assert_eq!(keys.len(), 1);
    let leaf = check_svid(&chain, &keys[0], &bundle_pem, "spiffe://example.org/web");
    assert!(contains(&leaf, b"web.example.org") && contains(&leaf, b"www.example.org"), "DNS SANs present");
    assert_eq!(read("bundle.pem"), bundle_pem, "bundle.pem is the trust domain's bundle");

    // Minting again into the same directory replaces the files, and the key stays 0600.
    std::fs::set_permissions(out.join("key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let second = json(server.cli(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/db",
        "--write",
        out.to_str().unwrap(),
        "--output",
        "json",
    ]));
    assert_eq!(second["key_path"], out.join("key.pem").to_str().unwrap());
    assert!(second.get("key_pem").is_none());
    assert_eq!(mode("key.pem"), 0o600);
    let chain = blocks(&read("svid.pem"), "CERTIFICATE");
    check_svid(&chain, &blocks(&read("key.pem"), "PRIVATE KEY")[0], &bundle_pem, "spiffe://example.org/db");
}

#[test]
fn x509_mint_prints_pems_without_write() {
    let server = ServerProcess::start();
    let bundle_pem = ok(server.cli(&["bundle", "show"]));

    let printed = ok(server.cli(&["x509", "mint", "--spiffe-id", "spiffe://example.org/api", "--ttl", "120"]));
    let (svid_part, rest) = printed.split_once("\nPrivate key:\n").unwrap();
    let (key_part, bundle_part) = rest.split_once("\nBundle:\n").unwrap();
    let chain = blocks(svid_part, "CERTIFICATE");
    check_svid(&chain, &blocks(key_part, "PRIVATE KEY")[0], &bundle_pem, "spiffe://example.org/api");
    assert_eq!(bundle_part, bundle_pem);

    let minted = json(server.cli(&["x509", "mint", "--spiffe-id", "spiffe://example.org/api", "--output", "json"]));
    let chain = blocks(minted["svid_pem"].as_str().unwrap(), "CERTIFICATE");
    let key = blocks(minted["key_pem"].as_str().unwrap(), "PRIVATE KEY");
    check_svid(&chain, &key[0], &bundle_pem, "spiffe://example.org/api");
    assert_eq!(minted["bundle_pem"], bundle_pem.as_str());
    // Default X.509-SVID TTL is 1h.
    let expires = time::OffsetDateTime::parse(
        minted["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap()
    .unix_timestamp();
    assert!((expires - unix_now() - 3600).abs() <= 10, "default ttl: {expires}");
    assert_eq!(parse_pem_certificates(bundle_pem.as_bytes()).unwrap().len(), 1);
}

#[test]
fn jwt_mint_prints_a_token_that_validates() {
    let server = ServerProcess::start();
    let spiffe_bundle = ok(server.cli(&["bundle", "show", "--format", "spiffe"]));
    let bundle = Bundle::from_json(TrustDomain::new("example.org").unwrap(), spiffe_bundle.as_bytes()).unwrap();

    let token = ok(server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--audience",
        "aud-1",
        "--audience",
        "aud-2",
        "--ttl",
        "60",
    ]));
    assert_eq!(token.lines().count(), 1, "only the token: {token}");
    let validated = tessera_spiffe::jwt::validate(token.trim(), &bundle, &["aud-1"], SystemTime::now()).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), "spiffe://example.org/web");
    assert_eq!(validated.audience(), ["aud-1", "aud-2"]);
    assert!(tessera_spiffe::jwt::validate(token.trim(), &bundle, &["other"], SystemTime::now()).is_err());

    let minted = json(server.cli(&[
        "jwt",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/db",
        "--audience",
        "db",
        "--output",
        "json",
    ]));
    let validated =
        tessera_spiffe::jwt::validate(minted["token"].as_str().unwrap(), &bundle, &["db"], SystemTime::now()).unwrap();
    assert_eq!(validated.spiffe_id().as_str(), "spiffe://example.org/db");
    assert!(minted["expires_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn mint_errors_are_one_clear_line() {
    let server = ServerProcess::start();
    let x509 = |args: &[&str]| {
        let mut all = vec!["x509", "mint"];
        all.extend_from_slice(args);
        server.cli(&all)
    };
    fails(x509(&["--spiffe-id", "spiffe://other.org/web"]), "invalid spiffe_id");
    fails(x509(&["--spiffe-id", "spiffe://example.org"]), "invalid spiffe_id");
    fails(x509(&["--spiffe-id", "web"]), "invalid spiffe_id");
    fails(x509(&["--spiffe-id", "spiffe://example.org/web", "--ttl", "0"]), "--ttl");
    fails(x509(&["--spiffe-id", "spiffe://example.org/web", "--dns-name", "bad name"]), "invalid dns_names");
    fails(x509(&["--spiffe-id", "spiffe://example.org/web", "--dns-name", "a..b.example.org"]), "invalid dns_names");
    // --write under a regular file cannot be created.
    let file = server.dir.path().join("plain");
    std::fs::write(&file, "x").unwrap();
    let target = file.join("out");
    fails(
        x509(&["--spiffe-id", "spiffe://example.org/web", "--write", target.to_str().unwrap()]),
        &format!("cannot create directory {}", target.display()),
    );
    assert!(!Path::new(&target).exists());

    let jwt = |args: &[&str]| {
        let mut all = vec!["jwt", "mint"];
        all.extend_from_slice(args);
        server.cli(&all)
    };
    fails(jwt(&["--spiffe-id", "spiffe://other.org/web", "--audience", "a"]), "invalid spiffe_id");
    fails(jwt(&["--spiffe-id", "spiffe://example.org/web", "--audience", ""]), "invalid audiences");
    fails(jwt(&["--spiffe-id", "spiffe://example.org/web", "--audience", "a", "--ttl", "0"]), "--ttl");
    // A missing --audience is a usage error from the argument parser (exit 2).
    let output = jwt(&["--spiffe-id", "spiffe://example.org/web"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--audience"), "{}", stderr(&output));
}
