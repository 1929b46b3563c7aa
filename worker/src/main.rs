//! `taskfleet-worker`: loads the configuration, starts the pool of Python executor processes,
//! installs logging and runs the worker until SIGTERM or Ctrl-C, then drains. Started with the
//! hidden `--python-executor SOCKET` flag, it is one of those executor processes instead; with
//! `--jq-sandbox BYTES`, one of the sandbox processes that run jq programs.

use anyhow::Context;
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxSettings};
use taskfleet_worker::config::{Config, PYTHON_PATH_VARIABLE, Settings};
use taskfleet_worker::executor::dataflow::DataflowExecutor;
use taskfleet_worker::executor::pool::{PoolSettings, PythonPool};
use taskfleet_worker::executor::process;
use taskfleet_worker::executor::python::PythonSettings;
use taskfleet_worker::runner::{self, Executors};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let settings: Settings = taskfleet_io::settings::parse();
    if let Some(memory_bytes) = settings.jq_sandbox {
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
    if let Some(socket) = &settings.python_executor {
        // The executor leaves as soon as its worker closes the connection, even with a step
        // still running on its interpreter thread.
        process::serve(socket)?;
        std::process::exit(0);
    }
    let python_path = std::env::var(PYTHON_PATH_VARIABLE).ok();
    let config = Config::new(
        settings,
        python_path.as_deref(),
        std::env::var("HOSTNAME").ok(),
    );
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
