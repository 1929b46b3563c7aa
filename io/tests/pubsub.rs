//! `pubsub::listen` against the real Redis on loopback, reached through a proxy of the test's
//! own, so the test can cut its connections without touching anyone else's.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use taskfleet_io::pubsub;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const REDIS_ADDR: &str = "127.0.0.1:6379";

/// A TCP proxy to Redis whose connections can all be cut at once.
struct Proxy {
    port: u16,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted = connections.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    let mut redis = TcpStream::connect(REDIS_ADDR).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut redis).await;
                });
                accepted.lock().unwrap().push(connection);
            }
        });
        Self { port, connections }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Drops every connection made so far, as a Redis restart would.
    fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

/// Publishes `payload` on `channel` every 50 ms until it arrives on `received`, for up to 10 s.
async fn publish_until_heard(
    channel: &str,
    payload: &str,
    received: &mut mpsc::UnboundedReceiver<String>,
) {
    let client = redis::Client::open(format!("redis://{REDIS_ADDR}/0")).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut redis)
            .await
            .unwrap();
        let heard = tokio::time::timeout(Duration::from_millis(50), received.recv()).await;
        if let Ok(Some(heard)) = heard
            && heard == payload
        {
            return;
        }
        assert!(Instant::now() < deadline, "{payload} never arrived");
    }
}

#[tokio::test]
async fn a_lost_subscription_is_made_again_and_hears_what_is_published_after() {
    let proxy = Proxy::start().await;
    let client = redis::Client::open(proxy.url()).unwrap();
    let channel = format!("taskfleet-io-test:{}:{}", std::process::id(), proxy.port);
    let shutdown = CancellationToken::new();
    let (tx, mut received) = mpsc::unbounded_channel();
    let listening = tokio::spawn({
        let channel = channel.clone();
        let shutdown = shutdown.clone();
        async move {
            pubsub::listen(&client, &channel, &shutdown, |payload| {
                let _ = tx.send(payload.to_owned());
            })
            .await;
        }
    });

    publish_until_heard(&channel, "before", &mut received).await;
    proxy.cut();
    publish_until_heard(&channel, "after", &mut received).await;

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), listening)
        .await
        .expect("listening ends at shutdown")
        .unwrap();
}
