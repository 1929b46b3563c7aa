//! `taskfleet-scheduler`: loads the configuration, installs logging and runs the scheduler until
//! SIGTERM or Ctrl-C. Started with the hidden `--jq-sandbox BYTES` flag, it is one of the
//! sandbox processes that run planning's jq programs instead.

use clap::Parser;
use taskfleet_scheduler::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

/// The taskfleet scheduler: HTTP API, durable record, dispatch. Configured by TASKFLEET_*
/// environment variables (see the README); flags override them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of the HTTP API (TASKFLEET_HTTP_ADDR).
    #[arg(long)]
    http_addr: Option<String>,
    /// PostgreSQL URL (TASKFLEET_DATABASE_URL).
    #[arg(long)]
    database_url: Option<String>,
    /// Prefix of every queue and Redis key (TASKFLEET_NAMESPACE).
    #[arg(long)]
    namespace: Option<String>,
    /// Run as a jq sandbox with this memory limit in bytes (started by the scheduler itself).
    #[arg(long = "jq-sandbox", hide = true, value_name = "BYTES")]
    jq_sandbox: Option<u64>,
}

/// Stack of every runtime thread. Definitions' jq programs are compiled on these threads, and
/// quick ones run there; jaq recurses on the stack; the memory is only reserved, not used.
const THREAD_STACK_SIZE: usize = 32 * 1024 * 1024;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(memory_bytes) = args.jq_sandbox {
        taskfleet_io::jq_sandbox::serve(memory_bytes);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_SIZE)
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal, not in files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let env = std::env::vars().collect();
    let overrides = Overrides {
        http_addr: args.http_addr,
        database_url: args.database_url,
        namespace: args.namespace,
    };
    let config = Config::load(&env, &overrides)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
    taskfleet_scheduler::run(config, shutdown).await
}
