//! Listening on a Redis pub/sub channel for as long as a process runs: subscribes, hands each
//! message to the caller, and subscribes again after a lost connection (a Redis restart, a
//! network cut) until shutdown.
//!
//! Pub/sub delivers at most once: what is published while no subscription is up is lost for
//! good. Callers use it only for hints whose loss costs a delay or is covered by a durable check
//! (a long poll reads the run again at its deadline; a cancelled run also leaves a flag its
//! tasks find when delivered), and this module does not try to recover what was missed.

use std::convert::Infallible;
use std::time::Duration;

use backon::{ConstantBuilder, Retryable};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

/// The wait before subscribing again after a failed or lost subscription.
pub const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Returns the backoff between subscriptions: [`RESUBSCRIBE_DELAY`] each time, without a limit
/// on attempts. A constant wait rather than a growing one, since a subscription that was up for
/// hours and then lost is no reason to wait longer than one that failed at once.
pub fn resubscribe_backoff() -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(RESUBSCRIBE_DELAY)
        .without_max_times()
}

/// Describes why a subscription ended.
#[derive(Debug, thiserror::Error)]
enum SubscriptionError {
    #[error("connecting to redis: {0}")]
    Connect(#[source] redis::RedisError),
    #[error("subscribing: {0}")]
    Subscribe(#[source] redis::RedisError),
    #[error("the connection was lost")]
    Lost,
}

/// Subscribes to `channel` through `client` and calls `on_message` with the payload of every
/// message published on it (payloads that are not text are skipped), subscribing again after
/// [`resubscribe_backoff`] whenever the subscription cannot be made or is lost; returns once
/// `shutdown` is cancelled. `on_message` runs on the listening task, so it should return quickly.
pub async fn listen(
    client: &redis::Client,
    channel: &str,
    shutdown: &CancellationToken,
    on_message: impl Fn(&str),
) {
    let on_message = &on_message;
    let subscribed = (|| subscription(client, channel, on_message))
        .retry(resubscribe_backoff())
        .notify(|error: &SubscriptionError, delay: Duration| {
            tracing::warn!(%error, channel, ?delay, "listening on a redis channel; subscribing again");
        });
    tokio::select! {
        // The backoff sets no limit on attempts, so only shutdown ends the listening.
        _ = subscribed => {}
        () = shutdown.cancelled() => {}
    }
}

/// Subscribes once and hands messages to `on_message` until the subscription ends, which is
/// always an error: a subscription is meant to last.
async fn subscription(
    client: &redis::Client,
    channel: &str,
    on_message: &impl Fn(&str),
) -> Result<Infallible, SubscriptionError> {
    let mut pubsub = client
        .get_async_pubsub()
        .await
        .map_err(SubscriptionError::Connect)?;
    pubsub
        .subscribe(channel)
        .await
        .map_err(SubscriptionError::Subscribe)?;
    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        if let Ok(payload) = message.get_payload::<String>() {
            on_message(&payload);
        }
    }
    Err(SubscriptionError::Lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn resubscribing_waits_a_second_each_time_and_never_gives_up() {
        let delays: Vec<Duration> = resubscribe_backoff().build().take(100).collect();
        assert_eq!(delays, vec![RESUBSCRIBE_DELAY; 100]);
    }

    #[tokio::test]
    async fn listening_ends_at_shutdown_while_redis_cannot_be_reached() {
        // Port 1 on loopback refuses connections at once, so the listener is between attempts.
        let client = redis::Client::open("redis://127.0.0.1:1/").expect("a valid url");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stop.cancel();
        });
        tokio::time::timeout(
            Duration::from_millis(500),
            listen(&client, "nobody", &shutdown, |_| {}),
        )
        .await
        .expect("returns at shutdown, not after its wait");
    }
}
