//! Late starts under a rate limit: a task whose message carries rate limits was published at
//! the start the scheduler reserved for it (`RateGate::slot_ms`). One that starts more than
//! [`LATE_AFTER`] after that slot (it waited in its queue behind other work), or that carries
//! no slot, asks Redis again (`taskfleet_io::rate_limits`, one round trip): if a start is free
//! within the horizon it runs now, else it is deferred, so that tasks held up together do not
//! all start at once. Redis out of reach, the task runs: it was reserved once already.

use std::time::Duration;

use chrono::Utc;
use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_io::rate_limits::{self, HORIZON, Limit, Reservation};

use super::Shared;

/// How long after its slot a task still starts without asking again.
pub(super) const LATE_AFTER: Duration = Duration::from_millis(100);
/// The longest the check may take before Redis counts as out of reach.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// The least a deferred task waits.
const LEAST_DELAY: Duration = Duration::from_millis(10);

/// Whether a task's start, `now_ms` (milliseconds since the Unix epoch), has to be checked.
fn is_late(task: &TaskMessage, now_ms: i64) -> bool {
    task.rate_limit.as_ref().is_some_and(|gate| {
        gate.slot_ms
            .is_none_or(|slot| now_ms - slot > LATE_AFTER.as_millis() as i64)
    })
}

/// How long a start whose turn is projected `turn_us` microseconds away waits: until the
/// scheduler, which reserves [`HORIZON`] ahead, can reserve it.
fn delay_for(turn_us: i64) -> Duration {
    Duration::from_micros(u64::try_from(turn_us).unwrap_or(0))
        .saturating_sub(HORIZON)
        .max(LEAST_DELAY)
}

impl Shared {
    /// Returns the outcome of a late start over its rate limit (deferred), or `None` if the
    /// task may start now.
    pub(super) async fn over_rate_limit(&self, task: &TaskMessage) -> Option<Outcome> {
        if !is_late(task, Utc::now().timestamp_millis()) {
            return None;
        }
        let gate = task.rate_limit.as_ref()?;
        let keys: Vec<String> = gate
            .limits
            .iter()
            .map(|spec| self.namespace.rate_key(&spec.group))
            .collect();
        let limits: Vec<Limit<'_>> = gate
            .limits
            .iter()
            .zip(&keys)
            .map(|(spec, key)| Limit {
                key,
                per_second: spec.per_second,
                burst: spec.burst,
            })
            .collect();
        let mut redis = self.redis.clone();
        let reserved = rate_limits::reserve(&mut redis, &[limits], HORIZON, REDIS_TIMEOUT).await;
        match reserved.map(|reservations| (reservations.now_us, reservations.each.first().copied()))
        {
            Ok((_, Some(Reservation::Reserved { .. }) | None)) => None,
            Ok((now_us, Some(Reservation::NotReserved { projected_us }))) => {
                let delay = delay_for(projected_us - now_us);
                tracing::debug!(
                    delay_ms = delay.as_millis() as u64,
                    "a late start is over its rate limit; deferred"
                );
                Some(Outcome::Deferred {
                    delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    reason: "the task started late and its rate limit has no start free now"
                        .to_owned(),
                })
            }
            Err(error) => {
                tracing::warn!(%error, "checking a late start's rate limit; starting it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskfleet_common::protocol::{PROTOCOL_VERSION, RateGate, RateSpec};
    use taskfleet_common::{RunId, TaskId};

    fn task(rate_limit: Option<RateGate>) -> TaskMessage {
        TaskMessage {
            version: PROTOCOL_VERSION,
            task_id: TaskId::new(),
            run_id: RunId::new(),
            step_id: "s".to_owned(),
            attempt: 1,
            step: taskfleet_common::definition::StepKind::Dataflow {
                program: ".".to_owned(),
            },
            input: serde_json::json!(1),
            timeout_s: None,
            ends_run: false,
            trace_id: None,
            rate_limit,
            exclusive: false,
        }
    }

    fn gate(slot_ms: Option<i64>) -> Option<RateGate> {
        Some(RateGate {
            limits: vec![RateSpec {
                group: "g".to_owned(),
                per_second: 1.0,
                burst: 1,
            }],
            slot_ms,
        })
    }

    #[test]
    fn only_a_start_well_past_its_slot_or_without_one_is_checked() {
        assert!(!is_late(&task(None), 10_000));
        assert!(!is_late(&task(gate(Some(10_000))), 10_000));
        assert!(!is_late(&task(gate(Some(10_000))), 10_100));
        assert!(!is_late(&task(gate(Some(10_000))), 9_000), "early");
        assert!(is_late(&task(gate(Some(10_000))), 10_101));
        assert!(is_late(&task(gate(None)), 0));
    }

    #[test]
    fn a_deferred_start_comes_back_when_the_scheduler_can_reserve_it() {
        assert_eq!(delay_for(2_000_000), Duration::from_millis(1_500));
        assert_eq!(delay_for(100_000), LEAST_DELAY);
        assert_eq!(delay_for(-5), LEAST_DELAY);
    }
}
