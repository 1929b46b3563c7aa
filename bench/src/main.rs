//! `taskfleet-bench`: measures a real fleet (one scheduler, two workers, started from the
//! binaries beside this one) against the local PostgreSQL, RabbitMQ and Redis:
//! - latency: submit → result of one-step runs, one at a time (p50, p99);
//! - throughput: many one-step jq runs submitted at once through the batch API, from the first
//!   submit to the last completion as recorded by the scheduler;
//! - fan-out: a `for_each` of a no-op Python step and its join;
//! - Python on one worker: no-op Python runs per second on a fleet of one worker;
//! - executor cost: a worker's own time for one no-op step of each kind, through the executors
//!   the worker uses, with no broker or database in the way.
//!
//! Run it from a release build: `cargo build --release --bins && target/release/taskfleet-bench`.

#![allow(clippy::print_stdout, reason = "a benchmark's report is its output")]

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use taskfleet_common::definition::StepKind;
use taskfleet_common::protocol::{PROTOCOL_VERSION, TaskMessage};
use taskfleet_common::{RunId, TaskId};
use taskfleet_tests::{FleetOptions, TestFleet};
use taskfleet_worker::executor::dataflow::DataflowExecutor;
use taskfleet_worker::executor::pool::{PoolSettings, PythonPool};
use taskfleet_worker::executor::python::PythonSettings;
use taskfleet_worker::runner::Executors;

/// Benchmarks of a real fleet on this machine.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Sequential one-step runs timed for the latency figures.
    #[arg(long, default_value_t = 100)]
    latency_runs: usize,
    /// One-step jq runs submitted at once for the throughput figure.
    #[arg(long, default_value_t = 5000)]
    throughput_runs: usize,
    /// Tasks in flight per worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Items of the fan-out workload (a no-op Python step per item, then a join).
    #[arg(long, default_value_t = 10_000)]
    fan_out_items: usize,
    /// Times each fan-out is run; the median is reported.
    #[arg(long, default_value_t = 3)]
    fan_out_rounds: usize,
    /// One-step no-op Python runs submitted at once to a fleet of one worker.
    #[arg(long, default_value_t = 10_000)]
    python_runs: usize,
    /// Sequential calls of each kind timed for the executor cost.
    #[arg(long, default_value_t = 20_000)]
    executor_calls: usize,
}

/// Runs a `for_each` of a no-op Python step over `items` elements followed by a jq join, and
/// returns the time from submit to the run's end.
async fn fan_out(fleet: &TestFleet, items: usize) -> Result<Duration> {
    let definition = json!({"steps": [
        {"id": "items", "dataflow": "[range(.)]"},
        {"id": "each", "python": "fleet_steps:echo", "after": ["items"], "for_each": "."},
        {"id": "join", "dataflow": "length", "after": ["each"]}
    ]});
    let started = Instant::now();
    let (status, body) = fleet
        .request(
            "POST",
            "/v1/runs",
            Some(&json!({"definition": definition, "input": items})),
        )
        .await;
    ensure!(status == 201, "submit failed: {body}");
    let id = body["id"].as_str().context("run id")?;
    loop {
        let (status, run) = fleet
            .request("GET", &format!("/v1/runs/{id}?wait=30"), None)
            .await;
        ensure!(status == 200, "reading the run failed: {run}");
        match run["status"].as_str() {
            Some("succeeded") => {
                ensure!(
                    run["output"] == json!(items),
                    "wrong join: {}",
                    run["output"]
                );
                return Ok(started.elapsed());
            }
            Some("running") => {}
            _ => anyhow::bail!("fan-out failed: {}", run["error"]),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

async fn latency(fleet: &TestFleet, step: &Value, runs: usize) -> Result<Vec<Duration>> {
    let definition = json!({ "steps": [step] });
    let mut timings = Vec::with_capacity(runs);
    // A few runs first, so connections and caches are warm.
    for round in 0..runs + 5 {
        let started = Instant::now();
        let (status, body) = fleet
            .request(
                "POST",
                "/v1/runs",
                Some(&json!({"definition": definition, "input": {"n": round}})),
            )
            .await;
        ensure!(status == 201, "submit failed: {body}");
        let id = body["id"].as_str().context("run id")?;
        let (status, run) = fleet
            .request("GET", &format!("/v1/runs/{id}?wait=30"), None)
            .await;
        ensure!(
            status == 200 && run["status"] == "succeeded",
            "run failed: {run}"
        );
        if round >= 5 {
            timings.push(started.elapsed());
        }
    }
    timings.sort();
    Ok(timings)
}

/// Times `calls` sequential no-op steps of each kind through the worker's executors (a jq `.`
/// on the blocking pool; a Python no-op on one executor process); returns the sorted timings of
/// (jq, Python).
async fn executor_cost(calls: usize) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let python = PythonPool::start(PoolSettings {
        program: taskfleet_tests::bin_dir().join("taskfleet-worker"),
        executors: NonZeroUsize::MIN,
        max_tasks: None,
        max_rss_bytes: None,
        kill_grace: Duration::from_secs(2),
        python: PythonSettings::default(),
    })
    .await?;
    let executors = Executors {
        dataflow: DataflowExecutor::default(),
        python,
    };
    let task = |step: StepKind| TaskMessage {
        version: PROTOCOL_VERSION,
        task_id: TaskId::new(),
        run_id: RunId::new(),
        step_id: "noop".to_owned(),
        attempt: 1,
        step,
        input: json!({"n": 1}),
        timeout_s: None,
    };
    let jq = task(StepKind::Dataflow {
        program: ".".to_owned(),
    });
    let python = task(StepKind::PythonCode {
        source: "def main(input):\n    return input\n".to_owned(),
    });
    let mut timings = (Vec::with_capacity(calls), Vec::with_capacity(calls));
    // Alternating the kinds spreads the machine's noise over both alike.
    for round in 0..calls + 100 {
        for (task, kind_timings) in [(&jq, &mut timings.0), (&python, &mut timings.1)] {
            let started = Instant::now();
            let (result, _) = executors.execute(task, None).await;
            let elapsed = started.elapsed();
            ensure!(result.is_ok(), "a no-op step failed: {result:?}");
            if round >= 100 {
                kind_timings.push(elapsed);
            }
        }
    }
    timings.0.sort();
    timings.1.sort();
    Ok(timings)
}

fn us(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

async fn throughput(fleet: &TestFleet, runs: usize, step: &Value) -> Result<(Duration, f64)> {
    let definition = json!({ "steps": [step] });
    let batches: Vec<Value> = (0..runs)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|chunk| {
            let runs: Vec<Value> = chunk
                .iter()
                .map(|n| json!({"definition": definition, "input": n}))
                .collect();
            json!({ "runs": runs })
        })
        .collect();
    let started = Instant::now();
    let answers = futures_util::future::join_all(
        batches
            .iter()
            .map(|batch| fleet.request("POST", "/v1/runs:batch", Some(batch))),
    )
    .await;
    for (status, body) in &answers {
        ensure!(*status == 201, "batch submit failed: {body}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, stats) = fleet.request("GET", "/v1/stats", None).await;
        let done = stats["runs"]["succeeded"].as_u64().unwrap_or(0);
        if done as usize >= runs {
            break;
        }
        ensure!(
            stats["runs"]["failed"].as_u64().unwrap_or(0) == 0,
            "runs failed: {stats}"
        );
        ensure!(Instant::now() < deadline, "runs did not finish: {stats}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = started.elapsed();
    // The scheduler's own record: first accepted to last finished.
    let db_url = format!("{}/{}", taskfleet_tests::POSTGRES, fleet.database);
    let pool = sqlx::PgPool::connect(&db_url).await?;
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(created_at))::float8 FROM runs",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok((wall, runs as f64 / span))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: args.concurrency,
        ..FleetOptions::default()
    })
    .await?;
    println!(
        "fleet: 1 scheduler, 2 workers (concurrency {}), namespace {}",
        args.concurrency, fleet.namespace
    );
    for (label, step) in [
        ("jq `.`", json!({"id": "noop", "dataflow": "."})),
        (
            "python no-op",
            json!({"id": "noop", "python": "fleet_steps:echo"}),
        ),
    ] {
        let timings = latency(&fleet, &step, args.latency_runs).await?;
        println!(
            "latency, one-step run ({label}), {} sequential runs: p50 {}, p99 {}, max {}",
            timings.len(),
            ms(percentile(&timings, 0.5)),
            ms(percentile(&timings, 0.99)),
            ms(percentile(&timings, 1.0)),
        );
    }
    let mut fan_outs = Vec::with_capacity(args.fan_out_rounds);
    for _ in 0..args.fan_out_rounds {
        fan_outs.push(fan_out(&fleet, args.fan_out_items).await?);
    }
    fan_outs.sort();
    if !fan_outs.is_empty() {
        println!(
            "fan-out of {} no-op Python items + join: median {:.2} s of {} (all: {})",
            args.fan_out_items,
            fan_outs[fan_outs.len() / 2].as_secs_f64(),
            fan_outs.len(),
            fan_outs
                .iter()
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    drop(fleet);
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: args.concurrency,
        ..FleetOptions::default()
    })
    .await?;
    let jq = json!({"id": "noop", "dataflow": "."});
    let (wall, rate) = throughput(&fleet, args.throughput_runs, &jq).await?;
    println!(
        "throughput, {} one-step jq runs submitted at once: {:.0} runs/s (first accepted to last finished), {:.2} s wall",
        args.throughput_runs,
        rate,
        wall.as_secs_f64()
    );
    drop(fleet);
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: args.concurrency,
        ..FleetOptions::default()
    })
    .await?;
    let python = json!({"id": "noop", "python": "fleet_steps:echo"});
    let (wall, rate) = throughput(&fleet, args.python_runs, &python).await?;
    println!(
        "python on one worker ({} executors, one per core), {} one-step no-op runs submitted at once: {:.0} runs/s (first accepted to last finished), {:.2} s wall",
        std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        args.python_runs,
        rate,
        wall.as_secs_f64()
    );
    drop(fleet);
    let (jq, python) = executor_cost(args.executor_calls).await?;
    let (jq_p50, python_p50) = (percentile(&jq, 0.5), percentile(&python, 0.5));
    println!(
        "executor cost, {} sequential no-op calls each: jq p50 {}, p99 {}; python p50 {}, p99 {}; python over jq p50 +{}",
        args.executor_calls,
        us(jq_p50),
        us(percentile(&jq, 0.99)),
        us(python_p50),
        us(percentile(&python, 0.99)),
        us(python_p50.saturating_sub(jq_p50)),
    );
    Ok(())
}
