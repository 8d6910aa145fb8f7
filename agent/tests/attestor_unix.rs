//! The unix workload attestor against real processes: this test process, spawned children, a
//! real Unix socket, and executable files on disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![cfg(target_os = "linux")]

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_agent::attestor::{
    AttestError, ExecutableDigest, ExecutableDigests, PeerCredentials, PeerPidfd, PeerProcess, ProcessChange,
    ProcfsInspector, UnixAttestor, UnixAttestorConfig,
};
use tessera_spiffe::{Selector, SelectorSet};

fn me() -> PeerCredentials {
    PeerCredentials {
        pid: std::process::id(),
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    }
}

fn child_peer(child: &Child) -> PeerCredentials {
    PeerCredentials { pid: child.id(), ..me() }
}

fn unix(value: &str) -> Selector {
    Selector::new("unix", value).unwrap()
}

fn sha256_hex(path: &Path) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, &std::fs::read(path).unwrap()))
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

fn selectors_of_kind<'a>(set: &'a SelectorSet, prefix: &'a str) -> impl Iterator<Item = &'a Selector> + 'a {
    set.iter().filter(move |s| s.value().starts_with(prefix))
}

/// Waits until `condition` holds, for at most 10 s.
fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Spawns `program args`, and waits until the child runs `program` (not the forked test
/// binary before its exec).
fn spawn(program: &str, args: &[&str]) -> Child {
    let child = Command::new(program).args(args).spawn().unwrap();
    let pid = child.id();
    let test_binary = std::env::current_exe().unwrap();
    eventually("the child has exec'd", || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p != test_binary)
    });
    child
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn attests_the_test_process_itself() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let peer = me();
    let attestation = attestor.attest_blocking(&peer).unwrap();
    let selectors = attestation.selectors();

    assert!(selectors.contains(&unix(&format!("uid:{}", peer.uid))), "{selectors}");
    assert!(selectors.contains(&unix(&format!("gid:{}", peer.gid))), "{selectors}");
    let exe = std::env::current_exe().unwrap();
    assert!(selectors.contains(&unix(&format!("path:{}", exe.display()))), "{selectors}");
    assert!(selectors.contains(&unix(&format!("sha256:{}", sha256_hex(&exe)))), "{selectors}");
    for gid in rustix::process::getgroups().unwrap() {
        assert!(selectors.contains(&unix(&format!("supplementary_gid:{}", gid.as_raw()))), "{selectors}");
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid)).unwrap() {
        Some(user) => assert!(selectors.contains(&unix(&format!("user:{}", user.name))), "{selectors}"),
        None => assert_eq!(selectors_of_kind(selectors, "user:").count(), 0),
    }
    match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(peer.gid)).unwrap() {
        Some(group) => assert!(selectors.contains(&unix(&format!("group:{}", group.name))), "{selectors}"),
        None => assert_eq!(selectors_of_kind(selectors, "group:").count(), 0),
    }
    assert_eq!(selectors_of_kind(selectors, "sha256:").count(), 1);
    assert_eq!(attestation.pid(), peer.pid);
    attestation.verify_still_same().unwrap();

    let pinned = PeerProcess::open(&peer).unwrap();
    assert!(pinned.has_pidfd(), "this kernel should have pidfd_open (Linux 5.3+)");
    assert_eq!(pinned.status().effective_uid(), peer.uid);
    assert_eq!(pinned.start_time(), None, "a pidfd pins the process without its start time");
}

#[test]
fn a_child_that_exits_fails_verification() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig { max_sha256_file_size: 0, ..Default::default() });
    let mut child = spawn("sleep", &["30"]);
    let peer = child_peer(&child);
    let attestation = attestor.attest_blocking(&peer).unwrap();
    let path = exe_of(peer.pid);
    assert!(attestation.selectors().contains(&unix(&format!("path:{}", path.display()))));
    assert!(attestation.selectors().contains(&unix(&format!("uid:{}", peer.uid))));
    attestation.verify_still_same().unwrap();
    // A bare pin (no executable looked at) relies on the pidfd alone to see the exit.
    let pinned = PeerProcess::open(&peer).unwrap();

    // Killed but not reaped: a zombie is not the caller any more.
    child.kill().unwrap();
    eventually("the zombie fails verification", || attestation.verify_still_same().is_err());
    assert!(attestation.verify_still_same().unwrap_err().is_caller_gone());
    // The kernel marks the pidfd after the process's memory (and with it `/proc/<pid>/exe`)
    // is gone, so the bare pin may see the exit a moment later than the full check did.
    eventually("the bare pin sees the exit", || pinned.verify_still_same().is_err());
    let err = pinned.verify_still_same().unwrap_err();
    assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");

    // Reaped: the pid is free (and may be reused).
    child.wait().unwrap();
    let err = attestation.verify_still_same().unwrap_err();
    assert!(matches!(err, AttestError::ProcessGone { pid } if pid == peer.pid), "{err}");
    let err = attestor.attest_blocking(&peer).unwrap_err();
    assert!(err.is_caller_gone(), "{err}");
}

#[test]
fn an_exec_after_attestation_fails_verification() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let child = Reaped(spawn("sh", &["-c", "sleep 1; exec sleep 30"]));
    let peer = child_peer(&child.0);
    let attestation = attestor.attest_blocking(&peer).unwrap();
    let shell = exe_of(peer.pid);
    assert!(attestation.selectors().contains(&unix(&format!("path:{}", shell.display()))));
    eventually("the shell has exec'd sleep", || exe_of(peer.pid) != shell);
    let err = attestation.verify_still_same().unwrap_err();
    assert!(matches!(err, AttestError::ProcessChanged { change: ProcessChange::Executable, .. }), "{err}");
    assert!(err.is_caller_gone());
}

/// A process that changes its ids after attestation, without an `execve` (so its executable,
/// and its pidfd, are the same): the re-read of `/proc/<pid>/status` refuses it. Changing ids
/// needs root; as any other user the test only checks that the unchanged process verifies.
#[test]
fn a_change_of_ids_after_attestation_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    // perl (Essential in Debian) sets the effective gid and groups, then the effective uid,
    // once `go` exists; `$)` and `$>` call setgroups/setegid and seteuid in this process.
    let script = format!(
        "until (-e '{}') {{ select(undef, undef, undef, 0.01) }} $) = '65534 65534'; $> = 65534; sleep 30",
        go.display()
    );
    let child = Reaped(spawn("perl", &["-e", &script]));
    let peer = child_peer(&child.0);
    let attestor = UnixAttestor::new(&UnixAttestorConfig { max_sha256_file_size: 0, ..Default::default() });
    let attestation = attestor.attest_blocking(&peer).unwrap();
    attestation.verify_still_same().unwrap();
    if !rustix::process::getuid().is_root() {
        eprintln!("not root: the change of ids is skipped");
        return;
    }
    std::fs::write(&go, b"").unwrap();
    eventually("the child has changed its ids", || {
        std::fs::read_to_string(format!("/proc/{}/status", peer.pid)).unwrap().contains("Uid:\t0\t65534\t")
    });
    let err = attestation.verify_still_same().unwrap_err();
    assert!(matches!(err, AttestError::ProcessChanged { change: ProcessChange::Credentials, .. }), "{err}");
    assert!(err.is_caller_gone());
}

#[test]
fn a_deleted_executable_keeps_the_kernel_suffix_and_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("sleepy");
    let sleep = which("sleep");
    std::fs::copy(&sleep, &copy).unwrap();
    let digest = sha256_hex(&copy);
    let child = Reaped(spawn(copy.to_str().unwrap(), &["30"]));
    std::fs::remove_file(&copy).unwrap();

    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let attestation = attestor.attest_blocking(&child_peer(&child.0)).unwrap();
    let selectors = attestation.selectors();
    assert!(selectors.contains(&unix(&format!("path:{} (deleted)", copy.display()))), "{selectors}");
    assert!(selectors.contains(&unix(&format!("sha256:{digest}"))), "{selectors}");
    attestation.verify_still_same().unwrap();
}

fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{program} not found in PATH"))
}

/// An attestor over real processes, and its digest cache.
fn attestor_with_digests(config: &UnixAttestorConfig) -> (UnixAttestor, Option<Arc<ExecutableDigests>>) {
    let inspector = Arc::new(ProcfsInspector::new(config));
    let digests = inspector.digests().cloned();
    (UnixAttestor::with_inspector(inspector, config.max_blocking_inspections), digests)
}

#[test]
fn executables_over_the_limit_get_no_sha256_selector() {
    let (attestor, digests) =
        attestor_with_digests(&UnixAttestorConfig { max_sha256_file_size: 1024, ..Default::default() });
    let attestation = attestor.attest_blocking(&me()).unwrap();
    assert_eq!(selectors_of_kind(attestation.selectors(), "sha256:").count(), 0);
    assert_eq!(selectors_of_kind(attestation.selectors(), "path:").count(), 1);
    let digests = digests.unwrap();
    assert_eq!(digests.files_hashed(), 0);
    assert_eq!(digests.len(), 1, "the too-large outcome is cached");

    let (disabled, digests) =
        attestor_with_digests(&UnixAttestorConfig { max_sha256_file_size: 0, ..Default::default() });
    assert!(digests.is_none());
    let attestation = disabled.attest_blocking(&me()).unwrap();
    assert_eq!(selectors_of_kind(attestation.selectors(), "sha256:").count(), 0);
    assert_eq!(selectors_of_kind(attestation.selectors(), "path:").count(), 1);
}

#[tokio::test]
async fn digests_are_cached_across_attestations() {
    let (attestor, digests) = attestor_with_digests(&UnixAttestorConfig::default());
    let digests = digests.unwrap();
    // The first attestation hashes on the blocking pool, the next ones are served inline.
    let first = attestor.attest(me()).await.unwrap();
    let second = attestor.attest(me()).await.unwrap();
    let third = attestor.attest_blocking(&me()).unwrap();
    assert_eq!(digests.files_hashed(), 1);
    assert_eq!(first.selectors(), second.selectors());
    assert_eq!(second.selectors(), third.selectors());
}

#[test]
fn the_digest_cache_rehashes_changed_files_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bin");
    std::fs::write(&path, b"version one").unwrap();
    let digests = ExecutableDigests::new(64, 16);
    let sha =
        |content: &[u8]| ExecutableDigest::Sha256(hex::encode(ring::digest::digest(&ring::digest::SHA256, content)));

    assert_eq!(digests.digest_path(&path).unwrap(), sha(b"version one"));
    assert_eq!(digests.digest_path(&path).unwrap(), sha(b"version one"));
    assert_eq!(digests.files_hashed(), 1, "a cache hit does not read the file");

    // Same size, mtime restored: only ctime tells, and it must.
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(50)); // past the filesystem's timestamp granularity
    std::fs::write(&path, b"version two").unwrap();
    std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    assert_eq!(digests.digest_path(&path).unwrap(), sha(b"version two"));
    assert_eq!(digests.files_hashed(), 2);

    std::fs::write(&path, b"version three").unwrap();
    assert_eq!(digests.digest_path(&path).unwrap(), sha(b"version three"));
    assert_eq!(digests.files_hashed(), 3);

    let big = dir.path().join("big");
    std::fs::write(&big, vec![0u8; 65]).unwrap();
    assert_eq!(digests.digest_path(&big).unwrap(), ExecutableDigest::TooLarge { size: 65, limit: 64 });
    assert_eq!(digests.files_hashed(), 3, "a file over the limit is not read");
}

#[test]
fn peers_that_are_not_the_process_are_refused() {
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let peer = me();
    let err = attestor.attest_blocking(&PeerCredentials { uid: peer.uid.wrapping_add(1), ..peer }).unwrap_err();
    assert!(matches!(err, AttestError::CredentialsMismatch { .. }) && err.is_caller_gone(), "{err}");
    let err = attestor.attest_blocking(&PeerCredentials { pid: u32::MAX, ..peer }).unwrap_err();
    assert!(matches!(err, AttestError::NoPeerPid), "{err}");
}

#[tokio::test]
async fn a_real_unix_socket_peer_is_attested() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (client, accepted) = tokio::join!(tokio::net::UnixStream::connect(&socket), listener.accept());
    let _client = client.unwrap();
    let (server_side, _) = accepted.unwrap();

    let peer = PeerCredentials::try_from(server_side.peer_cred().unwrap()).unwrap();
    assert_eq!(peer, me());
    let attestor = UnixAttestor::new(&UnixAttestorConfig::default());
    let attestation = attestor.attest(peer).await.unwrap();
    assert!(attestation.selectors().contains(&unix(&format!("uid:{}", rustix::process::geteuid().as_raw()))));
    attestation.verify_still_same().unwrap();

    // The same through the connection's pidfd, when the kernel gives one.
    let pidfd = PeerPidfd::from_socket(&server_side);
    assert_eq!(pidfd.is_some(), kernel_at_least(6, 5));
    let through_socket = attestor.attest_connection(peer, pidfd.as_ref()).await.unwrap();
    assert_eq!(through_socket.selectors(), attestation.selectors());
    through_socket.verify_still_same().unwrap();
}

/// True when the running kernel is at least `major.minor` (`/proc/sys/kernel/osrelease`).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut numbers = release.trim().split(|c: char| !c.is_ascii_digit()).map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= (major, minor)
}

/// When set, the test process is the child of
/// [`a_connection_pins_the_process_that_connected_not_whoever_has_its_pid`]: it connects to
/// the socket at this path and exits once it reads a byte (or end of file).
const CONNECT_TO: &str = "TESSERA_TEST_ATTESTOR_CONNECT_TO";

/// The window SO_PEERPIDFD closes. A child C connects and is pinned through the connection's
/// pidfd; then C exits and is reaped, and the pid the socket reported stands for a live process
/// Q of the same user (the pid is not really reused: Q's pid is given instead, which is what
/// `/proc/<pid>` would show after a reuse). Through the connection's pidfd the caller is gone;
/// through `pidfd_open` of the pid (the fallback when the kernel has no SO_PEERPIDFD, forced
/// here by passing no pidfd) Q would be attested, and only its ids are compared.
#[test]
fn a_connection_pins_the_process_that_connected_not_whoever_has_its_pid() {
    if let Some(path) = std::env::var_os(CONNECT_TO) {
        let mut stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        let _ = stream.read(&mut [0u8; 1]);
        std::process::exit(0);
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("workload.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut connector = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_connection_pins_the_process_that_connected_not_whoever_has_its_pid", "--quiet"])
        .env(CONNECT_TO, &socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    let cred = nix::sys::socket::getsockopt(&accepted, nix::sys::socket::sockopt::PeerCredentials).unwrap();
    let peer = PeerCredentials { pid: u32::try_from(cred.pid()).unwrap(), uid: cred.uid(), gid: cred.gid() };
    assert_eq!(peer.pid, connector.id());
    let Some(pidfd) = PeerPidfd::from_socket(&accepted) else {
        assert!(!kernel_at_least(6, 5), "Linux 6.5+ gives SO_PEERPIDFD");
        let _ = connector.kill();
        let _ = connector.wait();
        return;
    };
    // The pidfd names the pid SO_PEERCRED reported (both come from the socket's peer record).
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_fd().as_raw_fd())).unwrap();
    assert!(fdinfo.lines().any(|line| line == format!("Pid:\t{}", peer.pid)), "{fdinfo}");

    let attestor = UnixAttestor::new(&UnixAttestorConfig { max_sha256_file_size: 0, ..Default::default() });
    let attestation = attestor.attest_connection_blocking(&peer, Some(&pidfd)).unwrap();
    assert!(attestation.selectors().contains(&unix(&format!("uid:{}", peer.uid))));
    attestation.verify_still_same().unwrap();
    let pinned = PeerProcess::open_connection(&peer, Some(&pidfd)).unwrap();
    assert!(pinned.has_socket_pidfd());
    pinned.verify_still_same().unwrap();

    accepted.write_all(b"x").unwrap();
    assert!(connector.wait().unwrap().success());
    assert!(attestation.verify_still_same().unwrap_err().is_caller_gone());
    assert!(pinned.verify_still_same().unwrap_err().is_caller_gone());

    let other = Reaped(spawn("sleep", &["30"]));
    let reused = child_peer(&other.0);
    let err = PeerProcess::open_connection(&reused, Some(&pidfd)).unwrap_err();
    assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    let err = attestor.attest_connection_blocking(&reused, Some(&pidfd)).unwrap_err();
    assert!(err.is_caller_gone(), "{err}");
    // The fallback pins whatever process has the pid when the pin begins.
    let fallback = PeerProcess::open_connection(&reused, None).unwrap();
    assert!(fallback.has_pidfd() && !fallback.has_socket_pidfd());
    fallback.verify_still_same().unwrap();
    attestor.attest_connection_blocking(&reused, None).unwrap().verify_still_same().unwrap();
}
