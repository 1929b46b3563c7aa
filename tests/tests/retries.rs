//! Retries with backoff and attempt timeouts, on a real fleet.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{FleetOptions, POSTGRES, TestFleet};

#[tokio::test]
async fn a_step_that_fails_twice_succeeds_on_its_third_attempt_under_retry() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "flaky", "python": "fleet_steps:flaky",
         "retry": {"max_attempts": 3, "initial_backoff_ms": 100, "multiplier": 2.0}},
        {"id": "after", "dataflow": ".attempt", "after": ["flaky"]}
    ]});
    let started = Instant::now();
    let run = fleet.run(&definition, &json!({"succeed_on": 3})).await;
    let took = started.elapsed();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 3);
    assert_eq!(run["steps"]["flaky"]["attempts"], 3, "{run:#}");
    assert_eq!(run["steps"]["flaky"]["status"], "succeeded");
    // Two backoffs of at least 100 and 200 ms passed between the attempts.
    assert!(took >= Duration::from_millis(300), "{took:?}");
}

#[tokio::test]
async fn exhausted_retries_fail_the_run_with_the_last_error() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "flaky", "python": "fleet_steps:flaky",
         "retry": {"max_attempts": 2, "initial_backoff_ms": 50}}
    ]});
    let run = fleet.run(&definition, &json!({"succeed_on": 5})).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["steps"]["flaky"]["attempts"], 2, "{run:#}");
    assert_eq!(run["steps"]["flaky"]["error"]["type"], "RuntimeError");
    assert_eq!(run["steps"]["flaky"]["error"]["message"], "attempt 2 fails");
    assert_eq!(run["error"]["step"], "flaky");
}

#[tokio::test]
async fn spinning_python_and_looping_jq_time_out_while_the_worker_goes_on_serving() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    for (step, input) in [
        (
            json!({"id": "spin", "python": "fleet_steps:spin", "timeout_s": 1}),
            json!(null),
        ),
        (
            json!({"id": "loop", "dataflow": "last(range(300000000))", "timeout_s": 1}),
            json!(null),
        ),
    ] {
        let id = step["id"].as_str().unwrap().to_owned();
        let started = Instant::now();
        let run = fleet.run(&json!({ "steps": [step] }), &input).await;
        let took = started.elapsed();
        assert_eq!(run["status"], "failed", "{run:#}");
        assert_eq!(run["steps"][&id]["error"]["type"], "timeout", "{run:#}");
        assert!(took < Duration::from_secs(10), "{id} took {took:?}");
        // The same worker serves the next Python and jq steps.
        let next = fleet
            .run(
                &json!({"steps": [
                    {"id": "py", "python": "fleet_steps:double"},
                    {"id": "jq", "dataflow": ". + 1", "after": ["py"]}]}),
                &json!(20),
            )
            .await;
        assert_eq!(next["output"], 41, "{next:#}");
    }
}

#[tokio::test]
async fn a_timed_out_attempt_is_retried() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "spin", "python": "fleet_steps:spin", "timeout_s": 0.5,
         "retry": {"max_attempts": 2, "initial_backoff_ms": 50}}
    ]});
    let run = fleet.run(&definition, &json!(null)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["steps"]["spin"]["attempts"], 2, "{run:#}");
    assert_eq!(run["steps"]["spin"]["error"]["type"], "timeout");
}

#[tokio::test]
async fn a_retry_still_waiting_when_its_run_fails_is_cancelled_and_no_longer_due() {
    let fleet = TestFleet::start().await.unwrap();
    // `flaky` (a jq step, so it waits for no Python executor) fails at once and waits ten
    // minutes for its retry; `boom` fails a second later, which fails the run while `flaky`
    // waits.
    let definition = json!({"steps": [
        {"id": "flaky", "dataflow": "error(\"not yet\")",
         "retry": {"max_attempts": 3, "initial_backoff_ms": 600000, "max_backoff_ms": 600000}},
        {"id": "slow", "python": "fleet_steps:slow"},
        {"id": "boom", "python": "fleet_steps:fail", "after": ["slow"]}
    ]});
    let id = fleet.submit(&definition, &json!({"sleep": 1.0})).await;
    let run = fleet.wait_run(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "boom", "{run:#}");
    // Its first attempt had failed: the run ended while its second one waited.
    assert_eq!(run["steps"]["flaky"]["attempts"], 2, "{run:#}");
    assert_eq!(run["steps"]["flaky"]["status"], "cancelled", "{run:#}");

    let pool = sqlx::PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap();
    let due: Vec<(String, String)> = sqlx::query_as(
        "SELECT step_id, status FROM tasks WHERE run_id = $1::uuid AND due_at IS NOT NULL",
    )
    .bind(&id)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!(due, Vec::new(), "tasks of the failed run still due");
}
