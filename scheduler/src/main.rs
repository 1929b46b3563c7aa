//! `taskfleet-scheduler`: loads the configuration, installs logging and runs the scheduler until
//! SIGTERM or Ctrl-C. Started as `taskfleet-scheduler --jq-sandbox BYTES`, it is one of the
//! sandbox processes that run planning's jq programs instead, and reads no setting.

use taskfleet_scheduler::config::{Config, Settings};
use tokio_util::sync::CancellationToken;

/// Stack of every runtime thread. Definitions' jq programs are compiled on these threads, and
/// quick ones run there; jaq recurses on the stack; the memory is only reserved, not used.
const THREAD_STACK_SIZE: usize = 32 * 1024 * 1024;

fn main() -> anyhow::Result<()> {
    taskfleet_io::jq_sandbox::serve_if_started_as_one();
    let settings: Settings = taskfleet_io::settings::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_SIZE)
        .build()?
        .block_on(serve(Config::from(settings)))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal, not in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let shutdown = CancellationToken::new();
    tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
    taskfleet_scheduler::run(config, shutdown).await
}
