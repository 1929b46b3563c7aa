//! The scheduler's Prometheus metrics, served at `GET /metrics` (`docs/operations.md`). Events
//! are counted where they happen, through the `metrics` facade (a no-op until [`install`]);
//! the gauges of queues and of the outbox are read from the broker and the database when a
//! scrape comes, at most once every [`REFRESH_EVERY`], so that several Prometheus servers
//! scraping at once cost one read.
//!
//! Labels stay bounded: statuses, kinds, queue names and route templates, never ids.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use taskfleet_common::{RunKind, RunStatus, TaskStatus};
use taskfleet_io::metrics::Exposition;

/// Runs and jobs accepted, by kind.
pub const RUNS_SUBMITTED: &str = "taskfleet_runs_submitted_total";
/// Runs and jobs finished, by status.
pub const RUNS_FINISHED: &str = "taskfleet_runs_finished_total";
/// Seconds from a run's acceptance to its end.
pub const RUN_DURATION: &str = "taskfleet_run_duration_seconds";
/// Tasks published to the broker (and confirmed), by queue.
pub const TASKS_DISPATCHED: &str = "taskfleet_tasks_dispatched_total";
/// Task attempts reported by workers, by queue and status.
pub const TASKS_COMPLETED: &str = "taskfleet_tasks_completed_total";
/// Starts of tasks delayed by a rate limit at dispatch (held for their slot or sent back to the
/// timer), by queue.
pub const RATE_LIMITED: &str = "taskfleet_rate_limited_total";
/// Attempts a worker did not start because their late start was over a rate limit; each is
/// sent again later.
pub const TASKS_DEFERRED: &str = "taskfleet_tasks_deferred_total";
/// Messages ready in a task queue.
pub const QUEUE_READY: &str = "taskfleet_queue_ready_messages";
/// Consumers of a task queue.
pub const QUEUE_CONSUMERS: &str = "taskfleet_queue_consumers";
/// Age of a queue's oldest unfinished task, since it was dispatched.
pub const QUEUE_OLDEST_AGE: &str = "taskfleet_queue_oldest_task_age_seconds";
/// Tasks committed and not yet confirmed by the broker.
pub const OUTBOX_PENDING: &str = "taskfleet_outbox_pending";
/// Messages in the dead-letters queue.
pub const DEAD_LETTER_MESSAGES: &str = "taskfleet_dead_letter_messages";
/// Messages the scheduler moved to the dead-letters queue.
pub const DEAD_LETTERED: &str = "taskfleet_dead_letters_total";
/// Finished runs and jobs deleted past their retention.
pub const RUNS_DELETED: &str = "taskfleet_runs_deleted_total";
/// Messages removed from the dead-letters queue by `POST /v1/dead-letters:purge`.
pub const DEAD_LETTERS_PURGED: &str = "taskfleet_dead_letters_purged_total";
/// Tasks admitted to a concurrency permit (they waited for their step's `concurrency` limit).
pub const TASKS_ADMITTED: &str = "taskfleet_tasks_admitted_total";
/// HTTP requests answered, by route template and status code.
pub const HTTP_REQUESTS: &str = "taskfleet_http_requests_total";
/// Seconds to answer an HTTP request, by route template.
pub const HTTP_DURATION: &str = "taskfleet_http_request_duration_seconds";

/// The least time between two reads of the gauges.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);

/// The task statuses a worker reports.
const REPORTED: [TaskStatus; 2] = [TaskStatus::Succeeded, TaskStatus::Failed];

/// Installs the recorder and names every family, with the series whose labels are known in
/// advance at zero, so that a scrape of a new scheduler lists every family.
pub fn install() -> Result<Exposition, String> {
    let exposition = taskfleet_io::metrics::install(&[RUN_DURATION, HTTP_DURATION])?;
    describe_counter!(RUNS_SUBMITTED, "Runs and jobs accepted, by kind.");
    describe_counter!(RUNS_FINISHED, "Runs and jobs finished, by status.");
    describe_histogram!(
        RUN_DURATION,
        metrics::Unit::Seconds,
        "Seconds from a run's acceptance to its end."
    );
    describe_counter!(
        TASKS_DISPATCHED,
        "Tasks published to the broker and confirmed, by queue."
    );
    describe_counter!(
        TASKS_COMPLETED,
        "Task attempts reported by workers, by queue and status (queue unknown for attempts that did not run to their end)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Starts of tasks delayed by a rate limit at dispatch (held for their slot or sent back to wait), by queue."
    );
    describe_counter!(
        TASKS_DEFERRED,
        "Attempts a worker sent back without starting them (sent again later): a late start over a rate limit, or a lease another delivery of the task holds."
    );
    describe_gauge!(QUEUE_READY, "Messages ready in a task queue.");
    describe_gauge!(QUEUE_CONSUMERS, "Consumers of a task queue.");
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        metrics::Unit::Seconds,
        "Age of the queue's oldest unfinished task (waiting or running), since it was dispatched."
    );
    describe_gauge!(
        OUTBOX_PENDING,
        "Tasks committed and not yet confirmed by the broker (the relay publishes them)."
    );
    describe_gauge!(DEAD_LETTER_MESSAGES, "Messages in the dead-letters queue.");
    describe_counter!(
        DEAD_LETTERED,
        "Messages this scheduler moved to the dead-letters queue."
    );
    describe_counter!(
        RUNS_DELETED,
        "Finished runs and jobs this scheduler deleted past their retention."
    );
    describe_counter!(
        DEAD_LETTERS_PURGED,
        "Messages purged from the dead-letters queue through this scheduler's API."
    );
    describe_counter!(
        TASKS_ADMITTED,
        "Tasks this scheduler admitted to a permit of their step's concurrency limit."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template and status code."
    );
    describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "Seconds to answer an HTTP request, by route template."
    );
    for kind in [RunKind::Workflow, RunKind::Job] {
        counter!(RUNS_SUBMITTED, "kind" => kind.as_str()).absolute(0);
    }
    for status in [
        RunStatus::Succeeded,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ] {
        counter!(RUNS_FINISHED, "status" => status.as_str()).absolute(0);
    }
    let default = taskfleet_common::names::DEFAULT_QUEUE;
    counter!(TASKS_DISPATCHED, "queue" => default).absolute(0);
    for status in REPORTED {
        counter!(TASKS_COMPLETED, "queue" => default, "status" => status.as_str()).absolute(0);
    }
    for family in [QUEUE_READY, QUEUE_CONSUMERS, QUEUE_OLDEST_AGE] {
        gauge!(family, "queue" => default).set(0.0);
    }
    counter!(RATE_LIMITED, "queue" => default).absolute(0);
    counter!(TASKS_DEFERRED).absolute(0);
    counter!(DEAD_LETTERED).absolute(0);
    counter!(RUNS_DELETED).absolute(0);
    counter!(DEAD_LETTERS_PURGED).absolute(0);
    gauge!(OUTBOX_PENDING).set(0.0);
    gauge!(DEAD_LETTER_MESSAGES).set(0.0);
    // The histograms' families appear with their first observations; these are not counted as
    // requests and finish nothing.
    Ok(exposition)
}

/// Counts a run or job accepted.
pub fn submitted(kind: RunKind) {
    counter!(RUNS_SUBMITTED, "kind" => kind.as_str()).increment(1);
}

/// Counts runs finished, with their durations in seconds (through [`crate::ended::runs`]).
pub(crate) fn finished(runs: impl IntoIterator<Item = (RunStatus, f64)>) {
    for (status, seconds) in runs {
        counter!(RUNS_FINISHED, "status" => status.as_str()).increment(1);
        histogram!(RUN_DURATION).record(seconds);
    }
}

/// Counts tasks confirmed by the broker: how many of each queue.
pub fn dispatched<'a>(counts: impl IntoIterator<Item = (&'a str, u64)>) {
    for (queue, count) in counts {
        counter!(TASKS_DISPATCHED, "queue" => queue.to_owned()).increment(count);
    }
}

/// Counts a task attempt reported by a worker.
pub fn completed(queue: Option<&str>, status: TaskStatus) {
    counter!(
        TASKS_COMPLETED,
        "queue" => queue.unwrap_or("unknown").to_owned(),
        "status" => status.as_str(),
    )
    .increment(1);
}

/// Counts a task of `queue` whose start a rate limit delayed at dispatch.
pub fn rate_limited(queue: &str) {
    counter!(RATE_LIMITED, "queue" => queue.to_owned()).increment(1);
}

/// Counts attempts a worker deferred: a late start over a rate limit, or a lease held
/// elsewhere.
pub fn deferred(count: u64) {
    counter!(TASKS_DEFERRED).increment(count);
}

/// Counts a message moved to the dead-letters queue.
pub fn dead_lettered() {
    counter!(DEAD_LETTERED).increment(1);
}

/// Counts runs deleted past their retention.
pub fn runs_deleted(count: u64) {
    counter!(RUNS_DELETED).increment(count);
}

/// Counts the messages a purge of the dead-letters queue removed.
pub fn dead_letters_purged(count: u32) {
    counter!(DEAD_LETTERS_PURGED).increment(u64::from(count));
}

/// Counts tasks admitted to concurrency permits.
pub fn admitted(count: u64) {
    counter!(TASKS_ADMITTED).increment(count);
}

/// Counts an HTTP request answered.
pub fn http_request(route: &str, status: u16, seconds: f64) {
    counter!(HTTP_REQUESTS, "route" => route.to_owned(), "status" => status.to_string())
        .increment(1);
    histogram!(HTTP_DURATION, "route" => route.to_owned()).record(seconds);
}

/// What a scrape reads from the broker and the database.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Per queue: messages ready and consumers.
    pub queues: Vec<(String, u32, u32)>,
    /// Per queue: the age of its oldest unfinished task, in seconds.
    pub oldest: Vec<(String, f64)>,
    /// Tasks not yet confirmed by the broker.
    pub outbox_pending: i64,
    /// Messages in the dead-letters queue (0 when it does not exist).
    pub dead_letters: u32,
}

/// Sets the gauges from what a scrape read, and adds the queues it named to `known`. A queue
/// with no task queued any more has an oldest task of age 0, not its last age.
fn set_gauges(gauges: &Gauges, known: &mut Vec<String>) {
    // A queue the broker no longer has shows nothing ready and no consumers, once, and is
    // then forgotten.
    known.retain(|queue| {
        let listed = gauges.queues.iter().any(|(name, _, _)| name == queue)
            || gauges.oldest.iter().any(|(name, _)| name == queue);
        if !listed {
            gauge!(QUEUE_READY, "queue" => queue.clone()).set(0.0);
            gauge!(QUEUE_CONSUMERS, "queue" => queue.clone()).set(0.0);
            gauge!(QUEUE_OLDEST_AGE, "queue" => queue.clone()).set(0.0);
        }
        listed
    });
    for (queue, ready, consumers) in &gauges.queues {
        gauge!(QUEUE_READY, "queue" => queue.clone()).set(f64::from(*ready));
        gauge!(QUEUE_CONSUMERS, "queue" => queue.clone()).set(f64::from(*consumers));
        if !known.contains(queue) {
            known.push(queue.clone());
        }
    }
    for queue in known.iter() {
        let age = gauges
            .oldest
            .iter()
            .find(|(name, _)| name == queue)
            .map_or(0.0, |(_, age)| *age);
        gauge!(QUEUE_OLDEST_AGE, "queue" => queue.clone()).set(age);
    }
    #[allow(clippy::cast_precision_loss)]
    gauge!(OUTBOX_PENDING).set(gauges.outbox_pending as f64);
    gauge!(DEAD_LETTER_MESSAGES).set(f64::from(gauges.dead_letters));
}

/// What `/metrics` needs: the exposition, and when the gauges were last read.
#[derive(Clone)]
pub struct Served {
    /// Renders the recorder.
    pub exposition: Exposition,
    /// When the gauges were last read.
    pub refresh: std::sync::Arc<Refresh>,
}

/// When the gauges were last read, and the queues they have named.
#[derive(Default)]
pub struct Refresh {
    state: Mutex<(Option<Instant>, Vec<String>)>,
}

impl Refresh {
    /// Whether a scrape should read the gauges now (and, if so, marks them read): the queues
    /// named before, whose gauges are to be read again, or `None`.
    pub fn due(&self) -> Option<Vec<String>> {
        let mut state = taskfleet_common::sync::lock(&self.state);
        if state.0.is_some_and(|last| last.elapsed() < REFRESH_EVERY) {
            return None;
        }
        state.0 = Some(Instant::now());
        Some(state.1.clone())
    }

    /// Sets the gauges from what was read.
    pub fn set(&self, gauges: &Gauges) {
        let mut state = taskfleet_common::sync::lock(&self.state);
        set_gauges(gauges, &mut state.1);
    }
}
