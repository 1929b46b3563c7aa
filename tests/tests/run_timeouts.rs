//! Run timeouts against a real fleet: a run that takes longer than its definition's
//! `timeout_s` is cancelled with error type `run_timeout` and its running step stopped; a run
//! within its time is untouched; a re-run starts a new deadline; a bad `timeout_s` is refused.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{FleetOptions, TestFleet};

#[tokio::test]
async fn a_run_past_its_timeout_is_cancelled_with_run_timeout() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let slow = json!({
        "timeout_s": 3,
        "steps": [
            {"id": "first", "dataflow": ". + 1"},
            {"id": "slow", "after": ["first"],
             "python_code": "import time\ndef main(_):\n    time.sleep(30)\n"},
            {"id": "never", "after": ["slow"], "dataflow": "."},
        ],
    });
    let started = Instant::now();
    let id = fleet.submit(&slow, &json!(1)).await;
    let run = fleet.wait_run(&id, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["error"]["type"], "run_timeout", "{run:#}");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timeout_s (3"),
        "{run:#}"
    );
    assert_eq!(run["steps"]["first"]["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"]["slow"]["status"], "cancelled", "{run:#}");
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(10),
        "ended after {took:?}"
    );
    // The worker stopped the step: it takes the next run at once.
    let quick = json!({"timeout_s": 10, "steps": [{"id": "a", "python_code": "def main(x):\n    return x * 2\n"}]});
    let started = Instant::now();
    let done = fleet.run(&quick, &json!(21)).await;
    assert_eq!(
        (&done["status"], &done["output"]),
        (&json!("succeeded"), &json!(42)),
        "{done:#}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // A delayed run's time counts from the end of its delay.
    let delayed = json!({
        "definition": {"timeout_s": 3, "steps": [{"id": "a", "dataflow": ". + 1"}]},
        "input": 1,
        "delay_s": 4,
    });
    let (status, answer) = fleet.request("POST", "/v1/runs", Some(&delayed)).await;
    assert_eq!(status, 201, "{answer}");
    let view = fleet
        .wait_run(answer["id"].as_str().unwrap(), Duration::from_secs(20))
        .await;
    assert_eq!(view["status"], "succeeded", "{view:#}");

    // Run again, the run has a new deadline: it runs its slow step anew, and times out again
    // about as long after the re-run.
    let retried = Instant::now();
    let (status, answer) = fleet
        .request("POST", &format!("/v1/runs/{id}/retry"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let run = fleet.wait_run(&id, Duration::from_secs(20)).await;
    assert_eq!(run["error"]["type"], "run_timeout", "{run:#}");
    assert!(
        retried.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        retried.elapsed()
    );
}

#[tokio::test]
async fn a_bad_timeout_is_refused_naming_it() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    for timeout in [json!(0), json!(-1), json!(1e9)] {
        let body =
            json!({"definition": {"timeout_s": timeout, "steps": [{"id": "a", "dataflow": "."}]}});
        let (status, answer) = fleet.request("POST", "/v1/runs", Some(&body)).await;
        assert_eq!(status, 422, "{timeout}: {answer}");
        assert!(answer.to_string().contains("timeout_s"), "{answer}");
    }
    let body =
        json!({"definition": {"timeout_s": "soon", "steps": [{"id": "a", "dataflow": "."}]}});
    let (status, answer) = fleet.request("POST", "/v1/runs", Some(&body)).await;
    assert_eq!(status, 400, "{answer}");
}
