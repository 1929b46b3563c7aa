//! Running a failed or cancelled run again from its failed, cancelled and unstarted steps. The
//! run and the steps it keeps (those that succeeded or were skipped) are read first, without a
//! lock, so that planning holds nothing; then, in one short transaction, the run is locked and
//! found as it was read, the rows of its other steps are deleted with their items, the newly
//! planned tasks inserted and the run written running again. The steps it keeps keep their
//! outputs and are not run again. Its deadline, if its definition sets `timeout_s`, starts
//! again.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};
use taskfleet_common::{RunKind, RunStatus};
use uuid::Uuid;

use super::advance::{FinishedRun, TaskState};
use super::runs::run_status;
use super::{DEADLINE, EndedRun, NewTask, Owner, Payload, StoreError};

/// A run as a re-run reads it.
#[derive(Debug)]
pub struct RerunRead {
    /// Its status.
    pub status: RunStatus,
    /// How many times it was run again already.
    pub reruns: i32,
    /// Its definition.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Payload,
    /// Its W3C trace id.
    pub trace_id: Option<String>,
    /// The steps it keeps (succeeded or skipped), with their states.
    pub kept: Vec<TaskState>,
}

/// Reads run `id` (of `kind`, for `owner`) and the steps a re-run keeps; `None` if there is no
/// such run.
pub async fn read_for_rerun(
    db: &PgPool,
    owner: Owner<'_>,
    id: Uuid,
    kind: RunKind,
) -> Result<Option<RerunRead>, StoreError> {
    type Row = (String, i32, Json<Value>, Payload, Option<String>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT status, reruns, definition, input, trace_id FROM runs
         WHERE id = $1 AND kind = $2 AND namespace = $3 AND tenant = $4",
    )
    .bind(id)
    .bind(kind.as_str())
    .bind(owner.namespace)
    .bind(owner.tenant)
    .fetch_optional(db)
    .await?;
    let Some((status, reruns, definition, input, trace_id)) = row else {
        return Ok(None);
    };
    let kept: Vec<TaskState> = sqlx::query_as(
        "SELECT run_id, step_id, status, output, error FROM tasks
         WHERE run_id = $1 AND item = -1 AND status IN ('succeeded', 'skipped')",
    )
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(Some(RerunRead {
        status: run_status(status)?,
        reruns,
        definition,
        input,
        trace_id,
        kept,
    }))
}

/// What became of a restart.
#[derive(Debug)]
pub enum Restart {
    /// The run is no longer as it was read (another request ran it again, or it is gone):
    /// nothing was written. Its status and re-runs now, if it still exists.
    Changed(Option<(RunStatus, i32)>),
    /// The run runs again; how it ended, if planning ended it at once.
    Restarted(Option<EndedRun>),
}

/// Locks run `id` and, if it still has the status and count of re-runs it was read with,
/// deletes the rows of its steps that neither succeeded nor were skipped (items included; the
/// permits of those cancelled within [`STOP_GRACE`](super::STOP_GRACE) are kept), inserts its
/// newly planned `tasks` (of `namespace`) and writes it running again, counting the re-run;
/// when planning ended it at once (`end`), it is finished again.
pub async fn restart_run(
    tx: &mut Transaction<'_, Postgres>,
    namespace: &str,
    id: Uuid,
    read: (RunStatus, i32),
    tasks: &[NewTask],
    end: Option<FinishedRun>,
) -> Result<Restart, StoreError> {
    let row: Option<(String, i32)> =
        sqlx::query_as("SELECT status, reruns FROM runs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let now = row
        .map(|(status, reruns)| Ok::<_, StoreError>((run_status(status)?, reruns)))
        .transpose()?;
    if now != Some(read) {
        return Ok(Restart::Changed(now));
    }
    // An attempt cancelled with the run may still be stopping on a worker, holding its
    // concurrency permit for a grace after the cancel: its row goes, its permit stays (in
    // `lingering_permits`, until the same end), so the new tasks, and any other waiter of its
    // group, are admitted only once it is free.
    sqlx::query(
        "WITH gone AS (
             DELETE FROM tasks
             WHERE run_id = $1
               AND step_id IN (SELECT step_id FROM tasks
                               WHERE run_id = $1 AND item = -1
                                 AND status NOT IN ('succeeded', 'skipped'))
             RETURNING namespace, status, concurrency_group, concurrency_limit, admitted_at,
                       finished_at)
         INSERT INTO lingering_permits (namespace, concurrency_group, concurrency_limit, until)
         SELECT namespace, concurrency_group, concurrency_limit,
                finished_at + make_interval(secs => $2)
         FROM gone
         WHERE status = 'cancelled' AND concurrency_group IS NOT NULL
           AND admitted_at IS NOT NULL AND finished_at > now() - make_interval(secs => $2)",
    )
    .bind(id)
    .bind(super::admission::STOP_GRACE.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    let sql = format!(
        "UPDATE runs SET status = 'running', output = NULL, error = NULL, finished_at = NULL,
                reruns = reruns + 1, deadline_at = {DEADLINE}
         WHERE id = $1"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    super::insert_tasks(tx, namespace, tasks).await?;
    Ok(Restart::Restarted(match end {
        Some(end) => super::finish_runs(tx, &[end]).await?.pop(),
        None => None,
    }))
}
