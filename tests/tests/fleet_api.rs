//! `GET /v1/workers` and `GET /v1/queues` against a real fleet.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::TestFleet;

fn queue<'a>(queues: &'a Value, name: &str) -> Option<&'a Value> {
    queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|queue| queue["name"] == name)
}

#[tokio::test]
async fn workers_and_queues_show_the_fleet_as_it_is() {
    let fleet = TestFleet::start().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let workers = loop {
        let (status, body) = fleet.request("GET", "/v1/workers", None).await;
        assert_eq!(status, 200, "{body}");
        if body["workers"].as_array().unwrap().len() == 2 {
            break body;
        }
        assert!(Instant::now() < deadline, "workers never appeared: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for worker in workers["workers"].as_array().unwrap() {
        assert_eq!(worker["queues"], json!(["default"]), "{worker}");
        assert_eq!(worker["concurrency"], 4);
        assert!(worker["last_heartbeat"].is_string());
    }

    // A slow step holds one task in flight (as its worker's next heartbeat tells, within a
    // second here); a job on a queue nobody consumes stays ready.
    let id = fleet
        .submit(
            &json!({"steps": [{"id": "s", "python": "fleet_steps:slow"}]}),
            &json!({"sleep": 3.0}),
        )
        .await;
    let (status, _) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"dataflow": ".", "queue": "nobody", "input": 1})),
        )
        .await;
    assert_eq!(status, 201);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, queues) = fleet.request("GET", "/v1/queues", None).await;
        assert_eq!(status, 200, "{queues}");
        let default = queue(&queues, "default").unwrap();
        assert_eq!(default["consumers"], 2, "{queues}");
        let nobody = queue(&queues, "nobody");
        if default["in_flight"] == 1 && nobody.is_some_and(|nobody| nobody["ready"] == 1) {
            assert_eq!(nobody.unwrap()["consumers"], 0);
            assert_eq!(default["ready"], 0);
            break;
        }
        assert!(Instant::now() < deadline, "counts never settled: {queues}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.wait_run(&id, Duration::from_secs(30)).await;
}

/// Submits `count` jobs of `step` in one `POST /v1/runs:batch`, so they are dispatched in one
/// round.
async fn submit_batch(fleet: &TestFleet, step: &Value, count: usize) {
    let runs: Vec<Value> = (0..count)
        .map(|n| json!({"definition": {"steps": [step]}, "input": {"n": n, "sleep": 0.02}}))
        .collect();
    let (status, body) = fleet
        .request("POST", "/v1/runs:batch", Some(&json!({ "runs": runs })))
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Waits until the count of messages ready on `name` in the broker satisfies `ready` and stays
/// the same for a moment; returns it.
async fn wait_ready(fleet: &TestFleet, name: &str, ready: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = None;
    loop {
        let (status, queues) = fleet.request("GET", "/v1/queues", None).await;
        assert_eq!(status, 200, "{queues}");
        let count = queue(&queues, name).and_then(|queue| queue["ready"].as_u64());
        if let Some(count) = count
            && ready(count)
            && last == Some(count)
        {
            return count;
        }
        last = count;
        assert!(Instant::now() < deadline, "{name} never settled: {queues}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Tasks dispatched together share broker messages only as far as their queue's tasks are
/// quick: once a queue's tasks were seen to take 20 ms each, 512 of them travel as 512
/// messages; 512 quick jq tasks share a few; a queue never seen gets bundles of 16.
#[tokio::test]
async fn tasks_share_messages_as_far_as_their_queue_is_quick() {
    let mut fleet = TestFleet::start_with(taskfleet_tests::FleetOptions {
        workers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    fleet
        .start_worker_with(&["--queues", "slow,quick"])
        .unwrap();
    let slow = json!({"id": "s", "python": "fleet_steps:slow", "queue": "slow"});
    let quick = json!({"id": "q", "dataflow": ".", "queue": "quick"});
    let unseen = json!({"id": "u", "dataflow": ".", "queue": "unseen"});
    // What the scheduler learns each queue's cost from.
    for step in [&slow, &quick] {
        for n in 0..16 {
            let id = fleet
                .submit(&json!({"steps": [step]}), &json!({"n": n, "sleep": 0.02}))
                .await;
            let run = fleet.wait_run(&id, Duration::from_secs(30)).await;
            assert_eq!(run["status"], "succeeded", "{run}");
        }
    }
    fleet.kill_workers();

    submit_batch(&fleet, &slow, 512).await;
    wait_ready(&fleet, "slow", |ready| ready == 512).await;
    submit_batch(&fleet, &unseen, 512).await;
    wait_ready(&fleet, "unseen", |ready| ready == 32).await;
    // In flight counts tasks that workers hold, not unfinished tasks less ready messages:
    // with no worker consuming it, none of the queue's 512 tasks is in flight.
    let (status, queues) = fleet.request("GET", "/v1/queues", None).await;
    assert_eq!(status, 200, "{queues}");
    assert_eq!(
        queue(&queues, "unseen").unwrap()["in_flight"],
        0,
        "{queues}"
    );
    submit_batch(&fleet, &quick, 512).await;
    let quick = wait_ready(&fleet, "quick", |ready| ready > 0).await;
    // A message holds 1 ms of work by the quickest recent task, and the batch keeps at least
    // 16 messages: a release build's `.` makes 16 of 32; a debug build's on a loaded machine
    // makes smaller ones, though still of 4 or more (a `.` of at most 250 µs).
    assert!(quick <= 128, "512 quick tasks took {quick} messages");
}
