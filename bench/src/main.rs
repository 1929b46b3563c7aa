//! `taskfleet-bench`: measures a real fleet (one scheduler, two workers, started from the
//! binaries beside this one) against the local PostgreSQL, RabbitMQ and Redis:
//! - latency: submit → result of one-step runs, one at a time (p50, p99);
//! - throughput: many one-step jq runs submitted at once through the batch API, from the first
//!   submit to the last completion as recorded by the scheduler.
//!
//! Run it from a release build: `cargo build --release --bins && target/release/taskfleet-bench`.

#![allow(clippy::print_stdout, reason = "a benchmark's report is its output")]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

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

async fn throughput(fleet: &TestFleet, runs: usize) -> Result<(Duration, f64)> {
    let definition = json!({"steps": [{"id": "noop", "dataflow": "."}]});
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
    let (wall, rate) = throughput(&fleet, args.throughput_runs).await?;
    println!(
        "throughput, {} one-step jq runs submitted at once: {:.0} runs/s (first accepted to last finished), {:.2} s wall",
        args.throughput_runs,
        rate,
        wall.as_secs_f64()
    );
    Ok(())
}
