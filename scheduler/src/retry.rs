//! Retry decisions: whether a failed attempt runs again, and after how long. Pure logic; the
//! delay itself lives in the database (`tasks.due_at`), promoted by the timer loop.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use taskfleet_common::StepError;
use taskfleet_common::definition::RetryPolicy;
use taskfleet_common::error::{CANCELLED, INVALID_OUTPUT, INVALID_TASK};

/// Returns whether a step whose attempt number `attempt` failed with `error` gets another
/// attempt under `policy`. Failures that another attempt cannot mend (a cancelled step, an
/// output or task the system cannot handle) are not retried.
pub fn should_retry(policy: Option<&RetryPolicy>, attempt: u32, error: &StepError) -> bool {
    let Some(policy) = policy else {
        return false;
    };
    let permanent = [CANCELLED, INVALID_OUTPUT, INVALID_TASK].contains(&error.kind.as_str());
    !permanent && attempt < policy.max_attempts
}

/// Returns the delay before the attempt after `attempt` (the first retry follows attempt 1):
/// exponential from `initial_backoff_ms` by `multiplier`, with jitter, never above
/// `max_backoff_ms`.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let max = Duration::from_millis(policy.max_backoff_ms);
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(policy.initial_backoff_ms))
        .with_max_delay(max)
        .with_factor(policy.multiplier as f32)
        .with_jitter()
        .without_max_times()
        .build();
    let index = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
    delays.nth(index).unwrap_or(max).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn retries_until_attempts_run_out_and_never_for_permanent_errors() {
        let failure = StepError::new("ValueError", "x");
        assert!(!should_retry(None, 1, &failure));
        assert!(should_retry(Some(&policy(3)), 1, &failure));
        assert!(should_retry(Some(&policy(3)), 2, &failure));
        assert!(!should_retry(Some(&policy(3)), 3, &failure));
        let invalid = StepError::new(INVALID_OUTPUT, "x");
        assert!(!should_retry(Some(&policy(3)), 1, &invalid));
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff_ms: 100,
            max_backoff_ms: 1000,
            multiplier: 2.0,
        };
        for _ in 0..50 {
            let first = backoff(&policy, 1);
            assert!(
                first >= Duration::from_millis(100) && first < Duration::from_millis(200),
                "{first:?}"
            );
            let third = backoff(&policy, 3);
            assert!(
                third >= Duration::from_millis(400) && third < Duration::from_millis(800),
                "{third:?}"
            );
            assert!(backoff(&policy, 9) <= Duration::from_millis(1000));
        }
    }
}
