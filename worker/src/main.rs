//! `taskfleet-worker`: loads the configuration, starts the Python interpreter, installs logging
//! and runs the worker until SIGTERM or Ctrl-C, then drains.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use taskfleet_worker::config::{Config, Overrides};
use taskfleet_worker::executor::dataflow::DataflowExecutor;
use taskfleet_worker::executor::python::{PythonExecutor, PythonSettings};
use taskfleet_worker::runner::{self, Executors};
use tokio_util::sync::CancellationToken;

/// A taskfleet worker: runs dataflow and Python steps from RabbitMQ. Configured by TASKFLEET_*
/// environment variables (see the README); flags override them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Task queues to consume, comma separated (default: default).
    #[arg(long)]
    queues: Option<String>,
    /// Tasks in flight at once (default: 4 per core).
    #[arg(long)]
    concurrency: Option<usize>,
    /// A directory prepended to Python's sys.path; repeat for several.
    #[arg(long = "python-path", value_name = "DIR")]
    python_path: Vec<PathBuf>,
    /// A virtualenv whose packages steps can import (default: $VIRTUAL_ENV).
    #[arg(long)]
    venv: Option<PathBuf>,
    /// Prefix of every queue and Redis key (TASKFLEET_NAMESPACE).
    #[arg(long)]
    namespace: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let env = std::env::vars().collect();
    let overrides = Overrides {
        queues: args.queues,
        concurrency: args.concurrency,
        python_path: args.python_path,
        virtual_env: args.venv,
        namespace: args.namespace,
    };
    let config = Config::load(&env, &overrides)?;
    let python = PythonExecutor::start(PythonSettings {
        max_log_chars: config.max_log_chars,
        python_path: config.python_path.clone(),
        virtual_env: config.virtual_env.clone(),
    })
    .context("starting the python interpreter")?;
    let executors = Executors {
        dataflow: DataflowExecutor::default(),
        python,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // jq programs run on the blocking threads, and jaq recurses on the stack; the memory is
        // only reserved, not used.
        .thread_stack_size(32 * 1024 * 1024)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        runner::run(config, executors, shutdown).await
    })
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "installing the SIGTERM handler");
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
