#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `deploy/container/Containerfile`: a multi-stage build of the release profile whose runtime
//! stage runs as a non-root user, with a default server configuration the real loader accepts
//! and whose directories the image creates for that user. (Building the image needs a
//! container engine and network access, which the test suite does not assume.)

use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/container")
}

/// The instructions, with continuation lines joined.
fn instructions() -> Vec<String> {
    let text = std::fs::read_to_string(dir().join("Containerfile")).unwrap();
    let mut out: Vec<String> = Vec::new();
    let mut continued = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (trimmed, false),
        };
        if continued {
            let last = out.last_mut().unwrap();
            last.push(' ');
            last.push_str(body);
        } else {
            out.push(body.to_owned());
        }
        continued = continues;
    }
    out
}

#[test]
fn the_image_is_a_multi_stage_release_build_running_as_a_non_root_user() {
    let instructions = instructions();
    let stages: Vec<&String> = instructions.iter().filter(|i| i.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "multi-stage: {stages:?}");
    assert!(stages[0].ends_with(" AS build"), "{}", stages[0]);
    let build = instructions.iter().find(|i| i.contains("cargo build")).unwrap();
    assert!(build.contains("--release") && build.contains("--locked"), "{build}");
    for binary in ["tessera-server", "tessera-agent"] {
        assert!(build.contains(&format!("target/release/{binary}")), "{binary} is copied out");
    }
    let runtime: Vec<&String> =
        instructions.iter().skip_while(|i| !std::ptr::eq(*i, *stages.last().unwrap())).collect();
    let user = runtime.iter().rev().find_map(|i| i.strip_prefix("USER ")).expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid.parse::<u32>().is_ok_and(|uid| uid != 0), "USER {user} must be a non-root numeric uid");
    assert!(runtime.iter().any(|i| i == &&"STOPSIGNAL SIGTERM".to_owned()));
    assert!(runtime.iter().any(|i| i.starts_with("COPY --from=build ")), "binaries come from the build stage");

    // The default configuration loads, and the image creates its directories for that uid.
    let text = std::fs::read_to_string(dir().join("server.toml")).unwrap();
    let config = tessera_server::config::parse(&text, Path::new("server.toml")).unwrap();
    let setup = runtime.iter().find(|i| i.contains("useradd")).unwrap();
    assert!(setup.contains(&format!("--uid {uid}")), "{setup}");
    let socket_dir = config.admin_socket.parent().and_then(Path::parent).unwrap();
    for needed in [config.data_dir.as_path(), socket_dir] {
        assert!(
            setup.split_whitespace().any(|word| word == needed.to_str().unwrap()) && setup.contains("-o tessera"),
            "the image must create {} for the tessera user: {setup}",
            needed.display()
        );
    }
    assert!(
        runtime.iter().any(|i| i.contains("COPY deploy/container/server.toml /etc/tessera/server.toml")),
        "the default configuration is in the image"
    );
    let ignore = std::fs::read_to_string(dir().join("Containerfile.dockerignore")).unwrap();
    assert!(ignore.lines().any(|line| line.trim() == "target/"), "target/ stays out of the build context");
}
