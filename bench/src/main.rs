//! `taskfleet-bench`: runs each workload on a real taskfleet fleet and on Celery (RabbitMQ
//! broker, Redis result backend, prefork with one process per core) on this machine, in the
//! same run, and prints a table of medians with the ratio of each:
//!
//! 1. throughput: independent no-op jobs (a jq `.` and a Python no-op) through the batch API,
//!    first submit to last completion, fully durable — against Celery draining as many no-op
//!    tasks;
//! 2. latency: sequential one-step runs, submit → result, p50 and p99;
//! 3. the enqueue API under an offered load: p50/p99 of `POST /v1/runs`;
//! 4. fan-out: no-op Python items plus a join, against a Celery chord of the same size;
//! 5. a sequential chain of a small Python step, against a Celery chain;
//! 6. the added cost of a Python step over a jq step;
//!
//! and the CPU time per task of each process during the throughput workloads.
//!
//! Run it from a release build: `cargo build --release --bins && target/release/taskfleet-bench`
//! (`--short` for a quick smoke run; `--help` for every size).

#![allow(clippy::print_stdout, reason = "a benchmark's report is its output")]

mod celery;
mod cpu;
mod fleet;
mod report;
mod retention;

use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::Value;

use crate::celery::Celery;
use crate::fleet::{Metrics, Security, Shape};
use crate::report::{Row, Table, median};

/// Benchmarks taskfleet against Celery on this machine.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Rounds of each workload; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Independent no-op jobs of each kind in the throughput workloads.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Sequential one-step runs timed for the latency figures.
    #[arg(long, default_value_t = 300)]
    latency_runs: usize,
    /// Requests per second offered to `POST /v1/runs`.
    #[arg(long, default_value_t = 2000.0)]
    enqueue_rate: f64,
    /// Seconds the enqueue load lasts.
    #[arg(long, default_value_t = 5.0)]
    enqueue_seconds: f64,
    /// Items of the fan-out workload.
    #[arg(long, default_value_t = 10_000)]
    fan_out_items: usize,
    /// Steps of the chain workload.
    #[arg(long, default_value_t = 40)]
    chain_steps: usize,
    /// Sequential calls of each kind timed for the executor cost.
    #[arg(long, default_value_t = 20_000)]
    executor_calls: usize,
    /// Finished runs the retention workload's sweeper deletes while its jobs run.
    #[arg(long, default_value_t = 100_000)]
    retention_backlog: usize,
    /// Runs of the retention soak, under a 5 s retention.
    #[arg(long, default_value_t = 500_000)]
    soak_runs: usize,
    /// Worker processes of the fleet.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Tasks in flight per worker.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Measure taskfleet only.
    #[arg(long)]
    skip_celery: bool,
    /// Run only these workloads (repeatable); all by default.
    #[arg(long, value_enum)]
    only: Vec<Workload>,
    /// A quick run with small sizes and one round: a smoke test, not a measurement.
    #[arg(long)]
    short: bool,
}

/// The workloads of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    /// Independent no-op jobs through the batch API.
    Throughput,
    /// Sequential one-step runs, submit to result.
    Latency,
    /// `POST /v1/runs` under an offered load.
    Enqueue,
    /// A `for_each` of no-op Python items and a join.
    FanOut,
    /// A sequential chain of small Python steps.
    Chain,
    /// The executor cost of a Python step over a jq step.
    PythonCost,
    /// Throughput while retention deletes, and a soak whose tables stay the same size.
    Retention,
}

impl Args {
    fn runs(&self, workload: Workload) -> bool {
        self.only.is_empty() || self.only.contains(&workload)
    }

    fn shorten(&mut self) {
        self.rounds = 1;
        self.jobs = 1000;
        self.latency_runs = 30;
        self.enqueue_rate = 200.0;
        self.enqueue_seconds = 1.0;
        self.fan_out_items = 500;
        self.chain_steps = 10;
        self.executor_calls = 1000;
        self.retention_backlog = 2000;
        self.soak_runs = 4000;
    }

    fn shape(&self) -> Shape {
        Shape {
            workers: self.workers,
            concurrency: self.concurrency,
        }
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn percentile(timings: &mut [Duration], p: f64) -> Duration {
    timings.sort();
    let index = ((timings.len() as f64 - 1.0) * p).round() as usize;
    timings[index.min(timings.len() - 1)]
}

/// The p50 and p99 of each round of a timed workload, in milliseconds.
#[derive(Default)]
struct Percentiles {
    p50s: Vec<f64>,
    p99s: Vec<f64>,
}

impl Percentiles {
    /// Adds a round's timings.
    fn add(&mut self, mut timings: Vec<Duration>) {
        self.p50s.push(secs(percentile(&mut timings, 0.5)) * 1e3);
        self.p99s.push(secs(percentile(&mut timings, 0.99)) * 1e3);
    }

    /// Adds the medians' rows, `what, p50` and `what, p99`, with Celery's figures of those
    /// names.
    fn push_rows(
        mut self,
        table: &mut Table,
        what: &str,
        celery: Option<&Value>,
        (p50, p99): (&str, &str),
    ) {
        table.push(Row::time(
            format!("{what}, p50"),
            median(&mut self.p50s),
            field(celery, p50),
            "ms",
        ));
        table.push(Row::time(
            format!("{what}, p99"),
            median(&mut self.p99s),
            field(celery, p99),
            "ms",
        ));
    }
}

/// The Celery figure `field` of a report, if Celery ran.
fn field(report: Option<&Value>, field: &str) -> Option<f64> {
    report.and_then(|report| report[field].as_f64())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.short {
        args.shorten();
    }
    let rounds = args.rounds.max(1);
    let celery = if args.skip_celery {
        None
    } else {
        Some(Celery::install(&taskfleet_tests::workspace_root())?)
    };
    let sized = |n: usize| -> Vec<String> {
        vec![
            "--n".to_owned(),
            n.to_string(),
            "--rounds".to_owned(),
            rounds.to_string(),
        ]
    };
    let run_celery = |workload: &str, extra: Vec<String>| -> Result<Option<Value>> {
        match &celery {
            Some(celery) => {
                progress(&format!("celery: {workload}"));
                celery.run(workload, &extra).map(Some)
            }
            None => Ok(None),
        }
    };
    let mut table = Table::default();
    let mut cpu_rows = Vec::new();
    let mut celery_drain_cpu = None;

    // 1. Throughput: a fresh fleet (and database) for every round.
    let mut throughputs = Vec::new();
    if args.runs(Workload::Throughput) {
        // Every fleet requires API keys and keeps metrics (scraped every second), as
        // deployed; three more rows price them: no security at all, keys with payload
        // encryption, and no metrics.
        for (label, step, security, metrics) in [
            ("jq", fleet::jq_noop(), Security::Keys, Metrics::On),
            ("Python", fleet::python_noop(), Security::Keys, Metrics::On),
            (
                "jq (no API keys, no encryption)",
                fleet::jq_noop(),
                Security::Open,
                Metrics::On,
            ),
            (
                "jq (API keys and encryption)",
                fleet::jq_noop(),
                Security::KeysAndEncryption,
                Metrics::On,
            ),
            (
                "jq (no metrics)",
                fleet::jq_noop(),
                Security::Keys,
                Metrics::Off,
            ),
        ] {
            let mut rates = Vec::new();
            let mut cpu = Vec::new();
            for round in 0..rounds {
                progress(&format!(
                    "taskfleet: throughput {label}, round {}",
                    round + 1
                ));
                let mut env = security.env();
                env.extend(metrics.env());
                let fleet = fleet::start_with(args.shape(), &env).await?;
                let scraper = (metrics == Metrics::On).then(|| fleet::Scraper::start(&fleet));
                let measured = fleet::throughput(&fleet, args.jobs, &step).await?;
                drop(scraper);
                rates.push(measured.rate);
                cpu.push(measured.cpu.per_task(args.jobs));
            }
            cpu_rows.push((label, report::median_cpu(&cpu)));
            throughputs.push((label, median(&mut rates)));
        }
        let drain = run_celery("throughput", sized(args.jobs))?;
        celery_drain_cpu = field(drain.as_ref(), "worker_cpu_per_task_us");
        for (label, rate) in &throughputs {
            table.push(Row::rate(
                format!("throughput: {} no-op {label} jobs, durable", args.jobs),
                *rate,
                field(drain.as_ref(), "tasks_per_s"),
                "jobs/s",
            ));
        }
    }

    // 2. Latency, 3. enqueue under load, 4. fan-out, 5. chain: each on a fleet (and database)
    // of its own, used for all its rounds, so that no workload runs behind another's rows.
    if args.runs(Workload::Latency) {
        let fleet = fleet::start(args.shape()).await?;
        let celery_latency = run_celery("latency", sized(args.latency_runs))?;
        for (label, step) in [("jq", fleet::jq_noop()), ("Python", fleet::python_noop())] {
            let mut percentiles = Percentiles::default();
            for round in 0..rounds {
                progress(&format!("taskfleet: latency {label}, round {}", round + 1));
                percentiles.add(fleet::latency(&fleet, &step, args.latency_runs).await?);
            }
            percentiles.push_rows(
                &mut table,
                &format!("latency: one-step {label} run, submit → result"),
                celery_latency.as_ref(),
                ("p50_ms", "p99_ms"),
            );
        }
    }
    if args.runs(Workload::Enqueue) {
        let fleet = fleet::start(args.shape()).await?;
        let (mut percentiles, mut achieved) = (Percentiles::default(), Vec::new());
        for round in 0..rounds {
            progress(&format!("taskfleet: enqueue, round {}", round + 1));
            let (timings, rate) =
                fleet::enqueue(&fleet, args.enqueue_rate, args.enqueue_seconds).await?;
            percentiles.add(timings);
            achieved.push(rate);
        }
        let celery_enqueue = run_celery(
            "enqueue",
            vec![
                "--rate".to_owned(),
                args.enqueue_rate.to_string(),
                "--seconds".to_owned(),
                args.enqueue_seconds.to_string(),
                "--rounds".to_owned(),
                rounds.to_string(),
            ],
        )?;
        let what = format!(
            "enqueue: POST /v1/runs, durable (Celery: apply_async, not confirmed) at {:.0}/s offered, taskfleet achieved {:.0}/s",
            args.enqueue_rate,
            median(&mut achieved)
        );
        percentiles.push_rows(
            &mut table,
            &what,
            celery_enqueue.as_ref(),
            ("call_p50_ms", "call_p99_ms"),
        );
    }
    if args.runs(Workload::FanOut) {
        let fleet = fleet::start(args.shape()).await?;
        let mut fan_outs = Vec::new();
        for round in 0..rounds {
            progress(&format!("taskfleet: fan-out, round {}", round + 1));
            fan_outs.push(secs(fleet::fan_out(&fleet, args.fan_out_items).await?));
        }
        let chord = run_celery("chord", sized(args.fan_out_items))?;
        table.push(Row::time(
            format!(
                "fan-out: {} no-op Python items + join (Celery: chord)",
                args.fan_out_items
            ),
            median(&mut fan_outs),
            field(chord.as_ref(), "elapsed_s"),
            "s",
        ));
    }
    if args.runs(Workload::Chain) {
        let fleet = fleet::start(args.shape()).await?;
        let mut chains = Vec::new();
        for round in 0..rounds {
            progress(&format!("taskfleet: chain, round {}", round + 1));
            chains.push(secs(fleet::chain(&fleet, args.chain_steps).await?));
        }
        let celery_chain = run_celery("chain", sized(args.chain_steps))?;
        table.push(Row::time(
            format!("chain: {} sequential small Python steps", args.chain_steps),
            median(&mut chains),
            field(celery_chain.as_ref(), "elapsed_s"),
            "s",
        ));
    }

    // 6. The added cost of a Python step over a jq step.
    if args.runs(Workload::PythonCost) {
        let (mut jq_calls, mut sandboxed_calls, mut python_calls, mut added) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            progress(&format!("taskfleet: executor cost, round {}", round + 1));
            let mut timings = fleet::executor_cost(args.executor_calls).await?;
            let jq = secs(percentile(&mut timings.jq, 0.5)) * 1e6;
            let sandboxed = secs(percentile(&mut timings.sandboxed_jq, 0.5)) * 1e6;
            let python = secs(percentile(&mut timings.python, 0.5)) * 1e6;
            jq_calls.push(jq);
            sandboxed_calls.push(sandboxed);
            python_calls.push(python);
            added.push(python - jq);
        }
        for (what, figures) in [
            ("a no-op jq step through its executor, p50", &mut jq_calls),
            (
                "a jq step in a sandbox process (`map(.)`) through its executor, p50",
                &mut sandboxed_calls,
            ),
            (
                "a no-op Python step through its executor, p50",
                &mut python_calls,
            ),
            ("Python step over a jq step: executor cost, p50", &mut added),
        ] {
            table.push(Row::alone(what.to_owned(), median(figures), "µs"));
        }
    }
    // 7. Retention: throughput while the sweeper deletes, and a soak.
    let mut soak = None;
    if args.runs(Workload::Retention) {
        let measured = retention::measure(
            args.shape(),
            args.jobs,
            args.retention_backlog,
            args.soak_runs,
            (args.soak_runs / 20).max(1),
        )
        .await?;
        table.push(Row::alone(
            format!(
                "throughput: {} no-op jq jobs over {} finished runs, retention off",
                args.jobs, args.retention_backlog
            ),
            measured.without,
            "jobs/s",
        ));
        table.push(Row::alone(
            format!(
                "throughput: the same while retention deletes them ({} deleted meanwhile)",
                measured.deleted_meanwhile
            ),
            measured.while_deleting,
            "jobs/s",
        ));
        soak = Some(measured.soak);
    }
    if let [(_, jq), (_, python), ..] = throughputs.as_slice() {
        table.push(Row::alone(
            "Python step over a jq step: per job at full throughput".to_owned(),
            (1.0 / python - 1.0 / jq) * 1e6,
            "µs",
        ));
    }

    println!();
    println!(
        "taskfleet {} vs {}; {} round(s) each, medians; {} worker(s) × {} in flight; {}",
        env!("CARGO_PKG_VERSION"),
        celery
            .as_ref()
            .map_or("no Celery".to_owned(), |c| format!("Celery {}", c.version)),
        rounds,
        args.workers,
        args.concurrency,
        report::machine(),
    );
    println!();
    print!("{}", table.render());
    if !cpu_rows.is_empty() {
        println!();
        print!("{}", report::render_cpu(&cpu_rows, celery_drain_cpu));
    }
    if let Some(soak) = soak {
        println!();
        print!("{}", report::render_soak(&soak));
    }
    Ok(())
}

/// Tells the operator what runs now, on stderr, so stdout holds only the report.
pub(crate) fn progress(what: &str) {
    #[allow(clippy::print_stderr, reason = "progress of a long benchmark")]
    {
        eprintln!("== {what}");
    }
}
