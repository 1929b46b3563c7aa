//! Running a failed or cancelled run again from its failed, cancelled and unstarted steps: the
//! rows of its steps that did not succeed (nor were skipped) are deleted with their items, so
//! planning finds those steps unstarted and plans them anew, while the steps that succeeded keep
//! their outputs and are not run again. Its deadline, if its definition sets `timeout_s`,
//! starts again.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use taskfleet_common::{RunKind, RunStatus};
use uuid::Uuid;

use super::advance::{FinishedRun, TaskState};
use super::runs::run_status;
use super::{DEADLINE, EndedRun, NewTask, Owner, Payload, StoreError};

/// Where a run stands when it is asked to run again.
#[derive(Debug)]
pub enum Rerun {
    /// No such run (of that kind, for that owner).
    NotFound,
    /// It runs again already, after an earlier request: nothing more to do.
    UnderWay,
    /// It cannot run again: it is running for the first time, or it succeeded.
    Refused(RunStatus),
    /// Its steps that did not succeed are cleared: plan it from these states.
    Cleared(RerunLoad),
}

/// What planning a run again reads.
#[derive(Debug)]
pub struct RerunLoad {
    /// Its definition.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Payload,
    /// Its W3C trace id.
    pub trace_id: Option<String>,
    /// The steps it keeps, with their states.
    pub kept: Vec<TaskState>,
}

/// Locks run `id` and, if it failed or was cancelled, deletes the rows of its steps that
/// neither succeeded nor were skipped, items included; the caller then plans it and writes it
/// with [`restart_run`] in the same transaction.
pub async fn clear_for_rerun(
    tx: &mut Transaction<'_, Postgres>,
    owner: Owner<'_>,
    id: Uuid,
    kind: RunKind,
) -> Result<Rerun, StoreError> {
    type Row = (String, i32, Json<Value>, Payload, Option<String>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT status, reruns, definition, input, trace_id FROM runs
         WHERE id = $1 AND kind = $2 AND namespace = $3 AND tenant = $4 FOR UPDATE",
    )
    .bind(id)
    .bind(kind.as_str())
    .bind(owner.namespace)
    .bind(owner.tenant)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((status, reruns, definition, input, trace_id)) = row else {
        return Ok(Rerun::NotFound);
    };
    match run_status(status)? {
        RunStatus::Failed | RunStatus::Cancelled => {}
        RunStatus::Running if reruns > 0 => return Ok(Rerun::UnderWay),
        status => return Ok(Rerun::Refused(status)),
    }
    sqlx::query(
        "DELETE FROM tasks
         WHERE run_id = $1
           AND step_id IN (SELECT step_id FROM tasks
                           WHERE run_id = $1 AND item = -1
                             AND status NOT IN ('succeeded', 'skipped'))",
    )
    .bind(id)
    .execute(&mut **tx)
    .await?;
    let kept: Vec<TaskState> = sqlx::query_as(
        "SELECT run_id, step_id, status, output, error FROM tasks
         WHERE run_id = $1 AND item = -1",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    Ok(Rerun::Cleared(RerunLoad {
        definition,
        input,
        trace_id,
        kept,
    }))
}

/// Writes run `id` running again with its newly planned `tasks` (of `namespace`), counting the
/// re-run; when planning ended it at once (`end`), it is finished again. Returns how it ended in
/// that case.
pub async fn restart_run(
    tx: &mut Transaction<'_, Postgres>,
    namespace: &str,
    id: Uuid,
    tasks: &[NewTask],
    end: Option<FinishedRun>,
) -> Result<Option<EndedRun>, StoreError> {
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
    Ok(match end {
        Some(end) => super::finish_runs(tx, &[end]).await?.pop(),
        None => None,
    })
}
