//! `/v1/dead-letters` and `/v1/dead-letters:purge` (scope `admin`): what the namespace's
//! dead-letters queue holds, and emptying it.
//!
//! A listing never takes a message off the queue: [`crate::broker::Broker::peek_dead_letters`]
//! reads without acknowledging and hands every message back. A body is shown only as its first
//! bytes, as they are (payloads sealed with encryption on stay sealed).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, AppState, QueryParams, keys};
use crate::auth::{Principal, Scope};
use crate::broker::PeekedLetter;

/// The most messages a listing shows when the query names no limit.
const DEFAULT_LIMIT: i64 = 50;

/// The longest a listing or a purge waits for the broker.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The query of `GET /v1/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLettersQuery {
    /// The most messages listed (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// The start of the dead-letters queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    /// How many messages the queue holds, listed or not.
    total: u32,
    /// The first messages, oldest first, up to the limit.
    messages: Vec<DeadLetterView>,
}

/// A message in the dead-letters queue.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    /// Why nobody could read it, as the scheduler or worker that moved it there said.
    #[schema(required = true)]
    reason: Option<String>,
    /// The queue it came from.
    #[schema(required = true)]
    source: Option<String>,
    /// When it was moved there, to the second; null for a message kept before this was
    /// recorded.
    #[schema(required = true)]
    dead_lettered_at: Option<DateTime<Utc>>,
    /// Its body's size in bytes.
    size: usize,
    /// Its body's first 256 bytes at most, as UTF-8 text (an invalid byte shown as U+FFFD,
    /// a character cut at the end left out).
    body_prefix: String,
}

/// What a purge removed.
#[derive(Debug, Serialize, ToSchema)]
pub struct PurgedDeadLetters {
    /// How many messages it removed.
    purged: u32,
}

/// The first messages of the namespace's dead-letters queue (task and completion messages that
/// name no task, which nothing can handle), oldest first, with the count of all of them. Nothing
/// is taken off the queue. A body is shown as its first bytes only: with payload encryption on,
/// payloads in it are sealed.
#[utoipa::path(get, path = "/v1/dead-letters", operation_id = "listDeadLetters", tag = "admin",
    params(DeadLettersQuery),
    responses((status = 200, description = "The dead letters", body = DeadLetterList)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    QueryParams(query): QueryParams<DeadLettersQuery>,
) -> Result<Json<DeadLetterList>, ApiError> {
    principal.require(Scope::Admin)?;
    let (limit, _) = super::page(query.limit, None, DEFAULT_LIMIT)?;
    let limit = usize::try_from(limit).expect("page checks the limit is 1 to 1000");
    let peeked = with_timeout(
        state.broker.peek_dead_letters(limit),
        "listing dead letters",
    )
    .await?;
    Ok(Json(DeadLetterList {
        total: peeked.total,
        messages: peeked.letters.into_iter().map(view).collect(),
    }))
}

/// Empties the namespace's dead-letters queue and answers how many messages it removed; the
/// purge is recorded in the audit trail.
#[utoipa::path(post, path = "/v1/dead-letters:purge", operation_id = "purgeDeadLetters", tag = "admin",
    responses((status = 200, description = "The queue is empty", body = PurgedDeadLetters)))]
pub async fn purge(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<PurgedDeadLetters>, ApiError> {
    principal.require(Scope::Admin)?;
    let purged = with_timeout(state.broker.purge_dead_letters(), "purging dead letters").await?;
    crate::metrics::dead_letters_purged(purged);
    tracing::info!(purged, "dead letters purged");
    keys::record(
        &state,
        &principal,
        "dead_letters.purge",
        Some(state.config.namespace.dead_letters_queue()),
        Some(json!({ "purged": purged })),
    )
    .await;
    Ok(Json(PurgedDeadLetters { purged }))
}

/// Waits for a call to the broker for [`BROKER_TIMEOUT`] at most; a failure or a timeout is a
/// 503, logged naming `operation`.
async fn with_timeout<T>(
    call: impl Future<Output = Result<T, lapin::Error>>,
    operation: &str,
) -> Result<T, ApiError> {
    match tokio::time::timeout(BROKER_TIMEOUT, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => {
            tracing::warn!(%error, operation);
            Err(ApiError::unavailable("rabbitmq is unavailable; try again"))
        }
        Err(_) => {
            tracing::warn!(operation, "rabbitmq took too long");
            Err(ApiError::unavailable("rabbitmq took too long; try again"))
        }
    }
}

/// A dead letter as the API shows it.
fn view(letter: PeekedLetter) -> DeadLetterView {
    let cut = letter.prefix.len() < letter.size;
    DeadLetterView {
        reason: letter.label.reason,
        source: letter.label.source,
        dead_lettered_at: letter
            .label
            .at
            .and_then(|seconds| i64::try_from(seconds).ok())
            .and_then(|seconds| DateTime::from_timestamp(seconds, 0)),
        size: letter.size,
        body_prefix: prefix_text(&letter.prefix, cut),
    }
}

/// Returns the first bytes of a body as text: invalid UTF-8 as U+FFFD, except a character that
/// the cut (`cut`: the body goes on) split at the end, which is left out.
fn prefix_text(prefix: &[u8], cut: bool) -> String {
    let end = if cut {
        complete_end(prefix)
    } else {
        prefix.len()
    };
    String::from_utf8_lossy(&prefix[..end]).into_owned()
}

/// Returns the length of `bytes` without a UTF-8 sequence that starts in its last three bytes
/// and needs more bytes than are left.
fn complete_end(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        let needed = match byte {
            // A continuation byte: the sequence starts further back.
            0x80..=0xBF => continue,
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needed > back {
            bytes.len() - back
        } else {
            bytes.len()
        };
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(prefix: &[u8], cut: bool, expected: &str) {
        assert_eq!(prefix_text(prefix, cut), expected, "{prefix:?} cut {cut}");
    }

    #[test]
    fn a_prefix_is_text_without_a_character_split_by_the_cut() {
        check(b"{\"task\": 1}", false, "{\"task\": 1}");
        check("héé".as_bytes(), true, "héé");
        // "é" is C3 A9; the cut took its first byte only.
        check(&"hé".as_bytes()[..2], true, "h");
        check(&"a€".as_bytes()[..3], true, "a");
        check(&"a😀".as_bytes()[..4], true, "a");
        check("a😀".as_bytes(), true, "a😀");
        // Not cut: a truncated sequence is the body's own, shown as invalid.
        check(&"hé".as_bytes()[..2], false, "h\u{FFFD}");
        check(b"\xff\xfe", true, "\u{FFFD}\u{FFFD}");
        check(b"", true, "");
    }

    #[test]
    fn a_letter_shows_its_label_size_and_time() {
        let letter = PeekedLetter {
            label: taskfleet_io::amqp::DeadLetterLabel {
                reason: Some("bad json".to_owned()),
                source: Some("ns.completions".to_owned()),
                at: Some(1_700_000_000),
            },
            size: 300,
            prefix: vec![b'x'; 256],
        };
        let view = view(letter);
        assert_eq!(view.size, 300);
        assert_eq!(view.body_prefix.len(), 256);
        assert_eq!(
            view.dead_lettered_at.map(|at| at.to_rfc3339()),
            Some("2023-11-14T22:13:20+00:00".to_owned())
        );
        assert_eq!(view.reason.as_deref(), Some("bad json"));
    }
}
