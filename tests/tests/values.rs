//! A step whose output cannot be stored (a NUL character) or sent (nested too deep), and a task
//! message the worker cannot read, fail with a step error naming the problem, and the run
//! finishes instead of waiting forever; a success reported after its run was cancelled is not
//! recorded.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeleteOptions};
use lapin::{BasicProperties, ConnectionProperties};
use serde_json::{Value, json};
use taskfleet_tests::{AMQP, TestFleet};

/// Runs a one-step workflow and checks that it fails at that step with an error of one of
/// `kinds` whose message contains `needle`.
async fn check(fleet: &TestFleet, step: Value, input: Value, kinds: &[&str], needle: &str) {
    let mut step = step;
    step["id"] = json!("bad");
    let definition = json!({"steps": [step, {"id": "next", "dataflow": ".", "after": ["bad"]}]});
    let run = fleet.run(&definition, &input).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "bad", "{run:#}");
    let error = &run["steps"]["bad"]["error"];
    let kind = error["type"].as_str().unwrap_or_default();
    assert!(
        kinds.contains(&kind),
        "{kind:?} is not one of {kinds:?}: {run:#}"
    );
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should contain {needle:?}"
    );
    assert_eq!(run["steps"]["bad"]["status"], "failed", "{run:#}");
    assert_eq!(run["steps"]["next"]["status"], "pending", "{run:#}");
}

#[tokio::test]
async fn an_output_with_a_nul_character_fails_the_step_as_invalid_output() {
    let fleet = TestFleet::start().await.unwrap();
    check(
        &fleet,
        json!({"dataflow": "\"a\\u0000b\""}),
        json!(null),
        &["invalid_output"],
        "step output cannot be stored: string at $ contains a NUL character",
    )
    .await;
    check(
        &fleet,
        json!({"dataflow": "{list: [1, \"\\u0000\"]}"}),
        json!(null),
        &["invalid_output"],
        "string at $.list[1] contains a NUL character",
    )
    .await;
    check(
        &fleet,
        json!({"dataflow": "{\"key\\u0000\": 1}"}),
        json!(null),
        &["invalid_output"],
        "string at $[\"key\\u0000\"] contains a NUL character",
    )
    .await;
    check(
        &fleet,
        json!({"python_code": "def main(value):\n    return {'text': 'a\\x00b'}\n"}),
        json!(null),
        &["invalid_output"],
        "string at $.text contains a NUL character",
    )
    .await;
}

#[tokio::test]
async fn an_output_nested_too_deep_fails_the_step() {
    let fleet = TestFleet::start().await.unwrap();
    check(
        &fleet,
        json!({"dataflow": "reduce range(100) as $i (0; [.])"}),
        json!(null),
        &["invalid_output", "dataflow_error"],
        "nested deeper than 64 levels",
    )
    .await;
    check(
        &fleet,
        json!({"python": "fleet_steps:deep"}),
        json!(100),
        &["invalid_output"],
        "nested deeper than 64 levels",
    )
    .await;
    // Just within the limit: the step succeeds and the next step gets the value.
    let definition = json!({"output": "next", "steps": [
        {"id": "deep", "python": "fleet_steps:deep"},
        {"id": "next", "dataflow": "[paths] | length", "after": ["deep"]}
    ]});
    let run = fleet.run(&definition, &json!(63)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], 63, "{run:#}");
}

/// Opens a connection and a channel to the fleets' RabbitMQ.
async fn broker() -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

/// Declares a task queue no worker consumes, `<namespace>.tasks.held`, where steps with
/// `"queue": "held"` wait for the test to take them.
async fn hold(channel: &lapin::Channel, fleet: &TestFleet) -> String {
    fleet.declare_queue(channel, "tasks.held").await
}

/// Takes `count` messages from `queue`, waiting for them up to 30 s.
async fn take(channel: &lapin::Channel, queue: &str, count: usize) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut taken = Vec::new();
    while taken.len() < count {
        let options = BasicGetOptions { no_ack: true };
        match channel.basic_get(queue.into(), options).await.unwrap() {
            Some(message) => taken.push(message.delivery),
            None => {
                assert!(
                    Instant::now() < deadline,
                    "{queue} holds {} of {count} messages",
                    taken.len()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    taken
}

/// Takes `count` task messages from the held queue, as the scheduler dispatched them (each
/// message one task: they were submitted one at a time).
async fn take_held(channel: &lapin::Channel, held: &str, count: usize) -> Vec<Value> {
    take(channel, held, count)
        .await
        .iter()
        .map(|delivery| serde_json::from_slice(&delivery.data).unwrap())
        .collect()
}

/// Submits a run of one jq step, `program`, on the held queue and takes its task message from
/// there; returns the run's id and the task.
async fn held_run(
    channel: &lapin::Channel,
    fleet: &TestFleet,
    held: &str,
    program: &str,
    input: Value,
) -> (String, Value) {
    let definition = json!({"steps": [{"id": "held", "dataflow": program, "queue": "held"}]});
    let id = fleet.submit(&definition, &input).await;
    let task = take_held(channel, held, 1).await.remove(0);
    (id, task)
}

/// Deletes the held queue and closes the test's connection.
async fn release(connection: lapin::Connection, channel: &lapin::Channel, held: &str) {
    let _ = channel
        .queue_delete(held.into(), QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "test done".into()).await;
}

/// Takes `count` messages from the fleet's dead-letters queue (declared here, with the fleet's
/// own arguments, in case no process of the fleet has declared it yet).
async fn take_dead_letters(
    channel: &lapin::Channel,
    fleet: &TestFleet,
    count: usize,
) -> Vec<Delivery> {
    let dead = fleet.declare_queue(channel, "dead-letters").await;
    take(channel, &dead, count).await
}

/// Publishes `body`, persistent, to the fleet's queue `queue` (named without its namespace),
/// declared first: a worker still starting may not have declared its queue yet.
async fn publish(channel: &lapin::Channel, fleet: &TestFleet, queue: &str, body: &[u8]) {
    let name = fleet.declare_queue(channel, queue).await;
    channel
        .basic_publish(
            "".into(),
            name.as_str().into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
}

/// Publishes `body` to the fleet's default task queue, which its workers consume.
async fn pass_on(channel: &lapin::Channel, fleet: &TestFleet, body: &[u8]) {
    publish(channel, fleet, "tasks.default", body).await;
}

#[tokio::test]
async fn a_task_of_an_unknown_protocol_version_fails_the_step_as_invalid_task() {
    let fleet = TestFleet::start().await.unwrap();
    let (connection, channel) = broker().await;
    // The held queue keeps the task until the test rewrites it as version 2 and passes it on.
    let held = hold(&channel, &fleet).await;
    let (id, mut task) = held_run(&channel, &fleet, &held, ".", json!(1)).await;
    task["version"] = json!(2);
    pass_on(&channel, &fleet, &serde_json::to_vec(&task).unwrap()).await;

    let run = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = &run["steps"]["held"]["error"];
    assert_eq!(error["type"], "invalid_task", "{run:#}");
    assert_eq!(
        error["message"],
        "the worker cannot read this task: message has protocol version 2, \
         this build reads version 1"
    );
    release(connection, &channel, &held).await;
}

#[tokio::test]
async fn each_task_of_a_bundle_is_read_on_its_own() {
    let fleet = TestFleet::start().await.unwrap();
    let (connection, channel) = broker().await;
    let held = hold(&channel, &fleet).await;
    let definition = json!({"steps": [{"id": "held", "dataflow": ". * 2", "queue": "held"}]});
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(fleet.submit(&definition, &json!(n)).await);
    }
    let mut tasks = take_held(&channel, &held, 3).await;
    tasks.sort_by_key(|task| task["input"].as_i64());
    tasks[1]["version"] = json!(2);
    // Three tasks and, among them, a message that names no task, in one broker message.
    let bundle = json!([tasks[0], tasks[1], {"hello": "bundle"}, tasks[2]]);
    pass_on(&channel, &fleet, &serde_json::to_vec(&bundle).unwrap()).await;

    let first = fleet.wait_run(&ids[0], Duration::from_secs(60)).await;
    assert_eq!(first["output"], 0, "{first:#}");
    let unreadable = fleet.wait_run(&ids[1], Duration::from_secs(60)).await;
    assert_eq!(
        unreadable["steps"]["held"]["error"]["type"], "invalid_task",
        "{unreadable:#}"
    );
    let last = fleet.wait_run(&ids[2], Duration::from_secs(60)).await;
    assert_eq!(last["output"], 4, "{last:#}");
    let letters = take_dead_letters(&channel, &fleet, 1).await;
    assert_eq!(letters[0].data, br#"{"hello":"bundle"}"#);
    release(connection, &channel, &held).await;
}

#[tokio::test]
async fn messages_naming_no_task_are_dead_lettered_and_the_fleet_goes_on() {
    let fleet = TestFleet::start().await.unwrap();
    let (connection, channel) = broker().await;
    for (queue, body) in [
        ("tasks.default", b"not json at all".as_slice()),
        ("completions", br#"{"hello": "world"}"#.as_slice()),
    ] {
        publish(&channel, &fleet, queue, body).await;
    }
    let mut reasons: Vec<(String, String, String)> = take_dead_letters(&channel, &fleet, 2)
        .await
        .iter()
        .map(|delivery| {
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            let header = |name: &str| {
                headers
                    .inner()
                    .get(name)
                    .and_then(|value| value.as_long_string())
                    .map(ToString::to_string)
                    .unwrap_or_default()
            };
            (
                header("x-taskfleet-source"),
                String::from_utf8_lossy(&delivery.data).into_owned(),
                header("x-taskfleet-reason"),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, format!("{}.completions", fleet.namespace));
    assert_eq!(reasons[0].1, r#"{"hello": "world"}"#);
    assert_eq!(reasons[1].0, format!("{}.tasks.default", fleet.namespace));
    assert_eq!(reasons[1].1, "not json at all");
    assert!(!reasons[1].2.is_empty(), "{reasons:?}");
    // Nothing went round in a loop and both sides still serve.
    let run = fleet
        .run(
            &json!({"steps": [{"id": "echo", "python": "fleet_steps:echo"}]}),
            &json!("after"),
        )
        .await;
    assert_eq!(run["output"], "after", "{run:#}");
    let _ = connection.close(200, "test done".into()).await;
}

#[tokio::test]
async fn a_success_reported_after_its_run_was_cancelled_is_not_recorded() {
    let fleet = TestFleet::start().await.unwrap();
    let (connection, channel) = broker().await;
    // The held queue keeps the task while the run is cancelled; the test then reports the
    // task's success itself, as a worker that never heard of the cancellation would.
    let held = hold(&channel, &fleet).await;
    let (id, task) = held_run(&channel, &fleet, &held, ". * 2", json!(21)).await;
    assert_eq!(task["ends_run"], true, "{task}");
    let (status, body) = fleet
        .request("POST", &format!("/v1/runs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    // Any instant will do: the scheduler would record it as the attempt's times.
    let now = "2026-01-01T00:00:00Z";
    let completion = json!({
        "version": task["version"],
        "task_id": task["task_id"],
        "run_id": task["run_id"],
        "attempt": task["attempt"],
        "worker_id": "a worker that missed the cancellation",
        "outcome": {"status": "succeeded", "output": 42},
        "started_at": now,
        "finished_at": now,
        "ends_run": true,
    });
    publish(
        &channel,
        &fleet,
        "completions",
        &serde_json::to_vec(&completion).unwrap(),
    )
    .await;
    // Completions are recorded in the order they arrive: once a later run has finished, the
    // stray success has been handled.
    let later = fleet
        .run(
            &json!({"steps": [{"id": "a", "dataflow": ". + 1"}]}),
            &json!(1),
        )
        .await;
    assert_eq!(later["output"], 2, "{later:#}");
    let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(run["status"], "cancelled", "{run:#}");
    assert!(run["output"].is_null(), "{run:#}");
    assert!(run["steps"]["held"]["output"].is_null(), "{run:#}");
    assert_ne!(run["steps"]["held"]["status"], "succeeded", "{run:#}");
    release(connection, &channel, &held).await;
}
