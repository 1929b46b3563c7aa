//! The services restarted under a running fleet: RabbitMQ (`rabbitmqctl stop_app` /
//! `start_app`), Redis (shut down without saving, so it forgets everything) and PostgreSQL (a
//! fast shutdown). The scheduler and the workers carry on without a restart, and every run
//! accepted before, during and after finishes with its output. These tests run alone (see
//! .config/nextest.toml): they stop what every other test uses.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::services::{self, Restore};
use taskfleet_tests::{FleetOptions, TestFleet};

fn definition() -> Value {
    json!({"steps": [
        {"id": "nap", "python": "fleet_steps:slow"},
        {"id": "double", "dataflow": ".sleep * 2", "after": ["nap"]},
    ]})
}

async fn fleet() -> TestFleet {
    TestFleet::start_with(FleetOptions {
        workers: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

/// Submits a run sleeping `sleep` seconds (a binary fraction, so doubling it is exact however
/// the value travels); returns its id and expected output.
async fn submit(fleet: &TestFleet, sleep: f64) -> (String, Value) {
    let id = fleet
        .submit(&definition(), &json!({ "sleep": sleep }))
        .await;
    (id, json!(sleep * 2.0))
}

async fn all_succeed(fleet: &TestFleet, runs: &[(String, Value)]) {
    for (id, output) in runs {
        let run = fleet.wait_run(id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(&run["output"], output, "{run}");
        assert_eq!(run["steps"]["nap"]["attempts"], 1, "{run}");
    }
}

/// Submits runs before (some still running when the service stops), during and after an
/// outage of 2 s made by `stop` and `start`, calling `during` while the service is down; returns
/// the runs and when the service was back.
async fn runs_around_an_outage(
    fleet: &TestFleet,
    stop: fn() -> anyhow::Result<()>,
    start: fn() -> anyhow::Result<()>,
    during: impl AsyncFnOnce(&TestFleet),
) -> (Vec<(String, Value)>, Instant) {
    let mut runs = Vec::new();
    for n in 0..12 {
        runs.push(submit(fleet, 0.25 + f64::from(n) / 8.0).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop().unwrap();
    for n in 0..4 {
        runs.push(submit(fleet, f64::from(n) / 16.0).await);
    }
    during(fleet).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    start().unwrap();
    let back = Instant::now();
    for n in 0..4 {
        runs.push(submit(fleet, f64::from(n) / 32.0).await);
    }
    (runs, back)
}

#[tokio::test]
async fn fleet_reconnects_after_a_broker_restart_and_loses_nothing() {
    let mut fleet = fleet().await;
    let _restore = Restore;
    // Runs accepted while the broker is down are durable in PostgreSQL and published once it is
    // back; those in flight when it stopped are handed out again.
    let (runs, back) = runs_around_an_outage(
        &fleet,
        services::stop_rabbitmq,
        services::start_rabbitmq,
        async |_| {},
    )
    .await;
    all_succeed(&fleet, &runs).await;
    eprintln!(
        "broker restart: all {} runs finished {:?} after the broker came back",
        runs.len(),
        back.elapsed()
    );
    assert!(fleet.scheduler_alive(), "the scheduler kept running");
    assert_eq!(fleet.workers_alive(), 2, "the workers kept running");
}

#[tokio::test]
async fn runs_finish_when_redis_restarts_and_forgets_everything() {
    let mut fleet = fleet().await;
    let _restore = Restore;
    // Redis holds nothing that accepting or running needs.
    let (runs, back) = runs_around_an_outage(
        &fleet,
        services::stop_redis,
        services::start_redis,
        async |fleet| {
            let (status, ready) = fleet.request("GET", "/readyz", None).await;
            assert_eq!((status, &ready["redis"]), (503, &json!(false)), "{ready}");
        },
    )
    .await;
    all_succeed(&fleet, &runs).await;
    eprintln!(
        "redis restart: all {} runs finished {:?} after redis came back",
        runs.len(),
        back.elapsed()
    );
    // What lived only in Redis comes back: the workers' heartbeats.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, workers) = fleet.request("GET", "/v1/workers", None).await;
        if workers["workers"].as_array().map_or(0, Vec::len) == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers not listed again: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fleet.scheduler_alive(), "the scheduler kept running");
    assert_eq!(fleet.workers_alive(), 2, "the workers kept running");
}

#[tokio::test]
async fn postgres_restart_answers_503_meanwhile_and_loses_nothing_accepted() {
    let mut fleet = fleet().await;
    let mut runs = Vec::new();
    for n in 0..12 {
        runs.push(submit(&fleet, 0.25 + f64::from(n) / 16.0).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _restore = Restore;
    services::stop_postgres().unwrap();
    let body = json!({"definition": definition(), "input": {"sleep": 0.125}});
    let (status, answer) = fleet.request("POST", "/v1/runs", Some(&body)).await;
    assert_eq!(status, 503, "{answer}");
    let (status, answer) = fleet
        .request("GET", &format!("/v1/runs/{}", runs[0].0), None)
        .await;
    assert_eq!(status, 503, "{answer}");
    // Steps finishing meanwhile are recorded once the database is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    services::start_postgres().unwrap();
    let back = Instant::now();
    // The scheduler resumes by itself: new runs are accepted again within moments.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, answer) = fleet.request("POST", "/v1/runs", Some(&body)).await;
        if status == 201 {
            runs.push((answer["id"].as_str().unwrap().to_owned(), json!(0.25)));
            break;
        }
        assert_eq!(status, 503, "{answer}");
        assert!(Instant::now() < deadline, "not accepting again: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "postgres restart: accepting again {:?} after it came back",
        back.elapsed()
    );
    all_succeed(&fleet, &runs).await;
    eprintln!(
        "postgres restart: all {} runs finished {:?} after postgres came back",
        runs.len(),
        back.elapsed()
    );
    assert!(fleet.scheduler_alive(), "the scheduler kept running");
    assert_eq!(fleet.workers_alive(), 2, "the workers kept running");
}

/// Puts RabbitMQ's consumer timeout back when dropped.
struct ConsumerTimeout;

fn set_consumer_timeout(timeout_ms: u64, tick_ms: u64) {
    let expression = format!(
        "application:set_env(rabbit, consumer_timeout, {timeout_ms}), application:set_env(rabbit, channel_tick_interval, {tick_ms})."
    );
    let status = std::process::Command::new("rabbitmqctl")
        .args(["-q", "eval", &expression])
        .status()
        .expect("running rabbitmqctl");
    assert!(status.success(), "rabbitmqctl eval failed");
}

impl Drop for ConsumerTimeout {
    fn drop(&mut self) {
        set_consumer_timeout(1_800_000, 60_000);
    }
}

#[tokio::test]
async fn a_task_longer_than_the_consumer_timeout_completes_once() {
    // RabbitMQ closes the channel of a consumer that holds a delivery past its consumer timeout
    // (30 min by default); here 2 s, checked every second, for the channels opened from now on.
    let _restore = ConsumerTimeout;
    set_consumer_timeout(2_000, 1_000);
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("consumer-timeout-{}", fleet.namespace));
    std::fs::create_dir_all(&dir).unwrap();
    let definition = json!({"steps": [{"id": "long", "python": "fleet_steps:mark"}]});
    let input = json!({"dir": dir.to_str().unwrap(), "n": 0, "sleep": 5});
    let started = Instant::now();
    let id = fleet.submit(&definition, &input).await;
    let run = fleet.wait_run(&id, Duration::from_secs(90)).await;
    let executions = std::fs::read_dir(&dir).unwrap().count();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "a 5 s task under a 2 s consumer timeout: finished after {:?}, executed {executions} times",
        started.elapsed()
    );
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"]["n"], 1, "{run}");
    assert_eq!(run["steps"]["long"]["attempts"], 1, "{run}");
}

#[tokio::test]
async fn tasks_committed_but_never_published_are_published_after_a_scheduler_crash() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![("TASKFLEET_RELAY_AFTER_S".to_owned(), "2".to_owned())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let _restore = Restore;
    // With the broker down the runs are committed but cannot be published; then the scheduler
    // dies before it could publish them.
    services::stop_rabbitmq().unwrap();
    let mut runs = Vec::new();
    for n in 0..5 {
        runs.push(submit(&fleet, f64::from(n) / 32.0).await);
    }
    fleet.kill_scheduler();
    services::start_rabbitmq().unwrap();
    let restarted = Instant::now();
    fleet.restart_scheduler().await.unwrap();
    all_succeed(&fleet, &runs).await;
    eprintln!(
        "outbox: runs accepted by a scheduler that died unpublished finished {:?} after its restart",
        restarted.elapsed()
    );
}

#[tokio::test]
async fn the_count_of_lost_workers_survives_a_redis_restart() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let _restore = Restore;
    let id = fleet
        .submit(
            &json!({"steps": [{"id": "crash", "python": "fleet_steps:crash"}]}),
            &json!(null),
        )
        .await;
    let (run, replaced) = fleet
        .wait_run_replacing_workers(&id, Duration::from_secs(90), |lost| {
            if lost == 1 {
                // Everything Redis knew is gone after the first lost worker.
                services::stop_redis().unwrap();
                services::start_redis().unwrap();
            }
        })
        .await;
    assert_eq!(
        run["steps"]["crash"]["error"]["type"], "worker_lost",
        "{run}"
    );
    assert_eq!(replaced, 3, "the task took down exactly three workers");
}
