//! The reference docs cannot drift from the code: every configuration key the server accepts
//! is documented in docs/server-configuration.md (whose defaults file parses to the built-in
//! defaults), and every subcommand and flag of the binary in docs/server-cli.md.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use clap::CommandFactory;
use tessera_server::cli::Cli;
use tessera_server::config::{self, SERVER_KEYS, ServerConfig};

fn doc(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

#[test]
fn every_config_key_has_a_row_in_the_configuration_reference() {
    let text = doc("server-configuration.md");
    let missing: Vec<_> = SERVER_KEYS.iter().filter(|key| !text.contains(&format!("| `{key}` |"))).collect();
    assert!(missing.is_empty(), "keys without a row in docs/server-configuration.md: {missing:?}");
}

#[test]
fn the_documented_defaults_file_is_the_built_in_defaults() {
    let text = doc("server-configuration.md");
    let start = text.find("```toml\n").expect("a ```toml block") + "```toml\n".len();
    let block = &text[start..start + text[start..].find("```").unwrap()];
    let parsed = config::parse(block, Path::new("server-configuration.md")).unwrap();
    assert_eq!(parsed, ServerConfig::default());
}

/// Every leaf subcommand as (path words, long flags).
fn leaves(command: &clap::Command, prefix: &[String], out: &mut Vec<(Vec<String>, Vec<String>)>) {
    for sub in command.get_subcommands() {
        let mut path = prefix.to_vec();
        path.push(sub.get_name().to_owned());
        if sub.has_subcommands() {
            leaves(sub, &path, out);
        } else {
            let flags = sub.get_arguments().filter_map(|arg| arg.get_long()).map(|long| format!("--{long}")).collect();
            out.push((path, flags));
        }
    }
}

/// The text of the section whose heading names `` `path` ``, up to the next heading.
fn section<'a>(text: &'a str, path: &str) -> Option<&'a str> {
    let heading = format!("`{path}`");
    let start = text.lines().position(|line| line.starts_with('#') && line.contains(&heading))?;
    let lines: Vec<&str> = text.lines().collect();
    let end = lines[start + 1..].iter().position(|line| line.starts_with('#')).map_or(lines.len(), |n| start + 1 + n);
    let first = text.find(lines[start])?;
    let last = if end < lines.len() { text.find(lines[end]).unwrap_or(text.len()) } else { text.len() };
    Some(&text[first..last.max(first)])
}

#[test]
fn every_subcommand_and_flag_is_in_the_cli_reference() {
    let text = doc("server-cli.md");
    let mut all = Vec::new();
    leaves(&Cli::command(), &[], &mut all);
    let paths: Vec<String> = all.iter().map(|(path, _)| path.join(" ")).collect();
    for expected in ["run", "healthcheck", "token generate", "entry create", "bundle set", "agent evict", "x509 mint"] {
        assert!(paths.iter().any(|p| p == expected), "{expected} missing from {paths:?}");
    }
    let conventions = {
        let start = text.find("## Conventions").expect("a Conventions section");
        let rest = &text[start + 3..];
        &text[start..start + 3 + rest.find("\n## ").unwrap_or(rest.len())]
    };
    let mut problems = Vec::new();
    for (path, flags) in &all {
        let path = path.join(" ");
        let Some(body) = section(&text, &path) else {
            problems.push(format!("no section for `{path}`"));
            continue;
        };
        for flag in flags {
            // The shared flags are documented once, under "Conventions".
            let documented = if flag == "--admin-socket" || flag == "--output" {
                conventions.contains(&format!("**`{flag}"))
            } else {
                body.contains(flag.as_str())
            };
            if !documented {
                problems.push(format!("`{path}` section does not mention {flag}"));
            }
        }
    }
    assert!(problems.is_empty(), "docs/server-cli.md is out of date:\n{}", problems.join("\n"));
}
