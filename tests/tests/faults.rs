//! Faults injected into a real fleet.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{AMQP, FleetOptions, TestFleet};

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
    // Whatever runs the fleet restarts the workers the task takes down.
    let (run, replaced) = fleet
        .wait_run_replacing_workers(&id, Duration::from_secs(60), |_| {})
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(
        run["steps"]["crash"]["error"]["type"], "worker_lost",
        "{run:#}"
    );
    assert_eq!(
        replaced, 3,
        "the task should take down exactly three workers"
    );
    // No copy of the task is left to take down a fourth.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(2) {
        assert_eq!(
            fleet.replace_dead_workers().unwrap(),
            0,
            "a worker died after the task had failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fleet goes on serving.
    let next = fleet
        .run(
            &json!({"steps": [{"id": "ok", "python": "fleet_steps:double"}]}),
            &json!(2),
        )
        .await;
    assert_eq!(next["output"], 4);
}

#[tokio::test]
async fn a_task_that_takes_its_worker_down_fails_alone_among_the_tasks_it_shared_messages_with() {
    // One message at a time, so the only tasks a crash catches are those of the crasher's
    // message: after the first crash, that is the crasher alone.
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // 64 runs in one batch are dispatched together, four tasks to a message.
    let runs: Vec<serde_json::Value> = (0..64)
        .map(|n| {
            let function = if n == 21 { "crash" } else { "echo" };
            json!({
                "definition": {"steps": [{"id": "s", "python": format!("fleet_steps:{function}")}]},
                "input": n,
            })
        })
        .collect();
    let (status, body) = fleet
        .request("POST", "/v1/runs:batch", Some(&json!({ "runs": runs })))
        .await;
    assert_eq!(status, 201, "{body}");
    let ids: Vec<String> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    let (crashed, replaced) = fleet
        .wait_run_replacing_workers(&ids[21], Duration::from_secs(90), |_| {})
        .await;
    assert_eq!(
        crashed["steps"]["s"]["error"]["type"], "worker_lost",
        "{crashed:#}"
    );
    assert_eq!(
        replaced, 3,
        "the task should take down exactly three workers"
    );
    for (n, id) in ids.iter().enumerate().filter(|(n, _)| *n != 21) {
        let run = fleet.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "run {n}: {run:#}");
        assert_eq!(run["output"], n, "run {n}: {run:#}");
    }
    assert_eq!(fleet.replace_dead_workers().unwrap(), 0);
}

/// Wakes a stopped process even when the test fails half-way.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test]
async fn a_frozen_workers_task_runs_elsewhere_and_is_recorded_once() {
    // A 2 s heartbeat, so the broker gives up on the frozen worker within a few seconds.
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env: vec![(
            "TASKFLEET_AMQP_URL".to_owned(),
            format!("{AMQP}?heartbeat=2"),
        )],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "slow", "python": "fleet_steps:slow"},
        {"id": "last", "dataflow": ".sleep", "after": ["slow"]}
    ]});
    let id = fleet.submit(&definition, &json!({"sleep": 1.0})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        if run["steps"]["slow"]["status"] == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "the slow step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let frozen = Continue(fleet.signal_worker(0, "STOP").unwrap());
    let stopped = Instant::now();
    fleet.start_worker().unwrap();
    let run = fleet.wait_run(&id, Duration::from_secs(60)).await;
    let recovered = stopped.elapsed();
    eprintln!("a frozen worker's task finished elsewhere {recovered:?} after the freeze");
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 1.0);
    // The frozen worker wakes and finds its connection gone; whatever it reports is late.
    drop(frozen);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, after) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(
        after["steps"], run["steps"],
        "the recorded results did not change"
    );
    assert_eq!(after["steps"]["slow"]["attempts"], 1);
    assert_eq!(
        fleet.workers_alive(),
        2,
        "the woken worker reconnected and runs on"
    );
    // Both workers still serve.
    for n in 0..6 {
        let run = fleet
            .run(
                &json!({"steps": [{"id": "echo", "python": "fleet_steps:echo"}]}),
                &json!(n),
            )
            .await;
        assert_eq!(run["output"], n);
    }
}
