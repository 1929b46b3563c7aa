//! Turns SIGTERM and Ctrl-C into the cancellation of a process's root token.

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` at the first SIGTERM or SIGINT (Ctrl-C); a process whose SIGTERM handler
/// cannot be installed stops only on Ctrl-C, and says so in its log.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    let mut terminate = match terminate {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "installing the SIGTERM handler");
            None
        }
    };
    let terminated = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
