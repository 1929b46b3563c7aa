//! The retention workload: the throughput of a fleet whose sweeper is deleting a backlog of
//! finished runs, against the same fleet and database deleting nothing, and a soak of many
//! runs under a short retention whose tables stay the same size.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use sqlx::PgPool;
use taskfleet_tests::TestFleet;

use crate::fleet::{self, Shape};

/// How long the measured fleet keeps finished runs, in seconds.
const RETENTION_S: u64 = 5;

/// What the retention workload measured.
pub struct Retention {
    /// Jobs per second with the backlog in place and retention off.
    pub without: f64,
    /// Jobs per second while the sweeper deleted the backlog.
    pub while_deleting: f64,
    /// Backlog runs deleted while the jobs ran.
    pub deleted_meanwhile: i64,
    /// The soak's tables after each wave.
    pub soak: Vec<Wave>,
}

/// The database after one wave of the soak.
pub struct Wave {
    /// Runs submitted so far.
    pub submitted: usize,
    /// Rows in `runs` and in `tasks`.
    pub rows: (i64, i64),
    /// Bytes of `runs` and of `tasks`, indexes included.
    pub bytes: (i64, i64),
}

/// Runs the workload: `jobs` timed jobs over a `backlog` of finished runs, then a soak of
/// `soak_runs` in waves of `wave`.
pub async fn measure(
    shape: Shape,
    jobs: usize,
    backlog: usize,
    soak_runs: usize,
    wave: usize,
) -> Result<Retention> {
    let retention = |seconds: u64| vec![("TASKFLEET_RETENTION_S".to_owned(), seconds.to_string())];
    let step = fleet::jq_noop();

    // One fleet and one database for both measurements: a backlog of finished runs, jobs
    // timed with retention off, then the scheduler restarted with retention on, which finds
    // the backlog past it and deletes it while the same number of jobs is timed again.
    crate::progress("taskfleet: retention off, over a backlog");
    let mut fleet = fleet::start_with(shape, &retention(0)).await?;
    let pool = connect(&fleet).await?;
    run_all(&fleet, &pool, backlog).await?;
    let backlog_done = std::time::Instant::now();
    let (without, _) = timed(&fleet, &pool, jobs, &step).await?;
    crate::progress("taskfleet: retention deleting the backlog");
    tokio::time::sleep(
        (Duration::from_secs(RETENTION_S) + Duration::from_millis(500))
            .saturating_sub(backlog_done.elapsed()),
    )
    .await;
    fleet.set_env("TASKFLEET_RETENTION_S", &RETENTION_S.to_string());
    fleet.restart_scheduler().await?;
    let before = count(&pool, "runs").await?;
    let (while_deleting, submitted) = timed(&fleet, &pool, jobs, &step).await?;
    let after = count(&pool, "runs").await?;
    let deleted_meanwhile = before + i64::try_from(submitted).unwrap_or(i64::MAX) - after;
    pool.close().await;
    drop(fleet);

    crate::progress("taskfleet: retention soak");
    let fleet = fleet::start_with(shape, &retention(RETENTION_S)).await?;
    let pool = connect(&fleet).await?;
    let mut soak = Vec::new();
    let mut submitted = 0;
    // Waves at full speed, each followed by the retention period and a second, in which the
    // sweeper deletes the wave before: what is left is what is retained.
    while submitted < soak_runs {
        let size = wave.min(soak_runs - submitted);
        run_all(&fleet, &pool, size).await?;
        submitted += size;
        tokio::time::sleep(Duration::from_secs(RETENTION_S + 1)).await;
        soak.push(Wave {
            submitted,
            rows: (count(&pool, "runs").await?, count(&pool, "tasks").await?),
            bytes: (
                size_of(&pool, "runs").await?,
                size_of(&pool, "tasks").await?,
            ),
        });
    }
    pool.close().await;
    Ok(Retention {
        without,
        while_deleting,
        deleted_meanwhile,
        soak,
    })
}

async fn connect(fleet: &TestFleet) -> Result<PgPool> {
    Ok(PgPool::connect(&format!("{}/{}", taskfleet_tests::POSTGRES, fleet.database)).await?)
}

/// Submits `runs` no-op jobs and waits until they have all succeeded.
async fn run_all(fleet: &TestFleet, pool: &PgPool, runs: usize) -> Result<()> {
    let submitted = fleet::submit_jobs(fleet, runs, &fleet::jq_noop()).await?;
    finished(pool, &submitted.ids).await?;
    Ok(())
}

/// Submits `runs` jobs of `step` and returns their rate (first submit to the last one's end,
/// from the record) and how many were submitted.
async fn timed(
    fleet: &TestFleet,
    pool: &PgPool,
    runs: usize,
    step: &serde_json::Value,
) -> Result<(f64, usize)> {
    let started = SystemTime::now();
    let submitted = fleet::submit_jobs(fleet, runs, step).await?;
    let last = finished(pool, &submitted.ids).await?;
    let span = last
        .duration_since(started)
        .context("the last run finished before the first submit")?;
    Ok((runs as f64 / span.as_secs_f64(), submitted.ids.len()))
}

/// Waits until every run of `ids` has succeeded, and returns when the last one finished.
/// Reads the runs by id, so that runs deleted meanwhile (others') count for nothing.
async fn finished(pool: &PgPool, ids: &[String]) -> Result<SystemTime> {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|id| id.parse()).collect::<Result<_, _>>()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (succeeded, failed, last): (i64, i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status = 'failed'),
                    EXTRACT(EPOCH FROM max(finished_at))::float8
             FROM runs WHERE id = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(pool)
        .await?;
        ensure!(failed == 0, "{failed} runs failed");
        if usize::try_from(succeeded).is_ok_and(|done| done == ids.len()) {
            let last = last.context("no run finished")?;
            return Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(last));
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{succeeded} of {} runs finished",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn count(pool: &PgPool, table: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(pool)
            .await?,
    )
}

async fn size_of(pool: &PgPool, table: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT pg_total_relation_size($1::regclass)")
            .bind(table)
            .fetch_one(pool)
            .await?,
    )
}
