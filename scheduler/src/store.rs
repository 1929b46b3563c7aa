//! All SQL of the scheduler. Handlers and loops call these functions; no SQL lives elsewhere.
//!
//! Every write that sits on the hot path takes a batch (arrays bound with `UNNEST`), so one round
//! trip and one commit serve many runs or completions.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Arguments as _;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres, Transaction};
use uuid::Uuid;

/// The schema, applied at start.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Describes a failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or refused a statement.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be applied.
    #[error("applying migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Returns whether the error means the database cannot be reached right now, rather than
    /// that it refused the statement.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // The server going away answers on connections it had: a shutdown (57P01, 57P02),
            // a start not yet finished (57P03), a connection failure (class 08), too many
            // connections or no room (class 53). None of them says anything about the statement.
            Self::Database(sqlx::Error::Database(error)) => error.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
            }),
            _ => false,
        }
    }
}

/// Opens a pool on `url`, creating the database first if it does not exist, and applies the
/// migrations.
///
/// Its connections plan without sequential scans where an index serves: every statement of the
/// scheduler is meant to reach its rows through an index. A young table has no statistics yet
/// (nor ever, where autovacuum is off), and PostgreSQL then prefers to scan it whole while it
/// is small; a statement's cached plan keeps doing so as the table grows, so each batch of
/// completions would read every run.
pub async fn connect(url: &str, pool_size: u32) -> Result<PgPool, StoreError> {
    let options = connect_options(url)?.options([("enable_seqscan", "off")]);
    create_database_if_missing(&options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(std::time::Duration::from_secs(5))
        // A ping before every use doubles the round trips of every statement; a connection
        // that broke (a database restart) fails its next statement instead, is dropped, and
        // that error is handled like the database being down.
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// A connection a loop keeps for itself between statements. Each return of a connection to the
/// pool costs a round trip (sqlx pings it on the way back), which a loop on the hot path would
/// pay for every statement. A connection that failed as if broken is given up, and the next use
/// takes a fresh one from the pool.
pub struct HeldConnection {
    pool: PgPool,
    conn: Option<sqlx::pool::PoolConnection<Postgres>>,
}

impl HeldConnection {
    /// Holds connections of `pool`, taking the first when first used.
    pub fn new(pool: PgPool) -> Self {
        Self { pool, conn: None }
    }

    /// The held connection, taken from the pool if none is held.
    pub async fn get(&mut self) -> Result<&mut PgConnection, StoreError> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(&mut **self.conn.insert(conn))
    }

    /// Passes `result` on, giving up the connection if the error says it may be broken.
    pub fn check<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(error) = &result
            && error.is_unavailable()
        {
            self.discard();
        }
        result
    }

    /// Gives up the held connection; the next use takes a fresh one.
    pub fn discard(&mut self) {
        self.conn = None;
    }
}

/// Reads a database URL. Where neither the URL nor `PGSSLMODE` names an `sslmode`, TLS is
/// `prefer` (PostgreSQL's default), except to a server on this machine: TLS over loopback
/// protects nothing and doubles the cost of every round trip.
fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    use sqlx::postgres::PgSslMode;
    let options = PgConnectOptions::from_str(url)?;
    let names_ssl_mode = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair.starts_with("sslmode=")));
    let loopback = matches!(
        options.get_host(),
        "localhost" | "127.0.0.1" | "::1" | "[::1]"
    );
    let default_mode = matches!(options.get_ssl_mode(), PgSslMode::Prefer);
    Ok(if loopback && default_mode && !names_ssl_mode {
        options.ssl_mode(PgSslMode::Disable)
    } else {
        options
    })
}

/// Creates the database named in `options` if it does not exist. Connects to the maintenance
/// database `postgres` only when the target database is missing, so deployments that deny that
/// connection still start against an existing database.
async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StoreError> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    match options.connect().await {
        Ok(connection) => {
            let _ = connection.close().await;
            return Ok(());
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("3D000") => {}
        Err(error) => return Err(error.into()),
    }
    let mut admin = options.clone().database("postgres").connect().await?;
    let statement = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    match sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await
    {
        Ok(_) => tracing::info!(database = %name, "database created"),
        // Another scheduler created it at the same moment.
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P04") => {}
        Err(error) => return Err(error.into()),
    }
    let _ = admin.close().await;
    Ok(())
}

/// A registered workflow version.
#[derive(Debug, sqlx::FromRow)]
pub struct WorkflowRow {
    /// Its name.
    pub name: String,
    /// Its version, from 1.
    pub version: i32,
    /// The definition.
    pub definition: Json<Value>,
    /// When this version was registered.
    pub created_at: DateTime<Utc>,
}

/// Registers `definition` under `name` and returns its version: the latest version if the
/// definition is unchanged, else a new one.
pub async fn put_workflow(
    db: &PgPool,
    namespace: &str,
    name: &str,
    definition: &Value,
) -> Result<(i32, bool), StoreError> {
    let mut tx = db.begin().await?;
    // Serialises concurrent registrations of one name, so versions never collide.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('workflow:' || $1 || ':' || $2))")
        .bind(namespace)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    let latest: Option<(i32, Json<Value>)> = sqlx::query_as(
        "SELECT version, definition FROM workflows WHERE namespace = $1 AND name = $2
         ORDER BY version DESC LIMIT 1",
    )
    .bind(namespace)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((version, Json(existing))) = &latest
        && existing == definition
    {
        return Ok((*version, false));
    }
    let version = latest.map_or(1, |(version, _)| version + 1);
    sqlx::query(
        "INSERT INTO workflows (namespace, name, version, definition) VALUES ($1, $2, $3, $4)",
    )
    .bind(namespace)
    .bind(name)
    .bind(version)
    .bind(Json(definition))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((version, true))
}

/// Returns one version of a workflow (the latest if `version` is `None`).
pub async fn get_workflow(
    db: &PgPool,
    namespace: &str,
    name: &str,
    version: Option<i32>,
) -> Result<Option<WorkflowRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT name, version, definition, created_at FROM workflows
         WHERE namespace = $1 AND name = $2 AND ($3::integer IS NULL OR version = $3)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(namespace)
    .bind(name)
    .bind(version)
    .fetch_optional(db)
    .await?)
}

/// Returns the latest version of every workflow, by name.
pub async fn list_workflows(db: &PgPool, namespace: &str) -> Result<Vec<WorkflowRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (name) name, version, definition, created_at FROM workflows
         WHERE namespace = $1 ORDER BY name, version DESC",
    )
    .bind(namespace)
    .fetch_all(db)
    .await?)
}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// Its id.
    pub id: Uuid,
    /// `workflow` or `job`.
    pub kind: &'static str,
    /// The registered workflow it runs, if any.
    pub workflow: Option<String>,
    /// The version of that workflow.
    pub workflow_version: Option<i32>,
    /// The definition it runs.
    pub definition: Value,
    /// Its input.
    pub input: Value,
    /// Its status at insertion.
    pub status: &'static str,
    /// Its output, if it finished at once.
    pub output: Option<Value>,
    /// Its error, if it failed at once.
    pub error: Option<Value>,
    /// The client's idempotency key.
    pub idempotency_key: Option<String>,
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
    pub status: &'static str,
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
    let kinds: Vec<&str> = runs.iter().map(|run| run.kind).collect();
    let workflows: Vec<Option<String>> = runs.iter().map(|run| run.workflow.clone()).collect();
    let versions: Vec<Option<i32>> = runs.iter().map(|run| run.workflow_version).collect();
    let definitions: Vec<Json<&Value>> = runs.iter().map(|run| Json(&run.definition)).collect();
    let inputs: Vec<Json<&Value>> = runs.iter().map(|run| Json(&run.input)).collect();
    let statuses: Vec<&str> = runs.iter().map(|run| run.status).collect();
    let outputs: Vec<Option<Json<&Value>>> = runs
        .iter()
        .map(|run| run.output.as_ref().map(Json))
        .collect();
    let errors: Vec<Option<Json<&Value>>> = runs
        .iter()
        .map(|run| run.error.as_ref().map(Json))
        .collect();
    let keys: Vec<Option<String>> = runs.iter().map(|run| run.idempotency_key.clone()).collect();
    let columns = TaskColumns::of(tasks);
    let sql = format!(
        "WITH inserted AS (
             INSERT INTO runs (namespace, id, kind, workflow, workflow_version, definition, input,
                               status, output, error, idempotency_key, finished_at)
             SELECT $11, id, kind, workflow, version, definition, input, status, output, error,
                    key, CASE WHEN status IN ('succeeded', 'failed') THEN now() END
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::integer[], $5::jsonb[],
                         $6::jsonb[], $7::text[], $8::jsonb[], $9::jsonb[], $10::text[])
                  AS t(id, kind, workflow, version, definition, input, status, output, error, key)
             ON CONFLICT (namespace, kind, idempotency_key) WHERE idempotency_key IS NOT NULL
             DO NOTHING
             RETURNING id),
         first_tasks AS ({} WHERE t.run_id IN (SELECT id FROM inserted))
         SELECT id FROM inserted",
        TaskColumns::insert_sql(12)
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
    columns.add_to(&mut arguments)?;
    Ok(sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), arguments)
        .fetch_all(conn)
        .await?)
}

/// Returns the ids of the runs that hold the given idempotency keys.
pub async fn runs_by_idempotency_key(
    conn: &mut PgConnection,
    namespace: &str,
    kind: &str,
    keys: &[String],
) -> Result<Vec<(String, Uuid, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT idempotency_key, id, status FROM runs
         WHERE namespace = $1 AND kind = $2 AND idempotency_key = ANY($3)",
    )
    .bind(namespace)
    .bind(kind)
    .bind(keys)
    .fetch_all(conn)
    .await?)
}

/// Binds `value` as the next parameter of a statement built by hand.
fn add<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), sqlx::Error>
where
    T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
{
    arguments.add(value).map_err(sqlx::Error::Encode)
}

/// The columns of tasks to insert, as arrays bound to one statement.
struct TaskColumns<'a> {
    ids: Vec<Uuid>,
    run_ids: Vec<Uuid>,
    step_ids: Vec<&'a str>,
    statuses: Vec<&'a str>,
    queues: Vec<&'a str>,
    priorities: Vec<i16>,
    inputs: Vec<Option<Json<&'a Value>>>,
    errors: Vec<Option<Json<&'a Value>>>,
    delays: Vec<Option<f64>>,
    items: Vec<i32>,
    totals: Vec<Option<i32>>,
    outputs: Vec<Option<Json<&'a Value>>>,
}

impl<'a> TaskColumns<'a> {
    fn of(tasks: &'a [NewTask]) -> Self {
        Self {
            ids: tasks.iter().map(|task| task.id).collect(),
            run_ids: tasks.iter().map(|task| task.run_id).collect(),
            step_ids: tasks.iter().map(|task| task.step_id.as_str()).collect(),
            statuses: tasks.iter().map(|task| task.status).collect(),
            queues: tasks.iter().map(|task| task.queue.as_str()).collect(),
            priorities: tasks.iter().map(|task| task.priority).collect(),
            inputs: tasks
                .iter()
                .map(|task| task.input.as_ref().map(Json))
                .collect(),
            errors: tasks
                .iter()
                .map(|task| task.error.as_ref().map(Json))
                .collect(),
            delays: tasks.iter().map(|task| task.delay_s).collect(),
            items: tasks.iter().map(|task| task.item).collect(),
            totals: tasks.iter().map(|task| task.items_total).collect(),
            outputs: tasks
                .iter()
                .map(|task| task.output.as_ref().map(Json))
                .collect(),
        }
    }

    /// The `INSERT` of the tasks, their arrays bound from parameter `$first` on; the rows come
    /// from `t`, which a caller may filter with a `WHERE` appended.
    fn insert_sql(first: usize) -> String {
        let p = |offset: usize| format!("${}", first + offset);
        format!(
            "INSERT INTO tasks (id, run_id, step_id, status, queue, priority, input, error,
                                finished_at, due_at, item, items_total, output)
             SELECT id, run_id, step_id, status, queue, priority, input, error,
                    CASE WHEN status = 'queued' THEN NULL ELSE now() END,
                    CASE WHEN status = 'queued' THEN now() + make_interval(secs => delay) END,
                    item, items_total, output
             FROM UNNEST({}::uuid[], {}::uuid[], {}::text[], {}::text[], {}::text[],
                         {}::smallint[], {}::jsonb[], {}::jsonb[], {}::float8[], {}::integer[],
                         {}::integer[], {}::jsonb[])
                  AS t(id, run_id, step_id, status, queue, priority, input, error, delay, item,
                       items_total, output)",
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
            p(11)
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
        add(arguments, &self.outputs)
    }
}

/// Inserts tasks in one statement.
pub async fn insert_tasks(conn: &mut PgConnection, tasks: &[NewTask]) -> Result<(), StoreError> {
    if tasks.is_empty() {
        return Ok(());
    }
    let mut arguments = PgArguments::default();
    TaskColumns::of(tasks).add_to(&mut arguments)?;
    sqlx::query_with(sqlx::AssertSqlSafe(TaskColumns::insert_sql(1)), arguments)
        .execute(conn)
        .await?;
    Ok(())
}

/// A run as the API shows it.
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
pub struct RunRow {
    /// Its id.
    pub id: Uuid,
    /// `workflow` or `job`.
    pub kind: String,
    /// The registered workflow, if any.
    pub workflow: Option<String>,
    /// Its version.
    pub workflow_version: Option<i32>,
    /// The definition it runs.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Json<Value>,
    /// Its status.
    pub status: String,
    /// Its output.
    pub output: Option<Json<Value>>,
    /// Its error.
    pub error: Option<Json<Value>>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

const RUN_COLUMNS: &str = "id, kind, workflow, workflow_version, definition, input, status, \
                           output, error, created_at, finished_at";

/// A task as the API shows it.
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
pub struct TaskRow {
    /// Its id.
    pub id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its status.
    pub status: String,
    /// The current attempt.
    pub attempt: i32,
    /// Its output.
    pub output: Option<Json<Value>>,
    /// Its error.
    pub error: Option<Json<Value>>,
    /// When the worker started the attempt that finished it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// For a `for_each` step: how many items it has.
    pub items_total: Option<i32>,
    /// For a `for_each` step: how many items succeeded.
    pub items_done: i32,
    /// What the latest attempt printed or logged.
    pub logs: Option<String>,
}

/// Returns a run of the given kind.
pub async fn get_run(
    db: &PgPool,
    namespace: &str,
    id: Uuid,
    kind: &str,
) -> Result<Option<RunRow>, StoreError> {
    let sql =
        format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND kind = $2 AND namespace = $3");
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(kind)
        .bind(namespace)
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

/// Filters of the run listing.
#[derive(Debug, Default)]
pub struct RunFilter {
    /// Only runs in this status.
    pub status: Option<String>,
    /// Only runs of this registered workflow.
    pub workflow: Option<String>,
    /// Only runs older than this one (the cursor).
    pub before: Option<Uuid>,
    /// At most this many.
    pub limit: i64,
}

/// Lists workflow runs, newest first.
pub async fn list_runs(
    db: &PgPool,
    namespace: &str,
    filter: &RunFilter,
) -> Result<Vec<RunRow>, StoreError> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM runs
         WHERE namespace = $5 AND kind = 'workflow'
           AND ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR workflow = $2)
           AND ($3::uuid IS NULL OR id < $3)
         ORDER BY id DESC LIMIT $4"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&filter.status)
        .bind(&filter.workflow)
        .bind(filter.before)
        .bind(filter.limit)
        .bind(namespace)
        .fetch_all(db)
        .await?)
}

/// A completion to record.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The task.
    pub task_id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// The attempt it reports on.
    pub attempt: i32,
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// The output of a success.
    pub output: Option<Value>,
    /// The error of a failure.
    pub error: Option<Value>,
    /// The worker that ran it.
    pub worker_id: String,
    /// When the attempt started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// What the step printed or logged.
    pub logs: Option<String>,
    /// Whether the task said its success ends its run (see [`finish_single_steps`]).
    pub ends_run: bool,
}

/// A completion that was recorded.
#[derive(Debug, sqlx::FromRow)]
pub struct Recorded {
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its item of a `for_each` step, or -1.
    pub item: i32,
    /// `succeeded` or `failed`.
    pub status: String,
    /// The output of a success.
    pub output: Option<Json<Value>>,
    /// The error of a failure.
    pub error: Option<Json<Value>>,
}

/// The completions, bound as arrays (`$1` to `$9`), one row per attempt of a task (a batch
/// may hold the same completion twice). Joined to `tasks` by id and attempt, each task row is
/// written at most once.
const COMPLETION_ROWS: &str = "(SELECT DISTINCT ON (u.id, u.attempt) u.*
               FROM UNNEST($1::uuid[], $2::integer[], $3::text[], $4::jsonb[], $5::jsonb[],
                           $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[])
                    AS u(id, attempt, status, output, error, worker, started, finished, logs)
               ORDER BY u.id, u.attempt) AS c";

/// Writes the completions of `c` on their tasks still queued at that attempt. Like every
/// statement that finishes a task, it clears `due_at`: a finished task waits for nothing, and
/// the timer's index (`tasks_due`) holds only tasks that do.
const RECORD_COMPLETIONS: &str = "UPDATE tasks SET status = c.status, output = c.output,
                error = c.error, worker_id = c.worker, started_at = c.started,
                finished_at = c.finished, logs = c.logs, due_at = NULL";

/// What a recorded completion returns.
const RECORDED_COLUMNS: &str = "tasks.run_id, tasks.step_id, tasks.item, tasks.status,
                tasks.output, tasks.error";

/// Binds `completions` as the arrays `$1` to `$9` of [`COMPLETION_ROWS`].
fn bind_completions<'q, O, C: std::borrow::Borrow<Completion>>(
    query: sqlx::query::QueryAs<'q, Postgres, O, PgArguments>,
    rows: &'q [C],
) -> sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    let completions = || rows.iter().map(C::borrow);
    let ids: Vec<Uuid> = completions().map(|c| c.task_id).collect();
    let attempts: Vec<i32> = completions().map(|c| c.attempt).collect();
    let statuses: Vec<&str> = completions().map(|c| c.status).collect();
    let outputs: Vec<Option<Json<&Value>>> =
        completions().map(|c| c.output.as_ref().map(Json)).collect();
    let errors: Vec<Option<Json<&Value>>> =
        completions().map(|c| c.error.as_ref().map(Json)).collect();
    let workers: Vec<&str> = completions().map(|c| c.worker_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = completions().map(|c| c.started_at).collect();
    let finished: Vec<DateTime<Utc>> = completions().map(|c| c.finished_at).collect();
    let logs: Vec<Option<&str>> = completions().map(|c| c.logs.as_deref()).collect();
    query
        .bind(ids)
        .bind(attempts)
        .bind(statuses)
        .bind(outputs)
        .bind(errors)
        .bind(workers)
        .bind(started)
        .bind(finished)
        .bind(logs)
}

/// Records completions whose task is still queued at that attempt, and returns those
/// recorded. Replays and late completions of other attempts change nothing.
pub async fn record_completions(
    tx: &mut Transaction<'_, Postgres>,
    completions: &[Completion],
) -> Result<Vec<Recorded>, StoreError> {
    let sql = format!(
        "{RECORD_COMPLETIONS}
         FROM {COMPLETION_ROWS}
         WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
         RETURNING {RECORDED_COLUMNS}"
    );
    Ok(
        bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
            .fetch_all(&mut **tx)
            .await?,
    )
}

/// What [`finish_single_steps`] did.
#[derive(Debug, Default)]
pub struct SingleStepsFinished {
    /// The runs it locked: their completions need nothing more.
    pub locked: Vec<Uuid>,
    /// Those it finished.
    pub finished: Vec<Uuid>,
    /// The rows of the finished runs that were asked for, each with its only task.
    pub rows: Vec<(RunRow, TaskRow)>,
}

/// Records the successes among `completions` whose run is a single step that plans without
/// programs (no `input`, `for_each` or `when`), and finishes those runs with their step's
/// output, in one statement: nothing is left to plan for such a run once its step succeeded.
/// Each run is locked (in id order) before its task is written, as [`lock_runs`] does. Returns
/// the rows, as written, of the finished runs among `wanted`.
pub async fn finish_single_steps(
    conn: &mut PgConnection,
    completions: &[&Completion],
    wanted: &[Uuid],
) -> Result<SingleStepsFinished, StoreError> {
    let sql = format!(
        "WITH locked AS MATERIALIZED (
             SELECT id FROM runs
             WHERE id = ANY($10) AND status = 'running'
               AND jsonb_array_length(definition->'steps') = 1
               AND NOT (definition->'steps'->0 ?| array['input', 'for_each', 'when'])
             ORDER BY id FOR UPDATE),
         recorded AS (
             {RECORD_COMPLETIONS}
             FROM {COMPLETION_ROWS}
             WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
               AND tasks.item = -1 AND c.status = 'succeeded'
               AND tasks.run_id = ANY (ARRAY(SELECT id FROM locked))
             RETURNING tasks.run_id, tasks.output,
                       CASE WHEN tasks.run_id = ANY($11) THEN to_jsonb(tasks) END AS task),
         finished AS (
             UPDATE runs SET status = 'succeeded', output = r.output, finished_at = now()
             FROM recorded r
             WHERE runs.id = r.run_id
             RETURNING runs.id, CASE WHEN runs.id = ANY($11) THEN to_jsonb(runs) END AS run,
                       r.task)
         SELECT id, false, NULL::jsonb, NULL::jsonb FROM locked
         UNION ALL SELECT id, true, run, task FROM finished"
    );
    let mut run_ids: Vec<Uuid> = completions.iter().map(|c| c.run_id).collect();
    run_ids.sort_unstable();
    run_ids.dedup();
    type Row = (Uuid, bool, Option<Json<RunRow>>, Option<Json<TaskRow>>);
    let rows: Vec<Row> = bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
        .bind(run_ids)
        .bind(wanted)
        .fetch_all(&mut *conn)
        .await?;
    let mut done = SingleStepsFinished::default();
    for (id, finished, run, task) in rows {
        if !finished {
            done.locked.push(id);
            continue;
        }
        done.finished.push(id);
        if let (Some(Json(run)), Some(Json(task))) = (run, task) {
            done.rows.push((run, task));
        }
    }
    Ok(done)
}

/// A row of [`lock_and_record`]: a locked run (`step_id` null) or a recorded completion.
#[derive(sqlx::FromRow)]
struct LockedOrRecorded {
    run_id: Uuid,
    definition: Option<Json<Value>>,
    input: Option<Json<Value>>,
    status: String,
    step_id: Option<String>,
    item: Option<i32>,
    output: Option<Json<Value>>,
    error: Option<Json<Value>>,
}

/// Locks the runs of `completions` (as [`lock_runs`] does) and records the completions (as
/// [`record_completions`] does) in one statement: a task is written only if its run is among
/// the locked rows, so only once its run is locked. For batches that need no decision
/// between the two (no failure that a retry policy may take back).
pub async fn lock_and_record(
    tx: &mut Transaction<'_, Postgres>,
    run_ids: &[Uuid],
    completions: &[Completion],
) -> Result<(Vec<LockedRun>, Vec<Recorded>), StoreError> {
    let sql = format!(
        "WITH locked AS MATERIALIZED (
             SELECT id, definition, input, status FROM runs
             WHERE id = ANY($10) ORDER BY id FOR UPDATE),
         recorded AS (
             {RECORD_COMPLETIONS}
             FROM {COMPLETION_ROWS}
             WHERE tasks.id = c.id AND tasks.attempt = c.attempt AND tasks.status = 'queued'
               AND tasks.run_id = ANY (ARRAY(SELECT id FROM locked))
             RETURNING {RECORDED_COLUMNS})
         SELECT id AS run_id, definition, input, status, NULL::text AS step_id,
                NULL::integer AS item, NULL::jsonb AS output, NULL::jsonb AS error
         FROM locked
         UNION ALL
         SELECT run_id, NULL, NULL, status, step_id, item, output, error FROM recorded"
    );
    let rows: Vec<LockedOrRecorded> =
        bind_completions(sqlx::query_as(sqlx::AssertSqlSafe(sql)), completions)
            .bind(run_ids)
            .fetch_all(&mut **tx)
            .await?;
    let mut locked = Vec::new();
    let mut recorded = Vec::new();
    for row in rows {
        match (row.step_id, row.definition, row.input) {
            (Some(step_id), _, _) => recorded.push(Recorded {
                run_id: row.run_id,
                step_id,
                item: row.item.unwrap_or(-1),
                status: row.status,
                output: row.output,
                error: row.error,
            }),
            (None, Some(definition), Some(input)) => locked.push(LockedRun {
                id: row.run_id,
                definition,
                input,
                status: row.status,
            }),
            (None, _, _) => {}
        }
    }
    Ok((locked, recorded))
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
/// its items' outputs, in item order.
pub async fn join_items(
    tx: &mut Transaction<'_, Postgres>,
    steps: &[(Uuid, String)],
) -> Result<(), StoreError> {
    if steps.is_empty() {
        return Ok(());
    }
    let runs: Vec<Uuid> = steps.iter().map(|(run, _)| *run).collect();
    let names: Vec<&str> = steps.iter().map(|(_, step)| step.as_str()).collect();
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
    let errors: Vec<Json<&Value>> = failures.iter().map(|(_, _, error)| Json(error)).collect();
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

/// A run being advanced, locked for the rest of the transaction.
#[derive(Debug, sqlx::FromRow)]
pub struct LockedRun {
    /// Its id.
    pub id: Uuid,
    /// The definition it runs.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Json<Value>,
    /// Its status.
    pub status: String,
}

/// Locks the given runs (in id order, so two schedulers cannot deadlock) and returns them.
pub async fn lock_runs(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
) -> Result<Vec<LockedRun>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, definition, input, status FROM runs WHERE id = ANY($1) ORDER BY id FOR UPDATE",
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
    pub status: String,
    /// Its output.
    pub output: Option<Json<Value>>,
    /// Its error.
    pub error: Option<Json<Value>>,
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

/// A run that just finished.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    /// Its id.
    pub id: Uuid,
    /// `succeeded` or `failed`.
    pub status: &'static str,
    /// Its output.
    pub output: Option<Value>,
    /// Its error.
    pub error: Option<Value>,
}

/// Records finished runs and cancels their tasks that are still queued, including those
/// waiting for a retry, which then wait no more.
pub async fn finish_runs(
    tx: &mut Transaction<'_, Postgres>,
    runs: &[FinishedRun],
) -> Result<(), StoreError> {
    if runs.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = runs.iter().map(|run| run.id).collect();
    let statuses: Vec<&str> = runs.iter().map(|run| run.status).collect();
    let outputs: Vec<Option<Json<&Value>>> = runs
        .iter()
        .map(|run| run.output.as_ref().map(Json))
        .collect();
    let errors: Vec<Option<Json<&Value>>> = runs
        .iter()
        .map(|run| run.error.as_ref().map(Json))
        .collect();
    sqlx::query(
        "WITH finished AS (
             UPDATE runs SET status = f.status, output = f.output, error = f.error,
                    finished_at = now()
             FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::jsonb[])
                  AS f(id, status, output, error)
             WHERE runs.id = f.id
             RETURNING runs.id)
         UPDATE tasks SET status = 'cancelled', finished_at = now(), due_at = NULL,
                error = '{\"type\": \"cancelled\", \"message\": \"the run ended before this step finished\"}'
         WHERE run_id = ANY($1) AND status = 'queued'",
    )
    .bind(&ids)
    .bind(&statuses)
    .bind(&outputs)
    .bind(&errors)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Marks tasks as confirmed by the broker, so the relay leaves them alone.
/// Tasks that finished meanwhile are left as they are: they are out of the outbox already.
pub async fn mark_dispatched(conn: &mut PgConnection, task_ids: &[Uuid]) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE tasks SET dispatched_at = now()
         WHERE id = ANY($1) AND dispatched_at IS NULL AND status = 'queued'",
    )
    .bind(task_ids)
    .execute(conn)
    .await?;
    Ok(())
}

/// A committed task that the broker has not confirmed, with what is needed to publish it.
#[derive(Debug, sqlx::FromRow)]
pub struct UndispatchedTask {
    /// The task.
    pub id: Uuid,
    /// Its run.
    pub run_id: Uuid,
    /// Its step.
    pub step_id: String,
    /// The current attempt.
    pub attempt: i32,
    /// Its task queue.
    pub queue: String,
    /// Its priority.
    pub priority: i16,
    /// Its input.
    pub input: Option<Json<Value>>,
    /// The definition of its run.
    pub definition: Json<Value>,
}

/// Claims queued tasks of running runs in `namespace` that no broker confirmed and that were
/// committed (or last relayed) more than `older_than` ago, oldest first, moving their relay time
/// forward so that no other relay takes them in the same period. Delayed jobs, waiting retries
/// and `for_each` steps' own rows are never claimed, however many of them are older.
pub async fn claim_undispatched(
    db: &PgPool,
    namespace: &str,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<Vec<UndispatchedTask>, StoreError> {
    Ok(sqlx::query_as(
        // The candidates come in order from `tasks_sendable`, which holds only rows that can be
        // sent. Each candidate's run is read by its id in a scalar subquery, which PostgreSQL
        // evaluates per candidate and never turns into a join: the plan never reads the
        // namespace's runs, whatever the statistics of a young table say, and it stops at the
        // limit. Only rows of another namespace that its own relay has left behind (its
        // schedulers stopped) are read and passed over.
        "WITH claimed AS (
             SELECT t.id FROM tasks t
             WHERE t.status = 'queued' AND t.dispatched_at IS NULL AND t.due_at IS NULL
               AND t.items_total IS NULL
               AND coalesce(t.relayed_at, t.created_at) < now() - make_interval(secs => $2)
               AND (SELECT r.namespace = $1 AND r.status = 'running'
                    FROM runs r WHERE r.id = t.run_id)
             ORDER BY coalesce(t.relayed_at, t.created_at) LIMIT $3
             FOR UPDATE OF t SKIP LOCKED)
         UPDATE tasks t SET relayed_at = now()
         FROM claimed, runs r
         WHERE t.id = claimed.id AND r.id = t.run_id
         RETURNING t.id, t.run_id, t.step_id, t.attempt, t.queue, t.priority, t.input, r.definition",
    )
    .bind(namespace)
    .bind(older_than.as_secs_f64())
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Claims queued tasks of running runs in `namespace` whose retry or delay is due, earliest
/// first, clearing their due time so they are dispatched once.
pub async fn claim_due(
    db: &PgPool,
    namespace: &str,
    limit: i64,
) -> Result<Vec<UndispatchedTask>, StoreError> {
    Ok(sqlx::query_as(
        // As in `claim_undispatched`: candidates in order from `tasks_due`, each run read by id.
        "WITH due AS (
             SELECT t.id FROM tasks t
             WHERE t.due_at <= now() AND t.status = 'queued'
               AND (SELECT r.namespace = $1 AND r.status = 'running'
                    FROM runs r WHERE r.id = t.run_id)
             ORDER BY t.due_at LIMIT $2
             FOR UPDATE OF t SKIP LOCKED)
         UPDATE tasks t SET due_at = NULL, relayed_at = now()
         FROM due, runs r
         WHERE t.id = due.id AND r.id = t.run_id
         RETURNING t.id, t.run_id, t.step_id, t.attempt, t.queue, t.priority, t.input, r.definition",
    )
    .bind(namespace)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// The current attempt of a queued task.
#[derive(Debug, sqlx::FromRow)]
pub struct CurrentAttempt {
    /// The task.
    pub id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its current attempt.
    pub attempt: i32,
}

/// Returns the current attempt of those of the given tasks that are still queued.
pub async fn current_attempts(
    tx: &mut Transaction<'_, Postgres>,
    task_ids: &[Uuid],
) -> Result<Vec<CurrentAttempt>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, step_id, attempt FROM tasks WHERE id = ANY($1) AND status = 'queued'",
    )
    .bind(task_ids)
    .fetch_all(&mut **tx)
    .await?)
}

/// A failed attempt to be followed by another after a delay.
#[derive(Debug, Clone)]
pub struct Retry {
    /// The task.
    pub task_id: Uuid,
    /// The attempt that failed.
    pub attempt: i32,
    /// Its error, shown on the step until the next attempt ends.
    pub error: Value,
    /// The worker that ran it.
    pub worker_id: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// How long to wait before the next attempt.
    pub delay: std::time::Duration,
    /// What the failed attempt printed or logged.
    pub logs: Option<String>,
}

/// Moves failed tasks to their next attempt, due after their delay. Fenced like completions:
/// only a task still queued at the failed attempt moves.
pub async fn schedule_retries(
    tx: &mut Transaction<'_, Postgres>,
    retries: &[Retry],
) -> Result<(), StoreError> {
    if retries.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = retries.iter().map(|r| r.task_id).collect();
    let attempts: Vec<i32> = retries.iter().map(|r| r.attempt).collect();
    let errors: Vec<Json<&Value>> = retries.iter().map(|r| Json(&r.error)).collect();
    let workers: Vec<&str> = retries.iter().map(|r| r.worker_id.as_str()).collect();
    let started: Vec<DateTime<Utc>> = retries.iter().map(|r| r.started_at).collect();
    let delays: Vec<f64> = retries.iter().map(|r| r.delay.as_secs_f64()).collect();
    let logs: Vec<Option<&str>> = retries.iter().map(|r| r.logs.as_deref()).collect();
    sqlx::query(
        "UPDATE tasks SET attempt = tasks.attempt + 1, error = r.error, worker_id = r.worker,
                started_at = r.started, due_at = now() + make_interval(secs => r.delay),
                dispatched_at = NULL, relayed_at = NULL, logs = r.logs
         FROM (SELECT DISTINCT ON (id) * FROM UNNEST($1::uuid[], $2::integer[], $3::jsonb[],
                      $4::text[], $5::timestamptz[], $6::float8[], $7::text[])
                      AS u(id, attempt, error, worker, started, delay, logs) ORDER BY id) AS r
         WHERE tasks.id = r.id AND tasks.attempt = r.attempt AND tasks.status = 'queued'",
    )
    .bind(&ids)
    .bind(&attempts)
    .bind(&errors)
    .bind(&workers)
    .bind(&started)
    .bind(&delays)
    .bind(&logs)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// What became of a cancellation.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancellation {
    /// No such run (of that kind, in that namespace).
    NotFound,
    /// The run had already finished, in this status.
    Finished(String),
    /// The run is now cancelled, with its queued and waiting tasks.
    Cancelled,
}

/// Cancels a run: records it as cancelled and cancels its tasks that have not finished, so no
/// new task of it starts and no completion of it is recorded any more.
pub async fn cancel_run(
    db: &PgPool,
    namespace: &str,
    id: Uuid,
    kind: &str,
) -> Result<Cancellation, StoreError> {
    let mut tx = db.begin().await?;
    let status: Option<String> = sqlx::query_scalar(
        "SELECT status FROM runs WHERE id = $1 AND kind = $2 AND namespace = $3 FOR UPDATE",
    )
    .bind(id)
    .bind(kind)
    .bind(namespace)
    .fetch_optional(&mut *tx)
    .await?;
    match status.as_deref() {
        None => return Ok(Cancellation::NotFound),
        Some("succeeded" | "failed" | "cancelled") => {
            return Ok(Cancellation::Finished(status.unwrap_or_default()));
        }
        Some(_) => {}
    }
    sqlx::query(
        "UPDATE runs SET status = 'cancelled', finished_at = now(),
                error = '{\"type\": \"cancelled\", \"message\": \"the run was cancelled\"}'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
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
    Ok(Cancellation::Cancelled)
}

/// Begins a transaction whose statements may scan tables whole: counts over a namespace read
/// most of its rows, which a sequential scan does faster than any index (the pool's
/// connections have `enable_seqscan` off; see [`connect`]).
async fn scanning(db: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL enable_seqscan = on")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Returns counts of runs and of tasks by status.
pub async fn stats(
    db: &PgPool,
    namespace: &str,
) -> Result<(Vec<(String, i64)>, Vec<(String, i64)>), StoreError> {
    let mut tx = scanning(db).await?;
    let runs =
        sqlx::query_as("SELECT status, count(*) FROM runs WHERE namespace = $1 GROUP BY status")
            .bind(namespace)
            .fetch_all(&mut *tx)
            .await?;
    let tasks = sqlx::query_as(
        "SELECT t.status, count(*) FROM tasks t JOIN runs r ON r.id = t.run_id
         WHERE r.namespace = $1 GROUP BY t.status",
    )
    .bind(namespace)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((runs, tasks))
}

/// Returns the task queues of `namespace` that have tasks queued to run now (waiting in the
/// broker, held by a worker, or a moment from being published), leaving out retries and delays
/// waiting for their time and `for_each` steps waiting for their items.
pub async fn queues_with_queued_tasks(
    db: &PgPool,
    namespace: &str,
) -> Result<Vec<String>, StoreError> {
    let mut tx = scanning(db).await?;
    let queues = sqlx::query_scalar(
        "SELECT DISTINCT t.queue FROM tasks t JOIN runs r ON r.id = t.run_id
         WHERE r.namespace = $1 AND r.status = 'running' AND t.status = 'queued'
           AND t.due_at IS NULL AND t.items_total IS NULL",
    )
    .bind(namespace)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(queues)
}

/// Checks that the database answers.
pub async fn ping(db: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgSslMode;

    use super::connect_options;

    fn check(url: &str, expected: PgSslMode) {
        let options = connect_options(url).expect("a valid url");
        assert_eq!(
            format!("{:?}", options.get_ssl_mode()),
            format!("{expected:?}"),
            "{url}"
        );
    }

    #[test]
    fn tls_is_off_over_loopback_unless_the_url_asks_for_it() {
        check(
            "postgres://postgres@127.0.0.1:5432/taskfleet",
            PgSslMode::Disable,
        );
        check(
            "postgres://postgres@localhost/taskfleet",
            PgSslMode::Disable,
        );
        check(
            "postgres://postgres@127.0.0.1/taskfleet?sslmode=require",
            PgSslMode::Require,
        );
        check(
            "postgres://postgres@127.0.0.1/taskfleet?application_name=x&sslmode=prefer",
            PgSslMode::Prefer,
        );
        check(
            "postgres://postgres@db.internal/taskfleet",
            PgSslMode::Prefer,
        );
    }
}
