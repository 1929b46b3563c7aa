//! The retention sweeper: deletes finished runs and jobs older than `TASKFLEET_RETENTION_S`,
//! with their tasks, in batches (see [`store::delete_finished_runs`]). Every scheduler runs
//! one; at each sweep only one of a namespace deletes, the others find its lock held and wait
//! for the next. A batch reads a window of 2,000 runs along the primary key and deletes those
//! finished past the retention; a batch that read a whole window is followed by the next,
//! from where it stopped, after a rest of half its time, which leaves the database to the hot
//! path; otherwise the sweeper sleeps until the next period.
//!
//! Deleted rows leave dead space in the tables; the scheduler that deleted them vacuums
//! `runs` and `tasks` (beside its deletes, one vacuum at a time) once it has deleted many, or
//! a minute after it last did, so that new rows reuse the space and the tables stay the same
//! size.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store;

/// The most runs one sweep reads (and deletes), in one transaction.
pub const BATCH: i64 = 2000;
/// After a full batch the sweeper rests this share of the batch's time before the next (at
/// least 10 ms): deleting a backlog takes at most two thirds of one connection's time, and
/// leaves the rest of the database to the hot path.
const REST_SHARE: u32 = 2;
/// The shortest rest between two full batches.
const MIN_REST: Duration = Duration::from_millis(10);
/// The longest time between two sweeps.
const MAX_PERIOD: Duration = Duration::from_secs(10);
/// Runs deleted by this scheduler after which it vacuums the tables.
const VACUUM_AFTER: u64 = 100_000;
/// The longest a scheduler that deleted runs waits before it vacuums.
const VACUUM_WITHIN: Duration = Duration::from_secs(60);

/// Deletes finished runs older than `retention` until `shutdown`.
pub async fn sweep_loop(
    db: sqlx::PgPool,
    namespace: String,
    retention: Duration,
    shutdown: CancellationToken,
) {
    // A short retention (in tests, say) is swept as often as a tenth of it, at least every
    // 100 ms; a long one every 10 s.
    let period = (retention / 10).clamp(Duration::from_millis(100), MAX_PERIOD);
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        return;
    };
    // The first sweep comes at once: a scheduler that starts over a backlog deletes it.
    let mut wait = Duration::ZERO;
    let mut unvacuumed: u64 = 0;
    let mut last_vacuum = Instant::now();
    // Vacuums run beside the deletes, one at a time.
    let mut vacuuming: Option<tokio::task::JoinHandle<()>> = None;
    // Where the next batch goes on from, after one that read a whole window of runs; once a
    // sweep reaches the cutoff, the next starts again from the oldest run (some still going
    // there may have finished since).
    let mut after = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => {
                // A vacuum of large tables may take minutes; the scheduler does not wait for
                // it (dropping its connection ends it in PostgreSQL).
                if let Some(vacuum) = vacuuming {
                    vacuum.abort();
                }
                return;
            }
        }
        let cutoff = chrono::Utc::now() - retention;
        let started = Instant::now();
        wait = match store::delete_finished_runs(&db, &namespace, cutoff, BATCH, after).await {
            Ok(Some(store::Deleted {
                count: deleted,
                next,
            })) => {
                crate::metrics::runs_deleted(deleted);
                unvacuumed += deleted;
                // Deleted rows leave dead space that only a vacuum makes reusable: after many,
                // or a minute after the last, vacuum now rather than when autovacuum comes
                // round, so the tables stop growing.
                let due = unvacuumed >= VACUUM_AFTER
                    || (unvacuumed > 0 && last_vacuum.elapsed() >= VACUUM_WITHIN);
                if due
                    && vacuuming
                        .as_ref()
                        .is_none_or(tokio::task::JoinHandle::is_finished)
                {
                    let db = db.clone();
                    let deleted = unvacuumed;
                    vacuuming = Some(tokio::spawn(async move {
                        match store::vacuum(&db).await {
                            Ok(()) => tracing::debug!(deleted, "vacuumed after deleting runs"),
                            Err(error) => tracing::warn!(%error, "vacuuming after deleting runs"),
                        }
                    }));
                    unvacuumed = 0;
                    last_vacuum = Instant::now();
                }
                after = next;
                if next.is_some() {
                    (started.elapsed() / REST_SHARE).max(MIN_REST)
                } else {
                    period
                }
            }
            Ok(None) => period,
            Err(error) => {
                tracing::warn!(%error, "deleting runs past their retention");
                after = None;
                period
            }
        };
    }
}
