#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The systemd units under `deploy/systemd/`: `systemd-analyze verify` accepts them with no
//! warning (an unknown key or a misspelt value is only a warning to systemd, so any output
//! fails the test), `systemd-analyze security` rates their exposure under a ceiling, and the
//! units agree with the configuration files next to them (which the real loaders accept):
//! `data_dir` is the `StateDirectory=`, the sockets are in the `RuntimeDirectory=`.
//!
//! `systemd-analyze` comes with Debian's `systemd` package. Where it is missing the two tests
//! that run it say so on stderr and pass, unless `TESSERA_REQUIRE_SYSTEMD_ANALYZE=1`, which
//! makes a missing tool a failure (CI sets it after installing the package).
//!
//! `verify` checks that `ExecStart=` is executable, so it runs on copies of the units whose
//! binary paths point at the `tessera-server` and `tessera-agent` that `cargo test
//! --workspace` builds (`target/debug/`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn binary(name: &str) -> PathBuf {
    // target/debug/deps/<this test> -> target/debug/<name>
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(path.exists(), "{} not built: run `cargo build -p tessera-server -p tessera-agent`", path.display());
    path
}

/// `systemd-analyze`, or `None` (with a note on stderr) when it is not installed.
fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success());
    if found {
        return Some("systemd-analyze");
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_SYSTEMD_ANALYZE").is_none_or(|v| v != "1"),
        "systemd-analyze is required (TESSERA_REQUIRE_SYSTEMD_ANALYZE=1) but not installed: apt-get install systemd"
    );
    eprintln!("systemd-analyze is not installed (Debian package `systemd`): unit verification not run");
    None
}

/// The `[Service]` section: each key with its values in order (a key may repeat).
fn service_section(unit: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(dir().join(unit)).unwrap();
    let mut section = "";
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{unit}: not key=value: {line}"));
            keys.entry(key.to_owned()).or_default().push(value.to_owned());
        }
    }
    keys
}

fn one<'a>(keys: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match keys.get(key).map(Vec::as_slice) {
        Some([value]) => value,
        other => panic!("{key}= must be set exactly once, found {other:?}"),
    }
}

#[test]
fn systemd_analyze_verify_accepts_both_units_without_a_warning() {
    let Some(tool) = systemd_analyze() else { return };
    let copies = tempfile::Builder::new().prefix("units").tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, name) in [("tessera-server.service", "tessera-server"), ("tessera-agent.service", "tessera-agent")] {
        let text = std::fs::read_to_string(dir().join(unit)).unwrap();
        let installed = format!("/usr/bin/{name}");
        assert!(text.contains(&format!("ExecStart={installed} ")), "{unit}: ExecStart runs {installed}");
        let copy = copies.path().join(unit);
        std::fs::write(&copy, text.replace(&installed, binary(name).to_str().unwrap())).unwrap();
        units.push(copy);
    }
    let output = Command::new(tool).arg("verify").args(&units).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "systemd-analyze verify failed:\n{stdout}{stderr}");
    assert!(stderr.trim().is_empty() && stdout.trim().is_empty(), "systemd-analyze verify warned:\n{stdout}{stderr}");
}

#[test]
fn systemd_analyze_security_rates_both_units_under_a_ceiling() {
    let Some(tool) = systemd_analyze() else { return };
    // Exposure is 0.0 (locked down) to 10.0, given here in tenths. The server needs nothing;
    // the agent keeps CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH and sees the host's /proc.
    for (unit, ceiling) in [("tessera-server.service", 20), ("tessera-agent.service", 30)] {
        let output = Command::new(tool)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={ceiling}"))
            .arg(dir().join(unit))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let verdict = stdout.lines().rev().find(|line| line.contains("Overall exposure level")).unwrap_or_default();
        assert!(
            output.status.success(),
            "{unit}: exposure above {}.{}: {verdict}\n{}",
            ceiling / 10,
            ceiling % 10,
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(verdict.contains(unit), "{unit}: no verdict in:\n{stdout}");
    }
}

#[test]
fn both_units_are_hardened() {
    for unit in ["tessera-server.service", "tessera-agent.service"] {
        let keys = service_section(unit);
        for (key, expected) in [
            ("User", "tessera"),
            ("Group", "tessera"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
            ("RestrictSUIDSGID", "yes"),
            ("KillSignal", "SIGTERM"),
            ("UMask", "0077"),
        ] {
            assert_eq!(one(&keys, key), expected, "{unit}: {key}=");
        }
        assert!(matches!(one(&keys, "ProtectHome"), "yes" | "read-only"), "{unit}");
        assert_eq!(
            one(&keys, "CapabilityBoundingSet"),
            one(&keys, "AmbientCapabilities"),
            "{unit}: the bounding set is exactly what is granted"
        );
        assert_eq!(keys["SystemCallFilter"][0], "@system-service", "{unit}");
    }
    let server = service_section("tessera-server.service");
    assert_eq!(one(&server, "CapabilityBoundingSet"), "", "the server needs no capability");
    assert_eq!(one(&server, "ProtectProc"), "invisible");
    let agent = service_section("tessera-agent.service");
    assert_eq!(one(&agent, "CapabilityBoundingSet"), "CAP_SYS_PTRACE CAP_DAC_READ_SEARCH");
    assert!(!agent.contains_key("ProtectProc"), "the agent must see every process in /proc");
    assert!(!agent.contains_key("PrivateUsers"), "capabilities must count in the host's user namespace");
    let denied = agent["SystemCallFilter"].iter().filter(|v| v.starts_with('~')).cloned().collect::<Vec<_>>().join(" ");
    for call in ["ptrace", "process_vm_readv", "process_vm_writev"] {
        assert!(denied.contains(call), "the agent's CAP_SYS_PTRACE must not allow {call}");
    }
}

/// `StateDirectory=a/b` is `/var/lib/a/b`, `RuntimeDirectory=x` is `/run/x`.
#[test]
fn the_configuration_files_use_the_directories_systemd_creates() {
    let server_keys = service_section("tessera-server.service");
    assert_eq!(one(&server_keys, "ExecStart"), "/usr/bin/tessera-server run --config /etc/tessera/server.toml");
    let text = std::fs::read_to_string(dir().join("server.toml")).unwrap();
    let server = tessera_server::config::parse(&text, Path::new("server.toml")).unwrap();
    let state = Path::new("/var/lib").join(one(&server_keys, "StateDirectory"));
    let runtime = Path::new("/run").join(one(&server_keys, "RuntimeDirectory"));
    assert_eq!(server.data_dir, state);
    assert_eq!(one(&server_keys, "WorkingDirectory"), state.to_str().unwrap());
    assert!(server.admin_socket.starts_with(&runtime), "{}", server.admin_socket.display());

    let agent_keys = service_section("tessera-agent.service");
    assert_eq!(one(&agent_keys, "ExecStart"), "/usr/bin/tessera-agent run --config /etc/tessera/agent.toml");
    let text = std::fs::read_to_string(dir().join("agent.toml")).unwrap();
    let agent = tessera_agent::config::parse(&text, Path::new("agent.toml")).unwrap();
    let state = Path::new("/var/lib").join(one(&agent_keys, "StateDirectory"));
    let runtime = Path::new("/run").join(one(&agent_keys, "RuntimeDirectory"));
    assert_eq!(agent.data_dir, state);
    assert!(agent.socket_path.starts_with(&runtime), "{}", agent.socket_path.display());
    assert!(agent.admin_socket.starts_with(&runtime), "{}", agent.admin_socket.display());
    assert_eq!(one(&agent_keys, "RuntimeDirectoryMode"), "0755", "workloads must reach the Workload API socket");
    assert!(agent.trust_bundle_path.as_deref().is_some_and(|p| p.starts_with("/etc/tessera")));
    assert_ne!(state, Path::new("/var/lib").join(one(&server_keys, "StateDirectory")), "separate data_dirs");

    let sysusers = std::fs::read_to_string(dir().join("tessera.sysusers.conf")).unwrap();
    assert!(sysusers.lines().any(|line| line.starts_with("u tessera ")), "the tessera user is declared");
}
