//! RabbitMQ for the worker: the connection, the task consumers and the publisher of completions
//! (in confirm mode). The declarations it shares with the scheduler, and how both reach the
//! broker, are `taskfleet_io::amqp`'s.

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use taskfleet_common::Namespace;
use taskfleet_io::amqp::{self, AmqpUrl};
use tokio_util::sync::CancellationToken;

/// The worker's connection with one channel for consuming and one for publishing.
pub struct Broker {
    connection: Connection,
    consumer: Channel,
    publisher: Channel,
    namespace: Namespace,
    prefetch: u16,
}

impl Broker {
    /// Connects, retrying with backoff ([`amqp::reconnect_backoff`]) until it succeeds or
    /// `shutdown` is cancelled (then `None`), so the worker may start before the broker and
    /// comes back after a broker restart. Declares the task queues and the completions queue, and sets the
    /// prefetch of the consuming channel to `prefetch` unacknowledged deliveries across all its
    /// consumers.
    pub async fn connect(
        url: &AmqpUrl,
        namespace: &Namespace,
        queues: &[String],
        prefetch: u16,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let connect = || Self::connect_once(url, namespace.clone(), queues, prefetch);
        amqp::connect_with_backoff(connect, shutdown).await
    }

    async fn connect_once(
        url: &AmqpUrl,
        namespace: Namespace,
        queues: &[String],
        prefetch: u16,
    ) -> Result<Self, lapin::Error> {
        let connection = url.connect().await?;
        let consumer = connection.create_channel().await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for queue in queues {
            amqp::declare_task_queue(&consumer, &namespace, queue).await?;
        }
        amqp::declare_completions_queue(&publisher, &namespace).await?;
        // RabbitMQ applies a prefetch with `global: false` to each consumer, and this channel has
        // one consumer per task queue; `global: true` makes the limit the channel's, shared by
        // all of them, so the worker never holds more than `prefetch` tasks in total.
        consumer
            .basic_qos(prefetch, BasicQosOptions { global: true })
            .await?;
        Ok(Self {
            connection,
            consumer,
            publisher,
            namespace,
            prefetch,
        })
    }

    /// Starts consuming one task queue under the consumer tag `tag`.
    pub async fn consume(&self, queue: &str, tag: &str) -> Result<Consumer, lapin::Error> {
        self.consumer
            .basic_consume(
                self.namespace.task_queue(queue).into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Stops the consumer `tag`: the broker sends it nothing more.
    pub async fn cancel(&self, tag: &str) {
        if let Err(error) = self
            .consumer
            .basic_cancel(tag.into(), lapin::options::BasicCancelOptions::default())
            .await
        {
            tracing::warn!(%error, tag, "cancelling consumer");
        }
    }

    /// Publishes a completion as a persistent message and waits for the broker's confirm.
    pub async fn publish_completion(&self, body: &[u8]) -> Result<(), PublishError> {
        let properties = BasicProperties::default().with_content_type("application/json".into());
        self.publish_confirmed(&self.namespace.completions_queue(), body, properties)
            .await
    }

    /// Keeps a message nobody can read in the dead-letters queue, with why and where it came
    /// from in its headers and when in its timestamp, and waits for the broker's confirm.
    pub async fn dead_letter(
        &self,
        body: &[u8],
        reason: &str,
        source: &str,
    ) -> Result<(), PublishError> {
        amqp::declare_dead_letters_queue(&self.publisher, &self.namespace).await?;
        let properties = amqp::dead_letter_properties(reason, source, std::time::SystemTime::now());
        self.publish_confirmed(&self.namespace.dead_letters_queue(), body, properties)
            .await
    }

    /// Puts a task message back in its queue with the given properties (persistent) and waits
    /// for the broker's confirm.
    pub async fn republish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publish_confirmed(queue, body, properties).await
    }

    /// Publishes a persistent message to `queue` and waits for the broker's confirm.
    async fn publish_confirmed(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            Err(PublishError::Refused)
        }
    }

    /// Returns once the broker has processed every method sent on the consuming channel so far
    /// (acknowledgements included), by making a synchronous call on that channel: RabbitMQ
    /// handles a channel's methods in order, and an acknowledgement has no reply of its own.
    pub async fn sync_consumer(&self) -> Result<(), lapin::Error> {
        self.consumer
            .basic_qos(self.prefetch, BasicQosOptions { global: true })
            .await
    }

    /// Whether the connection is up.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the channels and the connection; deliveries not acknowledged go back to their
    /// queues.
    pub async fn close(&self) {
        if let Err(error) = self.connection.close(200, "worker stopping".into()).await {
            tracing::debug!(%error, "closing rabbitmq connection");
        }
    }
}

/// Describes why a completion was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The connection or channel failed.
    #[error("publishing the completion: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the message.
    #[error("the broker refused the completion")]
    Refused,
}
