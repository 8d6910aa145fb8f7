//! What the management subcommands print: one stable struct per output, shown as text or
//! serialized as JSON (`--output json`). The JSON field names are part of the CLI contract
//! for scripts: add fields, never rename them.

use std::io::Write as _;

use anyhow::Context as _;
use serde::Serialize;
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::common::v1 as common;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::is_json;
use crate::cli::OutputFormat;

/// Printing as text or JSON.
pub(super) trait Print: Serialize {
    /// The human-readable form, ending with a newline.
    fn human(&self) -> String;

    /// Prints on stdout in `format`.
    fn print(&self, format: OutputFormat) -> anyhow::Result<()> {
        let text = if is_json(format) {
            let mut json = serde_json::to_string_pretty(self).context("cannot encode the output as JSON")?;
            json.push('\n');
            json
        } else {
            self.human()
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write to stdout")
    }
}

/// Unix seconds as RFC 3339 (UTC); `None` for 0 ("not set").
pub(super) fn rfc3339(unix: i64) -> Option<String> {
    if unix == 0 {
        return None;
    }
    OffsetDateTime::from_unix_timestamp(unix).ok().and_then(|at| at.format(&Rfc3339).ok())
}

/// `healthcheck`.
#[derive(Debug, Serialize)]
pub(super) struct HealthOutput {
    pub(super) healthy: bool,
    pub(super) trust_domain: String,
    pub(super) version: String,
}

impl Print for HealthOutput {
    fn human(&self) -> String {
        format!("Server is healthy.\nTrust domain: {}\nVersion: {}\n", self.trust_domain, self.version)
    }
}

/// `token generate`.
#[derive(Debug, Serialize)]
pub(super) struct TokenOutput {
    pub(super) token: String,
    pub(super) expires_at: Option<String>,
    /// The node-alias entry created with `--spiffe-id`.
    pub(super) entry_id: Option<String>,
}

impl Print for TokenOutput {
    fn human(&self) -> String {
        let mut text = format!("Token: {}\n", self.token);
        if let Some(at) = &self.expires_at {
            text.push_str(&format!("Expires at: {at}\n"));
        }
        if let Some(id) = &self.entry_id {
            text.push_str(&format!("Entry ID: {id}\n"));
        }
        text
    }
}

/// One registration entry.
#[derive(Debug, Serialize)]
pub(super) struct EntryOutput {
    pub(super) id: String,
    pub(super) spiffe_id: String,
    pub(super) parent_id: String,
    /// `type:value` strings.
    pub(super) selectors: Vec<String>,
    /// Seconds; `null` means the server default.
    pub(super) x509_svid_ttl: Option<u32>,
    pub(super) jwt_svid_ttl: Option<u32>,
    pub(super) dns_names: Vec<String>,
    pub(super) federates_with: Vec<String>,
    pub(super) hint: String,
    pub(super) admin: bool,
    pub(super) downstream: bool,
    /// RFC 3339; `null` means never.
    pub(super) expires_at: Option<String>,
    pub(super) revision: u64,
}

impl From<&common::Entry> for EntryOutput {
    fn from(entry: &common::Entry) -> Self {
        Self {
            id: entry.id.clone(),
            spiffe_id: entry.spiffe_id.clone(),
            parent_id: entry.parent_id.clone(),
            selectors: entry.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect(),
            x509_svid_ttl: (entry.x509_svid_ttl != 0).then_some(entry.x509_svid_ttl),
            jwt_svid_ttl: (entry.jwt_svid_ttl != 0).then_some(entry.jwt_svid_ttl),
            dns_names: entry.dns_names.clone(),
            federates_with: entry.federates_with.clone(),
            hint: entry.hint.clone(),
            admin: entry.admin,
            downstream: entry.downstream,
            expires_at: rfc3339(entry.expires_at),
            revision: entry.revision,
        }
    }
}

fn ttl_text(ttl: Option<u32>) -> String {
    ttl.map_or_else(|| "default".to_owned(), |secs| format!("{secs}s"))
}

impl Print for EntryOutput {
    fn human(&self) -> String {
        let mut text = format!(
            "Entry ID: {}\nSPIFFE ID: {}\nParent ID: {}\nRevision: {}\nX509-SVID TTL: {}\nJWT-SVID TTL: {}\n",
            self.id,
            self.spiffe_id,
            self.parent_id,
            self.revision,
            ttl_text(self.x509_svid_ttl),
            ttl_text(self.jwt_svid_ttl)
        );
        for selector in &self.selectors {
            text.push_str(&format!("Selector: {selector}\n"));
        }
        for name in &self.dns_names {
            text.push_str(&format!("DNS name: {name}\n"));
        }
        for td in &self.federates_with {
            text.push_str(&format!("Federates with: {td}\n"));
        }
        if !self.hint.is_empty() {
            text.push_str(&format!("Hint: {}\n", self.hint));
        }
        if self.admin {
            text.push_str("Admin: true\n");
        }
        if self.downstream {
            text.push_str("Downstream: true\n");
        }
        if let Some(at) = &self.expires_at {
            text.push_str(&format!("Expires at: {at}\n"));
        }
        text
    }
}

/// `entry show`.
#[derive(Debug, Serialize)]
pub(super) struct EntryList {
    pub(super) entries: Vec<EntryOutput>,
}

impl Print for EntryList {
    fn human(&self) -> String {
        let noun = if self.entries.len() == 1 { "entry" } else { "entries" };
        let mut text = format!("Found {} {noun}\n", self.entries.len());
        for entry in &self.entries {
            text.push('\n');
            text.push_str(&entry.human());
        }
        text
    }
}

/// `entry count`.
#[derive(Debug, Serialize)]
pub(super) struct CountOutput {
    pub(super) count: u64,
}

impl Print for CountOutput {
    fn human(&self) -> String {
        let noun = if self.count == 1 { "entry" } else { "entries" };
        format!("{} registration {noun}\n", self.count)
    }
}

/// A command that only acknowledges (`entry delete`, `agent ban`...).
#[derive(Debug, Serialize)]
pub(super) struct Done {
    /// `deleted`, `banned`, `evicted`, `set`.
    pub(super) action: &'static str,
    /// What it was done to.
    pub(super) id: String,
}

impl Print for Done {
    fn human(&self) -> String {
        format!("{} {}\n", capitalized(self.action), self.id)
    }
}

fn capitalized(word: &str) -> String {
    let mut chars = word.chars();
    chars.next().map(|first| first.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// One attested agent.
#[derive(Debug, Serialize)]
pub(super) struct AgentOutput {
    pub(super) spiffe_id: String,
    pub(super) attestation_type: String,
    pub(super) serial: String,
    pub(super) expires_at: Option<String>,
    pub(super) banned: bool,
    pub(super) selectors: Vec<String>,
}

impl From<&pb::Agent> for AgentOutput {
    fn from(agent: &pb::Agent) -> Self {
        Self {
            spiffe_id: agent.spiffe_id.clone(),
            attestation_type: agent.attestation_type.clone(),
            serial: agent.serial.clone(),
            expires_at: rfc3339(agent.expires_at),
            banned: agent.banned,
            selectors: agent.selectors.iter().map(|s| format!("{}:{}", s.r#type, s.value)).collect(),
        }
    }
}

impl Print for AgentOutput {
    fn human(&self) -> String {
        let mut text = format!(
            "SPIFFE ID: {}\nAttestation type: {}\nSerial: {}\nExpires at: {}\nBanned: {}\n",
            self.spiffe_id,
            self.attestation_type,
            self.serial,
            self.expires_at.as_deref().unwrap_or("-"),
            self.banned
        );
        for selector in &self.selectors {
            text.push_str(&format!("Selector: {selector}\n"));
        }
        text
    }
}

/// `agent list`.
#[derive(Debug, Serialize)]
pub(super) struct AgentList {
    pub(super) agents: Vec<AgentOutput>,
}

impl Print for AgentList {
    fn human(&self) -> String {
        let noun = if self.agents.len() == 1 { "agent" } else { "agents" };
        let mut text = format!("Found {} attested {noun}\n", self.agents.len());
        for agent in &self.agents {
            text.push('\n');
            text.push_str(&agent.human());
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_text_and_json() {
        let entry = common::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec![common::Selector { r#type: "unix".into(), value: "uid:1000".into() }],
            x509_svid_ttl: 60,
            expires_at: 86_400,
            revision: 3,
            ..Default::default()
        };
        let out = EntryOutput::from(&entry);
        let text = out.human();
        assert!(text.starts_with("Entry ID: e1\n"), "{text}");
        assert!(text.contains("Selector: unix:uid:1000\n"));
        assert!(text.contains("X509-SVID TTL: 60s\nJWT-SVID TTL: default\n"));
        assert!(text.contains("Expires at: 1970-01-02T00:00:00Z\n"));
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["selectors"][0], "unix:uid:1000");
        assert_eq!(json["jwt_svid_ttl"], serde_json::Value::Null);
    }

    #[test]
    fn lists_count_their_items() {
        assert_eq!(EntryList { entries: vec![] }.human(), "Found 0 entries\n");
        assert_eq!(AgentList { agents: vec![] }.human(), "Found 0 attested agents\n");
        assert_eq!(Done { action: "deleted", id: "e1".into() }.human(), "Deleted e1\n");
    }
}
