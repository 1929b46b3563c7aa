//! The worker's main loop: connects, consumes every task queue and hands each delivery to its
//! own task (see `delivery`), reconnects in place after a lost connection, and at shutdown
//! drains within the grace period, lets the report loop finish and stops the background loops
//! (heartbeat, cancel listener). It runs no task itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::cancel::cancel_listener;
use super::delivery::handle;
use super::held::HeldTasks;
use super::lease::heartbeat_loop;
use super::{Executors, Shared};
use crate::broker::Broker;
use crate::config::Config;
use crate::report::{self, BrokerSlot, ReportTargets};

/// Runs a worker until `shutdown` is cancelled, then drains within the grace period.
///
/// A lost RabbitMQ connection (a broker restart, a network cut) is re-established in place:
/// the worker reconnects with backoff, declares its queues again and resumes consuming. Tasks
/// running when the connection dropped run to their end and report on the new connection; their
/// deliveries died with the old one, so RabbitMQ hands them out again, and the second
/// completion of the same attempt is ignored by the scheduler's fencing.
pub async fn run(
    config: Config,
    executors: Executors,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prefetch = u16::try_from(config.concurrency.get()).unwrap_or(u16::MAX);
    let connect = || {
        Broker::connect(
            &config.amqp_url,
            &config.namespace,
            &config.queues,
            prefetch,
            &shutdown,
        )
    };
    let Some(broker) = connect().await else {
        return Ok(());
    };
    let (redis_client, redis) = taskfleet_io::redis_connection::connect(&config.redis_url).await?;
    let broker = Arc::new(BrokerSlot::new(broker));
    let report_stop = CancellationToken::new();
    let (reporter, report_loop) = report::reporter(
        ReportTargets {
            broker: broker.clone(),
            redis: redis.clone(),
            namespace: config.namespace.clone(),
        },
        report_stop.clone(),
    );
    let reports = tokio::spawn(report_loop);
    let shared = Arc::new(Shared {
        broker,
        reporter,
        slots: Semaphore::new(config.concurrency.get()),
        redis,
        namespace: config.namespace.clone(),
        worker_id: config.worker_id.clone(),
        executors,
        lease_ttl: config.lease_ttl,
        max_value_bytes: config.max_value_bytes,
        running: Mutex::new(HashMap::new()),
        requeueing: Mutex::new(HashMap::new()),
        held: HeldTasks::default(),
    });
    let background = CancellationToken::new();
    let background_tasks = TaskTracker::new();
    background_tasks.spawn(heartbeat_loop(
        shared.clone(),
        config.clone(),
        background.clone(),
    ));
    background_tasks.spawn(cancel_listener(
        shared.clone(),
        redis_client,
        background.clone(),
    ));
    let tasks = TaskTracker::new();
    loop {
        let broker = shared.broker.current();
        let lost = match consume(&broker, &config).await {
            Ok((tags, mut deliveries)) => {
                tracing::info!(
                    worker_id = %config.worker_id,
                    queues = ?config.queues,
                    concurrency = config.concurrency.get(),
                    namespace = %config.namespace,
                    "worker consuming"
                );
                let lost = loop {
                    let next = tokio::select! {
                        next = deliveries.next() => next,
                        () = shutdown.cancelled() => break None,
                    };
                    match next {
                        Some(Ok(delivery)) => {
                            tasks.spawn(handle(shared.clone(), delivery));
                        }
                        Some(Err(error)) => break Some(error.to_string()),
                        None => break Some("the broker ended the task consumers".to_owned()),
                    }
                };
                if lost.is_none() {
                    for tag in &tags {
                        broker.cancel(tag).await;
                    }
                }
                lost
            }
            Err(error) => Some(error.to_string()),
        };
        let Some(lost) = lost else { break };
        tracing::warn!(
            error = lost,
            in_flight = tasks.len(),
            "lost the rabbitmq connection; reconnecting"
        );
        broker.close().await;
        match connect().await {
            Some(broker) => shared.broker.replace(broker),
            None => break,
        }
    }
    tracing::info!(in_flight = tasks.len(), "worker draining");
    tasks.close();
    if tokio::time::timeout(config.shutdown_grace, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = tasks.len(),
            "grace period over; unfinished tasks go back to their queues"
        );
    }
    // What finished is reported before the connection closes; the rest goes back to its queues.
    report_stop.cancel();
    if let Err(error) = reports.await {
        tracing::error!(%error, "the report loop failed");
    }
    background.cancel();
    background_tasks.close();
    background_tasks.wait().await;
    shared.broker.current().close().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Starts consuming every task queue of the worker; returns the consumer tags and the merged
/// stream of deliveries.
async fn consume(
    broker: &Broker,
    config: &Config,
) -> Result<
    (
        Vec<String>,
        futures_util::stream::SelectAll<lapin::Consumer>,
    ),
    lapin::Error,
> {
    let mut consumers = Vec::new();
    let mut tags = Vec::new();
    for queue in &config.queues {
        let tag = format!("{}.{queue}", config.worker_id);
        consumers.push(broker.consume(queue, &tag).await?);
        tags.push(tag);
    }
    Ok((tags, futures_util::stream::select_all(consumers)))
}
