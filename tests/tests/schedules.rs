//! Schedules on a real fleet: each tick starts exactly one run with two schedulers and one of
//! them killed, across restarts, with `overlap` and `catch_up`; setting, showing, pausing and
//! deleting them, and what is refused; and delays (`delay_s`, `not_before`) on runs and jobs.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, POSTGRES, TestFleet};

/// A one-step definition that is quick to run.
fn quick() -> Value {
    json!({"steps": [{"id": "a", "dataflow": ". + 1"}]})
}

async fn database(fleet: &TestFleet) -> sqlx::PgPool {
    sqlx::PgPool::connect(&format!("{POSTGRES}/{}", fleet.database))
        .await
        .unwrap()
}

/// The ticks (seconds since the epoch) of the runs a schedule started, in order.
async fn ticks(db: &sqlx::PgPool, schedule: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM scheduled_for)::bigint FROM runs
         WHERE schedule = $1 ORDER BY scheduled_for",
    )
    .bind(schedule)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Waits until a schedule has started at least `count` runs.
async fn wait_for_ticks(db: &sqlx::PgPool, schedule: &str, count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let found = ticks(db, schedule).await.len();
        if found >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{schedule} started {found} runs, not {count}, within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that `ticks` are consecutive seconds: none doubled, none lost.
fn assert_consecutive(ticks: &[i64]) {
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 1, "ticks not consecutive: {ticks:?}");
    }
}

async fn set(fleet: &TestFleet, name: &str, body: &Value) -> (u16, Value) {
    fleet
        .request("PUT", &format!("/v1/schedules/{name}"), Some(body))
        .await
}

/// How many ticks the scheduler writing to `log` fired.
fn fired_by(fleet: &TestFleet, log: &str) -> usize {
    std::fs::read_to_string(fleet.log_path(log))
        .unwrap_or_default()
        .matches("schedule fired")
        .count()
}

#[tokio::test]
async fn two_schedulers_start_one_run_per_tick_when_one_is_killed() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let other = fleet.start_another_scheduler().await.unwrap();
    let bearer = format!("Bearer {}", fleet.api_key);
    let db = database(&fleet).await;
    let every_second = json!({"definition": quick(), "input": 1, "cron": "* * * * * *"});
    let (status, made) = set(&fleet, "every-second", &every_second).await;
    assert_eq!(status, 201, "{made}");
    wait_for_ticks(&db, "every-second", 4, Duration::from_secs(15)).await;
    // The first scheduler is killed once it has fired ticks, whatever it is doing: maybe in the
    // middle of a tick's transaction. The other takes over. Both claim every tick, so the
    // first wins some within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fired_by(&fleet, "scheduler") == 0 {
        assert!(
            Instant::now() < deadline,
            "the first scheduler fired no tick"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.kill_scheduler();
    let killed_at = ticks(&db, "every-second").await.len();
    wait_for_ticks(&db, "every-second", killed_at + 5, Duration::from_secs(15)).await;
    let request = |method: &'static str, path: &'static str, body: Option<Value>| {
        let (fleet, other, bearer) = (&fleet, &other, &bearer);
        async move {
            fleet
                .request_with_credentials(
                    other,
                    Some(bearer.as_bytes()),
                    method,
                    path,
                    body.as_ref(),
                )
                .await
        }
    };
    let mut paused = every_second.clone();
    paused["paused"] = json!(true);
    let (status, paused) = request("PUT", "/v1/schedules/every-second", Some(paused)).await;
    assert_eq!(status, 200, "{paused}");
    let fired = ticks(&db, "every-second").await;
    assert!(fired.len() >= 9, "{fired:?}");
    assert_consecutive(&fired);
    assert!(
        fired_by(&fleet, "scheduler-1") >= 5,
        "the other scheduler took over"
    );
    let (_, shown) = request("GET", "/v1/schedules/every-second", None).await;
    assert_eq!(shown["last_error"], Value::Null, "{shown}");
    assert_eq!(shown["next_fire_times"], json!([]), "paused: {shown}");
    let path = format!(
        "/v1/runs/{}?wait=30",
        shown["last_run_id"].as_str().unwrap()
    );
    let (_, run) = fleet
        .request_with_credentials(&other, Some(bearer.as_bytes()), "GET", &path, None)
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], 2);
    assert_eq!(run["schedule"], "every-second");
    assert_eq!(run["scheduled_for"], shown["last_fired_at"], "{run}");
    // A run submitted through the API names no schedule.
    let submitted = json!({"definition": quick(), "input": 1});
    let (_, submitted) = request("POST", "/v1/runs", Some(submitted)).await;
    let path = format!("/v1/runs/{}", submitted["id"].as_str().unwrap());
    let (_, submitted) = fleet
        .request_with_credentials(&other, Some(bearer.as_bytes()), "GET", &path, None)
        .await;
    assert_eq!(submitted["schedule"], Value::Null, "{submitted}");
    assert_eq!(submitted["scheduled_for"], Value::Null);
}

#[tokio::test]
async fn a_schedule_keeps_firing_across_scheduler_restarts_losing_no_tick() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let db = database(&fleet).await;
    let (status, _) = set(
        &fleet,
        "steady",
        &json!({"definition": quick(), "cron": "* * * * * *"}),
    )
    .await;
    assert_eq!(status, 201);
    let mut expected = 3;
    for _ in 0..2 {
        wait_for_ticks(&db, "steady", expected, Duration::from_secs(15)).await;
        fleet.restart_scheduler().await.unwrap();
        expected = ticks(&db, "steady").await.len() + 3;
    }
    wait_for_ticks(&db, "steady", expected, Duration::from_secs(15)).await;
    fleet.request("DELETE", "/v1/schedules/steady", None).await;
    let fired = ticks(&db, "steady").await;
    // Restarted within the grace (10 s): the ticks due meanwhile fire, each once.
    assert_consecutive(&fired);
}

#[tokio::test]
async fn catch_up_last_starts_one_run_for_the_ticks_missed_and_none_starts_none() {
    let mut fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        scheduler_env: vec![("TASKFLEET_SCHEDULE_GRACE_S".to_owned(), "2".to_owned())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let db = database(&fleet).await;
    for (name, catch_up) in [("skipping", "none"), ("catching", "last")] {
        let body = json!({"definition": quick(), "cron": "* * * * * *", "catch_up": catch_up});
        let (status, made) = set(&fleet, name, &body).await;
        assert_eq!(status, 201, "{made}");
        assert_eq!(made["catch_up"], catch_up);
    }
    wait_for_ticks(&db, "catching", 2, Duration::from_secs(15)).await;
    wait_for_ticks(&db, "skipping", 2, Duration::from_secs(15)).await;
    fleet.kill_scheduler();
    // The fleet has no scheduler for longer than the grace.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = (ticks(&db, "skipping").await, ticks(&db, "catching").await);
    fleet.restart_scheduler().await.unwrap();
    wait_for_ticks(&db, "skipping", before.0.len() + 3, Duration::from_secs(15)).await;
    wait_for_ticks(&db, "catching", before.1.len() + 3, Duration::from_secs(15)).await;
    for name in ["skipping", "catching"] {
        fleet
            .request("DELETE", &format!("/v1/schedules/{name}"), None)
            .await;
    }
    let (skipping, catching) = (ticks(&db, "skipping").await, ticks(&db, "catching").await);
    // Each has one gap, where the scheduler was down; around it ticks are consecutive.
    let gap = |fired: &[i64], before: usize| {
        assert_consecutive(&fired[..before]);
        assert_consecutive(&fired[before..]);
        let (last, next) = (fired[before - 1], fired[before]);
        assert!(next - last >= 4, "no gap in {fired:?}");
        next
    };
    let skipping_resumed = gap(&skipping, before.0.len());
    let catching_resumed = gap(&catching, before.1.len());
    // Both were claimed together: `last` fired the latest tick missed, once, which `none`
    // skipped, and both went on from the next.
    assert_eq!(
        catching_resumed + 1,
        skipping_resumed,
        "{skipping:?} {catching:?}"
    );
}

#[tokio::test]
async fn overlap_skip_skips_ticks_while_the_previous_run_is_unfinished() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let db = database(&fleet).await;
    let slow = json!({"steps": [{"id": "slow", "python_code":
        "import time\ndef main(input):\n    time.sleep(2.5)\n    return input\n"}]});
    let (status, made) = set(
        &fleet,
        "slow",
        &json!({"definition": slow, "cron": "* * * * * *", "overlap": "skip"}),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["overlap"], "skip");
    wait_for_ticks(&db, "slow", 3, Duration::from_secs(30)).await;
    fleet.request("DELETE", "/v1/schedules/slow", None).await;
    let runs: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8
         FROM runs WHERE schedule = 'slow' ORDER BY scheduled_for",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    for pair in runs.windows(2) {
        let finished = pair[0]
            .1
            .expect("the earlier run finished before the next started");
        assert!(pair[1].0 >= finished, "{runs:?}");
    }
    let fired = ticks(&db, "slow").await;
    let skipped = (fired[fired.len() - 1] - fired[0] + 1) as usize - fired.len();
    assert!(skipped >= 4, "ticks skipped between {fired:?}");
}

#[tokio::test]
async fn schedules_are_set_shown_listed_paused_resumed_deleted_and_audited() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let nightly = json!({"workflow": "orders", "input": {"day": 1}, "cron": "0 6 * * *",
                         "timezone": "Europe/Paris", "overlap": "skip", "catch_up": "last"});
    let (status, missing) = set(&fleet, "nightly", &nightly).await;
    assert_eq!(status, 404, "{missing}");
    let (status, _) = fleet
        .request("PUT", "/v1/workflows/orders", Some(&quick()))
        .await;
    assert_eq!(status, 201);
    let (status, made) = set(&fleet, "nightly", &nightly).await;
    assert_eq!(status, 201, "{made}");
    assert_eq!(made["name"], "nightly");
    assert_eq!(made["workflow"], "orders");
    assert_eq!(made["version"], Value::Null);
    assert_eq!(made["input"], json!({"day": 1}));
    assert_eq!(made["timezone"], "Europe/Paris");
    let times = made["next_fire_times"].as_array().unwrap();
    assert_eq!(times.len(), 5, "{made}");
    for time in times {
        let time = time.as_str().unwrap();
        assert!(
            time.contains("T06:00:00+01:00") || time.contains("T06:00:00+02:00"),
            "{time}"
        );
    }
    let (status, again) = set(&fleet, "nightly", &nightly).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["next_fire_times"], made["next_fire_times"]);
    let every_minute = json!({"definition": quick(), "cron": "*/1 * * * *"});
    let (status, _) = set(&fleet, "minutely", &every_minute).await;
    assert_eq!(status, 201);
    let (status, listed) = fleet.request("GET", "/v1/schedules", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = listed["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|schedule| schedule["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["minutely", "nightly"]);
    let (_, minutely) = fleet.request("GET", "/v1/schedules/minutely", None).await;
    assert_eq!(minutely["timezone"], "UTC");
    assert_eq!(minutely["overlap"], "allow");
    assert_eq!(minutely["catch_up"], "none");
    assert!(
        minutely["next_fire_times"][0]
            .as_str()
            .unwrap()
            .ends_with(":00+00:00"),
        "{minutely}"
    );
    // Paused, it shows no fire time; resumed, it fires from its next tick.
    let mut paused = nightly.clone();
    paused["paused"] = json!(true);
    let (status, shown) = set(&fleet, "nightly", &paused).await;
    assert_eq!(status, 200);
    assert_eq!(shown["paused"], true);
    assert_eq!(shown["next_fire_times"], json!([]));
    let (_, resumed) = set(&fleet, "nightly", &nightly).await;
    assert_eq!(resumed["paused"], false);
    assert_eq!(resumed["next_fire_times"], made["next_fire_times"]);
    // Another tenant sees none of them.
    let reader = fleet.create_key("other", "runs:read,runs:write").unwrap();
    let bearer = format!("Bearer {reader}");
    let (status, theirs) = fleet
        .request_with_credentials(
            &fleet.api,
            Some(bearer.as_bytes()),
            "GET",
            "/v1/schedules",
            None,
        )
        .await;
    assert_eq!((status, theirs), (200, json!({"schedules": []})));
    let read_only = fleet.create_key("test", "runs:read").unwrap();
    let bearer = format!("Bearer {read_only}");
    let (status, _) = fleet
        .request_with_credentials(
            &fleet.api,
            Some(bearer.as_bytes()),
            "GET",
            "/v1/schedules/nightly",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (status, refused) = fleet
        .request_with_credentials(
            &fleet.api,
            Some(bearer.as_bytes()),
            "DELETE",
            "/v1/schedules/nightly",
            None,
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    let (status, deleted) = fleet.request("DELETE", "/v1/schedules/nightly", None).await;
    assert_eq!((status, deleted), (200, json!({"name": "nightly"})));
    let (status, _) = fleet.request("GET", "/v1/schedules/nightly", None).await;
    assert_eq!(status, 404);
    let (status, _) = fleet.request("DELETE", "/v1/schedules/nightly", None).await;
    assert_eq!(status, 404);
    let (_, audit) = fleet.request("GET", "/v1/audit", None).await;
    let actions: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|event| event["action"].as_str())
        .filter(|action| action.starts_with("schedule."))
        .collect();
    assert_eq!(
        actions,
        [
            "schedule.delete",
            "schedule.set",
            "schedule.set",
            "schedule.set",
            "schedule.set",
            "schedule.set"
        ]
    );
}

#[tokio::test]
async fn bad_schedules_are_refused_naming_the_field() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let base = json!({"definition": quick(), "cron": "*/5 * * * *"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    let cases = [
        ("good", with("cron", json!("61 * * * *")), "cron"),
        ("good", with("cron", json!("* * * *")), "cron"),
        ("good", with("cron", json!("* * * * * * *")), "cron"),
        ("good", with("cron", json!("0 0 30 2 *")), "cron"),
        ("good", with("timezone", json!("Mars/Olympus")), "timezone"),
        ("good", with("overlap", json!("sometimes")), "overlap"),
        ("good", with("catch_up", json!("all")), "catch_up"),
        ("good", with("workflow", json!("orders")), "workflow"),
        ("good", json!({"cron": "* * * * *", "input": 1}), "workflow"),
        ("good", with("version", json!(2)), "version"),
        ("bad name!", base.clone(), "name"),
    ];
    for (name, body, field) in cases {
        let path = format!("/v1/schedules/{}", name.replace(' ', "%20"));
        let (status, answer) = fleet.request("PUT", &path, Some(&body)).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["error"]["details"][0]["field"], field, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{field}: ")), "{message}");
    }
    let (_, answer) = fleet
        .request(
            "PUT",
            "/v1/schedules/good",
            Some(&with("cron", json!("* * * *"))),
        )
        .await;
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("5 fields") && message.contains("6"),
        "{message}"
    );
    let (status, answer) = fleet
        .request(
            "PUT",
            "/v1/schedules/good",
            Some(&with("every", json!("day"))),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("every"),
        "{answer}"
    );
    let (status, answer) = fleet
        .request_raw("PUT", "/v1/schedules/good", b"{\"cron\": ".to_vec())
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = fleet
        .request(
            "PUT",
            "/v1/schedules/good",
            Some(&json!({"definition": quick()})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cron"),
        "{answer}"
    );
    let cycle = json!({"steps": [{"id": "a", "dataflow": ".", "after": ["b"]},
                                 {"id": "b", "dataflow": ".", "after": ["a"]}]});
    let (status, answer) = set(&fleet, "good", &with("definition", cycle)).await;
    assert_eq!(status, 422, "{answer}");
    let (status, _) = fleet.request("GET", "/v1/schedules", None).await;
    assert_eq!(status, 200);
    let (_, listed) = fleet.request("GET", "/v1/schedules", None).await;
    assert_eq!(listed, json!({"schedules": []}), "nothing was stored");
}

/// Returns the RFC 3339 time `seconds` from now by the database's clock.
async fn time_from_now(db: &sqlx::PgPool, seconds: f64) -> String {
    sqlx::query_scalar(
        "SELECT to_char((now() + make_interval(secs => $1)) AT TIME ZONE 'UTC',
                        'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    )
    .bind(seconds)
    .fetch_one(db)
    .await
    .unwrap()
}

/// Returns how long after its run was accepted a run's (or job's) first step started.
fn waited(run: &Value, step: &str) -> f64 {
    let seconds = |text: &Value| {
        let text = text.as_str().unwrap();
        // Both times are UTC with the same format; compare them as seconds of the day.
        let time = &text[11..text.len() - 1];
        let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
        let mut parts = hms.split(':').map(|part| part.parse::<f64>().unwrap());
        let (h, m, s) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        h * 3600.0 + m * 60.0 + s + format!("0.{fraction}").parse::<f64>().unwrap()
    };
    seconds(&run["steps"][step]["started_at"]) - seconds(&run["created_at"])
}

#[tokio::test]
async fn runs_and_jobs_wait_for_their_delay_or_not_before() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let db = database(&fleet).await;
    // Far enough ahead that the requests below are all made before it, even on a busy machine.
    let soon = time_from_now(&db, 4.0).await;
    let past = time_from_now(&db, -60.0).await;
    let requests = [
        (
            "/v1/runs",
            json!({"definition": quick(), "input": 1, "delay_s": 1.5}),
            1.4,
        ),
        (
            "/v1/runs",
            json!({"definition": quick(), "input": 1, "not_before": soon}),
            1.5,
        ),
        (
            "/v1/runs",
            json!({"definition": quick(), "input": 1, "not_before": past}),
            0.0,
        ),
        (
            "/v1/tasks",
            json!({"id": "a", "dataflow": ". + 1", "input": 1, "not_before": soon}),
            1.5,
        ),
    ];
    let mut accepted = Vec::new();
    for (path, body, _) in &requests {
        let (status, answer) = fleet.request("POST", path, Some(body)).await;
        assert_eq!(status, 201, "{body}: {answer}");
        accepted.push(answer["id"].as_str().unwrap().to_owned());
    }
    for ((path, body, at_least), id) in requests.iter().zip(&accepted) {
        let run = if *path == "/v1/runs" {
            fleet.wait_run(id, Duration::from_secs(30)).await
        } else {
            fleet.wait_job(id, Duration::from_secs(30)).await
        };
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["output"], 2);
        let waited = waited(&run, "a");
        assert!(waited >= *at_least, "{body}: started after {waited} s");
        if *at_least == 0.0 {
            assert!(waited < 3.0, "{body}: started after {waited} s");
        }
    }
    for path in ["/v1/runs", "/v1/tasks"] {
        let body = if path == "/v1/runs" {
            json!({"definition": quick(), "delay_s": 1, "not_before": soon})
        } else {
            json!({"dataflow": ".", "delay_s": 1, "not_before": soon})
        };
        let (status, answer) = fleet.request("POST", path, Some(&body)).await;
        assert_eq!(status, 422, "{answer}");
        assert_eq!(
            answer["error"]["details"],
            json!([{"field": "delay_s"}, {"field": "not_before"}]),
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("delay_s") && message.contains("not_before"),
            "{message}"
        );
        let body = json!({"dataflow": ".", "not_before": "tomorrow"});
        let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&body)).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not_before"),
            "{answer}"
        );
    }
    let (status, answer) = fleet
        .request(
            "POST",
            "/v1/runs",
            Some(&json!({"definition": quick(), "delay_s": -1})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
}

/// Runs `taskfleet ARGS` against `fleet`, checks that it succeeded and returns what it printed.
fn cli(fleet: &TestFleet, args: &[&str]) -> String {
    let output = std::process::Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(args)
        .env("TASKFLEET_API_URL", &fleet.api)
        .env("TASKFLEET_API_KEY", &fleet.api_key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_cli_sets_lists_pauses_resumes_and_deletes_schedules() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let file = std::env::temp_dir().join(format!("taskfleet-schedule-{}.json", fleet.namespace));
    std::fs::write(
        &file,
        json!({"name": "tick", "steps": [{"id": "a", "dataflow": "."}]}).to_string(),
    )
    .unwrap();
    let set = cli(
        &fleet,
        &[
            "schedules",
            "set",
            "morning",
            "--cron",
            "0 7 * * MON-FRI",
            "--definition",
            file.to_str().unwrap(),
            "--input",
            "{\"n\": 1}",
            "--timezone",
            "America/New_York",
            "--overlap",
            "skip",
            "--catch-up",
            "last",
        ],
    );
    let _ = std::fs::remove_file(&file);
    assert!(
        set.contains("tick (inline)") && set.contains("T07:00:00-0"),
        "{set}"
    );
    let listed = cli(&fleet, &["schedules"]);
    assert!(
        listed.contains("morning") && listed.contains("active"),
        "{listed}"
    );
    let shown: Value = serde_json::from_str(&cli(
        &fleet,
        &["schedules", "show", "morning", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(shown["overlap"], "skip");
    assert_eq!(shown["catch_up"], "last");
    assert_eq!(shown["input"], json!({"n": 1}));
    let paused = cli(&fleet, &["schedules", "pause", "morning"]);
    assert_eq!(paused.trim(), "schedule morning paused");
    assert!(cli(&fleet, &["schedules", "list"]).contains("paused"));
    let resumed = cli(&fleet, &["schedules", "resume", "morning"]);
    assert!(resumed.contains("resumed; next fire at"), "{resumed}");
    let (_, after) = fleet.request("GET", "/v1/schedules/morning", None).await;
    assert_eq!(after["paused"], false);
    assert_eq!(after["overlap"], "skip");
    assert_eq!(after["timezone"], "America/New_York");
    let deleted = cli(&fleet, &["schedules", "delete", "morning"]);
    assert_eq!(deleted.trim(), "schedule morning deleted");
    assert_eq!(cli(&fleet, &["schedules"]).trim(), "(no schedules)");
}
