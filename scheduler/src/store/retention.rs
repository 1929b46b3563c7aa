//! Retention: deleting finished runs and their tasks once they are older than
//! the retention period, a batch at a time, by one scheduler of a namespace at a time.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StoreError;

/// Deletes up to `batch` runs of `namespace` that finished before `cutoff`, oldest first, with
/// their tasks, unless another scheduler of the namespace is deleting now (then `None`).
/// Returns how many were deleted.
///
/// Run ids are UUIDv7, ordered by creation: a run that finished before `cutoff` was created
/// before it, so the candidates are read along the primary key, from `after` (the last id of
/// the batch before; from the start without one) up to the id of `cutoff`, and runs still
/// going (or finished since) are passed over there. Going on from `after` keeps each batch
/// from walking again over the index entries of the runs the batches before deleted, which
/// stay until a vacuum. The runs are locked as they are taken, skipping any another
/// transaction holds (one being advanced).
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
    // Tasks reference their run without a foreign key (writes are cheaper without one): they
    // are deleted in the same statement, through their index on the run's id.
    let (count, last): (i64, Option<Uuid>) = sqlx::query_as(
        "WITH doomed AS (
             SELECT id FROM runs
             WHERE id > $5 AND id < $2 AND namespace = $1
               AND status IN ('succeeded', 'failed', 'cancelled') AND finished_at < $3
             ORDER BY id LIMIT $4
             FOR UPDATE SKIP LOCKED),
         runs_gone AS (DELETE FROM runs WHERE id IN (SELECT id FROM doomed) RETURNING id),
         tasks_gone AS (DELETE FROM tasks WHERE run_id IN (SELECT id FROM runs_gone))
         SELECT count(*), (SELECT id FROM runs_gone ORDER BY id DESC LIMIT 1) FROM runs_gone",
    )
    .bind(namespace)
    .bind(first_id_at(cutoff))
    .bind(cutoff)
    .bind(batch)
    .bind(after.unwrap_or(Uuid::nil()))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Deleted {
        count: count.unsigned_abs(),
        last,
    }))
}

/// What one batch of [`delete_finished_runs`] deleted.
#[derive(Debug, Clone, Copy)]
pub struct Deleted {
    /// How many runs.
    pub count: u64,
    /// The greatest id among them: where the next batch may go on from.
    pub last: Option<Uuid>,
}

/// Vacuums the tables retention deletes from, so that the space of deleted rows is reused at
/// once rather than at autovacuum's next turn; tables another vacuum holds are skipped.
pub async fn vacuum(db: &PgPool) -> Result<(), StoreError> {
    sqlx::query("VACUUM (SKIP_LOCKED) runs, tasks")
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
