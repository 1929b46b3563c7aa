//! jq programs that loop forever, allocate without bound or recurse too deep, sent through the
//! API: each fails its own step with `dataflow_error` naming the step and the limit, every
//! request is answered, the scheduler and the workers keep serving everyone else, and SIGTERM
//! still stops a scheduler that is running such a program.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

async fn fleet() -> TestFleet {
    let limits = |prefix: &str| {
        vec![
            (
                format!("TASKFLEET_{prefix}JQ_TIME_LIMIT_MS"),
                "3000".to_owned(),
            ),
            (format!("TASKFLEET_{prefix}JQ_MEMORY_MB"), "16".to_owned()),
        ]
    };
    TestFleet::start_with(FleetOptions {
        scheduler_env: limits("PLANNING_"),
        worker_env: limits(""),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

/// A run whose step `field` holds `program`, after a first step when `later` (so that the
/// program runs in the completion loop rather than at submission).
fn definition(field: &str, program: &str, later: bool) -> Value {
    let mut hostile = json!({"id": "hostile", "dataflow": "."});
    hostile[field] = json!(program);
    if later {
        hostile["after"] = json!(["first"]);
        json!({"steps": [{"id": "first", "dataflow": "."}, hostile]})
    } else {
        json!({"steps": [hostile]})
    }
}

/// Asserts that the run failed in step `hostile` with `dataflow_error` saying `needle`.
fn assert_failed_naming(run: &Value, needle: &str) {
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = &run["error"];
    assert_eq!(error["step"], "hostile", "{run:#}");
    assert_eq!(error["type"], "dataflow_error", "{run:#}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{message:?} should say {needle:?}"
    );
}

/// A well-behaved run of two steps whose second needs a sandbox (`map` is not quick).
fn ordinary() -> Value {
    json!({"steps": [
        {"id": "a", "dataflow": "[.[] | . + 1]"},
        {"id": "b", "dataflow": ".", "after": ["a"], "input": ".steps.a | map(. * 2)"}
    ]})
}

#[tokio::test]
async fn hostile_programs_fail_their_step_while_other_runs_finish() {
    let mut fleet = fleet().await;
    let time = "time limit of 3 s";
    let memory = "memory limit of 16 MiB";
    let cases = [
        ("input", "def f: f; f", false, time),
        ("input", "[range(1e12)] | length", false, memory),
        ("when", "last(range(1e15))", false, time),
        ("input", "last(range(1e15))", true, time),
        ("for_each", "[range(1e12)]", true, memory),
    ];
    let hostile: Vec<(String, &str)> =
        futures_util::future::join_all(cases.iter().map(|(field, program, later, needle)| {
            let fleet = &fleet;
            async move {
                let started = Instant::now();
                let id = fleet
                    .submit(&definition(field, program, *later), &json!(1))
                    .await;
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the request was answered after {:?}",
                    started.elapsed()
                );
                (id, *needle)
            }
        }))
        .await;
    // Ordinary runs submitted meanwhile all finish.
    let mut ordinary_ids = Vec::new();
    for n in 0..20 {
        ordinary_ids.push(fleet.submit(&ordinary(), &json!([n, 1])).await);
    }
    for (n, id) in ordinary_ids.iter().enumerate() {
        let run = fleet.wait_run(id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        assert_eq!(run["output"], json!([2 * (n + 1), 4]));
    }
    for (id, needle) in &hostile {
        let run = fleet.wait_run(id, Duration::from_secs(60)).await;
        assert_failed_naming(&run, needle);
    }
    let stack = fleet
        .run(&definition("input", "def f: 1 + f; f", true), &json!(1))
        .await;
    assert_eq!(stack["status"], "failed", "{stack:#}");
    assert!(fleet.scheduler_alive());

    // A worker survives a dataflow step that allocates without bound, and one that loops.
    let step = |program: &str| json!({"steps": [{"id": "hostile", "dataflow": program}]});
    let run = fleet.run(&step("[range(1e12)]"), &json!(1)).await;
    assert_failed_naming(&run, memory);
    let run = fleet
        .run(
            &json!({"steps": [{"id": "hostile", "dataflow": "def f: f; f", "timeout_s": 1}]}),
            &json!(1),
        )
        .await;
    assert_eq!(run["error"]["type"], "timeout", "{run:#}");
    assert_eq!(fleet.workers_alive(), 2);
    let run = fleet.run(&ordinary(), &json!([1])).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
}

#[tokio::test]
async fn sigterm_stops_a_scheduler_that_runs_a_looping_program() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        scheduler_env: vec![(
            "TASKFLEET_PLANNING_JQ_TIME_LIMIT_MS".to_owned(),
            "600000".to_owned(),
        )],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let request = fleet
        .http
        .post(format!("{}/v1/runs", fleet.api))
        .json(&json!({"definition": definition("input", "def f: f; f", false), "input": 1}));
    let pending = tokio::spawn(request.send());
    // The program is running once a sandbox process exists and the request is unanswered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!pending.is_finished(), "the request waits for its program");
    let pid = fleet.scheduler_pid().unwrap();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.scheduler_alive() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !fleet.scheduler_alive(),
        "the scheduler did not stop within 10 s of SIGTERM"
    );
    let answered = pending.await.unwrap();
    if let Ok(response) = answered {
        assert_eq!(response.status().as_u16(), 503);
    }
}
