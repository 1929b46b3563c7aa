//! The taskfleet scheduler: takes work through the HTTP API, keeps the durable record in
//! PostgreSQL, plans runs into tasks, dispatches them through RabbitMQ and advances runs as
//! completions come back.
//!
//! [`run`] wires the parts together and runs them until the shutdown token is cancelled.

pub mod accept;
pub mod admission;
pub mod api;
pub mod auth;
pub mod broker;
pub mod completions;
pub mod config;
pub mod costs;
pub mod deadlines;
pub mod dispatch;
pub mod ended;
pub mod metrics;
pub mod notify;
pub mod planning;
pub mod retention;
pub mod retry;
pub mod schedules;
pub mod store;
pub mod tls;
pub mod ttl_cache;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use taskfleet_io::jq_sandbox::{JqSandbox, SandboxSettings};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Runs a scheduler until `shutdown` is cancelled, then drains and returns.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    // Read the certificate and key first: a bad file stops the start before anything else.
    let tls_acceptor = config.tls.as_ref().map(tls::acceptor).transpose()?;
    let db = store::connect(&config.database_url, config.database_pool_size)
        .await
        .context("connecting to postgresql")?;
    store::check_sealed(&db, config.namespace.as_str())
        .await
        .context("reading stored runs with TASKFLEET_ENCRYPTION_KEYS")?;
    let (redis_client, redis) = taskfleet_io::redis_connection::connect(&config.redis_url).await?;
    let Some(broker) = broker::Broker::connect(
        &config.amqp_url,
        config.namespace.clone(),
        shutdown.child_token(),
    )
    .await
    else {
        return Ok(());
    };
    let broker = Arc::new(broker);
    let tracker = TaskTracker::new();
    let notifier = notify::Notifier::new(redis.clone(), config.namespace.clone());
    tracker.spawn(
        notifier
            .clone()
            .listen(redis_client, shutdown.child_token()),
    );

    // Learned from the completions, read when packing tasks into messages.
    let costs = costs::TaskCosts::default();
    // The dispatcher and the accept writer end when their senders are all dropped, after
    // handling what they hold, so nothing accepted before the shutdown is left unwritten.
    let (dispatcher, dispatch_loop) = dispatch::dispatcher(
        broker.clone(),
        db.clone(),
        dispatch::RateLimiting {
            redis: redis.clone(),
            namespace: config.namespace.clone(),
        },
        config.max_tasks_per_message,
        config.relay_after,
        costs.clone(),
    );
    // Tasks that wait for a concurrency permit are admitted by this loop; whoever writes them
    // (or frees permits) wakes it through the dispatcher.
    let (admission, admission_loop) = admission::admission(
        db.clone(),
        config.namespace.as_str().to_owned(),
        shutdown.child_token(),
    );
    tracker.spawn(admission_loop);
    let dispatcher = dispatcher.with_admission(admission);
    let dispatch_task = tokio::spawn(dispatch_loop);
    tracker.spawn(dispatch::relay_loop(
        dispatcher.clone(),
        broker.clone(),
        db.clone(),
        config.namespace.as_str().to_owned(),
        config.relay_after,
        Duration::from_secs(2),
        shutdown.child_token(),
    ));
    tracker.spawn(dispatch::timer_loop(
        dispatcher.clone(),
        broker.clone(),
        db.clone(),
        config.namespace.as_str().to_owned(),
        Duration::from_millis(100),
        shutdown.child_token(),
    ));
    tracker.spawn(deadlines::deadline_loop(
        db.clone(),
        config.namespace.as_str().to_owned(),
        notifier.clone(),
        shutdown.child_token(),
    ));
    if let Some(retention) = config.retention {
        tracker.spawn(retention::sweep_loop(
            db.clone(),
            config.namespace.as_str().to_owned(),
            retention,
            shutdown.child_token(),
        ));
    }
    let (acceptor, writer) = accept::acceptor(
        db.clone(),
        config.namespace.as_str().to_owned(),
        dispatcher.clone(),
        notifier.clone(),
    );
    let writer_task = tokio::spawn(writer);
    // New runs and completions plan with sandboxes of their own, so that requests whose
    // programs run to their time limit never keep the completion loop waiting for a sandbox.
    let sandbox_settings = SandboxSettings {
        program: std::env::current_exe().context("finding the scheduler's own executable")?,
        processes: config.jq_sandboxes.get(),
        memory_bytes: config.jq_memory_bytes,
    };
    let compiled = taskfleet_common::jq::ProgramCache::default();
    let planning_programs = |settings: SandboxSettings| {
        planning::SandboxedPrograms::new(
            compiled.clone(),
            JqSandbox::new(settings),
            config.jq_time_limit,
            shutdown.clone(),
        )
        .with_max_value_bytes(config.max_value_bytes)
    };
    let programs = planning_programs(sandbox_settings.clone());
    let submission_programs = planning_programs(sandbox_settings);
    let completion_loop = completions::CompletionLoop {
        namespace: config.namespace.as_str().to_owned(),
        db: store::HeldConnection::new(db.clone()),
        dispatcher: dispatcher.clone(),
        notifier: notifier.clone(),
        programs,
        broker: broker.clone(),
        costs,
    };
    tracker.spawn(completion_loop.run(
        broker.completions(completions::MAX_BATCH as u16),
        shutdown.child_token(),
    ));

    let metrics = if config.metrics {
        match metrics::install() {
            Ok(exposition) => Some(metrics::Served {
                exposition,
                refresh: Arc::default(),
            }),
            Err(error) => {
                tracing::warn!(%error, "metrics are off");
                None
            }
        }
    } else {
        None
    };
    let schedule_wake = Arc::new(tokio::sync::Notify::new());
    tracker.spawn(
        schedules::Firing {
            db: db.clone(),
            namespace: config.namespace.as_str().to_owned(),
            programs: submission_programs.clone(),
            dispatcher: dispatcher.clone(),
            notifier: notifier.clone(),
            grace: config.schedule_grace,
            wake: schedule_wake.clone(),
        }
        .run(shutdown.child_token()),
    );
    let state = api::AppState {
        config: config.clone(),
        db: db.clone(),
        redis,
        broker: broker.clone(),
        acceptor,
        dispatcher: dispatcher.clone(),
        notifier,
        programs: submission_programs,
        shutdown: shutdown.clone(),
        authenticator: auth::Authenticator::new(config.auth),
        quotas: api::Quotas::default(),
        metrics,
        schedule_wake,
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listening on {}", config.http_addr))?;
    let http_shutdown = shutdown.clone();
    let stopped = async move { http_shutdown.cancelled().await };
    match tls_acceptor {
        Some(acceptor) => {
            let listener = tls::TlsListener::new(listener, acceptor, shutdown.child_token())?;
            let addr = axum::serve::Listener::local_addr(&listener)?;
            tracing::info!(%addr, namespace = %config.namespace, "scheduler listening (https)");
            axum::serve(listener, api::router(state))
                .with_graceful_shutdown(stopped)
                .await
                .context("serving https")?;
        }
        None => {
            tracing::info!(addr = %listener.local_addr()?, namespace = %config.namespace, "scheduler listening");
            axum::serve(listener, api::router(state))
                .with_graceful_shutdown(stopped)
                .await
                .context("serving http")?;
        }
    }

    // The router (and its acceptor) is gone: the writer finishes what it holds and ends.
    let _ = writer_task.await;
    tracker.close();
    tracker.wait().await;
    drop(dispatcher);
    let _ = dispatch_task.await;
    broker.close().await;
    db.close().await;
    tracing::info!("scheduler stopped");
    Ok(())
}
