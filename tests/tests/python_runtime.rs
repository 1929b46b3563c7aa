//! The Python runtime in a real fleet: executor processes using every core, hard time limits,
//! recycling, virtualenvs, async steps and crashes of an executor.

#![allow(clippy::unwrap_used, clippy::print_stderr, missing_docs)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

fn worker_args(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

async fn fleet(args: &[&str]) -> TestFleet {
    TestFleet::start_with(FleetOptions {
        workers: 1,
        concurrency: 8,
        worker_args: worker_args(args),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

fn code(source: &str) -> Value {
    json!({"steps": [{"id": "step", "python_code": source}]})
}

const PID: &str = "import os\n\ndef main(input):\n    return os.getpid()\n";

async fn executor_pid(fleet: &TestFleet) -> u64 {
    let run = fleet.run(&code(PID), &json!(null)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    run["output"].as_u64().unwrap()
}

#[tokio::test]
async fn cpu_bound_steps_use_every_executor_of_a_worker() {
    let fleet = fleet(&["--python-executors", "2"]).await;
    // 40 items of 100 ms of CPU each: 4 s on one interpreter.
    let definition = json!({"steps": [{
        "id": "burn",
        "for_each": ".",
        "python_code": "import time\n\ndef main(input):\n    start = time.thread_time()\n    while time.thread_time() - start < 0.1:\n        pass\n    return input\n",
    }]});
    let items: Vec<u32> = (0..40).collect();
    // A first run starts both executors' caches; the second one is measured.
    fleet.run(&definition, &json!([0, 1])).await;
    let started = Instant::now();
    let run = fleet.run(&definition, &json!(items)).await;
    let elapsed = started.elapsed();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!(items));
    eprintln!("40 CPU-bound steps of 100 ms on one worker with 2 executors: {elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(3200),
        "40 × 100 ms took {elapsed:?}: not run in parallel"
    );
}

#[tokio::test]
async fn step_blocked_in_c_fails_at_its_timeout_and_the_worker_keeps_serving() {
    // One executor, so the next step needs the killed one's replacement.
    let fleet = fleet(&["--python-executors", "1"]).await;
    let before = executor_pid(&fleet).await;
    let started = Instant::now();
    let definition = json!({"steps": [{
        "id": "nap",
        "timeout_s": 1,
        "python_code": "import time\n\ndef main(input):\n    time.sleep(60)\n",
    }]});
    let run = fleet.run(&definition, &json!(null)).await;
    let failed_after = started.elapsed();
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["steps"]["nap"]["error"]["type"], "timeout", "{run}");
    // Its timeout, then the kill grace period (2 s) it gets to stop before its executor is
    // killed: the attempt is reported once the step is really over.
    assert!(failed_after < Duration::from_secs(6), "{failed_after:?}");
    let after = executor_pid(&fleet).await;
    let served_after = started.elapsed();
    assert_ne!(before, after, "the blocked executor was replaced");
    assert!(served_after < Duration::from_secs(8), "{served_after:?}");
}

#[tokio::test]
async fn a_step_stopped_at_its_timeout_keeps_what_it_printed_up_to_its_end() {
    let fleet = fleet(&["--python-executors", "1"]).await;
    let definition = json!({"steps": [{
        "id": "slow",
        "timeout_s": 1,
        "python_code": "import time\n\ndef main(input):\n    print('started')\n    try:\n        while True:\n            time.sleep(0.01)\n    finally:\n        print('cleaning up')\n",
    }]});
    let run = fleet.run(&definition, &json!(null)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let step = &run["steps"]["slow"];
    assert_eq!(step["error"]["type"], "timeout", "{run}");
    let logs = step["logs"].as_str().unwrap_or_default();
    assert!(
        logs.contains("started") && logs.contains("cleaning up"),
        "{run:#}"
    );
    // The executor was not killed: it serves the next step.
    assert_eq!(executor_pid(&fleet).await, executor_pid(&fleet).await);
}

#[tokio::test]
async fn executor_over_its_memory_limit_is_recycled_without_failing_its_step() {
    let fleet = fleet(&["--python-executors", "1", "--python-max-rss-mb", "150"]).await;
    let before = executor_pid(&fleet).await;
    let leak = "import os\n\nkept = []\n\ndef main(input):\n    kept.append(b'x' * (200 * 1024 * 1024))\n    return os.getpid()\n";
    let run = fleet.run(&code(leak), &json!(null)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!(before));
    assert_ne!(executor_pid(&fleet).await, before);
}

#[tokio::test]
async fn async_steps_are_awaited() {
    let fleet = fleet(&[]).await;
    let source = "import asyncio\n\nasync def main(input, ctx):\n    await asyncio.sleep(0.01)\n    return {'next': input + 1, 'attempt': ctx.attempt}\n";
    let run = fleet.run(&code(source), &json!(41)).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], json!({"next": 42, "attempt": 1}));
}

#[tokio::test]
async fn module_only_in_the_virtualenv_imports() {
    let mut fleet = fleet(&[]).await;
    let version = fleet
        .run(
            &code("import sys\n\ndef main(input):\n    return '%d.%d' % sys.version_info[:2]\n"),
            &json!(null),
        )
        .await;
    let version = version["output"].as_str().unwrap().to_owned();
    let venv = std::env::temp_dir().join(format!("taskfleet-venv-{}", fleet.namespace));
    let site_packages = venv
        .join("lib")
        .join(format!("python{version}"))
        .join("site-packages");
    std::fs::create_dir_all(&site_packages).unwrap();
    std::fs::write(
        site_packages.join("venv_only_steps.py"),
        "def greet(name):\n    return 'hello ' + name\n",
    )
    .unwrap();
    fleet
        .start_worker_with(&["--queues", "venv", "--venv", venv.to_str().unwrap()])
        .unwrap();
    let definition =
        json!({"steps": [{"id": "greet", "python": "venv_only_steps:greet", "queue": "venv"}]});
    let run = fleet.run(&definition, &json!("venv")).await;
    let _ = std::fs::remove_dir_all(&venv);
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["output"], "hello venv");
    // The worker without the virtualenv cannot import it, and says where it looked.
    let definition = json!({"steps": [{"id": "greet", "python": "venv_only_steps:greet"}]});
    let run = fleet.run(&definition, &json!("plain")).await;
    assert_eq!(run["status"], "failed", "{run}");
    let message = run["steps"]["greet"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("'venv_only_steps'"), "{message}");
    assert!(message.contains("sys.path"), "{message}");
}

#[tokio::test]
async fn step_that_ends_its_executor_fails_with_worker_lost_and_the_worker_stays() {
    let fleet = fleet(&["--python-executors", "1"]).await;
    let definition = json!({"steps": [{"id": "crash", "python": "fleet_steps:crash_executor"}]});
    let run = fleet.run(&definition, &json!(null)).await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = &run["steps"]["crash"]["error"];
    assert_eq!(error["type"], "worker_lost", "{run}");
    assert!(
        error["message"].as_str().unwrap().contains("SIGKILL"),
        "{error}"
    );
    executor_pid(&fleet).await;
}
