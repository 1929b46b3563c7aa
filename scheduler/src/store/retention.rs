//! Retention: deleting finished runs and their tasks once they are older than
//! the retention period, a batch at a time, by one scheduler of a namespace at a time.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// Deletes the runs of `namespace` among the next `batch` runs after `after` (from the oldest
/// without it) that finished before `cutoff`, with their tasks, unless another scheduler of
/// the namespace is deleting now (then `None`).
///
/// Run ids are UUIDv7, ordered by creation: a run that finished before `cutoff` was created
/// before it, so the candidates are a window of ids read along the primary key, up to the id
/// of `cutoff`; runs still going (or finished since) are passed over. Going on from the end of
/// the window before keeps each batch from walking again over the index entries of the runs
/// deleted before, which stay until a vacuum. The runs are locked as they are taken, skipping
/// any another transaction holds (one being advanced).
pub async fn delete_finished_runs(
    db: &PgPool,
    namespace: &str,
    cutoff: DateTime<Utc>,
    batch: i64,
    after: Option<Uuid>,
) -> Result<Option<Deleted>, StoreError> {
    let mut tx = db.begin().await?;
    // One sweeper per namespace: the lock goes with the transaction.
    let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(7301, hashtext($1))")
        .bind(namespace)
        .fetch_one(&mut *tx)
        .await?;
    if !held {
        return Ok(None);
    }
    // The window: the next ids along the primary key, read by themselves so that nothing
    // but the primary key can serve them (a filter on the namespace could otherwise lead the
    // planner to another index and a sort of every run, at every batch).
    let window: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM runs WHERE id > $1 AND id < $2 ORDER BY id LIMIT $3")
            .bind(after.unwrap_or(Uuid::nil()))
            .bind(first_id_at(cutoff))
            .bind(batch)
            .persistent(false)
            .fetch_all(&mut *tx)
            .await?;
    let gone: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM runs WHERE id IN (
             SELECT id FROM runs
             WHERE id = ANY($2) AND namespace = $1
               AND status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $3
             FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(namespace)
    .bind(&window)
    .bind(cutoff)
    // Planned for its actual window every time: a plan made once for any array (and for the
    // tables' statistics of that moment, an emptied table's after a vacuum) can scan every
    // run of the namespace and test each against the whole window.
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    // Tasks reference their run without a foreign key (writes are cheaper without one): they
    // are deleted by their runs' ids given as an array, which PostgreSQL looks up in the index
    // on `run_id` one by one (a join with the deleted runs may be planned as a scan of a whole
    // index instead, whose time grows with the table).
    if !gone.is_empty() {
        sqlx::query("DELETE FROM tasks WHERE run_id = ANY($1)")
            .bind(&gone)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let full = usize::try_from(batch).is_ok_and(|batch| window.len() == batch);
    Ok(Some(Deleted {
        count: u64::try_from(gone.len()).unwrap_or(u64::MAX),
        next: full.then(|| window.last().copied()).flatten(),
    }))
}

/// What one batch of [`delete_finished_runs`] deleted.
#[derive(Debug, Clone, Copy)]
pub struct Deleted {
    /// How many runs.
    pub count: u64,
    /// Where the next batch goes on from, when this one read a whole window of ids; `None`
    /// when it reached the cutoff (the next sweep starts again from the oldest run).
    pub next: Option<Uuid>,
}

/// Vacuums the tables retention deletes from, so that the space of deleted rows is reused at
/// once rather than at autovacuum's next turn, and analyzes them, so that the planner's
/// statistics follow what the deletes left; tables another vacuum holds are skipped.
pub async fn vacuum(db: &PgPool) -> Result<(), StoreError> {
    sqlx::query("VACUUM (ANALYZE, SKIP_LOCKED) runs, tasks")
        .execute(db)
        .await?;
    Ok(())
}

/// The smallest UUIDv7 of an instant: every id made before it is smaller.
fn first_id_at(instant: DateTime<Utc>) -> Uuid {
    let millis = u64::try_from(instant.timestamp_millis()).unwrap_or(0);
    let mut bytes = [0_u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    // Version 7, variant 10; every other bit zero.
    bytes[6] = 0x70;
    bytes[8] = 0x80;
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_before_an_instant_are_below_its_first_id() {
        let now = Utc::now();
        let before = Uuid::now_v7();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let cutoff = Utc::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let after = Uuid::now_v7();
        assert!(
            before < first_id_at(cutoff),
            "{before} {}",
            first_id_at(cutoff)
        );
        assert!(after > first_id_at(cutoff));
        assert_eq!(first_id_at(now).get_version_num(), 7);
    }
}
