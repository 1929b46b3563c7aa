//! RabbitMQ policy the scheduler and the worker share: how they reach the broker (the URL with
//! the CA certificate its `amqps://` connections trust, and backoff from 0.1 to 2 s, for as long
//! as it takes, until shutdown), the queues both declare and the arguments they declare them
//! with, and the properties of a dead letter, as they are written and as they are read.
//!
//! Both sides declare the queues they use, so whichever comes first creates them, and a queue
//! declared again with other arguments is refused by the broker (`PRECONDITION_FAILED`): the
//! declarations live here once so that the two can never differ. This module holds no
//! connection and publishes nothing; each binary's `broker` owns its connections and channels.

use std::fmt::Display;
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use lapin::options::QueueDeclareOptions;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use taskfleet_common::Namespace;
use taskfleet_common::names::MAX_PRIORITY;
use tokio_util::sync::CancellationToken;

use crate::tls::CaCertificate;

/// The shortest wait between attempts to reach RabbitMQ.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between attempts to reach RabbitMQ, at start and after a lost connection.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

/// The header of a dead letter that says why nobody can read it.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-taskfleet-reason";
/// The header of a dead letter that names the queue it came from.
pub const DEAD_LETTER_SOURCE_HEADER: &str = "x-taskfleet-source";

/// A RabbitMQ URL, with the CA certificate its `amqps://` connections trust.
#[derive(Debug, Clone)]
pub struct AmqpUrl {
    url: String,
    ca_certificate: Option<CaCertificate>,
}

impl AmqpUrl {
    /// Describes RabbitMQ at `url`. With an `amqps://` URL, TLS connections trust the system's
    /// CA certificates and `ca_certificate` besides; an `amqp://` URL is plain TCP either way.
    pub fn new(url: impl Into<String>, ca_certificate: Option<CaCertificate>) -> Self {
        Self {
            url: url.into(),
            ca_certificate,
        }
    }

    /// Returns the URL.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// Opens one connection, with TLS as the URL's scheme says; every connection (each
    /// reconnection too) is opened here, so none falls back to plain TCP or forgets the CA.
    pub async fn connect(&self) -> Result<Connection, lapin::Error> {
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: self.ca_certificate.as_ref().map(|ca| ca.pem().to_owned()),
        };
        Connection::connect_with_config(
            &self.url,
            ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime()?,
        )
        .await
    }
}

/// Returns the backoff between attempts to reach RabbitMQ: from [`RECONNECT_MIN_DELAY`], doubling
/// up to [`RECONNECT_MAX_DELAY`], each wait with up to as much again of jitter (so processes that
/// lost the same broker do not all come back at once), without a limit on attempts, so a process
/// may start before the broker and outlives a broker restart of any length.
pub fn reconnect_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN_DELAY)
        .with_max_delay(RECONNECT_MAX_DELAY)
        .with_jitter()
        .without_max_times()
}

/// Calls `connect` until it succeeds, waiting [`reconnect_backoff`] between attempts and logging
/// each failure; `None` if `shutdown` is cancelled first.
pub async fn connect_with_backoff<T, E, Fut>(
    connect: impl FnMut() -> Fut,
    shutdown: &CancellationToken,
) -> Option<T>
where
    E: Display,
    Fut: Future<Output = Result<T, E>>,
{
    let retried = connect
        .retry(reconnect_backoff())
        .notify(|error: &E, delay| tracing::warn!(%error, ?delay, "connecting to rabbitmq"));
    tokio::select! {
        connected = retried => connected.ok(),
        () = shutdown.cancelled() => None,
    }
}

/// Returns the arguments every task queue is declared with: a priority queue up to the highest
/// step priority.
pub fn task_queue_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-max-priority".into(),
        AMQPValue::ShortShortUInt(MAX_PRIORITY),
    );
    arguments
}

/// Declares the durable queue of the task queue `queue` with [`task_queue_arguments`].
pub async fn declare_task_queue(
    channel: &Channel,
    namespace: &Namespace,
    queue: &str,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            namespace.task_queue(queue).into(),
            QueueDeclareOptions::durable(),
            task_queue_arguments(),
        )
        .await?;
    Ok(())
}

/// Declares the durable queue on which workers report completions.
pub async fn declare_completions_queue(
    channel: &Channel,
    namespace: &Namespace,
) -> Result<(), lapin::Error> {
    declare_plain_queue(channel, namespace.completions_queue()).await
}

/// Declares the durable queue of messages nobody can read.
pub async fn declare_dead_letters_queue(
    channel: &Channel,
    namespace: &Namespace,
) -> Result<(), lapin::Error> {
    declare_plain_queue(channel, namespace.dead_letters_queue()).await
}

/// Declares a durable queue with no arguments.
async fn declare_plain_queue(channel: &Channel, name: String) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Returns the properties of a dead letter: why nobody can read it and the queue it came from
/// (its headers), and when it was moved there (its `timestamp`, in seconds since the Unix epoch).
/// Every dead letter is labelled here, by the scheduler and the workers alike.
pub fn dead_letter_properties(reason: &str, source: &str, at: SystemTime) -> BasicProperties {
    let seconds = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    BasicProperties::default()
        .with_headers(dead_letter_headers(reason, source))
        .with_timestamp(seconds)
}

/// Returns the headers of a dead letter: why nobody can read it, and the queue it came from.
fn dead_letter_headers(reason: &str, source: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        DEAD_LETTER_REASON_HEADER.into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        DEAD_LETTER_SOURCE_HEADER.into(),
        AMQPValue::LongString(source.into()),
    );
    headers
}

/// What a dead letter's properties say of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterLabel {
    /// Why nobody can read it.
    pub reason: Option<String>,
    /// The queue it came from.
    pub source: Option<String>,
    /// When it was moved to the dead letters, in seconds since the Unix epoch; `None` for one
    /// kept before this was recorded.
    pub at: Option<u64>,
}

/// Returns what a dead letter's properties say of it (see [`dead_letter_properties`]); a header
/// that is missing or not text is `None`, so a message put there by hand reads too.
pub fn read_dead_letter(properties: &BasicProperties) -> DeadLetterLabel {
    let header = |name: &str| {
        let headers = properties.headers().as_ref()?;
        match headers.inner().get(name)? {
            AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into()),
            AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
            _ => None,
        }
    };
    DeadLetterLabel {
        reason: header(DEAD_LETTER_REASON_HEADER),
        source: header(DEAD_LETTER_SOURCE_HEADER),
        at: *properties.timestamp(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn task_queues_are_priority_queues_up_to_the_highest_step_priority() {
        let arguments = task_queue_arguments();
        let arguments = arguments.inner();
        assert_eq!(arguments.len(), 1);
        assert_eq!(
            arguments.get("x-max-priority"),
            Some(&AMQPValue::ShortShortUInt(9))
        );
    }

    #[test]
    fn reconnecting_backs_off_from_100_ms_to_2_s_with_jitter_and_never_gives_up() {
        let delays: Vec<Duration> = reconnect_backoff().build().take(1000).collect();
        assert_eq!(delays.len(), 1000, "no limit on attempts");
        let jittered = |delay: Duration, base: Duration| delay >= base && delay <= 2 * base;
        assert!(jittered(delays[0], RECONNECT_MIN_DELAY), "{:?}", delays[0]);
        assert!(
            delays[10..]
                .iter()
                .all(|delay| jittered(*delay, RECONNECT_MAX_DELAY)),
            "{delays:?}"
        );
    }

    #[test]
    fn dead_letters_say_why_where_from_and_when() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_900);
        let properties = dead_letter_properties("bad json", "ns.completions", at);
        let headers = properties.headers().clone().unwrap_or_default();
        let headers = headers.inner();
        assert_eq!(
            headers.get("x-taskfleet-reason"),
            Some(&AMQPValue::LongString("bad json".into()))
        );
        assert_eq!(
            headers.get("x-taskfleet-source"),
            Some(&AMQPValue::LongString("ns.completions".into()))
        );
        assert_eq!(
            read_dead_letter(&properties),
            DeadLetterLabel {
                reason: Some("bad json".to_owned()),
                source: Some("ns.completions".to_owned()),
                at: Some(1_700_000_000),
            }
        );
    }

    #[test]
    fn a_dead_letter_without_labels_reads_as_unknown() {
        assert_eq!(
            read_dead_letter(&BasicProperties::default()),
            DeadLetterLabel::default()
        );
        let mut headers = FieldTable::default();
        headers.insert(DEAD_LETTER_REASON_HEADER.into(), AMQPValue::LongLongInt(7));
        headers.insert(
            DEAD_LETTER_SOURCE_HEADER.into(),
            AMQPValue::ShortString("by hand".into()),
        );
        let label = read_dead_letter(&BasicProperties::default().with_headers(headers));
        assert_eq!(label.reason, None);
        assert_eq!(label.source.as_deref(), Some("by hand"));
    }

    #[tokio::test]
    async fn connecting_stops_at_shutdown() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let never = || async { Err::<(), _>("refused") };
        assert_eq!(connect_with_backoff(never, &shutdown).await, None);
    }

    #[tokio::test]
    async fn connecting_retries_until_it_succeeds() {
        let shutdown = CancellationToken::new();
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let connect = || async {
            let attempt = attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if attempt < 2 {
                Err("refused")
            } else {
                Ok(attempt)
            }
        };
        assert_eq!(connect_with_backoff(connect, &shutdown).await, Some(2));
    }
}
