//! The pool of Python executor processes, driven directly: real `taskfleet-worker` executor
//! processes, no broker needed.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use taskfleet_common::StepError;
use taskfleet_common::error::{TIMEOUT, WORKER_LOST};
use taskfleet_worker::executor::pool::{PoolSettings, PythonPool};
use taskfleet_worker::executor::python::{PythonSettings, PythonTarget, StepContext};

fn settings(executors: usize) -> PoolSettings {
    PoolSettings {
        program: PathBuf::from(env!("CARGO_BIN_EXE_taskfleet-worker")),
        executors: NonZeroUsize::new(executors).expect("at least one"),
        max_tasks: None,
        max_rss_bytes: None,
        kill_grace: Duration::from_millis(500),
        python: PythonSettings::default(),
    }
}

async fn start(settings: PoolSettings) -> PythonPool {
    PythonPool::start(settings)
        .await
        .expect("starting the pool")
}

fn ctx() -> StepContext {
    StepContext {
        run_id: "run".to_owned(),
        task_id: "task".to_owned(),
        step_id: "step".to_owned(),
        attempt: 1,
        trace_id: None,
    }
}

fn code(body: &str) -> PythonTarget {
    PythonTarget::Code {
        source: format!("import os, sys, time\n\ndef main(input):\n{body}\n"),
    }
}

const PID: &str = "    return os.getpid()";

async fn call(pool: &PythonPool, body: &str, limit: Option<Duration>) -> Result<Value, StepError> {
    pool.call(code(body), json!(null), ctx(), limit)
        .await
        .result
}

async fn pid(pool: &PythonPool) -> u64 {
    call(pool, PID, None)
        .await
        .expect("the pid step succeeds")
        .as_u64()
        .expect("a pid")
}

#[tokio::test]
async fn calls_run_on_several_executors_at_once() {
    let pool = start(settings(2)).await;
    let started = Instant::now();
    let body = "    time.sleep(0.5)\n    return os.getpid()";
    let (a, b) = tokio::join!(call(&pool, body, None), call(&pool, body, None));
    let elapsed = started.elapsed();
    assert_ne!(a.expect("a succeeds"), b.expect("b succeeds"));
    assert!(elapsed < Duration::from_millis(950), "{elapsed:?}");
}

#[tokio::test]
async fn outputs_and_logs_cross_the_process_boundary() {
    let pool = start(settings(1)).await;
    let target = PythonTarget::Code {
        source: "def main(input, ctx):\n    print('seen', input['n'])\n    ctx.logger.info('from the logger')\n    return {'twice': input['n'] * 2, 'step': ctx.step_id, 'big': 2**64 - 1}\n".to_owned(),
    };
    let output = pool.call(target, json!({"n": 21}), ctx(), None).await;
    assert_eq!(
        output.result,
        Ok(json!({"twice": 42, "step": "step", "big": u64::MAX}))
    );
    assert!(output.logs.contains("seen 21\n"), "{:?}", output.logs);
    assert!(output.logs.contains("from the logger"), "{:?}", output.logs);
    let error = call(&pool, "    raise ValueError('nope')", None)
        .await
        .expect_err("the step raises");
    assert_eq!(
        (error.kind.as_str(), error.message.as_str()),
        ("ValueError", "nope")
    );
    assert!(error.traceback.is_some());
}

#[tokio::test]
async fn step_blocked_in_c_is_killed_at_its_timeout_and_its_executor_replaced() {
    let pool = start(settings(1)).await;
    let before = pid(&pool).await;
    let started = Instant::now();
    let error = call(&pool, "    time.sleep(60)", Some(Duration::from_secs(1)))
        .await
        .expect_err("the step times out");
    let timed_out = started.elapsed();
    assert_eq!(error.kind, TIMEOUT, "{error:?}");
    // Answered once the step is over: after its timeout and the kill grace period (500 ms)
    // that a step blocked in C cannot use.
    assert!(timed_out < Duration::from_millis(2500), "{timed_out:?}");
    // The only executor was killed after the grace period and replaced.
    let after = pid(&pool).await;
    let recovered = started.elapsed();
    assert_ne!(before, after);
    assert!(recovered < Duration::from_secs(5), "{recovered:?}");
}

#[tokio::test]
async fn spinning_step_is_interrupted_and_its_executor_kept() {
    let pool = start(settings(1)).await;
    let before = pid(&pool).await;
    let error = call(
        &pool,
        "    while True:\n        pass",
        Some(Duration::from_millis(300)),
    )
    .await
    .expect_err("the step times out");
    assert_eq!(error.kind, TIMEOUT, "{error:?}");
    assert_eq!(pid(&pool).await, before);
}

#[tokio::test]
async fn interrupted_step_can_catch_taskfleet_step_cancelled() {
    let pool = start(settings(1)).await;
    let marker = std::env::temp_dir().join(format!("step-cancelled-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let target = PythonTarget::Code {
        source: "import taskfleet\n\ndef main(path):\n    try:\n        while True:\n            pass\n    except taskfleet.StepCancelled:\n        open(path, 'w').write('cleaned up')\n        raise\n".to_owned(),
    };
    let output = pool
        .call(
            target,
            json!(marker.to_str().expect("a UTF-8 path")),
            ctx(),
            Some(Duration::from_millis(300)),
        )
        .await;
    assert_eq!(
        output.result.map_err(|error| error.kind),
        Err(TIMEOUT.to_owned())
    );
    // The step's handler runs after the caller got its answer; the executor waits for it.
    pid(&pool).await;
    let written = std::fs::read_to_string(&marker).expect("the handler ran");
    let _ = std::fs::remove_file(&marker);
    assert_eq!(written, "cleaned up");
}

#[tokio::test]
async fn abandoned_call_is_stopped() {
    let pool = start(settings(1)).await;
    let before = pid(&pool).await;
    let spinning = call(&pool, "    while True:\n        pass", None);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), spinning)
            .await
            .is_err()
    );
    let started = Instant::now();
    assert_eq!(pid(&pool).await, before);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn executor_that_dies_in_a_step_fails_it_with_worker_lost() {
    let pool = start(settings(1)).await;
    let error = call(&pool, "    os._exit(3)", None)
        .await
        .expect_err("the executor dies");
    assert_eq!(error.kind, WORKER_LOST, "{error:?}");
    assert!(
        error.message.contains("exited with status 3"),
        "{}",
        error.message
    );
    pid(&pool).await;
}

#[tokio::test]
async fn executor_that_dies_while_idle_is_replaced_without_losing_a_call() {
    let pool = start(settings(1)).await;
    let before = pid(&pool).await;
    let killed = std::process::Command::new("kill")
        .args(["-9", &before.to_string()])
        .status()
        .expect("running kill");
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = pid(&pool).await;
    assert_ne!(before, after);
}

#[tokio::test]
async fn executors_are_replaced_after_max_tasks() {
    let pool = start(PoolSettings {
        max_tasks: Some(2),
        ..settings(1)
    })
    .await;
    let mut pids = Vec::new();
    for _ in 0..5 {
        pids.push(pid(&pool).await);
    }
    assert_eq!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
    assert_eq!(pids[2], pids[3]);
    assert_ne!(pids[3], pids[4]);
}

#[tokio::test]
async fn executor_over_its_memory_limit_is_replaced_after_finishing_its_step() {
    let pool = start(PoolSettings {
        max_rss_bytes: Some(150 * 1024 * 1024),
        ..settings(1)
    })
    .await;
    let before = pid(&pool).await;
    // Leaks about 200 MiB into a module global, as a leaking step would.
    let leak = "    global kept\n    kept = b'x' * (200 * 1024 * 1024)\n    return os.getpid()";
    let leaked = call(&pool, leak, None).await;
    assert_eq!(
        leaked,
        Ok(json!(before)),
        "the leaking step itself succeeds"
    );
    assert_ne!(pid(&pool).await, before);
}

#[tokio::test]
async fn unusable_virtualenv_fails_the_start_with_its_reason() {
    let missing = std::env::temp_dir().join(format!("no-such-venv-{}", std::process::id()));
    let error = PythonPool::start(PoolSettings {
        python: PythonSettings {
            virtual_env: Some(missing),
            ..PythonSettings::default()
        },
        ..settings(1)
    })
    .await
    .expect_err("the virtualenv is missing");
    let message = format!("{error:#}");
    assert!(message.contains("site-packages"), "{message}");
}
