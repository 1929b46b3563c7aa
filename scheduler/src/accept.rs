//! Accepting runs with group commit: concurrent requests share one transaction and one commit.
//!
//! Handlers validate and plan a run, then submit it here and wait for the reply; the writer loop
//! takes every submission waiting, writes them in one transaction and answers each. Tasks are
//! handed to the dispatcher only after the commit, so nothing is published that is not durable.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::dispatch::{Dispatch, Dispatcher};
use crate::notify::Notifier;
use crate::store::{self, NewRun, NewTask, StoreError};

/// The most runs written in one transaction.
const MAX_BATCH: usize = 512;

/// A planned run waiting to be written.
pub struct Submission {
    /// The run row.
    pub run: NewRun,
    /// Its first tasks.
    pub tasks: Vec<NewTask>,
    /// Their messages.
    pub dispatches: Vec<Dispatch>,
}

/// What became of a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The run was written.
    Created {
        /// Its id.
        id: Uuid,
        /// Its status.
        status: String,
    },
    /// A run with the same idempotency key exists; this is it.
    Existing {
        /// Its id.
        id: Uuid,
        /// Its status.
        status: String,
    },
}

/// Describes why a submission was not written.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The database failed; the error is shared by every submission of the batch.
    #[error(transparent)]
    Store(#[from] std::sync::Arc<StoreError>),
    /// The writer loop has stopped.
    #[error("the scheduler is shutting down")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Accepted, AcceptError>>;

/// The handle through which handlers submit runs.
#[derive(Clone)]
pub struct Acceptor {
    tx: mpsc::Sender<(Submission, Reply)>,
}

impl Acceptor {
    /// Submits a run and waits until it is durable (or refused).
    pub async fn submit(&self, submission: Submission) -> Result<Accepted, AcceptError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((submission, reply))
            .await
            .map_err(|_| AcceptError::Stopped)?;
        answer.await.map_err(|_| AcceptError::Stopped)?
    }
}

/// Returns the acceptor and its writer loop, to be spawned.
pub fn acceptor(
    db: sqlx::PgPool,
    dispatcher: Dispatcher,
    notifier: Notifier,
    shutdown: CancellationToken,
) -> (Acceptor, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    (
        Acceptor { tx },
        writer_loop(db, dispatcher, notifier, rx, shutdown),
    )
}

async fn writer_loop(
    db: sqlx::PgPool,
    dispatcher: Dispatcher,
    notifier: Notifier,
    mut rx: mpsc::Receiver<(Submission, Reply)>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            received = rx.recv_many(&mut batch, MAX_BATCH) => received,
            () = shutdown.cancelled() => 0,
        };
        if received == 0 {
            break;
        }
        let (submissions, replies): (Vec<Submission>, Vec<Reply>) = batch.drain(..).unzip();
        match write(&db, &submissions).await {
            Ok(outcomes) => {
                let created: std::collections::HashSet<Uuid> = outcomes
                    .iter()
                    .filter_map(|outcome| match outcome {
                        Accepted::Created { id, .. } => Some(*id),
                        Accepted::Existing { .. } => None,
                    })
                    .collect();
                let mut finished = Vec::new();
                for submission in submissions {
                    if created.contains(&submission.run.id) {
                        if submission.run.status != "running" {
                            finished.push(submission.run.id);
                        }
                        dispatcher.send(submission.dispatches);
                    }
                }
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
                notifier.announce(&finished).await;
            }
            Err(error) => {
                tracing::warn!(%error, runs = replies.len(), "writing accepted runs failed");
                let error = std::sync::Arc::new(error);
                for reply in replies {
                    let _ = reply.send(Err(AcceptError::Store(error.clone())));
                }
            }
        }
    }
}

/// Writes a batch of submissions in one transaction and returns the outcome of each, in order.
async fn write(db: &sqlx::PgPool, submissions: &[Submission]) -> Result<Vec<Accepted>, StoreError> {
    let mut tx = db.begin().await?;
    let runs: Vec<NewRun> = submissions.iter().map(|s| s.run.clone()).collect();
    let inserted: std::collections::HashSet<Uuid> = store::insert_runs(&mut tx, &runs)
        .await?
        .into_iter()
        .collect();
    let tasks: Vec<NewTask> = submissions
        .iter()
        .filter(|s| inserted.contains(&s.run.id))
        .flat_map(|s| s.tasks.iter().cloned())
        .collect();
    store::insert_tasks(&mut tx, &tasks).await?;
    let mut existing: HashMap<(&str, String), (Uuid, String)> = HashMap::new();
    let mut keys_by_kind: HashMap<&str, Vec<String>> = HashMap::new();
    for submission in submissions {
        if !inserted.contains(&submission.run.id)
            && let Some(key) = &submission.run.idempotency_key
        {
            keys_by_kind
                .entry(submission.run.kind)
                .or_default()
                .push(key.clone());
        }
    }
    for (kind, keys) in keys_by_kind {
        for (key, id, status) in store::runs_by_idempotency_key(&mut tx, kind, &keys).await? {
            existing.insert((kind, key), (id, status));
        }
    }
    tx.commit().await?;
    Ok(submissions
        .iter()
        .map(|submission| {
            let run = &submission.run;
            if inserted.contains(&run.id) {
                return Accepted::Created {
                    id: run.id,
                    status: run.status.to_owned(),
                };
            }
            let found = run
                .idempotency_key
                .as_ref()
                .and_then(|key| existing.get(&(run.kind, key.clone())));
            match found {
                Some((id, status)) => Accepted::Existing {
                    id: *id,
                    status: status.clone(),
                },
                // Unreachable in practice: a run is only skipped for a key that exists.
                None => Accepted::Created {
                    id: run.id,
                    status: run.status.to_owned(),
                },
            }
        })
        .collect())
}
