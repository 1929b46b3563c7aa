//! The chaos test: runs submitted in waves through two schedulers while, one after another, a
//! worker is killed (SIGKILL), a worker is frozen (SIGSTOP) and woken, RabbitMQ, Redis and
//! PostgreSQL are restarted, the first scheduler is killed and started again, and a worker is
//! replaced by SIGTERM. Then, from the API's own records and the database, every run must have
//! succeeded with its correct output and every task must have exactly one recorded result; it
//! prints "lost 0, duplicated 0". Steps record each execution in a directory, so the test also
//! reports how many ran more than once (allowed: execution is at least once).
//!
//! `.ci/run` runs the short form (400 runs). The long form:
//! `TASKFLEET_CHAOS_RUNS=5000 cargo nextest run -p taskfleet-tests --test chaos --no-capture`.
//! It runs alone (see .config/nextest.toml): it restarts the services every test uses.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::services::{self, Restore};
use taskfleet_tests::{AMQP, FleetOptions, POSTGRES, TestFleet};

/// Items of each fan-out run.
const ITEMS: u64 = 20;

struct Submitted {
    id: String,
    expected: Value,
}

fn chain() -> Value {
    json!({"steps": [
        {"id": "a", "python": "fleet_steps:mark"},
        {"id": "b", "dataflow": ".n += 10", "after": ["a"]},
        {"id": "c", "python": "fleet_steps:mark", "after": ["b"]},
    ]})
}

/// A run of one step: its success is recorded and the run finished in one statement.
fn single() -> Value {
    json!({"steps": [{"id": "only", "python": "fleet_steps:mark"}]})
}

fn fan_out() -> Value {
    json!({"steps": [
        {"id": "items", "dataflow": ". as $in | [range($in.k) | {dir: $in.dir, n: ., sleep: $in.sleep}]"},
        {"id": "each", "python": "fleet_steps:mark", "after": ["items"], "for_each": "."},
        {"id": "join", "dataflow": "map(.n) | add", "after": ["each"]},
    ]})
}

/// Submits `runs` through `POST /v1/runs:batch` on `api`, retrying (with the same idempotency
/// keys, so nothing is accepted twice) until it is accepted, as a client would while a service
/// is down.
async fn submit_batch(fleet: &TestFleet, api: &str, runs: &[Value]) -> Vec<String> {
    let body = json!({ "runs": runs });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let answer = fleet
            .http
            .post(format!("{api}/v1/runs:batch"))
            .json(&body)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(answer) = answer {
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            if status == 201 || status == 200 {
                return body["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|id| id.as_str().unwrap().to_owned())
                    .collect();
            }
            assert!(
                status == 503 || status >= 500,
                "batch refused with {status}: {body}"
            );
        }
        assert!(Instant::now() < deadline, "the batch was never accepted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Submits one wave: `chains` runs (one in three a single step, the others chains) and one
/// fan-out, half through each scheduler.
async fn wave(
    fleet: &TestFleet,
    apis: &[String; 2],
    dir: &str,
    wave: usize,
    chains: usize,
    submitted: &mut Vec<Submitted>,
) {
    let mut runs = Vec::new();
    let mut expected = Vec::new();
    for n in 0..chains {
        let input = json!({"dir": dir, "n": n, "sleep": 0.05});
        let (definition, added) = if n % 3 == 0 {
            (single(), 1)
        } else {
            (chain(), 12)
        };
        expected.push(json!({"dir": dir, "n": n + added, "sleep": 0.05}));
        runs.push(json!({
            "definition": definition,
            "input": input,
            "idempotency_key": format!("chaos-{wave}-{n}"),
        }));
    }
    runs.push(json!({
        "definition": fan_out(),
        "input": {"dir": dir, "k": ITEMS, "sleep": 0.05},
        "idempotency_key": format!("chaos-{wave}-fan-out"),
    }));
    expected.push(json!(ITEMS * (ITEMS + 1) / 2));
    let half = runs.len() / 2;
    let mut ids = submit_batch(fleet, &apis[0], &runs[..half]).await;
    ids.extend(submit_batch(fleet, &apis[1], &runs[half..]).await);
    submitted.extend(
        ids.into_iter()
            .zip(expected)
            .map(|(id, expected)| Submitted { id, expected }),
    );
}

#[tokio::test]
async fn nothing_accepted_is_lost_or_recorded_twice_whatever_fails() {
    let total: usize = std::env::var("TASKFLEET_CHAOS_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(400);
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 3,
        concurrency: 8,
        // A 2 s heartbeat, so the frozen worker's tasks move within seconds; and a short relay
        // period for tasks the killed scheduler committed but never published.
        worker_env: vec![(
            "TASKFLEET_AMQP_URL".to_owned(),
            format!("{AMQP}?heartbeat=2"),
        )],
        scheduler_env: vec![("TASKFLEET_RELAY_AFTER_S".to_owned(), "2".to_owned())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let second = fleet.start_another_scheduler().await.unwrap();
    let apis = [fleet.api.clone(), second];
    let dir = std::env::temp_dir().join(format!("chaos-{}", fleet.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let dir_text = dir.to_str().unwrap().to_owned();
    let _restore = Restore;
    let faults = 7;
    let chains = total / faults;
    let mut submitted = Vec::new();
    let started = Instant::now();
    let mut wave_number = 0;
    let mut next_wave = async |fleet: &TestFleet, submitted: &mut Vec<Submitted>| {
        wave_number += 1;
        wave(fleet, &apis, &dir_text, wave_number, chains, submitted).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // 1. A worker killed mid-task; a new one takes its place.
    next_wave(&fleet, &mut submitted).await;
    fleet.signal_worker(0, "KILL").unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    fleet.replace_dead_workers().unwrap();
    eprintln!("{:?}: killed a worker", started.elapsed());

    // 2. A worker frozen long enough to lose its connection, then woken.
    next_wave(&fleet, &mut submitted).await;
    fleet.signal_worker(0, "STOP").unwrap();
    tokio::time::sleep(Duration::from_secs(7)).await;
    fleet.signal_worker(0, "CONT").unwrap();
    eprintln!("{:?}: froze and woke a worker", started.elapsed());

    // 3. RabbitMQ restarted.
    next_wave(&fleet, &mut submitted).await;
    services::stop_rabbitmq().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    services::start_rabbitmq().unwrap();
    eprintln!("{:?}: restarted rabbitmq", started.elapsed());

    // 4. Redis restarted, forgetting everything.
    next_wave(&fleet, &mut submitted).await;
    services::stop_redis().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    services::start_redis().unwrap();
    eprintln!("{:?}: restarted redis", started.elapsed());

    // 5. PostgreSQL restarted.
    next_wave(&fleet, &mut submitted).await;
    services::stop_postgres().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    services::start_postgres().unwrap();
    eprintln!("{:?}: restarted postgresql", started.elapsed());

    // 6. The first scheduler killed, the second one serving meanwhile, then the first back.
    next_wave(&fleet, &mut submitted).await;
    fleet.kill_scheduler();
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.restart_scheduler().await.unwrap();
    eprintln!("{:?}: killed and restarted a scheduler", started.elapsed());

    // 8. A worker replaced by SIGTERM, as in a rolling restart.
    next_wave(&fleet, &mut submitted).await;
    fleet.start_worker().unwrap();
    let code = fleet
        .terminate_oldest_worker(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "a worker stopped by SIGTERM exits 0");
    eprintln!("{:?}: replaced a worker by SIGTERM", started.elapsed());

    let mut lost = 0;
    let mut duplicated = 0;
    for run in &submitted {
        let record = fleet.wait_run(&run.id, Duration::from_secs(180)).await;
        let output = if record["status"] == "succeeded" {
            record["output"].clone()
        } else {
            Value::Null
        };
        if output != run.expected {
            eprintln!("lost: {record}");
            lost += 1;
        }
        if let Some(steps) = record["steps"].as_object() {
            for (step, view) in steps {
                if view["attempts"] != 1 {
                    eprintln!(
                        "step {step} recorded {} attempts: {record}",
                        view["attempts"]
                    );
                    duplicated += 1;
                }
            }
        }
    }
    // The durable record: one row per task, and every task finished once.
    let pool = sqlx::PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap();
    let tasks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE item >= 0 OR items_total IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM tasks GROUP BY run_id, step_id, item HAVING count(*) > 1) AS twice",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    duplicated += usize::try_from(twice).unwrap();
    let ran_again = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains(".again."))
        .count();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{} runs ({tasks} tasks) through 7 faults in {:?}; {ran_again} task executions were repeats",
        submitted.len(),
        started.elapsed()
    );
    eprintln!("lost {lost}, duplicated {duplicated}");
    assert_eq!((lost, duplicated), (0, 0));
}
