//! SIGTERM to workers: in-flight tasks finish within the grace period, the rest are handed back,
//! the worker exits 0, and a rolling restart of every worker loses nothing.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

async fn fleet(workers: usize, grace_s: u32) -> TestFleet {
    TestFleet::start_with(FleetOptions {
        workers,
        worker_env: vec![("TASKFLEET_SHUTDOWN_GRACE_S".to_owned(), grace_s.to_string())],
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

/// Waits until the step `step` of run `id` is running.
async fn until_running(fleet: &TestFleet, id: &str, step: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        if run["steps"][step]["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "{step} never ran: {run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sigterm_lets_in_flight_tasks_finish_then_exits_zero() {
    let mut fleet = fleet(1, 10).await;
    let definition = json!({"steps": [{"id": "nap", "python": "fleet_steps:slow"}]});
    let id = fleet.submit(&definition, &json!({"sleep": 1.5})).await;
    until_running(&fleet, &id, "nap").await;
    let signalled = Instant::now();
    let code = fleet
        .terminate_oldest_worker(Duration::from_secs(15))
        .await
        .unwrap();
    let exited_after = signalled.elapsed();
    assert_eq!(code, Some(0));
    // No other worker exists: the run finished because the stopping worker finished it.
    let run = fleet.wait_run(&id, Duration::from_secs(5)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["steps"]["nap"]["attempts"], 1, "{run}");
    assert!(exited_after < Duration::from_secs(5), "{exited_after:?}");
}

#[tokio::test]
async fn task_still_running_at_the_end_of_the_grace_is_handed_back() {
    let mut fleet = fleet(1, 1).await;
    let definition = json!({"steps": [{"id": "nap", "python": "fleet_steps:slow"}]});
    let id = fleet.submit(&definition, &json!({"sleep": 4})).await;
    until_running(&fleet, &id, "nap").await;
    let signalled = Instant::now();
    let code = fleet
        .terminate_oldest_worker(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    let exited_after = signalled.elapsed();
    assert!(exited_after < Duration::from_secs(3), "{exited_after:?}");
    // Handed back, not failed: the next worker runs it from the start.
    let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(run["status"], "running", "{run}");
    fleet.start_worker().unwrap();
    let run = fleet.wait_run(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

#[tokio::test]
async fn rolling_restart_of_every_worker_loses_nothing() {
    let mut fleet = fleet(2, 5).await;
    let definition = json!({"steps": [
        {"id": "first", "python": "fleet_steps:slow"},
        {"id": "second", "dataflow": "{sleep, n: (.n + 1)}", "after": ["first"]},
        {"id": "third", "python": "fleet_steps:slow", "after": ["second"]},
    ]});
    let runs = 150;
    let mut ids = Vec::new();
    for n in 0..runs {
        ids.push(
            fleet
                .submit(&definition, &json!({"sleep": 0.02, "n": n}))
                .await,
        );
    }
    // Replace both workers one at a time while the runs go through, as a deployment would.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        fleet.start_worker().unwrap();
        let code = fleet
            .terminate_oldest_worker(Duration::from_secs(15))
            .await
            .unwrap();
        assert_eq!(code, Some(0));
    }
    for (n, id) in ids.iter().enumerate() {
        let run = fleet.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], json!({"sleep": 0.02, "n": n + 1}));
        for step in ["first", "second", "third"] {
            let attempts = &run["steps"][step]["attempts"];
            assert_eq!(attempts, &Value::from(1), "{step}: {run}");
        }
    }
}
