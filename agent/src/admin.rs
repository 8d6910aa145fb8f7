//! The agent's admin socket (`admin_socket`): a gRPC API for the node's operator, used by
//! `tessera-agent diagnose` and `tessera-agent show`.
//!
//! # Who may call
//!
//! The socket's directory is created 0700 (a shared sticky directory such as `/tmp` is never
//! changed; a warning says so), and every accepted connection is checked by its peer
//! credentials: only the agent's own effective uid and root are served; anyone else is logged
//! and closed before a byte of HTTP/2 is read. The answers reveal which selectors a process has
//! and which entries exist on the node, which a local user could otherwise only learn for
//! themselves.
//!
//! # Diagnose
//!
//! "Why did my workload get no identity?" For `--pid` the agent attests the process exactly as
//! the Workload API would (it reads `/proc/<pid>/status` for the effective uid and gid, then runs
//! the unix attestor, pinning the process); for `--uid` it derives only the `uid`, `user`, `gid`
//! (the user's primary group) and `group` selectors. Each synced entry is then compared with the
//! selectors ([`diagnose_entries`], pure): matching, or the selectors it lacks.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tessera_spiffe::selector::SelectorSet;
use tessera_wire::tessera::agent::admin::v1 as pb;
use tessera_wire::tessera::agent::admin::v1::agent_admin_service_server::{AgentAdminService, AgentAdminServiceServer};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::attestor::{PeerCredentials, ProcessFacts, UnixAttestor, derive_selectors};
use crate::cache::{AgentSnapshot, Cache};
use crate::manager::AgentStatus;

/// Why the admin socket could not be served.
#[derive(Debug, thiserror::Error)]
#[error("admin_socket {}: {reason}", path.display())]
pub struct AdminSocketError {
    /// The socket path.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

/// Prepares the socket's directory (0700), removes a stale socket nobody listens on, and binds.
pub fn bind_admin_socket(path: &Path) -> Result<UnixListener, AdminSocketError> {
    let fail = |reason: String| AdminSocketError { path: path.to_path_buf(), reason };
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|err| fail(format!("cannot create directory {}: {err}", parent.display())))?;
    let meta = fs::metadata(parent).map_err(|err| fail(format!("cannot inspect {}: {err}", parent.display())))?;
    if meta.mode() & 0o1000 != 0 {
        tracing::warn!(directory = %parent.display(), "the admin socket's directory is shared; put the socket in a private directory");
    } else if meta.mode() & 0o777 != 0o700 {
        fs::set_permissions(parent, Permissions::from_mode(0o700))
            .map_err(|err| fail(format!("cannot make {} private (0700): {err}", parent.display())))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(fail("exists and is not a socket; refusing to remove it".into()));
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(fail("another agent is listening on it".into()));
            }
            fs::remove_file(path).map_err(|err| fail(format!("cannot remove the stale socket: {err}")))?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(fail(format!("cannot inspect: {err}"))),
    }
    UnixListener::bind(path).map_err(|err| fail(format!("cannot bind: {err}")))
}

/// Whether a connection with these peer credentials may use the admin API.
fn peer_allowed(peer_uid: u32, own_uid: u32) -> bool {
    peer_uid == own_uid || peer_uid == 0
}

fn admit(stream: UnixStream, own_uid: u32) -> Option<UnixStream> {
    match stream.peer_cred() {
        Ok(cred) if peer_allowed(cred.uid(), own_uid) => Some(stream),
        Ok(cred) => {
            tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "agent admin connection refused: only the agent's uid and root may connect");
            None
        }
        Err(err) => {
            tracing::warn!(error = %err, "agent admin connection refused: cannot read its peer credentials");
            None
        }
    }
}

/// Serves the admin API on `listener` until `shutdown` completes, then removes the socket.
pub async fn serve(
    api: AgentAdmin,
    listener: UnixListener,
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AdminSocketError> {
    let own_uid = rustix::process::geteuid().as_raw();
    let incoming = UnixListenerStream::new(listener).filter_map(move |accepted| match accepted {
        Ok(stream) => admit(stream, own_uid).map(Ok),
        Err(err) => Some(Err(err)),
    });
    let served = tonic::transport::Server::builder()
        .add_service(AgentAdminServiceServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|err| AdminSocketError { path: path.clone(), reason: err.to_string() });
    if let Err(err) = fs::remove_file(&path)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %path.display(), error = %err, "cannot remove the admin socket");
    }
    served
}

/// The admin API.
#[derive(Debug, Clone)]
pub struct AgentAdmin {
    cache: Arc<Cache>,
    attestor: Arc<UnixAttestor>,
    status: watch::Receiver<AgentStatus>,
    trust_domain: String,
}

impl AgentAdmin {
    /// The admin API answering from the agent's cache, attestor and manager status.
    pub fn new(
        cache: Arc<Cache>,
        attestor: Arc<UnixAttestor>,
        status: watch::Receiver<AgentStatus>,
        trust_domain: String,
    ) -> Self {
        Self { cache, attestor, status, trust_domain }
    }
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// For every entry of `snapshot`: does it match `selectors`, and if not, what is missing.
/// Matching entries first, then by fewest missing selectors, then by SPIFFE ID. Pure.
pub fn diagnose_entries(snapshot: &AgentSnapshot, selectors: &SelectorSet) -> Vec<pb::EntryDiagnosis> {
    let mut entries: Vec<pb::EntryDiagnosis> = snapshot
        .entries()
        .map(|entry| {
            let missing: Vec<String> = entry.selectors.missing_from(selectors).map(ToString::to_string).collect();
            let svid = snapshot.identity(&entry.id);
            pb::EntryDiagnosis {
                entry_id: entry.id.to_string(),
                spiffe_id: entry.spiffe_id.to_string(),
                selectors: entry.selectors.iter().map(ToString::to_string).collect(),
                matches: missing.is_empty(),
                missing_selectors: missing,
                svid_issued: svid.is_some(),
                svid_expires_at: svid.map_or(0, |identity| unix_seconds(identity.svid.expires_at())),
            }
        })
        .collect();
    entries.sort_by(|a, b| {
        (a.missing_selectors.len(), &a.spiffe_id, &a.entry_id).cmp(&(
            b.missing_selectors.len(),
            &b.spiffe_id,
            &b.entry_id,
        ))
    });
    entries
}

/// The effective uid and gid of a running process (`/proc/<pid>/status`).
fn process_credentials(pid: u32) -> Result<PeerCredentials, Status> {
    if pid == 0 {
        return Err(Status::invalid_argument("pid: must be a positive process ID"));
    }
    let status = fs::read(format!("/proc/{pid}/status")).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => Status::not_found(format!("no process with pid {pid}")),
        _ => Status::unavailable(format!("cannot read /proc/{pid}/status: {err}")),
    })?;
    let parsed = crate::attestor::procfs::parse_status(&status)
        .map_err(|reason| Status::internal(format!("/proc/{pid}/status: {reason}")))?;
    Ok(PeerCredentials { pid, uid: parsed.effective_uid(), gid: parsed.effective_gid() })
}

/// The `unix:uid`, `user`, `gid` and `group` selectors of a uid (the gid is the user's primary
/// group from the user database; without an entry there, only `unix:uid`... and `unix:gid` of
/// the same number are not guessed: only `unix:uid` is returned).
fn uid_selectors(uid: u32) -> Result<SelectorSet, Status> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map_err(|err| Status::unavailable(format!("cannot look up uid {uid}: {err}")))?;
    let Some(user) = user else {
        let facts = ProcessFacts::new(uid, 0);
        let uid_only: SelectorSet =
            derive_selectors(&facts).iter().filter(|selector| selector.value().starts_with("uid:")).cloned().collect();
        return Ok(uid_only);
    };
    let gid = user.gid.as_raw();
    let group = nix::unistd::Group::from_gid(user.gid).ok().flatten().map(|group| group.name);
    let facts = ProcessFacts { user_name: Some(user.name), group_name: group, ..ProcessFacts::new(uid, gid) };
    Ok(derive_selectors(&facts))
}

#[tonic::async_trait]
impl AgentAdminService for AgentAdmin {
    async fn diagnose(&self, request: Request<pb::DiagnoseRequest>) -> Result<Response<pb::DiagnoseResponse>, Status> {
        let target =
            request.into_inner().target.ok_or_else(|| Status::invalid_argument("pid or uid: one must be set"))?;
        let attestor = Arc::clone(&self.attestor);
        let (subject, selectors) = tokio::task::spawn_blocking(move || match target {
            pb::diagnose_request::Target::Pid(pid) => {
                let peer = process_credentials(pid)?;
                let attestation = attestor
                    .attest_blocking(&peer)
                    .map_err(|err| Status::failed_precondition(format!("cannot attest pid {pid}: {err}")))?;
                Ok::<_, Status>((
                    format!("pid {pid} (uid {}, gid {})", peer.uid, peer.gid),
                    attestation.selectors().clone(),
                ))
            }
            pb::diagnose_request::Target::Uid(uid) => Ok((format!("uid {uid}"), uid_selectors(uid)?)),
        })
        .await
        .map_err(|err| Status::internal(format!("diagnosis did not finish: {err}")))??;
        let snapshot = self.cache.current();
        tracing::info!(subject = %subject, "diagnosis requested on the admin socket");
        Ok(Response::new(pb::DiagnoseResponse {
            subject,
            selectors: selectors.iter().map(ToString::to_string).collect(),
            entries: diagnose_entries(&snapshot, &selectors),
            synced: snapshot.ready,
        }))
    }

    async fn show(&self, _: Request<pb::ShowRequest>) -> Result<Response<pb::ShowResponse>, Status> {
        let status = self.status.borrow().clone();
        let snapshot = self.cache.current();
        let soonest = snapshot.identities().map(|identity| identity.svid.expires_at()).min();
        Ok(Response::new(pb::ShowResponse {
            trust_domain: self.trust_domain.clone(),
            agent_id: status.agent_id.as_ref().map(ToString::to_string).unwrap_or_default(),
            attested: status.attested,
            agent_svid_expires_at: status.agent_svid_expires_at.map_or(0, unix_seconds),
            connected: status.connected,
            last_sync: status.last_sync.map_or(0, unix_seconds),
            revision: status.revision,
            entries: snapshot.entry_count() as u64,
            svids: snapshot.identity_count() as u64,
            soonest_svid_expires_at: soonest.map_or(0, unix_seconds),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }
}

#[cfg(test)]
mod tests {

    use tessera_spiffe::SpiffeId;
    use tessera_spiffe::bundle::{Bundle, BundleSet};
    use tessera_spiffe::spiffe_id::TrustDomain;

    use super::*;
    use crate::cache::CachedEntry;

    #[test]
    fn only_own_uid_and_root_are_admitted() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
    }

    #[test]
    fn entries_are_diagnosed_matching_first_with_missing_selectors() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut snapshot = AgentSnapshot::empty(BundleSet::new(Bundle::new(td)));
        let entry = |id: &str, selectors: &[&str]| {
            Arc::new(CachedEntry {
                id: id.into(),
                spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/{id}")).unwrap(),
                selectors: SelectorSet::parse_all(selectors).unwrap(),
                federates_with: Box::default(),
                hint: String::new(),
                revision: 1,
            })
        };
        for e in [
            entry("far", &["unix:uid:0", "unix:path:/bin/x"]),
            entry("near", &["unix:uid:1000", "unix:path:/usr/bin/app"]),
            entry("yes", &["unix:uid:1000"]),
        ] {
            snapshot.insert_entry(e);
        }
        let caller = SelectorSet::parse_all(&["unix:uid:1000", "unix:gid:1000"]).unwrap();
        let diagnosed = diagnose_entries(&snapshot, &caller);
        let order: Vec<&str> = diagnosed.iter().map(|d| d.entry_id.as_str()).collect();
        assert_eq!(order, ["yes", "near", "far"]);
        assert!(diagnosed[0].matches && !diagnosed[0].svid_issued);
        assert_eq!(diagnosed[1].missing_selectors, ["unix:path:/usr/bin/app"]);
        assert_eq!(diagnosed[2].missing_selectors.len(), 2);
    }
}
