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

    // A slow step holds one task in flight; a job on a queue nobody consumes stays ready.
    let id = fleet
        .submit(
            &json!({"steps": [{"id": "s", "python": "fleet_steps:slow"}]}),
            &json!({"sleep": 2.0}),
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
