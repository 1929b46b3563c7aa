//! `taskfleet-worker`: loads the configuration, starts the pool of Python executor processes,
//! installs logging and runs the worker until SIGTERM or Ctrl-C, then drains. Started with the
//! hidden `--python-executor SOCKET` flag, it is one of those executor processes instead; with
//! `--jq-sandbox BYTES`, one of the sandbox processes that run jq programs.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxSettings};
use taskfleet_worker::config::{Config, Overrides};
use taskfleet_worker::executor::dataflow::DataflowExecutor;
use taskfleet_worker::executor::pool::{PoolSettings, PythonPool};
use taskfleet_worker::executor::process;
use taskfleet_worker::executor::python::PythonSettings;
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
    /// Python executor processes, each running one Python step at a time (default: one per
    /// core; TASKFLEET_PYTHON_EXECUTORS).
    #[arg(long)]
    python_executors: Option<usize>,
    /// Replace a Python executor after it ran this many steps (default: 0, never;
    /// TASKFLEET_PYTHON_MAX_TASKS).
    #[arg(long)]
    python_max_tasks: Option<u64>,
    /// Replace a Python executor whose resident memory is above this many MiB after a step
    /// (default: 0, no limit; TASKFLEET_PYTHON_MAX_RSS_MB).
    #[arg(long, value_name = "MIB")]
    python_max_rss_mb: Option<u64>,
    /// Run as a Python executor serving the worker listening on this socket (started by the
    /// worker itself).
    #[arg(long = "python-executor", hide = true, value_name = "SOCKET")]
    python_executor: Option<PathBuf>,
    /// Run as a jq sandbox with this memory limit in bytes (started by the worker itself).
    #[arg(long = "jq-sandbox", hide = true, value_name = "BYTES")]
    jq_sandbox: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(memory_bytes) = args.jq_sandbox {
        taskfleet_io::jq_sandbox::serve(memory_bytes);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal, not in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if let Some(socket) = args.python_executor {
        // The executor leaves as soon as its worker closes the connection, even with a step
        // still running on its interpreter thread.
        process::serve(&socket)?;
        std::process::exit(0);
    }
    let env = std::env::vars().collect();
    let overrides = Overrides {
        queues: args.queues,
        concurrency: args.concurrency,
        python_path: args.python_path,
        virtual_env: args.venv,
        namespace: args.namespace,
        python_executors: args.python_executors,
        python_max_tasks: args.python_max_tasks,
        python_max_rss_mb: args.python_max_rss_mb,
    };
    let config = Config::load(&env, &overrides)?;
    let program = std::env::current_exe().context("finding the worker's own executable")?;
    let pool = PoolSettings {
        program: program.clone(),
        executors: config.python_executors,
        max_tasks: config.python_max_tasks,
        max_rss_bytes: config.python_max_rss_mb.map(|mib| mib * 1024 * 1024),
        kill_grace: config.python_kill_grace,
        python: PythonSettings {
            max_log_chars: config.max_log_chars,
            python_path: config.python_path.clone(),
            virtual_env: config.virtual_env.clone(),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Quick jq programs run on these threads, and jaq recurses on the stack; the memory is
        // only reserved, not used.
        .thread_stack_size(32 * 1024 * 1024)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let executors = Executors {
            dataflow: DataflowExecutor::new(
                JqSandbox::new(SandboxSettings {
                    program: program.clone(),
                    processes: config.jq_sandboxes.get(),
                    memory_bytes: config.jq_memory_bytes,
                }),
                config.jq_time_limit,
            ),
            python: PythonPool::start(pool).await?,
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
        runner::run(config, executors, shutdown).await
    })
}
