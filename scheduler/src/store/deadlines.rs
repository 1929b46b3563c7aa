//! Runs past their deadline (`runs.deadline_at`, set from the definition's `timeout_s`).

use sqlx::PgPool;

use super::{ENDED_RUN, EndedRun, StoreError};

/// Cancels up to `limit` running runs of `namespace` past their deadline, with error type
/// `run_timeout`, and their tasks not finished, in one statement. The runs are locked in id
/// order, as the completion loop locks them, so a run another scheduler is advancing is waited
/// for (the length of one batch) rather than skipped, and no two of these deadlock. Returns the
/// runs as they ended.
pub async fn time_out_runs(
    db: &PgPool,
    namespace: &str,
    limit: i64,
) -> Result<Vec<EndedRun>, StoreError> {
    let sql = format!(
        "WITH late AS (
             SELECT id FROM runs
             WHERE namespace = $1 AND status = 'running' AND deadline_at <= now()
             ORDER BY id LIMIT $2
             FOR UPDATE),
         timed_out AS (
             UPDATE runs SET status = 'cancelled', finished_at = now(),
                    error = jsonb_build_object(
                        'type', 'run_timeout',
                        'message', format('the run took longer than its timeout_s (%s s)',
                                          definition->>'timeout_s'))
             FROM late
             WHERE runs.id = late.id
             RETURNING {ENDED_RUN}),
         stopped AS (
             UPDATE tasks SET status = 'cancelled', finished_at = now(), due_at = NULL,
                    error = '{{\"type\": \"run_timeout\", \"message\": \"the run took longer than its timeout_s\"}}'
             WHERE run_id = ANY (ARRAY(SELECT id FROM late)) AND status = 'queued')
         SELECT * FROM timed_out"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(namespace)
        .bind(limit)
        .fetch_all(db)
        .await?)
}
