//! All SQL of the scheduler. Handlers and loops call the functions re-exported here; no SQL
//! lives outside this module.
//!
//! Every write that sits on the hot path takes a batch (arrays bound with `UNNEST`), so one round
//! trip and one commit serve many runs or completions.
//!
//! This file owns the connections (the pool and how it plans, [`HeldConnection`]), the schema
//! ([`MIGRATOR`]), [`StoreError`] and the rows the API shows ([`RunRow`], [`TaskRow`]). The
//! statements live in submodules, one per responsibility: `workflows` (registered definitions),
//! `runs` (new runs and tasks, the API's reads of runs, cancellation), `completions` (what a
//! completion or a retry writes on its task), `advance` (runs locked while they are advanced,
//! their steps' states, `for_each` fan-in, finished runs), `outbox` (dispatch marks, the relay's
//! and the retry timer's claims), `schedules` (schedules, and the firing loop's claims of due
//! ones), `admission` (concurrency permits: admitting waiting tasks) and `stats` (the counts of
//! `/v1/stats` and `/v1/queues`).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Arguments as _;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres};
use taskfleet_common::{RunKind, RunStatus, TaskStatus};
use uuid::Uuid;

mod admission;
mod advance;
mod completions;
mod deadlines;
mod keys;
mod outbox;
mod queue_settings;
mod quotas;
mod rerun;
mod retention;
mod runs;
mod schedules;
mod stats;
mod workflows;

pub use admission::{BackstopRound, STOP_GRACE, admit, claim_backstop_round, groups_to_admit};
pub use advance::{
    FinishedRun, LockedRun, TaskState, count_items, fail_items, finish_runs, join_items, lock_runs,
    task_states,
};
pub use completions::{
    Completion, CurrentAttempt, Recorded, Retry, SingleStepsFinished, current_attempts,
    finish_single_steps, keep_logs_of_cancelled, lock_and_record, record_completions,
    schedule_retries,
};
pub use deadlines::time_out_runs;
pub use keys::{
    AuditEvent, AuditRow, KeyRow, NewKey, audit, find_key, insert_key, list_audit, list_keys,
    revoke_key, touch_key,
};
pub use outbox::{
    Deferral, UndispatchedTask, claim_due, claim_undispatched, defer_tasks, mark_dispatched,
};
pub use queue_settings::{QueueSettings, queue_settings, set_queue_settings};
pub use quotas::{QuotaRow, TenantQuotaRow, get_quota, list_quotas, put_quota, runs_in_flight};
pub use rerun::{RerunRead, Restart, read_for_rerun, restart_run};
pub use retention::{Deleted, delete_finished_runs, vacuum};
pub use runs::{
    Cancellation, NewRun, NewTask, RunFilter, RunSummaryRow, cancel_run, check_sealed, get_run,
    get_tasks, insert_runs, insert_tasks, list_runs, run_with_idempotency_key,
    runs_by_idempotency_key,
};
pub use schedules::{
    NewSchedule, ScheduleRow, TickOutcome, advance_schedule, claim_due_schedules, delete_schedule,
    get_schedule, list_schedules, mark_scheduled_run, put_schedule, run_unfinished, schedule_input,
    seconds_to_next_tick,
};
pub use stats::{outbox_pending, queue_ages, queues_with_queued_tasks, stats};
pub use workflows::{WorkflowRow, get_workflow, list_workflows, put_workflow};

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
    /// The CA certificate file the database URL names (`sslrootcert`) cannot be used.
    #[error("the database url's sslrootcert cannot be used: {0}")]
    RootCertificate(#[source] taskfleet_io::tls::CaCertificateError),
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
    check_root_certificate(url)?;
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
/// protects nothing and doubles the cost of every round trip. An `sslmode` the URL names is
/// kept whatever the host, with its `sslrootcert`.
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

/// Checks the CA certificate file a database URL names (`sslrootcert`, or sqlx's other names
/// for it, `ssl-root-cert` and `ssl-ca`) as `TASKFLEET_CA_CERT` is checked. sqlx reads the file
/// at each connection, but one that holds no certificate would leave only the system's CA
/// certificates trusted without a word; this makes it, or a missing file, stop the start,
/// naming the file.
fn check_root_certificate(url: &str) -> Result<(), StoreError> {
    // A URL that does not parse is left for sqlx to report.
    let Ok(url) = url::Url::parse(url) else {
        return Ok(());
    };
    for (key, value) in url.query_pairs() {
        if matches!(key.as_ref(), "sslrootcert" | "ssl-root-cert" | "ssl-ca") {
            taskfleet_io::tls::CaCertificate::read(std::path::Path::new(value.as_ref()))
                .map_err(StoreError::RootCertificate)?;
        }
    }
    Ok(())
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

/// Binds `value` as the next parameter of a statement built by hand.
fn add<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), sqlx::Error>
where
    T: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
{
    arguments.add(value).map_err(sqlx::Error::Encode)
}

/// A payload column (an input, output or error) as read: opened when it was sealed
/// (`common::seal`), so the scheduler holds plain values and the database sealed ones; a
/// `for_each` step's output, gathered in SQL from its items' outputs, opens item by item.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Payload(pub Value);

impl Payload {
    /// Returns a stored payload opened.
    fn open(value: Value) -> Result<Self, taskfleet_common::seal::SealError> {
        taskfleet_common::seal::open(value).map(Self)
    }
}

/// Rows read whole as JSON (`to_jsonb(runs)`) hold their payloads as stored.
impl<'de> serde::Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::open(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl sqlx::Type<sqlx::Postgres> for Payload {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <Json<Value> as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <Json<Value> as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for Payload {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let Json(value) = <Json<Value> as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
        Ok(Self::open(value)?)
    }
}

/// A text payload column (a step's logs) as read: opened when it was sealed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct PayloadText(pub String);

impl<'de> serde::Deserialize<'de> for PayloadText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        taskfleet_common::seal::open_text(String::deserialize(deserializer)?)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

impl sqlx::Type<sqlx::Postgres> for PayloadText {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for PayloadText {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <String as sqlx::Decode<'r, sqlx::Postgres>>::decode(value)?;
        Ok(Self(taskfleet_common::seal::open_text(text)?))
    }
}

/// Returns a payload as it is written: sealed when encryption is on.
pub(crate) fn sealed(value: &Value) -> Json<std::borrow::Cow<'_, Value>> {
    Json(taskfleet_common::seal::seal(value))
}

/// Returns text logs as they are written: sealed when encryption is on.
pub(crate) fn sealed_text(text: &str) -> std::borrow::Cow<'_, str> {
    taskfleet_common::seal::seal_text(text)
}

/// Whose objects a statement reaches: a namespace's, and in it a tenant's.
#[derive(Debug, Clone, Copy)]
pub struct Owner<'a> {
    /// The fleet's namespace.
    pub namespace: &'a str,
    /// The tenant.
    pub tenant: &'a str,
}

/// A run as the API shows it.
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
pub struct RunRow {
    /// Its id.
    pub id: Uuid,
    /// A workflow's run or a job.
    #[sqlx(try_from = "String")]
    pub kind: RunKind,
    /// The registered workflow, if any.
    pub workflow: Option<String>,
    /// Its version.
    pub workflow_version: Option<i32>,
    /// The definition it runs.
    pub definition: Json<Value>,
    /// Its input.
    pub input: Payload,
    /// Its status.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// Its output.
    pub output: Option<Payload>,
    /// Its error.
    pub error: Option<Payload>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its W3C trace id; none for a run made before runs had one.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// The schedule that started it, if one did.
    #[serde(default)]
    #[sqlx(default)]
    pub schedule: Option<String>,
    /// The tick of that schedule it was started for.
    #[serde(default)]
    #[sqlx(default)]
    pub scheduled_for: Option<DateTime<Utc>>,
}

/// A run that has just ended: how, after how long, and where its span goes in its trace.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndedRun {
    /// Its id.
    pub id: Uuid,
    /// A workflow's run or a job.
    #[sqlx(try_from = "String")]
    pub kind: RunKind,
    /// How it ended.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// How many seconds it ran.
    pub seconds: f64,
    /// Its W3C trace id; none for a run made before runs had one.
    pub trace_id: Option<String>,
    /// The span its own span is a child of.
    pub trace_span_id: Option<String>,
}

/// A run's deadline from now, where its definition sets `timeout_s` (else null), in statements
/// that start a run again with its `definition` at hand (a new run's counts from its delay).
const DEADLINE: &str = "now() + make_interval(secs => (definition->>'timeout_s')::float8)";

/// The columns of an [`EndedRun`], read from `runs` after it was finished.
const ENDED_RUN: &str = "runs.id, runs.kind, runs.status,
    extract(epoch FROM runs.finished_at - runs.created_at)::float8 AS seconds,
    runs.trace_id, runs.trace_span_id";

/// A task as the API shows it.
#[derive(Debug, sqlx::FromRow, serde::Deserialize)]
pub struct TaskRow {
    /// Its id.
    pub id: Uuid,
    /// Its step.
    pub step_id: String,
    /// Its status.
    #[sqlx(try_from = "String")]
    pub status: TaskStatus,
    /// The current attempt.
    pub attempt: i32,
    /// Its output.
    pub output: Option<Payload>,
    /// Its error.
    pub error: Option<Payload>,
    /// When the worker started the attempt that finished it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// For a `for_each` step: how many items it has.
    pub items_total: Option<i32>,
    /// For a `for_each` step: how many items succeeded.
    pub items_done: i32,
    /// What the latest attempt printed or logged.
    pub logs: Option<PayloadText>,
}

/// Checks that the database answers.
pub async fn ping(db: &PgPool) -> Result<(), StoreError> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgSslMode;

    use super::{StoreError, check_root_certificate, connect_options};

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
            "postgres://postgres@localhost:5433/taskfleet?sslmode=verify-full&sslrootcert=/etc/ca.pem",
            PgSslMode::VerifyFull,
        );
        check(
            "postgres://postgres@[::1]/taskfleet?sslrootcert=/etc/ca.pem&sslmode=verify-ca",
            PgSslMode::VerifyCa,
        );
        check(
            "postgres://postgres@db.internal/taskfleet",
            PgSslMode::Prefer,
        );
    }

    #[test]
    fn a_root_certificate_file_that_cannot_be_used_is_named() {
        assert!(check_root_certificate("postgres://postgres@db.internal/taskfleet").is_ok());
        let missing = "/nonexistent/taskfleet/ca%20file.pem";
        for key in ["sslrootcert", "ssl-root-cert", "ssl-ca"] {
            let url = format!(
                "postgres://postgres@db.internal/taskfleet?sslmode=verify-full&{key}={missing}"
            );
            let error = check_root_certificate(&url).expect_err("no such file");
            assert!(matches!(error, StoreError::RootCertificate(_)), "{error}");
            let message = error.to_string();
            assert!(message.contains("sslrootcert"), "{message}");
            assert!(
                message.contains("/nonexistent/taskfleet/ca file.pem"),
                "{message}"
            );
        }
        let empty =
            std::env::temp_dir().join(format!("taskfleet-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "").expect("writing the file");
        let url = format!(
            "postgres://postgres@db.internal/taskfleet?sslrootcert={}",
            empty.display()
        );
        let error = check_root_certificate(&url).expect_err("no certificate");
        let _ = std::fs::remove_file(&empty);
        assert!(
            error.to_string().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
