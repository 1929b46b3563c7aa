//! `taskfleet-scheduler`: loads the configuration, installs logging and runs the scheduler until
//! SIGTERM or Ctrl-C. Started as `taskfleet-scheduler --jq-sandbox BYTES`, it is one of the
//! sandbox processes that run planning's jq programs instead, and reads no setting.

use taskfleet_scheduler::config::{Config, CreateKeyArgs, SchedulerCommand, Settings};
use tokio_util::sync::CancellationToken;

/// Stack of every runtime thread. Definitions' jq programs are compiled on these threads, and
/// quick ones run there; jaq recurses on the stack; the memory is only reserved, not used.
const THREAD_STACK_SIZE: usize = 32 * 1024 * 1024;

fn main() -> anyhow::Result<()> {
    taskfleet_io::jq_sandbox::serve_if_started_as_one();
    taskfleet_io::tls::install_crypto_provider();
    let mut settings: Settings = taskfleet_io::settings::parse();
    let command = settings.command.take();
    if let Some(SchedulerCommand::Openapi) = command {
        let document = taskfleet_scheduler::api::openapi::document();
        let text = serde_json::to_string_pretty(&document)?;
        use std::io::Write as _;
        writeln!(std::io::stdout(), "{text}")?;
        return Ok(());
    }
    if let Err(message) = settings.encryption.install() {
        anyhow::bail!(message);
    }
    let log_format = settings.log.log_format;
    let span_settings = settings.spans.clone();
    let config = Config::from(settings);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(THREAD_STACK_SIZE)
        .build()?;
    match command {
        Some(SchedulerCommand::CreateKey(args)) => runtime.block_on(create_key(config, args)),
        Some(SchedulerCommand::Openapi) | None => {
            if let Err(message) = config.check() {
                anyhow::bail!(message);
            }
            taskfleet_io::logging::install(log_format);
            let spans = taskfleet_io::spans::install(&span_settings, "taskfleet-scheduler")?;
            let served = runtime.block_on(serve(config));
            // The spans still queued are sent once the runtime has stopped.
            drop(runtime);
            if let Some(spans) = spans {
                spans.finish();
            }
            served
        }
    }
}

/// `taskfleet-scheduler create-key`: makes a key in the database and prints it last.
async fn create_key(config: Config, args: CreateKeyArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    taskfleet_scheduler::auth::check_tenant(&args.tenant).map_err(anyhow::Error::msg)?;
    let scopes =
        taskfleet_scheduler::auth::parse_scopes(&args.scopes).map_err(anyhow::Error::msg)?;
    let db = taskfleet_scheduler::store::connect(&config.database_url, 1)
        .await
        .context("connecting to postgresql")?;
    let secret = taskfleet_scheduler::auth::create_key(
        &db,
        config.namespace.as_str(),
        &args.tenant,
        &scopes,
        args.description.as_deref(),
        None,
    )
    .await
    .map_err(|error| anyhow::anyhow!("storing the key: {error:?}"))?;
    let names: Vec<&str> = scopes.iter().map(|scope| scope.as_str()).collect();
    let detail = serde_json::json!({"tenant": args.tenant, "scopes": names});
    taskfleet_scheduler::store::audit(
        &db,
        config.namespace.as_str(),
        taskfleet_scheduler::store::AuditEvent {
            key_id: None,
            tenant: &args.tenant,
            action: "key.create",
            target: Some(secret.id.to_string()),
            detail: Some(detail),
        },
    )
    .await
    .context("recording the key's creation")?;
    // The key is the last line, alone, so that scripts can take it with `tail -n 1`.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "API key {} for tenant {} with scopes {} (shown only now):",
            secret.id,
            args.tenant,
            names.join(",")
        );
        println!("{}", secret.secret);
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(taskfleet_io::signals::cancel_on_signal(shutdown.clone()));
    taskfleet_scheduler::run(config, shutdown).await
}
