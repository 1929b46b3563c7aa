//! Spans exported over OTLP/HTTP against a real fleet and a receiver this test runs: a run's
//! trace holds the request that started it, the run, each step's attempt and each executor
//! call, parented across the scheduler and the worker; a fleet whose collector is down runs as
//! usual.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use serde_json::json;
use taskfleet_tests::{FleetOptions, TestFleet};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: HashMap<String, String>,
    /// The status code: 0 unset, 1 ok, 2 error.
    status: i32,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn text(value: Option<&any_value::Value>) -> String {
    match value {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP (protobuf) receiver on a port of its own; it keeps every span posted to it.
async fn start_receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| async move {
            let request = ExportTraceServiceRequest::decode(body).unwrap();
            let mut kept = kept.lock().unwrap();
            for resource_spans in request.resource_spans {
                let service = resource_spans
                    .resource
                    .iter()
                    .flat_map(|resource| &resource.attributes)
                    .find(|attribute| attribute.key == "service.name")
                    .map(|attribute| text(attribute.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for span in resource_spans
                    .scope_spans
                    .into_iter()
                    .flat_map(|scope| scope.spans)
                {
                    kept.push(Received {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .iter()
                            .map(|attribute| {
                                let value = attribute.value.as_ref().and_then(|v| v.value.as_ref());
                                (attribute.key.clone(), text(value))
                            })
                            .collect(),
                        status: span.status.map_or(0, |status| status.code),
                    });
                }
            }
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), spans)
}

/// The environment that sends a process's spans to `endpoint` within a tenth of a second.
fn exporting_to(endpoint: &str) -> Vec<(String, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            endpoint.to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]
}

/// Starts a run of `definition` in trace `trace_id` and returns its id.
async fn start_in_trace(
    fleet: &TestFleet,
    definition: serde_json::Value,
    trace_id: &str,
) -> String {
    let response = fleet
        .http
        .post(format!("{}/v1/runs", fleet.api))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{trace_id}-{CALLER_SPAN}-01"))
        .body(json!({"definition": definition, "input": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Waits until the spans received satisfy `complete`, and returns them.
async fn wait_spans(
    spans: &Mutex<Vec<Received>>,
    complete: impl Fn(&[Received]) -> bool,
) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let received = spans.lock().unwrap().clone();
        if complete(&received) {
            return received;
        }
        assert!(Instant::now() < deadline, "spans received: {received:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_run_s_trace_holds_its_request_run_attempts_and_executor_calls() {
    let (endpoint, spans) = start_receiver().await;
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: exporting_to(&endpoint),
        worker_env: exporting_to(&endpoint),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let run = json!({
        "definition": {"steps": [
            {"id": "double", "python_code": "def main(input, ctx):\n    return input * 2\n"},
            {"id": "next", "dataflow": ". + 1", "after": ["double"]},
        ]},
        "input": 20,
    });
    let response = fleet
        .http
        .post(format!("{}/v1/runs", fleet.api))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .body(run.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    let id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = fleet.wait_run(&id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "succeeded", "{view:#}");
    assert_eq!(view["trace_id"], TRACE_ID, "{view:#}");

    let of_trace = |received: &[Received], name: &str| -> Vec<Received> {
        received
            .iter()
            .filter(|span| span.trace_id == TRACE_ID && span.name == name)
            .cloned()
            .collect()
    };
    let received = wait_spans(&spans, |received| {
        of_trace(received, "POST /v1/runs").len() == 1
            && of_trace(received, "run").len() == 1
            && of_trace(received, "step").len() == 2
            && of_trace(received, "executor call").len() == 2
    })
    .await;

    // The request's span is a child of the caller's, served by the scheduler.
    let request = &of_trace(&received, "POST /v1/runs")[0];
    assert_eq!(request.service, "taskfleet-scheduler", "{request:?}");
    assert_eq!(request.parent_span_id, CALLER_SPAN, "{request:?}");
    assert_eq!(request.attributes["http.route"], "/v1/runs", "{request:?}");
    assert_eq!(request.attributes["http.response.status_code"], "201");

    // The run's span is the request's child, exported by the scheduler when the run ended.
    let run = &of_trace(&received, "run")[0];
    assert_eq!(run.service, "taskfleet-scheduler", "{run:?}");
    assert_eq!(run.parent_span_id, request.span_id, "{run:?}");
    assert_eq!(run.attributes["taskfleet.run.id"], id, "{run:?}");
    assert_eq!(run.attributes["taskfleet.run.status"], "succeeded");

    // Each step's attempt is the run's child, exported by the worker; each executor call is
    // its attempt's child.
    let steps = of_trace(&received, "step");
    let calls = of_trace(&received, "executor call");
    for (step_id, kind) in [("double", "python_code"), ("next", "dataflow")] {
        let step = steps
            .iter()
            .find(|span| span.attributes["taskfleet.step.id"] == step_id)
            .unwrap_or_else(|| panic!("no span of step {step_id}: {steps:#?}"));
        assert_eq!(step.service, "taskfleet-worker", "{step:?}");
        assert_eq!(step.parent_span_id, run.span_id, "{step:?}");
        assert_eq!(step.attributes["taskfleet.run.id"], id, "{step:?}");
        assert_eq!(step.attributes["taskfleet.step.kind"], kind, "{step:?}");
        assert_eq!(step.attributes["taskfleet.attempt"], "1", "{step:?}");
        assert_eq!(step.status, 0, "{step:?}");
        assert!(
            calls.iter().any(|call| call.parent_span_id == step.span_id),
            "no executor call under {step:?}: {calls:#?}"
        );
    }
    // Span ids are unique within the trace.
    let ids: std::collections::HashSet<&str> = received
        .iter()
        .filter(|span| span.trace_id == TRACE_ID)
        .map(|span| span.span_id.as_str())
        .collect();
    assert_eq!(ids.len(), 6, "{received:#?}");

    // A run of one step ends through the completion loop's shortcut; a cancelled run ends
    // through the API: each has its span, with how it ended.
    let single_trace = "0af7651916cd43dd8448eb211c80319c";
    let single = start_in_trace(
        &fleet,
        json!({"steps": [{"id": "one", "dataflow": ". + 1"}]}),
        single_trace,
    )
    .await;
    assert_eq!(
        fleet.wait_run(&single, Duration::from_secs(60)).await["status"],
        "succeeded"
    );
    let cancelled_trace = "1bf92f3577b34da6a3ce929d0e0e4737";
    let cancelled = start_in_trace(
        &fleet,
        json!({"steps": [{"id": "slow", "python_code": "import time\ndef main(_):\n    time.sleep(30)\n"}]}),
        cancelled_trace,
    )
    .await;
    let (status, answer) = fleet
        .request("POST", &format!("/v1/runs/{cancelled}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    let received = wait_spans(&spans, |received| {
        [single_trace, cancelled_trace].iter().all(|trace| {
            received
                .iter()
                .any(|span| span.trace_id == *trace && span.name == "run")
        }) && received
            .iter()
            .any(|span| span.trace_id == single_trace && span.name == "step")
    })
    .await;
    let run_of = |trace: &str| {
        received
            .iter()
            .find(|span| span.trace_id == trace && span.name == "run")
            .unwrap()
            .clone()
    };
    let single_run = run_of(single_trace);
    assert_eq!(single_run.attributes["taskfleet.run.status"], "succeeded");
    assert_eq!(single_run.status, 0, "{single_run:?}");
    let cancelled_run = run_of(cancelled_trace);
    assert_eq!(
        cancelled_run.attributes["taskfleet.run.status"],
        "cancelled"
    );
    assert_eq!(cancelled_run.status, 2, "{cancelled_run:?}");

    // Probes and scrapes make no span.
    assert!(
        received
            .iter()
            .all(|span| !span.name.contains("/healthz") && !span.name.contains("/readyz")),
        "{received:#?}"
    );

    // A failing step and its run are marked as errors.
    let failing = json!({"python_code": "def main(input, ctx):\n    raise ValueError('no')\n"});
    let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&failing)).await;
    assert_eq!(status, 201, "{answer}");
    let job_id = answer["id"].as_str().unwrap().to_owned();
    let view = fleet.wait_job(&job_id, Duration::from_secs(60)).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let trace_id = view["trace_id"].as_str().unwrap().to_owned();
    let received = wait_spans(&spans, |received| {
        ["job", "step"].iter().all(|name| {
            received
                .iter()
                .any(|span| span.trace_id == trace_id && span.name == *name)
        })
    })
    .await;
    for span in received.iter().filter(|span| span.trace_id == trace_id) {
        if span.name == "job" || span.name == "step" {
            assert_eq!(span.status, 2, "{span:?}");
        }
    }
}

#[tokio::test]
async fn a_worker_stopped_with_sigterm_sends_its_last_spans() {
    let (endpoint, spans) = start_receiver().await;
    // The batch is sent only every 5 s (the default): the spans of the job below are still
    // queued when the worker is told to stop.
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env: vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint)],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let job = json!({"dataflow": ". + 1", "input": 1});
    let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(status, 201, "{answer}");
    let view = fleet
        .wait_job(answer["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    let trace_id = view["trace_id"].as_str().unwrap().to_owned();
    fleet
        .terminate_oldest_worker(Duration::from_secs(20))
        .await
        .unwrap();
    let received = spans.lock().unwrap().clone();
    assert!(
        received
            .iter()
            .any(|span| span.trace_id == trace_id && span.name == "step"),
        "{received:#?}"
    );
}

#[tokio::test]
async fn python_steps_do_not_see_the_exporter_s_settings() {
    let (endpoint, _spans) = start_receiver().await;
    let mut worker_env = exporting_to(&endpoint);
    worker_env.push((
        "OTEL_EXPORTER_OTLP_HEADERS".to_owned(),
        "authorization=Bearer secret".to_owned(),
    ));
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let job = json!({"python_code": "import os\ndef main(_):\n    return sorted(k for k in os.environ if k.startswith('OTEL_EXPORTER_OTLP_'))\n"});
    let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(status, 201, "{answer}");
    let view = fleet
        .wait_job(answer["id"].as_str().unwrap(), Duration::from_secs(60))
        .await;
    assert_eq!(view["output"], json!([]), "{view:#}");
}

#[tokio::test]
async fn a_fleet_whose_collector_is_down_runs_as_usual() {
    // Nothing listens on this port: every export fails, and spans are dropped.
    let endpoint = format!("http://127.0.0.1:{}", taskfleet_tests::free_port());
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: exporting_to(&endpoint),
        worker_env: exporting_to(&endpoint),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let runs = json!({"runs": (0..50).map(|input| json!({
        "definition": {"steps": [{"id": "double", "dataflow": ". * 2"}]},
        "input": input,
    })).collect::<Vec<_>>()});
    let (status, answer) = fleet.request("POST", "/v1/runs:batch", Some(&runs)).await;
    assert_eq!(status, 201, "{answer}");
    for (input, id) in answer["ids"].as_array().unwrap().iter().enumerate() {
        let view = fleet
            .wait_run(id.as_str().unwrap(), Duration::from_secs(60))
            .await;
        assert_eq!(view["output"], json!(input * 2), "{view:#}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}
