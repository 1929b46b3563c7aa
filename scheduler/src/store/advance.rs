//! The statements of a run being advanced, inside the completion loop's transaction: locking
//! the runs (in id order), reading their steps' states for the planner, counting and joining
//! the items of `for_each` steps, and finishing runs with their still-queued tasks.

use std::borrow::Cow;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, Transaction};
use taskfleet_common::{RunStatus, TaskStatus};
use uuid::Uuid;

use super::{ENDED_RUN, EndedRun, Payload, StoreError, sealed};

/// A run being advanced, locked for the rest of the transaction.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedRun {
    /// Its id.
    pub id: Uuid,
    /// The definition it runs.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Payload,
    /// Its status.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// Its trace id, as stored (none for a run made before runs had one).
    pub trace_id: Option<String>,
    /// Its tenant.
    pub tenant: String,
}

/// Locks the given runs (in id order, so two schedulers cannot deadlock) and returns them.
pub async fn lock_runs(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
) -> Result<Vec<LockedRun>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, definition, input, status, trace_id, tenant FROM runs
         WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// The state of one task as planning needs it.
#[derive(Debug, sqlx::FromRow)]
pub struct TaskState {
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its status.
    #[sqlx(try_from = "String")]
    pub status: TaskStatus,
    /// Its output.
    pub output: Option<Payload>,
    /// Its error.
    pub error: Option<Payload>,
}

/// Returns the states of every task of the given runs.
pub async fn task_states(
    tx: &mut Transaction<'_, Postgres>,
    run_ids: &[Uuid],
) -> Result<Vec<TaskState>, StoreError> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "SELECT run_id, step_id, status, output, error FROM tasks
         WHERE run_id = ANY($1) AND item = -1",
    )
    .bind(run_ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// Adds succeeded items to the counters of their `for_each` steps, and returns the steps whose
/// items have now all succeeded.
pub async fn count_items(
    tx: &mut Transaction<'_, Postgres>,
    counts: &[(Uuid, String, i32)],
) -> Result<Vec<(Uuid, String)>, StoreError> {
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    let runs: Vec<Uuid> = counts.iter().map(|(run, _, _)| *run).collect();
    let steps: Vec<&str> = counts.iter().map(|(_, step, _)| step.as_str()).collect();
    let added: Vec<i32> = counts.iter().map(|(_, _, n)| *n).collect();
    Ok(sqlx::query_as(
        "UPDATE tasks SET items_done = items_done + c.added
         FROM UNNEST($1::uuid[], $2::text[], $3::integer[]) AS c(run_id, step_id, added)
         WHERE tasks.run_id = c.run_id AND tasks.step_id = c.step_id AND tasks.item = -1
           AND tasks.status = 'queued'
         RETURNING tasks.run_id, tasks.step_id, tasks.items_done = tasks.items_total",
    )
    .bind(&runs)
    .bind(&steps)
    .bind(&added)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .filter_map(|(run, step, complete): (Uuid, String, bool)| complete.then_some((run, step)))
    .collect())
}

/// Joins `for_each` steps whose items all succeeded: each step's output becomes the array of
/// its items' outputs, in item order. A step whose joined output would be over
/// `max_value_bytes` as compact JSON fails instead, with an `invalid_output` error naming the
/// limit, and its array is never built.
///
/// The items' outputs as stored give an upper bound of the joined size, read without moving
/// them (PostgreSQL prints a space after each `,` and `:`, and a sealed value is longer than
/// what it holds); only a step over that bound has its items read, in order, until their
/// compact size passes the limit or they all fit.
pub async fn join_items(
    tx: &mut Transaction<'_, Postgres>,
    steps: &[(Uuid, String)],
    max_value_bytes: usize,
) -> Result<(), StoreError> {
    if steps.is_empty() {
        return Ok(());
    }
    let runs: Vec<Uuid> = steps.iter().map(|(run, _)| *run).collect();
    let names: Vec<&str> = steps.iter().map(|(_, step)| step.as_str()).collect();
    let bounds: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT j.run_id, j.step_id, coalesce(sum(octet_length(i.output::text) + 1), 0) + 1
         FROM UNNEST($1::uuid[], $2::text[]) AS j(run_id, step_id)
         LEFT JOIN tasks i ON i.run_id = j.run_id AND i.step_id = j.step_id AND i.item >= 0
         GROUP BY j.run_id, j.step_id",
    )
    .bind(&runs)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    let mut fitting = Vec::with_capacity(bounds.len());
    let mut too_large = Vec::new();
    for (run, step, bound) in bounds {
        if usize::try_from(bound).is_ok_and(|bound| bound <= max_value_bytes)
            || joined_fits(tx, run, &step, max_value_bytes).await?
        {
            fitting.push((run, step));
        } else {
            let error = serde_json::json!({
                "type": taskfleet_common::error::INVALID_OUTPUT,
                "message": format!(
                    "the joined output of the items is more than the limit of \
                     {max_value_bytes} bytes as JSON (TASKFLEET_MAX_VALUE_BYTES)"
                ),
            });
            too_large.push((run, step, error));
        }
    }
    fail_items(tx, &too_large).await?;
    if fitting.is_empty() {
        return Ok(());
    }
    let runs: Vec<Uuid> = fitting.iter().map(|(run, _)| *run).collect();
    let names: Vec<&str> = fitting.iter().map(|(_, step)| step.as_str()).collect();
    sqlx::query(
        "UPDATE tasks p SET status = 'succeeded', finished_at = now(), due_at = NULL,
                output = (SELECT coalesce(jsonb_agg(i.output ORDER BY i.item), '[]'::jsonb)
                          FROM tasks i
                          WHERE i.run_id = p.run_id AND i.step_id = p.step_id AND i.item >= 0)
         FROM UNNEST($1::uuid[], $2::text[]) AS j(run_id, step_id)
         WHERE p.run_id = j.run_id AND p.step_id = j.step_id AND p.item = -1
           AND p.status = 'queued'",
    )
    .bind(&runs)
    .bind(&names)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether the array of a step's items' outputs is at most `limit` bytes as compact JSON:
/// reads the items in order, opened, and stops as soon as they pass it.
async fn joined_fits(
    tx: &mut Transaction<'_, Postgres>,
    run: Uuid,
    step: &str,
    limit: usize,
) -> Result<bool, StoreError> {
    use futures_util::TryStreamExt as _;
    let mut outputs = sqlx::query_scalar::<_, Option<Payload>>(
        "SELECT output FROM tasks WHERE run_id = $1 AND step_id = $2 AND item >= 0 ORDER BY item",
    )
    .bind(run)
    .bind(step)
    .fetch(&mut **tx);
    // `[`, then each item and the `,` or `]` after it.
    let mut size = 1;
    while let Some(output) = outputs.try_next().await? {
        size += output.map_or(4, |output| taskfleet_common::value::encoded_len(&output.0)) + 1;
        if size > limit {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Fails `for_each` steps one of whose items failed, with that item's error.
pub async fn fail_items(
    tx: &mut Transaction<'_, Postgres>,
    failures: &[(Uuid, String, Value)],
) -> Result<(), StoreError> {
    if failures.is_empty() {
        return Ok(());
    }
    let runs: Vec<Uuid> = failures.iter().map(|(run, _, _)| *run).collect();
    let steps: Vec<&str> = failures.iter().map(|(_, step, _)| step.as_str()).collect();
    let errors: Vec<Json<Cow<'_, Value>>> =
        failures.iter().map(|(_, _, error)| sealed(error)).collect();
    sqlx::query(
        "UPDATE tasks p SET status = 'failed', finished_at = now(), due_at = NULL,
                error = f.error
         FROM (SELECT DISTINCT ON (run_id, step_id) *
               FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) AS u(run_id, step_id, error)
               ORDER BY run_id, step_id) AS f
         WHERE p.run_id = f.run_id AND p.step_id = f.step_id AND p.item = -1
           AND p.status = 'queued'",
    )
    .bind(&runs)
    .bind(&steps)
    .bind(&errors)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A run that just finished.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    /// Its id.
    pub id: Uuid,
    /// Succeeded or failed.
    pub status: RunStatus,
    /// Its output.
    pub output: Option<Value>,
    /// Its error.
    pub error: Option<Value>,
}

/// Records finished runs and cancels their tasks that are still queued, including those
/// waiting for a retry, which then wait no more. Returns the runs as they ended.
pub async fn finish_runs(
    tx: &mut Transaction<'_, Postgres>,
    runs: &[FinishedRun],
) -> Result<Vec<EndedRun>, StoreError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = runs.iter().map(|run| run.id).collect();
    let statuses: Vec<&str> = runs.iter().map(|run| run.status.as_str()).collect();
    let outputs: Vec<Option<Json<Cow<'_, Value>>>> = runs
        .iter()
        .map(|run| run.output.as_ref().map(sealed))
        .collect();
    let errors: Vec<Option<Json<Cow<'_, Value>>>> = runs
        .iter()
        .map(|run| run.error.as_ref().map(sealed))
        .collect();
    let sql = format!(
        "WITH finished AS (
             UPDATE runs SET status = f.status, output = f.output, error = f.error,
                    finished_at = now()
             FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[])
                  AS f(id, status, output, error)
             WHERE runs.id = f.id
             RETURNING {ENDED_RUN}),
         cancelled AS (
             UPDATE tasks SET status = 'cancelled', finished_at = now(), due_at = NULL,
                    error = '{{\"type\": \"cancelled\", \"message\": \"the run ended before this step finished\"}}'
             WHERE run_id = ANY($1) AND status = 'queued')
         SELECT * FROM finished"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&statuses)
        .bind(&outputs)
        .bind(&errors)
        .fetch_all(&mut **tx)
        .await?)
}
