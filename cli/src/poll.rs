//! Waiting for a run or job to finish: repeated long polls, each capped, until it finishes or
//! an optional deadline passes, with progress on stderr.
//!
//! It decides when a run is finished; what to print about the result belongs to
//! [`crate::report`].

use std::time::Duration;

use serde_json::Value;
use taskfleet_common::{RunStatus, StepStatus};
use tokio::time::Instant;

use crate::client::{ApiError, Client, Kind};

/// The longest single long poll: short, so that progress (steps running, items of a
/// `for_each` step done) shows as it happens; a finished run ends the poll at once anyway.
const MAX_POLL: Duration = Duration::from_secs(1);
/// The least time between two polls, so that a server that answers at once is not hammered.
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often a run with a `for_each` step under way is polled, to show its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// The width of the progress bar, in characters.
const BAR_WIDTH: usize = 30;

/// How a finished run or job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded; its `output` is the result.
    Succeeded,
    /// A step failed; its `error` says which and why.
    Failed,
    /// It was cancelled.
    Cancelled,
}

/// Returns how a run with `status` ended, or `None` while it is not finished (pending, running
/// or a status this client does not know).
pub fn outcome(status: &str) -> Option<Outcome> {
    match RunStatus::parse(status)? {
        RunStatus::Succeeded => Some(Outcome::Succeeded),
        RunStatus::Failed => Some(Outcome::Failed),
        RunStatus::Cancelled => Some(Outcome::Cancelled),
        RunStatus::Pending | RunStatus::Running => None,
    }
}

/// Returns whether a step of a run (as the API shows it) is running.
fn is_running(step: &Value) -> bool {
    run_status(step).and_then(StepStatus::parse) == Some(StepStatus::Running)
}

/// What waiting came to; each holds the run (or job) as last read.
#[derive(Debug)]
pub enum Waited {
    /// It finished.
    Finished(Outcome, Value),
    /// The deadline passed first.
    TimedOut(Value),
}

/// Waits for the run or job `id` to finish, for at most `timeout` (no limit without one).
pub async fn wait_until_finished(
    client: &Client,
    kind: Kind,
    id: &str,
    timeout: Option<Duration>,
) -> Result<Waited, ApiError> {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let mut last_progress = String::new();
    let mut bar_shown = false;
    let mut fanning_out = false;
    let mut first = true;
    loop {
        let started = Instant::now();
        let remaining = deadline.map(|deadline| deadline.saturating_duration_since(started));
        // The first look is at once, so that a fan-out's progress shows from the start even
        // when it ends before a long poll would have come back; then long polls, except while
        // a fan-out's progress is shown.
        let most = if fanning_out || std::mem::take(&mut first) {
            Duration::ZERO
        } else {
            MAX_POLL
        };
        let wait = remaining.map_or(most, |remaining| remaining.min(most));
        let run = client.show(kind, id, Some(wait)).await?;
        // The client has checked that the answer has a status.
        if let Some(outcome) = run_status(&run).and_then(outcome) {
            if bar_shown {
                eprintln!();
            }
            return Ok(Waited::Finished(outcome, run));
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            if bar_shown {
                eprintln!();
            }
            return Ok(Waited::TimedOut(run));
        }
        let fan_out = fan_out_progress(&run);
        fanning_out = fan_out.is_some();
        let progress = match fan_out {
            Some((step, done, total)) => progress_bar(step, done, total),
            None => describe_progress(kind, id, &run),
        };
        if progress != last_progress {
            if fanning_out && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                // Redrawn in place on a terminal.
                eprint!("\r{progress}");
                bar_shown = true;
            } else {
                if bar_shown {
                    eprintln!();
                    bar_shown = false;
                }
                eprintln!("{progress}");
            }
            last_progress = progress;
        }
        let interval = if fanning_out {
            PROGRESS_INTERVAL
        } else {
            MIN_POLL_INTERVAL
        };
        pace(started, interval, deadline).await;
    }
}

/// Returns the first running `for_each` step of a run with its items done and in all.
pub fn fan_out_progress(run: &Value) -> Option<(&str, u64, u64)> {
    run.get("steps")?
        .as_object()?
        .iter()
        .filter(|(_, step)| is_running(step))
        .find_map(|(id, step)| {
            let items = step.get("items")?;
            let done = items.get("done")?.as_u64()?;
            let total = items.get("total")?.as_u64()?;
            Some((id.as_str(), done, total))
        })
}

/// Returns a progress bar line: `step [#####.....] done/total`.
pub fn progress_bar(step: &str, done: u64, total: u64) -> String {
    let filled = (done.min(total) * BAR_WIDTH as u64)
        .checked_div(total)
        .map_or(BAR_WIDTH, |filled| {
            usize::try_from(filled).unwrap_or(BAR_WIDTH)
        });
    format!(
        "{step} [{}{}] {done}/{total}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled)
    )
}

/// Sleeps when a poll came back early without the run finishing, so polls stay at least
/// `interval` apart (never past the deadline).
async fn pace(started: Instant, interval: Duration, deadline: Option<Instant>) {
    let mut next = started + interval;
    if let Some(deadline) = deadline {
        next = next.min(deadline);
    }
    tokio::time::sleep_until(next).await;
}

/// Returns a run's status, if the answer has one.
pub fn run_status(run: &Value) -> Option<&str> {
    run.get("status").and_then(Value::as_str)
}

/// Returns the ids of a run's steps that are running, in id order.
pub fn running_steps(run: &Value) -> Vec<&str> {
    run.get("steps")
        .and_then(Value::as_object)
        .map(|steps| {
            steps
                .iter()
                .filter(|(_, step)| is_running(step))
                .map(|(id, _)| id.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// Returns a one-line account of where a run stands, for stderr.
pub fn describe_progress(kind: Kind, id: &str, run: &Value) -> String {
    let status = run_status(run).unwrap_or("unknown");
    let running = running_steps(run);
    if running.is_empty() {
        format!("{} {id}: {status}", kind.noun())
    } else {
        format!(
            "{} {id}: {status}, running {}",
            kind.noun(),
            running.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn progress_bars_fill_with_the_items_done() {
        assert_eq!(
            progress_bar("each", 0, 10),
            format!("each [{}] 0/10", ".".repeat(30))
        );
        assert_eq!(
            progress_bar("each", 5, 10),
            format!("each [{}{}] 5/10", "#".repeat(15), ".".repeat(15))
        );
        assert_eq!(
            progress_bar("each", 10, 10),
            format!("each [{}] 10/10", "#".repeat(30))
        );
        let run = json!({"status": "running", "steps": {
            "a": {"status": "succeeded"},
            "b": {"status": "running", "items": {"done": 3, "total": 9}}}});
        assert_eq!(fan_out_progress(&run), Some(("b", 3, 9)));
    }

    fn check(status: &str, expected: Option<Outcome>) {
        assert_eq!(outcome(status), expected, "{status:?}");
    }

    #[test]
    fn only_terminal_statuses_are_finished() {
        check("succeeded", Some(Outcome::Succeeded));
        check("failed", Some(Outcome::Failed));
        check("cancelled", Some(Outcome::Cancelled));
        check("pending", None);
        check("running", None);
        check("skipped", None);
        check("", None);
        check("SUCCEEDED", None);
    }

    #[test]
    fn progress_names_the_running_steps() {
        let run = json!({"status": "running", "steps": {
            "b": {"status": "running"}, "a": {"status": "running"},
            "c": {"status": "succeeded"}, "d": {"status": "pending"},
        }});
        assert_eq!(running_steps(&run), ["a", "b"]);
        assert_eq!(
            describe_progress(Kind::Run, "r1", &run),
            "run r1: running, running a, b"
        );
        let pending = json!({"status": "pending", "steps": {}});
        assert_eq!(
            describe_progress(Kind::Job, "j1", &pending),
            "job j1: pending"
        );
        assert_eq!(
            running_steps(&json!({"status": "running"})),
            Vec::<&str>::new()
        );
    }
}
