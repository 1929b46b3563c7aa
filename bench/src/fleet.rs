//! The taskfleet side of each workload, on a real fleet started from the binaries beside the
//! benchmark (one scheduler and its workers) against the local PostgreSQL, RabbitMQ and Redis.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use taskfleet_common::definition::StepKind;
use taskfleet_common::protocol::{PROTOCOL_VERSION, TaskMessage};
use taskfleet_common::{RunId, TaskId};
use taskfleet_tests::{FleetOptions, TestFleet};
use taskfleet_worker::config::{Config, Settings};
use taskfleet_worker::{ExecutorSettings, Executors};

use crate::cpu::{self, Group, Sample};

/// The shape of the fleet under test.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Worker processes.
    pub workers: usize,
    /// Tasks in flight per worker.
    pub concurrency: usize,
}

/// A no-op jq step.
pub fn jq_noop() -> Value {
    json!({"id": "noop", "dataflow": "."})
}

/// A no-op Python step.
pub fn python_noop() -> Value {
    json!({"id": "noop", "python": "fleet_steps:echo"})
}

/// Starts a fleet as an operator would run it: info logs only, the default lease.
pub async fn start(shape: Shape) -> Result<TestFleet> {
    start_with(shape, &[]).await
}

/// How a fleet is secured: API keys and payload encryption (every fleet has TLS off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// API keys required (the default), payloads in clear.
    Keys,
    /// No API keys (`TASKFLEET_AUTH=off`), payloads in clear.
    Open,
    /// API keys required and payloads encrypted (`TASKFLEET_ENCRYPTION_KEYS`).
    KeysAndEncryption,
}

impl Security {
    /// The settings of every process of a fleet secured so.
    pub fn env(self) -> Vec<(String, String)> {
        match self {
            Self::Keys => Vec::new(),
            Self::Open => vec![("TASKFLEET_AUTH".to_owned(), "off".to_owned())],
            Self::KeysAndEncryption => vec![(
                "TASKFLEET_ENCRYPTION_KEYS".to_owned(),
                // A key of the benchmark's own: 32 bytes of 0x5a, in base64.
                "bench:WlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlo=".to_owned(),
            )],
        }
    }
}

/// Whether a fleet keeps Prometheus metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metrics {
    /// The scheduler's (the default) and the workers' (each on a port of its own), and the
    /// scheduler's scraped every second while a workload runs.
    On,
    /// None (`TASKFLEET_METRICS=off`, no `TASKFLEET_METRICS_ADDR`).
    Off,
}

impl Metrics {
    /// The settings of every process of a fleet with metrics so.
    pub fn env(self) -> Vec<(String, String)> {
        match self {
            // Each worker binds a port of its own.
            Self::On => vec![(
                "TASKFLEET_METRICS_ADDR".to_owned(),
                "127.0.0.1:0".to_owned(),
            )],
            Self::Off => vec![("TASKFLEET_METRICS".to_owned(), "off".to_owned())],
        }
    }
}

/// Scrapes the scheduler's `/metrics` every second until dropped, as a Prometheus would.
pub struct Scraper(tokio::task::JoinHandle<()>);

impl Scraper {
    /// Starts scraping `fleet`'s scheduler.
    pub fn start(fleet: &TestFleet) -> Self {
        let http = fleet.http.clone();
        let url = format!("{}/metrics", fleet.api);
        Self(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            loop {
                every.tick().await;
                if let Ok(response) = http.get(&url).send().await {
                    let _ = response.bytes().await;
                }
            }
        }))
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts a fleet as [`start`] does, with `extra` settings for all its processes.
pub async fn start_with(shape: Shape, extra: &[(String, String)]) -> Result<TestFleet> {
    let production = || {
        let mut env = vec![
            ("RUST_LOG".to_owned(), "warn".to_owned()),
            ("TASKFLEET_LEASE_TTL_S".to_owned(), "30".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    TestFleet::start_with(FleetOptions {
        workers: shape.workers,
        concurrency: shape.concurrency,
        scheduler_env: production(),
        worker_env: production(),
        ..FleetOptions::default()
    })
    .await
}

/// The fleet's own processes and the services, for CPU accounting.
pub fn groups(fleet: &TestFleet) -> Vec<Group> {
    let mut groups = vec![
        Group::Tree {
            name: "scheduler",
            pids: fleet.scheduler_pid().into_iter().collect(),
        },
        Group::Tree {
            name: "workers",
            pids: fleet.worker_pids(),
        },
    ];
    groups.extend(cpu::services());
    groups
}

/// What a throughput workload measured.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// Runs per second, from the first submit to the last run's end as the scheduler recorded it.
    pub rate: f64,
    /// CPU time used by each process meanwhile.
    pub cpu: Sample,
}

/// Submits `runs` one-step runs of `step` through `POST /v1/runs:batch` (1,000 per request, all
/// requests at once) and waits until every one has succeeded.
pub async fn throughput(fleet: &TestFleet, runs: usize, step: &Value) -> Result<Throughput> {
    let groups = groups(fleet);
    let before = cpu::sample(&groups);
    let started = SystemTime::now();
    let submitted = submit_jobs(fleet, runs, step).await?;
    // Long polls on the last run of each batch, which cost the database nothing while they
    // wait; then the counters, once or twice, for any run that finished later.
    for id in &submitted.last_of_batches {
        fleet.wait_run(id, Duration::from_secs(600)).await;
    }
    wait_succeeded(fleet, runs).await?;
    let used = cpu::sample(&groups).since(&before);
    let last = last_finished(fleet).await?;
    let span = last
        .duration_since(started)
        .context("the last run finished before the first submit")?;
    Ok(Throughput {
        rate: runs as f64 / span.as_secs_f64(),
        cpu: used,
    })
}

/// The runs a throughput workload submitted.
pub struct Submitted {
    /// Every run's id.
    pub ids: Vec<String>,
    /// The last run of each batch request.
    pub last_of_batches: Vec<String>,
}

/// Submits `runs` one-step runs of `step` through `POST /v1/runs:batch`, 1,000 per request,
/// all requests at once.
pub async fn submit_jobs(fleet: &TestFleet, runs: usize, step: &Value) -> Result<Submitted> {
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
    let answers = futures_util::future::join_all(
        batches
            .iter()
            .map(|batch| fleet.request("POST", "/v1/runs:batch", Some(batch))),
    )
    .await;
    let mut submitted = Submitted {
        ids: Vec::with_capacity(runs),
        last_of_batches: Vec::new(),
    };
    for (status, body) in &answers {
        ensure!(*status == 201, "batch submit failed: {body}");
        let ids = body["ids"].as_array().context("run ids")?;
        for id in ids {
            submitted
                .ids
                .push(id.as_str().context("run id")?.to_owned());
        }
        if let Some(last) = submitted.ids.last() {
            submitted.last_of_batches.push(last.clone());
        }
    }
    Ok(submitted)
}

/// Polls the fleet's counters until `runs` runs have succeeded; fails on any failed run.
async fn wait_succeeded(fleet: &TestFleet, runs: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (_, stats) = fleet.request("GET", "/v1/stats", None).await;
        let done = stats["runs"]["succeeded"].as_u64().unwrap_or(0);
        if done as usize >= runs {
            return Ok(());
        }
        ensure!(
            stats["runs"]["failed"].as_u64().unwrap_or(0) == 0,
            "runs failed: {stats}"
        );
        ensure!(Instant::now() < deadline, "runs did not finish: {stats}");
        // Counting is work for the database the fleet shares: poll slowly. The figure comes
        // from the record's own times, not from when this loop noticed the end.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The time the fleet's last run finished, from its own record.
pub async fn last_finished(fleet: &TestFleet) -> Result<SystemTime> {
    let db_url = format!("{}/{}", taskfleet_tests::POSTGRES, fleet.database);
    let pool = sqlx::PgPool::connect(&db_url).await?;
    let epoch: f64 =
        sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM max(finished_at))::float8 FROM runs")
            .fetch_one(&pool)
            .await?;
    pool.close().await;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(epoch))
}

/// Runs an inline definition to its end (`POST /v1/runs`, then long polls), checks that it
/// succeeded with `expected` as its output, and returns the time from submit to its end.
async fn timed_run(
    fleet: &TestFleet,
    definition: &Value,
    input: &Value,
    expected: &Value,
) -> Result<Duration> {
    let started = Instant::now();
    let run = fleet.run(definition, input).await;
    let elapsed = started.elapsed();
    ensure!(
        run["status"] == "succeeded" && run["output"] == *expected,
        "the run ended {} with output {} (expected {expected}), error {}",
        run["status"],
        run["output"],
        run["error"]
    );
    Ok(elapsed)
}

/// Times `runs` sequential one-step runs of `step`, each a `POST /v1/runs` followed by long
/// polls of `GET /v1/runs/{id}?wait=`, after a few runs that warm connections and caches.
pub async fn latency(fleet: &TestFleet, step: &Value, runs: usize) -> Result<Vec<Duration>> {
    let definition = json!({ "steps": [step] });
    let mut timings = Vec::with_capacity(runs);
    for round in 0..runs + 10 {
        let input = json!({"n": round});
        let elapsed = timed_run(fleet, &definition, &input, &input).await?;
        if round >= 10 {
            timings.push(elapsed);
        }
    }
    Ok(timings)
}

/// Offers `POST /v1/runs` (a one-step jq run) at `rate` requests per second for `seconds`, open
/// loop (each request at its time, whether or not earlier ones have been answered); returns
/// each request's time to its answer and the rate achieved.
pub async fn enqueue(fleet: &TestFleet, rate: f64, seconds: f64) -> Result<(Vec<Duration>, f64)> {
    let body = Arc::new(json!({"definition": {"steps": [jq_noop()]}, "input": 1}).to_string());
    let url = Arc::new(format!("{}/v1/runs", fleet.api));
    let total = (rate * seconds).round() as usize;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..total {
        interval.tick().await;
        let (http, url, body) = (fleet.http.clone(), url.clone(), body.clone());
        requests.spawn(async move {
            let sent = Instant::now();
            let answer = http
                .post(url.as_str())
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await;
            let status = answer.map(|answer| answer.status().as_u16());
            (status, sent.elapsed())
        });
    }
    let offered = started.elapsed();
    let mut timings = Vec::with_capacity(total);
    while let Some(joined) = requests.join_next().await {
        let (status, elapsed) = joined?;
        let status = status.context("a request failed")?;
        ensure!(status == 201, "a request was answered {status}");
        timings.push(elapsed);
    }
    Ok((timings, total as f64 / offered.as_secs_f64()))
}

/// Runs a `for_each` of a no-op Python step over `items` elements followed by a jq join, and
/// returns the time from submit to the run's end.
pub async fn fan_out(fleet: &TestFleet, items: usize) -> Result<Duration> {
    let definition = json!({"steps": [
        {"id": "items", "dataflow": "[range(.)]"},
        {"id": "each", "python": "fleet_steps:echo", "after": ["items"], "for_each": "."},
        {"id": "join", "dataflow": "length", "after": ["each"]}
    ]});
    timed_run(fleet, &definition, &json!(items), &json!(items)).await
}

/// Runs a chain of `steps` Python steps, each adding one to its input, and returns the time
/// from submit to the run's end.
pub async fn chain(fleet: &TestFleet, steps: usize) -> Result<Duration> {
    let source = "def main(input):\n    return input + 1\n";
    let steps: Vec<Value> = (0..steps)
        .map(|n| {
            let mut step = json!({"id": format!("s{n}"), "python_code": source});
            if n > 0 {
                step["after"] = json!([format!("s{}", n - 1)]);
            }
            step
        })
        .collect();
    let count = steps.len();
    let definition = json!({ "steps": steps });
    timed_run(fleet, &definition, &json!(0), &json!(count)).await
}

/// The timings of sequential steps through a worker's own executors.
#[derive(Debug, Default)]
pub struct ExecutorTimings {
    /// A jq `.`, which runs in place.
    pub jq: Vec<Duration>,
    /// A jq `map(.)`, which is not quick and runs in a sandbox process.
    pub sandboxed_jq: Vec<Duration>,
    /// A Python no-op on one executor process.
    pub python: Vec<Duration>,
}

/// Times `calls` sequential no-op steps of each kind through a worker's own executors, with no
/// broker or database in the way.
pub async fn executor_cost(calls: usize) -> Result<ExecutorTimings> {
    // A worker's executors as the worker starts them, with one Python executor process.
    let settings = taskfleet_io::settings::try_parse_from_args::<Settings>([
        "taskfleet-worker",
        "--python-executors",
        "1",
        "--jq-sandboxes",
        "1",
    ])
    .context("the worker's settings")?;
    let config = Config::new(settings, None, None);
    let program = taskfleet_tests::bin_dir().join("taskfleet-worker");
    let executors = Executors::start(ExecutorSettings::new(&config, program)).await?;
    let task = |step: StepKind| TaskMessage {
        version: PROTOCOL_VERSION,
        task_id: TaskId::new(),
        run_id: RunId::new(),
        step_id: "noop".to_owned(),
        attempt: 1,
        step,
        input: json!({"n": 1}),
        timeout_s: None,
        ends_run: false,
        trace_id: None,
        rate_limit: None,
        exclusive: false,
    };
    let jq = task(StepKind::Dataflow {
        program: ".".to_owned(),
    });
    let sandboxed_jq = TaskMessage {
        input: json!([1]),
        ..task(StepKind::Dataflow {
            program: "map(.)".to_owned(),
        })
    };
    let python = task(StepKind::PythonCode {
        source: "def main(input):\n    return input\n".to_owned(),
    });
    let never = tokio_util::sync::CancellationToken::new();
    let mut timings = ExecutorTimings::default();
    // Alternating the kinds spreads the machine's noise over them alike.
    for round in 0..calls + 100 {
        for (task, kind_timings) in [
            (&jq, &mut timings.jq),
            (&sandboxed_jq, &mut timings.sandboxed_jq),
            (&python, &mut timings.python),
        ] {
            let started = Instant::now();
            let result = executors.execute(task, None, &never).await.result;
            let elapsed = started.elapsed();
            ensure!(result.is_ok(), "a no-op step failed: {result:?}");
            if round >= 100 {
                kind_timings.push(elapsed);
            }
        }
    }
    Ok(timings)
}
