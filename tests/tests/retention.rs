//! Retention against a real fleet: finished runs and jobs older than `TASKFLEET_RETENTION_S`
//! are deleted with their tasks; younger ones, and runs still going, are kept.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use taskfleet_tests::{FleetOptions, POSTGRES, TestFleet};

/// How many rows of `table` belong to the runs given.
fn rows_of(fleet: &TestFleet, table: &str, column: &str, runs: &[&str]) -> u64 {
    let ids = runs
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    let output = Command::new("psql")
        .args([
            "-Atq",
            &format!("{POSTGRES}/{}", fleet.database),
            "-c",
            &format!("SELECT count(*) FROM {table} WHERE {column} IN ({ids})"),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn finished_runs_past_their_retention_are_deleted_with_their_tasks_and_nothing_else() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![("TASKFLEET_RETENTION_S".to_owned(), "4".to_owned())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let chain = json!({"steps": [{"id": "a", "dataflow": ". + 1"},
                                 {"id": "b", "dataflow": ". * 2", "after": ["a"]}]});
    // Old: two runs and a job, finished now.
    let started = Instant::now();
    let mut old = Vec::new();
    for n in 0..2 {
        let run = fleet.run(&chain, &json!(n)).await;
        assert_eq!(run["status"], "succeeded", "{run}");
        old.push(run["id"].as_str().unwrap().to_owned());
    }
    let (status, job) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"dataflow": ".", "input": 1})),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();
    fleet.wait_job(&job_id, Duration::from_secs(30)).await;
    // Going: a run parked on a queue nobody consumes, which never finishes.
    let parked = fleet
        .submit(
            &json!({"steps": [{"id": "p", "dataflow": ".", "queue": "nobody"}]}),
            &json!(null),
        )
        .await;
    // Young: a run finished three seconds later.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let young = fleet.run(&chain, &json!(9)).await;
    let young = young["id"].as_str().unwrap().to_owned();
    let mut old_refs: Vec<&str> = old.iter().map(String::as_str).collect();
    old_refs.push(&job_id);
    assert_eq!(rows_of(&fleet, "tasks", "run_id", &old_refs), 5);

    // Six seconds in: the old ones are gone (past 4 s, swept every 0.4 s), the young one (3 s
    // old) and the parked one are kept.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(started.elapsed())).await;
    for id in &old {
        let (status, answer) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
        assert_eq!(status, 404, "{answer}");
    }
    let (status, _) = fleet
        .request("GET", &format!("/v1/tasks/{job_id}"), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(rows_of(&fleet, "runs", "id", &old_refs), 0);
    assert_eq!(rows_of(&fleet, "tasks", "run_id", &old_refs), 0);
    let (status, kept) = fleet
        .request("GET", &format!("/v1/runs/{young}"), None)
        .await;
    assert_eq!(status, 200, "{kept}");
    assert_eq!(kept["status"], "succeeded", "{kept}");

    // Later the young one goes too; the parked one stays while it runs.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = fleet
            .request("GET", &format!("/v1/runs/{young}"), None)
            .await;
        if status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "the young run was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, going) = fleet
        .request("GET", &format!("/v1/runs/{parked}"), None)
        .await;
    assert_eq!(status, 200, "{going}");
    assert_eq!(going["status"], "running", "{going}");
    let metrics = fleet.metrics_text().await;
    assert!(
        metrics.contains("taskfleet_runs_deleted_total 4"),
        "{metrics}"
    );
}
