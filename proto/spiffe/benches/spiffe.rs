//! Benchmarks of the SPIFFE core, each next to the raw limit it is held to, measured in the
//! same run:
//!
//! - `limit/ring_p256_sign`, `limit/ring_p256_verify`: the crypto floor (ring ECDSA P-256).
//! - `x509/leaf_from_csr`: parse a CSR, verify its proof of possession, build and sign a leaf.
//!   Its limit is one sign plus one verify.
//! - `x509/leaf_from_public_key`: build and sign a leaf for a key already proven. Limit: one sign.
//! - `x509/verify_svid`: validate a leaf against its bundle. Limit: one verify.
//! - `jwt/mint_es256`, `jwt/validate_es256`: JWT-SVIDs. Limits: one sign, one verify.
//! - `spiffe_id/parse`: the strict SPIFFE ID parser (no crypto limit applies).
//!
//! Run with `cargo bench -p tessera-spiffe --bench spiffe`. After criterion's own report the
//! bench prints a table of each figure as operations per second and as a ratio to its limit,
//! read back from criterion's estimates, so machines of different speeds compare fairly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::HashMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::rand::SystemRandom;
use ring::signature::{self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
use tessera_spiffe::bundle::Bundle;
use tessera_spiffe::jwt::{self, JwtSvidClaims};
use tessera_spiffe::keys::{KeyType, SigningKey};
use tessera_spiffe::x509::{CaTemplate, X509Issuer, X509SvidTemplate, verify_csr, verify_x509_svid};
use tessera_spiffe::{SpiffeId, TrustDomain};

const MESSAGE: &[u8] = b"tessera benchmark message of typical to-be-signed size ................";

fn limits(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let sig = key.sign(&rng, MESSAGE).unwrap();
    let public = signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref().to_vec());
    let mut group = c.benchmark_group("limit");
    group.bench_function("ring_p256_sign", |b| b.iter(|| key.sign(&rng, black_box(MESSAGE)).unwrap()));
    group.bench_function("ring_p256_verify", |b| {
        b.iter(|| public.verify(black_box(MESSAGE), black_box(sig.as_ref())).unwrap())
    });
    group.finish();
}

struct Ca {
    issuer: X509Issuer,
    trust_domain: TrustDomain,
}

fn ca(now: SystemTime) -> Ca {
    let rng = SystemRandom::new();
    let trust_domain = TrustDomain::new("example.org").unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = CaTemplate::new(trust_domain.clone(), Duration::from_secs(86_400))
        .unwrap()
        .self_signed(&key, now, &rng)
        .unwrap();
    Ca { issuer: X509Issuer::new(der, key).unwrap(), trust_domain }
}

fn x509(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let now = SystemTime::now();
    let ca = ca(now);
    let template = X509SvidTemplate::new(
        SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let workload_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&workload_key).unwrap();
    let csr_der = csr.der().to_vec();
    let spki = verify_csr(&csr_der).unwrap();
    let leaf = ca.issuer.sign_x509_svid(&template, &spki, now, &rng).unwrap();
    let mut bundles: HashMap<TrustDomain, Vec<Vec<u8>>> = HashMap::new();
    bundles.insert(ca.trust_domain.clone(), vec![ca.issuer.certificate_der().to_vec()]);

    let mut group = c.benchmark_group("x509");
    group.bench_function("leaf_from_csr", |b| {
        b.iter(|| ca.issuer.sign_x509_svid_from_csr(&template, black_box(&csr_der), now, &rng).unwrap())
    });
    group.bench_function("leaf_from_public_key", |b| {
        b.iter(|| ca.issuer.sign_x509_svid(&template, black_box(&spki), now, &rng).unwrap())
    });
    group.bench_function("verify_svid", |b| {
        b.iter(|| verify_x509_svid(&[black_box(&leaf[..])], &bundles, now).unwrap())
    });
    group.finish();
}

fn jwt_svids(c: &mut Criterion) {
    let rng = SystemRandom::new();
    let now = SystemTime::now();
    let key = SigningKey::generate(KeyType::EcP256, &rng).unwrap();
    let subject = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
    let audiences = vec!["spiffe://example.org/db".to_owned()];
    let claims = JwtSvidClaims {
        subject: subject.clone(),
        audience: audiences.clone(),
        issued_at: now,
        expires_at: now + Duration::from_secs(300),
        issuer: None,
        jwt_id: None,
    };
    let token = jwt::sign(&claims, &key, "bench-key", &rng).unwrap();
    let mut bundle = Bundle::new(subject.trust_domain());
    bundle.add_jwt_authority("bench-key".to_owned(), key.public_key().clone()).unwrap();

    let mut group = c.benchmark_group("jwt");
    group.bench_function("mint_es256", |b| b.iter(|| jwt::sign(black_box(&claims), &key, "bench-key", &rng).unwrap()));
    group.bench_function("validate_es256", |b| {
        b.iter(|| jwt::validate(black_box(&token), &bundle, &audiences, now).unwrap())
    });
    group.finish();
}

fn spiffe_ids(c: &mut Criterion) {
    let mut group = c.benchmark_group("spiffe_id");
    group.bench_function("parse", |b| {
        b.iter(|| SpiffeId::parse(black_box("spiffe://example.org/ns/default/sa/web")).unwrap())
    });
    group.finish();
}

criterion_group!(benches, limits, x509, jwt_svids, spiffe_ids);

/// Where criterion stored its estimates: `$CRITERION_HOME`, else `<target dir>/criterion`.
fn criterion_dir() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return Some(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        return Some(PathBuf::from(target).join("criterion"));
    }
    // The bench runs as <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.parent()?.join("criterion"))
}

/// Median time per operation in nanoseconds, as criterion estimated it in this run.
fn median_ns(dir: &std::path::Path, id: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(id).join("new").join("estimates.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["median"]["point_estimate"].as_f64()
}

fn print_ratios() {
    let Some(dir) = criterion_dir() else { return };
    let get = |id: &str| median_ns(&dir, id);
    let (Some(sign), Some(verify)) = (get("limit/ring_p256_sign"), get("limit/ring_p256_verify")) else {
        eprintln!("(no limit probe results found under {}; run the whole bench to get ratios)", dir.display());
        return;
    };
    // (figure, limit name, limit ns per op)
    let rows = [
        ("x509/leaf_from_csr", "1/(sign+verify)", sign + verify),
        ("x509/leaf_from_public_key", "1/sign", sign),
        ("x509/verify_svid", "1/verify", verify),
        ("jwt/mint_es256", "1/sign", sign),
        ("jwt/validate_es256", "1/verify", verify),
    ];
    println!();
    println!("{:<28} {:>12} {:>18} {:>12} {:>7}", "figure", "ops/s", "limit", "limit ops/s", "ratio");
    for (id, limit_name, limit_ns) in rows {
        if let Some(ns) = get(id) {
            println!("{id:<28} {:>12.0} {limit_name:>18} {:>12.0} {:>7.2}", 1e9 / ns, 1e9 / limit_ns, limit_ns / ns);
        }
    }
    if let Some(ns) = get("spiffe_id/parse") {
        println!("{:<28} {:>12.0} {:>18} {:>12} {:>7}", "spiffe_id/parse", 1e9 / ns, "-", "-", "-");
    }
    println!("(limits: ring P-256 sign {:.0}/s, verify {:.0}/s, same run, one core)", 1e9 / sign, 1e9 / verify);
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios();
}
