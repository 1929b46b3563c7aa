//! The `taskfleet` command against a real fleet, run as its users run it: submitting a
//! definition file and waiting, listing runs, reading a run's logs, the counts; enqueueing and
//! listing jobs, registering workflows, and what scripts read with `--output json`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::{Command, Output};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

/// Runs `taskfleet ARGS` against `fleet`.
fn taskfleet(fleet: &TestFleet, args: &[&str]) -> Output {
    Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(args)
        .env("TASKFLEET_API_URL", &fleet.api)
        .env("TASKFLEET_API_KEY", &fleet.api_key)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `taskfleet ARGS --output json`, checks that it succeeded and returns what it printed.
fn json_of(fleet: &TestFleet, args: &[&str]) -> Value {
    let output = taskfleet(fleet, &[args, &["--output", "json"]].concat());
    assert!(output.status.success(), "{args:?}: {}", stderr(&output));
    serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|error| panic!("{args:?} printed no JSON ({error}): {}", stdout(&output)))
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

    let listing = json_of(&fleet, &["runs", "--workflow", "hello", "--limit", "5"]);
    let runs = listing["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{listing}");
    assert_eq!(runs[0]["status"], "succeeded", "{listing}");
    let id = runs[0]["id"].as_str().unwrap();
    // As text, a table with the run in it.
    let table = taskfleet(&fleet, &["runs", "--workflow", "hello"]);
    assert!(stdout(&table).starts_with("ID "), "{}", stdout(&table));
    assert!(stdout(&table).contains(id), "{}", stdout(&table));

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

    let counts = json_of(&fleet, &["stats"]);
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
        .env("TASKFLEET_API_KEY", &fleet.api_key)
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

#[tokio::test]
async fn jobs_workflows_and_scripts_through_the_cli() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let directory = std::env::temp_dir().join(format!("taskfleet-cli-{}", fleet.namespace));
    std::fs::create_dir_all(&directory).unwrap();

    // A job from flags: as text, the id; waited for, its output.
    let enqueued = taskfleet(&fleet, &["enqueue", "--dataflow", ". * 2", "--input", "21"]);
    assert!(enqueued.status.success(), "{}", stderr(&enqueued));
    let job_id = stdout(&enqueued).trim().to_owned();
    assert_eq!(job_id.len(), 36, "{job_id}");
    let waited = taskfleet(&fleet, &["wait", &job_id, "--job"]);
    assert_eq!(stdout(&waited).trim(), "42", "{}", stderr(&waited));
    // A job from a step file, sent to a queue no worker reads: listed as pending there.
    let step_file = directory.join("step.json");
    std::fs::write(&step_file, r#"{"id": "later", "python": "steps:run"}"#).unwrap();
    let parked = json_of(
        &fleet,
        &["enqueue", step_file.to_str().unwrap(), "--queue", "nobody"],
    );
    let parked_id = parked["id"].as_str().unwrap();
    let jobs = json_of(&fleet, &["jobs", "--limit", "1"]);
    assert_eq!(jobs["jobs"][0]["id"], parked_id, "{jobs}");
    assert_eq!(jobs["jobs"][0]["step"], "later", "{jobs}");
    assert_eq!(jobs["jobs"][0]["executor"], "python", "{jobs}");
    assert_eq!(jobs["jobs"][0]["queue"], "nobody", "{jobs}");
    assert_eq!(jobs["next_cursor"], parked_id, "{jobs}");
    let next = json_of(&fleet, &["jobs", "--cursor", parked_id]);
    assert_eq!(next["jobs"][0]["id"], job_id.as_str(), "{next}");
    assert_eq!(next["jobs"][0]["status"], "succeeded", "{next}");
    let succeeded = json_of(&fleet, &["jobs", "--status", "succeeded"]);
    assert_eq!(
        succeeded["jobs"].as_array().unwrap().len(),
        1,
        "{succeeded}"
    );
    let cancelled = taskfleet(&fleet, &["cancel", parked_id, "--job"]);
    assert_eq!(
        stdout(&cancelled).trim(),
        format!("job {parked_id} cancelled"),
        "{}",
        stderr(&cancelled)
    );

    // A failed job waited for with --output json: the whole job on stdout, exit 1.
    let failed = taskfleet(
        &fleet,
        &[
            "enqueue",
            "--step",
            r#"{"python_code": "def main(x):\n    raise ValueError('no ' + x)\n"}"#,
            "--input",
            "\"way\"",
            "--wait",
            "--output",
            "json",
        ],
    );
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let job: Value = serde_json::from_str(&stdout(&failed)).unwrap();
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["type"], "ValueError", "{job}");
    assert!(stderr(&failed).contains("no way"), "{}", stderr(&failed));

    // Workflows: registered from a file, again unchanged, listed, shown, run by name.
    let definition = directory.join("twice.json");
    std::fs::write(
        &definition,
        json!({"name": "twice", "steps": [{"id": "a", "dataflow": ". * 2"}]}).to_string(),
    )
    .unwrap();
    let path = definition.to_str().unwrap();
    let registered = taskfleet(&fleet, &["workflows", "register", path]);
    assert_eq!(
        stdout(&registered).trim(),
        "registered workflow twice version 1",
        "{}",
        stderr(&registered)
    );
    let again = json_of(&fleet, &["workflows", "register", path]);
    assert_eq!(
        again,
        json!({"name": "twice", "version": 1, "created": false})
    );
    let renamed = json_of(&fleet, &["workflows", "register", path, "--name", "other"]);
    assert!(renamed.is_object(), "{renamed}");
    let listed = taskfleet(&fleet, &["workflows"]);
    assert!(stdout(&listed).contains("twice"), "{}", stdout(&listed));
    let shown = taskfleet(&fleet, &["workflows", "show", "twice"]);
    let shown: Value = serde_json::from_str(&stdout(&shown)).unwrap();
    assert_eq!(shown["steps"][0]["dataflow"], ". * 2", "{shown}");
    let run = taskfleet(&fleet, &["submit", "twice", "--input", "4", "--wait"]);
    assert_eq!(stdout(&run).trim(), "8", "{}", stderr(&run));
    let status = taskfleet(
        &fleet,
        &["status", "--output", "text", &{
            let runs = json_of(&fleet, &["runs", "--workflow", "twice"]);
            runs["runs"][0]["id"].as_str().unwrap().to_owned()
        }],
    );
    assert!(
        stdout(&status).contains("workflow   twice (version 1)"),
        "{}",
        stdout(&status)
    );
    let unnamed = directory.join("unnamed.json");
    std::fs::write(&unnamed, r#"{"steps": []}"#).unwrap();
    let refused = taskfleet(
        &fleet,
        &["workflows", "register", unnamed.to_str().unwrap()],
    );
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("--name"), "{}", stderr(&refused));

    // Output chosen by the environment; an empty variable reads as unset.
    let from_env = Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(["workers"])
        .env("TASKFLEET_API_URL", &fleet.api)
        .env("TASKFLEET_API_KEY", &fleet.api_key)
        .env("TASKFLEET_OUTPUT", "json")
        .output()
        .unwrap();
    let workers: Value = serde_json::from_str(&stdout(&from_env)).unwrap();
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    let empty = Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(["queues"])
        .env("TASKFLEET_API_URL", &fleet.api)
        .env("TASKFLEET_API_KEY", &fleet.api_key)
        .env("TASKFLEET_OUTPUT", "")
        .output()
        .unwrap();
    assert!(stdout(&empty).starts_with("QUEUE"), "{}", stderr(&empty));

    // Without a key, the refusal says how to give one.
    let keyless = Command::new(taskfleet_tests::bin_dir().join("taskfleet"))
        .args(["runs"])
        .env("TASKFLEET_API_URL", &fleet.api)
        .env_remove("TASKFLEET_API_KEY")
        .output()
        .unwrap();
    assert_eq!(keyless.status.code(), Some(1));
    assert!(stderr(&keyless).contains("401"), "{}", stderr(&keyless));
    assert!(
        stderr(&keyless).contains("TASKFLEET_API_KEY"),
        "{}",
        stderr(&keyless)
    );

    // Completions for bash parse as bash and know the commands.
    let completions = taskfleet(&fleet, &["completions", "bash"]);
    let script = stdout(&completions);
    assert!(
        script.contains("enqueue") && script.contains("register"),
        "{script}"
    );
    let checked = Command::new("bash")
        .args(["-n", "-c", &script])
        .output()
        .unwrap();
    assert!(checked.status.success(), "{}", stderr(&checked));
    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn a_queue_rate_limit_through_the_cli() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 0,
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    let set = taskfleet(
        &fleet,
        &["queues", "set", "emails", "--rate-limit-per-s", "2.5"],
    );
    assert!(set.status.success(), "{}", stderr(&set));
    assert_eq!(
        stdout(&set).trim(),
        "queue emails: at most 2.5 starts per second across the fleet"
    );
    let shown = json_of(&fleet, &["queues", "show", "emails"]);
    assert_eq!(shown["rate_limit_per_s"], 2.5, "{shown}");
    let refused = taskfleet(
        &fleet,
        &["queues", "set", "emails", "--rate-limit-per-s", "0"],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("rate_limit_per_s"),
        "{}",
        stderr(&refused)
    );
    let cleared = taskfleet(&fleet, &["queues", "set", "emails"]);
    assert!(cleared.status.success(), "{}", stderr(&cleared));
    assert_eq!(stdout(&cleared).trim(), "queue emails: no rate limit");
    // Without a subcommand, the list, as before.
    let listed = json_of(&fleet, &["queues"]);
    assert!(listed["queues"].is_array(), "{listed}");
}
