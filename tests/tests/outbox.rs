//! The outbox relay and the retry timer, on a real fleet, against rows written as a crashed
//! scheduler (or the scheduler of another namespace sharing the database) leaves them.
//!
//! Each test writes thousands of older rows that the claim must pass over (rows that cannot be
//! sent, or rows of another namespace) before the row it must find, straight into PostgreSQL.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use taskfleet_tests::{POSTGRES, TestFleet};
use uuid::Uuid;

/// More than four times the most rows the relay and the timer claim at once (1,024): a claim
/// that looked only at a window of that size of its index would never reach the row to claim.
const OLDER_ROWS: i64 = 4_500;

async fn database(fleet: &TestFleet) -> PgPool {
    PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap()
}

/// Writes a running run of `namespace` with a single `dataflow` step (`. + 1`) and its task,
/// queued and never confirmed by the broker, as a scheduler that crashed between its commit and
/// its publish leaves them: created `age_s` seconds ago and, if `due_in_s` is given, due then
/// (negative: already due) at attempt 2, as a retry waiting for its time. Returns the run's id.
async fn write_unpublished_run(
    db: &PgPool,
    namespace: &str,
    age_s: f64,
    due_in_s: Option<f64>,
) -> Uuid {
    let run_id = Uuid::now_v7();
    let definition = json!({"steps": [{"id": "inc", "dataflow": ". + 1"}]});
    sqlx::query(
        "INSERT INTO runs (namespace, id, kind, definition, input, status, created_at, tenant)
         VALUES ($1, $2, 'workflow', $3, '41', 'running', now() - make_interval(secs => $4), $5)",
    )
    .bind(namespace)
    .bind(run_id)
    .bind(sqlx::types::Json(&definition))
    .bind(age_s)
    .bind(taskfleet_tests::TEST_TENANT)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        // Written without its namespace, as a scheduler of the previous version writes tasks:
        // the table fills it in from the run.
        "INSERT INTO tasks (id, run_id, step_id, status, attempt, queue, input, created_at,
                            due_at)
         VALUES ($1, $2, 'inc', 'queued', CASE WHEN $4::float8 IS NULL THEN 1 ELSE 2 END,
                 'default', '41', now() - make_interval(secs => $3),
                 now() + make_interval(secs => $4))",
    )
    .bind(Uuid::now_v7())
    .bind(run_id)
    .bind(age_s)
    .bind(due_in_s)
    .execute(db)
    .await
    .unwrap();
    run_id
}

/// Writes `count` running runs of `namespace`, each with one queued task never confirmed,
/// committed two hours ago; `shape` says what else the task is (its extra columns).
async fn write_older_rows(db: &PgPool, namespace: &str, count: i64, shape: OlderRow) {
    let (step, due_at, attempt, items_total) = match shape {
        OlderRow::Sendable => ("job", None, 1, None),
        OlderRow::Delayed => ("job", Some(3600.0), 1, None),
        OlderRow::WaitingRetry => ("job", Some(3600.0), 2, None),
        OlderRow::ForEachStep => ("fan", None, 1, Some(10)),
        OlderRow::DueRetry => ("job", Some(-3600.0), 2, None),
    };
    sqlx::query(
        "WITH inserted AS (
             INSERT INTO runs (namespace, id, kind, definition, input, status, created_at)
             SELECT $1, gen_random_uuid(), 'job',
                    '{\"steps\": [{\"id\": \"job\", \"dataflow\": \".\"}]}', 'null', 'running',
                    now() - interval '2 hours'
             FROM generate_series(1, $2)
             RETURNING id)
         INSERT INTO tasks (namespace, id, run_id, step_id, status, attempt, queue, input,
                            created_at, due_at, items_total)
         SELECT $1, gen_random_uuid(), id, $3, 'queued', $5, 'default', 'null',
                now() - interval '2 hours', now() + make_interval(secs => $4), $6
         FROM inserted",
    )
    .bind(namespace)
    .bind(count)
    .bind(step)
    .bind(due_at)
    .bind(attempt)
    .bind(items_total)
    .execute(db)
    .await
    .unwrap();
}

/// What the older rows written by [`write_older_rows`] are.
#[derive(Clone, Copy)]
enum OlderRow {
    /// Ready to send (of another namespace, whose scheduler is gone).
    Sendable,
    /// A delayed job, due in an hour.
    Delayed,
    /// A failed attempt waiting an hour for its retry.
    WaitingRetry,
    /// The row of a `for_each` step, waiting for its items.
    ForEachStep,
    /// A retry due an hour ago (of another namespace, whose scheduler is gone).
    DueRetry,
}

async fn assert_runs_to_its_end(fleet: &TestFleet, run_id: Uuid, attempts: u64) {
    let run = fleet
        .wait_run(&run_id.to_string(), Duration::from_secs(30))
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 42, "{run:#}");
    assert_eq!(run["steps"]["inc"]["attempts"], attempts, "{run:#}");
}

#[tokio::test]
async fn a_task_never_published_is_relayed_behind_thousands_of_older_rows_that_cannot_be_sent() {
    let fleet = TestFleet::start().await.unwrap();
    let db = database(&fleet).await;
    let namespace = fleet.namespace.as_str();
    for shape in [
        OlderRow::Delayed,
        OlderRow::WaitingRetry,
        OlderRow::ForEachStep,
    ] {
        write_older_rows(&db, namespace, OLDER_ROWS / 3, shape).await;
    }
    let run_id = write_unpublished_run(&db, namespace, 3600.0, None).await;

    assert_runs_to_its_end(&fleet, run_id, 1).await;
    // None of the rows that could not be sent was sent.
    let sent: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks
         WHERE run_id <> $1 AND (relayed_at IS NOT NULL OR dispatched_at IS NOT NULL
                                 OR status <> 'queued')",
    )
    .bind(run_id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(sent, 0);
}

#[tokio::test]
async fn a_task_never_published_is_relayed_behind_another_namespaces_older_backlog() {
    let fleet = TestFleet::start().await.unwrap();
    let db = database(&fleet).await;
    let other = format!("{}-gone", fleet.namespace);
    write_older_rows(&db, &other, OLDER_ROWS, OlderRow::Sendable).await;
    let run_id = write_unpublished_run(&db, &fleet.namespace, 3600.0, None).await;

    assert_runs_to_its_end(&fleet, run_id, 1).await;
    // The other namespace's tasks are left to its own scheduler.
    let relayed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE run_id <> $1 AND relayed_at IS NOT NULL",
    )
    .bind(run_id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(relayed, 0);
}

#[tokio::test]
async fn a_due_retry_is_dispatched_behind_another_namespaces_older_due_retries() {
    let fleet = TestFleet::start().await.unwrap();
    let db = database(&fleet).await;
    let other = format!("{}-gone", fleet.namespace);
    write_older_rows(&db, &other, OLDER_ROWS, OlderRow::DueRetry).await;
    let run_id = write_unpublished_run(&db, &fleet.namespace, 60.0, Some(-1.0)).await;

    assert_runs_to_its_end(&fleet, run_id, 2).await;
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE run_id <> $1 AND due_at IS NULL")
            .bind(run_id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(claimed, 0);
}
