//! Who is calling: the security header, the socket peer credentials, and the explanation
//! logged when a caller gets no identity.

use std::fmt::Write as _;

use tessera_common::audit::{AuditEvent, AuditLog};
use tessera_spiffe::selector::SelectorSet;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tonic::transport::server::UdsConnectInfo;

use crate::attestor::{AttestError, PeerCredentials};
use crate::cache::AgentSnapshot;

/// The gRPC metadata key every Workload API request must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Status message of a missing or wrong security header.
pub(crate) const SECURITY_HEADER_MISSING: &str = "security header missing from request";

/// Status message when the caller has no identity (or not the requested one).
pub(crate) const NO_IDENTITY: &str = "no identity issued";

/// Status message prefix when the caller could not be attested.
pub(crate) const ATTESTATION_FAILED: &str = "workload attestation failed";

/// How many entries the "no identity" log line explains, closest matches first.
const EXPLAINED_ENTRIES: usize = 10;

/// spec: exactly one `workload.spiffe.io` value, exactly `true` (case-sensitive); anything
/// else is InvalidArgument. This guards against a browser or SSRF-able HTTP client being made
/// to call the agent: they cannot set arbitrary gRPC metadata.
pub(crate) fn check_security_header(metadata: &MetadataMap) -> Result<(), Status> {
    let mut values = metadata.get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.as_encoded_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(SECURITY_HEADER_MISSING)),
    }
}

/// The caller's peer credentials, captured by the kernel when it connected.
pub(crate) fn peer_credentials(info: Option<&UdsConnectInfo>) -> Result<PeerCredentials, Status> {
    let cred = info.and_then(|info| info.peer_cred).ok_or_else(|| {
        tracing::warn!("Workload API call without Unix socket peer credentials");
        Status::unavailable(format!("{ATTESTATION_FAILED}: no peer credentials on the connection"))
    })?;
    PeerCredentials::try_from(cred).map_err(|err| attestation_status(&err, None))
}

/// The status for a failed attestation or a failed `verify_still_same`: Unavailable, which
/// clients retry on a fresh connection. Agent-side problems are logged; a caller that went away
/// is only worth a debug line.
pub(crate) fn attestation_status(err: &AttestError, peer: Option<&PeerCredentials>) -> Status {
    let (pid, uid) = peer.map_or((0, 0), |p| (p.pid, p.uid));
    if err.is_caller_gone() {
        tracing::debug!(pid, uid, error = %err, "Workload API caller changed or went away; not answering");
    } else {
        tracing::warn!(pid, uid, error = %err, "workload attestation failed");
    }
    Status::unavailable(format!("{ATTESTATION_FAILED}: {err}"))
}

/// Logs, in one line, why a caller matched no entry: its pid, uid and selectors, and for the
/// closest entries on this node the selectors the caller lacks.
pub(crate) fn log_no_identity(
    audit: &AuditLog,
    method: &str,
    peer: &PeerCredentials,
    selectors: &SelectorSet,
    snapshot: &AgentSnapshot,
    requested: Option<&str>,
) {
    let selector_list: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    audit.emit(
        AuditEvent::new("workload.denied")
            .field("method", method)
            .field("pid", peer.pid)
            .field("uid", peer.uid)
            .field("gid", peer.gid)
            .field("selectors", selector_list.clone())
            .field("requested_spiffe_id", requested)
            .field("entries_on_node", snapshot.entry_count()),
    );
    let caller_selectors = selector_list.join(" ");
    let explanation = explain_no_identity(snapshot, selectors, requested, EXPLAINED_ENTRIES);
    tracing::warn!(
        method,
        pid = peer.pid,
        uid = peer.uid,
        gid = peer.gid,
        selectors = %caller_selectors,
        requested_spiffe_id = requested.unwrap_or(""),
        entries_on_node = snapshot.entry_count(),
        why = %explanation,
        "no identity issued to Workload API caller"
    );
}

/// Why a caller with `selectors` got no identity: for up to `limit` entries (fewest missing
/// selectors first) the entry ID, its SPIFFE ID and what is missing. Pure, for tests.
pub(crate) fn explain_no_identity(
    snapshot: &AgentSnapshot,
    selectors: &SelectorSet,
    requested: Option<&str>,
    limit: usize,
) -> String {
    if snapshot.entry_count() == 0 {
        return "this agent has no registration entries (create one with `tessera-server entry create \
                --parent-id <this agent's ID or alias> ...`)"
            .to_owned();
    }
    let mut candidates: Vec<(usize, String)> = snapshot
        .entries()
        .filter(|entry| requested.is_none_or(|id| entry.spiffe_id.as_str() == id))
        .map(|entry| {
            let missing: Vec<String> = entry.selectors.missing_from(selectors).map(ToString::to_string).collect();
            let reason = if missing.is_empty() {
                "matches, but its X.509-SVID has not been issued yet".to_owned()
            } else {
                format!("missing {}", missing.join(" "))
            };
            (missing.len(), format!("entry {} ({}): {reason}", entry.id, entry.spiffe_id))
        })
        .collect();
    if candidates.is_empty() {
        return format!("no entry on this agent has the requested SPIFFE ID {}", requested.unwrap_or(""));
    }
    candidates.sort();
    let total = candidates.len();
    let mut text = candidates.iter().take(limit).map(|(_, line)| line.as_str()).collect::<Vec<_>>().join("; ");
    if total > limit {
        let _ = write!(text, "; and {} more entries", total - limit);
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tessera_spiffe::SpiffeId;
    use tessera_spiffe::bundle::{Bundle, BundleSet};
    use tessera_spiffe::spiffe_id::TrustDomain;
    use tonic::metadata::MetadataValue;

    use super::*;
    use crate::cache::CachedEntry;

    #[test]
    fn the_header_must_be_exactly_one_lowercase_true() {
        let mut metadata = MetadataMap::new();
        assert_eq!(check_security_header(&metadata).unwrap_err().code(), tonic::Code::InvalidArgument);
        metadata.insert(SECURITY_HEADER, MetadataValue::from_static("True"));
        assert_eq!(check_security_header(&metadata).unwrap_err().message(), SECURITY_HEADER_MISSING);
        metadata.insert(SECURITY_HEADER, MetadataValue::from_static("true"));
        check_security_header(&metadata).unwrap();
        metadata.append(SECURITY_HEADER, MetadataValue::from_static("true"));
        assert!(check_security_header(&metadata).is_err());
    }

    fn entry(id: &str, spiffe_id: &str, selectors: &[&str]) -> Arc<CachedEntry> {
        Arc::new(CachedEntry {
            id: id.into(),
            spiffe_id: SpiffeId::parse(spiffe_id).unwrap(),
            selectors: SelectorSet::parse_all(selectors).unwrap(),
            federates_with: Box::default(),
            hint: String::new(),
            revision: 1,
        })
    }

    #[test]
    fn the_explanation_names_missing_selectors_closest_first() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut snapshot = AgentSnapshot::empty(BundleSet::new(Bundle::new(td)));
        assert!(explain_no_identity(&snapshot, &SelectorSet::new(), None, 10).contains("no registration entries"));
        for e in [
            entry("far", "spiffe://example.org/far", &["unix:uid:0", "unix:path:/bin/x"]),
            entry("near", "spiffe://example.org/near", &["unix:uid:1000", "unix:path:/usr/bin/app"]),
            entry("pending", "spiffe://example.org/pending", &["unix:uid:1000"]),
        ] {
            snapshot.insert_entry(e);
        }
        let caller = SelectorSet::parse_all(&["unix:uid:1000", "unix:path:/usr/bin/other"]).unwrap();
        let text = explain_no_identity(&snapshot, &caller, None, 2);
        assert_eq!(
            text,
            "entry pending (spiffe://example.org/pending): matches, but its X.509-SVID has not been issued yet; \
             entry near (spiffe://example.org/near): missing unix:path:/usr/bin/app; and 1 more entries"
        );
        let text = explain_no_identity(&snapshot, &caller, Some("spiffe://example.org/far"), 10);
        assert_eq!(text, "entry far (spiffe://example.org/far): missing unix:path:/bin/x unix:uid:0");
        let text = explain_no_identity(&snapshot, &caller, Some("spiffe://example.org/none"), 10);
        assert!(text.contains("no entry on this agent has the requested SPIFFE ID"));
    }
}
