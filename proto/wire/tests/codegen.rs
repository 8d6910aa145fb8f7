#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Code generation for `tessera-wire`, and the check that the committed code is current.
//!
//! The Rust code under `proto/wire/src/gen/` is generated from the `.proto` files under
//! `proto/schema/` by this test, with `protox` (a protobuf compiler written in Rust, so no
//! system `protoc` is needed) and `tonic-prost-build`. It is committed, so building the crate
//! needs neither.
//!
//! - `cargo test -p tessera-wire --test codegen` regenerates into a temporary directory and
//!   fails if anything differs from the committed files.
//! - `TESSERA_REGENERATE=1 cargo test -p tessera-wire --test codegen` rewrites
//!   `proto/wire/src/gen/` instead. Run it after editing a `.proto` file and commit the result.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The command that refreshes the committed code.
const REFRESH_COMMAND: &str = "TESSERA_REGENERATE=1 cargo test -p tessera-wire --test codegen";

/// Domain used in the type URLs of `google.protobuf.Any` values (`prost::Name::type_url`).
const TYPE_URL_DOMAIN: &str = "type.googleapis.com";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn schema_dir() -> PathBuf {
    crate_dir().join("../schema")
}

fn committed_dir() -> PathBuf {
    crate_dir().join("src/gen")
}

/// Every `.proto` file under `dir`, as paths relative to `dir`, sorted.
fn proto_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort();
    files
}

/// Generates the Rust code for every schema file into `out_dir`.
fn generate(out_dir: &Path) {
    let schema = schema_dir();
    let files = proto_files(&schema);
    assert!(!files.is_empty(), "no .proto files under {}", schema.display());

    let fds = protox::compile(&files, [&schema]).unwrap_or_else(|err| panic!("compiling the schema failed: {err:?}"));

    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names().type_name_domain(["."], TYPE_URL_DOMAIN);

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .out_dir(out_dir)
        .compile_fds_with_config(fds, config)
        .unwrap_or_else(|err| panic!("generating Rust code failed: {err}"));
}

/// The `.rs` files directly in `dir`, by file name.
fn read_rs_files(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "rs") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, fs::read_to_string(&path).unwrap());
        }
    }
    files
}

#[test]
fn generated_code_is_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let fresh = read_rs_files(tmp.path());
    assert!(!fresh.is_empty(), "code generation produced no files");

    let committed_path = committed_dir();

    if std::env::var_os("TESSERA_REGENERATE").is_some_and(|v| v == "1") {
        fs::create_dir_all(&committed_path).unwrap();
        for name in read_rs_files(&committed_path).keys() {
            if !fresh.contains_key(name) {
                fs::remove_file(committed_path.join(name)).unwrap();
            }
        }
        for (name, content) in &fresh {
            fs::write(committed_path.join(name), content).unwrap();
        }
        eprintln!("regenerated {} files in {}", fresh.len(), committed_path.display());
        return;
    }

    let committed = read_rs_files(&committed_path);
    let mut problems = Vec::new();
    for (name, content) in &fresh {
        match committed.get(name) {
            None => problems.push(format!("missing: src/gen/{name}")),
            Some(old) if old != content => problems.push(format!("differs: src/gen/{name}")),
            Some(_) => {}
        }
    }
    for name in committed.keys() {
        if !fresh.contains_key(name) {
            problems.push(format!("stale (no longer generated): src/gen/{name}"));
        }
    }
    assert!(
        problems.is_empty(),
        "the generated code in proto/wire/src/gen is out of date with proto/schema:\n  {}\n\
         refresh it with:\n  {REFRESH_COMMAND}",
        problems.join("\n  ")
    );
}
