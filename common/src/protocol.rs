//! Messages between schedulers and workers. Every message carries an explicit `version`; a
//! receiver refuses versions it does not know instead of guessing.
//!
//! Tasks travel scheduler → worker on the task queues; completions travel worker → scheduler on
//! the completions queue. Both are JSON bodies of persistent AMQP messages. A broker message
//! carries one message (a JSON object) or a bundle of several (a JSON array of them), so that
//! many tasks or completions ready at once share the broker's cost per message; each message of
//! a bundle is read on its own, so one that cannot be read spoils none of the others.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::definition::StepKind;
use crate::error::StepError;
use crate::ids::{RunId, TaskId};
use crate::trace::TraceId;

/// The protocol version this build writes and reads.
pub const PROTOCOL_VERSION: u32 = 1;

/// One attempt of one task, as dispatched to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Always [`PROTOCOL_VERSION`] when written by this build.
    pub version: u32,
    /// The task.
    pub task_id: TaskId,
    /// The run the task belongs to.
    pub run_id: RunId,
    /// The step of the run's definition.
    pub step_id: String,
    /// The attempt number, from 1; also the fencing token of the completion.
    pub attempt: u32,
    /// What to run.
    pub step: StepKind,
    /// The step's input (sealed on the wire when encryption is on: `crate::seal`).
    #[serde(with = "crate::seal::value")]
    pub input: serde_json::Value,
    /// The longest the attempt may run, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Set when the run is this one step alone, planned without programs, so that the step's
    /// success ends the run. The worker repeats it in the completion; the scheduler then
    /// records the success and finishes the run in one statement.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ends_run: bool,
    /// The W3C trace the run belongs to, for the worker's logs and the step's `ctx.trace_id`.
    /// Optional, so that it needs no new version: a message without it (from a build that
    /// predates it, or of a run made before runs had traces) reads as none, and a build that
    /// predates it skips it, as it skips every field it does not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    /// The rate limits the attempt's start counts against, for a step with a `rate_limit` or a
    /// task of a queue with one; optional, as `trace_id` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateGate>,
    /// Set for a step with a concurrency limit: the attempt runs only under a lease no other
    /// delivery of it holds, so that a task delivered twice (its worker cut off from the broker
    /// while it still runs it, or sent again by the relay) never runs twice at once and takes
    /// no second permit. Optional, as `trace_id` is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
}

/// The rate limits a task's start counts against, and the start the scheduler reserved for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateGate {
    /// Each limit: the step's, its queue's.
    pub limits: Vec<RateSpec>,
    /// The time (milliseconds since the Unix epoch) the scheduler reserved the start for; none
    /// until it has reserved one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_ms: Option<i64>,
}

/// One rate limit: starts per second in a group, with a burst.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateSpec {
    /// The group the starts count in (`crate::definition::limits::group`).
    pub group: String,
    /// Starts per second.
    pub per_second: f64,
    /// How many may start at once after a quiet time.
    pub burst: u32,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The step returned a value.
    Succeeded {
        /// The step's output (sealed on the wire when encryption is on).
        #[serde(with = "crate::seal::value")]
        output: serde_json::Value,
    },
    /// The step failed.
    Failed {
        /// Why (sealed on the wire when encryption is on).
        #[serde(with = "crate::seal::payload")]
        error: StepError,
    },
    /// The attempt did not start: its start came late and is over a rate limit
    /// ([`TaskMessage::rate_limit`]). Not an attempt: the scheduler sends the same attempt again
    /// after `delay_ms`, and nothing else of it is recorded.
    Deferred {
        /// How long to wait before sending it again, in milliseconds.
        delay_ms: u64,
        /// Why, for the logs.
        reason: String,
    },
}

/// The report of one finished attempt, as sent by a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionMessage {
    /// Always [`PROTOCOL_VERSION`] when written by this build.
    pub version: u32,
    /// The task.
    pub task_id: TaskId,
    /// The run the task belongs to.
    pub run_id: RunId,
    /// The attempt this reports on; a completion for any other attempt than the current one is ignored.
    pub attempt: u32,
    /// The worker that ran it.
    pub worker_id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// When the worker started the attempt.
    pub started_at: DateTime<Utc>,
    /// When the attempt ended.
    pub finished_at: DateTime<Utc>,
    /// What the step printed or logged during the attempt (capped by the worker; sealed on the
    /// wire when encryption is on).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::seal::text"
    )]
    pub logs: Option<String>,
    /// The task's [`TaskMessage::ends_run`], repeated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ends_run: bool,
    /// The task queue the task came from, and how long the step took on its executor (for
    /// Python, from the moment an executor process took the call): what the scheduler learns
    /// each queue's cost from, to size its bundles. Absent from a task that did not run to its
    /// end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ran: Option<Ran>,
}

/// Where a step ran from and for how long; see [`CompletionMessage::ran`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ran {
    /// The task queue (its name in the workflow, not the broker's).
    pub queue: String,
    /// Microseconds the step took on its executor.
    pub micros: u64,
}

/// Describes why a message body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The body is not a message of this protocol.
    #[error("message is not valid: {0}")]
    Invalid(#[from] serde_json::Error),
    /// The message was written by a newer (or unknown) protocol version.
    #[error("message has protocol version {0}, this build reads version {PROTOCOL_VERSION}")]
    Version(u32),
}

#[derive(Deserialize)]
struct VersionProbe {
    version: u32,
}

/// Decodes a message body, refusing a protocol version other than [`PROTOCOL_VERSION`].
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, DecodeError> {
    let probe: VersionProbe = serde_json::from_slice(body)?;
    if probe.version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(probe.version));
    }
    Ok(serde_json::from_slice(body)?)
}

/// Encodes a message body.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string and no value is foreign.
    serde_json::to_vec(message).expect("protocol messages always serialise")
}

/// Returns one broker message body carrying every one of `bodies` (each an encoded message):
/// the body itself when there is one, a bundle when there are more.
pub fn bundle<B: AsRef<[u8]>>(bodies: &[B]) -> Vec<u8> {
    if let [one] = bodies {
        return one.as_ref().to_vec();
    }
    let length: usize = bodies.iter().map(|body| body.as_ref().len() + 1).sum();
    let mut out = Vec::with_capacity(length + 2);
    out.push(b'[');
    for (index, body) in bodies.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(body.as_ref());
    }
    out.push(b']');
    out
}

/// Returns the bodies of the messages a broker message carries: the body itself when it is not
/// a bundle, else each element of the bundle, to be decoded one by one. An error when the body
/// looks like a bundle but is not valid JSON.
pub fn unbundle(body: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let starts_bundle = body
        .iter()
        .find(|byte| !byte.is_ascii_whitespace())
        .is_some_and(|byte| *byte == b'[');
    if !starts_bundle {
        return Ok(vec![body]);
    }
    let elements: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)?;
    Ok(elements
        .into_iter()
        .map(|element| element.get().as_bytes())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn task_round_trips() {
        let task = TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            step_id: "load".into(),
            attempt: 1,
            step: StepKind::Python {
                module: "etl.orders".into(),
                function: "load".into(),
            },
            input: json!({"a": [1, 2]}),
            timeout_s: None,
            ends_run: true,
            trace_id: Some(TraceId::random()),
            rate_limit: None,
            exclusive: false,
        };
        let decoded: TaskMessage = decode(&encode(&task)).expect("decodes");
        assert_eq!(decoded, task);
        // Written by a build that predates trace ids, or for a run that has none: none.
        let mut older = serde_json::to_value(&task).expect("a value");
        older.as_object_mut().expect("an object").remove("trace_id");
        let older: TaskMessage = decode(older.to_string().as_bytes()).expect("decodes");
        assert_eq!(older.trace_id, None);
        // A field this build does not know (written by a newer one) is skipped.
        let mut newer = serde_json::to_value(&task).expect("a value");
        newer["trace_flags"] = json!(1);
        let newer: TaskMessage = decode(newer.to_string().as_bytes()).expect("decodes");
        assert_eq!(newer, task);
        // Written without the flag (it is false, or by a build that predates it): false.
        let without = encode(&TaskMessage {
            ends_run: false,
            ..task
        });
        assert!(!String::from_utf8_lossy(&without).contains("ends_run"));
        assert!(!decode::<TaskMessage>(&without).expect("decodes").ends_run);
    }

    #[test]
    fn completion_round_trips() {
        let completion = CompletionMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            attempt: 2,
            worker_id: "w1".into(),
            outcome: Outcome::Failed {
                error: StepError::new("ValueError", "bad"),
            },
            started_at: Utc::now(),
            finished_at: Utc::now(),
            logs: Some("working\n".into()),
            ends_run: true,
            ran: Some(Ran {
                queue: "etl".into(),
                micros: 1_250,
            }),
        };
        let decoded: CompletionMessage = decode(&encode(&completion)).expect("decodes");
        assert_eq!(decoded, completion);
        // Written by a build that predates `ran`: read without it.
        let mut older = serde_json::to_value(&completion).expect("a value");
        older.as_object_mut().expect("an object").remove("ran");
        let older: CompletionMessage =
            decode(older.to_string().as_bytes()).expect("decodes without ran");
        assert_eq!(older.ran, None);
        let deferred = CompletionMessage {
            outcome: Outcome::Deferred {
                delay_ms: 750,
                reason: "over the rate limit".into(),
            },
            ran: None,
            ..completion
        };
        let encoded = encode(&deferred);
        assert!(
            String::from_utf8_lossy(&encoded).contains(r#""status":"deferred","delay_ms":750"#)
        );
        assert_eq!(
            decode::<CompletionMessage>(&encoded).expect("decodes"),
            deferred
        );
    }

    #[test]
    fn bundles_carry_each_message_unchanged() {
        let one = br#"{"version":1,"a":[1,2]}"#.to_vec();
        let two = br#"{"version":1,"b":"]"}"#.to_vec();
        assert_eq!(bundle(&[&one]), one, "one message travels alone");
        assert_eq!(unbundle(&one).expect("reads"), vec![one.as_slice()]);
        let both = bundle(&[&one, &two]);
        assert_eq!(
            unbundle(&both).expect("reads"),
            vec![one.as_slice(), two.as_slice()]
        );
        let spaced = format!(" \n[{}, {}]", String::from_utf8_lossy(&one), "{\"x\": 1}");
        assert_eq!(
            unbundle(spaced.as_bytes()).expect("reads"),
            vec![one.as_slice(), br#"{"x": 1}"#.as_slice()]
        );
        assert!(unbundle(b"[1, 2").is_err());
        assert_eq!(
            unbundle(b"not json").expect("left to decode"),
            vec![b"not json"]
        );
    }

    #[test]
    fn a_message_of_a_bundle_that_cannot_be_read_spoils_no_other() {
        let good = encode(&json!({"version": PROTOCOL_VERSION, "x": 1}));
        let newer = encode(&json!({"version": 99}));
        let body = bundle(&[&good, &newer]);
        let decoded: Vec<Result<serde_json::Value, DecodeError>> = unbundle(&body)
            .expect("reads")
            .into_iter()
            .map(decode)
            .collect();
        assert_eq!(decoded[0].as_ref().expect("decodes")["x"], 1);
        assert!(matches!(decoded[1], Err(DecodeError::Version(99))));
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        assert!(matches!(
            decode::<TaskMessage>(br#"{"version": 99}"#),
            Err(DecodeError::Version(99))
        ));
        assert!(matches!(
            decode::<TaskMessage>(b"not json"),
            Err(DecodeError::Invalid(_))
        ));
    }
}
