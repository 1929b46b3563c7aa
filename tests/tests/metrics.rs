//! Prometheus metrics against a real fleet: the scheduler's `/metrics` and a worker's (at
//! `TASKFLEET_METRICS_ADDR`) count what the fleet did, name every family, and pass
//! `promtool check metrics` where promtool is installed.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::collections::HashMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use taskfleet_tests::{FleetOptions, TestFleet, free_port};

/// The samples of an exposition, by name and labels as written (`name{a="b"}`).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include every `label="value"` given, or
/// the sum of them if several match.
fn value(samples: &HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            metric == name
                && labels
                    .iter()
                    .all(|(label, value)| rest.contains(&format!("{label}=\"{value}\"")))
        })
        .map(|(_, value)| value)
        .sum()
}

/// Checks an exposition with `promtool check metrics`, when promtool is installed (`.ci/run`
/// installs it, and sets `TASKFLEET_REQUIRE_PROMTOOL` so that its absence fails the test).
fn promtool_accepts(text: &str, what: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        assert!(
            std::env::var_os("TASKFLEET_REQUIRE_PROMTOOL").is_none(),
            "promtool is not installed (scripts/services.sh installs it)"
        );
        eprintln!("promtool is not installed; the {what} exposition is not linted");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics refused the {what} exposition: {}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn scrape(fleet: &TestFleet, url: &str) -> String {
    let response = fleet.http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

#[tokio::test]
async fn the_scheduler_and_the_workers_count_what_the_fleet_did() {
    let port = free_port();
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env: vec![(
            "TASKFLEET_METRICS_ADDR".to_owned(),
            format!("127.0.0.1:{port}"),
        )],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let worker = format!("http://127.0.0.1:{port}");
    // The worker serves its metrics once its executors are up.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while fleet
        .http
        .get(format!("{worker}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker serves no metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Before any work, every family is there.
    let scheduler = scrape(&fleet, &format!("{}/metrics", fleet.api)).await;
    for family in [
        "taskfleet_runs_submitted_total",
        "taskfleet_runs_finished_total",
        "taskfleet_tasks_dispatched_total",
        "taskfleet_tasks_completed_total",
        "taskfleet_queue_ready_messages",
        "taskfleet_queue_consumers",
        "taskfleet_queue_oldest_task_age_seconds",
        "taskfleet_outbox_pending",
        "taskfleet_dead_letter_messages",
        "taskfleet_dead_letters_total",
        "taskfleet_dead_letters_purged_total",
    ] {
        assert!(
            scheduler.contains(&format!("# TYPE {family} ")),
            "{family} is missing:\n{scheduler}"
        );
    }
    let idle = scrape(&fleet, &format!("{worker}/metrics")).await;
    for family in [
        "taskfleet_worker_tasks_total",
        "taskfleet_worker_tasks_in_flight",
        "taskfleet_python_executors",
        "taskfleet_python_executor_restarts_total",
    ] {
        assert!(
            idle.contains(&format!("# TYPE {family} ")),
            "{family} is missing:\n{idle}"
        );
    }
    let health = fleet
        .http
        .get(format!("{worker}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // Three runs succeed, one fails, one is cancelled, two jobs succeed.
    for n in 0..3 {
        let run = fleet
            .run(
                &json!({"steps": [{"id": "a", "dataflow": ". + 1"},
                                  {"id": "b", "python_code": "def main(x):\n    return x\n", "after": ["a"]}]}),
                &json!(n),
            )
            .await;
        assert_eq!(run["status"], "succeeded", "{run}");
    }
    let run = fleet
        .run(
            &json!({"steps": [{"id": "boom", "dataflow": "error(\"no\")"}]}),
            &json!(null),
        )
        .await;
    assert_eq!(run["status"], "failed", "{run}");
    // A step parked on a queue nobody consumes stays in its backlog.
    let parked = fleet
        .submit(
            &json!({"steps": [{"id": "p", "dataflow": ".", "queue": "nobody"}]}),
            &json!(null),
        )
        .await;
    for n in 0..2 {
        let (status, job) = fleet
            .request(
                "POST",
                "/v1/tasks",
                Some(&json!({"dataflow": ". * 2", "input": n})),
            )
            .await;
        assert_eq!(status, 201, "{job}");
        let job = fleet
            .wait_job(job["id"].as_str().unwrap(), Duration::from_secs(30))
            .await;
        assert_eq!(job["status"], "succeeded", "{job}");
    }
    // A 404 is counted under no route of its own.
    let (status, _) = fleet.request("GET", "/v1/nowhere", None).await;
    assert_eq!(status, 404);

    // The scheduler refreshes its gauges at most every two seconds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let text = scrape(&fleet, &format!("{}/metrics", fleet.api)).await;
    let backlog = samples(&text);
    assert_eq!(
        value(
            &backlog,
            "taskfleet_queue_ready_messages",
            &[("queue", "nobody")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &backlog,
            "taskfleet_queue_consumers",
            &[("queue", "nobody")]
        ),
        0.0,
        "{text}"
    );
    assert!(
        value(
            &backlog,
            "taskfleet_queue_oldest_task_age_seconds",
            &[("queue", "nobody")]
        ) >= 2.0,
        "{text}"
    );
    let (status, _) = fleet
        .request("POST", &format!("/v1/runs/{parked}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let text = scrape(&fleet, &format!("{}/metrics", fleet.api)).await;
    promtool_accepts(&text, "scheduler's");
    let scheduler = samples(&text);
    let submitted = |kind| {
        value(
            &scheduler,
            "taskfleet_runs_submitted_total",
            &[("kind", kind)],
        )
    };
    assert_eq!(submitted("workflow"), 5.0, "{text}");
    assert_eq!(submitted("job"), 2.0, "{text}");
    let finished = |status| {
        value(
            &scheduler,
            "taskfleet_runs_finished_total",
            &[("status", status)],
        )
    };
    assert_eq!(finished("succeeded"), 5.0, "{text}");
    assert_eq!(finished("failed"), 1.0, "{text}");
    assert_eq!(finished("cancelled"), 1.0, "{text}");
    assert_eq!(
        value(&scheduler, "taskfleet_run_duration_seconds_count", &[]),
        7.0,
        "{text}"
    );
    // 3 runs of two steps, one failed step, two jobs, and the parked step.
    let dispatched = value(&scheduler, "taskfleet_tasks_dispatched_total", &[]);
    assert_eq!(dispatched, 10.0, "{text}");
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_tasks_dispatched_total",
            &[("queue", "nobody")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_tasks_completed_total",
            &[("status", "succeeded")]
        ),
        8.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_tasks_completed_total",
            &[("status", "failed")]
        ),
        1.0,
        "{text}"
    );
    // Its task is cancelled: the queue's backlog has no age any more, though its message
    // stays in the broker until someone consumes it.
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_queue_oldest_task_age_seconds",
            &[("queue", "nobody")]
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_queue_consumers",
            &[("queue", "default")]
        ),
        1.0,
        "{text}"
    );
    assert!(
        value(
            &scheduler,
            "taskfleet_http_requests_total",
            &[("route", "/v1/runs/{id}"), ("status", "200")]
        ) >= 4.0,
        "{text}"
    );
    assert_eq!(
        value(
            &scheduler,
            "taskfleet_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0,
        "{text}"
    );
    assert!(!text.contains(&parked), "a run id is in a label:\n{text}");

    let text = scrape(&fleet, &format!("{worker}/metrics")).await;
    promtool_accepts(&text, "worker's");
    let worker = samples(&text);
    let ran = |kind, status| {
        value(
            &worker,
            "taskfleet_worker_tasks_total",
            &[("queue", "default"), ("kind", kind), ("status", status)],
        )
    };
    assert_eq!(ran("dataflow", "succeeded"), 5.0, "{text}");
    assert_eq!(ran("python_code", "succeeded"), 3.0, "{text}");
    assert_eq!(ran("dataflow", "failed"), 1.0, "{text}");
    assert_eq!(
        value(
            &worker,
            "taskfleet_worker_task_duration_seconds_count",
            &[("kind", "python_code")]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        value(&worker, "taskfleet_worker_tasks_in_flight", &[]),
        0.0,
        "{text}"
    );
    assert!(
        value(&worker, "taskfleet_python_executors", &[("state", "idle")]) >= 1.0,
        "{text}"
    );
}
