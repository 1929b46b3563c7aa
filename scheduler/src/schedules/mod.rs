//! The firing loop of schedules: every scheduler runs one, and each tick of a schedule starts
//! exactly one run, whatever the number of schedulers.
//!
//! Exactly once rests on PostgreSQL, not on a leader: a scheduler claims due schedules with
//! `FOR UPDATE SKIP LOCKED` and, in the same transaction, inserts the run of each one's tick
//! (planned as a submission is, through [`crate::planning::plan_new_run`]) and moves its
//! cursor (`next_fire_at`) on. Only after the commit are the run's tasks handed to the
//! dispatcher. A scheduler killed mid-tick rolls back, so the tick is still due for the next
//! claim; a unique index on the runs' `(schedule, scheduled_for)` refuses a second run of one
//! tick even if claims were ever to overlap.
//!
//! The loop sleeps until the earliest cursor of the namespace (at most a second, so a
//! schedule set on another scheduler is seen within it; a schedule set through this one wakes
//! it at once). A tick that cannot start its run (its workflow gone, its tenant's quota used
//! up, its planning failing) records why on the schedule and moves on: it never holds the
//! schedule up, and no failure ends the loop before the shutdown.
//!
//! [`ticks`] computes when a schedule fires (its time zone, daylight-saving changes) and what
//! a due one does (grace, catch-up), as pure logic.

pub mod ticks;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use taskfleet_common::{RunKind, RunStatus, TraceId, WorkflowDefinition};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::admission::{self, Wake};
use crate::dispatch::{Dispatch, Dispatcher};
use crate::notify::Notifier;
use crate::planning::{self, NewRunParts, PlanningError, SandboxedPrograms};
use crate::store::{self, Owner, ScheduleRow, StoreError, TickOutcome};
use ticks::{CatchUp, Overlap, Timetable};

/// The most schedules claimed in one transaction.
const MAX_CLAIM: i64 = 32;
/// The longest the loop sleeps: a schedule set on another scheduler is seen within it.
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// The wait before claiming again a schedule that is due but held by another scheduler.
const HELD_RETRY: Duration = Duration::from_millis(20);
/// The wait after the database failed.
const FAILURE_RETRY: Duration = Duration::from_secs(1);

/// Why a batch of ticks was not fired.
#[derive(Debug, thiserror::Error)]
enum FireError {
    /// The database failed; the transaction rolled back and the ticks are still due.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The scheduler is stopping; the ticks are left due for the next one.
    #[error("the scheduler is shutting down")]
    Stopped,
    /// Planning could not run its programs now (no sandbox could be had); the transaction
    /// rolled back and the ticks are still due.
    #[error("planning a tick's run: {0}")]
    Planning(String),
}

impl From<sqlx::Error> for FireError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The firing loop of one scheduler.
pub struct Firing {
    /// The database.
    pub db: sqlx::PgPool,
    /// The fleet's namespace.
    pub namespace: String,
    /// Where the runs' planning runs its programs.
    pub programs: SandboxedPrograms,
    /// Where the runs' first tasks go after the commit.
    pub dispatcher: Dispatcher,
    /// Announces runs that ended as soon as they were planned.
    pub notifier: Notifier,
    /// How late a tick may fire as it is (`TASKFLEET_SCHEDULE_GRACE_S`).
    pub grace: Duration,
    /// Wakes the loop when a schedule was set through this scheduler.
    pub wake: Arc<Notify>,
}

/// What firing one due schedule came to, before the commit.
struct Fired {
    /// The tasks to dispatch after the commit.
    dispatches: Vec<Dispatch>,
    /// The groups of its tasks that wait for a concurrency permit, to admit into after the
    /// commit.
    waiting: Vec<Wake>,
    /// The run, if it ended as soon as it was planned.
    finished: Option<(uuid::Uuid, RunStatus)>,
}

impl Firing {
    /// Fires due ticks until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        use futures_util::FutureExt as _;
        loop {
            // A panic (a bug) rolls the batch back and is logged; the loop goes on, so no
            // schedule stops firing without a word.
            let fired = std::panic::AssertUnwindSafe(self.fire_due(&shutdown))
                .catch_unwind()
                .await;
            if shutdown.is_cancelled() {
                return;
            }
            let wait = match fired {
                Ok(Ok(claimed)) if claimed as i64 == MAX_CLAIM => Duration::ZERO,
                Ok(Ok(_)) => self.time_to_next_tick().await,
                Ok(Err(FireError::Stopped)) => return,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "firing due schedules");
                    FAILURE_RETRY
                }
                Err(_) => {
                    tracing::error!("firing due schedules panicked; the ticks stay due");
                    FAILURE_RETRY
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Returns how long to sleep until the earliest tick of the namespace, at most
    /// [`MAX_SLEEP`].
    async fn time_to_next_tick(&self) -> Duration {
        match store::seconds_to_next_tick(&self.db, &self.namespace).await {
            // Due, but claimed by another scheduler just now: it will commit soon.
            Ok(Some(seconds)) if seconds <= 0.0 => HELD_RETRY,
            // A millisecond more, so the claim finds the tick due by the database's clock.
            Ok(Some(seconds)) => Duration::from_secs_f64(seconds.min(MAX_SLEEP.as_secs_f64()))
                .saturating_add(Duration::from_millis(1))
                .min(MAX_SLEEP),
            Ok(None) => MAX_SLEEP,
            Err(error) => {
                tracing::warn!(%error, "reading the next tick of the schedules");
                FAILURE_RETRY
            }
        }
    }

    /// Claims due schedules and fires their ticks in one transaction; returns how many were
    /// claimed.
    async fn fire_due(&self, shutdown: &CancellationToken) -> Result<usize, FireError> {
        let mut tx = self.db.begin().await?;
        let (due, now) = store::claim_due_schedules(&mut tx, &self.namespace, MAX_CLAIM).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let claimed = due.len();
        let mut dispatches = Vec::new();
        let mut waiting = Vec::new();
        let mut finished = Vec::new();
        for schedule in &due {
            if shutdown.is_cancelled() {
                return Err(FireError::Stopped);
            }
            let fired = self.fire(&mut tx, schedule, now).await?;
            dispatches.extend(fired.dispatches);
            waiting.extend(fired.waiting);
            finished.extend(fired.finished);
        }
        tx.commit().await?;
        for (_, status) in &finished {
            crate::metrics::finished([(*status, 0.0)]);
        }
        self.dispatcher.send(dispatches);
        self.dispatcher.admit(waiting);
        let finished: Vec<uuid::Uuid> = finished.into_iter().map(|(id, _)| id).collect();
        self.notifier.announce(&finished).await;
        Ok(claimed)
    }

    /// Decides what a claimed schedule's due tick does, does it and moves the cursor on.
    async fn fire(
        &self,
        tx: &mut sqlx::PgConnection,
        schedule: &ScheduleRow,
        now: DateTime<Utc>,
    ) -> Result<Fired, FireError> {
        let owner = Owner {
            namespace: &self.namespace,
            tenant: &schedule.tenant,
        };
        let name = schedule.name.as_str();
        let nothing = || Fired {
            dispatches: Vec::new(),
            waiting: Vec::new(),
            finished: None,
        };
        let cursor = schedule.next_fire_at.unwrap_or(now);
        let timetable = match Timetable::parse(&schedule.cron, &schedule.timezone) {
            Ok(timetable) => timetable,
            Err(error) => {
                let outcome = TickOutcome::Failed {
                    at: cursor,
                    error: error.to_string(),
                };
                store::advance_schedule(tx, owner, name, None, &outcome).await?;
                tracing::warn!(schedule = name, tenant = %schedule.tenant, %error, "a schedule whose cron no longer reads stops");
                return Ok(nothing());
            }
        };
        let catch_up = CatchUp::parse(&schedule.catch_up).unwrap_or(CatchUp::None);
        let decision = ticks::decide(&timetable, cursor, now, self.grace, catch_up);
        let Some(at) = decision.fire else {
            tracing::info!(schedule = name, tenant = %schedule.tenant, since = %cursor, next = ?decision.next, "a schedule's ticks were missed; none is caught up");
            store::advance_schedule(tx, owner, name, decision.next, &TickOutcome::Missed).await?;
            return Ok(nothing());
        };
        if decision.missed {
            tracing::info!(schedule = name, tenant = %schedule.tenant, since = %cursor, tick = %at, "a schedule's ticks were missed; one run catches up");
        }
        if Overlap::parse(&schedule.overlap) == Some(Overlap::Skip)
            && let Some(previous) = schedule.last_run_id
            && store::run_unfinished(tx, previous).await?
        {
            tracing::info!(schedule = name, tenant = %schedule.tenant, tick = %at, previous_run = %previous, "tick skipped: the previous run is unfinished");
            let outcome = TickOutcome::Skipped { at, count: 1 };
            store::advance_schedule(tx, owner, name, decision.next, &outcome).await?;
            return Ok(nothing());
        }
        match self.start_run(tx, schedule, owner, at).await? {
            Ok((submission_id, fired)) => {
                let outcome = TickOutcome::Fired {
                    at,
                    run_id: submission_id,
                };
                store::advance_schedule(tx, owner, name, decision.next, &outcome).await?;
                tracing::debug!(schedule = name, tenant = %schedule.tenant, tick = %at, run_id = %submission_id, "schedule fired");
                Ok(fired)
            }
            Err(error) => {
                tracing::warn!(schedule = name, tenant = %schedule.tenant, tick = %at, %error, "a schedule's tick could not start its run");
                let outcome = TickOutcome::Failed { at, error };
                store::advance_schedule(tx, owner, name, decision.next, &outcome).await?;
                Ok(nothing())
            }
        }
    }

    /// Plans and inserts the run of a tick, under a savepoint: the inner error says why the
    /// tick starts no run (written on the schedule), the outer one stops the whole batch.
    async fn start_run(
        &self,
        tx: &mut sqlx::PgConnection,
        schedule: &ScheduleRow,
        owner: Owner<'_>,
        at: DateTime<Utc>,
    ) -> Result<Result<(uuid::Uuid, Fired), String>, FireError> {
        // Read on the transaction's connection: while it holds the claimed schedules, waiting
        // for another connection of the pool could wait for requests that wait for them.
        let (definition, workflow, version) = match Self::target(tx, schedule, owner).await? {
            Ok(target) => target,
            Err(error) => return Ok(Err(error)),
        };
        let input = match store::schedule_input(tx, owner, &schedule.name).await? {
            Ok(input) => input,
            Err(error) => return Ok(Err(error)),
        };
        let quota = store::get_quota(&mut *tx, owner).await?;
        if let Some(limit) = quota.runs_in_flight {
            let unfinished = store::runs_in_flight(&mut *tx, owner, i64::from(limit)).await?;
            if unfinished >= i64::from(limit) {
                return Ok(Err(format!(
                    "the tenant's quota of {limit} runs in flight is used up"
                )));
            }
        }
        let parts = NewRunParts {
            kind: RunKind::Workflow,
            tenant: schedule.tenant.clone(),
            definition,
            unchecked: false,
            workflow,
            version,
            input,
            idempotency_key: None,
            delay_s: None,
            // A tick starts a trace of its own: its run's span is the trace's root.
            trace_id: TraceId::random(),
            trace_span_id: None,
        };
        let programs = self.programs.clone();
        let submission =
            match planning::run_planning(false, move || planning::plan_new_run(&programs, parts))
                .await
            {
                Ok(submission) => submission,
                // Halted by the scheduler's end, or by a sandbox that could not be had: the
                // batch rolls back either way, and only shutdown ends the loop.
                Err(PlanningError::Halted(halted)) => {
                    return Err(FireError::Planning(halted.to_string()));
                }
                Err(error @ PlanningError::Panicked(_)) => return Ok(Err(error.to_string())),
            };
        let id = submission.run.id;
        let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
        let inserted = async {
            store::insert_runs(
                &mut savepoint,
                &self.namespace,
                std::slice::from_ref(&submission.run),
                &submission.tasks,
            )
            .await?;
            store::mark_scheduled_run(&mut savepoint, id, &schedule.name, at).await
        }
        .await;
        match inserted {
            Ok(()) => savepoint.commit().await?,
            Err(error) if error.is_unavailable() => return Err(error.into()),
            Err(error) => {
                savepoint.rollback().await?;
                return Ok(Err(format!("writing the run: {error}")));
            }
        }
        crate::metrics::submitted(RunKind::Workflow);
        let finished =
            (submission.run.status != RunStatus::Running).then_some((id, submission.run.status));
        Ok(Ok((
            id,
            Fired {
                waiting: admission::waiting(&submission.tasks).collect(),
                dispatches: submission.dispatches,
                finished,
            },
        )))
    }

    /// Returns the definition a schedule starts, with the run's workflow name and version, or
    /// why there is none.
    async fn target(
        tx: &mut sqlx::PgConnection,
        schedule: &ScheduleRow,
        owner: Owner<'_>,
    ) -> Result<Result<(WorkflowDefinition, Option<String>, Option<i32>), String>, FireError> {
        if let Some(name) = &schedule.workflow {
            let Some(row) =
                store::get_workflow(&mut *tx, owner, name, schedule.workflow_version).await?
            else {
                return Ok(Err(match schedule.workflow_version {
                    Some(version) => format!("workflow {name:?} has no version {version}"),
                    None => format!("no workflow named {name:?}"),
                }));
            };
            return Ok(serde_json::from_value(row.definition.0)
                .map(|definition| (definition, Some(name.clone()), Some(row.version)))
                .map_err(|error| format!("the workflow's definition does not read: {error}")));
        }
        let Some(definition) = &schedule.definition else {
            return Ok(Err(
                "the schedule names no workflow and no definition".to_owned()
            ));
        };
        Ok(
            serde_json::from_value::<WorkflowDefinition>(definition.0.clone())
                .map(|definition| {
                    let name = definition.name.clone();
                    (definition, name, None)
                })
                .map_err(|error| format!("the schedule's definition does not read: {error}")),
        )
    }
}
