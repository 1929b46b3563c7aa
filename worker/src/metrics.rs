//! The worker's Prometheus metrics, and the small HTTP server that serves them at
//! `TASKFLEET_METRICS_ADDR` (`/metrics`, and `/healthz` for a liveness probe). Without that
//! address the worker installs no recorder and every count is a no-op.
//!
//! Labels stay bounded: queue names, step kinds, statuses and reasons, never ids.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use taskfleet_common::definition::StepKind;
use taskfleet_common::error::{CANCELLED, TIMEOUT};
use taskfleet_common::protocol::Outcome;
use taskfleet_io::metrics::Exposition;
use tokio_util::sync::CancellationToken;

use crate::executor::pool::{PythonPool, Restart};

/// Task attempts run, by queue, step kind and status.
pub const TASKS: &str = "taskfleet_worker_tasks_total";
/// Seconds an attempt took, from its start to its outcome, by queue and step kind.
pub const TASK_DURATION: &str = "taskfleet_worker_task_duration_seconds";
/// Attempts running now.
pub const IN_FLIGHT: &str = "taskfleet_worker_tasks_in_flight";
/// Python executor processes, by state.
pub const EXECUTORS: &str = "taskfleet_python_executors";
/// Python executor processes replaced, by reason.
pub const EXECUTOR_RESTARTS: &str = "taskfleet_python_executor_restarts_total";

/// The statuses of an attempt; `deferred` counts attempts that did not start because their late
/// start was over a rate limit.
const STATUSES: [&str; 5] = ["succeeded", "failed", "timeout", "cancelled", "deferred"];

/// Installs the recorder and names every family, with the series known in advance at zero.
pub fn install(queues: &[String]) -> Result<Exposition, String> {
    let exposition = taskfleet_io::metrics::install(&[TASK_DURATION])?;
    describe_counter!(TASKS, "Task attempts run, by queue, step kind and status.");
    describe_histogram!(
        TASK_DURATION,
        metrics::Unit::Seconds,
        "Seconds an attempt took, from its start to its outcome, by queue and step kind."
    );
    describe_gauge!(IN_FLIGHT, "Task attempts running now.");
    describe_gauge!(EXECUTORS, "Python executor processes, by state.");
    describe_counter!(
        EXECUTOR_RESTARTS,
        "Python executor processes replaced, by reason."
    );
    for queue in queues {
        for kind in ["python", "python_code", "dataflow"] {
            for status in STATUSES {
                counter!(TASKS, "queue" => queue.clone(), "kind" => kind, "status" => status)
                    .absolute(0);
            }
        }
    }
    gauge!(IN_FLIGHT).set(0.0);
    for reason in Restart::ALL {
        counter!(EXECUTOR_RESTARTS, "reason" => reason.as_str()).absolute(0);
    }
    Ok(exposition)
}

/// The step kind's label.
pub fn kind(step: &StepKind) -> &'static str {
    match step {
        StepKind::Python { .. } => "python",
        StepKind::PythonCode { .. } => "python_code",
        StepKind::Dataflow { .. } => "dataflow",
    }
}

/// Counts an attempt that ran, and its time.
pub fn task_ran(queue: &str, kind: &'static str, outcome: &Outcome, seconds: f64) {
    let status = match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed { error } if error.kind == TIMEOUT => "timeout",
        Outcome::Failed { error } if error.kind == CANCELLED => "cancelled",
        Outcome::Failed { .. } => "failed",
        Outcome::Deferred { .. } => "deferred",
    };
    counter!(TASKS, "queue" => queue.to_owned(), "kind" => kind, "status" => status).increment(1);
    histogram!(TASK_DURATION, "queue" => queue.to_owned(), "kind" => kind).record(seconds);
}

/// Counts an attempt deferred without running: its late start was over a rate limit.
pub fn task_deferred(queue: &str, kind: &'static str) {
    counter!(TASKS, "queue" => queue.to_owned(), "kind" => kind, "status" => "deferred")
        .increment(1);
}

/// Counts an attempt running while it lives.
pub struct InFlight(());

impl InFlight {
    /// Counts one more attempt running.
    pub fn start() -> Self {
        gauge!(IN_FLIGHT).increment(1.0);
        Self(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(IN_FLIGHT).decrement(1.0);
    }
}

/// Counts an executor replaced.
pub fn executor_restarted(reason: Restart) {
    counter!(EXECUTOR_RESTARTS, "reason" => reason.as_str()).increment(1);
}

/// Binds `addr` and serves `/metrics` and `/healthz` there until `shutdown`. Fails at once if
/// the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    exposition: Exposition,
    python: PythonPool,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics on {addr} (TASKFLEET_METRICS_ADDR)"))?;
    let render = move || {
        for (state, count) in python.executor_states() {
            #[allow(clippy::cast_precision_loss)]
            gauge!(EXECUTORS, "state" => state.as_str()).set(count as f64);
        }
        (
            [(header::CONTENT_TYPE, taskfleet_io::metrics::CONTENT_TYPE)],
            exposition.render(),
        )
            .into_response()
    };
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(render())))
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        );
    tracing::info!(%addr, "serving metrics");
    Ok(tokio::spawn(async move {
        let stopped = async move { shutdown.cancelled().await };
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(%error, "the metrics server stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::pool::ExecutorState;

    #[test]
    fn every_executor_state_and_restart_reason_has_a_label() {
        let states: Vec<&str> = ExecutorState::ALL
            .iter()
            .map(|state| state.as_str())
            .collect();
        assert_eq!(states, ["idle", "busy", "starting"]);
        let reasons: Vec<&str> = Restart::ALL.iter().map(|reason| reason.as_str()).collect();
        assert_eq!(reasons, ["died", "stuck", "max_tasks", "max_memory"]);
    }
}
