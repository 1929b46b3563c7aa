//! The cancel listener: stops this worker's running tasks of a run that was cancelled (or
//! failed) as soon as a scheduler announces it. Tasks of such a run delivered later find its
//! flag when they take their lease (see `lease`); this module does not look at leases.

use std::sync::Arc;

use taskfleet_common::RunId;
use taskfleet_common::records::stop_flag;
use taskfleet_common::sync::lock;
use taskfleet_io::pubsub;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// Listens for cancelled runs and stops this worker's running tasks of them, subscribing again
/// after a lost connection (see [`pubsub::listen`]), until shutdown.
pub(super) async fn cancel_listener(
    shared: Arc<Shared>,
    client: redis::Client,
    shutdown: CancellationToken,
) {
    let channel = shared.namespace.cancel_channel();
    pubsub::listen(&client, &channel, &shutdown, |payload| {
        // `{run id} {stop time in ms}`, or the run id alone from earlier versions: all stop.
        let mut parts = payload.split(' ');
        let run_id = parts.next().and_then(|id| id.parse::<RunId>().ok());
        let stopped_at = parts.next().and_then(|ms| ms.parse::<u64>().ok());
        if let Some(run_id) = run_id {
            shared.cancel_run(run_id, stopped_at.unwrap_or(0));
        }
    })
    .await;
}

impl Shared {
    /// Stops the running tasks of a run stopped at `stopped_at` (milliseconds since the epoch,
    /// see `records::stop_flag`): those made before a re-run of it.
    fn cancel_run(&self, run_id: RunId, stopped_at: u64) {
        let running = lock(&self.running);
        for (task_id, (task_run, token)) in running.iter() {
            if *task_run == run_id && stop_flag::stops(stopped_at, *task_id) {
                tracing::info!(%task_id, %run_id, "stopping a task of a cancelled run");
                token.cancel();
            }
        }
    }
}
