//! Processes a Python step starts do not outlive its call. The executor is the reaper of every
//! process its steps start (`PR_SET_CHILD_SUBREAPER`), so that one orphaned on purpose (a
//! daemon's double fork, `start_new_session=True`) comes back to it rather than to init; after
//! a call, every child of the executor is killed and reaped, and so are the orphans those
//! leave, until none is left.
//!
//! Two things are left as they are. A `subprocess.Popen` a module keeps across calls finds its
//! process already reaped: CPython then reports a return code of 0. And a process a step's
//! background thread starts after the call lives until the end of the next call that looks
//! for leftovers.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

/// A call shorter than this started no process: forking an interpreter alone takes longer. The
/// executor looks for leftovers only after longer calls, so quick steps pay nothing for it.
pub const SHORTEST_SPAWNING_CALL: Duration = Duration::from_micros(50);

/// How many rounds of killing a call's leftovers are made at most: each round's kills may
/// orphan grandchildren, which the next round finds.
const MAX_ROUNDS: usize = 64;

/// How long killed processes are waited for, in all, after a call.
const REAP_WITHIN: Duration = Duration::from_secs(1);

/// Makes this process the reaper of the processes its steps start, and checks that the
/// kernel lists a process's children. Returns what is missing, if anything: without either,
/// processes a step starts may outlive it.
pub fn adopt_orphans() -> Result<(), &'static str> {
    if nix::sys::prctl::set_child_subreaper(true).is_err() {
        return Err("this kernel does not let the python executor adopt orphans");
    }
    if !std::path::Path::new("/proc/thread-self/children").exists() {
        return Err("this kernel does not list a process's children (CONFIG_PROC_CHILDREN)");
    }
    Ok(())
}

/// Kills and reaps every child of this process, repeatedly, until it has none (orphans of the
/// killed ones come back to it); returns how many were killed. A child that cannot be killed
/// (a setuid program that changed its user) or reaped in time is logged and left.
pub fn kill_children() -> usize {
    let mut killed = 0;
    let mut left: Vec<Pid> = Vec::new();
    let deadline = std::time::Instant::now() + REAP_WITHIN;
    for _ in 0..MAX_ROUNDS {
        let children: Vec<Pid> = children()
            .into_iter()
            .filter(|pid| !left.contains(pid))
            .collect();
        if children.is_empty() {
            return killed;
        }
        let mut dying = Vec::new();
        for pid in children {
            match kill(pid, Signal::SIGKILL) {
                Ok(()) => dying.push(pid),
                Err(error) => {
                    tracing::warn!(pid = pid.as_raw(), %error, "cannot kill a process a step left running");
                    left.push(pid);
                }
            }
        }
        killed += dying.len();
        // Killed processes die at once unless they sleep in the kernel; each is reaped, or
        // left, by the deadline.
        while !dying.is_empty() {
            dying.retain(|pid| {
                matches!(
                    waitpid(*pid, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)),
                    Ok(WaitStatus::StillAlive)
                )
            });
            if dying.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                tracing::warn!(
                    processes = dying.len(),
                    "processes a step left running did not die in time"
                );
                left.extend(dying);
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    tracing::warn!("processes a step left running kept starting others; some are left");
    killed
}

/// The children of this process, from `/proc/self/task/*/children` (each thread's own).
fn children() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(listed) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                listed
                    .split_ascii_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}
