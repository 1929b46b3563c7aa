//! Runs and the tasks planned for them: inserting new runs with their first tasks (one
//! statement for a whole batch of submissions) and the tasks planned later, the API's reads of
//! runs and their steps, and cancellation. What a completion writes is in `completions`; the
//! statements of a run being advanced are in `advance`.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use taskfleet_common::{RunKind, RunStatus, TaskStatus};
use uuid::Uuid;

use super::{ENDED_RUN, EndedRun, Owner, Payload, RunRow, StoreError, TaskRow, add, sealed};

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Its id.
    pub id: Uuid,
    /// `workflow` or `job`.
    pub kind: RunKind,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The registered workflow it runs, if any.
    pub workflow: Option<String>,
    /// The version of that workflow.
    pub workflow_version: Option<i32>,
    /// The definition it runs.
    pub definition: Value,
    /// Its input.
    pub input: Value,
    /// Its status at insertion.
    pub status: RunStatus,
    /// Its output, if it finished at once.
    pub output: Option<Value>,
    /// Its error, if it failed at once.
    pub error: Option<Value>,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
    /// The W3C trace it belongs to.
    pub trace_id: Option<taskfleet_common::TraceId>,
    /// The span its own span is a child of: the request's.
    pub trace_span_id: Option<taskfleet_common::trace::SpanId>,
    /// Seconds before its first steps are dispatched: its start, from which its definition's
    /// `timeout_s` counts.
    pub delay_s: Option<f64>,
}

/// A task to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Its id.
    pub id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// `queued`, `skipped`, `failed` or `cancelled`.
    pub status: TaskStatus,
    /// The task queue.
    pub queue: String,
    /// 0 to 9.
    pub priority: i16,
    /// The step's input (for a dispatched step).
    pub input: Option<Value>,
    /// The error of a step that failed while being planned.
    pub error: Option<Value>,
    /// For a delayed job: seconds until it is due; the timer loop dispatches it then.
    pub delay_s: Option<f64>,
    /// The item of a `for_each` step this task runs, or -1 for a step's own row.
    pub item: i32,
    /// For the row of a `for_each` step: how many items it has.
    pub items_total: Option<i32>,
    /// The output of a step that finished while being planned (a `for_each` over nothing).
    pub output: Option<Value>,
    /// The group its starts count in, for a step with a `rate_limit`.
    pub rate_group: Option<String>,
    /// The group and limit of a step with a `concurrency` limit: the task waits until a
    /// scheduler admits it.
    pub concurrency: Option<(String, i32)>,
}

impl NewTask {
    /// The concurrency group of a task that waits to be admitted.
    pub fn waiting_group(&self) -> Option<&str> {
        match &self.concurrency {
            Some((group, _)) if self.status == TaskStatus::Queued => Some(group),
            _ => None,
        }
    }
}

/// Inserts runs with their first tasks, in one statement (so all or none of them, and one
/// round trip); a run whose idempotency key is already taken is not inserted, nor are its
/// tasks. Returns the ids of the runs inserted.
pub async fn insert_runs(
    conn: &mut PgConnection,
    namespace: &str,
    runs: &[NewRun],
    tasks: &[NewTask],
) -> Result<Vec<Uuid>, StoreError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = runs.iter().map(|run| run.id).collect();
    let kinds: Vec<&str> = runs.iter().map(|run| run.kind.as_str()).collect();
    let workflows: Vec<Option<String>> = runs.iter().map(|run| run.workflow.clone()).collect();
    let versions: Vec<Option<i32>> = runs.iter().map(|run| run.workflow_version).collect();
    let definitions: Vec<Json<&Value>> = runs.iter().map(|run| Json(&run.definition)).collect();
    let inputs: Vec<Json<Cow<'_, Value>>> = runs.iter().map(|run| sealed(&run.input)).collect();
    let statuses: Vec<&str> = runs.iter().map(|run| run.status.as_str()).collect();
    let outputs: Vec<Option<Json<Cow<'_, Value>>>> = runs
        .iter()
        .map(|run| run.output.as_ref().map(sealed))
        .collect();
    let errors: Vec<Option<Json<Cow<'_, Value>>>> = runs
        .iter()
        .map(|run| run.error.as_ref().map(sealed))
        .collect();
    let keys: Vec<Option<String>> = runs.iter().map(|run| run.idempotency_key.clone()).collect();
    let tenants: Vec<&str> = runs.iter().map(|run| run.tenant.as_str()).collect();
    let trace_ids: Vec<Option<String>> = runs
        .iter()
        .map(|run| run.trace_id.map(|id| id.to_string()))
        .collect();
    let span_ids: Vec<Option<String>> = runs
        .iter()
        .map(|run| run.trace_span_id.map(|id| id.to_string()))
        .collect();
    let delays: Vec<Option<f64>> = runs.iter().map(|run| run.delay_s).collect();
    let columns = TaskColumns::of(namespace, tasks);
    let sql = format!(
        "WITH inserted AS (
             INSERT INTO runs (namespace, id, kind, workflow, workflow_version, definition, input,
                               status, output, error, idempotency_key, tenant, finished_at,
                               trace_id, trace_span_id, deadline_at)
             SELECT $11, id, kind, workflow, version, definition, input, status, output, error,
                    key, tenant, CASE WHEN status IN ('succeeded', 'failed') THEN now() END,
                    trace_id, span_id,
                    now() + make_interval(secs => coalesce(delay, 0)
                                                  + (definition->>'timeout_s')::float8)
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::integer[], $5::jsonb[],
                         $6::jsonb[], $7::text[], $8::jsonb[], $9::jsonb[], $10::text[],
                         $12::text[], $13::text[], $14::text[], $15::float8[])
                  AS t(id, kind, workflow, version, definition, input, status, output, error, key,
                       tenant, trace_id, span_id, delay)
             ON CONFLICT (namespace, tenant, kind, idempotency_key)
                WHERE idempotency_key IS NOT NULL
             DO NOTHING
             RETURNING id),
         first_tasks AS ({} WHERE t.run_id IN (SELECT id FROM inserted))
         SELECT id FROM inserted",
        TaskColumns::insert_sql(16)
    );
    let mut arguments = PgArguments::default();
    add(&mut arguments, &ids)?;
    add(&mut arguments, &kinds)?;
    add(&mut arguments, &workflows)?;
    add(&mut arguments, &versions)?;
    add(&mut arguments, &definitions)?;
    add(&mut arguments, &inputs)?;
    add(&mut arguments, &statuses)?;
    add(&mut arguments, &outputs)?;
    add(&mut arguments, &errors)?;
    add(&mut arguments, &keys)?;
    add(&mut arguments, namespace)?;
    add(&mut arguments, &tenants)?;
    add(&mut arguments, &trace_ids)?;
    add(&mut arguments, &span_ids)?;
    add(&mut arguments, &delays)?;
    columns.add_to(&mut arguments)?;
    Ok(sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), arguments)
        .fetch_all(conn)
        .await?)
}

/// Returns the ids and statuses of the runs that hold the given idempotency keys, each
/// `(tenant, key)`, as `(tenant, key, id, status)`.
pub async fn runs_by_idempotency_key(
    conn: &mut PgConnection,
    namespace: &str,
    kind: RunKind,
    keys: &[(String, String)],
) -> Result<Vec<(String, String, Uuid, RunStatus)>, StoreError> {
    let (tenants, keys): (Vec<&str>, Vec<&str>) = keys
        .iter()
        .map(|(tenant, key)| (tenant.as_str(), key.as_str()))
        .unzip();
    let rows: Vec<(String, String, Uuid, String)> = sqlx::query_as(
        "SELECT r.tenant, r.idempotency_key, r.id, r.status
         FROM UNNEST($3::text[], $4::text[]) AS k(tenant, key)
         JOIN runs r ON r.namespace = $1 AND r.tenant = k.tenant AND r.kind = $2
                    AND r.idempotency_key = k.key",
    )
    .bind(namespace)
    .bind(kind.as_str())
    .bind(&tenants)
    .bind(&keys)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(tenant, key, id, status)| Ok((tenant, key, id, run_status(status)?)))
        .collect()
}

/// Reads a run's stored status.
pub(super) fn run_status(text: String) -> Result<RunStatus, StoreError> {
    RunStatus::try_from(text)
        .map_err(|error| StoreError::from(sqlx::Error::Decode(Box::new(error))))
}

/// The columns of tasks to insert, as arrays bound to one statement.
struct TaskColumns<'a> {
    namespace: &'a str,
    ids: Vec<Uuid>,
    run_ids: Vec<Uuid>,
    step_ids: Vec<&'a str>,
    statuses: Vec<&'a str>,
    queues: Vec<&'a str>,
    priorities: Vec<i16>,
    inputs: Vec<Option<Json<Cow<'a, Value>>>>,
    errors: Vec<Option<Json<Cow<'a, Value>>>>,
    delays: Vec<Option<f64>>,
    items: Vec<i32>,
    totals: Vec<Option<i32>>,
    outputs: Vec<Option<Json<Cow<'a, Value>>>>,
    rate_groups: Vec<Option<&'a str>>,
    concurrency_groups: Vec<Option<&'a str>>,
    concurrency_limits: Vec<Option<i32>>,
}

impl<'a> TaskColumns<'a> {
    fn of(namespace: &'a str, tasks: &'a [NewTask]) -> Self {
        Self {
            namespace,
            ids: tasks.iter().map(|task| task.id).collect(),
            run_ids: tasks.iter().map(|task| task.run_id).collect(),
            step_ids: tasks.iter().map(|task| task.step_id.as_str()).collect(),
            statuses: tasks.iter().map(|task| task.status.as_str()).collect(),
            queues: tasks.iter().map(|task| task.queue.as_str()).collect(),
            priorities: tasks.iter().map(|task| task.priority).collect(),
            inputs: tasks
                .iter()
                .map(|task| task.input.as_ref().map(sealed))
                .collect(),
            errors: tasks
                .iter()
                .map(|task| task.error.as_ref().map(sealed))
                .collect(),
            delays: tasks.iter().map(|task| task.delay_s).collect(),
            items: tasks.iter().map(|task| task.item).collect(),
            totals: tasks.iter().map(|task| task.items_total).collect(),
            outputs: tasks
                .iter()
                .map(|task| task.output.as_ref().map(sealed))
                .collect(),
            rate_groups: tasks
                .iter()
                .map(|task| task.rate_group.as_deref())
                .collect(),
            concurrency_groups: tasks
                .iter()
                .map(|task| task.concurrency.as_ref().map(|(group, _)| group.as_str()))
                .collect(),
            concurrency_limits: tasks
                .iter()
                .map(|task| task.concurrency.as_ref().map(|(_, limit)| *limit))
                .collect(),
        }
    }

    /// The `INSERT` of the tasks, their arrays bound from parameter `$first` on; the rows come
    /// from `t`, which a caller may filter with a `WHERE` appended. A queued task of a step
    /// with a concurrency limit waits to be admitted (`due_at` 'infinity'), from the end of its
    /// delay (`ready_at`).
    fn insert_sql(first: usize) -> String {
        let p = |offset: usize| format!("${}", first + offset);
        format!(
            "INSERT INTO tasks (namespace, id, run_id, step_id, status, queue, priority, input,
                                error, finished_at, due_at, item, items_total, output,
                                rate_group, concurrency_group, concurrency_limit, ready_at)
             SELECT {}::text, id, run_id, step_id, status, queue, priority, input, error,
                    CASE WHEN status = 'queued' THEN NULL ELSE now() END,
                    CASE WHEN status <> 'queued' THEN NULL
                         WHEN concurrency_group IS NOT NULL THEN 'infinity'::timestamptz
                         ELSE now() + make_interval(secs => delay) END,
                    item, items_total, output, rate_group, concurrency_group, concurrency_limit,
                    CASE WHEN concurrency_group IS NOT NULL
                         THEN now() + make_interval(secs => coalesce(delay, 0)) END
             FROM UNNEST({}::uuid[], {}::uuid[], {}::text[], {}::text[], {}::text[],
                         {}::smallint[], {}::jsonb[], {}::jsonb[], {}::float8[], {}::integer[],
                         {}::integer[], {}::jsonb[], {}::text[], {}::text[], {}::integer[])
                  AS t(id, run_id, step_id, status, queue, priority, input, error, delay, item,
                       items_total, output, rate_group, concurrency_group, concurrency_limit)",
            p(15),
            p(0),
            p(1),
            p(2),
            p(3),
            p(4),
            p(5),
            p(6),
            p(7),
            p(8),
            p(9),
            p(10),
            p(11),
            p(12),
            p(13),
            p(14)
        )
    }

    /// Appends the arrays to `arguments`, in the order [`Self::insert_sql`] numbers them.
    fn add_to(&self, arguments: &mut PgArguments) -> Result<(), sqlx::Error> {
        add(arguments, &self.ids)?;
        add(arguments, &self.run_ids)?;
        add(arguments, &self.step_ids)?;
        add(arguments, &self.statuses)?;
        add(arguments, &self.queues)?;
        add(arguments, &self.priorities)?;
        add(arguments, &self.inputs)?;
        add(arguments, &self.errors)?;
        add(arguments, &self.delays)?;
        add(arguments, &self.items)?;
        add(arguments, &self.totals)?;
        add(arguments, &self.outputs)?;
        add(arguments, &self.rate_groups)?;
        add(arguments, &self.concurrency_groups)?;
        add(arguments, &self.concurrency_limits)?;
        add(arguments, self.namespace)
    }
}

/// Inserts tasks of runs in `namespace` in one statement.
pub async fn insert_tasks(
    conn: &mut PgConnection,
    namespace: &str,
    tasks: &[NewTask],
) -> Result<(), StoreError> {
    if tasks.is_empty() {
        return Ok(());
    }
    let mut arguments = PgArguments::default();
    TaskColumns::of(namespace, tasks).add_to(&mut arguments)?;
    sqlx::query_with(sqlx::AssertSqlSafe(TaskColumns::insert_sql(1)), arguments)
        .execute(conn)
        .await?;
    Ok(())
}

/// The columns of a [`RunRow`].
const RUN_COLUMNS: &str = "id, kind, workflow, workflow_version, definition, input, status, \
                           output, error, created_at, finished_at, trace_id, schedule, \
                           scheduled_for";

/// Returns a run of the given kind, if the owner has it.
pub async fn get_run(
    db: &PgPool,
    owner: Owner<'_>,
    id: Uuid,
    kind: RunKind,
) -> Result<Option<RunRow>, StoreError> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs
         WHERE id = $1 AND kind = $2 AND namespace = $3 AND tenant = $4"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(kind.as_str())
        .bind(owner.namespace)
        .bind(owner.tenant)
        .fetch_optional(db)
        .await?)
}

/// Returns the tasks of a run.
pub async fn get_tasks(db: &PgPool, run_id: Uuid) -> Result<Vec<TaskRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, step_id, status, attempt, output, error, started_at, finished_at,
                items_total, items_done, logs
         FROM tasks WHERE run_id = $1 AND item = -1",
    )
    .bind(run_id)
    .fetch_all(db)
    .await?)
}

/// Filters of the run and job listings.
#[derive(Debug)]
pub struct RunFilter {
    /// Workflow runs or jobs.
    pub kind: RunKind,
    /// Only runs in this status.
    pub status: Option<RunStatus>,
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs older than this one (the cursor).
    pub before: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
}

/// A run or job as listings show it: no input, output or definition, which may be large.
#[derive(Debug, sqlx::FromRow)]
pub struct RunSummaryRow {
    /// Its id.
    pub id: Uuid,
    /// The workflow it runs, if it has a name.
    pub workflow: Option<String>,
    /// The registered workflow's version.
    pub workflow_version: Option<i32>,
    /// Its status.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// A job's step id.
    pub step: Option<String>,
    /// A job's queue, when its step names one.
    pub queue: Option<String>,
    /// A job's executor: `python`, `python_code` or `dataflow`.
    pub executor: Option<String>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

/// Lists workflow runs or jobs, newest first.
pub async fn list_runs(
    db: &PgPool,
    owner: Owner<'_>,
    filter: &RunFilter,
) -> Result<Vec<RunSummaryRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, workflow, workflow_version, status, created_at, finished_at,
                CASE WHEN kind = 'job' THEN definition->'steps'->0->>'id' END AS step,
                CASE WHEN kind = 'job' THEN definition->'steps'->0->>'queue' END AS queue,
                CASE WHEN kind = 'job' THEN
                    (SELECT key FROM jsonb_object_keys(definition->'steps'->0) AS key
                     WHERE key IN ('python', 'python_code', 'dataflow') LIMIT 1)
                END AS executor
         FROM runs
         WHERE namespace = $5 AND tenant = $7 AND kind = $6
           AND ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR workflow = $2)
           AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4",
    )
    .bind(filter.status.map(RunStatus::as_str))
    .bind(&filter.workflow)
    .bind(filter.before)
    .bind(filter.limit)
    .bind(owner.namespace)
    .bind(filter.kind.as_str())
    .bind(owner.tenant)
    .fetch_all(db)
    .await?)
}

/// What became of a cancellation.
#[derive(Debug)]
pub enum Cancellation {
    /// No such run (of that kind, in that namespace).
    NotFound,
    /// The run had already finished, in this status.
    Finished(RunStatus),
    /// The run is now cancelled, with its queued and waiting tasks.
    Cancelled(EndedRun),
}

/// Cancels a run: records it as cancelled and cancels its tasks that have not finished, so no
/// new task of it starts and no completion of it is recorded any more.
pub async fn cancel_run(
    db: &PgPool,
    owner: Owner<'_>,
    id: Uuid,
    kind: RunKind,
) -> Result<Cancellation, StoreError> {
    let mut tx = db.begin().await?;
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM runs
         WHERE id = $1 AND kind = $2 AND namespace = $3 AND tenant = $4 FOR UPDATE",
    )
    .bind(id)
    .bind(kind.as_str())
    .bind(owner.namespace)
    .bind(owner.tenant)
    .fetch_optional(&mut *tx)
    .await?;
    match status.map(run_status).transpose()? {
        None => return Ok(Cancellation::NotFound),
        Some(status) if status.is_finished() => return Ok(Cancellation::Finished(status)),
        Some(_) => {}
    }
    let sql = format!(
        "UPDATE runs SET status = 'cancelled', finished_at = now(),
                error = '{{\"type\": \"cancelled\", \"message\": \"the run was cancelled\"}}'
         WHERE id = $1
         RETURNING {ENDED_RUN}"
    );
    let ended: EndedRun = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE tasks SET status = 'cancelled', finished_at = now(), due_at = NULL,
                error = '{\"type\": \"cancelled\", \"message\": \"the run was cancelled\"}'
         WHERE run_id = $1 AND status = 'queued'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Cancellation::Cancelled(ended))
}

/// Reads the inputs and outputs of the namespace's newest runs, as a scheduler does at start to
/// find out whether its keys open what is stored: `Err` names the first value they do not
/// (sealed with a key it lacks, or with another key of the same id).
pub async fn check_sealed(db: &PgPool, namespace: &str) -> Result<(), StoreError> {
    /// How many of the newest runs are read.
    const SAMPLE: i64 = 100;
    let _: Vec<(Payload, Option<Payload>)> = sqlx::query_as(
        "SELECT input, output FROM runs WHERE namespace = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(namespace)
    .bind(SAMPLE)
    .fetch_all(db)
    .await?;
    Ok(())
}

/// Returns the run of `kind` of the owner that holds an idempotency key, if any.
pub async fn run_with_idempotency_key(
    db: &PgPool,
    owner: Owner<'_>,
    kind: RunKind,
    key: &str,
) -> Result<Option<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM runs
         WHERE namespace = $1 AND tenant = $2 AND kind = $3 AND idempotency_key = $4",
    )
    .bind(owner.namespace)
    .bind(owner.tenant)
    .bind(kind.as_str())
    .bind(key)
    .fetch_optional(db)
    .await?)
}
