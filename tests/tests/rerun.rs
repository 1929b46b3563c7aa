//! Re-running failed and cancelled runs against a real fleet: `POST /v1/runs/{id}/retry` runs
//! the failed, cancelled and unstarted steps again, keeps the steps that succeeded as they were,
//! answers the same while the re-run is under way, and refuses runs that cannot run again.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Waits until the run or job at `path` is no longer running, and returns its view.
async fn wait_ended(fleet: &TestFleet, id: &str, job: bool) -> Value {
    if job {
        fleet.wait_job(id, Duration::from_secs(60)).await
    } else {
        fleet.wait_run(id, Duration::from_secs(60)).await
    }
}

/// Asks for run (or, with `job`, job) `id` to run again; returns the answer.
async fn retry(fleet: &TestFleet, id: &str, job: bool) -> (u16, Value) {
    let collection = if job { "tasks" } else { "runs" };
    fleet
        .request("POST", &format!("/v1/{collection}/{id}/retry"), None)
        .await
}

/// Asserts that a retry was answered with the run running (again).
fn assert_running((status, answer): &(u16, Value)) {
    assert_eq!(
        (*status, &answer["status"]),
        (200, &json!("running")),
        "{answer}"
    );
}

#[tokio::test]
async fn a_failed_run_runs_again_from_its_failed_and_unstarted_steps() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // `check` fails until `until` has passed; `last` takes its time, so the re-run is still
    // under way when it is asked for again.
    let definition = json!({"steps": [
        {"id": "first", "python_code": "def main(input):\n    return input['n'] * 2\n"},
        {"id": "check", "after": ["first"], "input": "{until: .input.until, first: .steps.first}",
         "python_code": "import time\ndef main(input):\n    if time.time() < input['until']:\n        raise RuntimeError('too early')\n    return input['first'] + 1\n"},
        {"id": "last", "after": ["check"],
         "python_code": "import time\ndef main(input):\n    time.sleep(1.5)\n    return input * 10\n"},
    ]});
    // Long enough for the run to fail twice first, even on a loaded machine.
    let until = now() + 8.0;
    let id = fleet
        .submit(&definition, &json!({"n": 5, "until": until}))
        .await;
    let failed = wait_ended(&fleet, &id, false).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["steps"]["first"]["status"], "succeeded");
    assert!(
        failed["steps"]
            .get("last")
            .is_none_or(|last| last["status"] != "succeeded")
    );
    let first_task = failed["steps"]["first"]["task_id"].clone();
    let first_finished = failed["steps"]["first"]["finished_at"].clone();
    let check_task = failed["steps"]["check"]["task_id"].clone();

    // Still failing: the re-run fails again, and may be run once more.
    assert_running(&retry(&fleet, &id, false).await);
    let again = wait_ended(&fleet, &id, false).await;
    assert_eq!(again["status"], "failed", "{again:#}");

    tokio::time::sleep(Duration::from_secs_f64((until - now()).max(0.0) + 0.1)).await;
    assert_running(&retry(&fleet, &id, false).await);
    // Asked again while under way: the same answer, and no second re-run.
    assert_running(&retry(&fleet, &id, false).await);

    let done = wait_ended(&fleet, &id, false).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], 110, "{done:#}");
    assert!(done["error"].is_null(), "{done:#}");
    // The step that succeeded was not run again; the failed one is a new task.
    assert_eq!(done["steps"]["first"]["task_id"], first_task, "{done:#}");
    assert_eq!(done["steps"]["first"]["finished_at"], first_finished);
    assert_eq!(done["steps"]["first"]["attempts"], 1);
    assert_ne!(done["steps"]["check"]["task_id"], check_task, "{done:#}");
    assert_eq!(done["steps"]["check"]["attempts"], 1);

    // A run that succeeded does not run again; nor does one that is running and never
    // failed; a run that does not exist is not found.
    let (status, answer) = retry(&fleet, &id, false).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("succeeded"),
        "{answer}"
    );
    let running = fleet
        .submit(
            &json!({"steps": [{"id": "slow", "python_code": "import time\ndef main(_):\n    time.sleep(5)\n"}]}),
            &json!(null),
        )
        .await;
    let (status, answer) = retry(&fleet, &running, false).await;
    assert_eq!(status, 409, "{answer}");
    let (status, answer) = fleet
        .request(
            "POST",
            "/v1/runs/01a24979-e556-7169-8513-e1550d34d4bf/retry",
            None,
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = fleet.request("POST", "/v1/runs/nope/retry", None).await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test]
async fn a_cancelled_job_runs_again() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // The job runs until `until`, then answers.
    let until = now() + 3.0;
    let job = json!({
        "python_code": "import time\ndef main(input):\n    time.sleep(max(0, input - time.time()))\n    return 'done'\n",
        "input": until,
    });
    let (status, answer) = fleet.request("POST", "/v1/tasks", Some(&job)).await;
    assert_eq!(status, 201, "{answer}");
    let id = answer["id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, answer) = fleet
        .request("POST", &format!("/v1/tasks/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(wait_ended(&fleet, &id, true).await["status"], "cancelled");

    // The workers were told to drop the job's tasks: its new task runs all the same.
    assert_running(&retry(&fleet, &id, true).await);
    let done = wait_ended(&fleet, &id, true).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["output"], "done", "{done:#}");
}
