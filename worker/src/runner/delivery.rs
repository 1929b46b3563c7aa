//! Deliveries: reads the tasks a delivery carries (one, or a bundle of several), runs each (see
//! `execute`) and hands its completion to the report loop. Every task message ends in a
//! completion: one this worker cannot read fails with `invalid_task`, and one that names no task
//! at all goes to the dead-letters queue. What a redelivered task does is `redelivery`'s; a task
//! that starts late under a rate limit may be deferred instead of run (`rate`). This
//! module never acknowledges a delivery directly: its `PendingDelivery` (see `crate::report`)
//! does, once every task it carried is reported or dead-lettered.

use std::ops::Range;
use std::sync::Arc;

use chrono::Utc;
use lapin::message::Delivery;
use serde::Deserialize;
use taskfleet_common::error::{INVALID_TASK, WORKER_LOST};
use taskfleet_common::protocol::{
    self, CompletionMessage, DecodeError, Outcome, PROTOCOL_VERSION, Ran, TaskMessage,
};
use taskfleet_common::{RunId, StepError, TaskId, value};

use tracing::Instrument as _;

use super::Shared;
use super::redelivery::{Redelivery, is_copy};
use crate::report::{PendingDelivery, Report};

/// Reads the tasks a delivery carries (one, or a bundle of several) and runs them; the delivery
/// is acknowledged once every one of them is reported. A bundle that comes back from a lost
/// worker is first put back as single tasks (see [`Shared::split_redelivered`]), so that a task
/// that takes its worker down is counted, and fails, alone.
pub(super) async fn handle(shared: Arc<Shared>, delivery: Delivery) {
    let ranges = match protocol::unbundle(&delivery.data) {
        Ok(bodies) => ranges_within(&delivery.data, &bodies),
        Err(error) => {
            let pending = PendingDelivery::new(delivery, 1);
            let body = pending.delivery().data.clone();
            shared.dead_letter(&body, &error, &pending).await;
            return;
        }
    };
    if ranges.len() > 1
        && delivery.redelivered
        && shared.split_redelivered(&delivery, &ranges).await
    {
        return;
    }
    let bundled = ranges.len() > 1;
    let queue = shared
        .namespace
        .task_queue_name(delivery.routing_key.as_str())
        .map(Arc::<str>::from);
    let pending = PendingDelivery::new(delivery, ranges.len());
    let tasks = ranges
        .into_iter()
        .map(|range| handle_task(&shared, &pending, range, bundled, queue.as_ref()));
    futures_util::future::join_all(tasks).await;
}

/// Returns where each of `parts` (slices of `body`) lies within `body`.
fn ranges_within(body: &[u8], parts: &[&[u8]]) -> Vec<Range<usize>> {
    let base = body.as_ptr() as usize;
    parts
        .iter()
        .map(|part| {
            let start = (part.as_ptr() as usize).saturating_sub(base);
            start..start + part.len()
        })
        .collect()
}

/// Reads, runs and reports one task of a delivery (`body` is where it lies in the delivery's
/// body, `queue` the task queue it came from), counted among the tasks held meanwhile. A task
/// is failed without running when its input cannot travel, and a success is turned into a
/// failure when its output cannot.
async fn handle_task(
    shared: &Shared,
    pending: &Arc<PendingDelivery>,
    body: Range<usize>,
    bundled: bool,
    queue: Option<&Arc<str>>,
) {
    // Counted from delivery to report, whichever way this ends.
    let _held = queue.map(|queue| shared.held.hold(queue));
    let delivery = pending.delivery();
    let body = &delivery.data[body];
    let task: TaskMessage = match protocol::decode(body) {
        Ok(task) => task,
        Err(error) => {
            shared.refuse(body, &error, pending).await;
            return;
        }
    };
    let span = task_span(&task);
    run_task(shared, pending, task, body, bundled, queue)
        .instrument(span)
        .await;
}

/// Returns the span of a task, whose fields every line logged while it is handled carries.
fn task_span(task: &TaskMessage) -> tracing::Span {
    let span = tracing::info_span!(
        "task",
        trace_id = tracing::field::Empty,
        run_id = %task.run_id,
        task_id = %task.task_id,
        step = %task.step_id,
        attempt = task.attempt,
    );
    if let Some(trace_id) = task.trace_id {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// Runs and reports one task read from `body`, part of `pending`'s delivery.
async fn run_task(
    shared: &Shared,
    pending: &Arc<PendingDelivery>,
    task: TaskMessage,
    body: &[u8],
    bundled: bool,
    queue: Option<&Arc<str>>,
) {
    let delivery = pending.delivery();
    shared.until_requeued(&task, delivery).await;
    let started_at = Utc::now();
    let checked = value::check(&task.input);
    let redelivery = match &checked {
        Ok(()) if delivery.redelivered || is_copy(delivery) => {
            shared.redelivered(&task, body, delivery, bundled).await
        }
        _ => Redelivery::Run,
    };
    // An outcome another delivery reached already had its span.
    let repeated = matches!(redelivery, Redelivery::Finished(_));
    let (outcome, logs, ran) = match (checked, redelivery) {
        (_, Redelivery::Requeued) => return,
        (_, Redelivery::Finished(outcome)) => (outcome, None, None),
        (_, Redelivery::WorkerLost(deliveries)) => {
            let error = StepError::new(
                WORKER_LOST,
                format!(
                    "the task lost its worker {} times (delivered {deliveries} times without finishing)",
                    deliveries - 1
                ),
            );
            (Outcome::Failed { error }, None, None)
        }
        (Ok(()), Redelivery::Run) => {
            // Closed only when the worker stops, and then nothing is waiting here.
            let _slot = shared.slots.acquire().await;
            if let Some(deferred) = shared.over_rate_limit(&task).await {
                crate::metrics::task_deferred(
                    queue.map_or("unknown", |queue| queue),
                    crate::metrics::kind(&task.step),
                );
                report(shared, pending, &task, deferred, started_at);
                return;
            }
            let _running = crate::metrics::InFlight::start();
            let began = std::time::Instant::now();
            let executed = shared.execute(&task, started_at).await;
            crate::metrics::task_ran(
                queue.map_or("unknown", |queue| queue),
                crate::metrics::kind(&task.step),
                &executed.0,
                began.elapsed().as_secs_f64(),
            );
            executed
        }
        (Err(error), Redelivery::Run) => {
            let error = StepError::new(INVALID_TASK, format!("step input cannot be used: {error}"));
            (Outcome::Failed { error }, None, None)
        }
    };
    let executor_time = ran;
    let ran = ran.zip(queue).map(|(time, queue)| Ran {
        queue: queue.to_string(),
        micros: u64::try_from(time.ran.as_micros()).unwrap_or(u64::MAX),
    });
    let finished_at = Utc::now();
    // The task's span carries its ids.
    tracing::debug!(
        succeeded = matches!(outcome, Outcome::Succeeded { .. }),
        "task finished"
    );
    if !repeated {
        super::spans::export(&super::spans::Attempt {
            task: &task,
            queue: queue.map(|queue| &**queue),
            worker_id: &shared.worker_id,
            outcome: &outcome,
            started_at,
            finished_at,
            executor: executor_time,
        });
    }
    let completion = CompletionMessage {
        finished_at,
        logs,
        ran,
        ..completion(shared, &task, outcome, started_at)
    };
    shared.reporter.send(Report {
        completion,
        delivery: pending.clone(),
    });
}

/// The completion of one attempt of `task` that ended now with `outcome`, without logs or an
/// executor's time.
fn completion(
    shared: &Shared,
    task: &TaskMessage,
    outcome: Outcome,
    started_at: chrono::DateTime<Utc>,
) -> CompletionMessage {
    CompletionMessage {
        version: PROTOCOL_VERSION,
        task_id: task.task_id,
        run_id: task.run_id,
        attempt: task.attempt,
        worker_id: shared.worker_id.clone(),
        outcome,
        started_at,
        finished_at: Utc::now(),
        logs: None,
        ends_run: task.ends_run,
        ran: None,
    }
}

/// Reports an attempt that did not start: no span, no time, nothing it ran.
fn report(
    shared: &Shared,
    pending: &Arc<PendingDelivery>,
    task: &TaskMessage,
    outcome: Outcome,
    started_at: chrono::DateTime<Utc>,
) {
    shared.reporter.send(Report {
        completion: completion(shared, task, outcome, started_at),
        delivery: pending.clone(),
    });
}

/// The identity of a task, read from a message that does not decode as a whole (a protocol
/// version or a step kind this build does not know, an input nested too deep to read). Every
/// other field is skipped; `serde_json` skips values without a depth limit.
#[derive(Deserialize)]
pub(super) struct TaskIdentity {
    pub(super) task_id: TaskId,
    pub(super) run_id: RunId,
    pub(super) attempt: u32,
    #[serde(default)]
    step_id: Option<String>,
}

impl Shared {
    /// Fails a task this worker cannot read (`body`, one task of `pending`), so that its run
    /// does not wait for it forever. A message without even a task's identity is moved to the
    /// dead-letters queue instead: redelivering it would loop forever.
    async fn refuse(&self, body: &[u8], error: &DecodeError, pending: &Arc<PendingDelivery>) {
        let Ok(identity) = serde_json::from_slice::<TaskIdentity>(body) else {
            self.dead_letter(body, error, pending).await;
            return;
        };
        tracing::error!(
            task_id = %identity.task_id,
            run_id = %identity.run_id,
            step = identity.step_id.as_deref().unwrap_or_default(),
            attempt = identity.attempt,
            %error,
            "failing a task this worker cannot read"
        );
        let now = Utc::now();
        let completion = CompletionMessage {
            version: PROTOCOL_VERSION,
            task_id: identity.task_id,
            run_id: identity.run_id,
            attempt: identity.attempt,
            worker_id: self.worker_id.clone(),
            outcome: Outcome::Failed {
                error: StepError::new(
                    INVALID_TASK,
                    format!("the worker cannot read this task: {error}"),
                ),
            },
            started_at: now,
            finished_at: now,
            logs: None,
            ends_run: false,
            ran: None,
        };
        self.reporter.send(Report {
            completion,
            delivery: pending.clone(),
        });
    }

    /// Moves a message that names no task (`body`, one task of `pending`, or all of it) to the
    /// dead-letters queue, with why and where it came from; drops it if even that fails.
    async fn dead_letter(&self, body: &[u8], error: &DecodeError, pending: &PendingDelivery) {
        let source = pending.delivery().routing_key.as_str().to_owned();
        match self
            .broker
            .current()
            .dead_letter(body, &error.to_string(), &source)
            .await
        {
            Ok(()) => {
                tracing::error!(%error, queue = source, "a task message names no task; moved to the dead letters");
            }
            Err(publish_error) => {
                tracing::error!(%error, %publish_error, "dropping a task message that names no task");
            }
        }
        pending.done_one().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns a task message body with `version`, `step` and `input` as given.
    fn body(task_id: TaskId, run_id: RunId, version: u32, step: &str, input: &str) -> Vec<u8> {
        format!(
            r#"{{"version":{version},"task_id":"{task_id}","run_id":"{run_id}","step_id":"s","attempt":3,"step":{step},"input":{input}}}"#
        )
        .into_bytes()
    }

    fn check(body: &[u8], expected: Option<(TaskId, RunId, u32)>) {
        let identity = serde_json::from_slice::<TaskIdentity>(body)
            .ok()
            .map(|identity| (identity.task_id, identity.run_id, identity.attempt));
        assert_eq!(identity, expected, "{}", String::from_utf8_lossy(body));
    }

    #[test]
    fn identity_is_read_from_tasks_that_do_not_decode() {
        let (task_id, run_id) = (TaskId::new(), RunId::new());
        let expected = Some((task_id, run_id, 3));
        let dataflow = r#"{"kind":"dataflow","program":"."}"#;
        let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));

        let readable = body(task_id, run_id, PROTOCOL_VERSION, dataflow, "1");
        assert!(protocol::decode::<TaskMessage>(&readable).is_ok());
        check(&readable, expected);

        let newer = body(task_id, run_id, 2, dataflow, "1");
        let error = protocol::decode::<TaskMessage>(&newer).expect_err("version 2 is refused");
        assert_eq!(
            error.to_string(),
            "message has protocol version 2, this build reads version 1"
        );
        check(&newer, expected);

        let unknown_kind = body(task_id, run_id, 1, r#"{"kind":"rust"}"#, "1");
        assert!(protocol::decode::<TaskMessage>(&unknown_kind).is_err());
        check(&unknown_kind, expected);

        let too_deep = body(task_id, run_id, 1, dataflow, &deep);
        assert!(protocol::decode::<TaskMessage>(&too_deep).is_err());
        check(&too_deep, expected);
    }

    #[test]
    fn messages_without_an_identity_have_none() {
        check(b"not json", None);
        check(b"[]", None);
        check(br#"{"version":1,"attempt":1}"#, None);
        let no_attempt = format!(
            r#"{{"task_id":"{}","run_id":"{}"}}"#,
            TaskId::new(),
            RunId::new()
        );
        check(no_attempt.as_bytes(), None);
        let bad_id = format!(
            r#"{{"task_id":"x","run_id":"{}","attempt":1}}"#,
            RunId::new()
        );
        check(bad_id.as_bytes(), None);
    }
}
