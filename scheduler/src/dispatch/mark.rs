//! Marks confirmed tasks dispatched, a while after their confirm, so that the relay leaves
//! them alone; it must not mark a task claimed again since (see `store::mark_dispatched`).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::{self, HeldConnection};

/// Marks confirmed tasks dispatched `mark_after` their confirm, on a connection of its own; at
/// `stopping`, marks everything left at once.
pub(super) async fn mark_loop(
    db: sqlx::PgPool,
    mut confirmed: mpsc::UnboundedReceiver<(tokio::time::Instant, Vec<Uuid>)>,
    mark_after: Duration,
    stopping: CancellationToken,
) {
    let mut conn = HeldConnection::new(db);
    while let Some((at, due)) = confirmed.recv().await {
        tokio::select! {
            () = tokio::time::sleep_until(at + mark_after) => {}
            () = stopping.cancelled() => {}
        }
        // Everything else due joins this statement, and so does the first entry not yet due,
        // a moment early, rather than be held back for a statement of its own. Each task goes
        // with the time since its confirm, which fences the mark (see `mark_dispatched`).
        let now = tokio::time::Instant::now();
        let age = now.saturating_duration_since(at);
        let mut marks: Vec<(Uuid, Duration)> = due.into_iter().map(|id| (id, age)).collect();
        while let Ok((at, ids)) = confirmed.try_recv() {
            marks.extend(
                ids.into_iter()
                    .map(|id| (id, now.saturating_duration_since(at))),
            );
            if at + mark_after > now && !stopping.is_cancelled() {
                break;
            }
        }
        let marked = match conn.get().await {
            Ok(conn) => store::mark_dispatched(conn, &marks).await,
            Err(error) => Err(error),
        };
        if let Err(error) = conn.check(marked) {
            // They are published; the relay may publish them again, which fencing makes harmless.
            tracing::warn!(%error, tasks = marks.len(), "marking tasks dispatched failed");
        }
    }
}
