//! Reads completion messages: every completion a broker message carries (one, or a bundle), each
//! on its own, and what identifies one that cannot be read whole. An attempt a worker deferred
//! (its late start was over a rate limit) is no completion: it is read as a deferral.

use chrono::Utc;
use lapin::message::Delivery;
use serde::Deserialize;
use serde_json::{Value, json};
use taskfleet_common::error::INVALID_OUTPUT;
use taskfleet_common::protocol::{self, CompletionMessage, Outcome, Ran};
use taskfleet_common::{RunId, TaskId, TaskStatus};

use crate::store::{Completion, Deferral};

/// The completions read from a batch of messages, and the bodies that name no task.
#[derive(Default)]
pub(super) struct Read {
    pub(super) completions: Vec<Completion>,
    /// Attempts that did not start, to be sent again after their delay.
    pub(super) deferred: Vec<Deferral>,
    pub(super) unreadable: Vec<Vec<u8>>,
    /// How long the steps that ran took, and on which queue.
    pub(super) ran: Vec<Ran>,
}

impl Read {
    /// Reads every completion a message carries (one, or a bundle).
    pub(super) fn add(&mut self, delivery: &Delivery) {
        let bodies = match protocol::unbundle(&delivery.data) {
            Ok(bodies) => bodies,
            Err(error) => {
                tracing::error!(%error, "a message of completions cannot be read; moving it to the dead letters");
                vec![delivery.data.as_slice()]
            }
        };
        for body in bodies {
            match read_completion(body) {
                Some(Body::Completion(completion, ran)) => {
                    let queue = ran.as_ref().map(|ran| ran.queue.as_str());
                    crate::metrics::completed(queue, completion.status);
                    self.completions.push(completion);
                    self.ran.extend(ran);
                }
                Some(Body::Deferred(deferral)) => self.deferred.push(deferral),
                None => self.unreadable.push(body.to_vec()),
            }
        }
    }

    /// How many messages it holds.
    pub(super) fn len(&self) -> usize {
        self.completions.len() + self.deferred.len() + self.unreadable.len()
    }
}

/// What a completion body says.
enum Body {
    /// An attempt ended, and, if it says so, how long its step ran.
    Completion(Completion, Option<Ran>),
    /// An attempt did not start; it is sent again after a delay.
    Deferred(Deferral),
}

/// The identity of a completion, readable even when the rest of the message is not.
#[derive(Deserialize)]
struct CompletionIdentity {
    task_id: TaskId,
    run_id: RunId,
    attempt: u32,
}

/// Reads a completion body. One that cannot be read but names its task becomes a failure of
/// that attempt, so its run still ends; one that names nothing is logged and dropped.
fn read_completion(body: &[u8]) -> Option<Body> {
    match protocol::decode::<CompletionMessage>(body) {
        Ok(message) => {
            let (status, output, error) = match &message.outcome {
                Outcome::Succeeded { output } => {
                    (TaskStatus::Succeeded, Some(output.clone()), None)
                }
                Outcome::Failed { error } => (
                    TaskStatus::Failed,
                    None,
                    Some(serde_json::to_value(error).unwrap_or(Value::Null)),
                ),
                Outcome::Deferred { delay_ms, reason } => {
                    tracing::debug!(task_id = %message.task_id, attempt = message.attempt, delay_ms, reason, "a worker deferred a task");
                    return Some(Body::Deferred(Deferral {
                        task_id: message.task_id.0,
                        attempt: i32::try_from(message.attempt).unwrap_or(i32::MAX),
                        delay: std::time::Duration::from_millis(*delay_ms),
                    }));
                }
            };
            let completion = Completion {
                task_id: message.task_id.0,
                run_id: message.run_id.0,
                attempt: i32::try_from(message.attempt).unwrap_or(i32::MAX),
                status,
                output,
                error,
                worker_id: message.worker_id,
                started_at: message.started_at,
                finished_at: message.finished_at,
                logs: message.logs,
                ends_run: message.ends_run,
            };
            Some(Body::Completion(completion, message.ran))
        }
        Err(error) => match serde_json::from_slice::<CompletionIdentity>(body) {
            Ok(identity) => {
                tracing::error!(task_id = %identity.task_id, %error, "failing the step of an unreadable completion");
                let now = Utc::now();
                let completion = Completion {
                    task_id: identity.task_id.0,
                    run_id: identity.run_id.0,
                    attempt: i32::try_from(identity.attempt).unwrap_or(i32::MAX),
                    status: TaskStatus::Failed,
                    output: None,
                    error: Some(json!({
                        "type": INVALID_OUTPUT,
                        "message": format!("the scheduler cannot read this step's completion: {error}"),
                    })),
                    worker_id: String::new(),
                    started_at: now,
                    finished_at: now,
                    logs: None,
                    ends_run: false,
                };
                Some(Body::Completion(completion, None))
            }
            Err(_) => {
                tracing::error!(%error, "a completion names no task; moving it to the dead letters");
                None
            }
        },
    }
}
