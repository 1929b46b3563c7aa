//! The API side of limits: bad `rate_limit` and `concurrency` fields are refused with a 422
//! naming the step and field, a key program that yields no usable value fails its step, and a
//! queue's settings are set and read by an admin only.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

/// Submits a one-step run whose step has `limits` merged in and returns the answer.
async fn submit_step(fleet: &TestFleet, limits: Value) -> (u16, Value) {
    let mut step = json!({"id": "call", "dataflow": "."});
    for (field, value) in limits.as_object().unwrap() {
        step[field] = value.clone();
    }
    let body = json!({"definition": {"steps": [step]}, "input": {"customer": "acme"}});
    fleet.request("POST", "/v1/runs", Some(&body)).await
}

#[tokio::test]
async fn bad_limits_are_refused_naming_the_field() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let cases = [
        (
            json!({"rate_limit": {"per_second": 0}}),
            "rate_limit.per_second",
        ),
        (
            json!({"rate_limit": {"per_second": -3}}),
            "rate_limit.per_second",
        ),
        (
            json!({"rate_limit": {"per_second": 1e9}}),
            "rate_limit.per_second",
        ),
        (
            json!({"rate_limit": {"per_second": 5, "burst": 0}}),
            "rate_limit.burst",
        ),
        (
            json!({"rate_limit": {"per_second": 5, "key": ".customer |"}}),
            "rate_limit.key",
        ),
        (json!({"concurrency": {"limit": 0}}), "concurrency.limit"),
        (
            json!({"concurrency": {"limit": 2, "key": "][" }}),
            "concurrency.key",
        ),
    ];
    for (limits, field) in cases {
        let (status, answer) = submit_step(&fleet, limits.clone()).await;
        assert_eq!(status, 422, "{limits}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{limits}: {message}");
        assert_eq!(answer["error"]["details"][0]["step"], "call", "{answer}");
    }
    // Unknown or mistyped fields inside a limit are refused before validation.
    for limits in [
        json!({"concurrency": {"limit": 2, "per_second": 3}}),
        json!({"rate_limit": {"per_second": "fast"}}),
        json!({"concurrency": {"limit": -1}}),
    ] {
        let (status, answer) = submit_step(&fleet, limits.clone()).await;
        assert!(matches!(status, 400 | 422), "{limits}: {status} {answer}");
    }
    // A good one is accepted, as a job too.
    let (status, answer) = submit_step(
        &fleet,
        json!({"rate_limit": {"per_second": 0.5, "burst": 3, "key": ".customer"},
               "concurrency": {"limit": 2, "key": ".customer"}}),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let job = json!({"dataflow": ".", "input": 1, "concurrency": {"limit": 0}});
    let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrency.limit")
    );
}

#[tokio::test]
async fn a_key_that_yields_no_scalar_or_fails_fails_its_step() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let cases = [
        (
            json!({"rate_limit": {"per_second": 5, "key": "{a: 1}"}}),
            "rate_limit.key",
            "an object",
        ),
        (
            json!({"concurrency": {"limit": 1, "key": ".missing"}}),
            "concurrency.key",
            "null",
        ),
        (
            json!({"concurrency": {"limit": 1, "key": "error(\"no\")"}}),
            "concurrency.key",
            "no",
        ),
    ];
    for (limits, field, needle) in cases {
        let (status, answer) = submit_step(&fleet, limits.clone()).await;
        assert_eq!(status, 201, "{limits}: {answer}");
        let run = fleet
            .wait_run(answer["id"].as_str().unwrap(), Duration::from_secs(20))
            .await;
        assert_eq!(run["status"], "failed", "{run}");
        assert_eq!(run["error"]["type"], "dataflow_error", "{run}");
        let message = run["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field) && message.contains(needle),
            "{message}"
        );
    }
    // A key over the items of a `for_each`: one item whose key is unusable fails the step.
    let definition = json!({"steps": [{"id": "each", "dataflow": ".", "for_each": ".",
        "concurrency": {"limit": 1, "key": ".k"}}]});
    let run = fleet.run(&definition, &json!([{"k": 1}, {"k": [2]}])).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert!(
        run["error"]["message"]
            .as_str()
            .unwrap()
            .contains("an array"),
        "{run}"
    );
}

#[tokio::test]
async fn a_queue_rate_limit_is_set_and_read_by_an_admin() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let (status, answer) = fleet.request("GET", "/v1/queues/emails", None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rate_limit_per_s"], Value::Null);
    assert_eq!(answer["updated_at"], Value::Null);
    let (status, answer) = fleet
        .request(
            "PUT",
            "/v1/queues/emails",
            Some(&json!({"rate_limit_per_s": 2.5})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rate_limit_per_s"], 2.5);
    let (_, answer) = fleet.request("GET", "/v1/queues/emails", None).await;
    assert_eq!(answer["rate_limit_per_s"], 2.5, "{answer}");
    assert!(answer["updated_at"].is_string(), "{answer}");
    for bad in [json!(0), json!(-1), json!("fast"), json!(1e9)] {
        let body = json!({"rate_limit_per_s": bad});
        let (status, answer) = fleet.request("PUT", "/v1/queues/emails", Some(&body)).await;
        assert_eq!(status, 422, "{bad}: {answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("rate_limit_per_s"),
            "{answer}"
        );
    }
    let (status, _) = fleet
        .request("PUT", "/v1/queues/emails", Some(&json!({"rate_per_s": 1})))
        .await;
    assert_eq!(status, 400);
    let (status, _) = fleet
        .request(
            "PUT",
            "/v1/queues/bad%20name",
            Some(&json!({"rate_limit_per_s": 1})),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = fleet.request("GET", "/v1/queues/bad%20name", None).await;
    assert_eq!(status, 404);
    // Only an admin sets or reads a queue's settings.
    let key = fleet.create_key("acme", "runs:read,runs:write").unwrap();
    let (status, _) = fleet
        .request_as(
            &key,
            "PUT",
            "/v1/queues/emails",
            Some(&json!({"rate_limit_per_s": 100})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = fleet
        .request_as(&key, "GET", "/v1/queues/emails", None)
        .await;
    assert_eq!(status, 403);
    // Null removes the limit.
    let (status, answer) = fleet
        .request(
            "PUT",
            "/v1/queues/emails",
            Some(&json!({"rate_limit_per_s": null})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rate_limit_per_s"], Value::Null);
}
