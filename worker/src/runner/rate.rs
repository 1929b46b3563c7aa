//! Late starts under a rate limit: a task whose message carries rate limits was published at
//! the start the scheduler reserved for it (`RateGate::slot_ms`). Before it starts, its worker
//! asks Redis (`taskfleet_io::rate_limits::check_late_start`, one round trip), which judges on
//! its own clock, the one the slot was reserved on, so that a worker's clock ahead of or behind
//! Redis's changes nothing: within [`LATE_AFTER`] of its slot the task starts; later (it waited
//! in its queue behind other work), it starts if no other start was reserved after its slot,
//! or if its limits allow a start right now, and is otherwise deferred to its projected turn,
//! so that tasks held up together do not all start at once. A task that carries no slot starts
//! only if its limits allow a start now. Redis out of reach, the task runs: it was reserved
//! once already.

use std::time::Duration;

use taskfleet_common::protocol::{Outcome, TaskMessage};
use taskfleet_io::rate_limits::{self, HORIZON, Limit, Reservation};

use super::Shared;

/// How long after its slot, on Redis's clock, a task still starts on that slot.
pub(super) const LATE_AFTER: Duration = Duration::from_millis(100);
/// The longest the check may take before Redis counts as out of reach.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// The least a deferred task waits.
const LEAST_DELAY: Duration = Duration::from_millis(10);

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
        let slot_us = gate.slot_ms.map(|slot| slot.saturating_mul(1000));
        let reserved =
            rate_limits::check_late_start(&mut redis, &limits, slot_us, LATE_AFTER, REDIS_TIMEOUT)
                .await;
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

    #[test]
    fn a_deferred_start_comes_back_when_the_scheduler_can_reserve_it() {
        assert_eq!(delay_for(2_000_000), Duration::from_millis(1_500));
        assert_eq!(delay_for(100_000), LEAST_DELAY);
        assert_eq!(delay_for(-5), LEAST_DELAY);
    }
}
