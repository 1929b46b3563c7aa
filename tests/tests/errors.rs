//! Bad input gets the documented status and a message naming the problem, and no process
//! crashes on it.

#![allow(clippy::unwrap_used, missing_docs)]

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

async fn check(
    fleet: &TestFleet,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
    needles: &[&str],
) {
    let (got, answer) = fleet.request(method, path, body.as_ref()).await;
    assert_eq!(got, status, "{method} {path}: {answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(answer["error"]["code"].is_string(), "{answer}");
    for needle in needles {
        assert!(
            message.contains(needle),
            "{message:?} should contain {needle:?}"
        );
    }
}

fn run_of(steps: Value) -> Option<Value> {
    Some(json!({"definition": {"steps": steps}, "input": null}))
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_names_the_problem() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        scheduler_env: vec![("TASKFLEET_MAX_BODY_BYTES".into(), "65536".into())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();

    // 400: malformed JSON and unknown fields.
    let (status, answer) = fleet
        .request_raw("POST", "/v1/runs", b"{not json".to_vec())
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid")
    );
    // A body is an object: serde would read a struct from an array of its fields.
    for (path, body) in [
        (
            "/v1/runs",
            json!([null, {"steps": [{"id": "a", "dataflow": "."}]}]),
        ),
        ("/v1/tasks", json!(["a", null, null, "."])),
    ] {
        check(&fleet, "POST", path, Some(body), 400, &["JSON object"]).await;
    }
    check(
        &fleet,
        "PUT",
        "/v1/tenants/t",
        Some(json!([1, 1])),
        400,
        &["JSON object"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"definition": {"steps": []}, "colour": 1})),
        400,
        &["colour"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([{"id": "a", "dataflow": ".", "retries": 3}])),
        400,
        &["retries"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"input": 1})),
        400,
        &["workflow", "definition"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"python": "m:f", "nonsense": true})),
        400,
        &["nonsense"],
    )
    .await;
    check(&fleet, "GET", "/v1/runs?limit=abc", None, 400, &["limit"]).await;
    check(&fleet, "GET", "/v1/tasks?limit=0", None, 400, &["limit"]).await;
    check(&fleet, "GET", "/v1/tasks?status=done", None, 400, &["done"]).await;
    check(
        &fleet,
        "GET",
        "/v1/tasks?workflow=w",
        None,
        400,
        &["workflow"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/runs?status=sleeping",
        None,
        400,
        &["sleeping"],
    )
    .await;

    // 422: definitions that parse but cannot run, each naming the step and the problem.
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "a", "dataflow": ".", "after": ["b"]},
        {"id": "b", "dataflow": ".", "after": ["a"]}])),
        422,
        &["cycle", "a -> b -> a"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "a", "dataflow": ".", "after": ["ghost"]}])),
        422,
        &["\"a\"", "unknown step \"ghost\""],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "bad_jq", "dataflow": "map(."}])),
        422,
        &["\"bad_jq\"", "does not compile"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "bad_input", "dataflow": ".", "input": "nosuch(1)"}])),
        422,
        &["\"bad_input\"", "`input`"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "bad_ref", "python": "no colon here"}])),
        422,
        &["\"bad_ref\"", "module.path:function"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "two", "python": "m:f", "dataflow": "."}])),
        422,
        &["\"two\"", "exactly one"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([
        {"id": "a", "dataflow": "."}, {"id": "a", "dataflow": "."}])),
        422,
        &["more than one step"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([])),
        422,
        &["at least one step"],
    )
    .await;
    check(
        &fleet,
        "PUT",
        "/v1/workflows/w",
        Some(json!({"steps": [{"id": "x"}]})),
        422,
        &["\"x\"", "python"],
    )
    .await;
    check(
        &fleet,
        "PUT",
        "/v1/workflows/w",
        Some(json!({"name": "other", "steps": [{"id": "x", "dataflow": "."}]})),
        422,
        &["other"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": "{"})),
        422,
        &["does not compile"],
    )
    .await;
    // A job waits for no step: `after` may come empty, as in a step copied from a definition.
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": ".", "after": ["a"]})),
        400,
        &["after", "waits for no step"],
    )
    .await;
    // (An empty one passes: this job gets as far as its program, which does not compile.)
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": "{", "after": []})),
        422,
        &["does not compile"],
    )
    .await;
    let long = vec!["1"; 5000].join("+");
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": long})),
        422,
        &["bytes long"],
    )
    .await;
    let deep = format!("{}.{}", "(".repeat(200), ")".repeat(200));
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": deep})),
        422,
        &["nested deeper"],
    )
    .await;
    // PostgreSQL stores no NUL character: a definition holding one is refused, not a 500.
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"python_code": "def main(x):\n    return '\u{0}'\n"})),
        422,
        &["cannot be stored"],
    )
    .await;

    // 404: unknown workflows, versions, runs, jobs and routes.
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"workflow": "nope"})),
        404,
        &["nope"],
    )
    .await;
    check(&fleet, "GET", "/v1/workflows/nope", None, 404, &["nope"]).await;
    let (status, _) = fleet
        .request(
            "PUT",
            "/v1/workflows/w",
            Some(&json!({"steps": [{"id": "x", "dataflow": "."}]})),
        )
        .await;
    assert_eq!(status, 201);
    check(
        &fleet,
        "GET",
        "/v1/workflows/w?version=7",
        None,
        404,
        &["version 7"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"workflow": "w", "version": 9})),
        404,
        &["version 9"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/runs/0198c4b6-0000-7000-8000-000000000000",
        None,
        404,
        &["no run"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/runs/not-a-uuid",
        None,
        404,
        &["not-a-uuid"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/tasks/0198c4b6-0000-7000-8000-000000000000",
        None,
        404,
        &["no task"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/nothing-here",
        None,
        404,
        &["/v1/nothing-here"],
    )
    .await;

    // Inputs the durable store cannot hold are refused up front.
    check(&fleet, "POST", "/v1/runs", Some(json!({"definition": {"steps": [{"id": "a", "dataflow": "."}]}, "input": {"s": "a\u{0}b"}})), 400, &["NUL", "$.s"]).await;
    let mut deep = json!(1);
    for _ in 0..70 {
        deep = json!([deep]);
    }
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": ".", "input": deep})),
        400,
        &["nested deeper"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"workflow": "w", "idempotency_key": "a\u{0}"})),
        400,
        &["idempotency_key"],
    )
    .await;
    check(&fleet, "GET", "/v1/workflows/a%00b", None, 404, &[r"a\0b"]).await;
    check(
        &fleet,
        "GET",
        "/v1/runs/0198c4b6-0000-7000-8000-000000000000?wait=1e20",
        None,
        404,
        &["no run"],
    )
    .await;
    check(
        &fleet,
        "GET",
        "/v1/runs/0198c4b6-0000-7000-8000-000000000000?wait=-1",
        None,
        400,
        &["wait"],
    )
    .await;

    // A batch with one bad run writes none of them.
    let good = json!({"definition": {"steps": [{"id": "a", "dataflow": "."}]}, "input": 1});
    let bad = json!({"workflow": "no-such-workflow"});
    let (status, answer) = fleet
        .request(
            "POST",
            "/v1/runs:batch",
            Some(&json!({"runs": [good, bad]})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("runs[1]: "),
        "{answer}"
    );
    let (_, stats) = fleet.request("GET", "/v1/stats", None).await;
    assert_eq!(stats["runs"], json!({}), "{stats}");

    // 413: a body over the configured limit.
    let big = format!(
        "{{\"definition\": {{\"steps\": []}}, \"input\": \"{}\"}}",
        "x".repeat(70_000)
    );
    let (status, answer) = fleet
        .request_raw("POST", "/v1/runs", big.into_bytes())
        .await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("65536")
    );

    // Nothing crashed, and the API still works.
    assert!(fleet.scheduler_alive());
    let (status, _) = fleet.request("GET", "/readyz", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_missing_python_module_fails_the_step_with_an_import_error_naming_it() {
    let fleet = TestFleet::start().await.unwrap();
    let run = fleet
        .run(
            &json!({"steps": [{"id": "imp", "python": "no_such_module:run"}]}),
            &json!(null),
        )
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = &run["steps"]["imp"]["error"];
    assert!(error["type"].as_str().unwrap().contains("Error"), "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("no_such_module"),
        "{error}"
    );
}

#[tokio::test]
async fn a_jq_error_at_run_time_fails_the_step_as_dataflow_error() {
    let fleet = TestFleet::start().await.unwrap();
    let run = fleet
        .run(
            &json!({"steps": [{"id": "j", "dataflow": ".a.b"}]}),
            &json!(5),
        )
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["steps"]["j"]["error"]["type"], "dataflow_error");
    assert_eq!(run["error"]["step"], "j");
}

#[tokio::test]
async fn bodies_declared_as_other_than_json_get_415_and_inline_names_are_kept() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let body = json!({"definition": {"name": "nightly", "steps": [{"id": "a", "dataflow": "."}]}});
    let post = |content_type: Option<&str>| {
        let mut request = fleet
            .http
            .post(format!("{}/v1/runs", fleet.api))
            .body(body.to_string());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let response = post(Some(content_type)).await.unwrap();
        assert_eq!(response.status().as_u16(), 415, "{content_type}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "unsupported_media_type");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(content_type), "{message}");
    }
    // JSON, declared with parameters, or not declared at all, is read.
    for content_type in [Some("application/json; charset=utf-8"), None] {
        let response = post(content_type).await.unwrap();
        assert_eq!(response.status().as_u16(), 201, "{content_type:?}");
    }

    // A run of an inline definition is listed under the definition's name.
    let id = fleet.submit(&body["definition"], &json!(1)).await;
    let (_, run) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(run["workflow"], "nightly", "{run}");
    assert_eq!(run["version"], Value::Null, "{run}");
    let (_, listed) = fleet
        .request("GET", "/v1/runs?workflow=nightly", None)
        .await;
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(3), "{listed}");

    // A timeout beyond 7 days is refused.
    check(
        &fleet,
        "POST",
        "/v1/runs",
        run_of(json!([{"id": "a", "dataflow": ".", "timeout_s": 1e12}])),
        422,
        &["`timeout_s`", "at most 604800"],
    )
    .await;
}

#[tokio::test]
async fn inputs_and_outputs_over_the_value_limit_fail_naming_size_and_limit() {
    let limit = ("TASKFLEET_MAX_VALUE_BYTES".to_owned(), "1000".to_owned());
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![limit.clone()],
        worker_env: vec![limit],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // A run input (and a job input) over the limit is refused whole.
    let big = json!("x".repeat(2000));
    let size = big.to_string().len();
    check(
        &fleet,
        "POST",
        "/v1/runs",
        Some(json!({"definition": {"steps": [{"id": "a", "dataflow": "."}]}, "input": big})),
        413,
        &[&format!("input is {size} bytes"), "limit of 1000"],
    )
    .await;
    check(
        &fleet,
        "POST",
        "/v1/tasks",
        Some(json!({"dataflow": ".", "input": big})),
        413,
        &["limit of 1000"],
    )
    .await;
    // Step outputs over it fail their step with invalid_output, from Python and from jq.
    for step in [
        json!({"id": "big", "python_code": "def main(x):\n    return 'y' * 5000\n"}),
        json!({"id": "big", "dataflow": "[range(1000)]"}),
    ] {
        let run = fleet.run(&json!({"steps": [step]}), &json!(null)).await;
        assert_eq!(run["status"], "failed", "{run}");
        let error = &run["steps"]["big"]["error"];
        assert_eq!(error["type"], "invalid_output", "{run}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("bytes as JSON, more than the limit of 1000"),
            "{message}"
        );
    }
    // An input an `input` program makes over the limit fails its step with dataflow_error.
    let run = fleet
        .run(
            &json!({"steps": [{"id": "wide", "input": "[range(1000)]", "dataflow": "."}]}),
            &json!(null),
        )
        .await;
    assert_eq!(
        run["steps"]["wide"]["error"]["type"], "dataflow_error",
        "{run}"
    );
    let message = run["steps"]["wide"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("the step's input is"), "{message}");
    assert!(message.contains("more than the limit of 1000"), "{message}");
    // Items each under the limit whose joined output is over it fail their `for_each` step.
    let run = fleet
        .run(
            &json!({"steps": [{"id": "each", "for_each": "[range(20)]",
                               "dataflow": "\"y\" * 100"}]}),
            &json!(null),
        )
        .await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = &run["steps"]["each"]["error"];
    assert_eq!(error["type"], "invalid_output", "{run}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("joined output of the items"), "{message}");
    assert!(message.contains("limit of 1000 bytes"), "{message}");
    assert!(run["steps"]["each"]["output"].is_null(), "{run}");
    // At the limit, it goes through.
    let run = fleet
        .run(
            &json!({"steps": [{"id": "ok", "dataflow": "."}]}),
            &json!("z".repeat(990)),
        )
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
