//! The audit log: one JSON object per line for every security-relevant event, written by a
//! dedicated thread so that callers never wait for the disk.
//!
//! # Shape of a line
//!
//! ```json
//! {"time":"2026-01-02T03:04:05.678Z","event":"svid.issued","spiffe_id":"spiffe://example.org/web",...}
//! ```
//!
//! `time` (RFC 3339, UTC, milliseconds) and `event` come first; the other fields depend on the
//! event (docs/audit-log.md lists them). Secrets never enter an event: join tokens are
//! reduced to [`token_fingerprint`], and join-token agent IDs, which embed the token, are
//! written through [`redact_agent_id`].
//!
//! # Writing
//!
//! [`AuditLog::emit`] serializes the event on the caller's thread and hands the line to a
//! bounded queue ([`QUEUE_CAPACITY`] lines). A writer thread appends lines to a buffered file
//! (or stdout) and flushes whenever the queue is empty, so a line reaches the file within
//! about one write after its event. When the queue is full (the disk has stalled for a long
//! time) `emit` waits rather than drop an audit record. [`AuditLog::flush`] waits until every
//! line emitted so far is written; call it at shutdown.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

/// Lines queued for the writer at most; a full queue makes [`AuditLog::emit`] wait.
pub const QUEUE_CAPACITY: usize = 16 * 1024;

/// How long [`AuditLog::flush`] waits for the writer.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// Nowhere (`enabled = false`).
    Disabled,
    /// Standard output (`path = "-"`).
    Stdout,
    /// Appended to this file (created 0600 when missing).
    File(PathBuf),
}

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The file could not be opened for appending.
    #[error("audit.path {}: cannot open the audit log: {source}", path.display())]
    Open {
        /// The configured file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The writer thread could not be started.
    #[error("audit log writer: {0}")]
    Thread(io::Error),
}

/// One audit event: a name such as `agent.attested` and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    event: &'static str,
    fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event with no fields yet.
    pub fn new(event: &'static str) -> Self {
        Self { event, fields: Map::new() }
    }

    /// Adds a field (a later one with the same key replaces it).
    #[must_use]
    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_owned(), value.into());
        self
    }

    /// The event's name.
    pub fn name(&self) -> &'static str {
        self.event
    }

    /// One JSON line (without the newline) for this event at `time`: `time` and `event`
    /// first, then the fields in key order.
    pub fn to_line(&self, time: SystemTime) -> String {
        let mut line = String::with_capacity(160);
        line.push_str("{\"time\":\"");
        line.push_str(&humantime::format_rfc3339_millis(time).to_string());
        line.push_str("\",\"event\":");
        line.push_str(&Value::from(self.event).to_string());
        let mut keys: Vec<&String> = self.fields.keys().filter(|k| *k != "time" && *k != "event").collect();
        keys.sort();
        for key in keys {
            if let Some(value) = self.fields.get(key) {
                line.push(',');
                line.push_str(&Value::from(key.as_str()).to_string());
                line.push(':');
                line.push_str(&value.to_string());
            }
        }
        line.push('}');
        line
    }
}

enum Message {
    Line(String),
    Flush(SyncSender<()>),
}

/// The audit log handle: cheap to clone, clones share the writer.
#[derive(Clone)]
pub struct AuditLog {
    sender: Option<SyncSender<Message>>,
    target: Arc<AuditTarget>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("target", &self.target).finish_non_exhaustive()
    }
}

impl AuditLog {
    /// A log that writes nothing.
    pub fn disabled() -> Self {
        Self { sender: None, target: Arc::new(AuditTarget::Disabled) }
    }

    /// Opens `target` (a file is created 0600 if missing, its missing directories 0700, and
    /// appended to) and starts the writer thread.
    pub fn open(target: AuditTarget) -> Result<Self, AuditError> {
        let out: Box<dyn Write + Send> = match &target {
            AuditTarget::Disabled => return Ok(Self::disabled()),
            AuditTarget::Stdout => Box::new(io::stdout()),
            AuditTarget::File(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    // 0700: the default file lives in `data_dir`, next to keys.
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(|source| AuditError::Open { path: path.clone(), source })?;
                }
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|source| AuditError::Open { path: path.clone(), source })?;
                Box::new(file)
            }
        };
        let (sender, receiver) = mpsc::sync_channel(QUEUE_CAPACITY);
        // The thread ends once every handle is dropped and the queue is written.
        std::thread::Builder::new()
            .name("tessera-audit".to_owned())
            .spawn(move || write_lines(receiver, BufWriter::with_capacity(64 * 1024, out)))
            .map_err(AuditError::Thread)?;
        Ok(Self { sender: Some(sender), target: Arc::new(target) })
    }

    /// Where lines go.
    pub fn target(&self) -> &AuditTarget {
        &self.target
    }

    /// Whether events are written anywhere.
    pub fn is_enabled(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues one event (see the [module docs](self) for when this waits).
    pub fn emit(&self, event: AuditEvent) {
        let Some(sender) = &self.sender else {
            return;
        };
        let line = event.to_line(SystemTime::now());
        match sender.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(message)) => {
                tracing::warn!("the audit log writer is behind; waiting for it");
                let _ = sender.send(message);
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::error!(event = event.name(), "the audit log writer has stopped; event not recorded");
            }
        }
    }

    /// Waits (at most a few seconds) until every event emitted so far is written and flushed.
    pub fn flush(&self) {
        let Some(sender) = &self.sender else {
            return;
        };
        let (done, wait) = mpsc::sync_channel(1);
        if sender.send(Message::Flush(done)).is_ok() && wait.recv_timeout(FLUSH_TIMEOUT).is_err() {
            tracing::warn!("the audit log was not flushed in time");
        }
    }
}

fn write_lines(receiver: Receiver<Message>, mut out: BufWriter<Box<dyn Write + Send>>) {
    let mut failed = false;
    let mut write = |out: &mut BufWriter<Box<dyn Write + Send>>, line: &str| {
        let result = out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n"));
        if let Err(err) = result {
            if !failed {
                tracing::error!(error = %err, "cannot write the audit log");
            }
            failed = true;
        } else {
            failed = false;
        }
    };
    loop {
        // Block for the next message, then drain what is queued, then flush.
        let message = match receiver.recv_timeout(Duration::from_secs(3600)) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut acks = Vec::new();
        let mut next = Some(message);
        while let Some(message) = next.take() {
            match message {
                Message::Line(line) => write(&mut out, &line),
                Message::Flush(ack) => acks.push(ack),
            }
            next = receiver.try_recv().ok();
        }
        if let Err(err) = out.flush() {
            tracing::error!(error = %err, "cannot flush the audit log");
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
    let _ = out.flush();
}

/// A non-reversible fingerprint of a secret (a join token): `sha256:` and the first 16 hex
/// digits of its SHA-256. Enough to tell tokens apart in a log; useless to attest with.
pub fn token_fingerprint(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut text = String::from("sha256:");
    for byte in &digest.as_ref()[..8] {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// The segment under which join-token agent IDs carry their token.
const JOIN_TOKEN_PATH: &str = "/tessera/agent/join_token/";

/// An agent SPIFFE ID fit for the audit log: a join-token agent ID
/// (`spiffe://<td>/tessera/agent/join_token/<token>`) has its token replaced by
/// [`token_fingerprint`]; any other ID is returned as is.
pub fn redact_agent_id(id: &str) -> String {
    match id.find(JOIN_TOKEN_PATH) {
        Some(start) => {
            let token_start = start + JOIN_TOKEN_PATH.len();
            format!("{}{}", &id[..token_start], token_fingerprint(&id[token_start..]))
        }
        None => id.to_owned(),
    }
}

/// The file behind `path` for messages, or `-` for stdout.
pub fn describe(target: &AuditTarget) -> String {
    match target {
        AuditTarget::Disabled => "disabled".to_owned(),
        AuditTarget::Stdout => "-".to_owned(),
        AuditTarget::File(path) => path.display().to_string(),
    }
}

/// Resolves the configured `[audit]` keys: disabled, `-` for stdout, the given file, or the
/// default `<data_dir>/audit.log`.
pub fn target_from_config(enabled: bool, path: Option<&Path>, data_dir: &Path) -> AuditTarget {
    match (enabled, path) {
        (false, _) => AuditTarget::Disabled,
        (true, Some(path)) if path == Path::new("-") => AuditTarget::Stdout,
        (true, Some(path)) => AuditTarget::File(path.to_path_buf()),
        (true, None) => AuditTarget::File(data_dir.join(DEFAULT_FILE_NAME)),
    }
}

/// The audit file's name under `data_dir` when `audit.path` is unset.
pub const DEFAULT_FILE_NAME: &str = "audit.log";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_time_and_event_first() {
        let event = AuditEvent::new("svid.issued").field("spiffe_id", "spiffe://example.org/web").field("serial", "0a");
        let line = event.to_line(SystemTime::UNIX_EPOCH);
        assert_eq!(
            line,
            r#"{"time":"1970-01-01T00:00:00.000Z","event":"svid.issued","serial":"0a","spiffe_id":"spiffe://example.org/web"}"#
        );
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["event"], "svid.issued");
    }

    #[test]
    fn join_tokens_never_appear() {
        let token = "0123abcd-aaaa-bbbb-cccc-ddddeeeeffff";
        let fingerprint = token_fingerprint(token);
        assert!(fingerprint.starts_with("sha256:") && fingerprint.len() == 7 + 16, "{fingerprint}");
        assert!(!fingerprint.contains(token));
        let id = format!("spiffe://example.org/tessera/agent/join_token/{token}");
        let redacted = redact_agent_id(&id);
        assert_eq!(redacted, format!("spiffe://example.org/tessera/agent/join_token/{fingerprint}"));
        assert_eq!(redact_agent_id("spiffe://example.org/web"), "spiffe://example.org/web");
    }

    #[test]
    fn a_file_log_is_written_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        let log = AuditLog::open(AuditTarget::File(path.clone())).unwrap();
        log.emit(AuditEvent::new("a").field("n", 1));
        log.emit(AuditEvent::new("b").field("n", 2));
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<Value> = text.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1]["event"], "b");
        assert_eq!(events[1]["n"], 2);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn an_unopenable_file_names_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = AuditLog::open(AuditTarget::File(dir.path().to_path_buf())).unwrap_err();
        let message = err.to_string();
        assert!(message.starts_with("audit.path ") && message.contains(&dir.path().display().to_string()), "{message}");
    }

    #[test]
    fn config_resolution() {
        let dir = Path::new("/var/lib/tessera");
        assert_eq!(target_from_config(false, None, dir), AuditTarget::Disabled);
        assert_eq!(target_from_config(true, None, dir), AuditTarget::File(dir.join("audit.log")));
        assert_eq!(target_from_config(true, Some(Path::new("-")), dir), AuditTarget::Stdout);
    }
}
