//! What a Python step may use, against a real fleet: its executor's address space and open
//! files are limited, and where the kernel has Landlock it writes only to a scratch directory of
//! its own, which the next step finds empty.

#![allow(clippy::unwrap_used, missing_docs)]

use std::process::Command;

use serde_json::{Value, json};
use taskfleet_tests::{FleetOptions, TestFleet};

/// Whether this kernel has Landlock (its `landlock_create_ruleset` answers an ABI version).
fn kernel_has_landlock() -> bool {
    let probe = "import ctypes; libc = ctypes.CDLL(None, use_errno=True); \
                 print(libc.syscall(444, None, 0, 1))";
    Command::new("python3")
        .args(["-c", probe])
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .parse::<i64>()
                .ok()
        })
        .is_some_and(|abi| abi > 0)
}

async fn run_code(fleet: &TestFleet, code: &str) -> Value {
    let run = fleet
        .run(
            &json!({"steps": [{"id": "s", "python_code": code}]}),
            &json!(null),
        )
        .await;
    assert_eq!(run["status"], "succeeded", "{run}");
    run["output"].clone()
}

#[tokio::test]
async fn python_steps_run_within_limits_and_write_only_to_their_scratch_directory() {
    let settings = [
        ("TASKFLEET_PYTHON_EXECUTORS", "1"),
        ("TASKFLEET_PYTHON_MEMORY_MB", "768"),
        ("TASKFLEET_PYTHON_OPEN_FILES", "64"),
        // Nothing but the scratch directory.
        ("TASKFLEET_PYTHON_WRITABLE_PATHS", ""),
    ];
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env: settings
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
        ..FleetOptions::default()
    })
    .await
    .unwrap();

    let outside = std::env::temp_dir().join(format!("taskfleet-outside-{}", fleet.namespace));
    let writes = format!(
        "import os, tempfile\n\
         def main(_):\n\
         \x20   scratch = tempfile.gettempdir()\n\
         \x20   with open(os.path.join(scratch, 'left-behind.txt'), 'w') as f:\n\
         \x20       f.write('for the next step?')\n\
         \x20   try:\n\
         \x20       open({outside:?}, 'w').close()\n\
         \x20       outside = 'written'\n\
         \x20   except PermissionError:\n\
         \x20       outside = 'refused'\n\
         \x20   with open('/etc/passwd') as f:\n\
         \x20       readable = len(f.read()) > 0\n\
         \x20   return {{'scratch': scratch, 'listing': os.listdir(scratch), 'outside': outside, 'readable': readable}}\n"
    );
    let output = run_code(&fleet, &writes).await;
    assert_ne!(output["scratch"], "/tmp", "{output}");
    assert_eq!(output["listing"], json!(["left-behind.txt"]), "{output}");
    assert_eq!(output["readable"], true, "{output}");
    if kernel_has_landlock() {
        assert_eq!(output["outside"], "refused", "{output}");
        assert!(!outside.exists());
    }
    // The next step (on the same, only executor) finds the scratch directory empty.
    let output = run_code(
        &fleet,
        "import os, tempfile\ndef main(_):\n    return os.listdir(tempfile.gettempdir())\n",
    )
    .await;
    assert_eq!(output, json!([]));

    // Past the address space, allocations fail inside the step, which can go on.
    let output = run_code(
        &fleet,
        "def main(_):\n    try:\n        block = bytearray(2 * 1024 ** 3)\n        return len(block)\n    except MemoryError:\n        return 'MemoryError'\n",
    )
    .await;
    assert_eq!(output, "MemoryError");
    // Past the open files, opening fails with EMFILE.
    let output = run_code(
        &fleet,
        "import errno\ndef main(_):\n    held = []\n    try:\n        for _ in range(1000):\n            held.append(open('/dev/null'))\n    except OSError as error:\n        return errno.errorcode[error.errno]\n    finally:\n        for f in held:\n            f.close()\n    return 'no limit'\n",
    )
    .await;
    assert_eq!(output, "EMFILE");
    // The worker's settings (service URLs, keys) are not in a step's environment.
    let output = run_code(
        &fleet,
        "import os\ndef main(_):\n    return sorted(k for k in os.environ if k.startswith('TASKFLEET_'))\n",
    )
    .await;
    assert_eq!(output, json!([]));
    // The executor is still the same one, and serves.
    let output = run_code(
        &fleet,
        "import os\ndef main(_):\n    return os.getpid() > 0\n",
    )
    .await;
    assert_eq!(output, true);
}

/// Whether a process no longer runs: gone, or a zombie left to its parent.
fn ended(pid: u64) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    state.is_empty() || state.contains(") Z ")
}

/// Waits up to 10 s for processes to end; returns those still running.
async fn still_running(pids: &[u64]) -> Vec<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let running: Vec<u64> = pids.iter().copied().filter(|&pid| !ended(pid)).collect();
        if running.is_empty() || std::time::Instant::now() >= deadline {
            return running;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn processes_a_step_starts_end_with_its_call() {
    let fleet = TestFleet::start_with(FleetOptions {
        workers: 1,
        worker_env: vec![("TASKFLEET_PYTHON_EXECUTORS".to_owned(), "1".to_owned())],
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    // A step leaves processes behind: a child, one in a session of its own, and a daemon
    // (forked twice, its parent gone, so that it is nobody's child).
    let code = r#"import os, subprocess
def main(_):
    child = subprocess.Popen(["sleep", "600"]).pid
    detached = subprocess.Popen(["sleep", "601"], start_new_session=True).pid
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        daemon = os.fork()
        if daemon == 0:
            os.execvp("sleep", ["sleep", "602"])
        os.write(write, str(daemon).encode())
        os._exit(0)
    os.waitpid(middle, 0)
    os.close(write)
    daemon = int(os.read(read, 32))
    return [child, detached, daemon]
"#;
    let output = run_code(&fleet, code).await;
    let pids: Vec<u64> = output
        .as_array()
        .unwrap()
        .iter()
        .map(|pid| pid.as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{output}");
    let running = still_running(&pids).await;
    assert!(
        running.is_empty(),
        "processes outlived their step: {running:?}"
    );

    // A step blocked in C past its timeout gets its executor killed: the group goes with it.
    // The step writes its child's pid where the test finds it (the fleet's workers may write
    // to the temporary directory).
    let pid_file = std::env::temp_dir().join(format!("taskfleet-nap-{}", std::process::id()));
    let run = fleet
        .run(
            &json!({"steps": [{"id": "nap", "timeout_s": 1, "python_code":
                "import subprocess, time\ndef main(path):\n    child = subprocess.Popen(['sleep', '603'])\n    open(path, 'w').write(str(child.pid))\n    time.sleep(60)\n"}]}),
            &json!(pid_file),
        )
        .await;
    assert_eq!(run["steps"]["nap"]["error"]["type"], "timeout", "{run}");
    let child: u64 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&pid_file);
    let running = still_running(&[child]).await;
    assert!(
        running.is_empty(),
        "the process of a step that timed out lived on: {running:?}"
    );
}
