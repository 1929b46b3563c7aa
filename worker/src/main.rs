//! `taskfleet-worker`: loads the configuration, starts the pool of Python executor processes,
//! installs logging and runs the worker until SIGTERM or Ctrl-C, then drains. Started with the
//! hidden `--python-executor SOCKET` flag, it is one of those executor processes instead; with
//! `--jq-sandbox BYTES`, one of the sandbox processes that run jq programs.

use anyhow::Context;
use taskfleet_worker::config::{Config, PYTHON_PATH_VARIABLE, Settings};
use taskfleet_worker::executor::process;
use taskfleet_worker::{ExecutorSettings, Executors, runner};
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
    let executor_settings = ExecutorSettings::new(&config, program);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Quick jq programs run on these threads, and jaq recurses on the stack; the memory is
        // only reserved, not used.
        .thread_stack_size(32 * 1024 * 1024)
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let executors = Executors::start(executor_settings).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
        runner::run(config, executors, shutdown).await
    })
}
