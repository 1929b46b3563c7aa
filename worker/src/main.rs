//! `taskfleet-worker`: loads the configuration, starts the pool of Python executor processes,
//! installs logging and runs the worker until SIGTERM or Ctrl-C, then drains. Started as
//! `taskfleet-worker --python-executor SOCKET`, it is one of those executor processes instead;
//! as `taskfleet-worker --jq-sandbox BYTES`, one of the sandbox processes that run jq programs.
//! Neither reads the worker's settings.

use anyhow::Context;
use taskfleet_io::logging::LogFormat;
use taskfleet_worker::config::{Config, PYTHON_PATH_VARIABLE, Settings};
use taskfleet_worker::executor::process;
use taskfleet_worker::{ExecutorSettings, Executors, metrics, runner};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    taskfleet_io::jq_sandbox::serve_if_started_as_one();
    if let Some(socket) = started_as_executor() {
        // An executor reads no setting: its rare lines of its own are text.
        taskfleet_io::logging::install(LogFormat::Text);
        // The executor leaves as soon as its worker closes the connection, even with a step
        // still running on its interpreter thread.
        process::serve(&socket)?;
        std::process::exit(0);
    }
    taskfleet_io::tls::install_crypto_provider();
    let settings: Settings = taskfleet_io::settings::parse();
    taskfleet_io::logging::install(settings.log.log_format);
    if let Err(message) = settings.encryption.install() {
        anyhow::bail!(message);
    }
    let spans = taskfleet_io::spans::install(&settings.spans, "taskfleet-worker")?;
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
    let ran = runtime.block_on(async {
        let executors = Executors::start(executor_settings).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
        // Served until the runner has drained, so a last scrape sees the final counts.
        let metrics_stop = CancellationToken::new();
        let metrics = match config.metrics_addr {
            Some(addr) => {
                let exposition = metrics::install(&config.queues).map_err(anyhow::Error::msg)?;
                let python = executors.python.clone();
                Some(metrics::serve(addr, exposition, python, metrics_stop.clone()).await?)
            }
            None => None,
        };
        let ran = runner::run(config, executors, shutdown).await;
        metrics_stop.cancel();
        if let Some(server) = metrics {
            let _ = server.await;
        }
        ran
    });
    // The spans still queued are sent once the runtime has stopped.
    drop(runtime);
    if let Some(spans) = spans {
        spans.finish();
    }
    ran
}

/// The socket of the worker this process serves as a Python executor, when it was started as
/// one (`--python-executor SOCKET` as its only arguments).
fn started_as_executor() -> Option<std::path::PathBuf> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(process::EXECUTOR_FLAG)) {
        return None;
    }
    args.next().map(std::path::PathBuf::from)
}
