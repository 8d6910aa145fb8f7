//! The Workload API socket: directory and socket permissions, stale sockets, the bounded accept
//! loop and graceful shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tessera_wire::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::WorkloadApi;
use crate::attestor::PeerPidfd;

/// Largest request message accepted (the largest legitimate one is a `ValidateJWTSVIDRequest`
/// with a 16 KiB token).
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept` (typically EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// HTTP/2 keepalive: a connection whose peer does not answer a ping within the timeout is closed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the Workload API socket could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The socket's parent directory could not be created or given its mode.
    #[error("cannot create the Workload API socket directory {}", path.display())]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the socket path.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// A live process answers on the socket path (another agent?).
    #[error("another process is already serving on {}", path.display())]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {}", path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Binding failed.
    #[error("cannot bind the Workload API socket {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The socket could not be made accessible to every local user.
    #[error("cannot set the mode of the Workload API socket {}", path.display())]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The gRPC server failed.
    #[error("the Workload API server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Prepares and binds the Workload API socket: creates a missing parent directory with mode
/// 0755, replaces a stale socket (refusing a live one or a non-socket file), binds, and sets
/// the socket's mode to 0777 (any local user may connect; attestation decides what it gets).
/// Must be called inside a tokio runtime.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        let dir_error = |source| ServeError::CreateDirectory { path: parent.to_owned(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(dir_error)?;
        // The umask may have narrowed the mode.
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).map_err(dir_error)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if metadata.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse { path: path.to_owned() });
            }
            std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale { path: path.to_owned(), source })?;
            tracing::info!(socket = %path.display(), "removed a stale Workload API socket");
        }
        Ok(_) => return Err(ServeError::NotASocket { path: path.to_owned() }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(ServeError::Bind { path: path.to_owned(), source }),
    }
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind { path: path.to_owned(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(|source| ServeError::Permissions { path: path.to_owned(), source })?;
    Ok(listener)
}

impl WorkloadApi {
    /// Binds `socket_path` ([`bind_socket`]) and serves until `shutdown` completes; then ends
    /// every stream, waits (bounded) for connections to close and removes the socket.
    pub async fn serve(
        self,
        socket_path: &Path,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let listener = bind_socket(socket_path)?;
        self.serve_bound(listener, socket_path, shutdown).await
    }

    /// As [`serve`](Self::serve), on a listener [`bind_socket`] already bound at `socket_path`
    /// (so a caller can report the socket as ready only once it exists).
    pub async fn serve_bound(
        self,
        listener: UnixListener,
        socket_path: &Path,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let bound = std::fs::symlink_metadata(socket_path).ok().map(|m| (m.dev(), m.ino()));
        tracing::info!(socket = %socket_path.display(), "Workload API listening");
        let result = self.serve_listener(listener, shutdown).await;
        // Remove the socket only if it is still the one bound here.
        let current = std::fs::symlink_metadata(socket_path).ok().map(|m| (m.dev(), m.ino()));
        if bound.is_some()
            && bound == current
            && let Err(err) = std::fs::remove_file(socket_path)
        {
            tracing::warn!(socket = %socket_path.display(), error = %err, "cannot remove the Workload API socket");
        }
        result
    }

    /// Serves on an already bound listener until `shutdown` completes (see [`serve`](Self::serve)).
    pub async fn serve_listener(
        self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let limits = self.inner.limits.clone();
        let slots = Slots {
            all: Arc::new(Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS))),
            per_uid: Arc::new(UidCounts { max: limits.max_connections_per_uid.max(1), counts: Mutex::default() }),
            handshake_timeout: limits.handshake_timeout,
        };
        let incoming = Box::pin(futures_util::stream::unfold((listener, slots), |(listener, slots)| async {
            let connection = accept(&listener, &slots).await;
            Some((Ok::<_, io::Error>(connection), (listener, slots)))
        }));

        let inner = Arc::clone(&self.inner);
        let (fired, fired_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            // Streams never end by themselves: end them so that connections drain.
            inner.closing.send_replace(true);
            let _ = fired.send(());
        };
        // Envoy SDS on the same socket: it shares this service's attestation, limits and shutdown.
        let sds = crate::sds::SecretDiscovery::new(self.clone()).into_server();
        let metrics = tessera_common::metrics::GrpcMetricsLayer::new(Arc::clone(&self.inner.metrics));
        let service = SpiffeWorkloadApiServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES);
        let serve = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(limits.max_streams_per_connection.max(1)))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(metrics)
            .add_service(service)
            .add_service(sds)
            .serve_with_incoming_shutdown(incoming, signal);
        let drained = async move {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(limits.drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = serve => result.map_err(ServeError::Serve),
            () = drained => {
                // Streams have ended; what remains are unary calls still waiting for the server
                // (a JWT-SVID) or clients that do not close. They end with the process.
                tracing::warn!("Workload API connections did not close in time; no longer waiting for them");
                Ok(())
            }
        }
    }
}

/// The connection limits shared by the accept loop.
struct Slots {
    all: Arc<Semaphore>,
    per_uid: Arc<UidCounts>,
    handshake_timeout: Duration,
}

/// Open connections per uid.
#[derive(Debug)]
struct UidCounts {
    max: usize,
    counts: Mutex<HashMap<u32, usize>>,
}

impl UidCounts {
    /// A slot for one more connection of `uid`, or `None` when it holds `max` already.
    fn claim(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(uid).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(UidSlot { counts: Arc::clone(self), uid })
    }
}

/// One connection of a uid, released on drop.
#[derive(Debug)]
struct UidSlot {
    counts: Arc<UidCounts>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// Waits for a connection slot, then for a connection. Accept errors (EMFILE, ...) are logged
/// and retried after a pause instead of ending the server; connections without peer
/// credentials or over their uid's limit are closed at once.
async fn accept(listener: &UnixListener, slots: &Slots) -> Connection {
    loop {
        // The semaphore is never closed.
        let Ok(permit) = Arc::clone(&slots.all).acquire_owned().await else {
            std::future::pending::<()>().await;
            continue;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                drop(permit);
                tracing::warn!(error = %err, "cannot accept a Workload API connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(err) => {
                tracing::warn!(error = %err, "Workload API connection without peer credentials; closing it");
                continue;
            }
        };
        let Some(uid_slot) = slots.per_uid.claim(uid) else {
            tracing::warn!(uid, max = slots.per_uid.max, "too many Workload API connections from one uid; closing one");
            continue;
        };
        // Once per connection: every call on it pins the process that connected through it.
        let pidfd = PeerPidfd::from_socket(&stream);
        return Connection {
            stream,
            pidfd,
            first_bytes_deadline: Some(Box::pin(tokio::time::sleep(slots.handshake_timeout))),
            _permit: permit,
            _uid_slot: uid_slot,
        };
    }
}

/// An accepted connection holding its slots until it is dropped.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    /// The pidfd of the process that connected (SO_PEERPIDFD), when the kernel gives one.
    pidfd: Option<PeerPidfd>,
    /// Until the first bytes arrive: when to give up on a silent peer.
    first_bytes_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _permit: OwnedSemaphorePermit,
    _uid_slot: UidSlot,
}

/// What a Workload API request knows of its connection (in the request's extensions): the
/// peer credentials tonic takes (SO_PEERCRED) and the connection's pidfd of the process that
/// connected (SO_PEERPIDFD), when the kernel gave one.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    pub(crate) uds: UdsConnectInfo,
    pub(crate) pidfd: Option<PeerPidfd>,
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        ConnectionInfo { uds: self.stream.connect_info(), pidfd: self.pidfd.clone() }
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.first_bytes_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired =
                    this.first_bytes_deadline.as_mut().is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing within the handshake timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
