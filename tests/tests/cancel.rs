//! Cancellation and delayed jobs, on a real fleet.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, REDIS, TestFleet};

async fn wait_for_step(fleet: &TestFleet, id: &str, step: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        if run["steps"][step]["status"] == status {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "{step} never became {status}: {run:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn cancelling_a_running_run_stops_its_step_and_the_worker_goes_on() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "spin", "python": "fleet_steps:spin"},
        {"id": "never", "dataflow": ".", "after": ["spin"]}
    ]});
    let id = fleet.submit(&definition, &json!(null)).await;
    wait_for_step(&fleet, &id, "spin", "running").await;
    let started = Instant::now();
    let (status, body) = fleet
        .request("POST", &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (200, json!("cancelled")),
        "{body}"
    );
    let run = fleet.wait_run(&id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["error"]["type"], "cancelled");
    assert_eq!(run["steps"]["spin"]["status"], "cancelled");
    assert_eq!(run["steps"]["never"]["status"], "pending");
    // The only worker was freed: the spinning step was stopped, not left running.
    let next = fleet
        .run(
            &json!({"steps": [{"id": "py", "python": "fleet_steps:double"}]}),
            &json!(4),
        )
        .await;
    assert_eq!(next["output"], 8, "{next:#}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    let (status, body) = fleet
        .request("POST", &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "conflict");
    let (status, _) = fleet
        .request(
            "POST",
            "/v1/runs/0198c4b6-0000-7000-8000-000000000000/cancel",
            None,
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_queued_task_of_a_cancelled_run_is_dropped_when_delivered() {
    // A Python step starts only once its lease is taken; a jq step runs while the lease is
    // taken, and this one would run for minutes if the cancellation did not stop it.
    for step in [
        json!({"id": "a", "python": "fleet_steps:double"}),
        json!({"id": "a", "dataflow": "reduce range(0; 1e12) as $i (0; . + 1)"}),
    ] {
        let mut fleet = TestFleet::start_with(FleetOptions {
            workers: 0,
            ..FleetOptions::default()
        })
        .await
        .unwrap();
        let id = fleet.submit(&json!({"steps": [step]}), &json!(1)).await;
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        let task_id = run["steps"]["a"]["task_id"].as_str().unwrap().to_owned();
        let (status, _) = fleet
            .request("POST", &format!("/v1/runs/{id}/cancel"), None)
            .await;
        assert_eq!(status, 200);
        fleet.start_worker().unwrap();
        // The worker takes the message, sees the cancellation and reports the task cancelled.
        let client = redis::Client::open(REDIS).unwrap();
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let key = format!("{}:result:{task_id}", fleet.namespace);
        let deadline = Instant::now() + Duration::from_secs(30);
        let result: String = loop {
            let result: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
            if let Some(result) = result {
                break result;
            }
            assert!(
                Instant::now() < deadline,
                "the task of {step} was never reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let result: Value = serde_json::from_str(&result).unwrap();
        assert_eq!(result["outcome"]["error"]["type"], "cancelled", "{result}");
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        assert_eq!(run["status"], "cancelled");
        assert!(run["steps"]["a"]["output"].is_null());
    }
}

#[tokio::test]
async fn a_delayed_job_runs_when_due_and_a_cancelled_one_never_runs() {
    let fleet = TestFleet::start().await.unwrap();
    let started = Instant::now();
    let (status, body) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"python": "fleet_steps:double", "input": 5, "delay_s": 1.5})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let (_, job) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(job["steps"]["job"]["status"], "pending", "{job:#}");
    let job = fleet.wait_job(&id, Duration::from_secs(30)).await;
    assert_eq!(job["output"], 10, "{job:#}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    let (_, body) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"python": "fleet_steps:double", "input": 5, "delay_s": 1})),
        )
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, _) = fleet
        .request("POST", &format!("/v1/tasks/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, job) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(job["status"], "cancelled", "{job:#}");
    assert_eq!(job["steps"]["job"]["status"], "cancelled");
    assert!(job["steps"]["job"]["output"].is_null());

    let (status, body) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"dataflow": ".", "delay_s": -1})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_failed_step_stops_the_steps_of_its_run_still_running_elsewhere() {
    // One task at a time per worker, so the failing step goes to the worker that is not
    // spinning (a worker runs its Python steps one at a time).
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "spin", "python": "fleet_steps:spin"},
        {"id": "wait", "dataflow": "."},
        {"id": "boom", "python": "fleet_steps:fail", "after": ["wait"]}
    ]});
    let id = fleet.submit(&definition, &json!(null)).await;
    let run = fleet.wait_run(&id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "boom");
    assert_eq!(run["steps"]["spin"]["status"], "cancelled", "{run:#}");
    // Both workers are free again: two Python steps run at once, one on each.
    let started = Instant::now();
    let next = fleet
        .run(
            &json!({"steps": [
                {"id": "a", "python": "fleet_steps:slow"},
                {"id": "b", "python": "fleet_steps:slow"}]}),
            &json!({"sleep": 1.0}),
        )
        .await;
    assert_eq!(next["status"], "succeeded", "{next:#}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_step_stopped_by_its_runs_cancellation_keeps_what_it_printed_up_to_its_end() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // The step leaves a file once it has printed, so that it is cancelled only then.
    let started = std::env::temp_dir().join(format!("taskfleet-started-{}", fleet.namespace));
    let definition = json!({"steps": [{
        "id": "slow",
        "python_code": "import time\n\ndef main(input):\n    print('started')\n    open(input, 'w').close()\n    try:\n        while True:\n            time.sleep(0.01)\n    finally:\n        print('cleaning up')\n",
    }]});
    let id = fleet
        .submit(&definition, &json!(started.to_str().unwrap()))
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&started);
    let (status, _) = fleet
        .request("POST", &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    // The attempt's completion comes after the cancellation and brings its logs.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        let step = &run["steps"]["slow"];
        assert_eq!(step["status"], "cancelled", "{run:#}");
        let logs = step["logs"].as_str().unwrap_or_default();
        if logs.contains("cleaning up") {
            assert!(logs.contains("started"), "{run:#}");
            assert_eq!(step["attempts"], 1, "{run:#}");
            break;
        }
        assert!(Instant::now() < deadline, "no logs came: {run:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
