//! Priorities against a real fleet: jobs of a higher priority overtake a backlog of lower ones
//! on a worker with one slot.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::ConnectionProperties;
use serde_json::{Value, json};
use taskfleet_tests::{AMQP, FleetOptions, TestFleet};

/// Submits `count` jobs of `priority` (each a short Python step), returns their ids.
async fn submit(fleet: &TestFleet, priority: u8, count: usize) -> Vec<String> {
    futures_util::stream::iter(0..count)
        .map(|n| async move {
            let job = json!({
                "python_code": "import time\ndef main(input, ctx):\n    time.sleep(0.002)\n    return input\n",
                "input": n,
                "priority": priority,
            });
            let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
            assert_eq!(status, 201, "{answer}");
            answer["id"].as_str().unwrap().to_owned()
        })
        .buffered(16)
        .collect()
        .await
}

/// Reads an RFC 3339 time in UTC (`2026-12-06T03:50:59.5717Z`) as its date and its second of
/// that day, which compare in time order.
fn instant(time: &str) -> (String, f64) {
    let (date, clock) = time.trim_end_matches('Z').split_once('T').unwrap();
    let seconds = clock
        .split(':')
        .map(|part| part.parse::<f64>().unwrap())
        .fold(0.0, |total, part| total * 60.0 + part);
    (date.to_owned(), seconds)
}

/// Waits for each job and returns when it finished.
async fn finished_at(fleet: &TestFleet, ids: &[String]) -> Vec<(String, f64)> {
    let mut times = Vec::new();
    for id in ids {
        let view: Value = fleet.wait_job(id, Duration::from_secs(120)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        times.push(instant(view["finished_at"].as_str().unwrap()));
    }
    times
}

#[tokio::test]
async fn high_priority_jobs_overtake_a_backlog_of_low_ones() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        concurrency: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // The queue holds the backlog until the worker starts.
    let connection = lapin::Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    fleet.declare_queue(&channel, "tasks.default").await;

    let low = submit(&fleet, 0, 500).await;
    let high = submit(&fleet, 9, 20).await;
    fleet.start_worker().unwrap();

    let high_times = finished_at(&fleet, &high).await;
    let low_times = finished_at(&fleet, &low).await;
    let last_high = high_times
        .iter()
        .max_by(|a, b| a.partial_cmp(b).unwrap())
        .unwrap();
    let low_before = low_times.iter().filter(|time| *time < last_high).count();
    assert!(
        low_before < 50,
        "{low_before} of 500 low-priority jobs finished before the last high-priority one"
    );
}
