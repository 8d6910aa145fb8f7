//! `tessera-agent diagnose` and `tessera-agent show`: clients of the agent's admin socket.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use serde_json::json;
use tessera_wire::tessera::agent::admin::v1 as pb;
use tessera_wire::tessera::agent::admin::v1::agent_admin_service_client::AgentAdminServiceClient;
use tokio::net::UnixStream;
use tonic::transport::Channel;

use super::{CALL_TIMEOUT, CONNECT_TIMEOUT, block_on, channel, output};
use crate::cli::{AdminSocketArgs, DiagnoseArgs, OutputFormat};

/// How many non-matching entries a "nothing matches" answer lists in text output.
const NEAREST: usize = 5;

async fn connect(socket: &Path) -> anyhow::Result<AgentAdminServiceClient<Channel>> {
    let first = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(socket))
        .await
        .map_err(|_| anyhow!("cannot connect to the agent admin socket {}: timed out", socket.display()))?
        .map_err(|err| {
            anyhow!(
                "cannot connect to the agent admin socket {}: {err} (is tessera-agent running, and are you its user \
                 or root?)",
                socket.display()
            )
        })?;
    Ok(AgentAdminServiceClient::new(channel(first, socket).await?))
}

async fn call<T>(
    socket: &Path,
    answer: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, answer).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => {
            bail!("the agent admin socket {} answered {:?}: {}", socket.display(), status.code(), status.message())
        }
        Err(_) => {
            bail!("the agent admin socket {} did not answer within {}s", socket.display(), CALL_TIMEOUT.as_secs())
        }
    }
}

/// `tessera-agent diagnose --pid PID | --uid UID`.
pub fn diagnose(args: &DiagnoseArgs) -> anyhow::Result<()> {
    let target = match (args.pid, args.uid) {
        (Some(pid), None) => pb::diagnose_request::Target::Pid(pid),
        (None, Some(uid)) => pb::diagnose_request::Target::Uid(uid),
        _ => bail!("give exactly one of --pid and --uid"),
    };
    let socket = args.admin.admin_socket.clone();
    let response = block_on(async {
        let mut client = connect(&socket).await?;
        call(&socket, client.diagnose(pb::DiagnoseRequest { target: Some(target) })).await
    })?;
    match args.output {
        OutputFormat::Json => output::print_line(&diagnosis_json(&response).to_string()),
        OutputFormat::Human => output::print_line(diagnosis_text(&response).trim_end()),
    }
}

fn diagnosis_json(response: &pb::DiagnoseResponse) -> serde_json::Value {
    let entries: Vec<serde_json::Value> = response
        .entries
        .iter()
        .map(|entry| {
            json!({
                "entry_id": entry.entry_id,
                "spiffe_id": entry.spiffe_id,
                "selectors": entry.selectors,
                "matches": entry.matches,
                "missing_selectors": entry.missing_selectors,
                "svid_issued": entry.svid_issued,
                "svid_expires_at": (entry.svid_expires_at > 0).then(|| rfc3339(entry.svid_expires_at)),
            })
        })
        .collect();
    json!({
        "subject": response.subject,
        "synced": response.synced,
        "selectors": response.selectors,
        "matching_entries": response.entries.iter().filter(|e| e.matches).count(),
        "entries": entries,
    })
}

/// The human answer: selectors, then the matching entries, or a plain "no entry matches" with
/// the nearest entries and what each lacks.
fn diagnosis_text(response: &pb::DiagnoseResponse) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "Selectors of {}:", response.subject);
    for selector in &response.selectors {
        let _ = writeln!(text, "  {selector}");
    }
    let _ = writeln!(text);
    if !response.synced {
        let _ = writeln!(text, "The agent has not completed a sync with the server yet: no entry is known.");
        return text;
    }
    if response.entries.is_empty() {
        let _ = writeln!(
            text,
            "No registration entry is synced to this agent: create one parented to this agent (or its node alias) \
             with `tessera-server entry create`."
        );
        return text;
    }
    let matching: Vec<&pb::EntryDiagnosis> = response.entries.iter().filter(|e| e.matches).collect();
    if matching.is_empty() {
        let _ = writeln!(
            text,
            "No entry matches: this workload gets no identity. Nearest of the {} entries on this agent:",
            response.entries.len()
        );
        for entry in response.entries.iter().take(NEAREST) {
            let _ = writeln!(
                text,
                "  {} (entry {}): missing {}",
                entry.spiffe_id,
                entry.entry_id,
                entry.missing_selectors.join(" ")
            );
        }
        return text;
    }
    let _ = writeln!(text, "Matching entries ({} of {}):", matching.len(), response.entries.len());
    for entry in &matching {
        let svid = if entry.svid_issued {
            format!("X.509-SVID expires {}", rfc3339(entry.svid_expires_at))
        } else {
            "no X.509-SVID issued yet".to_owned()
        };
        let _ = writeln!(text, "  {} (entry {}): {svid}", entry.spiffe_id, entry.entry_id);
    }
    let others = response.entries.len() - matching.len();
    if others > 0 {
        let _ = writeln!(text, "{others} other entries do not match.");
    }
    text
}

/// `tessera-agent show`.
pub fn show(admin: &AdminSocketArgs, format: OutputFormat) -> anyhow::Result<()> {
    let socket = admin.admin_socket.clone();
    let response = block_on(async {
        let mut client = connect(&socket).await?;
        call(&socket, client.show(pb::ShowRequest {})).await
    })?;
    let time = |secs: i64| (secs > 0).then(|| rfc3339(secs));
    match format {
        OutputFormat::Json => output::print_line(
            &json!({
                "trust_domain": response.trust_domain,
                "agent_id": response.agent_id,
                "attested": response.attested,
                "agent_svid_expires_at": time(response.agent_svid_expires_at),
                "connected": response.connected,
                "last_sync": time(response.last_sync),
                "revision": response.revision,
                "entries": response.entries,
                "svids": response.svids,
                "soonest_svid_expires_at": time(response.soonest_svid_expires_at),
                "version": response.version,
            })
            .to_string(),
        ),
        OutputFormat::Human => {
            let mut text = String::new();
            let or_dash = |value: Option<String>| value.unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                text,
                "Agent ID        : {}",
                if response.agent_id.is_empty() { "-" } else { &response.agent_id }
            );
            let _ = writeln!(text, "Trust domain    : {}", response.trust_domain);
            let _ = writeln!(text, "Attested        : {}", response.attested);
            let _ = writeln!(text, "Agent SVID until: {}", or_dash(time(response.agent_svid_expires_at)));
            let _ = writeln!(text, "Connected       : {}", response.connected);
            let _ = writeln!(text, "Last sync       : {}", or_dash(time(response.last_sync)));
            let _ = writeln!(text, "Revision        : {}", response.revision);
            let _ = writeln!(text, "Entries         : {}", response.entries);
            let _ = writeln!(text, "X.509-SVIDs     : {}", response.svids);
            let _ = write!(text, "Soonest expiry  : {}", or_dash(time(response.soonest_svid_expires_at)));
            output::print_line(&text)
        }
    }
}

fn rfc3339(unix_seconds: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_seconds).unwrap_or(0));
    humantime::format_rfc3339_seconds(time.max(SystemTime::UNIX_EPOCH)).to_string()
}
