//! The dataflow executor with real sandbox processes (`taskfleet-worker --jq-sandbox`): programs
//! give what they give when run directly, and a program that loops, allocates without bound or
//! recurses too deep fails its step within its limits and leaves no process behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::{DATAFLOW_ERROR, TIMEOUT};
use taskfleet_common::jq::{Program, QUICK_INPUT_SIZE};
use taskfleet_common::protocol::{PROTOCOL_VERSION, TaskMessage};
use taskfleet_common::{RunId, StepError, TaskId};
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxSettings};
use taskfleet_worker::executor::dataflow::DataflowExecutor;

const MIB: u64 = 1024 * 1024;

fn executor(time_limit: Duration) -> DataflowExecutor {
    DataflowExecutor::new(
        JqSandbox::new(SandboxSettings {
            program: PathBuf::from(env!("CARGO_BIN_EXE_taskfleet-worker")),
            processes: 1,
            memory_bytes: 16 * MIB,
        }),
        time_limit,
    )
}

fn task(program: &str, input: Value) -> TaskMessage {
    TaskMessage {
        version: PROTOCOL_VERSION,
        task_id: TaskId::new(),
        run_id: RunId::new(),
        step_id: "step".to_owned(),
        attempt: 1,
        step: StepKind::Dataflow {
            program: program.to_owned(),
        },
        input,
        timeout_s: None,
        ends_run: false,
        trace_id: None,
        rate_limit: None,
        exclusive: false,
    }
}

/// The sandbox processes this test process started that are still alive.
fn sandboxes() -> usize {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            let path = entry.path();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            // The parent's pid is the second field after the command name, which is in
            // parentheses and may hold spaces.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned));
            let command = std::fs::read(path.join("cmdline")).unwrap_or_default();
            parent.as_deref() == Some(me.as_str())
                && String::from_utf8_lossy(&command).contains("--jq-sandbox")
        })
        .count()
}

fn failure(result: Result<Value, StepError>) -> StepError {
    result.expect_err("the step fails")
}

#[tokio::test]
async fn every_program_gives_what_it_gives_when_run_directly() {
    let executor = executor(Duration::from_secs(10));
    let large = json!({"items": vec![1; QUICK_INPUT_SIZE]});
    for (program, input) in [
        (".", json!({"a": 1})),
        ("{b: .a, c: \"\\(.a)\"}", json!({"a": 1})),
        (".items | length", large),
        ("map(. * 2)", json!([1, 2])),
        ("range(3)", json!(null)),
        ("empty", json!(null)),
        (".a.b", json!({"a": 1})),
        ("error(\"no\")", json!(null)),
        ("{} | .[\"x\"] = (1 | tobytes)", json!(null)),
    ] {
        let expected = Program::compile(program)
            .expect("compiles")
            .run(input.clone())
            .map_err(|error| error.to_string());
        let executed = executor
            .run(&task(program, input), None)
            .await
            .map_err(|error| error.message);
        assert_eq!(executed, expected, "{program}");
    }
}

#[tokio::test]
async fn programs_past_their_limits_fail_their_step_and_leave_no_process() {
    let executor = executor(Duration::from_millis(500));
    // One sandbox started and idle.
    let warm = executor.run(&task("map(.)", json!([1])), None).await;
    assert_eq!(warm, Ok(json!([1])));
    assert_eq!(sandboxes(), 1);

    let started = Instant::now();
    let error = failure(executor.run(&task("def f: f; f", json!(1)), None).await);
    assert_eq!(error.kind, DATAFLOW_ERROR);
    assert_eq!(
        error.message,
        "jq program ran past its time limit of 500 ms"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sandboxes(), 0, "the looping sandbox was killed and reaped");

    let error = failure(
        executor
            .run(
                &task("last(range(1e15))", json!(1)),
                Some(Duration::from_millis(300)),
            )
            .await,
    );
    assert_eq!(error.kind, TIMEOUT, "past its step's timeout_s: {error:?}");

    // Time enough to reach the memory limit, however busy the machine.
    let patient = Some(Duration::from_secs(30));
    let error = failure(
        executor
            .run(&task("[range(1e12)]", json!(1)), patient)
            .await,
    );
    assert_eq!(error.kind, DATAFLOW_ERROR);
    assert_eq!(
        error.message,
        "jq program took more than its memory limit of 16 MiB"
    );

    let error = failure(
        executor
            .run(&task("def f: 1 + f; f", json!(1)), patient)
            .await,
    );
    assert_eq!(error.kind, DATAFLOW_ERROR);
    assert!(
        error.message.contains("stack overflowed") || error.message.contains("memory limit"),
        "{error:?}"
    );

    // Whatever happened before, the next program runs as usual.
    assert_eq!(
        executor.run(&task("map(. + 1)", json!([1])), None).await,
        Ok(json!([2]))
    );
    assert!(sandboxes() <= 1);
}

#[tokio::test]
async fn a_step_given_up_stops_its_program() {
    let executor = executor(Duration::from_secs(60));
    let looping = task("def f: f; f", json!(1));
    let given_up =
        tokio::time::timeout(Duration::from_millis(300), executor.run(&looping, None)).await;
    assert!(given_up.is_err(), "the program loops");
    let deadline = Instant::now() + Duration::from_secs(2);
    while sandboxes() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sandboxes(), 0, "the sandbox of a step given up was killed");
    assert_eq!(
        executor.run(&task("map(.)", json!([3])), None).await,
        Ok(json!([3]))
    );
}
