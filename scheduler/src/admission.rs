//! Admission: the loop that gives concurrency permits to the tasks that wait for one.
//!
//! A task of a step with a `concurrency` limit is written waiting: no message, not due. Whoever
//! commits such tasks, or records the end of tasks that held a permit, wakes this loop after
//! the commit with their groups ([`Wake`], through [`crate::dispatch::Dispatcher::admit`]);
//! the loop admits each group in a short transaction of its own ([`store::admit`]), making the
//! admitted tasks due, and the timer loop dispatches them. A wake names a group, never a task, and is in
//! memory only: a backstop every [`BACKSTOP`] looks for the namespace's groups that have ready
//! waiters and free permits, which covers whatever frees a permit without a wake (a run
//! cancelled, timed out or failed by another step, whose admitted tasks keep their permits for
//! [`store::STOP_GRACE`] after; retention), delays that end, and a scheduler that stopped
//! between a commit and its wake. One scheduler of the namespace looks at a time, about once
//! per [`BACKSTOP`] for the whole fleet (`store::claim_backstop_round`); every scheduler admits
//! what it is woken for. Nothing polls per waiting task.
//!
//! The loop never decides how many may run: the count and the admission are one statement
//! under the group's lock, so any number of schedulers may admit into one group.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{self, NewTask};

/// How often the loop looks for groups to admit into without being woken.
pub const BACKSTOP: Duration = Duration::from_secs(2);

/// The least time between two looks of the backstop by the namespace's schedulers, whichever
/// looks: a little less than [`BACKSTOP`], so that a lone scheduler whose tick comes a little
/// early still looks at every tick, while a fleet of them looks about as often as one.
const BACKSTOP_GAP: Duration = Duration::from_millis(1500);

/// The most groups one look of the backstop reads; a full look is followed by the next.
const BACKSTOP_BATCH: i64 = 512;

/// The most groups admitted at once, each in its own transaction on its own connection.
const PARALLEL: usize = 4;

/// A group to admit into, now or once a delay is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// The group (`NewTask::concurrency`).
    pub group: String,
    /// When: a delayed task is ready at the end of its delay.
    pub at: Option<Instant>,
}

impl Wake {
    /// A wake of `group` now: one of its permits was freed.
    pub fn now(group: String) -> Self {
        Self { group, at: None }
    }
}

/// Returns the wakes of the waiting tasks among `tasks`, each at the end of its delay; nothing
/// (and no allocation) for tasks of steps without a concurrency limit.
pub fn waiting(tasks: &[NewTask]) -> impl Iterator<Item = Wake> + '_ {
    tasks.iter().filter_map(|task| {
        let group = task.waiting_group()?;
        let at = task
            .delay_s
            .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
            .filter(|delay| !delay.is_zero())
            .map(|delay| Instant::now() + delay);
        Some(Wake {
            group: group.to_owned(),
            at,
        })
    })
}

/// The sending side of the admission loop.
#[derive(Clone)]
pub struct Admission {
    tx: mpsc::UnboundedSender<Vec<Wake>>,
}

impl Admission {
    /// Hands wakes to the loop. A loop that has stopped (shutdown) leaves them to the backstop
    /// of the schedulers still running.
    pub fn wake(&self, wakes: Vec<Wake>) {
        if !wakes.is_empty() && self.tx.send(wakes).is_err() {
            tracing::debug!("admission loop stopped; groups left to the backstop");
        }
    }
}

/// Starts the admission loop of `namespace` and returns its sender and the loop, to be
/// spawned; the loop runs until `shutdown`.
pub fn admission(
    db: sqlx::PgPool,
    namespace: String,
    shutdown: CancellationToken,
) -> (Admission, impl Future<Output = ()>) {
    // Unbounded: a wake is sent after a commit and must not wait; the backlog is bounded by
    // the writers' own batches, and wakes of one group collapse into one admission.
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Admission { tx },
        admission_loop(db, namespace, rx, shutdown),
    )
}

async fn admission_loop(
    db: sqlx::PgPool,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Vec<Wake>>,
    shutdown: CancellationToken,
) {
    let mut backstop = tokio::time::interval(BACKSTOP);
    backstop.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Groups to admit into now, and those woken for later (delays), by when.
    let mut now = BTreeSet::new();
    let mut later: BTreeMap<Instant, Vec<String>> = BTreeMap::new();
    loop {
        let next = later.first_key_value().map(|(at, _)| *at);
        let mut look = false;
        tokio::select! {
            wakes = rx.recv() => match wakes {
                Some(wakes) => take(wakes, &mut now, &mut later),
                None => break,
            },
            () = sleep_until(next), if next.is_some() => {}
            _ = backstop.tick() => look = true,
            () = shutdown.cancelled() => break,
        }
        while let Ok(wakes) = rx.try_recv() {
            take(wakes, &mut now, &mut later);
        }
        let due = Instant::now();
        while let Some(entry) = later.first_entry() {
            if *entry.key() > due {
                break;
            }
            now.extend(entry.remove());
        }
        admit_all(&db, &namespace, std::mem::take(&mut now)).await;
        if look {
            backstop_round(&db, &namespace).await;
        }
    }
}

/// Sorts wakes into the groups to admit into now and those for later.
fn take(wakes: Vec<Wake>, now: &mut BTreeSet<String>, later: &mut BTreeMap<Instant, Vec<String>>) {
    for wake in wakes {
        match wake.at {
            Some(at) if at > Instant::now() => later.entry(at).or_default().push(wake.group),
            _ => {
                now.insert(wake.group);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Admits into each group, a few at once. A group that fails (the database out of reach) is
/// left to the backstop.
async fn admit_all(db: &sqlx::PgPool, namespace: &str, groups: BTreeSet<String>) {
    futures_util::stream::iter(groups)
        .for_each_concurrent(PARALLEL, |group| async move {
            match store::admit(db, namespace, &group).await {
                Ok(0) => {}
                Ok(admitted) => {
                    tracing::debug!(group, admitted, "admitted waiting tasks");
                    crate::metrics::admitted(admitted);
                }
                Err(error) => {
                    tracing::warn!(group, %error, "admitting waiting tasks failed; the backstop will retry");
                }
            }
        })
        .await;
}

/// Looks for groups to admit into, unless another scheduler of the namespace looks now or
/// looked less than [`BACKSTOP_GAP`] ago.
async fn backstop_round(db: &sqlx::PgPool, namespace: &str) {
    let round = match store::claim_backstop_round(db, namespace, BACKSTOP_GAP).await {
        Ok(Some(round)) => round,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, "claiming a look for groups to admit into failed");
            return;
        }
    };
    backstop_look(db, namespace).await;
    if let Err(error) = round.finish().await {
        tracing::warn!(%error, "ending a look for groups to admit into failed");
    }
}

/// Admits into every group of the namespace that has ready waiters and free permits, a batch
/// of groups at a time.
async fn backstop_look(db: &sqlx::PgPool, namespace: &str) {
    let mut after = String::new();
    loop {
        let groups = match store::groups_to_admit(db, namespace, &after, BACKSTOP_BATCH).await {
            Ok(groups) => groups,
            Err(error) => {
                tracing::warn!(%error, "looking for groups to admit into failed");
                return;
            }
        };
        let full = groups.len() as i64 == BACKSTOP_BATCH;
        let Some(last) = groups.last().cloned() else {
            return;
        };
        admit_all(db, namespace, groups.into_iter().collect()).await;
        if !full {
            return;
        }
        after = last;
    }
}

#[cfg(test)]
mod tests {
    use taskfleet_common::TaskStatus;
    use uuid::Uuid;

    use super::*;

    fn task(status: TaskStatus, concurrency: Option<&str>, delay_s: Option<f64>) -> NewTask {
        NewTask {
            id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            step_id: "s".to_owned(),
            status,
            queue: "default".to_owned(),
            priority: 0,
            input: None,
            error: None,
            delay_s,
            item: -1,
            items_total: None,
            output: None,
            rate_group: None,
            concurrency: concurrency.map(|group| (group.to_owned(), 2)),
        }
    }

    #[test]
    fn only_queued_tasks_of_limited_steps_wake_admission() {
        let tasks = [
            task(TaskStatus::Queued, None, None),
            task(TaskStatus::Queued, Some("a"), None),
            task(TaskStatus::Cancelled, Some("b"), None),
            task(TaskStatus::Queued, Some("c"), Some(0.0)),
        ];
        let groups: Vec<(String, bool)> = waiting(&tasks)
            .map(|wake| (wake.group, wake.at.is_some()))
            .collect();
        assert_eq!(
            groups,
            [("a".to_owned(), false), ("c".to_owned(), false)],
            "{groups:?}"
        );
    }

    #[test]
    fn a_delayed_task_wakes_admission_at_the_end_of_its_delay() {
        let before = Instant::now();
        let tasks = [task(TaskStatus::Queued, Some("a"), Some(5.0))];
        let wake = waiting(&tasks).next().expect("a wake");
        let at = wake.at.expect("a time");
        assert!(at >= before + Duration::from_secs(5), "{at:?}");
        let mut now = BTreeSet::new();
        let mut later = BTreeMap::new();
        take(vec![wake, Wake::now("b".to_owned())], &mut now, &mut later);
        assert_eq!(now.into_iter().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            later.into_values().collect::<Vec<_>>(),
            [vec!["a".to_owned()]]
        );
    }
}
