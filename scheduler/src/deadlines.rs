//! Run timeouts: every scheduler looks, twice a second, for running runs of its namespace past
//! their deadline (a definition's `timeout_s` from the run's start) and cancels them with error
//! type `run_timeout`, as a cancellation through the API does: their tasks not yet finished are
//! cancelled in the same statement, then workers are told to stop the ones running, and waiters
//! learn that the runs ended. A run another scheduler is advancing is waited for, the length
//! of one batch.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::notify::Notifier;
use crate::store;

/// How often the loop looks: a run ends at most this much after its deadline (plus the time
/// its running steps take to stop).
const PERIOD: Duration = Duration::from_millis(500);

/// The most runs cancelled in one statement; a full batch is followed by another at once.
const BATCH: i64 = 256;

/// Cancels runs past their deadline until `shutdown`.
pub async fn deadline_loop(
    db: sqlx::PgPool,
    namespace: String,
    notifier: Notifier,
    shutdown: CancellationToken,
) {
    let mut interval = tokio::time::interval(PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = shutdown.cancelled() => break,
        }
        loop {
            match store::time_out_runs(&db, &namespace, BATCH).await {
                Ok(ended) => {
                    if ended.is_empty() {
                        break;
                    }
                    let ids: Vec<uuid::Uuid> = ended.iter().map(|run| run.id).collect();
                    tracing::info!(runs = ids.len(), "cancelled runs past their timeout_s");
                    crate::ended::runs(&ended);
                    notifier.stop_runs(&ids).await;
                    notifier.announce(&ids).await;
                    if ended.len() < BATCH as usize {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "reading runs past their deadline failed");
                    break;
                }
            }
        }
    }
}
