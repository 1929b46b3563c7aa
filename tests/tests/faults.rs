//! Faults injected into a real fleet.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{FleetOptions, TestFleet};

#[tokio::test]
async fn a_run_finishes_after_its_workers_are_killed_and_a_new_one_starts() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "first", "dataflow": "."},
        {"id": "slow", "python": "fleet_steps:slow", "after": ["first"]},
        {"id": "last", "dataflow": ".sleep", "after": ["slow"]}
    ]});
    let id = fleet.submit(&definition, &json!({"sleep": 3.0})).await;
    // Wait until a worker holds the slow step, then kill it mid-task.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        if run["steps"]["slow"]["status"] == "running" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow step never started: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fleet.kill_workers();
    let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(run["status"], "running", "{run:#}");
    fleet.start_worker().unwrap();
    let run = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 3.0);
}

#[tokio::test]
async fn a_task_that_takes_its_worker_down_three_times_fails_with_worker_lost() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let id = fleet
        .submit(
            &json!({"steps": [{"id": "crash", "python": "fleet_steps:crash"}]}),
            &json!(null),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut replaced = 0;
    let run = loop {
        let (_, run) = fleet
            .request("GET", &format!("/v1/runs/{id}?wait=0.2"), None)
            .await;
        if run["status"] != "running" {
            break run;
        }
        // Whatever runs the fleet restarts the workers the task takes down.
        replaced += fleet.replace_dead_workers().unwrap();
        assert!(Instant::now() < deadline, "the run never ended: {run:#}");
    };
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(
        run["steps"]["crash"]["error"]["type"], "worker_lost",
        "{run:#}"
    );
    assert_eq!(
        replaced, 3,
        "the task should take down exactly three workers"
    );
    // The fleet goes on serving.
    fleet.replace_dead_workers().unwrap();
    let next = fleet
        .run(
            &json!({"steps": [{"id": "ok", "python": "fleet_steps:double"}]}),
            &json!(2),
        )
        .await;
    assert_eq!(next["output"], 4);
}
