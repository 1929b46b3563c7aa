//! `for_each` fan-out and fan-in on a real fleet.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

#[tokio::test]
async fn ten_thousand_items_fan_out_and_join_in_element_order() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 2,
        concurrency: 64,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "range", "dataflow": "[range(.)]"},
        {"id": "double", "python": "fleet_steps:double", "after": ["range"], "for_each": "."},
        {"id": "check", "dataflow": "{count: length, sum: add, first: .[0:3], last: .[-1]}",
         "after": ["double"]}
    ]});
    let started = Instant::now();
    let id = fleet.submit(&definition, &json!(10_000)).await;
    // Progress is visible while the items run.
    let mut saw_progress = false;
    let run = loop {
        let (_, run) = fleet
            .request("GET", &format!("/v1/runs/{id}?wait=0.2"), None)
            .await;
        let done = run["steps"]["double"]["items"]["done"].as_u64();
        if let Some(done) = done {
            assert_eq!(run["steps"]["double"]["items"]["total"], 10_000);
            saw_progress |= done > 0 && done < 10_000;
        }
        if run["status"] != "running" {
            break run;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "{run:#}");
    };
    eprintln!("10,000-item fan-out and join took {:?}", started.elapsed());
    assert_eq!(run["status"], "succeeded", "{:#}", run["error"]);
    assert_eq!(
        run["output"],
        json!({"count": 10_000, "sum": 99_990_000, "first": [0, 2, 4], "last": 19_998})
    );
    assert_eq!(run["steps"]["double"]["status"], "succeeded");
    assert_eq!(
        run["steps"]["double"]["items"],
        json!({"done": 10_000, "total": 10_000})
    );
    assert!(saw_progress, "no intermediate progress was seen");
}

#[tokio::test]
async fn an_empty_fan_out_joins_at_once_and_bad_fan_outs_fail_clearly() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "each", "python": "fleet_steps:double", "for_each": ".items"},
        {"id": "after", "dataflow": "length", "after": ["each"]}
    ]});
    let run = fleet.run(&definition, &json!({"items": []})).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"]["each"]["output"], json!([]));
    assert_eq!(run["output"], 0);

    let run = fleet
        .run(&definition, &json!({"items": {"not": "an array"}}))
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["type"], "dataflow_error");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("must yield an array")
    );

    let failing = json!({"steps": [
        {"id": "each", "python": "fleet_steps:flaky", "for_each": "."}
    ]});
    let items: Vec<Value> = (0..20)
        .map(|n| json!({"succeed_on": if n == 13 { 9 } else { 1 }}))
        .collect();
    let run = fleet.run(&failing, &json!(items)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "each");
    assert_eq!(run["steps"]["each"]["error"]["item"], 13, "{run:#}");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("item 13"),
        "{run:#}"
    );
}

#[tokio::test]
async fn cancelling_a_running_fan_out_cancels_its_items() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "each", "python": "fleet_steps:slow", "for_each": "[range(.) | {sleep: 0.2}]"}
    ]});
    let id = fleet.submit(&definition, &json!(200)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        if run["steps"]["each"]["items"]["done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no item finished: {run:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = fleet
        .request("POST", &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let run = fleet.wait_run(&id, Duration::from_secs(10)).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert_eq!(run["steps"]["each"]["status"], "cancelled");
    // Soon after, nothing of the run is running any more: a new job runs at once.
    let started = Instant::now();
    let job = fleet
        .run(
            &json!({"steps": [{"id": "j", "dataflow": ". + 1"}]}),
            &json!(1),
        )
        .await;
    assert_eq!(job["output"], 2);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_relay_leaves_a_fan_out_step_waiting_for_its_items_alone() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 2,
        scheduler_env: vec![("TASKFLEET_RELAY_AFTER_S".into(), "2".into())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // Long enough for the relay to look at the step's own row several times.
    let definition = json!({"steps": [
        {"id": "each", "python": "fleet_steps:slow", "for_each": "[range(.) | {sleep: 0.2}]"}
    ]});
    let run = fleet.run(&definition, &json!(20)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"].as_array().unwrap().len(), 20);
}
