//! Per-tenant quotas on submissions (`docs/security.md`): runs and jobs per second across the
//! fleet, counted in Redis in one-second windows, and runs and jobs unfinished at once, counted
//! in PostgreSQL. What a tenant's quotas are is read at most once a second per scheduler.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use taskfleet_common::RunKind;

use super::{ApiError, AppState, owner};
use crate::auth::Principal;
use crate::store::{self, QuotaRow};
use crate::ttl_cache::TtlCache;

/// How long a tenant's quotas, once read, are trusted: a change takes effect within this.
const CACHE_TTL: Duration = Duration::from_secs(1);
/// The most tenants whose quotas are remembered at once; past it, the cache starts afresh.
const CACHE_CAPACITY: usize = 10_000;

/// Checks submissions against their tenant's quotas.
#[derive(Clone)]
pub struct Quotas {
    /// Each tenant's quotas, by name.
    cache: TtlCache<String, QuotaRow>,
}

impl Default for Quotas {
    fn default() -> Self {
        Self {
            cache: TtlCache::new(CACHE_TTL, CACHE_CAPACITY),
        }
    }
}

impl Quotas {
    /// Admits `runs` new runs or jobs of the caller's tenant, or answers 429 with the quota they
    /// would pass. Redis being unreachable admits them (a counter is not worth refusing work
    /// for), and says so in the log.
    pub async fn admit(
        &self,
        state: &AppState,
        principal: &Principal,
        runs: usize,
    ) -> Result<(), ApiError> {
        let quota = self.quota(state, principal).await?;
        Self::admit_with(state, principal, quota, runs).await
    }

    /// Admits one new run or job as [`Self::admit`] does, unless its idempotency key names a
    /// run the tenant has already: repeating a submission is never refused for its quota.
    pub async fn admit_one(
        &self,
        state: &AppState,
        principal: &Principal,
        kind: RunKind,
        idempotency_key: Option<&str>,
    ) -> Result<(), ApiError> {
        let quota = self.quota(state, principal).await?;
        if quota == QuotaRow::default() {
            return Ok(());
        }
        if let Some(key) = idempotency_key
            && store::run_with_idempotency_key(&state.db, owner(state, principal), kind, key)
                .await?
                .is_some()
        {
            return Ok(());
        }
        Self::admit_with(state, principal, quota, 1).await
    }

    /// Admits `runs` new runs or jobs against `quota`.
    async fn admit_with(
        state: &AppState,
        principal: &Principal,
        quota: QuotaRow,
        runs: usize,
    ) -> Result<(), ApiError> {
        let runs = i64::try_from(runs).unwrap_or(i64::MAX);
        let tenant = &principal.tenant;
        if let Some(limit) = quota.runs_in_flight {
            let limit = i64::from(limit);
            if runs > limit {
                return Err(ApiError::quota_exceeded(format!(
                    "tenant {tenant:?} may have at most {limit} runs unfinished at once, and this request holds {runs}"
                )));
            }
            let unfinished =
                store::runs_in_flight(&state.db, owner(state, principal), limit).await?;
            if unfinished + runs > limit {
                return Err(ApiError::quota_exceeded(format!(
                    "tenant {tenant:?} may have at most {limit} runs unfinished at once and has {unfinished}; try again when some finish"
                )));
            }
        }
        if let Some(limit) = quota.submissions_per_s {
            let limit = i64::from(limit);
            let second = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let key = state.config.namespace.submissions_key(tenant, second);
            let mut redis = state.redis.clone();
            // One transaction, so that a counter never outlives its window.
            let counted: Result<(i64,), redis::RedisError> = redis::pipe()
                .atomic()
                .incr(&key, runs)
                .expire(&key, 2)
                .ignore()
                .query_async(&mut redis)
                .await;
            match counted {
                Ok((count,)) if count > limit => {
                    return Err(ApiError::quota_exceeded(format!(
                        "tenant {tenant:?} may submit at most {limit} runs per second"
                    )));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, tenant, "counting submissions; admitting them");
                }
            }
        }
        Ok(())
    }

    /// Returns the caller's tenant's quotas, read at most once per [`CACHE_TTL`].
    async fn quota(&self, state: &AppState, principal: &Principal) -> Result<QuotaRow, ApiError> {
        if let Some(quota) = self.cache.get(principal.tenant.as_str()) {
            return Ok(quota);
        }
        let read_at = Instant::now();
        let quota = store::get_quota(&state.db, owner(state, principal)).await?;
        self.cache.insert(principal.tenant.clone(), quota, read_at);
        Ok(quota)
    }
}
