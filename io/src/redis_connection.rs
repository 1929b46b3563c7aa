//! Reaching Redis: the client both binaries open from their URL, and the managed connection
//! (reconnecting on its own) they send commands through.

use redis::aio::ConnectionManager;

/// Opens a client for `url` and its managed connection; the client also serves pub/sub
/// subscriptions (see [`crate::pubsub`]).
pub async fn connect(url: &str) -> Result<(redis::Client, ConnectionManager), ConnectError> {
    let client = redis::Client::open(url).map_err(ConnectError::Url)?;
    let connection = client
        .get_connection_manager()
        .await
        .map_err(ConnectError::Connect)?;
    Ok((client, connection))
}

/// Why Redis could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL does not parse.
    #[error("parsing the redis url: {0}")]
    Url(#[source] redis::RedisError),
    /// The server did not answer.
    #[error("connecting to redis: {0}")]
    Connect(#[source] redis::RedisError),
}
