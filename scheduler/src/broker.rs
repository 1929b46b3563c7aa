//! RabbitMQ for the scheduler: the connection, task queue declarations, publishing tasks with
//! publisher confirms, and the consumer of completions.
//!
//! Task queues are declared here with the same arguments the workers use, so whichever side
//! comes first creates them.

use std::collections::HashSet;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use taskfleet_common::Namespace;
use taskfleet_common::names::MAX_PRIORITY;
use tokio::sync::Mutex;

/// A connection to RabbitMQ with a publishing channel in confirm mode.
pub struct Broker {
    connection: Connection,
    publisher: Channel,
    namespace: Namespace,
    declared: Mutex<HashSet<String>>,
}

/// One message to publish to a task queue.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The task queue (not yet namespaced).
    pub queue: String,
    /// 0 to 9.
    pub priority: u8,
    /// The encoded task message.
    pub body: Vec<u8>,
}

/// Returns the arguments every task queue is declared with.
pub fn task_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    arguments
}

impl Broker {
    /// Connects to `url`, retrying with backoff for up to about a minute so that the scheduler
    /// can start before the broker.
    pub async fn connect(url: &str, namespace: Namespace) -> Result<Self, lapin::Error> {
        let connect = || Connection::connect(url, ConnectionProperties::default());
        let connection = connect
            .retry(
                ExponentialBuilder::default()
                    .with_max_delay(Duration::from_secs(5))
                    .with_max_times(15),
            )
            .notify(|error, delay| tracing::warn!(%error, ?delay, "connecting to rabbitmq"))
            .await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let broker = Self {
            connection,
            publisher,
            namespace,
            declared: Mutex::new(HashSet::new()),
        };
        broker.declare_completions().await?;
        Ok(broker)
    }

    async fn declare_completions(&self) -> Result<(), lapin::Error> {
        self.publisher
            .queue_declare(
                self.namespace.completions_queue().into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Declares a task queue unless this process already did.
    async fn ensure_task_queue(&self, queue: &str) -> Result<(), lapin::Error> {
        let mut declared = self.declared.lock().await;
        if declared.contains(queue) {
            return Ok(());
        }
        self.publisher
            .queue_declare(
                self.namespace.task_queue(queue).into(),
                QueueDeclareOptions::durable(),
                task_queue_arguments(),
            )
            .await?;
        declared.insert(queue.to_owned());
        Ok(())
    }

    /// Publishes messages as persistent, all in flight at once, and waits for the broker's
    /// confirms. Returns, for each message, whether the broker confirmed it.
    pub async fn publish(&self, messages: &[Outgoing]) -> Result<Vec<bool>, lapin::Error> {
        for message in messages {
            self.ensure_task_queue(&message.queue).await?;
        }
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(message.priority)
                .with_content_type("application/json".into());
            let confirm = self
                .publisher
                .basic_publish(
                    "".into(),
                    self.namespace.task_queue(&message.queue).into(),
                    BasicPublishOptions::default(),
                    &message.body,
                    properties,
                )
                .await?;
            confirms.push(confirm);
        }
        let mut acked = Vec::with_capacity(confirms.len());
        for confirm in confirms {
            acked.push(confirm.await?.is_ack());
        }
        Ok(acked)
    }

    /// Starts consuming completions on a channel of their own with the given prefetch.
    pub async fn consume_completions(&self, prefetch: u16) -> Result<Consumer, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                self.namespace.completions_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Returns the messages ready and the consumers of a task queue, or `None` if the broker
    /// has no such queue. Each look-up uses a channel of its own: a passive declaration of a
    /// missing queue closes its channel.
    pub async fn queue_counts(&self, queue: &str) -> Result<Option<(u32, u32)>, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                self.namespace.task_queue(queue).into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(found) => {
                let _ = channel.close(200, "done".into()).await;
                Ok(Some((found.message_count(), found.consumer_count())))
            }
            // NOT_FOUND closes the channel by itself; any other error is the connection's.
            Err(error) if error.to_string().contains("NOT_FOUND") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Returns whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Err(error) = self
            .connection
            .close(200, "scheduler stopping".into())
            .await
        {
            tracing::debug!(%error, "closing rabbitmq connection");
        }
    }
}
