//! Processes a Python step starts do not outlive its call. The executor is the reaper of every
//! process its steps start (`PR_SET_CHILD_SUBREAPER`), so that one orphaned on purpose (a
//! daemon's double fork, `start_new_session=True`) comes back to it rather than to init; after
//! a call, every child of the executor is killed and reaped, and so are the orphans those
//! leave, until none is left.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

/// A call shorter than this started no process: forking an interpreter alone takes longer. The
/// executor looks for leftovers only after longer calls, so quick steps pay nothing for it.
pub const SHORTEST_SPAWNING_CALL: Duration = Duration::from_micros(50);

/// How many rounds of killing a call's leftovers are made at most: each round's kills may
/// orphan grandchildren, which the next round finds.
const MAX_ROUNDS: usize = 64;

/// Makes this process the reaper of the processes its steps start. Returns whether the kernel
/// agreed; without it, orphans that left the executor go to init and live on.
pub fn adopt_orphans() -> bool {
    nix::sys::prctl::set_child_subreaper(true).is_ok()
}

/// Kills and reaps every child of this process, repeatedly, until it has none; returns how
/// many were killed.
pub fn kill_children() -> usize {
    let mut killed = 0;
    for _ in 0..MAX_ROUNDS {
        let children = children();
        if children.is_empty() {
            break;
        }
        for &pid in &children {
            let _ = kill(pid, Signal::SIGKILL);
        }
        for &pid in &children {
            let _ = waitpid(pid, None);
        }
        killed += children.len();
    }
    killed
}

/// The children of this process, from `/proc/self/task/*/children` (each thread's own; empty
/// where the kernel does not list them).
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
