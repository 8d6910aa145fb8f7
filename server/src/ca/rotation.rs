//! The background task that drives CA and JWT-key rotation while the server runs.
//!
//! Every [`TICK`] it compares the clock with [`CertificateAuthority::next_rotation_at`] and,
//! when a step is due, runs [`CertificateAuthority::rotate`] on a blocking thread. The
//! schedule itself lives in the journal (see the [CA module documentation](super)), so a
//! restart at any point resumes it: the start-up load applies whatever became due meanwhile.
//! A failed step (disk full, datastore unavailable) is logged and retried at the next tick;
//! the authorities in force keep signing meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tessera_common::audit::{AuditEvent, AuditLog};
use tokio::sync::watch;

use super::storage::{Journal, SlotStatus};
use super::{CertificateAuthority, kind_name};
use crate::datastore::DataStore;

/// How often the schedule is looked at. Deadlines are whole seconds.
pub const TICK: Duration = Duration::from_secs(1);

/// Runs the schedule until `stopped` is raised.
pub async fn run(
    ca: Arc<CertificateAuthority>,
    datastore: Arc<dyn DataStore>,
    audit: AuditLog,
    stopped: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = crate::server::stop_requested(stopped);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        if SystemTime::now() < ca.next_rotation_at() {
            continue;
        }
        let (ca2, store) = (Arc::clone(&ca), Arc::clone(&datastore));
        let before = ca.journal();
        match tokio::task::spawn_blocking(move || ca2.rotate(store.as_ref(), SystemTime::now())).await {
            Ok(Ok(true)) => {
                for event in journal_changes(&before, &ca.journal()) {
                    audit.emit(event.field("trigger", "automatic"));
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "CA rotation step failed; retrying"),
            Err(err) => tracing::error!(error = %err, "CA rotation task failed; retrying"),
        }
    }
}

/// One `ca.rotation` audit event per authority whose state changed between two journals:
/// `step` is `prepare` (a new authority), `activate`, `retire` (the previous active one),
/// `taint`, or `drop` (removed after expiry, or revoked).
pub fn journal_changes(before: &Journal, after: &Journal) -> Vec<AuditEvent> {
    let event = |slot: &super::storage::Slot, step: &'static str| {
        AuditEvent::new("ca.rotation")
            .field("kind", kind_name(slot.kind))
            .field("authority_id", slot.id.clone())
            .field("step", step)
            .field("not_after", slot.not_after)
    };
    let mut events = Vec::new();
    for slot in &after.slots {
        let previous = before.slots.iter().find(|old| old.kind == slot.kind && old.id == slot.id);
        let step = match (previous.map(|old| (old.status, old.tainted)), slot.status) {
            (None, _) => Some("prepare"),
            (Some((SlotStatus::Prepared, _)), SlotStatus::Active) => Some("activate"),
            (Some((SlotStatus::Active, _)), SlotStatus::Retired) => Some("retire"),
            (Some((_, false)), _) if slot.tainted => Some("taint"),
            _ => None,
        };
        if let Some(step) = step {
            events.push(event(slot, step));
        }
    }
    for slot in &before.slots {
        if !after.slots.iter().any(|new| new.kind == slot.kind && new.id == slot.id) {
            events.push(event(slot, "drop"));
        }
    }
    events
}
