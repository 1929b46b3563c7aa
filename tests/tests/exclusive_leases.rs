//! A task of a step with a concurrency limit never runs beside another delivery of itself: a
//! delivery that finds the task's lease held (by a worker cut off from the broker that still
//! runs it, or a lost worker whose lease has not expired) is sent back until the lease is
//! free, without an attempt. A task without a limit takes the lease over, as before.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use taskfleet_tests::{REDIS, TestFleet};

/// A job that returns when it started, after `delay_s`.
fn job(concurrency: Option<Value>) -> Value {
    let mut job = json!({
        "python_code": "import time\n\ndef main(input):\n    return time.time()\n",
        "input": null,
        "delay_s": 1.5,
    });
    if let Some(concurrency) = concurrency {
        job["concurrency"] = concurrency;
    }
    job
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn a_limited_task_waits_for_a_lease_another_delivery_holds() {
    let fleet = TestFleet::start().await.unwrap();
    let mut ids = Vec::new();
    for concurrency in [Some(json!({"limit": 1})), None] {
        let (status, answer) = fleet
            .request("POST", "/v1/tasks", Some(&job(concurrency)))
            .await;
        assert_eq!(status, 201, "{answer}");
        ids.push(answer["id"].as_str().unwrap().to_owned());
    }
    // Another delivery of each task holds its lease for 4 s.
    let redis = redis::Client::open(REDIS).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let held_until = now() + 4.0;
    for id in &ids {
        let (_, view) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
        let task_id = view["steps"]["job"]["task_id"].as_str().unwrap().to_owned();
        let lease = json!({"worker_id": "elsewhere", "attempt": 1,
                           "started_at": "2026-01-01T00:00:00Z"});
        let _: () = redis::cmd("SET")
            .arg(format!("{}:lease:{task_id}", fleet.namespace))
            .arg(lease.to_string())
            .arg("PX")
            .arg(4000)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let mut started = Vec::new();
    for id in &ids {
        let view = fleet.wait_job(id, Duration::from_secs(30)).await;
        assert_eq!(view["status"], "succeeded", "{view:#}");
        assert_eq!(view["steps"]["job"]["attempts"], 1, "{view:#}");
        started.push(view["output"].as_f64().unwrap());
    }
    assert!(
        started[0] >= held_until - 0.3,
        "the limited task started {:.2} s before the other delivery's lease ended",
        held_until - started[0]
    );
    assert!(
        started[1] < held_until - 1.0,
        "a task without a limit takes the lease over: it started {:.2} s before the lease ended",
        held_until - started[1]
    );
}
