//! Accepting runs with group commit: concurrent requests share one transaction and one commit.
//!
//! Handlers validate and plan runs, then submit them here and wait for the reply; the writer
//! loop takes every request waiting, writes them in one transaction and answers each. A request
//! (one run, or the runs of one batch request) is written all or nothing: if the shared
//! transaction fails for a reason other than the database being unreachable, each request is
//! written again in a transaction of its own, so one bad request never fails the others. Tasks
//! are handed to the dispatcher only after the commit, so nothing is published that is not
//! durable; tasks that wait for a concurrency permit wake the admission loop instead. The loop
//! ends when every [`Acceptor`] is dropped, after answering what it holds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use taskfleet_common::{RunKind, RunStatus};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::admission;
use crate::dispatch::{Dispatch, Dispatcher};
use crate::notify::Notifier;
use crate::store::{self, HeldConnection, NewRun, NewTask, StoreError};

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
        status: RunStatus,
    },
    /// A run with the same idempotency key exists; this is it.
    Existing {
        /// Its id.
        id: Uuid,
        /// Its status.
        status: RunStatus,
    },
}

/// Describes why a submission was not written.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The database failed; the error may be shared by every request of a batch.
    #[error(transparent)]
    Store(#[from] Arc<StoreError>),
    /// The writer loop has stopped.
    #[error("the scheduler is shutting down")]
    Stopped,
}

type Reply = oneshot::Sender<Result<Vec<Accepted>, AcceptError>>;

/// The handle through which handlers submit runs.
#[derive(Clone)]
pub struct Acceptor {
    tx: mpsc::Sender<(Vec<Submission>, Reply)>,
}

impl Acceptor {
    /// Submits runs that are written together or not at all, and waits until they are durable
    /// (or refused). Returns one outcome per submission, in order.
    pub async fn submit(&self, submissions: Vec<Submission>) -> Result<Vec<Accepted>, AcceptError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((submissions, reply))
            .await
            .map_err(|_| AcceptError::Stopped)?;
        answer.await.map_err(|_| AcceptError::Stopped)?
    }
}

/// Returns the acceptor and its writer loop, to be spawned.
pub fn acceptor(
    db: sqlx::PgPool,
    namespace: String,
    dispatcher: Dispatcher,
    notifier: Notifier,
) -> (Acceptor, impl Future<Output = ()>) {
    let (tx, rx) = mpsc::channel(MAX_BATCH);
    let writer = Writer {
        db: HeldConnection::new(db),
        namespace,
        dispatcher,
        notifier,
    };
    (Acceptor { tx }, writer.run(rx))
}

struct Writer {
    db: HeldConnection,
    namespace: String,
    dispatcher: Dispatcher,
    notifier: Notifier,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<(Vec<Submission>, Reply)>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let requests = std::mem::take(&mut batch);
            match self.write(&requests).await {
                Ok(outcomes) => self.finish(requests, outcomes).await,
                Err(error) if error.is_unavailable() || requests.len() == 1 => {
                    tracing::warn!(%error, requests = requests.len(), "writing accepted runs failed");
                    let error = Arc::new(error);
                    for (_, reply) in requests {
                        let _ = reply.send(Err(AcceptError::Store(error.clone())));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, requests = requests.len(), "writing accepted runs together failed; writing each request alone");
                    for request in requests {
                        let single = [request];
                        match self.write(&single).await {
                            Ok(outcomes) => self.finish(Vec::from(single), outcomes).await,
                            Err(error) => {
                                let [(_, reply)] = single;
                                tracing::warn!(%error, "writing an accepted run failed");
                                let _ = reply.send(Err(AcceptError::Store(Arc::new(error))));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Answers written requests, hands their tasks to the dispatcher and announces runs that
    /// ended as soon as they were planned.
    async fn finish(&self, requests: Vec<(Vec<Submission>, Reply)>, outcomes: Vec<Vec<Accepted>>) {
        let mut finished = Vec::new();
        let mut dispatches = Vec::new();
        let mut waiting = Vec::new();
        for ((submissions, reply), outcomes) in requests.into_iter().zip(outcomes) {
            for (submission, outcome) in submissions.into_iter().zip(&outcomes) {
                if matches!(outcome, Accepted::Created { .. }) {
                    crate::metrics::submitted(submission.run.kind);
                    if submission.run.status != RunStatus::Running {
                        finished.push(submission.run.id);
                        let run = &submission.run;
                        crate::ended::runs(&[store::EndedRun {
                            id: run.id,
                            kind: run.kind,
                            status: run.status,
                            seconds: 0.0,
                            trace_id: run.trace_id.map(|id| id.to_string()),
                            trace_span_id: run.trace_span_id.map(|id| id.to_string()),
                        }]);
                    }
                    dispatches.extend(submission.dispatches);
                    waiting.extend(admission::waiting(&submission.tasks));
                }
            }
            let _ = reply.send(Ok(outcomes));
        }
        // One hand-over for the whole commit: its tasks are published in the same rounds.
        self.dispatcher.send(dispatches);
        self.dispatcher.admit(waiting);
        self.notifier.announce(&finished).await;
    }

    /// Writes requests in one statement and returns the outcome of each submission.
    async fn write(
        &mut self,
        requests: &[(Vec<Submission>, Reply)],
    ) -> Result<Vec<Vec<Accepted>>, StoreError> {
        let submissions: Vec<&Submission> = requests.iter().flat_map(|(s, _)| s).collect();
        let runs: Vec<NewRun> = submissions.iter().map(|s| s.run.clone()).collect();
        let tasks: Vec<NewTask> = submissions
            .iter()
            .flat_map(|s| s.tasks.iter().cloned())
            .collect();
        let conn = self.db.get().await?;
        let inserted = store::insert_runs(conn, &self.namespace, &runs, &tasks).await;
        let inserted: HashSet<Uuid> = self.db.check(inserted)?.into_iter().collect();
        let mut keys_by_kind: HashMap<RunKind, Vec<(String, String)>> = HashMap::new();
        for submission in &submissions {
            if !inserted.contains(&submission.run.id)
                && let Some(key) = &submission.run.idempotency_key
            {
                keys_by_kind
                    .entry(submission.run.kind)
                    .or_default()
                    .push((submission.run.tenant.clone(), key.clone()));
            }
        }
        // Runs already holding a key were committed before this statement, so reading them
        // afterwards finds them.
        let mut existing: HashMap<(RunKind, String, String), (Uuid, RunStatus)> = HashMap::new();
        for (kind, keys) in keys_by_kind {
            let conn = self.db.get().await?;
            let found = store::runs_by_idempotency_key(conn, &self.namespace, kind, &keys).await;
            for (tenant, key, id, status) in self.db.check(found)? {
                existing.insert((kind, tenant, key), (id, status));
            }
        }
        let outcome = |submission: &Submission| {
            let run = &submission.run;
            let found = run
                .idempotency_key
                .as_ref()
                .and_then(|key| existing.get(&(run.kind, run.tenant.clone(), key.clone())));
            match found {
                Some((id, status)) if !inserted.contains(&run.id) => Accepted::Existing {
                    id: *id,
                    status: *status,
                },
                _ => Accepted::Created {
                    id: run.id,
                    status: run.status,
                },
            }
        };
        Ok(requests
            .iter()
            .map(|(submissions, _)| submissions.iter().map(outcome).collect())
            .collect())
    }
}
