//! RabbitMQ for the scheduler: the connection (re-established in place when lost), publishing
//! tasks with publisher confirms, the consumer of completions, and the dead-letters queue (kept,
//! counted, read without being consumed, purged).
//!
//! Task queues are declared before the first publish to them on each connection, with the
//! declarations the workers use (`taskfleet_io::amqp`), so whichever side comes first creates
//! them; the backoff of connecting is that module's too.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use taskfleet_common::Namespace;
use taskfleet_io::amqp::{self, AmqpUrl};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The scheduler's RabbitMQ connection, re-established in place when it is lost (a broker
/// restart, a network cut): whoever meets the failure first reconnects, with backoff, and the
/// others wait for that and carry on with the new connection.
pub struct Broker {
    url: AmqpUrl,
    namespace: Namespace,
    link: std::sync::RwLock<Arc<Link>>,
    /// Held while reconnecting, so one caller reconnects and the others wait for it.
    reconnecting: Mutex<()>,
    /// Held while the dead letters are read or purged: a listing holds the messages it reads
    /// until it ends, and another listing (or a purge) of this scheduler meanwhile would miss
    /// them.
    dead_letters: Mutex<()>,
    shutdown: CancellationToken,
}

/// The most bytes of a dead letter's body that [`Broker::peek_dead_letters`] keeps.
pub const DEAD_LETTER_PREFIX_BYTES: usize = 256;

/// A message of the dead-letters queue, as a listing read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedLetter {
    /// Why, from where and when it was moved there, as its properties say.
    pub label: amqp::DeadLetterLabel,
    /// Its body's size in bytes.
    pub size: usize,
    /// The first [`DEAD_LETTER_PREFIX_BYTES`] bytes of its body (all of it, if shorter).
    pub prefix: Vec<u8>,
}

/// The start of the dead-letters queue, as a listing read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeekedLetters {
    /// The messages the queue held when the listing began (at least as many as it read).
    pub total: u32,
    /// The first messages, oldest first.
    pub letters: Vec<PeekedLetter>,
}

/// One connection with a publishing channel in confirm mode.
struct Link {
    connection: Connection,
    publisher: Channel,
    declared: Mutex<HashSet<String>>,
    /// Counts the connections this process made; tells a stale link from the current one.
    generation: u64,
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

impl Broker {
    /// Connects to `url`, retrying with backoff ([`amqp::reconnect_backoff`]) until it succeeds
    /// or `shutdown` is cancelled (then `None`), so the scheduler can start before the broker.
    /// Every reconnection uses `url` the same way (TLS and its CA certificate included).
    pub async fn connect(
        url: &AmqpUrl,
        namespace: Namespace,
        shutdown: CancellationToken,
    ) -> Option<Self> {
        let link = Link::connect_until(url, &namespace, 0, &shutdown).await?;
        Some(Self {
            url: url.clone(),
            namespace,
            link: std::sync::RwLock::new(Arc::new(link)),
            reconnecting: Mutex::new(()),
            dead_letters: Mutex::new(()),
            shutdown,
        })
    }

    fn link(&self) -> Arc<Link> {
        taskfleet_common::sync::read(&self.link).clone()
    }

    /// Replaces `failed` with a new connection, unless another caller already did; waits for
    /// the broker to come back. `None` if shutdown came first.
    async fn reconnect(&self, failed: &Link) -> Option<Arc<Link>> {
        let _one_at_a_time = self.reconnecting.lock().await;
        let current = self.link();
        if current.generation != failed.generation {
            return Some(current);
        }
        tracing::warn!("lost the rabbitmq connection; reconnecting");
        if let Err(error) = failed.connection.close(200, "reconnecting".into()).await {
            tracing::debug!(%error, "closing the lost rabbitmq connection");
        }
        let link = Arc::new(
            Link::connect_until(
                &self.url,
                &self.namespace,
                failed.generation + 1,
                &self.shutdown,
            )
            .await?,
        );
        *taskfleet_common::sync::write(&self.link) = link.clone();
        tracing::info!("reconnected to rabbitmq");
        Some(link)
    }

    /// Publishes messages as persistent, all in flight at once, and waits for the broker's
    /// confirms. Returns, for each message, whether the broker confirmed it. A publish that
    /// fails on a lost connection is made again, once, on the next connection.
    pub async fn publish(&self, messages: &[Outgoing]) -> Result<Vec<bool>, lapin::Error> {
        let link = self.link();
        match link.publish(&self.namespace, messages).await {
            Ok(acked) => Ok(acked),
            Err(error) => {
                tracing::warn!(%error, "publishing tasks failed");
                match self.reconnect(&link).await {
                    Some(link) => link.publish(&self.namespace, messages).await,
                    None => Err(error),
                }
            }
        }
    }

    /// Keeps a completion nobody can read in the dead-letters queue, with why in its headers;
    /// best effort (logged): the completion is acknowledged either way, since no retry could
    /// ever read it.
    pub async fn dead_letter(&self, body: &[u8], reason: &str) {
        let link = self.link();
        let kept = match link.dead_letter(&self.namespace, body, reason).await {
            Ok(kept) => Ok(kept),
            Err(_) => match self.reconnect(&link).await {
                Some(link) => link.dead_letter(&self.namespace, body, reason).await,
                None => Ok(false),
            },
        };
        match kept {
            Ok(true) => crate::metrics::dead_lettered(),
            Ok(false) => tracing::error!(reason, "the broker refused a dead letter; dropped"),
            Err(error) => tracing::error!(%error, reason, "keeping a dead letter failed; dropped"),
        }
    }

    /// Reports a completion to the completions queue, as a worker would: how the scheduler
    /// fails a task it cannot send. Returns whether the broker confirmed it.
    pub async fn report(&self, completion: &[u8]) -> Result<bool, lapin::Error> {
        let link = self.link();
        let queue = self.namespace.completions_queue();
        match link
            .publish_one(&queue, completion, BasicProperties::default())
            .await
        {
            Ok(acked) => Ok(acked),
            Err(error) => match self.reconnect(&link).await {
                Some(link) => {
                    link.publish_one(&queue, completion, BasicProperties::default())
                        .await
                }
                None => Err(error),
            },
        }
    }

    /// Consumes completions with the given prefetch, on a channel of their own, for as long as
    /// the process lives: after a lost connection the consumer is started again on the next
    /// one. Deliveries of a lost connection cannot be acknowledged; the broker hands them out
    /// again. The stream ends only at shutdown.
    pub fn completions(self: &Arc<Self>, prefetch: u16) -> impl Stream<Item = Delivery> + use<> {
        let broker = Arc::clone(self);
        futures_util::stream::unfold(
            (broker, None::<(Arc<Link>, Consumer)>),
            move |(broker, mut current)| async move {
                loop {
                    let (link, consumer) = match current.take() {
                        Some(consuming) => consuming,
                        None => {
                            let link = broker.link();
                            match link.consume_completions(&broker.namespace, prefetch).await {
                                Ok(consumer) => (link, consumer),
                                Err(error) => {
                                    tracing::warn!(%error, "consuming completions failed");
                                    broker.reconnect(&link).await?;
                                    continue;
                                }
                            }
                        }
                    };
                    let mut consumer = consumer;
                    let next = tokio::select! {
                        next = consumer.next() => next,
                        () = broker.shutdown.cancelled() => return None,
                    };
                    match next {
                        Some(Ok(delivery)) => {
                            return Some((delivery, (broker, Some((link, consumer)))));
                        }
                        Some(Err(error)) => {
                            tracing::warn!(%error, "the completion consumer failed");
                        }
                        None => tracing::warn!("the broker ended the completion consumer"),
                    }
                    broker.reconnect(&link).await?;
                }
            },
        )
    }

    /// Returns the messages ready and the consumers of a task queue, or `None` if the broker
    /// has no such queue. Each look-up uses a channel of its own: a passive declaration of a
    /// missing queue closes its channel.
    pub async fn queue_counts(&self, queue: &str) -> Result<Option<(u32, u32)>, lapin::Error> {
        self.counts_of(self.namespace.task_queue(queue)).await
    }

    /// Returns how many messages the dead-letters queue holds (declaring it, empty, if nothing
    /// was ever dead-lettered).
    pub async fn dead_letter_count(&self) -> Result<u32, lapin::Error> {
        // Declared first, as its writers declare it: looking up a queue that does not exist
        // closes the channel, which lapin logs as an error at every scrape.
        amqp::declare_dead_letters_queue(&self.link().publisher, &self.namespace).await?;
        let counts = self.counts_of(self.namespace.dead_letters_queue()).await?;
        Ok(counts.map_or(0, |(messages, _)| messages))
    }

    /// Returns the first `limit` messages of the dead-letters queue, oldest first, and how many
    /// it holds, without taking any off it. The queue is declared first, as its writers declare
    /// it, so a namespace that never dead-lettered anything has an empty one.
    ///
    /// The messages are got without acknowledgement on a channel of their own, which is then
    /// closed: the broker puts every message a channel did not acknowledge back in its queue,
    /// at its place, all at once. Until then they are the listing's, so another listing (of
    /// another scheduler) at that moment sees the queue without them, and a purge leaves them.
    /// A call dropped halfway (its caller's timeout) drops the channel, which lapin then closes,
    /// and a lost connection closes it too: either way the broker puts the messages back.
    pub async fn peek_dead_letters(&self, limit: usize) -> Result<PeekedLetters, lapin::Error> {
        let _one_at_a_time = self.dead_letters.lock().await;
        let channel = self.link().connection.create_channel().await?;
        let peeked = match amqp::declare_dead_letters_queue(&channel, &self.namespace).await {
            Ok(()) => peek(&channel, &self.namespace.dead_letters_queue(), limit).await,
            Err(error) => Err(error),
        };
        if let Err(error) = channel.close(200, "listed".into()).await {
            tracing::debug!(%error, "closing the channel of a dead-letters listing");
        }
        peeked
    }

    /// Removes every message ready in the dead-letters queue (declared first, as for a listing)
    /// and returns how many there were. Messages a listing of another scheduler holds at that
    /// moment are not ready, and stay.
    pub async fn purge_dead_letters(&self) -> Result<u32, lapin::Error> {
        let _one_at_a_time = self.dead_letters.lock().await;
        let channel = self.link().connection.create_channel().await?;
        amqp::declare_dead_letters_queue(&channel, &self.namespace).await?;
        let purged = channel
            .queue_purge(
                self.namespace.dead_letters_queue().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        if let Err(error) = channel.close(200, "purged".into()).await {
            tracing::debug!(%error, "closing the channel of a dead-letters purge");
        }
        Ok(purged)
    }

    /// Returns a queue's ready messages and consumers (a passive declare), or `None` if the
    /// broker does not have it.
    async fn counts_of(&self, queue: String) -> Result<Option<(u32, u32)>, lapin::Error> {
        let channel = self.link().connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
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
        self.link().connection.status().connected()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        if let Err(error) = self
            .link()
            .connection
            .close(200, "scheduler stopping".into())
            .await
        {
            tracing::debug!(%error, "closing rabbitmq connection");
        }
    }
}

/// Gets the first `limit` messages of `queue` on `channel` without acknowledging them, keeping
/// of each its label, size and first bytes.
async fn peek(channel: &Channel, queue: &str, limit: usize) -> Result<PeekedLetters, lapin::Error> {
    let mut peeked = PeekedLetters::default();
    while peeked.letters.len() < limit {
        let options = BasicGetOptions { no_ack: false };
        let Some(message) = channel.basic_get(queue.into(), options).await? else {
            break;
        };
        if peeked.letters.is_empty() {
            // What is left after the first message, and the first.
            peeked.total = message.message_count.saturating_add(1);
        }
        let body = &message.delivery.data;
        peeked.letters.push(PeekedLetter {
            label: amqp::read_dead_letter(&message.delivery.properties),
            size: body.len(),
            prefix: body[..body.len().min(DEAD_LETTER_PREFIX_BYTES)].to_vec(),
        });
    }
    // Messages dead-lettered while the listing ran may be among those it read.
    let read = u32::try_from(peeked.letters.len()).unwrap_or(u32::MAX);
    peeked.total = peeked.total.max(read);
    Ok(peeked)
}

impl Link {
    async fn connect_until(
        url: &AmqpUrl,
        namespace: &Namespace,
        generation: u64,
        shutdown: &CancellationToken,
    ) -> Option<Self> {
        let connect = || Self::connect(url, namespace, generation);
        amqp::connect_with_backoff(connect, shutdown).await
    }

    async fn connect(
        url: &AmqpUrl,
        namespace: &Namespace,
        generation: u64,
    ) -> Result<Self, lapin::Error> {
        let connection = url.connect().await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        amqp::declare_completions_queue(&publisher, namespace).await?;
        Ok(Self {
            connection,
            publisher,
            declared: Mutex::new(HashSet::new()),
            generation,
        })
    }

    /// Declares a task queue unless this connection already did.
    async fn ensure_task_queue(
        &self,
        namespace: &Namespace,
        queue: &str,
    ) -> Result<(), lapin::Error> {
        let mut declared = self.declared.lock().await;
        if declared.contains(queue) {
            return Ok(());
        }
        amqp::declare_task_queue(&self.publisher, namespace, queue).await?;
        declared.insert(queue.to_owned());
        Ok(())
    }

    async fn publish(
        &self,
        namespace: &Namespace,
        messages: &[Outgoing],
    ) -> Result<Vec<bool>, lapin::Error> {
        for message in messages {
            self.ensure_task_queue(namespace, &message.queue).await?;
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
                    namespace.task_queue(&message.queue).into(),
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

    async fn dead_letter(
        &self,
        namespace: &Namespace,
        body: &[u8],
        reason: &str,
    ) -> Result<bool, lapin::Error> {
        amqp::declare_dead_letters_queue(&self.publisher, namespace).await?;
        let properties = amqp::dead_letter_properties(
            reason,
            &namespace.completions_queue(),
            std::time::SystemTime::now(),
        );
        self.publish_one(&namespace.dead_letters_queue(), body, properties)
            .await
    }

    /// Publishes one persistent message to a queue and waits for the broker's confirm.
    async fn publish_one(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<bool, lapin::Error> {
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
        Ok(confirm.is_ack())
    }

    async fn consume_completions(
        &self,
        namespace: &Namespace,
        prefetch: u16,
    ) -> Result<Consumer, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                namespace.completions_queue().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}
