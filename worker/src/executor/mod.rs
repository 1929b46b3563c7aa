//! Executors: one per step runtime. Each turns a task's step and input into an output or a step
//! error; none of them touches the broker or Redis.
//!
//! jq programs run in the worker process when quick, else in sandbox processes ([`dataflow`]);
//! Python steps run in a supervised pool of executor processes ([`pool`]), each embedding one
//! interpreter ([`python`]) and serving the worker over a socket ([`process`]).
//! `crate::runner::Executors` holds one of each and sends every step to its own.

pub mod dataflow;
pub mod pool;
pub mod process;
pub mod python;

use std::time::Duration;

use taskfleet_common::StepError;
use taskfleet_common::error::{CANCELLED, TIMEOUT};

/// The error of an attempt stopped because its run was cancelled while it ran.
pub fn cancelled_error() -> StepError {
    StepError::new(CANCELLED, "the run was cancelled while this task ran")
}

/// The error of an attempt that ran longer than its step's `timeout_s`.
pub fn timeout_error(limit: Duration) -> StepError {
    StepError::new(
        TIMEOUT,
        format!(
            "the step ran longer than its timeout of {} s",
            limit.as_secs_f64()
        ),
    )
}
