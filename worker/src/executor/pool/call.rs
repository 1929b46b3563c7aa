//! The path of one call through the pool: waiting for an idle executor, sending the call and
//! reading its outcome from the caller's own task, and, when the caller stops waiting (a time
//! limit, a cancelled run), handing the executor to a background task that stops the call or
//! kills the executor. It must not leave an executor with a call half sent back in the pool.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use taskfleet_common::StepError;
use taskfleet_common::error::WORKER_LOST;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::executor_process::{ExecutorProcess, describe_exit};
use super::{Inner, PythonPool, Restart};
use crate::executor::process::frame::{self, Call};
use crate::executor::python::{PythonOutput, PythonTarget, StepContext};
use crate::executor::{cancelled_error, timeout_error};

impl PythonPool {
    /// Runs one call on the next free executor and returns its outcome. With a `limit`, a call
    /// that runs longer fails with `timeout` when the limit passes (waiting for a free executor
    /// does not count). Dropping the returned future gives the call up: it is skipped if it has
    /// not started, and its step is interrupted (then its executor killed) if it has.
    ///
    /// The call travels from the caller's own task: no other task of the worker is woken on
    /// its way there and back.
    pub async fn call(
        &self,
        target: PythonTarget,
        input: Value,
        ctx: StepContext,
        limit: Option<Duration>,
    ) -> PythonOutput {
        let never = CancellationToken::new();
        self.call_timed(target, input, ctx, limit, &never).await.0
    }

    /// [`Self::call`], and how long the call took from the moment an executor took it (`None`
    /// if none did). At its time limit, or when `stop` is cancelled, the step is interrupted and
    /// its end awaited (for at most the kill grace period, after which its executor is killed),
    /// so that the outcome (`timeout`, or `cancelled`) carries what the step printed and logged
    /// up to its end, `finally` blocks included.
    pub async fn call_timed(
        &self,
        target: PythonTarget,
        input: Value,
        ctx: StepContext,
        limit: Option<Duration>,
        stop: &CancellationToken,
    ) -> (PythonOutput, Option<Duration>) {
        let mut call = Call { target, input, ctx };
        loop {
            let acquired = {
                let _waiting = Waiting::count(&self.inner.waiting);
                self.inner.available.acquire().await
            };
            let Ok(permit) = acquired else {
                return (lost("the python executors have stopped".to_owned()), None);
            };
            permit.forget();
            let Some(mut executor) = taskfleet_common::sync::lock(&self.inner.idle).pop() else {
                continue;
            };
            // One that died while idle is replaced, and the call waits for another.
            if let Ok(Some(status)) = executor.child.try_wait() {
                tracing::warn!(
                    pid = executor.pid,
                    status = describe_exit(Ok(status)),
                    "a python executor exited while idle; starting another"
                );
                Arc::clone(&self.inner).replace(executor, Restart::Died);
                continue;
            }
            let mut held = Held {
                inner: &self.inner,
                executor: Some(executor),
                running: None,
            };
            let taken = std::time::Instant::now();
            match held.run(call, limit, stop).await {
                Ok(output) => return (output, Some(taken.elapsed())),
                // Not sent: the executor is gone and the call never started.
                Err(unsent) => call = unsent,
            }
        }
    }
}

/// Counts a call among those waiting for an executor while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Self(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The outcome of a call whose executor went away.
fn lost(message: String) -> PythonOutput {
    PythonOutput {
        result: Err(StepError::new(WORKER_LOST, message)),
        logs: String::new(),
    }
}

/// An executor taken from the pool for one call. Dropped, it goes back to the pool; dropped
/// with its call still running (a timeout, or the caller gave the call up), a background task
/// stops the call and then gives the executor back, or kills and replaces it if the step does
/// not stop within the kill grace period.
struct Held<'a> {
    inner: &'a Arc<Inner>,
    executor: Option<ExecutorProcess>,
    /// The id of the call sent and not yet answered.
    running: Option<u64>,
}

impl Held<'_> {
    /// Runs one call to its end or its time limit; `Err` gives the call back if it could not be
    /// sent (the executor is gone).
    async fn run(
        &mut self,
        call: Call,
        limit: Option<Duration>,
        stop: &CancellationToken,
    ) -> Result<PythonOutput, Call> {
        let Some(executor) = self.executor.as_mut() else {
            return Err(call);
        };
        executor.calls += 1;
        let id = executor.calls;
        // The executor polls for its next call only if no other call waits for one now (see
        // `process::CALL_POLL`).
        let poll_after = self.inner.waiting.load(Ordering::Relaxed) == 0;
        // Set before sending: a caller that gives up half-way through the frame leaves the
        // executor to the stop-or-kill path, never back in the pool with half a frame sent.
        self.running = Some(id);
        if let Err(error) = executor
            .calls_connection
            .stream
            .write_all(&frame::encode_run(id, &call, poll_after))
            .await
        {
            tracing::warn!(pid = executor.pid, %error, "sending a call to a python executor failed");
            if let Some(executor) = self.executor.take() {
                Arc::clone(self.inner).replace(executor, Restart::Died);
            }
            return Err(call);
        }
        let expired = async {
            match limit {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let error = tokio::select! {
            ended = executor.until_done(id, Some(&self.inner.waiting)) => {
                return Ok(self.ended(ended).await);
            }
            () = expired => timeout_error(limit.unwrap_or_default()),
            () = stop.cancelled() => cancelled_error(),
        };
        // Interrupted here rather than in the background, so that the outcome keeps what the
        // step printed and logged up to its end. A step that does not stop within the grace
        // period takes its executor, and what it printed, with it.
        let grace = self.inner.settings.kill_grace;
        let stopped = executor.stop(id, grace).await;
        self.running = None;
        let logs = match stopped {
            Some(output) => output.logs,
            None => {
                if let Some(executor) = self.executor.take() {
                    Arc::clone(self.inner).replace(executor, Restart::Stuck);
                }
                String::new()
            }
        };
        Ok(PythonOutput {
            result: Err(error),
            logs,
        })
    }

    /// The outcome of a call that ended on its own, or with its executor.
    async fn ended(&mut self, ended: std::io::Result<PythonOutput>) -> PythonOutput {
        self.running = None;
        let Some(executor) = self.executor.as_mut() else {
            return lost("the python executor went away".to_owned());
        };
        match ended {
            Ok(output) => output,
            Err(error) => {
                let status = executor.exit_status().await;
                let pid = executor.pid;
                tracing::warn!(pid, %error, status, "a python executor died during a call");
                if let Some(executor) = self.executor.take() {
                    Arc::clone(self.inner).replace(executor, Restart::Died);
                }
                lost(format!(
                    "the python executor process running this step ({pid}) died: {status}"
                ))
            }
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let Some(mut executor) = self.executor.take() else {
            return;
        };
        let inner = Arc::clone(self.inner);
        let Some(id) = self.running else {
            inner.give_back(executor);
            return;
        };
        let grace = inner.settings.kill_grace;
        tokio::spawn(async move {
            if executor.stop(id, grace).await.is_some() {
                inner.give_back(executor);
            } else {
                inner.replace(executor, Restart::Stuck);
            }
        });
    }
}
