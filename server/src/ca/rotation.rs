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

use tokio::sync::watch;

use super::CertificateAuthority;
use crate::datastore::DataStore;

/// How often the schedule is looked at. Deadlines are whole seconds.
pub const TICK: Duration = Duration::from_secs(1);

/// Runs the schedule until `stopped` is raised.
pub async fn run(ca: Arc<CertificateAuthority>, datastore: Arc<dyn DataStore>, stopped: watch::Receiver<bool>) {
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
        match tokio::task::spawn_blocking(move || ca2.rotate(store.as_ref(), SystemTime::now())).await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::error!(error = %err, "CA rotation step failed; retrying"),
            Err(err) => tracing::error!(error = %err, "CA rotation task failed; retrying"),
        }
    }
}
