//! The `taskfleet` command against a real fleet, run as its users run it: submitting a
//! definition file and waiting, listing runs, reading a run's logs, and the counts.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Output};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

/// Runs `taskfleet ARGS` against `fleet`.
fn taskfleet(fleet: &TestFleet, args: &[&str]) -> Output {
    Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(args)
        .env("TASKFLEET_API_URL", &fleet.api)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_newcomer_submits_lists_runs_and_reads_logs_with_the_cli() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let directory = std::env::temp_dir().join(format!("taskfleet-cli-{}", fleet.namespace));
    std::fs::create_dir_all(&directory).unwrap();
    let file = directory.join("hello.json");
    let definition = json!({"name": "hello", "steps": [
        {"id": "greet", "python_code": "def main(input):\n    print('hello', input)\n    return input + 1\n"},
        {"id": "double", "dataflow": ". * 2", "after": ["greet"]}
    ]});
    std::fs::write(&file, definition.to_string()).unwrap();
    let path = file.to_str().unwrap();

    let submitted = taskfleet(&fleet, &["submit", path, "--input", "20", "--wait"]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    assert_eq!(stdout(&submitted).trim(), "42");

    let listed = taskfleet(&fleet, &["runs", "--workflow", "hello", "--limit", "5"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let listing: Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let runs = listing["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{listing}");
    assert_eq!(runs[0]["status"], "succeeded", "{listing}");
    let id = runs[0]["id"].as_str().unwrap();

    let logs = taskfleet(&fleet, &["logs", id]);
    assert!(logs.status.success(), "{}", stderr(&logs));
    let text = stdout(&logs);
    assert!(text.contains("== greet (succeeded, attempts 1)"), "{text}");
    assert!(text.contains("hello 20"), "{text}");
    assert!(text.contains("== double (succeeded"), "{text}");
    let one = taskfleet(&fleet, &["logs", id, "--step", "greet"]);
    assert!(!stdout(&one).contains("double"), "{}", stdout(&one));
    let unknown = taskfleet(&fleet, &["logs", id, "--step", "nope"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no step \"nope\""),
        "{}",
        stderr(&unknown)
    );

    let stats = taskfleet(&fleet, &["stats"]);
    assert!(stats.status.success(), "{}", stderr(&stats));
    let counts: Value = serde_json::from_str(&stdout(&stats)).unwrap();
    assert_eq!(counts["namespace"], fleet.namespace.as_str(), "{counts}");

    // The definition inline, and on standard input.
    let text = definition.to_string();
    let inline = taskfleet(
        &fleet,
        &["submit", "--definition", &text, "--input", "1", "--wait"],
    );
    assert!(inline.status.success(), "{}", stderr(&inline));
    assert_eq!(stdout(&inline).trim(), "4");
    let mut piped = Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(["submit", "-", "--input", "2", "--wait"])
        .env("TASKFLEET_API_URL", &fleet.api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = piped.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let piped = piped.wait_with_output().unwrap();
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(stdout(&piped).trim(), "6");

    // A fan-out shows its progress from the first look, however quickly it ends.
    let fan_out =
        json!({"steps": [{"id": "each", "for_each": "[range(500)]", "dataflow": ". + 1"}]});
    let waited = taskfleet(
        &fleet,
        &["submit", "--definition", &fan_out.to_string(), "--wait"],
    );
    assert!(waited.status.success(), "{}", stderr(&waited));
    assert!(stderr(&waited).contains("/500"), "{}", stderr(&waited));

    let bad = taskfleet(&fleet, &["runs", "--status", "sleeping"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("sleeping"), "{}", stderr(&bad));
    let _ = std::fs::remove_dir_all(&directory);
}
