//! W3C trace context and logs against a real fleet: a run or job joins its request's
//! `traceparent` trace (or a new one when it has none, or one that does not read), shows its
//! trace id in its view, hands it to Python steps as `ctx.trace_id`, and the JSON log lines of
//! the worker and the scheduler carry it.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A run whose Python step returns its `ctx.trace_id`.
fn trace_step() -> Value {
    json!({"steps": [{"id": "trace", "python_code": "def main(input, ctx):\n    return ctx.trace_id\n"}]})
}

/// Posts `body` to `path` with these `traceparent` headers and returns the answer's `id`.
async fn post(fleet: &TestFleet, path: &str, body: &Value, traceparents: &[&str]) -> Value {
    let mut request = fleet
        .http
        .post(format!("{}{path}", fleet.api))
        .header("content-type", "application/json")
        .body(body.to_string());
    for traceparent in traceparents {
        request = request.header("traceparent", *traceparent);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 201, "{answer}");
    answer
}

fn is_trace_id(value: &Value) -> bool {
    value.as_str().is_some_and(|id| {
        id.len() == 32
            && id
                .bytes()
                .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
            && id.bytes().any(|byte| byte != b'0')
    })
}

/// Waits until a line of the log file `path`, read as JSON, satisfies `found`; returns it.
async fn wait_log_line(path: &std::path::Path, found: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| found(line))
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no such line in {}:\n{text}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn runs_and_jobs_carry_their_trace_to_python_and_the_logs() {
    let json_logs = || vec![("TASKFLEET_LOG_FORMAT".to_owned(), "json".to_owned())];
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: json_logs(),
        worker_env: json_logs(),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let run = json!({"definition": trace_step(), "input": null});
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");

    // A run joins its request's trace, and its Python step sees it.
    let id = post(&fleet, "/v1/runs", &run, &[&traceparent]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "succeeded", "{view:#}");
    assert_eq!(view["trace_id"], TRACE_ID, "{view:#}");
    assert_eq!(view["output"], TRACE_ID, "{view:#}");

    // The worker's JSON line about the task carries the trace, the run and the task.
    let task_id = view["steps"]["trace"]["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = wait_log_line(&fleet.log_path("worker-0"), |line| {
        line["span"]["task_id"] == task_id.as_str()
    })
    .await;
    assert_eq!(line["span"]["trace_id"], TRACE_ID, "{line}");
    assert_eq!(line["span"]["run_id"], id.as_str(), "{line}");

    // The scheduler's access log names the route's template, never the path with its id.
    let line = wait_log_line(&fleet.log_path("scheduler"), |line| {
        line["target"] == "taskfleet_scheduler::access" && line["route"] == "/v1/runs/{id}"
    })
    .await;
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(line["duration_ms"].is_number(), "{line}");
    assert!(is_trace_id(&line["trace_id"]), "{line}");
    let line = wait_log_line(&fleet.log_path("scheduler"), |line| {
        line["target"] == "taskfleet_scheduler::access"
            && line["route"] == "/v1/runs"
            && line["trace_id"] == TRACE_ID
    })
    .await;
    assert_eq!(
        (&line["method"], &line["status"]),
        (&json!("POST"), &json!(201))
    );
    let text = std::fs::read_to_string(fleet.log_path("scheduler")).unwrap();
    assert!(!text.contains(&format!("\"route\":\"/v1/runs/{id}\"")));

    // Without a header, and with headers that do not read, a run starts a trace of its own.
    let zero_trace = "0".repeat(32);
    let invalid = [
        vec![],
        vec!["garbage".to_owned()],
        vec![format!("01-{TRACE_ID}-00f067aa0ba902b7-01")],
        vec![format!(
            "00-{}-00f067aa0ba902b7-01",
            TRACE_ID.to_uppercase()
        )],
        vec![format!("00-{zero_trace}-00f067aa0ba902b7-01")],
        vec![format!("00-{TRACE_ID}-0000000000000000-01")],
        vec![format!("00-{TRACE_ID}-00f067aa0ba902b7")],
        vec![format!("00-{TRACE_ID}-00f067aa0ba902b7-01-00")],
        vec![traceparent.clone(), traceparent.clone()],
    ];
    let mut seen = std::collections::HashSet::new();
    for headers in &invalid {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let id = post(&fleet, "/v1/runs", &run, &headers).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let view = fleet.wait_run(&id, Duration::from_secs(60)).await;
        assert_eq!(view["status"], "succeeded", "{headers:?}: {view:#}");
        assert!(is_trace_id(&view["trace_id"]), "{headers:?}: {view:#}");
        assert_ne!(view["trace_id"], TRACE_ID, "{headers:?}");
        assert_eq!(view["output"], view["trace_id"], "{headers:?}");
        assert!(
            seen.insert(view["trace_id"].to_string()),
            "a new trace each time"
        );
    }

    // A job joins its trace too; so does each run of a batch.
    let job = json!({"python_code": "def main(input, ctx):\n    return ctx.trace_id\n"});
    let id = post(&fleet, "/v1/tasks", &job, &[&traceparent]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = fleet.wait_job(&id, Duration::from_secs(60)).await;
    assert_eq!(
        (&view["trace_id"], &view["output"]),
        (&json!(TRACE_ID), &json!(TRACE_ID)),
        "{view:#}"
    );
    let id = post(&fleet, "/v1/tasks", &job, &[]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = fleet.wait_job(&id, Duration::from_secs(60)).await;
    assert!(is_trace_id(&view["trace_id"]), "{view:#}");
    assert_eq!(view["output"], view["trace_id"], "{view:#}");
    let batch = json!({"runs": [run.clone(), run]});
    let ids = post(&fleet, "/v1/runs:batch", &batch, &[&traceparent]).await["ids"].clone();
    for id in ids.as_array().unwrap() {
        let view = fleet
            .wait_run(id.as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(view["trace_id"], TRACE_ID, "{view:#}");
    }
}

#[tokio::test]
async fn the_openapi_document_shows_the_trace_id_and_the_header() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let (status, document) = fleet.request("GET", "/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    let run_view = &document["components"]["schemas"]["RunView"];
    assert!(
        run_view["properties"]["trace_id"].is_object(),
        "{run_view:#}"
    );
    assert!(
        run_view["required"]
            .as_array()
            .unwrap()
            .contains(&json!("trace_id")),
        "{run_view:#}"
    );
    let parameters = &document["paths"]["/v1/runs"]["post"]["parameters"];
    assert!(
        parameters
            .as_array()
            .unwrap()
            .iter()
            .any(|parameter| parameter["name"] == "traceparent" && parameter["in"] == "header"),
        "{parameters:#}"
    );
}
