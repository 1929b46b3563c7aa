//! Workflows run end to end on a real fleet: chains, diamonds, registered workflows, jobs,
//! Python errors, long polls and listings.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use serde_json::json;
use taskfleet_tests::{POSTGRES, TestFleet};

#[tokio::test]
async fn chain_of_jq_and_python_steps_produces_the_last_output() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "clean", "dataflow": "map(select(.qty > 0))"},
        {"id": "tax", "python": "fleet_steps:add_tax", "after": ["clean"]},
        {"id": "total", "dataflow": "{total: (.orders | map(.price) | add), attempt, step}", "after": ["tax"]}
    ]});
    let input = json!([{"qty": 2}, {"qty": 0}, {"qty": 4}]);
    let run = fleet.run(&definition, &input).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["output"],
        json!({"total": 9.0, "attempt": 1, "step": "tax"})
    );
    assert_eq!(run["input"], input);
    assert_eq!(
        run["steps"]["clean"]["output"],
        json!([{"qty": 2}, {"qty": 4}])
    );
    assert_eq!(run["steps"]["tax"]["output"]["run_id"], run["id"]);
    for step in ["clean", "tax", "total"] {
        assert_eq!(run["steps"][step]["status"], "succeeded");
        assert_eq!(run["steps"][step]["attempts"], 1);
        assert!(run["steps"][step]["started_at"].is_string());
    }
    assert!(run["finished_at"].is_string());
}

#[tokio::test]
async fn diamond_waits_for_every_dependency_and_input_programs_see_all_outputs() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "start", "dataflow": ". + 1"},
        {"id": "left", "python": "fleet_steps:double", "after": ["start"]},
        {"id": "right", "dataflow": ". * 10", "after": ["start"]},
        {"id": "join", "python": "fleet_steps:merge", "after": ["left", "right"]},
        {"id": "sum", "dataflow": ".", "after": ["join"],
         "input": "{keys: .steps.join, total: (.steps.left + .steps.right), original: .input}"}
    ]});
    let run = fleet.run(&definition, &json!(4)).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"]["left"]["output"], 10);
    assert_eq!(run["steps"]["right"]["output"], 50);
    assert_eq!(run["steps"]["join"]["output"], json!(["left", "right"]));
    assert_eq!(
        run["output"],
        json!({"keys": ["left", "right"], "total": 60, "original": 4})
    );
}

#[tokio::test]
async fn registered_workflow_runs_by_name_and_versions_change_with_the_definition() {
    let fleet = TestFleet::start().await.unwrap();
    let v1 = json!({"steps": [{"id": "a", "dataflow": ". + 1"}]});
    let (status, body) = fleet.request("PUT", "/v1/workflows/inc", Some(&v1)).await;
    assert_eq!(
        (status, body.clone()),
        (201, json!({"name": "inc", "version": 1})),
        "{body}"
    );
    let (status, body) = fleet.request("PUT", "/v1/workflows/inc", Some(&v1)).await;
    assert_eq!((status, body), (200, json!({"name": "inc", "version": 1})));
    let v2 = json!({"steps": [{"id": "a", "dataflow": ". + 2"}]});
    let (status, body) = fleet.request("PUT", "/v1/workflows/inc", Some(&v2)).await;
    assert_eq!((status, body), (201, json!({"name": "inc", "version": 2})));

    let (status, body) = fleet
        .request(
            "POST",
            "/v1/runs",
            Some(&json!({"workflow": "inc", "input": 1})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let run = fleet
        .wait_run(body["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(
        (run["output"].clone(), run["version"].clone()),
        (json!(3), json!(2))
    );
    assert_eq!(run["workflow"], "inc");

    let (status, body) = fleet
        .request(
            "POST",
            "/v1/runs",
            Some(&json!({"workflow": "inc", "version": 1, "input": 1})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let run = fleet
        .wait_run(body["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(run["output"], 2);

    let (status, body) = fleet.request("GET", "/v1/workflows", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["workflows"][0]["name"], "inc");
    assert_eq!(body["workflows"][0]["version"], 2);
    let (status, body) = fleet
        .request("GET", "/v1/workflows/inc?version=1", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["definition"]["steps"][0]["dataflow"], ". + 1");
}

#[tokio::test]
async fn a_single_job_runs_and_reads_back_through_the_tasks_api() {
    let fleet = TestFleet::start().await.unwrap();
    let (status, body) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"python": "fleet_steps:double", "input": 21})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap();
    let job = fleet.wait_job(id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["output"], 42);
    // A job is not a workflow run.
    let (status, _) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_python_exception_fails_the_run_naming_the_step_with_type_and_traceback() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [
        {"id": "ok", "dataflow": "."},
        {"id": "boom", "python": "fleet_steps:fail", "after": ["ok"]},
        {"id": "never", "dataflow": ".", "after": ["boom"]}
    ]});
    let run = fleet.run(&definition, &json!({"x": 1})).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "boom");
    assert_eq!(run["error"]["type"], "ValueError");
    let message = run["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("boom") && message.contains("not acceptable"),
        "{message}"
    );
    let step = &run["steps"]["boom"];
    assert_eq!(step["status"], "failed");
    assert_eq!(step["error"]["type"], "ValueError");
    assert_eq!(step["error"]["message"], "the input was not acceptable");
    let traceback = step["error"]["traceback"].as_str().unwrap();
    assert!(
        traceback.contains("fleet_steps.py") && traceback.contains("line"),
        "{traceback}"
    );
    assert_eq!(run["steps"]["never"]["status"], "pending");
}

#[tokio::test]
async fn when_false_skips_a_step_and_its_dependents() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"output": "last", "steps": [
        {"id": "a", "dataflow": "."},
        {"id": "maybe", "dataflow": "\"ran\"", "after": ["a"], "when": ".go"},
        {"id": "after_maybe", "dataflow": "\"ran\"", "after": ["maybe"]},
        {"id": "last", "dataflow": "[.maybe, .a.go]", "after": ["a", "maybe"]}
    ]});
    let run = fleet.run(&definition, &json!({"go": false})).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"]["maybe"]["status"], "skipped");
    assert_eq!(run["steps"]["after_maybe"]["status"], "skipped");
    assert_eq!(run["output"], json!([null, false]));
    let run = fleet.run(&definition, &json!({"go": true})).await;
    assert_eq!(run["output"], json!(["ran", true]));
}

#[tokio::test]
async fn a_long_poll_answered_as_its_run_finishes_shows_what_a_later_read_shows() {
    let fleet = TestFleet::start().await.unwrap();
    // The step prints, so its view carries logs, and sleeps, so the poll waits for its end.
    let code = "import time\n\ndef main(input):\n    print('working on', input)\n    time.sleep(0.5)\n    return {'got': input}\n";
    let workflow = json!({"steps": [{"id": "s", "python_code": code}]});
    let id = fleet.submit(&workflow, &json!({"n": 1})).await;
    let (status, waited) = fleet
        .request("GET", &format!("/v1/runs/{id}?wait=20"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(waited["status"], "succeeded", "{waited:#}");
    assert_eq!(waited["output"], json!({"got": {"n": 1}}));
    assert!(
        waited["steps"]["s"]["logs"]
            .as_str()
            .is_some_and(|logs| logs.contains("working on")),
        "{waited:#}"
    );
    let (_, read) = fleet.request("GET", &format!("/v1/runs/{id}"), None).await;
    assert_eq!(waited, read);

    let (status, body) = fleet
        .request(
            "POST",
            "/v1/tasks",
            Some(&json!({"python_code": code, "input": 2})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap();
    let (status, waited) = fleet
        .request("GET", &format!("/v1/tasks/{id}?wait=20"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(waited["status"], "succeeded", "{waited:#}");
    let (_, read) = fleet.request("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(waited, read);
    let (status, _) = fleet
        .request("GET", &format!("/v1/runs/{id}?wait=1"), None)
        .await;
    assert_eq!(status, 404, "a job is not a workflow run");
}

/// Returns how many sequential scans of `runs` and of `tasks` the fleet's database counts.
async fn sequential_scans(fleet: &TestFleet) -> Vec<(String, i64)> {
    // A backend that reported its counters less than a second ago reports the next ones once
    // idle for 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let pool = sqlx::PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap();
    let scans = sqlx::query_as(
        "SELECT relname::text, seq_scan FROM pg_stat_user_tables
         WHERE relname IN ('runs', 'tasks') ORDER BY relname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    scans
}

#[tokio::test]
async fn runs_and_tasks_are_read_through_their_indexes_however_young_the_tables() {
    let fleet = TestFleet::start().await.unwrap();
    // Applying the schema scans the tables once per index it makes: only what follows counts.
    let before = sequential_scans(&fleet).await;
    let quick = json!({"steps": [{"id": "q", "dataflow": "."}]});
    let chain = json!({"steps": [
        {"id": "a", "dataflow": ". + 1"},
        {"id": "b", "dataflow": ". * 2", "after": ["a"]}
    ]});
    let runs = 150;
    for n in 0..runs {
        let definition = if n % 3 == 0 { &chain } else { &quick };
        let run = fleet.run(definition, &json!(n)).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
    }
    let after = sequential_scans(&fleet).await;
    let scans: Vec<(String, i64)> = after
        .into_iter()
        .zip(before)
        .map(|((table, after), (_, before))| (table, after - before))
        .collect();
    // Statistics exist only once the tables are analysed, which has not happened yet (or
    // never does, where autovacuum is off); without them a plan may scan a small table whole
    // and keep doing so as it grows.
    for (table, count) in &scans {
        assert!(
            *count < 3,
            "{count} sequential scans of {table} for {runs} runs: {scans:?}"
        );
    }
}

#[tokio::test]
async fn long_poll_returns_when_the_run_finishes_and_listing_pages_newest_first() {
    let fleet = TestFleet::start().await.unwrap();
    let slow = json!({"steps": [{"id": "s", "python": "fleet_steps:slow"}]});
    let id = fleet.submit(&slow, &json!({"sleep": 1.0})).await;
    let started = std::time::Instant::now();
    let (status, run) = fleet
        .request("GET", &format!("/v1/runs/{id}?wait=20"), None)
        .await;
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(
        waited < Duration::from_secs(10),
        "the long poll took {waited:?}"
    );

    let quick = json!({"steps": [{"id": "q", "dataflow": "."}]});
    let mut ids = vec![id];
    for n in 0..4 {
        ids.push(fleet.submit(&quick, &json!(n)).await);
    }
    ids.reverse();
    let (status, page) = fleet.request("GET", "/v1/runs?limit=3", None).await;
    assert_eq!(status, 200, "{page}");
    let first: Vec<&str> = page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        first,
        ids[..3].iter().map(String::as_str).collect::<Vec<_>>()
    );
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, page) = fleet
        .request("GET", &format!("/v1/runs?limit=3&cursor={cursor}"), None)
        .await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 2);
    assert!(page["next_cursor"].is_null());

    for id in &ids {
        fleet.wait_run(id, Duration::from_secs(30)).await;
    }
    let (status, stats) = fleet.request("GET", "/v1/stats", None).await;
    assert_eq!(status, 200);
    assert_eq!(stats["runs"]["succeeded"], 5, "{stats}");
    let (_, page) = fleet
        .request("GET", "/v1/runs?status=succeeded&limit=10", None)
        .await;
    assert_eq!(page["runs"].as_array().unwrap().len(), 5);
    let (status, _) = fleet
        .request("PUT", "/v1/workflows/quick", Some(&quick))
        .await;
    assert_eq!(status, 201);
    let (_, body) = fleet
        .request(
            "POST",
            "/v1/runs",
            Some(&json!({"workflow": "quick", "input": 1})),
        )
        .await;
    fleet
        .wait_run(body["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    let (_, page) = fleet.request("GET", "/v1/runs?workflow=quick", None).await;
    let listed = page["runs"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{page}");
    assert_eq!(listed[0]["id"], body["id"]);
}

#[tokio::test]
async fn a_batch_of_runs_and_a_repeated_idempotency_key_give_one_run() {
    let fleet = TestFleet::start().await.unwrap();
    let definition = json!({"steps": [{"id": "a", "dataflow": ". * 3"}]});
    let body = json!({"definition": definition, "input": 2, "idempotency_key": "order-17"});
    let (status, first) = fleet.request("POST", "/v1/runs", Some(&body)).await;
    assert_eq!(status, 201, "{first}");
    let (status, second) = fleet.request("POST", "/v1/runs", Some(&body)).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["id"], second["id"]);

    // Jobs take idempotency keys too, in their own space.
    let job = json!({"dataflow": ". + 1", "input": 1, "idempotency_key": "order-17"});
    let (status, first_job) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(status, 201, "{first_job}");
    assert_ne!(first_job["id"], first["id"]);
    let (status, second_job) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(
        (status, second_job["id"].clone()),
        (200, first_job["id"].clone())
    );

    let runs: Vec<_> = (0..20)
        .map(|n| json!({"definition": definition, "input": n}))
        .collect();
    let (status, batch) = fleet
        .request("POST", "/v1/runs:batch", Some(&json!({ "runs": runs })))
        .await;
    assert_eq!(status, 201, "{batch}");
    let ids = batch["ids"].as_array().unwrap();
    assert_eq!(ids.len(), 20);
    for (n, id) in ids.iter().enumerate() {
        let run = fleet
            .wait_run(id.as_str().unwrap(), Duration::from_secs(30))
            .await;
        assert_eq!(run["output"], json!(n * 3));
    }
}

#[tokio::test]
async fn a_run_that_fails_while_planned_never_runs_its_other_steps() {
    let fleet = TestFleet::start_with(taskfleet_tests::FleetOptions {
        scheduler_env: vec![("TASKFLEET_RELAY_AFTER_S".into(), "2".into())],
        ..taskfleet_tests::FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [
        {"id": "bad", "dataflow": ".", "input": "error(\"nope\")"},
        {"id": "other", "dataflow": "\"ran\""}
    ]});
    let run = fleet.run(&definition, &json!(1)).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(run["error"]["step"], "bad");
    assert_eq!(run["steps"]["other"]["status"], "cancelled");
    // Long past the relay's age limit, the cancelled step has still not run.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, run) = fleet
        .request(
            "GET",
            &format!("/v1/runs/{}", run["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(run["steps"]["other"]["status"], "cancelled", "{run:#}");
    assert!(run["steps"]["other"]["output"].is_null());
}

#[tokio::test]
async fn fleets_sharing_a_database_see_only_their_own_namespace() {
    let first = TestFleet::start().await.unwrap();
    let second = TestFleet::start_with(taskfleet_tests::FleetOptions {
        shared_database: Some(first.database.clone()),
        ..taskfleet_tests::FleetOptions::default()
    })
    .await
    .unwrap();
    let definition = json!({"steps": [{"id": "a", "dataflow": ". + 1"}]});
    let run = first.run(&definition, &json!(1)).await;
    assert_eq!(run["output"], 2);
    let (status, _) = first
        .request("PUT", "/v1/workflows/mine", Some(&definition))
        .await;
    assert_eq!(status, 201);

    let (_, listed) = second.request("GET", "/v1/runs", None).await;
    assert_eq!(listed["runs"], json!([]), "{listed}");
    let (_, stats) = second.request("GET", "/v1/stats", None).await;
    assert_eq!(stats["runs"], json!({}), "{stats}");
    let (status, _) = second
        .request(
            "GET",
            &format!("/v1/runs/{}", run["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = second.request("GET", "/v1/workflows/mine", None).await;
    assert_eq!(status, 404);
    let run = second.run(&definition, &json!(10)).await;
    assert_eq!(run["output"], 11);
    let (_, stats) = first.request("GET", "/v1/stats", None).await;
    assert_eq!(stats["runs"], json!({"succeeded": 1}), "{stats}");
}

#[tokio::test]
async fn a_step_may_take_ctx_first_and_cannot_take_over_the_workers_signals() {
    let fleet = TestFleet::start().await.unwrap();
    let run = fleet
        .run(
            &json!({"steps": [{"id": "first", "python": "fleet_steps:ctx_first"}]}),
            &json!(7),
        )
        .await;
    assert_eq!(
        run["output"],
        json!({"step": "first", "value": 7}),
        "{run:#}"
    );
    let run = fleet
        .run(
            &json!({"steps": [{"id": "sig", "python": "fleet_steps:grab_sigterm"}]}),
            &json!(null),
        )
        .await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(
        run["steps"]["sig"]["error"]["type"], "ValueError",
        "{run:#}"
    );
}

#[tokio::test]
async fn what_a_python_step_prints_and_logs_is_kept_as_its_logs() {
    let fleet = TestFleet::start().await.unwrap();
    let source = "def main(input, ctx):\n    print('starting with', input)\n    ctx.logger.info('attempt %d', ctx.attempt)\n    return input\n";
    let run = fleet
        .run(
            &json!({"steps": [
                {"id": "talk", "python_code": source},
                {"id": "quiet", "dataflow": ".", "after": ["talk"]}]}),
            &json!(3),
        )
        .await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let logs = run["steps"]["talk"]["logs"].as_str().unwrap();
    assert!(logs.contains("starting with 3\n"), "{logs:?}");
    assert!(
        logs.contains("INFO taskfleet.step.talk: attempt 1"),
        "{logs:?}"
    );
    assert!(run["steps"]["quiet"]["logs"].is_null());
}
