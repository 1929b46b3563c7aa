//! The text the commands print: JSON for stdout, and the messages about failed, cancelled and
//! timed-out runs for stderr. Pure formatting; the commands do the printing.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::client::{Accepted, Kind};
use crate::poll::{Outcome, run_status};

/// Returns `value` as indented JSON.
pub fn pretty(value: &Value) -> String {
    // Serialising a `Value` cannot fail: its map keys are strings.
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// Returns the one-line JSON `{"id", "status"}` of an accepted submission.
pub fn accepted(accepted: &Accepted) -> String {
    json!({"id": accepted.id, "status": accepted.status}).to_string()
}

/// Returns the steps of a run whose logs are asked for: all of them, or the step `only`;
/// `Err` names a step the run does not have.
pub fn logged_steps(run: &Value, only: Option<&str>) -> Result<Map<String, Value>, String> {
    let steps = run["steps"].as_object().cloned().unwrap_or_default();
    if let Some(step) = only
        && !steps.contains_key(step)
    {
        return Err(step.to_owned());
    }
    Ok(steps
        .into_iter()
        .filter(|(id, _)| only.is_none_or(|only| only == id.as_str()))
        .map(|(id, step)| {
            let logged = json!({
                "status": step["status"],
                "attempts": step["attempts"],
                "logs": step["logs"],
            });
            (id, logged)
        })
        .collect())
}

/// Returns the logs of steps (from [`logged_steps`]), each under a line naming the step, its
/// status and its attempts.
pub fn logs(steps: &Map<String, Value>) -> String {
    let mut text = String::new();
    for (id, step) in steps {
        let status = step["status"].as_str().unwrap_or("unknown");
        let attempts = step["attempts"].as_u64().unwrap_or(0);
        let _ = writeln!(text, "== {id} ({status}, attempts {attempts})");
        match step["logs"].as_str() {
            Some(logs) if !logs.is_empty() => {
                let _ = writeln!(text, "{}", logs.trim_end());
            }
            _ => {
                let _ = writeln!(text, "(nothing printed or logged)");
            }
        }
    }
    text.trim_end().to_owned()
}

/// Returns what to say about a run or job that failed or was cancelled: a headline, then the
/// error's traceback when it has one.
pub fn failure(kind: Kind, id: &str, outcome: Outcome, run: &Value) -> String {
    let verb = match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "was cancelled",
    };
    let error = &run["error"];
    let mut message = format!("{} {id} {verb}", kind.noun());
    if !error.is_null() {
        let _ = write!(message, ": {}", describe_error(error));
    }
    if let Some(traceback) = error.get("traceback").and_then(Value::as_str) {
        let _ = write!(message, "\n{}", traceback.trim_end());
    }
    message
}

/// Returns a one-line account of a run or step error `{"step"?, "type"?, "message", ...}`:
/// the message, prefixed with the step unless it already names it, then the type in brackets.
/// An error of another shape is shown as compact JSON.
pub fn describe_error(error: &Value) -> String {
    let text = |field: &str| error.get(field).and_then(Value::as_str);
    let Some(message) = text("message") else {
        return match error {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
    };
    let mut line = String::new();
    if let Some(step) = text("step")
        && !message.contains(&format!("{step:?}"))
    {
        let _ = write!(line, "step {step:?}: ");
    }
    line.push_str(message);
    if let Some(error_type) = text("type") {
        let _ = write!(line, " ({error_type})");
    }
    line
}

/// Returns what to say when a wait ran out of time, including how to resume it.
pub fn timed_out(kind: Kind, id: &str, timeout: Option<Duration>, run: &Value) -> String {
    let seconds = timeout.unwrap_or_default().as_secs_f64();
    let status = run_status(run).unwrap_or("unknown");
    let job_flag = match kind {
        Kind::Run => "",
        Kind::Job => " --job",
    };
    format!(
        "timed out after {seconds}s waiting for {} {id} (still {status}); \
         `taskfleet wait {id}{job_flag}` waits again",
        kind.noun()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_printed_under_their_step_and_an_unknown_step_is_named() {
        let run = json!({"steps": {
            "a": {"status": "succeeded", "attempts": 1, "logs": "hello\n"},
            "b": {"status": "failed", "attempts": 2, "logs": null},
        }});
        let all = logged_steps(&run, None).expect("every step");
        assert_eq!(
            logs(&all),
            "== a (succeeded, attempts 1)\nhello\n== b (failed, attempts 2)\n(nothing printed or logged)"
        );
        let one = logged_steps(&run, Some("a")).expect("step a exists");
        assert_eq!(logs(&one), "== a (succeeded, attempts 1)\nhello");
        assert_eq!(
            Value::Object(one),
            json!({"a": {"status": "succeeded", "attempts": 1, "logs": "hello\n"}})
        );
        assert_eq!(logged_steps(&run, Some("c")), Err("c".to_owned()));
    }

    fn check(error: Value, expected: &str) {
        assert_eq!(describe_error(&error), expected);
    }

    #[test]
    fn errors_read_as_step_type_and_message() {
        check(
            json!({"step": "price", "type": "ValueError", "message": "bad", "traceback": "T"}),
            "step \"price\": bad (ValueError)",
        );
        check(
            json!({"step": "price", "type": "timeout", "message": "step \"price\" failed: slow"}),
            "step \"price\" failed: slow (timeout)",
        );
        check(
            json!({"type": "timeout", "message": "too slow"}),
            "too slow (timeout)",
        );
        check(json!({"message": "gone"}), "gone");
        check(json!("plain"), "plain");
        check(json!({"odd": 1}), "{\"odd\":1}");
    }

    #[test]
    fn failures_carry_the_traceback() {
        let run = json!({"status": "failed", "error": {
            "step": "s", "type": "E", "message": "m", "traceback": "line 1\nline 2\n",
        }});
        assert_eq!(
            failure(Kind::Run, "r1", Outcome::Failed, &run),
            "run r1 failed: step \"s\": m (E)\nline 1\nline 2"
        );
        let cancelled = json!({"status": "cancelled", "error": null});
        assert_eq!(
            failure(Kind::Job, "j1", Outcome::Cancelled, &cancelled),
            "job j1 was cancelled"
        );
    }

    #[test]
    fn timeouts_say_how_to_resume() {
        let run = json!({"status": "running"});
        assert_eq!(
            timed_out(Kind::Job, "j1", Some(Duration::from_millis(1500)), &run),
            "timed out after 1.5s waiting for job j1 (still running); \
             `taskfleet wait j1 --job` waits again"
        );
    }
}
