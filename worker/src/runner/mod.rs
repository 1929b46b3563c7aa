//! The worker's main loop: takes deliveries from the task queues, leases each task in Redis,
//! runs it on its executor and hands its completion to the report loop (see [`crate::report`]),
//! which publishes it (confirmed by the broker), writes the result to Redis and only then
//! acknowledges the delivery.
//!
//! A delivery carries one task, or a bundle of several that the scheduler dispatched at once.
//! The prefetch equals the concurrency, so the worker holds at most that many deliveries, and at
//! most that many tasks run at once; a delivery is acknowledged only when all its tasks are
//! reported.
//!
//! Every task message ends in a completion, so no run waits forever on a task: one this worker
//! cannot read fails with `invalid_task` (a message that names no task at all is moved to the
//! dead-letters queue), and an input or output that cannot be stored or sent (see
//! `taskfleet_common::value`) fails the task instead of reaching the scheduler.
//!
//! Its parts: `main_loop` (connecting, consuming, reconnecting, draining), `delivery` (the tasks
//! of a delivery, read, run and reported), `redelivery` (tasks that come back from a lost
//! worker), `execute` (the executors, and a task run under its lease), `lease` (leases and the
//! heartbeat), `rate` (late starts under a rate limit, checked again and maybe deferred), `held` (the tasks held per queue), `cancel` (the cancel listener), `spans` (an attempt's
//! exported spans). Publishing
//! completions and storing results are the report loop's, never this module's.

mod cancel;
mod delivery;
mod execute;
mod held;
mod lease;
mod main_loop;
mod rate;
mod redelivery;
mod spans;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use taskfleet_common::{Namespace, RunId, TaskId};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

pub use execute::{Executed, ExecutorSettings, Executors};
pub use main_loop::run;

use crate::report::{BrokerSlot, Reporter};
use held::HeldTasks;

/// What every task handler shares.
struct Shared {
    /// The current connection; replaced after a reconnect.
    broker: Arc<BrokerSlot>,
    /// Where finished tasks go.
    reporter: Reporter,
    /// One permit per task that may run at once.
    slots: Semaphore,
    redis: ConnectionManager,
    namespace: Namespace,
    worker_id: String,
    executors: Executors,
    lease_ttl: Duration,
    /// The largest step output, in bytes of JSON.
    max_value_bytes: usize,
    /// The tasks running now, whose leases the renewal loop keeps alive, with their run and
    /// the token that stops them when their run is cancelled.
    running: Mutex<HashMap<TaskId, (RunId, CancellationToken)>>,
    /// Attempts this worker put back in their queue with a new count whose original delivery
    /// it has not yet seen acknowledged; dropping the sender says it has.
    requeueing: Mutex<HashMap<(TaskId, u32), watch::Receiver<()>>>,
    /// The tasks this worker holds, by task queue: delivered and not yet reported.
    held: HeldTasks,
}
